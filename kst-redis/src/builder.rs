//! [`RedisStoreBuilder`]: URL, key prefix and timeouts of a [`RedisStore`].

use std::time::Duration;

use kst_core::store::TimeoutStore;
use kst_core::timeout::within;
use kst_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::{COMPONENT, redis};
use crate::keys::{DEFAULT_PREFIX, check_prefix};
use crate::store::RedisStore;

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
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("operation_timeout", &self.operation_timeout)
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
        }
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

    fn parts(&self) -> Result<(redis::Client, ConnectionManagerConfig)> {
        check_prefix(&self.prefix)?;
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| Error::Config(format!("{COMPONENT}: invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            // One quick retry per reconnection; the next operation starts another round.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        Ok((client, config))
    }

    /// Connects (failing with a temporary error when the server cannot be reached).
    pub async fn connect(self) -> Result<TimeoutStore<RedisStore>> {
        let (client, config) = self.parts()?;
        let connect = async {
            ConnectionManager::new_with_config(client, config)
                .await
                .map_err(redis)
        };
        let manager = within(COMPONENT, "connect", self.operation_timeout, connect).await?;
        Ok(TimeoutStore::new(
            RedisStore::new(manager, self.prefix),
            self.operation_timeout,
        ))
    }

    /// Builds the store without touching the server: the connection is opened by the first
    /// operation. For a daemon that must start while Redis is down.
    /// Call it within a Tokio runtime (the connection machinery spawns background tasks).
    pub fn connect_lazy(self) -> Result<TimeoutStore<RedisStore>> {
        let (client, config) = self.parts()?;
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(redis)?;
        Ok(TimeoutStore::new(
            RedisStore::new(manager, self.prefix),
            self.operation_timeout,
        ))
    }
}
