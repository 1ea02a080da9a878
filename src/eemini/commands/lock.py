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
        old = {p.name: p for p in lock.load().packages} if lock.LOCK_PATH.exists() else {}
        new = lock.resolve(apt.Apt())
        lock.save(new)
        for p in new.packages:
            before = old.get(p.name)
            if before is None:
                log_notice(f"  added   {p.label}")
            elif before.version != p.version or before.sha256 != p.sha256:
                log_notice(f"  updated {p.name}: {before.version} -> {p.version}")
        log_notice(f"wrote {lock.LOCK_PATH}")
    for p in lock.load().packages:
        print(f"{p.name}\t{p.version}\t{p.sha256}\t{p.role.value}")
    return 0
