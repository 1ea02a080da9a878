"""Collateral the verifier fetches itself (eemini.tdx.pcs), against the fake PCS / PCCS of
tests/fake_pcs.py, which serves the real Intel collateral of ../shared/testdata/quotes over HTTPS on
127.0.0.1 with a test CA. No test reaches any other address: every in-process connection is
checked (`_loopback_only`), and every subprocess is given --pccs or --offline.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from conftest import REPO, shared_testdata
from eemini.tdx.collateral import parse_collateral
from eemini.tdx.errors import CollateralUnavailable, QuoteError, VerificationError
from eemini.tdx.pcs import CollateralFetcher, HttpsClient, Source
from eemini.tdx.pcs.cache import DiskCache
from eemini.tdx.pcs.service import QE_IDENTITY, ROOT_CA_CRL, ItemId
from eemini.tdx.policy import Policy
from eemini.tdx.quote import parse_quote
from eemini.tdx.verify import verify
from fake_pcs import (
    PCK_CRL_PATH,
    PCS_ROOT_CRL_PATH,
    QE_PATH,
    ROOT_CRL_PATH,
    TCB_PATH,
    FakePcs,
    Fault,
    TlsFiles,
)

EEMINI = [sys.executable, "-m", "eemini"]
ALL_PATHS = (TCB_PATH, QE_PATH, PCK_CRL_PATH, ROOT_CRL_PATH)


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.create_connection

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        assert address[0] == "127.0.0.1", f"a test tried to reach {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def pccs(tls: TlsFiles) -> Iterator[FakePcs]:
    with FakePcs(tls, pccs=True) as fake:
        yield fake


def _expected() -> dict[str, dict[str, Any]]:
    d = shared_testdata("quotes")
    return {e["file"]: e for e in json.loads((d / "expected.json").read_text())}


def _corpus_names() -> list[str]:
    try:
        d = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "quotes"
        entries = json.loads((d / "expected.json").read_text())
    except OSError:
        return ["no-testdata"]
    return [e["file"].removesuffix(".bin") for e in entries if e.get("collateral_file")]


def _load(name: str) -> tuple[bytes, dict[str, Any], int]:
    d = shared_testdata("quotes")
    e = _expected()[f"{name}.bin"]
    return (
        (d / f"{name}.bin").read_bytes(),
        json.loads((d / f"{name}.collateral.json").read_text()),
        e["verify_at"],
    )


def _fetcher(fake: FakePcs, tls: TlsFiles, cache: Path, **kwargs: Any) -> CollateralFetcher:
    source = Source.pccs(fake.url, ca_file=str(tls.ca_pem))
    kwargs.setdefault("client", HttpsClient(ca_file=str(tls.ca_pem), attempts=2, backoff=0.01))
    return CollateralFetcher(source, cache_dir=cache, **kwargs)


def _eemini(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*EEMINI, *args], check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def _outcome(quote: bytes, collateral: Any, at: int) -> str:
    try:
        return verify(quote, collateral, Policy(), at).tcb_status
    except VerificationError as e:
        return e.check


# The real services, reproduced ----------------------------------------------------------------


@pytest.mark.parametrize("name", _corpus_names())
def test_fetch_reproduces_the_collateral_file(
    name: str, pccs: FakePcs, tls: TlsFiles, tmp_path: Path
) -> None:
    quote, doc, at = _load(name)
    pccs.serve(doc)
    fetched = _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(quote), at)
    out = json.loads(fetched.to_json())
    assert out == doc
    assert pccs.requests == [
        f"{TCB_PATH}?fmspc={json.loads(doc['tcb_info'])['fmspc'].upper()}",
        QE_PATH,
        f"{PCK_CRL_PATH}?ca=platform&encoding=der",
        ROOT_CRL_PATH,
    ]
    # The quote verifies with it as it does with the file, and so it does under dcap-qvl.
    assert _outcome(quote, fetched.collateral, at) == _outcome(
        quote, parse_collateral(json.dumps(doc)), at
    )
    e = _expected()[f"{name}.bin"]
    try:
        status = dcap_qvl.verify(
            quote, dcap_qvl.QuoteCollateralV3.from_json(fetched.to_json()), at
        ).status
        assert (status, e["verify_error"]) == (e["status"], None)
    except ValueError as err:
        assert str(err) == e["verify_error"]


def test_pcs_root_ca_crl_from_the_distribution_point(tls: TlsFiles, tmp_path: Path) -> None:
    quote, doc, at = _load("go-tdx-guest__cos-113-tdx-quote")
    with FakePcs(tls, pccs=False) as pcs:
        pcs.serve(doc)
        source = Source.pcs(
            pcs.url, ca_file=str(tls.ca_pem), root_ca_crl_url=pcs.url + PCS_ROOT_CRL_PATH
        )
        fetched = CollateralFetcher(source, cache_dir=tmp_path).for_quote(parse_quote(quote), at)
        assert json.loads(fetched.to_json()) == doc
        assert pcs.requests[2:] == [f"{PCK_CRL_PATH}?ca=platform&encoding=der", PCS_ROOT_CRL_PATH]
    # Without an override, the PCS source asks the CRL distribution point of Intel's root.
    assert (
        Source.pcs().url(ROOT_CA_CRL)
        == "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    )
    assert (
        Source.pccs("https://pccs.example:8081/sgx/certification/v4/").base_url
        == "https://pccs.example:8081"
    )


def test_cli_fetch_then_verify_from_the_cache(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    _, doc, at = _load("dcap-qvl__tdx_quote")
    d = shared_testdata("quotes")
    pccs.serve(doc)
    common = ["--pccs", pccs.url, "--pccs-ca", str(tls.ca_pem), "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "collateral.json"
    proc = _eemini("collateral", "fetch", str(d / "dcap-qvl__tdx_quote.bin"), *common, "--at", str(at),
                   "--out", str(out))  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert json.loads(out.read_text()) == doc
    assert len(pccs.requests) == 4
    # A verify through the same cache asks for nothing, and agrees with the offline verification.
    proc = _eemini("verify", str(d / "dcap-qvl__tdx_quote.bin"), "--fetch-collateral", *common,
                   "--at", str(at), "--json")  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout)["tcb_status"] == "UpToDate"
    assert len(pccs.requests) == 4
    # --offline reads only the cache; so does a second verify through the fetcher.
    proc = _eemini("verify", str(d / "dcap-qvl__tdx_quote.bin"), "--offline", "--cache-dir",
                   str(tmp_path / "cache"), "--at", str(at))  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "tcb_status: UpToDate\n" in proc.stdout
    assert len(pccs.requests) == 4


def test_offline_names_everything_missing(tmp_path: Path) -> None:
    d = shared_testdata("quotes")
    proc = _eemini("verify", str(d / "trustee__tdx_quote_6.bin"), "--offline", "--cache-dir",
                   str(tmp_path), "--at", "1764162436")  # fmt: skip
    assert (proc.returncode, proc.stdout) == (4, "")
    assert proc.stderr == (
        f"eemini verify: error: cannot get collateral: offline, and the cache at {tmp_path} cannot "
        "serve: the TCB info for FMSPC 00A06D080000 is missing; the TDX QE identity is missing; the "
        "PCK CRL of the platform CA is missing; the root CA CRL is missing\n"
    )


def test_fmspc_and_ca_without_a_quote(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    _, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    proc = _eemini("collateral", "fetch", "--fmspc", "00a06d080000", "--ca", "platform", "--pccs",
                   pccs.url, "--pccs-ca", str(tls.ca_pem), "--cache-dir", str(tmp_path),
                   "--at", str(at))  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout) == doc
    proc = _eemini("collateral", "fetch", "--fmspc", "00a06d08", "--ca", "platform", "--offline")
    assert (proc.returncode, proc.stderr) == (
        2,
        "eemini collateral: error: --fmspc '00a06d08' is not 12 hex digits\n",
    )


# The cache ------------------------------------------------------------------------------------


def test_expired_items_are_fetched_again(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    # Two real sets for FMSPC B0C06F000000: July 2025 (dcap-qvl's sample) and September 2026.
    old_quote, old_doc, old_at = _load("dcap-qvl__tdx_quote")
    new_quote, new_doc, new_at = _load("dstack__guest-agent_attestation")
    pccs.serve(old_doc)
    fetcher = _fetcher(pccs, tls, tmp_path)
    assert (
        _outcome(old_quote, fetcher.for_quote(parse_quote(old_quote), old_at).collateral, old_at)
        == "UpToDate"
    )
    assert len(pccs.requests) == 4
    pccs.serve(new_doc)
    # A new fetcher (another process, in effect): every cached item has expired by new_at.
    fetched = _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(new_quote), new_at)
    assert fetched.from_cache == (False, False, False, False)
    assert json.loads(fetched.to_json()) == new_doc
    assert len(pccs.requests) == 8
    assert _outcome(new_quote, fetched.collateral, new_at) == "UpToDate"


def test_items_due_soon_are_refreshed_ahead_and_kept_when_that_fails(
    pccs: FakePcs, tls: TlsFiles, tmp_path: Path
) -> None:
    quote, doc, at = _load("dcap-qvl__tdx_quote")
    pccs.serve(doc)
    warnings: list[str] = []
    _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(quote), at - 86400)  # a day before
    assert len(pccs.requests) == 4
    # At `at` the TCB info, QE identity and PCK CRL are due (within an hour of nextUpdate); the
    # service fails, so the cached items, still current, are used, with a warning each.
    for path in ALL_PATHS:
        pccs.faults[path] = Fault(status=500)
    fetcher = _fetcher(pccs, tls, tmp_path, refetch_interval=0, warn=warnings.append)
    fetched = fetcher.for_quote(parse_quote(quote), at)
    assert fetched.from_cache == (True, True, True, True)
    kept = "ahead of its nextUpdate, using the cached one"
    assert [w.split(":")[0] for w in warnings] == [
        f"could not refresh the TCB info for FMSPC B0C06F000000 {kept}",
        f"could not refresh the TDX QE identity {kept}",
        f"could not refresh the PCK CRL of the platform CA {kept}",
    ]
    assert len(pccs.requests) == 4 + 3 * 2  # two attempts each; the root CA CRL was not due
    # With the default refetch interval, an item fetched moments ago is not asked for again.
    _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(quote), at)
    assert len(pccs.requests) == 10


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("signed", "collateral-signature: TCB info is not signed by 'Intel SGX TCB Signing'"),
        ("signature", "collateral-signature: TCB info is not signed by 'Intel SGX TCB Signing'"),
        ("chain", "collateral-signature: TCB info is not signed by 'Intel SGX PCK Platform CA'"),
        ("garbled", "it is not JSON: Expecting value: line 1 column 1 (char 0)"),
        ("other item", "it holds 'qe-identity' 'TD_QE', not the TCB info for FMSPC 00A06D080000"),
    ],
)
def test_a_tampered_entry_is_fetched_again(
    damage: str, why: str, pccs: FakePcs, tls: TlsFiles, tmp_path: Path
) -> None:
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(quote), at)
    disk = DiskCache(tmp_path)
    path = disk.path(ItemId.tcb_info(bytes.fromhex("00A06D080000")))
    entry = json.loads(path.read_text())
    if damage == "signed":
        entry["body"] = entry["body"].replace(
            '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18'
        )
    elif damage == "signature":
        body = json.loads(entry["body"])
        entry["body"] = entry["body"].replace(body["signature"], body["signature"][::-1])
    elif damage == "chain":
        entry["issuer_chain"] = doc["pck_crl_issuer_chain"]
    elif damage == "other item":
        entry = json.loads(disk.path(QE_IDENTITY).read_text())
    path.write_text("x" if damage == "garbled" else json.dumps(entry))
    warnings: list[str] = []
    fetched = _fetcher(pccs, tls, tmp_path, warn=warnings.append).for_quote(parse_quote(quote), at)
    assert warnings == [
        f"the cache entry {path} for the TCB info for FMSPC 00A06D080000 does not verify ({why}): "
        "fetching it again"
    ]
    assert fetched.from_cache == (False, True, True, True)
    assert pccs.requests[4:] == [f"{TCB_PATH}?fmspc=00A06D080000"]
    assert json.loads(fetched.to_json()) == doc
    # Offline, the same damage is an error that says so.
    path.write_text("x")
    with pytest.raises(
        CollateralUnavailable, match=r"TCB info for FMSPC 00A06D080000 does not verify \(it is not JSON"
    ):
        _fetcher(pccs, tls, tmp_path, offline=True).for_quote(parse_quote(quote), at)


def test_concurrent_fetchers_make_one_request_per_item(
    pccs: FakePcs, tls: TlsFiles, tmp_path: Path
) -> None:
    quote, doc, at = _load("trustee__tdx_quote_6")
    d = shared_testdata("quotes")
    pccs.serve(doc)
    for path in ALL_PATHS:
        pccs.faults[path] = Fault(delay=0.4)
    args = ["collateral", "fetch", str(d / "trustee__tdx_quote_6.bin"), "--pccs", pccs.url, "--pccs-ca",
            str(tls.ca_pem), "--cache-dir", str(tmp_path / "cache"), "--at", str(at)]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*EEMINI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [json.loads(out) for out, _ in outs] == [doc, doc]
    assert sorted(r.split("?")[0] for r in pccs.requests) == sorted(ALL_PATHS)
    # And two threads of one process, each with its own fetcher, on a fresh cache.
    pccs.requests.clear()
    results: list[object] = []

    def run() -> None:
        results.append(
            _fetcher(pccs, tls, tmp_path / "threads").for_quote(parse_quote(quote), at).to_json()
        )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [json.loads(str(r)) for r in results] == [doc, doc]
    assert sorted(r.split("?")[0] for r in pccs.requests) == sorted(ALL_PATHS)


def test_an_unwritable_cache_is_warned_about_not_fatal(
    pccs: FakePcs, tls: TlsFiles, tmp_path: Path
) -> None:
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    warnings: list[str] = []
    fetched = _fetcher(pccs, tls, blocker, warn=warnings.append).for_quote(parse_quote(quote), at)
    assert json.loads(fetched.to_json()) == doc
    assert len(warnings) == 8
    assert warnings[:2] == [
        f"cannot open the cache lock {blocker}/v1/locks/tcb-info-00A06D080000.lock: Not a directory",
        f"cannot write the cache entry {blocker}/v1/tcb-info/00A06D080000.json: Not a directory: the "
        "TCB info for FMSPC 00A06D080000 is not cached",
    ]


# Errors ---------------------------------------------------------------------------------------


def _fetch_error(pccs: FakePcs, tls: TlsFiles, tmp_path: Path, **kwargs: Any) -> str:
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    with pytest.raises(CollateralUnavailable) as e:
        _fetcher(pccs, tls, tmp_path, **kwargs).for_quote(parse_quote(quote), at)
    return str(e.value).replace(pccs.url, "URL")


def test_404_names_the_endpoint_and_the_status(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[QE_PATH] = Fault(status=404, headers={"Request-ID": "abc123"})
    assert _fetch_error(pccs, tls, tmp_path) == (
        "GET URL/tdx/certification/v4/qe/identity: HTTP 404 Not Found (the service has no TDX QE "
        "identity) [Request-ID abc123]"
    )


def test_500_is_retried_then_named(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[PCK_CRL_PATH] = Fault(status=500, headers={"Request-ID": "r1"})
    assert _fetch_error(pccs, tls, tmp_path) == (
        "GET URL/sgx/certification/v4/pckcrl?ca=platform&encoding=der: HTTP 500 Internal Server "
        "Error (after 2 attempts) [Request-ID r1]"
    )
    assert pccs.count(PCK_CRL_PATH) == 2


def test_503_then_success_is_retried(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    pccs.faults[TCB_PATH] = Fault(status=503, headers={"Retry-After": "0"}, times=1)
    fetched = _fetcher(pccs, tls, tmp_path).for_quote(parse_quote(quote), at)
    assert json.loads(fetched.to_json()) == doc
    assert pccs.count(TCB_PATH) == 2


def test_timeout(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[TCB_PATH] = Fault(delay=1.0)
    client = HttpsClient(ca_file=str(tls.ca_pem), timeout=0.2, attempts=2, backoff=0.01)
    assert _fetch_error(pccs, tls, tmp_path, client=client) == (
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: no answer within 0.2 s (after 2 attempts)"
    )


def test_truncated_body(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[TCB_PATH] = Fault(cut=100)
    message = _fetch_error(pccs, tls, tmp_path)
    assert message.startswith(
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: the response body was cut short "
        "(100 bytes, "
    )
    assert message.endswith(" more were announced) (after 2 attempts)")


def test_wrong_issuer_chain_header(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    _, doc, _ = _load("trustee__tdx_quote_6")
    chain = doc["pck_crl_issuer_chain"].replace("\n", "%0A")
    pccs.faults[TCB_PATH] = Fault(headers={"TCB-Info-Issuer-Chain": chain})
    assert _fetch_error(pccs, tls, tmp_path) == (
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: HTTP 200, but the TCB info for FMSPC "
        "00A06D080000 does not verify: collateral-signature: TCB info is not signed by 'Intel SGX PCK "
        "Platform CA'"
    )


def test_missing_header_and_the_sgx_prefixed_name(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    _, doc, _ = _load("trustee__tdx_quote_6")
    pccs.faults[QE_PATH] = Fault(headers={"SGX-Enclave-Identity-Issuer-Chain": None})
    assert _fetch_error(pccs, tls, tmp_path) == (
        "GET URL/tdx/certification/v4/qe/identity: HTTP 200 OK without the "
        "SGX-Enclave-Identity-Issuer-Chain header"
    )
    del pccs.faults[QE_PATH]
    pccs.requests.clear()
    # TCB info's chain under the SGX-prefixed name (as PCCS API v3 sends it) is read too.
    chain = urllib.parse.quote(doc["tcb_info_issuer_chain"], safe="")
    pccs.faults[TCB_PATH] = Fault(
        headers={"TCB-Info-Issuer-Chain": None, "SGX-TCB-Info-Issuer-Chain": chain}
    )
    quote, _, at = _load("trustee__tdx_quote_6")
    fetched = _fetcher(pccs, tls, tmp_path / "b").for_quote(parse_quote(quote), at)
    assert json.loads(fetched.to_json()) == doc
    assert pccs.count(TCB_PATH) == 1


def test_wrong_content_type_and_bad_hex(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[TCB_PATH] = Fault(headers={"Content-Type": "text/html; charset=utf-8"}, body=b"<html>")
    assert _fetch_error(pccs, tls, tmp_path) == (
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: expected application/json, got text/html"
    )
    del pccs.faults[TCB_PATH]
    pccs.faults[ROOT_CRL_PATH] = Fault(body=b"<html>maintenance</html>")
    assert _fetch_error(pccs, tls, tmp_path / "b") == (
        "GET URL/sgx/certification/v4/rootcacrl: the root CA CRL is not the hex text a PCCS serves "
        "(24 bytes, starting b'<html>maintenanc')"
    )


def test_untrusted_tls_certificate(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    client = HttpsClient(attempts=1)  # the system's trust store: the test CA is not in it
    assert _fetch_error(pccs, tls, tmp_path, client=client) == (
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: the server's TLS certificate is not "
        "trusted: unable to get local issuer certificate"
    )


def test_pinning_the_servers_own_certificate(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    # --pccs-ca may name the PCCS's own certificate rather than its CA.
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    client = HttpsClient(ca_file=str(tls.cert_pem), attempts=1)
    fetched = _fetcher(pccs, tls, tmp_path, client=client).for_quote(parse_quote(quote), at)
    assert json.loads(fetched.to_json()) == doc
    # Another CA of the same name pinned: its key did not sign the server's certificate.
    other = TlsFiles.create(tmp_path / "other")
    client = HttpsClient(ca_file=str(other.ca_pem), attempts=1)
    assert _fetch_error(pccs, tls, tmp_path / "b", client=client) == (
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: the server's TLS certificate is not "
        "trusted: certificate signature failure"
    )


def test_redirects_are_not_followed(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    pccs.faults[TCB_PATH] = Fault(status=302, headers={"Location": "https://127.0.0.2/elsewhere"})
    assert _fetch_error(pccs, tls, tmp_path).startswith(
        "GET URL/tdx/certification/v4/tcb?fmspc=00A06D080000: HTTP 302 Found [Request-ID "
    )
    assert pccs.count(TCB_PATH) == 1


def test_cli_errors_are_one_line(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    d = shared_testdata("quotes")
    _, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    pccs.faults[TCB_PATH] = Fault(status=500)
    proc = _eemini("verify", str(d / "trustee__tdx_quote_6.bin"), "--fetch-collateral", "--pccs",
                   pccs.url, "--pccs-ca", str(tls.ca_pem), "--cache-dir", str(tmp_path),
                   "--at", str(at))  # fmt: skip
    assert (proc.returncode, proc.stdout) == (4, "")
    url = f"{pccs.url}/tdx/certification/v4/tcb?fmspc=00A06D080000"
    # Two progress lines about the retries, then the error in one line; nothing else.
    assert re.fullmatch(
        f"eemini verify: GET {re.escape(url)}: HTTP 500 Internal Server Error; trying again in 0.5 s\n"
        f"eemini verify: GET {re.escape(url)}: HTTP 500 Internal Server Error; trying again in 1 s\n"
        f"eemini verify: error: cannot get collateral: GET {re.escape(url)}: HTTP 500 Internal Server "
        r"Error \(after 3 attempts\) \[Request-ID [0-9a-f]{32}\]\n",
        proc.stderr,
    ), proc.stderr
    proc = _eemini("verify", str(d / "trustee__tdx_quote_6.bin"), "--pccs", pccs.url)
    assert (proc.returncode, proc.stderr) == (
        2,
        "eemini verify: error: --pccs only apply with --fetch-collateral\n",
    )
    proc = _eemini("verify", str(d / "trustee__tdx_quote_6.bin"), "--fetch-collateral", "--pccs",
                   "http://127.0.0.1:1")  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        2,
        "eemini verify: error: --pccs: 'http://127.0.0.1:1' is not an https:// URL of a PCS or PCCS\n",
    )


def test_progress_only_when_a_fetch_takes_a_while(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    quote, doc, at = _load("trustee__tdx_quote_6")
    pccs.serve(doc)
    said: list[str] = []
    client = HttpsClient(ca_file=str(tls.ca_pem), progress=said.append, progress_after=0.3)
    _fetcher(pccs, tls, tmp_path, client=client).for_quote(parse_quote(quote), at)
    assert said == []
    pccs.faults[QE_PATH] = Fault(delay=0.8)
    _fetcher(pccs, tls, tmp_path / "b", client=client).for_quote(parse_quote(quote), at)
    assert said == [f"fetching the TDX QE identity from {pccs.url}{QE_PATH} ..."]


def test_quote_of_an_unknown_ca_asks_for_fmspc_and_ca() -> None:
    from tdx_builder import build_quote, make_chain

    expected = (
        r"^the quote's PCK certificate is issued by 'EasyEnclave Mini development PCK CA', neither "
        r"Intel's platform nor its processor CA: name the platform \(eemini collateral fetch --fmspc "
        r"HEX --ca platform\|processor\)$"
    )
    with pytest.raises(QuoteError, match=expected):
        CollateralFetcher(offline=True).for_quote(
            parse_quote(build_quote(make_chain(intermediate=True))), 0
        )


def test_azure_evidence_with_fetched_collateral(pccs: FakePcs, tls: TlsFiles, tmp_path: Path) -> None:
    # The paravisor's TD quote is an ordinary TDX quote: its collateral comes through the same fetcher.
    _, doc, at = _load("trustee__az-tdx-vtpm_td-quote")
    pccs.serve(doc)
    policy = tmp_path / "policy.json"
    policy.write_text('{"accepted_tcb_statuses": ["UpToDate", "OutOfDate"]}')
    evidence = shared_testdata("azure") / "trustee__az-tdx-vtpm_evidence-v1.json"
    proc = _eemini("verify", "--azure", str(evidence), "--fetch-collateral", "--pccs", pccs.url,
                   "--pccs-ca", str(tls.ca_pem), "--cache-dir", str(tmp_path / "cache"), "--at", str(at),
                   "--report-data", "00", "--nonce", b"challenge".hex(), "--policy", str(policy),
                   "--json")  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    out = json.loads(proc.stdout)
    assert out["td_quote"]["tcb_status"] == "OutOfDate"
    assert out["checks"][4:9] == ["crls", "tcb-info", "qe-identity-collateral", "revocation",
                                  "tcb-evaluation"]  # fmt: skip
    assert out["checks"][-1] == "vtpm-pcrs"
    assert len(pccs.requests) == 4
