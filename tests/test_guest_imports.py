"""The guest package's import rules: standard library only; guest/dev/ is never pulled in."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO, bare_python

GUEST = REPO / "src" / "eemini" / "guest"
DEV = "eemini.guest.dev"


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
    for path in sorted(GUEST.rglob("*.py")):
        for name in all_imports(path):
            top = name.split(".")[0]
            ok = (
                top in sys.stdlib_module_names or name == "__future__" or name.startswith("eemini.guest")
            )
            ok = ok or name == "eemini"  # the package itself (its __version__)
            assert ok, f"{path.name} imports {name}, which is not in the standard library"


def test_nothing_imports_guest_dev_at_module_level() -> None:
    assert (GUEST / "dev" / "simulated.py").is_file()
    for path in sorted(GUEST.glob("*.py")):
        pulled = {name for name in module_level_imports(path) if name.startswith(DEV)}
        assert not pulled, f"{path.name} imports {sorted(pulled)} at module level"


# Standard-library modules the guest runtime does without (the lean-import rule, stated in the
# docstring of eemini.guest).
AVOIDED = {
    "typing", "dataclasses", "asyncio", "selectors", "socket", "random", "queue", "hmac", "base64",
    "contextlib", "traceback", "json", "re",
}  # fmt: skip
# Every module PID 1 imports on its way to the workload (the simulator too: local-dev images boot
# with it; the metadata client imports its HTTP client only when it fetches).
LEAN = [
    "attest", "azure", "bootconfig", "configdisk", "dev.cmdline", "dev.der", "dev.p256", "dev.simulated",
    "dhcp", "events", "image", "imds", "linux", "logbuf", "loop", "metadata", "net", "netlink", "pid1",
    "power", "record", "rtmr", "runtime", "server", "spec", "supervisor", "tpm", "wirejson",
]  # fmt: skip


def test_the_runtime_modules_import_none_of_the_avoided_modules() -> None:
    imports = "; ".join(f"import eemini.guest.{name}" for name in LEAN)
    code = f"import sys; {imports}; print(sorted(set({sorted(AVOIDED)!r}) & set(sys.modules)))"
    assert bare_python(code) == "[]\n"
