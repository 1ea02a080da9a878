"""`verify_azure(evidence, collateral, policy, now)`: Azure vTPM evidence, one named check at a time.

The trust chain, and the check that holds each link (docs/verify.md, "Azure evidence"):

    Intel's root -> PCK -> QE -> TD quote       the DCAP checks of eemini.tdx.verify, under the Azure
                                                paravisor policy (`azure_policy`): the TD is
                                                Microsoft's paravisor, pinned by MRTD
    TD quote -> HCL report's TD report          hcl-td-report: the report the guest read is the
                                                one the quote carries
    TD quote -> runtime data                    runtime-data: report_data = SHA-256(runtime data)
                                                || 32 zero bytes
    runtime data -> caller's data               user-data: `user-data` = the expected report data
    runtime data -> HCLAkPub -> vTPM quote      vtpm-quote-signature (RSASSA-SHA256), vtpm-quote
                                                (a TPM-generated TPMS_ATTEST of type QUOTE)
    vTPM quote -> caller's nonce                vtpm-nonce: extraData = the expected nonce
    vTPM quote -> PCR values                    vtpm-pcrs: SHA-256 PCRs 0..23, digest matches
    PCR values -> TPM event log                 tpm-event-log: the log replays to the boot's PCRs
                                                (0-9, 11-15) and to every PCR it extends
    TPM event log -> this image                 expected-events: the exact-set rule of
                                                eemini.tdx.bootevents on the PCR log, SHA-256 bank
    runtime event log                           runtime-log: nothing in Azure evidence binds it
                                                (unbound: rejected unless the policy waives it)

Why the paravisor's MRTD must be pinned, with no waiver: anyone with a TDX machine can make a TD
whose report data is SHA-256 of a runtime-data document naming a key of their own as HCLAkPub
(on a cloud that offers configfs-tsm, with no firmware of their own at all). Only the MRTD says
the TD is the paravisor that keeps HCLAkPub inside the vTPM.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eemini.tdx.azure.errors import (
    HclTdReportMismatch,
    ParavisorNotPinned,
    RuntimeDataMismatch,
    TpmEventLogInvalid,
    UserDataMismatch,
    VtpmNonceMismatch,
    VtpmPcrMismatch,
    VtpmQuoteInvalid,
    VtpmSignatureInvalid,
)
from eemini.tdx.azure.evidence import AzureEvidence
from eemini.tdx.azure.hcl import (
    HclReport,
    RuntimeData,
    parse_hcl_report,
    parse_runtime_data,
)
from eemini.tdx.azure.tpm import (
    ALL_PCRS_SELECT,
    PCR_COUNT,
    TPM_ALG_SHA256,
    AttestParseError,
    TpmQuote,
    parse_attest,
    pcr_digest,
    rsassa_sha256_verify,
)
from eemini.tdx.azure.tpmlog import ReplayError, first_mismatch, judged_pcrs, replay_pcrs
from eemini.tdx.bootevents import BootCheck, check_boot_events
from eemini.tdx.collateral import Collateral
from eemini.tdx.errors import PolicyError, RuntimeLogUnbound
from eemini.tdx.eventlog import EventLog, EventLogError, HashAlg, parse_event_log
from eemini.tdx.guard import parsing
from eemini.tdx.measure import PredictedEvent
from eemini.tdx.policy import Policy
from eemini.tdx.quote import Quote, parse_quote, report_fields
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor
from eemini.tdx.verify import VerificationCache, VerifiedQuote, Waiver, verify

# The paravisor TDs seen so far, with where each value comes from. Microsoft publishes no reference
# values; a relying party replaces this list with the MRTDs it accepts (`--mr-td`, policy `mr_td`).
KNOWN_PARAVISOR_MRTDS: Mapping[bytes, str] = {
    bytes.fromhex(
        "024a32b070383331181619fa387cb4d55d1e38879f989933055ccad5bc2db795d1737b66205949d15469dc8c1ba7ab7b"
    ): "Azure TDX paravisor TD in confidential-containers/trustee's test data "
    "(deps/verifier/test_data/az-tdx-vtpm/td-quote.bin), an Intel-signed quote from a DCesv5 VM",
}

# Why each TD attribute rule is what it is under the paravisor policy (printed by --json).
PARAVISOR_RULES: Mapping[str, str] = {
    "sept_ve_disable": "relaxed: the TD is the paravisor, which runs the guest as an L2 VM (TD "
    "partitioning) and handles #VE itself; every Azure TD quote seen has TD_ATTRIBUTES 0. The "
    "guest's memory is protected by the paravisor's L2 page tables, not by this attribute",
    "debug": "kept: a debug TD's memory is open to the host",
    "reserved_td_attributes": "kept: reserved bits must be clear",
    "mr_td": "pinned, never waived: only the paravisor's MRTD makes HCLAkPub a vTPM key",
    "report_data": "checked as runtime-data (SHA-256 of the runtime data), not against the caller's "
    "data; the caller's data is checked in user-data and vtpm-nonce",
}


@dataclass(frozen=True, slots=True)
class AzurePolicy:
    """What a relying party accepts from Azure evidence. Build it with `azure_policy`."""

    td: Policy  # the TD quote's policy (the paravisor's)
    report_data: bytes | None = None  # expected `user-data` (64 bytes)
    nonce: bytes | None = None  # expected vTPM extraData
    expected_events: tuple[PredictedEvent, ...] | None = None  # in the TPM (PCR) event log
    allow_unbound_runtime_log: bool = False


def azure_policy(
    policy: Policy,
    *,
    nonce: bytes | None = None,
    relax_sept_ve_disable: bool = True,
) -> AzurePolicy:
    """The Azure paravisor policy from a relying party's `Policy`:

    - `report_data` becomes the expected `user-data`, and the expected vTPM nonce unless `nonce`
      is given (our guest uses the same 64 bytes for both);
    - `mr_td` lists the accepted paravisor MRTDs; without it, KNOWN_PARAVISOR_MRTDS;
    - SEPT_VE_DISABLE is not required (PARAVISOR_RULES says why) unless `relax_sept_ve_disable` is
      False (a policy that asked for it explicitly);
    - `expected_events` are checked in the TPM event log; `allow_unbound_runtime_log` as for
      quotes; `allow_any_firmware` is refused (ParavisorNotPinned's reason)."""
    if policy.allow_any_firmware:
        raise PolicyError(
            "allow_any_firmware cannot apply to Azure evidence: the paravisor's MRTD is what makes "
            "HCLAkPub a vTPM key, so it is always pinned (list accepted values in mr_td)"
        )
    if nonce is not None and len(nonce) > 64:
        raise PolicyError(f"the vTPM nonce is {len(nonce)} bytes; a TPM takes at most 64")
    td = policy.replace(
        report_data=None,
        expected_events=None,
        allow_unbound_runtime_log=False,
        require_sept_ve_disable=policy.require_sept_ve_disable and not relax_sept_ve_disable,
        accepted_mr_td=policy.accepted_mr_td or frozenset(KNOWN_PARAVISOR_MRTDS),
    )
    return AzurePolicy(
        td=td,
        report_data=policy.report_data,
        nonce=nonce if nonce is not None else policy.report_data,
        expected_events=policy.expected_events,
        allow_unbound_runtime_log=policy.allow_unbound_runtime_log,
    )


@dataclass(frozen=True, slots=True)
class VerifiedAzure:
    """Azure evidence whose every link checked out."""

    td: VerifiedQuote  # the paravisor's TD quote
    hcl: HclReport
    runtime: RuntimeData
    vtpm: TpmQuote
    pcrs: tuple[bytes, ...]  # SHA-256 PCR 0..23, vouched for by the vTPM quote
    checks: tuple[str, ...]
    event_log: EventLog | None = None
    boot: BootCheck | None = None
    waived: tuple[Waiver, ...] = ()
    # PCRs (outside the boot's) whose value is not the TPM log's replay: extended after boot, e.g.
    # PCR 10 by the kernel's IMA. Reported, not judged.
    pcrs_after_boot: tuple[tuple[int, bytes], ...] = ()

    @property
    def user_data(self) -> bytes:
        return self.runtime.user_data

    @property
    def nonce(self) -> bytes:
        return self.vtpm.extra_data


# Checks ---------------------------------------------------------------------------------------------


def check_hcl_td_report(hcl: HclReport, quote: Quote) -> None:
    """The HCL report's TD report is the one the quote was made from: every field the quote
    carries is equal, and the REPORTMACSTRUCT's hashes of TEE_TCB_INFO and TDINFO hold (so no
    byte of either differs from what the TDX module wrote). Its MAC can only be checked on the
    machine that made it; the quote's signature stands in for it."""
    td = hcl.td_report
    if hashlib.sha384(td.tee_tcb_info).digest() != td.tee_tcb_info_hash:
        raise HclTdReportMismatch(
            "the HCL report's TD report: TEE_TCB_INFO does not hash to the TEE_TCB_INFO hash in "
            "its REPORTMACSTRUCT"
        )
    if hashlib.sha384(td.td_info).digest() != td.tee_info_hash:
        raise HclTdReportMismatch(
            "the HCL report's TD report: TDINFO does not hash to the TDINFO hash in its REPORTMACSTRUCT"
        )
    ours = td.quote_fields()
    theirs = report_fields(quote.report)  # a TDX 1.0 quote has no TEE_TCB_SVN2 nor MR_SERVICETD
    for name, value in ours.items():
        if name in theirs and theirs[name] != value:
            raise HclTdReportMismatch(
                f"the HCL report's TD report has {name} {value.hex()}, the TD quote "
                f"{theirs[name].hex()}: the quote was not made from this report"
            )


def check_runtime_data(hcl: HclReport, quote: Quote) -> RuntimeData:
    """report_data = SHA-256(runtime data) || 32 zero bytes; then the bound bytes must be the
    runtime-data document (a bound document that is not one is rejected here too)."""
    want = hashlib.sha256(hcl.runtime_data).digest() + bytes(32)
    got = quote.report.report_data
    if got != want:
        raise RuntimeDataMismatch(
            f"the TD quote's report data is {got.hex()}, expected SHA-256 of the HCL report's "
            f"runtime data and 32 zero bytes ({want.hex()})"
        )
    return parse_runtime_data(hcl.runtime_data, RuntimeDataMismatch)


def check_user_data(runtime: RuntimeData, expected: bytes | None) -> bool:
    if expected is None:
        return False
    if runtime.user_data != expected:
        raise UserDataMismatch(
            f"the runtime data's user-data is {runtime.user_data.hex()}, expected {expected.hex()}"
        )
    return True


def check_vtpm_signature(runtime: RuntimeData, message: bytes, signature: bytes) -> None:
    with parsing(VtpmSignatureInvalid, "HCLAkPub is not a usable RSA public key"):
        ok = rsassa_sha256_verify(runtime.ak, signature, message)
    if not ok:
        raise VtpmSignatureInvalid(
            f"the vTPM quote is not signed by HCLAkPub ({runtime.ak.bits}-bit RSA, RSASSA-SHA256) "
            "from the runtime data the TD quote binds"
        )


def check_vtpm_quote(message: bytes) -> TpmQuote:
    try:
        return parse_attest(message)
    except AttestParseError as e:
        raise VtpmQuoteInvalid(f"the signed vTPM message is not a quote: {e}") from None


def check_vtpm_nonce(attest: TpmQuote, expected: bytes | None) -> bool:
    if expected is None:
        return False
    if attest.extra_data != expected:
        raise VtpmNonceMismatch(
            f"the vTPM quote's extraData is {attest.extra_data.hex()}, expected {expected.hex()}"
        )
    return True


def check_vtpm_pcrs(attest: TpmQuote, pcrs: Sequence[bytes]) -> None:
    sel = attest.pcr_selections
    if len(sel) != 1 or sel[0].hash_alg != TPM_ALG_SHA256 or sel[0].select != ALL_PCRS_SELECT:
        shown = "; ".join(f"bank {s.hash_alg:#06x} PCRs {list(s.pcrs)}" for s in sel) or "nothing"
        raise VtpmPcrMismatch(f"the vTPM quote covers {shown}, not SHA-256 PCRs 0..23")
    if len(pcrs) != PCR_COUNT:
        raise VtpmPcrMismatch(f"{len(pcrs)} PCR values were given with the quote, expected {PCR_COUNT}")
    digest = pcr_digest(pcrs)
    if digest != attest.pcr_digest:
        raise VtpmPcrMismatch(
            f"the PCR values given with the vTPM quote hash to {digest.hex()}, but the quote's PCR "
            f"digest is {attest.pcr_digest.hex()}"
        )


def check_tpm_event_log(data: bytes, pcrs: Sequence[bytes]) -> tuple[EventLog, dict[int, bytes]]:
    """The log and the PCRs extended outside it (IMA's PCR 10, say): the boot's PCRs, and every PCR
    the log extends, must be its SHA-256 replay (tpmlog.BOOT_PCRS)."""
    try:
        log = parse_event_log(data)
        replayed = replay_pcrs(log, HashAlg.SHA256)
    except (EventLogError, ReplayError) as e:
        raise TpmEventLogInvalid(f"the TPM event log is not valid: {e}") from None
    bad = first_mismatch(replayed, pcrs, judged_pcrs(log))
    if bad is not None:
        raise TpmEventLogInvalid(
            f"the TPM event log does not replay to the quoted PCRs: PCR {bad} is "
            f"{pcrs[bad].hex()}, the log's SHA-256 replay gives {replayed[bad].hex()}"
        )
    after_boot = {i: p for i, (p, r) in enumerate(zip(pcrs, replayed, strict=True)) if p != r}
    return log, after_boot


def _unix(now: int | float | datetime.datetime | None) -> int | float | datetime.datetime:
    return datetime.datetime.now(datetime.UTC) if now is None else now


def verify_azure(
    evidence: AzureEvidence,
    collateral: Collateral | None,
    policy: AzurePolicy,
    now: int | float | datetime.datetime | None = None,
    *,
    trusted_roots: Sequence[TrustAnchor] = (INTEL_ROOT,),
    cache: VerificationCache | None = None,
    event_log: bytes | None = None,
    runtime_events: Sequence[Mapping[str, object]] | None = None,
) -> VerifiedAzure:
    """Verify Azure evidence, or raise the VerificationError of the first check that failed
    (QuoteError subclasses for evidence that does not parse). `event_log` and `runtime_events`
    replace the evidence's own TPM event log and runtime log when given."""
    if not policy.td.accepted_mr_td:
        raise ParavisorNotPinned(
            "the policy accepts any paravisor MRTD, and any TD could then vouch for any HCLAkPub"
        )
    hcl = parse_hcl_report(evidence.hcl_report)
    quote = parse_quote(evidence.td_quote)
    td = verify(quote, collateral, policy.td, _unix(now), trusted_roots=trusted_roots, cache=cache)
    checks = list(td.checks)
    check_hcl_td_report(hcl, quote)
    checks.append("hcl-td-report")
    runtime = check_runtime_data(hcl, quote)
    checks.append("runtime-data")
    if check_user_data(runtime, policy.report_data):
        checks.append("user-data")
    vq = evidence.vtpm_quote
    check_vtpm_signature(runtime, vq.message, vq.signature)
    checks.append("vtpm-quote-signature")
    attest = check_vtpm_quote(vq.message)
    checks.append("vtpm-quote")
    if check_vtpm_nonce(attest, policy.nonce):
        checks.append("vtpm-nonce")
    check_vtpm_pcrs(attest, vq.pcrs)
    checks.append("vtpm-pcrs")
    log_data = event_log if event_log is not None else evidence.tpm_event_log
    log = None
    boot = None
    after_boot: dict[int, bytes] = {}
    if log_data is not None:
        log, after_boot = check_tpm_event_log(log_data, vq.pcrs)
        checks.append("tpm-event-log")
    if policy.expected_events is not None:
        if log is None:
            raise TpmEventLogInvalid(
                "the policy expects this image's boot events, but the evidence carries no TPM "
                "event log (and none was given)"
            )
        # The SHA-256 bank: the one the vTPM quote binds (a SHA-384 digest in the log is not).
        boot = check_boot_events(log, policy.expected_events, cc=False, alg=HashAlg.SHA256)
        checks.append("expected-events")
    waived: list[Waiver] = []
    events = runtime_events if runtime_events is not None else evidence.runtime_events
    if policy.expected_events is not None or runtime_events is not None:
        why = (
            "nothing in Azure evidence binds the runtime event log (the guest has no RTMR3 of its "
            "own, and the runtime log is not extended into a vTPM PCR)"
            if events
            else "no runtime event log was given, so the boot-time config is not checked"
        )
        if not policy.allow_unbound_runtime_log:
            raise RuntimeLogUnbound(f"unbound: {why}; set allow_unbound_runtime_log to accept that")
        waived.append(Waiver("runtime-log", "unbound", f"{why} (allow_unbound_runtime_log)"))
    return VerifiedAzure(
        td=td,
        hcl=hcl,
        runtime=runtime,
        vtpm=attest,
        pcrs=tuple(vq.pcrs),
        checks=tuple(checks),
        event_log=log,
        boot=boot,
        waived=tuple(waived),
        pcrs_after_boot=tuple(sorted(after_boot.items())),
    )
