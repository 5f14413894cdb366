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

/// A fresh VRF key, head signer and empty directory on that VRF key.
async fn fresh() -> (VrfSecret, HeadSigner, KeyDirectory<AsyncInMemoryDatabase>) {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let dir = directory(&vrf).await;
    (vrf, signer, dir)
}

/// Version 1, published, of `key` for `address`.
fn first(address: &str, key: &[u8]) -> (Address, DirectoryEntry) {
    (addr(address), entry(1, EntryState::Published, key))
}

/// alice@example.net (key "a") and bob@example.net (key "b"), each in version 1.
fn alice_and_bob() -> [(Address, DirectoryEntry); 2] {
    [
        first("alice@example.net", b"a"),
        first("bob@example.net", b"b"),
    ]
}

/// Publishes `batch` as one epoch.
async fn publish(dir: &KeyDirectory<AsyncInMemoryDatabase>, batch: &[(Address, DirectoryEntry)]) {
    dir.publish(batch).await.unwrap();
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
    let (_, signer, dir) = fresh().await;
    let alice = entry(1, EntryState::Published, b"alice key 1");
    let bob = entry(1, EntryState::Published, b"bob key 1");
    publish(
        &dir,
        &[
            (addr("alice@example.net"), alice.clone()),
            (addr("bob@example.net"), bob.clone()),
        ],
    )
    .await;
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
    let (_, signer, dir) = fresh().await;
    publish(&dir, &alice_and_bob()).await;
    let h = head(&dir, &signer).await;
    let proof = lookup_proof(&dir, &addr("alice@example.net")).await;
    let err = verify_lookup(&h.head, &addr("bob@example.net"), proof).unwrap_err();
    assert!(err.to_string().contains("bob@example.net"), "{err}");
}

#[tokio::test]
async fn a_substituted_value_fails_the_commitment() {
    let (_, signer, dir) = fresh().await;
    publish(&dir, &[first("alice@example.net", b"real")]).await;
    let h = head(&dir, &signer).await;
    let mut proof = lookup_proof(&dir, &addr("alice@example.net")).await;
    proof.value = entry(1, EntryState::Published, b"forged").to_value();
    assert!(verify_lookup(&h.head, &addr("alice@example.net"), proof).is_err());
}

#[tokio::test]
async fn a_superseded_version_fails_against_the_newer_head() {
    let (_, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    publish(
        &dir,
        &[(alice.clone(), entry(1, EntryState::Published, b"old key"))],
    )
    .await;
    let head1 = head(&dir, &signer).await;
    let old_proof = lookup_proof(&dir, &alice).await;
    verify_lookup(&head1.head, &alice, old_proof.clone()).unwrap();

    publish(
        &dir,
        &[(alice.clone(), entry(2, EntryState::Published, b"new key"))],
    )
    .await;
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
    let (_, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    publish(
        &dir,
        &[(alice.clone(), entry(1, EntryState::Published, b"key"))],
    )
    .await;
    let before = lookup_proof(&dir, &alice).await;
    // Unrelated epochs in between do not make the old proof fresh again.
    publish(&dir, &[first("bob@example.net", b"b")]).await;
    publish(
        &dir,
        &[(
            alice.clone(),
            entry(2, EntryState::Revoked, b"key+revocation"),
        )],
    )
    .await;
    publish(&dir, &[first("carol@example.net", b"c")]).await;
    let h = head(&dir, &signer).await;
    assert!(verify_lookup(&h.head, &alice, before).is_err());
    let now = verify_lookup(&h.head, &alice, lookup_proof(&dir, &alice).await).unwrap();
    assert_eq!(now.state, EntryState::Revoked);
    assert_eq!(now.version, 2);
}

#[tokio::test]
async fn a_deletion_is_the_latest_version() {
    let (_, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    publish(
        &dir,
        &[(alice.clone(), entry(1, EntryState::Published, b"key"))],
    )
    .await;
    publish(
        &dir,
        &[(alice.clone(), DirectoryEntry::deleted(2, 1_700_000_100))],
    )
    .await;
    let h = head(&dir, &signer).await;
    let now = verify_lookup(&h.head, &alice, lookup_proof(&dir, &alice).await).unwrap();
    assert_eq!(now, DirectoryEntry::deleted(2, 1_700_000_100));
    assert!(!now.commits_to_key(b"key"));
}

/// A fresh directory (epoch 0, akd's empty tree, before the domain's first publication)
/// proves every address absent: a version 3 retrieval of a new KST's domain is "not found",
/// not an attack. Before: akd's non-membership verifier refused the empty tree's proof
/// (`lcp_hash != longest_prefix_hash`), so every such retrieval was exit 5.
#[tokio::test]
async fn an_empty_directory_proves_every_address_absent() {
    let (_, signer, dir) = fresh().await;
    let h = head(&dir, &signer).await;
    assert_eq!(h.head.epoch, 0);
    let carol = addr("carol@example.net");
    let LookupAnswer::Absent(absent) = dir.lookup(&carol).await.unwrap() else {
        panic!("nothing was ever published");
    };
    let absent = wire::decode_absence(&wire::encode_absence(&absent).unwrap()).unwrap();
    verify_absence(&h.head, &carol, &absent).await.unwrap();
    // Still carol's proof only: the VRF proof names her position.
    assert!(
        verify_absence(&h.head, &addr("dave@example.net"), &absent)
            .await
            .is_err()
    );
    // Against the head of epoch 1 (alice and bob published) it proves nothing.
    publish(&dir, &alice_and_bob()).await;
    let h1 = head(&dir, &signer).await;
    assert!(verify_absence(&h1.head, &carol, &absent).await.is_err());
    let mut moved = absent.clone();
    moved.epoch = h1.head.epoch;
    moved.root_hash = h1.head.root_hash;
    assert!(verify_absence(&h1.head, &carol, &moved).await.is_err());
    // An epoch-0 head naming another root (not the empty tree's) gets no pass either.
    let mut other = h.head.clone();
    other.root_hash = h1.head.root_hash;
    let mut claimed = absent.clone();
    claimed.root_hash = other.root_hash;
    assert!(verify_absence(&other, &carol, &claimed).await.is_err());
}

#[tokio::test]
async fn absence_proofs_verify_for_unknown_addresses_only() {
    let (_, signer, dir) = fresh().await;
    publish(&dir, &alice_and_bob()).await;
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
    publish(
        &dir,
        &[(carol.clone(), entry(1, EntryState::Published, b"c"))],
    )
    .await;
    let h2 = head(&dir, &signer).await;
    let mut stale = absent.clone();
    stale.epoch = h2.head.epoch;
    stale.root_hash = h2.head.root_hash;
    assert!(verify_absence(&h2.head, &carol, &stale).await.is_err());
    assert!(verify_absence(&h2.head, &carol, &absent).await.is_err());
}

#[tokio::test]
async fn head_signatures_verify_and_tampering_fails() {
    let (_, signer, dir) = fresh().await;
    publish(&dir, &[first("alice@example.net", b"a")]).await;
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
        publish(
            dir,
            &[(alice.clone(), entry(1, EntryState::Published, b"alice"))],
        )
        .await;
    }
    let h1 = head(&honest, &signer).await;
    assert_eq!(h1, head(&forked, &signer).await);

    publish(&honest, &[first("bob@example.net", b"bob")]).await;
    let h2 = head(&honest, &signer).await;
    publish(
        &honest,
        &[(alice.clone(), entry(2, EntryState::Published, b"alice 2"))],
    )
    .await;
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
    publish(
        &forked,
        &[(alice.clone(), entry(2, EntryState::Published, b"mallory"))],
    )
    .await;
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
    let (vrf, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    let mut batch = Vec::new();
    for i in 0..200u64 {
        batch.push((
            addr(&format!("user{i}@example.net")),
            entry(1, EntryState::Published, &i.to_be_bytes()),
        ));
    }
    dir.publish(&batch).await.unwrap();
    publish(
        &dir,
        &[(alice.clone(), entry(1, EntryState::Published, b"alice"))],
    )
    .await;
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

/// Epochs 1 to 3 of a fresh directory: the directory, its signer and the three heads.
async fn three_epochs() -> (
    KeyDirectory<AsyncInMemoryDatabase>,
    HeadSigner,
    [SignedHead; 3],
) {
    let (_, signer, dir) = fresh().await;
    publish(&dir, &alice_and_bob()).await;
    let h1 = head(&dir, &signer).await;
    publish(&dir, &[first("carol@example.net", b"c")]).await;
    let h2 = head(&dir, &signer).await;
    publish(&dir, &[first("dave@example.net", b"d")]).await;
    let h3 = head(&dir, &signer).await;
    (dir, signer, [h1, h2, h3])
}

#[tokio::test]
async fn audit_answers_verify_and_forgeries_fail() {
    use super::witness::AuditAnswer;

    let (dir, signer, [h1, h2, h3]) = three_epochs().await;
    let key = signer.public_key();
    let good = AuditAnswer {
        domain: DOMAIN.into(),
        vrf_public_key: h1.head.vrf_public_key,
        heads: vec![h1.clone(), h2.clone(), h3.clone()],
        proof: Some(wire::encode_audit(&dir.audit(1, 3).await.unwrap()).unwrap()),
    };
    assert_eq!(good.verify(&key).await.unwrap(), &h3);
    assert_eq!(AuditAnswer::parse(&good.to_text().unwrap()).unwrap(), good);
    let one = AuditAnswer {
        heads: vec![h2.clone()],
        proof: None,
        ..good.clone()
    };
    assert_eq!(one.verify(&key).await.unwrap(), &h2, "a range of one epoch");

    let other_key = HeadSigner::generate().public_key();
    assert!(
        good.verify(&other_key).await.is_err(),
        "heads signed by another key"
    );
    let mut gap = good.clone();
    gap.heads.remove(1);
    assert!(gap.verify(&key).await.is_err(), "an epoch left out");
    // The log lies about the middle root (and signs the lie): the proof does not pass it.
    let mut lie = good.clone();
    lie.heads[1] = signer
        .sign(Head {
            root_hash: [9; 32],
            ..h2.head.clone()
        })
        .unwrap();
    assert!(lie.verify(&key).await.is_err(), "a rewritten middle root");
    let mut short = good.clone();
    short.proof = Some(wire::encode_audit(&dir.audit(1, 2).await.unwrap()).unwrap());
    assert!(
        short.verify(&key).await.is_err(),
        "the proof of another range"
    );
    let mut none = good.clone();
    none.proof = None;
    assert!(
        none.verify(&key).await.is_err(),
        "three heads without a proof"
    );
    let mut junk = good.clone();
    junk.proof = Some(b"not a proof".to_vec());
    assert!(
        junk.verify(&key).await.is_err(),
        "a proof that does not decode"
    );
    let empty = AuditAnswer {
        heads: Vec::new(),
        proof: None,
        ..good.clone()
    };
    assert!(empty.verify(&key).await.is_err(), "no head at all");

    // Hostile texts are refused, never a panic.
    let text = good.to_text().unwrap();
    for bad in [
        String::new(),
        "kst-log-audit-v1\n".into(),
        text.replace("head 2 ", "head x "),
        text.replace("\nproof ", "\nproof !"),
        format!("{text}trailing\n"),
        text[..text.len() / 2].to_string(),
        text.replacen("head 1 ", "head 1 \u{e9}", 1),
        "x".repeat(super::witness::MAX_AUDIT_TEXT + 1),
    ] {
        assert!(AuditAnswer::parse(&bad).is_err(), "{bad:.80}");
    }
}

#[tokio::test]
async fn witnessed_parts_need_the_required_fresh_cosignatures() {
    use super::witness::{AuditAnswer, WitnessPolicy, Witnessed};

    let (dir, signer, [h1, h2, h3]) = three_epochs().await;
    let key = signer.public_key();
    let (w1, w2, stranger) = (
        HeadSigner::generate(),
        HeadSigner::generate(),
        HeadSigner::generate(),
    );
    let audit = AuditAnswer {
        domain: DOMAIN.into(),
        vrf_public_key: h1.head.vrf_public_key,
        heads: vec![h1.clone(), h2.clone(), h3.clone()],
        proof: Some(wire::encode_audit(&dir.audit(1, 3).await.unwrap()).unwrap()),
    };
    let witnessed = Witnessed {
        cosignatures: vec![
            (1, w1.cosign(&h1, 100).unwrap()),
            (2, w2.cosign(&h2, 100).unwrap()),
        ],
        audit,
    };
    let policy = |keys: &[&HeadSigner], threshold: usize, not_before: u64| WitnessPolicy {
        witnesses: keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("w{i}"), k.public_key()))
            .collect(),
        threshold,
        not_before,
    };
    assert_eq!(
        witnessed
            .verify(&h3, &key, &policy(&[&w1, &w2], 2, 50))
            .await
            .unwrap(),
        vec!["w0".to_string(), "w1".to_string()]
    );
    let lines = witnessed.to_lines().unwrap();
    assert_eq!(
        Witnessed::parse_lines(&h3, lines.lines()).unwrap(),
        witnessed,
        "the lines round trip"
    );

    let refused = [
        (
            policy(&[&w1, &stranger], 2, 50),
            &h3,
            "a required witness did not cosign",
        ),
        (
            policy(&[&w1], 1, 150),
            &h3,
            "the cosignature is older than allowed",
        ),
        (
            policy(&[&w1], 1, 50),
            &h2,
            "the heads do not lead to the answer's head",
        ),
        (
            policy(&[&w1, &w1], 2, 50),
            &h3,
            "one witness listed twice counts once",
        ),
    ];
    for (p, head, what) in refused {
        assert!(witnessed.verify(head, &key, &p).await.is_err(), "{what}");
    }
    assert!(
        witnessed
            .verify(&h3, &key, &policy(&[&w1, &stranger], 1, 50))
            .await
            .is_ok(),
        "one of two"
    );

    // A cosignature of epoch 1 claimed for epoch 2, one of a head outside the answer's heads,
    // and one of a head the log did not sign that way, count for nothing.
    for cosignatures in [
        vec![(2, w1.cosign(&h1, 100).unwrap())],
        vec![(7, w1.cosign(&h1, 100).unwrap())],
        vec![(
            1,
            w1.cosign(
                &signer
                    .sign(Head {
                        signed_at: 5,
                        ..h1.head.clone()
                    })
                    .unwrap(),
                100,
            )
            .unwrap(),
        )],
    ] {
        let forged = Witnessed {
            cosignatures,
            ..witnessed.clone()
        };
        assert!(
            forged
                .verify(&h3, &key, &policy(&[&w1], 1, 50))
                .await
                .is_err(),
            "{forged:?}"
        );
    }
}

/// Red-team round 5: `Witnessed::verify` checked the first `cosigned` line of each witness,
/// the client's restart check (`remembered_head_cosigned`) any line of that witness at or
/// after the remembered epoch: two readings of one answer. A second line of a witness is
/// refused when the answer is parsed, in the witnesses' part and in a head's cosignatures.
#[tokio::test]
async fn duplicate_witness_lines_are_refused() {
    use super::answer::{AnswerProof, LogAnswer};
    use super::witness::{
        AuditAnswer, Witnessed, head_with_cosignatures_text, parse_head_with_cosignatures,
    };

    let (dir, _, [h1, h2, h3]) = three_epochs().await;
    let (w1, w2) = (HeadSigner::generate(), HeadSigner::generate());
    let witnessed = Witnessed {
        cosignatures: vec![
            (1, w1.cosign(&h1, 100).unwrap()),
            (2, w2.cosign(&h2, 100).unwrap()),
        ],
        audit: AuditAnswer {
            domain: DOMAIN.into(),
            vrf_public_key: h1.head.vrf_public_key,
            heads: vec![h1.clone(), h2.clone(), h3.clone()],
            proof: Some(wire::encode_audit(&dir.audit(1, 3).await.unwrap()).unwrap()),
        },
    };
    let lines = witnessed.to_lines().unwrap();
    assert!(Witnessed::parse_lines(&h3, lines.lines()).is_ok());
    // The crafted part: w1's line of epoch 1 first (what `verify` checked), then a second
    // line of w1 for epoch 3 (what the restart check would have taken).
    let second = w1.cosign(&h3, 200).unwrap().to_line();
    let second = second.replacen("cosignature ", "cosigned 3 ", 1);
    let crafted = lines.replacen("cosigned 2 ", &format!("{second}\ncosigned 2 "), 1);
    assert_eq!(crafted.matches("cosigned ").count(), 3, "{crafted}");
    let e = Witnessed::parse_lines(&h3, crafted.lines()).unwrap_err();
    assert!(e.to_string().contains("two cosignature lines"), "{e}");

    // The same inside a whole `kst-log-answer-v2` text: refused by the client's parser.
    let alice = addr("alice@example.net");
    let answer = LogAnswer {
        head: h3.clone(),
        proof: AnswerProof::Present(
            wire::encode_lookup(&lookup_proof(&dir, &alice).await).unwrap(),
        ),
        witnessed: Some(witnessed.clone()),
        append_only: None,
        too_far: None,
    };
    let text = answer.to_text().unwrap();
    assert!(LogAnswer::parse(&text).is_ok());
    let crafted_text = text.replacen(&lines, &crafted, 1);
    assert_ne!(crafted_text, text);
    assert!(LogAnswer::parse(&crafted_text).is_err(), "{crafted_text}");

    // A head with two cosignatures of one witness (`/head/<epoch>`, read by the restart check).
    let text = head_with_cosignatures_text(
        &h3,
        &[w1.cosign(&h3, 100).unwrap(), w1.cosign(&h3, 300).unwrap()],
    )
    .unwrap();
    let e = parse_head_with_cosignatures(&text).unwrap_err();
    assert!(e.to_string().contains("two cosignature lines"), "{e}");
}

#[test]
fn cosignature_lines_and_head_texts_refuse_hostile_input() {
    use super::head::Cosignature;
    use super::witness::{
        head_with_cosignatures_text, parse_head_with_cosignatures, parse_witness,
    };

    let signer = HeadSigner::generate();
    let head = signer
        .sign(Head {
            domain: DOMAIN.into(),
            epoch: 4,
            root_hash: [1; 32],
            vrf_public_key: [2; 32],
            signed_at: 3,
        })
        .unwrap();
    let c = HeadSigner::generate().cosign(&head, 9).unwrap();
    assert_eq!(Cosignature::parse_line(&c.to_line()).unwrap(), c);
    let c2 = HeadSigner::generate().cosign(&head, 10).unwrap();
    let text = head_with_cosignatures_text(&head, &[c.clone(), c2.clone()]).unwrap();
    assert_eq!(
        parse_head_with_cosignatures(&text).unwrap(),
        (head.clone(), vec![c.clone(), c2.clone()])
    );
    let line = c.to_line();
    for bad in [
        "",
        "cosignature",
        &line[..line.len() - 1],
        &format!("{line} extra"),
        &line.replace("cosignature ", "cosignature  "),
        &line.replacen(' ', " \u{e9}", 2),
    ] {
        assert!(Cosignature::parse_line(bad).is_err(), "{bad:?}");
    }
    let many = head_with_cosignatures_text(&head, &vec![c.clone(); 40]).unwrap();
    for bad in [
        String::new(),
        text.replace("kst-log-head-v1", "kst-log-head-v9"),
        text[..40].to_string(),
        format!("{text}junk\n"),
        many,
        text.replacen("epoch 4", "epoch \u{e9}", 1),
        head_with_cosignatures_text(&head, &[c.clone(), c2.clone(), c.clone()]).unwrap(),
    ] {
        assert!(parse_head_with_cosignatures(&bad).is_err(), "{bad:.80}");
    }
    assert!(parse_witness(&format!("w:{}", "ab".repeat(32))).is_ok());
    for bad in [
        "",
        "w",
        ":00",
        "w:zz",
        "a b:00",
        &format!("{}:{}", "n".repeat(65), "ab".repeat(32)),
    ] {
        assert!(parse_witness(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn heads_that_go_back_or_fork_do_not_follow() {
    use super::witness::check_follows;

    let (_, _, [h1, h2, h3]) = three_epochs().await;
    check_follows(&h1.head, &h3.head).unwrap();
    check_follows(&h2.head, &h2.head).unwrap();
    assert!(
        check_follows(&h3.head, &h1.head).is_err(),
        "an epoch going back"
    );
    let fork = Head {
        root_hash: [3; 32],
        ..h2.head.clone()
    };
    assert!(
        check_follows(&h2.head, &fork).is_err(),
        "two roots for one epoch"
    );
    let other = Head {
        vrf_public_key: [4; 32],
        ..h3.head.clone()
    };
    assert!(
        check_follows(&h1.head, &other).is_err(),
        "another directory"
    );
}

/// The answer of `dir` for `a` against `h`, with the append-only proof from epoch `since`.
async fn answer_since(
    dir: &KeyDirectory<AsyncInMemoryDatabase>,
    h: &SignedHead,
    a: &Address,
    since: Option<u64>,
) -> super::answer::LogAnswer {
    use super::answer::{AnswerProof, AppendOnlyFrom, LogAnswer};
    let append_only = match since {
        Some(from) if from < h.head.epoch => Some(AppendOnlyFrom {
            from,
            proof: wire::encode_audit(&dir.audit(from, h.head.epoch).await.unwrap()).unwrap(),
            step: None,
        }),
        _ => None,
    };
    let answer = LogAnswer {
        head: h.clone(),
        proof: AnswerProof::Present(wire::encode_lookup(&lookup_proof(dir, a).await).unwrap()),
        witnessed: None,
        append_only,
        too_far: None,
    };
    // Through the text and back, as a client receives it.
    LogAnswer::parse(&answer.to_text().unwrap()).unwrap()
}

/// Publishes `PREFIX<i>@example.net` for each `i` of `each`, one epoch each.
async fn publish_each(
    dir: &KeyDirectory<AsyncInMemoryDatabase>,
    prefix: &str,
    each: std::ops::Range<u64>,
) {
    for i in each {
        publish(
            dir,
            &[first(&format!("{prefix}{i}@example.net"), &i.to_be_bytes())],
        )
        .await;
    }
}

/// Two directories with the same keys and the same epoch 1 (alice's key): the honest one and
/// one to fork; the signer, alice, and the head of epoch 1.
async fn twins() -> (
    HeadSigner,
    KeyDirectory<AsyncInMemoryDatabase>,
    KeyDirectory<AsyncInMemoryDatabase>,
    Address,
    SignedHead,
) {
    let (vrf, signer) = (VrfSecret::generate(), HeadSigner::generate());
    let honest = directory(&vrf).await;
    let forked = directory(&vrf).await;
    for dir in [&honest, &forked] {
        publish(dir, &[first("alice@example.net", b"alice")]).await;
    }
    let h1 = head(&honest, &signer).await;
    (signer, honest, forked, addr("alice@example.net"), h1)
}

#[tokio::test]
async fn a_remembered_head_catches_forks_and_rollbacks_without_intermediate_roots() {
    let (signer, honest, forked, alice, h1) = twins().await;
    publish_each(&honest, "user", 0..3).await;
    let h4 = head(&honest, &signer).await;
    assert_eq!(h4.head.epoch, 4);

    // Three epochs at once: the client holds only the heads of epochs 1 and 4; the
    // intermediate roots come out of the proof.
    let a = answer_since(&honest, &h4, &alice, Some(1)).await;
    let started = std::time::Instant::now();
    a.verify_extends(&h1.head).await.unwrap();
    eprintln!(
        "append-only proof over 3 epochs (1 insertion each, 5 entries): {} bytes, answer text {} \
         bytes, verified (roots derived from the proof) in {:?}",
        a.append_only.as_ref().map_or(0, |x| x.proof.len()),
        a.to_text().unwrap().len(),
        started.elapsed()
    );
    let roots = super::verify::append_only_roots(&honest.audit(1, 4).await.unwrap())
        .await
        .unwrap();
    assert_eq!(roots.len(), 3);
    assert_eq!(roots[2], h4.head.root_hash);
    // The same head again, and the remembered one itself: nothing to prove.
    answer_since(&honest, &h4, &alice, None)
        .await
        .verify_extends(&h4.head)
        .await
        .unwrap();
    // A newer head without the proof, or with one from another epoch: refused.
    let e = answer_since(&honest, &h4, &alice, None)
        .await
        .verify_extends(&h1.head)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no append-only proof"), "{e}");
    let h2_like = Head {
        epoch: 2,
        ..h1.head.clone()
    };
    assert!(a.verify_extends(&h2_like).await.is_err());
    // A rollback: the remembered head is newer than the answer's.
    let old = answer_since(&honest, &h1, &alice, None).await;
    let e = old.verify_extends(&h4.head).await.unwrap_err();
    assert!(e.to_string().contains("older"), "{e}");

    // The fork: the same keys, another history from epoch 2 on (mallory's key for alice).
    publish(
        &forked,
        &[(alice.clone(), entry(2, EntryState::Published, b"mallory"))],
    )
    .await;
    let f2 = head(&forked, &signer).await;
    let fa = answer_since(&forked, &f2, &alice, Some(1)).await;
    // From epoch 1 the fork is append-only (it is another continuation) ...
    fa.verify_extends(&h1.head).await.unwrap();
    // ... but a client that saw the honest epoch 2 or later catches it.
    let honest2 = Head {
        epoch: 2,
        root_hash: roots[0],
        ..h4.head.clone()
    };
    let e = fa.verify_extends(&honest2).await.unwrap_err();
    assert!(e.to_string().contains("fork"), "{e}");
    publish_each(&forked, "other", 0..3).await;
    let f5 = head(&forked, &signer).await;
    let fa = answer_since(&forked, &f5, &alice, Some(4)).await;
    assert!(fa.verify_extends(&h4.head).await.is_err());
    // A forged proof: the honest proof spliced onto the forked head.
    let mut spliced = answer_since(&honest, &h4, &alice, Some(1)).await;
    spliced.head = f5.clone();
    assert!(spliced.verify_extends(&h1.head).await.is_err());
    // Garbage in the append-only line is an error, not a panic.
    let text = a.to_text().unwrap();
    let broken = text.replace("append-only 1 ", "append-only x ");
    assert!(super::answer::LogAnswer::parse(&broken).is_err());
    let truncated = format!("{}\n", &text[..text.len() - 40]);
    if let Ok(t) = super::answer::LogAnswer::parse(&truncated) {
        assert!(t.verify_extends(&h1.head).await.is_err());
    }
}

/// Protocol version 3: a reply to a request that named epoch 1 arrives after the client
/// remembered epoch 2 (another reply); its proof from 1 to 4 must lead through the
/// remembered root of epoch 2. A fork that shares epoch 1 but not epoch 2 is caught.
#[tokio::test]
async fn a_reply_to_an_older_request_must_lead_through_the_newer_remembered_head() {
    let (signer, honest, forked, alice, h1) = twins().await;
    publish_each(&honest, "user", 0..1).await;
    let h2 = head(&honest, &signer).await;
    publish_each(&honest, "user", 1..3).await;
    let h4 = head(&honest, &signer).await;

    // Asked from 1, remembered 2 meanwhile, answered at 4: accepted.
    let a = answer_since(&honest, &h4, &alice, Some(1)).await;
    a.verify_extends_via(Some(&h1.head), &h2.head)
        .await
        .unwrap();
    // Without the asked head the proof starts at the wrong epoch.
    assert!(a.verify_extends(&h2.head).await.is_err());
    // Asked from the remembered head itself: the plain check.
    answer_since(&honest, &h4, &alice, Some(2))
        .await
        .verify_extends_via(Some(&h2.head), &h2.head)
        .await
        .unwrap();
    // A remembered head of epoch 2 with another root (the client saw a fork of epoch 2, or
    // this answer is one): refused.
    let other2 = Head {
        root_hash: [7; 32],
        ..h2.head.clone()
    };
    let e = a
        .verify_extends_via(Some(&h1.head), &other2)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fork"), "{e}");
    // An answer not newer than the remembered head gets no pass from the asked one.
    let old = answer_since(&honest, &h2, &alice, Some(1)).await;
    old.verify_extends_via(Some(&h1.head), &h4.head)
        .await
        .unwrap_err();

    // The fork: the same epoch 1, mallory's key for alice at epoch 2, more epochs; its proof
    // from 1 verifies from 1 but does not pass through the honest root of epoch 2.
    publish(
        &forked,
        &[(alice.clone(), entry(2, EntryState::Published, b"mallory"))],
    )
    .await;
    publish_each(&forked, "other", 0..2).await;
    let f4 = head(&forked, &signer).await;
    let fa = answer_since(&forked, &f4, &alice, Some(1)).await;
    fa.verify_extends(&h1.head).await.unwrap();
    let e = fa
        .verify_extends_via(Some(&h1.head), &h2.head)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fork"), "{e}");
}

#[tokio::test]
async fn the_history_proof_lists_every_version_and_refuses_another_head() {
    use super::history::HistoryAnswer;
    let (_, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    publish(&dir, &[first("alice@example.net", b"alice")]).await;
    publish(&dir, &[first("bob@example.net", b"bob")]).await;
    publish(
        &dir,
        &[(alice.clone(), entry(2, EntryState::Published, b"insider"))],
    )
    .await;
    publish(
        &dir,
        &[(alice.clone(), entry(3, EntryState::Published, b"alice"))],
    )
    .await;
    let h = head(&dir, &signer).await;
    let (proof, epoch, root) = dir.history(&alice).await.unwrap().unwrap();
    assert_eq!((epoch, root), (h.head.epoch, h.head.root_hash));
    let answer = HistoryAnswer {
        head: h.clone(),
        proof: wire::encode_history(&proof).unwrap(),
    };
    let answer = HistoryAnswer::parse(&answer.to_text().unwrap()).unwrap();
    let versions = answer.verify(&signer.public_key(), &alice).unwrap();
    let seen: Vec<(u64, u64, bool)> = versions
        .iter()
        .map(|v| {
            let e = v.entry.as_ref().unwrap();
            (v.epoch, v.akd_version, e.commits_to_key(b"insider"))
        })
        .collect();
    assert_eq!(seen, vec![(4, 3, false), (3, 2, true), (1, 1, false)]);
    assert!(
        dir.history(&addr("carol@example.net"))
            .await
            .unwrap()
            .is_none()
    );
    // Another address's proof, another head key, a head with another root: refused.
    assert!(
        answer
            .verify(&signer.public_key(), &addr("bob@example.net"))
            .is_err()
    );
    assert!(
        answer
            .verify(&HeadSigner::generate().public_key(), &alice)
            .is_err()
    );
    let mut stale = answer.clone();
    stale.head = signer
        .sign(Head {
            root_hash: [7; 32],
            ..h.head.clone()
        })
        .unwrap();
    assert!(stale.verify(&signer.public_key(), &alice).is_err());
    assert!(HistoryAnswer::parse("kst-log-history-v1\n").is_err());
}

/// The pages of older versions (`HistoryPage`): 70 versions of alice, the newest 64 in akd's
/// history proof, the 6 below in one page whose every version verifies; a page missing a
/// version, holding another value, against another head, dated after the version above it,
/// or for another address is refused.
#[tokio::test]
async fn history_pages_prove_every_older_version_and_refuse_gaps() {
    use super::history::{HistoryAnswer, HistoryPage, MAX_VERSIONS};
    let (_, signer, dir) = fresh().await;
    let alice = addr("alice@example.net");
    let key = |v: u64| {
        if v == 2 {
            b"insider".to_vec()
        } else {
            b"alice".to_vec()
        }
    };
    for v in 1..=70u64 {
        publish(
            &dir,
            &[(alice.clone(), entry(v, EntryState::Published, &key(v)))],
        )
        .await;
    }
    publish(&dir, &[first("bob@example.net", b"bob")]).await;
    let h = head(&dir, &signer).await;
    let (proof, ..) = dir.history(&alice).await.unwrap().unwrap();
    let newest = HistoryAnswer {
        head: h.clone(),
        proof: wire::encode_history(&proof).unwrap(),
    }
    .verify(&signer.public_key(), &alice)
    .unwrap();
    assert_eq!(newest.len(), MAX_VERSIONS);
    let oldest = newest.last().unwrap();
    assert_eq!((oldest.akd_version, oldest.epoch), (7, 7));

    let super::directory::PageProof {
        proof,
        epoch,
        root,
        newest_finds_no_key,
        newest_withdrawn,
    } = dir.history_before(&alice, 7).await.unwrap().unwrap();
    assert_eq!((epoch, root), (h.head.epoch, h.head.root_hash));
    assert!(!newest_finds_no_key, "alice's newest version holds her key");
    assert!(!newest_withdrawn, "alice's newest version is not withdrawn");
    let page = HistoryPage {
        head: h.clone(),
        before: 7,
        proof: wire::encode_history(&proof).unwrap(),
    };
    let page = HistoryPage::parse(&page.to_text().unwrap()).unwrap();
    let older = page
        .verify(&signer.public_key(), &alice, 7, 7)
        .await
        .unwrap();
    let seen: Vec<(u64, bool)> = older
        .iter()
        .map(|v| {
            (
                v.akd_version,
                v.entry.as_ref().unwrap().commits_to_key(b"insider"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (6, false),
            (5, false),
            (4, false),
            (3, false),
            (2, true),
            (1, false)
        ]
    );
    assert!(dir.history_before(&alice, 1).await.unwrap().is_none());
    assert!(
        dir.history_before(&addr("carol@example.net"), 5)
            .await
            .unwrap()
            .is_none()
    );

    let refused = async |page: &HistoryPage, what: &str| {
        assert!(
            page.verify(&signer.public_key(), &alice, 7, 7)
                .await
                .is_err(),
            "{what} must be refused"
        );
    };
    // A version left out (the insider's), or one more than asked.
    let mut gap = proof.clone();
    gap.update_proofs.remove(4);
    let with = |p: &akd::HistoryProof| HistoryPage {
        proof: wire::encode_history(p).unwrap(),
        ..page.clone()
    };
    refused(&with(&gap), "a page without version 2").await;
    let mut short = proof.clone();
    short.update_proofs.pop();
    refused(&with(&short), "a page that stops before version 1").await;
    // Another value for a version (the insider's key replaced by alice's).
    let mut swapped = proof.clone();
    swapped.update_proofs[4].value = swapped.update_proofs[3].value.clone();
    refused(&with(&swapped), "a page with another value").await;
    // A version dated after the version above it.
    let mut late = proof.clone();
    late.update_proofs[0].epoch = 8;
    refused(&with(&late), "a page dated after the version above it").await;
    // Another head (root), another address, another `before`.
    let mut other = page.clone();
    other.head = signer
        .sign(Head {
            root_hash: [7; 32],
            ..h.head.clone()
        })
        .unwrap();
    refused(&other, "a page against another root").await;
    assert!(
        page.verify(&signer.public_key(), &addr("bob@example.net"), 7, 7)
            .await
            .is_err()
    );
    assert!(
        page.verify(&signer.public_key(), &alice, 8, 8)
            .await
            .is_err()
    );
    assert!(HistoryPage::parse("kst-log-history-page-v1\n").is_err());
}

/// The server counts an append-only step before it builds it (`audit_step_count`): the
/// count is exactly the elements akd's proof of that step holds, for every epoch, with a
/// cap that stops the walk; a step of an old epoch grows as later epochs split its subtrees.
#[tokio::test]
async fn an_append_only_step_is_counted_exactly_before_it_is_built() {
    let (_, _, dir) = fresh().await;
    for e in 0..6u64 {
        let batch: Vec<_> = (0..(1 + 7 * (e % 3)))
            .map(|i| first(&format!("u{e}-{i}@example.net"), &[e as u8, i as u8]))
            .collect();
        publish(&dir, &batch).await;
    }
    let (latest, _) = dir.current().await.unwrap();
    assert_eq!(latest, 6);
    let mut sizes = Vec::new();
    for epoch in 0..latest {
        let proof = dir.audit(epoch, epoch + 1).await.unwrap();
        let step = &proof.proofs[0];
        let count = dir
            .audit_step_count(epoch, usize::MAX / 8)
            .await
            .unwrap()
            .expect("no cap");
        assert_eq!(
            (count.unchanged, count.inserted),
            (step.unchanged_nodes.len(), step.inserted.len()),
            "step {epoch} -> {}",
            epoch + 1
        );
        // Just under the count: over the cap, the walk stops.
        if count.elements() > 0 {
            assert_eq!(
                dir.audit_step_count(epoch, count.elements() - 1)
                    .await
                    .unwrap(),
                None
            );
        }
        sizes.push(count.elements());
    }
    eprintln!("elements of each one-epoch step, built at epoch {latest}: {sizes:?}");
    assert!(dir.audit_step_count(latest, 10).await.is_err());
}

/// A stepped answer's text round trip, and what a client checks of a step: the step's head
/// is signed, of the answer's directory, between the remembered epoch and the answer's, and
/// the proof from exactly the remembered epoch reaches it; then the next step from there.
#[tokio::test]
async fn append_only_steps_verify_one_after_another_and_forgeries_fail() {
    use super::answer::{AnswerProof, AppendOnlyFrom, LogAnswer};
    let (signer, honest, forked, alice, h1) = twins().await;
    let mut heads = vec![h1.clone()];
    for i in 0..5 {
        publish_each(&honest, "user", i..i + 1).await;
        heads.push(head(&honest, &signer).await);
    }
    let h6 = heads[5].clone();
    assert_eq!(h6.head.epoch, 6);
    let lookup = wire::encode_lookup(&lookup_proof(&honest, &alice).await).unwrap();
    let stepped = |from: u64, proof: Vec<u8>, step: Option<SignedHead>| LogAnswer {
        head: h6.clone(),
        proof: AnswerProof::Present(lookup.clone()),
        witnessed: None,
        append_only: Some(AppendOnlyFrom { from, proof, step }),
        too_far: None,
    };
    let key = signer.public_key();
    // 1 -> 3 (a step), 3 -> 5 (a step), 5 -> 6 (the rest): each verified from the last.
    let mut remembered = h1.head.clone();
    for (from, to) in [(1u64, 3u64), (3, 5)] {
        let proof = wire::encode_audit(&honest.audit(from, to).await.unwrap()).unwrap();
        let answer = stepped(from, proof, Some(heads[to as usize - 1].clone()));
        let answer = LogAnswer::parse(&answer.to_text().unwrap()).unwrap();
        assert!(
            answer.verify_extends(&remembered).await.is_err(),
            "a step is not the proof to the answer's head"
        );
        let (head, roots) = answer
            .verify_step(&key, &remembered)
            .await
            .unwrap()
            .expect("a step");
        assert_eq!(head.head.epoch, to);
        assert_eq!(roots.last(), Some(&(to, head.head.root_hash)));
        assert_eq!(roots.len() as u64, to - from);
        remembered = head.head;
    }
    let rest = wire::encode_audit(&honest.audit(5, 6).await.unwrap()).unwrap();
    let last = LogAnswer::parse(&stepped(5, rest, None).to_text().unwrap()).unwrap();
    assert_eq!(last.verify_step(&key, &remembered).await.unwrap(), None);
    last.verify_extends(&remembered).await.unwrap();

    // Forgeries: a step from another epoch than the remembered one, a step head with another
    // root (its signature fails), one re-signed with another root (the proof fails), one
    // signed by another key, one not before the answer's epoch, one of the fork.
    let proof13 = wire::encode_audit(&honest.audit(1, 3).await.unwrap()).unwrap();
    let good = stepped(1, proof13.clone(), Some(heads[2].clone()));
    assert!(good.verify_step(&key, &heads[1].head).await.is_err());
    let mut bad_root = heads[2].clone();
    bad_root.head.root_hash = [9; 32];
    let e = stepped(1, proof13.clone(), Some(bad_root.clone()))
        .verify_step(&key, &h1.head)
        .await
        .unwrap_err();
    assert!(matches!(e, super::TransparencyError::Signature(_)), "{e}");
    let resigned = signer.sign(bad_root.head.clone()).unwrap();
    assert!(
        stepped(1, proof13.clone(), Some(resigned))
            .verify_step(&key, &h1.head)
            .await
            .is_err()
    );
    let other = HeadSigner::generate().sign(heads[2].head.clone()).unwrap();
    assert!(
        stepped(1, proof13.clone(), Some(other))
            .verify_step(&key, &h1.head)
            .await
            .is_err()
    );
    let proof16 = wire::encode_audit(&honest.audit(1, 6).await.unwrap()).unwrap();
    assert!(
        stepped(1, proof16, Some(h6.clone()))
            .verify_step(&key, &h1.head)
            .await
            .is_err(),
        "a step must end before the answer's epoch"
    );
    publish(
        &forked,
        &[(alice.clone(), entry(2, EntryState::Published, b"mallory"))],
    )
    .await;
    publish_each(&forked, "other", 0..1).await;
    let f3 = head(&forked, &signer).await;
    let fork13 = wire::encode_audit(&forked.audit(1, 3).await.unwrap()).unwrap();
    // The fork's step verifies from epoch 1 (another continuation)...
    stepped(1, fork13.clone(), Some(f3.clone()))
        .verify_step(&key, &h1.head)
        .await
        .unwrap();
    // ... but not spliced with the honest head of 3, nor the honest proof with the fork's head.
    assert!(
        stepped(1, fork13, Some(heads[2].clone()))
            .verify_step(&key, &h1.head)
            .await
            .is_err()
    );
    assert!(
        stepped(1, proof13, Some(f3))
            .verify_step(&key, &h1.head)
            .await
            .is_err()
    );
    // Garbage in the step line is an error, not a panic; `too-far` round-trips.
    let text = good.to_text().unwrap();
    for (from, to) in [
        ("append-step 1 3 ", "append-step 1 x "),
        ("append-step 1 3 ", "append-step 1 3 zz "),
        ("append-step 1 3 ", "append-step "),
    ] {
        assert!(LogAnswer::parse(&text.replace(from, to)).is_err(), "{to}");
    }
    let mut far = stepped(1, Vec::new(), None);
    far.append_only = None;
    far.too_far = Some(1);
    let far = LogAnswer::parse(&far.to_text().unwrap()).unwrap();
    assert_eq!((far.too_far, far.append_only.is_none()), (Some(1), true));
    assert!(far.verify_extends(&h1.head).await.is_err());
}

/// Review R3: the server's check of an audit answer ([`super::self_check::check_audit`]) runs
/// on a blocking thread (`self_check::off_thread`) so that the runtime's workers stay free;
/// akd's `audit_verify` with its default parallelism spawned half its tree building back onto
/// them (`tokio::spawn` inside `Handle::block_on`). Here the runtime's only thread does not
/// run it while the check runs elsewhere (as busy workers would not): a check that leaves
/// work on the runtime never ends. A forged middle head is still refused.
#[test]
fn the_audit_self_check_leaves_the_runtime_alone() {
    use super::self_check::check_audit;
    use super::witness::AuditAnswer;

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (good, lie) = rt.block_on(async {
        let (dir, signer, [h1, h2, h3]) = three_epochs().await;
        let good = AuditAnswer {
            domain: DOMAIN.into(),
            vrf_public_key: h1.head.vrf_public_key,
            heads: vec![h1, h2.clone(), h3],
            proof: Some(wire::encode_audit(&dir.audit(1, 3).await.unwrap()).unwrap()),
        };
        let mut lie = good.clone();
        lie.heads[1] = signer
            .sign(Head {
                root_hash: [9; 32],
                ..h2.head.clone()
            })
            .unwrap();
        (good, lie)
    });
    for (answer, verifies) in [(good, true), (lie, false)] {
        let handle = rt.handle().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(handle.block_on(check_audit(&answer)).is_ok());
        });
        let checked = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the check waits for tasks it spawned onto the runtime");
        assert_eq!(checked, verifies);
    }
}

/// A head signed with an absurd epoch (a provider holds the head key; a client without a
/// witness policy checks it only against its remembered head) is refused as a forgery, not
/// a crash: the proof's epochs are counted against the gap before anything is built or
/// allocated for the gap (review R5: 2^40 epochs aborted the client, 2^62 panicked).
#[tokio::test]
async fn a_head_far_ahead_is_refused_without_allocating_its_gap() {
    let (_, signer, dir) = fresh().await;
    publish(&dir, &[first("alice@example.net", b"alice")]).await;
    let h1 = head(&dir, &signer).await;
    publish(&dir, &[first("bob@example.net", b"bob")]).await;
    let p12 = dir.audit(1, 2).await.unwrap();
    for far in [u64::MAX / 2, u64::MAX, 1u64 << 40] {
        let mut hostile = head(&dir, &signer).await.head;
        hostile.epoch = far;
        let err = super::verify::verify_append_only_roots(&h1.head, &hostile, p12.clone())
            .await
            .expect_err("a head far ahead with a one-step proof");
        assert!(
            matches!(err, super::TransparencyError::Verification(_)),
            "{err}"
        );
        assert!(
            verify_append_only(&h1.head, &hostile, &[], p12.clone())
                .await
                .is_err()
        );
    }
}
