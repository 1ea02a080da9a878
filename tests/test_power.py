"""Power requests: input_event parsing, the capability bitmap, and a watched device (a FIFO)."""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

from eemini.guest import power

EV_SYN = 0


def _event(type_: int, code: int, value: int, sec: int = 5, usec: int = 7) -> bytes:
    # struct input_event on x86_64 as <linux/input.h> lays it out: 8 + 8 + 2 + 2 + 4 bytes.
    return struct.pack("<qqHHi", sec, usec, type_, code, value)


def test_input_event_layout_and_parse() -> None:
    assert power.INPUT_EVENT.size == 24
    data = (
        _event(power.EV_KEY, 116, 1) + _event(EV_SYN, 0, 0) + _event(power.EV_KEY, 116, 0) + b"\x01\x02"
    )
    events = power.parse_events(data)
    assert events == [
        power.InputEvent(5, 7, power.EV_KEY, 116, 1),
        power.InputEvent(5, 7, EV_SYN, 0, 0),
        power.InputEvent(5, 7, power.EV_KEY, 116, 0),
    ]
    assert [e.power_press for e in events] == [True, False, False]
    assert not power.InputEvent(0, 0, power.EV_KEY, 30, 1).power_press  # KEY_A


def test_capability_bitmap() -> None:
    # What the ACPI power button (LNXPWRBN) shows in sysfs on x86_64.
    assert power.has_key("10000000000000 0", 116)
    assert not power.has_key("10000000000000 0", 115)
    assert not power.has_key("0", 116)
    assert power.has_key("1", 0)


def _fake_button(tmp: Path, name: str, caps: str) -> Path:
    d = tmp / "sys" / name / "device" / "capabilities"
    d.mkdir(parents=True)
    (d / "key").write_text(caps + "\n")
    dev = tmp / "dev" / name
    dev.parent.mkdir(exist_ok=True)
    os.mkfifo(dev)
    return dev


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.signals: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        del self.readers[fd]

    def add_signal_handler(self, signum: int, callback: Callable[[], None]) -> None:
        self.signals[signum] = callback


def test_watch_power_button(tmp_path: Path) -> None:
    button = _fake_button(tmp_path, "event0", "10000000000000 0")
    _fake_button(tmp_path, "event1", "3 0 0 0 0 0")  # a keyboard without KEY_POWER
    (tmp_path / "sys" / "mouse0").mkdir()
    assert power.find_power_buttons(os.fspath(tmp_path / "sys")) == ["event0"]
    loop = FakeLoop()
    requests: list[str] = []
    logs: list[str] = []
    watch = power.PowerWatch(loop, requests.append, logs.append)
    assert watch.watch_buttons(os.fspath(tmp_path / "sys"), os.fspath(tmp_path / "dev")) == 1
    assert (
        watch.watch_buttons(os.fspath(tmp_path / "sys"), os.fspath(tmp_path / "dev")) == 1
    )  # no double
    writer = os.open(button, os.O_WRONLY)
    try:
        (fd,) = loop.readers
        os.write(writer, _event(power.EV_KEY, 116, 0))
        loop.readers[fd]()
        assert requests == []
        os.write(writer, _event(power.EV_KEY, 116, 1) + _event(EV_SYN, 0, 0))
        loop.readers[fd]()
        assert requests == ["ACPI power button pressed"]
    finally:
        os.close(writer)
    watch.close()
    assert loop.readers == {}
    assert logs == []


def test_signals_request_power_off() -> None:
    loop = FakeLoop()
    requests: list[str] = []
    power.PowerWatch(loop, requests.append, print).install_signals()
    loop.signals[signal.SIGTERM]()
    loop.signals[signal.SIGINT]()
    assert requests == ["SIGTERM received", "Ctrl-Alt-Del (SIGINT)"]
