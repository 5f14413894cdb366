//! The deleted publications a store remembers, walked and added to
//! ([`KeyStore::deleted_page`], [`KeyStore::remember_deleted`]): what `kst export` and `kst
//! import` carry so that deletion still wins over a redelivery after a move between stores.

use std::collections::{BTreeMap, BTreeSet};

use super::{DOMAIN, address, delete, publish_deleted_since, publish_new, test_key};
use crate::address::Address;
use crate::error::Error;
use crate::store::{DeletedPage, KeyStore, WalkCursor};

/// Key series of this property.
const S_DELETED: u32 = 60;

/// Every remembered address with its ids, from a whole walk in pages of `limit` (the ids of
/// an address handed out twice merged); panics naming the property when a call fails or the
/// walk does not end.
pub async fn deleted_walk(
    what: &str,
    store: &dyn KeyStore,
    limit: usize,
) -> BTreeMap<Address, BTreeSet<String>> {
    let mut seen: BTreeMap<Address, BTreeSet<String>> = BTreeMap::new();
    let mut cursor: Option<WalkCursor> = None;
    for _ in 0..100_000 {
        let DeletedPage { entries, next } = store
            .deleted_page(cursor.as_ref(), limit)
            .await
            .unwrap_or_else(|e| panic!("{what}: deleted_page at {cursor:?} failed: {e}"));
        for e in entries {
            let sorted: Vec<String> = {
                let mut ids = e.publication_ids.clone();
                ids.sort();
                ids.dedup();
                ids
            };
            assert_eq!(
                e.publication_ids, sorted,
                "{what}: the ids of {} must be sorted and each once",
                e.address
            );
            seen.entry(e.address).or_default().extend(e.publication_ids);
        }
        match next {
            Some(n) => cursor = Some(n),
            None => return seen,
        }
    }
    panic!("{what}: a walk of the deleted publications in pages of {limit} did not end");
}

/// The publication ids of every deleted history are walked with their address (also after
/// the address has a key again), in pages of any size; `remember_deleted` adds ids to an
/// address with or without a key or remembered ids, after which publishing one of them is
/// [`Error::DeletedSince`] (a current history's id stays a plain redelivery), adding them
/// again changes nothing, and the walk shows the union. Keys are untouched. `limit` 0, bad
/// ids and an empty list are refused.
pub async fn deleted_publications_walk_and_remember(store: &dyn KeyStore) {
    const W: &str = "deleted_publications_walk_and_remember";
    let domain = format!("deleted.{DOMAIN}");
    let gone = address(&format!("gone@{domain}"));
    let back = address(&format!("back@{domain}"));
    let moved = address(&format!("moved@{domain}"));
    let live = address(&format!("live@{domain}"));
    let id = |n: u64| super::publication_id(S_DELETED, n);

    // `gone`: two versions, deleted. `back`: one version deleted, then published again.
    publish_new(W, store, test_key(&gone, S_DELETED, 1), 1).await;
    publish_new(W, store, test_key(&gone, S_DELETED, 2), 2).await;
    assert!(delete(W, store, &gone).await);
    publish_new(W, store, test_key(&back, S_DELETED, 3), 1).await;
    assert!(delete(W, store, &back).await);
    let back_now = publish_new(W, store, test_key(&back, S_DELETED, 4), 1).await;
    let live_now = publish_new(W, store, test_key(&live, S_DELETED, 5), 1).await;

    let ours = |all: &BTreeMap<Address, BTreeSet<String>>| -> BTreeMap<Address, BTreeSet<String>> {
        all.iter()
            .filter(|(a, _)| a.domain() == domain)
            .map(|(a, ids)| (a.clone(), ids.clone()))
            .collect()
    };
    let set = |ns: &[u64]| ns.iter().map(|&n| id(n)).collect::<BTreeSet<String>>();
    let want = BTreeMap::from([(gone.clone(), set(&[1, 2])), (back.clone(), set(&[3]))]);
    for limit in [1, 2, 3, 1000] {
        assert_eq!(
            ours(&deleted_walk(W, store, limit).await),
            want,
            "{W}: a walk in pages of {limit} after two deletions"
        );
    }

    // What an import brings: ids for an address that never had a key here, ids for one with
    // a key (one of them its current history's), and some already remembered.
    let remember = |a: &Address, ns: &[u64]| {
        let ids: Vec<String> = ns.iter().map(|&n| id(n)).collect();
        let a = a.clone();
        async move {
            store
                .remember_deleted(&a, &ids)
                .await
                .unwrap_or_else(|e| panic!("{W}: remember_deleted {a} {ids:?} failed: {e}"))
        }
    };
    remember(&moved, &[7, 6]).await;
    remember(&live, &[5, 8]).await;
    remember(&gone, &[2, 9]).await;
    remember(&gone, &[2, 9]).await; // again: harmless
    let want = BTreeMap::from([
        (gone.clone(), set(&[1, 2, 9])),
        (back.clone(), set(&[3])),
        (moved.clone(), set(&[6, 7])),
        (live.clone(), set(&[5, 8])),
    ]);
    for limit in [1, 1000] {
        assert_eq!(
            ours(&deleted_walk(W, store, limit).await),
            want,
            "{W}: a walk in pages of {limit} after remember_deleted"
        );
    }
    // Remembered ids win over a redelivery like those of a deletion.
    for (a, n) in [(&moved, 6), (&moved, 7), (&live, 8), (&gone, 9)] {
        publish_deleted_since(
            W,
            store,
            test_key(a, S_DELETED, n),
            "a redelivery of an id remembered by remember_deleted",
        )
        .await;
    }
    // Keys are untouched; the current history's id is still a plain redelivery.
    let current = |a: &Address| {
        let a = a.clone();
        async move {
            store
                .get(&a)
                .await
                .unwrap_or_else(|e| panic!("{W}: get {a} failed: {e}"))
        }
    };
    assert_eq!(current(&live).await, Some(live_now.clone()), "{W}: {live}");
    assert_eq!(current(&back).await, Some(back_now), "{W}: {back}");
    assert_eq!(current(&moved).await, None, "{W}: {moved} got a key");
    match store.publish(test_key(&live, S_DELETED, 5)).await {
        Ok(crate::PublishOutcome::Unchanged(r)) if r == live_now => {}
        other => panic!(
            "{W}: a redelivery of {live}'s current publication must stay Unchanged although \
             its id was remembered, got {other:?}"
        ),
    }

    // Refused: a page of 0, no ids, ids that are no publication ids.
    let refused = |what: &str, r: Result<(), Error>| match r {
        Err(Error::Invalid(_)) => {}
        other => panic!("{W}: {what} must be Error::Invalid, got {other:?}"),
    };
    refused(
        "deleted_page with limit 0",
        store.deleted_page(None, 0).await.map(drop),
    );
    refused(
        "remember_deleted of no ids",
        store.remember_deleted(&moved, &[]).await,
    );
    for bad in [
        "",
        "a b",
        "../x",
        "f".repeat(crate::store::MAX_PUBLICATION_ID + 1).as_str(),
    ] {
        refused(
            &format!("remember_deleted of {bad:?}"),
            store.remember_deleted(&moved, &[bad.to_string()]).await,
        );
    }
}
