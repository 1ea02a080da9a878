"""Assemble a Unified Kernel Image: the pinned systemd-stub plus our sections appended.

PE/COFF layout: Microsoft PE Format specification, as eemini.tdx.pe describes it; UKI
sections: UAPI Group "Unified Kernel Image" specification. Like ukify, but without pefile and
without timestamps: the stub's TimeDateStamp is zeroed and the CheckSum recomputed.
"""

from __future__ import annotations

import array
import struct
import sys

from eemini.log import die
from eemini.tdx import pe

# In file order, as ukify writes them; the kernel last (largest, and the stub does not care).
SECTION_ORDER = (".osrel", ".cmdline", ".uname", ".initrd", ".linux")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def pe_checksum(image: bytes | bytearray) -> int:
    """The PE optional-header CheckSum (with the field itself zeroed): the 16-bit words summed
    with end-around carry, plus the file length. One's-complement addition is associative, so
    summing everything first and folding the carries afterwards gives the same value."""
    words = array.array("H")
    words.frombytes(bytes(image) + b"\0" * (len(image) % 2))
    if sys.byteorder != "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(image)) & 0xFFFFFFFF


def assemble(stub: bytes, payloads: dict[str, bytes]) -> bytes:
    """The stub with one new section per payload (names from SECTION_ORDER)."""
    unknown = set(payloads) - set(SECTION_ORDER)
    if unknown:
        raise ValueError(f"unknown UKI sections {sorted(unknown)}")
    try:
        image = pe.parse_pe(stub)
    except pe.PeError as e:
        die(f"the systemd-stub is not a PE image the firmware would load: {e}")
    if not image.pe32_plus:
        die("the systemd-stub is not a PE32+ image")
    if image.certificate_table_size:
        die("the systemd-stub is already signed; a UKI must be assembled from the unsigned stub",
            hint="use the stub from systemd-boot-efi, not from a -signed package")  # fmt: skip
    present = {s.name for s in image.sections} & set(payloads)
    if present:
        die(f"the systemd-stub already has the sections {sorted(present)}")
    count, headers = len(image.sections), image.size_of_headers
    table_end = image.section_table_offset + (count + len(payloads)) * pe.SECTION_HEADER_SIZE
    first_raw = min((s.pointer_to_raw_data for s in image.sections if s.size_of_raw_data),
                    default=headers)  # fmt: skip
    if table_end > min(headers, first_raw):
        die(f"no room in the stub's PE headers for {len(payloads)} more section headers "
            f"(table would end at {table_end:#x}, headers end at {headers:#x})")  # fmt: skip
    raw_end = max((s.pointer_to_raw_data + s.size_of_raw_data for s in image.sections),
                  default=headers)  # fmt: skip
    if len(stub) > raw_end:
        die(f"the systemd-stub has {len(stub) - raw_end} bytes after its last section; "
            "refusing to append")  # fmt: skip
    va_end = max(s.virtual_address + s.virtual_size for s in image.sections)
    out = bytearray(stub[:raw_end])
    opt = image.optional_header_offset
    init_data_at = opt + pe.SIZE_OF_INITIALIZED_DATA_OFFSET
    init_data = struct.unpack_from("<I", out, init_data_at)[0]
    index = count
    for name in SECTION_ORDER:
        if name not in payloads:
            continue
        data = payloads[name]
        va = _align(va_end, image.section_alignment)
        raw_ptr = _align(len(out), image.file_alignment)
        raw_size = _align(len(data), image.file_alignment)
        out += b"\0" * (raw_ptr - len(out))
        out += data + b"\0" * (raw_size - len(data))
        # VirtualSize is the exact payload length: the stub measures (PCR 11 / RTMR2) and loads
        # VirtualSize bytes, so no padding may leak into what is hashed (systemd#34583).
        pe.SECTION_HEADER.pack_into(
            out, image.section_table_offset + index * pe.SECTION_HEADER_SIZE,
            name.encode().ljust(8, b"\0"), len(data), va, raw_size, raw_ptr, 0, 0, 0, 0,
            pe.IMAGE_SCN_CNT_INITIALIZED_DATA | pe.IMAGE_SCN_MEM_READ,
        )  # fmt: skip
        init_data += raw_size
        va_end = va + len(data)
        index += 1
    # TimeDateStamp 0: the image is a pure function of its inputs.
    machine, _, _, _, _, optsize, chars = pe.COFF_HEADER.unpack_from(out, image.coff_offset)
    pe.COFF_HEADER.pack_into(out, image.coff_offset, machine, index, 0, 0, 0, optsize, chars)
    struct.pack_into("<I", out, init_data_at, init_data & 0xFFFFFFFF)
    struct.pack_into("<I", out, opt + pe.SIZE_OF_IMAGE_OFFSET, _align(va_end, image.section_alignment))
    struct.pack_into("<I", out, image.checksum_offset, 0)
    struct.pack_into("<I", out, image.checksum_offset, pe_checksum(out))
    return bytes(out)


def os_release(version: str, profile: str) -> bytes:
    return (
        "ID=eemini\n"
        'NAME="EasyEnclave Mini"\n'
        f"VERSION_ID={version}\n"
        f'PRETTY_NAME="EasyEnclave Mini {version} ({profile})"\n'
        f"IMAGE_ID={profile}\n"
    ).encode()
