"""One boot of the `azure` profile under QEMU (TCG) + OVMF + swtpm, with fakes of Azure's services
behind QEMU's user network, and the evidence it gives verified end to end by `eemini verify --azure`.

- The image: the `azure` profile with virtio_net added (QEMU's NIC; Azure's is Hyper-V's) and a
  qcow2 output; its workload is the demo's attest-echo. Its PID 1 is the production one: trial
  attestation through /dev/tpmrm0, the kernel command line check, the ready report.
- The vTPM: swtpm, provisioned by tpm2-tools like Azure's (tests/swtpm.py), behind the fake
  paravisor (tests/fake_paravisor.py), which regenerates the HCL report when the guest writes user
  data. The firmware's TPM event log is real (OVMF measuring our UKI).
- IMDS (169.254.169.254: userData, acc/tdquote) and the wire server (168.63.129.16) are the fakes of
  tests/fake_metadata.py, reached only through guestfwd on an isolated (restrict=on) user network
  whose range holds both addresses; nothing leaves the machine. The TD quote comes from the tests'
  quote builder (dev chain, fake paravisor MRTD).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

import azure_builder
from conftest import REPO
from eemini.cli import main
from fake_metadata import Behaviour, Server
from fake_paravisor import Paravisor
from swtpm import hcl_report, need, running_swtpm, start_for_qemu
from tdx_builder import NOW, make_chain, make_collateral
from tpmvm import OVMF_CODE, OVMF_VARS

pytestmark = pytest.mark.vm

CHAIN = make_chain(intermediate=True)
RELAY = REPO / "tests" / "vm" / "relay.py"
ATTEST_ECHO = REPO / "examples" / "attest-echo" / "attest-echo.c"
BOOT_TIMEOUT = 600.0
READY = "attest-echo: listening on port 8080"
SPEC = """\
[workload]
path = "attest-echo"
args = ["8080"]
env = {}
restart = "on-failure"
on_exit = "poweroff"
inherit_token = true
allow_env = []
"""


@dataclass
class Booted:
    out: Path
    console: str
    answer: dict[str, Any]
    nonce: bytes
    paravisor: Paravisor
    wireserver: Behaviour
    imds: Behaviour
    returncode: int


@pytest.fixture(scope="module")
def azure_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eemini.build import image, lock, profile, spec

    need("gcc", "gcc")
    work = tmp_path_factory.mktemp("azure-image")
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(work / "attest-echo"), str(ATTEST_ECHO)], check=True
    )
    (work / "enclave.toml").write_text(SPEC)
    prof = profile.load("azure")
    # QEMU boots qcow2 (the kernel has virtio's and Hyper-V's drivers alike): the only difference.
    prof = replace(prof, outputs=(profile.Output.QCOW2,))
    image.build(prof, lock.load(), spec.resolve(work / "enclave.toml"), work / "out")
    return work / "out"


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited ({proc.returncode}); console tail:\n{text[-4000:]}")
        time.sleep(1.0)
    tail = path.read_text(errors="replace")[-4000:] if path.exists() else ""
    raise AssertionError(f"no {pattern!r} on the console within {timeout:.0f} s; tail:\n{tail}")


def _ask(port: int, nonce: bytes) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                s.sendall(nonce.hex().encode() + b"\n")
                line = s.makefile("rb").readline()
            if line:
                answer: dict[str, Any] = json.loads(line)
                return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no answer from attest-echo through the forwarded port")
        time.sleep(0.5)


def _qmp_powerdown(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.fspath(path))
        f = s.makefile("rwb")
        f.readline()
        for cmd in ("qmp_capabilities", "system_powerdown"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            f.readline()


@pytest.fixture(scope="module")
def booted(azure_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    qemu = need("qemu-system-x86_64", "qemu-system-x86")
    need("swtpm", "swtpm")
    if not OVMF_CODE.is_file():
        pytest.skip(f"{OVMF_CODE} is missing (Debian package ovmf)")
    work = tmp_path_factory.mktemp("azure-boot")
    # The vTPM as Azure provisions it: the AK, and the HCL report as it is at boot (user-data 0).
    with running_swtpm(work) as tpm:
        tpm.provision_report(bytes(64))
        ak = tpm.ak_public
    state = work / "tpm"

    def regenerate(user_data: bytes) -> bytes:
        return hcl_report(ak, user_data)

    imds = Behaviour("azure", td_quote=lambda r: azure_builder.quote_for_report(CHAIN, r))
    wire = Behaviour("wireserver")
    imds_server, wire_server = Server(imds).start(), Server(wire).start()
    ctrl = work / "swtpm-ctrl.sock"
    swtpm = start_for_qemu(state, ctrl)
    paravisor = Paravisor(work / "paravisor.sock", ctrl, regenerate).start()
    vars_copy = work / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    console, qmp = work / "console.log", work / "qmp.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    relay = f"cmd:{sys.executable} {RELAY}"
    net = ",".join([
        "user,id=net0,net=168.0.0.0/7,restrict=on",  # holds both 168.63.129.16 and 169.254.169.254
        f"hostfwd=tcp:127.0.0.1:{port}-:8080",
        f"guestfwd=tcp:169.254.169.254:80-{relay} {imds_server.port}",
        f"guestfwd=tcp:168.63.129.16:80-{relay} {wire_server.port}",
    ])  # fmt: skip
    disk = azure_image / "disk.qcow2"
    argv = [
        qemu, "-machine", "q35,smm=off", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"if=none,id=disk0,format=qcow2,snapshot=on,file={disk}",
        "-device", "virtio-blk-pci,drive=disk0",
        "-netdev", net, "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-chardev", f"socket,id=chrtpm,path={work / 'paravisor.sock'}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(console, re.escape(READY), proc, BOOT_TIMEOUT)
        nonce = secrets.token_bytes(32)
        answer = _ask(port, nonce)
        _qmp_powerdown(qmp)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        yield Booted(
            out=azure_image, console=console.read_text(errors="replace"), answer=answer,
            nonce=nonce, paravisor=paravisor, wireserver=wire, imds=imds, returncode=proc.returncode,
        )  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        paravisor.close()
        swtpm.terminate()
        swtpm.wait()
        imds_server.shutdown()
        wire_server.shutdown()


def test_pid1_attested_through_the_vtpm_and_reported_ready(booted: Booted) -> None:
    c = booted.console
    assert re.search(
        r"eemini: attestation: Azure TDX through the vTPM and the HCL report \(trial: \d+-byte TD "
        r"quote, vTPM quote over PCRs 0-23\); RTMR3 not extended \(the TD is Azure's paravisor: the "
        r"guest has no RTMR3 of its own\)",
        c,
    ), c[-3000:]
    instance = booted.wireserver.instance_id
    assert f"eemini: azure: reported ready to the wire server (role instance {instance})" in c
    assert len(booted.wireserver.ready_reports) == 1
    # The trial's random user data, then the workload's: SHA-512 of its nonce.
    assert len(booted.paravisor.user_data) == 2 and booted.paravisor.errors == []
    assert booted.paravisor.user_data[1] == hashlib.sha512(booted.nonce).digest()
    assert booted.paravisor.user_data[0] != booted.paravisor.user_data[1]
    # Two TD quotes asked of IMDS, exactly as Azure wants the request.
    posts = [(p, h) for p, h in booted.imds.requests if p == "/acc/tdquote"]
    assert len(posts) == 2
    assert all((h["content-type"], h["metadata"]) == ("application/json", "true") for _, h in posts)
    assert "eemini: powering off" in c and booted.returncode == 0


def test_the_attest_answer_verifies_end_to_end(
    booted: Booted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    attest = booted.answer["attest"]
    assert attest["ok"] is True and attest["attestation_type"] == "azure-tdx-vtpm"
    assert attest["tpm_eventlog_b64"]  # the firmware's TPM log, from securityfs
    report_data = hashlib.sha512(booted.nonce).hexdigest()
    assert booted.answer["report_data"] == report_data
    (tmp_path / "attest.json").write_text(json.dumps(attest))
    (tmp_path / "collateral.json").write_text(make_collateral(CHAIN))
    (tmp_path / "root.pem").write_bytes(CHAIN.root_pem)
    # The boot config reaches no register on Azure: the runtime log is unbound, said so.
    (tmp_path / "policy.json").write_text('{"allow_unbound_runtime_log": true}')
    argv = [
        "verify", "--azure", str(tmp_path / "attest.json"),
        "--collateral", str(tmp_path / "collateral.json"), "--at", str(NOW),
        "--trust-dev-root", str(tmp_path / "root.pem"),
        "--mr-td", azure_builder.FAKE_PARAVISOR_MRTD.hex(), "--report-data", report_data,
        "--manifest", str(booted.out / "manifest.json"), "--policy", str(tmp_path / "policy.json"),
        "--json",
    ]  # fmt: skip
    rc = main(argv)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["checks"][-9:] == [
        "hcl-td-report", "runtime-data", "user-data", "vtpm-quote-signature", "vtpm-quote",
        "vtpm-nonce", "vtpm-pcrs", "tpm-event-log", "expected-events",
    ]  # fmt: skip
    assert [w["check"] for w in out["waived"]] == ["runtime-log"]
    manifest = json.loads((booted.out / "manifest.json").read_text())
    matched = out["tpm_event_log"]["matched"]
    assert len(matched) == len(manifest["measurements"]["events"])
    assert matched[0]["predicted"]["what"] == "UKI (PE Authenticode)"
    # Our kernel has no IMA (Debian's extends PCR 10 with its boot_aggregate, outside the
    # firmware's log, which the verifier reports rather than judges): every PCR replays.
    assert list(out["tpm_event_log"]["pcrs_after_boot"]) == []
    # Another caller's report data is not this evidence's.
    argv[argv.index("--report-data") + 1] = "00" * 64
    assert main(argv) == 1
    assert json.loads(capsys.readouterr().out)["check"] == "user-data"


def test_the_hcl_index_is_what_the_guest_read(booted: Booted) -> None:
    import base64

    hcl = base64.b64decode(booted.answer["attest"]["hcl_report_b64"])
    assert hcl[:4] == b"HCLA"
    runtime = hcl[1236:]
    assert json.loads(runtime)["user-data"] == hashlib.sha512(booted.nonce).hexdigest().upper()
