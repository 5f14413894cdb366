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
