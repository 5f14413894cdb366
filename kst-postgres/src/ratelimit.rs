//! [`RateLimiter`] on PostgreSQL: one row per limiter key in `kst_rate_limits`, counted with a
//! single upsert so that every instance of a pool shares the count.
//!
//! A hit commits without waiting for its WAL to reach the disk (`synchronous_commit = off` for
//! that transaction only, set by `set_config(..., true)` inside the hit's own statement):
//! counters are soft state, like the fs limiter's, which are never fsynced. A crash of the
//! server can forget the hits of its last moments (at most three times `wal_writer_delay`,
//! 200 ms by default); it never makes a count wrong otherwise. Waiting for a WAL flush per hit
//! made every web request pay a disk write (with the limits at their defaults the web listener
//! answered 5 times fewer look-ups, docs/BENCHMARKS.md).
//!
//! A hit is one statement in its own implicit transaction: one round trip, where `BEGIN`,
//! `SET LOCAL`, the upsert and `COMMIT` were four. [`RateLimiter::hit_many`] is one statement
//! too ([`HIT_MANY`]): every distinct key once, with the number of its hits, in key order (so
//! that concurrent batches lock their rows in one order and never deadlock).

use std::time::Duration;

use async_trait::async_trait;
use kst_core::ratelimit::{Hit, Tally};
use kst_core::{RateLimiter, Result};
use sqlx::Row;

use crate::error::db;
use crate::store::PostgresStore;

/// One hit: insert the counter at 1, or add 1 within the window, or start a new window. The
/// `async_commit` row turns `synchronous_commit` off for this statement's own transaction
/// (`is_local`; PostgreSQL reads the setting when it commits, before it resets it).
pub const HIT: &str = "WITH async_commit AS \
       (SELECT set_config('synchronous_commit', 'off', true)) \
     INSERT INTO kst_rate_limits AS r (key, count, window_end) \
     SELECT $1, 1, now() + make_interval(secs => $2) FROM async_commit \
     ON CONFLICT (key) DO UPDATE SET \
       count = CASE WHEN r.window_end <= now() THEN 1 ELSE r.count + 1 END, \
       window_end = CASE WHEN r.window_end <= now() THEN EXCLUDED.window_end ELSE r.window_end END \
     RETURNING count";

/// Many hits in one statement: `$1` the distinct keys (sorted), `$2` how many hits each
/// takes, `$3` the window of each in seconds. A key is inserted at its hits, or they are added
/// within its window, or it starts a new window at them. Answers each key's count; as
/// [`HIT`], without waiting for the WAL flush.
pub const HIT_MANY: &str = "WITH async_commit AS \
       (SELECT set_config('synchronous_commit', 'off', true)) \
     INSERT INTO kst_rate_limits AS r (key, count, window_end) \
     SELECT h.key, h.n, now() + make_interval(secs => h.secs) \
       FROM async_commit, \
            unnest($1::text[], $2::bigint[], $3::float8[]) WITH ORDINALITY AS h(key, n, secs, i) \
      ORDER BY h.i \
     ON CONFLICT (key) DO UPDATE SET \
       count = CASE WHEN r.window_end <= now() THEN EXCLUDED.count \
                    ELSE r.count + EXCLUDED.count END, \
       window_end = CASE WHEN r.window_end <= now() THEN EXCLUDED.window_end ELSE r.window_end END \
     RETURNING key, count";

/// Takes hits back: `$1` the distinct keys, `$2` how many hits each gives back. Only from a
/// window still open: a counter left above 0 is lowered, one that would reach 0 is deleted
/// (a row's count is above 0; the key's next hit opens a new window at 1). As [`HIT`],
/// without waiting for the WAL flush.
pub const REFUND: &str = "WITH async_commit AS \
       (SELECT set_config('synchronous_commit', 'off', true)), \
     h AS (SELECT key, n FROM unnest($1::text[], $2::bigint[]) AS h(key, n)), \
     gone AS (DELETE FROM kst_rate_limits AS r USING h, async_commit \
       WHERE r.key = h.key AND r.window_end > now() AND r.count <= h.n RETURNING r.key) \
     UPDATE kst_rate_limits AS r SET count = r.count - h.n FROM h, async_commit \
      WHERE r.key = h.key AND r.window_end > now() AND r.count > h.n";

/// Deletes a bounded batch of counters whose window has ended.
const SWEEP: &str = "DELETE FROM kst_rate_limits WHERE key IN \
     (SELECT key FROM kst_rate_limits WHERE window_end < now() LIMIT 1000 \
      FOR UPDATE SKIP LOCKED)";

/// One hit in this many also sweeps ended windows (on average).
const SWEEP_ONE_IN: u32 = 256;

/// The window of a hit in seconds, as the statements take it.
fn window_secs(window: Duration) -> f64 {
    window.as_secs_f64().max(0.001)
}

impl PostgresStore {
    /// Sweeps ended windows after one call in [`SWEEP_ONE_IN`] (on average).
    async fn maybe_sweep(&self) {
        if rand::random_ratio(1, SWEEP_ONE_IN)
            && let Err(e) = self.sweep_rate_limits().await
        {
            tracing::warn!(error = %e, "could not sweep ended rate-limit windows");
        }
    }

    /// Deletes up to 1,000 counters whose window has ended; returns how many. Instances call it
    /// on their own now and then (within the timeout of the hit that does); operators may call
    /// it from a timer, bounded by `TimeoutStore::run`.
    pub async fn sweep_rate_limits(&self) -> Result<u64> {
        self.write(false, |conn| {
            Box::pin(async move {
                let done = sqlx::query(SWEEP).execute(&mut *conn).await.map_err(db)?;
                Ok(done.rows_affected())
            })
        })
        .await
    }
}

#[async_trait]
impl RateLimiter for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        let secs = window_secs(window);
        let key = key.to_string();
        // Not confirmed through a standby: a counter lost in a failover costs nothing.
        let count: i64 = self
            .write(false, |conn| {
                Box::pin(async move {
                    let row = sqlx::query(HIT)
                        .bind(key)
                        .bind(secs)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db)?;
                    row.try_get(0).map_err(db)
                })
            })
            .await?;
        self.maybe_sweep().await;
        Ok(count <= i64::from(limit))
    }

    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let tally = Tally::of(hits);
        let keys: Vec<String> = tally.keys.iter().map(|k| k.0.to_string()).collect();
        let ns: Vec<i64> = tally.keys.iter().map(|k| i64::from(k.1)).collect();
        let secs: Vec<f64> = tally.keys.iter().map(|k| window_secs(k.2)).collect();
        let rows: Vec<(String, i64)> = self
            .write(false, |conn| {
                Box::pin(async move {
                    let rows = sqlx::query(HIT_MANY)
                        .bind(keys)
                        .bind(ns)
                        .bind(secs)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(db)?;
                    rows.iter()
                        .map(|r| Ok((r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?)))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .await?;
        let mut counts = vec![None; tally.keys.len()];
        for (key, count) in rows {
            if let Ok(i) = tally.keys.binary_search_by(|k| k.0.cmp(key.as_str())) {
                counts[i] = Some(u64::try_from(count).unwrap_or(0));
            }
        }
        let counts: Vec<u64> = counts.into_iter().collect::<Option<_>>().ok_or_else(|| {
            kst_core::Error::corrupt(
                "ratelimit(postgres)",
                "the counters' upsert did not answer a count for every key",
            )
        })?;
        self.maybe_sweep().await;
        tally.verdicts(hits, &counts)
    }

    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        if hits.is_empty() {
            return Ok(());
        }
        let tally = Tally::of(hits);
        let keys: Vec<String> = tally.keys.iter().map(|k| k.0.to_string()).collect();
        let ns: Vec<i64> = tally.keys.iter().map(|k| i64::from(k.1)).collect();
        self.write(false, |conn| {
            Box::pin(async move {
                sqlx::query(REFUND)
                    .bind(keys)
                    .bind(ns)
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
        .await
    }
}
