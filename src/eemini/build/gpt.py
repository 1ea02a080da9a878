"""A GPT disk with one EFI System Partition (UEFI 2.10, section 5.3), deterministic.

GUIDs are derived from the content (so two builds of the same image agree and two different
images differ); the protective MBR follows section 5.2.3.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib

SECTOR = 512
ENTRIES = 128
ENTRY_SIZE = 128
ENTRY_SECTORS = ENTRIES * ENTRY_SIZE // SECTOR  # 32
ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
ALIGN = 2048  # partitions start on 1 MiB boundaries
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert HEADER.size == 92


def derived_guid(label: str, digest: str) -> uuid.UUID:
    return uuid.UUID(bytes=hashlib.sha256(f"{label}:{digest}".encode()).digest()[:16], version=4)


def _header(my: int, alt: int, first: int, last: int, disk: uuid.UUID, *, entries_lba: int,
            crc: int) -> bytes:  # fmt: skip
    fields = [b"EFI PART", 0x00010000, HEADER.size, 0, 0, my, alt, first, last, disk.bytes_le,
              entries_lba, ENTRIES, ENTRY_SIZE, crc]  # fmt: skip
    raw = HEADER.pack(*fields)
    fields[3] = zlib.crc32(raw)
    return HEADER.pack(*fields).ljust(SECTOR, b"\0")


def make(disk_bytes: int, esp: bytes | bytearray, digest: str) -> tuple[bytes, bytes, int]:
    """(head, tail, esp_offset): the bytes before the ESP and the backup GPT at the disk's end.

    The caller writes head at 0, the ESP at esp_offset and tail at disk_bytes - len(tail).
    """
    total = disk_bytes // SECTOR
    if disk_bytes % SECTOR:
        raise ValueError("disk size must be a whole number of sectors")
    last_lba = total - 1
    first_usable = 2 + ENTRY_SECTORS
    last_usable = last_lba - 1 - ENTRY_SECTORS
    esp_first = ALIGN
    esp_last = esp_first + len(esp) // SECTOR - 1
    if esp_last > last_usable:
        raise ValueError("the ESP does not fit on the disk")
    disk_guid = derived_guid("disk", digest)
    part_guid = derived_guid("esp", digest)
    name = "EFI System Partition".encode("utf-16-le").ljust(72, b"\0")
    entry = struct.pack(
        "<16s16sQQQ72s", ESP_TYPE.bytes_le, part_guid.bytes_le, esp_first, esp_last, 0, name
    )
    entries = entry.ljust(ENTRIES * ENTRY_SIZE, b"\0")
    crc = zlib.crc32(entries)

    mbr = bytearray(SECTOR)
    # One partition of type 0xEE covering the disk (capped at 2^32-1 sectors), CHS fields as
    # the spec gives them: start 0x000200, end 0xFFFFFF.
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                     min(total - 1, 0xFFFFFFFF))  # fmt: skip
    mbr[510:512] = b"\x55\xaa"
    primary = _header(1, last_lba, first_usable, last_usable, disk_guid, entries_lba=2, crc=crc)
    backup = _header(last_lba, 1, first_usable, last_usable, disk_guid,
                     entries_lba=last_lba - ENTRY_SECTORS, crc=crc)  # fmt: skip
    head = bytes(mbr) + primary + entries
    tail = entries + backup
    return head, tail, esp_first * SECTOR
