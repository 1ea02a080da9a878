"""`eemini verify QUOTE`: verify a TDX quote (signatures, chain to Intel's root, collateral, policy).

Exit 0 when verified, 1 when rejected (the failed check in one line on stderr), 2 for usage or
parse errors (unreadable or malformed quote, collateral, policy or root), 4 when collateral was
to be fetched and could not be had (the quote was not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eemini.commands.collateral import add_fetch_arguments, fetcher_from_args, unavailable
from eemini.log import die
from eemini.tdx.errors import PolicyError
from eemini.tdx.evidence import load_prediction
from eemini.tdx.measure import MeasureError

if TYPE_CHECKING:
    from eemini.tdx.collateral import Collateral
    from eemini.tdx.errors import VerificationError
    from eemini.tdx.quote import Quote
    from eemini.tdx.roots import TrustAnchor

HELP = "verify a TDX quote against Intel's root, collateral and a policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("quote", metavar="QUOTE", help="the quote file: raw bytes, or hex text")
    parser.add_argument("--collateral", metavar="FILE",
                        help="collateral JSON (dcap-qvl QuoteCollateralV3 layout); without it the TCB "
                        "status is not evaluated")  # fmt: skip
    parser.add_argument("--fetch-collateral", action="store_true",
                        help="without --collateral: fetch it (Intel PCS, or --pccs) through the "
                        "cache (docs/verify.md, \"Fetching collateral\")")  # fmt: skip
    add_fetch_arguments(parser)
    parser.add_argument(
        "--at", metavar="UNIX_TIME", type=int, help="verify as of this time (default: now)"
    )
    parser.add_argument(
        "--report-data", metavar="HEX", help="expected report data (zero-padded to 64 bytes)"
    )
    parser.add_argument("--policy", metavar="FILE", help="policy JSON (see docs/verify.md)")
    parser.add_argument("--mr-td", metavar="HEX", action="append",
                        help="an accepted MRTD (the firmware); repeat for several. Required with "
                        "--manifest unless the policy sets mr_td or allow_any_firmware")  # fmt: skip
    parser.add_argument("--trust-dev-root", metavar="FILE", action="append", default=[],
                        help="also trust this development root CA (PEM); never by default")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    # Measured boot (docs/measurements.md).
    parser.add_argument("--event-log", metavar="FILE",
                        help="the CC event log (/sys/firmware/acpi/tables/data/CCEL): it must replay "
                        "to the quote's RTMRs")  # fmt: skip
    parser.add_argument("--manifest", metavar="FILE",
                        help="manifest.json of the build (or `eemini measure --json` output): its "
                        "predicted events must be in the event log, in order")  # fmt: skip
    parser.add_argument("--vtpm", action="store_true",
                        help="the TD also has a vTPM (GCP): the kernel's PCR 9 events go there, not "
                        "to the CC log")  # fmt: skip
    parser.add_argument("--runtime-log", metavar="FILE",
                        help="the runtime event log as JSON (a list, or an attest/info answer with "
                        "\"events\"): checked against RTMR3")  # fmt: skip
    # Azure (docs/verify.md, "Azure evidence").
    parser.add_argument("--azure", action="store_true",
                        help="QUOTE is Azure vTPM evidence (an azure-tdx-vtpm attest answer, or "
                        "trustee's evidence JSON); --event-log is then the TPM event log and --mr-td "
                        "the accepted paravisor MRTDs")  # fmt: skip
    parser.add_argument("--nonce", metavar="HEX",
                        help="with --azure: the vTPM quote's expected nonce (default: the report "
                        "data, zero-padded to 64 bytes)")  # fmt: skip


def _read(path: str, what: str) -> bytes:
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read()
    except OSError as e:
        die(f"cannot read {what} {path}: {e.strerror}", exit_code=2)


def run(args: argparse.Namespace) -> int:
    # cryptography warns about odd certificates (a country name's length, say): the verdict is
    # ours to give, on one line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _verify(args)


def _verify(args: argparse.Namespace) -> int:
    from eemini.commands.quote import read_quote_bytes
    from eemini.tdx.describe import describe_verified, verified_to_dict
    from eemini.tdx.errors import QuoteError, QuoteParseError, VerificationError
    from eemini.tdx.quote import parse_quote
    from eemini.tdx.verify import verify

    # datetime handles years 1970..9999; anything else is a typo, not a time.
    if args.at is not None and not 0 <= args.at < 253_402_300_800:
        die(f"--at {args.at} is not a Unix time between 1970 and 9999", exit_code=2)
    _check_fetch_options(args)
    if args.azure:
        return _verify_azure(args)
    if args.nonce is not None:
        die("--nonce applies to Azure evidence only (--azure)", exit_code=2)
    _refuse_azure_json(args.quote)
    data = read_quote_bytes(args.quote)
    try:
        quote = parse_quote(data)
    except QuoteParseError as e:
        die(f"{args.quote} is not a TDX quote: {e}", exit_code=2)
    collateral = _collateral(args)
    builder = _policy_builder(args)
    event_log, runtime_events = _measured_boot_inputs(args)
    if args.manifest:
        try:
            prediction = load_prediction(Path(args.manifest))
            builder = builder.expected_events(prediction.cc_events(vtpm=args.vtpm))
        except (MeasureError, PolicyError) as e:
            die(f"{args.manifest}: {e}", exit_code=2)
    policy = builder.build()
    roots = _roots(args)
    now = args.at if args.at is not None else int(time.time())
    if args.fetch_collateral or args.offline:
        collateral = _fetch(args, quote, now, tuple(roots), policy.max_collateral_age)
    try:
        verified = verify(
            quote, collateral, policy, now, trusted_roots=roots,
            event_log=event_log, runtime_events=runtime_events,
        )  # fmt: skip
    except VerificationError as e:
        return _rejected(args, e)
    except QuoteError as e:  # an input that does not parse, found out only while verifying
        die(str(e), exit_code=2)
    if args.json:
        out = verified_to_dict(verified)
        if verified.event_log is not None:
            out["event_log"] = verified.event_log.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(describe_verified(verified), end="")
        if verified.event_log is not None:
            print("\n".join(verified.event_log.lines()))
    return 0


def _rejected(args: argparse.Namespace, e: VerificationError) -> int:
    """Print a rejection (the failed check as JSON on stdout with --json, one line on stderr
    always) and return its exit code."""
    if args.json:
        print(json.dumps({"verified": False, "check": e.check, "error": e.message}, indent=2))
    print(f"eemini verify: rejected: {e.one_line()}", file=sys.stderr)
    return 1


def _check_fetch_options(args: argparse.Namespace) -> None:
    fetching = args.fetch_collateral or args.offline
    if fetching and args.collateral:
        die("--collateral and --fetch-collateral (or --offline) exclude each other", exit_code=2)
    given = [f"--{n.replace('_', '-')}" for n in ("pccs", "pccs_ca", "cache_dir") if getattr(args, n)]
    if given and not fetching:
        die(f"{', '.join(given)} only apply with --fetch-collateral", exit_code=2)


def _fetch(
    args: argparse.Namespace, quote: Quote, now: int, roots: tuple[TrustAnchor, ...], max_age: int | None
) -> Collateral:
    from eemini.tdx.errors import CollateralUnavailable

    fetcher = fetcher_from_args(args, "verify", roots)
    try:
        return fetcher.for_quote(quote, now, max_age=max_age).collateral
    except CollateralUnavailable as e:
        unavailable(e)


def _collateral(args: argparse.Namespace) -> Any:
    from eemini.tdx.collateral import parse_collateral
    from eemini.tdx.errors import CollateralParseError

    if not args.collateral:
        return None
    try:
        return parse_collateral(_read(args.collateral, "collateral"))
    except CollateralParseError as e:
        die(f"{args.collateral}: {e}", exit_code=2)


def _policy_builder(args: argparse.Namespace) -> Any:
    """The policy file's settings plus --report-data and --mr-td (not yet built: callers add the
    expected events)."""
    from eemini.tdx.guard import parsing
    from eemini.tdx.policy import PolicyBuilder, policy_builder_from_json

    try:
        with parsing(PolicyError, "policy does not parse"):
            builder = (
                policy_builder_from_json(_read(args.policy, "policy"))
                if args.policy
                else PolicyBuilder()
            )
            if args.report_data is not None:
                builder = builder.report_data(args.report_data)
            if args.mr_td:
                builder = builder.accepted_mr_td(args.mr_td)
            builder.build()
    except PolicyError as e:
        where = f"{args.policy}: " if args.policy else ""
        hint = None
        if "may only be set once" in str(e):
            hint = "--report-data and --mr-td exclude a policy file's report_data and mr_td"
        die(f"{where}{e}", hint=hint, exit_code=2)
    return builder


def _roots(args: argparse.Namespace) -> list[Any]:
    from eemini.tdx.errors import CertificateParseError
    from eemini.tdx.roots import INTEL_ROOT, development_root

    roots = [INTEL_ROOT]
    for path in args.trust_dev_root:
        try:
            roots.append(development_root(_read(path, "development root")))
        except CertificateParseError as e:
            die(f"{path}: {e.message}", exit_code=2)
    return roots


def _refuse_azure_json(path: str) -> None:
    """Azure evidence given without --azure: say so, rather than "not a quote file"."""
    from eemini.tdx.azure.evidence import is_azure_evidence

    data = _read(path, "quote")
    if not data.lstrip().startswith(b"{"):
        return
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return
    if is_azure_evidence(doc):
        die(
            f"{path} is Azure vTPM evidence, not a TDX quote",
            hint='verify it with --azure (docs/verify.md, "Azure evidence")',
            exit_code=2,
        )


def _verify_azure(args: argparse.Namespace) -> int:
    from eemini.tdx.azure.describe import azure_to_dict, describe_azure
    from eemini.tdx.azure.errors import AzureEvidenceError
    from eemini.tdx.azure.evidence import parse_azure_evidence
    from eemini.tdx.azure.verify import azure_policy, verify_azure
    from eemini.tdx.errors import QuoteError, QuoteParseError, VerificationError

    if args.vtpm:
        die(
            "--vtpm is for TDX quotes with a vTPM beside them (GCP); Azure evidence is all vTPM",
            exit_code=2,
        )
    try:
        evidence = parse_azure_evidence(_read(args.quote, "evidence"))
    except AzureEvidenceError as e:
        die(f"{args.quote} is not Azure vTPM evidence: {e}", exit_code=2)
    nonce = None
    if args.nonce is not None:
        try:
            nonce = bytes.fromhex(args.nonce.removeprefix("0x"))
        except ValueError:
            die(f"--nonce {args.nonce!r} is not hex", exit_code=2)
    collateral = _collateral(args)
    builder = _policy_builder(args)
    if args.fetch_collateral or args.offline:
        from eemini.tdx.errors import QuoteParseError as ParseError
        from eemini.tdx.quote import parse_quote

        try:
            td_quote = parse_quote(evidence.td_quote)
        except ParseError as e:
            die(f"{args.quote}: the TD quote does not parse: {e}", exit_code=2)
        now = args.at if args.at is not None else int(time.time())
        max_age = builder.build().max_collateral_age
        collateral = _fetch(args, td_quote, now, tuple(_roots(args)), max_age)
    event_log = _read(args.event_log, "TPM event log") if args.event_log else None
    runtime_events = _measured_boot_inputs(args)[1]
    try:
        if args.manifest:
            try:
                prediction = load_prediction(Path(args.manifest))
            except MeasureError as e:
                die(f"{args.manifest}: {e}", exit_code=2)
            # Every predicted event reaches the TPM log (docs/measurements.md).
            builder = builder.expected_events(prediction.events)
        policy = azure_policy(
            builder.build(),
            nonce=nonce,
            relax_sept_ve_disable=not builder.has("require_sept_ve_disable"),
        )
    except PolicyError as e:
        die(str(e), exit_code=2)
    now = args.at if args.at is not None else int(time.time())
    try:
        verified = verify_azure(
            evidence, collateral, policy, now, trusted_roots=_roots(args),
            event_log=event_log, runtime_events=runtime_events,
        )  # fmt: skip
    except VerificationError as e:
        return _rejected(args, e)
    except QuoteParseError as e:
        die(f"{args.quote}: the TD quote does not parse: {e}", exit_code=2)
    except QuoteError as e:  # evidence that does not parse, found out only while verifying
        die(f"{args.quote}: {e}", exit_code=2)
    if args.json:
        print(json.dumps(azure_to_dict(verified), indent=2))
    else:
        print(describe_azure(verified), end="")
    return 0


def _measured_boot_inputs(
    args: argparse.Namespace,
) -> tuple[bytes | None, list[dict[str, object]] | None]:
    from eemini.tdx.eventlog import EventLogError, parse_event_log

    event_log = None
    if args.event_log:
        event_log = _read(args.event_log, "event log")
        try:
            parse_event_log(event_log)
        except EventLogError as e:
            die(f"{args.event_log} is not a CC event log: {e}", exit_code=2)
    runtime_events = None
    if args.runtime_log:
        try:
            doc = json.loads(_read(args.runtime_log, "runtime log"))
        except ValueError as e:
            die(f"{args.runtime_log} is not JSON: {e}", exit_code=2)
        if isinstance(doc, dict):
            doc = doc.get("events")
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
            die(f"{args.runtime_log} holds no list of runtime events", exit_code=2)
        runtime_events = doc
    return event_log, runtime_events
