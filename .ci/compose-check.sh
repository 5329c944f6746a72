#!/usr/bin/env bash
# Validates docker-compose.yml with whatever Compose implementation is installed; skips (exit 0) when there
# is none. Needs no Docker daemon and no .env (a .env in the checkout is ignored: the file is checked as a
# fresh clone gets it). Exits non-zero when the file is invalid or, with Compose v2, when the rendered
# configuration breaks one of the deployment's promises: it starts without a .env, the database password
# stays out of the api's environment unless one is set, the database is not published, and a .env's
# POSTGRES_PASSWORD reaches both services.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose-check: skipped (no 'docker compose' or 'docker-compose' on this machine)"
  exit 0
fi
version=$("${compose[@]}" version --short 2>/dev/null || echo "${compose[*]}")

# What a fresh clone sees: no .env, none of the settings in the environment.
unset_settings=(-u POSTGRES_PASSWORD -u POSTGRES_USER -u POSTGRES_DB -u REID_DATABASE_URL -u REID_DATABASE_PASSWORD_FILE)
fresh() { env "${unset_settings[@]}" "${compose[@]}" -f docker-compose.yml --env-file /dev/null "$@"; }

if ! fresh config -q; then
  echo "compose-check: docker-compose.yml is INVALID (without a .env)" >&2
  exit 1
fi

if ! fresh config --format json >/dev/null 2>&1; then
  echo "compose-check: docker-compose.yml is valid ($version; no JSON output: structure not checked)"
  exit 0
fi

check() {  # check LABEL PYTHON_ASSERTIONS < rendered JSON  (the parsed document is `c`, its services `s`)
  python3 -c "
import json, sys
from urllib.parse import urlsplit
c = json.load(sys.stdin)
s = c['services']
def mounts(name):
    return {v['target']: v for v in s[name].get('volumes', []) if v.get('source') == 'db-password'}
$2
" || { echo "compose-check: docker-compose.yml breaks a promise ($1)" >&2; exit 1; }
}

fresh config --format json | check "without a .env" "
url = urlsplit(s['api']['environment']['REID_DATABASE_URL'])
assert url.password is None and url.hostname == 'db', 'the default URL must carry no password'
assert s['api']['environment']['REID_DATABASE_PASSWORD_FILE'] == '/run/reid-secrets/postgres-password'
assert not s['db']['environment'].get('POSTGRES_PASSWORD'), 'no fixed default password'
assert not s['db'].get('ports'), 'the database must not be published'
assert all(p.get('host_ip') == '127.0.0.1' for p in s['api'].get('ports', [])), 'the API binds 127.0.0.1'
for name in ('api', 'db'):
    assert mounts(name).get('/run/reid-secrets', {}).get('read_only'), name + ' mounts the password read-only'
assert s['db']['depends_on']['db-password']['condition'] == 'service_completed_successfully'
"

env "${unset_settings[@]}" POSTGRES_PASSWORD=from-dot-env "${compose[@]}" -f docker-compose.yml --env-file /dev/null \
  config --format json | check "POSTGRES_PASSWORD set" "
assert urlsplit(s['api']['environment']['REID_DATABASE_URL']).password == 'from-dot-env'
assert s['db']['environment']['POSTGRES_PASSWORD'] == 'from-dot-env'
"

fresh -f docker-compose.milvus.yml config --format json | check "with docker-compose.milvus.yml" "
e = s['api']['environment']
assert e['REID_VECTOR_BACKEND'] == 'milvus' and e['REID_MILVUS_URI'] == 'http://milvus:19530', e
assert s['api']['depends_on']['milvus']['condition'] == 'service_healthy'
assert 'milvus' in s['api']['build']['args']['EXTRAS'].split(','), 'the image needs pymilvus'
for name in ('milvus', 'milvus-etcd', 'milvus-minio'):
    assert not s[name].get('ports'), name + ' must not be published'
"

echo "compose-check: docker-compose.yml is valid ($version): no .env needed, no password in the api's" \
  "environment unless one is set, database not published"
