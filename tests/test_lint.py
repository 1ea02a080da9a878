"""The linters and the type checker are part of the test suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def _run(*argv: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_check() -> None:
    _run("ruff", "check", "src", "tests", "bench")


def test_ruff_format() -> None:
    _run("ruff", "format", "--check", "src", "tests", "bench")


def test_mypy_strict() -> None:
    _run("mypy")


def test_no_tracked_file_is_ignored() -> None:
    # A tracked build output (examples/attest-echo/build/ is ignored) would be rewritten by every
    # `make demo` and show up as a change.
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    assert proc.stdout == ""
