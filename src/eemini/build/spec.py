"""The enclave spec as the builder needs it: canonical JSON with the in-image workload path.

Uses `eemini.spec` (the host-side spec reader) when present. TEMPORARY: until that module is
merged, a minimal reader of enclave.toml stands in (workload.path required; other keys passed
through); it goes away as soon as `eemini.spec` exists in this tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from eemini.log import die

APP_DIR = PurePosixPath("/app")


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    canonical: bytes  # what goes to /etc/eemini/spec.json, and whose sha256 is the spec digest
    workload: Path  # the workload binary on the build host
    image_path: PurePosixPath  # where the image holds it


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def resolve(file: Path) -> ResolvedSpec:
    try:
        module: Any = importlib.import_module("eemini.spec")
    except ModuleNotFoundError:
        return _resolve_minimal(file)
    spec = module.load_spec(file)
    workload = Path(spec.workload.path)
    image_path = APP_DIR / workload.name
    resolved = dataclasses.replace(
        spec, workload=dataclasses.replace(spec.workload, path=str(image_path))
    )
    return ResolvedSpec(resolved.canonical_json(), workload, image_path)


def _resolve_minimal(file: Path) -> ResolvedSpec:
    try:
        doc = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        die(f"{file}: no such file", hint="pass the enclave spec with -f FILE")
    except tomllib.TOMLDecodeError as e:
        die(f"{file}: not valid TOML: {e}")
    workload = doc.get("workload")
    if not isinstance(workload, dict) or not isinstance(workload.get("path"), str):
        die(f"{file}: [workload] path is required")
    path = Path(workload["path"])
    if not path.is_absolute():
        path = (file.parent / path).absolute()
    if not path.is_file():
        die(f"{file}: workload.path: {path} is not a file")
    image_path = APP_DIR / path.name
    resolved = dict(doc)
    resolved["workload"] = {**workload, "path": os.fspath(image_path)}
    return ResolvedSpec(canonical_json(resolved), path, image_path)
