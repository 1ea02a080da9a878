"""One collateral item, checked: what a service served (or the cache kept), verified on its own.

Every item is checked the same way whether it was just fetched or read back from the cache:

* TCB info and QE identity: the signed object (`tcbInfo` / `enclaveIdentity`) is cut out of the
  served body byte for byte (never re-serialised: the signature covers those bytes), its issuer
  chain must lead to a trusted root, its signature must verify under the chain's leaf, and it
  must parse and be what was asked for (the FMSPC's TDX TCB info; the `TD_QE` identity);
* the PCK CRL: its issuer chain leads to a trusted root, the CRL is signed by the chain's leaf,
  and, under Intel's root, that leaf is the CA asked for (platform or processor);
* the root CA CRL: signed by a trusted root.

An item that fails is never used: `ItemInvalid` says why, and the caller fetches it again.
Whether an item is current is judged apart (`Item.usable`), by the verifier's own rules.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass

from eemini.tdx.chain import Context, ec_key, ecdsa_verify_raw, verified_crl
from eemini.tdx.collateral import parse_qe_identity, parse_tcb_info
from eemini.tdx.errors import CollateralSignatureInvalid, QuoteError, VerificationError
from eemini.tdx.guard import parsing
from eemini.tdx.pcs.service import Kind, Served

_WS = re.compile(r"[ \t\n\r]*")
_MEMBER = {Kind.TCB_INFO: "tcbInfo", Kind.QE_IDENTITY: "enclaveIdentity"}
# Under Intel's root, the common name of the CA that issues each PCK CRL.
_INTEL_PCK_CAS = {"platform": "'Intel SGX PCK Platform CA'", "processor": "'Intel SGX PCK Processor CA'"}


class ItemInvalid(QuoteError):
    """The item does not verify; the message says why."""


@dataclass(frozen=True, slots=True, eq=False)
class Item:
    """A verified item: what was served, and what the verifier reads from it. Compared and hashed
    by identity: one verified reading of one cache file or answer."""

    served: Served
    fetched_at: int  # Unix seconds, the fetching machine's clock
    signed: str  # the signed JSON object's exact text ("" for a CRL)
    signature: bytes  # r||s (b"" for a CRL)
    issued: datetime.datetime  # issueDate, or the CRL's thisUpdate
    next_update: datetime.datetime

    @property
    def is_crl(self) -> bool:
        return not self.served.item.signed_json

    def usable(self, when: datetime.datetime) -> bool:
        """Current at `when`, as the verifier judges it: a CRL up to (not including) its
        nextUpdate second, TCB info and QE identity through theirs."""
        if self.is_crl:
            return self.issued <= when < self.next_update
        return self.issued <= when <= self.next_update


def split_signed_json(body: bytes, member: str) -> tuple[str, bytes]:
    """The exact text of `member` and the signature from `{"<member>": {...}, "signature": "<hex>"}`.

    The object is walked key by key with the json module's own scanner, so the signed member is
    the very span of the served text, whatever its spacing."""
    with parsing(ItemInvalid, "the body is not UTF-8 text"):
        text = body.decode("utf-8")
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int, object]] = {}
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "{":
        raise ItemInvalid(f"the body is not a JSON object (it starts {text[:20]!r})")
    pos += 1
    with parsing(ItemInvalid, "the body is not JSON"):
        while True:
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos : pos + 1] == "}" and not spans:
                pos += 1
                break
            if text[pos : pos + 1] != '"':
                raise ItemInvalid(f"the body is not a JSON object: a key expected at offset {pos}")
            key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos : pos + 1] != ":":
                raise ItemInvalid(f"the body is not a JSON object: ':' expected at offset {pos}")
            start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            value, end = decoder.raw_decode(text, start)
            if key in spans:
                raise ItemInvalid(f"the body has {key!r} twice")
            spans[key] = (start, end, value)
            pos = _WS.match(text, end).end()  # type: ignore[union-attr]
            if text[pos : pos + 1] == ",":
                pos += 1
                continue
            if text[pos : pos + 1] != "}":
                raise ItemInvalid(f"the body is not a JSON object: ',' or '}}' expected at offset {pos}")
            pos += 1
            break
    if text[pos:].strip(" \t\n\r"):
        raise ItemInvalid(f"the body has more after its JSON object, at offset {pos}")
    if member not in spans or not isinstance(spans[member][2], dict):
        raise ItemInvalid(f"the body has no {member!r} object")
    signature = spans.get("signature", (0, 0, None))[2]
    if not isinstance(signature, str):
        raise ItemInvalid("the body has no 'signature' string")
    with parsing(ItemInvalid, "the body's 'signature' is not hex"):
        raw = bytes.fromhex(signature)
    if len(raw) != 64:
        raise ItemInvalid(f"the body's 'signature' is {len(raw)} bytes, not 64 (r||s)")
    start, end, _ = spans[member]
    return text[start:end], raw


def check(ctx: Context, served: Served, fetched_at: int) -> Item:
    """Verify `served` on its own (see the module's docstring); ItemInvalid when it fails."""
    try:
        if served.item.signed_json:
            return _check_signed_json(ctx, served, fetched_at)
        return _check_crl(ctx, served, fetched_at)
    except VerificationError as e:
        raise ItemInvalid(e.one_line()) from None
    except QuoteError as e:  # parse errors of its parts
        raise ItemInvalid(str(e)) from None


def _check_signed_json(ctx: Context, served: Served, fetched_at: int) -> Item:
    item = served.item
    what = "TCB info" if item.kind == Kind.TCB_INFO else "QE identity"
    signed, signature = split_signed_json(served.body, _MEMBER[item.kind])
    certs = ctx.load_chain(served.issuer_chain, f"{what} issuer chain")
    _, _, chain = ctx.verify_chain(certs, f"{what} issuer chain")
    # The same entries the verifier makes (verify._check_signed_json): it then skips the signature.
    key = (signed, signature, served.issuer_chain)
    known = key in ctx.cache.tcb_infos or key in ctx.cache.qe_identities
    if not known and not ecdsa_verify_raw(ec_key(chain[0], what), signature, signed.encode()):
        raise CollateralSignatureInvalid(f"{what} is not signed by {chain[0].name}")
    if item.kind == Kind.TCB_INFO:
        info = ctx.cache.tcb_infos.get(key) or parse_tcb_info(signed)
        ctx.cache.tcb_infos[key] = info
        fmspc = info.fmspc.hex().upper()
        if fmspc != item.key or info.id != "TDX":
            raise ItemInvalid(f"it is the {info.id or 'SGX'} TCB info for FMSPC {fmspc}")
        return Item(served, fetched_at, signed, signature, info.issue_date, info.next_update)
    identity = ctx.cache.qe_identities.get(key) or parse_qe_identity(signed)
    ctx.cache.qe_identities[key] = identity
    if identity.id != "TD_QE":
        raise ItemInvalid(f"it is the {identity.id!r} identity, not the TDX QE's ('TD_QE')")
    return Item(served, fetched_at, signed, signature, identity.issue_date, identity.next_update)


def _check_crl(ctx: Context, served: Served, fetched_at: int) -> Item:
    item = served.item
    if item.kind == Kind.PCK_CRL:
        certs = ctx.load_chain(served.issuer_chain, "PCK CRL issuer chain")
        anchor, _, chain = ctx.verify_chain(certs, "PCK CRL issuer chain")
        want = _INTEL_PCK_CAS[item.key]
        if anchor.production and chain[0].name != want:
            raise ItemInvalid(f"it is issued by {chain[0].name}, not by {want}")
        crl = verified_crl(ctx, served.body, chain[0], "PCK CRL")
    else:
        error: ItemInvalid | None = None
        for anchor in ctx.anchors:
            try:
                crl = verified_crl(ctx, served.body, ctx.anchor_cert(anchor), "root CA CRL")
                break
            except QuoteError as e:
                error = ItemInvalid(str(e))
        else:
            raise error or ItemInvalid("no trusted root")
    return Item(served, fetched_at, "", b"", crl.this_update, crl.next_update)
