//! The Redis rate limiter: the shared limiter suite on separate connections, expiry, outage.

use std::sync::Arc;
use std::time::Duration;

use kst_core::RateLimiter;
use kst_core::conformance;
use kst_core::ratelimit::Hit;
use kst_redis::RedisStore;

use crate::support::TestPrefix;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limiter_conformance_on_separate_connections() {
    let t = TestPrefix::new().await;
    let mut limiters: Vec<Arc<dyn RateLimiter>> = Vec::new();
    for _ in 0..3 {
        limiters.push(Arc::new(t.store().await));
    }
    conformance::limiter::run_all(limiters).await;
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

/// A builder for a Redis nobody listens at (a port just freed), with short timeouts.
fn unreachable_redis() -> kst_redis::RedisStoreBuilder {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    RedisStore::builder(format!("redis://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_millis(300))
        .operation_timeout(Duration::from_secs(2))
}

#[tokio::test]
async fn unreachable_redis_is_a_temporary_error() {
    let s = unreachable_redis().connect_lazy().unwrap();
    let err = s.hit("sender:bob@acme.net", 5, HOUR).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
}

/// `hit_many` adds each key's hits to one counter and gives a new counter its window.
#[tokio::test]
async fn many_hits_count_each_key_once_with_its_window() {
    let t = TestPrefix::new().await;
    let s = t.store().await;
    let hits = [
        Hit::new("web-client:192.0.2.1", 2, HOUR),
        Hit::new("web-miss-global", 10, Duration::from_secs(60)),
        Hit::new("web-client:192.0.2.1", 2, HOUR),
        Hit::new("web-client:192.0.2.1", 2, HOUR),
    ];
    assert_eq!(
        s.hit_many(&hits).await.unwrap(),
        vec![true, true, true, false]
    );
    let mut raw = t.raw().await;
    for (key, count, max_ttl) in [
        ("web-client:192.0.2.1", 3, 3_600_000),
        ("web-miss-global", 1, 60_000),
    ] {
        let key = format!("{}rl:{key}", t.prefix);
        let n: u64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(n, count, "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= max_ttl, "{key}: ttl {ttl}");
    }
}

/// Counters on a Redis of their own (`RedisCounters`, the cheaper counting script): the shared
/// limiter suite, mixed with the store's own limiter on the same prefix (the same counts,
/// verdicts and windows), and a new counter gets its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_of_their_own_pass_the_limiter_conformance_suite() {
    let t = TestPrefix::new().await;
    let counters = || {
        RedisStore::builder(crate::support::url())
            .prefix(t.prefix.clone())
            .counters_lazy()
            .expect("counters")
    };
    let limiters: Vec<Arc<dyn RateLimiter>> = vec![
        Arc::new(counters()),
        Arc::new(t.store().await),
        Arc::new(counters()),
    ];
    conformance::limiter::run_all(limiters).await;
    let c = counters();
    c.check().await.expect("reachable, a primary");
    assert_eq!(
        c.hit_many(&[
            Hit::new("web-client:192.0.2.9", 2, HOUR),
            Hit::new("web-client:192.0.2.9", 2, HOUR),
            Hit::new("web-client:192.0.2.9", 2, HOUR),
        ])
        .await
        .unwrap(),
        vec![true, true, false]
    );
    let key = format!("{}rl:web-client:192.0.2.9", t.prefix);
    let mut raw = t.raw().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl {ttl}");
}

/// An unreachable counter Redis is a temporary error of `ratelimit(redis-counters)`, for its
/// hits and its check. (That a server with `appendonly no` passes the check, which the store's
/// guard refuses, is tested with a server of its own in `tests/web_counter_store.rs`.)
#[tokio::test]
async fn counters_of_their_own_need_no_durability_and_name_themselves() {
    let c = unreachable_redis().counters_lazy().unwrap();
    let err = c.hit("web-client:192.0.2.1", 5, HOUR).await.unwrap_err();
    assert!(err.is_temporary(), "{err}");
    assert!(
        err.to_string().contains("ratelimit(redis-counters)"),
        "{err}"
    );
    assert!(c.check().await.is_err());
}

/// Red team (counters and shares): the cheaper counting script of `RedisCounters` gave an
/// expiry only to the counter it created, so a counter found without one (a migration tool
/// that dropped the expiries, an operator's `PERSIST`, a script that failed between its
/// `INCRBY` and its `PEXPIRE`) never expired: once past its limit, that client (or, for
/// `web-miss-global`, every client that missed) was refused for good. A counter is now
/// checked when its hits cross a multiple of 64, and given its window when it has none.
#[tokio::test]
async fn counters_of_their_own_heal_a_missing_expiry_within_64_hits() {
    let t = TestPrefix::new().await;
    let c = RedisStore::builder(crate::support::url())
        .prefix(t.prefix.clone())
        .counters_lazy()
        .expect("counters");
    let mut raw = t.raw().await;
    for (name, per_call) in [("one-by-one", 1u32), ("many-at-once", 50)] {
        let limiter_key = format!("web-miss:{name}");
        let key = format!("{}rl:{limiter_key}", t.prefix);
        let pttl = |raw: &mut redis::aio::MultiplexedConnection| {
            let key = key.clone();
            let mut raw = raw.clone();
            async move {
                let ttl: i64 = redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                ttl
            }
        };
        let hits: Vec<Hit> = (0..per_call)
            .map(|_| Hit::new(limiter_key.clone(), 1, HOUR))
            .collect();
        c.hit_many(&hits).await.unwrap();
        let _: () = redis::cmd("PERSIST")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(pttl(&mut raw).await, -1, "{name}: left without expiry");
        let mut count = u64::from(per_call);
        // Refused (past its limit of 1) and without expiry until its hits cross 64.
        while count + u64::from(per_call) < 64 {
            let verdicts = c.hit_many(&hits).await.unwrap();
            count += u64::from(per_call);
            assert!(verdicts.iter().all(|v| !v), "{name}: refused at {count}");
            assert_eq!(pttl(&mut raw).await, -1, "{name}: not checked at {count}");
        }
        c.hit_many(&hits).await.unwrap();
        count += u64::from(per_call);
        let ttl = pttl(&mut raw).await;
        assert!(
            ttl > 0 && ttl <= 3_600_000,
            "{name}: an expiry once its hits crossed 64 ({count}): {ttl}"
        );
        let stored: u64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(stored, count, "{name}: every hit counted once");
    }
}

/// Red team (counters and shares): a window longer than Redis accepts (`PEXPIRE` refuses a
/// time past 2^63 ms) failed every counting script after its `INCRBY`: every request the web
/// limits counted got 503, and the counter it created stayed without expiry. A window is now
/// capped at one Redis accepts, in the store's limiter and in the counters of their own alike.
#[tokio::test]
async fn a_window_longer_than_redis_accepts_is_capped_not_an_error() {
    let t = TestPrefix::new().await;
    let counters = RedisStore::builder(crate::support::url())
        .prefix(t.prefix.clone())
        .counters_lazy()
        .expect("counters");
    let store = t.store().await;
    let limiters: [(&str, &dyn RateLimiter); 2] = [("counters", &counters), ("store", &store)];
    let mut raw = t.raw().await;
    for (name, limiter) in limiters {
        for window in [Duration::MAX, Duration::from_secs(u64::MAX / 1000)] {
            let key = format!("web-client:{name}:{}", window.as_secs());
            let many = limiter
                .hit_many(&[Hit::new(key.clone(), 5, window)])
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(many, vec![true], "{name}");
            let one = limiter
                .hit(&key, 5, window)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(one, "{name}");
            let ttl: i64 = redis::cmd("PTTL")
                .arg(format!("{}rl:{key}", t.prefix))
                .query_async(&mut raw)
                .await
                .unwrap();
            assert!(ttl > 0, "{name}: an expiry ({ttl})");
        }
    }
}
