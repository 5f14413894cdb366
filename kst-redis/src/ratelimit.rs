//! [`RateLimiter`] on Redis: one counter key per limiter key, incremented and given its expiry
//! in one Lua script, so every instance of a pool shares the count.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
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
        let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut invocation = HIT.prepare_invoke();
        invocation.key(counter_key(self.prefix(), key)).arg(millis);
        let count: u64 = self.run_script(&invocation).await?;
        Ok(count <= u64::from(limit))
    }
}
