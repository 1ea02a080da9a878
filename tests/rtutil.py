"""Helpers for tests that run the guest runtime as a real process (dev-mode runner)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN = "t0ken-for-tests-" + "ab" * 16


def write_workload(directory: Path, name: str, body: str) -> Path:
    """A Python workload script run by this interpreter (the workload's env has no PATH)."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def write_spec(directory: Path, workload: Path, **fields: Any) -> Path:
    spec = {"version": 1, "workload": {"path": os.fspath(workload), **fields}}
    path = directory / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RuntimeProc:
    """`python -m eemini.guest.dev.devmode` in its own process; stderr goes to a file.

    `setup`: Python code the process runs before the runtime (to inject a fault).
    """

    def __init__(
        self, tmp: Path, spec: Path, *extra: str, wait: bool = True, setup: str | None = None
    ) -> None:
        self.socket = os.fspath(tmp / "run" / "agent.sock")
        self.stderr_path = tmp / "runtime.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        if setup is None:
            argv = [sys.executable, "-m", "eemini.guest.dev.devmode"]
        else:
            main = (
                "import sys\nfrom eemini.guest.dev.devmode import main\nsys.exit(main(sys.argv[1:]))\n"
            )
            argv = [sys.executable, "-c", setup + "\n" + main]
        argv += ["--spec-json", os.fspath(spec)]
        argv += ["--socket", self.socket, "--token", TOKEN, *extra]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        if wait:
            wait_for(self._ready, what=f"control socket {self.socket}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"runtime exited early ({self.proc.returncode}): {self.stderr()}")
        return os.path.exists(self.socket)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.socket)
        return s

    def call(self, method: str, token: str | None = TOKEN, **params: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"method": method, **params}
        if token is not None:
            req["token"] = token
        with self.connect() as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            return read_json_line(s)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode


ANSWER_TIMEOUT = 30.0  # seconds, for a socket without a timeout of its own


def read_json_line(s: socket.socket, timeout: float | None = None) -> dict[str, Any]:
    """Exactly one answer line, taken up to its newline and no further (a later answer on the same
    connection is left for the next call), however large. It must be complete within `timeout`
    seconds: by default the socket's own timeout, else ANSWER_TIMEOUT."""
    limit = timeout if timeout is not None else (s.gettimeout() or ANSWER_TIMEOUT)
    deadline = time.monotonic() + limit
    saved = s.gettimeout()
    line = bytearray()
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.settimeout(remaining)
            peeked = s.recv(1 << 16, socket.MSG_PEEK)
            if not peeked:
                raise AssertionError("connection closed before a complete answer")
            nl = peeked.find(b"\n")
            want = len(line) + (nl + 1 if nl >= 0 else len(peeked))
            while len(line) < want:  # what was peeked is there to take
                chunk = s.recv(want - len(line))
                if not chunk:
                    raise AssertionError("connection closed before a complete answer")
                line += chunk
    except TimeoutError:
        raise AssertionError(
            f"no complete answer within {limit:g} s ({len(line)} bytes of it read)"
        ) from None
    finally:
        s.settimeout(saved)
    answer = json.loads(line)
    assert isinstance(answer, dict)
    return answer


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `pid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ')'.
        rest = stat[stat.rindex(")") + 2 :].split()
        state, ppid = rest[0], int(rest[1])
        if ppid == pid:
            out.append((int(entry), state))
    return out
