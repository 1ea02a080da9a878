"""The parser on well-formed and corrupt quotes: exact fields, offsets and messages (v4 and v5)."""

from __future__ import annotations

import struct

import pytest

from eemini.guest.quote_layout import BodyType
from eemini.tdx.errors import QuoteParseError
from eemini.tdx.quote import parse_quote
from tdx_builder import build_quote, make_chain

CHAIN = make_chain()
V4 = build_quote(CHAIN)
V5 = build_quote(CHAIN, version=5)
SIG4 = 48 + 584  # offset of the signature data size in a v4 quote
SIG5 = 48 + 6 + 648


def _put(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_v4_and_v5_fields() -> None:
    q4, q5 = parse_quote(V4), parse_quote(V5)
    assert (q4.header.version, q4.body_type, q4.report.is_tdx15) == (4, BodyType.TD_REPORT_10, False)
    assert (q5.header.version, q5.body_type, q5.report.is_tdx15) == (5, BodyType.TD_REPORT_15, True)
    assert q4.report.mr_td == q5.report.mr_td == b"\x7d" * 48
    assert q4.report.rtmrs == (b"\x10" * 48, b"\x11" * 48, b"\x12" * 48, b"\x13" * 48)
    assert q5.report.tee_tcb_svn2 == bytes(16) and q5.report.mr_servicetd == bytes(48)
    assert q4.signed_data == V4[:SIG4] and q5.signed_data == V5[:SIG5]
    assert (q4.length, q4.trailing) == (len(V4), 0)
    cert = q4.signature_data.certification
    assert cert.qe_report.isv_prod_id == 2 and cert.qe_report.isv_svn == 4
    assert cert.qe_auth_data == bytes(range(32))
    assert cert.pck_chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def test_trailing_padding_is_tolerated() -> None:
    q = parse_quote(V4 + bytes(70))
    assert (q.length, q.trailing) == (len(V4), 70)


TRUNC = "(quote truncated)"
CORRUPT: list[tuple[str, bytes, str]] = [
    ("empty", b"", f"header at offset 0: expected 48 bytes, found 0 {TRUNC}"),
    ("version", _put(V4, 0, struct.pack("<H", 3)),
     "header.version at offset 0: expected 4 or 5 (TDX quote), found 3"),
    ("key-type", _put(V4, 2, struct.pack("<H", 3)),
     "header.attestation_key_type at offset 2: expected 2 (ECDSA_P256), found 3 (ECDSA_P384)"),
    ("tee-type", _put(V4, 4, struct.pack("<I", 0)),
     "header.tee_type at offset 4: expected 0x00000081 (TDX), found 0x00000000"),
    ("truncated-body", V4[:100], f"td_report.mr_seam at offset 64: expected 48 bytes, found 36 {TRUNC}"),
    ("truncated-size", V4[: SIG4 + 2],
     f"signature_data.size at offset {SIG4}: expected 4 bytes, found 2 {TRUNC}"),
    ("sig-overrun", V4[:-1],
     f"signature_data.size at offset {SIG4}: expected at most {len(V4) - SIG4 - 5} (bytes left), "
     f"found {len(V4) - SIG4 - 4}"),
    ("v5-body-type", _put(V5, 48, struct.pack("<H", 4)),
     "body.type at offset 48: expected 2 (TD_REPORT_10) or 3 (TD_REPORT_15), found 4 (unknown)"),
    ("v5-body-size", _put(V5, 50, struct.pack("<I", 584)),
     "body.size at offset 50: expected 648 for body type TD_REPORT_15, found 584"),
    ("cert-type", _put(V4, SIG4 + 4 + 128, struct.pack("<H", 5)),
     f"certification_data.type at offset {SIG4 + 132}: expected 6 (QE_REPORT_CERTIFICATION_DATA), "
     "found 5 (PCK_CERT_CHAIN)"),
    ("pck-cert-type", _put(V4, SIG4 + 4 + 134 + 384 + 64 + 2 + 32, struct.pack("<H", 3)),
     f"pck_certification_data.type at offset {SIG4 + 4 + 134 + 482}: expected 5 (PCK_CERT_CHAIN), "
     "found 3 (PPID_RSA3072_OAEP)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "message"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_quotes(name: str, data: bytes, message: str) -> None:
    with pytest.raises(QuoteParseError) as e:
        parse_quote(data)
    assert str(e.value) == message


def test_inconsistent_inner_sizes() -> None:
    # The PCK chain size must fill the certification data exactly.
    at = SIG4 + 4 + 134 + 384 + 64 + 2 + 32 + 2
    (size,) = struct.unpack_from("<I", V4, at)
    with pytest.raises(QuoteParseError) as e:
        parse_quote(_put(V4, at, struct.pack("<I", size - 1)))
    assert str(e.value) == (
        f"pck_certification_data.size at offset {at}: expected {size} (the rest of certification data), "
        f"found {size - 1}"
    )
    # A signature data size larger than its contents (with padding after the quote to make room).
    with pytest.raises(QuoteParseError) as e:
        parse_quote(_put(V4, SIG4, struct.pack("<I", len(V4) - SIG4 - 4 + 1)) + b"\0")
    assert str(e.value) == (
        f"signature_data.size at offset {SIG4}: expected {len(V4) - SIG4 - 4} "
        f"(the size of its contents), found {len(V4) - SIG4 - 3}"
    )


def test_parse_requires_bytes() -> None:
    with pytest.raises(TypeError, match=r"^data must be bytes$"):
        parse_quote(bytearray(V4))  # type: ignore[arg-type]
