"""The enclave spec as the builder needs it: canonical JSON with the in-image workload path.

`eemini.spec` reads and validates enclave.toml; the builder rewrites `workload.path` to
`/app/<basename>` (the contract with the guest) before the JSON goes into the image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePosixPath

from eemini.guest.record import replace
from eemini.spec import load_spec

APP_DIR = PurePosixPath("/app")


@dataclasses.dataclass(frozen=True)
class ResolvedSpec:
    canonical: bytes  # what goes to /etc/eemini/spec.json, and whose sha256 is the spec digest
    workload: Path  # the workload binary on the build host
    image_path: PurePosixPath  # where the image holds it


def resolve(file: Path) -> ResolvedSpec:
    spec = load_spec(file)
    workload = Path(spec.workload.path)
    image_path = APP_DIR / workload.name
    in_image = replace(spec.workload, path=str(image_path))
    resolved = replace(spec, workload=in_image)
    return ResolvedSpec(resolved.canonical_json(), workload, image_path)
