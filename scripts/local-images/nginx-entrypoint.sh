#!/bin/sh
# Mimics the official nginx image: envsubst each /etc/nginx/templates/*.template
# into /etc/nginx/conf.d/<name>, substituting only variables that are defined.
#
# Debian's nginx 1.22 has no `resolve` for names in upstream blocks (open source
# from 1.27.3, which the official image has). So that a publisher restarted with
# a new address is still found, this stand-in reloads nginx whenever Docker's DNS
# answers for the names in NGINX_WATCH_NAMES change (checked every 2 s).
set -eu
templates=/etc/nginx/templates
out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
if [ -d "$templates" ]; then
  defined=$(printf '${%s} ' $(env | cut -d= -f1))
  for t in "$templates"/*.template; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .template)
    envsubst "$defined" <"$t" >"$out/$name"
  done
fi

addresses() {
  for name in $NGINX_WATCH_NAMES; do getent ahostsv4 "$name" | awk '{print $1}'; done | sort -u | tr '\n' ' '
}

if [ -n "${NGINX_WATCH_NAMES:-}" ]; then
  (
    last=$(addresses)
    while sleep 2; do
      now=$(addresses)
      if [ -n "$now" ] && [ "$now" != "$last" ]; then
        echo "nginx-entrypoint: addresses of $NGINX_WATCH_NAMES changed ($last-> $now): reloading" >&2
        nginx -s reload || true
        last=$now
      fi
    done
  ) &
fi
exec "$@"
