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
import threading
from collections.abc import Callable
from functools import cache

from eemini.guest import quote_layout as layout
from eemini.guest.attest import check_quote
from eemini.guest.bootconfig import ConfigError
from eemini.guest.dev import der
from eemini.guest.dev.cmdline import DEV_MARKER, parse_cmdline
from eemini.guest.dev.p256 import PrivateKey, PublicKey, der_signature
from eemini.guest.quote_layout import INTEL_QE_VENDOR_ID, REPORT_DATA_SIZE
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
# Header user data (20 bytes): ours says what it is.
HEADER_USER_DATA = b"EEMINI-SIMULATED".ljust(20, b"\0")
# TD attributes: TUD.DEBUG, and SEPT_VE_DISABLE, which Linux TD guests require, so every real TD
# quote has it.
TD_ATTRIBUTES = layout.TD_ATTR_DEBUG | layout.TD_ATTR_SEPT_VE_DISABLE
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


def _fields(table: tuple[tuple[str, int], ...], values: dict[str, bytes]) -> bytes:
    """`values` laid out as one of the layout's (field, width) tables describes."""
    assert [name for name, _ in table] == list(values), "fields out of the layout's order"
    assert all(len(values[name]) == width for name, width in table), "a field of the wrong width"
    return b"".join(values.values())


def _header() -> bytes:
    return layout.HEADER_STRUCT.pack(
        QUOTE_VERSION,
        layout.AttestationKeyType.ECDSA_P256,
        layout.TeeType.TDX,
        0,  # reserved in TDX quotes (QE SVN in SGX quotes)
        0,  # reserved in TDX quotes (PCE SVN in SGX quotes)
        INTEL_QE_VENDOR_ID,
        HEADER_USER_DATA,
    )


def td_report_body(m: Measurements, report_data: bytes) -> bytes:
    """TDX 1.0 TD report body (584 bytes) as quotes v4 carry it."""
    rtmrs = {f"rtmr{i}": rtmr for i, rtmr in enumerate(m.rtmrs)}
    return _fields(
        layout.TD_REPORT_10_FIELDS,
        {
            "tee_tcb_svn": bytes([3, 0, 5, 0]) + bytes(12),
            "mr_seam": _sha384("eemini simulated TDX module"),
            "mr_signer_seam": bytes(48),  # zero for Intel's TDX module
            "seam_attributes": bytes(8),
            "td_attributes": TD_ATTRIBUTES.to_bytes(8, "little"),
            "xfam": XFAM.to_bytes(8, "little"),
            "mr_td": m.mr_td,
            "mr_config_id": m.mr_config_id,
            "mr_owner": m.mr_owner,
            "mr_owner_config": m.mr_owner_config,
            **rtmrs,
            "report_data": report_data,
        },
    )


def _certification(kind: layout.CertificationDataType, data: bytes) -> bytes:
    return layout.CERTIFICATION_HEADER_STRUCT.pack(kind, len(data)) + data


@cache
def _qe_certification_data() -> bytes:
    """Certification data type 6, the same for every quote of this process (signed once)."""
    chain = dev_chain()
    # Intel SGX DCAP: the QE report's report data binds the attestation key:
    # SHA-256(attestation public key || QE authentication data) || 32 zero bytes.
    qe_report_data = hashlib.sha256(chain.attestation_pub.raw() + QE_AUTH_DATA).digest() + bytes(32)
    qe_report = _fields(
        layout.ENCLAVE_REPORT_FIELDS,
        {
            "cpu_svn": DEV_TCB_COMPONENTS,
            "misc_select": bytes(4),
            "reserved1": bytes(28),
            "attributes": bytes.fromhex("15000000000000000700000000000000"),  # INIT|MODE64BIT|...
            "mr_enclave": _sha384("eemini simulated QE MRENCLAVE")[:32],
            "reserved2": bytes(32),
            "mr_signer": _sha384("eemini simulated QE MRSIGNER")[:32],
            "reserved3": bytes(96),
            "isv_prod_id": (2).to_bytes(2, "little"),  # the TDQE
            "isv_svn": (4).to_bytes(2, "little"),
            "reserved4": bytes(60),
            "report_data": qe_report_data,
        },
    )
    qe_report_sig = chain.pck_key.sign(qe_report)
    auth = len(QE_AUTH_DATA).to_bytes(layout.QE_AUTH_DATA_LEN_SIZE, "little") + QE_AUTH_DATA
    pck_chain = _certification(layout.CertificationDataType.PCK_CERT_CHAIN, chain.pem_chain)
    return _certification(
        layout.CertificationDataType.QE_REPORT_CERTIFICATION_DATA,
        qe_report + qe_report_sig + auth + pck_chain,
    )


def make_quote(report_data: bytes, measurements: Measurements = Measurements()) -> bytes:
    """A signed TDX quote v4 whose report data is `report_data` (exactly 64 bytes)."""
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    chain = dev_chain()
    signed = _header() + td_report_body(measurements, report_data)
    signature = chain.attestation_key.sign(signed)
    sig_data = signature + chain.attestation_pub.raw() + _qe_certification_data()
    return signed + len(sig_data).to_bytes(layout.SIGNATURE_DATA_LEN_SIZE, "little") + sig_data


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


def boot(cmdline_text: str, log: Callable[[str], None]) -> tuple[SimulatedBackend, RuntimeMeasurer]:
    """PID 1's attestation step in a local-dev image; ConfigError when the cmdline cannot be one.

    Both must say so: image.json (in the initramfs) and the measured cmdline marker, so a
    simulated image can never pass for a production one.
    """
    if not parse_cmdline(cmdline_text).has(*DEV_MARKER):
        raise ConfigError("image.json asks for simulated attestation but the cmdline lacks ee.dev=1")
    log("attestation: simulated (local-dev image; quotes are signed by a development key)")
    backend = SimulatedBackend()
    return backend, backend.rtmr3_measurer()
