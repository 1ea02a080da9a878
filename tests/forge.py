"""Forged measured boots for tests: CC event logs in TDVF's layout (and TPM logs in OVMF's), built
record by record, so that each attack of a hostile host can be written as a change to a good boot.

A good boot of a UKI, as TDVF (edk2 `TdTcg2Dxe`, `DxeTpm2MeasureBootLib`) and systemd-stub 257 log it
(docs/measurements.md, "Firmware events around ours"): RTMR0 the TD HOB, the CFV, the Secure Boot
variables, a separator, ACPI tables, BootOrder and Boot0000; RTMR1 "Calling EFI Application from
Boot Option", a separator, the GPT, the UKI; RTMR2 the stub's section events; RTMR1 the inner kernel;
RTMR2 the kernel's LoadOptions and initrd events; RTMR1 the two ExitBootServices actions.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from eemini.tdx.eventlog import EventType
from eemini.tdx.measure import PredictedEvent

T = EventType
SHA256, SHA384 = 0x000B, 0x000C
_HASH = {SHA256: hashlib.sha256, SHA384: hashlib.sha384}


@dataclass(frozen=True)
class Rec:
    """One record: `register` is the MR index (CC log) or the PCR (TPM log). Without `digests` every
    bank holds the hash of `data`, as the firmware computes it for data events."""

    register: int
    event_type: int
    data: bytes
    digests: dict[int, bytes] | None = None
    label: str = ""  # the predicted event's `what`, for finding it (not in the log)

    def digest(self, alg: int) -> bytes:
        if self.digests is not None:
            return self.digests[alg]
        return _HASH[alg](self.data).digest()


def device_path_load_event(path: str) -> bytes:
    """EFI_IMAGE_LOAD_EVENT for an ESP file: PciRoot(0)/Pci(3,0)/HD(1)/<path>/End."""
    nodes = struct.pack("<BBHII", 2, 1, 12, 0x0A0341D0, 0)  # ACPI PciRoot(0)
    nodes += struct.pack("<BBHBB", 1, 1, 6, 0, 3)  # Pci(3,0)
    nodes += struct.pack("<BBHI", 4, 1, 42, 1) + bytes(34)  # HD(1, ...)
    name = (path + "\0").encode("utf-16-le")
    nodes += struct.pack("<BBH", 4, 4, 4 + len(name)) + name
    nodes += struct.pack("<BBH", 0x7F, 0xFF, 4)
    return struct.pack("<QQQQ", 0x7E000000, 0x100000, 0, len(nodes)) + nodes


def fv_load_event(fv: str, file: str) -> bytes:
    """EFI_IMAGE_LOAD_EVENT for an application in a firmware volume: Fv(guid)/FvFile(guid)/End."""
    import uuid

    nodes = struct.pack("<BBH", 4, 7, 20) + uuid.UUID(fv).bytes_le
    nodes += struct.pack("<BBH", 4, 6, 20) + uuid.UUID(file).bytes_le
    nodes += struct.pack("<BBH", 0x7F, 0xFF, 4)
    return struct.pack("<QQQQ", 0x7E000000, 0x100000, 0, len(nodes)) + nodes


def tagged(tag: int, text: bytes) -> bytes:
    return struct.pack("<II", tag, len(text)) + text


def action(text: str, mr: int = 2) -> Rec:
    return Rec(mr, T.EV_EFI_ACTION, text.encode())


SEPARATOR = bytes(4)


def predicted_rec(p: PredictedEvent, *, cc: bool = True, data: bytes | None = None) -> Rec:
    """The record a predicted event becomes, with event data like the real measurer's."""
    if data is None:
        if p.event_type == T.EV_EFI_BOOT_SERVICES_APPLICATION:
            data = device_path_load_event("\\EFI\\BOOT\\BOOTX64.EFI" if "UKI" in p.what else "")
        elif p.event_type == T.EV_EVENT_TAG:
            data = tagged(0x8F3B22ED if "LoadOptions" in p.what else 0x8F3B22EC, p.what.encode())
        else:
            data = p.what.split()[-1].encode("utf-16-le") + b"\0\0"
    digests = {SHA384: p.sha384, SHA256: p.sha256}
    return Rec(p.mr_index if cc else p.pcr, p.event_type, data, digests, p.what)


def host_config(mr: int = 1) -> list[Rec]:
    """RTMR0 (or PCR 1/7 given as `mr`) of a TDVF boot: configuration, nothing that runs."""
    return [
        Rec(mr, T.EV_EFI_HANDOFF_TABLES2, b"\x08TdxTable" + bytes(24)),
        Rec(mr, T.EV_EFI_PLATFORM_FIRMWARE_BLOB2, b"\x0bFv(XXXXXX)" + bytes(16)),
        *[Rec(mr, T.EV_EFI_VARIABLE_DRIVER_CONFIG, name.encode()) for name in ("SecureBoot", "PK",
                                                                              "KEK", "db", "dbx")],
        Rec(mr, T.EV_SEPARATOR, SEPARATOR),
        Rec(mr, T.EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA"),
        Rec(mr, T.EV_PLATFORM_CONFIG_FLAGS, b"ACPI DATA"),
        Rec(mr, T.EV_EFI_VARIABLE_BOOT, b"BootOrder"),
        Rec(mr, T.EV_EFI_VARIABLE_BOOT, b"Boot0000"),
    ]  # fmt: skip


def good_boot(predicted: Sequence[PredictedEvent]) -> list[Rec]:
    """A clean TDVF boot of the image whose CC-log events are `predicted` (in prediction order:
    the UKI, the stub's section events, the inner kernel, the kernel's events, each optional)."""
    recs = host_config()
    recs += [action("Calling EFI Application from Boot Option"), Rec(2, T.EV_SEPARATOR, SEPARATOR)]
    recs.append(Rec(2, T.EV_EFI_GPT_EVENT, b"EFI PART" + bytes(84) + struct.pack("<Q", 1) + bytes(128)))
    recs += [predicted_rec(p) for p in predicted]
    recs += [action("Exit Boot Services Invocation"), action("Exit Boot Services Returned with Success")]
    return recs


def find(recs: Sequence[Rec], what: str) -> int:
    """The index of the predicted record whose `what` is exactly `what`."""
    for i, r in enumerate(recs):
        if r.label == what:
            return i
    raise AssertionError(f"no predicted record {what!r}")


def insert_before(recs: Sequence[Rec], what: str, new: Sequence[Rec]) -> list[Rec]:
    i = find(recs, what)
    return [*recs[:i], *new, *recs[i:]]


def without(recs: Sequence[Rec], what: str) -> list[Rec]:
    i = find(recs, what)
    return [*recs[:i], *recs[i + 1 :]]


def moved(r: Rec, register: int) -> Rec:
    return replace(r, register=register)


def spec_id(algs: Sequence[int]) -> bytes:
    sizes = {SHA256: 32, SHA384: 48}
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, sizes[a]) for a in algs) + b"\0"
    return struct.pack("<II20sI", 1, 3, bytes(20), len(body)) + body


def log_bytes(recs: Sequence[Rec], algs: Sequence[int] = (SHA384,), pad: int = 4096) -> bytes:
    """The crypto-agile log (TDVF pads its area with 0xFF)."""
    out = spec_id(algs)
    for r in recs:
        out += struct.pack("<III", r.register, r.event_type, len(algs))
        out += b"".join(struct.pack("<H", a) + r.digest(a) for a in algs)
        out += struct.pack("<I", len(r.data)) + r.data
    return out + b"\xff" * pad


def rtmrs(recs: Sequence[Rec]) -> list[bytes]:
    """RTMR0..3 as TDVF extends them from these records (others extend nothing)."""
    regs = [bytes(48)] * 4
    for r in recs:
        if r.event_type != T.EV_NO_ACTION and 1 <= r.register <= 4:
            regs[r.register - 1] = hashlib.sha384(regs[r.register - 1] + r.digest(SHA384)).digest()
    return regs
