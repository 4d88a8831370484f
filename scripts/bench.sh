#!/usr/bin/env bash
# The performance benchmark: prints the performance budgets (README, "Performance")
# ("Performance budgets") as measured on this machine.
#
#   bash scripts/bench.sh            full run (about 10 minutes plus the build)
#   bash scripts/bench.sh --quick    a small configuration of every scenario, in
#                                    seconds each: checks that the benchmark works
#                                    and that nothing is lost; judges no timing.
#                                    Uses the dev-profile binaries that `cargo test
#                                    --workspace` builds anyway (a release build
#                                    from scratch takes many minutes on 2 cores);
#                                    add --release to use release binaries
#   bash scripts/bench.sh --strict   also exit non-zero when a budget is missed
#   bash scripts/bench.sh --no-build use the binaries already in the target dir
#   bash scripts/bench.sh --only=get,save
#                                    only the named scenarios (idle-rss, mixed,
#                                    hold, get, save, fanout, latency); the table
#                                    marks the others as not run, and they do
#                                    not fail the run
#   bash scripts/bench.sh --baseline=REV
#                                    also build revision REV (a release build of
#                                    `git archive REV`, kept under target/baseline)
#                                    and run the save scenario against one
#                                    instance of it, alternating with this build's
#                                    (five rounds), on the same PostgreSQL and
#                                    Redis: the table then gives the median save
#                                    rate as a ratio to REV's
#   bash scripts/bench.sh --perf     also profile instance 1 with `perf record`
#                                    during the direct GET, save and one-instance
#                                    fan-out scenarios (target/bench/perf-*.txt)
#
# It starts its own cluster on loopback in temporary directories (instances on
# port 0, the others on free ports retried when taken, see scripts/lib/ports.sh):
# PostgreSQL (initdb, fsync on; as the `postgres` user when run as root), Redis,
# `croupier migrate --contract` (a fresh database: nothing of a previous release
# runs on it), three release instances sharing them, and Nginx with the
# repository's nginx/ configuration over them. Every scenario is a subcommand of
# the load generator `croupier-bench` (bench/), bounded in count and time and
# talking only to 127.0.0.0/8. The table goes to stdout and, with every raw
# scenario result, to target/bench/results.json. Everything started here runs
# in its own process group and is stopped with it on exit.
#
# Exit status: non-zero when a scenario failed to run, an acknowledged save was
# not stored, a fan-out event was lost, the mixed load saw an error, or (quick
# mode) a requested connection could not be held; with --strict also when a
# budget is missed. Timings on a busy machine are depressed: read them with the
# load average printed above the table.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
STRICT=0
PERF=0
RELEASE=""
BUILD=1
ONLY=""
BASELINE=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --strict) STRICT=1 ;;
        --perf) PERF=1 ;;
        --release) RELEASE=1 ;;
        --no-build) BUILD=0 ;;
        --only=*) ONLY=",${arg#--only=}," ;;
        --baseline=*) BASELINE=${arg#--baseline=} ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "bench: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { printf 'bench: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

# ---------------------------------------------------------------- packages
# Debian package → a file that proves it is installed. wrk is only used by the
# full run (it is the tool the GET budget is stated for).
# shellcheck source-path=SCRIPTDIR source=lib/packages.sh
source "$ROOT/scripts/lib/packages.sh"
packages=(
    postgresql="/usr/lib/postgresql/*/bin/initdb"
    redis-server=/usr/bin/redis-server
    nginx=/usr/sbin/nginx
    openssl=/usr/bin/openssl
)
[ "$QUICK" = 1 ] || packages+=(wrk=/usr/bin/wrk)
# stdout is for the table.
ensure_packages bench "${packages[@]}" >&2
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    die "PostgreSQL server binaries not found under /usr/lib/postgresql"
fi
HAVE_WRK=0
if [ "$QUICK" = 0 ] && command -v wrk >/dev/null; then HAVE_WRK=1; fi

# ---------------------------------------------------------------- limits
# Each held WebSocket is a descriptor on both ends; the per-process hard limit
# is the ceiling for the server and for each load-generator process.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard" 2>/dev/null || log "could not raise the open-file limit to $hard"
NOFILE=$(ulimit -n)

# ---------------------------------------------------------------- build
# Full runs measure release binaries; quick runs default to the dev profile.
if [ "$QUICK" = 0 ] || [ -n "$RELEASE" ]; then PROFILE=release PROFILE_DIR=release; else PROFILE=dev PROFILE_DIR=debug; fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$TARGET_DIR/$PROFILE_DIR/croupier"
BENCH="$TARGET_DIR/$PROFILE_DIR/croupier-bench"
if [ "$BUILD" = 1 ]; then
    log "building $PROFILE binaries"
    cargo build --profile "$PROFILE" --quiet -p croupier -p croupier-bench
fi
if [ ! -x "$BIN" ] || [ ! -x "$BENCH" ]; then
    die "missing $BIN or $BENCH (build them, or drop --no-build)"
fi
BASE_BIN=""
if [ -n "$BASELINE" ]; then
    BASE_SHA=$(git -C "$ROOT" rev-parse --verify --quiet "$BASELINE^{commit}") ||
        die "--baseline=$BASELINE is not a revision of this repository"
    BASE_SRC="$ROOT/target/baseline/$BASE_SHA"
    BASE_BIN="$ROOT/target/baseline/target/release/croupier-$BASE_SHA"
    if [ ! -x "$BASE_BIN" ]; then
        log "building the baseline $BASELINE ($BASE_SHA), release"
        rm -rf "$BASE_SRC"
        mkdir -p "$BASE_SRC"
        git -C "$ROOT" archive "$BASE_SHA" | tar -x -C "$BASE_SRC"
        (cd "$BASE_SRC" && CARGO_TARGET_DIR="$ROOT/target/baseline/target" cargo build --release --quiet -p croupier) ||
            die "the baseline $BASELINE did not build"
        cp "$ROOT/target/baseline/target/release/croupier" "$BASE_BIN"
        rm -rf "$BASE_SRC"
    fi
fi
OUT_DIR="$ROOT/target/bench"
mkdir -p "$OUT_DIR"

# ---------------------------------------------------------------- clean-up
WORK=$(mktemp -d "${TMPDIR:-/tmp}/croupier-bench.XXXXXX")
PG_DIR=""
PG_RUN=()
PERF_PID=""
NODE_PIDS=()
BASE_PID=""
REDIS_PID=""
NGINX_PID=""

# These run from the EXIT trap.
# Every server runs in its own session (setsid), so its pid is its process
# group: SIGTERM to the server, then SIGKILL to the whole group after the
# grace, which also takes whatever it forked (Nginx's workers).
# shellcheck disable=SC2317
stop_pid() { # pid [seconds before SIGKILL]
    local pid=$1 grace=${2:-10} i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317
cleanup() {
    local status=$? stoppers=() pid
    set +e
    trap - EXIT INT TERM
    [ -n "$PERF_PID" ] && stop_pid "$PERF_PID" 5
    [ -n "$NGINX_PID" ] && stop_pid "$NGINX_PID" 5
    # The instances drain in parallel (SIGTERM, then SIGKILL after 15 s).
    for pid in "${NODE_PIDS[@]}"; do
        stop_pid "$pid" 15 &
        stoppers+=($!)
    done
    for pid in "${stoppers[@]}"; do wait "$pid"; done
    [ -n "$BASE_PID" ] && stop_pid "$BASE_PID" 15
    [ -n "$REDIS_PID" ] && stop_pid "$REDIS_PID" 5
    if [ -n "$PG_DIR" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
        # pg_ctl starts the postmaster as a session leader; its backends are
        # in its group.
        pid=$(head -n 1 "$PG_DIR/data/postmaster.pid")
        (cd / && "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 30 stop) >/dev/null 2>&1
        [[ $pid =~ ^[0-9]+$ ]] && kill -KILL -- "-$pid" 2>/dev/null
    fi
    if [ "$status" -ne 0 ] && [ -d "$WORK" ]; then
        for f in "$WORK"/node-*.log "$WORK"/nginx.log "$WORK"/redis.log "$PG_DIR/server.log"; do
            [ -s "$f" ] || continue
            log "last lines of $(basename "$f"):"
            tail -n 15 "$f" >&2 || true
        done
    fi
    rm -rf "$WORK"
    [ -n "$PG_DIR" ] && rm -rf "$PG_DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The instances bind port 0 and report the port they got; PostgreSQL, Redis and
# Nginx cannot, so each gets a port from free_port and is started again on
# another one when it did not get it (scripts/lib/ports.sh).
# shellcheck source-path=SCRIPTDIR source=lib/ports.sh
source "$ROOT/scripts/lib/ports.sh"

# Waits up to `seconds` for process `pid` to listen on `port`s; 1 if it exited
# or the time ran out.
wait_listening() { # pid seconds port...
    local pid=$1 seconds=$2 i port ok
    shift 2
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        ok=1
        for port in "$@"; do listens "$pid" "$port" || ok=0; done
        [ "$ok" = 1 ] && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- PostgreSQL
PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/croupier-bench-pg.XXXXXX")
mkdir -p "$PG_DIR/socket"
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses to run as root.
    id postgres >/dev/null 2>&1 ||
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    chown -R postgres:postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    PG_RUN=(runuser -u postgres --)
fi
(cd "$PG_DIR" && "${PG_RUN[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust --encoding=UTF8 --locale=C \
    --no-sync) >"$WORK/initdb.log" 2>&1 || die "initdb failed: $(cat "$WORK/initdb.log")"
# A port someone else took first makes the server exit ("could not bind"), and
# pg_ctl report a failure: then another port.
PG_PORT=""
for _ in 1 2 3 4 5; do
    free_port || die "no free port for PostgreSQL"
    log "starting PostgreSQL on 127.0.0.1:$FREE_PORT"
    PG_OPTS="-p $FREE_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DIR/socket"
    PG_OPTS+=" -c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    PG_OPTS+=" -c max_connections=300 -c shared_buffers=128MB -c logging_collector=off"
    if (cd "$PG_DIR" && "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -o "$PG_OPTS" \
        -w -t 60 start) >/dev/null && listens "$(head -n 1 "$PG_DIR/data/postmaster.pid")" "$FREE_PORT"; then
        PG_PORT=$FREE_PORT
        break
    fi
    log "PostgreSQL did not get port $FREE_PORT; trying another"
    (cd / && "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 30 stop) >/dev/null 2>&1 || true
done
[ -n "$PG_PORT" ] || die "PostgreSQL did not start: $(tail -n 20 "$PG_DIR/server.log" 2>/dev/null)"
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres croupier
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/croupier"

# ---------------------------------------------------------------- Redis
mkdir -p "$WORK/redis"
REDIS_PORT=""
for _ in 1 2 3 4 5; do
    free_port || die "no free port for Redis"
    log "starting Redis on 127.0.0.1:$FREE_PORT"
    setsid redis-server --port "$FREE_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --dir "$WORK/redis" --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
    REDIS_PID=$!
    if wait_listening "$REDIS_PID" 20 "$FREE_PORT"; then
        REDIS_PORT=$FREE_PORT
        break
    fi
    log "Redis did not get port $FREE_PORT; trying another"
    stop_pid "$REDIS_PID" 5
    REDIS_PID=""
done
[ -n "$REDIS_PORT" ] || die "Redis did not start"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# ---------------------------------------------------------------- instances
DATABASE_URL=$DATABASE_URL RUST_LOG=warn "$BIN" migrate --contract >/dev/null 2>"$WORK/migrate.log" ||
    die "croupier migrate failed: $(cat "$WORK/migrate.log")"
JWT_SECRET="bench-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
WS_MAX=$((NOFILE > 1000 ? NOFILE - 500 : 500))
# scripts/test.sh marks what it starts in the environment, which env -i drops.
MARKER=()
if [ -n "${CROUPIER_TEST_RUN:-}" ]; then MARKER=("CROUPIER_TEST_RUN=$CROUPIER_TEST_RUN"); fi
# start_instance NAME BINARY DATABASE_URL: one instance on port 0, in the
# background; its pid in STARTED_PID.
start_instance() {
    local name=$1 binary=$2 database_url=$3
    mkdir -p "$WORK/$name"
    # A clean environment in its own directory (so no .env is read): what the
    # benchmark measures is exactly this configuration. RUST_LOG=warn: at the
    # default `info` every request writes a log line; the start-up's own INFO
    # lines stay, for the port each instance got on port 0.
    (cd "$WORK/$name" && exec setsid env -i "${MARKER[@]}" PATH="$PATH" BIND=127.0.0.1 PORT=0 DATA_DIR="$WORK/$name" \
        DATABASE_URL="$database_url" REDIS_URL="$REDIS_URL" JWT_SECRET="$JWT_SECRET" INSTANCE_ID="bench-${name#node-}" \
        TRUST_PROXY=true WS_MAX_CONNECTIONS="$WS_MAX" WS_RATE_LIMIT=100000 WS_RATE_BURST=100000 \
        WS_MAX_PER_CLIENT="$WS_MAX" WRITE_RATE_LIMIT=1000000 WRITE_RATE_BURST=1000000 ROOM_CREATE_LIMIT=1000000 \
        MAX_HISTORY=20000 RUST_LOG=warn,croupier::startup=info "$binary" serve </dev/null >"$WORK/$name.log" 2>&1) &
    STARTED_PID=$!
}

# ready_port NAME PID: waits for the instance's port (in READY_PORT) and its
# readiness.
ready_port() {
    local name=$1 pid=$2 port="" t
    for ((t = 0; t < 600; t++)); do
        port=$(bound_port "$WORK/$name.log")
        [ -n "$port" ] && break
        kill -0 "$pid" 2>/dev/null || die "instance $name exited during start-up"
        sleep 0.1
    done
    [ -n "$port" ] || die "instance $name did not bind within 60 s"
    "$BENCH" ready --url "http://127.0.0.1:$port" --timeout 60 || die "instance $name did not become ready"
    READY_PORT=$port
}

for i in 1 2 3; do
    start_instance "node-$i" "$BIN" "$DATABASE_URL"
    NODE_PIDS+=("$STARTED_PID")
done
NODE_PORTS=()
for i in 1 2 3; do
    ready_port "node-$i" "${NODE_PIDS[$((i - 1))]}"
    NODE_PORTS+=("$READY_PORT")
done
log "instances ready on ports ${NODE_PORTS[*]} (pids ${NODE_PIDS[*]})"
URL1="http://127.0.0.1:${NODE_PORTS[0]}"
URL2="http://127.0.0.1:${NODE_PORTS[1]}"
URL3="http://127.0.0.1:${NODE_PORTS[2]}"

# ---------------------------------------------------------------- Nginx
# The repository's configuration in a scratch prefix, as tests/support/nginx.rs
# does it: listen ports rewritten to free loopback ports, upstream.conf pointed
# at the instances, a throwaway certificate for the TLS server block.
mkdir -p "$WORK/nginx/certs"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/nginx/certs/tls.key" -out "$WORK/nginx/certs/tls.crt" >/dev/null 2>&1 ||
    die "openssl could not make a certificate"
NGINX_GLOBALS="daemon off;"
# As root, workers would switch to `nobody`, which cannot read the private prefix.
[ "$(id -u)" -eq 0 ] && NGINX_GLOBALS="daemon off; user root;"
NGINX_PORT=""
for _ in 1 2 3 4 5; do
    free_port || die "no free port for Nginx"
    http_port=$FREE_PORT
    free_port || die "no free port for Nginx"
    https_port=$FREE_PORT
    for conf in nginx/*.conf; do
        sed -e "s/listen 80 default_server;/listen 127.0.0.1:$http_port default_server;/" \
            -e "s/listen 443 ssl default_server;/listen 127.0.0.1:$https_port ssl default_server;/" \
            "$conf" >"$WORK/nginx/$(basename "$conf")"
    done
    for port in "${NODE_PORTS[@]}"; do
        echo "server 127.0.0.1:$port max_fails=3 fail_timeout=5s;"
    done >"$WORK/nginx/upstream.conf"
    setsid /usr/sbin/nginx -p "$WORK/nginx/" -e stderr -c "$WORK/nginx/nginx.conf" -g "$NGINX_GLOBALS" \
        </dev/null >/dev/null 2>"$WORK/nginx.log" &
    NGINX_PID=$!
    if wait_listening "$NGINX_PID" 20 "$http_port" "$https_port"; then
        NGINX_PORT=$http_port
        break
    fi
    log "Nginx did not get ports $http_port and $https_port; trying others"
    stop_pid "$NGINX_PID" 5
    NGINX_PID=""
done
[ -n "$NGINX_PORT" ] || die "Nginx did not start: $(tail -n 5 "$WORK/nginx.log")"
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
"$BENCH" ready --url "$NGINX_URL" --timeout 20 || die "Nginx did not start"

# ---------------------------------------------------------------- scenarios
RESULTS="$WORK/results.jsonl"
"$BENCH" machine >"$RESULTS"
echo "{\"scenario\":\"run\",\"profile\":\"$PROFILE\",\"instances\":3,\"nofile\":$NOFILE,\"only\":\"$ONLY\"}" >>"$RESULTS"

# wants SCENARIO: whether --only selected it (everything without --only).
wants() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# Idle memory of one instance in cluster mode, after start-up and before any load.
if wants idle-rss; then
    sleep 2
    status_file="/proc/${NODE_PIDS[0]}/status"
    idle_kib=$(awk '/^VmRSS:/ {print $2}' "$status_file")
    # The split into what the process allocated and what is program code
    # mapped from the page cache (RssShmem is part of neither and is 0 here).
    anon_kib=$(awk '/^RssAnon:/ {print $2}' "$status_file")
    file_kib=$(awk '/^RssFile:/ {print $2}' "$status_file")
    echo "{\"scenario\":\"idle-rss\",\"label\":\"idle-rss\",\"instance\":\"bench-1, cluster mode\",\"kib\":$idle_kib,\"anon_kib\":${anon_kib:-null},\"file_kib\":${file_kib:-null}}" >>"$RESULTS"
    log "idle RSS of instance 1: $idle_kib KiB"
fi

# run LABEL SUBCOMMAND ARGS...: one scenario; its JSON line goes to the results.
run() {
    local label=$1 line rc=0
    shift
    log "scenario $label: croupier-bench $*"
    line=$("$BENCH" "$@" --label "$label" | tail -n 1) || rc=$?
    if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
        echo "$line" >>"$RESULTS"
        log "  $line"
    else
        log "  scenario $label failed (exit $rc)"
        echo "{\"scenario\":\"failed\",\"label\":\"$label\",\"error\":\"exit status $rc\"}" >>"$RESULTS"
    fi
}

# profile LABEL SECONDS: samples instance 1's CPU while a scenario runs.
profile_start() {
    [ "$PERF" = 1 ] || return 0
    perf record -F "${PERF_FREQ:-499}" -g -p "${NODE_PIDS[0]}" -o "$OUT_DIR/perf-$1.data" -- sleep "$2" >/dev/null 2>&1 &
    PERF_PID=$!
}
profile_finish() {
    [ -n "$PERF_PID" ] || return 0
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=""
    perf report -i "$OUT_DIR/perf-$1.data" --stdio --no-children --percent-limit 0.5 -F overhead,dso,sym \
        -g none 2>/dev/null | grep -v '^$' | sed -E 's/ +$//; s/ {3,}/  /g' | head -n 80 >"$OUT_DIR/perf-$1.txt" || true
    log "  profile written to target/bench/perf-$1.txt (samples: perf-$1.data)"
}

if [ "$QUICK" = 1 ]; then
    # Two load-generator processes, to exercise the multi-process path.
    HOLD=(--connections 300 --rooms 10 --settle 1 --per-process 150)
    GET=(--duration 2 --warmup 0.5)
    SAVE=(--writers 20 --max-requests 500 --duration 10)
    SAVE_ROUNDS=1
    FAN1=(--members 200 --adds 5 --gap-ms 20)
    FAN3=(--members 300 --adds 5 --gap-ms 20)
    FLOOR=(--members 200 --messages 5 --gap-ms 20)
    LAT=(--count 50 --gap-ms 5)
    MIXED=(--duration 5 --clients 20 --rooms 5 --sample-ms 500 --cooldown 1)
else
    HOLD=(--connections 15000 --rooms 150 --settle 5)
    GET=(--duration 10 --warmup 1)
    SAVE=(--writers 50 --max-requests 10000 --duration 30)
    SAVE_ROUNDS=5
    FAN1=(--members 10000 --adds 50 --gap-ms 100)
    FAN3=(--members 10000 --adds 50 --gap-ms 100)
    FLOOR=(--members 10000 --messages 50 --gap-ms 100)
    LAT=(--count 1000 --gap-ms 10)
    MIXED=(--duration 90 --clients 300 --rooms 50 --sample-ms 1000 --cooldown 3)
fi

# The soak first, while every instance is fresh: glibc keeps the memory of
# later peaks (15,000 connections, 10,000-member fan-outs) mapped, and a
# bloated heap would hide any growth.
if wants mixed; then
    run mixed mixed --url "$URL1" --url "$URL2" --url "$URL3" \
        --server-pid "${NODE_PIDS[0]}" --server-pid "${NODE_PIDS[1]}" --server-pid "${NODE_PIDS[2]}" "${MIXED[@]}"
    sleep 2
fi

# Connections next, on instance 3 (its heap holds only what the soak left), so
# that little freed memory can be reused to hide what the connections cost.
if wants hold; then
    run hold ws-hold --url "$URL3" --server-pid "${NODE_PIDS[2]}" "${HOLD[@]}"
    sleep 2
fi

if wants get; then
    if [ "$HAVE_WRK" = 1 ]; then
        run get-direct-wrk wrk --url "$URL1" --server-pid "${NODE_PIDS[0]}" --duration "${GET[1]%.*}" --connections 50
    fi
    profile_start get-direct "${GET[1]%.*}"
    run get-direct http-get --url "$URL1" --server-pid "${NODE_PIDS[0]}" --connections 50 "${GET[@]}"
    profile_finish get-direct
    if [ "$HAVE_WRK" = 1 ]; then
        run get-nginx-wrk wrk --url "$NGINX_URL" --duration "${GET[1]%.*}" --connections 50
    fi
    run get-nginx http-get --url "$NGINX_URL" --connections 50 "${GET[@]}"
fi

# warm_up_saves URL: a first run of saves to another room, not reported. The
# first run after a start (or after other scenarios) is measurably slower than
# the next one, and a comparison must not hand that to one side only.
warm_up_saves() {
    "$BENCH" http-save --url "$1" --writers 50 --max-requests 2000 --duration 10 >/dev/null ||
        log "  the warm-up saves to $1 failed"
}

if wants save; then
    BASE_URL=""
    if [ -n "$BASE_BIN" ]; then
        # The baseline on a database of its own, migrated by itself.
        "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres croupier_baseline
        BASE_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/croupier_baseline"
        DATABASE_URL=$BASE_DATABASE_URL RUST_LOG=warn "$BASE_BIN" migrate >/dev/null 2>"$WORK/migrate-baseline.log" ||
            die "the baseline's croupier migrate failed: $(cat "$WORK/migrate-baseline.log")"
        start_instance baseline "$BASE_BIN" "$BASE_DATABASE_URL"
        BASE_PID=$STARTED_PID
        ready_port baseline "$BASE_PID"
        BASE_URL="http://127.0.0.1:$READY_PORT"
        warm_up_saves "$BASE_URL"
    fi
    warm_up_saves "$URL1"
    # Against a baseline, several rounds, each a run on the baseline and then
    # one on this build (each in a fresh room): a run lasts about a second,
    # and the table compares the medians.
    rounds=1
    [ -n "$BASE_URL" ] && rounds=$SAVE_ROUNDS
    for ((round = 1; round <= rounds; round++)); do
        suffix=""
        [ "$round" -gt 1 ] && suffix="-$round"
        if [ -n "$BASE_URL" ]; then
            run "save-baseline$suffix" http-save --url "$BASE_URL" --server-pid "$BASE_PID" "${SAVE[@]}"
        fi
        [ "$round" = 1 ] && profile_start save 2
        run "save$suffix" http-save --url "$URL1" --server-pid "${NODE_PIDS[0]}" "${SAVE[@]}"
        if [ "$round" = 1 ]; then
            profile_finish save
            curl -s "$URL1/metrics" >"$OUT_DIR/metrics-save.txt" || true
        fi
    done
    if [ -n "$BASE_URL" ]; then
        stop_pid "$BASE_PID" 15
        BASE_PID=""
        sleep 1
    fi
    # The same appends to a room that already holds 9,000 numbers.
    run save-long http-save --url "$URL1" --server-pid "${NODE_PIDS[0]}" --prefill 9000 "${SAVE[@]}"
fi

if wants fanout; then
    # The same number of frames to as many sockets with no server in between:
    # what this machine's loopback TCP allows at best (context for the rows below).
    run fanout-floor fanout-floor "${FLOOR[@]}"
    sleep 1
    profile_start fanout-1 20
    run fanout-1 fanout --url "$URL1" --server-pid "${NODE_PIDS[0]}" "${FAN1[@]}"
    profile_finish fanout-1
    sleep 2
    run fanout-3 fanout --url "$URL1" --url "$URL2" --url "$URL3" \
        --server-pid "${NODE_PIDS[0]}" --server-pid "${NODE_PIDS[1]}" --server-pid "${NODE_PIDS[2]}" "${FAN3[@]}"
    # Idle cluster for the latency run: let the fan-out members' sessions wind down first.
    sleep 3
fi

if wants latency; then
    run latency latency --writer-url "$URL1" --reader-url "$URL2" "${LAT[@]}"
fi

# ---------------------------------------------------------------- report
for i in 0 1 2; do
    kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || log "instance $((i + 1)) is no longer running"
done
cp "$RESULTS" "$OUT_DIR/results.jsonl"
report_args=(--results "$RESULTS" --json-out "$OUT_DIR/results.json")
[ "$QUICK" = 1 ] && report_args+=(--quick)
[ "$STRICT" = 1 ] && report_args+=(--strict)
[ -n "$BASELINE" ] && report_args+=(--baseline "$BASELINE")
rc=0
"$BENCH" report "${report_args[@]}" || rc=$?
log "results: target/bench/results.json (raw scenario lines: target/bench/results.jsonl)"
exit "$rc"
