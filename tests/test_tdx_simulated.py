"""The runtime's simulated quotes (eemini.guest.dev.simulated) verify end to end with the development
root, and only with it: rejected by default (untrusted root) and by the default policy (debug TD)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eemini.guest.dev.simulated import dev_root_pem, make_quote
from eemini.tdx.errors import DebugTdRejected, UntrustedRoot
from eemini.tdx.policy import Policy, PolicyBuilder
from eemini.tdx.roots import development_root
from eemini.tdx.verify import verify

AT = 1_780_000_000  # 2026-05-28, inside the development chain's validity
REPORT_DATA = bytes(range(64))
# Simulated TDs are debug TDs without SEPT_VE_DISABLE; without collateral the TCB is not evaluated.
DEV_POLICY = {"allow_debug": True, "require_collateral": False, "require_sept_ve_disable": False}


def test_simulated_quote_verifies_with_the_dev_root() -> None:
    quote = make_quote(REPORT_DATA)
    policy = PolicyBuilder().allow_debug().require_collateral(False).require_sept_ve_disable(False)
    v = verify(quote, None, policy.report_data(REPORT_DATA).build(), AT,
               trusted_roots=[development_root(dev_root_pem())])  # fmt: skip
    assert v.tcb_status == "NotEvaluated"
    assert v.trust_anchor.production is False
    assert v.attributes.debug is True
    assert v.report.report_data == REPORT_DATA
    assert v.quote.header.user_data.startswith(b"EEMINI-SIMULATED")
    assert v.checks[:4] == ("pck-chain", "qe-report-signature", "qe-report-data", "quote-signature")
    assert "report-data" in v.checks


def test_simulated_quote_rejected_by_default() -> None:
    quote = make_quote(REPORT_DATA)
    with pytest.raises(
        UntrustedRoot, match=r"^PCK certificate chain ends at .* which is not a trusted root$"
    ):
        verify(quote, None, Policy(allow_debug=True, require_collateral=False), AT)
    with pytest.raises(
        DebugTdRejected, match=r"^the TD is a debug TD \(TD_ATTRIBUTES 0100001000000000\)"
    ):
        verify(quote, None, Policy(), AT, trusted_roots=[development_root(dev_root_pem())])


def test_simulated_quote_cli(tmp_path: Path) -> None:
    q = tmp_path / "quote.bin"
    q.write_bytes(make_quote(REPORT_DATA))
    root = tmp_path / "dev-root.pem"
    root.write_bytes(dev_root_pem())
    policy = tmp_path / "dev-policy.json"
    policy.write_text(json.dumps(DEV_POLICY))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "eemini", "verify", str(q), "--at", str(AT), *argv],
                              capture_output=True, text=True, check=False)  # fmt: skip

    proc = run()
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "eemini verify: rejected: trusted-root: PCK certificate chain ends at "
    )
    proc = run("--trust-dev-root", str(root))
    assert proc.returncode == 1
    assert proc.stderr.startswith("eemini verify: rejected: debug: the TD is a debug TD")
    proc = run(
        "--trust-dev-root",
        str(root),
        "--policy",
        str(policy),
        "--report-data",
        REPORT_DATA.hex(),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tcb_status"] == "NotEvaluated"
    assert out["report_data"] == REPORT_DATA.hex()
    assert out["trust_anchor"]["production"] is False
