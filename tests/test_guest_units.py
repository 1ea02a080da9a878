"""Small guest pieces on their own: the event loop, the log ring buffer, the event log."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import pytest

from eemini.guest.attest import AttestError
from eemini.guest.bootconfig import Setting
from eemini.guest.events import Event, boot_log
from eemini.guest.logbuf import LineSplitter, LogBuffer
from eemini.guest.loop import EventLoop
from eemini.guest.runtime import AttestWorker
from eemini.guest.server import RequestError
from eemini.guest.supervisor import Console


def test_loop_timers_order_and_cancel() -> None:
    loop = EventLoop()
    seen: list[str] = []

    def last() -> None:
        seen.append("late")
        loop.stop()

    loop.call_later(0.03, last)
    cancelled = loop.call_later(0.01, lambda: seen.append("cancelled"))
    loop.call_later(0.02, lambda: seen.append("early"))
    loop.call_soon(lambda: seen.append("soon"))
    cancelled.cancel()
    cancelled.cancel()
    loop.run()
    loop.close()
    assert seen == ["soon", "early", "late"]


def test_loop_readers_threads_and_signals() -> None:
    loop = EventLoop()
    r, w = os.pipe()
    got: list[object] = []

    def on_read() -> None:
        got.append(os.read(r, 100))
        loop.remove_reader(r)
        threading.Thread(target=lambda: loop.call_soon_threadsafe(lambda: got.append("thread"))).start()

    def on_signal() -> None:
        got.append("SIGUSR1")
        loop.stop()

    loop.add_reader(r, on_read)
    loop.add_signal_handler(signal.SIGUSR1, on_signal)
    loop.call_later(0.05, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    os.write(w, b"ping")
    loop.run()
    loop.close()
    os.close(r)
    os.close(w)
    assert got == [b"ping", "thread", "SIGUSR1"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_loop_survives_a_failing_callback(capsys: pytest.CaptureFixture[str]) -> None:
    loop = EventLoop()

    def boom() -> None:
        raise ZeroDivisionError("boom")

    loop.call_soon(boom)
    loop.call_later(0.01, loop.stop)
    loop.run()
    loop.close()
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_loop_readers_and_writers_of_one_fd_and_hang_ups() -> None:
    loop = EventLoop()
    a, b = socket.socketpair()
    r, w = os.pipe()
    got: list[str] = []

    def on_writable() -> None:
        got.append("writable")
        loop.remove_writer(a.fileno())  # the reader of the same fd stays
        b.send(b"x")

    def on_readable() -> None:
        got.append(f"read {a.recv(10)!r}")
        loop.remove_reader(a.fileno())
        os.close(w)  # a hang-up is a read event for the pipe's reader (EPOLLHUP, as selectors)

    def on_hang_up() -> None:
        got.append(f"eof {os.read(r, 10)!r}")
        loop.remove_reader(r)
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    loop.add_writer(a.fileno(), on_writable)
    loop.add_reader(r, on_hang_up)
    loop.call_later(5.0, loop.stop)
    loop.run()
    assert got == ["writable", "read b'x'", "eof b''"]
    # Removing the reader of an fd closed meanwhile is a no-op, as with selectors (the kernel
    # dropped the fd from the epoll set on close).
    fd = b.fileno()
    loop.add_reader(fd, lambda: None)
    b.close()
    loop.remove_reader(fd)
    with tempfile.TemporaryFile() as f, pytest.raises(PermissionError):
        loop.add_reader(f.fileno(), lambda: None)  # epoll cannot watch a regular file
    loop.close()
    a.close()
    os.close(r)


def test_loop_waits_at_least_the_timer_delay() -> None:
    loop = EventLoop()
    start = time.monotonic()
    fired: list[float] = []

    def fire() -> None:
        fired.append(time.monotonic() - start)
        loop.stop()

    loop.call_later(0.0105, fire)
    loop.run()
    loop.close()
    assert fired[0] >= 0.0105


def run_until(loop: EventLoop, done: Callable[[], bool]) -> None:
    """Run `loop` until `done()` (asked every 10 ms), for 10 s at the most; then close it."""
    loop.call_later(10.0, loop.stop)

    def check() -> None:
        if done():
            loop.stop()
        else:
            loop.call_later(0.01, check)

    loop.call_soon(check)
    loop.run()
    loop.close()


class BlockingBackend:
    """A backend whose quotes wait for `release`, so requests pile up in the worker's queue."""

    attestation_type = "test"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def quote(self, report_data: bytes) -> bytes:
        self.started.set()
        assert self.release.wait(10)
        return b"quote:" + report_data


def test_attest_worker_queue_is_bounded_and_keeps_order() -> None:
    loop = EventLoop()
    backend = BlockingBackend()
    worker = AttestWorker(loop, backend, 2)
    results: list[bytes | AttestError] = []
    worker.submit(b"1", results.append)
    assert backend.started.wait(10)  # the worker holds request 1; the queue is empty again
    worker.submit(b"2", results.append)
    worker.submit(b"3", results.append)
    with pytest.raises(
        RequestError, match=r"^too many attestation requests queued \(2\); try again$"
    ) as e:
        worker.submit(b"4", results.append)
    assert e.value.code == "busy"
    backend.release.set()
    run_until(loop, lambda: len(results) == 3)
    assert results == [b"quote:1", b"quote:2", b"quote:3"]


def fail_thread_start(monkeypatch: pytest.MonkeyPatch, name: str, times: int) -> list[str]:
    """Make the next `times` starts of threads called `name` fail as Python's do when it can
    start no more threads; returns the names of the threads that did start."""
    real_start = threading.Thread.start
    started: list[str] = []
    left = [times]

    def start(self: threading.Thread) -> None:
        if self.name == name and left[0] > 0:
            left[0] -= 1
            raise RuntimeError("can't start new thread")
        real_start(self)
        started.append(self.name)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


def test_attest_worker_answers_a_failed_thread_start_and_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = fail_thread_start(monkeypatch, "eemini-attest", 1)
    loop = EventLoop()
    backend = BlockingBackend()
    backend.release.set()
    worker = AttestWorker(loop, backend, 2)
    results: list[bytes | AttestError] = []
    with pytest.raises(RequestError) as e:
        worker.submit(b"1", results.append)
    assert (str(e.value), e.value.code) == (
        "attest: cannot start the eemini-attest thread: can't start new thread; try again",
        "busy",
    )
    assert started == []
    worker.submit(b"2", results.append)
    worker.submit(b"3", results.append)
    assert started == ["eemini-attest"]  # one thread, started by the request after the failure
    run_until(loop, lambda: len(results) == 2)
    assert results == [b"quote:2", b"quote:3"]


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        data += chunk


def test_console_holds_output_while_its_thread_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    started = fail_thread_start(monkeypatch, "eemini-console", 1)
    r, w = os.pipe()
    console = Console(w)
    console.write(b"one\n")
    assert started == []
    console.write(b"two\n")  # tries again: the thread starts and writes both, late
    console.flush(timeout=10)
    assert started == ["eemini-console"]
    assert read_all(r) == (
        b"eemini: console: cannot start the eemini-console thread: can't start new thread; "
        b"output held back until now\none\ntwo\n"
    )
    console.write(b"three\n")
    console.flush(timeout=10)
    assert read_all(r) == b"three\n"
    assert started == ["eemini-console"]
    os.close(r)
    os.close(w)


def test_console_flush_writes_itself_when_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = fail_thread_start(monkeypatch, "eemini-console", 1000)
    r, w = os.pipe()
    console = Console(w, max_pending=8)
    for line in (b"one\n", b"two\n", b"three\n"):  # the third is over the bound: dropped
        console.write(line)
    console.flush(timeout=10)
    assert read_all(r) == (
        b"eemini: console: cannot start the eemini-console thread: can't start new thread; "
        b"output held back until now\none\ntwo\n"
        b"eemini: console too slow: 1 lines dropped (see logs)\n"
    )
    assert started == []
    os.close(r)
    os.close(w)


def test_log_buffer_bounds_lines_and_bytes() -> None:
    buf = LogBuffer(max_lines=3, max_bytes=100)
    for i in range(5):
        buf.append(f"line {i}")
    assert buf.tail(10) == ["line 2", "line 3", "line 4"]
    assert buf.dropped == 2
    buf.append("y" * 90)
    assert buf.tail(10) == ["line 4", "y" * 90]
    assert buf.size == 96
    buf.append("z" * 500)  # bigger than the buffer: keeps its tail
    assert buf.tail(10) == ["z" * 100]
    assert buf.dropped == 6
    buf.append("\u00e9" * 10)
    assert buf.tail(1) == ["\u00e9" * 10]
    assert buf.size == 20


def test_line_splitter() -> None:
    s = LineSplitter(max_line=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\r\nd\n") == ["abc", "d"]
    assert s.feed(b"0123456789\n") == ["01234567", "89"]
    assert s.feed("ééééé".encode()) == ["éééé"]  # 8 bytes, never half a character
    assert s.feed(b"\xff\n") == ["é\ufffd"]
    assert s.feed(b"tail") == []
    assert s.flush() == ["tail"]


def test_line_splitter_cuts_long_lines_at_the_bound_and_loses_nothing() -> None:
    s = LineSplitter()  # 4096 bytes
    # Exactly the bound without a newline: held, as the next byte may end the line.
    assert s.feed(b"x" * 4096) == []
    assert s.feed(b"\n") == ["x" * 4096]
    assert s.feed(b"y" * 4096) == []
    assert s.flush() == ["y" * 4096]
    # Lines split earlier in the same read are kept when the rest is a whole bound long.
    assert s.feed(b"a\nb\r\n" + b"z" * 8192) == ["a", "b", "z" * 4096]
    assert s.feed(b"z" * 4096) == ["z" * 4096]
    assert s.feed(b"z") == ["z" * 4096]
    assert s.feed(b"\n") == ["z"]
    # Reads aligned to the bound, as a workload writing 4 KiB blocks produces.
    for i in range(3):
        assert s.feed(b"w" * 4096) == ([] if i == 0 else ["w" * 4096])
    assert s.flush() == ["w" * 4096]
    assert s.flush() == []
    # Never half a character, and a carriage return that is not at the end of a line is kept.
    assert s.feed(b"x" * 4095 + "\u00e9t\u00e9\n".encode()) == ["x" * 4095, "\u00e9t\u00e9"]
    assert s.feed(b"x" * 4094 + "\U0001f600!\n".encode()) == ["x" * 4094, "\U0001f600!"]
    assert s.feed(b"x" * 4095 + b"\r" + b"y\n") == ["x" * 4095 + "\r", "y"]
    # Invalid UTF-8 (continuation bytes only) is cut at most three bytes early.
    assert s.feed(b"\x80" * 4100) == ["\ufffd" * 4093]
    assert s.flush() == ["\ufffd" * 7]


def test_line_splitter_at_a_bound_of_one_character() -> None:
    assert LineSplitter(4).feed("\U0001f600\U0001f600".encode() + b"ab") == ["\U0001f600", "\U0001f600"]


def test_boot_log_order_and_measure() -> None:
    measured: list[Event] = []
    settings = [Setting("cmdline", "UPSTREAM_URL", "http://x")]
    log = boot_log(measured.append, "image", b"{}", ("/app", b"\x7fELF"), settings, sealed_by="pid1")
    assert list(log) == measured  # each measured, in order
    assert [(e.seq, e.kind, e.source, e.key) for e in log] == [
        (0, "spec", "image", "spec.json"),
        (1, "workload", "image", "/app"),
        (2, "config", "cmdline", "UPSTREAM_URL"),
        (3, "separator", "pid1", ""),
    ]
    digests = [e.to_dict()["digest"] for e in log]
    assert digests[0] == "sha384:" + hashlib.sha384(b"{}").hexdigest()
    assert digests[2] == settings[0].digest == "sha384:" + hashlib.sha384(b"http://x").hexdigest()
    assert digests[3] == "sha384:" + hashlib.sha384(b"").hexdigest()
    without = boot_log(measured.append, "dev", b"{}", None, sealed_by="dev")
    assert [e.kind for e in without] == ["spec", "separator"]


def test_console_drops_lines_instead_of_blocking() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    console = Console(w, max_pending=64)
    # Fill the pipe so the console thread blocks in write(), like a slow serial line.
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"f" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    for i in range(50):
        console.write(f"line {i:02}\n".encode())  # returns at once although nothing drains
    # Drain the "serial line" until the console has written everything it kept. How the 50
    # lines split into written and dropped depends on when the thread takes each chunk.
    chunks: list[bytes] = []
    idle = threading.Event()

    def drain() -> None:
        while True:
            try:
                chunks.append(os.read(r, 1 << 20))
            except BlockingIOError:
                if idle.is_set():
                    return
                time.sleep(0.005)

    reader = threading.Thread(target=drain)
    reader.start()
    console.flush(timeout=60)
    idle.set()
    reader.join()
    text = b"".join(chunks).replace(b"f", b"").decode()
    kept = [line for line in text.splitlines() if line.startswith("line")]
    assert kept[0] == "line 00"
    assert 0 < len(kept) < 50
    assert kept == sorted(set(kept))
    # Every line was either written or counted as dropped (one notice per chunk that dropped).
    notices = re.findall(r"eemini: console too slow: ([0-9]+) lines dropped \(see logs\)\n", text)
    assert notices
    assert sum(int(n) for n in notices) == 50 - len(kept)
    assert [line for line in text.splitlines() if not line.startswith("line")] == [
        f"eemini: console too slow: {n} lines dropped (see logs)" for n in notices
    ]
    os.close(r)
    os.close(w)
