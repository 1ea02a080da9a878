"""`eemini verify` with measured boot: --event-log (the real GCP log with its real quote), --manifest
(predicted events), --runtime-log (a dev-mode runtime whose simulated RTMR3 carries its log)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_testdata
from eemini.tdx.eventlog import EventType, HashAlg, parse_event_log
from eemini.tdx.measure import PredictedEvent, Prediction
from eemini.tdx.quote import parse_quote
from eemini.tdx.runtime_log import RuntimeLogBinding, check_runtime_log, replay
from rtutil import RuntimeProc, wait_for, write_spec, write_workload

# The GCP quote's collateral is valid at this instant (shared/testdata/quotes/README.md: verify_at
# 2025-11-18T17:48:49Z).
GCP_AT = "1763488129"


def _eemini(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eemini", *argv], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def gcp() -> list[str]:
    q = shared_testdata("quotes")
    c = shared_testdata("ccel")
    return [
        "verify", str(q / "go-tdx-guest__cos-113-tdx-quote.bin"),
        "--collateral", str(q / "go-tdx-guest__cos-113-tdx-quote.collateral.json"), "--at", GCP_AT,
        "--event-log", str(c / "gcp-cos-113__ccel_data.dat"),
    ]  # fmt: skip


def write_prediction(path: Path, events: list[PredictedEvent]) -> Path:
    p = Prediction(bytes(48), bytes(32), "257.13", "6.12", "", tuple(events))
    path.write_text(json.dumps({"builder": "test", "measurements": p.to_json()}))
    return path


def gcp_event(number: int) -> PredictedEvent:
    """One of the GCP log's own events as a prediction (that guest booted shim and grub, no UKI)."""
    log = parse_event_log((shared_testdata("ccel") / "gcp-cos-113__ccel_data.dat").read_bytes())
    e = log.events[number - 1]
    pcr = {1: 1, 2: 4, 3: 11}[e.register]
    return PredictedEvent(
        pcr, EventType(e.event_type), f"event {number}", e.digest(HashAlg.SHA384), bytes(32), True
    )


def test_event_log_replays(gcp: list[str]) -> None:
    proc = _eemini(*gcp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(
        "event log: 43 events replay to the quote's RTMR0..3\n"
        "RTMR0 (host configuration: TD HOB, ACPI tables, boot variables): not pinned by the policy\n"
    )
    out = json.loads(_eemini(*gcp, "--json").stdout)
    assert out["checks"][-1] == "event-log"
    assert out["waived"] == []
    assert out["event_log"] == {
        "events": 43, "matched": [], "allowed": [], "rtmr0_pinned": False, "runtime_log": None,
    }  # fmt: skip


def test_gcp_boot_is_not_this_image(gcp: list[str], tmp_path: Path) -> None:
    # The GCP guest booted shim and grub: with a manifest (here: that boot's own PCR 4 event for shim
    # and nothing else), the first event past it that this "image" does not cause is named.
    manifest = write_prediction(tmp_path / "manifest.json", [gcp_event(18)])
    mrtd = parse_quote((shared_testdata("quotes") / "go-tdx-guest__cos-113-tdx-quote.bin").read_bytes())
    pin = ["--mr-td", mrtd.report.mr_td.hex()]
    proc = _eemini(*gcp, "--manifest", str(manifest), *pin)
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "eemini verify: rejected: expected-events: event 19: RTMR2 EV_IPL 'MokList' sha384 "
    )
    assert proc.stderr.endswith(
        " is not this image's: this image causes no events in RTMR2 but the allowlisted ones\n"
    )
    # Unpinned firmware is refused before any event is looked at.
    proc = _eemini(*gcp, "--manifest", str(manifest), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["check"] == "firmware-pinned"
    # A manifest without an event log cannot be checked: rejected, not silently passed.
    no_log = gcp[: gcp.index("--event-log")]
    proc = _eemini(*no_log, "--manifest", str(manifest), *pin)
    assert proc.returncode == 1
    assert proc.stderr == (
        "eemini verify: rejected: event-log: the policy expects measured boot events, but no CC "
        "event log was given\n"
    )


def test_event_log_of_another_machine(tmp_path: Path) -> None:
    q = shared_testdata("quotes")
    c = shared_testdata("ccel")
    proc = _eemini("verify", str(q / "dcap-qvl__tdx_quote.bin"), "--collateral",
                   str(q / "dcap-qvl__tdx_quote.collateral.json"), "--at", "1752919234",
                   "--event-log", str(c / "gcp-cos-113__ccel_data.dat"))  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "eemini verify: rejected: event-log: RTMR0: the log's 16 events replay to "
    )
    assert proc.stderr.endswith(
        "no prefix of the log reaches it, so the log diverges from the first RTMR0 event on: event 1 "
        "(EV_EFI_HANDOFF_TABLES2) or a later one was changed, added or left out\n"
    )


def test_bad_inputs_exit_2(gcp: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.log"
    bad.write_bytes(b"\0" * 100)
    args = [*gcp[: gcp.index("--event-log")], "--event-log", str(bad)]
    proc = _eemini(*args)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"eemini verify: error: {bad} is not a CC event log: first event has type EV_PREBOOT_CERT, "
        "expected EV_NO_ACTION (the Spec ID event)\n"
    )
    manifest = tmp_path / "m.json"
    manifest.write_text("{}")
    proc = _eemini(*gcp, "--manifest", str(manifest))
    assert proc.returncode == 2
    assert "holds no predicted measurement events" in proc.stderr
    runtime = tmp_path / "r.json"
    runtime.write_text('{"events": 3}')
    proc = _eemini(*gcp, "--runtime-log", str(runtime))
    assert proc.returncode == 2
    assert proc.stderr == f"eemini verify: error: {runtime} holds no list of runtime events\n"


def test_dev_runtime_log_is_bound_to_rtmr3(tmp_path: Path) -> None:
    # Dev mode extends the simulated TD's RTMR3 with each runtime event, as PID 1 does on Linux 6.16+.
    workload = write_workload(tmp_path, "app", "import time\ntime.sleep(3600)\n")
    rt = RuntimeProc(tmp_path, write_spec(tmp_path, workload, restart="never", on_exit="stay"))
    try:
        # The socket file appears at bind(), a moment before listen(): retry a refused first call.
        answers: list[dict[str, object]] = []

        def healthy() -> bool:
            try:
                answers.append(rt.call("health"))
            except ConnectionRefusedError:
                return False
            return True

        wait_for(healthy, what="the runtime to answer health")
        health = answers[-1]
        assert (health["rtmr3_extended"], health["rtmr3_via"], health["rtmr3_events"]) == (
            True,
            "simulated",
            3,
        )
        answer = rt.call("attest", report_data_b64=base64.b64encode(b"n").decode())
        assert answer["rtmr3_extended"] is True
    finally:
        rt.stop()
    quote = base64.b64decode(answer["quote_b64"])
    events = answer["events"]
    assert [e["kind"] for e in events] == ["spec", "workload", "separator"]
    assert parse_quote(quote).report.rtmrs[3] == replay(events)
    assert check_runtime_log(events, parse_quote(quote).report.rtmrs[3]) == RuntimeLogBinding.BOUND

    (tmp_path / "q.bin").write_bytes(quote)
    (tmp_path / "attest.json").write_text(json.dumps(answer))
    policy = tmp_path / "dev.json"
    policy.write_text(
        '{"allow_debug": true, "require_collateral": false, "require_sept_ve_disable": false}'
    )
    root = Path(rt.socket).parent / "dev-root.pem"
    base = ["verify", str(tmp_path / "q.bin"), "--trust-dev-root", str(root), "--policy", str(policy)]
    proc = _eemini(*base, "--runtime-log", str(tmp_path / "attest.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["checks"][-1] == "runtime-log"
    # An event added after the quote was taken: named, since the quote's RTMR3 is a prefix replay.
    forged = {"seq": 3, "kind": "config", "source": "cmdline", "key": "X", "digest": "sha384:00"}
    (tmp_path / "attest.json").write_text(json.dumps({**answer, "events": [*events, forged]}))
    proc = _eemini(*base, "--runtime-log", str(tmp_path / "attest.json"))
    assert proc.returncode == 1
    assert proc.stderr == (
        "eemini verify: rejected: runtime-log: RTMR3 matches the first 3 runtime events; event seq 3 "
        "(config 'X') and later ones are not in the quote\n"
    )
    # A changed event: the log no longer replays to the quote's RTMR3.
    changed = [*events[:2], {**events[2], "source": "elsewhere"}]
    (tmp_path / "attest.json").write_text(json.dumps({**answer, "events": changed}))
    proc = _eemini(*base, "--runtime-log", str(tmp_path / "attest.json"))
    assert proc.returncode == 1
    assert "is not the replay of the 3 runtime events (nor any prefix)" in proc.stderr
