"""Hostile input: byte flips in every region of a real quote and its collateral fail with the right
error, and fuzzing the parser and verifier finds no exception outside eemini.tdx.errors."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shared_testdata
from eemini.tdx import errors
from eemini.tdx.collateral import parse_collateral
from eemini.tdx.errors import QuoteError, QuoteParseError
from eemini.tdx.pck import split_der
from eemini.tdx.policy import Policy
from eemini.tdx.quote import parse_quote
from eemini.tdx.verify import verify
from tdx_builder import NOW, build_quote, make_chain

NAME = "dcap-qvl__tdx_quote.bin"
AT = 1752919234  # verify_at of this quote's collateral in expected.json
QUOTE_LEN = 4936


def _inputs() -> tuple[bytes, dict[str, Any]]:
    d: Path = shared_testdata("quotes")
    raw = (d / NAME).read_bytes()
    doc = json.loads((d / "dcap-qvl__tdx_quote.collateral.json").read_text())
    return raw, doc


def _verify(raw: bytes, doc: dict[str, Any]) -> Any:
    return verify(raw, parse_collateral(json.dumps(doc)), Policy(), AT)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def test_unmodified_inputs_verify() -> None:
    raw, doc = _inputs()
    assert _verify(raw, doc).tcb_status == "UpToDate"


# Offsets inside the v4 quote (layout.py): header 0..48, TD report 48..632, signature data from 636.
SIG = 636
QUOTE_REGIONS: list[tuple[str, int, type[Exception], str]] = [
    (
        "header.version",
        1,
        QuoteParseError,
        r"^header\.version at offset 0: expected 4 or 5 \(TDX quote\), found 260$",
    ),
    ("header.tee_type", 4, QuoteParseError, r"^header\.tee_type at offset 4: expected 0x00000081"),
    ("header.qe_vendor_id", 12, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    ("header.user_data", 40, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    ("body.tee_tcb_svn", 48, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    ("body.mr_td", 48 + 184 + 5, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    ("body.report_data", 631, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    (
        "signature_data.size",
        632,
        QuoteParseError,
        r"^signature_data\.size at offset 632: expected 4300 \(the size of its contents\), found 4301$",
    ),
    ("signature", SIG + 10, errors.QuoteSignatureInvalid, r"^the quote header and TD report"),
    ("attestation_key", SIG + 64 + 3, errors.QeReportDataMismatch, r"^the QE report data does not bind"),
    ("certification_data.type", SIG + 128, QuoteParseError, r"^certification_data\.type at offset 764"),
    ("qe_report.cpu_svn", SIG + 134, errors.QeReportSignatureInvalid, r"^the QE report is not signed"),
    (
        "qe_report.report_data",
        SIG + 134 + 330,
        errors.QeReportSignatureInvalid,
        r"^the QE report is not",
    ),
    ("qe_report_signature", SIG + 134 + 384 + 7, errors.QeReportSignatureInvalid, r"^the QE report is"),
    ("qe_auth_data", SIG + 134 + 448 + 2 + 5, errors.QeReportDataMismatch, r"^the QE report data does"),
    ("pck_certification_data.type", SIG + 134 + 448 + 34, QuoteParseError, r"^pck_certification_data"),
]


@pytest.mark.parametrize(
    ("region", "offset", "error", "message"), QUOTE_REGIONS, ids=[r[0] for r in QUOTE_REGIONS]
)
def test_quote_region_flip(region: str, offset: int, error: type[Exception], message: str) -> None:
    raw, doc = _inputs()
    with pytest.raises(error, match=message):
        _verify(_flip(raw, offset), doc)


def _pem_blocks(raw: bytes) -> list[tuple[int, int]]:
    return [m.span(1) for m in re.finditer(rb"-----BEGIN CERTIFICATE-----\n(.+?)\n-----END", raw, re.S)]


def _mutate_der_in_pem(raw: bytes, index: int, at: Callable[[int], int]) -> bytes:
    start, end = _pem_blocks(raw)[index]
    der = bytearray(base64.b64decode(raw[start:end]))
    der[at(len(der))] ^= 0x01
    b64 = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    assert len(lines) == end - start
    return raw[:start] + lines + raw[end:]


@pytest.mark.parametrize(
    ("index", "where", "error", "message"),
    [
        (0, lambda n: n - 5, errors.CertificateChainError, r"^PCK certificate chain: 'Intel SGX PCK "
         r"Certificate' is not signed by 'Intel SGX PCK Platform CA'"),
        (1, lambda n: n - 5, errors.CertificateChainError, r"^PCK certificate chain: 'Intel SGX PCK "
         r"Platform CA' is not signed by 'Intel SGX Root CA'"),
        (2, lambda n: n - 5, errors.UntrustedRoot, r"^PCK certificate chain ends at 'Intel SGX Root"),
        (0, lambda n: 1, errors.CertificateParseError, r"^PCK certificate chain: certificate 0 does"),
    ],
    ids=["pck-leaf-signature", "platform-ca-signature", "root", "leaf-der"],
)  # fmt: skip
def test_certificate_flip(
    index: int, where: Callable[[int], int], error: type[Exception], message: str
) -> None:
    raw, doc = _inputs()
    with pytest.raises(error, match=message):
        _verify(_mutate_der_in_pem(raw, index, where), doc)


def _hexflip(doc: dict[str, Any], key: str, pos: int) -> dict[str, Any]:
    value = doc[key]
    c = "0" if value[pos] != "0" else "1"
    return {**doc, key: value[:pos] + c + value[pos + 1 :]}


COLLATERAL_CASES: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], type[Exception], str]] = [
    ("tcb_info.json", lambda d: {**d, "tcb_info": d["tcb_info"].replace('"version":3', '"version":4')},
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by 'Intel SGX TCB Signing'"),
    ("tcb_info.signature", lambda d: _hexflip(d, "tcb_info_signature", 20),
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by"),
    ("qe_identity.json",
     lambda d: {**d, "qe_identity": d["qe_identity"].replace('"isvprodid":2', '"isvprodid":3')},
     errors.CollateralSignatureInvalid, r"^QE identity is not signed by"),
    ("qe_identity.signature", lambda d: _hexflip(d, "qe_identity_signature", 70),
     errors.CollateralSignatureInvalid, r"^QE identity is not signed by"),
    ("root_ca_crl.signature", lambda d: _hexflip(d, "root_ca_crl", len(d["root_ca_crl"]) - 6),
     errors.CrlInvalid, r"^root CA CRL is not signed by 'Intel SGX Root CA'$"),
    ("pck_crl.signature", lambda d: _hexflip(d, "pck_crl", len(d["pck_crl"]) - 6),
     errors.CrlInvalid, r"^PCK CRL is not signed by 'Intel SGX PCK Platform CA'$"),
    ("pck_crl.der", lambda d: _hexflip(d, "pck_crl", 1),
     errors.CrlInvalid, r"^PCK CRL does not parse: "),
    ("tcb_info_issuer_chain", lambda d: {**d, "tcb_info_issuer_chain": d["pck_crl_issuer_chain"]},
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by 'Intel SGX PCK Platform CA'$"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "mutate", "error", "message"), COLLATERAL_CASES, ids=[c[0] for c in COLLATERAL_CASES]
)
def test_collateral_mutation(
    case: str, mutate: Callable[[dict[str, Any]], dict[str, Any]], error: type[Exception], message: str
) -> None:
    raw, doc = _inputs()
    with pytest.raises(error, match=message):
        _verify(raw, mutate(doc))


def test_collateral_validity_windows() -> None:
    raw, doc = _inputs()
    with pytest.raises(
        errors.CollateralExpired,
        match=r"^PCK CRL is valid from 2025-06-19T10:00:35\+00:00 until its nextUpdate "
        r"2025-07-19T10:00:35\+00:00 \(exclusive\), not at 2025-07-19T10:00:36\+00:00$",
    ):
        verify(raw, parse_collateral(json.dumps(doc)), Policy(), AT + 2)
    with pytest.raises(
        errors.CertificateExpired,
        match=r"^PCK certificate chain: 'Intel SGX PCK Certificate' is valid from "
        r"2025-02-06T23:25:51\+00:00 to 2032-02-06T23:25:51\+00:00, not at 2017-07-14T02:40:00\+00:00$",
    ):
        verify(raw, parse_collateral(json.dumps(doc)), Policy(), 1_500_000_000)


def test_collateral_json_malformed() -> None:
    with pytest.raises(errors.CollateralParseError, match=r"^collateral is not JSON"):
        parse_collateral("{")
    with pytest.raises(errors.CollateralParseError, match=r"^collateral lacks pck_crl$"):
        _, doc = _inputs()
        parse_collateral(json.dumps({k: v for k, v in doc.items() if k != "pck_crl"}))
    with pytest.raises(
        errors.CollateralParseError, match=r"^collateral field 'root_ca_crl' is not valid hex$"
    ):
        parse_collateral(json.dumps({**doc, "root_ca_crl": "zz"}))


def test_every_byte_region_sweep_raises_only_our_errors() -> None:
    raw, doc = _inputs()
    collateral = parse_collateral(json.dumps(doc))
    pem = _pem_blocks(raw)
    pem_region = range(pem[0][0] - 40, pem[-1][1] + 40)
    for offset in range(0, QUOTE_LEN, 13):
        try:
            verify(_flip(raw, offset, 0x80), collateral, Policy(), AT)
        except QuoteError:
            continue
        assert offset in pem_region, f"flip at {offset} verified"


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_fuzz_parser_random_bytes(data: bytes) -> None:
    try:
        parse_quote(data)
    except QuoteParseError:
        pass


_CHAIN = make_chain()
_VALID = build_quote(_CHAIN, version=5)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, len(_VALID)),
)
def test_fuzz_parser_and_verifier_mutated_quote(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for offset, mask in flips:
        data[offset] ^= mask
    from eemini.tdx.roots import development_root

    try:
        verify(bytes(data[:cut]), None, Policy(require_collateral=False), NOW,
               trusted_roots=[development_root(_CHAIN.root_pem)])  # fmt: skip
    except QuoteError:
        pass


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_fuzz_der_reader(data: bytes) -> None:
    try:
        split_der(data, "fuzz")
    except errors.CertificateParseError:
        pass


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["tcb_info", "qe_identity"]), st.integers(0, 10_000), st.sampled_from('0{}[]",:a9 ')
)
def test_fuzz_signed_collateral_json(key: str, pos: int, char: str) -> None:
    raw, doc = _inputs()
    text = doc[key]
    pos %= len(text)
    mutated = {**doc, key: text[:pos] + char + text[pos + 1 :]}
    try:
        _verify(raw, mutated)
    except QuoteError:
        pass


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_fuzz_collateral_parsers_structured(data: st.DataObject) -> None:
    from eemini.tdx.collateral import parse_qe_identity, parse_tcb_info

    d = shared_testdata("quotes")
    doc = json.loads((d / "trustee__tdx_quote_6.collateral.json").read_text())
    which = data.draw(st.sampled_from(["tcb_info", "qe_identity"]))
    obj = json.loads(doc[which])
    # Replace one value somewhere in the signed document by arbitrary JSON.
    path_obj: Any = obj
    while True:
        keys = list(path_obj) if isinstance(path_obj, dict) else list(range(len(path_obj)))
        if not keys:
            break
        k = data.draw(st.sampled_from(keys))
        if isinstance(path_obj[k], dict | list) and data.draw(st.booleans()):
            path_obj = path_obj[k]
            continue
        path_obj[k] = data.draw(_JSON)
        break
    parse = parse_tcb_info if which == "tcb_info" else parse_qe_identity
    try:
        parse(json.dumps(obj))
    except errors.CollateralParseError:
        pass
    try:
        parse_collateral(json.dumps({**doc, which: data.draw(_JSON)}))
    except errors.CollateralParseError:
        pass
