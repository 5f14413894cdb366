//! Unit tests of the transparency layer over akd's in-memory database (the only fake: the
//! backends' stores come in a later step with the conformance suite).

use akd::storage::memory::AsyncInMemoryDatabase;

use super::directory::{KeyDirectory, LookupAnswer};
use super::entry::{DirectoryEntry, EntryState, key_hash};
use super::head::{Head, HeadSigner, SignedHead};
use super::keys::LogKeys;
use super::verify::{verify_absence, verify_append_only, verify_lookup};
use super::vrf::VrfSecret;
use super::wire;
use crate::{Address, Fingerprint};

const DOMAIN: &str = "example.net";

fn addr(s: &str) -> Address {
    Address::from_normalized(s).unwrap()
}

fn entry(version: u64, state: EntryState, key: &[u8]) -> DirectoryEntry {
    let fp = Fingerprint::parse(&format!("{:040X}", key_hash(key)[0] as u64 + 1)).unwrap();
    DirectoryEntry {
        state,
        version,
        changed_at: 1_700_000_000 + version,
        key: Some((fp, key_hash(key))),
    }
}

async fn directory(vrf: &VrfSecret) -> KeyDirectory<AsyncInMemoryDatabase> {
    KeyDirectory::open(AsyncInMemoryDatabase::new(), vrf.clone())
        .await
        .unwrap()
}

/// The signed head of the directory's current epoch.
async fn head(dir: &KeyDirectory<AsyncInMemoryDatabase>, signer: &HeadSigner) -> SignedHead {
    let (epoch, root_hash) = dir.current().await.unwrap();
    signer
        .sign(Head {
            domain: DOMAIN.into(),
            epoch,
            root_hash,
            vrf_public_key: dir.vrf_public_key().unwrap(),
            signed_at: 1_700_000_000 + epoch,
        })
        .unwrap()
}

async fn lookup_proof(dir: &KeyDirectory<AsyncInMemoryDatabase>, a: &Address) -> akd::LookupProof {
    match dir.lookup(a).await.unwrap() {
        LookupAnswer::Present { proof, .. } => *proof,
        LookupAnswer::Absent(_) => panic!("{a} should be present"),
    }
}

#[tokio::test]
async fn lookup_proof_of_the_latest_version_verifies() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    let alice = entry(1, EntryState::Published, b"alice key 1");
    let bob = entry(1, EntryState::Published, b"bob key 1");
    dir.publish(&[
        (addr("alice@example.net"), alice.clone()),
        (addr("bob@example.net"), bob.clone()),
    ])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    h.verify(&signer.public_key()).unwrap();

    let got = verify_lookup(
        &h.head,
        &addr("alice@example.net"),
        lookup_proof(&dir, &addr("alice@example.net")).await,
    )
    .unwrap();
    assert_eq!(got, alice);
    assert!(got.commits_to_key(b"alice key 1"));
    assert!(!got.commits_to_key(b"mallory's key"));
    let got = verify_lookup(
        &h.head,
        &addr("bob@example.net"),
        lookup_proof(&dir, &addr("bob@example.net")).await,
    )
    .unwrap();
    assert_eq!(got, bob);
}

#[tokio::test]
async fn a_proof_for_one_address_does_not_verify_for_another() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    dir.publish(&[
        (
            addr("alice@example.net"),
            entry(1, EntryState::Published, b"a"),
        ),
        (
            addr("bob@example.net"),
            entry(1, EntryState::Published, b"b"),
        ),
    ])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    let proof = lookup_proof(&dir, &addr("alice@example.net")).await;
    let err = verify_lookup(&h.head, &addr("bob@example.net"), proof).unwrap_err();
    assert!(err.to_string().contains("bob@example.net"), "{err}");
}

#[tokio::test]
async fn a_substituted_value_fails_the_commitment() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    dir.publish(&[(
        addr("alice@example.net"),
        entry(1, EntryState::Published, b"real"),
    )])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    let mut proof = lookup_proof(&dir, &addr("alice@example.net")).await;
    proof.value = entry(1, EntryState::Published, b"forged").to_value();
    assert!(verify_lookup(&h.head, &addr("alice@example.net"), proof).is_err());
}

#[tokio::test]
async fn a_superseded_version_fails_against_the_newer_head() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    let alice = addr("alice@example.net");
    dir.publish(&[(alice.clone(), entry(1, EntryState::Published, b"old key"))])
        .await
        .unwrap();
    let head1 = head(&dir, &signer).await;
    let old_proof = lookup_proof(&dir, &alice).await;
    verify_lookup(&head1.head, &alice, old_proof.clone()).unwrap();

    dir.publish(&[(alice.clone(), entry(2, EntryState::Published, b"new key"))])
        .await
        .unwrap();
    let head2 = head(&dir, &signer).await;
    assert_eq!(head2.head.epoch, 2);
    // Served against the newer head, the old version's proof fails (its stale position is in
    // the tree now) ...
    let err = verify_lookup(&head2.head, &alice, old_proof).unwrap_err();
    assert!(err.to_string().contains("epoch 2"), "{err}");
    // ... and the current proof says version 2.
    let now = verify_lookup(&head2.head, &alice, lookup_proof(&dir, &alice).await).unwrap();
    assert_eq!(now.version, 2);
    assert!(now.commits_to_key(b"new key"));
}

#[tokio::test]
async fn a_pre_revocation_key_fails_once_the_revocation_is_committed() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    let alice = addr("alice@example.net");
    dir.publish(&[(alice.clone(), entry(1, EntryState::Published, b"key"))])
        .await
        .unwrap();
    let before = lookup_proof(&dir, &alice).await;
    // Unrelated epochs in between do not make the old proof fresh again.
    dir.publish(&[(
        addr("bob@example.net"),
        entry(1, EntryState::Published, b"b"),
    )])
    .await
    .unwrap();
    dir.publish(&[(
        alice.clone(),
        entry(2, EntryState::Revoked, b"key+revocation"),
    )])
    .await
    .unwrap();
    dir.publish(&[(
        addr("carol@example.net"),
        entry(1, EntryState::Published, b"c"),
    )])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    assert!(verify_lookup(&h.head, &alice, before).is_err());
    let now = verify_lookup(&h.head, &alice, lookup_proof(&dir, &alice).await).unwrap();
    assert_eq!(now.state, EntryState::Revoked);
    assert_eq!(now.version, 2);
}

#[tokio::test]
async fn a_deletion_is_the_latest_version() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    let alice = addr("alice@example.net");
    dir.publish(&[(alice.clone(), entry(1, EntryState::Published, b"key"))])
        .await
        .unwrap();
    dir.publish(&[(alice.clone(), DirectoryEntry::deleted(2, 1_700_000_100))])
        .await
        .unwrap();
    let h = head(&dir, &signer).await;
    let now = verify_lookup(&h.head, &alice, lookup_proof(&dir, &alice).await).unwrap();
    assert_eq!(now, DirectoryEntry::deleted(2, 1_700_000_100));
    assert!(!now.commits_to_key(b"key"));
}

#[tokio::test]
async fn absence_proofs_verify_for_unknown_addresses_only() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    dir.publish(&[
        (
            addr("alice@example.net"),
            entry(1, EntryState::Published, b"a"),
        ),
        (
            addr("bob@example.net"),
            entry(1, EntryState::Published, b"b"),
        ),
    ])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    let carol = addr("carol@example.net");
    let LookupAnswer::Absent(absent) = dir.lookup(&carol).await.unwrap() else {
        panic!("carol was never published");
    };
    verify_absence(&h.head, &carol, &absent).await.unwrap();
    // The same proof does not show that alice (present) or dave are absent: the VRF proof is
    // carol's.
    assert!(
        verify_absence(&h.head, &addr("alice@example.net"), &absent)
            .await
            .is_err()
    );
    assert!(
        verify_absence(&h.head, &addr("dave@example.net"), &absent)
            .await
            .is_err()
    );
    // A present address gets no absence proof.
    assert!(dir.absence(&addr("alice@example.net")).await.is_err());
    // Once carol is published, the old absence proof fails against the new head.
    dir.publish(&[(carol.clone(), entry(1, EntryState::Published, b"c"))])
        .await
        .unwrap();
    let h2 = head(&dir, &signer).await;
    let mut stale = absent.clone();
    stale.epoch = h2.head.epoch;
    stale.root_hash = h2.head.root_hash;
    assert!(verify_absence(&h2.head, &carol, &stale).await.is_err());
    assert!(verify_absence(&h2.head, &carol, &absent).await.is_err());
}

#[tokio::test]
async fn head_signatures_verify_and_tampering_fails() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    dir.publish(&[(
        addr("alice@example.net"),
        entry(1, EntryState::Published, b"a"),
    )])
    .await
    .unwrap();
    let h = head(&dir, &signer).await;
    let key = signer.public_key();
    h.verify(&key).unwrap();

    let mut t = h.clone();
    t.head.root_hash[0] ^= 1;
    assert!(t.verify(&key).is_err());
    let mut t = h.clone();
    t.head.epoch += 1;
    assert!(t.verify(&key).is_err());
    let mut t = h.clone();
    t.head.domain = "example.org".into();
    assert!(t.verify(&key).is_err());
    let mut t = h.clone();
    t.signature[10] ^= 0x80;
    assert!(t.verify(&key).is_err());
    assert!(h.verify(&HeadSigner::generate().public_key()).is_err());
    let mut t = h.clone();
    t.head.domain = "example.net\nepoch 9".into();
    assert!(t.verify(&key).is_err());

    // A witness's cosignature covers the signed head.
    let witness = HeadSigner::generate();
    let cosig = witness.cosign(&h, 1_700_000_500).unwrap();
    cosig.verify(&h).unwrap();
    let mut other = h.clone();
    other.head.signed_at += 1;
    assert!(cosig.verify(&other).is_err());
    let mut late = cosig.clone();
    late.checked_at += 1;
    assert!(late.verify(&h).is_err());
}

#[tokio::test]
async fn append_only_proofs_verify_and_a_rewritten_history_fails() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let honest = directory(&vrf).await;
    let forked = directory(&vrf).await;
    let alice = addr("alice@example.net");
    for dir in [&honest, &forked] {
        dir.publish(&[(alice.clone(), entry(1, EntryState::Published, b"alice"))])
            .await
            .unwrap();
    }
    let h1 = head(&honest, &signer).await;
    assert_eq!(h1, head(&forked, &signer).await);

    honest
        .publish(&[(
            addr("bob@example.net"),
            entry(1, EntryState::Published, b"bob"),
        )])
        .await
        .unwrap();
    let h2 = head(&honest, &signer).await;
    honest
        .publish(&[(alice.clone(), entry(2, EntryState::Published, b"alice 2"))])
        .await
        .unwrap();
    let h3 = head(&honest, &signer).await;

    // Step by step and over two epochs at once.
    let p12 = honest.audit(1, 2).await.unwrap();
    verify_append_only(&h1.head, &h2.head, &[], p12.clone())
        .await
        .unwrap();
    let p13 = honest.audit(1, 3).await.unwrap();
    verify_append_only(&h1.head, &h3.head, &[h2.head.root_hash], p13.clone())
        .await
        .unwrap();

    // The forked history replaces alice's key at epoch 2 instead (what a provider would do to
    // serve mallory's key to one requester).
    forked
        .publish(&[(alice.clone(), entry(2, EntryState::Published, b"mallory"))])
        .await
        .unwrap();
    let f2 = head(&forked, &signer).await;
    assert_ne!(f2.head.root_hash, h2.head.root_hash);
    // Two heads for one epoch: a fork.
    assert!(
        verify_append_only(&h2.head, &f2.head, &[], forked.audit(1, 2).await.unwrap())
            .await
            .is_err()
    );
    // The honest proof does not lead to the forked root, nor the forked one to the honest.
    assert!(
        verify_append_only(&h1.head, &f2.head, &[], p12.clone())
            .await
            .is_err()
    );
    assert!(
        verify_append_only(&h1.head, &h3.head, &[f2.head.root_hash], p13)
            .await
            .is_err()
    );
    // A proof for the wrong epochs is rejected before akd runs.
    assert!(
        verify_append_only(&h2.head, &h3.head, &[], p12)
            .await
            .is_err()
    );
    // A head of another domain key or going backwards.
    assert!(
        verify_append_only(&h3.head, &h1.head, &[], honest.audit(1, 3).await.unwrap())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn proofs_survive_the_wire_format() {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    let alice = addr("alice@example.net");
    let mut batch = Vec::new();
    for i in 0..200u64 {
        batch.push((
            addr(&format!("user{i}@example.net")),
            entry(1, EntryState::Published, &i.to_be_bytes()),
        ));
    }
    dir.publish(&batch).await.unwrap();
    dir.publish(&[(alice.clone(), entry(1, EntryState::Published, b"alice"))])
        .await
        .unwrap();
    let h = head(&dir, &signer).await;

    let bytes = wire::encode_lookup(&lookup_proof(&dir, &alice).await).unwrap();
    let got = verify_lookup(&h.head, &alice, wire::decode_lookup(&bytes).unwrap()).unwrap();
    assert!(got.commits_to_key(b"alice"));

    let carol = addr("carol@example.net");
    let LookupAnswer::Absent(absent) = dir.lookup(&carol).await.unwrap() else {
        panic!("carol was never published");
    };
    let abytes = wire::encode_absence(&absent).unwrap();
    assert_eq!(wire::decode_absence(&abytes).unwrap(), *absent);
    verify_absence(&h.head, &carol, &wire::decode_absence(&abytes).unwrap())
        .await
        .unwrap();

    let audit = wire::encode_audit(&dir.audit(1, 2).await.unwrap()).unwrap();
    let h1 = signer
        .sign(Head {
            epoch: 1,
            root_hash: first_root(&vrf, &batch).await,
            ..h.head.clone()
        })
        .unwrap();
    verify_append_only(&h1.head, &h.head, &[], wire::decode_audit(&audit).unwrap())
        .await
        .unwrap();
    eprintln!(
        "201 entries: lookup proof {} bytes, absence proof {} bytes, one-epoch audit proof {} bytes",
        bytes.len(),
        abytes.len(),
        audit.len()
    );

    // Garbage, truncation and oversize are errors, never panics.
    assert!(wire::decode_lookup(&bytes[..bytes.len() / 2]).is_err());
    assert!(wire::decode_absence(&abytes[..50]).is_err());
    assert!(wire::decode_absence(b"KSTA2").is_err());
    assert!(wire::decode_lookup(&vec![0xff; wire::MAX_LOOKUP_PROOF + 1]).is_err());
    assert!(wire::decode_audit(&[0x0a, 0xff, 0xff, 0xff]).is_err());
}

/// The root after publishing `batch` alone, from a second directory with the same VRF key.
async fn first_root(vrf: &VrfSecret, batch: &[(Address, DirectoryEntry)]) -> [u8; 32] {
    let dir = directory(vrf).await;
    dir.publish(batch).await.unwrap().1
}

#[test]
fn entries_round_trip_and_reject_other_bytes() {
    for e in [
        entry(3, EntryState::Published, b"k"),
        entry(4, EntryState::Revoked, b"k"),
        DirectoryEntry::deleted(5, 9),
    ] {
        assert_eq!(DirectoryEntry::from_value(&e.to_value()).unwrap(), e);
    }
    let mut v = entry(3, EntryState::Published, b"k").to_value();
    v.0.push(0);
    assert!(DirectoryEntry::from_value(&v).is_err());
    let mut v = DirectoryEntry::deleted(5, 9).to_value();
    v.0.push(0);
    assert!(DirectoryEntry::from_value(&v).is_err());
    for n in 0..v.0.len() - 1 {
        let mut t = v.clone();
        t.0.truncate(n);
        assert!(DirectoryEntry::from_value(&t).is_err());
    }
    let mut v = DirectoryEntry::deleted(5, 9).to_value();
    v.0[5] = 9;
    assert!(DirectoryEntry::from_value(&v).is_err());
}

#[test]
fn log_key_files_round_trip_and_say_what_is_wrong() {
    let keys = LogKeys::generate(DOMAIN);
    let text = keys.to_file();
    let back = LogKeys::parse(&text).unwrap();
    assert_eq!(back.domain, DOMAIN);
    assert_eq!(back.head.public_key(), keys.head.public_key());
    assert_eq!(
        back.vrf.public_key().unwrap(),
        keys.vrf.public_key().unwrap()
    );

    let err = LogKeys::parse(&text.replace("vrf-key", "vrf-kee")).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    let err = LogKeys::parse("domain: x\nhead-key: 00\nvrf-key: 00\n").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    let err = LogKeys::parse("domain: x\n").unwrap_err();
    assert!(err.to_string().contains("head-key"), "{err}");
    assert!(LogKeys::parse(&"#".repeat(5000)).is_err());
}
