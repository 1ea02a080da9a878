"""`eemini build`: enclave.toml + profile -> UKI, disk images and manifest.json."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eemini.build import image, lock, profile, spec
from eemini.build.image import Built
from eemini.log import log_notice

HELP = "build the image (UKI, disk, manifest) for one profile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", type=Path, default=Path("enclave.toml"), metavar="FILE",
                        help="the enclave spec (default: ./enclave.toml)")  # fmt: skip
    parser.add_argument("--profile", required=True, metavar="NAME",
                        help=f"target profile: {', '.join(profile.available())}")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: build/PROFILE/)"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):7.2f} MiB"


def print_sizes(built: Built) -> None:
    s = built.sizes
    rows = [
        ("kernel (bzImage)", s["kernel"]),
        ("Python runtime", s["python-runtime"]),
        ("guest runtime", s["guest-runtime"]),
        ("workload + spec", s["workload"]),
        ("layout, /init, image facts", s["layout"]),
        ("initramfs (cpio)", s["initramfs"]),
        ("initramfs compressed", s["initramfs-compressed"]),
        ("UKI", s["uki"]),
    ]
    log_notice("Size breakdown:")
    for label, value in rows:
        log_notice(f"  {label:<28} {_mib(value)}")
    ratio = s["initramfs-compressed"] / s["initramfs"] if s["initramfs"] else 0.0
    log_notice(f"  {'compression ratio':<28} {ratio:7.3f}")


def run(args: argparse.Namespace) -> int:
    prof = profile.load(args.profile)
    resolved = spec.resolve(args.file)
    out = args.out if args.out is not None else Path("build") / prof.name
    built = image.build(prof, lock.load(), resolved, out)
    print_sizes(built)
    for name, path in sorted(built.outputs.items()):
        print(f"{name}\t{os.fspath(path)}")
    return 0
