"""The production TCB: the code lines of the guest runtime that a `gcp` image ships.

The files are the ones the built image's SBOM (manifest.json) lists under eemini/guest/, their
bytes the ones that went into its initramfs (checked against the SBOM's sha256). A code line is a
line that is not blank, not only a comment and not part of a docstring; a statement spread over
several lines counts each of them. Target: at most 3,300.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import sys
import tempfile
import tokenize
from pathlib import Path

from eemini.build import image, lock, profile, pyruntime, spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import images

TARGET = 3300
PROFILE = "gcp"
GUEST = f"{pyruntime.GUEST_PREFIX}/eemini/guest/"
# Tokens that are not code: comments, line ends, indentation.
_NOT_CODE = {
    tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
    tokenize.ENDMARKER,
}  # fmt: skip


def code_lines(text: str) -> int:
    """How many lines of `text` (Python source) hold code: not blank, not only a comment, not part
    of a docstring."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def shipped_guest_sources(out: Path, built: image.Built) -> dict[str, bytes]:
    """The eemini/guest/ sources the image's SBOM lists, as they went into its initramfs."""
    sbom = json.loads((out / "manifest.json").read_text())["initramfs"]["files"]
    found = {}
    for entry in sbom:
        path = entry["path"]
        if path.startswith(GUEST) and path.endswith(".py"):
            data = built.tree.entries[path].data
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], path
            found[path[len(GUEST) :]] = data
    return found


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="eemini-bench-tcb-") as tmp:
        work = Path(tmp)
        spec_file = images.workload_spec(work / "spec")
        out = work / "out"
        built = image.build(profile.load(PROFILE), lock.load(), spec.resolve(spec_file), out)
        sources = shipped_guest_sources(out, built)
    counts = {name: code_lines(data.decode()) for name, data in sorted(sources.items())}
    total = sum(counts.values())
    print(
        f"production TCB ({PROFILE} image, eemini/guest/ as its SBOM lists it): {total:,} code "
        f"lines in {len(counts)} files (target <= {TARGET:,})"
    )
    for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {name:<24} {n:>5}")
