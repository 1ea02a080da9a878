#!/usr/bin/env bash
# Install what the build, the tests and the demo need on a Debian 12 host (as root), then make .venv.
# Idempotent: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc libc6-dev make
    qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools tpm2-tools
    mtools dosfstools fdisk cpio libarchive-tools binutils zstd xz-utils lz4
    pesign osslsigncode systemd-boot-efi openssl
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "‣ installing Debian packages: ${missing[*]}" >&2
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

stamp=.venv/.installed
if [[ ! -f $stamp || requirements.lock -nt $stamp || pyproject.toml -nt $stamp ]]; then
    echo "‣ preparing .venv (pinned dependencies from requirements.lock)" >&2
    [[ -x .venv/bin/python ]] || /usr/bin/python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-warn-script-location -r requirements.lock
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-warn-script-location --no-deps --no-build-isolation -e .
    touch "$stamp"
fi
