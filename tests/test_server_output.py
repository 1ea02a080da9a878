"""The control socket's output limits: the answer cap, the unread-output budget, PID 1's memory.

The budget tests run the server in this process, on its own loop thread, so that its counters can
be read (on the loop thread) while real clients leave their answers unread; the memory test runs
the runtime as a process with a workload whose log makes the largest `logs` answers there are.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from eemini.guest.dev.devmode import close_server
from eemini.guest.loop import EventLoop
from eemini.guest.server import Limits, Method, Server
from rtutil import TOKEN, RuntimeProc, wait_for, write_spec, write_workload

T = TypeVar("T")


def blob(params: dict[str, Any], respond: Callable[[dict[str, Any]], None]) -> None:
    respond({"blob": "x" * params["size"]})


class InProcess:
    """A Server on a loop thread; `on_loop(fn)` runs fn there and returns its result."""

    def __init__(self, path: str, limits: Limits) -> None:
        self.loop = EventLoop()
        self.requests = 0  # requests of blob and small that reached their method

        def counted(params: dict[str, Any], respond: Callable[[dict[str, Any]], None]) -> None:
            self.requests += 1
            if params:
                blob(params, respond)
            else:
                respond({})

        methods = {
            "blob": Method(counted, {"size": int}, large=True),
            "wide": Method(blob, {"size": int}),  # large answers from a method that says not
            "small": Method(counted),
        }
        self.server = Server(self.loop, path, TOKEN, methods, limits)
        self.server.start()
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def on_loop(self, fn: Callable[[], T]) -> T:
        done = threading.Event()
        result: list[T] = []

        def run() -> None:
            result.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10), "the loop thread did not answer"
        return result[0]

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.server.path)
        return s

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        close_server(self.server)
        self.loop.close()


@contextlib.contextmanager
def serving(tmp_path: Path, **limits: Any) -> Iterator[InProcess]:
    served = InProcess(str(tmp_path / "agent.sock"), Limits(**limits))
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[InProcess]:
    with serving(tmp_path, max_answer=300_000) as served:
        yield served


def in_parallel(fn: Callable[[socket.socket], T], socks: list[socket.socket]) -> list[T]:
    """fn(s) for every socket, each on its own thread; the results in order."""
    results: dict[int, T] = {}

    def run(i: int) -> None:
        results[i] = fn(socks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(socks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return [results[i] for i in range(len(socks))]


def blob_request(size: int) -> bytes:
    return json.dumps({"method": "blob", "token": TOKEN, "size": size}).encode() + b"\n"


SMALL_REQUEST = json.dumps({"method": "small", "token": TOKEN}).encode() + b"\n"


def blob_answer(size: int) -> bytes:
    return b'{"ok":true,"blob":"' + b"x" * size + b'"}\n'  # 22 bytes around the blob


def test_an_answer_over_the_cap_is_an_error(capped: InProcess) -> None:
    with capped.connect() as s:
        s.sendall(blob_request(299_978) + blob_request(299_979) + blob_request(400_000))
        f = s.makefile("rb")
        assert f.readline() == blob_answer(299_978)  # 300,000 bytes with its newline: the cap
        for size in (300_001, 400_022):
            assert json.loads(f.readline()) == {
                "ok": False,
                "error": f"blob: the answer would be {size} bytes, over the limit of 300000 "
                "bytes per answer",
                "code": "answer_too_large",
            }


ANSWER = 100_000
ANSWER_LINE = len(blob_answer(ANSWER))
BUDGET = {"max_output": 64 * 1024, "max_total_output": 1024 * 1024, "max_answer": 200_000}


def snapshot(served: InProcess) -> dict[str, Any]:
    server = served.server
    return served.on_loop(
        lambda: {
            "pending": server.pending_output,
            "outbufs": [len(c.outbuf) for c in server.conns],
            "starved": len(server.starved),
            "requests": served.requests,
            "conns": len(server.conns),
        }
    )


def settle(served: InProcess) -> dict[str, Any]:
    """The server's counters once it has stopped serving anything for half a second."""
    last = snapshot(served)
    while True:
        time.sleep(0.5)
        now = snapshot(served)
        if now["requests"] == last["requests"] and now["pending"] == last["pending"]:
            return now
        last = now


def read_answers(s: socket.socket, n: int) -> list[bytes]:
    f = s.makefile("rb")
    return [f.readline() for _ in range(n)]


def test_unread_answers_stay_within_the_budget(tmp_path: Path) -> None:
    clients, each = 20, 10
    with serving(tmp_path, stall_timeout=60, **BUDGET) as served:
        socks = [served.connect() for _ in range(clients)]
        for s in socks:
            s.sendall(blob_request(ANSWER) * each)  # and read nothing, for now
        held = settle(served)
        assert held["pending"] == sum(held["outbufs"])
        # Served until the total reached the budget, plus at most the one answer that crossed it.
        assert 1024 * 1024 <= held["pending"] < 1024 * 1024 + ANSWER_LINE
        assert all(n < 64 * 1024 + ANSWER_LINE for n in held["outbufs"])
        assert held["starved"] >= 1 and held["requests"] < clients * each
        # Meanwhile a small answer is given at once; a request for a large one waits its turn.
        with served.connect() as client:
            client.sendall(SMALL_REQUEST)
            assert read_answers(client, 1) == [b'{"ok":true}\n']
        late = served.connect()
        late.sendall(blob_request(ANSWER))
        wait_for(lambda: snapshot(served)["starved"] == held["starved"] + 1, what="it to wait")
        socks.append(late)
        # Once read, every answer comes, in full: the held-back connections were resumed.
        results = in_parallel(lambda s: read_answers(s, 1 if s is late else each), socks)
        assert [len(r) for r in results] == [each] * clients + [1]
        assert all(line == blob_answer(ANSWER) for r in results for line in r)
        for s in socks:
            s.close()
        wait_for(lambda: snapshot(served)["conns"] == 0, what="the server to see the closes")
        assert snapshot(served) == {
            "pending": 0,
            "outbufs": [],
            "starved": 0,
            "requests": clients * each + 2,
            "conns": 0,
        }


def test_waiting_for_the_server_does_not_count_against_deadlines(tmp_path: Path) -> None:
    limits = {**BUDGET, "stall_timeout": 60, "auth_timeout": 0.5}
    with serving(tmp_path, **limits) as served:
        # Past the budget and the two answers of room beyond it, every request waits.
        wide = json.dumps({"method": "wide", "token": TOKEN, "size": ANSWER}).encode() + b"\n"
        hogs = [served.connect() for _ in range(20)]
        for s in hogs:
            s.sendall(wide * 10)
        held = settle(served)
        assert held["pending"] >= 1024 * 1024 + 2 * 200_000
        # A new client's first request waits, so it cannot authenticate in time: that is the
        # server's doing, and it is not dropped for it.
        with served.connect() as late:
            late.sendall(SMALL_REQUEST)
            wait_for(lambda: snapshot(served)["starved"] == held["starved"] + 1, what="it to wait")
            time.sleep(1.0)  # twice its deadline
            in_parallel(lambda s: read_answers(s, 10), hogs)
            assert read_answers(late, 1) == [b'{"ok":true}\n']
        for s in hogs:
            s.close()


def drain(s: socket.socket) -> tuple[int, bool]:
    """(answers received, whether the server closed the connection) once nothing more comes."""
    data = b""
    s.settimeout(1.0)
    closed = True
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            break
        except TimeoutError:
            closed = False
            break
        if not chunk:
            break
        data += chunk
    return data.count(b"\n"), closed


def test_clients_that_do_not_read_are_dropped_when_the_budget_is_spent(tmp_path: Path) -> None:
    hogs_n, each = 20, 5
    with serving(tmp_path, stall_timeout=0.2, **BUDGET) as served:
        hogs = [served.connect() for _ in range(hogs_n)]
        for s in hogs:
            s.sendall(blob_request(ANSWER) * each)  # and read nothing, for now
        settle(served)
        asked = time.monotonic()
        with served.connect() as client:
            client.sendall(blob_request(ANSWER))
            assert read_answers(client, 1) == [blob_answer(ANSWER)]
        assert time.monotonic() - asked < 3.0  # not stuck behind the hogs' unread answers
        after = settle(served)
        assert after["pending"] < 1024 * 1024  # the budget is free again
        kept = after["conns"]
        assert kept < hogs_n
        # The hogs the server dropped got fewer than their answers, then the end; the others,
        # now that they read, get all of theirs.
        results = in_parallel(drain, hogs)
        dropped_hogs = [n for n, closed in results if closed]
        assert len(dropped_hogs) == hogs_n - kept
        assert all(n < each for n in dropped_hogs), results
        assert [n for n, closed in results if not closed] == [each] * kept
        for s in hogs:
            s.close()


# 1999 lines of 256 control characters (each six bytes in JSON), then "ready": the ring buffer's
# byte bound (512 KiB) holds them all, and answering them all would take about 6 MiB.
NOISY = """import sys, time
for _ in range(1999):
    sys.stdout.write("\\x01" * 256 + "\\n")
print("ready", flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProc]:
    tmp = tmp_path_factory.mktemp("noisy")
    workload = write_workload(tmp, "app", NOISY)
    rt = RuntimeProc(tmp, write_spec(tmp, workload, on_exit="stay"))
    wait_for(lambda: rt.call("logs", tail=1)["lines"] == ["ready"], what="the workload's output")
    yield rt
    rt.stop()


def logs_request(tail: int) -> bytes:
    return json.dumps({"method": "logs", "token": TOKEN, "tail": tail}).encode() + b"\n"


def test_logs_answers_the_newest_lines_that_fit(noisy: RuntimeProc) -> None:
    with noisy.connect() as s:
        s.sendall(logs_request(2000))
        line = s.makefile("rb").readline()
    answer = json.loads(line)
    kept = len(answer["lines"])
    assert kept + answer["omitted"] == 2000
    assert answer["lines"][-1] == "ready"
    assert answer["lines"][:-1] == ["\x01" * 256] * (kept - 1)
    # Within the cap, and one more line would not have been.
    one_more = len(json.dumps(answer["lines"][0])) + 1
    assert len(line) <= 1024 * 1024 < len(line) + one_more


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid`: resident now, and at its peak."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def test_unread_logs_answers_keep_the_runtime_small(noisy: RuntimeProc) -> None:
    rss_before, _ = memory_mib(noisy.proc.pid)
    # 100 of the largest answers there are, on 10 connections, none of them read.
    socks = [noisy.connect() for _ in range(10)]
    for s in socks:
        s.sendall(logs_request(2000) * 10)
    time.sleep(4)  # long enough for all of them to be served, or dropped
    _, peak = memory_mib(noisy.proc.pid)
    # The unread-output budget (8 MiB), one answer over it (1 MiB) and the building of answers.
    assert peak - rss_before < 16, (rss_before, peak)
    for s in socks:
        s.close()
    assert noisy.call("health")["ok"] is True
    assert "Traceback" not in noisy.stderr()
