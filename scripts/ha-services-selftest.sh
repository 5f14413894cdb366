#!/usr/bin/env bash
# Self-test of scripts/ha-services.sh: brings up each topology (pg, sentinel, cluster) in its own
# state directory and on its own ports, checks replication and a failover with plain psql and
# redis-cli, and takes it down again. No kst needed. Exits non-zero when a check fails; ends with
# "N passed, N failed" and the seconds each step took.
#
# Usage (as root): scripts/ha-services-selftest.sh [pg] [sentinel] [cluster]   (none: all three)
# Environment: KST_HA_DIR (/tmp/kst-ha-selftest) and the KST_HA_* ports of ha-services.sh
# (defaults here: pg 25432/25433, sentinel 18379/18380 + 28479-28481, cluster 18001-18006, so
# that topologies running on the usual ports are left alone); KST_HA_SELFTEST_KEEP=1 leaves the
# topologies running at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
HA="$PWD/scripts/ha-services.sh"

export KST_HA_DIR="${KST_HA_DIR:-/tmp/kst-ha-selftest}"
export KST_HA_PG_PORTS="${KST_HA_PG_PORTS:-25432 25433}"
export KST_HA_SENTINEL_REDIS_PORTS="${KST_HA_SENTINEL_REDIS_PORTS:-18379 18380}"
export KST_HA_SENTINEL_PORTS="${KST_HA_SENTINEL_PORTS:-28479 28480 28481}"
export KST_HA_CLUSTER_PORTS="${KST_HA_CLUSTER_PORTS:-18001 18002 18003 18004 18005 18006}"
read -r -a PGP <<<"$KST_HA_PG_PORTS"
read -r -a SRP <<<"$KST_HA_SENTINEL_REDIS_PORTS"
read -r -a SSP <<<"$KST_HA_SENTINEL_PORTS"
read -r -a CLP <<<"$KST_HA_CLUSTER_PORTS"
PG_A="postgres://postgres:postgres@127.0.0.1:${PGP[0]}/postgres"
PG_B="postgres://postgres:postgres@127.0.0.1:${PGP[1]}/postgres"

# say, ok, fail, check, wait_until, summary (and PASSED, FAILED, FAILURES)
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
TIMINGS=()
# timed NAME COMMAND...: a check that also records how long the command took.
timed() {
  local name="$1" t0 t1
  shift
  t0="$(date +%s%N)"
  check "$name" "$@"
  t1="$(date +%s%N)"
  TIMINGS+=("$(printf '%6.1f s  %s' "$(echo "($t1 - $t0) / 1000000000" | bc -l)" "$name")")
}
# same A B: passes when the two strings are equal (shows both otherwise).
same() { [ "$1" = "$2" ] || { echo "got '$1', want '$2'"; return 1; }; }
# exit_is N COMMAND...: passes when the command exits with N.
exit_is() {
  local want="$1" rc=0
  shift
  "$@" >/dev/null 2>&1 || rc=$?
  same "$rc" "$want"
}
sql() { PGCONNECT_TIMEOUT=3 timeout 10 psql "$1" -X -Atqc "$2" 2>&1; }
rc() { local p="$1"; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$p" --raw "$@" 2>&1; }
role() { rc "$1" info replication | tr -d '\r' | sed -n 's/^role://p'; }
ports_closed() { local p; for p in "$@"; do [ -z "$(ss -Hltn "sport = :$p")" ] || { echo "port $p open"; return 1; }; done; }

cleanup() {
  if [ "${KST_HA_SELFTEST_KEEP:-0}" != 1 ]; then
    local t
    for t in pg sentinel cluster; do "$HA" "$t" down >/dev/null 2>&1 || true; done
  fi
}
trap cleanup EXIT

# --- pg ---------------------------------------------------------------------------------------
test_pg() {
  say "pg: primary ${PGP[0]}, synchronous standby ${PGP[1]}"
  "$HA" pg down >/dev/null 2>&1 || true
  timed "pg up from nothing" timeout 180 "$HA" pg up
  check "env names the primary" bash -c "'$HA' pg env | grep -qx 'export KST_HA_PG_PRIMARY_URL=$PG_A'"
  check "status: b streams to a as its synchronous standby" bash -c "'$HA' pg status | grep -q 'kst_ha_b streaming sync'"
  check "a is not in recovery" same "$(sql "$PG_A" 'SELECT pg_is_in_recovery()')" f
  check "b is in recovery" same "$(sql "$PG_B" 'SELECT pg_is_in_recovery()')" t
  check "a waits for b at commit" same "$(sql "$PG_A" 'SHOW synchronous_standby_names')" kst_ha_b
  sql "$PG_A" "CREATE TABLE selftest(v text); INSERT INTO selftest VALUES ('before')" >/dev/null
  check "a write on a is on b when the commit returns" same "$(sql "$PG_B" 'SELECT v FROM selftest')" before
  check "b refuses writes" bash -c "PGCONNECT_TIMEOUT=3 psql '$PG_B' -X -Atqc \"INSERT INTO selftest VALUES ('x')\" 2>&1 | grep -q 'read-only transaction'"
  timed "pg up when up" timeout 60 "$HA" pg up

  timed "promote b (a keeps running)" timeout 60 "$HA" pg promote
  check "b accepts writes" sql "$PG_B" "INSERT INTO selftest VALUES ('on b')"
  check "status warns that both accept writes" bash -c "'$HA' pg status | grep -q 'both nodes accept writes'"
  check "a commit on a now waits (no synchronous standby): psql still waiting after 3 s" \
    exit_is 124 timeout 3 psql "$PG_A" -X -Atqc "SET application_name = 'selftest_wait'; INSERT INTO selftest VALUES ('on a only')"
  check "the waiting backend sits in SyncRep" wait_until 5 bash -c \
    "[ \"\$(PGCONNECT_TIMEOUT=3 psql '$PG_A' -X -Atqc \"SELECT wait_event FROM pg_stat_activity WHERE application_name = 'selftest_wait'\")\" = SyncRep ]"
  sql "$PG_A" "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'selftest_wait'" >/dev/null
  check "cancelled, the commit stays on a (committed locally)" wait_until 5 bash -c \
    "[ \"\$(PGCONNECT_TIMEOUT=3 psql '$PG_A' -X -Atqc \"SELECT count(*) FROM selftest WHERE v = 'on a only'\")\" = 1 ]"
  check "and is not on b" same "$(sql "$PG_B" "SELECT count(*) FROM selftest WHERE v = 'on a only'")" 0
  timed "stop the old primary" "$HA" pg stop-old-primary
  check "status: a stopped (exit 3)" exit_is 3 "$HA" pg status
  check "b still serves" same "$(sql "$PG_B" "SELECT count(*) FROM selftest")" 2

  timed "pg up restores a primary, b standby (re-cloned)" timeout 180 "$HA" pg up
  check "b is in recovery again" same "$(sql "$PG_B" 'SELECT pg_is_in_recovery()')" t
  check "b has a's rows (not its own)" same "$(sql "$PG_B" "SELECT string_agg(v, ',' ORDER BY v) FROM selftest")" "before,on a only"
  check "status exit 0" "$HA" pg status
  timed "pg down" "$HA" pg down
  check "pg state directory gone" test ! -e "$KST_HA_DIR/pg"
  check "pg ports closed" ports_closed "${PGP[@]}"
  check "status after down: exit 3" exit_is 3 "$HA" pg status
}

# --- sentinel ---------------------------------------------------------------------------------
master_now() { rc "${SSP[0]}" sentinel get-master-addr-by-name kst-ha | paste -sd: -; }

test_sentinel() {
  say "sentinel: redis ${SRP[*]}, sentinels ${SSP[*]}"
  "$HA" sentinel down >/dev/null 2>&1 || true
  timed "sentinel up from nothing" timeout 120 "$HA" sentinel up
  check "all three sentinels name ${SRP[0]}" bash -c "'$HA' sentinel status | grep -c 'master kst-ha = 127.0.0.1:${SRP[0]} (flags master, replicas 1, other sentinels 2)' | grep -qx 3"
  local p
  for p in "${SRP[@]}"; do
    check "$p: appendonly yes" same "$(rc "$p" config get appendonly | tail -1)" yes
    check "$p: appendfsync always" same "$(rc "$p" config get appendfsync | tail -1)" always
  done
  rc "${SRP[0]}" set selftest:1 before >/dev/null
  check "WAIT 1: the replica acknowledged" same "$(rc "${SRP[0]}" wait 1 2000)" 1
  check "a write on the primary is on the replica" same "$(rc "${SRP[1]}" get selftest:1)" before
  check "the replica refuses writes" bash -c "redis-cli -p ${SRP[1]} set x y | grep -q READONLY"
  timed "sentinel up when up" timeout 60 "$HA" sentinel up

  timed "kill the primary, until all sentinels name the replica" timeout 120 "$HA" sentinel kill-primary
  check "the sentinels name ${SRP[1]}" same "$(master_now)" "127.0.0.1:${SRP[1]}"
  check "${SRP[1]} says role master" same "$(role "${SRP[1]}")" master
  check "the new primary accepts writes" same "$(rc "${SRP[1]}" set selftest:2 after)" OK
  check "and kept the earlier write" same "$(rc "${SRP[1]}" get selftest:1)" before
  check "status: one data node stopped (exit 3)" exit_is 3 "$HA" sentinel status

  timed "sentinel up brings the old primary back as a replica" timeout 120 "$HA" sentinel up
  check "${SRP[0]} says role slave" same "$(role "${SRP[0]}")" slave
  check "it has the write made after the failover" wait_until 10 bash -c "[ \"\$(redis-cli -p ${SRP[0]} get selftest:2)\" = after ]"
  check "the sentinels still name ${SRP[1]}" same "$(master_now)" "127.0.0.1:${SRP[1]}"
  timed "sentinel down" "$HA" sentinel down
  check "sentinel state directory gone" test ! -e "$KST_HA_DIR/sentinel"
  check "sentinel ports closed" ports_closed "${SRP[@]}" "${SSP[@]}"
}

# --- cluster ----------------------------------------------------------------------------------
cluster_ok_everywhere() {
  local p
  for p in "$@"; do rc "$p" cluster info | tr -d '\r' | grep -qx 'cluster_state:ok' || { echo "$p: not ok"; return 1; }; done
}
# The port serving slot $2 as a master, as node $1 sees it.
slot_owner() { rc "$1" cluster nodes | awk -v s="$2" '$3 ~ /master/ && $3 !~ /fail/ { for (i = 9; i <= NF; i++) { n = split($i, r, "-"); if (s + 0 >= r[1] + 0 && s + 0 <= (n == 2 ? r[2] : r[1]) + 0) { split($2, a, "[:@]"); print a[2] } } }'; }

test_cluster() {
  say "cluster: ${CLP[*]}"
  "$HA" cluster down >/dev/null 2>&1 || true
  timed "cluster up from nothing" timeout 120 "$HA" cluster up
  check "cluster_state ok on all six" cluster_ok_everywhere "${CLP[@]}"
  check "three masters, three slaves" same "$(rc "${CLP[0]}" cluster nodes | awk '{ sub(/^myself,/, "", $3); print $3 }' | sort | uniq -c | awk '{ print $2 "=" $1 }' | paste -sd, -)" "master=3,slave=3"
  check "appendfsync always" same "$(rc "${CLP[3]}" config get appendfsync | tail -1)" always
  local i
  for i in 0 1 2 3 4 5 6 7 8; do rc "${CLP[0]}" -c set "{selftest$i}k" "v$i" >/dev/null; done
  check "writes through redis-cli -c to nine hash tags" same "$(for i in 0 1 2 3 4 5 6 7 8; do rc "${CLP[1]}" -c get "{selftest$i}k"; done | paste -sd, -)" "v0,v1,v2,v3,v4,v5,v6,v7,v8"
  local slot owner replica
  slot="$(rc "${CLP[0]}" cluster keyslot '{selftest0}k')"
  owner="$(slot_owner "${CLP[0]}" "$slot")"
  replica="$(rc "${CLP[0]}" cluster nodes | awk -v id="$(rc "$owner" cluster myid)" '$4 == id { split($2, a, "[:@]"); print a[2] }')"
  check "the slot's replica ($replica) has the key (READONLY + GET)" same "$(printf 'READONLY\nGET {selftest0}k\n' | redis-cli -p "$replica" | tail -1)" v0
  timed "cluster up when up" timeout 60 "$HA" cluster up

  local n first killed
  n="$(rc "${CLP[0]}" cluster nodes | awk '$3 ~ /master/ && NF >= 9 { split($9, r, "-"); split($2, a, "[:@]"); print r[1], a[2] }' | sort -n | awk '$2 == "'"$owner"'" { print NR }')"
  first="$(rc "${CLP[0]}" cluster nodes | awk '$3 ~ /master/ && NF >= 9 { split($9, r, "-"); print r[1] }' | sort -n | sed -n "${n}p")"
  killed="$owner"
  timed "kill primary $n ($killed), until its replica owns its slots" timeout 120 "$HA" cluster kill-primary "$n"
  local live=()
  for i in "${CLP[@]}"; do [ "$i" = "$killed" ] || live+=("$i"); done
  check "cluster_state ok on the five live nodes" cluster_ok_everywhere "${live[@]}"
  check "slot $first is served by the former replica $replica" same "$(slot_owner "${live[0]}" "$first")" "$replica"
  for i in 0 1 2 3 4 5 6 7 8; do rc "${live[0]}" -c set "{selftest$i}k" "w$i" >/dev/null; done
  check "writes to all nine hash tags work after the failover" same "$(for i in 0 1 2 3 4 5 6 7 8; do rc "${live[1]}" -c get "{selftest$i}k"; done | paste -sd, -)" "w0,w1,w2,w3,w4,w5,w6,w7,w8"
  check "status: one node stopped (exit 3)" exit_is 3 "$HA" cluster status

  timed "cluster up brings the killed node back" timeout 120 "$HA" cluster up
  check "$killed rejoined as a replica" same "$(role "$killed")" slave
  check "cluster_state ok on all six again" cluster_ok_everywhere "${CLP[@]}"
  timed "cluster down" "$HA" cluster down
  check "cluster state directory gone" test ! -e "$KST_HA_DIR/cluster"
  check "cluster ports closed" ports_closed "${CLP[@]}"
}

topologies=("$@")
[ ${#topologies[@]} -gt 0 ] || topologies=(pg sentinel cluster)
for t in "${topologies[@]}"; do
  case "$t" in
    pg) test_pg ;;
    sentinel) test_sentinel ;;
    cluster) test_cluster ;;
    *) echo "unknown topology '$t' (pg, sentinel, cluster)" >&2; exit 64 ;;
  esac
done

# --- summary ------------------------------------------------------------------------------------
echo
echo "timings:"
printf '  %s\n' "${TIMINGS[@]}"
summary
