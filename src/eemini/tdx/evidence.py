"""The event-log half of verification: does the CC event log replay to the quote's RTMRs, and does it
hold exactly the image's predicted events and nothing that loads other code? (docs/measurements.md)

Independent of how the quote itself was verified: callers pass the quote's RTMR0..3 once the quote's
signature chain has been checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eemini.tdx.bootevents import BootCheck, check_boot_events
from eemini.tdx.ccel import ReplayMismatch, check_replay, describe_event, replay_rtmrs
from eemini.tdx.errors import VerificationError
from eemini.tdx.eventlog import EventLog, EventLogError, parse_event_log
from eemini.tdx.measure import MeasureError, PredictedEvent, Prediction
from eemini.tdx.runtime_log import RuntimeLogBinding, check_runtime_log


class EventLogInvalid(VerificationError):
    """The event log does not parse, or names registers a TD cannot extend."""

    check = "event-log"


# The key under which `eemini build` stores the prediction in manifest.json.
MANIFEST_KEY = "measurements"


@dataclass(frozen=True, slots=True)
class EventLogReport:
    """What the event log showed, once it replayed to the quote's RTMRs: the predicted events it
    matched and the allowlisted events around them (when a prediction was given), the runtime log's
    binding (when one was given), and whether the policy pinned RTMR0 (host configuration)."""

    log: EventLog
    boot: BootCheck | None
    runtime: RuntimeLogBinding | None
    rtmr0_pinned: bool = False

    def to_dict(self) -> dict[str, Any]:
        boot = self.boot
        return {
            "events": len(self.log.events),
            "matched": [
                {"predicted": p.to_json(), "event": e.number, "mr_index": e.register}
                for p, e in (boot.matched if boot else ())
            ],
            "allowed": [
                {"event": e.number, "mr_index": e.register, "group": g.value, "what": e.describe()}
                for e, g in (boot.allowed if boot else ())
            ],
            "rtmr0_pinned": self.rtmr0_pinned,
            "runtime_log": None if self.runtime is None else self.runtime.value,
        }

    def lines(self) -> list[str]:
        out = [f"event log: {len(self.log.events)} events replay to the quote's RTMR0..3"]
        if self.boot is not None:
            out.append(
                f"  exactly this image's events: {len(self.boot.matched)} predicted, "
                f"{len(self.boot.allowed)} allowlisted firmware events that load no code, nothing else"
            )
            for p, e in self.boot.matched:
                out.append(f"  {p.label()}: {describe_event(e)}")
        out.append(
            "RTMR0 (host configuration: TD HOB, ACPI tables, boot variables): "
            + ("pinned by the policy" if self.rtmr0_pinned else "not pinned by the policy")
        )
        if self.runtime is not None:
            out.append(f"runtime event log: {self.runtime.value} (RTMR3)")
        return out


def load_prediction(path: Path) -> Prediction:
    """The predicted events from a build's manifest.json (key "measurements") or from the output of
    `eemini measure --json`."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise MeasureError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, Mapping):
        raise MeasureError(f"{path} is not a JSON object")
    body: Any = doc.get(MANIFEST_KEY, doc)
    if not isinstance(body, Mapping) or "events" not in body:
        raise MeasureError(
            f"{path} holds no predicted measurement events (neither a manifest.json with "
            f"{MANIFEST_KEY!r} nor `eemini measure --json` output)"
        )
    return Prediction.from_json(body)


def check_event_log(
    rtmrs: Sequence[bytes],
    log_data: bytes,
    expected: Sequence[PredictedEvent] | None = None,
    runtime_events: Sequence[Mapping[str, object]] | None = None,
    *,
    rtmr0_pinned: bool = False,
) -> EventLogReport:
    """Replay the CC event log against the quote's RTMR0..2 (raises ReplayMismatch), then apply the
    exact-set rule with the predicted events (bootevents: raises UnexpectedEvent or EventsMissing),
    then replay the runtime log against RTMR3 (raises RuntimeLogMismatch). The firmware leaves
    RTMR3 alone; it belongs to the runtime log. A log that does not parse, or extends a register a
    TD cannot, raises EventLogInvalid."""
    try:
        log = parse_event_log(log_data)
        check_replay(log, rtmrs, registers=(0, 1, 2))
        start = replay_rtmrs(log)[3]
    except EventLogError as e:
        raise EventLogInvalid(f"the CC event log is not valid: {e}") from None
    boot = check_boot_events(log, expected, cc=True) if expected is not None else None
    runtime = None
    if runtime_events is not None:
        runtime = check_runtime_log(runtime_events, rtmrs[3], start=start)
    elif start != rtmrs[3]:
        raise ReplayMismatch(
            f"RTMR3 is {rtmrs[3].hex()}, not what the CC event log leaves there: it was extended "
            "after boot (by the runtime event log?); pass the runtime event log to check it"
        )
    return EventLogReport(log=log, boot=boot, runtime=runtime, rtmr0_pinned=rtmr0_pinned)
