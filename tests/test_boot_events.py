"""The exact-set rule (eemini.tdx.bootevents) through the whole verifier: every attack of a hostile
host on the boot chain, written as a forged CC event log paired with a quote whose RTMRs are that
log's replay, is rejected with the first event that is not this image's named.

The image is a synthetic UKI on systemd-stub 257 with a 6.12 kernel: the same events our built
images cause (docs/measurements.md), with digests of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

import forge
from conftest import shared_testdata
from eemini.cli import main
from eemini.tdx.bootevents import ALLOWED, EventsMissing, Group, UnexpectedEvent, check_boot_events
from eemini.tdx.errors import (
    FirmwareNotPinned,
    MeasurementMismatch,
    RuntimeLogUnbound,
    VerificationError,
)
from eemini.tdx.eventlog import parse_event_log
from eemini.tdx.evidence import EventLogInvalid
from eemini.tdx.measure import PredictedEvent, Prediction, predict
from eemini.tdx.policy import Policy, PolicyBuilder
from eemini.tdx.roots import development_root
from eemini.tdx.verify import VerifiedQuote, Waiver, verify
from forge import Rec, T
from petools import Sec
from tdx_builder import NOW, build_quote, make_chain
from test_measure import INITRD, fake_kernel, synthetic_uki

MRTD = b"\x7d" * 48
CHAIN = make_chain(seed=41)
ROOTS = [development_root(CHAIN.root_pem)]
CMDLINE = b"console=ttyS0 quiet"


@pytest.fixture(scope="module")
def image() -> Prediction:
    return predict(
        synthetic_uki("257.13", [
            Sec(".osrel", b"ID=eemini\n"), Sec(".cmdline", CMDLINE), Sec(".initrd", INITRD),
            Sec(".linux", fake_kernel()),
        ])
    )  # fmt: skip


def policy(expected: tuple[PredictedEvent, ...], **changes: object) -> Policy:
    base = PolicyBuilder().require_collateral(False).accepted_mr_td([MRTD])
    return base.expected_events(expected).allow_unbound_runtime_log().build().replace(**changes)


def run(
    recs: list[Rec], expected: tuple[PredictedEvent, ...], pol: Policy | None = None, **kw: object
) -> VerifiedQuote:
    r0, r1, r2, r3 = forge.rtmrs(recs)
    quote = build_quote(CHAIN, mr_td=MRTD, rtmr0=r0, rtmr1=r1, rtmr2=r2, rtmr3=r3)
    return verify(
        quote, None, pol or policy(expected), NOW, trusted_roots=ROOTS,
        event_log=forge.log_bytes(recs), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_clean_boot_verifies(image: Prediction) -> None:
    expected = image.cc_events()
    assert [(e.pcr, e.what) for e in expected] == [
        (4, "UKI (PE Authenticode)"),
        *[(11, f"section{k} {n}") for n in (".linux", ".osrel", ".cmdline", ".initrd")
          for k in (" name", "")],
        (4, "kernel from .linux (PE Authenticode)"),
        (9, "kernel LoadOptions (cmdline)"),
        (9, "initrd (as systemd-stub serves it)"),
    ]  # fmt: skip
    v = run(forge.good_boot(expected), expected)
    assert v.checks[-4:] == ("mr-td", "firmware-pinned", "event-log", "expected-events")
    assert v.waived == (
        Waiver("runtime-log", "unbound", "no runtime event log was given, so the boot-time config "
               "is not checked (allow_unbound_runtime_log)"),
    )  # fmt: skip
    report = v.event_log
    assert report is not None and report.boot is not None
    assert [e.number for _, e in report.boot.matched] == list(range(16, 28))
    # Everything else is allowlisted firmware data: 12 RTMR0 events, then around ours in RTMR1.
    assert [(e.number, g) for e, g in report.boot.allowed] == [
        *[(n, Group.HOST_CONFIG) for n in range(1, 13)],
        (13, Group.BOOT), (14, Group.BOOT), (15, Group.BOOT), (28, Group.BOOT), (29, Group.BOOT),
    ]  # fmt: skip
    assert report.lines()[1] == (
        "  exactly this image's events: 12 predicted, 17 allowlisted firmware events that load no "
        "code, nothing else"
    )
    assert report.lines()[2] == (
        "  PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION UKI (PE Authenticode): event 16 (RTMR1 "
        "EV_EFI_BOOT_SERVICES_APPLICATION 'PciRoot(0)/Pci(3,0)/HD(1)/\\EFI\\BOOT\\BOOTX64.EFI')"
    )
    assert report.lines()[-1] == "RTMR0 (host configuration: TD HOB, ACPI tables, boot variables): " \
        "not pinned by the policy"  # fmt: skip
    assert report.to_dict()["rtmr0_pinned"] is False


def _uki(e: PredictedEvent) -> bool:
    return e.what == "UKI (PE Authenticode)"


def _h(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


CMDLINE_HOST = "console=ttyS0 quiet rdinit=/usr/bin/python3.13 -- /.extra/credentials/x.cred"
LOADER = forge.device_path_load_event("\\EFI\\BOOT\\grubx64.efi")
ROM = forge.device_path_load_event("")


UKI, INNER = "UKI (PE Authenticode)", "kernel from .linux (PE Authenticode)"
LOAD_OPTIONS, SERVED_INITRD = "kernel LoadOptions (cmdline)", "initrd (as systemd-stub serves it)"


def _host_cmdline(recs: list[Rec]) -> list[Rec]:
    # Secure Boot off: systemd-stub takes LoadOptions in place of .cmdline and measures it into
    # PCR 12 (EV_IPL, UTF-16 with its NUL) through the CC protocol too; the kernel then measures the
    # same LoadOptions into PCR 9 in place of the predicted one.
    text = (CMDLINE_HOST + "\0").encode("utf-16-le")
    stub = Rec(3, T.EV_IPL, text)
    kernel = Rec(3, T.EV_EVENT_TAG, forge.tagged(0x8F3B22ED, b"LOADED_IMAGE::LoadOptions"),
                 {forge.SHA384: hashlib.sha384(text).digest()})  # fmt: skip
    out = forge.insert_before(recs, LOAD_OPTIONS, [kernel])
    return forge.insert_before(forge.without(out, LOAD_OPTIONS), INNER, [stub])


def _before(what: str, *new: Rec) -> Callable[[list[Rec]], list[Rec]]:
    return lambda recs: forge.insert_before(recs, what, new)


def _at(index: int, *new: Rec) -> Callable[[list[Rec]], list[Rec]]:
    return lambda recs: [*recs[:index], *new, *recs[index:]]


ADDON = forge.device_path_load_event("\\EFI\\Linux\\uki.efi.extra.d\\x.addon.efi")
CREDENTIALS = b"070701 cpio of /.extra/credentials/x.cred"  # the stub's credentials initrd
PCR11_CMDLINE = "section .cmdline"
# OVMF's UEFI Shell: an application in the firmware volume, which DxeTpm2MeasureBootLib measures.
SHELL = forge.fv_load_event(
    "7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1", "7c04a583-9e3e-4f1c-ad65-e05268d0b4d1"
)
EXPECT_UKI = "expected here: predicted event 1 of 12, PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION UKI"
PATH = "'PciRoot(0)/Pci(3,0)/HD(1)/"

# attack -> (change to the good boot, the exception, the message's exact start)
ATTACKS: dict[str, tuple[Callable[[list[Rec]], list[Rec]], type[VerificationError], str]] = {
    "chain-loader before the UKI": (
        _before(UKI, Rec(2, T.EV_EFI_BOOT_SERVICES_APPLICATION, LOADER)),
        UnexpectedEvent,
        f"event 16: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION {PATH}\\EFI\\BOOT\\grubx64.efi' sha384 "
        f"{_h(LOADER)} is not this image's: {EXPECT_UKI}",
    ),
    "option-ROM driver": (
        _at(12, Rec(2, T.EV_EFI_BOOT_SERVICES_DRIVER, ROM)),
        UnexpectedEvent,
        f"event 13: RTMR1 EV_EFI_BOOT_SERVICES_DRIVER {PATH}' sha384 {_h(ROM)} is not this image's: "
        f"{EXPECT_UKI}",
    ),
    "runtime driver after the UKI": (
        _before(INNER, Rec(2, T.EV_EFI_RUNTIME_SERVICES_DRIVER, ROM)),
        UnexpectedEvent,
        f"event 25: RTMR1 EV_EFI_RUNTIME_SERVICES_DRIVER {PATH}' sha384 {_h(ROM)} is not this image's: "
        "expected here: predicted event 10 of 12, PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION kernel "
        "from .linux (PE Authenticode)",
    ),
    "option-ROM firmware volume": (
        _at(12, Rec(2, T.EV_EFI_PLATFORM_FIRMWARE_BLOB2, bytes(16))),
        UnexpectedEvent,
        f"event 13: RTMR1 EV_EFI_PLATFORM_FIRMWARE_BLOB2 sha384 {_h(bytes(16))} is not this image's: "
        f"{EXPECT_UKI}",
    ),
    "host command line (LoadOptions), with the kernel's matching PCR 9 event": (
        _host_cmdline,
        UnexpectedEvent,
        f"event 25: RTMR2 EV_IPL {CMDLINE_HOST!r} sha384 "
        f"{_h((CMDLINE_HOST + chr(0)).encode('utf-16-le'))} is not this image's: expected here: "
        "predicted event 11 of 12, PCR9/RTMR2 EV_EVENT_TAG kernel LoadOptions (cmdline) sha384 ",
    ),
    "addon (the stub LoadImage()s its PE)": (
        _before(INNER, Rec(2, T.EV_EFI_BOOT_SERVICES_APPLICATION, ADDON)),
        UnexpectedEvent,
        f"event 25: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION {PATH}\\EFI\\Linux\\uki.efi.extra.d\\"
        "x.addon.efi' sha384 ",
    ),
    "credentials initrd (PCR 12)": (
        _before(INNER, Rec(3, T.EV_IPL, CREDENTIALS)),
        UnexpectedEvent,
        f"event 25: RTMR2 EV_IPL {CREDENTIALS.decode()!r} sha384 {_h(CREDENTIALS)} is not this "
        "image's: expected here: predicted event 11 of 12",
    ),
    "sysext initrd (PCR 13)": (
        _before(INNER, Rec(3, T.EV_IPL, b"System extension initrd")),
        UnexpectedEvent,
        "event 25: RTMR2 EV_IPL 'System extension initrd' sha384 ",
    ),
    "the UKI event moved to RTMR2": (
        lambda r: [forge.moved(x, 3) if x.label == UKI else x for x in r],
        UnexpectedEvent,
        f"event 16: RTMR2 EV_EFI_BOOT_SERVICES_APPLICATION {PATH}\\EFI\\BOOT\\BOOTX64.EFI' sha384 "
        f"{{uki}} is not this image's: it is PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION UKI (PE "
        "Authenticode), but in RTMR2, not RTMR1",
    ),
    "a predicted event left out": (
        lambda r: forge.without(r, PCR11_CMDLINE),
        EventsMissing,
        "predicted event 7 of 12, PCR11/RTMR2 EV_IPL section .cmdline sha384 "
        f"{_h(CMDLINE)}, is not in RTMR2: event 22 is predicted event 8, which follows it",
    ),
    "the last predicted event left out": (
        lambda r: forge.without(r, SERVED_INITRD),
        EventsMissing,
        "predicted event 12 of 12, PCR9/RTMR2 EV_EVENT_TAG initrd (as systemd-stub serves it) "
        "sha384 {initrd}, is not in RTMR2: the log ends without it",
    ),
    "the UKI measured twice": (
        lambda r: forge.insert_before(r, INNER, [r[forge.find(r, UKI)]]),
        UnexpectedEvent,
        f"event 25: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION {PATH}\\EFI\\BOOT\\BOOTX64.EFI' sha384 "
        "{uki} is not this image's: it repeats PCR4/RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION UKI (PE "
        "Authenticode) (already seen as event 16)",
    ),
    "an RTMR3 event in the firmware's log": (
        lambda r: [*r, Rec(4, T.EV_IPL, b"late")],
        UnexpectedEvent,
        f"event 30: RTMR3 EV_IPL 'late' sha384 {_h(b'late')} is not this image's: the firmware never "
        "extends RTMR3 (the runtime event log owns it)",
    ),
    "an action string the firmware never logs": (
        _at(13, forge.action("Calling EFI Application from Boot Option (patched)")),
        UnexpectedEvent,
        "event 14: RTMR1 EV_EFI_ACTION 'Calling EFI Application from Boot Option (patched)' sha384 "
        f"{_h(b'Calling EFI Application from Boot Option (patched)')} is not this image's: "
        "EV_EFI_ACTION with this data is not one the firmware logs",
    ),
    "a separator whose digest is not of its data": (
        _at(13, Rec(2, T.EV_SEPARATOR, bytes(4), {forge.SHA384: b"\x01" * 48})),
        UnexpectedEvent,
        f"event 14: RTMR1 EV_SEPARATOR sha384 {'01' * 48} is not this image's: its digest is not the "
        "hash of its own data",
    ),
    "the UEFI Shell from the firmware volume (a host boot option), then the UKI": (
        _before(UKI, forge.action("Returning from EFI Application from Boot Option"),
                forge.action("Calling EFI Application from Boot Option"),
                Rec(2, T.EV_EFI_BOOT_SERVICES_APPLICATION, SHELL)),
        UnexpectedEvent,
        "event 18: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION 'Fv(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/"
        f"FvFile(7c04a583-9e3e-4f1c-ad65-e05268d0b4d1)' sha384 {_h(SHELL)} is not this image's: "
        f"{EXPECT_UKI}",
    ),
    "a firmware debugger (UEFI Debug Mode, PCR 7)": (
        _at(7, Rec(1, T.EV_EFI_ACTION, b"UEFI Debug Mode")),
        UnexpectedEvent,
        f"event 8: RTMR0 EV_EFI_ACTION 'UEFI Debug Mode' sha384 {_h(b'UEFI Debug Mode')} is not this "
        "image's: EV_EFI_ACTION is not a host-config type (see bootevents.ALLOWED)",
    ),
    "code measured into RTMR0": (
        _at(0, Rec(1, T.EV_EFI_BOOT_SERVICES_APPLICATION, LOADER)),
        UnexpectedEvent,
        f"event 1: RTMR0 EV_EFI_BOOT_SERVICES_APPLICATION {PATH}\\EFI\\BOOT\\grubx64.efi' sha384 "
        f"{_h(LOADER)} is not this image's: EV_EFI_BOOT_SERVICES_APPLICATION is not a host-config "
        "type (see bootevents.ALLOWED)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_are_rejected_by_name(image: Prediction, attack: str) -> None:
    change, error, message = ATTACKS[attack]
    expected = image.cc_events()
    recs = change(forge.good_boot(expected))
    with pytest.raises(error) as info:
        run(recs, expected)
    assert info.value.check == "expected-events"
    message = message.replace("{uki}", image.uki_sha384.hex())
    message = message.replace("{initrd}", expected[-1].sha384.hex())
    assert info.value.message.startswith(message), info.value.message


def test_vtpm_path_host_command_line(image: Prediction) -> None:
    # With a vTPM the kernel measures into the TPM only; systemd-stub >= 256 measures into both, so
    # a LoadOptions command line still reaches RTMR2 and is caught there.
    expected = image.cc_events(vtpm=True)
    good = forge.good_boot(expected)
    assert run(good, expected).event_log is not None
    text = (CMDLINE_HOST + "\0").encode("utf-16-le")
    forged = forge.insert_before(good, INNER, [Rec(3, T.EV_IPL, text)])
    with pytest.raises(UnexpectedEvent, match=r"^event 25: RTMR2 EV_IPL 'console=ttyS0 quiet rdinit="):
        run(forged, expected)
    # A vTPM prediction against a log that does have the kernel's PCR 9 events: those are extra.
    with pytest.raises(UnexpectedEvent, match=r"^event 26: RTMR2 EV_EVENT_TAG 0x8f3b22ed "):
        run(forge.good_boot(image.cc_events()), expected)


def test_firmware_must_be_pinned(image: Prediction) -> None:
    expected = image.cc_events()
    good = forge.good_boot(expected)
    unpinned = policy(expected).replace(accepted_mr_td=None)
    with pytest.raises(FirmwareNotPinned) as info:
        run(good, expected, unpinned)
    assert info.value.one_line() == (
        "firmware-pinned: the policy accepts any MRTD, so any firmware could have logged the "
        'predicted events: list the accepted firmware in mr_td (docs/verify.md, "Pinning the '
        'firmware"), or set allow_any_firmware to accept that'
    )
    v = run(good, expected, unpinned.replace(allow_any_firmware=True))
    assert "firmware-pinned" not in v.checks
    assert v.waived[0] == Waiver(
        "firmware-pinned", "not pinned", "any firmware accepted (allow_any_firmware): the boot "
        "events are only as trustworthy as the firmware that logged them"
    )  # fmt: skip
    with pytest.raises(MeasurementMismatch, match=f"^MRTD {'7d' * 48} is not an accepted value$"):
        run(good, expected, policy(expected).replace(accepted_mr_td=frozenset({bytes(48)})))


def test_runtime_log_binding_is_a_check(image: Prediction) -> None:
    expected = image.cc_events()
    good = forge.good_boot(expected)
    events = [
        {"seq": 0, "kind": "separator", "source": "pid1", "key": "", "digest": "sha384:" + "00" * 48}
    ]
    strict = policy(expected).replace(allow_unbound_runtime_log=False)
    # RTMR3 never extended (a kernel without the TSM measurement ABI): unbound, so rejected.
    with pytest.raises(RuntimeLogUnbound) as info:
        run(good, expected, strict, runtime_events=events)
    assert info.value.one_line() == (
        "runtime-log: unbound: RTMR3 was never extended, so the quote does not vouch for the runtime "
        "event log (the guest kernel offers no RTMR3 extension); set allow_unbound_runtime_log to "
        "accept that"
    )
    with pytest.raises(RuntimeLogUnbound, match="no runtime event log was given"):
        run(good, expected, strict)
    v = run(good, expected, runtime_events=events)
    assert "runtime-log" not in v.checks
    assert [(w.check, w.status) for w in v.waived] == [("runtime-log", "unbound")]


def test_exact_set_on_a_tpm_log(image: Prediction) -> None:
    # PCRs instead of MR indexes; PCR 0 is the firmware measuring itself.
    recs = [
        Rec(0, T.EV_S_CRTM_VERSION, b"\0\0"),
        Rec(0, T.EV_EFI_PLATFORM_FIRMWARE_BLOB, bytes(16)),
        *forge.host_config(mr=7)[2:8],
        Rec(4, T.EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
        *[Rec(pcr, T.EV_SEPARATOR, bytes(4)) for pcr in range(8)],
        Rec(5, T.EV_EFI_GPT_EVENT, b"EFI PART"),
        *[forge.predicted_rec(p, cc=False) for p in image.events],
        Rec(5, T.EV_EFI_ACTION, b"Exit Boot Services Invocation"),
    ]
    log = parse_event_log(forge.log_bytes(recs, algs=(forge.SHA256, forge.SHA384)))
    seen = check_boot_events(log, image.events, cc=False)
    assert len(seen.matched) == 12
    assert {g for _, g in seen.allowed} == {Group.FIRMWARE, Group.HOST_CONFIG, Group.BOOT}
    # A PCR 2 driver, and an event in a PCR a boot never extends.
    for bad, message in (
        (Rec(2, T.EV_EFI_BOOT_SERVICES_DRIVER, ROM), "event 18: PCR2 EV_EFI_BOOT_SERVICES_DRIVER "),
        (Rec(16, T.EV_IPL, b"x"), "event 18: PCR16 EV_IPL 'x' sha384 "),
    ):
        both = (forge.SHA256, forge.SHA384)
        forged = parse_event_log(forge.log_bytes([*recs[:17], bad, *recs[17:]], algs=both))
        with pytest.raises(UnexpectedEvent, match="^" + message.replace("(", r"\(")):
            check_boot_events(forged, image.events, cc=False)


def test_allowlist_has_no_code_loading_types() -> None:
    code = {T.EV_EFI_BOOT_SERVICES_APPLICATION, T.EV_EFI_BOOT_SERVICES_DRIVER,
            T.EV_EFI_RUNTIME_SERVICES_DRIVER, T.EV_IPL, T.EV_EVENT_TAG, T.EV_COMPACT_HASH,
            T.EV_NONHOST_CODE, T.EV_EFI_SPDM_FIRMWARE_BLOB}  # fmt: skip
    assert not {a.event_type for a in ALLOWED} & code
    # RTMR2 (the OS loader's register) takes nothing but the predicted events.
    assert not [a for a in ALLOWED if a.group in (Group.OS, Group.RUNTIME, Group.NONE)]
    # Firmware blobs only as firmware (PCR 0) or the variable store in RTMR0, never in RTMR1.
    assert not [a for a in ALLOWED if a.group == Group.BOOT and "BLOB" in a.event_type.name]


def test_hostile_logs_are_rejected_not_raised(image: Prediction) -> None:
    expected = image.cc_events()
    good = forge.good_boot(expected)
    for mr in (0, 5, 0xFFFFFFFE):
        with pytest.raises(EventLogInvalid, match=f"names MR index {mr}; a CC log may only extend"):
            run([*good, Rec(mr, T.EV_IPL, b"x")], expected)
    r0, r1, r2, r3 = forge.rtmrs(good)
    quote = build_quote(CHAIN, mr_td=MRTD, rtmr0=r0, rtmr1=r1, rtmr2=r2, rtmr3=r3)
    with pytest.raises(EventLogInvalid, match=r"^the CC event log is not valid: event log is 3 bytes"):
        verify(quote, None, policy(expected), NOW, trusted_roots=ROOTS, event_log=b"abc")


# Real data: the GCP log is not our image's boot.


def test_gcp_log_fails_with_its_first_intruder(image: Prediction) -> None:
    c = shared_testdata("ccel")
    log = parse_event_log((c / "gcp-cos-113__ccel_data.dat").read_bytes())
    with pytest.raises(UnexpectedEvent) as info:
        check_boot_events(log, image.cc_events(vtpm=True), cc=True)
    assert info.value.message.startswith(
        "event 18: RTMR1 EV_EFI_BOOT_SERVICES_APPLICATION 'PciRoot(0)/Pci(4,0)/Node(3,23)/HD(12)/"
        "\\EFI\\BOOT\\BOOTX64.EFI' sha384 "
    )
    assert "is not this image's: expected here: predicted event 1 of 10, PCR4/RTMR1 " in (
        info.value.message
    )


# The command line.


def _files(tmp_path: Path, image: Prediction, recs: list[Rec], pol: dict[str, object]) -> list[str]:
    r0, r1, r2, r3 = forge.rtmrs(recs)
    (tmp_path / "q.bin").write_bytes(
        build_quote(CHAIN, mr_td=MRTD, rtmr0=r0, rtmr1=r1, rtmr2=r2, rtmr3=r3)
    )
    (tmp_path / "ccel.bin").write_bytes(forge.log_bytes(recs))
    (tmp_path / "root.pem").write_bytes(CHAIN.root_pem)
    (tmp_path / "manifest.json").write_text(json.dumps({"measurements": image.to_json()}))
    (tmp_path / "policy.json").write_text(json.dumps({"require_collateral": False, **pol}))
    return ["verify", str(tmp_path / "q.bin"), "--trust-dev-root", str(tmp_path / "root.pem"),
            "--at", str(NOW), "--event-log", str(tmp_path / "ccel.bin"), "--manifest",
            str(tmp_path / "manifest.json"), "--policy", str(tmp_path / "policy.json")]  # fmt: skip


def test_cli_reports_waived_checks_in_the_check_list(
    image: Prediction, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _files(tmp_path, image, forge.good_boot(image.cc_events()), {
        "allow_any_firmware": True, "allow_unbound_runtime_log": True})  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "event-log, expected-events, firmware-pinned NOT PINNED (waived by policy), runtime-log " \
        "UNBOUND (waived by policy)\n" in out  # fmt: skip
    assert "waived: firmware-pinned: any firmware accepted" in out
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(w["check"], w["status"]) for w in doc["waived"]] == [
        ("firmware-pinned", "not pinned"), ("runtime-log", "unbound")]  # fmt: skip
    assert doc["event_log"]["rtmr0_pinned"] is False
    assert len(doc["event_log"]["allowed"]) == 17
    # Without the waivers: rejected, with the JSON verdict.
    argv = _files(tmp_path, image, forge.good_boot(image.cc_events()), {})
    assert main([*argv, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["check"] == "firmware-pinned"
    assert main([*argv, "--mr-td", MRTD.hex(), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["check"] == "runtime-log"


def test_cli_never_raises_on_hostile_logs_or_manifests(
    image: Prediction, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = forge.good_boot(image.cc_events())
    argv = _files(tmp_path, image, [*good, Rec(0, T.EV_IPL, b"x")], {"allow_unbound_runtime_log": True})
    assert main([*argv, "--mr-td", MRTD.hex(), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith(
        "the CC event log is not valid: event 30 (EV_IPL 'x') names MR index 0"
    )
    bad = image.to_json()
    bad["events"][0]["pcr"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps({"measurements": bad}))
    assert main([*argv, "--mr-td", MRTD.hex()]) == 2
    assert "PCR 99 is not one a boot measures into (0..15)" in capsys.readouterr().err
    for junk in ("[]", '{"measurements": {"events": "x"}}', '{"measurements": {"events": [1]}}'):
        (tmp_path / "manifest.json").write_text(junk)
        assert main([*argv, "--mr-td", MRTD.hex()]) == 2, junk
        capsys.readouterr()


def test_predicted_event_json_round_trip(image: Prediction) -> None:
    e = image.events[0]
    assert PredictedEvent.from_json(e.to_json()) == e
    assert replace(e, pcr=15).mr_index == 3


# Real firmware: the TPM log of a local-dev image (stub 257.13, kernel 6.12.118) booted under
# Debian's OVMF 2022.11 + swtpm with SHA-256 and SHA-384 banks, as tests/test_measured_boot_vm.py
# reads it in the guest, kept with that build's prediction (tests/data/ovmf-swtpm-local-dev.*).

DATA = Path(__file__).parent / "data"


def _real() -> tuple[bytes, Prediction]:
    log = (DATA / "ovmf-swtpm-local-dev.tpmlog").read_bytes()
    return log, Prediction.from_json(
        json.loads((DATA / "ovmf-swtpm-local-dev.prediction.json").read_text())
    )


def test_real_ovmf_log_is_exactly_our_image() -> None:
    data, prediction = _real()
    seen = check_boot_events(parse_event_log(data), prediction.events, cc=False)
    assert [e.number for _, e in seen.matched] == [23, *range(24, 36), 36, 37, 38]
    assert [(e.number, e.type_name, g.value) for e, g in seen.allowed] == [
        (1, "EV_S_CRTM_VERSION", "firmware"),
        (2, "EV_EFI_PLATFORM_FIRMWARE_BLOB", "firmware"),
        (3, "EV_EFI_PLATFORM_FIRMWARE_BLOB", "firmware"),
        *[(n, "EV_EFI_VARIABLE_DRIVER_CONFIG", "host-config") for n in range(4, 9)],
        (9, "EV_SEPARATOR", "host-config"),
        *[(n, "EV_EFI_VARIABLE_BOOT", "host-config") for n in range(10, 14)],
        (14, "EV_EFI_ACTION", "boot"),
        (15, "EV_SEPARATOR", "firmware"),
        (16, "EV_SEPARATOR", "host-config"),
        *[(n, "EV_SEPARATOR", "boot") for n in range(17, 22)],
        (22, "EV_EFI_GPT_EVENT", "boot"),
        (39, "EV_EFI_ACTION", "boot"),
        (40, "EV_EFI_ACTION", "boot"),
    ]
    inner = seen.matched[13][1]
    assert inner.describe().startswith("EV_EFI_BOOT_SERVICES_APPLICATION 'Vendor(")


def _as_tdvf(data: bytes) -> list[Rec]:
    """The same boot as TDVF logs it: PCR 0 goes to MRTD (not logged), the others to their RTMR,
    and only the SHA-384 bank."""
    from eemini.tdx.measure import pcr_to_mr_index

    return [
        Rec(pcr_to_mr_index(e.register), e.event_type, e.data, {forge.SHA384: e.digest(0x000C)})
        for e in parse_event_log(data).measured() if e.register != 0
    ]  # fmt: skip


def test_real_boot_as_tdvf_logs_it_verifies_and_its_forgeries_do_not() -> None:
    data, prediction = _real()
    recs = _as_tdvf(data)
    expected = prediction.cc_events()
    v = run(recs, expected)
    assert v.event_log is not None and v.event_log.boot is not None
    assert len(v.event_log.boot.matched) == 16
    # An option ROM before the boot option, in the real log.
    with pytest.raises(UnexpectedEvent, match=r"^event 13: RTMR1 EV_EFI_BOOT_SERVICES_DRIVER "):
        run([*recs[:12], Rec(2, T.EV_EFI_BOOT_SERVICES_DRIVER, ROM), *recs[12:]], expected)
    # The host's own command line in place of the UKI's: the stub's PCR 12 event, then the kernel's.
    text = "console=ttyS0 quiet ee.dev=1 rdinit=/x\0".encode("utf-16-le")
    at = next(i for i, r in enumerate(recs) if r.event_type == T.EV_EVENT_TAG)
    forged = [*recs[:at], Rec(3, T.EV_IPL, text), *recs[at:]]
    with pytest.raises(UnexpectedEvent, match=r"^event 33: RTMR2 EV_IPL 'console=ttyS0 quiet ee.dev=1 "):
        run(forged, expected)


def test_cli_vtpm_drops_the_kernel_events_from_the_cc_check(
    image: Prediction, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _files(tmp_path, image, forge.good_boot(image.cc_events(vtpm=True)), {
        "mr_td": [MRTD.hex()], "allow_unbound_runtime_log": True})  # fmt: skip
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        "eemini verify: rejected: expected-events: predicted event 11 of 12, PCR9/RTMR2 EV_EVENT_TAG "
        f"kernel LoadOptions (cmdline) sha384 {image.events[-2].sha384.hex()}, is not in RTMR2: the "
        "log ends without it\n"
    )
    assert main([*argv, "--vtpm", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["event_log"]["matched"]) == 10


def test_every_flip_of_a_register_type_or_digest_is_rejected(image: Prediction) -> None:
    # The quote is fixed (its RTMRs are the good log's replay); any single-bit change of what a
    # record says was extended, where, or as what, must be rejected, and only with the verifier's
    # own errors. (Event data of configuration events is informational: the digest is what counts.)
    from eemini.tdx.evidence import check_event_log

    expected = image.cc_events()
    recs = forge.good_boot(expected)
    good = forge.log_bytes(recs, pad=0)
    regs = forge.rtmrs(recs)
    log = parse_event_log(good)
    fields = []
    for e in log.events:
        fields += [(e.offset, 4), (e.offset + 4, 4), (e.offset + 14, 48)]  # MR index, type, digest
    host_types = {a.event_type for a in ALLOWED if a.group == Group.HOST_CONFIG}
    flips = relabels = 0
    for start, size in fields:
        for bit in range(0, size * 8, 3):
            bad = bytearray(good)
            bad[start + bit // 8] ^= 1 << (bit % 8)
            flips += 1
            try:
                check_event_log(regs, bytes(bad), expected)
            except VerificationError:
                continue
            # What may pass: one RTMR0 configuration type relabelled as another (the type is not
            # measured, and RTMR0 is host input either way); never code, never another register.
            e = parse_event_log(bytes(bad)).events[[f[0] for f in fields].index(start) // 3]
            assert start == e.offset + 4 and e.register == 1, (e.number, e.type_name)
            assert e.event_type in host_types and log.events[e.number - 1].event_type in host_types
            relabels += 1
    assert (flips, relabels) == (29 * (11 + 11 + 128), 12)
