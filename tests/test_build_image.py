"""Built images, checked by independent tools (cpio, bsdtar, objdump, sfdisk, mtools, qemu-img)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from eemini.build import kernel, lock, pyruntime
from images import DEMO_HASH, DEMO_PROFILE, REPO, build, build_output, demo_image, image, workload_spec

GUEST = REPO / "src" / "eemini" / "guest"
RELEASE = "7.3.4-eemini"  # uname -r of our kernel: the pinned source's version and LOCALVERSION
MIB = 1 << 20


def run(*argv: str | os.PathLike[str], stdin: bytes | None = None) -> bytes:
    proc = subprocess.run([os.fspath(a) for a in argv], input=stdin, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def manifest(profile: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((image(profile) / "manifest.json").read_text())
    return doc


def initramfs(profile: str) -> bytes:
    return run("zstd", "-dc", image(profile) / "initramfs.cpio.zst")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_in_different_places_umasks_and_zones_are_identical(tmp_path: Path) -> None:
    first = image(DEMO_PROFILE)
    spec = workload_spec(tmp_path / "other" / "spec")
    # A relative --out, another working directory, umask and time zone.
    proc = build(DEMO_PROFILE, Path("elsewhere/out"), spec, umask=0o077,
                 env={"TZ": "Pacific/Kiritimati", "LC_ALL": "C"}, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "elsewhere" / "out"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    assert names == ["dev-root.pem", "disk.qcow2", "initramfs.cpio.zst", "manifest.json", "uki.efi"]
    for name in names:
        assert sha256(first / name) == sha256(out / name), name


def test_build_reports_steps_sizes_and_outputs() -> None:
    stdout, stderr = build_output("azure")
    out = image("azure")
    assert stdout.splitlines() == [f"{name}\t{out / file}" for name, file in (
        ("initramfs", "initramfs.cpio.zst"), ("manifest", "manifest.json"), ("uki", "uki.efi"),
        ("vhd", "disk.vhd"))]  # fmt: skip
    steps = [line.strip() for line in stderr.splitlines() if line.lstrip().startswith("‣")]
    top = [s for s in steps if not s.startswith("‣ Downloading") and not s.startswith("‣ Unpacking")]
    pins = lock.load()
    # The kernel comes from the cache, or is built on a miss (whichever image the session built first).
    assert top[1] in (
        f"‣ Kernel {RELEASE} from the cache (built earlier from {pins.kernel.label})",
        f"‣ Building the kernel from {pins.kernel.label} with the pinned toolchain (about "
        f"{kernel.CPU_MINUTES / kernel.jobs() + 1:.0f} minutes with {kernel.jobs()} jobs; "
        "cached afterwards)",
    )
    assert [top[0], top[2]] == ["‣ Fetching 8 pinned Debian packages",
                                "‣ Adding the trimmed Python runtime and the guest runtime"]  # fmt: skip
    uki_step = top.index("‣ Assembling the UKI")
    assert top[uki_step + 1] == "‣ Writing disk.vhd"
    sizes = manifest("azure")["sizes"]
    table = stderr[stderr.index("Size breakdown:") :].splitlines()
    assert table[1] == f"  {'kernel (bzImage)':<28} {sizes['kernel'] / (1 << 20):7.2f} MiB"
    assert [row[2:30].strip() for row in table[1:]] == [
        "kernel (bzImage)", "Python runtime", "guest runtime", "workload + spec",
        "layout, /init, image facts", "initramfs (cpio)", "initramfs compressed", "UKI",
        "compression ratio",
    ]  # fmt: skip


def test_a_local_dev_build_has_the_development_root_beside_it() -> None:
    from eemini.guest.dev.simulated import dev_root_pem

    out = image(DEMO_PROFILE)
    assert (out / "dev-root.pem").read_bytes() == dev_root_pem()
    assert manifest(DEMO_PROFILE)["outputs"]["dev-root"] == {
        "file": "dev-root.pem",
        "sha256": hashlib.sha256(dev_root_pem()).hexdigest(),
        "size": len(dev_root_pem()),
    }
    assert not (image("azure") / "dev-root.pem").exists()  # production quotes chain to Intel


def test_demo_uki_hash_matches_the_recorded_one() -> None:
    actual = sha256(demo_image() / "uki.efi")
    expected = DEMO_HASH.read_text().strip()
    assert actual == expected, (
        f"the demo image's UKI has sha256 {actual}, but {DEMO_HASH.relative_to(REPO)} records "
        f"{expected}. If the change to the image is intended, run tools/update-demo-uki-hash and "
        "commit the new hash with it."
    )


def test_cpio_and_bsdtar_list_exactly_the_sbom() -> None:
    data = initramfs(DEMO_PROFILE)
    sbom = manifest(DEMO_PROFILE)["initramfs"]["files"]
    paths = [e["path"].lstrip("/") for e in sbom]
    listed = run("cpio", "-t", "--quiet", stdin=data).decode().splitlines()
    assert listed == paths
    verbose = run("bsdtar", "-tvf", "-", stdin=data).decode().splitlines()
    assert len(verbose) == len(paths)
    for line, entry in zip(verbose, sbom, strict=True):
        fields = line.split()
        assert fields[2:4] == ["0", "0"], line  # owner 0:0
        if entry["type"] == "file":
            assert int(fields[4]) == entry["size"], line


def test_every_initramfs_byte_has_an_origin() -> None:
    doc = manifest(DEMO_PROFILE)
    sbom = doc["initramfs"]["files"]
    lock = {p["name"]: p["version"] for p in doc["packages"]}
    # The size breakdown covers every byte of content: file data and symlink targets.
    content = sum(e["size"] if e["type"] == "file" else len(e.get("target", "")) for e in sbom)
    assert content == sum(
        doc["sizes"][c] for c in ("python-runtime", "guest-runtime", "workload", "layout")
    )
    for e in sbom:
        origin = e["origin"]
        assert origin["source"] in ("debian", "project", "workload"), e
        if origin["source"] == "debian":
            assert lock[origin["package"]] == origin["version"], e
    by_path = {e["path"]: e for e in sbom}
    assert by_path["/app/hello"]["origin"] == {"source": "workload"}
    assert by_path["/etc/eemini/spec.json"]["origin"] == {"source": "workload"}
    assert by_path["/usr/bin/python3.13"]["origin"]["package"] == "python3.13-minimal"
    assert by_path["/usr/lib/python3.13/encodings/utf_8.pyc"]["origin"] == {
        "source": "debian", "package": "libpython3.13-minimal", "version": lock["libpython3.13-minimal"],
        "derived_from": "/usr/lib/python3.13/encodings/utf_8.py",
    }  # fmt: skip
    assert by_path["/usr/lib/eemini/eemini/guest/__pycache__/pid1.cpython-313.pyc"]["origin"] == {
        "source": "project", "derived_from": "/usr/lib/eemini/eemini/guest/pid1.py"
    }  # fmt: skip
    assert by_path["/dev/console"]["rdev"] == [5, 1]
    assert by_path["/init"]["mode"] == "0755"


def test_image_facts_and_spec_in_the_image() -> None:
    from eemini.guest.image import ImageFacts

    doc = manifest(DEMO_PROFILE)
    facts = doc["image"]
    assert ImageFacts.from_dict(facts).to_dict() == facts  # what PID 1 reads back
    assert facts["profile"] == "local-dev"
    assert facts["attestation"] == "simulated"
    assert facts["network"] == "dhcp"
    assert facts["config_sources"] == ["cmdline", "config-disk"]
    assert facts["kernel"] == RELEASE
    # No kernel modules: every driver is built in.
    assert sorted(facts) == ["attestation", "builder_version", "cmdline", "config_sources",
                             "kernel", "network", "profile", "spec_digest", "workload_path",
                             "workload_sha256"]  # fmt: skip
    assert not [e["path"] for e in doc["initramfs"]["files"] if "/modules/" in e["path"]]
    by_path = {e["path"]: e for e in doc["initramfs"]["files"]}
    workload = (image(DEMO_PROFILE).parent / "spec" / "hello").read_bytes()
    assert facts["workload_sha256"] == hashlib.sha256(workload).hexdigest()
    assert by_path["/app/hello"]["sha256"] == facts["workload_sha256"]
    assert by_path["/etc/eemini/spec.json"]["sha256"] == facts["spec_digest"]
    assert by_path["/etc/eemini/image.json"]["origin"] == {"source": "project"}
    assert doc["cmdline"] == "console=ttyS0 quiet ee.dev=1"
    assert facts["cmdline"] == "console=ttyS0 quiet ee.dev=1"
    assert doc["outputs"]["uki"]["sha256"] == sha256(image(DEMO_PROFILE) / "uki.efi")


def test_the_manifest_repeats_the_image_json_in_the_image() -> None:
    """image.json as cpio unpacks it is the manifest's `image` section, byte for byte, and the
    workload it names is the one the image holds."""
    data = initramfs(DEMO_PROFILE)
    facts = manifest(DEMO_PROFILE)["image"]

    def member(path: str) -> bytes:
        return run("cpio", "-i", "--quiet", "--to-stdout", path.lstrip("/"), stdin=data)

    image_json = member("/etc/eemini/image.json")
    assert image_json == json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
    workload = member(facts["workload_path"])
    assert hashlib.sha256(workload).hexdigest() == facts["workload_sha256"]


def test_every_profile_carries_the_same_kernel_and_the_manifest_says_what_made_it(
    tmp_path: Path,
) -> None:
    pins = lock.load()
    config = kernel.RESOLVED.read_text()
    built = {}
    for name in ("local-dev", "local-tdx-qcow2", "gcp", "azure"):
        uki = image(name) / "uki.efi"
        for section in (".linux", ".uname"):
            run("objcopy", "-O", "binary", f"--only-section={section}", uki, tmp_path / section)
        assert (tmp_path / ".uname").read_bytes() == RELEASE.encode()
        built[name] = hashlib.sha256((tmp_path / ".linux").read_bytes()).hexdigest()
        doc = manifest(name)
        assert doc["kernel"] == {
            "release": RELEASE,
            "source": {"name": "linux-source-7.3", "version": "7.3.4-1~bpo13+1",
                       "sha256": pins.kernel.sha256},
            "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "options_on": len(kernel.enabled_options(config)),
            "toolchain_sha256": kernel.toolchain_key(pins.toolchain),
            "bzimage_sha256": built[name],
        }  # fmt: skip
        assert doc["sizes"]["kernel"] == (tmp_path / ".linux").stat().st_size
    assert len(set(built.values())) == 1, built  # one kernel, one set of measurements


def test_production_image_facts_carry_the_ukis_own_cmdline() -> None:
    """What PID 1 compares /proc/cmdline with: the stub's view of .cmdline, in image.json."""
    from eemini.tdx.measure import predict

    doc = manifest("local-tdx-qcow2")
    facts = doc["image"]
    assert doc["cmdline"] == "console=ttyS0 quiet"
    assert facts["cmdline"] == "console=ttyS0 quiet"
    assert predict((image("local-tdx-qcow2") / "uki.efi").read_bytes()).cmdline == facts["cmdline"]
    assert facts["attestation"] == "configfs-tsm"
    assert facts["config_sources"] == ["config-disk"]
    image_json = json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
    by_path = {e["path"]: e for e in doc["initramfs"]["files"]}
    assert by_path["/etc/eemini/image.json"]["sha256"] == hashlib.sha256(image_json).hexdigest()


# Standard-library modules that only guest/dev/ imports (the dev-mode runner's argparse and
# secrets, and what they import in turn): a production PID 1 never runs them.
DEV_ONLY_STDLIB = {"argparse", "gettext", "secrets", "hmac"}
PRODUCTION = ("gcp", "azure", "local-tdx-qcow2")


def stdlib_modules(doc: dict[str, Any]) -> set[str]:
    """The standard-library modules an image ships, by name, from its SBOM (their .pyc files)."""
    prefix = f"/{pyruntime.STDLIB}/"
    return {
        e["path"][len(prefix) : -len(".pyc")].replace("/", ".").removesuffix(".__init__")
        for e in doc["initramfs"]["files"]
        if e["path"].startswith(prefix) and e["path"].endswith(".pyc")
    }


def guest_paths(doc: dict[str, Any], folder: Path) -> set[str]:
    """What an image's SBOM holds from a folder of src/eemini (sources and their .pyc files)."""
    prefix = f"{pyruntime.GUEST_PREFIX}/{folder.relative_to(pyruntime.SRC).as_posix()}/"
    return {e["path"] for e in doc["initramfs"]["files"] if e["path"].startswith(prefix)}


def test_production_images_carry_no_guest_dev_code_nor_what_only_it_imports() -> None:
    """On the built artefacts: a production image's SBOM has nothing from guest/dev/, and none of
    the standard-library modules only dev code imports; a local-dev image has both (so neither
    check can pass because a name changed)."""
    from eemini.guest.dev import der, devmode, p256, simulated

    dev = GUEST / "dev"
    local_dev = manifest("local-dev")
    shipped = guest_paths(local_dev, dev)
    for module in (simulated, p256, der, devmode):
        source = Path(module.__file__ or "")
        assert source.is_relative_to(dev), f"{module.__name__} is not in {dev}"
        assert f"{pyruntime.GUEST_PREFIX}/{source.relative_to(pyruntime.SRC)}" in shipped
    assert stdlib_modules(local_dev) >= DEV_ONLY_STDLIB
    for profile in PRODUCTION:
        doc = manifest(profile)
        assert guest_paths(doc, dev) == set(), profile
        assert stdlib_modules(doc) & DEV_ONLY_STDLIB == set(), profile
        assert guest_paths(doc, GUEST) > {f"{pyruntime.GUEST_PREFIX}/eemini/guest/pid1.py"}


def test_only_images_with_a_metadata_source_carry_an_http_client() -> None:
    """gcp reads GCE metadata (its image has http.client and the email package it imports);
    local-tdx-qcow2 reads a config disk only, so nothing of either is in its image."""
    assert {"http.client", "email.parser"} <= stdlib_modules(manifest("gcp"))
    shipped = stdlib_modules(manifest("local-tdx-qcow2"))
    assert {m for m in shipped if m.split(".")[0] in ("http", "email")} == set()
    assert "json" in shipped


@pytest.mark.parametrize(
    ("module", "profiles"),
    [
        ("azure", {"azure"}),  # the Azure backend
        ("tpm", {"azure"}),  # and its TPM 2.0 client
        ("metadata", {"gcp", "azure"}),  # the metadata-server client
        ("imds", {"azure"}),  # Azure IMDS boot config
        ("configdisk", {"local-tdx-qcow2", "local-dev"}),
    ],
)
def test_profile_only_modules_ship_only_where_pid1_imports_them(module: str, profiles: set[str]) -> None:
    """The modules PID 1 imports only for some profiles ship in exactly those images, read from
    the SBOMs of all four (so a renamed module fails here rather than passing unseen)."""
    path = f"{pyruntime.GUEST_PREFIX}/eemini/guest/{module}.py"
    assert (GUEST / f"{module}.py").is_file()
    for profile in (*PRODUCTION, "local-dev"):
        shipped = guest_paths(manifest(profile), GUEST)
        assert (path in shipped) == (profile in profiles), profile
        assert f"{pyruntime.GUEST_PREFIX}/eemini/guest/attest.py" in shipped


def _sections(uki: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (size, vma, file offset) as objdump -h reports them."""
    out = run("objdump", "-h", uki).decode()
    rows = re.findall(
        r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", out, re.M
    )
    return {name: (int(size, 16), int(vma, 16), int(off, 16)) for name, size, vma, off in rows}


def test_objdump_shows_the_uki_sections(tmp_path: Path) -> None:
    uki = image(DEMO_PROFILE) / "uki.efi"
    sections = _sections(uki)
    for name in (".linux", ".initrd", ".cmdline", ".osrel", ".uname", ".sbat"):
        assert name in sections
    assert sections[".initrd"][0] == (image(DEMO_PROFILE) / "initramfs.cpio.zst").stat().st_size
    for name in (".osrel", ".cmdline", ".uname", ".initrd", ".linux"):
        assert sections[name][1] % 4096 == 0 and sections[name][2] % 512 == 0, name
    run("objcopy", "-O", "binary", "--only-section=.cmdline", uki, tmp_path / "cmdline")
    assert (tmp_path / "cmdline").read_bytes() == b"console=ttyS0 quiet ee.dev=1"
    info = run("objdump", "-p", uki).decode()
    assert re.search(r"Time/Date\s+Thu Jan  1 00:00:00 1970", info), info[:400]


def _raw_disk(profile: str, dest: Path) -> Path:
    raw = dest / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", image(profile) / "disk.qcow2", raw)
    return raw


def test_sfdisk_and_mtools_read_the_disk(tmp_path: Path) -> None:
    raw = _raw_disk(DEMO_PROFILE, tmp_path)
    table = json.loads(run("sfdisk", "--json", raw))["partitiontable"]
    assert table["label"] == "gpt"
    assert table["firstlba"] == 34
    (part,) = table["partitions"]
    assert part["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert part["start"] == 2048
    assert part["name"] == "EFI System Partition"
    assert raw.stat().st_size == (part["size"] + 4096) * 512
    esp = f"{raw}@@{part['start'] * 512}"
    listing = run("mdir", "-i", esp, "-/", "::").decode()
    assert re.search(
        r"BOOTX64\s+EFI\s+" + str((image(DEMO_PROFILE) / "uki.efi").stat().st_size), listing
    )
    run("mcopy", "-i", esp, "::EFI/BOOT/BOOTX64.EFI", tmp_path / "copy.efi")
    assert (tmp_path / "copy.efi").read_bytes() == (image(DEMO_PROFILE) / "uki.efi").read_bytes()
    if shutil.which("fsck.fat"):
        subprocess.run(["dd", f"if={raw}", f"of={tmp_path / 'esp'}", "bs=1M", "skip=1",
                        f"count={part['size'] // 2048}", "status=none"], check=True)  # fmt: skip
        run("fsck.fat", "-n", tmp_path / "esp")


def test_qemu_img_reads_qcow2_and_fixed_vhd() -> None:
    qcow = json.loads(run("qemu-img", "info", "--output=json", image("local-tdx-qcow2") / "disk.qcow2"))
    assert qcow["format"] == "qcow2"
    assert qcow["virtual-size"] % MIB == 0
    vhd = image("azure") / "disk.vhd"
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "vpc", vhd))
    assert info["format"] == "vpc"
    assert info["virtual-size"] % MIB == 0
    assert vhd.stat().st_size == info["virtual-size"] + 512
    footer = vhd.read_bytes()[-512:]
    assert footer[:8] == b"conectix"
    assert int.from_bytes(footer[60:64], "big") == 2  # disk type: fixed


def test_gce_tarball_holds_one_disk_raw_of_whole_gib() -> None:
    with tarfile.open(image("gcp") / "disk.raw.tar.gz") as tar:
        (member,) = tar.getmembers()
        assert member.name == "disk.raw"
        assert member.size % (1 << 30) == 0
        assert (member.mtime, member.uid, member.gid) == (0, 0, 0)
        f = tar.extractfile(member)
        assert f is not None
        head = f.read(1024)
    assert head[510:512] == b"\x55\xaa" and head[512:520] == b"EFI PART"
    facts = manifest("gcp")["image"]
    assert facts["kernel"] == RELEASE
    assert facts["attestation"] == "configfs-tsm"


@pytest.mark.parametrize("profile", ["local-dev", "local-tdx-qcow2"])
def test_trimmed_interpreter_imports_every_guest_module(tmp_path: Path, profile: str) -> None:
    """Unpack the initramfs and import each shipped guest module with the shipped interpreter."""
    root = tmp_path / "root"
    root.mkdir()
    run("cpio", "-idm", "--quiet", "--no-absolute-filenames", "-D", root, stdin=initramfs(profile))
    sbom = manifest(profile)["initramfs"]["files"]
    prefix = pyruntime.GUEST_PREFIX + "/"
    names = sorted(
        e["path"][len(prefix) : -3].replace("/", ".").removesuffix(".__init__")
        for e in sbom
        if e["path"].startswith(prefix) and e["path"].endswith(".py")
    )
    assert "eemini" in names and "eemini.guest.pid1" in names
    assert ("eemini.guest.dev.simulated" in names) == (profile == "local-dev")
    script = (
        f"import sys; sys.path.insert(0, {str(root) + pyruntime.GUEST_PREFIX!r})\n"
        f"for n in {names!r}: __import__(n)\n"
        "print(sys.prefix)\n"
    )
    loader = root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    out = run(loader, "--library-path", root / "usr/lib/x86_64-linux-gnu", root / "usr/bin/python3.13",
              "-I", "-S", "-c", script)  # fmt: skip
    assert out.decode().strip() == f"{root}/usr"
