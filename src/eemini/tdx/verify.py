"""`verify(quote, collateral, policy, now)`: the one safe entry point. Returns a VerifiedQuote or raises.

The pipeline is a flat sequence of named checks, in trust-chain order (Intel TDX DCAP Quoting
Library API, "Quote verification"; the same order as Intel's QVL):

    quote-signature chain:  pck_chain -> qe_report_signature -> qe_report_data -> quote_signature
    collateral (optional):  crls -> tcb_info -> qe_identity -> revocation -> tcb_evaluation
    policy:                 debug -> td_attributes -> mr_servicetd -> report_data -> measurements
                            -> tcb_status

Each check takes the run's `chain.Context` (clock, trust anchors, cache, the names of the checks
passed) and raises its own VerificationError subclass (see errors.py). A VerificationCache may be
passed to skip re-verifying certificates, CRLs and signed collateral already seen (keyed by the
SHA-256 of their bytes); validity windows and revocation are evaluated again on every call.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from eemini.tdx import tcb
from eemini.tdx.chain import (
    Cert,
    Context,
    Crl,
    VerificationCache,
    ec_key,
    ecdsa_verify_raw,
    load_crl,
)
from eemini.tdx.collateral import (
    Collateral,
    QeIdentity,
    TcbInfo,
    TcbStatus,
    parse_qe_identity,
    parse_tcb_info,
)
from eemini.tdx.errors import (
    CertificateRevoked,
    CollateralExpired,
    CollateralInvalid,
    CollateralParseError,
    CollateralRequired,
    CollateralSignatureInvalid,
    CollateralTooOld,
    CrlInvalid,
    DebugTdRejected,
    EventLogRequired,
    FirmwareNotPinned,
    MeasurementMismatch,
    QeReportDataMismatch,
    QeReportSignatureInvalid,
    QuoteSignatureInvalid,
    ReportDataMismatch,
    RuntimeLogUnbound,
    ServiceTdRejected,
    TcbStatusRejected,
    TdAttributesRejected,
)
from eemini.tdx.evidence import EventLogReport, check_event_log
from eemini.tdx.guard import parsing, utf8
from eemini.tdx.pck import PckExtension
from eemini.tdx.policy import DEFAULT_POLICY, Policy
from eemini.tdx.quote import Quote, TdReport, parse_quote
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor
from eemini.tdx.runtime_log import RuntimeLogBinding, check_runtime_log

# VerificationCache lives in chain.py; callers import it from here, next to verify().
__all__ = ["AttributeReport", "VerificationCache", "VerifiedQuote", "Waiver", "verify"]


@dataclass(frozen=True, slots=True)
class Waiver:
    """A check that did not pass but that the policy explicitly allowed to fail: always reported."""

    check: str
    status: str  # one word or two: "unbound", "not pinned"
    reason: str


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
    # Checks that failed but that the policy allowed (allow_any_firmware, allow_unbound_runtime_log).
    waived: tuple[Waiver, ...] = ()

    @property
    def report(self) -> TdReport:
        return self.quote.report

    @property
    def tcb_status(self) -> str:
        return self.tcb.status.value if self.tcb else "NotEvaluated"

    @property
    def advisory_ids(self) -> tuple[str, ...]:
        return self.tcb.advisory_ids if self.tcb else ()


# Checks: quote signature chain ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PckResult:
    anchor: TrustAnchor
    root: Cert
    chain: tuple[Cert, ...]  # leaf first, without the root
    extension: PckExtension


def check_pck_chain(ctx: Context, quote: Quote) -> _PckResult:
    certs = ctx.load_chain(quote.signature_data.certification.pck_chain_pem, "PCK certificate chain")
    anchor, root, chain = ctx.verify_chain(certs, "PCK certificate chain")
    leaf = chain[0]
    ext = ctx.cache.pck_extensions.get(leaf.fingerprint)
    if ext is None:
        ext = ctx.cache.pck_extensions[leaf.fingerprint] = ctx.pck_extension(leaf)
    ctx.passed("pck-chain")
    return _PckResult(anchor, root, chain, ext)


def check_qe_report_signature(ctx: Context, quote: Quote, pck: _PckResult) -> None:
    # A platform's quoting enclave signs every quote with one attestation key, and the QE report
    # binding that key is the same in all of them: a cache checks its signature once per PCK.
    cert = quote.signature_data.certification
    seen = (pck.chain[0].fingerprint, cert.qe_report.raw, cert.qe_report_signature)
    if seen not in ctx.cache.qe_reports:
        key = ec_key(pck.chain[0], "PCK certificate")
        if not ecdsa_verify_raw(key, cert.qe_report_signature, cert.qe_report.raw):
            raise QeReportSignatureInvalid("the QE report is not signed by the PCK certificate's key")
        ctx.cache.qe_reports.add(seen)
    ctx.passed("qe-report-signature")


def check_qe_report_data(ctx: Context, quote: Quote) -> None:
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


def check_quote_signature(ctx: Context, quote: Quote) -> None:
    raw = quote.signature_data.attestation_key
    key = ctx.cache.attestation_keys.get(raw)
    if key is None:
        with parsing(QuoteSignatureInvalid, "the attestation key is not a point on P-256"):
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
        ctx.cache.attestation_keys[raw] = key
    if not ecdsa_verify_raw(key, quote.signature_data.signature, quote.signed_data):
        raise QuoteSignatureInvalid(
            "the quote header and TD report are not signed by the attestation key"
        )
    ctx.passed("quote-signature")


# Checks: collateral ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Crls:
    root: Crl
    pck: Crl


def check_crls(ctx: Context, collateral: Collateral, root: Cert) -> tuple[_Crls, tuple[Cert, ...]]:
    root_crl = load_crl(ctx, collateral.root_ca_crl, root, "root CA CRL")
    what = "PCK CRL issuer chain"
    certs = ctx.load_chain(collateral.pck_crl_issuer_chain, what)
    _, _, chain = ctx.verify_chain(certs, what)
    pck_crl = load_crl(ctx, collateral.pck_crl, chain[0], "PCK CRL")
    ctx.passed("crls")
    return _Crls(root_crl, pck_crl), chain


def _check_window(ctx: Context, issue: datetime.datetime, nxt: datetime.datetime, what: str) -> None:
    # Current through its nextUpdate second, as dcap-qvl judges TCB info and QE identity (it
    # rejects only `now > nextUpdate`); CRLs expire at that second (chain.load_crl).
    if not issue <= ctx.when <= nxt:
        raise CollateralExpired(
            f"{what} is valid from {issue.isoformat()} to {nxt.isoformat()}, "
            f"not at {ctx.when.isoformat()}"
        )


_Signed = TypeVar("_Signed", TcbInfo, QeIdentity)


def _check_signed_json(
    ctx: Context,
    text: str,
    signature: bytes,
    chain_pem: str,
    what: str,
    *,
    cache: dict[tuple[str, bytes, str], _Signed],
    parse: Callable[[str], _Signed],
) -> tuple[_Signed, tuple[Cert, ...]]:
    # TCB info and QE identity are checked alike: cached by what was signed, its signature and
    # chain, the signature checked only on a cache miss; the chain (validity at `now`) and the
    # issue/next-update window always.
    key = (text, signature, chain_pem)
    doc = cache.get(key)
    signed = utf8(text, CollateralInvalid, what) if doc is None else b""
    certs = ctx.load_chain(chain_pem, f"{what} issuer chain")
    _, _, chain = ctx.verify_chain(certs, f"{what} issuer chain")
    if doc is None:
        if not ecdsa_verify_raw(ec_key(chain[0], what), signature, signed):
            raise CollateralSignatureInvalid(f"{what} is not signed by {chain[0].name}")
        try:
            doc = parse(text)
        except CollateralParseError as e:
            raise CollateralInvalid(str(e)) from None
        cache[key] = doc
    _check_window(ctx, doc.issue_date, doc.next_update, what)
    return doc, chain


def check_tcb_info(ctx: Context, collateral: Collateral) -> tuple[TcbInfo, tuple[Cert, ...]]:
    info, chain = _check_signed_json(
        ctx,
        collateral.tcb_info,
        collateral.tcb_info_signature,
        collateral.tcb_info_issuer_chain,
        "TCB info",
        cache=ctx.cache.tcb_infos,
        parse=parse_tcb_info,
    )
    ctx.passed("tcb-info")
    return info, chain


def check_qe_identity(ctx: Context, collateral: Collateral) -> tuple[QeIdentity, tuple[Cert, ...]]:
    identity, chain = _check_signed_json(
        ctx,
        collateral.qe_identity,
        collateral.qe_identity_signature,
        collateral.qe_identity_issuer_chain,
        "QE identity",
        cache=ctx.cache.qe_identities,
        parse=parse_qe_identity,
    )
    ctx.passed("qe-identity-collateral")
    return identity, chain


def check_revocation(ctx: Context, crls: _Crls, root: Cert, chains: Sequence[tuple[Cert, ...]]) -> None:
    # The root itself may be listed in its own CRL (dcap-qvl checks this too): then nothing holds.
    if crls.root.is_revoked(root.serial):
        raise CertificateRevoked(f"the root {root.name} is revoked by its own CRL")
    for chain in chains:
        for cert in chain:
            if cert.issuer == root.subject:
                crl, what = crls.root, "root CA CRL"
            elif cert.issuer == crls.pck.issuer:
                crl, what = crls.pck, "PCK CRL"
            else:
                raise CrlInvalid(f"no CRL covers {cert.name} (its issuer issued neither CRL)")
            if crl.is_revoked(cert.serial):
                raise CertificateRevoked(
                    f"{cert.name} (serial {cert.serial:x}) is revoked by the {what}"
                )
    ctx.passed("revocation")


def check_collateral_age(
    ctx: Context, policy: Policy, tcb_info: TcbInfo, qe_identity: QeIdentity, crls: _Crls
) -> None:
    """The policy's max_collateral_age: TCB info and QE identity by issueDate, the PCK CRL by
    thisUpdate. The root CA CRL is exempt: Intel issues it about once a year."""
    if policy.max_collateral_age is None:
        return
    limit = datetime.timedelta(seconds=policy.max_collateral_age)
    for what, issued, field in (
        ("TCB info", tcb_info.issue_date, "issueDate"),
        ("QE identity", qe_identity.issue_date, "issueDate"),
        ("PCK CRL", crls.pck.this_update, "thisUpdate"),
    ):
        age = ctx.when - issued
        if age > limit:
            raise CollateralTooOld(
                f"{what} is from {issued.isoformat()} ({field}), {_span(age)} before "
                f"{ctx.when.isoformat()}; the policy accepts at most {_span(limit)} (max_collateral_age)"
            )
    ctx.passed("collateral-age")


def _span(delta: datetime.timedelta) -> str:
    """Exactly, as the policy's durations are written: "7d", "29d 23h 59m 59s"."""
    seconds = int(delta.total_seconds())
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts)


def check_collateral(
    ctx: Context, quote: Quote, collateral: Collateral, pck: _PckResult, policy: Policy = DEFAULT_POLICY
) -> tcb.TcbEvaluation:
    # Collateral must come from the PCK chain's own root: with a development root trusted as well,
    # Intel's collateral must not vouch for a development PCK, nor the reverse.
    ctx.anchors = (pck.anchor,)
    crls, crl_chain = check_crls(ctx, collateral, pck.root)
    tcb_info, tcb_chain = check_tcb_info(ctx, collateral)
    qe_identity, qe_chain = check_qe_identity(ctx, collateral)
    check_collateral_age(ctx, policy, tcb_info, qe_identity, crls)
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


def check_debug(ctx: Context, report: TdReport, policy: Policy) -> None:
    if report.debug and not policy.allow_debug:
        raise DebugTdRejected(
            f"the TD is a debug TD (TD_ATTRIBUTES {report.td_attributes.hex()}): "
            "its memory is open to the host"
        )
    ctx.passed("debug")


def check_td_attributes(ctx: Context, report: TdReport, policy: Policy) -> None:
    reserved = report.reserved_attributes
    if policy.reject_reserved_td_attributes and reserved:
        raise TdAttributesRejected(f"reserved TD_ATTRIBUTES bits are set: 0x{reserved:016x}")
    if policy.require_sept_ve_disable and not report.sept_ve_disable:
        raise TdAttributesRejected("SEPT_VE_DISABLE is not set in TD_ATTRIBUTES")
    ctx.passed("td-attributes")


def check_mr_servicetd(ctx: Context, report: TdReport, policy: Policy) -> None:
    # TDX 1.5: a non-zero MR_SERVICETD means a service TD (e.g. a migration TD) is bound to this TD.
    if policy.require_zero_mr_servicetd and report.mr_servicetd is not None and any(report.mr_servicetd):
        raise ServiceTdRejected("MR_SERVICETD is not zero: a service TD is bound to this TD")
    ctx.passed("mr-servicetd")


def check_report_data(ctx: Context, report: TdReport, policy: Policy) -> None:
    if policy.report_data is None:
        return
    if report.report_data != policy.report_data:
        raise ReportDataMismatch(
            f"report data is {report.report_data.hex()}, expected {policy.report_data.hex()}"
        )
    ctx.passed("report-data")


def check_measurements(ctx: Context, report: TdReport, policy: Policy) -> None:
    if policy.accepted_mr_td is not None:
        if report.mr_td not in policy.accepted_mr_td:
            raise MeasurementMismatch(f"MRTD {report.mr_td.hex()} is not an accepted value")
        ctx.passed("mr-td")
    for i, (want, got) in enumerate(zip(policy.rtmrs, report.rtmrs, strict=True)):
        if want is not None and want != got:
            raise MeasurementMismatch(f"RTMR{i} is {got.hex()}, expected {want.hex()}")
    if any(r is not None for r in policy.rtmrs):
        ctx.passed("rtmrs")


def check_tcb_status(ctx: Context, evaluation: tcb.TcbEvaluation | None, policy: Policy) -> None:
    if evaluation is None:
        if policy.require_collateral:
            raise CollateralRequired("no collateral given, so the TCB status cannot be evaluated")
        return
    if evaluation.status == TcbStatus.REVOKED or evaluation.status not in policy.accepted_tcb_statuses:
        accepted = ", ".join(sorted(s.value for s in policy.accepted_tcb_statuses))
        drift = f"; {evaluation.drift.sentence()}" if evaluation.drift else ""
        raise TcbStatusRejected(
            f"TCB status is {evaluation.status.value} (advisories: "
            f"{', '.join(evaluation.advisory_ids) or 'none'}); accepted: {accepted}{drift}"
        )
    rejected = sorted(set(evaluation.advisory_ids) & policy.rejected_advisory_ids)
    if rejected:
        raise TcbStatusRejected(f"the TCB is affected by rejected advisories {', '.join(rejected)}")
    ctx.passed("tcb-status")


def check_policy(
    ctx: Context, quote: Quote, policy: Policy, evaluation: tcb.TcbEvaluation | None
) -> None:
    """The policy stage. Debug comes first: a debug TD proves nothing, whatever else it claims."""
    report = quote.report
    check_debug(ctx, report, policy)
    check_td_attributes(ctx, report, policy)
    check_mr_servicetd(ctx, report, policy)
    check_report_data(ctx, report, policy)
    check_measurements(ctx, report, policy)
    check_tcb_status(ctx, evaluation, policy)


# Checks: event logs (docs/measurements.md) ----------------------------------------------------------


def check_firmware_pinned(ctx: Context, policy: Policy, waived: list[Waiver]) -> None:
    """RTMR1/RTMR2 events are only as trustworthy as the firmware that logged them: checking an
    image's events needs the firmware pinned (MRTD), or the policy's explicit waiver."""
    if policy.accepted_mr_td is not None:
        ctx.passed("firmware-pinned")
    elif policy.allow_any_firmware:
        why = "any firmware accepted (allow_any_firmware): the boot events are only as trustworthy "
        waived.append(Waiver("firmware-pinned", "not pinned", why + "as the firmware that logged them"))
    else:
        raise FirmwareNotPinned(
            "the policy accepts any MRTD, so any firmware could have logged the predicted events: "
            'list the accepted firmware in mr_td (docs/verify.md, "Pinning the firmware"), or '
            "set allow_any_firmware to accept that"
        )


def check_runtime_binding(
    ctx: Context, binding: RuntimeLogBinding | None, policy: Policy, waived: list[Waiver]
) -> None:
    """`runtime-log` passes only when RTMR3 is the replay of the runtime log. With expected events
    a missing runtime log counts as unbound: boot-time config is recorded nowhere else."""
    if binding == RuntimeLogBinding.BOUND:
        ctx.passed("runtime-log")
        return
    if binding is None and policy.expected_events is None:
        return
    why = (
        "RTMR3 was never extended, so the quote does not vouch for the runtime event log (the "
        "guest kernel offers no RTMR3 extension)"
        if binding is not None
        else "no runtime event log was given, so the boot-time config is not checked"
    )
    if not policy.allow_unbound_runtime_log:
        raise RuntimeLogUnbound(f"unbound: {why}; set allow_unbound_runtime_log to accept that")
    waived.append(Waiver("runtime-log", "unbound", f"{why} (allow_unbound_runtime_log)"))


def check_event_logs(
    ctx: Context,
    quote: Quote,
    policy: Policy,
    event_log: bytes | None,
    runtime_events: Sequence[Mapping[str, object]] | None,
    *,
    waived: list[Waiver],
) -> EventLogReport | None:
    rtmrs = quote.report.rtmrs
    if policy.expected_events is not None:
        check_firmware_pinned(ctx, policy, waived)
        if event_log is None:
            raise EventLogRequired(
                "the policy expects measured boot events, but no CC event log was given"
            )
    report = None
    binding = None
    if event_log is not None:
        report = check_event_log(
            rtmrs, event_log, policy.expected_events, runtime_events,
            rtmr0_pinned=policy.rtmrs[0] is not None,
        )  # fmt: skip
        ctx.passed("event-log")
        if policy.expected_events is not None:
            ctx.passed("expected-events")
        binding = report.runtime
    elif runtime_events is not None:
        binding = check_runtime_log(runtime_events, rtmrs[3])
    check_runtime_binding(ctx, binding, policy, waived)
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
    ctx = Context(_unix(now), trusted_roots, cache)
    pck = check_pck_chain(ctx, parsed)
    check_qe_report_signature(ctx, parsed, pck)
    check_qe_report_data(ctx, parsed)
    check_quote_signature(ctx, parsed)
    evaluation = (
        check_collateral(ctx, parsed, collateral, pck, policy) if collateral is not None else None
    )
    check_policy(ctx, parsed, policy, evaluation)
    waived: list[Waiver] = []
    event_report = check_event_logs(ctx, parsed, policy, event_log, runtime_events, waived=waived)
    return VerifiedQuote(
        quote=parsed,
        trust_anchor=pck.anchor,
        pck=pck.extension,
        tcb=evaluation,
        attributes=attribute_report(parsed.report),
        checks=tuple(ctx.checks),
        verified_at=ctx.now,
        event_log=event_report,
        waived=tuple(waived),
    )
