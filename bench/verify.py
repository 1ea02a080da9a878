"""Quote verifications per second over the real corpus with collateral: ours next to dcap-qvl's.

Each quote is verified at its collateral's `verify_at` with the default policy (accepted and rejected
quotes alike; a rejection is a complete verification too). Figures are the best of several passes,
interleaved so that both verifiers see the same machine load:

  dcap-qvl          dcap_qvl.verify (Rust), collateral decoded from JSON each time
  ours, no cache    eemini.tdx.verify with nothing cached: every signature checked every time
  ours, first pass  one fresh VerificationCache per pass over the corpus: certificates and
                    collateral shared by several quotes are verified once per pass
  ours, cached      the cache already warm (a fleet verifier seeing the same platforms again)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata" / "quotes"
PASSES = 15


def main() -> None:
    if not (CORPUS / "expected.json").is_file():
        print(f"skipped: the quote corpus is not present at {CORPUS}")
        return
    import dcap_qvl

    from eemini.tdx.collateral import parse_collateral
    from eemini.tdx.errors import VerificationError
    from eemini.tdx.policy import Policy
    from eemini.tdx.verify import VerificationCache, verify

    items = []
    for e in json.loads((CORPUS / "expected.json").read_text()):
        if e.get("collateral_file"):
            items.append(
                (
                    (CORPUS / e["file"]).read_bytes(),
                    (CORPUS / e["collateral_file"]).read_text(),
                    e["verify_at"],
                )
            )
    policy = Policy()

    def ours(cache: VerificationCache | None) -> None:
        for quote, collateral, at in items:
            try:
                verify(quote, parse_collateral(collateral), policy, at, cache=cache)
            except VerificationError:
                pass

    def theirs() -> None:
        for quote, collateral, at in items:
            try:
                dcap_qvl.verify(quote, dcap_qvl.QuoteCollateralV3.from_json(collateral), at)
            except ValueError:
                pass

    warm = VerificationCache()
    ours(warm)
    runs: dict[str, Callable[[], None]] = {
        "dcap-qvl 0.7.0": theirs,
        "ours, no cache": lambda: ours(None),
        "ours, first pass (cold cache)": lambda: ours(VerificationCache()),
        "ours, cached (warm cache)": lambda: ours(warm),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(PASSES):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"corpus: {len(items)} quotes with collateral, best of {PASSES} passes")
    reference = len(items) / best["dcap-qvl 0.7.0"]
    for name, seconds in best.items():
        rate = len(items) / seconds
        print(f"{name:32s} {rate:9.0f} quotes/s  {seconds / len(items) * 1e3:7.3f} ms/quote  "
              f"{rate / reference:5.2f}x dcap-qvl")  # fmt: skip


if __name__ == "__main__":
    main()
