"""The `azure-tdx-vtpm` attestation backend, and the wire server's "ready" report.

Azure TDX confidential VMs run the guest behind a paravisor: no configfs-tsm TDX provider, but a
vTPM whose HCL report carries the paravisor TD's TDREPORT. One attestation (docs/clouds.md):

1. write the 64 bytes of report data to vTPM NV index 0x01400002 (defined first if absent: owner
   authorization, owner read and write);
2. read the HCL report from NV index 0x01400001 (its size from NV_ReadPublic, then NV_Read in
   chunks of at most the TPM's NV buffer); its runtime-data JSON must carry `user-data` = hex of
   those 64 bytes. The paravisor regenerates the report after the write; a report read too soon
   is stale: read again, a bounded number of times, then fail;
3. POST the report's TDREPORT to the instance metadata service's `acc/tdquote`, which answers the
   TD quote of it (base64url);
4. TPM2_Quote with the attestation key at 0x81000003 over SHA-256 PCRs 0..23, with the report data
   as extraData, and read those PCRs; read the TPM event log.

Self-checks before anything leaves the guest: the HCL report's user-data is the request, its TD
report's report data is SHA-256 of its runtime data, the TD quote's report data is the same, the
attestation key in the TPM is the runtime data's HCLAkPub, the vTPM quote's extraData is the
request and its PCR digest is that of the PCR values read.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import struct
import threading
import time

from eemini.guest import metadata, wirejson
from eemini.guest.attest import AttestError, check_quote
from eemini.guest.quote_layout import REPORT_DATA_SIZE
from eemini.guest.rtmr import RuntimeMeasurer
from eemini.guest.tpm import (
    TPM_DEVICE,
    TPMA_NV_OWNERREAD,
    TPMA_NV_OWNERWRITE,
    Tpm,
    TpmError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

ATTESTATION_TYPE = "azure-tdx-vtpm"
HCL_REPORT_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002
AK_HANDLE = 0x81000003
TPM_EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
TDQUOTE_PATH = "/acc/tdquote"
# The HCL report (kinvolk/azure-cvm-tooling az-cvm-vtpm/src/hcl): "HCLA" header, the TDREPORT at
# 32, IGVM request data at 1216 (report type 4 = TDX at 1224, hash type 1 = SHA-256 at 1228,
# runtime-data size at 1232), the runtime data at 1236.
HCL_SIGNATURE = b"HCLA"
TD_REPORT_OFFSET = 32
TD_REPORT_SIZE = 1024
RUNTIME_DATA_OFFSET = 1236
MAX_TPM_EVENT_LOG = 4 << 20
TPM_PCRS = range(24)
TPM_RC_HANDLE_1 = 0x18B  # TPM_RC_HANDLE for the first handle: no such NV index


def b64url_decode(text: str) -> bytes:
    """base64url, padded or not, strictly (binascii.Error, a ValueError, otherwise)."""
    std = text.replace("-", "+").replace("_", "/").rstrip("=")
    if "+" in text or "/" in text:
        raise ValueError("standard base64 characters in base64url text")
    return binascii.a2b_base64((std + "=" * (-len(std) % 4)).encode("ascii"), strict_mode=True)


def b64url_encode(data: bytes) -> str:
    return (
        binascii.b2a_base64(data, newline=False).decode().replace("+", "-").replace("/", "_").rstrip("=")
    )


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def quote_extra_data(message: bytes) -> bytes | None:
    """TPMS_ATTEST.extraData: after magic (4), type (2) and the qualifiedSigner TPM2B."""
    if len(message) < 8:
        return None
    (signer,) = struct.unpack_from(">H", message, 6)
    at = 8 + signer
    if at + 2 > len(message):
        return None
    (size,) = struct.unpack_from(">H", message, at)
    return message[at + 2 : at + 2 + size]


class HclReport:
    """The parts of an HCL report the guest checks."""

    __slots__ = ("ak_e", "ak_n", "raw", "runtime_data", "td_report", "user_data")

    def __init__(self, raw: bytes) -> None:
        if len(raw) < RUNTIME_DATA_OFFSET or raw[:4] != HCL_SIGNATURE:
            raise AttestError(f"the vTPM's NV index {HCL_REPORT_INDEX:#010x} holds no HCL report")
        report_type, hash_type, size = struct.unpack_from("<III", raw, 1224)
        if report_type != 4:
            raise AttestError(f"the HCL report is of type {report_type}, not 4 (TDX)")
        if hash_type != 1:
            raise AttestError(f"the HCL report's report-data hash type is {hash_type}, not 1 (SHA-256)")
        if RUNTIME_DATA_OFFSET + size > len(raw):
            raise AttestError(f"the HCL report's runtime data ({size} bytes) runs past its end")
        self.raw = raw
        self.td_report = raw[TD_REPORT_OFFSET : TD_REPORT_OFFSET + TD_REPORT_SIZE]
        self.runtime_data = raw[RUNTIME_DATA_OFFSET : RUNTIME_DATA_OFFSET + size]
        try:
            doc = wirejson.loads(self.runtime_data)
            self.user_data = bytes.fromhex(doc["user-data"])
            ak = next(k for k in doc["keys"] if k.get("kid") == "HCLAkPub")
            self.ak_n = int.from_bytes(b64url_decode(ak["n"]), "big")
            self.ak_e = int.from_bytes(b64url_decode(ak["e"]), "big")
        except (
            ValueError, KeyError, TypeError, AttributeError, StopIteration, RecursionError,
        ) as e:  # fmt: skip
            raise AttestError(f"the HCL report's runtime data is not Azure's JSON: {e!r}") from None


class ImdsQuoteClient:
    """`POST /acc/tdquote` on the instance metadata service: a TDREPORT in, its TD quote out.
    Content-Type must be exactly application/json (a charset suffix gets HTTP 415)."""

    def __init__(self, fetch: metadata.Fetch | None = None) -> None:
        self.fetch = fetch or metadata.Fetch(timeout=10.0, attempts=5, backoff=0.5)

    def td_quote(self, td_report: bytes) -> bytes:
        body = wirejson.dumps({"report": b64url_encode(td_report)}).encode()
        headers = {"Content-Type": "application/json", "Metadata": "true"}
        where = f"the metadata service ({self.fetch.host}{TDQUOTE_PATH})"
        answer = metadata.http_request(
            self.fetch, "POST", TDQUOTE_PATH, headers, body=body, limit=1 << 20
        )
        if answer is None:
            raise AttestError(f"{where} did not answer", "attest_unavailable")
        status, _headers, data = answer
        if status != 200:
            text = data[:200].decode("utf-8", "replace")
            raise AttestError(f"{where} answered HTTP {status}: {text!r}")
        try:
            text = wirejson.loads(data)["quote"]
            if not isinstance(text, str):
                raise TypeError(f"quote is a {type(text).__name__}, not a string")
            quote = b64url_decode(text)
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # binascii.Error is a ValueError
            raise AttestError(f"{where} answered something that is not a TD quote: {e!r}") from None
        if not quote:
            raise AttestError(f"{where} answered an empty quote")
        return quote


class Evidence:
    """One attestation's parts: the TD quote and what the `attest` answer carries beside it."""

    __slots__ = ("extra", "quote")

    def __init__(self, quote: bytes, extra: dict[str, Any]) -> None:
        self.quote = quote
        self.extra = extra


class AzureVtpmBackend:
    """TDX evidence on Azure through the vTPM, one attestation at a time."""

    attestation_type = ATTESTATION_TYPE

    def __init__(
        self,
        *,
        open_tpm: Callable[[], Tpm] | None = None,
        imds: ImdsQuoteClient | None = None,
        event_log: str = TPM_EVENT_LOG,
        report_reads: int = 10,
        report_delay: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._open_tpm = open_tpm or (lambda: Tpm.open(TPM_DEVICE))
        self.imds = imds or ImdsQuoteClient()
        self.event_log = event_log
        self.report_reads = report_reads
        self.report_delay = report_delay
        self._sleep = sleep
        self._lock = threading.Lock()

    def quote(self, report_data: bytes) -> bytes:
        return self.attest(report_data).quote

    def attest(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        with self._lock:
            try:
                tpm = self._open_tpm()
            except TpmError as e:
                raise AttestError(f"the vTPM is not available: {e}", "attest_unavailable") from None
            try:
                return self._attest(tpm, report_data)
            except TpmError as e:
                raise AttestError(f"vTPM: {e}") from None
            finally:
                tpm.close()

    def _attest(self, tpm: Tpm, report_data: bytes) -> Evidence:
        chunk = tpm.nv_buffer_max()
        self._write_user_data(tpm, report_data, chunk)
        hcl = self._read_report(tpm, report_data, chunk)
        runtime_hash = hashlib.sha256(hcl.runtime_data).digest() + bytes(32)
        if hcl.td_report[128:192] != runtime_hash:
            raise AttestError(
                "the HCL report's TD report does not bind its runtime data (report data "
                f"{hcl.td_report[128:192].hex()}, SHA-256 of the runtime data {runtime_hash[:32].hex()})"
            )
        ak = tpm.read_public(AK_HANDLE)
        if (ak.modulus, ak.exponent) != (hcl.ak_n, hcl.ak_e):
            raise AttestError(
                f"the vTPM's attestation key at {AK_HANDLE:#010x} is not HCLAkPub of the HCL report"
            )
        td_quote = self.imds.td_quote(hcl.td_report)
        check_quote(td_quote, runtime_hash)
        message, signature, pcrs = self._vtpm_quote(tpm, report_data)
        return Evidence(
            td_quote,
            {
                "hcl_report_b64": b64encode(hcl.raw),
                "vtpm_quote": {
                    "message_b64": b64encode(message),
                    "signature_b64": b64encode(signature),
                    "pcr_bank": "sha256",
                    "pcrs": [p.hex() for p in pcrs],
                },
                "tpm_eventlog_b64": self._event_log(),
            },
        )

    @staticmethod
    def _write_user_data(tpm: Tpm, report_data: bytes, chunk: int) -> None:
        try:
            public = tpm.nv_read_public(USER_DATA_INDEX)
        except TpmError as e:
            if e.rc != TPM_RC_HANDLE_1:  # the index does not exist
                raise
            tpm.nv_define_space(
                USER_DATA_INDEX, REPORT_DATA_SIZE, TPMA_NV_OWNERWRITE | TPMA_NV_OWNERREAD
            )
        else:
            if public.data_size < REPORT_DATA_SIZE:
                raise AttestError(
                    f"the vTPM's NV index {USER_DATA_INDEX:#010x} holds {public.data_size} bytes, "
                    f"fewer than the {REPORT_DATA_SIZE} of report data"
                )
        tpm.nv_write(USER_DATA_INDEX, report_data, chunk)

    def _read_report(self, tpm: Tpm, report_data: bytes, chunk: int) -> HclReport:
        start = time.monotonic()
        hcl = None
        for attempt in range(self.report_reads):
            if attempt:
                self._sleep(self.report_delay)
            size = tpm.nv_read_public(HCL_REPORT_INDEX).data_size
            hcl = HclReport(tpm.nv_read(HCL_REPORT_INDEX, size, chunk))
            if hcl.user_data == report_data:
                return hcl
        assert hcl is not None
        raise AttestError(
            f"the HCL report is stale: after {self.report_reads} reads over "
            f"{time.monotonic() - start:.1f} s its user-data is {hcl.user_data.hex()}, not the "
            f"report data written to NV index {USER_DATA_INDEX:#010x} ({report_data.hex()})",
            "attest_stale",
        )

    @staticmethod
    def _vtpm_quote(tpm: Tpm, report_data: bytes) -> tuple[bytes, bytes, list[bytes]]:
        """The quote and the PCR values it covers: read after it, and read again (a new quote)
        when something extended a PCR in between."""
        for _ in range(3):
            quote = tpm.quote(AK_HANDLE, report_data, TPM_PCRS)
            pcrs = tpm.pcr_read(TPM_PCRS)
            digest = hashlib.sha256(b"".join(pcrs)).digest()
            if quote.message.endswith(b"\x00\x20" + digest):
                if quote_extra_data(quote.message) != report_data:
                    raise AttestError("the vTPM quote does not carry the report data as extraData")
                return quote.message, quote.signature, pcrs
        raise AttestError("the vTPM's PCRs kept changing while they were quoted")

    def _event_log(self) -> str | None:
        try:
            with open(self.event_log, "rb") as f:
                data = f.read(MAX_TPM_EVENT_LOG + 1)
        except OSError:
            return None
        if len(data) > MAX_TPM_EVENT_LOG:
            raise AttestError(
                f"the TPM event log {self.event_log} is larger than {MAX_TPM_EVENT_LOG} bytes"
            )
        return b64encode(data)


# --- the wire server ---------------------------------------------------------------------------------

WIRESERVER = "168.63.129.16"
WIRESERVER_VERSION = "2012-11-30"
GOAL_STATE_PATH = "/machine/?comp=goalstate"
HEALTH_PATH = "/machine/?comp=health"
# Container and instance ids are GUIDs and "<guid>.<vm name>": letters, digits, '-', '_', '.'.
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

HEALTH_TEMPLATE = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
    'xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
    "<GoalStateIncarnation>{incarnation}</GoalStateIncarnation>"
    "<Container><ContainerId>{container}</ContainerId><RoleInstanceList><Role>"
    "<InstanceId>{instance}</InstanceId><Health><State>Ready</State></Health>"
    "</Role></RoleInstanceList></Container></Health>"
)


class WireServerError(Exception):
    pass


def _element(xml: str, name: str) -> str:
    """The text of the first <name>...</name>: all the goal state parse this needs."""
    start = xml.find(f"<{name}>")
    end = xml.find(f"</{name}>", start)
    if start < 0 or end < 0:
        raise WireServerError(f"the goal state has no <{name}>")
    value = xml[start + len(name) + 2 : end].strip()
    if not value or not set(value) <= _ID_CHARS:
        raise WireServerError(f"the goal state's <{name}> is not an identifier: {value[:80]!r}")
    return value


def report_ready(fetch: metadata.Fetch | None = None) -> str:
    """Tell Azure the VM is up (what its guest agent would do): GET the goal state, then POST a
    health report with State Ready for its incarnation, container and role instance. Returns the
    instance id; raises WireServerError saying what failed."""
    fetch = fetch or metadata.Fetch(host=WIRESERVER, timeout=5.0, attempts=5, backoff=1.0)
    version = {"x-ms-version": WIRESERVER_VERSION}
    answer = metadata.http_request(fetch, "GET", GOAL_STATE_PATH, version, limit=1 << 20)
    if answer is None:
        raise WireServerError(f"the wire server {fetch.host} did not answer")
    status, _, body = answer
    if status != 200:
        raise WireServerError(f"the wire server answered HTTP {status} for the goal state")
    xml = body.decode("utf-8", "replace")
    incarnation = _element(xml, "Incarnation")
    container = _element(xml, "ContainerId")
    instance = _element(xml, "InstanceId")
    if not incarnation.isdigit():
        raise WireServerError(f"the goal state's incarnation is not a number: {incarnation!r}")
    health = HEALTH_TEMPLATE.format(incarnation=incarnation, container=container, instance=instance)
    headers = {**version, "Content-Type": "text/xml;charset=utf-8"}
    answer = metadata.http_request(fetch, "POST", HEALTH_PATH, headers, body=health.encode())
    if answer is None:
        raise WireServerError(f"the wire server {fetch.host} did not answer the health report")
    if answer[0] != 200:
        raise WireServerError(f"the wire server answered HTTP {answer[0]} to the health report")
    return instance


def boot(
    trial: Callable[[AzureVtpmBackend], int], log: Callable[[str], None]
) -> tuple[AzureVtpmBackend, RuntimeMeasurer]:
    """PID 1's attestation step on Azure: the backend, its trial quote (`trial` refuses the boot
    when there is none), the RTMR3 measurer, then the ready report to the wire server."""
    try:
        mount_securityfs()
    except OSError as e:
        log(f"securityfs: {e}; attest answers will carry no TPM event log")
    vtpm = AzureVtpmBackend()
    size = trial(vtpm)
    measurer = RuntimeMeasurer()
    if not measurer.enabled:
        measurer.reason = "the TD is Azure's paravisor: the guest has no RTMR3 of its own"
    log(
        f"attestation: Azure TDX through the vTPM and the HCL report (trial: {size}-byte "
        "TD quote, vTPM quote over PCRs 0-23); RTMR3 "
        + ("extended" if measurer.enabled else f"not extended ({measurer.reason})")
    )
    # Azure provisions a VM only once it reports ready (its guest agent's job). Not a security
    # property: a failure is said on the console and the boot goes on.
    try:
        instance = report_ready()
    except Exception as e:  # a WireServerError, or anything unforeseen: the boot goes on
        why = str(e) if isinstance(e, WireServerError) else f"{type(e).__name__}: {e}"
        log(f"azure: reporting ready failed: {why} (Azure will count the provisioning as failed)")
    else:
        log(f"azure: reported ready to the wire server (role instance {instance})")
    return vtpm, measurer


def mount_securityfs(path: str = "/sys/kernel/security") -> None:
    """securityfs holds the TPM event log (tpm0/binary_bios_measurements)."""
    from eemini.guest import linux as ksys

    if os.path.ismount(path):
        return
    ksys.mount("securityfs", path, "securityfs", ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC, None)
