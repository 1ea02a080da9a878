"""Supervise the one workload: start, capture output, restart with backoff, stop, reap.

The workload runs in its own process group with exactly the declared argv and environment (plus
`EE_TOKEN` when the spec grants it), stdin from /dev/null and stdout/stderr on pipes the event loop
reads line by line. Every child is reaped, including orphans that the kernel reparents to us: as
PID 1 that is automatic, in dev mode `PR_SET_CHILD_SUBREAPER` makes the same code path apply.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

from eemini.guest.logbuf import LineSplitter, LogBuffer
from eemini.guest.loop import EventLoop, ThreadStartError, Timer, WorkerThread
from eemini.guest.record import record, replace
from eemini.guest.spec import WorkloadSpec

# Signals a spawned workload gets back at their default disposition (Python ignores SIGPIPE and
# SIGXFSZ, and an ignored disposition survives execve).
_SIGDEF = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
HISTORY = 20  # runs kept for `list`


class Reaper:
    """Reaps every child on SIGCHLD and tells whoever watches a pid how it ended.

    PID 1 registers its own children with `watch(pid, callback)`; unwatched pids are orphans
    reparented to us, reaped and forgotten.
    """

    def __init__(self) -> None:
        self._watch: dict[int, Callable[[int], None]] = {}

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call `callback(wait_status)` once `pid` has been reaped."""
        self._watch[pid] = callback

    def reap(self) -> None:
        """Collect every exited child without blocking (call on SIGCHLD)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self._watch.pop(pid, None)
            if callback is not None:
                callback(status)


class Console:
    """Writes to the console from a thread, so a slow serial console never stalls the loop.

    At 115200 baud a serial console takes about 11 KiB/s; a chatty workload must not make the
    control socket wait for it. Beyond `max_pending` unwritten bytes, lines are dropped (the ring
    buffer still has them) and a count of dropped lines is written once the console catches up.
    When the thread cannot be started, the output waits (within the same bound) and the next
    write tries again; the first chunk then says why it was late. `flush()` writes what is left
    itself when there is still no thread.
    """

    def __init__(self, fd: int, max_pending: int = 256 * 1024) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self._pending: list[bytes] = []
        self._size = 0
        self._dropped = 0
        self._start_error: str | None = None
        self._cond = threading.Condition()
        self._writer = WorkerThread("eemini-console", self._run)
        self._busy = False  # the thread is writing a chunk

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._size + len(data) > self.max_pending:
                self._dropped += 1
            else:
                self._pending.append(data)
                self._size += len(data)
            self._start_writer()
            self._cond.notify()

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (up to `timeout`) until everything queued has been written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._start_writer():
                # No thread to wait for: about to exit or power off, so write it here.
                self._write_all(self._take())
                return
            while (self._pending or self._dropped or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def _start_writer(self) -> bool:
        """Called with the lock held: False when the thread is not running and cannot start."""
        try:
            self._writer.ensure()
        except ThreadStartError as e:
            self._start_error = str(e)
            return False
        return True

    def _take(self) -> bytes:
        """Called with the lock held: what is queued, with the notices it is due."""
        chunk = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        dropped, self._dropped = self._dropped, 0
        late, self._start_error = self._start_error, None
        if late is not None:
            chunk = f"eemini: console: {late}; output held back until now\n".encode() + chunk
        if dropped:
            chunk += f"eemini: console too slow: {dropped} lines dropped (see logs)\n".encode()
        return chunk

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._dropped:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                chunk = self._take()
                self._busy = True
            self._write_all(chunk)

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                n = os.write(self.fd, view)  # EINTR is retried by CPython (PEP 475)
            except OSError:
                break  # a console that cannot take the output must not stop supervision
            view = view[n:]


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # waiting to restart after an exit
    STOPPING = "stopping"
    STOPPED = "stopped"  # stopped on request (shutdown)
    EXITED = "exited"  # done for good under its restart policy


# The original runtime's status words for the supervisor's states (EXITED's depends on the run).
_EE_STATUS = {
    State.STARTING: "deploying",
    State.BACKOFF: "deploying",  # waiting to start the next run
    State.RUNNING: "running",
    State.STOPPING: "running",  # still running until it is stopped
    State.STOPPED: "stopped",
}


def _rfc3339(t: float) -> str:
    """`t` (seconds since the epoch) as an RFC 3339 UTC time to the millisecond."""
    ms = round(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}+00:00"


@record
class Backoff:
    """Exponential restart delay: initial * factor**(n-1) for the n-th quick exit, capped.

    A run that lasted at least `stable_after` seconds resets the count, so a workload that
    crashes once a day restarts at once while a crash loop slows down to one try per `cap`.
    """

    initial: float = 0.25
    factor: float = 2.0
    cap: float = 30.0
    stable_after: float = 10.0

    def delay(self, quick_exits: int) -> float:
        """The delay before the next start after the n-th (n >= 1) quick exit in a row."""
        return float(min(self.cap, self.initial * self.factor ** (quick_exits - 1)))


@record
class RunRecord:
    """One run of the workload. exit_code is set for a normal exit, signal when killed."""

    run: int
    pid: int
    started_at: float  # wall clock
    started_mono: float
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None  # could not start at all
    ended_mono: float | None = None

    @property
    def running(self) -> bool:
        return self.ended_at is None

    @property
    def failed(self) -> bool:
        return not self.running and self.exit_code != 0

    def describe(self) -> str:
        """How an ended run ended."""
        if self.error is not None:
            return f"could not start: {self.error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.exit_code}"

    def to_dict(self) -> dict[str, object]:
        return {
            "run": self.run,
            "pid": self.pid,
            "started_at": round(self.started_at, 3),
            "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
        }


class _Pipe:
    """One output pipe of one run, read line by line into the console and the ring buffer."""

    def __init__(self, sup: Supervisor, fd: int, stream: str, run: int) -> None:
        self.sup = sup
        self.fd = fd
        self.stream = stream
        # On the console: "[app] " before stdout lines, "[app:err] " before stderr lines.
        self.prefix = b"[%s%s] " % (sup.name, b":err" if stream == "stderr" else b"")
        self.run = run
        self.closed = False
        self.splitter = LineSplitter()
        os.set_blocking(fd, False)
        sup.loop.add_reader(fd, self.read_once)

    def read_once(self) -> bool:
        """Read once; False when nothing more is there right now (or the pipe is closed)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            self.sup.on_pipe_closed(self.run)
            return False
        self.emit(self.splitter.feed(data))
        return True

    def close(self) -> None:
        """Stop reading: the last partial line goes out, our end of the pipe is closed."""
        self.emit(self.splitter.flush())
        self.sup.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.closed = True
        self.sup.pipes.remove(self)

    def emit(self, lines: list[str]) -> None:
        for line in lines:
            self.sup.logbuf.append(line)
            self.sup.console.write(self.prefix + line.encode("utf-8", "replace") + b"\n")


class Supervisor:
    """Runs one workload under its restart policy. All methods run on the loop thread."""

    def __init__(
        self,
        loop: EventLoop,
        reaper: Reaper,
        workload: WorkloadSpec,
        *,
        env: Mapping[str, str],
        logbuf: LogBuffer,
        on_done: Callable[[RunRecord], None],
        console_fd: int = 2,
        backoff: Backoff = Backoff(),
        grace: float = 10.0,
        drain: float = 0.5,
    ) -> None:
        self.loop = loop
        self.reaper = reaper
        self.workload = workload
        self.env = env
        self.logbuf = logbuf
        self.on_done = on_done
        self.console = Console(console_fd)
        self.backoff = backoff
        self.grace = grace
        self.drain = drain
        self.state = State.STARTING
        self.runs: list[RunRecord] = []  # the newest HISTORY runs
        self.current: RunRecord | None = None
        self.restarts = 0
        self.quick_exits = 0
        self.pipes: list[_Pipe] = []  # stdout before stderr
        self._restart_timer: Timer | None = None
        self._kill_timer: Timer | None = None
        self._draining: tuple[RunRecord, Timer] | None = None  # ended, its output not yet read
        self._after_stop: list[Callable[[], None]] = []
        self._restart_requested = False
        self._run_counter = 0
        self.name = workload.name.encode("utf-8", "replace")

    # -- output ------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A runtime message about the workload: console and ring buffer."""
        self.logbuf.append(text)
        self.console.write(b"eemini: " + text.encode("utf-8", "replace") + b"\n")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workload (first start, after backoff, or after a restart request).

        A run that cannot start (no pipes, no process) is a failed run: noted, then the restart
        policy applies with its backoff, as for a run that exited at once.
        """
        self.state = State.STARTING
        run = self._run_counter
        self._run_counter += 1
        now, mono = time.time(), time.monotonic()
        fds: list[int] = []
        try:
            fds += os.pipe()
            fds += os.pipe()
            out_r, out_w, err_r, err_w = fds
            pid = os.posix_spawn(
                self.workload.path,
                self.workload.argv,
                self.env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setpgroup=0,
                setsigdef=_SIGDEF,
                setsigmask=(),
            )
        except OSError as e:
            for fd in fds:
                os.close(fd)
            what = self.workload.path if len(fds) == 4 else "cannot create its output pipes"
            failed = RunRecord(run, 0, now, mono, now, 127, None, f"{what}: {e.strerror or e}", mono)
            self._remember(failed)
            self.note(f"{self.workload.name}: run {run} {failed.describe()}")
            self._after_exit(failed)
            return
        os.close(out_w)
        os.close(err_w)
        self.current = RunRecord(run, pid, now, mono)
        self._remember(self.current)
        self.state = State.RUNNING
        self.reaper.watch(pid, self._on_reaped)
        self.pipes += [_Pipe(self, out_r, "stdout", run), _Pipe(self, err_r, "stderr", run)]
        self.note(f"{self.workload.name}: started run {run} as pid {pid}")

    def _remember(self, record: RunRecord) -> None:
        if self.runs and self.runs[-1].run == record.run:
            self.runs[-1] = record
        else:
            self.runs.append(record)
            del self.runs[:-HISTORY]

    def _on_reaped(self, status: int) -> None:
        record = self.current
        assert record is not None
        code = os.waitstatus_to_exitcode(status)
        ended = replace(
            record,
            ended_at=time.time(),
            ended_mono=time.monotonic(),
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
        )
        self.current = None
        self._remember(ended)
        # The leader is gone: whatever is left of its process group goes too, so a restart
        # starts clean (orphans that left the group are still reaped when they exit).
        self._killpg(ended.pid, signal.SIGKILL)
        # The run's last output may still sit in its pipes: SIGCHLD and the pipes' readability
        # can arrive in either order. Read them to EOF before acting on the exit, so the last
        # lines reach the console and the ring buffer before a restart or a power-off. Bounded:
        # a descendant that left the group may hold the pipes open; after `drain` seconds we
        # read what is there and close our ends, so no run's pipes outlive it.
        if any(p.run == ended.run for p in self.pipes):
            self._draining = (ended, self.loop.call_later(self.drain, self._drained))
        else:
            self._exited(ended)

    def on_pipe_closed(self, run: int) -> None:
        draining = self._draining
        if draining is not None and draining[0].run == run and all(p.run != run for p in self.pipes):
            self._drained()

    def _drained(self) -> None:
        if self._draining is None:
            return
        ended, timer = self._draining
        self._draining = None
        timer.cancel()
        held: list[str] = []
        for pipe in [p for p in self.pipes if p.run == ended.run]:
            # Read what the pipe holds now (a default pipe buffer is 64 KiB), without waiting;
            # bounded: a writer that is still alive may keep writing.
            for _ in range(16):
                if pipe.closed or not pipe.read_once():
                    break
            if not pipe.closed:
                held.append(pipe.stream)
                pipe.close()
        if held:
            self.note(
                f"{self.workload.name}: run {ended.run}: {' and '.join(held)} still open "
                f"{self.drain:g} s after it ended, held by a process that left its process "
                "group; closed"
            )
        self._exited(ended)

    def _exited(self, ended: RunRecord) -> None:
        self.note(f"{self.workload.name}: run {ended.run} (pid {ended.pid}) {ended.describe()}")
        self._after_exit(ended)

    def _after_exit(self, ended: RunRecord) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self.state is State.STOPPING:
            if self._restart_requested:
                self._restart_requested = False
                self.restarts += 1
                self.quick_exits = 0
                self.start()
            else:
                self.state = State.STOPPED
            self._finish_stop()
            return
        # From start to reaping: the time spent reading its last output does not count.
        lasted = (ended.ended_mono or time.monotonic()) - ended.started_mono
        if lasted >= self.backoff.stable_after:
            self.quick_exits = 0
        if self.workload.restart.restarts_after(failed=ended.failed):
            self.quick_exits += 1
            delay = self.backoff.delay(self.quick_exits)
            self.state = State.BACKOFF
            self.note(f"{self.workload.name}: restarting in {delay:g} s ({self.workload.restart})")
            self._restart_timer = self.loop.call_later(delay, self._restart_after_backoff)
        else:
            self.state = State.EXITED
            self.on_done(ended)

    def _restart_after_backoff(self) -> None:
        self.restarts += 1
        self.start()

    def _killpg(self, pgid: int, signum: int) -> None:
        if pgid <= 0:
            return
        try:
            os.killpg(pgid, signum)
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.EPERM):
                raise

    def _finish_stop(self) -> None:
        callbacks, self._after_stop = self._after_stop, []
        for cb in callbacks:
            cb()

    def stop(self, then: Callable[[], None], *, restart: bool = False) -> None:
        """SIGTERM to the group, SIGKILL after the grace period; then start again or stay down.

        `then()` runs once the workload is down (or has been restarted).
        """
        self._after_stop.append(then)
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        if self.current is None and self._draining is None:
            # Not running (backoff, exited, never started): nothing to signal.
            if restart:
                self.restarts += 1
                self.quick_exits = 0
                self.start()
            elif self.state is not State.EXITED:
                self.state = State.STOPPED
            self._finish_stop()
            return
        # The latest request wins: a shutdown during a restart's stop cancels the restart.
        self._restart_requested = restart
        if self.state is State.STOPPING:
            return
        self.state = State.STOPPING
        if self.current is None:
            return  # it has exited; its output is being read, then _after_exit sees STOPPING
        pid = self.current.pid
        self.note(f"{self.workload.name}: stopping pid {pid} (SIGTERM, {self.grace:g} s grace)")
        self._killpg(pid, signal.SIGTERM)
        self._kill_timer = self.loop.call_later(self.grace, lambda: self._kill(pid))

    def _kill(self, pid: int) -> None:
        if self.current is not None and self.current.pid == pid:
            self.note(f"{self.workload.name}: pid {pid} still running after {self.grace:g} s: SIGKILL")
            self._killpg(pid, signal.SIGKILL)

    # -- reporting ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """The workload as the original runtime's `DeploymentInfo`, then our own fields.

        The original EasyEnclave runtime (easyenclave/easyenclave, src/workload.rs) answers
        `list` with `DeploymentInfo {id, pid, app_name, source, status, error_message?,
        started_at}`: `source` is the command line, `status` one of deploying | running |
        completed | failed | stopped, `error_message` present only when it failed, and
        `started_at` an RFC 3339 string (clients such as devopsdefender/dd, src/agent.rs, read
        it as a string). The supervisor's own words and the float time follow, as `state` and
        `started_at_unix`. Called once `start()` has made the first run (or failed to).
        """
        last = self.runs[-1]
        status = _EE_STATUS.get(self.state) or ("failed" if last.failed else "completed")
        ee: dict[str, object] = {
            "id": self.workload.name,
            "pid": None if self.current is None else self.current.pid,
            "app_name": self.workload.name,
            "source": " ".join(self.workload.argv),
            "status": status,
            "started_at": _rfc3339(last.started_at),
        }
        if status == "failed":
            ee["error_message"] = last.describe()
        return {
            **ee,
            "state": self.state.value,
            "started_at_unix": round(last.started_at, 3),
            "path": self.workload.path,
            "restarts": self.restarts,
            "restart_policy": self.workload.restart.value,
            "on_exit": self.workload.on_exit.value,
            "last_exit": None if last.running else last.describe(),
            "runs": [r.to_dict() for r in self.runs],
        }
