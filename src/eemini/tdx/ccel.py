"""The TDX CC event log: the CCEL ACPI table, replaying the log to RTMR values, and checking the
replay against the RTMRs a quote carries.

The CCEL table is `EFI_ACPI_6_5_CONFIDENTIAL_COMPUTING_EVENT_LOG_TABLE` (ACPI 6.5 section 5.2.35,
edk2 `MdePkg/Include/IndustryStandard/Acpi65.h`); Linux >= 6.4 exposes it as
`/sys/firmware/acpi/tables/CCEL` and its log area as `/sys/firmware/acpi/tables/data/CCEL`.
The replay rule is TDVF's (`OvmfPkg/Tcg/TdTcg2Dxe/TdTcg2Dxe.c`, `TdxDxeHashLogExtendEvent`):
MR index m in 1..4 extends RTMR[m-1] = SHA-384(RTMR[m-1] || digest); EV_NO_ACTION extends nothing;
MR index 0 (MRTD) can never be extended after the TD is built.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from eemini.tdx.errors import VerificationError
from eemini.tdx.eventlog import Event, EventLog, EventLogError, EventType, HashAlg

RTMR_COUNT = 4
RTMR_SIZE = 48
# edk2 Acpi65.h: the 36-byte ACPI header (Signature, Length, Revision, Checksum, OEMID, OEM Table ID,
# OEM Revision, Creator ID, Creator Revision), then CcType, CcSubtype, Reserved (2), LAML, LASA.
CCEL_TABLE = struct.Struct("<4sIBB6s8sI4sIBB2xQQ")
CCEL_SIGNATURE = b"CCEL"


class CcType(IntEnum):
    NONE = 0
    SEV = 1
    TDX = 2


class ReplayMismatch(VerificationError):
    """The event log does not replay to the RTMR values it is checked against."""

    check = "event-log"


@dataclass(frozen=True, slots=True)
class CcelTable:
    revision: int
    oem_id: str
    cc_type: int
    cc_subtype: int
    log_area_minimum_length: int
    log_area_start_address: int


def parse_ccel_table(data: bytes) -> CcelTable:
    """Parse the 56-byte CCEL ACPI table; raises EventLogError naming the problem."""
    if len(data) < CCEL_TABLE.size:
        raise EventLogError(f"CCEL table is {len(data)} bytes, expected {CCEL_TABLE.size}")
    fields = CCEL_TABLE.unpack_from(data)
    signature, length, revision, oem_id = fields[0], fields[1], fields[2], fields[4]
    cc_type, subtype, laml, lasa = fields[9:13]
    if signature != CCEL_SIGNATURE:
        raise EventLogError(f"not a CCEL table: signature {signature!r}, expected b'CCEL'")
    if length != len(data):
        raise EventLogError(f"CCEL table header says {length} bytes, but {len(data)} were given")
    if sum(data) % 256 != 0:
        raise EventLogError("CCEL table checksum is wrong (its bytes do not sum to 0 mod 256)")
    return CcelTable(
        revision=revision,
        oem_id=oem_id.rstrip(b" \0").decode("ascii", errors="replace"),
        cc_type=cc_type,
        cc_subtype=subtype,
        log_area_minimum_length=laml,
        log_area_start_address=lasa,
    )


def mr_index_name(mr_index: int) -> str:
    return "MRTD" if mr_index == 0 else f"RTMR{mr_index - 1}"


def _rtmr_events(log: EventLog) -> list[Event]:
    if HashAlg.SHA384 not in dict(log.spec_id.algorithms):
        raise EventLogError("the event log carries no SHA-384 digests, so it cannot describe RTMRs")
    events = []
    for e in log.measured():
        if not 1 <= e.register <= RTMR_COUNT:
            raise EventLogError(
                f"event {e.number} ({e.describe()}) names MR index {e.register}; a CC log may only "
                f"extend MR index 1..{RTMR_COUNT} (RTMR0..3)"
            )
        events.append(e)
    return events


def extend(value: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(value + digest).digest()


def replay_rtmrs(log: EventLog) -> tuple[bytes, bytes, bytes, bytes]:
    """Fold the log's SHA-384 digests into RTMR0..3, each starting at 48 zero bytes."""
    rtmrs = [bytes(RTMR_SIZE)] * RTMR_COUNT
    for e in _rtmr_events(log):
        rtmrs[e.register - 1] = extend(rtmrs[e.register - 1], e.digest(HashAlg.SHA384))
    return rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]


def check_replay(log: EventLog, rtmrs: Sequence[bytes], registers: Sequence[int] = (0, 1, 2, 3)) -> None:
    """Raise ReplayMismatch unless the log replays to `rtmrs` (RTMR0..3) for each of `registers`.

    A mismatch names the register and, when the quote's value is reached part way through the log
    (the log goes on after what the quote covers), the first event past that point.
    """
    if len(rtmrs) != RTMR_COUNT or any(len(r) != RTMR_SIZE for r in rtmrs):
        raise ValueError("rtmrs must be four 48-byte values")
    events = _rtmr_events(log)
    for index in registers:
        mine = [e for e in events if e.register == index + 1]
        value = bytes(RTMR_SIZE)
        prefix_match: int | None = 0 if value == rtmrs[index] else None
        for n, e in enumerate(mine, 1):
            value = extend(value, e.digest(HashAlg.SHA384))
            if value == rtmrs[index] and n < len(mine):
                prefix_match = n
        if value == rtmrs[index]:
            continue
        where = (
            f"RTMR{index}: the log's {len(mine)} events replay to {value.hex()}, "
            f"the quote has {rtmrs[index].hex()}"
        )
        if prefix_match is not None:
            extra = mine[prefix_match]
            raise ReplayMismatch(
                f"{where}; the quote's value is reached after {prefix_match} events, so the log "
                f"diverges at event {extra.number} ({extra.describe()}), which the quote does not cover"
            )
        if mine:
            first = mine[0]
            raise ReplayMismatch(
                f"{where}; no prefix of the log reaches it, so the log diverges from the first "
                f"RTMR{index} event on: event {first.number} ({first.describe()}) or a later one "
                "was changed, added or left out"
            )
        raise ReplayMismatch(f"{where}; the log has no events for this register")


def describe_event(e: Event) -> str:
    return f"event {e.number} ({mr_index_name(e.register)} {e.describe()})"


__all__ = [
    "CcType",
    "CcelTable",
    "EventLogError",
    "EventType",
    "ReplayMismatch",
    "check_replay",
    "describe_event",
    "extend",
    "mr_index_name",
    "parse_ccel_table",
    "replay_rtmrs",
]
