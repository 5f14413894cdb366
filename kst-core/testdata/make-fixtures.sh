#!/usr/bin/env bash
# Makes the OpenPGP fixture keys used by kst-core/src/validate.rs tests, with real GnuPG.
#
# Run once and commit the output (kst-core/testdata/keys/); the tests never call this script.
# Every step runs with a frozen --faked-system-time so the fixtures have a fixed timeline
# (independent of the clock of the machine that made them):
#   2020-01-01  expired.pub.asc created, expires one day later
#   2020-01-01  subkeys.pub.asc primary and its expiring subkey
#   2025-01-01  every other key created and self-signed
#   2026-01-01  sha1-resigned.pub.asc re-signed with SHA-256
#   2025-01-01 + N seconds  the flood of third-party certifications
#
# Needs gpg 2.2 or newer. Made with gpg 2.2.40 (libgcrypt 1.10.1); takes well under a minute.
#
# Output (all ASCII armored):
#   alice.pub.asc           good ed25519 key: UIDs alice <alice@example.net> (not the primary UID),
#                           Alice Private <alice@personal.example>, "Alice (no mail)", a JPEG photo
#                           ID; a cv25519 encryption subkey
#   alice.sec.asc           the same key's secret key export (gpg --export-secret-keys)
#   alice-certified.pub.asc alice.pub.asc plus one certification by bob on every UID and the photo
#   alice-flooded.pub.asc   alice.pub.asc plus FLOOD_ROUNDS x FLOOD_SIGNERS x 4 third-party
#                           certifications (the SKS flooding shape, CVE-2019-13050)
#   revoked.pub.asc         ed25519 key for alice@example.net with a key revocation (--gen-revoke)
#   expired.pub.asc         ed25519 key for alice@example.net created 2020-01-01, expiring after 1 day
#   rsa1024.pub.asc         RSA-1024 key for alice@example.net (gpg 2.2 still makes it)
#   dsa-elg.pub.asc         DSA-2048 key with an ElGamal-2048 encryption subkey, alice@example.net
#   sha1.pub.asc            RSA-3072 key for alice@example.net, self-signatures with SHA-1
#   sha1-resigned.pub.asc   sha1.pub.asc plus SHA-256 self-signature and bindings made 2026-01-01
#                           (both generations of self-signatures present)
#   subkeys.pub.asc         ed25519 key (2020) for alice@example.net with three subkeys: cv25519
#                           expired 2020-01-02, cv25519 (2025) live, ed25519 signing (2025) revoked
#   foreign.pub.asc         mallory <alice@example.org> only
#   two-certs.pub.asc       alice.pub.asc and foreign.pub.asc in one armored block
#   lifecycle-v1.pub.asc    ed25519 key for alice@example.net with a cv25519 subkey (2025-01-01)
#   lifecycle-v2.pub.asc    the same key plus a second cv25519 subkey (2025-06-01): an update
#   lifecycle-revoked.pub.asc  the same key (v2) with a key revocation made 2025-07-01
#   uid-revoked.pub.asc     ed25519 key: alice <alice@example.net> (revoked 2025-06-01) and
#                           Alice Elsewhere <alice@elsewhere.example> (valid)
set -euo pipefail

FLOOD_SIGNERS=${FLOOD_SIGNERS:-20}
FLOOD_ROUNDS=${FLOOD_ROUNDS:-25}

out="$(cd "$(dirname "$0")" && pwd)/keys"
mkdir -p "$out"

GNUPGHOME="$(mktemp -d)"
export GNUPGHOME
cleanup() {
    gpgconf --kill gpg-agent >/dev/null 2>&1 || true
    rm -rf "$GNUPGHOME"
}
trap cleanup EXIT

BASE=20250101T000000
g() {
    gpg --batch --yes --no-tty --quiet --pinentry-mode loopback --passphrase '' \
        --no-auto-check-trustdb "$@" 2> >(grep -v 'faked system time' >&2)
}
gt() { g --faked-system-time "$BASE!" "$@"; }
# gen [gpg options...] -- uid algo usage expire: makes a key, prints its fingerprint.
gen() {
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    g "${opts[@]}" --status-fd 1 --quick-gen-key "$@" | awk '/KEY_CREATED/ {print $4}'
}

# --- alice: the good key -------------------------------------------------------------------
ALICE=$(gen --faked-system-time "$BASE!" -- 'alice <alice@example.net>' ed25519 sign,cert never)
gt --quick-add-key "$ALICE" cv25519 encr never
gt --quick-add-uid "$ALICE" 'Alice Private <alice@personal.example>'
gt --quick-add-uid "$ALICE" 'Alice (no mail)'
# A minimal JPEG (gpg only checks the JFIF header) as a photo ID (a User Attribute packet).
printf '\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9' \
    >"$GNUPGHOME/photo.jpg"
printf 'addphoto\n%s\ny\nsave\n' "$GNUPGHOME/photo.jpg" |
    gt --command-fd 0 --edit-key "$ALICE" >/dev/null
g --armor --export "$ALICE" >"$out/alice.pub.asc"
g --armor --export-secret-keys "$ALICE" >"$out/alice.sec.asc"

# --- bob certifies every UID of alice once -------------------------------------------------
BOB=$(gen --faked-system-time "$BASE!" -- 'bob <bob@example.com>' ed25519 sign,cert never)
gt -u "$BOB" --quick-sign-key "$ALICE" >/dev/null
g --armor --export "$ALICE" >"$out/alice-certified.pub.asc"

# --- the flood -----------------------------------------------------------------------------
# One gpg call signs every UID of alice with every -u key. Ed25519 signatures are deterministic,
# so each round uses a different (frozen) time and --force-sign-key to make new signatures.
signers=()
for i in $(seq 1 "$FLOOD_SIGNERS"); do
    signers+=(-u "$(gen --faked-system-time "$BASE!" -- "flooder $i <flood$i@flood.example>" ed25519 cert never)")
done
for r in $(seq 1 "$FLOOD_ROUNDS"); do
    t=$(printf '20250101T%02d%02d%02d' $((r / 3600)) $((r / 60 % 60)) $((r % 60)))
    g --faked-system-time "$t!" "${signers[@]}" --force-sign-key --quick-sign-key "$ALICE" >/dev/null
done
g --armor --export "$ALICE" >"$out/alice-flooded.pub.asc"

# --- revoked: a revocation certificate made with --gen-revoke, imported, exported -----------
REVOKED=$(gen --faked-system-time "$BASE!" -- 'alice <alice@example.net>' ed25519 sign,cert never)
gt --quick-add-key "$REVOKED" cv25519 encr never
# Answers: create? y / reason 1 (compromised) / empty description line / okay? y
# (--gen-revoke refuses --batch; --command-fd answers its prompts.)
printf 'y\n1\n\ny\n' |
    gpg --no-tty --quiet --pinentry-mode loopback --passphrase '' --faked-system-time "$BASE!" \
        --command-fd 0 --armor --output "$GNUPGHOME/rev.asc" --gen-revoke "$REVOKED" \
        2> >(grep -v 'faked system time' >&2)
g --import "$GNUPGHOME/rev.asc"
g --armor --export "$REVOKED" >"$out/revoked.pub.asc"
g --yes --delete-secret-and-public-key "$REVOKED"

# --- expired: made in 2020 with a one-day expiry ---------------------------------------------
EXPIRED=$(gen --faked-system-time '20200101T000000!' -- 'alice <alice@example.net>' ed25519 sign,cert 1d)
g --faked-system-time '20200101T000000!' --quick-add-key "$EXPIRED" cv25519 encr 1d
g --armor --export "$EXPIRED" >"$out/expired.pub.asc"
g --yes --delete-secret-and-public-key "$EXPIRED"

# --- weak algorithms -------------------------------------------------------------------------
one_key() { # uid algo usage file [subkey-algo]
    local f
    f=$(gen --faked-system-time "$BASE!" -- "$1" "$2" "$3" never)
    if [ -n "${5:-}" ]; then gt --quick-add-key "$f" "$5" encr never; fi
    g --armor --export "$f" >"$out/$4"
    g --yes --delete-secret-and-public-key "$f"
}
one_key 'weak rsa <alice@example.net>' rsa1024 sign,cert rsa1024.pub.asc
one_key 'old dsa <alice@example.net>' dsa2048 sign,cert dsa-elg.pub.asc elg2048
# SHA-1 self-signatures and binding signature (gpg 2.2 still makes them).
SHA1=$(gen --faked-system-time "$BASE!" --cert-digest-algo SHA1 --digest-algo SHA1 \
    --personal-digest-preferences SHA1 -- 'sha1 <alice@example.net>' rsa3072 sign,cert never)
gt --cert-digest-algo SHA1 --digest-algo SHA1 --quick-add-key "$SHA1" rsa3072 encr never
g --armor --export "$SHA1" >"$out/sha1.pub.asc"
# The same key re-signed with SHA-256 a year later, as an old key renewed today would be
# (new self-signature on the UID and new binding on every subkey, '*').
g --faked-system-time '20260101T000000!' --cert-digest-algo SHA256 --digest-algo SHA256 \
    --quick-set-expire "$SHA1" 0
g --faked-system-time '20260101T000000!' --cert-digest-algo SHA256 --digest-algo SHA256 \
    --quick-set-expire "$SHA1" 0 '*'
# gpg exports only the newest self-signatures; importing the old export merges the SHA-1 ones
# back, as a keyring that saw both versions holds them.
g --import "$out/sha1.pub.asc"
g --armor --export "$SHA1" >"$out/sha1-resigned.pub.asc"
g --yes --delete-secret-and-public-key "$SHA1"

# --- subkeys: one expired, one live, one revoked -------------------------------------------
SUBS=$(gen --faked-system-time '20200101T000000!' -- 'alice <alice@example.net>' ed25519 sign,cert never)
g --faked-system-time '20200101T000000!' --quick-add-key "$SUBS" cv25519 encr 1d
gt --quick-add-key "$SUBS" cv25519 encr never
gt --quick-add-key "$SUBS" ed25519 sign never
# revoke the third subkey (the signing one): reason 0, empty description
printf 'key 3\nrevkey\ny\n0\n\ny\nsave\n' |
    gt --command-fd 0 --edit-key "$SUBS" >/dev/null
g --armor --export "$SUBS" >"$out/subkeys.pub.asc"
g --yes --delete-secret-and-public-key "$SUBS"

# --- a key for another address only ----------------------------------------------------------
MALLORY=$(gen --faked-system-time "$BASE!" -- 'mallory <alice@example.org>' ed25519 sign,cert never)
g --armor --export "$MALLORY" >"$out/foreign.pub.asc"

# --- two certificates in one block -------------------------------------------------------------
g --armor --export-options export-minimal --export "$ALICE" "$MALLORY" >"$out/two-certs.pub.asc"

# --- lifecycle: one key in three versions (update with a new subkey, then revoked) ----------
LIFE=$(gen --faked-system-time "$BASE!" -- 'alice <alice@example.net>' ed25519 sign,cert never)
gt --quick-add-key "$LIFE" cv25519 encr never
g --armor --export "$LIFE" >"$out/lifecycle-v1.pub.asc"
g --faked-system-time '20250601T000000!' --quick-add-key "$LIFE" cv25519 encr never
g --armor --export "$LIFE" >"$out/lifecycle-v2.pub.asc"
printf 'y\n0\n\ny\n' |
    gpg --no-tty --quiet --pinentry-mode loopback --passphrase '' \
        --faked-system-time '20250701T000000!' --command-fd 0 --armor \
        --output "$GNUPGHOME/life-rev.asc" --gen-revoke "$LIFE" \
        2> >(grep -v 'faked system time' >&2)
g --import "$GNUPGHOME/life-rev.asc"
g --armor --export "$LIFE" >"$out/lifecycle-revoked.pub.asc"
g --yes --delete-secret-and-public-key "$LIFE"

# --- uid-revoked: alice's User ID revoked, another one still valid --------------------------
UIDREV=$(gen --faked-system-time "$BASE!" -- 'alice <alice@example.net>' ed25519 sign,cert never)
gt --quick-add-key "$UIDREV" cv25519 encr never
gt --quick-add-uid "$UIDREV" 'Alice Elsewhere <alice@elsewhere.example>'
g --faked-system-time '20250601T000000!' --quick-revoke-uid "$UIDREV" 'alice <alice@example.net>'
g --armor --export "$UIDREV" >"$out/uid-revoked.pub.asc"
g --yes --delete-secret-and-public-key "$UIDREV"

ls -l "$out"
du -sh "$out"
