//! What is particular to PostgreSQL: its number range, damaged rows, migrations and URLs. The
//! contract every store keeps is checked by the conformance suite (`conformance.rs`).

use kst_core::{Error, KeyStore};
use kst_postgres::PostgresStore;

use crate::support::{TestDb, addr, key};

/// What the conformance suite cannot ask of every backend: numbers beyond PostgreSQL's `BIGINT`
/// (a version or a timestamp over `i64::MAX`) are refused as invalid, and change nothing.
#[tokio::test]
async fn numbers_beyond_bigint_are_refused_without_touching_the_store() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let a = addr("gina@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let before = store.history(&a).await.unwrap();

    let err = store
        .restore(&[key(&a, 2).into_record(u64::MAX)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(!err.is_temporary());
    let mut far = key(&a, 5);
    far.published_at = u64::MAX;
    assert!(matches!(
        store.publish(far).await.unwrap_err(),
        Error::Invalid(_)
    ));
    assert_eq!(store.history(&a).await.unwrap(), before);
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
