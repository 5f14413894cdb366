//! The key directory's records in PostgreSQL (feature `transparency`): kst-postgres's
//! [`DirectoryStore`] (docs/TRANSPARENCY.md).
//!
//! Its tables, created by the migrations (`migrations/20261206000001_kst_key_directory.sql`,
//! `migrations/20261208000002_kst_cosignature_checked_at.sql` adds `kt_cosignatures.checked_at`,
//! `kst migrate` or a store that migrates on connect; `IF NOT EXISTS`, so databases whose
//! tables an earlier release created on first use keep them):
//!
//! ```text
//! kt_roots (domain PK, epoch, record)                 the root record of each domain
//! kt_nodes (domain, key, record, PK (domain, key))    tree nodes
//! kt_values(domain, label, epoch, record, PK (domain, label, epoch))   value states
//! kt_heads (domain, epoch, head, PK (domain, epoch))  the signed head of each epoch
//! kt_cosignatures (domain, epoch, witness, cosignature, checked_at, PK (domain, epoch, witness))
//! ```
//!
//! A head is `INSERT ... ON CONFLICT DO NOTHING` (the first writer's stays), then read back;
//! a cosignature is an upsert; a witness's newest cosignature is found through the index on
//! (domain, witness, epoch).
//!
//! A commit is one transaction whose first statement is the fence: `UPDATE kt_roots ...
//! WHERE domain = $1 AND epoch = $expected` (0 rows: another writer committed first, the
//! transaction is rolled back, `Conflict`), or `INSERT ... ON CONFLICT DO NOTHING` for the
//! epoch-0 root. The row lock it takes serializes the writers of a domain until commit; the
//! batch's nodes and value states are written in the same transaction, so readers see all of
//! an epoch or none of it.
//!
//! The hosts are the key store's ([`PostgresStore::directory`]): writes and reads go to the
//! host that accepts writes now (`[store] url` / `urls`, libpq host lists with
//! `target_session_attrs=read-write`; a replica could lag behind the root it returns), found
//! and followed the way the key store finds it, and a commit is confirmed only once a
//! synchronous standby holds it when the primary is set up for synchronous replication.
//! Nothing is opened before the first call: a directory whose database is down at start fails
//! its calls with [`DirectoryStoreError::Unavailable`] until the database is back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kst_core::transparency::{
    DirectoryStore, DirectoryStoreError, RecordBatch, RootAndNodes, on_runtime,
};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use crate::cluster::Cluster;
use crate::error::COMPONENT;
use crate::store::PostgresStore;

/// Largest record read back (a record is at most a few hundred bytes); a longer one is
/// reported as corrupt instead of being read.
pub const MAX_RECORD: i32 = 64 * 1024;

/// The key directories kept in the database of a [`PostgresStore`].
///
/// Every query runs as a task on the runtime that made this value (the pools' connections
/// belong to its reactor): the key directory calls the store from a thread and runtime of its
/// own (`kst_core::transparency::log`), which end with it.
#[derive(Clone)]
pub struct PgDirectoryStore {
    cluster: Arc<Cluster>,
    runtime: Option<tokio::runtime::Handle>,
    /// Per domain, the newest epoch a synchronous standby was seen to hold (see
    /// [`PgDirectoryStore::read_settled`]); shared by the clones.
    settled: Arc<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for PgDirectoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDirectoryStore")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> DirectoryStoreError {
    DirectoryStoreError::Unavailable(format!("postgres: {e}"))
}

fn epoch_i64(epoch: u64) -> Result<i64, DirectoryStoreError> {
    i64::try_from(epoch).map_err(|_| unavailable(format!("epoch {epoch} out of range")))
}

fn epoch_u64(epoch: i64) -> Result<u64, DirectoryStoreError> {
    u64::try_from(epoch)
        .map_err(|_| DirectoryStoreError::Corrupt(format!("negative epoch {epoch} stored")))
}

/// A stored record, refused when it is longer than [`MAX_RECORD`] (the query reads `NULL`
/// for it instead of the bytes).
fn bounded(record: Option<Vec<u8>>, what: &str) -> Result<Vec<u8>, DirectoryStoreError> {
    record.ok_or_else(|| {
        DirectoryStoreError::Corrupt(format!(
            "postgres: a {what} record is longer than {MAX_RECORD} bytes"
        ))
    })
}

impl PostgresStore {
    /// The key directories kept in this store's database, on its hosts (a pool per host,
    /// shared with this store). Call it within the Tokio runtime the store's pools belong to:
    /// the directory's queries run on it.
    pub fn directory(&self) -> PgDirectoryStore {
        PgDirectoryStore {
            cluster: Arc::clone(&self.cluster),
            runtime: tokio::runtime::Handle::try_current().ok(),
            settled: Arc::default(),
        }
    }
}

impl PgDirectoryStore {
    /// Connects to the database at `url` (which may list several hosts, libpq-style; a pool of
    /// at most `max_connections` per host), applies the schema migrations (which create the
    /// tables), and returns its directories. For tools and tests; `kst` uses
    /// [`PostgresStore::directory`] on the store `[store]` names.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DirectoryStoreError> {
        let store = PostgresStore::builder(url)
            .max_connections(max_connections)
            .connect()
            .await
            .map_err(DirectoryStoreError::from)?;
        Ok(store.inner().directory())
    }

    /// Runs `f` on the runtime that made this value, with the pool of the host that accepts
    /// writes.
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, DirectoryStoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, DirectoryStoreError>> + Send + 'static,
    {
        let cluster = Arc::clone(&self.cluster);
        self.run(async move {
            let pool = cluster
                .writer()
                .await
                .map_err(DirectoryStoreError::from)?
                .host
                .pool;
            f(pool).await
        })
        .await
    }

    /// [`PgDirectoryStore::read`] of something at an epoch (`f` returns it with the value,
    /// `None` for nothing): the root and the heads, from which every answer the directory
    /// serves is built. On a primary with synchronous replication, an epoch newer than the
    /// newest this store saw settled for `domain` is returned only once a synchronous standby
    /// holds everything the host had written after the read (`Cluster::confirm_settled`): an
    /// epoch committed on the old primary whose synchronous wait was cancelled is visible
    /// there, and is lost in a failover; served, its head would be a fork (two heads for one
    /// epoch) once the new primary commits that epoch again. Found by the failover drill with
    /// the directory on (`tests/drill_postgres.rs`). Otherwise a temporary error.
    async fn read_settled<T, F, Fut>(&self, domain: &str, f: F) -> Result<T, DirectoryStoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(T, Option<u64>), DirectoryStoreError>>
            + Send
            + 'static,
    {
        let cluster = Arc::clone(&self.cluster);
        let settled = Arc::clone(&self.settled);
        let domain = domain.to_string();
        self.run(async move {
            let w = cluster.writer().await.map_err(DirectoryStoreError::from)?;
            let (value, epoch) = f(w.host.pool.clone()).await?;
            let Some(epoch) = epoch else {
                return Ok(value);
            };
            let known = |settled: &Mutex<HashMap<String, u64>>| {
                settled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&domain)
                    .copied()
            };
            if known(&settled).is_some_and(|k| k >= epoch) {
                return Ok(value);
            }
            cluster
                .confirm_settled(&w)
                .await
                .map_err(DirectoryStoreError::from)?;
            let mut settled = settled.lock().unwrap_or_else(|e| e.into_inner());
            let k = settled.entry(domain).or_insert(epoch);
            *k = (*k).max(epoch);
            Ok(value)
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, DirectoryStoreError>> + Send + 'static,
    ) -> Result<T, DirectoryStoreError> {
        on_runtime(self.runtime.as_ref(), work).await
    }
}

#[async_trait]
impl DirectoryStore for PgDirectoryStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let name = domain.to_string();
        self.read_settled(domain, |pool| async move {
            let row: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT epoch, CASE WHEN octet_length(record) <= $2 THEN record END \
                 FROM kt_roots WHERE domain = $1",
            )
            .bind(name)
            .bind(MAX_RECORD)
            .fetch_optional(&pool)
            .await
            .map_err(unavailable)?;
            let root = row
                .map(|(e, r)| Ok::<_, DirectoryStoreError>((epoch_u64(e)?, bounded(r, "root")?)))
                .transpose()?;
            let epoch = root.as_ref().map(|(e, _)| *e);
            Ok((root, epoch))
        })
        .await
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        let (domain, keys) = (domain.to_string(), keys.to_vec());
        self.read(|pool| async move {
            let rows: Vec<Option<Vec<u8>>> = sqlx::query_scalar(
                "SELECT CASE WHEN octet_length(record) <= $3 THEN record END \
                 FROM kt_nodes WHERE domain = $1 AND key = ANY($2)",
            )
            .bind(domain)
            .bind(keys)
            .bind(MAX_RECORD)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter().map(|r| bounded(r, "tree node")).collect()
        })
        .await
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain, label) = (domain.to_string(), label.to_vec());
        self.read(|pool| async move {
            let rows: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT epoch, CASE WHEN octet_length(record) <= $3 THEN record END \
                 FROM kt_values WHERE domain = $1 AND label = $2",
            )
            .bind(domain)
            .bind(label)
            .bind(MAX_RECORD)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter()
                .map(|(e, r)| Ok((epoch_u64(e)?, bounded(r, "value state")?)))
                .collect()
        })
        .await
    }

    async fn value_states_batch(
        &self,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain, labels) = (domain.to_string(), labels.to_vec());
        self.read(|pool| async move {
            let rows: Vec<(Vec<u8>, i64, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT label, epoch, CASE WHEN octet_length(record) <= $3 THEN record END \
                 FROM kt_values WHERE domain = $1 AND label = ANY($2)",
            )
            .bind(domain)
            .bind(labels)
            .bind(MAX_RECORD)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter()
                .map(|(l, e, r)| Ok((l, epoch_u64(e)?, bounded(r, "value state")?)))
                .collect()
        })
        .await
    }

    async fn root_and_nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<RootAndNodes, DirectoryStoreError> {
        let (name, keys) = (domain.to_string(), keys.to_vec());
        self.read_settled(domain, |pool| async move {
            // One statement: the root and the nodes as of one snapshot. The root's row comes
            // with its epoch, the nodes' with NULL.
            let rows: Vec<(Option<i64>, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT epoch, CASE WHEN octet_length(record) <= $3 THEN record END \
                 FROM kt_roots WHERE domain = $1 \
                 UNION ALL \
                 SELECT NULL, CASE WHEN octet_length(record) <= $3 THEN record END \
                 FROM kt_nodes WHERE domain = $1 AND key = ANY($2)",
            )
            .bind(name)
            .bind(keys)
            .bind(MAX_RECORD)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            let mut root = None;
            let mut nodes = Vec::new();
            for (epoch, record) in rows {
                match epoch {
                    Some(e) => root = Some((epoch_u64(e)?, bounded(record, "root")?)),
                    None => nodes.push(bounded(record, "tree node")?),
                }
            }
            let epoch = root.as_ref().map(|(e, _)| *e);
            Ok(((root, nodes), epoch))
        })
        .await
    }

    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        let domain = domain.to_string();
        let cluster = Arc::clone(&self.cluster);
        self.run(async move {
            // On the primary, confirmed by a synchronous standby when the primary has one set
            // up (as a publication is): a failover never loses an epoch a delivery relied on.
            cluster
                .write(true, |conn| {
                    Box::pin(async move {
                        match commit_on(conn, &domain, batch).await {
                            // The host's fault: the write path closes the connection and
                            // looks for the primary again.
                            Err(DirectoryStoreError::Unavailable(m)) => {
                                Err(kst_core::Error::unavailable(COMPONENT, m))
                            }
                            other => Ok(other),
                        }
                    })
                })
                .await
                .map_err(DirectoryStoreError::from)?
        })
        .await
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        let (domain, epoch, head) = (domain.to_string(), epoch_i64(epoch)?, head.to_vec());
        self.read(move |pool| async move {
            // The head inserted, in one round trip; none when one was there (or another
            // writer's insert is racing this one).
            let inserted: Option<Vec<u8>> = sqlx::query_scalar(
                "INSERT INTO kt_heads (domain, epoch, head) VALUES ($1, $2, $3) \
                 ON CONFLICT (domain, epoch) DO NOTHING RETURNING head",
            )
            .bind(&domain)
            .bind(epoch)
            .bind(&head)
            .fetch_optional(&pool)
            .await
            .map_err(unavailable)?;
            if let Some(inserted) = inserted {
                return Ok(inserted);
            }
            // A statement of its own: it sees a head another writer committed meanwhile.
            sqlx::query_scalar("SELECT head FROM kt_heads WHERE domain = $1 AND epoch = $2")
                .bind(&domain)
                .bind(epoch)
                .fetch_optional(&pool)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    DirectoryStoreError::Corrupt(format!(
                        "the head of {domain} epoch {epoch} vanished after it was inserted"
                    ))
                })
        })
        .await
    }

    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let name = domain.to_string();
        // Epochs are `BIGINT`: none is stored past `i64::MAX`, so a range past it (an
        // outsider's `/head/<epoch>` is looked up as written) holds no head, not an error.
        if to < from || from > i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let (from, to) = (epoch_i64(from)?, epoch_i64(to.min(i64::MAX as u64))?);
        self.read_settled(domain, move |pool| async move {
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT epoch, head FROM kt_heads \
                 WHERE domain = $1 AND epoch BETWEEN $2 AND $3 ORDER BY epoch",
            )
            .bind(name)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            let heads = rows
                .into_iter()
                .map(|(e, h)| Ok((epoch_u64(e)?, h)))
                .collect::<Result<Vec<_>, DirectoryStoreError>>()?;
            let newest = heads.last().map(|(e, _)| *e);
            Ok((heads, newest))
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
        let (domain, epoch) = (domain.to_string(), epoch_i64(epoch)?);
        let (witness, cosignature) = (witness.to_vec(), cosignature.to_vec());
        let checked_at = i64::try_from(checked_at).unwrap_or(i64::MAX);
        self.read(move |pool| async move {
            // One statement: an earlier check never replaces a later one of the same epoch.
            sqlx::query(
                "INSERT INTO kt_cosignatures (domain, epoch, witness, cosignature, checked_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (domain, epoch, witness) \
                 DO UPDATE SET cosignature = EXCLUDED.cosignature, \
                 checked_at = EXCLUDED.checked_at \
                 WHERE kt_cosignatures.checked_at <= EXCLUDED.checked_at",
            )
            .bind(domain)
            .bind(epoch)
            .bind(witness)
            .bind(cosignature)
            .bind(checked_at)
            .execute(&pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        let (domain, epoch) = (domain.to_string(), epoch_i64(epoch)?);
        self.read(move |pool| async move {
            let rows: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
                "SELECT witness, cosignature FROM kt_cosignatures \
                 WHERE domain = $1 AND epoch = $2",
            )
            .bind(domain)
            .bind(epoch)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter()
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
        let (domain, witness) = (domain.to_string(), witness.to_vec());
        self.read(move |pool| async move {
            let row: Option<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT epoch, cosignature FROM kt_cosignatures \
                 WHERE domain = $1 AND witness = $2 ORDER BY epoch DESC LIMIT 1",
            )
            .bind(domain)
            .bind(witness)
            .fetch_optional(&pool)
            .await
            .map_err(unavailable)?;
            row.map(|(e, c)| Ok((epoch_u64(e)?, c))).transpose()
        })
        .await
    }
}

fn witness_key(bytes: &[u8]) -> Result<[u8; 32], DirectoryStoreError> {
    bytes.try_into().map_err(|_| {
        DirectoryStoreError::Corrupt(format!(
            "kt_cosignatures holds a witness key of {} bytes",
            bytes.len()
        ))
    })
}

/// [`DirectoryStore::commit`]: one transaction on `conn`, the fence first (module docs).
async fn commit_on(
    conn: &mut PgConnection,
    domain: &str,
    batch: RecordBatch,
) -> Result<(), DirectoryStoreError> {
    if let Some(root) = &batch.root
        && let Some(expected) = root.expected_epoch
    {
        return commit_epoch(conn, domain, expected, &batch).await;
    }
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(unavailable)?;
    match &batch.root {
        // akd's empty tree: written only while the domain has no root.
        None => {
            let root: Option<i64> =
                sqlx::query_scalar("SELECT epoch FROM kt_roots WHERE domain = $1")
                    .bind(domain)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            if root.is_some() {
                return Ok(());
            }
        }
        Some(r) => {
            let done = match r.expected_epoch {
                None => sqlx::query(
                    "INSERT INTO kt_roots (domain, epoch, record) VALUES ($1, $2, $3) \
                         ON CONFLICT (domain) DO NOTHING",
                )
                .bind(domain)
                .bind(epoch_i64(r.epoch)?)
                .bind(&r.blob),
                Some(expected) => sqlx::query(
                    "UPDATE kt_roots SET epoch = $2, record = $3 \
                         WHERE domain = $1 AND epoch = $4",
                )
                .bind(domain)
                .bind(epoch_i64(r.epoch)?)
                .bind(&r.blob)
                .bind(epoch_i64(expected)?),
            }
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
            if done == 0 {
                return match r.expected_epoch {
                    // Another instance created the empty directory first: keep its.
                    None => Ok(()),
                    Some(expected) => Err(DirectoryStoreError::Conflict(format!(
                        "the batch for epoch {} was built on epoch {expected}, which is no \
                             longer the stored root",
                        r.epoch
                    ))),
                };
            }
        }
    }
    if !batch.nodes.is_empty() {
        let (keys, records): (Vec<Vec<u8>>, Vec<Vec<u8>>) = batch.nodes.into_iter().unzip();
        sqlx::query(
            "INSERT INTO kt_nodes (domain, key, record) \
                 SELECT $1, k, r FROM UNNEST($2::bytea[], $3::bytea[]) AS t(k, r) \
                 ON CONFLICT (domain, key) DO UPDATE SET record = EXCLUDED.record",
        )
        .bind(domain)
        .bind(keys)
        .bind(records)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    }
    if !batch.value_states.is_empty() {
        let mut labels = Vec::with_capacity(batch.value_states.len());
        let mut epochs = Vec::with_capacity(batch.value_states.len());
        let mut records = Vec::with_capacity(batch.value_states.len());
        for v in batch.value_states {
            labels.push(v.label);
            epochs.push(epoch_i64(v.epoch)?);
            records.push(v.blob);
        }
        sqlx::query(
            "INSERT INTO kt_values (domain, label, epoch, record) \
                 SELECT $1, l, e, r FROM UNNEST($2::bytea[], $3::bigint[], $4::bytea[]) \
                 AS t(l, e, r) \
                 ON CONFLICT (domain, label, epoch) DO UPDATE SET record = EXCLUDED.record",
        )
        .bind(domain)
        .bind(labels)
        .bind(epochs)
        .bind(records)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    }
    if let (Some(head), Some(root)) = (&batch.head, &batch.root) {
        sqlx::query(
            "INSERT INTO kt_heads (domain, epoch, head) VALUES ($1, $2, $3) \
             ON CONFLICT (domain, epoch) DO NOTHING",
        )
        .bind(domain)
        .bind(epoch_i64(root.epoch)?)
        .bind(head)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// An epoch's batch (a root built on epoch `expected`) as **one statement**, so one round
/// trip: the fence (`UPDATE kt_roots ... WHERE epoch = expected`) and the inserts of the
/// nodes, the value states and the head (`ON CONFLICT DO NOTHING`: a stored head stays),
/// which write only when the fence updated the root (they read its `RETURNING` row). A
/// statement is its own transaction: all of it or nothing.
async fn commit_epoch(
    conn: &mut PgConnection,
    domain: &str,
    expected: u64,
    batch: &RecordBatch,
) -> Result<(), DirectoryStoreError> {
    let Some(root) = &batch.root else {
        return Ok(());
    };
    let (keys, nodes): (Vec<&[u8]>, Vec<&[u8]>) = batch
        .nodes
        .iter()
        .map(|(k, r)| (k.as_slice(), r.as_slice()))
        .unzip();
    let mut labels = Vec::with_capacity(batch.value_states.len());
    let mut epochs = Vec::with_capacity(batch.value_states.len());
    let mut values = Vec::with_capacity(batch.value_states.len());
    for v in &batch.value_states {
        labels.push(v.label.as_slice());
        epochs.push(epoch_i64(v.epoch)?);
        values.push(v.blob.as_slice());
    }
    let fenced: i64 = sqlx::query_scalar(
        "WITH fence AS ( \
             UPDATE kt_roots SET epoch = $2, record = $3 \
             WHERE domain = $1 AND epoch = $4 RETURNING 1 \
         ), n AS ( \
             INSERT INTO kt_nodes (domain, key, record) \
             SELECT $1, k, r FROM UNNEST($5::bytea[], $6::bytea[]) AS t(k, r) \
             WHERE EXISTS (SELECT 1 FROM fence) \
             ON CONFLICT (domain, key) DO UPDATE SET record = EXCLUDED.record \
         ), v AS ( \
             INSERT INTO kt_values (domain, label, epoch, record) \
             SELECT $1, l, e, r FROM UNNEST($7::bytea[], $8::bigint[], $9::bytea[]) \
             AS t(l, e, r) \
             WHERE EXISTS (SELECT 1 FROM fence) \
             ON CONFLICT (domain, label, epoch) DO UPDATE SET record = EXCLUDED.record \
         ), h AS ( \
             INSERT INTO kt_heads (domain, epoch, head) \
             SELECT $1, $2, $10::bytea WHERE $10::bytea IS NOT NULL \
             AND EXISTS (SELECT 1 FROM fence) \
             ON CONFLICT (domain, epoch) DO NOTHING \
         ) \
         SELECT count(*) FROM fence",
    )
    .bind(domain)
    .bind(epoch_i64(root.epoch)?)
    .bind(&root.blob)
    .bind(epoch_i64(expected)?)
    .bind(keys)
    .bind(nodes)
    .bind(labels)
    .bind(epochs)
    .bind(values)
    .bind(batch.head.as_deref())
    .fetch_one(&mut *conn)
    .await
    .map_err(unavailable)?;
    if fenced == 0 {
        return Err(DirectoryStoreError::Conflict(format!(
            "the batch for epoch {} was built on epoch {expected}, which is no longer the \
             stored root",
            root.epoch
        )));
    }
    Ok(())
}
