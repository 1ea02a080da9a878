"""`eemini run`: boot an image locally in QEMU (see docs/run.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eemini import run as launcher
from eemini.log import die, log_notice

HELP = "boot an image in QEMU with OVMF: serial console, port forwards, config disk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        type=Path,
        metavar="BUILD_DIR|DISK",
        help="an `eemini build` output directory or a disk image "
        f"(default {launcher.DEFAULT_BUILD_DIR})",
    )
    parser.add_argument(
        "--accel",
        choices=[a.value for a in launcher.Accel],
        default="auto",
        help="kvm only when a probe VM really runs under it; auto falls back to tcg (default auto)",
    )
    parser.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="HOSTPORT:GUESTPORT",
        help="forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (TCP, repeatable)",
    )
    parser.add_argument(
        "--config", type=Path, metavar="agent.env", help="boot config put on a config disk"
    )
    parser.add_argument(
        "--config-format",
        choices=[f.value for f in launcher.ConfigFormat],
        default="iso9660",
        help="filesystem of the config disk (default iso9660)",
    )
    parser.add_argument(
        "--memory", default="1024", metavar="M", help="guest memory in MiB (default 1024)"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="S", help="stop the VM and fail after S seconds"
    )
    parser.add_argument("--log", type=Path, metavar="FILE", help="also write the serial console to FILE")
    parser.add_argument(
        "--restrict",
        action="store_true",
        help="isolate the guest: no traffic beyond the --forward ports (QEMU restrict=on)",
    )
    parser.add_argument(
        "--qmp", type=Path, metavar="SOCKET", help="QMP socket (e.g. for system_powerdown)"
    )
    parser.add_argument(
        "--print-tdx-command",
        action="store_true",
        help="print the QEMU command a TDX host would run for this image, and exit",
    )
    parser.add_argument(
        "--libvirt-xml",
        type=Path,
        metavar="OVERLAY",
        help="print a libvirt TD domain whose disk is OVERLAY (a qcow2 on top of the image), and exit",
    )


def run(args: argparse.Namespace) -> int:
    if not args.memory.isdigit() or int(args.memory) < 128:
        die(f"--memory {args.memory!r} must be a number of MiB, at least 128")
    if args.timeout is not None and args.timeout <= 0:
        die(f"--timeout {args.timeout} must be positive")
    forwards = tuple(launcher.Forward.parse(f) for f in args.forward)
    if len({f.host for f in forwards}) != len(forwards):
        die("--forward uses the same host port twice")
    if args.config is not None and not args.config.is_file():
        die(f"--config {args.config} is not a file")
    disk = launcher.find_disk(args.target)
    cfg = launcher.VmConfig(
        disk=disk,
        accel=launcher.Accel(args.accel),
        forwards=forwards,
        config=args.config,
        config_format=launcher.ConfigFormat(args.config_format),
        memory=args.memory,
        timeout=args.timeout,
        log=args.log,
        qmp=args.qmp,
        restrict=args.restrict,
    )
    if args.print_tdx_command:
        launcher.print_command(launcher.tdx_command(cfg))
        return 0
    if args.libvirt_xml is not None:
        sys.stdout.write(
            launcher.libvirt_xml(disk.stem, disk, args.libvirt_xml, memory_mib=int(args.memory))
        )
        return 0
    if args.config is not None:
        launcher.read_config_file(args.config)
    log_notice(f"booting {disk}" + "".join(f", 127.0.0.1:{f.host} -> guest:{f.guest}" for f in forwards))
    outcome = launcher.boot(cfg)
    log_notice(f"{outcome.summary} after {outcome.elapsed:.1f} s")
    return outcome.exit_code
