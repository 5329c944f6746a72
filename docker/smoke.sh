#!/usr/bin/env bash
# End-to-end check of the Docker deployment: build the image, start api + PostgreSQL with docker compose,
# enroll crops through the API with an API key, query them back, restart the stack (down + up) and check
# the gallery survived, back it up with pg_dump, erase everything (down -v: the gallery is gone), restore the
# dump into the fresh stack and query again, then down -v. Prints timings; exits non-zero on any failure.
#
#   docker/smoke.sh                 build and test (minutes: the first build downloads PyTorch)
#   SMOKE_NO_BUILD=1 docker/smoke.sh   reuse the image already tagged $API_IMAGE
#   SMOKE_NO_CACHE=1 docker/smoke.sh   build from scratch (to time a cold build)
#
# Settings (environment): TORCH_INDEX_URL (default: PyTorch's CPU index when reachable, else PyPI, whose
# wheels carry CUDA), API_IMAGE (default reid-stack:smoke), API_PORT (default: a free port),
# SMOKE_IDENTITIES (default 4), PYTHON (a Python with the project installed, for test crops and, when
# models_store/ has no bundles yet, random-weight bundles; default .venv/bin/python).
# It runs as its own compose project (reid-smoke) with its own volumes: a stack started from this
# repository with plain `docker compose up` is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${SMOKE_PROJECT:-reid-smoke}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
N_IDS=${SMOKE_IDENTITIES:-4}
WORK=$(mktemp -d)
T0=$(date +%s.%N)
SUMMARY=()
STAGE=setup

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
log() { printf '[%6ss] %s\n' "$(secs "$T0" "$(now)")" "$*"; }
note() { SUMMARY+=("$(printf '  %-24s %s' "$1" "$2")"); }
fail() { echo "SMOKE FAILED ($STAGE): $*" >&2; exit 1; }
compose() { docker compose -f docker-compose.yml --env-file "$WORK/smoke.env" "$@"; }

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "---- api logs (last 60 lines) ----" >&2
    compose logs --no-color --tail 60 api >&2 2>/dev/null || true
    echo "SMOKE FAILED (exit $rc) in stage: $STAGE" >&2
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

# ---------------------------------------------------------------- settings for this run
command -v docker >/dev/null || fail "docker is not installed"
docker compose version >/dev/null 2>&1 || fail "the docker compose plugin is not installed"
docker info >/dev/null 2>&1 || fail "the Docker daemon is not running"

if [ -z "${TORCH_INDEX_URL:-}" ]; then
  if python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=10)" 2>/dev/null; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  else
    TORCH_INDEX_URL=https://pypi.org/simple
    log "PyTorch's CPU index is unreachable from here: building with PyPI's torch (CUDA wheels, larger image)"
  fi
fi
note "torch source" "$TORCH_INDEX_URL"

if [ -f models_store/attributes/manifest.json ] && [ -f models_store/reid/manifest.json ]; then
  MODELS_DIR=models_store
  note "bundles" "models_store/ (the shipped ones)"
else
  STAGE="random bundles"
  MODELS_DIR=build/smoke-models
  log "models_store/ has no bundles yet: writing random-weight ones to $MODELS_DIR"
  rm -rf "$MODELS_DIR"
  "$PYTHON" - "$MODELS_DIR" <<'EOF'
import sys
from pathlib import Path

import torch

from app.bundle import EmbeddingSpec, Manifest, save_bundle
from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.reid import ReIDNet, ReIDNetConfig
from app.schema import schema_as_dict

torch.manual_seed(0)
out, size, why = Path(sys.argv[1]), (64, 32), "docker/smoke.sh: random weights"
a = AttributeNetConfig(backbone="osnet_x0_25", input_size=size)
save_bundle(out / "attributes", AttributeNet(a), Manifest(
    name="smoke-attributes", task="attributes", architecture=a.to_dict(), backbone=a.backbone,
    input_size=size, mean=a.mean, std=a.std, attribute_schema=schema_as_dict(), command=why))
r = ReIDNetConfig(backbone="osnet_x0_25", input_size=size)
net = ReIDNet(r)
save_bundle(out / "reid", net, Manifest(
    name="smoke-reid", task="reid", architecture=r.to_dict(), backbone=r.backbone, input_size=size,
    mean=r.mean, std=r.std, embedding=EmbeddingSpec(dim=net.embedding_dim), match_threshold=0.5,
    command=why))
EOF
  note "bundles" "$MODELS_DIR (random weights: models_store/ had none)"
fi

STAGE="test crops"
# Synthetic pedestrian crops (tests/synthetic.py): one per identity from camera 1 to enroll, one from
# camera 2 as a second view.
"$PYTHON" - "$WORK/crops" "$N_IDS" <<'EOF'
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
from tests.synthetic import make_identities, render

out, n = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True)
rng = np.random.default_rng(42)
for person in make_identities(n, seed=42, first_pid=101):
    for cam in (1, 2):
        render(person, cam, rng, size=(128, 64)).save(out / f"p{person.pid}_c{cam}.jpg", quality=90)
EOF
mapfile -t ENROLL < <(ls "$WORK"/crops/*_c1.jpg)
[ "${#ENROLL[@]}" -eq "$N_IDS" ] || fail "expected $N_IDS test crops"

KEY="smoke-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
PORT=${API_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
API_IMAGE=${API_IMAGE:-reid-stack:smoke}
# Only these reach compose (not a .env of this checkout); shell variables of the same names win, so the
# ones that would point the stack elsewhere are unset.
unset REID_DATABASE_URL POSTGRES_USER POSTGRES_DB
cat >"$WORK/smoke.env" <<EOF
POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
REID_API_KEYS=$KEY
API_PORT=$PORT
API_IMAGE=$API_IMAGE
TORCH_INDEX_URL=$TORCH_INDEX_URL
BUILD_MODELS_DIR=$MODELS_DIR
EOF
export API_PORT=$PORT API_IMAGE TORCH_INDEX_URL BUILD_MODELS_DIR=$MODELS_DIR REID_API_KEYS=$KEY
BASE=http://127.0.0.1:$PORT
compose config -q || fail "docker-compose.yml is invalid"

# ---------------------------------------------------------------- build
STAGE=build
if [ -n "${SMOKE_NO_BUILD:-}" ]; then
  docker image inspect "$API_IMAGE" >/dev/null 2>&1 || fail "SMOKE_NO_BUILD is set but there is no image $API_IMAGE"
  note "build" "skipped (SMOKE_NO_BUILD), image $API_IMAGE"
else
  log "building $API_IMAGE (torch from $TORCH_INDEX_URL) ..."
  t=$(now)
  compose build ${SMOKE_NO_CACHE:+--no-cache} api >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "image build failed"; }
  note "build" "$(secs "$t" "$(now)") s"
  grep -E '^torch [0-9]' "$WORK/build.log" | sed 's/^/  built with: /' || true
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$API_IMAGE")
note "image" "$API_IMAGE, $(python3 -c "print(f'{$SIZE / 1e9:.2f} GB ({$SIZE / 2**30:.2f} GiB)')")"
log "image $API_IMAGE: $SIZE bytes"

# ---------------------------------------------------------------- helpers
http() {  # http METHOD PATH OUTFILE [curl args...] -> prints the status code
  local method=$1 path=$2 out=$3
  shift 3
  curl -sS -o "$out" -w '%{http_code}' -X "$method" "$@" "$BASE$path" || true
}
json() {  # json FILE PYTHON_EXPR  (the parsed document is `d`)
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}
up() {  # start the stack and wait until both services report healthy
  local t
  t=$(now)
  compose up -d --no-build --wait --wait-timeout 300 >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log" >&2; fail "the stack did not become healthy"; }
  code=$(http GET /readyz "$WORK/ready.json")
  [ "$code" = 200 ] || fail "/readyz answered $code after the healthchecks passed"
  secs "$t" "$(now)"
}
query_all() {  # query every enrolled crop; checks it comes back first; writes "crop entry_id score" lines
  local label=$1 out=$2 t n=0 dt
  t=$(now)
  : >"$out"
  for crop in "${ENROLL[@]}"; do
    name=$(basename "$crop" _c1.jpg)
    code=$(http POST /reid/query "$WORK/q.json" -H "X-API-Key: $KEY" -F "image=@$crop;type=image/jpeg" -F top_k=3 -F collection=smoke)
    [ "$code" = 200 ] || fail "$label: query $name answered $code: $(cat "$WORK/q.json")"
    read -r ident entry score < <(json "$WORK/q.json" "d['matches'][0]['identity'], d['matches'][0]['entry_id'], d['matches'][0]['score']")
    [ "$ident" = "$name" ] || fail "$label: query $name came back as $ident first"
    [ "$entry" = "${ENTRY[$name]}" ] || fail "$label: query $name matched entry $entry, enrolled as ${ENTRY[$name]}"
    python3 -c "import sys; sys.exit(float(sys.argv[1]) < 0.99)" "$score" || fail "$label: own-crop score $score < 0.99"
    echo "$name $entry $score" >>"$out"
    n=$((n + 1))
  done
  dt=$(secs "$t" "$(now)")
  echo "$n/${#ENROLL[@]} own crops top-1 (score >= 0.99), $(python3 -c "print(f'{1000 * $dt / $n:.0f}')") ms/query incl. curl"
}
second_view() {  # the camera-2 crop of each identity: informational (random weights do not re-identify)
  local hits=0
  for crop in "${ENROLL[@]}"; do
    name=$(basename "$crop" _c1.jpg)
    code=$(http POST /reid/query "$WORK/q.json" -H "X-API-Key: $KEY" -F "image=@${crop%_c1.jpg}_c2.jpg;type=image/jpeg" -F top_k=1 -F collection=smoke)
    [ "$code" = 200 ] || fail "second-view query $name answered $code"
    [ "$(json "$WORK/q.json" "d['matches'][0]['identity']")" = "$name" ] && hits=$((hits + 1))
  done
  echo "$hits/${#ENROLL[@]}"
}

# ---------------------------------------------------------------- start
STAGE="first start"
compose down -v --remove-orphans >/dev/null 2>&1 || true
log "starting the stack (project $COMPOSE_PROJECT_NAME, API on 127.0.0.1:$PORT) ..."
dt=$(up)
note "up -> healthy (cold)" "$dt s (fresh volumes: initdb, schema, model load)"
log "healthy after $dt s"

STAGE=auth
code=$(http GET /healthz "$WORK/h.json")
[ "$code" = 200 ] || fail "/healthz answered $code"
nokey=$(http GET /gallery/stats "$WORK/s.json")
[[ "$nokey" = 401 || "$nokey" = 403 ]] || fail "/gallery/stats without a key answered $nokey, expected 401/403"
badkey=$(http GET /gallery/stats "$WORK/s.json" -H "X-API-Key: wrong-$KEY")
[[ "$badkey" = 401 || "$badkey" = 403 ]] || fail "/gallery/stats with a wrong key answered $badkey"
note "API key" "no key -> $nokey, wrong key -> $badkey, /healthz open"

STAGE=enroll
declare -A ENTRY
t=$(now)
i=0
for crop in "${ENROLL[@]}"; do
  name=$(basename "$crop" _c1.jpg)
  code=$(http POST /gallery "$WORK/e.json" -H "X-API-Key: $KEY" -F "images=@$crop;type=image/jpeg" \
    -F "identity=$name" -F camera_id=cam1 -F "captured_at=2024-05-0$((1 + i % 9))T12:00:00Z" \
    -F "metadata={\"site\": \"smoke\", \"n\": $i}" -F collection=smoke)
  [ "$code" = 201 ] || fail "enroll $name answered $code: $(cat "$WORK/e.json")"
  [ "$(json "$WORK/e.json" "d['created']")" = 1 ] || fail "enroll $name: $(cat "$WORK/e.json")"
  ENTRY[$name]=$(json "$WORK/e.json" "d['entries'][0]['id']")
  i=$((i + 1))
done
dt=$(secs "$t" "$(now)")
# The same bytes again: the existing entry, status 200, nothing new.
code=$(http POST /gallery "$WORK/e.json" -H "X-API-Key: $KEY" -F "images=@${ENROLL[0]};type=image/jpeg" -F collection=smoke)
if [ "$code" != 200 ] || [ "$(json "$WORK/e.json" "d['existing']")" != 1 ]; then
  fail "re-enrolling the same crop answered $code: $(cat "$WORK/e.json")"
fi
note "enroll" "$N_IDS crops in $dt s ($(python3 -c "print(f'{1000 * $dt / $N_IDS:.0f}')") ms/crop incl. curl); re-enroll -> existing"
log "enrolled $N_IDS crops in $dt s"

STAGE=query
code=$(http GET /gallery/stats "$WORK/s.json" -H "X-API-Key: $KEY")
[ "$code" = 200 ] || fail "/gallery/stats answered $code"
BEFORE=$(json "$WORK/s.json" "d['collections']['smoke']['searchable']")
[ "$BEFORE" = "$N_IDS" ] || fail "stats: $BEFORE searchable entries in 'smoke', expected $N_IDS"
r=$(query_all "before restart" "$WORK/before.txt")
note "query" "$r"
note "second view (cam 2)" "$(second_view) top-1 (informational)"
log "queries: $r"

# ---------------------------------------------------------------- restart: down (volumes kept) + up
STAGE=restart
t=$(now)
compose down >/dev/null 2>&1 || fail "docker compose down failed"
dt_down=$(secs "$t" "$(now)")
[ "$(docker volume ls -q --filter "name=${COMPOSE_PROJECT_NAME}_" | wc -l)" -ge 2 ] || fail "volumes vanished on down"
dt=$(up)
note "down + up -> healthy" "$dt_down s down, $dt s up"
log "restarted: down $dt_down s, up $dt s"

STAGE="after restart"
code=$(http GET /gallery/stats "$WORK/s.json" -H "X-API-Key: $KEY")
AFTER=$(json "$WORK/s.json" "d['collections']['smoke']['searchable']")
[ "$AFTER" = "$BEFORE" ] || fail "gallery had $BEFORE entries before the restart, $AFTER after"
r=$(query_all "after restart" "$WORK/after.txt")
cmp -s <(cut -d' ' -f1,2 "$WORK/before.txt") <(cut -d' ' -f1,2 "$WORK/after.txt") || fail "answers changed across the restart"
note "after restart" "gallery $AFTER entries (was $BEFORE); $r; same entries as before"
log "after restart: $r"

# ---------------------------------------------------------------- backup, down -v, restore
# The procedure of docs/deployment.md: pg_dump from the db service, erase everything, restore into a fresh
# stack, and the API (restarted, so it rebuilds its index from the database) answers as before.
STAGE=backup
t=$(now)
# shellcheck disable=SC2016  # $POSTGRES_USER / $POSTGRES_DB expand inside the db container
compose exec -T db sh -c 'pg_dump -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Fc' >"$WORK/gallery.dump" \
  || fail "pg_dump failed"
note "backup (pg_dump -Fc)" "$(stat -c %s "$WORK/gallery.dump") bytes in $(secs "$t" "$(now)") s"

STAGE="down -v"
t=$(now)
compose down -v >/dev/null 2>&1 || fail "docker compose down -v failed"
left=$(docker volume ls -q --filter "name=${COMPOSE_PROJECT_NAME}_" | wc -l)
[ "$left" = 0 ] || fail "$left volumes left after down -v"
dt_down=$(secs "$t" "$(now)")
dt=$(up)
code=$(http GET /gallery/stats "$WORK/s.json" -H "X-API-Key: $KEY")
EMPTY=$(json "$WORK/s.json" "d['entries']")
[ "$EMPTY" = 0 ] || fail "after down -v and up the gallery has $EMPTY entries, expected none"
note "down -v + up" "$dt_down s down (volumes removed), $dt s up: gallery empty"
log "down -v erased the gallery"

STAGE=restore
t=$(now)
compose stop api >/dev/null 2>&1 || fail "could not stop api"
# shellcheck disable=SC2016
compose exec -T db sh -c 'pg_restore -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists --no-owner' \
  <"$WORK/gallery.dump" || fail "pg_restore failed"
dt=$(up)
r=$(query_all "after restore" "$WORK/restored.txt")
cmp -s <(cut -d' ' -f1,2 "$WORK/before.txt") <(cut -d' ' -f1,2 "$WORK/restored.txt") || fail "answers changed across backup/restore"
note "restore (pg_restore)" "$(secs "$t" "$(now)") s incl. api restart ($dt s); $r; same entries"
log "restored from the dump: $r"

t=$(now)
compose down -v >/dev/null 2>&1 || fail "docker compose down -v failed"
[ "$(docker volume ls -q --filter "name=${COMPOSE_PROJECT_NAME}_" | wc -l)" = 0 ] || fail "volumes left after the final down -v"
note "final down -v" "$(secs "$t" "$(now)") s"

STAGE=finished
echo
echo "smoke summary"
printf '%s\n' "${SUMMARY[@]}"
printf '  %-24s %s s\n' "total" "$(secs "$T0" "$(now)")"
echo "SMOKE PASSED"
