//! The `RateLimiter` conformance suite: the contract of [`RateLimiter`] as executable checks.
//!
//! Every limiter (in memory, on the filesystem, PostgreSQL, Redis) runs [`run_all`] with two or
//! more instances that share one backend (separate pools, connections or store handles on the
//! same namespace), standing in for separate KST processes; a limiter that lives in one process
//! passes the same instance twice. Each property is a `pub async fn` of its own. The properties
//! use keys of their own (under `conformance:`), so they do not interfere with each other, but
//! they expect counters nobody else touches: run the suite on a fresh namespace.
//!
//! [`window_ends_and_starts_again`] waits for a one-second window to pass (about 1.5 s).
//! Use a multi-threaded runtime so that [`concurrent_hits_never_exceed_the_limit`] really
//! runs in parallel.
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn limiter_conformance() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let a = Arc::new(FsStore::open(dir.path()).await.unwrap());
//!     let b = Arc::new(FsStore::open(dir.path()).await.unwrap());
//!     kst_core::conformance::limiter::run_all(vec![a, b]).await;
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::ratelimit::{LimitKind, RateLimiter, RateLimits, check, limiter_key};

/// The window of every property but [`window_ends_and_starts_again`].
pub const HOUR: Duration = Duration::from_secs(3600);

/// Hits [`concurrent_hits_never_exceed_the_limit`] makes, and how many it allows.
pub const RACE_HITS: (usize, u32) = (60, 25);

async fn hit(
    what: &str,
    limiter: &dyn RateLimiter,
    key: &str,
    limit: u32,
    window: Duration,
) -> bool {
    limiter.hit(key, limit, window).await.unwrap_or_else(|e| {
        panic!(
            "{what}: hit({key:?}, {limit}) on {} failed: {e}",
            limiter.name()
        )
    })
}

/// Runs every property on `limiters` (at least one; instances sharing one backend).
pub async fn run_all(limiters: Vec<Arc<dyn RateLimiter>>) {
    assert!(!limiters.is_empty(), "limiter conformance needs a limiter");
    let (a, b) = (&*limiters[0], &*limiters[limiters.len() - 1]);
    counts_per_key_up_to_the_limit(a).await;
    instances_share_one_count(a, b).await;
    concurrent_hits_never_exceed_the_limit(limiters.clone()).await;
    check_stops_at_the_exhausted_counter(a).await;
    window_ends_and_starts_again(a).await;
}

/// Hits within the limit are allowed, every hit past it is refused, and each key (and each
/// limit on it) counts on its own.
pub async fn counts_per_key_up_to_the_limit(limiter: &dyn RateLimiter) {
    let what = "counts_per_key_up_to_the_limit";
    for n in 1..=3 {
        assert!(
            hit(what, limiter, "conformance:count:a", 3, HOUR).await,
            "{what}: hit {n} of 3 refused"
        );
    }
    for n in 4..=5 {
        assert!(
            !hit(what, limiter, "conformance:count:a", 3, HOUR).await,
            "{what}: hit {n} allowed with a limit of 3"
        );
    }
    assert!(
        hit(what, limiter, "conformance:count:b", 3, HOUR).await,
        "{what}: another key was counted with the first"
    );
}

/// Two instances on one backend count the same key together.
pub async fn instances_share_one_count(a: &dyn RateLimiter, b: &dyn RateLimiter) {
    let what = "instances_share_one_count";
    let mut allowed = 0;
    for i in 0..10 {
        let l = if i % 2 == 0 { a } else { b };
        if hit(what, l, "conformance:shared:bob@acme.net", 4, HOUR).await {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4, "{what}: 4 of 10 hits across two instances");
    assert!(
        hit(what, b, "conformance:shared:carol@acme.net", 4, HOUR).await,
        "{what}: another key was counted with the first"
    );
}

/// [`RACE_HITS`] hits of one key at once, spread over `limiters`, allow exactly the limit.
pub async fn concurrent_hits_never_exceed_the_limit(limiters: Vec<Arc<dyn RateLimiter>>) {
    let what = "concurrent_hits_never_exceed_the_limit";
    let (hits, limit) = RACE_HITS;
    let tasks: Vec<_> = (0..hits)
        .map(|i| {
            let l = limiters[i % limiters.len()].clone();
            tokio::spawn(
                async move { hit(what, &*l, "conformance:race:192.0.2.1", limit, HOUR).await },
            )
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await
            .unwrap_or_else(|e| panic!("{what}: task failed: {e}"))
        {
            allowed += 1;
        }
    }
    assert_eq!(
        allowed, limit,
        "{what}: {hits} concurrent hits, limit {limit}"
    );
}

/// [`check`] counts in order and stops at the first exhausted counter: the counters after it
/// are not counted.
pub async fn check_stops_at_the_exhausted_counter(limiter: &dyn RateLimiter) {
    let what = "check_stops_at_the_exhausted_counter";
    let limits = RateLimits {
        per_sender: 1,
        per_sender_query: 2,
        ..RateLimits::default()
    };
    let hits = [
        (LimitKind::Sender, "conformance-check@acme.net"),
        (
            LimitKind::SenderQuery,
            "conformance-check@acme.net alice@example.net",
        ),
    ];
    let first = check(limiter, &limits, &hits).await;
    assert_eq!(
        first.ok(),
        Some(None),
        "{what}: the first request is within"
    );
    let second = check(limiter, &limits, &hits).await;
    assert_eq!(
        second.ok(),
        Some(Some(LimitKind::Sender)),
        "{what}: the second is over the sender limit"
    );
    // The pair was counted once: one more hit fits its limit of 2, the next does not.
    let domain = limiter_key(
        LimitKind::SenderQuery,
        "conformance-check@acme.net alice@example.net",
    );
    let domain = domain.as_str();
    assert!(
        hit(what, limiter, domain, 2, limits.window()).await,
        "{what}: the pair was counted past the exhausted sender"
    );
    assert!(
        !hit(what, limiter, domain, 2, limits.window()).await,
        "{what}: the pair was not counted at all"
    );
}

/// Once a window has passed, the key counts from 1 again.
pub async fn window_ends_and_starts_again(limiter: &dyn RateLimiter) {
    let what = "window_ends_and_starts_again";
    let second = Duration::from_secs(1);
    let key = "conformance:window:alice@example.net";
    assert!(
        hit(what, limiter, key, 1, second).await,
        "{what}: first hit refused"
    );
    assert!(
        !hit(what, limiter, key, 1, second).await,
        "{what}: second hit in the window allowed"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        hit(what, limiter, key, 1, second).await,
        "{what}: the window passed but the key was still over its limit"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::MemoryRateLimiter;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_limiter_conforms() {
        let l: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::new());
        run_all(vec![l.clone(), l]).await;
    }

    /// A limiter that never refuses fails the suite.
    #[tokio::test]
    #[should_panic(expected = "counts_per_key_up_to_the_limit")]
    async fn a_limiter_that_never_refuses_fails() {
        struct Open;
        #[async_trait::async_trait]
        impl RateLimiter for Open {
            fn name(&self) -> &'static str {
                "open"
            }
            async fn hit(&self, _: &str, _: u32, _: Duration) -> crate::Result<bool> {
                Ok(true)
            }
        }
        counts_per_key_up_to_the_limit(&Open).await;
    }
}
