"""The builder's mechanisms one by one, each checked against an independent tool where one exists."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.build import apt, cpio, disk, elf, fat, gpt, lock, profile, uki
from eemini.build.compress import Compression
from eemini.build.tree import PROJECT, Kind, Origin, Source, Tree
from eemini.guest.image import Attestation
from eemini.log import UserError
from eemini.tdx.pe import parse_pe

HELLO = Path(__file__).resolve().parent / "data" / "workload" / "hello.c"


def tool(*argv: str | os.PathLike[str], stdin: bytes | None = None) -> bytes:
    proc = subprocess.run([os.fspath(a) for a in argv], input=stdin, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


# --- cpio ---


def small_tree() -> Tree:
    t = Tree()
    deb = Origin(Source.DEBIAN, "libc6", "2.41-12")
    t.file("/usr/bin/tool", b"#!/bin/true\n", deb, "other", executable=True)
    t.symlink("/bin", "usr/bin", PROJECT, "layout")
    t.chardev("/dev/console", 5, 1, 0o600)
    t.dir("/tmp", mode=0o1777)
    t.file("/etc/a-b", b"x" * 5, PROJECT, "other")
    t.file("/etc/a/b", b"", PROJECT, "other")
    return t


def test_cpio_is_newc_sorted_and_owned_by_root(tmp_path: Path) -> None:
    data = cpio.write(small_tree())
    names = tool("cpio", "-t", "--quiet", stdin=data).decode().splitlines()
    # Parents first; siblings by name.
    assert names == ["bin", "dev", "dev/console", "etc", "etc/a", "etc/a/b", "etc/a-b", "tmp", "usr",
                     "usr/bin", "usr/bin/tool"]  # fmt: skip
    listing = tool("bsdtar", "-tvf", "-", stdin=data).decode().splitlines()
    assert listing[0].split()[:4] == ["lrwxrwxrwx", "1", "0", "0"]  # mode, nlink, uid, gid
    assert listing[1].startswith("drwxr-xr-x")
    assert listing[2].startswith("crw-------")
    assert listing[7].startswith("drwxrwxrwt")
    assert listing[10].startswith("-rwxr-xr-x")
    # First header, field by field: magic, ino 1, mode, uid, gid, nlink, mtime 0, size 7 ("usr/bin").
    assert data[:110] == b"070701" + b"".join(
        b"%08X" % v for v in (1, 0o120777, 0, 0, 1, 0, 7, 0, 0, 0, 0, 4, 0)
    )
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))
    root = tmp_path / "x"
    root.mkdir()
    tool("cpio", "-id", "--quiet", "-D", root, stdin=data)
    assert (root / "usr/bin/tool").read_bytes() == b"#!/bin/true\n"
    assert os.readlink(root / "bin") == "usr/bin"


def test_tree_refuses_conflicts_and_escapes() -> None:
    t = small_tree()
    with pytest.raises(UserError, match=r"^two different entries for /usr/bin/tool"):
        t.file("/usr/bin/tool", b"other", PROJECT, "other")
    with pytest.raises(
        UserError, match=r"^image path /bin is a symlink, but /bin/x needs it to be a directory"
    ):
        t.file("/bin/x", b"", PROJECT, "other")
    with pytest.raises(UserError, match=r"is not a plain absolute path"):
        t.file("/etc/../x", b"", PROJECT, "other")


# --- FAT32 + GPT + VHD ---


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    payload = hashlib.sha256(b"seed").digest() * 40000  # 1.28 MB, not a multiple of a cluster
    raw = tmp_path_factory.mktemp("disk") / "disk.raw"
    disk.raw_disk(raw, payload)
    return raw, payload


def test_gpt_as_sfdisk_reads_it(small_disk: tuple[Path, bytes]) -> None:
    raw, payload = small_disk
    assert raw.stat().st_size == 66 * (1 << 20)
    table = json.loads(tool("sfdisk", "--json", raw))["partitiontable"]
    digest = hashlib.sha256(payload).hexdigest()
    assert table == {
        "label": "gpt",
        "id": str(gpt.derived_guid("disk", digest)).upper(),
        "device": str(raw),
        "unit": "sectors",
        "firstlba": 34,
        "lastlba": 66 * 2048 - 34,
        "sectorsize": 512,
        "partitions": [{
            "node": f"{raw}1", "start": 2048, "size": 64 * 2048,
            "type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "uuid": str(gpt.derived_guid("esp", digest)).upper(), "name": "EFI System Partition",
        }],
    }  # fmt: skip
    tool("sfdisk", "--verify", raw)


def test_fat_as_mtools_and_fsck_read_it(small_disk: tuple[Path, bytes], tmp_path: Path) -> None:
    raw, payload = small_disk
    esp = f"{raw}@@{1 << 20}"
    assert "BOOTX64  EFI   1280000 1980-01-01   0:00" in tool("mdir", "-i", esp, "::EFI/BOOT").decode()
    assert " Volume in drive : is ESP  " in tool("mdir", "-i", esp, "::").decode()
    tool("mcopy", "-i", esp, "::EFI/BOOT/BOOTX64.EFI", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == payload
    part = tmp_path / "esp.img"
    with raw.open("rb") as f:
        f.seek(1 << 20)
        part.write_bytes(f.read(64 << 20))
    out = tool("fsck.fat", "-n", "-v", part).decode()
    assert "2 FATs, 32 bit entries" in out
    # Root, EFI and BOOT take one cluster each; 1280000 bytes take 2500: no cluster lost or leaked.
    assert out.endswith("esp.img: 4 files, 2503/129008 clusters\n")


def test_fat_refuses_too_few_clusters_and_long_names() -> None:
    with pytest.raises(ValueError, match=r"too few for FAT32"):
        fat.make(32 * 2048, {"A.EFI": b"x"}, 1, 2048)
    with pytest.raises(ValueError, match=r"not a plain 8.3 name"):
        fat.make(64 * 2048, {"EFI/toolongname.efi": b"x"}, 1, 2048)


def test_disks_are_deterministic_and_follow_content(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    disk.raw_disk(a, b"one" * 1000)
    disk.raw_disk(b, b"one" * 1000)
    disk.raw_disk(c, b"two" * 1000)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[512 + 56 : 512 + 72] != c.read_bytes()[512 + 56 : 512 + 72]  # disk GUID


def test_fixed_vhd_as_qemu_img_reads_it(small_disk: tuple[Path, bytes], tmp_path: Path) -> None:
    raw, _ = small_disk
    out = tmp_path / "disk.vhd"
    disk.vhd(raw, out, "0" * 64)
    info = json.loads(tool("qemu-img", "info", "--output=json", "-f", "vpc", out))
    assert info["virtual-size"] == raw.stat().st_size == 66 << 20
    footer = out.read_bytes()[-512:]
    assert out.read_bytes()[:-512] == raw.read_bytes()
    fields = struct.unpack(">8sIIQI4sI4sQQHBBII16sB427s", footer)
    assert fields[0] == b"conectix" and fields[13] == 2  # fixed disk
    zeroed = footer[:64] + b"\0\0\0\0" + footer[68:]
    assert fields[14] == ~sum(zeroed) & 0xFFFFFFFF


# --- UKI (a synthetic stub: PE32+ with one section, room for more headers) ---


def fake_stub(*, signed: bool = False) -> bytes:
    img = bytearray(0x600)
    img[:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, 0x80)
    img[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", img, 0x84, 0x8664, 1, 12345, 0, 0, 240, 0x22E)
    opt = 0x98
    struct.pack_into("<H", img, opt, 0x20B)
    struct.pack_into("<II", img, opt + 32, 0x1000, 0x200)
    struct.pack_into("<II", img, opt + 56, 0x2000, 0x400)
    struct.pack_into("<I", img, opt + 108, 16)
    if signed:
        struct.pack_into("<II", img, opt + 112 + 32, 0x600, 8)
    struct.pack_into("<8sIIIIIIHHI", img, opt + 240, b".text", 0x10, 0x1000, 0x200, 0x400, 0, 0, 0, 0,
                     0x60000020)  # fmt: skip
    img[0x400:0x410] = b"\xcc" * 16
    return bytes(img)


def test_uki_sections_as_objdump_reads_them(tmp_path: Path) -> None:
    payloads = {".osrel": b"ID=x\n", ".cmdline": b"console=ttyS0", ".uname": b"6.12",
                ".initrd": b"\x01" * 1000, ".linux": b"\x02" * 5000}  # fmt: skip
    image = uki.assemble(fake_stub(), payloads)
    (tmp_path / "u.efi").write_bytes(image)
    secs = {s.name: s for s in parse_pe(image).sections}
    assert list(secs) == [".text", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
    for name, data in payloads.items():
        s = secs[name]
        assert s.virtual_size == len(data)  # exactly what the stub measures
        assert s.virtual_address % 0x1000 == 0 and s.pointer_to_raw_data % 0x200 == 0
        assert image[s.pointer_to_raw_data : s.pointer_to_raw_data + len(data)] == data
    out = tool("objdump", "-h", tmp_path / "u.efi").decode()
    assert ".linux        00001388  0000000000006000" in out
    headers = tool("objdump", "-p", tmp_path / "u.efi").decode()
    assert "SizeOfImage\t\t00008000" in headers
    assert "Time/Date\t\tThu Jan  1 00:00:00 1970" in headers
    assert uki.assemble(fake_stub(), payloads) == image


def test_uki_refuses_signed_stub() -> None:
    with pytest.raises(UserError, match=r"^the systemd-stub is already signed"):
        uki.assemble(fake_stub(signed=True), {".linux": b"k"})


def test_pe_checksum_matches_the_reference_loop() -> None:
    data = bytes(range(256)) * 17 + b"\x07"

    def reference(image: bytes) -> int:
        padded = image + b"\0" * (len(image) % 2)
        total = 0
        for (w,) in struct.iter_unpack("<H", padded):
            total = (total + w) & 0xFFFFFFFF
            total = (total & 0xFFFF) + (total >> 16)
        return (total + len(image)) & 0xFFFFFFFF

    assert uki.pe_checksum(data) == reference(data)


# --- the workload check ---


def test_dynamic_workload_is_refused(tmp_path: Path) -> None:
    tool("gcc", "-O2", "-o", tmp_path / "dyn", HELLO)
    expected = (
        r"^the workload dyn is dynamically linked \(it asks for the loader "
        r"/lib64/ld-linux-x86-64\.so\.2\); the image has no shared libraries for workloads$"
    )
    with pytest.raises(UserError, match=expected):
        elf.check_static_workload((tmp_path / "dyn").read_bytes(), "dyn")


def _build_dynamic(tmp_path: Path, out: Path) -> subprocess.CompletedProcess[str]:
    tool("gcc", "-O2", "-o", tmp_path / "app", HELLO)
    (tmp_path / "enclave.toml").write_text('[workload]\npath = "app"\n')
    argv = [sys.executable, "-m", "eemini", "build", "-f", os.fspath(tmp_path / "enclave.toml"),
            "--profile", "local-dev", "--out", os.fspath(out)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def test_build_refuses_a_dynamic_workload_before_any_work(tmp_path: Path) -> None:
    proc = _build_dynamic(tmp_path, tmp_path / "build" / "out")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"eemini build: error: the workload {tmp_path / 'app'} is dynamically linked (it asks for the "
        "loader /lib64/ld-linux-x86-64.so.2); the image has no shared libraries for workloads\n"
        "  hint: link it statically (e.g. `gcc -static`, or Go with CGO_ENABLED=0)\n"
    )
    # A failed build leaves no (empty) output directory behind, nor the one it made above it.
    assert not (tmp_path / "build").exists()


def test_failed_build_keeps_an_existing_directory_and_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "uki.efi").write_bytes(b"an earlier build's")  # would pass for this build's output
    proc = _build_dynamic(tmp_path, out)
    assert proc.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n"


def test_non_elf_workload_is_refused() -> None:
    with pytest.raises(UserError, match=r"^the workload run\.sh is not a static x86-64 executable: "
                       r"not an ELF file \(no \\x7fELF magic\)$"):  # fmt: skip
        elf.check_static_workload(b"#!/bin/sh\necho hi\n", "run.sh")


def test_static_workload_is_accepted(tmp_path: Path) -> None:
    tool("gcc", "-static", "-O2", "-o", tmp_path / "st", HELLO)
    data = (tmp_path / "st").read_bytes()
    elf.check_static_workload(data, "st")
    assert elf.parse(data).interpreter is None


def test_image_facts_name_the_workload_the_image_holds(tmp_path: Path) -> None:
    """The facts are computed once, from the workload bytes put in the image: a workload rebuilt
    while the image is being built changes neither image.json nor the manifest's copy of it."""
    from eemini.build import image, spec
    from eemini.build.kernel import Kernel

    tool("gcc", "-static", "-O2", "-o", tmp_path / "app", HELLO)
    (tmp_path / "enclave.toml").write_text('[workload]\npath = "app"\n')
    pins = lock.load()
    cached = tmp_path / "kernel"
    cached.mkdir()
    (cached / "build.json").write_text(json.dumps({
        "source": {}, "config_sha256": "c", "options_on": 1, "toolchain": "t", "bzimage_sha256": "b",
    }))  # fmt: skip
    ctx = image.Context(profile.load("local-dev"), pins, spec.resolve(tmp_path / "enclave.toml"),
                        tmp_path / "out", tmp_path, apt.Apt(tmp_path / "cache"))  # fmt: skip
    ctx.kernel = Kernel(cached, "key", "7.3.4-eemini", pins.kernel)
    ctx.out.mkdir()
    image.check_workload(ctx)
    held = (tmp_path / "app").read_bytes()
    (tmp_path / "app").write_bytes(held + b"rebuilt")
    facts = image.add_image_facts(ctx)
    image.write_manifest(ctx, facts, {})
    in_image = json.loads(ctx.tree.entries["/etc/eemini/image.json"].data)
    assert in_image["workload_sha256"] == hashlib.sha256(held).hexdigest()
    assert json.loads((ctx.out / "manifest.json").read_text())["image"] == in_image


# --- profiles ---


def write_profile(tmp_path: Path, **changes: object) -> Path:
    doc: dict[str, object] = {"description": "t", "attestation": "configfs-tsm", "network": "dhcp",
                              "config_sources": ["config-disk"], "cmdline": ["console=ttyS0"],
                              "outputs": ["qcow2"]}  # fmt: skip
    doc.update(changes)
    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if v is not None]
    (tmp_path / "p.toml").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_profiles_in_the_repo_load() -> None:
    assert profile.available() == ["azure", "gcp", "local-dev", "local-tdx-qcow2"]
    dev = profile.load("local-dev")
    assert dev.simulated and "ee.dev=1" in dev.cmdline
    assert dev.config_sources == ("cmdline", "config-disk")
    for name in ("azure", "gcp", "local-tdx-qcow2"):
        p = profile.load(name)
        assert not p.simulated and "ee.dev=1" not in p.cmdline
        assert "cmdline" not in p.config_sources
        # Azure's guest is not the TD (its paravisor is): it attests through the vTPM instead.
        want = Attestation.AZURE_TDX_VTPM if name == "azure" else Attestation.CONFIGFS_TSM
        assert p.attestation is want
    assert {profile.load(name).compression for name in profile.available()} == {Compression.ZSTD}


def test_a_profile_may_choose_the_initramfs_compression(tmp_path: Path) -> None:
    p = profile.load("p", directory=write_profile(tmp_path, initramfs_compression="none"))
    assert p.compression is Compression.NONE
    assert profile.load("p", directory=write_profile(tmp_path)).compression is Compression.ZSTD


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cmdline": ["quiet"]}, r"the cmdline must include console=ttyS0"),
        (
            {"attestation": "simulated"},
            r"ee.dev=1 must be in the cmdline exactly when attestation is simulated",
        ),
        ({"outputs": ["iso"]}, r"'iso' is not a valid Output"),
        ({"config_sources": ["dns"]}, r"unknown config sources \['dns'\]"),
        ({"network": None, "colour": "red"}, r"unknown keys \['colour'\], missing keys \['network'\]"),
        (
            {"initramfs_compression": "brotli"},
            r"initramfs_compression 'brotli' is not one of zstd, xz, gzip, lz4, none",
        ),
    ],
)
def test_bad_profiles_are_refused(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        profile.load("p", directory=write_profile(tmp_path, **changes))


def test_a_profile_listing_kernel_modules_is_refused_saying_why(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        profile.load("p", directory=write_profile(tmp_path, modules=["virtio_net"]))
    assert str(e.value) == (
        f"profile {tmp_path}/p.toml: `modules` is no longer a profile key: the kernel has no loadable "
        "modules, every driver an image needs is built in (kernel/fragment.config)"
    )
    assert e.value.hint == "remove the `modules` list from the profile"


def test_only_a_simulated_profile_may_read_boot_config_from_the_cmdline(tmp_path: Path) -> None:
    sources = ["cmdline", "config-disk"]
    dev = write_profile(tmp_path, attestation="simulated", cmdline=["console=ttyS0", "ee.dev=1"],
                        config_sources=sources)  # fmt: skip
    assert profile.load("p", directory=dev).config_sources == ("cmdline", "config-disk")
    with pytest.raises(UserError) as e:
        profile.load("p", directory=write_profile(tmp_path, config_sources=sources))
    assert str(e.value) == (
        f"profile {tmp_path}/p.toml: the config source 'cmdline' is for simulated (local-dev) images "
        "only: a production image refuses any kernel command line but the UKI's own, and a host's "
        "ee.KEY=VALUE would replace that one entirely"
    )
    assert e.value.hint == (
        "take 'cmdline' out of config_sources; a config disk or the cloud's metadata carries boot "
        "config for production images"
    )


def test_unknown_profile_names_the_choices() -> None:
    proc = subprocess.run([sys.executable, "-m", "eemini", "build", "--profile", "nope"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        "eemini build: error: there is no profile 'nope'\n"
        "  hint: choose one of: azure, gcp, local-dev, local-tdx-qcow2\n"
    )


# --- apt sources, lock file, fetching ---


def test_host_sources_are_read_from_deb822_and_one_line_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: file:///srv/mirror/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n"
        "Types: deb\nURIs: file:///srv/mirror/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n"
    )
    (tmp_path / "sources.list").write_text(
        "# deb file:///old stable main\ndeb-src file:///src bookworm main\n"
    )
    found = apt.host_sources(tmp_path)
    assert found == [
        apt.Source("file:///srv/mirror/debian", "/usr/share/keyrings/k.gpg", False),
        apt.Source("file:///srv/mirror/debian-security", "/usr/share/keyrings/k.gpg", True),
    ]
    assert apt.sources_list(found) == (
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] file:///srv/mirror/debian trixie main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] file:///srv/mirror/debian "
        "trixie-backports main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] file:///srv/mirror/debian-security "
        "trixie-security main\n"
    )
    with pytest.raises(UserError, match=r"^the host's apt sources name no Debian archive"):
        apt.sources_list([])


def test_lock_command_lists_the_pins() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eemini", "lock"], capture_output=True, text=True, check=True
    )
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    pins = lock.load()
    assert rows == [
        [p.name, p.version, p.sha256, p.role.value] for p in [*pins.packages, *pins.toolchain]
    ]
    assert len(rows) == len(pins.packages) + len(pins.toolchain) == 9 + 82


def test_lock_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist"):
        lock.load(tmp_path / "missing.json")
    doc = json.loads(lock.LOCK_PATH.read_text())
    doc["packages"][0]["sha256"] = "abc"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"^lock entry libc6 has a malformed sha256 'abc'$"):
        lock.load(tmp_path / "bad.json")


def test_lock_file_in_repo_pins_what_the_issue_asks_for() -> None:
    pinned = lock.load()
    assert pinned.suite == "trixie"
    assert pinned.kernel.name == "linux-source-7.3"
    assert pinned.kernel.version == "7.3.4-1~bpo13+1"
    assert lock.upstream_version(pinned.kernel.version) >= lock.MIN_KERNEL == (6, 16)
    names = {p.name for p in pinned.packages}
    assert names == {"linux-source-7.3", "systemd-boot-efi", "python3.13-minimal",
                     "libpython3.13-minimal", "libpython3.13-stdlib", "libc6", "libffi8", "zlib1g",
                     "libexpat1"}  # fmt: skip
    tools = {p.name: p.version for p in pinned.toolchain}
    assert (
        tools["gcc-14"] == "14.2.0-19" and tools["binutils"] == "2.44-3" and tools["make"] == "4.4.1-2"
    )
    assert {name for name, _ in lock.TOOLCHAIN_ROOTS} <= set(tools)
    assert all(p.role is lock.Role.TOOLCHAIN for p in pinned.toolchain)
    assert lock.Lock.to_json(pinned) == lock.LOCK_PATH.read_text()


def test_lock_update_resolves_every_root(private_cache: Path, tmp_path: Path) -> None:
    fresh = lock.resolve(apt.Apt())
    roles = {p.name: p.role for p in fresh.packages}
    assert roles.pop(fresh.kernel.name) is lock.Role.KERNEL
    assert roles == {r.name: r.role for r in lock.ROOTS if not r.meta}
    # The newest kernel source trixie-backports offers, never the release's 6.12.
    assert re.fullmatch(r"linux-source-\d+\.\d+", fresh.kernel.name)
    assert fresh.kernel.version.endswith(tuple(f"~bpo13+{n}" for n in range(1, 10)))
    assert lock.upstream_version(fresh.kernel.version) >= (7, 3)
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) and p.size > 0 for p in fresh.packages)
    tools = {p.name for p in fresh.toolchain}
    assert {name for name, _ in lock.TOOLCHAIN_ROOTS} | {"binutils", "libc6", "cpp-14"} <= tools
    lock.save(fresh, tmp_path / "l.json")
    assert lock.load(tmp_path / "l.json") == fresh
    assert not (tmp_path / "l.tmp").exists()


def test_a_kernel_older_than_the_measurement_abi_is_refused() -> None:
    old = lock.Package("linux-source-6.12", "6.12.118-1", "0" * 64, 1, lock.Role.KERNEL)
    with pytest.raises(UserError) as e:
        lock.check_kernel(old)
    assert str(e.value) == (
        "the kernel source linux-source-6.12 6.12.118-1 is older than Linux 6.16, which has the TSM "
        "measurement ABI (RTMR3 extension through sysfs)"
    )
    assert lock.upstream_version("1:6.16-1") == (6, 16)
    lock.check_kernel(
        lock.Package("linux-source-6.16", "6.16.3-1~bpo13+1", "0" * 64, 1, lock.Role.KERNEL)
    )


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EEMINI_CACHE_DIR", os.fspath(tmp_path / "cache"))
    return tmp_path / "cache"


def test_hash_mismatch_is_refused_and_not_cached(private_cache: Path) -> None:
    real = lock.load().get("libffi8")
    a = apt.Apt()
    with pytest.raises(UserError) as e:
        apt.fetch(a, real.name, real.version, "0" * 64)
    assert str(e.value) == (
        f"libffi8 {real.version} downloaded with sha256 {real.sha256}, but the lock file pins {'0' * 64}"
    )
    assert e.value.hint is not None and "eemini lock --update" in e.value.hint
    assert [p.name for p in (private_cache / "debs").iterdir()] == []
    got = apt.fetch(a, real.name, real.version, real.sha256)
    assert got == private_cache / "debs" / f"{real.sha256}.deb"
    got.write_bytes(b"corrupted")  # a damaged cache entry is fetched again, not used
    assert hashlib.sha256(
        apt.fetch(a, real.name, real.version, real.sha256).read_bytes()
    ).hexdigest() == (real.sha256)


def test_concurrent_builds_share_the_cache(private_cache: Path) -> None:
    """Two processes fetching and unpacking the same package at once into one fresh cache."""
    code = (
        "from eemini.build import apt, lock, deb\n"
        "print(deb.unpacked(apt.Apt(), lock.load().get('libffi8')))\n"
    )
    env = {**os.environ, "EEMINI_CACHE_DIR": os.fspath(private_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    sha = lock.load().get("libffi8").sha256
    assert {out.strip() for out, _ in results} == {os.fspath(private_cache / "unpacked" / sha)}
    assert (private_cache / "unpacked" / sha / "usr/lib/x86_64-linux-gnu/libffi.so.8").is_symlink()
    assert sorted(p.name for p in (private_cache / "unpacked").iterdir()) == [sha]


def test_vanished_version_says_what_to_do(private_cache: Path) -> None:
    with pytest.raises(UserError) as e:
        apt.fetch(apt.Apt(), "libffi8", "0.0-0", "0" * 64)
    assert str(e.value).startswith(
        "apt could not download libffi8 0.0-0: E: Version '0.0-0' for 'libffi8'"
    )
    assert e.value.hint == (
        "if the Debian archive no longer offers this version, run `eemini lock --update` to pin what it "
        "offers now (this changes the image and its measurements)"
    )


def test_kind_values_are_stable() -> None:
    assert [k.value for k in Kind] == ["file", "dir", "symlink", "chardev"]
