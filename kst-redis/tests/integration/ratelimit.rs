//! The Redis rate limiter: counters shared by separate connections, expiry, outage.

use std::time::Duration;

use kst_core::RateLimiter;
use kst_core::ratelimit::{LimitKind, RateLimits, check};
use kst_redis::RedisStore;

use crate::support::TestPrefix;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn two_instances_share_one_count() {
    let t = TestPrefix::new().await;
    let (a, b) = (t.store().await, t.store().await);
    let mut allowed = 0;
    for i in 0..10 {
        let l: &RedisStore = if i % 2 == 0 { &a } else { &b };
        if l.hit("sender:bob@acme.net", 4, HOUR).await.unwrap() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4, "4 of 10 hits across two instances");
    assert!(a.hit("sender:carol@acme.net", 4, HOUR).await.unwrap());
}

#[tokio::test]
async fn concurrent_hits_from_many_tasks_never_exceed_the_limit() {
    let t = TestPrefix::new().await;
    let stores = [t.store().await, t.store().await, t.store().await];
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = stores[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            s.hit("source-ip:192.0.2.1", 25, HOUR).await.unwrap()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 25);
}

#[tokio::test]
async fn counters_expire_with_their_window_and_heal_a_missing_expiry() {
    let t = TestPrefix::new().await;
    let s = t.store().await;
    assert!(
        s.hit("queried-address:alice@example.net", 9, HOUR)
            .await
            .unwrap()
    );
    let key = format!("{}rl:queried-address:alice@example.net", t.prefix);
    let mut raw = t.raw().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl {ttl}");
    // A counter left without expiry (an interrupted writer) gets one on its next hit.
    let _: () = redis::cmd("PERSIST")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    s.hit("queried-address:alice@example.net", 9, HOUR)
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(ttl > 0, "ttl {ttl}");
    let count: u64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn the_check_helper_stops_at_the_exhausted_counter() {
    let t = TestPrefix::new().await;
    let s = t.store().await;
    let limits = RateLimits {
        per_sender: 1,
        ..RateLimits::default()
    };
    let hits = [
        (LimitKind::Sender, "bob@acme.net"),
        (LimitKind::SenderQuery, "bob@acme.net alice@example.net"),
    ];
    assert_eq!(check(&s, &limits, &hits).await.unwrap(), None);
    assert_eq!(
        check(&s, &limits, &hits).await.unwrap(),
        Some(LimitKind::Sender)
    );
    let mut raw = t.raw().await;
    let pair: u64 = redis::cmd("GET")
        .arg(format!(
            "{}rl:mail:sender-query:bob@acme.net alice@example.net",
            t.prefix
        ))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(pair, 1, "the pair is not counted past the exhausted sender");
}

#[tokio::test]
async fn unreachable_redis_is_a_temporary_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let s = RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_millis(300))
        .operation_timeout(Duration::from_secs(2))
        .connect_lazy()
        .unwrap();
    let err = s.hit("sender:bob@acme.net", 5, HOUR).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
}
