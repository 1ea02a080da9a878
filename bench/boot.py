"""Boot-to-workload time under TCG: our kernel against Debian's, our PID 1 against a minimal C init.

Every variant boots directly with -kernel/-initrd (firmware time left out), with the same cmdline,
the same initramfs compression and the same QEMU machine (q35, -cpu max, TCG, one vCPU,
virtio-net on a user network, virtio-rng). The workload (bench/boot/workload.c) prints
CLOCK_BOOTTIME on its first line: time since the kernel started, measured inside the guest.

- "eemini PID 1, our kernel" and "eemini PID 1, Debian kernel": the same initramfs (the local-dev
  image with network "none", so the Debian kernel, whose virtio-net is a module nobody loads now,
  is not charged PID 1's wait for a NIC), on our kernel and on Debian's 6.12 cloud kernel (target:
  ours in at most 0.7x Debian's time);
- "C init, our initramfs": that initramfs with a minimal static C init laid over /init, on our
  kernel: the kernel unpacks the whole Python runtime, then the C init runs the workload. PID 1's
  overhead is its time over this one (target: at most 1.3x);
- "Python, then C init": our initramfs with /init a Python script (the interpreter and flags of
  PID 1's /init) that only execs the C init: the interpreter's own start, which no Python PID 1
  can avoid (under TCG most of it is translating code run for the first time);
- "minimal C init": an initramfs with only the C init and the workload, on our kernel;
- "eemini PID 1, DHCP": the local-dev image as shipped (DHCP on the virtio NIC), on our kernel.

Runs alternate, several each; medians and their ratios are printed, and the median of each step
of PID 1's boot timeline (its console line), so a regression shows where it is.

EEMINI_BENCH_BOOT_COMPRESSION (zstd, lz4, none, ...) builds the initramfs images with another
method than the profile's; EEMINI_BENCH_BOOT_RUNS sets the number of boots per variant.
"""

from __future__ import annotations

import dataclasses
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
# The interpreter floor's /init, after PID 1's own /init's first line (interpreter and flags).
PYTHON_INIT_BODY = b'import os\nos.execv("/cinit", ["/cinit"])\n'
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
    reference: Any = importlib.import_module("bench.reference")
    with tempfile.TemporaryDirectory(prefix="eemini-bench-boot-") as tmp:
        work = Path(tmp)
        gcc(HERE / "workload.c", work / "workload")
        gcc(HERE / "mininit.c", work / "mininit")
        (work / "enclave.toml").write_text(SPEC)
        method_name = os.environ.get("EEMINI_BENCH_BOOT_COMPRESSION")
        method_override = compress.Compression(method_name) if method_name else None
        shipped = profile.load("local-dev")
        built = {}
        for name, prof in (
            ("none", dataclasses.replace(shipped, network=profile.Network.NONE)),
            ("dhcp", shipped),
        ):
            image.build(prof, lock.load(), spec.resolve(work / "enclave.toml"), work / name,
                        compression=method_override)  # fmt: skip
            built[name] = work / name
        manifest = json.loads((built["none"] / "manifest.json").read_text())
        cmdline, method = manifest["cmdline"], manifest["initramfs"]["compression"]
        ours_kernel = work / "bzImage"
        subprocess.run(
            ["objcopy", "-O", "binary", "--only-section=.linux",
             os.fspath(built["none"] / "uki.efi"), os.fspath(ours_kernel)],
            check=True,
        )  # fmt: skip
        debian_kernel = reference.debian_vmlinuz()
        ours = next(built["none"].glob("initramfs.cpio*"))
        ours_dhcp = next(built["dhcp"].glob("initramfs.cpio*"))
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
        python_init = image.INIT.split(b"\n", 1)[0] + b"\n" + PYTHON_INIT_BODY
        floor_overlay = newc([
            ("init", 0o100755, python_init, (0, 0)),
            ("cinit", 0o100755, (work / "mininit").read_bytes(), (0, 0)),
        ])  # fmt: skip
        ours_python = work / f"ours-python.cpio.{method}"
        ours_python.write_bytes(
            ours.read_bytes() + compress.compress(floor_overlay, compress.Compression(method))
        )
        print(
            f"kernels: ours {manifest['image']['kernel']} "
            f"({ours_kernel.stat().st_size / 2**20:.2f} MiB), "
            f"Debian {reference.DEBIAN_RELEASE} ({debian_kernel.stat().st_size / 2**20:.2f} MiB); "
            f"cmdline {cmdline!r}, initramfs {method}"
        )
        print(
            f"initramfs sizes: ours {ours.stat().st_size / 2**20:.2f} MiB, "
            f"minimal {minimal.stat().st_size / 2**20:.2f} MiB"
        )
        variants = {
            "eemini PID 1, our kernel": (ours_kernel, ours),
            "eemini PID 1, Debian kernel": (debian_kernel, ours),
            "C init, our initramfs": (ours_kernel, ours_cinit),
            "Python, then C init": (ours_kernel, ours_python),
            "minimal C init": (ours_kernel, minimal),
            "eemini PID 1, DHCP": (ours_kernel, ours_dhcp),
        }
        results: dict[str, list[tuple[float, float, dict[str, float]]]] = {v: [] for v in variants}
        for _ in range(RUNS):
            for name, (kernel, initrd) in variants.items():
                results[name].append(boot(kernel, initrd, cmdline))
        medians = {}
        for name, runs in results.items():
            boottimes = [b for b, _, _ in runs]
            medians[name] = statistics.median(boottimes)
            shown = ", ".join(f"{b:.2f}" for b in boottimes)
            wall = statistics.median(w for _, w, _ in runs)
            print(
                f"{name:<28} kernel start -> workload first line: median {medians[name]:.2f} s "
                f"(runs: {shown}; wall from QEMU start {wall:.2f} s)"
            )
        ours_t, debian_t = medians["eemini PID 1, our kernel"], medians["eemini PID 1, Debian kernel"]
        cinit_t = medians["C init, our initramfs"]
        print(f"our kernel / Debian's, same initramfs: {ours_t / debian_t:.2f}x (target <= 0.7x)")
        print(
            f"eemini PID 1 / C init, same kernel and initramfs: {ours_t / cinit_t:.2f}x (target <= 1.3x)"
        )
        print(
            f"eemini PID 1 / minimal C init: {ours_t / medians['minimal C init']:.2f}x; of the "
            f"{ours_t - medians['minimal C init']:.2f} s difference, "
            f"{cinit_t - medians['minimal C init']:.2f} s is unpacking our initramfs and "
            f"{ours_t - cinit_t:.2f} s is /init to the workload"
        )
        python_t = medians["Python, then C init"]
        print(
            f"interpreter floor: a Python /init that only execs the C init takes "
            f"{python_t - cinit_t:.2f} s more than the C init ({python_t / cinit_t:.2f}x); "
            f"PID 1's own work beyond the interpreter's start: {ours_t - python_t:.2f} s"
        )
        print(f"TCG, one vCPU, {RUNS} runs each")
        for name in ("eemini PID 1, our kernel", "eemini PID 1, Debian kernel", "eemini PID 1, DHCP"):
            timelines = [steps for _, _, steps in results[name] if steps]
            if timelines:
                order = list(timelines[0])
                shown = ", ".join(
                    f"{step} {statistics.median(t[step] for t in timelines if step in t):.2f}"
                    for step in order
                )
                print(f"PID 1 timeline ({name}), median s since kernel start: {shown}")
        sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)
