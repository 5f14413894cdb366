//! [`PostgresStoreBuilder`]: pool size, timeouts and migration policy of a [`PostgresStore`].

use std::str::FromStr;
use std::time::Duration;

use kst_core::store::TimeoutStore;
use kst_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::cluster::{Cluster, Host};
use crate::error::COMPONENT;
use crate::hosts::{TargetSessionAttrs, split_hosts};
use crate::store::PostgresStore;

/// Default number of pooled connections per store.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default bound on waiting for a pooled connection, including opening a new one.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on one whole store operation (acquire, queries, commit).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on one write on the primary, including the wait for a synchronous standby.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled connection idle at least this long is pinged before an operation uses it.
const PING_IDLE: Duration = Duration::from_secs(1);

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
    more_urls: Vec<String>,
    read_urls: Vec<String>,
    write_timeout: Duration,
    max_connections: u32,
    acquire_timeout: Duration,
    operation_timeout: Duration,
    run_migrations: bool,
}

impl std::fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PostgresStoreBuilder")
            .field("hosts", &self.more_urls.len().saturating_add(1))
            .field("read_urls", &self.read_urls.len())
            .field("write_timeout", &self.write_timeout)
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
    ///
    /// `url` may list several hosts of one replicated database, libpq-style
    /// (`postgres://u:p@a:5432,b:5432/kst?target_session_attrs=read-write`): the store writes
    /// to the one host that accepts writes and follows a failover by itself (see the crate
    /// documentation, "Replication").
    pub fn new(url: impl Into<String>) -> Self {
        PostgresStoreBuilder {
            url: url.into(),
            more_urls: Vec::new(),
            read_urls: Vec::new(),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
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

    /// Further hosts of the same database, one URL each (may themselves list hosts): the
    /// configuration-file form of a host list.
    pub fn more_urls(mut self, urls: Vec<String>) -> Self {
        self.more_urls = urls;
        self
    }

    /// Read replicas (streaming standbys) for the look-ups by fingerprint, key ID and WKD hash,
    /// whose answer may be a little stale; every other read goes to the primary.
    pub fn read_urls(mut self, urls: Vec<String>) -> Self {
        self.read_urls = urls;
        self
    }

    /// Upper bound on one write on the primary, including the wait for a synchronous standby
    /// (default 5 s; keep it below the operation timeout). A write cut off by it is not
    /// confirmed and its connection is closed, not reused.
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }

    /// Whether [`connect`](Self::connect) applies the embedded migrations (default true).
    pub fn run_migrations(mut self, yes: bool) -> Self {
        self.run_migrations = yes;
        self
    }

    fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            // A connection idle for a while is pinged before use (the server may have been
            // restarted, or a firewall dropped it) and replaced when dead; one in steady use is
            // not: sqlx already pings every connection when it goes back to the pool, and a
            // second ping per operation cost a round trip on every look-up.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
    }

    /// One lazily connecting pool per host of `urls`.
    fn hosts(&self, urls: &[&String], writes: bool) -> Result<Vec<Host>> {
        let mut hosts: Vec<Host> = Vec::new();
        for url in urls {
            let split = split_hosts(url)?;
            if writes
                && !matches!(
                    split.target,
                    TargetSessionAttrs::Any
                        | TargetSessionAttrs::ReadWrite
                        | TargetSessionAttrs::Primary
                )
            {
                return Err(Error::Config(format!(
                    "{COMPONENT}: store URL: kst writes, so target_session_attrs must be \
                     read-write, primary or absent (read replicas go to [store] read_urls)"
                )));
            }
            for one in split.urls {
                let options = PgConnectOptions::from_str(&one)
                    .map_err(|e| Error::Config(format!("{COMPONENT}: invalid database URL: {e}")))?
                    .application_name("kst");
                let label = format!("{}:{}", options.get_host(), options.get_port());
                if hosts.iter().any(|h| h.label == label) {
                    return Err(Error::Config(format!(
                        "{COMPONENT}: host {label} is listed twice"
                    )));
                }
                hosts.push(Host {
                    label,
                    pool: self.pool_options().connect_lazy_with(options.clone()),
                    options,
                });
            }
        }
        Ok(hosts)
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
        let urls: Vec<&String> = std::iter::once(&self.url).chain(&self.more_urls).collect();
        let hosts = self.hosts(&urls, true)?;
        let readers = self.hosts(&self.read_urls.iter().collect::<Vec<_>>(), false)?;
        Ok(TimeoutStore::new(
            PostgresStore::from_cluster(Cluster::new(
                hosts,
                readers,
                self.write_timeout,
                self.acquire_timeout,
            )),
            self.operation_timeout,
        ))
    }
}
