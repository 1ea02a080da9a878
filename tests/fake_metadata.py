"""Fake cloud metadata servers that behave like the real APIs where our client can tell.

GCE (computeMetadata/v1): requests without `Metadata-Flavor: Google` get 403, requests with
`X-Forwarded-For` get 403, a missing attribute gets 404, every answer carries
`Metadata-Flavor: Google`. Azure IMDS: requests without `Metadata: true` get 400 with IMDS's JSON
error, `api-version` is required, `userData`/`customData` answer base64 text with 200 (an empty
body when nothing was provided). `delay` makes every answer slow; `fail_first` answers 503 that
many times first (a metadata server still starting).

Run as a script to serve on a port: `fake_metadata.py PORT gce|azure [KEY=VALUE ...]`.
"""

from __future__ import annotations

import base64
import http.server
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class Behaviour:
    kind: str  # "gce" | "azure" | "both" (one endpoint answering both APIs by path)
    gce_config: bytes | None = None
    azure_userdata: bytes | None = None
    azure_customdata: bytes | None = None
    delay: float = 0.0
    fail_first: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        b = self.server.behaviour
        b.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if b.delay:
            time.sleep(b.delay)
        if b.fail_first > 0:
            b.fail_first -= 1
            self._send(503, b"starting", "text/plain")
            return
        if b.kind == "gce" or (b.kind == "both" and self.path.startswith("/computeMetadata/")):
            self._gce(b)
        else:
            self._azure(b)

    def _gce(self, b: Behaviour) -> None:
        flavor = {"Metadata-Flavor": "Google"}
        if "X-Forwarded-For" in self.headers:
            self._send(403, b"Request denied: X-Forwarded-For header present", "text/html", flavor)
            return
        if self.headers.get("Metadata-Flavor") != "Google":
            body = b"Missing required header: Metadata-Flavor"
            self._send(403, body, "text/html", flavor)
            return
        if self.path == "/computeMetadata/v1/instance/attributes/ee-config" and b.gce_config is not None:
            self._send(200, b.gce_config, "application/text", flavor)
            return
        self._send(404, b"Not Found", "text/html", flavor)

    def _azure(self, b: Behaviour) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if self.headers.get("Metadata") != "true":
            err = {"error": "Bad request. Required metadata header not specified"}
            self._send(400, json.dumps(err).encode(), "application/json; charset=utf-8")
            return
        if "api-version" not in query:
            err = {"error": "Bad request. api-version was not specified in the request"}
            self._send(400, json.dumps(err).encode(), "application/json; charset=utf-8")
            return
        values = {
            "/metadata/instance/compute/userData": b.azure_userdata,
            "/metadata/instance/compute/customData": b.azure_customdata,
        }
        if url.path not in values:
            self._send(404, b'{"error": "Not found"}', "application/json; charset=utf-8")
            return
        raw = values[url.path]
        body = base64.b64encode(raw) if raw is not None else b""
        self._send(200, body, "text/plain; charset=utf-8")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Behaviour, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.behaviour = behaviour

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> Server:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def main() -> None:
    port, kind = int(sys.argv[1]), sys.argv[2]
    config = "".join(f"{kv}\n" for kv in sys.argv[3:]).encode()
    b = Behaviour(kind, gce_config=config if kind == "gce" else None)
    if kind == "azure":
        b.azure_userdata = config
    Server(b, port).serve_forever()


if __name__ == "__main__":
    main()
