"""PID 1 as the init of a fresh PID + mount namespace: the closest thing to a VM without one.

reboot(2) with POWER_OFF inside a non-initial PID namespace ends that namespace, and its init is
reported as killed by SIGINT (pid_namespaces(7)): that is our "clean power-off" signal here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")


def test_early_pid1_announces_and_powers_off() -> None:
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "-p",
            "-f",
            sys.executable,
            "-c",
            "from eemini.guest import pid1; pid1.main()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGINT, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"eemini: PID 1 starting (kernel {os.uname().release}, uptime ")
    assert lines[-1].startswith("eemini: powering off (")
