"""Power requests: input_event parsing, the capability bitmap, a watched device (a FIFO) and the
signals, on the real event loop."""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

from eemini.guest import power
from eemini.guest.loop import EventLoop

EV_SYN = 0


def _event(type_: int, code: int, value: int, sec: int = 5, usec: int = 7) -> bytes:
    # struct input_event on x86_64 as <linux/input.h> lays it out: 8 + 8 + 2 + 2 + 4 bytes.
    return struct.pack("<qqHHi", sec, usec, type_, code, value)


def test_input_event_layout_and_power_press() -> None:
    assert power.INPUT_EVENT.size == 24
    press, release = _event(power.EV_KEY, 116, 1), _event(power.EV_KEY, 116, 0)
    assert power.power_pressed(_event(EV_SYN, 0, 0) + press + b"\x01\x02")
    assert power.power_pressed(_event(power.EV_KEY, 0x164, 1))  # KEY_POWER2
    assert not power.power_pressed(release + _event(EV_SYN, 0, 0) + _event(power.EV_KEY, 116, 2))
    assert not power.power_pressed(_event(power.EV_KEY, 30, 1))  # KEY_A
    assert not power.power_pressed(press[:-1])  # not a whole record


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


def test_watch_power_button(tmp_path: Path) -> None:
    button = _fake_button(tmp_path, "event0", "10000000000000 0")
    _fake_button(tmp_path, "event1", "3 0 0 0 0 0")  # a keyboard without KEY_POWER
    (tmp_path / "sys" / "mouse0").mkdir()
    assert power.find_power_buttons(os.fspath(tmp_path / "sys")) == ["event0"]
    loop = EventLoop()
    requests: list[str] = []
    logs: list[str] = []
    watch = power.PowerWatch(loop, requests.append, logs.append)
    writer = -1
    try:
        assert watch.watch_buttons(os.fspath(tmp_path / "sys"), os.fspath(tmp_path / "dev")) == 1
        assert (
            watch.watch_buttons(os.fspath(tmp_path / "sys"), os.fspath(tmp_path / "dev")) == 1
        )  # no double
        assert list(watch.fds.values()) == ["event0"]
        writer = os.open(button, os.O_WRONLY)
        os.write(writer, _event(power.EV_KEY, 116, 0))
        loop.run_once()
        assert requests == []
        os.write(writer, _event(power.EV_KEY, 116, 1) + _event(EV_SYN, 0, 0))
        loop.run_once()
        assert requests == ["ACPI power button pressed"]
    finally:
        if writer >= 0:
            os.close(writer)
        for fd in watch.fds:
            os.close(fd)
        loop.close()
    assert logs == []


def test_signals_request_power_off() -> None:
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    loop = EventLoop()
    requests: list[str] = []
    try:
        power.PowerWatch(loop, requests.append, print).install_signals()
        for signum in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), signum)
            loop.run_once()
    finally:
        loop.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert requests == ["SIGTERM received", "Ctrl-Alt-Del (SIGINT)"]
