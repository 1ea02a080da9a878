"""Boot-time configuration: untrusted KEY=VALUE settings from the host operator.

Sources (the profile names which ones an image reads): `ee.KEY=VALUE` on the kernel cmdline, a
config disk holding `agent.env` (read by eemini.guest.configdisk), the GCE metadata attribute
`ee-config`, and Azure IMDS `userData` then `customData` (base64; both read by
eemini.guest.metadata). The operator controls all of them, so only the spec's
`allow_env` keys and the network keys pass; anything else raises `ConfigError`, whose message
names the key and the source, and PID 1 stops the boot. Absent sources are normal; unreachable
metadata servers get short timeouts and a few retries, then count as absent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from eemini.guest.image import ConfigSource
from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

NETWORK_KEYS = ("EE_IP", "EE_GATEWAY", "EE_DNS")
CONFIG_FILE = "agent.env"
MAX_FILE = 64 * 1024  # the Azure userData limit; plenty for KEY=VALUE lines
MAX_VALUE = 4096
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


# --- kernel cmdline ---


@record
class Cmdline:
    params: tuple[tuple[str, str | None], ...]

    def get(self, key: str) -> str | None:
        value = None
        for k, v in self.params:
            if k == key:
                value = v if v is not None else ""
        return value

    def has(self, key: str, value: str | None = None) -> bool:
        return any(k == key and (value is None or v == value) for k, v in self.params)


# The bytes the kernel's isspace() accepts: _S in lib/ctype.c's _ctype table, i.e. \t \n \v \f \r,
# the space, and 0xA0 (Latin-1 no-break space). The kernel splits /proc/cmdline's bytes, not
# characters: a UTF-8 no-break space (C2 A0) is split at its second byte.
KERNEL_SPACES = frozenset(b"\t\n\v\f\r \xa0")
_QUOTE = ord('"')
_EQUALS = ord("=")


def _c_string(buf: bytearray, start: int) -> bytes:
    return bytes(buf[start : buf.index(0, start)])


def _next_arg(buf: bytearray, args: int) -> tuple[bytes, bytes | None, int, bool]:
    """lib/cmdline.c next_arg() on a NUL-terminated buffer, step for step: (param, value or None,
    where the next argument starts, whether a double quote was left open)."""
    in_quote = quoted = False
    if buf[args] == _QUOTE:
        args += 1
        in_quote = quoted = True
    i = equals = 0
    while buf[args + i]:
        c = buf[args + i]
        if c in KERNEL_SPACES and not in_quote:
            break
        if equals == 0 and c == _EQUALS:
            equals = i
        if c == _QUOTE:
            in_quote = not in_quote
        i += 1
    value = None
    if equals:
        buf[args + equals] = 0
        value = args + equals + 1
        if buf[value] == _QUOTE:  # the value's own quotes are not part of it
            value += 1
            if buf[args + i - 1] == _QUOTE:
                buf[args + i - 1] = 0
    if quoted and buf[args + i - 1] == _QUOTE:
        buf[args + i - 1] = 0
    end = args + i
    following = end
    if buf[end]:
        buf[end] = 0
        following += 1
    param = _c_string(buf, args)
    val = None if value is None else _c_string(buf, value)
    while buf[following] in KERNEL_SPACES:  # skip_spaces()
        following += 1
    return param, val, following, in_quote


def parse_cmdline(text: str | bytes) -> Cmdline:
    """Split like the kernel's parse_args() and next_arg() (lib/cmdline.c), byte for byte, so
    every value is the value the kernel saw: kernel whitespace separates (`KERNEL_SPACES`), double
    quotes group, the quotes around a whole argument or around a value are dropped (others stay),
    the first `=` splits name and value, and a bare `--` ends the kernel's part. A `str` is taken
    as the bytes it was decoded from (UTF-8 with surrogateescape, as `pid1` reads /proc/cmdline);
    names and values are decoded the same way. The kernel would let an unterminated double quote
    run to the end of the line; that is refused here."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    buf = bytearray(raw.split(b"\0", 1)[0]) + b"\0"  # the kernel's copy is a C string
    params: list[tuple[str, str | None]] = []
    pos = 0
    while buf[pos] in KERNEL_SPACES:
        pos += 1
    while buf[pos]:
        param, value, pos, unterminated = _next_arg(buf, pos)
        if unterminated:
            raise ConfigError("the kernel command line has an unterminated double quote")
        if value is None and param == b"--":
            break  # everything after -- belongs to init's argv, not to us
        params.append(
            (
                param.decode("utf-8", "surrogateescape"),
                None if value is None else value.decode("utf-8", "surrogateescape"),
            )
        )
    return Cmdline(tuple(params))


# ee.* names on the cmdline that are image facts, not boot config: ee.dev=1 marks a local-dev
# image in the measured cmdline (set by the builder, checked by PID 1).
RESERVED = frozenset({"ee.dev"})
DEV_MARKER = ("ee.dev", "1")


def cmdline_settings(cmdline: Cmdline) -> list[Setting]:
    out = []
    for key, value in cmdline.params:
        if not key.startswith("ee.") or key in RESERVED:
            continue
        name = key[3:]
        if value is None:
            raise ConfigError(
                f"boot config {key!r} from {ConfigSource.CMDLINE} has no value (expected ee.KEY=VALUE)"
            )
        out.append(_setting(ConfigSource.CMDLINE, name, value, where=f"{key}"))
    return out


# --- agent.env ---


def _setting(source: str, key: str, value: str, where: str) -> Setting:
    if not _KEY.match(key):
        raise ConfigError(f"boot config key {key!r} from {source} ({where}) is not a valid name")
    problem = None
    if len(value) > MAX_VALUE:
        problem = "too long"
    elif "\0" in value:
        problem = "not text"
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # cmdline bytes that are not UTF-8 (kept by surrogateescape)
            problem = "not UTF-8"
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
    seen: set[str] = set()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for number, full in enumerate(lines, 1):
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
        if key in seen:
            raise ConfigError(f"boot config key {key!r} from {source} is set twice (line {number})")
        seen.add(key)
        out.append(_setting(source, key, value, where=f"line {number}"))
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


def _network_value(setting: Setting) -> None:
    try:
        if setting.key == "EE_IP":
            if "/" not in setting.value:
                raise ValueError("needs a prefix length, like 10.0.0.5/24")
            ipaddress.IPv4Interface(setting.value)
        elif setting.key == "EE_GATEWAY":
            ipaddress.IPv4Address(setting.value)
        else:
            for part in setting.value.split(","):
                ipaddress.IPv4Address(part.strip(ENV_BLANKS))
    except ValueError as e:
        raise ConfigError(
            f"boot config key {setting.key!r} from {setting.source} is not valid: {e}"
        ) from None


def apply_policy(settings: Sequence[Setting], allow_env: Iterable[str]) -> BootConfig:
    """Accept only allowed keys; later sources override earlier ones for the same key."""
    allowed = set(allow_env)
    env: dict[str, str] = {}
    net: dict[str, str] = {}
    for s in settings:
        if s.key in NETWORK_KEYS:
            if s.source not in LOCAL_SOURCES:
                raise ConfigError(
                    f"boot config key {s.key!r} from {s.source} is not allowed: network keys are read "
                    "before the network exists, so only the cmdline and the config disk may set them"
                )
            _network_value(s)
            net[s.key] = s.value
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
        network = NetworkConfig(
            address=ipaddress.IPv4Interface(net["EE_IP"]),
            gateway=ipaddress.IPv4Address(net["EE_GATEWAY"]) if "EE_GATEWAY" in net else None,
            dns=tuple(
                ipaddress.IPv4Address(p.strip(ENV_BLANKS))
                for p in net.get("EE_DNS", "").split(",")
                if p.strip(ENV_BLANKS)
            ),
        )
    return BootConfig(tuple(settings), env, network)


# --- what PID 1 reads before the network (eemini.guest.metadata reads the rest) ---


def collect_local(
    cmdline: Cmdline,
    sources: Sequence[ConfigSource],
    log: Callable[[str], None],
) -> list[Setting]:
    settings: list[Setting] = []
    if ConfigSource.CMDLINE in sources:
        settings += cmdline_settings(cmdline)
    if ConfigSource.CONFIG_DISK in sources:
        from eemini.guest.configdisk import read_config_disk

        data = read_config_disk()
        if data is None:
            log("boot config: no config disk")
        else:
            settings += parse_env(data, ConfigSource.CONFIG_DISK)
    return settings
