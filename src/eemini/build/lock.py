"""The lock file: every Debian package that adds bytes to an image, pinned by version and sha256,
and the toolchain the kernel is compiled with (docs/kernel.md)."""

from __future__ import annotations

import dataclasses
import json
import re
from enum import StrEnum
from pathlib import Path

from eemini.build.apt import ARCH, BACKPORTS, SUITE, Apt
from eemini.log import complete_step, die

REPO = Path(__file__).resolve().parents[3]
LOCK_PATH = REPO / "profiles" / "packages.lock.json"


class Role(StrEnum):
    KERNEL = "kernel"  # Debian's kernel source (linux-source-X.Y): our kernel is compiled from it
    STUB = "stub"  # systemd-stub, the UKI's PE body
    PYTHON = "python"  # the interpreter and its standard library
    LIBRARY = "library"  # shared libraries the interpreter and its extension modules link
    TOOLCHAIN = "toolchain"  # the tools tree the kernel is compiled in (none of it is in the image)


@dataclasses.dataclass(frozen=True)
class Root:
    role: Role
    name: str  # a package, or a metapackage whose single dependency is the package to pin
    why: str
    meta: bool = False
    release: str | None = None  # resolve from this suite first (apt ranks backports last)


# The oldest kernel with the TSM measurement ABI (RTMR3 extension through sysfs, eemini.guest.rtmr).
MIN_KERNEL = (6, 16)

# What `eemini lock --update` resolves. The kernel source is pinned through the metapackage so an
# update picks the newest source trixie-backports offers; the libraries are what the interpreter
# and the extension modules we ship link (DT_NEEDED), checked at build time.
ROOTS: tuple[Root, ...] = (
    Root(
        Role.KERNEL,
        "linux-source",
        "Debian's kernel source, Linux >= 6.16 (TSM measurement ABI)",
        meta=True,
        release=BACKPORTS,
    ),
    Root(Role.STUB, "systemd-boot-efi", "systemd-stub, the UKI's EFI body"),
    Root(Role.PYTHON, "python3.13-minimal", "the interpreter binary"),
    Root(Role.PYTHON, "libpython3.13-minimal", "core standard library"),
    Root(Role.PYTHON, "libpython3.13-stdlib", "rest of the standard library and lib-dynload"),
    Root(Role.LIBRARY, "libc6", "C library and dynamic loader"),
    Root(Role.LIBRARY, "libffi8", "ctypes"),
    Root(Role.LIBRARY, "zlib1g", "linked by the interpreter"),
    Root(Role.LIBRARY, "libexpat1", "linked by the interpreter"),
)

# The tools tree the kernel is compiled in (eemini.build.kernel): these and everything they depend
# on, as an install into an empty system resolves them, each pinned like the image's packages. The
# kernel's bytes then depend on these packages only, never on the build host's compiler.
TOOLCHAIN_ROOTS: tuple[tuple[str, str], ...] = (
    ("gcc-14", "the C compiler Debian builds its trixie kernels with (pulls binutils, cpp)"),
    ("libc6-dev", "headers and crt files for the host programs the build compiles (kconfig, objtool)"),
    ("libelf-dev", "objtool, which x86 kernels build and run on every object"),
    ("make", "kbuild"),
    ("bc", "kernel/time/timeconst.bc"),
    ("flex", "the Kconfig lexer"),
    ("bison", "the Kconfig parser"),
    ("bash", "kbuild's shell scripts that need bash (merge_config.sh and others)"),
    ("dash", "/bin/sh"),
    ("coreutils", "cat, cp, mv, mkdir, ... in every recipe"),
    ("sed", "recipes and scripts"),
    ("grep", "recipes and scripts"),
    ("gawk", "awk: x86's instruction decoder tables and other generated files"),
    ("findutils", "find, in clean and header scripts"),
    ("diffutils", "cmp, in filechk"),
    ("tar", "unpacking the kernel source inside the tools tree"),
    ("xz-utils", "the kernel source tarball is xz-compressed"),
    ("zstd", "the compressed kernel payload (CONFIG_KERNEL_ZSTD)"),
    ("cpio", "kernel/gen_kheaders.sh and usr/ (the built-in initramfs list, empty here)"),
    ("perl-base", "scripts kbuild runs with perl"),
    ("hostname", "scripts/mkcompile_h falls back to it (KBUILD_BUILD_HOST is set anyway)"),
    ("patch", "applies kernel/patches/*.patch, when there are any"),
)


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str
    size: int
    role: Role

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclasses.dataclass(frozen=True)
class Lock:
    suite: str
    architecture: str
    packages: tuple[Package, ...]
    toolchain: tuple[Package, ...] = ()

    def by_role(self, role: Role) -> list[Package]:
        return [p for p in self.packages if p.role is role]

    def get(self, name: str) -> Package:
        for p in self.packages:
            if p.name == name:
                return p
        die(f"the lock file has no entry for {name}", hint="run `eemini lock --update`")

    @property
    def kernel(self) -> Package:
        """The kernel source package."""
        kernels = self.by_role(Role.KERNEL)
        if len(kernels) != 1:
            die(f"the lock file must pin exactly one kernel source, it pins {len(kernels)}")
        return kernels[0]

    def to_json(self) -> str:
        def entry(p: Package) -> dict[str, object]:
            return {"name": p.name, "version": p.version, "sha256": p.sha256, "size": p.size,
                    "role": p.role.value}  # fmt: skip

        doc = {
            "comment": "Generated by `eemini lock --update`; see docs/build.md. Every package that "
            "contributes bytes to an image, with the sha256 of its .deb; `toolchain`: the tools tree "
            "the kernel is compiled in (docs/kernel.md).",
            "suite": self.suite,
            "architecture": self.architecture,
            "packages": [entry(p) for p in sorted(self.packages, key=lambda p: p.name)],
            "toolchain": [entry(p) for p in sorted(self.toolchain, key=lambda p: p.name)],
        }
        return json.dumps(doc, indent=2) + "\n"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def load(path: Path = LOCK_PATH) -> Lock:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        die(f"the lock file {path} does not exist", hint="run `eemini lock --update` to create it")
    except json.JSONDecodeError as e:
        die(f"the lock file {path} is not valid JSON: {e}")

    def entries(key: str, toolchain: bool) -> tuple[Package, ...]:
        found = []
        # A lock file written before the kernel was compiled here has no toolchain list.
        for entry in doc[key] if key in doc or toolchain is False else []:
            if not _SHA256.fullmatch(entry["sha256"]):
                die(f"lock entry {entry['name']} has a malformed sha256 {entry['sha256']!r}")
            role = Role(entry["role"])
            if (role is Role.TOOLCHAIN) != toolchain:
                die(f"lock entry {entry['name']} has the role {role.value!r} in the list {key!r}")
            found.append(Package(entry["name"], entry["version"], entry["sha256"], int(entry["size"]),
                                 role))  # fmt: skip
        return tuple(found)

    try:
        return Lock(doc["suite"], doc["architecture"], entries("packages", False),
                    entries("toolchain", True))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        die(
            f"the lock file {path} is malformed ({type(e).__name__}: {e})",
            hint="run `eemini lock --update`",
        )


def _resolve_meta(apt: Apt, root: Root) -> tuple[str, str | None]:
    """The one package a metapackage depends on, and the version when the dependency pins one."""
    record = apt.show(root.name, release=root.release)
    if record is None:
        die(f"the {SUITE} archive offers no package {root.name}")
    deps = [d.strip() for d in record.get("Depends", "").split(",") if d.strip()]
    if len(deps) != 1:
        die(f"{root.name} should depend on exactly one package, it depends on {deps}")
    m = re.fullmatch(r"(\S+)(?:\s*\(\s*=\s*(\S+)\s*\))?", deps[0])
    if m is None:
        die(f"{root.name} depends on {deps[0]!r}, which is not a package name or name (= version)")
    return m[1], m[2]


def upstream_version(version: str) -> tuple[int, ...]:
    """(major, minor[, patch]) of a Debian kernel package version such as 7.3.4-1~bpo13+1."""
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        die(f"cannot read a Linux version from the package version {version!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def check_kernel(pkg: Package) -> None:
    if upstream_version(pkg.version)[:2] < MIN_KERNEL:
        die(
            f"the kernel source {pkg.label} is older than Linux {'.'.join(map(str, MIN_KERNEL))}, "
            "which has the TSM measurement ABI (RTMR3 extension through sysfs)",
            hint="pin linux-source from trixie-backports (`eemini lock --update`)",
        )


def resolve(apt: Apt) -> Lock:
    """Pin every root (and the toolchain's whole closure) to the version the archive offers now."""
    packages = []
    with complete_step(f"Resolving {len(ROOTS)} packages in Debian {SUITE}"):
        apt.update()
        for root in ROOTS:
            name, version = _resolve_meta(apt, root) if root.meta else (root.name, None)
            record = apt.show(name, version, release=root.release)
            if record is None:
                die(f"the {SUITE} archive offers no package {name} {version or ''}".rstrip())
            packages.append(
                Package(name, record["Version"], record["SHA256"], int(record["Size"]), root.role)
            )
    kernel = next(p for p in packages if p.role is Role.KERNEL)
    check_kernel(kernel)
    names = [name for name, _ in TOOLCHAIN_ROOTS]
    with complete_step(f"Resolving the kernel toolchain ({len(names)} packages and what they need)"):
        toolchain = [Package(n, v, h, size, Role.TOOLCHAIN) for n, v, h, size in apt.closure(names)]
    return Lock(SUITE, ARCH, tuple(sorted(packages, key=lambda p: p.name)), tuple(toolchain))


def save(lock: Lock, path: Path = LOCK_PATH) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lock.to_json())
    tmp.replace(path)
