#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or this one: installs and starts what the tests
# need (gpg, PostgreSQL, Redis, Postfix tools, systemd-analyze), then runs every test of the
# workspace. tests/e2e.rs brings up the real mail system itself (scripts/mailsystem.sh up, as root).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*"; }

ensure_tools() {
  local missing=()
  command -v gpg >/dev/null || missing+=(gnupg)
  # kst-bin/tests/cli.rs: a mute nameserver (socat) in a namespace of its own (ip, unshare).
  command -v socat >/dev/null || missing+=(socat)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || missing+=(postfix)
  # tests/deploy.rs: systemd-analyze verify (works without systemd as PID 1).
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  # kst-bin/tests/dkim.rs: dkimpy's dkimverify checks kst's signatures (python3-nacl: ed25519).
  command -v dkimverify >/dev/null || missing+=(python3-dkim)
  /usr/bin/python3 -c 'import nacl' 2>/dev/null || missing+=(python3-nacl)
  # tests/two_providers.rs (scripts/providers.sh): SPF and DKIM checks of the receiving side.
  [ -x /usr/bin/policyd-spf ] || missing+=(postfix-policyd-spf-python)
  [ -x /usr/sbin/opendkim ] || missing+=(opendkim)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The tests run their own Postfix instances: none for the system (as scripts/mailsystem.sh).
    [ -x /usr/sbin/postfix ] || echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_tools
scripts/services.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo check: the server alone (no client or load-tool dependencies)"
cargo check -p kst-bin --no-default-features --features server
log "cargo check: server and client without the key directory (feature transparency off)"
cargo check -p kst-bin --no-default-features --features server,client

log "cargo test (workspace)"
export KST_TEST_POSTGRES_URL="${KST_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export KST_TEST_REDIS_URL="${KST_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc "$@"

