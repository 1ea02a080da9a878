"""The demo workload (examples/attest-echo): its SHA-512 against hashlib, its protocol against a
control socket stand-in that checks what a real runtime would check."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

SOURCE = REPO / "examples" / "attest-echo" / "attest-echo.c"


@pytest.fixture(scope="session")
def attest_echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    out = tmp_path_factory.mktemp("attest-echo") / "attest-echo"
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            os.fspath(out),
            os.fspath(SOURCE),
        ],
        check=True,
    )
    return out


@pytest.mark.parametrize("length", [0, 1, 3, 111, 112, 113, 127, 128, 129, 239, 240, 1000])
def test_sha512_matches_hashlib(attest_echo: Path, length: int) -> None:
    data = bytes((i * 7 + length) & 0xFF for i in range(length))
    proc = subprocess.run(
        [os.fspath(attest_echo), "--sha512", data.hex()], capture_output=True, text=True, check=True
    )
    assert proc.stdout == hashlib.sha512(data).hexdigest() + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_runtime(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, object]]]]:
    path = tmp_path / "agent.sock"
    seen: list[dict[str, object]] = []
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.fspath(path))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                request = json.loads(f.readline())
                seen.append(request)
                data = base64.b64decode(str(request["report_data_b64"]))
                answer = {"ok": True, "quote_b64": base64.b64encode(b"Q" + data).decode(), "events": []}
                f.write(json.dumps(answer).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    yield path, seen
    srv.close()


def _ask(port: int, line: bytes) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        f = s.makefile("rb")
        result: dict[str, object] = json.loads(f.readline())
        return result


def test_serves_quotes_bound_to_the_nonce(
    attest_echo: Path, fake_runtime: tuple[Path, list[dict[str, object]]]
) -> None:
    sock, seen = fake_runtime
    port = _free_port()
    token = "ab" * 32
    env = {"EE_TOKEN": token, "EE_SOCKET_PATH": os.fspath(sock)}
    proc = subprocess.Popen(
        [os.fspath(attest_echo), str(port)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"attest-echo: listening on port {port}\n"
        nonce = bytes(range(40))
        answer = _ask(port, nonce.hex().encode() + b"\n")
        digest = hashlib.sha512(nonce).digest()
        assert answer == {
            "ok": True,
            "nonce": nonce.hex(),
            "report_data": digest.hex(),
            "attest": {"ok": True, "quote_b64": base64.b64encode(b"Q" + digest).decode(), "events": []},
        }
        assert seen == [
            {"method": "attest", "token": token, "report_data_b64": base64.b64encode(digest).decode()}
        ]
        assert _ask(port, b"xyz\n") == {
            "ok": False,
            "error": "the nonce must be an even number of hex digits",
        }
        assert _ask(port, b"AB" * 600 + b"\n") == {
            "ok": False,
            "error": "send one line: a hex nonce of at most 1024 hex digits",
        }
        assert _ask(port, b"00ff\r\n")["nonce"] == "00ff"
        assert proc.stdout.readline() == "attest-echo: answered a 40-byte nonce with a quote\n"
    finally:
        proc.kill()
        proc.wait()


def test_without_token_says_why(attest_echo: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [os.fspath(attest_echo), str(port)], env={}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        assert _ask(port, b"00\n") == {
            "ok": False,
            "error": "EE_TOKEN is not set (the spec must say inherit_token = true)",
        }
    finally:
        proc.kill()
        proc.wait()
