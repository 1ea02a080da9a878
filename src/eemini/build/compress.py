"""Initramfs compression. The choice is measured (bench/build.py, docs/build.md):
zstd -19 gives nearly xz's size and decompresses several times faster in the guest."""

from __future__ import annotations

import gzip
import lzma
from enum import StrEnum

from eemini.proc import find_tool, run


class Compression(StrEnum):
    ZSTD = "zstd"
    XZ = "xz"
    GZIP = "gzip"
    NONE = "none"

    @property
    def suffix(self) -> str:
        return {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}[self.value]


DEFAULT = Compression.ZSTD


def compress(data: bytes, method: Compression = DEFAULT, level: int | None = None) -> bytes:
    if method is Compression.ZSTD:
        find_tool("zstd", "to compress the initramfs", "zstd")
        # --single-thread: the multi-threaded code path frames data differently; one thread
        # gives the same bytes everywhere for the same zstd version.
        return run(["zstd", f"-{level or 19}", "--single-thread", "-q", "-c", "--no-progress", "-"],
                   capture=True, input=data).stdout  # fmt: skip
    if method is Compression.XZ:
        # The kernel's XZ decoder wants CRC32 (or none) as the check and only LZMA2 (+BCJ).
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": level or 9}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    if method is Compression.GZIP:
        return gzip.compress(data, compresslevel=level or 9, mtime=0)
    return data
