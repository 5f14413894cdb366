#!/usr/bin/env bash
# Makes the amplification fixtures (issue 13, item 4) with real GnuPG, apart from
# make-fixtures.sh so that the other fixtures stay as they are.
#
# Run once and commit the output (kst-core/testdata/keys/); the tests never call this script.
# Made with gpg 2.2.40 (libgcrypt 1.10.1). gpg refuses a hashed area over about 10,000 bytes,
# so each self-signature carries one notation of 9,336 random base64 bytes (a 9,359-byte
# subpacket), the largest gpg writes and reads back.
#
# gpg replaces a User ID's self-signature when it renews one, so the many self-certifications
# of one User ID are made the way a keyring accumulates them: the User ID is added (with
# --cert-notation) at a later faked time and exported, the keyring is put back to before the
# User ID existed, it is added again ..., and every export is imported into one fresh keyring,
# whose import merges the signatures onto the one User ID.
#
# Output (all ASCII armored):
#   amplified.pub.asc          ed25519 key (2025-01-01): UID "amplifier" (no address), UID
#                              alice <alice@example.net> with SELF_SIGS self-certifications made
#                              2025-01-02 + N hours, each with a 9 KB hashed notation, and
#                              SUBKEYS cv25519 subkeys whose binding carries the same notation.
#                              Reduced to the newest self-signature it is just under 64 KiB.
#   amplified-too-large.pub.asc  the same key with EXTRA_SUBKEYS more such subkeys: over 64 KiB
#                              even after the reduction.
set -euo pipefail

SELF_SIGS=${SELF_SIGS:-65}
SUBKEYS=${SUBKEYS:-5}
EXTRA_SUBKEYS=${EXTRA_SUBKEYS:-2}

out="$(cd "$(dirname "$0")" && pwd)/keys"
mkdir -p "$out"

GNUPGHOME="$(mktemp -d)"
export GNUPGHOME
work="$(mktemp -d)"
cleanup() {
    gpgconf --kill gpg-agent >/dev/null 2>&1 || true
    GNUPGHOME="$work/merged" gpgconf --kill gpg-agent >/dev/null 2>&1 || true
    rm -rf "$GNUPGHOME" "$work"
}
trap cleanup EXIT

g() {
    gpg --batch --yes --no-tty --quiet --pinentry-mode loopback --passphrase '' \
        --no-auto-check-trustdb "$@" 2> >(grep -v 'faked system time\|expand notation' >&2)
}
# gn: g with a notation; gpg warns "unable to %-expand notation (too large)" for a notation this
# long, uses it unexpanded as wanted, and then exits with 2: only that exit code is tolerated.
gn() { g "$@" || [ $? -eq 2 ]; }
notation="big@kst.example=$(head -c 7002 /dev/urandom | base64 -w0 | head -c 9336)"

KEY=$(g --faked-system-time '20250101T000000!' --status-fd 1 --quick-gen-key 'amplifier' \
    ed25519 sign,cert never | awk '/KEY_CREATED/ {print $4}')
for i in $(seq 1 "$SUBKEYS"); do
    gn --faked-system-time "20250101T0${i}0000!" --cert-notation "$notation" \
        --quick-add-key "$KEY" cv25519 encr never
done
cp "$GNUPGHOME/pubring.kbx" "$work/before-uid.kbx"
for i in $(seq 1 "$SELF_SIGS"); do
    cp "$work/before-uid.kbx" "$GNUPGHOME/pubring.kbx"
    at=$(date -u -d "2025-01-02 00:00:00 UTC + $i hours" +%Y%m%dT%H%M%S)
    gn --faked-system-time "$at!" --cert-notation "$notation" \
        --quick-add-uid "$KEY" 'alice <alice@example.net>'
    g --export "$KEY" >"$work/round-$i.gpg"
done

mkdir -m 700 "$work/merged"
for f in "$work"/round-*.gpg; do
    GNUPGHOME="$work/merged" g --import "$f"
done
GNUPGHOME="$work/merged" g --armor --export "$KEY" >"$out/amplified.pub.asc"

for i in $(seq 1 "$EXTRA_SUBKEYS"); do
    gn --faked-system-time "20250201T0${i}0000!" --cert-notation "$notation" \
        --quick-add-key "$KEY" cv25519 encr never
done
g --export "$KEY" >"$work/extra.gpg"
GNUPGHOME="$work/merged" g --import "$work/extra.gpg"
GNUPGHOME="$work/merged" g --armor --export "$KEY" >"$out/amplified-too-large.pub.asc"

# what was made (a check that gpg did what the comments above say)
for f in amplified amplified-too-large; do
    echo "$f.pub.asc: $(wc -c <"$out/$f.pub.asc") bytes armored," \
        "$(GNUPGHOME="$work/merged" g --list-packets "$out/$f.pub.asc" | grep -c 'sigclass 0x13') UID self-certifications," \
        "$(GNUPGHOME="$work/merged" g --list-packets "$out/$f.pub.asc" | grep -c 'sigclass 0x18') subkey bindings," \
        "$(GNUPGHOME="$work/merged" g --list-packets "$out/$f.pub.asc" | grep -c 'notation: big@') notations"
done
