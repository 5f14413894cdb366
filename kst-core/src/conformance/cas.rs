//! Compare-and-set publication ([`Expected`]) and the read-merge-write built on it
//! ([`crate::publication::publish_merged`]), with the real keys
//! `kst-core/testdata/keys/merge-*.pub.asc` (one primary key in several variants).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Barrier;

use super::{DOMAIN, address, delete, get, history, publish, test_key};
use crate::address::Address;
use crate::error::Error;
use crate::merge;
use crate::publication::publish_merged;
use crate::store::{Expected, KeyStore, NewKey, PublishOutcome};
use crate::validate::{DEFAULT_MAX_PUBLISHED_BYTES, KeyPolicy, validate};

const S_CAS: u32 = 40;
const S_CAS_RACE: u32 = 41;

/// Concurrent read-modify-write publishers in [`compare_and_set_race`].
pub const CAS_WRITERS: u64 = 6;
/// Successful writes each of them makes.
pub const CAS_WRITES_EACH: u64 = 4;

/// Which variant of the merge fixtures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The key with one encryption subkey (A).
    Base,
    /// Base plus a second encryption subkey (B).
    Subkey,
    /// Base with its expiry extended to 2035.
    Extended,
    /// Base with subkey A revoked.
    SubkeyRevoked,
    /// Base plus a signing subkey (C) that expired on 2026-01-01; received in June 2025.
    Signing,
    /// Base with a key revocation.
    Revoked,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 6] = [
        Variant::Base,
        Variant::Subkey,
        Variant::Extended,
        Variant::SubkeyRevoked,
        Variant::Signing,
        Variant::Revoked,
    ];

    /// The armored fixture.
    pub fn armored(self) -> &'static str {
        match self {
            Variant::Base => include_str!("../../testdata/keys/merge-base.pub.asc"),
            Variant::Subkey => include_str!("../../testdata/keys/merge-subkey.pub.asc"),
            Variant::Extended => include_str!("../../testdata/keys/merge-extended.pub.asc"),
            Variant::SubkeyRevoked => {
                include_str!("../../testdata/keys/merge-subrevoked.pub.asc")
            }
            Variant::Signing => include_str!("../../testdata/keys/merge-signing.pub.asc"),
            Variant::Revoked => include_str!("../../testdata/keys/merge-revoked.pub.asc"),
        }
    }
}

/// Key ID of the fixtures' first encryption subkey (A).
pub const SUBKEY_A: &str = "C8120EBE439610F0";
/// Key ID of the second encryption subkey (B).
pub const SUBKEY_B: &str = "6BEF6D9E9FFA7E11";
/// Key ID of the short-lived signing subkey (C).
pub const SUBKEY_C: &str = "EDF7E40E77EC0973";
/// The extended expiry (2035-01-01).
pub const EXTENDED_EXPIRY: u64 = 2_051_265_600;

/// The fixture as the service hands it to a store for `address`: validated for
/// `alice@example.net` (June 2025 for [`Variant::Signing`], 2026-06-01 otherwise), publication
/// `n` (distinct `n`, distinct publication).
pub fn merge_key(variant: Variant, address: &Address, n: u64) -> NewKey {
    let account = crate::AddressPolicy::default()
        .normalize("alice@example.net")
        .expect("address");
    let at = match variant {
        Variant::Signing => 1_748_736_000,
        _ => 1_780_272_000,
    };
    let v = validate(
        variant.armored(),
        &account,
        &KeyPolicy::default(),
        UNIX_EPOCH + Duration::from_secs(at),
    )
    .unwrap_or_else(|e| panic!("conformance: merge fixture {variant:?} refused: {e}"));
    NewKey {
        address: address.clone(),
        key: v.packets,
        fingerprint: v.fingerprint,
        publication_id: format!("ca5e{n:028x}"),
        published_at: 1_780_000_000 + n,
        revoked: v.revoked,
        expected: Expected::Any,
    }
}

/// Key IDs of the subkeys of a stored certificate.
pub fn subkey_ids(key: &[u8]) -> Vec<String> {
    crate::certificate::Certificate::from_binary(key)
        .map(|c| c.handles().subkeys.into_iter().map(|h| h.key_id).collect())
        .unwrap_or_default()
}

fn with(key: NewKey, expected: Expected) -> NewKey {
    NewKey { expected, ..key }
}

async fn conflict(what: &str, store: &dyn KeyStore, key: NewKey, ctx: &str) {
    match store.publish(key).await {
        Err(Error::Conflict(m)) => {
            assert!(!m.is_empty(), "{what}: an empty conflict message {ctx}");
        }
        other => panic!("{what}: expected a conflict {ctx}, got {other:?}"),
    }
}

/// The compare-and-set of `publish`: a publication whose expectation does not hold writes
/// nothing and returns [`Error::Conflict`] (temporary); idempotency (same publication id, same
/// key as the current one) comes first; [`Expected::Any`] stays unconditional.
pub async fn compare_and_set(store: &dyn KeyStore) {
    const W: &str = "compare_and_set";
    let a = address(&format!("cas@{DOMAIN}"));
    conflict(
        W,
        store,
        with(test_key(&a, S_CAS, 1), Expected::Version(1)),
        "for version 1 of an address with no key",
    )
    .await;
    assert!(get(W, store, &a).await.is_none(), "{W}: a conflict wrote");
    let v1 = publish(W, store, with(test_key(&a, S_CAS, 1), Expected::Nothing)).await;
    assert!(
        matches!(v1, PublishOutcome::Published(ref r) if r.version == 1),
        "{W}: {v1:?}"
    );
    conflict(
        W,
        store,
        with(test_key(&a, S_CAS, 2), Expected::Nothing),
        "for no key while version 1 is current",
    )
    .await;
    let v2 = publish(W, store, with(test_key(&a, S_CAS, 2), Expected::Version(1))).await;
    assert!(
        matches!(v2, PublishOutcome::Published(ref r) if r.version == 2),
        "{W}: {v2:?}"
    );
    conflict(
        W,
        store,
        with(test_key(&a, S_CAS, 3), Expected::Version(1)),
        "for version 1 while version 2 is current",
    )
    .await;
    conflict(
        W,
        store,
        with(test_key(&a, S_CAS, 3), Expected::Version(0)),
        "for version 0, which is never current",
    )
    .await;
    assert_eq!(
        history(W, store, &a).await.len(),
        2,
        "{W}: a conflict wrote"
    );
    // A redelivery of publication 1 or of the current key is unchanged, whatever it expected.
    let again = publish(W, store, with(test_key(&a, S_CAS, 1), Expected::Nothing)).await;
    assert!(
        matches!(again, PublishOutcome::Unchanged(ref r) if r.version == 1),
        "{W}: a redelivery with a stale expectation: {again:?}"
    );
    let mut same = with(test_key(&a, S_CAS, 2), Expected::Version(7));
    same.publication_id = super::publication_id(S_CAS, 99);
    let again = publish(W, store, same).await;
    assert!(
        matches!(again, PublishOutcome::Unchanged(ref r) if r.version == 2),
        "{W}: the current key again with a stale expectation: {again:?}"
    );
    let any = publish(W, store, test_key(&a, S_CAS, 4)).await;
    assert!(
        matches!(any, PublishOutcome::Published(ref r) if r.version == 3),
        "{W}: {any:?}"
    );
    // After a deletion the address has no key again.
    delete(W, store, &a).await;
    conflict(
        W,
        store,
        with(test_key(&a, S_CAS, 5), Expected::Version(3)),
        "for the deleted version",
    )
    .await;
    let fresh = publish(W, store, with(test_key(&a, S_CAS, 5), Expected::Nothing)).await;
    assert!(
        matches!(fresh, PublishOutcome::Published(ref r) if r.version == 1),
        "{W}: {fresh:?}"
    );
    delete(W, store, &a).await;
}

/// Several read-modify-write publishers on the store instances of a pool, each writing only on
/// top of the version it read: every successful write is exactly one version above the one its
/// writer read, and no two writers succeed on the same read (no lost update).
pub async fn compare_and_set_race(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "compare_and_set_race";
    let a = address(&format!("cas-race@{DOMAIN}"));
    let barrier = Arc::new(Barrier::new(CAS_WRITERS as usize));
    let mut tasks = Vec::new();
    for w in 0..CAS_WRITERS {
        let store = stores[w as usize % stores.len()].clone();
        let barrier = barrier.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut wins = Vec::new();
            let mut n = 0;
            while (wins.len() as u64) < CAS_WRITES_EACH {
                let read = get(W, &*store, &a).await.map(|r| r.version);
                let expected = read.map_or(Expected::Nothing, Expected::Version);
                n += 1;
                let key = with(test_key(&a, S_CAS_RACE, w * 10_000 + n), expected);
                match store.publish(key).await {
                    Ok(PublishOutcome::Published(r)) => wins.push((read.unwrap_or(0), r.version)),
                    Ok(other) => panic!("{W}: a new key was unchanged: {other:?}"),
                    Err(Error::Conflict(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{W}: publish failed: {e}"),
                }
            }
            wins
        }));
    }
    let mut reads = std::collections::BTreeSet::new();
    for t in tasks {
        for (read, written) in t.await.expect("writer task") {
            assert_eq!(written, read + 1, "{W}: a write skipped a version");
            assert!(
                reads.insert(read),
                "{W}: two writes on top of version {read}"
            );
        }
    }
    let total = CAS_WRITERS * CAS_WRITES_EACH;
    assert_eq!(history(W, &*stores[0], &a).await.len() as u64, total, "{W}");
    delete(W, &*stores[0], &a).await;
}

/// The read-merge-write of the service on this store: variants of one key published
/// concurrently through the instances of a pool all end up in the stored key (every subkey,
/// the extended expiry, the subkey revocation); a revoked key is never un-revoked by a later
/// publication of an older copy, nor by a deletion and republication (tombstones).
pub async fn merged_publications(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "merged_publications";
    let now = 1_780_272_000;
    for round in 0..4u64 {
        let a = address(&format!("merge-{round}@{DOMAIN}"));
        let variants = [
            Variant::Base,
            Variant::Subkey,
            Variant::Extended,
            Variant::SubkeyRevoked,
            Variant::Signing,
        ];
        let barrier = Arc::new(Barrier::new(variants.len()));
        let mut tasks = Vec::new();
        for (i, v) in variants.into_iter().enumerate() {
            let store = stores[i % stores.len()].clone();
            let barrier = barrier.clone();
            let key = merge_key(v, &a, round * 10 + i as u64);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                publish_merged(&*store, key, DEFAULT_MAX_PUBLISHED_BYTES, now)
                    .await
                    .unwrap_or_else(|e| panic!("{W}: publishing {v:?} failed: {e}"))
                    .unwrap_or_else(|e| panic!("{W}: publishing {v:?} refused: {e}"))
            }));
        }
        for t in tasks {
            t.await.expect("publisher task");
        }
        let current = get(W, &*stores[0], &a).await.expect("a key");
        assert_eq!(
            subkey_ids(&current.key),
            [SUBKEY_A, SUBKEY_B, SUBKEY_C],
            "{W}: round {round} lost a subkey"
        );
        let mut all = merge_key(Variant::Base, &a, 0).key;
        for v in variants {
            all = merge::merge(&all, &merge_key(v, &a, 0).key).expect("merge");
        }
        assert_eq!(
            current.key, all,
            "{W}: round {round}: not the merge of every variant"
        );
        assert!(!current.revoked);
        delete(W, &*stores[0], &a).await;
    }

    // Revocation: merged in, kept against older copies, and after a deletion (tombstone).
    let s = &*stores[0];
    let a = address(&format!("merge-revoked@{DOMAIN}"));
    let mut n = 100;
    let mut put = async |v: Variant| {
        n += 1;
        publish_merged(s, merge_key(v, &a, n), DEFAULT_MAX_PUBLISHED_BYTES, now)
            .await
            .unwrap_or_else(|e| panic!("{W}: publishing {v:?} failed: {e}"))
            .unwrap_or_else(|e| panic!("{W}: publishing {v:?} refused: {e}"))
    };
    put(Variant::Subkey).await;
    put(Variant::Revoked).await;
    put(Variant::Extended).await;
    let current = get(W, s, &a).await.expect("a key");
    assert!(current.revoked, "{W}: an older copy un-revoked the key");
    assert!(merge::is_revoked(&current.key).unwrap());
    assert_eq!(subkey_ids(&current.key), [SUBKEY_A, SUBKEY_B], "{W}");
    delete(W, s, &a).await;
    put(Variant::Base).await;
    let current = get(W, s, &a).await.expect("a key");
    assert!(
        current.revoked && merge::is_revoked(&current.key).unwrap(),
        "{W}: a deletion and republication un-revoked the key"
    );
    delete(W, s, &a).await;
}
