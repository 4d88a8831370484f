#!/bin/sh
# Dump the croupier PostgreSQL database to a timestamped file and prune old
# dumps. POSIX sh: runs in postgres:15-alpine as well as on a Debian host.
#
#   scripts/backup.sh
#
# Connection: DATABASE_URL (postgres://user:password@host:port/db) when set,
# otherwise the standard libpq variables PGHOST, PGPORT, PGUSER, PGPASSWORD,
# PGDATABASE.
#
#   BACKUP_DIR     where dumps go               (default ./backups)
#   BACKUP_KEEP    how many newest dumps to keep (default 7)
#   BACKUP_PREFIX  file name prefix              (default croupier)
#
# Files are named PREFIX-YYYYmmddTHHMMSSZ.dump (pg_dump custom format, read
# by scripts/restore.sh). The newest file name is printed on success.
set -eu

backup_dir=${BACKUP_DIR:-./backups}
keep=${BACKUP_KEEP:-7}
prefix=${BACKUP_PREFIX:-croupier}

log() {
    echo "backup: $*" >&2
}

case $keep in
    '' | *[!0-9]*)
        log "BACKUP_KEEP must be a positive integer, got '$keep'"
        exit 2
        ;;
esac
if [ "$keep" -lt 1 ]; then
    log "BACKUP_KEEP must be at least 1"
    exit 2
fi
case $prefix in
    '' | *[!A-Za-z0-9._-]*)
        log "BACKUP_PREFIX may contain only letters, digits, '.', '_' and '-'"
        exit 2
        ;;
esac

set --
if [ -n "${DATABASE_URL:-}" ]; then
    case $DATABASE_URL in
        postgres://* | postgresql://*) ;;
        *)
            log "DATABASE_URL is not a PostgreSQL URL; nothing to back up"
            exit 2
            ;;
    esac
    set -- --dbname="$DATABASE_URL"
fi

mkdir -p "$backup_dir"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
target="$backup_dir/$prefix-$stamp.dump"
partial="$target.partial"
trap 'rm -f "$partial"' EXIT
trap 'exit 1' INT TERM

log "dumping to $target"
pg_dump --format=custom --compress=6 --file="$partial" "$@"
# Refuse to keep an archive that pg_restore cannot read back.
pg_restore --list "$partial" >/dev/null
mv "$partial" "$target"

# Prune: names sort by time, so everything after the newest $keep goes.
printf '%s\n' "$backup_dir/$prefix"-*.dump | sort -r | {
    count=0
    while IFS= read -r file; do
        case ${file##*/} in
            "$prefix"-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z.dump) ;;
            *) continue ;;
        esac
        [ -f "$file" ] || continue
        count=$((count + 1))
        if [ "$count" -gt "$keep" ]; then
            log "removing old dump $file"
            rm -f "$file"
        fi
    done
}

log "done ($(wc -c <"$target" | tr -d ' ') bytes)"
echo "$target"
