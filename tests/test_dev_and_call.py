"""`eemini dev`, `eemini call` and `eemini.client`, as a user and a workload would use them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from eemini.client import CallError, ClientError, connect
from eemini.commands.call import parse_params
from eemini.guest.dev.simulated import dev_root_pem
from eemini.log import UserError
from eemini.tdx.quote import parse_quote
from rtutil import wait_for, write_workload

EEMINI = [sys.executable, "-m", "eemini"]

WORKLOAD = f"""
import sys, time
sys.path.insert(0, {os.fspath(REPO / "src")!r})
from eemini.client import connect
with connect() as c:
    health = c.call("health")
print("workload sees", health["attestation_type"], health["workloads"], flush=True)
while True:
    time.sleep(1)
"""


class Dev:
    def __init__(self, tmp: Path) -> None:
        self.socket = os.fspath(tmp / "s" / "agent.sock")
        self.root_out = tmp / "root.pem"
        write_workload(tmp, "app", WORKLOAD)
        (tmp / "enclave.toml").write_text(
            '[workload]\npath = "app"\nrestart = "on-failure"\n'
            'on_exit = "poweroff"\ninherit_token = true\n'
        )
        self.stderr_path = tmp / "dev.stderr"
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        argv = [*EEMINI, "dev", "-f", os.fspath(tmp / "enclave.toml"), "--socket", self.socket]
        argv += ["--dev-root-out", os.fspath(self.root_out), "--grace", "2"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err
        )
        wait_for(lambda: "workload sees" in self.stderr(), what="workload to call the socket")

    def stderr(self) -> str:
        if self.proc.poll() is not None and "workload sees" not in self.stderr_path.read_text():
            raise AssertionError(self.stderr_path.read_text())
        return self.stderr_path.read_text()

    def call(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*EEMINI, "call", *args, "--socket", self.socket],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    d = Dev(tmp_path_factory.mktemp("dev"))
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_dev_tells_where_things_are(dev: Dev) -> None:
    err = dev.stderr()
    assert f"eemini dev: control socket {dev.socket}\n" in err
    assert f"eemini dev: token in {os.path.dirname(dev.socket)}/token " in err
    assert "[app] workload sees simulated 1" in err  # the workload used eemini.client with EE_TOKEN
    assert dev.root_out.read_bytes() == dev_root_pem()
    assert (Path(dev.socket).parent / "dev-root.pem").read_bytes() == dev_root_pem()


def test_call_prints_json(dev: Dev) -> None:
    proc = dev.call("health")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is True and answer["attestation_type"] == "simulated"
    proc = dev.call("attest", "nonce=00112233")
    quote = base64.b64decode(json.loads(proc.stdout)["quote_b64"])
    assert parse_quote(quote).report.report_data == bytes.fromhex("00112233").ljust(64, b"\0")
    proc = dev.call("logs", "tail=1")
    assert json.loads(proc.stdout)["lines"] == ["workload sees simulated 1"]


def test_call_failures(dev: Dev) -> None:
    proc = dev.call("logs", "tail=zero")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == "bad_params"
    assert proc.stderr == "eemini call: logs: logs: tail must be an integer, got a string (bad_params)\n"
    proc = dev.call("health", "--token", "nope")
    assert proc.returncode == 1
    assert proc.stderr == "eemini call: health: wrong token (unauthenticated)\n"
    proc = subprocess.run(
        [*EEMINI, "call", "health", "--socket", "/nonexistent/agent.sock", "--token", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "eemini call: error: cannot connect to /nonexistent/agent.sock: No such file or directory\n"
    )


def test_client_library(dev: Dev) -> None:
    token = (Path(dev.socket).parent / "token").read_text().strip()
    with connect(dev.socket, token) as c:
        assert c.call("list")["deployments"][0]["app_name"] == "app"
        with pytest.raises(CallError) as e:
            c.call("nope")
        assert e.value.code == "unknown_method"
        assert str(e.value).startswith("nope: unknown method 'nope'")
        assert token not in repr(c)
    with pytest.raises(ClientError, match=r"^no token: pass token= or set EE_TOKEN$"):
        connect(dev.socket, "")


def test_parse_params() -> None:
    assert parse_params(["tail=5", "nonce=1234", "id=7", "x:=[1, true]", "s=a=b"]) == {
        "tail": 5,
        "nonce": "1234",
        "id": "7",
        "x": [1, True],
        "s": "a=b",
    }
    with pytest.raises(UserError, match=r"^oops: expected KEY=VALUE or KEY:=JSON$"):
        parse_params(["oops"])
    with pytest.raises(UserError, match=r"^x:=\[: the value after := is not JSON$"):
        parse_params(["x:=["])


def test_second_runtime_on_the_same_socket_is_refused(dev: Dev, tmp_path: Path) -> None:
    token_file = Path(dev.socket).parent / "token"
    before = token_file.read_text()
    (tmp_path / "enclave.toml").write_text('[workload]\npath = "/bin/true"\n')
    argv = [*EEMINI, "dev", "-f", os.fspath(tmp_path / "enclave.toml"), "--socket", dev.socket]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"eemini dev: error: another runtime is serving {dev.socket}\n"
    assert token_file.read_text() == before
    assert dev.call("health").returncode == 0


def test_ctrl_c_stops_the_workload_cleanly(dev: Dev) -> None:
    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(15) == 0
    err = dev.stderr()
    assert "eemini: shutting down: SIGINT received" in err
    assert "eemini: app: run 0 (pid " in err and ") killed by SIGTERM" in err
    assert not os.path.exists(dev.socket)
    assert not (Path(dev.socket).parent / "token").exists()


def test_dev_reports_spec_errors(tmp_path: Path) -> None:
    (tmp_path / "enclave.toml").write_text('[workload]\npath = "app"\nrestart = "sometimes"\n')
    proc = subprocess.run(
        [*EEMINI, "dev", "-f", os.fspath(tmp_path / "enclave.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"eemini dev: error: {tmp_path}/enclave.toml: workload.restart: "
        "expected one of always, on-failure, never, got 'sometimes'\n"
    )


# --- the socket's directory: private, and nobody else can swap it ---

RULE = (
    "the socket's directory holds the token, so it must be yours with mode 0700, and no directory "
    "above it may be writable by anyone but you or root (sticky ones such as /tmp excepted)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")


def _dev_once(tmp: Path, socket_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`eemini dev` with a workload that exits at once (so does dev mode), umask 022."""
    (tmp / "enclave.toml").write_text(
        '[workload]\npath = "/bin/true"\nrestart = "never"\non_exit = "poweroff"\n'
    )
    argv = [*EEMINI, "dev", "-f", os.fspath(tmp / "enclave.toml"), "--socket", os.fspath(socket_path)]
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, umask=0o022, env={**os.environ, **env}
    )


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_dev_makes_missing_directories_private(tmp_path: Path) -> None:
    proc = _dev_once(tmp_path, tmp_path / "a" / "b" / "agent.sock")
    assert proc.returncode == 0, proc.stderr
    assert (_mode(tmp_path / "a"), _mode(tmp_path / "a" / "b")) == (0o700, 0o700)


def test_default_socket_is_under_a_private_directory_in_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eemini.guest.dev.devmode import default_socket

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # like /tmp
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", os.fspath(tmp))
    uid = os.getuid()
    assert default_socket() == f"{tmp}/eemini-{uid}/eemini/agent.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket() == "/run/user/1000/eemini/agent.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    proc = subprocess.run(
        [*EEMINI, "dev", "-f", os.fspath(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1  # no spec: the directory is not even made
    assert not (tmp / f"eemini-{uid}").exists()
    (tmp_path / "enclave.toml").write_text(
        '[workload]\npath = "/bin/true"\nrestart = "never"\non_exit = "poweroff"\n'
    )
    proc = subprocess.run(
        [*EEMINI, "dev", "-f", os.fspath(tmp_path / "enclave.toml")],
        capture_output=True,
        text=True,
        check=False,
        umask=0o022,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"eemini dev: control socket {tmp}/eemini-{uid}/eemini/agent.sock\n" in proc.stderr
    assert (_mode(tmp / f"eemini-{uid}"), _mode(tmp / f"eemini-{uid}" / "eemini")) == (0o700, 0o700)


@needs_root
def test_dev_refuses_a_directory_made_in_advance_by_someone_else(tmp_path: Path) -> None:
    # Someone made the predictable directory first (here: nobody, uid 65534), mode 0700 even.
    theirs = tmp_path / "eemini-0"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    proc = _dev_once(tmp_path, theirs / "agent.sock")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"eemini dev: error: {theirs} has owner uid 65534 and mode 0700 (you are uid 0): {RULE}\n"
    )
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("mode", [0o755, 0o700], ids=oct)
@needs_root
def test_dev_refuses_a_socket_directory_inside_someone_elses(tmp_path: Path, mode: int) -> None:
    # Whoever owns the directory above can rename ours away and put theirs in its place.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(mode)
    os.chown(theirs, 65534, 65534)
    proc = _dev_once(tmp_path, theirs / "s" / "agent.sock")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"eemini dev: error: {theirs}, above the socket's directory {theirs}/s, belongs to uid "
        f"65534 (you are uid 0): {RULE}\n"
    )
    assert os.listdir(theirs / "s") == []  # no token, no certificate, no socket


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757], ids=oct)
def test_dev_refuses_a_socket_directory_inside_a_writable_one(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    (shared / "s").mkdir(mode=0o700)
    proc = _dev_once(tmp_path, shared / "s" / "agent.sock")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"eemini dev: error: {shared}, above the socket's directory {shared}/s, has mode "
        f"{mode:04o}, writable by others: {RULE}\n"
    )
    assert os.listdir(shared / "s") == []


def test_dev_refuses_a_socket_directory_others_can_read(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o755)
    (tmp_path / "s").chmod(0o755)
    proc = _dev_once(tmp_path, tmp_path / "s" / "agent.sock")
    assert proc.returncode == 1
    uid = os.getuid()
    assert proc.stderr == (
        f"eemini dev: error: {tmp_path}/s has owner uid {uid} and mode 0755 (you are uid {uid}): "
        f"{RULE}\n"
    )


def test_dev_accepts_a_socket_directory_in_a_sticky_one(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    proc = _dev_once(tmp_path, sticky / "s" / "agent.sock")
    assert proc.returncode == 0, proc.stderr
    assert _mode(sticky / "s") == 0o700
