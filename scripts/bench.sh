#!/usr/bin/env bash
# The LMTP load benchmark, in one run (see docs/BENCHMARKS.md, "## LMTP"):
#   1. builds kst in release mode; installs Postfix (smtp-sink, smtp-source) if missing and
#      starts PostgreSQL and Redis (scripts/services.sh);
#   2. measures the transport ceiling: smtp-sink -u nobody -L (accepts and discards LMTP)
#      driven by smtp-source -L -d -s 8 (8 reused sessions), then one connection per message;
#   3. runs `kst serve` on the filesystem, Redis and PostgreSQL stores, each with the SMTP
#      mailer against a second smtp-sink and with the spool mailer, loading each with
#      `kst bench lmtp` (C reused connections, real keys, varied addresses);
#   4. runs pipe mode (`kst bench pipe`: one `kst deliver` process per message);
#   5. prints a markdown table (and the machine) on stdout; progress and details on stderr.
#
# Usage: scripts/bench.sh            (as root on Debian, from anywhere in the repository)
#        scripts/bench.sh web [MODE] the public listener's look-ups instead (scripts/bench-web.sh)
#        scripts/bench.sh pool       pool scaling instead: 1, 2, 3 `kst serve` on one PostgreSQL
#                                    and on one Redis Cluster, with CPU per message and store
#                                    operations per message (below)
#        scripts/bench.sh sizing     bytes per key and per history entry on each backend (below)
# Environment: BENCH_C (connections, 8), BENCH_PUB (publications, 2000), BENCH_RET (retrievals,
# 20000), BENCH_PIPE_C (processes, 2), BENCH_PIPE_PUB (200), BENCH_PIPE_RET (1000),
# BENCH_SINK_MSGS (smtp-source messages, 100000), BENCH_PG_URL (postgres://postgres:postgres@127.0.0.1:5432),
# BENCH_KST (use this kst binary instead of building one in release mode).
#
# pool: for each store and each pool size N it starts N `kst serve` (SMTP mailer to smtp-sink,
# rate limits and reminders off) on a fresh database / key prefix and loads them with one
# `kst bench lmtp --connect a,b,c` (BENCH_C connections per instance, spread over the
# instances). At the edges of each phase (`--phase-hook`) scripts/bench_pool.py reads from
# /proc the CPU time of the machine, of the kst serve processes, of the store's processes, of
# kst bench and of smtp-sink, and the store's operation counters (PostgreSQL:
# pg_stat_statements; Redis: INFO commandstats of the primaries). The stores: a PostgreSQL
# server of the run's own (initdb in its work directory: Debian's defaults, fsync and
# synchronous_commit on, plus pg_stat_statements) and the Redis Cluster of
# `scripts/ha-services.sh cluster up` (three primaries with one replica each, appendfsync
# always), which must be up. Prints two markdown tables. Environment: BENCH_POOL_SIZES
# ("1 2 3"), BENCH_POOL_STORES ("postgres cluster"), BENCH_POOL_MIN_REPLICAS (0), BENCH_C,
# BENCH_PUB, BENCH_RET, BENCH_KST.
# sizing: one `kst serve` per store (BENCH_POOL_STORES, default "fs postgres cluster"), BENCH_PUB
# publications of real keys, then as many again for the same addresses (a second version each);
# measures the store when empty and after each round (PostgreSQL: pg_total_relation_size of
# each table; Redis: used_memory and AOF size of the primaries, MEMORY USAGE of each kind of
# key; fs: du) and prints the bytes per key and per history entry.
set -euo pipefail
MODE="${1:-lmtp}"
case "$MODE" in
  web) exec "$(dirname "$0")/bench-web.sh" "${@:2}" ;;
  lmtp | pool | sizing) ;;
  *) echo "usage: $0 [web [MODE]|pool|sizing]" >&2; exit 64 ;;
esac

C="${BENCH_C:-8}"
PUB="${BENCH_PUB:-2000}"
RET="${BENCH_RET:-20000}"
PIPE_C="${BENCH_PIPE_C:-2}"
PIPE_PUB="${BENCH_PIPE_PUB:-200}"
PIPE_RET="${BENCH_PIPE_RET:-1000}"
SINK_MSGS="${BENCH_SINK_MSGS:-100000}"
PG_BASE="${BENCH_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOG_NAME=bench
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

temp_work kst-bench

# The load comes from a few requesters on one host at thousands of messages per second: the
# default rate limits (docs/SECURITY.md) would silence nearly all of it. Measure kst without them.
NO_RATE_LIMITS="KST_LIMITS__PER_SENDER=0 KST_LIMITS__PER_ACCOUNT=0 KST_LIMITS__PER_SOURCE_IP=0 KST_LIMITS__PER_SENDER_QUERY=0"

# ---- pool and sizing modes ----
POOL_PG_PORT=""
# A PostgreSQL server of the run's own (pg_stat_statements needs shared_preload_libraries).
pool_pg_up() {
  local bin
  bin="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin | sort -V | tail -1)"
  [ -x "$bin/initdb" ] || die "PostgreSQL is missing (scripts/services.sh postgres installs it)"
  POOL_PG_BIN="$bin"
  POOL_PG_DIR="$WORK/pg"
  chmod 0755 "$WORK"
  install -d -o postgres -g postgres -m 0700 "$POOL_PG_DIR"
  (cd / && runuser -u postgres -- "$bin/initdb" -D "$POOL_PG_DIR" -U postgres --auth=trust -E UTF8 \
    --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1) || { tail "$WORK/initdb.log" >&2; die "initdb failed"; }
  POOL_PG_PORT="$(free_port)"
  cat >>"$POOL_PG_DIR/postgresql.conf" <<EOF
port = $POOL_PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$POOL_PG_DIR'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track_utility = on
EOF
  (cd / && runuser -u postgres -- "$bin/pg_ctl" -D "$POOL_PG_DIR" -l "$POOL_PG_DIR/server.log" -w start >/dev/null) \
    || { tail "$POOL_PG_DIR/server.log" >&2; die "PostgreSQL did not start"; }
  POOL_PG_URL="postgres://postgres@127.0.0.1:$POOL_PG_PORT"
  log "PostgreSQL of this run on 127.0.0.1:$POOL_PG_PORT ($("$bin/postgres" --version))"
}
pool_pg_down() {
  [ -n "$POOL_PG_PORT" ] || return 0
  (cd / && runuser -u postgres -- "$POOL_PG_BIN/pg_ctl" -D "$POOL_PG_DIR" -m fast -w stop >/dev/null) || true
  POOL_PG_PORT=""
}
pool_psql() { psql -h 127.0.0.1 -p "$POOL_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -q "$@"; }

# pool_store_env STORE NAME: the KST_STORE__* words of STORE (postgres, cluster, fs) in a fresh
# namespace NAME (a database, a key prefix, a directory).
pool_store_env() {
  case "$1" in
    postgres)
      pool_psql -d postgres -c "CREATE DATABASE $2" >&2
      pool_psql -d "$2" -c "CREATE EXTENSION pg_stat_statements" >&2
      echo "KST_STORE__BACKEND=postgres KST_STORE__URL=$POOL_PG_URL/$2 KST_STORE__MAX_CONNECTIONS=8"
      ;;
    cluster)
      echo "KST_STORE__BACKEND=redis KST_STORE__PREFIX=$2: KST_STORE__MIN_REPLICAS=${BENCH_POOL_MIN_REPLICAS:-0}"
      ;;
    fs) echo "KST_STORE__BACKEND=fs KST_STORE__PATH=$WORK/$2" ;;
  esac
}

# pool_start STORE N NAME: N kst serve on STORE in the fresh namespace NAME, ready; sets
# POOL_SERVE_PIDS and POOL_CONNECT (their LMTP addresses, comma-separated).
POOL_SERVE_PIDS=()
pool_start() {
  local store="$1" n="$2" name="$3" i dir lmtp http senv https=()
  senv="$(pool_store_env "$store" "$name")"
  POOL_SERVE_PIDS=()
  POOL_CONNECT=""
  for i in $(seq 1 "$n"); do
    dir="$WORK/$name-serve$i"
    mkdir -p "$dir"
    lmtp="$(free_port)"
    http="$(free_port)"
    # The cluster's nodes go in KST_STORE__CLUSTER_NODES, a whitespace-separated list (unused by
    # the other backends).
    # shellcheck disable=SC2086 # $senv, $SMTP_MAILER and $NO_RATE_LIMITS hold KEY=VALUE words
    env -C "$dir" -u KST_CONFIG KST_KST__DOMAINS=example.test KST_KST__TRUSTED_MTA_HOSTS=localhost \
      KST_LMTP__LISTEN="127.0.0.1:$lmtp" KST_HTTP__LISTEN="127.0.0.1:$http" KST_LOG__LEVEL=warn \
      KST_REMINDERS__ENABLED=false KST_STORE__CLUSTER_NODES="$CLUSTER_NODES" \
      $NO_RATE_LIMITS $SMTP_MAILER $senv "$KST" serve 2>"$dir/serve.log" &
    POOL_SERVE_PIDS+=("$!")
    PIDS+=("$!")
    POOL_CONNECT="${POOL_CONNECT:+$POOL_CONNECT,}127.0.0.1:$lmtp"
    https+=("$http")
  done
  for http in "${https[@]}"; do
    for _ in $(seq 1 200); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http/readyz")" = 200 ] && continue 2
      sleep 0.1
    done
    cat "$WORK/$name"-serve*/serve.log >&2
    die "kst serve with /readyz on 127.0.0.1:$http is not ready"
  done
}
# pool_clear STORE NAME: removes the namespace NAME of a finished run (the cluster is shared).
pool_clear() {
  case "$1" in
    postgres) pool_psql -d postgres -c "DROP DATABASE $2" >&2 ;;
    cluster)
      local a port
      for a in $CLUSTER_NODES; do
        port="${a##*:}"
        redis-cli -p "$port" info replication | grep -q '^role:master' || continue
        # One UNLINK per key: a cluster refuses multi-key commands across slots.
        redis-cli -p "$port" --scan --pattern "$2:*" | sed 's/^/UNLINK /' | redis-cli -p "$port" >/dev/null
      done
      ;;
  esac
}

# On exit (scripts/lib.sh's temp_work): the pool's kst serve and PostgreSQL.
cleanup_more() {
  pool_stop
  pool_pg_down
}
pool_stop() {
  local p
  for p in "${POOL_SERVE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${POOL_SERVE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  POOL_SERVE_PIDS=()
}

# pool_run_json STORE N NAME LABEL: describes the running pool for scripts/bench_pool.py.
pool_run_json() {
  local kind="$1"
  [ "$kind" = cluster ] && kind=redis
  python3 - "$WORK/runs/$3.json" "$4" "$kind" "$2" "${POOL_SERVE_PIDS[*]}" "${SMTP_SINK_PID:-0}" \
    "$WORK/runs/$3" "$(cut -d' ' -f1-3 /proc/loadavg)" "$PUB" "${POOL_PG_PORT:-0}" "$3" \
    "$WORK/pg/postmaster.pid" "$CLUSTER_NODES" "$CLUSTER_DIR" "$WORK/$3" <<'PY'
import json, sys
(out, label, kind, n, pids, sink, base, load, pub, pgport, name, pgpid, nodes, cdir, fs) = sys.argv[1:]
ports = [int(a.rsplit(":", 1)[1]) for a in nodes.split()]
json.dump({
    "label": label, "store": kind, "instances": int(n), "kst_pids": [int(p) for p in pids.split()],
    "sink_pid": int(sink), "samples": base + ".samples.jsonl", "bench": base + ".bench.jsonl",
    "load": load, "publications": int(pub),
    "pg_psql": ["psql", "-h", "127.0.0.1", "-p", pgport, "-U", "postgres"], "pg_db": name,
    "pg_pidfile": pgpid, "redis_ports": ports,
    "redis_pidfiles": [f"{cdir}/redis-{p}/redis.pid" for p in ports],
    "prefix": name + ":", "fs_path": fs,
}, open(out, "w"))
PY
}

pool_main() {
  local stores sizes="${BENCH_POOL_SIZES:-1 2 3}"
  if [ "$MODE" = sizing ]; then stores="${BENCH_POOL_STORES:-fs postgres cluster}"; else stores="${BENCH_POOL_STORES:-postgres cluster}"; fi
  mkdir -p "$WORK/runs"
  CLUSTER_NODES=""
  CLUSTER_DIR=""
  case " $stores " in
    *" cluster "*)
      local envs
      envs="$(scripts/ha-services.sh cluster env)" || die "the Redis Cluster is not up: scripts/ha-services.sh cluster up"
      CLUSTER_DIR="$(sed -n 's/^export KST_HA_CLUSTER_DIR=//p' <<<"$envs")"
      CLUSTER_NODES="$(sed -n 's/^export KST_HA_CLUSTER_NODES=//p' <<<"$envs" | tr ',' '\n' | sed 's|^|redis://|' | paste -sd' ')"
      ;;
  esac
  case " $stores " in *" postgres "*) pool_pg_up ;; esac
  local sink_port
  sink_port="$(free_port)"
  smtp-sink -u nobody "127.0.0.1:$sink_port" 1024 &
  SMTP_SINK_PID=$!
  PIDS+=("$!")
  wait_port "$sink_port"
  SMTP_MAILER="KST_MAILER__KIND=smtp KST_MAILER__HOST=127.0.0.1 KST_MAILER__PORT=$sink_port KST_MAILER__TLS=none"
  local store n name label round runs=()
  for store in $stores; do
    case "$store" in
      postgres) label="PostgreSQL (own server)" ;;
      cluster) label="Redis Cluster" ;;
      fs) label="fs" ;;
      *) die "unknown store $store (postgres, cluster, fs)" ;;
    esac
    if [ "$MODE" = sizing ]; then
      name="kstsize_${store}_$$"
      pool_start "$store" 1 "$name"
      pool_run_json "$store" 1 "$name" "$label"
      python3 scripts/bench_pool.py size "$WORK/runs/$name.json" empty
      for round in one two; do
        log "sizing, $label: $PUB publications (round $round)"
        "$KST" bench lmtp -q --connect "$POOL_CONNECT" --concurrency "$C" --publications "$PUB" \
          --retrievals 0 --json >>"$WORK/runs/$name.bench.jsonl" || die "sizing, $label: some publications got no decision"
        python3 scripts/bench_pool.py size "$WORK/runs/$name.json" "$round"
      done
      pool_stop
      pool_clear "$store" "$name"
      runs+=("$WORK/runs/$name.json")
      continue
    fi
    for n in $sizes; do
      name="kstpool_${store}_${n}_$$"
      pool_start "$store" "$n" "$name"
      pool_run_json "$store" "$n" "$name" "$label"
      log "$label, $n kst serve ($POOL_CONNECT), load average $(cut -d' ' -f1-3 /proc/loadavg)"
      "$KST" bench lmtp -q --connect "$POOL_CONNECT" --concurrency "$((C * n))" --publications "$PUB" \
        --retrievals "$RET" --phase-hook "python3 $ROOT/scripts/bench_pool.py sample $WORK/runs/$name.json \$PPID" \
        --json >"$WORK/runs/$name.bench.jsonl" || log "$label, $n kst serve: some messages got no decision"
      pool_stop
      pool_clear "$store" "$name"
      runs+=("$WORK/runs/$name.json")
    done
  done
  if [ "$MODE" = sizing ]; then
    python3 scripts/bench_pool.py sizes "${runs[@]}"
  else
    python3 scripts/bench_pool.py report "${runs[@]}"
  fi
  echo
  echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr)."
  echo "uptime at the end: $(uptime)"
  echo "Command: BENCH_C=$C BENCH_PUB=$PUB BENCH_RET=$RET BENCH_POOL_SIZES=\"$sizes\" BENCH_POOL_STORES=\"$stores\" BENCH_POOL_MIN_REPLICAS=${BENCH_POOL_MIN_REPLICAS:-0} scripts/bench.sh $MODE"
}

# ---- 1. build and prerequisites ----
bench_kst
if ! command -v smtp-sink >/dev/null && [ ! -x /usr/sbin/smtp-sink ]; then
  log "installing postfix (smtp-sink, smtp-source)"
  [ "$(id -u)" -eq 0 ] || die "postfix is missing; run as root to install it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix >&2
fi
export PATH="$PATH:/usr/sbin"
if [ "$MODE" != lmtp ]; then
  pool_main
  exit 0
fi
scripts/services.sh postgres redis >&2

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
row() { printf '%s\n' "$1" >>"$RESULTS"; }

# ---- 2. the ceiling: smtp-sink ----
SINK_PORT="$(free_port)"
smtp-sink -u nobody -L "127.0.0.1:$SINK_PORT" 1024 &
PIDS+=("$!")
wait_port "$SINK_PORT"
sink_run() { # label, message count, smtp-source flags...
  local label="$1" count="$2"; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  smtp-source -L "$@" -f bench@example.org -t keys@example.test "127.0.0.1:$SINK_PORT"
  t1=$(date +%s.%N)
  row "$(python3 -c "import json,sys; n=int(sys.argv[2]); s=float(sys.argv[4])-float(sys.argv[3]); print(json.dumps({'label':sys.argv[1],'phase':'smtp-sink','messages':n,'decided':n,'seconds':s,'rate':n/s}))" "$label" "$count" "$t0" "$t1")"
}
log "smtp-sink ceiling: $SINK_MSGS messages over 8 reused LMTP sessions"
sink_run "smtp-sink, 8 reused sessions (smtp-source -L -d -s 8)" "$SINK_MSGS" -d -s 8 -m "$SINK_MSGS"
log "smtp-sink ceiling: one connection per message"
sink_run "smtp-sink, new connection per message (smtp-source -L -s 8)" "$((SINK_MSGS / 4))" -s 8 -m "$((SINK_MSGS / 4))"
SINK_MSGS_SAVED="$SINK_MSGS"

# ---- 3. kst serve on each backend ----
serve_run() { # label, then KEY=VALUE environment overrides
  local label="$1"; shift
  local dir="$WORK/serve-$RANDOM"
  mkdir -p "$dir"
  local lmtp http listen
  lmtp="$(free_port)"; http="$(free_port)"
  listen="127.0.0.1:$lmtp"
  case " $* " in *" UNIX_SOCKET=1 "*) listen="unix:$dir/lmtp.sock" ;; esac
  env -C "$dir" -u KST_CONFIG KST_LMTP__LISTEN="$listen" KST_HTTP__LISTEN="127.0.0.1:$http" \
    KST_LOG__LEVEL=warn $NO_RATE_LIMITS "$@" "$KST" serve 2>"$dir/serve.log" &
  local pid=$! kpid=$!
  PIDS+=("$pid")
  wait_port "$http"
  log "$label: kst serve pid $kpid on $listen"
  local out="$dir/bench.jsonl"
  "$KST" bench lmtp --connect "$listen" --metrics "127.0.0.1:$http" \
    --concurrency "$C" --publications "$PUB" --retrievals "$RET" --json >"$out" || log "$label: some messages got no decision"
  local rss
  rss="$(awk '/VmHWM/ {print $2}' "/proc/$kpid/status")"
  kill -TERM "$kpid"
  wait "$pid" || log "$label: kst serve exited with $?"
  while read -r line; do
    row "$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); r['label']=sys.argv[2]; r['rss_kib']=int(sys.argv[3]); print(json.dumps(r))" "$line" "$label" "$rss")"
  done <"$out"
}

# The SMTP mailer hands each reply to a second smtp-sink, in SMTP mode (what a provider runs:
# replies go to its own Postfix); the spool mailer writes a durable file per reply.
SMTP_PORT="$(free_port)"
smtp-sink -u nobody "127.0.0.1:$SMTP_PORT" 1024 &
PIDS+=("$!")
wait_port "$SMTP_PORT"
SMTP_MAILER="KST_MAILER__KIND=smtp KST_MAILER__HOST=127.0.0.1 KST_MAILER__PORT=$SMTP_PORT KST_MAILER__TLS=none"
DB="kst_bench_$$"
psql "$PG_BASE/postgres" -qc "CREATE DATABASE $DB" >&2
for mailer in smtp spool; do
  if [ "$mailer" = smtp ]; then M=$SMTP_MAILER; name="SMTP mailer to smtp-sink"; else M=""; name="spool mailer"; fi
  # shellcheck disable=SC2086 # $M holds KEY=VALUE words
  serve_run "kst serve, fs store, $name" KST_STORE__BACKEND=fs $M
  # shellcheck disable=SC2086
  serve_run "kst serve, Redis store, $name" KST_STORE__BACKEND=redis \
    KST_STORE__URL=redis://127.0.0.1:6379 KST_STORE__PREFIX="kstbench$$x$RANDOM" $M
  # shellcheck disable=SC2086
  serve_run "kst serve, PostgreSQL store, $name" KST_STORE__BACKEND=postgres \
    KST_STORE__URL="$PG_BASE/$DB" KST_STORE__MAX_CONNECTIONS=8 $M
  psql "$PG_BASE/postgres" -qc "DROP DATABASE $DB" >&2 || true
  psql "$PG_BASE/postgres" -qc "CREATE DATABASE $DB" >&2
done
psql "$PG_BASE/postgres" -qc "DROP DATABASE $DB" >&2 || true
# Postfix often reaches kst over a Unix socket (lmtp:unix:...): the same fs/SMTP run on one.
# shellcheck disable=SC2086
serve_run "kst serve, fs store, SMTP mailer, LMTP over a Unix socket" KST_STORE__BACKEND=fs \
  $SMTP_MAILER UNIX_SOCKET=1

# ---- 4. pipe mode ----
PIPE_DIR="$WORK/pipe"
mkdir -p "$PIPE_DIR"
cat >"$PIPE_DIR/kst.toml" <<EOF
[kst]
domains = ["example.test"]
trusted_mta_hosts = ["localhost"]
[store]
backend = "fs"
path = "$PIPE_DIR/keys"
[limits]
per_sender = 0
per_account = 0
per_source_ip = 0
per_sender_query = 0
[mailer]
kind = "spool"
path = "$PIPE_DIR/outbox"
[log]
level = "warn"
EOF
log "pipe mode: one kst deliver per message, $PIPE_C at a time"
"$KST" --config "$PIPE_DIR/kst.toml" bench pipe --concurrency "$PIPE_C" --publications "$PIPE_PUB" \
  --retrievals "$PIPE_RET" --json >"$PIPE_DIR/bench.jsonl" || log "pipe: some messages got no decision"
while read -r line; do
  row "$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); r['label']='pipe mode (kst deliver per message), fs store, spool mailer'; print(json.dumps(r))" "$line")"
done <"$PIPE_DIR/bench.jsonl"

# ---- 5. the table ----
python3 - "$RESULTS" "$SINK_MSGS_SAVED" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sink = next((r["rate"] for r in rows if r["phase"] == "smtp-sink"), None)
print("| setup | load | messages | msg/s | % of smtp-sink | p50 ms | p95 ms | p99 ms | p99 in kst ms | peak RSS MiB | outcomes |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    phase = r["phase"]
    load = phase if phase == "smtp-sink" else f"{phase}s, c={r.get('concurrency')}"
    pct = f"{100 * r['rate'] / sink:.0f}%" if sink and phase != "smtp-sink" else ""
    f = lambda k, d=2: (f"{r[k]:.{d}f}" if isinstance(r.get(k), (int, float)) else "")
    rss = f"{r['rss_kib'] / 1024:.0f}" if "rss_kib" in r else ""
    kst99 = f"≤ {r['server_p99_ms']:g}" if r.get("server_p99_ms") is not None else ""
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.get("outcomes", {}).items()))
    print(f"| {r['label']} | {load} | {r['messages']} | {r['rate']:.0f} | {pct} | {f('p50_ms')} | {f('p95_ms')} | {f('p99_ms')} | {kst99} | {rss} | {outcomes} |")
PY
echo
echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr), $(df -T "$WORK" | awk 'NR==2 {print $2}') under /tmp; rustc $(rustc --version | cut -d' ' -f2)."
echo "Command: scripts/bench.sh (BENCH_C=$C BENCH_PUB=$PUB BENCH_RET=$RET BENCH_PIPE_C=$PIPE_C BENCH_PIPE_PUB=$PIPE_PUB BENCH_PIPE_RET=$PIPE_RET BENCH_SINK_MSGS=$SINK_MSGS)"
