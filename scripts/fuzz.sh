#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a set time each (default 180 s), on the stable toolchain
# with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). Crashes land in fuzz/artifacts/<target>/;
# turn each into a regression test (see docs/SECURITY.md).
#
#   scripts/fuzz.sh                 # every target, 180 s each
#   FUZZ_SECONDS=30 scripts/fuzz.sh classify headers
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`; 0.13 builds on Rust 1.95) and a C++
# compiler (libfuzzer-sys builds libFuzzer).
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-180}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
# Seed corpora from the real fixtures so that the fuzzer starts from valid input.
mkdir -p corpus/key_validate corpus/classify corpus/handle corpus/headers corpus/wks
cp -n ../kst-core/testdata/keys/*.pub.asc corpus/key_validate/ 2>/dev/null || true
cp -n ../kst-core/testdata/*.pub.asc corpus/key_validate/ 2>/dev/null || true
# Hand-written requests (publication with a trusted Received header, retrieval, deletion,
# multipart, auto-reply) and trust headers: without them a short run never gets past parsing.
cp -n seeds/handle/* corpus/handle/
cp -n seeds/handle/* corpus/classify/
cp -n seeds/headers/* corpus/headers/
# The real gpg-wks-client --create mail (decryptable with the fixture submission key).
cp -n seeds/wks/* corpus/wks/
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s"
    # kst is #![forbid(unsafe_code)]: panics, hangs and OOM are what we look for, so no ASan.
    cargo fuzz run --sanitizer none "$t" -- -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048
done
