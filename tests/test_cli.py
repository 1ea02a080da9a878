from __future__ import annotations

import subprocess
import sys

import pytest

from eemini import __version__
from eemini.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"eemini {__version__}\n"


def test_usage_error_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eemini", "no-such-command"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'no-such-command'" in proc.stderr
