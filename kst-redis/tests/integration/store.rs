//! Behaviour of one store and of several stores (separate connections) on one server.

use std::collections::BTreeSet;
use std::sync::Arc;

use kst_core::{Error, KeyRecord, KeyStore, PublishOutcome};
use kst_redis::{MAX_VERSION, RedisStore};

use crate::support::{TestPrefix, addr, consistent, key};

#[tokio::test]
async fn versions_start_at_one_and_history_is_oldest_first() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("alice@example.net");
    assert_eq!(store.get(&a).await.unwrap(), None);
    assert!(store.history(&a).await.unwrap().is_empty());

    // 12 versions: the history must sort numerically, not as strings ("10" < "2").
    for n in 1..=12 {
        match store.publish(key(&a, n)).await.unwrap() {
            PublishOutcome::Published(r) => assert_eq!(r, key(&a, n).into_record(n)),
            other => panic!("expected Published, got {other:?}"),
        }
    }
    assert_eq!(
        store.get(&a).await.unwrap(),
        Some(key(&a, 12).into_record(12))
    );
    let expected: Vec<KeyRecord> = (1..=12).map(|n| key(&a, n).into_record(n)).collect();
    assert_eq!(store.history(&a).await.unwrap(), expected);
    store.check().await.unwrap();
}

#[tokio::test]
async fn the_key_layout_is_the_documented_one() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("alice@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let p = &t.prefix;
    let expected: Vec<String> = [
        format!("{p}index"),
        format!("{p}{{alice@example.net}}:cur"),
        format!("{p}{{alice@example.net}}:hist"),
        format!("{p}{{alice@example.net}}:pub"),
        format!("{p}{{alice@example.net}}:ver"),
    ]
    .into_iter()
    .collect();
    assert_eq!(t.keys().await, expected);
    assert!(store.delete(&a).await.unwrap());
    assert!(t.keys().await.is_empty(), "delete left keys behind");
}

#[tokio::test]
async fn republishing_is_idempotent() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("bob@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    store.publish(key(&a, 2)).await.unwrap();

    let mut again = key(&a, 1);
    again.key = b"different bytes".to_vec();
    assert_eq!(
        store.publish(again).await.unwrap(),
        PublishOutcome::Unchanged(key(&a, 1).into_record(1))
    );
    let mut same = key(&a, 2);
    same.publication_id = "ffff".into();
    assert_eq!(
        store.publish(same).await.unwrap(),
        PublishOutcome::Unchanged(key(&a, 2).into_record(2))
    );
    let mut old_bytes = key(&a, 3);
    old_bytes.key = key(&a, 1).key;
    assert_eq!(
        store.publish(old_bytes.clone()).await.unwrap(),
        PublishOutcome::Published(old_bytes.into_record(3))
    );
    assert_eq!(store.history(&a).await.unwrap().len(), 3);
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

#[tokio::test]
async fn delete_removes_everything_and_numbering_restarts() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("carol@example.net");
    let b = addr("dave@example.net");
    assert!(!store.delete(&a).await.unwrap());
    store.publish(key(&a, 1)).await.unwrap();
    store.publish(key(&a, 2)).await.unwrap();
    store.publish(key(&b, 7)).await.unwrap();

    assert!(store.delete(&a).await.unwrap());
    assert!(!store.delete(&a).await.unwrap());
    assert_eq!(store.get(&a).await.unwrap(), None);
    assert!(store.history(&a).await.unwrap().is_empty());
    assert_eq!(store.list(None, 10).await.unwrap(), vec![b.clone()]);
    assert_eq!(
        store.publish(key(&a, 2)).await.unwrap(),
        PublishOutcome::Published(key(&a, 2).into_record(1))
    );
    assert_eq!(
        store.get(&b).await.unwrap(),
        Some(key(&b, 7).into_record(1))
    );
}

#[tokio::test]
async fn list_is_in_byte_order_and_pages() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let names = [
        "zoe@example.net",
        "Zed@example.net",
        "alice@example.net",
        "über@example.net",
        "alice@example.org",
        "al.ice@example.net",
    ];
    let mut expected: Vec<_> = names.iter().map(|s| addr(s)).collect();
    for (n, a) in expected.iter().enumerate() {
        store.publish(key(a, n as u64 + 1)).await.unwrap();
    }
    expected.sort_by(|x, y| x.as_str().as_bytes().cmp(y.as_str().as_bytes()));

    assert_eq!(store.list(None, 100).await.unwrap(), expected);
    assert!(store.list(None, 0).await.unwrap().is_empty());
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(paged, expected);
    let between = addr("b@example.net");
    let rest: Vec<_> = expected
        .iter()
        .filter(|a| a.as_str().as_bytes() > between.as_str().as_bytes())
        .cloned()
        .collect();
    assert_eq!(store.list(Some(&between), 100).await.unwrap(), rest);
}

#[tokio::test]
async fn restore_replaces_the_history() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("erin@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    store.publish(key(&a, 2)).await.unwrap();

    let mut imported: Vec<KeyRecord> = [(10, 2), (11, 5), (12, 9)]
        .into_iter()
        .map(|(n, v)| key(&a, n).into_record(v))
        .collect();
    imported[1].revoked = true;
    imported[0].format = 7;
    store.restore(&imported).await.unwrap();
    assert_eq!(store.history(&a).await.unwrap(), imported);
    assert_eq!(store.get(&a).await.unwrap().as_ref(), imported.last());
    // The publication ids of the replaced history are gone, the restored ones count.
    assert_eq!(
        store.publish(key(&a, 11)).await.unwrap(),
        PublishOutcome::Unchanged(imported[1].clone())
    );
    assert_eq!(
        store.publish(key(&a, 1)).await.unwrap(),
        PublishOutcome::Published(key(&a, 1).into_record(10))
    );

    let b = addr("frank@example.net");
    let one = vec![key(&b, 3).into_record(4)];
    store.restore(&one).await.unwrap();
    assert_eq!(store.history(&b).await.unwrap(), one);
    assert_eq!(store.list(None, 10).await.unwrap(), vec![a, b]);
}

#[tokio::test]
async fn restore_refuses_bad_histories_without_touching_the_store() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let a = addr("gina@example.net");
    let b = addr("hank@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let before = store.history(&a).await.unwrap();

    let cases: Vec<Vec<KeyRecord>> = vec![
        vec![],
        vec![key(&a, 2).into_record(2), key(&a, 3).into_record(2)],
        vec![key(&a, 2).into_record(1), key(&b, 3).into_record(2)],
        vec![key(&a, 2).into_record(MAX_VERSION + 1)],
    ];
    for case in cases {
        let err = store.restore(&case).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
        assert!(!err.is_temporary());
    }
    assert_eq!(store.history(&a).await.unwrap(), before);
    assert!(store.get(&b).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_serialize_per_address() {
    const STORES: u64 = 4;
    const KEYS: u64 = 8;
    let t = TestPrefix::new().await;
    let mut stores = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(t.store().await));
    }
    let addresses = [addr("x@example.net"), addr("y@example.net")];
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for a in &addresses {
            let (store, a) = (store.clone(), a.clone());
            let s = s as u64;
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..KEYS {
                    // Every key is published by two stores: one of them must see Unchanged.
                    let n = ((s + i) % STORES) * KEYS + i + 1;
                    outcomes.push(store.publish(key(&a, n)).await.unwrap());
                }
                outcomes
            }));
        }
    }
    let mut published = Vec::new();
    let mut unchanged = Vec::new();
    for task in tasks {
        for o in task.await.unwrap() {
            match o {
                PublishOutcome::Published(r) => published.push(r),
                PublishOutcome::Unchanged(r) => unchanged.push(r),
            }
        }
    }
    for a in &addresses {
        let history = stores[0].history(a).await.unwrap();
        let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
        assert_eq!(versions, (1..=history.len() as u64).collect::<Vec<_>>());
        let ids: BTreeSet<&str> = history.iter().map(|r| r.publication_id.as_str()).collect();
        assert_eq!(ids.len(), history.len(), "a publication landed twice");
        let mine: Vec<&KeyRecord> = published.iter().filter(|r| &r.address == a).collect();
        assert_eq!(mine.len(), history.len());
        for r in mine {
            assert_eq!(history.get(r.version as usize - 1), Some(r));
        }
        for r in unchanged.iter().filter(|r| &r.address == a) {
            assert!(
                history.contains(r),
                "Unchanged names a record not in the history"
            );
        }
        assert_eq!(stores[1].get(a).await.unwrap().as_ref(), history.last());
        assert!(history.iter().all(consistent));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_whole_records_while_publishers_write() {
    let t = TestPrefix::new().await;
    let writer = t.store().await;
    let reader = t.store().await;
    let a = addr("ivy@example.net");
    writer.publish(key(&a, 1)).await.unwrap();
    let w = {
        let a = a.clone();
        tokio::spawn(async move {
            for n in 2..=40 {
                writer.publish(key(&a, n)).await.unwrap();
            }
        })
    };
    let mut last = 0;
    let mut reads = 0;
    while !w.is_finished() || reads == 0 {
        let r = reader.get(&a).await.unwrap().expect("published before");
        assert!(consistent(&r), "torn read: {r:?}");
        assert!(r.version >= last, "version went back");
        last = r.version;
        reads += 1;
        tokio::task::yield_now().await;
    }
    w.await.unwrap();
    assert_eq!(reader.get(&a).await.unwrap().unwrap().version, 40);
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
    redis::cmd("ZADD")
        .arg(format!("{p}index"))
        .arg(0)
        .arg("Not An Address")
        .exec_async(&mut raw)
        .await
        .unwrap();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_racing_deletes_and_restores_leave_a_clean_history() {
    let t = TestPrefix::new().await;
    let (publisher, deleter) = (t.store().await, t.store().await);
    let a = addr("race@example.net");
    let p = {
        let a = a.clone();
        tokio::spawn(async move {
            for n in 1..=30 {
                publisher.publish(key(&a, n)).await.unwrap();
            }
        })
    };
    let mut rounds = 0u64;
    while !p.is_finished() || rounds == 0 {
        rounds += 1;
        if rounds.is_multiple_of(2) {
            deleter.delete(&a).await.unwrap();
        } else {
            let restored = [key(&a, 100 + rounds).into_record(1)];
            deleter.restore(&restored).await.unwrap();
        }
    }
    p.await.unwrap();
    let history = deleter.history(&a).await.unwrap();
    let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
    assert_eq!(versions, (1..=history.len() as u64).collect::<Vec<_>>());
    assert!(history.iter().all(consistent));
    assert_eq!(deleter.get(&a).await.unwrap().as_ref(), history.last());
    let listed = deleter.list(None, 10).await.unwrap();
    assert_eq!(listed.is_empty(), history.is_empty());
}
