"""RTMR3 extension through the Linux 6.16 sysfs ABI (`measurements/rtmr3:sha384`), against a fake
sysfs tree (configurable root)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from eemini.guest.events import Event
from eemini.guest.rtmr import (
    MEASUREMENTS_DIR,
    RTMR3_FILE,
    Rtmr3,
    RtmrError,
    RuntimeMeasurer,
    event_bytes,
    event_digest,
)
from eemini.tdx.runtime_log import RuntimeLogBinding, RuntimeLogMismatch, check_runtime_log, replay


class FakeRtmr3:
    """The attribute as a regular file: each extension overwrites its 48 bytes at offset 0, and
    the test plays the kernel's part by folding every write into `value` (the real file returns
    the register instead; the ABI's write semantics is what is under test)."""

    def __init__(self, root: Path) -> None:
        d = root / MEASUREMENTS_DIR
        d.mkdir(parents=True)
        self.path = d / RTMR3_FILE
        self.path.write_bytes(bytes(48))
        self.value = bytes(48)
        self.writes: list[bytes] = []

    def observe(self) -> None:
        data = self.path.read_bytes()
        assert len(data) == 48, "each extension must be one 48-byte write at offset 0"
        self.writes.append(data)
        self.value = hashlib.sha384(self.value + data).digest()


@pytest.fixture
def fake(tmp_path: Path) -> FakeRtmr3:
    return FakeRtmr3(tmp_path)


def event(seq: int, kind: str, key: str, digest: str) -> Event:
    return Event(seq, kind, "image", key, digest, 1.5 + seq)


def test_event_encoding_is_canonical_and_leaves_time_out() -> None:
    ev = event(0, "spec", "spec.json", "sha384:" + "ab" * 48).to_dict()
    assert event_bytes(ev) == (
        b'{"digest":"sha384:'
        + b"ab" * 48
        + b'","key":"spec.json","kind":"spec","seq":0,"source":"image"}'
    )
    assert event_digest(ev) == hashlib.sha384(event_bytes(ev)).digest()
    assert event_digest({**ev, "time": 99.0}) == event_digest(ev)
    with pytest.raises(ValueError, match="runtime event lacks the field 'digest'"):
        replay([{"seq": 0, "kind": "x", "source": "y", "key": "z"}])


def test_replay() -> None:
    evs = [event(i, "config", f"K{i}", f"sha384:{i:096x}").to_dict() for i in range(3)]
    value = bytes(48)
    for e in evs:
        value = hashlib.sha384(value + event_digest(e)).digest()
    assert replay(evs) == value
    assert replay([]) == bytes(48)


def test_measurer_extends_rtmr3(tmp_path: Path, fake: FakeRtmr3) -> None:
    m = RuntimeMeasurer(Rtmr3(str(tmp_path)))
    assert m.enabled
    evs = [
        event(0, "spec", "spec.json", "sha384:" + "00" * 48),
        event(1, "separator", "", "sha384:" + "11" * 48),
    ]
    for e in evs:
        m.measure(e)
        fake.observe()
    assert fake.writes == [event_digest(e.to_dict()) for e in evs]
    assert fake.value == replay(e.to_dict() for e in evs)
    assert m.status() == {"rtmr3_extended": True, "rtmr3_via": "sysfs", "rtmr3_events": 2}


def test_measurer_without_the_sysfs_file(tmp_path: Path) -> None:
    m = RuntimeMeasurer(Rtmr3(str(tmp_path)))
    assert not m.enabled
    m.measure(event(0, "spec", "k", "sha384:00"))  # nothing to do, no error
    path = tmp_path / MEASUREMENTS_DIR / RTMR3_FILE
    assert m.status() == {
        "rtmr3_extended": False,
        "rtmr3_reason": f"{path} is absent (the kernel exposes RTMR extension from Linux 6.16 on)",
    }


def test_extend_checks(tmp_path: Path) -> None:
    r = Rtmr3(str(tmp_path))
    with pytest.raises(RtmrError, match=r"cannot open .*rtmr3:sha384 to extend RTMR3: No such file"):
        r.extend(bytes(48))
    # A read-only attribute (mode 0444): reported by unavailable_reason, refused by the kernel.
    path = tmp_path / MEASUREMENTS_DIR / RTMR3_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07" * 48)
    if os.getuid() != 0:  # root writes through 0444
        path.chmod(0o444)
        assert r.unavailable_reason() == f"{path} is not writable"


def test_verifier_checks_the_runtime_log_against_rtmr3() -> None:
    evs = [event(i, "config", f"K{i}", f"sha384:{i:096x}").to_dict() for i in range(3)]
    assert check_runtime_log(evs, replay(evs)) == RuntimeLogBinding.BOUND
    assert check_runtime_log(evs, bytes(48)) == RuntimeLogBinding.UNBOUND
    assert check_runtime_log([], bytes(48)) == RuntimeLogBinding.UNBOUND
    with pytest.raises(
        RuntimeLogMismatch,
        match=re.escape("RTMR3 matches the first 2 runtime events; event seq 2 (config 'K2') and later"),
    ):
        check_runtime_log(evs, replay(evs[:2]))
    tampered = [*evs[:1], {**evs[1], "key": "OTHER"}, evs[2]]
    with pytest.raises(RuntimeLogMismatch, match="is not the replay of the 3 runtime events"):
        check_runtime_log(tampered, replay(evs))
    with pytest.raises(RuntimeLogMismatch, match="runtime event log is malformed: runtime event lacks"):
        check_runtime_log([{"seq": 0}], replay(evs))
