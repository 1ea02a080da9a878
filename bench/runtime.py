"""The control socket under load, next to a minimal newline-JSON echo server on the same machine.

Both servers are separate Python processes on unix sockets; the load generator is this process
(one blocking client, or 64 connections driven by one selector, each sending its next request as
soon as its answer arrives; or one connection sending a burst of requests in one write while it
reads the answers). Then a runtime whose workload filled the log buffer with the costliest lines
there are faces 256 hostile connections at once. Figures are printed, never asserted.
Targets: health throughput >= 0.5x echo, p99 < 10 ms at 64 clients, runtime RSS < 25 MiB; every
request of a burst answered; RSS after the hostile connections < 25 MiB + the 8 MiB output budget.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DURATION = 2.0
BURST = 10_000
HOSTILE = 256
TOKEN = "bench-token-" + "0" * 52

ECHO_SERVER = r"""
import json, os, selectors, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(512)
srv.setblocking(False)
sel = selectors.DefaultSelector()
bufs = {}
def accept():
    c, _ = srv.accept()
    c.setblocking(False)
    bufs[c] = b""
    sel.register(c, selectors.EVENT_READ, c)
sel.register(srv, selectors.EVENT_READ, None)
while True:
    for key, _ in sel.select():
        if key.data is None:
            accept()
            continue
        c = key.data
        data = c.recv(65536)
        if not data:
            sel.unregister(c); c.close(); del bufs[c]; continue
        buf = bufs[c] + data
        *lines, bufs[c] = buf.split(b"\n")
        out = b"".join(json.dumps({"ok": True, "echo": json.loads(l)}).encode() + b"\n" for l in lines)
        c.sendall(out)
"""


def _wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server at {path} did not start")
        time.sleep(0.02)


def _rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _one_client(path: str, request: bytes, duration: float) -> tuple[float, list[float]]:
    lat: list[float] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        f = s.makefile("rb")
        end = time.perf_counter() + duration
        began = time.perf_counter()
        while (now := time.perf_counter()) < end:
            s.sendall(request)
            line = f.readline()
            assert line.endswith(b"\n") and b'"ok":true' in line.replace(b" ", b""), line[:200]
            lat.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - began
    return len(lat) / elapsed, lat


def _many_clients(path: str, request: bytes, n: int, duration: float) -> tuple[float, list[float]]:
    sel = selectors.DefaultSelector()
    socks = []
    sent_at: dict[int, float] = {}
    bufs: dict[int, bytes] = {}
    lat: list[float] = []
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.setblocking(False)
        socks.append(s)
        bufs[i] = b""
        sel.register(s, selectors.EVENT_READ, i)
    began = time.perf_counter()
    end = began + duration
    for i, s in enumerate(socks):
        sent_at[i] = time.perf_counter()
        s.send(request)
    open_requests = n
    while open_requests:
        for key, _ in sel.select(5):
            i = key.data
            data = socks[i].recv(65536)
            if not data:
                raise SystemExit("server closed a benchmark connection")
            bufs[i] += data
            while b"\n" in bufs[i]:
                _, bufs[i] = bufs[i].split(b"\n", 1)
                now = time.perf_counter()
                lat.append(now - sent_at[i])
                if now < end:
                    sent_at[i] = now
                    socks[i].send(request)
                else:
                    open_requests -= 1
    elapsed = time.perf_counter() - began
    for s in socks:
        s.close()
    return len(lat) / elapsed, lat


def _burst(path: str, request: bytes, n: int) -> tuple[int, float]:
    """Send `n` requests in one sendall (from a thread) and read answers: (answers, seconds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(10)
        began = time.perf_counter()
        sender = threading.Thread(target=s.sendall, args=(request * n,), daemon=True)
        sender.start()
        f = s.makefile("rb")
        answers = 0
        try:
            while answers < n and f.readline().endswith(b"\n"):
                answers += 1
        except TimeoutError:
            pass  # answers lost: the count says how many
        elapsed = time.perf_counter() - began
    return answers, elapsed


# The costliest log there is: every character a control character (six bytes in JSON), up to the
# ring buffer's bounds (2000 lines, 512 KiB).
NOISY_WORKLOAD = """import sys, time
for _ in range(1999):
    sys.stdout.write("\\x01" * 256 + "\\n")
print("ready", flush=True)
time.sleep(3600)
"""


def _hostile(tmp: str) -> None:
    """A runtime with a full log buffer, then 256 hostile connections at once."""
    workload = Path(tmp) / "noisy-app"
    workload.write_text(f"#!{sys.executable}\n{NOISY_WORKLOAD}")
    workload.chmod(0o755)
    spec = Path(tmp) / "noisy.json"
    spec.write_text(json.dumps({"workload": {"path": os.fspath(workload), "on_exit": "stay"}}))
    path = os.path.join(tmp, "noisy-rt", "agent.sock")
    rt = subprocess.Popen(
        [sys.executable, "-m", "eemini.guest.dev.devmode", "--spec-json", os.fspath(spec),
         "--socket", path, "--token", TOKEN],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    socks: list[socket.socket] = []
    try:
        _wait_socket(path, rt)
        logs = _request("logs", tail=2000)
        health = _request("health")
        deadline = time.monotonic() + 20
        while b'"ready"]' not in _ask(path, _request("logs", tail=1)):
            if time.monotonic() > deadline:
                raise SystemExit("the noisy workload did not fill the log buffer")
            time.sleep(0.05)
        answer = _ask(path, logs)
        before, _ = _rss_kib(rt.pid)
        # A quarter silent, a quarter slow-loris (a request that never ends, a byte at a time),
        # half with the token, each asking for 20 of the largest answers and reading none.
        for i in range(HOSTILE):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.setblocking(False)
            kind = i % 4
            if kind == 1:
                s.send(b'{"method": "health", "tok')
            elif kind >= 2:
                try:
                    s.send(logs * 20)
                except BlockingIOError:
                    pass
            socks.append(s)
        loris = socks[1::4]
        began = time.monotonic()
        health_lat: list[float] = []
        while time.monotonic() - began < 6:
            for s in loris:
                try:
                    s.send(b" ")
                except OSError:
                    pass
            t0 = time.perf_counter()
            ok = b'"ok":true' in _ask(path, health)
            health_lat.append(time.perf_counter() - t0 if ok else float("inf"))
            time.sleep(0.2)
        rss, hwm = _rss_kib(rt.pid)
        closed = sum(_closed(s) for s in socks)
        print(
            f"  largest logs answer {len(answer) / 1024:.0f} KiB; runtime with a full log buffer: "
            f"RSS {before / 1024:.1f} MiB"
        )
        print(
            f"  after {HOSTILE} hostile connections (64 silent, 64 slow-loris, 128 each asking for "
            f"20 such answers unread): RSS {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB), "
            f"{closed} of them closed by the runtime within 6 s; a client's health meanwhile: "
            f"p50 {_pct(health_lat, 50):.1f} ms, max {max(health_lat) * 1000:.1f} ms "
            f"({len(health_lat)} calls)"
        )
    finally:
        for s in socks:
            s.close()
        rt.terminate()
        rt.wait(20)


def _request(method: str, **params: object) -> bytes:
    return json.dumps({"method": method, "token": TOKEN, **params}).encode() + b"\n"


def _ask(path: str, request: bytes) -> bytes:
    """One request on a connection of its own; the answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(request)
        return s.makefile("rb").readline()


def _closed(s: socket.socket) -> bool:
    """True when the peer has closed `s` (its unread answers are skipped)."""
    try:
        while True:
            if not s.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def _row(name: str, rate: float, lat: list[float]) -> str:
    return f"  {name:<34} {rate:9.0f} req/s   p50 {_pct(lat, 50):6.2f} ms   p99 {_pct(lat, 99):6.2f} ms"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="eemini-bench-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps({"workload": {"path": "/bin/sleep", "args": ["3600"], "on_exit": "stay"}})
        )
        rt_sock = os.path.join(tmp, "rt", "agent.sock")
        echo_sock = os.path.join(tmp, "echo.sock")
        rt = subprocess.Popen(
            [sys.executable, "-m", "eemini.guest.dev.devmode", "--spec-json", os.fspath(spec),
             "--socket", rt_sock, "--token", TOKEN],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, echo_sock])
        try:
            _wait_socket(rt_sock, rt)
            _wait_socket(echo_sock, echo)
            health = json.dumps({"method": "health", "token": TOKEN}).encode() + b"\n"
            rd = base64.b64encode(b"benchmark nonce").decode()
            attest = (
                json.dumps({"method": "attest", "token": TOKEN, "report_data_b64": rd}).encode() + b"\n"
            )
            print(f"duration {DURATION:g} s per figure; servers and load generator share this machine")
            results = {}
            for label, n in (("1 client", 1), ("64 clients", 64)):
                for server, path in (("runtime health", rt_sock), ("echo server", echo_sock)):
                    if n == 1:
                        rate, lat = _one_client(path, health, DURATION)
                    else:
                        rate, lat = _many_clients(path, health, n, DURATION)
                    results[(server, n)] = rate
                    print(_row(f"{server}, {label}", rate, lat))
                ratio = results[("runtime health", n)] / results[("echo server", n)]
                print(f"  -> health/echo throughput ratio at {label}: {ratio:.2f} (target >= 0.5)")
            rate, lat = _one_client(rt_sock, attest, DURATION)
            print(_row("runtime attest (simulated), 1 client", rate, lat))
            rate_e, lat_e = _one_client(echo_sock, attest, DURATION)
            print(_row("echo server, same request, 1 client", rate_e, lat_e))
            for server, path in (("runtime", rt_sock), ("echo server", echo_sock)):
                answers, elapsed = _burst(path, health, BURST)
                print(
                    f"  {server + ', burst of health':<34} {answers:9d} of {BURST} answered in "
                    f"{elapsed:.2f} s ({answers / elapsed:.0f} req/s), one connection, one write"
                )
            rss, hwm = _rss_kib(rt.pid)
            erss, ehwm = _rss_kib(echo.pid)
            print(f"  runtime RSS {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB, target < 25 MiB)")
            print(f"  echo server RSS {erss / 1024:.1f} MiB (peak {ehwm / 1024:.1f} MiB)")
        finally:
            for proc in (rt, echo):
                proc.terminate()
                proc.wait(20)
        _hostile(tmp)
