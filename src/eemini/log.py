"""Diagnostics for host-side tools: one way to fail, nested timed progress steps on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

_state = {"debug": False, "depth": 0}


class UserError(Exception):
    """An error the user can act on: printed as one sentence (plus a hint), never as a traceback."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


def die(message: str, hint: str | None = None, exit_code: int = 1) -> NoReturn:
    raise UserError(message, hint=hint, exit_code=exit_code)


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def debug_enabled() -> bool:
    return bool(_state["debug"])


def _tty() -> bool:
    return sys.stderr.isatty()


def log_step(text: str) -> None:
    indent = "  " * int(_state["depth"])
    if _tty():
        print(f"{indent}\033[1m‣ {text}\033[0m", file=sys.stderr, flush=True)
    else:
        print(f"{indent}‣ {text}", file=sys.stderr, flush=True)


def log_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def log_warning(text: str) -> None:
    prefix = "\033[33mwarning:\033[0m" if _tty() else "warning:"
    print(f"{prefix} {text}", file=sys.stderr, flush=True)


def log_debug(text: str) -> None:
    if _state["debug"]:
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def complete_step(text: str, done: str | None = None) -> Iterator[None]:
    """Log a progress step, indent nested steps, and report how long it took."""
    log_step(text)
    _state["depth"] = int(_state["depth"]) + 1
    start = time.monotonic()
    try:
        yield
    finally:
        _state["depth"] = int(_state["depth"]) - 1
    elapsed = time.monotonic() - start
    indent = "  " * int(_state["depth"])
    if done is not None:
        print(f"{indent}  {done} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
    elif elapsed >= 1.0 or _state["debug"]:
        print(f"{indent}  done in {elapsed:.1f} s", file=sys.stderr, flush=True)
