"""A real TPM for tests: swtpm (Debian's swtpm, swtpm-tools) on loopback TCP, provisioned like
Azure's vTPM with tpm2-tools (Debian's tpm2-tools), an implementation independent of ours:

- the attestation key at persistent handle 0x81000003: RSA-2048, restricted, signing with
  RSASSA-SHA256, no authorization value (Azure's AK);
- NV index 0x01400001 holding an HCL report (owner read/write), as the paravisor provides it;
- NV index 0x01400002 (64 bytes, owner read/write) left undefined unless asked for: the guest
  defines it when absent.

What this fake cannot do that Azure's paravisor does: regenerate the HCL report when the guest
writes new user data to 0x01400002. The harness writes a report for the report data a test will
ask for (`provision_report`); any other request finds a stale report (which is how the guest's
bounded stale-report error is tested). The VM test puts tests/fake_paravisor.py between QEMU and
swtpm, which does regenerate it. swtpm's NV indexes are at
most 2048 bytes (TPM_PT_NV_INDEX_MAX), less than Azure's 2600-byte report, so the fake's report
is cut to its real size and its runtime data carries HCLAkPub only (no HCLEkPub).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

import azure_builder
from eemini.guest.tpm import Tpm

AK_HANDLE = 0x81000003
HCL_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(
            f"{tool} is not installed (Debian package {package}; tools/bootstrap.sh installs it)"
        )
    return path


def _free_port_pair() -> int:
    """A port p with p and p+1 free on loopback (swtpm's data and control ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports on loopback")


@dataclass
class Swtpm:
    state: Path
    port: int
    process: subprocess.Popen[bytes]
    ak_public: rsa.RSAPublicKey

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tool(self, *argv: str, input: bytes | None = None) -> bytes:
        """Run a tpm2-tools command against this TPM; raise with its stderr on failure."""
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        for attempt in range(20):
            proc = subprocess.run(
                argv, env=env, input=input, capture_output=True, check=False, timeout=60
            )
            if proc.returncode == 0:
                return proc.stdout
            # swtpm serves one connection at a time: a client that just closed may still hold it.
            if b"Connection refused" not in proc.stderr and b"ECONNREFUSED" not in proc.stderr:
                break
            time.sleep(0.05 * (attempt + 1))
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")

    @contextlib.contextmanager
    def client(self) -> Iterator[Tpm]:
        """Our client on its own connection, closed on leaving: swtpm serves one connection at a
        time, so tpm2-tools waits until it is closed."""
        sock = self.connect()
        try:
            yield Tpm(sock.fileno())
        finally:
            sock.close()

    def connect(self) -> socket.socket:
        """A data connection for our own client (swtpm takes one client at a time)."""
        for attempt in range(40):
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except OSError:
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError(f"cannot connect to swtpm on port {self.port}")

    def define_user_data_index(self) -> None:
        self.tool(
            "tpm2_nvdefine", hex(USER_DATA_INDEX), "-C", "o", "-s", "64", "-a", "ownerread|ownerwrite"
        )

    def provision_report(self, report_data: bytes) -> bytes:
        """(Re)write NV 0x01400001 with an HCL report whose user-data is `report_data`, as the
        paravisor would after the guest wrote it; returns the report."""
        report = hcl_report(self.ak_public, report_data)
        with contextlib.suppress(AssertionError):
            self.tool("tpm2_nvundefine", hex(HCL_INDEX), "-C", "o")
        self.tool(
            "tpm2_nvdefine",
            hex(HCL_INDEX),
            "-C",
            "o",
            "-s",
            str(len(report)),
            "-a",
            "ownerread|ownerwrite",
        )
        self.tool("tpm2_nvwrite", hex(HCL_INDEX), "-C", "o", "-i", "-", input=report)
        return report

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def hcl_report(ak_public: rsa.RSAPublicKey, user_data: bytes) -> bytes:
    """An HCL report whose runtime data holds the AK and `user_data`, cut to its real size (swtpm's
    NV indexes hold less than Azure's 2600 bytes)."""
    runtime = azure_builder.runtime_data(ak_public, user_data)
    td = azure_builder.td_report(hashlib.sha256(runtime).digest() + bytes(32))
    return azure_builder.hcl_report(td, runtime, size=1236 + len(runtime))


def provision_state(state: Path, banks: str = "sha256") -> None:
    """Manufacture a TPM 2.0 state with these PCR banks (by default SHA-256: Azure's vTPM offers
    SHA-1 and SHA-256)."""
    swtpm_setup = need("swtpm_setup", "swtpm-tools")
    subprocess.run(
        [swtpm_setup, "--tpm2", "--tpmstate", str(state), "--pcr-banks", banks, "--overwrite"],
        check=True, capture_output=True,
    )  # fmt: skip


def start_for_qemu(state: Path, ctrl: Path) -> subprocess.Popen[bytes]:
    """swtpm on `state` behind the control socket `ctrl` (QEMU's tpm emulator chardev, directly or
    through the fake paravisor), ending when its client leaves; returns once the socket is there."""
    swtpm = need("swtpm", "swtpm")
    proc = subprocess.Popen(
        [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={ctrl}",
         "--terminate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        if ctrl.exists():
            break
        time.sleep(0.05)
    return proc


@contextlib.contextmanager
def running_swtpm(work: Path) -> Iterator[Swtpm]:
    """swtpm with a fresh state and the AK provisioned at 0x81000003."""
    swtpm = need("swtpm", "swtpm")
    need("tpm2_createprimary", "tpm2-tools")
    state = work / "tpm"
    state.mkdir()
    provision_state(state)
    port = _free_port_pair()
    proc = subprocess.Popen(
        [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        tpm = Swtpm(state, port, proc, rsa.generate_private_key(65537, 2048).public_key())
        ak_ctx = work / "ak.ctx"
        tpm.tool(
            "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "rsa2048:rsassa-sha256:null",
            "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda",
            "-c", str(ak_ctx),
        )  # fmt: skip
        tpm.tool("tpm2_evictcontrol", "-C", "o", "-c", str(ak_ctx), hex(AK_HANDLE))
        tpm.tool("tpm2_readpublic", "-c", hex(AK_HANDLE), "-f", "pem", "-o", str(work / "ak.pem"))
        key = load_pem_public_key((work / "ak.pem").read_bytes())
        assert isinstance(key, rsa.RSAPublicKey)
        tpm.ak_public = key
        yield tpm
    finally:
        # SIGTERM: swtpm saves its state, which a later swtpm (a VM's) may start from.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
