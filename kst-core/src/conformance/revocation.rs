//! Revocations are never rolled back: the tombstone part of the [`KeyStore`] contract, with the
//! real keys `kst-core/testdata/keys/lifecycle-*.pub.asc` (one primary key in three versions).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Barrier;

use super::{DOMAIN, address, delete, get, publish};
use crate::address::Address;
use crate::store::{KeyStore, NewKey};
use crate::validate::{KeyPolicy, validate};

const V1: &str = include_str!("../../testdata/keys/lifecycle-v1.pub.asc");
const V2: &str = include_str!("../../testdata/keys/lifecycle-v2.pub.asc");
const REVOKED: &str = include_str!("../../testdata/keys/lifecycle-revoked.pub.asc");
const UIDREV_V1: &str = include_str!("../../testdata/keys/uidrev-v1.pub.asc");
const UIDREV_RECERT: &str = include_str!("../../testdata/keys/uidrev-recert.pub.asc");

/// Which lifecycle fixture (or User ID revocation fixture).
#[derive(Clone, Copy, Debug)]
enum Version {
    V1,
    V2,
    Revoked,
    /// `uidrev-v1`: alice's User ID certified 2025-01-01 (an old copy).
    UidV1,
    /// `uidrev-recert`: alice's User ID revoked 2025-03-01 and certified again 2025-04-01.
    UidRecertified,
}

/// The fixture as the service hands it to a store: validated, for `address`, publication `n`.
fn lifecycle_key(version: Version, address: &Address, n: u64) -> NewKey {
    let armored = match version {
        Version::V1 => V1,
        Version::V2 => V2,
        Version::Revoked => REVOKED,
        Version::UidV1 => UIDREV_V1,
        Version::UidRecertified => UIDREV_RECERT,
    };
    let account = crate::AddressPolicy::default()
        .normalize("alice@example.net")
        .expect("address");
    // 2026-06-01: after the fixtures were made.
    let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
    let v = validate(armored, &account, &KeyPolicy::default(), now)
        .unwrap_or_else(|e| panic!("conformance: lifecycle fixture {version:?} refused: {e}"));
    NewKey {
        address: address.clone(),
        key: v.packets,
        fingerprint: v.fingerprint,
        publication_id: format!("7e7e{:028x}", n * 8 + version as u64),
        published_at: 1_780_000_000 + n,
        revoked: v.revoked,
        expected: crate::store::Expected::Any,
    }
}

/// The current key of `a` is stored revoked and still validates as revoked.
async fn assert_served_revoked(what: &str, store: &dyn KeyStore, a: &Address, ctx: &str) {
    let Some(current) = get(what, store, a).await else {
        panic!("{what}: {a} has no key {ctx}");
    };
    assert!(
        current.revoked,
        "{what}: {a} is served unrevoked {ctx} (the revocation was rolled back)"
    );
    let account = crate::AddressPolicy::default()
        .normalize("alice@example.net")
        .expect("address");
    let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
    let v = validate(
        &crate::openpgp::armor_public_key(&current.key),
        &account,
        &KeyPolicy::default(),
        now,
    )
    .unwrap_or_else(|e| panic!("{what}: the key served for {a} {ctx} is refused: {e}"));
    assert!(
        v.revoked,
        "{what}: the key served for {a} {ctx} carries no revocation signature"
    );
}

/// A revoked key published again without its revocation (v1, then v2: an old device, a
/// deferred redelivery), under the same address and under another one, is served revoked, with
/// the later publication's content (v2's second subkey); a deletion followed by a republication
/// is served revoked too (the tombstone outlives the deletion).
pub async fn revocation_survives_republication_and_deletion(store: &dyn KeyStore) {
    const W: &str = "revocation_survives_republication_and_deletion";
    let a = address(&format!("tombstone@{DOMAIN}"));
    let b = address(&format!("tombstone-other@{DOMAIN}"));
    // Before any revocation, an unrevoked key is stored as it is.
    let v1 = lifecycle_key(Version::V1, &a, 1);
    let stored = publish(W, store, v1.clone()).await;
    assert_eq!(
        stored.record().key,
        v1.key,
        "{W}: an unrevoked key was changed"
    );
    assert!(!stored.record().revoked);

    publish(W, store, lifecycle_key(Version::Revoked, &a, 2)).await;
    assert_served_revoked(W, store, &a, "after the revocation").await;
    publish(W, store, lifecycle_key(Version::V1, &a, 3)).await;
    assert_served_revoked(W, store, &a, "after v1 was published again").await;
    let v2 = lifecycle_key(Version::V2, &a, 4);
    publish(W, store, v2.clone()).await;
    assert_served_revoked(W, store, &a, "after v2 was published again").await;
    let current = get(W, store, &a).await.expect("a key");
    assert!(
        current.key.len() > v2.key.len(),
        "{W}: v2 republished should be served with its content plus the revocation"
    );
    assert!(
        current
            .key
            .windows(v2.key.len().min(40))
            .any(|w| v2.key.ends_with(w)),
        "{W}: the served key is not v2's content"
    );

    // The same primary key under another address: the tombstone is per fingerprint.
    publish(W, store, lifecycle_key(Version::V1, &b, 5)).await;
    assert_served_revoked(W, store, &b, "under another address").await;

    // Deletion keeps the tombstone.
    assert!(delete(W, store, &a).await, "{W}: delete found nothing");
    assert!(get(W, store, &a).await.is_none());
    publish(W, store, lifecycle_key(Version::V1, &a, 6)).await;
    assert_served_revoked(W, store, &a, "after a deletion and a republication").await;

    // Leave no real keys behind for the suite's consistency check (tombstones stay).
    delete(W, store, &a).await;
    delete(W, store, &b).await;
}

/// Two store instances (a pool) race a revoked publication against an unrevoked one of the
/// same key, many times, each round on a fresh address: whichever lands last, the key is served
/// revoked. Needs the read-check-write of the tombstone to be atomic with the write. Each run
/// uses addresses of its own, so it can run more than once on one store.
pub async fn revocation_race(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "revocation_race";
    assert!(stores.len() >= 2, "{W} needs two store instances");
    for round in 0..20u64 {
        let a = super::run_address(&format!("revocation-race-{round}"));
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for (i, version) in [(0usize, Version::Revoked), (1, Version::V2)] {
            let store = stores[i % stores.len()].clone();
            let barrier = barrier.clone();
            let key = lifecycle_key(version, &a, 100 + round * 2 + i as u64);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                publish(W, &*store, key).await;
            }));
        }
        for t in tasks {
            t.await.expect("publisher task");
        }
        assert_served_revoked(W, &*stores[0], &a, &format!("after race round {round}")).await;
        delete(W, &*stores[1], &a).await;
    }
}

/// The key served for `a`, parsed.
async fn served(what: &str, store: &dyn KeyStore, a: &Address) -> crate::certificate::Certificate {
    let current = get(what, store, a)
        .await
        .unwrap_or_else(|| panic!("{what}: {a} has no key"));
    crate::certificate::Certificate::from_binary(&current.key)
        .unwrap_or_else(|e| panic!("{what}: the key served for {a} does not parse: {e}"))
}

/// A revoked component of a key: what [`component_revocation_survives`] checks.
#[derive(Clone, Copy)]
enum Component {
    /// Subkey A of the merge fixtures.
    SubkeyA,
    /// The User ID `alice <alice@example.net>` of the `uidrev-*` fixtures.
    AliceUserId,
}

/// Whether `component` is revoked in the key served for `a`: subkey A with a revocation, the
/// User ID with a revocation not older than its newest certification (as the HKP index flags
/// it).
async fn served_revoked(
    what: &str,
    store: &dyn KeyStore,
    a: &Address,
    component: Component,
) -> bool {
    let cert = served(what, store, a).await;
    match component {
        Component::SubkeyA => cert
            .revoked_subkeys()
            .iter()
            .any(|id| id == super::cas::SUBKEY_A),
        Component::AliceUserId => {
            let index = cert.hkp_index_entry(0);
            let line = index
                .lines()
                .find(|l| l.starts_with("uid:alice <alice@example.net>:"))
                .unwrap_or_else(|| {
                    panic!("{what}: the key served for {a} lacks alice's User ID: {index}")
                });
            line.ends_with(":r")
        }
    }
}

/// The rollback of a component revocation by someone with the account's password (not the
/// key): `old` (an old copy from before the revocation) is published, then `revoking` (the
/// owner's; `then_revoked`: whether the component is served revoked after it); then another
/// key replaces it and the old copy is published, then the key is deleted and the old copy
/// published. Each time the old copy must be served with the component revoked. Publication
/// numbers `n + 1` to `n + 4` are used (`revoking` is publication `n`).
async fn component_revocation_survives(
    what: &str,
    store: &dyn KeyStore,
    a: &Address,
    component: Component,
    old: impl Fn(u64) -> NewKey,
    (n, revoking): (u64, NewKey),
    then_revoked: bool,
) {
    publish(what, store, old(n + 1)).await;
    assert!(
        !served_revoked(what, store, a, component).await,
        "{what}: the old copy is served revoked before any revocation"
    );
    publish(what, store, revoking).await;
    assert_eq!(
        served_revoked(what, store, a, component).await,
        then_revoked,
        "{what}: after the owner's publication"
    );
    publish(what, store, lifecycle_key(Version::V1, a, n + 2)).await;
    publish(what, store, old(n + 3)).await;
    assert!(
        served_revoked(what, store, a, component).await,
        "{what}: replacing the key and republishing an old copy took the revocation back"
    );
    delete(what, store, a).await;
    publish(what, store, old(n + 4)).await;
    assert!(
        served_revoked(what, store, a, component).await,
        "{what}: deleting the key and republishing an old copy took the revocation back"
    );
    delete(what, store, a).await;
}

/// A subkey revocation is never rolled back either: the owner revoked subkey A; someone with
/// the account's password (not the key) replaces the key by another one and then publishes an
/// old copy from before the revocation, or deletes the key and publishes the old copy. Each
/// time the old copy is served with subkey A revoked (the tombstone keeps subkey revocations).
pub async fn subkey_revocation_survives_replacement_and_deletion(store: &dyn KeyStore) {
    use super::cas::{Variant, merge_key};
    let a = address(&format!("subkey-tombstone@{DOMAIN}"));
    component_revocation_survives(
        "subkey revocation",
        store,
        &a,
        Component::SubkeyA,
        |n| merge_key(Variant::Base, &a, n),
        (9100, merge_key(Variant::SubkeyRevoked, &a, 9100)),
        true,
    )
    .await;
}

/// A User ID revocation is never rolled back either: the owner revoked the User ID of the
/// account and certified it again (the revocation stays on the key and revokes every older
/// certification, so the User ID is served unrevoked); someone with the account's password
/// replaces the key by another one and then publishes an old copy from before the revocation,
/// or deletes the key and publishes the old copy. Each time the old copy is served with its
/// User ID revoked (the tombstone keeps User ID revocations with their User ID packet).
pub async fn user_id_revocation_survives_replacement_and_deletion(store: &dyn KeyStore) {
    let a = address(&format!("uid-tombstone@{DOMAIN}"));
    component_revocation_survives(
        "User ID revocation",
        store,
        &a,
        Component::AliceUserId,
        |n| lifecycle_key(Version::UidV1, &a, n),
        (9200, lifecycle_key(Version::UidRecertified, &a, 9200)),
        false,
    )
    .await;
}
