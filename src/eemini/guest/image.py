"""The image facts: what the builder tells PID 1 about the image it is in (`image.json`).

The builder (`eemini.build.image`) writes `ImageFacts.to_dict()` as `/etc/eemini/image.json`
and into the manifest; PID 1 reads the file back with `ImageFacts.from_dict`, which refuses
anything it does not know and names the key at fault (`ImageError`). The kinds, the config-source
names and the paths that both sides use are defined here and nowhere else.
"""

from __future__ import annotations

import enum

from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    E = TypeVar("E", bound=enum.StrEnum)

# Where the builder puts what PID 1 reads, and where PID 1 serves the control socket.
IMAGE_JSON = "/etc/eemini/image.json"
SPEC_JSON = "/etc/eemini/spec.json"
SOCKET = "/var/lib/easyenclave/agent.sock"


class ImageError(ValueError):
    """image.json is not what this runtime understands; the message names the key."""


class Attestation(enum.StrEnum):
    """Where quotes come from (one backend each, chosen in `eemini.guest.pid1.Boot.backend`)."""

    CONFIGFS_TSM = "configfs-tsm"
    AZURE_TDX_VTPM = "azure-tdx-vtpm"  # Azure's paravisor: the vTPM, the HCL report, IMDS
    SIMULATED = "simulated"  # local-dev: a development chain signs (eemini.guest.dev)

    @property
    def production(self) -> bool:
        """A real TEE: PID 1 runs the workload only under the UKI's own command line."""
        return self is not Attestation.SIMULATED


class Network(enum.StrEnum):
    DHCP = "dhcp"  # on the first NIC, unless boot config sets a static address
    NONE = "none"  # loopback only


class ConfigSource(enum.StrEnum):
    """Where boot config may come from; a profile names the ones its images read."""

    CMDLINE = "cmdline"  # ee.KEY=VALUE (local-dev only: production images refuse such cmdlines)
    CONFIG_DISK = "config-disk"  # agent.env on a disk labelled EECONFIG
    GCE_METADATA = "gce-metadata"  # the instance attribute ee-config
    AZURE_IMDS = "azure-imds"  # userData, else customData

    @property
    def local(self) -> bool:
        """Read before the network exists (so it may carry the static network keys)."""
        return self in (ConfigSource.CMDLINE, ConfigSource.CONFIG_DISK)


def _got(value: object) -> str:
    # PID 1 reads image.json first thing: the spec module (and its regular expression) is imported
    # on this error path only.
    from eemini.guest.spec import type_name

    return f"{type_name(value)} {value!r}"


def _enum(key: str, value: object, cls: type[E]) -> E:
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            pass
    choices = ", ".join(m.value for m in cls)
    raise ImageError(f"{key}: expected one of {choices}, got {_got(value)}")


def _string(key: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ImageError(f"{key}: expected a string, got {_got(value)}")
    return value


# Facts recorded for the reader of `info` and the manifest (PID 1 does not act on them).
_RECORDED = ("profile", "builder_version", "kernel", "spec_digest", "workload_sha256", "workload_path")


@record
class ImageFacts:
    attestation: Attestation
    network: Network = Network.DHCP
    config_sources: tuple[ConfigSource, ...] = ()
    # What systemd-stub passes on from the UKI's .cmdline; required where attestation is real.
    cmdline: str | None = None
    profile: str | None = None
    builder_version: str | None = None
    kernel: str | None = None
    spec_digest: str | None = None
    workload_sha256: str | None = None
    workload_path: str | None = None

    @classmethod
    def from_dict(cls, data: object) -> ImageFacts:
        """Validate a parsed image.json; raises ImageError naming the key at fault."""
        if not isinstance(data, dict):
            raise ImageError(f"expected an object, got {_got(data)}")
        known = ("attestation", "network", "config_sources", "cmdline")
        unknown = sorted(set(data) - set(known) - set(_RECORDED))
        if unknown:
            raise ImageError(f"unknown keys {unknown} (an image built for another runtime?)")
        if "attestation" not in data:
            raise ImageError("attestation: missing")
        attestation = _enum("attestation", data["attestation"], Attestation)
        cmdline = data.get("cmdline")
        if attestation.production and not isinstance(cmdline, str):
            raise ImageError("cmdline (the UKI's built-in command line) must be a string")
        sources = data.get("config_sources", [])
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ImageError("config_sources must be a list of names")
        return cls(
            attestation=attestation,
            network=_enum("network", data.get("network", "dhcp"), Network),
            config_sources=tuple(_enum("config_sources", s, ConfigSource) for s in sources),
            cmdline=_string("cmdline", cmdline),
            **{key: _string(key, data.get(key)) for key in _RECORDED},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of image.json (absent facts left out)."""
        doc: dict[str, Any] = {
            "attestation": self.attestation.value,
            "network": self.network.value,
            "config_sources": [s.value for s in self.config_sources],
        }
        optional = {key: getattr(self, key) for key in ("cmdline", *_RECORDED)}
        doc.update((key, value) for key, value in optional.items() if value is not None)
        return doc
