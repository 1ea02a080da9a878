"""`make bench`: run every benchmark module and print its figures (no pass/fail timing in tests)."""

from __future__ import annotations

import importlib
import sys

# Each module defines main() -> None and prints its own figures on stdout.
BENCHMARKS: list[str] = [
    "runtime",
    "verify",
    "build",
    "tcb",
    "measure",
    "boot",
]


def main() -> int:
    names = sys.argv[1:] or BENCHMARKS
    for name in names:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"bench.{name}").main()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
