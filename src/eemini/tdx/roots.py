"""Trust anchors: Intel's SGX Root CA, embedded and pinned by fingerprint.

The PEM below is the "Intel SGX Root CA" certificate (serial 22650cd65a9d3489f383b49552bf501b392706ac,
valid 2018-05-21 to 2049-12-31) that every production PCK, TCB-signing and PCK-CA chain ends at;
Intel publishes it at its trusted-services certificates site as IntelSGXRootCA.der. The same DER is
embedded in dcap-qvl. The pin makes any edit of the PEM fail at import rather than trust a new key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from eemini.tdx.errors import CertificateParseError
from eemini.tdx.guard import parsing
from eemini.tdx.pck import load_pem_certificate

INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    name: str
    certificate: x509.Certificate
    der: bytes
    sha256: str
    production: bool


def _anchor(name: str, cert: x509.Certificate, production: bool) -> TrustAnchor:
    der = cert.public_bytes(Encoding.DER)
    return TrustAnchor(name, cert, der, hashlib.sha256(der).hexdigest(), production)


def intel_root() -> TrustAnchor:
    anchor = _anchor("Intel SGX Root CA", x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM), True)
    if anchor.sha256 != INTEL_SGX_ROOT_CA_SHA256:
        raise AssertionError(f"embedded Intel SGX Root CA has fingerprint {anchor.sha256}")
    return anchor


INTEL_ROOT = intel_root()


def development_root(pem: bytes) -> TrustAnchor:
    """A development root the caller chose to trust explicitly (never trusted by default)."""
    what = "development root is not a PEM certificate"
    cert = load_pem_certificate(pem, what)
    with parsing(CertificateParseError, what):
        _ = cert.extensions  # configuration, read once: all of it must parse
        return _anchor(f"development root {cert.subject.rfc4514_string()}", cert, False)
