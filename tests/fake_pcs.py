"""A fake of Intel's collateral services for tests: a PCS or a PCCS over HTTPS on 127.0.0.1 only.

It serves the collateral it is given (QuoteCollateralV3 documents, e.g. the real Intel collateral
in ../shared/testdata/quotes) the way the real services answer, per Intel's PCS API v4 and the
PCCS reference implementation:

* `GET /tdx/certification/v4/tcb?fmspc=<12 hex>` (optional `update=early|standard` or
  `tcbEvaluationDataNumber=<n>`, not both): `{"tcbInfo":<the signed text>,"signature":"<hex>"}`,
  `Content-Type: application/json`, the issuer chain URL-encoded in `TCB-Info-Issuer-Chain`;
  400 for a malformed FMSPC or both options, 404 for an FMSPC it has no TCB info for.
* `GET /tdx/certification/v4/qe/identity`: `{"enclaveIdentity":...,"signature":...}`,
  `SGX-Enclave-Identity-Issuer-Chain`.
* `GET /sgx/certification/v4/pckcrl?ca=platform|processor[&encoding=der|pem]`: the CRL (PEM by
  default, as the PCS), `SGX-PCK-CRL-Issuer-Chain`; the PCS labels DER `application/pkix-crl`,
  a PCCS sends `application/octet-stream`; 400 for another CA, 404 for one it has no CRL of.
* PCCS only: `GET /sgx/certification/v4/rootcacrl`: the hex text of the root CA CRL's DER, sent
  as Express sends a string (`text/html; charset=utf-8`).
* PCS only: `GET /IntelSGXRootCA.der`: the root CA CRL as DER, standing in for the CRL
  distribution point of Intel's root (another host in reality; tests name this URL instead).

Every answer carries a `Request-ID`; anything else is 404. Each request is recorded
(`requests`), and `faults` change answers to test failures: another status (with headers such as
`Retry-After`), a delay, a body cut short of its announced length, a replaced or missing header.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TCB_PATH = "/tdx/certification/v4/tcb"
QE_PATH = "/tdx/certification/v4/qe/identity"
PCK_CRL_PATH = "/sgx/certification/v4/pckcrl"
ROOT_CRL_PATH = "/sgx/certification/v4/rootcacrl"
PCS_ROOT_CRL_PATH = "/IntelSGXRootCA.der"


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate it issued for 127.0.0.1 (files in `directory`)."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    @staticmethod
    def create(directory: Path) -> TlsFiles:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eemini test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        tls = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        tls.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        tls.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tls.key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return tls


@dataclass
class Fault:
    """How to spoil the answers to one path (for `times` requests; None: every one)."""

    status: int | None = None
    headers: dict[str, str | None] = field(default_factory=dict)  # None drops the header
    delay: float = 0.0
    cut: int | None = None  # send only this many bytes of the body, announcing all of it
    body: bytes | None = None
    times: int | None = None


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class FakePcs:
    """The fake service; `url` is its base URL. Use as a context manager, or call `close()`."""

    def __init__(self, tls: TlsFiles, *, pccs: bool) -> None:
        self.pccs = pccs
        self.tcb: dict[str, tuple[str, str, str]] = {}  # FMSPC -> (tcbInfo text, sig hex, chain)
        self.qe: tuple[str, str, str] | None = None
        self.pck_crls: dict[str, tuple[bytes, str]] = {}  # ca -> (DER, chain)
        self.root_crl: bytes | None = None
        self.requests: list[str] = []
        self.faults: dict[str, Fault] = {}
        self.lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_pem, tls.key_pem)
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, doc: dict[str, Any], ca: str = "platform") -> None:
        """Serve one QuoteCollateralV3 document: its TCB info (for its FMSPC), QE identity, PCK
        CRL (for `ca`) and root CA CRL, replacing what was served for those."""
        fmspc = json.loads(doc["tcb_info"])["fmspc"].upper()
        with self.lock:
            self.tcb[fmspc] = (doc["tcb_info"], doc["tcb_info_signature"], doc["tcb_info_issuer_chain"])
            self.qe = (doc["qe_identity"], doc["qe_identity_signature"], doc["qe_identity_issuer_chain"])
            self.pck_crls[ca] = (bytes.fromhex(doc["pck_crl"]), doc["pck_crl_issuer_chain"])
            self.root_crl = bytes.fromhex(doc["root_ca_crl"])

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.split("?")[0] == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakePcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # What the services answer ------------------------------------------------------------------

    def answer(self, path: str, query: dict[str, list[str]]) -> _Answer:
        request_id = uuid.uuid4().hex
        if path == TCB_PATH:
            return self._signed_json(query, request_id)
        if path == QE_PATH:
            if self.qe is None:
                return _Answer(404, {"Request-ID": request_id}, b"")
            text, signature, chain = self.qe
            return _json_answer("enclaveIdentity", text, signature, "SGX-Enclave-Identity-Issuer-Chain",
                                chain, request_id)  # fmt: skip
        if path == PCK_CRL_PATH:
            return self._pck_crl(query, request_id)
        if path == ROOT_CRL_PATH and self.pccs and self.root_crl is not None:
            return _Answer(
                200,
                {"Content-Type": "text/html; charset=utf-8", "Request-ID": request_id},
                self.root_crl.hex().encode(),
            )
        if path == PCS_ROOT_CRL_PATH and not self.pccs and self.root_crl is not None:
            return _Answer(200, {"Content-Type": "application/pkix-crl"}, self.root_crl)
        return _Answer(404, {"Request-ID": request_id}, b"")

    def _signed_json(self, query: dict[str, list[str]], request_id: str) -> _Answer:
        fmspc = query.get("fmspc", [""])
        update, number = query.get("update"), query.get("tcbEvaluationDataNumber")
        bad = (
            len(fmspc) != 1
            or len(fmspc[0]) != 12
            or any(c not in "0123456789abcdefABCDEF" for c in fmspc[0])
            or (update is not None and number is not None)
            or (update is not None and update != ["early"] and update != ["standard"])
        )
        if bad:
            return _Answer(400, {"Request-ID": request_id}, b"")
        found = self.tcb.get(fmspc[0].upper())
        if found is None:
            return _Answer(404, {"Request-ID": request_id}, b"")
        text, signature, chain = found
        return _json_answer("tcbInfo", text, signature, "TCB-Info-Issuer-Chain", chain, request_id)

    def _pck_crl(self, query: dict[str, list[str]], request_id: str) -> _Answer:
        ca = query.get("ca", [""])
        encoding = query.get("encoding", ["pem"])
        known = ca[0].lower() in ("platform", "processor") and encoding[0] in ("pem", "der")
        if len(ca) != 1 or len(encoding) != 1 or not known:
            return _Answer(400, {"Request-ID": request_id}, b"")
        found = self.pck_crls.get(ca[0].lower())
        if found is None:
            return _Answer(404, {"Request-ID": request_id}, b"")
        der, chain = found
        headers = {"Request-ID": request_id, "SGX-PCK-CRL-Issuer-Chain": _encode(chain)}
        if encoding[0] == "pem":
            crl = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
            return _Answer(200, {**headers, "Content-Type": "application/x-pem-file"}, crl)
        media = "application/octet-stream" if self.pccs else "application/pkix-crl"
        return _Answer(200, {**headers, "Content-Type": media}, der)


def _encode(pem: str) -> str:
    # As the services send it: every byte but letters, digits and "-_.~" percent-encoded.
    return urllib.parse.quote(pem, safe="")


def _json_answer(
    member: str, text: str, signature: str, header: str, chain: str, request_id: str
) -> _Answer:
    body = f'{{"{member}":{text},"signature":"{signature}"}}'.encode()
    return _Answer(
        200,
        {"Content-Type": "application/json", "Request-ID": request_id, header: _encode(chain)},
        body,
    )


class _Handler(BaseHTTPRequestHandler):
    fake: FakePcs
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        fake = self.fake
        with fake.lock:
            fake.requests.append(self.path)
            fault = fake.faults.get(parts.path)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times < 0:
                    fault = None
        answer = fake.answer(parts.path, urllib.parse.parse_qs(parts.query, keep_blank_values=True))
        if fault is not None:
            time.sleep(fault.delay)
            if fault.status is not None:
                answer.status = fault.status
            if fault.body is not None:
                answer.body = fault.body
            for name, value in fault.headers.items():
                answer.headers.pop(name, None)
                if value is not None:
                    answer.headers[name] = value
        body = answer.body
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if fault is not None and fault.cut is not None:
            body = body[: fault.cut]
        with contextlib.suppress(OSError):
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def running(tls: TlsFiles, *, pccs: bool) -> Iterator[FakePcs]:
    fake = FakePcs(tls, pccs=pccs)
    try:
        yield fake
    finally:
        fake.close()
