"""Fake cloud metadata servers that behave like the real APIs where our client can tell.

These are fakes, written from the services' documented behaviour and what peers' clients expect of
them; none of it was checked against the real services from here.

GCE (computeMetadata/v1): requests without `Metadata-Flavor: Google` get 403, requests with
`X-Forwarded-For` get 403, a missing attribute gets 404, every answer carries
`Metadata-Flavor: Google`. Azure IMDS: requests without `Metadata: true` get 400 with IMDS's JSON
error, `api-version` is required, `userData`/`customData` answer base64 text with 200 (an empty
body when nothing was provided). `delay` makes every answer slow; `fail_first` answers 503 that
many times first (a metadata server still starting).

Azure IMDS `POST /acc/tdquote` (the TD quote service of Azure TDX VMs): `Metadata: true` is
required (400), the Content-Type must be exactly `application/json` (415 for anything else, a
charset suffix included, as the real one answers), the body must be JSON `{"report": base64url of
a 1024-byte TDREPORT}` (400); the answer is `{"quote": base64url, unpadded}` made by `td_quote`
(the tests' quote builder). The real service has the host's quoting enclave check the TDREPORT's
MAC; the fake checks what it can off the machine, the REPORTMACSTRUCT's hashes of TEE_TCB_INFO
and TDINFO (400 otherwise).

The Azure wire server (168.63.129.16, `WireServer`): every request needs `x-ms-version:
2012-11-30` (400 otherwise); `GET /machine/?comp=goalstate` answers a GoalState XML;
`POST /machine/?comp=health` must carry `Content-Type: text/xml;charset=utf-8` and a Health
document naming the goal state's incarnation, container id and role instance id with State Ready
(400 otherwise); accepted reports are recorded.

Run as a script to serve on a port: `fake_metadata.py PORT gce|azure [KEY=VALUE ...]`.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Behaviour:
    kind: str  # "gce" | "azure" | "both" (one endpoint answering both APIs by path) | "wireserver"
    gce_config: bytes | None = None
    azure_userdata: bytes | None = None
    azure_customdata: bytes | None = None
    delay: float = 0.0
    fail_first: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # Azure acc/tdquote: TDREPORT -> TD quote (None: the service is not there, 404).
    td_quote: Callable[[bytes], bytes] | None = None
    # Azure wire server: the goal state's ids, and the health reports accepted.
    incarnation: str = "1"
    container_id: str = "c6d5526c-5ac2-4200-b6e2-56f2b70c5ab2"
    instance_id: str = "896c18b2ee4d4e6b8e2a39f0f3e7d9c3.ee-test-vm"
    ready_reports: list[str] = field(default_factory=list)


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
        if b.kind == "wireserver":
            self._goal_state(b)
        elif b.kind == "gce" or (b.kind == "both" and self.path.startswith("/computeMetadata/")):
            self._gce(b)
        else:
            self._azure(b)

    def _body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(min(size, 1 << 20))

    def do_POST(self) -> None:
        b = self.server.behaviour
        b.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = self._body()
        if b.kind == "wireserver":
            self._health(b, body)
        elif self.path == "/acc/tdquote" and b.td_quote is not None:
            self._tdquote(b, body)
        else:
            self._send(404, b'{"error": "Not found"}', "application/json; charset=utf-8")

    def _json_error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json; charset=utf-8")

    def _tdquote(self, b: Behaviour, body: bytes) -> None:
        assert b.td_quote is not None
        if self.headers.get("Metadata") != "true":
            self._json_error(400, "Bad request. Required metadata header not specified")
            return
        if self.headers.get("Content-Type") != "application/json":
            self._json_error(415, "Unsupported Media Type")
            return
        try:
            text = json.loads(body)["report"]
            report = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (ValueError, KeyError, TypeError):
            self._json_error(400, "Bad request. The report is not base64url JSON")
            return
        if len(report) != 1024 or report[0] != 0x81:
            self._json_error(400, f"Bad request. A TDREPORT is 1024 bytes, got {len(report)}")
            return
        if (
            hashlib.sha384(report[256:495]).digest() != report[32:80]
            or hashlib.sha384(report[512:1024]).digest() != report[80:128]
        ):
            self._json_error(400, "Bad request. The TDREPORT does not verify")
            return
        quote = base64.urlsafe_b64encode(b.td_quote(report)).rstrip(b"=")
        self._send(200, b'{"quote":"' + quote + b'"}', "application/json; charset=utf-8")

    def _wire_ok(self) -> bool:
        if self.headers.get("x-ms-version") != "2012-11-30":
            self._send(400, b"Missing or unsupported x-ms-version", "text/plain")
            return False
        return True

    def _goal_state(self, b: Behaviour) -> None:
        if not self._wire_ok():
            return
        if self.path != "/machine/?comp=goalstate":
            self._send(404, b"Not found", "text/plain")
            return
        xml = (
            '<?xml version="1.0" encoding="utf-8"?>\n<GoalState xmlns:xsi="http://www.w3.org/2001/'
            'XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">\n'
            f"  <Version>2012-11-30</Version>\n  <Incarnation>{b.incarnation}</Incarnation>\n"
            "  <Machine><ExpectedState>Started</ExpectedState><StopRolesDeadlineHint>300000"
            "</StopRolesDeadlineHint><ExpectHealthReport>FALSE</ExpectHealthReport></Machine>\n"
            f"  <Container>\n    <ContainerId>{b.container_id}</ContainerId>\n"
            "    <RoleInstanceList>\n      <RoleInstance>\n"
            f"        <InstanceId>{b.instance_id}</InstanceId>\n        <State>Started</State>\n"
            "      </RoleInstance>\n    </RoleInstanceList>\n  </Container>\n</GoalState>\n"
        )
        self._send(200, xml.encode(), "text/xml; charset=utf-8")

    def _health(self, b: Behaviour, body: bytes) -> None:
        if not self._wire_ok():
            return
        if self.path != "/machine/?comp=health":
            self._send(404, b"Not found", "text/plain")
            return
        if self.headers.get("Content-Type") != "text/xml;charset=utf-8":
            self._send(400, b"Content-Type must be text/xml;charset=utf-8", "text/plain")
            return
        try:
            doc = ET.fromstring(body)
            got = (
                doc.findtext("GoalStateIncarnation"),
                doc.findtext("Container/ContainerId"),
                doc.findtext("Container/RoleInstanceList/Role/InstanceId"),
                doc.findtext("Container/RoleInstanceList/Role/Health/State"),
            )
        except ET.ParseError:
            self._send(400, b"The health report is not XML", "text/plain")
            return
        if doc.tag != "Health" or got != (b.incarnation, b.container_id, b.instance_id, "Ready"):
            self._send(
                400, f"The health report does not match the goal state: {got}".encode(), "text/plain"
            )
            return
        b.ready_reports.append(body.decode())
        self._send(200, b"", "text/plain")

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

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (a timeout test) is expected: no traceback on the test's stderr.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

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
