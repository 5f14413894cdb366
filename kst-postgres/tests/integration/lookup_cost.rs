//! Cost of the index look-ups at 10³ and 10⁶ keys (issue 14: "cost flat from 10³ to 10⁶
//! keys"). A measurement, not a test: ignored by default, it prints figures and asserts only
//! that every look-up found its key. Run by hand:
//!
//! ```text
//! KST_LOOKUP_COST_KEYS=1000,1000000 cargo test -p kst-postgres --test integration \
//!     lookup_cost -- --ignored --nocapture
//! ```
//!
//! Rows are bulk-loaded with SQL (`unnest` batches) into a database of their own: every key
//! is the same real certificate (so each hit pays a real certificate parse, as in service)
//! under its own address and its own primary fingerprint, indexed by that fingerprint, its key
//! ID and the WKD hash of its address. Then, through the store's own `find_by_*` methods:
//! sequential look-ups (latency) and 8 concurrent tasks (throughput), and one EXPLAIN ANALYZE.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kst_core::conformance::lookup::real_key;
use kst_core::wkd::WkdHash;
use kst_core::{Fingerprint, KeyId, KeyStore};

use crate::support::{TestDb, addr};

const BATCH: usize = 10_000;
const LOOKUPS: usize = 3_000;

fn fingerprint(i: usize) -> String {
    format!(
        "{:040X}",
        (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) >> 1
    )
}

fn address(i: usize) -> String {
    format!("user{i:07}@bench.example")
}

async fn load(db: &TestDb, n: usize) {
    let store = db.store().await;
    let pool = store.inner().pool().clone();
    let key = real_key(&addr("x@bench.example"), "alice", 1, false).key;
    let mut i = 0;
    while i < n {
        let end = (i + BATCH).min(n);
        let addresses: Vec<String> = (i..end).map(address).collect();
        let fprs: Vec<String> = (i..end).map(fingerprint).collect();
        let ids: Vec<String> = fprs
            .iter()
            .map(|f| Fingerprint::parse(f).unwrap().key_id().as_str().to_string())
            .collect();
        let wkd: Vec<String> = addresses
            .iter()
            .map(|a| format!("{}@bench.example", WkdHash::of_address(&addr(a)).as_str()))
            .collect();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO kst_keys (address, current_version) SELECT a, 1 FROM unnest($1::text[]) a",
        )
        .bind(&addresses)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO kst_key_history (address, version, key, fingerprint, published_at, \
             publication_id, revoked, format) \
             SELECT a, 1, $3, f, 1700000000, 'bench', false, 1 \
             FROM unnest($1::text[], $2::text[]) AS t(a, f)",
        )
        .bind(&addresses)
        .bind(&fprs)
        .bind(&key)
        .execute(&mut *tx)
        .await
        .unwrap();
        for (kind, values) in [(1i16, &fprs), (2, &ids), (3, &wkd)] {
            sqlx::query(
                "INSERT INTO kst_key_index (kind, value, address) \
                 SELECT $1, v, a FROM unnest($2::text[], $3::text[]) AS t(v, a)",
            )
            .bind(kind)
            .bind(values)
            .bind(&addresses)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        i = end;
    }
    sqlx::raw_sql("ANALYZE kst_keys; ANALYZE kst_key_history; ANALYZE kst_key_index")
        .execute(&pool)
        .await
        .unwrap();
}

fn pick(n: usize, j: usize) -> usize {
    (j.wrapping_mul(2_654_435_761)) % n
}

fn summary(mut lat: Vec<Duration>) -> String {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    format!("p50 {:.3} ms, p99 {:.3} ms", q(0.5), q(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: run by hand (see the module docs)"]
async fn lookup_cost() {
    let sizes: Vec<usize> = std::env::var("KST_LOOKUP_COST_KEYS")
        .unwrap_or_else(|_| "1000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("a number of keys"))
        .collect();
    for n in sizes {
        let db = TestDb::new().await;
        let t = Instant::now();
        load(&db, n).await;
        let loaded = t.elapsed();
        let store = Arc::new(db.store().await);
        let pool = store.inner().pool().clone();
        let size: String =
            sqlx::query_scalar("SELECT pg_size_pretty(pg_database_size(current_database()))")
                .fetch_one(&pool)
                .await
                .unwrap();
        let index_size: String =
            sqlx::query_scalar("SELECT pg_size_pretty(pg_total_relation_size('kst_key_index'))")
                .fetch_one(&pool)
                .await
                .unwrap();
        // Warm up (connections, caches).
        for j in 0..200 {
            let f = Fingerprint::parse(&fingerprint(pick(n, j))).unwrap();
            assert_eq!(store.find_by_fingerprint(&f, 10).await.unwrap().len(), 1);
        }
        for what in ["fingerprint", "key_id", "wkd_hash"] {
            let mut lat = Vec::with_capacity(LOOKUPS);
            for j in 0..LOOKUPS {
                let i = pick(n, j + 7);
                let t = Instant::now();
                let found = match what {
                    "fingerprint" => store
                        .find_by_fingerprint(&Fingerprint::parse(&fingerprint(i)).unwrap(), 10)
                        .await
                        .unwrap()
                        .len(),
                    "key_id" => store
                        .find_by_key_id(
                            &KeyId::parse(
                                Fingerprint::parse(&fingerprint(i))
                                    .unwrap()
                                    .key_id()
                                    .as_str(),
                            )
                            .unwrap(),
                            10,
                        )
                        .await
                        .unwrap()
                        .len(),
                    _ => {
                        let a = addr(&address(i));
                        store
                            .find_by_wkd_hash("bench.example", &WkdHash::of_address(&a))
                            .await
                            .unwrap()
                            .map_or(0, |_| 1)
                    }
                };
                lat.push(t.elapsed());
                assert_eq!(found, 1, "{what} of key {i}");
            }
            println!(
                "lookup_cost n={n} find_by_{what}: sequential {}",
                summary(lat)
            );
        }
        // Throughput: 8 tasks at once, by fingerprint.
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..8 {
            let store = store.clone();
            tasks.spawn(async move {
                for j in 0..LOOKUPS / 8 {
                    let f = Fingerprint::parse(&fingerprint(pick(n, j * 8 + k))).unwrap();
                    assert_eq!(store.find_by_fingerprint(&f, 10).await.unwrap().len(), 1);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let rate = (LOOKUPS / 8 * 8) as f64 / t.elapsed().as_secs_f64();
        let plan: Vec<String> = sqlx::query_scalar(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) \
             SELECT h.* FROM kst_key_index i JOIN kst_keys k ON k.address = i.address \
             JOIN kst_key_history h ON h.address = k.address AND h.version = k.current_version \
             WHERE i.kind = 1 AND i.value = $1 ORDER BY i.address LIMIT 10",
        )
        .bind(fingerprint(pick(n, 12345)))
        .fetch_all(&pool)
        .await
        .unwrap();
        println!(
            "lookup_cost n={n}: loaded in {:.1}s, database {size}, kst_key_index {index_size}; \
             8 concurrent tasks (pool of 4 connections): {rate:.0} find_by_fingerprint/s\n{}",
            loaded.as_secs_f64(),
            plan.join("\n")
        );
    }
}
