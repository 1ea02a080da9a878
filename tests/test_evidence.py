"""The event-log half of verification on the real GCP log: replay, predicted events, runtime log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import shared_testdata
from eemini.tdx.bootevents import EventsMissing, UnexpectedEvent
from eemini.tdx.ccel import ReplayMismatch
from eemini.tdx.eventlog import EventType, HashAlg, parse_event_log
from eemini.tdx.evidence import check_event_log, load_prediction
from eemini.tdx.measure import MeasureError, PredictedEvent, Prediction
from eemini.tdx.runtime_log import RuntimeLogBinding, RuntimeLogMismatch, replay
from test_ccel import quote_rtmrs


@pytest.fixture(scope="module")
def gcp() -> tuple[bytes, list[bytes]]:
    d = shared_testdata("ccel")
    return (d / "gcp-cos-113__ccel_data.dat").read_bytes(), quote_rtmrs(
        (d / "gcp-cos-113__cos-113-tdx-quote.dat").read_bytes()
    )


def prediction_from(log_data: bytes, numbers: list[int]) -> Prediction:
    """A prediction made of some of the log's own events (GCP boots shim+grub, not our UKI)."""
    log = parse_event_log(log_data)
    pcr_of_mr = {2: 4, 3: 11}
    events = tuple(
        PredictedEvent(
            pcr_of_mr[e.register], EventType(e.event_type), f"event {e.number}",
            e.digest(HashAlg.SHA384), bytes(32), cc=True,
        )
        for e in log.events if e.number in numbers
    )  # fmt: skip
    return Prediction(bytes(48), bytes(32), "257", "6.12", "", events)


def test_gcp_log_holds_exactly_its_own_boot(gcp: tuple[bytes, list[bytes]]) -> None:
    data, rtmrs = gcp
    log = parse_event_log(data)
    # Every RTMR1 and RTMR2 event that is not allowlisted, as the prediction: the real log is then
    # exactly that boot, with its RTMR0 and the firmware's RTMR1 actions, separator and GPT around it.
    own = [e.number for e in log.measured() if e.register in (2, 3)
           and e.type_name in ("EV_EFI_BOOT_SERVICES_APPLICATION", "EV_IPL")]  # fmt: skip
    assert own == [18, 19, 20, 23, 24, *range(25, 42)]
    report = check_event_log(rtmrs, data, prediction_from(data, own).events)
    assert report.boot is not None
    assert [e.number for _, e in report.boot.matched] == own
    assert [e.number for e, _ in report.boot.allowed] == [
        *range(1, 18), 21, 22, 42, 43
    ]  # fmt: skip
    assert report.runtime is None
    assert report.lines()[0] == "event log: 43 events replay to the quote's RTMR0..3"
    assert report.lines()[2].startswith(
        "  PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION event 18: event 18 (RTMR1 "
    )
    # Leave grub (event 24) out of the prediction: it is named as the first event not predicted.
    without_grub = prediction_from(data, [n for n in own if n != 24])
    with pytest.raises(UnexpectedEvent, match=r"^event 24: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION "):
        check_event_log(rtmrs, data, without_grub.events)
    # Out of order: the two applications swapped in the prediction.
    swapped = list(prediction_from(data, own).events)
    swapped[0], swapped[4] = swapped[4], swapped[0]
    with pytest.raises(
        EventsMissing,
        match=re.escape("is not in RTMR1: event 18 is predicted event 5, which follows it"),
    ):
        check_event_log(rtmrs, data, swapped)


def test_gcp_log_against_another_quote(gcp: tuple[bytes, list[bytes]]) -> None:
    data, rtmrs = gcp
    other = [rtmrs[0], bytes(48), rtmrs[2], rtmrs[3]]
    with pytest.raises(ReplayMismatch, match=r"^RTMR1: the log's 7 events replay to "):
        check_event_log(other, data)


def test_runtime_log_against_rtmr3(gcp: tuple[bytes, list[bytes]]) -> None:
    data, rtmrs = gcp
    events = [{"seq": 0, "kind": "spec", "source": "image", "key": "spec.json", "digest": "sha384:00"}]
    # The GCP guest never extended RTMR3: a runtime log is then informational only.
    assert check_event_log(rtmrs, data, runtime_events=events).runtime == RuntimeLogBinding.UNBOUND
    bound = [*rtmrs[:3], replay(events)]
    assert check_event_log(bound, data, runtime_events=events).runtime == RuntimeLogBinding.BOUND
    with pytest.raises(RuntimeLogMismatch, match="is not the replay of the 1 runtime events"):
        check_event_log(bound, data, runtime_events=[{**events[0], "key": "other"}])
    # Without a runtime log, a non-zero RTMR3 that the CC log does not explain is a mismatch.
    with pytest.raises(
        ReplayMismatch,
        match=r"^RTMR3 is [0-9a-f]{96}, not what the CC event log leaves there: it was extended "
        r"after boot \(by the runtime event log\?\); pass the runtime event log to check it$",
    ):
        check_event_log(bound, data)


def test_load_prediction(tmp_path: Path) -> None:
    p = Prediction(b"\1" * 48, b"\2" * 32, "257.13", "6.12.118", "console=ttyS0", ())
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"builder": "x", "measurements": p.to_json()}))
    assert load_prediction(manifest) == p
    measured = tmp_path / "measure.json"
    measured.write_text(json.dumps({"uki": "a.efi", **p.to_json()}))
    assert load_prediction(measured) == p
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"builder": "x"}))
    with pytest.raises(MeasureError, match="holds no predicted measurement events"):
        load_prediction(bad)
    bad.write_text("[1]")
    with pytest.raises(MeasureError, match="is not a JSON object"):
        load_prediction(bad)
    with pytest.raises(MeasureError, match="cannot read"):
        load_prediction(tmp_path / "missing.json")
    bad.write_text(json.dumps({"measurements": {**p.to_json(), "events": [{"pcr": 4}]}}))
    with pytest.raises(MeasureError, match="malformed"):
        load_prediction(bad)
