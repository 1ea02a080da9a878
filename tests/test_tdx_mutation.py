"""Hostile input: every single change of a signed byte region of a real quote or its collateral is
rejected, each with one of the verifier's own errors (eemini.tdx.errors), never a library's.

Real data: dcap-qvl's sample quote and its collateral (../shared/testdata/quotes), verified at its
`verify_at`. Every sweep asserts that NO mutation verifies and that each one raises a QuoteError;
the unmutated parts stay in a warmed VerificationCache, so a sweep costs what the mutated part
costs. Coverage, per region (the counts are asserted below):

* the quote, all 4936 bytes: every single-bit flip (8 per byte, exhaustive), which covers the
  header + TD report, the signature, the attestation key, the QE report, its signature, the QE
  authentication data, the size and type fields and the PCK chain PEM; plus, in the PEM's base64
  bodies, every character replaced by another base64 character (one replacement per character);
* TCB info and QE identity (the signed JSON text): every single-bit flip of their bytes (a flip
  that breaks UTF-8 is passed on as the undecodable text a caller could still build);
* their signatures (hex of r||s): every hex digit changed to each of its 15 other values;
* the root CA CRL and the PCK CRL (hex of DER): every hex digit changed in each of its 4 bits,
  that is every single-bit flip of the DER;
* each issuer chain (PEM): every base64 character replaced by another, and every byte of the
  text (armor and line breaks included) flipped in one bit, the bit rotating with the offset.

All exhaustive but the issuer chains' bit flips (one bit per byte, 1/8 of them): about 110,000
verifications, about 40 s on the 2-core development machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import string
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shared_testdata
from eemini.tdx import errors
from eemini.tdx.collateral import Collateral, parse_collateral
from eemini.tdx.errors import QuoteError, QuoteParseError
from eemini.tdx.pck import der_spans, pem_ders
from eemini.tdx.policy import Policy
from eemini.tdx.quote import Quote, parse_quote
from eemini.tdx.roots import development_root
from eemini.tdx.verify import VerificationCache, verify
from json_changes import JSON, change
from tdx_builder import NOW, build_quote, make_chain

# Mutated certificates make cryptography warn (a serial number that is not positive, a country
# name's length); the verifier judges them all the same. eemini verify silences these for its output.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAME = "dcap-qvl__tdx_quote"
AT = 1752919234  # verify_at of this quote's collateral in expected.json
QUOTE_LEN = 4936  # the file holds 70 bytes of padding after the quote
POLICY = Policy()
CHAIN_ERRORS = {"CertificateParseError", "CertificateChainError", "UntrustedRoot"}
B64 = (string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/").encode()


@dataclasses.dataclass(frozen=True)
class Base:
    raw: bytes
    quote: Quote
    doc: dict[str, str]
    collateral: Collateral
    cache: VerificationCache


@functools.cache
def _load() -> Base:
    d = shared_testdata("quotes")
    raw = (d / f"{NAME}.bin").read_bytes()[:QUOTE_LEN]
    doc = json.loads((d / f"{NAME}.collateral.json").read_text())
    base = Base(raw, parse_quote(raw), doc, parse_collateral(json.dumps(doc)), VerificationCache())
    verify(raw, base.collateral, POLICY, AT, cache=base.cache)  # warm the cache
    return base


@pytest.fixture
def base() -> Base:
    return _load()


def _sweep(attempts: Iterator[tuple[str, Callable[[], object]]]) -> Counter[str]:
    """Run every attempt; each must raise a QuoteError. Returns how many raised which error."""
    seen: Counter[str] = Counter()
    verified: list[str] = []
    for label, attempt in attempts:
        try:
            attempt()
        except QuoteError as e:
            seen[type(e).__name__] += 1
        except Exception as e:
            raise AssertionError(f"{label} raised {type(e).__name__}: {e}") from e
        else:
            verified.append(label)
    assert verified == [], f"{len(verified)} mutations verified, e.g. {verified[:5]}"
    return seen


def _flip(data: bytes, offset: int, bit: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1 :]


def _b64_positions(pem: bytes) -> list[int]:
    """Offsets of the base64 characters inside the PEM blocks (not armor, not line breaks)."""
    out: list[int] = []
    pos = 0
    while (start := pem.find(b"-----BEGIN CERTIFICATE-----\n", pos)) >= 0:
        body = start + len(b"-----BEGIN CERTIFICATE-----\n")
        end = pem.index(b"-----END CERTIFICATE-----", body)
        out += [i for i in range(body, end) if pem[i] in B64 + b"="]
        pos = end
    return out


def _b64_replace(pem: bytes, offset: int) -> bytes:
    # Another base64 character, the distance rotating with the offset (1..63).
    old = B64.find(pem[offset : offset + 1])  # '=' (-1) becomes a letter
    new = B64[(old + 1 + offset % 63) % 64]
    return pem[:offset] + bytes([new]) + pem[offset + 1 :]


def _with(base: Base, **changes: object) -> Collateral:
    return dataclasses.replace(base.collateral, **changes)  # type: ignore[arg-type]


def _attempt(
    base: Base, raw: bytes | None = None, collateral: Collateral | None = None
) -> Callable[[], object]:
    quote = raw if raw is not None else base.quote  # a quote parsed once, unless mutated
    return lambda: verify(quote, collateral or base.collateral, POLICY, AT, cache=base.cache)


def test_unmodified_inputs_verify(base: Base) -> None:
    assert verify(base.raw, base.collateral, POLICY, AT, cache=base.cache).tcb_status == "UpToDate"
    assert verify(base.raw, base.collateral, POLICY, AT).tcb_status == "UpToDate"


def _quote_regions(raw: bytes) -> list[tuple[str, int, int, set[str]]]:
    """(region, start, end, the errors its flips raise), in quote order, from the parsed layout."""
    sd = parse_quote(raw).signature_data
    cert = sd.certification
    signed = raw.index(sd.signature) - 4
    qe = raw.index(cert.qe_report.raw)
    auth = qe + 384 + 64
    pem = raw.index(cert.pck_chain_pem)
    regions = [
        ("header + TD report", 0, signed, {"QuoteParseError", "QuoteSignatureInvalid"}),
        ("signature_data.size", signed, signed + 4, {"QuoteParseError"}),
        ("signature", signed + 4, signed + 68, {"QuoteSignatureInvalid"}),
        ("attestation key", signed + 68, signed + 132, {"QeReportDataMismatch"}),
        ("certification data type and size", signed + 132, qe, {"QuoteParseError"}),
        ("QE report", qe, qe + 384, {"QeReportSignatureInvalid"}),
        ("QE report signature", qe + 384, auth, {"QeReportSignatureInvalid"}),
        ("QE auth data size", auth, auth + 2, {"QuoteParseError"}),
        ("QE auth data", auth + 2, pem - 6, {"QeReportDataMismatch"}),
        ("PCK chain type and size", pem - 6, pem, {"QuoteParseError"}),
        ("PCK chain PEM", pem, len(raw), CHAIN_ERRORS),
    ]
    assert [r[1] for r in regions[1:]] == [r[2] for r in regions[:-1]]
    return regions


QUOTE_REGION_IDS = ["header-report", "signature-size", "signature", "attestation-key", "cert-data",
                    "qe-report", "qe-report-signature", "auth-size", "auth-data", "pck-type",
                    "pck-pem"]  # fmt: skip


@pytest.mark.parametrize("index", range(len(QUOTE_REGION_IDS)), ids=QUOTE_REGION_IDS)
def test_quote_every_bit_flip_is_rejected(base: Base, index: int) -> None:
    raw = base.raw
    region, start, end, expected = _quote_regions(raw)[index]

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for offset in range(start, end):
            for bit in range(8):
                mutated = _flip(raw, offset, bit)
                yield f"{region}: bit {bit} of byte {offset}", _attempt(base, raw=mutated)

    seen = _sweep(attempts())
    assert sum(seen.values()) == 8 * (end - start)
    assert set(seen) == expected


def test_quote_pck_chain_base64_changes_are_rejected(base: Base) -> None:
    quote = parse_quote(base.raw)
    pem = quote.signature_data.certification.pck_chain_pem
    at = base.raw.index(pem)
    positions = _b64_positions(pem)

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for i in positions:
            raw = base.raw[:at] + _b64_replace(pem, i) + base.raw[at + len(pem) :]
            yield f"PEM character {i}", _attempt(base, raw=raw)

    seen = _sweep(attempts())
    assert sum(seen.values()) == len(positions)
    assert set(seen) == CHAIN_ERRORS


@pytest.mark.parametrize("key", ["tcb_info", "qe_identity"])
def test_signed_json_every_bit_flip_is_rejected(base: Base, key: str) -> None:
    text = base.doc[key].encode()

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for offset in range(len(text)):
            for bit in range(8):
                # A flip that breaks UTF-8 reaches verify() as the text a caller could still build.
                mutated = _flip(text, offset, bit).decode(errors="surrogateescape")
                collateral = _with(base, **{key: mutated})
                yield f"{key}: bit {bit} of byte {offset}", _attempt(base, collateral=collateral)

    seen = _sweep(attempts())
    assert sum(seen.values()) == 8 * len(text)
    # Those that break UTF-8 fail before the signature check.
    assert set(seen) == {"CollateralSignatureInvalid", "CollateralInvalid"}


@pytest.mark.parametrize("key", ["tcb_info_signature", "qe_identity_signature"])
def test_signature_every_hex_digit_change_is_rejected(base: Base, key: str) -> None:
    text = base.doc[key]

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for i, c in enumerate(text):
            for digit in "0123456789abcdef".replace(c.lower(), ""):
                mutated = bytes.fromhex(text[:i] + digit + text[i + 1 :])
                collateral = _with(base, **{key: mutated})
                yield f"{key}: digit {i} to {digit}", _attempt(base, collateral=collateral)

    seen = _sweep(attempts())
    assert seen == {"CollateralSignatureInvalid": 15 * len(text)}


@pytest.mark.parametrize("key", ["root_ca_crl", "pck_crl"])
def test_crl_every_single_bit_hex_digit_change_is_rejected(base: Base, key: str) -> None:
    # Each hex digit changed in each of its 4 bits: every single-bit flip of the DER.
    text = base.doc[key]

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for i, c in enumerate(text):
            for bit in range(4):
                digit = f"{int(c, 16) ^ (1 << bit):x}"
                mutated = bytes.fromhex(text[:i] + digit + text[i + 1 :])
                collateral = _with(base, **{key: mutated})
                yield f"{key}: digit {i} to {digit}", _attempt(base, collateral=collateral)

    seen = _sweep(attempts())
    assert seen == {"CrlInvalid": 4 * len(text)}


@pytest.mark.parametrize(
    "key", ["pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"]
)
def test_issuer_chain_changes_are_rejected(base: Base, key: str) -> None:
    pem = base.doc[key].encode()
    positions = _b64_positions(pem)

    def attempts() -> Iterator[tuple[str, Callable[[], object]]]:
        for i in positions:
            collateral = _with(base, **{key: _b64_replace(pem, i).decode()})
            yield f"{key}: base64 character {i}", _attempt(base, collateral=collateral)
        for i in range(len(pem)):
            collateral = _with(base, **{key: _flip(pem, i, i % 8).decode(errors="surrogateescape")})
            yield f"{key}: bit {i % 8} of byte {i}", _attempt(base, collateral=collateral)

    seen = _sweep(attempts())
    assert sum(seen.values()) == len(positions) + len(pem)
    assert set(seen) == CHAIN_ERRORS


# Representative mutations with their exact errors (offsets in dcap-qvl's sample quote, v4).
SIG = 636  # the signature data, after header, TD report and its size field
QUOTE_CASES: list[tuple[str, int, int, type[QuoteError], str]] = [
    ("header.version", 1, 0, QuoteParseError,
     r"^header\.version at offset 0: expected 4 or 5 \(TDX quote\), found 260$"),
    ("header.tee_type", 4, 0, QuoteParseError, r"^header\.tee_type at offset 4: expected 0x00000081"),
    ("body.mr_td", 48 + 184 + 5, 0, errors.QuoteSignatureInvalid,
     r"^the quote header and TD report are not signed by the attestation key$"),
    ("signature_data.size", 632, 0, QuoteParseError,
     r"^signature_data\.size at offset 632: expected at most 4300 \(bytes left\), found 4301$"),
    ("attestation_key", SIG + 64 + 3, 0, errors.QeReportDataMismatch,
     r"^the QE report data does not bind the attestation key and QE authentication data"),
    ("qe_report.cpu_svn", SIG + 134, 0, errors.QeReportSignatureInvalid,
     r"^the QE report is not signed by the PCK certificate's key$"),
    ("pck_certification_data.type", SIG + 134 + 448 + 34, 0, QuoteParseError,
     r"^pck_certification_data\.type at offset 1252: expected 5 \(PCK_CERT_CHAIN\)"),
    # Once escaped as cryptography's DuplicateExtension: an extension OID of the platform CA
    # flipped into basicConstraints', which it already has (its signature is checked later).
    ("platform CA extension OID", 3604, 0, errors.CertificateParseError,
     r"^PCK certificate chain: 'Intel SGX PCK Platform CA': extension 2\.5\.29\.19 appears twice$"),
    ("PCK leaf newline", 1285, 0, errors.CertificateParseError,
     r"^PCK certificate chain: certificate 0 is not valid base64: Only base64 data is allowed$"),
    ("the NUL after the chain", QUOTE_LEN - 1, 0, errors.CertificateParseError,
     r"^PCK certificate chain: unexpected bytes after certificate 2 \(only line breaks may "
     r"separate PEM certificates\)$"),
    ("root BEGIN line", 3990, 0, errors.CertificateParseError,
     r"^PCK certificate chain: unexpected bytes after certificate 1 \(only line breaks"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("region", "offset", "bit", "error", "message"), QUOTE_CASES, ids=[c[0] for c in QUOTE_CASES]
)
def test_quote_flip_error(
    base: Base, region: str, offset: int, bit: int, error: type[QuoteError], message: str
) -> None:
    with pytest.raises(error, match=message):
        verify(_flip(base.raw, offset, bit), base.collateral, POLICY, AT)


def _hexset(doc: dict[str, str], key: str, pos: int, digit: str) -> bytes:
    value = doc[key]
    return bytes.fromhex(value[:pos] + digit + value[pos + 1 :])


def _pem_set(pem: str, offset: int, char: str) -> str:
    return pem[:offset] + char + pem[offset + 1 :]


COLLATERAL_CASES: list[tuple[str, Callable[[Base], dict[str, object]], type[QuoteError], str]] = [
    ("tcb_info.json",
     lambda b: {"tcb_info": b.doc["tcb_info"].replace('"version":3', '"version":4')},
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by 'Intel SGX TCB Signing'$"),
    ("tcb_info.signature",
     lambda b: {"tcb_info_signature": _hexset(b.doc, "tcb_info_signature", 20, "0")},
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by 'Intel SGX TCB Signing'$"),
    ("qe_identity.json",
     lambda b: {"qe_identity": b.doc["qe_identity"].replace('"isvprodid":2', '"isvprodid":3')},
     errors.CollateralSignatureInvalid, r"^QE identity is not signed by 'Intel SGX TCB Signing'$"),
    ("qe_identity.lone-surrogate", lambda b: {"qe_identity": b.doc["qe_identity"][:-1] + "\udcff"},
     errors.CollateralInvalid, r"^QE identity is not valid Unicode: 'utf-8' codec can't encode "
     r"character '\\udcff' in position 460: surrogates not allowed$"),
    ("root_ca_crl.signature", lambda b: {"root_ca_crl": _hexset(b.doc, "root_ca_crl", 578, "0")},
     errors.CrlInvalid, r"^root CA CRL is not signed by 'Intel SGX Root CA'$"),
    ("pck_crl.signature", lambda b: {"pck_crl": _hexset(b.doc, "pck_crl", 5320, "0")},
     errors.CrlInvalid, r"^PCK CRL is not signed by 'Intel SGX PCK Platform CA'$"),
    # These three once escaped as cryptography's InvalidVersion, TypeError and ValueError.
    ("pck_crl.version", lambda b: {"pck_crl": _hexset(b.doc, "pck_crl", 20, "1")},
     errors.CrlInvalid, r"^PCK CRL does not parse: InvalidVersion: 17 is not a valid CRL version$"),
    ("pck_crl.issuer", lambda b: {"pck_crl": _hexset(b.doc, "pck_crl", 266, "0")},
     errors.CrlInvalid,
     r"^PCK CRL does not parse: TypeError: oid must be X500_UNIQUE_IDENTIFIER for BitString type\.$"),
    ("root_ca_crl.length", lambda b: {"root_ca_crl": _hexset(b.doc, "root_ca_crl", 440, "0")},
     errors.CrlInvalid,
     r"^root CA CRL does not parse: error parsing asn1 value: ParseError \{ kind: ExtraData \}$"),
    ("tcb_info_issuer_chain.swapped", lambda b: {"tcb_info_issuer_chain": b.doc["pck_crl_issuer_chain"]},
     errors.CollateralSignatureInvalid, r"^TCB info is not signed by 'Intel SGX PCK Platform CA'$"),
    ("qe_identity_issuer_chain.garbage",
     lambda b: {"qe_identity_issuer_chain": b.doc["qe_identity_issuer_chain"] + "x"},
     errors.CertificateParseError, r"^QE identity issuer chain: unexpected bytes after certificate 1 "
     r"\(only line breaks may separate PEM certificates\)$"),
    # 'I' to 'J' before '=': the same DER to a lenient decoder, but not canonical base64.
    ("pck_crl_issuer_chain.padding-bits",
     lambda b: {"pck_crl_issuer_chain": _pem_set(b.doc["pck_crl_issuer_chain"],
                                                 b.doc["pck_crl_issuer_chain"].rindex("I="), "J")},
     errors.CertificateParseError, r"^PCK CRL issuer chain: certificate 1 is not canonical base64$"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "change", "error", "message"), COLLATERAL_CASES, ids=[c[0] for c in COLLATERAL_CASES]
)
def test_collateral_change_error(
    base: Base,
    case: str,
    change: Callable[[Base], dict[str, object]],
    error: type[QuoteError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        verify(base.raw, _with(base, **change(base)), POLICY, AT)


def test_collateral_validity_windows(base: Base) -> None:
    with pytest.raises(
        errors.CollateralExpired,
        match=r"^PCK CRL is valid from 2025-06-19T10:00:35\+00:00 until its nextUpdate "
        r"2025-07-19T10:00:35\+00:00 \(exclusive\), not at 2025-07-19T10:00:36\+00:00$",
    ):
        verify(base.raw, base.collateral, POLICY, AT + 2)
    with pytest.raises(
        errors.CertificateExpired,
        match=r"^PCK certificate chain: 'Intel SGX PCK Certificate' is valid from "
        r"2025-02-06T23:25:51\+00:00 to 2032-02-06T23:25:51\+00:00, not at 2017-07-14T02:40:00\+00:00$",
    ):
        verify(base.raw, base.collateral, POLICY, 1_500_000_000)


def test_collateral_json_malformed(base: Base) -> None:
    with pytest.raises(errors.CollateralParseError, match=r"^collateral is not JSON: Expecting"):
        parse_collateral("{")
    with pytest.raises(
        errors.CollateralParseError,
        match=r"^collateral is not JSON: RecursionError: maximum recursion depth exceeded",
    ):
        parse_collateral("[" * 100_000)
    with pytest.raises(errors.CollateralParseError, match=r"^collateral lacks pck_crl$"):
        parse_collateral(json.dumps({k: v for k, v in base.doc.items() if k != "pck_crl"}))
    with pytest.raises(
        errors.CollateralParseError,
        match=r"^collateral field 'root_ca_crl' is not valid hex: non-hexadecimal number found in "
        r"fromhex\(\) arg at position 0$",
    ):
        parse_collateral(json.dumps({**base.doc, "root_ca_crl": "zz"}))
    with pytest.raises(
        errors.CollateralParseError,
        match=r"^collateral field 'tcb_info' is not valid Unicode: 'utf-8' codec can't encode "
        r"character '\\ud800' in position 0: surrogates not allowed$",
    ):
        parse_collateral(json.dumps({**base.doc, "tcb_info": "\ud800"}))
    with pytest.raises(
        errors.CollateralParseError, match=r"^collateral field 'pck_crl' must be a hex string$"
    ):
        parse_collateral(json.dumps({**base.doc, "pck_crl": [True, False]}))


# Fuzzing on synthetic quotes (tests/tdx_builder.py): a mutated quote either raises one of our
# errors or, if it verifies, left every signed byte and every certificate as it was.

_CHAIN = make_chain()
_VALID = build_quote(_CHAIN, version=5)


def _signed_parts(raw: bytes) -> tuple[object, ...]:
    q = parse_quote(raw)
    sd = q.signature_data
    c = sd.certification
    ders = pem_ders(c.pck_chain_pem, "chain")
    return (q.signed_data, sd.signature, sd.attestation_key, c.qe_report.raw,
            c.qe_report_signature, c.qe_auth_data, ders)  # fmt: skip


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_fuzz_parser_random_bytes(data: bytes) -> None:
    with pytest.raises(QuoteParseError):
        parse_quote(data)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_quote_rejected(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for offset, mask in flips:
        data[offset] ^= mask
    mutated = bytes(data[:cut])
    roots = [development_root(_CHAIN.root_pem)]
    try:
        verify(mutated, None, Policy(require_collateral=False), NOW, trusted_roots=roots)
    except QuoteError:
        return
    assert _signed_parts(mutated) == _signed_parts(_VALID), "a quote with changed signed bytes verified"


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_fuzz_der_reader(data: bytes) -> None:
    try:
        spans = der_spans(data, "fuzz")
    except errors.CertificateParseError:
        return
    # The elements tile the input: each header starts where the previous value ended.
    ends = [end for _, _, _, end in spans]
    assert [head for _, head, _, _ in spans] == [0, *ends][: len(spans)]
    assert (spans[-1][3] if spans else 0) == len(data)
    assert all(head < start <= end for _, head, start, end in spans)


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_fuzz_collateral_parsers_structured(data: st.DataObject) -> None:
    # Parsing only (no signature): a changed document may still be well-formed; what may not
    # happen is an exception other than CollateralParseError.
    from eemini.tdx.collateral import parse_qe_identity, parse_tcb_info

    d = shared_testdata("quotes")
    doc = json.loads((d / "trustee__tdx_quote_6.collateral.json").read_text())
    which = data.draw(st.sampled_from(["tcb_info", "qe_identity"]))
    obj = json.loads(doc[which])
    change(data, obj)
    parse = parse_tcb_info if which == "tcb_info" else parse_qe_identity
    try:
        parse(json.dumps(obj))
    except errors.CollateralParseError:
        pass
    try:
        parse_collateral(json.dumps({**doc, which: data.draw(JSON)}))
    except errors.CollateralParseError:
        pass
