"""Check the measurement prediction against real firmware, here, without TDX.

Build the `local-dev` image with a workload that prints the firmware's TPM event log (tests/vm/
tpmlog_dump.c), boot its disk under QEMU + Debian's OVMF + swtpm with a SHA-384 PCR bank, and
assert that the events we predict from the UKI's bytes are in the log, with exactly our digests:
the PCR 4 event for the UKI (Authenticode SHA-384 and SHA-256), the inner kernel's PCR 4 event, the
stub's PCR 11 section events, and the kernel's PCR 9 events. The same edk2 code measures into RTMRs
under TDVF (docs/measurements.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.cli import main
from eemini.tdx.bootevents import check_boot_events
from eemini.tdx.eventlog import EventType, HashAlg, parse_event_log
from eemini.tdx.measure import Prediction, predict
from tpmvm import TpmBoot, boot_with_swtpm, build_dump_workload

pytestmark = pytest.mark.vm


@pytest.fixture(scope="session")
def measured_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("measured-image")
    build_dump_workload(work / "tpmlog-dump")
    (work / "enclave.toml").write_text(
        '[workload]\npath = "tpmlog-dump"\nrestart = "never"\non_exit = "poweroff"\n'
    )
    out = work / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "eemini", "build", "-f", str(work / "enclave.toml"),
         "--profile", "local-dev", "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def booted(measured_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Prediction, TpmBoot]:
    manifest = json.loads((measured_image / "manifest.json").read_text())
    disk = measured_image / manifest["outputs"]["qcow2"]["file"]
    prediction = predict((measured_image / manifest["outputs"]["uki"]["file"]).read_bytes())
    boot = boot_with_swtpm(disk, "qcow2", tmp_path_factory.mktemp("swtpm-boot"))
    return prediction, boot


def test_manifest_carries_the_prediction(measured_image: Path) -> None:
    manifest = json.loads((measured_image / "manifest.json").read_text())
    uki = (measured_image / manifest["outputs"]["uki"]["file"]).read_bytes()
    assert Prediction.from_json(manifest["measurements"]) == predict(uki)


def test_firmware_measured_what_we_predicted(booted: tuple[Prediction, TpmBoot]) -> None:
    prediction, boot = booted
    log = parse_event_log(boot.tpm_log)
    assert dict(log.spec_id.algorithms) == {HashAlg.SHA256: 32, HashAlg.SHA384: 48}

    # The firmware's PCR 4 application events: the UKI first, carrying exactly our Authenticode.
    apps = [
        e for e in log.measured()
        if e.register == 4 and e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION
    ]  # fmt: skip
    assert apps, "no EV_EFI_BOOT_SERVICES_APPLICATION event in PCR 4"
    assert apps[0].digest(HashAlg.SHA384) == prediction.uki_sha384
    assert apps[0].digest(HashAlg.SHA256) == prediction.uki_sha256

    # Exactly the predicted events, in order, in their PCRs, with both banks' digests, and nothing
    # else but allowlisted firmware events that load no code.
    seen = check_boot_events(log, prediction.events, cc=False)
    matches = seen.matched
    assert len(matches) == len(prediction.events)
    for p, e in matches:
        assert e.digest(HashAlg.SHA256) == p.sha256, p.label()
    kinds = [(p.pcr, p.what) for p, _ in matches]
    assert kinds[0] == (4, "UKI (PE Authenticode)")
    assert (4, "kernel from .linux (PE Authenticode)") in kinds
    assert [w for pcr, w in kinds if pcr == 11][:2] == ["section name .linux", "section .linux"]
    assert [w for pcr, w in kinds if pcr == 9] == [
        "kernel LoadOptions (cmdline)",
        "initrd (as systemd-stub serves it)",
    ]
    # The kernel got the command line we predicted the stub would pass.
    assert boot.cmdline.decode().strip() == prediction.cmdline


def test_measure_command_checks_the_tpm_log(
    measured_image: Path,
    booted: tuple[Prediction, TpmBoot],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(booted[1].tpm_log)
    assert main(["measure", str(measured_image), "--check-log", str(log), "--tpm"]) == 0
    err = capsys.readouterr().err
    seen = check_boot_events(parse_event_log(booted[1].tpm_log), booted[0].events, cc=False)
    assert err.endswith(
        f"{log}: exactly the {len(booted[0].events)} predicted events, in order, and "
        f"{len(seen.allowed)} allowlisted firmware events that load no code\n"
    )
