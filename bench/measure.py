"""Measurement prediction and event-log replay: how long they take on realistic inputs."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

from eemini.build.uki import assemble
from eemini.tdx.ccel import replay_rtmrs
from eemini.tdx.eventlog import parse_event_log
from eemini.tdx.measure import predict
from eemini.tdx.pe import DigestAlgorithm, authenticode_digest, parse_pe

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")  # Debian systemd-boot-efi
GCP_LOG = Path(__file__).resolve().parents[2] / "shared/testdata/ccel/gcp-cos-113__ccel_data.dat"


def _best(fn: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    if not STUB.is_file():
        print(f"skipped: {STUB} missing (Debian package systemd-boot-efi)")
        return
    stub = STUB.read_bytes()
    # Bookworm's stub carries symbols after its last section, which the UKI writer refuses: cut them.
    stub = stub[: max(s.pointer_to_raw_data + s.size_of_raw_data for s in parse_pe(stub).sections)]
    # A UKI shaped like the demo image's: the stub as a stand-in kernel padded to 12 MiB, 4 MiB initrd.
    kernel = stub + os.urandom(12 * 2**20 - len(stub))
    initrd = os.urandom(4 * 2**20)
    uki = assemble(stub, {".osrel": b"ID=bench\n", ".cmdline": b"console=ttyS0", ".initrd": initrd,
                          ".linux": kernel})  # fmt: skip
    mib = len(uki) / 2**20
    for alg in DigestAlgorithm:
        t = _best(functools.partial(authenticode_digest, uki, alg))
        print(
            f"Authenticode {alg.value} of a {mib:.1f} MiB UKI: {t * 1000:.0f} ms ({mib / t:.0f} MiB/s)"
        )
    t = _best(lambda: predict(uki))
    events = len(predict(uki).events)
    print(f"predict(): {events} events from a {mib:.1f} MiB UKI in {t * 1000:.0f} ms")
    if GCP_LOG.is_file():
        data = GCP_LOG.read_bytes()
        t = _best(lambda: replay_rtmrs(parse_event_log(data)), runs=20)
        print(f"parse + replay of the GCP CC event log (43 events, 256 KiB area): {t * 1e6:.0f} us")
