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

from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

# <linux/input-event-codes.h>
EV_KEY = 0x01
KEY_POWER = 116
KEY_POWER2 = 0x164
# <linux/input.h>: struct input_event { struct timeval time; __u16 type; __u16 code; __s32 value; }
# with the native long for the timeval fields (24 bytes on x86_64).
INPUT_EVENT = struct.Struct("@llHHi")
KEY_RELEASE, KEY_PRESS, KEY_REPEAT = 0, 1, 2


@record
class InputEvent:
    sec: int
    usec: int
    type: int
    code: int
    value: int

    @property
    def power_press(self) -> bool:
        return self.type == EV_KEY and self.code in (KEY_POWER, KEY_POWER2) and self.value == KEY_PRESS


def parse_events(data: bytes) -> list[InputEvent]:
    """Whole input_event records; a trailing partial record is ignored (evdev never splits them)."""
    size = INPUT_EVENT.size
    return [
        InputEvent(*INPUT_EVENT.unpack_from(data, off)) for off in range(0, len(data) - size + 1, size)
    ]


def has_key(capabilities: str, code: int, long_bits: int = struct.calcsize("@l") * 8) -> bool:
    """Test a bit in a sysfs capabilities bitmap: hex longs, most significant word first."""
    words = capabilities.split()
    index = code // long_bits
    if index >= len(words):
        return False
    word = int(words[len(words) - 1 - index], 16)
    return bool(word >> (code % long_bits) & 1)


def find_power_buttons(sys_input: str = "/sys/class/input") -> list[str]:
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


if TYPE_CHECKING:

    class Loop(Protocol):
        def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

        def remove_reader(self, fd: int) -> None: ...

        def add_signal_handler(self, signum: int, callback: Callable[[], None]) -> None: ...


class PowerWatch:
    """Calls `request(reason)` on SIGTERM, SIGINT (Ctrl-Alt-Del) or a power-button press."""

    def __init__(self, loop: Loop, request: Callable[[str], None], log: Callable[[str], None]) -> None:
        self.loop = loop
        self.request = request
        self.log = log
        self.fds: dict[int, str] = {}

    def install_signals(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, lambda: self.request("SIGTERM received"))
        self.loop.add_signal_handler(signal.SIGINT, lambda: self.request("Ctrl-Alt-Del (SIGINT)"))

    def watch_buttons(self, sys_input: str = "/sys/class/input", dev_input: str = "/dev/input") -> int:
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
        if any(ev.power_press for ev in parse_events(data)):
            self.request("ACPI power button pressed")

    def close(self) -> None:
        for fd in list(self.fds):
            self.loop.remove_reader(fd)
            os.close(fd)
        self.fds.clear()
