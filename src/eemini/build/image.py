"""`eemini build`: the recipe, one verb-named step after another."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from eemini import __version__
from eemini.build import compress, cpio, disk, elf, manifest, pyruntime, uki
from eemini.build import kernel as kernel_build
from eemini.build.apt import Apt
from eemini.build.deb import unpacked
from eemini.build.lock import Lock, Role
from eemini.build.profile import Output, Profile
from eemini.build.spec import ResolvedSpec
from eemini.build.tree import PROJECT, Origin, Source, Tree
from eemini.guest.image import IMAGE_JSON, SOCKET, SPEC_JSON, ImageFacts
from eemini.log import complete_step, die

STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
INIT = b'''#!/usr/bin/python3.13 -IS
"""PID 1 of an EasyEnclave Mini image (written by `eemini build`): start the guest runtime."""
import sys
import time

started = time.clock_gettime(time.CLOCK_BOOTTIME)  # the interpreter is up; nothing imported yet
sys.path.insert(0, "/usr/lib/eemini")
from eemini.guest.pid1 import main

main(started=started)
'''
CATEGORIES = ("python-runtime", "guest-runtime", "workload", "layout")


@dataclasses.dataclass(frozen=True)
class Built:
    out: Path
    outputs: dict[str, Path]
    tree: Tree
    sizes: dict[str, int]
    uki_sha256: str


@dataclasses.dataclass
class Context:
    profile: Profile
    lock: Lock
    spec: ResolvedSpec
    out: Path
    work: Path
    apt: Apt
    compression: compress.Compression = compress.DEFAULT
    roots: dict[str, Path] = dataclasses.field(default_factory=dict)
    tree: Tree = dataclasses.field(default_factory=Tree)
    kernel: kernel_build.Kernel | None = None
    outputs: dict[str, Path] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)


DEV_ROOT_FILE = "dev-root.pem"  # simulated profiles: the development root their quotes chain to


def build(profile: Profile, lock: Lock, spec: ResolvedSpec, out: Path, *,
          extra_manifest: dict[str, Any] | None = None,
          compression: compress.Compression | None = None) -> Built:  # fmt: skip
    """Build every output of `profile` into `out` (replacing what an earlier build left there).

    `extra_manifest` adds top-level sections to manifest.json; `compression` overrides the
    profile's initramfs compression (the benchmarks compare methods with it). A build that fails
    leaves no output behind: what it wrote is removed, and so are the directories it made."""
    out = out.absolute()  # the target interpreter reports absolute paths; compare like with like
    made = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    # What an earlier build (maybe of another profile) left would pass for this build's output.
    stale = ["uki.efi", "manifest.json", DEV_ROOT_FILE, *(o.filename for o in Output)]

    def remove_outputs() -> None:
        for path in [*out.glob("initramfs.cpio*"), *(out / name for name in stale)]:
            path.unlink(missing_ok=True)

    remove_outputs()
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as tmp:
            compression = compression or profile.compression
            ctx = Context(profile, lock, spec, out, Path(tmp), Apt(), compression)
            check_workload(ctx)
            fetch_packages(ctx)
            build_kernel(ctx)
            add_layout(ctx)
            add_python(ctx)
            facts = add_image_facts(ctx)
            initrd = make_initramfs(ctx)
            image = make_uki(ctx, initrd)
            make_disks(ctx, image)
            write_dev_root(ctx)
            write_manifest(ctx, facts, {**(extra_manifest or {}), **predicted_measurements(image)})
    except BaseException:
        remove_outputs()
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: someone else's files are there now
                directory.rmdir()
        raise
    return Built(out, ctx.outputs, ctx.tree, ctx.sizes, hashlib.sha256(image).hexdigest())


def predicted_measurements(image: bytes) -> dict[str, Any]:
    """The events this UKI causes at boot, predicted from its bytes (docs/measurements.md)."""
    from eemini.tdx.measure import MeasureError, predict

    with complete_step("Predicting measurement events"):
        try:
            return {"measurements": predict(image).to_json()}
        except MeasureError as e:
            die(f"cannot predict the measurements of the UKI just built: {e}")


def check_workload(ctx: Context) -> None:
    try:
        data = ctx.spec.workload.read_bytes()
    except OSError as e:
        die(f"cannot read the workload {ctx.spec.workload}: {e.strerror}")
    elf.check_static_workload(data, os.fspath(ctx.spec.workload))
    ctx.tree.file(str(ctx.spec.image_path), data, Origin(Source.WORKLOAD), "workload", executable=True)


def fetch_packages(ctx: Context) -> None:
    """The packages whose files go into the image (the kernel source is the kernel build's)."""
    wanted = [p for p in ctx.lock.packages if p.role is not Role.KERNEL]
    with complete_step(f"Fetching {len(wanted)} pinned Debian packages"):
        for pkg in wanted:
            ctx.roots[pkg.name] = unpacked(ctx.apt, pkg)


def build_kernel(ctx: Context) -> None:
    """Our kernel (docs/kernel.md): from the cache, or compiled now from the pinned source."""
    ctx.kernel = kernel_build.ensure(ctx.apt, ctx.lock)


def add_layout(ctx: Context) -> None:
    t = ctx.tree
    for d in ("/proc", "/sys", "/run", "/root", *(os.path.dirname(p) for p in (IMAGE_JSON, SOCKET))):
        t.dir(d)
    t.dir("/tmp", mode=0o1777)
    t.dir("/dev")
    # The kernel opens /dev/console for init's stdio before anything is mounted (init/main.c
    # console_on_rootfs), so the node must be in the archive itself.
    t.chardev("/dev/console", 5, 1, 0o600)
    t.chardev("/dev/null", 1, 3, 0o666)
    t.file("/init", INIT, PROJECT, "layout", executable=True)


def add_python(ctx: Context) -> None:
    python = [(p, ctx.roots[p.name]) for p in ctx.lock.packages if p.role in (Role.PYTHON, Role.LIBRARY)]
    with complete_step("Adding the trimmed Python runtime and the guest runtime"):
        target = pyruntime.Target(python, ctx.work)
        analysis = pyruntime.analyze(target, ctx.profile)
        pyruntime.add_runtime(ctx.tree, target, analysis, ctx.work)
    shutil.rmtree(target.root, ignore_errors=True)


def cmdline_section(ctx: Context) -> bytes:
    """The UKI's `.cmdline`."""
    return ctx.profile.cmdline_text.encode()


def builtin_cmdline(ctx: Context) -> str:
    """The command line the kernel gets from `.cmdline` (systemd-stub's mangling applied): PID 1 of
    a production image refuses to start the workload under any other (docs/pid1.md)."""
    from eemini.tdx.measure import MeasureError, stub_cmdline

    try:
        return stub_cmdline(cmdline_section(ctx))
    except MeasureError as e:
        die(f"profile {ctx.profile.name}: {e}")


def image_facts(ctx: Context) -> ImageFacts:
    """What PID 1 is told about its image; the workload's digest is that of the bytes the image
    holds (check_workload put them in), not of the file as it is now."""
    assert ctx.kernel is not None
    workload = ctx.tree.entries[str(ctx.spec.image_path)].data
    return ImageFacts(
        profile=ctx.profile.name,
        cmdline=builtin_cmdline(ctx),
        attestation=ctx.profile.attestation,
        network=ctx.profile.network,
        config_sources=ctx.profile.config_sources,
        builder_version=__version__,
        kernel=ctx.kernel.release,
        spec_digest=hashlib.sha256(ctx.spec.canonical).hexdigest(),
        workload_sha256=hashlib.sha256(workload).hexdigest(),
        workload_path=str(ctx.spec.image_path),
    )


def add_image_facts(ctx: Context) -> ImageFacts:
    """Put the spec and image.json in the image; return the facts, for the manifest to repeat."""
    ctx.tree.file(SPEC_JSON, ctx.spec.canonical, Origin(Source.WORKLOAD), "workload")
    facts = image_facts(ctx)
    text = json.dumps(facts.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    ctx.tree.file(IMAGE_JSON, text, PROJECT, "layout")
    return facts


def make_initramfs(ctx: Context) -> bytes:
    with complete_step(f"Writing the initramfs ({len(ctx.tree.entries)} entries, {ctx.compression})"):
        archive = cpio.write(ctx.tree)
        data = compress.compress(archive, ctx.compression)
    for category in CATEGORIES:
        ctx.sizes[category] = sum(e.size for e in ctx.tree.entries.values() if e.category == category)
    ctx.sizes["initramfs"] = len(archive)
    ctx.sizes["initramfs-compressed"] = len(data)
    path = ctx.out / f"initramfs.cpio{ctx.compression.suffix}"
    path.write_bytes(data)
    ctx.outputs["initramfs"] = path
    return data


def make_uki(ctx: Context, initrd: bytes) -> bytes:
    assert ctx.kernel is not None
    stub_pkg = ctx.lock.by_role(Role.STUB)[0]
    with complete_step("Assembling the UKI"):
        stub = (ctx.roots[stub_pkg.name] / STUB).read_bytes()
        kernel = ctx.kernel.bzimage.read_bytes()
        image = uki.assemble(stub, {
            ".osrel": uki.os_release(__version__, ctx.profile.name),
            ".cmdline": cmdline_section(ctx),
            ".uname": ctx.kernel.release.encode(),
            ".initrd": initrd,
            ".linux": kernel,
        })  # fmt: skip
    ctx.sizes["kernel"] = len(kernel)
    ctx.sizes["stub"] = len(stub)
    ctx.sizes["uki"] = len(image)
    path = ctx.out / "uki.efi"
    path.write_bytes(image)
    ctx.outputs["uki"] = path
    return image


def make_disks(ctx: Context, image: bytes) -> None:
    digest = hashlib.sha256(image).hexdigest()
    for output in ctx.profile.outputs:
        dest = ctx.out / output.filename
        raw = ctx.work / "disk.raw"
        with complete_step(f"Writing {dest.name}"):
            if output is Output.QCOW2:
                disk.raw_disk(raw, image)
                disk.qcow2(raw, dest)
            elif output is Output.VHD:
                disk.raw_disk(raw, image)
                disk.vhd(raw, dest, digest)
            elif output is Output.GCE:
                # GCE image import wants the raw disk's size to be a whole number of GiB.
                disk.raw_disk(raw, image, min_size=disk.GIB, align=disk.GIB)
                disk.gce_tarball(raw, dest)
            raw.unlink()
        ctx.outputs[output.value] = dest


def write_dev_root(ctx: Context) -> None:
    """A simulated (local-dev) image's quotes chain to the published development root: put it
    beside the image, for `eemini verify --trust-dev-root` (it is the same for every build)."""
    if not ctx.profile.simulated:
        return
    from eemini.guest.dev.simulated import dev_root_pem

    path = ctx.out / DEV_ROOT_FILE
    path.write_bytes(dev_root_pem())
    ctx.outputs["dev-root"] = path


def kernel_facts(ctx: Context) -> dict[str, Any]:
    """What the kernel was made of, for the manifest: source, configuration, toolchain, result."""
    assert ctx.kernel is not None
    info = ctx.kernel.info()
    return {
        "release": ctx.kernel.release,
        "source": info["source"],
        "config_sha256": info["config_sha256"],
        "options_on": info["options_on"],
        "toolchain_sha256": info["toolchain"],
        "bzimage_sha256": info["bzimage_sha256"],
    }


def write_manifest(ctx: Context, facts: ImageFacts, extra: dict[str, Any]) -> None:
    from eemini.build.manifest import sbom

    outputs = {}
    for name, path in sorted(ctx.outputs.items()):
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        outputs[name] = {"file": path.name, "sha256": h, "size": path.stat().st_size}
    sections = {
        "builder": {"name": "eemini", "version": __version__},
        "profile": ctx.profile.name,
        "image": facts.to_dict(),
        "cmdline": ctx.profile.cmdline_text,
        "packages": [
            {"name": p.name, "version": p.version, "sha256": p.sha256, "role": p.role.value}
            for p in ctx.lock.packages
        ],
        "kernel": kernel_facts(ctx),
        "outputs": outputs,
        "sizes": ctx.sizes,
        "initramfs": {"compression": ctx.compression.value, "files": sbom(ctx.tree)},
    }
    path = ctx.out / "manifest.json"
    manifest.write(path, sections, extra)
    ctx.outputs["manifest"] = path
