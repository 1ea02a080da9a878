"""Boot-time configuration: untrusted KEY=VALUE settings from the host operator.

Sources (the profile names which ones an image reads): `ee.KEY=VALUE` on the kernel cmdline (in
local-dev images only, eemini.guest.dev.cmdline), a config disk holding `agent.env` (read by
eemini.guest.configdisk), the GCE metadata attribute
`ee-config`, and Azure IMDS `userData` then `customData` (base64; both read by
eemini.guest.metadata). The operator controls all of them, so only the spec's
`allow_env` keys and the network keys pass; anything else raises `ConfigError`, whose message
names the key and the source, and PID 1 stops the boot. Absent sources are normal; unreachable
metadata servers get short timeouts and a few retries, then count as absent.
"""

from __future__ import annotations

import hashlib
import ipaddress

from eemini.guest.image import ConfigSource
from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

NETWORK_KEYS = ("EE_IP", "EE_GATEWAY", "EE_DNS")
CONFIG_FILE = "agent.env"
MAX_FILE = 64 * 1024  # the Azure userData limit; plenty for KEY=VALUE lines
MAX_VALUE = 4096


LOCAL_SOURCES = frozenset(source for source in ConfigSource if source.local)


class ConfigError(Exception):
    """Boot config that must stop the boot; the message names the key and the source."""


@record
class Setting:
    source: str  # a ConfigSource, or which Azure IMDS document (eemini.guest.metadata)
    key: str
    value: str

    @property
    def digest(self) -> str:
        # SHA-384, like every other digest in the runtime event log (eemini.guest.events).
        return "sha384:" + hashlib.sha384(self.value.encode()).hexdigest()


# The bytes the kernel's isspace() accepts: _S in lib/ctype.c's _ctype table, i.e. \t \n \v \f \r,
# the space, and 0xA0 (Latin-1 no-break space). The kernel splits /proc/cmdline's bytes, not
# characters: a UTF-8 no-break space (C2 A0) is split at its second byte.
KERNEL_SPACES = frozenset(b"\t\n\v\f\r \xa0")


# --- agent.env ---


def make_setting(source: str, key: str, value: str, where: str) -> Setting:
    """A setting whose key is a valid name and whose value is text of at most MAX_VALUE
    characters (UTF-8 already: agent.env is decoded strictly, the cmdline checked by its parser)."""
    if not (key.isascii() and key.isidentifier()):  # [A-Za-z_][A-Za-z0-9_]*
        raise ConfigError(f"boot config key {key!r} from {source} ({where}) is not a valid name")
    problem = "too long" if len(value) > MAX_VALUE else "not text" if "\0" in value else None
    if problem is not None:
        raise ConfigError(
            f"boot config key {key!r} from {source} ({where}) has a value that is {problem}"
        )
    return Setting(source, key, value)


# agent.env: lines end at "\n" (a "\r" before it is dropped, for files written on Windows), and
# the only whitespace around keys, values and comments is the space and the tab. Every other
# character, control or Unicode "space" alike (\v, \f, \x1c-\x1f, U+0085, U+00A0, U+2028 ...),
# is part of the key (and so refused) or of the value (and so recorded as it is).
ENV_BLANKS = " \t"


def parse_env(data: bytes, source: str) -> list[Setting]:
    """agent.env: KEY=VALUE lines; blank lines and # comments skipped; one matching pair of
    surrounding quotes is removed. Anything else is malformed and stops the boot."""
    if len(data) > MAX_FILE:
        raise ConfigError(f"{CONFIG_FILE} from {source} is {len(data)} bytes, more than {MAX_FILE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{CONFIG_FILE} from {source} is not UTF-8 (byte {e.start})") from None
    out: list[Setting] = []
    for number, full in enumerate(text.split("\n"), 1):
        raw = full.removesuffix("\r")
        line = raw.strip(ENV_BLANKS)
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.rstrip(ENV_BLANKS)
        if not eq or not key:
            raise ConfigError(
                f"{CONFIG_FILE} from {source} line {number} is not KEY=VALUE: {raw[:60]!r}"
            )
        value = value.lstrip(ENV_BLANKS)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if any(s.key == key for s in out):
            raise ConfigError(f"boot config key {key!r} from {source} is set twice (line {number})")
        out.append(make_setting(source, key, value, where=f"line {number}"))
    return out


# --- policy ---


@record
class NetworkConfig:
    """Static network settings (EE_IP/EE_GATEWAY/EE_DNS), validated."""

    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None
    dns: tuple[ipaddress.IPv4Address, ...]


@record
class BootConfig:
    settings: tuple[Setting, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # allow_env keys for the workload
    network: NetworkConfig | None = None


def _network_value(setting: Setting) -> Any:
    """EE_IP as an interface (address and prefix length), EE_GATEWAY as an address, EE_DNS as a
    tuple of addresses (comma-separated)."""
    try:
        if setting.key == "EE_IP":
            if "/" not in setting.value:
                raise ValueError("needs a prefix length, like 10.0.0.5/24")
            return ipaddress.IPv4Interface(setting.value)
        if setting.key == "EE_GATEWAY":
            return ipaddress.IPv4Address(setting.value)
        return tuple(ipaddress.IPv4Address(part.strip(ENV_BLANKS)) for part in setting.value.split(","))
    except ValueError as e:
        raise ConfigError(
            f"boot config key {setting.key!r} from {setting.source} is not valid: {e}"
        ) from None


def apply_policy(settings: Sequence[Setting], allow_env: Iterable[str]) -> BootConfig:
    """Accept only allowed keys; later sources override earlier ones for the same key."""
    allowed = set(allow_env)
    env: dict[str, str] = {}
    net: dict[str, Any] = {}
    for s in settings:
        if s.key in NETWORK_KEYS:
            if s.source not in LOCAL_SOURCES:
                raise ConfigError(
                    f"boot config key {s.key!r} from {s.source} is not allowed: network keys are read "
                    "before the network exists, so only the cmdline and the config disk may set them"
                )
            net[s.key] = _network_value(s)
        elif s.key in allowed:
            env[s.key] = s.value
        else:
            names = ", ".join(sorted(allowed | set(NETWORK_KEYS)))
            raise ConfigError(
                f"boot config key {s.key!r} from {s.source} is not allowed (allowed: {names})"
            )
    network = None
    if net:
        if "EE_IP" not in net:
            raise ConfigError(
                "boot config sets EE_GATEWAY/EE_DNS without EE_IP: static network needs EE_IP"
            )
        network = NetworkConfig(net["EE_IP"], net.get("EE_GATEWAY"), net.get("EE_DNS", ()))
    return BootConfig(tuple(settings), env, network)


# --- what PID 1 reads before the network (eemini.guest.metadata reads the rest) ---


def collect_local(
    cmdline_text: str, sources: Sequence[ConfigSource], log: Callable[[str], None]
) -> list[Setting]:
    settings: list[Setting] = []
    if ConfigSource.CMDLINE in sources:
        # A source of local-dev images only (the builder refuses it in production profiles).
        from eemini.guest.dev.cmdline import cmdline_settings, parse_cmdline

        settings += cmdline_settings(parse_cmdline(cmdline_text))
    if ConfigSource.CONFIG_DISK in sources:
        from eemini.guest import configdisk

        settings += configdisk.boot_config(log)
    return settings
