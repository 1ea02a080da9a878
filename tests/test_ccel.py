"""CC event log parsing and replay: the real GCP TDX guest log must replay to its quote's RTMRs;
synthetic logs cover the firmware's padding, divergence reports and hostile input."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_testdata
from eemini.tdx.ccel import (
    CcType,
    ReplayMismatch,
    check_replay,
    extend,
    parse_ccel_table,
    replay_rtmrs,
)
from eemini.tdx.eventlog import EventLogError, EventType, HashAlg, parse_event_log

# Intel TDX DCAP quote v4: 48-byte header, then the TD report body, whose RTMR0..3 start at
# offset 328 (TEE_TCB_SVN 16, MRSEAM 48, MRSIGNERSEAM 48, SEAMATTRIBUTES 8, TDATTRIBUTES 8, XFAM 8,
# MRTD 48, MRCONFIGID 48, MROWNER 48, MROWNERCONFIG 48).
QUOTE_RTMR0 = 48 + 328


def quote_rtmrs(quote: bytes) -> list[bytes]:
    return [quote[QUOTE_RTMR0 + 48 * i : QUOTE_RTMR0 + 48 * (i + 1)] for i in range(4)]


@pytest.fixture(scope="module")
def gcp() -> Path:
    return shared_testdata("ccel")


def test_gcp_table(gcp: Path) -> None:
    table = parse_ccel_table((gcp / "gcp-cos-113__ccel_table.dat").read_bytes())
    assert table.cc_type == CcType.TDX
    assert table.revision == 1
    assert table.oem_id == "INTEL"
    assert table.log_area_minimum_length == 262144 == (gcp / "gcp-cos-113__ccel_data.dat").stat().st_size
    assert table.log_area_start_address == 0xBEDBF000


def test_gcp_log_replays_to_its_quote(gcp: Path) -> None:
    log = parse_event_log((gcp / "gcp-cos-113__ccel_data.dat").read_bytes())
    assert log.spec_id.algorithms == ((HashAlg.SHA384, 48),)
    assert log.header_register == 1  # TDVF writes PCRIndex 1 into the Spec ID header
    assert len(log.events) == 43
    assert [log.events[0].type_name, log.events[-1].describe()] == [
        "EV_EFI_HANDOFF_TABLES2",
        "EV_EFI_ACTION 'Exit Boot Services Returned with Success'",
    ]
    rtmrs = quote_rtmrs((gcp / "gcp-cos-113__cos-113-tdx-quote.dat").read_bytes())
    assert list(replay_rtmrs(log)) == rtmrs
    assert rtmrs[3] == bytes(48)  # nothing extended RTMR3 in that guest
    check_replay(log, rtmrs)
    # EV_EFI_ACTION digests are SHA-384 of the ASCII string (edk2 TdMeasureAction): check one.
    calling = next(e for e in log.events if e.data == b"Calling EFI Application from Boot Option")
    assert calling.digest(HashAlg.SHA384) == hashlib.sha384(calling.data).digest()
    assert calling.register == 2  # RTMR1


def test_gcp_log_tampered_names_the_event(gcp: Path) -> None:
    data = bytearray((gcp / "gcp-cos-113__ccel_data.dat").read_bytes())
    log = parse_event_log(bytes(data))
    rtmrs = quote_rtmrs((gcp / "gcp-cos-113__cos-113-tdx-quote.dat").read_bytes())
    app = log.events[17]
    assert app.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"
    data[app.offset + 12 + 2] ^= 1  # first byte of its SHA-384 digest
    with pytest.raises(
        ReplayMismatch,
        match=re.escape("RTMR1: the log's 7 events replay to ")
        + ".*no prefix of the log reaches it, so the log diverges from the first RTMR1 event on: "
        + re.escape("event 15 (EV_EFI_ACTION 'Calling EFI Application from Boot Option')"),
    ):
        check_replay(parse_event_log(bytes(data)), rtmrs)
    # A quote taken before the last events were logged: the log goes on past it.
    early = list(rtmrs)
    early[1] = bytes(48)
    for e in log.events[:41]:
        if e.register == 2:
            early[1] = extend(early[1], e.digest(HashAlg.SHA384))
    with pytest.raises(
        ReplayMismatch,
        match=re.escape(
            "the quote's value is reached after 5 events, so the log diverges at event 42 "
            "(EV_EFI_ACTION 'Exit Boot Services Invocation'), which the quote does not cover"
        ),
    ):
        check_replay(log, early)


# Synthetic logs in TDVF's layout: the legacy header with the Spec ID event, then CC_EVENTs.


def spec_id(algs: list[tuple[int, int]] = [(0x000C, 48)]) -> bytes:  # noqa: B006
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, s) for a, s in algs) + b"\0"
    return struct.pack("<II20sI", 1, 3, bytes(20), len(body)) + body


def event(mr: int, etype: int, data: bytes, digest: bytes | None = None) -> bytes:
    d = digest if digest is not None else hashlib.sha384(data).digest()
    return struct.pack("<IIIH", mr, etype, 1, 0x000C) + d + struct.pack("<I", len(data)) + data


def test_synthetic_replay_and_padding() -> None:
    a, b, c = b"alpha", b"beta", b"gamma"
    body = spec_id() + event(1, 4, a) + event(3, 0xD, b) + event(2, 3, b"no action") + event(4, 0xD, c)
    for pad in (b"", b"\xff" * 4096, bytes(4096)):
        log = parse_event_log(body + pad)
        assert [e.number for e in log.events] == [1, 2, 3, 4]
        assert [e.type_name for e in log.measured()] == ["EV_SEPARATOR", "EV_IPL", "EV_IPL"]
        zero = bytes(48)
        assert replay_rtmrs(log) == (
            extend(zero, hashlib.sha384(a).digest()),
            zero,
            extend(zero, hashlib.sha384(b).digest()),
            extend(zero, hashlib.sha384(c).digest()),
        )


def test_mrtd_events_are_refused() -> None:
    log = parse_event_log(spec_id() + event(0, 4, b"x"))
    with pytest.raises(EventLogError, match=r"event 1 \(EV_SEPARATOR 'x'\) names MR index 0"):
        replay_rtmrs(log)


def test_tpm_log_with_two_banks() -> None:
    # A TPM log (securityfs binary_bios_measurements) carries one digest per active bank.
    algs = [(0x000B, 32), (0x000C, 48)]
    rec = struct.pack("<III", 4, EventType.EV_EFI_ACTION, 2)
    rec += struct.pack("<H", 0x000B) + hashlib.sha256(b"x").digest()
    rec += struct.pack("<H", 0x000C) + hashlib.sha384(b"x").digest() + struct.pack("<I", 1) + b"x"
    log = parse_event_log(spec_id(algs) + rec)
    (e,) = log.events
    assert e.register == 4
    assert e.digest(HashAlg.SHA256) == hashlib.sha256(b"x").digest()
    assert e.digest(HashAlg.SHA384) == hashlib.sha384(b"x").digest()
    with pytest.raises(KeyError):
        e.digest(HashAlg.SHA1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\0" * 10, "event log is 10 bytes, too short for its header event"),
        (
            struct.pack("<II20sI", 0, 4, bytes(20), 0),
            "first event has type EV_SEPARATOR, expected EV_NO_ACTION",
        ),
        (
            struct.pack("<II20sI", 0, 3, bytes(20), 1000),
            "Spec ID event size 1000 runs past the end of the log",
        ),
        (
            struct.pack("<II20sI", 0, 3, bytes(20), 40) + b"Spec ID Event02\0" + bytes(24),
            "signature b'Spec ID Event02",
        ),
        (spec_id([(0x000C, 32)]), "gives algorithm 0x000c a digest size of 32, expected 48"),
        (spec_id([(0x4242, 0)]), "gives algorithm 0x4242 an impossible digest size 0"),
        (spec_id() + event(1, 4, b"x")[:30], "event 1 at offset 0x41: truncated digest"),
        (
            spec_id() + struct.pack("<III", 1, 4, 2),
            "event 1 at offset 0x41: 2 digests, but the Spec ID event lists 1",
        ),
        (
            spec_id() + struct.pack("<IIIH", 1, 4, 1, 0x000B),
            "digest algorithm 0x000b is not in the Spec ID event",
        ),
        (spec_id() + event(1, 4, b"x")[:-5], "event 1 at offset 0x41: truncated event size"),
        (spec_id() + event(1, 4, b"xyz")[:-1], "event data of 3 bytes runs past the end of the log"),
        (spec_id() + event(1, 4, b"x") + b"\1\0", "event 2 at offset 0x84: truncated header"),
    ],
)
def test_hostile_logs(data: bytes, message: str) -> None:
    with pytest.raises(EventLogError, match=re.escape(message)):
        parse_event_log(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"CCEL", "CCEL table is 4 bytes, expected 56"),
        (b"XCEL" + bytes(52), "not a CCEL table: signature b'XCEL', expected b'CCEL'"),
        (
            b"CCEL" + struct.pack("<I", 60) + bytes(48),
            "CCEL table header says 60 bytes, but 56 were given",
        ),
        (b"CCEL" + struct.pack("<I", 56) + b"\1" + bytes(47), "CCEL table checksum is wrong"),
    ],
)
def test_hostile_tables(data: bytes, message: str) -> None:
    with pytest.raises(EventLogError, match=re.escape(message)):
        parse_ccel_table(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_logs_fail_cleanly(data: st.DataObject) -> None:
    buf = bytearray(spec_id() + event(1, 4, b"abc") + event(3, 0xD, b"defg") + b"\xff" * 64)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        log = parse_event_log(bytes(buf[: data.draw(st.integers(0, len(buf)))]))
        replay_rtmrs(log)
    except EventLogError:
        pass
