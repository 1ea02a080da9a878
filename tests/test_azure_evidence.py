"""Azure evidence end to end on built data: our `attest` answer layout, with a real TPM event log
(OVMF + swtpm booting the local-dev image, tests/data) whose SHA-256 replay the vTPM quote vouches
for, checked against the image's predicted events under the strict rule. The TD quote is the tests'
dev chain's (tests/tdx_builder.py) with Intel-like collateral, for a fake paravisor MRTD.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from azure_builder import (
    AZURE_CHECKS,
    DCAP_CHECKS,
    FAKE_PARAVISOR_MRTD,
    attest_answer,
    replay_sha256,
)
from conftest import REPO
from eemini.cli import main
from eemini.tdx.azure.errors import AzureEvidenceError
from eemini.tdx.azure.evidence import evidence_to_json, parse_azure_evidence
from eemini.tdx.azure.verify import AzurePolicy, azure_policy, verify_azure
from eemini.tdx.collateral import Collateral, parse_collateral
from eemini.tdx.errors import VerificationError
from eemini.tdx.eventlog import parse_event_log
from eemini.tdx.measure import Prediction
from eemini.tdx.policy import PolicyBuilder
from eemini.tdx.roots import TrustAnchor, development_root
from tdx_builder import NOW, DevChain, make_chain, make_collateral

DATA = REPO / "tests" / "data"
LOG = (DATA / "ovmf-swtpm-local-dev.tpmlog").read_bytes()
PREDICTION_FILE = DATA / "ovmf-swtpm-local-dev.prediction.json"
PREDICTION = Prediction.from_json(json.loads(PREDICTION_FILE.read_text()))
REPORT_DATA = bytes(range(64))


@dataclasses.dataclass(frozen=True)
class Setup:
    chain: DevChain
    collateral: Collateral
    root: TrustAnchor
    ak: rsa.RSAPrivateKey


@functools.cache
def setup() -> Setup:
    chain = make_chain(intermediate=True)
    return Setup(
        chain=chain,
        collateral=parse_collateral(make_collateral(chain)),
        root=development_root(chain.root_pem),
        ak=rsa.generate_private_key(65537, 2048),
    )


def policy(**options: Any) -> AzurePolicy:
    b = PolicyBuilder().report_data(REPORT_DATA).accepted_mr_td([FAKE_PARAVISOR_MRTD])
    b = b.expected_events(PREDICTION.events).allow_unbound_runtime_log()
    built = b.build().replace(**options)
    return azure_policy(built)


def answer(log: bytes | None = LOG, **kw: Any) -> dict[str, Any]:
    s = setup()
    return attest_answer(s.chain, s.ak, REPORT_DATA, log, **kw)


def check(doc: dict[str, Any], pol: AzurePolicy | None = None) -> Any:
    s = setup()
    evidence = parse_azure_evidence(json.dumps(doc))
    return verify_azure(evidence, s.collateral, pol or policy(), NOW, trusted_roots=(s.root,))


def rejected(doc: dict[str, Any], pol: AzurePolicy | None = None) -> VerificationError:
    with pytest.raises(VerificationError) as e:
        check(doc, pol)
    return e.value


def log_with(
    log: bytes, number: int, *, sha256: bytes | None = None, sha384: bytes | None = None
) -> bytes:
    """`log` with event `number`'s digests replaced (the record layout: PCR, type, count, then
    algorithm id and digest for each bank)."""
    e = next(e for e in parse_event_log(log).events if e.number == number)
    out = bytearray(log)
    pos = e.offset + 12
    for alg, d in e.digests:
        new = {0x000B: sha256, 0x000C: sha384}.get(alg)
        if new is not None:
            out[pos + 2 : pos + 2 + len(d)] = new
        pos += 2 + len(d)
    return bytes(out)


def append_event(log: bytes, pcr: int, etype: int, data: bytes) -> bytes:
    """One more record, hashed in both banks."""
    return (
        log
        + struct.pack("<III", pcr, etype, 2)
        + struct.pack("<H", 0x000B) + hashlib.sha256(data).digest()
        + struct.pack("<H", 0x000C) + hashlib.sha384(data).digest()
        + struct.pack("<I", len(data)) + data
    )  # fmt: skip


def test_our_attest_answer_verifies_with_the_images_events() -> None:
    v = check(answer())
    assert list(v.checks) == DCAP_CHECKS + AZURE_CHECKS + ["tpm-event-log", "expected-events"]
    assert [(w.check, w.status) for w in v.waived] == [("runtime-log", "unbound")]
    assert v.boot is not None
    assert len(v.boot.matched) == len(PREDICTION.events) == 16
    assert len(v.boot.allowed) == 40 - 16  # every other event of the log is allowlisted
    assert [p.what for p, _ in v.boot.matched][:1] == ["UKI (PE Authenticode)"]
    assert v.td.tcb_status == "UpToDate"
    assert v.user_data == REPORT_DATA and v.nonce == REPORT_DATA
    assert list(v.pcrs) == replay_sha256(LOG)


def test_the_runtime_log_is_unbound_on_azure() -> None:
    e = rejected(answer(events=[{"seq": 0}]), policy(allow_unbound_runtime_log=False))
    assert e.check == "runtime-log"
    assert e.message == (
        "unbound: nothing in Azure evidence binds the runtime event log (the guest has no RTMR3 of "
        "its own, and the runtime log is not extended into a vTPM PCR); set "
        "allow_unbound_runtime_log to accept that"
    )


def test_a_log_that_does_not_replay_is_rejected() -> None:
    doc = answer(pcrs=replay_sha256(LOG))
    doc["tpm_eventlog_b64"] = base64.b64encode(log_with(LOG, 23, sha256=b"\x01" * 32)).decode()
    e = rejected(doc)
    assert e.check == "tpm-event-log"
    assert e.message.startswith("the TPM event log does not replay to the quoted PCRs: PCR 4 is ")


def test_a_consistent_log_with_another_application_is_not_this_image() -> None:
    # The host boots something else too, and the log says so honestly: it replays, but the rule
    # rejects the extra application by name.
    other = append_event(LOG, 4, 0x80000003, b"\x00" * 32 + b"other.efi")
    e = rejected(answer(log=other))
    assert e.check == "expected-events"
    assert e.message.startswith("event 41: PCR4 EV_EFI_BOOT_SERVICES_APPLICATION")
    assert "is not this image's" in e.message


def test_only_the_bound_sha256_bank_counts() -> None:
    uki = PREDICTION.events[0]
    # A SHA-256 digest that is not the UKI's, with the right SHA-384 beside it, PCRs replayed to
    # match: the quote vouches for SHA-256 only, so this is not our UKI.
    forged = log_with(LOG, 23, sha256=b"\x02" * 32)
    assert parse_event_log(forged).events[22].digest(0x000C) == uki.sha384
    e = rejected(answer(log=forged))
    assert e.check == "expected-events"
    assert "sha256 0202020202" in e.message
    # The SHA-384 bank is not bound: a changed SHA-384 digest alone changes nothing.
    assert check(answer(log=log_with(LOG, 23, sha384=b"\x03" * 48))).boot is not None


def test_pcrs_extended_after_boot_are_reported_not_judged() -> None:
    # Linux's IMA extends PCR 10 with its boot_aggregate (logged in its own log, not this one).
    pcrs = replay_sha256(LOG)
    pcrs[10] = hashlib.sha256(bytes(32) + b"\x10" * 32).digest()
    pcrs[23] = hashlib.sha256(bytes(32) + b"\x23" * 32).digest()
    v = check(answer(pcrs=pcrs))
    assert v.pcrs_after_boot == ((10, pcrs[10]), (23, pcrs[23]))
    assert "expected-events" in v.checks
    # A boot PCR extended outside the log is not the boot the log describes.
    for boot_pcr in (0, 9, 11, 15):
        changed = replay_sha256(LOG)
        changed[boot_pcr] = pcrs[10]
        e = rejected(answer(pcrs=changed))
        assert e.check == "tpm-event-log"
        assert e.message.startswith(
            f"the TPM event log does not replay to the quoted PCRs: PCR {boot_pcr} "
        )


def test_a_log_extending_a_pcr_outside_the_boot_is_judged_too() -> None:
    other = append_event(LOG, 23, 0x0D, b"late")  # EV_IPL into PCR 23, PCRs replayed to match
    e = rejected(answer(log=other))
    assert (e.check, e.message.split(":")[0]) == ("expected-events", "event 41")
    assert e.message.endswith("PCR23 is outside the registers a measured boot extends")
    # Claimed in the log but not in the PCRs: the replay fails first.
    e = rejected(answer(log=other, pcrs=replay_sha256(LOG)))
    assert e.message.startswith("the TPM event log does not replay to the quoted PCRs: PCR 23 ")


def test_a_tdx15_quote_binds_its_extra_fields() -> None:
    from azure_builder import hcl_report, quote_for_report, td_report

    s = setup()
    doc = answer()
    hcl = base64.b64decode(doc["hcl_report_b64"])
    (size,) = struct.unpack_from("<I", hcl, 1232)
    runtime, report = hcl[1236 : 1236 + size], hcl[32:1056]
    doc["quote_b64"] = base64.b64encode(quote_for_report(s.chain, report, version=5)).decode()
    v = check(doc)
    assert v.td.quote.header.version == 5 and v.td.report.mr_servicetd == bytes(48)
    assert "hcl-td-report" in v.checks
    # The HCL report's TDINFO.SERVTD_HASH is not the quote's MR_SERVICETD.
    other = td_report(hashlib.sha256(runtime).digest() + bytes(32), mr_servicetd=b"\x01" * 48)
    doc["hcl_report_b64"] = base64.b64encode(hcl_report(other, runtime)).decode()
    e = rejected(doc)
    assert e.check == "hcl-td-report"
    assert e.message == (
        f"the HCL report's TD report has mr_servicetd {'01' * 48}, the TD quote {'00' * 48}: the "
        "quote was not made from this report"
    )


def test_expected_events_need_a_tpm_log() -> None:
    e = rejected(answer(log=None))
    assert (e.check, e.message) == (
        "tpm-event-log",
        "the policy expects this image's boot events, but the evidence carries no TPM event log "
        "(and none was given)",
    )


def test_our_layout_round_trips() -> None:
    doc = answer(events=[{"seq": 0, "kind": "spec"}])
    evidence = parse_azure_evidence(json.dumps(doc))
    again = evidence_to_json(evidence)
    assert parse_azure_evidence(json.dumps(again)) == evidence
    assert {k: doc[k] for k in again} == again


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["vtpm_quote"].update(pcrs=["00" * 32] * 23),
            "vtpm_quote.pcrs must be a list of 24",
        ),
        (lambda d: d["vtpm_quote"].update(pcr_bank="sha1"), "vtpm_quote.pcr_bank is 'sha1'"),
        (lambda d: d.update(quote_b64="a b"), "quote_b64 is not base64"),
        (lambda d: d.update(hcl_report_b64="QUJD"), "HCL report is 3 bytes, shorter than"),
        (lambda d: d.update(tpm_eventlog_b64=5), "tpm_eventlog_b64 is not a string"),
    ],
)
def test_malformed_parts_are_named(mutate: Any, message: str) -> None:
    doc = answer()
    mutate(doc)
    s = setup()
    with pytest.raises(AzureEvidenceError) as e:
        verify_azure(
            parse_azure_evidence(json.dumps(doc)), s.collateral, policy(), NOW, trusted_roots=(s.root,)
        )
    assert str(e.value).startswith(message)


def test_a_vtpm_message_that_is_not_a_quote_is_rejected_after_its_signature() -> None:
    from azure_builder import rsassa, tpms_attest

    s = setup()
    doc = answer()
    message = tpms_attest(REPORT_DATA, replay_sha256(LOG), kind=0x8014)  # TPM_ST_ATTEST_CERTIFY
    doc["vtpm_quote"]["message_b64"] = base64.b64encode(message).decode()
    doc["vtpm_quote"]["signature_b64"] = base64.b64encode(rsassa(s.ak, message)).decode()
    e = rejected(doc)
    assert (e.check, e.message) == (
        "vtpm-quote",
        "the signed vTPM message is not a quote: type is 0x8014, expected 0x8018 (TPM_ST_ATTEST_QUOTE)",
    )


def test_eemini_verify_azure_with_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = setup()
    (tmp_path / "attest.json").write_text(json.dumps(answer()))
    (tmp_path / "collateral.json").write_text(make_collateral(s.chain))
    (tmp_path / "root.pem").write_bytes(s.chain.root_pem)
    (tmp_path / "policy.json").write_text('{"allow_unbound_runtime_log": true}')
    argv = [
        "verify", "--azure", str(tmp_path / "attest.json"),
        "--collateral", str(tmp_path / "collateral.json"), "--at", str(NOW),
        "--trust-dev-root", str(tmp_path / "root.pem"), "--mr-td", FAKE_PARAVISOR_MRTD.hex(),
        "--report-data", REPORT_DATA.hex(), "--manifest", str(PREDICTION_FILE),
        "--policy", str(tmp_path / "policy.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "checks: "
        + ", ".join([*DCAP_CHECKS, *AZURE_CHECKS, "tpm-event-log", "expected-events"])
        + (", runtime-log UNBOUND (waived by policy)")
        in out
    )
    assert out.endswith(
        "TPM event log: exactly this image's events: 16 predicted, 24 allowlisted firmware events "
        "that load no code, nothing else\n"
    )
    # Without a paravisor MRTD on the command line, only the known ones are accepted.
    argv.remove("--mr-td")
    argv.remove(FAKE_PARAVISOR_MRTD.hex())
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "eemini verify: rejected: measurements: "
        f"MRTD {FAKE_PARAVISOR_MRTD.hex()} is not an accepted value\n"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--vtpm"],
            "--vtpm is for TDX quotes with a vTPM beside them (GCP); Azure evidence is all vTPM",
        ),
        (["--nonce", "zz"], "--nonce 'zz' is not hex"),
        (["--policy", "{allow_any}"], "allow_any_firmware cannot apply to Azure evidence"),
    ],
)
def test_azure_usage_errors_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "attest.json").write_text(json.dumps(answer()))
    (tmp_path / "policy.json").write_text('{"allow_any_firmware": true}')
    extra = [str(tmp_path / "policy.json") if a == "{allow_any}" else a for a in extra]
    assert main(["verify", "--azure", str(tmp_path / "attest.json"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_evidence_that_is_not_azure_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.json").write_text('{"ok": true, "attestation_type": "tdx", "quote_b64": "AA=="}')
    assert main(["verify", "--azure", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err == (
        f"eemini verify: error: {tmp_path / 'a.json'} is not Azure vTPM evidence: evidence is an "
        "attest answer of type 'tdx', not 'azure-tdx-vtpm'\n"
    )
    (tmp_path / "q.bin").write_bytes(b"\x04\x00")
    assert main(["verify", str(tmp_path / "q.bin"), "--nonce", "00"]) == 2
    assert "--nonce applies to Azure evidence only (--azure)" in capsys.readouterr().err


def _runtime(**changes: Any) -> bytes:
    from azure_builder import runtime_data

    doc = json.loads(runtime_data(setup().ak.public_key(), bytes(64)))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff", "the runtime data is not JSON"),
        (b"[" * 100000, "the runtime data is nested too deeply"),
        (b'{"a": 1, "a": 2}', "the runtime data is not JSON: key 'a' appears twice in one object"),
        (b"[]", "the runtime data is not Azure's runtime-data document: it is not a JSON object"),
        ("no-ak", "`keys` holds 0 keys with kid HCLAkPub, expected exactly one"),
        ("two-aks", "`keys` holds 2 keys with kid HCLAkPub, expected exactly one"),
        ("short-ak", "HCLAkPub is a 1024-bit RSA key; at least 2048 bits are required"),
        ("padded-n", "HCLAkPub.n is not unpadded base64url"),
        ("spaced-user-data", "`user-data` is not 128 hex digits"),
    ],
)
def test_runtime_data_that_is_not_azures_is_named(raw: bytes | str, message: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

    from azure_builder import jwk
    from eemini.tdx.azure.hcl import parse_runtime_data

    ak = jwk("HCLAkPub", setup().ak.public_key(), "sign")
    if raw == "no-ak":
        raw = _runtime(keys=[])
    elif raw == "two-aks":
        raw = _runtime(keys=[ak, ak])
    elif raw == "short-ak":
        raw = _runtime(
            keys=[jwk("HCLAkPub", rsa_mod.generate_private_key(65537, 1024).public_key(), "sign")]
        )
    elif raw == "padded-n":
        raw = _runtime(keys=[{**ak, "n": ak["n"] + "=="}])
    elif raw == "spaced-user-data":
        raw = _runtime(**{"user-data": "00 " * 42 + "00"})
    assert isinstance(raw, bytes)
    with pytest.raises(AzureEvidenceError) as e:
        parse_runtime_data(raw)
    assert message in str(e.value)


def sha256_only(log: bytes) -> bytes:
    """The same log as a TPM with only a SHA-256 bank would write it (Azure's vTPM logs SHA-1 and
    SHA-256; the SHA-1 bank changes nothing here)."""
    parsed = parse_event_log(log)
    spec = parsed.spec_id
    spec_data = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBBI", spec.platform_class, spec.spec_version[1], spec.spec_version[0],
                      spec.spec_version[2], spec.uintn_size, 1)
        + struct.pack("<HH", 0x000B, 32) + bytes([len(spec.vendor_info)]) + spec.vendor_info
    )  # fmt: skip
    out = struct.pack("<II20sI", 0, 3, bytes(20), len(spec_data)) + spec_data
    for e in parsed.events:
        out += struct.pack("<IIIH", e.register, e.event_type, 1, 0x000B) + e.digest(0x000B)
        out += struct.pack("<I", len(e.data)) + e.data
    return out


def test_a_sha256_only_tpm_log_is_held_to_the_same_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from eemini.commands.measure import check_log

    log = sha256_only(LOG)
    assert dict(parse_event_log(log).spec_id.algorithms) == {0x000B: 32}
    v = check(answer(log=log))
    assert v.boot is not None and len(v.boot.matched) == 16
    # `eemini measure --check-log --tpm` matches such a log in SHA-256 as well.
    (tmp_path / "log").write_bytes(log)
    check_log(PREDICTION, tmp_path / "log", tpm=True)
    assert capsys.readouterr().err.endswith(
        f"{tmp_path / 'log'}: exactly the 16 predicted events, in order, and 24 allowlisted firmware "
        "events that load no code\n"
    )
