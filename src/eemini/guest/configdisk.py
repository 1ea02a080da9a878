"""The config disk: `agent.env` on an iso9660 or vfat filesystem labelled EECONFIG.

The disk is the host's: it is found by its label, mounted read-only, nosuid, nodev, noexec and
nosymfollow, and only a regular file named agent.env (any letter case) is read from it, without
following a symbolic link or blocking on a FIFO. PID 1 imports this module, and the builder ships
it, only for an image whose profile names the config disk as a source (eemini.build.pyruntime).
"""

from __future__ import annotations

import os
import stat
import time

from eemini.guest import linux
from eemini.guest.bootconfig import CONFIG_FILE, MAX_FILE, ConfigError, Setting, parse_env
from eemini.guest.image import ConfigSource

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CONFIG_LABEL = "EECONFIG"


def detect_label(dev: str) -> tuple[str, str] | None:
    """(fstype, volume label) for an iso9660 or FAT filesystem at the start of `dev`, else None."""
    try:
        with open(dev, "rb") as f:
            boot = f.read(512)
            f.seek(0x8000)
            pvd = f.read(2048)
    except OSError:
        return None
    # ECMA-119 8.4: the primary volume descriptor at sector 16: type 1, "CD001", volume id at 40.
    if len(pvd) >= 72 and pvd[0] == 1 and pvd[1:6] == b"CD001":
        return "iso9660", pvd[40:72].decode("ascii", "replace").strip()
    # FAT boot sector: 0x55AA signature; the label sits at 0x2B (FAT12/16) or 0x47 (FAT32),
    # after an extended boot signature 0x29 at 0x26 / 0x42.
    if len(boot) == 512 and boot[510:512] == b"\x55\xaa":
        if boot[0x42] == 0x29 and boot[0x52:0x57] == b"FAT32":
            return "vfat", boot[0x47:0x52].decode("ascii", "replace").strip()
        if boot[0x26] == 0x29 and boot[0x36:0x39] == b"FAT":
            return "vfat", boot[0x2B:0x36].decode("ascii", "replace").strip()
    return None


def block_devices(sys_block: str = "/sys/class/block") -> list[str]:
    try:
        return sorted(os.listdir(sys_block))
    except OSError:
        return []


# virtio-blk PCI functions: vendor 0x1af4, device 0x1001 (transitional) or 0x1042 (modern),
# from the virtio spec 1.2 section 4.1.2.
VIRTIO_VENDOR = "0x1af4"
VIRTIO_BLK_DEVICES = ("0x1001", "0x1042")


def expected_disks(sys_pci: str = "/sys/bus/pci/devices") -> int:
    """How many virtio-blk disks the machine has (each becomes one whole-disk block device)."""
    count = 0
    try:
        names = os.listdir(sys_pci)
    except OSError:
        return 0
    for name in names:
        try:
            with open(os.path.join(sys_pci, name, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(sys_pci, name, "device")) as f:
                device = f.read().strip()
        except OSError:
            continue
        if vendor == VIRTIO_VENDOR and device in VIRTIO_BLK_DEVICES:
            count += 1
    return count


def whole_disks(sys_block: str) -> list[str]:
    return [
        n
        for n in block_devices(sys_block)
        if not n.startswith(("loop", "ram", "zram", "dm-"))
        and not os.path.exists(os.path.join(sys_block, n, "partition"))
    ]


def find_config_disk(
    wait: float,
    dev_dir: str = "/dev",
    sys_block: str = "/sys/class/block",
    sys_pci: str = "/sys/bus/pci/devices",
) -> tuple[str, str] | None:
    """The device holding a filesystem labelled EECONFIG.

    Block drivers probe asynchronously after their module loads: wait (at most `wait` s) until
    every virtio-blk disk on the PCI bus has its block device, then look once. A machine without
    virtio disks is looked at once, without waiting.
    """
    deadline = time.monotonic() + wait
    expected = expected_disks(sys_pci)
    while len(whole_disks(sys_block)) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    for name in whole_disks(sys_block):
        path = os.path.join(dev_dir, name)
        found = detect_label(path)
        if found is not None and found[1].upper() == CONFIG_LABEL:
            return path, found[0]
    return None


def boot_config(log: Callable[[str], None]) -> list[Setting]:
    """The settings in agent.env on the config disk; none when there is no config disk."""
    data = read_config_disk()
    if data is None:
        log("boot config: no config disk")
        return []
    return parse_env(data, ConfigSource.CONFIG_DISK)


def read_config_disk(
    wait: float = 2.0,
    mountpoint: str = "/run/eemini/config",
) -> bytes | None:
    """agent.env from the config disk, or None when there is no config disk.

    The mount is read-only, nosuid, nodev, noexec and nosymfollow: the disk is the host's, and a
    symbolic link on it (iso9660 Rock Ridge has them) must not reach the guest's own files.
    """
    found = find_config_disk(wait)
    if found is None:
        return None
    dev, fstype = found
    os.makedirs(mountpoint, exist_ok=True)
    flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_NOSYMFOLLOW
    # The character sets the kernel has built in (kernel/fragment.config: NLS_UTF8,
    # NLS_CODEPAGE_437), named rather than left to the kernel's defaults. FAT has
    # no symlinks, FIFOs or devices; on iso9660 only Rock Ridge brings them, and `norock` leaves
    # its extensions unread (agent.env is an 8.3 name, which plain ISO 9660 and Joliet carry).
    options = {"vfat": "iocharset=utf8,codepage=437", "iso9660": "norock"}.get(fstype)
    try:
        linux.mount(dev, mountpoint, fstype, flags, options)
    except OSError as e:
        raise ConfigError(
            f"the config disk {dev} ({fstype}) cannot be mounted: {os.strerror(e.errno or 0)}"
        ) from None
    try:
        return read_env_file(mountpoint, dev)
    finally:
        linux.umount(mountpoint, linux.MNT_DETACH)


_FILE_TYPES = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_type(mode: int) -> str:
    return next((name for test, name in _FILE_TYPES if test(mode)), f"of type {mode >> 12:o}")


def read_env_file(directory: str, dev: str) -> bytes:
    """`agent.env` (any letter case) in the mounted config disk: a regular file, or ConfigError.

    Nothing else is opened: not a symbolic link (O_NOFOLLOW; the mount does not follow them
    either), a FIFO (it would block the boot), a device or a directory. The open is
    non-blocking, and the file is checked again once open."""
    names = {n.lower(): n for n in os.listdir(directory)}
    if CONFIG_FILE not in names:
        raise ConfigError(f"the config disk {dev} has no {CONFIG_FILE}")
    name = names[CONFIG_FILE]
    path = os.path.join(directory, name)
    refused = f"the config disk {dev}: {name} is {{}}, not a regular file"
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(refused.format(_file_type(mode)))
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(
            f"the config disk {dev}: {name} cannot be opened: {os.strerror(e.errno or 0)}"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(refused.format(_file_type(mode)))
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE:
            chunk = os.read(fd, MAX_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
