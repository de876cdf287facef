#!/bin/sh
# A certificate for trying Herald's HTTPS and HTTP/2 on this machine
# (docs/tls.md): a local certificate authority, and a certificate it signs for
# localhost, 127.0.0.1 and ::1, made with openssl (>= 1.1.1) into DIR
# (default ./.dev-cert):
#
#   scripts/dev-cert.sh [DIR] >>.env     # then: docker compose up -d
#
#   DIR/ca.pem       the CA's certificate: what clients must trust
#                    (curl --cacert DIR/ca.pem, or your browser's or system's store)
#   DIR/ca-key.pem   the CA's key (never leaves DIR; mode 600)
#   DIR/cert.pem     the server's certificate  -> TLS_CERT_FILE
#   DIR/key.pem      its key (mode 600)         -> TLS_KEY_FILE
#
# Prints the settings for .env on stdout (comments and KEY=value lines, the
# paths absolute); how to trust the CA goes to stderr. Idempotent: files that
# are there and valid for at least 30 more days are kept, so a second run
# prints the same and changes nothing; a missing, mismatched or expiring
# certificate is made again (and the CA, if it is the one at fault). For
# development only: anyone with DIR/ca-key.pem can make certificates this
# machine's browsers would accept once the CA is trusted.
set -eu

die() { echo "dev-cert: $*" >&2; exit 1; }
command -v openssl >/dev/null || die "openssl is not installed"

dir=${1:-./.dev-cert}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cd "$dir"
# The directory keeps itself out of git (keys must never be committed).
[ -f .gitignore ] || printf '*\n' >.gitignore

keep_days=30
valid_for() {  # $1 = certificate: true if it exists and is valid for $keep_days more days
  [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend $((keep_days * 86400)) >/dev/null 2>&1
}
matches() {  # $1 = certificate, $2 = key: true if the key is the certificate's
  [ -s "$2" ] || return 1
  a=$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null) || return 1
  b=$(openssl pkey -in "$2" -pubout 2>/dev/null) || return 1
  [ "$a" = "$b" ]
}
new_key() {  # $1 = file: an EC P-256 key, readable by its owner only
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.tmp" 2>/dev/null) \
    || die "openssl genpkey failed"
  mv "$1.tmp" "$1"
}

if ! valid_for ca.pem || ! matches ca.pem ca-key.pem; then
  echo "dev-cert: making a new local CA in $dir" >&2
  new_key ca-key.pem
  openssl req -x509 -new -key ca-key.pem -out ca.pem.tmp -days 3650 -sha256 \
    -subj "/O=Herald development/CN=Herald development CA $(hostname 2>/dev/null || echo local)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" >/dev/null 2>&1 \
    || die "openssl req (the CA) failed; openssl >= 1.1.1 is needed"
  mv ca.pem.tmp ca.pem
  rm -f cert.pem  # signed by the old CA
fi

if ! valid_for cert.pem || ! matches cert.pem key.pem \
  || ! openssl verify -CAfile ca.pem cert.pem >/dev/null 2>&1; then
  echo "dev-cert: making a new certificate for localhost, 127.0.0.1 and ::1 in $dir" >&2
  new_key key.pem
  cat >cert.ext <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  openssl req -new -key key.pem -subj "/O=Herald development/CN=localhost" -out cert.csr 2>/dev/null \
    || die "openssl req (the certificate's request) failed"
  # 397 days: under the 398 browsers allow a server certificate.
  openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 16)" \
    -days 397 -sha256 -extfile cert.ext -out cert.pem.tmp 2>/dev/null \
    || die "openssl x509 (signing the certificate) failed"
  mv cert.pem.tmp cert.pem
  rm -f cert.csr cert.ext
fi
chmod 600 ca-key.pem key.pem
chmod 644 ca.pem cert.pem

# The SHA-256 of the certificate's public key (SPKI), base64: what Chromium's
# --ignore-certificate-errors-spki-list takes.
spki=$(openssl x509 -in cert.pem -noout -pubkey | openssl pkey -pubin -outform der \
  | openssl dgst -sha256 -binary | openssl base64 -A)

cat <<EOF
# HTTPS with HTTP/2 on HERALD_TLS_PORT (8443 by default): scripts/dev-cert.sh, docs/tls.md.
TLS_CERT_FILE=$dir/cert.pem
TLS_KEY_FILE=$dir/key.pem
EOF
cat >&2 <<EOF
dev-cert: clients must trust $dir/ca.pem, e.g.
  curl --http2 --cacert $dir/ca.pem https://localhost:8443/healthz
  Firefox: Settings > Privacy & Security > Certificates > Import (trust for websites)
  Chromium/Chrome on Linux: certutil -d sql:\$HOME/.pki/nssdb -A -t C,, -n herald-dev -i $dir/ca.pem
  or, for a test browser only: --ignore-certificate-errors-spki-list=$spki
EOF
