"""What a relying party accepts: an immutable `Policy`, built with `PolicyBuilder` or read from JSON.

Every field is optional with a safe default; `None` means "not checked". New checks add a field
here, a row in `_FILE_KEYS`, and a named step in `verify.check_policy`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from eemini.tdx.collateral import TcbStatus
from eemini.tdx.errors import PolicyError
from eemini.tdx.guard import unique_keys
from eemini.tdx.measure import MeasureError, PredictedEvent

REPORT_DATA_SIZE = 64
MEASUREMENT_SIZE = 48


@dataclass(frozen=True, slots=True)
class Policy:
    """An explicit verification policy. The defaults are the safe ones."""

    # Exact 64-byte report data; shorter expectations are zero-padded by the builder.
    report_data: bytes | None = None
    # Accepted MRTD values (any of them); None accepts any MRTD.
    accepted_mr_td: frozenset[bytes] | None = None
    # Expected RTMR0..3; None in a slot leaves that register unchecked.
    rtmrs: tuple[bytes | None, bytes | None, bytes | None, bytes | None] = (None, None, None, None)
    # Debug TDs (any TUD bit of TD_ATTRIBUTES) can be read and written by the host: rejected.
    allow_debug: bool = False
    accepted_tcb_statuses: frozenset[TcbStatus] = frozenset({TcbStatus.UP_TO_DATE})
    # Without collateral the TCB status cannot be evaluated; accept that only when asked to.
    require_collateral: bool = True
    # The TD attribute checks dcap-qvl enforces; reported either way, enforced when True.
    require_sept_ve_disable: bool = True
    require_zero_mr_servicetd: bool = True
    reject_reserved_td_attributes: bool = True
    # Advisory IDs that reject a quote even when its TCB status is accepted.
    rejected_advisory_ids: frozenset[str] = field(default_factory=frozenset)
    # The image's predicted measurement events (docs/measurements.md): when set, a CC event log is
    # required, must replay to the quote's RTMRs, and must hold these events in order.
    expected_events: tuple[PredictedEvent, ...] | None = None
    # With expected events, the firmware that logged them must be pinned (accepted_mr_td); this
    # accepts any firmware instead, reported as the waived check "firmware-pinned".
    allow_any_firmware: bool = False
    # With expected events, the runtime event log must be given and bound to RTMR3; this accepts an
    # unbound or missing one instead (kernels without RTMR3 extension), reported as waived.
    allow_unbound_runtime_log: bool = False
    # Seconds: the oldest collateral accepted, by the verification time (TCB info and QE identity
    # by issueDate, the PCK CRL by thisUpdate; the root CA CRL, issued yearly, is exempt).
    max_collateral_age: int | None = None

    def replace(self, **changes: Any) -> Policy:
        return dataclasses.replace(self, **changes)


DEFAULT_POLICY = Policy()


def _bytes(name: str, value: str | bytes, size: int, pad: bool = False) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            raise PolicyError(f"{name} is not valid hex: {value!r}") from None
    if pad and len(value) < size:
        value = value.ljust(size, b"\0")
    if len(value) != size:
        raise PolicyError(f"{name} must be {size} bytes, got {len(value)}")
    return value


class PolicyBuilder:
    """Immutable builder: each setter validates, returns a new builder, and may be used only once."""

    __slots__ = ("_changes",)

    def __init__(self, _changes: dict[str, Any] | None = None) -> None:
        self._changes: dict[str, Any] = dict(_changes or {})

    def _set(self, name: str, value: Any) -> PolicyBuilder:
        if name in self._changes:
            raise PolicyError(f"{name} may only be set once")
        return PolicyBuilder({**self._changes, name: value})

    def has(self, name: str) -> bool:
        """Whether setting `name` was asked for (a policy file's key, or a setter's call)."""
        return name in self._changes

    def report_data(self, value: str | bytes) -> PolicyBuilder:
        return self._set("report_data", _bytes("report_data", value, REPORT_DATA_SIZE, pad=True))

    def accepted_mr_td(self, values: Iterable[str | bytes]) -> PolicyBuilder:
        got = frozenset(_bytes("mr_td", v, MEASUREMENT_SIZE) for v in values)
        if not got:
            raise PolicyError("accepted_mr_td needs at least one value")
        return self._set("accepted_mr_td", got)

    def rtmr(self, index: int, value: str | bytes) -> PolicyBuilder:
        if index not in range(4):
            raise PolicyError(f"RTMR index must be 0..3, got {index}")
        return self._set(f"rtmr{index}", _bytes(f"rtmr{index}", value, MEASUREMENT_SIZE))

    def allow_debug(self, allow: bool = True) -> PolicyBuilder:
        return self._set("allow_debug", _bool("allow_debug", allow))

    def accepted_tcb_statuses(self, statuses: Iterable[str | TcbStatus]) -> PolicyBuilder:
        out = set()
        for s in statuses:
            try:
                status = TcbStatus(s)
            except ValueError:
                known = ", ".join(t.value for t in TcbStatus)
                raise PolicyError(f"unknown TCB status {s!r} (known: {known})") from None
            if status == TcbStatus.REVOKED:
                raise PolicyError("a Revoked TCB can never be accepted")
            out.add(status)
        if not out:
            raise PolicyError("accepted_tcb_statuses needs at least one status")
        return self._set("accepted_tcb_statuses", frozenset(out))

    def require_collateral(self, require: bool = True) -> PolicyBuilder:
        return self._set("require_collateral", _bool("require_collateral", require))

    def require_sept_ve_disable(self, require: bool = True) -> PolicyBuilder:
        return self._set("require_sept_ve_disable", _bool("require_sept_ve_disable", require))

    def require_zero_mr_servicetd(self, require: bool = True) -> PolicyBuilder:
        return self._set("require_zero_mr_servicetd", _bool("require_zero_mr_servicetd", require))

    def reject_reserved_td_attributes(self, reject: bool = True) -> PolicyBuilder:
        return self._set("reject_reserved_td_attributes", _bool("reject_reserved_td_attributes", reject))

    def rejected_advisory_ids(self, ids: Iterable[str]) -> PolicyBuilder:
        values = frozenset(ids)
        if not all(isinstance(i, str) and i for i in values):
            raise PolicyError("rejected_advisory_ids must be non-empty strings")
        return self._set("rejected_advisory_ids", values)

    def expected_events(self, events: Iterable[PredictedEvent]) -> PolicyBuilder:
        got = tuple(events)
        if not got:
            raise PolicyError("expected_events needs at least one event")
        return self._set("expected_events", got)

    def allow_any_firmware(self, allow: bool = True) -> PolicyBuilder:
        return self._set("allow_any_firmware", _bool("allow_any_firmware", allow))

    def allow_unbound_runtime_log(self, allow: bool = True) -> PolicyBuilder:
        return self._set("allow_unbound_runtime_log", _bool("allow_unbound_runtime_log", allow))

    def max_collateral_age(self, value: int | str) -> PolicyBuilder:
        return self._set("max_collateral_age", _duration("max_collateral_age", value))

    def build(self) -> Policy:
        changes = dict(self._changes)
        rtmrs = [changes.pop(f"rtmr{i}", None) for i in range(4)]
        policy = Policy(**changes)
        if any(r is not None for r in rtmrs):
            policy = policy.replace(rtmrs=tuple(rtmrs))
        return policy


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{name} must be true or false, got {value!r}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(name: str, value: object) -> int:
    """Seconds, from a positive integer or a string such as "7d", "12h", "30m", "90s"."""
    if isinstance(value, str) and value[-1:] in _UNITS and value[:-1].isdigit() and value[:-1].isascii():
        value = int(value[:-1]) * _UNITS[value[-1]]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolicyError(
            f'{name} must be a positive number of seconds, or a string like "7d" (d, h, m or s), '
            f"got {value!r}"
        )
    return value


def _str_list(name: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{name} must be a list of strings")
    return [str(v) for v in value]


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{name} must be a hex string")
    return value


# Policy file key -> how it applies to a builder. One row per key; unknown keys are refused.
_FILE_KEYS: dict[str, Callable[[PolicyBuilder, object], PolicyBuilder]] = {
    "report_data": lambda b, v: b.report_data(_str("report_data", v)),
    "mr_td": lambda b, v: b.accepted_mr_td(_str_list("mr_td", v)),
    "rtmr0": lambda b, v: b.rtmr(0, _str("rtmr0", v)),
    "rtmr1": lambda b, v: b.rtmr(1, _str("rtmr1", v)),
    "rtmr2": lambda b, v: b.rtmr(2, _str("rtmr2", v)),
    "rtmr3": lambda b, v: b.rtmr(3, _str("rtmr3", v)),
    "allow_debug": lambda b, v: b.allow_debug(_bool("allow_debug", v)),
    "accepted_tcb_statuses": lambda b, v: b.accepted_tcb_statuses(_str_list("accepted_tcb_statuses", v)),
    "require_collateral": lambda b, v: b.require_collateral(_bool("require_collateral", v)),
    "require_sept_ve_disable": lambda b, v: b.require_sept_ve_disable(
        _bool("require_sept_ve_disable", v)
    ),
    "require_zero_mr_servicetd": lambda b, v: b.require_zero_mr_servicetd(
        _bool("require_zero_mr_servicetd", v)
    ),
    "reject_reserved_td_attributes": lambda b, v: b.reject_reserved_td_attributes(
        _bool("reject_reserved_td_attributes", v)
    ),
    "rejected_advisory_ids": lambda b, v: b.rejected_advisory_ids(_str_list("rejected_advisory_ids", v)),
    "expected_events": lambda b, v: b.expected_events(_events("expected_events", v)),
    "allow_any_firmware": lambda b, v: b.allow_any_firmware(_bool("allow_any_firmware", v)),
    "allow_unbound_runtime_log": lambda b, v: b.allow_unbound_runtime_log(
        _bool("allow_unbound_runtime_log", v)
    ),
    "max_collateral_age": lambda b, v: b.max_collateral_age(_duration("max_collateral_age", v)),
}


def _events(name: str, value: object) -> list[PredictedEvent]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PolicyError(f"{name} must be a list of event objects (as in manifest.json)")
    try:
        return [PredictedEvent.from_json(v) for v in value]
    except MeasureError as e:
        raise PolicyError(f"{name}: {e}") from None


# A key twice in one object: the file says two things, and JSON parsers disagree on which wins.
_unique_keys = unique_keys(lambda key: PolicyError(f"policy key {key!r} appears twice"))


def policy_builder_from_json(text: str | bytes) -> PolicyBuilder:
    """A builder holding a JSON policy file's settings (so callers may add what the file lacks)."""
    try:
        doc = json.loads(text, object_pairs_hook=_unique_keys)
    except PolicyError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PolicyError(f"policy is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError("policy must be a JSON object")
    builder = PolicyBuilder()
    for key, value in doc.items():
        if key not in _FILE_KEYS:
            raise PolicyError(f"unknown policy key {key!r} (known: {', '.join(_FILE_KEYS)})")
        builder = _FILE_KEYS[key](builder, value)
    return builder


def policy_from_json(text: str | bytes) -> Policy:
    return policy_builder_from_json(text).build()
