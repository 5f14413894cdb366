#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub mod authres;
pub mod body;
pub mod certificate;
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod durable;
pub mod error;
pub mod fingerprint;
pub mod group_commit;
pub mod kauth;
pub mod key_index;
pub mod mac;
pub mod mailer;
pub mod merge;
pub mod openpgp;
pub mod policy;
pub mod protocol;
pub mod publication;
pub mod ratelimit;
pub mod received;
pub mod reminder;
pub mod reply;
pub mod revocation;
pub mod service;
pub mod store;
pub mod time;
#[cfg(feature = "timeout")]
pub mod timeout;
#[cfg(feature = "transparency")]
pub mod transparency;
pub mod validate;
pub mod wkd;
pub mod wks;

pub use address::{Address, AddressError, AddressPolicy};
pub use error::{Component, ComponentKind, Error, Result};
pub use fingerprint::{Fingerprint, KeyId};
pub use group_commit::GroupCommit;
pub use kauth::AuthKey;
pub use mailer::{Delivery, Mailer, OutgoingMail};
pub use policy::{AuthSource, Policy};
pub use protocol::{Reason, Status};
pub use ratelimit::{Hit, LimitKind, MemoryRateLimiter, RateLimiter, RateLimits};
pub use service::{Decision, Envelope, HandleError, Handled, Kst, NotForKst, ReplyOutcome};
pub use store::{
    DeletedPage, DeletedPublications, Expected, KeyRecord, KeyStore, NewKey, PublishOutcome,
    WalkCursor, WalkPage,
};
#[cfg(test)]
mod redteam15_tests;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
