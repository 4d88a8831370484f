#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian 12 machine that has only the
# Rust toolchain: installs the servers the tests start for themselves
# (PostgreSQL, Redis, Nginx, Prometheus, Chromium — each test starts its own on free
# loopback ports in temporary directories and stops it), validates the
# deployment files, fuzzes the HTTP API with schemathesis, runs the quick
# benchmark, then runs every Rust test.
set -euo pipefail

# One build, never rebuilt: incremental state would only double the disk use.
export CARGO_INCREMENTAL=0

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
