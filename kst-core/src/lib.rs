#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod error;
pub mod mailer;
pub mod policy;
pub mod store;

pub use address::{Address, AddressError, AddressPolicy};
pub use error::{Error, Result};
pub use mailer::{Mailer, OutgoingMail};
pub use policy::{AuthSource, Policy};
pub use store::{KeyRecord, KeyStore, NewKey, PublishOutcome};
