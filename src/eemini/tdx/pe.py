"""PE/COFF parsing and the Authenticode image digest, computed the way UEFI firmware computes it.

The firmware measures every image it loads from outside its own volumes (the UKI from the ESP, and
the kernel that systemd-stub < v258 hands to `LoadImage()`) with the PE Authenticode digest:
edk2 `SecurityPkg/Tcg/Tcg2Dxe/MeasureBootPeCoff.c` and `OvmfPkg/Tcg/TdTcg2Dxe/MeasureBootPeCoff.c`
(`MeasurePeImageAndExtend`, identical algorithm), which follows Microsoft's "Windows Authenticode
Portable Executable Signature Format", "Calculating the PE Image Hash". This module reproduces it
step for step, and reads sections the way the firmware's loader lays them out in memory.

Layouts from the Microsoft PE format specification ("PE Format", sections "MS-DOS Stub", "COFF File
Header", "Optional Header", "Section Table"), all little-endian. They are described here once: the
image builder (eemini.build.uki) reads a stub and writes a UKI with them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class PeError(ValueError):
    """The bytes are not a PE image the firmware would measure (the message says what is wrong)."""


class DigestAlgorithm(StrEnum):
    SHA256 = "sha256"
    SHA384 = "sha384"


# Keep in sync with the PE format specification.
DOS_HEADER_SIZE = 64
E_LFANEW_OFFSET = 0x3C
PE_SIGNATURE = b"PE\0\0"
# Machine, NumberOfSections, TimeDateStamp, PointerToSymbolTable, NumberOfSymbols,
# SizeOfOptionalHeader, Characteristics
COFF_HEADER = struct.Struct("<HHIIIHH")
COFF_HEADER_SIZE = 2 + 2 + 4 + 4 + 4 + 2 + 2
# Name, VirtualSize, VirtualAddress, SizeOfRawData, PointerToRawData, PointerToRelocations,
# PointerToLinenumbers, NumberOfRelocations, NumberOfLinenumbers, Characteristics
SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
SECTION_HEADER_SIZE = 8 + 4 + 4 + 4 + 4 + 4 + 4 + 2 + 2 + 4
assert (COFF_HEADER.size, SECTION_HEADER.size) == (COFF_HEADER_SIZE, SECTION_HEADER_SIZE)
PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B
# Optional-header offsets (the same in PE32 and PE32+ up to CheckSum); the data directories start
# at 96 (PE32) or 112 (PE32+), with NumberOfRvaAndSizes in the 4 bytes before them.
SIZE_OF_INITIALIZED_DATA_OFFSET = 8
SECTION_ALIGNMENT_OFFSET = 32  # FileAlignment follows it
SIZE_OF_IMAGE_OFFSET = 56
SIZE_OF_HEADERS_OFFSET = 60
CHECKSUM_OFFSET = 64
DATA_DIRECTORIES_OFFSET = {PE32_MAGIC: 96, PE32PLUS_MAGIC: 112}
DATA_DIRECTORY_SIZE = 8
MAX_DATA_DIRECTORIES = 16
# Data directory 4 is the Certificate Table (attribute certificates); its "RVA" is a file offset.
CERTIFICATE_TABLE_INDEX = 4
# Section Flags
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x00000040
IMAGE_SCN_MEM_READ = 0x40000000


@dataclass(frozen=True, slots=True)
class PeSection:
    """One section header (the 8-byte short name; long '/n' names are not resolved)."""

    name: str
    virtual_size: int
    virtual_address: int
    size_of_raw_data: int
    pointer_to_raw_data: int


@dataclass(frozen=True, slots=True)
class PeImage:
    """The header facts the Authenticode digest and the loader need."""

    file_size: int
    magic: int
    machine: int
    coff_offset: int
    optional_header_offset: int
    section_table_offset: int
    section_alignment: int
    file_alignment: int
    checksum_offset: int
    number_of_rva_and_sizes: int
    certificate_entry_offset: int | None
    certificate_table_offset: int
    certificate_table_size: int
    size_of_headers: int
    size_of_image: int
    sections: tuple[PeSection, ...]

    @property
    def pe32_plus(self) -> bool:
        return self.magic == PE32PLUS_MAGIC

    def section(self, name: str) -> PeSection | None:
        """The first section with this name, in section-table order (what systemd-stub uses)."""
        for s in self.sections:
            if s.name == name:
                return s
        return None


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _section_name(raw: bytes) -> str:
    name = raw.rstrip(b"\0")
    if b"\0" in name:
        name = name[: name.index(b"\0")]
    return name.decode("ascii", errors="replace")


def parse_pe(data: bytes) -> PeImage:
    """Parse and check the headers of a PE/COFF image; raises PeError naming what is wrong."""
    size = len(data)
    if size < DOS_HEADER_SIZE:
        raise PeError(f"file is too short for a DOS header: {size} bytes, need {DOS_HEADER_SIZE}")
    if data[:2] != b"MZ":
        raise PeError(f"not a PE image: DOS magic is {data[:2].hex()}, expected 4d5a ('MZ')")
    pe = _u32(data, E_LFANEW_OFFSET)
    coff = pe + len(PE_SIGNATURE)
    opt = coff + COFF_HEADER_SIZE
    if opt > size:
        raise PeError(
            f"PE header offset {pe:#x} (e_lfanew) lies beyond the end of the file ({size} bytes)"
        )
    if data[pe:coff] != PE_SIGNATURE:
        raise PeError(
            f"no PE signature at e_lfanew {pe:#x}: found {data[pe:coff].hex()}, expected 50450000"
        )
    machine, number_of_sections, _, _, _, size_of_optional_header, _ = COFF_HEADER.unpack_from(
        data, coff
    )
    if size_of_optional_header < 2 or opt + 2 > size:
        raise PeError(f"optional header is missing (SizeOfOptionalHeader {size_of_optional_header})")
    magic = _u16(data, opt)
    if magic not in DATA_DIRECTORIES_OFFSET:
        raise PeError(
            f"unknown optional header magic {magic:#x}, expected 0x10b (PE32) or 0x20b (PE32+)"
        )
    dirs = DATA_DIRECTORIES_OFFSET[magic]
    if size_of_optional_header < dirs or opt + dirs > size:
        raise PeError(
            f"optional header is truncated: SizeOfOptionalHeader {size_of_optional_header}, "
            f"need at least {dirs} for {'PE32+' if magic == PE32PLUS_MAGIC else 'PE32'}"
        )
    number_of_rva_and_sizes = _u32(data, opt + dirs - 4)
    if number_of_rva_and_sizes > MAX_DATA_DIRECTORIES:
        raise PeError(
            f"NumberOfRvaAndSizes is {number_of_rva_and_sizes}, at most {MAX_DATA_DIRECTORIES}"
        )
    if dirs + number_of_rva_and_sizes * DATA_DIRECTORY_SIZE > size_of_optional_header:
        raise PeError(
            f"{number_of_rva_and_sizes} data directories do not fit in an optional header of "
            f"{size_of_optional_header} bytes"
        )
    section_alignment, file_alignment = struct.unpack_from("<II", data, opt + SECTION_ALIGNMENT_OFFSET)
    size_of_image = _u32(data, opt + SIZE_OF_IMAGE_OFFSET)
    size_of_headers = _u32(data, opt + SIZE_OF_HEADERS_OFFSET)
    sections_at = opt + size_of_optional_header
    sections_end = sections_at + number_of_sections * SECTION_HEADER_SIZE
    if sections_end > size:
        raise PeError(
            f"section table ({number_of_sections} sections at {sections_at:#x}) runs past the end "
            f"of the file ({size} bytes)"
        )
    if size_of_headers > size:
        raise PeError(f"SizeOfHeaders {size_of_headers:#x} is larger than the file ({size} bytes)")
    if size_of_headers < sections_end:
        raise PeError(
            f"SizeOfHeaders {size_of_headers:#x} does not cover the section table, which ends at "
            f"{sections_end:#x}"
        )

    cert_entry: int | None = None
    cert_offset = cert_size = 0
    if number_of_rva_and_sizes > CERTIFICATE_TABLE_INDEX:
        cert_entry = opt + dirs + CERTIFICATE_TABLE_INDEX * DATA_DIRECTORY_SIZE
        cert_offset, cert_size = struct.unpack_from("<II", data, cert_entry)

    sections = []
    for i in range(number_of_sections):
        name, vsize, vaddr, raw_size, raw_ptr, *_ = SECTION_HEADER.unpack_from(
            data, sections_at + i * SECTION_HEADER_SIZE
        )
        section = PeSection(_section_name(name), vsize, vaddr, raw_size, raw_ptr)
        # edk2's loader rejects images whose raw data is not inside the buffer
        # (BasePeCoffLib "Read the last byte to make sure the data is in the image region").
        if raw_size and raw_ptr + raw_size > size:
            raise PeError(
                f"section {i} ({section.name!r}) raw data [{raw_ptr:#x}, {raw_ptr + raw_size:#x}) "
                f"runs past the end of the file ({size} bytes)"
            )
        sections.append(section)

    return PeImage(
        file_size=size,
        magic=magic,
        machine=machine,
        coff_offset=coff,
        optional_header_offset=opt,
        section_table_offset=sections_at,
        section_alignment=section_alignment,
        file_alignment=file_alignment,
        checksum_offset=opt + CHECKSUM_OFFSET,
        number_of_rva_and_sizes=number_of_rva_and_sizes,
        certificate_entry_offset=cert_entry,
        certificate_table_offset=cert_offset,
        certificate_table_size=cert_size,
        size_of_headers=size_of_headers,
        size_of_image=size_of_image,
        sections=tuple(sections),
    )


def _authenticode_ranges(image: PeImage) -> Iterable[tuple[int, int]]:
    """The (start, end) file ranges hashed, in order (MeasurePeImageAndExtend steps 3-15)."""
    after_checksum = image.checksum_offset + 4
    if image.certificate_entry_offset is None:
        # No Certificate Table entry: everything after the checksum up to SizeOfHeaders.
        yield 0, image.checksum_offset
        yield after_checksum, image.size_of_headers
    else:
        yield 0, image.checksum_offset
        yield after_checksum, image.certificate_entry_offset
        yield image.certificate_entry_offset + DATA_DIRECTORY_SIZE, image.size_of_headers
    hashed = image.size_of_headers
    # Sections with raw data, sorted by PointerToRawData (edk2 uses a stable insertion sort).
    for s in sorted(
        (s for s in image.sections if s.size_of_raw_data), key=lambda s: s.pointer_to_raw_data
    ):
        yield s.pointer_to_raw_data, s.pointer_to_raw_data + s.size_of_raw_data
        hashed += s.size_of_raw_data
    # Trailing data after SUM_OF_BYTES_HASHED, minus the attribute certificate table at the end.
    if image.file_size > hashed:
        cert_size = image.certificate_table_size if image.certificate_entry_offset is not None else 0
        if image.file_size < hashed + cert_size:
            raise PeError(
                f"certificate table ({cert_size} bytes) is larger than the {image.file_size - hashed} "
                "bytes after the sections (the firmware refuses such an image)"
            )
        if image.file_size > hashed + cert_size:
            yield hashed, image.file_size - cert_size


def authenticode_digest(
    data: bytes, algorithm: DigestAlgorithm = DigestAlgorithm.SHA384, image: PeImage | None = None
) -> bytes:
    """The PE Authenticode digest of an image file, as UEFI firmware measures it."""
    if image is None:
        image = parse_pe(data)
    h = hashlib.new(algorithm.value)
    view = memoryview(data)
    for start, end in _authenticode_ranges(image):
        if start > end:
            raise PeError(f"headers overlap: cannot hash from {start:#x} to {end:#x}")
        h.update(view[start:end])
    return h.digest()


def authenticode_digests(data: bytes) -> dict[DigestAlgorithm, bytes]:
    """SHA-256 and SHA-384 Authenticode digests (the vTPM banks and the TDX RTMRs)."""
    image = parse_pe(data)
    return {alg: authenticode_digest(data, alg, image) for alg in DigestAlgorithm}


def section_memory(data: bytes, section: PeSection) -> bytes:
    """A section's bytes as the loader puts them in memory: VirtualSize long, raw data cut or
    zero-extended (edk2 PeCoffLoaderLoadImage copies min(VirtualSize, SizeOfRawData) bytes and
    zero-fills the rest; systemd-stub measures `VirtualSize` bytes from there)."""
    copied = min(section.virtual_size, section.size_of_raw_data)
    end = section.pointer_to_raw_data + copied
    if copied and end > len(data):
        raise PeError(f"section {section.name!r} raw data runs past the end of the file")
    raw = data[section.pointer_to_raw_data : end] if copied else b""
    return raw + bytes(section.virtual_size - copied)
