//! The connection to Redis in each deployment: one server ([`ConnectionManager`]), a primary
//! that Sentinel names (a manager swapped when Sentinel names another), or a Redis Cluster
//! ([`ClusterConnection`], which follows slot moves and failovers by itself).

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::sentinel::SentinelClient;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Shortest time between two Sentinel look-ups after errors.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(250);

/// The connection of a [`crate::RedisStore`]; cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server (or an address that follows the primary by itself), and its address.
    Single(ConnectionManager, String),
    /// The primary Sentinel names.
    Sentinel(Arc<SentinelFollower>),
    /// A Redis Cluster, connected on first use.
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection opened by the first command (so that kst can start while the
/// cluster is unreachable); the connection then follows the cluster by itself.
pub(crate) struct LazyCluster {
    pub(crate) client: redis::cluster::ClusterClient,
    pub(crate) conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// One handle to send commands on, as [`Conn::handle`] gives it.
#[derive(Clone)]
pub(crate) enum Handle {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Manager(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Manager(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

/// Follows the primary that Sentinel names: holds a manager for the current primary and, after
/// an error that says the primary may have moved (connection refused or dropped, a read-only
/// replica, a timeout), asks the sentinels again (at most every [`RESOLVE_INTERVAL`]) and swaps
/// the manager when they name another server.
pub(crate) struct SentinelFollower {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    config: ConnectionManagerConfig,
    current: StdMutex<Option<(String, ConnectionManager)>>,
    last_resolve: StdMutex<Option<Instant>>,
}

impl SentinelFollower {
    /// A follower that asks the sentinels on first use.
    pub(crate) fn new(sentinel: SentinelClient, config: ConnectionManagerConfig) -> Self {
        SentinelFollower {
            sentinel: tokio::sync::Mutex::new(sentinel),
            config,
            current: StdMutex::new(None),
            last_resolve: StdMutex::new(None),
        }
    }

    async fn resolve_with(
        sentinel: &tokio::sync::Mutex<SentinelClient>,
        config: &ConnectionManagerConfig,
    ) -> RedisResult<(String, ConnectionManager)> {
        let client = sentinel.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let manager = ConnectionManager::new_with_config(client, config.clone()).await?;
        Ok((addr, manager))
    }

    /// The manager of the primary in use (asking the sentinels first when there is none yet).
    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some((_, m)) = &*self.current.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(m.clone());
        }
        let (addr, manager) = Self::resolve_with(&self.sentinel, &self.config).await?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Ok(current.get_or_insert((addr, manager)).1.clone())
    }

    /// Address of the primary in use (`host:port`), if known.
    pub(crate) fn address(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.0.clone())
    }

    /// Asks the sentinels again (unless that was done less than [`RESOLVE_INTERVAL`] ago) and
    /// switches to the primary they name. Errors of the look-up are logged, not returned: the
    /// operation that failed has its own error, and the next one tries again.
    async fn follow(&self) {
        {
            let mut last = self.last_resolve.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RESOLVE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        match Self::resolve_with(&self.sentinel, &self.config).await {
            Ok((addr, manager)) => {
                let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
                let from = current.as_ref().map(|c| c.0.clone()).unwrap_or_default();
                if from != addr {
                    tracing::warn!(%from, to = %addr, "Redis Sentinel names another primary; following it");
                }
                // A new manager even for the same address: the old one may be stuck on a
                // server that was demoted in place.
                *current = Some((addr, manager));
            }
            Err(e) => {
                tracing::warn!(error = %e, "asking Redis Sentinel for the primary failed; trying again on the next error")
            }
        }
    }
}

impl Conn {
    /// A handle for the next command(s).
    pub(crate) async fn handle(&self) -> RedisResult<Handle> {
        Ok(match self {
            Conn::Single(m, _) => Handle::Manager(m.clone()),
            Conn::Sentinel(f) => Handle::Manager(f.manager().await?),
            Conn::Cluster(c) => Handle::Cluster(c.get().await?),
        })
    }

    /// Whether this is a Redis Cluster (commands to different slots cannot share a pipeline
    /// or a script).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Called with every error: under Sentinel, an error that says the primary may have moved
    /// makes the follower ask the sentinels again.
    pub(crate) async fn on_error(&self, e: &RedisError) {
        if let Conn::Sentinel(f) = self
            && primary_may_have_moved(e)
        {
            f.follow().await;
        }
    }

    /// Address of the primary in use, when there is one (`host:port`).
    pub(crate) fn primary_address(&self) -> Option<String> {
        match self {
            Conn::Single(_, addr) => Some(addr.clone()),
            Conn::Sentinel(f) => f.address(),
            Conn::Cluster(_) => None,
        }
    }

    /// Sends `cmd` to every primary (on one server or under Sentinel: the one primary) and
    /// returns each one's address (empty when unknown) and answer.
    pub(crate) async fn on_primaries(&self, cmd: &Cmd) -> RedisResult<Vec<(String, Value)>> {
        match self {
            Conn::Cluster(c) => {
                let mut c = c.get().await?;
                let v = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                let Value::Map(pairs) = v else {
                    return Ok(vec![(String::new(), v)]);
                };
                let mut out = Vec::with_capacity(pairs.len());
                for (addr, value) in pairs {
                    let addr: String = redis::from_redis_value(addr).unwrap_or_default();
                    if let Value::ServerError(e) = value {
                        return Err(RedisError::from(e));
                    }
                    out.push((addr, value));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
            _ => {
                let mut h = self.handle().await?;
                let v: Value = cmd.query_async(&mut h).await?;
                Ok(vec![(self.primary_address().unwrap_or_default(), v)])
            }
        }
    }

    /// Sends `cmd` to the primary at `address` (as [`Self::on_primaries`] names it).
    pub(crate) async fn on_node(&self, address: &str, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                let (host, port) = address.rsplit_once(':').ok_or_else(|| {
                    RedisError::from((ErrorKind::Client, "node address without a port"))
                })?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| RedisError::from((ErrorKind::Client, "bad node port")))?;
                let mut c = c.get().await?;
                c.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.to_string(),
                        port,
                    }),
                )
                .await
            }
            _ => {
                let mut h = self.handle().await?;
                cmd.query_async(&mut h).await
            }
        }
    }

    /// Sends `cmd` (a keyless command such as `WAIT`) to the primary that holds `key`'s slot.
    pub(crate) async fn on_slot_of(&self, key: &str, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                let mut c = c.get().await?;
                c.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                        slot(key.as_bytes()),
                        SlotAddr::Master,
                    ))),
                )
                .await
            }
            _ => {
                let mut h = self.handle().await?;
                cmd.query_async(&mut h).await
            }
        }
    }
}

/// Whether an error means the primary may be elsewhere now.
fn primary_may_have_moved(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || e.code() == Some("LOADING")
        || e.code() == Some("MASTERDOWN")
        || matches!(
            e.kind(),
            ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel
        )
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of its hash tag, modulo 16384).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis_cluster_keyslot() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"{}x"), slot(b"{}x"));
        assert_eq!(slot(b"a{b}c"), slot(b"b"));
    }
}
