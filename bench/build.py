"""Image builder figures: our kernel next to Debian's (sizes, cold build time), size breakdown,
UKI size, compression choice, warm-cache build time.

The kernel's cold build time is the one recorded when the cached kernel was built (build.json);
EEMINI_BENCH_KERNEL_COLD=1 builds it again now in an empty cache directory and times that
(about 11 minutes on 2 cores).

Compression: each method's initramfs size, compression time, host decompression time, and in the
guest the uptime at which PID 1 starts (TCG, one vCPU: the kernel decompresses the initramfs
before it runs /init, so the difference between methods is their cost at boot).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.reference import DEBIAN_RELEASE, debian_vmlinuz
from eemini.build import compress, cpio, image, kernel, lock, profile, spec, uki
from eemini.build.apt import Apt, cache_dir
from eemini.build.compress import Compression
from eemini.build.deb import unpacked
from eemini.build.image import STUB

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import images

MIB = 1 << 20
DECOMPRESS = {
    Compression.ZSTD: ["zstd", "-dc"],
    Compression.XZ: ["xz", "-dc"],
    Compression.GZIP: ["gzip", "-dc"],
    Compression.LZ4: ["lz4", "-dc"],
}
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def mib(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


def boot_uptime(disk: Path, work: Path) -> float | None:
    """Uptime (s) PID 1 reports when it starts, booting the disk under OVMF (TCG)."""
    if shutil.which("qemu-system-x86_64") is None or not OVMF_CODE.exists():
        return None
    vars_copy = work / "vars.fd"
    shutil.copy(OVMF_VARS, vars_copy)
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-drive", f"if=virtio,format=qcow2,file={disk},snapshot=on"]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    found = None
    try:
        for line in proc.stdout:
            m = re.search(rb"PID 1 starting \(.*uptime ([0-9.]+) s\)", line)
            if m:
                found = float(m[1])
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    return found


def kernel_figures(uki_path: Path, pins: lock.Lock, work: Path) -> None:
    """Our kernel and the demo UKI next to Debian's cloud kernel and a UKI carrying it."""
    ours = kernel.ensure(Apt(), pins)
    info = ours.info()
    debian = debian_vmlinuz()
    data = uki_path.read_bytes()
    payloads = {
        sec.name: data[sec.raw_pointer : sec.raw_pointer + sec.virtual_size]
        for sec in uki.sections(data)
        if sec.name in uki.SECTION_ORDER
    }
    stub_pkg = pins.by_role(lock.Role.STUB)[0]
    stub = (unpacked(Apt(), stub_pkg) / STUB).read_bytes()
    with_debian = uki.assemble(stub, {**payloads, ".linux": debian.read_bytes(),
                                      ".uname": DEBIAN_RELEASE.encode()})  # fmt: skip
    print(f"kernel: ours {ours.release} {mib(ours.bzimage.stat().st_size)}, "
          f"{info['options_on']} options on, no modules; Debian's {DEBIAN_RELEASE} "
          f"{mib(debian.stat().st_size)} (plus the modules an image loads)")  # fmt: skip
    print(f"UKI (demo image, local-dev): {mib(len(data))} (target <= 8 MiB, stretch 6 MiB); "
          f"the same UKI with Debian's kernel: {mib(len(with_debian))}")  # fmt: skip
    print(f"kernel build from a cold cache, as recorded: {info['build_seconds'] / 60:.1f} min "
          f"with {info['jobs']} jobs ({info['steps']} steps)")  # fmt: skip
    if os.environ.get("EEMINI_BENCH_KERNEL_COLD") == "1":
        env = {**os.environ, "EEMINI_CACHE_DIR": os.fspath(work / "cold-cache")}
        (work / "cold-cache").mkdir()
        (work / "cold-cache" / "debs").symlink_to(cache_dir() / "debs")  # downloads are not timed
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "eemini", "kernel"], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        print(f"kernel build from a cold cache, now: {(time.monotonic() - start) / 60:.1f} min "
              "(tools tree unpacked, source unpacked, configured, compiled)")  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="eemini-bench-") as tmp:
        work = Path(tmp)
        spec_file = images.demo_spec(work / "demo")  # examples/attest-echo, as `make demo` builds it
        prof = profile.load("local-dev")
        pins = lock.load()
        resolved = spec.resolve(spec_file)
        image.build(prof, pins, resolved, work / "warm")  # fills the package cache
        start = time.monotonic()
        built = image.build(prof, pins, resolved, work / "out")
        elapsed = time.monotonic() - start
        s = built.sizes
        print(f"warm-cache build time (local-dev, all outputs): {elapsed:.1f} s")
        kernel_figures(built.out / "uki.efi", pins, work)
        print("size breakdown (uncompressed):")
        for label, key in (("kernel (bzImage)", "kernel"), ("Python runtime", "python-runtime"),
                           ("guest runtime", "guest-runtime"), ("workload + spec", "workload"),
                           ("layout, /init, image facts", "layout"),
                           ("initramfs total", "initramfs")):  # fmt: skip
            print(f"  {label:<28} {mib(s[key]):>12}")
        # Python + guest runtime alone, compressed the way the image is.
        sub = type(built.tree)()
        for e in built.tree.sorted():
            if e.category in ("python-runtime", "guest-runtime"):
                sub.add(e)
        py = compress.compress(cpio.write(sub))
        print(f"Python runtime + guest runtime, zstd -19: {mib(len(py))} (target <= 5 MiB)")

        archive = cpio.write(built.tree)
        print(f"compression of the {mib(len(archive))} initramfs:")
        header = ("method", "size", "compress", "host decompress", "PID 1 at uptime")
        print("  {:<8} {:>11} {:>9} {:>16} {:>16}".format(*header))
        for method in (Compression.ZSTD, Compression.XZ, Compression.GZIP, Compression.LZ4):
            t0 = time.monotonic()
            data = compress.compress(archive, method)
            t1 = time.monotonic()
            subprocess.run(DECOMPRESS[method], input=data, capture_output=True, check=True)
            t2 = time.monotonic()
            out = work / f"c-{method.value}"
            image.build(prof, pins, resolved, out, compression=method)
            uptime = boot_uptime(out / "disk.qcow2", work)
            shown = f"{uptime:.2f} s" if uptime is not None else "n/a"
            row = (method.value, mib(len(data)), f"{t1 - t0:.1f} s", f"{(t2 - t1) * 1000:.0f} ms", shown)
            print("  {:<8} {:>11} {:>9} {:>16} {:>16}".format(*row))
