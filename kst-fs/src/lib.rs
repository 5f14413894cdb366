#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "transparency")]
mod directory;
mod error;
mod file;
mod index;
#[cfg(feature = "transparency")]
mod journal;
mod layout;
mod lock;
mod nowait;
#[cfg(feature = "transparency")]
mod overlay;
mod pool;
mod ratelimit;
#[cfg(feature = "transparency")]
mod recent;
mod reminders;
#[cfg(feature = "transparency")]
mod root;
mod store;
mod walk;

#[cfg(feature = "transparency")]
pub use directory::FsDirectoryStore;
pub use pool::{
    MAX_BLOCKING, MAX_DIRECTORY_BLOCKING, blocking_in_flight, blocking_peak,
    directory_blocking_in_flight, directory_blocking_peak,
};
pub use store::FsStore;
