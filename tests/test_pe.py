"""PE Authenticode digests, checked against independent implementations (pesign, osslsigncode)
on real PE files, plus the firmware's edge cases and hostile input."""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eemini.tdx.pe import (
    DigestAlgorithm,
    PeError,
    authenticode_digest,
    authenticode_digests,
    parse_pe,
    section_memory,
)
from petools import Sec, assemble_uki, make_pe, need_stub, need_tool

SHA256 = DigestAlgorithm.SHA256
SHA384 = DigestAlgorithm.SHA384


def pesign_sha256(path: Path) -> str:
    """`pesign --hash` prints the SHA-256 Authenticode digest (pesign 0.112 has no SHA-384)."""
    need_tool("pesign")
    out = subprocess.run(["pesign", "-h", "-i", str(path)], capture_output=True, text=True, check=True)
    m = re.fullmatch(r"hash: ([0-9a-f]{64})\n", out.stdout)
    assert m, out.stdout
    return m.group(1)


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    need_tool("openssl")
    d = tmp_path_factory.mktemp("key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "k.pem",
         "-out", d / "c.pem", "-subj", "/CN=eemini test", "-days", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "k.pem", d / "c.pem"


def osslsigncode_sha384(path: Path, key: tuple[Path, Path], out: Path) -> tuple[str, bytes]:
    """Sign with osslsigncode (SHA-384) and read back the digest it computed over the image."""
    need_tool("osslsigncode")
    subprocess.run(
        ["osslsigncode", "sign", "-h", "sha384", "-key", key[0], "-certs", key[1],
         "-in", path, "-out", out],
        check=True, capture_output=True,
    )  # fmt: skip
    res = subprocess.run(
        ["osslsigncode", "verify", "-in", out], capture_output=True, text=True, check=False
    )
    m = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{96})", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return m.group(1).lower(), out.read_bytes()


def test_systemd_stub_matches_pesign() -> None:
    stub = need_stub()
    data = stub.read_bytes()
    # The stub carries unsigned data after its last section: it must be hashed too.
    image = parse_pe(data)
    last = max(s.pointer_to_raw_data + s.size_of_raw_data for s in image.sections)
    assert len(data) > last
    assert authenticode_digest(data, SHA256).hex() == pesign_sha256(stub)


def test_objcopy_uki_matches_pesign_and_osslsigncode(
    tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    stub = need_stub()
    uki = assemble_uki(
        tmp_path / "uki.efi", linux=stub.read_bytes(), cmdline=b"console=ttyS0\n", initrd=b"\x07" * 5000
    )
    data = uki.read_bytes()
    assert authenticode_digest(data, SHA256).hex() == pesign_sha256(uki)
    digest, signed = osslsigncode_sha384(uki, signing_key, tmp_path / "signed.efi")
    # The signed file has a certificate table and a new checksum; the firmware's digest of it is the
    # one osslsigncode signed, and equals the unsigned file's once the signer's 8-byte alignment
    # padding is added (objcopy leaves the stub's unaligned symbol data at the end).
    assert parse_pe(signed).certificate_table_size > 0
    assert authenticode_digest(signed, SHA384).hex() == digest
    padded = data + bytes(-len(data) % 8)
    assert authenticode_digest(padded, SHA384).hex() == digest
    assert authenticode_digests(padded)[SHA384] == bytes.fromhex(digest)
    assert authenticode_digests(data)[SHA256] == bytes.fromhex(pesign_sha256(uki))


def test_unaligned_file_signing_padding_is_hashed(
    tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    # Signing tools pad the file to 8 bytes before the certificate table; that padding is trailing
    # data the firmware hashes, so predictions must be made from the final (signed) file.
    path = tmp_path / "odd.efi"
    path.write_bytes(make_pe([Sec(".text", b"\xc3" * 100)], trailing=b"abc"))
    digest, signed = osslsigncode_sha384(path, signing_key, tmp_path / "odd-signed.efi")
    assert authenticode_digest(signed, SHA384).hex() == digest
    assert authenticode_digest(path.read_bytes(), SHA384).hex() != digest


@pytest.mark.parametrize("pe32", [False, True])
def test_synthetic_images_match_pesign(tmp_path: Path, pe32: bool) -> None:
    cases = {
        "plain": make_pe([Sec(".text", b"\x90" * 700), Sec(".data", b"d" * 10)], pe32=pe32),
        "trailing": make_pe([Sec(".text", b"\x90" * 700)], pe32=pe32, trailing=b"T" * 33),
        "cert": make_pe([Sec(".text", b"\x90" * 700)], pe32=pe32, trailing=b"T" * 5, cert=b"C" * 64),
        "empty-section": make_pe([Sec(".bss", b"", virtual_size=4096), Sec(".text", b"x")], pe32=pe32),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.efi"
        path.write_bytes(data)
        assert authenticode_digest(data, SHA256).hex() == pesign_sha256(path), name


def test_sections_sorted_by_file_offset(tmp_path: Path, signing_key: tuple[Path, Path]) -> None:
    # Section table order differs from file order: edk2 (MeasurePeImageAndExtend step 12) and
    # osslsigncode sort by PointerToRawData; pesign 0.112 hashes in table order, so it differs here.
    path = tmp_path / "unsorted.efi"
    path.write_bytes(
        make_pe([Sec(".b", b"b" * 300, pointer=0x400), Sec(".a", b"a" * 300, pointer=0x200)])
    )
    digest, _signed = osslsigncode_sha384(path, signing_key, tmp_path / "unsorted-signed.efi")
    assert authenticode_digest(path.read_bytes(), SHA384).hex() == digest
    assert authenticode_digest(path.read_bytes(), SHA256).hex() != pesign_sha256(path)


def test_digest_excludes_checksum_and_certificate_entry_only() -> None:
    a = make_pe([Sec(".text", b"\x90" * 64)], checksum=0)
    b = make_pe([Sec(".text", b"\x90" * 64)], checksum=0x12345678)
    assert a != b and authenticode_digest(a) == authenticode_digest(b)
    signed = make_pe([Sec(".text", b"\x90" * 64)], cert=b"C" * 16)
    assert authenticode_digest(signed) == authenticode_digest(a)
    changed = make_pe([Sec(".text", b"\x91" + b"\x90" * 63)])
    assert authenticode_digest(changed) != authenticode_digest(a)


def test_digest_by_hand() -> None:
    # The ranges spelled out for a PE32+ image: [0, checksum), (checksum+4, cert entry),
    # (cert entry+8, SizeOfHeaders), the section, the trailing data before the certificate table.
    data = make_pe([Sec(".text", b"\x90" * 10)], trailing=b"tail", cert=b"C" * 8)
    opt = 0x40 + 4 + 20
    h = hashlib.sha384()
    h.update(data[: opt + 64])
    h.update(data[opt + 68 : opt + 112 + 32])
    h.update(data[opt + 112 + 40 : 0x200])
    h.update(data[0x200:0x400])
    h.update(data[0x400 : len(data) - 8])
    assert authenticode_digest(data) == h.digest()


def test_gaps_between_sections_follow_the_firmware() -> None:
    # With a gap before a section, SUM_OF_BYTES_HASHED (headers + raw sizes) stops short of the end
    # of the last section, and the firmware (edk2 MeasurePeImageAndExtend step 15, like the
    # Authenticode spec) hashes "trailing" data from that sum: here the second half of .b again.
    # pesign and osslsigncode each do something else here (three tools, three digests); linkers,
    # objcopy and ukify never leave such gaps, and the firmware's reading is the one that counts.
    data = make_pe([Sec(".b", b"b" * 600, pointer=0x800), Sec(".a", b"a" * 300, pointer=0x400)])
    assert len(data) == 0xC00
    h = hashlib.sha384()
    opt = 0x40 + 4 + 20
    h.update(data[: opt + 64] + data[opt + 68 : opt + 144] + data[opt + 152 : 0x200])
    h.update(data[0x400:0x600] + data[0x800:0xC00])  # .a then .b, sorted by PointerToRawData
    h.update(data[0x800:0xC00])  # trailing data from SUM_OF_BYTES_HASHED = 0x200 + 0x200 + 0x400
    assert authenticode_digest(data) == h.digest()


def test_no_certificate_directory() -> None:
    # NumberOfRvaAndSizes <= 4: no certificate entry to skip, nothing excluded at the end.
    data = make_pe([Sec(".text", b"\x90" * 10)], dirs=4, trailing=b"tail")
    image = parse_pe(data)
    assert image.certificate_entry_offset is None
    opt = 0x40 + 4 + 20
    h = hashlib.sha384(data[: opt + 64] + data[opt + 68 :])
    assert authenticode_digest(data) == h.digest()


def test_section_memory_cut_and_zero_extended() -> None:
    data = make_pe(
        [
            Sec(".cut", b"abcdefgh", virtual_size=3),
            Sec(".ext", b"xyz", virtual_size=10),
            Sec(".zero", b"q", virtual_size=0),
        ]
    )
    image = parse_pe(data)
    cut, ext, zero = image.sections
    assert cut.size_of_raw_data == 0x200 and cut.virtual_size == 3
    assert section_memory(data, cut) == b"abc"
    assert section_memory(data, ext) == b"xyz" + bytes(7)
    # Beyond the raw data, even the file's own padding is replaced by zeros (the loader zero-fills).
    big = make_pe([Sec(".big", b"z" * 10, virtual_size=0x300)])
    assert section_memory(big, parse_pe(big).sections[0]) == b"z" * 10 + bytes(0x300 - 10)
    assert section_memory(data, zero) == b""
    assert image.section(".ext") == ext and image.section(".nope") is None


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


GOOD = make_pe([Sec(".text", b"\x90" * 100), Sec(".data", b"d" * 100)], trailing=b"t", cert=b"C" * 16)
OPT = 0x40 + 4 + 20


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"MZ", "file is too short for a DOS header: 2 bytes, need 64"),
        (b"ZM" + GOOD[2:], "not a PE image: DOS magic is 5a4d, expected 4d5a ('MZ')"),
        (
            _patch(GOOD, 0x3C, "<I", 0xFFFFFF00),
            "PE header offset 0xffffff00 (e_lfanew) lies beyond the end",
        ),
        (_patch(GOOD, 0x40, "<I", 0x00004551), "no PE signature at e_lfanew 0x40: found 51450000"),
        (_patch(GOOD, OPT, "<H", 0x107), "unknown optional header magic 0x107"),
        (_patch(GOOD, OPT + 108, "<I", 17), "NumberOfRvaAndSizes is 17, at most 16"),
        (_patch(GOOD, 0x44 + 16, "<H", 100), "optional header is truncated: SizeOfOptionalHeader 100"),
        (
            _patch(GOOD, 0x44 + 2, "<H", 0xFFFF),
            "section table (65535 sections at 0x148) runs past the end",
        ),
        (_patch(GOOD, OPT + 60, "<I", 0x10_0000), "SizeOfHeaders 0x100000 is larger than the file"),
        (_patch(GOOD, OPT + 60, "<I", 0x100), "SizeOfHeaders 0x100 does not cover the section table"),
        (
            _patch(GOOD, 0x40 + 24 + 240 + 16, "<I", 0x10_0000),
            "section 0 ('.text') raw data [0x200, 0x100200)",
        ),
        (
            _patch(GOOD, OPT + 112 + 36, "<I", 0x1000),
            "certificate table (4096 bytes) is larger than the 24 bytes",
        ),
    ],
)
def test_hostile_headers(data: bytes, message: str) -> None:
    with pytest.raises(PeError, match=re.escape(message)):
        authenticode_digest(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_images_fail_cleanly(data: st.DataObject) -> None:
    # Any mutation of the headers either parses (and hashes) or raises PeError: never an IndexError,
    # struct.error or a hang.
    buf = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, 0x200 - 1))
        buf[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        authenticode_digest(bytes(buf[:cut]))
    except PeError:
        pass
