"""The simulated backend's quotes, checked by independent code (cryptography, dcap-qvl)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from eemini.guest.attest import check_quote
from eemini.guest.dev import der
from eemini.guest.dev.p256 import N, PrivateKey, PublicKey, _hmac_sha256
from eemini.guest.dev.simulated import (
    DEV_FMSPC,
    DEV_PCESVN,
    DEV_PPID,
    DEV_TCB_COMPONENTS,
    QE_AUTH_DATA,
    Measurements,
    SimulatedBackend,
    dev_chain,
    dev_root_pem,
    make_quote,
)
from eemini.guest.quote_layout import INTEL_QE_VENDOR_ID

REPORT_DATA = bytes(range(64))


def verify_raw(pub: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
    der_sig = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    pub.verify(der_sig, message, ec.ECDSA(hashes.SHA256()))


def raw_pub(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


# RFC 6979 appendix A.2.5 (ECDSA, 256 bits (prime field), SHA-256).
RFC6979_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721


@pytest.mark.parametrize(
    ("message", "r", "s"),
    [
        (
            b"sample",
            "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716",
            "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8",
        ),
        (
            b"test",
            "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367",
            "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083",
        ),
    ],
)
def test_rfc6979_vectors(message: bytes, r: str, s: str) -> None:
    key = PrivateKey(RFC6979_KEY)
    pub = key.public_key()
    assert pub.x == 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
    assert pub.y == 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
    signature = key.sign(message)
    assert signature.hex().upper() == r + s
    assert pub.verify(message, signature)
    assert not pub.verify(message + b"!", signature)


@pytest.mark.parametrize("key_len", [0, 4, 32, 64, 65, 131])
def test_hmac_sha256_is_rfc2104_hmac(key_len: int) -> None:
    # p256 builds HMAC on hashlib (the hmac module costs guest boot time): the same bytes, for
    # keys shorter than, equal to and longer than the 64-byte block.
    key = bytes(range(key_len))
    for message in (b"", b"Hi There", bytes(range(256)) * 3):
        assert _hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()
    # RFC 4231 4.3, test case 2.
    assert _hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_p256_signatures_verify_with_cryptography() -> None:
    for seed in (b"a", b"b", b"c"):
        key = PrivateKey.from_seed(seed)
        signature = key.sign(b"message " + seed)
        verify_raw(raw_pub(key.public_key().raw()), signature, b"message " + seed)
        ref = ec.derive_private_key(key.d, ec.SECP256R1()).public_key().public_numbers()
        assert (ref.x, ref.y) == (key.public_key().x, key.public_key().y)


def test_p256_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"not a point on P-256"):
        PublicKey(1, 1)
    with pytest.raises(ValueError, match=r"out of range"):
        PrivateKey(N)
    with pytest.raises(ValueError, match=r"must be 64 bytes, got 3"):
        PublicKey.from_raw(b"abc")


def test_der_integers() -> None:
    assert der.integer(0) == b"\x02\x01\x00"
    assert der.integer(127) == b"\x02\x01\x7f"
    assert der.integer(128) == b"\x02\x02\x00\x80"
    assert der.integer(256) == b"\x02\x02\x01\x00"
    assert der.oid("1.2.840.113741.1.13.1") == bytes.fromhex("06092a864886f84d010d01")


def parse(quote: bytes) -> dict[str, bytes | int]:
    """Independent walk over the v4 layout (Intel TDX DCAP quote format, appendix)."""
    fields: dict[str, bytes | int] = {}
    version, key_type, tee_type, r1, r2 = struct.unpack_from("<HHIHH", quote, 0)
    fields.update(version=version, key_type=key_type, tee_type=tee_type, reserved=r1 | r2)
    fields["qe_vendor_id"] = quote[12:28]
    fields["signed"] = quote[: 48 + 584]
    body = quote[48 : 48 + 584]
    fields["td_attributes"] = struct.unpack_from("<Q", body, 16 + 48 + 48 + 8)[0]
    fields["mr_td"] = body[136:184]
    fields["rtmr3"] = body[520 - 48 : 520]
    fields["report_data"] = body[520:584]
    off = 48 + 584
    (sig_len,) = struct.unpack_from("<I", quote, off)
    sig = quote[off + 4 : off + 4 + sig_len]
    assert len(quote) == off + 4 + sig_len
    fields["signature"], fields["att_key"] = sig[:64], sig[64:128]
    cert_type, cert_size = struct.unpack_from("<HI", sig, 128)
    fields["cert_type"] = cert_type
    cert = sig[134 : 134 + cert_size]
    assert len(cert) == cert_size == len(sig) - 134
    fields["qe_report"], fields["qe_report_sig"] = cert[:384], cert[384:448]
    (auth_len,) = struct.unpack_from("<H", cert, 448)
    fields["qe_auth"] = cert[450 : 450 + auth_len]
    inner_type, inner_size = struct.unpack_from("<HI", cert, 450 + auth_len)
    fields["inner_type"] = inner_type
    fields["pem"] = cert[456 + auth_len : 456 + auth_len + inner_size]
    assert 456 + auth_len + inner_size == len(cert)
    return fields


def test_quote_layout() -> None:
    quote = make_quote(REPORT_DATA)
    f = parse(quote)
    assert (f["version"], f["key_type"], f["tee_type"], f["reserved"]) == (4, 2, 0x81, 0)
    assert f["qe_vendor_id"] == INTEL_QE_VENDOR_ID
    assert f["report_data"] == REPORT_DATA
    assert f["td_attributes"] == 0x10000001  # TUD.DEBUG | SEPT_VE_DISABLE
    assert f["mr_td"] == Measurements().mr_td
    assert (f["cert_type"], f["inner_type"]) == (6, 5)
    assert f["qe_auth"] == QE_AUTH_DATA
    assert f["pem"] == dev_chain().pem_chain
    check_quote(quote, REPORT_DATA)
    assert make_quote(REPORT_DATA) == quote  # deterministic, byte for byte


def test_quote_signatures_and_chain() -> None:
    f = parse(make_quote(REPORT_DATA))
    att_key, qe_report = f["att_key"], f["qe_report"]
    assert isinstance(att_key, bytes) and isinstance(qe_report, bytes)
    # Quote signature: attestation key over header || TD report body.
    verify_raw(raw_pub(att_key), f["signature"], f["signed"])  # type: ignore[arg-type]
    pck, platform, root = x509.load_pem_x509_certificates(f["pem"])  # type: ignore[arg-type]
    # QE report signature: PCK key over the QE report; the QE report binds the attestation key.
    pck_pub = pck.public_key()
    assert isinstance(pck_pub, ec.EllipticCurvePublicKey)
    verify_raw(pck_pub, f["qe_report_sig"], qe_report)  # type: ignore[arg-type]
    assert qe_report[320:384] == hashlib.sha256(att_key + QE_AUTH_DATA).digest() + bytes(32)
    # Chain: PCK <- platform CA <- root (self-signed), the root being the published dev root.
    pck.verify_directly_issued_by(platform)
    platform.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert root == x509.load_pem_x509_certificate(dev_root_pem())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert pck.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert "DEVELOPMENT" in root.subject.rfc4514_string()


def test_tampered_quote_fails_verification() -> None:
    quote = bytearray(make_quote(REPORT_DATA))
    quote[600] ^= 1  # inside the report data
    f = parse(bytes(quote))
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        verify_raw(raw_pub(f["att_key"]), f["signature"], f["signed"])  # type: ignore[arg-type]


def test_dcap_qvl_parses_simulated_quotes() -> None:
    quote = dcap_qvl.parse_quote(make_quote(REPORT_DATA))
    assert quote.is_tdx()
    assert quote.header.version == 4
    assert quote.header.tee_type == 0x81
    assert quote.fmspc() == DEV_FMSPC.hex().upper()
    assert quote.ca() == "platform"
    ext = quote.pck_extension()
    assert ext.ppid == DEV_PPID
    assert ext.cpu_svn == DEV_TCB_COMPONENTS
    assert ext.pce_svn == DEV_PCESVN
    assert ext.fmspc == DEV_FMSPC
    assert ext.sgx_type == 0
    assert bytes(quote.report.report_data) == REPORT_DATA


def test_backend_extends_rtmrs() -> None:
    backend = SimulatedBackend()
    digest = hashlib.sha384(b"event").digest()
    backend.extend_rtmr(3, digest)
    expected = hashlib.sha384(bytes(48) + digest).digest()
    assert parse(backend.quote(REPORT_DATA))["rtmr3"] == expected
    with pytest.raises(ValueError, match=r"RTMR index must be 0..3"):
        backend.extend_rtmr(4, digest)


def test_the_project_verifier_accepts_them_only_with_the_dev_root(tmp_path: Path) -> None:
    quote, root, policy = tmp_path / "quote.bin", tmp_path / "root.pem", tmp_path / "policy.json"
    quote.write_bytes(make_quote(REPORT_DATA))
    root.write_bytes(dev_root_pem())
    policy.write_text(json.dumps({"allow_debug": True, "require_collateral": False}))
    argv = [sys.executable, "-m", "eemini", "verify", os.fspath(quote), "--policy", os.fspath(policy)]
    argv += ["--report-data", REPORT_DATA.hex()]
    untrusted = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert untrusted.returncode == 1
    assert "is not a trusted root" in untrusted.stderr
    trusted = subprocess.run(
        [*argv, "--trust-dev-root", os.fspath(root), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert trusted.returncode == 0, trusted.stderr
    result = json.loads(trusted.stdout)
    assert result["verified"] is True
    assert result["attributes"]["debug"] is True


def test_rtmr3_follows_the_runtime_event_log() -> None:
    from eemini.guest.bootconfig import Setting
    from eemini.guest.events import boot_log
    from eemini.guest.rtmr import RuntimeMeasurer
    from eemini.tdx.runtime_log import replay

    backend = SimulatedBackend()
    # Wired as dev mode and local-dev images wire it (devmode.run, pid1).
    measurer = RuntimeMeasurer(extend=lambda digest: backend.extend_rtmr(3, digest), via="simulated")
    settings = [Setting("cmdline", "UPSTREAM_URL", "http://x")]
    log = boot_log(measurer.measure, "image", b"{}", None, settings, sealed_by="pid1")
    assert parse(backend.quote(REPORT_DATA))["rtmr3"] == replay(e.to_dict() for e in log)
