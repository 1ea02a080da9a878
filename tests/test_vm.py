"""Real boots of one test image in QEMU (TCG): PID 1 end to end.

One image (profile tests/vm/vmtest.toml: local-dev with every boot-config source) and one
workload (tests/vm/probe.c, whose behaviour the boot config picks) cover the whole list in
three boots:

1. config disk (ISO 9660) with allowed keys; the workload crashes twice (restarts), then
   reaches a host port through the user network (the DHCP lease is in use), sends garbage to the
   control socket and still gets `health`, leaves an orphan (reaped: no zombies) and exits 0:
   on_exit = poweroff powers the VM off cleanly.
2. config disk (vfat) with a key outside allow_env: the boot stops, naming key and source.
3. GCE and Azure metadata from a fake endpoint reached through QEMU's guestfwd (slow answers),
   then the ACPI power button (QMP system_powerdown): the workload gets SIGTERM, clean power-off.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eemini import run as launcher
from eemini.build import image, lock, profile, spec
from fake_metadata import Behaviour, Server

pytestmark = pytest.mark.vm

VM_DIR = Path(__file__).resolve().parent / "vm"
SPEC = """\
[workload]
path = "probe"
args = []
env = {}
restart = "on-failure"
on_exit = "poweroff"
inherit_token = true
allow_env = ["PROBE_MODE", "PROBE_HOST", "PROBE_PORT", "GREETING"]
"""
BOOT_TIMEOUT = 420.0


@pytest.fixture(scope="session")
def vm_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-system-x86_64") is None or not launcher.OVMF_CODE.exists():
        pytest.skip("QEMU and OVMF are needed for VM tests")
    work = tmp_path_factory.mktemp("vm-image")
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
            os.fspath(work / "probe"),
            os.fspath(VM_DIR / "probe.c"),
        ],
        check=True,
    )
    (work / "enclave.toml").write_text(SPEC)
    prof = profile.load("vmtest", directory=VM_DIR)
    image.build(prof, lock.load(), spec.resolve(work / "enclave.toml"), work / "out")
    return launcher.find_disk(work / "out")


METADATA = "169.254.169.254"
HOST_ALIAS = "169.254.169.100"  # a guestfwd address standing for the host's test listener


def _vm(
    disk: Path, tmp: Path, metadata_port: int, *, listener: int | None = None, **kw: object
) -> launcher.VmConfig:
    """The guest is isolated (restrict=on): it reaches only the fake metadata endpoint and the
    test listener, both through guestfwd, so no traffic leaves the machine."""
    # cmd: runs the relay once per guest connection (a chardev target would be one stream for all).
    relay = f"cmd:{sys.executable} {VM_DIR / 'relay.py'}"
    fwd = [f"tcp:{METADATA}:80-{relay} {metadata_port}"]
    if listener is not None:
        fwd.append(f"tcp:{HOST_ALIAS}:{listener}-{relay} {listener}")
    return launcher.VmConfig(
        disk=disk,
        accel=launcher.Accel.TCG,
        qmp=tmp / "qmp.sock",
        echo=False,
        net="169.254.169.0/24",
        guestfwd=tuple(fwd),
        restrict=True,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def metadata() -> Iterator[tuple[Server, Behaviour]]:
    behaviour = Behaviour("both")
    server = Server(behaviour).start()
    yield server, behaviour
    server.shutdown()


@pytest.fixture
def host_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on the host's loopback, reached from the guest through a guestfwd."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                got.append(conn.recv(1024))

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], got
    srv.close()


def _console_lines(outcome: launcher.Outcome) -> list[str]:
    return [line.strip() for line in outcome.console.splitlines()]


def test_boot_dhcp_config_disk_restarts_orphans_garbage_poweroff(
    vm_disk: Path,
    tmp_path: Path,
    host_listener: tuple[int, list[bytes]],
    metadata: tuple[Server, Behaviour],
) -> None:
    port, got = host_listener
    config = tmp_path / "agent.env"
    config.write_text(
        f"PROBE_MODE=checks\nPROBE_HOST={HOST_ALIAS}\nPROBE_PORT={port}\nGREETING='hello disk'\n"
    )
    cfg = _vm(
        vm_disk,
        tmp_path,
        metadata[0].port,
        listener=port,
        config=config,
        config_format=launcher.ConfigFormat.ISO9660,
    )
    with launcher.running(cfg) as vm:
        outcome = vm.wait(BOOT_TIMEOUT)
    lines = _console_lines(outcome)
    console = outcome.console
    assert outcome.exit_code == 0, console
    assert outcome.summary.startswith(
        "the guest powered off cleanly (workload done for good (exited with status 0)"
    )
    assert any(
        line.startswith(
            # restrict=on: slirp offers neither router nor DNS
            "eemini: network: eth0 169.254.169.15/24 (no router) dns none (DHCP from 169.254.169.2"
        )
        for line in lines
    ), console
    accepted = [line.split(" accepted")[0] for line in lines if " accepted (" in line]
    assert accepted == [
        "eemini: boot config: PROBE_MODE from config-disk",
        "eemini: boot config: PROBE_HOST from config-disk",
        "eemini: boot config: PROBE_PORT from config-disk",
        "eemini: boot config: GREETING from config-disk",
    ]
    probe = [line.removeprefix("[probe] ") for line in lines if line.startswith("[probe] ")]
    assert probe[:7] == [
        "probe: mode checks",
        "probe: greeting hello disk",
        "probe: run 0",
        "probe: crashing on purpose (run 0)",
        "probe: mode checks",
        "probe: greeting hello disk",
        "probe: run 1",
    ]
    assert probe[-6:] == [
        "probe: run 2",
        f"probe: host reached at {HOST_ALIAS}",
        'probe: garbage refused "code":"bad_request"}',
        "probe: health ok after garbage",
        "probe: zombies 0",
        "probe: done",
    ]
    assert (
        sum("exited with status 3" in line for line in lines if line.startswith("eemini: probe: run"))
        == 2
    )
    assert got == [b"hello from the guest\n"]


def test_forbidden_key_on_config_disk_refuses_the_boot(vm_disk: Path, tmp_path: Path) -> None:
    """Through the `eemini run` command line: vfat config disk, isolated network, exit status 1."""
    config = tmp_path / "agent.env"
    config.write_text("GREETING=hi\nLD_PRELOAD=/tmp/evil.so\n")
    log = tmp_path / "console.log"
    proc = subprocess.run(
        [
            sys.executable, "-m", "eemini", "run", os.fspath(vm_disk), "--accel", "tcg", "--restrict",
            "--config", os.fspath(config), "--config-format", "vfat", "--log", os.fspath(log),
            "--timeout", str(BOOT_TIMEOUT),
        ],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    refusal = (
        "boot config key 'LD_PRELOAD' from config-disk is not allowed "
        "(allowed: EE_DNS, EE_GATEWAY, EE_IP, GREETING, PROBE_HOST, PROBE_MODE, PROBE_PORT)"
    )
    assert f"the guest stopped: {refusal} after " in proc.stderr
    console = [line.strip() for line in proc.stdout.splitlines()]
    assert f"eemini: boot failed: {refusal}" in console
    assert "eemini: powering off (boot failed)" in console
    assert not any(line.startswith("[probe]") for line in console)
    assert log.read_text().splitlines() == proc.stdout.splitlines()


def test_cloud_metadata_then_power_button(vm_disk: Path, tmp_path: Path) -> None:
    behaviour = Behaviour(
        "both", gce_config=b"GREETING=from-gce\n", azure_userdata=b"PROBE_MODE=wait\n", delay=0.3
    )
    server = Server(behaviour).start()
    try:
        cfg = _vm(vm_disk, tmp_path, server.port)
        with launcher.running(cfg) as vm:
            vm.wait_for(r"\[probe\] probe: waiting for SIGTERM", BOOT_TIMEOUT)
            vm.qmp("system_powerdown")
            outcome = vm.wait(120)
    finally:
        server.shutdown()
    lines = _console_lines(outcome)
    assert outcome.exit_code == 0, outcome.console
    assert outcome.summary == "the guest powered off cleanly (ACPI power button pressed)"
    accepted = [line.split(" accepted")[0] for line in lines if " accepted (" in line]
    assert accepted[-2:] == [
        "eemini: boot config: GREETING from gce-metadata",
        "eemini: boot config: PROBE_MODE from azure-userdata",
    ]
    assert "eemini: boot config: no config disk" in lines
    assert "[probe] probe: greeting from-gce" in lines
    assert "[probe] probe: got SIGTERM" in lines
    assert "eemini: shutting down: ACPI power button pressed" in lines
    paths = [(p, h.get("metadata-flavor"), h.get("metadata")) for p, h in behaviour.requests]
    assert paths == [
        ("/computeMetadata/v1/instance/attributes/ee-config", "Google", None),
        ("/metadata/instance/compute/userData?api-version=2021-01-01&format=text", None, "true"),
    ]
