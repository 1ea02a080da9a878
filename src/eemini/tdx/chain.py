"""Certificate chains, CRLs and the verification cache: the X.509 mechanics under `verify`.

Certificates are parsed by `cryptography`; their names are compared as DER bytes and their
ECDSA-SHA256 signatures checked over the signed TBS bytes as they appear in the DER (RFC 5280
4.1 and 5.1), which avoids re-encoding; anything else goes through cryptography's own X.509 checks.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from eemini.tdx.collateral import QeIdentity, TcbInfo
from eemini.tdx.errors import (
    CertificateChainError,
    CertificateExpired,
    CertificateParseError,
    CollateralExpired,
    CrlInvalid,
    UntrustedRoot,
)
from eemini.tdx.guard import parsing, utf8
from eemini.tdx.pck import (
    ParseErrorType,
    PckExtension,
    der_spans,
    oid_text,
    parse_pck_extension_value,
    pem_bodies,
    pem_body_der,
    split_der,
)
from eemini.tdx.roots import TrustAnchor

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class Cert:
    """A parsed certificate with what the checks compare, read once (names as DER bytes).

    `name` (the subject's common name, for messages) is read from the DER only when a message
    needs it: the hot path of a verification never does.
    """

    __slots__ = ("_name", "cert", "der", "fingerprint", "issuer", "key", "not_after", "not_before",
                 "serial", "signed", "subject")  # fmt: skip

    def __init__(
        self,
        *,
        cert: x509.Certificate,
        der: bytes,
        fingerprint: bytes,
        serial: int,
        subject: bytes,
        issuer: bytes,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        key: ec.EllipticCurvePublicKey | None,
        signed: SignedDer,
    ) -> None:
        self.cert = cert
        self.der = der
        self.fingerprint = fingerprint
        self.serial = serial
        self.subject = subject
        self.issuer = issuer
        self.not_before = not_before
        self.not_after = not_after
        self.key = key
        self.signed = signed
        self._name: str | None = None

    @property
    def name(self) -> str:
        if self._name is None:
            try:
                self._name = common_name(self.subject, "certificate subject")
            except CertificateParseError:
                self._name = "(a certificate whose subject does not parse)"
        return self._name


# AlgorithmIdentifier contents of ecdsa-with-SHA256 (RFC 5758 3.2: OID 1.2.840.10045.4.3.2, no
# parameters): what every Intel PCK, TCB signing and CA certificate and CRL is signed with.
_ECDSA_WITH_SHA256 = bytes.fromhex("06082a8648ce3d040302")


@dataclass(frozen=True, slots=True)
class SignedDer:
    """A DER certificate or CRL cut into what its signature covers (RFC 5280 4.1 and 5.1)."""

    tbs: bytes  # the whole TBSCertificate / TBSCertList TLV: the signed bytes
    fields: tuple[bytes, ...]  # the TBS fields' values, in order
    field_tags: tuple[int, ...]
    algorithm: bytes  # outer signatureAlgorithm contents
    signature: bytes  # DER ECDSA-Sig-Value, from the BIT STRING


def split_signed(der: bytes, what: str, error: ParseErrorType = CertificateParseError) -> SignedDer:
    # The usual DER (one SEQUENCE { SEQUENCE, SEQUENCE, BIT STRING }, nothing after it): the four
    # headers read in place. Anything else goes through the general reader, which names the fault.
    size = len(der)
    try:
        tag, start, end = _head(der, 0)
        if tag != 0x30 or end != size:
            raise ValueError
        tag, tbs_start, tbs_end = _head(der, start)
        tag2, alg_start, alg_end = _head(der, tbs_end)
        tag3, bits_start, bits_end = _head(der, alg_end)
        if tag != 0x30 or tag2 != 0x30 or tag3 != 0x03 or bits_end != size:
            raise ValueError
    except (ValueError, IndexError):  # not converted: the general reader names the fault
        return _split_signed(der, what, error)
    spans = der_spans(der, what, error, tbs_start, tbs_end)
    return SignedDer(
        tbs=der[start:tbs_end],
        fields=tuple([der[a:b] for _, _, a, b in spans]),
        field_tags=tuple([tag for tag, _, _, _ in spans]),
        algorithm=der[alg_start:alg_end],
        signature=der[bits_start + 1 : bits_end] if der[bits_start : bits_start + 1] == b"\0" else b"",
    )


def _head(der: bytes, pos: int) -> tuple[int, int, int]:
    """The tag, value start and value end of the DER element at `pos`, its length read as
    der_spans reads it; ValueError or IndexError when the header is not there."""
    length = der[pos + 1]
    if length < 0x80:
        return der[pos], pos + 2, pos + 2 + length
    n = length & 0x7F
    if n == 0 or n > 4 or pos + 2 + n > len(der):
        raise ValueError
    start = pos + 2 + n
    return der[pos], start, start + int.from_bytes(der[pos + 2 : start], "big")


def _split_signed(der: bytes, what: str, error: ParseErrorType) -> SignedDer:
    outer = der_spans(der, what, error)
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise error(f"{what}: not a DER SEQUENCE")
    # Offsets into `der` throughout: only what SignedDer keeps is copied.
    parts = der_spans(der, what, error, outer[0][2], outer[0][3])
    if len(parts) != 3 or parts[0][0] != 0x30 or parts[1][0] != 0x30 or parts[2][0] != 0x03:
        raise error(f"{what}: not a signed SEQUENCE {{ tbs, algorithm, signature }}")
    fields = der_spans(der, what, error, parts[0][2], parts[0][3])
    bits = der[parts[2][2] : parts[2][3]]
    return SignedDer(
        tbs=der[parts[0][1] : parts[0][3]],
        fields=tuple([der[start:end] for _, _, start, end in fields]),
        field_tags=tuple([tag for tag, _, _, _ in fields]),
        algorithm=der[parts[1][2] : parts[1][3]],
        signature=bits[1:] if bits[:1] == b"\0" else b"",
    )


def verify_raw_tbs(
    signed: SignedDer, key: ec.EllipticCurvePublicKey | None, tbs_algorithm: bytes
) -> bool | None:
    """ECDSA-SHA256 signature check over the raw TBS bytes; None when another path must decide.

    cryptography's verify_directly_issued_by / is_signature_valid re-encode the TBS structure first,
    which costs as much as the signature check for a large CRL; the signed bytes are right here.
    """
    if key is None or signed.algorithm != _ECDSA_WITH_SHA256 or tbs_algorithm != _ECDSA_WITH_SHA256:
        return None
    if not signed.signature:
        return False
    try:
        key.verify(signed.signature, signed.tbs, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _tbs_names(signed: SignedDer, what: str) -> tuple[bytes, bytes]:
    # RFC 5280 4.1: TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
    # issuer, validity, subject, ... }. Comparing the encoded names byte for byte avoids building
    # Name objects (the hot spot of a first verification); Intel's names are binary-identical.
    first = 1 if signed.field_tags and signed.field_tags[0] == 0xA0 else 0
    if len(signed.fields) < first + 6:
        raise CertificateParseError(f"{what}: TBSCertificate is too short")
    return signed.fields[first + 2], signed.fields[first + 4]


# OBJECT IDENTIFIER contents: id-at-commonName (2.5.4.3), id-ce-basicConstraints (2.5.29.19), the
# Intel SGX extensions (1.2.840.113741.1.13.1).
_OID_COMMON_NAME = bytes.fromhex("550403")
_OID_BASIC_CONSTRAINTS = bytes.fromhex("551d13")
_OID_SGX_EXTENSIONS = bytes.fromhex("2a864886f84d010d01")
# Directory string tags (RFC 5280 4.1.2.4): UTF8String, PrintableString, IA5String, T61String,
# BMPString, UniversalString.
_STRING_CODECS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be",
                  0x1C: "utf-32-be"}  # fmt: skip


def _tbs_extensions(signed: SignedDer, what: str) -> dict[bytes, bytes]:
    """extnValue by extnID (RFC 5280 4.1: [3] EXPLICIT SEQUENCE OF SEQUENCE { extnID, critical
    BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }), each extension at most once (4.2)."""
    out: dict[bytes, bytes] = {}
    for tag, value in zip(signed.field_tags, signed.fields, strict=True):
        if tag != 0xA3:
            continue
        outer = der_spans(value, what)
        if len(outer) != 1 or outer[0][0] != 0x30:
            raise CertificateParseError(f"{what}: extensions are not a SEQUENCE")
        for ext_tag, _, start, end in der_spans(value, what, start=outer[0][2], end=outer[0][3]):
            parts = _extension_parts(value, start, end) if ext_tag == 0x30 else None
            if parts is None:
                parts = der_spans(value, what, start=start, end=end) if ext_tag == 0x30 else []
            if len(parts) not in (2, 3) or parts[0][0] != 0x06 or parts[-1][0] != 0x04:
                raise CertificateParseError(f"{what}: an extension is not {{ OID, critical, value }}")
            oid = value[parts[0][2] : parts[0][3]]
            if oid in out:
                raise CertificateParseError(f"{what}: extension {oid_text(oid)} appears twice")
            out[oid] = value[parts[-1][2] : parts[-1][3]]
    return out


def _extension_parts(der: bytes, start: int, end: int) -> list[tuple[int, int, int, int]] | None:
    """der_spans(der[start:end]) of the usual extension, its two or three headers read in place;
    None for der_spans to read anything else (and name its fault)."""
    try:
        tag, oid_start, oid_end = _head(der, start)
        tag2, start2, end2 = _head(der, oid_end)
        if end2 == end:
            return [(tag, start, oid_start, oid_end), (tag2, oid_end, start2, end2)]
        tag3, start3, end3 = _head(der, end2)
    except (ValueError, IndexError):
        return None
    if oid_end > end or end2 > end or end3 != end:
        return None
    return [(tag, start, oid_start, oid_end), (tag2, oid_end, start2, end2), (tag3, end2, start3, end3)]


_T = TypeVar("_T")


def _naming(cert: Cert, what: str, read: Callable[[str], _T]) -> _T:
    """`read(what)`. A certificate's name is read for messages only: when `read` fails, it runs
    again with the name in `what`, to raise the error that names the certificate."""
    try:
        return read(what)
    except CertificateParseError:
        return read(f"{what}: {cert.name}")


def _is_ca(extensions: dict[bytes, bytes], what: str) -> bool:
    # BasicConstraints ::= SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER OPTIONAL }
    value = extensions.get(_OID_BASIC_CONSTRAINTS)
    if value is None:
        return False
    outer = split_der(value, what)
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise CertificateParseError(f"{what}: basicConstraints is not a SEQUENCE")
    inner = split_der(outer[0][1], what)
    return bool(inner) and inner[0] == (0x01, b"\xff")


def common_name(name: bytes, what: str) -> str:
    """For messages: the first commonName of a Name's contents (SEQUENCE OF SET OF SEQUENCE
    { type, value }), quoted."""
    for tag, rdn in split_der(name, what):
        for _, attribute in split_der(rdn, what) if tag == 0x31 else []:
            parts = split_der(attribute, what)
            if len(parts) == 2 and parts[0] == (0x06, _OID_COMMON_NAME):
                codec = _STRING_CODECS.get(parts[1][0], "latin-1")
                return repr(parts[1][1].decode(codec, errors="replace"))
    return "(a certificate without a common name)"


def _tbs_algorithm(signed: SignedDer, index: int) -> bytes:
    # The AlgorithmIdentifier inside the TBS, as contents (tag 0x30 checked).
    if len(signed.fields) <= index or signed.field_tags[index] != 0x30:
        return b""
    return signed.fields[index]


# SubjectPublicKeyInfo contents of an uncompressed P-256 key (RFC 5480): AlgorithmIdentifier
# { id-ecPublicKey, secp256r1 }, then the BIT STRING header; the 65-byte point follows.
_P256_SPKI_PREFIX = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107034200")
_SECP256R1 = ec.SECP256R1()


def _spki_key(cert: x509.Certificate, signed: SignedDer, first: int) -> ec.EllipticCurvePublicKey | None:
    # The key straight from the DER when it is an uncompressed P-256 point (every Intel
    # certificate), which costs half of cryptography's public_key(); anything else goes through it.
    index = first + 5
    spki = signed.fields[index] if len(signed.fields) > index else b""
    if len(spki) == 89 and spki.startswith(_P256_SPKI_PREFIX) and signed.field_tags[index] == 0x30:
        return ec.EllipticCurvePublicKey.from_encoded_point(_SECP256R1, spki[24:])
    return _p256(cert.public_key())


def _p256(key: object) -> ec.EllipticCurvePublicKey | None:
    # Not a P-256 key: cryptography's own X.509 checks decide (verify_link).
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _wrap(cert: x509.Certificate | None, der: bytes, fingerprint: bytes, what: str) -> Cert:
    # The certificate parsed by cryptography (unless given), and what the checks need of it read
    # once, here: cryptography decodes some of it lazily, so a malformed certificate fails now,
    # as a parse error, not in the middle of a check. Names and the key are read from the DER (and
    # the CA flag, when asked: Context.is_ca).
    with parsing(CertificateParseError, f"{what} does not parse"):
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            _ = (cert.version, cert.signature_hash_algorithm)
        signed = split_signed(der, what)
        first = 1 if signed.field_tags and signed.field_tags[0] == 0xA0 else 0
        issuer, subject = _tbs_names(signed, what)
        return Cert(
            cert=cert,
            der=der,
            fingerprint=fingerprint,
            serial=cert.serial_number,
            subject=subject,
            issuer=issuer,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            key=_spki_key(cert, signed, first),
            signed=signed,
        )


# Trust anchors are configuration: wrap each once per process, and know each by the text of its
# PEM block (as every Intel chain carries the root), so that chains skip decoding it. Matching a
# block only saves parsing: trust is still decided by fingerprint (Context.verify_chain).
_ANCHOR_CERTS: dict[str, Cert] = {}
_ANCHOR_BODIES: dict[bytes, Cert] = {}


def _pem_body(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    return b"\n" + b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64)) + b"\n"


class Crl:
    """A parsed CRL with what the checks compare, read once (the issuer name as DER bytes).

    Revocation is asked per serial number (`is_revoked`): a serial whose DER encoding occurs
    nowhere in the revoked-certificates list is not on it, which a byte search tells without
    reading the entries; only a hit reads them all (`revoked`).
    """

    __slots__ = ("_revoked", "crl", "entries", "issuer", "next_update", "this_update", "what")

    def __init__(
        self,
        *,
        crl: x509.CertificateRevocationList,
        issuer: bytes,
        this_update: datetime.datetime,
        next_update: datetime.datetime,
        entries: bytes,
        what: str,
    ) -> None:
        self.crl = crl
        self.issuer = issuer
        self.this_update = this_update
        self.next_update = next_update
        self.entries = entries  # contents of revokedCertificates (SEQUENCE OF SEQUENCE)
        self.what = what
        self._revoked: frozenset[int] | None = None

    @property
    def revoked(self) -> frozenset[int]:
        """Every serial number on the list."""
        if self._revoked is None:
            self._revoked = _revoked_serials(self.entries, self.what)
        return self._revoked

    def is_revoked(self, serial: int) -> bool:
        # A DER INTEGER's contents are the minimal two's complement bytes; a longer encoding only
        # adds leading 00 or FF bytes, so the minimal form is in the list's bytes whenever the
        # serial is listed, however it was encoded.
        minimal = serial.to_bytes(serial.bit_length() // 8 + 1, "big", signed=True)
        return minimal in self.entries and serial in self.revoked


def _revoked_serials(entries: bytes, what: str) -> frozenset[int]:
    # revokedCertificates: SEQUENCE OF SEQUENCE { userCertificate INTEGER, revocationDate Time,
    # crlEntryExtensions Extensions OPTIONAL } (RFC 5280 5.1).
    serials = set()
    for tag, _, start, end in der_spans(entries, what, CrlInvalid):
        inner = der_spans(entries, what, CrlInvalid, start, end) if tag == 0x30 else []
        if len(inner) < 2 or inner[0][0] != 0x02 or inner[0][2] == inner[0][3]:
            raise CrlInvalid(f"{what}: a revoked-certificate entry is not {{ serial, date, ... }}")
        serials.add(int.from_bytes(entries[inner[0][2] : inner[0][3]], "big", signed=True))
    return frozenset(serials)


@dataclass
class VerificationCache:
    """Already-verified certificates, CRLs and signed collateral, keyed by their bytes (or SHA-256).

    Only the results of signature checks and parsing are cached; time and revocation checks run on
    every verification. Safe to share between quotes and collateral sets; not thread-safe.
    """

    chains: dict[bytes | str, tuple[Cert, ...]] = field(default_factory=dict)  # by PEM text
    pem_certs: dict[bytes, Cert] = field(default_factory=dict)  # by the text of one PEM block
    certs: dict[bytes, Cert] = field(default_factory=dict)
    ca: dict[bytes, bool] = field(default_factory=dict)
    links: set[tuple[bytes, bytes]] = field(default_factory=set)
    crls: dict[tuple[bytes, bytes], Crl] = field(default_factory=dict)  # by DER and issuer
    # by (signed text, signature, issuer chain PEM)
    tcb_infos: dict[tuple[str, bytes, str], TcbInfo] = field(default_factory=dict)
    qe_identities: dict[tuple[str, bytes, str], QeIdentity] = field(default_factory=dict)
    pck_extensions: dict[bytes, PckExtension] = field(default_factory=dict)
    # (PCK leaf fingerprint, QE report, its signature) whose signature checked out
    qe_reports: set[tuple[bytes, bytes, bytes]] = field(default_factory=set)
    attestation_keys: dict[bytes, ec.EllipticCurvePublicKey] = field(default_factory=dict)
    # (chain, trusted anchors' SHA-256) -> what verify_chain found, before the validity windows
    chain_paths: dict[
        tuple[tuple[Cert, ...], tuple[str, ...]], tuple[TrustAnchor, Cert, tuple[Cert, ...]]
    ] = field(default_factory=dict)


def digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


class Context:
    """One verification run: the clock, the anchors, and the (possibly throwaway) cache."""

    def __init__(
        self, now: int, anchors: Sequence[TrustAnchor], cache: VerificationCache | None
    ) -> None:
        self.now = now
        self.when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        self.anchors = tuple(anchors)
        self.cache = cache if cache is not None else VerificationCache()
        self.checks: list[str] = []

    @property
    def anchors(self) -> tuple[TrustAnchor, ...]:
        return self._anchors

    @anchors.setter
    def anchors(self, anchors: tuple[TrustAnchor, ...]) -> None:
        self._anchors = anchors
        self._anchor_ids = tuple(a.sha256 for a in anchors)

    def passed(self, name: str) -> None:
        self.checks.append(name)

    def anchor_cert(self, anchor: TrustAnchor) -> Cert:
        got = _ANCHOR_CERTS.get(anchor.sha256)
        if got is None or got.cert is not anchor.certificate:
            got = _ANCHOR_CERTS[anchor.sha256] = _wrap(
                anchor.certificate, anchor.der, bytes.fromhex(anchor.sha256), anchor.name
            )
            _ANCHOR_BODIES[_pem_body(anchor.der)] = got
        return got

    def is_ca(self, cert: Cert, what: str) -> bool:
        # Read from the DER when a chain needs it (only issuers are asked), then remembered.
        got = self.cache.ca.get(cert.fingerprint)
        if got is None:
            got = _naming(cert, what, lambda where: _is_ca(_tbs_extensions(cert.signed, where), where))
            self.cache.ca[cert.fingerprint] = got
        return got

    def pck_extension(self, leaf: Cert) -> PckExtension:
        """The Intel SGX extension of a PCK leaf, read from the DER (its extension list is read
        strictly: each extension at most once, each one { OID, critical, value })."""
        with parsing(CertificateParseError, "PCK certificate extensions do not parse"):
            extensions = _naming(leaf, "PCK certificate chain", partial(_tbs_extensions, leaf.signed))
        value = extensions.get(_OID_SGX_EXTENSIONS)
        if value is None:
            raise CertificateParseError("PCK certificate has no Intel SGX extension")
        return parse_pck_extension_value(value)

    def load_chain(self, pem: bytes | str, what: str) -> tuple[Cert, ...]:
        """The certificates of a PEM chain (bytes, or text as collateral holds it), leaf first."""
        chain = self.cache.chains.get(pem)
        if chain is None:
            text = utf8(pem, CertificateParseError, what) if isinstance(pem, str) else pem
            certs = []
            pem_certs, known = self.cache.pem_certs, self.cache.certs
            # The same certificates recur across chains (the root in all four, the platform CA
            # in two, the TCB signing certificate in two): decode and parse each once.
            for i, body in enumerate(pem_bodies(text, what)):
                cert = pem_certs.get(body) or _ANCHOR_BODIES.get(body)
                if cert is None:
                    der = pem_body_der(body, what, i)
                    fingerprint = hashlib.sha256(der).digest()
                    cert = known.get(fingerprint)
                    if cert is None:
                        cert = _wrap(None, der, fingerprint, f"{what}: certificate {i}")
                        known[fingerprint] = cert
                    pem_certs[body] = cert
                certs.append(cert)
            chain = self.cache.chains[pem] = tuple(certs)
        return chain

    def verify_link(self, child: Cert, parent: Cert, what: str) -> None:
        key = (child.fingerprint, parent.fingerprint)
        if key in self.cache.links:
            return
        if child.issuer != parent.subject:
            raise CertificateChainError(
                f"{what}: {child.name} is not signed by {parent.name} (its issuer name differs)"
            )
        first = 1 if child.signed.field_tags and child.signed.field_tags[0] == 0xA0 else 0
        ok = verify_raw_tbs(child.signed, parent.key, _tbs_algorithm(child.signed, first + 1))
        if ok is None:
            not_signed = f"{what}: {child.name} is not signed by {parent.name}"
            with parsing(CertificateChainError, not_signed):
                child.cert.verify_directly_issued_by(parent.cert)
                ok = True
        if not ok:
            raise CertificateChainError(
                f"{what}: {child.name} is not signed by {parent.name}: InvalidSignature"
            )
        self.cache.links.add(key)

    def check_window(self, cert: Cert, what: str) -> None:
        if not cert.not_before <= self.when <= cert.not_after:
            raise CertificateExpired(
                f"{what}: {cert.name} is valid from {cert.not_before.isoformat()} to "
                f"{cert.not_after.isoformat()}, not at {self.when.isoformat()}"
            )

    def verify_chain(
        self, certs: tuple[Cert, ...], what: str
    ) -> tuple[TrustAnchor, Cert, tuple[Cert, ...]]:
        """Check `certs` (leaf first) up to a trusted root; return the anchor and the non-root certs.

        Which anchor, the links and the CA flags depend only on the certificates and the trusted
        anchors, and are remembered; the validity windows are checked on every call."""
        key = (certs, self._anchor_ids)
        found = self.cache.chain_paths.get(key)
        if found is None:
            found = self.cache.chain_paths[key] = self._chain_path(certs, what)
        _, root, chain = found
        for cert in chain:
            self.check_window(cert, what)
        self.check_window(root, what)
        return found

    def _chain_path(
        self, certs: tuple[Cert, ...], what: str
    ) -> tuple[TrustAnchor, Cert, tuple[Cert, ...]]:
        if len(certs) < 2:
            raise CertificateChainError(f"{what}: expected at least 2 certificates, found {len(certs)}")
        last = certs[-1]
        anchor = next((a for a in self.anchors if a.sha256 == last.fingerprint.hex()), None)
        if anchor is not None:
            chain = certs[:-1]
        else:
            anchor = next((a for a in self.anchors if self.anchor_cert(a).subject == last.issuer), None)
            if anchor is None or last.issuer == last.subject:
                raise UntrustedRoot(
                    f"{what} ends at {last.name} (SHA-256 {last.fingerprint.hex()}), "
                    "which is not a trusted root"
                )
            chain = certs
        root = self.anchor_cert(anchor)
        path = (*chain, root)
        for i in range(len(chain)):
            self.verify_link(path[i], path[i + 1], what)
            if i + 1 < len(chain) and not self.is_ca(path[i + 1], what):
                raise CertificateChainError(f"{what}: {path[i + 1].name} is not a CA certificate")
        return anchor, root, chain


def ecdsa_verify_raw(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    # TDX quotes and Intel collateral carry raw r||s; cryptography wants DER (SEC 1 / RFC 3279).
    if len(raw_sig) != 64:
        return False
    sig = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    try:
        key.verify(sig, data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def ec_key(cert: Cert, what: str) -> ec.EllipticCurvePublicKey:
    if cert.key is None:
        raise CertificateParseError(f"{what}: {cert.name} does not hold a P-256 key")
    return cert.key


def verified_crl(ctx: Context, der: bytes, issuer: Cert, what: str) -> Crl:
    """The CRL, issued and signed by `issuer` (remembered in the cache), whatever its dates."""
    key = (der, issuer.fingerprint)
    crl = ctx.cache.crls.get(key)
    if crl is None:
        crl = ctx.cache.crls[key] = _verified_crl(der, issuer, what)
    return crl


def load_crl(ctx: Context, der: bytes, issuer: Cert, what: str) -> Crl:
    """The CRL, issued and signed by `issuer`, and current at the context's time."""
    crl = verified_crl(ctx, der, issuer, what)
    # Expired from its nextUpdate second on, as dcap-qvl judges CRLs (webpki's CrlExpired when
    # now >= nextUpdate); TCB info and QE identity it accepts through that second (verify.py).
    this, nxt = crl.this_update, crl.next_update
    if not this <= ctx.when < nxt:
        raise CollateralExpired(
            f"{what} is valid from {this.isoformat()} until its nextUpdate {nxt.isoformat()} "
            f"(exclusive), not at {ctx.when.isoformat()}"
        )
    return crl


def _verified_crl(der: bytes, issuer: Cert, what: str) -> Crl:
    # The issuer and the signature first: the rest of an unsigned CRL is not worth reading.
    parse_error = f"{what} does not parse"
    with parsing(CrlInvalid, parse_error):
        loaded = x509.load_der_x509_crl(der)
        signed = split_signed(der, what, CrlInvalid)
        # RFC 5280 5.1: TBSCertList ::= SEQUENCE { version INTEGER OPTIONAL, signature, issuer,
        # thisUpdate, nextUpdate OPTIONAL, revokedCertificates SEQUENCE OPTIONAL, [0] ... }
        first = 1 if signed.field_tags and signed.field_tags[0] == 0x02 else 0
        if len(signed.fields) < first + 3:
            raise CrlInvalid(f"{what}: TBSCertList is too short")
        if signed.fields[first + 1] != issuer.subject:
            raise CrlInvalid(
                f"{what} is issued by {loaded.issuer.rfc4514_string()}, expected {issuer.name}"
            )
    valid = verify_raw_tbs(signed, issuer.key, _tbs_algorithm(signed, first))
    if valid is None:
        with parsing(CrlInvalid, f"{what} is not signed by {issuer.name}"):
            valid = loaded.is_signature_valid(issuer.cert.public_key())  # type: ignore[arg-type]
    if not valid:
        raise CrlInvalid(f"{what} is not signed by {issuer.name}")
    with parsing(CrlInvalid, parse_error):
        this_update, next_update = loaded.last_update_utc, loaded.next_update_utc
    if next_update is None:
        raise CrlInvalid(f"{what} has no nextUpdate, so it is never current")
    tags, fields = signed.field_tags, signed.fields
    rest = first + 3  # after thisUpdate: nextUpdate?, revokedCertificates?, [0] extensions?
    if len(fields) > rest and tags[rest] in (0x17, 0x18):
        rest += 1
    entries = fields[rest] if len(fields) > rest and tags[rest] == 0x30 else b""
    return Crl(
        crl=loaded, issuer=issuer.subject, this_update=this_update, next_update=next_update,
        entries=entries, what=what,
    )  # fmt: skip
