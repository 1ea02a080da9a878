"""Replaying a TPM event log (securityfs `binary_bios_measurements`) to PCR values.

TCG PC Client Platform Firmware Profile, "PCR initial values": PCRs 0..16 and 23 start at zero,
17..22 (the dynamic-launch PCRs) at all ones; a StartupLocality event (an EV_NO_ACTION event in PCR
0 whose data is "StartupLocality\\0" and the locality byte) starts PCR 0 at the locality in its last
byte. Every other event extends its PCR: PCR = H(PCR || digest). EV_NO_ACTION extends nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from eemini.tdx.eventlog import DIGEST_SIZES, EventLog, EventType, HashAlg

PCR_COUNT = 24
# The PCRs a boot extends (PC Client: 0-7 the firmware, 8-9 the loader and the Linux stub, 11-15
# systemd-stub and the like): each must be the log's replay. PCR 10 is IMA's (Linux extends it with
# its boot_aggregate once a TPM is there, logging it in its own runtime log, not this one), 16 is
# for debug, 17-22 for a dynamic launch, 23 for applications: extended after boot if at all, they
# are reported, not judged, unless the firmware's log itself extends them.
BOOT_PCRS = frozenset(range(10)) | frozenset(range(11, 16))
STARTUP_LOCALITY = b"StartupLocality\0"
_HASHLIB = {HashAlg.SHA1: "sha1", HashAlg.SHA256: "sha256", HashAlg.SHA384: "sha384",
            HashAlg.SHA512: "sha512"}  # fmt: skip


class ReplayError(ValueError):
    """The log cannot be replayed in this bank (the message says why)."""


def initial_pcrs(size: int, locality: int = 0) -> list[bytes]:
    pcrs = [bytes(size) if i <= 16 or i == 23 else b"\xff" * size for i in range(PCR_COUNT)]
    pcrs[0] = bytes(size - 1) + bytes([locality])
    return pcrs


def replay_pcrs(log: EventLog, alg: int = HashAlg.SHA256) -> list[bytes]:
    """The 24 PCR values of bank `alg` that the log's events produce."""
    name = _HASHLIB.get(HashAlg(alg)) if alg in _HASHLIB else None
    if name is None or alg not in dict(log.spec_id.algorithms):
        listed = ", ".join(f"{a:#06x}" for a, _ in log.spec_id.algorithms)
        raise ReplayError(f"the log has no digests of algorithm {alg:#06x} (it lists {listed})")
    size = DIGEST_SIZES[alg]
    locality = 0
    for e in log.events:
        if (
            e.event_type == EventType.EV_NO_ACTION
            and e.register == 0
            and e.data.startswith(STARTUP_LOCALITY)
            and len(e.data) == len(STARTUP_LOCALITY) + 1
        ):
            locality = e.data[-1]
    pcrs = initial_pcrs(size, locality)
    for e in log.measured():
        if not 0 <= e.register < PCR_COUNT:
            raise ReplayError(f"event {e.number} extends PCR {e.register}, which does not exist")
        pcrs[e.register] = hashlib.new(name, pcrs[e.register] + e.digest(alg)).digest()
    return pcrs


def judged_pcrs(log: EventLog) -> frozenset[int]:
    """The PCRs whose quoted value must be the log's replay: the boot's, and any the log extends."""
    return BOOT_PCRS | {e.register for e in log.measured() if 0 <= e.register < PCR_COUNT}


def first_mismatch(
    replayed: Sequence[bytes], quoted: Sequence[bytes], judged: frozenset[int]
) -> int | None:
    for i, (a, b) in enumerate(zip(replayed, quoted, strict=True)):
        if i in judged and a != b:
            return i
    return None
