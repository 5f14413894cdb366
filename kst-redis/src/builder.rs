//! [`RedisStoreBuilder`]: URL, key prefix and timeouts of a [`RedisStore`].

use std::sync::Arc;
use std::time::Duration;

use kst_core::store::TimeoutStore;
use kst_core::timeout::within;
use kst_core::{Error, KeyStore, Result};
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};

use crate::conn::{Conn, LazyCluster, SentinelFollower};
use crate::counters::RedisCounters;
use crate::error::{COMPONENT, redis};
use crate::guard::Guard;
use crate::keys::{DEFAULT_PREFIX, check_prefix};
use crate::store::RedisStore;

/// Default bound on the `WAIT` for `min_replicas`.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_millis(500);

/// Connections (lanes) for changes that end in a `WAIT`, with `min_replicas`.
const WAIT_LANES: usize = 4;

/// How the store reaches Redis.
#[derive(Clone, Debug, Default)]
enum Deployment {
    /// The URL's server.
    #[default]
    Single,
    /// The primary that these sentinels name for this master name.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A Redis Cluster, found through these nodes.
    Cluster { nodes: Vec<String> },
}

/// Default bound on opening one connection.
pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on waiting for one reply.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default bound on one whole store operation (reconnecting included).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Configures and opens a [`RedisStore`], wrapped in a [`TimeoutStore`] that bounds each
/// operation by the [operation timeout](Self::operation_timeout).
///
/// ```no_run
/// # async fn demo() -> kst_core::Result<()> {
/// let store = kst_redis::RedisStore::builder("redis://:secret@cache.example:6379/0")
///     .prefix("kst-pool-a:")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
    operation_timeout: Duration,
    deployment: Deployment,
    require_durable: bool,
    min_replicas: u32,
    replica_timeout: Duration,
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("require_durable", &self.require_durable)
            .field("min_replicas", &self.min_replicas)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// A builder for the server at `url` (`redis://[user:password@]host:port[/db]`,
    /// `rediss://` for TLS, `redis+unix:///path/to/socket`) with prefix `kst:` and the default
    /// timeouts above.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.into(),
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            deployment: Deployment::Single,
            require_durable: true,
            min_replicas: 0,
            replica_timeout: DEFAULT_REPLICA_TIMEOUT,
        }
    }

    /// Follow the primary that these sentinels (`redis://host:port` each) name for `master`
    /// instead of the URL's server. The URL, when not empty, gives the data nodes' password
    /// and database (its host is ignored); the sentinels' own URLs give theirs.
    pub fn sentinel(mut self, sentinels: Vec<String>, master: impl Into<String>) -> Self {
        self.deployment = Deployment::Sentinel {
            sentinels,
            master: master.into(),
        };
        self
    }

    /// Use the Redis Cluster that these nodes (`redis://host:port` each, some of them) belong
    /// to instead of the URL's server.
    pub fn cluster(mut self, nodes: Vec<String>) -> Self {
        self.deployment = Deployment::Cluster { nodes };
        self
    }

    /// Whether kst refuses to serve when it cannot read `appendonly` and `appendfsync` with
    /// `CONFIG GET` (default `true`). A server that answers and is not durable (`appendonly
    /// yes`, `appendfsync always`) is refused either way.
    pub fn require_durable(mut self, required: bool) -> Self {
        self.require_durable = required;
        self
    }

    /// Replicas that must acknowledge a change (`WAIT`) before it is confirmed (default 0).
    /// An acknowledgement means the replica holds the write in memory, not on disk.
    pub fn min_replicas(mut self, n: u32) -> Self {
        self.min_replicas = n;
        self
    }

    /// Bound on that `WAIT` (default 500 ms); fewer acknowledgements in time make the change a
    /// temporary failure (it is applied on the primary; retrying it is safe).
    pub fn replica_timeout(mut self, d: Duration) -> Self {
        self.replica_timeout = d;
        self
    }

    /// Prefix of every key this store writes (default `kst:`); several pools can share one
    /// server with different prefixes. Must not contain `{` or `}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on opening one connection (default 2 s).
    pub fn connection_timeout(mut self, d: Duration) -> Self {
        self.connection_timeout = d;
        self
    }

    /// Bound on waiting for one reply (default 3 s).
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }

    /// Bound on one whole operation, reconnecting included (default 10 s). A publish cut off by
    /// it may or may not have been applied; retrying is safe (publication ids).
    pub fn operation_timeout(mut self, d: Duration) -> Self {
        self.operation_timeout = d;
        self
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            // One quick retry per reconnection; the next operation starts another round.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1))
    }

    /// The connection, not opened yet (except for a single server, whose manager connects in
    /// the background).
    fn conn(&self) -> Result<Conn> {
        let config_error = |what: &str, e: &dyn std::fmt::Display| {
            Error::Config(format!("{COMPONENT}: {what}: {e}"))
        };
        Ok(match &self.deployment {
            Deployment::Single => {
                let client = redis::Client::open(self.url.as_str())
                    .map_err(|e| config_error("invalid Redis URL", &e))?;
                // host:port or the socket path; never the password.
                let addr = client.get_connection_info().addr().to_string();
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, self.manager_config())
                        .map_err(redis)?,
                    addr,
                )
            }
            Deployment::Sentinel { sentinels, master } => {
                if sentinels.is_empty() || master.is_empty() {
                    return Err(Error::Config(format!(
                        "{COMPONENT}: Sentinel needs at least one sentinel address and the master name"
                    )));
                }
                let mut node = SentinelNodeConnectionInfo::default();
                if !self.url.trim().is_empty() {
                    let info = self
                        .url
                        .as_str()
                        .into_connection_info()
                        .map_err(|e| config_error("invalid Redis URL", &e))?;
                    node = node.set_redis_connection_info(info.redis_settings().clone());
                }
                let client = SentinelClient::build(
                    sentinels.clone(),
                    master.as_str(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(|e| config_error("invalid sentinel address", &e))?;
                Conn::Sentinel(Arc::new(SentinelFollower::new(
                    client,
                    self.manager_config(),
                )))
            }
            Deployment::Cluster { nodes } => {
                if nodes.is_empty() {
                    return Err(Error::Config(format!(
                        "{COMPONENT}: a Redis Cluster needs at least one node address"
                    )));
                }
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(self.connection_timeout)
                    .response_timeout(self.response_timeout)
                    .build()
                    .map_err(|e| config_error("invalid cluster node address", &e))?;
                Conn::Cluster(Arc::new(LazyCluster {
                    client,
                    conn: tokio::sync::OnceCell::new(),
                }))
            }
        })
    }

    fn build(&self) -> Result<RedisStore> {
        self.build_with(Guard::new(self.require_durable))
    }

    fn build_with(&self, guard: Guard) -> Result<RedisStore> {
        check_prefix(&self.prefix)?;
        Ok(RedisStore {
            conn: self.conn()?,
            prefix: self.prefix.clone(),
            guard: Arc::new(guard),
            min_replicas: self.min_replicas,
            replica_timeout: self.replica_timeout,
            lanes: Arc::new(if self.min_replicas > 0 {
                (0..WAIT_LANES)
                    .map(|_| self.conn())
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            }),
            next_lane: Arc::default(),
        })
    }

    /// Connects and checks the server (failing with a temporary error when it cannot be
    /// reached, and with a configuration error when it is not durable, see
    /// [`Self::require_durable`]).
    pub async fn connect(self) -> Result<TimeoutStore<RedisStore>> {
        let store = self.build()?;
        within(COMPONENT, "connect", self.operation_timeout, store.check()).await?;
        Ok(TimeoutStore::new(store, self.operation_timeout))
    }

    /// Builds the store without touching the server: the connection is opened by the first
    /// operation, and the durability guard runs with the first publication and every
    /// `check`. For a daemon that must start while Redis is down.
    /// Call it within a Tokio runtime (the connection machinery spawns background tasks).
    pub fn connect_lazy(self) -> Result<TimeoutStore<RedisStore>> {
        let store = self.build()?;
        Ok(TimeoutStore::new(store, self.operation_timeout))
    }

    /// Rate-limit counters on this server ([`RedisCounters`]), without touching it: for a
    /// server that holds only soft state, so **no durability guard** (`appendonly no` is the
    /// recommended set-up) and no `min_replicas`. Each operation is bounded by the operation
    /// timeout. Call it within a Tokio runtime.
    pub fn counters_lazy(self) -> Result<RedisCounters> {
        let store = Self {
            min_replicas: 0,
            ..self
        };
        Ok(RedisCounters::new(
            store.build_with(Guard::off())?,
            store.operation_timeout,
        ))
    }
}
