"""A built local-dev disk boots under QEMU + OVMF to the guest runtime's first console line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from images import REPO, image

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT = 180.0
ANSI = re.compile(rb"\x1b\[[0-9;=?]*[A-Za-z]")


def plain(console: bytes) -> bytes:
    """The console text without colour escapes and carriage returns."""
    return ANSI.sub(b"", console).replace(b"\r", b"")


def first_guest_line() -> re.Pattern[bytes]:
    if (REPO / "src/eemini/guest/pid1.py").exists():
        return re.compile(rb"^eemini: .*$", re.M)  # PID 1's console prefix
    # Before the guest runtime exists, /init still shows that Python started it.
    return re.compile(rb"^ModuleNotFoundError: .*No module named 'eemini\.guest'.*$", re.M)


@pytest.mark.vm
def test_local_dev_disk_boots_to_the_guest_runtime(tmp_path: Path) -> None:
    if not OVMF_CODE.exists() or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86 and ovmf")
    vars_copy = tmp_path / "OVMF_VARS.fd"
    shutil.copy(OVMF_VARS, vars_copy)  # the firmware writes boot entries: one copy per boot
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"if=virtio,format=qcow2,file={image('local-dev') / 'disk.qcow2'},snapshot=on",
    ]  # fmt: skip
    pattern = first_guest_line()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    console = b""
    deadline = time.monotonic() + BOOT_TIMEOUT
    try:
        while time.monotonic() < deadline and not pattern.search(plain(console)):
            if b"end Kernel panic" in console:
                break
            chunk = proc.stdout.read()
            if chunk:
                console += chunk
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    text = plain(console)
    tail = text[-3000:].decode(errors="replace")
    assert pattern.search(text), f"no guest runtime line on the console; last output:\n{tail}"
    assert b"Could not find platform" not in text, tail
