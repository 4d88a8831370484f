#!/usr/bin/env bash
# A whole cluster on this machine in one command: PostgreSQL, Redis, N croupier
# instances sharing them, and Nginx in front with the repository's nginx/
# configuration — the same layout as docker-compose, as native processes on
# 127.0.0.1, all in one temporary directory.
#
#   scripts/cluster.sh [--instances N] [--http-port P] [--https-port P]
#
# Installs the Debian packages it needs when they are missing (postgresql,
# redis-server, nginx), builds the release binary, starts everything, prints
# the URLs and the admin token, and runs until Ctrl-C / SIGTERM, when it stops
# every process it started and deletes the temporary directory.
#
# Defaults: 3 instances, Nginx on 8088 (HTTP) and 8443 (HTTPS, self-signed
# certificate from scripts/make-cert.sh). PostgreSQL, Redis and the instances
# use free ports. RUST_LOG (default info) and CORS_ORIGINS are passed to the
# instances; CARGO_TARGET_DIR is honoured when building.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

instances=3
http_port=8088
https_port=8443

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-0}"
}

die() {
    echo "cluster: $*" >&2
    exit 1
}

is_port() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

while [ $# -gt 0 ]; do
    case $1 in
        --instances) instances=${2:-}; shift 2 || usage 2 ;;
        --instances=*) instances=${1#*=}; shift ;;
        --http-port) http_port=${2:-}; shift 2 || usage 2 ;;
        --http-port=*) http_port=${1#*=}; shift ;;
        --https-port) https_port=${2:-}; shift 2 || usage 2 ;;
        --https-port=*) https_port=${1#*=}; shift ;;
        -h|--help) usage 0 ;;
        *) echo "cluster: unknown option $1" >&2; usage 2 ;;
    esac
done
if ! [[ $instances =~ ^[0-9]+$ ]] || [ "$instances" -lt 1 ] || [ "$instances" -gt 32 ]; then
    die "--instances must be a number from 1 to 32"
fi
is_port "$http_port" || die "--http-port must be a port number"
is_port "$https_port" || die "--https-port must be a port number"
[ "$http_port" != "$https_port" ] || die "--http-port and --https-port must differ"

# shellcheck source-path=SCRIPTDIR source=lib/packages.sh
source "$ROOT/scripts/lib/packages.sh"

# --- Packages ------------------------------------------------------------------

ensure_packages cluster \
    postgresql='/usr/lib/postgresql/*/bin/initdb' \
    redis-server=/usr/bin/redis-server \
    nginx=/usr/sbin/nginx \
    openssl=/usr/bin/openssl
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)
[ -x "$PG_BIN/initdb" ] || die "PostgreSQL server binaries not found under /usr/lib/postgresql"

# --- Ports ----------------------------------------------------------------------

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

taken_ports=" "
# Sets FREE_PORT to a port nobody listens on and that this script has not
# handed out yet (not a command substitution: `taken_ports` must persist).
free_port() {
    local port attempt
    for attempt in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if [[ $taken_ports != *" $port "* ]] && ! port_in_use "$port"; then
            taken_ports+="$port "
            FREE_PORT=$port
            return 0
        fi
    done
    die "no free port found after $attempt attempts"
}

# Whether GET `path` on 127.0.0.1:`port` answers 200 (no curl needed).
http_ok() (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    read -r -t 5 status <&3 || exit 1
    [[ $status == "HTTP/1."?" 200 "* ]]
)

for port in "$http_port" "$https_port"; do
    port_in_use "$port" && die "port $port is already in use (choose another with --http-port / --https-port)"
done
taken_ports+="$http_port $https_port "

# --- Build ----------------------------------------------------------------------

echo "cluster: building the release binary"
(cd "$ROOT" && cargo build --release --quiet)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/croupier"
case $BIN in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
[ -x "$BIN" ] || die "release binary not found at $BIN"

# --- Clean-up -------------------------------------------------------------------

TMP=$(mktemp -d /tmp/croupier-cluster.XXXXXX)
# Traversable (not readable) for the postgres account when running as root.
chmod 711 "$TMP"
mkdir "$TMP/logs"
app_pids=()
redis_pid=""
nginx_pid=""
pg_started=0
stopping=0

# Sends `signal` to `pid` and waits up to `seconds` for it to exit, then kills it.
stop_process() {
    local pid=$1 signal=$2 seconds=$3 i
    kill "-$signal" "$pid" 2>/dev/null || return 0
    for i in $(seq 1 $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "cluster: process $pid did not stop within ${seconds}s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    [ "$stopping" = 1 ] && return
    stopping=1
    trap '' INT TERM
    echo
    echo "cluster: stopping"
    # Instances first, so that they drain (clients are told 1001 and reconnect
    # later), then the balancer, then the dependencies.
    local pid
    for pid in "${app_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${app_pids[@]}"; do stop_process "$pid" TERM 20; done
    if [ -n "$nginx_pid" ]; then stop_process "$nginx_pid" TERM 10; fi
    if [ -n "$redis_pid" ]; then stop_process "$redis_pid" TERM 10; fi
    if [ "$pg_started" = 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || echo "cluster: PostgreSQL did not stop cleanly" >&2
    fi
    rm -rf "$TMP"
    echo "cluster: stopped; removed $TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits up to `seconds` for `check` (a command) to succeed.
wait_for() {
    local what=$1 seconds=$2 i
    shift 2
    for i in $(seq 1 $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within ${seconds}s (logs: $TMP/logs)"
}

# --- PostgreSQL -----------------------------------------------------------------

free_port
PG_PORT=$FREE_PORT
PGDATA="$TMP/pg/data"
mkdir -p "$TMP/pg/socket"
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root: use the package's account.
    id postgres >/dev/null 2>&1 \
        || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    chown -R postgres:postgres "$TMP/pg"
    touch "$TMP/logs/postgres.log"
    chown postgres:postgres "$TMP/logs/postgres.log"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi
echo "cluster: starting PostgreSQL on port $PG_PORT"
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$TMP/logs/initdb.log" 2>&1 \
    || die "initdb failed: $(cat "$TMP/logs/initdb.log")"
pg_started=1
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/logs/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$TMP/pg/socket" start >/dev/null \
    || die "PostgreSQL did not start: $(tail -n 20 "$TMP/logs/postgres.log")"
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres croupier
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/croupier"

# --- Redis ----------------------------------------------------------------------

free_port
REDIS_PORT=$FREE_PORT
echo "cluster: starting Redis on port $REDIS_PORT"
mkdir "$TMP/redis"
# Every server runs in its own session (setsid): Ctrl-C reaches only this
# script, which then stops them in order.
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --dir "$TMP/redis" --logfile "$TMP/logs/redis.log" </dev/null >/dev/null 2>&1 &
redis_pid=$!
redis_ping() (
    exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 && [ "${reply%$'\r'}" = "+PONG" ]
)
wait_for Redis 20 redis_ping
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# --- Instances ------------------------------------------------------------------

JWT_SECRET=$(openssl rand -hex 32)
ADMIN_TOKEN=$(openssl rand -hex 16)
# Only what is set here reaches the binary; it runs in the temporary
# directory so that a .env in the repository is not read either.
app_env=(env -i "PATH=$PATH" "HOME=$TMP" "RUST_LOG=${RUST_LOG:-info}"
    "DATABASE_URL=$DATABASE_URL" "REDIS_URL=$REDIS_URL" "JWT_SECRET=$JWT_SECRET"
    "ADMIN_TOKEN=$ADMIN_TOKEN" "BIND=127.0.0.1" "TRUST_PROXY=true" "DATA_DIR=$TMP/data")
if [ -n "${CORS_ORIGINS:-}" ]; then app_env+=("CORS_ORIGINS=$CORS_ORIGINS"); fi

echo "cluster: migrating the schema"
(cd "$TMP" && "${app_env[@]}" "$BIN" migrate >"$TMP/logs/migrate.log" 2>&1) \
    || die "croupier migrate failed: $(cat "$TMP/logs/migrate.log")"

app_ports=()
for i in $(seq 1 "$instances"); do
    free_port
    port=$FREE_PORT
    (cd "$TMP" && exec setsid "${app_env[@]}" "PORT=$port" "INSTANCE_ID=node-$i" "$BIN" serve) \
        </dev/null >"$TMP/logs/node-$i.log" 2>&1 &
    app_pids+=($!)
    app_ports+=("$port")
done
for i in $(seq 1 "$instances"); do
    port=${app_ports[$((i - 1))]}
    echo "cluster: waiting for node-$i on port $port"
    wait_for "node-$i" 60 http_ok "$port" /readyz
done

# --- Nginx ----------------------------------------------------------------------

NGINX_DIR="$TMP/nginx"
mkdir "$NGINX_DIR"
for file in "$ROOT"/nginx/*.conf; do
    sed -e "s/listen 80 default_server;/listen 127.0.0.1:$http_port default_server;/" \
        -e "s/listen 443 ssl default_server;/listen 127.0.0.1:$https_port ssl default_server;/" \
        "$file" >"$NGINX_DIR/$(basename "$file")"
done
if ! grep -q "listen 127.0.0.1:$http_port default_server;" "$NGINX_DIR/croupier.conf" \
    || ! grep -q "listen 127.0.0.1:$https_port ssl default_server;" "$NGINX_DIR/croupier.conf"; then
    die "nginx/croupier.conf no longer has the listen lines this script rewrites"
fi
for port in "${app_ports[@]}"; do
    echo "server 127.0.0.1:$port max_fails=3 fail_timeout=5s;"
done >"$NGINX_DIR/upstream.conf"
CERT_DAYS=30 sh "$ROOT/scripts/make-cert.sh" -f "$NGINX_DIR/certs" >/dev/null
# As root, workers would switch to `nobody`, which cannot use the private
# temporary prefix; keep them as the current user.
nginx_globals="daemon off;"
if [ "$(id -u)" -eq 0 ]; then nginx_globals="daemon off; user root;"; fi
nginx -p "$NGINX_DIR/" -e stderr -c "$NGINX_DIR/nginx.conf" -g "$nginx_globals" -t >"$TMP/logs/nginx-check.log" 2>&1 \
    || die "nginx configuration check failed: $(cat "$TMP/logs/nginx-check.log")"
setsid nginx -p "$NGINX_DIR/" -e stderr -c "$NGINX_DIR/nginx.conf" -g "$nginx_globals" \
    </dev/null >"$TMP/logs/nginx.log" 2>&1 &
nginx_pid=$!
wait_for Nginx 15 http_ok "$http_port" /readyz

# --- Running --------------------------------------------------------------------

cat <<EOF

croupier cluster is up: $instances instance(s) behind Nginx

  HTTP        http://127.0.0.1:$http_port/api/...      WebSocket ws://127.0.0.1:$http_port/ws
  HTTPS       https://127.0.0.1:$https_port/api/...    WebSocket wss://127.0.0.1:$https_port/ws
              (self-signed: curl --cacert $NGINX_DIR/certs/tls.crt, or -k)
  health      http://127.0.0.1:$http_port/health
EOF
for i in $(seq 1 "$instances"); do
    printf '  %-11s http://127.0.0.1:%s  (metrics: /metrics)\n' "node-$i" "${app_ports[$((i - 1))]}"
done
cat <<EOF
  PostgreSQL  $DATABASE_URL
  Redis       $REDIS_URL
  logs        $TMP/logs/

  ADMIN_TOKEN=$ADMIN_TOKEN
  e.g. curl -H "Authorization: Bearer $ADMIN_TOKEN" http://127.0.0.1:$http_port/api/admin/stats

Press Ctrl-C to stop everything.
EOF

# Watch the processes; `wait` on a background sleep keeps the traps responsive.
while true; do
    for i in "${!app_pids[@]}"; do
        kill -0 "${app_pids[$i]}" 2>/dev/null \
            || die "node-$((i + 1)) exited; its log: $(tail -n 20 "$TMP/logs/node-$((i + 1)).log")"
    done
    kill -0 "$nginx_pid" 2>/dev/null || die "nginx exited: $(tail -n 20 "$TMP/logs/nginx.log")"
    kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited: $(tail -n 20 "$TMP/logs/redis.log")"
    sleep 1 &
    wait $! || true
done
