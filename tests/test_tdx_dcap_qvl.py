"""Differential tests against dcap-qvl 0.7.0 on real third-party quotes (../shared/testdata/quotes).

expected.json records what dcap-qvl reported for each file at its `verify_at` instant; the parsed
fields are also compared with the dcap-qvl Python bindings live, byte for byte.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509

from conftest import shared_testdata
from eemini.tdx.collateral import TcbStatus, parse_collateral
from eemini.tdx.errors import (
    CollateralExpired,
    DebugTdRejected,
    ServiceTdRejected,
    TcbLevelNotFound,
    TdAttributesRejected,
    UntrustedRoot,
)
from eemini.tdx.pck import load_pem_chain, parse_pck_extension
from eemini.tdx.policy import Policy, PolicyBuilder
from eemini.tdx.quote import parse_quote
from eemini.tdx.verify import VerificationCache, verify

ALL_STATUSES = [s.value for s in TcbStatus if s != TcbStatus.REVOKED]


def _corpus() -> tuple[Path, list[dict[str, Any]]]:
    d = shared_testdata("quotes")
    entries: list[dict[str, Any]] = json.loads((d / "expected.json").read_text())
    return d, entries


def _entries(pred: Any = None) -> list[Any]:
    try:
        d = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "quotes"
        entries = json.loads((d / "expected.json").read_text())
    except OSError:
        return [pytest.param(None, id="no-testdata")]
    return [pytest.param(e["file"], id=e["file"]) for e in entries if pred is None or pred(e)]


def _load(name: str | None) -> tuple[Path, dict[str, Any]]:
    d, entries = _corpus()
    assert name is not None
    return d, next(e for e in entries if e["file"] == name)


@pytest.mark.parametrize("name", _entries())
def test_parsed_fields_equal_dcap_qvl(name: str | None) -> None:
    d, e = _load(name)
    raw = (d / e["file"]).read_bytes()
    q = parse_quote(raw)
    theirs = dcap_qvl.parse_quote(raw)
    h = theirs.header
    assert (q.header.version, q.header.attestation_key_type, q.header.tee_type) == (
        h.version,
        h.attestation_key_type,
        h.tee_type,
    )
    assert (q.header.qe_svn, q.header.pce_svn, q.header.qe_vendor_id, q.header.user_data) == (
        h.qe_svn,
        h.pce_svn,
        h.qe_vendor_id,
        h.user_data,
    )
    r = theirs.report
    names = {"rtmr0": "rt_mr0", "rtmr1": "rt_mr1", "rtmr2": "rt_mr2", "rtmr3": "rt_mr3"}
    names["mr_servicetd"] = "mr_service_td"
    fields = [
        "tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes", "xfam",
        "mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "rtmr0", "rtmr1", "rtmr2", "rtmr3",
        "report_data",
    ]  # fmt: skip
    if q.report.is_tdx15:
        fields += ["tee_tcb_svn2", "mr_servicetd"]
    assert type(r).__name__ == ("PyTdReport15" if q.report.is_tdx15 else "PyTdReport10")
    for f in fields:
        assert getattr(q.report, f) == getattr(r, names.get(f, f)), f
        # ... and the recorded run agrees too (hex in expected.json).
        assert getattr(q.report, f).hex() == e[names.get(f, f) if f == "mr_servicetd" else f], f
    assert q.report.td_attributes.hex() == e["td_attributes"]
    assert (q.header.version, q.header.tee_type, q.header.qe_vendor_id.hex()) == (
        e["version"],
        e["tee_type"],
        e["qe_vendor_id"],
    )
    ext = parse_pck_extension(load_pem_chain(q.signature_data.certification.pck_chain_pem, "PCK")[0])
    theirs_ext = theirs.pck_extension()
    assert ext.fmspc.hex().upper() == theirs.fmspc() == e["fmspc"]
    assert (ext.ppid, ext.cpu_svn, ext.pce_svn, ext.pce_id, ext.sgx_type) == (
        theirs_ext.ppid,
        theirs_ext.cpu_svn,
        theirs_ext.pce_svn,
        theirs_ext.pce_id,
        theirs_ext.sgx_type,
    )
    assert ext.platform_instance_id == theirs_ext.platform_instance_id
    assert q.signature_data.certification.pck_chain_pem.rstrip(
        b"\0"
    ) == theirs.cert_chain_pem_bytes().rstrip(b"\0")


def _verify_lenient(d: Path, e: dict[str, Any], policy: Policy) -> Any:
    raw = (d / e["file"]).read_bytes()
    collateral = parse_collateral((d / e["collateral_file"]).read_text())
    return verify(raw, collateral, policy, e["verify_at"])


@pytest.mark.parametrize("name", _entries(lambda e: e.get("status")))
def test_tcb_status_and_advisories_equal_dcap_qvl(name: str | None) -> None:
    d, e = _load(name)
    policy = PolicyBuilder().accepted_tcb_statuses(ALL_STATUSES).build()
    v = _verify_lenient(d, e, policy)
    assert v.tcb_status == e["status"]
    assert list(v.advisory_ids) == e["advisory_ids"]
    assert v.tcb is not None
    assert v.tcb.platform.status.value == e["platform_status"]["status"]
    assert list(v.tcb.platform.advisory_ids) == e["platform_status"]["advisory_ids"]
    assert v.tcb.qe.status.value == e["qe_status"]["status"]
    assert list(v.tcb.qe.advisory_ids) == e["qe_status"]["advisory_ids"]
    # The default policy accepts exactly UpToDate.
    if e["status"] == "UpToDate":
        assert _verify_lenient(d, e, Policy()).tcb_status == "UpToDate"


@pytest.mark.parametrize(
    "name", _entries(lambda e: (e.get("verify_error") or "").endswith("No matching TCB level found"))
)
def test_rejected_where_dcap_qvl_finds_no_tcb_level(name: str | None) -> None:
    d, e = _load(name)
    policy = PolicyBuilder().accepted_tcb_statuses(ALL_STATUSES).build()
    with pytest.raises(TcbLevelNotFound, match=r"^no TCB level of FMSPC " + e["fmspc"] + " matches"):
        _verify_lenient(d, e, policy)


def test_live_dcap_qvl_agrees_with_recorded_results() -> None:
    d, entries = _corpus()
    for e in entries:
        if not e.get("collateral_file"):
            continue
        raw = (d / e["file"]).read_bytes()
        col = dcap_qvl.QuoteCollateralV3.from_json((d / e["collateral_file"]).read_text())
        if e.get("status"):
            assert dcap_qvl.verify(raw, col, e["verify_at"]).status == e["status"]
        else:
            with pytest.raises(
                ValueError, match=e["verify_error"].removeprefix("Verification failed: ")
            ):
                dcap_qvl.verify(raw, col, e["verify_at"])


def test_debug_quote_rejected_by_default_policy() -> None:
    d, e = _load("trustee__tdx_quote_4_debug.bin")
    assert e["verify_error"] == "Verification failed: Debug mode is enabled"
    with pytest.raises(
        DebugTdRejected, match=r"^the TD is a debug TD \(TD_ATTRIBUTES 0100001000000000\)"
    ):
        _verify_lenient(d, e, Policy())
    # Allowing debug (and its OutOfDate TCB) makes it verify: the debug check is the only policy failure.
    policy = PolicyBuilder().allow_debug().accepted_tcb_statuses(["OutOfDate"]).build()
    v = _verify_lenient(d, e, policy)
    assert v.attributes.debug is True
    assert v.tcb_status == "OutOfDate"


@pytest.mark.parametrize(
    "name", ["go-tdx-guest__quote_v5_sample_preproduction.bin", "trustee__tdx_quote_4_preproduction.bin"]
)
def test_preproduction_quotes_rejected_for_their_root(name: str) -> None:
    d, _ = _load(name)
    raw = (d / name).read_bytes()
    with pytest.raises(
        UntrustedRoot,
        match=r"^PCK certificate chain ends at 'Intel SGX Root CA' \(SHA-256 e3f49e858865d54dde1d2f77"
        r"8817a355c470133165ddce1e488bec66f8f9ecf3\), which is not a trusted root$",
    ):
        verify(raw, None, Policy(), 1_700_000_000)


def test_sept_ve_disable_is_an_option_reported_either_way() -> None:
    d, e = _load("trustee__az-tdx-vtpm_td-quote.bin")
    assert e["verify_error"] == "Verification failed: SEPT_VE_DISABLE is not enabled"
    accept = PolicyBuilder().accepted_tcb_statuses(ALL_STATUSES)
    with pytest.raises(TdAttributesRejected, match=r"^SEPT_VE_DISABLE is not set in TD_ATTRIBUTES$"):
        _verify_lenient(d, e, accept.build())
    v = _verify_lenient(d, e, accept.require_sept_ve_disable(False).build())
    assert v.attributes.sept_ve_disable is False
    assert v.tcb_status == "OutOfDate"


def test_cache_gives_the_same_results() -> None:
    d, entries = _corpus()
    cache = VerificationCache()
    policy = PolicyBuilder().accepted_tcb_statuses(ALL_STATUSES).build()
    for _ in range(2):
        for e in entries:
            if not e.get("status"):
                continue
            raw = (d / e["file"]).read_bytes()
            col = parse_collateral((d / e["collateral_file"]).read_text())
            v = verify(raw, col, policy, e["verify_at"], cache=cache)
            assert v.tcb_status == e["status"]
    assert cache.tcb_infos and cache.links


def test_mr_servicetd_option_on_a_real_v5_quote() -> None:
    # trustee__tdx_quote_5 carries a non-zero MR_SERVICETD (dcap-qvl stops earlier, at its TCB level).
    d, e = _load("trustee__tdx_quote_5.bin")
    raw = (d / e["file"]).read_bytes()
    lenient = Policy(require_collateral=False)
    with pytest.raises(ServiceTdRejected, match=r"^MR_SERVICETD is not zero"):
        verify(raw, None, lenient, e["verify_at"])
    v = verify(raw, None, lenient.replace(require_zero_mr_servicetd=False), e["verify_at"])
    assert v.attributes.mr_servicetd_zero is False
    assert v.tcb_status == "NotEvaluated"


def test_collateral_written_by_dcap_qvl_is_read_as_is() -> None:
    d, e = _load("dcap-qvl__tdx_quote.bin")
    text = (d / e["collateral_file"]).read_text()
    rewritten = dcap_qvl.QuoteCollateralV3.from_json(text).to_json()
    assert parse_collateral(rewritten) == parse_collateral(text)
    v = verify((d / e["file"]).read_bytes(), parse_collateral(rewritten), Policy(), e["verify_at"])
    assert v.tcb_status == "UpToDate"


# nextUpdate, to the second, as dcap-qvl 0.7.0 draws it: a CRL is expired from its nextUpdate on
# (webpki's CrlExpired when now >= nextUpdate), TCB info and QE identity only after it (dcap-qvl
# rejects `now > nextUpdate`). Each case is the collateral part that expires first in its set.
NEXT_UPDATE_CASES = [
    ("dcap-qvl__tdx_quote.bin", "PCK CRL", 1752919235, 1752919235, "CrlExpired",
     r"^PCK CRL is valid from 2025-06-19T10:00:35\+00:00 until its nextUpdate "
     r"2025-07-19T10:00:35\+00:00 \(exclusive\), not at 2025-07-19T10:00:35\+00:00$"),
    ("go-tdx-guest__cos-113-tdx-quote.bin", "TCB info", 1763488130, 1763488131, "TCBInfo expired",
     r"^TCB info is valid from 2025-10-19T17:48:50\+00:00 to 2025-11-18T17:48:50\+00:00, "
     r"not at 2025-11-18T17:48:51\+00:00$"),
    ("go-tdx-guest__tdx_prod_quote_SPR_E4.bin", "QE identity", 1688801099, 1688801100,
     "QE Identity expired",
     r"^QE identity is valid from 2023-06-08T07:24:59\+00:00 to 2023-07-08T07:24:59\+00:00, "
     r"not at 2023-07-08T07:25:00\+00:00$"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "part", "next_update", "expired_at", "theirs", "ours"),
    NEXT_UPDATE_CASES,
    ids=[c[1] for c in NEXT_UPDATE_CASES],
)
def test_next_update_boundary_equals_dcap_qvl(
    name: str, part: str, next_update: int, expired_at: int, theirs: str, ours: str
) -> None:
    d, e = _load(name)
    raw = (d / name).read_bytes()
    text = (d / e["collateral_file"]).read_text()
    parsed = json.loads(text)
    if part == "PCK CRL":
        nxt = x509.load_der_x509_crl(bytes.fromhex(parsed["pck_crl"])).next_update_utc
        assert nxt is not None and nxt.timestamp() == next_update
    else:
        key = "tcb_info" if part == "TCB info" else "qe_identity"
        nxt = datetime.datetime.fromisoformat(json.loads(parsed[key])["nextUpdate"])
        assert nxt.timestamp() == next_update
    policy = PolicyBuilder().accepted_tcb_statuses(ALL_STATUSES).build()
    # One second before: current for both (the SPR_E4 quote then fails on its TCB level).
    theirs_before: str | None = None
    try:
        dcap_qvl.verify(raw, dcap_qvl.QuoteCollateralV3.from_json(text), expired_at - 1)
    except ValueError as err:
        theirs_before = str(err)
    try:
        verify(raw, parse_collateral(text), policy, expired_at - 1)
    except TcbLevelNotFound:
        assert theirs_before == "Verification failed: No matching TCB level found"
    else:
        assert theirs_before is None
    # At the second: expired for both.
    with pytest.raises(ValueError, match=theirs):
        dcap_qvl.verify(raw, dcap_qvl.QuoteCollateralV3.from_json(text), expired_at)
    with pytest.raises(CollateralExpired, match=ours):
        verify(raw, parse_collateral(text), policy, expired_at)
