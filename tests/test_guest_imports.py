"""The guest package's import rules: standard library only; the simulator is never pulled in."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

GUEST = REPO / "src" / "eemini" / "guest"
SIMULATOR = {"eemini.guest.simulated", "eemini.guest.p256", "eemini.guest.der"}


def module_level_imports(path: Path) -> set[str]:
    """Imports executed when the module is imported (not those inside functions)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def all_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_guest_imports_only_the_standard_library() -> None:
    for path in sorted(GUEST.glob("*.py")):
        for name in all_imports(path):
            top = name.split(".")[0]
            ok = (
                top in sys.stdlib_module_names or name == "__future__" or name.startswith("eemini.guest")
            )
            ok = ok or name == "eemini"  # the package itself (its __version__)
            assert ok, f"{path.name} imports {name}, which is not in the standard library"


def test_nothing_imports_the_simulator_at_module_level() -> None:
    for path in sorted(GUEST.glob("*.py")):
        if f"eemini.guest.{path.stem}" in SIMULATOR:
            continue
        pulled = {name for name in module_level_imports(path) if name in SIMULATOR}
        assert not pulled, f"{path.name} imports {sorted(pulled)} at module level"
