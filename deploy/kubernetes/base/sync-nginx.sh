#!/bin/sh
# Copies Herald's nginx files (../../../nginx, the ones Compose mounts) into
# this base: kustomize reads no file outside the kustomization's directory.
# tests/deploy fails while a copy differs from its original: run this then.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../../../nginx"
rm -rf "$here/nginx"
mkdir -p "$here/nginx/templates" "$here/nginx/html/css" "$here/nginx/html/js"
cp "$src/entrypoint.sh" "$src/nginx.conf" "$here/nginx/"
cp "$src"/templates/*.template "$here/nginx/templates/"
cp "$src/html/index.html" "$src/html/herald.js" "$here/nginx/html/"
cp "$src/html/css/app.css" "$here/nginx/html/css/"
cp "$src/html/js/app.js" "$here/nginx/html/js/"
