#!/usr/bin/env bash
# End-to-end check of the Docker deployment: build the image (no torch: the bundles' ONNX graphs on ONNX
# Runtime), check its size and that torch is absent, start api + PostgreSQL with docker compose and the
# database password it generates (no POSTGRES_PASSWORD, as without a .env), time the API's cold start
# (container start to /readyz 200), check /docs loads its assets from the service, enroll crops through the
# API with an API key, query them back, restart the stack (down + up) and check the gallery and the
# password survived, back it up with pg_dump, erase everything (down -v: the gallery is gone, a new
# password), restore the dump into the fresh stack and query again, then down -v. Prints timings; exits
# non-zero on any failure.
#
#   docker/smoke.sh                    build and test (about 2 minutes here; the build downloads ~85 MB of wheels)
#   SMOKE_NO_BUILD=1 docker/smoke.sh   reuse the image already tagged $API_IMAGE
#   SMOKE_NO_CACHE=1 docker/smoke.sh   build from scratch (to time a cold build)
#
# Needs on the host: docker with the compose plugin, bash, curl, tar, and python3's standard library (JSON,
# arithmetic; no packages, no virtual environment). The bundles are the shipped ones (models_store/attributes
# and models_store/reid, each with its model.onnx); the test crops (tests/synthetic.py) are drawn inside the
# built image, which has numpy and Pillow.
# Settings (environment): API_IMAGE (default reid-stack:smoke), API_PORT (default: a free port),
# SMOKE_IDENTITIES (default 4), SMOKE_MAX_COLD_START (seconds: fail when a cold start takes longer; default
# unset, report only), PYPI_INDEX_URL (build: a package index mirror).
# It runs as its own compose project (reid-smoke) with its own volumes: a stack started from this
# repository with plain `docker compose up` is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${SMOKE_PROJECT:-reid-smoke}
N_IDS=${SMOKE_IDENTITIES:-4}
WORK=$(mktemp -d)
T0=$(date +%s.%N)
SUMMARY=()
COLD_STARTS=()
STAGE=setup

now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
log() { printf '[%6ss] %s\n' "$(secs "$T0" "$(now)")" "$*"; }
note() { SUMMARY+=("$(printf '  %-24s %s' "$1" "$2")"); }
fail() { echo "SMOKE FAILED ($STAGE): $*" >&2; exit 1; }
compose() { docker compose -f docker-compose.yml --env-file "$WORK/smoke.env" "$@"; }
json() {  # json FILE PYTHON_EXPR  (the parsed document is `d`)
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}

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

command -v curl >/dev/null || fail "curl is not installed"
command -v python3 >/dev/null || fail "python3 (its standard library only) is needed for JSON and arithmetic"

STAGE=bundles
MODELS_DIR=models_store
for b in attributes reid; do
  [ -f "$MODELS_DIR/$b/manifest.json" ] || fail "$MODELS_DIR/$b/manifest.json is missing: the image bakes the shipped bundles"
  graph=$(json "$MODELS_DIR/$b/manifest.json" "(d.get('onnx') or {}).get('file', '')")
  if [ -z "$graph" ] || [ ! -f "$MODELS_DIR/$b/$graph" ]; then
    fail "$MODELS_DIR/$b has no ONNX graph (the image has no torch): reid-train add-onnx $MODELS_DIR/$b"
  fi
done
note "bundles" "$MODELS_DIR/attributes ($(json "$MODELS_DIR/attributes/manifest.json" "d['name']")), $MODELS_DIR/reid ($(json "$MODELS_DIR/reid/manifest.json" "d['name']")), ONNX graphs"

STAGE=settings
KEY="smoke-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
PORT=${API_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
API_IMAGE=${API_IMAGE:-reid-stack:smoke}
# Only these reach compose (not a .env of this checkout); shell variables of the same names win, so the
# ones that would point the stack elsewhere, or set the password the stack should generate, are unset.
unset REID_DATABASE_URL REID_DATABASE_PASSWORD_FILE POSTGRES_USER POSTGRES_DB POSTGRES_PASSWORD
cat >"$WORK/smoke.env" <<EOF
REID_API_KEYS=$KEY
API_PORT=$PORT
API_IMAGE=$API_IMAGE
BUILD_MODELS_DIR=$MODELS_DIR
EOF
if [ -n "${PYPI_INDEX_URL:-}" ]; then echo "PYPI_INDEX_URL=$PYPI_INDEX_URL" >>"$WORK/smoke.env"; fi
# Left from an older .env or shell: the image has no torch, and the thread setting keeps its default.
unset REID_RUNTIME REID_INTRA_OP_THREADS REID_TORCH_THREADS
export API_PORT=$PORT API_IMAGE BUILD_MODELS_DIR=$MODELS_DIR REID_API_KEYS=$KEY
BASE=http://127.0.0.1:$PORT
compose config -q || fail "docker-compose.yml is invalid"

# ---------------------------------------------------------------- build
STAGE=build
if [ -n "${SMOKE_NO_BUILD:-}" ]; then
  docker image inspect "$API_IMAGE" >/dev/null 2>&1 || fail "SMOKE_NO_BUILD is set but there is no image $API_IMAGE"
  note "build" "skipped (SMOKE_NO_BUILD), image $API_IMAGE"
else
  log "building $API_IMAGE ..."
  t=$(now)
  compose build ${SMOKE_NO_CACHE:+--no-cache} api >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "image build failed"; }
  note "build" "$(secs "$t" "$(now)") s"
  # The Dockerfile's self-tests print what was installed and which bundles loaded.
  grep -hoE '(onnxruntime [0-9].*|bundles: .*)$' "$WORK/build.log" | sed 's/^/  built: /' || true
fi
SIZE=$(docker image inspect -f '{{.Size}}' "$API_IMAGE")
note "image" "$API_IMAGE, $SIZE bytes = $(python3 -c "print(f'{$SIZE / 1e6:.0f} MB ({$SIZE / 2**20:.0f} MiB)')")"
log "image $API_IMAGE: $SIZE bytes"
python3 -c "import sys; sys.exit($SIZE > 1e9)" || log "WARNING: the image is over the 1 GB target"

STAGE="image contents"
# Nothing of torch in the image; ONNX Runtime, FAISS and the app import as the service's user.
docker run --rm --network none "$API_IMAGE" python -c "import importlib.util; \
assert importlib.util.find_spec('torch') is None, 'torch is installed'; \
import onnxruntime, faiss, app.main; print('onnxruntime', onnxruntime.__version__)" >"$WORK/contents.txt" 2>&1 \
  || { cat "$WORK/contents.txt" >&2; fail "the image's Python environment is not the service's"; }
note "image contents" "no torch; $(tail -1 "$WORK/contents.txt"); user $(docker image inspect -f '{{.Config.User}}' "$API_IMAGE")"

STAGE="test crops"
# Synthetic pedestrian crops (tests/synthetic.py), drawn inside the image (numpy, Pillow and
# app.attribute_schema are there): one per identity from camera 1 to enroll, one from camera 2 as a second
# view. The module and a driver go in on stdin, a tar of JPEGs comes out on stdout: no bind mount, no host
# Python packages.
mkdir -p "$WORK/crops"
{ cat tests/synthetic.py; cat <<'EOF'

# --- docker/smoke.sh: write the crops as a tar to stdout
import io
import sys
import tarfile

n = int(sys.argv[1])
rng = np.random.default_rng(42)
with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
    for person in make_identities(n, seed=42, first_pid=101):
        for cam in (1, 2):
            buf = io.BytesIO()
            render(person, cam, rng, size=(128, 64)).save(buf, format="JPEG", quality=90)
            info = tarfile.TarInfo(f"p{person.pid}_c{cam}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
EOF
} | docker run --rm -i --network none "$API_IMAGE" python - "$N_IDS" | tar -x -C "$WORK/crops" \
  || fail "could not draw the test crops in the image"
mapfile -t ENROLL < <(ls "$WORK"/crops/*_c1.jpg)
[ "${#ENROLL[@]}" -eq "$N_IDS" ] || fail "expected $N_IDS test crops, got ${#ENROLL[@]}"

# ---------------------------------------------------------------- helpers
http() {  # http METHOD PATH OUTFILE [curl args...] -> prints the status code
  local method=$1 path=$2 out=$3
  shift 3
  curl -sS -o "$out" -w '%{http_code}' -X "$method" "$@" "$BASE$path" || true
}
up() {  # start db, then api; prints "COLD FROM_UP HEALTHY": the API's cold start, container start to the
  # first 200 from /readyz (polled every 0.1 s), the same from `compose up -d api`, and the seconds from
  # this call until both compose healthchecks report healthy (api's checks /readyz every 10 s, so this one
  # is about db + 10 s whatever the cold start).
  local t t_api started ready deadline
  t=$(now)
  compose up -d --no-build --wait --wait-timeout 120 db >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log" >&2; fail "the database did not become healthy"; }
  t_api=$(now)
  compose up -d --no-build api >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "the api did not start"; }
  deadline=$(python3 -c "print($t_api + 120)")
  until [ "$(http GET /readyz "$WORK/ready.json" --max-time 2 2>/dev/null)" = 200 ]; do
    python3 -c "import sys; sys.exit($(now) > $deadline)" \
      || fail "/readyz did not answer 200 within 120 s of the api's start"
    sleep 0.1
  done
  ready=$(now)
  started=$(date -d "$(docker inspect -f '{{.State.StartedAt}}' "$(compose ps -q api)")" +%s.%N)
  compose up -d --no-build --wait --wait-timeout 300 >>"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log" >&2; fail "the stack did not become healthy"; }
  code=$(http GET /readyz "$WORK/ready.json")
  [ "$code" = 200 ] || fail "/readyz answered $code after the healthchecks passed"
  echo "$(secs "$started" "$ready") $(secs "$t_api" "$ready") $(secs "$t" "$(now)")"
}
cold_note() {  # cold_note LABEL "COLD FROM_UP HEALTHY" [MORE] -> a summary line, and the target check
  local cold from_up healthy
  read -r cold from_up healthy <<<"$2"
  COLD_STARTS+=("$cold")
  note "$1" "api cold start $cold s (container start -> /readyz 200; $from_up s from 'up -d api'), both healthy after $healthy s${3:+; $3}"
  if [ -n "${SMOKE_MAX_COLD_START:-}" ]; then
    python3 -c "import sys; sys.exit($cold > $SMOKE_MAX_COLD_START)" \
      || fail "cold start $cold s is over SMOKE_MAX_COLD_START=$SMOKE_MAX_COLD_START s"
  fi
}
query_all() {  # query every enrolled crop; checks it comes back first; writes "crop entry_id score" lines
  local label=$1 out=$2 t n=0 dt
  t=$(now)
  : >"$out"
  for crop in "${ENROLL[@]}"; do
    name=$(basename "$crop" _c1.jpg)
    code=$(http POST /reid/query "$WORK/q.json" -H "X-API-Key: $KEY" -F "image=@$crop;type=image/jpeg" -F top_k=3 -F collection=smoke)
    [ "$code" = 200 ] || fail "$label: query $name answered $code: $(cat "$WORK/q.json")"
    read -r ident entry matched < <(json "$WORK/q.json" "d['matches'][0]['identity'], d['matches'][0]['entry_id'], d['matches'][0]['is_match']")
    [ "$ident" = "$name" ] || fail "$label: query $name came back as $ident first"
    [ "$entry" = "${ENTRY[$name]}" ] || fail "$label: query $name matched entry $entry, enrolled as ${ENTRY[$name]}"
    [ "$matched" = True ] || fail "$label: query $name: its own crop is not a match (is_match false)"
    # the default path's score blends in the entry's neighbourhood; the plain cosine of the same crop
    # says whether the image round trip (decode, resize, embed) is exact
    code=$(http POST /reid/query "$WORK/q.json" -H "X-API-Key: $KEY" -F "image=@$crop;type=image/jpeg" -F top_k=1 -F collection=smoke -F query_expansion=false)
    [ "$code" = 200 ] || fail "$label: plain query $name answered $code: $(cat "$WORK/q.json")"
    read -r entry score < <(json "$WORK/q.json" "d['matches'][0]['entry_id'], d['matches'][0]['score']")
    [ "$entry" = "${ENTRY[$name]}" ] || fail "$label: plain query $name matched entry $entry, enrolled as ${ENTRY[$name]}"
    python3 -c "import sys; sys.exit(float(sys.argv[1]) < 0.99)" "$score" || fail "$label: own-crop cosine $score < 0.99"
    echo "$name $entry $score" >>"$out"
    n=$((n + 1))
  done
  dt=$(secs "$t" "$(now)")
  echo "$n/${#ENROLL[@]} own crops top-1 and a match (cosine >= 0.99), $(python3 -c "print(f'{500 * $dt / $n:.0f}')") ms/query incl. curl"
}
second_view() {  # the camera-2 crop of each identity: informational (synthetic crops, not Market-1501)
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
r=$(up)
cold_note "first up (fresh volumes)" "$r"
log "up (fresh volumes: initdb, schema, model load): $r"
READY_LINE=$(compose logs --no-color api 2>&1 | grep -m1 -oE 'ready: .*' || true)
[ -n "$READY_LINE" ] || fail "the api logged no 'ready:' line"
[[ "$READY_LINE" == *" on onnx, "*" on onnx, "* ]] || fail "the bundles do not both run on ONNX Runtime: $READY_LINE"
note "api log" "$READY_LINE"

STAGE=password
# Generated by the db-password service on fresh volumes; the api's configured environment holds the file's
# path, not the password. Its digest is compared after the restarts below.
compose logs --no-color db-password 2>&1 | grep -q 'generated the database password' \
  || fail "the db-password service did not generate a password on fresh volumes"
API_ENV=$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$(compose ps -q api)")
grep -qxE 'REID_DATABASE_URL=postgresql\+psycopg://[^:@]+@db:5432/.*' <<<"$API_ENV" \
  || fail "the api's database URL is not the default without a password: $(grep REID_DATABASE_URL <<<"$API_ENV" \
    | sed 's/:[^:@]*@/:***@/')"
password_digest() {  # mode, owner, size and sha256 of the password file, as the api's user reads it
  # shellcheck disable=SC2016  # $f expands inside the api container
  compose exec -T api sh -c 'f=/run/reid-secrets/postgres-password; stat -c "%a %u:%g %s" "$f" && sha256sum <"$f"'
}
PW_FIRST=$(password_digest) || fail "the api cannot read the password file"
[[ "$PW_FIRST" == "440 0:10001 64"* ]] || fail "password file: $(head -1 <<<"$PW_FIRST"), expected mode 440, root:10001, 64 bytes"
note "database password" "generated on first up (64 hex digits, mode 0440 root:10001), not in the api's environment"

STAGE=docs
# /docs must load from the service itself (offline networks): every src/href local and answering 200.
code=$(http GET /docs "$WORK/docs.html")
[ "$code" = 200 ] || fail "/docs answered $code"
mapfile -t ASSETS < <(grep -oE '(src|href)="[^"]*"' "$WORK/docs.html" | sed -E 's/^[a-z]+="(.*)"$/\1/')
[ "${#ASSETS[@]}" -gt 0 ] || fail "/docs names no assets"
for url in "${ASSETS[@]}"; do
  [[ "$url" == /* && "$url" != //* ]] || fail "/docs loads $url from outside the service"
  code=$(http GET "$url" /dev/null)
  [ "$code" = 200 ] || fail "/docs asset $url answered $code"
done
note "API docs" "/docs and its ${#ASSETS[@]} assets from the service: $(printf '%s ' "${ASSETS[@]}")"

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
[ "$(docker volume ls -q --filter "name=${COMPOSE_PROJECT_NAME}_" | wc -l)" -ge 3 ] || fail "volumes vanished on down"
r=$(up)
[ "$(password_digest)" = "$PW_FIRST" ] || fail "the database password changed across down + up"
cold_note "down + up" "$r" "down took $dt_down s; same password"
log "restarted: down $dt_down s, up: $r"

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
r=$(up)
code=$(http GET /gallery/stats "$WORK/s.json" -H "X-API-Key: $KEY")
EMPTY=$(json "$WORK/s.json" "d['entries']")
[ "$EMPTY" = 0 ] || fail "after down -v and up the gallery has $EMPTY entries, expected none"
[ "$(password_digest)" != "$PW_FIRST" ] || fail "down -v kept the database password"
cold_note "down -v + up" "$r" "down -v took $dt_down s (volumes removed); gallery empty, a new password"
log "down -v erased the gallery"

STAGE=restore
t=$(now)
compose stop api >/dev/null 2>&1 || fail "could not stop api"
# shellcheck disable=SC2016
compose exec -T db sh -c 'pg_restore -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists --no-owner' \
  <"$WORK/gallery.dump" || fail "pg_restore failed"
u=$(up)
dt=$(secs "$t" "$(now)")
r=$(query_all "after restore" "$WORK/restored.txt")
cmp -s <(cut -d' ' -f1,2 "$WORK/before.txt") <(cut -d' ' -f1,2 "$WORK/restored.txt") || fail "answers changed across backup/restore"
cold_note "restore + api start" "$u"
note "restore (pg_restore)" "$dt s incl. the api's restart; $r; same entries"
log "restored from the dump: $r"

t=$(now)
compose down -v >/dev/null 2>&1 || fail "docker compose down -v failed"
[ "$(docker volume ls -q --filter "name=${COMPOSE_PROJECT_NAME}_" | wc -l)" = 0 ] || fail "volumes left after the final down -v"
note "final down -v" "$(secs "$t" "$(now)") s"

STAGE=finished
echo
echo "smoke summary"
note "api cold starts" "$(printf '%s s, ' "${COLD_STARTS[@]}")max $(printf '%s\n' "${COLD_STARTS[@]}" | sort -g | tail -1) s (target <= 10 s)"
printf '%s\n' "${SUMMARY[@]}"
printf '  %-24s %s s\n' "total" "$(secs "$T0" "$(now)")"
echo "SMOKE PASSED"
