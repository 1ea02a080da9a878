"""enclave.toml -> the resolved enclave spec (canonical JSON), on the host.

The guest validates the same way (`eemini.guest.spec.EnclaveSpec.from_dict`); here we add what only
the host can know: TOML syntax, and where the workload binary is.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from eemini.guest.spec import EnclaveSpec, SpecError, WorkloadSpec
from eemini.log import die

__all__ = ["EnclaveSpec", "SpecError", "load_spec", "parse_spec"]


def parse_spec(text: str, base: Path, *, source: str = "enclave.toml") -> EnclaveSpec:
    """Parse TOML text; a relative workload.path is resolved against `base`. Raises SpecError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    spec = EnclaveSpec.from_dict(doc)
    path = Path(spec.workload.path)
    if not path.is_absolute():
        path = (base / path).absolute()
    w = spec.workload
    return EnclaveSpec(
        WorkloadSpec(os.fspath(path), w.args, w.env, w.restart, w.on_exit, w.inherit_token, w.allow_env)
    )


def load_spec(file: Path, *, check_workload: bool = True) -> EnclaveSpec:
    """Read enclave.toml; user errors (missing file, bad key, missing workload) go through die()."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        die(f"{file}: no such file", hint="pass the enclave spec with -f FILE")
    except (OSError, UnicodeDecodeError) as e:
        die(f"{file}: cannot read: {e}")
    try:
        spec = parse_spec(text, file.parent, source=os.fspath(file))
    except SpecError as e:
        die(f"{file}: {e}")
    if check_workload:
        path = Path(spec.workload.path)
        if not path.is_file():
            die(f"{file}: workload.path: {path} is not a file")
        if not os.access(path, os.X_OK):
            die(f"{file}: workload.path: {path} is not executable", hint=f"chmod +x {path}")
    return spec
