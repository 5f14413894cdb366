//! The key directory's records in PostgreSQL (feature `transparency`): kst-postgres's
//! [`DirectoryStore`] (docs/TRANSPARENCY.md).
//!
//! Three tables, created by [`PgDirectoryStore::connect`] (`CREATE TABLE IF NOT EXISTS`
//! under an advisory lock; they move into `migrations/` when the feature is on by default):
//!
//! ```text
//! kt_roots (domain PK, epoch, record)                 the root record of each domain
//! kt_nodes (domain, key, record, PK (domain, key))    tree nodes
//! kt_values(domain, label, epoch, record, PK (domain, label, epoch))   value states
//! kt_heads (domain, epoch, head, PK (domain, epoch))  the signed head of each epoch
//! kt_cosignatures (domain, epoch, witness, cosignature, PK (domain, epoch, witness))
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
//! an epoch or none of it. Reads go to the one host of the URL (the primary: a replica could
//! lag behind the root it returns).

use async_trait::async_trait;
use kst_core::transparency::{DirectoryStore, DirectoryStoreError, RecordBatch};
use sqlx::postgres::{PgPool, PgPoolOptions};

/// The tables, created under a transaction-level advisory lock (two instances starting at
/// once).
const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(hashtext('kst-key-directory-schema'));
CREATE TABLE IF NOT EXISTS kt_roots (
    domain TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    record BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS kt_nodes (
    domain TEXT NOT NULL,
    key BYTEA NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (domain, key)
);
CREATE TABLE IF NOT EXISTS kt_values (
    domain TEXT NOT NULL,
    label BYTEA NOT NULL,
    epoch BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (domain, label, epoch)
);
CREATE TABLE IF NOT EXISTS kt_heads (
    domain TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    head BYTEA NOT NULL,
    PRIMARY KEY (domain, epoch)
);
CREATE TABLE IF NOT EXISTS kt_cosignatures (
    domain TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    witness BYTEA NOT NULL,
    cosignature BYTEA NOT NULL,
    PRIMARY KEY (domain, epoch, witness)
);
CREATE INDEX IF NOT EXISTS kt_cosignatures_by_witness
    ON kt_cosignatures (domain, witness, epoch);
";

/// The key directories kept in one PostgreSQL database.
///
/// Every query runs as a task on the runtime that connected (the pool's connections belong to
/// its reactor): the key directory calls the store from a thread and runtime of its own
/// (`kst_core::transparency::log`), which end with it.
#[derive(Debug, Clone)]
pub struct PgDirectoryStore {
    pool: PgPool,
    runtime: tokio::runtime::Handle,
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

impl PgDirectoryStore {
    /// Connects to the database at `url` (a pool of at most `max_connections`) and creates
    /// the tables if they are missing.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DirectoryStoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect(url)
            .await
            .map_err(unavailable)?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(unavailable)?;
        Ok(PgDirectoryStore {
            pool,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Runs `f` with the pool on the runtime that connected.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, DirectoryStoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, DirectoryStoreError>> + Send + 'static,
    {
        self.runtime
            .spawn(f(self.pool.clone()))
            .await
            .map_err(|e| unavailable(format!("query task: {e}")))?
    }
}

#[async_trait]
impl DirectoryStore for PgDirectoryStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let domain = domain.to_string();
        self.run(|pool| async move {
            let row: Option<(i64, Vec<u8>)> =
                sqlx::query_as("SELECT epoch, record FROM kt_roots WHERE domain = $1")
                    .bind(domain)
                    .fetch_optional(&pool)
                    .await
                    .map_err(unavailable)?;
            row.map(|(e, r)| Ok((epoch_u64(e)?, r))).transpose()
        })
        .await
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        let (domain, keys) = (domain.to_string(), keys.to_vec());
        self.run(|pool| async move {
            sqlx::query_scalar("SELECT record FROM kt_nodes WHERE domain = $1 AND key = ANY($2)")
                .bind(domain)
                .bind(keys)
                .fetch_all(&pool)
                .await
                .map_err(unavailable)
        })
        .await
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain, label) = (domain.to_string(), label.to_vec());
        self.run(|pool| async move {
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT epoch, record FROM kt_values WHERE domain = $1 AND label = $2",
            )
            .bind(domain)
            .bind(label)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter()
                .map(|(e, r)| Ok((epoch_u64(e)?, r)))
                .collect()
        })
        .await
    }

    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        let domain = domain.to_string();
        self.run(|pool| commit(pool, domain, batch)).await
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        let (domain, epoch, head) = (domain.to_string(), epoch_i64(epoch)?, head.to_vec());
        self.run(move |pool| async move {
            sqlx::query(
                "INSERT INTO kt_heads (domain, epoch, head) VALUES ($1, $2, $3) \
                 ON CONFLICT (domain, epoch) DO NOTHING",
            )
            .bind(&domain)
            .bind(epoch)
            .bind(&head)
            .execute(&pool)
            .await
            .map_err(unavailable)?;
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
        let domain = domain.to_string();
        let (from, to) = (epoch_i64(from)?, epoch_i64(to.min(i64::MAX as u64))?);
        self.run(move |pool| async move {
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT epoch, head FROM kt_heads \
                 WHERE domain = $1 AND epoch BETWEEN $2 AND $3 ORDER BY epoch",
            )
            .bind(domain)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .map_err(unavailable)?;
            rows.into_iter()
                .map(|(e, h)| Ok((epoch_u64(e)?, h)))
                .collect()
        })
        .await
    }

    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        cosignature: &[u8],
    ) -> Result<(), DirectoryStoreError> {
        let (domain, epoch) = (domain.to_string(), epoch_i64(epoch)?);
        let (witness, cosignature) = (witness.to_vec(), cosignature.to_vec());
        self.run(move |pool| async move {
            sqlx::query(
                "INSERT INTO kt_cosignatures (domain, epoch, witness, cosignature) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (domain, epoch, witness) \
                 DO UPDATE SET cosignature = EXCLUDED.cosignature",
            )
            .bind(domain)
            .bind(epoch)
            .bind(witness)
            .bind(cosignature)
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
        self.run(move |pool| async move {
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
        self.run(move |pool| async move {
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

/// [`DirectoryStore::commit`]: one transaction, the fence first (module docs).
async fn commit(
    pool: PgPool,
    domain: String,
    batch: RecordBatch,
) -> Result<(), DirectoryStoreError> {
    let domain = domain.as_str();
    let mut tx = pool.begin().await.map_err(unavailable)?;
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
    tx.commit().await.map_err(unavailable)
}
