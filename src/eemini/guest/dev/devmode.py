"""Dev mode: the guest runtime as an ordinary process, with simulated attestation.

`eemini dev` calls `run()`; `python -m eemini.guest.dev.devmode` is the same runner with the knobs
tests need (grace period, backoff, socket limits) and a resolved spec JSON instead of TOML.
"""

from __future__ import annotations

import _socket
import argparse
import ctypes
import errno
import os
import secrets
import signal
import stat
import sys

from eemini.guest import linux
from eemini.guest.events import boot_log
from eemini.guest.record import field, record
from eemini.guest.runtime import Runtime, RuntimeConfig
from eemini.guest.server import Limits, Server
from eemini.guest.spec import EnclaveSpec, SpecError, loads
from eemini.guest.supervisor import Backoff

TOKEN_FILE = "token"  # noqa: S105 - a file name, not a secret
DEV_ROOT_FILE = "dev-root.pem"
_DEFAULT_LIMITS = Limits()

# <linux/prctl.h>; production PID 1 needs no prctl(2), the standard library wraps none.
PR_SET_PDEATHSIG = 1  # the host launcher's (eemini.run)
PR_SET_CHILD_SUBREAPER = 36
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int) -> None:
    if _prctl(option, arg2, 0, 0, 0) < 0:
        raise linux.oserror("prctl")


def close_server(server: Server) -> None:
    """Stop listening, drop every connection and remove the socket file, once the loop has
    stopped (a PID 1 never closes its control socket: it powers off)."""
    for conn in list(server.conns):
        conn.close()
    if server.listener is not None:
        server.loop.remove_reader(server.listener.fileno())
        server.listener.close()
        try:
            os.unlink(server.path)
        except OSError:
            pass


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


def default_socket() -> str:
    """Where dev mode puts its socket unless told otherwise (and where `eemini call` looks):
    `$XDG_RUNTIME_DIR/eemini/agent.sock`, else `$TMPDIR/eemini-UID/eemini/agent.sock` (/tmp when
    TMPDIR is unset), whose `eemini-UID` is made private (`private_directory`)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(
        os.environ.get("TMPDIR") or "/tmp", f"eemini-{os.getuid()}"
    )
    return os.path.join(base, "eemini", "agent.sock")


RULE = (
    "the socket's directory holds the token, so it must be yours with mode 0700, and no directory "
    "above it may be writable by anyone but you or root (sticky ones such as /tmp excepted)"
)


def private_directory(directory: str) -> str:
    """Make the directory for the socket and the token (and what is missing above it) with mode
    0700, then check it, and every directory above it, against `RULE`; its real path.

    Someone else who can rename entries in a directory above could swap ours for theirs between
    our check and our use, and read the token or answer in our place; a directory made in advance
    under a predictable name (`/tmp/eemini-UID`) is not ours. Both are refused, naming the
    directory and the problem (PermissionError)."""
    uid = os.getuid()
    missing = []
    path = os.path.abspath(directory)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made by someone else meanwhile: judged below like any other
        os.chmod(path, 0o700)  # whatever the umask
    real = os.path.realpath(directory)
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{real} is not a directory: {RULE}")
    if st.st_uid != uid or st.st_mode & 0o077:
        raise PermissionError(
            f"{real} has owner uid {st.st_uid} and mode {st.st_mode & 0o777:04o} "
            f"(you are uid {uid}): {RULE}"
        )
    above = real
    while above != "/":
        above = os.path.dirname(above)
        st = os.stat(above)
        if st.st_uid not in (uid, 0):
            raise PermissionError(
                f"{above}, above the socket's directory {real}, belongs to uid {st.st_uid} "
                f"(you are uid {uid}): {RULE}"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PermissionError(
                f"{above}, above the socket's directory {real}, has mode "
                f"{st.st_mode & 0o7777:04o}, writable by others: {RULE}"
            )
    return real


@record
class DevOptions:
    socket_path: str
    grace: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    limits: Limits = field(default_factory=Limits)
    dev_root_out: str | None = None
    token: str | None = None


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def run(spec: EnclaveSpec, options: DevOptions) -> int:
    """Run the workload under the runtime until it is done or we are told to stop.

    Returns the workload's exit status when it ended for good under on_exit = poweroff
    (128 + signal number when killed), and 0 after Ctrl-C, SIGTERM or a `shutdown` request.
    """
    from eemini.guest.dev.simulated import SimulatedBackend, dev_root_pem

    requested = os.path.abspath(options.socket_path)
    directory = private_directory(os.path.dirname(requested))
    socket_path = os.path.join(directory, os.path.basename(requested))
    if os.path.lexists(socket_path) and not stat.S_ISSOCK(os.lstat(socket_path).st_mode):
        raise OSError(errno.EEXIST, f"{socket_path} exists and is not a socket")
    if socket_in_use(socket_path):
        # Before touching the token file: it belongs to the runtime already serving there.
        raise OSError(errno.EADDRINUSE, f"another runtime is serving {socket_path}")
    token = options.token or secrets.token_hex(32)
    token_path = os.path.join(directory, TOKEN_FILE)
    _write_private(token_path, token.encode() + b"\n")
    root_pem = dev_root_pem()
    root_paths = [os.path.join(directory, DEV_ROOT_FILE)]
    if options.dev_root_out and os.path.abspath(options.dev_root_out) not in root_paths:
        root_paths.append(os.path.abspath(options.dev_root_out))
    for path in root_paths:
        with open(path, "wb") as f:
            f.write(root_pem)

    backend = SimulatedBackend()
    # The simulated TD has an RTMR3 to extend: dev mode binds its runtime log to the quote as a
    # Linux 6.16+ TD does (docs/measurements.md, "Runtime events").
    measurer = backend.rtmr3_measurer()
    try:
        with open(spec.workload.path, "rb") as f:
            workload: tuple[str, bytes] | None = (spec.workload.path, f.read())
    except OSError:
        workload = None  # the supervisor reports a workload it cannot start
    events = boot_log(measurer.measure, "dev", spec.canonical_json(), workload, sealed_by="dev")

    config = RuntimeConfig(
        spec=spec,
        token=token,
        backend=backend,
        socket_path=socket_path,
        limits=options.limits,
        backoff=options.backoff,
        grace=options.grace,
    )
    runtime = Runtime(
        config, events=events, measurer=measurer, on_poweroff=lambda _: runtime.loop.stop()
    )
    # Orphans of the workload's descendants come to us, as they come to PID 1.
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        name = signal.Signals(signum).name
        runtime.loop.add_signal_handler(signum, lambda n=name: runtime.shutdown(f"{n} received"))  # type: ignore[misc]
    print(
        f"eemini dev: control socket {socket_path}\n"
        f"eemini dev: token in {token_path} (eemini call finds both; workloads get EE_TOKEN "
        f"when inherit_token = true)\n"
        f"eemini dev: development root certificate in {', '.join(root_paths)} "
        f"(trust it only for dev quotes)\n"
        f"eemini dev: simulated attestation; Ctrl-C stops the workload and exits",
        file=sys.stderr,
        flush=True,
    )
    runtime.start()
    try:
        runtime.loop.run()
    finally:
        close_server(runtime.server)
        runtime.loop.close()
        try:
            os.unlink(token_path)
        except OSError:
            pass
    last = runtime.supervisor.runs[-1] if runtime.supervisor.runs else None
    if runtime.poweroff_reason and runtime.poweroff_reason.startswith("workload done") and last:
        if last.signal is not None:
            return 128 + last.signal
        return last.exit_code or 0
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eemini.guest.dev.devmode")
    p.add_argument("--spec-json", required=True, help="resolved spec (canonical JSON)")
    p.add_argument("--socket", required=True)
    p.add_argument("--token")
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--backoff", default="0.25,2,30,10", help="initial,factor,cap,stable_after")
    p.add_argument("--max-line", type=int, default=_DEFAULT_LIMITS.max_line)
    p.add_argument("--max-connections", type=int, default=_DEFAULT_LIMITS.max_connections)
    p.add_argument("--idle-timeout", type=float, default=_DEFAULT_LIMITS.idle_timeout)
    p.add_argument("--request-timeout", type=float, default=_DEFAULT_LIMITS.request_timeout)
    p.add_argument("--auth-timeout", type=float, default=_DEFAULT_LIMITS.auth_timeout)
    p.add_argument("--stall-timeout", type=float, default=_DEFAULT_LIMITS.stall_timeout)
    args = p.parse_args(argv)
    try:
        with open(args.spec_json, "rb") as f:
            spec = loads(f.read())
    except (OSError, SpecError) as e:
        print(f"devmode: {args.spec_json}: {e}", file=sys.stderr)
        return 2
    initial, factor, cap, stable = (float(x) for x in args.backoff.split(","))
    options = DevOptions(
        socket_path=args.socket,
        grace=args.grace,
        backoff=Backoff(initial, factor, cap, stable),
        limits=Limits(
            max_line=args.max_line,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            request_timeout=args.request_timeout,
            auth_timeout=args.auth_timeout,
            stall_timeout=args.stall_timeout,
        ),
        token=args.token,
    )
    return run(spec, options)


if __name__ == "__main__":
    sys.exit(main())
