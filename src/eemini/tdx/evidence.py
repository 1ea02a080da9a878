"""The event-log half of verification: does the CC event log replay to the quote's RTMRs, and do the
image's predicted events appear in it? (docs/measurements.md)

Independent of how the quote itself was verified: callers pass the quote's RTMR0..3 once the quote's
signature chain has been checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eemini.tdx.ccel import ReplayMismatch, check_replay, describe_event, replay_rtmrs
from eemini.tdx.eventlog import Event, EventLog, parse_event_log
from eemini.tdx.measure import MeasureError, PredictedEvent, Prediction, find_events
from eemini.tdx.runtime_log import RuntimeLogBinding, check_runtime_log

# The key under which `eemini build` stores the prediction in manifest.json.
MANIFEST_KEY = "measurements"


@dataclass(frozen=True, slots=True)
class EventLogReport:
    """What the event log showed, once it replayed to the quote's RTMRs."""

    log: EventLog
    matched: tuple[tuple[PredictedEvent, Event], ...]
    runtime: RuntimeLogBinding | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": len(self.log.events),
            "matched": [
                {"predicted": p.to_json(), "event": e.number, "mr_index": e.register}
                for p, e in self.matched
            ],
            "runtime_log": None if self.runtime is None else self.runtime.value,
        }

    def lines(self) -> list[str]:
        out = [f"event log: {len(self.log.events)} events replay to the quote's RTMR0..3"]
        for p, e in self.matched:
            out.append(f"  {p.label()}: {describe_event(e)}")
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
) -> EventLogReport:
    """Replay the CC event log against the quote's RTMR0..2 (raises ReplayMismatch), then look for
    the predicted events (raises EventsMissing), then replay the runtime log against RTMR3 (raises
    RuntimeLogMismatch). The firmware leaves RTMR3 alone; it belongs to the runtime log, which
    continues from whatever the CC log put there."""
    log = parse_event_log(log_data)
    check_replay(log, rtmrs, registers=(0, 1, 2))
    matched = find_events(log, expected, cc=True) if expected is not None else []
    runtime = None
    if runtime_events is not None:
        runtime = check_runtime_log(runtime_events, rtmrs[3], start=replay_rtmrs(log)[3])
    elif replay_rtmrs(log)[3] != rtmrs[3]:
        raise ReplayMismatch(
            f"RTMR3 is {rtmrs[3].hex()}, not what the CC event log leaves there: it was extended "
            "after boot (by the runtime event log?); pass the runtime event log to check it"
        )
    return EventLogReport(log=log, matched=tuple(matched), runtime=runtime)
