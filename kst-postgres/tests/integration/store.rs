//! Behaviour of one store and of several stores (separate pools) on one database.

use std::collections::BTreeSet;
use std::sync::Arc;

use kst_core::{Error, KeyRecord, KeyStore, PublishOutcome};
use kst_postgres::PostgresStore;

use crate::support::{TestDb, addr, consistent, key};

#[tokio::test]
async fn versions_start_at_one_and_history_is_oldest_first() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let a = addr("alice@example.net");
    assert_eq!(store.get(&a).await.unwrap(), None);
    assert!(store.history(&a).await.unwrap().is_empty());

    for n in 1..=3 {
        match store.publish(key(&a, n)).await.unwrap() {
            PublishOutcome::Published(r) => {
                assert_eq!(r.version, n);
                assert_eq!(r, key(&a, n).into_record(n));
            }
            other => panic!("expected Published, got {other:?}"),
        }
    }
    let current = store.get(&a).await.unwrap().unwrap();
    assert_eq!(current, key(&a, 3).into_record(3));
    let history = store.history(&a).await.unwrap();
    let expected: Vec<KeyRecord> = (1..=3).map(|n| key(&a, n).into_record(n)).collect();
    assert_eq!(history, expected);
    store.check().await.unwrap();
}

#[tokio::test]
async fn republishing_is_idempotent() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let a = addr("bob@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    store.publish(key(&a, 2)).await.unwrap();

    // Redelivery of the first publication, even with other key bytes: the old record, no write.
    let mut again = key(&a, 1);
    again.key = b"different bytes".to_vec();
    assert_eq!(
        store.publish(again).await.unwrap(),
        PublishOutcome::Unchanged(key(&a, 1).into_record(1))
    );
    // Same bytes as the current key under a new publication id: the current record.
    let mut same = key(&a, 2);
    same.publication_id = "ffff".into();
    assert_eq!(
        store.publish(same).await.unwrap(),
        PublishOutcome::Unchanged(key(&a, 2).into_record(2))
    );
    // The same bytes as an *older* key are a new publication (a rollback to that key).
    let mut old_bytes = key(&a, 3);
    old_bytes.key = key(&a, 1).key;
    let r = store.publish(old_bytes.clone()).await.unwrap();
    assert_eq!(r, PublishOutcome::Published(old_bytes.into_record(3)));
    assert_eq!(store.history(&a).await.unwrap().len(), 3);
}

#[tokio::test]
async fn delete_removes_everything_and_numbering_restarts() {
    let db = TestDb::new().await;
    let store = db.store().await;
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

    // The old publication ids went with the history: publishing one again is a new version 1.
    let r = store.publish(key(&a, 2)).await.unwrap();
    assert_eq!(r, PublishOutcome::Published(key(&a, 2).into_record(1)));
    assert_eq!(
        store.get(&b).await.unwrap(),
        Some(key(&b, 7).into_record(1))
    );
}

#[tokio::test]
async fn list_is_in_byte_order_and_pages() {
    let db = TestDb::new().await;
    let store = db.store().await;
    // Byte order differs from a linguistic collation: 'Z' < 'a' < 'ü' (0xC3 0xBC).
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
    // `after` need not be a stored address.
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
    let db = TestDb::new().await;
    let store = db.store().await;
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

    // Publication ids of the restored history count for idempotency; numbering goes on.
    assert_eq!(
        store.publish(key(&a, 11)).await.unwrap(),
        PublishOutcome::Unchanged(imported[1].clone())
    );
    assert_eq!(
        store.publish(key(&a, 1)).await.unwrap(),
        PublishOutcome::Published(key(&a, 1).into_record(10))
    );

    // Restoring an address that has nothing yet creates it.
    let b = addr("frank@example.net");
    let one = vec![key(&b, 3).into_record(4)];
    store.restore(&one).await.unwrap();
    assert_eq!(store.history(&b).await.unwrap(), one);
    assert_eq!(store.list(None, 10).await.unwrap(), vec![a.clone(), b]);
}

#[tokio::test]
async fn restore_refuses_bad_histories_without_touching_the_store() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let a = addr("gina@example.net");
    let b = addr("hank@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let before = store.history(&a).await.unwrap();

    let cases: Vec<Vec<KeyRecord>> = vec![
        vec![],
        vec![key(&a, 2).into_record(2), key(&a, 3).into_record(2)],
        vec![key(&a, 2).into_record(1), key(&b, 3).into_record(2)],
        vec![key(&a, 2).into_record(u64::MAX)],
    ];
    for case in cases {
        let err = store.restore(&case).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
        assert!(!err.is_temporary());
    }
    let mut far = key(&a, 5);
    far.published_at = u64::MAX;
    assert!(matches!(
        store.publish(far).await.unwrap_err(),
        Error::Invalid(_)
    ));
    assert_eq!(store.history(&a).await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_serialize_per_address() {
    const STORES: u64 = 4;
    const KEYS: u64 = 8;
    let db = TestDb::new().await;
    let mut stores = Vec::new();
    for _ in 0..STORES {
        stores.push(Arc::new(db.store().await));
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
    for t in tasks {
        for o in t.await.unwrap() {
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
    let db = TestDb::new().await;
    let writer = db.store().await;
    let reader = db.store().await;
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
    }
    w.await.unwrap();
    assert_eq!(reader.get(&a).await.unwrap().unwrap().version, 40);
}

#[tokio::test]
async fn unreadable_rows_are_corrupt_errors() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let a = addr("jack@example.net");
    let b = addr("kim@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    store.publish(key(&b, 1)).await.unwrap();
    let pool = store.inner().pool();
    sqlx::query("UPDATE kst_key_history SET published_at = -5 WHERE address = $1")
        .bind(a.as_str())
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE kst_keys SET current_version = 9 WHERE address = $1")
        .bind(b.as_str())
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO kst_keys (address, current_version) VALUES ('Bad Address', 1)")
        .execute(pool)
        .await
        .unwrap();

    let corrupt = |e: Error| assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    corrupt(store.get(&a).await.unwrap_err());
    corrupt(store.history(&a).await.unwrap_err());
    corrupt(store.get(&b).await.unwrap_err());
    corrupt(store.publish(key(&b, 2)).await.unwrap_err());
    corrupt(store.list(None, 10).await.unwrap_err());
}

#[tokio::test]
async fn migrations_are_idempotent_and_check_wants_the_schema() {
    let db = TestDb::new().await;
    let bare = PostgresStore::builder(&db.url)
        .run_migrations(false)
        .connect()
        .await
        .unwrap();
    let err = bare.check().await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.is_temporary());
    let a = addr("lee@example.net");
    assert!(matches!(bare.get(&a).await.unwrap_err(), Error::Config(_)));

    bare.inner().migrate().await.unwrap();
    bare.inner().migrate().await.unwrap();
    bare.check().await.unwrap();
    // Another instance connecting (and migrating) concurrently is fine too.
    let (x, y) = tokio::join!(db.store(), db.store());
    x.publish(key(&a, 1)).await.unwrap();
    assert_eq!(y.get(&a).await.unwrap().unwrap().version, 1);
}

#[tokio::test]
async fn invalid_urls_are_configuration_errors() {
    for url in [
        "mysql://db.example/kst",
        "postgres://db.example:port/kst",
        "db.example",
    ] {
        let err = PostgresStore::connect(url).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_racing_deletes_and_restores_leave_a_clean_history() {
    let db = TestDb::new().await;
    let (publisher, deleter) = (db.store().await, db.store().await);
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
