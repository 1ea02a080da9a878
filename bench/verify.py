"""Quote verifications per second over the real corpus with collateral: ours next to dcap-qvl's.

Each quote is verified at its collateral's `verify_at` with the default policy (accepted and rejected
quotes alike; a rejection is a complete verification too). Figures are the best of several passes,
interleaved so that both verifiers see the same machine load:

  dcap-qvl            dcap_qvl.verify (Rust), collateral decoded from JSON each time
  ours, no cache      eemini.tdx.verify with nothing cached: every signature checked every time
  ours, first pass    one fresh VerificationCache per pass over the corpus: certificates and
                      collateral shared by several quotes are verified once per pass
  ours, cached        the cache already warm (a fleet verifier seeing the same platforms again);
                      collateral decoded from JSON each time, as for dcap-qvl
  ours, fetch + warm  eemini verify --fetch-collateral's path in a long-lived verifier: the
                      collateral from a warm disk cache (eemini.tdx.pcs, --offline: no network),
                      then verified with the warm cache

Targets (issue 14): no cache >= 1.0x dcap-qvl, cached >= 3.0x, fetch + warm no slower than cached.

The two "floor" lines say what no verification without a cache can go below, measured in the
same passes over the same quotes:

  signatures          the 9 ECDSA P-256 checks of a first verification through `cryptography`,
                      one key checked again and again over 600 bytes
  library calls       the calls into libraries that such a verification cannot skip, back to back
                      with nothing between them: the collateral, its TCB info and QE identity
                      decoded from JSON, its CRLs from hex, the 3 certificates (PCK, PCK CA, TCB
                      signing) from base64, parsed with the 2 CRLs, the 4 keys loaded from their
                      points (those 3 certificates' and the attestation key; the root's is loaded
                      once), and the 9 checks, each with its own key over its own signed bytes.
                      Cutting the signed bytes out of the DER, reading the SGX extension and every
                      check between these calls are left out.
"""

from __future__ import annotations

import binascii
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "quotes"
PASSES = 15
SIGNATURES_PER_COLD_VERIFY = 9  # PCK leaf, PCK CA, TCB signing cert, both CRLs, TCB info,
# QE identity, the QE report and the quote
KEYS_PER_COLD_VERIFY = 4  # the PCK leaf's, the PCK CA's, the TCB signing certificate's, the
# attestation key


def main() -> None:
    if not (CORPUS / "expected.json").is_file():
        print(f"skipped: the quote corpus is not present at {CORPUS}")
        return
    import dcap_qvl

    from eemini.tdx.collateral import parse_collateral
    from eemini.tdx.errors import VerificationError
    from eemini.tdx.pcs import CollateralFetcher
    from eemini.tdx.policy import Policy
    from eemini.tdx.quote import parse_quote
    from eemini.tdx.verify import VerificationCache, verify

    items = []
    for e in json.loads((CORPUS / "expected.json").read_text()):
        if e.get("collateral_file"):
            items.append(
                (
                    (CORPUS / e["file"]).read_bytes(),
                    (CORPUS / e["collateral_file"]).read_text(),
                    e["verify_at"],
                )
            )
    policy = Policy()

    def ours(cache: VerificationCache | None) -> None:
        for quote, collateral, at in items:
            try:
                verify(quote, parse_collateral(collateral), policy, at, cache=cache)
            except VerificationError:
                pass

    def theirs() -> None:
        for quote, collateral, at in items:
            try:
                dcap_qvl.verify(quote, dcap_qvl.QuoteCollateralV3.from_json(collateral), at)
            except ValueError:
                pass

    warm = VerificationCache()
    ours(warm)
    # One cache directory per quote: the corpus holds several collateral sets for one FMSPC.
    scratch = tempfile.TemporaryDirectory(prefix="eemini-bench-collateral-")
    fetchers = []
    for i, (quote, collateral, _) in enumerate(items):
        directory = Path(scratch.name) / str(i)
        _seed(directory, parse_quote(quote), json.loads(collateral))
        fetchers.append(
            CollateralFetcher(
                cache_dir=directory, offline=True, verification_cache=warm, refresh_margin=0
            )
        )

    def fetch_and_verify() -> None:
        for (quote, _, at), fetcher in zip(items, fetchers, strict=True):
            try:
                parsed = parse_quote(quote)
                verify(parsed, fetcher.for_quote(parsed, at).collateral, policy, at, cache=warm)
            except VerificationError:
                pass

    fetch_and_verify()
    floor = _signature_checks(SIGNATURES_PER_COLD_VERIFY * len(items))
    library = _library_calls(items)
    runs: dict[str, Callable[[], None]] = {
        "dcap-qvl 0.7.0": theirs,
        "ours, no cache": lambda: ours(None),
        "ours, first pass (cold cache)": lambda: ours(VerificationCache()),
        "ours, cached (warm cache)": lambda: ours(warm),
        "ours, fetch + warm (disk cache)": fetch_and_verify,
        "signature floor": floor,
        "library floor": library,
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(PASSES):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    scratch.cleanup()
    print(f"corpus: {len(items)} quotes with collateral, best of {PASSES} passes")
    reference = len(items) / best["dcap-qvl 0.7.0"]
    ratio = {}
    for name, seconds in best.items():
        if name.endswith("floor"):
            continue
        rate = len(items) / seconds
        ratio[name] = rate / reference
        print(f"{name:32s} {rate:9.0f} quotes/s  {seconds / len(items) * 1e3:7.3f} ms/quote  "
              f"{rate / reference:5.2f}x dcap-qvl")  # fmt: skip
    for name, what in (
        ("signature floor", f"{SIGNATURES_PER_COLD_VERIFY} P-256 checks through cryptography, "
                            "one key again and again"),
        ("library floor", f"the library calls no verification without a cache can skip (JSON, "
                          f"{KEYS_PER_COLD_VERIFY} keys, 3 certificates, 2 CRLs, "
                          f"{SIGNATURES_PER_COLD_VERIFY} checks)"),
    ):  # fmt: skip
        print(f"floor: {what}: {best[name] / len(items) * 1e3:.3f} ms/quote, so no cache can reach "
              f"at most {best['dcap-qvl 0.7.0'] / best[name]:.2f}x dcap-qvl")  # fmt: skip
    cached, fetched = best["ours, cached (warm cache)"], best["ours, fetch + warm (disk cache)"]
    targets = [
        ("no cache >= 1.00x dcap-qvl", ratio["ours, no cache"] >= 1.0),
        ("cached >= 3.00x dcap-qvl", ratio["ours, cached (warm cache)"] >= 3.0),
        ("fetch + warm <= cached", fetched <= cached),
    ]
    print("targets: " + "; ".join(f"{what}: {'met' if ok else 'NOT met'}" for what, ok in targets))


def _seed(directory: Path, quote: object, doc: dict[str, str]) -> None:
    """Write a collateral file's four items into a cache directory as a service would serve them
    (the fetcher verifies every entry it reads, as it would any)."""
    from eemini.tdx.pcs.cache import DiskCache
    from eemini.tdx.pcs.fetch import platform_of
    from eemini.tdx.pcs.service import QE_IDENTITY, ROOT_CA_CRL, ItemId, Served
    from eemini.tdx.quote import Quote

    assert isinstance(quote, Quote)
    fmspc, ca = platform_of(quote)
    disk = DiskCache(directory)
    now = int(time.time())

    def body(member: str, text: str, signature: str) -> bytes:
        return f'{{"{member}":{text},"signature":"{signature}"}}'.encode()

    tcb = body("tcbInfo", doc["tcb_info"], doc["tcb_info_signature"])
    qe = body("enclaveIdentity", doc["qe_identity"], doc["qe_identity_signature"])
    for served in (
        Served(ItemId.tcb_info(fmspc), "corpus", tcb, doc["tcb_info_issuer_chain"]),
        Served(QE_IDENTITY, "corpus", qe, doc["qe_identity_issuer_chain"]),
        Served(ItemId.pck_crl(ca), "corpus", bytes.fromhex(doc["pck_crl"]), doc["pck_crl_issuer_chain"]),
        Served(ROOT_CA_CRL, "corpus", bytes.fromhex(doc["root_ca_crl"]), ""),
    ):  # fmt: skip
        disk.write(served, now)


def _library_calls(items: list[tuple[bytes, str, int]]) -> Callable[[], None]:
    """The library calls of a verification without a cache, back to back (see the docstring).
    What they work on (signed bytes, signatures, points, base64 text) is cut out beforehand."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from eemini.tdx.pck import pem_bodies
    from eemini.tdx.quote import parse_quote
    from eemini.tdx.roots import INTEL_ROOT

    curve, algorithm = ec.SECP256R1(), ec.ECDSA(hashes.SHA256())

    def der_signature(raw: bytes) -> bytes:
        return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    def point(cert: x509.Certificate) -> bytes:
        return cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    root_key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point(INTEL_ROOT.certificate))

    work = []
    for quote_bytes, text, _ in items:
        quote, doc = parse_quote(quote_bytes), json.loads(text)
        cd = quote.signature_data.certification
        bodies = pem_bodies(cd.pck_chain_pem, "PCK chain")[:2]
        bodies += pem_bodies(doc["tcb_info_issuer_chain"].encode(), "TCB info issuer chain")[:1]
        leaf, ca, tcb = (x509.load_der_x509_certificate(binascii.a2b_base64(b)) for b in bodies)
        root_crl = x509.load_der_x509_crl(bytes.fromhex(doc["root_ca_crl"]))
        pck_crl = x509.load_der_x509_crl(bytes.fromhex(doc["pck_crl"]))
        points = [point(leaf), point(ca), point(tcb), b"\x04" + quote.signature_data.attestation_key]
        checks = [  # (which key: leaf, CA, TCB signing, attestation, root; signature; signed bytes)
            (1, leaf.signature, leaf.tbs_certificate_bytes),
            (4, ca.signature, ca.tbs_certificate_bytes),
            (4, tcb.signature, tcb.tbs_certificate_bytes),
            (4, root_crl.signature, root_crl.tbs_certlist_bytes),
            (1, pck_crl.signature, pck_crl.tbs_certlist_bytes),
            (2, der_signature(bytes.fromhex(doc["tcb_info_signature"])), doc["tcb_info"].encode()),
            (2, der_signature(bytes.fromhex(doc["qe_identity_signature"])), doc["qe_identity"].encode()),
            (0, der_signature(cd.qe_report_signature), cd.qe_report.raw),
            (3, der_signature(quote.signature_data.signature), quote.signed_data),
        ]
        assert len(checks) == SIGNATURES_PER_COLD_VERIFY and len(points) == KEYS_PER_COLD_VERIFY
        work.append((text, bodies, points, checks))

    def run() -> None:
        for text, bodies, points, checks in work:
            doc = json.loads(text)
            for name in ("root_ca_crl", "pck_crl"):
                x509.load_der_x509_crl(bytes.fromhex(doc[name]))
            json.loads(doc["tcb_info"])
            json.loads(doc["qe_identity"])
            for body in bodies:
                x509.load_der_x509_certificate(binascii.a2b_base64(body))
            keys = [ec.EllipticCurvePublicKey.from_encoded_point(curve, p) for p in points]
            keys.append(root_key)
            for which, signature, signed in checks:
                keys[which].verify(signature, signed, algorithm)

    return run


def _signature_checks(count: int) -> Callable[[], None]:
    """`count` ECDSA P-256 / SHA-256 verifications through cryptography, over 600 bytes each."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.derive_private_key(12345, ec.SECP256R1())
    data = b"\x5a" * 600
    algorithm = ec.ECDSA(hashes.SHA256())
    signature = key.sign(data, algorithm)
    public = key.public_key()

    def run() -> None:
        for _ in range(count):
            public.verify(signature, data, algorithm)

    return run


if __name__ == "__main__":
    main()
