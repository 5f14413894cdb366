//! The reply transports: a spool directory or an SMTP relay, chosen by `[mailer] kind`
//! (`crate::shared::wiring::build_mailer` picks one).

mod smtp;
mod spool;

pub use smtp::SmtpMailer;
pub use spool::SpoolMailer;
