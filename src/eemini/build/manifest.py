"""manifest.json: what went into an image and what came out, with an SBOM of the initramfs.

Other parts add sections (e.g. predicted measurement events) through `extra`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eemini.build.tree import Kind, Tree

SCHEMA = 1


def sbom(tree: Tree) -> list[dict[str, Any]]:
    """Every entry of the initramfs, in archive order: every byte has an origin."""
    out = []
    for e in tree.sorted():
        item: dict[str, Any] = {"path": e.path, "type": e.kind.value, "mode": f"{e.mode:04o}",
                                "origin": e.origin.to_json()}  # fmt: skip
        if e.kind is Kind.FILE:
            item["size"] = e.size
            item["sha256"] = e.sha256()
        elif e.kind is Kind.SYMLINK:
            item["target"] = e.data.decode()
        elif e.kind is Kind.CHARDEV:
            item["rdev"] = list(e.rdev)
        out.append(item)
    return out


def write(path: Path, sections: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    doc: dict[str, Any] = {"schema": SCHEMA, **sections}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"manifest section {key!r} is already present")
        doc[key] = value
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
