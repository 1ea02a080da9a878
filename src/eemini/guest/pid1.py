"""PID 1 of an EasyEnclave Mini image.

The kernel runs `/init`, which calls `main()`. The order is DESIGN.md's: mount the API
filesystems and configfs, console, the command line check (production images), cmdline, boot
token, network, boot config, attestation (a production image's trial quote), runtime event log,
control socket, workload, supervise. The kernel has every driver built in (no loadable modules).
Boot config from the cmdline and the config disk is read before the network (it may hold the
static network keys); metadata-server config after it.

PID 1 must never return or raise: the kernel panics when init exits. Every path ends in
`power_off()`: an unexpected exception is printed on the console and followed by a clean
power-off. Console lines that start with `eemini: boot failed:`, `eemini: refusing to start the
workload:` and `eemini: powering off (...)` are what `eemini run` reads to judge the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from eemini.guest import sys as ksys
from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

MountSpec = tuple[str, str, str, int, str | None]

# (source, target, fstype, flags, options): the API filesystems, in the order they are needed.
EARLY_MOUNTS: tuple[MountSpec, ...] = (
    ("proc", "/proc", "proc", ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", ksys.MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        ksys.MS_NOSUID | ksys.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    ("tmpfs", "/run", "tmpfs", ksys.MS_NOSUID | ksys.MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", ksys.MS_NOSUID | ksys.MS_NODEV, "mode=1777"),
)
# configfs-tsm's /sys/kernel/config/tsm/report (the quote interface). Built into the image's
# kernel; a kernel without it (or a test harness) gets a console line, and a production image
# then refuses at its trial quote, saying the report directory is missing.
CONFIGFS: MountSpec = (
    "configfs",
    "/sys/kernel/config",
    "configfs",
    ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC,
    None,
)
CCEL = "/sys/firmware/acpi/tables/data/CCEL"
NIC_WAIT = 5.0  # a NIC driver may finish probing after /init starts
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

    image_json: str = "/etc/eemini/image.json"
    spec_json: str = "/etc/eemini/spec.json"
    cmdline: str = "/proc/cmdline"
    tsm_report: str = "/sys/kernel/config/tsm/report"  # eemini.guest.attest.TSM_REPORT_ROOT
    socket: str = "/var/lib/easyenclave/agent.sock"
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
        ksys.mount(source, target, fstype, flags, options)


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
    for step in (kill_everything, ksys.sync):
        try:
            step()
        except BaseException as e:  # PID 1 must get to reboot(2) no matter what
            console(f"power-off step {step.__name__} failed: {e}")
    while True:
        try:
            ksys.reboot(ksys.LINUX_REBOOT_CMD_POWER_OFF)
        except BaseException as e:
            console(f"power-off failed: {e}")
        try:
            signal.pause()
        except BaseException:  # noqa: S110 (nothing may stop the retry)
            pass


def write_resolv_conf(path: str, dns: tuple[Any, ...], domain: str | None) -> None:
    # /etc lives in the initramfs, which is the tmpfs root: nothing here reaches a disk.
    lines = [f"search {domain}"] if domain else []
    lines += [f"nameserver {d}" for d in dns]
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def check_cmdline(image: dict[str, Any], cmdline_text: str) -> None:
    """A production image runs only with the command line built into its UKI.

    With Secure Boot off (the UKI is unsigned) systemd-stub passes the boot entry's LoadOptions
    instead of `.cmdline`, so the host could hand the kernel any command line. The builder records
    what the stub passes on from `.cmdline` as image.json `cmdline`; /proc/cmdline is the kernel's
    copy with a newline added."""
    expected = image.get("cmdline")
    if not isinstance(expected, str):
        raise BootFailure("image.json: cmdline (the UKI's built-in command line) must be a string")
    got = cmdline_text.rstrip()
    if got != expected:
        raise Refusal(
            f"the kernel command line is not the image's own: got {got!r}, "
            f"the image was built with {expected!r}"
        )


def trial_quote(backend: Any) -> int:
    """One quote through the real path (entry, provider, inblob, outblob, generation, self-check,
    removal) for fresh random report data; its size, or Refusal saying why there is none."""
    from eemini.guest.attest import REPORT_DATA_SIZE, AttestError

    try:
        return len(backend.quote(os.getrandom(REPORT_DATA_SIZE)))
    except AttestError as e:
        raise Refusal(f"TDX attestation is unavailable: {e}") from None


class Boot:
    """The boot sequence, one method per step; `run()` ends in the event loop or raises."""

    def __init__(self, paths: Paths, started: float | None = None) -> None:
        self.paths = paths
        self.timeline = Timeline(started)
        self.dhcp_client: Any = None
        self.lease: Any = None
        self.nic: Any = None

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
            ksys.set_ctrl_alt_del(False)
        except OSError:
            pass
        image = self.read_json(self.paths.image_json, "image facts")
        if image.get("attestation") == "configfs-tsm":
            check_cmdline(image, cmdline_text)
        try:
            mount_all((CONFIGFS,))
        except OSError as e:
            console(f"configfs: {e}")
        try:
            cmdline = bootconfig.parse_cmdline(cmdline_text)
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None
        # The boot token: 32 bytes from the kernel CSPRNG (getrandom(2) blocks until it is seeded).
        token = os.getrandom(32).hex()
        spec_bytes, spec = self.load_spec()
        sources = self.config_sources(image)
        allow = spec.workload.allow_env
        try:
            local = bootconfig.collect_local(cmdline, sources, console)
            static = bootconfig.apply_policy(local, allow).network
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None
        self.timeline.mark("local config")
        self.network(str(image.get("network", "dhcp")), static)
        self.timeline.mark("network")
        try:
            remote = bootconfig.collect_remote(sources, bootconfig.Fetch(), console)
            config = bootconfig.apply_policy(local + remote, allow)
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None
        for s in config.settings:
            console(f"boot config: {s.key} from {s.source} accepted ({s.digest[:23]}...)")
        self.timeline.mark("remote config")
        backend, measurer = self.backend(image, cmdline)
        events = self.event_log(spec_bytes, spec.workload.path, config.settings, measurer)
        self.timeline.mark("attestation")
        self.serve(
            spec,
            token,
            backend,
            image=image,
            env=config.env,
            events=events,
            measurer=measurer,
        )

    # --- steps ---

    @staticmethod
    def read_text(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @staticmethod
    def read_json(path: str, what: str) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except OSError as e:
            raise BootFailure(f"cannot read the {what} {path}: {e.strerror}") from None
        except ValueError as e:
            raise BootFailure(f"the {what} {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BootFailure(f"the {what} {path} is not a JSON object")
        return data

    def load_spec(self) -> tuple[bytes, Any]:
        from eemini.guest import spec as guest_spec

        try:
            with open(self.paths.spec_json, "rb") as f:
                data = f.read()
            return data, guest_spec.loads(data)
        except OSError as e:
            raise BootFailure(
                f"cannot read the enclave spec {self.paths.spec_json}: {e.strerror}"
            ) from None
        except guest_spec.SpecError as e:
            raise BootFailure(f"the enclave spec {self.paths.spec_json} is invalid: {e}") from None

    @staticmethod
    def config_sources(image: dict[str, Any]) -> tuple[Any, ...]:
        from eemini.guest import bootconfig

        names = image.get("config_sources", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BootFailure("image.json: config_sources must be a list of names")
        try:
            return bootconfig.Sources.parse(names)
        except bootconfig.ConfigError as e:
            raise BootFailure(str(e)) from None

    def network(self, mode: str, static: Any) -> None:
        from eemini.guest import dhcp, netlink

        with netlink.Netlink() as nl:
            nl.set_link(nl.link("lo").index, up=True)
            if mode == "none":
                console("network: none (this image has no network)")
                return
            if mode != "dhcp":
                raise BootFailure(f"image.json: unknown network mode {mode!r} (dhcp or none)")
            nic = netlink.wait_for_nic(nl, NIC_WAIT)
            if nic is None:
                console(
                    f"network: no network interface appeared within {NIC_WAIT:.0f} s; going on without"
                )
                return
            self.nic = nic
            nl.set_link(nic.index, up=True)
            if static is not None:
                netlink.configure(
                    nl, nic, static.address, static.gateway, protocol=netlink.RTPROT_STATIC
                )
                write_resolv_conf(self.paths.resolv_conf, static.dns, None)
                via = f" via {static.gateway}" if static.gateway else ""
                console(f"network: {nic.name} {static.address}{via} (static, from boot config)")
                return
            start = time.monotonic()
            client = dhcp.Client(nic.name, nic.mac)
            try:
                lease = client.acquire(timeout=30.0, attempts=5)
            except (dhcp.DhcpError, OSError) as e:
                client.close()
                console(f"network: {e}; going on without an address")
                return
            self.apply_lease(nl, lease)
            self.dhcp_client, self.lease = client, lease
            via = f"via {lease.router}" if lease.router else "(no router)"
            dns = ",".join(map(str, lease.dns)) or "none"
            console(
                f"network: {nic.name} {lease.address} {via} dns {dns} (DHCP from {lease.server}, "
                f"lease {lease.lease_time} s, {time.monotonic() - start:.2f} s)"
            )

    def apply_lease(self, nl: Any, lease: Any) -> None:
        from eemini.guest import netlink

        netlink.configure(
            nl, self.nic, lease.address, lease.router, mtu=lease.mtu, protocol=netlink.RTPROT_DHCP
        )
        write_resolv_conf(self.paths.resolv_conf, lease.dns, lease.domain)

    def renewed(self, lease: Any) -> None:
        from eemini.guest import netlink

        try:
            with netlink.Netlink() as nl:
                self.apply_lease(nl, lease)
        except OSError as e:
            console(f"network: applying the renewed lease failed: {e}")

    def expired(self, lease: Any) -> None:
        from eemini.guest import netlink

        try:
            with netlink.Netlink() as nl:
                nl.delete_address(self.nic.index, lease.address)
        except OSError as e:
            console(f"network: removing the expired address failed: {e}")

    def backend(self, image: dict[str, Any], cmdline: Any) -> tuple[Any, Any]:
        from eemini.guest import bootconfig

        kind = image.get("attestation")
        if kind == "simulated":
            # Both must say so: image.json (in the initramfs) and the measured cmdline marker, so a
            # simulated image can never pass for a production one.
            if not cmdline.has(*bootconfig.DEV_MARKER):
                raise BootFailure(
                    "image.json asks for simulated attestation but the cmdline lacks ee.dev=1"
                )
            from eemini.guest.simulated import SimulatedBackend

            console("attestation: simulated (local-dev image; quotes are signed by a development key)")
            from eemini.guest.rtmr import RuntimeMeasurer

            simulated = SimulatedBackend()
            # The simulated TD's RTMR3 carries the runtime log, as a Linux 6.16+ TD's does.
            return simulated, RuntimeMeasurer(
                extend=lambda digest: simulated.extend_rtmr(3, digest), via="simulated"
            )
        if kind == "configfs-tsm":
            from eemini.guest.attest import ConfigfsTsmBackend
            from eemini.guest.rtmr import RuntimeMeasurer

            backend = ConfigfsTsmBackend(self.paths.tsm_report)
            size = trial_quote(backend)
            measurer = RuntimeMeasurer()
            console(
                f"attestation: TDX through configfs-tsm (trial quote: {size} bytes); RTMR3 "
                + (
                    "extended with runtime events"
                    if measurer.enabled
                    else f"not extended ({measurer.reason})"
                )
            )
            return backend, measurer
        raise BootFailure(f"image.json: unknown attestation backend {kind!r}")

    @staticmethod
    def event_log(spec_bytes: bytes, workload_path: str, settings: Any, measurer: Any) -> Any:
        from eemini.guest.events import EventLog

        events = EventLog()
        if measurer is not None:
            events.on_append = measurer.on_append
        events.append_data("spec", "image", "spec.json", spec_bytes)
        try:
            with open(workload_path, "rb") as f:
                events.append_data("workload", "image", workload_path, f.read())
        except OSError as e:
            raise BootFailure(f"cannot read the workload {workload_path}: {e.strerror}") from None
        for s in settings:
            events.append("config", str(s.source), s.key, s.digest)
        events.seal("pid1")
        return events

    def serve(
        self,
        spec: Any,
        token: str,
        backend: Any,
        *,
        image: Any,
        env: Any,
        events: Any,
        measurer: Any = None,
    ) -> None:
        from eemini.guest.power import PowerWatch
        from eemini.guest.runtime import Runtime, RuntimeConfig

        config = RuntimeConfig(
            spec=spec,
            token=token,
            backend=backend,
            socket_path=self.paths.socket,
            image=image,
            extra_env=env,
            console_fd=2,
            ccel_path=CCEL if os.path.exists(CCEL) else None,
        )
        runtime = Runtime(config, events=events, on_poweroff=power_off, measurer=measurer)
        watch = PowerWatch(runtime.loop, runtime.shutdown, console)
        watch.install_signals()
        if self.dhcp_client is not None:
            from eemini.guest.dhcp import Renewer

            Renewer(
                self.dhcp_client,
                self.lease,
                runtime.loop,
                on_lease=self.renewed,
                on_expired=self.expired,
                log=console,
            ).start()
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

    def watch_buttons(self, watch: Any, loop: Any, retries: int) -> None:
        """The power button's input device may be registered a moment after /init starts: look
        again a few times."""
        count = watch.watch_buttons(self.paths.sys_input, self.paths.dev_input)
        if count:
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
            import traceback  # only on this path: it is not a light import

            traceback.print_exc()
        except BaseException:  # noqa: S110 (the power-off must follow)
            pass
        reason = "fatal error"
    power_off(reason)
