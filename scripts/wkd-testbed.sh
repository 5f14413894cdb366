#!/usr/bin/env bash
# The WKD/WKS/HKP test bed: lets Debian's own gpg, dirmngr, gpg-wks-client, curl and sq find keys
# for example.net and acme.net at a kst `[web]` listener on this machine, by name, on port 443.
#
# Why a private resolver view, and why no network namespace:
#   gpg's WKD look-ups (dirmngr) resolve names through /etc/hosts and resolv.conf, which cannot
#   name a port, and both WKD methods use https on port 443. The machine's own /etc/hosts and
#   resolv.conf must stay untouched. `ip netns exec NS` gives a command its own view by
#   bind-mounting /etc/netns/NS/{hosts,resolv.conf} in a new mount namespace, but it also moves
#   the command into another network namespace, whose loopback cannot reach kst in the root
#   namespace (kst needs PostgreSQL, Redis and Postfix's LMTP there), short of a veth pair with
#   private-range addresses, which this workplace does not allow. So the test bed does only the
#   mount half: `run` starts a command in a new mount namespace (`unshare -m`, propagation
#   private) with this test bed's hosts and resolv.conf bind-mounted over /etc/hosts and
#   /etc/resolv.conf. The command stays in the root network namespace; example.net,
#   openpgpkey.example.net, acme.net and openpgpkey.acme.net resolve to a loopback address
#   (KST_WKD_ADDR, default 127.1.0.1) where kst's `[web]` listens on port 443. Each caller may
#   pass its own hosts file (`run --hosts FILE`) to point the names at its own 127.x.y.z, so
#   tests running in parallel never share a listener. resolv.conf names 127.0.0.1, where no DNS
#   server listens: a name not in the hosts file fails at once and no query leaves the machine
#   (the machine's own resolver is not loopback).
#   dirmngr (GnuPG 2.2, its own resolver) reads /etc/hosts first, then resolv.conf; gpg starts
#   dirmngr itself, so dirmngr inherits the mount namespace. Use a fresh GNUPGHOME per test (a
#   dirmngr already running for that home outside the view would be reused) and end it with
#   `gpgconf --kill all` inside the view.
#
# What `up` makes (idempotent; re-running keeps the CA and certificate while they are valid):
#   $KST_WKD_DIR/tls/ca.pem, ca.key          private test CA (ECDSA P-256), installed into the
#                                             system trust store as
#                                             /usr/local/share/ca-certificates/kst-testbed-wkd.crt
#   $KST_WKD_DIR/tls/server.pem, server.key  certificate (PEM, with the CA after it) and PKCS#8 key
#                                             for example.net, openpgpkey.example.net, acme.net,
#                                             openpgpkey.acme.net: kst's `[web]` TLS files
#   $KST_WKD_DIR/etc/hosts                   all four names -> KST_WKD_ADDR (both WKD methods)
#   $KST_WKD_DIR/etc/hosts.direct            without the openpgpkey.* names (direct method only)
#   $KST_WKD_DIR/etc/resolv.conf             nameserver 127.0.0.1 (no DNS: hosts file only)
#   $KST_WKD_DIR/env                         shell assignments of the above, for scripts
# and installs what is missing (calls are serialized with a lock, so parallel tests may all call
# `up`): gnupg, dirmngr, gpg-wks-client, curl, openssl, ca-certificates,
# util-linux (unshare), and Sequoia's sq when Debian has it (optional).
#
# Usage (as root):
#   scripts/wkd-testbed.sh up          make or check everything above; prints the env file
#   scripts/wkd-testbed.sh status      exit 0 when up, 1 when not; says what is missing
#   scripts/wkd-testbed.sh down        removes the CA from the trust store and the state dir
#   scripts/wkd-testbed.sh run [--hosts FILE] [--] COMMAND [ARG...]
#       runs COMMAND with the test bed's hosts (or FILE) and resolv.conf as /etc/hosts and
#       /etc/resolv.conf (Debian's `gpg-wks-client --send` cannot be captured: it was built
#       with no sendmail path and fails; use `--create -o FILE` and submit FILE, see the doc)
#   scripts/wkd-testbed.sh hosts ADDR [direct]
#       prints a hosts file pointing the names at ADDR (all four, or without openpgpkey.*)
# Environment: KST_WKD_DIR (/var/lib/kst-testbed/wkd), KST_WKD_ADDR (127.1.0.1).
# See docs/WKD-TESTBED.md for what the clients send and need.
set -euo pipefail

STATE="${KST_WKD_DIR:-/var/lib/kst-testbed/wkd}"
ADDR="${KST_WKD_ADDR:-127.1.0.1}"
TLS="$STATE/tls"
ETC="$STATE/etc"
TRUST=/usr/local/share/ca-certificates/kst-testbed-wkd.crt
NAMES=(example.net openpgpkey.example.net acme.net openpgpkey.acme.net)

log() { printf '== wkd-testbed: %s\n' "$*" >&2; }
die() {
  printf 'wkd-testbed: %s\n' "$*" >&2
  exit 1
}

ensure_tools() {
  local missing=()
  command -v gpg >/dev/null || missing+=(gnupg)
  command -v dirmngr >/dev/null || missing+=(dirmngr)
  [ -x /usr/lib/gnupg/gpg-wks-client ] || missing+=(gpg-wks-client)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v update-ca-certificates >/dev/null || missing+=(ca-certificates)
  command -v unshare >/dev/null || missing+=(util-linux)
  # Sequoia's sq (tests/wkd.rs): a client nobody here wrote, as gpg is.
  command -v sq >/dev/null || missing+=(sq)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# hosts_file ADDR [direct]: the test bed's hosts file for ADDR.
hosts_file() {
  local addr="$1" mode="${2:-}"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n'
  if [ "$mode" = direct ]; then
    printf '%s\texample.net acme.net\n' "$addr"
  else
    printf '%s\t%s\n' "$addr" "${NAMES[*]}"
  fi
}

# cert_ok: the server certificate exists, chains to the CA, names every host, lasts 2 more days.
cert_ok() {
  [ -s "$TLS/ca.pem" ] && [ -s "$TLS/ca.key" ] && [ -s "$TLS/server.pem" ] && [ -s "$TLS/server.key" ] || return 1
  openssl verify -CAfile "$TLS/ca.pem" "$TLS/server.pem" >/dev/null 2>&1 || return 1
  openssl x509 -in "$TLS/server.pem" -noout -checkend 172800 >/dev/null 2>&1 || return 1
  openssl x509 -in "$TLS/ca.pem" -noout -checkend 172800 >/dev/null 2>&1 || return 1
  local san n
  san="$(openssl x509 -in "$TLS/server.pem" -noout -ext subjectAltName 2>/dev/null)"
  for n in "${NAMES[@]}"; do
    grep -q "DNS:$n\(,\|$\)" <<<"$san" || return 1
  done
}

make_certs() {
  log "making the test CA and the server certificate in $TLS"
  rm -rf "$TLS"
  mkdir -p "$TLS"
  chmod 0755 "$TLS"
  local tmp
  tmp="$(mktemp -d)"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$TLS/ca.key" -sha256 -days 3650 -subj "/CN=kst test bed WKD CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$TLS/ca.pem"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/server.key" 2>/dev/null
  local san
  san="$(printf 'DNS:%s,' "${NAMES[@]}")"
  san="${san%,}"
  openssl req -new -key "$TLS/server.key" -subj "/CN=example.net" -out "$tmp/server.csr"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
    "$san" >"$tmp/ext"
  openssl x509 -req -in "$tmp/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$tmp/ext" -out "$tmp/leaf.pem" 2>/dev/null
  cat "$tmp/leaf.pem" "$TLS/ca.pem" >"$TLS/server.pem"
  rm -rf "$tmp" "$TLS/ca.srl"
  chmod 0600 "$TLS/ca.key" "$TLS/server.key"
  chmod 0644 "$TLS/ca.pem" "$TLS/server.pem"
}

trust_ok() {
  [ -f "$TRUST" ] && cmp -s "$TRUST" "$TLS/ca.pem" || return 1
  # update-ca-certificates has put it into the bundle that GnuTLS (dirmngr), curl and sq read.
  openssl crl2pkcs7 -nocrl -certfile /etc/ssl/certs/ca-certificates.crt 2>/dev/null |
    openssl pkcs7 -print_certs -noout 2>/dev/null | grep -q 'kst test bed WKD CA'
}

install_trust() {
  log "installing the test CA into the system trust store ($TRUST)"
  install -m 0644 "$TLS/ca.pem" "$TRUST"
  update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed"
}

write_etc() {
  mkdir -p "$ETC"
  hosts_file "$ADDR" >"$ETC/hosts.new" && mv "$ETC/hosts.new" "$ETC/hosts"
  hosts_file "$ADDR" direct >"$ETC/hosts.direct.new" && mv "$ETC/hosts.direct.new" "$ETC/hosts.direct"
  # No DNS server listens on 127.0.0.1:53: names outside the hosts file fail at once, locally.
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$ETC/resolv.conf"
  chmod 0644 "$ETC/hosts" "$ETC/hosts.direct" "$ETC/resolv.conf"
  cat >"$STATE/env.new" <<ENV
KST_WKD_DIR=$STATE
KST_WKD_ADDR=$ADDR
KST_WKD_CA=$TLS/ca.pem
KST_WKD_CERT=$TLS/server.pem
KST_WKD_KEY=$TLS/server.key
KST_WKD_HOSTS=$ETC/hosts
KST_WKD_HOSTS_DIRECT=$ETC/hosts.direct
KST_WKD_RESOLV=$ETC/resolv.conf
ENV
  mv "$STATE/env.new" "$STATE/env"
}

up() {
  [ "$(id -u)" = 0 ] || die "up must run as root (trust store, mount namespaces)"
  mkdir -p "$STATE"
  # Parallel callers (tests) wait for each other: one makes, the others find it made.
  exec 9>"$STATE/.lock"
  flock 9
  ensure_tools
  cert_ok || make_certs
  trust_ok || install_trust
  write_etc
  status >/dev/null || die "up finished but status still fails: $(status 2>&1 || true)"
  cat "$STATE/env"
}

status() {
  local bad=0
  cert_ok || { echo "certificate: missing, expired or not for ${NAMES[*]} ($TLS)"; bad=1; }
  [ "$bad" = 1 ] || trust_ok || { echo "trust store: test CA not installed ($TRUST)"; bad=1; }
  for f in hosts hosts.direct resolv.conf; do
    [ -s "$ETC/$f" ] || { echo "missing $ETC/$f"; bad=1; }
  done
  [ -x /usr/lib/gnupg/gpg-wks-client ] || { echo "gpg-wks-client not installed"; bad=1; }
  command -v unshare >/dev/null || { echo "unshare not installed"; bad=1; }
  if [ "$bad" = 0 ]; then
    echo "up: $STATE (names -> $ADDR:443)"
    return 0
  fi
  return 1
}

down() {
  if [ -f "$TRUST" ]; then
    log "removing the test CA from the trust store"
    rm -f "$TRUST"
    update-ca-certificates >/dev/null 2>&1 || true
  fi
  rm -rf "$STATE"
  log "down"
}

run() {
  local hosts="$ETC/hosts"
  while [ $# -gt 0 ]; do
    case "$1" in
      --hosts) hosts="$2"; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || die "run: no command given"
  [ -s "$hosts" ] || die "run: no hosts file $hosts (scripts/wkd-testbed.sh up first)"
  [ -s "$ETC/resolv.conf" ] || die "run: no $ETC/resolv.conf (scripts/wkd-testbed.sh up first)"
  hosts="$(readlink -f "$hosts")"
  # A new mount namespace, propagation private: nothing leaks back to the machine's own view.
  exec unshare -m --propagation private -- /bin/sh -euc '
    mount --bind "$1" /etc/hosts
    mount --bind "$2" /etc/resolv.conf
    shift 2
    exec "$@"
  ' sh "$hosts" "$ETC/resolv.conf" "$@"
}

cmd="${1:-}"
[ $# -eq 0 ] || shift
case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  run) run "$@" ;;
  hosts) [ $# -ge 1 ] || die "hosts ADDR [direct]"; hosts_file "$@" ;;
  *) die "usage: $0 up|status|down|run [--hosts FILE] [--] COMMAND...|hosts ADDR [direct]" ;;
esac
