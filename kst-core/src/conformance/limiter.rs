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
//! Use a multi-threaded runtime so that [`concurrent_hits_never_exceed_the_limit`] and
//! [`concurrent_many_hits_count_exactly`] really run in parallel.
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

use crate::ratelimit::{Hit, LimitKind, RateLimiter, RateLimits, check, limiter_key};

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
    many_hits_count_each_naming_against_its_own_limit(a).await;
    many_hits_share_counts_with_single_hits(a, b).await;
    concurrent_many_hits_count_exactly(limiters.clone()).await;
    refunds_take_back_hits_in_the_open_window(a, b).await;
    window_ends_and_starts_again(a).await;
}

/// [`RateLimiter::refund`] takes hits back from the open window, on every instance of the
/// backend: a key at its limit, refunded once, allows one more hit (a deferred message's
/// retry counts no more than the message once); a key named twice is refunded twice; a
/// count never goes below 0 (refunds of a key never counted, or more than its hits, leave
/// the limit as it was); an empty refund does nothing.
pub async fn refunds_take_back_hits_in_the_open_window(a: &dyn RateLimiter, b: &dyn RateLimiter) {
    let what = "refunds_take_back_hits_in_the_open_window";
    let refund = async |limiter: &dyn RateLimiter, hits: &[Hit]| {
        limiter.refund(hits).await.unwrap_or_else(|e| {
            panic!("{what}: refund on {} failed: {e}", limiter.name());
        })
    };
    let key = "conformance:refund:a";
    for _ in 0..2 {
        assert!(hit(what, a, key, 2, HOUR).await, "{what}: within the limit");
    }
    assert!(!hit(what, a, key, 2, HOUR).await, "{what}: over the limit");
    // Counted 3; two refunds (on the other instance) leave 1: one more hit is allowed.
    let twice = [Hit::new(key, 2, HOUR), Hit::new(key, 2, HOUR)];
    refund(b, &twice).await;
    assert!(hit(what, a, key, 2, HOUR).await, "{what}: a refunded hit");
    assert!(
        !hit(what, b, key, 2, HOUR).await,
        "{what}: not more than refunded"
    );
    // Never below 0: a key never counted, and more refunds than hits.
    let fresh = "conformance:refund:b";
    refund(a, &[Hit::new(fresh, 1, HOUR)]).await;
    for _ in 0..3 {
        refund(b, &[Hit::new(key, 2, HOUR)]).await;
    }
    refund(a, &[]).await;
    assert!(hit(what, a, fresh, 1, HOUR).await, "{what}: a fresh key");
    assert!(
        !hit(what, b, fresh, 1, HOUR).await,
        "{what}: a fresh key's limit"
    );
    for _ in 0..2 {
        assert!(hit(what, b, key, 2, HOUR).await, "{what}: refunded to 0");
    }
    assert!(!hit(what, a, key, 2, HOUR).await, "{what}: not below 0");
}

async fn hit_many(what: &str, limiter: &dyn RateLimiter, hits: &[Hit]) -> Vec<bool> {
    let verdicts = limiter.hit_many(hits).await.unwrap_or_else(|e| {
        panic!(
            "{what}: hit_many of {} hits on {} failed: {e}",
            hits.len(),
            limiter.name()
        )
    });
    assert_eq!(
        verdicts.len(),
        hits.len(),
        "{what}: {} answered {} verdicts for {} hits",
        limiter.name(),
        verdicts.len(),
        hits.len()
    );
    verdicts
}

/// [`RateLimiter::hit_many`] answers like one [`RateLimiter::hit`] per hit, in order: a key
/// named several times is counted once per naming, each naming against its own limit; keys
/// with other limits and windows in the same call count on their own; a limit of 0 refuses;
/// an empty call counts nothing.
pub async fn many_hits_count_each_naming_against_its_own_limit(limiter: &dyn RateLimiter) {
    let what = "many_hits_count_each_naming_against_its_own_limit";
    assert!(hit_many(what, limiter, &[]).await.is_empty());
    let minute = Duration::from_secs(60);
    let hits = [
        Hit::new("conformance:many:a", 2, HOUR),
        Hit::new("conformance:many:b", 1, minute),
        Hit::new("conformance:many:a", 2, HOUR),
        Hit::new("conformance:many:c", 0, HOUR),
        Hit::new("conformance:many:a", 2, HOUR),
        Hit::new("conformance:many:b", 1, minute),
        // The fourth naming of a, against a larger limit of its own.
        Hit::new("conformance:many:a", 10, HOUR),
    ];
    assert_eq!(
        hit_many(what, limiter, &hits).await,
        vec![true, true, true, false, false, false, true],
        "{what}: a counts 1, 2, 3 (limit 2), 4 (limit 10); b 1, 2 (limit 1); c has limit 0"
    );
    // The counts went on from there: a is at 4, b at 2.
    assert!(
        !hit(what, limiter, "conformance:many:a", 4, HOUR).await,
        "{what}: a counted fewer than 4 times"
    );
    assert!(
        hit(what, limiter, "conformance:many:a", 6, HOUR).await,
        "{what}: a counted more than 5 times"
    );
    assert!(
        hit(what, limiter, "conformance:many:b", 3, minute).await,
        "{what}: b counted more than twice"
    );
}

/// Counts made by [`RateLimiter::hit`] on one instance and [`RateLimiter::hit_many`] on
/// another are one count.
pub async fn many_hits_share_counts_with_single_hits(a: &dyn RateLimiter, b: &dyn RateLimiter) {
    let what = "many_hits_share_counts_with_single_hits";
    let key = "conformance:many-shared:192.0.2.9";
    for _ in 0..3 {
        assert!(hit(what, a, key, 5, HOUR).await, "{what}: hit within 5");
    }
    let verdicts = hit_many(
        what,
        b,
        &[
            Hit::new(key, 5, HOUR),
            Hit::new("conformance:many-shared:other", 1, HOUR),
            Hit::new(key, 5, HOUR),
            Hit::new(key, 5, HOUR),
        ],
    )
    .await;
    assert_eq!(
        verdicts,
        vec![true, true, true, false],
        "{what}: after 3 single hits, the 4th and 5th are within 5, the 6th is not"
    );
    assert!(
        !hit(what, a, key, 6, HOUR).await,
        "{what}: the single hit after them is the 7th"
    );
}

/// Tasks that each count a few keys with [`RateLimiter::hit_many`] at once, spread over
/// `limiters`: a key every task names is counted once per naming, exactly, and allows exactly
/// its limit; each task's own key is counted once.
pub async fn concurrent_many_hits_count_exactly(limiters: Vec<Arc<dyn RateLimiter>>) {
    let what = "concurrent_many_hits_count_exactly";
    let (tasks, limit) = (24usize, 30u32);
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let l = limiters[i % limiters.len()].clone();
            tokio::spawn(async move {
                let shared = "conformance:many-race:global";
                let hits = [
                    Hit::new(format!("conformance:many-race:{i}"), 1, HOUR),
                    Hit::new(shared, limit, HOUR),
                    Hit::new(shared, limit, HOUR),
                ];
                hit_many(what, &*l, &hits).await
            })
        })
        .collect();
    let mut own = 0;
    let mut shared = 0;
    for h in handles {
        let v = h
            .await
            .unwrap_or_else(|e| panic!("{what}: task failed: {e}"));
        own += usize::from(v[0]);
        shared += v[1..].iter().filter(|x| **x).count();
    }
    assert_eq!(own, tasks, "{what}: each task's own key is within 1");
    assert_eq!(
        shared,
        limit as usize,
        "{what}: {} namings of one key at once, limit {limit}",
        2 * tasks
    );
    // Exactly 2 × tasks namings were counted: the next is past that.
    let l = &*limiters[0];
    let key = "conformance:many-race:global";
    assert!(
        hit(what, l, key, 2 * tasks as u32 + 1, HOUR).await,
        "{what}: counted more than {} times",
        2 * tasks
    );
    assert!(
        !hit(what, l, key, 2 * tasks as u32 + 1, HOUR).await,
        "{what}: counted fewer than {} times",
        2 * tasks
    );
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
    // The same through hit_many, next to a key with a longer window.
    let many = "conformance:window-many:alice@example.net";
    let long = "conformance:window-many:long";
    let hits = [Hit::new(many, 1, second), Hit::new(long, 2, HOUR)];
    assert_eq!(
        hit_many(what, limiter, &hits).await,
        vec![true, true],
        "{what}: first hits through hit_many"
    );
    assert_eq!(
        hit_many(what, limiter, &hits[..1]).await,
        vec![false],
        "{what}: second hit_many in the window allowed"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        hit(what, limiter, key, 1, second).await,
        "{what}: the window passed but the key was still over its limit"
    );
    assert_eq!(
        hit_many(what, limiter, &hits).await,
        vec![true, true],
        "{what}: through hit_many, the short window starts again and the long one counts 2"
    );
    assert_eq!(
        hit_many(what, limiter, &hits[1..]).await,
        vec![false],
        "{what}: the long window kept its count (3 of 2)"
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

    /// A limiter with only `hit` (the trait's default `hit_many`) conforms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_hit_many_conforms() {
        struct OnlyHit(MemoryRateLimiter);
        #[async_trait::async_trait]
        impl RateLimiter for OnlyHit {
            fn name(&self) -> &'static str {
                "only-hit"
            }
            async fn hit(&self, key: &str, limit: u32, window: Duration) -> crate::Result<bool> {
                self.0.hit(key, limit, window).await
            }
            async fn refund(&self, hits: &[Hit]) -> crate::Result<()> {
                self.0.refund(hits).await
            }
        }
        let l: Arc<dyn RateLimiter> = Arc::new(OnlyHit(MemoryRateLimiter::new()));
        run_all(vec![l.clone(), l]).await;
    }

    /// A limiter that takes nothing back (the trait's default `refund`) fails the suite.
    #[tokio::test]
    #[should_panic(expected = "refunds_take_back_hits_in_the_open_window: a refunded hit")]
    async fn a_limiter_that_takes_nothing_back_fails() {
        struct NoRefund(MemoryRateLimiter);
        #[async_trait::async_trait]
        impl RateLimiter for NoRefund {
            fn name(&self) -> &'static str {
                "no-refund"
            }
            async fn hit(&self, key: &str, limit: u32, window: Duration) -> crate::Result<bool> {
                self.0.hit(key, limit, window).await
            }
        }
        let l = NoRefund(MemoryRateLimiter::new());
        refunds_take_back_hits_in_the_open_window(&l, &l).await;
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
