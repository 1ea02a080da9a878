"""A deterministic FAT32 file system holding a few files (the ESP).

Layout from Microsoft's "FAT: General Overview of On-Disk Format" (v1.03): BPB, FSInfo, backup
boot sector at 6, two FATs, root directory in cluster 2. 512-byte sectors and clusters (the
spec's own choice for FAT32 volumes up to 260 MB). Short 8.3 names only, all timestamps fixed.
"""

from __future__ import annotations

import struct

SECTOR = 512
RESERVED = 32
NUM_FATS = 2
MIN_CLUSTERS = 65525  # fewer clusters than this and the volume would be FAT16 by definition
EOC = 0x0FFFFFFF
# 1980-01-01 00:00:00, the FAT epoch: DOS date = (year-1980)<<9 | month<<5 | day.
DOS_DATE = (0 << 9) | (1 << 5) | 1
DOS_TIME = 0
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_VOLUME_ID = 0x08
DIRENT = struct.Struct("<11sBBBHHHHHHHI")
assert DIRENT.size == 32


def _short(name: str) -> bytes:
    base, _, ext = name.upper().partition(".")
    if not (1 <= len(base) <= 8 and len(ext) <= 3) or not (base + ext).isalnum():
        raise ValueError(f"{name!r} is not a plain 8.3 name")
    return base.ljust(8).encode() + ext.ljust(3).encode()


def _dirent(name: bytes, attr: int, cluster: int, size: int) -> bytes:
    return DIRENT.pack(name, attr, 0, 0, DOS_TIME, DOS_DATE, DOS_DATE, cluster >> 16, DOS_TIME,
                       DOS_DATE, cluster & 0xFFFF, size)  # fmt: skip


def fat_sectors(total_sectors: int) -> int:
    # The spec's FATSz computation for FAT32 (section 3.5), with SecPerClus = 1.
    tmp1 = total_sectors - RESERVED
    tmp2 = (256 * 1 + NUM_FATS) // 2
    return (tmp1 + tmp2 - 1) // tmp2


def make(total_sectors: int, files: dict[str, bytes], volume_id: int, hidden_sectors: int,
         label: str = "ESP") -> bytearray:  # fmt: skip
    """A FAT32 image of total_sectors with files ("EFI/BOOT/BOOTX64.EFI" -> bytes)."""
    fatsz = fat_sectors(total_sectors)
    data_start = RESERVED + NUM_FATS * fatsz
    clusters = total_sectors - data_start
    if clusters < MIN_CLUSTERS:
        raise ValueError(f"{total_sectors} sectors are too few for FAT32 ({clusters} clusters)")
    img = bytearray(total_sectors * SECTOR)
    fat = [0x0FFFFFF8, EOC]  # FAT[0]: media byte F8; FAT[1]: end-of-chain marker

    def allocate(nbytes: int) -> int:
        count = max(1, (nbytes + SECTOR - 1) // SECTOR)
        first = len(fat)
        if first + count - 2 > clusters:
            raise ValueError("the files do not fit on the ESP")
        fat.extend(range(first + 1, first + count))
        fat.append(EOC)
        return first

    def write(cluster: int, data: bytes) -> None:
        off = (data_start + cluster - 2) * SECTOR
        img[off : off + len(data)] = data

    # Directory tree: path -> (cluster, entries); directories are created as paths need them.
    dirs: dict[str, tuple[int, list[bytes]]] = {"": (allocate(SECTOR), [])}
    dirs[""][1].append(_dirent(label.upper().ljust(11).encode(), ATTR_VOLUME_ID, 0, 0))

    def directory(path: str) -> int:
        if path not in dirs:
            parent, _, name = path.rpartition("/")
            parent_cluster = directory(parent)
            cluster = allocate(SECTOR)
            # ".." of a directory in the root points to cluster 0, as the spec requires.
            dotdot = 0 if parent == "" else parent_cluster
            dirs[path] = (cluster, [_dirent(b".          ", ATTR_DIRECTORY, cluster, 0),
                                    _dirent(b"..         ", ATTR_DIRECTORY, dotdot, 0)])  # fmt: skip
            dirs[parent][1].append(_dirent(_short(name), ATTR_DIRECTORY, cluster, 0))
        return dirs[path][0]

    for path in sorted(files):
        parent, _, name = path.rpartition("/")
        directory(parent)
        data = files[path]
        cluster = allocate(len(data)) if data else 0
        if data:
            write(cluster, data)
        dirs[parent][1].append(_dirent(_short(name), ATTR_ARCHIVE, cluster, len(data)))
    for cluster, entries in dirs.values():
        if len(entries) * DIRENT.size > SECTOR:
            raise ValueError("too many entries for a one-cluster directory")
        write(cluster, b"".join(entries))

    used = len(fat) - 2
    fat_bytes = struct.pack(f"<{len(fat)}I", *fat)
    for i in range(NUM_FATS):
        off = (RESERVED + i * fatsz) * SECTOR
        img[off : off + len(fat_bytes)] = fat_bytes

    boot = bytearray(SECTOR)
    struct.pack_into(
        "<3s8sHBHBHHBHHHIIIHHIHH12sBBBI11s8s", boot, 0,
        b"\xeb\x58\x90", b"EEMINI  ", SECTOR, 1, RESERVED, NUM_FATS, 0, 0, 0xF8, 0, 63, 255,
        hidden_sectors, total_sectors, fatsz, 0, 0, 2, 1, 6, b"\0" * 12,
        0x80, 0, 0x29, volume_id, label.upper().ljust(11).encode(), b"FAT32   ",
    )  # fmt: skip
    boot[510:512] = b"\x55\xaa"
    fsinfo = bytearray(SECTOR)
    struct.pack_into("<I", fsinfo, 0, 0x41615252)
    struct.pack_into("<III", fsinfo, 484, 0x61417272, clusters - used, len(fat))
    struct.pack_into("<I", fsinfo, 508, 0xAA550000)
    for base in (0, 6):  # primary and backup boot sector + FSInfo
        img[base * SECTOR : (base + 1) * SECTOR] = boot
        img[(base + 1) * SECTOR : (base + 2) * SECTOR] = fsinfo
    return img
