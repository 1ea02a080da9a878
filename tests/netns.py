"""Network namespaces for tests: created per test, removed afterwards (root only)."""

from __future__ import annotations

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
