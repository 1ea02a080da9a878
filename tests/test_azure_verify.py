"""Azure vTPM evidence on real data: trustee's paired HCL report, TD quote and vTPM quote
(../shared/testdata/azure, collateral in ../shared/testdata/quotes) verify with nonce `challenge`;
each part changed or swapped is rejected by the check that binds it; azure-cvm-tooling's second HCL
report parses and its runtime data binds.

Mutation sweeps (the counts are asserted): every single-bit flip of the runtime data, the vTPM
message, its signature and the 24 PCR values; one bit per byte (rotating with the offset) of the TD
quote; every bit of the TD report's bound parts. The bytes no signature or hash covers (the HCL
header and IGVM request data, the TD report's type, CPUSVN, reserved fields and MAC) are swept too,
and the test says exactly what each does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azure_builder import AZURE_CHECKS, DCAP_CHECKS
from conftest import shared_testdata
from eemini.cli import main
from eemini.tdx.azure import hcl as hcl_mod
from eemini.tdx.azure.errors import AzureEvidenceError
from eemini.tdx.azure.evidence import AzureEvidence, VtpmQuote, parse_azure_evidence
from eemini.tdx.azure.hcl import parse_hcl_report, parse_runtime_data
from eemini.tdx.azure.tpm import parse_attest, rsassa_sha256_verify
from eemini.tdx.azure.verify import AzurePolicy, azure_policy, verify_azure
from eemini.tdx.collateral import Collateral, parse_collateral
from eemini.tdx.errors import PolicyError, QuoteError, VerificationError
from eemini.tdx.policy import Policy, PolicyBuilder
from eemini.tdx.verify import VerificationCache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

AT = 1763488129  # verify_at of the TD quote's collateral (../shared/testdata/quotes/expected.json)
NONCE = b"challenge"
PARAVISOR_MRTD = (
    "024a32b070383331181619fa387cb4d55d1e38879f989933055ccad5bc2db795d1737b66205949d15469dc8c1ba7ab7b"
)
RUNTIME_SHA256 = "9734504f161d104c74e3165c15f779b06a9bb40dfa71937817d7eee68e593839"
QUOTE_LEN = 4936  # the file holds 70 bytes of zero padding after the quote


def read_bincode_quote(data: bytes) -> VtpmQuote:
    """azure-cvm-tooling's `Quote` as Rust bincode 1 writes it: signature Vec<u8>, message Vec<u8>
    (u64 length prefixes), pcrs Vec<[u8; 32]> (u64 count, then 32 bytes each)."""
    at = 0

    def u64() -> int:
        nonlocal at
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8
        return int(n)

    def take(n: int) -> bytes:
        nonlocal at
        out = data[at : at + n]
        assert len(out) == n
        at += n
        return out

    signature = take(u64())
    message = take(u64())
    pcrs = tuple(take(32) for _ in range(u64()))
    assert at == len(data)
    return VtpmQuote(message=message, signature=signature, pcrs=pcrs)


@dataclasses.dataclass(frozen=True)
class Real:
    evidence: AzureEvidence
    collateral: Collateral
    policy: AzurePolicy
    cache: VerificationCache
    dir: Path
    quotes: Path


@functools.cache
def _real() -> Real:
    d = shared_testdata("azure")
    q = shared_testdata("quotes")
    evidence = parse_azure_evidence((d / "trustee__az-tdx-vtpm_evidence-v1.json").read_bytes())
    collateral = parse_collateral((q / "trustee__az-tdx-vtpm_td-quote.collateral.json").read_text())
    builder = PolicyBuilder().report_data(bytes(64)).accepted_tcb_statuses(["UpToDate", "OutOfDate"])
    policy = azure_policy(builder.build(), nonce=NONCE)
    cache = VerificationCache()
    verify_azure(evidence, collateral, policy, AT, cache=cache)
    return Real(evidence, collateral, policy, cache, d, q)


def outcome(real: Real, evidence: AzureEvidence, policy: AzurePolicy | None = None) -> str:
    """The check that rejected `evidence`, "parse: <class>" for input that does not parse, or
    "verified"."""
    try:
        verify_azure(evidence, real.collateral, policy or real.policy, AT, cache=real.cache)
    except VerificationError as e:
        return e.check
    except QuoteError as e:
        return f"parse: {type(e).__name__}"
    return "verified"


# --- the real evidence verifies -------------------------------------------------------------------


def test_trustee_evidence_verifies_with_nonce_challenge() -> None:
    real = _real()
    v = verify_azure(real.evidence, real.collateral, real.policy, AT)
    assert list(v.checks) == DCAP_CHECKS + AZURE_CHECKS
    assert v.waived == ()
    assert v.td.tcb_status == "OutOfDate"
    assert v.td.advisory_ids == ("INTEL-SA-00960", "INTEL-SA-00982", "INTEL-SA-00986")
    assert v.td.report.mr_td.hex() == PARAVISOR_MRTD
    assert v.td.report.report_data.hex() == RUNTIME_SHA256 + "00" * 32
    assert hashlib.sha256(v.hcl.runtime_data).hexdigest() == RUNTIME_SHA256
    assert v.nonce == b"challenge"
    assert v.user_data == bytes(64)
    assert (v.runtime.ak.bits, v.runtime.ak.e) == (2048, 65537)
    assert v.runtime.vm_configuration["vmUniqueId"] == "6332533D-5649-4D02-8AA7-8F64B7C3EE21"
    assert v.pcrs[17] == b"\xff" * 32 and v.pcrs[23] == bytes(32)
    assert v.pcrs[0].hex() == "782b20b10f55cc46e2142cc2145d548698073e5beb82752c8d7f9279f0d8a273"
    assert v.event_log is None and v.boot is None


def test_the_binary_files_are_the_same_evidence() -> None:
    real = _real()
    d = real.dir
    from_bins = AzureEvidence(
        td_quote=(d / "trustee__az-tdx-vtpm_td-quote.bin").read_bytes(),
        hcl_report=(d / "trustee__az-tdx-vtpm_hcl-report.bin").read_bytes(),
        vtpm_quote=read_bincode_quote((d / "trustee__az-tdx-vtpm_quote.bin").read_bytes()),
        layout="trustee",
    )
    assert from_bins == real.evidence
    tpm_json = json.loads((d / "trustee__az-tdx-vtpm_tpm-quote-v1.json").read_text())
    assert bytes.fromhex(tpm_json["message"]) == real.evidence.vtpm_quote.message
    assert from_bins.td_quote == (real.quotes / "trustee__az-tdx-vtpm_td-quote.bin").read_bytes()


def test_the_default_tcb_policy_rejects_the_azure_platform_as_out_of_date() -> None:
    real = _real()
    policy = azure_policy(Policy(report_data=bytes(64)), nonce=NONCE)
    with pytest.raises(VerificationError) as e:
        verify_azure(real.evidence, real.collateral, policy, AT)
    assert e.value.check == "tcb-status"
    assert e.value.message == (
        "TCB status is OutOfDate (advisories: INTEL-SA-00960, INTEL-SA-00982, INTEL-SA-00986); "
        "accepted: UpToDate; the platform matches the TCB level of 2023-08-09T00:00:00Z, the latest "
        "is of 2024-03-13T00:00:00Z; below the latest: SGX component 0 (BIOS, Early Microcode "
        "Update) SVN 6 < 7; SGX component 1 (OS/VMM, SGX Late Microcode Update) SVN 6 < 7; TDX "
        "component 2 (OS/VMM, TDX Late Microcode Update) SVN 6 < 7; TDX module TDX_01 SVN 2 < 4 (of "
        "2024-03-13T00:00:00Z)"
    )


def test_the_paravisor_policy_relaxes_only_sept_ve_disable() -> None:
    real = _real()
    policy = dataclasses.replace(real.policy, td=real.policy.td.replace(require_sept_ve_disable=True))
    assert outcome(real, real.evidence, policy) == "td-attributes"
    assert real.policy.td.require_sept_ve_disable is False
    assert real.policy.td.allow_debug is False
    assert real.policy.td.reject_reserved_td_attributes is True
    assert real.policy.td.accepted_mr_td == frozenset({bytes.fromhex(PARAVISOR_MRTD)})
    assert real.policy.td.report_data is None  # checked as runtime-data instead


def test_an_explicit_sept_ve_requirement_is_kept() -> None:
    built = PolicyBuilder().require_sept_ve_disable(True).build()
    assert azure_policy(built, relax_sept_ve_disable=False).td.require_sept_ve_disable is True
    assert azure_policy(built).td.require_sept_ve_disable is False


def test_another_paravisor_mrtd_is_rejected_unless_listed() -> None:
    real = _real()
    other = PolicyBuilder().accepted_mr_td(["11" * 48]).report_data(bytes(64))
    other = other.accepted_tcb_statuses(["UpToDate", "OutOfDate"])
    policy = azure_policy(other.build(), nonce=NONCE)
    with pytest.raises(VerificationError) as e:
        verify_azure(real.evidence, real.collateral, policy, AT)
    assert (e.value.check, e.value.message) == (
        "measurements",
        f"MRTD {PARAVISOR_MRTD} is not an accepted value",
    )


def test_any_firmware_cannot_be_waived_for_azure() -> None:
    with pytest.raises(PolicyError, match="allow_any_firmware cannot apply to Azure evidence"):
        azure_policy(Policy(allow_any_firmware=True))


@pytest.mark.parametrize(
    ("change", "check", "message"),
    [
        (
            {"report_data": b"\x01" + bytes(63)},
            "user-data",
            f"the runtime data's user-data is {'00' * 64}, expected 01{'00' * 63}",
        ),
        (
            {"nonce": b"challengf"},
            "vtpm-nonce",
            "the vTPM quote's extraData is 6368616c6c656e6765, expected 6368616c6c656e6766",
        ),
    ],
)
def test_wrong_caller_data_is_rejected(change: dict[str, Any], check: str, message: str) -> None:
    real = _real()
    with pytest.raises(VerificationError) as e:
        verify_azure(real.evidence, real.collateral, dataclasses.replace(real.policy, **change), AT)
    assert (e.value.check, e.value.message) == (check, message)


def test_the_nonce_defaults_to_the_report_data() -> None:
    real = _real()
    policy = azure_policy(real.policy.td.replace(report_data=bytes(64)))
    assert policy.nonce == bytes(64)
    assert outcome(real, real.evidence, policy) == "vtpm-nonce"


# --- swaps ----------------------------------------------------------------------------------------


def test_a_gcp_td_quote_swapped_in_is_not_the_paravisor() -> None:
    real = _real()
    gcp = (real.quotes / "go-tdx-guest__cos-113-tdx-quote.bin").read_bytes()
    swapped = dataclasses.replace(real.evidence, td_quote=gcp)
    assert outcome(real, swapped) == "measurements"
    # Even when a careless policy accepts that TD's MRTD, its report is not the HCL report's.
    pinned = dataclasses.replace(
        real.policy,
        td=real.policy.td.replace(accepted_mr_td=frozenset({gcp[48 + 136 : 48 + 184]})),
    )
    assert outcome(real, swapped, pinned) == "hcl-td-report"


def test_another_hcl_report_swapped_in_is_rejected() -> None:
    real = _real()
    other = (real.dir / "azure-cvm-tooling__hcl-report-tdx.bin").read_bytes()
    assert outcome(real, dataclasses.replace(real.evidence, hcl_report=other)) == "hcl-td-report"


def test_another_vtpm_quote_swapped_in_is_rejected() -> None:
    real = _real()
    other = read_bincode_quote((real.dir / "azure-cvm-tooling__quote.bin").read_bytes())
    ev = real.evidence
    assert outcome(real, dataclasses.replace(ev, vtpm_quote=other)) == "vtpm-quote-signature"
    mixed = dataclasses.replace(ev.vtpm_quote, pcrs=other.pcrs)
    assert outcome(real, dataclasses.replace(ev, vtpm_quote=mixed)) == "vtpm-pcrs"


def test_the_second_hcl_report_parses_and_its_runtime_data_binds() -> None:
    d = _real().dir
    report = parse_hcl_report((d / "azure-cvm-tooling__hcl-report-tdx.bin").read_bytes())
    assert (report.version, report.report_size, report.request_type, report.status) == (2, 2438, 2, 0)
    assert (report.report_type, report.hash_type, len(report.runtime_data)) == (4, 1, 1202)
    digest = hashlib.sha256(report.runtime_data).digest()
    assert digest.hex().startswith("e8f07961")
    assert report.td_report.report_data == digest + bytes(32)
    assert hashlib.sha384(report.td_report.td_info).digest() == report.td_report.tee_info_hash
    runtime = parse_runtime_data(report.runtime_data)
    assert runtime.user_data == bytes(64)
    assert runtime.ak.bits == 2048
    assert runtime.vm_configuration["vmUniqueId"] == "D270E56B-F668-4990-A5BC-9B624576841D"


def test_the_second_vtpm_quote_verifies_under_its_published_key() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    d = _real().dir
    quote = read_bincode_quote((d / "azure-cvm-tooling__quote.bin").read_bytes())
    key = load_pem_public_key((d / "azure-cvm-tooling__akpub.pem").read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    numbers = key.public_numbers()
    ak = hcl_mod.RsaKey(n=numbers.n, e=numbers.e)
    assert rsassa_sha256_verify(ak, quote.signature, quote.message)
    assert not rsassa_sha256_verify(ak, quote.signature[::-1], quote.message)
    assert parse_attest(quote.message).extra_data == b"challenge"


# --- mutation sweeps ------------------------------------------------------------------------------


def _flip(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def _sweep(
    real: Real,
    offsets: range,
    build: Callable[[int, int], AzureEvidence],
    *,
    every_bit: bool,
) -> Counter[str]:
    results: Counter[str] = Counter()
    for offset in offsets:
        for bit in range(8) if every_bit else (offset % 8,):
            results[outcome(real, build(offset, bit))] += 1
    return results


def _hcl(real: Real) -> Callable[[int, int], AzureEvidence]:
    return lambda o, b: dataclasses.replace(
        real.evidence, hcl_report=_flip(real.evidence.hcl_report, o, b)
    )


def test_every_bit_of_the_runtime_data_is_bound() -> None:
    real = _real()
    start = hcl_mod.RUNTIME_DATA_OFFSET
    got = _sweep(real, range(start, start + 1201), _hcl(real), every_bit=True)
    assert got == Counter({"runtime-data": 1201 * 8})


def test_every_bit_of_the_td_reports_bound_parts_is_checked() -> None:
    real = _real()
    base = hcl_mod.TD_REPORT_OFFSET
    regions = [
        range(base + 32, base + 192),  # TEE_TCB_INFO hash, TDINFO hash, REPORTDATA
        range(base + 256, base + 256 + 239),  # TEE_TCB_INFO
        range(base + 512, base + 1024),  # TDINFO
    ]
    got: Counter[str] = Counter()
    for r in regions:
        got += _sweep(real, r, _hcl(real), every_bit=True)
    assert got == Counter({"hcl-td-report": (160 + 239 + 512) * 8})


def test_the_bytes_nobody_signs_do_not_change_the_verdict() -> None:
    """The HCL header and IGVM request data, and the TD report's type, CPUSVN, reserved bytes and
    MAC: no signature or hash covers them, so the verdict does not rest on them. A changed HCL
    signature, report type or hash type is refused as not parsing; a changed runtime-data size
    selects other bytes (which no longer bind) or runs past the report; the rest verifies as before."""
    real = _real()
    b = hcl_mod.TD_REPORT_OFFSET
    i = hcl_mod.IGVM_OFFSET
    fields = {
        "HCL signature": range(0, 4),
        "HCL version, report size, request type, status, reserved": range(4, 32),
        "TD report type": range(b, b + 1),
        "TD report type's other bytes, reserved, CPUSVN": range(b + 1, b + 32),
        "TD report reserved, MAC": range(b + 192, b + 256),
        "reserved after TEE_TCB_INFO": range(b + 495, b + 512),
        "rest of the hardware report slot": range(b + 1024, i),
        "IGVM data size, version": range(i, i + 8),
        "IGVM report type, hash type": range(i + 8, i + 16),
        "IGVM runtime-data size": range(i + 16, i + 20),
    }
    got = {name: _sweep(real, r, _hcl(real), every_bit=True) for name, r in fields.items()}
    bad = "parse: AzureEvidenceError"
    assert got == {
        "HCL signature": Counter({bad: 32}),
        "HCL version, report size, request type, status, reserved": Counter({"verified": 28 * 8}),
        "TD report type": Counter({bad: 8}),
        "TD report type's other bytes, reserved, CPUSVN": Counter({"verified": 31 * 8}),
        "TD report reserved, MAC": Counter({"verified": 64 * 8}),
        "reserved after TEE_TCB_INFO": Counter({"verified": 17 * 8}),
        "rest of the hardware report slot": Counter({"verified": 160 * 8}),
        "IGVM data size, version": Counter({"verified": 64}),
        "IGVM report type, hash type": Counter({bad: 64}),
        # 1201 = 0x4b1: clearing a bit, or setting one of the low 6 below 0x40, keeps it inside the
        # 2600-byte report (9 of 32 bits); larger sizes run past the end.
        "IGVM runtime-data size": Counter({"runtime-data": 9, bad: 23}),
    }


def test_every_bit_of_the_vtpm_quote_is_bound() -> None:
    real = _real()
    vq = real.evidence.vtpm_quote

    def with_quote(**parts: Any) -> AzureEvidence:
        return dataclasses.replace(real.evidence, vtpm_quote=dataclasses.replace(vq, **parts))

    message = _sweep(
        real, range(len(vq.message)),
        lambda o, b: with_quote(message=_flip(vq.message, o, b)), every_bit=True,
    )  # fmt: skip
    signature = _sweep(
        real, range(len(vq.signature)),
        lambda o, b: with_quote(signature=_flip(vq.signature, o, b)), every_bit=True,
    )  # fmt: skip
    flat = b"".join(vq.pcrs)

    def pcrs(o: int, b: int) -> AzureEvidence:
        f = _flip(flat, o, b)
        return with_quote(pcrs=tuple(f[i : i + 32] for i in range(0, len(f), 32)))

    pcr = _sweep(real, range(len(flat)), pcrs, every_bit=True)
    assert message == Counter({"vtpm-quote-signature": 122 * 8})
    assert signature == Counter({"vtpm-quote-signature": 256 * 8})
    assert pcr == Counter({"vtpm-pcrs": 24 * 32 * 8})


def test_every_byte_of_the_td_quote_is_bound() -> None:
    """One bit per byte of the TD quote (the bit rotating with the offset): every change is
    rejected by the DCAP check that covers it, or refused as not parsing."""
    real = _real()
    quote = real.evidence.td_quote[:QUOTE_LEN]
    regions = {
        "header": (0, 48),
        "TD report": (48, 632),
        "signature data size": (632, 636),
        "signature": (636, 700),
        "attestation key": (700, 764),
        "certification data": (764, QUOTE_LEN),
    }
    got = {
        name: _sweep(
            real,
            range(lo, hi),
            lambda o, b: dataclasses.replace(real.evidence, td_quote=_flip(quote, o, b)),
            every_bit=False,
        )
        for name, (lo, hi) in regions.items()
    }
    bad = "parse: QuoteParseError"
    assert got == {
        # version, key type and TEE type (one bit each of their 8 bytes) do not parse
        "header": Counter({bad: 8, "quote-signature": 40}),
        "TD report": Counter({"quote-signature": 584}),
        "signature data size": Counter({bad: 4}),
        "signature": Counter({"quote-signature": 64}),
        "attestation key": Counter({"qe-report-data": 64}),
        "certification data": Counter(
            {
                "qe-report-signature": 448,
                "qe-report-data": 32,
                "certificates": 2111,
                "certificate-chain": 1278,
                "trusted-root": 289,
                bad: 14,
            }
        ),
    }


# --- evidence that does not parse ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "evidence is not a JSON object"),
        ("{", "evidence is not JSON: Expecting property name enclosed in double quotes"),
        ('{"ok": false, "error": "x"}', "evidence is a failed attest answer: 'x'"),
        (
            '{"attestation_type": "tdx"}',
            "evidence is an attest answer of type 'tdx', not 'azure-tdx-vtpm'",
        ),
        ('{"a": 1, "a": 2}', "evidence: key 'a' appears twice in one object"),
        ('{"attestation_type": "azure-tdx-vtpm"}', "vtpm_quote is missing or not an object"),
        (
            '{"tpm_quote": {"signature": "zz", "message": "", "pcrs": []}, "hcl_report": "AA", '
            '"td_quote": "AA"}',
            "tpm_quote.signature is not hex",
        ),
    ],
)
def test_malformed_evidence_is_named(text: str, message: str) -> None:
    with pytest.raises(AzureEvidenceError) as e:
        parse_azure_evidence(text)
    assert str(e.value).startswith(message)


# --- the command ------------------------------------------------------------------------------------


def test_eemini_verify_azure_on_the_trustee_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _real()
    policy = tmp_path / "policy.json"
    policy.write_text('{"accepted_tcb_statuses": ["UpToDate", "OutOfDate"]}')
    argv = [
        "verify", "--azure", str(real.dir / "trustee__az-tdx-vtpm_evidence-v1.json"),
        "--collateral", str(real.quotes / "trustee__az-tdx-vtpm_td-quote.collateral.json"),
        "--at", str(AT), "--report-data", "00", "--nonce", b"challenge".hex(),
        "--policy", str(policy), "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checks"] == DCAP_CHECKS + AZURE_CHECKS
    assert out["paravisor"]["mr_td"] == PARAVISOR_MRTD
    assert out["vtpm_quote"]["nonce_text"] == "challenge"
    assert out["runtime_data"]["sha256"] == RUNTIME_SHA256
    assert out["td_quote"]["tcb_status"] == "OutOfDate"
    # The wrong nonce: exit 1 and the check's name.
    argv[argv.index("--nonce") + 1] = b"other".hex()
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        "verified": False,
        "check": "vtpm-nonce",
        "error": "the vTPM quote's extraData is 6368616c6c656e6765, expected 6f74686572",
    }
    assert captured.err == (
        "eemini verify: rejected: vtpm-nonce: the vTPM quote's extraData is 6368616c6c656e6765, "
        "expected 6f74686572\n"
    )


def test_azure_evidence_without_the_flag_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    real = _real()
    assert main(["verify", str(real.dir / "trustee__az-tdx-vtpm_evidence-v1.json")]) == 2
    err = capsys.readouterr().err
    assert "is Azure vTPM evidence, not a TDX quote" in err
    assert 'verify it with --azure (docs/verify.md, "Azure evidence")' in err
