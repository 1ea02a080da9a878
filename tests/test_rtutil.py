"""The test helpers' own contract: rtutil.read_json_line takes exactly one answer line, whatever
its size, or fails within its deadline."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from rtutil import read_json_line


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    with ours, theirs:
        yield ours, theirs


def _send_later(s: socket.socket, data: bytes) -> threading.Thread:
    sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    sender.start()
    return sender


@pytest.mark.timeout(60)
def test_an_answer_larger_than_the_socket_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    big = {"ok": True, "data": "x" * (1 << 20)}  # 1 MiB: far more than a socket buffer holds
    assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 1 << 20
    sender = _send_later(theirs, json.dumps(big).encode() + b"\n" + b'{"ok": false}\n')
    assert read_json_line(ours) == big
    assert read_json_line(ours) == {"ok": False}  # the next answer was left for the next call
    sender.join(10)
    assert ours.gettimeout() == 10  # the socket's own timeout is back


def test_answers_sent_together_are_taken_one_at_a_time(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b'{"n": 1}\n{"n": 2}\n{"n": 3')
    assert read_json_line(ours) == {"n": 1}
    assert read_json_line(ours) == {"n": 2}
    theirs.sendall(b"}\n")
    assert read_json_line(ours) == {"n": 3}


def test_an_answer_that_never_ends_fails_by_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair

    def trickle() -> None:  # a byte every 50 ms, never a newline, until the socket is closed
        with contextlib.suppress(OSError):
            while True:
                theirs.sendall(b" ")
                time.sleep(0.05)

    threading.Thread(target=trickle, daemon=True).start()
    theirs.sendall(b'{"partial": ')
    start = time.monotonic()
    with pytest.raises(
        AssertionError, match=r"^no complete answer within 1 s \(\d+ bytes of it read\)$"
    ):
        read_json_line(ours, timeout=1.0)
    assert time.monotonic() - start < 5


def test_a_connection_closed_mid_answer(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b'{"ok": tr')
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(AssertionError, match=r"^connection closed before a complete answer$"):
        read_json_line(ours)
