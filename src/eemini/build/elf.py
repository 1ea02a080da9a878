"""Just enough ELF64 to vet the workload (static or not), follow DT_NEEDED, and read .modinfo.

Layouts from the System V gABI (ELF-64 Object File Format, version 1.5) and <elf.h>.
"""

from __future__ import annotations

import dataclasses
import struct

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_DYNAMIC, PT_INTERP, PT_LOAD = 2, 3, 1
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr, 64 bytes
assert (EHDR.size, PHDR.size, SHDR.size) == (64, 56, 64)


class ELFError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    filesz: int


@dataclasses.dataclass(frozen=True)
class ELF:
    type: int
    machine: int
    segments: tuple[Segment, ...]
    interpreter: str | None
    needed: tuple[str, ...]
    sections: dict[str, bytes]


def parse(data: bytes, *, want_sections: tuple[str, ...] = ()) -> ELF:
    if len(data) < EHDR.size or data[:4] != ELF_MAGIC:
        raise ELFError("not an ELF file (no \\x7fELF magic)")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise ELFError("not a 64-bit little-endian ELF file")
    (_, etype, machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = (
        EHDR.unpack_from(data)
    )
    segments = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + PHDR.size > len(data):
            raise ELFError(f"program header {i} lies past the end of the file")
        ptype, _, poff, vaddr, _, filesz, _, _ = PHDR.unpack_from(data, off)
        segments.append(Segment(ptype, poff, vaddr, filesz))
    interp = None
    needed: list[str] = []
    for seg in segments:
        if seg.type == PT_INTERP:
            interp = data[seg.offset : seg.offset + seg.filesz].rstrip(b"\0").decode(errors="replace")
    dyn = next((s for s in segments if s.type == PT_DYNAMIC), None)
    if dyn is not None:
        entries = [
            struct.unpack_from("<qQ", data, dyn.offset + i * 16)
            for i in range(dyn.filesz // 16)
            if dyn.offset + i * 16 + 16 <= len(data)
        ]
        strtab_vaddr = next((v for t, v in entries if t == DT_STRTAB), None)
        if strtab_vaddr is not None:
            strtab = _vaddr_to_offset(segments, strtab_vaddr)
            for tag, value in entries:
                if tag == DT_NULL:
                    break
                if tag == DT_NEEDED:
                    end = data.index(b"\0", strtab + value)
                    needed.append(data[strtab + value : end].decode())
    sections: dict[str, bytes] = {}
    if want_sections and shnum and shoff:
        headers = [SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        names_off = headers[shstrndx][4]
        for name_idx, _, _, _, off, size, *_ in headers:
            end = data.index(b"\0", names_off + name_idx)
            name = data[names_off + name_idx : end].decode()
            if name in want_sections:
                sections[name] = data[off : off + size]
    return ELF(etype, machine, tuple(segments), interp, tuple(needed), sections)


def _vaddr_to_offset(segments: list[Segment], vaddr: int) -> int:
    for seg in segments:
        if seg.type == PT_LOAD and seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            return vaddr - seg.vaddr + seg.offset
    raise ELFError(f"address {vaddr:#x} is in no loadable segment")


def check_static_workload(data: bytes, name: str) -> None:
    """Refuse what cannot run in the image: there is no dynamic loader or libc for workloads."""
    from eemini.log import die

    try:
        elf = parse(data)
    except ELFError as e:
        die(
            f"the workload {name} is not a static x86-64 executable: {e}",
            hint="build it as a static ELF binary (e.g. `gcc -static`, or Go with CGO_ENABLED=0)",
        )
    if elf.machine != EM_X86_64:
        die(f"the workload {name} is built for ELF machine {elf.machine}, not x86-64 ({EM_X86_64})")
    if elf.type not in (ET_EXEC, ET_DYN):
        die(f"the workload {name} is not an executable (ELF type {elf.type})")
    if elf.interpreter is not None:
        die(
            f"the workload {name} is dynamically linked (it asks for the loader {elf.interpreter}); "
            "the image has no shared libraries for workloads",
            hint="link it statically (e.g. `gcc -static`, or Go with CGO_ENABLED=0)",
        )
