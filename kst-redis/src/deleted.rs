//! The publication ids of deleted histories (`P{A}:deleted`, written by the delete script)
//! walked and added to for `kst export` and `kst import` ([`KeyStore::deleted_page`],
//! [`KeyStore::remember_deleted`]).
//!
//! The sets live in their addresses' hash slots, listed nowhere else, so the walk is a `SCAN`
//! of every primary for `P{*}:deleted`, node after node (in the order of their names), one
//! `SCAN` step per page, then the members of the sets it found. `SCAN` hands out every key
//! that exists from the walk's start to its end, some possibly twice; the cursor names the
//! node and its `SCAN` cursor: `redis-deleted:<node>:<cursor>`.
//!
//! [`KeyStore::deleted_page`]: kst_core::KeyStore::deleted_page
//! [`KeyStore::remember_deleted`]: kst_core::KeyStore::remember_deleted

use kst_core::store::{bad_cursor, check_publication_ids, check_walk_limit};
use kst_core::{Address, DeletedPage, DeletedPublications, Error, Result, WalkCursor};

use crate::error::corrupt;
use crate::keys::{address_of_deleted, deleted_pattern};
use crate::store::RedisStore;

/// Prefix of the cursors of the walk.
const CURSOR_PREFIX: &str = "redis-deleted:";

/// Ids added per `SADD`.
const SADD_CHUNK: usize = 1000;

/// The node and the `SCAN` cursor on it a cursor of the walk stands at.
fn parse_cursor(cursor: &WalkCursor) -> Result<(String, u64)> {
    cursor
        .token()
        .strip_prefix(CURSOR_PREFIX)
        .and_then(|t| t.rsplit_once(':'))
        .and_then(|(node, at)| Some((node.to_string(), at.parse().ok()?)))
        .ok_or_else(|| Error::Invalid(bad_cursor(cursor)))
}

impl RedisStore {
    /// One `SCAN` step on one primary and the members of the sets it found.
    pub(crate) async fn deleted_page_inner(
        &self,
        cursor: Option<&WalkCursor>,
        limit: usize,
    ) -> Result<DeletedPage> {
        check_walk_limit(limit)?;
        let mut nodes = self.primaries().await?;
        nodes.sort();
        let (node, at) = match cursor {
            Some(c) => parse_cursor(c)?,
            None => match nodes.first() {
                Some(first) => (first.clone(), 0),
                None => return Ok(DeletedPage::default()),
            },
        };
        let pattern = deleted_pattern(&self.prefix);
        let (next_at, keys) = self.scan_page_counted(&node, at, &pattern, limit).await?;
        let found: Vec<(Address, String)> = keys
            .into_iter()
            .filter_map(|k| address_of_deleted(&self.prefix, &k).map(|a| (a, k)))
            .collect();
        let members = self
            .query_many(
                found
                    .iter()
                    .map(|(_, key)| {
                        let mut c = redis::cmd("SMEMBERS");
                        c.arg(key);
                        c
                    })
                    .collect(),
                false,
            )
            .await?;
        let mut entries = Vec::with_capacity(found.len());
        for ((address, key), value) in found.into_iter().zip(members) {
            let mut publication_ids: Vec<String> = redis::from_redis_value(value)
                .map_err(|e| corrupt(format!("{key} is not a set of publication ids: {e}")))?;
            if publication_ids.is_empty() {
                continue; // removed by hand meanwhile
            }
            publication_ids.sort_unstable();
            entries.push(DeletedPublications {
                address,
                publication_ids,
            });
        }
        let next = if next_at != 0 {
            Some((node, next_at))
        } else {
            nodes
                .into_iter()
                .find(|n| n.as_str() > node.as_str())
                .map(|n| (n, 0))
        };
        Ok(DeletedPage {
            entries,
            next: next.map(|(n, at)| WalkCursor::new(format!("{CURSOR_PREFIX}{n}:{at}"))),
        })
    }

    /// `SADD` of the ids to the address' set, then the `WAIT` of a deletion.
    pub(crate) async fn remember_deleted_inner(
        &self,
        address: &Address,
        publication_ids: &[String],
    ) -> Result<()> {
        check_publication_ids(address, publication_ids)?;
        let key = self.keys(address).deleted;
        for chunk in publication_ids.chunks(SADD_CHUNK) {
            let _: i64 = self
                .query(redis::cmd("SADD").arg(&key).arg(chunk), true)
                .await?;
        }
        self.wait_for_replicas(&key, "remembering deleted publications")
            .await
    }
}
