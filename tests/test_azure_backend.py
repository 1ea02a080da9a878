"""The guest's azure-tdx-vtpm backend against a real TPM (swtpm provisioned like Azure's vTPM,
tests/swtpm.py) and the fake IMDS quote service (tests/fake_metadata.py), then our verifier on what
it produced; and the wire server's ready report against its fake.

The fake TPM cannot regenerate the HCL report when the guest writes new user data (Azure's
paravisor does): the harness provisions the report for the report data a test asks for, and any
other request must end in the stale-report error after the bounded reads.
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest

import azure_builder
from eemini.guest import metadata
from eemini.guest.attest import AttestError
from eemini.guest.azure import (
    AzureVtpmBackend,
    ImdsQuoteClient,
    WireServerError,
    report_ready,
)
from eemini.guest.tpm import Tpm
from eemini.tdx.azure.evidence import parse_azure_evidence
from eemini.tdx.azure.verify import azure_policy, verify_azure
from eemini.tdx.collateral import parse_collateral
from eemini.tdx.policy import PolicyBuilder
from eemini.tdx.roots import development_root
from fake_metadata import Behaviour, Server
from swtpm import USER_DATA_INDEX, Swtpm, running_swtpm
from tdx_builder import NOW, make_chain, make_collateral

CHAIN = make_chain(intermediate=True)
REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    with running_swtpm(tmp_path_factory.mktemp("swtpm")) as t:
        yield t


@pytest.fixture
def imds() -> Iterator[tuple[Server, Behaviour]]:
    behaviour = Behaviour("azure", td_quote=lambda r: azure_builder.quote_for_report(CHAIN, r))
    server = Server(behaviour).start()
    yield server, behaviour
    server.shutdown()


class Backend:
    """The backend on its own swtpm connection (closed afterwards: swtpm serves one at a time)."""

    def __init__(self, swtpm: Swtpm, imds_port: int, reads: int = 3) -> None:
        self.sleeps: list[float] = []

        def open_tpm() -> Tpm:
            # The backend closes the TPM (and so the connection) after each attestation.
            return Tpm(swtpm.connect().detach())

        fetch = metadata.Fetch(host="127.0.0.1", port=imds_port, timeout=5.0, attempts=2, backoff=0.05)
        self.backend = AzureVtpmBackend(
            open_tpm=open_tpm, imds=ImdsQuoteClient(fetch), event_log="/nonexistent",
            report_reads=reads, report_delay=0.25, sleep=self.sleeps.append,
        )  # fmt: skip

    def attest(self, report_data: bytes) -> Any:
        return self.backend.attest(report_data)


def test_attests_and_our_verifier_accepts_it(swtpm: Swtpm, imds: tuple[Server, Behaviour]) -> None:
    report = swtpm.provision_report(REPORT_DATA)
    evidence = Backend(swtpm, imds[0].port).attest(REPORT_DATA)
    assert base64.b64decode(evidence.extra["hcl_report_b64"]) == report
    assert evidence.extra["tpm_eventlog_b64"] is None
    assert len(evidence.extra["vtpm_quote"]["pcrs"]) == 24
    # The IMDS request was the one Azure wants.
    path, headers = imds[1].requests[-1]
    assert (path, headers["content-type"], headers["metadata"]) == (
        "/acc/tdquote",
        "application/json",
        "true",
    )
    answer = {
        "ok": True, "attestation_type": "azure-tdx-vtpm",
        "quote_b64": base64.b64encode(evidence.quote).decode(), **evidence.extra,
    }  # fmt: skip
    policy = PolicyBuilder().report_data(REPORT_DATA).accepted_mr_td([azure_builder.FAKE_PARAVISOR_MRTD])
    verified = verify_azure(
        parse_azure_evidence(json.dumps(answer)), parse_collateral(make_collateral(CHAIN)),
        azure_policy(policy.build()), NOW, trusted_roots=(development_root(CHAIN.root_pem),),
    )  # fmt: skip
    assert verified.checks[-7:] == (
        "hcl-td-report", "runtime-data", "user-data", "vtpm-quote-signature", "vtpm-quote",
        "vtpm-nonce", "vtpm-pcrs",
    )  # fmt: skip
    assert verified.nonce == REPORT_DATA
    # The guest defined the user-data index (owner read/write, 64 bytes) and wrote the request.
    assert swtpm.tool("tpm2_nvread", hex(USER_DATA_INDEX), "-C", "o") == REPORT_DATA


def test_another_request_finds_the_report_stale(swtpm: Swtpm, imds: tuple[Server, Behaviour]) -> None:
    swtpm.provision_report(REPORT_DATA)
    other = b"\x42" * 64
    b = Backend(swtpm, imds[0].port, reads=4)
    with pytest.raises(AttestError) as e:
        b.attest(other)
    assert e.value.code == "attest_stale"
    assert str(e.value).startswith("the HCL report is stale: after 4 reads over ")
    assert str(e.value).endswith(
        f"its user-data is {REPORT_DATA.hex()}, not the report data written to NV index "
        f"0x01400002 ({other.hex()})"
    )
    assert b.sleeps == [0.25, 0.25, 0.25]  # bounded: 4 reads, 3 waits
    # The write itself happened (a paravisor would now regenerate the report).
    assert swtpm.tool("tpm2_nvread", hex(USER_DATA_INDEX), "-C", "o") == other


def test_an_attestation_key_that_is_not_hclakpub_is_refused(
    swtpm: Swtpm, imds: tuple[Server, Behaviour]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    real = swtpm.ak_public
    swtpm.ak_public = rsa.generate_private_key(65537, 2048).public_key()
    try:
        swtpm.provision_report(REPORT_DATA)
    finally:
        swtpm.ak_public = real
    with pytest.raises(AttestError) as e:
        Backend(swtpm, imds[0].port).attest(REPORT_DATA)
    assert str(e.value) == "the vTPM's attestation key at 0x81000003 is not HCLAkPub of the HCL report"


def test_a_quote_of_another_report_is_refused(swtpm: Swtpm, imds: tuple[Server, Behaviour]) -> None:
    swtpm.provision_report(REPORT_DATA)
    imds[1].td_quote = lambda r: azure_builder.quote_for_report(
        CHAIN, azure_builder.td_report(b"\x01" * 64)
    )
    with pytest.raises(AttestError) as e:
        Backend(swtpm, imds[0].port).attest(REPORT_DATA)
    assert str(e.value).startswith(f"the report data inside the quote ({'01' * 64}) differs")


def test_imds_failures_are_named(swtpm: Swtpm, imds: tuple[Server, Behaviour]) -> None:
    swtpm.provision_report(REPORT_DATA)
    imds[1].td_quote = None  # the service is not there: 404
    with pytest.raises(AttestError) as e:
        Backend(swtpm, imds[0].port).attest(REPORT_DATA)
    assert str(e.value) == (
        'the metadata service (127.0.0.1/acc/tdquote) answered HTTP 404: \'{"error": "Not found"}\''
    )
    imds[0].shutdown()
    imds[0].server_close()
    with pytest.raises(AttestError) as e:
        Backend(swtpm, imds[0].port).attest(REPORT_DATA)
    assert (str(e.value), e.value.code) == (
        "the metadata service (127.0.0.1/acc/tdquote) did not answer",
        "attest_unavailable",
    )


def test_the_fake_imds_answers_as_the_real_one(imds: tuple[Server, Behaviour]) -> None:
    report = azure_builder.td_report(bytes(64))
    body = json.dumps({"report": base64.urlsafe_b64encode(report).decode().rstrip("=")})

    def post(headers: dict[str, str], data: str = body) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", imds[0].port, timeout=5)
        conn.request("POST", "/acc/tdquote", body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    ok = {"Content-Type": "application/json", "Metadata": "true"}
    assert post({**ok, "Content-Type": "application/json; charset=utf-8"})[0] == 415
    assert post({"Content-Type": "application/json"})[0] == 400
    assert post(ok, '{"report": "AAAA"}')[0] == 400
    tampered = bytearray(report)
    tampered[600] ^= 1  # a TDINFO byte: its hash in REPORTMACSTRUCT no longer holds
    bad = json.dumps({"report": base64.urlsafe_b64encode(bytes(tampered)).decode()})
    assert post(ok, bad) == (400, b'{"error": "Bad request. The TDREPORT does not verify"}')
    status, answer = post(ok)
    quote = json.loads(answer)["quote"]
    assert status == 200 and "=" not in quote
    decoded = base64.urlsafe_b64decode(quote + "=" * (-len(quote) % 4))
    # The header and TD report of the quote the builder makes (ECDSA signatures are randomized).
    assert decoded[:632] == azure_builder.quote_for_report(CHAIN, report)[:632]


# --- the wire server ----------------------------------------------------------------------------


@pytest.fixture
def wireserver() -> Iterator[tuple[Server, Behaviour]]:
    behaviour = Behaviour("wireserver")
    server = Server(behaviour).start()
    yield server, behaviour
    server.shutdown()


def _fetch(port: int) -> metadata.Fetch:
    return metadata.Fetch(host="127.0.0.1", port=port, timeout=5.0, attempts=2, backoff=0.05)


def test_the_ready_report_is_what_the_wire_server_expects(wireserver: tuple[Server, Behaviour]) -> None:
    server, b = wireserver
    assert report_ready(_fetch(server.port)) == b.instance_id
    assert [p for p, _ in b.requests] == ["/machine/?comp=goalstate", "/machine/?comp=health"]
    assert all(h["x-ms-version"] == "2012-11-30" for _, h in b.requests)
    assert len(b.ready_reports) == 1
    assert "<State>Ready</State>" in b.ready_reports[0]
    assert f"<InstanceId>{b.instance_id}</InstanceId>" in b.ready_reports[0]


def test_a_goal_state_that_does_not_parse_is_named(wireserver: tuple[Server, Behaviour]) -> None:
    server, b = wireserver
    b.container_id = "<injected/>"
    with pytest.raises(WireServerError) as e:
        report_ready(_fetch(server.port))
    assert str(e.value) == "the goal state's <ContainerId> is not an identifier: '<injected/>'"
    b.container_id = "a b"
    with pytest.raises(WireServerError) as e:
        report_ready(_fetch(server.port))
    assert str(e.value) == "the goal state's <ContainerId> is not an identifier: 'a b'"
    assert b.ready_reports == []


def test_an_absent_wire_server_is_named(wireserver: tuple[Server, Behaviour]) -> None:
    server, _ = wireserver
    port = server.port
    server.shutdown()
    server.server_close()
    with pytest.raises(WireServerError) as e:
        report_ready(_fetch(port))
    assert str(e.value) == "the wire server 127.0.0.1 did not answer"


# --- PID 1's trial attestation --------------------------------------------------------------------


def test_pid1_refuses_without_a_vtpm(tmp_path: Any) -> None:
    from eemini.guest import pid1

    backend = AzureVtpmBackend(open_tpm=lambda: Tpm.open(str(tmp_path / "tpmrm0")))
    with pytest.raises(pid1.Refusal) as e:
        pid1.trial_quote(backend)
    assert e.value.line() == (
        "refusing to start the workload: TDX attestation is unavailable: the vTPM is not "
        f"available: cannot open the TPM {tmp_path / 'tpmrm0'}: No such file or directory"
    )


def test_pid1_refuses_when_the_report_stays_stale(swtpm: Swtpm, imds: tuple[Server, Behaviour]) -> None:
    """The trial uses fresh random report data, for which this fake has no report."""
    from eemini.guest import pid1

    swtpm.provision_report(REPORT_DATA)
    b = Backend(swtpm, imds[0].port, reads=2)
    with pytest.raises(pid1.Refusal) as e:
        pid1.trial_quote(b.backend)
    assert e.value.line().startswith(
        "refusing to start the workload: TDX attestation is unavailable: the HCL report is stale: "
        "after 2 reads over "
    )
    assert imds[1].requests == []  # nothing was sent to the quote service for a stale report


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: b"HCLB" + r[4:], "the vTPM's NV index 0x01400001 holds no HCL report"),
        (lambda r: r[:1224] + b"\x02" + r[1225:], "the HCL report is of type 2, not 4 (TDX)"),
        (lambda r: r[:1228] + b"\x03" + r[1229:], "the HCL report's report-data hash type is 3"),
        (
            lambda r: r[:1232] + b"\xff\xff\x00\x00" + r[1236:],
            "the HCL report's runtime data (65535 bytes)",
        ),
        (lambda r: r[:1236] + b"[" * 100000, "the HCL report's runtime data is not Azure's JSON"),
        (
            lambda r: r[:1232] + struct.pack("<I", 30) + b'{"keys": 5, "user-data": "00"}',
            "the HCL report's runtime data is not Azure's JSON: TypeError",
        ),
    ],
)
def test_the_guest_names_a_malformed_hcl_report(mutate: Any, message: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from eemini.guest.azure import HclReport

    runtime = azure_builder.runtime_data(rsa.generate_private_key(65537, 2048).public_key(), bytes(64))
    raw = azure_builder.hcl_report(azure_builder.td_report(bytes(64)), runtime)
    assert HclReport(raw).user_data == bytes(64)
    with pytest.raises(AttestError) as e:
        HclReport(mutate(raw))
    assert str(e.value).startswith(message)


def test_base64url_is_strict() -> None:
    from eemini.guest.azure import b64url_decode, b64url_encode

    assert b64url_encode(b"\xfb\xff") == "-_8"
    assert b64url_decode("-_8") == b64url_decode("-_8=") == b"\xfb\xff"
    for bad in ("+/8", "-_8*", "-_ 8"):
        with pytest.raises(ValueError):
            b64url_decode(bad)
