#!/usr/bin/env bash
# Start a PostgreSQL server for the gallery tests on 127.0.0.1:5432 (Debian's `postgresql` package),
# idempotently, as root on a clean Debian machine: install if missing, create or start the cluster,
# create role reid (password reid) and database reid_test.
#
#   source .ci/postgres.sh     # also exports REID_TEST_POSTGRES_URL into the calling shell
#   bash .ci/postgres.sh       # prints the export line
#
# Everything runs in a subshell with strict mode, so sourcing it leaves the caller's options alone.

REID_TEST_POSTGRES_URL="postgresql+psycopg://reid:reid@127.0.0.1:5432/reid_test"

_reid_postgres_up() (
    set -euo pipefail
    as_postgres() { (cd /tmp && runuser -u postgres -- "$@"); }

    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "postgres.sh: installing postgresql" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    fi
    version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"

    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
        pg_createcluster "$version" main --port 5432 >/dev/null
    fi
    if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
        pg_ctlcluster "$version" main start
    fi
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
    pg_isready -h 127.0.0.1 -p 5432 >/dev/null

    as_postgres psql -v ON_ERROR_STOP=1 -qtA -p 5432 <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reid') THEN
        CREATE ROLE reid LOGIN PASSWORD 'reid';
    ELSE
        ALTER ROLE reid LOGIN PASSWORD 'reid';
    END IF;
END
$$;
SQL
    if [ "$(as_postgres psql -qtA -p 5432 -c "SELECT 1 FROM pg_database WHERE datname = 'reid_test'")" != "1" ]; then
        as_postgres createdb -p 5432 -O reid reid_test
    fi
)

# Called on its own line, not inside `if`: bash ignores `set -e` in a function that is an if-condition.
_reid_postgres_up
_reid_postgres_status=$?
if [ "$_reid_postgres_status" -eq 0 ]; then
    export REID_TEST_POSTGRES_URL
    echo "export REID_TEST_POSTGRES_URL=$REID_TEST_POSTGRES_URL"
else
    echo "postgres.sh: could not start PostgreSQL (status $_reid_postgres_status)" >&2
    unset REID_TEST_POSTGRES_URL
    return "$_reid_postgres_status" 2>/dev/null || exit "$_reid_postgres_status"
fi
