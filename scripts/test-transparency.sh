#!/usr/bin/env bash
# Key transparency (issue 18): only the transparency tests, for a quick run while working on
# the directory. The `transparency` feature is on by default, so scripts/test.sh runs all of
# them too.
# Usage: scripts/test-transparency.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
export KST_TEST_POSTGRES_URL="${KST_TEST_POSTGRES_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
export KST_TEST_REDIS_URL="${KST_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
cargo test -p kst-core --features transparency --lib transparency "$@"
cargo test -p kst-bin --test log_keygen "$@"
cargo test -p kst-tests --test transparency "$@"
