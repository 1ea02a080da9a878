"""`eemini call`: send one request to a runtime's control socket and print the answer."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from eemini.client import DEFAULT_SOCKET, Client, ClientError
from eemini.log import die

HELP = "call a method on the control socket (health, attest, list, logs, restart, shutdown, info)"

# Parameters that are strings on the wire even when they look like numbers.
_STRING_PARAMS = frozenset({"report_data_b64", "nonce", "id"})
_INT = re.compile(r"-?[0-9]+\Z")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", metavar="METHOD")
    parser.add_argument(
        "params", nargs="*", metavar="KEY=VALUE",
        help="request fields; KEY:=JSON passes a JSON value as is",
    )  # fmt: skip
    parser.add_argument(
        "--socket", metavar="PATH", help="socket (default: EE_SOCKET_PATH, dev mode's, the image's)"
    )
    parser.add_argument("--token", help="boot token (default: EE_TOKEN, or dev mode's token file)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        if ":=" in item and item.index(":=") < item.index("=") + 1:
            key, raw = item.split(":=", 1)
            try:
                params[key] = json.loads(raw)
            except ValueError:
                die(f"{item}: the value after := is not JSON")
        elif "=" in item:
            key, value = item.split("=", 1)
            params[key] = int(value) if _INT.match(value) and key not in _STRING_PARAMS else value
        else:
            die(f"{item}: expected KEY=VALUE or KEY:=JSON")
        if not key:
            die(f"{item}: empty key")
    return params


def resolve_socket(arg: str | None) -> str:
    if arg:
        return arg
    if env := os.environ.get("EE_SOCKET_PATH"):
        return env
    from eemini.guest.dev.devmode import default_socket

    dev = default_socket()
    return dev if os.path.exists(dev) else DEFAULT_SOCKET


def resolve_token(arg: str | None, socket_path: str) -> str:
    if arg:
        return arg
    if env := os.environ.get("EE_TOKEN"):
        return env
    from eemini.guest.dev.devmode import TOKEN_FILE

    path = os.path.join(os.path.dirname(socket_path), TOKEN_FILE)
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        die("no token", hint="pass --token, set EE_TOKEN, or run `eemini dev` (it writes a token file)")


def run(args: argparse.Namespace) -> int:
    params = parse_params(args.params)
    path = resolve_socket(args.socket)
    token = resolve_token(args.token, path)
    try:
        with Client(path, token, timeout=args.timeout) as client:
            answer = client.request(args.method, **params)
    except ClientError as e:
        die(str(e))
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    if answer.get("ok") is not True:
        print(
            f"eemini call: {args.method}: {answer.get('error')} ({answer.get('code')})", file=sys.stderr
        )
        return 1
    return 0
