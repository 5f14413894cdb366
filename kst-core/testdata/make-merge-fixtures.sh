#!/usr/bin/env bash
# Makes the OpenPGP fixtures of the certificate merge (kst-core/src/merge.rs tests), with real
# GnuPG: one primary key in several variants, as a second device or a restored backup would
# hold it. Every step runs with a frozen --faked-system-time (fixed timeline).
#
# Run once and commit the output (kst-core/testdata/keys/merge-*.pub.asc); tests never call it.
# Made with gpg 2.2.40.
#
#   merge-base.pub.asc        ed25519 alice <alice@example.net> (2025-01-01, expires 2030-01-01)
#                             with cv25519 subkey A (2025-01-01)
#   merge-subkey.pub.asc      base + cv25519 subkey B (2025-03-01): a second device's update
#   merge-extended.pub.asc    base with the expiry extended (new self-signature 2025-05-01,
#                             expires 2035): no subkey B
#   merge-subrevoked.pub.asc  base with subkey A revoked (2025-07-01)
#   merge-signing.pub.asc     base + ed25519 signing subkey C (2025-04-01) expiring 2026-01-01
#   merge-revoked.pub.asc     base with a key revocation (2025-08-01)
#   reminder.pub.asc          another ed25519 key for alice@example.net (2025-01-01, expires
#                             2030-01-01) with a cv25519 subkey: the expiry reminder tests
set -euo pipefail

# shellcheck source=gpg-timeline.sh
source "$(dirname "$0")/gpg-timeline.sh"

BASE="$ROOT/base"
mkdir -m 700 "$BASE"
FPR=$(g "$BASE" 20250101T000000 --status-fd 1 --quick-gen-key 'alice <alice@example.net>' \
    ed25519 sign,cert 2030-01-01 | awk '/KEY_CREATED/ {print $4}')
g "$BASE" 20250101T000000 --quick-add-key "$FPR" cv25519 encr never
g "$BASE" 20250101T000000 --armor --export "$FPR" >"$out/merge-base.pub.asc"
SUBA=$(GNUPGHOME="$BASE" gpg --batch --with-colons --list-keys "$FPR" | awk -F: '/^fpr/ {print $10}' | sed -n 2p)

branch() { mkdir -m 700 "$ROOT/$1" && cp -a "$BASE"/. "$ROOT/$1"/ && echo "$ROOT/$1"; }

H=$(branch subkey)
g "$H" 20250301T000000 --quick-add-key "$FPR" cv25519 encr never
g "$H" 20250301T000000 --armor --export "$FPR" >"$out/merge-subkey.pub.asc"

H=$(branch extended)
g "$H" 20250501T000000 --quick-set-expire "$FPR" 2035-01-01
g "$H" 20250501T000000 --armor --export "$FPR" >"$out/merge-extended.pub.asc"

H=$(branch subrevoked)
printf 'key 1\nrevkey\ny\n0\n\ny\nsave\n' |
    g "$H" 20250701T000000 --command-fd 0 --edit-key "$FPR" >/dev/null
g "$H" 20250701T000000 --armor --export "$FPR" >"$out/merge-subrevoked.pub.asc"

H=$(branch signing)
g "$H" 20250401T000000 --quick-add-key "$FPR" ed25519 sign 2026-01-01
g "$H" 20250401T000000 --armor --export "$FPR" >"$out/merge-signing.pub.asc"

H=$(branch revoked)
printf 'y\n0\n\ny\n' |
    GNUPGHOME="$H" gpg --no-tty --quiet --pinentry-mode loopback --passphrase '' \
        --faked-system-time '20250801T000000!' --command-fd 0 --armor \
        --output "$H/rev.asc" --gen-revoke "$FPR" 2> >(grep -v 'faked system time' >&2)
g "$H" 20250801T000000 --import "$H/rev.asc"
g "$H" 20250801T000000 --armor --export "$FPR" >"$out/merge-revoked.pub.asc"

R="$ROOT/reminder"
mkdir -m 700 "$R"
RFPR=$(g "$R" 20250101T000000 --status-fd 1 --quick-gen-key 'alice <alice@example.net>' \
    ed25519 sign,cert 2030-01-01 | awk '/KEY_CREATED/ {print $4}')
g "$R" 20250101T000000 --quick-add-key "$RFPR" cv25519 encr never
g "$R" 20250101T000000 --armor --export "$RFPR" >"$out/reminder.pub.asc"

echo "primary $FPR subkey A $SUBA"
ls -l "$out"/merge-*
