#!/usr/bin/env bash
# Two real mail providers on loopback for kst's end-to-end tests: example.net and acme.net, each
# its own Postfix instance (own config and queue directory, `postfix -c DIR`) on its own address,
# delivering to each other over SMTP after looking up the MX in the signed test DNS.
#
#   example.net  mail.example.net  127.0.0.1  :25 (MX), :587 submission, :465 submissions,
#                                             :10025 kst's replies (relay for 127.0.0.1 only);
#                                             keys@example.net to kst (pipe or LMTP)
#   acme.net     mail.acme.net     127.0.0.2  :25 (MX), :587 submission, :465 submissions
#
# Both check what arrives on port 25: SPF (postfix-policyd-spf-python, the HELO name for the
# null sender; Received-SPF header, SPF failures rejected) and DKIM (OpenDKIM in verify mode, an
# Authentication-Results header with the provider's authserv-id). They resolve MX, A and TXT
# through the test DNS of scripts/testdns.sh (its port-53 listener, KST_DNS_STUB_ADDR): each
# Postfix runs in its own mount namespace whose /etc/resolv.conf names that address; the
# machine's own /etc/resolv.conf is left alone. The users' mailboxes, the TLS certificate and the
# SASL logins are those of the test mail system (scripts/mailsystem.sh, its Dovecot).
#
# Usage: scripts/providers.sh up [--mode pipe|lmtp]   start (or reconfigure), print the env
#        scripts/providers.sh down                    stop both instances, remove the state dir
#        scripts/providers.sh status                  what runs (exit 3: not all)
#        scripts/providers.sh env                     the env lines again
#
# `up` is idempotent (a changed file: reload; a dead daemon: started again). It runs
# `scripts/testdns.sh up` (always; it changes nothing when nothing changed) and
# `scripts/mailsystem.sh up` when the mail system does not run. See docs/MAILSYSTEM.md.
#
# Environment:
#   KST_PROV_DIR          state directory (/tmp/kst-prov)
#   KST_PROV_MODE         pipe | lmtp: how example.net's Postfix hands keys@ to kst (pipe)
#   KST_PROV_LMTP_PORT    where example.net's Postfix dials `kst serve` in lmtp mode (7424)
#   KST_PROV_RELAY_PORT   example.net's port for kst's replies (10025)
#   KST_PROV_KST_CONFIG   the kst config pipe mode runs `kst deliver` with (default
#                         $KST_PROV_DIR/kst/kst.toml, written once; keep it readable by user kst)
#   KST_MAIL_DIR ...      the test mail system (Dovecot, TLS, the kst binary link), as for
#                         scripts/mailsystem.sh
#   KST_DNS_DIR ...       the test DNS, as for scripts/testdns.sh
#   KST_PROV_TIMEOUT      seconds to wait for each service (30)
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
DEPLOY="$ROOT/deploy"

STATE="${KST_PROV_DIR:-/tmp/kst-prov}"
STATE="${STATE%/}"
MODE="${KST_PROV_MODE:-pipe}"
LMTP_PORT="${KST_PROV_LMTP_PORT:-7424}"
RELAY_PORT="${KST_PROV_RELAY_PORT:-10025}"
TIMEOUT="${KST_PROV_TIMEOUT:-30}"
KST_CONFIG_FILE="${KST_PROV_KST_CONFIG:-$STATE/kst/kst.toml}"
MAIL="${KST_MAIL_DIR:-/tmp/kst-mail}"
MAIL="${MAIL%/}"
# Fixed by the test DNS (scripts/testdns.sh, mta_addr): the MX of each domain and its address.
PROVIDERS=(example acme)
SMTP_PORT=25
SUBMISSION_PORT=587
SUBMISSIONS_PORT=465
MARKER="$STATE/.kst-providers"

domain_of() { echo "$1.net"; }
addr_of() { case "$1" in example) echo 127.0.0.1 ;; acme) echo 127.0.0.2 ;; esac; }

LOG_NAME=providers
WAIT_LOGS='*/postfix.log'
# shellcheck source=scripts/lib.sh
. "$(dirname "$SELF")/lib.sh"

check_settings() {
  [ "$(id -u)" -eq 0 ] || die "run as root (Postfix and OpenDKIM are started as root and drop privileges)"
  check_state_dir KST_PROV_DIR "$STATE"
  [ "${#STATE}" -le 70 ] || die "KST_PROV_DIR is too long for Unix socket paths (at most 70 characters): $STATE"
  case "$MODE" in pipe | lmtp) ;; *) die "mode must be pipe or lmtp, not '$MODE'" ;; esac
  local p
  for p in "$LMTP_PORT" "$RELAY_PORT"; do
    if ! [[ "$p" =~ ^[0-9]+$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then die "bad port number '$p'"; fi
  done
}

ensure_packages() {
  local missing=()
  [ -x /usr/sbin/opendkim ] || missing+=(opendkim)
  [ -x /usr/bin/policyd-spf ] || missing+=(postfix-policyd-spf-python)
  command -v unshare >/dev/null || missing+=(util-linux)
  [ ${#missing[@]} -gt 0 ] || return 0
  # policyd-spf depends on postfix: no system instance (as scripts/mailsystem.sh).
  [ -x /usr/sbin/postfix ] || echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt_install "${missing[@]}"
}

# The test DNS (always `up`: idempotent) and the mail system (only when something is down, in
# the mode it has: another test's Postfix keeps its transport).
DNS_ENV=""
ensure_dns_and_mail() {
  local out
  if ! KST_MAIL_DIR="$MAIL" "$ROOT/scripts/mailsystem.sh" status >/dev/null 2>&1; then
    log "the test mail system at $MAIL does not run: scripts/mailsystem.sh up"
    KST_MAIL_DIR="$MAIL" KST_MAIL_MODE="$(cat "$MAIL/mode" 2>/dev/null || echo pipe)" \
      "$ROOT/scripts/mailsystem.sh" up 9<&- >/dev/null || die "scripts/mailsystem.sh up failed"
  fi
  [ -S "$MAIL/dovecot/run/lmtp" ] || die "no Dovecot LMTP socket at $MAIL/dovecot/run/lmtp"
  # `up` with the test DNS's own defaults (the variables that choose its TLSA certificate and
  # SRV ports left out): other tests (tests/dns_security.rs) call it that way too, and a
  # different choice here would make every `up` re-sign the zones under their feet. Both
  # instances then present the certificate the TLSA records name, so DANE matches.
  out="$(env -u KST_MAIL_DIR -u KST_DNS_TLSA_CERT -u KST_MAIL_SUBMISSION_PORT -u KST_MAIL_SUBMISSIONS_PORT \
    -u KST_MAIL_IMAP_PORT -u KST_MAIL_IMAPS_PORT "$ROOT/scripts/testdns.sh" up 9<&-)" \
    || die "scripts/testdns.sh up failed"
  DNS_ENV="$out"
  dns_var() { sed -n "s/^export $1=//p" <<<"$out"; }
  STUB="$(dns_var KST_DNS_STUB_ADDR)"
  ANCHOR="$(dns_var KST_DNS_ANCHOR)"
  [ -n "$STUB" ] || die "the test DNS has no port-53 listener (KST_DNS_STUB_ADDR is empty; use the default KST_DNS_DIR)"
  TLS_CERT="$(dns_var KST_DNS_TLSA_CERT)"
  if [ "$TLS_CERT" = "$(dns_var KST_DNS_MX_CERT)" ]; then TLS_KEY="$(dns_var KST_DNS_MX_KEY)"; else TLS_KEY="${TLS_CERT%.pem}.key"; fi
  [ -r "$TLS_CERT" ] && [ -r "$TLS_KEY" ] || die "no key for the TLSA certificate $TLS_CERT ($TLS_KEY)"
  # The CAs a client of the two providers trusts: the mail system's (Dovecot) and the one that
  # signed the TLSA certificate (the test DNS's, or another mail system's).
  mkdir -p "$STATE/tls"
  chmod 0755 "$STATE" "$STATE/tls"
  cat "$MAIL/tls/ca.pem" "$(dns_var KST_DNS_CA)" "$(dirname "$TLS_CERT")/ca.pem" 2>/dev/null \
    | put "$STATE/tls/ca.pem" 0644 root:root || true
}

# acme.net's address must be one lo has: Postfix refuses an inet_interfaces address that no
# interface holds ("no local interface found"), and it is how each instance knows which
# addresses are its own (mail to the other one's address must not "loop back to myself").
# 127.0.0.0/8 routes to lo anyway, so the extra address changes no route; `down` removes it
# when `up` added it.
ensure_loopback_addr() {
  local a
  a="$(addr_of acme)"
  if ! ip -4 -o addr show dev lo | grep -q " $a/"; then
    log "adding $a to lo (Postfix listens only on addresses an interface has)"
    ip addr add "$a/8" dev lo || die "cannot add $a to lo (needs CAP_NET_ADMIN)"
    mkdir -p "$STATE"
    : >"$STATE/.added-lo-addr"
  fi
}

# --- files ------------------------------------------------------------------------------------

declare -A CHANGED=()

# The transport table of example.net: keys@example.net to kst, as deploy/postfix/transport says.
transport_table() {
  local want
  case "$MODE" in
    pipe) want='kstpipe:' ;;
    lmtp) want="kstlmtp:inet:127.0.0.1:$LMTP_PORT" ;;
  esac
  echo "# keys@example.net to kst ($MODE; written by scripts/providers.sh)"
  printf 'keys@example.net    %s\n' "$want"
}

# The policyd-spf configuration of provider $1: check the HELO name (always) and the envelope
# sender, reject failures, write Received-SPF (Authentication-Results stays OpenDKIM's alone).
spf_conf() {
  cat <<EOF
# policyd-spf of mail.$(domain_of "$1") (scripts/providers.sh)
debugLevel = 1
TestOnly = 1
HELO_reject = Fail
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
# Loopback is "the internet" here: the default skips 127.0.0.0/8.
skip_addresses = 192.0.2.1/32
Header_Type = SPF
Hide_Receiver = No
EOF
}

# OpenDKIM of provider $1, verify mode: an Authentication-Results header on every message that
# arrives on port 25; DNS through the test DNS's port-53 listener, DNSSEC with the test root.
opendkim_conf() {
  local dir="$STATE/$1/opendkim"
  cat <<EOF
# OpenDKIM of mail.$(domain_of "$1") (scripts/providers.sh): verify only.
Mode                v
AuthservID          mail.$(domain_of "$1")
AlwaysAddARHeader   yes
Socket              local:$dir/sock
PidFile             $dir/opendkim.pid
UserID              opendkim:opendkim
UMask               000
Nameservers         $STUB
TrustAnchorFile     $ANCHOR
Syslog              yes
SyslogSuccess       yes
LogWhy              yes
Background          yes
EOF
}

# main.cf of provider $1: the test mail system's base (deploy/postfix/testbed/main.cf.in and the
# operator snippet, paths into the mail system's directory for what is shared: TLS, Dovecot,
# tables), then this provider's own settings with `postconf -e`.
write_postfix() {
  local p="$1" d a dir tmp
  d="$(domain_of "$p")"
  a="$(addr_of "$p")"
  dir="$STATE/$p"
  tmp="$(mktemp -d "$dir/conf.XXXXXX")"
  {
    sed -e "s#@STATE@#$MAIL#g" "$DEPLOY/postfix/testbed/main.cf.in"
    echo
    sed -e "s#/etc/postfix/#$MAIL/postfix/#g" "$DEPLOY/postfix/main.cf.snippet"
  } >"$tmp/main.cf"
  # Services: the base's three smtpd on this address and the standard ports, the daemons, and
  # the operator's kst transports (pipe: the mail system's kst link, this directory's config).
  {
    sed -e "s#@SMTP_PORT@#$SMTP_PORT#g" -e "s#@SUBMISSION_PORT@#$SUBMISSION_PORT#g" \
      -e "s#@SUBMISSIONS_PORT@#$SUBMISSIONS_PORT#g" -e "s#^127\.0\.0\.1:#$a:#" \
      "$DEPLOY/postfix/testbed/master.cf.in"
    sed -e "s#/usr/local/bin/kst#$MAIL/bin/kst#g" -e "s#/etc/kst/kst.toml#$KST_CONFIG_FILE#g" \
      "$DEPLOY/postfix/master.cf.snippet"
  } >"$tmp/master.cf"
  local smtp="$a:$SMTP_PORT/inet" setting
  # One setting per postconf call: it appends the new ones in the order of its calls (several
  # in one call come in hash order, and the file would differ on every `up`).
  for setting in \
    "queue_directory = $dir/spool" \
    "data_directory = $dir/data" \
    "maillog_file = $dir/postfix.log" \
    "maillog_file_prefixes = $STATE" \
    "myhostname = mail.$d" \
    "mydomain = $d" \
    "inet_interfaces = $a" \
    "virtual_mailbox_domains = $d" \
    "transport_maps = hash:$dir/transport" \
    "default_transport = smtp" \
    "relay_transport = smtp" \
    "smtp_dns_support_level = enabled" \
    "smtp_host_lookup = dns" \
    "smtp_bind_address = $a" \
    "smtp_tls_security_level = may" \
    "smtp_tls_CAfile = $STATE/tls/ca.pem" \
    "smtpd_tls_cert_file = $TLS_CERT" \
    "smtpd_tls_key_file = $TLS_KEY" \
    "smtp_tls_loglevel = 1" \
    "smtpd_peername_lookup = no" \
    "smtpd_recipient_restrictions = check_recipient_access regexp:$MAIL/postfix/kst_recipient_access, reject_unauth_destination, check_policy_service unix:private/policyd-spf" \
    "policyd-spf_time_limit = 3600" \
    "milter_default_action = tempfail" \
    "header_checks = regexp:$dir/header_checks" \
    "milter_header_checks = regexp:$dir/header_checks"; do
    postconf -c "$tmp" -e "$setting"
  done
  # Port 25 only: DKIM verification. Submission stays as the base has it (no SPF, no milter).
  postconf -c "$tmp" -P "$smtp/smtpd_milters=unix:$dir/opendkim/sock"
  # Submission relays for its authenticated users (the base refuses every other domain).
  postconf -c "$tmp" -P "$a:$SUBMISSION_PORT/inet/smtpd_recipient_restrictions=permit_sasl_authenticated,reject" \
    "$a:$SUBMISSIONS_PORT/inet/smtpd_recipient_restrictions=permit_sasl_authenticated,reject"
  postconf -c "$tmp" -M "policyd-spf/unix=policyd-spf unix - n n - 0 spawn user=policyd-spf argv=/usr/bin/policyd-spf $dir/policyd-spf.conf"
  if [ "$p" = example ]; then
    # kst's replies: a relay for 127.0.0.1 only (kst's [mailer]), neither SPF nor DKIM checks.
    postconf -c "$tmp" -M "127.0.0.1:$RELAY_PORT/inet=127.0.0.1:$RELAY_PORT inet n - n - - smtpd"
    postconf -c "$tmp" -P "127.0.0.1:$RELAY_PORT/inet/syslog_name=postfix/kstrelay" \
      "127.0.0.1:$RELAY_PORT/inet/mynetworks=127.0.0.1/32" \
      "127.0.0.1:$RELAY_PORT/inet/smtpd_client_restrictions=permit_mynetworks,reject" \
      "127.0.0.1:$RELAY_PORT/inet/smtpd_relay_restrictions=permit_mynetworks,reject" \
      "127.0.0.1:$RELAY_PORT/inet/smtpd_recipient_restrictions=permit_mynetworks,reject"
  fi
  if put "$dir/postfix/main.cf" 0644 root:root <"$tmp/main.cf"; then CHANGED[$p]=1; fi
  if put "$dir/postfix/master.cf" 0644 root:root <"$tmp/master.cf"; then CHANGED[$p]=1; fi
  rm -rf "$tmp"
  # The headers the receiving side wrote, in its log (INFO: logged, the message unchanged).
  if printf '%s\n' '/^(Authentication-Results|Received-SPF):/ INFO' | put "$dir/header_checks" 0644 root:root; then CHANGED[$p]=1; fi
  if { if [ "$p" = example ]; then transport_table; else echo "# acme.net runs no kst"; fi; } | put "$dir/transport" 0644 root:root \
    || [ ! -f "$dir/transport.db" ]; then
    postmap -c "$dir/postfix" "hash:$dir/transport"
    CHANGED[$p]=1
  fi
  if spf_conf "$p" | put "$dir/policyd-spf.conf" 0644 root:root; then CHANGED[$p]=1; fi
  if opendkim_conf "$p" | put "$dir/opendkim/opendkim.conf" 0644 root:root; then CHANGED["$p-dkim"]=1; fi
  # The mount namespace's resolver: the test DNS only.
  printf '# scripts/providers.sh: the test DNS (scripts/testdns.sh port-53 listener)\nnameserver %s\noptions attempts:2 timeout:2\n' "$STUB" \
    | put "$STATE/resolv.conf" 0644 root:root && CHANGED[$p]=1 || true
}

write_files() {
  mkdir -p "$STATE/kst"
  chmod 0755 "$STATE"
  : >"$MARKER"
  chown root:kst "$STATE/kst"
  chmod 0750 "$STATE/kst"
  mkdir -p "$STATE/kst/keys"
  chown kst:kst "$STATE/kst/keys"
  chmod 0700 "$STATE/kst/keys"
  local p
  for p in "${PROVIDERS[@]}"; do
    mkdir -p "$STATE/$p/postfix" "$STATE/$p/spool" "$STATE/$p/data" "$STATE/$p/opendkim"
    chown root:root "$STATE/$p/spool"
    chown postfix:postfix "$STATE/$p/data"
    chown opendkim:opendkim "$STATE/$p/opendkim"
    chmod 0755 "$STATE/$p" "$STATE/$p/postfix" "$STATE/$p/spool" "$STATE/$p/opendkim"
    write_postfix "$p"
  done
  if [ "$KST_CONFIG_FILE" = "$STATE/kst/kst.toml" ] && [ ! -f "$KST_CONFIG_FILE" ]; then
    cat <<EOF | put "$STATE/kst/kst.toml" 0640 root:kst || true
# kst for example.net behind its Postfix (written once by scripts/providers.sh; tests replace it).
[kst]
domains = ["example.net"]
trusted_mta_hosts = ["mail.example.net"]

[store]
backend = "fs"
path = "$STATE/kst/keys"

[mailer]
kind = "smtp"
host = "127.0.0.1"
port = $RELAY_PORT
tls = "none"
EOF
  fi
  echo "$MODE" >"$STATE/mode"
}

# --- daemons ----------------------------------------------------------------------------------

postfix_pid() { pidfile_pid "$STATE/$1/spool/pid/master.pid"; }
postfix_running() { pid_alive "$(postfix_pid "$1")"; }
opendkim_pid() { pidfile_pid "$STATE/$1/opendkim/opendkim.pid"; }
opendkim_running() { pid_alive "$(opendkim_pid "$1")"; }
listening() { [ -n "$(ss -Hltn "src $1 and sport = :$2" 2>/dev/null)" ]; }

# daemon COMMAND...: runs a daemon's start command with every descriptor above 2 closed (a
# caller's lock must not live on in it; flock -o is still the rule), output to daemons.log.
daemon() {
  if ! (close_inherited_fds; exec "$@") </dev/null >>"$STATE/daemons.log" 2>&1; then
    tail -20 "$STATE/daemons.log" >&2
    die "failed: $*"
  fi
}

start_opendkim() {
  local p="$1" conf="$STATE/$1/opendkim/opendkim.conf"
  if opendkim_running "$p"; then
    [ -z "${CHANGED[$p-dkim]:-}" ] && { log "opendkim $p: running"; return 0; }
    log "opendkim $p: restarting (configuration changed)"
    stop_pid "opendkim $p" "$(opendkim_pid "$p")"
  fi
  rm -f "$STATE/$p/opendkim/sock" "$STATE/$p/opendkim/opendkim.pid"
  log "opendkim $p: starting (verify, socket $STATE/$p/opendkim/sock)"
  daemon /usr/sbin/opendkim -x "$conf"
  wait_for "opendkim $p socket" test -S "$STATE/$p/opendkim/sock"
}

# Postfix in its own mount namespace: /etc/resolv.conf there is the test DNS's. Every process
# the master starts (smtp, smtpd, spawn: policyd-spf) inherits it.
start_postfix() {
  local p="$1" a conf="$STATE/$1/postfix"
  a="$(addr_of "$p")"
  if postfix_running "$p"; then
    if [ -n "${CHANGED[$p]:-}" ]; then
      log "postfix $p: reloading (configuration changed)"
      daemon postfix -c "$conf" reload
    else
      log "postfix $p: running"
    fi
  else
    local port
    for port in "$SMTP_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT"; do
      if listening "$a" "$port"; then die "$a:$port is already taken"; fi
    done
    log "postfix $p: starting (mail.$(domain_of "$p") $a: smtpd :$SMTP_PORT, submission :$SUBMISSION_PORT, submissions :$SUBMISSIONS_PORT; DNS $STUB)"
    daemon postfix -c "$conf" check
    daemon unshare -m --propagation private -- sh -c \
      'mount --bind "$1" /etc/resolv.conf && exec postfix -c "$2" start' _ "$STATE/resolv.conf" "$conf"
  fi
  local port
  for port in "$SMTP_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT"; do
    wait_for "postfix $p on $a:$port" listening "$a" "$port"
  done
  if [ "$p" = example ]; then wait_for "postfix example on 127.0.0.1:$RELAY_PORT" listening 127.0.0.1 "$RELAY_PORT"; fi
}

# --- commands ---------------------------------------------------------------------------------

print_env() {
  cat <<EOF
export KST_PROV_DIR=$STATE
export KST_PROV_MODE=$MODE
export KST_PROV_EXAMPLE_ADDR=$(addr_of example)
export KST_PROV_ACME_ADDR=$(addr_of acme)
export KST_PROV_SMTP_PORT=$SMTP_PORT
export KST_PROV_SUBMISSION_PORT=$SUBMISSION_PORT
export KST_PROV_SUBMISSIONS_PORT=$SUBMISSIONS_PORT
export KST_PROV_RELAY_PORT=$RELAY_PORT
export KST_PROV_LMTP_PORT=$LMTP_PORT
export KST_PROV_KST_CONFIG=$KST_CONFIG_FILE
export KST_PROV_EXAMPLE_POSTFIX=$STATE/example/postfix
export KST_PROV_ACME_POSTFIX=$STATE/acme/postfix
export KST_PROV_EXAMPLE_LOG=$STATE/example/postfix.log
export KST_PROV_ACME_LOG=$STATE/acme/postfix.log
export KST_PROV_MAIL_DIR=$MAIL
export KST_PROV_CA=$STATE/tls/ca.pem
export KST_PROV_CERT=$TLS_CERT
EOF
  printf '%s\n' "$DNS_ENV" | grep -E '^export KST_DNS_(DIR|RESOLVER|ANCHOR|STUB_ADDR)='
}

cmd_up() {
  check_settings
  take_lock
  ensure_packages
  ensure_dns_and_mail
  ensure_loopback_addr
  write_files
  local p
  for p in "${PROVIDERS[@]}"; do
    start_opendkim "$p"
    start_postfix "$p"
  done
  log "up: running (mode $MODE)"
  print_env | put "$STATE/env" 0644 root:root || true
  print_env
}

cmd_down() {
  check_settings
  take_lock
  [ -e "$STATE" ] || { log "down: nothing at $STATE"; return 0; }
  [ -e "$MARKER" ] || die "$STATE was not made by this script (no $MARKER); not removing it"
  local p pid
  for p in "${PROVIDERS[@]}"; do
    if postfix_running "$p"; then
      log "postfix $p: stopping"
      pid="$(postfix_pid "$p")"
      postfix -c "$STATE/$p/postfix" stop >/dev/null 2>&1 || true
      stop_pid "postfix $p" "$pid"
    fi
    if opendkim_running "$p"; then
      log "opendkim $p: stopping"
      stop_pid "opendkim $p" "$(opendkim_pid "$p")"
    fi
  done
  if [ -e "$STATE/.added-lo-addr" ]; then
    log "removing $(addr_of acme) from lo (up added it)"
    ip addr del "$(addr_of acme)/8" dev lo 2>/dev/null || true
  fi
  rm -rf "$STATE"
  log "down: stopped, $STATE removed"
}

cmd_status() {
  local ok=0 p a port
  echo "state directory: $STATE$([ -e "$MARKER" ] || echo ' (absent)'), mode $(cat "$STATE/mode" 2>/dev/null || echo -)"
  for p in "${PROVIDERS[@]}"; do
    a="$(addr_of "$p")"
    if postfix_running "$p"; then echo "postfix  $p: running (pid $(postfix_pid "$p"))"; else echo "postfix  $p: stopped"; ok=3; fi
    if opendkim_running "$p"; then echo "opendkim $p: running (pid $(opendkim_pid "$p"))"; else echo "opendkim $p: stopped"; ok=3; fi
    for port in "$SMTP_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT"; do
      printf '  %s:%-5s %s\n' "$a" "$port" "$(listening "$a" "$port" && echo listening || echo closed)"
    done
  done
  return "$ok"
}

cmd_env() { state_env "providers"; }

updown_main "pipe|lmtp" "$@"
