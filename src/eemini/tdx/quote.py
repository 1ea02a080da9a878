"""The TDX quote object model: typed frozen dataclasses built from the layouts in
`eemini.guest.quote_layout`.

`parse_quote(data)` is the one entry point. Every read goes through `_Reader.take`, which raises
`QuoteParseError` naming the field, its offset, what was expected and what was found; nothing here
raises anything else on any input (the fuzz tests hold it to that).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from eemini.guest import quote_layout as layout
from eemini.guest.quote_layout import AttestationKeyType, BodyType, CertificationDataType, TeeType
from eemini.tdx.errors import QuoteParseError
from eemini.tdx.guard import parsing


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


class TdAttribute(enum.Flag):
    """Named bits of TD_ATTRIBUTES (TDX module ABI spec, TDINFO_STRUCT)."""

    DEBUG = layout.TD_ATTR_DEBUG
    SEPT_VE_DISABLE = layout.TD_ATTR_SEPT_VE_DISABLE
    PKS = layout.TD_ATTR_PKS
    KL = layout.TD_ATTR_KL
    PERFMON = layout.TD_ATTR_PERFMON


@dataclass(frozen=True, slots=True)
class TdReport:
    """A TD report body: TDX 1.0 (584 bytes), or 1.5 with `tee_tcb_svn2` and `mr_servicetd` (648)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def is_tdx15(self) -> bool:
        return self.mr_servicetd is not None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def td_attributes_value(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def td_attribute_names(self) -> tuple[str, ...]:
        value = self.td_attributes_value
        return tuple(str(f.name) for f in TdAttribute if f.value & value)

    @property
    def debug(self) -> bool:
        # Any bit of the TUD group (7:0) means the TD is not a production TD; bit 0 is DEBUG.
        return self.td_attributes_value & layout.TD_ATTR_TUD_MASK != 0

    @property
    def sept_ve_disable(self) -> bool:
        return self.td_attributes_value & layout.TD_ATTR_SEPT_VE_DISABLE != 0

    @property
    def reserved_attributes(self) -> int:
        mask = (
            layout.TD_ATTR_SEC_RESERVED_MASK
            | layout.TD_ATTR_SEC_RESERVED_BIT29
            | layout.TD_ATTR_OTHER_RESERVED_MASK
        )
        return self.td_attributes_value & mask


@dataclass(frozen=True, slots=True)
class EnclaveReport:
    """An SGX REPORT body: here always the quoting enclave's report."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class CertificationData:
    """Certification data type 6 (QE report certification data) wrapping type 5 (PEM PCK chain)."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_type: int
    pck_chain_pem: bytes


@dataclass(frozen=True, slots=True)
class SignatureData:
    signature: bytes
    attestation_key: bytes
    certification: CertificationData


@dataclass(frozen=True, slots=True)
class Quote:
    header: QuoteHeader
    body_type: BodyType
    report: TdReport
    signature_data: SignatureData
    signed_data: bytes  # header (+ v5 body descriptor) + body: what the attestation key signed
    length: int  # bytes the quote occupies; the input may be longer (padding is tolerated)
    trailing: int


class _Reader:
    """Sequential reads within [pos, end) of `data`; every shortfall is a QuoteParseError."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, field: str, n: int) -> bytes:
        if self.end - self.pos < n:
            raise QuoteParseError(
                field, self.pos, f"{n} bytes", f"{max(self.end - self.pos, 0)} (quote truncated)"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(field, 2), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(field, 4), "little")


def _enum_name(enum_cls: type[enum.IntEnum], value: int) -> str:
    try:
        return f"{value} ({enum_cls(value).name})"
    except ValueError:
        return f"{value} (unknown)"


def _parse_header(r: _Reader) -> QuoteHeader:
    start = r.pos
    raw = r.take("header", layout.HEADER_SIZE)
    version, key_type, tee_type, qe_svn, pce_svn, vendor, user = layout.HEADER_STRUCT.unpack(raw)
    if version not in (4, 5):
        raise QuoteParseError("header.version", start, "4 or 5 (TDX quote)", str(version))
    if key_type != AttestationKeyType.ECDSA_P256:
        raise QuoteParseError(
            "header.attestation_key_type",
            start + 2,
            "2 (ECDSA_P256)",
            _enum_name(AttestationKeyType, key_type),
        )
    if tee_type != TeeType.TDX:
        raise QuoteParseError("header.tee_type", start + 4, "0x00000081 (TDX)", f"0x{tee_type:08x}")
    return QuoteHeader(version, key_type, tee_type, qe_svn, pce_svn, vendor, user)


def _report_struct(fields: tuple[tuple[str, int], ...]) -> struct.Struct:
    # TdReport's fields are the layout's, in its order: a report is built from one unpack.
    names = tuple(f.name for f in dataclasses.fields(TdReport))
    if names[: len(fields)] != tuple(name for name, _ in fields):
        raise AssertionError("TdReport's fields are not the layout's, in order")
    return struct.Struct("".join(f"{width}s" for _, width in fields))


_TD_REPORT_10_STRUCT = _report_struct(layout.TD_REPORT_10_FIELDS)
_TD_REPORT_15_STRUCT = _report_struct(layout.TD_REPORT_10_FIELDS + layout.TD_REPORT_15_EXTRA_FIELDS)


def _parse_td_report(r: _Reader, tdx15: bool) -> TdReport:
    unpack = _TD_REPORT_15_STRUCT if tdx15 else _TD_REPORT_10_STRUCT
    if r.end - r.pos < unpack.size:
        fields = layout.TD_REPORT_10_FIELDS + (layout.TD_REPORT_15_EXTRA_FIELDS if tdx15 else ())
        for name, width in fields:  # the first field cut short raises, naming itself
            r.take(f"td_report.{name}", width)
    return TdReport(*unpack.unpack(r.take("td_report", unpack.size)))


def _parse_enclave_report(r: _Reader, field: str) -> EnclaveReport:
    raw = r.take(field, layout.ENCLAVE_REPORT_SIZE)
    (cpu_svn, misc, _r1, attributes, mr_enclave, _r2, mr_signer, _r3, prod_id, isv_svn, _r4, data) = (
        layout.ENCLAVE_REPORT_STRUCT.unpack(raw)
    )
    return EnclaveReport(cpu_svn, misc, attributes, mr_enclave, mr_signer, prod_id, isv_svn, data, raw)


def _certification_type(r: _Reader, field: str, want: CertificationDataType) -> int:
    at = r.pos
    got = r.u16(field)
    if got != want:
        raise QuoteParseError(
            field, at, f"{want.value} ({want.name})", _enum_name(CertificationDataType, got)
        )
    return got


def _parse_certification(r: _Reader) -> CertificationData:
    # A.3.9 / A.3.10: outer certification data must be type 6, whose body is the QE report, its
    # signature, the QE authentication data and an inner certification data (type 5 PEM chain).
    _certification_type(r, "certification_data.type", CertificationDataType.QE_REPORT_CERTIFICATION_DATA)
    size_at = r.pos
    size = r.u32("certification_data.size")
    if size > r.end - r.pos:
        raise QuoteParseError(
            "certification_data.size", size_at, f"at most {r.end - r.pos} (bytes left)", str(size)
        )
    inner = _Reader(r.data, r.pos, r.pos + size)
    qe_report = _parse_enclave_report(inner, "qe_report")
    qe_sig = inner.take("qe_report_signature", layout.ECDSA_SIGNATURE_SIZE)
    auth_len = inner.u16("qe_auth_data.size")
    auth = inner.take("qe_auth_data", auth_len)
    ptype = _certification_type(
        inner, "pck_certification_data.type", CertificationDataType.PCK_CERT_CHAIN
    )
    psize_at = inner.pos
    psize = inner.u32("pck_certification_data.size")
    if psize != inner.end - inner.pos:
        raise QuoteParseError(
            "pck_certification_data.size",
            psize_at,
            f"{inner.end - inner.pos} (the rest of certification data)",
            str(psize),
        )
    pem = inner.take("pck_certification_data", psize)
    r.pos = inner.pos
    return CertificationData(qe_report, qe_sig, auth, ptype, pem)


def parse_quote(data: bytes) -> Quote:
    """Parse a TDX quote v4 or v5; trailing bytes after it (padding) are tolerated and counted."""
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    # Every read checks its bounds (`_Reader.take`); the guard is for what they do not foresee.
    with parsing(_malformed, "a malformed structure"):
        return _parse(data)


def _malformed(message: str) -> QuoteParseError:
    return QuoteParseError("quote", 0, "a well-formed TDX quote", message)


def _parse(data: bytes) -> Quote:
    r = _Reader(data)
    header = _parse_header(r)
    if header.version == 4:
        body_type = BodyType.TD_REPORT_10
    else:
        at = r.pos
        raw_type = r.u16("body.type")
        size = r.u32("body.size")
        if raw_type not in layout.BODY_SIZES:
            raise QuoteParseError(
                "body.type", at, "2 (TD_REPORT_10) or 3 (TD_REPORT_15)", _enum_name(BodyType, raw_type)
            )
        body_type = BodyType(raw_type)
        want = layout.BODY_SIZES[body_type]
        if size != want:
            raise QuoteParseError(
                "body.size", at + 2, f"{want} for body type {body_type.name}", str(size)
            )
    report = _parse_td_report(r, tdx15=body_type == BodyType.TD_REPORT_15)
    signed_end = r.pos
    len_at = r.pos
    sig_len = r.u32("signature_data.size")
    if sig_len > r.end - r.pos:
        raise QuoteParseError(
            "signature_data.size", len_at, f"at most {r.end - r.pos} (bytes left)", str(sig_len)
        )
    s = _Reader(data, r.pos, r.pos + sig_len)
    signature = s.take("signature_data.signature", layout.ECDSA_SIGNATURE_SIZE)
    key = s.take("signature_data.attestation_key", layout.ECDSA_KEY_SIZE)
    certification = _parse_certification(s)
    if s.pos != s.end:
        raise QuoteParseError(
            "signature_data.size",
            len_at,
            f"{s.pos - len_at - 4} (the size of its contents)",
            str(sig_len),
        )
    return Quote(
        header=header,
        body_type=body_type,
        report=report,
        signature_data=SignatureData(signature, key, certification),
        signed_data=data[:signed_end],
        length=s.end,
        trailing=len(data) - s.end,
    )


def report_fields(report: TdReport) -> dict[str, bytes]:
    """The report's byte fields in layout order (TDX 1.5 fields only when present)."""
    return {
        f.name: v for f in dataclasses.fields(report) if isinstance(v := getattr(report, f.name), bytes)
    }
