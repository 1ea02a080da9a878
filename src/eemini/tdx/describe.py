"""Rendering of quotes and verification results: JSON-ready dicts and human text (stdout data)."""

from __future__ import annotations

from typing import Any

from eemini.guest.quote_layout import AttestationKeyType, CertificationDataType, TeeType
from eemini.tdx.quote import EnclaveReport, Quote, report_fields
from eemini.tdx.tcb import TcbDrift
from eemini.tdx.verify import VerifiedQuote


def _enum(cls: type[Any], value: int) -> str:
    try:
        return str(cls(value).name)
    except ValueError:
        return "unknown"


def _enclave_report(r: EnclaveReport) -> dict[str, Any]:
    return {
        "cpu_svn": r.cpu_svn.hex(),
        "misc_select": f"{r.misc_select:08x}",
        "attributes": r.attributes.hex(),
        "mr_enclave": r.mr_enclave.hex(),
        "mr_signer": r.mr_signer.hex(),
        "isv_prod_id": r.isv_prod_id,
        "isv_svn": r.isv_svn,
        "report_data": r.report_data.hex(),
    }


def quote_to_dict(quote: Quote) -> dict[str, Any]:
    """Every field of the quote, bytes as lowercase hex."""
    h = quote.header
    cert = quote.signature_data.certification
    report = quote.report
    return {
        "header": {
            "version": h.version,
            "attestation_key_type": h.attestation_key_type,
            "attestation_key_type_name": _enum(AttestationKeyType, h.attestation_key_type),
            "tee_type": f"0x{h.tee_type:08x}",
            "tee_type_name": _enum(TeeType, h.tee_type),
            "qe_svn": h.qe_svn,
            "pce_svn": h.pce_svn,
            "qe_vendor_id": h.qe_vendor_id.hex(),
            "user_data": h.user_data.hex(),
        },
        "body_type": quote.body_type.name,
        "td_report": {
            **{k: v.hex() for k, v in report_fields(report).items()},
            "td_attributes_flags": {
                "names": list(report.td_attribute_names),
                "debug": report.debug,
                "sept_ve_disable": report.sept_ve_disable,
                "reserved_bits": f"0x{report.reserved_attributes:016x}",
            },
        },
        "signature_data": {
            "signature": quote.signature_data.signature.hex(),
            "attestation_key": quote.signature_data.attestation_key.hex(),
            "certification_data_type": _enum(CertificationDataType, 6),
            "qe_report": _enclave_report(cert.qe_report),
            "qe_report_signature": cert.qe_report_signature.hex(),
            "qe_auth_data": cert.qe_auth_data.hex(),
            "pck_certification_data_type": _enum(CertificationDataType, cert.pck_chain_type),
            "pck_chain_pem": cert.pck_chain_pem.rstrip(b"\0").decode("ascii", "replace"),
        },
        "length": quote.length,
        "trailing_bytes": quote.trailing,
    }


def _lines(prefix: str, value: object, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _lines(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out.append(f"{prefix}: {', '.join(map(str, value)) or '(none)'}")
    elif isinstance(value, str) and "\n" in value:
        out.append(f"{prefix}:")
        out.extend(f"    {line}" for line in value.strip().splitlines())
    else:
        out.append(f"{prefix}: {value}")


def describe_quote(quote: Quote) -> str:
    out: list[str] = []
    _lines("", quote_to_dict(quote), out)
    return "\n".join(out) + "\n"


def _drift(drift: TcbDrift) -> dict[str, Any]:
    return {
        "level_date": drift.level_date,
        "latest_date": drift.latest_date,
        "behind": list(drift.behind),
    }


def verified_to_dict(v: VerifiedQuote) -> dict[str, Any]:
    tcb = v.tcb
    return {
        "verified": True,
        "verified_at": v.verified_at,
        "tcb_status": v.tcb_status,
        "advisory_ids": list(v.advisory_ids),
        "platform_status": tcb.platform.status.value if tcb else None,
        "tdx_module_status": tcb.tdx_module.status.value if tcb and tcb.tdx_module else None,
        "qe_status": tcb.qe.status.value if tcb else None,
        "tcb_evaluation_data_number": tcb.tcb_evaluation_data_number if tcb else None,
        "tcb_drift": _drift(tcb.drift) if tcb and tcb.drift else None,
        "trust_anchor": {
            "name": v.trust_anchor.name,
            "sha256": v.trust_anchor.sha256,
            "production": v.trust_anchor.production,
        },
        "fmspc": v.pck.fmspc.hex().upper(),
        "attributes": {
            "debug": v.attributes.debug,
            "sept_ve_disable": v.attributes.sept_ve_disable,
            "reserved_bits": f"0x{v.attributes.reserved_bits:016x}",
            "mr_servicetd_zero": v.attributes.mr_servicetd_zero,
        },
        "checks": list(v.checks),
        "waived": [{"check": w.check, "status": w.status, "reason": w.reason} for w in v.waived],
        "mr_td": v.report.mr_td.hex(),
        **{f"rtmr{i}": r.hex() for i, r in enumerate(v.report.rtmrs)},
        "report_data": v.report.report_data.hex(),
    }


def describe_verified(v: VerifiedQuote) -> str:
    out: list[str] = []
    doc = verified_to_dict(v)
    # A waived check stands in the check list itself, with its status, and once more with its reason.
    doc["checks"] = [*v.checks, *(f"{w.check} {w.status.upper()} (waived by policy)" for w in v.waived)]
    doc["waived"] = [f"{w.check}: {w.reason}" for w in v.waived]
    _lines("", doc, out)
    return "\n".join(out) + "\n"
