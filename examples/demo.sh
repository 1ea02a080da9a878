#!/usr/bin/env bash
# `make demo`: build the attest-echo workload and the local-dev image, boot it in QEMU, send a fresh
# nonce through a forwarded port, verify the quote it answers with, and power the VM off cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=build/demo

echo "‣ compiling the workload (examples/attest-echo/attest-echo.c, static)" >&2
mkdir -p examples/attest-echo/build
gcc -static -O2 -Wall -Wextra -o examples/attest-echo/build/attest-echo examples/attest-echo/attest-echo.c

echo "‣ building the local-dev image into $OUT" >&2
"$PY" -m eemini build -f examples/attest-echo/enclave.toml --profile local-dev --out "$OUT"

exec "$PY" examples/demo.py "$OUT"
