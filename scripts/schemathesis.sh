#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis (PyPI):
# starts one embedded-mode instance on a free loopback port in a temporary
# directory, runs schemathesis against /api/openapi.json, and stops the
# instance. Fails on any 5xx and on any response that does not conform to the
# document (status code, content type, headers, body schema).
#
#   bash scripts/schemathesis.sh [--examples N]
#
# The per-client quotas are raised for the run, so that schemathesis reaches
# the logic behind them instead of a 429 (the quotas have their own tests).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

EXAMPLES=100
while [ $# -gt 0 ]; do
    case $1 in
        --examples) EXAMPLES=$2; shift 2 ;;
        *) echo "usage: $0 [--examples N]" >&2; exit 2 ;;
    esac
done

SCHEMATHESIS_VERSION=4.32.5
VENV=target/schemathesis-venv
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "schemathesis: installing $SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet --bin croupier
BIN=target/debug/croupier

WORK=$(mktemp -d)
PID=
# The instance runs in its own session (setsid): its pid is its process group,
# which is stopped whole, with SIGKILL if it has not drained within 15 s.
cleanup() {
    if [ -n "$PID" ]; then
        kill -TERM -- "-$PID" 2>/dev/null || true
        for _ in $(seq 1 150); do
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# scripts/test.sh marks what it starts in the environment, which env -i drops.
MARKER=()
if [ -n "${CROUPIER_TEST_RUN:-}" ]; then MARKER=("CROUPIER_TEST_RUN=$CROUPIER_TEST_RUN"); fi
# Port 0: the kernel picks a free port while binding, so nothing can take it
# between choosing and binding; the instance logs the address it got.
(cd "$WORK" && exec setsid env -i "${MARKER[@]}" PATH="$PATH" HOME="$WORK" BIND=127.0.0.1 PORT=0 DATA_DIR="$WORK/data" \
    ADMIN_TOKEN="$ADMIN_TOKEN" LOG_FORMAT=json RUST_LOG=info \
    AUTH_RATE_LIMIT=1000000 WRITE_RATE_LIMIT=1000000 WRITE_RATE_BURST=1000000 ROOM_CREATE_LIMIT=1000000 \
    "$ROOT/$BIN" serve </dev/null >"$WORK/croupier.log" 2>&1) &
PID=$!

ADDRESS=
for _ in $(seq 1 300); do
    ADDRESS=$(grep -o '"address":"127\.0\.0\.1:[0-9]*"' "$WORK/croupier.log" 2>/dev/null | head -1 | cut -d'"' -f4 || true)
    [ -n "$ADDRESS" ] && break
    if ! kill -0 "$PID" 2>/dev/null; then
        cat "$WORK/croupier.log" >&2
        echo "schemathesis: croupier exited during start-up" >&2
        exit 1
    fi
    sleep 0.1
done
[ -n "$ADDRESS" ] || { cat "$WORK/croupier.log" >&2; echo "schemathesis: croupier did not start" >&2; exit 1; }
echo "schemathesis: croupier on $ADDRESS, $EXAMPLES examples per operation"

"$VENV/bin/schemathesis" run "http://$ADDRESS/api/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --phases examples,coverage,fuzzing \
    --max-examples "$EXAMPLES" \
    --seed 20261203 \
    --header "Authorization: Bearer $ADMIN_TOKEN" \
    --report junit --report-dir target/schemathesis

# The instance must have survived the run.
if ! kill -0 "$PID" 2>/dev/null; then
    cat "$WORK/croupier.log" >&2
    echo "schemathesis: croupier died during the run" >&2
    exit 1
fi
echo "schemathesis: no server errors, every response conforms"
