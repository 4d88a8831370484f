#!/usr/bin/env bash
# The whole test suite, runnable on a fresh Debian 12 machine that has only the
# Rust toolchain: installs the servers the tests start for themselves
# (PostgreSQL, Redis, Nginx, Prometheus — each test starts its own on free
# loopback ports in temporary directories and stops it), validates the
# deployment files, then runs every Rust test.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian package → a file that proves it is installed.
declare -A NEEDED=(
    [postgresql]="/usr/lib/postgresql/*/bin/initdb"
    [redis-server]="/usr/bin/redis-server"
    [nginx]="/usr/sbin/nginx"
    [prometheus]="/usr/bin/prometheus"
)
missing=()
for package in "${!NEEDED[@]}"; do
    # shellcheck disable=SC2086 # the pattern must glob
    if ! compgen -G ${NEEDED[$package]} >/dev/null; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "test: installing ${missing[*]}"
    # Keep the packages' own daemons from starting: tests run their own.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$policy_created" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
fi

bash scripts/check-deploy.sh

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --no-fail-fast
else
    cargo test --workspace --all-targets --no-fail-fast
fi
