//! The PostgreSQL rate limiter: the shared limiter suite on separate pools, sweeping, outage.

use std::sync::Arc;
use std::time::Duration;

use kst_core::RateLimiter;
use kst_core::conformance;
use kst_core::ratelimit::Hit;
use kst_postgres::PostgresStore;
use sqlx::Row;

use crate::support::TestDb;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limiter_conformance_on_separate_pools() {
    let db = TestDb::new().await;
    let mut limiters: Vec<Arc<dyn RateLimiter>> = Vec::new();
    for _ in 0..2 {
        limiters.push(Arc::new(db.store().await));
    }
    conformance::limiter::run_all(limiters).await;
}

#[tokio::test]
async fn an_ended_window_starts_again_and_is_swept() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = store.inner();
    assert!(
        s.hit("queried-address:a@example.net", 1, HOUR)
            .await
            .unwrap()
    );
    assert!(
        !s.hit("queried-address:a@example.net", 1, HOUR)
            .await
            .unwrap()
    );
    // End the window (as time passing would).
    sqlx::query("UPDATE kst_rate_limits SET window_end = now() - interval '1 second'")
        .execute(s.pool())
        .await
        .unwrap();
    assert!(
        s.hit("queried-address:a@example.net", 1, HOUR)
            .await
            .unwrap()
    );
    let row = sqlx::query("SELECT count, window_end > now() FROM kst_rate_limits")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>(0), 1);
    assert!(row.get::<bool, _>(1), "a fresh window was opened");
    // Sweeping removes only ended windows.
    s.hit("sender:x@acme.net", 5, HOUR).await.unwrap();
    sqlx::query("UPDATE kst_rate_limits SET window_end = now() - interval '1 second' WHERE key = 'sender:x@acme.net'")
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(s.sweep_rate_limits().await.unwrap(), 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM kst_rate_limits")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(left, vec!["queried-address:a@example.net".to_string()]);
}

#[tokio::test]
async fn unreachable_postgres_is_a_temporary_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let s = PostgresStore::builder(format!("postgres://postgres@127.0.0.1:{port}/kst"))
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy()
        .unwrap();
    let err = s.hit("sender:bob@acme.net", 5, HOUR).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
}

/// A hit commits without waiting for its WAL flush (`synchronous_commit` off in its own
/// transaction), and leaves the pooled connection's session as it was: a publication on the
/// same connection afterwards still commits synchronously.
#[tokio::test]
async fn a_hit_commits_asynchronously_and_leaves_the_session_alone() {
    let db = TestDb::new().await;
    let store = PostgresStore::builder(&db.url)
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let s = store.inner();
    let show = async || -> String {
        sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(s.pool())
            .await
            .unwrap()
    };
    let before = show().await;
    assert_ne!(before, "off", "the test server commits synchronously");
    assert!(s.hit("web-client:192.0.2.1", 5, HOUR).await.unwrap());
    assert_eq!(
        show().await,
        before,
        "the one pooled connection is unchanged"
    );
    // Inside one transaction the statement's setting is visible: it is the transaction's.
    let mut tx = s.pool().begin().await.unwrap();
    let count: i64 = sqlx::query_scalar(kst_postgres::RATE_LIMIT_HIT_SQL)
        .bind("web-client:192.0.2.1")
        .bind(3600.0_f64)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(count, 2, "the same counter, counted on");
    let inside: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, "off");
    tx.commit().await.unwrap();
    assert_eq!(show().await, before, "reset at the end of the transaction");
}

/// `hit_many` stores one row per distinct key with the number of its hits, in one window, and
/// restarts an ended window at the batch's hits.
#[tokio::test]
async fn many_hits_store_one_row_per_key_with_its_count() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let s = store.inner();
    let hits = [
        Hit::new("web-client:192.0.2.1", 2, HOUR),
        Hit::new("web-miss-global", 10, HOUR),
        Hit::new("web-client:192.0.2.1", 2, HOUR),
        Hit::new("web-client:192.0.2.1", 2, HOUR),
    ];
    assert_eq!(
        s.hit_many(&hits).await.unwrap(),
        vec![true, true, true, false]
    );
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT key, count, window_end > now() + interval '59 minutes' \
         FROM kst_rate_limits ORDER BY key",
    )
    .fetch_all(s.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("web-client:192.0.2.1".to_string(), 3, true),
            ("web-miss-global".to_string(), 1, true),
        ]
    );
    // An ended window starts again at the batch's hits.
    sqlx::query("UPDATE kst_rate_limits SET window_end = now() - interval '1 second'")
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(
        s.hit_many(&hits[..3]).await.unwrap(),
        vec![true, true, true]
    );
    let count: i64 =
        sqlx::query_scalar("SELECT count FROM kst_rate_limits WHERE key = 'web-client:192.0.2.1'")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert_eq!(count, 2);
}
