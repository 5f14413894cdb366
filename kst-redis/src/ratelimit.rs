//! [`RateLimiter`] on Redis: one counter key per limiter key, incremented and given its expiry
//! in one Lua script, so every instance of a pool shares the count.
//!
//! [`RateLimiter::hit_many`] counts every distinct key once, by its number of hits, in one
//! script ([`HIT_MANY`]) on one server or under Sentinel. On a Cluster a script may only touch
//! keys of one hash slot: the keys are grouped by slot and each group's script runs at once
//! with the others.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use kst_core::ratelimit::{Hit, Tally};
use kst_core::{RateLimiter, Result};
use redis::Script;

use crate::store::RedisStore;

/// Counts one hit. KEYS: the counter. ARGV: window in milliseconds. Returns the count.
/// A counter without an expiry (left by an interrupted writer) gets one on its next hit.
static HIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"#,
    )
});

/// Counts many hits. KEYS: the counters, each once. ARGV: per key, its number of hits and its
/// window in milliseconds. Returns each key's count; as [`HIT`], a counter without an expiry
/// gets one.
static HIT_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local counts = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[2 * i - 1])
  local c = redis.call('INCRBY', key, n)
  if c == n or redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, ARGV[2 * i])
  end
  counts[i] = c
end
return counts
"#,
    )
});

/// [`HIT_MANY`] for counters on a Redis of their own ([`crate::RedisCounters`]): one call per
/// counter that exists already (`INCRBY`), two for a new one (`INCRBY`, `PEXPIRE`), instead of
/// two or three, most of the time. In a Redis that only [`crate::RedisCounters`] writes, every
/// counter gets its expiry in the script that creates it (a script is atomic), so there is
/// rarely one to repair; but a counter found without expiry (left by a migration tool that
/// dropped expiries, an operator's `PERSIST`, a script that failed between its two calls)
/// must not live for ever: once past its limit its client would be refused for good, and
/// `web-miss-global` would refuse every client that missed (red team, counters and shares).
/// So a counter whose hits cross a multiple of 64 is checked (`PTTL`) and given
/// its window when it has none: one check per 64 hits of a counter, and a counter without
/// expiry is repaired within 64 hits. Measured (500 existing counters a call, in-server time):
/// 490 us without any check, 505 us with this one, 734 us for [`HIT_MANY`]; checking every
/// counter past its limit instead (its limit in ARGV) cost 594 us. About two thirds of the
/// time of [`HIT_MANY`] in that Redis's event loop (a write-behind flush counts ~500 counters
/// at 20,000 requests a second).
static HIT_MANY_SOFT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local counts = {}
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[2 * i - 1])
  local c = redis.call('INCRBY', key, n)
  if c == n or (c % 64 < n and redis.call('PTTL', key) < 0) then
    redis.call('PEXPIRE', key, ARGV[2 * i])
  end
  counts[i] = c
end
return counts
"#,
    )
});

/// Takes hits back. KEYS: the counter. ARGV: how many. Never below 0; a counter that is
/// gone (its window ended) is left gone; `DECRBY` keeps the counter's expiry. Returns how
/// many were taken back.
static REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.min(tonumber(ARGV[1]), c)
if n > 0 then
  redis.call('DECRBY', KEYS[1], n)
end
return n
"#,
    )
});

/// The longest window given to Redis, in milliseconds: 2^62 (about 146 million years).
/// `PEXPIRE` refuses a time past 2^63 ms (now included), and the script fails after its
/// `INCRBY`, leaving the counter it created without expiry (red team, counters and shares).
const MAX_WINDOW_MILLIS: u64 = 1 << 62;

/// A window in milliseconds, at least 1, at most [`MAX_WINDOW_MILLIS`].
fn millis(window: Duration) -> u64 {
    u64::try_from(window.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_WINDOW_MILLIS)
}

/// The Redis key of a limiter key: `<prefix>rl:<key>`.
pub(crate) fn counter_key(prefix: &str, key: &str) -> String {
    format!("{prefix}rl:{key}")
}

#[async_trait]
impl RateLimiter for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        let mut invocation = HIT.prepare_invoke();
        invocation
            .key(counter_key(self.prefix(), key))
            .arg(millis(window));
        let count: u64 = self.run_script(&invocation).await?;
        Ok(count <= u64::from(limit))
    }

    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        self.hit_many_with(&HIT_MANY, hits).await
    }

    /// One script per distinct key (any hash slot; refunds are rare: a deferred message's).
    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        for (key, n, _) in Tally::of(hits).keys {
            let mut invocation = REFUND.prepare_invoke();
            invocation.key(counter_key(self.prefix(), key)).arg(n);
            let _: u64 = self.run_script(&invocation).await?;
        }
        Ok(())
    }
}

impl RedisStore {
    /// [`RateLimiter::hit_many`] of the counters on a Redis of their own ([`HIT_MANY_SOFT`]).
    pub(crate) async fn hit_many_soft(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        self.hit_many_with(&HIT_MANY_SOFT, hits).await
    }

    /// [`RateLimiter::hit_many`] with the counting script `script_of` ([`HIT_MANY`] or
    /// [`HIT_MANY_SOFT`]: same keys, arguments and answers).
    async fn hit_many_with(&self, script_of: &'static Script, hits: &[Hit]) -> Result<Vec<bool>> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let tally = Tally::of(hits);
        // Positions in `tally.keys`, one group per script: all of them, or one per slot.
        let groups: Vec<Vec<usize>> = if self.conn.is_cluster() {
            let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
            for (i, k) in tally.keys.iter().enumerate() {
                let slot = crate::conn::slot(counter_key(self.prefix(), k.0).as_bytes());
                by_slot.entry(slot).or_default().push(i);
            }
            by_slot.into_values().collect()
        } else {
            vec![(0..tally.keys.len()).collect()]
        };
        let mut counts = vec![0u64; tally.keys.len()];
        let script = |group: &[usize]| {
            let mut invocation = script_of.prepare_invoke();
            for &i in group {
                let (key, n, window) = tally.keys[i];
                invocation
                    .key(counter_key(self.prefix(), key))
                    .arg(n)
                    .arg(millis(window));
            }
            invocation
        };
        let mut answers = Vec::with_capacity(groups.len());
        if let [group] = groups.as_slice() {
            answers.push((group.clone(), self.run_script(&script(group)).await?));
        } else {
            let mut set = tokio::task::JoinSet::new();
            for group in groups {
                let store = self.clone();
                let invocation = script(&group);
                set.spawn(async move {
                    let got: Result<Vec<u64>> = store.run_script(&invocation).await;
                    (group, got)
                });
            }
            while let Some(joined) = set.join_next().await {
                let (group, got) =
                    joined.map_err(|e| kst_core::Error::unavailable("ratelimit(redis)", e))?;
                answers.push((group, got?));
            }
        }
        for (group, got) in answers {
            if got.len() != group.len() {
                return Err(kst_core::Error::corrupt(
                    "ratelimit(redis)",
                    format!(
                        "the counting script answered {} counts for {} keys",
                        got.len(),
                        group.len()
                    ),
                ));
            }
            for (i, c) in group.into_iter().zip(got) {
                counts[i] = c;
            }
        }
        tally.verdicts(hits, &counts)
    }
}
