"""PID 1 of an EasyEnclave Mini image.

The kernel runs `/init`, which calls `main()`. The order is DESIGN.md's: mount the API
filesystems and configfs, console, the image facts (eemini.guest.image) and the command line
check (production images), cmdline, boot token, network (eemini.guest.net), boot config,
attestation (a production image's trial quote), runtime event log, control socket, workload,
supervise. The kernel has every driver built in (no loadable modules). Boot config from the
cmdline and the config disk is read before the network (it may hold the static network keys);
metadata-server config after it.

PID 1 must never return or raise: the kernel panics when init exits. Every path ends in
`power_off()`: an unexpected exception is printed on the console and followed by a clean
power-off. Console lines that start with `eemini: boot failed:`, `eemini: refusing to start the
workload:` and `eemini: powering off (...)` are what `eemini run` reads to judge the outcome.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from eemini.guest import linux, wirejson
from eemini.guest.image import (
    IMAGE_JSON,
    SOCKET,
    SPEC_JSON,
    Attestation,
    ConfigSource,
    ImageError,
    ImageFacts,
)
from eemini.guest.linux import MS_NODEV, MS_NOEXEC, MS_NOSUID
from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import NoReturn

    from eemini.guest.attest import Backend
    from eemini.guest.bootconfig import Setting
    from eemini.guest.events import Event
    from eemini.guest.loop import EventLoop
    from eemini.guest.net import Uplink
    from eemini.guest.power import PowerWatch
    from eemini.guest.rtmr import RuntimeMeasurer
    from eemini.guest.spec import EnclaveSpec

MountSpec = tuple[str, str, str, int, str | None]

# (source, target, fstype, flags, options): the API filesystems, in the order they are needed.
EARLY_MOUNTS: tuple[MountSpec, ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)
# configfs-tsm's /sys/kernel/config/tsm/report (the quote interface). Built into the image's
# kernel; a kernel without it (or a test harness) gets a console line, and a production image
# then refuses at its trial quote, saying the report directory is missing.
CONFIGFS: MountSpec = (
    "configfs",
    "/sys/kernel/config",
    "configfs",
    MS_NOSUID | MS_NODEV | MS_NOEXEC,
    None,
)
GRACE_KILL = 2.0  # leftover processes at power-off: SIGTERM, this long, then SIGKILL


class BootFailure(Exception):
    """A reason to stop the boot that the operator must read (one console line, then power-off)."""

    headline = "boot failed"

    def line(self) -> str:
        """The console line (after `eemini: `) that says why."""
        return f"{self.headline}: {self}"


class Refusal(BootFailure):
    """This machine or boot cannot be trusted with the workload: a production image that cannot
    attest, or whose kernel command line is not the UKI's own."""

    headline = "refusing to start the workload"


@record
class Paths:
    """Where PID 1 reads its inputs; fixed in the image, moved only by tests."""

    image_json: str = IMAGE_JSON
    spec_json: str = SPEC_JSON
    cmdline: str = "/proc/cmdline"
    tsm_report: str = "/sys/kernel/config/tsm/report"  # eemini.guest.attest.TSM_REPORT_ROOT
    socket: str = SOCKET
    resolv_conf: str = "/etc/resolv.conf"
    sys_input: str = "/sys/class/input"
    dev_input: str = "/dev/input"


def console(text: str) -> None:
    """One line on the console, prefixed so the host can tell PID 1 from the kernel and workload."""
    try:
        os.write(2, f"eemini: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def uptime() -> float:
    """Seconds since the kernel started (CLOCK_BOOTTIME, the clock of /proc/uptime)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Timeline:
    """When each boot step ended, in seconds since the kernel started: one console line once
    the workload has started, so a slow step shows which one it was."""

    def __init__(self, started: float | None) -> None:
        self.marks: list[tuple[str, float]] = []
        if started is not None:
            self.marks.append(("python", started))

    def mark(self, step: str) -> None:
        self.marks.append((step, uptime()))

    def line(self) -> str:
        steps = ", ".join(f"{step} {t:.2f}" for step, t in self.marks)
        return f"boot timeline (s since kernel start): {steps}"


def mount_all(mounts: tuple[MountSpec, ...]) -> None:
    for source, target, fstype, flags, options in mounts:
        os.makedirs(target, exist_ok=True)
        if os.path.ismount(target):
            continue  # the kernel (devtmpfs.mount=1) or a test harness did it already
        linux.mount(source, target, fstype, flags, options)


def open_console(cmdline_text: str) -> None:
    """Make fds 0-2 the console: /dev/console, or the serial port when the cmdline names none."""
    try:
        os.fstat(2)
        if "console=" in cmdline_text:
            return
    except OSError:
        pass
    path = "/dev/console" if "console=" in cmdline_text else "/dev/ttyS0"
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115


def kill_everything() -> None:
    """At power-off: SIGTERM every other process, a short grace, then SIGKILL; reap them all."""
    for signum, wait in ((signal.SIGTERM, GRACE_KILL), (signal.SIGKILL, 1.0)):
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.02)


def power_off(reason: str) -> NoReturn:
    """Stop what is left, sync, and power off. Never returns; if even reboot(2) fails, sleep
    forever rather than exit (an exiting init is a kernel panic)."""
    console(f"powering off ({reason})")
    for step in (kill_everything, os.sync):
        try:
            step()
        except BaseException as e:  # PID 1 must get to reboot(2) no matter what
            console(f"power-off step {step.__name__} failed: {e}")
    while True:
        try:
            linux.reboot(linux.LINUX_REBOOT_CMD_POWER_OFF)
        except BaseException as e:
            console(f"power-off failed: {e}")
        try:
            signal.pause()
        except BaseException:  # noqa: S110 (nothing may stop the retry)
            pass


def check_cmdline(image: ImageFacts, cmdline_text: str) -> None:
    """A production image runs only with the command line built into its UKI.

    With Secure Boot off (the UKI is unsigned) systemd-stub passes the boot entry's LoadOptions
    instead of `.cmdline`, so the host could hand the kernel any command line. The builder records
    what the stub passes on from `.cmdline` as image.json `cmdline`; /proc/cmdline is the kernel's
    copy with a newline added."""
    from eemini.guest.bootconfig import KERNEL_SPACES

    # Trailing bytes the kernel takes for spaces only (str.rstrip() would also drop \x1c, U+2028 ...,
    # which the kernel keeps as part of the last argument).
    raw = cmdline_text.encode("utf-8", "surrogateescape").rstrip(bytes(sorted(KERNEL_SPACES)))
    got = raw.decode("utf-8", "surrogateescape")
    if got != image.cmdline:
        raise Refusal(
            f"the kernel command line is not the image's own: got {got!r}, "
            f"the image was built with {image.cmdline!r}"
        )


def trial_quote(backend: Backend) -> int:
    """One quote through the real path (configfs-tsm: entry, provider, inblob, outblob,
    generation, self-check, removal; Azure: user data, HCL report, TD quote, vTPM quote, every
    self-check) for fresh random report data; its size, or Refusal saying why there is none."""
    from eemini.guest.attest import AttestError
    from eemini.guest.quote_layout import REPORT_DATA_SIZE

    try:
        return len(backend.quote(os.getrandom(REPORT_DATA_SIZE)))
    except AttestError as e:
        raise Refusal(f"TDX attestation is unavailable: {e}") from None


class Boot:
    """The boot sequence, one method per step; `run()` ends in the event loop or raises."""

    def __init__(self, paths: Paths, started: float | None = None) -> None:
        self.paths = paths
        self.timeline = Timeline(started)
        self.uplink: Uplink | None = None

    def run(self) -> None:
        from eemini.guest import bootconfig

        self.timeline.mark("imports")
        mount_all(EARLY_MOUNTS)
        cmdline_text = self.read_text(self.paths.cmdline)
        open_console(cmdline_text)
        console(f"PID 1 starting (kernel {os.uname().release}, uptime {uptime():.2f} s)")
        try:
            # Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot. (EINVAL inside a
            # PID namespace, where the kernel offers only the power commands.)
            linux.reboot(linux.LINUX_REBOOT_CMD_CAD_OFF)
        except OSError:
            pass
        image = self.image_facts()
        if image.attestation.production:
            check_cmdline(image, cmdline_text)
        try:
            mount_all((CONFIGFS,))
        except OSError as e:
            console(f"configfs: {e}")
        # The boot token: 32 bytes from the kernel CSPRNG (getrandom(2) blocks until it is seeded).
        token = os.getrandom(32).hex()
        spec_bytes, spec = self.load_spec()
        allow = spec.workload.allow_env
        try:
            local = bootconfig.collect_local(cmdline_text, image.config_sources, console)
            static = bootconfig.apply_policy(local, allow).network
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None
        self.timeline.mark("local config")
        from eemini.guest.net import Uplink

        self.uplink = Uplink(self.paths.resolv_conf, console)
        self.uplink.bring_up(image.network, static)
        self.timeline.mark("network")
        try:
            remote = self.remote_config(image.config_sources)
            config = bootconfig.apply_policy(local + remote, allow)
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None
        for s in config.settings:
            console(f"boot config: {s.key} from {s.source} accepted ({s.digest[:23]}...)")
        self.timeline.mark("remote config")
        backend, measurer = self.backend(image, cmdline_text)
        events = self.event_log(spec_bytes, spec.workload.path, config.settings, measurer)
        self.timeline.mark("attestation")
        self.serve(spec, token, backend, image=image, env=config.env, events=events, measurer=measurer)

    # --- steps ---

    @staticmethod
    def read_text(path: str) -> str:
        # surrogateescape: bytes that are not UTF-8 survive, so the cmdline parser sees the
        # kernel's own bytes (and check_cmdline compares them).
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError:
            return ""

    def image_facts(self) -> ImageFacts:
        path = self.paths.image_json
        try:
            with open(path, "rb") as f:
                return ImageFacts.from_dict(wirejson.loads(f.read()))
        except OSError as e:
            raise BootFailure(f"cannot read the image facts {path}: {e.strerror}") from None
        except ImageError as e:  # first: an ImageError is a ValueError too
            raise BootFailure(f"image.json: {e}") from None
        except ValueError as e:
            raise BootFailure(f"the image facts {path} are not valid JSON: {e}") from None

    def load_spec(self) -> tuple[bytes, EnclaveSpec]:
        from eemini.guest import spec as guest_spec

        path = self.paths.spec_json
        try:
            with open(path, "rb") as f:
                data = f.read()
            return data, guest_spec.loads(data)
        except OSError as e:
            raise BootFailure(f"cannot read the enclave spec {path}: {e.strerror}") from None
        except guest_spec.SpecError as e:
            raise BootFailure(f"the enclave spec {path} is invalid: {e}") from None

    @staticmethod
    def remote_config(sources: Sequence[ConfigSource]) -> list[Setting]:
        """Boot config from the metadata server, for an image whose profile names one (only
        those images carry the metadata client's HTTP client)."""
        if all(source.local for source in sources):
            return []
        from eemini.guest import metadata

        return metadata.collect(sources, metadata.Fetch(), console)

    def backend(self, image: ImageFacts, cmdline_text: str) -> tuple[Backend, RuntimeMeasurer]:
        if image.attestation is Attestation.SIMULATED:
            from eemini.guest.bootconfig import ConfigError
            from eemini.guest.dev import simulated

            try:
                return simulated.boot(cmdline_text, console)
            except ConfigError as e:
                raise BootFailure(str(e)) from None
        if image.attestation is Attestation.AZURE_TDX_VTPM:
            from eemini.guest import azure

            return azure.boot(trial_quote, console)
        from eemini.guest.attest import ConfigfsTsmBackend  # Attestation.CONFIGFS_TSM
        from eemini.guest.rtmr import RuntimeMeasurer

        backend = ConfigfsTsmBackend(self.paths.tsm_report)
        size = trial_quote(backend)
        measurer = RuntimeMeasurer()
        rtmr3 = (
            "extended with runtime events" if measurer.enabled else f"not extended ({measurer.reason})"
        )
        console(f"attestation: TDX through configfs-tsm (trial quote: {size} bytes); RTMR3 {rtmr3}")
        return backend, measurer

    @staticmethod
    def event_log(
        spec_bytes: bytes, workload_path: str, settings: Sequence[Setting], measurer: RuntimeMeasurer
    ) -> tuple[Event, ...]:
        from eemini.guest.events import boot_log

        try:
            with open(workload_path, "rb") as f:
                workload = f.read()
        except OSError as e:
            raise BootFailure(f"cannot read the workload {workload_path}: {e.strerror}") from None
        return boot_log(
            measurer.measure, "image", spec_bytes, (workload_path, workload), settings, sealed_by="pid1"
        )

    def serve(
        self,
        spec: EnclaveSpec,
        token: str,
        backend: Backend,
        *,
        image: ImageFacts,
        env: Mapping[str, str],
        events: tuple[Event, ...],
        measurer: RuntimeMeasurer,
    ) -> None:
        from eemini.guest.attest import CCEL_PATH
        from eemini.guest.power import PowerWatch
        from eemini.guest.runtime import Runtime, RuntimeConfig

        config = RuntimeConfig(
            spec=spec,
            token=token,
            backend=backend,
            socket_path=self.paths.socket,
            image=image,
            extra_env=env,
            ccel_path=CCEL_PATH if os.path.exists(CCEL_PATH) else None,
        )
        runtime = Runtime(config, events=events, on_poweroff=power_off, measurer=measurer)
        watch = PowerWatch(runtime.loop, runtime.shutdown, console)
        watch.install_signals()
        if self.uplink is not None:
            self.uplink.keep(runtime.loop)
        runtime.start()
        self.timeline.mark("workload")
        console(
            f"control socket {self.paths.socket}; workload {spec.workload.path} "
            f"started at uptime {uptime():.2f} s"
        )
        console(self.timeline.line())
        self.watch_buttons(watch, runtime.loop, retries=3)
        runtime.loop.run()
        # The loop only returns if something stopped it without powering off.
        raise BootFailure("the event loop ended")

    def watch_buttons(self, watch: PowerWatch, loop: EventLoop, retries: int) -> None:
        """The power button's input device may be registered a moment after /init starts: look
        again a few times."""
        if watch.watch_buttons(self.paths.sys_input, self.paths.dev_input):
            console(f"power button: watching {', '.join(sorted(watch.fds.values()))}")
        elif retries > 0:
            loop.call_later(1.0, lambda: self.watch_buttons(watch, loop, retries - 1))
        else:
            console("power button: no input device reports KEY_POWER; SIGTERM/Ctrl-Alt-Del still work")


def main(paths: Paths | None = None, started: float | None = None) -> NoReturn:
    """PID 1. `started`: CLOCK_BOOTTIME when /init's interpreter was up (for the timeline)."""
    reason = "the boot sequence ended"
    try:
        Boot(paths or Paths(), started).run()
    except BootFailure as e:
        console(e.line())
        reason = "boot failed"
    except BaseException as e:  # PID 1 logs everything and powers off
        console(f"fatal: {type(e).__name__}: {e}")
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: S110 (the power-off must follow)
            pass
        reason = "fatal error"
    power_off(reason)
