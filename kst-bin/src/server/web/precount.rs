//! The per-client request limit counted in the shared store a batch at a time: one write to
//! the counters for every [`BATCH`] requests of a client, instead of one per request.
//!
//! Each write reserves [`BATCH`] requests of the client (the store counts reservations, with a
//! limit of `ceil(limit / BATCH)`), and this process answers the client's next `BATCH - 1`
//! requests from that reservation with the store's verdict, without asking the store. A
//! reservation is used for at most [`RESERVATION_TTL`]; afterwards (or once spent) the next
//! request asks the store again. The bounded inaccuracy, stated in docs/SECURITY.md
//! ("Web look-ups: what the limits count"): a client may make up to `BATCH - 1` requests more
//! than `per_client` per window and per `kst serve` of a pool (the last reservation is not
//! split), and one refused may be refused up to `RESERVATION_TTL` after its window ended.
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
        held.insert(
            key.to_string(),
            Reservation {
                left: BATCH - 1,
                admitted,
                at: Instant::now(),
            },
        );
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
