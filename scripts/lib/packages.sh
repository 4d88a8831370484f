# shellcheck shell=bash
# Sourced by the scripts that need system packages.
#
#   ensure_packages LABEL PACKAGE=PATH_PATTERN...
#
# Installs, with apt-get, each Debian package whose path pattern matches no file.
# `apt-get update` runs only when something is missing, and the packages' own
# daemons are kept from starting: the scripts and tests start their own servers.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_packages() {
    local label=$1 spec pattern missing=()
    shift
    for spec in "$@"; do
        pattern=${spec#*=}
        # shellcheck disable=SC2086 # the pattern must glob
        if ! compgen -G $pattern >/dev/null; then
            missing+=("${spec%%=*}")
        fi
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "$label: installing ${missing[*]}"
    local policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$policy_created" = 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
}
