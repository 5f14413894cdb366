//! [`PostgresStoreBuilder`]: pool size, timeouts and migration policy of a [`PostgresStore`].

use std::str::FromStr;
use std::time::Duration;

use kst_core::store::TimeoutStore;
use kst_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::COMPONENT;
use crate::store::PostgresStore;

/// Default number of pooled connections per store.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default bound on waiting for a pooled connection, including opening a new one.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on one whole store operation (acquire, queries, commit).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and opens a [`PostgresStore`], wrapped in a [`TimeoutStore`] that bounds each
/// operation by the [operation timeout](Self::operation_timeout).
///
/// ```no_run
/// # async fn demo() -> kst_core::Result<()> {
/// use std::time::Duration;
/// let store = kst_postgres::PostgresStore::builder("postgres://kst:secret@db.example/kst")
///     .max_connections(16)
///     .acquire_timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStoreBuilder {
    url: String,
    max_connections: u32,
    acquire_timeout: Duration,
    operation_timeout: Duration,
    run_migrations: bool,
}

impl std::fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PostgresStoreBuilder")
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("run_migrations", &self.run_migrations)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// A builder for the database at `url` (`postgres://user:password@host:port/dbname`, with
    /// `?sslmode=...` etc. as libpq understands them) with the defaults above, migrations on.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresStoreBuilder {
            url: url.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            run_migrations: true,
        }
    }

    /// Largest number of connections the pool keeps open (default 8, at least 1).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a connection, including connecting to the server
    /// (default 3 s). With the server down, operations fail after about this long.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// Upper bound on one whole operation (default 10 s), so that a server that accepts
    /// connections but stops answering cannot hang a delivery. A publish cut off by it may or
    /// may not have committed; it is safe to retry, publication ids make it idempotent.
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.operation_timeout = d;
        self
    }

    /// Whether [`connect`](Self::connect) applies the embedded migrations (default true).
    pub fn run_migrations(mut self, yes: bool) -> Self {
        self.run_migrations = yes;
        self
    }

    fn pool_options(&self) -> Result<(PgPoolOptions, PgConnectOptions)> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(Error::Config(format!(
                "{COMPONENT}: the database URL must start with postgres:// or postgresql://"
            )));
        }
        let options = PgConnectOptions::from_str(&self.url)
            .map_err(|e| Error::Config(format!("{COMPONENT}: invalid database URL: {e}")))?
            .application_name("kst");
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            .test_before_acquire(true);
        Ok((pool, options))
    }

    /// Connects (failing with a temporary error when the server cannot be reached) and, unless
    /// turned off, applies the schema migrations.
    pub async fn connect(self) -> Result<TimeoutStore<PostgresStore>> {
        let store = self.connect_lazy()?;
        store
            .run("connect", store.inner().check_reachable())
            .await?;
        if self.run_migrations {
            store.inner().migrate().await?;
        }
        Ok(store)
    }

    /// Builds the store without touching the server and without migrating: connections are
    /// opened by the first operation. For a daemon that must start while the database is down.
    /// Call it within a Tokio runtime (the connection machinery spawns background tasks).
    pub fn connect_lazy(&self) -> Result<TimeoutStore<PostgresStore>> {
        let (pool, options) = self.pool_options()?;
        Ok(TimeoutStore::new(
            PostgresStore::from_pool(pool.connect_lazy_with(options)),
            self.operation_timeout,
        ))
    }
}
