//! The walk of a whole store in its own order ([`KeyStore::list_page`]): every address that
//! has a key is handed out exactly once, in pages of at most the limit asked, also while
//! addresses are deleted and published between pages.

use std::collections::{BTreeMap, BTreeSet};

use super::{DOMAIN, address, delete, list_all, publish_new, test_key};
use crate::address::Address;
use crate::store::{KeyStore, WalkCursor, WalkPage};

/// Key series of this property.
const S_WALK: u32 = 50;

/// Addresses the property publishes before walking.
const WALKED: usize = 40;

/// One page, checked for its limit; panics naming the property when the call fails.
async fn page(
    what: &str,
    store: &dyn KeyStore,
    cursor: Option<&WalkCursor>,
    limit: usize,
) -> WalkPage {
    let page = store
        .list_page(cursor, limit)
        .await
        .unwrap_or_else(|e| panic!("{what}: list_page at {cursor:?} limit {limit} failed: {e}"));
    assert!(
        page.addresses.len() <= limit,
        "{what}: list_page limit {limit} returned {} addresses",
        page.addresses.len()
    );
    page
}

/// A whole walk in pages of `limit`: every address handed out with how many times it was.
async fn walk(what: &str, store: &dyn KeyStore, limit: usize) -> BTreeMap<Address, usize> {
    let mut seen = BTreeMap::new();
    let mut cursor = None;
    let mut pages = 0usize;
    loop {
        let WalkPage { addresses, next } = page(what, store, cursor.as_ref(), limit).await;
        for a in addresses {
            *seen.entry(a).or_insert(0) += 1;
        }
        pages += 1;
        assert!(
            pages <= 10_000,
            "{what}: a walk in pages of {limit} did not end after {pages} pages"
        );
        match next {
            Some(next) => cursor = Some(next),
            None => return seen,
        }
    }
}

/// Panics unless every address of `seen` was handed out once.
fn once(what: &str, ctx: &str, seen: &BTreeMap<Address, usize>) {
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{what}: {ctx}: addresses handed out more than once: {twice:?}"
    );
}

/// `list_page` walks every address that has a key exactly once, in pages of at most the
/// limit, whatever the page size; it agrees with `list` on what the store holds. Between
/// pages, addresses are deleted (some already handed out, some not yet, the last one handed
/// out) and published: those that stay are handed out exactly once, the deleted ones never
/// after their deletion, the new ones at most once. `limit` 0 and a cursor the store never
/// handed out are refused.
pub async fn list_page_walks_every_address_once(store: &dyn KeyStore) {
    const W: &str = "list_page_walks_every_address_once";
    let domain = format!("walk.{DOMAIN}");
    let ours: Vec<Address> = (0..WALKED)
        .map(|i| address(&format!("w{i:02}@{domain}")))
        .collect();
    for (i, a) in ours.iter().enumerate() {
        publish_new(W, store, test_key(a, S_WALK, i as u64), 1).await;
    }
    let listed: BTreeSet<Address> = list_all(W, store, 1000).await.into_iter().collect();
    for limit in [1, 3, 7, 1000] {
        let seen = walk(W, store, limit).await;
        once(W, &format!("pages of {limit}"), &seen);
        let walked: BTreeSet<Address> = seen.into_keys().collect();
        assert_eq!(
            walked, listed,
            "{W}: a walk in pages of {limit} must hand out exactly what list holds"
        );
    }

    // Deletes and publications between the pages of one walk.
    let mut handed: BTreeMap<Address, usize> = BTreeMap::new();
    let mut deleted: BTreeSet<Address> = BTreeSet::new();
    let mut added: Vec<Address> = Vec::new();
    let mut cursor = None;
    let mut pages = 0usize;
    loop {
        let WalkPage { addresses, next } = page(W, store, cursor.as_ref(), 3).await;
        for a in &addresses {
            assert!(
                !deleted.contains(a),
                "{W}: {a} was handed out after its deletion"
            );
            *handed.entry(a.clone()).or_insert(0) += 1;
        }
        pages += 1;
        assert!(pages <= 10_000, "{W}: the walk did not end");
        if pages == 2 {
            // The last one handed out, one handed out before, and three not handed out yet.
            let mut gone: Vec<Address> = addresses.last().into_iter().cloned().collect();
            gone.extend(handed.keys().find(|a| !gone.contains(a)).cloned());
            gone.extend(
                ours.iter()
                    .filter(|a| !handed.contains_key(*a))
                    .take(3)
                    .cloned(),
            );
            for a in gone {
                if ours.contains(&a) && deleted.insert(a.clone()) {
                    assert!(delete(W, store, &a).await, "{W}: {a} had a key to delete");
                }
            }
            for i in 0..3 {
                let a = address(&format!("new{i}@{domain}"));
                publish_new(W, store, test_key(&a, S_WALK, 100 + i), 1).await;
                added.push(a);
            }
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    once(W, "deletes between pages", &handed);
    assert!(
        deleted.iter().any(|a| !handed.contains_key(a)),
        "{W}: the walk must have had addresses left to delete after its second page"
    );
    for a in listed.iter().filter(|a| !deleted.contains(*a)) {
        assert!(
            handed.contains_key(a),
            "{W}: {a} had a key throughout the walk but was not handed out"
        );
    }
    for a in handed.keys() {
        assert!(
            listed.contains(a) || added.contains(a),
            "{W}: {a} was handed out but was never published"
        );
    }

    // What the store holds now, walked again: the deleted ones are gone, the new ones there.
    let seen = walk(W, store, 4).await;
    once(W, "after the deletes", &seen);
    for a in &deleted {
        assert!(!seen.contains_key(a), "{W}: deleted {a} is still walked");
    }
    for a in &added {
        assert!(seen.contains_key(a), "{W}: published {a} is not walked");
    }

    assert!(
        store.list_page(None, 0).await.is_err(),
        "{W}: limit 0 must be refused (the walk would never end)"
    );
    let foreign = WalkCursor::new("not a cursor of this store \u{1}");
    assert!(
        store.list_page(Some(&foreign), 5).await.is_err(),
        "{W}: a cursor the store never handed out must be refused"
    );

    // Leave the domain as other properties expect to find the store: without these addresses.
    for a in ours.iter().filter(|a| !deleted.contains(*a)).chain(&added) {
        delete(W, store, a).await;
    }
}
