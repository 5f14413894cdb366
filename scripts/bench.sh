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
# Environment: BENCH_C (connections, 8), BENCH_PUB (publications, 2000), BENCH_RET (retrievals,
# 20000), BENCH_PIPE_C (processes, 2), BENCH_PIPE_PUB (200), BENCH_PIPE_RET (1000),
# BENCH_SINK_MSGS (smtp-source messages, 100000), BENCH_PG_URL (postgres://postgres:postgres@127.0.0.1:5432),
# BENCH_KST (use this kst binary instead of building one in release mode).
set -euo pipefail
if [ "${1:-}" = web ]; then exec "$(dirname "$0")/bench-web.sh" "${@:2}"; fi

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

# ---- 1. build and prerequisites ----
bench_kst
if ! command -v smtp-sink >/dev/null && [ ! -x /usr/sbin/smtp-sink ]; then
  log "installing postfix (smtp-sink, smtp-source)"
  [ "$(id -u)" -eq 0 ] || die "postfix is missing; run as root to install it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix >&2
fi
export PATH="$PATH:/usr/sbin"
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
# The load comes from a few requesters on one host at thousands of messages per second: the
# default rate limits (docs/SECURITY.md) would silence nearly all of it. Measure kst without them.
NO_RATE_LIMITS="KST_LIMITS__PER_SENDER=0 KST_LIMITS__PER_ACCOUNT=0 KST_LIMITS__PER_SOURCE_IP=0 KST_LIMITS__PER_SENDER_QUERY=0"
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
