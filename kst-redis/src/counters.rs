//! [`RedisCounters`]: rate-limit counters on a Redis of their own, which holds only soft state.
//!
//! The key store's Redis must run `appendonly yes` and `appendfsync always` (the durability
//! guard): it fsyncs its log in its event loop after every write, before it answers anyone,
//! so every counter write holds back the look-ups queued behind it. Counters need none of
//! that: losing them resets the windows. `RedisCounters` counts on a server of their own
//! (one server, Sentinel or a Cluster, like the store) with no durability guard; a server with
//! `appendonly no` and `save ""` is the recommended set-up. It is a [`RateLimiter`] and nothing
//! else, so it cannot be used as a key store by mistake.

use std::time::Duration;

use async_trait::async_trait;
use kst_core::ratelimit::Hit;
use kst_core::timeout::within;
use kst_core::{Component, Error, KeyStore, RateLimiter, Result};

use crate::store::RedisStore;

/// The component named in this type's errors.
pub const COUNTERS_COMPONENT: Component = Component::rate_limiter("redis-counters");

/// Rate-limit counters on a Redis that holds only soft state (see the module documentation).
/// Built by [`crate::RedisStoreBuilder::counters_lazy`]; cheap to clone.
#[derive(Clone)]
pub struct RedisCounters {
    inner: RedisStore,
    timeout: Duration,
}

impl std::fmt::Debug for RedisCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCounters")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `e` as an error of the counters (the store's code names itself `store(redis)`).
fn relabel(e: Error) -> Error {
    match e {
        Error::Unavailable { message, .. } => Error::unavailable(COUNTERS_COMPONENT, message),
        Error::Corrupt { message, .. } => Error::corrupt(COUNTERS_COMPONENT, message),
        Error::Config(message) => {
            Error::Config(message.replacen("store(redis)", &COUNTERS_COMPONENT.to_string(), 1))
        }
        other => other,
    }
}

impl RedisCounters {
    pub(crate) fn new(inner: RedisStore, timeout: Duration) -> RedisCounters {
        RedisCounters { inner, timeout }
    }

    /// The key prefix of the counters (each counter is `<prefix>rl:<limiter key>`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether the server answers and is a primary (no durability guard: the counters are
    /// soft state). A temporary error when it cannot be reached.
    pub async fn check(&self) -> Result<()> {
        within(
            COUNTERS_COMPONENT,
            "check",
            self.timeout,
            self.inner.check(),
        )
        .await
        .map_err(relabel)
    }

    /// The deployment's facts, as [`KeyStore::topology`] gives them for the store.
    pub async fn topology(&self) -> Result<Vec<(String, String)>> {
        within(
            COUNTERS_COMPONENT,
            "topology",
            self.timeout,
            self.inner.topology(),
        )
        .await
        .map_err(relabel)
    }
}

#[async_trait]
impl RateLimiter for RedisCounters {
    fn name(&self) -> &'static str {
        "redis-counters"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        within(
            COUNTERS_COMPONENT,
            "rate limit",
            self.timeout,
            self.inner.hit(key, limit, window),
        )
        .await
        .map_err(relabel)
    }

    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        within(
            COUNTERS_COMPONENT,
            "rate limit",
            self.timeout,
            self.inner.hit_many_soft(hits),
        )
        .await
        .map_err(relabel)
    }

    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        within(
            COUNTERS_COMPONENT,
            "rate limit",
            self.timeout,
            self.inner.refund(hits),
        )
        .await
        .map_err(relabel)
    }
}
