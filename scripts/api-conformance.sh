#!/usr/bin/env bash
# The management API checked against its own OpenAPI document by schemathesis (PyPI): every
# status code documented, every body matching its schema, no 5xx, invalid input refused,
# valid input accepted. Starts `otaforge serve` on a free port over SQLite, seeds a product,
# group, device and firmware, runs schemathesis with scripts/schemathesis.toml, stops.
#
# Usage: scripts/api-conformance.sh [OTAFORGE_BINARY]   (default target/debug/otaforge)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${1:-target/debug/otaforge}
VERSION=4.32.5
VENV=target/tools/schemathesis-$VERSION
log() { printf 'api-conformance: %s\n' "$*" >&2; }

[[ -x $BIN ]] || { log "no otaforge binary at $BIN (cargo build -p otaforge)"; exit 1; }
if [[ ! -x $VENV/bin/schemathesis ]]; then
    log "installing schemathesis $VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi

DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN="conformance-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
OTAFORGE_ADMIN_TOKEN=$TOKEN OTAFORGE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" \
    --data-dir "$DATA" --build-workers 0 >"$DATA.log" 2>&1 &
PID=$!
cleanup() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    rm -rf "$DATA" "$DATA.log"
}
trap cleanup EXIT

python3 - "$PORT" "$TOKEN" <<'PY'
import json, sys, time, urllib.request
port, token = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
for _ in range(200):
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=1)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("otaforge serve did not start")

def call(method, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")

product = call("POST", "/api/v1/products", {"name": "conformance"})
group = call("POST", f"/api/v1/products/{product['id']}/groups", {"name": "lab"})
call("POST", f"/api/v1/products/{product['id']}/devices", {"serial": "dev1", "password": "pw-1", "group_id": group["id"]})
call("POST", f"/api/v1/products/{product['id']}/firmware?version=1.0.0", raw=b"\x00" * 1024)
assert (product["id"], group["id"]) == (1, 2), (product, group)
PY

log "schemathesis $VERSION against 127.0.0.1:$PORT"
"$VENV/bin/schemathesis" --config-file scripts/schemathesis.toml run \
    "http://127.0.0.1:$PORT/api/v1/openapi.json" -H "Authorization: Bearer $TOKEN"
