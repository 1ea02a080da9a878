"""The local launcher: boot an image in QEMU with OVMF, stream its serial console, report the outcome.

On this kind of host (no TDX) the image boots as a plain UEFI VM (`q35`, `-cpu max`, KVM only
when a probe VM really runs, else TCG) with a user-mode network, port forwards bound to
127.0.0.1 and an optional config disk. On a TDX host the same image would run as a TD: see
`tdx_command()` and `libvirt_xml()`, which print what would be run (documented in docs/run.md).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import escape, quoteattr

from eemini.log import die, log_debug, log_notice, log_warning
from eemini.proc import find_tool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
TDVF = Path("/usr/share/ovmf/OVMF.inteltdx.fd")
CONFIG_LABEL = "EECONFIG"  # what eemini.guest.configdisk looks for
DEFAULT_BUILD_DIR = Path("build/local-dev")
DISK_SUFFIXES = (".qcow2", ".raw", ".img", ".vhd")

# Console lines PID 1 prints (eemini.guest.pid1) that decide the outcome.
POWER_OFF = re.compile(r"^eemini: powering off \((?P<reason>.*)\)\s*$")
# A refusal keeps its headline in the reason: "refusing to start the workload: <why>".
BOOT_FAILED = re.compile(
    r"^eemini: (?:boot failed: |fatal: |(?=refusing to start the workload: ))(?P<reason>.*)$"
)
KERNEL_PANIC = re.compile(r"Kernel panic - not syncing: (?P<reason>.*)")


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class ConfigFormat(enum.StrEnum):
    ISO9660 = "iso9660"
    VFAT = "vfat"


@dataclass(frozen=True)
class Forward:
    host: int
    guest: int

    @classmethod
    def parse(cls, text: str) -> Forward:
        m = re.fullmatch(r"(\d{1,5}):(\d{1,5})", text)
        if not m or not all(0 < int(p) < 65536 for p in m.groups()):
            die(
                f"--forward {text!r} is not HOSTPORT:GUESTPORT (ports 1-65535)",
                hint="e.g. --forward 8080:8080",
            )
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class VmConfig:
    disk: Path
    accel: Accel = Accel.AUTO
    forwards: tuple[Forward, ...] = ()
    config: Path | None = None
    config_format: ConfigFormat = ConfigFormat.ISO9660
    memory: str = "1024"
    cpus: int = 1
    timeout: float | None = None
    log: Path | None = None
    # user-network extras (tests): the guest network and guestfwd rules "tcp:IP:PORT-tcp:HOST:PORT"
    net: str | None = None
    guestfwd: tuple[str, ...] = ()
    restrict: bool = False  # no traffic from the guest beyond the forwards (slirp restrict=on)
    qmp: Path | None = None
    echo: bool = True


# --- stop signals ---

# What ends `eemini run` early (Ctrl-C, kill, a closed terminal): QEMU is stopped and the work
# directory removed before the launcher exits, with 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POWERDOWN_WAIT = 30.0  # how long an interrupted guest with a QMP socket gets to power off


class Interrupted(Exception):
    """A stop signal reached the launcher (raised in the main thread, once per `stop_signals`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class _Stop:
    """Stop signals received, and whether one was raised as Interrupted yet. While cleanup that
    must finish runs (`deferred()`), a signal is only recorded and raised at its end."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.raised = False
        self.defer = 0

    def handler(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if not self.raised and not self.defer:
            self.raised = True
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.defer += 1
        try:
            yield
        finally:
            self.defer -= 1
        if not self.defer and self.received and not self.raised:
            self.raised = True
            raise Interrupted(self.received[0])


_stop = _Stop()


@contextlib.contextmanager
def stop_signals() -> Iterator[_Stop]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted (once) instead of ending the process where it
    stands, so the code that stops QEMU and removes its files runs; later ones are recorded."""
    global _stop
    outer, _stop = _stop, _Stop()
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, _stop.handler) for s in STOP_SIGNALS}
        yield _stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop = outer


def _qemu_child(launcher: int) -> Callable[[], None]:
    """What the QEMU child runs before exec: QEMU gets SIGTERM when the launcher dies, however it
    dies (PR_SET_PDEATHSIG; after a SIGKILL there is no other way), and at once if it is gone."""
    from eemini.guest.dev.devmode import PR_SET_PDEATHSIG, prctl

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher:
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


class GuestFailed(TimeoutError):
    """The guest panicked or PID 1 stopped the boot while we waited for something (a kind of
    TimeoutError: what was waited for will never come)."""


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    summary: str
    console: str
    elapsed: float


# --- images ---


def find_disk(target: Path | None) -> Path:
    """A disk image path, or the boot disk inside a build directory."""
    target = target or DEFAULT_BUILD_DIR
    if target.is_file():
        return target
    if not target.exists():
        hint = (
            "build one first: eemini build --profile local-dev" if target == DEFAULT_BUILD_DIR else None
        )
        die(f"{target} does not exist", hint=hint)
    manifest = target / "manifest.json"
    if manifest.is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError, TypeError):
            # manifest.json "outputs": {name: {"file": ..., "sha256": ..., "size": ...}}
            outputs = json.loads(manifest.read_text()).get("outputs", {})
            for entry in outputs.values():
                name = entry.get("file")
                if isinstance(name, str) and name.endswith(DISK_SUFFIXES) and (target / name).is_file():
                    return target / name
    disks = sorted(p for p in target.iterdir() if p.suffix in DISK_SUFFIXES and p.is_file())
    if not disks:
        die(
            f"no disk image ({', '.join(DISK_SUFFIXES)}) in {target}",
            hint="is it an `eemini build` output directory?",
        )
    return disks[0]


def image_attestation(disk: Path) -> str | None:
    """The attestation backend of the build the disk came from (manifest.json beside it, image
    facts), or None when that is not known."""
    with contextlib.suppress(ValueError, OSError, AttributeError, TypeError):
        manifest = json.loads((disk.parent / "manifest.json").read_text())
        kind = manifest.get("image", {}).get("attestation")
        return kind if isinstance(kind, str) else None
    return None


def disk_format(disk: Path) -> str:
    with disk.open("rb") as f:
        magic = f.read(4)
    return "qcow2" if magic == b"QFI\xfb" else "raw"


# --- config disks ---


def _both16(n: int) -> bytes:
    return struct.pack("<H", n) + struct.pack(">H", n)


def _both32(n: int) -> bytes:
    return struct.pack("<I", n) + struct.pack(">I", n)


def _dir_record(name: bytes, extent: int, size: int, is_dir: bool) -> bytes:
    # ECMA-119 9.1; recording date fixed at 1980-01-01 00:00 UTC so the image is reproducible.
    body = bytes([0]) + _both32(extent) + _both32(size) + bytes([80, 1, 1, 0, 0, 0, 0])
    body += bytes([2 if is_dir else 0, 0, 0]) + _both16(1) + bytes([len(name)]) + name
    rec = bytes([len(body) + 1]) + body
    return rec + (b"\0" if len(rec) % 2 else b"")


def make_iso9660(path: Path, files: dict[str, bytes], label: str = CONFIG_LABEL) -> None:
    """A minimal, deterministic ISO 9660 (ECMA-119) image: one root directory with a few files.

    Names become level-1 `NAME.EXT;1` (Linux shows them lowercased without the version).
    """
    block = 2048
    names = sorted(files)
    for name in names:
        stem, _, ext = name.upper().partition(".")
        if not re.fullmatch(r"[A-Z0-9_]{1,8}", stem) or not re.fullmatch(r"[A-Z0-9_]{0,3}", ext):
            die(f"config disk file name {name!r} does not fit ISO 9660 level 1 (8.3, A-Z 0-9 _)")
    # Layout: 0-15 system area, 16 PVD, 17 terminator, 18 L path table, 19 M path table, 20 root.
    root, data_start = 20, 21
    extents, next_block = {}, data_start
    for name in names:
        extents[name] = next_block
        next_block += max(1, -(-len(files[name]) // block))
    records = _dir_record(b"\0", root, block, True) + _dir_record(b"\1", root, block, True)
    for name in names:
        records += _dir_record(name.upper().encode() + b";1", extents[name], len(files[name]), False)
    if len(records) > block:
        die("too many files for a one-block ISO 9660 root directory")
    pvd = bytearray(block)
    pvd[0:8] = b"\x01CD001\x01\x00"
    pvd[8:40] = b" " * 32
    pvd[40:72] = label.upper().encode().ljust(32)
    pvd[80:88] = _both32(next_block)
    pvd[120:124] = _both16(1)
    pvd[124:128] = _both16(1)
    pvd[128:132] = _both16(block)
    pvd[132:140] = _both32(10)
    pvd[140:144] = struct.pack("<I", 18)
    pvd[148:152] = struct.pack(">I", 19)
    pvd[156:190] = _dir_record(b"\0", root, block, True)
    pvd[190:813] = b" " * (813 - 190)
    for off in (813, 830, 847, 864):  # dates "not specified": 16 ASCII zeros and a zero offset
        pvd[off : off + 17] = b"0" * 16 + b"\0"
    pvd[881] = 1
    term = bytearray(block)
    term[0:7] = b"\xffCD001\x01"
    l_table = bytes([1, 0]) + struct.pack("<I", root) + struct.pack("<H", 1) + b"\0\0"
    m_table = bytes([1, 0]) + struct.pack(">I", root) + struct.pack(">H", 1) + b"\0\0"
    out = bytearray(16 * block)
    out += (
        pvd
        + term
        + l_table.ljust(block, b"\0")
        + m_table.ljust(block, b"\0")
        + records.ljust(block, b"\0")
    )
    for name in names:
        data = files[name]
        out += data + b"\0" * (-len(data) % block or (block if not data else 0))
    assert len(out) == next_block * block
    path.write_bytes(bytes(out))


def make_vfat(path: Path, files: dict[str, bytes], label: str = CONFIG_LABEL) -> None:
    """A small FAT image made with mkfs.vfat and mcopy (fixed volume id)."""
    mkfs = find_tool("mkfs.vfat", "to make the config disk", "dosfstools")
    mcopy = find_tool("mcopy", "to fill the config disk", "mtools")
    from eemini.proc import run

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    run([mkfs, "-C", "-n", label, "-i", "eec0f16a", os.fspath(path), "1024"], capture=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in sorted(files.items()):
            src = Path(tmp) / name
            src.write_bytes(data)
            run([mcopy, "-i", os.fspath(path), "-m", os.fspath(src), f"::{name}"], capture=True)


def read_config_file(path: Path) -> bytes:
    """The --config file, checked with the guest's own parser so mistakes show up on the host."""
    from eemini.guest import bootconfig
    from eemini.guest.image import ConfigSource

    try:
        data = path.read_bytes()
    except OSError as e:
        die(f"cannot read --config {path}: {e.strerror}")
    try:
        bootconfig.parse_env(data, ConfigSource.CONFIG_DISK)
    except bootconfig.ConfigError as e:
        die(f"--config {path}: {e}")
    return data


# --- accelerator ---

# A boot sector that initialises the x87 FPU (the first thing OVMF's SEC phase does that a host
# whose KVM can only emulate real mode fails at, with "KVM internal error ... emulation failure"),
# then writes 0x2a to QEMU's isa-debug-exit port: QEMU then exits with (0x2a << 1) | 1 = 85. If KVM
# cannot really run a guest, we never see that status.
_PROBE_CODE = bytes([
    0x9B, 0xDB, 0xE3,  # fninit (with its wait)
    0xB0, 0x2A, 0xE6, 0xF4,  # mov al,42; out 0xf4,al
    0xF4, 0xEB, 0xFD,  # hlt; jmp $-1
])  # fmt: skip
# QEMU pauses the guest rather than exiting on a KVM internal error: stop waiting when it says so.
_KVM_FAILURE = b"KVM internal error"
PROBE_EXIT = 85
_kvm_probe: list[tuple[bool, str]] = []  # one probe per process


def probe_accel(accel: str, timeout: float = 20.0) -> tuple[bool, str]:
    """Run a tiny guest under `accel` and say whether it really executed guest code."""
    qemu = find_tool("qemu-system-x86_64", "to boot images", "qemu-system-x86")
    with tempfile.TemporaryDirectory(prefix="eemini-probe-") as tmp:
        sector = Path(tmp) / "probe.img"
        sector.write_bytes(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        argv = [
            qemu, "-accel", accel, "-cpu", "max", "-machine", "pc", "-m", "32", "-nodefaults",
            "-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={sector},format=raw,if=ide",
        ]  # fmt: skip
        log_debug("+ " + shlex.join(argv))
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        err = b""
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + timeout
            while proc.poll() is None and _KVM_FAILURE not in err:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, f"the probe guest did not finish within {timeout:.0f} s"
                if select.select([proc.stderr], [], [], min(left, 0.2))[0]:
                    err += os.read(proc.stderr.fileno(), 65536)
            if _KVM_FAILURE in err:
                return False, "KVM cannot run the guest (KVM internal error: emulation failure)"
            err += proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    if proc.returncode == PROBE_EXIT:
        return True, "ok"
    lines = err.decode(errors="replace").strip().splitlines()
    return False, lines[-1] if lines else f"qemu exited with status {proc.returncode}"


def kvm_works() -> tuple[bool, str]:
    """Whether KVM really runs guests here (an openable /dev/kvm is not enough on every host)."""
    if not _kvm_probe:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            _kvm_probe.append((False, "/dev/kvm is not available"))
        else:
            _kvm_probe.append(probe_accel("kvm", timeout=10.0))
    return _kvm_probe[0]


def choose_accel(accel: Accel) -> str:
    if accel is Accel.TCG:
        return "tcg"
    ok, why = kvm_works()
    if ok:
        return "kvm"
    if accel is Accel.KVM:
        die(
            f"KVM does not work on this host: {why}",
            hint="use --accel tcg (slower, but it works everywhere)",
        )
    log_notice(f"KVM does not work here ({why}); using TCG emulation, which is slower")
    return "tcg"


# --- command lines ---


def netdev(cfg: VmConfig) -> str:
    parts = ["user", "id=net0"]
    if cfg.net:
        parts.append(f"net={cfg.net}")
    if cfg.restrict:
        parts.append("restrict=on")
    parts += [f"hostfwd=tcp:127.0.0.1:{f.host}-:{f.guest}" for f in cfg.forwards]
    parts += [f"guestfwd={g}" for g in cfg.guestfwd]
    return ",".join(parts)


def qemu_command(cfg: VmConfig, accel: str, vars_copy: Path, config_disk: Path | None) -> list[str]:
    qemu = find_tool("qemu-system-x86_64", "to boot images", "qemu-system-x86")
    disk = cfg.disk.resolve()  # QEMU runs in the per-run work directory
    argv = [
        qemu, "-machine", f"q35,accel={accel},smm=off", "-cpu", "max",
        "-m", cfg.memory, "-smp", str(cfg.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none",
        "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"if=none,id=disk0,format={disk_format(disk)},snapshot=on,file={disk}",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        "-netdev", netdev(cfg), "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    if config_disk is not None:
        argv += ["-drive", f"if=none,id=cfg0,format=raw,readonly=on,file={config_disk}"]
        argv += ["-device", "virtio-blk-pci,drive=cfg0"]
    if cfg.qmp is not None:
        argv += ["-qmp", f"unix:{cfg.qmp},server=on,wait=off"]
    return argv


def tdx_command(cfg: VmConfig, tdvf: Path = TDVF) -> list[str]:
    """What a TDX host runs: a TD with TDVF, a private memory backend, quotes through the QGS.

    Follows QEMU's TDX documentation (docs/system/i386/tdx.rst, QEMU >= 10.1): KVM with
    `kernel-irqchip=split`, a `tdx-guest` object named by `confidential-guest-support`, TDVF as
    `-bios` (no separate variable store), and `quote-generation-socket` pointing at the host's
    Quote Generation Service (vsock CID 2 port 4050 by convention).
    """
    tdx_object = {
        "qom-type": "tdx-guest",
        "id": "tdx0",
        "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"},
    }
    mem = cfg.memory if cfg.memory[-1:].isalpha() else f"{cfg.memory}M"
    return [
        "qemu-system-x86_64",
        "-accel", "kvm", "-cpu", "host", "-smp", str(cfg.cpus), "-m", mem,
        "-object", json.dumps(tdx_object, separators=(",", ":")),
        "-object", f"memory-backend-ram,id=ram0,size={mem}",
        "-machine",
        "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0,hpet=off",
        "-bios", os.fspath(tdvf),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
        "-drive",
        f"if=none,id=disk0,format={disk_format(cfg.disk)},snapshot=on,file={cfg.disk.resolve()}",
        "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        "-netdev", netdev(cfg), "-device", "virtio-net-pci,netdev=net0,romfile=",
    ]  # fmt: skip


def libvirt_xml(
    name: str, base: Path, overlay: Path, *, memory_mib: int = 2048, cpus: int = 2, tdvf: Path = TDVF
) -> str:
    """A libvirt domain for the persistent-base workflow: the measured image stays a read-only base,
    the domain writes to a qcow2 overlay on top of it; launchSecurity makes it a TD (libvirt >= 11)."""
    b, o, fw = (quoteattr(os.fspath(p.resolve() if p.exists() else p)) for p in (base, overlay, tdvf))
    return f"""<domain type='kvm'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader type='rom' readonly='yes' stateless='yes'>{escape(os.fspath(tdvf))}</loader>
  </os>
  <features>
    <acpi/>
    <apic/>
    <ioapic driver='qemu'/>
  </features>
  <cpu mode='host-passthrough'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <memoryBacking>
    <source type='anonymous'/>
    <access mode='private'/>
  </memoryBacking>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={o}/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file={b}/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>
  <launchSecurity type='tdx'>
    <policy>0x10000000</policy>
    <quoteGenerationService/>
  </launchSecurity>
</domain>
<!-- firmware: {fw}; overlay: qemu-img create -f qcow2 -F qcow2 -b {b} {o} -->
"""


# --- running ---


@dataclass
class Vm:
    """A running VM: its console is collected (and echoed), its QMP socket is usable."""

    cfg: VmConfig
    proc: subprocess.Popen[bytes]
    workdir: Path
    started: float
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None
    log_file: IO[bytes] | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        out = sys.stdout.buffer if self.cfg.echo else None
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if out is not None:
                with contextlib.suppress(OSError, ValueError):
                    out.write(chunk)
                    out.flush()
            if self.log_file is not None:
                self.log_file.write(chunk)
                self.log_file.flush()
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if complete:
                with self.cond:
                    self.lines += [c.decode(errors="replace").rstrip("\r") for c in complete]
                    self.cond.notify_all()
        with self.cond:
            if pending:
                self.lines.append(pending.decode(errors="replace").rstrip("\r"))
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """Block until a console line matches `pattern`; raise TimeoutError (with the tail) if it
        does not appear in time, GuestFailed at once if the kernel panics or the boot fails."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self.cond:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    m = rx.search(line)
                    if m:
                        return m
                    # Nothing follows a panic or a refused boot: say so now, not at the timeout.
                    if KERNEL_PANIC.search(line) or BOOT_FAILED.match(line):
                        raise GuestFailed(
                            f"the guest failed before {pattern!r} appeared:\n" + self.tail()
                        )
                    index += 1
                if self.proc.poll() is not None and not (self.reader and self.reader.is_alive()):
                    raise TimeoutError(f"QEMU exited before {pattern!r} appeared:\n" + self.tail())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{pattern!r} did not appear within {timeout} s:\n" + self.tail())
                self.cond.wait(min(remaining, 0.5))

    def tail(self, n: int = 30) -> str:
        with self.cond:
            return "\n".join(self.lines[-n:])

    def console(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.cfg.qmp is None:
            raise RuntimeError("this VM was started without a QMP socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.fspath(self.cfg.qmp))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in (
                {"execute": "qmp_capabilities"},
                {"execute": command, "arguments": arguments or {}},
            ):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    answer: dict[str, Any] = json.loads(f.readline())
                    if "return" in answer or "error" in answer:
                        break
            return answer

    def wait(self, timeout: float | None) -> Outcome:
        """Wait for QEMU to exit and judge the outcome from its status and the console."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            elapsed = time.monotonic() - self.started
            return Outcome(
                124,
                f"the guest did not power off within {timeout:.0f} s; QEMU was stopped",
                self.console(),
                elapsed,
            )
        if self.reader is not None:
            self.reader.join(10)
        elapsed = time.monotonic() - self.started
        return judge(code, self.console(), elapsed)

    def kill(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after 5 s); a stop signal meanwhile waits for it."""
        with _stop.deferred():
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.reader is not None:
                self.reader.join(10)

    def close(self) -> None:
        with _stop.deferred():
            self.kill()
            if self.log_file is not None:
                self.log_file.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def interrupted(self, stop: Interrupted) -> Outcome:
        """Stop the guest after a stop signal: with a QMP socket it gets the ACPI power button
        and POWERDOWN_WAIT s to power off (another stop signal ends that wait), else QEMU is
        stopped at once. The outcome says so, with exit status 128 + the signal's number."""
        code, head = 128 + stop.signum, f"interrupted by {stop.name}"
        with _stop.deferred():
            if self.proc.poll() is None and self.cfg.qmp is not None:
                log_warning(
                    f"{head}: asking the guest to power off (ACPI power button); "
                    "interrupt again to stop QEMU at once"
                )
                deadline = time.monotonic() + POWERDOWN_WAIT
                try:
                    self.qmp("system_powerdown")
                except (OSError, ValueError) as e:
                    head += f"; the power button could not be pressed (QMP: {e})"
                    deadline = 0.0
                # The first stop signal brought us here; any later one ends the wait.
                while self.proc.poll() is None and len(_stop.received) <= 1:
                    if time.monotonic() >= deadline:
                        break
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(0.2)
                if self.proc.poll() is None and len(_stop.received) <= 1 and deadline:
                    head += f"; the guest did not power off within {POWERDOWN_WAIT:.0f} s"
            if self.proc.poll() is None:
                self.kill()
                return Outcome(code, f"{head}; QEMU was stopped", self.console(), self.elapsed())
            if self.reader is not None:
                self.reader.join(10)
        lines = self.console().splitlines()
        off = next((m for line in reversed(lines) if (m := POWER_OFF.match(line))), None)
        if off is not None and self.proc.returncode == 0:
            summary = f"{head}; the guest powered off cleanly ({off.group('reason')})"
        else:
            summary = f"{head}; QEMU exited with status {self.proc.returncode}"
        return Outcome(code, summary, self.console(), self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def judge(qemu_status: int, console: str, elapsed: float) -> Outcome:
    lines = console.splitlines()
    panic = next((m for line in lines if (m := KERNEL_PANIC.search(line))), None)
    if panic:
        return Outcome(1, f"the guest kernel panicked: {panic.group('reason')}", console, elapsed)
    if qemu_status != 0:
        return Outcome(1, f"QEMU failed with exit status {qemu_status}", console, elapsed)
    failed = next((m for line in lines if (m := BOOT_FAILED.match(line))), None)
    off = next((m for line in reversed(lines) if (m := POWER_OFF.match(line))), None)
    if failed:
        return Outcome(1, f"the guest stopped: {failed.group('reason')}", console, elapsed)
    if off:
        return Outcome(0, f"the guest powered off cleanly ({off.group('reason')})", console, elapsed)
    return Outcome(1, "QEMU exited but the guest never said it was powering off", console, elapsed)


def start(cfg: VmConfig) -> Vm:
    """Prepare the per-run files (OVMF variables copy, config disk) and start QEMU."""
    for path, what in ((OVMF_CODE, "OVMF firmware"), (OVMF_VARS, "OVMF variable store")):
        if not path.exists():
            die(f"{what} {path} is missing", hint="install the Debian package 'ovmf'")
    kind = image_attestation(cfg.disk)
    if kind in ("configfs-tsm", "azure-tdx-vtpm"):
        # Allowed (it is how the refusal itself is tested), but never what the user wants here.
        where = "TDX" if kind == "configfs-tsm" else "Azure's vTPM and metadata service"
        log_warning(
            f"{cfg.disk} is a production image ({kind} attestation): booted without {where}, its "
            "PID 1 refuses to start the workload and powers off; use a local-dev image here"
        )
    accel = choose_accel(cfg.accel)
    workdir = Path(tempfile.mkdtemp(prefix="eemini-run-"))
    vm: Vm | None = None
    try:
        vars_copy = workdir / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        config_disk = None
        if cfg.config is not None:
            files = {"agent.env": read_config_file(cfg.config)}
            config_disk = workdir / "config.img"
            if cfg.config_format is ConfigFormat.VFAT:
                make_vfat(config_disk, files)
            else:
                make_iso9660(config_disk, files)
        argv = qemu_command(cfg, accel, vars_copy, config_disk)
        log_debug("+ " + shlex.join(argv))
        with _stop.deferred():  # no QEMU without its Vm, which stops it
            # Its own process group: a terminal's Ctrl-C reaches the launcher only, which then
            # decides how QEMU stops.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                cwd=workdir,
                process_group=0,
                # Safe with the reader threads: the child only calls prctl, getppid and kill
                # (everything is imported before the fork) and then execs.
                preexec_fn=_qemu_child(os.getpid()),  # noqa: PLW1509
            )
            vm = Vm(cfg, proc, workdir, time.monotonic())
        if cfg.log is not None:
            vm.log_file = cfg.log.open("wb")
        vm.reader = threading.Thread(target=vm._pump, daemon=True)
        vm.reader.start()
        return vm
    except BaseException:
        if vm is not None:
            vm.close()
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


@contextlib.contextmanager
def running(cfg: VmConfig) -> Iterator[Vm]:
    vm = start(cfg)
    try:
        yield vm
    finally:
        vm.close()


def boot(cfg: VmConfig) -> Outcome:
    """Start the VM and wait for it to end (or `cfg.timeout`). A stop signal at any point stops
    QEMU, removes the work directory and gives an Outcome that says so (exit 128 + signal)."""
    started = time.monotonic()
    with stop_signals():
        vm: Vm | None = None
        try:
            vm = start(cfg)
            return vm.wait(cfg.timeout)
        except Interrupted as stop:
            if vm is None:
                summary = f"{stop} before QEMU was running; nothing was left behind"
                return Outcome(128 + stop.signum, summary, "", time.monotonic() - started)
            return vm.interrupted(stop)
        finally:
            if vm is not None:
                vm.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def print_command(argv: Sequence[str]) -> None:
    print(shlex.join(argv))
