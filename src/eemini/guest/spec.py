"""The resolved enclave spec: canonical JSON in, a frozen record out.

The host (`eemini.spec`) turns `enclave.toml` into the canonical JSON document; the guest reads
only that document (`/etc/eemini/spec.json` in the image). Both sides validate with
`EnclaveSpec.from_dict`, so an error reads the same wherever it is found, and always names the key.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping

from eemini.guest import wirejson
from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    E = TypeVar("E", bound=enum.StrEnum)

SPEC_VERSION = 1
# POSIX portable environment names; '=' and NUL would corrupt envp.
# Set by the runtime itself; a spec may not declare or allow them.
RESERVED_ENV = frozenset({"EE_TOKEN"})


class SpecError(ValueError):
    """The spec is malformed; the message names the offending key."""


class RestartPolicy(enum.StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"

    def restarts_after(self, *, failed: bool) -> bool:
        return self is RestartPolicy.ALWAYS or (self is RestartPolicy.ON_FAILURE and failed)


class OnExit(enum.StrEnum):
    POWEROFF = "poweroff"
    STAY = "stay"


# The TOML/JSON names of value types (bool before int: True is an int too).
_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
}


def type_name(value: object) -> str:
    """The TOML/JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    return next((name for t, name in _TYPE_NAMES.items() if isinstance(value, t)), type(value).__name__)


def _expect_str(key: str, value: object, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a string, got {type_name(value)} {value!r}")
    if not empty and not value:
        raise SpecError(f"{key}: must not be empty")
    if "\0" in value:
        raise SpecError(f"{key}: must not contain a NUL character")
    return value


def _expect_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{key}: expected a boolean, got {type_name(value)} {value!r}")
    return value


def _expect_enum(key: str, value: object, cls: type[E]) -> E:
    choices = ", ".join(m.value for m in cls)
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected one of {choices}, got {type_name(value)} {value!r}")
    try:
        return cls(value)
    except ValueError:
        raise SpecError(f"{key}: expected one of {choices}, got {value!r}") from None


def _expect_str_list(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SpecError(f"{key}: expected an array of strings, got {type_name(value)} {value!r}")
    return tuple(_expect_str(f"{key}[{i}]", v) for i, v in enumerate(value))


def _expect_env_name(key: str, value: str) -> None:
    if not (value.isascii() and value.isidentifier()):  # [A-Za-z_][A-Za-z0-9_]*
        raise SpecError(f"{key}: {value!r} is not a valid environment variable name")
    if value in RESERVED_ENV:
        raise SpecError(f"{key}: {value} is set by the runtime and cannot be declared")


def _reject_unknown(prefix: str, data: Mapping[str, object], known: tuple[str, ...]) -> None:
    for k in data:
        if k not in known:
            raise SpecError(f"{prefix}{k}: unknown key (known: {', '.join(known)})")


@record
class WorkloadSpec:
    path: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    on_exit: OnExit = OnExit.POWEROFF
    inherit_token: bool = False
    allow_env: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        return [self.path, *self.args]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "args": list(self.args),
            "env": dict(sorted(self.env.items())),
            "restart": self.restart.value,
            "on_exit": self.on_exit.value,
            "inherit_token": self.inherit_token,
            "allow_env": list(self.allow_env),
        }


_WORKLOAD_KEYS = ("path", "args", "env", "restart", "on_exit", "inherit_token", "allow_env")


@record
class EnclaveSpec:
    workload: WorkloadSpec

    @classmethod
    def from_dict(cls, data: object) -> EnclaveSpec:
        """Validate a parsed document; raises SpecError naming the key at fault."""
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a table, got {type_name(data)}")
        data = dict(data)
        # The canonical JSON carries its version; a TOML file may omit it.
        version = data.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION or isinstance(version, bool):
            raise SpecError(f"version: expected {SPEC_VERSION}, got {version!r}")
        _reject_unknown("", data, ("workload",))
        if "workload" not in data:
            raise SpecError("workload: missing table")
        w = data["workload"]
        if not isinstance(w, dict):
            raise SpecError(f"workload: expected a table, got {type_name(w)}")
        _reject_unknown("workload.", w, _WORKLOAD_KEYS)
        if "path" not in w:
            raise SpecError("workload.path: missing (the workload binary to run)")
        path = _expect_str("workload.path", w["path"], empty=False)
        args = _expect_str_list("workload.args", w.get("args", []))
        env_raw = w.get("env", {})
        if not isinstance(env_raw, dict):
            raise SpecError(f"workload.env: expected a table, got {type_name(env_raw)} {env_raw!r}")
        env: dict[str, str] = {}
        for k, v in sorted(env_raw.items()):
            _expect_env_name(f"workload.env.{k}", k)
            env[k] = _expect_str(f"workload.env.{k}", v)
        restart = _expect_enum("workload.restart", w.get("restart", "on-failure"), RestartPolicy)
        on_exit = _expect_enum("workload.on_exit", w.get("on_exit", "poweroff"), OnExit)
        inherit = _expect_bool("workload.inherit_token", w.get("inherit_token", False))
        allow = _expect_str_list("workload.allow_env", w.get("allow_env", []))
        for i, name in enumerate(allow):
            _expect_env_name(f"workload.allow_env[{i}]", name)
            if name in allow[:i]:
                raise SpecError(f"workload.allow_env[{i}]: {name} is listed twice")
        return cls(WorkloadSpec(path, args, env, restart, on_exit, inherit, allow))

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "workload": self.workload.to_dict()}

    def canonical_json(self) -> bytes:
        """Sorted keys, compact separators, UTF-8: the bytes whose digest the manifest records."""
        return canonical_json(self.to_dict())


def canonical_json(obj: object) -> bytes:
    return wirejson.dumps(obj, sort_keys=True).encode()


def loads(data: bytes) -> EnclaveSpec:
    """Parse the canonical JSON document (as found at /etc/eemini/spec.json)."""
    try:
        doc = wirejson.loads(data)
    except ValueError as e:  # not UTF-8, or not JSON
        raise SpecError(f"spec: not a JSON document: {e}") from None
    return EnclaveSpec.from_dict(doc)
