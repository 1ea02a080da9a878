"""Boot config from the cloud's metadata server: the GCE attribute `ee-config`, or Azure IMDS
`userData` then `customData` (eemini.guest.imds reads those). Read once the network is up,
through eemini.guest.bootconfig's parser and policy like every other source; `http_request` is
the HTTP client of both clouds' metadata and wire servers.

PID 1 imports this module only for an image whose profile names a metadata source, and the builder
ships it only there: other images carry no HTTP client (http.client, email).
"""

from __future__ import annotations

import time

from eemini.guest.bootconfig import MAX_FILE, ConfigError, Setting, parse_env
from eemini.guest.image import ConfigSource
from eemini.guest.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

METADATA_HOST = "169.254.169.254"
GCE_PATH = "/computeMetadata/v1/instance/attributes/ee-config"


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


def http_request(
    fetch: Fetch,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    body: bytes | None = None,
    limit: int = MAX_FILE * 2 + 1,
) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP request with bounded retries (connection errors and 5xx answers); None when the
    server never answered. At most `limit` bytes of the answer are read."""
    import http.client

    for attempt in range(fetch.attempts):
        if attempt:
            time.sleep(fetch.backoff * 2 ** (attempt - 1))
        conn = _connection(fetch)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(limit)
        except (OSError, http.client.HTTPException):
            continue
        finally:
            conn.close()
        if answer[0] < 500 or attempt + 1 == fetch.attempts:
            return answer
    return None


def read_gce(fetch: Fetch) -> bytes | None:
    answer = http_request(fetch, "GET", GCE_PATH, {"Metadata-Flavor": "Google"})
    if answer is None or answer[0] == 404:  # no server, or no such attribute
        return None
    status, headers, body = answer
    if status != 200:
        raise ConfigError(
            f"{ConfigSource.GCE_METADATA}: the metadata server answered HTTP {status} for ee-config"
        )
    # The real server marks its answers; anything else on that address is not the metadata server.
    if headers.get("metadata-flavor") != "Google":
        raise ConfigError(
            f"{ConfigSource.GCE_METADATA}: the answer lacks the 'Metadata-Flavor: Google' header"
        )
    return body


def collect(sources: Sequence[ConfigSource], fetch: Fetch, log: Callable[[str], None]) -> list[Setting]:
    settings: list[Setting] = []
    if ConfigSource.GCE_METADATA in sources:
        data = read_gce(fetch)
        if data is None:
            log("boot config: no GCE ee-config attribute")
        else:
            settings += parse_env(data, ConfigSource.GCE_METADATA)
    if ConfigSource.AZURE_IMDS in sources:
        from eemini.guest import imds

        settings += imds.boot_config(fetch, log)
    return settings
