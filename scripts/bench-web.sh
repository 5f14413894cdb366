#!/usr/bin/env bash
# Look-ups per second of the public listener [web] (see docs/BENCHMARKS.md, "## Web look-ups"),
# on every backend (fs, PostgreSQL, Redis) at every stored size, in one command:
#
#   BENCH_WEB_SIZES="1000 1000000" scripts/bench-web.sh
#
#   1. fill: for each size N, one kst-store-bench --real-keys --fill-only publishes N real
#      certificates (user000000@example.test ..., made as `kst bench` makes them, on every
#      core, once for all sizes and runs: kept in $STORES/keys.bin, --keys-file) through the
#      store's own `publish` into every backend without a filled store of that size yet (each
#      store with 64 publications in flight of its own: --mirror), and writes request paths
#      of up to 200,000 stored keys. The stores are kept under BENCH_WEB_STORES for later runs:
#        fs:         $STORES/fs-N/                  (filled under eatmydata, then sync)
#        PostgreSQL: database kst_web_N on BENCH_PG_URL (synchronous_commit off while filling)
#        Redis:      prefix kstweb-N: on this script's own redis-server on 127.0.0.1:
#                    BENCH_WEB_REDIS_PORT, data in $STORES/redis/ (run under eatmydata while
#                    filling, restarted without it, appendonly yes + appendfsync always, to
#                    measure: what kst's durability guard asks for)
#      and the paths in $STORES/<backend>-N.paths/. A marker
#      $STORES/<backend>-N.filled that holds a number (a fill stopped early, its paths written
#      with kst-store-bench --filled K --stored K --fill-only --paths-out) says how many keys
#      the store holds; the table shows that number.
#   2. measure: for each backend and size, starts the release `kst serve` with [web] on plain
#      HTTP on loopback and loads it with wrk (Debian's; 2 threads, BENCH_WEB_CONNECTIONS
#      connections, random stored keys) for BENCH_WEB_SECONDS per endpoint:
#      `wkd` (WKD direct method with ?l=, Host: example.test: found by address), `vks` (VKS
#      by-email), `wkdhash` (WKD without l=: the WKD-hash index), `fpr` (VKS by-fingerprint:
#      the fingerprint index), and `hkp` (HKP op=get&options=mr by address, only when named in
#      BENCH_WEB_ENDPOINTS); once with every [web.limits] counter off (the look-up path
#      itself) and once with the limits at their defaults and the load spread over
#      BENCH_WEB_CLIENTS client addresses 127.N.x.y, a new N for every endpoint's run so no run
#      finds counters an earlier one left in the store's window (kst trusts 127.0.0.1 as a proxy and wrk
#      names the client in X-Forwarded-For: wrk cannot bind source addresses);
#   3. reads the status counts from kst's own /metrics (only 200 and 404 count as look-ups; the
#      share of 429 is reported), kst's peak RSS and the machine's 1-minute load average at
#      the end of each row, and prints a markdown table on stdout.
#
#   Counters of their own (BENCH_WEB_COUNTERS=own): the rows with the limits at their defaults
#   count on a second redis-server of this script's own on 127.0.0.1:BENCH_WEB_COUNTERS_PORT
#   (6391; `appendonly no`, `save ""`: soft state, the set-up docs/OPERATIONS.md recommends),
#   named by [web.counters] (KST_WEB__COUNTERS__BACKEND=redis), whatever the key store; it is
#   emptied before and shut down after the measurement. Its CPU is added to the store column
#   ("-" for fs becomes the counters' alone). Default "store": the counters in the key store.
#
#   Open loop (BENCH_WEB_RATE set): instead of wrk, `kst bench web` offers each endpoint a
#   fixed rate, whatever the answers do (request i due at start + i/R; a request that finds
#   every connection busy waits, and its latency counts from its due time: the p99 of a
#   server offered R look-ups/s, which a closed loop like wrk cannot give, see
#   docs/BENCHMARKS.md). BENCH_WEB_RATE is a list of rates for every backend ("20000", or
#   "10000,20000": one row per rate) or per backend ("fs=10000,20000 redis=10000,20000
#   postgres=4000,8000"); BENCH_WEB_CONNECTIONS are its keep-alive connections, the same
#   BENCH_WEB_CLIENTS in X-Forwarded-For. The table then has the rate asked for, the look-ups/s
#   achieved, the share of requests sent more than 1 ms late (in parentheses: of all requests,
#   those due while every connection was busy; the rest of the late ones: the tool behind),
#   the latency from the due time at p50, p90, p99, p99.9 and max, and the CPU time per
#   request (user + system, µs) of kst serve (/proc/PID/stat before and after the row), of the
#   load tool (its own, in its JSON) and of the store's server (redis-server, or every postgres
#   process; "-" for fs).
#
# Usage: scripts/bench-web.sh [all | fill | measure | clean]     (as root on Debian: installs
# wrk and eatmydata if missing). `fill` only fills (e.g. before a quiet slot), `measure` only
# measures (every store must be filled), `clean` removes the stores of BENCH_WEB_SIZES
# (10^6 fs keys are 4 million inodes: about half an hour).
# Environment: BENCH_WEB_SIZES ("1000"), BENCH_WEB_BACKENDS ("fs redis postgres"),
# BENCH_WEB_ENDPOINTS ("wkd vks wkdhash fpr"), BENCH_WEB_LIMITS ("off defaults"),
# BENCH_WEB_SECONDS (10), BENCH_WEB_CONNECTIONS (64), BENCH_WEB_CLIENTS (1024, at least 64),
# BENCH_WEB_RATE ("": wrk's closed loop; rates: the open loop of `kst bench web`, above),
# BENCH_WEB_LOAD_THREADS (threads of `kst bench web`, 1),
# BENCH_WEB_WORKERS ("": kst serve's Tokio runtime has a worker per core; N: N workers, through
# Tokio's own TOKIO_WORKER_THREADS),
# BENCH_WEB_PIN ("": kst and the load share every core; "1": kst on CPU 1, the load on CPU 0
# (wrk with one thread), both with taskset; the store's server is not pinned),
# BENCH_WEB_COUNTERS ("store": the limits' counters in the key store; "own": on a Redis of
# their own, above), BENCH_WEB_COUNTERS_PORT (6391),
# BENCH_WEB_STORES (/var/tmp/kst-bench-web), BENCH_WEB_REDIS_PORT (6390),
# BENCH_PG_URL (postgres://postgres:postgres@127.0.0.1:5432), BENCH_KST and BENCH_STORE_BENCH
# (binaries to use instead of building them in release mode).
set -euo pipefail

MODE="${1:-all}"
SIZES="${BENCH_WEB_SIZES:-1000}"
BACKENDS="${BENCH_WEB_BACKENDS:-fs redis postgres}"
ENDPOINTS="${BENCH_WEB_ENDPOINTS:-wkd vks wkdhash fpr}"
LIMITS="${BENCH_WEB_LIMITS:-off defaults}"
SECONDS_EACH="${BENCH_WEB_SECONDS:-10}"
CONNS="${BENCH_WEB_CONNECTIONS:-64}"
CLIENTS="${BENCH_WEB_CLIENTS:-1024}"
PIN="${BENCH_WEB_PIN:-}"
RATES="${BENCH_WEB_RATE:-}"
LOAD_THREADS="${BENCH_WEB_LOAD_THREADS:-1}"
WORKERS="${BENCH_WEB_WORKERS:-}"
STORES="${BENCH_WEB_STORES:-/var/tmp/kst-bench-web}"
REDIS_PORT="${BENCH_WEB_REDIS_PORT:-6390}"
PG_BASE="${BENCH_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432}"
COUNTERS="${BENCH_WEB_COUNTERS:-store}"
COUNTERS_PORT="${BENCH_WEB_COUNTERS_PORT:-6391}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOG_NAME=bench-web
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

case "$MODE" in all | fill | measure | clean) ;; *) die "unknown mode $MODE (all, fill, measure, clean)" ;; esac
case "$COUNTERS" in store | own) ;; *) die "BENCH_WEB_COUNTERS must be store or own, not $COUNTERS" ;; esac
[ "$CLIENTS" -ge 64 ] && [ "$CLIENTS" -le 65536 ] || die "BENCH_WEB_CLIENTS must be 64..65536"

# The rates of backend $1 in BENCH_WEB_RATE, one per line ("20000,10000" for all, or
# "fs=20000 postgres=8000,4000" per backend; a backend not named gets the words for all).
rates_for() {
  local w all="" own=""
  for w in $RATES; do
    case "$w" in
      "$1"=*) own="${w#*=}" ;;
      *=*) ;;
      *) all="$w" ;;
    esac
  done
  w="${own:-$all}"
  [ -n "$w" ] || die "BENCH_WEB_RATE names no rate for $1: $RATES"
  tr ',' '\n' <<<"$w" | while read -r r; do
    [[ "$r" =~ ^[1-9][0-9]*$ ]] || die "BENCH_WEB_RATE: not a rate: $r"
    echo "$r"
  done
}
if [ -n "$RATES" ]; then for b in $BACKENDS; do rates_for "$b" >/dev/null; done; fi

temp_work kst-bench-web
apt_need() { # command package
  command -v "$1" >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "$1 is missing; run as root to install it (apt-get install $2)"
  apt_install "$2"
}

# --- the stores -----------------------------------------------------------------------------

pg_db() { echo "kst_web_$1"; }
redis_prefix() { echo "kstweb-$1:"; }
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
redis_pid() { { rcli info server 2>/dev/null || true; } | awk -F: '/^process_id:/ { print $2 }' | tr -d '\r'; }

# This script's own redis-server for the stores, in mode "fill" (under eatmydata: fsync does
# nothing) or "measure" (real fsync). Restarts it when it runs in the other mode; an AOF of
# 10^6 keys takes a while to load, so waits until it answers PING with PONG.
redis_up() { # fill|measure
  local pid want_eat=0 has_eat=0
  [ "$1" = fill ] && command -v eatmydata >/dev/null && want_eat=1
  pid="$(redis_pid)"
  if [ -n "$pid" ]; then
    [ "$(rcli config get dir | sed -n 2p)" = "$STORES/redis" ] ||
      die "127.0.0.1:$REDIS_PORT runs a Redis that is not this script's (set BENCH_WEB_REDIS_PORT)"
    grep -q eatmydata "/proc/$pid/maps" 2>/dev/null && has_eat=1
    [ "$has_eat" = "$want_eat" ] && return 0
    log "redis: restarting for $1"
    rcli shutdown >/dev/null 2>&1 || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    sync
  fi
  mkdir -p "$STORES/redis"
  local pre=()
  [ "$want_eat" = 1 ] && pre=(eatmydata)
  # The daemon must not keep the caller's descriptors open: run under a lock (the team's
  # bench.sh holds its flock on fd 9), a redis-server that inherited the lock's descriptor
  # held the lock for as long as it ran, and every later benchmark waited for it.
  (for fd in /proc/$BASHPID/fd/*; do fd="${fd##*/}"; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done
   cd "$STORES/redis" && setsid "${pre[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$STORES/redis" --save "" --appendonly yes --appendfsync always \
    --logfile "$STORES/redis/redis.log" --daemonize yes)
  for _ in $(seq 1 1200); do
    if [ "$(rcli ping 2>/dev/null)" = PONG ]; then
      # Not the niceness of the command that started it (`nice -n 19 ... fill`): the fill's
      # publications wait on it, and so do kst's look-ups.
      [ "$(id -u)" -ne 0 ] || renice -n 0 -p "$(redis_pid)" >/dev/null
      return 0
    fi
    sleep 0.5
  done
  die "redis on 127.0.0.1:$REDIS_PORT did not come up (see $STORES/redis/redis.log)"
}

# BENCH_WEB_COUNTERS=own: the limits' counters on a redis-server of their own, soft state
# (appendonly no, save ""), data directory $STORES/counters-redis; emptied when it starts
# (FLUSHALL: it is this script's own, checked by its directory) and shut down on exit.
ccli() { redis-cli -h 127.0.0.1 -p "$COUNTERS_PORT" "$@"; }
counters_up() {
  if [ "$(ccli ping 2>/dev/null)" = PONG ]; then
    [ "$(ccli config get dir | sed -n 2p)" = "$STORES/counters-redis" ] ||
      die "127.0.0.1:$COUNTERS_PORT runs a Redis that is not this script's (set BENCH_WEB_COUNTERS_PORT)"
  else
    mkdir -p "$STORES/counters-redis"
    (for fd in /proc/$BASHPID/fd/*; do fd="${fd##*/}"; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done
     cd "$STORES/counters-redis" && setsid redis-server --bind 127.0.0.1 --port "$COUNTERS_PORT" \
      --dir "$STORES/counters-redis" --save "" --appendonly no \
      --logfile "$STORES/counters-redis/redis.log" --daemonize yes)
    for _ in $(seq 1 200); do [ "$(ccli ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
    [ "$(ccli ping 2>/dev/null)" = PONG ] ||
      die "the counters' redis on 127.0.0.1:$COUNTERS_PORT did not come up (see $STORES/counters-redis/redis.log)"
  fi
  [ "$(id -u)" -ne 0 ] || renice -n 0 -p "$(counters_pid)" >/dev/null
  ccli flushall >/dev/null
}
counters_pid() { { ccli info server 2>/dev/null || true; } | awk -F: '/^process_id:/ { print $2 }' | tr -d '\r'; }
cleanup_more() {
  [ "$COUNTERS" = own ] && [ -n "$(counters_pid)" ] && ccli shutdown nosave >/dev/null 2>&1
  return 0
}

# The KST_STORE__* settings of the store of backend $1, size $2.
store_env() {
  case "$1" in
    fs) echo "KST_STORE__BACKEND=fs KST_STORE__PATH=$STORES/fs-$2" ;;
    postgres) echo "KST_STORE__BACKEND=postgres KST_STORE__URL=$PG_BASE/$(pg_db "$2") KST_STORE__MAX_CONNECTIONS=8" ;;
    redis) echo "KST_STORE__BACKEND=redis KST_STORE__URL=redis://127.0.0.1:$REDIS_PORT KST_STORE__PREFIX=$(redis_prefix "$2")" ;;
  esac
}

# The --mirror target of backend $1, size $2 (see kst-store-bench --mirror).
mirror_spec() {
  case "$1" in
    fs) echo "fs=$STORES/fs-$2" ;;
    postgres) echo "postgres=$PG_BASE/postgres#$(pg_db "$2")" ;;
    redis) echo "redis=redis://127.0.0.1:$REDIS_PORT#$(redis_prefix "$2")" ;;
  esac
}

# Fills the stores of size $1 of every backend not filled yet (marker $STORES/<backend>-$1.filled)
# in one kst-store-bench run: the first of them is its store, the others --mirror ones, so each
# certificate is made once. fs writes under eatmydata (no fsync while filling), PostgreSQL's
# database has synchronous_commit off while filling, Redis runs under eatmydata (redis_up fill).
fill_size() { # size
  local n="$1" t0=$SECONDS todo=() b
  for b in $BACKENDS; do
    if [ -f "$STORES/$b-$n.filled" ]; then log "$b, $n keys: filled already"; else todo+=("$b"); fi
  done
  [ "${#todo[@]}" -gt 0 ] || return 0
  local main="${todo[0]}" args=(--real-keys --fill-only --stored "$n" --paths-out "$STORES/${todo[0]}-$n.paths"
    --keys-file "$STORES/keys.bin")
  for b in "${todo[@]}"; do
    if [ "$b" = postgres ]; then
      local db; db="$(pg_db "$n")"
      psql "$PG_BASE/postgres" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
        psql "$PG_BASE/postgres" -qc "CREATE DATABASE $db" >&2
      psql "$PG_BASE/postgres" -qc "ALTER DATABASE $db SET synchronous_commit = off" >&2
    fi
    [ "$b" = "$main" ] || args+=(--mirror "$(mirror_spec "$b" "$n")")
  done
  case "$main" in
    fs) args+=(--backend fs --dir "$STORES/fs-$n") ;;
    postgres) args+=(--backend postgres --url "$PG_BASE/postgres" --namespace "$(pg_db "$n")") ;;
    redis) args+=(--backend redis --url "redis://127.0.0.1:$REDIS_PORT" --namespace "$(redis_prefix "$n")") ;;
  esac
  local pre=()
  command -v eatmydata >/dev/null && pre=(eatmydata)
  log "filling $n keys into: ${todo[*]} (log: $STORES/fill-$n.log)"
  nice "${pre[@]}" "$STORE_BENCH" "${args[@]}" >"$STORES/fill-$n.log" 2>&1 ||
    die "the fill of $n keys failed (see $STORES/fill-$n.log)"
  sync
  for b in "${todo[@]}"; do
    if [ "$b" != "$main" ]; then
      rm -rf "$STORES/$b-$n.paths"
      cp -a "$STORES/$main-$n.paths" "$STORES/$b-$n.paths"
    fi
    if [ "$b" = postgres ]; then
      psql "$PG_BASE/postgres" -qc "ALTER DATABASE $(pg_db "$n") RESET synchronous_commit" >&2
      psql "$PG_BASE/$(pg_db "$n")" -qc "VACUUM ANALYZE" >&2
    fi
    touch "$STORES/$b-$n.filled"
  done
  log "$n keys filled into ${todo[*]} in $((SECONDS - t0)) s"
}

remove_store() { # backend size
  local b="$1" n="$2"
  log "$b: removing the store of $n keys"
  case "$b" in
    fs) nice ionice -c3 rm -rf "$STORES/fs-$n" ;;
    postgres) psql "$PG_BASE/postgres" -qc "DROP DATABASE IF EXISTS $(pg_db "$n") WITH (FORCE)" >&2 ;;
    redis)
      if [ -n "$(redis_pid)" ]; then
        rcli --scan --pattern "$(redis_prefix "$n")*" | xargs -r -n 1000 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" unlink >/dev/null
        rcli bgrewriteaof >/dev/null
      fi ;;
  esac
  rm -rf "$STORES/$b-$n.filled" "$STORES/$b-$n.paths" "$STORES/fill-$n.log"
}

if [ "$MODE" = clean ]; then
  for b in $BACKENDS; do for n in $SIZES; do remove_store "$b" "$n"; done; done
  if [ -n "$(redis_pid)" ] && [ "$(rcli dbsize)" = 0 ]; then
    rcli shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$STORES/redis"
  fi
  exit 0
fi

# --- binaries and tools ---------------------------------------------------------------------

if [ -n "${BENCH_KST:-}" ]; then
  bench_kst
  STORE_BENCH="$(realpath "${BENCH_STORE_BENCH:-$(dirname "$KST")/kst-store-bench}")"
else
  log "building kst and kst-store-bench (release)"
  cargo build --release --quiet -p kst-bin --bin kst --bin kst-store-bench
  KST="$ROOT/target/release/kst"
  STORE_BENCH="$ROOT/target/release/kst-store-bench"
fi
[ -x "$STORE_BENCH" ] || die "$STORE_BENCH is missing (BENCH_STORE_BENCH)"
[ -n "$RATES" ] || apt_need wrk wrk
apt_need eatmydata eatmydata
case " $BACKENDS " in *" redis "*) apt_need redis-server redis-server ;; esac
case " $BACKENDS " in *" postgres "*) scripts/services.sh postgres >&2 ;; esac
mkdir -p "$STORES"

if [ "$MODE" != measure ]; then
  case " $BACKENDS " in *" redis "*) redis_up fill ;; esac
  for n in $SIZES; do fill_size "$n"; done
fi
[ "$MODE" = fill ] && exit 0

for b in $BACKENDS; do for n in $SIZES; do
  [ -f "$STORES/$b-$n.filled" ] || die "the $b store of $n keys is not filled (run: scripts/bench-web.sh fill)"
done; done
case " $BACKENDS " in *" redis "*) redis_up measure ;; esac
[ "$COUNTERS" = store ] || counters_up

# The store's servers at the default priority: a server started by a niced command (`nice -n 19
# scripts/bench-web.sh fill` starts this script's redis-server, and scripts/services.sh may start
# PostgreSQL) keeps that niceness, and at nice 19 next to kst and wrk at 0 it answers late
# (kst then waits on it). Root may lower it again; the table's footer says what they ran at.
server_pids() {
  case " $BACKENDS " in *" redis "*) redis_pid ;; esac
  case " $BACKENDS " in *" postgres "*) pgrep -o -u postgres -x postgres || true ;; esac
}
SERVER_NICE=""
for p in $(server_pids); do
  n="$(ps -o ni= -p "$p" | tr -d ' ')"
  if [ "${n:-0}" != 0 ] && [ "$(id -u)" -eq 0 ]; then
    log "$(ps -o comm= -p "$p") (pid $p) runs at nice $n: set to 0"
    renice -n 0 -p "$p" >/dev/null
    n="$(ps -o ni= -p "$p" | tr -d ' ')"
  fi
  SERVER_NICE+="${SERVER_NICE:+, }$(ps -o comm= -p "$p") at nice $n"
done

# --- measuring ------------------------------------------------------------------------------

# A port picked by free_port may be taken by another process before kst binds it (the machine
# is shared): kst serve is started until it listens on its own ports (wait_own_port), with new
# ports each time, at most this many times.
START_TRIES=5

# wrk's script: random paths from $PATHS; with XFF=n, one of n client addresses per request.
cat >"$WORK/lookup.lua" <<'EOF'
local paths = {}
for line in io.lines(os.getenv("PATHS")) do paths[#paths + 1] = line end
local host = os.getenv("HOST_HEADER")
local xff = tonumber(os.getenv("XFF") or "0")
local net = os.getenv("XFF_NET") or "9"
local n = 0
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
request = function()
  n = n + 1
  local h = {}
  if host and host ~= "" then h["Host"] = host end
  if xff > 0 then
    local c = n % xff
    h["X-Forwarded-For"] = "127." .. net .. "." .. math.floor(c / 256) .. "." .. (c % 256)
  end
  return wrk.format("GET", paths[math.random(#paths)], h)
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
EOF

# CPU time (user + system, clock ticks of 1/100 s) the processes $@ have used so far.
cpu_ticks() {
  local p t=0 f
  for p in "$@"; do
    f="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    f="${f##*) }"
    t=$((t + $(awk '{ print $12 + $13 }' <<<"$f")))
  done
  echo "$t"
}
# The store server's processes of backend $1 (none for fs), and the counters' redis-server
# with BENCH_WEB_COUNTERS=own.
store_pids() {
  case "$1" in
    redis) redis_pid ;;
    postgres) pgrep -u postgres -x postgres || true ;;
  esac
  [ "$COUNTERS" = store ] || counters_pid
}

# Sum of kst_web_requests_total{status=S} on the metrics page.
status_count() { # metrics-port status
  curl -s "http://127.0.0.1:$1/metrics" |
    awk -v s="status=\"$2\"" '/^kst_web_requests_total/ && index($0, s) { t += $NF } END { printf "%d", t }'
}

NET_BASE=$((RANDOM % 200)); RUN=0
if [ -n "$RATES" ]; then
  echo "| backend | stored | endpoint | limits | rate/s | look-ups/s | 429 share | late (busy) | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | CPU µs/req kst, load, store | RSS MiB | threads | load |"
  echo "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "| backend | stored | endpoint | limits | look-ups/s | 429 share | p50 ms | p99 ms | RSS MiB | threads | load |"
  echo "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
fi
for backend in $BACKENDS; do
  runs=wrk
  [ -z "$RATES" ] || runs="$(rates_for "$backend")"
  for n in $SIZES; do
    dir="$WORK/$backend-$n"; mkdir -p "$dir"
    held="$(tr -dc 0-9 <"$STORES/$backend-$n.filled")"
    read -r -a store <<<"$(store_env "$backend" "$n")"
    for limits in $LIMITS; do
      kst_pin=(); wrk_pin=(); wrk_threads=2; load_threads="$LOAD_THREADS"
      if [ -n "$PIN" ]; then kst_pin=(taskset -c 1); wrk_pin=(taskset -c 0); wrk_threads=1; load_threads=1; fi
      if [ "$limits" = off ]; then
        lim=(KST_WEB__LIMITS__PER_CLIENT=0 KST_WEB__LIMITS__PER_CLIENT_MISSES=0 KST_WEB__LIMITS__GLOBAL_MISSES=0)
        xff=0
      else
        lim=(KST_WEB__TRUSTED_PROXIES=127.0.0.1); xff="$CLIENTS"
        [ "$COUNTERS" = store ] ||
          lim+=(KST_WEB__COUNTERS__BACKEND=redis KST_WEB__COUNTERS__URL="redis://127.0.0.1:$COUNTERS_PORT")
      fi
      [ -z "$WORKERS" ] || lim+=(TOKIO_WORKER_THREADS="$WORKERS")
      started=""
      for try in $(seq 1 "$START_TRIES"); do
        lmtp="$(free_port)"; http="$(free_port)"; web="$(free_port)"
        env -C "$dir" -u KST_CONFIG "${store[@]}" "${lim[@]}" \
          KST_LMTP__LISTEN="127.0.0.1:$lmtp" KST_HTTP__LISTEN="127.0.0.1:$http" \
          KST_WEB__LISTEN="127.0.0.1:$web" KST_WEB__MAX_CONNECTIONS=4096 KST_LOG__LEVEL=warn \
          KST_LIMITS__PER_SENDER=0 KST_LIMITS__PER_ACCOUNT=0 KST_LIMITS__PER_SOURCE_IP=0 KST_LIMITS__PER_SENDER_QUERY=0 \
          "${kst_pin[@]}" "$KST" serve 2>>"$dir/serve.log" &
        pid=$!; PIDS+=("$pid")
        # kst binds [lmtp], then [web], then [http]: listening on its own [http] port, it has
        # all three (a port another process took makes it exit first).
        if wait_own_port "$pid" "$http"; then started=1; break; fi
        wait "$pid" || true
        log "kst serve exited before listening on ports $lmtp/$web/$http (try $try): $(tail -1 "$dir/serve.log")"
      done
      [ -n "$started" ] || die "kst serve did not start in $START_TRIES tries; see $dir/serve.log"
      for endpoint in $ENDPOINTS; do
        paths="$STORES/$backend-$n.paths/$endpoint.paths"
        if [ "$endpoint" = hkp ] && [ ! -s "$paths" ]; then # stores filled before hkp.paths existed
          sed 's|^/vks/v1/by-email/|/pks/lookup?op=get\&options=mr\&search=|' "${paths%/*}/vks.paths" >"$paths"
        fi
        [ -s "$paths" ] || die "$paths is missing"
        host=""; case "$endpoint" in wkd*) host="example.test" ;; esac
        for rate in $runs; do
          # The limits' counters live in the store for their window (10 minutes): each run's
          # clients are a /16 of their own (127.N.0.0, N from 10 to 209, a new one each run), so
          # a run never starts from what an earlier run, or an earlier invocation, counted.
          RUN=$((RUN + 1)); XFF_NET=$(( 10 + (NET_BASE + RUN) % 200 ))
          if [ -n "$RATES" ]; then
            log "$backend, $n keys, $endpoint, limits $limits: kst bench web --rate $rate -c$CONNS ${SECONDS_EACH}s${PIN:+ (pinned)}"
            code=0
            # shellcheck disable=SC2046 # one word per pid
            kst_cpu0="$(cpu_ticks "$pid")"; store_cpu0="$(cpu_ticks $(store_pids "$backend"))"
            out="$("${wrk_pin[@]}" "$KST" bench web --json --url "http://127.0.0.1:$web" --paths "$paths" \
              --rate "$rate" --duration "$SECONDS_EACH" --connections "$CONNS" --threads "$load_threads" \
              ${host:+--host "$host"} --clients "$xff" --clients-from "127.$XFF_NET.0.0" 2>>"$dir/bench.log")" || code=$?
            [ "$code" -le 1 ] || die "kst bench web failed (see $dir/bench.log)"
            [ "$code" -eq 0 ] || log "some requests got no HTTP answer (see the JSON: $out)"
            # shellcheck disable=SC2046
            cpu="$(( $(cpu_ticks "$pid") - kst_cpu0 )) $(( $(cpu_ticks $(store_pids "$backend")) - store_cpu0 ))"
            rss="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")"
            threads="$(awk '/^Threads/ {print $2}' "/proc/$pid/status")"
            load="$(cut -d' ' -f1 /proc/loadavg)"
            python3 -c 'import sys, json
b,n,e,l,out,cpu,rss,threads,load,own=sys.argv[1:]
r=json.loads(out); t=r["latency_ms"]
rate,lk,ref,late,busy=r["rate"],r["lookup_rate"],r["refused_percent"],r["late_percent"],r["waited_percent"]
p50,p90,p99,p999,mx=(t[k] for k in ("p50","p90","p99","p999","max"))
kst,store=(int(x) * 1e4 / max(r["requests"], 1) for x in cpu.split())
tool=r.get("cpu_us_per_request", 0.0)
cpus=f"{kst:.1f}, {tool:.1f}, " + (f"{store:.1f}" if b != "fs" or own == "own" else "-")
print(f"| {b} | {n} | {e} | {l} | {rate:,} | {lk:,.0f} | {ref:.1f}% | {late:.2f}% ({busy:.2f}%) | {p50:.2f} | {p90:.2f} | {p99:.2f} | {p999:.2f} | {mx:.2f} | {cpus} | {int(rss)/1024:.0f} | {threads} | {load} |")' \
              "$backend" "${held:-$n}" "$endpoint" "$limits" "$out" "$cpu" "$rss" "$threads" "$load" "$COUNTERS"
            continue
          fi
          before200="$(status_count "$http" 200)"; before404="$(status_count "$http" 404)"; before429="$(status_count "$http" 429)"
          log "$backend, $n keys, $endpoint, limits $limits: wrk -t$wrk_threads -c$CONNS -d${SECONDS_EACH}s${PIN:+ (pinned)}"
          out="$(PATHS="$paths" HOST_HEADER="$host" XFF="$xff" XFF_NET="$XFF_NET" \
            "${wrk_pin[@]}" wrk -t"$wrk_threads" -c"$CONNS" -d"${SECONDS_EACH}s" -s "$WORK/lookup.lua" "http://127.0.0.1:$web" | grep '^WRK')"
          read -r _ total dur_us p50 p99 _non2xx <<<"$out"
          ok=$(( $(status_count "$http" 200) - before200 + $(status_count "$http" 404) - before404 ))
          refused=$(( $(status_count "$http" 429) - before429 ))
          rss="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")"
          threads="$(awk '/^Threads/ {print $2}' "/proc/$pid/status")"
          load="$(cut -d' ' -f1 /proc/loadavg)"
          python3 -c 'import sys
b,n,e,l,ok,ref,tot,dur,p50,p99,rss,threads,load=sys.argv[1:]
ok,ref,tot,dur=int(ok),int(ref),int(tot),int(dur)
print(f"| {b} | {n} | {e} | {l} | {ok/(dur/1e6):,.0f} | {100*ref/max(tot,1):.1f}% | {int(p50)/1000:.2f} | {int(p99)/1000:.2f} | {int(rss)/1024:.0f} | {threads} | {load} |")' \
            "$backend" "${held:-$n}" "$endpoint" "$limits" "$ok" "$refused" "$total" "$dur_us" "$p50" "$p99" "$rss" "$threads" "$load"
        done
      done
      kill -TERM "$pid"; wait "$pid" || true
    done
  done
done
echo
if [ -n "$RATES" ]; then
  tool="kst bench web (open loop, -c$CONNS, $load_threads thread(s); latency from each request's due time)"
else
  tool="wrk -c$CONNS"
fi
pinning="kst and the load unpinned"
[ -n "$PIN" ] && pinning="kst pinned to CPU 1, the load (wrk -t1 or kst bench web --threads 1) to CPU 0 (taskset; the store's server unpinned)"
[ -z "$WORKERS" ] || pinning+=", kst serve with $WORKERS Tokio worker thread(s) (TOKIO_WORKER_THREADS)"
[ "$COUNTERS" = store ] || pinning+=", the limits' counters on a Redis of their own (BENCH_WEB_COUNTERS=own: 127.0.0.1:$COUNTERS_PORT, appendonly no; its CPU in the store column)"
echo "Machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -r); $pinning${SERVER_NICE:+; $SERVER_NICE}; $tool, ${SECONDS_EACH}s per row, $CLIENTS clients with limits at defaults; $(date -u '+%Y-%m-%d %H:%M UTC'); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
