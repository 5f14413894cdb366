//! What the server and operator rooms share: configuration, logging, the store factory,
//! metrics, and the wiring that builds a KST from a configuration.

pub mod config;
pub mod logging;
pub mod metrics;
pub mod report;
pub mod stores;
#[cfg(feature = "transparency")]
pub mod transparency;
pub mod wiring;
