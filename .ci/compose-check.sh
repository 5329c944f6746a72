#!/usr/bin/env bash
# Validates docker-compose.yml with whatever Compose implementation is installed; skips (exit 0) when there
# is none. Exits non-zero only when the file is invalid. Needs no Docker daemon and no .env.
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

# The compose file requires a database password; a placeholder stands in for a real .env here.
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-compose-check}"
if "${compose[@]}" -f docker-compose.yml config -q; then
  echo "compose-check: docker-compose.yml is valid ($("${compose[@]}" version --short 2>/dev/null || echo "${compose[*]}"))"
else
  echo "compose-check: docker-compose.yml is INVALID" >&2
  exit 1
fi
