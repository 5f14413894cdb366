#!/usr/bin/env bash
# A DNSSEC-signed test DNS on 127.0.0.1 for kst's tests: BIND 9.18 from Debian 12, authoritative
# for a private, signed root `.` and everything below it, so that a validating client given the
# test root's trust anchor can tell secure, insecure and bogus answers apart.
#
#   .              signed (NSEC); delegates net. (DS) and test. (no DS: signed NSEC proof)
#   net.           signed (NSEC3, 0 iterations, no salt); delegates example.net. and acme.net.
#                  (DS) and insecure.net. (no DS: signed NSEC3 proof)
#   example.net.   signed: MX, A, SPF TXT, SRV (RFC 6186), TLSA _25._tcp.mail, _mta-sts TXT,
#                  plus tampered.example.net (A changed after signing) and stripped.example.net
#                  (its A record's RRSIG removed)
#   acme.net.      signed, the second provider, the same records
#   insecure.net.  unsigned, the same records
#   test.          unsigned; dns.test (the DoT server's name), mail.attacker.test
#
# Four named instances read the same zone files:
#   main      plain DNS (UDP+TCP) and DNS over TLS (certificate from a test CA made here)
#   forged    the same zones, but every record of example.net's that a client uses (MX, A,
#             SRV, TXT, TLSA) was changed after signing: each keeps its now-wrong RRSIG; and
#             _submissions._tcp.example.net SRV is missing (a forged NODATA)
#   stripped  the same zones, but example.net is served unsigned (no DNSKEY, RRSIG, NSEC)
#             although net. still holds its DS: the downgrade attack
#   nods      as stripped, and net. answers that example.net has no DS (the DS and its RRSIG
#             removed; net.'s signed NSEC3 records still say that there is one)
# Tests pick the instance by resolver address; the names and the trust anchor are the same.
#
# Runs as root on Debian 12, installs bind9, bind9-utils, bind9-dnsutils and knot-dnsutils
# where missing, starts named directly (no systemd). See docs/TESTDNS.md.
#
# Usage: scripts/testdns.sh up       start (or re-sign and reload what changed), print the env
#        scripts/testdns.sh down     stop the instances, remove the state directory
#        scripts/testdns.sh status   what runs, on which ports (exit 3: not all)
#        scripts/testdns.sh env      print the env of a running test DNS
#
# `up` is idempotent: keys are made once (the trust anchor stays the same until `down`); the
# zones are signed again only when their content changed (extra records, the TLSA certificate,
# ports), and then the running instances reload and `up` waits until they serve the new serial.
# The env lines (export KST_DNS_...=...) go to stdout and to $KST_DNS_DIR/env.
#
# Environment:
#   KST_DNS_DIR            state directory (/tmp/kst-dns)
#   KST_DNS_PORT           main instance, plain DNS over UDP and TCP (5300)
#   KST_DNS_TLS_PORT       main instance, DNS over TLS (5301)
#   KST_DNS_FORGED_PORT    forged instance, UDP and TCP (5302)
#   KST_DNS_STRIPPED_PORT  stripped instance, UDP and TCP (5303)
#   KST_DNS_NODS_PORT      nods instance, UDP and TCP (5304)
#   KST_DNS_TLSA_CERT      certificate whose key the TLSA records of mail.example.net and
#                          mail.acme.net name (default: the test mail system's
#                          $KST_MAIL_DIR/tls/server.pem when it exists, else $KST_DNS_DIR/tls/mx.pem,
#                          made here for the three mail host names)
#   KST_DNS_EXTRA_DIR      directory of extra records (default $KST_DNS_DIR/extra): a file named
#                          after a zone (example.net, acme.net, insecure.net, net, test, root)
#                          holds zone-file lines appended to that zone before signing (DKIM keys,
#                          other TLSA records...); run `up` again after changing it
#   KST_MAIL_SUBMISSION_PORT, KST_MAIL_SUBMISSIONS_PORT, KST_MAIL_IMAP_PORT, KST_MAIL_IMAPS_PORT
#                          ports written into the SRV records (2587, 2465, 2143, 2993, as in
#                          scripts/mailsystem.sh)
#   KST_DNS_STUB_ADDR      an address of lo where the main instance also answers on port 53, for
#                          stub resolvers that cannot be given a port (the Postfix instances of
#                          scripts/providers.sh, through the resolv.conf of their own mount
#                          namespace; the machine's resolv.conf does not name it): 127.0.0.1
#                          for the default state directory, none for any other (a private
#                          instance must not take the shared one's port 53); empty: none.
#                          BIND listens only on addresses an interface has.
#   KST_DNS_TIMEOUT        seconds to wait for each instance (30)
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

STATE="${KST_DNS_DIR:-/tmp/kst-dns}"
STATE="${STATE%/}"
PORT="${KST_DNS_PORT:-5300}"
TLS_PORT="${KST_DNS_TLS_PORT:-5301}"
FORGED_PORT="${KST_DNS_FORGED_PORT:-5302}"
STRIPPED_PORT="${KST_DNS_STRIPPED_PORT:-5303}"
NODS_PORT="${KST_DNS_NODS_PORT:-5304}"
EXTRA_DIR="${KST_DNS_EXTRA_DIR:-$STATE/extra}"
SUBMISSION_PORT="${KST_MAIL_SUBMISSION_PORT:-2587}"
SUBMISSIONS_PORT="${KST_MAIL_SUBMISSIONS_PORT:-2465}"
IMAP_PORT="${KST_MAIL_IMAP_PORT:-2143}"
IMAPS_PORT="${KST_MAIL_IMAPS_PORT:-2993}"
TIMEOUT="${KST_DNS_TIMEOUT:-30}"
if [ "$STATE" = /tmp/kst-dns ]; then STUB_ADDR="${KST_DNS_STUB_ADDR-127.0.0.1}"; else STUB_ADDR="${KST_DNS_STUB_ADDR-}"; fi

# The DoT server's certificate name (clients use tls://127.0.0.1:PORT#dns.test).
DOT_NAME="dns.test"
# Where the forged records point.
ATTACKER_HOST="mail.attacker.test."
ATTACKER_ADDR="127.0.0.66"
# The public half of tests/fixtures/dkim/test.ed25519.pem (published for selector kst-2p).
DKIM_TEST_KEY="8eVvA+faaEtHeYr3ORL0fPJprj8p/c1JnbMeVha0FE4="

# Signed zones, children before parents (each parent takes its children's DS).
SIGNED_ZONES=(example.net acme.net net .)
UNSIGNED_ZONES=(insecure.net test)
INSTANCES=(main forged stripped nods)
MARKER="$STATE/.kst-testdns"

LOG_NAME=testdns
WAIT_LOGS='named-*/named.log'
# shellcheck source=scripts/lib.sh
. "$(dirname "$SELF")/lib.sh"

check_settings() {
  [ "$(id -u)" -eq 0 ] || die "run as root (installs packages with apt-get, starts named)"
  check_state_dir KST_DNS_DIR "$STATE"
  local p
  for p in "$PORT" "$TLS_PORT" "$FORGED_PORT" "$STRIPPED_PORT" "$NODS_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT" "$IMAP_PORT" "$IMAPS_PORT"; do
    if ! [[ "$p" =~ ^[0-9]+$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then die "bad port number '$p'"; fi
  done
  [ -z "$STUB_ADDR" ] || [[ "$STUB_ADDR" =~ ^127\.[0-9]+\.[0-9]+\.[0-9]+$ ]] \
    || die "KST_DNS_STUB_ADDR must be a 127.x.y.z address (or empty), not '$STUB_ADDR'"
  [ "$(printf '%s\n' "$PORT" "$TLS_PORT" "$FORGED_PORT" "$STRIPPED_PORT" "$NODS_PORT" | sort -u | wc -l)" -eq 5 ] \
    || die "KST_DNS_PORT, KST_DNS_TLS_PORT, KST_DNS_FORGED_PORT, KST_DNS_STRIPPED_PORT and KST_DNS_NODS_PORT must differ"
}

ensure_packages() {
  local missing=()
  [ -x /usr/sbin/named ] || missing+=(bind9)
  command -v dnssec-signzone >/dev/null || missing+=(bind9-utils)
  command -v dig >/dev/null && command -v delv >/dev/null || missing+=(bind9-dnsutils)
  command -v kdig >/dev/null || missing+=(knot-dnsutils)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v flock >/dev/null || missing+=(util-linux)
  [ ${#missing[@]} -gt 0 ] || return 0
  apt_install "${missing[@]}"
}

# --- certificates -----------------------------------------------------------------------------

# new_cert NAME CN SAN: a key and a certificate signed by the test CA, in $STATE/tls.
new_cert() {
  local name="$1" cn="$2" san="$3"
  (
    cd "$STATE/tls"
    umask 077
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$name.key" -out "$name.csr" -subj "/O=kst tests/CN=$cn" 2>/dev/null
    cat >"$name.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
      -days 825 -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext" ca.srl
  )
  chmod 0644 "$STATE/tls/$name.pem"
  chmod 0600 "$STATE/tls/$name.key"
}

make_tls() {
  local dir="$STATE/tls"
  mkdir -p "$dir"
  chmod 0755 "$dir"
  if ! [ -s "$dir/ca.pem" ] || ! [ -s "$dir/ca.key" ]; then
    log "creating the test DNS CA"
    (
      cd "$dir"
      umask 077
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.pem -days 3650 -subj "/O=kst tests/CN=kst test DNS CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    )
    chmod 0644 "$dir/ca.pem"
    rm -f "$dir/dot.pem" "$dir/mx.pem"
  fi
  if ! [ -s "$dir/dot.pem" ] || ! [ -s "$dir/dot.key" ]; then
    log "creating the DoT server certificate ($DOT_NAME, 127.0.0.1)"
    new_cert dot "$DOT_NAME" "DNS:$DOT_NAME, DNS:localhost, IP:127.0.0.1"
  fi
  if ! [ -s "$dir/mx.pem" ] || ! [ -s "$dir/mx.key" ]; then
    log "creating a mail server certificate for TLSA (mail.example.net, mail.acme.net, mail.insecure.net)"
    new_cert mx mail.example.net "DNS:mail.example.net, DNS:mail.acme.net, DNS:mail.insecure.net, DNS:localhost, IP:127.0.0.1"
  fi
}

# The certificate the TLSA records name (see KST_DNS_TLSA_CERT above).
tlsa_cert() {
  if [ -n "${KST_DNS_TLSA_CERT:-}" ]; then
    [ -r "$KST_DNS_TLSA_CERT" ] || die "KST_DNS_TLSA_CERT=$KST_DNS_TLSA_CERT is not readable"
    echo "$KST_DNS_TLSA_CERT"
  elif [ -r "${KST_MAIL_DIR:-/tmp/kst-mail}/tls/server.pem" ]; then
    echo "${KST_MAIL_DIR:-/tmp/kst-mail}/tls/server.pem"
  else
    echo "$STATE/tls/mx.pem"
  fi
}

# TLSA 3 1 1 data: SHA-256 of the certificate's SubjectPublicKeyInfo (RFC 6698, DANE-EE).
spki_sha256() {
  openssl x509 -in "$1" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1
}

# --- zones ------------------------------------------------------------------------------------

# fqdn ZONE: "." for the root, "example.net." otherwise. file_name ZONE: "root" or the zone.
fqdn() { if [ "$1" = . ]; then echo .; else echo "$1."; fi; }
file_name() { if [ "$1" = . ]; then echo root; else echo "$1"; fi; }

soa() {
  local z ns
  z="$(fqdn "$1")"
  case "$1" in .) ns="ns.test." ;; *) ns="ns.$z" ;; esac
  # shellcheck disable=SC2016 # $TTL is a zone-file directive
  printf '$TTL 3600\n%s IN SOA %s hostmaster.%s @SERIAL@ 3600 600 86400 300\n' "$z" "$ns" "${z#.}"
}

# The address of a provider's MTA (mail.<domain>): the two providers of scripts/providers.sh
# each have their own (example.net 127.0.0.1, acme.net 127.0.0.2).
mta_addr() { if [ "$1" = acme.net ]; then echo 127.0.0.2; else echo 127.0.0.1; fi; }

# The records of a mail domain (example.net, acme.net, insecure.net).
mail_zone() {
  local d="$1." hash="$2" addr all
  addr="$(mta_addr "$1")"
  # acme.net's users may also send directly from their own machines (kst client --direct), so
  # its domain SPF ends in ~all (softfail, not rejected); the MTA's HELO name is -all.
  all="-all"
  [ "$1" = acme.net ] && all="~all"
  soa "$1"
  cat <<EOF
$d NS ns.$d
ns.$d A 127.0.0.1
$d MX 10 mail.$d
mail.$d A $addr
$d TXT "v=spf1 ip4:$addr $all"
mail.$d TXT "v=spf1 ip4:$addr -all"
_submission._tcp.$d SRV 0 1 $SUBMISSION_PORT mail.$d
_submissions._tcp.$d SRV 0 1 $SUBMISSIONS_PORT mail.$d
_imap._tcp.$d SRV 0 1 $IMAP_PORT mail.$d
_imaps._tcp.$d SRV 0 1 $IMAPS_PORT mail.$d
_pop3._tcp.$d SRV 0 0 0 .
_25._tcp.mail.$d TLSA 3 1 1 $hash
_mta-sts.$d TXT "v=STSv1; id=20261203T000000;"
mta-sts.$d A 127.0.0.1
EOF
  if [ "$1" = example.net ]; then
    echo "tampered.$d A 127.0.0.1"
    echo "stripped.$d A 127.0.0.1"
  fi
  # kst's reply-signing key for the two-provider tests (selector kst-2p, so that it never
  # collides with keys a test adds as extra records): the public half of
  # tests/fixtures/dkim/test.ed25519.pem, a test key.
  if [ "$1" != insecure.net ]; then
    echo "kst-2p-ed25519._domainkey.$d TXT \"v=DKIM1; k=ed25519; p=$DKIM_TEST_KEY\""
  fi
}

# The unsigned text of a zone (before DNSKEY and DS records are added), extra records included.
zone_source() {
  local z="$1" hash="$2"
  case "$z" in
    example.net | acme.net | insecure.net) mail_zone "$z" "$hash" ;;
    net)
      soa net
      cat <<EOF
net. NS ns.net.
ns.net. A 127.0.0.1
example.net. NS ns.example.net.
ns.example.net. A 127.0.0.1
acme.net. NS ns.acme.net.
ns.acme.net. A 127.0.0.1
insecure.net. NS ns.insecure.net.
ns.insecure.net. A 127.0.0.1
EOF
      ;;
    .)
      soa .
      cat <<EOF
. NS ns.test.
net. NS ns.net.
ns.net. A 127.0.0.1
test. NS ns.test.
ns.test. A 127.0.0.1
EOF
      ;;
    test)
      soa test
      cat <<EOF
test. NS ns.test.
ns.test. A 127.0.0.1
$DOT_NAME. A 127.0.0.1
$ATTACKER_HOST A $ATTACKER_ADDR
EOF
      ;;
    *) die "unknown zone $z" ;;
  esac
  local extra
  extra="$EXTRA_DIR/$(file_name "$z")"
  if [ -f "$extra" ]; then
    echo "; ----- extra records from $extra"
    cat "$extra"
  fi
}

# The public key lines of a key file, base64 joined into one token.
key_record() { grep -v '^;' "$1" | awk '{ r = $1 " 3600 IN DNSKEY " $4 " " $5 " " $6 " "; for (i = 7; i <= NF; i++) r = r $i; print r }'; }

make_keys() {
  local z name kdir="$STATE/keys"
  mkdir -p "$kdir"
  chmod 0700 "$kdir"
  for z in "${SIGNED_ZONES[@]}"; do
    name="$(file_name "$z")"
    if ! [ -s "$kdir/$name.ksk" ] || ! [ -s "$kdir/$name.zsk" ]; then
      log "creating the KSK and ZSK of $(fqdn "$z") (ECDSAP256SHA256)"
      rm -f "$kdir/$name.ksk" "$kdir/$name.zsk"
      basename "$(dnssec-keygen -q -K "$kdir" -a ECDSAP256SHA256 -f KSK -n ZONE "$(fqdn "$z")")" >"$kdir/$name.ksk"
      basename "$(dnssec-keygen -q -K "$kdir" -a ECDSAP256SHA256 -n ZONE "$(fqdn "$z")")" >"$kdir/$name.zsk"
      # The children's DS changed: every parent is signed again.
      rm -f "$STATE/zones/inputs.sha256"
    fi
  done
}

# The forged copy of a signed zone (full format, one record a line): every MX, A (except the
# name server's), SRV, TXT and TLSA rdata is replaced; the RRSIGs stay, so they no longer match.
# The _submissions._tcp SRV record (implicit TLS) is removed: a forged "no such record" that
# would send a client to STARTTLS on _submission._tcp (the NSEC record still lists SRV there).
forge() {
  local bad_hash
  bad_hash="$(printf forged | sha256sum | cut -d' ' -f1)"
  awk -v host="$ATTACKER_HOST" -v addr="$ATTACKER_ADDR" -v hash="$bad_hash" '
    /^;/ { print; next }
    $1 ~ /^_submissions\._tcp\./ && ($4 == "SRV" || ($4 == "RRSIG" && $5 == "SRV")) { next }
    $4 == "A" && $1 !~ /^ns\./ { $5 = addr }
    $4 == "MX" { $6 = host }
    $4 == "SRV" { if ($7 == 0) $7 = 25; $8 = host }
    $4 == "TLSA" { $0 = $1 " " $2 " " $3 " TLSA " $5 " " $6 " " $7 " " hash }
    $4 == "TXT" {
      txt = $0; sub(/^[^"]*/, "", txt)
      if (txt ~ /^"v=spf1/) txt = "\"v=spf1 +all\""
      else if (txt ~ /^"v=STSv1/) txt = "\"v=STSv1; id=forged;\""
      else if (txt ~ /^"v=DKIM1/) txt = "\"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\""
      else txt = "\"forged\""
      $0 = $1 " " $2 " " $3 " TXT " txt
    }
    { print }'
}

# In the good example.net: tampered.example.net's A changed after signing, stripped.example.net's
# A without its RRSIG.
tamper_in_place() {
  awk -v addr="$ATTACKER_ADDR" '
    $1 == "tampered.example.net." && $4 == "A" { $5 = addr }
    $1 == "stripped.example.net." && $4 == "RRSIG" && $5 == "A" { next }
    { print }'
}

ZONES_CHANGED=0
sign_zones() {
  local zdir="$STATE/zones" kdir="$STATE/keys" hash cert z name inputs serial
  mkdir -p "$zdir" "$EXTRA_DIR"
  chmod 0755 "$zdir"
  cert="$(tlsa_cert)"
  hash="$(spki_sha256 "$cert")" || die "cannot read the public key of $cert"
  echo "$cert" >"$STATE/tlsa-cert"
  inputs="$({
    for z in "${SIGNED_ZONES[@]}" "${UNSIGNED_ZONES[@]}"; do zone_source "$z" "$hash"; done
    cat "$kdir"/*.key
    cat "$SELF" # how the variants are made
  } | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$zdir/inputs.sha256" 2>/dev/null || true)" = "$inputs" ] \
    && [ -s "$zdir/root.signed" ] && [ -s "$zdir/example.net.forged" ] && [ -s "$zdir/net.nods" ]; then
    return 0
  fi
  serial=$(($(cat "$zdir/serial" 2>/dev/null || echo 0) + 1))
  log "signing the zones (serial $serial; TLSA from $cert)"
  local tmp
  tmp="$(mktemp -d "$zdir/sign.XXXXXX")"
  for z in "${UNSIGNED_ZONES[@]}"; do
    name="$(file_name "$z")"
    zone_source "$z" "$hash" | sed "s/@SERIAL@/$serial/" >"$tmp/$name.zone"
    named-checkzone -q "$(fqdn "$z")" "$tmp/$name.zone" || die "zone $z does not load (see $tmp/$name.zone; extra records in $EXTRA_DIR?)"
  done
  for z in "${SIGNED_ZONES[@]}"; do
    name="$(file_name "$z")"
    {
      zone_source "$z" "$hash" | sed "s/@SERIAL@/$serial/"
      key_record "$kdir/$(cat "$kdir/$name.ksk").key"
      key_record "$kdir/$(cat "$kdir/$name.zsk").key"
      # The children's DS records, from their dsset files (written when they were signed).
      local child
      for child in "${SIGNED_ZONES[@]}"; do
        [ "$child" != "$z" ] || continue
        case "$child" in
          .) continue ;;
          *.*) [ "${child#*.}" = "$z" ] || continue ;;
          *) [ "$z" = . ] || continue ;;
        esac
        cat "$tmp/dsset-$child."
      done
    } >"$tmp/$name.zone"
    local nsec=()
    [ "$z" = net ] && nsec=(-3 - -H 0)
    if ! dnssec-signzone -q -o "$(fqdn "$z")" -O full -N keep -s now-3600 -e now+31536000 \
      "${nsec[@]}" -d "$tmp" -K "$kdir" -f "$tmp/$name.signed" "$tmp/$name.zone" \
      "$kdir/$(cat "$kdir/$name.ksk").key" "$kdir/$(cat "$kdir/$name.zsk").key" >"$tmp/sign.log" 2>&1; then
      cat "$tmp/sign.log" >&2
      die "dnssec-signzone failed for zone $(fqdn "$z") (extra records in $EXTRA_DIR?)"
    fi
  done
  # The root's DS and DNSKEY as trust anchors: hickory's TrustAnchors::from_file reads DNSKEY
  # lines; delv reads trust-anchors clauses.
  mkdir -p "$tmp/anchors"
  grep -v '^;' "$tmp/dsset-." | awk '{ r = ". 3600 IN DS " $4 " " $5 " " $6 " "; for (i = 7; i <= NF; i++) r = r $i; print r }' >"$tmp/anchors/root.ds"
  key_record "$kdir/$(cat "$kdir/root.ksk").key" >"$tmp/anchors/root.key"
  {
    echo "# The kst test root (scripts/testdns.sh): its KSK as a DS (delv -a FILE +root=.)"
    echo "trust-anchors {"
    awk '{ r = ""; for (i = 8; i <= NF; i++) r = r $i; printf "  . static-ds %s %s %s \"%s\";\n", $5, $6, $7, r }' "$tmp/anchors/root.ds"
    echo "};"
  } >"$tmp/anchors/delv-ds.conf"
  {
    echo "# The kst test root (scripts/testdns.sh): its KSK as a DNSKEY (delv -a FILE +root=.)"
    echo "trust-anchors {"
    awk '{ printf "  . static-key %s %s %s \"%s\";\n", $5, $6, $7, $8 }' "$tmp/anchors/root.key"
    echo "};"
  } >"$tmp/anchors/delv-key.conf"
  # The attack variants of example.net.
  tamper_in_place <"$tmp/example.net.signed" >"$tmp/example.net.signed.tampered"
  mv -f "$tmp/example.net.signed.tampered" "$tmp/example.net.signed"
  forge <"$tmp/example.net.signed" >"$tmp/example.net.forged"
  grep -vE '^[^;[:space:]]+[[:space:]]+[0-9]+[[:space:]]+IN[[:space:]]+(DNSKEY|RRSIG|NSEC|NSEC3|NSEC3PARAM)[[:space:]]' \
    "$tmp/example.net.signed" | grep -v '^;' >"$tmp/example.net.unsigned"
  awk '!($1 == "example.net." && ($4 == "DS" || ($4 == "RRSIG" && $5 == "DS")))' \
    "$tmp/net.signed" >"$tmp/net.nods"
  # Install: everything at once, then the new serial is what `up` waits for.
  mkdir -p "$STATE/anchors"
  chmod 0755 "$STATE/anchors"
  mv -f "$tmp"/anchors/* "$STATE/anchors/"
  chmod 0644 "$STATE"/anchors/*
  for f in "$tmp"/*.zone "$tmp"/*.signed "$tmp"/example.net.forged "$tmp"/example.net.unsigned "$tmp"/net.nods "$tmp"/dsset-*; do
    chmod 0644 "$f"
    mv -f "$f" "$zdir/"
  done
  rm -rf "$tmp"
  echo "$serial" >"$zdir/serial"
  echo "$inputs" >"$zdir/inputs.sha256"
  ZONES_CHANGED=1
}

# named.conf of an instance: the zone file of each zone, by instance.
zone_file() {
  local inst="$1" z="$2" name
  name="$(file_name "$z")"
  case "$z" in insecure.net | test) echo "$STATE/zones/$name.zone"; return ;; esac
  case "$inst/$z" in
    forged/example.net) echo "$STATE/zones/example.net.forged"; return ;;
    stripped/example.net | nods/example.net) echo "$STATE/zones/example.net.unsigned"; return ;;
    nods/net) echo "$STATE/zones/net.nods"; return ;;
  esac
  echo "$STATE/zones/$name.signed"
}

named_conf() {
  local inst="$1" dir="$STATE/named-$1" port z
  port="$(inst_port "$inst")"
  if [ "$inst" = main ]; then
    cat <<EOF
tls dot {
  key-file "$STATE/tls/dot.key";
  cert-file "$STATE/tls/dot.pem";
};
EOF
  fi
  cat <<EOF
# The $inst instance of the kst test DNS (scripts/testdns.sh; written on every up).
options {
  directory "$dir";
  pid-file "$dir/named.pid";
  session-keyfile none;
  managed-keys-directory "$dir";
  listen-on port $port { 127.0.0.1; };
EOF
  [ "$inst" = main ] && echo "  listen-on port $TLS_PORT tls dot { 127.0.0.1; };"
  [ "$inst" = main ] && [ -n "$STUB_ADDR" ] && echo "  listen-on port 53 { $STUB_ADDR; };"
  cat <<EOF
  listen-on-v6 { none; };
  recursion no;
  dnssec-validation no;
  notify no;
  allow-transfer { none; };
  minimal-responses no-auth-recursive;
  max-udp-size 4096;
};
controls { };
logging {
  channel main { file "$dir/named.log" versions 2 size 20m; severity info; print-time yes; print-category yes; };
  channel queries { file "$dir/queries.log" versions 2 size 20m; print-time yes; };
  category default { main; };
  category queries { queries; };
  category lame-servers { null; };
};
EOF
  for z in "${SIGNED_ZONES[@]}" "${UNSIGNED_ZONES[@]}"; do
    printf 'zone "%s" { type primary; file "%s"; };\n' "$(fqdn "$z")" "$(zone_file "$inst" "$z")"
  done
}

# --- daemons ----------------------------------------------------------------------------------

named_pid() { pidfile_pid "$STATE/named-$1/named.pid"; }
named_running() { pid_alive "$(named_pid "$1")"; }
inst_port() { case "$1" in main) echo "$PORT" ;; forged) echo "$FORGED_PORT" ;; stripped) echo "$STRIPPED_PORT" ;; nods) echo "$NODS_PORT" ;; esac; }

# udp_listening_at ADDR PORT: something listens on ADDR:PORT/udp (the port-53 listener).
udp_listening_at() { [ -n "$(ss -Hlun "src $1 and sport = :$2" 2>/dev/null)" ]; }

# serves PORT ZONE SERIAL: the instance on PORT answers ZONE's SOA with SERIAL (over UDP).
serves() {
  [ "$(dig +short +norec +time=1 +tries=1 -p "$1" @127.0.0.1 SOA "$2" 2>/dev/null | awk '{print $3}')" = "$3" ]
}

# serves_all PORT: the instance on PORT serves every zone with the current serial.
serves_all() {
  local serial z
  serial="$(cat "$STATE/zones/serial")"
  for z in "${SIGNED_ZONES[@]}" "${UNSIGNED_ZONES[@]}"; do
    serves "$1" "$(fqdn "$z")" "$serial" || return 1
  done
}

STARTED=0
RELOADED=0
start_instance() {
  local inst="$1" dir="$STATE/named-$1" port conf_changed=0
  port="$(inst_port "$inst")"
  mkdir -p "$dir"
  chmod 0755 "$dir"
  if named_conf "$inst" | put "$dir/named.conf" 0644; then conf_changed=1; fi
  named-checkconf "$dir/named.conf" || die "named.conf of the $inst instance is wrong: $dir/named.conf"
  # named rewrites its pid file on a reload: read it once.
  local pid running=0
  pid="$(named_pid "$inst")"
  if pid_alive "$pid"; then
    running=1
    if [ "$conf_changed" -eq 1 ]; then
      # Listening ports may have changed: a reload would not move them reliably.
      log "named $inst: restarting (configuration changed)"
      stop_pid "named $inst" "$pid"
      running=0
    elif [ "$ZONES_CHANGED" -eq 1 ] || ! serves_all "$port"; then
      log "named $inst: reloading the zones"
      kill -HUP "$pid"
      RELOADED=1
    else
      log "named $inst: running (127.0.0.1:$port)"
    fi
  fi
  if [ "$running" -eq 0 ]; then
    local p
    for p in "$port" $([ "$inst" = main ] && echo "$TLS_PORT"); do
      if tcp_listening "$p" || udp_listening "$p"; then
        die "port $p is already taken by $(port_owner "$p" || echo something) (choose another with KST_DNS_*PORT)"
      fi
    done
    if [ "$inst" = main ] && [ -n "$STUB_ADDR" ] && udp_listening_at "$STUB_ADDR" 53; then
      die "$STUB_ADDR:53 is already taken (choose another with KST_DNS_STUB_ADDR, or none with KST_DNS_STUB_ADDR=)"
    fi
    rm -f "$dir/named.pid"
    STARTED=1
    log "named $inst: starting (127.0.0.1:$port$([ "$inst" = main ] && echo ", DoT :$TLS_PORT"))"
    # named is a daemon: it must not inherit any descriptor above 2, least of all the lock of a
    # caller's `flock /work/team/dns.lock CMD` (it would hold that lock for its whole life).
    if ! (close_inherited_fds; exec /usr/sbin/named -c "$dir/named.conf" -n 1) </dev/null >>"$dir/start.log" 2>&1; then
      tail -20 "$dir/start.log" "$dir/named.log" >&2 2>/dev/null || true
      die "named $inst did not start"
    fi
  fi
  local serial z
  serial="$(cat "$STATE/zones/serial")"
  for z in "${SIGNED_ZONES[@]}" "${UNSIGNED_ZONES[@]}"; do
    wait_for "named $inst (zone $(fqdn "$z") serial $serial on 127.0.0.1:$port)" serves "$port" "$(fqdn "$z")" "$serial"
  done
  if [ "$inst" = main ]; then
    wait_for "named main DoT on 127.0.0.1:$TLS_PORT" tcp_listening "$TLS_PORT"
    if [ -n "$STUB_ADDR" ]; then
      wait_for "named main on $STUB_ADDR:53" stub_serves "$serial"
    fi
  fi
}

# stub_serves SERIAL: the port-53 listener answers example.net's SOA with SERIAL.
stub_serves() {
  [ "$(dig +short +norec +time=1 +tries=1 -p 53 @"$STUB_ADDR" SOA example.net. 2>/dev/null | awk '{print $3}')" = "$1" ]
}

# --- commands ---------------------------------------------------------------------------------

print_env() {
  cat <<EOF
export KST_DNS_DIR=$STATE
export KST_DNS_PORT=$PORT
export KST_DNS_TLS_PORT=$TLS_PORT
export KST_DNS_FORGED_PORT=$FORGED_PORT
export KST_DNS_STRIPPED_PORT=$STRIPPED_PORT
export KST_DNS_NODS_PORT=$NODS_PORT
export KST_DNS_RESOLVER=127.0.0.1:$PORT
export KST_DNS_TLS_RESOLVER=tls://127.0.0.1:$TLS_PORT#$DOT_NAME
export KST_DNS_TLS_NAME=$DOT_NAME
export KST_DNS_FORGED_RESOLVER=127.0.0.1:$FORGED_PORT
export KST_DNS_STRIPPED_RESOLVER=127.0.0.1:$STRIPPED_PORT
export KST_DNS_NODS_RESOLVER=127.0.0.1:$NODS_PORT
export KST_DNS_CA=$STATE/tls/ca.pem
export KST_DNS_ANCHOR=$STATE/anchors/root.key
export KST_DNS_ANCHOR_DS=$STATE/anchors/root.ds
export KST_DNS_DELV_ANCHOR=$STATE/anchors/delv-ds.conf
export KST_DNS_DELV_ANCHOR_KEY=$STATE/anchors/delv-key.conf
export KST_DNS_TLSA_CERT=$(cat "$STATE/tlsa-cert")
export KST_DNS_MX_CERT=$STATE/tls/mx.pem
export KST_DNS_MX_KEY=$STATE/tls/mx.key
export KST_DNS_EXTRA_DIR=$EXTRA_DIR
export KST_DNS_STUB_ADDR=$STUB_ADDR
EOF
}

cmd_up() {
  check_settings
  take_lock
  ensure_packages
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  : >"$MARKER"
  make_tls
  make_keys
  sign_zones
  local inst
  for inst in "${INSTANCES[@]}"; do start_instance "$inst"; done
  if [ "$STARTED$ZONES_CHANGED$RELOADED" = 000 ]; then
    log "up: everything was running, nothing changed"
  else
    log "up: running (serial $(cat "$STATE/zones/serial"))"
  fi
  print_env | put "$STATE/env" 0644 || true
  print_env
}

cmd_down() {
  check_settings
  take_lock
  if [ ! -e "$STATE" ]; then
    log "down: nothing at $STATE"
    return 0
  fi
  [ -e "$MARKER" ] || die "$STATE was not made by this script (no $MARKER); not removing it"
  local inst
  for inst in "${INSTANCES[@]}"; do
    if named_running "$inst"; then
      log "named $inst: stopping"
      stop_pid "named $inst" "$(named_pid "$inst")"
    fi
  done
  rm -rf "$STATE"
  log "down: stopped, $STATE removed"
}

cmd_status() {
  local ok=0 inst port
  echo "state directory: $STATE$([ -e "$MARKER" ] || echo ' (absent)')"
  for inst in "${INSTANCES[@]}"; do
    port="$(inst_port "$inst")"
    if named_running "$inst"; then
      printf 'named %-8s running (pid %s), 127.0.0.1:%s%s\n' "$inst" "$(named_pid "$inst")" "$port" \
        "$([ "$inst" = main ] && echo " (DoT :$TLS_PORT $(tcp_listening "$TLS_PORT" && echo listening || echo closed))")"
    else
      printf 'named %-8s stopped\n' "$inst"
      ok=3
    fi
  done
  if [ -n "$STUB_ADDR" ]; then
    printf 'port-53 listener %s:53 (main instance): %s\n' "$STUB_ADDR" "$(udp_listening_at "$STUB_ADDR" 53 && echo listening || echo closed)"
  fi
  [ -f "$STATE/zones/serial" ] && echo "zone serial: $(cat "$STATE/zones/serial")"
  [ -f "$STATE/tlsa-cert" ] && echo "TLSA names the key of: $(cat "$STATE/tlsa-cert")"
  return "$ok"
}

cmd_env() { state_env "test DNS"; }

updown_main "" "$@"
