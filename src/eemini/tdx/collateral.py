"""Collateral in the JSON layout of dcap-qvl's `QuoteCollateralV3`, and the typed TCB info / QE identity.

Layout (one JSON object): `pck_crl_issuer_chain`, `tcb_info_issuer_chain`, `qe_identity_issuer_chain`
(PEM strings: signer certificate, then the root), `tcb_info` and `qe_identity` (the exact signed
JSON text of Intel's `tcbInfo` / `enclaveIdentity` objects: the signatures cover these bytes, so
they are kept verbatim), `tcb_info_signature` and `qe_identity_signature` (hex of the 64-byte r||s)
and `root_ca_crl`, `pck_crl` (hex of DER). Field meanings follow Intel's PCS API v4 "TDX TCB Info"
(tcbInfo v3) and "TDX QE Identity" (enclaveIdentity v2) schemas.
"""

from __future__ import annotations

import datetime
import enum
import functools
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from eemini.tdx.errors import CollateralParseError
from eemini.tdx.guard import parsing, utf8


class TcbStatus(enum.StrEnum):
    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


_STATUSES = frozenset(s.value for s in TcbStatus)
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})*")


@dataclass(frozen=True, slots=True)
class Collateral:
    """QuoteCollateralV3, decoded: PEM chains as text, signed JSON kept as the exact signed bytes."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes


_STR_FIELDS = ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "tcb_info", "qe_identity_issuer_chain",
               "qe_identity")  # fmt: skip
_BYTES_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")


def _hex_or_list(name: str, value: object) -> bytes:
    # dcap-qvl writes hex strings; serde's default for Vec<u8> (a list of ints) is accepted too.
    if isinstance(value, str):
        with parsing(CollateralParseError, f"collateral field {name!r} is not valid hex"):
            return bytes.fromhex(value.removeprefix("0x"))
    if isinstance(value, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value
    ):
        return bytes(value)
    raise CollateralParseError(f"collateral field {name!r} must be a hex string")


def parse_collateral(text: str | bytes) -> Collateral:
    """Parse QuoteCollateralV3 JSON (dcap-qvl's layout)."""
    with parsing(CollateralParseError, "collateral is not JSON"):
        doc = json.loads(text)
    if not isinstance(doc, dict):
        raise CollateralParseError("collateral must be a JSON object")
    missing = [k for k in (*_STR_FIELDS, *_BYTES_FIELDS) if k not in doc]
    if missing:
        raise CollateralParseError(f"collateral lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    for k in _STR_FIELDS:
        v = doc[k]
        if not isinstance(v, str):
            raise CollateralParseError(f"collateral field {k!r} must be a string")
        if not v.isascii():  # "\ud800" is JSON, not text
            utf8(v, CollateralParseError, f"collateral field {k!r}")
        values[k] = v
    for k in _BYTES_FIELDS:
        values[k] = _hex_or_list(k, doc[k])
    return Collateral(**values)


def collateral_to_json(collateral: Collateral) -> str:
    """QuoteCollateralV3 JSON, as dcap-qvl writes it (its field order; bytes as lower-case hex)."""
    doc = {
        "pck_crl_issuer_chain": collateral.pck_crl_issuer_chain,
        "root_ca_crl": collateral.root_ca_crl.hex(),
        "pck_crl": collateral.pck_crl.hex(),
        "tcb_info_issuer_chain": collateral.tcb_info_issuer_chain,
        "tcb_info": collateral.tcb_info,
        "tcb_info_signature": collateral.tcb_info_signature.hex(),
        "qe_identity_issuer_chain": collateral.qe_identity_issuer_chain,
        "qe_identity": collateral.qe_identity,
        "qe_identity_signature": collateral.qe_identity_signature.hex(),
    }
    return json.dumps(doc, indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    tcb_date: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IsvTcbLevel:
    """A TCB level of the QE identity or of a TDX module identity: keyed by one ISV SVN."""

    isv_svn: int
    tcb_date: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module_mrsigner: bytes | None
    tdx_module_attributes: bytes | None
    tdx_module_attributes_mask: bytes | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]
    # The signed text this was read from: explanations read the components' names from it.
    source: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[IsvTcbLevel, ...]


class _Doc:
    """Typed field access into one JSON object; every mismatch is a CollateralParseError."""

    __slots__ = ("doc", "where")

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise CollateralParseError(f"{where} must be a JSON object")
        self.doc: dict[str, object] = doc
        self.where = where

    def _get(self, key: str) -> object:
        if key not in self.doc:
            raise CollateralParseError(f"{self.where} lacks {key!r}")
        return self.doc[key]

    def has(self, key: str) -> bool:
        return key in self.doc

    def text(self, key: str) -> str:
        v = self._get(key)
        if not isinstance(v, str):
            raise CollateralParseError(f"{self.where}.{key} must be a string")
        return v

    def uint(self, key: str) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CollateralParseError(f"{self.where}.{key} must be a non-negative integer")
        return v

    def hexbytes(self, key: str, size: int | None = None) -> bytes:
        s = self.text(key)
        if _HEX.fullmatch(s):  # the usual case: nothing fromhex could refuse
            v = bytes.fromhex(s)
        else:
            with parsing(CollateralParseError, f"{self.where}.{key} is not valid hex"):
                v = bytes.fromhex(s)
        if size is not None and len(v) != size:
            raise CollateralParseError(f"{self.where}.{key}: expected {size} bytes, found {len(v)}")
        return v

    def when(self, key: str) -> datetime.datetime:
        s = self.text(key)
        with parsing(CollateralParseError, f"{self.where}.{key} is not an RFC 3339 time"):
            t = datetime.datetime.fromisoformat(s)
        if t.tzinfo is None:
            raise CollateralParseError(f"{self.where}.{key} has no time zone: {s!r}")
        return t

    def items(self, key: str) -> list[object]:
        v = self._get(key)
        if not isinstance(v, list):
            raise CollateralParseError(f"{self.where}.{key} must be a list")
        return v

    def obj(self, key: str) -> _Doc:
        return _Doc(self._get(key), f"{self.where}.{key}")

    def each(self, key: str) -> list[_Doc]:
        """The objects of the list under `key`."""
        return [_Doc(raw, f"{self.where}.{key}[{i}]") for i, raw in enumerate(self.items(key))]

    def status(self, key: str) -> TcbStatus:
        s = self.text(key)
        if s not in _STATUSES:
            raise CollateralParseError(f"{self.where}.{key}: unknown TCB status {s!r}")
        return TcbStatus(s)

    def advisories(self) -> tuple[str, ...]:
        if not self.has("advisoryIDs"):
            return ()
        ids = self.items("advisoryIDs")
        if not all(isinstance(i, str) for i in ids):
            raise CollateralParseError(f"{self.where}.advisoryIDs must be strings")
        return tuple(str(i) for i in ids)

    def isv_levels(self) -> tuple[IsvTcbLevel, ...]:
        """The `tcbLevels` of the QE identity or of a TDX module identity."""
        fast = _fast_isv_levels(self.doc.get("tcbLevels"))
        if fast is not None:
            return fast
        return tuple(
            IsvTcbLevel(
                lv.obj("tcb").uint("isvsvn"), lv.text("tcbDate"), lv.status("tcbStatus"), lv.advisories()
            )
            for lv in self.each("tcbLevels")
        )

    def tcb_levels(self) -> tuple[TcbLevel, ...]:
        """The `tcbLevels` of TCB info."""
        fast = _fast_levels(self.doc.get("tcbLevels"))
        return fast if fast is not None else _levels(self)


class _Irregular(Exception):
    """Raised by _Plain at the first thing out of the ordinary."""


# What reading a document with _Plain may raise: then _Doc reads it again and names the fault.
_IRREGULAR = (_Irregular, KeyError, TypeError, ValueError)


class _Plain(_Doc):
    """_Doc for the usual, well-formed document, without naming faults (the hot spot of a first
    verification): any fault raises one of _IRREGULAR, and `_read` has _Doc read the document
    again to name it. It accepts nothing _Doc refuses (tests/test_tdx_fast_paths.py holds it to
    that)."""

    __slots__ = ()

    def __init__(self, doc: object) -> None:
        if type(doc) is not dict:
            raise _Irregular
        self.doc = doc
        self.where = ""

    def _get(self, key: str) -> object:
        return self.doc[key]

    def text(self, key: str) -> str:
        v = self.doc[key]
        if type(v) is not str:
            raise _Irregular
        return v

    def uint(self, key: str) -> int:
        v = self.doc[key]
        if type(v) is not int or v < 0:
            raise _Irregular
        return v

    def hexbytes(self, key: str, size: int | None = None) -> bytes:
        v = bytes.fromhex(self.text(key))
        if size is not None and len(v) != size:
            raise _Irregular
        return v

    def when(self, key: str) -> datetime.datetime:
        t = datetime.datetime.fromisoformat(self.text(key))
        if t.tzinfo is None:
            raise _Irregular
        return t

    def items(self, key: str) -> list[object]:
        v = self.doc[key]
        if type(v) is not list:
            raise _Irregular
        return v

    def obj(self, key: str) -> _Doc:
        return _Plain(self.doc[key])

    def each(self, key: str) -> list[_Doc]:
        return [_Plain(raw) for raw in self.items(key)]

    def status(self, key: str) -> TcbStatus:
        return _STATUS_OF[self.text(key)]

    def advisories(self) -> tuple[str, ...]:
        return _advisories(self.doc)

    def isv_levels(self) -> tuple[IsvTcbLevel, ...]:
        fast = _fast_isv_levels(self.doc.get("tcbLevels"))
        if fast is None:
            raise _Irregular
        return fast

    def tcb_levels(self) -> tuple[TcbLevel, ...]:
        fast = _fast_levels(self.doc.get("tcbLevels"))
        if fast is None:
            raise _Irregular
        return fast


_T = TypeVar("_T")


def _json(text: str, what: str) -> object:
    with parsing(CollateralParseError, f"{what} is not JSON"):
        return json.loads(text)


def _load(text: str, what: str) -> _Doc:
    return _Doc(_json(text, what), what)


def _read(text: str, what: str, build: Callable[[_Doc], _T]) -> _T:
    """`build` the document of the JSON `text` with _Plain, or with _Doc when _Plain meets a fault."""
    doc = _json(text, what)
    try:
        return build(_Plain(doc))
    except _IRREGULAR:  # not converted: _Doc meets the fault too, and names it
        pass
    return build(_Doc(doc, what))


def _svns(doc: _Doc, key: str) -> tuple[int, ...]:
    items = doc.items(key)
    out = tuple(c.get("svn") if isinstance(c, dict) else None for c in items)
    for i, svn in enumerate(out):
        if not isinstance(svn, int) or isinstance(svn, bool) or not 0 <= svn <= 255:
            raise CollateralParseError(f"{doc.where}.{key}[{i}].svn must be an integer 0..255")
    if len(out) != 16:
        raise CollateralParseError(f"{doc.where}.{key}: expected 16 components, found {len(out)}")
    return out  # type: ignore[return-value]


_STATUS_OF = {s.value: s for s in TcbStatus}
_SVN = operator.itemgetter("svn")
_INT = {int}


def _advisories(lv: dict[str, object]) -> tuple[str, ...]:
    """A well-formed level's advisory IDs (none when absent); raises _Irregular otherwise."""
    if "advisoryIDs" not in lv:
        return ()
    ids = lv["advisoryIDs"]
    if type(ids) is not list or list(map(type, ids)).count(str) != len(ids):
        raise _Irregular
    return tuple(ids)


def _level_tail(lv: dict[str, object]) -> tuple[str, TcbStatus, tuple[str, ...]]:
    """The date, status and advisory IDs of a well-formed TCB level of either kind (TCB info's,
    or an ISV SVN's); raises one of _IRREGULAR otherwise."""
    date, status = lv["tcbDate"], lv["tcbStatus"]
    if type(date) is not str or type(status) is not str:
        raise _Irregular
    return date, _STATUS_OF[status], _advisories(lv)


def _fast_isv_levels(raw: object) -> tuple[IsvTcbLevel, ...] | None:
    """Well-formed ISV levels without _Doc; None for the general reader to name the fault."""
    if type(raw) is not list:
        return None
    levels = []
    try:
        for lv in raw:
            svn = lv["tcb"]["isvsvn"]
            if type(lv) is not dict or type(svn) is not int or svn < 0:
                return None
            levels.append(IsvTcbLevel(svn, *_level_tail(lv)))
    except _IRREGULAR:  # not converted: the general reader names the fault
        return None
    return tuple(levels)


def _fast_levels(raw: object) -> tuple[TcbLevel, ...] | None:
    """The TCB levels of well-formed TCB info, read without _Doc (the hot spot of a first
    verification); None at the first thing out of the ordinary, for `_levels` to name."""
    if type(raw) is not list:
        return None
    levels = []
    try:
        for lv in raw:
            tcb = lv["tcb"]
            sgx = tuple(map(_SVN, tcb["sgxtcbcomponents"]))
            has_tdx = "tdxtcbcomponents" in tcb  # absent: none; present: exactly 16
            tdx = tuple(map(_SVN, tcb["tdxtcbcomponents"])) if has_tdx else ()
            pce_svn = tcb["pcesvn"]
            svns = sgx + tdx
            if (
                type(lv) is not dict
                or type(tcb) is not dict
                or len(sgx) != 16
                or len(tdx) != (16 if has_tdx else 0)
                or set(map(type, svns)) != _INT  # no bool, no float, nothing but int
                or type(pce_svn) is not int
                or pce_svn < 0
            ):
                return None
            bytes(svns)  # each 0..255, or ValueError
            levels.append(TcbLevel(sgx, pce_svn, tdx, *_level_tail(lv)))
    except _IRREGULAR:  # not converted: the general reader names the fault
        return None
    return tuple(levels)


def _levels(d: _Doc) -> tuple[TcbLevel, ...]:
    levels = []
    for i, raw in enumerate(d.items("tcbLevels")):
        lv = _Doc(raw, f"tcb_info.tcbLevels[{i}]")
        tcb = lv.obj("tcb")
        tdx = _svns(tcb, "tdxtcbcomponents") if tcb.has("tdxtcbcomponents") else ()
        levels.append(
            TcbLevel(
                _svns(tcb, "sgxtcbcomponents"),
                tcb.uint("pcesvn"),
                tdx,
                lv.text("tcbDate"),
                lv.status("tcbStatus"),
                lv.advisories(),
            )
        )
    return tuple(levels)


def component_names(tcb_info: TcbInfo) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """For explanations: each SGX and TDX component's "category" and "type" as the first TCB
    level names them ("BIOS, Early Microcode Update"; "" when unnamed). Informational: whatever
    does not read as text is left unnamed."""
    return _component_names(tcb_info.source)


@functools.lru_cache(maxsize=32)
def _component_names(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # `source` was parsed before (parse_tcb_info): only its shape is in question here.
    doc = json.loads(source) if source else {}
    levels = doc.get("tcbLevels") if isinstance(doc, dict) else None
    first = levels[0] if isinstance(levels, list) and levels else None
    tcb = first.get("tcb") if isinstance(first, dict) else None

    def names(key: str) -> tuple[str, ...]:
        components = tcb.get(key) if isinstance(tcb, dict) else None
        out = []
        for c in components if isinstance(components, list) else []:
            parts = [c.get(k) for k in ("category", "type")] if isinstance(c, dict) else []
            out.append(", ".join(p for p in parts if isinstance(p, str)))
        return tuple(out)

    return names("sgxtcbcomponents"), names("tdxtcbcomponents")


def parse_tcb_info(text: str) -> TcbInfo:
    """Parse the signed `tcbInfo` JSON text (TDX TCB info v3)."""
    return _read(text, "tcb_info", lambda d: _tcb_info(d, text))


def _tcb_info(d: _Doc, text: str) -> TcbInfo:
    # Read in this order, so that of several faults the general reader names the same one first.
    levels = d.tcb_levels()
    module = d.obj("tdxModule") if d.has("tdxModule") else None
    identities = tuple(
        TdxModuleIdentity(
            m.text("id"),
            m.hexbytes("mrsigner", 48),
            m.hexbytes("attributes", 8),
            m.hexbytes("attributesMask", 8),
            m.isv_levels(),
        )
        for m in (d.each("tdxModuleIdentities") if d.has("tdxModuleIdentities") else [])
    )
    return TcbInfo(
        id=d.text("id") if d.has("id") else "",
        version=d.uint("version"),
        issue_date=d.when("issueDate"),
        next_update=d.when("nextUpdate"),
        fmspc=d.hexbytes("fmspc", 6),
        pce_id=d.hexbytes("pceId", 2),
        tcb_type=d.uint("tcbType"),
        tcb_evaluation_data_number=d.uint("tcbEvaluationDataNumber"),
        tdx_module_mrsigner=module.hexbytes("mrsigner", 48) if module else None,
        tdx_module_attributes=module.hexbytes("attributes", 8) if module else None,
        tdx_module_attributes_mask=module.hexbytes("attributesMask", 8) if module else None,
        tdx_module_identities=identities,
        tcb_levels=levels,
        source=text,
    )


def parse_qe_identity(text: str) -> QeIdentity:
    """Parse the signed `enclaveIdentity` JSON text (QE identity v2)."""
    return _read(text, "qe_identity", _qe_identity)


def _qe_identity(d: _Doc) -> QeIdentity:
    return QeIdentity(
        id=d.text("id"),
        version=d.uint("version"),
        issue_date=d.when("issueDate"),
        next_update=d.when("nextUpdate"),
        tcb_evaluation_data_number=d.uint("tcbEvaluationDataNumber"),
        miscselect=d.hexbytes("miscselect", 4),
        miscselect_mask=d.hexbytes("miscselectMask", 4),
        attributes=d.hexbytes("attributes", 16),
        attributes_mask=d.hexbytes("attributesMask", 16),
        mrsigner=d.hexbytes("mrsigner", 32),
        isv_prod_id=d.uint("isvprodid"),
        tcb_levels=d.isv_levels(),
    )
