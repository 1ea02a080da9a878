"""Intel's TDX TCB status algorithm: platform TCB level, TDX module identity, QE identity, convergence.

Source: Intel SGX/TDX DCAP Quote Verification Library, "TDX TCB status evaluation" as documented for
TCB Info v3 in Intel's PCS API v4 ("Get TDX TCB Info", TCB level matching steps):

1. Walk the TCB levels in the given order (highest first). A level matches when every SGX TCB
   component SVN of the PCK certificate is >= the level's, the PCE SVN is >= the level's, and the TD
   report's TEE TCB SVN is >= the level's TDX components: bytes 0..15 when TEE_TCB_SVN[1] is 0,
   otherwise bytes 2..15 only, because then bytes 0 and 1 (TDX module SVN and major version) are
   judged by the TDX module identity `TDX_<major>` instead.
2. No matching level means the platform's TCB is not supported: verification fails.
3. With a module identity, the level whose ISV SVN <= TEE_TCB_SVN[0] gives the module's status; an
   OutOfDate module turns UpToDate/SWHardeningNeeded into OutOfDate and the Configuration statuses
   into OutOfDateConfigurationNeeded (the same rule converges the QE identity's status).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from eemini.tdx.collateral import (
    IsvTcbLevel,
    QeIdentity,
    TcbInfo,
    TcbLevel,
    TcbStatus,
    component_names,
)
from eemini.tdx.errors import (
    CollateralInvalid,
    FmspcMismatch,
    PceIdMismatch,
    QeIdentityMismatch,
    TcbLevelNotFound,
)
from eemini.tdx.pck import PckExtension
from eemini.tdx.quote import EnclaveReport, TdReport

# SGX REPORT ATTRIBUTES byte 0, bit 1: the enclave is a debug enclave (SGX SDM, SECS.ATTRIBUTES).
_SGX_ATTR_DEBUG = 0x02


@dataclass(frozen=True, slots=True)
class StatusWithAdvisories:
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TcbDrift:
    """How far an out-of-date platform is behind: the date of the TCB level it matched, the date of
    the TCB info's latest level, and each SVN below the latest (as "what: have < latest")."""

    level_date: str
    latest_date: str
    behind: tuple[str, ...]

    def sentence(self) -> str:
        below = "; ".join(self.behind) or "no SVN (the level's status alone)"
        return (
            f"the platform matches the TCB level of {self.level_date}, the latest is of "
            f"{self.latest_date}; below the latest: {below}"
        )


@dataclass(frozen=True, slots=True)
class TcbEvaluation:
    """What the collateral says about this platform and its quoting enclave."""

    status: TcbStatus  # final: platform, converged with the TDX module and the QE
    advisory_ids: tuple[str, ...]
    platform: StatusWithAdvisories
    tdx_module: StatusWithAdvisories | None
    qe: StatusWithAdvisories
    tcb_level: TcbLevel
    tcb_evaluation_data_number: int
    drift: TcbDrift | None = None  # for the OutOfDate statuses


def converge(platform: TcbStatus, other: TcbStatus) -> TcbStatus:
    """Intel QVL's convergence of the platform status with a QE or TDX module status."""
    if other == TcbStatus.OUT_OF_DATE:
        if platform in (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE
        if platform in (TcbStatus.CONFIGURATION_NEEDED, TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED
    if other == TcbStatus.REVOKED:
        return TcbStatus.REVOKED
    return platform


def _merge_ids(*groups: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        out.extend(i for i in group if i not in out)
    return tuple(out)


def match_platform_level(tcb_info: TcbInfo, pck: PckExtension, report: TdReport) -> TcbLevel:
    if pck.fmspc != tcb_info.fmspc:
        raise FmspcMismatch(
            f"PCK certificate FMSPC {pck.fmspc.hex().upper()} differs from the TCB info's "
            f"{tcb_info.fmspc.hex().upper()}"
        )
    if pck.pce_id != tcb_info.pce_id:
        raise PceIdMismatch(
            f"PCK certificate PCE-ID {pck.pce_id.hex().upper()} differs from the TCB info's "
            f"{tcb_info.pce_id.hex().upper()}"
        )
    if tcb_info.id != "TDX" or tcb_info.version < 3:
        raise CollateralInvalid(
            f"TCB info is not TDX TCB info v3 (id {tcb_info.id!r}, version {tcb_info.version})"
        )
    svn = report.tee_tcb_svn
    first = 0 if svn[1] == 0 else 2
    components = pck.tcb_components
    tee = tuple(svn[first:])
    for level in tcb_info.tcb_levels:
        if not all(map(operator.ge, components, level.sgx_components)):
            continue
        if pck.pce_svn < level.pce_svn:
            continue
        if not level.tdx_components:
            raise CollateralInvalid("TCB info level has no TDX components")
        if not all(map(operator.ge, tee, level.tdx_components[first:])):
            continue
        return level
    raise TcbLevelNotFound(
        f"no TCB level of FMSPC {tcb_info.fmspc.hex().upper()} matches: SGX components "
        f"{list(pck.tcb_components)}, PCE SVN {pck.pce_svn}, TEE TCB SVN {svn.hex()}"
    )


def _isv_level(levels: tuple[IsvTcbLevel, ...], isv_svn: int, what: str) -> IsvTcbLevel:
    for level in levels:
        if isv_svn >= level.isv_svn:
            return level
    lowest = min((lv.isv_svn for lv in levels), default=None)
    raise TcbLevelNotFound(f"{what} SVN {isv_svn} is below every TCB level (lowest {lowest})")


def evaluate_tdx_module(tcb_info: TcbInfo, report: TdReport) -> StatusWithAdvisories | None:
    major = report.tee_tcb_svn[1]
    if major == 0 or not tcb_info.tdx_module_identities:
        return None
    module_id = f"TDX_{major:02X}"
    for identity in tcb_info.tdx_module_identities:
        if identity.id != module_id:
            continue
        if identity.mrsigner != report.mr_signer_seam:
            raise TcbLevelNotFound(f"TDX module MRSIGNER differs from TCB info's {module_id}")
        mask = int.from_bytes(identity.attributes_mask, "little")
        got = int.from_bytes(report.seam_attributes, "little") & mask
        if got != int.from_bytes(identity.attributes, "little") & mask:
            raise TcbLevelNotFound(f"TDX module attributes differ from TCB info's {module_id}")
        level = _isv_level(identity.tcb_levels, report.tee_tcb_svn[0], f"TDX module {module_id}")
        return StatusWithAdvisories(level.status, level.advisory_ids)
    raise TcbLevelNotFound(f"TCB info has no TDX module identity {module_id}")


def _masked_differ(got: bytes, want: bytes, mask: bytes) -> bool:
    """Whether `got` and `want` differ in a bit the mask keeps (byte strings of one length)."""
    if not len(got) == len(want) == len(mask):
        raise ValueError("masked comparison of byte strings of different lengths")
    return bool((int.from_bytes(got) ^ int.from_bytes(want)) & int.from_bytes(mask))


def evaluate_qe(qe_report: EnclaveReport, identity: QeIdentity) -> StatusWithAdvisories:
    """Check the QE report against the QE identity; return the QE's TCB status."""
    if identity.id != "TD_QE" or identity.version not in (2, 3):
        raise QeIdentityMismatch(
            f"QE identity is {identity.id!r} version {identity.version}, expected 'TD_QE' version 2"
        )
    if qe_report.mr_signer != identity.mrsigner:
        raise QeIdentityMismatch(
            f"QE MRSIGNER {qe_report.mr_signer.hex()} differs from the QE identity's "
            f"{identity.mrsigner.hex()}"
        )
    if qe_report.isv_prod_id != identity.isv_prod_id:
        raise QeIdentityMismatch(
            f"QE ISVPRODID {qe_report.isv_prod_id} differs from the QE identity's {identity.isv_prod_id}"
        )
    misc = qe_report.misc_select.to_bytes(4, "little")
    if _masked_differ(misc, identity.miscselect, identity.miscselect_mask):
        raise QeIdentityMismatch(f"QE MISCSELECT {misc.hex()} does not match the QE identity")
    if _masked_differ(qe_report.attributes, identity.attributes, identity.attributes_mask):
        raise QeIdentityMismatch(
            f"QE ATTRIBUTES {qe_report.attributes.hex()} do not match the QE identity"
        )
    if qe_report.attributes[0] & _SGX_ATTR_DEBUG:
        raise QeIdentityMismatch("the quoting enclave is a debug enclave")
    try:
        level = _isv_level(identity.tcb_levels, qe_report.isv_svn, "QE ISV")
    except TcbLevelNotFound as e:
        raise QeIdentityMismatch(e.message) from None
    return StatusWithAdvisories(level.status, level.advisory_ids)


def evaluate(
    tcb_info: TcbInfo, qe_identity: QeIdentity, pck: PckExtension, report: TdReport, qe: EnclaveReport
) -> TcbEvaluation:
    """Intel's TDX TCB status for this quote, or raise naming why there is none."""
    qe_status = evaluate_qe(qe, qe_identity)
    level = match_platform_level(tcb_info, pck, report)
    platform = StatusWithAdvisories(level.status, level.advisory_ids)
    module = evaluate_tdx_module(tcb_info, report)
    status = platform.status
    ids = platform.advisory_ids
    if module is not None:
        status = converge(status, module.status)
        ids = _merge_ids(ids, module.advisory_ids)
    status = converge(status, qe_status.status)
    ids = _merge_ids(ids, qe_status.advisory_ids)
    out_of_date = status in (TcbStatus.OUT_OF_DATE, TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED)
    return TcbEvaluation(
        status=status,
        advisory_ids=ids,
        platform=platform,
        tdx_module=module,
        qe=qe_status,
        tcb_level=level,
        tcb_evaluation_data_number=tcb_info.tcb_evaluation_data_number,
        drift=(
            drift(tcb_info, qe_identity, level=level, pck=pck, report=report, qe=qe)
            if out_of_date
            else None
        ),
    )


def drift(
    tcb_info: TcbInfo,
    qe_identity: QeIdentity,
    *,
    level: TcbLevel,
    pck: PckExtension,
    report: TdReport,
    qe: EnclaveReport,
) -> TcbDrift:
    """Compare the platform with the latest TCB level (the first: Intel lists them newest first),
    its TDX module with the module identity's latest level, its QE with the QE identity's."""
    latest = tcb_info.tcb_levels[0]
    sgx_names, tdx_names = component_names(tcb_info)
    behind = []

    def named(kind: str, i: int, names: tuple[str, ...]) -> str:
        name = names[i] if i < len(names) else ""
        return f"{kind} component {i}" + (f" ({name})" if name else "")

    for i, (have, want) in enumerate(zip(pck.tcb_components, latest.sgx_components, strict=True)):
        if have < want:
            behind.append(f"{named('SGX', i, sgx_names)} SVN {have} < {want}")
    if pck.pce_svn < latest.pce_svn:
        behind.append(f"PCE SVN {pck.pce_svn} < {latest.pce_svn}")
    svn = report.tee_tcb_svn
    first = 0 if svn[1] == 0 else 2
    for i in range(first, min(16, len(latest.tdx_components))):
        if svn[i] < latest.tdx_components[i]:
            behind.append(f"{named('TDX', i, tdx_names)} SVN {svn[i]} < {latest.tdx_components[i]}")
    module_id = f"TDX_{svn[1]:02X}"
    for identity in tcb_info.tdx_module_identities if svn[1] else ():
        top = identity.tcb_levels[0] if identity.id == module_id and identity.tcb_levels else None
        if top is not None and svn[0] < top.isv_svn:
            behind.append(f"TDX module {module_id} SVN {svn[0]} < {top.isv_svn} (of {top.tcb_date})")
    top_qe = qe_identity.tcb_levels[0] if qe_identity.tcb_levels else None
    if top_qe is not None and qe.isv_svn < top_qe.isv_svn:
        behind.append(f"QE ISV SVN {qe.isv_svn} < {top_qe.isv_svn} (of {top_qe.tcb_date})")
    return TcbDrift(level.tcb_date, latest.tcb_date, tuple(behind))
