#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian 12 machine that has only the
# Rust toolchain: installs the servers the tests start for themselves
# (PostgreSQL, Redis, Nginx, Prometheus, Chromium — each test starts its own on free
# loopback ports in temporary directories and stops it), validates the
# deployment files, fuzzes the HTTP API with schemathesis, runs the quick
# benchmark, then runs every Rust test. It ends by checking that no process it
# started is still running (it fails, listing and killing them, if one is).
set -euo pipefail

# One build, never rebuilt: incremental state would only double the disk use.
export CARGO_INCREMENTAL=0

# Every process this run starts inherits this marker (the scripts that clear
# the environment pass it on), so that the end of the run can find any server
# a test or script failed to stop.
CROUPIER_TEST_RUN="test-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export CROUPIER_TEST_RUN

# The pids of processes, other than this script, whose environment carries the
# marker (or a longer one that starts with it, as tests/cluster_script.rs
# makes). The scan runs in a shell without it, so that it does not find itself
# or its pipeline, and skips the subshell that runs it. (A PostgreSQL backend
# overwrites its environment with its process title, but it dies with its
# postmaster, which keeps it.)
# shellcheck disable=SC2016 # expanded by the inner shell
marked_pids() {
    env -u CROUPIER_TEST_RUN MARK="CROUPIER_TEST_RUN=$CROUPIER_TEST_RUN" SELF=$$ bash -c '
        grep -lz "^$MARK" /proc/[0-9]*/environ 2>/dev/null \
            | sed -n "s|^/proc/\([0-9]*\)/environ\$|\1|p" | grep -vx -e "$SELF" -e "$PPID" || true'
}

# Runs on every exit, also after a failure or Ctrl-C: lists and kills what is
# left, and fails the run if anything was.
leak_check() {
    local status=$? pids
    trap - EXIT
    trap '' INT TERM
    # Servers being stopped right now get a moment to finish exiting.
    for _ in $(seq 1 50); do
        pids=$(marked_pids)
        [ -z "$pids" ] && break
        sleep 0.1
    done
    if [ -n "$pids" ]; then
        echo "test: processes of this run still running (now killed):" >&2
        # shellcheck disable=SC2086 # one pid per word
        ps -o pid,ppid,pgid,etime,args -p "$(echo $pids | tr ' ' ',')" >&2 || true
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        sleep 2
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        [ "$status" -ne 0 ] || status=1
    else
        echo "test: no process of this run is left running"
    fi
    exit "$status"
}
trap leak_check EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# shellcheck source-path=SCRIPTDIR source=lib/packages.sh
source scripts/lib/packages.sh
ensure_packages test \
    postgresql='/usr/lib/postgresql/*/bin/initdb' \
    redis-server=/usr/bin/redis-server \
    nginx=/usr/sbin/nginx \
    prometheus=/usr/bin/prometheus \
    openssl=/usr/bin/openssl \
    chromium=/usr/bin/chromium

# The admin page's browser test (tests/admin_page.rs) drives Chromium from
# Node.js with playwright-core, which needs Node.js 20 or newer (Debian 12's
# own nodejs is 18). Say so now rather than after the build.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null \
    || ! command -v npm >/dev/null; then
    echo "test: Node.js >= 20 with npm is required (tests/admin_page.rs)" >&2
    exit 1
fi

bash scripts/check-deploy.sh

# The HTTP API fuzzed from its own OpenAPI document by schemathesis (PyPI, in
# a virtualenv under target/): no 5xx, every response conforms to the document.
bash scripts/schemathesis.sh --examples 100

# The benchmark in its small configuration: proves it runs and that nothing
# acknowledged is lost or delivered out of order; it judges no timings.
bash scripts/bench.sh --quick

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --no-fail-fast
else
    cargo test --workspace --all-targets --no-fail-fast
fi
