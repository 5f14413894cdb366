#!/usr/bin/env bash
# Replicated stores on 127.0.0.1 for kst's failover drills (issue 16), next to (never touching)
# the main services of scripts/services.sh (5432, 6379) and the mail test system (2xxx, 3xxx,
# 5353/5354). Runs as root on Debian 12, installs the Debian packages where missing, starts the
# daemons directly (no systemd); each topology lives in its own state directory, which `down`
# removes.
#
# Topologies:
#   pg        PostgreSQL: node a primary on 15432, node b a synchronous streaming standby on 15433
#             (pg_basebackup -R; synchronous_standby_names = 'kst_ha_b' on a, so a commit on a
#             returns only once b has flushed it). Own data directories, started with pg_ctl as
#             user postgres; the main cluster is not touched.
#   sentinel  Redis: primary 16379, one replica 16380, three sentinels 26479-26481 watching master
#             "kst-ha" with quorum 2; data nodes run appendonly yes + appendfsync always.
#   cluster   Redis Cluster: six nodes 17001-17006 (bus ports +10000), three primaries with one
#             replica each (redis-cli --cluster create --cluster-replicas 1), AOF always.
#
# Usage: scripts/ha-services.sh TOPOLOGY up        start (or complete) it, wait until replication
#                                                  is in place, print the env (stdout)
#        scripts/ha-services.sh TOPOLOGY down      stop it, remove its state directory
#        scripts/ha-services.sh TOPOLOGY status    who is primary, who replicates (exit 3: not all up)
#        scripts/ha-services.sh TOPOLOGY env       print the env of a running topology
#   pg only:
#        scripts/ha-services.sh pg promote         pg_ctl promote the standby b while a keeps
#                                                  running (a's commits then wait forever for b)
#        scripts/ha-services.sh pg stop-old-primary  pg_ctl stop -m fast node a
#   sentinel only:
#        scripts/ha-services.sh sentinel kill-primary [--no-wait]
#                                                  SIGKILL the master Sentinel reports; waits until
#                                                  the sentinels report a new one that says
#                                                  role:master and prints the seconds it took
#   cluster only:
#        scripts/ha-services.sh cluster kill-primary N [--no-wait]
#                                                  SIGKILL the Nth primary (1-3, ordered by its
#                                                  first slot); waits until its replica owns the
#                                                  slots and cluster_state is ok everywhere
#
# `up` is idempotent: when everything runs it changes nothing. It also repairs: it restarts stopped
# or killed nodes (a killed Redis node rejoins as a replica), and for pg it restores the initial
# roles (a primary; b, if it was promoted, is re-cloned from a: writes made on b after the promote
# are dropped). `down` then `up` gives a fresh topology.
#
# The env lines (export KST_HA_...=...) go to stdout; progress goes to stderr, so
#   eval "$(scripts/ha-services.sh sentinel up)"
# works. Self-test (own directory and ports): scripts/ha-services-selftest.sh. Timings measured on
# the 2-core CI machine, and what the clients do in a failover: docs/HA-NOTES.md.
#
# Environment:
#   KST_HA_DIR                      state directory (/tmp/kst-ha): pg/, sentinel/, cluster/
#   KST_HA_PG_PORTS                 ports of nodes a and b ("15432 15433")
#   KST_HA_SENTINEL_REDIS_PORTS     primary and replica ("16379 16380")
#   KST_HA_SENTINEL_PORTS           the three sentinels ("26479 26480 26481")
#   KST_HA_SENTINEL_MASTER          master name (kst-ha)
#   KST_HA_SENTINEL_DOWN_AFTER_MS   sentinel down-after-milliseconds (2000; Redis' default 30000)
#   KST_HA_SENTINEL_FAILOVER_TIMEOUT_MS  sentinel failover-timeout (3000; default 180000)
#   KST_HA_CLUSTER_PORTS            the six cluster nodes ("17001 17002 17003 17004 17005 17006")
#   KST_HA_CLUSTER_NODE_TIMEOUT_MS  cluster-node-timeout (1000; default 15000)
#   KST_HA_TIMEOUT                  seconds to wait for each step (60)
set -euo pipefail

BASE="${KST_HA_DIR:-/tmp/kst-ha}"
BASE="${BASE%/}"
read -r -a PG_PORTS <<<"${KST_HA_PG_PORTS:-15432 15433}"
read -r -a SR_PORTS <<<"${KST_HA_SENTINEL_REDIS_PORTS:-16379 16380}"
read -r -a SS_PORTS <<<"${KST_HA_SENTINEL_PORTS:-26479 26480 26481}"
MASTER_NAME="${KST_HA_SENTINEL_MASTER:-kst-ha}"
DOWN_AFTER_MS="${KST_HA_SENTINEL_DOWN_AFTER_MS:-2000}"
FAILOVER_TIMEOUT_MS="${KST_HA_SENTINEL_FAILOVER_TIMEOUT_MS:-3000}"
read -r -a CL_PORTS <<<"${KST_HA_CLUSTER_PORTS:-17001 17002 17003 17004 17005 17006}"
NODE_TIMEOUT_MS="${KST_HA_CLUSTER_NODE_TIMEOUT_MS:-1000}"
TIMEOUT="${KST_HA_TIMEOUT:-60}"

TOPO=""
STATE=""

LOG_NAME=ha-services # and the topology, once known
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check_settings() {
  [ "$(id -u)" -eq 0 ] || die "run as root (installs packages, runs PostgreSQL as user postgres)"
  case "$BASE" in /*) ;; *) die "KST_HA_DIR must be an absolute path: $BASE" ;; esac
  [[ "$BASE" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "KST_HA_DIR may hold only letters, digits and ._-/: $BASE"
  # PostgreSQL's socket ($STATE/run/.s.PGSQL.NNNNN) must stay under 108 bytes.
  [ "${#BASE}" -le 70 ] || die "KST_HA_DIR is too long for Unix socket paths (at most 70 characters): $BASE"
  [ ${#PG_PORTS[@]} -eq 2 ] || die "KST_HA_PG_PORTS must name two ports, not '${PG_PORTS[*]}'"
  [ ${#SR_PORTS[@]} -eq 2 ] || die "KST_HA_SENTINEL_REDIS_PORTS must name two ports, not '${SR_PORTS[*]}'"
  [ ${#SS_PORTS[@]} -eq 3 ] || die "KST_HA_SENTINEL_PORTS must name three ports, not '${SS_PORTS[*]}'"
  [ ${#CL_PORTS[@]} -eq 6 ] || die "KST_HA_CLUSTER_PORTS must name six ports, not '${CL_PORTS[*]}'"
  local p
  for p in "${PG_PORTS[@]}" "${SR_PORTS[@]}" "${SS_PORTS[@]}" "${CL_PORTS[@]}" "$DOWN_AFTER_MS" \
    "$FAILOVER_TIMEOUT_MS" "$NODE_TIMEOUT_MS" "$TIMEOUT"; do
    [[ "$p" =~ ^[0-9]+$ ]] || die "not a number: '$p'"
  done
  for p in "${CL_PORTS[@]}"; do
    [ "$p" -le 55535 ] || die "cluster port $p: its bus port ($p + 10000) would exceed 65535"
  done
  [[ "$MASTER_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "KST_HA_SENTINEL_MASTER may hold only letters, digits and ._-"
}

# One command per topology at a time; the lock file lives beside the state directories.
take_lock() {
  mkdir -p "$BASE"
  chmod 0755 "$BASE"
  exec 9>"$BASE/.lock-$TOPO"
  flock -w 300 9 || die "another ha-services.sh $TOPO did not finish within 300s"
}

# --- process helpers --------------------------------------------------------------------------

port_free() {
  if tcp_listening "$1"; then
    die "port $1 is already taken by $(port_owner "$1" || echo something) (choose others with KST_HA_*_PORTS)"
  fi
}

# Monotonic milliseconds, for the settle times the failover helpers print.
now_ms() { local t; t="$(cat /proc/uptime)"; t="${t%% *}"; echo $((${t%.*} * 1000 + 10#${t#*.} * 10)); }
secs_since() { local d=$(($(now_ms) - $1)); printf '%d.%02d' $((d / 1000)) $((d % 1000 / 10)); }

# Removes this topology's state directory, refusing any directory this script did not make.
remove_state() {
  [ -e "$STATE" ] || return 0
  [ -e "$STATE/.kst-ha" ] || die "$STATE was not made by this script (no $STATE/.kst-ha); not removing it"
  rm -rf "$STATE"
}
new_state() {
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  touch "$STATE/.kst-ha"
}

# --- PostgreSQL: pg ---------------------------------------------------------------------------

PG_BIN=""
pg_find_bin() {
  local ver
  ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -1)"
  if [ -z "$ver" ] || [ ! -x "/usr/lib/postgresql/$ver/bin/postgres" ] || ! command -v psql >/dev/null; then
    # Debian's postinst creates (and with policy-rc.d does not start) the main cluster on 5432;
    # scripts/services.sh owns that one.
    apt_install postgresql
    ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1)"
  fi
  PG_BIN="/usr/lib/postgresql/$ver/bin"
  [ -x "$PG_BIN/pg_basebackup" ] || die "no $PG_BIN/pg_basebackup"
}

pg_node_port() { case "$1" in a) echo "${PG_PORTS[0]}" ;; b) echo "${PG_PORTS[1]}" ;; esac; }
pg_dir() { echo "$STATE/$1"; }
# As user postgres, from / (postgres may not enter the caller's working directory).
as_pg() { (cd / && runuser -u postgres -- "$@"); }
pg_running() { [ -f "$(pg_dir "$1")/PG_VERSION" ] && pid_alive "$(pidfile_pid "$(pg_dir "$1")/postmaster.pid")"; }
# psql on node $1 (a or b); the rest are psql arguments.
pg_psql() {
  local port
  port="$(pg_node_port "$1")"
  shift
  PGCONNECT_TIMEOUT=3 timeout 10 psql "postgres://postgres:postgres@127.0.0.1:$port/postgres" -X -Atq "$@"
}
pg_in_recovery() { pg_psql "$1" -c 'SELECT pg_is_in_recovery()' 2>/dev/null; }
# Forces a transaction ID: fails unless the node accepts writes (and, on a, unless b confirms).
pg_writable() { [ -n "$(pg_psql "$1" -c 'SELECT pg_current_xact_id()' 2>/dev/null)" ]; }

# The settings of one node; included from its postgresql.conf.
pg_node_conf() {
  local node="$1" sync="''"
  [ "$node" = a ] && sync="'kst_ha_b'"
  cat <<EOF
# Written by scripts/ha-services.sh: node $node of the pg topology.
listen_addresses = '127.0.0.1'
port = $(pg_node_port "$node")
unix_socket_directories = '$STATE/run'
cluster_name = 'kst_ha_$node'
# The walreceiver's application_name is cluster_name: b connects to a as kst_ha_b. Node b (once
# promoted) has no standby to wait for.
synchronous_standby_names = $sync
synchronous_commit = on
wal_level = replica
max_wal_senders = 5
wal_keep_size = '256MB'
hot_standby = on
max_connections = 200
EOF
}

pg_write_node_conf() {
  local node="$1" dir
  dir="$(pg_dir "$node")"
  pg_node_conf "$node" >"$dir/kst-ha.conf"
  chown postgres:postgres "$dir/kst-ha.conf"
  grep -qx "include 'kst-ha.conf'" "$dir/postgresql.conf" || echo "include 'kst-ha.conf'" >>"$dir/postgresql.conf"
}

pg_start() {
  local node="$1" dir port
  dir="$(pg_dir "$node")"
  port="$(pg_node_port "$node")"
  port_free "$port"
  log "starting node $node on 127.0.0.1:$port"
  rm -f "$dir/postmaster.pid" # stale: its process is gone
  # The server must not inherit any descriptor above 2: a caller's `flock FILE ha-services.sh`
  # passes its lock on fd 3, and a postmaster keeping it would hold that lock while it runs.
  eval "as_pg \"\$PG_BIN/pg_ctl\" -D \"\$dir\" -l \"\$STATE/\$node.log\" -w -t \"\$TIMEOUT\" start \
    </dev/null >/dev/null $(pg_inherited_fds)" \
    || { tail -20 "$STATE/$node.log" >&2; die "node $node did not start"; }
}

# "N<&-" for every descriptor above 2 this shell has open (for pg_start).
pg_inherited_fds() {
  local fd
  for fd in /proc/$$/fd/*; do
    fd="${fd##*/}"
    if [[ "$fd" =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then printf ' %s<&-' "$fd"; fi
  done
}

pg_stop() {
  local node="$1" mode="${2:-fast}"
  pg_running "$node" || return 0
  log "stopping node $node (-m $mode)"
  as_pg "$PG_BIN/pg_ctl" -D "$(pg_dir "$node")" -m "$mode" -w -t "$TIMEOUT" stop >/dev/null \
    || die "node $node did not stop"
}

pg_sync_standby_attached() {
  [ "$(pg_psql a -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'kst_ha_b' AND state = 'streaming'")" = sync ]
}

pg_up() {
  local a b
  a="$(pg_dir a)"
  b="$(pg_dir b)"
  pg_find_bin
  if [ ! -f "$a/PG_VERSION" ]; then
    pg_stop b immediate 2>/dev/null || true
    remove_state
    new_state
    mkdir -p "$STATE/run"
    chown postgres:postgres "$STATE" "$STATE/run"
    log "initdb node a"
    as_pg "$PG_BIN/initdb" -D "$a" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync >"$STATE/initdb.log" 2>&1 \
      || { tail -20 "$STATE/initdb.log" >&2; die "initdb failed"; }
    pg_write_node_conf a
  fi
  # initdb and pg_basebackup run with --no-sync (a fresh test cluster: a crash before the OS
  # writes it back loses nothing anyone relies on); the servers themselves run with fsync on.
  [ "$(pg_node_conf a)" = "$(cat "$a/kst-ha.conf")" ] \
    || die "node a's settings differ from this run's (ports or directory changed): run '$0 pg down' first"
  if pg_running a; then log "node a: running"; else pg_start a; fi
  [ "$(pg_in_recovery a)" = f ] || die "node a is in recovery; run '$0 pg down' and up again"

  if [ -f "$b/PG_VERSION" ] && [ ! -f "$b/standby.signal" ]; then
    log "node b was promoted: re-cloning it from a (its own writes are dropped)"
    pg_stop b immediate
    rm -rf "$b"
  fi
  if [ ! -f "$b/PG_VERSION" ]; then
    rm -rf "$b"
    log "pg_basebackup node b from a"
    as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "${PG_PORTS[0]}" -U postgres -D "$b" -X stream -R -c fast --no-sync \
      >"$STATE/basebackup.log" 2>&1 || { tail -20 "$STATE/basebackup.log" >&2; die "pg_basebackup failed"; }
    pg_write_node_conf b
  fi
  if pg_running b; then log "node b: running"; else pg_start b; fi
  wait_for "node b streaming to a as its synchronous standby" pg_sync_standby_attached
  wait_for "node a accepting writes" pg_writable a
  log "up: a primary on 127.0.0.1:${PG_PORTS[0]}, b synchronous standby on 127.0.0.1:${PG_PORTS[1]}"
}

pg_down() {
  if [ -d "$STATE" ]; then
    pg_find_bin
    # Everything is removed next: no shutdown checkpoints needed.
    pg_stop b immediate
    pg_stop a immediate
  fi
  remove_state
  log "down: stopped, $STATE removed"
}

pg_status() {
  local ok=0 node port rec rows
  echo "state directory: $STATE$([ -e "$STATE/.kst-ha" ] || echo ' (absent)')"
  for node in a b; do
    port="$(pg_node_port "$node")"
    if ! pg_running "$node"; then
      echo "node $node 127.0.0.1:$port: stopped"
      ok=3
      continue
    fi
    rec="$(pg_in_recovery "$node" || true)"
    case "$rec" in
      t) echo "node $node 127.0.0.1:$port: running, in recovery (standby)" ;;
      f) echo "node $node 127.0.0.1:$port: running, not in recovery (accepts writes)," \
        "synchronous_standby_names='$(pg_psql "$node" -c 'SHOW synchronous_standby_names')'" ;;
      *) echo "node $node 127.0.0.1:$port: running, not answering"; ok=3 ;;
    esac
    if [ "$rec" = f ]; then
      rows="$(pg_psql "$node" -F ' ' -c 'SELECT application_name, state, sync_state FROM pg_stat_replication' || true)"
      if [ -n "$rows" ]; then
        while read -r app st sync; do echo "  replication: $app $st $sync"; done <<<"$rows"
      else
        echo "  replication: no standby connected"
      fi
    fi
  done
  [ "$(pg_in_recovery a 2>/dev/null)" = f ] && [ "$(pg_in_recovery b 2>/dev/null)" = f ] \
    && echo "WARNING: both nodes accept writes (b was promoted, a still runs)"
  return "$ok"
}

pg_env() {
  cat <<EOF
export KST_HA_PG_PRIMARY_URL=postgres://postgres:postgres@127.0.0.1:${PG_PORTS[0]}/postgres
export KST_HA_PG_STANDBY_URL=postgres://postgres:postgres@127.0.0.1:${PG_PORTS[1]}/postgres
export KST_HA_PG_MULTIHOST_URL=postgres://postgres:postgres@127.0.0.1:${PG_PORTS[0]},127.0.0.1:${PG_PORTS[1]}/postgres
export KST_HA_PG_DIR=$STATE
EOF
}

pg_promote() {
  pg_find_bin
  pg_running b || die "node b is not running (run '$0 pg up')"
  [ "$(pg_in_recovery b)" = t ] || die "node b is not a standby (already promoted?)"
  local t0
  t0="$(now_ms)"
  log "promoting node b (node a keeps running)"
  as_pg "$PG_BIN/pg_ctl" -D "$(pg_dir b)" -w -t "$TIMEOUT" promote >/dev/null || die "pg_ctl promote failed"
  wait_for "node b accepting writes" pg_writable b
  log "node b accepts writes $(secs_since "$t0")s after pg_ctl promote"
}

pg_stop_old_primary() {
  pg_find_bin
  pg_running a || { log "node a: not running"; return 0; }
  pg_stop a fast
}

# --- Redis helpers ----------------------------------------------------------------------------

ensure_redis_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  if [ "$TOPO" = sentinel ]; then command -v redis-sentinel >/dev/null || missing+=(redis-sentinel); fi
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

rcli() { local port="$1"; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$port" --raw "$@"; }
redis_pid() { pidfile_pid "$STATE/$1/redis.pid"; }
redis_running() { pid_alive "$(redis_pid "$1")"; }
redis_answers() { [ "$(rcli "$1" ping 2>/dev/null)" = PONG ]; }
# info_field PORT SECTION FIELD
info_field() { rcli "$1" info "$2" 2>/dev/null | tr -d '\r' | sed -n "s/^$3://p"; }

# redis_start DIR PORT CONF [ARG...]: starts redis-server (or redis-sentinel) from
# $STATE/DIR/CONF, with further settings ARG... (--replicaof HOST PORT) on its command line.
redis_start() {
  local dir="$1" port="$2" conf="$3" bin=redis-server
  shift 3
  [ "$conf" = sentinel.conf ] && bin=redis-sentinel
  port_free "$port"
  rm -f "$STATE/$dir/redis.pid"
  log "starting $dir on 127.0.0.1:$port"
  # The daemon must not inherit a lock a caller holds (`flock FILE scripts/ha-services.sh ...`
  # passes its lock as fd 3, and a daemon keeping it would hold the lock forever): every fd
  # above 2 is closed first.
  (cd "$STATE/$dir" && close_inherited_fds && exec "$bin" "$STATE/$dir/$conf" "$@" </dev/null >>"$STATE/daemons.log" 2>&1) \
    || { tail -20 "$STATE/$dir.log" >&2; die "$bin $dir failed to start"; }
  wait_for "$dir on 127.0.0.1:$port" redis_answers "$port"
}

# The data-node settings shared by both Redis topologies.
redis_data_conf() {
  local dir="$1" port="$2"
  cat <<EOF
# Written by scripts/ha-services.sh ($TOPO topology); Redis rewrites parts of it (CONFIG REWRITE).
port $port
bind 127.0.0.1
daemonize yes
pidfile $STATE/$dir/redis.pid
logfile $STATE/$dir.log
dir $STATE/$dir
save ""
appendonly yes
appendfsync always
# A replica (re)joining gets its full sync at once, not after the default 5 s of waiting for
# others to batch with.
repl-diskless-sync-delay 0
EOF
}

# --- Redis Sentinel: sentinel -----------------------------------------------------------------

sentinel_master_addr() { rcli "$1" sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | paste -sd: -; }
# A field of SENTINEL MASTER as sentinel $1 sees it.
sentinel_master_field() {
  rcli "$1" sentinel master "$MASTER_NAME" 2>/dev/null | awk -v f="$2" 'NR % 2 == 1 { k = $0 } NR % 2 == 0 && k == f { print; exit }'
}

# Everything settled: all sentinels agree on a master that says role:master, has its replica
# online, and each sentinel knows the replica and the two other sentinels.
sentinel_settled() {
  local s addr first="" port
  for s in "${SS_PORTS[@]}"; do
    addr="$(sentinel_master_addr "$s")"
    [ -n "$addr" ] || return 1
    [ -z "$first" ] || [ "$addr" = "$first" ] || return 1
    first="$addr"
    [ "$(sentinel_master_field "$s" flags)" = master ] || return 1
    [ "$(sentinel_master_field "$s" num-slaves)" = 1 ] || return 1
    [ "$(sentinel_master_field "$s" num-other-sentinels)" = 2 ] || return 1
  done
  port="${first##*:}"
  [ "$(info_field "$port" replication role)" = master ] || return 1
  [ "$(info_field "$port" replication connected_slaves)" = 1 ] || return 1
  for s in "${SR_PORTS[@]}"; do
    [ "$s" = "$port" ] && continue
    [ "$(info_field "$s" replication master_link_status)" = up ] || return 1
  done
}

sentinel_up() {
  ensure_redis_packages
  if [ ! -e "$STATE/.kst-ha" ]; then
    new_state
    local i
    for i in 0 1; do
      mkdir -p "$STATE/redis-${SR_PORTS[$i]}"
      {
        redis_data_conf "redis-${SR_PORTS[$i]}" "${SR_PORTS[$i]}"
        [ "$i" -eq 0 ] || echo "replicaof 127.0.0.1 ${SR_PORTS[0]}"
      } >"$STATE/redis-${SR_PORTS[$i]}/redis.conf"
    done
    for i in 0 1 2; do
      mkdir -p "$STATE/sentinel-${SS_PORTS[$i]}"
      cat >"$STATE/sentinel-${SS_PORTS[$i]}/sentinel.conf" <<EOF
# Written by scripts/ha-services.sh; Sentinel rewrites it with what it learns.
port ${SS_PORTS[$i]}
bind 127.0.0.1
daemonize yes
pidfile $STATE/sentinel-${SS_PORTS[$i]}/redis.pid
logfile $STATE/sentinel-${SS_PORTS[$i]}.log
dir $STATE/sentinel-${SS_PORTS[$i]}
sentinel monitor $MASTER_NAME 127.0.0.1 ${SR_PORTS[0]} 2
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $MASTER_NAME 1
EOF
    done
  fi
  # A node restarted after a kill-primary starts as a replica of the master the sentinels chose.
  # (Left to itself it comes back as a master, and Sentinel waits 8 s or more before turning it
  # into a replica.)
  local p current=""
  for p in "${SS_PORTS[@]}"; do
    if redis_running "sentinel-$p"; then current="$(sentinel_master_addr "$p")"; [ -z "$current" ] || break; fi
  done
  for p in "${SR_PORTS[@]}"; do
    if redis_running "redis-$p"; then
      log "redis-$p: running"
    elif [ -n "$current" ] && [ "$current" != "127.0.0.1:$p" ] && redis_answers "${current##*:}"; then
      redis_start "redis-$p" "$p" redis.conf --replicaof 127.0.0.1 "${current##*:}"
    else
      redis_start "redis-$p" "$p" redis.conf
    fi
  done
  for p in "${SS_PORTS[@]}"; do
    if redis_running "sentinel-$p"; then log "sentinel-$p: running"; else redis_start "sentinel-$p" "$p" sentinel.conf; fi
  done
  wait_for "sentinels agreeing on a master with its replica online" sentinel_settled
  log "up: master $MASTER_NAME at $(sentinel_master_addr "${SS_PORTS[0]}"), sentinels ${SS_PORTS[*]}"
}

sentinel_down() {
  local p
  for p in "${SS_PORTS[@]}"; do stop_pid "sentinel-$p" "$(redis_pid "sentinel-$p")"; done
  for p in "${SR_PORTS[@]}"; do stop_pid "redis-$p" "$(redis_pid "redis-$p")"; done
  remove_state
  log "down: stopped, $STATE removed"
}

sentinel_status() {
  local ok=0 p
  echo "state directory: $STATE$([ -e "$STATE/.kst-ha" ] || echo ' (absent)')"
  for p in "${SR_PORTS[@]}"; do
    if redis_running "redis-$p" && redis_answers "$p"; then
      echo "redis 127.0.0.1:$p: running, role $(info_field "$p" replication role)," \
        "aof $(rcli "$p" config get appendonly | tail -1)/$(rcli "$p" config get appendfsync | tail -1)," \
        "offset $(info_field "$p" replication master_repl_offset)"
    else
      echo "redis 127.0.0.1:$p: stopped"
      ok=3
    fi
  done
  for p in "${SS_PORTS[@]}"; do
    if redis_running "sentinel-$p" && redis_answers "$p"; then
      echo "sentinel 127.0.0.1:$p: master $MASTER_NAME = $(sentinel_master_addr "$p")" \
        "(flags $(sentinel_master_field "$p" flags), replicas $(sentinel_master_field "$p" num-slaves)," \
        "other sentinels $(sentinel_master_field "$p" num-other-sentinels))"
    else
      echo "sentinel 127.0.0.1:$p: stopped"
      ok=3
    fi
  done
  return "$ok"
}

sentinel_env() {
  local addrs=() p
  for p in "${SS_PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
  cat <<EOF
export KST_HA_SENTINEL_ADDRS=$(IFS=,; echo "${addrs[*]}")
export KST_HA_SENTINEL_MASTER=$MASTER_NAME
export KST_HA_SENTINEL_REDIS_ADDRS=127.0.0.1:${SR_PORTS[0]},127.0.0.1:${SR_PORTS[1]}
export KST_HA_SENTINEL_DIR=$STATE
EOF
}

# A sentinel's master differs from $1 and that node says role:master.
sentinel_moved_from() {
  local addr
  addr="$(sentinel_master_addr "$2")"
  [ -n "$addr" ] && [ "$addr" != "$1" ] && [ "$(info_field "${addr##*:}" replication role)" = master ]
}

sentinel_kill_primary() {
  local wait=1 old port pid t0
  [ "${1:-}" = --no-wait ] && wait=0
  old="$(sentinel_master_addr "${SS_PORTS[0]}")"
  [ -n "$old" ] || die "sentinel ${SS_PORTS[0]} reports no master (run '$0 sentinel up')"
  port="${old##*:}"
  pid="$(redis_pid "redis-$port")"
  pid_alive "$pid" || die "the master $old is not running"
  t0="$(now_ms)"
  kill -9 "$pid"
  log "killed the master $old (pid $pid, SIGKILL)"
  [ "$wait" -eq 1 ] || return 0
  local s
  for s in "${SS_PORTS[@]}"; do wait_for "sentinel $s electing a new master" sentinel_moved_from "$old" "$s"; done
  log "new master $(sentinel_master_addr "${SS_PORTS[0]}") (all sentinels agree, role:master) $(secs_since "$t0")s after the kill"
}

# --- Redis Cluster: cluster -------------------------------------------------------------------

cluster_nodes() { rcli "$1" cluster nodes 2>/dev/null | tr -d '\r'; }
cluster_state_ok() { [ "$(rcli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n 's/^cluster_state://p')" = ok ]; }

# Complete: every running node says cluster_state:ok; three masters own slots; three replicas
# are attached to them and synced.
cluster_settled() {
  local p view
  for p in "${CL_PORTS[@]}"; do cluster_state_ok "$p" || return 1; done
  view="$(cluster_nodes "${CL_PORTS[0]}")"
  [ "$(awk '$3 ~ /master/ && $3 !~ /fail/ && NF >= 9' <<<"$view" | wc -l)" -eq 3 ] || return 1
  [ "$(awk '$3 ~ /slave/ && $3 !~ /fail/ && $8 == "connected"' <<<"$view" | wc -l)" -eq 3 ] || return 1
  for p in "${CL_PORTS[@]}"; do
    if [ "$(info_field "$p" replication role)" = slave ]; then
      [ "$(info_field "$p" replication master_link_status)" = up ] || return 1
    fi
  done
}

cluster_fresh() {
  local p
  for p in "${CL_PORTS[@]}"; do
    [ "$(rcli "$p" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')" = 1 ] || return 1
  done
}

cluster_up() {
  ensure_redis_packages
  if [ ! -e "$STATE/.kst-ha" ]; then
    new_state
    local p
    for p in "${CL_PORTS[@]}"; do
      mkdir -p "$STATE/redis-$p"
      {
        redis_data_conf "redis-$p" "$p"
        cat <<EOF
cluster-enabled yes
cluster-config-file $STATE/redis-$p/nodes.conf
cluster-node-timeout $NODE_TIMEOUT_MS
EOF
      } >"$STATE/redis-$p/redis.conf"
    done
  fi
  local p nodes=()
  for p in "${CL_PORTS[@]}"; do
    if redis_running "redis-$p"; then log "redis-$p: running"; else redis_start "redis-$p" "$p" redis.conf; fi
    nodes+=("127.0.0.1:$p")
  done
  if cluster_fresh; then
    log "redis-cli --cluster create (3 primaries, 1 replica each)"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$STATE/create.log" 2>&1 \
      || { tail -20 "$STATE/create.log" >&2; die "redis-cli --cluster create failed"; }
  fi
  wait_for "cluster_state ok on all nodes, 3 primaries with a synced replica each" cluster_settled
  log "up: cluster on 127.0.0.1:${CL_PORTS[0]}-${CL_PORTS[5]}"
}

cluster_down() {
  local p
  for p in "${CL_PORTS[@]}"; do stop_pid "redis-$p" "$(redis_pid "redis-$p")"; done
  remove_state
  log "down: stopped, $STATE removed"
}

cluster_status() {
  local ok=0 p
  echo "state directory: $STATE$([ -e "$STATE/.kst-ha" ] || echo ' (absent)')"
  for p in "${CL_PORTS[@]}"; do
    if redis_running "redis-$p" && redis_answers "$p"; then
      echo "redis 127.0.0.1:$p: running, $(rcli "$p" cluster info | tr -d '\r' | grep -E '^cluster_state:' )," \
        "role $(info_field "$p" replication role)"
    else
      echo "redis 127.0.0.1:$p: stopped"
      ok=3
    fi
  done
  for p in "${CL_PORTS[@]}"; do
    if redis_answers "$p"; then
      echo "CLUSTER NODES (from 127.0.0.1:$p): address flags master-id link slots"
      cluster_nodes "$p" | awk '{ s = ""; for (i = 9; i <= NF; i++) s = s " " $i; printf "  %s %s %s %s%s\n", $2, $3, $4, $8, s }' | sort
      break
    fi
  done
  return "$ok"
}

cluster_env() {
  local addrs=() p
  for p in "${CL_PORTS[@]}"; do addrs+=("127.0.0.1:$p"); done
  cat <<EOF
export KST_HA_CLUSTER_NODES=$(IFS=,; echo "${addrs[*]}")
export KST_HA_CLUSTER_DIR=$STATE
EOF
}

# The port of the master that owns slot $2, as node $1 sees it ("" if none is healthy).
cluster_owner_of_slot() {
  cluster_nodes "$1" | awk -v slot="$2" '
    $3 ~ /master/ && $3 !~ /fail/ {
      for (i = 9; i <= NF; i++) {
        n = split($i, r, "-"); lo = r[1]; hi = (n == 2 ? r[2] : r[1])
        if (lo ~ /^[0-9]+$/ && slot + 0 >= lo + 0 && slot + 0 <= hi + 0) { split($2, a, "[:@]"); print a[2]; exit }
      }
    }'
}

cluster_failed_over() {
  local old="$1" slot="$2" p owner
  for p in "${CL_PORTS[@]}"; do
    [ "$p" = "$old" ] && continue
    cluster_state_ok "$p" || return 1
    owner="$(cluster_owner_of_slot "$p" "$slot")"
    [ -n "$owner" ] && [ "$owner" != "$old" ] || return 1
  done
}

cluster_kill_primary() {
  local n="${1:-}" wait=1
  [[ "$n" =~ ^[1-3]$ ]] || die "usage: $0 cluster kill-primary N [--no-wait] (N: 1, 2 or 3)"
  [ "${2:-}" = --no-wait ] && wait=0
  # Masters with slots, ordered by their first slot: "firstslot port".
  local masters port slot pid t0
  masters="$(cluster_nodes "${CL_PORTS[0]}" | awk '$3 ~ /master/ && $3 !~ /fail/ && NF >= 9 { split($9, r, "-"); split($2, a, "[:@]"); print r[1], a[2] }' | sort -n)"
  [ "$(wc -l <<<"$masters")" -eq 3 ] || die "the cluster does not have three healthy primaries (run '$0 cluster status')"
  read -r slot port <<<"$(sed -n "${n}p" <<<"$masters")"
  pid="$(redis_pid "redis-$port")"
  pid_alive "$pid" || die "primary 127.0.0.1:$port is not running"
  t0="$(now_ms)"
  kill -9 "$pid"
  log "killed primary $n: 127.0.0.1:$port (pid $pid, SIGKILL; owned slot $slot onwards)"
  [ "$wait" -eq 1 ] || return 0
  wait_for "a replica taking over slot $slot" cluster_failed_over "$port" "$slot"
  local live="${CL_PORTS[0]}"
  [ "$live" != "$port" ] || live="${CL_PORTS[1]}"
  log "slot $slot now served by 127.0.0.1:$(cluster_owner_of_slot "$live" "$slot")," \
    "cluster_state ok on all live nodes, $(secs_since "$t0")s after the kill"
}

# --- main -------------------------------------------------------------------------------------

usage() {
  cat >&2 <<EOF
usage: $0 pg {up|down|status|env|promote|stop-old-primary}
       $0 sentinel {up|down|status|env|kill-primary [--no-wait]}
       $0 cluster {up|down|status|env|kill-primary N [--no-wait]}
EOF
  exit 64
}

main() {
  [ $# -ge 2 ] || usage
  TOPO="$1"
  LOG_NAME="ha-services $TOPO"
  local cmd="$2"
  shift 2
  case "$TOPO" in pg | sentinel | cluster) ;; *) usage ;; esac
  check_settings
  STATE="$BASE/$TOPO"
  case "$cmd" in
    status) "${TOPO}_status"; return ;;
    env)
      [ -e "$STATE/.kst-ha" ] || die "nothing at $STATE (run: $0 $TOPO up)"
      "${TOPO}_env"
      return
      ;;
  esac
  take_lock
  case "$TOPO:$cmd" in
    *:up) "${TOPO}_up"; "${TOPO}_env" ;;
    *:down) "${TOPO}_down" ;;
    pg:promote) pg_promote ;;
    pg:stop-old-primary) pg_stop_old_primary ;;
    sentinel:kill-primary) sentinel_kill_primary "$@" ;;
    cluster:kill-primary) cluster_kill_primary "$@" ;;
    *) usage ;;
  esac
}

main "$@"
