"""`verify(quote, collateral, policy, now)`: the one safe entry point. Returns a VerifiedQuote or raises.

The pipeline is a flat sequence of named checks, in trust-chain order (Intel TDX DCAP Quoting
Library API, "Quote verification"; the same order as Intel's QVL):

    quote-signature chain:  pck_chain -> qe_report_signature -> qe_report_data -> quote_signature
    collateral (optional):  crls -> tcb_info -> qe_identity -> revocation -> tcb_evaluation
    policy:                 debug -> td_attributes -> mr_servicetd -> report_data -> measurements
                            -> tcb_status

Each check raises its own VerificationError subclass (see errors.py). A VerificationCache may be
passed to skip re-verifying certificates, CRLs and signed collateral already seen (keyed by the
SHA-256 of their bytes); validity windows and revocation are evaluated again on every call.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from eemini.tdx import tcb
from eemini.tdx.collateral import (
    Collateral,
    QeIdentity,
    TcbInfo,
    TcbStatus,
    parse_qe_identity,
    parse_tcb_info,
)
from eemini.tdx.errors import (
    CertificateChainError,
    CertificateExpired,
    CertificateParseError,
    CertificateRevoked,
    CollateralExpired,
    CollateralInvalid,
    CollateralParseError,
    CollateralRequired,
    CollateralSignatureInvalid,
    CrlInvalid,
    DebugTdRejected,
    MeasurementMismatch,
    QeReportDataMismatch,
    QeReportSignatureInvalid,
    QuoteSignatureInvalid,
    ReportDataMismatch,
    ServiceTdRejected,
    TcbStatusRejected,
    TdAttributesRejected,
    UntrustedRoot,
)
from eemini.tdx.pck import (
    PckExtension,
    der_spans,
    load_der_certificate,
    parse_pck_extension,
    pem_block_der,
    pem_blocks,
    split_der,
)
from eemini.tdx.policy import DEFAULT_POLICY, Policy
from eemini.tdx.quote import Quote, TdReport, parse_quote
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class AttributeReport:
    """The TD attribute facts a policy may or may not enforce: reported either way."""

    debug: bool
    sept_ve_disable: bool
    reserved_bits: int
    mr_servicetd_zero: bool | None  # None for TDX 1.0 reports, which have no MR_SERVICETD


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    """A quote whose signatures, chain, collateral (when given) and policy all checked out."""

    quote: Quote
    trust_anchor: TrustAnchor
    pck: PckExtension
    tcb: tcb.TcbEvaluation | None  # None: no collateral, TCB status not evaluated
    attributes: AttributeReport
    checks: tuple[str, ...]
    verified_at: int

    @property
    def report(self) -> TdReport:
        return self.quote.report

    @property
    def tcb_status(self) -> str:
        return self.tcb.status.value if self.tcb else "NotEvaluated"

    @property
    def advisory_ids(self) -> tuple[str, ...]:
        return self.tcb.advisory_ids if self.tcb else ()


@dataclass(frozen=True, slots=True)
class _Cert:
    """A parsed certificate with what the checks compare, computed once (names as DER bytes)."""

    cert: x509.Certificate
    fingerprint: bytes
    subject: bytes
    issuer: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime
    key: ec.EllipticCurvePublicKey | None
    signed: _Signed

    @property
    def name(self) -> str:
        return _name(self.cert)


# AlgorithmIdentifier contents of ecdsa-with-SHA256 (RFC 5758 3.2: OID 1.2.840.10045.4.3.2, no
# parameters): what every Intel PCK, TCB signing and CA certificate and CRL is signed with.
_ECDSA_WITH_SHA256 = bytes.fromhex("06082a8648ce3d040302")


@dataclass(frozen=True, slots=True)
class _Signed:
    """A DER certificate or CRL cut into what its signature covers (RFC 5280 4.1 and 5.1)."""

    tbs: bytes  # the whole TBSCertificate / TBSCertList TLV: the signed bytes
    fields: tuple[bytes, ...]  # the TBS fields' values, in order
    field_tags: tuple[int, ...]
    algorithm: bytes  # outer signatureAlgorithm contents
    signature: bytes  # DER ECDSA-Sig-Value, from the BIT STRING


def _split_signed(der: bytes, what: str) -> _Signed:
    outer = der_spans(der, what)
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise CertificateParseError(f"{what}: not a DER SEQUENCE")
    body = der[outer[0][2] : outer[0][3]]
    parts = der_spans(body, what)
    if len(parts) != 3 or parts[0][0] != 0x30 or parts[1][0] != 0x30 or parts[2][0] != 0x03:
        raise CertificateParseError(f"{what}: not a signed SEQUENCE {{ tbs, algorithm, signature }}")
    tbs_value = body[parts[0][2] : parts[0][3]]
    fields = split_der(tbs_value, what)
    bits = body[parts[2][2] : parts[2][3]]
    return _Signed(
        tbs=body[parts[0][1] : parts[0][3]],
        fields=tuple(v for _, v in fields),
        field_tags=tuple(t for t, _ in fields),
        algorithm=body[parts[1][2] : parts[1][3]],
        signature=bits[1:] if bits[:1] == b"\0" else b"",
    )


def _fast_verify(
    signed: _Signed, key: ec.EllipticCurvePublicKey | None, tbs_algorithm: bytes
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


def _tbs_names(signed: _Signed, what: str) -> tuple[bytes, bytes]:
    # RFC 5280 4.1: TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
    # issuer, validity, subject, ... }. Comparing the encoded names byte for byte avoids building
    # Name objects (the hot spot of a first verification); Intel's names are binary-identical.
    first = 1 if signed.field_tags and signed.field_tags[0] == 0xA0 else 0
    if len(signed.fields) < first + 6:
        raise CertificateParseError(f"{what}: TBSCertificate is too short")
    return signed.fields[first + 2], signed.fields[first + 4]


def _tbs_algorithm(signed: _Signed, index: int) -> bytes:
    # The AlgorithmIdentifier inside the TBS, as contents (tag 0x30 checked).
    if len(signed.fields) <= index or signed.field_tags[index] != 0x30:
        return b""
    return signed.fields[index]


def _wrap(cert: x509.Certificate, der: bytes, fingerprint: bytes, what: str) -> _Cert:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    ec_key = (
        key
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        else None
    )
    signed = _split_signed(der, what)
    issuer, subject = _tbs_names(signed, what)
    try:
        return _Cert(
            cert=cert,
            fingerprint=fingerprint,
            subject=subject,
            issuer=issuer,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            key=ec_key,
            signed=signed,
        )
    except ValueError as e:
        raise CertificateParseError(f"{what}: a certificate does not parse: {e}") from None


# Trust anchors are configuration: wrap each once per process.
_ANCHOR_CERTS: dict[str, _Cert] = {}


@dataclass(frozen=True, slots=True)
class _Crl:
    crl: x509.CertificateRevocationList
    issuer: bytes
    this_update: datetime.datetime
    next_update: datetime.datetime | None


@dataclass
class VerificationCache:
    """Already-verified certificates, CRLs and signed collateral, keyed by the SHA-256 of their bytes.

    Only the results of signature checks and parsing are cached; time and revocation checks run on
    every verification. Safe to share between quotes and collateral sets; not thread-safe.
    """

    chains: dict[bytes, tuple[_Cert, ...]] = field(default_factory=dict)
    certs: dict[bytes, _Cert] = field(default_factory=dict)
    ca: dict[bytes, bool] = field(default_factory=dict)
    links: set[tuple[bytes, bytes]] = field(default_factory=set)
    crls: dict[tuple[bytes, bytes], _Crl] = field(default_factory=dict)
    tcb_infos: dict[bytes, TcbInfo] = field(default_factory=dict)
    qe_identities: dict[bytes, QeIdentity] = field(default_factory=dict)
    pck_extensions: dict[bytes, PckExtension] = field(default_factory=dict)


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


class _Context:
    """One verification run: the clock, the anchors, and the (possibly throwaway) cache."""

    def __init__(
        self, now: int, anchors: Sequence[TrustAnchor], cache: VerificationCache | None
    ) -> None:
        self.now = now
        self.when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        self.anchors = tuple(anchors)
        self.cache = cache if cache is not None else VerificationCache()
        self.checks: list[str] = []

    def passed(self, name: str) -> None:
        self.checks.append(name)

    def anchor_cert(self, anchor: TrustAnchor) -> _Cert:
        got = _ANCHOR_CERTS.get(anchor.sha256)
        if got is None or got.cert is not anchor.certificate:
            got = _ANCHOR_CERTS[anchor.sha256] = _wrap(
                anchor.certificate, anchor.der, bytes.fromhex(anchor.sha256), anchor.name
            )
        return got

    def is_ca(self, cert: _Cert) -> bool:
        got = self.cache.ca.get(cert.fingerprint)
        if got is None:
            got = self.cache.ca[cert.fingerprint] = _is_ca(cert.cert)
        return got

    def load_chain(self, pem: bytes, what: str) -> tuple[_Cert, ...]:
        key = _digest(pem)
        chain = self.cache.chains.get(key)
        if chain is None:
            certs = []
            # The same certificates recur across chains (the root in all four, the platform CA
            # in two): parse each once.
            for i, block in enumerate(pem_blocks(pem, what)):
                der = pem_block_der(block, what, i)
                fingerprint = hashlib.sha256(der).digest()
                cert = self.cache.certs.get(fingerprint)
                if cert is None:
                    cert = _wrap(load_der_certificate(der, what, i), der, fingerprint, what)
                    self.cache.certs[fingerprint] = cert
                certs.append(cert)
            chain = self.cache.chains[key] = tuple(certs)
        return chain

    def verify_link(self, child: _Cert, parent: _Cert, what: str) -> None:
        key = (child.fingerprint, parent.fingerprint)
        if key in self.cache.links:
            return
        if child.issuer != parent.subject:
            raise CertificateChainError(
                f"{what}: {child.name} is not signed by {parent.name} (its issuer name differs)"
            )
        first = 1 if child.signed.field_tags and child.signed.field_tags[0] == 0xA0 else 0
        ok = _fast_verify(child.signed, parent.key, _tbs_algorithm(child.signed, first + 1))
        if ok is None:
            try:
                child.cert.verify_directly_issued_by(parent.cert)
                ok = True
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
                raise CertificateChainError(
                    f"{what}: {child.name} is not signed by {parent.name} ({type(e).__name__}: {e})"
                ) from None
        if not ok:
            raise CertificateChainError(
                f"{what}: {child.name} is not signed by {parent.name} (InvalidSignature)"
            )
        self.cache.links.add(key)

    def check_window(self, cert: _Cert, what: str) -> None:
        if not cert.not_before <= self.when <= cert.not_after:
            raise CertificateExpired(
                f"{what}: {cert.name} is valid from {cert.not_before.isoformat()} to "
                f"{cert.not_after.isoformat()}, not at {self.when.isoformat()}"
            )

    def verify_chain(
        self, certs: Sequence[_Cert], what: str
    ) -> tuple[TrustAnchor, _Cert, tuple[_Cert, ...]]:
        """Check `certs` (leaf first) up to a trusted root; return the anchor and the non-root certs."""
        if len(certs) < 2:
            raise CertificateChainError(f"{what}: expected at least 2 certificates, found {len(certs)}")
        last = certs[-1]
        anchor = next((a for a in self.anchors if a.sha256 == last.fingerprint.hex()), None)
        if anchor is not None:
            chain = tuple(certs[:-1])
        else:
            anchor = next((a for a in self.anchors if self.anchor_cert(a).subject == last.issuer), None)
            if anchor is None or last.issuer == last.subject:
                raise UntrustedRoot(
                    f"{what} ends at {last.name} (SHA-256 {last.fingerprint.hex()}), "
                    "which is not a trusted root"
                )
            chain = tuple(certs)
        root = self.anchor_cert(anchor)
        path = (*chain, root)
        for i in range(len(chain)):
            self.verify_link(path[i], path[i + 1], what)
            if i + 1 < len(chain) and not self.is_ca(path[i + 1]):
                raise CertificateChainError(f"{what}: {path[i + 1].name} is not a CA certificate")
        for cert in path:
            self.check_window(cert, what)
        return anchor, root, chain


def _name(cert: x509.Certificate) -> str:
    try:
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return repr(cns[0].value) if cns else repr(cert.subject.rfc4514_string())
    except ValueError:
        return "(a certificate with an unreadable subject)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _ecdsa_verify(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    # TDX quotes and Intel collateral carry raw r||s; cryptography wants DER (SEC 1 / RFC 3279).
    if len(raw_sig) != 64:
        return False
    sig = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    try:
        key.verify(sig, data, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _ec_key(cert: _Cert, what: str) -> ec.EllipticCurvePublicKey:
    if cert.key is None:
        raise CertificateParseError(f"{what}: {cert.name} does not hold a P-256 key")
    return cert.key


# Checks: quote signature chain ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PckResult:
    anchor: TrustAnchor
    root: _Cert
    chain: tuple[_Cert, ...]  # leaf first, without the root
    extension: PckExtension


def check_pck_chain(ctx: _Context, quote: Quote) -> _PckResult:
    certs = ctx.load_chain(quote.signature_data.certification.pck_chain_pem, "PCK certificate chain")
    anchor, root, chain = ctx.verify_chain(certs, "PCK certificate chain")
    leaf = chain[0]
    ext = ctx.cache.pck_extensions.get(leaf.fingerprint)
    if ext is None:
        ext = parse_pck_extension(leaf.cert)
        ctx.cache.pck_extensions[leaf.fingerprint] = ext
    ctx.passed("pck-chain")
    return _PckResult(anchor, root, chain, ext)


def check_qe_report_signature(ctx: _Context, quote: Quote, pck: _PckResult) -> None:
    cert = quote.signature_data.certification
    key = _ec_key(pck.chain[0], "PCK certificate")
    if not _ecdsa_verify(key, cert.qe_report_signature, cert.qe_report.raw):
        raise QeReportSignatureInvalid("the QE report is not signed by the PCK certificate's key")
    ctx.passed("qe-report-signature")


def check_qe_report_data(ctx: _Context, quote: Quote) -> None:
    # The QE binds the attestation key: REPORTDATA = SHA-256(attestation key || QE auth data) || 0^32
    # (Intel DCAP ECDSA quote library, "QE Report Data").
    sd = quote.signature_data
    want = hashlib.sha256(sd.attestation_key + sd.certification.qe_auth_data).digest()
    got = sd.certification.qe_report.report_data
    if got[:32] != want:
        raise QeReportDataMismatch(
            "the QE report data does not bind the attestation key and QE authentication data: "
            f"expected {want.hex()}, found {got[:32].hex()}"
        )
    if any(got[32:]):
        raise QeReportDataMismatch(f"the QE report data's upper 32 bytes are not zero: {got[32:].hex()}")
    ctx.passed("qe-report-data")


def check_quote_signature(ctx: _Context, quote: Quote) -> None:
    raw = quote.signature_data.attestation_key
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise QuoteSignatureInvalid("the attestation key is not a point on P-256") from None
    if not _ecdsa_verify(key, quote.signature_data.signature, quote.signed_data):
        raise QuoteSignatureInvalid(
            "the quote header and TD report are not signed by the attestation key"
        )
    ctx.passed("quote-signature")


# Checks: collateral ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Crls:
    root: _Crl
    pck: _Crl


def _load_crl(ctx: _Context, der: bytes, issuer: _Cert, what: str) -> _Crl:
    key = (_digest(der), issuer.fingerprint)
    crl = ctx.cache.crls.get(key)
    if crl is None:
        try:
            loaded = x509.load_der_x509_crl(der)
            signed = _split_signed(der, what)
            # RFC 5280 5.1: TBSCertList ::= SEQUENCE { version INTEGER OPTIONAL, signature, issuer,
            # thisUpdate, nextUpdate OPTIONAL, ... }
            first = 1 if signed.field_tags and signed.field_tags[0] == 0x02 else 0
            if len(signed.fields) < first + 3:
                raise CrlInvalid(f"{what}: TBSCertList is too short")
            crl = _Crl(loaded, signed.fields[first + 1], loaded.last_update_utc, loaded.next_update_utc)
        except (ValueError, CertificateParseError) as e:
            raise CrlInvalid(f"{what} is not a DER CRL: {e}") from None
        if crl.issuer != issuer.subject:
            raise CrlInvalid(
                f"{what} is issued by {loaded.issuer.rfc4514_string()}, expected {issuer.name}"
            )
        valid = _fast_verify(signed, issuer.key, _tbs_algorithm(signed, first))
        if valid is None:
            try:
                valid = loaded.is_signature_valid(_ec_key(issuer, what))
            except (TypeError, ValueError, UnsupportedAlgorithm):
                valid = False
        if not valid:
            raise CrlInvalid(f"{what} is not signed by {issuer.name}")
        ctx.cache.crls[key] = crl
    this, nxt = crl.this_update, crl.next_update
    if nxt is None or not this <= ctx.when <= nxt:
        raise CollateralExpired(
            f"{what} is valid from {this.isoformat()} to "
            f"{nxt.isoformat() if nxt else '(no next update)'}, "
            f"not at {ctx.when.isoformat()}"
        )
    return crl


def check_crls(ctx: _Context, collateral: Collateral, root: _Cert) -> tuple[_Crls, tuple[_Cert, ...]]:
    root_crl = _load_crl(ctx, collateral.root_ca_crl, root, "root CA CRL")
    certs = ctx.load_chain(collateral.pck_crl_issuer_chain.encode(), "PCK CRL issuer chain")
    _, _, chain = ctx.verify_chain(certs, "PCK CRL issuer chain")
    pck_crl = _load_crl(ctx, collateral.pck_crl, chain[0], "PCK CRL")
    ctx.passed("crls")
    return _Crls(root_crl, pck_crl), chain


def _check_window(ctx: _Context, issue: datetime.datetime, nxt: datetime.datetime, what: str) -> None:
    if not issue <= ctx.when <= nxt:
        raise CollateralExpired(
            f"{what} is valid from {issue.isoformat()} to {nxt.isoformat()}, "
            f"not at {ctx.when.isoformat()}"
        )


def _signed_json_chain(
    ctx: _Context, text: str, signature: bytes, chain_pem: str, what: str, *, verified: bool
) -> tuple[_Cert, ...]:
    # The chain is always re-checked (validity at `now`); a cached document skips its signature.
    certs = ctx.load_chain(chain_pem.encode(), f"{what} issuer chain")
    _, _, chain = ctx.verify_chain(certs, f"{what} issuer chain")
    if not verified and not _ecdsa_verify(_ec_key(chain[0], what), signature, text.encode()):
        raise CollateralSignatureInvalid(f"{what} is not signed by {chain[0].name}")
    return chain


def check_tcb_info(ctx: _Context, collateral: Collateral) -> tuple[TcbInfo, tuple[_Cert, ...]]:
    key = _digest(collateral.tcb_info.encode(), collateral.tcb_info_signature,
                  collateral.tcb_info_issuer_chain.encode())  # fmt: skip
    info = ctx.cache.tcb_infos.get(key)
    chain = _signed_json_chain(ctx, collateral.tcb_info, collateral.tcb_info_signature,
                               collateral.tcb_info_issuer_chain, "TCB info",
                               verified=info is not None)  # fmt: skip
    if info is None:
        try:
            info = parse_tcb_info(collateral.tcb_info)
        except CollateralParseError as e:
            raise CollateralInvalid(str(e)) from None
        ctx.cache.tcb_infos[key] = info
    _check_window(ctx, info.issue_date, info.next_update, "TCB info")
    ctx.passed("tcb-info")
    return info, chain


def check_qe_identity(ctx: _Context, collateral: Collateral) -> tuple[QeIdentity, tuple[_Cert, ...]]:
    key = _digest(collateral.qe_identity.encode(), collateral.qe_identity_signature,
                  collateral.qe_identity_issuer_chain.encode())  # fmt: skip
    identity = ctx.cache.qe_identities.get(key)
    chain = _signed_json_chain(ctx, collateral.qe_identity, collateral.qe_identity_signature,
                               collateral.qe_identity_issuer_chain, "QE identity",
                               verified=identity is not None)  # fmt: skip
    if identity is None:
        try:
            identity = parse_qe_identity(collateral.qe_identity)
        except CollateralParseError as e:
            raise CollateralInvalid(str(e)) from None
        ctx.cache.qe_identities[key] = identity
    _check_window(ctx, identity.issue_date, identity.next_update, "QE identity")
    ctx.passed("qe-identity-collateral")
    return identity, chain


def check_revocation(
    ctx: _Context, crls: _Crls, root: _Cert, chains: Sequence[tuple[_Cert, ...]]
) -> None:
    # The root itself may be listed in its own CRL (dcap-qvl checks this too): then nothing holds.
    if crls.root.crl.get_revoked_certificate_by_serial_number(root.cert.serial_number) is not None:
        raise CertificateRevoked(f"the root {root.name} is revoked by its own CRL")
    for chain in chains:
        for cert in chain:
            if cert.issuer == root.subject:
                crl, what = crls.root, "root CA CRL"
            elif cert.issuer == crls.pck.issuer:
                crl, what = crls.pck, "PCK CRL"
            else:
                raise CrlInvalid(f"no CRL covers {cert.name} (its issuer issued neither CRL)")
            if crl.crl.get_revoked_certificate_by_serial_number(cert.cert.serial_number) is not None:
                raise CertificateRevoked(
                    f"{cert.name} (serial {cert.cert.serial_number:x}) is revoked by the {what}"
                )
    ctx.passed("revocation")


def check_collateral(
    ctx: _Context, quote: Quote, collateral: Collateral, pck: _PckResult
) -> tcb.TcbEvaluation:
    # Collateral must come from the PCK chain's own root: with a development root trusted as well,
    # Intel's collateral must not vouch for a development PCK, nor the reverse.
    ctx.anchors = (pck.anchor,)
    crls, crl_chain = check_crls(ctx, collateral, pck.root)
    tcb_info, tcb_chain = check_tcb_info(ctx, collateral)
    qe_identity, qe_chain = check_qe_identity(ctx, collateral)
    check_revocation(ctx, crls, pck.root, (pck.chain, crl_chain, tcb_chain, qe_chain))
    evaluation = tcb.evaluate(
        tcb_info, qe_identity, pck.extension, quote.report, quote.signature_data.certification.qe_report
    )
    ctx.passed("tcb-evaluation")
    return evaluation


# Checks: policy --------------------------------------------------------------------------------------


def attribute_report(report: TdReport) -> AttributeReport:
    return AttributeReport(
        debug=report.debug,
        sept_ve_disable=report.sept_ve_disable,
        reserved_bits=report.reserved_attributes,
        mr_servicetd_zero=None if report.mr_servicetd is None else not any(report.mr_servicetd),
    )


def check_debug(ctx: _Context, report: TdReport, policy: Policy) -> None:
    if report.debug and not policy.allow_debug:
        raise DebugTdRejected(
            f"the TD is a debug TD (TD_ATTRIBUTES {report.td_attributes.hex()}): "
            "its memory is open to the host"
        )
    ctx.passed("debug")


def check_td_attributes(ctx: _Context, report: TdReport, policy: Policy) -> None:
    reserved = report.reserved_attributes
    if policy.reject_reserved_td_attributes and reserved:
        raise TdAttributesRejected(f"reserved TD_ATTRIBUTES bits are set: 0x{reserved:016x}")
    if policy.require_sept_ve_disable and not report.sept_ve_disable:
        raise TdAttributesRejected("SEPT_VE_DISABLE is not set in TD_ATTRIBUTES")
    ctx.passed("td-attributes")


def check_mr_servicetd(ctx: _Context, report: TdReport, policy: Policy) -> None:
    # TDX 1.5: a non-zero MR_SERVICETD means a service TD (e.g. a migration TD) is bound to this TD.
    if policy.require_zero_mr_servicetd and report.mr_servicetd is not None and any(report.mr_servicetd):
        raise ServiceTdRejected("MR_SERVICETD is not zero: a service TD is bound to this TD")
    ctx.passed("mr-servicetd")


def check_report_data(ctx: _Context, report: TdReport, policy: Policy) -> None:
    if policy.report_data is None:
        return
    if report.report_data != policy.report_data:
        raise ReportDataMismatch(
            f"report data is {report.report_data.hex()}, expected {policy.report_data.hex()}"
        )
    ctx.passed("report-data")


def check_measurements(ctx: _Context, report: TdReport, policy: Policy) -> None:
    if policy.accepted_mr_td is not None:
        if report.mr_td not in policy.accepted_mr_td:
            raise MeasurementMismatch(f"MRTD {report.mr_td.hex()} is not an accepted value")
        ctx.passed("mr-td")
    for i, (want, got) in enumerate(zip(policy.rtmrs, report.rtmrs, strict=True)):
        if want is not None and want != got:
            raise MeasurementMismatch(f"RTMR{i} is {got.hex()}, expected {want.hex()}")
    if any(r is not None for r in policy.rtmrs):
        ctx.passed("rtmrs")


def check_tcb_status(ctx: _Context, evaluation: tcb.TcbEvaluation | None, policy: Policy) -> None:
    if evaluation is None:
        if policy.require_collateral:
            raise CollateralRequired("no collateral given, so the TCB status cannot be evaluated")
        return
    if evaluation.status == TcbStatus.REVOKED or evaluation.status not in policy.accepted_tcb_statuses:
        accepted = ", ".join(sorted(s.value for s in policy.accepted_tcb_statuses))
        raise TcbStatusRejected(
            f"TCB status is {evaluation.status.value} (advisories: "
            f"{', '.join(evaluation.advisory_ids) or 'none'}); accepted: {accepted}"
        )
    rejected = sorted(set(evaluation.advisory_ids) & policy.rejected_advisory_ids)
    if rejected:
        raise TcbStatusRejected(f"the TCB is affected by rejected advisories {', '.join(rejected)}")
    ctx.passed("tcb-status")


def check_policy(
    ctx: _Context, quote: Quote, policy: Policy, evaluation: tcb.TcbEvaluation | None
) -> None:
    """The policy stage. Debug comes first: a debug TD proves nothing, whatever else it claims."""
    report = quote.report
    check_debug(ctx, report, policy)
    check_td_attributes(ctx, report, policy)
    check_mr_servicetd(ctx, report, policy)
    check_report_data(ctx, report, policy)
    check_measurements(ctx, report, policy)
    check_tcb_status(ctx, evaluation, policy)


def _unix(now: int | float | datetime.datetime) -> int:
    if isinstance(now, datetime.datetime):
        if now.tzinfo is None:
            raise TypeError("now must be an aware datetime (UTC) or Unix seconds")
        return int(now.timestamp())
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError("now must be Unix seconds or an aware datetime")
    return int(now)


def verify(
    quote: Quote | bytes,
    collateral: Collateral | None,
    policy: Policy = DEFAULT_POLICY,
    now: int | float | datetime.datetime | None = None,
    *,
    trusted_roots: Sequence[TrustAnchor] = (INTEL_ROOT,),
    cache: VerificationCache | None = None,
) -> VerifiedQuote:
    """Verify a TDX quote and return what it proves, or raise the VerificationError of the failed check.

    `now` pins the verification time (Unix seconds or an aware datetime); it defaults to the clock.
    `trusted_roots` defaults to Intel's SGX Root CA only; development roots must be passed explicitly.
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    if not trusted_roots:
        raise ValueError("trusted_roots must hold at least one root")
    parsed = parse_quote(quote) if isinstance(quote, bytes) else quote
    ctx = _Context(_unix(now), trusted_roots, cache)
    pck = check_pck_chain(ctx, parsed)
    check_qe_report_signature(ctx, parsed, pck)
    check_qe_report_data(ctx, parsed)
    check_quote_signature(ctx, parsed)
    evaluation = check_collateral(ctx, parsed, collateral, pck) if collateral is not None else None
    check_policy(ctx, parsed, policy, evaluation)
    return VerifiedQuote(
        quote=parsed,
        trust_anchor=pck.anchor,
        pck=pck.extension,
        tcb=evaluation,
        attributes=attribute_report(parsed.report),
        checks=tuple(ctx.checks),
        verified_at=ctx.now,
    )
