//! The per-client request limit counted behind the requests ("write-behind"): a request of a
//! client in good standing is admitted at once and its hit is added to a count pending in this
//! process; one flusher task sends every client's pending hits to the shared counters in ONE
//! [`RateLimiter::hit_many`] at most every [`FLUSH`], so the store sees a few dozen writes a
//! second (one log sync each on a Redis key store with `appendfsync always`, unless
//! `[web.counters]` puts the counters on a Redis of their own), however many clients ask,
//! instead of one write per 8 requests of each client (the reservations this replaces, which
//! made 1 request in 8 of every client wait for a store round trip: 12.5% of all requests,
//! more than the 1% a p99 leaves).
//!
//! What a request does, by what this process knows of its client:
//!
//! - **Refused by the store** less than [`REFUSAL_TTL`] ago: refused here, nothing written.
//! - **Good standing** (no refusal in the window, fewer than [`CAP`] of its requests admitted
//!   here whose hits have no verdict yet, and the counters not failing for [`STALE`]):
//!   admitted at once; its hit goes with the next flush.
//! - **Otherwise** (its [`CAP`] used up, refused within the window but longer than
//!   [`REFUSAL_TTL`] ago, or the counters failing for [`STALE`]): its hit is added all the
//!   same, and the request waits for the next flush, which starts at once when the previous one
//!   started at least [`MIN_GAP`] ago, and gets that flush's verdict of its own hit (the
//!   store's count exactly, as a single [`RateLimiter::hit`] would give it) or its error (a
//!   temporary failure: 503).
//!
//! A flush's verdicts for a client: when the last of its hits is past the limit, the client is
//! refused here for [`REFUSAL_TTL`], and gets no optimism for the window (`window_secs`) from
//! then, so a refused client cannot gain [`CAP`] requests per TTL; a later verdict within the
//! limit (its window ended in the store) gives it back its good standing.
//!
//! **The bound, exactly.** Every request admitted is counted once in the store (a flush that
//! fails is sent again with the next one; a flush that timed out may have counted its hits,
//! which are then counted twice: never fewer). Of one client's requests, those admitted past
//! `per_client` in a window are at most [`CAP`] per `kst serve` of a pool (the requests
//! admitted at once whose verdicts had not come back when the store's count passed the
//! limit; a request that waits is admitted only when its own hit is within the limit), plus
//! [`CAP`] again after this process forgot the client (only a client with nothing pending,
//! nothing in flight and no refusal in the window is forgotten, so only one that was never
//! refused). A hit is counted up to [`FLUSH`] plus a round trip after its request was
//! answered, so a request at the very end of a window may be counted in the next. When
//! `kst serve` stops, or its process dies, the pending hits, at most [`CAP`] per client in
//! good standing, are lost. While the counters fail, requests of clients in good standing are
//! admitted for at most [`STALE`] (and [`CAP`] each, as always) before they wait and get the
//! error. Limits below [`EXACT_BELOW`] are counted one request at a time, exactly, through
//! [`super::coalesce`]; the miss budgets always are (`super::limits`).
//!
//! **Bounds on memory and writes.** At most [`MAX_CLIENTS`] clients are held (a new client
//! beyond them, when no idle one can be forgotten, is counted exactly through the coalescer
//! instead); at most [`MAX_OUTSTANDING`] hits are pending or in flight, at most
//! [`MAX_OUTSTANDING_PER_CLIENT`] of them of one client and [`MAX_OUTSTANDING_PER_NETWORK`] of
//! the clients of one network (an IPv6 /48, `super::batcher::for_client`) (a request beyond
//! any is refused at once, a temporary failure counted in `kst_web_counters_busy_total`: a
//! request that goes away while it waits leaves its hit pending, so while the counters stall,
//! a client sending requests and closing their connections would otherwise fill the bound for
//! everyone, and so would the 256 /64s of one /56); one
//! flush is in flight at a time, at most one every [`FLUSH`] while no request waits and one
//! every [`MIN_GAP`] while one does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kst_core::ratelimit::Hit;
use kst_core::{Error, RateLimiter, Result};
use tokio::sync::{Notify, oneshot};
// Tokio's clock (the same as std's, except in tests with the clock paused).
use tokio::time::Instant;

/// Most requests of one client admitted by this process without the store's verdict.
pub const CAP: u32 = 8;

/// Longest time between two flushes while requests are pending and none waits. 25 ms: 40
/// writes a second to the shared counters (on Redis, 40 log syncs of ~1.5 ms: about 6% of its
/// time), and a client in good standing waits only when it asks faster than [`CAP`] per
/// flush (320 requests a second, 0.3 s of a default `per_client` of 1,000 per 10 minutes).
pub const FLUSH: Duration = Duration::from_millis(25);

/// Shortest time between the starts of two flushes when a request waits for one: at most
/// 200 flushes a second, however many requests wait.
pub const MIN_GAP: Duration = Duration::from_millis(5);

/// How long a client refused by the store is refused here without a write.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);

/// How long the counters may fail before requests wait for a flush and get its error.
pub const STALE: Duration = Duration::from_secs(1);

/// Most clients held; beyond it idle ones are forgotten, and a new client is counted exactly.
pub const MAX_CLIENTS: usize = 100_000;

/// Most hits pending or in flight (about 0.8 s of 20,000 requests a second).
pub const MAX_OUTSTANDING: usize = 16_384;

/// Most hits of one client pending or in flight: its [`CAP`] requests admitted at once and
/// up to 120 requests waiting for a verdict (a client holds at most 64 connections by default,
/// each with one request at a time).
pub const MAX_OUTSTANDING_PER_CLIENT: u32 = 16 * CAP;

/// Most hits of the clients of one network (an IPv6 /48) pending or in flight: a quarter of
/// [`MAX_OUTSTANDING`] (`super::batcher::NETWORK_SHARE`). Red team (counters and shares): a
/// client is an IPv6 /64, and the 128 /64s a /56 holds (256) filled the bound alone.
pub const MAX_OUTSTANDING_PER_NETWORK: usize = MAX_OUTSTANDING / super::batcher::NETWORK_SHARE;

/// Limits below this are counted exactly, one request at a time.
pub const EXACT_BELOW: u32 = 4 * CAP;

/// The times a [`WriteBehind`] keeps: [`Timing::DEFAULT`] is [`FLUSH`], [`MIN_GAP`],
/// [`REFUSAL_TTL`] and [`STALE`] (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Longest time between two flushes while hits are pending.
    pub flush: Duration,
    /// Shortest time between two flushes while a request waits.
    pub min_gap: Duration,
    /// How long a refusal is answered here.
    pub refusal_ttl: Duration,
    /// How long the counters may fail before every request waits.
    pub stale: Duration,
}

impl Timing {
    /// The times `kst serve` uses.
    pub const DEFAULT: Timing = Timing {
        flush: FLUSH,
        min_gap: MIN_GAP,
        refusal_ttl: REFUSAL_TTL,
        stale: STALE,
    };
}

/// How often idle clients are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What this process holds for one client.
struct Client {
    /// Hits not sent yet.
    pending: u32,
    /// Of `pending`, the hits of requests admitted at once.
    pending_optimistic: u32,
    /// Requests admitted at once whose hits have no verdict yet (pending or in flight).
    optimistic: u32,
    /// Hits in the flush in flight.
    in_flight: u32,
    /// Requests waiting for a verdict: the position of their hit in `pending`, and where the
    /// verdict goes.
    waiters: Vec<(u32, oneshot::Sender<Result<bool>>)>,
    /// Refused here, without a write, until then.
    refused_until: Option<Instant>,
    /// Refused by the store within the window: no request admitted at once until then.
    wary_until: Option<Instant>,
    /// The network it belongs to (`super::batcher::for_client`), if any.
    network: Option<Arc<str>>,
}

impl Client {
    fn new(network: Option<Arc<str>>) -> Client {
        Client {
            network,
            pending: 0,
            pending_optimistic: 0,
            optimistic: 0,
            in_flight: 0,
            waiters: Vec::new(),
            refused_until: None,
            wary_until: None,
        }
    }

    /// Whether forgetting it changes nothing but its next request's optimism.
    fn idle(&self, now: Instant) -> bool {
        self.pending == 0
            && self.in_flight == 0
            && self.optimistic == 0
            && self.waiters.is_empty()
            && self.refused_until.is_none_or(|t| t <= now)
            && self.wary_until.is_none_or(|t| t <= now)
    }
}

/// What a request does next ([`WriteBehind::hit`]).
enum Step {
    /// Answered at once.
    Answer(Result<bool>),
    /// Waits for the verdict of its hit in the next flush.
    Wait(oneshot::Receiver<Result<bool>>),
    /// Counted exactly (no room to hold its client).
    Exact,
}

/// The hits of one client in a flush.
struct Record {
    key: String,
    /// Its first hit in the flush's slice.
    start: usize,
    /// Its hits in the flush.
    n: u32,
    /// Of them, those of requests admitted at once.
    optimistic: u32,
    waiters: Vec<(u32, oneshot::Sender<Result<bool>>)>,
    /// Its client's network.
    network: Option<Arc<str>>,
}

struct State {
    clients: HashMap<String, Client>,
    /// Keys of the clients with pending hits.
    dirty: Vec<String>,
    /// Hits pending (not in flight).
    pending: usize,
    /// Hits in the flush in flight.
    in_flight: usize,
    /// Hits pending or in flight per network (networks with none are not kept).
    by_network: HashMap<Arc<str>, usize>,
    /// Requests waiting among the pending hits.
    waiting: usize,
    /// Whether a flusher task runs.
    flusher: bool,
    /// When the last flush started.
    last_start: Option<Instant>,
    /// Since when flushes fail (`None`: the last one succeeded, or none was made).
    failing_since: Option<Instant>,
    last_sweep: Instant,
    /// Flushes made, and hits sent in them (tests, metrics).
    flushes: u64,
    flushed_hits: u64,
}

/// Adds `n` (may be negative) to the hits outstanding of `network` in `by_network`.
fn add_network(by_network: &mut HashMap<Arc<str>, usize>, network: Option<&Arc<str>>, n: isize) {
    let Some(network) = network else {
        return;
    };
    let count = by_network.entry(Arc::clone(network)).or_insert(0);
    *count = count.saturating_add_signed(n);
    if *count == 0 {
        by_network.remove(network);
    }
}

impl State {
    fn sweep(&mut self, now: Instant) {
        self.clients.retain(|_, c| !c.idle(now));
        self.last_sweep = now;
    }
}

struct Shared {
    /// The shared counters, written by the flusher.
    inner: Arc<dyn RateLimiter>,
    /// Where a client that cannot be held is counted exactly (the coalescer).
    exact: Arc<dyn RateLimiter>,
    limit: u32,
    window: Duration,
    timing: Timing,
    state: Mutex<State>,
    /// Wakes the flusher when a request starts waiting.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The per-client request counter of one limiter, written behind the requests (see the
/// module documentation). Needs a Tokio runtime when counting.
#[derive(Clone)]
pub struct WriteBehind {
    shared: Arc<Shared>,
}

impl WriteBehind {
    /// Counts at most `limit` requests per `window` per key in `inner`; a client this process
    /// cannot hold ([`MAX_CLIENTS`]) is counted exactly in `exact` (the coalescer over
    /// `inner`).
    pub fn new(
        inner: Arc<dyn RateLimiter>,
        exact: Arc<dyn RateLimiter>,
        limit: u32,
        window: Duration,
    ) -> WriteBehind {
        WriteBehind::with_timing(inner, exact, limit, window, Timing::DEFAULT)
    }

    /// [`WriteBehind::new`] with other times than [`Timing::DEFAULT`].
    pub fn with_timing(
        inner: Arc<dyn RateLimiter>,
        exact: Arc<dyn RateLimiter>,
        limit: u32,
        window: Duration,
        timing: Timing,
    ) -> WriteBehind {
        WriteBehind {
            shared: Arc::new(Shared {
                inner,
                exact,
                limit,
                window,
                timing,
                state: Mutex::new(State {
                    clients: HashMap::new(),
                    dirty: Vec::new(),
                    pending: 0,
                    in_flight: 0,
                    waiting: 0,
                    flusher: false,
                    last_start: None,
                    failing_since: None,
                    last_sweep: Instant::now(),
                    by_network: HashMap::new(),
                    flushes: 0,
                    flushed_hits: 0,
                }),
                wake: Notify::new(),
            }),
        }
    }

    /// Counts one request under `key`: `Ok(true)` when it is admitted, `Ok(false)` when it
    /// is refused, `Err` (temporary) when the counters fail or too many hits are outstanding.
    pub async fn hit(&self, key: &str) -> Result<bool> {
        match self.step(key) {
            Step::Answer(a) => a,
            // A request that goes away leaves its hit pending: it is counted all the same.
            Step::Wait(rx) => rx.await.unwrap_or_else(|_| Err(lost())),
            Step::Exact => {
                let s = &self.shared;
                s.exact.hit(key, s.limit, s.window).await
            }
        }
    }

    /// What a request of `key` does (the part of [`WriteBehind::hit`] under the lock).
    fn step(&self, key: &str) -> Step {
        let shared = &self.shared;
        let mut st = shared.lock();
        let now = Instant::now();
        if !st.clients.contains_key(key) {
            // At most one sweep per SWEEP_EVERY (a sweep walks every client held).
            if st.clients.len() >= MAX_CLIENTS && now.duration_since(st.last_sweep) >= SWEEP_EVERY {
                st.sweep(now);
            }
            if st.clients.len() >= MAX_CLIENTS {
                return Step::Exact;
            }
            let network = super::batcher::current_client().and_then(|c| c.network().cloned());
            st.clients.insert(key.to_string(), Client::new(network));
        }
        let stale = st
            .failing_since
            .is_some_and(|t| now.duration_since(t) >= shared.timing.stale);
        let full = st.pending + st.in_flight >= MAX_OUTSTANDING;
        let State {
            clients,
            dirty,
            pending,
            waiting,
            by_network,
            ..
        } = &mut *st;
        let Some(c) = clients.get_mut(key) else {
            return Step::Answer(Err(lost()));
        };
        if c.refused_until.is_some_and(|t| t > now) {
            return Step::Answer(Ok(false));
        }
        // One client's share of the bound (red team round 9): a request that goes away while
        // it waits leaves its hit pending, so while the counters stalled one client that sent
        // requests and closed their connections filled the bound, and every other client was
        // answered 503.
        if c.pending + c.in_flight >= MAX_OUTSTANDING_PER_CLIENT {
            drop(st);
            super::metrics::counters_busy();
            return Step::Answer(Err(busy_client()));
        }
        // The clients of one network's share (red team, counters and shares).
        if c.network
            .as_ref()
            .is_some_and(|n| by_network.get(n).copied().unwrap_or(0) >= MAX_OUTSTANDING_PER_NETWORK)
        {
            drop(st);
            super::metrics::counters_busy();
            return Step::Answer(Err(busy_network()));
        }
        if full {
            drop(st);
            super::metrics::counters_busy();
            return Step::Answer(Err(busy()));
        }
        let optimistic = !stale && c.optimistic < CAP && c.wary_until.is_none_or(|t| t <= now);
        c.pending += 1;
        if c.pending == 1 {
            dirty.push(key.to_string());
        }
        *pending += 1;
        add_network(by_network, c.network.as_ref(), 1);
        let step = if optimistic {
            c.optimistic += 1;
            c.pending_optimistic += 1;
            Step::Answer(Ok(true))
        } else {
            let (tx, rx) = oneshot::channel();
            c.waiters.push((c.pending - 1, tx));
            *waiting += 1;
            Step::Wait(rx)
        };
        if !st.flusher {
            st.flusher = true;
            tokio::spawn(run(Arc::clone(shared)));
        } else if matches!(step, Step::Wait(_)) {
            shared.wake.notify_one();
        }
        step
    }

    /// Clients held now.
    pub fn clients(&self) -> usize {
        self.shared.lock().clients.len()
    }

    /// Flushes made so far, and the hits sent in them.
    pub fn flushes(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.flushes, st.flushed_hits)
    }

    /// Hits pending or in flight now.
    pub fn outstanding(&self) -> usize {
        let st = self.shared.lock();
        st.pending + st.in_flight
    }
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("inner", &self.shared.inner.name())
            .field("limit", &self.shared.limit)
            .field("window", &self.shared.window)
            .finish()
    }
}

fn busy() -> Error {
    Error::unavailable(
        "ratelimit(write-behind)",
        format!(
            "{MAX_OUTSTANDING} request counts are waiting for the shared counters already (they \
             are slow or failing); try again later"
        ),
    )
}

fn busy_client() -> Error {
    Error::unavailable(
        "ratelimit(write-behind)",
        format!(
            "{MAX_OUTSTANDING_PER_CLIENT} request counts of this client are waiting for the \
             shared counters already (they are slow or failing); try again later"
        ),
    )
}

fn busy_network() -> Error {
    Error::unavailable(
        "ratelimit(write-behind)",
        format!(
            "{MAX_OUTSTANDING_PER_NETWORK} request counts of this client's network are waiting \
             for the shared counters already (they are slow or failing); try again later"
        ),
    )
}

fn lost() -> Error {
    Error::unavailable(
        "ratelimit(write-behind)",
        "the task counting this request ended before it answered",
    )
}

/// Leaves the flusher's place when its task ends (normally, by a panic, or cancelled with the
/// runtime): a flush in flight then counts as failed (its hits pending again, its waiters
/// answered with an error), and another flusher starts for what is pending.
struct FlusherGuard {
    shared: Arc<Shared>,
    flight: Option<Vec<Record>>,
    done: bool,
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        if let Some(records) = self.flight.take() {
            settle(&self.shared, records, Err(lost()), 0);
        }
        if self.done {
            return;
        }
        let mut st = self.shared.lock();
        st.flusher = false;
        if st.pending > 0
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            st.flusher = true;
            rt.spawn(run(Arc::clone(&self.shared)));
        }
    }
}

/// The flusher: sends the pending hits, one flush at a time, until none is pending.
async fn run(shared: Arc<Shared>) {
    let mut guard = FlusherGuard {
        shared: Arc::clone(&shared),
        flight: None,
        done: false,
    };
    loop {
        let next = {
            let mut st = shared.lock();
            let now = Instant::now();
            if st.pending == 0 {
                st.flusher = false;
                guard.done = true;
                return;
            }
            let gap = if st.waiting > 0 {
                shared.timing.min_gap
            } else {
                shared.timing.flush
            };
            let due = st.last_start.map_or(now, |t| t + gap);
            if due > now {
                Err(due - now)
            } else {
                Ok(take(&shared, &mut st, now, &mut guard))
            }
        };
        let (hits, total) = match next {
            Ok(batch) => batch,
            Err(wait) => {
                let _ = tokio::time::timeout(wait, shared.wake.notified()).await;
                continue;
            }
        };

        let result = shared.inner.hit_many(&hits).await;
        drop(hits);
        if let Some(records) = guard.flight.take() {
            settle(&shared, records, result, total);
        }
    }
}

/// Takes every pending hit into a flush starting `now`: its hits, and its records in `guard`.
fn take(
    shared: &Shared,
    st: &mut State,
    now: Instant,
    guard: &mut FlusherGuard,
) -> (Vec<Hit>, usize) {
    let keys = std::mem::take(&mut st.dirty);
    let mut hits = Vec::with_capacity(st.pending);
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(c) = st.clients.get_mut(&key) else {
            continue;
        };
        if c.pending == 0 {
            continue;
        }
        let start = hits.len();
        hits.extend(
            std::iter::repeat_with(|| Hit::new(key.clone(), shared.limit, shared.window))
                .take(c.pending as usize),
        );
        records.push(Record {
            start,
            n: c.pending,
            optimistic: c.pending_optimistic,
            waiters: std::mem::take(&mut c.waiters),
            network: c.network.clone(),
            key,
        });
        c.in_flight += c.pending;
        c.pending = 0;
        c.pending_optimistic = 0;
    }
    st.in_flight += st.pending;
    st.pending = 0;
    st.waiting = 0;
    st.last_start = Some(now);
    guard.flight = Some(records);
    let total = hits.len();
    (hits, total)
}

/// Gives the verdicts of a flush of `total` hits (`records`) to its clients and waiters; on
/// an error, puts the hits of requests admitted at once back to pending.
fn settle(shared: &Shared, records: Vec<Record>, result: Result<Vec<bool>>, total: usize) {
    let result = match result {
        Ok(v) if v.len() == total => Ok(v),
        Ok(v) => Err(Error::corrupt(
            "ratelimit(write-behind)",
            format!(
                "{} answered {} verdicts for {total} hits",
                shared.inner.name(),
                v.len()
            ),
        )),
        Err(e) => Err(e),
    };
    let ok = result.is_ok();
    super::metrics::counter_flush(ok, total);
    let now = Instant::now();
    let mut st = shared.lock();
    st.flushes += 1;
    if ok {
        st.flushed_hits += total as u64;
        st.failing_since = None;
    } else {
        st.failing_since.get_or_insert(now);
    }
    let State {
        clients,
        dirty,
        pending,
        in_flight,
        by_network,
        ..
    } = &mut *st;
    for r in records {
        *in_flight = in_flight.saturating_sub(r.n as usize);
        add_network(by_network, r.network.as_ref(), -(r.n as isize));
        let Some(c) = clients.get_mut(&r.key) else {
            for (_, tx) in r.waiters {
                let _ = tx.send(Err(lost()));
            }
            continue;
        };
        c.in_flight = c.in_flight.saturating_sub(r.n);
        match &result {
            Ok(verdicts) => {
                c.optimistic = c.optimistic.saturating_sub(r.optimistic);
                let mine = verdicts.get(r.start..r.start + r.n as usize).unwrap_or(&[]);
                for (at, tx) in r.waiters {
                    // A waiter that went away no longer listens; its hit was counted.
                    let _ = tx.send(Ok(mine.get(at as usize).copied().unwrap_or(false)));
                }
                if mine.last() == Some(&false) {
                    c.refused_until = Some(now + shared.timing.refusal_ttl);
                    c.wary_until = Some(now + shared.window);
                } else {
                    c.wary_until = None;
                }
            }
            Err(e) => {
                for (_, tx) in r.waiters {
                    let _ = tx.send(Err(e.clone()));
                }
                // The requests admitted at once were answered: their hits go with the next
                // flush. Those of waiters were not (503): they are not sent again.
                if r.optimistic > 0 {
                    if c.pending == 0 {
                        dirty.push(r.key.clone());
                    }
                    c.pending += r.optimistic;
                    c.pending_optimistic += r.optimistic;
                    *pending += r.optimistic as usize;
                    add_network(by_network, r.network.as_ref(), r.optimistic as isize);
                }
            }
        }
    }
    if now.duration_since(st.last_sweep) >= SWEEP_EVERY {
        st.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::MemoryRateLimiter;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    const WINDOW: Duration = Duration::from_secs(600);

    /// Counts the calls that reach the counters and can be made to fail.
    struct Flaky {
        inner: Arc<dyn RateLimiter>,
        calls: AtomicU32,
        down: AtomicBool,
    }

    impl Flaky {
        fn new(inner: Arc<dyn RateLimiter>) -> Arc<Flaky> {
            Arc::new(Flaky {
                inner,
                calls: AtomicU32::new(0),
                down: AtomicBool::new(false),
            })
        }
    }

    #[async_trait::async_trait]
    impl RateLimiter for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
            let v = self.hit_many(&[Hit::new(key, limit, window)]).await?;
            Ok(v.first().copied().unwrap_or(false))
        }
        async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return Err(Error::unavailable("flaky", "down"));
            }
            self.inner.hit_many(hits).await
        }
    }

    fn behind(counters: Arc<dyn RateLimiter>, limit: u32) -> WriteBehind {
        WriteBehind::new(Arc::clone(&counters), counters, limit, WINDOW)
    }

    /// A temporary fs store's counters (the real thing: shard files under a directory).
    async fn fs_counters() -> (tempfile::TempDir, Arc<dyn RateLimiter>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = kst_fs::FsStore::open(dir.path()).await.expect("fs store");
        (dir, Arc::new(store))
    }

    /// The count of `key` in `counters` (at most `at_most`), read by probing: each probe adds
    /// a hit, and the probe with limit `c + k + 1` after `k` probes answers true exactly when
    /// the count before the probes was at most `c`.
    async fn stored_count(counters: &dyn RateLimiter, key: &str, at_most: u32) -> u32 {
        // Each probe adds one hit: the first probe with limit `c + k + 1` (k probes made
        // before) that answers true says the count before the probes was c.
        for (k, c) in (0..=at_most).enumerate() {
            let k = k as u32;
            if counters.hit(key, c + k + 1, WINDOW).await.unwrap() {
                return c;
            }
        }
        panic!("{key}: count above {at_most}");
    }

    async fn settled(w: &WriteBehind) {
        for _ in 0..200 {
            if w.outstanding() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("hits still outstanding");
    }

    /// The flush's hits arrive in the store: every admitted request counted once, in a few
    /// writes, read back from the fs store's shard files.
    #[tokio::test]
    async fn the_hits_arrive_in_a_real_store_in_few_writes() {
        let (_dir, fs) = fs_counters().await;
        let counters = Flaky::new(Arc::clone(&fs));
        let w = behind(counters.clone(), 1_000);
        for i in 0..200 {
            assert!(w.hit(&format!("web-client:c{}", i % 20)).await.unwrap());
        }
        settled(&w).await;
        let writes = counters.calls.load(Ordering::Relaxed);
        assert!(
            writes <= 3,
            "{writes} writes for 200 requests of 20 clients"
        );
        assert_eq!(w.flushes().1, 200);
        for i in 0..20 {
            assert_eq!(
                stored_count(&*fs, &format!("web-client:c{i}"), 20).await,
                10
            );
        }
    }

    /// A client over the limit is refused within CAP, and stays refused without writes.
    #[tokio::test]
    async fn a_client_over_the_limit_is_refused_within_cap_and_stays_refused() {
        let (_dir, fs) = fs_counters().await;
        let counters = Flaky::new(fs);
        let limit = 100;
        let w = behind(counters.clone(), limit);
        let mut admitted = 0;
        for _ in 0..1_000 {
            if w.hit("c").await.unwrap() {
                admitted += 1;
            }
        }
        assert!(
            (limit..=limit + CAP).contains(&admitted),
            "admitted {admitted} of a limit of {limit}"
        );
        settled(&w).await;
        let writes = counters.calls.load(Ordering::Relaxed);
        for _ in 0..1_000 {
            assert!(!w.hit("c").await.unwrap());
        }
        assert_eq!(w.outstanding(), 0);
        assert_eq!(
            counters.calls.load(Ordering::Relaxed),
            writes,
            "a refused client is refused here without a write"
        );
        assert!(w.hit("other").await.unwrap(), "others are not refused");
    }

    /// Times short enough for tests that wait them out.
    const QUICK: Timing = Timing {
        flush: Duration::from_millis(10),
        min_gap: Duration::from_millis(2),
        refusal_ttl: Duration::from_millis(100),
        // Long enough that a busy machine's pause between two steps of a test does not make
        // the counters stale before the test means them to be.
        stale: Duration::from_millis(1_000),
    };

    /// After the refusal's TTL, a client refused in the window waits for the store's verdict
    /// for every request: it gets nothing more (no CAP per TTL), and its refusal costs one
    /// write per TTL at most.
    #[tokio::test]
    async fn a_refused_client_gets_no_optimism_after_the_ttl() {
        let (_dir, fs) = fs_counters().await;
        let counters = Flaky::new(fs);
        let limit = 40;
        let w = WriteBehind::with_timing(counters.clone(), counters.clone(), limit, WINDOW, QUICK);
        let mut admitted = 0;
        for _ in 0..200 {
            if w.hit("c").await.unwrap() {
                admitted += 1;
            }
        }
        assert!((limit..=limit + CAP).contains(&admitted), "{admitted}");
        settled(&w).await;
        let writes = counters.calls.load(Ordering::Relaxed);
        for round in 0..5 {
            tokio::time::sleep(QUICK.refusal_ttl + Duration::from_millis(5)).await;
            for _ in 0..50 {
                assert!(
                    !w.hit("c").await.unwrap(),
                    "refused after the TTL too ({round})"
                );
            }
        }
        // One write per round (its requests' flush), two if a pause of the machine let the
        // refusal expire within a round.
        let more = counters.calls.load(Ordering::Relaxed) - writes;
        assert!(
            more <= 10,
            "{more} writes for 5 TTLs of a refused client's requests"
        );
    }

    /// A client with many requests in flight at once (many connections) is held to the limit
    /// and CAP; the store sees a handful of writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_flooding_from_many_connections_is_held_to_the_limit() {
        let (_dir, fs) = fs_counters().await;
        let counters = Flaky::new(fs);
        let limit = 500;
        let w = behind(counters.clone(), limit);
        let admitted = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (w, admitted) = (w.clone(), admitted.clone());
                tokio::spawn(async move {
                    for _ in 0..40 {
                        if w.hit("flood").await.unwrap() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let admitted = admitted.load(Ordering::Relaxed);
        assert!(
            (limit..=limit + CAP).contains(&admitted),
            "admitted {admitted} of a limit of {limit}"
        );
        let writes = counters.calls.load(Ordering::Relaxed);
        assert!(writes < 200, "{writes} writes for 2,560 requests");
    }

    /// Two limiters on one store (two `kst serve` of a pool, or two listeners): a client
    /// spread over both gets at most its limit and CAP per limiter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_spread_over_a_pool_is_held_to_the_limit() {
        let (_dir, fs) = fs_counters().await;
        let limit = 300;
        let pool = [behind(fs.clone(), limit), behind(fs.clone(), limit)];
        let admitted = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (w, admitted) = (pool[i % 2].clone(), admitted.clone());
                tokio::spawn(async move {
                    for _ in 0..40 {
                        if w.hit("spread").await.unwrap() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let admitted = admitted.load(Ordering::Relaxed);
        assert!(
            (limit..=limit + 2 * CAP).contains(&admitted),
            "admitted {admitted} of a limit of {limit} over two instances"
        );
        for w in &pool {
            settled(w).await;
        }
        // Every request admitted was counted (and those refused by the store's verdict; those
        // refused here were not).
        let stored = stored_count(&*fs, "spread", 2_000).await;
        assert!(
            (admitted..=32 * 40).contains(&stored),
            "{stored} counted, {admitted} admitted"
        );
    }

    /// The counters going down: requests of clients in good standing are admitted up to CAP
    /// for at most STALE, then wait and get the error; their hits are kept and counted once
    /// the counters are back. Nothing panics.
    #[tokio::test]
    async fn counters_going_down_give_errors_after_stale_and_keep_the_hits() {
        let memory: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::new());
        let counters = Flaky::new(Arc::clone(&memory));
        let w = WriteBehind::with_timing(counters.clone(), counters.clone(), 1_000, WINDOW, QUICK);
        assert!(w.hit("a").await.unwrap());
        settled(&w).await;
        counters.down.store(true, Ordering::Relaxed);
        // Admitted at once up to CAP while the flushes fail (within STALE)...
        for _ in 0..3 {
            assert!(w.hit("a").await.unwrap());
        }
        tokio::time::sleep(QUICK.flush * 3).await;
        for _ in 0..(CAP - 3) {
            assert!(w.hit("a").await.unwrap());
        }
        // ... past CAP a request waits and gets the flush's error.
        assert!(w.hit("a").await.is_err(), "past CAP: the flush's error");
        tokio::time::sleep(QUICK.stale).await;
        assert!(w.hit("b").await.is_err(), "past STALE: everyone waits");
        assert_eq!(w.outstanding(), CAP as usize, "the admitted hits are kept");
        counters.down.store(false, Ordering::Relaxed);
        assert!(w.hit("a").await.unwrap(), "back");
        settled(&w).await;
        assert_eq!(
            stored_count(&*memory, "a", 100).await,
            1 + CAP + 1,
            "every admitted request counted once, those that got the error not"
        );
    }

    /// Clients held are bounded: idle ones are forgotten; while every client held is busy, a
    /// new client is counted exactly (in the second limiter, here the same counters).
    #[tokio::test]
    async fn many_clients_stay_bounded() {
        let counters: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::new());
        let w = behind(counters, 1_000);
        for i in 0..(MAX_CLIENTS + 10) {
            assert!(w.hit(&format!("c{i}")).await.unwrap());
            if i % 4_096 == 4_095 {
                settled(&w).await;
            }
        }
        assert!(w.clients() <= MAX_CLIENTS);
        settled(&w).await;
    }

    /// Red team round 9: requests that go away while they wait leave their hits pending;
    /// while the counters stalled, one client doing so filled [`MAX_OUTSTANDING`] and every
    /// other client was refused. One client's hits outstanding are bounded.
    #[tokio::test]
    async fn one_client_cannot_fill_the_bound_while_the_counters_stall() {
        /// Counters that never answer.
        struct Stalled;
        #[async_trait::async_trait]
        impl RateLimiter for Stalled {
            fn name(&self) -> &'static str {
                "stalled"
            }
            async fn hit(&self, _: &str, _: u32, _: Duration) -> Result<bool> {
                std::future::pending().await
            }
        }
        let counters: Arc<dyn RateLimiter> = Arc::new(Stalled);
        let w = behind(counters, 1_000);
        for i in 0..(MAX_OUTSTANDING_PER_CLIENT + 100) {
            let waiting = tokio::time::timeout(Duration::from_millis(1), w.hit("a")).await;
            match i {
                i if i < CAP => assert!(waiting.unwrap().unwrap(), "admitted at once"),
                // Each waits for the stalled counters, and goes away.
                i if i < MAX_OUTSTANDING_PER_CLIENT => assert!(waiting.is_err(), "{i} waits"),
                i => {
                    let e = waiting.expect("refused at once").unwrap_err();
                    assert!(e.is_temporary(), "{i}: {e}");
                }
            }
        }
        assert_eq!(w.outstanding(), MAX_OUTSTANDING_PER_CLIENT as usize);
        assert!(
            w.hit("b").await.unwrap(),
            "another client is admitted at once"
        );
    }

    /// Red team (counters and shares): a client is an IPv6 /64 and a /56 holds 256 of them;
    /// while the counters stalled, 130 /64s of one /48, each within its own bound (128),
    /// filled [`MAX_OUTSTANDING`] and every other client was refused. The clients of one
    /// network now hold at most [`MAX_OUTSTANDING_PER_NETWORK`] together.
    #[tokio::test]
    async fn many_clients_of_one_network_cannot_fill_the_bound_while_the_counters_stall() {
        /// Counters that never answer.
        struct Stalled;
        #[async_trait::async_trait]
        impl RateLimiter for Stalled {
            fn name(&self) -> &'static str {
                "stalled"
            }
            async fn hit(&self, _: &str, _: u32, _: Duration) -> Result<bool> {
                std::future::pending().await
            }
        }
        let w = behind(Arc::new(Stalled), 1_000);
        let network = "2001:db8:1::/48";
        let (mut admitted, mut refused) = (0, 0);
        for n in 0..130u32 {
            let key = format!("web-client:2001:db8:1:{n:x}::/64");
            for _ in 0..MAX_OUTSTANDING_PER_CLIENT {
                // Each request that waits goes away at once: its hit stays pending.
                let step =
                    super::super::batcher::for_client(&key, Some(network), async { w.step(&key) })
                        .await;
                match step {
                    Step::Answer(Ok(_)) | Step::Wait(_) => admitted += 1,
                    Step::Answer(Err(e)) => {
                        assert!(e.is_temporary(), "{e}");
                        refused += 1;
                    }
                    Step::Exact => panic!("{key} held"),
                }
            }
        }
        assert_eq!(admitted, MAX_OUTSTANDING_PER_NETWORK, "{refused} refused");
        assert_eq!(w.outstanding(), MAX_OUTSTANDING_PER_NETWORK);
        assert!(
            w.hit("web-client:198.51.100.7").await.unwrap(),
            "a client of another network is admitted at once"
        );
    }
}
