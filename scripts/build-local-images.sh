#!/usr/bin/env bash
# Build local stand-ins for the official base images, for machines that cannot
# pull from a container registry (air-gapped hosts, this project's CI).
#
# One Debian root (debootstrap) with Python 3, redis-server and nginx is brought
# in with `docker import`; three thin images on top of it mimic what Herald uses
# of python:3.12-slim, redis and nginx (including the nginx image's envsubst
# rendering of /etc/nginx/templates). Then point Compose at them:
#
#   PYTHON_IMAGE=herald-local/python:bookworm \
#   REDIS_IMAGE=herald-local/redis:bookworm \
#   NGINX_IMAGE=herald-local/nginx:bookworm docker compose up
#
# scripts/local-env.sh prints exactly those variables.
# Needs root (debootstrap), Docker, and a reachable Debian mirror (MIRROR).
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PREFIX=${LOCAL_IMAGE_PREFIX:-herald-local}
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES=python3,python3-venv,redis-server,redis-tools,nginx,gettext-base,curl,ca-certificates

# The thin images are rebuilt whenever their recipe (local-images/) changes.
RECIPE=$(cat "$HERE"/local-images/* | sha256sum | cut -c1-16)
current() {  # true if all three images exist and were built from this recipe
  local role
  for role in python redis nginx; do
    [ "$(docker image inspect -f '{{index .Config.Labels "herald.recipe"}}' "$PREFIX/$role:$SUITE" 2>/dev/null)" = "$RECIPE" ] \
      || return 1
  done
}
if [ "${FORCE:-0}" != 1 ] && current; then
  echo "local images $PREFIX/{python,redis,nginx}:$SUITE are up to date (FORCE=1 rebuilds)"
  exit 0
fi

if ! docker image inspect "$PREFIX/base:$SUITE" >/dev/null 2>&1 || [ "${FORCE:-0}" = 1 ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d /tmp/herald-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE into $root (a few minutes)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >/tmp/herald-debootstrap.log 2>&1 \
    || { tail -20 /tmp/herald-debootstrap.log >&2; exit 1; }
  # Slim it down: no apt lists, docs or caches in the image.
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  # Debian's packages enable services and a default site; containers need neither.
  rm -f "$root"/etc/nginx/sites-enabled/default
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$PREFIX/base:$SUITE"
fi

for role in python redis nginx; do
  docker build -q --build-arg "BASE=$PREFIX/base:$SUITE" --label "herald.recipe=$RECIPE" -t "$PREFIX/$role:$SUITE" \
    -f "$HERE/local-images/$role.Dockerfile" "$HERE/local-images"
done
echo "built $PREFIX/{python,redis,nginx}:$SUITE"
