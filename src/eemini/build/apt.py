"""Fetch pinned Debian packages through apt with a private configuration, into a verified cache.

The mirror is read from the host's own apt sources at run time (no mirror host is written
anywhere); the package lists, the apt state and the downloaded `.deb`s live in the user's cache
directory, never in the host's apt state and never in the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from eemini.log import complete_step, die, log_debug
from eemini.proc import find_tool, run, sha256_file

# The Debian release the image is built from, and the suites searched for it: point releases,
# security updates, and backports (the kernel source: Linux >= 6.16 for the TSM measurement ABI is
# only in trixie-backports; docs/kernel.md). apt ranks backports below the release (priority 100),
# so a package the release has is resolved from the release.
SUITE = "trixie"
BACKPORTS = f"{SUITE}-backports"
ARCH = "amd64"


def cache_dir() -> Path:
    """Where downloads are kept: $EEMINI_CACHE_DIR, else $XDG_CACHE_HOME/eemini, else ~/.cache/eemini."""
    if env := os.environ.get("EEMINI_CACHE_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "eemini"
    return Path.home() / ".cache" / "eemini"


@dataclasses.dataclass(frozen=True)
class Source:
    uri: str
    signed_by: str | None
    security: bool


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key is not None:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            yield fields


def host_sources(etc: Path = Path("/etc/apt")) -> list[Source]:
    """The Debian archive URIs the host's apt is configured with (deb822 and one-line formats)."""
    found: list[Source] = []
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for para in _deb822_paragraphs(path.read_text()):
            if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes") == "no":
                continue
            suites = para.get("Suites", "").split()
            for uri in para.get("URIs", "").split():
                found.append(
                    Source(
                        uri.rstrip("/"),
                        para.get("Signed-By"),
                        any(s.endswith("-security") for s in suites),
                    )
                )
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            m = re.match(r"\s*deb\s+(?:\[(?P<opts>[^]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)", line)
            if not m:
                continue
            signed = re.search(r"signed-by=(\S+)", m["opts"] or "")
            found.append(
                Source(
                    m["uri"].rstrip("/"), signed[1] if signed else None, m["suite"].endswith("-security")
                )
            )
    # Only Debian's own archive layout is useful here (the security archive is a separate tree).
    return [s for s in found if s.uri.startswith(("http://", "https://", "file:"))]


def sources_list(sources: list[Source]) -> str:
    main = next((s for s in sources if not s.security), None)
    if main is None:
        die(
            "the host's apt sources name no Debian archive to fetch packages from",
            hint="configure a Debian mirror in /etc/apt/sources.list.d/*.sources",
        )
    security = next((s for s in sources if s.security), None)
    lines = []
    for src, suite in ((main, SUITE), (main, BACKPORTS), (security, f"{SUITE}-security")):
        if src is None:
            continue
        opts = f"[arch={ARCH} signed-by={src.signed_by}] " if src.signed_by else f"[arch={ARCH}] "
        lines.append(f"deb {opts}{src.uri} {suite} main\n")
    return "".join(lines)


class Apt:
    """apt-get/apt-cache with a private state under the cache directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / "apt"
        self.updated = False

    def _options(self) -> list[str]:
        etc = self.root / "etc"
        return [
            f"-oDir::Etc::sourcelist={etc / 'sources.list'}",
            "-oDir::Etc::sourceparts=-",
            "-oDir::Etc::preferencesparts=-",
            f"-oDir::Etc::preferences={etc / 'preferences'}",
            f"-oDir::State={self.root / 'state'}",
            f"-oDir::State::Lists={self.root / 'lists'}",
            f"-oDir::State::status={etc / 'status'}",
            f"-oDir::Cache={self.root / 'cache'}",
            f"-oDir::Cache::Archives={self.root / 'archives'}",
            "-oDir::Cache::pkgcache=",
            "-oDir::Cache::srcpkgcache=",
            f"-oAPT::Architecture={ARCH}",
            f"-oAPT::Architectures={ARCH}",
            "-oAPT::Get::List-Cleanup=0",
            "-oDebug::NoLocking=1",
            "-oAcquire::Languages=none",
            # Downloads go to a root-owned temporary directory the _apt user cannot write.
            "-oAPT::Sandbox::User=root",
        ]

    def _prepare(self) -> None:
        etc = self.root / "etc"
        for d in (etc, self.root / "state", self.root / "lists" / "partial", self.root / "cache",
                  self.root / "archives" / "partial"):  # fmt: skip
            d.mkdir(parents=True, exist_ok=True)
        (etc / "sources.list").write_text(sources_list(host_sources()))
        (etc / "preferences").touch()
        (etc / "status").touch()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize apt runs of concurrent builds sharing the cache (apt's own locking is off)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def update(self) -> None:
        find_tool("apt-get", "to fetch the pinned Debian packages", "apt")
        with self.locked(), complete_step(f"Refreshing the Debian {SUITE} package lists"):
            self._prepare()
            run(["apt-get", "-q", *self._options(), "update"], capture=True)
        self.updated = True

    def have_lists(self) -> bool:
        return any((self.root / "lists").glob("*_Packages*"))

    def show(
        self, name: str, version: str | None = None, release: str | None = None
    ) -> dict[str, str] | None:
        """The package record of name=version (or the candidate, from `release` first when given:
        e.g. BACKPORTS, which apt otherwise ranks below the release), None when the lists lack it."""
        if not self.have_lists():
            self.update()
        spec = f"{name}={version}" if version else name
        prefer = [f"-oAPT::Default-Release={release}"] if release else []
        with self.locked():
            self._prepare()
            proc = run(["apt-cache", *self._options(), *prefer, "show", "--no-all-versions", spec],
                       capture=True, check=False)  # fmt: skip
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        paras = list(_deb822_paragraphs(proc.stdout.decode()))
        return paras[0] if paras else None

    def closure(self, names: list[str]) -> list[tuple[str, str, str, int]]:
        """(name, version, sha256, size) of every package an install of `names` into an empty
        system takes (dependencies resolved, no Recommends), sorted by name."""
        if not self.have_lists():
            self.update()
        base = ["apt-get", "-qq", *self._options(), "-oAcquire::ForceHash=SHA256", "install",
                "--no-install-recommends"]  # fmt: skip
        with self.locked():
            self._prepare()
            plan = run([*base, "--simulate", *names], capture=True, check=False)
            uris = run([*base, "--print-uris", *names], capture=True, check=False)
        for proc in (plan, uris):
            if proc.returncode != 0:
                err = proc.stderr.decode(errors="replace").strip().splitlines()
                die(f"apt cannot resolve {' '.join(names)}: {err[-1] if err else 'no reason given'}")
        # "Inst NAME (VERSION SUITES [ARCH])": the version with its epoch, which file names lack.
        versions = dict(re.findall(r"^Inst (\S+) \((\S+) ", plan.stdout.decode(), re.MULTILINE))
        # "'URI' NAME_VERSION_ARCH.deb SIZE SHA256:HEX"
        hashes = {
            m[1]: (m[3], int(m[2]))
            for m in re.finditer(
                r"^'[^']*' ([^_\s]+)_\S+\.deb (\d+) SHA256:([0-9a-f]{64})$",
                uris.stdout.decode(),
                re.MULTILINE,
            )
        }
        if not versions or set(versions) != set(hashes):
            die(
                f"apt's plan and download list for {' '.join(names)} disagree: "
                f"{sorted(set(versions) ^ set(hashes)) or 'no packages at all'}"
            )
        return [(n, versions[n], *hashes[n]) for n in sorted(versions)]

    def download(self, name: str, version: str, dest: Path) -> Path:
        """Download name=version into dest (a directory); return the file apt wrote."""
        with self.locked():
            self._prepare()
            proc = run(["apt-get", "-q", *self._options(), "download", f"{name}={version}"],
                       capture=True, check=False, cwd=dest)  # fmt: skip
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            die(
                f"apt could not download {name} {version}: {err[-1] if err else 'no reason given'}",
                hint="if the Debian archive no longer offers this version, run `eemini lock --update` "
                "to pin what it offers now (this changes the image and its measurements)",
            )
        debs = list(dest.glob("*.deb"))
        if len(debs) != 1:
            die(f"apt download of {name} {version} left {len(debs)} files instead of one .deb")
        return debs[0]


def fetch(apt: Apt, name: str, version: str, sha256: str) -> Path:
    """The cached .deb of name=version, downloading and verifying it first when needed.

    The cache is content-addressed (debs/<sha256>.deb); a file enters it only after its hash
    matched the lock, so a bad download never stays around.
    """
    debs = apt.root.parent / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    final = debs / f"{sha256}.deb"
    if final.is_file():
        if sha256_file(final) == sha256:
            return final
        log_debug(f"removing corrupted cache entry {final}")
        final.unlink()
    if not apt.updated and apt.show(name, version) is None:
        apt.update()
    with (
        complete_step(f"Downloading {name} {version}"),
        tempfile.TemporaryDirectory(dir=debs, prefix=".partial-") as tmp,
    ):
        got = apt.download(name, version, Path(tmp))
        actual = sha256_file(got)
        if actual != sha256:
            die(
                f"{name} {version} downloaded with sha256 {actual}, but the lock file pins {sha256}",
                hint="the download was discarded; if the archive really changed this package, "
                "review it and run `eemini lock --update`, otherwise check the mirror and retry",
            )
        os.replace(got, final)
    return final


def fetch_all(apt: Apt, packages: list[tuple[str, str, str]], what: str) -> dict[str, Path]:
    """fetch() for many packages (name, version, sha256) at once: those not in the cache come in one
    apt run. {sha256: cached .deb}."""
    debs = apt.root.parent / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for name, version, sha256 in packages:
        final = debs / f"{sha256}.deb"
        if final.is_file() and sha256_file(final) == sha256:
            found[sha256] = final
        else:
            final.unlink(missing_ok=True)
            missing.append((name, version, sha256))
    if not missing:
        return found
    if not apt.updated:
        apt.update()
    with (
        complete_step(f"Downloading {len(missing)} packages for {what}"),
        tempfile.TemporaryDirectory(dir=debs, prefix=".partial-") as tmp,
    ):
        with apt.locked():
            apt._prepare()
            proc = run(["apt-get", "-q", *apt._options(), "download",
                        *(f"{n}={v}" for n, v, _ in missing)],
                       capture=True, check=False, cwd=tmp)  # fmt: skip
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            die(
                f"apt could not download the packages for {what}: "
                f"{err[-1] if err else 'no reason given'}",
                hint="if the Debian archive no longer offers these versions, run `eemini lock --update` "
                "to pin what it offers now (this changes the image and its measurements)",
            )
        got = {sha256_file(f): f for f in Path(tmp).glob("*.deb")}
        for name, version, sha256 in missing:
            if sha256 not in got:
                die(
                    f"{name} {version} downloaded with another sha256 than the lock file pins "
                    f"({sha256})",
                    hint="the downloads were discarded; if the archive really changed this package, "
                    "review it and run `eemini lock --update`, otherwise check the mirror and retry",
                )
            os.replace(got[sha256], debs / f"{sha256}.deb")
            found[sha256] = debs / f"{sha256}.deb"
    return found


def clear_lists(apt: Apt) -> None:
    shutil.rmtree(apt.root / "lists", ignore_errors=True)
