"""Assemble a Unified Kernel Image: the pinned systemd-stub plus our sections appended.

PE/COFF layout: Microsoft PE Format specification ("Optional Header", "Section Table"); UKI
sections: UAPI Group "Unified Kernel Image" specification. Like ukify, but without pefile and
without timestamps: the stub's TimeDateStamp is zeroed and the CheckSum recomputed.
"""

from __future__ import annotations

import array
import dataclasses
import struct
import sys

from eemini.log import die

DOS_LFANEW = 0x3C
COFF = struct.Struct("<HHIIIHH")  # Machine NumberOfSections TimeDateStamp PtrSym NumSym SizeOptHdr Chars
SECTION = struct.Struct(
    "<8sIIIIIIHHI"
)  # Name VirtualSize VirtualAddress SizeOfRawData PointerToRawData ...
assert (COFF.size, SECTION.size) == (20, 40)
PE32PLUS = 0x20B
# Optional header (PE32+) field offsets.
OPT_SIZE_OF_INIT_DATA = 8
OPT_SECTION_ALIGNMENT = 32
OPT_FILE_ALIGNMENT = 36
OPT_SIZE_OF_IMAGE = 56
OPT_SIZE_OF_HEADERS = 60
OPT_CHECKSUM = 64
OPT_NUMBER_OF_RVA = 108
OPT_DATA_DIRS = 112
DIR_SECURITY = 4  # the certificate table: present only in signed images
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x00000040
IMAGE_SCN_MEM_READ = 0x40000000

# In file order, as ukify writes them; the kernel last (largest, and the stub does not care).
SECTION_ORDER = (".osrel", ".cmdline", ".uname", ".initrd", ".linux")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    virtual_size: int
    virtual_address: int
    raw_size: int
    raw_pointer: int


def sections(image: bytes) -> list[Section]:
    pe = struct.unpack_from("<I", image, DOS_LFANEW)[0]
    if image[pe : pe + 4] != b"PE\0\0":
        raise ValueError("not a PE image (no PE signature)")
    _, count, _, _, _, optsize, _ = COFF.unpack_from(image, pe + 4)
    table = pe + 4 + COFF.size + optsize
    out = []
    for i in range(count):
        name, vsize, va, rsize, rptr, *_ = SECTION.unpack_from(image, table + i * SECTION.size)
        out.append(Section(name.rstrip(b"\0").decode(), vsize, va, rsize, rptr))
    return out


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
    out = bytearray(stub)
    pe = struct.unpack_from("<I", out, DOS_LFANEW)[0]
    if out[pe : pe + 4] != b"PE\0\0":
        die("the systemd-stub is not a PE image (no PE signature)")
    coff = pe + 4
    machine, count, _, _, _, optsize, chars = COFF.unpack_from(out, coff)
    opt = coff + COFF.size
    if struct.unpack_from("<H", out, opt)[0] != PE32PLUS:
        die("the systemd-stub is not a PE32+ image")
    nrva = struct.unpack_from("<I", out, opt + OPT_NUMBER_OF_RVA)[0]
    if nrva > DIR_SECURITY and struct.unpack_from("<II", out, opt + OPT_DATA_DIRS + 8 * DIR_SECURITY)[1]:
        die("the systemd-stub is already signed; a UKI must be assembled from the unsigned stub",
            hint="use the stub from systemd-boot-efi, not from a -signed package")  # fmt: skip
    salign, falign = struct.unpack_from("<II", out, opt + OPT_SECTION_ALIGNMENT)
    headers_size = struct.unpack_from("<I", out, opt + OPT_SIZE_OF_HEADERS)[0]
    existing = sections(stub)
    present = {s.name for s in existing} & set(payloads)
    if present:
        die(f"the systemd-stub already has the sections {sorted(present)}")
    table = opt + optsize
    table_end = table + (count + len(payloads)) * SECTION.size
    first_raw = min((s.raw_pointer for s in existing if s.raw_size), default=headers_size)
    if table_end > min(headers_size, first_raw):
        die(f"no room in the stub's PE headers for {len(payloads)} more section headers "
            f"(table would end at {table_end:#x}, headers end at {headers_size:#x})")  # fmt: skip
    raw_end = max((s.raw_pointer + s.raw_size for s in existing), default=headers_size)
    if len(out) > raw_end:
        die(
            f"the systemd-stub has {len(out) - raw_end} bytes after its last section; refusing to append"
        )
    va_end = max(s.virtual_address + s.virtual_size for s in existing)
    del out[raw_end:]
    index = count
    init_data = struct.unpack_from("<I", out, opt + OPT_SIZE_OF_INIT_DATA)[0]
    for name in SECTION_ORDER:
        if name not in payloads:
            continue
        data = payloads[name]
        va = _align(va_end, salign)
        raw_ptr = _align(len(out), falign)
        raw_size = _align(len(data), falign)
        out += b"\0" * (raw_ptr - len(out))
        out += data + b"\0" * (raw_size - len(data))
        # VirtualSize is the exact payload length: the stub measures (PCR 11 / RTMR2) and loads
        # VirtualSize bytes, so no padding may leak into what is hashed (systemd#34583).
        SECTION.pack_into(out, table + index * SECTION.size, name.encode().ljust(8, b"\0"), len(data),
                          va, raw_size, raw_ptr, 0, 0, 0, 0,
                          IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ)  # fmt: skip
        init_data += raw_size
        va_end = va + len(data)
        index += 1
    # TimeDateStamp 0: the image is a pure function of its inputs.
    COFF.pack_into(out, coff, machine, index, 0, 0, 0, optsize, chars)
    struct.pack_into("<I", out, opt + OPT_SIZE_OF_INIT_DATA, init_data & 0xFFFFFFFF)
    struct.pack_into("<I", out, opt + OPT_SIZE_OF_IMAGE, _align(va_end, salign))
    struct.pack_into("<I", out, opt + OPT_CHECKSUM, 0)
    struct.pack_into("<I", out, opt + OPT_CHECKSUM, pe_checksum(out))
    return bytes(out)


def os_release(version: str, profile: str) -> bytes:
    return (
        "ID=eemini\n"
        'NAME="EasyEnclave Mini"\n'
        f"VERSION_ID={version}\n"
        f'PRETTY_NAME="EasyEnclave Mini {version} ({profile})"\n'
        f"IMAGE_ID={profile}\n"
    ).encode()
