"""Measurement prediction from a UKI's bytes, matching predicted events in event logs, and the
`eemini measure` command."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from eemini.cli import main
from eemini.tdx.bootevents import EventsMissing, UnexpectedEvent, check_boot_events
from eemini.tdx.eventlog import EventType, HashAlg, parse_event_log
from eemini.tdx.measure import (
    MeasureError,
    Prediction,
    kernel_version,
    pcr_to_mr_index,
    predict,
    stub_cmdline,
)
from eemini.tdx.pe import DigestAlgorithm, authenticode_digest, parse_pe, section_memory
from petools import Sec, assemble_uki, make_pe, need_stub

INITRD = bytes(range(256)) * 20


def sha384(b: bytes) -> bytes:
    return hashlib.sha384(b).digest()


def fake_kernel(
    version: bytes = b"6.12.57+deb13-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP",
) -> bytes:
    """A PE image carrying an x86 boot-protocol header ('HdrS' at 0x202, kernel_version at 0x20E)."""
    body = bytearray(0x400)
    body[2:6] = b"HdrS"
    struct.pack_into("<H", body, 0xE, 0x100)  # the string is at 0x100 + 0x200 in the file
    body[0x100 : 0x100 + len(version) + 1] = version + b"\0"
    image = make_pe([Sec(".text", bytes(body))])
    assert image[0x202:0x206] == b"HdrS"
    return image


def synthetic_uki(stub: str, sections: list[Sec]) -> bytes:
    magic = f"#### LoaderInfo: systemd-stub {stub} ####".encode() + b"\0"
    return make_pe([Sec(".text", b"\xc3" * 64), Sec(".sdmagic", magic), *sections])


def test_pcr_to_mr_index() -> None:
    assert [pcr_to_mr_index(p) for p in range(16)] == [0, 1, 2, 2, 2, 2, 2, 1, 3, 3, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="PCR 16 has no TDX measurement register"):
        pcr_to_mr_index(16)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"console=ttyS0 quiet", "console=ttyS0 quiet"),
        (b"  console=ttyS0\n", "console=ttyS0"),
        (b"a\tb\r\nc\x7f\0ignored after NUL", "a b  c"),
        (b"", ""),
        ("ee.NAME=caf\u00e9".encode(), "ee.NAME=caf\u00e9"),
    ],
)
def test_stub_cmdline(raw: bytes, expected: str) -> None:
    assert stub_cmdline(raw) == expected


def test_stub_cmdline_rejects_bad_utf8() -> None:
    with pytest.raises(MeasureError, match="cmdline is not valid UTF-8"):
        stub_cmdline(b"\xff\xfe")


def test_kernel_version() -> None:
    assert kernel_version(b"6.12.57+deb13-cloud-amd64\0", b"") == "6.12.57+deb13-cloud-amd64"
    assert kernel_version(None, fake_kernel()) == "6.12.57+deb13-cloud-amd64"
    assert kernel_version(b"", b"MZ" + bytes(1000)) is None


def test_predict_objcopy_uki_on_debian_stub_252(tmp_path: Path) -> None:
    stub = need_stub()
    kernel = stub.read_bytes()  # any PE does as a stand-in kernel
    uki = assemble_uki(
        tmp_path / "uki.efi", linux=kernel, cmdline=b"console=ttyS0 ee.X=1 \n", initrd=INITRD
    )
    data = uki.read_bytes()
    p = predict(data)
    assert p.stub_version.startswith("252.")
    assert p.cmdline == "console=ttyS0 ee.X=1"
    assert p.uki_sha384 == authenticode_digest(data)
    image = parse_pe(data)
    linux = image.section(".linux")
    assert linux is not None and linux.virtual_size == len(kernel) < linux.size_of_raw_data
    osrel = b"ID=eemini-test\n"
    cmdline_mem = b"console=ttyS0 ee.X=1 \n"
    expected = [
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_digest(data), True),
        # v252 measures into the TPM only (no CC protocol support before v256); .sbat and .uname
        # are not in v252's list even though the stub has a .sbat.
        (11, "EV_IPL", sha384(b".linux\0"), False),
        (11, "EV_IPL", sha384(kernel), False),
        (11, "EV_IPL", sha384(b".osrel\0"), False),
        (11, "EV_IPL", sha384(osrel), False),
        (11, "EV_IPL", sha384(b".cmdline\0"), False),
        (11, "EV_IPL", sha384(cmdline_mem), False),
        (11, "EV_IPL", sha384(b".initrd\0"), False),
        (11, "EV_IPL", sha384(INITRD), False),
        # Then the stub LoadImage()s the kernel: the firmware measures it.
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_digest(kernel), True),
        # The kernel version is unknown (the stand-in kernel has no boot header): TPM only.
        (9, "EV_EVENT_TAG", sha384("console=ttyS0 ee.X=1\0".encode("utf-16-le")), False),
        (9, "EV_EVENT_TAG", sha384(INITRD), False),
    ]
    assert [(e.pcr, e.event_type.name, e.sha384, e.cc) for e in p.events] == expected
    assert p.events[0].sha256 == authenticode_digest(data, DigestAlgorithm.SHA256)
    assert p.events[2].sha256 == hashlib.sha256(kernel).digest()
    assert [e.rtmr for e in p.events] == [1, *[2] * 8, 1, 2, 2]
    assert Prediction.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_predict_stub_257_rules() -> None:
    kernel = fake_kernel()
    uki = synthetic_uki(
        "257.9-1~deb13u1",
        [
            Sec(".osrel", b"ID=x\n"),
            Sec(".cmdline", b"console=ttyS0"),
            Sec(".initrd", INITRD),
            Sec(".uname", b"6.12.57+deb13-cloud-amd64"),
            Sec(".sbat", b"sbat,1\n"),
            Sec(".linux", kernel),
            Sec(".empty", b"x", virtual_size=0),
        ],
    )
    p = predict(uki)
    assert p.kernel_version == "6.12.57+deb13-cloud-amd64"
    names = [e.what for e in p.events if e.pcr == 11]
    assert names == [
        f"section{kind} {n}"
        for n in (".linux", ".osrel", ".cmdline", ".initrd", ".uname", ".sbat")
        for kind in (" name", "")
    ]
    assert all(e.cc for e in p.events)  # stub >= 256 and kernel >= 6.9 reach the CC log
    # With a vTPM the kernel measures into the TPM only: no PCR 9 events in the CC log.
    assert p.cc_events(vtpm=True) == tuple(e for e in p.events if e.pcr != 9)
    assert len(p.cc_events()) == len(p.events) == len(p.cc_events(vtpm=True)) + 2
    inner = p.events[13]
    assert inner.what == "kernel from .linux (PE Authenticode)"
    assert inner.sha384 == authenticode_digest(kernel)
    # v257 serves the kernel .initrd followed by a cpio holding .osrel as /.extra/os-release.
    osrel_cpio = (
        b"070701" + b"%08x" * 13 % (1, 0o40555, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, 0) + b".extra" + bytes(4)
        + b"070701" + b"%08x" * 13 % (2, 0o100444, 0, 0, 1, 0, 5, 0, 0, 0, 0, 18, 0)
        + b".extra/os-release\0" + b"ID=x\n\0\0\0"
        + b"070701" + b"0" * 32 + b"00000001" + b"0" * 48 + b"0000000B00000000TRAILER!!!\0\0\0\0"
    )  # fmt: skip
    assert len(INITRD) % 4 == 0
    assert p.events[-1].what == "initrd (as systemd-stub serves it)"
    assert p.events[-1].sha384 == sha384(INITRD + osrel_cpio)
    # The section bytes are the in-memory ones: VirtualSize, not the 512-byte aligned raw data.
    sbat = next(e for e in p.events if e.what == "section .sbat")
    assert sbat.sha384 == sha384(b"sbat,1\n")


def test_predict_stub_258_has_no_inner_kernel_event() -> None:
    uki = synthetic_uki("258.1", [Sec(".cmdline", b"x"), Sec(".linux", fake_kernel())])
    p = predict(uki)
    assert [e.what for e in p.events if e.pcr == 4] == ["UKI (PE Authenticode)"]


def test_zero_extended_linux_changes_the_inner_kernel_digest() -> None:
    # ukify 257.0-257.2 set .linux VirtualSize to the kernel's SizeOfImage (systemd#34583): the stub
    # then LoadImage()s and measures the zero-extended bytes, not the vmlinuz file.
    kernel = fake_kernel()
    uki = synthetic_uki("257.2", [Sec(".linux", kernel, virtual_size=len(kernel) + 4096)])
    p = predict(uki)
    extended = kernel + bytes(4096)
    assert section_memory(uki, parse_pe(uki).sections[-1]) == extended
    inner = next(e for e in p.events if e.what.startswith("kernel from"))
    assert inner.sha384 == authenticode_digest(extended) != authenticode_digest(kernel)
    assert next(e for e in p.events if e.what == "section .linux").sha384 == sha384(extended)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"MZ" + bytes(10), "not a valid UKI: file is too short for a DOS header"),
        (make_pe([Sec(".text", b"x")]), "no .sdmagic section: this UKI was not built on systemd-stub"),
        (make_pe([Sec(".sdmagic", b"hello")]), "holds no 'LoaderInfo: systemd-stub VERSION' marker"),
        (synthetic_uki("251", []), "systemd-stub 251 predates the UKI measurement rules (v252)"),
        (synthetic_uki("257", [Sec(".cmdline", b"x")]), "the UKI has no .linux section"),
        (synthetic_uki("257", [Sec(".linux", b"not a PE")]), "the .linux section is not a PE image"),
        (synthetic_uki("257", [Sec(".profile", b"ID=a"), Sec(".linux", b"")]), "multi-profile UKIs"),
        (
            synthetic_uki(
                "257", [Sec(".initrd", b"i"), Sec(".ucode", b"u"), Sec(".linux", fake_kernel())]
            ),
            "the stub adds .ucode to the initrd it serves",
        ),
    ],
)
def test_unpredictable_ukis(data: bytes, message: str) -> None:
    with pytest.raises(MeasureError, match=re.escape(message)):
        predict(data)


# Matching predicted events in logs.


def log_bytes(records: Sequence[tuple[int, int, bytes]], algs: tuple[int, ...] = (0x000C,)) -> bytes:
    sizes = {0x000B: 32, 0x000C: 48}
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, sizes[a]) for a in algs) + b"\0"
    out = struct.pack("<II20sI", 0, 3, bytes(20), len(body)) + body
    for reg, etype, digest384 in records:
        out += struct.pack("<III", reg, etype, len(algs))
        for a in algs:
            out += struct.pack("<H", a) + (digest384 if a == 0x000C else bytes(32))
        out += struct.pack("<I", 4) + b"data"
    return out


def test_exact_set_in_a_cc_log() -> None:
    kernel = fake_kernel()
    p = predict(
        synthetic_uki("257.9", [Sec(".cmdline", b"quiet"), Sec(".initrd", b"i"), Sec(".linux", kernel)])
    )
    bsa, ipl, tag = EventType.EV_EFI_BOOT_SERVICES_APPLICATION, EventType.EV_IPL, EventType.EV_EVENT_TAG
    ours = [(e.mr_index, e.event_type, e.sha384) for e in p.events]
    seen = check_boot_events(parse_event_log(log_bytes(ours)), p.events, cc=True)
    assert len(ours) == 10
    assert [m[1].number for m in seen.matched] == list(range(1, 11))
    assert [m[1].event_type for m in seen.matched] == [bsa, *[ipl] * 6, bsa, tag, tag]

    # Drop the .cmdline contents event: named, with the event that stands in its place.
    missing = [r for r in ours if r[2] != sha384(b"quiet")]
    with pytest.raises(
        EventsMissing,
        match=re.escape("predicted event 5 of 10, PCR11/RTMR2 EV_IPL section .cmdline sha384 ")
        + "[0-9a-f]{96}"
        + re.escape(", is not in RTMR2: event 5 is predicted event 6, which follows it"),
    ):
        check_boot_events(parse_event_log(log_bytes(missing)), p.events, cc=True)

    # Swap the two RTMR1 application events: the inner kernel's comes first, out of order.
    swapped = list(ours)
    swapped[0], swapped[7] = swapped[7], swapped[0]
    with pytest.raises(
        EventsMissing, match=re.escape("is not in RTMR1: event 1 is predicted event 8, which follows it")
    ):
        check_boot_events(parse_event_log(log_bytes(swapped)), p.events, cc=True)
    # An event no firmware logs in RTMR0 (PCR 1, 7), before ours.
    with pytest.raises(UnexpectedEvent, match=r"^event 1: RTMR0 EV_EFI_ACTION 'data' sha384 "):
        check_boot_events(
            parse_event_log(log_bytes([(1, EventType.EV_EFI_ACTION, sha384(b"x")), *ours])),
            p.events, cc=True,
        )  # fmt: skip


def test_exact_set_in_a_tpm_log_uses_pcrs() -> None:
    # Stub 252: the PCR 11 events are TPM-only, so a CC check skips them but a TPM check needs them.
    p = predict(synthetic_uki("252.39", [Sec(".linux", fake_kernel())]))
    tpm = [(e.pcr, e.event_type, e.sha384) for e in p.events]
    log = parse_event_log(log_bytes(tpm, algs=(0x000B, 0x000C)))
    assert len(check_boot_events(log, p.events, cc=False).matched) == len(p.events) == 4
    cc_only = [(e.mr_index, e.event_type, e.sha384) for e in p.events if e.cc]
    assert len(check_boot_events(parse_event_log(log_bytes(cc_only)), p.events, cc=True).matched) == 2
    short_tpm = parse_event_log(log_bytes(tpm[:1]))
    message = "predicted event 2 of 4, PCR11/RTMR2 EV_IPL section name .linux sha384 "
    with pytest.raises(
        EventsMissing,
        match=re.escape(message) + "[0-9a-f]{96}, is not in PCR11: the log ends without it$",
    ):
        check_boot_events(short_tpm, p.events, cc=False)
    assert HashAlg.SHA384 in dict(log.spec_id.algorithms)


# The command.


def test_measure_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uki = tmp_path / "build" / "image.efi"
    uki.parent.mkdir()
    uki.write_bytes(synthetic_uki("257.9", [Sec(".cmdline", b"quiet"), Sec(".linux", fake_kernel())]))
    assert main(["measure", str(uki.parent), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["uki"] == str(uki)
    assert out["uki_authenticode_sha384"] == authenticode_digest(uki.read_bytes()).hex()
    whats = [e["what"] for e in out["events"]]
    assert whats[:2] == ["UKI (PE Authenticode)", "section name .linux"]
    assert whats[5] == "kernel from .linux (PE Authenticode)"
    assert main(["measure", str(uki)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == f"UKI {uki}"
    assert text[1] == f"UKI Authenticode sha384 {out['uki_authenticode_sha384']}"
    assert text[3] == "systemd-stub 257.9, kernel 6.12.57+deb13-cloud-amd64"
    assert re.fullmatch(
        r"PCR4  RTMR1  EV_EFI_BOOT_SERVICES_APPLICATION +[0-9a-f]{96}  UKI \(PE Authenticode\)", text[5]
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no UKI (*.efi) in"),
        ("two", "2 UKIs in"),
        ("bad", "a.efi: not a valid UKI: not a PE image: DOS magic is 6e6f"),
    ],
)
def test_measure_command_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    target = tmp_path / "d"
    if setup != "missing":
        target.mkdir()
    if setup in ("two", "bad"):
        (target / "a.efi").write_bytes(b"no" + bytes(100))
    if setup == "two":
        (target / "b.efi").write_bytes(b"no")
    assert main(["measure", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eemini measure: error: ") and message in err


def test_measure_check_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uki = tmp_path / "uki.efi"
    uki.write_bytes(synthetic_uki("257.9", [Sec(".cmdline", b"quiet"), Sec(".linux", fake_kernel())]))
    p = predict(uki.read_bytes())
    cc_log = tmp_path / "ccel.bin"
    cc_log.write_bytes(log_bytes([(e.mr_index, e.event_type, e.sha384) for e in p.events]))
    assert main(["measure", str(uki), "--check-log", str(cc_log)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(
        "found PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION UKI (PE Authenticode): event 1 (RTMR1 "
    )
    assert lines[-1] == (
        f"{cc_log}: exactly the {len(p.events)} predicted events, in order, and 0 allowlisted "
        "firmware events that load no code"
    )
    # The same log read as a TPM log: registers are then PCRs, and MR index 2 is not PCR 4.
    assert main(["measure", str(uki), "--check-log", str(cc_log), "--tpm"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"eemini measure: error: {cc_log}: event 1: PCR2 EV_EFI_BOOT_SERVICES_APPLICATION 'data' "
        f"sha384 {p.uki_sha384.hex()} is not this image's: it is PCR4/RTMR1 "
        "EV_EFI_BOOT_SERVICES_APPLICATION UKI (PE Authenticode), but in PCR2, not PCR4\n"
    )
    tpm_log = tmp_path / "tpm.bin"
    tpm_log.write_bytes(
        log_bytes([(e.pcr, e.event_type, e.sha384) for e in p.events], algs=(0x000B, 0x000C))
    )
    assert main(["measure", str(uki), "--check-log", str(tpm_log), "--tpm"]) == 0
    assert (
        "found PCR9/RTMR2 EV_EVENT_TAG kernel LoadOptions (cmdline): event " in capsys.readouterr().err
    )
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"junk")
    assert main(["measure", str(uki), "--check-log", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"eemini measure: error: {bad} is not an event log: event log is 4 bytes, too short for "
        "its header event\n"
    )
