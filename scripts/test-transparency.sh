#!/usr/bin/env bash
# Key transparency (issue 18): the tests of the `transparency` feature, which the workspace build
# leaves off (it adds akd and protobuf's code generator: about 10 CPU-minutes of extra build on a
# fresh machine, too much for scripts/test.sh's budget). Run it after scripts/test.sh.
# Usage: scripts/test-transparency.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
printf '== %s\n' "cargo test: kst-core --features transparency, kst log keygen"
cargo test -p kst-core --features transparency --lib transparency "$@"
cargo test -p kst-bin --no-default-features --features server,transparency --test log_keygen "$@"
printf '== %s\n' "cargo test: the directory stores (fs, PostgreSQL), publish/retrieve/verify through the binaries"
# The kst binary and the test in one build (one feature resolution), then the test runs that
# binary. Needs gpg and PostgreSQL (KST_TEST_POSTGRES_URL, as scripts/test.sh).
cargo build -p kst-tests -p kst-bin --features kst-tests/transparency --bin kst --test transparency
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
KST_TEST_BINARY="$target_dir/debug/kst" \
    cargo test -p kst-tests -p kst-bin --features kst-tests/transparency --test transparency "$@"
