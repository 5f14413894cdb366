//! [`RedisStore`]: the [`KeyStore`] on Redis, each change of an address one Lua script.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kst_core::store::{MAX_GET_MANY, TimeoutStore, validate_history};
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, Error, Fingerprint, KeyId, KeyRecord, KeyStore, NewKey, PublishOutcome, Result,
};
use redis::Value;

use crate::builder::RedisStoreBuilder;
use crate::conn::Conn;
use crate::error::{COMPONENT, corrupt, redis};
use crate::guard::Guard;
use crate::keys::{AddressKeys, fingerprint_key, key_id_key, tombstone_key, wkd_key};
use crate::scripts;

/// How often a publication is tried again when its tombstone changed under it.
const TOMBSTONE_RETRIES: usize = 16;

/// Largest version this store keeps: Lua numbers are doubles, exact up to 2^53.
pub const MAX_VERSION: u64 = (1 << 53) - 2;

/// A [`KeyStore`] on Redis (one server, a primary that Sentinel names, or a Redis Cluster),
/// shared by every KST instance of a pool.
///
/// The builder hands it out wrapped in a [`TimeoutStore`] (the operation timeout); its own
/// methods are not bounded by it. Cheap to clone (multiplexed connections, re-established by
/// themselves). See the crate documentation for the key layout and the write order.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: Conn,
    pub(crate) prefix: String,
    pub(crate) guard: Arc<Guard>,
    /// Replicas that must acknowledge a publication before it is confirmed (`WAIT`).
    pub(crate) min_replicas: u32,
    /// Bound on that `WAIT`.
    pub(crate) replica_timeout: Duration,
    /// Connections for changes that end in a `WAIT` (empty without `min_replicas`): a `WAIT`
    /// blocks its connection until the replicas answer, so it never runs on the connection
    /// that reads and the rate limiter share.
    pub(crate) lanes: Arc<Vec<Conn>>,
    pub(crate) next_lane: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` with keys under `prefix` (e.g. [`crate::DEFAULT_PREFIX`]) and the
    /// default timeouts; every operation of the store returned is bounded by the operation
    /// timeout. The server must be durable (see [`RedisStoreBuilder::require_durable`]).
    pub async fn connect(url: &str, prefix: &str) -> Result<TimeoutStore<Self>> {
        RedisStoreBuilder::new(url).prefix(prefix).connect().await
    }

    /// A builder for prefix, timeouts, Sentinel, Cluster and the durability settings.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sends `cmd`, once more if the first try failed on a connection the manager had already
    /// lost (see [`worth_retrying`]).
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        writes: bool,
    ) -> Result<T> {
        let once = async || {
            let mut h = self.conn.handle().await?;
            cmd.query_async(&mut h).await
        };
        let result = match once().await {
            Err(e) if worth_retrying(&e, writes) => {
                self.conn.on_error(&e).await;
                once().await
            }
            r => r,
        };
        self.mapped(result).await
    }

    /// Runs a script, with the same retry as [`Self::query`].
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
        writes: bool,
    ) -> Result<T> {
        let once = async || {
            let mut h = self.conn.handle().await?;
            script.invoke_async(&mut h).await
        };
        let result = match once().await {
            Err(e) if worth_retrying(&e, writes) => {
                self.conn.on_error(&e).await;
                once().await
            }
            r => r,
        };
        self.mapped(result).await
    }

    /// Runs a writing script (for the rate limiter).
    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.invoke(script, true).await
    }

    /// Maps a redis result, letting the connection react to the error (Sentinel: ask again).
    async fn mapped<T>(&self, result: redis::RedisResult<T>) -> Result<T> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn.on_error(&e).await;
                Err(redis(e))
            }
        }
    }

    /// Sends independent commands, each of which touches one key: pipelined on one server,
    /// concurrently on a cluster (where they may live on different shards). Answers in order.
    pub(crate) async fn query_many(
        &self,
        cmds: Vec<redis::Cmd>,
        writes: bool,
    ) -> Result<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        if !self.conn.is_cluster() {
            let mut pipe = redis::pipe();
            for c in &cmds {
                pipe.add_command(c.clone());
            }
            let once = async || {
                let mut h = self.conn.handle().await?;
                pipe.query_async::<Vec<Value>>(&mut h).await
            };
            let result = match once().await {
                Err(e) if worth_retrying(&e, writes) => {
                    self.conn.on_error(&e).await;
                    once().await
                }
                r => r,
            };
            return self.mapped(result).await;
        }
        let mut set = tokio::task::JoinSet::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let store = self.clone();
            set.spawn(async move { (i, store.query::<Value>(&cmd, writes).await) });
        }
        let mut out: Vec<Option<Value>> = vec![None; set.len()];
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|e| Error::unavailable(COMPONENT, e))?;
            out[i] = Some(r?);
        }
        Ok(out.into_iter().map(|v| v.unwrap_or(Value::Nil)).collect())
    }

    /// This store on a connection of its own for one change that ends in a `WAIT` (itself
    /// without `min_replicas`): the change's writes and the `WAIT` go on the same connection.
    pub(crate) fn lane(&self) -> RedisStore {
        if self.lanes.is_empty() {
            return self.clone();
        }
        let i = self
            .next_lane
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % self.lanes.len();
        RedisStore {
            conn: self.lanes[i].clone(),
            ..self.clone()
        }
    }

    pub(crate) fn keys(&self, address: &Address) -> AddressKeys {
        AddressKeys::new(&self.prefix, address)
    }

    /// Waits for [`Self::min_replicas`] replicas of the primary that holds `key` to acknowledge
    /// every write sent before on the same connection; a temporary error when fewer do.
    pub(crate) async fn wait_for_replicas(&self, key: &str, what: &str) -> Result<()> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        let millis = u64::try_from(self.replica_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.min_replicas).arg(millis);
        let result = self.conn.on_slot_of(key, &cmd).await;
        let acked: i64 = match self.mapped(result).await? {
            Value::Int(n) => n,
            other => {
                return Err(corrupt(format!("WAIT answered {other:?}")));
            }
        };
        if acked < i64::from(self.min_replicas) {
            return Err(Error::unavailable(
                COMPONENT,
                format!(
                    "{what} reached {acked} of the {} replicas [store] min_replicas asks for \
                     within {millis} ms; not confirmed (it is applied on the primary, and \
                     retrying is safe)",
                    self.min_replicas
                ),
            ));
        }
        Ok(())
    }

    async fn publish_inner(&self, mut key: NewKey) -> Result<PublishOutcome> {
        self.guard.ensure(self).await?;
        let address = key.address.clone();
        let k = self.keys(&address);
        let tombstone_key = tombstone_key(&self.prefix, &key.fingerprint);
        let original = key.clone();
        let mut supersede = false;
        for _ in 0..TOMBSTONE_RETRIES {
            // 1. The tombstone: read, merge, and write back (compare-and-set) when it grew.
            let stored: Option<Vec<u8>> = self
                .query(redis::cmd("GET").arg(&tombstone_key), false)
                .await?;
            let (merged, grown) =
                kst_core::revocation::apply_tombstone(key.clone(), stored.as_deref())?;
            if let Some(grown) = &grown {
                let mut invocation = scripts::TOMBSTONE.prepare_invoke();
                invocation
                    .key(&tombstone_key)
                    .arg(if stored.is_some() { "1" } else { "0" })
                    .arg(stored.clone().unwrap_or_default())
                    .arg(grown);
                let written: i64 = self.invoke(&invocation, true).await?;
                if written == 0 {
                    continue;
                }
            }
            let merged_with = grown.or(stored);
            // 2. The index entries of the new key, before the record (a confirmed key is
            //    always findable).
            let record = merged.clone().into_record(1);
            self.add_index(&record).await?;
            // 3. The record: one script on the address' hash slot.
            let publication_id = merged.publication_id.clone();
            let (key_b64, body) = body_without_version(merged.into_record(0))?;
            let mut invocation = scripts::PUBLISH.prepare_invoke();
            invocation
                .key(&k.cur)
                .key(&k.ver)
                .key(&k.hist)
                .key(&k.pubs)
                .key(&k.deleted)
                .arg(&publication_id)
                .arg(&key_b64)
                .arg(&body)
                .arg(if supersede { "1" } else { "0" })
                .arg(match key.expected {
                    kst_core::Expected::Any => String::new(),
                    kst_core::Expected::Nothing => "0".to_string(),
                    // Versions start at 1: version 0 is never current ("-" matches nothing).
                    kst_core::Expected::Version(v) if v > 0 => v.to_string(),
                    kst_core::Expected::Version(_) => "-".to_string(),
                });
            let reply: Vec<Vec<u8>> = self.invoke(&invocation, true).await?;
            let [status, payload, previous] = <[Vec<u8>; 3]>::try_from(reply)
                .map_err(|r| corrupt(format!("publish script answered {} values", r.len())))?;
            let outcome = match status.as_slice() {
                b"published" => PublishOutcome::Published(parse(&address, &payload)?),
                b"unchanged" => PublishOutcome::Unchanged(parse(&address, &payload)?),
                b"deleted" => {
                    // Nothing written: take back the entries of step 2 that the current key
                    // (if any) lacks, then re-check what is current (see "Write order").
                    let current = self.get_stored(&address).await?;
                    self.remove_stale_index(&record, current.as_ref()).await?;
                    self.recheck_index(&address).await?;
                    return Err(Error::deleted_since(&original));
                }
                b"conflict" => {
                    let current = String::from_utf8_lossy(&payload).parse::<u64>().ok();
                    return Err(key.expected.conflict(&address, current.filter(|&v| v > 0)));
                }
                b"corrupt" => {
                    return Err(corrupt(format!(
                        "{address}: {}",
                        String::from_utf8_lossy(&payload)
                    )));
                }
                other => {
                    return Err(corrupt(format!(
                        "publish script answered {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            };
            // 4. Entries of the key it replaced that the new one lacks; then the index of
            //    whatever is current now (see "Write order").
            if !previous.is_empty() {
                let previous = parse(&address, &previous)?;
                self.remove_stale_index(&previous, Some(&record)).await?;
            }
            self.recheck_index(&address).await?;
            // 5. A revocation that landed between 1 and 3 (another publisher of the same
            //    fingerprint): publish again with it merged in. Readers merge it already.
            let now: Option<Vec<u8>> = self
                .query(redis::cmd("GET").arg(&tombstone_key), false)
                .await?;
            if now.as_deref().filter(|t| !t.is_empty())
                != merged_with.as_deref().filter(|t| !t.is_empty())
            {
                key = original.clone();
                supersede = true;
                continue;
            }
            // 6. Replicas, before the caller confirms.
            self.wait_for_replicas(&k.cur, "the publication").await?;
            if merged_with.is_some() && self.conn.is_cluster() {
                self.wait_for_replicas(&tombstone_key, "the tombstone")
                    .await?;
            }
            return Ok(outcome);
        }
        Err(Error::unavailable(
            COMPONENT,
            format!(
                "the tombstone of {} kept changing during {TOMBSTONE_RETRIES} attempts to \
                 publish for {address}; try again",
                original.fingerprint
            ),
        ))
    }

    /// The stored current record, as it is (no tombstone applied).
    pub(crate) async fn get_stored(&self, address: &Address) -> Result<Option<KeyRecord>> {
        let json: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(&self.keys(address).cur), false)
            .await?;
        json.map(|j| parse(address, &j)).transpose()
    }

    /// The current record as served: with the tombstone of its fingerprint merged in, so that
    /// a key revoked by a concurrent publication is never served without the revocation.
    async fn get_inner(&self, address: &Address) -> Result<Option<KeyRecord>> {
        let Some((record, tomb)) = self.get_with_tombstone(address).await? else {
            return Ok(None);
        };
        merge_tombstone(record, tomb.as_deref()).map(Some)
    }

    /// The stored current record of `address` and the stored tombstone of its fingerprint, in
    /// one round trip ([`scripts::GET_SERVED`]) on one server (or the primary Sentinel names);
    /// on a Redis Cluster, where the tombstone lives in its fingerprint's slot, two GETs (a
    /// script there touches the keys of one slot only).
    pub(crate) async fn get_with_tombstone(
        &self,
        address: &Address,
    ) -> Result<Option<(KeyRecord, Option<Vec<u8>>)>> {
        if self.conn.is_cluster() {
            let Some(record) = self.get_stored(address).await? else {
                return Ok(None);
            };
            let tomb = self.tombstone_of(&record).await?;
            return Ok(Some((record, tomb)));
        }
        let mut invocation = scripts::GET_SERVED.prepare_invoke();
        invocation
            .key(crate::keys::current_key(&self.prefix, address))
            .arg(crate::keys::tombstone_prefix(&self.prefix));
        let reply: Vec<Vec<u8>> = self.invoke(&invocation, false).await?;
        self.served(address, reply).await
    }

    /// The record and tombstone of `address` from its `GET_SERVED` answer `reply`.
    async fn served(
        &self,
        address: &Address,
        reply: Vec<Vec<u8>>,
    ) -> Result<Option<(KeyRecord, Option<Vec<u8>>)>> {
        let [json, fingerprint, tomb] = match <[Vec<u8>; 3]>::try_from(reply) {
            Ok(parts) => parts,
            Err(r) if r.is_empty() => return Ok(None),
            Err(r) => {
                return Err(corrupt(format!(
                    "the look-up script answered {} values for {address}",
                    r.len()
                )));
            }
        };
        let record = parse(address, &json)?;
        if fingerprint != record.fingerprint.as_str().as_bytes() {
            // A record whose fingerprint the script did not read as this parse did: the
            // tombstone with a GET of its own.
            let tomb = self.tombstone_of(&record).await?;
            return Ok(Some((record, tomb)));
        }
        Ok(Some((record, Some(tomb).filter(|t| !t.is_empty()))))
    }

    /// The current records of `addresses` as served ([`Self::get_inner`] of each), in the
    /// order asked: one [`scripts::GET_MANY_SERVED`] per [`MAX_GET_MANY`] addresses; on a
    /// Redis Cluster, one look-up after the other.
    async fn get_many_inner(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        let mut records = Vec::with_capacity(addresses.len());
        if self.conn.is_cluster() {
            for address in addresses {
                records.push(self.get_inner(address).await?);
            }
            return Ok(records);
        }
        let tombstones = crate::keys::tombstone_prefix(&self.prefix);
        for chunk in addresses.chunks(MAX_GET_MANY) {
            let mut invocation = scripts::GET_MANY_SERVED.prepare_invoke();
            for address in chunk {
                invocation.key(crate::keys::current_key(&self.prefix, address));
            }
            invocation.arg(&tombstones);
            let reply: Vec<Vec<Vec<u8>>> = self.invoke(&invocation, false).await?;
            if reply.len() != chunk.len() {
                return Err(corrupt(format!(
                    "the look-up script answered {} records for {} addresses",
                    reply.len(),
                    chunk.len()
                )));
            }
            for (address, parts) in chunk.iter().zip(reply) {
                records.push(match self.served(address, parts).await? {
                    Some((record, tomb)) => Some(merge_tombstone(record, tomb.as_deref())?),
                    None => None,
                });
            }
        }
        Ok(records)
    }

    /// The stored tombstone of `record`'s fingerprint (`None`: none, or empty).
    async fn tombstone_of(&self, record: &KeyRecord) -> Result<Option<Vec<u8>>> {
        let tomb: Option<Vec<u8>> = self
            .query(
                redis::cmd("GET").arg(tombstone_key(&self.prefix, &record.fingerprint)),
                false,
            )
            .await?;
        Ok(tomb.filter(|t| !t.is_empty()))
    }

    async fn history_inner(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = self
            .query(redis::cmd("HGETALL").arg(&self.keys(address).hist), false)
            .await?;
        let mut records = entries
            .iter()
            .map(|(field, json)| {
                let r = parse(address, json)?;
                if field.as_slice() != r.version.to_string().as_bytes() {
                    return Err(corrupt(format!(
                        "{address}: history entry {:?} holds version {}",
                        String::from_utf8_lossy(field),
                        r.version
                    )));
                }
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.version);
        Ok(records)
    }

    async fn restore_inner(&self, history: &[KeyRecord]) -> Result<()> {
        validate_history(history)?;
        let Some(last) = history.last() else {
            return Err(Error::Invalid("restore needs at least one record".into()));
        };
        if last.version > MAX_VERSION {
            return Err(Error::Invalid(format!(
                "version {} is above the largest this store keeps ({MAX_VERSION})",
                last.version
            )));
        }
        let address = &last.address;
        let k = self.keys(address);
        self.add_index(last).await?;
        let mut invocation = scripts::RESTORE.prepare_invoke();
        invocation.key(&k.cur).key(&k.ver).key(&k.hist).key(&k.pubs);
        for r in history {
            let json = serde_json::to_string(r)
                .map_err(|e| Error::Invalid(format!("record of {address}: {e}")))?;
            invocation
                .arg(r.version.to_string())
                .arg(&r.publication_id)
                .arg(json);
        }
        let previous: Vec<u8> = self.invoke(&invocation, true).await?;
        if !previous.is_empty() {
            let previous = parse(address, &previous)?;
            self.remove_stale_index(&previous, Some(last)).await?;
        }
        self.recheck_index(address).await?;
        self.wait_for_replicas(&k.cur, "the restore").await
    }

    async fn delete_inner(&self, address: &Address) -> Result<bool> {
        let k = self.keys(address);
        let mut invocation = scripts::DELETE.prepare_invoke();
        invocation
            .key(&k.cur)
            .key(&k.ver)
            .key(&k.hist)
            .key(&k.pubs)
            .key(&k.deleted);
        let (removed, previous): (i64, Vec<u8>) = self.invoke(&invocation, true).await?;
        if !previous.is_empty() {
            let previous = parse(address, &previous)?;
            self.remove_stale_index(&previous, None).await?;
        }
        self.recheck_index(address).await?;
        self.wait_for_replicas(&k.cur, "the deletion").await?;
        Ok(removed > 0)
    }

    /// Current keys named by the index set `set` that `hit` confirms (against the record
    /// itself: a stale entry is never served), in address order, at most `limit`.
    async fn find_in(
        &self,
        set: String,
        limit: usize,
        hit: impl Fn(&kst_core::key_index::IndexEntries) -> bool,
    ) -> Result<Vec<KeyRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let members: Vec<Vec<u8>> = self.query(redis::cmd("SMEMBERS").arg(&set), false).await?;
        let mut addresses = members
            .iter()
            .filter_map(|m| {
                let a = std::str::from_utf8(m)
                    .ok()
                    .and_then(|s| Address::from_normalized(s).ok());
                if a.is_none() {
                    tracing::warn!(set = %set, member = %String::from_utf8_lossy(m), "index member is not an address; ignored");
                }
                a
            })
            .collect::<Vec<_>>();
        addresses.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut out = Vec::new();
        for a in addresses {
            if let Some((r, tomb)) = self.get_with_tombstone(&a).await?
                && hit(&kst_core::key_index::IndexEntries::of(&r))
            {
                out.push(merge_tombstone(r, tomb.as_deref())?);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Whether a failed command is worth one more try. The connection manager hands out the result
/// of its last connection attempt until a failure makes it start a new one, so the first command
/// after the server comes back fails with the old "connection refused": such a command was never
/// sent and is always retried. A command that failed on a dropped connection may or may not
/// have reached the server; only reads are retried then.
fn worth_retrying(e: &redis::RedisError, writes: bool) -> bool {
    e.is_connection_refusal() || (!writes && e.is_connection_dropped())
}

/// The record as JSON without its `version` (the script puts it in), and its key as the script
/// compares it (the base64 string of the JSON).
fn body_without_version(record: KeyRecord) -> Result<(String, String)> {
    let invalid = |e: &dyn std::fmt::Display| Error::Invalid(format!("unserializable key: {e}"));
    let mut value = serde_json::to_value(&record).map_err(|e| invalid(&e))?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| invalid(&"not a JSON object"))?;
    map.remove("version");
    let key = match map.get("key") {
        Some(serde_json::Value::String(k)) => k.clone(),
        _ => return Err(invalid(&"no key field")),
    };
    let body = serde_json::to_string(&value).map_err(|e| invalid(&e))?;
    Ok((key, body))
}

/// `record` with the tombstone `tomb` of its fingerprint (if any) applied.
fn merge_tombstone(mut record: KeyRecord, tomb: Option<&[u8]>) -> Result<KeyRecord> {
    let Some(tomb) = tomb.filter(|t| !t.is_empty()) else {
        return Ok(record);
    };
    let (merged, revoked) =
        kst_core::revocation::serve_with_tombstone(&record.key, tomb).map_err(|e| {
            corrupt(format!(
                "{}: the tombstone of {} does not merge: {e}",
                record.address, record.fingerprint
            ))
        })?;
    record.key = merged;
    record.revoked |= revoked;
    Ok(record)
}

/// Parses a stored record of `address`.
pub(crate) fn parse(address: &Address, json: &[u8]) -> Result<KeyRecord> {
    let r: KeyRecord = serde_json::from_slice(json)
        .map_err(|e| corrupt(format!("{address}: unreadable record: {e}")))?;
    if &r.address != address {
        return Err(corrupt(format!(
            "record of {} stored under {address}",
            r.address
        )));
    }
    if r.version == 0 {
        return Err(corrupt(format!("{address}: record with version 0")));
    }
    Ok(r)
}

#[async_trait]
impl KeyStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.lane().publish_inner(key).await
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.get_inner(address).await
    }

    /// One script ([`scripts::GET_MANY_SERVED`]) per [`MAX_GET_MANY`] addresses.
    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        self.get_many_inner(addresses).await
    }

    /// On one server (or the primary Sentinel names); not on a Redis Cluster, where
    /// `get_many` is one `get` after the other.
    fn batches_reads(&self) -> bool {
        !self.conn.is_cluster()
    }

    async fn claim_reminder(&self, claim: &kst_core::reminder::ReminderClaim) -> Result<bool> {
        let key = crate::keys::reminder_key(&self.prefix, &claim.address, &claim.id());
        let set: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(kst_core::time::unix_now())
                    .arg("NX"),
                true,
            )
            .await?;
        Ok(set.is_some())
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.history_inner(address).await
    }

    async fn delete(&self, address: &Address) -> Result<bool> {
        self.lane().delete_inner(address).await
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.list_inner(after, limit).await
    }

    /// Bucket by bucket through the listing sets (see `list_page_inner`).
    async fn list_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::WalkPage> {
        self.list_page_inner(cursor, limit).await
    }

    /// A `SCAN` of every primary for the sets `P{A}:deleted` (see `crate::deleted`).
    async fn deleted_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::DeletedPage> {
        self.deleted_page_inner(cursor, limit).await
    }

    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        self.lane()
            .remember_deleted_inner(address, publication_ids)
            .await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.lane().restore_inner(history).await
    }

    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        let set = fingerprint_key(&self.prefix, fingerprint);
        self.find_in(set, limit, |e| e.has_fingerprint(fingerprint))
            .await
    }

    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        let set = key_id_key(&self.prefix, key_id);
        self.find_in(set, limit, |e| e.has_key_id(key_id)).await
    }

    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        let set = wkd_key(&self.prefix, domain, hash);
        Ok(self
            .find_in(set, 1, |e| e.has_wkd_hash(domain, hash))
            .await?
            .pop())
    }

    async fn rebuild_index(&self) -> Result<u64> {
        self.rebuild_index_inner().await
    }

    async fn check(&self) -> Result<()> {
        self.check_inner().await
    }

    async fn topology(&self) -> Result<Vec<(String, String)>> {
        self.topology_inner().await
    }
}
