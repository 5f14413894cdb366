//! The reply transports: a spool directory or an SMTP relay, chosen by `[mailer] kind`.

mod smtp;
mod spool;

use std::sync::Arc;

use kst_core::Mailer;

pub use smtp::SmtpMailer;
pub use spool::SpoolMailer;

use crate::config::{ConfigError, MailerConfig, MailerKind};

/// Builds the mailer `[mailer]` describes. Nothing is contacted or created yet: the spool
/// directory appears with the first reply, the relay is dialled per reply (see
/// [`Mailer::check`] for a probe).
pub fn build_mailer(cfg: &MailerConfig) -> Result<Arc<dyn Mailer>, ConfigError> {
    // Validate the shared key even for the spool, so a typo never waits for the first reply.
    cfg.envelope_from()?;
    Ok(match cfg.kind {
        MailerKind::Spool => Arc::new(SpoolMailer::new(&cfg.path)),
        MailerKind::Smtp => Arc::new(SmtpMailer::new(cfg)?),
    })
}
