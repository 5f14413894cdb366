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

/// `publish_unsynced` (the key directory's publications, docs/TRANSPARENCY.md "Write order,
/// as built") runs its transaction with `synchronous_commit = off`, and that transaction
/// only: a trigger on the history table records the setting each publication's transaction
/// had. `publish` keeps the server's setting, the pooled connection's session is unchanged
/// afterwards, and `sync_published` writes WAL in a synchronous transaction (so its commit
/// flushes everything before it).
#[tokio::test]
async fn an_unsynced_publication_is_unsynced_for_its_own_transaction_only() {
    let db = TestDb::new().await;
    let store = PostgresStore::builder(&db.url)
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let s = store.inner();
    let pool = s.pool();
    for sql in [
        "CREATE TABLE commit_settings (n serial PRIMARY KEY, address text, setting text)",
        "CREATE FUNCTION note_commit_setting() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO commit_settings (address, setting) \
         VALUES (NEW.address, current_setting('synchronous_commit')); RETURN NEW; END $$",
        "CREATE TRIGGER note_commit_setting AFTER INSERT ON kst_key_history \
         FOR EACH ROW EXECUTE FUNCTION note_commit_setting()",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    let show = async || -> String {
        sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let before = show().await;
    assert_ne!(before, "off", "the test server commits synchronously");

    let a = addr("una@example.net");
    let b = addr("vic@example.net");
    s.publish_unsynced(key(&a, 1)).await.unwrap();
    assert_eq!(
        show().await,
        before,
        "the pooled connection's session is unchanged"
    );
    s.publish(key(&b, 2)).await.unwrap();
    s.publish_unsynced(key(&a, 3)).await.unwrap();
    // Visible at once, as a committed publication is.
    assert_eq!(s.get(&a).await.unwrap().unwrap().version, 2);
    let noted: Vec<(String, String)> =
        sqlx::query_as("SELECT address, setting FROM commit_settings ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        noted,
        vec![
            (a.to_string(), "off".to_string()),
            (b.to_string(), before.clone()),
            (a.to_string(), "off".to_string()),
        ]
    );
    // An unchanged publication (a redelivery) commits nothing and leaves the session alone.
    s.publish_unsynced(key(&a, 3)).await.unwrap();
    assert_eq!(show().await, before);

    let lsn =
        async |sql: &'static str| -> i64 { sqlx::query_scalar(sql).fetch_one(pool).await.unwrap() };
    let inserted = lsn("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").await;
    s.sync_published().await.unwrap();
    assert!(
        lsn("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint").await > inserted,
        "sync_published wrote WAL and flushed it"
    );
    assert_eq!(show().await, before);
    // It leaves the index state as it was.
    let built: bool = sqlx::query_scalar("SELECT built FROM kst_key_index_state")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(built, "a store that started empty has its index built");
}
