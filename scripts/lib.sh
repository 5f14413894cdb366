# Shell helpers shared by the scripts in this directory; not run on its own. A script sets
# LOG_NAME (the name its log lines carry) and sources this file:
#   LOG_NAME=bench
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# A script may define a function of the same name after sourcing, to do it its own way.

# --- messages ---------------------------------------------------------------------------------

# Progress and errors go to stderr, so that a script's stdout stays its result.
log() { printf '== %s: %s\n' "$LOG_NAME" "$*" >&2; }
die() { printf '== %s: ERROR: %s\n' "$LOG_NAME" "$*" >&2; exit 1; }

# --- benchmarks -------------------------------------------------------------------------------

# temp_work PREFIX: makes the temporary directory $WORK (/tmp/PREFIX.XXXXXX) and the empty list
# PIDS of background processes; on exit, kills those, runs the function cleanup_more if the
# script defines one, and removes $WORK.
temp_work() {
  WORK="$(mktemp -d "/tmp/$1.XXXXXX")"
  PIDS=()
  trap temp_work_cleanup EXIT
}
temp_work_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if declare -F cleanup_more >/dev/null; then cleanup_more; fi
  rm -rf "$WORK"
}

# A TCP port on 127.0.0.1 that is free now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [TRIES]: waits until something accepts on 127.0.0.1:PORT (TRIES x 50 ms, 400).
wait_port() {
  local _
  for _ in $(seq 1 "${2:-400}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  die "nothing listens on 127.0.0.1:$1"
}

# wait_own_port PID PORT [TRIES]: waits until the process PID itself listens on 127.0.0.1:PORT
# (`ss -p`, so another process that took the port meanwhile does not count). Returns 1 when
# PID exits first: it could not bind (the port was taken between free_port and its bind, or
# another fault its log names); the caller picks new ports and starts it again. Dies after
# TRIES x 50 ms (default 1200: a debug build or a loaded machine starts slowly).
wait_own_port() {
  local pid="$1" port="$2" tries="${3:-1200}" _
  for _ in $(seq 1 "$tries"); do
    kill -0 "$pid" 2>/dev/null || return 1
    if ss -Hltnp "sport = :$port" 2>/dev/null | grep -q "pid=$pid,"; then return 0; fi
    sleep 0.05
  done
  die "process $pid does not listen on 127.0.0.1:$port after $((tries / 20)) s"
}

# Sets KST to the kst binary to measure: $BENCH_KST (made absolute) or, without it, a release
# build of this checkout (run from the repository root).
bench_kst() {
  if [ -n "${BENCH_KST:-}" ]; then
    KST="$(realpath "$BENCH_KST")" # a kst binary built already (for checking a script)
  else
    log "building kst (release)"
    cargo build --release --quiet -p kst-bin --bin kst
    KST="$PWD/target/release/kst"
  fi
}

# --- test services (mailsystem.sh, testdns.sh, ha-services.sh) --------------------------------
# These use STATE (the state directory), TIMEOUT (seconds) and SELF (the script's own path).

# check_state_dir VARIABLE VALUE: a state directory that `down` may remove.
check_state_dir() {
  case "$2" in
    /*) ;;
    *) die "$1 must be an absolute path: $2" ;;
  esac
  [[ "$2" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "$1 may hold only letters, digits and ._-/: $2"
  case "$2" in / | /tmp | /var | /usr | /etc | /root | /home | /work) die "$1=$2 is too dangerous to remove on down" ;; esac
}

# One `up`/`down` at a time (tests may start several); the lock is on the script file, so
# nothing is left behind. Daemons are started with fd 9 closed so that they do not keep it.
take_lock() {
  exec 9<"$SELF"
  flock -w 300 9 || die "another $(basename "$SELF") did not finish within 300s"
}

# apt_install PACKAGE...: installs Debian packages (apt-get update once per run).
APT_UPDATED=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >&2
}

# put DST MODE [OWNER]: installs stdin as DST (mode MODE, owner OWNER when given) when it
# differs from what DST holds; returns 0 if it changed, 1 if not (mode and owner are set
# either way).
put() {
  local dst="$1" mode="$2" owner="${3:-}" tmp
  tmp="$(mktemp "$dst.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  [ -z "$owner" ] || chown "$owner" "$tmp"
  if [ -f "$dst" ] && cmp -s "$tmp" "$dst"; then
    rm -f "$tmp"
    chmod "$mode" "$dst"
    [ -z "$owner" ] || chown "$owner" "$dst"
    return 1
  fi
  mv -f "$tmp" "$dst"
  return 0
}

# A zombie is not alive (daemons whose parent is gone may linger as zombies where PID 1 does not
# reap them, and kill -0 succeeds on those).
pid_alive() {
  local st
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
  st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
pidfile_pid() { if [ -s "$1" ]; then head -1 "$1" | tr -dc '0-9'; fi; }

tcp_listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
udp_listening() { [ -n "$(ss -Hlun "sport = :$1" 2>/dev/null)" ]; }
port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*"\).*/\1/p' | head -1; }

# Closes every file descriptor above 2 of the current (sub)shell.
close_inherited_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd="${fd##*/}"
    if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec ${fd}<&-" 2>/dev/null || true; fi
  done
}

# wait_for WHAT COMMAND...: runs COMMAND (output discarded) every 0.2 s until it succeeds, at
# most TIMEOUT seconds; the error names the logs, $STATE/$WAIT_LOGS (*.log).
wait_for() {
  local what="$1"
  shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what: not within ${TIMEOUT}s (logs in $STATE/${WAIT_LOGS:-*.log})"
    sleep 0.2
  done
}

# stop_pid NAME PID: SIGTERM, then wait (bounded), then SIGKILL.
stop_pid() {
  local name="$1" pid="$2" i
  pid_alive "$pid" || return 0
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < TIMEOUT * 10; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop: SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

# --- up/down/status/env scripts (mailsystem.sh, providers.sh) ----------------------------------

# state_env WHAT: prints $STATE/env (the export lines of `up`), or dies: no WHAT at $STATE.
state_env() {
  [ -f "$STATE/env" ] || die "no $1 at $STATE (run: scripts/${0##*/} up)"
  cat "$STATE/env"
}

# updown_main MODES ARGS...: the command line of such a script: `up [--mode M]`, `down`,
# `status`, `env` run the script's cmd_up, cmd_down, cmd_status, cmd_env; --mode sets MODE,
# one of MODES (e.g. "pipe|lmtp"; no --mode when MODES is empty); anything else is a usage
# error (exit 64) or dies.
updown_main() {
  local modes="$1" cmd="${2:-}" said up=up
  shift
  [ $# -gt 0 ] && shift
  said="$(printf '%s' "$modes" | sed 's/|/, /g; s/\(.*\), /\1 or /')"
  [ -z "$modes" ] || up="up [--mode $modes]"
  while [ $# -gt 0 ]; do
    case "$modes:$1" in
      ?*:--mode) [ $# -ge 2 ] || die "--mode needs $said"; MODE="$2"; shift 2 ;;
      ?*:--mode=*) MODE="${1#--mode=}"; shift ;;
      *) die "unknown argument '$1'" ;;
    esac
  done
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 {$up|down|status|env}" >&2; exit 64 ;;
  esac
}

# --- self-tests -------------------------------------------------------------------------------
# The counts of passed and failed checks, and the names of the failed ones.
PASSED=0
FAILED=0
FAILURES=()
say() { printf '\n== selftest: %s\n' "$*"; }
ok() { PASSED=$((PASSED + 1)); printf '  ok    %s\n' "$1"; }
# fail NAME [DETAILS]: a failed check, with the last 40 lines of DETAILS.
fail() {
  FAILED=$((FAILED + 1))
  FAILURES+=("$1")
  printf '  FAIL  %s\n' "$1"
  [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/        | /' | tail -40
}
# check NAME COMMAND...: passes when the command succeeds.
check() {
  local name="$1" out
  shift
  if out="$("$@" 2>&1)"; then ok "$name"; else fail "$name" "$out"; fi
}
# wait_until SECONDS COMMAND...: polls every 0.2 s.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
# The failed checks and the counts ("selftest: N passed, N failed"); fails when a check did.
summary() {
  echo
  if [ "$FAILED" -gt 0 ]; then
    echo "failed:"
    printf '  %s\n' "${FAILURES[@]}"
  fi
  echo "selftest: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ]
}
