//! Rate limits against backscatter and address enumeration.
//!
//! Every request that would get a reply first takes one unit from each counter that applies to
//! it (see [`RateLimits`]): its envelope sender, the sender's domain, the source IP of the
//! topmost trusted `Received:` header and, for a retrieval, the queried address. A request over
//! any limit is accepted and left unanswered (see [`crate::service::Silence::RateLimited`]).
//!
//! Counters live behind the [`RateLimiter`] trait so that every instance of a pool shares them:
//! [`MemoryRateLimiter`] here (one process), and the Redis and PostgreSQL stores implement the
//! trait too. Counting uses fixed windows: the first hit of a key opens a window of the given
//! length, the window's count grows with each hit, and the key starts again at 1 once the
//! window has passed. A limiter that cannot be reached is a temporary error: the MTA keeps the
//! message and retries, so an outage never loses mail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shared hit counters with fixed windows.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Short name for logs, e.g. `"memory"`, `"redis"`.
    fn name(&self) -> &'static str;

    /// Counts one hit of `key` and says whether it is within `limit` hits per `window`:
    /// `Ok(true)` while the window's count (this hit included) is at most `limit`.
    /// Instances sharing a backend share the count. An unreachable backend is a temporary
    /// [`Error`].
    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool>;
}

/// Which counter a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The envelope sender (the reply's recipient).
    Sender,
    /// The envelope sender's domain.
    SenderDomain,
    /// The client IP in the topmost trusted `Received:` header.
    SourceIp,
    /// The address a retrieval asks for.
    QueriedAddress,
}

impl LimitKind {
    /// Stable token for logs, metrics and limiter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Sender => "sender",
            LimitKind::SenderDomain => "sender-domain",
            LimitKind::SourceIp => "source-ip",
            LimitKind::QueriedAddress => "queried-address",
        }
    }
}

/// How many requests each counter allows per window. 0 turns a counter off.
///
/// The defaults (per hour: 60 per sender, 2,000 per sender domain, 1,000 per source IP, 120
/// per queried address) are far above what a person's mail client needs (one retrieval per new
/// correspondent, one publication per key change) and bound what one mailbox, one domain or one
/// host can make kst send, and how fast anyone can walk the provider's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Requests per window from one envelope sender.
    pub per_sender: u32,
    /// Requests per window from one sender domain. Served domains are exempt (their users are
    /// counted per sender and per IP).
    pub per_sender_domain: u32,
    /// Requests per window from one source IP (topmost trusted `Received:` header).
    pub per_source_ip: u32,
    /// Retrievals per window asking for one address.
    pub per_queried_address: u32,
    /// Window length in seconds.
    pub window_secs: u64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_sender: 60,
            per_sender_domain: 2_000,
            per_source_ip: 1_000,
            per_queried_address: 120,
            window_secs: 3_600,
        }
    }
}

impl RateLimits {
    /// Every counter off.
    pub const OFF: RateLimits = RateLimits {
        per_sender: 0,
        per_sender_domain: 0,
        per_source_ip: 0,
        per_queried_address: 0,
        window_secs: 3_600,
    };

    /// The limit of `kind` (0: off).
    pub fn limit(&self, kind: LimitKind) -> u32 {
        match kind {
            LimitKind::Sender => self.per_sender,
            LimitKind::SenderDomain => self.per_sender_domain,
            LimitKind::SourceIp => self.per_source_ip,
            LimitKind::QueriedAddress => self.per_queried_address,
        }
    }

    /// The window as a [`Duration`] (at least one second).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs.max(1))
    }
}

/// The limiter key of `value` under `kind`, e.g. `sender:bob@acme.net`.
pub fn limiter_key(kind: LimitKind, value: &str) -> String {
    format!("{}:{value}", kind.as_str())
}

/// Counts `hits` against `limits` in `limiter`, in order, stopping at the first counter that is
/// over its limit and returning its kind. Counters that are off are skipped.
pub async fn check(
    limiter: &dyn RateLimiter,
    limits: &RateLimits,
    hits: &[(LimitKind, &str)],
) -> Result<Option<LimitKind>> {
    for (kind, value) in hits {
        let limit = limits.limit(*kind);
        if limit == 0 {
            continue;
        }
        if !limiter
            .hit(&limiter_key(*kind, value), limit, limits.window())
            .await?
        {
            return Ok(Some(*kind));
        }
    }
    Ok(None)
}

/// Most keys a [`MemoryRateLimiter`] holds before it sweeps out expired windows.
const SWEEP_AT: usize = 10_000;

/// A [`RateLimiter`] in this process's memory: right for one long-running process (`kst serve`
/// on one host). Separate processes (`kst deliver` per message) do not share it.
#[derive(Debug, Default)]
pub struct MemoryRateLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl MemoryRateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live keys (for tests and metrics).
    pub fn len(&self) -> usize {
        self.windows.lock().map_or(0, |w| w.len())
    }

    /// True when no key is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| Error::unavailable("ratelimit(memory)", "lock poisoned"))?;
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (end, _)| *end > now);
        }
        let entry = windows.entry(key.to_string()).or_insert((now + window, 0));
        if entry.0 <= now {
            *entry = (now + window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        Ok(entry.1 <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_limiter_counts_per_key_and_window() {
        let l = MemoryRateLimiter::new();
        let w = Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.hit("a", 3, w).await.unwrap());
        }
        assert!(!l.hit("a", 3, w).await.unwrap());
        assert!(!l.hit("a", 3, w).await.unwrap());
        assert!(l.hit("b", 3, w).await.unwrap(), "keys are independent");
        assert_eq!(l.len(), 2);
    }

    #[tokio::test]
    async fn memory_limiter_starts_again_after_the_window() {
        let l = MemoryRateLimiter::new();
        assert!(l.hit("a", 1, Duration::ZERO).await.unwrap());
        // A zero-length window has always passed: every hit opens a fresh one.
        assert!(l.hit("a", 1, Duration::ZERO).await.unwrap());
    }

    #[tokio::test]
    async fn check_stops_at_the_first_exhausted_counter_and_skips_off_ones() {
        let l = MemoryRateLimiter::new();
        let limits = RateLimits {
            per_sender: 2,
            per_sender_domain: 0,
            per_source_ip: 5,
            per_queried_address: 1,
            window_secs: 60,
        };
        let hits = [
            (LimitKind::Sender, "bob@acme.net"),
            (LimitKind::SenderDomain, "acme.net"),
            (LimitKind::SourceIp, "192.0.2.1"),
        ];
        assert_eq!(check(&l, &limits, &hits).await.unwrap(), None);
        assert_eq!(check(&l, &limits, &hits).await.unwrap(), None);
        assert_eq!(
            check(&l, &limits, &hits).await.unwrap(),
            Some(LimitKind::Sender)
        );
        // The domain counter is off: never counted.
        assert!(
            l.windows
                .lock()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("sender-domain:"))
        );
        // The IP was counted only while the sender was within its limit.
        assert_eq!(l.windows.lock().unwrap()["source-ip:192.0.2.1"].1, 2);
        let q = [(LimitKind::QueriedAddress, "alice@example.net")];
        assert_eq!(check(&l, &limits, &q).await.unwrap(), None);
        assert_eq!(
            check(&l, &limits, &q).await.unwrap(),
            Some(LimitKind::QueriedAddress)
        );
    }

    #[tokio::test]
    async fn memory_limiter_sweeps_expired_windows() {
        let l = MemoryRateLimiter::new();
        for i in 0..SWEEP_AT {
            l.hit(&format!("k{i}"), 1, Duration::ZERO).await.unwrap();
        }
        l.hit("last", 1, Duration::from_secs(60)).await.unwrap();
        assert_eq!(l.len(), 1);
    }
}
