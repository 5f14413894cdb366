#!/usr/bin/env bash
# Key transparency (issue 18): the tests of the `transparency` feature, which the workspace build
# leaves off (it adds akd and protobuf's code generator: about 10 CPU-minutes of extra build on a
# fresh machine, too much for scripts/test.sh's budget). Run it after scripts/test.sh.
# Needs gpg (tests/transparency.rs makes real keys).
# Usage: scripts/test-transparency.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
printf '== %s\n' "cargo test: kst-core --features transparency, kst log keygen"
cargo test -p kst-core --features transparency --lib transparency "$@"
cargo test -p kst-bin --no-default-features --features server,transparency --test log_keygen "$@"
printf '== %s\n' "cargo test: the fs directory store, publish/retrieve/verify through the binaries"
# The kst binary with the feature first; tests/transparency.rs runs it (a no-op build then).
cargo build -p kst-bin --features transparency --bin kst
cargo test -p kst-tests --features transparency --test transparency "$@"
