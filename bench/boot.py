"""Boot-to-workload time under TCG: our PID 1 next to a minimal static C init.

Both boot the same kernel (the `.linux` section of the built UKI) with the same cmdline, the same
initramfs compression and the same QEMU machine (q35, -cpu max, TCG, virtio-net on a user
network), directly with -kernel/-initrd so firmware time is left out of both. The workload
(bench/boot/workload.c) prints CLOCK_BOOTTIME on its first line: time since the kernel started,
measured inside the guest. The baseline initramfs holds only the C init, the workload and
/dev/console. Runs alternate, several each; medians and their ratio are printed (target <= 1.5x).
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
RUNS = 3
LINE = re.compile(r"bench: first line at boottime (\d+\.\d+) s")
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


def boot(kernel: Path, initrd: Path, cmdline: str, timeout: float = 300.0) -> tuple[float, float]:
    """(boottime of the workload's first line, wall seconds from QEMU start to that line)."""
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
    try:
        for line in proc.stdout:
            m = LINE.search(line)
            if m:
                wall = time.monotonic() - start
                proc.wait(timeout)
                return float(m.group(1)), wall
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
        image.build(profile.load("local-dev"), lock.load(), spec.resolve(work / "enclave.toml"), out)
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
        print(f"kernel {manifest['image']['kernel']}, cmdline {cmdline!r}, initramfs {method}")
        print(
            f"initramfs sizes: ours {ours.stat().st_size / 2**20:.2f} MiB, "
            f"minimal {minimal.stat().st_size / 2**20:.2f} MiB"
        )
        results: dict[str, list[tuple[float, float]]] = {"eemini PID 1": [], "minimal C init": []}
        for _ in range(RUNS):
            results["eemini PID 1"].append(boot(kernel, ours, cmdline))
            results["minimal C init"].append(boot(kernel, minimal, cmdline))
        medians = {}
        for name, runs in results.items():
            boottimes = [b for b, _ in runs]
            medians[name] = statistics.median(boottimes)
            shown = ", ".join(f"{b:.2f}" for b in boottimes)
            wall = statistics.median(w for _, w in runs)
            print(
                f"{name:<15} kernel start -> workload first line: median {medians[name]:.2f} s "
                f"(runs: {shown}; wall from QEMU start {wall:.2f} s)"
            )
        ratio = medians["eemini PID 1"] / medians["minimal C init"]
        print(f"ratio eemini / minimal: {ratio:.2f}x (target <= 1.5x), TCG, {RUNS} runs each")
        sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)
