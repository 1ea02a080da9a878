"""A client for the control socket; standard library only, so workloads can import it.

    from eemini.client import connect
    with connect() as c:                       # EE_SOCKET_PATH / EE_TOKEN from the environment
        quote = c.call("attest", report_data_b64="...")["quote_b64"]

`call()` returns the answer as a dict and raises `CallError` when the runtime answers
{"ok": false, ...}; connection problems raise `ClientError`.
"""

from __future__ import annotations

import json
import os
import socket
from types import TracebackType
from typing import Any

DEFAULT_SOCKET = "/var/lib/easyenclave/agent.sock"
MAX_RESPONSE = 64 * 1024 * 1024


class ClientError(Exception):
    """The socket could not be reached, or the answer was not a JSON object."""


class CallError(ClientError):
    """The runtime refused the request: `code` is its error code, `response` the whole answer."""

    def __init__(self, method: str, response: dict[str, Any]) -> None:
        self.method = method
        self.response = response
        self.code = str(response.get("code", "error"))
        self.error = str(response.get("error", "request failed"))
        super().__init__(f"{method}: {self.error} ({self.code})")


def socket_path() -> str:
    """EE_SOCKET_PATH when set, else the image's fixed path."""
    return os.environ.get("EE_SOCKET_PATH") or DEFAULT_SOCKET


class Client:
    """One connection; requests on it are answered in order."""

    def __init__(self, path: str | None = None, token: str | None = None, timeout: float = 60.0):
        self.path = path or socket_path()
        token = token if token is not None else os.environ.get("EE_TOKEN")
        if not token:
            raise ClientError("no token: pass token= or set EE_TOKEN")
        self._token = token
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise ClientError(f"cannot connect to {self.path}: {e.strerror or e}") from None

    def __repr__(self) -> str:  # never show the token
        return f"Client(path={self.path!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request and return the answer as is (also when it says ok: false)."""
        line = json.dumps({"method": method, "token": self._token, **params}) + "\n"
        try:
            self._sock.sendall(line.encode())
            return self._read_answer()
        except TimeoutError:
            raise ClientError(f"{method}: no answer from {self.path} in time") from None
        except OSError as e:
            raise ClientError(f"{method}: {self.path}: {e.strerror or e}") from None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request; return the answer, or raise CallError when it is ok: false."""
        answer = self.request(method, **params)
        if answer.get("ok") is not True:
            raise CallError(method, answer)
        return answer

    def _read_answer(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                break
            if len(self._buf) > MAX_RESPONSE:
                raise ClientError(f"answer from {self.path} exceeds {MAX_RESPONSE} bytes")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ClientError(f"{self.path} closed the connection without an answer")
            self._buf += chunk
        try:
            answer = json.loads(line)
        except ValueError:
            raise ClientError(f"answer from {self.path} is not JSON") from None
        if not isinstance(answer, dict):
            raise ClientError(f"answer from {self.path} is not a JSON object")
        return answer


def connect(path: str | None = None, token: str | None = None, timeout: float = 60.0) -> Client:
    """Open a connection (path: EE_SOCKET_PATH or the image's path; token: EE_TOKEN)."""
    return Client(path, token, timeout)


def call(method: str, **params: Any) -> dict[str, Any]:
    """One request on a fresh connection, with EE_SOCKET_PATH and EE_TOKEN from the environment."""
    with connect() as client:
        return client.call(method, **params)
