#!/usr/bin/env bash
# What the key directory (issue 18, docs/TRANSPARENCY.md) costs publications: `kst serve` on
# each store (fs, PostgreSQL) with `[transparency]` off and on, loaded by `kst bench lmtp`
# (C connections, PUB publications of new keys to distinct addresses, no retrievals), rate
# limits off, spool mailer. The runs alternate off/on ROUNDS times per store, each on a fresh
# store, so a drift of the shared machine hits both sides. Prints a markdown table (median
# msg/s of the rounds, p50/p99 of the median run) and the machine's load.
#
# Redis runs as this script's own redis-server (a free port, data under the temporary
# directory, `appendonly yes`, `appendfsync always`: the durability kst requires), a fresh key
# prefix per run.
#
# Usage: scripts/bench-transparency.sh
# Environment: BENCH_C (8; several values, e.g. "8 32", run each), BENCH_PUB (2000),
# BENCH_ROUNDS (3), BENCH_STORES ("fs postgres redis"), BENCH_PG_URL
# (postgres://postgres:postgres@127.0.0.1:5432), BENCH_KST (a kst binary; default: a release
# build of this checkout), BENCH_LOG (warn; `warn,kst_core::transparency::log=debug` also
# logs each epoch's timings), BENCH_TIMINGS (a file each run's log is appended to; with the
# debug log, a table of where the epochs' time went is printed at the end), BENCH_FRESH_FS (a
# size, e.g. 4G: the runs' stores and spools go on a fresh ext4 of that size made without a
# journal, like the test machine's, and loop-mounted for this invocation; needs root. On an
# ext4 without a journal every inode freed in the minutes before, by an earlier run's cleanup
# or other tests, makes each file created cost ~300 µs more: docs/BENCHMARKS.md),
# BENCH_FRESH_FS_JOURNAL (1: that file system made with a journal, as mkfs.ext4 makes it by
# default and distributions install it), BENCH_ORDER ("off on": each round runs the directory
# off, then on; "on off" the other way round, to see what running second costs a run: on
# Redis the second run meets the first one's keys in its redis-server and its append-only
# file).
set -euo pipefail
CS="${BENCH_C:-8}"
PUB="${BENCH_PUB:-2000}"
ROUNDS="${BENCH_ROUNDS:-3}"
STORES="${BENCH_STORES:-fs postgres redis}"
LOG_LEVEL="${BENCH_LOG:-warn}"
ORDER="${BENCH_ORDER:-off on}"
case "$ORDER" in
  "off on" | "on off") ;;
  *) echo "BENCH_ORDER must be \"off on\" or \"on off\", not \"$ORDER\"" >&2 && exit 2 ;;
esac
TIMINGS="${BENCH_TIMINGS:-}"
PG_BASE="${BENCH_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOG_NAME=bench-transparency
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
temp_work kst-bench-kt
bench_kst
FRESH_FS="${BENCH_FRESH_FS:-}"
MOUNTED=""
if [ -n "$FRESH_FS" ]; then
  IMAGE="$(mktemp "/var/tmp/kst-bench-kt-fs.XXXXXX")"
  truncate -s "$FRESH_FS" "$IMAGE"
  FEATURES="^has_journal"
  [ "${BENCH_FRESH_FS_JOURNAL:-0}" = 1 ] && FEATURES="has_journal"
  mkfs.ext4 -q -F -O "$FEATURES" "$IMAGE" || die "BENCH_FRESH_FS: mkfs.ext4 of $IMAGE failed"
  mount -o loop "$IMAGE" "$WORK" || die "BENCH_FRESH_FS: cannot loop-mount $IMAGE on $WORK (root needed)"
  MOUNTED="$WORK"
  rm -f "$IMAGE" # the mount keeps it until it is unmounted
fi
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
DBS=()
cleanup_more() {
  local db
  if [ -n "$MOUNTED" ]; then
    # Unmounted before temp_work's rm -rf: the fresh file system goes whole.
    umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED" || true
  fi
  for db in "${DBS[@]}"; do psql "$PG_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
}

# The embedded default configuration serves example.test and trusts the MTA localhost.
KST_KST__DOMAINS=example.test "$KST" log keygen example.test --output "$WORK/log-example.test.key" >/dev/null
NO_RATE_LIMITS="KST_LIMITS__PER_SENDER=0 KST_LIMITS__PER_ACCOUNT=0 KST_LIMITS__PER_SOURCE_IP=0 KST_LIMITS__PER_SENDER_QUERY=0"

# A port picked by free_port may be taken by another process before the server binds it (the
# machine is shared): each server is started until it listens on its own ports
# (wait_own_port), with new ports each time, at most this many times.
START_TRIES=5

REDIS_PORT=""
redis_up() {
  [ -n "$REDIS_PORT" ] && return
  local try pid
  mkdir -p "$WORK/redis"
  for try in $(seq 1 "$START_TRIES"); do
    REDIS_PORT="$(free_port)"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --save "" \
      --appendonly yes --appendfsync always --logfile "$WORK/redis/redis.log" &
    pid=$!
    PIDS+=("$pid")
    wait_own_port "$pid" "$REDIS_PORT" && return
    log "redis-server did not start on port $REDIS_PORT (try $try): $(tail -1 "$WORK/redis/redis.log")"
  done
  die "redis-server did not start in $START_TRIES tries; see $WORK/redis/redis.log"
}

# serve_up DIR ENV...: starts `kst serve` in DIR with the environment ENV (KEY=VALUE words) on
# free LMTP and HTTP ports, again on new ports when it exits before listening (a port taken
# meanwhile); sets SERVE_PID, LMTP_PORT and HTTP_PORT.
serve_up() {
  local dir="$1" try
  shift
  for try in $(seq 1 "$START_TRIES"); do
    LMTP_PORT="$(free_port)"
    HTTP_PORT="$(free_port)"
    env -C "$dir" -u KST_CONFIG KST_LMTP__LISTEN="127.0.0.1:$LMTP_PORT" \
      KST_HTTP__LISTEN="127.0.0.1:$HTTP_PORT" "$@" "$KST" serve 2>>"$dir/serve.log" &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    # The HTTP listener is bound after the LMTP one: both are up.
    wait_own_port "$SERVE_PID" "$HTTP_PORT" && return
    wait "$SERVE_PID" || true
    log "kst serve exited before listening on ports $LMTP_PORT/$HTTP_PORT (try $try): $(tail -1 "$dir/serve.log")"
  done
  die "kst serve did not start in $START_TRIES tries; see $dir/serve.log"
}

run() { # store directory(off|on) round concurrency
  local store="$1" kt="$2" round="$3" C="$4" dir senv=() pid out
  dir="$WORK/$store-$kt-$round-c$C"
  mkdir -p "$dir"
  case "$store" in
    fs) senv=(KST_STORE__BACKEND=fs KST_STORE__PATH="$dir/keys") ;;
    redis)
      redis_up
      senv=(KST_STORE__BACKEND=redis KST_STORE__URL="redis://127.0.0.1:$REDIS_PORT"
        KST_STORE__PREFIX="kstbench-$kt-$round-c$C:")
      ;;
    postgres)
      local db="kst_bench_kt_$$_${kt}_${round}_c$C"
      psql "$PG_BASE/postgres" -qc "CREATE DATABASE $db" >&2
      DBS+=("$db")
      senv=(KST_STORE__BACKEND=postgres KST_STORE__URL="$PG_BASE/$db" KST_STORE__MAX_CONNECTIONS=8)
      ;;
  esac
  if [ "$kt" = on ]; then senv+=(KST_TRANSPARENCY__KEY_FILE="$WORK/log-{domain}.key"); fi
  # shellcheck disable=SC2086 # $NO_RATE_LIMITS holds KEY=VALUE words
  serve_up "$dir" KST_LOG__LEVEL="$LOG_LEVEL" $NO_RATE_LIMITS "${senv[@]}"
  pid="$SERVE_PID"
  out="$dir/bench.jsonl"
  cpu_before="$(head -1 /proc/stat)"
  "$KST" bench lmtp -q --connect "127.0.0.1:$LMTP_PORT" --metrics "127.0.0.1:$HTTP_PORT" --concurrency "$C" \
    --publications "$PUB" --retrievals 0 --json >"$out" || log "$store $kt: some messages got no decision"
  cpu_after="$(head -1 /proc/stat)"
  kill -TERM "$pid"
  wait "$pid" || true
  if [ -n "$TIMINGS" ]; then sed "s/^/$store c=$C $kt: /" "$dir/serve.log" >>"$TIMINGS"; fi
  # The machine's CPU over the load run, from /proc/stat's first line (all processes: kst,
  # the database, the load tool): busy (user, nice, system, irq, softirq) in ms per
  # publication, and the shares of iowait, idle and steal. Busy CPU per publication does not
  # move with the disk's or the host's pauses as msg/s does.
  python3 -c "import json,sys,os
r=json.loads(open(sys.argv[1]).readline()); r.update(store=sys.argv[2], kt=sys.argv[3], load=sys.argv[4], c=int(sys.argv[5]))
a=[int(x) for x in sys.argv[6].split()[1:]]; b=[int(x) for x in sys.argv[7].split()[1:]]
d=[y-x for x,y in zip(a,b)]; hz=os.sysconf('SC_CLK_TCK'); total=sum(d[:8]) or 1
busy=d[0]+d[1]+d[2]+d[5]+d[6]
r.update(cpu_ms_per_pub=busy*1000/hz/int(sys.argv[8]), iowait=d[4]/total, idle=d[3]/total, steal=d[7]/total)
print(json.dumps(r))" \
    "$out" "$store" "$kt" "$(cut -d' ' -f1-3 /proc/loadavg)" "$C" "$cpu_before" "$cpu_after" "$PUB" >>"$RESULTS"
  log "$store, directory $kt, c=$C, round $round: $(tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f msg/s, load %s" % (r["rate"], r["load"]))')"
}

for C in $CS; do
  for store in $STORES; do
    for round in $(seq 1 "$ROUNDS"); do
      for kt in $ORDER; do run "$store" "$kt" "$round" "$C"; done
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| store | c | directory | rounds | msg/s (median) | msg/s of each round | p50 ms | p99 ms | p99 in kst ms | outcomes | cost | CPU ms/publication (median) | CPU cost | iowait, idle, steal |")
print("|---|---:|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|")
for store, c in dict.fromkeys((r["store"], r.get("c", 0)) for r in rows):
    med = {}
    for kt in ("off", "on"):
        rs = [r for r in rows if r["store"] == store and r.get("c", 0) == c and r["kt"] == kt]
        if not rs:
            continue
        rates = sorted(r["rate"] for r in rs)
        m = statistics.median(rates)
        med[kt] = m
        mid = min(rs, key=lambda r: abs(r["rate"] - m))
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(mid["outcomes"].items()))
        cost = f"{100 * (1 - m / med['off']):.0f}%" if kt == "on" and "off" in med else ""
        kst99 = f"≤ {mid['server_p99_ms']:g}" if mid.get("server_p99_ms") is not None else ""
        each = ", ".join(f"{r['rate']:.0f}" for r in rs)
        # The directory's cost in CPU: 1 - (busy CPU per publication off / on), what msg/s
        # would lose on a machine the load keeps busy.
        cpu = statistics.median(r.get("cpu_ms_per_pub", 0) for r in rs)
        med[kt + "_cpu"] = cpu
        cpu_cost = f"{100 * (1 - med['off_cpu'] / cpu):.0f}%" if kt == "on" and "off_cpu" in med and cpu else ""
        shares = f"{100 * mid.get('iowait', 0):.0f}%, {100 * mid.get('idle', 0):.0f}%, {100 * mid.get('steal', 0):.0f}%"
        print(f"| {store} | {c} | {kt} | {len(rs)} | {m:.0f} | {each} | {mid['p50_ms']:.2f} | {mid['p99_ms']:.2f} | {kst99} | {outcomes} | {cost} | {cpu:.2f} | {cpu_cost} | {shares} |")
PY
if [ -n "$TIMINGS" ] && grep -q "epoch timings" "$TIMINGS"; then
  # Where an epoch's time went (BENCH_LOG with kst_core::transparency::log=debug): means over
  # the epochs of each store and c (all runs appended to $TIMINGS so far), µs.
  python3 - "$TIMINGS" <<'PY'
import collections, re, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if "epoch timings" not in line:
        continue
    key = " ".join(line.split(" ")[:2])
    rows[key].append({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)})
fields = ["entries", "pinned_us", "read_us", "head_before_us", "published_us", "commit_us", "done_us"]
print()
print("| store, c | epochs | " + " | ".join(f"{f} (mean)" for f in fields) + " | done_us (median) |")
print("|---|---:|" + "---:|" * (len(fields) + 1))
for key, rs in rows.items():
    means = " | ".join(f"{statistics.mean(r.get(f, 0) for r in rs):.1f}" for f in fields)
    print(f"| {key} | {len(rs)} | {means} | {statistics.median(r['done_us'] for r in rs):.0f} |")
PY
fi
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr); load average of each run in $RESULTS (kept below)."
python3 -c "import json,sys; [print(f\"  {r['store']} c={r.get('c')} {r['kt']}: {r['rate']:.0f} msg/s, load {r['load']}\") for r in map(json.loads, open(sys.argv[1]))]" "$RESULTS"
echo "uptime at the end: $(uptime)"
echo "Command: ${FRESH_FS:+BENCH_FRESH_FS=$FRESH_FS }${BENCH_FRESH_FS_JOURNAL:+BENCH_FRESH_FS_JOURNAL=$BENCH_FRESH_FS_JOURNAL }BENCH_ORDER=\"$ORDER\" BENCH_C=\"$CS\" BENCH_PUB=$PUB BENCH_ROUNDS=$ROUNDS BENCH_STORES=\"$STORES\" scripts/bench-transparency.sh"
