//! [`PostgresStore`]: the [`KeyStore`] on PostgreSQL, one transaction per change.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use kst_core::key_index::{IndexEntries, scan};
use kst_core::store::{MAX_GET_MANY, TimeoutStore, validate_history};
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, Error, Fingerprint, KeyId, KeyRecord, KeyStore, NewKey, PublishOutcome, Result,
};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, Row};

use crate::builder::PostgresStoreBuilder;
use crate::cluster::{Cluster, ConnFuture};
use crate::error::{COMPONENT, corrupt, db};
use crate::index::{self, Kind};
use crate::row::{self, to_bigint, to_int};

/// The embedded schema migrations (`kst-postgres/migrations`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Name of the table that records applied migrations (kept apart from other sqlx users of the
/// same database).
pub const MIGRATIONS_TABLE: &str = "kst_schema_migrations";

/// A [`KeyStore`] on PostgreSQL, shared by every KST instance of a pool.
///
/// The builder hands it out wrapped in a [`TimeoutStore`] (the operation timeout); its own
/// methods are not bounded by it. Cheap to clone (the connection pool is shared). See the crate documentation for the schema.
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) cluster: Arc<Cluster>,
    /// Set once `kst_key_index_state.built` was seen true (it never turns false again).
    index_built: Arc<AtomicBool>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` with the default settings and applies the schema migrations; every
    /// operation of the store returned is bounded by the default operation timeout.
    pub async fn connect(url: &str) -> Result<TimeoutStore<Self>> {
        PostgresStoreBuilder::new(url).connect().await
    }

    /// A builder for pool size, timeouts and the migration policy.
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(url)
    }

    pub(crate) fn from_cluster(cluster: Cluster) -> Self {
        PostgresStore {
            cluster: Arc::new(cluster),
            index_built: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Applies the embedded schema migrations that are not applied yet (for `kst migrate`).
    ///
    /// Safe to run from several instances at once (sqlx holds an advisory lock). Migrations that
    /// a newer release already applied are tolerated, so older instances keep running during a
    /// rolling upgrade.
    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate::Migrator {
            migrations: MIGRATOR.migrations.clone(),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.set_ignore_missing(true);
        // Migrations can take longer than ordinary operations: bounded by the acquire timeout
        // for the connection, not by the operation timeout. On the host that accepts writes.
        let pool = self.cluster.writer().await?.host.pool;
        migrator.run(&pool).await.map_err(crate::error::migrate)
    }

    /// The connection pool of the first listed host (with one host: the store's only pool),
    /// for operational tooling and tests.
    pub fn pool(&self) -> &PgPool {
        self.cluster.first_pool()
    }

    /// The pool of the host that accepts writes now (probing the hosts if needed).
    pub async fn primary_pool(&self) -> Result<PgPool> {
        Ok(self.cluster.writer().await?.host.pool)
    }

    /// Closes every connection; later operations fail.
    pub async fn close(&self) {
        self.cluster.close().await;
    }

    /// Finds the host that accepts writes (the builder, within the operation timeout, on
    /// connecting).
    pub(crate) async fn check_reachable(&self) -> Result<()> {
        self.cluster.writer().await.map(|_| ())
    }

    /// Runs a write on the primary (see [`Cluster::write`]).
    pub(crate) async fn write<T, F>(&self, confirm: bool, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> ConnFuture<'c, T>,
    {
        self.cluster.write(confirm, f).await
    }

    /// The primary's pool for a read that must see every confirmed write.
    async fn fresh(&self) -> Result<PgPool> {
        self.primary_pool().await
    }

    async fn publish_inner(&self, key: NewKey) -> Result<PublishOutcome> {
        self.write(true, |conn| {
            Box::pin(publish_on(conn, key, Commit::Synchronous))
        })
        .await
    }

    /// [`KeyStore::publish_unsynced`]: the transaction commits with `synchronous_commit =
    /// off` (it waits for no WAL flush): the caller's next synchronous commit on this server
    /// covers it (PostgreSQL writes and flushes its WAL in order). **Not on a host set up for
    /// synchronous replication**: there the publication commits and is confirmed as
    /// [`KeyStore::publish`] does. In a failover window the key store and the directory
    /// (pools and host choices of their own) can write to two hosts for a moment; a
    /// synchronous key commit on the old primary then never returns confirmed (its standby
    /// is gone), but an unsynced one would, and the epoch confirmed on the new primary would
    /// confirm a key only the old primary holds.
    async fn publish_unsynced_inner(&self, key: NewKey) -> Result<PublishOutcome> {
        self.cluster
            .write_on(true, |conn, replicated| {
                let commit = match replicated {
                    true => Commit::Synchronous,
                    false => Commit::Unsynced,
                };
                Box::pin(publish_on(conn, key, commit))
            })
            .await
    }

    /// [`KeyStore::sync_published`]: one synchronous transaction that writes WAL (a
    /// transaction that writes none, or has no transaction id, commits without a flush): it
    /// rewrites the one row of `kst_key_index_state` as it is (were the row missing, it is
    /// written saying the index is not known complete, which only makes look-ups scan until
    /// `rebuild_index`). Its commit flushes the WAL up
    /// to its own record, so every commit before it is durable, and waits for (and is
    /// confirmed on) a synchronous standby when the server has one, which then holds them
    /// too.
    async fn sync_published_inner(&self) -> Result<()> {
        self.write(true, |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO kst_key_index_state (one, built) VALUES (true, false) \
                     ON CONFLICT (one) DO UPDATE SET built = kst_key_index_state.built",
                )
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn get_inner(&self, address: &Address) -> Result<Option<KeyRecord>> {
        let pool = self.fresh().await?;
        get_on(&pool, address).await
    }
}

/// How a publication's transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// As the server is set up (`synchronous_commit`): durable when it returns.
    Synchronous,
    /// `synchronous_commit = off` for this transaction only ([`KeyStore::publish_unsynced`]):
    /// visible when it returns, durable once a later synchronous commit on the server is.
    Unsynced,
}

/// `BEGIN` and `synchronous_commit = off` for the transaction alone, in one round trip
/// (a simple query of two statements; `SET LOCAL` ends with the transaction).
const BEGIN_UNSYNCED: &str = "BEGIN; SET LOCAL synchronous_commit TO off";

/// One publication, in one transaction on `conn`.
async fn publish_on(
    conn: &mut PgConnection,
    key: NewKey,
    commit: Commit,
) -> Result<PublishOutcome> {
    {
        let published_at = to_bigint("published_at", key.published_at)?;
        let mut tx = match commit {
            Commit::Synchronous => sqlx::Connection::begin(&mut *conn).await,
            Commit::Unsynced => sqlx::Connection::begin_with(&mut *conn, BEGIN_UNSYNCED).await,
        }
        .map_err(db)?;
        let key = apply_tombstone(&mut tx, key).await?;
        let address = key.address.as_str();
        let current = lock_or_create(&mut tx, address).await?;
        let version = match current {
            None => {
                if deleted_since(&mut tx, address, &key.publication_id).await? {
                    tx.rollback().await.map_err(db)?;
                    return Err(Error::deleted_since(&key));
                }
                1
            }
            Some(current) => {
                let rows = sqlx::query(
                    "SELECT address, version, key, fingerprint, published_at, publication_id, \
                     revoked, format FROM kst_key_history \
                     WHERE address = $1 AND (version = $2 OR publication_id = $3) ORDER BY version",
                )
                .bind(address)
                .bind(current)
                .bind(&key.publication_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
                let records = rows.iter().map(row::record).collect::<Result<Vec<_>>>()?;
                let unchanged = match records
                    .iter()
                    .find(|r| r.publication_id == key.publication_id)
                {
                    Some(earlier) => Some(earlier.clone()),
                    None => {
                        if deleted_since(&mut tx, address, &key.publication_id).await? {
                            tx.rollback().await.map_err(db)?;
                            return Err(Error::deleted_since(&key));
                        }
                        let cur = records
                            .iter()
                            .find(|r| i64::try_from(r.version) == Ok(current))
                            .ok_or_else(|| {
                                corrupt(format!(
                                    "{address}: current version {current} is missing from the history"
                                ))
                            })?;
                        (cur.key == key.key).then(|| cur.clone())
                    }
                };
                if let Some(record) = unchanged {
                    tx.rollback().await.map_err(db)?;
                    return Ok(PublishOutcome::Unchanged(record));
                }
                let next = current
                    .checked_add(1)
                    .ok_or_else(|| corrupt(format!("{address}: version counter overflow")))?;
                sqlx::query("UPDATE kst_keys SET current_version = $2 WHERE address = $1")
                    .bind(address)
                    .bind(next)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                next
            }
        };
        let found = current.and_then(|v| u64::try_from(v).ok());
        if !key.expected.admits(found) {
            tx.rollback().await.map_err(db)?;
            return Err(key.expected.conflict(&key.address, found));
        }
        insert_history(
            &mut tx,
            address,
            version,
            &key.key,
            key.fingerprint.as_str(),
            published_at,
            &key.publication_id,
            key.revoked,
            to_int("format", kst_core::store::RECORD_FORMAT)?,
        )
        .await?;
        let version = row::to_version(version).ok_or_else(|| corrupt("version out of range"))?;
        let record = key.into_record(version);
        index::write(&mut tx, &[&record]).await?;
        tx.commit().await.map_err(db)?;
        Ok(PublishOutcome::Published(record))
    }
}

/// Prefix of the cursors of the walk over deleted publications: the last address handed out
/// follows it.
const DELETED_CURSOR_PREFIX: &str = "postgres-deleted:";

/// Whether `publication_id` was in a deleted history of `address` (`kst_deleted_publications`),
/// inside the publish transaction (the address row is locked, so a deletion committed before
/// is seen).
async fn deleted_since(tx: &mut PgConnection, address: &str, publication_id: &str) -> Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM kst_deleted_publications \
         WHERE address = $1 AND publication_id = $2)",
    )
    .bind(address)
    .bind(publication_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)
}

/// One deletion, in one transaction on `conn`: locks the address row (publishers of the address
/// wait), remembers the publication ids of its history, then deletes it (the history goes with
/// it, `ON DELETE CASCADE`). Whether there was anything.
async fn delete_on(conn: &mut PgConnection, address: String, now: i64) -> Result<bool> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db)?;
    let locked: Option<i64> =
        sqlx::query_scalar("SELECT current_version FROM kst_keys WHERE address = $1 FOR UPDATE")
            .bind(&address)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    if locked.is_none() {
        tx.rollback().await.map_err(db)?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO kst_deleted_publications (address, publication_id, deleted_at) \
         SELECT address, publication_id, $2 FROM kst_key_history WHERE address = $1 \
         ON CONFLICT (address, publication_id) DO NOTHING",
    )
    .bind(&address)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let done = sqlx::query("DELETE FROM kst_keys WHERE address = $1")
        .bind(&address)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(done.rows_affected() > 0)
}

/// The current record of `address` on `pool`.
async fn get_on(pool: &PgPool, address: &Address) -> Result<Option<KeyRecord>> {
    {
        let row: Option<PgRow> = sqlx::query(
            "SELECT k.current_version, h.version IS NOT NULL AS found, h.address, h.version, \
             h.key, h.fingerprint, h.published_at, h.publication_id, h.revoked, h.format \
             FROM kst_keys k LEFT JOIN kst_key_history h \
             ON h.address = k.address AND h.version = k.current_version \
             WHERE k.address = $1",
        )
        .bind(address.as_str())
        .fetch_optional(pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(None) };
        let found: bool = row.try_get("found").map_err(db)?;
        if !found {
            let current: i64 = row.try_get("current_version").map_err(db)?;
            return Err(corrupt(format!(
                "{address}: current version {current} is missing from the history"
            )));
        }
        let record = row::record(&row)?;
        check_address(address, &record)?;
        Ok(Some(record))
    }
}

/// The current records of `addresses` on `pool`, in the order asked: one statement per
/// [`MAX_GET_MANY`] addresses, each address answered as [`get_on`] answers it.
async fn get_many_on(pool: &PgPool, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
    let mut records: Vec<Option<KeyRecord>> = Vec::with_capacity(addresses.len());
    for chunk in addresses.chunks(MAX_GET_MANY) {
        // Each address once; `first[i]` is the position in `chunk` that answers position `i`.
        let mut at: HashMap<&str, usize> = HashMap::with_capacity(chunk.len());
        let mut names: Vec<&str> = Vec::with_capacity(chunk.len());
        let first: Vec<usize> = chunk
            .iter()
            .enumerate()
            .map(|(i, a)| {
                *at.entry(a.as_str()).or_insert_with(|| {
                    names.push(a.as_str());
                    i
                })
            })
            .collect();
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT k.address AS asked, k.current_version, h.version IS NOT NULL AS found, \
             h.address, h.version, h.key, h.fingerprint, h.published_at, h.publication_id, \
             h.revoked, h.format \
             FROM kst_keys k LEFT JOIN kst_key_history h \
             ON h.address = k.address AND h.version = k.current_version \
             WHERE k.address = ANY($1)",
        )
        .bind(&names)
        .fetch_all(pool)
        .await
        .map_err(db)?;
        let mut found: Vec<Option<KeyRecord>> = vec![None; chunk.len()];
        for row in &rows {
            let asked: String = row.try_get("asked").map_err(db)?;
            let Some(&i) = at.get(asked.as_str()) else {
                return Err(corrupt(format!(
                    "a row of {asked:?} answered a look-up of other addresses"
                )));
            };
            let address = &chunk[i];
            if !row.try_get::<bool, _>("found").map_err(db)? {
                let current: i64 = row.try_get("current_version").map_err(db)?;
                return Err(corrupt(format!(
                    "{address}: current version {current} is missing from the history"
                )));
            }
            let record = row::record(row)?;
            check_address(address, &record)?;
            found[i] = Some(record);
        }
        let base = records.len();
        for (i, &f) in first.iter().enumerate() {
            // A duplicate is answered like its first occurrence, already in `records`.
            let record = match i == f {
                true => found[i].take(),
                false => records[base + f].clone(),
            };
            records.push(record);
        }
    }
    Ok(records)
}

impl PostgresStore {
    async fn history_inner(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        let rows = sqlx::query(
            "SELECT address, version, key, fingerprint, published_at, publication_id, revoked, \
             format FROM kst_key_history WHERE address = $1 ORDER BY version",
        )
        .bind(address.as_str())
        .fetch_all(&self.fresh().await?)
        .await
        .map_err(db)?;
        let records = rows.iter().map(row::record).collect::<Result<Vec<_>>>()?;
        for r in &records {
            check_address(address, r)?;
        }
        Ok(records)
    }

    async fn list_inner(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT address FROM kst_keys \
             WHERE $1::text IS NULL OR address > ($1::text COLLATE \"C\") \
             ORDER BY address LIMIT $2",
        )
        .bind(after.map(Address::as_str))
        .bind(limit)
        .fetch_all(&self.fresh().await?)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|a| {
                Address::from_normalized(a)
                    .map_err(|e| corrupt(format!("stored address {a:?}: {e}")))
            })
            .collect()
    }

    async fn restore_inner(&self, history: &[KeyRecord]) -> Result<()> {
        validate_history(history)?;
        let rows = history
            .iter()
            .map(|r| {
                Ok((
                    r,
                    to_bigint("version", r.version)?,
                    to_bigint("published_at", r.published_at)?,
                    to_int("format", r.format)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Err(Error::Invalid("restore needs at least one record".into()));
        }
        let rows: Vec<(KeyRecord, i64, i64, i32)> = rows
            .into_iter()
            .map(|(r, v, p, f)| (r.clone(), v, p, f))
            .collect();
        self.write(true, |conn| Box::pin(restore_on(conn, rows)))
            .await
    }
}

/// Replaces the history of one address (validated, converted rows, at least one) on `conn`.
async fn restore_on(conn: &mut PgConnection, rows: Vec<(KeyRecord, i64, i64, i32)>) -> Result<()> {
    {
        let Some((last, current, _, _)) = rows.last() else {
            return Err(Error::Invalid("restore needs at least one record".into()));
        };
        let current = *current;
        let address = last.address.as_str();
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db)?;
        // Locks (or creates) the address row first, so concurrent publishers wait for us.
        sqlx::query(
            "INSERT INTO kst_keys (address, current_version) VALUES ($1, $2) \
             ON CONFLICT (address) DO UPDATE SET current_version = EXCLUDED.current_version",
        )
        .bind(address)
        .bind(current)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("DELETE FROM kst_key_history WHERE address = $1")
            .bind(address)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        for (r, version, published_at, format) in &rows {
            insert_history(
                &mut tx,
                address,
                *version,
                &r.key,
                r.fingerprint.as_str(),
                *published_at,
                &r.publication_id,
                r.revoked,
                *format,
            )
            .await?;
        }
        index::write(&mut tx, &[last]).await?;
        tx.commit().await.map_err(db)
    }
}

impl PostgresStore {
    /// Look-up through the index once it is built; before that (a store written before the
    /// index migration, until `kst migrate` rebuilt it) through a scan, slow but correct.
    async fn find_inner(
        &self,
        kind: Kind,
        value: &str,
        limit: usize,
        hit: impl Fn(&IndexEntries) -> bool + Send + Sync,
    ) -> Result<Vec<KeyRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if !self.index_built.load(Ordering::Relaxed) {
            if index::is_built(&self.fresh().await?).await? {
                self.index_built.store(true, Ordering::Relaxed);
            } else {
                tracing::warn!(
                    "the look-up index is not built yet: scanning every key (run `kst migrate`)"
                );
                return scan(self, limit, hit).await;
            }
        }
        // Replicas first (a stale answer is safe for these look-ups), the primary last.
        let mut last_error = None;
        for pool in self.cluster.readers().await? {
            match index::find(&pool, kind, value, limit, &hit).await {
                Ok(found) => return Ok(found),
                Err(e) if e.is_temporary() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::unavailable(COMPONENT, "no host to read from")))
    }
}

/// Locks the `kst_keys` row of `address` for this transaction and returns its current version,
/// or creates it (at version 1, locked until commit) and returns `None`.
///
/// One `INSERT ... ON CONFLICT DO UPDATE` does both: unlike a `SELECT ... FOR UPDATE` followed
/// by an insert, it always ends with the row locked, however concurrent deletes and restores
/// interleave. The no-op update is rolled back with the rest when nothing is published.
async fn lock_or_create(tx: &mut PgConnection, address: &str) -> Result<Option<i64>> {
    let row = sqlx::query(
        "INSERT INTO kst_keys (address, current_version) VALUES ($1, 1) \
         ON CONFLICT (address) DO UPDATE SET current_version = kst_keys.current_version \
         RETURNING current_version, (xmax = 0) AS created",
    )
    .bind(address)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let created: bool = row.try_get("created").map_err(db)?;
    if created {
        return Ok(None);
    }
    Ok(Some(row.try_get("current_version").map_err(db)?))
}

#[allow(clippy::too_many_arguments)]
async fn insert_history(
    tx: &mut PgConnection,
    address: &str,
    version: i64,
    key: &[u8],
    fingerprint: &str,
    published_at: i64,
    publication_id: &str,
    revoked: bool,
    format: i32,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO kst_key_history \
         (address, version, key, fingerprint, published_at, publication_id, revoked, format) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(address)
    .bind(version)
    .bind(key)
    .bind(fingerprint)
    .bind(published_at)
    .bind(publication_id)
    .bind(revoked)
    .bind(format)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// A row read for `address` must be of `address`.
fn check_address(address: &Address, record: &KeyRecord) -> Result<()> {
    if &record.address == address {
        Ok(())
    } else {
        Err(corrupt(format!(
            "row of {} returned for {address}",
            record.address
        )))
    }
}

#[async_trait]
impl KeyStore for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.publish_inner(key).await
    }

    async fn publish_unsynced(&self, key: NewKey) -> Result<PublishOutcome> {
        self.publish_unsynced_inner(key).await
    }

    async fn sync_published(&self) -> Result<()> {
        self.sync_published_inner().await
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.get_inner(address).await
    }

    /// One statement (`= ANY($1)`) per [`MAX_GET_MANY`] addresses.
    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        if addresses.is_empty() {
            return Ok(Vec::new());
        }
        let pool = self.fresh().await?;
        get_many_on(&pool, addresses).await
    }

    fn batches_reads(&self) -> bool {
        true
    }

    async fn claim_reminder(&self, claim: &kst_core::reminder::ReminderClaim) -> Result<bool> {
        let now = to_bigint("claimed_at", kst_core::time::unix_now())?;
        let (address, id) = (claim.address.as_str().to_string(), claim.id());
        // Confirmed through the synchronous standby like a publication: a claim lost in a
        // failover would let a second reminder go out.
        self.write(true, |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "INSERT INTO kst_reminder_claims (address, claim, claimed_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (address, claim) DO NOTHING",
                )
                .bind(address)
                .bind(id)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.history_inner(address).await
    }

    /// Also remembers the publication ids of the deleted history (`kst_deleted_publications`,
    /// same transaction), so a redelivery is refused ([`Error::DeletedSince`]).
    async fn delete(&self, address: &Address) -> Result<bool> {
        let address = address.as_str().to_string();
        let now = to_bigint("deleted_at", kst_core::time::unix_now())?;
        self.write(true, |conn| Box::pin(delete_on(conn, address, now)))
            .await
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.list_inner(after, limit).await
    }

    /// Keyset pagination on the primary key (`address`, a B-tree in byte order): each page is
    /// one index range read starting after the cursor's address, so a whole walk reads each
    /// row once. The store's own order is the address order.
    async fn list_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::WalkPage> {
        kst_core::store::list_page_by_address(self, cursor, limit).await
    }

    /// Keyset pagination on `kst_deleted_publications`' primary key (address, publication
    /// id): each page is one index range read after the cursor's address.
    async fn deleted_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::DeletedPage> {
        kst_core::store::check_walk_limit(limit)?;
        let after = cursor
            .map(|c| {
                c.token()
                    .strip_prefix(DELETED_CURSOR_PREFIX)
                    .and_then(|a| Address::from_normalized(a).ok())
                    .ok_or_else(|| Error::Invalid(kst_core::store::bad_cursor(c)))
            })
            .transpose()?;
        let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT address, array_agg(publication_id ORDER BY publication_id) \
             FROM kst_deleted_publications \
             WHERE $1::text IS NULL OR address > ($1::text COLLATE \"C\") \
             GROUP BY address ORDER BY address LIMIT $2",
        )
        .bind(after.as_ref().map(Address::as_str))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.fresh().await?)
        .await
        .map_err(db)?;
        let entries = rows
            .into_iter()
            .map(|(a, publication_ids)| {
                let address = Address::from_normalized(&a).map_err(|e| {
                    corrupt(format!("kst_deleted_publications holds address {a:?}: {e}"))
                })?;
                Ok(kst_core::DeletedPublications {
                    address,
                    publication_ids,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = match entries.last() {
            Some(last) if entries.len() >= limit => Some(kst_core::WalkCursor::new(format!(
                "{DELETED_CURSOR_PREFIX}{}",
                last.address.as_str()
            ))),
            _ => None,
        };
        Ok(kst_core::DeletedPage { entries, next })
    }

    /// One `INSERT ... ON CONFLICT DO NOTHING` of every id, confirmed like a deletion.
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        kst_core::store::check_publication_ids(address, publication_ids)?;
        let now = to_bigint("deleted_at", kst_core::time::unix_now())?;
        let (address, ids) = (address.as_str().to_string(), publication_ids.to_vec());
        self.write(true, |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO kst_deleted_publications (address, publication_id, deleted_at) \
                     SELECT $1, id, $3 FROM unnest($2::text[]) AS id \
                     ON CONFLICT (address, publication_id) DO NOTHING",
                )
                .bind(address)
                .bind(ids)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.restore_inner(history).await
    }

    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        self.find_inner(Kind::Fingerprint, fingerprint.as_str(), limit, |e| {
            e.has_fingerprint(fingerprint)
        })
        .await
    }

    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.find_inner(Kind::KeyId, key_id.as_str(), limit, |e| {
            e.has_key_id(key_id)
        })
        .await
    }

    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        let value = index::wkd_value(domain, hash);
        Ok(self
            .find_inner(Kind::Wkd, &value, 1, |e| e.has_wkd_hash(domain, hash))
            .await?
            .pop())
    }

    /// Rebuilds `kst_key_index` from the current records, 500 addresses per transaction, and
    /// marks it built (see the index migration). Safe while the pool serves.
    async fn rebuild_index(&self) -> Result<u64> {
        let n = index::rebuild(&self.fresh().await?).await?;
        self.index_built.store(true, Ordering::Relaxed);
        Ok(n)
    }

    async fn topology(&self) -> Result<Vec<(String, String)>> {
        Ok(self.cluster.topology().await)
    }

    async fn check(&self) -> Result<()> {
        let row = sqlx::query(
            "SELECT pg_is_in_recovery() AS standby, \
             to_regclass('kst_key_history') IS NOT NULL AS schema",
        )
        .fetch_one(&self.fresh().await?)
        .await
        .map_err(db)?;
        let standby: bool = row.try_get("standby").map_err(db)?;
        let schema: bool = row.try_get("schema").map_err(db)?;
        if standby {
            return Err(Error::unavailable(
                COMPONENT,
                "connected to a read-only standby, not the primary",
            ));
        }
        if !schema {
            return Err(Error::Config(format!(
                "{COMPONENT}: the schema is missing: run `kst migrate`"
            )));
        }
        Ok(())
    }
}

/// Inside the publish transaction: serializes on `key.fingerprint` (a transaction-level
/// advisory lock, taken before the address row lock; nothing takes them in the other order),
/// merges its stored tombstone into `key` and writes the grown tombstone back (see
/// [`kst_core::revocation::apply_tombstone`]).
async fn apply_tombstone(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    key: NewKey,
) -> Result<NewKey> {
    let fingerprint = key.fingerprint.as_str().to_string();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kst-tombstone:' || $1, 0))")
        .bind(&fingerprint)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT revocations FROM kst_tombstones WHERE fingerprint = $1")
            .bind(&fingerprint)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db)?;
    let (key, tombstone) = kst_core::revocation::apply_tombstone(key, stored.as_deref())?;
    if let Some(bytes) = tombstone {
        sqlx::query(
            "INSERT INTO kst_tombstones (fingerprint, revocations) VALUES ($1, $2) \
             ON CONFLICT (fingerprint) DO UPDATE SET revocations = EXCLUDED.revocations",
        )
        .bind(&fingerprint)
        .bind(bytes)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    }
    Ok(key)
}
