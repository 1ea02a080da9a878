"""The runtime event log: what the runtime accepted before the workload started, in order.

PID 1 appends the spec digest, the workload digest, every accepted boot-config value (as
source/key/value digest) and a separator; `attest` and `info` return the list. Appends go through
one lock so that extending RTMR3 alongside each event (done where the kernel offers it) stays
atomic with the append and the order of events equals the order of extensions.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from eemini.guest.bootconfig import Setting


@record
class Event:
    seq: int
    kind: str  # e.g. "spec", "workload", "config", "separator"
    source: str  # who supplied it: "image", "cmdline", "config-disk", ...
    key: str
    digest: str  # "sha384:<hex>" or "sha256:<hex>"
    time: float

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "source": self.source,
            "key": self.key,
            "digest": self.digest,
            "time": round(self.time, 3),
        }


def sha384_digest(data: bytes) -> str:
    return "sha384:" + hashlib.sha384(data).hexdigest()


class EventLog:
    """An append-only, ordered list of events; thread-safe."""

    def __init__(self, on_append: Callable[[Event], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._sealed = False
        # Called under the lock with each new event before it becomes visible (RTMR3 extension).
        self.on_append = on_append

    def append(self, kind: str, source: str, key: str, digest: str) -> Event:
        """Append one event; raises RuntimeError after `seal()`."""
        with self._lock:
            return self._append_locked(kind, source, key, digest)

    def _append_locked(self, kind: str, source: str, key: str, digest: str) -> Event:
        if self._sealed:
            raise RuntimeError(f"event log is sealed; cannot append {kind} {key}")
        event = Event(len(self._events), kind, source, key, digest, time.time())
        if self.on_append is not None:
            self.on_append(event)
        self._events.append(event)
        return event

    def append_data(self, kind: str, source: str, key: str, data: bytes) -> Event:
        """Append an event whose digest is SHA-384 of `data` (the value itself is not kept)."""
        return self.append(kind, source, key, sha384_digest(data))

    def record_boot(
        self,
        source: str,
        spec_json: bytes,
        workload: tuple[str, bytes] | None,
        settings: Iterable[Setting] = (),
        *,
        sealed_by: str,
    ) -> None:
        """What the runtime accepted before the workload starts, in order: the spec, the workload
        binary (path and bytes; None when it cannot be read), each accepted boot-config value;
        then the separator."""
        self.append_data("spec", source, "spec.json", spec_json)
        if workload is not None:
            self.append_data("workload", source, *workload)
        for s in settings:
            self.append("config", str(s.source), s.key, s.digest)
        self.seal(sealed_by)

    def seal(self, source: str = "runtime") -> Event:
        """Append the separator; later appends are refused."""
        with self._lock:
            event = self._append_locked("separator", source, "", sha384_digest(b""))
            self._sealed = True
            return event

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def to_list(self) -> list[dict[str, object]]:
        return [e.to_dict() for e in self.events()]
