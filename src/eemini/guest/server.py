"""The control socket: newline-delimited JSON over one unix socket, token on every request.

Each connection is a non-blocking socket served by the event loop. Requests on one connection are
answered in order; a method may answer later (attest runs on a worker thread), and the connection
waits for that answer before it reads its next request. Limits keep one client from hurting the
others: a maximum request line (error, then that connection is closed), a maximum number of
connections (error to the extra ones), an idle timeout, a bound on unread output, and a bound on
how many requests one connection gets served per loop turn.

Failures are `{"ok": false, "error": "<sentence>", "code": "<word>"}`. The token is compared in
constant time and never logged or echoed.
"""

from __future__ import annotations

# The socket module's C core: socket.py wraps it in enums and imports selectors (boot time
# under emulation), and this module needs neither.
import _socket
import errno
import json
import os
import stat
import sys

# Constant-time comparison without importing hmac (boot time): hmac.compare_digest is this very
# function when the interpreter has no _hashlib, as in the image (OpenSSL's otherwise).
from _operator import _compare_digest as compare_digest
from collections.abc import Mapping

from eemini.guest.loop import EventLoop, Timer
from eemini.guest.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:  # for the type checker only: typing costs boot time to import
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


@record
class Method:
    """A socket method: its handler and the parameters it accepts (name -> JSON type)."""

    handler: Handler
    params: Mapping[str, type] = field(default_factory=dict)


@record
class Limits:
    max_line: int = 64 * 1024  # bytes per request line, newline included
    max_connections: int = 256
    idle_timeout: float = 60.0  # seconds without a complete request or any progress
    max_output: int = 1024 * 1024  # unread response bytes before we stop reading that client
    lines_per_turn: int = 32  # requests served per connection before others get a turn


def error(message: str, code: str) -> Response:
    return {"ok": False, "error": message, "code": code}


_JSON_NAMES = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def socket_in_use(path: str) -> bool:
    """True when something accepts connections on the unix socket at `path`."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _accept(listener: _socket.socket) -> _socket.socket:
    # socket.socket.accept() without socket.py: accept4(SOCK_CLOEXEC), then a socket object of
    # the listener's family and type for the new fd (typeshed does not declare _accept).
    fd, _ = listener._accept()  # type: ignore[attr-defined]
    return _socket.socket(listener.family, listener.type, listener.proto, fileno=fd)


def _encode(response: Response) -> bytes:
    return json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class _Conn:
    def __init__(self, server: Server, sock: _socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last_activity = server.loop.time()
        self.pending = False  # a deferred answer is outstanding
        self.eof = False  # the peer shut down its sending side
        self.closing = False  # close once outbuf is flushed
        self.closed = False
        self.reading = False
        self.writing = False
        self.scan_from = 0  # inbuf before this offset holds no newline
        self.turn: Timer | None = None

    # -- interest ----------------------------------------------------------------------------

    def update(self) -> None:
        if self.closed:
            return
        if self.closing and not self.outbuf:
            self.close()
            return
        want_read = not (self.closing or self.eof or self.pending) and (
            len(self.outbuf) < self.server.limits.max_output and self.turn is None
        )
        want_write = bool(self.outbuf)
        loop = self.server.loop
        if want_read != self.reading:
            if want_read:
                loop.add_reader(self.fd, self.on_readable)
            else:
                loop.remove_reader(self.fd)
            self.reading = want_read
        if want_write != self.writing:
            if want_write:
                loop.add_writer(self.fd, self.on_writable)
            else:
                loop.remove_writer(self.fd)
            self.writing = want_write
        if self.eof and not self.pending and not self.outbuf and self.turn is None:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        if self.reading:
            loop.remove_reader(self.fd)
        if self.writing:
            loop.remove_writer(self.fd)
        if self.turn is not None:
            self.turn.cancel()
            self.turn = None
        self.sock.close()
        self.server.conns.discard(self)

    # -- reading -----------------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.last_activity = self.server.loop.time()
        if not data:
            self.eof = True
            # A last request without its newline still counts (e.g. `printf ... | nc -U`).
            if self.inbuf.strip():
                self.inbuf += b"\n"
        else:
            self.inbuf += data
        self.process()

    def process(self) -> None:
        self.turn = None
        limits = self.server.limits
        served = 0
        while not self.pending and not self.closing:
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
                self.turn = self.server.loop.call_soon(self.process)
                break
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            self.scan_from = 0
            served += 1
            if line.strip():
                self.server.handle_line(self, line)
        self.update()

    def reject_line(self) -> None:
        limit = self.server.limits.max_line
        self.inbuf.clear()
        self.send(error(f"request line exceeds {limit} bytes; closing the connection", "too_large"))
        self.closing = True

    # -- writing -----------------------------------------------------------------------------

    def send(self, response: Response) -> None:
        if self.closed:
            return
        self.outbuf += _encode(response)
        self.flush()

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # Peer gone (EPIPE, ECONNRESET): nothing more to say to it.
                self.outbuf.clear()
                self.closing = True
                break
            del self.outbuf[:n]
            self.last_activity = self.server.loop.time()

    def on_writable(self) -> None:
        self.flush()
        self.update()

    def answer_later(self) -> Respond:
        """A one-shot responder for a deferred answer; must be called on the loop thread."""
        self.pending = True
        done = False

        def respond(response: Response) -> None:
            nonlocal done
            if done:
                return
            done = True
            self.pending = False
            self.last_activity = self.server.loop.time()
            if self.closed:
                return
            self.send(response)
            self.process()

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
        if not token:
            raise ValueError("the control socket needs a non-empty token")
        self.loop = loop
        self.path = path
        self._token = token.encode()
        self.methods = dict(methods)
        self.limits = limits
        self.conns: set[_Conn] = set()
        self.listener: _socket.socket | None = None
        self.requests = 0
        self.rejected_connections = 0
        self._sweeper: Timer | None = None

    def __repr__(self) -> str:  # never show the token
        return f"Server(path={self.path!r}, methods={sorted(self.methods)})"

    def start(self) -> None:
        """Bind the socket (mode 0600, parent directory created 0700) and start serving."""
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
            if socket_in_use(self.path):
                raise OSError(errno.EADDRINUSE, f"another runtime is serving {self.path}")
            os.unlink(self.path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
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
        old_umask = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old_umask)
        os.chmod(tmp, 0o600)
        sock.listen(min(_socket.SOMAXCONN, 4096))
        if tmp != self.path:
            os.rename(tmp, self.path)
        sock.setblocking(False)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self._schedule_sweep()

    def close(self) -> None:
        """Stop listening, drop every connection and remove the socket file."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.conns):
            conn.close()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- connections -------------------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):  # bounded, so a connection storm does not starve the loop
            try:
                sock = _accept(self.listener)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE/ENFILE: out of fds. The connection stays queued; stop watching the
                # listener for a moment, or a level-triggered select would spin on it.
                print(f"eemini: control socket: accept failed: {e.strerror}", file=sys.stderr)
                fd = self.listener.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(0.1, lambda fd=fd: self._resume_accept(fd))  # type: ignore[misc]
                return
            sock.setblocking(False)
            if len(self.conns) >= self.limits.max_connections:
                self.rejected_connections += 1
                limit = self.limits.max_connections
                try:
                    sock.send(_encode(error(f"too many connections (limit {limit}); try again", "busy")))
                except OSError:
                    pass
                sock.close()
                continue
            conn = _Conn(self, sock)
            self.conns.add(conn)
            conn.update()

    def _resume_accept(self, fd: int) -> None:
        if self.listener is not None and self.listener.fileno() == fd:
            self.loop.add_reader(fd, self._on_accept)

    def _schedule_sweep(self) -> None:
        interval = max(0.05, min(1.0, self.limits.idle_timeout / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        deadline = self.loop.time() - self.limits.idle_timeout
        for conn in list(self.conns):
            if conn.pending or conn.closing or conn.last_activity > deadline:
                continue
            timeout = self.limits.idle_timeout
            conn.send(error(f"connection idle for {timeout:g} s; closing it", "idle_timeout"))
            conn.closing = True
            conn.update()
        for conn in list(self.conns):
            # A client that never reads what we send is dropped once it has been idle twice over.
            if conn.closing and conn.last_activity <= deadline - self.limits.idle_timeout:
                conn.close()
        self._schedule_sweep()

    # -- requests ----------------------------------------------------------------------------

    def handle_line(self, conn: _Conn, line: bytes) -> None:
        self.requests += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            conn.send(error(f"request is not valid UTF-8 (bad byte at offset {e.start})", "bad_request"))
            return
        try:
            request = json.loads(text)
        except json.JSONDecodeError as e:
            conn.send(error(f"request is not valid JSON: {e.msg} at column {e.colno}", "bad_request"))
            return
        except RecursionError:
            conn.send(error("request is not valid JSON: nested too deeply", "bad_request"))
            return
        except ValueError as e:  # e.g. an integer beyond the interpreter's digit limit
            conn.send(error(f"request is not valid JSON: {e}", "bad_request"))
            return
        if not isinstance(request, dict):
            what = _json_type_name(request)
            conn.send(error(f"request must be a JSON object, got {what}", "bad_request"))
            return
        token = request.pop("token", None)
        if token is None:
            conn.send(error('missing "token": every request carries the boot token', "unauthenticated"))
            return
        if not isinstance(token, str) or not compare_digest(
            token.encode("utf-8", "surrogatepass"), self._token
        ):
            conn.send(error("wrong token", "unauthenticated"))
            return
        name = request.pop("method", None)
        if name is None:
            conn.send(error('missing "method"', "bad_request"))
            return
        if not isinstance(name, str):
            what = _json_type_name(name)
            conn.send(error(f'"method" must be a string, got {what}', "bad_request"))
            return
        method = self.methods.get(name)
        if method is None:
            known = ", ".join(sorted(self.methods))
            shown = name if len(name) <= 64 else name[:64] + "..."
            conn.send(error(f"unknown method {shown!r} (known: {known})", "unknown_method"))
            return
        try:
            params = self._check_params(name, method, request)
        except RequestError as e:
            conn.send(error(str(e), e.code))
            return
        respond = conn.answer_later()

        def reply(response: Response) -> None:
            if "ok" not in response:
                response = {"ok": True, **response}
            respond(response)

        try:
            method.handler(params, reply)
        except RequestError as e:
            respond(error(str(e), e.code))
        except Exception as e:
            import traceback  # only on this path: it imports textwrap and more (boot time)

            print(f"eemini: control socket: {name} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            respond(error(f"internal error in {name}: {type(e).__name__}", "internal"))

    @staticmethod
    def _check_params(name: str, method: Method, request: dict[str, Any]) -> dict[str, Any]:
        allowed = dict(method.params)
        for key, value in request.items():
            expected = allowed.get(key)
            if expected is None:
                known = ", ".join(sorted(allowed)) or "none"
                shown = key if len(key) <= 64 else key[:64] + "..."
                raise RequestError(f"{name}: unknown parameter {shown!r} (accepted: {known})")
            ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
            if not ok:
                raise RequestError(
                    f"{name}: {key} must be {_JSON_NAMES.get(expected, expected.__name__)}, "
                    f"got {_json_type_name(value)}"
                )
        return request
