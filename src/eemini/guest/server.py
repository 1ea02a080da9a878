"""The control socket: newline-delimited JSON over one unix socket, token on every request.

Each connection is a non-blocking socket served by the event loop. Requests on one connection are
answered in order; a method may answer later (attest runs on a worker thread), and the connection
waits for that answer before it serves its next request. Limits keep one client from hurting the
others, and keep the work of one loop turn and the memory of PID 1 bounded whatever clients do:

- a request line is at most `max_line` bytes (error, then that connection is closed);
- at most `lines_per_turn` requests of one connection are served per loop turn, however many
  arrived at once; nothing more is read from a connection while it has complete requests waiting;
- deadlines: a connection must send a request with the right token within `auth_timeout` of
  connecting, a request must be complete within `request_timeout` of its first byte (bytes
  trickling in do not extend it), and an authenticated connection may idle for `idle_timeout`;
- at most `max_connections` at once; when full, the oldest connection that has not authenticated
  makes room for the new one (only authenticated ones can make the server say `busy`);
- an answer line is at most `max_answer` bytes (else an `answer_too_large` error instead);
- a connection is served no more requests while `max_output` bytes of its answers are unread;
  while all connections together have `max_total_output` unread, requests to methods with large
  answers wait (others wait only beyond that plus two largest answers), and clients that have
  read nothing for `stall_timeout` are disconnected.

Failures are `{"ok": false, "error": "<sentence>", "code": "<word>"}`. The token is compared in
constant time and never logged or echoed.
"""

from __future__ import annotations

import _socket
import os
import sys

# Constant-time comparison: hmac.compare_digest is this very function when the interpreter has
# no _hashlib, as in the image (OpenSSL's otherwise).
from _operator import _compare_digest as compare_digest
from collections.abc import Mapping

from eemini.guest import wirejson
from eemini.guest.loop import EventLoop, Timer
from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Response = dict[str, Any]
    Respond = Callable[[Response], None]
    Handler = Callable[[dict[str, Any], Respond], None]

# sizeof(sockaddr_un.sun_path) on Linux, NUL included.
_SUN_PATH_MAX = 108


class RequestError(Exception):
    """Raised by a handler: becomes {"ok": false, "error": message, "code": code}."""

    def __init__(self, message: str, code: str = "bad_params") -> None:
        super().__init__(message)
        self.code = code


class BadRequest(RequestError):
    """The line is not a request: not UTF-8, not JSON, not an object, or without a method."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_request")


@record
class Method:
    """A socket method: its handler and the parameters it accepts (name -> JSON type).

    The handler answers through its `respond` argument, once, at once or later (on the loop
    thread); the server puts `"ok": true` first in an answer that has no "ok" of its own.

    `large`: its answers may be large (up to `max_answer`), so its requests wait while the
    unread answers of all connections are over `max_total_output`; other requests (small
    answers) wait only when the total is over that plus two largest answers.
    """

    handler: Handler
    params: Mapping[str, type] = field(default_factory=dict)
    large: bool = False


@record
class Limits:
    max_line: int = 64 * 1024  # bytes per request line, newline included
    max_connections: int = 256
    idle_timeout: float = 60.0  # seconds an authenticated connection may wait between requests
    request_timeout: float = 10.0  # seconds from a request's first byte to its newline
    auth_timeout: float = 5.0  # seconds from connecting to the first request with the right token
    max_answer: int = 1024 * 1024  # bytes per answer line, newline included
    max_output: int = 256 * 1024  # a connection's unread answers before it is served no more
    max_total_output: int = 8 * 1024 * 1024  # unread answers of all connections together
    stall_timeout: float = 1.0  # past max_total_output: close connections not read for this long
    lines_per_turn: int = 32  # requests served per connection before others get a turn


def error(message: str, code: str) -> Response:
    return {"ok": False, "error": message, "code": code}


# What a JSON value is called in error messages (bool before int: True is an int too).
_JSON_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
}


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    return next((name for t, name in _JSON_TYPES.items() if isinstance(value, t)), "an object")


def _clip(text: str) -> str:
    """A name from the client, cut to a length fit for an error message."""
    return text if len(text) <= 64 else text[:64] + "..."


def _encode(response: Response) -> bytes:
    return wirejson.dumps(response).encode() + b"\n"


def encoded_size(value: object) -> int:
    """How many bytes `value` takes in an answer line."""
    return len(wirejson.dumps(value).encode())


class _Conn:
    """One client connection. Its answers go out in request order; its state is:

    - `inbuf`: bytes received and not yet served; it holds complete lines only while the
      connection is held back (a deferred answer, unread output, the server's output budget),
      and then nothing more is read from the client.
    - `outbuf`: answers the client has not read yet (counted in `server.pending_output`).
    - `turn`: a scheduled call of `process`, after `lines_per_turn` requests or a deferred answer.
    """

    def __init__(self, server: Server, sock: _socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        now = server.loop.time()
        self.accepted = now
        self.last_activity = now  # a request served, an answer sent or read
        self.last_read = now  # the client last took some of outbuf (or outbuf was empty)
        self.request_started: float | None = None  # first byte of the unfinished request
        self.authenticated = False  # a request carried the right token
        self.pending = False  # a deferred answer is outstanding
        self.eof = False  # the peer shut down its sending side
        self.closing = False  # close once outbuf is flushed
        self.closed = False
        self.serving = False  # inside process(): answers are flushed once, at its end
        self.scan_from = 0  # inbuf before this offset holds no newline
        self.turn: Timer | None = None

    def has_line(self) -> bool:
        return self.inbuf.find(b"\n", self.scan_from) >= 0

    # -- interest ----------------------------------------------------------------------------

    def update(self) -> None:
        if self.closed:
            return
        held = self.pending or self.turn is not None or self in self.server.starved
        # Done: said all it had to say (closing), or the peer has and was answered in full.
        if not self.outbuf and (self.closing or (self.eof and not held and not self.has_line())):
            self.close()
            return
        # The loop touches epoll only when what is watched changes.
        loop = self.server.loop
        if not (self.closing or self.eof or held or self.has_line()) and (
            len(self.outbuf) < self.server.limits.max_output
        ):
            loop.add_reader(self.fd, self.on_readable)
        else:
            loop.remove_reader(self.fd)
        if self.outbuf:
            loop.add_writer(self.fd, self.on_writable)
        else:
            loop.remove_writer(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        server.loop.remove_reader(self.fd)
        server.loop.remove_writer(self.fd)
        if self.turn is not None:
            self.turn.cancel()
        self.sock.close()
        server.conns.pop(self, None)
        server.starved.pop(self, None)
        server.output_taken(len(self.outbuf))
        self.outbuf.clear()
        self.inbuf.clear()

    def drop(self, message: str, code: str) -> None:
        """Tell the client why (if its socket takes the line now), then close at once."""
        self.send(error(message, code))
        self.close()

    def resume(self) -> None:
        """Serve the requests held back, on the next loop turn, if nothing holds them now."""
        if self.closed:
            return
        server = self.server
        if (
            self.turn is None
            and not (self.pending or self.closing or self in server.starved)
            and len(self.outbuf) < server.limits.max_output
            and self.has_line()
        ):
            self.turn = server.loop.call_soon(self.process)
        self.update()

    # -- reading -----------------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.eof = True
            # A last request without its newline still counts (e.g. `printf ... | nc -U`).
            if self.inbuf.strip():
                self.inbuf += b"\n"
        else:
            if not self.inbuf:
                self.request_started = self.server.loop.time()
            self.inbuf += data
        self.process()

    def process(self) -> None:
        """Serve complete requests in order, at most `lines_per_turn` of them, then yield."""
        self.turn = None
        if self.closed:
            return
        server = self.server
        limits = server.limits
        served = 0
        self.serving = True
        try:
            while not (self.pending or self.closing or self.closed):
                if len(self.outbuf) >= limits.max_output:
                    break  # on_writable resumes once the client has read some
                nl = self.inbuf.find(b"\n", self.scan_from)
                if nl < 0:
                    self.scan_from = len(self.inbuf)
                    if len(self.inbuf) >= limits.max_line:
                        self.reject_line()
                    break
                if nl + 1 > limits.max_line:
                    self.reject_line()
                    break
                if served >= limits.lines_per_turn:
                    # Let other connections in; continue on the next loop turn.
                    self.turn = server.loop.call_soon(self.process)
                    break
                line = bytes(self.inbuf[:nl])
                if line.strip() and not server.handle_line(self, line):
                    server.starved[self] = None  # resumed once the total falls
                    break
                del self.inbuf[: nl + 1]
                self.scan_from = 0
                now = server.loop.time()
                self.request_started = now if self.inbuf else None
                self.last_activity = now
                served += 1
        finally:
            self.serving = False
        self.flush()
        self.resume()  # the flush may have made room for more answers

    def reject_line(self) -> None:
        limit = self.server.limits.max_line
        self.inbuf.clear()
        self.scan_from = 0
        self.send(error(f"request line exceeds {limit} bytes; closing the connection", "too_large"))
        self.closing = True

    # -- writing -----------------------------------------------------------------------------

    def send(self, response: Response) -> None:
        self.send_line(_encode(response))

    def send_line(self, line: bytes) -> None:
        if self.closed:
            return
        if not self.outbuf:
            self.last_read = self.server.loop.time()
        self.outbuf += line
        self.server.pending_output += len(line)
        if not self.serving:
            self.flush()

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:  # peer gone (EPIPE, ECONNRESET): nothing more to say to it
                self.close()
                return
            del self.outbuf[:n]
            self.server.output_taken(n)
            self.last_read = self.last_activity = self.server.loop.time()

    def on_writable(self) -> None:
        self.flush()
        self.resume()

    def answer_later(self) -> Callable[[bytes], None]:
        """A one-shot sender of one encoded answer line, for a handler that may answer later.

        It must be called on the loop thread. Called while the request is being handled, the
        answer simply joins the others of this turn; called later, it schedules the requests
        held back behind it (never serving them from inside the call, so that a chain of
        answers never becomes a chain of nested calls).
        """
        self.pending = True
        done = False

        def respond(line: bytes) -> None:
            nonlocal done
            if done:
                return
            done = True
            self.pending = False
            self.last_activity = self.server.loop.time()
            if self.closed:
                return
            self.send_line(line)
            if not self.serving:
                self.resume()

        return respond


class Server:
    """Serves `methods` on a unix socket at `path`, for clients holding `token`."""

    def __init__(
        self,
        loop: EventLoop,
        path: str,
        token: str,
        methods: Mapping[str, Method],
        limits: Limits = Limits(),
    ) -> None:
        self.loop = loop
        self.path = path
        self._token = token.encode()
        self.methods = dict(methods)
        self.limits = limits
        # Connections in the order they were accepted (a dict keeps it), so the oldest
        # unauthenticated one is the first found.
        self.conns: dict[_Conn, None] = {}
        self.listener: _socket.socket | None = None
        self.pending_output = 0  # bytes of answers not yet taken by their clients, all together
        self.starved: dict[_Conn, None] = {}  # held back until pending_output falls
        self._waking: Timer | None = None
        # Deadlines are checked this often: a fraction of the shortest one.
        shortest = min(limits.idle_timeout, limits.request_timeout, limits.auth_timeout)
        self._sweep_every = max(0.05, min(1.0, shortest / 4, limits.stall_timeout / 2))

    def start(self) -> None:
        """Bind the socket (mode 0600, parent directory created 0700) and start serving.

        A socket file already at the path is replaced (dev mode checks first that no runtime
        serves there; an image has none)."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        # Bind under a temporary name, listen, then rename: the path appears only once it accepts
        # connections (a client polling for it never sees ECONNREFUSED), already mode 0600.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            tmp = self.path  # no room for the temporary name: bind in place
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # the socket file is made mode 0600
        try:
            sock.bind(tmp)
        finally:
            os.umask(old_umask)
        sock.listen(min(_socket.SOMAXCONN, 4096))
        if tmp != self.path:
            os.rename(tmp, self.path)
        sock.setblocking(False)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self.loop.call_later(self._sweep_every, self._sweep)

    # -- connections -------------------------------------------------------------------------

    def _on_accept(self) -> None:
        listener = self.listener
        assert listener is not None
        for _ in range(64):  # bounded, so a connection storm does not starve the loop
            try:
                # socket.socket.accept() without socket.py: accept4(SOCK_CLOEXEC), then a socket
                # object of the listener's family and type for the new fd (typeshed does not
                # declare _accept).
                fd, _ = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as e:
                # EMFILE/ENFILE: out of fds. The connection stays queued; stop watching the
                # listener for a moment, or a level-triggered select would spin on it.
                print(f"eemini: control socket: accept failed: {e.strerror}", file=sys.stderr)
                self.loop.remove_reader(listener.fileno())
                self.loop.call_later(
                    0.1, lambda: self.loop.add_reader(listener.fileno(), self._on_accept)
                )
                return
            sock = _socket.socket(listener.family, listener.type, listener.proto, fileno=fd)
            sock.setblocking(False)
            limit = self.limits.max_connections
            if len(self.conns) >= limit:
                # Make room by closing the oldest connection that has not authenticated, if any.
                oldest = next((conn for conn in self.conns if not conn.authenticated), None)
                if oldest is None:
                    try:
                        sock.send(
                            _encode(error(f"too many connections (limit {limit}); try again", "busy"))
                        )
                    except OSError:
                        pass
                    sock.close()
                    continue
                oldest.drop(
                    f"connection limit ({limit}) reached: closing the oldest connection "
                    "that has not sent the right token",
                    "evicted",
                )
            conn = _Conn(self, sock)
            self.conns[conn] = None
            conn.update()

    # -- output budget -----------------------------------------------------------------------

    def output_taken(self, n: int) -> None:
        """`n` bytes of pending output were read by their client or dropped with it."""
        self.pending_output -= n
        if self.starved and self._waking is None and self.pending_output < self.limits.max_total_output:
            self._waking = self.loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._waking = None
        starved, self.starved = self.starved, {}
        for conn in starved:
            conn.resume()

    # -- deadlines ---------------------------------------------------------------------------

    def _sweep(self) -> None:
        now = self.loop.time()
        limits = self.limits
        for conn in list(self.conns):
            if conn.pending or conn in self.starved:
                continue  # waiting for us (an answer, the output budget), not for the client
            if not conn.authenticated and now >= conn.accepted + limits.auth_timeout:
                conn.drop(
                    f"no request with the right token within {limits.auth_timeout:g} s "
                    "of connecting; closing the connection",
                    "auth_timeout",
                )
            elif conn.outbuf:
                # The client does not read its answers: it cannot be told anything either.
                if now >= conn.last_read + limits.idle_timeout:
                    conn.close()
            elif conn.has_line() or conn.closing:
                continue  # held back by the output budget, or about to close
            elif conn.inbuf:
                started = conn.request_started if conn.request_started is not None else now
                if now >= started + limits.request_timeout:
                    conn.drop(
                        f"request not complete {limits.request_timeout:g} s after its first "
                        "byte; closing the connection",
                        "request_timeout",
                    )
            elif now >= conn.last_activity + limits.idle_timeout:
                conn.drop(f"connection idle for {limits.idle_timeout:g} s; closing it", "idle_timeout")
        if self.pending_output >= limits.max_total_output:
            # Over the output budget: close the clients that have stopped reading their answers.
            for conn in list(self.conns):
                if conn.outbuf and now >= conn.last_read + limits.stall_timeout:
                    conn.close()
        self.loop.call_later(self._sweep_every, self._sweep)

    # -- requests ----------------------------------------------------------------------------

    def handle_line(self, conn: _Conn, line: bytes) -> bool:
        """Answer one request line; False (and nothing done) when it must wait for the budget."""
        limits = self.limits
        if self.pending_output >= limits.max_total_output + 2 * limits.max_answer:
            return False
        try:
            name, method, params = self._request(conn, line)
        except RequestError as e:
            conn.send(error(str(e), e.code))
            return True
        if method.large and self.pending_output >= limits.max_total_output:
            return False
        send = conn.answer_later()
        cap = limits.max_answer

        def reply(response: Response) -> None:
            if "ok" not in response:
                response = {"ok": True, **response}
            line = _encode(response)
            if len(line) > cap:
                line = _encode(
                    error(
                        f"{name}: the answer would be {len(line)} bytes, over the limit of "
                        f"{cap} bytes per answer",
                        "answer_too_large",
                    )
                )
            send(line)

        try:
            method.handler(params, reply)
        except RequestError as e:
            reply(error(str(e), e.code))
        except Exception as e:
            import traceback

            print(f"eemini: control socket: {name} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            reply(error(f"internal error in {name}: {type(e).__name__}", "internal"))
        return True

    def _request(self, conn: _Conn, line: bytes) -> tuple[str, Method, dict[str, Any]]:
        """The method a request line names and its parameters, checked; RequestError unless the
        line is a well-formed request with the right token."""
        try:
            request = wirejson.loads(line)
        except UnicodeDecodeError as e:
            raise BadRequest(f"request is not valid UTF-8 (bad byte at offset {e.start})") from None
        except RecursionError:
            raise BadRequest("request is not valid JSON: nested too deeply") from None
        except ValueError as e:
            raise BadRequest(f"request is not valid JSON: {wirejson.problem(e)}") from None
        if not isinstance(request, dict):
            raise BadRequest(f"request must be a JSON object, got {_json_type_name(request)}")
        token = request.pop("token", None)
        if token is None:
            raise RequestError(
                'missing "token": every request carries the boot token', "unauthenticated"
            )
        if not isinstance(token, str) or not compare_digest(
            token.encode("utf-8", "surrogatepass"), self._token
        ):
            raise RequestError("wrong token", "unauthenticated")
        conn.authenticated = True
        name = request.pop("method", None)
        if name is None:
            raise BadRequest('missing "method"')
        if not isinstance(name, str):
            raise BadRequest(f'"method" must be a string, got {_json_type_name(name)}')
        method = self.methods.get(name)
        if method is None:
            known = ", ".join(sorted(self.methods))
            raise RequestError(f"unknown method {_clip(name)!r} (known: {known})", "unknown_method")
        for key, value in request.items():
            expected = method.params.get(key)
            if expected is None:
                known = ", ".join(sorted(method.params)) or "none"
                raise RequestError(f"{name}: unknown parameter {_clip(key)!r} (accepted: {known})")
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise RequestError(
                    f"{name}: {key} must be {_JSON_TYPES[expected]}, got {_json_type_name(value)}"
                )
        return name, method, request
