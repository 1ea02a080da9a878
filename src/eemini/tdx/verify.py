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
from collections.abc import Mapping, Sequence
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
    EventLogRequired,
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
from eemini.tdx.evidence import EventLogReport, check_event_log
from eemini.tdx.pck import PckExtension, load_pem_chain, parse_pck_extension
from eemini.tdx.policy import DEFAULT_POLICY, Policy
from eemini.tdx.quote import Quote, TdReport, parse_quote
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor
from eemini.tdx.runtime_log import check_runtime_log

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
    # What the CC event log and the runtime log showed (docs/measurements.md), when given.
    event_log: EventLogReport | None = None

    @property
    def report(self) -> TdReport:
        return self.quote.report

    @property
    def tcb_status(self) -> str:
        return self.tcb.status.value if self.tcb else "NotEvaluated"

    @property
    def advisory_ids(self) -> tuple[str, ...]:
        return self.tcb.advisory_ids if self.tcb else ()


@dataclass
class VerificationCache:
    """Already-verified certificates, CRLs and signed collateral, keyed by the SHA-256 of their bytes.

    Only the results of signature checks and parsing are cached; time and revocation checks run on
    every verification. Safe to share between quotes and collateral sets; not thread-safe.
    """

    chains: dict[bytes, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    links: set[tuple[bytes, bytes]] = field(default_factory=set)
    crls: dict[tuple[bytes, bytes], x509.CertificateRevocationList] = field(default_factory=dict)
    tcb_infos: dict[bytes, TcbInfo] = field(default_factory=dict)
    qe_identities: dict[bytes, QeIdentity] = field(default_factory=dict)
    pck_extensions: dict[bytes, PckExtension] = field(default_factory=dict)
    fingerprints: dict[int, bytes] = field(default_factory=dict)


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

    def fingerprint(self, cert: x509.Certificate) -> bytes:
        key = id(cert)
        fp = self.cache.fingerprints.get(key)
        if fp is None:
            fp = cert.fingerprint(hashes.SHA256())
            self.cache.fingerprints[key] = fp
        return fp

    def load_chain(self, pem: bytes, what: str) -> tuple[x509.Certificate, ...]:
        key = _digest(pem)
        certs = self.cache.chains.get(key)
        if certs is None:
            certs = tuple(load_pem_chain(pem, what))
            self.cache.chains[key] = certs
        return certs

    def verify_link(self, child: x509.Certificate, parent: x509.Certificate, what: str) -> None:
        key = (self.fingerprint(child), self.fingerprint(parent))
        if key in self.cache.links:
            return
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
            raise CertificateChainError(
                f"{what}: {_name(child)} is not signed by {_name(parent)} ({type(e).__name__}: {e})"
            ) from None
        self.cache.links.add(key)

    def check_window(self, cert: x509.Certificate, what: str) -> None:
        if not cert.not_valid_before_utc <= self.when <= cert.not_valid_after_utc:
            raise CertificateExpired(
                f"{what}: {_name(cert)} is valid from {cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()}, not at {self.when.isoformat()}"
            )

    def verify_chain(
        self, certs: Sequence[x509.Certificate], what: str
    ) -> tuple[TrustAnchor, tuple[x509.Certificate, ...]]:
        """Check `certs` (leaf first) up to a trusted root; return the anchor and the non-root certs."""
        if len(certs) < 2:
            raise CertificateChainError(f"{what}: expected at least 2 certificates, found {len(certs)}")
        last = certs[-1]
        last_fp = self.fingerprint(last)
        anchor = next((a for a in self.anchors if a.sha256 == last_fp.hex()), None)
        if anchor is not None:
            chain = tuple(certs[:-1])
        else:
            anchor = next((a for a in self.anchors if a.certificate.subject == last.issuer), None)
            if anchor is None or last.issuer == last.subject:
                raise UntrustedRoot(
                    f"{what} ends at {_name(last)} (SHA-256 {last_fp.hex()}), "
                    "which is not a trusted root"
                )
            chain = tuple(certs)
        path = (*chain, anchor.certificate)
        for i in range(len(chain)):
            self.verify_link(path[i], path[i + 1], what)
            if i + 1 < len(chain) and not _is_ca(path[i + 1]):
                raise CertificateChainError(f"{what}: {_name(path[i + 1])} is not a CA certificate")
        for cert in path:
            self.check_window(cert, what)
        return anchor, chain


def _name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return repr(cns[0].value) if cns else repr(cert.subject.rfc4514_string())


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


def _ec_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateParseError(f"{what}: {_name(cert)} has an unusable public key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateParseError(f"{what}: {_name(cert)} does not hold a P-256 key")
    return key


# Checks: quote signature chain ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PckResult:
    anchor: TrustAnchor
    chain: tuple[x509.Certificate, ...]  # leaf first, without the root
    extension: PckExtension


def check_pck_chain(ctx: _Context, quote: Quote) -> _PckResult:
    certs = ctx.load_chain(quote.signature_data.certification.pck_chain_pem, "PCK certificate chain")
    anchor, chain = ctx.verify_chain(certs, "PCK certificate chain")
    leaf_fp = ctx.fingerprint(chain[0])
    ext = ctx.cache.pck_extensions.get(leaf_fp)
    if ext is None:
        ext = parse_pck_extension(chain[0])
        ctx.cache.pck_extensions[leaf_fp] = ext
    ctx.passed("pck-chain")
    return _PckResult(anchor, chain, ext)


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
    root: x509.CertificateRevocationList
    pck: x509.CertificateRevocationList


def _load_crl(
    ctx: _Context, der: bytes, issuer: x509.Certificate, what: str
) -> x509.CertificateRevocationList:
    key = (_digest(der), ctx.fingerprint(issuer))
    crl = ctx.cache.crls.get(key)
    if crl is None:
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as e:
            raise CrlInvalid(f"{what} is not a DER CRL: {e}") from None
        if crl.issuer != issuer.subject:
            raise CrlInvalid(
                f"{what} is issued by {crl.issuer.rfc4514_string()}, expected {_name(issuer)}"
            )
        try:
            valid = crl.is_signature_valid(_ec_key(issuer, what))
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise CrlInvalid(f"{what} is not signed by {_name(issuer)}")
        ctx.cache.crls[key] = crl
    this, nxt = crl.last_update_utc, crl.next_update_utc
    if nxt is None or not this <= ctx.when <= nxt:
        raise CollateralExpired(
            f"{what} is valid from {this.isoformat()} to "
            f"{nxt.isoformat() if nxt else '(no next update)'}, "
            f"not at {ctx.when.isoformat()}"
        )
    return crl


def check_crls(
    ctx: _Context, collateral: Collateral, anchor: TrustAnchor
) -> tuple[_Crls, tuple[x509.Certificate, ...]]:
    root_crl = _load_crl(ctx, collateral.root_ca_crl, anchor.certificate, "root CA CRL")
    certs = ctx.load_chain(collateral.pck_crl_issuer_chain.encode(), "PCK CRL issuer chain")
    _, chain = ctx.verify_chain(certs, "PCK CRL issuer chain")
    pck_crl = _load_crl(ctx, collateral.pck_crl, chain[0], "PCK CRL")
    ctx.passed("crls")
    return _Crls(root_crl, pck_crl), chain


def _check_signed_json(
    ctx: _Context, text: str, signature: bytes, chain_pem: str, what: str
) -> tuple[x509.Certificate, ...]:
    certs = ctx.load_chain(chain_pem.encode(), f"{what} issuer chain")
    _, chain = ctx.verify_chain(certs, f"{what} issuer chain")
    if not _ecdsa_verify(_ec_key(chain[0], what), signature, text.encode()):
        raise CollateralSignatureInvalid(f"{what} is not signed by {_name(chain[0])}")
    return chain


def _check_window(ctx: _Context, issue: datetime.datetime, nxt: datetime.datetime, what: str) -> None:
    if not issue <= ctx.when <= nxt:
        raise CollateralExpired(
            f"{what} is valid from {issue.isoformat()} to {nxt.isoformat()}, "
            f"not at {ctx.when.isoformat()}"
        )


def check_tcb_info(
    ctx: _Context, collateral: Collateral
) -> tuple[TcbInfo, tuple[x509.Certificate, ...]]:
    key = _digest(collateral.tcb_info.encode(), collateral.tcb_info_signature,
                  collateral.tcb_info_issuer_chain.encode())  # fmt: skip
    # The chain is always re-checked (validity at `now`); the signature and parse are cached.
    certs = ctx.load_chain(collateral.tcb_info_issuer_chain.encode(), "TCB info issuer chain")
    _, chain = ctx.verify_chain(certs, "TCB info issuer chain")
    info = ctx.cache.tcb_infos.get(key)
    if info is None:
        _check_signed_json(ctx, collateral.tcb_info, collateral.tcb_info_signature,
                           collateral.tcb_info_issuer_chain, "TCB info")  # fmt: skip
        try:
            info = parse_tcb_info(collateral.tcb_info)
        except CollateralParseError as e:
            raise CollateralInvalid(str(e)) from None
        ctx.cache.tcb_infos[key] = info
    _check_window(ctx, info.issue_date, info.next_update, "TCB info")
    ctx.passed("tcb-info")
    return info, chain


def check_qe_identity(
    ctx: _Context, collateral: Collateral
) -> tuple[QeIdentity, tuple[x509.Certificate, ...]]:
    key = _digest(collateral.qe_identity.encode(), collateral.qe_identity_signature,
                  collateral.qe_identity_issuer_chain.encode())  # fmt: skip
    certs = ctx.load_chain(collateral.qe_identity_issuer_chain.encode(), "QE identity issuer chain")
    _, chain = ctx.verify_chain(certs, "QE identity issuer chain")
    identity = ctx.cache.qe_identities.get(key)
    if identity is None:
        _check_signed_json(ctx, collateral.qe_identity, collateral.qe_identity_signature,
                           collateral.qe_identity_issuer_chain, "QE identity")  # fmt: skip
        try:
            identity = parse_qe_identity(collateral.qe_identity)
        except CollateralParseError as e:
            raise CollateralInvalid(str(e)) from None
        ctx.cache.qe_identities[key] = identity
    _check_window(ctx, identity.issue_date, identity.next_update, "QE identity")
    ctx.passed("qe-identity-collateral")
    return identity, chain


def check_revocation(
    ctx: _Context, crls: _Crls, anchor: TrustAnchor, chains: Sequence[tuple[x509.Certificate, ...]]
) -> None:
    for chain in chains:
        for cert in chain:
            if cert.issuer == anchor.certificate.subject:
                crl, what = crls.root, "root CA CRL"
            elif cert.issuer == crls.pck.issuer:
                crl, what = crls.pck, "PCK CRL"
            else:
                raise CrlInvalid(
                    f"no CRL covers {_name(cert)} (issued by {cert.issuer.rfc4514_string()})"
                )
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise CertificateRevoked(
                    f"{_name(cert)} (serial {cert.serial_number:x}) is revoked by the {what}"
                )
    ctx.passed("revocation")


def check_collateral(
    ctx: _Context, quote: Quote, collateral: Collateral, pck: _PckResult
) -> tcb.TcbEvaluation:
    crls, crl_chain = check_crls(ctx, collateral, pck.anchor)
    tcb_info, tcb_chain = check_tcb_info(ctx, collateral)
    qe_identity, qe_chain = check_qe_identity(ctx, collateral)
    check_revocation(ctx, crls, pck.anchor, (pck.chain, crl_chain, tcb_chain, qe_chain))
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


def check_policy(
    ctx: _Context, quote: Quote, policy: Policy, evaluation: tcb.TcbEvaluation | None
) -> None:
    report = quote.report
    attrs = attribute_report(report)
    if attrs.debug and not policy.allow_debug:
        raise DebugTdRejected(
            f"the TD is a debug TD (TD_ATTRIBUTES {report.td_attributes.hex()}): "
            "its memory is open to the host"
        )
    ctx.passed("debug")
    if policy.reject_reserved_td_attributes and attrs.reserved_bits:
        raise TdAttributesRejected(f"reserved TD_ATTRIBUTES bits are set: 0x{attrs.reserved_bits:016x}")
    if policy.require_sept_ve_disable and not attrs.sept_ve_disable:
        raise TdAttributesRejected("SEPT_VE_DISABLE is not set in TD_ATTRIBUTES")
    ctx.passed("td-attributes")
    if policy.require_zero_mr_servicetd and attrs.mr_servicetd_zero is False:
        raise ServiceTdRejected("MR_SERVICETD is not zero: a service TD is bound to this TD")
    ctx.passed("mr-servicetd")
    if policy.report_data is not None:
        if report.report_data != policy.report_data:
            raise ReportDataMismatch(
                f"report data is {report.report_data.hex()}, expected {policy.report_data.hex()}"
            )
        ctx.passed("report-data")
    if policy.accepted_mr_td is not None:
        if report.mr_td not in policy.accepted_mr_td:
            raise MeasurementMismatch(f"MRTD {report.mr_td.hex()} is not an accepted value")
        ctx.passed("mr-td")
    for i, (want, got) in enumerate(zip(policy.rtmrs, report.rtmrs, strict=True)):
        if want is not None and want != got:
            raise MeasurementMismatch(f"RTMR{i} is {got.hex()}, expected {want.hex()}")
    if any(r is not None for r in policy.rtmrs):
        ctx.passed("rtmrs")
    if evaluation is None:
        if policy.require_collateral:
            raise CollateralRequired("no collateral given, so the TCB status cannot be evaluated")
    else:
        if (
            evaluation.status == TcbStatus.REVOKED
            or evaluation.status not in policy.accepted_tcb_statuses
        ):
            accepted = ", ".join(sorted(s.value for s in policy.accepted_tcb_statuses))
            raise TcbStatusRejected(
                f"TCB status is {evaluation.status.value} (advisories: "
                f"{', '.join(evaluation.advisory_ids) or 'none'}); accepted: {accepted}"
            )
        rejected = sorted(set(evaluation.advisory_ids) & policy.rejected_advisory_ids)
        if rejected:
            raise TcbStatusRejected(f"the TCB is affected by rejected advisories {', '.join(rejected)}")
        ctx.passed("tcb-status")


# Checks: event logs (docs/measurements.md) ----------------------------------------------------------


def check_event_logs(
    ctx: _Context,
    quote: Quote,
    policy: Policy,
    event_log: bytes | None,
    runtime_events: Sequence[Mapping[str, object]] | None,
) -> EventLogReport | None:
    rtmrs = quote.report.rtmrs
    if event_log is None:
        if policy.expected_events is not None:
            raise EventLogRequired(
                "the policy expects measured boot events, but no CC event log was given"
            )
        if runtime_events is not None:
            check_runtime_log(runtime_events, rtmrs[3])
            ctx.passed("runtime-log")
        return None
    report = check_event_log(rtmrs, event_log, policy.expected_events, runtime_events)
    ctx.passed("event-log")
    if policy.expected_events is not None:
        ctx.passed("expected-events")
    if runtime_events is not None:
        ctx.passed("runtime-log")
    return report


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
    event_log: bytes | None = None,
    runtime_events: Sequence[Mapping[str, object]] | None = None,
) -> VerifiedQuote:
    """Verify a TDX quote and return what it proves, or raise the VerificationError of the failed check.

    `now` pins the verification time (Unix seconds or an aware datetime); it defaults to the clock.
    `trusted_roots` defaults to Intel's SGX Root CA only; development roots must be passed explicitly.
    `event_log` (the CC event log, CCEL data) and `runtime_events` (the runtime log from `attest`)
    are checked against the quote's RTMRs and the policy's expected events.
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
    event_report = check_event_logs(ctx, parsed, policy, event_log, runtime_events)
    return VerifiedQuote(
        quote=parsed,
        trust_anchor=pck.anchor,
        pck=pck.extension,
        tcb=evaluation,
        attributes=attribute_report(parsed.report),
        checks=tuple(ctx.checks),
        verified_at=ctx.now,
        event_log=event_report,
    )
