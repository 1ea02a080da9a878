"""The PID 1 syscall layer: the few Linux calls the standard library does not wrap.

Standard library and ctypes only, and please keep it that way: this module is part of every
image and runs before anything else is mounted. Constants are copied from the kernel's UAPI
headers (named next to each block); the one libc handle declares argtypes/restype for every
function it uses, and every failure goes through `oserror()`.
"""

from __future__ import annotations

import ctypes
import os

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOSYMFOLLOW = 256  # Linux 5.10+: symlinks on the mount are not followed (readlink still works)

# <linux/fs.h> (umount2 flags)
MNT_DETACH = 2

# <linux/reboot.h>: the command values glibc's reboot() passes on with the two magic numbers.
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_CAD_OFF = 0x00000000

_libc = ctypes.CDLL(None, use_errno=True)

_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int

_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int

_reboot = _libc.reboot
_reboot.argtypes = [ctypes.c_int]
_reboot.restype = ctypes.c_int


def oserror(call: str, filename: str | None = None) -> OSError:
    """The OSError for the current errno, named after the call that failed."""
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}", filename)


def _bytes(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    options: str | None = None,
) -> None:
    if _mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(options)) != 0:
        raise oserror("mount", os.fspath(target))


def umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    if _umount2(_bytes(target), flags) != 0:
        raise oserror("umount", os.fspath(target))


def reboot(cmd: int) -> None:
    """reboot(2). For POWER_OFF it does not return when it works."""
    if _reboot(ctypes.c_int(ctypes.c_uint32(cmd).value).value) != 0:
        raise oserror("reboot")
