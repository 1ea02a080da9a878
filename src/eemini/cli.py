"""The `eemini` command: one table of subcommands, one exception boundary."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn, Protocol, cast

from eemini import __version__
from eemini.log import UserError, set_debug


class Command(Protocol):
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# name -> module under eemini.commands. Each module defines HELP, add_arguments() and run().
COMMANDS: dict[str, str] = {
    "dev": "eemini.commands.dev",
    "call": "eemini.commands.call",
    "run": "eemini.commands.run",
    "quote": "eemini.commands.quote",
    "verify": "eemini.commands.verify",
    "collateral": "eemini.commands.collateral",
    "measure": "eemini.commands.measure",
    "build": "eemini.commands.build",
    "lock": "eemini.commands.lock",
    "kernel": "eemini.commands.kernel",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of ours; exit 2 means "usage".
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def load(name: str) -> Command:
    return cast(Command, importlib.import_module(COMMANDS[name]))


def create_parser() -> Parser:
    parser = Parser(prog="eemini", description="EasyEnclave Mini: boot, attest, run.")
    parser.add_argument("--version", action="version", version=f"eemini {__version__}")
    parser.add_argument("--debug", action="store_true", help="show commands run and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        module = load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = create_parser()
    args = parser.parse_args(argv)
    set_debug(args.debug)
    module = cast(Command, args._module)
    try:
        return module.run(args)
    except UserError as e:
        print(f"eemini {args.command}: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        print(f"eemini {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"eemini {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("  hint: rerun with --debug for a traceback, and please report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
