"""The configfs-tsm backend through real file operations on a fake report tree."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from eemini.guest.attest import AttestError, ConfigfsTsmBackend, check_quote
from eemini.guest.dev.simulated import make_quote
from eemini.tdx.quote import parse_quote
from fake_tsm import FakeTsm, sgx_quote

pytestmark = pytest.mark.timeout(60)


def test_quote_through_configfs(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote)
    backend = fake.backend()
    data = b"hello tsm".ljust(64, b"\0")
    quote = backend.quote(data)
    assert parse_quote(quote).report.report_data == data
    assert fake.inblobs == [data]
    assert len(fake.created) == 1 and fake.removed == fake.created
    assert os.path.basename(fake.created[0]).startswith(f"eemini-{os.getpid()}-")
    assert fake.live_entries() == []


def test_each_request_gets_a_fresh_entry(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote)
    backend = fake.backend()
    for i in range(3):
        backend.quote(bytes([i]).ljust(64, b"\0"))
    assert len(set(fake.created)) == 3
    assert fake.live_entries() == []


def test_concurrent_callers_are_serialised(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote)
    backend = fake.backend()
    results: dict[int, bytes] = {}

    def worker(i: int) -> None:
        results[i] = backend.quote((bytes([i]) * 8).ljust(64, b"\0"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: parse_quote(q).report.report_data[:8] for i, q in results.items()} == {
        i: bytes([i]) * 8 for i in range(6)
    }
    assert fake.live_entries() == []


def test_absent_configfs_tsm(tmp_path: Path) -> None:
    backend = ConfigfsTsmBackend(os.fspath(tmp_path / "nope"))
    with pytest.raises(AttestError) as e:
        backend.quote(bytes(64))
    assert str(e.value) == (
        f"configfs-tsm is not available: {tmp_path}/nope does not exist (needs a TDX guest whose "
        "kernel has the TDX guest driver, and configfs mounted)"
    )
    assert e.value.code == "attest_unavailable"


def test_provider_mismatch(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote, provider="sev_guest")
    with pytest.raises(
        AttestError, match=r"^configfs-tsm provider is 'sev_guest', expected 'tdx_guest'"
    ):
        fake.backend().quote(bytes(64))
    assert fake.inblobs == []  # refused before writing anything
    assert fake.removed == fake.created and fake.live_entries() == []


def test_no_provider_registered(tmp_path: Path) -> None:
    """tsm.ko without tdx_guest (a VM without TDX): no report entry can be made."""
    fake = FakeTsm(tmp_path / "report", make_quote, provider=None)
    with pytest.raises(AttestError) as e:
        fake.backend().quote(bytes(64))
    assert str(e.value) == (
        f"configfs-tsm has no provider (creating a report entry in {tmp_path}/report failed with "
        "ENXIO): no TDX guest driver is registered, so this is not a TDX guest or its driver "
        "failed to start"
    )
    assert e.value.code == "attest_unavailable"
    assert fake.created == [] and fake.live_entries() == []


def test_empty_provider(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote, provider="")
    with pytest.raises(AttestError) as e:
        fake.backend().quote(bytes(64))
    assert str(e.value) == (
        "configfs-tsm provider is '', expected 'tdx_guest' (this is not a TDX guest, or another TSM "
        "driver is loaded)"
    )
    assert e.value.code == "attest_unavailable"
    assert fake.inblobs == []
    assert len(fake.created) == 1 and fake.removed == fake.created and fake.live_entries() == []


def test_provider_gone_while_the_quote_is_pending(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote, withdrawn=True)
    with pytest.raises(AttestError) as e:
        fake.backend().quote(bytes(64))
    assert str(e.value) == (
        f"configfs-tsm: cannot read {fake.created[0]}/outblob: the TSM provider is gone (ENXIO)"
    )
    assert e.value.code == "attest_unavailable"
    assert fake.inblobs == [bytes(64)]
    assert fake.removed == fake.created and fake.live_entries() == []


def test_generation_race_is_detected(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote, interloper=True)
    with pytest.raises(AttestError) as e:
        fake.backend().quote(bytes(64))
    assert str(e.value) == (
        "configfs-tsm report entry was written concurrently (generation 0 -> 2, expected 1); "
        "the quote was discarded"
    )
    assert fake.live_entries() == []


def test_empty_outblob(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote, empty=True)
    with pytest.raises(AttestError, match=r"^configfs-tsm returned an empty quote \(outblob is empty\)"):
        fake.backend().quote(bytes(64))
    assert fake.live_entries() == []


def test_quote_with_other_report_data_is_refused(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", lambda data: make_quote(b"\x55" * 64))
    with pytest.raises(
        AttestError, match=r"^the report data inside the quote .* differs from the request"
    ):
        fake.backend().quote(bytes(64))
    assert fake.live_entries() == []


def test_not_a_tdx_quote_is_refused(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", sgx_quote)
    with pytest.raises(AttestError, match=r"^quote TEE type is 0x0, expected 0x81 \(TDX\)$"):
        fake.backend().quote(bytes(64))


@pytest.mark.parametrize(
    ("quote", "message"),
    [
        (b"", "the quote is empty"),
        (b"\x04\x00", "quote is 2 bytes, shorter than a quote header (48)"),
        (struct.pack("<HHI", 3, 2, 0x81) + bytes(700), "quote version is 3, expected 4 or 5"),
        (
            struct.pack("<HHI", 4, 3, 0x81) + bytes(700),
            "quote attestation key type is 3, expected 2 (ECDSA P-256)",
        ),
        (
            struct.pack("<HHI", 4, 2, 0x81) + bytes(100),
            "quote is 108 bytes, too short for its TD report body",
        ),
        (struct.pack("<HHI", 4, 2, 0x81) + bytes(44 + 584 + 4), "the quote carries no signature data"),
    ],
)
def test_self_check(quote: bytes, message: str) -> None:
    with pytest.raises(AttestError) as e:
        check_quote(quote, bytes(64))
    assert str(e.value) == message


def test_self_check_accepts_real_v4_and_v5_quotes() -> None:
    from conftest import shared_testdata

    quotes = shared_testdata("quotes")
    for name in ("dcap-qvl__tdx_quote.bin", "dcap-qvl__tdx_quote_outdated_v5.bin"):
        quote = (quotes / name).read_bytes()
        check_quote(quote, parse_quote(quote).report.report_data)
