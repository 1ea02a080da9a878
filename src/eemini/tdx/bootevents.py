"""The exact-set rule: which events a measured boot of *this image* may contain.

A log that replays to the quote's registers says what was measured; it does not say whether anything
else ran. The host chooses boot options, option ROMs and ESP contents, so "the image's events are in
the log somewhere" proves nothing: code loaded before the UKI can patch the kernel after it was
measured, and code loaded after it can log whatever it likes. So every measured event of the log is
classified by register group (TDVF's PCR -> RTMR map) and must be accounted for:

    group        CC log (MR index)   TPM log (PCR)   rule
    firmware     -                   0               the firmware measuring itself (a TD has MRTD
                                                     instead, which no log can extend): allowlisted
    host-config  RTMR0 (1)           1, 7            allowlisted configuration types only; the bytes
                                                     are host input (pin RTMR0 in the policy)
    boot         RTMR1 (2)           2-6             exactly the predicted code events, in order,
                                                     plus allowlisted events that load no code
    os           RTMR2 (3)           8-15            exactly the predicted events, in order; nothing
                                                     else (a LoadOptions cmdline, addons, credential
                                                     and sysext initrds all land here)
    runtime      RTMR3 (4)           -               nothing: the runtime event log owns RTMR3
    (anything else)                                  rejected

The allowlist is `ALLOWED` below, one row per event type with where it comes from. The first event
that is neither the next predicted event of its group nor allowlisted is rejected by name (log index,
register, type, digest, decoded description); then any predicted event that never appeared is.
EV_NO_ACTION events extend nothing and are ignored.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from eemini.tdx.errors import VerificationError
from eemini.tdx.eventlog import Event, EventLog, EventType, HashAlg
from eemini.tdx.measure import PredictedEvent


class EventsMissing(VerificationError):
    """A predicted event is not in the event log (the message names the first one missing)."""

    check = "expected-events"


class UnexpectedEvent(VerificationError):
    """The log holds an event this image does not cause and the allowlist does not cover."""

    check = "expected-events"


class Group(StrEnum):
    FIRMWARE = "firmware"
    HOST_CONFIG = "host-config"
    BOOT = "boot"
    OS = "os"
    RUNTIME = "runtime"
    NONE = "none"


def group_of(register: int, *, cc: bool) -> Group:
    """The register group of a CC log's MR index (`cc`) or of a TPM log's PCR."""
    if cc:
        return {1: Group.HOST_CONFIG, 2: Group.BOOT, 3: Group.OS, 4: Group.RUNTIME}.get(
            register, Group.NONE
        )
    if register == 0:
        return Group.FIRMWARE
    if register in (1, 7):
        return Group.HOST_CONFIG
    if 2 <= register <= 6:
        return Group.BOOT
    if 8 <= register <= 15:
        return Group.OS
    return Group.NONE


def register_name(register: int, *, cc: bool) -> str:
    if not cc:
        return f"PCR{register}"
    return "MRTD" if register == 0 else f"RTMR{register - 1}"


# edk2 MdePkg/Include/IndustryStandard/UefiTcgPlatform.h: the EV_EFI_ACTION strings the firmware
# logs around a boot option (BmBoot.c via TcgEventLogRecordLib / TdTcg2Dxe OnReadyToBoot and
# OnExitBootServices). Their digest is SHA-384 of the ASCII string without NUL.
BOOT_ACTIONS = frozenset({
    b"Calling EFI Application from Boot Option",
    b"Returning from EFI Application from Boot Option",
    b"Exit Boot Services Invocation",
    b"Exit Boot Services Returned with Success",
    b"Exit Boot Services Returned with Failure",
})  # fmt: skip
# MeasureSeparatorEvent: four zero bytes (a non-zero value marks a firmware error).
SEPARATOR = bytes(4)


@dataclass(frozen=True, slots=True)
class Allowed:
    """An event type a group may hold beyond the predicted events: it loads no code.

    `data`, when set, lists the only event data accepted; `hashed` says the digest must be the hash
    of the event data itself (so the label cannot disagree with what was extended)."""

    group: Group
    event_type: EventType
    source: str
    data: frozenset[bytes] | None = None
    hashed: bool = False
    prefix: bytes = b""  # the event data must start with this


# fmt: off
ALLOWED: tuple[Allowed, ...] = (
    # The firmware's own measurements into PCR 0 (TPM logs only; in a TD that is MRTD).
    Allowed(Group.FIRMWARE, EventType.EV_S_CRTM_VERSION, "edk2 Tcg2Pei MeasureCRTMVersion"),
    Allowed(Group.FIRMWARE, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB, "edk2 Tcg2Pei MeasureFvImage"),
    Allowed(Group.FIRMWARE, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2, "edk2 Tcg2Pei MeasureFvImage"),
    Allowed(Group.FIRMWARE, EventType.EV_POST_CODE, "edk2 Tcg2Pei (POST code)"),
    Allowed(Group.FIRMWARE, EventType.EV_SEPARATOR, "edk2 Tcg2Dxe MeasureSeparatorEvent",
            frozenset({SEPARATOR}), hashed=True),
    # Host configuration (RTMR0 / PCR 1, 7): TdxHelperLib (TD HOB, CFV), TdTcg2Dxe
    # MeasureSecureBootPolicy, QemuFwCfgAcpi.c (ACPI tables), QemuFwCfgCacheInit.c (fw_cfg items),
    # SmbiosMeasurementDxe, boot variables at ReadyToBoot, DxeImageVerificationLib (Secure Boot on).
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_HANDOFF_TABLES2, "TdxHelperLib TD HOB; SMBIOS"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_HANDOFF_TABLES, "SmbiosMeasurementDxe (older)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
            "TdxHelperLib CFV (the variable store)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
            "MeasureSecureBootPolicy (SecureBoot, PK, KEK, db, dbx)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_PLATFORM_CONFIG_FLAGS, "QemuFwCfgAcpi.c ACPI DATA; fw_cfg"),
    Allowed(Group.HOST_CONFIG, EventType.EV_TABLE_OF_DEVICES, "TdTcg2Dxe OnReadyToBoot (server class)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_VARIABLE_BOOT, "OnReadyToBoot BootOrder, Boot####"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_VARIABLE_BOOT2, "OnReadyToBoot (PFP 1.05 form)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_EFI_VARIABLE_AUTHORITY,
            "DxeImageVerificationLib (Secure Boot on)"),
    Allowed(Group.HOST_CONFIG, EventType.EV_SEPARATOR, "MeasureSeparatorEvent",
            frozenset({SEPARATOR}), hashed=True),
    # Boot (RTMR1 / PCR 2-6): around the predicted code events.
    Allowed(Group.BOOT, EventType.EV_EFI_ACTION, "BmBoot.c / TdTcg2Dxe boot-option and "
            "ExitBootServices actions", BOOT_ACTIONS, hashed=True),
    Allowed(Group.BOOT, EventType.EV_SEPARATOR, "MeasureSeparatorEvent (edk2-stable202411+ in RTMR1)",
            frozenset({SEPARATOR}), hashed=True),
    Allowed(Group.BOOT, EventType.EV_EFI_GPT_EVENT, "DxeTpm2MeasureBootLib Tcg2MeasureGptTable "
            "(UEFI_GPT_DATA: the GPT header, signature 'EFI PART', then the entries)",
            hashed=True, prefix=b"EFI PART"),
)
# fmt: on


_HASHLIB = {HashAlg.SHA1: "sha1", HashAlg.SHA256: "sha256", HashAlg.SHA384: "sha384",
            HashAlg.SHA512: "sha512"}  # fmt: skip


def _hash(alg: int, data: bytes) -> bytes | None:
    name = _HASHLIB.get(alg)  # type: ignore[call-overload]
    return hashlib.new(name, data).digest() if name else None


def digests_hash_data(e: Event) -> bool:
    """Every digest of a known algorithm is the hash of the event's own data."""
    return all(_hash(alg, e.data) in (None, d) for alg, d in e.digests)


def allowed_rule(group: Group, e: Event) -> tuple[Allowed | None, str]:
    """The allowlist row that admits `e` in `group`, or None and why not."""
    rows = [a for a in ALLOWED if a.group == group and a.event_type == e.event_type]
    if not rows:
        return None, ""
    row = rows[0]
    if (row.data is not None and e.data not in row.data) or not e.data.startswith(row.prefix):
        return None, f"{e.type_name} with this data is not one the firmware logs"
    if row.hashed and not digests_hash_data(e):
        return None, "its digest is not the hash of its own data"
    return row, ""


@dataclass(frozen=True, slots=True)
class BootCheck:
    """What the exact-set check saw: the matched predictions and the allowlisted events."""

    matched: tuple[tuple[PredictedEvent, Event], ...]
    allowed: tuple[tuple[Event, Group], ...]


def _alg_name(alg: int) -> str:
    return "sha256" if alg == HashAlg.SHA256 else "sha384"


def _want(p: PredictedEvent, alg: int) -> bytes:
    """The predicted digest in the bank the log is matched in."""
    return p.sha256 if alg == HashAlg.SHA256 else p.sha384


def _label(e: Event, *, cc: bool, alg: int) -> str:
    try:
        digest = e.digest(alg).hex()
    except KeyError:
        digest = "(none)"
    where = register_name(e.register, cc=cc)
    return f"event {e.number}: {where} {e.describe()} {_alg_name(alg)} {digest}"


def check_boot_events(
    log: EventLog, predicted: Sequence[PredictedEvent], *, cc: bool, alg: int = HashAlg.SHA384
) -> BootCheck:
    """Apply the exact-set rule to a CC log (`cc`: registers are MR indexes, only the predicted
    events that reach the CC log are expected) or a TPM log (registers are PCRs, every predicted
    event is expected). Events are matched by their digest in bank `alg`: SHA-384 (the CC log's,
    and a TPM log's when it has that bank) or SHA-256 (a TPM log with no SHA-384 bank, such as
    Azure's vTPM). Raises UnexpectedEvent or EventsMissing; returns what matched."""
    if alg not in (HashAlg.SHA256, HashAlg.SHA384):
        raise ValueError(f"events are predicted in SHA-256 and SHA-384 only, not {alg:#06x}")
    wanted = [p for p in predicted if p.cc] if cc else list(predicted)
    queues: dict[Group, deque[tuple[int, PredictedEvent]]] = {}
    for n, p in enumerate(wanted, 1):
        queues.setdefault(group_of(p.mr_index if cc else p.pcr, cc=cc), deque()).append((n, p))
    matched: list[tuple[PredictedEvent, Event]] = []
    allowed: list[tuple[Event, Group]] = []
    for e in log.measured():
        group = group_of(e.register, cc=cc)
        queue = queues.get(group)
        if queue:
            _, p = queue[0]
            if (
                e.register == (p.mr_index if cc else p.pcr)
                and e.event_type == p.event_type
                and _digest(e, alg) == _want(p, alg)
            ):
                matched.append((p, e))
                queue.popleft()
                continue
        row, why = allowed_rule(group, e)
        if row is not None:
            allowed.append((e, group))
            continue
        if queue and (skipped := _skips(e, queue, alg)) is not None:
            n, p = queue[0]
            raise EventsMissing(
                f"predicted event {n} of {len(wanted)}, {p.label()} {_alg_name(alg)} "
                f"{_want(p, alg).hex()}, is not "
                f"in {register_name(e.register, cc=cc)}: event {e.number} is predicted event "
                f"{skipped}, which follows it"
            )
        raise UnexpectedEvent(
            f"{_label(e, cc=cc, alg=alg)} is not this image's: "
            + (why or _why_unexpected(e, group, queue, wanted, matched, cc=cc, alg=alg))
        )
    for queue in queues.values():
        if queue:
            n, p = min(q[0] for q in queues.values() if q)
            where = register_name(p.mr_index if cc else p.pcr, cc=cc)
            raise EventsMissing(
                f"predicted event {n} of {len(wanted)}, {p.label()} {_alg_name(alg)} "
                f"{_want(p, alg).hex()}, is not in {where}: the log ends without it"
            )
    return BootCheck(tuple(matched), tuple(allowed))


def _skips(e: Event, queue: deque[tuple[int, PredictedEvent]], alg: int) -> int | None:
    """The number of a later predicted event of the same group that `e` is, if any."""
    digest = _digest(e, alg)
    for n, p in list(queue)[1:]:
        if p.event_type == e.event_type and _want(p, alg) == digest:
            return n
    return None


def _digest(e: Event, alg: int) -> bytes | None:
    try:
        return e.digest(alg)
    except KeyError:
        return None


def _why_unexpected(
    e: Event,
    group: Group,
    queue: deque[tuple[int, PredictedEvent]] | None,
    wanted: Sequence[PredictedEvent],
    matched: Sequence[tuple[PredictedEvent, Event]],
    *,
    cc: bool,
    alg: int,
) -> str:
    name = register_name(e.register, cc=cc)
    digest = _digest(e, alg)
    for p, first in matched:
        if _want(p, alg) == digest and p.event_type == e.event_type:
            return f"it repeats {p.label()} (already seen as event {first.number})"
    if group == Group.NONE:
        return f"{name} is outside the registers a measured boot extends"
    if group == Group.RUNTIME:
        return "the firmware never extends RTMR3 (the runtime event log owns it)"
    if group in (Group.HOST_CONFIG, Group.FIRMWARE):
        return f"{e.type_name} is not a {group.value} type (see bootevents.ALLOWED)"
    same = [p for p in wanted if _want(p, alg) == digest and p.event_type == e.event_type]
    if same:
        home = register_name(same[0].mr_index if cc else same[0].pcr, cc=cc)
        if home != name:
            return f"it is {same[0].label()}, but in {name}, not {home}"
        return f"it is {same[0].label()}, out of order"
    if queue:
        n, p = queue[0]
        return (
            f"expected here: predicted event {n} of {len(wanted)}, {p.label()} {_alg_name(alg)} "
            f"{_want(p, alg).hex()}"
        )
    if any(group_of(p.mr_index if cc else p.pcr, cc=cc) == group for p in wanted):
        return f"{name} may hold only this image's predicted events, and all of them were already seen"
    return f"this image causes no events in {name} but the allowlisted ones"
