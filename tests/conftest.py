from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"


def shared_testdata(sub: str) -> Path:
    """A folder of ../shared/testdata (third-party data kept beside the repo, never in it)."""
    path = SHARED_TESTDATA / sub
    if not path.is_dir():
        pytest.skip(f"third-party test data not present: {path} (it lives beside the repo, not in it)")
    return path


def bare_python(code: str) -> str:
    """What `code` prints, run by this interpreter without site-packages (-S: a .pth file there
    may import anything) and with the eemini package from src/: what a module imports by itself."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "src")},
    )
    return out.stdout
