"""PID 1's refusals: a production image takes one trial quote (here through the fake configfs-tsm
of fake_tsm.py) and runs only under the UKI's own command line. Each refusal is checked as the
exact console line PID 1 prints before it powers off (`main()` prints `error.line()`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from eemini.guest import attest, pid1
from eemini.guest.dev.simulated import make_quote
from eemini.guest.image import ImageFacts
from fake_tsm import FakeTsm, sgx_quote

pytestmark = pytest.mark.timeout(60)

REFUSED = "eemini: refusing to start the workload: "
UNAVAILABLE = REFUSED + "TDX attestation is unavailable: "


def console_line(capfd: pytest.CaptureFixture[str], error: pid1.BootFailure) -> str:
    """What PID 1's console shows for `error`."""
    capfd.readouterr()
    pid1.console(error.line())
    out = capfd.readouterr()
    assert out.out == ""
    return out.err


def test_paths_point_at_the_kernel_report_directory() -> None:
    assert pid1.Paths().tsm_report == attest.TSM_REPORT_ROOT


def test_trial_quote_goes_through_the_whole_path(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path / "report", make_quote)
    backend = fake.backend()
    size = pid1.trial_quote(backend)
    assert size == len(make_quote(bytes(64)))
    pid1.trial_quote(backend)
    # Fresh random report data each time, written whole; the entries are gone again.
    assert [len(d) for d in fake.inblobs] == [64, 64]
    assert fake.inblobs[0] != fake.inblobs[1]
    assert len(fake.created) == 2 and fake.removed == fake.created and fake.live_entries() == []


# (FakeTsm keyword arguments, the expected console line given the fake after the attempt)
TRIAL_REFUSALS: dict[str, tuple[dict[str, object], Callable[[FakeTsm], str]]] = {
    "no provider registered": (
        {"provider": None},
        lambda f: (
            UNAVAILABLE + f"configfs-tsm has no provider (creating a report entry in {f.root} "
            "failed with ENXIO): no TDX guest driver is registered, so this is not a TDX guest or "
            "its driver failed to start\n"
        ),
    ),
    "empty provider": (
        {"provider": ""},
        lambda f: (
            UNAVAILABLE + "configfs-tsm provider is '', expected 'tdx_guest' (this is not a "
            "TDX guest, or another TSM driver is loaded)\n"
        ),
    ),
    "other provider": (
        {"provider": "sev_guest"},
        lambda f: (
            UNAVAILABLE + "configfs-tsm provider is 'sev_guest', expected 'tdx_guest' (this is "
            "not a TDX guest, or another TSM driver is loaded)\n"
        ),
    ),
    "provider gone": (
        {"withdrawn": True},
        lambda f: (
            UNAVAILABLE + f"configfs-tsm: cannot read {f.created[0]}/outblob: the TSM provider "
            "is gone (ENXIO)\n"
        ),
    ),
    "empty outblob": (
        {"empty": True},
        lambda f: (
            UNAVAILABLE + "configfs-tsm returned an empty quote (outblob is empty): the host's "
            "quote generation service may be unreachable\n"
        ),
    ),
    "wrong report data": (
        {"quote": lambda data: make_quote(b"\x55" * 64)},
        lambda f: (
            UNAVAILABLE + f"the report data inside the quote ({'55' * 64}) differs from the "
            f"request ({f.inblobs[0].hex()})\n"
        ),
    ),
    "not a TDX quote": (
        {"quote": sgx_quote},
        lambda f: UNAVAILABLE + "quote TEE type is 0x0, expected 0x81 (TDX)\n",
    ),
    "concurrent writer": (
        {"interloper": True},
        lambda f: (
            UNAVAILABLE + "configfs-tsm report entry was written concurrently (generation 0 -> "
            "2, expected 1); the quote was discarded\n"
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(TRIAL_REFUSALS))
def test_trial_quote_refusals(tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str) -> None:
    kwargs, expected = TRIAL_REFUSALS[case]
    options = dict(kwargs)
    quote = options.pop("quote", make_quote)
    fake = FakeTsm(tmp_path / "report", quote, **options)  # type: ignore[arg-type]
    with pytest.raises(pid1.Refusal) as e:
        pid1.trial_quote(fake.backend())
    assert console_line(capfd, e.value) == expected(fake)
    assert fake.removed == fake.created and fake.live_entries() == []


def test_no_report_directory(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(pid1.Refusal) as e:
        pid1.trial_quote(attest.ConfigfsTsmBackend(os.fspath(tmp_path / "report")))
    assert console_line(capfd, e.value) == (
        UNAVAILABLE + f"configfs-tsm is not available: {tmp_path}/report does not exist (needs a TDX "
        "guest whose kernel has the TDX guest driver, and configfs mounted)\n"
    )


IMAGE = ImageFacts.from_dict({"attestation": "configfs-tsm", "cmdline": "console=ttyS0 quiet"})


@pytest.mark.parametrize(
    "proc",
    [
        "console=ttyS0 quiet\n",
        "console=ttyS0 quiet",
        "console=ttyS0 quiet \n",
        "console=ttyS0 quiet\t\v\f\r \n",
        "console=ttyS0 quiet\udca0\n",  # a lone 0xA0 byte (read with surrogateescape): a kernel space
    ],
)
def test_the_images_own_cmdline_passes(proc: str) -> None:
    pid1.check_cmdline(IMAGE, proc)


@pytest.mark.parametrize(
    ("proc", "got"),
    [
        # The host's boot entry replaced .cmdline (Secure Boot off: systemd-stub takes LoadOptions).
        ("console=ttyS0 quiet ee.GREETING=hi\n", "console=ttyS0 quiet ee.GREETING=hi"),
        ("console=ttyS0\n", "console=ttyS0"),
        ("quiet console=ttyS0\n", "quiet console=ttyS0"),
        (" console=ttyS0 quiet\n", " console=ttyS0 quiet"),
        ("", ""),
        # Not spaces to the kernel: they are part of the last argument, so not the image's cmdline.
        ("console=ttyS0 quiet\x1c\n", "console=ttyS0 quiet\x1c"),
        ("console=ttyS0 quiet\u2028\n", "console=ttyS0 quiet\u2028"),
        # U+00A0 is C2 A0: the kernel takes A0 for a space and keeps C2 on "quiet".
        ("console=ttyS0 quiet\u00a0\n", "console=ttyS0 quiet\udcc2"),
    ],
)
def test_any_other_cmdline_is_refused(proc: str, got: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(pid1.Refusal) as e:
        pid1.check_cmdline(IMAGE, proc)
    assert console_line(capfd, e.value) == (
        REFUSED + f"the kernel command line is not the image's own: got {got!r}, the image was "
        "built with 'console=ttyS0 quiet'\n"
    )


def test_image_facts_without_the_cmdline_stop_the_boot(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    facts = tmp_path / "image.json"
    facts.write_text('{"attestation": "configfs-tsm"}')
    with pytest.raises(pid1.BootFailure) as e:
        pid1.Boot(pid1.Paths(image_json=os.fspath(facts))).image_facts()
    assert type(e.value) is pid1.BootFailure
    assert console_line(capfd, e.value) == (
        "eemini: boot failed: image.json: cmdline (the UKI's built-in command line) must be a string\n"
    )
    facts.write_text("[1, 2")
    with pytest.raises(pid1.BootFailure, match=f"^the image facts {facts} are not valid JSON: "):
        pid1.Boot(pid1.Paths(image_json=os.fspath(facts))).image_facts()
