"""A deterministic cpio "newc" writer (the format the kernel unpacks an initramfs from).

Format: Documentation/driver-api/early-userspace/buffer-format.rst in the Linux tree. Every
entry: owner 0:0, fixed mtime, inode numbers 1.. in archive order, nlink 1 (2 for
directories); no hard links. Like `cpio --reproducible -H newc` with renumbered inodes.
"""

from __future__ import annotations

import stat

from eemini.build.tree import Entry, Kind, Tree

MAGIC = b"070701"
MTIME = 0
_TYPE = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK,
         Kind.CHARDEV: stat.S_IFCHR}  # fmt: skip


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, mode: int, nlink: int, data: bytes, name: str, *, rdev: tuple[int, int]) -> bytes:
    encoded = name.encode() + b"\0"
    # c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor c_devminor
    # c_rdevmajor c_rdevminor c_namesize c_check: 13 fields of 8 hex digits after the magic.
    fields = (ino, mode, 0, 0, nlink, MTIME, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(header) == 110
    return header + encoded + _pad4(len(header) + len(encoded)) + data + _pad4(len(data))


def entry_record(entry: Entry, ino: int) -> bytes:
    name = entry.path.lstrip("/")
    nlink = 2 if entry.kind is Kind.DIR else 1
    return _record(ino, _TYPE[entry.kind] | entry.mode, nlink, entry.data, name, rdev=entry.rdev)


def write(tree: Tree) -> bytes:
    parts = [entry_record(e, ino) for ino, e in enumerate(tree.sorted(), start=1)]
    parts.append(_record(0, 0, 1, b"", "TRAILER!!!", rdev=(0, 0)))
    return b"".join(parts)
