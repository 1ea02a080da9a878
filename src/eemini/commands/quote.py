"""`eemini quote show FILE [--json]`: print every field of a TDX quote."""

from __future__ import annotations

import argparse
import json
import os

from eemini.log import die

HELP = "inspect TDX quotes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="quote_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    show = sub.add_parser("show", help="print every field of a quote", description="print every field")
    show.add_argument("file", metavar="FILE", help="the quote: raw bytes, or hex text")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")


def read_quote_bytes(path: str) -> bytes:
    """A quote file's bytes: raw binary, or hex text (with or without 0x), as peers publish them."""
    try:
        with open(os.fspath(path), "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"cannot read quote {path}: {e.strerror}", exit_code=2)
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if text and len(text) % 2 == 0 and all(c in b"0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text.decode())
    return data


def run(args: argparse.Namespace) -> int:
    from eemini.tdx.describe import describe_quote, quote_to_dict
    from eemini.tdx.errors import QuoteParseError
    from eemini.tdx.quote import parse_quote

    data = read_quote_bytes(args.file)
    try:
        quote = parse_quote(data)
    except QuoteParseError as e:
        die(f"{args.file} is not a TDX quote: {e}", exit_code=2)
    if args.json:
        print(json.dumps(quote_to_dict(quote), indent=2))
    else:
        print(describe_quote(quote), end="")
    return 0
