//! The key directory's records in Redis (feature `transparency`): kst-redis's
//! [`DirectoryStore`] (docs/TRANSPARENCY.md, "What each backend stores").
//!
//! Every key of one domain's directory shares the hash tag `{kt:<domain>}`, so one Lua script
//! touches them all, also on a Redis Cluster (one slot per domain). For prefix `P`:
//!
//! ```text
//! P{kt:<domain>}:root                 hash: epoch (decimal) and record (the root record)
//! P{kt:<domain>}:nodes                hash: node key (binary) -> tree node record
//! P{kt:<domain>}:v:<hex of the label> hash: epoch (decimal) -> value state record
//! P{kt:<domain>}:heads                hash: epoch (decimal) -> signed head (HSETNX: first stays)
//! P{kt:<domain>}:cosig:<epoch>        hash: witness key (32 bytes) -> cosignature
//! P{kt:<domain>}:cosig-at:<epoch>     hash: witness key -> when it was checked (a later
//!                                     check is never replaced by an earlier one)
//! P{kt:<domain>}:witnesses            hash: witness key -> the newest epoch it cosigned
//! ```
//!
//! A commit is ONE script ([`COMMIT`]): first the fence (the stored root's epoch must be the
//! one the batch was built on; the epoch-0 root and a batch of nodes alone are written only
//! while the domain has no root), then the nodes and value states, the root last. A script
//! runs alone on its server, so readers see an epoch whole or not at all; should the server
//! fail a command half-way (out of memory), the root is still the old one and the adapter
//! hides value states newer than it (`kst_core::transparency::storage`).
//!
//! Reads are scripts too ([`READ_ROOT`], [`READ_FIELDS`], [`READ_ALL`]), which check sizes
//! on the server: a blob larger than [`MAX_BLOB`] or a label with more than
//! [`MAX_VALUE_STATES`] value states is reported as corrupt instead of being sent.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use kst_core::transparency::{
    DirectoryStore, DirectoryStoreError, RecordBatch, check_domain, on_runtime,
};
use redis::{Script, Value};

use crate::store::RedisStore;

/// Largest record read back (a record is at most a few hundred bytes).
pub const MAX_BLOB: usize = 64 * 1024;
/// Most value states (versions) of one address read back.
pub const MAX_VALUE_STATES: usize = 65_536;
/// Most hash fields (node keys, epochs) asked for in one script call (bigger requests are
/// split).
const FIELDS_PER_CALL: usize = 2048;

/// Writes one batch. KEYS: root, nodes, heads, then one value-state hash per distinct label.
/// ARGV: mode (`nodes`: nodes alone, written only while there is no root; `first`: the
/// epoch-0 root, the same; `next`: fenced on the expected epoch), expected epoch, new epoch,
/// root record, the new epoch's head (empty: none; `HSETNX` after the root: a stored head
/// stays), number of nodes, (node key, record) per node, then (KEYS index, epoch, record) per
/// value state. Returns `{'ok'}`, `{'dropped'}` (a root exists: the empty directory of a late
/// starter) or `{'conflict', stored epoch or ''}`.
pub(crate) static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mode = ARGV[1]
if mode == 'next' then
  local stored = redis.call('HGET', KEYS[1], 'epoch')
  if stored ~= ARGV[2] then return {'conflict', stored or ''} end
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  return {'dropped'}
end
local n = tonumber(ARGV[6])
local i = 7
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HSET', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
if mode ~= 'nodes' then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'record', ARGV[4])
  if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[5]) end
end
return {'ok'}
"#,
    )
});

/// Reads the root. KEYS: root. ARGV: largest record. Returns `{'none'}`, `{'ok', epoch,
/// record}` or `{'corrupt', what}`.
pub(crate) static READ_ROOT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'none'} end
if redis.call('HSTRLEN', KEYS[1], 'record') > tonumber(ARGV[1]) then
  return {'corrupt', 'the root record is larger than ' .. ARGV[1] .. ' bytes'}
end
local root = redis.call('HMGET', KEYS[1], 'epoch', 'record')
if not root[1] or not root[2] then return {'corrupt', 'the root lacks its epoch or record'} end
return {'ok', root[1], root[2]}
"#,
    )
});

/// Stores a head unless one is stored for its epoch. KEYS: heads. ARGV: epoch, head, largest
/// record. Returns `{'ok', the stored head}` or `{'corrupt', what}`.
pub(crate) static INSERT_HEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HSTRLEN', KEYS[1], ARGV[1]) > tonumber(ARGV[3]) then
  return {'corrupt', 'the head of epoch ' .. ARGV[1] .. ' is larger than ' .. ARGV[3] .. ' bytes'}
end
return {'ok', redis.call('HGET', KEYS[1], ARGV[1])}
"#,
    )
});

/// Reads fields of one hash (tree nodes, heads, a witness's newest epoch). KEYS: the hash.
/// ARGV: largest record, then the fields. Returns `{'ok', field, value, ...}` for the fields
/// present, or `{'corrupt', what}`.
pub(crate) static READ_FIELDS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local max = tonumber(ARGV[1])
local out = {'ok'}
for i = 2, #ARGV do
  if redis.call('HSTRLEN', KEYS[1], ARGV[i]) > max then
    return {'corrupt', 'a record is larger than ' .. ARGV[1] .. ' bytes'}
  end
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = v
  end
end
return out
"#,
    )
});

/// Stores a cosignature unless the one stored for its epoch and witness was checked later,
/// and moves the witness's newest epoch forward. KEYS: the epoch's cosignatures, the
/// witnesses' newest epochs, the epoch's check times. ARGV: witness key, cosignature, epoch,
/// check time.
pub(crate) static PUT_COSIGNATURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local at = redis.call('HGET', KEYS[3], ARGV[1])
if at and tonumber(at) ~= nil and tonumber(at) > tonumber(ARGV[4]) then
  return {'ok'}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local newest = redis.call('HGET', KEYS[2], ARGV[1])
if not newest or tonumber(newest) == nil or tonumber(newest) <= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return {'ok'}
"#,
    )
});

/// Reads every field of one hash (a label's value states, an epoch's cosignatures). KEYS:
/// the hash. ARGV: largest record, most fields. Returns `{'ok', field, value, ...}` or
/// `{'corrupt', what}`.
pub(crate) static READ_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[2]) then
  return {'corrupt', 'more than ' .. ARGV[2] .. ' entries in one hash'}
end
local max = tonumber(ARGV[1])
local out = {'ok'}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('HSTRLEN', KEYS[1], f) > max then
    return {'corrupt', 'a record is larger than ' .. ARGV[1] .. ' bytes'}
  end
  out[#out + 1] = f
  out[#out + 1] = redis.call('HGET', KEYS[1], f)
end
return out
"#,
    )
});

/// Reads every field of several hashes (the value states of several labels). KEYS: the
/// hashes. ARGV: largest record, most fields of one hash. Returns `{'ok', key index (1-based),
/// field, value, ...}` (triples) or `{'corrupt', what}`.
pub(crate) static READ_ALL_OF: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local max = tonumber(ARGV[1])
local out = {'ok'}
for k = 1, #KEYS do
  if redis.call('HLEN', KEYS[k]) > tonumber(ARGV[2]) then
    return {'corrupt', 'more than ' .. ARGV[2] .. ' entries in one hash'}
  end
  for _, f in ipairs(redis.call('HKEYS', KEYS[k])) do
    if redis.call('HSTRLEN', KEYS[k], f) > max then
      return {'corrupt', 'a record is larger than ' .. ARGV[1] .. ' bytes'}
    end
    out[#out + 1] = tostring(k)
    out[#out + 1] = f
    out[#out + 1] = redis.call('HGET', KEYS[k], f)
  end
end
return out
"#,
    )
});

/// Most labels whose value states one script call reads.
const LABELS_PER_CALL: usize = 64;

/// Most cosignatures of one epoch read back.
const MAX_COSIGNATURES: usize = 1024;

/// The key directories kept in Redis, on the connection (one server, Sentinel or Cluster),
/// key prefix and durability settings of a [`RedisStore`] ([`RedisStore::directory`]).
///
/// Every command runs as a task on the runtime that made this value: the key directory calls
/// the store from a thread and runtime of its own (`kst_core::transparency::log`), and the
/// connection's background tasks belong to the runtime that opened it.
#[derive(Clone)]
pub struct RedisDirectoryStore {
    store: RedisStore,
    runtime: Option<tokio::runtime::Handle>,
    /// Per domain, the newest epoch this store saw `min_replicas` replicas hold (see
    /// [`settle`]); shared by the clones.
    settled: Arc<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for RedisDirectoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDirectoryStore")
            .field("prefix", &self.store.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The key directories kept next to this store's keys (same connection, prefix, durability
    /// guard and `min_replicas`). Call it within the Tokio runtime the store's connection
    /// belongs to: the directory's commands run on it.
    pub fn directory(&self) -> RedisDirectoryStore {
        RedisDirectoryStore {
            store: self.clone(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            settled: Arc::default(),
        }
    }
}

/// The keys of one domain's directory.
struct DomainKeys {
    root: String,
    nodes: String,
    /// Prefix of the value-state hashes; the label's hex follows.
    values: String,
    /// Hash: epoch → signed head.
    heads: String,
    /// Prefix of the cosignature hashes (witness key → cosignature); the epoch follows.
    cosig: String,
    /// Hash: witness key → the newest epoch it cosigned.
    witnesses: String,
    /// A string written by a read before `WAIT` ([`settle`]): its value is nothing.
    barrier: String,
    /// Prefix of the check-time hashes (witness key → checked at); the epoch follows.
    cosig_at: String,
}

impl DomainKeys {
    /// The keys of `domain` (a normalized name: no brace can end the hash tag early).
    fn new(prefix: &str, domain: &str) -> Result<Self, DirectoryStoreError> {
        check_domain(domain)?;
        Ok(DomainKeys {
            root: format!("{prefix}{{kt:{domain}}}:root"),
            nodes: format!("{prefix}{{kt:{domain}}}:nodes"),
            values: format!("{prefix}{{kt:{domain}}}:v:"),
            heads: format!("{prefix}{{kt:{domain}}}:heads"),
            cosig: format!("{prefix}{{kt:{domain}}}:cosig:"),
            witnesses: format!("{prefix}{{kt:{domain}}}:witnesses"),
            barrier: format!("{prefix}{{kt:{domain}}}:barrier"),
            cosig_at: format!("{prefix}{{kt:{domain}}}:cosig-at:"),
        })
    }

    fn values_of(&self, label: &[u8]) -> String {
        format!("{}{}", self.values, hex::encode(label))
    }

    fn cosignatures_of(&self, epoch: u64) -> String {
        format!("{}{epoch}", self.cosig)
    }

    /// Hash: witness key → when its cosignature of `epoch` was checked.
    fn checked_at_of(&self, epoch: u64) -> String {
        format!("{}{epoch}", self.cosig_at)
    }
}

fn corrupt(what: impl std::fmt::Display) -> DirectoryStoreError {
    DirectoryStoreError::Corrupt(format!("redis: {what}"))
}

/// A script's answer: its status word and the values after it.
fn answer(v: Value) -> Result<(String, Vec<Value>), DirectoryStoreError> {
    let Value::Array(mut items) = v else {
        return Err(corrupt(format!("a directory script answered {v:?}")));
    };
    if items.is_empty() {
        return Err(corrupt("a directory script answered nothing"));
    }
    let status: String = redis::from_redis_value(items.remove(0)).map_err(corrupt)?;
    if status == "corrupt" {
        let what: String = items
            .into_iter()
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or_default();
        return Err(corrupt(what));
    }
    Ok((status, items))
}

/// A hash field and its value, as a read script returns them.
type Field = (Vec<u8>, Vec<u8>);

/// The (field, value) pairs of a `{'ok', field, value, ...}` answer.
fn pairs(v: Value) -> Result<Vec<Field>, DirectoryStoreError> {
    let (status, items) = answer(v)?;
    if status != "ok" || items.len() % 2 != 0 {
        return Err(corrupt(format!("a read answered {status}")));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let (Some(f), Some(v)) = (items.next(), items.next()) {
        out.push((bytes(f)?, bytes(v)?));
    }
    Ok(out)
}

fn witness_key(bytes: &[u8]) -> Result<[u8; 32], DirectoryStoreError> {
    bytes
        .try_into()
        .map_err(|_| corrupt(format!("a witness key of {} bytes is stored", bytes.len())))
}

fn bytes(v: Value) -> Result<Vec<u8>, DirectoryStoreError> {
    redis::from_redis_value(v).map_err(corrupt)
}

fn epoch(v: Value) -> Result<u64, DirectoryStoreError> {
    parse_epoch(&bytes(v)?)
}

fn parse_epoch(text: &[u8]) -> Result<u64, DirectoryStoreError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| corrupt(format!("stored epoch {text:?} is not a number")))
}

impl RedisDirectoryStore {
    /// Runs `f` with the store on the runtime that made this value.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, DirectoryStoreError>
    where
        T: Send + 'static,
        F: FnOnce(RedisStore) -> Fut,
        Fut: std::future::Future<Output = Result<T, DirectoryStoreError>> + Send + 'static,
    {
        on_runtime(self.runtime.as_ref(), f(self.store.clone())).await
    }
}

#[async_trait]
impl DirectoryStore for RedisDirectoryStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        let (settled, domain) = (Arc::clone(&self.settled), domain.to_string());
        self.run(|store| async move {
            let mut call = READ_ROOT.prepare_invoke();
            call.key(&keys.root).arg(MAX_BLOB);
            let v: Value = store
                .invoke(&call, false)
                .await
                .map_err(DirectoryStoreError::from)?;
            let (status, mut items) = answer(v)?;
            match status.as_str() {
                "none" => Ok(None),
                "ok" if items.len() == 2 => {
                    let record = bytes(items.pop().unwrap_or(Value::Nil))?;
                    let e = epoch(items.pop().unwrap_or(Value::Nil))?;
                    settle(&store, &keys, &settled, &domain, e).await?;
                    Ok(Some((e, record)))
                }
                _ => Err(corrupt(format!("the root read answered {status}"))),
            }
        })
        .await
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        let domain_keys = DomainKeys::new(&self.store.prefix, domain)?;
        let wanted = keys.to_vec();
        self.run(|store| async move {
            let mut out = Vec::with_capacity(wanted.len());
            for chunk in wanted.chunks(FIELDS_PER_CALL) {
                let mut call = READ_FIELDS.prepare_invoke();
                call.key(&domain_keys.nodes).arg(MAX_BLOB);
                for k in chunk {
                    call.arg(k.as_slice());
                }
                let v: Value = store
                    .invoke(&call, false)
                    .await
                    .map_err(DirectoryStoreError::from)?;
                out.extend(pairs(v)?.into_iter().map(|(_, record)| record));
            }
            Ok(out)
        })
        .await
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let key = DomainKeys::new(&self.store.prefix, domain)?.values_of(label);
        self.run(|store| async move {
            let mut call = READ_ALL.prepare_invoke();
            call.key(&key).arg(MAX_BLOB).arg(MAX_VALUE_STATES);
            let v: Value = store
                .invoke(&call, false)
                .await
                .map_err(DirectoryStoreError::from)?;
            pairs(v)?
                .into_iter()
                .map(|(e, record)| Ok((parse_epoch(&e)?, record)))
                .collect()
        })
        .await
    }

    async fn value_states_batch(
        &self,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
        let domain_keys = DomainKeys::new(&self.store.prefix, domain)?;
        let labels = labels.to_vec();
        self.run(|store| async move {
            let mut out = Vec::new();
            for chunk in labels.chunks(LABELS_PER_CALL) {
                let mut call = READ_ALL_OF.prepare_invoke();
                for label in chunk {
                    call.key(domain_keys.values_of(label));
                }
                call.arg(MAX_BLOB).arg(MAX_VALUE_STATES);
                let v: Value = store
                    .invoke(&call, false)
                    .await
                    .map_err(DirectoryStoreError::from)?;
                let (status, items) = answer(v)?;
                if status != "ok" || items.len() % 3 != 0 {
                    return Err(corrupt(format!("a value state read answered {status}")));
                }
                let mut items = items.into_iter();
                while let (Some(k), Some(e), Some(record)) =
                    (items.next(), items.next(), items.next())
                {
                    let label = std::str::from_utf8(&bytes(k)?)
                        .ok()
                        .and_then(|k| k.parse::<usize>().ok())
                        .and_then(|k| chunk.get(k.checked_sub(1)?))
                        .ok_or_else(|| corrupt("a value state read named no label asked for"))?
                        .clone();
                    out.push((label, parse_epoch(&bytes(e)?)?, bytes(record)?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        self.run(|store| commit(store, keys, batch)).await
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        let head = head.to_vec();
        self.run(move |store| insert_head(store, keys, epoch, head))
            .await
    }

    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        if to < from {
            return Ok(Vec::new());
        }
        let (settled, domain) = (Arc::clone(&self.settled), domain.to_string());
        self.run(move |store| async move {
            let mut out = Vec::new();
            let mut start = from;
            loop {
                let end = start.saturating_add(FIELDS_PER_CALL as u64 - 1).min(to);
                let mut call = READ_FIELDS.prepare_invoke();
                call.key(&keys.heads).arg(MAX_BLOB);
                for e in start..=end {
                    call.arg(e);
                }
                let v: Value = store
                    .invoke(&call, false)
                    .await
                    .map_err(DirectoryStoreError::from)?;
                for (e, head) in pairs(v)? {
                    out.push((parse_epoch(&e)?, head));
                }
                if end >= to {
                    break;
                }
                start = end + 1;
            }
            out.sort_by_key(|(e, _)| *e);
            if let Some((newest, _)) = out.last() {
                settle(&store, &keys, &settled, &domain, *newest).await?;
            }
            Ok(out)
        })
        .await
    }

    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> Result<(), DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        let (witness, cosignature) = (witness.to_vec(), cosignature.to_vec());
        self.run(move |store| put_cosignature(store, keys, epoch, witness, checked_at, cosignature))
            .await
    }

    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        self.run(move |store| async move {
            let mut call = READ_ALL.prepare_invoke();
            call.key(keys.cosignatures_of(epoch))
                .arg(MAX_BLOB)
                .arg(MAX_COSIGNATURES);
            let v: Value = store
                .invoke(&call, false)
                .await
                .map_err(DirectoryStoreError::from)?;
            pairs(v)?
                .into_iter()
                .map(|(w, c)| Ok((witness_key(&w)?, c)))
                .collect()
        })
        .await
    }

    async fn latest_cosignature(
        &self,
        domain: &str,
        witness: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let keys = DomainKeys::new(&self.store.prefix, domain)?;
        let witness = witness.to_vec();
        self.run(move |store| async move {
            let mut call = READ_FIELDS.prepare_invoke();
            call.key(&keys.witnesses)
                .arg(MAX_BLOB)
                .arg(witness.as_slice());
            let v: Value = store
                .invoke(&call, false)
                .await
                .map_err(DirectoryStoreError::from)?;
            let Some((_, newest)) = pairs(v)?.into_iter().next() else {
                return Ok(None);
            };
            let newest = parse_epoch(&newest)?;
            let mut call = READ_FIELDS.prepare_invoke();
            call.key(keys.cosignatures_of(newest))
                .arg(MAX_BLOB)
                .arg(witness.as_slice());
            let v: Value = store
                .invoke(&call, false)
                .await
                .map_err(DirectoryStoreError::from)?;
            match pairs(v)?.into_iter().next() {
                Some((_, c)) => Ok(Some((newest, c))),
                None => Err(corrupt(format!(
                    "the witness's newest epoch {newest} has no cosignature of it"
                ))),
            }
        })
        .await
    }
}

/// With `[store] min_replicas`, an epoch read (a root, a head) newer than the newest seen
/// settled for the domain is served only once `min_replicas` replicas hold everything the
/// primary had written: a write on the domain's slot (`barrier`) and `WAIT` on a lane, so the
/// replicas' acknowledgement covers the replication stream up to the read (Redis replicates
/// in order). Without it, a commit read on the primary in the instant before the primary dies
/// unreplicated would be served, and the promoted replica would commit that epoch again with
/// other contents: two heads for one epoch (a fork). Fewer replicas within the `WAIT` bound:
/// a temporary failure (503). Without `min_replicas`: nothing (replication is asynchronous
/// and kst promises nothing across a failover then).
async fn settle(
    store: &RedisStore,
    keys: &DomainKeys,
    settled: &Mutex<HashMap<String, u64>>,
    domain: &str,
    epoch: u64,
) -> Result<(), DirectoryStoreError> {
    if store.min_replicas == 0 {
        return Ok(());
    }
    let known = settled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(domain)
        .copied();
    if known.is_some_and(|k| k >= epoch) {
        return Ok(());
    }
    let lane = store.lane();
    let _: Value = lane
        .query(redis::cmd("SET").arg(&keys.barrier).arg(epoch), true)
        .await
        .map_err(DirectoryStoreError::from)?;
    lane.wait_for_replicas(
        &keys.root,
        &format!("the directory's epoch {epoch} (as read)"),
    )
    .await
    .map_err(DirectoryStoreError::from)?;
    let mut settled = settled.lock().unwrap_or_else(|e| e.into_inner());
    let k = settled.entry(domain.to_string()).or_insert(epoch);
    *k = (*k).max(epoch);
    Ok(())
}

/// [`DirectoryStore::insert_head`]: the durability guard, one script (`HSETNX`, then the
/// stored head), the replicas' acknowledgement.
async fn insert_head(
    store: RedisStore,
    keys: DomainKeys,
    epoch: u64,
    head: Vec<u8>,
) -> Result<Vec<u8>, DirectoryStoreError> {
    store.guard.ensure(&store).await?;
    let store = store.lane();
    let mut call = INSERT_HEAD.prepare_invoke();
    call.key(&keys.heads).arg(epoch).arg(head).arg(MAX_BLOB);
    let v: Value = store.invoke(&call, true).await?;
    let (status, mut items) = answer(v)?;
    if status != "ok" || items.len() != 1 {
        return Err(corrupt(format!("the head insert answered {status}")));
    }
    let stored = bytes(items.pop().unwrap_or(Value::Nil))?;
    store
        .wait_for_replicas(&keys.heads, &format!("the head of epoch {epoch}"))
        .await?;
    Ok(stored)
}

/// [`DirectoryStore::put_cosignature`]: the durability guard and one script.
async fn put_cosignature(
    store: RedisStore,
    keys: DomainKeys,
    epoch: u64,
    witness: Vec<u8>,
    checked_at: u64,
    cosignature: Vec<u8>,
) -> Result<(), DirectoryStoreError> {
    store.guard.ensure(&store).await?;
    let mut call = PUT_COSIGNATURE.prepare_invoke();
    call.key(keys.cosignatures_of(epoch))
        .key(&keys.witnesses)
        .key(keys.checked_at_of(epoch))
        .arg(witness)
        .arg(cosignature)
        .arg(epoch)
        .arg(checked_at);
    let v: Value = store.invoke(&call, true).await?;
    answer(v).map(|_| ())
}

/// [`DirectoryStore::commit`]: the durability guard, the one script, then the replicas'
/// acknowledgement when `min_replicas` asks for it.
async fn commit(
    store: RedisStore,
    keys: DomainKeys,
    batch: RecordBatch,
) -> Result<(), DirectoryStoreError> {
    store
        .guard
        .ensure(&store)
        .await
        .map_err(DirectoryStoreError::from)?;
    let store = store.lane();
    let mut call = COMMIT.prepare_invoke();
    call.key(&keys.root).key(&keys.nodes).key(&keys.heads);
    let (mode, expected, epoch, root) = match &batch.root {
        None => ("nodes", String::new(), String::new(), Vec::new()),
        Some(r) => match r.expected_epoch {
            None => ("first", String::new(), r.epoch.to_string(), r.blob.clone()),
            Some(e) => ("next", e.to_string(), r.epoch.to_string(), r.blob.clone()),
        },
    };
    call.arg(mode)
        .arg(&expected)
        .arg(&epoch)
        .arg(root)
        .arg(batch.head.as_deref().unwrap_or_default())
        .arg(batch.nodes.len());
    for (key, record) in &batch.nodes {
        call.arg(key.as_slice()).arg(record.as_slice());
    }
    // One hash per label; KEYS[1] to [3] are the root, the nodes and the heads.
    let mut labels: Vec<&[u8]> = Vec::new();
    for v in &batch.value_states {
        let index = match labels.iter().position(|l| *l == v.label.as_slice()) {
            Some(i) => i,
            None => {
                call.key(keys.values_of(&v.label));
                labels.push(&v.label);
                labels.len() - 1
            }
        };
        call.arg(index + 4).arg(v.epoch).arg(v.blob.as_slice());
    }
    let v: Value = store
        .invoke(&call, true)
        .await
        .map_err(DirectoryStoreError::from)?;
    let (status, items) = answer(v)?;
    match status.as_str() {
        "ok" => {}
        "dropped" => return Ok(()),
        "conflict" => {
            let stored = items
                .into_iter()
                .next()
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "none".into());
            return Err(DirectoryStoreError::Conflict(format!(
                "the batch for epoch {epoch} was built on epoch {expected}, the stored root is \
                 at {stored}"
            )));
        }
        other => return Err(corrupt(format!("the commit answered {other}"))),
    }
    if batch.root.is_some() {
        store
            .wait_for_replicas(&keys.root, &format!("the directory's epoch {epoch}"))
            .await
            .map_err(DirectoryStoreError::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DomainKeys;

    #[test]
    fn a_domain_is_one_hash_tag_and_odd_names_are_refused() {
        let k = DomainKeys::new("p:", "example.net").unwrap();
        assert_eq!(k.root, "p:{kt:example.net}:root");
        assert_eq!(k.values_of(b"ab"), "p:{kt:example.net}:v:6162");
        for key in [&k.root, &k.nodes, &k.values_of(b"x")] {
            assert_eq!(
                crate::conn::slot(key.as_bytes()),
                crate::conn::slot(b"kt:example.net")
            );
        }
        for bad in ["", "Example.net", "a}b", "a{b", ".x", "a b"] {
            assert!(DomainKeys::new("p:", bad).is_err(), "{bad:?}");
        }
    }
}
