//! The look-ups besides by address (fingerprint, key ID, WKD hash) as executable checks.
//!
//! Part of [`run_all`](super::run_all); each property is also a `pub async fn` of its own. They
//! publish real certificates (made by gpg, from kst-core's `testdata/keys`), because only a real
//! certificate has subkeys, each under addresses of its own (`lookup-*@conformance.example`).

use std::collections::BTreeSet;

use super::{
    DOMAIN, address, delete, describe_all, get, list_all, publish_new, restore, same_record,
};
use crate::address::Address;
use crate::certificate::Certificate;
use crate::fingerprint::{Fingerprint, KeyId};
use crate::key_index::IndexEntries;
use crate::openpgp::dearmor_public_key;
use crate::store::{KeyRecord, KeyStore, NewKey};
use crate::wkd::WkdHash;

/// Results asked for when a property expects every match.
const ALL: usize = 100;

/// A certificate of `testdata/keys` by file name.
fn cert_bytes(name: &str) -> Vec<u8> {
    let armored = match name {
        "subkeys" => include_str!("../../testdata/keys/subkeys.pub.asc"),
        "alice" => include_str!("../../testdata/keys/alice.pub.asc"),
        "revoked" => include_str!("../../testdata/keys/revoked.pub.asc"),
        "dsa-elg" => include_str!("../../testdata/keys/dsa-elg.pub.asc"),
        "rsa1024" => include_str!("../../testdata/keys/rsa1024.pub.asc"),
        "expired" => include_str!("../../testdata/keys/expired.pub.asc"),
        "foreign" => include_str!("../../testdata/keys/foreign.pub.asc"),
        "bob" => include_str!("../../testdata/bob.pub.asc"),
        other => panic!("conformance: no test certificate {other:?}"),
    };
    dearmor_public_key(armored, 1 << 20).expect("test certificates dearmor")
}

/// Certificate `name` as a key to publish for `address`; the publication id derives from the
/// certificate and `n`.
pub fn real_key(address: &Address, name: &str, n: u64, revoked: bool) -> NewKey {
    let key = cert_bytes(name);
    let fingerprint = Fingerprint::parse(
        &Certificate::from_binary(&key)
            .expect("test certificates parse")
            .fingerprint(),
    )
    .expect("a parsed certificate has a valid fingerprint");
    NewKey {
        address: address.clone(),
        publication_id: format!("{}{n:016x}", &fingerprint.as_str()[..16]).to_lowercase(),
        key,
        fingerprint,
        published_at: 1_700_000_000 + n,
        revoked,
        expected: crate::store::Expected::Any,
    }
}

/// What `record` is found by.
fn entries(record: &KeyRecord) -> IndexEntries {
    IndexEntries::of(record)
}

async fn by_fpr(what: &str, store: &dyn KeyStore, f: &Fingerprint, limit: usize) -> Vec<KeyRecord> {
    store
        .find_by_fingerprint(f, limit)
        .await
        .unwrap_or_else(|e| panic!("{what}: find_by_fingerprint {f} failed: {e}"))
}

async fn by_id(what: &str, store: &dyn KeyStore, id: &KeyId, limit: usize) -> Vec<KeyRecord> {
    store
        .find_by_key_id(id, limit)
        .await
        .unwrap_or_else(|e| panic!("{what}: find_by_key_id {id} failed: {e}"))
}

async fn by_wkd(what: &str, store: &dyn KeyStore, a: &Address) -> Option<KeyRecord> {
    let hash = WkdHash::of_address(a);
    store
        .find_by_wkd_hash(a.domain(), &hash)
        .await
        .unwrap_or_else(|e| panic!("{what}: find_by_wkd_hash {} {hash} failed: {e}", a.domain()))
}

/// Results sorted by address, for comparisons that do not depend on the order.
fn sorted(mut rs: Vec<KeyRecord>) -> Vec<KeyRecord> {
    rs.sort_by(|a, b| a.address.cmp(&b.address));
    rs
}

fn same_records(what: &str, ctx: &str, got: Vec<KeyRecord>, want: &[&KeyRecord]) {
    let got = sorted(got);
    let want = sorted(want.iter().map(|r| (*r).clone()).collect());
    assert!(
        got == want,
        "{what}: {ctx}:\n  got: {}\n  want: {}",
        describe_all(&got),
        describe_all(&want)
    );
}

/// Asserts that `record` is found by every entry it has: each fingerprint and key ID alone,
/// and its WKD hash.
async fn assert_found(what: &str, store: &dyn KeyStore, record: &KeyRecord) {
    let e = entries(record);
    for f in &e.fingerprints {
        let ctx = format!("find_by_fingerprint {f} of {}", record.address);
        same_records(what, &ctx, by_fpr(what, store, f, ALL).await, &[record]);
    }
    for id in &e.key_ids {
        let ctx = format!("find_by_key_id {id} of {}", record.address);
        same_records(what, &ctx, by_id(what, store, id, ALL).await, &[record]);
    }
    same_record(
        what,
        &format!("find_by_wkd_hash of {}", record.address),
        by_wkd(what, store, &record.address).await.as_ref(),
        Some(record),
    );
}

/// Asserts that nothing is found by any fingerprint or key ID of `gone` (a record that was
/// replaced or deleted).
async fn assert_gone(what: &str, store: &dyn KeyStore, gone: &KeyRecord, ctx: &str) {
    let e = entries(gone);
    for f in &e.fingerprints {
        let got = by_fpr(what, store, f, ALL).await;
        assert!(
            got.is_empty(),
            "{what}: {ctx}: find_by_fingerprint {f} still finds {}",
            describe_all(&got)
        );
    }
    for id in &e.key_ids {
        let got = by_id(what, store, id, ALL).await;
        assert!(
            got.is_empty(),
            "{what}: {ctx}: find_by_key_id {id} still finds {}",
            describe_all(&got)
        );
    }
}

/// Runs every look-up property (on a store where none of their addresses exists yet).
pub async fn run_all(store: &dyn KeyStore) {
    not_found(store).await;
    primary_subkeys_key_ids_and_wkd_hash(store).await;
    replaced_key_is_not_found_by_its_old_entries(store).await;
    deleted_key_is_not_found(store).await;
    revoked_key_is_found(store).await;
    shared_key_finds_every_address_within_the_limit(store).await;
    restore_indexes_the_current_key_only(store).await;
    rebuild_index_is_idempotent(store).await;
}

/// Unknown fingerprints, key IDs and hashes find nothing, and a hash is only found in its own
/// domain.
pub async fn not_found(store: &dyn KeyStore) {
    const W: &str = "lookup::not_found";
    let f = Fingerprint::parse("0123456789ABCDEF0123456789ABCDEF01234567").unwrap();
    assert!(
        by_fpr(W, store, &f, ALL).await.is_empty(),
        "{W}: unknown fingerprint found"
    );
    assert!(
        by_id(W, store, &f.key_id(), ALL).await.is_empty(),
        "{W}: unknown key ID found"
    );
    let a = address(&format!("lookup-nobody@{DOMAIN}"));
    same_record(
        W,
        "find_by_wkd_hash of an unknown address",
        by_wkd(W, store, &a).await.as_ref(),
        None,
    );

    let b = address(&format!("lookup-domain@{DOMAIN}"));
    let r = publish_new(W, store, real_key(&b, "foreign", 1, false), 1).await;
    let hash = WkdHash::of_address(&b);
    let other = store
        .find_by_wkd_hash("other.example", &hash)
        .await
        .unwrap_or_else(|e| panic!("{W}: find_by_wkd_hash failed: {e}"));
    same_record(
        W,
        "the hash of an address in another domain",
        other.as_ref(),
        None,
    );
    same_record(
        W,
        "find_by_wkd_hash",
        by_wkd(W, store, &b).await.as_ref(),
        Some(&r),
    );
    assert!(delete(W, store, &b).await);
}

/// A key is found by its primary fingerprint, each subkey's fingerprint, each key ID, and the
/// WKD hash of its address, and by nothing in the wrong case or length.
pub async fn primary_subkeys_key_ids_and_wkd_hash(store: &dyn KeyStore) {
    const W: &str = "lookup::primary_subkeys_key_ids_and_wkd_hash";
    let a = address(&format!("lookup-subkeys@{DOMAIN}"));
    let r = publish_new(W, store, real_key(&a, "subkeys", 1, false), 1).await;
    let e = entries(&r);
    assert_eq!(
        e.fingerprints.len(),
        4,
        "{W}: the test certificate has three subkeys"
    );
    assert_found(W, store, &r).await;
    let sub = &e.fingerprints[2];
    let ctx = "find_by_fingerprint of a subkey with limit 1";
    same_records(W, ctx, by_fpr(W, store, sub, 1).await, &[&r]);
}

/// After a different key replaces an address' key, the old key's fingerprints and key IDs find
/// nothing (the history holds it, the index does not); the new ones and the WKD hash find
/// the new key. Publishing the same key again changes nothing.
pub async fn replaced_key_is_not_found_by_its_old_entries(store: &dyn KeyStore) {
    const W: &str = "lookup::replaced_key_is_not_found_by_its_old_entries";
    let a = address(&format!("lookup-replaced@{DOMAIN}"));
    let old = publish_new(W, store, real_key(&a, "dsa-elg", 1, false), 1).await;
    assert_found(W, store, &old).await;
    let new = publish_new(W, store, real_key(&a, "rsa1024", 2, false), 2).await;
    assert_gone(W, store, &old, "after replacement by a different key").await;
    assert_found(W, store, &new).await;
    // Back to the first key (a third version): found again, the second is gone.
    let again = publish_new(W, store, real_key(&a, "dsa-elg", 3, false), 3).await;
    assert_gone(W, store, &new, "after replacement by the first key again").await;
    assert_found(W, store, &again).await;
}

/// After `delete`, nothing finds the key.
pub async fn deleted_key_is_not_found(store: &dyn KeyStore) {
    const W: &str = "lookup::deleted_key_is_not_found";
    let a = address(&format!("lookup-deleted@{DOMAIN}"));
    let r = publish_new(W, store, real_key(&a, "expired", 1, false), 1).await;
    assert_found(W, store, &r).await;
    assert!(
        delete(W, store, &a).await,
        "{W}: delete of {a} returned false"
    );
    assert_gone(W, store, &r, "after delete").await;
    same_record(
        W,
        "find_by_wkd_hash after delete",
        by_wkd(W, store, &a).await.as_ref(),
        None,
    );
}

/// A revoked key stays findable (clients must learn of the revocation).
pub async fn revoked_key_is_found(store: &dyn KeyStore) {
    const W: &str = "lookup::revoked_key_is_found";
    let a = address(&format!("lookup-revoked@{DOMAIN}"));
    let r = publish_new(W, store, real_key(&a, "revoked", 1, true), 1).await;
    assert!(r.revoked);
    assert_found(W, store, &r).await;
}

/// One key published for several addresses is found for each of them; `limit` caps the
/// results (each a distinct one of them).
pub async fn shared_key_finds_every_address_within_the_limit(store: &dyn KeyStore) {
    const W: &str = "lookup::shared_key_finds_every_address_within_the_limit";
    let mut records = Vec::new();
    for n in 1..=3 {
        let a = address(&format!("lookup-shared{n}@{DOMAIN}"));
        records.push(publish_new(W, store, real_key(&a, "alice", n, false), 1).await);
    }
    let all: Vec<&KeyRecord> = records.iter().collect();
    let e = entries(&records[0]);
    for f in &e.fingerprints {
        same_records(
            W,
            &format!("find_by_fingerprint {f}"),
            by_fpr(W, store, f, ALL).await,
            &all,
        );
    }
    for id in &e.key_ids {
        same_records(
            W,
            &format!("find_by_key_id {id}"),
            by_id(W, store, id, ALL).await,
            &all,
        );
    }
    for r in &records {
        same_record(
            W,
            "find_by_wkd_hash",
            by_wkd(W, store, &r.address).await.as_ref(),
            Some(r),
        );
    }
    let f = &e.fingerprints[0];
    for limit in 0..=3 {
        for (how, got) in [
            ("find_by_fingerprint", by_fpr(W, store, f, limit).await),
            ("find_by_key_id", by_id(W, store, &f.key_id(), limit).await),
        ] {
            let addresses: BTreeSet<&Address> = got.iter().map(|r| &r.address).collect();
            assert!(
                got.len() == limit
                    && addresses.len() == limit
                    && got.iter().all(|r| records.contains(r)),
                "{W}: {how} with limit {limit} must return {limit} distinct of the {} records, \
                 got {}",
                records.len(),
                describe_all(&got)
            );
        }
    }
}

/// `restore` indexes the current key of the restored history and none of the older ones, and
/// a later `restore` with another key drops the entries of the one it replaces.
pub async fn restore_indexes_the_current_key_only(store: &dyn KeyStore) {
    const W: &str = "lookup::restore_indexes_the_current_key_only";
    let a = address(&format!("lookup-restored@{DOMAIN}"));
    let first = vec![
        real_key(&a, "subkeys", 10, false).into_record(1),
        real_key(&a, "bob", 11, false).into_record(2),
    ];
    restore(W, store, &first).await;
    assert_found(W, store, &first[1]).await;
    // The subkeys certificate is current elsewhere (lookup-subkeys): only that address.
    let subkeys_fpr = &first[0].fingerprint;
    for r in by_fpr(W, store, subkeys_fpr, ALL).await {
        assert!(
            r.address != a,
            "{W}: a history record of {a} is found by its fingerprint: {}",
            describe_all(std::slice::from_ref(&r))
        );
    }
    let second = vec![real_key(&a, "foreign", 12, false).into_record(4)];
    restore(W, store, &second).await;
    assert_gone(W, store, &first[1], "after a restore with another key").await;
    assert_found(W, store, &second[0]).await;
}

/// `rebuild_index` is idempotent: run twice it reports the same count, either 0 (a store whose
/// look-ups need no index of its own keeps the trait's default) or the number of listed
/// addresses (every current key once, none of the history). After each run every look-up
/// finds exactly the current keys: of a replaced or deleted key nothing is left, a revoked key
/// and a key shared by two addresses are found, and writes after a rebuild keep the index
/// right.
pub async fn rebuild_index_is_idempotent(store: &dyn KeyStore) {
    const W: &str = "lookup::rebuild_index_is_idempotent";
    let replaced = address(&format!("lookup-rebuild-replaced@{DOMAIN}"));
    let deleted = address(&format!("lookup-rebuild-deleted@{DOMAIN}"));
    let shared1 = address(&format!("lookup-rebuild-shared1@{DOMAIN}"));
    let shared2 = address(&format!("lookup-rebuild-shared2@{DOMAIN}"));
    let subkeys = address(&format!("lookup-rebuild-subkeys@{DOMAIN}"));
    let revoked = address(&format!("lookup-rebuild-revoked@{DOMAIN}"));

    let gone_deleted = publish_new(W, store, real_key(&deleted, "expired", 20, false), 1).await;
    assert!(delete(W, store, &deleted).await, "{W}: delete of {deleted}");
    let gone_replaced = publish_new(W, store, real_key(&replaced, "expired", 21, false), 1).await;
    publish_new(W, store, real_key(&replaced, "rsa1024", 22, false), 2).await;
    publish_new(W, store, real_key(&shared1, "bob", 23, false), 1).await;
    let bob2 = publish_new(W, store, real_key(&shared2, "bob", 24, false), 1).await;
    publish_new(W, store, real_key(&subkeys, "subkeys", 25, false), 1).await;
    let rev = publish_new(W, store, real_key(&revoked, "revoked", 26, true), 1).await;
    assert!(rev.revoked, "{W}: the revoked key is stored revoked");
    let gone = [gone_deleted.clone(), gone_replaced.clone()];

    let first = rebuild(W, store).await;
    assert_index_matches_records(W, store, "after the first rebuild_index", &gone).await;
    let second = rebuild(W, store).await;
    assert!(
        first == second,
        "{W}: rebuild_index is not idempotent: it indexed {first} keys, then {second}"
    );
    let listed = list_all(W, store, 100).await.len() as u64;
    assert!(
        first == 0 || first == listed,
        "{W}: rebuild_index reports {first} keys, but the store lists {listed} addresses (one \
         current key each; 0 only for a store without an index of its own)"
    );
    assert_index_matches_records(W, store, "after the second rebuild_index", &gone).await;
    for r in [&rev, &bob2] {
        assert!(
            by_fpr(W, store, &r.fingerprint, ALL).await.contains(r),
            "{W}: {} is not found by its fingerprint after rebuild_index",
            r.address
        );
    }

    // Writes after a rebuild keep the index: replace, delete, restore.
    let back = publish_new(W, store, real_key(&replaced, "expired", 27, false), 3).await;
    assert!(delete(W, store, &shared2).await, "{W}: delete of {shared2}");
    restore(
        W,
        store,
        &[real_key(&deleted, "rsa1024", 28, false).into_record(5)],
    )
    .await;
    let after = [gone_deleted, bob2];
    assert_index_matches_records(W, store, "after writes that follow a rebuild", &after).await;
    assert!(
        by_fpr(W, store, &back.fingerprint, ALL)
            .await
            .contains(&back),
        "{W}: the key published again after rebuild_index is not found"
    );
    let listed = list_all(W, store, 100).await.len() as u64;
    assert_eq!(
        rebuild(W, store).await,
        if first == 0 { 0 } else { listed },
        "{W}: rebuild_index after one address was deleted and one restored"
    );
    assert_index_matches_records(W, store, "after the third rebuild_index", &after).await;
}

async fn rebuild(what: &str, store: &dyn KeyStore) -> u64 {
    store
        .rebuild_index()
        .await
        .unwrap_or_else(|e| panic!("{what}: rebuild_index failed: {e}"))
}

/// Asserts that every look-up answers exactly from the current records: each fingerprint and
/// key ID of a current key (and of the `gone` records, keys replaced or deleted) finds exactly
/// the current keys that have it, and the WKD hash of each listed address (and of each `gone`
/// record's address) finds that address' current key or nothing.
pub async fn assert_index_matches_records(
    what: &str,
    store: &dyn KeyStore,
    ctx: &str,
    gone: &[KeyRecord],
) {
    let mut current: Vec<KeyRecord> = Vec::new();
    for a in list_all(what, store, 100).await {
        match get(what, store, &a).await {
            Some(r) => current.push(r),
            None => panic!("{what}: {ctx}: list shows {a}, which has no current key"),
        }
    }
    let mut fingerprints: BTreeSet<Fingerprint> = BTreeSet::new();
    let mut key_ids: BTreeSet<KeyId> = BTreeSet::new();
    for r in current.iter().chain(gone) {
        let e = entries(r);
        fingerprints.extend(e.fingerprints);
        key_ids.extend(e.key_ids);
    }
    let current_entries: Vec<(&KeyRecord, IndexEntries)> =
        current.iter().map(|r| (r, entries(r))).collect();
    for f in &fingerprints {
        let want: Vec<&KeyRecord> = current_entries
            .iter()
            .filter(|(_, e)| e.has_fingerprint(f))
            .map(|(r, _)| *r)
            .collect();
        let ctx = format!("{ctx}: find_by_fingerprint {f}");
        same_records(what, &ctx, by_fpr(what, store, f, ALL).await, &want);
    }
    for id in &key_ids {
        let want: Vec<&KeyRecord> = current_entries
            .iter()
            .filter(|(_, e)| e.has_key_id(id))
            .map(|(r, _)| *r)
            .collect();
        let ctx = format!("{ctx}: find_by_key_id {id}");
        same_records(what, &ctx, by_id(what, store, id, ALL).await, &want);
    }
    for r in &current {
        same_record(
            what,
            &format!("{ctx}: find_by_wkd_hash of {}", r.address),
            by_wkd(what, store, &r.address).await.as_ref(),
            Some(r),
        );
    }
    for g in gone {
        let want = current.iter().find(|r| r.address == g.address);
        same_record(
            what,
            &format!("{ctx}: find_by_wkd_hash of {}", g.address),
            by_wkd(what, store, &g.address).await.as_ref(),
            want,
        );
    }
}

/// Every listed address' current key is found by its primary fingerprint and its WKD hash
/// (part of [`check_consistency`](super::check_consistency)).
pub async fn check_index(store: &dyn KeyStore, current: &KeyRecord) {
    const W: &str = "check_consistency";
    let found = by_fpr(W, store, &current.fingerprint, ALL).await;
    assert!(
        found.contains(current),
        "{W}: the current key of {} is not found by its fingerprint {}; found {}",
        current.address,
        current.fingerprint,
        describe_all(&found)
    );
    same_record(
        W,
        &format!("find_by_wkd_hash of {}", current.address),
        by_wkd(W, store, &current.address).await.as_ref(),
        Some(current),
    );
}
