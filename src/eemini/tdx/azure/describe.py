"""Rendering a verified Azure evidence: a JSON-ready dict, and the text `eemini verify` prints."""

from __future__ import annotations

import hashlib
from typing import Any

from eemini.tdx.azure.verify import KNOWN_PARAVISOR_MRTDS, PARAVISOR_RULES, VerifiedAzure
from eemini.tdx.describe import _lines, verified_to_dict
from eemini.tdx.eventlog import HashAlg


def _text(data: bytes) -> str | None:
    """Printable ASCII for a nonce that is text (trustee's "challenge"), else None."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def azure_to_dict(v: VerifiedAzure) -> dict[str, Any]:
    td = verified_to_dict(v.td)
    mr_td = v.td.report.mr_td
    out: dict[str, Any] = {
        "verified": True,
        "evidence": "azure-tdx-vtpm",
        "checks": list(v.checks),
        "waived": [{"check": w.check, "status": w.status, "reason": w.reason} for w in v.waived],
        "paravisor": {
            "mr_td": mr_td.hex(),
            "known_as": KNOWN_PARAVISOR_MRTDS.get(mr_td),
            "rules": dict(PARAVISOR_RULES),
        },
        "td_quote": {k: val for k, val in td.items() if k not in ("verified", "checks", "waived")},
        "runtime_data": {
            "sha256": hashlib.sha256(v.hcl.runtime_data).hexdigest(),
            "user_data": v.runtime.user_data.hex(),
            "hcl_ak_pub": {"n_bits": v.runtime.ak.bits, "e": v.runtime.ak.e},
            "vm_configuration": v.runtime.vm_configuration,
        },
        "vtpm_quote": {
            "nonce": v.vtpm.extra_data.hex(),
            "nonce_text": _text(v.vtpm.extra_data),
            "clock": v.vtpm.clock,
            "reset_count": v.vtpm.reset_count,
            "restart_count": v.vtpm.restart_count,
            "firmware_version": f"{v.vtpm.firmware_version:#018x}",
            "pcrs_sha256": {str(i): p.hex() for i, p in enumerate(v.pcrs)},
        },
        "tpm_event_log": None,
    }
    if v.event_log is not None:
        boot = v.boot
        out["tpm_event_log"] = {
            "events": len(v.event_log.events),
            "matched": [
                {"predicted": p.to_json(), "event": e.number, "pcr": e.register,
                 "sha256": e.digest(HashAlg.SHA256).hex()}
                for p, e in (boot.matched if boot else ())
            ],
            "allowed": [
                {"event": e.number, "pcr": e.register, "group": g.value, "what": e.describe()}
                for e, g in (boot.allowed if boot else ())
            ],
            # Extended outside the firmware's log (IMA's PCR 10): reported, not judged.
            "pcrs_after_boot": {str(i): p.hex() for i, p in v.pcrs_after_boot},
        }  # fmt: skip
    return out


def describe_azure(v: VerifiedAzure) -> str:
    doc = azure_to_dict(v)
    doc["checks"] = [*v.checks, *(f"{w.check} {w.status.upper()} (waived by policy)" for w in v.waived)]
    doc["waived"] = [f"{w.check}: {w.reason}" for w in v.waived]
    del doc["paravisor"]["rules"]
    out: list[str] = []
    _lines("", doc, out)
    if v.boot is not None:
        out.append(
            f"TPM event log: exactly this image's events: {len(v.boot.matched)} predicted, "
            f"{len(v.boot.allowed)} allowlisted firmware events that load no code, nothing else"
        )
    return "\n".join(out) + "\n"
