//! The `kst` executable's library: configuration, mailers, store factory, logging, command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod deliver;
pub mod http;
pub mod lmtp;
pub mod logging;
pub mod mailer;
pub mod metrics;
pub mod outbox;
pub mod stores;
pub mod transfer;
pub mod web;
