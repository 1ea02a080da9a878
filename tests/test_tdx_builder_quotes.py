"""Quotes from the independent test generator (tests/tdx_builder.py): dev roots, policy checks, v5."""

from __future__ import annotations

import pytest

from eemini.tdx.errors import (
    CertificateChainError,
    CollateralRequired,
    DebugTdRejected,
    MeasurementMismatch,
    ReportDataMismatch,
    ServiceTdRejected,
    TdAttributesRejected,
    UntrustedRoot,
)
from eemini.tdx.policy import Policy, PolicyBuilder
from eemini.tdx.quote import parse_quote
from eemini.tdx.roots import development_root
from eemini.tdx.verify import verify
from tdx_builder import NOW, DevChain, build_quote, make_chain

NO_COLLATERAL = Policy(require_collateral=False)


def test_dev_root_must_be_passed_explicitly() -> None:
    chain = make_chain()
    raw = build_quote(chain)
    with pytest.raises(
        UntrustedRoot, match=r"^PCK certificate chain ends at 'EasyEnclave Mini development root'"
    ):
        verify(raw, None, NO_COLLATERAL, NOW)
    v = verify(raw, None, NO_COLLATERAL, NOW, trusted_roots=[development_root(chain.root_pem)])
    assert v.tcb_status == "NotEvaluated"
    assert v.trust_anchor.production is False
    assert v.checks == (
        "pck-chain", "qe-report-signature", "qe-report-data", "quote-signature", "debug",
        "td-attributes", "mr-servicetd",
    )  # fmt: skip


def test_no_collateral_is_rejected_unless_the_policy_allows_it() -> None:
    chain = make_chain()
    roots = [development_root(chain.root_pem)]
    with pytest.raises(
        CollateralRequired, match=r"^no collateral given, so the TCB status cannot be evaluated$"
    ):
        verify(build_quote(chain), None, Policy(), NOW, trusted_roots=roots)


def test_debug_quote_rejected_by_default_and_accepted_when_allowed() -> None:
    chain = make_chain()
    roots = [development_root(chain.root_pem)]
    raw = build_quote(chain, td_attributes=bytes.fromhex("0100001000000000"))
    with pytest.raises(DebugTdRejected):
        verify(raw, None, Policy(), NOW, trusted_roots=roots)
    v = verify(raw, None, NO_COLLATERAL.replace(allow_debug=True), NOW, trusted_roots=roots)
    assert v.attributes.debug


def test_v5_mr_servicetd_option() -> None:
    chain = make_chain()
    roots = [development_root(chain.root_pem)]
    raw = build_quote(chain, version=5, mr_servicetd=b"\x01" * 48)
    q = parse_quote(raw)
    assert q.header.version == 5 and q.report.mr_servicetd == b"\x01" * 48
    with pytest.raises(ServiceTdRejected, match=r"^MR_SERVICETD is not zero"):
        verify(raw, None, NO_COLLATERAL, NOW, trusted_roots=roots)
    v = verify(
        raw, None, NO_COLLATERAL.replace(require_zero_mr_servicetd=False), NOW, trusted_roots=roots
    )
    assert v.attributes.mr_servicetd_zero is False


def test_reserved_td_attributes_option() -> None:
    chain = make_chain()
    roots = [development_root(chain.root_pem)]
    raw = build_quote(chain, td_attributes=bytes.fromhex("0001001000000000"))
    with pytest.raises(
        TdAttributesRejected, match=r"^reserved TD_ATTRIBUTES bits are set: 0x0000000000000100$"
    ):
        verify(raw, None, NO_COLLATERAL, NOW, trusted_roots=roots)
    lenient = NO_COLLATERAL.replace(reject_reserved_td_attributes=False)
    assert verify(raw, None, lenient, NOW, trusted_roots=roots).attributes.reserved_bits == 0x100


def test_report_data_and_measurements() -> None:
    chain = make_chain()
    roots = [development_root(chain.root_pem)]
    raw = build_quote(chain)
    base = PolicyBuilder().require_collateral(False)
    ok = base.report_data(bytes(range(64)).hex()).accepted_mr_td(["7d" * 48]).rtmr(2, "12" * 48).build()
    v = verify(raw, None, ok, NOW, trusted_roots=roots)
    assert "report-data" in v.checks and "mr-td" in v.checks and "rtmrs" in v.checks
    with pytest.raises(ReportDataMismatch, match=r"^report data is 000102"):
        verify(raw, None, base.report_data("00" * 64).build(), NOW, trusted_roots=roots)
    with pytest.raises(MeasurementMismatch, match=r"^MRTD 7d7d.* is not an accepted value$"):
        verify(raw, None, base.accepted_mr_td(["00" * 48]).build(), NOW, trusted_roots=roots)
    with pytest.raises(MeasurementMismatch, match=r"^RTMR3 is 1313.*, expected 0000"):
        verify(raw, None, base.rtmr(3, "00" * 48).build(), NOW, trusted_roots=roots)


def test_chain_signed_with_another_hash_goes_through_cryptography() -> None:
    # ECDSA-SHA384 certificates take cryptography's own X.509 path instead of the raw-TBS fast path.
    from cryptography.hazmat.primitives import hashes

    chain = make_chain(seed=3, digest=hashes.SHA384())
    roots = [development_root(chain.root_pem)]
    v = verify(build_quote(chain), None, NO_COLLATERAL, NOW, trusted_roots=roots)
    assert v.checks[0] == "pck-chain"
    other = make_chain(seed=4, digest=hashes.SHA384())
    mixed = DevChain(chain.root_key, other.root, chain.pck_key, chain.pck)  # PCK of 3, root of 4
    with pytest.raises(
        CertificateChainError,
        match=r"^PCK certificate chain: 'EasyEnclave Mini development PCK' is not signed by "
        r"'EasyEnclave Mini development root': InvalidSignature$",
    ):
        verify(
            build_quote(mixed),
            None,
            NO_COLLATERAL,
            NOW,
            trusted_roots=[development_root(other.root_pem)],
        )
