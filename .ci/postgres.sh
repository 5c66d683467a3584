#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on localhost for the search tests and print its URL.
#
#   export CELLSEARCH_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
#
# Installs the server with apt-get when it is missing, creates a private cluster in $PGDATA_DIR
# (default /tmp/cellsearch-postgres) listening on 127.0.0.1:$PGPORT (default 54329), a superuser
# role `cellsearch` (password `cellsearch`; the tests create and drop one database per test) and a
# database `cellsearch`. Idempotent: a server already running there is reused. Logs go to stderr;
# stdout is only the URL. Stop it with: pg_ctl -D "$PGDATA_DIR" stop (as the user that owns it).
#
# Every role is trusted except members of the group role `cellsearch_password_auth`, which must give
# their password (scram-sha-256): the credential tests create such a member to prove that a password
# is never written to a run and that resume finds it in the environment. The fault tests restart this
# server; they find its data directory and pg_ctl from the server itself (SHOW data_directory,
# pg_config) or from CELLSEARCH_TEST_POSTGRES_DATA and CELLSEARCH_TEST_PG_CTL (exported by .ci/run).
set -euo pipefail
PGPORT="${PGPORT:-54329}"
PGDATA_DIR="${PGDATA_DIR:-/tmp/cellsearch-postgres}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "installing postgresql with apt-get" >&2
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >&2
    bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
fi

# initdb and postgres refuse to run as root: use the `postgres` system user then.
if [ "$(id -u)" = 0 ]; then
    owner=postgres
    run_as() { runuser -u postgres -- "$@"; }
else
    owner="$(id -un)"
    run_as() { "$@"; }
fi

if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
    mkdir -p "$PGDATA_DIR"
    chown "$owner" "$PGDATA_DIR"
    chmod 700 "$PGDATA_DIR"
    run_as "$bindir/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 >&2
fi
if ! run_as "$bindir/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
    run_as "$bindir/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w \
        -o "-p $PGPORT -c listen_addresses=127.0.0.1 -k $PGDATA_DIR" start >&2
fi

psql_admin() { run_as "$bindir/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'cellsearch'")" != 1 ]; then
    psql_admin -c "CREATE ROLE cellsearch LOGIN SUPERUSER PASSWORD 'cellsearch'" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'cellsearch'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE cellsearch OWNER cellsearch" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'cellsearch_password_auth'")" != 1 ]; then
    psql_admin -c "CREATE ROLE cellsearch_password_auth NOLOGIN" >&2
fi
# First matching line wins: put the password rule for the group above initdb's trust lines.
hba="$PGDATA_DIR/pg_hba.conf"
if ! run_as grep -q '+cellsearch_password_auth' "$hba"; then
    { echo "host all +cellsearch_password_auth 127.0.0.1/32 scram-sha-256"; run_as cat "$hba"; } \
        | run_as tee "$hba.new" >/dev/null
    run_as chmod 600 "$hba.new"
    run_as mv "$hba.new" "$hba"
    run_as "$bindir/pg_ctl" -D "$PGDATA_DIR" reload >&2
fi
echo "postgresql://cellsearch:cellsearch@127.0.0.1:$PGPORT/cellsearch"
