"""Intel's collateral services: where each item is asked for, and what a good answer looks like.

Intel PCS API v4 (https://api.trustedservices.intel.com) and any PCCS serve the same paths:

* TDX TCB info: `GET /tdx/certification/v4/tcb?fmspc=<FMSPC>`; issuer chain in the header
  `TCB-Info-Issuer-Chain` (or `SGX-TCB-Info-Issuer-Chain`); body
  `{"tcbInfo":{...},"signature":"<hex r||s>"}`, `application/json`.
* TDX QE identity: `GET /tdx/certification/v4/qe/identity`; header
  `SGX-Enclave-Identity-Issuer-Chain`; body `{"enclaveIdentity":{...},"signature":"<hex>"}`,
  `application/json`.
* PCK CRL: `GET /sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der`; header
  `SGX-PCK-CRL-Issuer-Chain`; body DER (`application/pkix-crl`; a PEM body is read too).
* Root CA CRL: from a PCCS, `GET /sgx/certification/v4/rootcacrl`, the hex text of the DER; from
  the PCS, the root certificate's CRL distribution point (Intel's certificates host), DER. It
  has no issuer chain: the root signs it.

Issuer chains are PEM, URL-encoded in the header. The FMSPC is sent as 12 upper-case hex digits
(a PCCS normalises to that; the PCS takes either). The QE identity is asked without `update=`:
both services then answer with the standard one.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
import re
import urllib.parse
from dataclasses import dataclass

from cryptography import x509

from eemini.tdx.errors import CollateralUnavailable
from eemini.tdx.guard import parsing
from eemini.tdx.pcs.http import HttpsClient, Response, status_text
from eemini.tdx.roots import INTEL_ROOT, TrustAnchor

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
FMSPC_RE = re.compile(r"[0-9A-Fa-f]{12}")
PCK_CAS = ("platform", "processor")


class Kind(enum.StrEnum):
    TCB_INFO = "tcb-info"
    QE_IDENTITY = "qe-identity"
    PCK_CRL = "pck-crl"
    ROOT_CA_CRL = "root-ca-crl"


@dataclass(frozen=True, slots=True, order=True)
class ItemId:
    """One cacheable item: TCB info per FMSPC, the TDX QE identity, the PCK CRL per CA, the root
    CA CRL."""

    kind: Kind
    key: str  # FMSPC (upper-case hex) | "TD_QE" | "platform" / "processor" | "root"

    @staticmethod
    def tcb_info(fmspc: bytes) -> ItemId:
        return ItemId(Kind.TCB_INFO, fmspc.hex().upper())

    @staticmethod
    def pck_crl(ca: str) -> ItemId:
        if ca not in PCK_CAS:
            raise ValueError(f"the PCK CA is 'platform' or 'processor', not {ca!r}")
        return ItemId(Kind.PCK_CRL, ca)

    def __str__(self) -> str:
        if self.kind == Kind.TCB_INFO:
            return f"the TCB info for FMSPC {self.key}"
        if self.kind == Kind.QE_IDENTITY:
            return "the TDX QE identity"
        if self.kind == Kind.PCK_CRL:
            return f"the PCK CRL of the {self.key} CA"
        return "the root CA CRL"

    @property
    def signed_json(self) -> bool:
        return self.kind in (Kind.TCB_INFO, Kind.QE_IDENTITY)


QE_IDENTITY = ItemId(Kind.QE_IDENTITY, "TD_QE")
ROOT_CA_CRL = ItemId(Kind.ROOT_CA_CRL, "root")


@dataclass(frozen=True, slots=True)
class Served:
    """An item as a service answered it: the body as served (the root CA CRL as DER, whatever
    the encoding it came in) and the issuer chain from its header, URL-decoded."""

    item: ItemId
    url: str
    body: bytes
    issuer_chain: str


@dataclass(frozen=True, slots=True)
class Source:
    """Where collateral comes from: Intel's PCS (`pcs()`), or a PCCS (`pccs(url)`), which serves
    the root CA CRL itself. `ca_file` pins the TLS certificate the service must present."""

    base_url: str
    is_pccs: bool
    ca_file: str | None = None
    root_ca_crl_url: str | None = None  # PCS: None reads the root's CRL distribution point

    @staticmethod
    def pcs(
        base_url: str = INTEL_PCS_URL, *, ca_file: str | None = None, root_ca_crl_url: str | None = None
    ) -> Source:
        return Source(_base(base_url), False, ca_file, root_ca_crl_url)

    @staticmethod
    def pccs(url: str, *, ca_file: str | None = None) -> Source:
        return Source(_base(url), True, ca_file)

    def describe(self) -> str:
        return f"{'PCCS' if self.is_pccs else 'PCS'} {self.base_url}"

    def url(self, item: ItemId, anchor: TrustAnchor = INTEL_ROOT) -> str:
        if item.kind == Kind.TCB_INFO:
            return f"{self.base_url}/tdx/certification/v4/tcb?fmspc={item.key}"
        if item.kind == Kind.QE_IDENTITY:
            return f"{self.base_url}/tdx/certification/v4/qe/identity"
        if item.kind == Kind.PCK_CRL:
            return f"{self.base_url}/sgx/certification/v4/pckcrl?ca={item.key}&encoding=der"
        if self.is_pccs:
            return f"{self.base_url}/sgx/certification/v4/rootcacrl"
        return self.root_ca_crl_url or crl_distribution_point(anchor)

    def with_root_ca_crl_url(self, url: str) -> Source:
        return dataclasses.replace(self, root_ca_crl_url=url)


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise CollateralUnavailable(f"{url!r} is not an https:// URL of a PCS or PCCS")
    if parts.query or parts.fragment:
        raise CollateralUnavailable(f"{url!r}: give the service's base URL, without a query")
    path = parts.path.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        path = path.removesuffix(suffix)
    return urllib.parse.urlunsplit(("https", parts.netloc, path, "", ""))


def crl_distribution_point(anchor: TrustAnchor) -> str:
    """The root's CRL distribution point (Intel's: its certificates host, IntelSGXRootCA.der)."""
    try:
        points = anchor.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        points = None
    for point in points.value if points else []:
        for name in point.full_name or []:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith("https://"):
                return str(name.value)
    raise CollateralUnavailable(f"{anchor.name} names no https:// CRL distribution point")


# Issuer chain header per kind: the first present is used.
_CHAIN_HEADERS = {
    Kind.TCB_INFO: ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
    Kind.QE_IDENTITY: ("SGX-Enclave-Identity-Issuer-Chain",),
    Kind.PCK_CRL: ("SGX-PCK-CRL-Issuer-Chain",),
    Kind.ROOT_CA_CRL: (),
}
_JSON = frozenset({"application/json"})
# Intel's PCS labels a DER CRL application/pkix-crl; caches and CDNs use the others.
_CRL = frozenset({"application/pkix-crl", "application/x-pkix-crl", "application/octet-stream",
                  "application/x-pem-file", ""})  # fmt: skip
_PEM_CRL = re.compile(rb"\A\s*-----BEGIN X509 CRL-----([A-Za-z0-9+/=\s]+)-----END X509 CRL-----\s*\Z")


def fetch(client: HttpsClient, source: Source, item: ItemId, anchor: TrustAnchor = INTEL_ROOT) -> Served:
    """Ask `source` for `item`; any answer but a well-formed one raises CollateralUnavailable."""
    url = source.url(item, anchor)
    response = client.get(url, str(item))
    if response.status != 200:
        raise CollateralUnavailable(_failed(response, item))
    chain = ""
    headers = _CHAIN_HEADERS[item.kind]
    if headers:
        value = next((v for h in headers if (v := response.header(h)) is not None), None)
        if value is None:
            raise CollateralUnavailable(
                f"GET {url}: {status_text(200, response.reason)} without the {headers[0]} header"
            )
        with parsing(
            CollateralUnavailable, f"GET {url}: the {headers[0]} header is not URL-encoded text"
        ):
            chain = urllib.parse.unquote(value, errors="strict")
    if item.signed_json:
        if response.media_type not in _JSON:
            raise CollateralUnavailable(
                f"GET {url}: expected application/json, got {response.media_type or 'no Content-Type'}"
            )
        return Served(item, url, response.body, chain)
    if item.kind == Kind.ROOT_CA_CRL and source.is_pccs:
        return Served(item, url, _hex_crl(response), chain)
    if response.media_type not in _CRL:
        raise CollateralUnavailable(f"GET {url}: expected a CRL, got {response.media_type}")
    return Served(item, url, _der_crl(response), chain)


def _failed(response: Response, item: ItemId) -> str:
    text = f"GET {response.url}: {status_text(response.status, response.reason)}"
    if response.status == 404:
        text += f" (the service has no {str(item).removeprefix('the ')})"
    details = [response.header("Error-Code"), response.header("Error-Message")]
    if any(details):
        text += ": " + ", ".join(d for d in details if d)
    if response.attempts > 1:
        text += f" (after {response.attempts} attempts)"
    request_id = response.header("Request-ID")
    return text + (f" [Request-ID {request_id}]" if request_id else "")


_HEX_TEXT = re.compile(rb"\s*(?:[0-9A-Fa-f]{2})+\s*")


def _hex_crl(response: Response) -> bytes:
    # A PCCS serves the root CA CRL as the hex text of its DER.
    if not _HEX_TEXT.fullmatch(response.body):
        raise CollateralUnavailable(
            f"GET {response.url}: the root CA CRL is not the hex text a PCCS serves "
            f"({len(response.body)} bytes, starting {response.body[:16]!r})"
        )
    return bytes.fromhex(response.body.decode("ascii"))


def _der_crl(response: Response) -> bytes:
    match = _PEM_CRL.match(response.body)
    if match is None:
        return response.body
    with parsing(CollateralUnavailable, f"GET {response.url}: the PEM CRL is not valid base64"):
        return binascii.a2b_base64(match.group(1))
