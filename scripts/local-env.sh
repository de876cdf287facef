#!/usr/bin/env bash
# Print the variables that point Compose at the local stand-in images built by
# scripts/build-local-images.sh, for air-gapped hosts:
#
#   eval "$(scripts/local-env.sh)" && docker compose up --build --wait
#
# The services' wheels/ dirs must hold the wheelhouses (scripts/compose-local.sh
# does all of this in one go).
set -euo pipefail
PREFIX=${LOCAL_IMAGE_PREFIX:-herald-local}
SUITE=${SUITE:-bookworm}
echo "export PYTHON_IMAGE=$PREFIX/python:$SUITE"
echo "export REDIS_IMAGE=$PREFIX/redis:$SUITE"
echo "export NGINX_IMAGE=$PREFIX/nginx:$SUITE"
echo "export PIP_INDEX_ARGS=--no-index"
echo "export COMPOSE_BAKE=false"
echo "export NGINX_UPSTREAM_RESOLVE="
echo "export NGINX_WATCH_NAMES=publisher-service"
