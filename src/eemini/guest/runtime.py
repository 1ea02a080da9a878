"""The runtime: one event loop serving the control socket and supervising the workload.

Dev mode builds it with the simulated backend and runs it as an ordinary process; PID 1 builds it
with the boot token, the spec from /etc/eemini/spec.json, the configfs-tsm (or simulated) backend,
the image facts, its event log and an `on_poweroff` callback. Both add their own fds, timers and
signals to `runtime.loop`, `start()` it and run the loop themselves.
"""

from __future__ import annotations

import binascii
import hashlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from eemini import __version__
from eemini.guest.attest import AttestError, read_ccel
from eemini.guest.image import SOCKET, ImageFacts
from eemini.guest.logbuf import MAX_LINES, LogBuffer
from eemini.guest.loop import EventLoop, ThreadStartError, WorkerThread
from eemini.guest.quote_layout import REPORT_DATA_SIZE
from eemini.guest.record import field, record
from eemini.guest.server import Limits, Method, RequestError, Server, encoded_size, error
from eemini.guest.spec import EnclaveSpec, OnExit
from eemini.guest.supervisor import Backoff, Reaper, RunRecord, Supervisor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from eemini.guest.attest import Backend
    from eemini.guest.events import Event
    from eemini.guest.rtmr import RuntimeMeasurer
    from eemini.guest.server import Respond

# A `logs` answer without its lines: {"ok":true,"lines":[],"dropped":…,"omitted":…} and the
# newline, with room for the two counts.
_LOGS_FRAME = 96
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


@record
class RuntimeConfig:
    """Everything the runtime needs; PID 1 and dev mode fill it differently."""

    spec: EnclaveSpec
    token: str
    backend: Backend
    socket_path: str = SOCKET
    image: ImageFacts | None = None  # None in dev mode
    extra_env: Mapping[str, str] = field(default_factory=dict)  # accepted boot config
    limits: Limits = field(default_factory=Limits)
    backoff: Backoff = field(default_factory=Backoff)
    grace: float = 10.0
    ccel_path: str | None = None  # CC event log to return with quotes, when present


class AttestWorker:
    """Produces quotes on one worker thread, one at a time, so the loop never blocks on them."""

    def __init__(self, loop: EventLoop, backend: Backend, max_queue: int) -> None:
        self.loop = loop
        self.backend = backend
        # A bounded queue: the loop thread appends, the worker thread waits on the condition
        # and takes from the left.
        self.max_queue = max_queue
        self._queue: deque[tuple[bytes, Callable[[Any], None]]] = deque()
        self._queued = threading.Condition()
        self._worker = WorkerThread("eemini-attest", self._work)

    def submit(self, report_data: bytes, done: Callable[[Any], None]) -> None:
        """Queue a request; `done(quote or AttestError)` later runs on the loop thread.

        RequestError (code `busy`) when the queue is full or the worker thread cannot be started
        (the next request tries again).
        """
        try:
            self._worker.ensure()
        except ThreadStartError as e:
            raise RequestError(f"attest: {e}; try again", "busy") from None
        with self._queued:
            if len(self._queue) >= self.max_queue:
                raise RequestError(
                    f"too many attestation requests queued ({self.max_queue}); try again", "busy"
                )
            self._queue.append((report_data, done))
            self._queued.notify()

    def _work(self) -> None:
        while True:
            with self._queued:
                while not self._queue:
                    self._queued.wait()
                report_data, done = self._queue.popleft()
            result: Any
            try:
                # A backend with more evidence than a quote (azure-tdx-vtpm) offers attest().
                attest = getattr(self.backend, "attest", None)
                result = attest(report_data) if attest is not None else self.backend.quote(report_data)
            except AttestError as e:
                result = e
            except Exception as e:  # a backend bug must not kill the worker
                result = AttestError(f"attestation backend failed: {type(e).__name__}: {e}")
            self.loop.call_soon_threadsafe(lambda r=result, d=done: d(r))  # type: ignore[misc]


def decode_report_data(params: Mapping[str, Any]) -> bytes:
    """The caller's report data from `report_data_b64` or the legacy `nonce` field.

    `report_data_b64` wins when both are present (as in the original runtime). The legacy
    `nonce` is read as hex when it is an even number of hex digits, otherwise as base64.
    """
    field_name = "report_data_b64" if "report_data_b64" in params else "nonce"
    text = params.get(field_name)
    if text is None:
        return b""
    if field_name == "nonce" and text and len(text) % 2 == 0 and set(text) <= _HEX_DIGITS:
        data = bytes.fromhex(text)
    else:
        try:
            # What base64.b64decode(validate=True) does on 3.13.
            data = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise RequestError(f"attest: {field_name} is not valid base64") from None
    if len(data) > REPORT_DATA_SIZE:
        raise RequestError(
            f"attest: {field_name} decodes to {len(data)} bytes; the maximum is {REPORT_DATA_SIZE}"
        )
    return data


def _b64encode(data: bytes) -> str:
    # base64.b64encode(data).decode()
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class Runtime:
    """The guest runtime. Construct, `start()`, then run `runtime.loop`."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        events: tuple[Event, ...],
        measurer: RuntimeMeasurer,
        on_poweroff: Callable[[str], None],
    ) -> None:
        self.config = config
        self.loop = EventLoop()
        self.events = events
        # RTMR3 extension of the runtime log (docs/measurements.md); reported by health and attest.
        self.measurer = measurer
        self.on_poweroff = on_poweroff  # power_off, or in dev mode: stop the loop
        self.started_mono = time.monotonic()
        self.started_at = time.time()
        self.spec_digest = "sha256:" + hashlib.sha256(config.spec.canonical_json()).hexdigest()
        self.logbuf = LogBuffer()
        self.reaper = Reaper()
        self.supervisor = Supervisor(
            self.loop,
            self.reaper,
            config.spec.workload,
            env=self._workload_env(),
            logbuf=self.logbuf,
            on_done=self._workload_done,
            backoff=config.backoff,
            grace=config.grace,
        )
        # A connection waits for its answer before its next request, so it has at most one
        # quote queued: a queue as long as the connection limit never refuses a client.
        self.attester = AttestWorker(self.loop, config.backend, config.limits.max_connections)
        self.server = Server(self.loop, config.socket_path, config.token, self._methods(), config.limits)
        self.poweroff_reason: str | None = None  # set once shutting down

    def _workload_env(self) -> dict[str, str]:
        """The workload's whole environment: the declared env, the accepted boot config (allow_env
        keys only, eemini.guest.bootconfig.apply_policy), and the token when the spec grants it."""
        workload = self.config.spec.workload
        env = {**workload.env, **self.config.extra_env}
        if workload.inherit_token:
            env["EE_TOKEN"] = self.config.token
            if self.config.socket_path != SOCKET:
                # Dev mode: the token is useless to a workload that cannot find the socket.
                env["EE_SOCKET_PATH"] = self.config.socket_path
        return env

    def _methods(self) -> dict[str, Method]:
        return {
            "health": Method(self._health),
            "attest": Method(self._attest, {"report_data_b64": str, "nonce": str}, large=True),
            "list": Method(self._list),
            "logs": Method(self._logs, {"tail": int, "id": str}, large=True),
            "restart": Method(self._restart, {"id": str}),
            "shutdown": Method(self._shutdown),
            "info": Method(self._info, large=True),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Reap children on SIGCHLD, open the control socket, start the workload."""
        self.loop.add_signal_handler(signal.SIGCHLD, self.reaper.reap)
        self.server.start()
        self.supervisor.start()

    def shutdown(self, reason: str) -> None:
        """Stop the workload (SIGTERM, grace, SIGKILL), then call on_poweroff(reason). Idempotent."""
        if self.poweroff_reason is not None:
            return
        self.poweroff_reason = reason
        self.supervisor.note(f"shutting down: {reason}")
        self.supervisor.stop(lambda: self._stopped(reason))

    def _stopped(self, reason: str) -> None:
        self.supervisor.console.flush()  # before exiting or powering off
        self.on_poweroff(reason)

    def _workload_done(self, record: RunRecord) -> None:
        if self.config.spec.workload.on_exit is OnExit.POWEROFF:
            self.shutdown(f"workload done for good ({record.describe()}); on_exit = poweroff")
        else:
            self.supervisor.note("workload done for good; on_exit = stay, still serving")

    # -- methods -----------------------------------------------------------------------------

    def _health(self, params: dict[str, Any], respond: Respond) -> None:
        respond(
            {
                "attestation_type": self.config.backend.attestation_type,
                "workloads": 1,
                "uptime_secs": int(time.monotonic() - self.started_mono),
                "workload": self.supervisor.state.value,
                "version": __version__,
                **self.measurer.status(),
            }
        )

    def _attest(self, params: dict[str, Any], respond: Respond) -> None:
        data = decode_report_data(params)
        backend = self.config.backend

        def done(result: Any) -> None:
            if isinstance(result, AttestError):
                response = error(f"attest: {result}", result.code)
                response["attestation_type"] = backend.attestation_type
                respond(response)
                return
            # bytes (a quote), or the Evidence of a backend with attest(): a quote and more fields.
            quote, extra = (result, {}) if isinstance(result, bytes) else (result.quote, result.extra)
            ccel = read_ccel(self.config.ccel_path) if self.config.ccel_path else None
            respond(
                {
                    "attestation_type": backend.attestation_type,
                    "quote_format": "tdx",
                    "quote_b64": _b64encode(quote),
                    "report_data_b64": _b64encode(data),
                    "report_data_len": len(data),
                    "events": [e.to_dict() for e in self.events],
                    "rtmr3_extended": self.measurer.enabled,
                    "cc_eventlog_b64": None if ccel is None else _b64encode(ccel),
                    **extra,
                }
            )

        # Zero-padded to 64 bytes, as the original runtime did.
        self.attester.submit(data.ljust(REPORT_DATA_SIZE, b"\0"), done)

    def _list(self, params: dict[str, Any], respond: Respond) -> None:
        respond({"deployments": [self.supervisor.to_dict()]})

    def _check_id(self, method: str, params: Mapping[str, Any]) -> None:
        wid = params.get("id")
        name = self.config.spec.workload.name
        if wid is not None and wid != name:
            raise RequestError(
                f"{method}: no workload {wid!r} (the one workload is {name!r})", "not_found"
            )

    def _logs(self, params: dict[str, Any], respond: Respond) -> None:
        self._check_id("logs", params)
        tail = params.get("tail", 100)
        if not 1 <= tail <= MAX_LINES:
            raise RequestError(f"logs: tail must be between 1 and {MAX_LINES}, got {tail}")
        lines = self.logbuf.tail(tail)
        # Control characters take six bytes each in JSON: keep the newest lines that fit in one
        # answer and say how many were left out.
        budget = self.config.limits.max_answer - _LOGS_FRAME
        omitted = len(lines)
        for line in reversed(lines):
            budget -= encoded_size(line) + 1  # and a comma
            if budget < 0:
                break
            omitted -= 1
        respond({"lines": lines[omitted:], "dropped": self.logbuf.dropped, "omitted": omitted})

    def _restart(self, params: dict[str, Any], respond: Respond) -> None:
        self._check_id("restart", params)
        if self.poweroff_reason is not None:
            raise RequestError("restart: the runtime is shutting down", "shutting_down")

        def restarted() -> None:
            current = self.supervisor.current
            respond(
                {
                    "pid": None if current is None else current.pid,
                    "restarts": self.supervisor.restarts,
                    "status": self.supervisor.state.value,
                }
            )

        self.supervisor.stop(restarted, restart=True)

    def _shutdown(self, params: dict[str, Any], respond: Respond) -> None:
        respond({"shutting_down": True})
        # After the answer is queued: the workload stop may take the whole grace period.
        self.loop.call_soon(lambda: self.shutdown("shutdown requested over the control socket"))

    def _info(self, params: dict[str, Any], respond: Respond) -> None:
        respond(
            {
                "version": __version__,
                "attestation_type": self.config.backend.attestation_type,
                "started_at": round(self.started_at, 3),
                "uptime_secs": int(time.monotonic() - self.started_mono),
                "spec": self.config.spec.to_dict(),
                "spec_digest": self.spec_digest,
                "image": None if self.config.image is None else self.config.image.to_dict(),
                "events": [e.to_dict() for e in self.events],
                "limits": {
                    "max_line": self.config.limits.max_line,
                    "max_connections": self.config.limits.max_connections,
                    "idle_timeout_secs": self.config.limits.idle_timeout,
                },
            }
        )
