"""The HCL report Azure's paravisor writes to vTPM NV index 0x01400001, and its runtime data.

Layout (little-endian; kinvolk/azure-cvm-tooling `az-cvm-vtpm/src/hcl`, checked against the real
reports in ../shared/testdata/azure):

    offset  size  field
    0       32    header: signature "HCLA" (u32 0x414c4348), version, report size, request type,
                  status, 3 reserved u32
    32      1184  the hardware report slot (the larger of SEV-SNP's 1184 and TDX's 1024 bytes); on TDX
                  the first 1024 bytes are the TDREPORT
    1216    20    IGVM request data: data size, version, report type (4 = TDX, 2 = SEV-SNP), report
                  data hash type (1 = SHA-256), variable data size
    1236    var   the runtime data: a JSON document with `keys` (JWKs HCLAkPub, HCLEkPub),
                  `vm-configuration` and `user-data` (hex of the 64 bytes the guest wrote to NV
                  index 0x01400002)

The TDREPORT (TDX module ABI, TDREPORT_STRUCT) is REPORTMACSTRUCT (256: report type, CPUSVN, the
SHA-384 of TEE_TCB_INFO and of TDINFO, REPORTDATA, the MAC), TEE_TCB_INFO (239), 17 reserved
bytes, TDINFO (512). Its REPORTDATA is SHA-256(runtime data) followed by 32 zero bytes.

Nothing here is signed: the HCL report is carried to the verifier, which checks its TD report
against the signed TD quote and the runtime data against the quote's report data.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eemini.tdx.azure.errors import AzureEvidenceError
from eemini.tdx.errors import QuoteError
from eemini.tdx.guard import unique_keys

HCL_SIGNATURE = 0x414C4348  # "HCLA" read as a little-endian u32
HEADER = struct.Struct("<IIIII12x")
TD_REPORT_OFFSET = 32
TD_REPORT_SIZE = 1024
HW_REPORT_SIZE = 1184
IGVM_OFFSET = TD_REPORT_OFFSET + HW_REPORT_SIZE  # 1216
IGVM = struct.Struct("<IIIII")
RUNTIME_DATA_OFFSET = IGVM_OFFSET + IGVM.size  # 1236
REPORT_TYPE_TDX = 4
REPORT_TYPE_SNP = 2
HASH_TYPE_SHA256 = 1
USER_DATA_SIZE = 64
MIN_AK_BITS = 2048
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Far more than a real runtime-data document (about 1.2 KB); keeps a hostile size from mattering.
MAX_RUNTIME_DATA = 64 * 1024

# TDREPORT_STRUCT (TDX module ABI): offsets inside the 1024 bytes.
TDREPORT_TYPE_TDX = 0x81
MAC_STRUCT_SIZE = 256
TEE_TCB_INFO_OFFSET = 256
TEE_TCB_INFO_SIZE = 239
TDINFO_OFFSET = 512
TDINFO_SIZE = 512


@dataclass(frozen=True, slots=True)
class TdReportStruct:
    """The TDREPORT inside an HCL report. `tee_tcb_info` and `td_info` are the raw structures
    whose SHA-384 the REPORTMACSTRUCT carries; the named fields are read from them."""

    raw: bytes
    report_type: int
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    tee_tcb_info: bytes
    td_info: bytes

    def quote_fields(self) -> dict[str, bytes]:
        """The fields a TD quote's body carries, read from this report (TDX module ABI:
        TEE_TCB_INFO = valid, TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, ATTRIBUTES, TEE_TCB_SVN2 (1.5);
        TDINFO = ATTRIBUTES, XFAM, MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0..3,
        SERVTD_HASH (MR_SERVICETD in a 1.5 quote))."""
        t, d = self.tee_tcb_info, self.td_info
        fields = {
            "tee_tcb_svn": t[8:24],
            "mr_seam": t[24:72],
            "mr_signer_seam": t[72:120],
            "seam_attributes": t[120:128],
            "td_attributes": d[0:8],
            "xfam": d[8:16],
            "mr_td": d[16:64],
            "mr_config_id": d[64:112],
            "mr_owner": d[112:160],
            "mr_owner_config": d[160:208],
        }
        for i in range(4):
            fields[f"rtmr{i}"] = d[208 + 48 * i : 256 + 48 * i]
        fields["report_data"] = self.report_data
        # TDX 1.5 (quote v5, body type 3): TEE_TCB_INFO.TEE_TCB_SVN2 and TDINFO.SERVTD_HASH.
        fields["tee_tcb_svn2"] = t[128:144]
        fields["mr_servicetd"] = d[400:448]
        return fields


@dataclass(frozen=True, slots=True)
class HclReport:
    raw: bytes
    version: int
    report_size: int
    request_type: int
    status: int
    td_report: TdReportStruct
    report_type: int
    hash_type: int
    runtime_data: bytes  # exactly the bytes SHA-256 binds; parse with parse_runtime_data


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])


def parse_td_report(raw: bytes) -> TdReportStruct:
    if len(raw) != TD_REPORT_SIZE:
        raise AzureEvidenceError(f"TD report is {len(raw)} bytes, expected {TD_REPORT_SIZE}")
    if raw[0] != TDREPORT_TYPE_TDX:
        raise AzureEvidenceError(
            f"HCL report: the hardware report's type is {raw[0]:#04x}, expected "
            f"{TDREPORT_TYPE_TDX:#04x} (a TDX TDREPORT)"
        )
    return TdReportStruct(
        raw=raw,
        report_type=raw[0],
        cpu_svn=raw[16:32],
        tee_tcb_info_hash=raw[32:80],
        tee_info_hash=raw[80:128],
        report_data=raw[128:192],
        mac=raw[224:256],
        tee_tcb_info=raw[TEE_TCB_INFO_OFFSET : TEE_TCB_INFO_OFFSET + TEE_TCB_INFO_SIZE],
        td_info=raw[TDINFO_OFFSET : TDINFO_OFFSET + TDINFO_SIZE],
    )


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report (bytes after its runtime data, as NV index reads leave them, are
    ignored); raises AzureEvidenceError naming what is wrong."""
    if len(data) < RUNTIME_DATA_OFFSET:
        raise AzureEvidenceError(
            f"HCL report is {len(data)} bytes, shorter than its fixed part ({RUNTIME_DATA_OFFSET})"
        )
    signature, version, report_size, request_type, status = HEADER.unpack_from(data)
    if signature != HCL_SIGNATURE:
        raise AzureEvidenceError(
            f"HCL report signature is {data[:4]!r}, expected b'HCLA' (not an HCL report)"
        )
    _data_size, _igvm_version, report_type, hash_type, var_size = IGVM.unpack_from(data, IGVM_OFFSET)
    if report_type == REPORT_TYPE_SNP:
        raise AzureEvidenceError(
            "HCL report is an SEV-SNP report (report type 2); only TDX (4) is supported"
        )
    if report_type != REPORT_TYPE_TDX:
        raise AzureEvidenceError(f"HCL report type is {report_type}, expected {REPORT_TYPE_TDX} (TDX)")
    if hash_type != HASH_TYPE_SHA256:
        raise AzureEvidenceError(
            f"HCL report's report-data hash type is {hash_type}, expected {HASH_TYPE_SHA256} (SHA-256)"
        )
    if var_size > MAX_RUNTIME_DATA or RUNTIME_DATA_OFFSET + var_size > len(data):
        raise AzureEvidenceError(
            f"HCL report's runtime data ({var_size} bytes at offset {RUNTIME_DATA_OFFSET}) runs past "
            f"the end of the report ({len(data)} bytes)"
        )
    return HclReport(
        raw=data,
        version=version,
        report_size=report_size,
        request_type=request_type,
        status=status,
        td_report=parse_td_report(data[TD_REPORT_OFFSET : TD_REPORT_OFFSET + TD_REPORT_SIZE]),
        report_type=report_type,
        hash_type=hash_type,
        runtime_data=data[RUNTIME_DATA_OFFSET : RUNTIME_DATA_OFFSET + var_size],
    )


@dataclass(frozen=True, slots=True)
class RsaKey:
    """An RSA public key from a JWK."""

    n: int
    e: int

    @property
    def bits(self) -> int:
        return self.n.bit_length()


@dataclass(frozen=True, slots=True)
class RuntimeData:
    ak: RsaKey  # HCLAkPub: the vTPM's attestation key
    ek: RsaKey | None  # HCLEkPub, when present
    user_data: bytes  # 64 bytes
    vm_configuration: dict[str, Any]
    document: dict[str, Any]


# Two values for one key: parsers disagree on which wins, so the document is ambiguous.
_unique = unique_keys(lambda key: ValueError(f"key {key!r} appears twice in one object"))


def b64url_int(text: object, what: str) -> int:
    """A JWK integer (RFC 7518: base64url, unpadded, big-endian); ValueError naming `what`."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} is not a base64url string")
    if "=" in text or not text.isascii():
        raise ValueError(f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text:
        raise ValueError(f"{what} is not canonical base64url")
    return int.from_bytes(raw, "big")


def _rsa_jwk(jwk: dict[str, Any], kid: str) -> RsaKey:
    if jwk.get("kty") != "RSA":
        raise ValueError(f"{kid} is not an RSA key (kty {jwk.get('kty')!r})")
    key = RsaKey(n=b64url_int(jwk.get("n"), f"{kid}.n"), e=b64url_int(jwk.get("e"), f"{kid}.e"))
    if key.bits < MIN_AK_BITS:
        raise ValueError(f"{kid} is a {key.bits}-bit RSA key; at least {MIN_AK_BITS} bits are required")
    if key.e < 3 or key.e % 2 == 0:
        raise ValueError(f"{kid} has the invalid RSA exponent {key.e}")
    return key


def parse_runtime_data(
    raw: bytes, error: Callable[[str], QuoteError] = AzureEvidenceError
) -> RuntimeData:
    """The runtime-data JSON: exactly one HCLAkPub (RSA, >= 2048 bits), a `user-data` of 128 hex
    digits (case-insensitive), no key twice in any object. Raises `error(...)` naming the problem."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except RecursionError:
        raise error("the runtime data is nested too deeply to be Azure's JSON") from None
    except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
        raise error(f"the runtime data is not JSON: {e}") from None
    try:
        if not isinstance(doc, dict):
            raise ValueError("it is not a JSON object")
        keys = doc.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise ValueError("`keys` is not a list of JWKs")
        aks = [k for k in keys if k.get("kid") == "HCLAkPub"]
        if len(aks) != 1:
            raise ValueError(f"`keys` holds {len(aks)} keys with kid HCLAkPub, expected exactly one")
        eks = [k for k in keys if k.get("kid") == "HCLEkPub"]
        if len(eks) > 1:
            raise ValueError(f"`keys` holds {len(eks)} keys with kid HCLEkPub")
        ak = _rsa_jwk(aks[0], "HCLAkPub")
        ek = _rsa_jwk(eks[0], "HCLEkPub") if eks else None
        text = doc.get("user-data")
        if (
            not isinstance(text, str)
            or len(text) != 2 * USER_DATA_SIZE
            or not all(c in _HEX_DIGITS for c in text)
        ):
            raise ValueError(f"`user-data` is not {2 * USER_DATA_SIZE} hex digits")
        user_data = bytes.fromhex(text)
        config = doc.get("vm-configuration", {})
        if not isinstance(config, dict):
            raise ValueError("`vm-configuration` is not an object")
    except ValueError as e:
        raise error(f"the runtime data is not Azure's runtime-data document: {e}") from None
    return RuntimeData(ak=ak, ek=ek, user_data=user_data, vm_configuration=config, document=doc)
