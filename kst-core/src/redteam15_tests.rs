//! Red-team round on issue 15 (certificate merge, compare-and-set, expiry reminders) through
//! kst-core's real functions: keys made by the real `gpg` at test time (with
//! `--faked-system-time` for dated self-signatures), the key policy, [`publish_merged`] on the
//! in-memory store, [`send_due`] with the in-memory mailer. A passing test documents a defence
//! that holds; an `#[ignore = "BUG: ..."]` test reproduces a weakness still open.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use pgp::packet::{Packet, PacketParser, SignatureType};
use pgp::ser::Serialize as _;
use pgp::types::KeyDetails;
use proptest::prelude::*;

use crate::address::{Address, AddressPolicy};
use crate::certificate::Certificate;
use crate::error::{Error, Result};
use crate::merge::{MergeError, canonical, fit_budget, is_revoked, merge};
use crate::publication::{PUBLISH_ATTEMPTS, publish_merged};
use crate::reminder::{ReminderSettings, send_due};
use crate::store::{Expected, KeyRecord, KeyStore, NewKey, PublishOutcome};
use crate::testing::{DelegatingStore, MemoryMailer, MemoryStore, StoreHooks};
use crate::validate::{DEFAULT_MAX_PUBLISHED_BYTES, KeyPolicy, validate};

const DAY: u64 = 86_400;
const ALICE: &str = "alice@example.net";

fn now() -> u64 {
    crate::time::unix_now()
}

fn alice() -> Address {
    AddressPolicy::default().normalize(ALICE).unwrap()
}

/// A GnuPG home; every command runs at a frozen time (`--faked-system-time`).
struct G {
    home: tempfile::TempDir,
}

impl G {
    fn new() -> G {
        let home = tempfile::Builder::new()
            .prefix("kst-rt15-")
            .tempdir()
            .unwrap();
        G { home }
    }

    fn gpg_at(&self, at: u64, args: &[&str], stdin: Option<&str>) -> Vec<u8> {
        use std::io::Write as _;
        let mut child = Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--yes", "--no-tty", "--quiet", "--pinentry-mode"])
            .args(["loopback", "--passphrase", "", "--no-auto-check-trustdb"])
            .arg("--faked-system-time")
            .arg(format!("{at}!"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gpg is part of the test environment");
        let input = stdin.unwrap_or("").to_string();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// A new ed25519 key `uid` made at `at`, expiring at `expire` (gpg's syntax), with a
    /// cv25519 encryption subkey; returns the home and the fingerprint.
    fn key(at: u64, uid: &str, expire: &str) -> (G, String) {
        let g = G::new();
        let out = g.gpg_at(
            at,
            &[
                "--status-fd",
                "1",
                "--quick-gen-key",
                uid,
                "ed25519",
                "sign,cert",
                expire,
            ],
            None,
        );
        let fpr = String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| l.strip_prefix("[GNUPG:] KEY_CREATED P "))
            .expect("KEY_CREATED")
            .trim()
            .to_string();
        g.gpg_at(
            at,
            &["--quick-add-key", &fpr, "cv25519", "encr", "never"],
            None,
        );
        (g, fpr)
    }

    /// A copy of this home (a second device holding the same key).
    fn fork(&self) -> G {
        let g = G::new();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", self.home.path().display()))
            .arg(g.home.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        // The copied agent socket belongs to the other home's agent.
        let _ = std::fs::remove_file(g.home.path().join("S.gpg-agent"));
        g
    }

    fn add_subkey(&self, at: u64, fpr: &str, algo: &str, usage: &str) {
        self.gpg_at(at, &["--quick-add-key", fpr, algo, usage, "never"], None);
    }

    fn set_expire(&self, at: u64, fpr: &str, expire: &str) {
        self.gpg_at(at, &["--quick-set-expire", fpr, expire], None);
    }

    /// Revokes subkey number `n` (1 = the first) at `at`.
    fn revoke_subkey(&self, at: u64, fpr: &str, n: usize) {
        let script = format!("key {n}\nrevkey\ny\n0\n\ny\nsave\n");
        self.gpg_at(
            at,
            &["--command-fd", "0", "--edit-key", fpr],
            Some(script.as_str()),
        );
    }

    /// Imports the revocation certificate gpg wrote when the key was made.
    fn revoke_primary(&self, at: u64, fpr: &str) {
        let rev = std::fs::read_to_string(
            self.home
                .path()
                .join("openpgp-revocs.d")
                .join(format!("{fpr}.rev")),
        )
        .unwrap();
        let armored = rev.replacen(":-----BEGIN", "-----BEGIN", 1);
        let file = self.home.path().join("rev.asc");
        std::fs::write(&file, armored).unwrap();
        self.gpg_at(at, &["--import", file.to_str().unwrap()], None);
    }

    fn export(&self, fpr: &str) -> String {
        String::from_utf8(self.gpg_at(now(), &["--armor", "--export", fpr], None)).unwrap()
    }
}

impl Drop for G {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// `armored` through the key policy for alice at `at`.
fn valid_at(armored: &str, at: u64) -> crate::validate::ValidKey {
    validate(
        armored,
        &alice(),
        &KeyPolicy::default(),
        UNIX_EPOCH + Duration::from_secs(at),
    )
    .unwrap_or_else(|e| panic!("refused: {e}"))
}

fn valid(armored: &str) -> crate::validate::ValidKey {
    valid_at(armored, now())
}

static PUBLICATIONS: AtomicUsize = AtomicUsize::new(0);

/// What the service hands [`publish_merged`] for a validated key (a fresh publication id).
fn new_key(v: &crate::validate::ValidKey) -> NewKey {
    let n = PUBLICATIONS.fetch_add(1, Ordering::SeqCst);
    NewKey {
        address: alice(),
        key: v.packets.clone(),
        fingerprint: v.fingerprint.clone(),
        publication_id: format!("{n:032x}"),
        published_at: now(),
        revoked: v.revoked,
        expected: Expected::Any,
    }
}

/// Publishes `armored` for alice through the key policy and [`publish_merged`] with `limit`.
async fn publish(
    store: &dyn KeyStore,
    armored: &str,
    limit: usize,
) -> std::result::Result<PublishOutcome, MergeError> {
    publish_merged(store, new_key(&valid(armored)), limit, now())
        .await
        .expect("the store is up")
}

async fn stored(store: &dyn KeyStore) -> KeyRecord {
    store.get(&alice()).await.unwrap().expect("a current key")
}

/// Every packet of `cert`.
fn packets(cert: &[u8]) -> Vec<Packet> {
    let mut parser = PacketParser::new(cert);
    let mut out = Vec::new();
    while let Some(body) = parser.next_ref() {
        let body = body.unwrap();
        let header = body.packet_header();
        out.push(Packet::from_reader(header, body).unwrap());
    }
    out
}

fn bytes_of(ps: &[Packet]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in ps {
        p.to_writer(&mut out).unwrap();
    }
    out
}

/// (key ID, revoked) of each subkey of `cert`, in certificate order.
fn subkey_states(cert: &[u8]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for p in packets(cert) {
        match p {
            Packet::PublicSubkey(k) => {
                out.push((hex::encode_upper(k.legacy_key_id().as_ref()), false));
            }
            Packet::Signature(s) if s.typ() == Some(SignatureType::SubkeyRevocation) => {
                if let Some(last) = out.last_mut() {
                    last.1 = true;
                }
            }
            _ => {}
        }
    }
    out
}

fn subkey_ids(cert: &[u8]) -> Vec<String> {
    subkey_states(cert).into_iter().map(|(k, _)| k).collect()
}

// --- merge ---------------------------------------------------------------------------------

/// A revocation must always be publishable. Device 2 published a new signing subkey; device 1
/// (which never saw it) publishes the key's revocation. Each publication fits the budget
/// alone, the merge of both does not, and no subkey is expired or superseded. The revocation
/// was refused with `key-too-large`: the owner could not revoke the key (and the tombstone
/// never learnt of it). Now a revoked key's unrevoked subkeys may go for the budget, and when
/// even that is not enough, the revoked publication itself is stored.
#[tokio::test]
async fn a_revocation_is_stored_even_when_the_merge_would_exceed_the_budget() {
    let t0 = now() - 200 * DAY;
    let (base, fpr) = G::key(t0, "Alice <alice@example.net>", "never");
    let device2 = base.fork();
    device2.add_subkey(t0 + DAY, &fpr, "ed25519", "sign");
    let with_signing = device2.export(&fpr);
    base.revoke_primary(t0 + 2 * DAY, &fpr);
    let revocation = base.export(&fpr);
    let limit = valid(&with_signing)
        .packets
        .len()
        .max(valid(&revocation).packets.len());

    let store = MemoryStore::default();
    assert!(publish(&store, &with_signing, limit).await.is_ok());
    let outcome = publish(&store, &revocation, limit).await;
    assert!(
        matches!(outcome, Ok(PublishOutcome::Published(_))),
        "the revocation was refused: {outcome:?}"
    );
    let record = stored(&store).await;
    assert!(record.revoked);
    assert!(is_revoked(&record.key).unwrap());
    assert!(record.key.len() <= limit, "{} > {limit}", record.key.len());
    // Nothing later un-revokes it, and the budget holds for the next publication too.
    assert!(publish(&store, &with_signing, limit).await.is_ok());
    let record = stored(&store).await;
    assert!(record.revoked && is_revoked(&record.key).unwrap());
    assert!(record.key.len() <= limit);
}

/// Two devices each add many encryption subkeys; their merge is over the budget. What is kept
/// fits, keeps the newest subkey and the revoked one, and still passes the key policy.
#[tokio::test]
async fn thousands_of_bytes_of_subkeys_from_two_devices_fit_the_budget() {
    const PER_DEVICE: u64 = 24;
    let t0 = now() - 300 * DAY;
    let (base, fpr) = G::key(t0, "Alice <alice@example.net>", "never");
    base.revoke_subkey(t0 + 10, &fpr, 1);
    let revoked_subkey = subkey_ids(&valid(&base.export(&fpr)).packets)[0].clone();
    let (d1, d2) = (base.fork(), base.fork());
    for i in 0..PER_DEVICE {
        d1.add_subkey(t0 + DAY + i * 60, &fpr, "cv25519", "encr");
        d2.add_subkey(t0 + 2 * DAY + i * 60, &fpr, "cv25519", "encr");
    }
    let (k1, k2) = (valid(&d1.export(&fpr)), valid(&d2.export(&fpr)));
    let newest = subkey_ids(&k2.packets).last().unwrap().clone();
    let limit = k1.packets.len().max(k2.packets.len()) + 2_000;
    assert!(merge(&k1.packets, &k2.packets).unwrap().len() > limit);

    let store = MemoryStore::default();
    assert!(publish(&store, &d1.export(&fpr), limit).await.is_ok());
    assert!(publish(&store, &d2.export(&fpr), limit).await.is_ok());
    let record = stored(&store).await;
    assert!(record.key.len() <= limit);
    let states = subkey_states(&record.key);
    assert!(states.contains(&(revoked_subkey, true)), "{states:?}");
    assert!(states.iter().any(|(k, _)| *k == newest), "{states:?}");
    let again = valid(&crate::openpgp::armor_public_key(&record.key));
    assert_eq!(canonical(&again.packets).unwrap(), record.key);
}

/// Self-signatures of one User ID made in the same second on two devices (a tie), a
/// backdated one (a device whose clock is behind) and a new subkey: every order of delivery
/// gives the same bytes, every input merged again changes nothing, the backdated signature
/// never wins, and the tie goes to one of the two tied signatures whatever the order.
#[test]
fn merge_is_order_independent_with_tied_and_backdated_signatures() {
    let t0 = now() - 400 * DAY;
    let t1 = now() - 100 * DAY;
    let (base, fpr) = G::key(t0, "Alice <alice@example.net>", "2y");
    let tie_a = base.fork();
    tie_a.set_expire(t1, &fpr, "1y");
    let tie_b = base.fork();
    tie_b.set_expire(t1, &fpr, "3y");
    let back = base.fork();
    back.set_expire(t1 - 50 * DAY, &fpr, "10y");
    let sub = base.fork();
    sub.add_subkey(t0 + 5, &fpr, "cv25519", "encr");
    let inputs: Vec<Vec<u8>> = [&base, &tie_a, &tie_b, &back, &sub]
        .iter()
        .map(|g| valid(&g.export(&fpr)).packets)
        .collect();
    let expiry = |i: usize| Certificate::from_binary(&inputs[i]).unwrap().expiration();
    let mut results = std::collections::BTreeSet::new();
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    permute(&mut order, 0, &mut |o: &[usize]| {
        let mut acc = canonical(&inputs[o[0]]).unwrap();
        for &i in &o[1..] {
            acc = merge(&acc, &inputs[i]).unwrap();
        }
        results.insert(acc);
    });
    assert_eq!(results.len(), 1, "the order of delivery changed the result");
    let merged = results.into_iter().next().unwrap();
    for input in &inputs {
        assert_eq!(merge(&merged, input).unwrap(), merged);
        assert_eq!(merge(input, &merged).unwrap(), merged);
    }
    assert_eq!(merge(&merged, &merged).unwrap(), merged);
    let got = Certificate::from_binary(&merged).unwrap().expiration();
    assert!(got == expiry(1) || got == expiry(2), "{got:?}");
    assert_ne!(got, expiry(3), "the backdated signature won");
    assert_eq!(subkey_ids(&merged).len(), 2);
}

fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == v.len() {
        f(v);
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, f);
        v.swap(k, i);
    }
}

/// A self-signature dated a year ahead (made by a device whose clock is wrong, or kept by an
/// attacker for later) that shortens the expiry: the key policy does not accept a signature
/// from the future, so it cannot win the newest-signature rule now; the key keeps its expiry.
#[tokio::test]
async fn a_future_dated_self_signature_cannot_win_the_newest_rule() {
    let t0 = now() - 100 * DAY;
    let (base, fpr) = G::key(t0, "Alice <alice@example.net>", "never");
    let future = base.fork();
    future.set_expire(now() + 365 * DAY, &fpr, "30d");
    let store = MemoryStore::default();
    assert!(
        publish(&store, &base.export(&fpr), DEFAULT_MAX_PUBLISHED_BYTES)
            .await
            .is_ok()
    );
    let before = stored(&store).await;
    // gpg exports the future self-signature only: the key policy refuses the publication
    // (no self-signature verifies now); had it carried the old one too, that one would be
    // kept. Either way the stored key does not change.
    match validate(
        &future.export(&fpr),
        &alice(),
        &KeyPolicy::default(),
        std::time::SystemTime::now(),
    ) {
        Ok(v) => {
            let r = publish_merged(&store, new_key(&v), DEFAULT_MAX_PUBLISHED_BYTES, now()).await;
            assert!(matches!(r, Ok(Ok(_))), "{r:?}");
        }
        Err(e) => assert_eq!(e.reason(), crate::Reason::BadSelfSignature, "{e}"),
    }
    let after = stored(&store).await;
    assert_eq!(
        after.key, before.key,
        "the future signature changed the key"
    );
    assert_eq!(
        Certificate::from_binary(&after.key).unwrap().expiration(),
        None
    );
}

/// Two primary keys for alice (made 100 and 99 days ago), an empty store, the default budget.
#[allow(clippy::type_complexity)]
fn two_keys_of_alice() -> (u64, G, String, G, String, MemoryStore, usize) {
    let t0 = now() - 100 * DAY;
    let (k1, f1) = G::key(t0, "Alice <alice@example.net>", "never");
    let (k2, f2) = G::key(t0 + DAY, "Alice <alice@example.net>", "never");
    let store = MemoryStore::default();
    (t0, k1, f1, k2, f2, store, DEFAULT_MAX_PUBLISHED_BYTES)
}

/// Another primary key with the same User ID replaces the key (the history keeps the old
/// one); a revoked primary key published again without its revocation, after that
/// replacement, is still served revoked.
#[tokio::test]
async fn another_primary_with_the_same_user_id_replaces_and_never_unrevokes() {
    let (t0, k1, f1, k2, f2, store, limit) = two_keys_of_alice();
    let k1_plain = k1.export(&f1);
    assert!(publish(&store, &k1_plain, limit).await.is_ok());
    k1.revoke_primary(t0 + 2 * DAY, &f1);
    assert!(publish(&store, &k1.export(&f1), limit).await.is_ok());
    assert!(publish(&store, &k2.export(&f2), limit).await.is_ok());
    let current = stored(&store).await;
    assert_eq!(current.fingerprint.as_str(), f2);
    assert!(!current.revoked);
    assert_eq!(
        subkey_ids(&current.key).len(),
        1,
        "nothing of the other key"
    );
    assert_eq!(store.history(&alice()).await.unwrap().len(), 3);
    assert!(publish(&store, &k1_plain, limit).await.is_ok());
    let current = stored(&store).await;
    assert_eq!(current.fingerprint.as_str(), f1);
    assert!(current.revoked && is_revoked(&current.key).unwrap());
    // Deleted, then the unrevoked copy again: still revoked.
    store.delete(&alice()).await.unwrap();
    assert!(publish(&store, &k1_plain, limit).await.is_ok());
    assert!(stored(&store).await.revoked);
}

/// The owner revoked a (compromised) subkey. Someone with the account's password, not the
/// key, replaces the key by another one and then publishes an old copy of the first key,
/// from before the subkey revocation: the merge has nothing to merge with (the current key is
/// the other one), the tombstone keeps only primary-key revocations, so the compromised
/// subkey is served unrevoked again. The same holds after a deletion (which removes the
/// history). Fixed: the tombstone keeps subkey revocations too ([`crate::revocation`]), so the
/// old copy is served with the subkey revoked; the conformance suite checks it on every
/// backend (`subkey_revocation_survives_replacement_and_deletion`).
#[tokio::test]
async fn a_revoked_subkey_is_not_unrevoked_by_replacing_then_republishing_an_old_copy() {
    let (t0, k1, f1, k2, f2, store, limit) = two_keys_of_alice();
    let old_copy = k1.export(&f1);
    assert!(publish(&store, &old_copy, limit).await.is_ok());
    k1.revoke_subkey(t0 + 2 * DAY, &f1, 1);
    assert!(publish(&store, &k1.export(&f1), limit).await.is_ok());
    assert!(subkey_states(&stored(&store).await.key)[0].1);
    assert!(publish(&store, &k2.export(&f2), limit).await.is_ok());
    assert!(publish(&store, &old_copy, limit).await.is_ok());
    let served = stored(&store).await;
    assert!(
        subkey_states(&served.key)[0].1,
        "the revoked subkey is served unrevoked"
    );
}

/// A new subkey whose binding signature was stripped, or whose signature bytes were altered
/// (a forged binding), never reaches the stored key through the merge: the key policy drops
/// it before the merge sees it, and the merge adds nothing the policy did not keep.
#[tokio::test]
async fn stripped_and_forged_subkey_bindings_never_reach_the_merged_key() {
    let t0 = now() - 100 * DAY;
    let (base, fpr) = G::key(t0, "Alice <alice@example.net>", "never");
    let store = MemoryStore::default();
    let limit = DEFAULT_MAX_PUBLISHED_BYTES;
    assert!(publish(&store, &base.export(&fpr), limit).await.is_ok());
    let before = stored(&store).await;
    let dev = base.fork();
    dev.add_subkey(t0 + DAY, &fpr, "cv25519", "encr");
    let full = crate::openpgp::dearmor_public_key(&dev.export(&fpr), 1 << 20).unwrap();
    let ps = packets(&full);
    let last_binding = ps.len() - 1;
    assert!(matches!(ps[last_binding], Packet::Signature(_)));
    assert!(matches!(ps[last_binding - 1], Packet::PublicSubkey(_)));

    // Stripped: the new subkey packet without its binding.
    let stripped = bytes_of(&ps[..last_binding]);
    // Forged: the binding's signature value altered (its last byte).
    let mut forged = full.clone();
    *forged.last_mut().unwrap() ^= 0x55;
    // Forged with another subkey's binding moved under the new subkey.
    let mut moved = ps.clone();
    let first_binding = ps
        .iter()
        .position(
            |p| matches!(p, Packet::Signature(s) if s.typ() == Some(SignatureType::SubkeyBinding)),
        )
        .unwrap();
    moved[last_binding] = ps[first_binding].clone();
    let moved = bytes_of(&moved);

    for (what, bin) in [("stripped", stripped), ("forged", forged), ("moved", moved)] {
        let armored = crate::openpgp::armor_public_key(&bin);
        match validate(
            &armored,
            &alice(),
            &KeyPolicy::default(),
            std::time::SystemTime::now(),
        ) {
            Ok(v) => {
                assert_eq!(
                    subkey_ids(&v.packets).len(),
                    1,
                    "{what}: the policy kept it"
                );
                let r = publish_merged(&store, new_key(&v), limit, now())
                    .await
                    .unwrap();
                assert!(r.is_ok(), "{what}: {r:?}");
            }
            Err(e) => assert!(!e.to_string().is_empty(), "{what}"),
        }
        assert_eq!(
            stored(&store).await.key,
            before.key,
            "{what}: the key changed"
        );
    }
}

/// Third-party certifications (a flood of 4,000 on the fixture) never survive into the stored
/// key, whatever is merged: every signature stored is the primary key's own.
#[tokio::test]
async fn third_party_certifications_never_reach_the_merged_key() {
    let fixture = |n: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("testdata/keys/{n}.pub.asc")),
        )
        .unwrap()
    };
    let store = MemoryStore::default();
    for name in ["alice", "alice-flooded", "alice-certified", "alice-flooded"] {
        let r = publish(&store, &fixture(name), DEFAULT_MAX_PUBLISHED_BYTES).await;
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    let key = stored(&store).await.key;
    let ps = packets(&key);
    let Packet::PublicKey(primary) = &ps[0] else {
        panic!("no primary key");
    };
    let (id, fpr) = (primary.legacy_key_id(), primary.fingerprint());
    let mut sigs = 0;
    for p in &ps {
        if let Packet::Signature(s) = p {
            sigs += 1;
            let by_id = s.issuer_key_id().into_iter().all(|k| *k == id);
            let by_fpr = s.issuer_fingerprint().into_iter().all(|f| *f == fpr);
            assert!(by_id && by_fpr, "a signature of another key was kept");
        }
    }
    assert!((2..10).contains(&sigs), "{sigs} signatures");
}

/// Compressed data inside a stored certificate (a packet nesting bomb), a second primary
/// key, a secret key: refused as unreadable, never expanded.
#[test]
fn packets_that_do_not_belong_in_a_certificate_are_refused_not_expanded() {
    let base = valid(
        &G::key(now() - DAY, "Alice <alice@example.net>", "never")
            .0
            .export(ALICE),
    )
    .packets;
    // A compressed data packet (tag 8, new format), ZLIB, with a few bytes of payload.
    let mut compressed = base.clone();
    compressed.extend([0xC8, 0x05, 0x02, 0x78, 0x9C, 0x03, 0x00]);
    let other = valid(
        &G::key(now() - DAY, "Alice <alice@example.net>", "never")
            .0
            .export(ALICE),
    )
    .packets;
    let mut two = base.clone();
    two.extend(&other);
    for bad in [compressed, two, vec![0xC5, 0x01, 0x04], Vec::new()] {
        assert!(matches!(merge(&base, &bad), Err(MergeError::Unreadable(_))));
        assert!(matches!(merge(&bad, &base), Err(MergeError::Unreadable(_))));
    }
    assert!(matches!(
        merge(&base, &other),
        Err(MergeError::DifferentPrimary)
    ));
}

fn merge_fixture(name: &str) -> Vec<u8> {
    let armored = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("testdata/keys/{name}.pub.asc")),
    )
    .unwrap();
    valid_at(&armored, 1_748_736_000).packets
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]
    /// Hostile bytes where the merge expects a stored certificate (a record imported by
    /// `kst import`, written by an older tool, or damaged): the merge, the canonical form, the
    /// budget and the revocation check return an answer and never panic.
    #[test]
    fn hostile_bytes_never_make_the_merge_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        static KEYS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
        let (a, b) = KEYS.get_or_init(|| (merge_fixture("merge-subkey"), merge_fixture("merge-signing")));
        let mut m = b.clone();
        for (i, byte) in &edits {
            let at = i.index(m.len());
            m[at] = *byte;
        }
        if truncate {
            m.truncate(cut.index(m.len() + 1));
        }
        let run = || {
            let _ = merge(a, &m);
            let _ = merge(&m, a);
            let _ = canonical(&m);
            let _ = is_revoked(&m);
            let _ = fit_budget(&m, 600, 1_800_000_000);
            if let Ok(c) = merge(a, &m) {
                let _ = fit_budget(&c, 600, 1_800_000_000);
            }
        };
        prop_assert!(std::panic::catch_unwind(run).is_ok(), "panicked on {m:02x?}");
    }
}

// --- compare-and-set -----------------------------------------------------------------------

/// A store on which every compare-and-set loses (another publisher is always first); every
/// other call goes to a memory store.
#[derive(Default)]
struct AlwaysRaced {
    publishes: AtomicUsize,
}

#[async_trait]
impl StoreHooks for AlwaysRaced {
    fn name(&self, _: &dyn KeyStore) -> &'static str {
        "always-raced"
    }
    async fn publish(&self, _: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        Err(key.expected.conflict(&key.address, Some(999)))
    }
}

/// A publication that loses every race does not loop: after [`PUBLISH_ATTEMPTS`] tries it
/// ends with the conflict, a temporary error (the MTA gets 4xx / exit 75 and delivers again
/// later), never a permanent refusal and never a lost message.
#[tokio::test]
async fn a_publication_that_always_loses_the_race_ends_temporary_and_bounded() {
    let store = DelegatingStore::new(Arc::new(MemoryStore::default()), AlwaysRaced::default());
    let armored = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/keys/merge-base.pub.asc"),
    )
    .unwrap();
    let key = new_key(&valid_at(&armored, 1_748_736_000));
    let err = publish_merged(&store, key, DEFAULT_MAX_PUBLISHED_BYTES, 1_748_736_000)
        .await
        .expect_err("every attempt lost");
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert!(err.is_temporary());
    assert_eq!(store.publishes.load(Ordering::SeqCst), PUBLISH_ATTEMPTS);
}

// --- reminders -----------------------------------------------------------------------------

fn reminder_kst(store: Arc<MemoryStore>) -> (crate::service::Kst, Arc<MemoryMailer>) {
    let mailer = Arc::new(MemoryMailer::default());
    let kst = crate::service::Kst::new(
        crate::policy::Policy::new(&["example.net"], &[]),
        store,
        mailer.clone(),
    );
    (kst, mailer)
}

/// User IDs with CR/LF and a header (`Bcc:`), a right-to-left override and a 1,000-character
/// name, on keys about to expire: each reminder goes to the owner's address only, with
/// kst's own headers; no User ID text reaches the mail (it names the fingerprint and the
/// address).
#[tokio::test]
async fn hostile_user_ids_do_not_reach_the_reminder_mail() {
    let t0 = now() - 10 * DAY;
    let long = format!("{} <alice@example.net>", "A".repeat(1_000));
    for uid in [
        "Alice\r\nBcc: victim@evil.example\r\n <alice@example.net>",
        "Alice\u{202e}evil.example@victim <alice@example.net>",
        long.as_str(),
    ] {
        let (g, fpr) = G::key(t0, uid, "20d");
        let armored = g.export(&fpr);
        let v = match validate(
            &armored,
            &alice(),
            &KeyPolicy::default(),
            std::time::SystemTime::now(),
        ) {
            Ok(v) => v,
            Err(e) => {
                // Refused at publication: nothing to remind.
                eprintln!("{uid:?} refused: {e}");
                assert!(!e.to_string().is_empty());
                continue;
            }
        };
        let store = Arc::new(MemoryStore::default());
        assert!(
            publish_merged(
                store.as_ref(),
                new_key(&v),
                DEFAULT_MAX_PUBLISHED_BYTES,
                now()
            )
            .await
            .unwrap()
            .is_ok()
        );
        let (kst, mailer) = reminder_kst(store);
        let run = send_due(&kst, &ReminderSettings::default(), now())
            .await
            .unwrap();
        assert_eq!(run.sent.len(), 1, "{uid:?}");
        let sent = mailer.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].recipient.as_str(), ALICE);
        let text = String::from_utf8_lossy(&sent[0].message).into_owned();
        let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        // A Bcc header line, not the letters anywhere: a random fingerprint or message id
        // may hold "bcc" (this failed once on `kst-fingerprint: ...26bcc0...`).
        assert!(
            !head.lines().any(|l| l.trim_start().starts_with("bcc")),
            "{head}"
        );
        assert!(!text.contains("victim") && !text.contains("AAAA"), "{text}");
        assert!(!text.contains('\u{202e}'));
        let msg = mail_parser::MessageParser::default()
            .parse(&sent[0].message)
            .unwrap();
        let to: Vec<String> = msg
            .to()
            .into_iter()
            .flat_map(|a| a.iter())
            .filter_map(|a| a.address().map(str::to_string))
            .collect();
        assert_eq!(to, [ALICE]);
        assert!(msg.cc().is_none() && msg.bcc().is_none());
    }
}

/// Reminders for keys that are no longer what the owner publishes: a key replaced by one
/// that does not expire, a revoked key, a deleted key: nothing is sent. Keys swapped between
/// runs (each about to expire) get at most one reminder per address and run, and each
/// (key, expiry, threshold) once: swapping back does not mail again.
#[tokio::test]
async fn reminders_only_for_the_current_unrevoked_key_and_at_most_one_per_run() {
    let t0 = now() - 10 * DAY;
    let (k1, f1) = G::key(t0, "Alice <alice@example.net>", "20d");
    let (k2, f2) = G::key(t0 + 60, "Alice <alice@example.net>", "21d");
    let (k3, f3) = G::key(t0 + 120, "Alice <alice@example.net>", "never");
    let (e1, e2) = (k1.export(&f1), k2.export(&f2));
    let store = Arc::new(MemoryStore::default());
    let (kst, mailer) = reminder_kst(store.clone());
    let settings = ReminderSettings::default();
    let limit = DEFAULT_MAX_PUBLISHED_BYTES;
    let sent = || mailer.sent.lock().unwrap().len();

    for armored in [&e1, &e2, &e1, &e2] {
        assert!(publish(store.as_ref(), armored, limit).await.is_ok());
        let run = send_due(&kst, &settings, now()).await.unwrap();
        assert!(run.sent.len() <= 1);
    }
    assert_eq!(sent(), 2, "one per (key, expiry, threshold)");

    // Replaced by a key that does not expire, the expiring key again revoked, then published
    // unrevoked (the tombstone keeps it revoked), then deleted: silent every time.
    let later = now() + 8 * DAY; // in the 3-day windows of k1 and k2
    let silent = || async {
        send_due(&kst, &settings, later)
            .await
            .unwrap()
            .sent
            .is_empty()
    };
    assert!(
        publish(store.as_ref(), &k3.export(&f3), limit)
            .await
            .is_ok()
    );
    assert!(silent().await);
    k1.revoke_primary(t0 + DAY, &f1);
    assert!(
        publish(store.as_ref(), &k1.export(&f1), limit)
            .await
            .is_ok()
    );
    assert!(silent().await);
    assert!(publish(store.as_ref(), &e1, limit).await.is_ok());
    assert!(silent().await);
    store.delete(&alice()).await.unwrap();
    assert!(silent().await);
    assert_eq!(sent(), 2);
}

/// The unhashed area of a signature is not signed: a publisher (someone with the password,
/// not the key) can pad the owner's valid self-signatures with thousands of Issuer subpackets
/// of other keys (and more copies of the right one) and they stay valid. The padded copy won
/// the merge's tie (same creation time, greater bytes), so it was served to every requester
/// and ate the owner's size budget for good. Now the key policy keeps one Issuer and one
/// Issuer Fingerprint naming the primary key, and one Embedded Signature: what padding
/// can add is one Issuer Fingerprint subpacket (23 bytes) per signature.
#[tokio::test]
async fn padding_in_the_unhashed_area_neither_wins_the_tie_nor_grows_the_key() {
    use pgp::packet::{Subpacket, SubpacketData};
    let t0 = now() - 100 * DAY;
    let (g, fpr) = G::key(t0, "Alice <alice@example.net>", "never");
    let clean = valid(&g.export(&fpr));
    let store = MemoryStore::default();
    let limit = DEFAULT_MAX_PUBLISHED_BYTES;
    assert!(
        publish_merged(&store, new_key(&clean), limit, now())
            .await
            .unwrap()
            .is_ok()
    );
    let before = stored(&store).await;
    let mut ps = packets(&clean.packets);
    let Packet::PublicKey(primary) = &ps[0] else {
        panic!("no primary key");
    };
    let right_fpr = primary.fingerprint();
    let right_id = primary.legacy_key_id();
    for p in ps.iter_mut() {
        if let Packet::Signature(s) = p {
            for i in 0..150u32 {
                let mut junk = [0u8; 8];
                junk[..4].copy_from_slice(&i.to_be_bytes());
                for data in [
                    SubpacketData::IssuerKeyId(pgp::types::KeyId::from(junk)),
                    SubpacketData::IssuerFingerprint(right_fpr.clone()),
                    SubpacketData::IssuerKeyId(right_id),
                ] {
                    s.unhashed_subpacket_push(Subpacket::regular(data).unwrap())
                        .unwrap();
                }
            }
        }
    }
    let padded = bytes_of(&ps);
    assert!(padded.len() > before.key.len() + 10_000);
    let v = valid(&crate::openpgp::armor_public_key(&padded));
    let r = publish_merged(&store, new_key(&v), limit, now())
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    let after = stored(&store).await;
    // At most one Issuer Fingerprint subpacket (23 bytes) per signature more than gpg wrote.
    assert!(
        after.key.len() <= before.key.len() + 2 * 23,
        "the padding was kept: {} bytes, was {}",
        after.key.len(),
        before.key.len()
    );
}
