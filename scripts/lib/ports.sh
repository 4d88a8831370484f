# shellcheck shell=bash
# Loopback ports for the servers a script starts, without races.
#
# A server that can bind port 0 should: the kernel picks a free port while
# binding, and the script reads back what it got (croupier logs it in its
# `serving` line, see `bound_port`). For servers that cannot (PostgreSQL,
# Redis, Nginx), `free_port` picks a port outside the kernel's ephemeral range
# (the kernel hands ports of that range to every outgoing connection, so one
# probed free there is easily taken before the server binds it), and the
# caller checks with `listens` that its own server holds it, retrying with
# another port when the bind failed.

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

read -r ephemeral_low ephemeral_high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null ||
    { ephemeral_low=32768; ephemeral_high=60999; }

taken_ports=" "
# Sets FREE_PORT to a port outside the ephemeral range that nobody listens on
# and that this script has not handed out yet (not a command substitution:
# `taken_ports` must persist). Returns 1 when none is found.
free_port() {
    local port
    for _ in $(seq 1 500); do
        port=$((10000 + (RANDOM * 32768 + RANDOM) % 55536))
        if [ "$port" -ge "$ephemeral_low" ] && [ "$port" -le "$ephemeral_high" ]; then
            continue
        fi
        if [[ $taken_ports != *" $port "* ]] && ! port_in_use "$port"; then
            taken_ports+="$port "
            # shellcheck disable=SC2034 # read by the caller
            FREE_PORT=$port
            return 0
        fi
    done
    echo "no free port outside the ephemeral range $ephemeral_low-$ephemeral_high" >&2
    return 1
}

# Whether process `pid` holds a socket listening on 127.0.0.1:`port` (or on
# every address): a connection that succeeds may reach another program that
# took the port our server failed to bind.
listens() {
    local pid=$1 hex inode
    hex=$(printf '%04X' "$2")
    while read -r inode; do
        if find "/proc/$pid/fd" -lname "socket:\[$inode\]" 2>/dev/null | grep -q .; then
            return 0
        fi
    done < <(awk -v p=":$hex" '$4 == "0A" && ($2 == "0100007F" p || $2 == "00000000" p) { print $10 }' /proc/net/tcp)
    return 1
}

# The port a croupier instance reports in its `serving` line (text or JSON
# logs) in log file `$1`; empty until it has bound.
bound_port() {
    sed -n -e 's/.*serving address=127\.0\.0\.1:\([0-9]*\).*/\1/p' \
        -e '/"message":"serving"/s/.*"address":"127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$1" | head -n 1
}
