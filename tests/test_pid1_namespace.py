"""PID 1 as the init of fresh PID + mount + network namespaces: the whole boot sequence (minus
the kernel's devices) without a VM, in a second or two.

reboot(2) with POWER_OFF inside a non-initial PID namespace ends that namespace, and its init is
reported as killed by SIGINT (pid_namespaces(7)): that is our "clean power-off" signal here.
The harness bind-mounts a test directory on /mnt inside the private mount namespace and points
PID 1's `Paths` there (the image's /etc/eemini is not touched); production images get the fake
configfs-tsm of fake_tsm.py on /mnt/tsm/report when a test asks for one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eemini.guest.dev.simulated import make_quote
from netns import namespaces, start_dhcp_server, veth

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")

HARNESS = r"""
import os, sys
import eemini
from eemini.guest import linux as k, pid1
k.mount("none", "/", None, 16384 | 1 << 18)  # MS_REC | MS_PRIVATE
k.mount(sys.argv[1], "/mnt", None, 4096)  # MS_BIND
# PID 1 mounts empty tmpfs on /run and /tmp: not over the code under test (a checkout or venv
# in /tmp), which it still imports lazily and runs as the workload's interpreter.
code = [os.path.dirname(eemini.__file__), sys.prefix, os.path.dirname(os.__file__)]
pid1.EARLY_MOUNTS = tuple(
    m for m in pid1.EARLY_MOUNTS if not any(c == m[1] or c.startswith(m[1] + "/") for c in code)
)
if "FAKE_TSM" in os.environ:  # a fake configfs-tsm on /mnt/tsm/report with this provider ("" none)
    from pathlib import Path
    sys.path.insert(0, TESTS)
    from fake_tsm import FakeTsm
    from eemini.guest import attest
    from eemini.guest.dev.simulated import make_quote
    fake = FakeTsm(Path("/mnt/tsm/report"), make_quote, provider=os.environ["FAKE_TSM"] or None)

    class FakeBackend(attest.ConfigfsTsmBackend):
        def __init__(self, root):
            super().__init__(root, mkdir=fake.mkdir, rmdir=fake.rmdir)

    attest.ConfigfsTsmBackend = FakeBackend
pid1.main(started=1.5, paths=pid1.Paths(
    image_json="/mnt/image.json", spec_json="/mnt/spec.json", cmdline="/mnt/cmdline",
    tsm_report="/mnt/tsm/report",
    socket=sys.argv[2] if len(sys.argv) > 2 else "/mnt/run/agent.sock", resolv_conf="/mnt/resolv.conf",
    sys_input="/mnt/no-input", dev_input="/mnt/no-input",
))
""".replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))

# The workload: stdlib Python run by the host interpreter, talking raw JSON to the socket.
WORKLOAD = r"""#!PYTHON
import json, os, signal, socket, sys, time

def call(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ.get("EE_SOCKET_PATH", "/mnt/run/agent.sock"))
    s.sendall(json.dumps(req).encode() + b"\n")
    f = s.makefile("rb")
    line = f.readline()
    s.close()
    return json.loads(line)

mode = sys.argv[1]
print("greeting", os.environ.get("GREETING"), flush=True)
if mode == "checks":
    g = socket.socket(socket.AF_UNIX)
    g.connect("/mnt/run/agent.sock")
    g.sendall(b"\xff\xfe garbage {{{\n")
    print("garbage answer", json.loads(g.makefile("rb").readline())["code"], flush=True)
    g.close()
    token = os.environ["EE_TOKEN"]
    print("token length", len(token), flush=True)
    print("health", call({"method": "health", "token": token})["ok"], flush=True)
    a = call({"method": "attest", "token": token, "report_data_b64": "AAEC"})
    print("attest", a["ok"], a["attestation_type"], [e["kind"] for e in a["events"]], flush=True)
    config = [(e["source"], e["key"]) for e in a["events"] if e["kind"] == "config"]
    print("config events", config, flush=True)
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(0)
        os._exit(0)
    os.wait()
    time.sleep(0.6)
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    zombies = [p for p in pids if open(f"/proc/{p}/stat").read().split(") ")[1][0] == "Z"]
    print("zombies", zombies, flush=True)
elif mode == "net":
    routes = open("/proc/net/route").read().splitlines()[1:]
    print("routes", sorted((r.split()[0], r.split()[1], r.split()[2]) for r in routes), flush=True)
    resolv = open("/mnt/resolv.conf").read().split("\n") if os.path.exists("/mnt/resolv.conf") else None
    print("resolv", resolv, flush=True)
    time.sleep(float(os.environ.get("GREETING") or 0))
elif mode == "wait":
    signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b"got SIGTERM\n"), os._exit(0)))
    print("waiting", flush=True)
    while True:
        time.sleep(1)
"""


def _prepare(tmp: Path, proc_cmdline: str, mode: str, **image: object) -> Path:
    work = tmp / "work.py"
    work.write_text(
        WORKLOAD.replace("PYTHON", sys.executable.replace(".venv/bin/python", ".venv/bin/python"))
    )
    work.chmod(0o755)
    spec = {
        "version": 1,
        "workload": {
            "path": "/mnt/work.py",
            "args": [mode],
            "env": {},
            "restart": "never",
            "on_exit": "poweroff",
            "inherit_token": True,
            "allow_env": ["GREETING"],
        },
    }
    (tmp / "spec.json").write_text(json.dumps(spec, sort_keys=True, separators=(",", ":")))
    facts: dict[str, object] = {
        "attestation": "simulated",
        "network": "none",
        "config_sources": ["cmdline"],
    }
    facts.update(image)
    (tmp / "image.json").write_text(json.dumps(facts))
    (tmp / "cmdline").write_text(proc_cmdline + "\n")
    return tmp


def _boot(
    tmp: Path, netns: str | None = None, socket: str | None = None, fake_tsm: str | None = None
) -> subprocess.Popen[str]:
    """PID 1 in new PID and mount namespaces, and a new (empty) network namespace unless the
    test gives one (with a NIC in it); `fake_tsm`: the provider of a fake configfs-tsm ("" for
    none registered)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.Popen(
        [
            *prefix,
            "unshare",
            "-m",
            "-p",
            "-f",
            *([] if netns else ["-n"]),
            "--mount-proc",
            sys.executable,
            "-c",
            HARNESS,
            os.fspath(tmp),
            *([socket] if socket else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FAKE_TSM": fake_tsm} if fake_tsm is not None else None,
    )


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_boot_serve_workload_and_power_off(tmp_path: Path) -> None:
    _prepare(tmp_path, "console=ttyS0 quiet ee.dev=1 ee.GREETING=hi", "checks")
    proc = _boot(tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    assert lines[0].startswith(f"eemini: PID 1 starting (kernel {os.uname().release}, uptime ")
    [timeline] = [line for line in lines if line.startswith("eemini: boot timeline")]
    steps = re.findall(r"(?:: |, )([a-z ]+) (\d+\.\d\d)", timeline)
    assert [step for step, _ in steps] == [
        "python",
        "imports",
        "local config",
        "network",
        "remote config",
        "attestation",
        "workload",
    ]
    times = [float(t) for _, t in steps]
    assert times[0] == 1.5
    assert times[1:] == sorted(times[1:])
    assert "eemini: network: none (this image has no network)" in lines
    assert any(
        line.startswith("eemini: boot config: GREETING from cmdline accepted (sha384:") for line in lines
    )
    assert (
        "eemini: attestation: simulated (local-dev image; quotes are signed by a development key)"
        in lines
    )
    assert "[work.py] greeting hi" in lines
    assert "[work.py] garbage answer bad_request" in lines
    assert "[work.py] token length 64" in lines
    assert "[work.py] health True" in lines
    assert "[work.py] attest True simulated ['spec', 'workload', 'config', 'separator']" in lines
    assert "[work.py] config events [('cmdline', 'GREETING')]" in lines
    assert "[work.py] zombies []" in lines
    assert lines[-1].startswith("eemini: powering off (workload done for good (exited with status 0")


def test_forbidden_key_stops_the_boot(tmp_path: Path) -> None:
    _prepare(tmp_path, "console=ttyS0 ee.dev=1 ee.PATH=/evil", "checks")
    proc = _boot(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    assert _lines(err)[-2:] == [
        "eemini: boot failed: boot config key 'PATH' from cmdline is not allowed "
        "(allowed: EE_DNS, EE_GATEWAY, EE_IP, GREETING)",
        "eemini: powering off (boot failed)",
    ]
    assert "[work.py]" not in err


def test_simulated_backend_needs_the_cmdline_marker(tmp_path: Path) -> None:
    _prepare(tmp_path, "console=ttyS0", "checks")
    proc = _boot(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert _lines(err)[-2:] == [
        "eemini: boot failed: image.json asks for simulated attestation but the cmdline lacks ee.dev=1",
        "eemini: powering off (boot failed)",
    ]


PRODUCTION = {"attestation": "configfs-tsm", "cmdline": "console=ttyS0 quiet", "config_sources": []}


def test_production_image_attests_then_serves(tmp_path: Path) -> None:
    _prepare(tmp_path, "console=ttyS0 quiet", "checks", **PRODUCTION)
    proc = _boot(tmp_path, fake_tsm="tdx_guest")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    quote_size = len(make_quote(bytes(64)))
    # (what follows "RTMR3" depends on the host's kernel, which this namespace shares)
    [attestation] = [line for line in lines if line.startswith("eemini: attestation: ")]
    assert attestation.startswith(
        f"eemini: attestation: TDX through configfs-tsm (trial quote: {quote_size} bytes); RTMR3 "
    )
    assert "[work.py] attest True tdx ['spec', 'workload', 'separator']" in lines
    assert lines[-1].startswith("eemini: powering off (workload done for good (exited with status 0")


@pytest.mark.parametrize(
    ("fake_tsm", "why"),
    [
        (
            None,
            "configfs-tsm is not available: /mnt/tsm/report does not exist (needs a TDX guest whose "
            "kernel has the TDX guest driver, and configfs mounted)",
        ),
        (
            "",
            "configfs-tsm has no provider (creating a report entry in /mnt/tsm/report failed with "
            "ENXIO): no TDX guest driver is registered, so this is not a TDX guest or its driver "
            "failed to start",
        ),
    ],
)
def test_production_image_refuses_without_tdx(tmp_path: Path, fake_tsm: str | None, why: str) -> None:
    _prepare(tmp_path, "console=ttyS0 quiet", "checks", **PRODUCTION)
    proc = _boot(tmp_path, fake_tsm=fake_tsm)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    assert _lines(err)[-2:] == [
        f"eemini: refusing to start the workload: TDX attestation is unavailable: {why}",
        "eemini: powering off (boot failed)",
    ]
    assert "[work.py]" not in err


def test_production_image_refuses_a_foreign_cmdline(tmp_path: Path) -> None:
    """Checked before anything else: no config is read, no quote is taken."""
    _prepare(tmp_path, "console=ttyS0 quiet ee.GREETING=hi", "checks", **PRODUCTION)
    proc = _boot(tmp_path, fake_tsm="tdx_guest")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    assert lines[0].startswith("eemini: PID 1 starting (kernel ")
    assert lines[1:] == [
        "eemini: refusing to start the workload: the kernel command line is not the image's own: "
        "got 'console=ttyS0 quiet ee.GREETING=hi', the image was built with 'console=ttyS0 quiet'",
        "eemini: powering off (boot failed)",
    ]


def test_sigterm_stops_the_workload_gracefully(tmp_path: Path) -> None:
    _prepare(tmp_path, "console=ttyS0 ee.dev=1", "wait")
    proc = _boot(tmp_path)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if line.strip() == "[work.py] waiting":
                break
        else:
            pytest.fail("the workload never started:\n" + "".join(seen))
        # The namespace's PID 1 is unshare's only child.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = _lines(rest)
    assert "[work.py] got SIGTERM" in lines
    assert lines[-1] == "eemini: powering off (SIGTERM received)"
    assert proc.returncode == -signal.SIGINT


def test_static_network_from_boot_config(tmp_path: Path) -> None:
    cmdline = "console=ttyS0 ee.dev=1 ee.EE_IP=10.9.0.5/24 ee.EE_GATEWAY=10.9.0.1 "
    cmdline += "ee.EE_DNS=10.9.0.53,10.9.0.54"
    _prepare(tmp_path, cmdline, "net", network="dhcp")
    with namespaces("vm", "peer") as (vm, peer):
        veth(vm, "eth0", peer, "peer0")
        proc = _boot(tmp_path, vm)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    assert "eemini: network: eth0 10.9.0.5/24 via 10.9.0.1 (static, from boot config)" in lines
    # /proc/net/route: interface, destination, gateway in little-endian hex
    assert (
        "[work.py] routes [('eth0', '00000000', '0100090A'), ('eth0', '0000090A', '00000000')]" in lines
    )
    assert "[work.py] resolv ['nameserver 10.9.0.53', 'nameserver 10.9.0.54', '']" in lines


def test_dhcp_lease_and_renewal_as_pid1(tmp_path: Path) -> None:
    # GREETING doubles as "how long the workload stays" so the 1 s renewal timer fires meanwhile.
    _prepare(tmp_path, "console=ttyS0 ee.dev=1 ee.GREETING=6", "net", network="dhcp")
    with namespaces("vm", "srv") as (vm, srv):
        veth(vm, "eth0", srv, "eesrv0")
        server = start_dhcp_server(srv, "eesrv0", lease=60, t1=1)
        try:
            proc = _boot(tmp_path, vm)
            _, err = proc.communicate(timeout=60)
        finally:
            server.kill()
            server.communicate()
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    assert any(
        line.startswith(
            "eemini: network: eth0 10.77.0.50/24 via 10.77.0.1 dns 10.77.0.53,10.77.0.54 "
            "(DHCP from 10.77.0.1, lease 60 s, "
        )
        for line in lines
    ), err
    assert (
        "[work.py] resolv ['search test.lan', 'nameserver 10.77.0.53', 'nameserver 10.77.0.54', '']"
        in lines
    )
    assert "eemini: DHCP lease renewed: 10.77.0.50/24 for 60 s" in lines


def test_dhcp_lease_with_a_non_contiguous_mask_is_refused_and_the_boot_goes_on(
    tmp_path: Path,
) -> None:
    _prepare(tmp_path, "console=ttyS0 ee.dev=1", "net", network="dhcp")
    with namespaces("vm", "srv") as (vm, srv):
        veth(vm, "eth0", srv, "eesrv0")
        server = start_dhcp_server(srv, "eesrv0", lease=60, t1=30, mask="255.0.255.0")
        try:
            proc = _boot(tmp_path, vm)
            _, err = proc.communicate(timeout=60)
        finally:
            server.kill()
            seen, _ = server.communicate()
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    # One exchange (DISCOVER, REQUEST), then no address and no route; the workload still runs.
    assert [json.loads(line)["type"] for line in seen.splitlines()] == [1, 3]
    assert (
        "eemini: network: the DHCP ACK for 10.77.0.50 carries the subnet mask 255.0.255.0, which is "
        "not contiguous (ones, then zeros); going on without an address"
    ) in lines
    assert "[work.py] routes []" in lines
    assert "[work.py] resolv None" in lines
    assert "Traceback (most recent call last):" not in lines
    assert lines[-1] == (
        "eemini: powering off (workload done for good (exited with status 0); on_exit = poweroff)"
    ), err


def test_unexpected_error_is_logged_and_ends_in_a_clean_power_off(tmp_path: Path) -> None:
    # The control socket's directory would have to be inside a file: an OSError deep in the
    # runtime, not a BootFailure. PID 1 must print it and power off (no exit, no panic).
    _prepare(tmp_path, "console=ttyS0 ee.dev=1", "checks")
    proc = _boot(tmp_path, socket="/mnt/spec.json/sock/agent.sock")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    lines = _lines(err)
    fatal = [line for line in lines if line.startswith("eemini: fatal: ")]
    assert len(fatal) == 1 and fatal[0].startswith("eemini: fatal: NotADirectoryError: "), err
    assert "Traceback (most recent call last):" in lines
    assert lines[-1] == "eemini: powering off (fatal error)"
    assert "[work.py]" not in err
