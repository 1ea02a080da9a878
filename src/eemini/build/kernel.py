"""Our kernel: Debian's pinned kernel source, our allowlist configuration, the pinned toolchain.

The recipe (docs/kernel.md):

1. The tools tree: every toolchain package of the lock file unpacked (`dpkg-deb -x`, no
   maintainer scripts) into one directory under the cache, keyed by the toolchain's pins. The
   kernel is compiled inside it (chroot, in a private mount namespace, the tree itself read-only),
   so its bytes depend on the pinned compiler, binutils, make, ... and never on the build host's.
2. The configuration: `make tinyconfig`, our fragment (`kernel/fragment.config`, one reason per
   option) merged with `scripts/kconfig/merge_config.sh -m`, `make olddefconfig`. The result must
   equal the committed `kernel/config` byte for byte, and every option of the fragment must have
   the value the fragment asks for: an option renamed or left without its dependencies between
   kernel versions would otherwise vanish silently.
3. `make bzImage` with the reproducibility knobs (fixed timestamp, user, host and version
   counter, a build salt in the config, a fixed source path inside the tree).

The result is cached under `kernel/<key>/` in the cache directory, the key being the sha256 of
the source package, fragment, resolved config, patches, toolchain pins and this recipe. A miss
builds it with a one-line progress counter on stderr and keeps the whole log next to the result
(and, on failure, at `kernel/<key>.failed.log`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eemini.build.apt import Apt, cache_dir, fetch, fetch_all
from eemini.build.lock import REPO, Lock, Package, check_kernel
from eemini.log import complete_step, die, log_notice, log_step
from eemini.proc import find_tool, run

KERNEL_DIR = REPO / "kernel"
FRAGMENT = KERNEL_DIR / "fragment.config"
RESOLVED = KERNEL_DIR / "config"
PATCHES = KERNEL_DIR / "patches"

# Bump when the recipe below changes in a way that changes the kernel's bytes.
RECIPE = 1
# What the build environment fixes (scripts/mkcompile_h, init/Makefile): /proc/version and the
# bzImage's version string carry these instead of the build machine's time, user and host name.
BUILD_TIMESTAMP = "Thu Jan  1 00:00:00 UTC 1970"
BUILD_USER = "eemini"
BUILD_HOST = "eemini"
BUILD_VERSION = "1"  # the "#1" in the version string: no .version counter
# Inside the tools tree: the compiler by its full name (the tree has no `gcc` link) for the kernel
# and for the host programs the build compiles (kconfig, objtool, ...).
CC = "x86_64-linux-gnu-gcc-14"
SRC = "/build/linux"  # the source tree's path inside the tools tree, the same on every machine
# The size of a cold build, for the progress counter and the time estimate: kbuild's output lines
# ("  CC      kernel/fork.o") and the CPU time of a reference build of the committed config.
EXPECTED_STEPS = 2100
CPU_MINUTES = 20.0


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A built kernel in the cache."""

    path: Path  # kernel/<key>/
    key: str
    release: str  # `make kernelrelease`, the UKI's .uname
    source: Package

    @property
    def bzimage(self) -> Path:
        return self.path / "bzImage"

    @property
    def config(self) -> Path:
        return self.path / "config"

    def info(self) -> dict[str, Any]:
        """The build record (build.json): what went in and what came out."""
        doc: dict[str, Any] = json.loads((self.path / "build.json").read_text())
        return doc


# --- the fragment ---


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # CONFIG_...
    value: str  # y, n, a number, or a quoted string as .config writes it
    reason: str
    line: int


_OPTION = re.compile(r"(CONFIG_[A-Z0-9_]+)=(y|n|-?\d+|0x[0-9a-fA-F]+|\"[^\"]*\")\s+#\s*(\S.*)")


def parse_fragment(text: str, where: str = "kernel/fragment.config") -> list[Option]:
    """Our fragment: `CONFIG_NAME=VALUE  # reason` per line (n for off), `#` lines are comments."""
    found: list[Option] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _OPTION.fullmatch(line)
        if m is None:
            if re.fullmatch(r"CONFIG_[A-Z0-9_]+=\S+(\s+#\s*)?", line):
                die(f"{where}:{number}: {line!r} has no reason (write `# why` after the value)")
            die(f"{where}:{number}: not an option line (`CONFIG_NAME=VALUE  # reason`): {line!r}")
        if m[1] in seen:
            die(f"{where}:{number}: {m[1]} is set twice (also on line {seen[m[1]]})")
        seen[m[1]] = number
        found.append(Option(m[1], m[2], m[3], number))
    if not found:
        die(f"{where} sets no options")
    return found


def kconfig_fragment(options: list[Option]) -> str:
    """The fragment as merge_config.sh reads it."""
    return "".join(
        f"# {o.name} is not set\n" if o.value == "n" else f"{o.name}={o.value}\n" for o in options
    )


def parse_config(text: str) -> dict[str, str]:
    """A .config as {CONFIG_NAME: value}, `n` for `# CONFIG_NAME is not set`."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"(CONFIG_[A-Za-z0-9_]+)=(.*)", line):
            values[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_[A-Za-z0-9_]+) is not set", line):
            values[m[1]] = "n"
    return values


def enabled_options(text: str) -> list[str]:
    """The options a .config turns on (=y, or a value)."""
    return sorted(k for k, v in parse_config(text).items() if v != "n")


def check_fragment(options: list[Option], resolved: str) -> None:
    """Every option of the fragment has the value asked for after olddefconfig."""
    got = parse_config(resolved)
    wrong = [(o, got.get(o.name, "n")) for o in options if got.get(o.name, "n") != o.value]
    if wrong:
        lines = "; ".join(
            f"{o.name}={o.value} (line {o.line}) came out as {'unset' if v == 'n' else v}"
            for o, v in wrong
        )
        die(
            f"the kernel configuration does not have what kernel/fragment.config asks for: {lines}",
            hint="an option was renamed or removed in this kernel version, or needs another option "
            "first (see its `depends on` in the Kconfig files); fix the fragment",
        )


def config_difference(expected: str, got: str) -> list[str]:
    """Options whose values differ between two .configs, as `NAME: expected -> got` lines."""
    a, b = parse_config(expected), parse_config(got)
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out.append(f"{name}: {a.get(name, 'absent')} -> {b.get(name, 'absent')}")
    if not out and expected != got:
        out.append("(the same options; comments or order differ)")
    return out


# --- the tools tree ---


def toolchain_key(toolchain: tuple[Package, ...]) -> str:
    pins = sorted(f"{p.name} {p.version} {p.sha256}" for p in toolchain)
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()


# Links that maintainer scripts or update-alternatives would make in an installed system.
TREE_LINKS = {"usr/bin/sh": "dash", "usr/bin/awk": "gawk"}
# Mount points the runner needs in the tree.
TREE_DIRS = ("proc", "dev", "tmp", "build")


def tools_tree(apt: Apt, lock: Lock) -> Path:
    """The unpacked toolchain, made once per set of toolchain pins (cached, shared, atomic)."""
    if not lock.toolchain:
        die("the lock file pins no kernel toolchain", hint="run `eemini lock --update`")
    root = cache_dir() / "tools" / toolchain_key(lock.toolchain)
    if (root / ".complete").is_file():
        return root
    find_tool("dpkg-deb", "to unpack the toolchain's Debian packages", "dpkg")
    root.parent.mkdir(parents=True, exist_ok=True)
    with (
        complete_step(f"Unpacking the kernel toolchain ({len(lock.toolchain)} packages)"),
        tempfile.TemporaryDirectory(dir=root.parent, prefix=".partial-") as tmp,
    ):
        tree = Path(tmp)
        debs = fetch_all(
            apt, [(p.name, p.version, p.sha256) for p in lock.toolchain], "the kernel toolchain"
        )
        for pkg in sorted(lock.toolchain, key=lambda p: p.name):
            run(["dpkg-deb", "--extract", debs[pkg.sha256], tree])
            # Before the next package: an absolute link to a directory would make tar write that
            # package's files through it, onto the build host.
            relativize_symlinks(tree)
        for link, target in TREE_LINKS.items():
            path = tree / link
            if not path.exists():
                path.symlink_to(target)
        for d in TREE_DIRS:
            (tree / d).mkdir(exist_ok=True)
        missing = [p for p in ("usr/bin/" + CC, "usr/bin/make", "usr/bin/bash", "usr/bin/sh",
                               "usr/bin/ld", "usr/bin/awk") if not (tree / p).exists()]  # fmt: skip
        if missing:
            die(f"the unpacked kernel toolchain lacks {', '.join(missing)}",
                hint="the toolchain pins are incomplete; run `eemini lock --update`")  # fmt: skip
        (tree / ".complete").write_text(
            "\n".join(f"{p.name} {p.version}" for p in lock.toolchain) + "\n"
        )
        try:
            os.rename(tmp, root)
            os.mkdir(tmp)
        except OSError:
            if not (root / ".complete").is_file():
                raise
    return root


def relativize_symlinks(tree: Path) -> int:
    """Make every absolute symlink under `tree` relative, pointing at the same place inside it (as
    it would resolve in the chroot). The number rewritten."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            target = os.readlink(path)
            if target.startswith("/"):
                inside = tree / target.lstrip("/")
                path.unlink()
                path.symlink_to(os.path.relpath(inside, path.parent))
                count += 1
    return count


def _runner(tree: Path, build: Path, script: str) -> list[str]:
    """argv that runs `script` (bash) inside the tools tree: a private mount namespace in which the
    tree is read-only, `build` is /build, /dev holds only null/zero/full/random/urandom, and /proc
    and /tmp are fresh; the environment is only what is given here."""
    if os.geteuid() == 0:
        unshare = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]
    else:
        unshare = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
                   "--propagation", "private"]  # fmt: skip
    t = shlex.quote(os.fspath(tree))
    devices = " ".join(f"{t}/dev/{d}" for d in ("null", "zero", "full", "random", "urandom"))
    setup = "\n".join([
        "set -e",
        f"mount --bind {t} {t}",
        f"mount -o remount,bind,ro {t}",
        f"mount -t proc proc {t}/proc",
        f"mount -t tmpfs -o mode=1777 tmpfs {t}/tmp",
        f"mount -t tmpfs -o mode=0755 tmpfs {t}/dev",
        f"for d in {devices}; do : > \"$d\"; mount --bind /dev/${{d##*/}} \"$d\"; done",
        f"mount --bind {shlex.quote(os.fspath(build))} {t}/build",
        f"exec chroot {t} /usr/bin/env -i PATH=/usr/bin HOME=/build LC_ALL=C TZ=UTC "
        f"/usr/bin/bash -euc {shlex.quote('umask 022; ' + script)}",
    ])  # fmt: skip
    return [*unshare, "/bin/sh", "-c", setup]


def make_args(jobs: int) -> list[str]:
    """The make command line: compiler, reproducibility knobs, no host paths."""
    return [
        "make", f"-j{jobs}", "ARCH=x86_64", f"CC={CC}", f"HOSTCC={CC}",
        f"KBUILD_BUILD_TIMESTAMP={BUILD_TIMESTAMP}", f"KBUILD_BUILD_USER={BUILD_USER}",
        f"KBUILD_BUILD_HOST={BUILD_HOST}", f"KBUILD_BUILD_VERSION={BUILD_VERSION}",
        f"KCFLAGS=-fdebug-prefix-map={SRC}=.",
    ]  # fmt: skip


def _make(jobs: int, *targets: str) -> str:
    return shlex.join([*make_args(jobs), *targets])


# --- building ---


def patches() -> list[Path]:
    return sorted(PATCHES.glob("*.patch")) if PATCHES.is_dir() else []


def cache_key(lock: Lock, fragment: str, resolved: str) -> str:
    doc = {
        "recipe": RECIPE,
        "source": [lock.kernel.name, lock.kernel.version, lock.kernel.sha256],
        "fragment": hashlib.sha256(fragment.encode()).hexdigest(),
        "config": hashlib.sha256(resolved.encode()).hexdigest(),
        "patches": [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in patches()],
        "toolchain": toolchain_key(lock.toolchain),
        "make": make_args(0),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def jobs() -> int:
    env = os.environ.get("EEMINI_KERNEL_JOBS")
    if env:
        if not env.isdigit() or int(env) < 1:
            die(f"EEMINI_KERNEL_JOBS must be a positive number, not {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0))


def read_fragment() -> tuple[list[Option], str]:
    """The fragment's options and its text."""
    try:
        text = FRAGMENT.read_text()
    except FileNotFoundError:
        die(f"the kernel configuration fragment {FRAGMENT} is missing")
    return parse_fragment(text), text


def read_resolved() -> str:
    try:
        return RESOLVED.read_text()
    except FileNotFoundError:
        die(f"the resolved kernel configuration {RESOLVED} is missing",
            hint="run `eemini kernel --update-config` and commit kernel/config")  # fmt: skip


def _source_tarball(apt: Apt, pkg: Package, dest: Path) -> Path:
    """The upstream tarball inside the pinned linux-source package (usr/src/linux-source-X.Y.tar.xz),
    copied out of the verified .deb into dest."""
    deb = fetch(apt, pkg.name, pkg.version, pkg.sha256)
    find_tool("dpkg-deb", "to read the kernel source package", "dpkg")
    target = dest / "linux.tar.xz"
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", os.fspath(deb)], stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as proc:  # fmt: skip
        assert proc.stdout is not None
        names = []
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if re.fullmatch(r"(\./)?usr/src/linux-source-[0-9.]+\.tar\.xz", member.name):
                    names.append(member.name)
                    source = tar.extractfile(member)
                    assert source is not None
                    with target.open("wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
    if proc.returncode != 0 or len(names) != 1:
        die(f"{pkg.label} does not hold exactly one source tarball under /usr/src "
            f"(found {names}, dpkg-deb exit status {proc.returncode})")  # fmt: skip
    return target


def _prepare_config(tree: Path, work: Path, options: list[Option], log: Path) -> str:
    """Unpack the source into work/linux and configure it; the resolved .config."""
    (work / "fragment.config").write_text(kconfig_fragment(options))
    script = "; ".join([
        "cd /build", "mkdir linux", "tar -C linux --strip-components=1 -xJf linux.tar.xz",
        "rm linux.tar.xz", "cd linux",
        *[f"patch -p1 --no-backup-if-mismatch < /build/patches/{p.name}" for p in patches()],
        _make(1, "tinyconfig"),
        "scripts/kconfig/merge_config.sh -m -O . .config /build/fragment.config",
        _make(1, "olddefconfig"),
    ])  # fmt: skip
    if patches():
        shutil.copytree(PATCHES, work / "patches")
    _run_logged(_runner(tree, work, script), log, None, "configuring the kernel")
    return (work / "linux" / ".config").read_text()


def _run_logged(argv: list[str], log: Path, progress: Progress | None, what: str) -> None:
    """Run argv with stdout+stderr appended to log; fail naming the log and its last lines."""
    with log.open("ab") as f:
        f.write(f"$ {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if progress is not None:
                progress.line(line)
        code = proc.wait()
    if progress is not None:
        progress.finish()
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        for text in tail:
            log_notice(f"    {text}")
        die(f"{what} failed (exit status {code}); the whole log is {log}")


class Progress:
    """One status line on stderr: steps done of the expected number, elapsed time, the step."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.steps = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.reported = -1

    def line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip()
        m = re.match(r"\s{2}([A-Z0-9_-]+)\s+(\S+)", text)
        if m is None:
            return
        self.steps += 1
        done = min(self.steps * 100 // self.expected, 99)
        elapsed = time.monotonic() - self.start
        status = (f"  [{self.steps:>5}/~{self.expected}] {done:>2}%  "
                  f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}")  # fmt: skip
        if self.tty:
            sys.stderr.write(f"\r\033[K{status}  {m[1]} {m[2]}"[:160])
            sys.stderr.flush()
        elif done // 10 > self.reported:
            self.reported = done // 10
            print(status, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log_step("waiting for another build of the same kernel to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _check_host() -> None:
    find_tool("unshare", "to build the kernel in its own mount namespace", "util-linux")
    find_tool("chroot", "to build the kernel inside the pinned toolchain", "coreutils")
    find_tool("mount", "to prepare the toolchain's /dev, /proc and /tmp", "mount")


def configure(apt: Apt, lock: Lock) -> str:
    """The resolved .config that tinyconfig + the fragment give (for `eemini kernel
    --update-config`); checks the fragment's options, writes nothing in the repository."""
    check_kernel(lock.kernel)
    _check_host()
    options, _ = read_fragment()
    tree = tools_tree(apt, lock)
    base = cache_dir() / "kernel"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".config-") as tmp:
        work = Path(tmp)
        with complete_step(f"Configuring Linux from {lock.kernel.label}"):
            _source_tarball(apt, lock.kernel, work)
            resolved = _prepare_config(tree, work, options, work / "log")
    check_fragment(options, resolved)
    return resolved


def ensure(apt: Apt, lock: Lock) -> Kernel:
    """The kernel for these pins and this configuration: from the cache, or built now."""
    check_kernel(lock.kernel)
    options, fragment = read_fragment()
    resolved = read_resolved()
    check_fragment(options, resolved)  # the committed config must itself satisfy the fragment
    key = cache_key(lock, fragment, resolved)
    base = cache_dir() / "kernel"
    final = base / key
    if not (final / "build.json").is_file():
        with _locked(base / f"{key}.lock"):
            if not (final / "build.json").is_file():
                _build(apt, lock, options, resolved, key=key, final=final)
    else:
        info = json.loads((final / "build.json").read_text())
        log_step(f"Kernel {info['release']} from the cache (built earlier from {lock.kernel.label})")
    info = json.loads((final / "build.json").read_text())
    return Kernel(final, key, str(info["release"]), lock.kernel)


def _build(apt: Apt, lock: Lock, options: list[Option], resolved: str, *, key: str, final: Path) -> None:
    _check_host()
    tree = tools_tree(apt, lock)
    n = jobs()
    minutes = CPU_MINUTES / n + 1
    failed_log = final.parent / f"{key}.failed.log"
    with complete_step(
        f"Building the kernel from {lock.kernel.label} with the pinned toolchain (about "
        f"{minutes:.0f} minutes with {n} jobs; cached afterwards)"
    ):
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".work-{key[:12]}-") as tmp:
            work = Path(tmp)
            log = work / "build.log"
            start = time.monotonic()
            try:
                _source_tarball(apt, lock.kernel, work)
                got = _prepare_config(tree, work, options, log)
                if got != resolved:
                    diff = config_difference(resolved, got)
                    shown = "; ".join(diff[:12]) + (
                        f"; and {len(diff) - 12} more" if len(diff) > 12 else ""
                    )
                    die(
                        "the kernel configuration after olddefconfig differs from the committed "
                        f"kernel/config: {shown}",
                        hint="if this is intended (a new kernel version or fragment), run "
                        "`eemini kernel --update-config`, review the diff of kernel/config and "
                        "commit it",
                    )
                progress = Progress(EXPECTED_STEPS)
                command = f"cd {SRC}; {_make(n, 'bzImage')}"
                _run_logged(_runner(tree, work, command), log, progress, "the kernel build")
                # After the build: kbuild writes it from CONFIG_LOCALVERSION during the build.
                release = (work / "linux/include/config/kernel.release").read_text().strip()
            except BaseException:
                if log.exists():
                    shutil.copyfile(log, failed_log)
                    log_notice(f"  the build log is kept at {failed_log}")
                raise
            elapsed = time.monotonic() - start
            result = work / "result"
            result.mkdir()
            bz = work / "linux/arch/x86/boot/bzImage"
            shutil.copyfile(bz, result / "bzImage")
            (result / "config").write_text(got)
            info: dict[str, Any] = {
                "release": release,
                "source": {
                    "name": lock.kernel.name,
                    "version": lock.kernel.version,
                    "sha256": lock.kernel.sha256,
                },
                "toolchain": toolchain_key(lock.toolchain),
                "config_sha256": hashlib.sha256(got.encode()).hexdigest(),
                "options_on": len(enabled_options(got)),
                "bzimage_sha256": hashlib.sha256((result / "bzImage").read_bytes()).hexdigest(),
                "bzimage_size": (result / "bzImage").stat().st_size,
                "build_seconds": round(elapsed, 1),
                "jobs": n,
                "steps": progress.steps,
            }
            shutil.copyfile(log, result / "build.log")
            (result / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(result, final)
            failed_log.unlink(missing_ok=True)
        log_notice(
            f"  Linux {release}: bzImage {info['bzimage_size'] / (1 << 20):.2f} MiB, "
            f"{info['options_on']} options on, built in {elapsed / 60:.1f} min"
        )
