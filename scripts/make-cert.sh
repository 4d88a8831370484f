#!/bin/sh
# Create a self-signed TLS certificate for localhost / 127.0.0.1 / ::1.
#
#   scripts/make-cert.sh [-f] [DIR]
#
# Writes DIR/tls.crt and DIR/tls.key (DIR defaults to ./nginx/certs, which
# is where nginx/croupier.conf looks for them and which git ignores).
# An existing pair is kept unless -f is given.
# CERT_DAYS (default 825) and CERT_CN (default localhost) adjust the result.
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

dir=${1:-./nginx/certs}
days=${CERT_DAYS:-825}
cn=${CERT_CN:-localhost}

if ! command -v openssl >/dev/null 2>&1; then
    echo "make-cert: openssl is not installed" >&2
    exit 1
fi

if [ "$force" -eq 0 ] && [ -s "$dir/tls.crt" ] && [ -s "$dir/tls.key" ]; then
    echo "make-cert: $dir/tls.crt already exists (use -f to replace it)"
    exit 0
fi

san="DNS:localhost,IP:127.0.0.1,IP:::1"
if [ "$cn" != "localhost" ]; then
    san="DNS:$cn,$san"
fi

mkdir -p "$dir"
umask 077
if ! log=$(openssl req -x509 -newkey rsa:2048 -sha256 -nodes \
    -days "$days" \
    -subj "/CN=$cn" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature,keyEncipherment" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$dir/tls.key.tmp" -out "$dir/tls.crt.tmp" 2>&1); then
    echo "make-cert: openssl failed:" >&2
    echo "$log" >&2
    rm -f "$dir/tls.key.tmp" "$dir/tls.crt.tmp"
    exit 1
fi
mv "$dir/tls.key.tmp" "$dir/tls.key"
chmod 644 "$dir/tls.crt.tmp"
mv "$dir/tls.crt.tmp" "$dir/tls.crt"

echo "make-cert: wrote $dir/tls.crt and $dir/tls.key (self-signed, valid $days days)"
