#!/usr/bin/env bash
# Self-test of scripts/mailsystem.sh: brings up the real mail system (Postfix, Dovecot, dnsmasq)
# in its own state directory and on its own ports, checks it with swaks, dig and python3's
# imaplib, and takes it down again. No kst needed: the pipe transport runs a stand-in that
# records its argv and stdin, and an LMTP stand-in plays `kst serve`. Exits non-zero when a
# check fails; ends with "N passed, N failed".
#
# Usage (as root): scripts/mailsystem-selftest.sh
# Environment: KST_MAIL_DIR (/tmp/kst-mail-selftest) and KST_MAIL_*_PORT as for mailsystem.sh
# (defaults here: 3525 smtpd, 3587 submission, 3465 submissions, 3143 imap, 3993 imaps,
# 5354 dns, 3424 lmtp, so that a running test system on the usual ports is left alone);
# KST_MAIL_SELFTEST_KEEP=1 leaves the system running at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
MS="$PWD/scripts/mailsystem.sh"

export KST_MAIL_DIR="${KST_MAIL_DIR:-/tmp/kst-mail-selftest}"
export KST_MAIL_SMTP_PORT="${KST_MAIL_SMTP_PORT:-3525}"
export KST_MAIL_SUBMISSION_PORT="${KST_MAIL_SUBMISSION_PORT:-3587}"
export KST_MAIL_SUBMISSIONS_PORT="${KST_MAIL_SUBMISSIONS_PORT:-3465}"
export KST_MAIL_IMAP_PORT="${KST_MAIL_IMAP_PORT:-3143}"
export KST_MAIL_IMAPS_PORT="${KST_MAIL_IMAPS_PORT:-3993}"
export KST_MAIL_DNS_PORT="${KST_MAIL_DNS_PORT:-5354}"
export KST_MAIL_LMTP_PORT="${KST_MAIL_LMTP_PORT:-3424}"
unset KST_CONFIG KST_MAIL_MODE
STATE="$KST_MAIL_DIR"
PF="$STATE/postfix"
CA="$STATE/tls/ca.pem"
PY=/usr/bin/python3

# say, ok, fail, check, wait_until (and PASSED, FAILED, FAILURES)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# --- tools ------------------------------------------------------------------------------------
missing=()
command -v swaks >/dev/null || missing+=(swaks)
command -v dig >/dev/null || missing+=(bind9-dnsutils)
perl -MNet::SSLeay -e1 2>/dev/null || missing+=(libnet-ssleay-perl)
perl -MIO::Socket::SSL -e1 2>/dev/null || missing+=(libio-socket-ssl-perl)
[ -x "$PY" ] || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- the kst stand-ins ------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/kst-mail-selftest-work.XXXXXX)"
chmod 0755 "$WORK"
mkdir -p "$WORK/out"
LMTP_PID=""
cleanup() {
  [ -z "$LMTP_PID" ] || kill "$LMTP_PID" 2>/dev/null || true
  if [ "${KST_MAIL_SELFTEST_KEEP:-0}" != 1 ]; then
    "$MS" down >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# `kst deliver` stand-in: one file per run with uid, argv and stdin; exits with the number in
# $WORK/exit (0 when absent).
cat >"$WORK/kst" <<EOF
#!/bin/sh
f="$WORK/out/\$(date +%s%N).\$\$"
{ echo "uid=\$(id -un)"; for a in "\$@"; do printf 'argv=[%s]\n' "\$a"; done; echo "---"; cat; } >"\$f.tmp"
mv "\$f.tmp" "\$f.eml"
[ -f "$WORK/exit" ] && exit "\$(cat "$WORK/exit")"
exit 0
EOF
chmod 0755 "$WORK/kst"
chown kst "$WORK/out" 2>/dev/null || true # the user may not exist before the first up
export KST_BIN="$WORK/kst"

# `kst serve` stand-in: an LMTP server that appends each message (with its peer) to a file.
cat >"$WORK/lmtp.py" <<'EOF'
import socket, sys, time
port, out, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
deadline = time.time() + seconds
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(5)
s.settimeout(0.5)
while time.time() < deadline:
    try:
        c, peer = s.accept()
    except socket.timeout:
        continue
    c.settimeout(10)
    f = c.makefile("rwb")
    def send(line):
        f.write(line.encode() + b"\r\n"); f.flush()
    send("220 lmtp stand-in")
    mail, rcpts = None, []
    try:
        while True:
            line = f.readline()
            if not line:
                break
            cmd = line.decode().strip()
            up = cmd.upper()
            if up.startswith("LHLO"):
                send("250-lmtp stand-in"); send("250-PIPELINING"); send("250 ENHANCEDSTATUSCODES")
            elif up.startswith("MAIL FROM:"):
                mail, rcpts = cmd, []; send("250 2.1.0 ok")
            elif up.startswith("RCPT TO:"):
                rcpts.append(cmd); send("250 2.1.5 ok")
            elif up == "DATA":
                send("354 go ahead")
                data = b""
                while True:
                    l = f.readline()
                    if l in (b".\r\n", b""):
                        break
                    data += l[1:] if l.startswith(b"..") else l
                with open(out, "ab") as o:
                    o.write(("peer=%s\n%s\n%s\n" % (peer[0], mail, "\n".join(rcpts))).encode() + data + b"=====\n")
                for _ in rcpts:
                    send("250 2.0.0 delivered")
            elif up in ("RSET", "NOOP"):
                send("250 2.0.0 ok")
            elif up == "QUIT":
                send("221 2.0.0 bye"); break
            else:
                send("502 5.5.2 not here")
    except OSError:
        pass
    c.close()
EOF

# --- helpers ----------------------------------------------------------------------------------
SWAKS_TLS=(--tls --tls-ca-path "$CA" --tls-verify)
# submit LOGIN FROM TO BODY [swaks args]: authenticated submission with STARTTLS.
submit() {
  local login="$1" from="$2" to="$3" body="$4"
  shift 4
  swaks --server "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" "${SWAKS_TLS[@]}" --auth PLAIN \
    --auth-user "$login" --auth-password "${login%@*}-pw" --from "$from" --to "$to" \
    --h-Subject "selftest" --body "$body" "$@" 2>&1 || true
}
# port25 FROM TO BODY [swaks args]: unauthenticated mail on the port-25 stand-in.
port25() {
  local from="$1" to="$2" body="$3"
  shift 3
  swaks --server "127.0.0.1:$KST_MAIL_SMTP_PORT" --from "$from" --to "$to" --h-Subject "selftest" \
    --body "$body" "$@" 2>&1 || true
}
queue_id() { sed -n 's/.*queued as \([0-9A-F]*\).*/\1/p' | tail -1; }
# The stand-in's record of queue id $1 (the Received: header names it).
stub_file() { grep -l "id $1\$\|id $1 " "$WORK/out/"*.eml 2>/dev/null | head -1; }
stub_count() { grep -l "id $1\$\|id $1 " "$WORK/out/"*.eml 2>/dev/null | wc -l; }
logged() { grep -q -- "$1" "$STATE/postfix.log"; }
in_queue() { postqueue -c "$PF" -p 2>/dev/null | grep -q "^$1"; }
queue_shows() { postqueue -c "$PF" -p 2>/dev/null | grep -A2 "^$1" | grep -q -- "$2"; }
argv_has() { grep -qxF "argv=[$2]" "$1"; }
# argv_pair FILE OPTION VALUE: the option is followed by exactly that value.
argv_pair() { grep -A1 -xF "argv=[$2]" "$1" | tail -1 | grep -qxF "argv=[$3]"; }
pids() {
  local f
  for f in "$STATE/postfix-spool/pid/master.pid" "$STATE/dovecot/run/master.pid" "$STATE/dnsmasq/dnsmasq.pid"; do
    printf '%s ' "$(tr -dc '0-9' 2>/dev/null <"$f")"
  done
}
imap_has() { # imap_has USER TOKEN [starttls|imaps]
  "$PY" - "$1" "$2" "${3:-starttls}" "$CA" "$KST_MAIL_IMAP_PORT" "$KST_MAIL_IMAPS_PORT" <<'EOF'
import imaplib, ssl, sys
user, token, how, ca, port, sport = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
ctx = ssl.create_default_context(cafile=ca)
if how == "imaps":
    m = imaplib.IMAP4_SSL("127.0.0.1", sport, ssl_context=ctx)
else:
    m = imaplib.IMAP4("127.0.0.1", port)
    m.starttls(ssl_context=ctx)
m.login(user, user.split("@")[0] + "-pw")
m.select("INBOX", readonly=True)
typ, data = m.search(None, "BODY", token)
ids = data[0].split()
if not ids:
    sys.exit("no message with %s in %s's INBOX" % (token, user))
typ, msg = m.fetch(ids[-1], "(RFC822)")
print(msg[0][1].decode(errors="replace"))
m.logout()
EOF
}

# --- 1. up, and a second up is a no-op ---------------------------------------------------------
say "up (pipe mode, KST_BIN = a stand-in)"
"$MS" down >/dev/null 2>&1 || true
if ! "$MS" up >"$WORK/env" 2>"$WORK/up.log"; then
  cat "$WORK/up.log" "$WORK/env"
  echo "mailsystem.sh up failed"
  echo "0 passed, 1 failed"
  exit 1
fi
ok "up brings the mail system up"
chown kst "$WORK/out"
# shellcheck disable=SC1091
. "$WORK/env"
check "up prints the env (CA, ports)" grep -q "KST_MAIL_CA=$CA" "$WORK/env"
check "the CA exists" test -s "$KST_MAIL_CA"
before="$(pids)"
"$MS" up >/dev/null 2>"$WORK/up2.log"
check "a second up is a no-op" grep -q "nothing changed" "$WORK/up2.log"
check "a second up keeps the same daemons ($before)" test "$(pids)" = "$before"
check "status says all runs" "$MS" status

# --- 2. DNS -----------------------------------------------------------------------------------
say "DNS on 127.0.0.1:$KST_MAIL_DNS_PORT"
D=(dig @127.0.0.1 -p "$KST_MAIL_DNS_PORT" +short +time=2 +tries=1)
dns_is() { local got; got="$("${D[@]}" "${@:4}" "$1" "$2" | tr '\n' ' ' | sed 's/ $//')"; [ "$got" = "$3" ] || { echo "$1 $2: got '$got', want '$3'"; return 1; }; }
check "MX example.net" dns_is MX example.net "10 mail.example.net."
check "MX acme.net" dns_is MX acme.net "10 mail.acme.net."
check "A mail.example.net" dns_is A mail.example.net "127.0.0.1"
check "A mail.acme.net" dns_is A mail.acme.net "127.0.0.1"
check "SRV _submission._tcp.example.net (RFC 6186)" dns_is SRV _submission._tcp.example.net "0 1 $KST_MAIL_SUBMISSION_PORT mail.example.net."
check "SRV _submission._tcp.acme.net" dns_is SRV _submission._tcp.acme.net "0 1 $KST_MAIL_SUBMISSION_PORT mail.acme.net."
check "SRV _imap._tcp.example.net" dns_is SRV _imap._tcp.example.net "0 1 $KST_MAIL_IMAP_PORT mail.example.net."
check "SRV _imaps._tcp.acme.net" dns_is SRV _imaps._tcp.acme.net "0 1 $KST_MAIL_IMAPS_PORT mail.acme.net."
check "SRV _submissions._tcp.example.net (RFC 8314)" dns_is SRV _submissions._tcp.example.net "0 1 $KST_MAIL_SUBMISSIONS_PORT mail.example.net."
check "TXT example.net (SPF)" dns_is TXT example.net '"v=spf1 ip4:127.0.0.1 -all"'
check "MX example.net over TCP" dns_is MX example.net "10 mail.example.net." +tcp
check "unknown name in the zone is NXDOMAIN" bash -c "dig @127.0.0.1 -p $KST_MAIL_DNS_PORT +time=2 +tries=1 A nope.example.net | grep -q 'status: NXDOMAIN'"
check "other domains are not resolved (no upstream)" bash -c "dig @127.0.0.1 -p $KST_MAIL_DNS_PORT +time=2 +tries=1 A debian.org | grep -q 'status: REFUSED'"

# --- 3. TLS -----------------------------------------------------------------------------------
say "TLS with the generated CA"
tls_ok() { openssl s_client "$@" -CAfile "$CA" -verify_return_error </dev/null >/dev/null 2>&1; }
check "submission STARTTLS verifies for mail.example.net" tls_ok -starttls smtp -connect "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" -verify_hostname mail.example.net
check "submission STARTTLS verifies for mail.acme.net" tls_ok -starttls smtp -connect "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" -verify_hostname mail.acme.net
check "submissions (implicit TLS) verifies" tls_ok -connect "127.0.0.1:$KST_MAIL_SUBMISSIONS_PORT" -verify_hostname mail.example.net
check "IMAP STARTTLS verifies" tls_ok -starttls imap -connect "127.0.0.1:$KST_MAIL_IMAP_PORT" -verify_hostname mail.example.net
check "IMAPS verifies" tls_ok -connect "127.0.0.1:$KST_MAIL_IMAPS_PORT" -verify_hostname mail.example.net
check "the certificate does not verify against the system CAs" bash -c "! openssl s_client -starttls smtp -connect 127.0.0.1:$KST_MAIL_SUBMISSION_PORT -CAfile /etc/ssl/certs/ca-certificates.crt -verify_return_error </dev/null >/dev/null 2>&1"

# --- 4. submission: who authenticated reaches kst ----------------------------------------------
say "authenticated submission as alice to keys@example.net (pipe transport)"
out="$(submit alice@example.net alice@example.net keys@example.net "publication $RANDOM")"
qid="$(printf '%s\n' "$out" | queue_id)"
if [ -n "$qid" ]; then ok "alice's submission is queued ($qid)"; else fail "alice's submission is queued" "$out"; fi
if wait_until 20 stub_file "$qid"; then
  f="$(stub_file "$qid")"
  ok "the pipe transport ran the kst stand-in"
  check "it ran as user kst" grep -qx "uid=kst" "$f"
  check "argv: deliver --config $STATE/kst/kst.toml" argv_pair "$f" --config "$STATE/kst/kst.toml"
  check "argv: --sender alice@example.net" argv_pair "$f" --sender alice@example.net
  check "argv: --recipient keys@example.net" argv_pair "$f" --recipient keys@example.net
  check "argv: --sasl-username alice@example.net" argv_pair "$f" --sasl-username alice@example.net
  check "Received: (Authenticated sender: alice@example.net)" grep -q "(Authenticated sender: alice@example.net)" "$f"
  check "Received: by mail.example.net (Postfix) with ESMTPSA" grep -q "by mail.example.net (Postfix) with ESMTPSA id $qid" "$f"
  check "Return-Path: <alice@example.net> (pipe flag R)" grep -q "^Return-Path: <alice@example.net>" "$f"
  echo "        the headers kst sees:"
  sed -n '/^---$/,/^$/p' "$f" | sed '1d;$d' | sed 's/^/        | /'
else
  fail "the pipe transport ran the kst stand-in" "$(tail -20 "$STATE/postfix.log")"
fi

out="$(swaks --server "127.0.0.1:$KST_MAIL_SUBMISSIONS_PORT" --tlsc --tls-ca-path "$CA" --tls-verify \
  --auth PLAIN --auth-user carol@acme.net --auth-password carol-pw --from carol@acme.net \
  --to keys@example.net --body "alice@example.net" 2>&1 || true)"
check "carol@acme.net submits to keys@example.net over submissions (implicit TLS)" grep -q "queued as" <<<"$out"

say "what submission refuses"
out="$(submit bob@example.net alice@example.net keys@example.net "forged")"
check "bob authenticated but MAIL FROM alice: 553 not owned" grep -q "553 5.7.1.*not owned by user bob@example.net" <<<"$out"
out="$(submit alice@example.net alice@example.net someone@debian.org "relay")"
check "alice to a foreign domain: relay access denied" grep -q "554 5.7.1.*Relay access denied" <<<"$out"
out="$(swaks --server "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" "${SWAKS_TLS[@]}" --from alice@example.net --to keys@example.net 2>&1 || true)"
check "submission without AUTH: client rejected" grep -q "554 5.7.1.*Access denied" <<<"$out"
out="$(swaks --server "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" "${SWAKS_TLS[@]}" --auth PLAIN --auth-user alice@example.net --auth-password wrong --from alice@example.net --to keys@example.net 2>&1 || true)"
check "wrong password: 535" grep -q "535 5.7.8" <<<"$out"
out="$(swaks --server "127.0.0.1:$KST_MAIL_SUBMISSION_PORT" --quit-after EHLO 2>&1 || true)"
# shellcheck disable=SC2016 # $1 is for the inner bash
check "no AUTH offered before STARTTLS" bash -c '! grep -q "250.AUTH" <<<"$1" && grep -q "250.STARTTLS" <<<"$1"' _ "$out"
out="$(swaks --server "127.0.0.1:$KST_MAIL_SMTP_PORT" --quit-after EHLO 2>&1 || true)"
# shellcheck disable=SC2016
check "no AUTH on the port-25 stand-in" bash -c '! grep -q "250.AUTH" <<<"$1"' _ "$out"

# --- 5. port 25: mail from outside --------------------------------------------------------------
say "the port-25 stand-in"
out="$(port25 mallory@evil.example victim@debian.org "relay me")"
check "unauthenticated relay to a foreign domain: 554 relay access denied" grep -q "554 5.7.1.*Relay access denied" <<<"$out"
out="$(port25 nobody@evil.example nobody@example.net "unknown")"
check "unknown user: 550 rejected" grep -q "550 5.1.1" <<<"$out"
token="token$RANDOM$RANDOM"
out="$(port25 carol@acme.net bob@example.net "hello bob $token")"
check "carol -> bob@example.net on port 25 is accepted" grep -q "queued as" <<<"$out"
bob_has() { grep -rqs "$token" "$STATE/mail/example.net/bob/Maildir/new"; }
if wait_until 20 bob_has; then ok "it lands in bob's Maildir ($STATE/mail/example.net/bob/Maildir/new)"; else fail "it lands in bob's Maildir" "$(tail -20 "$STATE/postfix.log")"; fi
check "bob reads it over IMAP with STARTTLS" imap_has bob@example.net "$token" starttls
check "bob reads it over IMAPS" imap_has bob@example.net "$token" imaps
check "no IMAP login before STARTTLS (client on 127.0.0.2: LOGINDISABLED)" "$PY" - "$KST_MAIL_IMAP_PORT" <<'EOF'
import imaplib, socket, sys
class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=("127.0.0.2", 0))
m = Imap("127.0.0.1", int(sys.argv[1]))
assert "LOGINDISABLED" in m.capabilities, m.capabilities
try:
    m.login("bob@example.net", "bob-pw")
except imaplib.IMAP4.error:
    sys.exit(0)
sys.exit("plaintext login worked")
EOF

out="$(port25 "<>" keys@acme.net "a bounce")"
qid="$(printf '%s\n' "$out" | queue_id)"
if [ -n "$qid" ] && wait_until 20 stub_file "$qid"; then
  f="$(stub_file "$qid")"
  ok "unauthenticated null-sender mail to keys@acme.net reaches the stand-in"
  check "argv: --sender '' (null sender, null_sender=)" argv_pair "$f" --sender ""
  check "argv: --sasl-username '' (not authenticated)" argv_pair "$f" --sasl-username ""
  check "Received: with ESMTP, no Authenticated sender" bash -c "grep -q 'by mail.example.net (Postfix) with ESMTP id $qid' '$f' && ! grep -q 'Authenticated sender' '$f'"
else
  fail "unauthenticated null-sender mail to keys@acme.net reaches the stand-in" "$out"
fi

# --- 6. exit 75: Postfix keeps the mail and retries; exit 65: bounce ---------------------------
say "kst exits 75: deferred and retried"
echo 75 >"$WORK/exit"
out="$(submit alice@example.net alice@example.net keys@example.net "deferred $RANDOM")"
qid="$(printf '%s\n' "$out" | queue_id)"
deferred_twice() { [ "$(grep -c "$qid: to=<keys@example.net>, relay=kstpipe.*status=deferred" "$STATE/postfix.log")" -ge 2 ]; }
if [ -n "$qid" ] && wait_until 20 logged "$qid: to=<keys@example.net>, relay=kstpipe.*status=deferred"; then
  ok "exit 75 defers $qid"
  check "postqueue -p shows it with (temporary failure)" queue_shows "$qid" "temporary failure"
  if wait_until 30 deferred_twice; then ok "Postfix retries by itself within seconds"; else fail "Postfix retries by itself" "$(grep "$qid" "$STATE/postfix.log")"; fi
  rm -f "$WORK/exit"
  postqueue -c "$PF" -f
  if wait_until 20 logged "$qid: to=<keys@example.net>, relay=kstpipe.*status=sent"; then ok "after kst recovers, postqueue -f delivers it"; else fail "after kst recovers, postqueue -f delivers it" "$(grep "$qid" "$STATE/postfix.log")"; fi
  check "the queue is empty again" bash -c "! postqueue -c '$PF' -p | grep -q '^$qid'"
  check "kst saw the message on every attempt ($(stub_count "$qid") times)" test "$(stub_count "$qid")" -ge 3
else
  fail "exit 75 defers the message" "$out$(tail -5 "$STATE/postfix.log")"
fi
rm -f "$WORK/exit"

say "kst exits 65: bounced to the sender"
echo 65 >"$WORK/exit"
out="$(submit bob@example.net bob@example.net keys@example.net "not for kst $RANDOM")"
qid="$(printf '%s\n' "$out" | queue_id)"
if [ -n "$qid" ] && wait_until 20 logged "$qid: to=<keys@example.net>, relay=kstpipe.*status=bounced"; then
  ok "exit 65 bounces $qid"
  check "the bounce reaches bob over IMAP" wait_until 20 imap_has bob@example.net "$qid"
else
  fail "exit 65 bounces the message" "$out$(tail -5 "$STATE/postfix.log")"
fi
rm -f "$WORK/exit"

# --- 7. LMTP mode -------------------------------------------------------------------------------
say "LMTP mode: keys@ to 127.0.0.1:$KST_MAIL_LMTP_PORT"
check "up --mode lmtp" "$MS" up --mode lmtp
check "the transport table points at kstlmtp" grep -q "^keys@example.net[[:space:]]*kstlmtp:inet:127.0.0.1:$KST_MAIL_LMTP_PORT" "$PF/transport"
out="$(submit alice@example.net alice@example.net keys@example.net "over lmtp $RANDOM")"
qid="$(printf '%s\n' "$out" | queue_id)"
if [ -n "$qid" ] && wait_until 20 logged "$qid: to=<keys@example.net>, relay=none.*status=deferred.*Connection refused"; then
  ok "kst serve down: Postfix defers $qid (connection refused)"
else
  fail "kst serve down: Postfix defers" "$out$(tail -5 "$STATE/postfix.log")"
fi
"$PY" "$WORK/lmtp.py" "$KST_MAIL_LMTP_PORT" "$WORK/lmtp.out" 60 &
LMTP_PID=$!
wait_until 10 bash -c "ss -Hltn 'sport = :$KST_MAIL_LMTP_PORT' | grep -q ." || true
postqueue -c "$PF" -f
lmtp_got() { grep -qs "id $qid" "$WORK/lmtp.out"; }
if [ -n "$qid" ] && wait_until 20 lmtp_got; then
  ok "kst serve back, postqueue -f: delivered over LMTP"
  check "LMTP peer is 127.0.0.1 (lmtp_bind_address)" grep -qx "peer=127.0.0.1" "$WORK/lmtp.out"
  check "LMTP MAIL FROM:<alice@example.net>" grep -q "^MAIL FROM:<alice@example.net>" "$WORK/lmtp.out"
  check "LMTP Received: (Authenticated sender: alice@example.net) ... with ESMTPSA" bash -c "grep -q '(Authenticated sender: alice@example.net)' '$WORK/lmtp.out' && grep -q 'by mail.example.net (Postfix) with ESMTPSA id $qid' '$WORK/lmtp.out'"
  check "Postfix logs status=sent for it" wait_until 10 logged "$qid: to=<keys@example.net>, relay=127.0.0.1\[127.0.0.1\]:$KST_MAIL_LMTP_PORT.*status=sent"
else
  fail "delivered over LMTP" "$(tail -10 "$STATE/postfix.log")"
fi
kill "$LMTP_PID" 2>/dev/null || true
wait "$LMTP_PID" 2>/dev/null || true
LMTP_PID=""
check "up --mode pipe switches back" "$MS" up --mode pipe
check "the transport table points at kstpipe again" grep -q "^keys@example.net[[:space:]]*kstpipe:" "$PF/transport"

# --- 8. down and up again -----------------------------------------------------------------------
say "down, up, up"
old="$(pids)"
check "down" "$MS" down
# Gone or a zombie (where PID 1 does not reap orphans quickly, they linger as such).
gone() {
  local p st
  for p in $old; do
    st="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)"
    case "$st" in "" | Z | X) ;; *) echo "pid $p is still there ($st)"; return 1 ;; esac
  done
}
check "the daemons are gone ($old)" gone
check "the state directory is gone" test ! -e "$STATE"
closed() { local p; for p in $KST_MAIL_SMTP_PORT $KST_MAIL_SUBMISSION_PORT $KST_MAIL_SUBMISSIONS_PORT $KST_MAIL_IMAP_PORT $KST_MAIL_IMAPS_PORT $KST_MAIL_DNS_PORT; do [ -z "$(ss -Hltn "sport = :$p")" ] || return 1; done; }
check "the ports are closed" closed
check "status says stopped (exit 3)" bash -c "'$MS' status >/dev/null; [ \$? -eq 3 ]"
check "down again is harmless" "$MS" down
check "up again, its output captured through a pipe (no daemon keeps it open)" timeout 120 "$MS" up
chown kst "$WORK/out"
out="$(submit alice@example.net alice@example.net keys@example.net "after restart $RANDOM")"
qid="$(printf '%s\n' "$out" | queue_id)"
check "mail flows after the restart" wait_until 20 stub_file "$qid"
"$MS" up >/dev/null 2>"$WORK/up3.log"
check "and a second up is a no-op" grep -q "nothing changed" "$WORK/up3.log"

# --- summary ------------------------------------------------------------------------------------
echo
if [ "$FAILED" -gt 0 ]; then
  echo "failed:"
  printf '  %s\n' "${FAILURES[@]}"
  echo "postfix log tail:"
  tail -20 "$STATE/postfix.log" 2>/dev/null | sed 's/^/  | /' || true
fi
echo "selftest: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
