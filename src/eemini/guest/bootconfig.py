"""Boot-time configuration: untrusted KEY=VALUE settings from the host operator.

Sources (the profile names which ones an image reads): `ee.KEY=VALUE` on the kernel cmdline, a
config disk holding `agent.env` (iso9660 or vfat, volume label EECONFIG, mounted read-only), the
GCE metadata attribute `ee-config`, and Azure IMDS `userData` then `customData` (base64). The
operator controls all of them, so only the spec's `allow_env` keys and the network keys pass;
anything else raises `ConfigError`, whose message names the key and the source, and PID 1 stops
the boot. Absent sources are normal; unreachable metadata servers get short timeouts and a few
retries, then count as absent.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
import re
import time

from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

NETWORK_KEYS = ("EE_IP", "EE_GATEWAY", "EE_DNS")
CONFIG_FILE = "agent.env"
CONFIG_LABEL = "EECONFIG"
MAX_FILE = 64 * 1024  # the Azure userData limit; plenty for KEY=VALUE lines
MAX_VALUE = 4096
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Source(enum.StrEnum):
    CMDLINE = "cmdline"
    DISK = "config-disk"
    GCE = "gce-metadata"
    AZURE_USERDATA = "azure-userdata"
    AZURE_CUSTOMDATA = "azure-customdata"

    @property
    def local(self) -> bool:
        """Read before the network exists (so they may carry the static network keys)."""
        return self in (Source.CMDLINE, Source.DISK)


class ConfigError(Exception):
    """Boot config that must stop the boot; the message names the key and the source."""


@record
class Setting:
    source: Source
    key: str
    value: str

    @property
    def digest(self) -> str:
        # SHA-384, like every other digest in the runtime event log (eemini.guest.events).
        return "sha384:" + hashlib.sha384(self.value.encode()).hexdigest()

    def event(self) -> dict[str, str]:
        """What the runtime event log records: never the value itself, only its digest."""
        return {"source": str(self.source), "key": self.key, "value_digest": self.digest}


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


def parse_cmdline(text: str) -> Cmdline:
    """Split like the kernel's next_arg(): spaces separate, double quotes group (and are dropped)."""
    params: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        token = []
        quoted = False
        while i < n and (quoted or not text[i].isspace()):
            if text[i] == '"':
                quoted = not quoted
            else:
                token.append(text[i])
            i += 1
        if quoted:
            raise ConfigError("the kernel command line has an unterminated double quote")
        word = "".join(token)
        if word == "--":
            break  # everything after -- belongs to init's argv, not to us
        key, eq, value = word.partition("=")
        params.append((key, value if eq else None))
    return Cmdline(tuple(params))


def read_cmdline(path: str = "/proc/cmdline") -> Cmdline:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_cmdline(f.read())


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
                f"boot config {key!r} from {Source.CMDLINE} has no value (expected ee.KEY=VALUE)"
            )
        out.append(_setting(Source.CMDLINE, name, value, where=f"{key}"))
    return out


# --- agent.env ---


def _setting(source: Source, key: str, value: str, where: str) -> Setting:
    if not _KEY.match(key):
        raise ConfigError(f"boot config key {key!r} from {source} ({where}) is not a valid name")
    if "\0" in value or len(value) > MAX_VALUE:
        raise ConfigError(
            f"boot config key {key!r} from {source} ({where}) has a value that is "
            + ("too long" if len(value) > MAX_VALUE else "not text")
        )
    return Setting(source, key, value)


def parse_env(data: bytes, source: Source) -> list[Setting]:
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
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(
                f"{CONFIG_FILE} from {source} line {number} is not KEY=VALUE: {raw[:60]!r}"
            )
        value = value.strip()
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
                ipaddress.IPv4Address(part.strip())
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
            if not s.source.local:
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
                ipaddress.IPv4Address(p.strip()) for p in net.get("EE_DNS", "").split(",") if p.strip()
            ),
        )
    return BootConfig(tuple(settings), env, network)


# --- config disk ---


def detect_label(dev: str) -> tuple[str, str] | None:
    """(fstype, volume label) for an iso9660 or FAT filesystem at the start of `dev`, else None."""
    try:
        with open(dev, "rb") as f:
            boot = f.read(512)
            f.seek(0x8000)
            pvd = f.read(2048)
    except OSError:
        return None
    # ECMA-119 8.4: the primary volume descriptor at sector 16: type 1, "CD001", volume id at 40.
    if len(pvd) >= 72 and pvd[0] == 1 and pvd[1:6] == b"CD001":
        return "iso9660", pvd[40:72].decode("ascii", "replace").strip()
    # FAT boot sector: 0x55AA signature; the label sits at 0x2B (FAT12/16) or 0x47 (FAT32),
    # after an extended boot signature 0x29 at 0x26 / 0x42.
    if len(boot) == 512 and boot[510:512] == b"\x55\xaa":
        if boot[0x42] == 0x29 and boot[0x52:0x57] == b"FAT32":
            return "vfat", boot[0x47:0x52].decode("ascii", "replace").strip()
        if boot[0x26] == 0x29 and boot[0x36:0x39] == b"FAT":
            return "vfat", boot[0x2B:0x36].decode("ascii", "replace").strip()
    return None


def block_devices(sys_block: str = "/sys/class/block") -> list[str]:
    try:
        return sorted(os.listdir(sys_block))
    except OSError:
        return []


# virtio-blk PCI functions: vendor 0x1af4, device 0x1001 (transitional) or 0x1042 (modern),
# from the virtio spec 1.2 section 4.1.2.
VIRTIO_VENDOR = "0x1af4"
VIRTIO_BLK_DEVICES = ("0x1001", "0x1042")


def expected_disks(sys_pci: str = "/sys/bus/pci/devices") -> int:
    """How many virtio-blk disks the machine has (each becomes one whole-disk block device)."""
    count = 0
    try:
        names = os.listdir(sys_pci)
    except OSError:
        return 0
    for name in names:
        try:
            with open(os.path.join(sys_pci, name, "vendor")) as f:
                vendor = f.read().strip()
            with open(os.path.join(sys_pci, name, "device")) as f:
                device = f.read().strip()
        except OSError:
            continue
        if vendor == VIRTIO_VENDOR and device in VIRTIO_BLK_DEVICES:
            count += 1
    return count


def whole_disks(sys_block: str) -> list[str]:
    return [
        n
        for n in block_devices(sys_block)
        if not n.startswith(("loop", "ram", "zram", "dm-"))
        and not os.path.exists(os.path.join(sys_block, n, "partition"))
    ]


def find_config_disk(
    wait: float,
    dev_dir: str = "/dev",
    sys_block: str = "/sys/class/block",
    sys_pci: str = "/sys/bus/pci/devices",
) -> tuple[str, str] | None:
    """The device holding a filesystem labelled EECONFIG.

    Block drivers probe asynchronously after their module loads: wait (at most `wait` s) until
    every virtio-blk disk on the PCI bus has its block device, then look once. A machine without
    virtio disks is looked at once, without waiting.
    """
    deadline = time.monotonic() + wait
    expected = expected_disks(sys_pci)
    while len(whole_disks(sys_block)) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    for name in whole_disks(sys_block):
        path = os.path.join(dev_dir, name)
        found = detect_label(path)
        if found is not None and found[1].upper() == CONFIG_LABEL:
            return path, found[0]
    return None


def read_config_disk(
    wait: float = 2.0,
    mountpoint: str = "/run/eemini/config",
) -> bytes | None:
    """agent.env from the config disk, or None when there is no config disk."""
    from eemini.guest import sys as ksys

    found = find_config_disk(wait)
    if found is None:
        return None
    dev, fstype = found
    os.makedirs(mountpoint, exist_ok=True)
    flags = ksys.MS_RDONLY | ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC
    # The character sets the kernel has built in (kernel/fragment.config: NLS_UTF8, NLS_CODEPAGE_437),
    # named rather than left to the kernel's defaults.
    options = "iocharset=utf8,codepage=437" if fstype == "vfat" else None
    try:
        ksys.mount(dev, mountpoint, fstype, flags, options)
    except OSError as e:
        raise ConfigError(
            f"the config disk {dev} ({fstype}) cannot be mounted: {os.strerror(e.errno or 0)}"
        ) from None
    try:
        path = os.path.join(mountpoint, CONFIG_FILE)
        names = {n.lower(): n for n in os.listdir(mountpoint)}
        if CONFIG_FILE not in names:
            raise ConfigError(f"the config disk {dev} has no {CONFIG_FILE}")
        path = os.path.join(mountpoint, names[CONFIG_FILE])
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        return data
    finally:
        ksys.umount(mountpoint, ksys.MNT_DETACH)


# --- cloud metadata ---

METADATA_HOST = "169.254.169.254"
GCE_PATH = "/computeMetadata/v1/instance/attributes/ee-config"
AZURE_USERDATA_PATH = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
AZURE_CUSTOMDATA_PATH = "/metadata/instance/compute/customData?api-version=2019-02-01&format=text"


@record
class Fetch:
    """How hard to try a metadata server: short per-request timeout, a few attempts."""

    host: str = METADATA_HOST
    port: int = 80
    timeout: float = 2.0
    attempts: int = 3
    backoff: float = 0.5


def _connection(fetch: Fetch) -> Any:
    import http.client
    import socket

    class Connection(http.client.HTTPConnection):
        """Connects to the numeric address itself: socket.create_connection() would go through
        getaddrinfo(), which encodes every str host with the idna codec, and the image's trimmed
        standard library does not carry it (nor does a metadata IP need a resolver)."""

        def connect(self) -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                sock.connect((self.host, self.port))
            except BaseException:
                sock.close()
                raise
            self.sock = sock

    return Connection(fetch.host, fetch.port, timeout=fetch.timeout)


def http_get(
    fetch: Fetch, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes] | None:
    """GET with bounded retries; None when the server never answered (absent source)."""
    import http.client

    delay = fetch.backoff
    for attempt in range(fetch.attempts):
        conn = _connection(fetch)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_FILE * 2 + 1)
            status = resp.status
            got = {k.lower(): v for k, v in resp.getheaders()}
            if status >= 500 and attempt + 1 < fetch.attempts:
                time.sleep(delay)
                delay *= 2
                continue
            return status, got, body
        except (OSError, http.client.HTTPException):
            if attempt + 1 < fetch.attempts:
                time.sleep(delay)
                delay *= 2
        finally:
            conn.close()
    return None


def read_gce(fetch: Fetch) -> bytes | None:
    answer = http_get(fetch, GCE_PATH, {"Metadata-Flavor": "Google"})
    if answer is None:
        return None
    status, headers, body = answer
    if status == 404:
        return None
    if status != 200:
        raise ConfigError(f"{Source.GCE}: the metadata server answered HTTP {status} for ee-config")
    # The real server marks its answers; anything else on that address is not the metadata server.
    if headers.get("metadata-flavor") != "Google":
        raise ConfigError(f"{Source.GCE}: the answer lacks the 'Metadata-Flavor: Google' header")
    return body


def _read_azure(fetch: Fetch, path: str, source: Source) -> bytes | None:
    answer = http_get(fetch, path, {"Metadata": "true"})
    if answer is None:
        return None
    status, _headers, body = answer
    if status == 404:
        return None
    if status != 200:
        raise ConfigError(f"{source}: IMDS answered HTTP {status}")
    text = body.strip()
    if not text:
        return None  # IMDS answers 200 with an empty body when nothing was provided
    try:
        import base64  # Azure only

        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ConfigError(f"{source}: the IMDS answer is not base64") from None


def read_azure(fetch: Fetch) -> tuple[Source, bytes] | None:
    """userData first; customData only when userData is empty or absent."""
    data = _read_azure(fetch, AZURE_USERDATA_PATH, Source.AZURE_USERDATA)
    if data is not None:
        return Source.AZURE_USERDATA, data
    data = _read_azure(fetch, AZURE_CUSTOMDATA_PATH, Source.AZURE_CUSTOMDATA)
    if data is not None:
        return Source.AZURE_CUSTOMDATA, data
    return None


# --- the whole collection, as PID 1 runs it ---


class Sources(enum.StrEnum):
    """Source names a profile lists in image.json's boot-config sources."""

    CMDLINE = "cmdline"
    DISK = "config-disk"
    GCE = "gce"
    AZURE = "azure"

    @classmethod
    def parse(cls, names: Iterable[str]) -> tuple[Sources, ...]:
        aliases = {"disk": cls.DISK, "gce-metadata": cls.GCE, "azure-imds": cls.AZURE}
        out = []
        for name in names:
            try:
                out.append(aliases.get(name) or cls(name))
            except ValueError:
                raise ConfigError(f"image.json names an unknown boot-config source {name!r}") from None
        return tuple(out)


def collect_local(
    cmdline: Cmdline,
    sources: Sequence[Sources],
    log: Callable[[str], None],
) -> list[Setting]:
    settings: list[Setting] = []
    if Sources.CMDLINE in sources:
        settings += cmdline_settings(cmdline)
    if Sources.DISK in sources:
        data = read_config_disk()
        if data is None:
            log("boot config: no config disk")
        else:
            settings += parse_env(data, Source.DISK)
    return settings


def collect_remote(
    sources: Sequence[Sources], fetch: Fetch, log: Callable[[str], None]
) -> list[Setting]:
    settings: list[Setting] = []
    if Sources.GCE in sources:
        data = read_gce(fetch)
        if data is None:
            log("boot config: no GCE ee-config attribute")
        else:
            settings += parse_env(data, Source.GCE)
    if Sources.AZURE in sources:
        found = read_azure(fetch)
        if found is None:
            log("boot config: no Azure userData/customData")
        else:
            settings += parse_env(found[1], found[0])
    return settings
