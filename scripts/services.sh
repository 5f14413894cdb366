#!/usr/bin/env bash
# Makes the services the tests need available on this machine, as root on Debian:
#   PostgreSQL on 127.0.0.1:5432 (role postgres, password postgres)
#   Redis      on 127.0.0.1:6379
# Installs the Debian packages only where missing, starts what is not running, and waits (with a
# bounded timeout) until each answers. Idempotent: when everything runs it changes nothing.
#
# Usage: scripts/services.sh [postgres] [redis]     (no argument: all of them)
# Environment (for testing this script): KST_PG_PORT (5432), KST_PG_CLUSTER (name of the cluster
# to create when none is configured for that port: main), KST_REDIS_PORT (6379),
# KST_SERVICE_TIMEOUT (seconds to wait for a service to answer, 60).
set -euo pipefail

PG_PORT="${KST_PG_PORT:-5432}"
PG_CLUSTER="${KST_PG_CLUSTER:-main}"
REDIS_PORT="${KST_REDIS_PORT:-6379}"
TIMEOUT="${KST_SERVICE_TIMEOUT:-60}"
ALL_SERVICES=(postgres redis)

log() { printf '== services: %s\n' "$*"; }
die() { printf '== services: ERROR: %s\n' "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (run as root or start the service yourself)"
}

APT_UPDATED=0
apt_install() {
  need_root "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  apt-get install -y -qq "$@" >/dev/null
}

# Runs "$@" until it succeeds, at most TIMEOUT seconds.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not answer within ${TIMEOUT}s"
    sleep 0.5
  done
}

# --- PostgreSQL -------------------------------------------------------------------------------

pg_url_works() {
  PGCONNECT_TIMEOUT=3 psql "postgres://postgres:postgres@127.0.0.1:${PG_PORT}/postgres" \
    -Atqc 'SELECT 1' >/dev/null 2>&1
}

# The "version name" of the cluster configured for PG_PORT, if any.
pg_cluster_on_port() {
  pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }'
}

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || ! command -v psql >/dev/null \
    || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql
  else
    log "postgres: installed"
  fi

  if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    log "postgres: running on 127.0.0.1:${PG_PORT}"
  else
    local cluster
    cluster="$(pg_cluster_on_port)"
    if [ -z "$cluster" ]; then
      need_root "creating a PostgreSQL cluster"
      local ver
      ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -1)"
      if pg_lsclusters -h | awk -v v="$ver" -v c="$PG_CLUSTER" '$1 == v && $2 == c { f = 1 } END { exit !f }'; then
        die "cluster $ver $PG_CLUSTER exists but not on port ${PG_PORT} (see pg_lsclusters)"
      fi
      log "postgres: creating cluster $ver $PG_CLUSTER on port ${PG_PORT}"
      pg_createcluster "$ver" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
      cluster="$ver $PG_CLUSTER"
    fi
    need_root "starting PostgreSQL"
    log "postgres: starting cluster $cluster"
    # shellcheck disable=SC2086 # "version name" are two arguments
    pg_ctlcluster --skip-systemctl-redirect $cluster start
    wait_for "postgres on 127.0.0.1:${PG_PORT}" pg_isready -q -h 127.0.0.1 -p "$PG_PORT"
    log "postgres: answering on 127.0.0.1:${PG_PORT}"
  fi

  if pg_url_works; then
    log "postgres: postgres://postgres:postgres@127.0.0.1:${PG_PORT}/postgres works"
  else
    need_root "setting the postgres password"
    log "postgres: setting the password of role postgres"
    runuser -u postgres -- psql -p "$PG_PORT" -Atqc "ALTER ROLE postgres PASSWORD 'postgres'" \
      >/dev/null
    pg_url_works || die "postgres://postgres:postgres@127.0.0.1:${PG_PORT}/postgres still fails (check pg_hba.conf)"
    log "postgres: postgres://postgres:postgres@127.0.0.1:${PG_PORT}/postgres works"
  fi
}

# --- Redis ------------------------------------------------------------------------------------

redis_answers() {
  [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
}

# kst-redis serves only from a server with appendonly yes and appendfsync always (its
# durability guard); a server started otherwise (Debian's default: everysec) is switched.
redis_make_durable() {
  local a f
  a="$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --raw config get appendonly 2>/dev/null | sed -n 2p)"
  f="$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --raw config get appendfsync 2>/dev/null | sed -n 2p)"
  if [ "$a" != yes ] || [ "$f" != always ]; then
    log "redis: switching to appendonly yes, appendfsync always (was ${a:-?}, ${f:-?})"
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" config set appendonly yes >/dev/null
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" config set appendfsync always >/dev/null
  fi
}

ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
  else
    log "redis: installed"
  fi

  if redis_answers; then
    log "redis: running on 127.0.0.1:${REDIS_PORT}"
    redis_make_durable
    return
  fi
  need_root "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  log "redis: starting redis-server on port ${REDIS_PORT}"
  # Durable (kst-redis refuses anything else): every write on disk before the reply.
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly yes --appendfsync always --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for "redis on 127.0.0.1:${REDIS_PORT}" redis_answers
  log "redis: answering on 127.0.0.1:${REDIS_PORT}"
}

# --- main -------------------------------------------------------------------------------------

main() {
  local services=("$@")
  [ ${#services[@]} -gt 0 ] || services=("${ALL_SERVICES[@]}")
  for s in "${services[@]}"; do
    case "$s" in
      postgres) ensure_postgres ;;
      redis) ensure_redis ;;
      *) die "unknown service '$s' (known: ${ALL_SERVICES[*]})" ;;
    esac
  done
}

main "$@"
