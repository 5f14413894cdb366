//! The look-up index (`kst_key_index`, issue 14): rows follow publish, restore and delete; a
//! stale row is never served; a store written before the index is served by a scan until
//! `rebuild_index` (what `kst migrate` runs) has built it. The contract itself is checked by
//! the conformance suite (`conformance::lookup`).

use kst_core::conformance::lookup::real_key;
use kst_core::key_index::IndexEntries;
use kst_core::{KeyRecord, KeyStore};
use sqlx::PgPool;

use crate::support::{TestDb, addr};

async fn rows_of(pool: &PgPool, address: &str) -> Vec<(i16, String)> {
    sqlx::query_as("SELECT kind, value FROM kst_key_index WHERE address = $1 ORDER BY kind, value")
        .bind(address)
        .fetch_all(pool)
        .await
        .expect("read kst_key_index")
}

/// The rows `record` must have: one per fingerprint, per key ID, and its WKD hash.
fn expected_rows(record: &KeyRecord) -> Vec<(i16, String)> {
    let e = IndexEntries::of(record);
    let mut rows: Vec<(i16, String)> = e
        .fingerprints
        .iter()
        .map(|f| (1, f.as_str().to_string()))
        .chain(e.key_ids.iter().map(|k| (2, k.as_str().to_string())))
        .chain([(3, format!("{}@{}", e.wkd_hash.as_str(), e.domain))])
        .collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn index_rows_follow_publish_restore_and_delete() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let pool = store.inner().pool().clone();
    let a = addr("ivy@example.net");
    let first = store
        .publish(real_key(&a, "subkeys", 1, false))
        .await
        .unwrap()
        .record()
        .clone();
    let rows = rows_of(&pool, a.as_str()).await;
    assert_eq!(
        rows.len(),
        9,
        "4 fingerprints, 4 key IDs, 1 WKD hash: {rows:?}"
    );
    assert_eq!(rows, expected_rows(&first));

    let second = store
        .publish(real_key(&a, "alice", 2, false))
        .await
        .unwrap()
        .record()
        .clone();
    assert_eq!(rows_of(&pool, a.as_str()).await, expected_rows(&second));

    let restored = real_key(&a, "bob", 3, false).into_record(7);
    store
        .restore(std::slice::from_ref(&restored))
        .await
        .unwrap();
    assert_eq!(rows_of(&pool, a.as_str()).await, expected_rows(&restored));

    assert!(store.delete(&a).await.unwrap());
    assert!(rows_of(&pool, a.as_str()).await.is_empty());
}

#[tokio::test]
async fn a_stale_index_row_is_never_served() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let pool = store.inner().pool().clone();
    let a = addr("jo@example.net");
    let b = addr("kai@example.net");
    store
        .publish(real_key(&a, "alice", 1, false))
        .await
        .unwrap();
    let bob = store
        .publish(real_key(&b, "bob", 1, false))
        .await
        .unwrap()
        .record()
        .clone();
    // A row that claims a's key has bob's fingerprint (as a repair by hand might leave).
    sqlx::query("INSERT INTO kst_key_index (kind, value, address) VALUES (1, $1, $2)")
        .bind(bob.fingerprint.as_str())
        .bind(a.as_str())
        .execute(&pool)
        .await
        .unwrap();
    let found = store
        .find_by_fingerprint(&bob.fingerprint, 10)
        .await
        .unwrap();
    assert_eq!(found, vec![bob.clone()], "only b's own key, never a's");
    // With limit 1 the stale row (a sorts first) is skipped and the next one served.
    let found = store
        .find_by_fingerprint(&bob.fingerprint, 1)
        .await
        .unwrap();
    assert_eq!(found, vec![bob]);
}

/// A store that held keys when the index migration ran: look-ups scan until `rebuild_index`,
/// which indexes every current key and marks the index built.
#[tokio::test]
async fn a_store_from_before_the_index_is_scanned_until_rebuilt() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let pool = store.inner().pool().clone();
    let mut records = Vec::new();
    for (i, name) in ["subkeys", "alice", "bob"].iter().enumerate() {
        let a = addr(&format!("old{i}@example.net"));
        records.push(
            store
                .publish(real_key(&a, name, 1, false))
                .await
                .unwrap()
                .record()
                .clone(),
        );
    }
    // Back to the schema before the index, then the index migration runs on these keys.
    sqlx::raw_sql(
        "DROP TABLE kst_key_index, kst_key_index_state; \
         DELETE FROM kst_schema_migrations WHERE version = 20261204000001",
    )
    .execute(&pool)
    .await
    .unwrap();
    store.inner().migrate().await.unwrap();
    let built: bool = sqlx::query_scalar("SELECT built FROM kst_key_index_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !built,
        "the migration must not claim an index it did not build"
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM kst_key_index")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0);

    // A fresh instance (no cached state) still answers, by scanning.
    let fresh = db.store().await;
    let subkey = IndexEntries::of(&records[0]).fingerprints[2].clone();
    assert_eq!(
        fresh.find_by_fingerprint(&subkey, 5).await.unwrap(),
        vec![records[0].clone()]
    );

    assert_eq!(fresh.rebuild_index().await.unwrap(), 3);
    for r in &records {
        assert_eq!(rows_of(&pool, r.address.as_str()).await, expected_rows(r));
    }
    let built: bool = sqlx::query_scalar("SELECT built FROM kst_key_index_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(built);
    // Served from the index now: rows gone means not found (no scan behind it).
    let other = db.store().await;
    sqlx::query("DELETE FROM kst_key_index WHERE address = $1")
        .bind(records[1].address.as_str())
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        other
            .find_by_fingerprint(&records[1].fingerprint, 5)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        other.find_by_key_id(&subkey.key_id(), 5).await.unwrap(),
        vec![records[0].clone()]
    );
    // Rebuilding again is harmless and restores what was lost.
    assert_eq!(other.rebuild_index().await.unwrap(), 3);
    assert_eq!(
        other
            .find_by_fingerprint(&records[1].fingerprint, 5)
            .await
            .unwrap(),
        vec![records[1].clone()]
    );
}
