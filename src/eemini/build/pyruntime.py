"""The guest's Python: Debian's CPython 3.13 cut down to what the guest runtime imports.

Import analysis runs with the target interpreter itself (through the pinned package's own
dynamic loader, so the host's Python and libc do not matter), against the full pinned standard
library; only the modules it finds are precompiled into the image, as sourceless .pyc files
with unchecked-hash headers (PEP 552): no timestamps, no source needed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from eemini.build import elf
from eemini.build.lock import Package
from eemini.build.profile import Profile
from eemini.build.tree import PROJECT, Origin, Source, Tree
from eemini.guest.image import Attestation, ConfigSource
from eemini.log import complete_step, die, log_debug
from eemini.proc import run

PYVER = "3.13"
STDLIB = f"usr/lib/python{PYVER}"
LIBDIRS = ("usr/lib/x86_64-linux-gnu",)
INTERPRETER = f"usr/bin/python{PYVER}"
LOADER = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
GUEST_PREFIX = "/usr/lib/eemini"  # on /init's sys.path: holds the eemini package
SRC = Path(__file__).resolve().parents[2]  # src/, the parent of the eemini package

# Modules left out even where some stdlib code imports them lazily or optionally: they are only
# reached through paths the guest never takes (interactive help, tests, GUIs, TLS: the image has
# no OpenSSL, and hashlib falls back to its built-in implementations without _hashlib).
EXCLUDES = (
    "_hashlib", "_ssl", "ssl", "_tkinter", "tkinter", "turtle", "turtledemo", "idlelib", "test",
    "unittest", "doctest", "pdb", "pydoc", "pydoc_data", "_pyrepl", "readline", "curses", "_curses",
    "ensurepip", "venv", "lib2to3", "sqlite3", "_sqlite3", "dbm", "_dbm", "_gdbm", "multiprocessing",
    "concurrent", "asyncio", "_asyncio", "xmlrpc", "tomllib", "bz2", "_bz2", "lzma", "_lzma",
    "_decimal", "_pydecimal", "decimal", "_ctypes_test", "_testcapi", "_testinternalcapi",
)  # fmt: skip
# Encodings the interpreter may pick at start-up (UTF-8 mode under the C locale; ASCII and
# Latin-1 as fallbacks for file names and the console). And os: frozen into the interpreter, but
# lib/python3.13/os.py[c] is the landmark getpath looks for to find the standard library
# (Modules/getpath.py STDLIB_LANDMARKS); without it, start-up warns on the console. And
# traceback (with linecache): the interpreter's own error display imports them, so an uncaught
# exception shows a real traceback on the console instead of "No module named 'linecache'".
STARTUP_EXTRA = ("encodings.utf_8", "encodings.ascii", "encodings.latin_1", "encodings.aliases", "os",
                 "traceback", "linecache")  # fmt: skip
# PID 1, what /init runs: the import analysis starts here (and nowhere else in a production image).
PID1 = "eemini.guest.pid1"
# Guest code that never goes into a production image: the folder, whatever it holds.
DEV_PACKAGE = "eemini.guest.dev"
DEV_DIR = "eemini/guest/dev"
# Guest modules that PID 1 imports only for some profiles, and when: the Azure backend and its
# TPM 2.0 client in an azure-tdx-vtpm image, the metadata-server client (and with it the HTTP
# client) where the profile names a metadata source or the Azure backend needs it, Azure IMDS
# boot config and the config disk where the profile names those. Elsewhere they are neither
# analysed nor shipped.
PROFILE_ONLY: dict[str, Callable[[Profile], bool]] = {
    "eemini.guest.azure": lambda p: p.attestation is Attestation.AZURE_TDX_VTPM,
    "eemini.guest.tpm": lambda p: p.attestation is Attestation.AZURE_TDX_VTPM,
    "eemini.guest.metadata": lambda p: (
        p.attestation is Attestation.AZURE_TDX_VTPM or not all(s.local for s in p.config_sources)
    ),
    "eemini.guest.imds": lambda p: ConfigSource.AZURE_IMDS in p.config_sources,
    "eemini.guest.configdisk": lambda p: ConfigSource.CONFIG_DISK in p.config_sources,
}


@dataclasses.dataclass(frozen=True)
class GuestModule:
    name: str
    source: Path
    image_path: str  # .py path inside the image


def guest_modules(with_dev: bool, src: Path = SRC) -> list[GuestModule]:
    """The eemini package root plus eemini.guest, as shipped: guest/dev/ only when asked."""
    found = []
    files = [src / "eemini/__init__.py"]
    guest = src / "eemini/guest"
    if guest.is_dir():
        files += sorted(guest.rglob("*.py"))
    dev = src / DEV_DIR
    for path in files:
        if path.is_relative_to(dev) and not with_dev:
            continue
        rel = path.relative_to(src)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append(GuestModule(".".join(parts), path, f"{GUEST_PREFIX}/{rel.as_posix()}"))
    return found


class Target:
    """The pinned Python packages merged into one prefix that the host can execute."""

    def __init__(self, packages: list[tuple[Package, Path]], work: Path) -> None:
        self.root = (work / "python-full").absolute()  # analysis compares absolute paths
        self.owner: dict[str, Package] = {}
        shutil.rmtree(self.root, ignore_errors=True)
        for pkg, unpacked in packages:
            for path in sorted(unpacked.rglob("*")):
                rel = path.relative_to(unpacked).as_posix()
                if rel == ".complete" or (path.is_dir() and not path.is_symlink()):
                    continue
                self.owner[rel] = pkg
            shutil.copytree(unpacked, self.root, symlinks=True, dirs_exist_ok=True)
        if not (self.root / INTERPRETER).is_file():
            die(f"the pinned Python packages hold no {INTERPRETER}")

    def call(self, request: dict[str, object]) -> dict[str, object]:
        libpath = ":".join(str(self.root / d) for d in LIBDIRS)
        argv: list[str | Path] = [self.root / LOADER, "--library-path", libpath, self.root / INTERPRETER,
                                  "-S", Path(__file__).with_name("_target.py")]  # fmt: skip
        # PYTHONHASHSEED=0: marshal writes sets and frozensets in hash order (reproducible .pyc).
        proc = run(argv, capture=True, input=json.dumps(request).encode(),
                   env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
        reply: dict[str, object] = json.loads(proc.stdout)
        if "error" in reply:
            die(f"import analysis failed: {reply['error']}")
        return reply

    def origin(self, rel: str, derived_from: str | None = None) -> Origin:
        pkg = self.owner.get(rel)
        if pkg is None:
            die(f"no pinned package provides {rel}")
        return Origin(Source.DEBIAN, pkg.name, pkg.version, derived_from)

    def resolve_lib(self, soname: str) -> str:
        for d in LIBDIRS:
            if (self.root / d / soname).exists():
                return f"{d}/{soname}"
        die(f"no pinned package provides the shared library {soname}",
            hint="add the Debian package that ships it to ROOTS in eemini/build/lock.py, then "
            "run `eemini lock --update`")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Analysis:
    stdlib_py: tuple[str, ...]  # paths relative to STDLIB
    extensions: tuple[str, ...]  # paths relative to the prefix root
    guest: tuple[GuestModule, ...]
    modules: tuple[str, ...]


def analyze(target: Target, profile: Profile) -> Analysis:
    """What the shipped guest code imports, starting from what PID 1 runs (`PID1`; in a simulated
    image, which carries guest/dev/, every module there too, so that each imports) and leaving
    out what PID 1 of this profile never imports."""
    with_dev = profile.simulated
    unused = [name for name, used in PROFILE_ONLY.items() if not used(profile)]
    guest = [g for g in guest_modules(with_dev) if g.name not in unused]
    entries = [PID1]
    excludes = [*EXCLUDES, *unused]
    if with_dev:
        entries += [g.name for g in guest if g.name.startswith(DEV_PACKAGE)]
    else:
        excludes.append(DEV_PACKAGE)  # PID 1 imports it only in a simulated image
    with complete_step("Finding the standard-library modules the guest runtime imports"):
        request: dict[str, object] = {
            "op": "analyze",
            "path": [str(SRC)],
            "excludes": excludes,
            "extra": list(STARTUP_EXTRA),
            "entries": entries,
            "guest_roots": ["eemini"],
        }
        reply = target.call(request)
    missing = reply.get("missing")
    if missing:
        log_debug(f"imported but absent from the pinned Python (optional imports): {missing}")
    stdlib_dir = (target.root / STDLIB).as_posix() + "/"
    py, ext = [], []
    modules = reply["modules"]
    assert isinstance(modules, dict)
    for name, info in modules.items():
        file = info["file"]
        if file is None or file.startswith(str(SRC) + "/"):
            continue  # built in, frozen, or the guest package (shipped as a whole below)
        if not file.startswith(target.root.as_posix() + "/"):
            die(f"import analysis found {name} outside the pinned Python: {file}")
        if file.endswith(".py") and file.startswith(stdlib_dir):
            py.append(file[len(stdlib_dir) :])
        elif file.endswith(".so"):
            ext.append(file[len(target.root.as_posix()) + 1 :])
        else:
            die(f"import analysis found {name} in an unexpected place: {file}")
    return Analysis(tuple(sorted(py)), tuple(sorted(ext)), tuple(guest), tuple(sorted(modules)))


def add_runtime(tree: Tree, target: Target, analysis: Analysis, work: Path) -> None:
    """Interpreter, loader, libraries, compiled stdlib and the guest package into the tree."""
    # The merged-/usr layout Debian trixie has: the loader path baked into every binary
    # (/lib64/ld-linux-x86-64.so.2) and the library search path go through these links.
    tree.symlink("/lib64", "usr/lib64", PROJECT, "layout")
    tree.symlink("/lib", "usr/lib", PROJECT, "layout")
    tree.symlink("/bin", "usr/bin", PROJECT, "layout")
    _add_file(tree, target, "usr/lib64/ld-linux-x86-64.so.2", "python-runtime")
    binaries = [INTERPRETER, *analysis.extensions]
    for rel in binaries:
        _add_file(tree, target, rel, "python-runtime")
    _add_libraries(tree, target, binaries)
    tree.dir(f"/{STDLIB}/lib-dynload")  # getpath's exec-prefix landmark: must exist

    out = work / "pyc"
    shutil.rmtree(out, ignore_errors=True)
    jobs: list[tuple[str, str, str, str, Origin]] = []
    for rel in analysis.stdlib_py:
        src = target.root / STDLIB / rel
        dfile = f"/{STDLIB}/{rel}"
        jobs.append((str(src), str(out / STDLIB / (rel + "c")), dfile, f"/{STDLIB}/{rel}c",
                     target.origin(f"{STDLIB}/{rel}", dfile)))  # fmt: skip
    for g in analysis.guest:
        image = PurePosixPath(g.image_path)
        cache = image.parent / "__pycache__" / f"{image.stem}.cpython-313.pyc"
        jobs.append((str(g.source), str(out / cache.relative_to("/")), g.image_path, cache.as_posix(),
                     Origin(Source.PROJECT, derived_from=g.image_path)))  # fmt: skip
        tree.file(g.image_path, g.source.read_bytes(), PROJECT, "guest-runtime")
    with complete_step(f"Precompiling {len(jobs)} modules"):
        target.call({"op": "compile", "files": [[s, c, d] for s, c, d, _, _ in jobs]})
    for _, cfile, _, image_path, origin in jobs:
        category = "python-runtime" if origin.source is Source.DEBIAN else "guest-runtime"
        tree.file(image_path, Path(cfile).read_bytes(), origin, category)


def _add_file(tree: Tree, target: Target, rel: str, category: str) -> None:
    """Add one file of the merged prefix, following symlinks the way the package shipped them."""
    path = target.root / rel
    origin = target.origin(rel)
    if path.is_symlink():
        link = path.readlink().as_posix()
        tree.symlink("/" + rel, link, origin, category)
        resolved = (PurePosixPath("/" + rel).parent / link).as_posix()
        _add_file(tree, target, _normalize(resolved), category)
    else:
        tree.file(
            "/" + rel, path.read_bytes(), origin, category, executable=bool(path.stat().st_mode & 0o111)
        )


def _normalize(path: str) -> str:
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _add_libraries(tree: Tree, target: Target, binaries: list[str]) -> None:
    todo = list(binaries)
    done: set[str] = set()
    while todo:
        rel = todo.pop()
        data = (target.root / rel).read_bytes()
        for soname in elf.parse(data).needed:
            if soname in done:
                continue
            done.add(soname)
            lib = target.resolve_lib(soname)
            _add_file(tree, target, lib, "python-runtime")
            todo.append(lib)
