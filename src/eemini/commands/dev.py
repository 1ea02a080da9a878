"""`eemini dev`: run the workload under the guest runtime as an ordinary process."""

from __future__ import annotations

import argparse
from pathlib import Path

from eemini.log import die
from eemini.spec import load_spec

HELP = "run the workload under the guest runtime locally, with simulated attestation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        default=Path("enclave.toml"),
        help="enclave spec (default: %(default)s)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket path (default: per-user runtime dir); its directory, which also holds "
        "the token, must be yours with mode 0700 (made so when missing)",
    )
    parser.add_argument(
        "--dev-root-out", metavar="FILE", help="also write the development root certificate (PEM) here"
    )
    parser.add_argument(
        "--grace", type=float, default=5.0, metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when stopping the workload (default: %(default)s)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from eemini.guest.dev import devmode

    spec = load_spec(args.file)
    options = devmode.DevOptions(
        socket_path=args.socket or devmode.default_socket(),
        grace=args.grace,
        dev_root_out=args.dev_root_out,
    )
    try:
        return devmode.run(spec, options)
    except OSError as e:
        die(e.strerror if e.strerror and not e.filename else str(e))
