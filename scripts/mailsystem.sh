#!/usr/bin/env bash
# A real mail system on 127.0.0.1 for kst's end-to-end tests, built from the files an operator
# copies from deploy/ (paths and ports rewritten):
#   Postfix  example.net + acme.net; "port 25" smtpd, submission (STARTTLS + SASL), submissions;
#            keys@example.net and keys@acme.net to kst (pipe(8) `kst deliver`, or LMTP `kst serve`)
#   Dovecot  IMAP (STARTTLS) and IMAPS for the users' mailboxes, LMTP and SASL auth for Postfix
#   dnsmasq  MX, SRV (RFC 6186) and TXT records of both domains
# Everything lives in one state directory; `down` removes it. Runs as root on Debian 12, installs
# the Debian packages where missing, starts the daemons directly (no systemd). See
# docs/MAILSYSTEM.md.
#
# Usage: scripts/mailsystem.sh up [--mode pipe|lmtp|pool] start (or reconfigure), print the env
#        scripts/mailsystem.sh down                     stop everything, remove the state directory
#        scripts/mailsystem.sh status                   what runs, on which ports (exit 3: not all)
#        scripts/mailsystem.sh env                      print the env of a running system
#
# `up` is idempotent: when everything runs and nothing changed it changes nothing. The env lines
# (export KST_MAIL_...=...) go to stdout and to $KST_MAIL_DIR/env; progress goes to stderr, so
#   eval "$(scripts/mailsystem.sh up)"
# works.
#
# Environment:
#   KST_MAIL_DIR              state directory (/tmp/kst-mail)
#   KST_MAIL_MODE             pipe | lmtp | pool: how Postfix hands keys@ to kst (pipe; --mode
#                             wins). pool: LMTP to a list of `kst serve` instances, tried in order
#   KST_BIN                   kst executable for the pipe transport (<repo>/target/debug/kst)
#   KST_CONFIG                kst config to install as $KST_MAIL_DIR/kst/kst.toml (default: a
#                             generated one, kept once written so tests may rewrite it)
#   KST_MAIL_SMTP_PORT        "port 25" smtpd (2525)
#   KST_MAIL_SUBMISSION_PORT  submission, STARTTLS + AUTH (2587)
#   KST_MAIL_SUBMISSIONS_PORT submissions, implicit TLS + AUTH (2465)
#   KST_MAIL_IMAP_PORT        IMAP, STARTTLS (2143)
#   KST_MAIL_IMAPS_PORT       IMAPS (2993)
#   KST_MAIL_DNS_PORT         dnsmasq, UDP and TCP (5353)
#   KST_MAIL_LMTP_PORT        where Postfix finds `kst serve` in lmtp mode (2424)
#   KST_MAIL_LMTP_POOL_PORTS  the `kst serve` instances of pool mode, three ports separated by
#                             spaces (KST_MAIL_LMTP_PORT and the next two)
#   KST_MAIL_TIMEOUT          seconds to wait for each service (30)
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
DEPLOY="$ROOT/deploy"

STATE="${KST_MAIL_DIR:-/tmp/kst-mail}"
STATE="${STATE%/}"
MODE="${KST_MAIL_MODE:-pipe}"
KST_BIN="${KST_BIN:-$ROOT/target/debug/kst}"
SMTP_PORT="${KST_MAIL_SMTP_PORT:-2525}"
SUBMISSION_PORT="${KST_MAIL_SUBMISSION_PORT:-2587}"
SUBMISSIONS_PORT="${KST_MAIL_SUBMISSIONS_PORT:-2465}"
IMAP_PORT="${KST_MAIL_IMAP_PORT:-2143}"
IMAPS_PORT="${KST_MAIL_IMAPS_PORT:-2993}"
DNS_PORT="${KST_MAIL_DNS_PORT:-5353}"
LMTP_PORT="${KST_MAIL_LMTP_PORT:-2424}"
read -r -a POOL_PORTS <<<"${KST_MAIL_LMTP_POOL_PORTS:-$LMTP_PORT $((LMTP_PORT + 1)) $((LMTP_PORT + 2))}"
TIMEOUT="${KST_MAIL_TIMEOUT:-30}"

# Mailbox users; the password of each is its local part + "-pw" (alice-pw).
USERS=(alice@example.net bob@example.net carol@acme.net postmaster@example.net)

PF_CONF="$STATE/postfix"
DOVECOT_CONF="$STATE/dovecot/dovecot.conf"
DNSMASQ_CONF="$STATE/dnsmasq/dnsmasq.conf"
DNSMASQ_PID="$STATE/dnsmasq/dnsmasq.pid"
MARKER="$STATE/.kst-mailsystem"

LOG_NAME=mailsystem
# shellcheck source=scripts/lib.sh
. "$(dirname "$SELF")/lib.sh"

check_settings() {
  [ "$(id -u)" -eq 0 ] || die "run as root (Postfix, Dovecot and dnsmasq are started as root and drop privileges)"
  check_state_dir KST_MAIL_DIR "$STATE"
  # Unix socket paths ($STATE/dovecot/run/auth-postfix) must stay under 108 bytes.
  [ "${#STATE}" -le 70 ] || die "KST_MAIL_DIR is too long for Unix socket paths (at most 70 characters): $STATE"
  case "$MODE" in pipe | lmtp | pool) ;; *) die "mode must be pipe, lmtp or pool, not '$MODE'" ;; esac
  [ "${#POOL_PORTS[@]}" -eq 3 ] || die "KST_MAIL_LMTP_POOL_PORTS must name three ports, not '${POOL_PORTS[*]}'"
  local p
  for p in "$SMTP_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT" "$IMAP_PORT" "$IMAPS_PORT" "$DNS_PORT" "$LMTP_PORT" "${POOL_PORTS[@]}"; do
    if ! [[ "$p" =~ ^[0-9]+$ ]] || [ "$p" -lt 1 ] || [ "$p" -gt 65535 ]; then die "bad port number '$p'"; fi
  done
}

# --- packages ---------------------------------------------------------------------------------

INSTALLED_NOW=0
ensure_packages() {
  local missing=()
  [ -x /usr/sbin/postfix ] || missing+=(postfix)
  [ -x /usr/sbin/dovecot ] || missing+=(dovecot-core)
  [ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-imapd)
  [ -x /usr/lib/dovecot/lmtp ] || missing+=(dovecot-lmtpd)
  command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v flock >/dev/null || missing+=(util-linux)
  [ ${#missing[@]} -gt 0 ] || return 0
  export DEBIAN_FRONTEND=noninteractive
  if [[ " ${missing[*]} " == *" postfix "* ]]; then
    # No system instance: this script runs its own. (Debian's default, "Internet Site", would
    # configure and start one on port 25.)
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  fi
  apt_install "${missing[@]}"
  INSTALLED_NOW=1
}

# A package's postinst may start the system Postfix or Dovecot (where no policy-rc.d forbids
# it). They are not ours and not needed: stop what the install started.
stop_system_instances() {
  [ "$INSTALLED_NOW" -eq 1 ] || return 0
  if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
    log "stopping the system Postfix that the package installation started"
    postfix stop >/dev/null 2>&1 || true
  fi
  if [ -f /run/dovecot/master.pid ] && kill -0 "$(cat /run/dovecot/master.pid)" 2>/dev/null; then
    log "stopping the system Dovecot that the package installation started"
    dovecot stop >/dev/null 2>&1 || true
  fi
}

ensure_users() {
  local u
  for u in kst vmail; do
    if ! getent passwd "$u" >/dev/null; then
      log "creating system user $u"
      useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin "$u"
    fi
  done
}

# --- files ------------------------------------------------------------------------------------

CHANGED_POSTFIX=0
CHANGED_DOVECOT=0
CHANGED_DNSMASQ=0
STARTED=0

# Fills the placeholders of a deploy/ template.
render() {
  sed -e "s#@STATE@#$STATE#g" \
    -e "s#@SMTP_PORT@#$SMTP_PORT#g" \
    -e "s#@SUBMISSION_PORT@#$SUBMISSION_PORT#g" \
    -e "s#@SUBMISSIONS_PORT@#$SUBMISSIONS_PORT#g" \
    -e "s#@IMAP_PORT@#$IMAP_PORT#g" \
    -e "s#@IMAPS_PORT@#$IMAPS_PORT#g" \
    -e "s#@DNS_PORT@#$DNS_PORT#g" \
    -e "s#@LMTP_PORT@#$LMTP_PORT#g" "$@"
}

# Moves the operator paths of deploy/postfix/*.snippet and transport into the state directory.
operator_paths() {
  sed -e "s#/etc/postfix/#$STATE/postfix/#g" \
    -e "s#/usr/local/bin/kst#$STATE/bin/kst#g" \
    -e "s#/etc/kst/kst.toml#$STATE/kst/kst.toml#g" \
    -e "s#\[127\.0\.0\.1\]:2424, \[127\.0\.0\.1\]:2425, \[127\.0\.0\.1\]:2426#[127.0.0.1]:${POOL_PORTS[0]}, [127.0.0.1]:${POOL_PORTS[1]}, [127.0.0.1]:${POOL_PORTS[2]}#g" \
    -e "s#127\.0\.0\.1:2424#127.0.0.1:$LMTP_PORT#g" "$@"
}

# Installs a Postfix lookup table and its .db.
put_map() {
  local name="$1"
  if put "$PF_CONF/$name" 0644 root:root || [ ! -f "$PF_CONF/$name.db" ]; then
    postmap -c "$PF_CONF" "hash:$PF_CONF/$name"
    CHANGED_POSTFIX=1
  fi
}

# The deploy/postfix/transport lines of the mode: kstpipe:, kstlmtp: with one next hop (lmtp), or
# kstlmtp: with a list of next hops (pool, the lines with a comma).
transport_table() {
  case "$MODE" in
    pipe) operator_paths "$DEPLOY/postfix/transport" ;;
    lmtp)
      operator_paths "$DEPLOY/postfix/transport" \
        | sed -E -e 's/^(keys@[^[:space:]]+[[:space:]]+kstpipe:)/#\1/' \
          -e '/,/!s/^#(keys@[^[:space:]]+[[:space:]]+kstlmtp:inet:)/\1/'
      ;;
    pool)
      operator_paths "$DEPLOY/postfix/transport" \
        | sed -E -e 's/^(keys@[^[:space:]]+[[:space:]]+kstpipe:)/#\1/' \
          -e '/,/s/^#(keys@[^[:space:]]+[[:space:]]+kstlmtp:)/\1/'
      ;;
  esac
}

make_tls() {
  local dir="$STATE/tls"
  mkdir -p "$dir"
  chmod 0755 "$dir"
  if [ -s "$dir/ca.pem" ] && [ -s "$dir/server.pem" ] && [ -s "$dir/server.key" ]; then
    return 0
  fi
  log "creating a test CA and the server certificate (mail.example.net, mail.acme.net)"
  (
    cd "$dir"
    umask 077
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout ca.key -out ca.pem -days 3650 -subj "/O=kst tests/CN=kst test mail CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -addext "subjectKeyIdentifier=hash" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout server.key -out server.csr -subj "/O=kst tests/CN=mail.example.net" 2>/dev/null
    cat >server.ext <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:mail.example.net, DNS:mail.acme.net, DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -days 825 -sha256 -extfile server.ext -out server.pem 2>/dev/null
    rm -f server.csr server.ext ca.srl
  )
  chmod 0644 "$dir/ca.pem" "$dir/server.pem"
  chmod 0600 "$dir/ca.key" "$dir/server.key"
  CHANGED_POSTFIX=1
  CHANGED_DOVECOT=1
}

dovecot_users() {
  local f="$STATE/dovecot/users" u
  [ -s "$f" ] && return 0
  log "creating Dovecot users ${USERS[*]} (password: local part + -pw)"
  {
    echo "# user:password:uid:gid:gecos:home:extra  (uid, gid and home from userdb default_fields)"
    for u in "${USERS[@]}"; do
      printf '%s:%s::::::\n' "$u" "$(doveadm -c "$DOVECOT_CONF" pw -s SHA512-CRYPT -p "${u%@*}-pw")"
    done
  } | put "$f" 0640 root:dovecot || true
  CHANGED_DOVECOT=1
}

default_kst_config() {
  cat <<EOF
# kst configuration for the test mail system (written by scripts/mailsystem.sh once; tests may
# replace this file: \`kst deliver\` reads it on every delivery).
[kst]
domains = ["example.net", "acme.net"]
trusted_mta_hosts = ["mail.example.net"]

[store]
backend = "fs"
path = "$STATE/kst/keys"

[mailer]
# Replies enter Postfix like any mail from outside and are delivered to the users' mailboxes.
kind = "smtp"
host = "127.0.0.1"
port = $SMTP_PORT
tls = "none"

[log]
level = "info"
EOF
}

# The pipe transport runs $STATE/bin/kst: a link to $KST_BIN when user kst can reach it, else a
# copy; a stand-in that exits 75 (Postfix keeps the mail) when there is no binary yet.
link_kst_bin() {
  local bin="$STATE/bin" target
  mkdir -p "$bin"
  chmod 0755 "$bin"
  cat <<'EOF' | put "$bin/kst-missing" 0755 root:root || true
#!/bin/sh
echo "kst-missing: no kst binary was installed for the test mail system (set KST_BIN and run scripts/mailsystem.sh up)" >&2
exit 75
EOF
  if [ -f "$KST_BIN" ] && [ -x "$KST_BIN" ]; then
    target="$(readlink -f "$KST_BIN")"
    if ! runuser -u kst -- test -x "$target" || ! runuser -u kst -- test -r "$target"; then
      log "user kst cannot reach $target: using a copy in $bin"
      if ! cmp -s "$target" "$bin/kst.copy" 2>/dev/null; then
        install -m 0755 "$target" "$bin/kst.copy.tmp"
        mv -f "$bin/kst.copy.tmp" "$bin/kst.copy"
      fi
      target="$bin/kst.copy"
    fi
  else
    log "WARNING: KST_BIN=$KST_BIN is not an executable file; keys@ mail is deferred (exit 75) until one is installed"
    target="$bin/kst-missing"
  fi
  if [ "$(readlink "$bin/kst" 2>/dev/null || true)" != "$target" ]; then
    ln -sfn "$target" "$bin/kst.new"
    mv -Tf "$bin/kst.new" "$bin/kst"
    log "pipe transport runs $target"
  fi
}

write_files() {
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  : >"$MARKER"
  mkdir -p "$PF_CONF" "$STATE/postfix-spool" "$STATE/postfix-data" "$STATE/dovecot" "$STATE/dnsmasq" "$STATE/kst" "$STATE/mail"
  # The queue directory belongs to root; `postfix check` creates its subdirectories.
  chown root:root "$STATE/postfix-spool"
  chmod 0755 "$PF_CONF" "$STATE/postfix-spool" "$STATE/dovecot" "$STATE/dnsmasq"
  chown postfix:postfix "$STATE/postfix-data"
  chown vmail:vmail "$STATE/mail"
  chmod 0700 "$STATE/mail"
  chown root:kst "$STATE/kst"
  chmod 0750 "$STATE/kst"
  mkdir -p "$STATE/kst/keys"
  chown kst:kst "$STATE/kst/keys"
  chmod 0700 "$STATE/kst/keys"

  make_tls

  # Postfix: the test system's base plus the operator snippets.
  if {
    render "$DEPLOY/postfix/testbed/main.cf.in"
    echo
    echo "# ===== deploy/postfix/main.cf.snippet (paths moved into $STATE) ====="
    operator_paths "$DEPLOY/postfix/main.cf.snippet"
  } | put "$PF_CONF/main.cf" 0644 root:root; then CHANGED_POSTFIX=1; fi
  if {
    render "$DEPLOY/postfix/testbed/master.cf.in"
    echo "# ===== deploy/postfix/master.cf.snippet (paths moved into $STATE) ====="
    operator_paths "$DEPLOY/postfix/master.cf.snippet"
  } | put "$PF_CONF/master.cf" 0644 root:root; then CHANGED_POSTFIX=1; fi
  local m
  for m in vmailbox virtual sender_login; do
    put_map "$m" <"$DEPLOY/postfix/testbed/$m"
  done
  put_map transport < <(transport_table)
  # A regexp table: no postmap.
  if put "$PF_CONF/kst_recipient_access" 0644 root:root <"$DEPLOY/postfix/kst_recipient_access"; then
    CHANGED_POSTFIX=1
  fi
  local want
  case "$MODE" in
    pipe) want="kstpipe:" ;;
    lmtp) want="kstlmtp:inet:127.0.0.1:$LMTP_PORT" ;;
    pool) want="kstlmtp:[127.0.0.1]:${POOL_PORTS[0]}, [127.0.0.1]:${POOL_PORTS[1]}, [127.0.0.1]:${POOL_PORTS[2]}" ;;
  esac
  [ "$(grep -E '^keys@' "$PF_CONF/transport" | sed -E 's/^keys@[^[:space:]]+[[:space:]]+//' | grep -cxF -- "$want")" -eq 2 ] \
    && [ "$(grep -cE '^keys@' "$PF_CONF/transport")" -eq 2 ] \
    || die "deploy/postfix/transport did not give two keys@ lines for $want; see $PF_CONF/transport"
  if [ "$(cat "$STATE/mode" 2>/dev/null || true)" != "$MODE" ]; then
    echo "$MODE" >"$STATE/mode"
    CHANGED_POSTFIX=1
  fi

  # Dovecot.
  if render "$DEPLOY/dovecot/dovecot.conf" | put "$DOVECOT_CONF" 0644 root:root; then CHANGED_DOVECOT=1; fi
  dovecot_users

  # dnsmasq.
  if render "$DEPLOY/dns/dnsmasq.conf" | put "$DNSMASQ_CONF" 0644 root:root; then CHANGED_DNSMASQ=1; fi

  # kst.
  if [ -n "${KST_CONFIG:-}" ]; then
    [ -r "$KST_CONFIG" ] || die "KST_CONFIG=$KST_CONFIG is not readable"
    if put "$STATE/kst/kst.toml" 0640 root:kst <"$KST_CONFIG"; then log "installed KST_CONFIG=$KST_CONFIG"; fi
  elif [ ! -f "$STATE/kst/kst.toml" ]; then
    default_kst_config | put "$STATE/kst/kst.toml" 0640 root:kst || true
  fi
  link_kst_bin
}

# --- daemons ----------------------------------------------------------------------------------

postfix_pid() { pidfile_pid "$STATE/postfix-spool/pid/master.pid"; }
postfix_running() { [ -f "$PF_CONF/main.cf" ] && pid_alive "$(postfix_pid)"; }
dovecot_pid() { pidfile_pid "$STATE/dovecot/run/master.pid"; }
dovecot_running() { pid_alive "$(dovecot_pid)"; }
dnsmasq_running() { pid_alive "$(pidfile_pid "$DNSMASQ_PID")"; }

ports_free() {
  local p
  for p in "$@"; do
    if tcp_listening "$p"; then
      die "port $p is already taken by $(port_owner "$p" || echo something) (choose another with KST_MAIL_*_PORT)"
    fi
  done
}

# Reads the greeting of a TCP service and checks its first characters.
greets() {
  local port="$1" want="$2"
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    IFS= read -r line <&3 || exit 1
    case "$3" in SMTP) printf "QUIT\r\n" >&3 ;; IMAP) printf "a LOGOUT\r\n" >&3 ;; esac
    cat <&3 >/dev/null
    [[ "$line" == "$2"* ]]' _ "$port" "$want" "$3" >/dev/null 2>&1
}

# daemon COMMAND...: starts or signals a daemon. Its stdin, stdout and stderr are not ours (a
# caller capturing our output must not wait for a daemon that keeps the pipe open: Dovecot keeps
# stderr), nor is the lock on fd 9. Their start-up messages go to $STATE/daemons.log.
daemon() {
  if ! "$@" </dev/null >>"$STATE/daemons.log" 2>&1 9<&-; then
    tail -20 "$STATE/daemons.log" >&2
    die "failed: $*"
  fi
}

start_dovecot() {
  if dovecot_running; then
    if [ "$CHANGED_DOVECOT" -eq 1 ]; then
      log "dovecot: reloading (configuration changed)"
      daemon dovecot -c "$DOVECOT_CONF" reload
    else
      log "dovecot: running"
    fi
  else
    ports_free "$IMAP_PORT" "$IMAPS_PORT"
    rm -f "$STATE/dovecot/run/master.pid" # stale: its process is gone
    STARTED=1
    log "dovecot: starting (IMAP 127.0.0.1:$IMAP_PORT STARTTLS, IMAPS :$IMAPS_PORT)"
    daemon dovecot -c "$DOVECOT_CONF"
  fi
  wait_for "dovecot IMAP on 127.0.0.1:$IMAP_PORT" greets "$IMAP_PORT" "* OK" IMAP
  wait_for "dovecot IMAPS on 127.0.0.1:$IMAPS_PORT" tcp_listening "$IMAPS_PORT"
  wait_for "dovecot LMTP socket" test -S "$STATE/dovecot/run/lmtp"
  wait_for "dovecot auth socket" test -S "$STATE/dovecot/run/auth-postfix"
}

start_dnsmasq() {
  if dnsmasq_running; then
    if [ "$CHANGED_DNSMASQ" -eq 0 ]; then
      log "dnsmasq: running"
      return 0
    fi
    log "dnsmasq: restarting (configuration changed)"
    stop_pid "dnsmasq" "$(pidfile_pid "$DNSMASQ_PID")"
  fi
  ports_free "$DNS_PORT"
  if udp_listening "$DNS_PORT"; then die "UDP port $DNS_PORT is already taken (choose another with KST_MAIL_DNS_PORT)"; fi
  STARTED=1
  log "dnsmasq: starting (DNS 127.0.0.1:$DNS_PORT)"
  daemon dnsmasq --conf-file="$DNSMASQ_CONF" --pid-file="$DNSMASQ_PID"
  wait_for "dnsmasq on 127.0.0.1:$DNS_PORT" tcp_listening "$DNS_PORT"
  wait_for "dnsmasq on 127.0.0.1:$DNS_PORT/udp" udp_listening "$DNS_PORT"
}

start_postfix() {
  if postfix_running; then
    if [ "$CHANGED_POSTFIX" -eq 1 ]; then
      log "postfix: reloading (configuration changed)"
      daemon postfix -c "$PF_CONF" reload
    else
      log "postfix: running"
    fi
  else
    ports_free "$SMTP_PORT" "$SUBMISSION_PORT" "$SUBMISSIONS_PORT"
    STARTED=1
    log "postfix: starting (smtpd 127.0.0.1:$SMTP_PORT, submission :$SUBMISSION_PORT, submissions :$SUBMISSIONS_PORT)"
    # Creates the queue directory with the right owners on the first start.
    daemon postfix -c "$PF_CONF" check
    daemon postfix -c "$PF_CONF" start
  fi
  wait_for "postfix smtpd on 127.0.0.1:$SMTP_PORT" greets "$SMTP_PORT" "220 mail.example.net" SMTP
  wait_for "postfix submission on 127.0.0.1:$SUBMISSION_PORT" greets "$SUBMISSION_PORT" "220 mail.example.net" SMTP
  wait_for "postfix submissions on 127.0.0.1:$SUBMISSIONS_PORT" tcp_listening "$SUBMISSIONS_PORT"
}

# --- commands ---------------------------------------------------------------------------------

print_env() {
  cat <<EOF
export KST_MAIL_DIR=$STATE
export KST_MAIL_HOST=127.0.0.1
export KST_MAIL_SMTP_PORT=$SMTP_PORT
export KST_MAIL_SUBMISSION_PORT=$SUBMISSION_PORT
export KST_MAIL_SUBMISSIONS_PORT=$SUBMISSIONS_PORT
export KST_MAIL_IMAP_PORT=$IMAP_PORT
export KST_MAIL_IMAPS_PORT=$IMAPS_PORT
export KST_MAIL_DNS_PORT=$DNS_PORT
export KST_MAIL_RESOLVER=127.0.0.1:$DNS_PORT
export KST_MAIL_LMTP_PORT=$LMTP_PORT
export KST_MAIL_LMTP_POOL_PORTS="${POOL_PORTS[*]}"
export KST_MAIL_MODE=$MODE
export KST_MAIL_CA=$STATE/tls/ca.pem
export KST_MAIL_KST_CONFIG=$STATE/kst/kst.toml
export KST_MAIL_KST_BIN=$STATE/bin/kst
export KST_MAIL_POSTFIX_CONFIG=$PF_CONF
export KST_MAIL_MAILDIRS=$STATE/mail
EOF
}

cmd_up() {
  check_settings
  take_lock
  ensure_packages
  stop_system_instances
  ensure_users
  write_files
  start_dovecot
  start_dnsmasq
  start_postfix
  if [ "$STARTED$CHANGED_POSTFIX$CHANGED_DOVECOT$CHANGED_DNSMASQ" = 0000 ]; then
    log "up: everything was running, nothing changed (mode $MODE)"
  else
    log "up: running (mode $MODE)"
  fi
  print_env | put "$STATE/env" 0644 root:root || true
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
  if postfix_running; then
    log "postfix: stopping"
    local pid
    pid="$(postfix_pid)"
    postfix -c "$PF_CONF" stop 2>/dev/null || true
    stop_pid postfix "$pid"
  fi
  if dovecot_running; then
    log "dovecot: stopping"
    stop_pid dovecot "$(dovecot_pid)"
  fi
  if dnsmasq_running; then
    log "dnsmasq: stopping"
    stop_pid dnsmasq "$(pidfile_pid "$DNSMASQ_PID")"
  fi
  # Children (pipe, kst deliver, imap) may take a moment after their master.
  local i
  for ((i = 0; i < 50; i++)); do
    pgrep -f -- "$STATE/" >/dev/null 2>&1 || break
    sleep 0.1
  done
  rm -rf "$STATE"
  log "down: stopped, $STATE removed"
}

cmd_status() {
  local ok=0 mode="-"
  [ -f "$STATE/mode" ] && mode="$(cat "$STATE/mode")"
  echo "state directory: $STATE$([ -e "$MARKER" ] || echo ' (absent)')"
  if postfix_running; then
    echo "postfix:  running (pid $(postfix_pid)), mode $mode"
  else
    echo "postfix:  stopped"; ok=3
  fi
  if dovecot_running; then echo "dovecot:  running (pid $(dovecot_pid))"; else echo "dovecot:  stopped"; ok=3; fi
  if dnsmasq_running; then echo "dnsmasq:  running (pid $(pidfile_pid "$DNSMASQ_PID"))"; else echo "dnsmasq:  stopped"; ok=3; fi
  local line p what
  for line in "$SMTP_PORT smtpd (port 25 stand-in)" "$SUBMISSION_PORT submission (STARTTLS, AUTH)" \
    "$SUBMISSIONS_PORT submissions (implicit TLS, AUTH)" "$IMAP_PORT imap (STARTTLS)" \
    "$IMAPS_PORT imaps" "$DNS_PORT dns (udp+tcp)" "$LMTP_PORT kst serve LMTP (started by the tests, lmtp mode)"; do
    p="${line%% *}"
    what="${line#* }"
    if tcp_listening "$p"; then
      printf '  127.0.0.1:%-5s listening  %s\n' "$p" "$what"
    else
      printf '  127.0.0.1:%-5s closed     %s\n' "$p" "$what"
    fi
  done
  if [ -L "$STATE/bin/kst" ]; then echo "pipe transport runs: $(readlink "$STATE/bin/kst")"; fi
  if postfix_running; then
    echo "mail queue: $(postqueue -c "$PF_CONF" -p 2>/dev/null | tail -1)"
  fi
  return "$ok"
}

cmd_env() { state_env "mail system"; }

updown_main "pipe|lmtp|pool" "$@"
