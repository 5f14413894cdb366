//! [`RedisStore`]: the [`KeyStore`] on Redis, each change one Lua script.

use async_trait::async_trait;
use kst_core::key_index::scan;
use kst_core::store::{TimeoutStore, validate_history};
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, Error, Fingerprint, KeyId, KeyRecord, KeyStore, NewKey, PublishOutcome, Result,
};
use redis::aio::ConnectionManager;

use crate::builder::RedisStoreBuilder;
use crate::error::{COMPONENT, corrupt, redis};
use crate::keys::{AddressKeys, index_key, tombstone_key};
use crate::scripts;

/// How often a publication is tried again when its tombstone changed under it.
const TOMBSTONE_RETRIES: usize = 16;

/// Largest version this store keeps: Lua numbers are doubles, exact up to 2^53.
pub const MAX_VERSION: u64 = (1 << 53) - 2;

/// A [`KeyStore`] on Redis, shared by every KST instance of a pool.
///
/// The builder hands it out wrapped in a [`TimeoutStore`] (the operation timeout); its own
/// methods are not bounded by it. Cheap to clone (one multiplexed connection, re-established by itself). See the crate
/// documentation for the key layout.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` with keys under `prefix` (e.g. [`crate::DEFAULT_PREFIX`]) and the
    /// default timeouts; every operation of the store returned is bounded by the operation
    /// timeout.
    pub async fn connect(url: &str, prefix: &str) -> Result<TimeoutStore<Self>> {
        RedisStoreBuilder::new(url).prefix(prefix).connect().await
    }

    /// A builder for prefix and timeouts.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    pub(crate) fn new(conn: ConnectionManager, prefix: String) -> Self {
        RedisStore { conn, prefix }
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sends `cmd`, once more if the first try failed on a connection the manager had already
    /// lost (see [`worth_retrying`]).
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, writes: bool) -> Result<T> {
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if worth_retrying(&e, writes) => cmd.query_async(&mut conn).await,
            r => r,
        }
        .map_err(redis)
    }

    /// Runs a script, with the same retry as [`Self::query`].
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
        writes: bool,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        match script.invoke_async(&mut conn).await {
            Err(e) if worth_retrying(&e, writes) => script.invoke_async(&mut conn).await,
            r => r,
        }
        .map_err(redis)
    }

    /// Runs a writing script (for the rate limiter).
    pub(crate) async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.invoke(script, true).await
    }

    fn keys(&self, address: &Address) -> AddressKeys {
        AddressKeys::new(&self.prefix, address)
    }

    async fn publish_inner(&self, key: NewKey) -> Result<PublishOutcome> {
        let address = key.address.clone();
        let k = self.keys(&address);
        let tombstone_key = tombstone_key(&self.prefix, &key.fingerprint);
        // Optimistic: read the tombstone, merge, and let the script write only if the tombstone
        // is still what was read (else merge again with the new one).
        for _ in 0..TOMBSTONE_RETRIES {
            let stored: Option<Vec<u8>> = self
                .query(redis::cmd("GET").arg(&tombstone_key), false)
                .await?;
            let (merged, tombstone) =
                kst_core::revocation::apply_tombstone(key.clone(), stored.as_deref())?;
            let publication_id = merged.publication_id.clone();
            let (key_b64, body) = body_without_version(merged.into_record(0))?;
            let mut invocation = scripts::PUBLISH.prepare_invoke();
            invocation
                .key(&k.cur)
                .key(&k.ver)
                .key(&k.hist)
                .key(&k.pubs)
                .key(index_key(&self.prefix))
                .key(&tombstone_key)
                .arg(address.as_str())
                .arg(&publication_id)
                .arg(&key_b64)
                .arg(&body)
                .arg(if stored.is_some() { "1" } else { "0" })
                .arg(stored.unwrap_or_default())
                .arg(tombstone.unwrap_or_default())
                .arg(match key.expected {
                    kst_core::Expected::Any => String::new(),
                    kst_core::Expected::Nothing => "0".to_string(),
                    // Versions start at 1: version 0 is never current ("-" matches nothing).
                    kst_core::Expected::Version(v) if v > 0 => v.to_string(),
                    kst_core::Expected::Version(_) => "-".to_string(),
                });
            let reply: Vec<Vec<u8>> = self.invoke(&invocation, true).await?;
            let [status, payload] = <[Vec<u8>; 2]>::try_from(reply)
                .map_err(|r| corrupt(format!("publish script answered {} values", r.len())))?;
            return match status.as_slice() {
                b"retry" => continue,
                b"published" => Ok(PublishOutcome::Published(parse(&address, &payload)?)),
                b"unchanged" => Ok(PublishOutcome::Unchanged(parse(&address, &payload)?)),
                b"conflict" => {
                    let current = String::from_utf8_lossy(&payload).parse::<u64>().ok();
                    Err(key.expected.conflict(&address, current.filter(|&v| v > 0)))
                }
                b"corrupt" => Err(corrupt(format!(
                    "{address}: {}",
                    String::from_utf8_lossy(&payload)
                ))),
                other => Err(corrupt(format!(
                    "publish script answered {:?}",
                    String::from_utf8_lossy(other)
                ))),
            };
        }
        Err(Error::unavailable(
            COMPONENT,
            format!(
                "the tombstone of {} kept changing during {TOMBSTONE_RETRIES} attempts to \
                 publish for {address}; try again",
                key.fingerprint
            ),
        ))
    }

    async fn get_inner(&self, address: &Address) -> Result<Option<KeyRecord>> {
        let json: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(&self.keys(address).cur), false)
            .await?;
        json.map(|j| parse(address, &j)).transpose()
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

    async fn list_inner(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_string(),
        };
        let mut cmd = redis::cmd("ZRANGEBYLEX");
        cmd.arg(index_key(&self.prefix))
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(isize::try_from(limit).unwrap_or(isize::MAX));
        let members: Vec<Vec<u8>> = self.query(&cmd, false).await?;
        members
            .iter()
            .map(|m| {
                std::str::from_utf8(m)
                    .ok()
                    .and_then(|s| Address::from_normalized(s).ok())
                    .ok_or_else(|| {
                        corrupt(format!(
                            "index member {:?} is not an address",
                            String::from_utf8_lossy(m)
                        ))
                    })
            })
            .collect()
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
        let mut invocation = scripts::RESTORE.prepare_invoke();
        invocation
            .key(&k.cur)
            .key(&k.ver)
            .key(&k.hist)
            .key(&k.pubs)
            .key(index_key(&self.prefix))
            .arg(address.as_str());
        for r in history {
            let json = serde_json::to_string(r)
                .map_err(|e| Error::Invalid(format!("record of {address}: {e}")))?;
            invocation
                .arg(r.version.to_string())
                .arg(&r.publication_id)
                .arg(json);
        }
        let _: i64 = self.invoke(&invocation, true).await?;
        Ok(())
    }

    async fn delete_inner(&self, address: &Address) -> Result<bool> {
        let k = self.keys(address);
        let mut invocation = scripts::DELETE.prepare_invoke();
        invocation
            .key(&k.cur)
            .key(&k.ver)
            .key(&k.hist)
            .key(&k.pubs)
            .key(index_key(&self.prefix))
            .arg(address.as_str());
        let removed: i64 = self.invoke(&invocation, true).await?;
        Ok(removed > 0)
    }

    async fn check_inner(&self) -> Result<()> {
        let role: redis::Value = self.query(&redis::cmd("ROLE"), false).await?;
        let first = match &role {
            redis::Value::Array(items) => items.first(),
            _ => None,
        };
        let is_master = match first {
            Some(redis::Value::BulkString(b)) => b.as_slice() == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        };
        if is_master {
            Ok(())
        } else {
            Err(Error::unavailable(
                COMPONENT,
                "connected to a replica, not the primary",
            ))
        }
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

/// Parses a stored record of `address`.
fn parse(address: &Address, json: &[u8]) -> Result<KeyRecord> {
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
        self.publish_inner(key).await
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.get_inner(address).await
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
        self.delete_inner(address).await
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.list_inner(after, limit).await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.restore_inner(history).await
    }

    /// Interim: a scan of every address until the index lands.
    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        scan(self, limit, |e| e.has_fingerprint(fingerprint)).await
    }

    /// Interim: a scan of every address until the index lands.
    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        scan(self, limit, |e| e.has_key_id(key_id)).await
    }

    /// Interim: a scan of every address until the index lands.
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        Ok(scan(self, 1, |e| e.has_wkd_hash(domain, hash)).await?.pop())
    }

    async fn check(&self) -> Result<()> {
        self.check_inner().await
    }
}
