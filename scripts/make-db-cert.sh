#!/bin/sh
# Create a private CA and a PostgreSQL server certificate signed by it, for
# the compose stack's TLS between the instances and PostgreSQL.
#
#   scripts/make-db-cert.sh [-f] [DIR]
#
# Writes DIR/ca.pem (what clients trust: sslrootcert), DIR/ca.key, and
# DIR/postgres.crt + DIR/postgres.key for the names `postgres` (the compose
# service), `localhost` and 127.0.0.1. DIR defaults to ./certs, which
# docker-compose.yml mounts and git ignores. An existing set is kept unless
# -f is given. CERT_DAYS (default 825) and DB_CERT_NAMES (extra DNS names,
# comma-separated) adjust the result.
set -eu

force=0
if [ "${1:-}" = "-f" ]; then
    force=1
    shift
fi
if [ $# -gt 1 ]; then
    echo "usage: $0 [-f] [DIR]" >&2
    exit 2
fi

dir=${1:-./certs}
days=${CERT_DAYS:-825}

if ! command -v openssl >/dev/null 2>&1; then
    echo "make-db-cert: openssl is not installed" >&2
    exit 1
fi

if [ "$force" -eq 0 ] && [ -s "$dir/ca.pem" ] && [ -s "$dir/postgres.crt" ] && [ -s "$dir/postgres.key" ]; then
    echo "make-db-cert: $dir/postgres.crt already exists (use -f to replace it)"
    exit 0
fi

san="DNS:postgres,DNS:localhost,IP:127.0.0.1"
for name in $(echo "${DB_CERT_NAMES:-}" | tr ',' ' '); do
    san="DNS:$name,$san"
done

mkdir -p "$dir"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {
    if ! log=$("$@" 2>&1); then
        echo "make-db-cert: openssl failed:" >&2
        echo "$log" >&2
        exit 1
    fi
}

run openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days "$days" -subj "/CN=croupier database CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$work/ca.key" -out "$work/ca.pem"
run openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=postgres" -keyout "$work/postgres.key" -out "$work/postgres.csr"
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$san" >"$work/ext"
run openssl x509 -req -in "$work/postgres.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -extfile "$work/ext" \
    -out "$work/postgres.crt"

# Certificates are public; the keys stay owner-only.
chmod 644 "$work/ca.pem" "$work/postgres.crt"
for f in ca.key ca.pem postgres.key postgres.crt; do
    mv "$work/$f" "$dir/$f"
done

echo "make-db-cert: wrote $dir/ca.pem and $dir/postgres.crt ($san, valid $days days)"
