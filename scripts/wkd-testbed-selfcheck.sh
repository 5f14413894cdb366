#!/usr/bin/env bash
# Self-check of scripts/wkd-testbed.sh: brings the test bed up, serves keys made by the real gpg
# from a throwaway Python server (scripts/wkd-testbed-selfcheck-server.py, a check of the test
# bed only, never a stand-in for kst in kst's tests) on its own address, and proves that Debian's
# gpg, dirmngr, gpg-wks-client, curl and sq reach it by name on port 443 with the test CA:
# WKD advanced and direct, gpg-wks-client --print-wkd-hash/--print-wkd-url/--supported/--check/
# --create, HKP --recv-keys/--search-keys, VKS and sq. Logs every request the server receives
# (request line and headers, one JSON line each) to $KST_WKD_SELFCHECK_DIR/requests.jsonl: the
# facts in docs/WKD-TESTBED.md come from that log. Ends with "N passed, N failed".
#
# Usage (as root): scripts/wkd-testbed-selfcheck.sh
# Environment: KST_WKD_DIR as for wkd-testbed.sh; KST_WKD_SELFCHECK_ADDR (127.1.0.250, port 443
# there), KST_WKD_SELFCHECK_HKP_PORT (31371, plain HTTP on 127.0.0.1),
# KST_WKD_SELFCHECK_DIR (a temp dir; kept when KST_WKD_SELFCHECK_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
TB="$PWD/scripts/wkd-testbed.sh"
ADDR="${KST_WKD_SELFCHECK_ADDR:-127.1.0.250}"
HKP_PORT="${KST_WKD_SELFCHECK_HKP_PORT:-31371}"
SC="${KST_WKD_SELFCHECK_DIR:-$(mktemp -d /tmp/kst-wkd-selfcheck.XXXXXX)}"
mkdir -p "$SC"
WKS=/usr/lib/gnupg/gpg-wks-client
PY=/usr/bin/python3

# ok, fail (and PASSED, FAILED)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
# expect NAME WANT GOT: passes when GOT contains WANT.
expect() { if [[ "$3" == *"$2"* ]]; then ok "$1"; else fail "$1" "wanted: $2"$'\n'"got: $3"; fi; }
say() { printf '\n== selfcheck: %s\n' "$*"; }

SERVER_PID=""
HOMES=()
cleanup() {
  local h
  for h in "${HOMES[@]}"; do
    GNUPGHOME="$h" gpgconf --kill all >/dev/null 2>&1 || true
    rm -rf "$h"
  done
  [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true
  [ "${KST_WKD_SELFCHECK_KEEP:-}" = 1 ] || rm -rf "$SC"
}
trap cleanup EXIT

# newhome VAR: a fresh GNUPGHOME in VAR (short path: the agent's sockets live in it); its
# daemons are ended and it is removed at exit. Not in $(...): HOMES must grow in this shell.
newhome() {
  local h
  h="$(mktemp -d /tmp/kst-gh.XXXXXX)"
  chmod 0700 "$h"
  HOMES+=("$h")
  printf -v "$1" '%s' "$h"
}
# inbed [--direct] HOME CMD...: CMD in the test bed's resolver view with GNUPGHOME=HOME.
inbed() {
  local hosts="$SC/hosts"
  if [ "$1" = --direct ]; then hosts="$SC/hosts.direct"; shift; fi
  local home="$1"
  shift
  "$TB" run --hosts "$hosts" -- env GNUPGHOME="$home" "$@"
}
# requests: request lines logged since the last call, "listener request_line -> status".
requests() {
  "$PY" - "$SC/requests.jsonl" "$SC/requests.seen" <<'PYEOF'
import json, os, sys
log, seen = sys.argv[1], sys.argv[2]
lines = open(log).read().splitlines() if os.path.exists(log) else []
start = int(open(seen).read() or 0) if os.path.exists(seen) else 0
for l in lines[start:]:
    r = json.loads(l)
    hdrs = "; ".join(f"{k}: {v}" for k, v in r["headers"])
    print(f'{r["listener"]} {r["request_line"]} -> {r["status"]} [{hdrs}]')
open(seen, "w").write(str(len(lines)))
PYEOF
}

say "test bed up"
"$TB" up >"$SC/env"
# shellcheck disable=SC1091
. "$SC/env"
"$TB" hosts "$ADDR" >"$SC/hosts"
"$TB" hosts "$ADDR" direct >"$SC/hosts.direct"
expect "status says up" "up:" "$("$TB" status)"
if grep -q example.net /etc/hosts; then fail "the machine's /etc/hosts does not name example.net"
else ok "the machine's /etc/hosts does not name example.net"; fi
expect "the view resolves openpgpkey.example.net to $ADDR" "$ADDR" \
  "$("$TB" run --hosts "$SC/hosts" -- getent hosts openpgpkey.example.net)"
if "$TB" run --hosts "$SC/hosts.direct" -- getent hosts openpgpkey.example.net >/dev/null 2>&1; then
  fail "the direct-only view does not resolve openpgpkey.example.net"
else ok "the direct-only view does not resolve openpgpkey.example.net"; fi

say "keys made by gpg"
newhome PUB
g() { GNUPGHOME="$PUB" gpg --batch --yes --no-tty --quiet --passphrase '' --pinentry-mode loopback "$@" 2>/dev/null; }
fpr() { GNUPGHOME="$PUB" gpg --with-colons --list-keys "$1" 2>/dev/null | awk -F: '/^fpr/{print $10; exit}'; }
for who in "Alice <alice@example.net>" "Key Submission <keys@example.net>" "Bob <bob@acme.net>"; do
  g --quick-gen-key "$who" ed25519 sign,cert never
  g --quick-add-key "$(fpr "$(sed 's/.*<\(.*\)>/\1/' <<<"$who")")" cv25519 encr never
done
ALICE="$(fpr alice@example.net)"
SUBKEY="$(fpr keys@example.net)"
BOB="$(fpr bob@acme.net)"
ALICE_KEYID="${ALICE:24}"
expect "alice's fingerprint" "$ALICE" "$(fpr alice@example.net)"

# zbase32(sha1(lowercase local part)), computed here independently of gpg.
wkdhash() {
  "$PY" -c '
import hashlib, sys
a = "ybndrfg8ejkmcpqxot1uwisza345h769"
d = hashlib.sha1(sys.argv[1].lower().encode()).digest()
bits = "".join(f"{b:08b}" for b in d)
print("".join(a[int(bits[i:i+5], 2)] for i in range(0, 160, 5)))' "$1"
}
HA="$(wkdhash alice)"
HK="$(wkdhash keys)"
HB="$(wkdhash bob)"

say "web root"
W="$SC/www"
mkdir -p "$W/example.net/hu" "$W/acme.net/hu" "$W/hkp" "$W/hkp-index"
g --export-filter keep-uid=mbox=alice@example.net --export "$ALICE" >"$W/example.net/hu/$HA"
g --export-filter keep-uid=mbox=keys@example.net --export "$SUBKEY" >"$W/example.net/hu/$HK"
g --export-filter keep-uid=mbox=bob@acme.net --export "$BOB" >"$W/acme.net/hu/$HB"
printf 'protocol-version: 5\nmailbox-only\nauth-submit\n' >"$W/example.net/policy"
printf 'keys@example.net\n' >"$W/example.net/submission-address"
# acme.net: keys by WKD, but no policy file (WKD without WKS).
lc() { tr 'A-Z' 'a-z' <<<"$1"; }
g --armor --export "$ALICE" >"$W/hkp/0x$(lc "$ALICE")"
cp "$W/hkp/0x$(lc "$ALICE")" "$W/hkp/alice@example.net"
cp "$W/hkp/0x$(lc "$ALICE")" "$W/hkp/0x$(lc "$ALICE_KEYID")"
NOW="$(date +%s)"
printf 'info:1:1\npub:%s:22:256:%s::\nuid:Alice <alice@example.net>:%s::\n' "$ALICE" "$NOW" "$NOW" \
  >"$W/hkp-index/alice@example.net"

say "throwaway server on $ADDR:443 (TLS) and 127.0.0.1:$HKP_PORT (HKP)"
"$PY" scripts/wkd-testbed-selfcheck-server.py "$W" "$SC/requests.jsonl" "$ADDR" 443 \
  "$KST_WKD_CERT" "$KST_WKD_KEY" "$HKP_PORT" >"$SC/server.out" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 50); do grep -q ready "$SC/server.out" 2>/dev/null && break; sleep 0.1; done
expect "server ready" ready "$(cat "$SC/server.out")"

say "curl through the system trust store"
newhome U
expect "curl: policy over https by name, CA from the trust store" "200 text/plain" \
  "$(inbed "$U" curl -sS -o /dev/null -w '%{http_code} %{content_type}' \
    https://openpgpkey.example.net/.well-known/openpgpkey/example.net/policy 2>&1)"
requests >/dev/null

say "gpg-wks-client --print-wkd-hash / --print-wkd-url"
expect "--print-wkd-hash = zbase32(sha1(\"alice\"))" "$HA alice@example.net" \
  "$(inbed "$U" "$WKS" --print-wkd-hash Alice@Example.net 2>&1 | tr 'A-Z' 'a-z')"
expect "--print-wkd-url (advanced form, l= is the local part as given)" \
  "https://openpgpkey.example.net/.well-known/openpgpkey/example.net/hu/$HA?l=alice" \
  "$(inbed "$U" "$WKS" --print-wkd-url alice@example.net 2>&1)"

say "gpg --locate-keys by WKD, advanced method"
out="$(inbed "$U" gpg --batch --no-tty --auto-key-locate clear,nodefault,wkd --locate-keys alice@example.net 2>&1)"
expect "advanced: imported alice's key" "$ALICE" "$out"
expect "advanced: one request to openpgpkey.example.net" \
  "web GET /.well-known/openpgpkey/example.net/hu/$HA?l=alice HTTP/1.0 -> 200 [Host: openpgpkey.example.net; Pragma: no-cache; Cache-Control: no-cache]" \
  "$(requests)"

say "gpg --locate-keys by WKD, direct method (openpgpkey.example.net does not resolve)"
newhome D
out="$(inbed --direct "$D" gpg --batch --no-tty --auto-key-locate clear,nodefault,wkd --locate-keys alice@example.net 2>&1)"
expect "direct: imported alice's key" "$ALICE" "$out"
expect "direct: one request to example.net" \
  "web GET /.well-known/openpgpkey/hu/$HA?l=alice HTTP/1.0 -> 200 [Host: example.net; Pragma: no-cache; Cache-Control: no-cache]" \
  "$(requests)"

say "gpg --locate-keys for an unknown address"
newhome N
if out="$(inbed "$N" gpg --batch --no-tty --auto-key-locate clear,nodefault,wkd --locate-keys nobody@example.net 2>&1)"; then
  fail "unknown address: gpg fails" "$out"
else ok "unknown address: gpg fails (exit $?)"; fi
expect "unknown address: gpg says No data" "No data" "$out"
# After a miss, dirmngr also checks whether the domain has a policy file (it may do so after
# gpg has exited) and remembers the answer (its domaininfo cache) while it runs.
sleep 1
reqs="$(requests)"
expect "unknown address: 404 on the advanced URL, no direct fallback" "/example.net/hu/$(wkdhash nobody)?l=nobody HTTP/1.0 -> 404" "$reqs"
expect "unknown address: dirmngr then fetches the policy" \
  "web GET /.well-known/openpgpkey/example.net/policy HTTP/1.0 -> 200" "$reqs"
if grep -q 'openpgpkey/hu/' <<<"$reqs"; then fail "unknown address: no direct-method request" "$reqs"
else ok "unknown address: no direct-method request"; fi

say "gpg-wks-client --supported / --check"
expect "--supported alice@example.net" "supports WKS" "$(inbed "$U" "$WKS" -v --supported alice@example.net 2>&1)"
expect "--supported asks for the policy file" "/.well-known/openpgpkey/example.net/policy HTTP/1.0 -> 200" "$(requests)"
if out="$(inbed "$U" "$WKS" -v --supported bob@acme.net 2>&1)"; then
  fail "--supported bob@acme.net fails without a policy file" "$out"
else ok "--supported bob@acme.net fails without a policy file"; fi
mv "$W/example.net/submission-address" "$SC/submission-address.away"
if out="$(inbed "$U" "$WKS" -v --supported alice@example.net 2>&1)"; then
  fail "--supported fails when only the submission-address file is missing" "$out"
else expect "--supported fails when only the submission-address file is missing" "does NOT support WKS" "$out"; fi
reqs="$(requests)"
expect "--supported asks the policy" "example.net/policy HTTP/1.0 -> 200" "$reqs"
expect "--supported asks the submission-address" "example.net/submission-address HTTP/1.0 -> 404" "$reqs"
mv "$SC/submission-address.away" "$W/example.net/submission-address"
out="$(inbed "$N" "$WKS" -v --check alice@example.net 2>&1)"
expect "--check alice@example.net finds the key" "fingerprint: $ALICE" "$out"
expect "--check asks the advanced URL" "/example.net/hu/$HA?l=alice HTTP/1.0 -> 200" "$(requests)"

say "gpg-wks-client --create"
newhome A
GNUPGHOME="$PUB" gpg --batch --pinentry-mode loopback --passphrase '' --export-secret-keys "$ALICE" 2>/dev/null |
  GNUPGHOME="$A" gpg --batch --import 2>/dev/null
out="$(inbed "$A" "$WKS" -v -o "$SC/create.eml" --create "$ALICE" alice@example.net 2>&1)"
expect "--create: no confirmation required (auth-submit)" "no confirmation required" "$out"
reqs="$(requests)"
expect "--create: asks for the policy" "example.net/policy HTTP/1.0 -> 200" "$reqs"
expect "--create: asks for the submission address" "example.net/submission-address HTTP/1.0 -> 200" "$reqs"
expect "--create: looks up the submission key by WKD" "example.net/hu/$HK?l=keys HTTP/1.0 -> 200" "$reqs"
mail="$(cat "$SC/create.eml")"
expect "--create: From" "From: alice@example.net" "$mail"
expect "--create: To the submission address" "To: keys@example.net" "$mail"
expect "--create: Subject" "Subject: Key publishing request" "$mail"
expect "--create: Wks-Draft-Version" "Wks-Draft-Version: 3" "$mail"
expect "--create: multipart/encrypted" 'multipart/encrypted; protocol="application/pgp-encrypted"' "$mail"
inner="$(GNUPGHOME="$PUB" gpg --batch --pinentry-mode loopback --passphrase '' -d "$SC/create.eml" 2>&1)"
expect "--create: encrypted to the submission key" "Key Submission <keys@example.net>" "$inner"
expect "--create: inner part is application/pgp-keys" "Content-Type: application/pgp-keys" "$inner"
keyinfo="$(sed -n '/BEGIN PGP PUBLIC KEY BLOCK/,/END PGP PUBLIC KEY BLOCK/p' <<<"$inner" | gpg --with-colons --show-keys 2>&1)"
expect "--create: the key in it is alice's" "$ALICE" "$keyinfo"
# mailbox-only: gpg-wks-client adds a bare-address User ID to alice's key and sends only that one.
uids="$(awk -F: '/^uid/{print "[" $10 "]"}' <<<"$keyinfo")"
if [ "$uids" = "[alice@example.net]" ]; then ok "--create: mailbox-only: the only User ID sent is the bare address"
else fail "--create: mailbox-only: the only User ID sent is the bare address" "$uids"; fi
if out="$(inbed "$A" "$WKS" --send --create "$ALICE" alice@example.net 2>&1)"; then
  expect "--send (Debian): unexpectedly succeeded" "error running" "$out"
else expect "--send (Debian): fails, no sendmail path compiled in" "error running ''" "$out"; fi
requests >/dev/null

say "HKP: gpg --recv-keys / --search-keys"
newhome K
out="$(inbed "$K" gpg --batch --no-tty --keyserver "hkp://127.0.0.1:$HKP_PORT" --recv-keys "$ALICE" 2>&1)"
expect "--recv-keys FPR imports" "imported: 1" "$out"
expect "--recv-keys FPR asks op=get&options=mr&search=0xFPR, Host localhost:PORT" \
  "hkp GET /pks/lookup?op=get&options=mr&search=0x$ALICE HTTP/1.0 -> 200 [Host: localhost:$HKP_PORT; Pragma: no-cache; Cache-Control: no-cache]" \
  "$(requests)"
newhome K2
out="$(inbed "$K2" gpg --batch --no-tty --keyserver "hkp://127.0.0.1:$HKP_PORT" --recv-keys "$ALICE_KEYID" 2>&1)"
expect "--recv-keys KEYID imports" "imported: 1" "$out"
expect "--recv-keys KEYID asks search=0xKEYID" "search=0x$ALICE_KEYID HTTP/1.0 -> 200" "$(requests)"
out="$(inbed "$K" gpg --batch --no-tty --keyserver "hkp://127.0.0.1:$HKP_PORT" --search-keys alice@example.net </dev/null 2>&1 || true)"
expect "--search-keys lists alice's key" "key ${ALICE:24}" "$out"
expect "--search-keys asks op=index&options=mr&fingerprint=on, address not %-encoded" \
  "hkp GET /pks/lookup?op=index&options=mr&fingerprint=on&search=alice@example.net HTTP/1.0 -> 200" "$(requests)"

say "VKS with curl"
expect "VKS by-email" "BEGIN PGP PUBLIC KEY BLOCK" \
  "$(inbed "$U" curl -sS https://example.net/vks/v1/by-email/alice%40example.net 2>&1)"
expect "VKS by-fingerprint" "BEGIN PGP PUBLIC KEY BLOCK" \
  "$(inbed "$U" curl -sS "https://example.net/vks/v1/by-fingerprint/$ALICE" 2>&1)"
requests >/dev/null

if command -v sq >/dev/null; then
  say "Sequoia sq"
  expect "sq wkd get (advanced)" "$ALICE" "$(inbed "$U" sq wkd get alice@example.net 2>/dev/null | sq inspect 2>&1)"
  expect "sq wkd get: same URL, HTTP/1.1, lowercase host header" \
    "web GET /.well-known/openpgpkey/example.net/hu/$HA?l=alice HTTP/1.1 -> 200 [host: openpgpkey.example.net]" "$(requests)"
  expect "sq wkd get (direct)" "$ALICE" "$(inbed --direct "$U" sq wkd get alice@example.net 2>/dev/null | sq inspect 2>&1)"
  expect "sq wkd get direct URL" "web GET /.well-known/openpgpkey/hu/$HA?l=alice HTTP/1.1 -> 200" "$(requests)"
  expect "sq keyserver get FPR over hkps" "$ALICE" \
    "$(inbed "$U" sq keyserver --server hkps://example.net get "$ALICE" 2>/dev/null | sq inspect 2>&1)"
  expect "sq keyserver get asks op=get&options=mr&search=0xFPR" \
    "web GET /pks/lookup?op=get&options=mr&search=0x$ALICE HTTP/1.1 -> 200 [host: example.net]" "$(requests)"
else
  echo "  skip  sq not installed"
fi

printf '\nrequest log: %s/requests.jsonl\n' "$SC"
printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
[ "$FAILED" = 0 ]
