"""The simulated attestation backend: TDX quotes v4, byte for byte, signed by a development chain.

Used in dev mode and in `local-dev` images (never imported by production images). The quote has
the layout of Intel's "TDX DCAP Quote Generation Library and Quote Verification Library" appendix
(quote format v4): header, TD report body (TDX 1.0), then ECDSA quote signature data whose
certification data (type 6) wraps a QE report, its signature, QE authentication data and a type 5
PEM chain PCK -> platform CA -> root. So a verifier walks exactly the path it walks for a real
quote; what differs is the root, which is ours, and the TD DEBUG attribute, which is set.

The development keys come from fixed, published seeds (`DEV_SEEDS`): anyone can sign with them,
which is the point. No default verifier trusts the development root; trust it only when told to
(`eemini dev` writes it out as a PEM file for that).
"""

from __future__ import annotations

import binascii
import hashlib
import struct
import threading
from functools import cache

from eemini.guest.attest import REPORT_DATA_SIZE, check_quote
from eemini.guest.dev import der
from eemini.guest.dev.p256 import PrivateKey, PublicKey, der_signature
from eemini.guest.record import record
from eemini.guest.rtmr import RuntimeMeasurer

# Public on purpose: these seeds *are* the development keys.
DEV_SEEDS = {
    "root": b"easyenclave-mini development root CA key v1",
    "platform": b"easyenclave-mini development PCK platform CA key v1",
    "pck": b"easyenclave-mini development PCK leaf key v1",
    "attestation": b"easyenclave-mini development attestation key v1",
}

QUOTE_VERSION = 4
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x00000081
# Intel's QE vendor id (the TDQE), as in every DCAP quote.
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# Header user data (20 bytes): ours says what it is.
HEADER_USER_DATA = b"EEMINI-SIMULATED".ljust(20, b"\0")
HEADER_SIZE = 2 + 2 + 4 + 2 + 2 + 16 + 20
TD_REPORT_SIZE = 16 + 48 + 48 + 8 + 8 + 8 + 48 + 48 + 48 + 48 + 4 * 48 + 64
SGX_REPORT_SIZE = 16 + 4 + 28 + 16 + 32 + 32 + 32 + 96 + 2 + 2 + 60 + 64
CERT_DATA_QE_REPORT = 6  # QE report certification data
CERT_DATA_PCK_CHAIN = 5  # PCK leaf || intermediate || root, PEM
assert HEADER_SIZE == 48 and TD_REPORT_SIZE == 584 and SGX_REPORT_SIZE == 384

# TD attributes (Intel TDX module ABI, TDINFO_STRUCT ATTRIBUTES): bit 0 is TUD.DEBUG; bit 28 is
# SEPT_VE_DISABLE, which Linux TD guests require, so every real TD quote has it.
TD_ATTRIBUTES_DEBUG = 1 << 0
TD_ATTRIBUTES_SEPT_VE_DISABLE = 1 << 28
XFAM = 0x00000000000618E7  # x87, SSE, AVX, AVX-512, PK, ... (a common TD value)

# PCK certificate: Intel SGX PCK Certificate and CRL Profile, "SGX Extensions".
SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
DEV_FMSPC = bytes.fromhex("00EE00000000")  # not a real platform family
DEV_PCE_ID = bytes.fromhex("0000")
DEV_PCESVN = 13
DEV_TCB_COMPONENTS = bytes([7, 7, 2, 2, 2, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0])
DEV_PPID = hashlib.sha256(b"easyenclave-mini development PPID v1").digest()[:16]
QE_AUTH_DATA = bytes(range(32))
NOT_BEFORE = "250101000000Z"
NOT_AFTER = "491231235959Z"


def _sha384(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


@record
class Measurements:
    """What the simulated TD report claims; all 48-byte SHA-384 sized values."""

    mr_td: bytes = _sha384("eemini simulated MRTD")
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48), bytes(48), bytes(48), bytes(48))


# -- X.509 --------------------------------------------------------------------------------------


def _name(common_name: str) -> bytes:
    def rdn(type_oid: str, value: str) -> bytes:
        return der.set_of(der.sequence(der.oid(type_oid), der.utf8_string(value)))

    return der.sequence(
        rdn("2.5.4.3", common_name),
        rdn("2.5.4.10", "EasyEnclave Mini development (NOT TRUSTED)"),
    )


def _spki(pub: PublicKey) -> bytes:
    algorithm = der.sequence(der.oid("1.2.840.10045.2.1"), der.oid("1.2.840.10045.3.1.7"))
    return der.sequence(algorithm, der.bit_string(pub.sec1()))


def _key_id(pub: PublicKey) -> bytes:
    # RFC 5280 section 4.2.1.2, method (1): SHA-1 of the subjectPublicKey bits.
    return hashlib.sha1(pub.sec1(), usedforsecurity=False).digest()


def _extension(ext_oid: str, value: bytes, critical: bool = False) -> bytes:
    parts = [der.oid(ext_oid)]
    if critical:
        parts.append(der.boolean(True))
    parts.append(der.octet_string(value))
    return der.sequence(*parts)


def _sgx_extensions() -> bytes:
    base = SGX_EXTENSIONS_OID

    def item(sub: str, value: bytes) -> bytes:
        return der.sequence(der.oid(f"{base}.{sub}"), value)

    tcb = [item(f"2.{i + 1}", der.integer(svn)) for i, svn in enumerate(DEV_TCB_COMPONENTS)]
    tcb.append(item("2.17", der.integer(DEV_PCESVN)))
    tcb.append(item("2.18", der.octet_string(DEV_TCB_COMPONENTS)))
    return der.sequence(
        item("1", der.octet_string(DEV_PPID)),
        item("2", der.sequence(*tcb)),
        item("3", der.octet_string(DEV_PCE_ID)),
        item("4", der.octet_string(DEV_FMSPC)),
        item("5", der.enumerated(0)),  # SGX type: Standard
    )


def _certificate(  # noqa: PLR0917
    serial: int,
    subject: str,
    subject_key: PublicKey,
    issuer: str,
    issuer_key: PrivateKey,
    issuer_pub: PublicKey,
    *,
    ca: bool,
    path_len: int | None = None,
    extra: tuple[bytes, ...] = (),
) -> bytes:
    ecdsa_sha256 = der.sequence(der.oid("1.2.840.10045.4.3.2"))
    basic = [der.boolean(True)] if ca else []
    if path_len is not None:
        basic.append(der.integer(path_len))
    # keyUsage: keyCertSign|cRLSign for CAs, digitalSignature|nonRepudiation for the PCK leaf.
    usage = der.bit_string(b"\x06", 1) if ca else der.bit_string(b"\xc0", 6)
    extensions = [
        _extension("2.5.29.35", der.sequence(der.tlv(0x80, _key_id(issuer_pub)))),
        _extension("2.5.29.14", der.octet_string(_key_id(subject_key))),
        _extension("2.5.29.15", usage, critical=True),
        _extension("2.5.29.19", der.sequence(*basic), critical=True),
        *extra,
    ]
    tbs = der.sequence(
        der.explicit(0, der.integer(2)),  # v3
        der.integer(serial),
        ecdsa_sha256,
        _name(issuer),
        der.sequence(der.utc_time(NOT_BEFORE), der.utc_time(NOT_AFTER)),
        _name(subject),
        _spki(subject_key),
        der.explicit(3, der.sequence(*extensions)),
    )
    signature = der_signature(issuer_key.sign(tbs))
    return der.sequence(tbs, ecdsa_sha256, der.bit_string(signature))


def pem(der_bytes: bytes) -> bytes:
    body = binascii.b2a_base64(der_bytes, newline=False)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


@record
class DevChain:
    """The development keys and certificates (DER), built once per process."""

    root_key: PrivateKey
    platform_key: PrivateKey
    pck_key: PrivateKey
    attestation_key: PrivateKey
    attestation_pub: PublicKey
    root_cert: bytes
    platform_cert: bytes
    pck_cert: bytes

    @property
    def pem_chain(self) -> bytes:
        """PCK leaf, then the platform CA, then the root: the order DCAP quotes carry them."""
        return pem(self.pck_cert) + pem(self.platform_cert) + pem(self.root_cert)


@cache
def dev_chain() -> DevChain:
    root = PrivateKey.from_seed(DEV_SEEDS["root"])
    platform = PrivateKey.from_seed(DEV_SEEDS["platform"])
    pck = PrivateKey.from_seed(DEV_SEEDS["pck"])
    att = PrivateKey.from_seed(DEV_SEEDS["attestation"])
    root_pub, platform_pub, pck_pub = root.public_key(), platform.public_key(), pck.public_key()
    root_name = "EasyEnclave Mini DEVELOPMENT Root CA"
    platform_name = "EasyEnclave Mini DEVELOPMENT SGX PCK Platform CA"
    root_cert = _certificate(1, root_name, root_pub, root_name, root, root_pub, ca=True)
    platform_cert = _certificate(
        2, platform_name, platform_pub, root_name, root, root_pub, ca=True, path_len=0
    )
    sgx = _extension(SGX_EXTENSIONS_OID, _sgx_extensions())
    pck_cert = _certificate(
        3,
        "EasyEnclave Mini DEVELOPMENT SGX PCK Certificate",
        pck_pub,
        platform_name,
        platform,
        platform_pub,
        ca=False,
        extra=(sgx,),
    )
    return DevChain(root, platform, pck, att, att.public_key(), root_cert, platform_cert, pck_cert)


def dev_root_pem() -> bytes:
    """The development root certificate, PEM: give it to a verifier only on purpose."""
    return pem(dev_chain().root_cert)


# -- the quote ----------------------------------------------------------------------------------


def _header() -> bytes:
    header = struct.pack(
        "<HHIHH16s20s",
        QUOTE_VERSION,
        ATT_KEY_TYPE_ECDSA_P256,
        TEE_TYPE_TDX,
        0,  # reserved in TDX quotes (QE SVN in SGX quotes)
        0,  # reserved in TDX quotes (PCE SVN in SGX quotes)
        INTEL_QE_VENDOR_ID,
        HEADER_USER_DATA,
    )
    assert len(header) == HEADER_SIZE
    return header


def td_report_body(m: Measurements, report_data: bytes) -> bytes:
    """TDX 1.0 TD report body (584 bytes) as quotes v4 carry it."""
    body = b"".join(
        [
            bytes([3, 0, 5, 0]) + bytes(12),  # TEE_TCB_SVN
            _sha384("eemini simulated TDX module"),  # MRSEAM
            bytes(48),  # MRSIGNERSEAM (zero for Intel's TDX module)
            struct.pack("<Q", 0),  # SEAMATTRIBUTES
            struct.pack("<Q", TD_ATTRIBUTES_DEBUG | TD_ATTRIBUTES_SEPT_VE_DISABLE),  # TDATTRIBUTES
            struct.pack("<Q", XFAM),
            m.mr_td,
            m.mr_config_id,
            m.mr_owner,
            m.mr_owner_config,
            *m.rtmrs,
            report_data,
        ]
    )
    assert len(body) == TD_REPORT_SIZE
    return body


@cache
def _qe_certification_data() -> bytes:
    """Certification data type 6, the same for every quote of this process (signed once)."""
    chain = dev_chain()
    # Intel SGX DCAP: the QE report's report data binds the attestation key:
    # SHA-256(attestation public key || QE authentication data) || 32 zero bytes.
    qe_report_data = hashlib.sha256(chain.attestation_pub.raw() + QE_AUTH_DATA).digest() + bytes(32)
    qe_report = b"".join(
        [
            DEV_TCB_COMPONENTS,  # CPUSVN
            struct.pack("<I", 0),  # MISCSELECT
            bytes(28),
            bytes.fromhex("15000000000000000700000000000000"),  # ATTRIBUTES: INIT|MODE64BIT|...
            _sha384("eemini simulated QE MRENCLAVE")[:32],
            bytes(32),
            _sha384("eemini simulated QE MRSIGNER")[:32],
            bytes(96),
            struct.pack("<HH", 2, 4),  # ISVPRODID 2 (TDQE), ISVSVN
            bytes(60),
            qe_report_data,
        ]
    )
    assert len(qe_report) == SGX_REPORT_SIZE
    qe_report_sig = chain.pck_key.sign(qe_report)
    pck_chain = chain.pem_chain
    inner = struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pck_chain)) + pck_chain
    data = qe_report + qe_report_sig + struct.pack("<H", len(QE_AUTH_DATA)) + QE_AUTH_DATA + inner
    return struct.pack("<HI", CERT_DATA_QE_REPORT, len(data)) + data


def make_quote(report_data: bytes, measurements: Measurements = Measurements()) -> bytes:
    """A signed TDX quote v4 whose report data is `report_data` (exactly 64 bytes)."""
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    chain = dev_chain()
    signed = _header() + td_report_body(measurements, report_data)
    signature = chain.attestation_key.sign(signed)
    sig_data = signature + chain.attestation_pub.raw() + _qe_certification_data()
    return signed + struct.pack("<I", len(sig_data)) + sig_data


class SimulatedBackend:
    """A `Backend` that signs quotes with the development chain; RTMRs can be extended."""

    attestation_type = "simulated"

    def __init__(self, measurements: Measurements = Measurements()) -> None:
        self._lock = threading.Lock()
        self._m = measurements

    @property
    def measurements(self) -> Measurements:
        return self._m

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """RTMR[index] = SHA-384(RTMR[index] || digest), as TDG.MR.RTMR.EXTEND does."""
        if not 0 <= index < 4 or len(digest) != 48:
            raise ValueError("RTMR index must be 0..3 and the digest 48 bytes")
        with self._lock:
            rtmrs = list(self._m.rtmrs)
            rtmrs[index] = hashlib.sha384(rtmrs[index] + digest).digest()
            self._m = Measurements(
                self._m.mr_td,
                self._m.mr_config_id,
                self._m.mr_owner,
                self._m.mr_owner_config,
                (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]),
            )

    def rtmr3_measurer(self) -> RuntimeMeasurer:
        """Extends this TD's RTMR3 with the runtime log, as a Linux 6.16+ TD's is extended."""
        return RuntimeMeasurer(extend=lambda digest: self.extend_rtmr(3, digest), via="simulated")

    def quote(self, report_data: bytes) -> bytes:
        with self._lock:
            quote = make_quote(report_data, self._m)
        check_quote(quote, report_data)
        return quote
