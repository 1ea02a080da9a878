"""Unpack pinned `.deb`s once into the cache, and index which package each file came from."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from eemini.build.apt import Apt, fetch
from eemini.build.lock import Package
from eemini.log import complete_step
from eemini.proc import find_tool, run


def unpacked(apt: Apt, pkg: Package) -> Path:
    """The directory holding pkg's files, unpacked from its verified .deb (cached by sha256)."""
    root = apt.root.parent / "unpacked" / pkg.sha256
    if (root / ".complete").is_file():
        return root
    deb = fetch(apt, pkg.name, pkg.version, pkg.sha256)
    find_tool("dpkg-deb", "to unpack Debian packages", "dpkg")
    root.parent.mkdir(parents=True, exist_ok=True)
    with (
        complete_step(f"Unpacking {pkg.label}"),
        tempfile.TemporaryDirectory(dir=root.parent, prefix=".partial-") as tmp,
    ):
        run(["dpkg-deb", "--extract", deb, tmp])
        (Path(tmp) / ".complete").write_text(f"{pkg.name} {pkg.version}\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
        os.mkdir(tmp)  # so TemporaryDirectory's cleanup finds something to remove
    return root
