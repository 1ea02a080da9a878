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


_HEX = frozenset(b"0123456789abcdefABCDEF")
_TEXT = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r")


def read_quote_bytes(path: str) -> bytes:
    """A quote file's bytes: raw binary, or hex text as peers publish it (with or without 0x, in
    one line or wrapped as `xxd -p` writes it). Text that is not hex is refused, not parsed."""
    try:
        with open(os.fspath(path), "rb") as f:
            data = f.read()
    except OSError as e:
        die(f"cannot read quote {path}: {e.strerror}", exit_code=2)
    if not data or not all(c in _TEXT for c in data):
        return data  # binary (a quote starts with its version, 4 or 5, as a little-endian u16)
    text = b"".join(data.split())
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if text and len(text) % 2 == 0 and all(c in _HEX for c in text):
        return bytes.fromhex(text.decode())
    bad = next((chr(c) for c in text if c not in _HEX), None)
    why = f"it holds {bad!r}" if bad is not None else f"it has an odd number ({len(text)}) of hex digits"
    die(f"{path} is not a quote file: it is text, but not hex ({why})", exit_code=2)


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
