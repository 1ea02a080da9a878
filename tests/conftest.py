from __future__ import annotations

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
