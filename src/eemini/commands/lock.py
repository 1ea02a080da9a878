"""`eemini lock`: show or re-resolve the pinned Debian packages."""

from __future__ import annotations

import argparse

from eemini.build import apt, lock
from eemini.log import log_notice

HELP = "show the pinned Debian packages, or re-pin them with --update"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-pin every package to what the Debian suite offers now and rewrite the lock file",
    )


def run(args: argparse.Namespace) -> int:
    if args.update:
        old_lock = lock.load() if lock.LOCK_PATH.exists() else None
        old = {(p.role is lock.Role.TOOLCHAIN, p.name): p
               for p in ([*old_lock.packages, *old_lock.toolchain] if old_lock else [])}  # fmt: skip
        new = lock.resolve(apt.Apt())
        lock.save(new)
        for p in [*new.packages, *new.toolchain]:
            before = old.pop((p.role is lock.Role.TOOLCHAIN, p.name), None)
            if before is None:
                log_notice(f"  added   {p.label}")
            elif before.version != p.version or before.sha256 != p.sha256:
                log_notice(f"  updated {p.name}: {before.version} -> {p.version}")
        for p in old.values():
            log_notice(f"  removed {p.label}")
        log_notice(f"wrote {lock.LOCK_PATH}")
    pins = lock.load()
    for p in [*pins.packages, *pins.toolchain]:
        print(f"{p.name}\t{p.version}\t{p.sha256}\t{p.role.value}")
    return 0
