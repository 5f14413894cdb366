//! What lives outside an address' hash slot: the address listing (`list`) and the look-up
//! index by fingerprint, key ID and WKD hash, written around the record scripts in the order
//! the crate documentation ("Write order") gives, and rebuilt by `rebuild_index`.

use kst_core::key_index::IndexEntries;
use kst_core::{Address, KeyRecord, Result, WalkCursor, WalkPage};
use redis::Value;

use crate::error::corrupt;
use crate::keys::{
    ADDRESS_BUCKETS, address_of_current, addresses_key, bucket_key, current_pattern, index_keys,
    legacy_index_key,
};
use crate::store::RedisStore;

/// Prefix of this store's walk cursors: `redis:<bucket, hex>:<last address handed out of it>`.
const CURSOR_PREFIX: &str = "redis:";

/// The bucket and the address in it a cursor of this store stands after (`None`: the bucket's
/// start).
fn parse_cursor(cursor: &WalkCursor) -> Result<(u16, Option<String>)> {
    let bad = || kst_core::Error::Invalid(kst_core::store::bad_cursor(cursor));
    let (bucket, after) = cursor
        .token()
        .strip_prefix(CURSOR_PREFIX)
        .and_then(|t| t.split_once(':'))
        .ok_or_else(bad)?;
    let bucket = u16::from_str_radix(bucket, 16)
        .ok()
        .filter(|b| *b < ADDRESS_BUCKETS)
        .ok_or_else(bad)?;
    if after.is_empty() {
        return Ok((bucket, None));
    }
    let after = Address::from_normalized(after).map_err(|_| bad())?;
    Ok((bucket, Some(after.as_str().to_string())))
}

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: u64 = 1000;

impl RedisStore {
    /// Adds `record`'s address to the listing and to every index set of its entries.
    /// Idempotent; written before the record itself.
    pub(crate) async fn add_index(&self, record: &KeyRecord) -> Result<()> {
        let address = record.address.as_str();
        let mut cmds = Vec::new();
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(addresses_key(&self.prefix, &record.address))
            .arg(0)
            .arg(address);
        cmds.push(zadd);
        for key in index_keys(&self.prefix, &IndexEntries::of(record)) {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(key).arg(address);
            cmds.push(sadd);
        }
        self.query_many(cmds, true).await.map(drop)
    }

    /// Removes `previous`'s address from the index sets of its entries that `current` (the
    /// record that replaced it, `None` after a deletion) does not have, and after a deletion
    /// from the listing. Written after the record.
    pub(crate) async fn remove_stale_index(
        &self,
        previous: &KeyRecord,
        current: Option<&KeyRecord>,
    ) -> Result<()> {
        let address = previous.address.as_str();
        let keep = current
            .map(|c| index_keys(&self.prefix, &IndexEntries::of(c)))
            .unwrap_or_default();
        let mut cmds = Vec::new();
        for key in index_keys(&self.prefix, &IndexEntries::of(previous)) {
            if !keep.contains(&key) {
                let mut srem = redis::cmd("SREM");
                srem.arg(key).arg(address);
                cmds.push(srem);
            }
        }
        if current.is_none() {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(addresses_key(&self.prefix, &previous.address))
                .arg(address);
            cmds.push(zrem);
        }
        self.query_many(cmds, true).await.map(drop)
    }

    /// Reads the current record of `address` again and adds its entries: undoes a removal of
    /// a concurrent writer that ran after this record became current. The last step of every
    /// change.
    pub(crate) async fn recheck_index(&self, address: &Address) -> Result<()> {
        match self.get_stored(address).await? {
            Some(r) => self.add_index(&r).await,
            None => Ok(()),
        }
    }

    /// `list`: the listing sets of all buckets read from `after` on, merged in byte order, each
    /// candidate checked against its record (an address deleted a moment ago may still be
    /// listed until its deletion finishes).
    pub(crate) async fn list_inner(
        &self,
        after: Option<&Address>,
        limit: usize,
    ) -> Result<Vec<Address>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = after.map(|a| a.as_str().to_string());
        while out.len() < limit {
            let want = limit - out.len();
            let min = match &cursor {
                Some(a) => format!("({a}"),
                None => "-".to_string(),
            };
            let cmds = (0..ADDRESS_BUCKETS)
                .map(|b| {
                    let mut cmd = redis::cmd("ZRANGEBYLEX");
                    cmd.arg(bucket_key(&self.prefix, b))
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(isize::try_from(want).unwrap_or(isize::MAX));
                    cmd
                })
                .collect();
            let mut candidates: Vec<Vec<u8>> = Vec::new();
            for v in self.query_many(cmds, false).await? {
                let members: Vec<Vec<u8>> = redis::from_redis_value(v)
                    .map_err(|e| corrupt(format!("address listing: {e}")))?;
                candidates.extend(members);
            }
            candidates.sort();
            candidates.dedup();
            candidates.truncate(want);
            let exhausted = candidates.len() < want;
            let Some(last) = candidates.last() else {
                break;
            };
            cursor = Some(String::from_utf8_lossy(last).into_owned());
            out.extend(self.with_keys(&candidates).await?);
            if exhausted {
                break;
            }
        }
        Ok(out)
    }

    /// `list_page`: the listing sets bucket by bucket (`addrs:0` to `addrs:f`), each in byte
    /// order from the cursor's address on: one `ZRANGEBYLEX` of one key per step (so one
    /// shard of a cluster), and a whole walk reads each member once. An address lives in one
    /// bucket for good (its bucket comes from its hash slot), so it is handed out once.
    /// Members are checked against their records like `list`'s.
    pub(crate) async fn list_page_inner(
        &self,
        cursor: Option<&WalkCursor>,
        limit: usize,
    ) -> Result<WalkPage> {
        kst_core::store::check_walk_limit(limit)?;
        let (mut bucket, mut after) = match cursor {
            Some(c) => parse_cursor(c)?,
            None => (0, None),
        };
        let mut out = Vec::new();
        while bucket < ADDRESS_BUCKETS {
            let want = limit - out.len();
            let min = match &after {
                Some(a) => format!("({a}"),
                None => "-".to_string(),
            };
            let members: Vec<Vec<u8>> = self
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(bucket_key(&self.prefix, bucket))
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(isize::try_from(want).unwrap_or(isize::MAX)),
                    false,
                )
                .await?;
            let exhausted = members.len() < want;
            out.extend(self.with_keys(&members).await?);
            if exhausted {
                bucket += 1;
                after = None;
            } else if let Some(last) = members.last() {
                after = Some(String::from_utf8_lossy(last).into_owned());
            }
            if out.len() == limit {
                break;
            }
        }
        let next = (bucket < ADDRESS_BUCKETS).then(|| {
            WalkCursor::new(format!(
                "{CURSOR_PREFIX}{bucket:x}:{}",
                after.unwrap_or_default()
            ))
        });
        Ok(WalkPage {
            addresses: out,
            next,
        })
    }

    /// The listing members `members` as addresses, those whose current record exists (an
    /// address deleted a moment ago may still be listed until its deletion finishes).
    async fn with_keys(&self, members: &[Vec<u8>]) -> Result<Vec<Address>> {
        let addresses = members
            .iter()
            .map(|m| {
                std::str::from_utf8(m)
                    .ok()
                    .and_then(|s| Address::from_normalized(s).ok())
                    .ok_or_else(|| {
                        corrupt(format!(
                            "listing member {:?} is not an address",
                            String::from_utf8_lossy(m)
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let exists = self
            .query_many(
                addresses
                    .iter()
                    .map(|a| {
                        let mut c = redis::cmd("EXISTS");
                        c.arg(self.keys(a).cur);
                        c
                    })
                    .collect(),
                false,
            )
            .await?;
        Ok(addresses
            .into_iter()
            .zip(exists)
            .filter(|(_, e)| matches!(e, Value::Int(1)))
            .map(|(a, _)| a)
            .collect())
    }

    /// `rebuild_index`: lists and indexes the current record of every address found by a
    /// `SCAN` of every primary, then drops index entries that no current record backs (and the
    /// single address index of the earlier layout). Safe while the store serves.
    pub(crate) async fn rebuild_index_inner(&self) -> Result<u64> {
        let mut indexed = 0u64;
        let nodes = self.primaries().await?;
        let current = current_pattern(&self.prefix);
        for node in &nodes {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(node, cursor, &current).await?;
                for key in keys {
                    let Some(address) = address_of_current(&self.prefix, &key) else {
                        continue;
                    };
                    if let Some(r) = self.get_stored(&address).await? {
                        self.add_index(&r).await?;
                        indexed += 1;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        for kind in ["fp:", "kid:", "wkd:"] {
            let pattern = format!("{}*", glob_escape(&format!("{}{kind}", self.prefix)));
            for node in &nodes {
                let mut cursor = 0;
                loop {
                    let (next, sets) = self.scan_page(node, cursor, &pattern).await?;
                    for set in sets {
                        self.drop_unbacked_members(&set).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        for b in 0..ADDRESS_BUCKETS {
            let bucket = bucket_key(&self.prefix, b);
            let members: Vec<Vec<u8>> = self
                .query(redis::cmd("ZRANGE").arg(&bucket).arg(0).arg(-1), false)
                .await?;
            for m in members {
                let backed = match std::str::from_utf8(&m)
                    .ok()
                    .and_then(|s| Address::from_normalized(s).ok())
                {
                    Some(a) => {
                        let n: i64 = self
                            .query(redis::cmd("EXISTS").arg(self.keys(&a).cur), false)
                            .await?;
                        n == 1
                    }
                    None => false,
                };
                if !backed {
                    let _: i64 = self
                        .query(redis::cmd("ZREM").arg(&bucket).arg(&m), true)
                        .await?;
                    self.recheck_member(&m).await?;
                }
            }
        }
        let _: i64 = self
            .query(redis::cmd("DEL").arg(legacy_index_key(&self.prefix)), true)
            .await?;
        Ok(indexed)
    }

    /// [`Self::recheck_index`] of an index member that is an address (a publication may have
    /// made it current between the check and the removal).
    async fn recheck_member(&self, member: &[u8]) -> Result<()> {
        match std::str::from_utf8(member)
            .ok()
            .and_then(|s| Address::from_normalized(s).ok())
        {
            Some(a) => self.recheck_index(&a).await,
            None => Ok(()),
        }
    }

    /// Removes the members of index set `set` whose current record does not have the entry.
    async fn drop_unbacked_members(&self, set: &str) -> Result<()> {
        let members: Vec<Vec<u8>> = self.query(redis::cmd("SMEMBERS").arg(set), false).await?;
        for m in members {
            let backed = match std::str::from_utf8(&m)
                .ok()
                .and_then(|s| Address::from_normalized(s).ok())
            {
                Some(a) => match self.get_stored(&a).await? {
                    Some(r) => index_keys(&self.prefix, &IndexEntries::of(&r))
                        .iter()
                        .any(|k| k == set),
                    None => false,
                },
                None => false,
            };
            if !backed {
                let _: i64 = self
                    .query(redis::cmd("SREM").arg(set).arg(&m), true)
                    .await?;
                self.recheck_member(&m).await?;
            }
        }
        Ok(())
    }

    /// The primaries to `SCAN` (their addresses; one empty name on a single server).
    pub(crate) async fn primaries(&self) -> Result<Vec<String>> {
        let nodes = self
            .conn
            .on_primaries(&redis::cmd("ROLE"))
            .await
            .map_err(crate::error::redis)?;
        Ok(nodes.into_iter().map(|(n, _)| n).collect())
    }

    /// One `SCAN` step on `node`: the next cursor (0: done) and the keys matching `pattern`.
    pub(crate) async fn scan_page(
        &self,
        node: &str,
        cursor: u64,
        pattern: &str,
    ) -> Result<(u64, Vec<String>)> {
        self.scan_page_counted(node, cursor, pattern, SCAN_COUNT as usize)
            .await
    }

    /// [`Self::scan_page`] asking for about `count` keys.
    pub(crate) async fn scan_page_counted(
        &self,
        node: &str,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count.max(1));
        let v = self
            .conn
            .on_node(node, &cmd)
            .await
            .map_err(crate::error::redis)?;
        redis::from_redis_value(v).map_err(|e| corrupt(format!("SCAN answered: {e}")))
    }
}

/// Escapes the glob characters of `s` for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
