"""Power requests: SIGTERM, Ctrl-Alt-Del (SIGINT) and the ACPI power button.

The power button reaches us as a key press on an evdev input device (the kernel's `button`
driver turns the ACPI power-button event into KEY_POWER on "Power Button" input devices), so
there is no acpid: PID 1 reads `struct input_event` records from /dev/input/event* itself.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from eemini.guest.loop import EventLoop

# <linux/input-event-codes.h>
EV_KEY = 0x01
KEY_POWER = 116
KEY_POWER2 = 0x164
KEY_PRESS = 1  # an input_event value: 0 is a release, 2 a repeat
# <linux/input.h>: struct input_event { struct timeval time; __u16 type; __u16 code; __s32 value; }
# with the native long for the timeval fields (24 bytes on x86_64).
INPUT_EVENT = struct.Struct("@llHHi")


def power_pressed(data: bytes) -> bool:
    """Whether the input_event records in `data` press a power key (evdev never splits a record,
    so a trailing partial one is ignored)."""
    whole = data[: len(data) - len(data) % INPUT_EVENT.size]
    return any(
        kind == EV_KEY and code in (KEY_POWER, KEY_POWER2) and value == KEY_PRESS
        for _sec, _usec, kind, code, value in INPUT_EVENT.iter_unpack(whole)
    )


def has_key(capabilities: str, code: int) -> bool:
    """Test a bit in a sysfs capabilities bitmap: hex longs, most significant word first, each
    written without its leading zeros."""
    digits = struct.calcsize("@l") * 2  # hex digits of a long
    bitmap = int("".join(word.zfill(digits) for word in capabilities.split()) or "0", 16)
    return bool(bitmap >> code & 1)


def find_power_buttons(sys_input: str) -> list[str]:
    """Names (eventN) of the input devices that can send KEY_POWER."""
    found = []
    try:
        names = sorted(n for n in os.listdir(sys_input) if n.startswith("event"))
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(sys_input, name, "device", "capabilities", "key")) as f:
                caps = f.read()
        except OSError:
            continue
        if has_key(caps, KEY_POWER):
            found.append(name)
    return found


class PowerWatch:
    """Calls `request(reason)` on SIGTERM, SIGINT (Ctrl-Alt-Del) or a power-button press."""

    def __init__(
        self, loop: EventLoop, request: Callable[[str], None], log: Callable[[str], None]
    ) -> None:
        self.loop = loop
        self.request = request
        self.log = log
        self.fds: dict[int, str] = {}

    def install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, lambda: self.request("SIGTERM received"))
        self.loop.add_signal_handler(signal.SIGINT, lambda: self.request("Ctrl-Alt-Del (SIGINT)"))

    def watch_buttons(self, sys_input: str, dev_input: str) -> int:
        """Watch every power-button device not watched yet; returns how many are watched."""
        watched = set(self.fds.values())
        for name in find_power_buttons(sys_input):
            if name in watched:
                continue
            try:
                fd = os.open(os.path.join(dev_input, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                self.log(f"cannot open power button {name}: {e.strerror}")
                continue
            self.fds[fd] = name
            self.loop.add_reader(fd, lambda fd=fd: self._readable(fd))  # type: ignore[misc]
        return len(self.fds)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, INPUT_EVENT.size * 64)
        except BlockingIOError:
            return
        except OSError as e:
            self.log(f"power button {self.fds.get(fd)} failed: {e.strerror}; no longer watched")
            self.loop.remove_reader(fd)
            os.close(fd)
            self.fds.pop(fd, None)
            return
        if power_pressed(data):
            self.request("ACPI power button pressed")
