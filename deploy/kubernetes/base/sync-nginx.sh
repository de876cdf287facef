#!/bin/sh
# Copies Herald's nginx files (../../../nginx, the ones Compose mounts) and the
# browser client nginx serves at /herald.js (../../../clients/js/herald.js)
# into this base: kustomize reads no file outside the kustomization's directory.
# tests/deploy fails while a copy differs from its original: run this then.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../../../nginx"
rm -rf "$here/nginx" "$here/clients"
mkdir -p "$here/nginx/templates" "$here/nginx/html/css" "$here/nginx/html/js" "$here/clients/js"
cp "$src/entrypoint.sh" "$src/nginx.conf" "$here/nginx/"
cp "$src"/templates/*.template "$here/nginx/templates/"
cp "$src/html/index.html" "$here/nginx/html/"
cp "$src/html/css/app.css" "$here/nginx/html/css/"
cp "$src/html/js/app.js" "$here/nginx/html/js/"
cp "$here/../../../clients/js/herald.js" "$here/clients/js/"
