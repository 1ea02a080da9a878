"""Predict the measurement events a built UKI causes at boot, from the UKI's own bytes, and check
that they appear in an event log.

Three measurers see the UKI (docs/measurements.md has the sources and version rules):
1. the firmware measures the UKI file (PE Authenticode) into PCR 4 = RTMR1, and, while systemd-stub
   < v258 starts the kernel with `LoadImage()`, the `.linux` payload too;
2. systemd-stub measures each UKI section into PCR 11 = RTMR2: its name with a NUL, then its
   in-memory bytes (`VirtualSize`), in the stub's canonical order;
3. the Linux EFI stub measures the load options it received (UTF-16LE cmdline with its NUL) and
   the initrd into PCR 9 = RTMR2.
Raw register values depend on firmware version and VM shape; events do not.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from eemini.tdx.eventlog import EventType
from eemini.tdx.pe import (
    DigestAlgorithm,
    PeError,
    PeImage,
    authenticode_digests,
    parse_pe,
    section_memory,
)

SHA256 = DigestAlgorithm.SHA256
SHA384 = DigestAlgorithm.SHA384


class MeasureError(ValueError):
    """The UKI cannot be predicted (the message says why)."""


def pcr_to_mr_index(pcr: int) -> int:
    """TDVF's PCR -> CC MR index map (UEFI 2.10 section 38.4.1; edk2 `TdxMeasurementMapPcrToMrIndex`):
    PCR 0 -> MRTD (0), 1 and 7 -> RTMR0 (1), 2-6 -> RTMR1 (2), 8-15 -> RTMR2 (3)."""
    if pcr == 0:
        return 0
    if pcr in (1, 7):
        return 1
    if 2 <= pcr <= 6:
        return 2
    if 8 <= pcr <= 15:
        return 3
    raise ValueError(f"PCR {pcr} has no TDX measurement register")


# systemd-stub's canonical section order (`unified_sections[]` in src/fundamental/uki.c, earlier
# tpm-pcr.c), by the version that introduced each list. `.pcrsig` is never measured.
_SECTIONS_252 = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrsig", ".pcrpkey")
_SECTIONS_254 = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".uname", ".sbat",
                 ".pcrsig", ".pcrpkey")  # fmt: skip
_SECTIONS_256 = (".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname",
                 ".sbat", ".pcrsig", ".pcrpkey")  # fmt: skip
_SECTIONS_257 = (*_SECTIONS_256, ".profile", ".dtbauto", ".hwids")
NOT_MEASURED = frozenset({".pcrsig"})
# Sections the stub turns into extra initrds (or prepends), which we do not reproduce.
_INITRD_EXTRAS = (".ucode", ".pcrsig", ".pcrpkey")

# Linux EFI stub tagged events (drivers/firmware/efi/libstub/efi-stub-helper.c).
LINUX_EVENT_LOAD_OPTIONS = 0x8F3B22ED
LINUX_EVENT_INITRD = 0x8F3B22EC


def canonical_sections(stub_major: int) -> tuple[str, ...]:
    if stub_major >= 257:
        return _SECTIONS_257
    if stub_major >= 256:
        return _SECTIONS_256
    if stub_major >= 254:
        return _SECTIONS_254
    return _SECTIONS_252


@dataclass(frozen=True, slots=True)
class PredictedEvent:
    """One event our image causes. `cc` says whether it reaches the TDX CC log (RTMRs) with the
    stub and kernel versions in the image; it always reaches a TPM log."""

    pcr: int
    event_type: EventType
    what: str
    sha384: bytes
    sha256: bytes
    cc: bool

    @property
    def mr_index(self) -> int:
        return pcr_to_mr_index(self.pcr)

    @property
    def rtmr(self) -> int:
        return self.mr_index - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "pcr": self.pcr,
            "rtmr": self.rtmr,
            "type": self.event_type.name,
            "what": self.what,
            "sha384": self.sha384.hex(),
            "sha256": self.sha256.hex(),
            "cc": self.cc,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PredictedEvent:
        try:
            pcr = int(obj["pcr"])
            if not 0 <= pcr <= 15:
                raise ValueError(f"PCR {pcr} is not one a boot measures into (0..15)")
            return cls(
                pcr=pcr,
                event_type=EventType[str(obj["type"])],
                what=str(obj["what"]),
                sha384=bytes.fromhex(str(obj["sha384"])),
                sha256=bytes.fromhex(str(obj["sha256"])),
                cc=bool(obj["cc"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MeasureError(f"malformed predicted event {obj!r:.200}: {e}") from None

    def label(self) -> str:
        return f"PCR{self.pcr}/RTMR{self.rtmr} {self.event_type.name} {self.what}"


@dataclass(frozen=True, slots=True)
class Prediction:
    uki_sha384: bytes
    uki_sha256: bytes
    stub_version: str
    kernel_version: str | None
    cmdline: str
    events: tuple[PredictedEvent, ...]

    def cc_events(self, vtpm: bool = False) -> tuple[PredictedEvent, ...]:
        """The events expected in the CC event log. With a vTPM beside TDX (GCP), the Linux stub
        measures into the TPM only (it uses the CC protocol only when TCG2 is absent), so its
        PCR 9 events are not expected there; systemd-stub >= v256 measures into both."""
        return tuple(e for e in self.events if e.cc and not (vtpm and e.pcr == 9))

    def to_json(self) -> dict[str, Any]:
        return {
            "uki_authenticode_sha384": self.uki_sha384.hex(),
            "uki_authenticode_sha256": self.uki_sha256.hex(),
            "stub_version": self.stub_version,
            "kernel_version": self.kernel_version,
            "cmdline": self.cmdline,
            "events": [e.to_json() for e in self.events],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Prediction:
        try:
            return cls(
                uki_sha384=bytes.fromhex(str(obj["uki_authenticode_sha384"])),
                uki_sha256=bytes.fromhex(str(obj["uki_authenticode_sha256"])),
                stub_version=str(obj["stub_version"]),
                kernel_version=None if obj["kernel_version"] is None else str(obj["kernel_version"]),
                cmdline=str(obj["cmdline"]),
                events=tuple(PredictedEvent.from_json(e) for e in obj["events"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise MeasureError(f"malformed measurement prediction: {e}") from None


def _event(pcr: int, etype: EventType, what: str, data: bytes, cc: bool) -> PredictedEvent:
    return PredictedEvent(
        pcr, etype, what, hashlib.sha384(data).digest(), hashlib.sha256(data).digest(), cc
    )


_SDMAGIC = re.compile(rb"#### LoaderInfo: systemd-stub (\S+) ####")


def stub_version(data: bytes, image: PeImage) -> tuple[str, int]:
    """systemd-stub's version from its `.sdmagic` marker (src/boot/efi/stub.c `magic[]`)."""
    section = image.section(".sdmagic")
    if section is None:
        raise MeasureError("no .sdmagic section: this UKI was not built on systemd-stub")
    m = _SDMAGIC.search(section_memory(data, section))
    if m is None:
        raise MeasureError("the .sdmagic section holds no 'LoaderInfo: systemd-stub VERSION' marker")
    version = m.group(1).decode("ascii", errors="replace")
    major = re.match(r"\d+", version)
    if major is None:
        raise MeasureError(f"cannot read systemd-stub version {version!r}")
    return version, int(major.group())


def kernel_version(uname: bytes | None, linux: bytes) -> str | None:
    """From `.uname`, else from the x86 boot protocol header of the kernel image: `kernel_version`
    (u16 at 0x20E) points to a NUL-terminated string at that offset + 0x200 (boot protocol 2.00+,
    Documentation/arch/x86/boot.rst)."""
    if uname:
        text = uname.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
        if text:
            return text
    if len(linux) >= 0x210 and linux[0x202:0x206] == b"HdrS":
        (ptr,) = struct.unpack_from("<H", linux, 0x20E)
        at = ptr + 0x200
        if ptr and at < len(linux):
            raw = linux[at : at + 256].split(b"\0", 1)[0].split(b" ", 1)[0]
            text = raw.decode("ascii", errors="replace")
            return text or None
    return None


def version_at_least(version: str | None, want: tuple[int, int]) -> bool:
    if version is None:
        return False
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= want


def _whitespace(c: str) -> bool:
    return ord(c) <= 0x20 or ord(c) == 0x7F


def stub_cmdline(section: bytes) -> str:
    """The command line systemd-stub passes on, from `.cmdline`'s in-memory bytes: UTF-8 up to the
    first NUL, then `mangle_stub_cmdline()` (src/boot/efi/util.c): leading whitespace and control
    characters dropped, inner ones turned into spaces, trailing ones chopped."""
    raw = section.split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MeasureError(f".cmdline is not valid UTF-8: {e}") from None
    chars = [" " if _whitespace(c) else c for c in text]
    while chars and chars[0] == " ":
        chars.pop(0)
    while chars and chars[-1] == " ":
        chars.pop()
    return "".join(chars)


def predict(data: bytes) -> Prediction:
    """Predict the measurement events of a UKI from its bytes."""
    try:
        image = parse_pe(data)
    except PeError as e:
        raise MeasureError(f"not a valid UKI: {e}") from None
    version, major = stub_version(data, image)
    if major < 252:
        raise MeasureError(f"systemd-stub {version} predates the UKI measurement rules (v252) we know")
    if image.section(".profile") is not None:
        raise MeasureError("multi-profile UKIs (.profile sections) are not supported")
    linux_section = image.section(".linux")
    if linux_section is None:
        raise MeasureError("the UKI has no .linux section")
    mem = {
        name: section_memory(data, s) for name in canonical_sections(major) if (s := image.section(name))
    }
    linux = mem[".linux"]
    uname = mem.get(".uname")
    kversion = kernel_version(uname, linux)

    digests = authenticode_digests(data)
    events = [
        PredictedEvent(
            4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION, "UKI (PE Authenticode)",
            digests[SHA384], digests[SHA256], cc=True,
        )
    ]  # fmt: skip
    # The stub measures into the CC protocol only from v256 (systemd#30996); TPM from v252.
    stub_cc = major >= 256
    for name in canonical_sections(major):
        if name in NOT_MEASURED or name not in mem or not mem[name]:
            continue  # absent or VirtualSize 0: the stub skips it
        events.append(
            _event(11, EventType.EV_IPL, f"section name {name}", name.encode() + b"\0", stub_cc)
        )
        events.append(_event(11, EventType.EV_IPL, f"section {name}", mem[name], stub_cc))

    if major < 258:
        # systemd#24777 (v252) .. systemd#37372 (v258): the stub LoadImage()s the in-memory .linux,
        # so the firmware measures it like any other application (Secure Boot off), after the stub
        # measured the sections.
        try:
            inner = authenticode_digests(linux)
        except PeError as e:
            raise MeasureError(f"the .linux section is not a PE image: {e}") from None
        events.append(
            PredictedEvent(
                4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION, "kernel from .linux (PE Authenticode)",
                inner[SHA384], inner[SHA256], cc=True,
            )
        )  # fmt: skip
    # Linux EFI stub: LoadOptions (>= 6.1) then the initrd (>= 5.17) to TCG2; to the CC protocol
    # only when no TCG2 protocol exists, from 6.9 (libstub "Measure into CC protocol if TCG2
    # protocol is absent").
    kernel_cc = version_at_least(kversion, (6, 9))
    cmdline = stub_cmdline(mem[".cmdline"]) if ".cmdline" in mem else ""
    if ".cmdline" in mem:
        # systemd-stub sets LoadOptionsSize = strsize16(cmdline): UTF-16LE with its NUL.
        load_options = (cmdline + "\0").encode("utf-16-le")
        events.append(
            _event(9, EventType.EV_EVENT_TAG, "kernel LoadOptions (cmdline)", load_options, kernel_cc)
        )
    if extras := [n for n in _INITRD_EXTRAS if n in mem]:
        raise MeasureError(
            f"the stub adds {', '.join(extras)} to the initrd it serves; that is not predicted"
        )
    initrd = served_initrd(mem, major)
    if initrd:
        events.append(
            _event(9, EventType.EV_EVENT_TAG, "initrd (as systemd-stub serves it)", initrd, kernel_cc)
        )

    return Prediction(
        uki_sha384=digests[SHA384],
        uki_sha256=digests[SHA256],
        stub_version=version,
        kernel_version=kversion,
        cmdline=cmdline,
        events=tuple(events),
    )


def _align4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _cpio_header(ino: int, mode: int, size: int, name: bytes) -> bytes:
    # newc header as systemd's src/boot/efi/cpio.c writes it: lowercase hex words, uid/gid 0,
    # nlink 1, mtime 0 (for stable measurements), devices 0, check 0.
    words = (ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name), 0)
    return b"070701" + b"".join(b"%08x" % w for w in words) + name


# cpio.c pack_cpio_trailer: note the upper-case "B" in the name size, and the fourth NUL.
_CPIO_TRAILER = b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000"
_CPIO_TRAILER += b"TRAILER!!!\0\0\0\0"


def stub_cpio(directory: str, filename: str, data: bytes) -> bytes:
    """systemd-stub's `pack_cpio_literal()` archive: the directory (mode 0555), one file (0444),
    the trailer; every record padded to 4 bytes."""
    out = _align4(_cpio_header(1, 0o040555, 0, directory.encode() + b"\0"))
    out += _align4(_cpio_header(2, 0o100444, len(data), f"{directory}/{filename}".encode() + b"\0"))
    out = _align4(out + data)
    return out + _CPIO_TRAILER


def served_initrd(mem: Mapping[str, bytes], stub_major: int) -> bytes:
    """The initrd systemd-stub hands to the kernel (LINUX_INITRD_MEDIA_GUID), which the kernel
    measures: `.initrd`, then (v257+, stub.c `generate_embedded_initrds`) a cpio carrying `.osrel`
    as /.extra/os-release. Several parts are concatenated, each padded to 4 bytes
    (`combine_initrds`); a single part is served as it is."""
    parts = []
    if mem.get(".initrd"):
        parts.append(mem[".initrd"])
    if stub_major >= 257 and ".osrel" in mem:
        parts.append(stub_cpio(".extra", "os-release", mem[".osrel"]))
    if len(parts) == 1:
        return parts[0]
    return b"".join(_align4(p) for p in parts)


def describe(prediction: Prediction) -> Iterable[str]:
    """Human-readable lines for `eemini measure`."""
    yield f"UKI Authenticode sha384 {prediction.uki_sha384.hex()}"
    yield f"UKI Authenticode sha256 {prediction.uki_sha256.hex()}"
    yield f"systemd-stub {prediction.stub_version}, kernel {prediction.kernel_version or 'unknown'}"
    yield f"cmdline {prediction.cmdline!r}"
    for e in prediction.events:
        where = f"PCR{e.pcr:<2} RTMR{e.rtmr}" if e.cc else f"PCR{e.pcr:<2} (TPM only)"
        yield f"{where}  {e.event_type.name:<32} {e.sha384.hex()}  {e.what}"
