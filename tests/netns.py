"""Network namespaces for tests: created per test, removed afterwards (root only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@contextmanager
def namespaces(*names: str) -> Iterator[list[str]]:
    """Create uniquely named network namespaces (lo up) and delete them afterwards."""
    created: list[str] = []
    try:
        for name in names:
            full = f"ee{name}{os.getpid()}"
            ip("netns", "add", full)
            created.append(full)
            ip("-n", full, "link", "set", "lo", "up")
        yield created
    finally:
        for full in created:
            subprocess.run(["ip", "netns", "del", full], check=False, capture_output=True)


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    ip("link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)


def python_in(ns: str, argv: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_dhcp_server(
    ns: str, iface: str, lease: int, t1: int, mask: str = "255.255.255.0"
) -> subprocess.Popen[str]:
    """tests/dhcp_server.py on `iface` (10.77.0.1/24, offering 10.77.0.50 with subnet mask `mask`)
    in `ns`, once it is ready.

    Its stdout then carries the JSON list of DHCP message types it received, when it is stopped.
    """
    for argv in (["addr", "add", "10.77.0.1/24", "dev", iface], ["link", "set", iface, "up"]):
        ip("-n", ns, *argv)
    script = os.path.join(os.path.dirname(__file__), "dhcp_server.py")
    server = python_in(ns, [script, iface, "10.77.0.1", "10.77.0.50", str(lease), str(t1), mask])
    assert server.stdout is not None and server.stderr is not None
    ready = server.stdout.readline()
    assert json.loads(ready) == {"ready": True}, ready + server.stderr.read()
    return server
