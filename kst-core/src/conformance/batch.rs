//! [`KeyStore::get_many`] as an executable check: the look-ups the web listener gathers answer
//! exactly what [`KeyStore::get`] answers for each address.
//!
//! Part of [`run_all`](super::run_all); the property is also a `pub async fn` of its own.

use super::{DOMAIN, address, delete, describe_opt, get, publish_new, test_key};
use crate::address::Address;
use crate::store::{KeyRecord, KeyStore, MAX_GET_MANY};

const S_BATCH: u32 = 70;

/// `get_many` of `addresses`, panicking with context on an error or an answer of the wrong
/// length.
async fn get_many(
    what: &str,
    store: &dyn KeyStore,
    addresses: &[Address],
) -> Vec<Option<KeyRecord>> {
    let got = store.get_many(addresses).await.unwrap_or_else(|e| {
        panic!(
            "{what}: get_many of {} addresses failed: {e}",
            addresses.len()
        )
    });
    assert_eq!(
        got.len(),
        addresses.len(),
        "{what}: get_many answered {} records for {} addresses (one answer per address asked, \
         in order)",
        got.len(),
        addresses.len()
    );
    got
}

/// Checks `got` (a `get_many` of `asked`) against `get` of each address and against `want`
/// (what the property published).
async fn same_as_get(
    what: &str,
    ctx: &str,
    store: &dyn KeyStore,
    asked: &[Address],
    got: &[Option<KeyRecord>],
    want: &(dyn Fn(&Address) -> Option<KeyRecord> + Sync),
) {
    for (i, (a, g)) in asked.iter().zip(got).enumerate() {
        let one = get(what, store, a).await;
        assert!(
            g.as_ref() == one.as_ref(),
            "{what}: {ctx}: get_many answered for {a} (position {i}):\n  got:  {}\n  but get \
             answers: {}",
            describe_opt(g.as_ref()),
            describe_opt(one.as_ref())
        );
        let w = want(a);
        assert!(
            g.as_ref() == w.as_ref(),
            "{what}: {ctx}: get_many answered for {a} (position {i}):\n  got:  {}\n  want: {}",
            describe_opt(g.as_ref()),
            describe_opt(w.as_ref())
        );
    }
}

/// `get_many` answers, in the order asked and once per address asked (duplicates too), what
/// `get` answers for each: the current key only of an address with several versions, `None`
/// for an unknown address and for a deleted one, the record as `get` serves it (a revoked
/// key revoked); an empty list gets an empty answer; a list longer than [`MAX_GET_MANY`]
/// is answered whole.
pub async fn get_many_answers_like_get(store: &dyn KeyStore) {
    const W: &str = "get_many_answers_like_get";
    let domain = format!("batch.{DOMAIN}");
    let superseded = address(&format!("superseded@{domain}"));
    let single = address(&format!("single@{domain}"));
    let deleted = address(&format!("deleted@{domain}"));
    let unknown = address(&format!("unknown@{domain}"));
    let revoked = address(&format!("revoked@{domain}"));

    assert!(
        get_many(W, store, &[]).await.is_empty(),
        "{W}: get_many of no address must answer nothing"
    );

    let mut current = None;
    for n in 1..=3 {
        current = Some(publish_new(W, store, test_key(&superseded, S_BATCH, n), n).await);
    }
    let current = current.expect("three versions published");
    let one = publish_new(W, store, test_key(&single, S_BATCH, 10), 1).await;
    publish_new(W, store, test_key(&deleted, S_BATCH, 20), 1).await;
    assert!(
        delete(W, store, &deleted).await,
        "{W}: delete {deleted} must find its key"
    );
    let revoked_now = publish_new(
        W,
        store,
        super::lookup::real_key(&revoked, "revoked", 30, true),
        1,
    )
    .await;
    assert!(revoked_now.revoked, "{W}: a revoked key is stored revoked");

    let want = |a: &Address| -> Option<KeyRecord> {
        if a == &superseded {
            Some(current.clone())
        } else if a == &single {
            Some(one.clone())
        } else if a == &revoked {
            Some(revoked_now.clone())
        } else {
            None
        }
    };

    // Each kind alone, then mixed, with duplicates next to each other and apart.
    for a in [&superseded, &single, &deleted, &unknown, &revoked] {
        let asked = [a.clone()];
        let got = get_many(W, store, &asked).await;
        same_as_get(W, &format!("{a} alone"), store, &asked, &got, &want).await;
    }
    let asked = vec![
        superseded.clone(),
        unknown.clone(),
        deleted.clone(),
        single.clone(),
        superseded.clone(),
        superseded.clone(),
        unknown.clone(),
        revoked.clone(),
        single.clone(),
        deleted.clone(),
    ];
    let got = get_many(W, store, &asked).await;
    same_as_get(
        W,
        "a mixed list with duplicates",
        store,
        &asked,
        &got,
        &want,
    )
    .await;
    let asked = vec![unknown.clone(), deleted.clone(), unknown.clone()];
    let got = get_many(W, store, &asked).await;
    same_as_get(
        W,
        "only addresses without a key",
        store,
        &asked,
        &got,
        &want,
    )
    .await;

    // Longer than one round trip's worth: answered whole, in order.
    let kinds = [&superseded, &unknown, &single, &deleted, &revoked];
    let asked: Vec<Address> = (0..MAX_GET_MANY * 2 + 3)
        .map(|i| kinds[i % kinds.len()].clone())
        .collect();
    let got = get_many(W, store, &asked).await;
    for (i, (a, g)) in asked.iter().zip(&got).enumerate() {
        let w = want(a);
        assert!(
            g.as_ref() == w.as_ref(),
            "{W}: a list of {} addresses, position {i} ({a}):\n  got:  {}\n  want: {}",
            asked.len(),
            describe_opt(g.as_ref()),
            describe_opt(w.as_ref())
        );
    }

    // A new version is what the next get_many answers.
    let newer = publish_new(W, store, test_key(&single, S_BATCH, 11), 2).await;
    let got = get_many(W, store, &[single.clone(), superseded.clone()]).await;
    assert!(
        got[0].as_ref() == Some(&newer) && got[1].as_ref() == Some(&current),
        "{W}: after a new version of {single}: got {} and {}",
        describe_opt(got[0].as_ref()),
        describe_opt(got[1].as_ref())
    );
}
