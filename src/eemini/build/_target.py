"""Runs under the image's own CPython (3.13, from the pinned packages), never on the host's.

`analyze`: which modules the guest runtime imports, found by walking the import statements
(ast) against the target's full standard library, executing nothing. `compile`: precompile
sources to .pyc with hash-based invalidation (PEP 552, unchecked) so no source mtime ends up in
the image. Protocol: JSON on stdin and stdout.
"""

import sys

# Before anything else is imported: what the interpreter itself loads to start (-S -E).
STARTUP = sorted(sys.modules)

import ast  # noqa: E402
import json  # noqa: E402


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, package: str, everywhere: bool) -> list[tuple[str, list[str]]]:
    """(module, from-names) pairs for every import statement that runs.

    Standard-library modules: only what runs at import time (function bodies are left out: the
    stdlib imports many rarely used things lazily). The guest's own modules: everywhere, because
    its lazy imports are on paths it really takes. `if TYPE_CHECKING:` bodies never run.
    """
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if not everywhere and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{prefix}.{base}" if base else prefix
            found.append((base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def analyze(req: dict) -> dict:  # type: ignore[type-arg]
    import importlib.machinery

    guest_roots = set(req["guest_roots"])
    excludes = set(req["excludes"])
    search = [*req["path"], *sys.path]
    specs: dict[str, object] = {}
    missing: set[str] = set()
    modules: dict[str, dict] = {}  # type: ignore[type-arg]

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in excludes)

    def find(name: str):  # type: ignore[no-untyped-def]
        if name in specs:
            return specs[name]
        spec = None
        if name not in sys.builtin_module_names and not excluded(name):
            parent, _, _ = name.rpartition(".")
            if not parent:
                spec = importlib.machinery.PathFinder.find_spec(name, search)
            else:
                pspec = find(parent)
                locations = getattr(pspec, "submodule_search_locations", None)
                if locations:
                    spec = importlib.machinery.PathFinder.find_spec(name, list(locations))
        specs[name] = spec
        return spec

    def need(name: str, required: bool) -> bool:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub in modules or sub in sys.builtin_module_names:
                continue
            spec = find(sub)
            if spec is None:
                if required and not excluded(sub):
                    missing.add(sub)
                return False
            add(sub, spec)
        return True

    def add(name: str, spec) -> None:  # type: ignore[no-untyped-def]
        origin = spec.origin if spec.has_location else None
        modules[name] = {"file": origin}
        if not origin or not origin.endswith(".py"):
            return
        with open(origin, "rb") as f:
            tree = ast.parse(f.read(), origin)
        is_pkg = spec.submodule_search_locations is not None
        package = name if is_pkg else name.rpartition(".")[0]
        everywhere = name.split(".", maxsplit=1)[0] in guest_roots
        for module, names in _imports(tree, package, everywhere):
            if not need(module, True):
                continue
            for n in names:
                if n != "*" and find(f"{module}.{n}") is not None:
                    need(f"{module}.{n}", False)

    for name in [*STARTUP, *req["extra"]]:
        need(name, False)  # built in or frozen into the interpreter when not found: nothing to ship
    for name in req["entries"]:
        if not need(name, True):
            return {"error": f"cannot find {name}"}
    return {"modules": dict(sorted(modules.items())), "missing": sorted(missing)}


def compile_all(req: dict) -> dict:  # type: ignore[type-arg]
    import py_compile

    for src, cfile, dfile in req["files"]:
        py_compile.compile(
            src, cfile=cfile, dfile=dfile, doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )  # fmt: skip
    return {"compiled": len(req["files"])}


def main() -> None:
    req = json.load(sys.stdin)
    handler = {"analyze": analyze, "compile": compile_all}[req["op"]]
    json.dump(handler(req), sys.stdout)


if __name__ == "__main__":
    main()
