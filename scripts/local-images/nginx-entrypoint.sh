#!/bin/sh
# Mimics the official nginx image: envsubst each /etc/nginx/templates/*.template
# into /etc/nginx/conf.d/<name>, substituting only variables that are defined.
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
exec "$@"
