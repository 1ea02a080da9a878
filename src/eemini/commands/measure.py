"""`eemini measure`: the measurement events a built UKI causes at boot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eemini.log import die, log_notice
from eemini.tdx.measure import MeasureError, Prediction, describe, predict

HELP = "predict the firmware, systemd-stub and kernel measurement events of a built UKI"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="BUILD_DIR|UKI", type=Path, help="a build directory or a UKI file"
    )
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument(
        "--check-log",
        metavar="FILE",
        type=Path,
        help="also check that this event log holds exactly the predicted events, in order, and "
        "otherwise only firmware events that load no code: a CC event log (CCEL data), or with "
        "--tpm a TPM log (binary_bios_measurements)",
    )
    parser.add_argument(
        "--tpm", action="store_true", help="--check-log is a TPM log: registers are PCRs"
    )


def find_uki(path: Path) -> Path:
    """The UKI itself, or the one UKI (*.efi) in a build directory."""
    if not path.exists():
        die(f"{path} does not exist")
    if path.is_file():
        return path
    ukis = sorted(p for p in path.rglob("*.efi") if p.is_file())
    # A disk's ESP copy (EFI/BOOT/BOOTX64.EFI) lives inside disk images, not beside the UKI, but
    # a staged ESP tree may be: prefer files outside EFI/ directories.
    top = [p for p in ukis if "EFI" not in p.relative_to(path).parts]
    ukis = top or ukis
    if not ukis:
        die(f"no UKI (*.efi) in {path}", hint="run `eemini build` first, or pass the UKI file itself")
    if len(ukis) > 1:
        die(f"{len(ukis)} UKIs in {path}: {', '.join(str(p.relative_to(path)) for p in ukis)}",
            hint="pass the UKI file itself")  # fmt: skip
    return ukis[0]


def run(args: argparse.Namespace) -> int:
    uki = find_uki(args.path)
    try:
        prediction = predict(uki.read_bytes())
    except MeasureError as e:
        die(f"{uki}: {e}")
    if args.json:
        json.dump({"uki": str(uki), **prediction.to_json()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"UKI {uki}")
        for line in describe(prediction):
            print(line)
    if args.check_log is not None:
        check_log(prediction, args.check_log, tpm=args.tpm)
    return 0


def check_log(prediction: Prediction, path: Path, *, tpm: bool) -> None:
    """Apply the exact-set rule (eemini.tdx.bootevents) to a log: one line per predicted event on
    stderr, or fail naming the first unexpected or missing event."""
    from eemini.tdx.bootevents import EventsMissing, UnexpectedEvent, check_boot_events, register_name
    from eemini.tdx.eventlog import EventLogError, HashAlg, parse_event_log

    try:
        log = parse_event_log(path.read_bytes())
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    except EventLogError as e:
        die(f"{path} is not an event log: {e}")
    # A TPM log without a SHA-384 bank (Azure's vTPM has SHA-1 and SHA-256) is matched in SHA-256.
    alg = HashAlg.SHA384
    if tpm and HashAlg.SHA384 not in dict(log.spec_id.algorithms):
        alg = HashAlg.SHA256
    try:
        seen = check_boot_events(log, prediction.events, cc=not tpm, alg=alg)
    except (EventsMissing, UnexpectedEvent) as e:
        die(f"{path}: {e}")
    for predicted, event in seen.matched:
        where = register_name(event.register, cc=not tpm)
        log_notice(f"found {predicted.label()}: event {event.number} ({where} {event.describe()})")
    log_notice(
        f"{path}: exactly the {len(seen.matched)} predicted events, in order, and "
        f"{len(seen.allowed)} allowlisted firmware events that load no code"
    )
