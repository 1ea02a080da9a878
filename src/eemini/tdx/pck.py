"""The PCK certificate chain and the Intel SGX extensions of the PCK leaf certificate.

The extensions (OID 1.2.840.113741.1.13.1) are specified in "Intel SGX PCK Certificate and
Certificate Revocation List Profile Specification", section 1.3.5: a SEQUENCE of
SEQUENCE { OID, value }: PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCE-ID, FMSPC, SGX Type,
then optional platform-CA fields. `cryptography` hands us the extension as raw DER; the small
reader below decodes just what the profile uses.
"""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from eemini.tdx.errors import CertificateParseError, QuoteError
from eemini.tdx.guard import parsing

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_ENUMERATED = 0x0A
_TAG_SEQUENCE = 0x30


@dataclass(frozen=True, slots=True)
class PckExtension:
    ppid: bytes
    tcb_components: tuple[int, ...]  # the 16 SGX TCB component SVNs (OIDs .2.1 to .2.16)
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None


ParseErrorType = Callable[[str], QuoteError]


def split_der(
    data: bytes, what: str, error: ParseErrorType = CertificateParseError
) -> list[tuple[int, bytes]]:
    """Split DER `data` into (tag, value) pairs; raises `error` on malformed input."""
    return [(tag, data[start:end]) for tag, _, start, end in der_spans(data, what, error)]


def der_spans(
    data: bytes,
    what: str,
    error: ParseErrorType = CertificateParseError,
    start: int = 0,
    end: int | None = None,
) -> list[tuple[int, int, int, int]]:
    """Split DER `data[start:end]` into (tag, header start, value start, value end) offsets, taken
    in `data` (so no slice is copied); byte numbers in messages count from `start`."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    size = len(data) if end is None else end
    while pos < size:
        if size - pos < 2:
            raise error(f"{what}: truncated DER at byte {pos - start}")
        tag = data[pos]
        head = pos
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or size - pos < n:
                raise error(f"{what}: bad DER length at byte {pos - 1 - start}")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        value_end = pos + length
        if value_end > size:
            raise error(f"{what}: DER value overruns its container at byte {pos - start}")
        out.append((tag, head, pos, value_end))
        pos = value_end
    return out


@functools.lru_cache(maxsize=512)
def oid_text(value: bytes) -> str:
    """The dotted form of an OBJECT IDENTIFIER's contents."""
    if not value:
        return ""
    parts = [value[0] // 40, value[0] % 40]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


# OBJECT IDENTIFIER contents of the SGX extensions (1.2.840.113741.1.13.1) and their members.
_OID_SGX = bytes.fromhex("2a864886f84d010d01")
_OID_PPID = _OID_SGX + b"\x01"
_OID_TCB = _OID_SGX + b"\x02"
_OID_PCEID = _OID_SGX + b"\x03"
_OID_FMSPC = _OID_SGX + b"\x04"
_OID_SGX_TYPE = _OID_SGX + b"\x05"
_OID_PLATFORM_INSTANCE_ID = _OID_SGX + b"\x06"
_OID_COMPONENTS = tuple(_OID_TCB + bytes([i]) for i in range(1, 17))
_OID_PCESVN = _OID_TCB + b"\x11"
_OID_CPUSVN = _OID_TCB + b"\x12"

# The TCB SEQUENCE as Intel's PCK certificates hold it: exactly its 18 members, in the profile's
# order, each SVN an INTEGER of one byte below 0x80 (its only DER form), CPUSVN 16 bytes. A match
# reads what _members and _uint would (by OID, in any order); anything else is read by them.
_CANONICAL_TCB = re.compile(
    b"".join(
        b"\x30\x10\x06\x0b" + re.escape(oid) + b"\x02\x01([\x00-\x7f])"
        for oid in (*_OID_COMPONENTS, _OID_PCESVN)
    )
    + b"\x30\x1f\x06\x0b"
    + re.escape(_OID_CPUSVN)
    + b"\x04\x10(.{16})",
    re.DOTALL,
)

# (tag, value start, value end) of one member's value, in the extension's bytes.
_Member = tuple[int, int, int]


def _tlv(der: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """One DER element at der[pos:end]: (tag, value start, value end)."""
    if end - pos < 2:
        raise CertificateParseError(f"{what}: truncated DER at byte {pos}")
    tag = der[pos]
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or end - pos < n:
            raise CertificateParseError(f"{what}: bad DER length at byte {pos - 1}")
        length = int.from_bytes(der[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise CertificateParseError(f"{what}: DER value overruns its container at byte {pos}")
    return tag, pos, pos + length


def _members(der: bytes, start: int, end: int, what: str) -> dict[bytes, _Member]:
    """The contents der[start:end] of a SEQUENCE OF SEQUENCE { OID, value } -> {OID contents: value}.

    The hot path of a first verification: the OID's header is read inline (its length is always
    short-form here; a long-form one is refused), the value's too when its length is short-form."""
    result: dict[bytes, _Member] = {}
    pos = start
    while pos < end:
        tag = der[pos]
        if pos + 1 < end and der[pos + 1] < 0x80:  # a short-form length, read in place
            item, pos = pos + 2, pos + 2 + der[pos + 1]
            if pos > end:
                tag, item, pos = _tlv(der, item - 2, end, what)  # raises, naming the fault
        else:
            tag, item, pos = _tlv(der, pos, end, what)
        oid_end = item + 2 + der[item + 1] if tag == _TAG_SEQUENCE and pos - item >= 4 else 0
        if der[item] != _TAG_OID or der[item + 1] & 0x80 or oid_end + 2 > pos:
            raise CertificateParseError(f"{what}: expected SEQUENCE {{ OID, value }}")
        length = der[oid_end + 1]
        if length & 0x80:
            value = _tlv(der, oid_end, pos, what)
        else:
            value = (der[oid_end], oid_end + 2, oid_end + 2 + length)
        if value[2] != pos:
            raise CertificateParseError(f"{what}: expected SEQUENCE {{ OID, value }}")
        oid = der[item + 2 : oid_end]
        if oid in result:
            raise CertificateParseError(f"{what}: {oid_text(oid)} appears twice")
        result[oid] = value
    return result


def _get(
    der: bytes, pairs: dict[bytes, _Member], oid: bytes, tag: int, size: int | None = None
) -> bytes:
    member = pairs.get(oid)
    if member is None:
        raise CertificateParseError(f"PCK certificate SGX extension: {oid_text(oid)} is missing")
    got_tag, start, end = member
    if got_tag != tag or (size is not None and end - start != size):
        want = f"tag 0x{tag:02x}" + (f" of {size} bytes" if size is not None else "")
        raise CertificateParseError(
            f"PCK certificate SGX extension: {oid_text(oid)} expected {want}, "
            f"found tag 0x{got_tag:02x} of {end - start} bytes"
        )
    return der[start:end]


def _uint(der: bytes, pairs: dict[bytes, _Member], oid: bytes, tag: int = _TAG_INTEGER) -> int:
    value = _get(der, pairs, oid, tag)
    if not value or len(value) > 3 or value[0] & 0x80:
        raise CertificateParseError(
            f"PCK certificate SGX extension: {oid_text(oid)} is not a small unsigned integer"
        )
    return int.from_bytes(value, "big")


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Decode the Intel SGX extensions of a PCK leaf certificate (read through cryptography)."""
    with parsing(CertificateParseError, "PCK certificate extensions do not parse"):
        sgx = [e for e in cert.extensions if e.oid.dotted_string == SGX_EXTENSIONS_OID]
    if not sgx:
        raise CertificateParseError("PCK certificate has no Intel SGX extension")
    value = sgx[0].value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateParseError("PCK certificate SGX extension has an unexpected type")
    return parse_pck_extension_value(value.value)


def parse_pck_extension_value(der: bytes) -> PckExtension:
    """Decode the SGX extension's value (the DER inside its extnValue OCTET STRING)."""
    what = "PCK certificate SGX extension"
    outer = der_spans(der, what)
    if len(outer) != 1 or outer[0][0] != _TAG_SEQUENCE:
        raise CertificateParseError(f"{what}: expected one SEQUENCE")
    top = _members(der, outer[0][2], outer[0][3], what)
    _get(der, top, _OID_TCB, _TAG_SEQUENCE)  # present, and a SEQUENCE
    _, tcb_start, tcb_end = top[_OID_TCB]
    canonical = _CANONICAL_TCB.fullmatch(der, tcb_start, tcb_end)
    if canonical is not None:
        *svns, cpu_svn = canonical.groups()
        components, pce_svn = tuple(b"".join(svns[:16])), svns[16][0]
    else:
        tcb = _members(der, tcb_start, tcb_end, "SGX TCB")
        components = tuple(_uint(der, tcb, oid) for oid in _OID_COMPONENTS)
        if any(c > 255 for c in components):
            raise CertificateParseError("PCK certificate SGX extension: a TCB component SVN exceeds 255")
        pce_svn = _uint(der, tcb, _OID_PCESVN)
        if pce_svn > 0xFFFF:
            raise CertificateParseError("PCK certificate SGX extension: PCESVN exceeds 65535")
        cpu_svn = _get(der, tcb, _OID_CPUSVN, _TAG_OCTET_STRING, 16)
    platform_instance = top.get(_OID_PLATFORM_INSTANCE_ID)
    return PckExtension(
        ppid=_get(der, top, _OID_PPID, _TAG_OCTET_STRING, 16),
        tcb_components=components,
        pce_svn=pce_svn,
        cpu_svn=cpu_svn,
        pce_id=_get(der, top, _OID_PCEID, _TAG_OCTET_STRING, 2),
        fmspc=_get(der, top, _OID_FMSPC, _TAG_OCTET_STRING, 6),
        sgx_type=_uint(der, top, _OID_SGX_TYPE, _TAG_ENUMERATED),
        platform_instance_id=(
            der[platform_instance[1] : platform_instance[2]] if platform_instance else None
        ),
    )


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_EOL = b"\r\n"


def pem_ders(pem: bytes, what: str) -> list[bytes]:
    """The DER certificates of a concatenated PEM chain, leaf first.

    Strict, so that no change of the (unsigned) PEM text leaves the chain as it was: between and
    around the blocks only line breaks, and NULs at the very end (real quotes end with one); inside
    a block only base64 in its canonical form, and line breaks (RFC 7468 section 3, any line length).
    """
    return [pem_body_der(body, what, i) for i, body in enumerate(pem_bodies(pem, what))]


def pem_bodies(pem: bytes, what: str) -> list[bytes]:
    """The text between each BEGIN and END line of a PEM chain (what `pem_body_der` decodes), with
    the rules of `pem_ders` for what lies between the blocks."""
    text = pem.rstrip(b"\0")
    bodies: list[bytes] = []
    pos = 0
    while True:
        start = text.find(_PEM_BEGIN, pos)
        gap = text[pos : start if start >= 0 else len(text)]
        if gap.translate(None, _EOL):
            where = f"after certificate {len(bodies) - 1}" if bodies else "before the first certificate"
            raise CertificateParseError(
                f"{what}: unexpected bytes {where} (only line breaks may separate PEM certificates)"
            )
        if start < 0:
            break
        body = start + len(_PEM_BEGIN)
        end = text.find(_PEM_END, body)
        if end < 0:
            raise CertificateParseError(f"{what}: certificate {len(bodies)} has no END line")
        bodies.append(text[body:end])
        pos = end + len(_PEM_END)
    if not bodies:
        raise CertificateParseError(f"{what}: no PEM certificate found")
    return bodies


def pem_body_der(body: bytes, what: str, index: int) -> bytes:
    """The DER of one PEM block's body: canonical base64 and line breaks only."""
    b64 = body.translate(None, _EOL)
    with parsing(CertificateParseError, f"{what}: certificate {index} is not valid base64"):
        der = binascii.a2b_base64(b64, strict_mode=True)
    if not der:
        raise CertificateParseError(f"{what}: certificate {index} is empty")
    # Strict decoding leaves one freedom, in the last group of four characters: bits after the
    # last byte that are not zero (another text for the same DER). Encoding the bytes of that
    # group again tells, as encoding all of them would.
    if binascii.b2a_base64(der[-(len(der) % 3 or 3) :], newline=False) != b64[-4:]:
        raise CertificateParseError(f"{what}: certificate {index} is not canonical base64")
    return der


def _load_certificate(
    load: Callable[[bytes], x509.Certificate], data: bytes, what: str
) -> x509.Certificate:
    with parsing(CertificateParseError, what):
        cert = load(data)
        # cryptography decodes these lazily; touch what the checks read from it now, so that a
        # malformed certificate fails here, as a parse error, not in the middle of a check. Names
        # and extensions are read from the DER by chain.py (building cryptography's Name objects
        # is the costly part of a first verification); the PCK's extensions, in parse_pck_extension.
        _ = (cert.version, cert.serial_number, cert.signature_hash_algorithm)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
    return cert


def load_pem_certificate(pem: bytes, what: str) -> x509.Certificate:
    """One PEM certificate; `what` says what it is ("development root is not a PEM certificate")."""
    return _load_certificate(x509.load_pem_x509_certificate, pem, what)


def load_der_certificate(der: bytes, what: str, index: int) -> x509.Certificate:
    return _load_certificate(
        x509.load_der_x509_certificate, der, f"{what}: certificate {index} does not parse"
    )


def load_pem_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    """Certificates of a concatenated PEM chain, leaf first."""
    return [load_der_certificate(der, what, i) for i, der in enumerate(pem_ders(pem, what))]
