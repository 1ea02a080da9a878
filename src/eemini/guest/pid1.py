"""PID 1 of an EasyEnclave Mini image: mount, announce, and (for now) power off cleanly.

The kernel runs `/init`, which calls `main()`. PID 1 must never return or raise: the kernel
panics when init exits, so every path ends in `reboot(2)` with a clean power-off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from typing import NoReturn

from eemini.guest import sys as ksys

# (source, target, fstype, flags, options): the API filesystems, in the order they are needed.
EARLY_MOUNTS: tuple[tuple[str, str, str, int, str | None], ...] = (
    ("proc", "/proc", "proc", ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", ksys.MS_NOSUID, "mode=0755"),
)


def console(text: str) -> None:
    """One line on the console, prefixed so the host can tell PID 1 from the kernel and workload."""
    try:
        os.write(2, f"eemini: {text}\n".encode(errors="replace"))
    except OSError:
        pass


def mount_api_filesystems() -> None:
    for source, target, fstype, flags, options in EARLY_MOUNTS:
        os.makedirs(target, exist_ok=True)
        if os.path.ismount(target) and target != "/":
            continue
        ksys.mount(source, target, fstype, flags, options)


def open_console() -> None:
    """Make fds 0-2 the kernel console when the kernel could not open one (no /dev/console in cpio)."""
    try:
        os.fstat(2)
        return
    except OSError:
        pass
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115


def uptime() -> float:
    with open("/proc/uptime", "rb") as f:
        return float(f.read().split()[0])


def shutdown(reason: str) -> NoReturn:
    """Sync and power off. Never returns; if even reboot(2) fails, sleep rather than exit (panic)."""
    console(f"powering off ({reason})")
    while True:
        try:
            ksys.power_off()
        except BaseException as e:  # PID 1 must not die
            console(f"power-off failed: {e}")
        with contextlib.suppress(BaseException):
            signal.pause()


def boot() -> str:
    mount_api_filesystems()
    open_console()
    console(f"PID 1 starting (kernel {os.uname().release}, uptime {uptime():.2f} s)")
    return "the runtime is not part of this image yet"


def main() -> NoReturn:
    reason = "boot finished"
    try:
        reason = boot()
    except BaseException as e:  # PID 1 logs everything and powers off
        console(f"fatal: {type(e).__name__}: {e}")
        with contextlib.suppress(BaseException):
            traceback.print_exc()
        reason = "fatal error"
    shutdown(reason)
