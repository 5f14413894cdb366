#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod file;
mod index;
mod layout;
mod lock;
mod ratelimit;
mod reminders;
mod store;

pub use store::FsStore;
