"""The initramfs as an in-memory tree: every entry with its bytes, mode and origin (for the SBOM)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from enum import StrEnum
from pathlib import PurePosixPath

from eemini.log import die


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHARDEV = "chardev"


class Source(StrEnum):
    DEBIAN = "debian"  # bytes from a pinned Debian package (possibly compiled from it: .pyc)
    PROJECT = "project"  # this project: the guest runtime, /init, image facts
    WORKLOAD = "workload"  # the user's: the workload binary and the resolved spec


@dataclasses.dataclass(frozen=True)
class Origin:
    source: Source
    package: str | None = None
    version: str | None = None
    derived_from: str | None = None  # e.g. the .py a .pyc was compiled from

    def to_json(self) -> dict[str, str]:
        doc = {"source": self.source.value}
        if self.package:
            doc["package"] = self.package
        if self.version:
            doc["version"] = self.version
        if self.derived_from:
            doc["derived_from"] = self.derived_from
        return doc


PROJECT = Origin(Source.PROJECT)


@dataclasses.dataclass(frozen=True)
class Entry:
    path: str  # absolute, normalised, in the image
    kind: Kind
    mode: int  # permission bits only
    origin: Origin
    data: bytes = b""  # file contents, or the symlink target
    rdev: tuple[int, int] = (0, 0)
    category: str = "other"  # size breakdown bucket

    @property
    def size(self) -> int:
        return len(self.data)

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _norm(path: str | PurePosixPath) -> str:
    p = PurePosixPath("/") / PurePosixPath(path)
    text = p.as_posix()
    if ".." in p.parts or "//" in text:
        die(f"refusing the image path {path!s}: it is not a plain absolute path")
    return text


class Tree:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str, origin: Origin, category: str) -> None:
        parent = PurePosixPath(path).parent
        chain = []
        while parent.as_posix() != "/":
            chain.append(parent.as_posix())
            parent = parent.parent
        for d in reversed(chain):
            existing = self.entries.get(d)
            if existing is None:
                self.entries[d] = Entry(d, Kind.DIR, 0o755, origin, category=category)
            elif existing.kind is not Kind.DIR:
                die(f"image path {d} is a {existing.kind.value}, but {path} needs it to be a directory")

    def add(self, entry: Entry) -> None:
        path = _norm(entry.path)
        if path != entry.path:
            entry = dataclasses.replace(entry, path=path)
        old = self.entries.get(path)
        if old is not None and old != entry and not (old.kind is Kind.DIR and entry.kind is Kind.DIR):
            die(f"two different entries for {path} in the image ({old.origin} and {entry.origin})")
        self._parents(path, PROJECT, "layout")
        if old is None or old.kind is not Kind.DIR:
            self.entries[path] = entry

    def file(
        self, path: str, data: bytes, origin: Origin, category: str, executable: bool = False
    ) -> None:
        self.add(Entry(path, Kind.FILE, 0o755 if executable else 0o644, origin, data, category=category))

    def symlink(self, path: str, target: str, origin: Origin, category: str) -> None:
        self.add(Entry(path, Kind.SYMLINK, 0o777, origin, target.encode(), category=category))

    def dir(self, path: str, origin: Origin = PROJECT, mode: int = 0o755) -> None:
        self.add(Entry(path, Kind.DIR, mode, origin, category="layout"))

    def chardev(self, path: str, major: int, minor: int, mode: int) -> None:
        self.add(Entry(path, Kind.CHARDEV, mode, PROJECT, rdev=(major, minor), category="layout"))

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self.entries

    def sorted(self) -> Iterator[Entry]:
        """Parents before children, siblings by name: the order the archive is written in."""
        for key in sorted(self.entries, key=lambda p: PurePosixPath(p).parts):
            yield self.entries[key]
