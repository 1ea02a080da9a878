#!/usr/bin/env bash
# `make demo` (interim, until the image exists): run the demo workload under `eemini dev`, then show
# health, an attestation (simulated TDX quote, verified by `eemini verify` against the development
# root, trusted here on purpose) and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
work=$(mktemp -d -t eemini-demo.XXXXXX)
sock=$work/agent.sock
dev_pid=
cleanup() {
    if [[ -n $dev_pid ]] && kill -0 "$dev_pid" 2>/dev/null; then
        kill -INT "$dev_pid"
        wait "$dev_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

call() { "$PY" -m eemini call "$@" --socket "$sock"; }

echo "‣ starting examples/hello under eemini dev (runtime and workload output prefixed with '|')" >&2
"$PY" -m eemini dev -f examples/hello/enclave.toml --socket "$sock" \
    --dev-root-out "$work/dev-root.pem" 2> >(sed -u 's/^/  | /' >&2) &
dev_pid=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { echo "error: the runtime did not open $sock" >&2; exit 1; }
sleep 1.5

echo "‣ health" >&2
call health

echo "‣ attest: report data = SHA-256 of a fresh nonce" >&2
nonce=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
report_data=$(printf '%s' "$nonce" | sha256sum | cut -d' ' -f1 | xxd -r -p | base64)
call attest "report_data_b64=$report_data" >"$work/attest.json"
"$PY" - "$work/attest.json" "$work/quote.bin" <<'PYEOF'
import base64, json, sys
answer = json.load(open(sys.argv[1]))
open(sys.argv[2], "wb").write(base64.b64decode(answer["quote_b64"]))
print(f"  attestation_type {answer['attestation_type']}, report_data_len {answer['report_data_len']}, "
      f"quote {len(base64.b64decode(answer['quote_b64']))} bytes")
print(f"  runtime event log: {[e['kind'] for e in answer['events']]}")
PYEOF
echo "‣ verify the quote: trusting the development root on purpose, debug TD allowed, no collateral" >&2
echo '{"allow_debug": true, "require_collateral": false}' >"$work/policy.json"
"$PY" -m eemini verify "$work/quote.bin" --trust-dev-root "$work/dev-root.pem" \
    --policy "$work/policy.json" --report-data "$(printf '%s' "$report_data" | base64 -d | od -An -tx1 | tr -d ' \n')" \
    | grep -E '^(verified|trust_anchor.name|attributes.debug|checks|report_data):' | sed 's/^/  /'
echo "‣ the same quote without --trust-dev-root is refused (no default verifier trusts it):" >&2
if "$PY" -m eemini verify "$work/quote.bin" --policy "$work/policy.json" 2>&1 | sed 's/^/  /'; then
    echo "error: the development root was trusted by default" >&2
    exit 1
fi

echo "‣ logs (last 5 lines)" >&2
call logs tail=5 | "$PY" -c 'import json, sys; print("\n".join("  " + l for l in json.load(sys.stdin)["lines"]))'

echo "‣ Ctrl-C equivalent: the runtime stops the workload (SIGTERM) and exits" >&2
kill -INT "$dev_pid"
wait "$dev_pid"
dev_pid=
echo "‣ done" >&2
