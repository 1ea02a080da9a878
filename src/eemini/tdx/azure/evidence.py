"""Reading Azure vTPM evidence from JSON: our `attest` answer, or trustee's evidence-v1.json.

Our `attest` answer (attestation_type "azure-tdx-vtpm", docs/api.md):

    quote_b64          the TD quote (base64)
    hcl_report_b64     the HCL report as read from NV index 0x01400001 (base64)
    vtpm_quote         {"message_b64": TPMS_ATTEST, "signature_b64": the raw RSASSA signature,
                        "pcr_bank": "sha256", "pcrs": [24 x 64 hex digits, PCR 0..23]}
    tpm_eventlog_b64   the TPM event log (securityfs binary_bios_measurements), or null
    events             the runtime event log

trustee's layout (confidential-containers/trustee, deps/verifier az-tdx-vtpm, "version" 1 or
absent): {"tpm_quote": {"signature": hex, "message": hex, "pcrs": [24 hex]}, "hcl_report":
base64url, "td_quote": base64url}. It carries no event log.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eemini.tdx.azure.errors import AzureEvidenceError
from eemini.tdx.azure.tpm import PCR_COUNT, PCR_SIZE
from eemini.tdx.guard import unique_keys

ATTESTATION_TYPE = "azure-tdx-vtpm"
_HEX = frozenset("0123456789abcdefABCDEF")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


@dataclass(frozen=True, slots=True)
class VtpmQuote:
    message: bytes  # TPMS_ATTEST, exactly what the attestation key signed
    signature: bytes  # the RSASSA signature (no TPMT_SIGNATURE header)
    pcrs: tuple[bytes, ...]  # SHA-256 PCR 0..23 as the guest read them


@dataclass(frozen=True, slots=True)
class AzureEvidence:
    td_quote: bytes
    hcl_report: bytes
    vtpm_quote: VtpmQuote
    tpm_event_log: bytes | None = None
    runtime_events: tuple[Mapping[str, object], ...] | None = None
    layout: str = "eemini"  # "eemini" (our attest answer) or "trustee"


_unique = unique_keys(
    lambda key: AzureEvidenceError(f"evidence: key {key!r} appears twice in one object")
)


def _str(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise AzureEvidenceError(f"{where}{key} is missing or not a string")
    return value


def _hex(text: str, what: str) -> bytes:
    if len(text) % 2 or not all(c in _HEX for c in text):
        raise AzureEvidenceError(f"{what} is not hex")
    return bytes.fromhex(text)


def _b64(text: str, what: str, *, url: bool) -> bytes:
    """Strict base64 (standard or URL alphabet), padded or not; no whitespace."""
    alphabet = _B64URL if url else _B64
    if not text or not all(c in alphabet for c in text):
        kind = "base64url" if url else "base64"
        raise AzureEvidenceError(f"{what} is not {kind}")
    padded = text.rstrip("=")
    padded += "=" * (-len(padded) % 4)
    try:
        if url:
            return base64.urlsafe_b64decode(padded)
        return binascii.a2b_base64(padded.encode(), strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise AzureEvidenceError(f"{what} is not valid base64: {e}") from None


def _pcrs(value: object, what: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or len(value) != PCR_COUNT:
        raise AzureEvidenceError(f"{what} must be a list of {PCR_COUNT} PCR values (PCR 0..23)")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise AzureEvidenceError(f"{what}[{i}] is not a hex string")
        raw = _hex(v, f"{what}[{i}]")
        if len(raw) != PCR_SIZE:
            raise AzureEvidenceError(f"{what}[{i}] is {len(raw)} bytes, expected {PCR_SIZE} (SHA-256)")
        out.append(raw)
    return tuple(out)


def _events(value: object) -> tuple[Mapping[str, object], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise AzureEvidenceError("events is not a list of runtime events")
    return tuple(value)


def _ours(doc: Mapping[str, Any]) -> AzureEvidence:
    vq = doc.get("vtpm_quote")
    if not isinstance(vq, dict):
        raise AzureEvidenceError("vtpm_quote is missing or not an object")
    bank = vq.get("pcr_bank", "sha256")
    if bank != "sha256":
        raise AzureEvidenceError(f"vtpm_quote.pcr_bank is {bank!r}; only sha256 is supported")
    log_text = doc.get("tpm_eventlog_b64")
    if log_text is not None and not isinstance(log_text, str):
        raise AzureEvidenceError("tpm_eventlog_b64 is not a string")
    return AzureEvidence(
        td_quote=_b64(_str(doc, "quote_b64", ""), "quote_b64", url=False),
        hcl_report=_b64(_str(doc, "hcl_report_b64", ""), "hcl_report_b64", url=False),
        vtpm_quote=VtpmQuote(
            message=_b64(_str(vq, "message_b64", "vtpm_quote."), "vtpm_quote.message_b64", url=False),
            signature=_b64(
                _str(vq, "signature_b64", "vtpm_quote."), "vtpm_quote.signature_b64", url=False
            ),
            pcrs=_pcrs(vq.get("pcrs"), "vtpm_quote.pcrs"),
        ),
        tpm_event_log=None if log_text is None else _b64(log_text, "tpm_eventlog_b64", url=False),
        runtime_events=_events(doc.get("events")),
        layout="eemini",
    )


def _trustee(doc: Mapping[str, Any]) -> AzureEvidence:
    version = doc.get("version", 0)
    if version not in (0, 1) or isinstance(version, bool):
        raise AzureEvidenceError(f"trustee evidence version {version!r} is not 0 or 1")
    tq = doc.get("tpm_quote")
    if not isinstance(tq, dict):
        raise AzureEvidenceError("tpm_quote is not an object")
    return AzureEvidence(
        td_quote=_b64(_str(doc, "td_quote", ""), "td_quote", url=True),
        hcl_report=_b64(_str(doc, "hcl_report", ""), "hcl_report", url=True),
        vtpm_quote=VtpmQuote(
            message=_hex(_str(tq, "message", "tpm_quote."), "tpm_quote.message"),
            signature=_hex(_str(tq, "signature", "tpm_quote."), "tpm_quote.signature"),
            pcrs=_pcrs(tq.get("pcrs"), "tpm_quote.pcrs"),
        ),
        layout="trustee",
    )


def is_azure_evidence(doc: object) -> bool:
    """Whether a parsed JSON document looks like Azure vTPM evidence in either layout."""
    if not isinstance(doc, dict):
        return False
    return doc.get("attestation_type") == ATTESTATION_TYPE or {"tpm_quote", "hcl_report"} <= set(doc)


def parse_azure_evidence(data: bytes | str) -> AzureEvidence:
    """Azure evidence from JSON text in either layout; raises AzureEvidenceError naming the problem."""
    try:
        doc = json.loads(data, object_pairs_hook=_unique)
    except AzureEvidenceError:
        raise
    except RecursionError:
        raise AzureEvidenceError("evidence is nested too deeply to be JSON evidence") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise AzureEvidenceError(f"evidence is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AzureEvidenceError("evidence is not a JSON object")
    if doc.get("ok") is False:
        raise AzureEvidenceError(f"evidence is a failed attest answer: {doc.get('error')!r}")
    if doc.get("attestation_type") == ATTESTATION_TYPE:
        return _ours(doc)
    if {"tpm_quote", "hcl_report", "td_quote"} <= set(doc):
        return _trustee(doc)
    kind = doc.get("attestation_type")
    if isinstance(kind, str):
        raise AzureEvidenceError(
            f"evidence is an attest answer of type {kind!r}, not {ATTESTATION_TYPE!r}"
        )
    raise AzureEvidenceError(
        f"evidence is neither an attest answer with attestation_type {ATTESTATION_TYPE!r} nor "
        "trustee's layout (tpm_quote, hcl_report, td_quote)"
    )


def evidence_to_json(evidence: AzureEvidence) -> dict[str, Any]:
    """Our layout for `evidence` (what the guest's attest answer carries besides the common fields)."""

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    vq = evidence.vtpm_quote
    return {
        "attestation_type": ATTESTATION_TYPE,
        "quote_b64": b64(evidence.td_quote),
        "hcl_report_b64": b64(evidence.hcl_report),
        "vtpm_quote": {
            "message_b64": b64(vq.message),
            "signature_b64": b64(vq.signature),
            "pcr_bank": "sha256",
            "pcrs": [p.hex() for p in vq.pcrs],
        },
        "tpm_eventlog_b64": None if evidence.tpm_event_log is None else b64(evidence.tpm_event_log),
        "events": list(evidence.runtime_events) if evidence.runtime_events is not None else None,
    }
