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
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from eemini.tdx.errors import CertificateParseError, QuoteError
from eemini.tdx.guard import parsing

SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_OID_PPID = SGX_EXTENSIONS_OID + ".1"
_OID_TCB = SGX_EXTENSIONS_OID + ".2"
_OID_PCEID = SGX_EXTENSIONS_OID + ".3"
_OID_FMSPC = SGX_EXTENSIONS_OID + ".4"
_OID_SGX_TYPE = SGX_EXTENSIONS_OID + ".5"
_OID_PLATFORM_INSTANCE_ID = SGX_EXTENSIONS_OID + ".6"
_OID_PCESVN = _OID_TCB + ".17"
_OID_CPUSVN = _OID_TCB + ".18"

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
    data: bytes, what: str, error: ParseErrorType = CertificateParseError
) -> list[tuple[int, int, int, int]]:
    """Split DER `data` into (tag, header start, value start, value end) offsets."""
    out: list[tuple[int, int, int, int]] = []
    pos = 0
    size = len(data)
    while pos < size:
        if size - pos < 2:
            raise error(f"{what}: truncated DER at byte {pos}")
        tag = data[pos]
        head = pos
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or size - pos < n:
                raise error(f"{what}: bad DER length at byte {pos - 1}")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        end = pos + length
        if end > size:
            raise error(f"{what}: DER value overruns its container at byte {pos}")
        out.append((tag, head, pos, end))
        pos = end
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


def _pairs(der: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """SEQUENCE OF SEQUENCE { OID, value } -> {oid: (tag, value)}."""
    outer = split_der(der, what)
    if len(outer) != 1 or outer[0][0] != _TAG_SEQUENCE:
        raise CertificateParseError(f"{what}: expected one SEQUENCE")
    result: dict[str, tuple[int, bytes]] = {}
    for tag, item in split_der(outer[0][1], what):
        parts = split_der(item, what) if tag == _TAG_SEQUENCE else []
        if len(parts) != 2 or parts[0][0] != _TAG_OID:
            raise CertificateParseError(f"{what}: expected SEQUENCE {{ OID, value }}")
        result[oid_text(parts[0][1])] = parts[1]
    return result


def _get(pairs: dict[str, tuple[int, bytes]], oid: str, tag: int, size: int | None = None) -> bytes:
    if oid not in pairs:
        raise CertificateParseError(f"PCK certificate SGX extension: {oid} is missing")
    got_tag, value = pairs[oid]
    if got_tag != tag or (size is not None and len(value) != size):
        want = f"tag 0x{tag:02x}" + (f" of {size} bytes" if size is not None else "")
        raise CertificateParseError(
            f"PCK certificate SGX extension: {oid} expected {want}, "
            f"found tag 0x{got_tag:02x} of {len(value)} bytes"
        )
    return value


def _uint(pairs: dict[str, tuple[int, bytes]], oid: str, tag: int = _TAG_INTEGER) -> int:
    value = _get(pairs, oid, tag)
    if not value or len(value) > 3 or value[0] & 0x80:
        raise CertificateParseError(
            f"PCK certificate SGX extension: {oid} is not a small unsigned integer"
        )
    return int.from_bytes(value, "big")


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Decode the Intel SGX extensions of a PCK leaf certificate."""
    with parsing(CertificateParseError, "PCK certificate extensions do not parse"):
        sgx = [e for e in cert.extensions if e.oid.dotted_string == SGX_EXTENSIONS_OID]
    if not sgx:
        raise CertificateParseError("PCK certificate has no Intel SGX extension")
    value = sgx[0].value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateParseError("PCK certificate SGX extension has an unexpected type")
    top = _pairs(value.value, "PCK certificate SGX extension")
    tcb = _pairs(_seq(top, _OID_TCB), "SGX TCB")
    components = tuple(_uint(tcb, f"{_OID_TCB}.{i}") for i in range(1, 17))
    if any(c > 255 for c in components):
        raise CertificateParseError("PCK certificate SGX extension: a TCB component SVN exceeds 255")
    pce_svn = _uint(tcb, _OID_PCESVN)
    if pce_svn > 0xFFFF:
        raise CertificateParseError("PCK certificate SGX extension: PCESVN exceeds 65535")
    platform_instance = top.get(_OID_PLATFORM_INSTANCE_ID)
    return PckExtension(
        ppid=_get(top, _OID_PPID, _TAG_OCTET_STRING, 16),
        tcb_components=components,
        pce_svn=pce_svn,
        cpu_svn=_get(tcb, _OID_CPUSVN, _TAG_OCTET_STRING, 16),
        pce_id=_get(top, _OID_PCEID, _TAG_OCTET_STRING, 2),
        fmspc=_get(top, _OID_FMSPC, _TAG_OCTET_STRING, 6),
        sgx_type=_uint(top, _OID_SGX_TYPE, _TAG_ENUMERATED),
        platform_instance_id=platform_instance[1] if platform_instance else None,
    )


def _seq(pairs: dict[str, tuple[int, bytes]], oid: str) -> bytes:
    # Re-wrap the TCB SEQUENCE's contents so _pairs can read it like the top level.
    inner = _get(pairs, oid, _TAG_SEQUENCE)
    return _der_wrap(_TAG_SEQUENCE, inner)


def _der_wrap(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_EOL = b"\r\n"


def pem_ders(pem: bytes, what: str) -> list[bytes]:
    """The DER certificates of a concatenated PEM chain, leaf first.

    Strict, so that no change of the (unsigned) PEM text leaves the chain as it was: between and
    around the blocks only line breaks, and NULs at the very end (real quotes end with one); inside
    a block only base64 in its canonical form, and line breaks (RFC 7468 section 3, any line length).
    """
    text = pem.rstrip(b"\0")
    ders: list[bytes] = []
    pos = 0
    while True:
        start = text.find(_PEM_BEGIN, pos)
        gap = text[pos : start if start >= 0 else len(text)]
        if gap.translate(None, _EOL):
            where = f"after certificate {len(ders) - 1}" if ders else "before the first certificate"
            raise CertificateParseError(
                f"{what}: unexpected bytes {where} (only line breaks may separate PEM certificates)"
            )
        if start < 0:
            break
        body = start + len(_PEM_BEGIN)
        end = text.find(_PEM_END, body)
        if end < 0:
            raise CertificateParseError(f"{what}: certificate {len(ders)} has no END line")
        ders.append(_pem_body_der(text[body:end], what, len(ders)))
        pos = end + len(_PEM_END)
    if not ders:
        raise CertificateParseError(f"{what}: no PEM certificate found")
    return ders


def _pem_body_der(body: bytes, what: str, index: int) -> bytes:
    b64 = body.translate(None, _EOL)
    with parsing(CertificateParseError, f"{what}: certificate {index} is not valid base64"):
        der = binascii.a2b_base64(b64, strict_mode=True)
    if not der:
        raise CertificateParseError(f"{what}: certificate {index} is empty")
    if binascii.b2a_base64(der, newline=False) != b64:
        # Non-zero bits after the last byte: another text for the same DER.
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
