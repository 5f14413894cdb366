//! Rate limits of the web listener: requests and misses per client, misses of everyone.
//!
//! Counters go through [`kst_core::RateLimiter`] (the store's, or the Redis of their own that
//! `[web.counters]` names: either way a pool shares them; the
//! hits of concurrent requests together, [`super::coalesce`]) under keys that start with
//! `web-`, which no mail-side key does (those start with a [`kst_core::LimitKind`] token). The limiter only counts hits, so a client whose misses ran
//! out is remembered here until its window ends; every instance learns it on that client's
//! next miss. When everyone's misses are spent, only clients that missed themselves in the
//! window (as this process saw) are refused: strangers' misses never stop a client that only
//! asks for keys that exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kst_core::RateLimiter;
use kst_core::ratelimit::Hit;

use super::coalesce::{Coalescer, Room};
use super::writebehind::{self, WriteBehind};

use super::config::WebLimits;

/// Key prefix of the per-client request counter.
pub const CLIENT_PREFIX: &str = "web-client:";
/// Key prefix of the per-client miss counter.
pub const MISS_PREFIX: &str = "web-miss:";
/// Key of the global miss counter.
pub const GLOBAL_MISS_KEY: &str = "web-miss-global";

/// Most clients remembered as blocked; beyond it expired entries are swept, then the oldest
/// half is forgotten (they are still counted by the shared limiter).
const MAX_BLOCKED: usize = 100_000;

/// A response extension: a look-up answered 200 that found nothing (the key directory's
/// absence proof for an unknown address, or a deletion entry as the address's newest
/// version). The guard counts it as a miss, like a 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundNothing;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client sent too many requests.
    Requests,
    /// The client's look-ups found nothing too often.
    Misses,
    /// All clients together found nothing too often, and this client missed too.
    GlobalMisses,
}

impl Refusal {
    /// Stable token for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Requests => "client-requests",
            Refusal::Misses => "client-misses",
            Refusal::GlobalMisses => "global-misses",
        }
    }
}

/// An admitted request: for a look-up whose misses are counted, the room held in the
/// coalescer's queue for its miss ([`super::coalesce::Room`], in a [`MissRoom`]), given back
/// when this is dropped (the request ended without a miss) or used by [`Limiter::miss`].
#[derive(Debug)]
#[must_use = "a look-up's miss is counted with it"]
pub struct Admitted {
    room: Option<MissRoom>,
}

impl Admitted {
    /// The room held for this look-up's miss, for the handler ([`MissRoom`]); `None` when the
    /// request is no look-up or no miss is counted.
    pub fn miss_room(&self) -> Option<MissRoom> {
        self.room.clone()
    }
}

/// The room an admitted look-up holds for its miss ([`Admitted`]), shared with its handler as
/// a request extension. A handler that waits for something else before it looks up (a turn
/// for an expensive request, up to seconds) gives the room back while it waits
/// ([`MissRoom::give_back`]) and holds it again before it looks up ([`MissRoom::hold_again`],
/// refused as busy like admission): the room bounds the counters' queue for everyone, and
/// requests waiting seconds for a turn each held it (red team round 7: a few clients queueing
/// expensive key directory requests filled it, and every look-up of the listener, WKD, VKS and
/// HKP, was answered 503). A handler must not look up between the two: a miss found without
/// the room is counted only if the queue has room for it.
#[derive(Debug, Clone)]
pub struct MissRoom(Arc<Mutex<RoomSlot>>);

#[derive(Debug)]
struct RoomSlot {
    room: Option<Room>,
    hits: usize,
    counters: Coalescer,
}

impl MissRoom {
    fn new(room: Room, counters: &Coalescer) -> MissRoom {
        MissRoom(Arc::new(Mutex::new(RoomSlot {
            hits: room.hits(),
            room: Some(room),
            counters: counters.clone(),
        })))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, RoomSlot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the room back to the counters' queue until [`MissRoom::hold_again`].
    pub fn give_back(&self) {
        let room = self.slot().room.take();
        drop(room);
    }

    /// Holds the room again (nothing to do if it is held). `Err` (temporary, counted in
    /// `kst_web_counters_busy_total`) when the queue has no room now: the request must then be
    /// answered without a look-up (503).
    pub fn hold_again(&self) -> kst_core::Result<()> {
        let mut slot = self.slot();
        if slot.room.is_none() {
            let room = slot.counters.reserve(slot.hits)?;
            slot.room = Some(room);
        }
        Ok(())
    }

    /// Whether the room is held now.
    pub fn is_held(&self) -> bool {
        self.slot().room.is_some()
    }

    fn take(&self) -> Option<Room> {
        self.slot().room.take()
    }
}

/// The limits, the shared counters and what this process knows to be blocked.
#[derive(Clone)]
pub struct Limiter {
    limits: WebLimits,
    counters: Coalescer,
    blocked: Arc<Mutex<Blocked>>,
    /// The per-client request counter, written behind the requests (`None`: counted
    /// exactly, one request at a time, a limit below [`super::writebehind::EXACT_BELOW`] or
    /// none).
    requests: Option<WriteBehind>,
}

#[derive(Default)]
struct Blocked {
    clients: HashMap<String, Instant>,
    /// Clients with a miss in the window: until when.
    missed: HashMap<String, Instant>,
    global_until: Option<Instant>,
}

/// Remembers `client` until `until` in `map`, bounded by [`MAX_BLOCKED`].
fn remember(map: &mut HashMap<String, Instant>, client: &str, now: Instant, until: Instant) {
    if map.len() >= MAX_BLOCKED && !map.contains_key(client) {
        map.retain(|_, t| *t > now);
        if map.len() >= MAX_BLOCKED {
            map.clear();
        }
    }
    map.insert(client.to_string(), until);
}

impl Limiter {
    /// Limits counted in `counters`, the hits of concurrent requests together (see
    /// [`super::coalesce`]).
    pub fn new(limits: WebLimits, counters: Arc<dyn RateLimiter>) -> Self {
        let coalescer = Coalescer::new(Arc::clone(&counters));
        let requests = (limits.per_client >= writebehind::EXACT_BELOW).then(|| {
            WriteBehind::new(
                counters,
                Arc::new(coalescer.clone()),
                limits.per_client,
                limits.window(),
            )
        });
        Limiter {
            limits,
            counters: coalescer,
            blocked: Arc::default(),
            requests,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> &WebLimits {
        &self.limits
    }

    /// Seconds a refused client should wait (the window: the counters cannot say how much of
    /// it is left, so this is the upper bound).
    pub fn retry_after(&self) -> u64 {
        self.limits.window().as_secs()
    }

    /// Counts one request of `client`; `lookup` says whether it asks for a key (policy files
    /// are not subject to the miss budgets). `Err` when the counters cannot be reached, or
    /// when the coalescer's queue has no room for the request's hits or for a look-up's miss
    /// (held from here until the request ends, so that its miss, if it is one, is always
    /// counted: [`super::coalesce`]). The request counter is written behind the requests,
    /// every client's hits together in one write at most every [`writebehind::FLUSH`] (a
    /// bounded inaccuracy, see [`super::writebehind`]); misses are counted one by one.
    pub async fn admit(
        &self,
        client: &str,
        lookup: bool,
    ) -> kst_core::Result<Result<Admitted, Refusal>> {
        if lookup {
            let now = Instant::now();
            let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if b.global_until.is_some_and(|t| t > now)
                && b.missed.get(client).is_some_and(|t| *t > now)
            {
                return Ok(Err(Refusal::GlobalMisses));
            }
            match b.clients.get(client) {
                Some(t) if *t > now => return Ok(Err(Refusal::Misses)),
                Some(_) => {
                    b.clients.remove(client);
                }
                None => {}
            }
        }
        let misses = usize::from(self.limits.per_client_misses > 0)
            + usize::from(self.limits.global_misses > 0);
        let room = if lookup && misses > 0 {
            Some(MissRoom::new(
                self.counters.reserve(misses)?,
                &self.counters,
            ))
        } else {
            None
        };
        if self.limits.per_client > 0 {
            let key = format!("{CLIENT_PREFIX}{client}");
            let within = match &self.requests {
                Some(requests) => requests.hit(&key).await?,
                None => {
                    self.counters
                        .hit(&key, self.limits.per_client, self.limits.window())
                        .await?
                }
            };
            if !within {
                return Ok(Err(Refusal::Requests));
            }
        }
        Ok(Ok(Admitted { room }))
    }

    /// The counter hits of one miss of `client`: its own and the global one, as configured.
    fn miss_hits(&self, client: &str) -> Vec<Hit> {
        let window = self.limits.window();
        let mut hits = Vec::with_capacity(2);
        if self.limits.per_client_misses > 0 {
            hits.push(Hit::new(
                format!("{MISS_PREFIX}{client}"),
                self.limits.per_client_misses,
                window,
            ));
        }
        if self.limits.global_misses > 0 {
            hits.push(Hit::new(GLOBAL_MISS_KEY, self.limits.global_misses, window));
        }
        hits
    }

    /// Counts a look-up of `client` that found nothing, admitted as `admitted`: in the room
    /// held for it, so never refused because the coalescer's queue is full (an error of the
    /// counters themselves still reaches the caller). Later look-ups are refused once the
    /// client's budget is spent, or everyone's and the client has missed in the window. The
    /// client's and the global miss counter are counted in one call (with other requests'
    /// hits, see [`super::coalesce`]).
    pub async fn miss(&self, client: &str, admitted: Admitted) -> kst_core::Result<()> {
        let window = self.limits.window();
        if self.limits.global_misses > 0 {
            let now = Instant::now();
            let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            remember(&mut b.missed, client, now, now + window);
        }
        let hits = self.miss_hits(client);
        if hits.is_empty() {
            return Ok(());
        }
        let verdicts = match admitted.room.as_ref().and_then(MissRoom::take) {
            Some(room) => self.counters.hit_many_in(room, &hits).await?,
            // Not admitted as a look-up (or its room given back and not held again: its
            // handler did not look up): counted if it fits.
            None => self.counters.hit_many(&hits).await?,
        };
        for (hit, within) in hits.iter().zip(verdicts) {
            if within {
                continue;
            }
            let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if hit.key == GLOBAL_MISS_KEY {
                b.global_until = Some(now + window);
            } else {
                remember(&mut b.clients, client, now, now + window);
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .field("counters", &self.counters.name())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::{LimitKind, MemoryRateLimiter};

    fn limiter(limits: WebLimits) -> Limiter {
        Limiter::new(limits, Arc::new(MemoryRateLimiter::new()))
    }

    #[test]
    fn web_keys_never_collide_with_mail_keys() {
        for kind in [
            LimitKind::Account,
            LimitKind::Sender,
            LimitKind::SenderQuery,
            LimitKind::SourceIp,
        ] {
            let mail = kst_core::ratelimit::limiter_key(kind, "");
            for web in [CLIENT_PREFIX, MISS_PREFIX, GLOBAL_MISS_KEY] {
                assert!(
                    !web.starts_with(&mail) && !mail.starts_with(web),
                    "{web} vs {mail}"
                );
            }
        }
    }

    #[tokio::test]
    async fn requests_per_client() {
        let l = limiter(WebLimits {
            per_client: 2,
            ..WebLimits::OFF
        });
        assert_eq!(l.admit("a", true).await.unwrap().err(), None);
        assert_eq!(l.admit("a", false).await.unwrap().err(), None);
        assert_eq!(
            l.admit("a", true).await.unwrap().err(),
            Some(Refusal::Requests)
        );
        assert_eq!(l.admit("b", true).await.unwrap().err(), None);
    }

    #[tokio::test]
    async fn misses_block_lookups_of_that_client_only() {
        let l = limiter(WebLimits {
            per_client_misses: 2,
            ..WebLimits::OFF
        });
        for _ in 0..2 {
            let admitted = l.admit("a", true).await.unwrap().unwrap();
            l.miss("a", admitted).await.unwrap();
        }
        let admitted = l.admit("a", true).await.unwrap();
        l.miss("a", admitted.expect("two misses are allowed"))
            .await
            .unwrap();
        assert_eq!(
            l.admit("a", true).await.unwrap().err(),
            Some(Refusal::Misses)
        );
        assert_eq!(
            l.admit("a", false).await.unwrap().err(),
            None,
            "policy files still served"
        );
        assert_eq!(l.admit("b", true).await.unwrap().err(), None);
    }

    #[tokio::test]
    async fn global_miss_budget_blocks_only_clients_that_missed() {
        let l = limiter(WebLimits {
            global_misses: 3,
            ..WebLimits::OFF
        });
        for c in ["a", "b", "c", "d"] {
            let admitted = l.admit(c, true).await.unwrap().unwrap();
            l.miss(c, admitted).await.unwrap();
        }
        for c in ["a", "d"] {
            assert_eq!(
                l.admit(c, true).await.unwrap().err(),
                Some(Refusal::GlobalMisses),
                "{c} missed"
            );
            assert_eq!(l.admit(c, false).await.unwrap().err(), None, "policy files");
        }
        let admitted = l.admit("e", true).await.unwrap();
        l.miss("e", admitted.expect("e never missed"))
            .await
            .unwrap();
        assert_eq!(
            l.admit("e", true).await.unwrap().err(),
            Some(Refusal::GlobalMisses),
            "e's first miss after the budget was its last"
        );
    }

    /// Red team (round 7): a handler that waits for a turn gives its look-up's room back and
    /// holds it again before it looks up; refused when others took the room meanwhile; a miss
    /// is counted in the room held again.
    #[tokio::test]
    async fn a_miss_room_given_back_while_waiting_is_held_again_or_refused() {
        let counters = Arc::new(MemoryRateLimiter::new());
        let l = Limiter::new(
            WebLimits {
                per_client_misses: 5,
                global_misses: 1_000,
                ..WebLimits::OFF
            },
            counters.clone(),
        );
        let admitted = l.admit("a", true).await.unwrap().unwrap();
        let room = admitted
            .miss_room()
            .expect("a look-up holds room for its miss");
        assert!(room.is_held());
        assert_eq!(l.counters.reserved_hits(), 2);
        room.give_back();
        assert!(!room.is_held());
        assert_eq!(l.counters.reserved_hits(), 0, "given back while it waits");
        // Others fill the bound meanwhile (512 look-ups' rooms of 2 hits).
        let mut others = Vec::new();
        for i in 0..(super::super::coalesce::MAX_QUEUED_HITS / 2) {
            others.push(l.admit(&format!("c{i}"), true).await.unwrap().unwrap());
        }
        assert!(l.admit("late", true).await.is_err(), "the bound is full");
        assert!(
            room.hold_again().is_err(),
            "no room to hold again: answered 503"
        );
        drop(others.pop());
        room.hold_again().expect("room again");
        room.hold_again().expect("held already");
        assert_eq!(
            l.counters.reserved_hits(),
            super::super::coalesce::MAX_QUEUED_HITS
        );
        // The miss is counted in it, though the bound is full.
        l.miss("a", admitted).await.unwrap();
        assert_eq!(
            l.counters.reserved_hits(),
            super::super::coalesce::MAX_QUEUED_HITS - 2
        );
        drop(others);
        assert_eq!(l.counters.reserved_hits(), 0);
        assert!(!counters.is_empty(), "the miss was counted");
        assert!(
            l.admit("a", false)
                .await
                .unwrap()
                .unwrap()
                .miss_room()
                .is_none(),
            "no room for a request that is no look-up"
        );
    }

    /// Red team (counters and shares): `window_secs = u64::MAX` (an operator's "forever")
    /// made every miss panic (the window added to the clock); the window is capped
    /// (`WebLimits::window`), so misses are counted and refused as with any window.
    #[tokio::test]
    async fn a_window_too_long_for_the_clock_does_not_panic() {
        let l = limiter(WebLimits {
            per_client: 100,
            per_client_misses: 1,
            global_misses: 1_000,
            window_secs: u64::MAX,
        });
        for _ in 0..2 {
            let admitted = l.admit("a", true).await.unwrap().unwrap();
            l.miss("a", admitted).await.unwrap();
        }
        assert_eq!(
            l.admit("a", true).await.unwrap().err(),
            Some(Refusal::Misses)
        );
        assert_eq!(l.admit("b", true).await.unwrap().err(), None);
    }

    #[tokio::test]
    async fn off_counts_nothing() {
        let counters = Arc::new(MemoryRateLimiter::new());
        let l = Limiter::new(WebLimits::OFF, counters.clone());
        for _ in 0..100 {
            let admitted = l.admit("a", true).await.unwrap().unwrap();
            l.miss("a", admitted).await.unwrap();
        }
        assert!(counters.is_empty());
    }
}
