"""The runtime event log: what the runtime accepted before the workload started, in order.

PID 1 (and dev mode) record the spec digest, the workload digest, every accepted boot-config value
(as source/key/value digest) and a separator, once, before the workload starts and before any
other thread runs; `attest` and `info` return the list, which nothing changes afterwards. Each
event is handed to `measure` (RTMR3 extension, where the kernel offers it) in order, so the order
of the events is the order of the extensions.
"""

from __future__ import annotations

import hashlib
import time

from eemini.guest.record import record
from eemini.guest.rtmr import MEASURED_FIELDS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from eemini.guest.bootconfig import Setting


@record
class Event:
    seq: int
    kind: str  # "spec", "workload", "config" or "separator"
    source: str  # who supplied it: "image", "cmdline", "config-disk", ...
    key: str
    digest: str  # "sha384:<hex>"
    time: float

    def to_dict(self) -> dict[str, object]:
        """The measured fields (eemini.guest.rtmr), then the time to the millisecond."""
        return {**{name: getattr(self, name) for name in MEASURED_FIELDS}, "time": round(self.time, 3)}


def sha384_digest(data: bytes) -> str:
    return "sha384:" + hashlib.sha384(data).hexdigest()


def boot_log(
    measure: Callable[[Event], None],
    source: str,
    spec_json: bytes,
    workload: tuple[str, bytes] | None,
    settings: Iterable[Setting] = (),
    *,
    sealed_by: str,
) -> tuple[Event, ...]:
    """What the runtime accepted before the workload starts, in order: the spec, the workload
    binary (path and bytes; None when it cannot be read), each accepted boot-config value; then
    the separator."""
    entries = [("spec", source, "spec.json", sha384_digest(spec_json))]
    if workload is not None:
        entries.append(("workload", source, workload[0], sha384_digest(workload[1])))
    entries += [("config", s.source, s.key, s.digest) for s in settings]
    entries.append(("separator", sealed_by, "", sha384_digest(b"")))
    events = tuple(Event(seq, *entry, time.time()) for seq, entry in enumerate(entries))
    for event in events:
        measure(event)
    return events
