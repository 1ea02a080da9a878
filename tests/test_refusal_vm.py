"""A production image (local-tdx-qcow2, configfs-tsm) booted without TDX: one boot under TCG.

Here the built-in TDX guest driver's init fails (no TDX), configfs-tsm still makes
/sys/kernel/config/tsm/report, and the trial quote finds no provider. PID 1 must say so in one
console line, never start the workload and power the VM off by itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from eemini import run as launcher
from eemini.build import image, lock, profile, spec

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 420.0
CANARY = "canary: the workload started"
WORKLOAD = f'#include <stdio.h>\nint main(void) {{ puts("{CANARY}"); return 0; }}\n'
SPEC = """\
[workload]
path = "canary"
args = []
env = {}
restart = "never"
on_exit = "poweroff"
inherit_token = false
allow_env = []
"""
REFUSAL = (
    "eemini: refusing to start the workload: TDX attestation is unavailable: configfs-tsm has no "
    "provider (creating a report entry in /sys/kernel/config/tsm/report failed with ENXIO): "
    "no TDX guest driver is registered, so this is not a TDX guest or its driver failed to start"
)


def test_production_image_without_tdx_refuses_and_powers_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("qemu-system-x86_64") is None or not launcher.OVMF_CODE.exists():
        pytest.skip("QEMU and OVMF are needed for VM tests")
    (tmp_path / "canary.c").write_text(WORKLOAD)
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-o",
            os.fspath(tmp_path / "canary"),
            os.fspath(tmp_path / "canary.c"),
        ],
        check=True,
    )
    (tmp_path / "enclave.toml").write_text(SPEC)
    out = tmp_path / "out"
    image.build(
        profile.load("local-tdx-qcow2"), lock.load(), spec.resolve(tmp_path / "enclave.toml"), out
    )
    disk = launcher.find_disk(out)
    capsys.readouterr()

    cfg = launcher.VmConfig(disk=disk, accel=launcher.Accel.TCG, echo=False, restrict=True)
    with launcher.running(cfg) as vm:
        outcome = vm.wait(BOOT_TIMEOUT)

    assert capsys.readouterr().err.splitlines() == [
        f"warning: {disk} is a production image (configfs-tsm attestation): booted without TDX, its "
        "PID 1 refuses to start the workload and powers off; use a local-dev image here"
    ]
    lines = [line.strip() for line in outcome.console.splitlines()]
    # QEMU exited by itself (a timeout would be 124) after PID 1's refusal and power-off.
    assert (outcome.exit_code, outcome.summary) == (1, "the guest stopped: " + REFUSAL[8:]), (
        outcome.console
    )
    pid1 = [line for line in lines if line.startswith("eemini: ")]
    assert pid1[-2:] == [REFUSAL, "eemini: powering off (boot failed)"], outcome.console
    # Our kernel, and nothing to load: no module lines before the refusal.
    assert pid1[0].startswith("eemini: PID 1 starting (kernel 7.3.4-eemini, uptime ")
    assert not [line for line in pid1 if "finit_module" in line or "kernel modules" in line]
    assert not any(CANARY in line for line in lines)
