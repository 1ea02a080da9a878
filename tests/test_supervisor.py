"""The supervisor with real workloads in a real runtime process."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eemini.guest.logbuf import LogBuffer
from eemini.guest.loop import EventLoop
from eemini.guest.spec import EnclaveSpec
from eemini.guest.supervisor import Backoff, Reaper, Supervisor
from rtutil import TOKEN, RuntimeProc, children_of, read_json_line, wait_for, write_spec, write_workload


@pytest.fixture
def runtimes() -> Iterator[list[RuntimeProc]]:
    started: list[RuntimeProc] = []
    yield started
    for rt in started:
        rt.stop()


def start(
    tmp_path: Path, runtimes: list[RuntimeProc], body: str, *extra: str, **fields: object
) -> RuntimeProc:
    workload = write_workload(tmp_path, "app", body)
    rt = RuntimeProc(tmp_path, write_spec(tmp_path, workload, **fields), *extra)
    runtimes.append(rt)
    return rt


def deployment(rt: RuntimeProc) -> dict[str, object]:
    answer = rt.call("list")
    assert answer["ok"] is True
    (dep,) = answer["deployments"]
    assert isinstance(dep, dict)
    return dep


def test_backoff_delays() -> None:
    b = Backoff(initial=0.5, factor=2, cap=3, stable_after=10)
    assert [b.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_crash_loop_backs_off_exponentially(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    body = "import sys\nprint('crashing', flush=True)\nsys.exit(3)\n"
    rt = start(tmp_path, runtimes, body, "--backoff", "0.1,2,30,10", restart="on-failure")
    wait_for(lambda: int(deployment(rt)["restarts"]) >= 4, timeout=15, what="4 restarts")  # type: ignore[call-overload]
    runs = deployment(rt)["runs"]
    assert isinstance(runs, list)
    finished = [r for r in runs if r["ended_at"] is not None][:4]
    assert [r["exit_code"] for r in finished] == [3, 3, 3, 3]
    assert [r["signal"] for r in finished] == [None] * 4
    # The pause between the end of run n and the start of run n+1 follows the backoff.
    gaps = [runs[i + 1]["started_at"] - runs[i]["ended_at"] for i in range(3)]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert expected - 0.01 <= gap < expected + 0.5, gaps
    notes = re.findall(r"restarting in ([0-9.]+) s", rt.stderr())
    assert notes[:4] == ["0.1", "0.2", "0.4", "0.8"]
    logs = rt.call("logs", tail=50)["lines"]
    assert logs.count("crashing") >= 4


def test_backoff_resets_after_a_stable_run(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    counter = tmp_path / "count"
    body = f"""
import sys, time
p = {os.fspath(counter)!r}
try:
    n = int(open(p).read())
except FileNotFoundError:
    n = 0
open(p, "w").write(str(n + 1))
if n == 3:
    time.sleep(2.5)  # a stable run (stable_after = 2 s; a loaded machine may start Python slowly)
sys.exit(1)
"""
    rt = start(tmp_path, runtimes, body, "--backoff", "0.05,2,30,2", restart="always")
    wait_for(lambda: len(re.findall("restarting in", rt.stderr())) >= 5, timeout=15, what="5 restarts")
    notes = re.findall(r"restarting in ([0-9.]+) s", rt.stderr())
    assert notes[:5] == ["0.05", "0.1", "0.2", "0.05", "0.1"]


def test_orphans_are_reaped(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    # Each grandchild leaves the workload's process group (setsid) so it outlives the workload
    # and is reparented to the runtime (PR_SET_CHILD_SUBREAPER), which must reap it.
    body = """
import os, sys, time
pids = []
for i in range(5):
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open("/dev/null", os.O_WRONLY)  # detached like a daemon: not on our pipes
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(0.6 + i * 0.1)
        os._exit(0)
    pids.append(pid)
print("orphans", *pids, flush=True)
sys.exit(0)
"""
    rt = start(tmp_path, runtimes, body, restart="never", on_exit="stay")
    wait_for(lambda: re.search(r"\] orphans [0-9]", rt.stderr()) is not None, what="orphan pids")
    pids = [int(p) for p in re.search(r"\] orphans ([0-9 ]+)", rt.stderr()).group(1).split()]  # type: ignore[union-attr]
    assert len(pids) == 5
    wait_for(lambda: deployment(rt)["state"] == "exited", what="workload exit")
    # While they live, the orphans are the runtime's children.
    adopted = {pid for pid, _ in children_of(rt.proc.pid)}
    assert set(pids) & adopted, (pids, adopted)
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=10, what="orphans reaped"
    )
    assert [c for c in children_of(rt.proc.pid) if c[1] == "Z"] == []
    assert rt.call("health")["ok"] is True


# A workload that ignores SIGTERM: only the grace period's SIGKILL stops it.
IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_sigterm_ignored_is_killed_after_grace(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    rt = start(tmp_path, runtimes, IGNORES_SIGTERM, "--grace", "1", restart="always")
    wait_for(lambda: "ready" in rt.stderr(), what="workload ready")
    began = time.monotonic()
    assert rt.call("shutdown") == {"ok": True, "shutting_down": True}
    assert rt.proc.wait(10) == 0
    elapsed = time.monotonic() - began
    assert 1.0 <= elapsed < 5.0
    err = rt.stderr()
    assert "still running after 1 s: SIGKILL" in err
    assert "killed by SIGKILL" in err


def test_restart_method_starts_a_new_run(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    body = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"
    rt = start(tmp_path, runtimes, body, restart="never", on_exit="stay")
    first = deployment(rt)["pid"]
    answer = rt.call("restart")
    assert answer["ok"] is True and answer["restarts"] == 1 and answer["status"] == "running"
    assert answer["pid"] != first
    runs = deployment(rt)["runs"]
    assert isinstance(runs, list)
    assert runs[0]["signal"] == 15 and runs[0]["exit_code"] is None
    wrong = rt.call("restart", id="nope")
    assert wrong == {
        "ok": False,
        "error": "restart: no workload 'nope' (the one workload is 'app')",
        "code": "not_found",
    }


def test_exact_environment_stdin_and_process_group(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    body = """
import json, os
# /proc/self/environ is what execve() got (Python itself may add LC_CTYPE to os.environ).
raw = open("/proc/self/environ", "rb").read().split(b"\\0")
env = dict(e.decode().split("=", 1) for e in raw if e)
print("ENV", json.dumps(env, sort_keys=True), flush=True)
print("STDIN", os.readlink("/proc/self/fd/0"), flush=True)
print("PGRP", os.getpgid(0) == os.getpid(), flush=True)
"""
    rt = start(
        tmp_path,
        runtimes,
        body,
        restart="never",
        on_exit="stay",
        env={"A": "1", "B": "two"},
        inherit_token=True,
    )
    wait_for(lambda: "PGRP" in rt.stderr(), what="workload output")
    lines = rt.call("logs", tail=10)["lines"]
    env = json.loads(next(line for line in lines if line.startswith("ENV "))[4:])
    assert env == {"A": "1", "B": "two", "EE_TOKEN": TOKEN, "EE_SOCKET_PATH": rt.socket}
    assert "STDIN /dev/null" in lines
    assert "PGRP True" in lines


def test_token_only_when_granted(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    body = (
        "import json\nraw = open('/proc/self/environ', 'rb').read().split(b'\\0')\n"
        "print('ENV', json.dumps(dict(e.decode().split('=', 1) for e in raw if e)), flush=True)\n"
    )
    rt = start(tmp_path, runtimes, body, restart="never", on_exit="stay", env={"X": "y"})
    wait_for(lambda: "ENV" in rt.stderr(), what="workload output")
    line = next(x for x in rt.call("logs")["lines"] if x.startswith("ENV "))
    assert json.loads(line[4:]) == {"X": "y"}


def test_poweroff_when_done_exits_with_workload_status(
    tmp_path: Path, runtimes: list[RuntimeProc]
) -> None:
    workload = write_workload(tmp_path, "app", "import sys\nsys.exit(7)\n")
    spec = write_spec(tmp_path, workload, restart="never", on_exit="poweroff")
    rt = RuntimeProc(tmp_path, spec, wait=False)
    runtimes.append(rt)
    assert rt.proc.wait(10) == 7
    assert "workload done for good (exited with status 7); on_exit = poweroff" in rt.stderr()
    assert not os.path.exists(rt.socket)


def test_missing_binary_is_a_failed_run(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    spec = write_spec(tmp_path, tmp_path / "does-not-exist", restart="never", on_exit="stay")
    rt = RuntimeProc(tmp_path, spec)
    runtimes.append(rt)
    dep = deployment(rt)
    reason = f"could not start: {tmp_path}/does-not-exist: No such file or directory"
    assert (dep["state"], dep["status"], dep["error_message"]) == ("exited", "failed", reason)
    assert dep["last_exit"] == reason


def test_long_lines_are_split(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    body = "import sys\nsys.stdout.write('x' * 10000 + '\\nshort\\n')\nsys.stdout.flush()\n"
    rt = start(tmp_path, runtimes, body, restart="never", on_exit="stay")
    wait_for(lambda: "short" in rt.call("logs")["lines"], what="output")
    lines = [x for x in rt.call("logs")["lines"] if set(x) == {"x"}]
    assert [len(x) for x in lines] == [4096, 4096, 1808]


def test_64_mib_of_block_aligned_output_without_newlines(
    tmp_path: Path, runtimes: list[RuntimeProc]
) -> None:
    # 4 KiB writes without a newline: every read holds whole 4096-byte lines, the bound exactly.
    body = "import os\nblock = b'x' * 4096\nfor _ in range(16384):\n    os.write(1, block)\n"
    rt = start(tmp_path, runtimes, body, restart="never", on_exit="stay")
    wait_for(lambda: deployment(rt)["state"] == "exited", timeout=120, what="workload exit")
    runs = deployment(rt)["runs"]
    assert isinstance(runs, list)
    pid = runs[0]["pid"]
    answer = rt.call("logs", tail=20)
    # The newest of exactly 16384 lines of 4096 bytes, then the exit notes.
    assert answer["lines"] == [
        *(["x" * 4096] * 18),
        f"app: run 0 (pid {pid}) exited with status 0",
        "workload done for good; on_exit = stay, still serving",
    ]
    # The ring buffer keeps 512 KiB: 127 whole lines and the notes.
    assert answer["dropped"] == 16387 - 129
    assert rt.call("shutdown") == {"ok": True, "shutting_down": True}
    assert rt.proc.wait(30) == 0
    # The console has each line or counts it as dropped (it never waits for a slow console).
    err = rt.stderr()
    assert "Traceback" not in err
    shown = [line for line in err.splitlines() if line.startswith("[app")]
    assert set(shown) <= {"[app] " + "x" * 4096}
    dropped = re.findall(r"^eemini: console too slow: ([0-9]+) lines dropped \(see logs\)$", err, re.M)
    assert len(shown) + sum(int(n) for n in dropped) == 16384


# Run in the runtime's process: the first start of each of its threads fails as Python's does
# when it can start no more threads (out of memory, or over the task limit).
FAIL_FIRST_THREAD_STARTS = """
import threading
real_start = threading.Thread.start
failed = set()
def start(self):
    if self.name in ("eemini-attest", "eemini-console") and self.name not in failed:
        failed.add(self.name)
        raise RuntimeError("can't start new thread")
    real_start(self)
threading.Thread.start = start
"""


def test_a_failed_thread_start_is_answered_and_tried_again(
    tmp_path: Path, runtimes: list[RuntimeProc]
) -> None:
    body = "import time\nprint('hello', flush=True)\ntime.sleep(60)\n"
    workload = write_workload(tmp_path, "app", body)
    spec = write_spec(tmp_path, workload, restart="never", on_exit="stay")
    rt = RuntimeProc(tmp_path, spec, setup=FAIL_FIRST_THREAD_STARTS)
    runtimes.append(rt)
    assert rt.call("attest", report_data_b64="AAEC") == {
        "ok": False,
        "error": "attest: cannot start the eemini-attest thread: can't start new thread; try again",
        "code": "busy",
    }
    for data in ("AAEC", "BAUG"):
        answer = rt.call("attest", report_data_b64=data)
        assert (answer["ok"], answer["report_data_b64"], answer["report_data_len"]) == (True, data, 3)
    # The console's first write could not start its thread: the start note waited for the next.
    wait_for(lambda: "[app] hello" in rt.stderr(), what="workload output")
    pid = deployment(rt)["pid"]
    lines = [line for line in rt.stderr().splitlines() if not line.startswith("eemini dev: ")]
    assert lines == [
        "eemini: console: cannot start the eemini-console thread: can't start new thread; "
        "output held back until now",
        f"eemini: app: started run 0 as pid {pid}",
        "[app] hello",
    ]


def test_shutdown_during_a_restart_wins(tmp_path: Path, runtimes: list[RuntimeProc]) -> None:
    rt = start(tmp_path, runtimes, IGNORES_SIGTERM, "--grace", "1", restart="always")
    wait_for(lambda: "ready" in rt.stderr(), what="workload ready")
    with rt.connect() as restarting:
        restarting.sendall(json.dumps({"method": "restart", "token": TOKEN}).encode() + b"\n")
        time.sleep(0.2)  # the restart is now waiting for the grace period
        assert rt.call("shutdown") == {"ok": True, "shutting_down": True}
        answer = read_json_line(restarting)
    assert answer == {"ok": True, "pid": None, "restarts": 0, "status": "stopped"}
    assert rt.proc.wait(10) == 0
    assert rt.stderr().count("started run") == 1


def fd_targets(pid: int) -> dict[int, str]:
    """Every open fd of `pid` and what it refers to ("pipe:[1234]", a path, ...)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def runtime_fds(rt: RuntimeProc) -> list[str]:
    """The runtime's fd targets, sorted, once it has closed the connections of earlier calls
    (its only socket is then the listener)."""
    wait_for(
        lambda: sum(t.startswith("socket:") for t in fd_targets(rt.proc.pid).values()) == 1,
        what="the runtime to close finished connections",
    )
    return sorted(fd_targets(rt.proc.pid).values())


def supervisor_notes(rt: RuntimeProc) -> list[str]:
    return [line for line in rt.stderr().splitlines() if line.startswith("eemini: app: ")]


def test_out_of_fds_is_a_failed_run_and_the_workload_is_restarted(
    tmp_path: Path, runtimes: list[RuntimeProc]
) -> None:
    flag = tmp_path / "exit-now"
    body = f"""
import os, time
print("up", flush=True)
while not os.path.exists({os.fspath(flag)!r}):
    time.sleep(0.02)
os.unlink({os.fspath(flag)!r})
"""
    rt = start(tmp_path, runtimes, body, "--backoff", "0.05,2,0.4,60", restart="always")
    wait_for(lambda: "[app] up" in rt.stderr(), what="run 0")
    pid = rt.proc.pid
    first = deployment(rt)["pid"]
    # Leave the runtime no free fd: a lower limit, and idle connections in every free slot.
    runtime_fds(rt)  # the connection of the call above is closed
    used = set(fd_targets(pid))
    limit = max(used) + 1 + 4
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    clients = [rt.connect() for _ in range(limit - len(used))]
    try:
        wait_for(lambda: len(fd_targets(pid)) == limit, what="the runtime's fds to run out")
        # Run 0 exits and frees its two pipes; a new run needs four fds at once.
        flag.touch()
        failure = (
            "eemini: app: run 1 could not start: cannot create its output pipes: Too many open files"
        )
        wait_for(lambda: failure in rt.stderr(), what="the failed start")
        wait_for(lambda: "restarting in 0.2 s" in rt.stderr(), what="a second failed start")
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: rt.stderr().count("[app] up") == 2, what="a run after the failures")
    notes = supervisor_notes(rt)
    failed = len(notes) - 4
    assert failed % 2 == 0 and failed >= 4, notes
    dep = deployment(rt)
    runs = dep["runs"]
    assert isinstance(runs, list)
    last = failed // 2 + 1
    assert notes == [
        f"eemini: app: started run 0 as pid {first}",
        f"eemini: app: run 0 (pid {first}) exited with status 0",
        "eemini: app: restarting in 0.05 s (always)",
        *(
            note
            for run in range(1, last)
            for note in (
                f"eemini: app: run {run} could not start: cannot create its output pipes: "
                "Too many open files",
                f"eemini: app: restarting in {min(0.4, 0.05 * 2**run):g} s (always)",
            )
        ),
        f"eemini: app: started run {last} as pid {dep['pid']}",
    ]
    assert [(r["run"], r["pid"], r["exit_code"], r["error"]) for r in runs[1:-1]] == [
        (run, 0, 127, "cannot create its output pipes: Too many open files") for run in range(1, last)
    ]
    assert (runs[-1]["run"], runs[-1]["pid"], runs[-1]["ended_at"]) == (last, dep["pid"], None)
    assert (dep["status"], dep["restarts"]) == ("running", last)
    assert "Traceback" not in rt.stderr()


def test_pipes_held_by_a_descendant_are_closed_after_the_drain(
    tmp_path: Path, runtimes: list[RuntimeProc]
) -> None:
    # Run 0 leaves a descendant in a session of its own (the group SIGKILL spares it) holding
    # its stdout and stderr, then exits when told; run 1 just runs.
    count, flag = tmp_path / "count", tmp_path / "exit-now"
    body = f"""
import os, sys, time
n = int(open({os.fspath(count)!r}).read()) if os.path.exists({os.fspath(count)!r}) else 0
open({os.fspath(count)!r}, "w").write(str(n + 1))
if n == 0:
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(60)
        os._exit(0)
    print("descendant", pid, flush=True)
    while not os.path.exists({os.fspath(flag)!r}):
        time.sleep(0.02)
    sys.exit(0)
print("run", n, flush=True)
time.sleep(60)
"""
    rt = start(tmp_path, runtimes, body, "--backoff", "2,2,30,60", restart="always")
    descendant = 0
    try:
        wait_for(lambda: "] descendant " in rt.stderr(), what="run 0's descendant")
        descendant = int(re.findall(r"\] descendant ([0-9]+)", rt.stderr())[0])
        run0 = deployment(rt)["pid"]
        assert isinstance(run0, int)
        held = [os.readlink(f"/proc/{descendant}/fd/{fd}") for fd in (1, 2)]
        assert held == [os.readlink(f"/proc/{run0}/fd/{fd}") for fd in (1, 2)]
        assert all(t.startswith("pipe:[") for t in held) and held[0] != held[1]
        before = runtime_fds(rt)
        assert before.count(held[0]) == 1 and before.count(held[1]) == 1  # PID 1's read ends
        flag.touch()
        wait_for(lambda: "restarting in 2 s" in rt.stderr(), what="run 0's end")
        between = runtime_fds(rt)
        assert "started run 1" not in rt.stderr()  # still in the 2 s backoff
        assert os.path.exists(f"/proc/{descendant}")  # still holding the pipes' write ends
        assert between == sorted(t for t in before if t not in held)
        wait_for(lambda: "[app] run 1" in rt.stderr(), what="run 1")
        run1 = deployment(rt)["pid"]
        assert isinstance(run1, int)
        fresh = [os.readlink(f"/proc/{run1}/fd/{fd}") for fd in (1, 2)]
        after = runtime_fds(rt)
        assert len(after) == len(before)
        assert after == sorted([*between, *fresh])
        assert not set(held) & set(fd_targets(run1).values())
        assert supervisor_notes(rt) == [
            f"eemini: app: started run 0 as pid {run0}",
            "eemini: app: run 0: stdout and stderr still open 0.5 s after it ended, held by a "
            "process that left its process group; closed",
            f"eemini: app: run 0 (pid {run0}) exited with status 0",
            "eemini: app: restarting in 2 s (always)",
            f"eemini: app: started run 1 as pid {run1}",
        ]
    finally:
        if descendant:
            os.kill(descendant, signal.SIGKILL)


class WatchedOnlyReaper(Reaper):
    """Reaps only the pids it watches: pytest's other children are not this test's to collect."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: dict[int, Callable[[int], None]] = {}

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        self.callbacks[pid] = callback

    def reap(self) -> None:
        for pid in list(self.callbacks):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                self.callbacks.pop(pid)(status)


class InProcess:
    """A Supervisor on an EventLoop in this process, so a test controls when SIGCHLD is handled."""

    def __init__(self, tmp: Path, body: str, drain: float = 0.5) -> None:
        workload = write_workload(tmp, "app", body)
        spec = EnclaveSpec.from_dict(
            {"version": 1, "workload": {"path": os.fspath(workload), "restart": "never"}}
        )
        self.loop = EventLoop()
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        self.reaper = WatchedOnlyReaper()
        self.logbuf = LogBuffer()
        self.seen_when_done: list[str] | None = None
        self.sup = Supervisor(
            self.loop,
            self.reaper,
            spec.workload,
            env={},
            logbuf=self.logbuf,
            on_done=lambda record: self.done(),
            console_fd=self.devnull,
            drain=drain,
        )

    def lines(self) -> list[str]:
        return self.logbuf.tail(1000)

    def done(self) -> None:
        self.seen_when_done = self.lines()

    def run_until(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.lines()}")
            self.loop.call_later(0.05, lambda: None)  # select() never sleeps longer than this
            self.loop.run_once()

    def start(self) -> int:
        """Start the workload; its pid."""
        self.sup.start()
        assert self.sup.current is not None
        return self.sup.current.pid

    def end_with_sigchld_first(self, pid: int) -> None:
        """Let the workload end on its own, its SIGCHLD handled before its pipes are read."""
        self.sigchld_before_the_pipes(pid)
        self.run_until(lambda: self.seen_when_done is not None, "the workload's end")

    def sigchld_before_the_pipes(self, pid: int) -> None:
        # Wait until the workload has exited (without reaping it), then handle its SIGCHLD
        # before the loop has looked at the pipes: the order a loaded machine can produce.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        self.reaper.reap()

    def close(self) -> None:
        for pipe in list(self.sup.pipes):
            self.loop.remove_reader(pipe.fd)
            os.close(pipe.fd)
        self.loop.close()
        self.sup.console.flush()
        os.close(self.devnull)


def test_last_output_is_read_before_the_exit_is_acted_on(tmp_path: Path) -> None:
    body = "import sys\nprint('first', flush=True)\nprint('last words')\nsys.stderr.write('no newline')"
    rt = InProcess(tmp_path, body)
    try:
        pid = rt.start()
        rt.end_with_sigchld_first(pid)
    finally:
        rt.close()
    seen = rt.seen_when_done
    assert seen is not None
    output = [text for text in seen if not text.startswith("app: ")]  # stdout and stderr
    assert [text for text in output if text != "no newline"] == ["first", "last words"]
    assert "no newline" in output
    assert [text for text in seen if text.startswith("app: ")] == [
        f"app: started run 0 as pid {pid}",
        f"app: run 0 (pid {pid}) exited with status 0",
    ]
    assert seen[-1] == f"app: run 0 (pid {pid}) exited with status 0"
    assert rt.sup.state.value == "exited"


def test_output_after_sigterm_is_read_before_the_stop_completes(tmp_path: Path) -> None:
    body = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b"got SIGTERM\\n"), os._exit(0)))
print("waiting", flush=True)
while True:
    time.sleep(1)
"""
    rt = InProcess(tmp_path, body)
    stopped: list[list[str]] = []
    try:
        pid = rt.start()
        rt.run_until(lambda: "waiting" in rt.lines(), "the workload's handler")
        rt.sup.stop(lambda: stopped.append(rt.lines()))
        rt.sigchld_before_the_pipes(pid)
        rt.run_until(lambda: bool(stopped), "the stop")
    finally:
        rt.close()
    assert stopped[0][-2:] == ["got SIGTERM", f"app: run 0 (pid {pid}) exited with status 0"]
    assert rt.sup.state.value == "stopped"
    assert rt.seen_when_done is None  # a requested stop is not the workload ending on its own


def test_a_descendant_holding_the_pipes_delays_the_exit_only_briefly(tmp_path: Path) -> None:
    # The grandchild leaves the process group (so the group SIGKILL spares it) and keeps the
    # workload's stdout open: the supervisor reads what is there and moves on after `drain`.
    body = """
import os, time
print("leader", flush=True)
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    print("grandchild", os.getpid(), flush=True)
    os.write(w, b"x")
    time.sleep(60)
    os._exit(0)
os.read(r, 1)
print("leader done", flush=True)
"""
    rt = InProcess(tmp_path, body, drain=0.5)
    grandchild = 0
    try:
        pid = rt.start()
        rt.end_with_sigchld_first(pid)
        grandchild = int(next(t for t in rt.lines() if t.startswith("grandchild "))[11:])
        assert os.path.exists(f"/proc/{grandchild}")  # still holding the pipe
    finally:
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)
        rt.close()
    seen = rt.seen_when_done
    assert seen is not None
    assert [text for text in seen if not text.startswith("app: ")] == [
        "leader",
        f"grandchild {grandchild}",
        "leader done",
    ]
    assert seen[-1] == f"app: run 0 (pid {pid}) exited with status 0"
