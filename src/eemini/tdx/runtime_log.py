"""Checking the guest's runtime event log against RTMR3 (see docs/measurements.md, "Runtime
events"): where the kernel let PID 1 extend RTMR3, the register is the fold of the log's events."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum

from eemini.guest.rtmr import RTMR_SIZE, event_digest
from eemini.tdx.errors import VerificationError


class RuntimeLogMismatch(VerificationError):
    """RTMR3 was extended, but not with this runtime log."""

    check = "runtime-log"


def replay(events: Iterable[Mapping[str, object]], start: bytes = bytes(RTMR_SIZE)) -> bytes:
    """RTMR3 after extending `start` with each event in order, as PID 1 extended it
    (eemini.guest.rtmr); ValueError naming a measured field that an event lacks."""
    value = start
    for event in events:
        try:
            digest = event_digest(event)
        except KeyError as e:
            raise ValueError(f"runtime event lacks the field {e.args[0]!r}") from None
        value = hashlib.sha384(value + digest).digest()
    return value


class RuntimeLogBinding(StrEnum):
    BOUND = "bound"  # RTMR3 equals the replay: the quote vouches for every event
    UNBOUND = "unbound"  # RTMR3 untouched (no kernel support): the log is informational only


def check_runtime_log(
    events: Sequence[Mapping[str, object]], rtmr3: bytes, start: bytes = bytes(RTMR_SIZE)
) -> RuntimeLogBinding:
    """Replay the runtime log against a quote's RTMR3 (from `start`: the value the CC event log's
    own RTMR3 events left, normally zero); raise RuntimeLogMismatch naming where it diverged when
    RTMR3 was extended by something else than this log."""
    if len(rtmr3) != RTMR_SIZE:
        raise ValueError(f"RTMR3 must be {RTMR_SIZE} bytes, got {len(rtmr3)}")
    try:
        if replay(events, start) == rtmr3:
            return RuntimeLogBinding.BOUND if events else RuntimeLogBinding.UNBOUND
    except ValueError as e:
        raise RuntimeLogMismatch(f"runtime event log is malformed: {e}") from None
    if rtmr3 == start:
        return RuntimeLogBinding.UNBOUND
    for n in range(len(events)):
        if replay(events[:n], start) == rtmr3:
            first = events[n]
            raise RuntimeLogMismatch(
                f"RTMR3 matches the first {n} runtime events; event seq {first.get('seq')} "
                f"({first.get('kind')} {first.get('key')!r}) and later ones are not in the quote"
            )
    raise RuntimeLogMismatch(
        f"RTMR3 {rtmr3.hex()} is not the replay of the {len(events)} runtime events (nor any prefix): "
        "the log was changed, or RTMR3 was extended by something else"
    )
