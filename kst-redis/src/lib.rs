#![recursion_limit = "256"]
#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod conn;
mod counters;
mod deleted;
#[cfg(feature = "transparency")]
mod directory;
mod error;
mod guard;
mod index;
mod keys;
mod ratelimit;
mod scripts;
mod store;

pub use builder::{
    DEFAULT_CONNECTION_TIMEOUT, DEFAULT_OPERATION_TIMEOUT, DEFAULT_REPLICA_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT, RedisStoreBuilder,
};
pub use counters::RedisCounters;
#[cfg(feature = "transparency")]
pub use directory::{MAX_BLOB, MAX_VALUE_STATES, RedisDirectoryStore};
pub use keys::DEFAULT_PREFIX;
pub use store::{MAX_VERSION, RedisStore};
