"""`eemini verify` and `eemini quote show` as a user runs them: exit codes, one-line rejections, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import shared_testdata
from tdx_builder import NOW, build_quote, make_chain


def _eemini(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eemini", *argv], capture_output=True, text=True, check=False
    )


def test_verify_real_quote_with_collateral() -> None:
    d = shared_testdata("quotes")
    q = d / "dcap-qvl__tdx_quote.bin"
    proc = _eemini("verify", str(q), "--collateral", str(d / "dcap-qvl__tdx_quote.collateral.json"),
                   "--at", "1752919234", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verified"] is True
    assert out["tcb_status"] == "UpToDate"
    assert out["fmspc"] == "B0C06F000000"
    assert out["trust_anchor"]["sha256"] == (
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )


def test_verify_rejection_is_one_line_exit_1() -> None:
    d = shared_testdata("quotes")
    proc = _eemini("verify", str(d / "trustee__tdx_quote_6.bin"), "--collateral",
                   str(d / "trustee__tdx_quote_6.collateral.json"), "--at", "1764162436")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "eemini verify: rejected: tcb-status: TCB status is OutOfDate (advisories: none); "
        "accepted: UpToDate; the platform matches the TCB level of 2018-01-04T00:00:00Z, the "
        "latest is of 2024-03-13T00:00:00Z; below the latest: PCE SVN 11 < 13\n"
    )


def test_verify_policy_file_and_report_data(tmp_path: Path) -> None:
    d = shared_testdata("quotes")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"accepted_tcb_statuses": ["UpToDate", "OutOfDate"]}))
    base = ["verify", str(d / "trustee__tdx_quote_6.bin"), "--collateral",
            str(d / "trustee__tdx_quote_6.collateral.json"), "--at", "1764162436",
            "--policy", str(policy)]  # fmt: skip
    proc = _eemini(*base)
    assert proc.returncode == 0, proc.stderr
    assert "tcb_status: OutOfDate\n" in proc.stdout
    proc = _eemini(*base, "--report-data", "00")
    assert proc.returncode == 1
    assert proc.stderr.startswith("eemini verify: rejected: report-data: report data is ")
    assert proc.stderr.count("\n") == 1


def test_verify_usage_and_parse_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x04\x00\x02\x00" + b"\0" * 20)
    proc = _eemini("verify", str(bad))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"eemini verify: error: {bad} is not a TDX quote: header at offset 0: expected 48 bytes, "
        "found 24 (quote truncated)\n"
    )
    assert _eemini("verify", str(tmp_path / "missing.bin")).returncode == 2
    proc = _eemini("verify", str(bad), "--at", "99999999999999")
    assert (proc.returncode, proc.stderr) == (
        2,
        "eemini verify: error: --at 99999999999999 is not a Unix time between 1970 and 9999\n",
    )
    assert _eemini("verify").returncode == 2
    chain = make_chain()
    q = tmp_path / "q.bin"
    q.write_bytes(build_quote(chain))
    policy = tmp_path / "p.json"
    policy.write_text('{"allow_debugg": true}')
    proc = _eemini("verify", str(q), "--policy", str(policy))
    assert proc.returncode == 2
    assert "unknown policy key 'allow_debugg'" in proc.stderr


def test_verify_dev_root_explicitly_trusted(tmp_path: Path) -> None:
    chain = make_chain()
    q = tmp_path / "q.bin"
    q.write_bytes(build_quote(chain, td_attributes=bytes.fromhex("0100001000000000")))
    root = tmp_path / "dev-root.pem"
    root.write_bytes(chain.root_pem)
    policy = tmp_path / "dev.json"
    policy.write_text('{"allow_debug": true, "require_collateral": false}')
    at = str(NOW)
    proc = _eemini("verify", str(q), "--at", at)
    assert proc.returncode == 1
    assert (
        "rejected: trusted-root: PCK certificate chain ends at 'EasyEnclave Mini development root'"
        in (proc.stderr)
    )
    proc = _eemini("verify", str(q), "--at", at, "--trust-dev-root", str(root))
    assert proc.returncode == 1
    assert "rejected: debug: the TD is a debug TD" in proc.stderr
    proc = _eemini("verify", str(q), "--at", at, "--trust-dev-root", str(root), "--policy", str(policy),
                   "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tcb_status"] == "NotEvaluated"
    assert out["trust_anchor"]["production"] is False


def test_quote_show_text_and_json(tmp_path: Path) -> None:
    chain = make_chain()
    q = tmp_path / "q.hex"
    q.write_text("0x" + build_quote(chain, version=5).hex() + "\n")
    proc = _eemini("quote", "show", str(q), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["header"]["version"] == 5
    assert out["body_type"] == "TD_REPORT_15"
    assert out["td_report"]["mr_td"] == "7d" * 48
    assert out["td_report"]["mr_servicetd"] == "00" * 48
    assert out["td_report"]["td_attributes_flags"]["names"] == ["SEPT_VE_DISABLE"]
    proc = _eemini("quote", "show", str(q))
    assert proc.returncode == 0
    assert f"td_report.rtmr3: {'13' * 48}\n" in proc.stdout
    assert "signature_data.qe_report.isv_svn: 4\n" in proc.stdout
    q.write_bytes(b"\0" * 10)
    proc = _eemini("quote", "show", str(q))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1


def test_quote_files_as_peers_write_them(tmp_path: Path) -> None:
    raw = build_quote(make_chain(), version=4)
    q = tmp_path / "q.txt"
    hexed = raw.hex()
    # `xxd -p` wraps at 60 digits; some peers add 0x, CRLF or indentation.
    for text in (
        "\n".join(hexed[i : i + 60] for i in range(0, len(hexed), 60)) + "\n",
        "0x" + hexed.upper() + "\r\n",
        "  " + " ".join(hexed[i : i + 8] for i in range(0, len(hexed), 8)) + "\n",
    ):
        q.write_text(text)
        proc = _eemini("quote", "show", str(q), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["length"] == len(raw)
    for text, why in (
        ("-----BEGIN CERTIFICATE-----\nMIIB\n", "it holds '-'"),
        (hexed[:-1], f"it has an odd number ({len(hexed) - 1}) of hex digits"),
        ('{"quote": "' + hexed + '"}', "it holds '{'"),
    ):
        q.write_text(text)
        proc = _eemini("quote", "show", str(q))
        assert (proc.returncode, proc.stderr) == (
            2, f"eemini quote: error: {q} is not a quote file: it is text, but not hex ({why})\n"
        )  # fmt: skip
