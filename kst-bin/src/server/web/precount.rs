//! The per-client request limit counted in the shared store a batch at a time: one write to
//! the counters for every [`BATCH`] requests of a client, instead of one per request.
//!
//! Each write reserves [`BATCH`] requests of the client (the store counts reservations, with a
//! limit of `ceil(limit / BATCH)`), and this process answers the client's next `BATCH - 1`
//! requests from that reservation with the store's verdict, without asking the store;
//! reservations that concurrent requests of one client made add up (none is lost). A refusal
//! answers all of the client's requests until it is [`RESERVATION_TTL`] old, so a refused
//! client costs the shared counters (and the web coalescer's bounded queue) one write per
//! TTL, not one per `BATCH` requests. A reservation is used for at most [`RESERVATION_TTL`];
//! afterwards (or once spent) the next request asks the store again. The bounded inaccuracy,
//! stated in docs/SECURITY.md ("Web look-ups: what the limits count"): a client may make up
//! to `BATCH - 1` requests more than `per_client` per window and per `kst serve` of a pool
//! (the last reservation is not split), plus, into the first seconds of a window, the unused
//! part of reservations its concurrent requests made (and the ended window counted) before
//! it ended; and one refused may be refused up to `RESERVATION_TTL` after its window ended.
//! Requests are never counted less than that, and the miss budgets (the dictionary oracle) are
//! counted exactly, one write per miss. Limits below `4 × BATCH` are counted exactly too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kst_core::RateLimiter;

/// Requests of one client counted by one write to the shared counters.
pub const BATCH: u32 = 8;

/// How long a reservation (or a refusal) is used before the store is asked again.
pub const RESERVATION_TTL: Duration = Duration::from_secs(5);

/// Most clients with a reservation held here; beyond it expired ones are swept, then all are
/// forgotten (which only makes the next request of each ask the store again).
const MAX_CLIENTS: usize = 100_000;

/// What this process holds for one client.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    /// Requests still answered from it.
    left: u32,
    /// The store's verdict for it.
    admitted: bool,
    /// When the store gave it.
    at: Instant,
}

/// Reservations per counter key.
#[derive(Debug, Default)]
pub struct PreCount {
    held: Mutex<HashMap<String, Reservation>>,
}

impl PreCount {
    /// Counts one request under `key` (at most `limit` per `window`) in `counters`, a batch at
    /// a time (see the module documentation). `Ok(true)` when the request is admitted.
    pub async fn hit(
        &self,
        counters: &dyn RateLimiter,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> kst_core::Result<bool> {
        if limit < 4 * BATCH {
            return counters.hit(key, limit, window).await;
        }
        let now = Instant::now();
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = held.get_mut(key)
                && r.left > 0
                && now.duration_since(r.at) < RESERVATION_TTL
            {
                r.left -= 1;
                return Ok(r.admitted);
            }
        }
        let admitted = counters.hit(key, limit.div_ceil(BATCH), window).await?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= MAX_CLIENTS && !held.contains_key(key) {
            held.retain(|_, r| r.left > 0 && now.duration_since(r.at) < RESERVATION_TTL);
            if held.len() >= MAX_CLIENTS {
                held.clear();
            }
        }
        let now = Instant::now();
        let fresh = Reservation {
            // A refusal answers every request of the client until it is RESERVATION_TTL old,
            // without another write (red-team round 6: a refused client wrote once per BATCH
            // requests for as long as it kept asking).
            left: if admitted { BATCH - 1 } else { u32::MAX },
            admitted,
            at: now,
        };
        match held.get_mut(key) {
            // Another request of the client reserved a batch while this one was asking (red-
            // team round 6: replacing it lost its unused requests, counted all the same, so
            // a client with requests in flight was refused after an eighth of its limit).
            // A refusal held stays; an admission adds its batch to one held.
            Some(r) if r.left > 0 && now.duration_since(r.at) < RESERVATION_TTL => {
                match (r.admitted, admitted) {
                    (false, _) => {}
                    (true, true) => {
                        r.left = r.left.saturating_add(BATCH - 1);
                        r.at = now;
                    }
                    (true, false) => *r = fresh,
                }
            }
            _ => {
                held.insert(key.to_string(), fresh);
            }
        }
        Ok(admitted)
    }

    /// Clients with a reservation held (for tests).
    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::MemoryRateLimiter;
    use std::sync::Arc;

    const WINDOW: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn a_client_gets_its_limit_and_at_most_a_batch_more() {
        let counters = MemoryRateLimiter::new();
        let p = PreCount::default();
        let limit = 100;
        let mut admitted = 0;
        for _ in 0..1_000 {
            if p.hit(&counters, "c", limit, WINDOW).await.unwrap() {
                admitted += 1;
            }
        }
        assert!(
            (limit..limit + BATCH).contains(&admitted),
            "admitted {admitted} of a limit of {limit}"
        );
        assert!(p.hit(&counters, "other", limit, WINDOW).await.unwrap());
    }

    #[tokio::test]
    async fn small_limits_are_counted_exactly() {
        let counters = MemoryRateLimiter::new();
        let p = PreCount::default();
        let mut admitted = 0;
        for _ in 0..100 {
            if p.hit(&counters, "c", 3, WINDOW).await.unwrap() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        assert!(p.is_empty(), "nothing held for an exact limit");
    }

    /// Counts the writes that reach the shared counters.
    struct Counting(MemoryRateLimiter, std::sync::atomic::AtomicU32);

    #[async_trait::async_trait]
    impl RateLimiter for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.hit(key, limit, window).await
        }
    }

    #[tokio::test]
    async fn the_store_sees_one_write_per_batch() {
        let counters = Counting(MemoryRateLimiter::new(), Default::default());
        let p = PreCount::default();
        for _ in 0..(10 * BATCH) {
            assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        }
        assert_eq!(counters.1.load(std::sync::atomic::Ordering::Relaxed), 10);
    }

    /// Red-team round 6: a client refused by the store kept writing to it, once per
    /// [`BATCH`] requests, for as long as it kept asking (each write a hit in the web
    /// coalescer's bounded queue, which everyone shares). A refusal is now held for
    /// [`RESERVATION_TTL`].
    #[tokio::test]
    async fn a_refused_client_does_not_write_to_the_store_again_until_the_ttl() {
        let counters = Counting(MemoryRateLimiter::new(), Default::default());
        let p = PreCount::default();
        let limit = 4 * BATCH;
        let mut admitted = 0;
        while p.hit(&counters, "c", limit, WINDOW).await.unwrap() {
            admitted += 1;
            assert!(admitted <= limit + BATCH, "never refused");
        }
        let writes = counters.1.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..(100 * BATCH) {
            assert!(!p.hit(&counters, "c", limit, WINDOW).await.unwrap());
        }
        assert_eq!(
            counters.1.load(std::sync::atomic::Ordering::Relaxed),
            writes,
            "a refused client's requests are answered here until the refusal is {RESERVATION_TTL:?} old"
        );
    }

    /// Counts like [`Counting`], each write taking a round trip.
    struct SlowCounting(MemoryRateLimiter, std::sync::atomic::AtomicU32);

    #[async_trait::async_trait]
    impl RateLimiter for SlowCounting {
        fn name(&self) -> &'static str {
            "slow-counting"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.0.hit(key, limit, window).await
        }
    }

    /// Red-team round 6: concurrent requests of one client that found no reservation each
    /// wrote one to the store, and each answer replaced the reservation the others had just
    /// made: `BATCH - 1` requests of every replaced reservation were counted and never
    /// answered from it, so a client keeping 64 requests in flight was refused after about
    /// an eighth of its limit. Reservations made concurrently now add up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_with_requests_in_flight_gets_its_whole_limit() {
        let counters = Arc::new(SlowCounting(MemoryRateLimiter::new(), Default::default()));
        let p = Arc::new(PreCount::default());
        let limit = 64 * BATCH;
        let admitted = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // 64 connections of one client, each sending requests one after the other, 2 × limit
        // requests in all.
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (counters, p, admitted) = (counters.clone(), p.clone(), admitted.clone());
                tokio::spawn(async move {
                    for _ in 0..(2 * limit / 64) {
                        if p.hit(counters.as_ref(), "c", limit, WINDOW).await.unwrap() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        // The client's next request on this connection comes a moment later.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let admitted = admitted.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            (limit..limit + BATCH).contains(&admitted),
            "admitted {admitted} of a limit of {limit} ({} store writes)",
            counters.1.load(std::sync::atomic::Ordering::Relaxed)
        );
        // The limit's writes, and the requests in flight when the refusal came; then the
        // refusal answers the rest here.
        let writes = counters.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(writes <= limit / BATCH + 2 * 64, "{writes} store writes");
    }

    #[tokio::test]
    async fn many_clients_stay_bounded() {
        // Only the reservations held here are under test: counters that admit everything.
        struct Admit;
        #[async_trait::async_trait]
        impl RateLimiter for Admit {
            fn name(&self) -> &'static str {
                "admit"
            }
            async fn hit(&self, _: &str, _: u32, _: Duration) -> kst_core::Result<bool> {
                Ok(true)
            }
        }
        let counters = Admit;
        let p = PreCount::default();
        for i in 0..(MAX_CLIENTS + 10) {
            p.hit(&counters, &format!("c{i}"), 1_000, WINDOW)
                .await
                .unwrap();
        }
        assert!(p.len() <= MAX_CLIENTS);
    }
}
