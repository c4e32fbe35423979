#!/bin/sh
# PostgreSQL as its official image runs it: as the postgres user (uid 999; restore-launcher
# starts this script as that user, RESTORE_LAUNCHER_USER), data in $PGDATA
# (an emptyDir that `RESTORE_LAUNCHER_INCLUDE` carries), initialised on first start.
# On a migration's target this script never runs: the launcher restores the running server.
set -eu
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
export PGDATA
BIN=/usr/lib/postgresql/17/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 0700 "$PGDATA"
    "$BIN/initdb" --username=postgres --auth-local=peer --auth-host=trust \
        --no-instructions >/dev/null
    # Clients come from other pods: listen on the pod's addresses and trust the pod network
    # (a demo; a real deployment sets a password or client certificates).
    echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
fi
# dynamic_shared_memory_type=sysv: the server's dynamic segments live in its IPC namespace,
# which the checkpoint carries (the default, posix, maps files in the pod's /dev/shm, which it
# does not). The main segment already uses SysV for its header, whatever the settings.
exec "$BIN/postgres" -c listen_addresses='*' -c dynamic_shared_memory_type=sysv \
    -c unix_socket_directories=/var/run/postgresql -c logging_collector=off \
    -c log_line_prefix='%m [%p] '
