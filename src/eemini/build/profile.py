"""Profiles: one data file per target under profiles/ (what goes into the image and what comes out)."""

from __future__ import annotations

import dataclasses
import tomllib
from enum import StrEnum
from pathlib import Path

from eemini.build.compress import DEFAULT as DEFAULT_COMPRESSION
from eemini.build.compress import Compression
from eemini.build.lock import REPO
from eemini.guest.image import Attestation, ConfigSource, Network
from eemini.log import die

PROFILES_DIR = REPO / "profiles"


class Output(StrEnum):
    QCOW2 = "qcow2"  # disk.qcow2
    GCE = "gce-tar"  # disk.raw.tar.gz holding disk.raw, as GCE image import wants
    VHD = "vhd"  # fixed VHD, size a whole number of MiB (Azure)

    @property
    def filename(self) -> str:
        return {"qcow2": "disk.qcow2", "gce-tar": "disk.raw.tar.gz", "vhd": "disk.vhd"}[self.value]


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    attestation: Attestation
    network: Network
    config_sources: tuple[ConfigSource, ...]
    cmdline: tuple[str, ...]
    outputs: tuple[Output, ...]
    # Size against boot time (docs/build.md, "Compression"): zstd unless the profile says otherwise.
    compression: Compression = DEFAULT_COMPRESSION

    @property
    def simulated(self) -> bool:
        return self.attestation is Attestation.SIMULATED

    @property
    def cmdline_text(self) -> str:
        return " ".join(self.cmdline)


KEYS = {"description", "attestation", "network", "config_sources", "cmdline", "outputs"}
OPTIONAL_KEYS = {"initramfs_compression"}


def available() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load(name: str, directory: Path = PROFILES_DIR) -> Profile:
    path = directory / f"{name}.toml"
    if not path.is_file():
        die(f"there is no profile {name!r}", hint=f"choose one of: {', '.join(available())}")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        die(f"profile {path} is not valid TOML: {e}")
    if "modules" in doc:
        die(
            f"profile {path}: `modules` is no longer a profile key: the kernel has no loadable "
            "modules, every driver an image needs is built in (kernel/fragment.config)",
            hint="remove the `modules` list from the profile",
        )
    unknown = set(doc) - KEYS - OPTIONAL_KEYS
    missing = KEYS - set(doc)
    if unknown or missing:
        die(f"profile {path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")

    def strings(key: str) -> tuple[str, ...]:
        value = doc[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            die(f"profile {path}: {key} must be a list of strings")
        return tuple(value)

    try:
        attestation = Attestation(doc["attestation"])
        network = Network(doc["network"])
        outputs = tuple(Output(o) for o in strings("outputs"))
    except ValueError as e:
        die(f"profile {path}: {e}")
    method = doc.get("initramfs_compression", DEFAULT_COMPRESSION.value)
    try:
        compression = Compression(method)
    except ValueError:
        die(
            f"profile {path}: initramfs_compression {method!r} is not one of "
            f"{', '.join(c.value for c in Compression)}"
        )
    names = strings("config_sources")
    known = {s.value for s in ConfigSource}
    bad = set(names) - known
    if bad:
        die(f"profile {path}: unknown config sources {sorted(bad)} (known: {sorted(known)})")
    sources = tuple(ConfigSource(n) for n in names)
    if ConfigSource.CMDLINE in sources and attestation.production:
        die(
            f"profile {path}: the config source 'cmdline' is for simulated (local-dev) images only: "
            "a production image refuses any kernel command line but the UKI's own, and a host's "
            "ee.KEY=VALUE would replace that one entirely",
            hint="take 'cmdline' out of config_sources; a config disk or the cloud's metadata "
            "carries boot config for production images",
        )
    cmdline = strings("cmdline")
    if "console=ttyS0" not in cmdline:
        die(f"profile {path}: the cmdline must include console=ttyS0 (the serial console)")
    if ("ee.dev=1" in cmdline) != (attestation is Attestation.SIMULATED):
        die(f"profile {path}: ee.dev=1 must be in the cmdline exactly when attestation is simulated")
    return Profile(name, str(doc["description"]), attestation, network, sources, cmdline, outputs,
                   compression)  # fmt: skip
