"""Collateral checks on a complete development PKI built by tests/tdx_builder.py (root -> PCK CA ->
PCK, a TCB signing cert, CRLs, TCB info and QE identity signed like Intel's): revocation, TCB level
matching, TDX module identities, QE identity, and the convergence rules."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from eemini.tdx import errors
from eemini.tdx.collateral import TcbStatus, parse_collateral
from eemini.tdx.pck import split_der
from eemini.tdx.policy import PolicyBuilder
from eemini.tdx.roots import development_root
from eemini.tdx.tcb import converge
from eemini.tdx.verify import VerifiedQuote, verify
from tdx_builder import (
    NOW,
    TCB_SIGNING_KEY,
    build_quote,
    der_tlv,
    make_chain,
    make_collateral,
    raw_sign,
    tcb_level,
)

ANY = (
    PolicyBuilder().accepted_tcb_statuses([s.value for s in TcbStatus if s != TcbStatus.REVOKED]).build()
)
CHAIN = make_chain(intermediate=True)
ROOTS = [development_root(CHAIN.root_pem)]


def _verify(collateral: str, quote: bytes | None = None) -> VerifiedQuote:
    raw = quote if quote is not None else build_quote(CHAIN)
    return verify(raw, parse_collateral(collateral), ANY, NOW, trusted_roots=ROOTS)


def test_up_to_date() -> None:
    v = _verify(make_collateral(CHAIN))
    assert (v.tcb_status, v.advisory_ids) == ("UpToDate", ())
    assert v.tcb is not None and v.tcb.tdx_module is None


def test_lower_level_out_of_date_with_advisories() -> None:
    quote = build_quote(CHAIN, tee_tcb_svn=bytes.fromhex("02000300000000000000000000000000"))
    v = _verify(make_collateral(CHAIN), quote)
    assert (v.tcb_status, v.advisory_ids) == ("OutOfDate", ("INTEL-SA-00837",))


def test_no_matching_level() -> None:
    quote = build_quote(CHAIN, tee_tcb_svn=bytes.fromhex("01000100000000000000000000000000"))
    with pytest.raises(errors.TcbLevelNotFound, match=r"^no TCB level of FMSPC 00906ED50000 matches"):
        _verify(make_collateral(CHAIN), quote)


def test_pce_svn_and_sgx_components_gate_the_level() -> None:
    low_pce = make_chain(intermediate=True, pce_svn=10)
    roots = [development_root(low_pce.root_pem)]
    with pytest.raises(errors.TcbLevelNotFound):
        verify(
            build_quote(low_pce),
            parse_collateral(make_collateral(low_pce)),
            ANY,
            NOW,
            trusted_roots=roots,
        )
    levels = (tcb_level(2, 11, (3, 0, 4), "UpToDate"), tcb_level(1, 11, (3, 0, 4), "SWHardeningNeeded"))
    v = _verify(make_collateral(CHAIN, levels=levels))
    assert v.tcb_status == "SWHardeningNeeded"


def test_tdx_module_identity_skips_svn_bytes_0_and_1_and_converges() -> None:
    # TEE_TCB_SVN[1] = 1 (module major version 1): bytes 0 and 1 are judged by identity TDX_01.
    quote = build_quote(CHAIN, tee_tcb_svn=bytes.fromhex("02010400000000000000000000000000"))
    identity: dict[str, object] = {
        "id": "TDX_01", "mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8,
        "tcbLevels": [
            {"tcb": {"isvsvn": 4}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 2}, "tcbDate": "2023-08-09T00:00:00Z", "tcbStatus": "OutOfDate",
             "advisoryIDs": ["INTEL-SA-01000"]},
        ],
    }  # fmt: skip
    v = _verify(make_collateral(CHAIN, module_identities=[identity]), quote)
    assert v.tcb is not None and v.tcb.platform.status == TcbStatus.UP_TO_DATE
    assert v.tcb.tdx_module is not None and v.tcb.tdx_module.status == TcbStatus.OUT_OF_DATE
    assert (v.tcb_status, v.advisory_ids) == ("OutOfDate", ("INTEL-SA-01000",))
    with pytest.raises(errors.TcbLevelNotFound, match=r"^TCB info has no TDX module identity TDX_01$"):
        _verify(make_collateral(CHAIN, module_identities=[{**identity, "id": "TDX_03"}]), quote)


def test_qe_identity_status_converges() -> None:
    v = _verify(make_collateral(CHAIN), build_quote(CHAIN, qe_isv_svn=3))
    assert v.tcb is not None and v.tcb.qe.status == TcbStatus.OUT_OF_DATE
    assert v.tcb_status == "OutOfDate"
    with pytest.raises(
        errors.QeIdentityMismatch, match=r"^QE ISV SVN 1 is below every TCB level \(lowest 2\)$"
    ):
        _verify(make_collateral(CHAIN), build_quote(CHAIN, qe_isv_svn=1))


@pytest.mark.parametrize(
    ("platform", "other", "want"),
    [
        ("UpToDate", "UpToDate", "UpToDate"),
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("OutOfDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
        ("UpToDate", "Revoked", "Revoked"),
    ],
)
def test_convergence_table(platform: str, other: str, want: str) -> None:
    assert converge(TcbStatus(platform), TcbStatus(other)) == TcbStatus(want)


def test_revoked_pck_certificate() -> None:
    with pytest.raises(
        errors.CertificateRevoked,
        match=r"^'EasyEnclave Mini development PCK' \(serial 65\) is revoked by the PCK CRL$",
    ):
        _verify(make_collateral(CHAIN, revoked_by_ca=(7, 101)))


def test_revoked_intermediate() -> None:
    with pytest.raises(
        errors.CertificateRevoked,
        match=r"^'EasyEnclave Mini development PCK CA' \(serial 33\) is revoked by the root CA CRL$",
    ):
        _verify(make_collateral(CHAIN, revoked_by_root=(51,)))


def test_fmspc_mismatch() -> None:
    with pytest.raises(
        errors.FmspcMismatch,
        match=r"^PCK certificate FMSPC 00906ED50000 differs from the TCB info's 00906ED50001$",
    ):
        _verify(make_collateral(CHAIN, fmspc="00906ED50001"))


def test_qe_report_data_upper_half_must_be_zero() -> None:
    quote = build_quote(CHAIN, qe_report_data_tail=b"\x01" + b"\0" * 31)
    with pytest.raises(
        errors.QeReportDataMismatch, match=r"^the QE report data's upper 32 bytes are not zero"
    ):
        _verify(make_collateral(CHAIN), quote)


def test_collateral_from_another_root_is_rejected() -> None:
    # Same root name, different key: the root CA CRL (checked first) is not signed by our root.
    other = make_chain(intermediate=True, seed=2)
    with pytest.raises(
        errors.CrlInvalid, match=r"^root CA CRL is not signed by 'EasyEnclave Mini development root'$"
    ):
        _verify(make_collateral(other))


def test_rejected_advisory() -> None:
    quote = build_quote(CHAIN, tee_tcb_svn=bytes.fromhex("02000300000000000000000000000000"))
    policy = (
        PolicyBuilder()
        .accepted_tcb_statuses(["UpToDate", "OutOfDate"])
        .rejected_advisory_ids(["INTEL-SA-00837"])
    ).build()
    with pytest.raises(
        errors.TcbStatusRejected, match=r"^the TCB is affected by rejected advisories INTEL-SA-00837$"
    ):
        verify(quote, parse_collateral(make_collateral(CHAIN)), policy, NOW, trusted_roots=ROOTS)


def test_pce_id_mismatch() -> None:
    doc = json.loads(make_collateral(CHAIN))
    text = doc["tcb_info"].replace('"pceId":"0000"', '"pceId":"0001"')
    doc["tcb_info"] = text
    doc["tcb_info_signature"] = raw_sign(TCB_SIGNING_KEY, text.encode()).hex()
    with pytest.raises(
        errors.PceIdMismatch, match=r"^PCK certificate PCE-ID 0000 differs from the TCB info's 0001$"
    ):
        _verify(json.dumps(doc))


def test_collateral_must_come_from_the_pck_chains_root() -> None:
    # Both development roots trusted: collateral of root 2 must not vouch for a PCK of root 1.
    other = make_chain(intermediate=True, seed=2)
    roots = [*ROOTS, development_root(other.root_pem)]
    assert verify(
        build_quote(other), parse_collateral(make_collateral(other)), ANY, NOW, trusted_roots=roots
    )
    with pytest.raises(errors.CrlInvalid, match=r"^root CA CRL is not signed by"):
        verify(
            build_quote(CHAIN), parse_collateral(make_collateral(other)), ANY, NOW, trusted_roots=roots
        )


def test_revoked_root() -> None:
    with pytest.raises(
        errors.CertificateRevoked,
        match=r"^the root 'EasyEnclave Mini development root' is revoked by its own CRL$",
    ):
        _verify(make_collateral(CHAIN, revoked_by_root=(1,)))


# Malformed content behind a valid signature: what only a trusted signer could send still ends in
# the verifier's own errors, naming what did not parse.


def _signed_tcb_info(text: str) -> str:
    doc = json.loads(make_collateral(CHAIN))
    doc["tcb_info"] = text
    doc["tcb_info_signature"] = raw_sign(TCB_SIGNING_KEY, text.encode()).hex()
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace('"issueDate":"2024-06-01T00:00:00Z"', '"issueDate":"2024-13-01"'),
         r"^tcb_info\.issueDate is not an RFC 3339 time: month must be in 1\.\.12$"),
        (lambda t: t.replace('"fmspc":"00906ED50000"', '"fmspc":"00906ED5000G"'),
         r"^tcb_info\.fmspc is not valid hex: non-hexadecimal number found in fromhex\(\) arg at "
         r"position 11$"),
        (lambda t: "[" * 100_000,
         r"^tcb_info is not JSON: RecursionError: maximum recursion depth exceeded"),
        (lambda t: t.replace('"version":3', '"version":' + "9" * 5000),
         r"^tcb_info is not JSON: Exceeds the limit \(4300 digits\) for integer string conversion"),
        (lambda t: t.replace('"tcbStatus":"UpToDate"', '"tcbStatus":"Fine"'),
         r"^tcb_info\.tcbLevels\[0\]\.tcbStatus: unknown TCB status 'Fine'$"),
    ],
    ids=["date", "hex", "nesting", "huge-number", "status"],
)  # fmt: skip
def test_signed_tcb_info_that_does_not_parse(change: Callable[[str], str], message: str) -> None:
    text = change(json.loads(make_collateral(CHAIN))["tcb_info"])
    with pytest.raises(errors.CollateralInvalid, match=message):
        _verify(_signed_tcb_info(text))


def test_crl_without_next_update() -> None:
    # RFC 5280 5.1: nextUpdate is OPTIONAL in the syntax; without it a CRL's freshness is unknown.
    assert CHAIN.ca_key is not None
    doc = json.loads(make_collateral(CHAIN))
    outer = split_der(bytes.fromhex(doc["pck_crl"]), "")[0][1]
    tbs, algorithm, _ = split_der(outer, "")
    fields = split_der(tbs[1], "")
    assert [tag for tag, _ in fields[:5]] == [0x02, 0x30, 0x30, 0x17, 0x17]  # ..., this, next
    tbs_der = der_tlv(0x30, b"".join(der_tlv(t, v) for i, (t, v) in enumerate(fields) if i != 4))
    signature = CHAIN.ca_key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
    crl = der_tlv(0x30, tbs_der + der_tlv(0x30, algorithm[1]) + der_tlv(0x03, b"\0" + signature))
    doc["pck_crl"] = crl.hex()
    with pytest.raises(errors.CrlInvalid, match=r"^PCK CRL has no nextUpdate, so it is never current$"):
        _verify(json.dumps(doc))
