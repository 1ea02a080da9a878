"""HTTPS GET for the collateral services: standard library only (http.client and ssl).

Certificates are checked against the system trust store, or only against a pinned CA file (a
self-hosted PCCS's own certificate, or the CA that issued it). Plain HTTP is refused and redirects
are not followed: collateral comes from the address the user named, or not at all.

Each GET has a timeout per attempt and a bounded number of attempts. Connection failures,
timeouts, bodies cut short and the statuses that mean "try later" (429, 500, 502, 503, 504) are
retried after a short, growing pause (a `Retry-After` of a few seconds is honoured); any other
status is final. Every failure is a `CollateralUnavailable` whose message names the URL and,
when there was one, the HTTP status.
"""

from __future__ import annotations

import dataclasses
import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message

from eemini import __version__
from eemini.tdx.errors import CollateralUnavailable

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BODY = 16 << 20  # a processor-CA PCK CRL is a few hundred kB
MAX_RETRY_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    url: str
    status: int
    reason: str
    headers: Message
    body: bytes
    attempts: int = 1

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def media_type(self) -> str:
        """The Content-Type without its parameters, lower case ("" when absent)."""
        return (self.headers.get_content_type() if "Content-Type" in self.headers else "").lower()


def status_text(status: int, reason: str) -> str:
    return f"HTTP {status}" + (f" {reason}" if reason else "")


@dataclass
class HttpsClient:
    """GET over HTTPS with bounded retries. `progress` hears about a request that takes longer
    than `progress_after` seconds (once per request), and about each retry."""

    ca_file: str | None = None  # pin: trust only these certificates (PEM), not the system store
    timeout: float = 20.0
    attempts: int = 3
    backoff: float = 0.5  # seconds before the second attempt; doubles after each
    progress: Callable[[str], None] | None = None
    progress_after: float = 1.0
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise CollateralUnavailable(
                    f"cannot use {self.ca_file} as the pinned CA: {getattr(e, 'strerror', None) or e}"
                ) from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.ca_file is not None:
                # The pin may be the server's own certificate or an intermediate, not only a root.
                context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            self._context = context
        return self._context

    def get(self, url: str, what: str) -> Response:
        """GET `url`; any status is returned once final (the caller judges it), failures raise."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise CollateralUnavailable(f"GET {url}: only https:// URLs are used for collateral")
        timer = None
        if self.progress is not None:
            timer = threading.Timer(
                self.progress_after, self.progress, (f"fetching {what} from {url} ...",)
            )
            timer.daemon = True
            timer.start()
        try:
            return self._get(url, parts, timer)
        finally:
            if timer is not None:
                timer.cancel()

    def _get(self, url: str, parts: urllib.parse.SplitResult, timer: threading.Timer | None) -> Response:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                response = self._once(url, parts)
            except _Transient as e:
                if last:
                    raise CollateralUnavailable(f"GET {url}: {e} (after {attempt} attempts)") from None
                self._retry(url, str(e), delay, timer)
            else:
                if response.status not in RETRY_STATUSES or last:
                    return dataclasses.replace(response, attempts=attempt)
                wait = max(delay, _retry_after(response))
                self._retry(url, status_text(response.status, response.reason), wait, timer)
                delay = wait
            delay *= 2
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _retry(self, url: str, why: str, wait: float, timer: threading.Timer | None) -> None:
        if timer is not None:
            timer.cancel()  # the retry says what is going on
        if self.progress is not None:
            self.progress(f"GET {url}: {why}; trying again in {wait:g} s")
        time.sleep(wait)

    def _once(self, url: str, parts: urllib.parse.SplitResult) -> Response:
        host = parts.hostname or ""
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=self.timeout, context=self.context()
        )
        try:
            conn.request(
                "GET",
                target,
                headers={"User-Agent": f"eemini/{__version__}", "Accept": "*/*", "Connection": "close"},
            )
            raw = conn.getresponse()
            body = _read_body(raw, url)
            return Response(url, raw.status, raw.reason, raw.msg, body)
        except ssl.SSLCertVerificationError as e:
            raise CollateralUnavailable(
                f"GET {url}: the server's TLS certificate is not trusted: {e.verify_message}"
            ) from None
        except ssl.SSLError as e:
            raise CollateralUnavailable(f"GET {url}: TLS failed: {e.reason or e}") from None
        except http.client.IncompleteRead as e:
            raise _Transient(
                f"the response body was cut short ({len(e.partial)} bytes, "
                f"{e.expected} more were announced)"
            ) from None
        except TimeoutError:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except http.client.HTTPException as e:
            raise _Transient(f"not a valid HTTP response ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise _Transient(f"cannot connect: {e.strerror or e}") from None
        finally:
            conn.close()


class _Transient(Exception):
    """A failure worth another attempt."""


def _read_body(raw: http.client.HTTPResponse, url: str) -> bytes:
    # With a Content-Length, read() raises IncompleteRead when the body is cut short; a chunked
    # body raises it on a cut chunk. A body that just ends at the connection's close cannot be
    # told apart from a whole one here: the item's own checks find it out.
    if raw.length is not None:
        if raw.length > MAX_BODY:
            raise CollateralUnavailable(
                f"GET {url}: the response announces {raw.length} bytes, more than {MAX_BODY}"
            )
        return raw.read()
    body = raw.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise CollateralUnavailable(f"GET {url}: the response is larger than {MAX_BODY} bytes")
    return body


def _retry_after(response: Response) -> float:
    value = (response.header("Retry-After") or "").strip()
    return min(float(value), MAX_RETRY_AFTER) if value.isdigit() else 0.0
