"""Built images for tests: each profile built once per test session, through the real CLI.

Other test modules use `image("local-dev")` to get a directory holding uki.efi, the disk image(s),
the initramfs and manifest.json.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_DIR = REPO / "tests" / "data" / "workload"
DEMO_HASH = REPO / "tests" / "data" / "demo-uki.sha256"
DEMO_PROFILE = "local-dev"

_session: dict[str, Path] = {}


def _root() -> Path:
    if "root" not in _session:
        root = Path(tempfile.mkdtemp(prefix="eemini-images-"))
        atexit.register(shutil.rmtree, root, True)
        _session["root"] = root
    return _session["root"]


def workload_spec(dest: Path) -> Path:
    """Copy the test spec to dest and compile its static workload next to it (no paths inside)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(WORKLOAD_DIR / "enclave.toml", dest / "enclave.toml")
    shutil.copy(WORKLOAD_DIR / "hello.c", dest / "hello.c")
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", "hello", "hello.c"], cwd=dest, check=True)
    return dest / "enclave.toml"


def build(profile: str, out: Path, spec: Path, *, umask: int = 0o022, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `eemini build` in a subprocess (own umask, environment and working directory)."""
    full_env = {**os.environ, **(env or {})}

    def preexec() -> None:
        os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "eemini", "build", "-f", os.fspath(spec), "--profile", profile, "--out",
         os.fspath(out)],
        env=full_env, cwd=cwd or out.parent, preexec_fn=preexec, capture_output=True, text=True,
        check=False,
    )  # fmt: skip


def image(profile: str) -> Path:
    """The output directory of `profile`, built once per session."""
    key = f"image:{profile}"
    if key not in _session:
        root = _root()
        spec = workload_spec(root / "spec")
        out = root / profile
        proc = build(profile, out, spec)
        if proc.returncode != 0:
            raise RuntimeError(f"eemini build --profile {profile} failed:\n{proc.stderr}")
        _session[key] = out
    return _session[key]
