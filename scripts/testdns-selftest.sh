#!/usr/bin/env bash
# Self-test of scripts/testdns.sh with tools nobody here wrote: BIND's delv validates with the
# test root's trust anchor (secure, insecure, bogus), dig shows what the attack instances serve,
# and knot's kdig and BIND's dig query over DNS over TLS with the test CA. Brings the test DNS up
# in its own state directory and on its own ports, and takes it down again. Exits non-zero when
# a check fails; ends with "N passed, N failed".
#
# Usage (as root): scripts/testdns-selftest.sh
# Environment: KST_DNS_DIR (/tmp/kst-dns-selftest) and the KST_DNS_*PORT variables of
# testdns.sh (defaults here: 5310 dns, 5311 DoT, 5312 forged, 5313 stripped, 5314 nods, so that a running
# test DNS on the usual ports is left alone); KST_DNS_SELFTEST_KEEP=1 leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
TD="$PWD/scripts/testdns.sh"

export KST_DNS_DIR="${KST_DNS_DIR:-/tmp/kst-dns-selftest}"
export KST_DNS_PORT="${KST_DNS_PORT:-5310}"
export KST_DNS_TLS_PORT="${KST_DNS_TLS_PORT:-5311}"
export KST_DNS_FORGED_PORT="${KST_DNS_FORGED_PORT:-5312}"
export KST_DNS_STRIPPED_PORT="${KST_DNS_STRIPPED_PORT:-5313}"
export KST_DNS_NODS_PORT="${KST_DNS_NODS_PORT:-5314}"
unset KST_DNS_EXTRA_DIR KST_DNS_TLSA_CERT
# The TLSA records name this selftest's own certificate, not a running test mail system's.
export KST_MAIL_DIR=/nonexistent
STATE="$KST_DNS_DIR"

# say, ok, fail, check (and PASSED, FAILED, FAILURES)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

WORK="$(mktemp -d /tmp/kst-dns-selftest-work.XXXXXX)"
cleanup() {
  if [ "${KST_DNS_SELFTEST_KEEP:-0}" != 1 ]; then
    "$TD" down >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the checks -------------------------------------------------------------------------------

# delv_run PORT ANCHORFILE NAME TYPE: delv's validation, printed.
delv_run() { delv -a "$2" +root=. +nocrypto @127.0.0.1 -p "$1" "$3" "$4" 2>&1; }
# secure PORT ANCHOR NAME TYPE [WANT]: delv says "fully validated" (and the answer holds WANT).
secure() {
  local out
  out="$(delv_run "$@")"
  printf '%s\n' "$out"
  grep -q '^; fully validated' <<<"$out" || return 1
  [ -z "${5:-}" ] || grep -qF -- "$5" <<<"$out"
}
# insecure PORT ANCHOR NAME TYPE: delv says "unsigned answer" (the chain proves no DS).
insecure() {
  local out
  out="$(delv_run "$@")"
  printf '%s\n' "$out"
  grep -q '^; unsigned answer' <<<"$out"
}
# bogus PORT ANCHOR NAME TYPE: delv refuses the answer (no "validated", no "unsigned answer").
bogus() {
  local out
  out="$(delv_run "$@")"
  printf '%s\n' "$out"
  ! grep -qE '^; (fully validated|unsigned answer|negative response)' <<<"$out" \
    && grep -qE 'resolution failed|broken trust chain|no valid signature|insecurity proof failed' <<<"$out"
}
# served PORT NAME TYPE WANT: the instance serves WANT (dig, no validation): shows that a refusal
# comes from validation and not from missing data.
served() {
  local out
  out="$(dig +short +norec -p "$1" @127.0.0.1 "$2" "$3" 2>&1)"
  printf '%s\n' "$out"
  grep -qF -- "$4" <<<"$out"
}
# no_rrsig PORT NAME TYPE: the answer section carries no RRSIG even with the DO bit.
no_rrsig() {
  local out
  out="$(dig +dnssec +norec +noall +answer -p "$1" @127.0.0.1 "$2" "$3" 2>&1)"
  printf '%s\n' "$out"
  grep -qE "IN[[:space:]]+$3[[:space:]]" <<<"$out" && ! grep -qE 'IN[[:space:]]+RRSIG' <<<"$out"
}
spki_sha256() { openssl x509 -in "$1" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1; }
# tlsa_is PORT ANCHOR NAME HASH: the TLSA record validates and names HASH (case-insensitive).
tlsa_is() {
  local out
  out="$(delv_run "$1" "$2" "$3" TLSA)"
  printf '%s\n' "$out"
  grep -q '^; fully validated' <<<"$out" \
    && grep -E 'IN[[:space:]]+TLSA' <<<"$out" | tr -d ' ' | tr 'A-F' 'a-f' | grep -qF "311$4"
}
named_pids() { for i in main forged stripped nods; do cat "$STATE/named-$i/named.pid" 2>/dev/null || echo -; done | tr '\n' ' '; }
port_closed() { [ -z "$(ss -Hltun "sport = :$1" 2>/dev/null)" ]; }

# --- up ---------------------------------------------------------------------------------------
say "up (state $STATE; ports $KST_DNS_PORT, DoT $KST_DNS_TLS_PORT, forged $KST_DNS_FORGED_PORT, stripped $KST_DNS_STRIPPED_PORT, nods $KST_DNS_NODS_PORT)"
"$TD" down >/dev/null 2>&1 || true
T0=$SECONDS
if ! "$TD" up >"$WORK/env" 2>"$WORK/up.log"; then
  cat "$WORK/up.log"
  fail "testdns.sh up"
  printf '\n%s passed, %s failed\n' "$PASSED" "$FAILED"
  exit 1
fi
ok "testdns.sh up ($((SECONDS - T0)) s)"
# shellcheck disable=SC1091
. "$WORK/env"
check "env: the same lines from 'env'" cmp -s "$WORK/env" <("$TD" env)
check "status: all four instances run (exit 0)" "$TD" status
P="$KST_DNS_PORT"
DS="$KST_DNS_DELV_ANCHOR"
KEY="$KST_DNS_DELV_ANCHOR_KEY"
check "trust anchor files: a DS line and a DNSKEY line for ." \
  bash -c "grep -qE '^\. 3600 IN DS [0-9]+ 13 2 [0-9A-F]{64}\$' '$KST_DNS_ANCHOR_DS' && grep -qE '^\. 3600 IN DNSKEY 257 3 13 [A-Za-z0-9+/=]+\$' '$KST_DNS_ANCHOR'"

# --- secure -----------------------------------------------------------------------------------
say "signed zones: delv with the test root's DS says 'fully validated'"
check "example.net MX" secure "$P" "$DS" example.net MX "10 mail.example.net."
check "mail.example.net A" secure "$P" "$DS" mail.example.net A "127.0.0.1"
check "example.net TXT (SPF)" secure "$P" "$DS" example.net TXT "v=spf1 ip4:127.0.0.1 -all"
check "mail.example.net TXT (SPF for the HELO name)" secure "$P" "$DS" mail.example.net TXT "v=spf1"
check "_submission._tcp.example.net SRV" secure "$P" "$DS" _submission._tcp.example.net SRV "0 1 2587 mail.example.net."
check "_imaps._tcp.example.net SRV" secure "$P" "$DS" _imaps._tcp.example.net SRV "0 1 2993 mail.example.net."
check "_mta-sts.example.net TXT" secure "$P" "$DS" _mta-sts.example.net TXT "v=STSv1; id="
check "acme.net MX (second provider)" secure "$P" "$DS" acme.net MX "10 mail.acme.net."
check "_submissions._tcp.acme.net SRV" secure "$P" "$DS" _submissions._tcp.acme.net SRV "0 1 2465 mail.acme.net."
HASH="$(spki_sha256 "$KST_DNS_TLSA_CERT")"
check "_25._tcp.mail.example.net TLSA 3 1 1 = SHA-256 of the certificate's public key (openssl)" \
  tlsa_is "$P" "$DS" _25._tcp.mail.example.net "$HASH"
check "_25._tcp.mail.acme.net TLSA validated" tlsa_is "$P" "$DS" _25._tcp.mail.acme.net "$HASH"
check "the same with the DNSKEY anchor (static-key): example.net MX" secure "$P" "$KEY" example.net MX "mail.example.net."
check "a name that does not exist: NXDOMAIN, validated (NSEC in example.net)" \
  bash -c "delv -a '$DS' +root=. @127.0.0.1 -p $P nosuch.example.net A 2>&1 | tee /dev/stderr | grep -q 'negative response, fully validated'"
check "a name under net. that does not exist: validated (NSEC3 in net.)" \
  bash -c "delv -a '$DS' +root=. @127.0.0.1 -p $P nosuch.net A 2>&1 | tee /dev/stderr | grep -q 'negative response, fully validated'"

# --- insecure ---------------------------------------------------------------------------------
say "unsigned children with a signed proof of no DS: 'unsigned answer'"
check "insecure.net MX (no DS in net.: NSEC3 proof)" insecure "$P" "$DS" insecure.net MX
check "mail.insecure.net A" insecure "$P" "$DS" mail.insecure.net A
check "dns.test A (no DS in the root: NSEC proof)" insecure "$P" "$DS" dns.test A

# --- bogus ------------------------------------------------------------------------------------
say "tampered and stripped records: delv refuses them"
check "tampered.example.net A (changed after signing) is refused" bogus "$P" "$DS" tampered.example.net A
check "  ... while the server does serve it (dig)" served "$P" tampered.example.net A 127.0.0.66
check "stripped.example.net A (RRSIG removed) is refused" bogus "$P" "$DS" stripped.example.net A
check "  ... while the server serves it without RRSIG (dig +dnssec)" no_rrsig "$P" stripped.example.net A
F="$KST_DNS_FORGED_PORT"
check "forged instance: example.net MX refused" bogus "$F" "$DS" example.net MX
check "  ... it serves mail.attacker.test as the MX (dig)" served "$F" example.net MX mail.attacker.test.
check "forged instance: mail.example.net A refused" bogus "$F" "$DS" mail.example.net A
check "forged instance: _25._tcp.mail.example.net TLSA refused" bogus "$F" "$DS" _25._tcp.mail.example.net TLSA
check "forged instance: _submission._tcp.example.net SRV refused" bogus "$F" "$DS" _submission._tcp.example.net SRV
check "forged instance: example.net TXT (SPF) refused" bogus "$F" "$DS" example.net TXT
check "forged instance: _submissions._tcp.example.net SRV removed (forged NODATA) refused" bogus "$F" "$DS" _submissions._tcp.example.net SRV
check "  ... it answers NOERROR without an SRV record there (dig)" \
  bash -c "out=\$(dig +norec -p $F @127.0.0.1 _submissions._tcp.example.net SRV); echo \"\$out\"; grep -q 'status: NOERROR' <<<\"\$out\" && ! grep -qE 'IN[[:space:]]+SRV[[:space:]]+[0-9]' <<<\"\$out\""
check "forged instance: acme.net MX (untouched) fully validated" secure "$F" "$DS" acme.net MX "mail.acme.net."
S="$KST_DNS_STRIPPED_PORT"
check "stripped instance (example.net served unsigned under a DS): example.net MX refused" bogus "$S" "$DS" example.net MX
check "  ... it serves the MX without RRSIG (dig +dnssec)" no_rrsig "$S" example.net MX
check "stripped instance: _25._tcp.mail.example.net TLSA refused" bogus "$S" "$DS" _25._tcp.mail.example.net TLSA
check "stripped instance: acme.net MX (untouched) fully validated" secure "$S" "$DS" acme.net MX "mail.acme.net."
N="$KST_DNS_NODS_PORT"
check "nods instance (example.net unsigned, its DS removed from net.): example.net MX refused" bogus "$N" "$DS" example.net MX
check "  ... net. there answers 'no DS' for example.net (dig: NOERROR, no DS record)" \
  bash -c "out=\$(dig +norec -p $N @127.0.0.1 example.net DS); echo \"\$out\"; grep -q 'status: NOERROR' <<<\"\$out\" && ! grep -qE 'IN[[:space:]]+DS[[:space:]]+[0-9]' <<<\"\$out\""
check "  ... and delv refuses that 'no DS' (the signed NSEC3 record lists DS)" bogus "$N" "$DS" example.net DS
check "nods instance: insecure.net MX (a real 'no DS') still an unsigned answer" insecure "$N" "$DS" insecure.net MX
# Another root key: nothing validates, not even the insecure zones (no proof of no DS).
mkdir -p "$WORK/otherkey"
dnssec-keygen -q -K "$WORK/otherkey" -a ECDSAP256SHA256 -f KSK -n ZONE . >/dev/null
awk '!/^;/ { k = ""; for (i = 7; i <= NF; i++) k = k $i; printf "trust-anchors {\n  . static-key %s %s %s \"%s\";\n};\n", $4, $5, $6, k }' \
  "$WORK"/otherkey/K.*.key >"$WORK/other-anchor.conf"
check "a different trust anchor: example.net MX refused" bogus "$P" "$WORK/other-anchor.conf" example.net MX
check "a different trust anchor: insecure.net MX refused too (no trusted proof of no DS)" bogus "$P" "$WORK/other-anchor.conf" insecure.net MX

# --- DNS over TLS -----------------------------------------------------------------------------
say "DNS over TLS on 127.0.0.1:$KST_DNS_TLS_PORT ($KST_DNS_TLS_NAME, test CA)"
T="$KST_DNS_TLS_PORT"
kdig_tls() { kdig +tls-ca="$1" +tls-hostname="$2" +dnssec +timeout=3 +retry=0 @127.0.0.1 -p "$T" "$3" "$4" 2>&1; }
check "kdig +tls-ca +tls-hostname=$KST_DNS_TLS_NAME: example.net MX with RRSIG over TLS" \
  bash -c "out=\$(kdig +tls-ca='$KST_DNS_CA' +tls-hostname='$KST_DNS_TLS_NAME' +dnssec +timeout=3 +retry=0 @127.0.0.1 -p $T example.net MX 2>&1); echo \"\$out\"; grep -q '^;; TLS session' <<<\"\$out\" && grep -qE 'IN[[:space:]]+MX[[:space:]]+10 mail.example.net.' <<<\"\$out\" && grep -qE 'IN[[:space:]]+RRSIG[[:space:]]+MX' <<<\"\$out\""
check "dig +tls +tls-ca +tls-hostname (BIND 9.18): example.net MX" \
  bash -c "dig +tls +tls-ca='$KST_DNS_CA' +tls-hostname='$KST_DNS_TLS_NAME' +short @127.0.0.1 -p $T example.net MX | grep -qx '10 mail.example.net.'"
check "kdig with the system CAs instead of the test CA: handshake refused" \
  bash -c "! kdig +tls-ca=/etc/ssl/certs/ca-certificates.crt +tls-hostname='$KST_DNS_TLS_NAME' +timeout=3 +retry=0 @127.0.0.1 -p $T example.net MX 2>&1 | grep -E 'IN[[:space:]]+MX'"
check "kdig with the wrong host name (wrong.test): handshake refused" \
  bash -c "! kdig +tls-ca='$KST_DNS_CA' +tls-hostname=wrong.test +timeout=3 +retry=0 @127.0.0.1 -p $T example.net MX 2>&1 | grep -E 'IN[[:space:]]+MX'"
check "the DoT certificate is signed by the test CA and names $KST_DNS_TLS_NAME and 127.0.0.1" \
  bash -c "openssl verify -CAfile '$KST_DNS_CA' '$STATE/tls/dot.pem' && openssl x509 -in '$STATE/tls/dot.pem' -noout -ext subjectAltName | grep -q 'DNS:$KST_DNS_TLS_NAME.*IP Address:127.0.0.1'"

# --- idempotent up, extra records, TLSA certificate -------------------------------------------
say "up again, extra records, another TLSA certificate"
PIDS="$(named_pids)"
SERIAL="$(cat "$STATE/zones/serial")"
ANCHOR_BEFORE="$(cat "$KST_DNS_ANCHOR")"
"$TD" up >/dev/null 2>"$WORK/up2.log" || true
check "a second up changes nothing (same pids, same serial)" \
  bash -c "grep -q 'nothing changed' '$WORK/up2.log' && [ '$(named_pids)' = '$PIDS' ] && [ \"\$(cat '$STATE/zones/serial')\" = '$SERIAL' ]"
DKIM='kst._domainkey.example.net. TXT "v=DKIM1; k=ed25519; p=igcKCG+tGpsC2Z20ht3iGzv9X9ttYL2HJ1WXR7UR3ew="'
echo "$DKIM" >"$KST_DNS_EXTRA_DIR/example.net"
"$TD" up >/dev/null 2>"$WORK/up3.log" || cat "$WORK/up3.log"
check "extra records: up signs again (serial $SERIAL -> $((SERIAL + 1))) and reloads" \
  bash -c "[ \"\$(cat '$STATE/zones/serial')\" = '$((SERIAL + 1))' ] && grep -q 'reloading' '$WORK/up3.log'"
check "extra records: the DKIM key record is fully validated" secure "$P" "$DS" kst._domainkey.example.net TXT "v=DKIM1; k=ed25519"
check "extra records: the forged instance's copy of it is refused" bogus "$F" "$DS" kst._domainkey.example.net TXT
check "the trust anchor did not change" bash -c "[ \"\$(cat '$KST_DNS_ANCHOR')\" = '$ANCHOR_BEFORE' ]"
OTHER_HASH="$(spki_sha256 "$STATE/tls/dot.pem")"
KST_DNS_TLSA_CERT="$STATE/tls/dot.pem" "$TD" up >/dev/null 2>&1
check "KST_DNS_TLSA_CERT: the TLSA record follows the certificate and validates" \
  tlsa_is "$P" "$DS" _25._tcp.mail.example.net "$OTHER_HASH"
"$TD" up >/dev/null 2>&1
check "  ... and back" tlsa_is "$P" "$DS" _25._tcp.mail.example.net "$HASH"
rm -f "$KST_DNS_EXTRA_DIR/example.net"
printf 'bad record here\n' >"$KST_DNS_EXTRA_DIR/acme.net"
check "a broken extra record: up fails and says which zone" \
  bash -c "! '$TD' up >/dev/null 2>'$WORK/up4.log' && grep -q 'zone acme.net' '$WORK/up4.log'"
rm -f "$KST_DNS_EXTRA_DIR/acme.net"
check "  ... and after removing it up works again" bash -c "'$TD' up >/dev/null 2>&1"
check "the removed DKIM record is gone (NXDOMAIN, validated)" \
  bash -c "delv -a '$DS' +root=. @127.0.0.1 -p $P kst._domainkey.example.net TXT 2>&1 | grep -q 'negative response, fully validated'"

# --- a dead instance, down --------------------------------------------------------------------
say "a dead instance, down"
kill "$(cat "$STATE/named-forged/named.pid")"
for _ in $(seq 50); do port_closed "$F" && break; sleep 0.1; done
check "status says the forged instance stopped (exit 3)" bash -c "out=\$('$TD' status); rc=\$?; echo \"\$out\"; [ \$rc -eq 3 ] && grep -q 'forged *stopped' <<<\"\$out\""
check "up starts it again" bash -c "'$TD' up >/dev/null 2>&1 && '$TD' status >/dev/null"
check "  ... and it serves the forged copy again" bogus "$F" "$DS" example.net MX
"$TD" down >/dev/null 2>&1
check "down: all ports closed, state directory removed" \
  bash -c "for p in $P $T $F $S $N; do [ -z \"\$(ss -Hltun \"sport = :\$p\")\" ] || exit 1; done; [ ! -e '$STATE' ]"
check "status after down: exit 3" bash -c "! '$TD' status >/dev/null"
check "down again: nothing to do" "$TD" down

printf '\n'
if [ "$FAILED" -gt 0 ]; then
  printf 'failed: %s\n' "${FAILURES[@]}"
fi
printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
[ "$FAILED" -eq 0 ]
