"""Azure IMDS as a source of boot config: `userData`, else `customData` (base64 of agent.env).

PID 1 reads it, through eemini.guest.metadata, once the network is up, in images whose profile
names the `azure-imds` source (the builder ships this module only there). The attestation side
of IMDS (the TD quote service) is eemini.guest.azure's.
"""

from __future__ import annotations

import binascii

from eemini.guest import metadata
from eemini.guest.bootconfig import ConfigError, Setting, parse_env

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Boot config: which IMDS document a setting came from (Setting.source, the runtime event log).
AZURE_USERDATA = "azure-userdata"
AZURE_CUSTOMDATA = "azure-customdata"
AZURE_USERDATA_PATH = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
AZURE_CUSTOMDATA_PATH = "/metadata/instance/compute/customData?api-version=2019-02-01&format=text"


def _read_imds(fetch: metadata.Fetch, path: str, source: str) -> bytes | None:
    answer = metadata.http_request(fetch, "GET", path, {"Metadata": "true"})
    if answer is None or answer[0] == 404:  # no server, or no such document
        return None
    status, _headers, body = answer
    if status != 200:
        raise ConfigError(f"{source}: IMDS answered HTTP {status}")
    text = body.strip()
    if not text:
        return None  # IMDS answers 200 with an empty body when nothing was provided
    try:
        # What base64.b64decode(validate=True) does on 3.13.
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:
        raise ConfigError(f"{source}: the IMDS answer is not base64") from None


def read_user_data(fetch: metadata.Fetch) -> tuple[str, bytes] | None:
    """Boot config from IMDS: userData first; customData only when userData is empty or absent."""
    data = _read_imds(fetch, AZURE_USERDATA_PATH, AZURE_USERDATA)
    if data is not None:
        return AZURE_USERDATA, data
    data = _read_imds(fetch, AZURE_CUSTOMDATA_PATH, AZURE_CUSTOMDATA)
    if data is not None:
        return AZURE_CUSTOMDATA, data
    return None


def boot_config(fetch: metadata.Fetch, log: Callable[[str], None]) -> list[Setting]:
    """The settings in IMDS userData, else customData; none when neither holds anything."""
    found = read_user_data(fetch)
    if found is None:
        log("boot config: no Azure userData/customData")
        return []
    return parse_env(found[1], found[0])
