"""The TCG2 crypto-agile event log: the format of both the TPM log (securityfs
`binary_bios_measurements`) and the TDX CC event log (the CCEL ACPI table's log area).

Layouts from the TCG PC Client Platform Firmware Profile (PFP) specification, section 10
("Event Logging"): the first record is a legacy `TCG_PCR_EVENT` (SHA-1 sized, all-zero digest)
holding the `TCG_EfiSpecIDEvent`; every later record is a `TCG_PCR_EVENT2` with one digest per
algorithm the Spec ID event lists. The CC log reuses the layout (edk2 `CcMeasurement.h`,
`CC_EVENT`) with the register field holding the CC "MR index" instead of a PCR index.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum


class EventLogError(ValueError):
    """The log is malformed (the message names the record and its offset)."""


class HashAlg(IntEnum):
    """TPM_ALG_ID values (TCG Algorithm Registry)."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    SM3_256 = 0x0012


DIGEST_SIZES: dict[int, int] = {
    HashAlg.SHA1: 20,
    HashAlg.SHA256: 32,
    HashAlg.SHA384: 48,
    HashAlg.SHA512: 64,
    HashAlg.SM3_256: 32,
}


class EventType(IntEnum):
    """Event types (PFP spec section 10.4.1, edk2 `UefiTcgPlatform.h`)."""

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2


def event_type_name(value: int) -> str:
    try:
        return EventType(value).name
    except ValueError:
        return f"{value:#x}"


SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
# TCG_PCR_EVENT: PCRIndex, EventType, SHA-1 digest, EventSize.
LEGACY_HEADER = struct.Struct("<II20sI")
# TCG_PCR_EVENT2 starts with PCRIndex, EventType, TPML_DIGEST_VALUES.count.
EVENT2_HEADER = struct.Struct("<III")
# TCG_EfiSpecIDEventStruct fixed part: signature, platformClass, minor, major, errata, uintnSize,
# numberOfAlgorithms.
SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")
# Events larger than this are not real: the whole CC log area is 64 KiB by default (edk2
# PcdTcgLogAreaMinLen), a TPM log a few hundred KiB. It keeps a hostile size from looking plausible.
MAX_EVENT_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)
class SpecIdEvent:
    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    algorithms: tuple[tuple[int, int], ...]  # (TPM_ALG_ID, digest size), in log order
    vendor_info: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """One `TCG_PCR_EVENT2` record. `register` is the PCR index in a TPM log, the MR index
    (0 = MRTD, 1..4 = RTMR0..3) in a CC log. `number` counts records from 0 (the Spec ID header)."""

    number: int
    offset: int
    register: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def digest(self, alg: int) -> bytes:
        for a, d in self.digests:
            if a == alg:
                return d
        raise KeyError(f"event {self.number} has no digest for algorithm {alg:#06x}")

    def describe(self) -> str:
        """A short human label: the type plus what the event data says: printable text, the device
        path of a loaded image, the id of a tagged event."""
        text = _printable(self.data)
        if text is None and self.event_type in _IMAGE_LOAD_TYPES:
            text = image_load_path(self.data)
        elif self.event_type == EventType.EV_EVENT_TAG and len(self.data) >= 8:
            tag, size = struct.unpack_from("<II", self.data)
            inner = _printable(self.data[8 : 8 + size])
            return f"{self.type_name} {tag:#010x}" + (f" '{inner}'" if inner else "")
        return f"{self.type_name} '{text}'" if text else self.type_name


_IMAGE_LOAD_TYPES = frozenset({0x80000003, 0x80000004, 0x80000005})  # EV_EFI_{BOOT,RUNTIME}_SERVICES_*
# EFI_IMAGE_LOAD_EVENT (UefiTcgPlatform.h): ImageLocationInMemory, ImageLengthInMemory,
# ImageLinkTimeAddress, LengthOfDevicePath (UINT64/UINTN each on x64), then the device path.
_IMAGE_LOAD = struct.Struct("<QQQQ")


def image_load_path(data: bytes) -> str | None:
    """The device path of an EFI_IMAGE_LOAD_EVENT as text (UEFI spec 10.3 node types), e.g.
    `PciRoot(0)/Pci(3,0)/HD(1)/\\EFI\\BOOT\\BOOTX64.EFI`; None when it does not parse."""
    if len(data) < _IMAGE_LOAD.size:
        return None
    length = _IMAGE_LOAD.unpack_from(data)[3]
    path = data[_IMAGE_LOAD.size : _IMAGE_LOAD.size + min(length, 4096)]
    nodes: list[str] = []
    at = 0
    while at + 4 <= len(path) and len(nodes) < 32:
        ntype, sub, size = struct.unpack_from("<BBH", path, at)
        body = path[at + 4 : at + size]
        if ntype == 0x7F or size < 4:
            break
        nodes.append(_path_node(ntype, sub, body))
        at += size
    text = "/".join(nodes)
    return "".join(c if c.isprintable() else "?" for c in text) or None


def _path_node(ntype: int, sub: int, body: bytes) -> str:
    if (ntype, sub) == (1, 1) and len(body) >= 2:
        return f"Pci({body[1]:x},{body[0]:x})"
    if (ntype, sub) == (2, 1) and len(body) >= 8:
        hid, uid = struct.unpack_from("<II", body)
        return f"PciRoot({uid:x})" if hid == 0x0A0341D0 else f"Acpi({hid:#x},{uid:x})"
    if (ntype, sub) == (4, 1) and len(body) >= 4:
        return f"HD({struct.unpack_from('<I', body)[0]})"
    if (ntype, sub) == (4, 4):
        return body.decode("utf-16-le", errors="replace").rstrip("\0")
    if (ntype, sub) in ((4, 6), (4, 7), (4, 3), (1, 4)) and len(body) >= 16:
        kind = {6: "FvFile", 7: "Fv"}.get(sub, "Vendor")
        return f"{kind}({uuid.UUID(bytes_le=bytes(body[:16]))})"
    return f"Node({ntype},{sub})"


def _printable(data: bytes) -> str | None:
    if not data or len(data) > 200:
        return None
    for candidate in (data, data[:-1] if data.endswith(b"\0") else data):
        try:
            text = candidate.decode("ascii")
        except UnicodeDecodeError:
            continue
        if text.isprintable():
            return text
    # UTF-16LE descriptions (systemd-stub's EV_IPL, EV_EVENT_TAG payloads are binary).
    if len(data) % 2 == 0:
        try:
            text = data.decode("utf-16-le").rstrip("\0")
        except UnicodeDecodeError:
            return None
        if text and text.isprintable() and text.isascii():
            return text
    return None


@dataclass(frozen=True, slots=True)
class EventLog:
    spec_id: SpecIdEvent
    header_register: int
    events: tuple[Event, ...]

    def measured(self) -> tuple[Event, ...]:
        """The events that extend a register (every one except EV_NO_ACTION)."""
        return tuple(e for e in self.events if e.event_type != EventType.EV_NO_ACTION)


def _parse_spec_id(data: bytes, at: int) -> SpecIdEvent:
    if len(data) < SPEC_ID_FIXED.size:
        raise EventLogError(
            f"Spec ID event at offset {at:#x} is {len(data)} bytes, shorter than its fixed part "
            f"({SPEC_ID_FIXED.size})"
        )
    signature, platform_class, minor, major, errata, uintn, count = SPEC_ID_FIXED.unpack_from(data)
    if signature != SPEC_ID_SIGNATURE:
        raise EventLogError(
            f"first event is not a crypto-agile Spec ID event: signature {signature!r}, expected "
            f"{SPEC_ID_SIGNATURE!r} (SHA-1-only logs are not supported)"
        )
    if count == 0 or count > len(DIGEST_SIZES) * 4:
        raise EventLogError(f"Spec ID event lists {count} digest algorithms")
    pos = SPEC_ID_FIXED.size
    if pos + 4 * count + 1 > len(data):
        raise EventLogError(f"Spec ID event is truncated: {count} algorithms do not fit")
    algorithms = []
    for _ in range(count):
        alg, size = struct.unpack_from("<HH", data, pos)
        pos += 4
        known = DIGEST_SIZES.get(alg)
        if known is not None and known != size:
            raise EventLogError(
                f"Spec ID event gives algorithm {alg:#06x} a digest size of {size}, expected {known}"
            )
        if size == 0 or size > 64:
            raise EventLogError(
                f"Spec ID event gives algorithm {alg:#06x} an impossible digest size {size}"
            )
        algorithms.append((alg, size))
    vendor_size = data[pos]
    pos += 1
    if pos + vendor_size > len(data):
        raise EventLogError(f"Spec ID event vendor info ({vendor_size} bytes) runs past the event")
    return SpecIdEvent(
        platform_class=platform_class,
        spec_version=(major, minor, errata),
        uintn_size=uintn,
        algorithms=tuple(algorithms),
        vendor_info=data[pos : pos + vendor_size],
    )


def _is_padding(data: bytes, at: int) -> bool:
    # TDVF fills the whole log area with 0xFF before writing (TdTcg2Dxe SetupCcEventLog), so the
    # first unused record reads as register 0xFFFFFFFF; other firmware leaves zeros.
    if data[at : at + 4] == b"\xff" * 4:
        return True
    if data[at : at + EVENT2_HEADER.size] == bytes(EVENT2_HEADER.size):
        rest = data[at:]
        return rest.count(0) == len(rest)
    return False


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile event log; trailing 0xFF or zero padding (a CC log area) ends it."""
    if len(data) < LEGACY_HEADER.size:
        raise EventLogError(f"event log is {len(data)} bytes, too short for its header event")
    header_register, etype, _sha1, size = LEGACY_HEADER.unpack_from(data)
    if etype != EventType.EV_NO_ACTION:
        raise EventLogError(
            f"first event has type {event_type_name(etype)}, expected EV_NO_ACTION (the Spec ID event)"
        )
    start = LEGACY_HEADER.size
    if start + size > len(data):
        raise EventLogError(
            f"Spec ID event size {size} runs past the end of the log ({len(data)} bytes)"
        )
    spec_id = _parse_spec_id(data[start : start + size], start)
    sizes = dict(spec_id.algorithms)
    events: list[Event] = []
    at = start + size
    number = 1
    while at < len(data) and not _is_padding(data, at):
        if at + EVENT2_HEADER.size > len(data):
            raise EventLogError(f"event {number} at offset {at:#x}: truncated header")
        register, etype, count = EVENT2_HEADER.unpack_from(data, at)
        pos = at + EVENT2_HEADER.size
        if count != len(spec_id.algorithms):
            raise EventLogError(
                f"event {number} at offset {at:#x}: {count} digests, but the Spec ID event lists "
                f"{len(spec_id.algorithms)} algorithms"
            )
        digests = []
        for _ in range(count):
            if pos + 2 > len(data):
                raise EventLogError(f"event {number} at offset {at:#x}: truncated digest list")
            (alg,) = struct.unpack_from("<H", data, pos)
            if alg not in sizes:
                raise EventLogError(
                    f"event {number} at offset {at:#x}: digest algorithm {alg:#06x} is not in the "
                    "Spec ID event"
                )
            digest = data[pos + 2 : pos + 2 + sizes[alg]]
            if len(digest) != sizes[alg]:
                raise EventLogError(f"event {number} at offset {at:#x}: truncated digest")
            digests.append((alg, digest))
            pos += 2 + sizes[alg]
        if pos + 4 > len(data):
            raise EventLogError(f"event {number} at offset {at:#x}: truncated event size")
        (event_size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if event_size > MAX_EVENT_SIZE or pos + event_size > len(data):
            raise EventLogError(
                f"event {number} at offset {at:#x}: event data of {event_size} bytes runs past the "
                f"end of the log ({len(data)} bytes)"
            )
        events.append(
            Event(number, at, register, etype, tuple(digests), bytes(data[pos : pos + event_size]))
        )
        at = pos + event_size
        number += 1
    return EventLog(spec_id=spec_id, header_register=header_register, events=tuple(events))
