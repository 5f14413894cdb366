//! Opens the key store `[store]` names: `fs` (kst-fs), `postgres` (kst-postgres) or `redis`
//! (kst-redis).

use std::sync::Arc;

use kst_core::{Error, KeyStore, RateLimiter};
use kst_postgres::PostgresStore;
use kst_redis::RedisStore;

use crate::shared::config::{StoreBackend, StoreConfig};

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
            let builder =
                PostgresStore::builder(cfg.url.clone()).max_connections(cfg.max_connections);
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
            let builder = RedisStore::builder(cfg.url.clone()).prefix(cfg.prefix.clone());
            let store = Arc::new(match reach {
                Reach::Now => builder.connect().await?,
                Reach::Lazily => builder.connect_lazy()?,
            });
            Ok((store.clone(), store))
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
            let store = PostgresStore::builder(cfg.url.clone())
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
