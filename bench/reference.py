"""Debian's cloud kernel, which images carried before our own (docs/kernel.md): the benchmarks'
point of comparison, pinned here like every other input and fetched through the builder's apt
machinery. Nothing of it goes into an image."""

from __future__ import annotations

from pathlib import Path

from eemini.build.apt import Apt
from eemini.build.deb import unpacked
from eemini.build.lock import Package, Role

DEBIAN_KERNEL = Package(
    "linux-image-6.12.118+deb13-cloud-amd64",
    "6.12.118-1",
    "07f23ba1de88377d700e1e2f5b2ee495ff89b0d0bb73fdbd3eac8f6b27609b9a",
    34699820,
    Role.KERNEL,
)
DEBIAN_RELEASE = "6.12.118+deb13-cloud-amd64"


def debian_vmlinuz() -> Path:
    """Debian's cloud kernel image (downloaded and unpacked into the cache once)."""
    return unpacked(Apt(), DEBIAN_KERNEL) / "boot" / f"vmlinuz-{DEBIAN_RELEASE}"
