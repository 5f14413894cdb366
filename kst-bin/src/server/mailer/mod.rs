//! The reply transports: a spool directory or an SMTP relay, chosen by `[mailer] kind`
//! (`crate::shared::wiring::build_mailer` picks one).

pub mod dkim;
mod smtp;
mod spool;

pub use dkim::{DkimKeys, DkimMailer};
pub use smtp::{SmtpMailer, SubmitError};
pub use spool::SpoolMailer;
