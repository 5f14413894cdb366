//! The per-client request limit counted in the shared store a batch at a time: one write to
//! the counters for every [`BATCH`] requests of a client, instead of one per request, written
//! ahead for a client that keeps asking, so that its requests after its first do not wait for
//! the counters.
//!
//! Each write reserves [`BATCH`] requests of the client (the store counts reservations, with a
//! limit of `ceil(limit / BATCH)`), and this process answers the client's requests from what
//! the store admitted, without asking it. A request that finds nothing held (the client's
//! first, or the first after what it held was spent or expired) writes and waits for the
//! verdict; an admitted reservation answers it and the client's next `BATCH - 1` requests.
//!
//! **Reserving ahead.** When a request leaves `BATCH / 2` or fewer held, and the client has
//! used its requests fast enough to use what it holds and one batch more within
//! [`RESERVATION_TTL`] at that rate, the client's next reservation is written in the
//! background ([`Coalescer::hit_ahead`]), at most one at a time per client. An admitted refill
//! adds a whole batch ([`BATCH`] requests) to what the client holds; so a client that keeps
//! asking waits for the counters once, not once per batch, as long as a refill's round trip
//! takes less than its next `BATCH / 2` requests. A refill goes out only while the coalescer's
//! queue is less than half full, so refills never take the room requests wait for (never make
//! one answered 503), and the refills unanswered are bounded by the queue whatever the number
//! of clients (at most `MAX_QUEUED_HITS / 2` waiting plus the batches being counted); one that
//! does not fit is not sent (the client writes itself once its batch is spent, as it would
//! without refills). One that fails (an error of the counters: it may have been counted) adds
//! nothing and is not retried from the background until a request's own write admits a batch.
//!
//! Reservations that concurrent requests of one client made, and its refill, add up (none is
//! lost). A refusal (of a request's write or of a refill) answers every request of the client
//! once what it holds is spent, until the refusal is [`RESERVATION_TTL`] old, without another
//! write and without refills, so a refused client costs the shared counters (and the
//! coalescer's bounded queue) one write per TTL. What a client holds is used for at most
//! [`RESERVATION_TTL`] after its newest batch was admitted; afterwards the next request asks
//! the store again.
//!
//! The bounded inaccuracy, stated in docs/SECURITY.md ("What the limits count, exactly"):
//!
//! - the store admits at most `ceil(per_client / BATCH)` reservations per window, so the
//!   requests answered from reservations counted in one window are at most
//!   `ceil(per_client / BATCH) × BATCH ≤ per_client + BATCH - 1`, all `kst serve` of a pool
//!   together;
//! - what a client held when a window ended is still answered, into the first
//!   [`RESERVATION_TTL`] of the next window: in each `kst serve`, the unused part of one batch
//!   reserved ahead ([`BATCH`]) and of `BATCH - 1` for each write of its own requests in the
//!   TTL before; for a client that sends one request at a time, at most `2 × BATCH - 1` (15),
//!   against `BATCH - 1` (7) without reserving ahead;
//! - a client is never counted less than it asked, but may be counted for requests it never
//!   made: what it held when it stopped asking, up to `2 × BATCH - 1` (a batch reserved ahead
//!   and the rest of the one it was using) each time it stops after asking fast enough to
//!   reserve ahead (`BATCH - 1` without reserving ahead);
//! - a client refused at the end of a window may stay refused up to [`RESERVATION_TTL`] into
//!   the next.
//!
//! The miss budgets (the dictionary oracle) are counted exactly, one write per miss, before
//! the answer. Limits below `4 × BATCH` are counted exactly too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kst_core::RateLimiter;
use kst_core::ratelimit::Hit;

use super::coalesce::{Coalescer, answer_ahead};

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
    /// Admitted requests still answered from it.
    left: u32,
    /// When the store admitted its newest batch.
    at: Instant,
    /// Requests answered from it since `at` (the client's rate, for reserving ahead).
    used: u32,
    /// When the store refused the client last: it is refused, once `left` is spent, until
    /// this is [`RESERVATION_TTL`] old.
    refused: Option<Instant>,
    /// A refill (the next reservation, written ahead) is being counted.
    refilling: bool,
    /// A refill failed: none is sent again until a request's own write admits a batch.
    refill_failed: bool,
}

impl Reservation {
    fn new(now: Instant) -> Reservation {
        Reservation {
            left: 0,
            at: now,
            used: 0,
            refused: None,
            refilling: false,
            refill_failed: false,
        }
    }

    /// Whether a request can be answered from what is held.
    fn usable(&self, now: Instant) -> bool {
        self.left > 0 && now.duration_since(self.at) < RESERVATION_TTL
    }

    /// Whether a refusal is held.
    fn refused(&self, now: Instant) -> bool {
        self.refused
            .is_some_and(|t| now.duration_since(t) < RESERVATION_TTL)
    }

    /// Whether something is held here for the client (kept when the map is swept).
    fn live(&self, now: Instant) -> bool {
        self.usable(now) || self.refused(now) || self.refilling
    }

    /// Adds `n` admitted requests, `used` of them answered already.
    fn add(&mut self, n: u32, used: u32, now: Instant) {
        if self.usable(now) {
            self.left = self.left.saturating_add(n);
        } else {
            self.left = n;
        }
        self.at = now;
        self.used = used;
    }

    /// Whether the next reservation should be written ahead now: half a batch or less left,
    /// none being written, no refusal held, and the client's rate since `at` uses what it
    /// holds and a batch more before [`RESERVATION_TTL`] (a client that asks slowly would
    /// let it expire: counted, never used).
    fn wants_refill(&self, now: Instant) -> bool {
        !self.refilling
            && !self.refill_failed
            && self.left <= BATCH / 2
            && !self.refused(now)
            && now
                .duration_since(self.at)
                .saturating_mul(self.left.saturating_add(BATCH))
                < RESERVATION_TTL.saturating_mul(self.used)
    }
}

type Held = Arc<Mutex<HashMap<String, Reservation>>>;

fn lock(held: &Held) -> MutexGuard<'_, HashMap<String, Reservation>> {
    held.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reservation of `key` in `held`, made (empty) if there is none; [`MAX_CLIENTS`] bounds
/// the map.
fn entry<'a>(
    held: &'a mut HashMap<String, Reservation>,
    key: &str,
    now: Instant,
) -> &'a mut Reservation {
    if held.len() >= MAX_CLIENTS && !held.contains_key(key) {
        held.retain(|_, r| r.live(now));
        if held.len() >= MAX_CLIENTS {
            held.clear();
        }
    }
    held.entry(key.to_string())
        .or_insert_with(|| Reservation::new(now))
}

/// Reservations per counter key.
#[derive(Debug, Default)]
pub struct PreCount {
    held: Held,
}

impl PreCount {
    /// Counts one request under `key` (at most `limit` per `window`) in `counters`, a batch at
    /// a time, the next batch written ahead (see the module documentation). `Ok(true)` when
    /// the request is admitted. Needs a Tokio runtime (refills are tasks).
    pub async fn hit(
        &self,
        counters: &Coalescer,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> kst_core::Result<bool> {
        if limit < 4 * BATCH {
            return counters.hit(key, limit, window).await;
        }
        let reservations = limit.div_ceil(BATCH);
        let now = Instant::now();
        {
            let mut held = lock(&self.held);
            if let Some(r) = held.get_mut(key) {
                if r.usable(now) {
                    r.left -= 1;
                    r.used = r.used.saturating_add(1);
                    if r.wants_refill(now) {
                        self.refill(r, counters, Hit::new(key, reservations, window));
                    }
                    return Ok(true);
                }
                if r.refused(now) {
                    return Ok(false);
                }
            }
        }
        let admitted = counters.hit(key, reservations, window).await?;
        let mut held = lock(&self.held);
        let now = Instant::now();
        let r = entry(&mut held, key, now);
        if admitted {
            // Another request of the client, or its refill, may have added a batch while this
            // one was asking (red-team round 6: replacing it lost its unused requests, counted
            // all the same, so a client with requests in flight was refused after an eighth
            // of its limit): batches add up.
            r.add(BATCH - 1, 1, now);
            r.refill_failed = false;
        } else {
            // A refusal answers every request of the client (once what it holds is spent)
            // until it is RESERVATION_TTL old, without another write (red-team round 6: a
            // refused client wrote once per BATCH requests for as long as it kept asking).
            r.refused = Some(now);
        }
        Ok(admitted)
    }

    /// Writes the next reservation of `r`'s client (`hit`) ahead, in the background, if the
    /// coalescer's queue has room for it ([`Coalescer::hit_ahead`]); its verdict is added to
    /// what the client holds when it comes.
    fn refill(&self, r: &mut Reservation, counters: &Coalescer, hit: Hit) {
        let key = hit.key.clone();
        // No room: nothing is sent, and the client writes itself once its batch is spent.
        let Some(answer) = counters.hit_ahead(hit) else {
            return;
        };
        r.refilling = true;
        let held = Arc::clone(&self.held);
        tokio::spawn(async move {
            let verdict = answer_ahead(answer).await;
            let mut held = lock(&held);
            let now = Instant::now();
            let r = entry(&mut held, &key, now);
            r.refilling = false;
            match verdict {
                Ok(true) => r.add(BATCH, 0, now),
                Ok(false) => r.refused = Some(now),
                // It may have been counted: nothing is added, and no refill is sent again
                // until a request's own write admits a batch (no retries while the counters
                // fail).
                Err(_) => r.refill_failed = true,
            }
        });
    }

    /// Clients with a reservation held (for tests).
    pub fn len(&self) -> usize {
        lock(&self.held).len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refills being counted now (for tests).
    pub fn refilling(&self) -> usize {
        lock(&self.held).values().filter(|r| r.refilling).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::MemoryRateLimiter;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    const WINDOW: Duration = Duration::from_secs(600);

    fn coalescer(counters: impl RateLimiter + 'static) -> Coalescer {
        Coalescer::new(Arc::new(counters))
    }

    /// Lets the refills being counted land (the counters answer before the client's next
    /// request, as they do when they keep up).
    async fn settle(p: &PreCount) {
        while p.refilling() > 0 {
            tokio::task::yield_now().await;
        }
    }

    /// Polls `f` once: `Some` when it answered without waiting for anything.
    fn at_once<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_client_gets_its_limit_and_at_most_a_batch_more() {
        let counters = coalescer(MemoryRateLimiter::new());
        let p = PreCount::default();
        let limit = 100;
        let mut admitted = 0;
        for _ in 0..1_000 {
            if p.hit(&counters, "c", limit, WINDOW).await.unwrap() {
                admitted += 1;
            }
            settle(&p).await;
        }
        assert!(
            (limit..limit + BATCH).contains(&admitted),
            "admitted {admitted} of a limit of {limit}"
        );
        assert!(p.hit(&counters, "other", limit, WINDOW).await.unwrap());
    }

    #[tokio::test]
    async fn small_limits_are_counted_exactly() {
        let counters = coalescer(MemoryRateLimiter::new());
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

    /// Counts the writes that reach the shared counters; fails them while `fail` is set.
    #[derive(Default)]
    struct Counting {
        inner: MemoryRateLimiter,
        writes: AtomicU32,
        fail: AtomicBool,
    }

    impl Counting {
        fn writes(&self) -> u32 {
            self.writes.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl RateLimiter for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(kst_core::Error::unavailable("ratelimit(counting)", "down"));
            }
            self.inner.hit(key, limit, window).await
        }
    }

    #[tokio::test]
    async fn the_store_sees_one_write_per_batch_and_one_ahead() {
        let store = Arc::new(Counting::default());
        let counters = Coalescer::new(store.clone());
        let p = PreCount::default();
        for _ in 0..(10 * BATCH) {
            assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
            settle(&p).await;
        }
        // One write for the first request, then one refill per batch: ten batches used,
        // and at most one more reserved ahead.
        assert!(
            (10..=11).contains(&store.writes()),
            "{} writes for {} requests",
            store.writes(),
            10 * BATCH
        );
    }

    /// Reserving ahead: a client that keeps asking waits for the counters on its first
    /// request only, as long as each refill lands before the client's next request.
    #[tokio::test]
    async fn an_admitted_clients_requests_after_its_first_never_wait_for_the_counters() {
        let store = Arc::new(Counting::default());
        let counters = Coalescer::new(store.clone());
        let p = PreCount::default();
        assert!(
            at_once(p.hit(&counters, "c", 1_000, WINDOW)).is_none(),
            "the first request waits for its write"
        );
        assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        let first = store.writes();
        for i in 0..(20 * BATCH) {
            let answer = at_once(p.hit(&counters, "c", 1_000, WINDOW))
                .unwrap_or_else(|| panic!("request {} waited for the counters", i + 2));
            assert!(answer.unwrap());
            settle(&p).await;
        }
        let writes = store.writes() - first;
        assert!(
            (20..=22).contains(&writes),
            "{writes} refills for {} requests",
            20 * BATCH
        );
    }

    /// Red-team round 6: a client refused by the store kept writing to it, once per
    /// [`BATCH`] requests, for as long as it kept asking (each write a hit in the web
    /// coalescer's bounded queue, which everyone shares). A refusal is now held for
    /// [`RESERVATION_TTL`], and no refill goes out while it is held.
    #[tokio::test]
    async fn a_refused_client_does_not_write_to_the_store_again_until_the_ttl() {
        let store = Arc::new(Counting::default());
        let counters = Coalescer::new(store.clone());
        let p = PreCount::default();
        let limit = 4 * BATCH;
        let mut admitted = 0;
        while p.hit(&counters, "c", limit, WINDOW).await.unwrap() {
            admitted += 1;
            assert!(admitted <= limit + BATCH, "never refused");
            settle(&p).await;
        }
        assert_eq!(admitted, limit, "every admitted batch used, whole");
        settle(&p).await;
        let writes = store.writes();
        for _ in 0..(100 * BATCH) {
            assert!(!p.hit(&counters, "c", limit, WINDOW).await.unwrap());
            settle(&p).await;
        }
        assert_eq!(
            store.writes(),
            writes,
            "a refused client's requests are answered here until the refusal is {RESERVATION_TTL:?} old"
        );
    }

    /// Counts like [`Counting`], each write taking a round trip.
    #[derive(Default)]
    struct SlowCounting(MemoryRateLimiter, AtomicU32);

    #[async_trait::async_trait]
    impl RateLimiter for SlowCounting {
        fn name(&self) -> &'static str {
            "slow-counting"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
            Ok(self.hit_many(&[Hit::new(key, limit, window)]).await?[0])
        }
        async fn hit_many(&self, hits: &[Hit]) -> kst_core::Result<Vec<bool>> {
            self.1.fetch_add(hits.len() as u32, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.0.hit_many(hits).await
        }
    }

    /// Red-team round 6: concurrent requests of one client that found no reservation each
    /// wrote one to the store, and each answer replaced the reservation the others had just
    /// made: `BATCH - 1` requests of every replaced reservation were counted and never
    /// answered from it, so a client keeping 64 requests in flight was refused after about
    /// an eighth of its limit. Reservations made concurrently (and refills) now add up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_with_requests_in_flight_gets_its_whole_limit() {
        let store = Arc::new(SlowCounting::default());
        let counters = Coalescer::new(store.clone());
        let p = Arc::new(PreCount::default());
        let limit = 64 * BATCH;
        let admitted = Arc::new(AtomicU32::new(0));
        // 64 connections of one client, each sending requests one after the other, 2 × limit
        // requests in all.
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (counters, p, admitted) = (counters.clone(), p.clone(), admitted.clone());
                tokio::spawn(async move {
                    for _ in 0..(2 * limit / 64) {
                        if p.hit(&counters, "c", limit, WINDOW).await.unwrap() {
                            admitted.fetch_add(1, Ordering::Relaxed);
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
        let admitted = admitted.load(Ordering::Relaxed);
        assert!(
            (limit..limit + BATCH).contains(&admitted),
            "admitted {admitted} of a limit of {limit} ({} store writes)",
            store.1.load(Ordering::Relaxed)
        );
        // The limit's writes, and the requests in flight when the refusal came; then the
        // refusal answers the rest here.
        let writes = store.1.load(Ordering::Relaxed);
        assert!(writes <= limit / BATCH + 2 * 64, "{writes} store writes");
    }

    /// A refill goes out only while the coalescer's queue is less than half full: it never
    /// takes the room requests wait for, and a client whose refill does not fit is neither
    /// refused nor retried in the background: it writes itself once its batch is spent.
    #[tokio::test]
    async fn no_refill_when_the_queue_is_half_full_and_the_client_is_not_refused() {
        let store = Arc::new(Counting::default());
        let counters = Coalescer::with_limits(store.clone(), 1, 8, 4);
        let p = PreCount::default();
        assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        // Looks-ups' room for their misses holds half of the bound.
        let room = counters.reserve(2).unwrap();
        for _ in 1..BATCH {
            assert!(
                at_once(p.hit(&counters, "c", 1_000, WINDOW))
                    .unwrap()
                    .unwrap()
            );
            assert_eq!(p.refilling(), 0, "no refill into a half-full queue");
        }
        assert_eq!(store.writes(), 1);
        assert_eq!(counters.queued_hits(), 0);
        // Spent: the client writes itself (the request's own hit fits), admitted.
        assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        assert_eq!(store.writes(), 2);
        // With room again, the next refill goes out.
        drop(room);
        for _ in 0..BATCH {
            assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
            settle(&p).await;
        }
        assert_eq!(store.writes(), 3, "a refill, once there was room");
    }

    /// A refill that fails (it may have been counted) adds nothing and is not sent again
    /// until a request's own write admits a batch: no retries in the background while the
    /// counters fail. The request that finds the batch spent gets the error (503).
    #[tokio::test]
    async fn a_failed_refill_is_not_retried_in_the_background() {
        let store = Arc::new(Counting::default());
        let counters = Coalescer::new(store.clone());
        let p = PreCount::default();
        assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        store.fail.store(true, Ordering::SeqCst);
        for _ in 1..BATCH {
            assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
            settle(&p).await;
        }
        assert_eq!(store.writes(), 2, "one refill, failed, not retried");
        let e = p.hit(&counters, "c", 1_000, WINDOW).await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        assert_eq!(store.writes(), 3);
        store.fail.store(false, Ordering::SeqCst);
        assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
        for _ in 0..BATCH {
            assert!(p.hit(&counters, "c", 1_000, WINDOW).await.unwrap());
            settle(&p).await;
        }
        assert_eq!(store.writes(), 5, "refills again after an admitted write");
    }

    /// Counters that answer only once the gate opens (a stalled store), counting the writes.
    struct Gated {
        inner: MemoryRateLimiter,
        open: tokio::sync::watch::Receiver<bool>,
        writes: AtomicU32,
    }

    #[async_trait::async_trait]
    impl RateLimiter for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            self.inner.hit(key, limit, window).await
        }
    }

    /// Many clients, each with a refill stalled in the counters: one refill in flight per
    /// client at most, and all of them together bounded by the coalescer's queue (half of
    /// its bound waiting), not by the number of clients; the clients' requests are answered
    /// from what they hold all the same.
    #[tokio::test]
    async fn refills_in_flight_are_bounded_by_the_queue() {
        let (gate, open) = tokio::sync::watch::channel(true);
        let store = Arc::new(Gated {
            inner: MemoryRateLimiter::new(),
            open,
            writes: AtomicU32::new(0),
        });
        let counters = Coalescer::with_limits(store.clone(), 1, 4, 16);
        let p = PreCount::default();
        let clients = 100;
        for c in 0..clients {
            assert!(
                p.hit(&counters, &format!("c{c}"), 1_000, WINDOW)
                    .await
                    .unwrap()
            );
        }
        gate.send_replace(false);
        for _ in 1..BATCH {
            for c in 0..clients {
                let answer = at_once(p.hit(&counters, &format!("c{c}"), 1_000, WINDOW));
                assert!(answer.expect("answered from the batch held").unwrap());
            }
        }
        // Nothing ran meanwhile (one thread): the refills wait in the queue, half of its
        // bound of 16; the other clients sent none.
        assert_eq!(p.refilling(), 8);
        assert_eq!(counters.queued_hits(), 8);
        assert_eq!(store.writes.load(Ordering::SeqCst), clients);
        gate.send_replace(true);
        settle(&p).await;
        assert_eq!(p.refilling(), 0);
        assert_eq!(store.writes.load(Ordering::SeqCst), clients + 8);
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
        let counters = coalescer(Admit);
        let p = PreCount::default();
        for i in 0..(MAX_CLIENTS + 10) {
            p.hit(&counters, &format!("c{i}"), 1_000, WINDOW)
                .await
                .unwrap();
        }
        assert!(p.len() <= MAX_CLIENTS);
    }
}
