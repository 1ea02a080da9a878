"""`eemini verify` on hostile files: exit 1 (rejected, with the JSON result on stdout under --json) or
2 (does not parse, one line on stderr), never 3 (internal error), whatever the quote, collateral,
policy or development root holds.

The inputs are synthetic (tests/tdx_builder.py: a development root, a PCK CA, collateral signed
like Intel's), so this runs without the third-party data. `eemini.cli.main` runs in-process.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eemini.cli import main
from eemini.tdx.pck import split_der
from tdx_builder import (
    NOW,
    SGX_OID,
    DevChain,
    build_quote,
    der_tlv,
    make_chain,
    make_collateral,
    sgx_extension,
)

CHAIN = make_chain(intermediate=True)
QUOTE = build_quote(CHAIN)
COLLATERAL: dict[str, str] = json.loads(make_collateral(CHAIN))
ROOT = CHAIN.root_pem
RNG = random.Random(20250719)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def _run(tmp: Path, capsys: pytest.CaptureFixture[str], **files: bytes) -> Run:
    """`eemini verify --json` on the good inputs, with some of them replaced by `files`."""
    inputs = {"quote": QUOTE, "collateral": json.dumps(COLLATERAL).encode(), "policy": b"{}",
              "root": ROOT} | files  # fmt: skip
    paths = {}
    for name, data in inputs.items():
        paths[name] = tmp / name
        paths[name].write_bytes(data)
    code = main(["verify", str(paths["quote"]), "--collateral", str(paths["collateral"]),
                 "--policy", str(paths["policy"]), "--trust-dev-root", str(paths["root"]),
                 "--at", str(NOW), "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    return Run(code, out, err)


def _check(run: Run, what: str) -> dict[str, Any] | None:
    """The contract: exit 1 with a JSON rejection on stdout, or 2 with one line on stderr."""
    assert "internal error" not in run.err, f"{what}: {run.err}"
    assert run.code in (1, 2), f"{what}: exit {run.code}: {run.err}"
    assert run.err.count("\n") == 1, f"{what}: {run.err!r}"
    if run.code == 2:
        assert run.out == "", what
        assert run.err.startswith("eemini verify: error: "), what
        return None
    doc = json.loads(run.out)
    assert doc["verified"] is False and isinstance(doc["check"], str), what
    assert isinstance(doc["error"], str) and doc["error"], what
    assert run.err == f"eemini verify: rejected: {doc['check']}: {doc['error']}\n", what
    return dict(doc)


def test_the_good_inputs_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, capsys)
    assert run.code == 0, run.err
    assert json.loads(run.out)["verified"] is True


# Hostile variants, by input file --------------------------------------------------------------


def _random(n: int) -> bytes:
    return RNG.randbytes(n)


def _set_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(4, "little") + data[offset + 4 :]


def _flip_spread(data: bytes, count: int) -> list[bytes]:
    # `count` flips spread evenly over the data, the bit rotating.
    step = max(1, len(data) // count)
    return [bytes(data[:i]) + bytes([data[i] ^ (1 << (i % 8))]) + data[i + 1 :]
            for i in range(0, len(data), step)]  # fmt: skip


def _quote_variants() -> list[bytes]:
    pem = QUOTE.index(b"-----BEGIN CERTIFICATE-----")
    sig_size = 48 + 584  # v4: header, TD report, then signature_data.size
    return [
        b"",
        b"\0",
        b"0x",
        b"\xff\xfe\xfd",  # not UTF-8, not hex
        *(QUOTE[:n] for n in (10, 47, 48, 100, 632, 636, 700, 1000, pem, len(QUOTE) - 1)),
        *(_random(n) for n in (1, 64, 636, 5000, 100_000)),
        QUOTE.hex()[:-1].encode(),  # odd-length hex: read as bytes
        ("0x" + _random(700).hex()).encode(),
        _set_u32(QUOTE, sig_size, 0xFFFFFFFF),
        _set_u32(QUOTE, sig_size + 4 + 64 + 64 + 2, 0xFFFFFFFF),  # certification data size
        _set_u32(QUOTE, pem - 4, 0xFFFFFFFF),  # PCK chain size
        QUOTE[:pem] + b"x" * (len(QUOTE) - pem),  # the PEM chain replaced by garbage
        *_flip_spread(QUOTE, 60),
    ]


def _hex_json(value: object) -> bytes:
    return json.dumps(value).encode()


def _collateral_variants() -> list[bytes]:
    text = json.dumps(COLLATERAL).encode()
    out = [
        b"",
        b"\xff\xfe\x00\x01not utf-8",
        _random(300),
        *(text[:n] for n in (1, 10, len(text) // 2, len(text) - 1)),
        b"[]", b'"x"', b"1", b"null", b"true", b"{}",
        b"[" * 100_000,  # deeper than the JSON parser recurses
        b'{"pck_crl": ' + b"1" * 5000 + b"}",  # more digits than Python converts
    ]  # fmt: skip
    wrong: list[object] = [1, -1, 1e308, None, True, [], {}, "zz", [-1], [256], [True], 10**400,
                           "0x", "\ud800", "-----BEGIN CERTIFICATE-----\n"]  # fmt: skip
    for key in COLLATERAL:
        out += [_hex_json({**COLLATERAL, key: v}) for v in wrong]
        out.append(_hex_json({k: v for k, v in COLLATERAL.items() if k != key}))
    # Raw JSON the encoder will not write: a non-finite number and a lone surrogate escape.
    out.append(text.replace(b'"pck_crl": "', b'"pck_crl": 1e999, "x": "', 1))
    out.append(text.replace(b'"tcb_info": "{', b'"tcb_info": "\\udc80{', 1))
    for key in ("pck_crl", "root_ca_crl", "tcb_info_signature", "qe_identity_signature"):
        value = COLLATERAL[key]
        out += [_hex_json({**COLLATERAL, key: value[:i] + f"{int(value[i], 16) ^ 1:x}" + value[i + 1 :]})
                for i in range(0, len(value), max(1, len(value) // 12))]  # fmt: skip
        out.append(_hex_json({**COLLATERAL, key: value[: len(value) // 2]}))
    for key in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        value = COLLATERAL[key]
        out += [_hex_json({**COLLATERAL, key: v}) for v in (
            "", value + "x", value[: len(value) // 2], value.replace("\n", " "),
            value.replace("-----END CERTIFICATE-----", "", 1), COLLATERAL["tcb_info"],
            re.sub("[A-Za-z]", "A", value),
        )]  # fmt: skip
    for key in ("tcb_info", "qe_identity"):
        out += [_hex_json({**COLLATERAL, key: v}) for v in ("", "{", "[]", "{}", "null", "\ud800")]
    return out


def _policy_variants() -> list[bytes]:
    keys = ["report_data", "mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "allow_debug",
            "accepted_tcb_statuses", "require_collateral", "require_sept_ve_disable",
            "require_zero_mr_servicetd", "reject_reserved_td_attributes", "rejected_advisory_ids",
            "expected_events"]  # fmt: skip
    wrong: list[object] = [1, -1, 1e308, None, "", "zz", "00" * 65, [], [1], [""], [None], {}, [{}],
                           10**400, "\ud800", [[[]]], ["Revoked"]]  # fmt: skip
    out = [
        b"", b"\xff\xfe\x00\x01", _random(200), b"[]", b'"x"', b"null", b'{"allow_debug": tru',
        b"{" * 50_000, b"[" * 100_000, b'{"rtmr0": ' + b"9" * 5000 + b"}", b'{"rtmr0": 1e999}',
        b'{"report_data": "\\udc80"}',
    ]  # fmt: skip
    valid = [("rejected_advisory_ids", []), ("rejected_advisory_ids", ["Revoked"])]  # any strings
    for key in keys:
        out += [json.dumps({key: v}).encode() for v in wrong if (key, v) not in valid]
    return out


def _cert_with_duplicate_extension(issuer: x509.Certificate | None = None) -> x509.Certificate:
    """A certificate whose KeyUsage OID is rewritten into SubjectKeyIdentifier's (2.5.29.15 to .14),
    then signed again: well-formed DER with two extensions of one kind (RFC 5280 4.2 forbids it)."""
    key = ec.derive_private_key(6000, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EasyEnclave Mini development PCK")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(CHAIN.pck_key.public_key() if issuer is not None else key.public_key())
        .serial_number(7)
        .not_valid_before(CHAIN.pck.not_valid_before_utc)
        .not_valid_after(CHAIN.pck.not_valid_after_utc)
        .add_extension(x509.SubjectKeyIdentifier(b"\x01" * 20), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier(SGX_OID),
                sgx_extension(bytes.fromhex("00906ed50000"), (1,) * 16, 11),
            ),
            critical=False,
        )
    )
    signer = CHAIN.ca_key if issuer is not None else key
    assert signer is not None
    der = builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    ku = bytes.fromhex("0603551d0f")
    assert der.count(ku) == 1
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature BIT STRING }
    cert = split_der(split_der(der.replace(ku, bytes.fromhex("0603551d0e")), "")[0][1], "")
    tbs = der_tlv(0x30, cert[0][1])
    signature = signer.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = der_tlv(0x30, tbs + der_tlv(0x30, cert[1][1]) + der_tlv(0x03, b"\0" + signature))
    return x509.load_der_x509_certificate(der)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _root_variants() -> list[bytes]:
    body = ROOT.split(b"\n")
    crl = base64.encodebytes(bytes.fromhex(COLLATERAL["root_ca_crl"]))
    return [
        b"", b"\xff\xfe\x00\x01", _random(400), ROOT[: len(ROOT) // 2],
        ROOT.replace(b"-----END", b"-----BEGIN"),
        b"\n".join([*body[:1], b"!!!!" * 16, *body[2:]]),
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(_random(99)) + b"-----END CERTIFICATE",
        b"-----BEGIN X509 CRL-----\n" + crl + b"-----END X509 CRL-----\n",
        _pem(CHAIN.pck),  # a certificate, but not the chain's root: the chain is then untrusted
        _pem(make_chain(seed=9).root),
        _pem(_cert_with_duplicate_extension()),
    ]  # fmt: skip


VARIANTS: dict[str, Callable[[], list[bytes]]] = {
    "quote": _quote_variants,
    "collateral": _collateral_variants,
    "policy": _policy_variants,
    "root": _root_variants,
}


@pytest.mark.parametrize("which", VARIANTS)
def test_hostile_files_exit_1_or_2(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    codes: dict[int, int] = {}
    for i, data in enumerate(VARIANTS[which]()):
        run = _run(tmp_path, capsys, **{which: data})
        _check(run, f"{which} variant {i} ({data[:40]!r})")
        codes[run.code] = codes.get(run.code, 0) + 1
    assert sum(codes.values()) >= 10
    # Every input file can be made to fail to parse (2); quotes and collateral also to be rejected (1).
    assert 2 in codes
    if which in ("quote", "collateral"):
        assert 1 in codes


# Exact results for the inputs that once ended as an internal error (exit 3) ----------------------


def test_duplicate_extension_in_the_pck_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = _cert_with_duplicate_extension(issuer=CHAIN.ca)
    quote = build_quote(
        DevChain(CHAIN.root_key, CHAIN.root, CHAIN.pck_key, leaf, CHAIN.ca_key, CHAIN.ca)
    )
    run = _run(tmp_path, capsys, quote=quote)
    assert (run.code, _check(run, "quote")) == (1, {
        "verified": False,
        "check": "certificates",
        # Read from the DER, as the issuers' are: the same rule, the same message.
        "error": "PCK certificate chain: 'EasyEnclave Mini development PCK': extension 2.5.29.14 "
                 "appears twice",
    })  # fmt: skip


def test_duplicate_extension_in_the_development_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path, capsys, root=_pem(_cert_with_duplicate_extension()))
    assert (run.code, run.out) == (2, "")
    assert run.err == (
        f"eemini verify: error: {tmp_path / 'root'}: development root is not a PEM certificate: "
        "DuplicateExtension: Duplicate 2.5.29.14 extension found\n"
    )


def test_crl_with_an_invalid_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crl = COLLATERAL["pck_crl"]
    assert crl[10:16] == "020101"  # TBSCertList.version: INTEGER 1 (v2)
    collateral = {**COLLATERAL, "pck_crl": crl[:14] + "11" + crl[16:]}
    run = _run(tmp_path, capsys, collateral=json.dumps(collateral).encode())
    assert (run.code, _check(run, "collateral")) == (1, {
        "verified": False,
        "check": "crl",
        "error": "PCK CRL does not parse: InvalidVersion: 17 is not a valid CRL version",
    })  # fmt: skip


def test_collateral_nested_too_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, capsys, collateral=b"[" * 100_000)
    assert (run.code, run.out) == (2, "")
    assert run.err == (
        f"eemini verify: error: {tmp_path / 'collateral'}: collateral is not JSON: RecursionError: "
        "maximum recursion depth exceeded while decoding a JSON array from a unicode string\n"
    )


def test_collateral_lone_surrogate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(COLLATERAL).encode().replace(b'"tcb_info": "{', b'"tcb_info": "\\udc80{', 1)
    run = _run(tmp_path, capsys, collateral=text)
    assert (run.code, run.out) == (2, "")
    assert run.err == (
        f"eemini verify: error: {tmp_path / 'collateral'}: collateral field 'tcb_info' is not valid "
        "Unicode: 'utf-8' codec can't encode character '\\udc80' in position 0: surrogates not allowed\n"
    )


def test_policy_nested_too_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, capsys, policy=b"[" * 100_000)
    assert (run.code, run.out) == (2, "")
    assert run.err == (
        f"eemini verify: error: {tmp_path / 'policy'}: policy is not JSON: "
        "maximum recursion depth exceeded while decoding a JSON array from a unicode string\n"
    )
