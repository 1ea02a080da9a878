"""Disk images around the UKI: a GPT disk with one ESP, and the per-cloud container formats."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tarfile
import uuid
from pathlib import Path

from eemini.build import fat, gpt
from eemini.proc import find_tool, run

MIB = 1 << 20
GIB = 1 << 30
ESP_MIN_MIB = 64
BOOT_PATH = "EFI/BOOT/BOOTX64.EFI"  # the removable-media default path (UEFI 2.10, 3.5.1.1)


def esp_size(uki_size: int) -> int:
    # Room for the UKI plus slack, never below what FAT32 with 512-byte clusters needs.
    return max(ESP_MIN_MIB, (uki_size + 8 * MIB + MIB - 1) // MIB) * MIB


def raw_disk(path: Path, uki: bytes, *, min_size: int = 0, align: int = MIB) -> int:
    """Write a GPT disk with the UKI at EFI/BOOT/BOOTX64.EFI; return its size in bytes."""
    digest = hashlib.sha256(uki).hexdigest()
    esp_bytes = esp_size(len(uki))
    size = max(min_size, esp_bytes + 2 * MIB)  # 1 MiB before the ESP, 1 MiB for the backup GPT
    size = (size + align - 1) // align * align
    volume_id = int.from_bytes(hashlib.sha256(f"volume:{digest}".encode()).digest()[:4], "little")
    esp = fat.make(esp_bytes // fat.SECTOR, {BOOT_PATH: uki}, volume_id, gpt.ALIGN)
    head, tail, esp_offset = gpt.make(size, esp, digest)
    with path.open("wb") as f:
        f.truncate(size)  # sparse where the file system allows
        f.write(head)
        f.seek(esp_offset)
        f.write(esp)
        f.seek(size - len(tail))
        f.write(tail)
    return size


def qcow2(raw: Path, out: Path) -> None:
    find_tool("qemu-img", "to write qcow2 images", "qemu-utils")
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out])


# VHD footer: "Virtual Hard Disk Image Format Specification" (Microsoft, v1.0), big-endian.
VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert VHD_FOOTER.size == 512


def _chs(size: int) -> tuple[int, int, int]:
    """The spec's CHS calculation (appendix "CHS Calculation")."""
    sectors = min(size // 512, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def vhd_footer(size: int, digest: str) -> bytes:
    cyl, heads, spt = _chs(size)
    unique = uuid.UUID(bytes=hashlib.sha256(f"vhd:{digest}".encode()).digest()[:16], version=4)
    # Creator "win ": tools (Hyper-V, Azure, qemu's vpc driver) then take the size from the
    # footer instead of the CHS geometry, which cannot express every 1 MiB multiple.
    fields = [b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF, 0, b"win ", 0x000A0000, b"Wi2k",
              size, size, cyl, heads, spt, 2, 0, unique.bytes, 0, b""]  # fmt: skip
    raw = VHD_FOOTER.pack(*fields)
    fields[14] = ~sum(raw) & 0xFFFFFFFF
    return VHD_FOOTER.pack(*fields)


def vhd(raw: Path, out: Path, digest: str) -> None:
    """A fixed VHD: the raw disk (its size a whole number of MiB, as Azure requires) + footer."""
    size = raw.stat().st_size
    assert size % MIB == 0
    with raw.open("rb") as src, out.open("wb") as dst:
        dst.truncate(size)
        while chunk := src.read(MIB):
            if chunk.count(0) != len(chunk):
                dst.seek(src.tell() - len(chunk))
                dst.write(chunk)
        dst.seek(size)
        dst.write(vhd_footer(size, digest))


def gce_tarball(raw: Path, out: Path) -> None:
    """disk.raw in a gzip'd GNU tar, as GCE image import expects, with no time or owner in it."""
    info = tarfile.TarInfo("disk.raw")
    info.size = raw.stat().st_size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with (
        out.open("wb") as f,
        gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
        raw.open("rb") as src,
    ):
        tar.addfile(info, src)
