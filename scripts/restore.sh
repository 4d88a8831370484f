#!/bin/sh
# Restore a dump made by scripts/backup.sh into the croupier database.
# POSIX sh: runs in postgres:15-alpine as well as on a Debian host.
#
#   scripts/restore.sh FILE
#
# Connection: DATABASE_URL when set, otherwise PGHOST, PGPORT, PGUSER,
# PGPASSWORD, PGDATABASE (the same variables backup.sh uses).
#
# Objects in the dump are dropped and recreated (--clean --if-exists) in a
# single transaction: on any error the database is left as it was. Every room
# then gets a new epoch, so clients resynchronise instead of resuming across
# the restore.
# Stop the app instances first and flush Redis afterwards (its cache still
# holds the pre-restore rooms); see docs/operations.md.
set -eu

log() {
    echo "restore: $*" >&2
}

if [ $# -ne 1 ]; then
    echo "usage: $0 FILE" >&2
    exit 2
fi
file=$1
if [ ! -f "$file" ]; then
    log "no such file: $file"
    exit 2
fi
if ! pg_restore --list "$file" >/dev/null 2>&1; then
    log "$file is not a pg_dump custom-format archive"
    exit 2
fi

set --
if [ -n "${DATABASE_URL:-}" ]; then
    case $DATABASE_URL in
        postgres://* | postgresql://*) ;;
        *)
            log "DATABASE_URL is not a PostgreSQL URL"
            exit 2
            ;;
    esac
    set -- --dbname="$DATABASE_URL"
elif [ -n "${PGDATABASE:-}" ]; then
    set -- --dbname="$PGDATABASE"
else
    log "set DATABASE_URL or PGDATABASE to choose the target database"
    exit 2
fi

log "restoring $file (existing objects are replaced)"
pg_restore --clean --if-exists --no-owner --no-privileges \
    --single-transaction --exit-on-error "$@" "$file"
# A restored room may have gone back in time: a client that saw version N before
# the restore could see a different event N after it. Give every room a new
# epoch so that such clients get a full sync instead of a wrong resume.
log "giving every room a new epoch"
psql "$@" --quiet --no-psqlrc -v ON_ERROR_STOP=1 -c \
    "UPDATE rooms SET epoch = substr(md5(random()::text || clock_timestamp()::text || id::text), 1, 16)"
log "done"
