#!/usr/bin/env bash
# Makes the OpenPGP fixtures of the User ID revocation tombstone (kst-core/src/revocation.rs and
# the conformance case `user_id_revocation_survives_replacement_and_deletion`), with real GnuPG
# and a frozen --faked-system-time (fixed timeline).
#
# Run once and commit the output (kst-core/testdata/keys/uidrev-*.pub.asc); tests never call it.
# Made with gpg 2.2.40.
#
#   uidrev-v1.pub.asc      ed25519 alice <alice@example.net> and Alice Elsewhere
#                          <alice@elsewhere.example> (2025-01-01, expires 2030-01-01) with a
#                          cv25519 subkey: the old copy
#   uidrev-recert.pub.asc  v1 with alice's User ID revoked (2025-03-01) and certified again
#                          (2025-04-01, new expiry 2031-01-01): publishable, and it carries the revocation, which
#                          revokes every certification of that User ID older than 2025-03-01
#                          (v1's)
set -euo pipefail

# shellcheck source=gpg-timeline.sh
source "$(dirname "$0")/gpg-timeline.sh"

A="$ROOT/a"
mkdir -m 700 "$A"
FPR=$(g "$A" 20250101T000000 --status-fd 1 --quick-gen-key 'alice <alice@example.net>' \
    ed25519 sign,cert 2030-01-01 | awk '/KEY_CREATED/ {print $4}')
g "$A" 20250101T000000 --quick-add-key "$FPR" cv25519 encr never
g "$A" 20250101T000000 --quick-add-uid "$FPR" 'Alice Elsewhere <alice@elsewhere.example>'
g "$A" 20250101T000000 --armor --export "$FPR" >"$out/uidrev-v1.pub.asc"
# gpg re-adds no revoked User ID, so the revocation is made on a copy of the key ring and
# imported into the original after its User IDs were certified again (new expiry).
B="$ROOT/b"
mkdir -m 700 "$B" && cp -a "$A"/. "$B"/
g "$B" 20250301T000000 --quick-revoke-uid "$FPR" 'alice <alice@example.net>'
g "$B" 20250301T000000 --export "$FPR" >"$ROOT/revoked.gpg"
g "$A" 20250401T000000 --quick-set-expire "$FPR" 2031-01-01
g "$A" 20250401T000000 --import "$ROOT/revoked.gpg"
g "$A" 20250401T000000 --armor --export "$FPR" >"$out/uidrev-recert.pub.asc"
echo "primary $FPR"
