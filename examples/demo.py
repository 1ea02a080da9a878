"""The second half of `make demo`: boot the built image, attest through the workload, verify.

Usage: python examples/demo.py BUILD_DIR
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eemini import run as launcher

HERE = Path(__file__).resolve().parent
POLICY = HERE / "attest-echo" / "dev-policy.json"
READY = r"\[attest-echo\] attest-echo: listening on port 8080"


def say(text: str) -> None:
    print(text, flush=True)


def ask(port: int, nonce: bytes, timeout: float = 120.0) -> dict[str, object]:
    """Send the nonce through the forwarded port; the forward may need a moment to connect."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(nonce.hex().encode() + b"\n")
                line = s.makefile("rb").readline()
            if line:
                answer: dict[str, object] = json.loads(line)
                return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("demo: no answer from the workload through the forwarded port")
        time.sleep(0.5)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo")
    disk = launcher.find_disk(out)
    port = launcher.free_port()
    log = out / "console.log"
    with tempfile.TemporaryDirectory(prefix="eemini-demo-") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        cfg = launcher.VmConfig(
            disk=disk, forwards=(launcher.Forward(port, 8080),), log=log, qmp=qmp, echo=False
        )
        say(f"‣ booting {disk} (serial console in {log}); under TCG this takes a while")
        with launcher.running(cfg) as vm:
            try:
                vm.wait_for(READY, timeout=600)
            except (TimeoutError, launcher.GuestFailed) as e:
                say(f"demo: the workload did not come up:\n{e}")
                return 1
            booted = time.monotonic() - vm.started
            say(f"‣ the workload is up after {booted:.1f} s; 127.0.0.1:{port} reaches its port 8080")
            nonce = secrets.token_bytes(32)
            expected = hashlib.sha512(nonce).digest()
            answer = ask(port, nonce)
            attest = answer.get("attest")
            if (
                answer.get("ok") is not True
                or not isinstance(attest, dict)
                or attest.get("ok") is not True
            ):
                say(f"demo: the workload answered an error: {json.dumps(answer)[:500]}")
                return 1
            quote = base64.b64decode(str(attest["quote_b64"]))
            quote_path, root_path = out / "quote.bin", out / "dev-root.pem"
            quote_path.write_bytes(quote)
            # The attest answer carries the runtime event log, which the quote's RTMR3 binds.
            attest_path = out / "attest.json"
            attest_path.write_text(json.dumps(attest))
            # The development root a local-dev build writes beside the image (docs/build.md): trusted
            # here explicitly, never by default.
            verify = subprocess.run(
                [
                    sys.executable, "-m", "eemini", "verify", os.fspath(quote_path),
                    "--trust-dev-root", os.fspath(root_path), "--report-data", expected.hex(),
                    "--policy", os.fspath(POLICY), "--runtime-log", os.fspath(attest_path), "--json",
                ],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            result = json.loads(verify.stdout) if verify.stdout.strip().startswith("{") else {}
            say("‣ powering the VM off (ACPI power button)")
            vm.qmp("system_powerdown")
            outcome = vm.wait(120)
        events = attest.get("events") or []
        say("")
        say("EasyEnclave Mini demo")
        say(f"  nonce sent            {nonce.hex()}")
        say(f"  report data (SHA-512) {expected.hex()[:64]}…")
        say(f"  quote                 {len(quote)} bytes, attestation {attest.get('attestation_type')}")
        if result.get("verified") is True:
            say(f"  verified              yes: {', '.join(str(c) for c in result.get('checks', []))}")
            say(f"  trust anchor          {result['trust_anchor']['name']} (production: no)")
            bound = "yes" if result.get("report_data") == expected.hex() else "NO"
            say(f"  report data bound     {bound}")
            say(f"  MRTD                  {str(result.get('mr_td'))[:32]}…")
        else:
            why = result.get("error") or verify.stderr.strip()
            say(f"  verified              NO: {result.get('check')}: {why}")
        kinds = ", ".join(str(e.get("kind")) for e in events if isinstance(e, dict))
        bound = "bound to RTMR3" if "runtime-log" in result.get("checks", []) else "NOT bound"
        say(f"  runtime event log     {kinds} ({bound})")
        say(f"  VM                    {outcome.summary} after {outcome.elapsed:.1f} s")
        ok = result.get("verified") is True and outcome.exit_code == 0
        say("" if ok else "demo: FAILED (see above and " + os.fspath(log) + ")")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
