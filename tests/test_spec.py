"""enclave.toml -> canonical JSON, and the errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eemini.guest.spec import EnclaveSpec, OnExit, RestartPolicy, SpecError, loads
from eemini.log import UserError
from eemini.spec import load_spec, parse_spec

FULL = """
[workload]
path = "build/app"
args = ["--port", "8080"]
env = { LOG_LEVEL = "info", A = "1" }
restart = "always"
on_exit = "stay"
inherit_token = true
allow_env = ["UPSTREAM_URL"]
"""


def test_full_spec_resolves_to_canonical_json(tmp_path: Path) -> None:
    spec = parse_spec(FULL, tmp_path)
    w = spec.workload
    assert w.path == f"{tmp_path}/build/app"
    assert w.argv == [f"{tmp_path}/build/app", "--port", "8080"]
    assert w.restart is RestartPolicy.ALWAYS and w.on_exit is OnExit.STAY
    expected = (
        '{"version":1,"workload":{"allow_env":["UPSTREAM_URL"],"args":["--port","8080"],'
        '"env":{"A":"1","LOG_LEVEL":"info"},"inherit_token":true,"on_exit":"stay",'
        f'"path":"{tmp_path}/build/app","restart":"always"}}}}'
    )
    assert spec.canonical_json().decode() == expected
    assert loads(spec.canonical_json()) == spec


def test_defaults(tmp_path: Path) -> None:
    spec = parse_spec('[workload]\npath = "/bin/true"\n', tmp_path)
    assert spec.workload.to_dict() == {
        "path": "/bin/true",
        "args": [],
        "env": {},
        "restart": "on-failure",
        "on_exit": "poweroff",
        "inherit_token": False,
        "allow_env": [],
    }


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[workload]\npath = "a"\nrestart = "sometimes"',
            "workload.restart: expected one of always, on-failure, never, got 'sometimes'",
        ),
        (
            '[workload]\npath = "a"\nrestart = 1',
            "workload.restart: expected one of always, on-failure, never, got integer 1",
        ),
        (
            '[workload]\npath = "a"\non_exit = "reboot"',
            "workload.on_exit: expected one of poweroff, stay, got 'reboot'",
        ),
        (
            '[workload]\npath = "a"\nargs = ["--port", 8080]',
            "workload.args[1]: expected a string, got integer 8080",
        ),
        (
            '[workload]\npath = "a"\nargs = "--port"',
            "workload.args: expected an array of strings, got string '--port'",
        ),
        (
            '[workload]\npath = "a"\nenv = { PORT = 8080 }',
            "workload.env.PORT: expected a string, got integer 8080",
        ),
        (
            '[workload]\npath = "a"\nenv = { "BAD-NAME" = "x" }',
            "workload.env.BAD-NAME: 'BAD-NAME' is not a valid environment variable name",
        ),
        (
            '[workload]\npath = "a"\nenv = { EE_TOKEN = "x" }',
            "workload.env.EE_TOKEN: EE_TOKEN is set by the runtime and cannot be declared",
        ),
        (
            '[workload]\npath = "a"\ninherit_token = "yes"',
            "workload.inherit_token: expected a boolean, got string 'yes'",
        ),
        ('[workload]\npath = "a"\nallow_env = ["X", "X"]', "workload.allow_env[1]: X is listed twice"),
        (
            '[workload]\npath = "a"\nallow_env = ["1X"]',
            "workload.allow_env[0]: '1X' is not a valid environment variable name",
        ),
        (
            '[workload]\npath = "a"\nrestrat = "always"',
            "workload.restrat: unknown key "
            "(known: path, args, env, restart, on_exit, inherit_token, allow_env)",
        ),
        ('[workload]\npath = ""', "workload.path: must not be empty"),
        ("[workload]\nargs = []", "workload.path: missing (the workload binary to run)"),
        ('[work]\npath = "a"', "work: unknown key (known: workload)"),
        ("", "workload: missing table"),
        ('workload = "a"', "workload: expected a table, got string"),
        ('version = 2\n[workload]\npath = "a"', "version: expected 1, got 2"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(toml, tmp_path)
    assert str(e.value) == message


def test_toml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^enclave.toml: not valid TOML: "):
        parse_spec("[workload\n", tmp_path)


def test_guest_rejects_bad_json() -> None:
    with pytest.raises(SpecError, match=r"^spec: not a JSON document: "):
        loads(b"{")
    with pytest.raises(SpecError, match=r"^spec: expected a table, got array$"):
        loads(b"[]")
    with pytest.raises(SpecError, match=r"^workload.args: expected an array of strings, got null None$"):
        EnclaveSpec.from_dict(json.loads('{"workload": {"path": "/a", "args": null}}'))


def test_load_spec_checks_the_workload(tmp_path: Path) -> None:
    toml = tmp_path / "enclave.toml"
    with pytest.raises(UserError, match=r"enclave.toml: no such file$"):
        load_spec(toml)
    toml.write_text('[workload]\npath = "app"\n')
    with pytest.raises(
        UserError, match=rf"^{tmp_path}/enclave.toml: workload.path: {tmp_path}/app is not a file$"
    ):
        load_spec(toml)
    (tmp_path / "app").write_text("#!/bin/sh\n")
    with pytest.raises(UserError, match=r"is not executable$"):
        load_spec(toml)
    (tmp_path / "app").chmod(0o755)
    assert load_spec(toml).workload.path == f"{tmp_path}/app"
    toml.write_text('[workload]\npath = "app"\nrestart = "sometimes"\n')
    with pytest.raises(
        UserError, match=r"workload.restart: expected one of always, on-failure, never, got 'sometimes'"
    ):
        load_spec(toml)
