//! What is particular to Redis: its key layout, hash tags, number range, damaged data, URLs and
//! prefixes. The contract every store keeps is checked by the conformance suite
//! (`conformance.rs`).

use kst_core::{Error, KeyStore, PublishOutcome};
use kst_redis::{MAX_VERSION, RedisStore};

use crate::support::{TestPrefix, addr, key};

#[tokio::test]
async fn the_key_layout_is_the_documented_one() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("alice@example.net");
    let k = key(&a, 1);
    store.publish(k.clone()).await.unwrap();
    let p = &t.prefix;
    let keys = t.keys().await;
    let buckets: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{p}addrs:")))
        .collect();
    assert_eq!(buckets.len(), 1, "{keys:?}");
    let mut expected: Vec<String> = vec![
        buckets[0].clone(),
        format!("{p}fp:{}", k.fingerprint.as_str()),
        format!("{p}kid:{}", k.fingerprint.key_id().as_str()),
        format!(
            "{p}wkd:example.net:{}",
            kst_core::wkd::WkdHash::of_address(&a).as_str()
        ),
        format!("{p}{{alice@example.net}}:cur"),
        format!("{p}{{alice@example.net}}:hist"),
        format!("{p}{{alice@example.net}}:pub"),
        format!("{p}{{alice@example.net}}:ver"),
    ];
    expected.sort();
    assert_eq!(keys, expected);
    assert!(store.delete(&a).await.unwrap());
    // Only the publication ids of the deleted history stay (deletion wins over a redelivery).
    let deleted = format!("{p}{{alice@example.net}}:deleted");
    assert_eq!(
        t.keys().await,
        std::slice::from_ref(&deleted),
        "delete left keys behind"
    );
    let mut conn = t.raw().await;
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&deleted)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids, std::slice::from_ref(&k.publication_id));
    assert!(matches!(
        store.publish(k.clone()).await,
        Err(Error::DeletedSince { .. })
    ));
    assert_eq!(
        t.keys().await,
        [deleted],
        "a refused redelivery writes nothing"
    );
}

#[tokio::test]
async fn numbers_and_odd_addresses_round_trip_exactly() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    // Braces and percent signs are legal in local parts and must not break the hash tag.
    let a = addr("}we{ird%@example.net");
    let mut k = key(&a, 1);
    k.published_at = u64::MAX;
    k.revoked = true;
    k.key = (0..=255).collect();
    let r = store.publish(k.clone()).await.unwrap();
    assert_eq!(r, PublishOutcome::Published(k.clone().into_record(1)));
    assert_eq!(store.get(&a).await.unwrap(), Some(k.into_record(1)));
    assert_eq!(store.list(None, 10).await.unwrap(), vec![a]);
}

/// What the conformance suite cannot ask of every backend: a version past [`MAX_VERSION`] (the
/// largest integer a Lua script counts exactly) is refused as invalid, and changes nothing.
#[tokio::test]
async fn versions_past_the_maximum_are_refused_without_touching_the_store() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("gina@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let before = store.history(&a).await.unwrap();

    let err = store
        .restore(&[key(&a, 2).into_record(MAX_VERSION + 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(!err.is_temporary());
    assert_eq!(store.history(&a).await.unwrap(), before);
    store
        .restore(&[key(&a, 3).into_record(MAX_VERSION)])
        .await
        .unwrap();
}

#[tokio::test]
async fn unreadable_data_gives_corrupt_errors() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let (a, b, c) = (
        addr("jack@example.net"),
        addr("kim@example.net"),
        addr("lou@example.net"),
    );
    for x in [&a, &b, &c] {
        store.publish(key(x, 1)).await.unwrap();
    }
    let mut raw = t.raw().await;
    let p = &t.prefix;
    let set = |k: String, v: &str| redis::cmd("SET").arg(k).arg(v).to_owned();
    set(format!("{p}{{jack@example.net}}:cur"), "not json")
        .exec_async(&mut raw)
        .await
        .unwrap();
    redis::cmd("HSET")
        .arg(format!("{p}{{jack@example.net}}:hist"))
        .arg("1")
        .arg("{\"version\":1}")
        .exec_async(&mut raw)
        .await
        .unwrap();
    // A record of another address under kim's key.
    let other = serde_json::to_string(&key(&c, 1).into_record(1)).unwrap();
    set(format!("{p}{{kim@example.net}}:cur"), &other)
        .exec_async(&mut raw)
        .await
        .unwrap();
    // Wrong type.
    redis::cmd("DEL")
        .arg(format!("{p}{{lou@example.net}}:hist"))
        .exec_async(&mut raw)
        .await
        .unwrap();
    redis::cmd("SADD")
        .arg(format!("{p}{{lou@example.net}}:hist"))
        .arg("x")
        .exec_async(&mut raw)
        .await
        .unwrap();
    for bucket in 0..16 {
        redis::cmd("ZADD")
            .arg(format!("{p}addrs:{bucket:x}"))
            .arg(0)
            .arg("Not An Address")
            .exec_async(&mut raw)
            .await
            .unwrap();
    }

    let corrupt = |e: Error| assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    corrupt(store.get(&a).await.unwrap_err());
    corrupt(store.history(&a).await.unwrap_err());
    corrupt(store.publish(key(&a, 2)).await.unwrap_err());
    corrupt(store.get(&b).await.unwrap_err());
    corrupt(store.history(&c).await.unwrap_err());
    corrupt(store.list(None, 10).await.unwrap_err());
}

#[tokio::test]
async fn configuration_errors() {
    for url in [
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:port",
        "nonsense",
    ] {
        let err = RedisStore::connect(url, "kst:").await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
    }
    let err = RedisStore::connect(&crate::support::url(), "k{s}t:")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

#[tokio::test]
async fn prefixes_keep_pools_apart() {
    let t1 = TestPrefix::new().await;
    let t2 = TestPrefix::new().await;
    let (s1, s2) = (t1.store().await, t2.store().await);
    let a = addr("mia@example.net");
    s1.publish(key(&a, 1)).await.unwrap();
    assert_eq!(s2.get(&a).await.unwrap(), None);
    assert!(s2.list(None, 10).await.unwrap().is_empty());
    assert_eq!(s1.inner().prefix(), t1.prefix);
}
