# Sourced by the fixture scripts that run GnuPG on a fixed timeline (make-merge-fixtures.sh,
# make-uid-revocation-fixtures.sh): $out (the keys directory), $ROOT (a temporary directory of
# GnuPG homes, removed on exit, their agents stopped) and g.

out="$(cd "$(dirname "$0")" && pwd)/keys"
mkdir -p "$out"
ROOT="$(mktemp -d)"
cleanup() {
    for h in "$ROOT"/*; do GNUPGHOME="$h" gpgconf --kill gpg-agent >/dev/null 2>&1 || true; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

# g HOME TIME gpg-args...: gpg in HOME with its clock frozen at TIME (20250101T000000).
g() {
    local home=$1 t=$2
    shift 2
    GNUPGHOME="$home" gpg --batch --yes --no-tty --quiet --pinentry-mode loopback --passphrase '' \
        --no-auto-check-trustdb --faked-system-time "$t!" "$@" 2> >(grep -v 'faked system time' >&2)
}
