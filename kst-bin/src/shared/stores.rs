//! Opens the key store `[store]` names: `fs` (kst-fs), `postgres` (kst-postgres) or `redis`
//! (kst-redis).

use std::sync::Arc;

use kst_core::{Error, KeyStore, RateLimiter};
use kst_postgres::PostgresStore;
use kst_redis::RedisStore;

use crate::shared::config::{Config, CountersBackend, StoreBackend, StoreConfig, WebCounters};

/// How to open a network store when its server cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Fail with [`Error::Unavailable`] (a one-shot command: `kst deliver` then exits 75).
    Now,
    /// Build the store anyway and connect on first use (a daemon that must start while its
    /// database is down; `/readyz` reports the store until it is back).
    Lazily,
}

/// Opens the backend of `cfg`, running PostgreSQL schema migrations when the server is reachable.
/// A store that cannot be reached is a temporary [`Error::Unavailable`] (unless `reach` is
/// [`Reach::Lazily`]); a bad URL is [`Error::Config`].
pub async fn open_store(cfg: &StoreConfig, reach: Reach) -> Result<Arc<dyn KeyStore>, Error> {
    Ok(open_store_and_limiter(cfg, reach).await?.0)
}

/// [`open_store`] for the operator's commands that change keys (`kst import`, `kst keys
/// delete`): with `[transparency]` on, behind the [`kst_core::transparency::TransparentStore`]
/// that records every change in the key directory, as `kst serve` and `kst deliver` do.
pub async fn open_recorded_store(
    config: &Config,
    reach: Reach,
) -> Result<Arc<dyn KeyStore>, Error> {
    let store = open_store(&config.store, reach).await?;
    #[cfg(feature = "transparency")]
    let (store, _) = crate::shared::transparency::wrap_store(config, store).await?;
    #[cfg(not(feature = "transparency"))]
    let _ = config;
    Ok(store)
}

/// Opens the backend of `cfg` (as [`open_store`]) and the rate limiter that goes with it: the
/// same backend, so that every instance of a pool (PostgreSQL, Redis) or every process on the
/// host (`fs`: counters in `<path>/ratelimit/`) shares the counts.
pub async fn open_store_and_limiter(
    cfg: &StoreConfig,
    reach: Reach,
) -> Result<(Arc<dyn KeyStore>, Arc<dyn RateLimiter>), Error> {
    match cfg.backend {
        StoreBackend::Fs => {
            let store = Arc::new(kst_fs::FsStore::open(&cfg.path).await?);
            Ok((store.clone(), store))
        }
        StoreBackend::Postgres => {
            let builder = postgres_builder(cfg);
            let store = match builder.clone().connect().await {
                Ok(store) => Arc::new(store),
                Err(e) if e.is_temporary() && reach == Reach::Lazily => {
                    tracing::warn!(error = %e, "PostgreSQL is unreachable; starting anyway, the schema is migrated by `kst migrate` or the next start");
                    Arc::new(builder.connect_lazy()?)
                }
                Err(e) => return Err(e),
            };
            Ok((store.clone(), store))
        }
        StoreBackend::Redis => {
            let store = Arc::new(open_redis(cfg, reach).await?);
            Ok((store.clone(), store))
        }
    }
}

/// The PostgreSQL store of `cfg`: its hosts (`url`, which may list several, and `urls`), read
/// replicas (`read_urls`), pool size and write timeout.
pub(crate) fn postgres_builder(cfg: &StoreConfig) -> kst_postgres::PostgresStoreBuilder {
    PostgresStore::builder(cfg.url.clone())
        .more_urls(cfg.urls.clone())
        .read_urls(cfg.read_urls.clone())
        .write_timeout(std::time::Duration::from_millis(
            cfg.write_timeout_ms.max(1),
        ))
        .max_connections(cfg.max_connections)
}

/// Opens the `redis` backend: one server, Sentinel or a Cluster, with the durability guard
/// and `min_replicas` of `[store]`. Lazily (`kst serve`): a server that answers and is not
/// durable still stops the start; one that cannot be reached is checked again by every
/// publication and `/readyz`.
async fn open_redis(
    cfg: &StoreConfig,
    reach: Reach,
) -> Result<kst_core::store::TimeoutStore<RedisStore>, Error> {
    let builder = redis_builder(cfg);
    match reach {
        Reach::Now => builder.connect().await,
        Reach::Lazily => {
            let store = builder.connect_lazy()?;
            match store.check().await {
                Err(e @ (Error::Config(_) | Error::Invalid(_))) => Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "Redis is unreachable; starting anyway, the durability guard runs with the first publication and /readyz");
                    Ok(store)
                }
                Ok(()) => Ok(store),
            }
        }
    }
}

/// The Redis store of `cfg`: one server, Sentinel or a Cluster, its key prefix, durability
/// guard and `min_replicas`.
pub(crate) fn redis_builder(cfg: &StoreConfig) -> kst_redis::RedisStoreBuilder {
    let builder = RedisStore::builder(cfg.url.clone())
        .prefix(cfg.prefix.clone())
        .require_durable(cfg.require_durable)
        .min_replicas(cfg.min_replicas);
    if !cfg.sentinels.is_empty() {
        builder.sentinel(cfg.sentinels.clone(), cfg.sentinel_master.clone())
    } else if !cfg.cluster_nodes.is_empty() {
        builder.cluster(cfg.cluster_nodes.clone())
    } else {
        builder
    }
}

/// Where the counters of `[web.limits]` live: the key store's rate limiter, or the counter
/// store `[web.counters]` names (a Redis of their own, soft state). Cheap to clone.
#[derive(Clone)]
pub struct WebCounterStore {
    limiter: Arc<dyn RateLimiter>,
    own: Option<kst_redis::RedisCounters>,
}

impl WebCounterStore {
    /// The key store's own limiter (`[web.counters] backend = "store"`, the default).
    pub fn in_key_store(limiter: Arc<dyn RateLimiter>) -> WebCounterStore {
        WebCounterStore { limiter, own: None }
    }

    /// The counters, for `[web.limits]`.
    pub fn limiter(&self) -> Arc<dyn RateLimiter> {
        Arc::clone(&self.limiter)
    }

    /// Whether they live apart from the key store.
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// The counter store's name for readiness problems and logs: `web-counters(redis)`.
    pub fn name(&self) -> &'static str {
        "web-counters(redis)"
    }

    /// Checks a counter store of their own (`None` when the counters live in the key store,
    /// which the store's own check covers): reachable and a primary. No durability guard.
    pub async fn check(&self) -> Option<Result<(), Error>> {
        Some(self.own.as_ref()?.check().await)
    }

    /// The counter store's topology facts (`None` when the counters live in the key store).
    pub async fn topology(&self) -> Option<Result<Vec<(String, String)>, Error>> {
        Some(self.own.as_ref()?.topology().await)
    }
}

impl std::fmt::Debug for WebCounterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCounterStore")
            .field("limiter", &self.limiter.name())
            .field("own", &self.own)
            .finish()
    }
}

/// Opens where `[web.counters]` (`cfg`) keeps the web limits' counters: `key_store`'s limiter
/// by default, or a Redis of their own (one server, Sentinel or a Cluster, under `prefix`),
/// without the durability guard: the counters are soft state. Each call is bounded by
/// `connect_timeout_ms + response_timeout_ms` ([`WebCounters::call_timeout`]). The Redis is
/// not touched here (a daemon must start while it is down; `/readyz` says so, and the limits
/// answer as when the counters fail); a bad URL or prefix is [`Error::Config`].
pub fn open_web_counters(
    cfg: &WebCounters,
    key_store: Arc<dyn RateLimiter>,
) -> Result<WebCounterStore, Error> {
    match cfg.backend {
        CountersBackend::Store => Ok(WebCounterStore::in_key_store(key_store)),
        CountersBackend::Redis => {
            let builder = RedisStore::builder(cfg.url.clone())
                .prefix(cfg.prefix())
                .connection_timeout(cfg.connect_timeout())
                .response_timeout(cfg.response_timeout())
                .operation_timeout(cfg.call_timeout());
            let builder = if !cfg.sentinels.is_empty() {
                builder.sentinel(cfg.sentinels.clone(), cfg.sentinel_master.clone())
            } else if !cfg.cluster_nodes.is_empty() {
                builder.cluster(cfg.cluster_nodes.clone())
            } else {
                builder
            };
            let counters = builder.counters_lazy()?;
            Ok(WebCounterStore {
                limiter: Arc::new(counters.clone()),
                own: Some(counters),
            })
        }
    }
}

/// What `kst migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// What happened to the schema (PostgreSQL), or that the backend has none.
    pub schema: &'static str,
    /// The store's name (`fs`, `postgres`, `redis`).
    pub backend: &'static str,
    /// Current keys [`KeyStore::rebuild_index`] indexed (0 for a backend whose look-ups need
    /// no index of its own).
    pub indexed: u64,
}

/// `kst migrate`: applies the PostgreSQL schema migrations of `cfg` (other backends have no
/// schema; they are opened and checked), then rebuilds the store's look-up index
/// ([`KeyStore::rebuild_index`]: fingerprints, key IDs, WKD hashes of every current key), which
/// is safe while other instances serve.
pub async fn migrate(cfg: &StoreConfig) -> Result<Migrated, Error> {
    let (store, schema): (Arc<dyn KeyStore>, _) = match cfg.backend {
        StoreBackend::Postgres => {
            let store = postgres_builder(cfg)
                .run_migrations(false)
                .connect()
                .await?;
            store.inner().migrate().await?;
            (Arc::new(store), "PostgreSQL schema is up to date")
        }
        _ => {
            let store = open_store(cfg, Reach::Now).await?;
            store.check().await?;
            (store, "this backend has no schema to migrate")
        }
    };
    let indexed = store.rebuild_index().await?;
    Ok(Migrated {
        schema,
        backend: store.name(),
        indexed,
    })
}
