//! The look-up index on Redis (sets of addresses per fingerprint, key ID and WKD hash, outside
//! the address' hash slot): look-ups read it, never serve an entry the record does not back,
//! `rebuild_index` backfills a store of the earlier layout, and a revocation whose tombstone
//! landed before its record is served at once.

use kst_core::certificate::Certificate;
use kst_core::conformance::lookup::real_key;
use kst_core::openpgp::dearmor_public_key;
use kst_core::wkd::WkdHash;
use kst_core::{Fingerprint, KeyStore, NewKey};

use crate::support::{TestPrefix, addr, key};

#[tokio::test]
async fn look_ups_read_the_index_and_rebuild_index_restores_it() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("nina@example.net");
    let k = real_key(&a, "subkeys", 1, false);
    let r = store.publish(k.clone()).await.unwrap().record().clone();
    assert_eq!(
        store.find_by_fingerprint(&k.fingerprint, 10).await.unwrap(),
        vec![r.clone()]
    );
    // Take the address out of the fingerprint's set by hand: a look-up that scanned the
    // addresses would still find it; this one reads the index.
    let mut raw = t.raw().await;
    let set = format!("{}fp:{}", t.prefix, k.fingerprint.as_str());
    redis::cmd("SREM")
        .arg(&set)
        .arg(a.as_str())
        .exec_async(&mut raw)
        .await
        .unwrap();
    assert!(
        store
            .find_by_fingerprint(&k.fingerprint, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.inner().rebuild_index().await.unwrap(), 1);
    assert_eq!(
        store.find_by_fingerprint(&k.fingerprint, 10).await.unwrap(),
        vec![r]
    );
}

#[tokio::test]
async fn stale_index_entries_are_never_served_and_rebuild_drops_them() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let (a, b) = (addr("olga@example.net"), addr("pete@example.net"));
    let ka = real_key(&a, "alice", 1, false);
    let kb = real_key(&b, "bob", 2, false);
    store.publish(ka.clone()).await.unwrap();
    let rb = store.publish(kb.clone()).await.unwrap().record().clone();
    // Entries that no record backs: a's address under bob's fingerprint, key ID and hash set,
    // and an address that has no key at all.
    let mut raw = t.raw().await;
    let p = &t.prefix;
    let sets = [
        format!("{p}fp:{}", kb.fingerprint.as_str()),
        format!("{p}kid:{}", kb.fingerprint.key_id().as_str()),
        format!("{p}wkd:example.net:{}", WkdHash::of_address(&b).as_str()),
    ];
    for set in &sets {
        for member in [a.as_str(), "ghost@example.net"] {
            redis::cmd("SADD")
                .arg(set)
                .arg(member)
                .exec_async(&mut raw)
                .await
                .unwrap();
        }
    }
    redis::cmd("ZADD")
        .arg(format!("{p}addrs:0"))
        .arg(0)
        .arg("ghost@example.net")
        .exec_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(
        store
            .find_by_fingerprint(&kb.fingerprint, 10)
            .await
            .unwrap(),
        vec![rb.clone()]
    );
    assert_eq!(
        store
            .find_by_key_id(&kb.fingerprint.key_id(), 10)
            .await
            .unwrap(),
        vec![rb.clone()]
    );
    assert_eq!(
        store
            .find_by_wkd_hash("example.net", &WkdHash::of_address(&b))
            .await
            .unwrap(),
        Some(rb.clone())
    );
    assert_eq!(
        store.list(None, 10).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(store.inner().rebuild_index().await.unwrap(), 2);
    for set in &sets {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(members, vec![b.as_str().to_string()], "{set}");
    }
    let ghost: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{p}addrs:0"))
        .arg("ghost@example.net")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(ghost, None);
}

/// A store written before the index existed (address keys and the single `Pindex` listing):
/// nothing is found by fingerprint or listed until `rebuild_index` (what `kst migrate` runs)
/// has indexed it; afterwards everything is, and the old listing is gone.
#[tokio::test]
async fn rebuild_index_backfills_a_store_of_the_earlier_layout() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let mut raw = t.raw().await;
    let p = &t.prefix;
    let mut records = Vec::new();
    for (i, name) in ["quinn", "rosa", "sam"].iter().enumerate() {
        let a = addr(&format!("{name}@example.net"));
        let r = key(&a, i as u64 + 1).into_record(1);
        let json = serde_json::to_string(&r).unwrap();
        let tag = a.as_str();
        redis::pipe()
            .set(format!("{p}{{{tag}}}:cur"), &json)
            .set(format!("{p}{{{tag}}}:ver"), 1)
            .hset(format!("{p}{{{tag}}}:hist"), 1, &json)
            .hset(format!("{p}{{{tag}}}:pub"), &r.publication_id, 1)
            .zadd(format!("{p}index"), tag, 0)
            .exec_async(&mut raw)
            .await
            .unwrap();
        records.push(r);
    }
    assert!(store.list(None, 10).await.unwrap().is_empty());
    assert!(
        store
            .find_by_fingerprint(&records[0].fingerprint, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.inner().rebuild_index().await.unwrap(), 3);
    let listed: Vec<_> = records.iter().map(|r| r.address.clone()).collect();
    assert_eq!(store.list(None, 10).await.unwrap(), listed);
    assert_eq!(
        store.list(Some(&listed[0]), 1).await.unwrap(),
        vec![listed[1].clone()]
    );
    for r in &records {
        assert_eq!(
            store.find_by_fingerprint(&r.fingerprint, 10).await.unwrap(),
            vec![r.clone()]
        );
        assert_eq!(
            store
                .find_by_wkd_hash("example.net", &WkdHash::of_address(&r.address))
                .await
                .unwrap(),
            Some(r.clone())
        );
    }
    let old: i64 = redis::cmd("EXISTS")
        .arg(format!("{p}index"))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(old, 0);
    // Running it again changes nothing.
    assert_eq!(store.inner().rebuild_index().await.unwrap(), 3);
    kst_core::conformance::check_consistency(store.inner()).await;
}

fn lifecycle(address: &kst_core::Address, armored: &str, n: u64, revoked: bool) -> NewKey {
    let key = dearmor_public_key(armored, 1 << 20).unwrap();
    let fingerprint =
        Fingerprint::parse(&Certificate::from_binary(&key).unwrap().fingerprint()).unwrap();
    NewKey {
        address: address.clone(),
        publication_id: format!("lifecycle{n:08x}"),
        key,
        fingerprint,
        published_at: 1_700_000_000 + n,
        revoked,
        expected: kst_core::Expected::Any,
    }
}

/// The race across hash slots, written out: a revoker has written the tombstone (its first
/// step, another slot) but its record has not landed, or an unrevoked publication that read no
/// tombstone overwrote it. Readers apply the tombstone themselves, so the key is served revoked
/// from the moment the tombstone exists; the next publication of the key stores it revoked.
#[tokio::test]
async fn a_tombstone_written_before_its_record_is_applied_by_every_reader() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("tess@example.net");
    let v1 = lifecycle(
        &a,
        include_str!("../../../kst-core/testdata/keys/lifecycle-v1.pub.asc"),
        1,
        false,
    );
    let revoked_bytes = dearmor_public_key(
        include_str!("../../../kst-core/testdata/keys/lifecycle-revoked.pub.asc"),
        1 << 20,
    )
    .unwrap();
    let stored = store.publish(v1.clone()).await.unwrap().record().clone();
    assert!(!stored.revoked);
    let tomb = kst_core::revocation::primary_revocations(&revoked_bytes).unwrap();
    assert!(!tomb.is_empty());
    let mut raw = t.raw().await;
    redis::cmd("SET")
        .arg(format!("{}tombstone:{}", t.prefix, v1.fingerprint.as_str()))
        .arg(&tomb)
        .exec_async(&mut raw)
        .await
        .unwrap();
    let served = store.get(&a).await.unwrap().unwrap();
    assert!(
        served.revoked,
        "served unrevoked while the tombstone exists"
    );
    assert!(
        !kst_core::revocation::primary_revocations(&served.key)
            .unwrap()
            .is_empty()
    );
    let found = store
        .find_by_fingerprint(&v1.fingerprint, 10)
        .await
        .unwrap();
    assert!(found.len() == 1 && found[0].revoked, "{found:?}");
    assert_eq!(found[0], served);
    // The stored record is still the unrevoked one until a publication lands...
    assert!(!store.history(&a).await.unwrap().last().unwrap().revoked);
    // ...and any later publication of the key, even one without the revocation, stores it
    // revoked.
    let again = lifecycle(
        &a,
        include_str!("../../../kst-core/testdata/keys/lifecycle-v1.pub.asc"),
        2,
        false,
    );
    let r = store.publish(again).await.unwrap().record().clone();
    assert!(r.revoked);
    assert!(store.history(&a).await.unwrap().last().unwrap().revoked);
    assert_eq!(store.get(&a).await.unwrap().unwrap(), r);
}

/// A look-up by address is one command to Redis (the `GET_SERVED` script: the record and the
/// tombstone of its fingerprint), also when a tombstone applies and when there is no key; a
/// look-up by WKD hash two (the index set, then that script). Counted by a proxy in front of
/// the server.
#[tokio::test]
async fn a_look_up_by_address_is_one_round_trip() {
    let t = TestPrefix::new().await;
    let proxy = crate::support::CountingProxy::start().await;
    let store = kst_redis::RedisStore::connect(&proxy.url, &t.prefix)
        .await
        .unwrap();
    let a = addr("ursula@example.net");
    let v1 = lifecycle(
        &a,
        include_str!("../../../kst-core/testdata/keys/lifecycle-v1.pub.asc"),
        1,
        false,
    );
    let stored = store.publish(v1.clone()).await.unwrap().record().clone();
    // The first run of the script loads it (NOSCRIPT, then EVAL): not counted.
    assert_eq!(store.get(&a).await.unwrap().as_ref(), Some(&stored));
    let count = |what: &str, before: usize, want: usize| {
        let got = proxy.commands() - before;
        assert_eq!(got, want, "{what}: {got} commands, expected {want}");
    };
    for _ in 0..5 {
        let before = proxy.commands();
        assert_eq!(store.get(&a).await.unwrap().as_ref(), Some(&stored));
        count("get", before, 1);
    }
    let before = proxy.commands();
    assert_eq!(store.get(&addr("nobody@example.net")).await.unwrap(), None);
    count("get of an address without a key", before, 1);

    // A revocation published for another address leaves a tombstone: served revoked, still in
    // one round trip.
    let revoked_bytes = dearmor_public_key(
        include_str!("../../../kst-core/testdata/keys/lifecycle-revoked.pub.asc"),
        1 << 20,
    )
    .unwrap();
    let tomb = kst_core::revocation::primary_revocations(&revoked_bytes).unwrap();
    let mut raw = t.raw().await;
    redis::cmd("SET")
        .arg(format!("{}tombstone:{}", t.prefix, v1.fingerprint.as_str()))
        .arg(&tomb)
        .exec_async(&mut raw)
        .await
        .unwrap();
    let before = proxy.commands();
    let served = store.get(&a).await.unwrap().unwrap();
    count("get with a tombstone", before, 1);
    assert!(
        served.revoked,
        "served unrevoked while the tombstone exists"
    );

    let hash = kst_core::wkd::WkdHash::of_address(&a);
    let before = proxy.commands();
    let found = store
        .find_by_wkd_hash(a.domain(), &hash)
        .await
        .unwrap()
        .unwrap();
    count("find_by_wkd_hash", before, 2);
    assert_eq!(found, served);
}

/// Look-ups of many addresses (`get_many`, the web listener's read batches) are one command
/// to Redis (the `GET_MANY_SERVED` script) per `MAX_GET_MANY` addresses, each answered as
/// `get` answers it: a tombstone written since the publication is merged in (served
/// revoked), an address without a key is `None`, a duplicate is answered twice.
#[tokio::test]
async fn a_look_up_of_many_addresses_is_one_round_trip() {
    let t = TestPrefix::new().await;
    let proxy = crate::support::CountingProxy::start().await;
    let store = kst_redis::RedisStore::connect(&proxy.url, &t.prefix)
        .await
        .unwrap();
    let a = addr("vera@example.net");
    let b = addr("walter@example.net");
    let nobody = addr("nobody@example.net");
    let v1 = lifecycle(
        &a,
        include_str!("../../../kst-core/testdata/keys/lifecycle-v1.pub.asc"),
        1,
        false,
    );
    store.publish(v1.clone()).await.unwrap();
    let rb = store
        .publish(real_key(&b, "alice", 1, false))
        .await
        .unwrap()
        .record()
        .clone();
    // A revocation of a's key stored as a tombstone since (as a concurrent publication of
    // the revoked key for another address leaves it).
    let revoked_bytes = dearmor_public_key(
        include_str!("../../../kst-core/testdata/keys/lifecycle-revoked.pub.asc"),
        1 << 20,
    )
    .unwrap();
    let tomb = kst_core::revocation::primary_revocations(&revoked_bytes).unwrap();
    let mut raw = t.raw().await;
    redis::cmd("SET")
        .arg(format!("{}tombstone:{}", t.prefix, v1.fingerprint.as_str()))
        .arg(&tomb)
        .exec_async(&mut raw)
        .await
        .unwrap();
    let asked = [a.clone(), nobody.clone(), b.clone(), a.clone()];
    // The first run of the script loads it (NOSCRIPT, then EVAL): not counted.
    store.get_many(&asked).await.unwrap();
    let before = proxy.commands();
    let got = store.get_many(&asked).await.unwrap();
    let n = proxy.commands() - before;
    assert_eq!(n, 1, "get_many of {} addresses: {n} commands", asked.len());
    let served = store.get(&a).await.unwrap().unwrap();
    assert!(served.revoked, "get serves a's key revoked");
    assert_eq!(
        got,
        vec![Some(served.clone()), None, Some(rb), Some(served)]
    );

    // More than one round trip's worth: one command per MAX_GET_MANY addresses.
    let many: Vec<_> = (0..kst_core::store::MAX_GET_MANY + 1)
        .map(|i| {
            if i % 2 == 0 {
                b.clone()
            } else {
                nobody.clone()
            }
        })
        .collect();
    let before = proxy.commands();
    let got = store.get_many(&many).await.unwrap();
    assert_eq!(proxy.commands() - before, 2);
    assert_eq!(got.len(), many.len());
    assert!(
        got.iter()
            .step_by(2)
            .all(|r| r.as_ref().is_some_and(|r| r.address == b))
    );
    assert!(got.iter().skip(1).step_by(2).all(Option::is_none));
}
