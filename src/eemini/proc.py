"""The one way host-side code runs external commands."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from eemini.log import debug_enabled, die


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
    }
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    if extra:
        env.update(extra)
    return env


def find_tool(name: str, why: str, package: str | None = None) -> str:
    """Find a program on PATH, or fail saying why it is needed and where it comes from."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        hint = f"install the Debian package {package!r}" if package else None
        die(f"{name}, needed {why}, is not installed", hint=hint)
    return path


def describe_failure(argv: Sequence[str | os.PathLike[str]], returncode: int) -> str:
    cmd = os.fspath(argv[0])
    if returncode == 127:
        return f"{cmd} not found"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{cmd} was killed by {name}"
    return f"{cmd} failed with exit status {returncode}"


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    capture: bool = False,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command (argv list, stdin closed unless input is given, minimal environment).

    With `check`, a failure becomes a UserError that names the command and what happened,
    including its stderr when it was captured.
    """
    args = [os.fspath(a) for a in argv]
    if debug_enabled():
        print("+ " + shlex.join(args), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL if input is None else None,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=minimal_env(env),
            cwd=os.fspath(cwd) if cwd is not None else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        die(f"{args[0]} not found", hint="is the package that provides it installed?")
    except subprocess.TimeoutExpired:
        die(f"{shlex.join(args)} did not finish within {timeout} s")
    if check and proc.returncode != 0:
        detail = ""
        if capture and proc.stderr:
            detail = ": " + proc.stderr.decode(errors="replace").strip().splitlines()[-1]
        die(
            describe_failure(args, proc.returncode) + detail, hint=f"the command was: {shlex.join(args)}"
        )
    return proc


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
