"""The image facts (image.json): the builder writes them, PID 1 reads them back, one spelling."""

from __future__ import annotations

from typing import Any

import pytest

from eemini.build import profile
from eemini.guest.image import Attestation, ConfigSource, ImageError, ImageFacts, Network

FULL: dict[str, Any] = {
    "attestation": "configfs-tsm",
    "network": "dhcp",
    "config_sources": ["gce-metadata"],
    "cmdline": "console=ttyS0 quiet",
    "profile": "gcp",
    "builder_version": "0.1.0",
    "kernel": "6.12",
    "spec_digest": "00" * 32,
    "workload_sha256": "11" * 32,
    "workload_path": "/app/hello",
}


def test_what_the_builder_writes_reads_back_unchanged() -> None:
    facts = ImageFacts.from_dict(FULL)
    assert facts.attestation is Attestation.CONFIGFS_TSM
    assert facts.network is Network.DHCP
    assert facts.config_sources == (ConfigSource.GCE_METADATA,)
    assert facts.to_dict() == FULL


def test_absent_facts_take_their_defaults_and_stay_absent() -> None:
    facts = ImageFacts.from_dict({"attestation": "simulated"})
    assert facts == ImageFacts(Attestation.SIMULATED)
    assert (facts.network, facts.config_sources, facts.cmdline) == (Network.DHCP, (), None)
    assert facts.to_dict() == {"attestation": "simulated", "network": "dhcp", "config_sources": []}


def test_config_sources_are_spelled_as_the_profiles_spell_them() -> None:
    names = {s for p in profile.available() for s in profile.load(p).config_sources}
    assert names == set(ConfigSource)
    known = "cmdline, config-disk, gce-metadata, azure-imds"
    for other in ("disk", "gce", "azure", "ftp"):
        message = rf"^config_sources: expected one of {known}, got string '{other}'$"
        with pytest.raises(ImageError, match=message):
            ImageFacts.from_dict({**FULL, "config_sources": [other]})


def test_local_sources_are_read_before_the_network() -> None:
    assert [s for s in ConfigSource if s.local] == [ConfigSource.CMDLINE, ConfigSource.CONFIG_DISK]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attestation": "sev-snp"}, r"attestation: expected one of configfs-tsm, azure-tdx-vtpm, "
         r"simulated, got string 'sev-snp'"),
        ({"attestation": None}, r"attestation: expected one of configfs-tsm, azure-tdx-vtpm, "
         r"simulated, got null None"),
        ({"network": "wifi"}, r"network: expected one of dhcp, none, got string 'wifi'"),
        ({"cmdline": None}, r"cmdline \(the UKI's built-in command line\) must be a string"),
        ({"modules": ["gve.ko"]}, r"unknown keys \['modules'\] \(an image built for another "
         r"runtime\?\)"),
        ({"config_sources": "cmdline"}, r"config_sources must be a list of names"),
        ({"kernel": 6}, r"kernel: expected a string, got integer 6"),
        ({"rootfs": "/dev/vda"}, r"unknown keys \['rootfs'\] \(an image built for another runtime\?\)"),
    ],
)  # fmt: skip
def test_anything_else_is_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ImageError, match=f"^{message}$"):
        ImageFacts.from_dict({**FULL, **change})


def test_a_simulated_image_needs_no_cmdline_and_the_kind_must_be_there() -> None:
    assert ImageFacts.from_dict({"attestation": "simulated"}).cmdline is None
    with pytest.raises(ImageError, match=r"^attestation: missing$"):
        ImageFacts.from_dict({"network": "none"})
    with pytest.raises(ImageError, match=r"^expected an object, got array \[\]$"):
        ImageFacts.from_dict([])
