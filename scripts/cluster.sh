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
# certificate from scripts/make-cert.sh); a port of 0 picks a free one.
# PostgreSQL and Redis use free ports outside the kernel's ephemeral range
# (retried with another port if the bind fails); the instances bind port 0 and
# report the port they got. RUST_LOG (default info), LOG_FORMAT and
# CORS_ORIGINS are passed to the instances; CARGO_TARGET_DIR is honoured when
# building; CROUPIER_BIN=path runs that binary instead of building one.
#
# Every server runs in its own process group and is stopped with it. If a
# server does not come up or dies, the script prints the tail of every log,
# stops the rest and keeps the temporary directory (it says where).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

instances=3
http_port=8088
https_port=8443

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-0}"
}

failed=0
failure=""
die() {
    echo "cluster: $*" >&2
    failed=1
    failure=$*
    exit 1
}

# A port number, or 0 for "pick a free one".
is_port() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -le 65535 ]
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
[ "$http_port" = 0 ] || [ "$http_port" != "$https_port" ] || die "--http-port and --https-port must differ"

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

# Port helpers shared with scripts/bench.sh: free_port, listens, bound_port.
# shellcheck source-path=SCRIPTDIR source=lib/ports.sh
source "$ROOT/scripts/lib/ports.sh"

# Whether GET `path` on 127.0.0.1:`port` answers 200 (no curl needed).
http_ok() (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    read -r -t 5 status <&3 || exit 1
    [[ $status == "HTTP/1."?" 200 "* ]]
)

for port in "$http_port" "$https_port"; do
    [ "$port" = 0 ] && continue
    port_in_use "$port" && die "port $port is already in use (choose another with --http-port / --https-port)"
    taken_ports+="$port "
done

# --- Build ----------------------------------------------------------------------

if [ -n "${CROUPIER_BIN:-}" ]; then
    BIN=$CROUPIER_BIN
else
    echo "cluster: building the release binary"
    (cd "$ROOT" && cargo build --release --quiet)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/croupier"
fi
case $BIN in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
[ -x "$BIN" ] || die "croupier binary not found at $BIN"

# --- Clean-up -------------------------------------------------------------------

started=$SECONDS
TMP=$(mktemp -d /tmp/croupier-cluster.XXXXXX)
# Traversable (not readable) for the postgres account when running as root.
chmod 711 "$TMP"
mkdir "$TMP/logs"
app_pids=()
redis_pid=""
nginx_pid=""
pg_pid=""
sleep_pid=""
stopping=0

# Stops the server whose process group is `pid` (every server runs under
# setsid, so its pid is its group): `signal` to the server itself, up to
# `seconds` for it to exit, then SIGKILL to the whole group, which also takes
# whatever it forked (Nginx workers, PostgreSQL backends).
stop_group() {
    local pid=$1 signal=$2 seconds=$3 i
    kill "-$signal" "$pid" 2>/dev/null || true
    for i in $(seq 1 $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "cluster: process $pid did not stop within ${seconds}s; killing it" >&2
    fi
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# The last lines of every log, for a failure message.
show_logs() {
    local log
    for log in "$TMP"/logs/*.log; do
        [ -s "$log" ] || continue
        echo "--- last lines of $log" >&2
        tail -n 20 "$log" >&2
    done
}

cleanup() {
    [ "$stopping" = 1 ] && return
    stopping=1
    trap '' INT TERM
    if [ -n "$sleep_pid" ]; then kill "$sleep_pid" 2>/dev/null || true; fi
    [ "$failed" = 1 ] && show_logs
    echo
    echo "cluster: stopping"
    # Instances first, so that they drain (clients are told 1001 and reconnect
    # later), then the balancer, then the dependencies.
    local pid
    for pid in "${app_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${app_pids[@]}"; do stop_group "$pid" TERM 20; done
    if [ -n "$nginx_pid" ]; then stop_group "$nginx_pid" TERM 10; fi
    if [ -n "$redis_pid" ]; then stop_group "$redis_pid" TERM 10; fi
    # SIGINT is PostgreSQL's fast shutdown; the postmaster stops its backends.
    if [ -n "$pg_pid" ]; then stop_group "$pg_pid" INT 30; fi
    if [ "$failed" = 1 ]; then
        # Repeated after the logs, where it is seen first.
        echo "cluster: failed: $failure" >&2
        echo "cluster: stopped; kept $TMP (logs in $TMP/logs)" >&2
    else
        rm -rf "$TMP"
        echo "cluster: stopped; removed $TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits up to `seconds` for `check` (a command) to succeed while process `pid`
# (named `what`, logging to `log`) runs. Returns 1 if it exited (its log says
# why) and dies on the timeout.
wait_up() {
    local what=$1 pid=$2 seconds=$3 i
    shift 3
    for i in $(seq 1 $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 1; }
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within ${seconds}s"
}

# --- PostgreSQL -----------------------------------------------------------------

PGDATA="$TMP/pg/data"
mkdir -p "$TMP/pg/socket"
touch "$TMP/logs/postgres.log"
PG_RUN=()
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root: use the package's account. setpriv
    # (unlike runuser) execs without forking, so the server keeps the pid of
    # its process group.
    id postgres >/dev/null 2>&1 \
        || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    chown -R postgres:postgres "$TMP/pg" "$TMP/logs/postgres.log"
    PG_RUN=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
as_pg() { "${PG_RUN[@]}" "$@"; }
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C >"$TMP/logs/initdb.log" 2>&1 \
    || die "initdb failed: $(cat "$TMP/logs/initdb.log")"
pg_isready_here() {
    "$PG_BIN/pg_isready" -q -h "$TMP/pg/socket" -p "$PG_PORT" -U postgres -d postgres
}
for attempt in 1 2 3 4 5; do
    free_port || die "no free port"
    PG_PORT=$FREE_PORT
    echo "cluster: starting PostgreSQL on port $PG_PORT"
    # Every server runs in its own session (setsid): Ctrl-C reaches only this
    # script, which then stops them in order, each with its process group.
    (cd "$TMP/pg" && exec setsid "${PG_RUN[@]}" "$PG_BIN/postgres" -D "$PGDATA" -p "$PG_PORT" \
        -c listen_addresses=127.0.0.1 -c "unix_socket_directories=$TMP/pg/socket" -c logging_collector=off) \
        </dev/null >>"$TMP/logs/postgres.log" 2>&1 &
    pg_pid=$!
    # The check goes through the Unix socket in our own directory, so a
    # foreign server on the port cannot be mistaken for ours.
    wait_up PostgreSQL "$pg_pid" 60 pg_isready_here && break
    pg_pid=""
    if ! grep -q 'Address already in use' "$TMP/logs/postgres.log" || [ "$attempt" = 5 ]; then
        die "PostgreSQL exited during start-up"
    fi
    echo "cluster: port $PG_PORT was taken; trying another"
done
as_pg "$PG_BIN/createdb" -h "$TMP/pg/socket" -p "$PG_PORT" -U postgres croupier
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/croupier"

# --- Redis ----------------------------------------------------------------------

mkdir "$TMP/redis"
redis_up() (
    listens "$redis_pid" "$REDIS_PORT" || exit 1
    exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 && [ "${reply%$'\r'}" = "+PONG" ]
)
for attempt in 1 2 3 4 5; do
    free_port || die "no free port"
    REDIS_PORT=$FREE_PORT
    echo "cluster: starting Redis on port $REDIS_PORT"
    setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --dir "$TMP/redis" --logfile "$TMP/logs/redis.log" </dev/null >/dev/null 2>&1 &
    redis_pid=$!
    wait_up Redis "$redis_pid" 20 redis_up && break
    redis_pid=""
    if ! grep -q 'Address already in use' "$TMP/logs/redis.log" || [ "$attempt" = 5 ]; then
        die "redis-server exited during start-up"
    fi
    echo "cluster: port $REDIS_PORT was taken; trying another"
done
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# --- Instances ------------------------------------------------------------------

JWT_SECRET=$(openssl rand -hex 32)
ADMIN_TOKEN=$(openssl rand -hex 24)
# The start-up reports the bound address at INFO: keep that one line whatever
# the filter.
app_log_filter="${RUST_LOG:-info},croupier::startup=info"
# Only what is set here reaches the binary; it runs in the temporary
# directory so that a .env in the repository is not read either.
app_env=(env -i "PATH=$PATH" "HOME=$TMP" "RUST_LOG=$app_log_filter"
    "DATABASE_URL=$DATABASE_URL" "REDIS_URL=$REDIS_URL" "JWT_SECRET=$JWT_SECRET"
    "ADMIN_TOKEN=$ADMIN_TOKEN" "BIND=127.0.0.1" "TRUST_PROXY=true" "DATA_DIR=$TMP/data")
if [ -n "${CORS_ORIGINS:-}" ]; then app_env+=("CORS_ORIGINS=$CORS_ORIGINS"); fi
if [ -n "${LOG_FORMAT:-}" ]; then app_env+=("LOG_FORMAT=$LOG_FORMAT"); fi
# A caller that tracks what it started (scripts/test.sh) marks it in the
# environment, which env -i would drop.
if [ -n "${CROUPIER_TEST_RUN:-}" ]; then app_env+=("CROUPIER_TEST_RUN=$CROUPIER_TEST_RUN"); fi

echo "cluster: migrating the schema"
(cd "$TMP" && "${app_env[@]}" "$BIN" migrate >"$TMP/logs/migrate.log" 2>&1) \
    || die "croupier migrate failed: $(cat "$TMP/logs/migrate.log")"

has_bound() { [ -n "$(bound_port "$1")" ]; }

# Port 0: the kernel picks a free port while binding, so nothing can take it
# between choosing and binding; each instance logs the port it got.
for i in $(seq 1 "$instances"); do
    (cd "$TMP" && exec setsid "${app_env[@]}" "PORT=0" "INSTANCE_ID=node-$i" "$BIN" serve) \
        </dev/null >"$TMP/logs/node-$i.log" 2>&1 &
    app_pids+=($!)
done
app_ports=()
for i in $(seq 1 "$instances"); do
    pid=${app_pids[$((i - 1))]}
    echo "cluster: waiting for node-$i"
    wait_up "node-$i" "$pid" 60 has_bound "$TMP/logs/node-$i.log" \
        || die "node-$i exited during start-up"
    port=$(bound_port "$TMP/logs/node-$i.log")
    wait_up "node-$i" "$pid" 60 http_ok "$port" /readyz || die "node-$i exited during start-up"
    app_ports+=("$port")
done

# --- Nginx ----------------------------------------------------------------------

NGINX_DIR="$TMP/nginx"
mkdir "$NGINX_DIR"
for port in "${app_ports[@]}"; do
    echo "server 127.0.0.1:$port max_fails=3 fail_timeout=5s;"
done >"$NGINX_DIR/upstream.conf"
CERT_DAYS=30 sh "$ROOT/scripts/make-cert.sh" -f "$NGINX_DIR/certs" >/dev/null
# As root, workers would switch to `nobody`, which cannot use the private
# temporary prefix; keep them as the current user.
nginx_globals="daemon off;"
if [ "$(id -u)" -eq 0 ]; then nginx_globals="daemon off; user root;"; fi
nginx_up() {
    listens "$nginx_pid" "$http_port" && listens "$nginx_pid" "$https_port" && http_ok "$http_port" /readyz
}
requested_http=$http_port
requested_https=$https_port
for attempt in 1 2 3 4 5; do
    if [ "$requested_http" = 0 ]; then free_port || die "no free port"; http_port=$FREE_PORT; fi
    if [ "$requested_https" = 0 ]; then free_port || die "no free port"; https_port=$FREE_PORT; fi
    for file in "$ROOT"/nginx/*.conf; do
        [ "$(basename "$file")" = upstream.conf ] && continue
        sed -e "s/listen 80 default_server;/listen 127.0.0.1:$http_port default_server;/" \
            -e "s/listen 443 ssl default_server;/listen 127.0.0.1:$https_port ssl default_server;/" \
            "$file" >"$NGINX_DIR/$(basename "$file")"
    done
    if ! grep -q "listen 127.0.0.1:$http_port default_server;" "$NGINX_DIR/croupier.conf" \
        || ! grep -q "listen 127.0.0.1:$https_port ssl default_server;" "$NGINX_DIR/croupier.conf"; then
        die "nginx/croupier.conf no longer has the listen lines this script rewrites"
    fi
    nginx -p "$NGINX_DIR/" -e stderr -c "$NGINX_DIR/nginx.conf" -g "$nginx_globals" -t >"$TMP/logs/nginx-check.log" 2>&1 \
        || die "nginx configuration check failed: $(cat "$TMP/logs/nginx-check.log")"
    echo "cluster: starting Nginx on ports $http_port and $https_port"
    setsid nginx -p "$NGINX_DIR/" -e stderr -c "$NGINX_DIR/nginx.conf" -g "$nginx_globals" \
        </dev/null >>"$TMP/logs/nginx.log" 2>&1 &
    nginx_pid=$!
    wait_up Nginx "$nginx_pid" 15 nginx_up && break
    nginx_pid=""
    # A port given on the command line is not replaced by another.
    if ! grep -q 'Address already in use' "$TMP/logs/nginx.log" || [ "$attempt" = 5 ] \
        || { [ "$requested_http" != 0 ] && [ "$requested_https" != 0 ]; }; then
        die "nginx exited during start-up"
    fi
    echo "cluster: a port was taken; trying others"
done

# --- Running --------------------------------------------------------------------

cat <<EOF

croupier cluster is up: $instances instance(s) behind Nginx (started in $((SECONDS - started)) s)

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
        kill -0 "${app_pids[$i]}" 2>/dev/null || die "node-$((i + 1)) exited"
    done
    kill -0 "$nginx_pid" 2>/dev/null || die "nginx exited"
    kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited"
    kill -0 "$pg_pid" 2>/dev/null || die "PostgreSQL exited"
    sleep 1 &
    sleep_pid=$!
    wait "$sleep_pid" || true
    sleep_pid=""
done
