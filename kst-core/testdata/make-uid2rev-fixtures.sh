#!/usr/bin/env bash
# Makes the OpenPGP fixture of a key with two User IDs for the account's address, one of them
# revoked (kst-core/src/validate/tests.rs and the service test
# `a_revoked_second_user_id_is_published_and_served_with_its_revocation`), with real GnuPG and
# a frozen --faked-system-time (fixed timeline).
#
# Run once and commit the output (kst-core/testdata/keys/uid2rev-*.pub.asc); tests never call it.
# Made with gpg 2.2.40.
#
#   uid2rev-second.pub.asc  ed25519 key (2025-01-01, expires 2030-01-01) with a cv25519 subkey
#                           and two User IDs of alice@example.net: "Alice Old
#                           <alice@example.net>" (made with the key, first in the block) revoked
#                           on 2025-03-01, and "alice <alice@example.net>" (added 2025-01-01)
#                           valid. Neither certification is flagged primary, so without the
#                           revocation the first (revoked) one is the one kst would publish: it
#                           must reach clients together with its revocation.
set -euo pipefail

# shellcheck source=gpg-timeline.sh
source "$(dirname "$0")/gpg-timeline.sh"

A="$ROOT/a"
mkdir -m 700 "$A"
FPR=$(g "$A" 20250101T000000 --status-fd 1 --quick-gen-key 'Alice Old <alice@example.net>' \
    ed25519 sign,cert 2030-01-01 | awk '/KEY_CREATED/ {print $4}')
g "$A" 20250101T000000 --quick-add-key "$FPR" cv25519 encr never
g "$A" 20250101T000000 --quick-add-uid "$FPR" 'alice <alice@example.net>'
g "$A" 20250301T000000 --quick-revoke-uid "$FPR" 'Alice Old <alice@example.net>'
g "$A" 20250301T000000 --armor --export "$FPR" >"$out/uid2rev-second.pub.asc"
echo "primary $FPR"
