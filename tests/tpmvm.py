"""Boot a disk under QEMU (TCG) + Debian's OVMF + swtpm with SHA-256 and SHA-384 PCR banks, and read
the firmware's TPM event log that the guest prints (tests/vm/tpmlog_dump.c) on the serial console.

The same edk2 measurement code (DxeTpm2MeasureBootLib, Authenticode, systemd-stub's and the Linux
stub's events) feeds the TPM here and the RTMRs under TDVF, so event digests carry over.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from swtpm import need, provision_state, start_for_qemu

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Secure Boot off
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
DUMP_SOURCE = Path(__file__).parent / "vm" / "tpmlog_dump.c"


@dataclass(frozen=True)
class TpmBoot:
    console: str
    tpm_log: bytes
    cmdline: bytes


def build_dump_workload(out: Path) -> Path:
    """The guest-side reader, a static ELF (the image builder takes static workloads only)."""
    need("gcc", "gcc")
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(out), str(DUMP_SOURCE)], check=True)
    return out


def _hex_block(console: str, tag: str) -> bytes:
    if f"{tag}-ERROR" in console:
        line = next(ln for ln in console.splitlines() if f"{tag}-ERROR" in ln)
        raise AssertionError(f"the guest could not read it: {line.strip()}")
    if f"{tag}-END" not in console:
        raise AssertionError(f"no complete {tag} block on the console")
    return bytes.fromhex("".join(re.findall(rf"{tag} ([0-9a-f]+)", console)))


def boot_with_swtpm(disk: Path, disk_format: str, work: Path, timeout: float = 420) -> TpmBoot:
    qemu = need("qemu-system-x86_64", "qemu-system-x86")
    need("swtpm", "swtpm")
    need("swtpm_setup", "swtpm-tools")
    if not OVMF_CODE.is_file():
        pytest.skip(f"{OVMF_CODE} is missing (Debian package ovmf)")
    state = work / "tpm"
    state.mkdir()
    provision_state(state, banks="sha256,sha384")
    sock = state / "sock"
    tpm = start_for_qemu(state, sock)
    try:
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        console = work / "console.log"
        # TCG only (the brief: /dev/kvm exists here but does not work); -cpu max for RDRAND.
        argv = [
            qemu, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-drive", f"if=none,id=disk0,format={disk_format},file={disk},snapshot=on",
            "-device", "virtio-blk-pci,drive=disk0",
            "-chardev", f"socket,id=chrtpm,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
        ]  # fmt: skip
        try:
            subprocess.run(argv, check=True, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise AssertionError(
                f"the VM did not power off within {timeout} s; console tail:\n{tail}"
            ) from None
        text = console.read_text(errors="replace")
    finally:
        tpm.kill()
        tpm.wait()
    return TpmBoot(
        console=text, tpm_log=_hex_block(text, "EE-TPMLOG"), cmdline=_hex_block(text, "EE-CMDLINE")
    )
