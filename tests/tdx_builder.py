"""Independent generator of signed TDX quotes for tests: dev root -> PCK -> QE -> attestation key.

Built with `cryptography` straight from the Intel layouts (quote v4/v5, QE report certification
data type 6 wrapping a type 5 PEM chain, the SGX PCK certificate extension), without using
eemini.tdx, so the parser and verifier are checked against a second implementation of the format.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(2034, 1, 1, tzinfo=datetime.UTC)
NOW = int(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp())
SGX_OID = "1.2.840.113741.1.13.1"


def der_tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        rest = part >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return der_tlv(0x06, bytes(out))


def _int(v: int) -> bytes:
    raw = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return der_tlv(0x02, raw)


def _pair(oid: str, value: bytes) -> bytes:
    return der_tlv(0x30, _oid(oid) + value)


def sgx_extension(fmspc: bytes, components: tuple[int, ...], pce_svn: int) -> bytes:
    tcb = b"".join(_pair(f"{SGX_OID}.2.{i + 1}", _int(c)) for i, c in enumerate(components))
    tcb += _pair(f"{SGX_OID}.2.17", _int(pce_svn)) + _pair(
        f"{SGX_OID}.2.18", der_tlv(0x04, bytes(components))
    )
    return der_tlv(
        0x30,
        _pair(f"{SGX_OID}.1", der_tlv(0x04, b"\x11" * 16))
        + _pair(f"{SGX_OID}.2", der_tlv(0x30, tcb))
        + _pair(f"{SGX_OID}.3", der_tlv(0x04, b"\x00\x00"))
        + _pair(f"{SGX_OID}.4", der_tlv(0x04, fmspc))
        + _pair(f"{SGX_OID}.5", der_tlv(0x0A, b"\x00")),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class DevChain:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey | None = None
    ca: x509.Certificate | None = None  # the PCK's issuer when there is an intermediate

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def chain_pem(self) -> bytes:
        middle = (self.ca,) if self.ca is not None else ()
        return _pem(self.pck, *middle, self.root) + b"\0"


def _cert(
    subject: str,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    serial: int,
    ca: bool,
    extra: x509.UnrecognizedExtension | None = None,
    digest: hashes.SHA256 | hashes.SHA384 | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True)
    )
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer_key, digest or hashes.SHA256())


def make_chain(
    fmspc: bytes = bytes.fromhex("00906ed50000"),
    seed: int = 1,
    intermediate: bool = False,
    components: tuple[int, ...] = (1,) * 16,
    pce_svn: int = 11,
    digest: hashes.SHA256 | hashes.SHA384 | None = None,
) -> DevChain:
    """root -> PCK (as the runtime's simulated quotes), or root -> PCK CA -> PCK (as Intel's)."""
    root_key = ec.derive_private_key(1000 + seed, ec.SECP256R1())
    pck_key = ec.derive_private_key(2000 + seed, ec.SECP256R1())
    root = _cert(
        "EasyEnclave Mini development root", None, root_key, root_key, seed, True, digest=digest
    )
    ext = x509.UnrecognizedExtension(
        x509.ObjectIdentifier(SGX_OID), sgx_extension(fmspc, components, pce_svn)
    )
    if not intermediate:
        pck = _cert(
            "EasyEnclave Mini development PCK", root, root_key, pck_key, 100 + seed, False, ext, digest
        )
        return DevChain(root_key, root, pck_key, pck)
    ca_key = ec.derive_private_key(4000 + seed, ec.SECP256R1())
    ca = _cert("EasyEnclave Mini development PCK CA", root, root_key, ca_key, 50 + seed, True)
    pck = _cert("EasyEnclave Mini development PCK", ca, ca_key, pck_key, 100 + seed, False, ext)
    return DevChain(root_key, root, pck_key, pck, ca_key, ca)


TD_REPORT_10_DEFAULTS: dict[str, bytes] = {
    "tee_tcb_svn": bytes.fromhex("03000400000000000000000000000000"),
    "mr_seam": b"\x5a" * 48,
    "mr_signer_seam": b"\0" * 48,
    "seam_attributes": b"\0" * 8,
    "td_attributes": bytes.fromhex("0000001000000000"),  # SEPT_VE_DISABLE
    "xfam": bytes.fromhex("e702060000000000"),
    "mr_td": b"\x7d" * 48,
    "mr_config_id": b"\0" * 48,
    "mr_owner": b"\0" * 48,
    "mr_owner_config": b"\0" * 48,
    "rtmr0": b"\x10" * 48,
    "rtmr1": b"\x11" * 48,
    "rtmr2": b"\x12" * 48,
    "rtmr3": b"\x13" * 48,
    "report_data": bytes(range(64)),
}
TD_REPORT_15_EXTRA: dict[str, bytes] = {"tee_tcb_svn2": b"\0" * 16, "mr_servicetd": b"\0" * 48}


def build_quote(
    chain: DevChain,
    version: int = 4,
    attestation_seed: int = 7,
    qe_report_data_tail: bytes = b"\0" * 32,
    qe_isv_svn: int = 4,
    **fields: bytes,
) -> bytes:
    values = dict(TD_REPORT_10_DEFAULTS)
    if version == 5:
        values |= TD_REPORT_15_EXTRA
    values |= fields
    body = b"".join(values.values())
    header = struct.pack("<HHIHH", version, 2, 0x81, 0, 0)
    header += bytes.fromhex("939a7233f79c4ca9940a0db3957f0607") + b"\0" * 20
    if version == 5:
        header += struct.pack("<HI", 3, len(body))
    att_key = ec.derive_private_key(3000 + attestation_seed, ec.SECP256R1())
    nums = att_key.public_key().public_numbers()
    att_pub = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
    auth = bytes(range(32))
    qe_report_data = hashlib.sha256(att_pub + auth).digest() + qe_report_data_tail
    qe_report = (
        b"\0" * 16  # cpu_svn
        + struct.pack("<I", 0)
        + b"\0" * 28
        + bytes.fromhex("11000000000000000000000000000000")  # attributes: INIT | MODE64BIT
        + b"\x33" * 32  # mr_enclave
        + b"\0" * 32
        + b"\x44" * 32  # mr_signer
        + b"\0" * 96
        + struct.pack("<HH", 2, qe_isv_svn)  # isv_prod_id, isv_svn
        + b"\0" * 60
        + qe_report_data
    )
    assert len(qe_report) == 384
    pem = chain.chain_pem
    inner = struct.pack("<HI", 5, len(pem)) + pem
    cert6 = qe_report + raw_sign(chain.pck_key, qe_report) + struct.pack("<H", len(auth)) + auth + inner
    signed = header + body
    sig_data = raw_sign(att_key, signed) + att_pub + struct.pack("<HI", 6, len(cert6)) + cert6
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: tuple[int, ...]) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(NOT_BEFORE)
        .next_update(NOT_AFTER)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOT_BEFORE).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def tcb_level(
    sgx: int, pce: int, tdx: tuple[int, ...], status: str, advisories: tuple[str, ...] = ()
) -> dict[str, object]:
    level: dict[str, object] = {
        "tcb": {
            "sgxtcbcomponents": [{"svn": sgx} for _ in range(16)],
            "pcesvn": pce,
            "tdxtcbcomponents": [{"svn": t} for t in tdx + (0,) * (16 - len(tdx))],
        },
        "tcbDate": "2024-03-13T00:00:00Z",
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


TCB_SIGNING_KEY = ec.derive_private_key(5000, ec.SECP256R1())
DEFAULT_LEVELS = (
    tcb_level(1, 11, (3, 0, 4), "UpToDate"),
    tcb_level(1, 11, (2, 0, 2), "OutOfDate", ("INTEL-SA-00837",)),
)


def make_collateral(
    chain: DevChain,
    levels: tuple[dict[str, object], ...] = DEFAULT_LEVELS,
    module_identities: list[dict[str, object]] | None = None,
    qe_levels: tuple[tuple[int, str], ...] = ((4, "UpToDate"), (2, "OutOfDate")),
    revoked_by_root: tuple[int, ...] = (),
    revoked_by_ca: tuple[int, ...] = (),
    fmspc: str = "00906ED50000",
) -> str:
    """QuoteCollateralV3 JSON for `chain` (which must have an intermediate CA), signed like Intel's."""
    assert chain.ca is not None and chain.ca_key is not None
    signer_key = TCB_SIGNING_KEY
    signer = _cert(
        "EasyEnclave Mini development TCB signing", chain.root, chain.root_key, signer_key, 77, False
    )
    info: dict[str, object] = {
        "id": "TDX", "version": 3,
        "issueDate": "2024-06-01T00:00:00Z", "nextUpdate": "2030-01-01T00:00:00Z",
        "fmspc": fmspc, "pceId": "0000", "tcbType": 0, "tcbEvaluationDataNumber": 17,
        "tdxModule": {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "ff" * 8},
        "tcbLevels": list(levels),
    }  # fmt: skip
    if module_identities is not None:
        info["tdxModuleIdentities"] = module_identities
    qe: dict[str, object] = {
        "id": "TD_QE", "version": 2,
        "issueDate": "2024-06-01T00:00:00Z", "nextUpdate": "2030-01-01T00:00:00Z",
        "tcbEvaluationDataNumber": 17, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
        "attributes": "11" + "00" * 15, "attributesMask": "FB" + "FF" * 7 + "00" * 8,
        "mrsigner": "44" * 32, "isvprodid": 2,
        "tcbLevels": [{"tcb": {"isvsvn": svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": st}
                      for svn, st in qe_levels],
    }  # fmt: skip
    tcb_text = json.dumps(info, separators=(",", ":"))
    qe_text = json.dumps(qe, separators=(",", ":"))
    signer_chain = _pem(signer, chain.root).decode()
    return json.dumps({
        "pck_crl_issuer_chain": _pem(chain.ca, chain.root).decode(),
        "root_ca_crl": _crl(chain.root, chain.root_key, revoked_by_root).hex(),
        "pck_crl": _crl(chain.ca, chain.ca_key, revoked_by_ca).hex(),
        "tcb_info_issuer_chain": signer_chain,
        "tcb_info": tcb_text,
        "tcb_info_signature": raw_sign(signer_key, tcb_text.encode()).hex(),
        "qe_identity_issuer_chain": signer_chain,
        "qe_identity": qe_text,
        "qe_identity_signature": raw_sign(signer_key, qe_text.encode()).hex(),
    })  # fmt: skip
