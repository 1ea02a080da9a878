"""Test helpers: a synthetic PE32/PE32+ writer (for hostile and edge-case inputs) and a small UKI
assembled with objcopy from Debian's systemd-stub (a real PE, measured by independent tools)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")  # Debian systemd-boot-efi


@dataclass(frozen=True)
class Sec:
    name: str
    data: bytes
    virtual_size: int | None = None  # default: len(data)
    pointer: int | None = None  # default: next aligned file offset


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def make_pe(
    sections: list[Sec],
    *,
    pe32: bool = False,
    dirs: int = 16,
    trailing: bytes = b"",
    cert: bytes = b"",
    checksum: int = 0,
) -> bytes:
    """A minimal, loadable-looking PE image (Microsoft PE format layouts, little-endian)."""
    fa = 0x200
    opt_size = (96 if pe32 else 112) + 8 * dirs
    headers_end = 0x40 + 4 + 20 + opt_size + 40 * len(sections)
    size_of_headers = _align(headers_end, fa)
    pos = size_of_headers
    placed = []
    for s in sections:
        ptr = s.pointer if s.pointer is not None else pos
        raw = _align(len(s.data), fa) if s.data else 0
        placed.append((s, ptr, raw))
        pos = max(pos, ptr + raw)
    body_end = pos
    cert_at = _align(body_end + len(trailing), 8) if cert else 0
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    opt = bytearray(opt_size)
    struct.pack_into("<H", opt, 0, 0x10B if pe32 else 0x20B)
    vaddr_end = 0x1000 + sum(_align(max(len(s.data), s.virtual_size or 0), 0x1000) for s in sections)
    struct.pack_into("<III", opt, 56, vaddr_end, size_of_headers, checksum)
    struct.pack_into("<I", opt, (96 if pe32 else 112) - 4, dirs)
    if cert and dirs > 4:
        struct.pack_into("<II", opt, (96 if pe32 else 112) + 32, cert_at, len(cert))
    table = b""
    va = 0x1000
    for s, ptr, raw in placed:
        vs = s.virtual_size if s.virtual_size is not None else len(s.data)
        name = s.name.encode().ljust(8, b"\0")[:8]
        table += name + struct.pack("<IIIIIIHHI", vs, va, raw, ptr if raw else 0, 0, 0, 0, 0, 0x40000040)
        va += _align(max(vs, len(s.data), 1), 0x1000)
    out = bytearray(dos + b"PE\0\0" + coff + opt + table)
    out += bytes(size_of_headers - len(out))
    out += bytes(body_end - len(out))
    for s, ptr, raw in placed:
        if raw:
            out[ptr : ptr + raw] = s.data.ljust(raw, b"\0")
    out += trailing
    if cert:
        out += bytes(cert_at - len(out)) + cert
    return bytes(out)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (tools/bootstrap.sh installs it)")
    return path


def need_stub() -> Path:
    if not STUB.is_file():
        pytest.skip(
            f"{STUB} is missing (Debian package systemd-boot-efi; tools/bootstrap.sh installs it)"
        )
    return STUB


def assemble_uki(
    out: Path,
    *,
    linux: bytes,
    cmdline: bytes,
    initrd: bytes,
    osrel: bytes = b"ID=eemini-test\n",
    uname: bytes | None = None,
) -> Path:
    """Add UKI sections to Debian's systemd-stub with objcopy (as ukify did before its PE writer)."""
    need_tool("objcopy")
    stub = need_stub()
    work = out.parent
    argv = ["objcopy"]
    vma = 0x100000
    parts = [(".osrel", osrel), (".cmdline", cmdline)]
    if uname is not None:
        parts.append((".uname", uname))
    parts += [(".initrd", initrd), (".linux", linux)]
    for name, data in parts:
        f = work / f"sec{name}"
        f.write_bytes(data)
        argv += [f"--add-section={name}={f}", f"--change-section-vma={name}={vma:#x}"]
        vma += _align(len(data), 0x1000) + 0x1000
    subprocess.run([*argv, str(stub), str(out)], check=True, capture_output=True)
    return out
