"""`eemini collateral fetch`: the collateral a quote (or a platform) needs, as QuoteCollateralV3 JSON.

Exit 0 with the JSON on stdout (or in --out); 2 for usage and unreadable inputs; 4 when the
collateral cannot be had (an endpoint failed or served what does not verify, or --offline and
the cache lacks an item), with one line naming the endpoint and the HTTP status.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from eemini.log import die

if TYPE_CHECKING:
    from eemini.tdx.pcs import CollateralFetcher
    from eemini.tdx.roots import TrustAnchor

HELP = "fetch TDX collateral from Intel PCS or a PCCS, through the cache"
EXIT_UNAVAILABLE = 4


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where collateral comes from (shared with `eemini verify`)."""
    parser.add_argument(
        "--pccs", metavar="URL", help="fetch from this PCCS (https://host:port), not Intel's PCS"
    )
    parser.add_argument(
        "--pccs-ca",
        metavar="FILE",
        help="trust only this certificate (PEM: the PCCS's own, or its CA) for the service's TLS, "
        "not the system's trust store",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="use the cache only; fail, naming what is missing, rather than fetch",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the collateral cache (default: $EEMINI_COLLATERAL_CACHE, else "
        "$XDG_CACHE_HOME/eemini/collateral, else ~/.cache/eemini/collateral)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="collateral_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True
    fetch = sub.add_parser(
        "fetch",
        help="fetch the collateral a quote needs",
        description="Fetch TCB info, QE identity, PCK CRL and root CA CRL for a quote's platform "
        "(or for --fmspc and --ca), verify each item, cache it, and print dcap-qvl's "
        "QuoteCollateralV3 JSON.",
    )
    fetch.add_argument("quote", metavar="QUOTE", nargs="?", help="the quote: raw bytes, or hex text")
    fetch.add_argument(
        "--fmspc", metavar="HEX", help="the platform's FMSPC (12 hex digits), without a quote"
    )
    fetch.add_argument("--ca", choices=("platform", "processor"), help="the PCK CA, with --fmspc")
    fetch.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    fetch.add_argument(
        "--at",
        metavar="UNIX_TIME",
        type=int,
        help="judge whether cached items are current as of this time (default: now)",
    )
    fetch.add_argument("--max-age", metavar="AGE",
                       help="refresh cached items issued longer ago than this (seconds, or 7d, 12h, "
                       "30m); as the policy key max_collateral_age")  # fmt: skip
    add_fetch_arguments(fetch)


def fetcher_from_args(
    args: argparse.Namespace, command: str, roots: tuple[TrustAnchor, ...] | None = None
) -> CollateralFetcher:
    from eemini.tdx.errors import CollateralUnavailable
    from eemini.tdx.pcs import CollateralFetcher, HttpsClient, Source
    from eemini.tdx.roots import INTEL_ROOT

    def say(text: str) -> None:
        print(f"eemini {command}: {text}", file=sys.stderr, flush=True)

    if args.pccs_ca is not None and not os.path.isfile(args.pccs_ca):
        die(f"--pccs-ca {args.pccs_ca}: no such file", exit_code=2)
    try:
        source = (
            Source.pccs(args.pccs, ca_file=args.pccs_ca)
            if args.pccs
            else Source.pcs(ca_file=args.pccs_ca)
        )
    except CollateralUnavailable as e:
        die(f"--pccs: {e}", exit_code=2)
    return CollateralFetcher(
        source,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        offline=args.offline,
        trusted_roots=roots or (INTEL_ROOT,),
        client=HttpsClient(ca_file=args.pccs_ca, progress=say),
        warn=lambda text: say(f"warning: {text}"),
    )


def unavailable(e: Exception) -> NoReturn:
    die(f"cannot get collateral: {e}", exit_code=EXIT_UNAVAILABLE)


def run(args: argparse.Namespace) -> int:
    from eemini.commands.quote import read_quote_bytes
    from eemini.tdx.errors import CollateralUnavailable, PolicyError, QuoteParseError
    from eemini.tdx.pcs.service import FMSPC_RE
    from eemini.tdx.policy import PolicyBuilder
    from eemini.tdx.quote import parse_quote

    if (args.quote is None) == (args.fmspc is None):
        die("give a QUOTE, or --fmspc and --ca", exit_code=2)
    if (args.fmspc is None) != (args.ca is None):
        die("--fmspc and --ca go together", exit_code=2)
    if args.fmspc is not None and not FMSPC_RE.fullmatch(args.fmspc):
        die(f"--fmspc {args.fmspc!r} is not 12 hex digits", exit_code=2)
    if args.at is not None and not 0 <= args.at < 253_402_300_800:
        die(f"--at {args.at} is not a Unix time between 1970 and 9999", exit_code=2)
    max_age = None
    if args.max_age is not None:
        try:
            max_age = (
                PolicyBuilder().max_collateral_age(_number(args.max_age)).build().max_collateral_age
            )
        except PolicyError as e:
            die(f"--max-age: {e}", exit_code=2)
    fetcher = fetcher_from_args(args, "collateral")
    now = args.at if args.at is not None else int(time.time())
    try:
        if args.quote is not None:
            try:
                quote = parse_quote(read_quote_bytes(args.quote))
            except QuoteParseError as e:
                die(f"{args.quote} is not a TDX quote: {e}", exit_code=2)
            fetched = fetcher.for_quote(quote, now, max_age=max_age)
        else:
            fetched = fetcher.for_platform(bytes.fromhex(args.fmspc), args.ca, now, max_age=max_age)
    except CollateralUnavailable as e:
        unavailable(e)
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    for item in fetched.items:
        if not item.usable(when):
            print(f"eemini collateral: warning: {item.served.item} is valid from "
                  f"{item.issued.isoformat()} until {item.next_update.isoformat()}, not at "
                  f"{when.isoformat()}", file=sys.stderr)  # fmt: skip
    text = fetched.to_json()
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as e:
            die(f"cannot write {args.out}: {e.strerror}", exit_code=2)
    else:
        sys.stdout.write(text)
    return 0


def _number(text: str) -> int | str:
    return int(text) if text.isdigit() else text
