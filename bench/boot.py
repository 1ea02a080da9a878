"""Boot-to-workload time under TCG: our PID 1 next to a minimal static C init.

Both boot the same kernel (the `.linux` section of the built UKI) with the same cmdline, the same
initramfs compression and the same QEMU machine (q35, -cpu max, TCG, virtio-net on a user
network), directly with -kernel/-initrd so firmware time is left out of both. The workload
(bench/boot/workload.c) prints CLOCK_BOOTTIME on its first line: time since the kernel started,
measured inside the guest. The baseline initramfs holds only the C init, the workload and
/dev/console. A third variant boots our initramfs with the same C init laid over /init: the kernel
unpacks the whole Python runtime, then the C init runs the workload, so its difference to the
baseline is what carrying CPython costs before PID 1 runs a single instruction. Runs alternate,
several each; medians and their ratio are printed (target <= 1.5x), and the median of each step
of PID 1's boot timeline (its console line), so a regression shows where it is.

EEMINI_BENCH_BOOT_COMPRESSION (zstd, lz4, none, ...) builds both initramfs images with another
method than the profile's; EEMINI_BENCH_BOOT_RUNS sets the number of boots per variant.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "boot"
RUNS = int(os.environ.get("EEMINI_BENCH_BOOT_RUNS", "5"))
LINE = re.compile(r"bench: first line at boottime (\d+\.\d+) s")
TIMELINE = re.compile(r"boot timeline \(s since kernel start\): (.*)")
SPEC = """\
[workload]
path = "workload"
restart = "never"
on_exit = "poweroff"
"""


def newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A cpio newc archive: (name, mode, data, (rdev major, minor)) entries, owner 0:0, mtime 0."""
    out = bytearray()
    for ino, (name, mode, data, (major, minor)) in enumerate(
        [*entries, ("TRAILER!!!", 0, b"", (0, 0))], 1
    ):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def gcc(source: Path, out: Path) -> None:
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", os.fspath(out), os.fspath(source)], check=True)


def boot(
    kernel: Path, initrd: Path, cmdline: str, timeout: float = 300.0
) -> tuple[float, float, dict[str, float]]:
    """(boottime of the workload's first line, wall seconds from QEMU start to that line,
    PID 1's timeline steps when it printed one)."""
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", os.fspath(kernel), "-initrd", os.fspath(initrd), "-append", cmdline,
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, errors="replace"
    )
    assert proc.stdout is not None
    steps: dict[str, float] = {}
    try:
        for line in proc.stdout:
            t = TIMELINE.search(line)
            if t:
                for item in t.group(1).split(", "):
                    step, _, at = item.rpartition(" ")
                    steps[step] = float(at)
            m = LINE.search(line)
            if m:
                wall = time.monotonic() - start
                proc.wait(timeout)
                return float(m.group(1)), wall, steps
            if time.monotonic() - start > timeout:
                break
        raise RuntimeError(f"no workload line within {timeout} s (QEMU status {proc.poll()})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    image: Any = importlib.import_module("eemini.build.image")
    lock: Any = importlib.import_module("eemini.build.lock")
    profile: Any = importlib.import_module("eemini.build.profile")
    spec: Any = importlib.import_module("eemini.build.spec")
    compress: Any = importlib.import_module("eemini.build.compress")
    with tempfile.TemporaryDirectory(prefix="eemini-bench-boot-") as tmp:
        work = Path(tmp)
        gcc(HERE / "workload.c", work / "workload")
        gcc(HERE / "mininit.c", work / "mininit")
        (work / "enclave.toml").write_text(SPEC)
        out = work / "out"
        method_name = os.environ.get("EEMINI_BENCH_BOOT_COMPRESSION")
        image.build(
            profile.load("local-dev"),
            lock.load(),
            spec.resolve(work / "enclave.toml"),
            out,
            compression=compress.Compression(method_name) if method_name else None,
        )
        manifest = json.loads((out / "manifest.json").read_text())
        cmdline, method = manifest["cmdline"], manifest["initramfs"]["compression"]
        kernel = work / "vmlinuz"
        subprocess.run(
            [
                "objcopy",
                "-O",
                "binary",
                "--only-section=.linux",
                os.fspath(out / "uki.efi"),
                os.fspath(kernel),
            ],
            check=True,
        )
        ours = next(out.glob("initramfs.cpio*"))
        archive = newc([
            ("dev", 0o40755, b"", (0, 0)),
            ("dev/console", 0o20600, b"", (5, 1)),
            ("app", 0o40755, b"", (0, 0)),
            ("app/workload", 0o100755, (work / "workload").read_bytes(), (0, 0)),
            ("init", 0o100755, (work / "mininit").read_bytes(), (0, 0)),
        ])  # fmt: skip
        minimal = work / f"minimal.cpio.{method}"
        minimal.write_bytes(compress.compress(archive, compress.Compression(method)))
        # The kernel unpacks concatenated archives in order; a later /init replaces the earlier.
        overlay = newc([("init", 0o100755, (work / "mininit").read_bytes(), (0, 0))])
        ours_cinit = work / f"ours-cinit.cpio.{method}"
        ours_cinit.write_bytes(
            ours.read_bytes() + compress.compress(overlay, compress.Compression(method))
        )
        print(f"kernel {manifest['image']['kernel']}, cmdline {cmdline!r}, initramfs {method}")
        print(
            f"initramfs sizes: ours {ours.stat().st_size / 2**20:.2f} MiB, "
            f"minimal {minimal.stat().st_size / 2**20:.2f} MiB"
        )
        variants = {
            "eemini PID 1": ours,
            "minimal C init": minimal,
            "C init, our initramfs": ours_cinit,
        }
        results: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in variants}
        for _ in range(RUNS):
            for name, initrd in variants.items():
                results[name].append(boot(kernel, initrd, cmdline))
        medians = {}
        for name, runs in results.items():
            boottimes = [b for b, _, _ in runs]
            medians[name] = statistics.median(boottimes)
            shown = ", ".join(f"{b:.2f}" for b in boottimes)
            wall = statistics.median(w for _, w, _ in runs)
            print(
                f"{name:<22} kernel start -> workload first line: median {medians[name]:.2f} s "
                f"(runs: {shown}; wall from QEMU start {wall:.2f} s)"
            )
        ratio = medians["eemini PID 1"] / medians["minimal C init"]
        print(f"ratio eemini / minimal: {ratio:.2f}x (target <= 1.5x), TCG, {RUNS} runs each")
        unpack = medians["C init, our initramfs"] - medians["minimal C init"]
        own = medians["eemini PID 1"] - medians["C init, our initramfs"]
        print(
            f"of the {medians['eemini PID 1'] - medians['minimal C init']:.2f} s difference: "
            f"{unpack:.2f} s unpacking our initramfs, {own:.2f} s from /init to the workload"
        )
        timelines = [steps for _, _, steps in results["eemini PID 1"] if steps]
        if timelines:
            order = list(timelines[0])
            shown = ", ".join(
                f"{step} {statistics.median(t[step] for t in timelines if step in t):.2f}"
                for step in order
            )
            print(f"PID 1 timeline, median s since kernel start: {shown}")
        sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)
