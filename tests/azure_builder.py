"""Independent builder of Azure vTPM evidence for tests: an HCL report around a TDREPORT whose
report data binds a runtime-data JSON, the TD quote of that report (signed by the tests' dev chain,
tests/tdx_builder.py), a TPMS_ATTEST quote signed RSASSA-SHA256 by an attestation key, and the
PCR values a TPM event log replays to.

Written from the layouts (TDX module ABI TDREPORT_STRUCT; kinvolk/azure-cvm-tooling's HCL report;
TCG TPM 2.0 Part 2 TPMS_ATTEST; the PC Client log format), without eemini.tdx, so the verifier is
checked against a second implementation. The fake paravisor and the fake IMDS quote service use
it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tdx_builder import TD_REPORT_10_DEFAULTS, DevChain, build_quote

# A fake paravisor MRTD (tests only): not Microsoft's.
FAKE_PARAVISOR_MRTD = bytes.fromhex("a2" * 48)
HCL_NV_SIZE = 2600  # the size of NV index 0x01400001 on Azure (both real reports)
# The checks verify_azure passes, in order: the TD quote's (as for any TDX quote), then Azure's.
DCAP_CHECKS = [
    "pck-chain", "qe-report-signature", "qe-report-data", "quote-signature", "crls", "tcb-info",
    "qe-identity-collateral", "revocation", "tcb-evaluation", "debug", "td-attributes",
    "mr-servicetd", "mr-td", "tcb-status",
]  # fmt: skip
AZURE_CHECKS = [
    "hcl-td-report", "runtime-data", "user-data", "vtpm-quote-signature", "vtpm-quote", "vtpm-nonce",
    "vtpm-pcrs",
]  # fmt: skip


def b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk(kid: str, key: rsa.RSAPublicKey, ops: str) -> dict[str, Any]:
    nums = key.public_numbers()
    return {"kid": kid, "key_ops": [ops], "kty": "RSA", "e": b64url(nums.e), "n": b64url(nums.n)}


def runtime_data(ak: rsa.RSAPublicKey, user_data: bytes, ek: rsa.RSAPublicKey | None = None) -> bytes:
    """Compact JSON as Azure writes it; user-data in upper-case hex (the verifier must not care)."""
    keys = [jwk("HCLAkPub", ak, "sign")]
    if ek is not None:
        keys.append(jwk("HCLEkPub", ek, "encrypt"))
    doc = {
        "keys": keys,
        "vm-configuration": {
            "console-enabled": True, "secure-boot": False, "tpm-enabled": True,
            "tpm-persisted": False, "vmUniqueId": "00000000-0000-4000-8000-000000000001",
        },
        "user-data": user_data.hex().upper(),
    }  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


TD_FIELDS = {
    **TD_REPORT_10_DEFAULTS,
    "td_attributes": bytes(8),  # the paravisor's TD: no SEPT_VE_DISABLE, as on Azure
    "mr_td": FAKE_PARAVISOR_MRTD,
    "rtmr0": bytes(48), "rtmr1": bytes(48), "rtmr2": bytes(48), "rtmr3": bytes(48),
    "tee_tcb_svn2": bytes(16), "mr_servicetd": bytes(48),  # TDX 1.5 (quote v5)
}  # fmt: skip


def td_report(report_data: bytes, **fields: bytes) -> bytes:
    """A 1024-byte TDREPORT_STRUCT: REPORTMACSTRUCT (type 0x81, the SHA-384 of TEE_TCB_INFO and
    TDINFO, REPORTDATA, a MAC nobody off the machine can check), TEE_TCB_INFO, TDINFO."""
    f = {**TD_FIELDS, **fields}
    tee_tcb_info = (
        b"\xff\x01\x03\x00\x00\x00\x00\x00" + f["tee_tcb_svn"] + f["mr_seam"] + f["mr_signer_seam"]
        + f["seam_attributes"] + f["tee_tcb_svn2"]
    ).ljust(239, b"\0")  # fmt: skip
    td_info = (
        f["td_attributes"] + f["xfam"] + f["mr_td"] + f["mr_config_id"] + f["mr_owner"]
        + f["mr_owner_config"] + f["rtmr0"] + f["rtmr1"] + f["rtmr2"] + f["rtmr3"] + f["mr_servicetd"]
    ).ljust(512, b"\0")  # fmt: skip
    mac_struct = (
        bytes([0x81, 0, 0, 0]) + bytes(12) + b"\x06" * 16
        + hashlib.sha384(tee_tcb_info).digest() + hashlib.sha384(td_info).digest()
        + report_data + bytes(32) + b"\x5c" * 32
    )  # fmt: skip
    out = mac_struct + tee_tcb_info + bytes(17) + td_info
    assert len(out) == 1024
    return out


def hcl_report(report: bytes, runtime: bytes, size: int = HCL_NV_SIZE) -> bytes:
    header = struct.pack("<4sIIII12x", b"HCLA", 2, 1236 + len(runtime), 2, 0)
    igvm = struct.pack("<IIIII", 20 + len(runtime), 1, 4, 1, len(runtime))
    out = header + report.ljust(1184, b"\0") + igvm + runtime
    assert len(out) <= size
    return out.ljust(size, b"\0")


def report_fields(report: bytes, tdx15: bool = False) -> dict[str, bytes]:
    """The TD quote body fields of a TDREPORT (what a quoting service copies into the quote);
    with `tdx15`, also TEE_TCB_SVN2 and SERVTD_HASH (a v5 quote's body type 3)."""
    t, d = report[256:495], report[512:1024]
    fields = {
        "tee_tcb_svn": t[8:24], "mr_seam": t[24:72], "mr_signer_seam": t[72:120],
        "seam_attributes": t[120:128], "td_attributes": d[0:8], "xfam": d[8:16], "mr_td": d[16:64],
        "mr_config_id": d[64:112], "mr_owner": d[112:160], "mr_owner_config": d[160:208],
        "rtmr0": d[208:256], "rtmr1": d[256:304], "rtmr2": d[304:352], "rtmr3": d[352:400],
        "report_data": report[128:192],
    }  # fmt: skip
    if tdx15:
        fields |= {"tee_tcb_svn2": t[128:144], "mr_servicetd": d[400:448]}
    return fields


def quote_for_report(chain: DevChain, report: bytes, version: int = 4) -> bytes:
    """The TD quote a quoting service makes of `report` (v4, or v5 with a TDX 1.5 body; signed by
    the dev chain)."""
    fields: dict[str, Any] = report_fields(report, tdx15=version == 5)
    return build_quote(chain, version=version, **fields)


def initial_pcrs() -> list[bytes]:
    return [bytes(32) if i <= 16 or i == 23 else b"\xff" * 32 for i in range(24)]


def replay_sha256(log: bytes) -> list[bytes]:
    """PCR 0..23 (SHA-256) from a crypto-agile log; written here from the PC Client spec."""
    pcrs = initial_pcrs()
    _, _, _, size = struct.unpack_from("<II20sI", log)
    spec = log[32 : 32 + size]
    (count,) = struct.unpack_from("<I", spec, 24)
    sizes = dict(struct.unpack_from("<HH", spec, 28 + 4 * i) for i in range(count))
    at = 32 + size
    while at + 12 <= len(log):
        pcr, etype, n = struct.unpack_from("<III", log, at)
        pos = at + 12
        digest = b""
        for _ in range(n):
            (alg,) = struct.unpack_from("<H", log, pos)
            if alg == 0x000B:
                digest = log[pos + 2 : pos + 2 + 32]
            pos += 2 + sizes[alg]
        (esize,) = struct.unpack_from("<I", log, pos)
        if etype != 3:  # EV_NO_ACTION
            pcrs[pcr] = hashlib.sha256(pcrs[pcr] + digest).digest()
        at = pos + 4 + esize
    return pcrs


def tpms_attest(
    nonce: bytes, pcrs: list[bytes], *, magic: int = 0xFF544347, kind: int = 0x8018
) -> bytes:
    """TPMS_ATTEST of a TPM2_Quote over SHA-256 PCRs 0..23."""
    signer = b"\x00\x0b" + hashlib.sha256(b"attestation key").digest()
    return (
        struct.pack(">IH", magic, kind)
        + struct.pack(">H", len(signer)) + signer
        + struct.pack(">H", len(nonce)) + nonce
        + struct.pack(">QIIB", 123456, 1, 0, 1)
        + struct.pack(">Q", 0x2020031200120003)
        + struct.pack(">IHB", 1, 0x000B, 3) + b"\xff\xff\xff"
        + struct.pack(">H", 32) + hashlib.sha256(b"".join(pcrs)).digest()
    )  # fmt: skip


def rsassa(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def attest_answer(
    chain: DevChain,
    ak: rsa.RSAPrivateKey,
    report_data: bytes,
    log: bytes | None,
    *,
    nonce: bytes | None = None,
    pcrs: list[bytes] | None = None,
    events: list[dict[str, object]] | None = None,
) -> dict[str, Any]:
    """The `attest` answer of an azure-tdx-vtpm guest, as our runtime sends it."""
    runtime = runtime_data(ak.public_key(), report_data)
    report = td_report(hashlib.sha256(runtime).digest() + bytes(32))
    if pcrs is None:
        pcrs = replay_sha256(log) if log is not None else initial_pcrs()
    message = tpms_attest(report_data if nonce is None else nonce, pcrs)

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return {
        "ok": True,
        "attestation_type": "azure-tdx-vtpm",
        "quote_format": "tdx",
        "quote_b64": b64(quote_for_report(chain, report)),
        "report_data_b64": b64(report_data),
        "report_data_len": len(report_data),
        "hcl_report_b64": b64(hcl_report(report, runtime)),
        "vtpm_quote": {
            "message_b64": b64(message),
            "signature_b64": b64(rsassa(ak, message)),
            "pcr_bank": "sha256",
            "pcrs": [p.hex() for p in pcrs],
        },
        "tpm_eventlog_b64": None if log is None else b64(log),
        "events": events if events is not None else [],
    }
