#!/usr/bin/env bash
# Look-ups per second of the public listener [web] (see docs/BENCHMARKS.md, "## Web look-ups"):
#   1. for each backend (fs, Redis, PostgreSQL) and each stored size N, starts `kst serve` with
#      [web] on plain HTTP on loopback and fills the store through the real mail path
#      (`kst bench lmtp --publications N`: real keys, user000000@example.test ...);
#      or, for the fs sizes named in BENCH_WEB_FS_DIRS, uses a store filled beforehand by
#      kst-store-bench --real-keys --fill-only --paths-out (10^6 keys through LMTP take too long);
#   2. loads WKD (direct method, Host: example.test: `wkd` with ?l=, found by address;
#      `wkdhash` without, found through the store's WKD-hash index), VKS by-email (`vks`) and,
#      for a prefilled store, VKS by-fingerprint (`fpr`, the fingerprint index) with wrk
#      (Debian's), asking stored addresses at random, for BENCH_WEB_SECONDS each:
#      - limits off (every [web.limits] counter 0): the look-up path itself;
#      - limits at their defaults, the load spread over 64 client addresses 127.0.9.1-64: kst
#        trusts 127.0.0.1 as a proxy and wrk names the client in X-Forwarded-For (wrk cannot bind
#        source addresses), so the limiter counts 64 clients through its real path;
#   3. reads the status counts from kst's own /metrics (only 200 and 404 count as look-ups; the
#      share of 429 is reported), kst's peak RSS, and prints a markdown table on stdout.
#
# Usage: scripts/bench-web.sh       (as root on Debian: installs wrk if missing)
# Environment: BENCH_WEB_SIZES ("1000"; e.g. "1000 1000000"), BENCH_WEB_SECONDS (10),
# BENCH_WEB_CONNECTIONS (64), BENCH_WEB_BACKENDS ("fs redis postgres"),
# BENCH_WEB_FS_DIRS ("" ; e.g. "1000000=/var/tmp/web1m": size=store directory whose paths/
# subdirectory holds the request paths kst-store-bench wrote),
# BENCH_PG_URL (postgres://postgres:postgres@127.0.0.1:5432), BENCH_KST (a kst binary to use
# instead of building one in release mode).
set -euo pipefail

SIZES="${BENCH_WEB_SIZES:-1000}"
SECONDS_EACH="${BENCH_WEB_SECONDS:-10}"
CONNS="${BENCH_WEB_CONNECTIONS:-64}"
BACKENDS="${BENCH_WEB_BACKENDS:-fs redis postgres}"
PG_BASE="${BENCH_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LOG_NAME=bench-web
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

temp_work kst-bench-web
DBS=()
cleanup_more() {
  for db in "${DBS[@]}"; do psql "$PG_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
}

bench_kst
if ! command -v wrk >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "wrk is missing; run as root to install it (apt-get install wrk)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk >&2
fi
case " $BACKENDS " in *" redis "*|*" postgres "*) scripts/services.sh postgres redis >&2 ;; esac

# wrk's script: random paths from $PATHS; with XFF=n, one of n client addresses per request.
cat >"$WORK/lookup.lua" <<'EOF'
local paths = {}
for line in io.lines(os.getenv("PATHS")) do paths[#paths + 1] = line end
local host = os.getenv("HOST_HEADER")
local xff = tonumber(os.getenv("XFF") or "0")
local n = 0
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
request = function()
  n = n + 1
  local h = {}
  if host and host ~= "" then h["Host"] = host end
  if xff > 0 then h["X-Forwarded-For"] = "127.0.9." .. (n % xff + 1) end
  return wrk.format("GET", paths[math.random(#paths)], h)
end
done = function(summary, latency, requests)
  io.write(string.format("WRK %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
EOF

# The request paths of N stored addresses (at most 200,000 sampled), for WKD and VKS.
paths() { # N
  python3 - "$1" "$WORK" <<'EOF'
import hashlib, random, sys
n, work = int(sys.argv[1]), sys.argv[2]
alphabet = "ybndrfg8ejkmcpqxot1uwisza345h769"
def zb32(b):
    bits = "".join(f"{x:08b}" for x in b)
    return "".join(alphabet[int(bits[i:i + 5].ljust(5, "0"), 2)] for i in range(0, len(bits), 5))
ids = range(n) if n <= 200000 else random.sample(range(n), 200000)
with open(f"{work}/wkd.paths", "w") as w, open(f"{work}/vks.paths", "w") as v:
    h = open(f"{work}/wkdhash.paths", "w")
    for i in ids:
        local = f"user{i:06d}"
        hu = zb32(hashlib.sha1(local.encode()).digest())
        w.write(f"/.well-known/openpgpkey/hu/{hu}?l={local}\n")
        h.write(f"/.well-known/openpgpkey/hu/{hu}\n")
        v.write(f"/vks/v1/by-email/{local}@example.test\n")
    h.close()
EOF
}

# Sum of kst_web_requests_total{status=S} on the metrics page.
status_count() { # metrics-port status
  curl -s "http://127.0.0.1:$1/metrics" |
    awk -v s="status=\"$2\"" '/^kst_web_requests_total/ && index($0, s) { t += $NF } END { printf "%d", t }'
}

echo "| backend | stored | endpoint | limits | look-ups/s | 429 share | p50 ms | p99 ms | RSS MiB |"
echo "|---|---:|---|---|---:|---:|---:|---:|---:|"
for backend in $BACKENDS; do
  for n in $SIZES; do
    dir="$WORK/$backend-$n"; mkdir -p "$dir"
    lmtp="$(free_port)"; http="$(free_port)"; web="$(free_port)"
    store=(KST_STORE__BACKEND="$backend")
    prefilled=""
    if [ "$backend" = fs ]; then
      for m in ${BENCH_WEB_FS_DIRS:-}; do [ "${m%%=*}" = "$n" ] && prefilled="${m#*=}"; done
    fi
    if [ -n "$prefilled" ]; then
      [ -f "$prefilled/paths/wkd.paths" ] || die "$prefilled/paths/wkd.paths is missing (kst-store-bench --paths-out)"
      store+=(KST_STORE__PATH="$prefilled")
    fi
    case "$backend" in
      redis) store+=(KST_STORE__URL=redis://127.0.0.1:6379 KST_STORE__PREFIX="kstwebbench$$x$RANDOM") ;;
      postgres)
        db="kst_web_bench_$$_$RANDOM"; DBS+=("$db")
        psql "$PG_BASE/postgres" -qc "CREATE DATABASE $db" >&2
        store+=(KST_STORE__URL="$PG_BASE/$db" KST_STORE__MAX_CONNECTIONS=8) ;;
    esac
    for limits in off defaults; do
      if [ "$limits" = off ]; then
        lim=(KST_WEB__LIMITS__PER_CLIENT=0 KST_WEB__LIMITS__PER_CLIENT_MISSES=0 KST_WEB__LIMITS__GLOBAL_MISSES=0)
        xff=0
      else
        lim=(KST_WEB__TRUSTED_PROXIES=127.0.0.1); xff=64
      fi
      env -C "$dir" -u KST_CONFIG "${store[@]}" "${lim[@]}" \
        KST_LMTP__LISTEN="127.0.0.1:$lmtp" KST_HTTP__LISTEN="127.0.0.1:$http" \
        KST_WEB__LISTEN="127.0.0.1:$web" KST_WEB__MAX_CONNECTIONS=4096 KST_LOG__LEVEL=warn \
        KST_LIMITS__PER_SENDER=0 KST_LIMITS__PER_ACCOUNT=0 KST_LIMITS__PER_SOURCE_IP=0 KST_LIMITS__PER_SENDER_QUERY=0 \
        "$KST" serve 2>>"$dir/serve.log" &
      pid=$!; PIDS+=("$pid")
      wait_port "$web"
      endpoints="wkd wkdhash vks"
      if [ -n "$prefilled" ]; then
        rm -f "$WORK/fpr.paths"
        cp "$prefilled"/paths/*.paths "$WORK/"
        endpoints="wkd wkdhash vks fpr"
      elif [ "$limits" = off ]; then
        log "$backend: filling $n addresses through LMTP"
        "$KST" bench lmtp --connect "127.0.0.1:$lmtp" --concurrency 8 --publications "$n" \
          --retrievals 0 --quiet >/dev/null || die "$backend: the fill failed (see $dir/serve.log)"
        paths "$n"
      fi
      for endpoint in $endpoints; do
        before200="$(status_count "$http" 200)"; before404="$(status_count "$http" 404)"; before429="$(status_count "$http" 429)"
        host=""; case "$endpoint" in wkd*) host="example.test" ;; esac
        log "$backend, $n keys, $endpoint, limits $limits: wrk -c$CONNS -d${SECONDS_EACH}s"
        out="$(PATHS="$WORK/$endpoint.paths" HOST_HEADER="$host" XFF="$xff" \
          wrk -t2 -c"$CONNS" -d"${SECONDS_EACH}s" -s "$WORK/lookup.lua" "http://127.0.0.1:$web" | grep '^WRK')"
        read -r _ total dur_us p50 p99 _non2xx <<<"$out"
        ok=$(( $(status_count "$http" 200) - before200 + $(status_count "$http" 404) - before404 ))
        refused=$(( $(status_count "$http" 429) - before429 ))
        rss="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")"
        python3 -c 'import sys
b,n,e,l,ok,ref,tot,dur,p50,p99,rss=sys.argv[1:]
ok,ref,tot,dur=int(ok),int(ref),int(tot),int(dur)
print(f"| {b} | {n} | {e} | {l} | {ok/(dur/1e6):,.0f} | {100*ref/max(tot,1):.1f}% | {int(p50)/1000:.2f} | {int(p99)/1000:.2f} | {int(rss)/1024:.0f} |")' \
          "$backend" "$n" "$endpoint" "$limits" "$ok" "$refused" "$total" "$dur_us" "$p50" "$p99" "$rss"
      done
      kill -TERM "$pid"; wait "$pid" || true
    done
  done
done
echo
echo "Machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -r); wrk -t2 -c$CONNS, ${SECONDS_EACH}s per row; $(date -u +%Y-%m-%d)."
