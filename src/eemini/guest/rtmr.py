"""Extend RTMR3 with the runtime event log, where the kernel lets userspace do it.

Linux >= 6.16 exposes the TDX measurement registers as sysfs attributes
(Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest, "virt: tdx-guest: Expose TDX MRs
as sysfs attributes"): `/sys/class/misc/tdx_guest/measurements/rtmr3:sha384` reads the current
48-byte value and, written with exactly 48 bytes at offset 0, extends RTMR3 with them through
TDG.MR.RTMR.EXTEND, so the register becomes SHA-384(old || written). The kernel keeps no log of
such extensions: ours is the runtime event log (eemini.guest.events). The image's kernel (Linux
7.3, docs/kernel.md) has the file, so on TDX this is the production path; earlier kernels (6.12)
have no such file, and then nothing is extended and `health` says so.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping

from eemini.guest.spec import canonical_json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from eemini.guest.events import Event

MEASUREMENTS_DIR = "sys/class/misc/tdx_guest/measurements"
RTMR3_FILE = "rtmr3:sha384"
RTMR_SIZE = 48
# The runtime log's fields that are measured; `time` is informational and left out so a verifier
# can recompute every extension from the log alone.
MEASURED_FIELDS = ("seq", "kind", "source", "key", "digest")


class RtmrError(OSError):
    """Extending RTMR3 failed; the runtime log and RTMR3 may no longer agree."""


def event_bytes(event: Mapping[str, object]) -> bytes:
    """The canonical encoding of one runtime event: its measured fields in the canonical JSON of
    the resolved spec (sorted keys, compact separators, UTF-8); KeyError for a missing one."""
    return canonical_json({name: event[name] for name in MEASURED_FIELDS})


def event_digest(event: Mapping[str, object]) -> bytes:
    """The 48 bytes written to RTMR3 for one runtime event (eemini.tdx.runtime_log replays them)."""
    return hashlib.sha384(event_bytes(event)).digest()


class Rtmr3:
    """RTMR3 through sysfs under `root` (tests point `root` at a fake tree)."""

    def __init__(self, root: str = "/") -> None:
        self.path = os.path.join(root, MEASUREMENTS_DIR, RTMR3_FILE)

    def unavailable_reason(self) -> str | None:
        """None when RTMR3 can be extended, else a sentence saying why not."""
        if not os.path.exists(self.path):
            return f"{self.path} is absent (the kernel exposes RTMR extension from Linux 6.16 on)"
        if not os.access(self.path, os.W_OK):
            return f"{self.path} is not writable"
        return None

    def extend(self, digest: bytes) -> None:
        """Extend RTMR3 with a 48-byte digest: one write of all 48 bytes at offset 0 (a fresh
        descriptor's position)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RtmrError(e.errno, f"cannot open {self.path} to extend RTMR3: {e.strerror}") from None
        try:
            written = os.write(fd, digest)
        except OSError as e:
            raise RtmrError(
                e.errno, f"extending RTMR3 through {self.path} failed: {e.strerror}"
            ) from None
        finally:
            os.close(fd)
        if written != RTMR_SIZE:
            raise RtmrError(f"short write to {self.path}: {written} of {RTMR_SIZE} bytes")


class RuntimeMeasurer:
    """Extends RTMR3 with each runtime event (when possible) and remembers what it did, for
    `health` and `attest`; `measure` is what eemini.guest.events.boot_log hands each event to."""

    def __init__(
        self,
        rtmr3: Rtmr3 | None = None,
        *,
        extend: Callable[[bytes], None] | None = None,
        via: str = "sysfs",
    ) -> None:
        """RTMR3 through the kernel's sysfs attribute (`rtmr3`, default the real one) when it
        exists, or through `extend` (e.g. the simulated backend's register in dev mode)."""
        self.via = via
        self.extended = 0
        self.reason: str | None = None
        if extend is not None:
            self._extend: Callable[[bytes], None] | None = extend
            return
        r = rtmr3 if rtmr3 is not None else Rtmr3()
        self.reason = r.unavailable_reason()
        self._extend = r.extend if self.reason is None else None

    @property
    def enabled(self) -> bool:
        return self._extend is not None

    def measure(self, event: Event) -> None:
        if self._extend is not None:
            self._extend(event_digest(event.to_dict()))
            self.extended += 1

    def status(self) -> dict[str, object]:
        """What `health` and `attest` report about RTMR3."""
        if self._extend is not None:
            return {"rtmr3_extended": True, "rtmr3_via": self.via, "rtmr3_events": self.extended}
        return {"rtmr3_extended": False, "rtmr3_reason": self.reason or "RTMR3 extension is off"}
