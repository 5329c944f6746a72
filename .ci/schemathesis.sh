#!/usr/bin/env bash
# Fuzz the real service against its own OpenAPI document (schemathesis, every check, stateful phase
# included): once open and once with API keys, each on a fresh SQLite database and a free port, with the
# shipped bundles. Bounded examples and a fixed seed keep it to a few minutes and reproducible; any
# failure fails CI. Checks configured narrowly are in schemathesis.toml, each with its reason.
#   bash .ci/schemathesis.sh            # both runs
#   EXAMPLES=20 bash .ci/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."  # schemathesis reads ./schemathesis.toml

PYTHON=${PYTHON:-.venv/bin/python}
ST=${ST:-.venv/bin/st}
EXAMPLES=${EXAMPLES:-30}
SEED=${SEED:-20260101}
KEY=schemathesis-key-0123456789

run_one() {
    local name=$1 keys=$2
    local tmp port pid status=0
    tmp=$(mktemp -d)
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # REID_DATABASE_URL unset: SQLite in the temporary data directory.
    env -u REID_DATABASE_URL REID_DATA_DIR="$tmp/data" REID_API_KEYS="$keys" REID_INFERENCE_WORKERS=1 \
        .venv/bin/reid-serve --port "$port" --log-level warning >"$tmp/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
        if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then break; fi
        if ! kill -0 "$pid" 2>/dev/null; then cat "$tmp/server.log"; return 1; fi
        sleep 0.5
    done
    local auth=()
    [ -n "$keys" ] && auth=(-H "X-API-Key: $KEY")
    echo "== schemathesis, $name (seed $SEED, at most $EXAMPLES examples per operation)"
    "$ST" run "http://127.0.0.1:$port/openapi.json" --checks all --phases examples,coverage,fuzzing,stateful \
        --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 \
        --request-timeout 30 "${auth[@]}" || status=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        echo "server log:"; tail -n 50 "$tmp/server.log"
    fi
    rm -rf "$tmp"
    return "$status"
}

failed=0
run_one open "" || failed=1
run_one keyed "$KEY" || failed=1
exit "$failed"
