"""The verifier's fast paths agree with the slow, general readers they stand in for.

A first verification reads TCB info, QE identity, revoked serial numbers, certificate headers and
certificate keys without the general readers (collateral._Doc, cryptography's accessors); these
tests hold each fast path to the reader it replaces, on the real corpus and on mutated input.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_testdata
from eemini.tdx import chain, collateral, pck
from eemini.tdx.chain import Crl, split_signed
from eemini.tdx.errors import CertificateParseError, CollateralParseError, QuoteParseError
from eemini.tdx.pck import pem_ders
from eemini.tdx.quote import parse_quote
from json_changes import change
from tdx_builder import der_tlv


def _collaterals() -> list[dict[str, Any]]:
    d = shared_testdata("quotes")
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.collateral.json"))]


def _slow_levels(text: str) -> tuple[collateral.TcbLevel, ...]:
    return collateral._levels(collateral._load(text, "tcb_info"))


def _slow_isv_levels(text: str) -> tuple[collateral.IsvTcbLevel, ...]:
    doc = collateral._load(text, "qe_identity")
    levels = []
    for i, raw in enumerate(doc.items("tcbLevels")):
        lv = collateral._Doc(raw, f"qe_identity.tcbLevels[{i}]")
        isv = lv.obj("tcb").uint("isvsvn")
        date, status = lv.text("tcbDate"), lv.status("tcbStatus")
        levels.append(collateral.IsvTcbLevel(isv, date, status, lv.advisories()))
    return tuple(levels)


def test_corpus_levels_equal_the_general_reader() -> None:
    docs = _collaterals()
    assert len(docs) == 15
    for doc in docs:
        info = collateral.parse_tcb_info(doc["tcb_info"])
        assert collateral._fast_levels(json.loads(doc["tcb_info"])["tcbLevels"]) is not None
        assert info.tcb_levels == _slow_levels(doc["tcb_info"])
        raw = json.loads(doc["qe_identity"])["tcbLevels"]
        assert collateral._fast_isv_levels(raw) == _slow_isv_levels(doc["qe_identity"])


def test_corpus_crl_serials_equal_cryptography() -> None:
    seen = 0
    for doc in _collaterals():
        for key in ("root_ca_crl", "pck_crl"):
            der = bytes.fromhex(doc[key])
            theirs = x509.load_der_x509_crl(der)
            signed = split_signed(der, key)
            first = 1 if signed.field_tags[0] == 0x02 else 0
            tags, fields = signed.field_tags, signed.fields
            entries = fields[first + 4] if tags[first + 4] == 0x30 else b""
            serials = frozenset(e.serial_number for e in theirs)
            assert chain._revoked_serials(entries, key) == serials
            seen += len(serials)
    assert seen > 100  # the PCK CRLs list dozens each


def test_corpus_keys_equal_cryptography() -> None:
    for doc in _collaterals():
        for key in ("pck_crl_issuer_chain", "tcb_info_issuer_chain"):
            for der in pem_ders(doc[key].encode(), key):
                cert = x509.load_der_x509_certificate(der)
                signed = split_signed(der, key)
                first = 1 if signed.field_tags[0] == 0xA0 else 0
                assert chain._spki_key(cert, signed, first) == cert.public_key()


def _entry(serial_contents: bytes) -> bytes:
    return der_tlv(0x30, der_tlv(0x02, serial_contents) + der_tlv(0x17, b"250101000000Z"))


def _crl(entries: bytes) -> Crl:
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    return Crl(
        crl=None,  # type: ignore[arg-type]
        issuer=b"", this_update=now, next_update=now, entries=entries, what="CRL",
    )  # fmt: skip


def test_is_revoked_finds_a_serial_however_it_is_encoded() -> None:
    serial = 0x1234
    minimal = _crl(_entry(b"\x00\x99") + _entry(b"\x12\x34"))
    padded = _crl(_entry(b"\x00\x00\x12\x34"))  # not DER, but the same INTEGER
    negative = _crl(_entry(b"\xff\xfe"))
    assert (minimal.is_revoked(serial), padded.is_revoked(serial)) == (True, True)
    assert (minimal.is_revoked(0x99), minimal.is_revoked(0x1235)) == (True, False)
    assert (negative.is_revoked(-2), negative.is_revoked(0xFFFE)) == (True, False)
    # Bytes of the serial elsewhere in an entry (here, in its date) are no revocation.
    assert _crl(_entry(b"\x01")).is_revoked(int.from_bytes(b"2501", "big")) is False
    assert _crl(b"").is_revoked(serial) is False


def _outcome(parse: Any, text: str) -> object:
    try:
        return parse(text)
    except CollateralParseError as e:
        return f"error: {e}"


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_mutated_levels_read_alike(data: st.DataObject) -> None:
    # Change one value somewhere inside the TCB levels (or the QE identity's): the fast path and
    # the general reader give the same levels, or the general reader's error.
    docs = _collaterals()
    doc = data.draw(st.sampled_from(docs))
    which = data.draw(st.sampled_from(["tcb_info", "qe_identity"]))
    obj = json.loads(doc[which])
    change(data, obj["tcbLevels"])
    text = json.dumps(obj)
    if which == "tcb_info":
        fast: object = collateral._fast_levels(obj["tcbLevels"])
        slow = _outcome(_slow_levels, text)
        parsed = _outcome(collateral.parse_tcb_info, text)
    else:
        fast = collateral._fast_isv_levels(obj["tcbLevels"])
        slow = _outcome(_slow_isv_levels, text)
        parsed = _outcome(collateral.parse_qe_identity, text)
    if fast is not None:
        assert fast == slow
    if isinstance(slow, str):
        assert parsed == slow
    else:
        assert parsed.tcb_levels == slow  # type: ignore[attr-defined]


def _build(which: str, reader: collateral._Doc, text: str) -> object:
    if which == "tcb_info":
        return collateral._tcb_info(reader, text)
    return collateral._qe_identity(reader)


def _plain(which: str, text: str) -> object:
    """The document as _Plain reads it; None when it meets a fault (for _Doc to name)."""
    try:
        return _build(which, collateral._Plain(json.loads(text)), text)
    except collateral._IRREGULAR:
        return None


def _general(which: str, text: str) -> object:
    return _outcome(lambda t: _build(which, collateral._Doc(json.loads(t), which), t), text)


def test_corpus_documents_read_plainly_as_the_general_reader_reads_them() -> None:
    for doc in _collaterals():
        for which in ("tcb_info", "qe_identity"):
            plain = _plain(which, doc[which])
            assert plain is not None
            assert plain == _general(which, doc[which])


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_mutated_documents_read_alike(data: st.DataObject) -> None:
    # Change one value anywhere in TCB info or QE identity: _Plain reads what the general reader
    # reads, or gives up; parsing gives the general reader's document or its error.
    doc = data.draw(st.sampled_from(_collaterals()))
    which = data.draw(st.sampled_from(["tcb_info", "qe_identity"]))
    obj = json.loads(doc[which])
    change(data, obj, remove=True)
    text = json.dumps(obj)
    general = _general(which, text)
    plain = _plain(which, text)
    if plain is not None:
        assert plain == general
    parse = collateral.parse_tcb_info if which == "tcb_info" else collateral.parse_qe_identity
    assert _outcome(parse, text) == general


def _sgx_extensions() -> list[bytes]:
    out = []
    for path in sorted(shared_testdata("quotes").glob("*.bin")):
        try:
            quote = parse_quote(path.read_bytes())
        except QuoteParseError:
            continue
        leaf = pem_ders(quote.signature_data.certification.pck_chain_pem, path.name)[0]
        extensions = chain._tbs_extensions(split_signed(leaf, path.name), path.name)
        out.append(extensions[chain._OID_SGX_EXTENSIONS])
    return out


def _pck_outcome(value: bytes, canonical: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if not canonical:
            m.setattr(pck, "_CANONICAL_TCB", re.compile(b"(?!)"))
        try:
            return pck.parse_pck_extension_value(value)
        except CertificateParseError as e:
            return f"error: {e}"


def test_corpus_tcb_components_read_in_place_as_by_oid(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _sgx_extensions()
    assert len(values) >= 15
    matched = 0
    for value in values:
        fast = _pck_outcome(value, True, monkeypatch)
        assert fast == _pck_outcome(value, False, monkeypatch)
        assert not isinstance(fast, str)
        matched += pck._CANONICAL_TCB.search(value) is not None
    assert matched >= 15  # the in-place reading is the usual one


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_changed_tcb_components_read_alike(data: st.DataObject) -> None:
    # Change, drop or insert a byte of the SGX extension: the in-place reading of the TCB
    # components and the reading by OID give the same extension, or the same error.
    value = bytearray(data.draw(st.sampled_from(_sgx_extensions())))
    at = data.draw(st.integers(0, len(value) - 1))
    change = data.draw(st.sampled_from(["set", "drop", "insert"]))
    if change == "set":
        value[at] = data.draw(st.integers(0, 255))
    elif change == "drop":
        del value[at]
    else:
        value.insert(at, data.draw(st.integers(0, 255)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast = _pck_outcome(bytes(value), True, monkeypatch)
        assert fast == _pck_outcome(bytes(value), False, monkeypatch)
