#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod cluster;
#[cfg(feature = "transparency")]
mod directory;
mod error;
mod hosts;
mod index;
mod ratelimit;
mod row;
mod store;
mod url;

pub use builder::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_OPERATION_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT, PostgresStoreBuilder,
};
#[cfg(feature = "transparency")]
pub use directory::PgDirectoryStore;
pub use hosts::{HostUrls, TargetSessionAttrs, split_hosts};
#[doc(hidden)]
pub use ratelimit::HIT as RATE_LIMIT_HIT_SQL;
pub use store::{MIGRATIONS_TABLE, PostgresStore};
pub use url::with_database;
