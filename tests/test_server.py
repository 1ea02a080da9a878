"""The control socket against well-behaved and hostile clients, in a real runtime process."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import resource
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eemini.tdx.quote import parse_quote
from rtutil import TOKEN, RuntimeProc, read_json_line, wait_for, write_spec, write_workload


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProc]:
    tmp = tmp_path_factory.mktemp("server")
    workload = write_workload(
        tmp, "app", "import time\nprint('serving', flush=True)\ntime.sleep(3600)\n"
    )
    spec = write_spec(tmp, workload, restart="always", on_exit="stay")
    runtime = RuntimeProc(
        tmp, spec, "--idle-timeout", "1", "--auth-timeout", "1", "--request-timeout", "1"
    )
    yield runtime
    runtime.stop()
    assert TOKEN not in runtime.stderr()


def raw(rt: RuntimeProc, payload: bytes) -> dict[str, Any]:
    with rt.connect() as s:
        s.sendall(payload)
        return read_json_line(s)


def req(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def assert_alive(rt: RuntimeProc) -> None:
    answer = rt.call("health")
    assert answer["ok"] is True and answer["workloads"] == 1


def test_socket_is_private(rt: RuntimeProc) -> None:
    assert stat.S_IMODE(os.stat(rt.socket).st_mode) == 0o600


def test_health_is_wire_compatible(rt: RuntimeProc) -> None:
    answer = rt.call("health")
    assert answer["ok"] is True
    assert answer["attestation_type"] == "simulated"
    assert answer["workloads"] == 1
    assert isinstance(answer["uptime_secs"], int) and answer["uptime_secs"] >= 0


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b"{not json\n",
            (
                "request is not valid JSON: "
                "Expecting property name enclosed in double quotes at column 2",
                "bad_request",
            ),
        ),
        (b"\xff\xfe{}\n", ("request is not valid UTF-8 (bad byte at offset 0)", "bad_request")),
        (b"[1, 2]\n", ("request must be a JSON object, got an array", "bad_request")),
        (b'"health"\n', ("request must be a JSON object, got a string", "bad_request")),
        (
            req(method="health"),
            ('missing "token": every request carries the boot token', "unauthenticated"),
        ),
        (req(method="health", token="wrong"), ("wrong token", "unauthenticated")),
        (req(method="health", token=12345), ("wrong token", "unauthenticated")),
        (req(method="health", token=TOKEN[:-1]), ("wrong token", "unauthenticated")),
        (req(token=TOKEN), ('missing "method"', "bad_request")),
        (
            req(method=["health"], token=TOKEN),
            ('"method" must be a string, got an array', "bad_request"),
        ),
        (
            req(method="exec", token=TOKEN),
            (
                "unknown method 'exec' (known: attest, health, info, list, logs, restart, shutdown)",
                "unknown_method",
            ),
        ),
        (
            req(method="logs", token=TOKEN, tail="ten"),
            ("logs: tail must be an integer, got a string", "bad_params"),
        ),
        (
            req(method="logs", token=TOKEN, tail=True),
            ("logs: tail must be an integer, got a boolean", "bad_params"),
        ),
        (
            req(method="logs", token=TOKEN, tail=0),
            ("logs: tail must be between 1 and 2000, got 0", "bad_params"),
        ),
        (
            req(method="attest", token=TOKEN, report_data_b64=5),
            ("attest: report_data_b64 must be a string, got an integer", "bad_params"),
        ),
        (
            req(method="attest", token=TOKEN, report_data_b64="not base64!"),
            ("attest: report_data_b64 is not valid base64", "bad_params"),
        ),
        (
            req(method="attest", token=TOKEN, report_data_b64=base64.b64encode(bytes(65)).decode()),
            ("attest: report_data_b64 decodes to 65 bytes; the maximum is 64", "bad_params"),
        ),
        (
            req(method="health", token=TOKEN, verbose=True),
            ("health: unknown parameter 'verbose' (accepted: none)", "bad_params"),
        ),
        (
            req(method="logs", token=TOKEN, id="other"),
            ("logs: no workload 'other' (the one workload is 'app')", "not_found"),
        ),
        (b"[" * 60000 + b"\n", ("request is not valid JSON: nested too deeply", "bad_request")),
        (
            b'{"tail": ' + b"1" * 5000 + b"}\n",
            (
                "request is not valid JSON: Exceeds the limit (4300 digits) for integer string "
                "conversion: value has 5000 digits; "
                "use sys.set_int_max_str_digits() to increase the limit",
                "bad_request",
            ),
        ),
    ],
)
def test_bad_requests_get_clear_errors(
    rt: RuntimeProc, payload: bytes, expected: tuple[str, str]
) -> None:
    message, code = expected
    assert raw(rt, payload) == {"ok": False, "error": message, "code": code}
    assert_alive(rt)


def test_connection_survives_bad_requests(rt: RuntimeProc) -> None:
    with rt.connect() as s:
        s.sendall(b"garbage\n" + req(method="health", token="x") + req(method="health", token=TOKEN))
        assert read_json_line(s)["code"] == "bad_request"
        assert read_json_line(s)["code"] == "unauthenticated"
        assert read_json_line(s)["ok"] is True


def test_ten_megabyte_line_is_refused_and_closed(rt: RuntimeProc) -> None:
    with rt.connect() as s:
        try:
            s.sendall(b"x" * (10 * 1024 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed on us after its error line: expected
        answer = read_json_line(s)
        assert answer == {
            "ok": False,
            "error": "request line exceeds 65536 bytes; closing the connection",
            "code": "too_large",
        }
        assert_closed(s)
    assert_alive(rt)


def assert_closed(s: socket.socket) -> None:
    # Closing with unread input resets a unix socket peer instead of a clean EOF: both mean closed.
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass


def test_half_closed_connection_still_gets_its_answer(rt: RuntimeProc) -> None:
    with rt.connect() as s:
        s.sendall(req(method="health", token=TOKEN))
        s.shutdown(socket.SHUT_WR)
        assert read_json_line(s)["ok"] is True
        assert s.recv(100) == b""
    with rt.connect() as s:  # the last request without its newline counts too
        s.sendall(json.dumps({"method": "list", "token": TOKEN}).encode())
        s.shutdown(socket.SHUT_WR)
        assert read_json_line(s)["deployments"][0]["id"] == "app"
        assert s.recv(100) == b""
    with rt.connect() as s:  # and a connection closed without a word is just dropped
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    assert_alive(rt)


def trickle(s: socket.socket, data: bytes, interval: float = 0.1) -> threading.Thread:
    """Send `data` one byte every `interval` seconds from a thread, until done or refused."""

    def run() -> None:
        for i in range(len(data)):
            try:
                s.send(data[i : i + 1])
            except OSError:
                return
            time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def authenticated(rt: RuntimeProc) -> socket.socket:
    s = rt.connect()
    s.sendall(req(method="health", token=TOKEN))
    assert read_json_line(s)["ok"] is True
    return s


def test_deadlines_hold_however_slowly_bytes_arrive(rt: RuntimeProc) -> None:
    began = time.monotonic()
    silent = rt.connect()
    partial = rt.connect()
    partial.sendall(b'{"method": "hea')
    loris = rt.connect()  # never completes its first request, a byte every 0.1 s for 4 s
    authed = authenticated(rt)  # completes one request, then trickles the next
    idle = authenticated(rt)  # completes one request, then says nothing
    slow = [trickle(loris, b" " * 40), trickle(authed, b'{"method": "health", ' + b" " * 30)]
    for _ in range(5):
        assert_alive(rt)
    no_token = {
        "ok": False,
        "error": "no request with the right token within 1 s of connecting; closing the connection",
        "code": "auth_timeout",
    }
    expected = [
        (silent, no_token),
        (partial, no_token),
        (loris, no_token),
        (
            authed,
            {
                "ok": False,
                "error": "request not complete 1 s after its first byte; closing the connection",
                "code": "request_timeout",
            },
        ),
        (idle, {"ok": False, "error": "connection idle for 1 s; closing it", "code": "idle_timeout"}),
    ]
    for s, answer in expected:
        assert read_json_line(s) == answer
        assert_closed(s)
    # Closed at their deadlines (about 1 s), not when the trickling stopped (4 s).
    assert time.monotonic() - began < 2.5
    for thread in slow:
        thread.join()
    for s, _ in expected:
        s.close()
    assert_alive(rt)


def test_two_hundred_concurrent_clients(rt: RuntimeProc) -> None:
    socks = [rt.connect() for _ in range(200)]
    try:
        for s in socks:
            s.setblocking(False)
        sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            s.sendall(req(method="health", token=TOKEN))
            sel.register(s, selectors.EVENT_READ, i)
        answers: dict[int, bytes] = {}
        bufs = [b""] * 200
        deadline = time.monotonic() + 30
        while len(answers) < 200 and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                i = key.data
                bufs[i] += socks[i].recv(4096)
                if bufs[i].endswith(b"\n"):
                    answers[i] = bufs[i]
                    sel.unregister(socks[i])
        assert len(answers) == 200
        assert all(json.loads(a)["ok"] is True for a in answers.values())
    finally:
        for s in socks:
            s.close()
    assert_alive(rt)


def test_client_that_never_reads_does_not_block_others(rt: RuntimeProc) -> None:
    hog = rt.connect()
    hog.setblocking(False)
    sent = 0
    line = req(method="list", token=TOKEN)
    try:
        for _ in range(20000):
            sent += hog.send(line)
    except BlockingIOError:
        pass  # the server stopped reading from us: backpressure
    assert sent > 0
    for _ in range(3):
        assert_alive(rt)
    hog.close()
    assert_alive(rt)


def test_attest_report_data_round_trip(rt: RuntimeProc) -> None:
    data = b"exactly these bytes"
    answer = rt.call("attest", report_data_b64=base64.b64encode(data).decode())
    assert answer["ok"] is True
    assert answer["attestation_type"] == "simulated"
    assert answer["quote_format"] == "tdx"
    assert answer["report_data_b64"] == base64.b64encode(data).decode()
    assert answer["report_data_len"] == len(data)
    assert isinstance(answer["events"], list) and answer["events"][-1]["kind"] == "separator"
    quote = base64.b64decode(answer["quote_b64"])
    assert parse_quote(quote).report.report_data == data + bytes(64 - len(data))


@pytest.mark.parametrize(
    ("params", "data"),
    [
        ({"nonce": "deadbeef"}, bytes.fromhex("deadbeef")),
        ({"nonce": base64.b64encode(b"freshness").decode()}, b"freshness"),
        ({"report_data_b64": base64.b64encode(b"\x01" * 32).decode(), "nonce": "00"}, b"\x01" * 32),
        ({}, b""),
        ({"report_data_b64": base64.b64encode(b"\xaa" * 64).decode()}, b"\xaa" * 64),
    ],
)
def test_attest_legacy_nonce_and_defaults(rt: RuntimeProc, params: dict[str, str], data: bytes) -> None:
    answer = rt.call("attest", **params)
    assert answer["ok"] is True, answer
    assert base64.b64decode(answer["report_data_b64"]) == data
    assert answer["report_data_len"] == len(data)
    assert parse_quote(base64.b64decode(answer["quote_b64"])).report.report_data == data.ljust(64, b"\0")


def test_pipelined_attests_answer_in_order(rt: RuntimeProc) -> None:
    with rt.connect() as s:
        payload = b"".join(
            req(method="attest", token=TOKEN, report_data_b64=base64.b64encode(bytes([i])).decode())
            for i in range(10)
        ) + req(method="health", token=TOKEN)
        s.sendall(payload)
        for i in range(10):
            answer = read_json_line(s)
            assert base64.b64decode(answer["report_data_b64"]) == bytes([i])
        assert "uptime_secs" in read_json_line(s)


def test_ten_thousand_pipelined_requests_are_all_answered_in_order(rt: RuntimeProc) -> None:
    # Every request is a health request; the odd ones carry a parameter that names them, so
    # their errors show the order of the answers.
    n = 10_000
    payload = b"".join(
        req(method="health", token=TOKEN, **({f"n{i}": 1} if i % 2 else {})) for i in range(n)
    )
    reference = rt.call("health")
    with rt.connect(timeout=30) as s:
        # One sendall, from a thread: the server stops reading while its answers are unread.
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        f = s.makefile("rb")
        answers = [json.loads(f.readline()) for _ in range(n)]
        sender.join()
        s.shutdown(socket.SHUT_WR)
        assert f.read() == b""  # nothing more: exactly one answer per request
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer == {
                "ok": False,
                "error": f"health: unknown parameter 'n{i}' (accepted: none)",
                "code": "bad_params",
            }
        else:
            assert answer == {**reference, "uptime_secs": answer["uptime_secs"]}
    assert_alive(rt)
    assert "Traceback" not in rt.stderr()


RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")


def test_list_answers_in_the_original_shape(rt: RuntimeProc) -> None:
    path = rt.call("info")["spec"]["workload"]["path"]
    (dep,) = rt.call("list")["deployments"]
    run = dep["runs"][-1]
    started = dep["started_at"]
    assert dep == {
        # The original runtime's DeploymentInfo, field for field (no error_message unless failed).
        "id": "app",
        "pid": run["pid"],
        "app_name": "app",
        "source": path,
        "status": "running",
        "started_at": started,
        # Ours.
        "state": "running",
        "started_at_unix": run["started_at"],
        "path": path,
        "restarts": 0,
        "restart_policy": "always",
        "on_exit": "stay",
        "last_exit": None,
        "runs": [run],
    }
    assert isinstance(run["pid"], int) and run["ended_at"] is None
    assert RFC3339_MS.fullmatch(started), started
    assert round(datetime.datetime.fromisoformat(started).timestamp(), 3) == run["started_at"]
    # A client that takes the id from `list` reads that deployment's logs with it, as from
    # the original runtime (one request per connection, then it half-closes).
    with rt.connect() as s:
        s.sendall(req(method="logs", token=TOKEN, id=dep["id"]))
        s.shutdown(socket.SHUT_WR)
        logs = read_json_line(s)
        assert s.recv(100) == b""
    lines = [f"app: started run 0 as pid {run['pid']}", "serving"]
    assert logs["lines"] == lines
    assert (logs["dropped"], logs["omitted"]) == (0, 0)


@pytest.mark.parametrize(
    ("body", "extra", "state", "status"),
    [
        ("print('done')\n", (), "exited", "completed"),
        ("import sys\nsys.exit(3)\n", ("--backoff", "30,2,30,10"), "backoff", "deploying"),
    ],
)
def test_list_status_words(
    tmp_path: Path, body: str, extra: tuple[str, ...], state: str, status: str
) -> None:
    restart = "never" if status == "completed" else "on-failure"
    workload = write_workload(tmp_path, "app", body)
    spec = write_spec(tmp_path, workload, restart=restart, on_exit="stay")
    rt2 = RuntimeProc(tmp_path, spec, *extra)
    try:
        wait_for(lambda: rt2.call("list")["deployments"][0]["state"] == state, what=state)
        (dep,) = rt2.call("list")["deployments"]
        assert dep["status"] == status
        assert "error_message" not in dep
        assert dep["started_at_unix"] == dep["runs"][-1]["started_at"]
    finally:
        rt2.stop()


def test_info_and_list(rt: RuntimeProc) -> None:
    info = rt.call("info")
    assert info["ok"] is True
    assert info["spec"]["workload"]["restart"] == "always"
    assert info["spec_digest"].startswith("sha256:")
    assert [e["kind"] for e in info["events"]] == ["spec", "workload", "separator"]
    assert info["limits"] == {"max_line": 65536, "max_connections": 256, "idle_timeout_secs": 1.0}
    (dep,) = rt.call("list")["deployments"]
    assert dep["status"] == "running" and dep["restart_policy"] == "always"
    logs = rt.call("logs", tail=1)
    assert logs["lines"] == ["serving"]


def test_connection_limit(tmp_path: Path) -> None:
    workload = write_workload(tmp_path, "app", "import time\ntime.sleep(3600)\n")
    rt2 = RuntimeProc(tmp_path, write_spec(tmp_path, workload, on_exit="stay"), "--max-connections", "4")
    try:
        held = [authenticated(rt2) for _ in range(4)]
        with rt2.connect() as extra:
            assert read_json_line(extra) == {
                "ok": False,
                "error": "too many connections (limit 4); try again",
                "code": "busy",
            }
        for s in held:
            s.close()
        # Until the runtime has seen the closes, a new connection is still one too many.
        wait_for(lambda: rt2.call("health")["ok"] is True, what="health after the closes")
    finally:
        rt2.stop()


def test_hostile_connections_do_not_lock_out_a_client(tmp_path: Path) -> None:
    workload = write_workload(tmp_path, "app", "import time\ntime.sleep(3600)\n")
    spec = write_spec(tmp_path, workload, on_exit="stay")
    rt2 = RuntimeProc(tmp_path, spec, "--max-connections", "256", "--auth-timeout", "3")
    try:
        began = time.monotonic()
        silent = [rt2.connect() for _ in range(128)]
        loris = [rt2.connect() for _ in range(128)]
        # Each slow-loris sends one more byte of a request every 0.1 s, until it is refused.
        slow = [trickle(s, b'{"method": "health", "token": "' + b"x" * 60) for s in loris]
        time.sleep(0.5)
        asked = time.monotonic()
        with rt2.connect() as client:
            client.sendall(req(method="health", token=TOKEN))
            answer = read_json_line(client)
        assert answer["ok"] is True and answer["workloads"] == 1
        assert time.monotonic() - asked < 1.0  # served at once, not when the hostile ones expire
        # The oldest connection without the token made room for it.
        assert read_json_line(silent[0]) == {
            "ok": False,
            "error": "connection limit (256) reached: closing the oldest connection that has "
            "not sent the right token",
            "code": "evicted",
        }
        # The other 255 are dropped at their deadline, trickling or not.
        no_token = {
            "ok": False,
            "error": "no request with the right token within 3 s of connecting; closing the connection",
            "code": "auth_timeout",
        }
        for s in silent[1:] + loris:
            assert read_json_line(s) == no_token
            assert_closed(s)
        assert time.monotonic() - began < 5.0
        for thread in slow:
            thread.join()
        for s in silent + loris:
            s.close()
        assert rt2.call("health")["ok"] is True
        assert "Traceback" not in rt2.stderr()
    finally:
        rt2.stop()


def test_out_of_file_descriptors(tmp_path: Path) -> None:
    workload = write_workload(tmp_path, "app", "import time\ntime.sleep(3600)\n")
    spec = write_spec(tmp_path, workload, on_exit="stay")
    rt2 = RuntimeProc(tmp_path, spec)
    resource.prlimit(rt2.proc.pid, resource.RLIMIT_NOFILE, (48, 48))
    try:
        held = [rt2.connect() for _ in range(80)]  # more than the runtime has fds for
        time.sleep(1.0)
        for s in held:
            s.close()
        assert rt2.call("health")["ok"] is True  # waits in the backlog until fds are free
        failures = rt2.stderr().count("control socket: accept failed: Too many open files")
        assert 1 <= failures <= 20  # it backs off instead of spinning on the listener
    finally:
        rt2.stop()


def test_many_concurrent_attests_all_succeed(rt: RuntimeProc) -> None:
    socks = [rt.connect() for _ in range(60)]
    try:
        for i, s in enumerate(socks):
            s.sendall(
                req(method="attest", token=TOKEN, report_data_b64=base64.b64encode(bytes([i])).decode())
            )
        for i, s in enumerate(socks):
            answer = read_json_line(s)
            assert answer["ok"] is True, answer
            assert parse_quote(base64.b64decode(answer["quote_b64"])).report.report_data[:2] == bytes(
                [i, 0]
            )
    finally:
        for s in socks:
            s.close()


KNOWN_CODES = {"bad_request", "unauthenticated", "unknown_method", "bad_params", "not_found"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_fuzzed_lines_get_a_clean_error(rt: RuntimeProc, line: bytes) -> None:
    line = line.replace(b"\n", b" ")
    if not line.strip():
        return  # blank lines are skipped, by design
    answer = raw(rt, line + b"\n")
    assert answer["ok"] is False
    assert answer["code"] in KNOWN_CODES
    assert isinstance(answer["error"], str) and answer["error"]


JSON_VALUES = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["health", "attest", "list", "logs", "info", "nope"]) | st.text(max_size=8),
    params=st.dictionaries(
        st.sampled_from(["tail", "id", "report_data_b64", "nonce", "extra"]) | st.text(max_size=6),
        JSON_VALUES | st.lists(JSON_VALUES, max_size=3),
        max_size=3,
    ),
)
def test_fuzzed_authenticated_requests(rt: RuntimeProc, method: str, params: dict[str, Any]) -> None:
    if method in ("restart", "shutdown"):
        return  # side effects; covered by their own tests
    params.pop("token", None)
    params.pop("method", None)
    answer = rt.call(method, **params)
    if answer["ok"] is not True:
        assert answer["code"] in KNOWN_CODES, answer
    assert_alive(rt)
