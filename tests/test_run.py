"""`eemini run` without booting an image: config disks, command lines, outcomes, the KVM probe."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from eemini import run as launcher
from eemini.cli import main
from eemini.log import UserError


def test_forward_parse() -> None:
    assert launcher.Forward.parse("18080:8080") == launcher.Forward(18080, 8080)
    for bad in ("8080", "0:80", "80:70000", "a:b", "1:2:3"):
        with pytest.raises(UserError, match=rf"--forward '{bad}' is not HOSTPORT:GUESTPORT"):
            launcher.Forward.parse(bad)


@pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar (libarchive-tools) not installed")
def test_iso9660_read_by_libarchive(tmp_path: Path) -> None:
    iso = tmp_path / "c.iso"
    launcher.make_iso9660(iso, {"agent.env": b"A=1\nB=2\n", "empty": b"", "big.bin": b"x" * 5000})
    listing = subprocess.run(
        ["bsdtar", "-tf", os.fspath(iso)], capture_output=True, text=True, check=True
    )
    assert sorted(listing.stdout.split()) == [".", "AGENT.ENV", "BIG.BIN", "EMPTY"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["bsdtar", "-xf", os.fspath(iso), "-C", os.fspath(out)], check=True)
    assert (out / "AGENT.ENV").read_bytes() == b"A=1\nB=2\n"
    assert (out / "BIG.BIN").read_bytes() == b"x" * 5000
    assert (out / "EMPTY").read_bytes() == b""
    # Deterministic: the same files give the same bytes.
    again = tmp_path / "d.iso"
    launcher.make_iso9660(again, {"big.bin": b"x" * 5000, "empty": b"", "agent.env": b"A=1\nB=2\n"})
    assert again.read_bytes() == iso.read_bytes()


def test_iso9660_refuses_long_names(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"config disk file name 'agent-config.env' does not fit ISO 9660 level 1"
    ):
        launcher.make_iso9660(tmp_path / "c.iso", {"agent-config.env": b""})


def test_vfat_config_disk_read_by_mtools(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    launcher.make_vfat(img, {"agent.env": b"A=1\n"})
    got = subprocess.run(["mtype", "-i", os.fspath(img), "::agent.env"], capture_output=True, check=True)
    assert got.stdout == b"A=1\n"
    from eemini.guest.configdisk import detect_label

    assert detect_label(os.fspath(img)) == ("vfat", "EECONFIG")


def test_read_config_file_checks_like_the_guest(tmp_path: Path) -> None:
    bad = tmp_path / "agent.env"
    bad.write_text("NOT A PAIR\n")
    with pytest.raises(
        UserError, match=rf"--config {bad}: agent.env from config-disk line 1 is not KEY=VALUE"
    ):
        launcher.read_config_file(bad)


def test_find_disk(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist"):
        launcher.find_disk(tmp_path / "nope")
    with pytest.raises(UserError, match="no disk image"):
        launcher.find_disk(tmp_path)
    (tmp_path / "a.raw").write_bytes(b"")
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb")
    assert launcher.find_disk(tmp_path) == tmp_path / "a.raw"
    (tmp_path / "manifest.json").write_text(json.dumps({"outputs": {"qcow2": {"file": "disk.qcow2"}}}))
    assert launcher.find_disk(tmp_path) == tmp_path / "disk.qcow2"
    assert launcher.disk_format(tmp_path / "disk.qcow2") == "qcow2"
    assert launcher.disk_format(tmp_path / "a.raw") == "raw"


def test_image_attestation_from_the_manifest_beside_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    assert launcher.image_attestation(disk) is None  # no manifest
    (tmp_path / "manifest.json").write_text("{")
    assert launcher.image_attestation(disk) is None  # not JSON
    (tmp_path / "manifest.json").write_text(json.dumps({"image": ["configfs-tsm"]}))
    assert launcher.image_attestation(disk) is None  # not the layout of a manifest
    (tmp_path / "manifest.json").write_text(json.dumps({"image": {"attestation": "configfs-tsm"}}))
    assert launcher.image_attestation(disk) == "configfs-tsm"


def _cfg(tmp_path: Path, **kw: object) -> launcher.VmConfig:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb")
    return launcher.VmConfig(disk=disk, forwards=(launcher.Forward(18080, 8080),), **kw)  # type: ignore[arg-type]


def test_qemu_command(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, guestfwd=("tcp:169.254.169.254:80-tcp:127.0.0.1:9999",), net="169.254.169.0/24")
    argv = launcher.qemu_command(cfg, "tcg", tmp_path / "VARS.fd", tmp_path / "cfg.img")
    line = shlex.join(argv)
    assert argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg,smm=off"
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'VARS.fd'}" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={launcher.OVMF_CODE}" in argv
    assert (
        "user,id=net0,net=169.254.169.0/24,hostfwd=tcp:127.0.0.1:18080-:8080,"
        "guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:9999"
    ) in argv
    assert f"if=none,id=cfg0,format=raw,readonly=on,file={tmp_path / 'cfg.img'}" in argv
    assert "snapshot=on" in line and "format=qcow2" in line


def test_tdx_command_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, memory="2048")
    argv = launcher.tdx_command(cfg)
    assert argv[argv.index("-object") + 1] == (
        '{"qom-type":"tdx-guest","id":"tdx0","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'
    )
    assert (
        "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0,hpet=off" in argv
    )
    assert "memory-backend-ram,id=ram0,size=2048M" in argv
    assert argv[argv.index("-bios") + 1] == "/usr/share/ovmf/OVMF.inteltdx.fd"
    assert "pflash" not in " ".join(argv)
    code = main(
        [
            "run",
            os.fspath(cfg.disk),
            "--memory",
            "2048",
            "--forward",
            "18080:8080",
            "--print-tdx-command",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert shlex.split(printed) == argv


def test_libvirt_xml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    assert main(["run", os.fspath(cfg.disk), "--libvirt-xml", os.fspath(tmp_path / "vm.qcow2")]) == 0
    root = ET.fromstring(capsys.readouterr().out)
    assert root.get("type") == "kvm"
    assert root.findtext("name") == "disk"
    assert root.find("launchSecurity").get("type") == "tdx"  # type: ignore[union-attr]
    disk = root.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == os.fspath(tmp_path / "vm.qcow2")  # type: ignore[union-attr]
    assert disk.find("backingStore/source").get("file") == os.fspath(cfg.disk.resolve())  # type: ignore[union-attr]
    assert root.find("memoryBacking/access").get("mode") == "private"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "console", "code", "summary"),
    [
        (
            0,
            "x\neemini: powering off (workload finished)\n",
            0,
            "the guest powered off cleanly (workload finished)",
        ),
        (
            0,
            "eemini: boot failed: boot config key 'X' from config-disk is not allowed\n"
            "eemini: powering off (boot failed)",
            1,
            "the guest stopped: boot config key 'X' from config-disk is not allowed",
        ),
        (
            0,
            "eemini: refusing to start the workload: TDX attestation is unavailable: no provider\n"
            "eemini: powering off (boot failed)",
            1,
            "the guest stopped: refusing to start the workload: TDX attestation is unavailable: "
            "no provider",
        ),
        (
            0,
            "[ 1.0] Kernel panic - not syncing: Attempted to kill init!",
            1,
            "the guest kernel panicked: Attempted to kill init!",
        ),
        (1, "", 1, "QEMU failed with exit status 1"),
        (0, "booting", 1, "QEMU exited but the guest never said it was powering off"),
    ],
)
def test_judge(status: int, console: str, code: int, summary: str) -> None:
    outcome = launcher.judge(status, console, 1.0)
    assert (outcome.exit_code, outcome.summary) == (code, summary)


def test_cli_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    assert main(["run", os.fspath(cfg.disk), "--memory", "lots"]) == 1
    assert "--memory 'lots' must be a number of MiB, at least 128" in capsys.readouterr().err
    assert main(["run", os.fspath(cfg.disk), "--forward", "1:2", "--forward", "1:3"]) == 1
    assert "--forward uses the same host port twice" in capsys.readouterr().err
    assert main(["run", os.fspath(cfg.disk), "--config", os.fspath(tmp_path / "none.env")]) == 1
    assert f"--config {tmp_path / 'none.env'} is not a file" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_probe_runs_guest_code_under_tcg() -> None:
    assert launcher.probe_accel("tcg") == (True, "ok")


def test_probe_stops_at_a_kvm_internal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where KVM can only emulate real mode, QEMU reports the failure and pauses the guest instead of
    # exiting: the probe must say so at once, not wait out its timeout (and the guest is killed).
    fake = tmp_path / "qemu-system-x86_64"
    pidfile = tmp_path / "pid"
    fake.write_text(
        f"#!/bin/sh\necho $$ > {pidfile}\n"
        "echo 'KVM internal error. Suberror: 1' >&2\necho 'emulation failure' >&2\nexec sleep 60\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(launcher, "find_tool", lambda *a: str(fake))
    started = time.monotonic()
    assert launcher.probe_accel("kvm", timeout=30.0) == (
        False, "KVM cannot run the guest (KVM internal error: emulation failure)"
    )  # fmt: skip
    assert time.monotonic() - started < 5
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_wait_for_fails_fast_on_a_panic(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
    vm = launcher.Vm(_cfg(tmp_path), proc, tmp_path / "work", 0.0)
    vm.lines = [
        "booting",
        "[    3.7] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
    ]
    try:
        with pytest.raises(launcher.GuestFailed, match="the guest failed before 'never' appeared"):
            vm.wait_for("never", timeout=30)
        for line in ("eemini: boot failed: nope", "eemini: refusing to start the workload: nope"):
            vm.lines = [line]
            with pytest.raises(launcher.GuestFailed):
                vm.wait_for("never", timeout=30)
        vm.lines = ["ready"]
        with pytest.raises(TimeoutError, match=r"'never' did not appear within 0\.2 s"):
            vm.wait_for("never", timeout=0.2)
        assert vm.wait_for("rea(dy)", timeout=1).group(1) == "dy"
    finally:
        proc.kill()
        proc.wait()


# --- stop signals: a real `eemini run` process with a fake QEMU on PATH ---

FAKE_QEMU = """#!PYTHON
# Prints its pid; with -qmp serves QMP (unless FAKE_QEMU=no-qmp) and, unless FAKE_QEMU=deaf, powers
# off on system_powerdown the way the guest would say it; else sleeps until it is stopped.
import json, os, socket, sys, time
qmp = next((a[5:].split(",")[0] for a in sys.argv if a.startswith("unix:")), None)
if qmp is None or os.environ.get("FAKE_QEMU") == "no-qmp":
    print("fake qemu", os.getpid(), flush=True)
    time.sleep(300)
    sys.exit(0)
server = socket.socket(socket.AF_UNIX)
server.bind(qmp)
server.listen()
print("fake qemu", os.getpid(), flush=True)
while True:
    conn, _ = server.accept()
    f = conn.makefile("rwb")
    f.write(b'{"QMP": {}}\\n')
    f.flush()
    for line in f:
        f.write(b'{"return": {}}\\n')
        f.flush()
        if json.loads(line)["execute"] == "system_powerdown" and os.environ.get("FAKE_QEMU") != "deaf":
            print("eemini: powering off (ACPI power button)", flush=True)
            sys.exit(0)
"""


class Launcher:
    """`eemini run --accel tcg DISK` with a fake qemu-system-x86_64 first on PATH and its own
    TMPDIR (so a work directory left behind shows)."""

    def __init__(self, tmp: Path, *extra: str, fake: str = "") -> None:
        import sys

        if not (launcher.OVMF_CODE.exists() and launcher.OVMF_VARS.exists()):
            pytest.skip("OVMF is not installed")
        bin_dir, self.tmpdir = tmp / "bin", tmp / "tmp"
        bin_dir.mkdir()
        self.tmpdir.mkdir()
        qemu = bin_dir / "qemu-system-x86_64"
        qemu.write_text(FAKE_QEMU.replace("PYTHON", sys.executable))
        qemu.chmod(0o755)
        self.disk = tmp / "disk.raw"
        self.disk.write_bytes(bytes(4096))
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "TMPDIR": os.fspath(self.tmpdir),
            "FAKE_QEMU": fake,
        }
        argv = [sys.executable, "-m", "eemini", "run", "--accel", "tcg", os.fspath(self.disk), *extra]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode()
        assert first.startswith("fake qemu "), first + self.proc.stderr.read().decode()  # type: ignore[union-attr]
        self.qemu_pid = int(first.split()[2])
        self.outlived = False

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode()

    def stop(self, signum: int) -> tuple[int, str]:
        """Send `eemini run` a stop signal; its exit status and stderr."""
        self.proc.send_signal(signum)
        return self.finish()

    def qemu_alive(self) -> bool:
        try:
            os.kill(self.qemu_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever the test found, no fake QEMU outlives the block (assert_all_gone says whether
        one had to be killed here)."""
        self.outlived = self.qemu_alive()
        if self.outlived:
            os.kill(self.qemu_pid, 9)

    def assert_all_gone(self) -> None:
        """QEMU had exited by itself and its work directory was removed."""
        assert not self.outlived
        assert not self.qemu_alive()
        assert os.listdir(self.tmpdir) == []


ASKED_TO_POWER_OFF = (
    "warning: interrupted by SIGINT: asking the guest to power off (ACPI power button); interrupt "
    "again to stop QEMU at once\n"
)


def _summary(prefix: str, err: str) -> str:
    """The last line without its elapsed time ("... after 1.2 s")."""
    import re

    m = re.fullmatch(rf"{re.escape(prefix)}(?P<summary>.*) after \d+\.\d s\n", err, re.S)
    assert m, err
    return m.group("summary")


@pytest.mark.parametrize(
    ("signum", "code"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)], ids=str
)
def test_stop_signal_stops_qemu_and_removes_its_files(tmp_path: Path, signum: str, code: int) -> None:
    import signal

    with Launcher(tmp_path) as run:
        status, err = run.stop(getattr(signal, signum))
    assert status == code, err
    assert _summary(f"booting {run.disk}\n", err) == f"interrupted by {signum}; QEMU was stopped"
    run.assert_all_gone()


def test_interrupted_guest_is_asked_to_power_off_through_qmp(tmp_path: Path) -> None:
    import signal

    with Launcher(tmp_path, "--qmp", os.fspath(tmp_path / "qmp.sock")) as run:
        status, err = run.stop(signal.SIGINT)
    assert status == 130, err
    assert _summary(f"booting {run.disk}\n{ASKED_TO_POWER_OFF}", err) == (
        "interrupted by SIGINT; the guest powered off cleanly (ACPI power button)"
    )
    run.assert_all_gone()


def test_second_stop_signal_stops_qemu_at_once(tmp_path: Path) -> None:
    import signal
    import time

    with Launcher(tmp_path, "--qmp", os.fspath(tmp_path / "qmp.sock"), fake="deaf") as run:
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.stderr is not None
        warning = run.proc.stderr.readline().decode()  # "booting ..."
        warning = run.proc.stderr.readline().decode()
        assert warning == ASKED_TO_POWER_OFF
        start = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        status, err = run.finish()
        assert time.monotonic() - start < 10  # not the 30 s power-off wait
    assert status == 130, err
    assert _summary("", err) == "interrupted by SIGINT; QEMU was stopped"
    run.assert_all_gone()


def test_interrupt_when_qmp_does_not_answer_stops_qemu_at_once(tmp_path: Path) -> None:
    import signal

    qmp = tmp_path / "qmp.sock"
    with Launcher(tmp_path, "--qmp", os.fspath(qmp), fake="no-qmp") as run:
        status, err = run.stop(signal.SIGINT)
    assert status == 130, err
    assert _summary(f"booting {run.disk}\n{ASKED_TO_POWER_OFF}", err) == (
        "interrupted by SIGINT; the power button could not be pressed (QMP: [Errno 2] No such file "
        "or directory); QEMU was stopped"
    )
    run.assert_all_gone()


def test_timeout_still_says_timeout(tmp_path: Path) -> None:
    run = Launcher(tmp_path, "--timeout", "1")
    status, err = run.finish()
    assert status == 124, err
    assert _summary(f"booting {run.disk}\n", err) == (
        "the guest did not power off within 1 s; QEMU was stopped"
    )
    run.assert_all_gone()
