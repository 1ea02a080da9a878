"""The guest's one event loop: epoll, timers and signals, no asyncio.

Everything PID 1 waits for goes through one `EventLoop`: the control socket and its connections,
the workload's stdout/stderr pipes, SIGCHLD, the power button, DHCP renewal timers. Callbacks run
on the loop's thread, one at a time, and must not block; an exception in a callback is printed to
stderr and the loop carries on (one bad connection must never stop PID 1).

Signals are delivered through `signal.set_wakeup_fd`: the C-level handler writes the signal
number into a pipe the loop watches, so a signal arriving while the loop sleeps in epoll_wait()
wakes it, and the callback runs from the loop like any other event, never in a signal-handler
context.

The loop uses `select.epoll` directly, as `selectors.EpollSelector` would (level-triggered; a
hang-up or error wakes both the reader and the writer of the fd): the guest and dev mode run on
Linux only.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType

Callback = Callable[[], object]  # what it returns is ignored

# Byte written to the wakeup pipe by call_soon_threadsafe(); signal numbers are 1..64.
_THREAD_WAKEUP = b"\0"
_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT


class Timer:
    """A scheduled callback; `cancel()` it any time before it runs (cancelling twice is fine)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callback) -> None:
        self.callback: Callback | None = callback  # None once cancelled or run

    def cancel(self) -> None:
        self.callback = None


class ThreadStartError(Exception):
    """A worker thread could not be started; the message names the thread and the cause."""


class WorkerThread:
    """A daemon thread that feeds the loop, started when first needed (and again if it ended).

    The thread is kept only once it has started: a failed start (Python's "can't start new
    thread" when memory or the task limit runs out) leaves nothing behind, so the caller can tell
    whoever was waiting, and the next `ensure()` tries again. Call from one thread at a time.
    """

    def __init__(self, name: str, target: Callback) -> None:
        self.name = name
        self.target = target
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        """Start the thread unless it is running; ThreadStartError if it cannot start now."""
        if self._thread is not None and self._thread.is_alive():
            return
        thread = threading.Thread(target=self.target, name=self.name, daemon=True)
        try:
            thread.start()
        except (RuntimeError, MemoryError) as e:
            raise ThreadStartError(f"cannot start the {self.name} thread: {e}") from None
        self._thread = thread


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    # The Python-level handler does nothing: the wakeup fd carries the signal to the loop.
    pass


class EventLoop:
    """A small single-threaded event loop.

    API used by the runtime and by PID 1:

    - `add_reader(fd, cb)` / `remove_reader(fd)`: call `cb()` whenever `fd` is readable.
    - `add_writer(fd, cb)` / `remove_writer(fd)`: call `cb()` whenever `fd` is writable.
    - `call_later(delay, cb) -> Timer`, `call_soon(cb) -> Timer`; `Timer.cancel()`.
    - `call_soon_threadsafe(cb)`: the only method other threads may call.
    - `add_signal_handler(signum, cb)` (main thread only; `close()` restores the defaults).
    - `run()` until `stop()`; `time()` is the loop's monotonic clock.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}  # fd -> _READ | _WRITE as registered with epoll
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._ready: deque[Timer] = deque()
        self._threadsafe: deque[Callback] = deque()
        self._threadsafe_lock = threading.Lock()
        self._signal_handlers: dict[int, Callback] = {}
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, _READ)

    # -- fds ---------------------------------------------------------------------------------

    def _update(self, fd: int) -> None:
        events = (_READ if fd in self._readers else 0) | (_WRITE if fd in self._writers else 0)
        registered = self._registered.get(fd)
        if registered is None:
            if events:
                self._epoll.register(fd, events)  # raises (bad fd, a regular file) first
                self._registered[fd] = events
            return
        if events:
            if registered != events:
                try:
                    self._epoll.modify(fd, events)
                except BaseException:
                    del self._registered[fd]  # as selectors does: forget it, then raise
                    raise
                self._registered[fd] = events
        else:
            del self._registered[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # the fd was closed already: the kernel dropped it from the epoll set

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call `callback()` each time `fd` is readable (replaces an earlier reader of `fd`)."""
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        """Stop watching `fd` for reading; a no-op when it was not watched. Call before close()."""
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call `callback()` each time `fd` is writable (replaces an earlier writer of `fd`)."""
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        """Stop watching `fd` for writing; a no-op when it was not watched."""
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    # -- timers ------------------------------------------------------------------------------

    def time(self) -> float:
        """The loop's clock (time.monotonic)."""
        return time.monotonic()

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run `callback()` on the loop after `delay` seconds; returns a cancellable Timer."""
        timer = Timer(callback)
        heapq.heappush(self._timers, (self.time() + max(0.0, delay), next(self._counter), timer))
        return timer

    def call_soon(self, callback: Callback) -> Timer:
        """Run `callback()` on the next loop iteration; returns a cancellable Timer."""
        timer = Timer(callback)
        self._ready.append(timer)
        return timer

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """From any thread: run `callback()` on the loop thread soon, waking the loop if asleep."""
        with self._threadsafe_lock:
            self._threadsafe.append(callback)
        try:
            os.write(self._wake_w, _THREAD_WAKEUP)
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake already

    # -- signals -----------------------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run `callback()` on the loop when `signum` arrives (main thread only)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        signal.signal(signum, _ignore_signal)
        # Restart interrupted system calls where possible; the loop sees the wakeup byte anyway.
        signal.siginterrupt(signum, False)

    def _drain_wakeup(self) -> None:
        signums: list[int] = []
        while True:
            try:
                data = os.read(self._wake_r, 4096)
            except BlockingIOError:
                break
            if not data:
                break
            signums.extend(b for b in data if b != 0)
        with self._threadsafe_lock:
            pending, self._threadsafe = self._threadsafe, deque()
        for cb in pending:
            self._run_callback(cb)
        for signum in dict.fromkeys(signums):  # coalesce, keep order: signals are not queued
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self._run_callback(handler)

    # -- running -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Make `run()` return after the current iteration."""
        self._stopping = True

    def _run_callback(self, callback: Callback) -> None:
        try:
            callback()
        except Exception:
            # A bug in one callback must not take PID 1 down with it.
            import traceback

            print("eemini: error in event loop callback:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)

    def _timeout(self) -> float | None:
        if self._ready or self._threadsafe:
            return 0.0
        while self._timers and self._timers[0][2].callback is None:
            heapq.heappop(self._timers)
        return max(0.0, self._timers[0][0] - self.time()) if self._timers else None

    def run_once(self) -> None:
        """One iteration: wait for fds or the next timer, then run what is due."""
        # epoll_wait() rounds a timeout up to whole milliseconds itself (CPython converts with
        # ceiling rounding), so it never wakes early, as selectors arranges by hand. A signal
        # does not end the wait (PEP 475: CPython retries): its byte on the wakeup pipe does.
        timeout = self._timeout()
        ready = self._epoll.poll(-1 if timeout is None else timeout, len(self._registered) + 1)
        for fd, event in ready:
            if fd == self._wake_r:
                self._drain_wakeup()
                continue
            # As selectors.EpollSelector: any event but EPOLLOUT (EPOLLIN, EPOLLHUP, EPOLLERR, ...)
            # is for the reader, any but EPOLLIN for the writer. The callback is looked up now:
            # an earlier one may have removed it.
            if event & ~_WRITE and fd in self._readers:
                self._run_callback(self._readers[fd])
            if event & ~_READ and fd in self._writers:
                self._run_callback(self._writers[fd])
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.callback is not None:
                self._ready.append(timer)
        # Only what is ready now; callbacks scheduled meanwhile wait for the next iteration.
        for _ in range(len(self._ready)):
            timer = self._ready.popleft()
            cb = timer.callback
            if cb is not None:
                timer.cancel()
                self._run_callback(cb)

    def run(self) -> None:
        """Run until `stop()` is called."""
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def close(self) -> None:
        """Restore the default signal dispositions, stop signals writing to the wakeup pipe, and
        release the epoll fd and the pipe."""
        for signum in self._signal_handlers:
            signal.signal(signum, signal.SIG_DFL)
        if self._signal_handlers:
            signal.set_wakeup_fd(-1)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
