"""`eemini kernel`: build (or find in the cache) the image's kernel; regenerate kernel/config."""

from __future__ import annotations

import argparse

from eemini.build import apt, kernel, lock
from eemini.log import log_notice

HELP = "build the kernel from the pinned source (cached), or regenerate kernel/config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--update-config",
        action="store_true",
        help="only configure the pinned source with kernel/fragment.config and rewrite "
        "kernel/config (review the diff and commit it); builds nothing",
    )


def run(args: argparse.Namespace) -> int:
    pins = lock.load()
    if args.update_config:
        resolved = kernel.configure(apt.Apt(), pins)
        old = kernel.RESOLVED.read_text() if kernel.RESOLVED.exists() else ""
        changes = kernel.config_difference(old, resolved) if old else []
        kernel.RESOLVED.write_text(resolved)
        for line in changes:
            log_notice(f"  {line}")
        on = len(kernel.enabled_options(resolved))
        log_notice(f"wrote {kernel.RESOLVED} ({on} options on, {len(changes)} changed)")
        return 0
    built = kernel.ensure(apt.Apt(), pins)
    info = built.info()
    print(f"release\t{built.release}")
    print(f"bzImage\t{built.bzimage}")
    print(f"sha256\t{info['bzimage_sha256']}")
    print(f"size\t{info['bzimage_size']}")
    print(f"options_on\t{info['options_on']}")
    print(f"build_seconds\t{info['build_seconds']}")
    return 0
