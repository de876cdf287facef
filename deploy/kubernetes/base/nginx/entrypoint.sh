#!/bin/sh
# Herald's wrapper around the nginx image's own entrypoint (compose.yaml runs it
# as the container's entrypoint, with the image's usual command). It works the
# same in front of the official image's /docker-entrypoint.sh and the local
# stand-in's (scripts/local-images/nginx-entrypoint.sh), which then render the
# templates and exec nginx, so nginx still ends up as PID 1 and gets
# `docker stop`'s SIGQUIT itself.
#
# 1. REAL_IP_FROM (trusted proxy ranges, comma or space separated) becomes the
#    real_ip directives in HERALD_REAL_IP, which herald.conf.template reads
#    (empty: nginx trusts no X-Forwarded-For, the default).
# 2. CORS_ALLOWED_ORIGINS becomes the map entries in HERALD_CORS_ORIGINS, so
#    that nginx's own JSON errors carry CORS headers for those origins.
# 3. NGINX_RESOLVER and NGINX_SERVICE_DOMAIN become HERALD_RESOLVER and
#    HERALD_SERVICE_DOMAIN: the DNS server nginx asks for the services' names,
#    and a suffix for those names (nginx's resolver applies no search domains).
#    Unset (Compose): Docker's DNS, 127.0.0.11, and no suffix. `auto` (the
#    Kubernetes manifests, deploy/kubernetes): the nameservers and the first
#    search domain of /etc/resolv.conf, i.e. the cluster DNS and
#    <namespace>.svc.<cluster domain>.
# 4. STREAM_TRANSPORT and STREAM_SLOTS become HERALD_STREAM_TARGET and
#    HERALD_STREAM_SERVERS: where /stream and /history go. `unix` (the
#    default): the upstream herald_streams, STREAM_SLOTS Unix sockets
#    (/run/herald/stream-<n>.sock) on the volume nginx shares with the stream
#    replicas of its host, each replica serving the first free one
#    (stream-service/stream/slots.py). `tcp`: the stream service's name on
#    port 8000, looked up through the resolver at request time (the hop across
#    the container network, as before; docs/benchmark.md compares the two).
# 5. HERALD_TLS, TLS_REDIRECT and HERALD_TLS_PORT become HERALD_TLS_LISTEN,
#    HERALD_TLS_REDIRECT and HERALD_HSTS: HTTPS with HTTP/2 on port 443 when
#    nginx has a certificate and its key (/etc/nginx/tls/cert.pem and key.pem,
#    which compose.yaml mounts from TLS_CERT_FILE and TLS_KEY_FILE; docs/tls.md).
#    HERALD_TLS=auto (the default): on when both files are there and not
#    empty (Compose mounts /dev/null for an unset one), off when neither is;
#    `on` insists on them, `off` ignores them. Off, nothing is rendered and
#    the front door is plain HTTP/1.1 on port 80 only, as without this step.
#    HTTP/2 is `http2 on;` from nginx 1.25.1 and `listen ... http2` before
#    (the local stand-in's Debian nginx is 1.22): `nginx -v` says which.
# 6. nginx's stderr (its error log) goes through a filter that cuts the query
#    string out of every line: the error log prints the whole request line
#    (and the upstream URL, and the referrer) on refused streams, upstream
#    errors and bad requests, and its format cannot be changed, while
#    subscribe tokens travel as ?token= (EventSource cannot send headers).
#    nginx's access log (stdout) has its own redaction (herald.conf.template).
set -eu

die() { echo "herald-nginx: $*" >&2; exit 1; }

# --- 1. REAL_IP_FROM -> HERALD_REAL_IP ----------------------------------------
real_ip=""
set -f  # no globbing of the words below
for range in $(printf '%s' "${REAL_IP_FROM:-}" | tr ',' ' '); do
  # IPv4 or IPv6 address, optionally /prefix: nothing that could end a directive.
  printf '%s\n' "$range" | grep -Eqx '[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?' \
    || die "REAL_IP_FROM: '$range' is not an address or CIDR range (e.g. 10.0.0.0/8, 2001:db8::/32)"
  real_ip="${real_ip}set_real_ip_from $range; "
done
set +f
if [ -n "$real_ip" ]; then
  real_ip="${real_ip}real_ip_header X-Forwarded-For; real_ip_recursive on;"
fi
export HERALD_REAL_IP="$real_ip"

# --- 2. CORS_ALLOWED_ORIGINS -> HERALD_CORS_ORIGINS -----------------------------
# Entries of the map in herald.conf.template that decides which pages may read
# nginx's own errors: an exact origin is echoed back, `*` matches any other.
# Only scheme://host[:port] (or `*`) is rendered: nothing that could end a
# directive; anything else stops nginx with a clear message.
cors=""
set -f
for origin in $(printf '%s' "${CORS_ALLOWED_ORIGINS:-}" | tr ',' ' '); do
  if [ "$origin" = "*" ]; then
    cors="${cors}\"~.\" \"*\"; "
    continue
  fi
  printf '%s\n' "$origin" | grep -Eqx '[a-z][a-z0-9+.-]*://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?' \
    || die "CORS_ALLOWED_ORIGINS: '$origin' is not an origin (scheme://host[:port], e.g. https://app.example.com) or *"
  cors="${cors}\"$origin\" \$http_origin; "
done
set +f
export HERALD_CORS_ORIGINS="$cors"

# --- 3. NGINX_RESOLVER, NGINX_SERVICE_DOMAIN -> HERALD_RESOLVER, HERALD_SERVICE_DOMAIN
# (HERALD_RESOLV_CONF: another resolv.conf, for tests/deploy/test_nginx_dns.py.)
resolv_conf=${HERALD_RESOLV_CONF:-/etc/resolv.conf}
resolver=${NGINX_RESOLVER:-127.0.0.11}
if [ "$resolver" = auto ]; then
  # IPv6 nameservers in brackets, as nginx's resolver directive wants them.
  resolver=$(awk '$1 == "nameserver" { print ($2 ~ /:/ ? "[" $2 "]" : $2) }' "$resolv_conf" | tr '\n' ' ')
  [ -n "$resolver" ] || die "NGINX_RESOLVER=auto: no nameserver in $resolv_conf"
fi
printf '%s\n' "$resolver" | grep -Eqx '[][0-9A-Fa-f:. ]+' \
  || die "NGINX_RESOLVER: '$resolver' is not a list of addresses (or auto)"
export HERALD_RESOLVER="$resolver"
domain=${NGINX_SERVICE_DOMAIN:-}
if [ "$domain" = auto ]; then
  domain=$(awk '$1 == "search" { print $2; exit }' "$resolv_conf")
  [ -n "$domain" ] || die "NGINX_SERVICE_DOMAIN=auto: no search domain in $resolv_conf"
fi
domain=${domain#.}
if [ -n "$domain" ]; then
  printf '%s\n' "$domain" | grep -Eqx '[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*' \
    || die "NGINX_SERVICE_DOMAIN: '$domain' is not a DNS domain (or auto)"
  domain=".$domain"
fi
export HERALD_SERVICE_DOMAIN="$domain"

# --- 4. STREAM_TRANSPORT, STREAM_SLOTS -> HERALD_STREAM_TARGET, HERALD_STREAM_SERVERS
slots=${STREAM_SLOTS:-8}
printf '%s\n' "$slots" | grep -Eqx '[1-9][0-9]{0,2}' && [ "$slots" -le 256 ] \
  || die "STREAM_SLOTS: '$slots' is not a whole number from 1 to 256"
# One server per slot. A slot nobody serves is refused at once (no such file, or
# nobody listening) and skipped, as is a replica that answers 503 (full or
# stopping): nginx tries the next. max_fails=0: nginx keeps no memory of a
# failure. With it, a replica that answered one 503 (a reconnect storm, a Redis
# hiccup) would get at most one new stream per fail_timeout until one of its
# streams ended, which for streams can be hours; the price is an empty slot
# tried again by each new stream that comes to it (a failed connect(), ~µs).
servers=""
n=1
while [ "$n" -le "$slots" ]; do
  servers="${servers}server unix:/run/herald/stream-$n.sock max_fails=0; "
  n=$((n + 1))
done
export HERALD_STREAM_SERVERS="$servers"
case "${STREAM_TRANSPORT:-unix}" in
  unix) export HERALD_STREAM_TARGET=herald_streams ;;
  tcp) export HERALD_STREAM_TARGET="stream-service${domain}:8000" ;;
  *) die "STREAM_TRANSPORT: '${STREAM_TRANSPORT}' is not unix or tcp" ;;
esac

# --- 5. HERALD_TLS, TLS_REDIRECT, HERALD_TLS_PORT -> HERALD_TLS_LISTEN, HERALD_TLS_REDIRECT, HERALD_HSTS
# (HERALD_TLS_DIR: another directory than /etc/nginx/tls, where the files are
# looked for and herald-tls.inc.template names them; for tests.)
tls_dir=${HERALD_TLS_DIR:-/etc/nginx/tls}
printf '%s\n' "$tls_dir" | grep -Eqx '/[A-Za-z0-9/._-]*' \
  || die "HERALD_TLS_DIR: '$tls_dir' is not an absolute path nginx can read safely"
export HERALD_TLS_DIR="$tls_dir"
tls_file() {  # $1 = path: 0 if a certificate or key is there, 1 if none is
  # A directory: Docker made one at the mount's source on the host, because
  # the file named there does not exist (a typo in TLS_CERT_FILE or TLS_KEY_FILE).
  [ ! -d "$1" ] || die "$1 is a directory: TLS_CERT_FILE and TLS_KEY_FILE must name existing files"
  [ -f "$1" ] && [ -s "$1" ] || return 1
  [ -r "$1" ] || die "$1 cannot be read"
}
tls=off
case "${HERALD_TLS:-auto}" in
  auto | on)
    have=""
    if tls_file "$tls_dir/cert.pem"; then have="${have}c"; fi
    if tls_file "$tls_dir/key.pem"; then have="${have}k"; fi
    case "$have" in
      ck) tls=on ;;
      c) die "TLS: a certificate but no key (set TLS_KEY_FILE too)" ;;
      k) die "TLS: a key but no certificate (set TLS_CERT_FILE too)" ;;
      *) [ "${HERALD_TLS:-auto}" = auto ] \
        || die "HERALD_TLS=on: no certificate and key in $tls_dir (set TLS_CERT_FILE and TLS_KEY_FILE)" ;;
    esac
    ;;
  off) ;;
  *) die "HERALD_TLS: '${HERALD_TLS}' is not auto, on or off" ;;
esac
case "${TLS_REDIRECT:-false}" in
  true | false) ;;
  *) die "TLS_REDIRECT: '${TLS_REDIRECT}' is not true or false" ;;
esac
tls_port=${HERALD_TLS_PORT:-8443}
printf '%s\n' "$tls_port" | grep -Eqx '[1-9][0-9]{0,4}' && [ "$tls_port" -le 65535 ] \
  || die "HERALD_TLS_PORT: '$tls_port' is not a port (1-65535)"
tls_listen=""
tls_redirect=""
hsts=""
if [ "$tls" = on ]; then
  # `nginx -v` prints e.g. "nginx version: nginx/1.28.0" (on stderr): 1028000.
  version=$(nginx -v 2>&1 | awk -F'[/.]' '/^nginx version: / && $2 ~ /^[0-9]+$/ { print $2 * 1000000 + $3 * 1000 + $4; exit }')
  [ -n "$version" ] || die "TLS: cannot tell nginx's version from 'nginx -v'"
  if [ "$version" -ge 1025001 ]; then
    tls_listen="listen 443 ssl default_server; http2 on;"
  else
    tls_listen="listen 443 ssl http2 default_server;"
  fi
  tls_listen="$tls_listen include /etc/nginx/conf.d/herald-tls.inc;"
  if [ "${TLS_REDIRECT:-false}" = true ]; then
    authority='$host'
    [ "$tls_port" = 443 ] || authority="\$host:$tls_port"
    tls_redirect="if (\$herald_to_https) { return 308 https://$authority\$request_uri; }"
    hsts="max-age=63072000"
  fi
elif [ "${TLS_REDIRECT:-false}" = true ]; then
  echo "herald-nginx: TLS_REDIRECT=true is ignored: TLS is off (no TLS_CERT_FILE, TLS_KEY_FILE)" >&2
fi
export HERALD_TLS_LISTEN="$tls_listen"
export HERALD_TLS_REDIRECT="$tls_redirect"
export HERALD_HSTS="$hsts"

# --- 6. nginx's stderr through the redacting filter ----------------------------
# Every query string (from '?' up to a space or quote) becomes '?[redacted]';
# a line that still names a token parameter after that (a request line with
# spaces or quotes in its query), however its name is percent-encoded, loses
# everything from its first '?'. Kept: time, level, pid, the message, the client
# address, server, method and path, the upstream's address and the host.
# Dropped: an empty stream slot refusing a connection (nginx then tries the
# next; "no live upstreams" still shows when none is left).
fifo_dir=$(mktemp -d /tmp/herald-nginx.XXXXXX)
mkfifo "$fifo_dir/stderr"
sed -u -E \
  -e '/connect\(\) to unix:\/run\/herald\/stream-[0-9]+\.sock failed \((2|111): /d' \
  -e 's/\?[^ "]*/?[redacted]/g' \
  -e '/(t|%74)(o|%6f)(k|%6b)(e|%65)(n|%6e)=/I s/\?.*$/?[redacted]/' \
  <"$fifo_dir/stderr" >&2 &
exec 2>"$fifo_dir/stderr"
rm -r "$fifo_dir"  # both ends are open: the pipe lives on without its name

# The image's own entrypoint (another one only in tests/unit/test_front_door_config.py and test_front_door_tls.py).
exec "${HERALD_IMAGE_ENTRYPOINT:-/docker-entrypoint.sh}" "$@"
