//! `kst deliver`: one message on stdin, as Postfix's pipe(8) transport runs it.
//!
//! ```text
//! # master.cf
//! kst  unix  -  n  n  -  -  pipe
//!   flags=Rq user=kst argv=/usr/local/bin/kst deliver --config /etc/kst/kst.toml
//!   --sender ${sender} --recipient ${recipient} --sasl-username ${sasl_username}
//! ```
//!
//! Exit codes (sysexits, as pipe(8) reads them; see [`crate::exit`]):
//! - 0: kst decided (published, answered, refused with a reply, or left unanswered on purpose);
//! - 75 (EX_TEMPFAIL): store or mailer unavailable, the configuration is wrong, or a bug (a
//!   panic, never Rust's exit 101, which pipe(8) would bounce): Postfix keeps the message and
//!   retries, nothing was half-done;
//! - 65 (EX_DATAERR): the recipient is not kst's at all: bounced. Oversize mail and mail for
//!   `keys+extension@` of a served domain are dropped with exit 0 instead (a bounce would carry
//!   the sender's text to a possibly forged sender); stdin is read to its end, in bounded memory.

use std::path::Path;
use std::time::Instant;

use clap::Args;
use kst_core::service::{Envelope, HandleError};
use tokio::io::AsyncReadExt;

use crate::exit;
use crate::server::ingest::{self, Origin};
use crate::shared::config::Config;
use crate::shared::logging::{self, LogConfig};
use crate::shared::wiring::build_kst;

/// `kst deliver --help`: what it does.
pub const DELIVER_LONG: &str = "\
Handles one message on stdin, the way Postfix's pipe(8) transport runs it: classifies it as a
key publication or a key retrieval, stores or looks up the key, and sends the reply through the
configured mailer.

Exit status: 0 once kst has decided (including refusals answered with a reply), 75 when the
store, the mailer or the configuration is unusable (Postfix keeps the message and retries),
65 for a recipient that is not kst's. Oversize mail and mail for keys+extension@ are dropped
(logged, exit 0), never bounced.";

/// `kst deliver --help`: the Postfix set-up.
pub const DELIVER_AFTER: &str = "\
Postfix set-up (one recipient per delivery):

  # /etc/postfix/master.cf
  kst  unix  -  n  n  -  -  pipe
    flags=Rq user=kst argv=/usr/local/bin/kst deliver --config /etc/kst/kst.toml
    --sender ${sender} --recipient ${recipient} --sasl-username ${sasl_username}

  # /etc/postfix/main.cf
  smtpd_sasl_authenticated_header = yes
  kst_destination_recipient_limit = 1
  transport_maps = hash:/etc/postfix/transport    # keys@example.net  kst:

Try it by hand:
  kst deliver --config kst.toml --sender bob@acme.net --recipient keys@example.net < request.eml";

/// The envelope Postfix passes to `kst deliver`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct DeliverArgs {
    /// Envelope sender, where the reply goes (Postfix: ${sender}; empty for the null sender).
    #[arg(long, value_name = "ADDRESS", allow_hyphen_values = true)]
    pub sender: Option<String>,

    /// Envelope recipient, keys@<a served domain> (Postfix: ${recipient}).
    #[arg(long, value_name = "ADDRESS", allow_hyphen_values = true)]
    pub recipient: Option<String>,

    /// SASL login of the submitting client (Postfix: ${sasl_username}; empty when none). Used
    /// only with `auth_source = "sasl-argv"`.
    #[arg(long, value_name = "LOGIN", allow_hyphen_values = true)]
    pub sasl_username: Option<String>,
}

/// Runs `kst deliver` with the configuration at `config` and returns the exit code Postfix must
/// see. A configuration error exits 75 so that Postfix keeps the message.
pub async fn run(config: Option<&Path>, args: DeliverArgs) -> u8 {
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            logging::init(&LogConfig::default());
            tracing::error!(
                error = %e,
                "configuration error: the message stays queued until the configuration is fixed"
            );
            return exit::TEMPFAIL;
        }
    };
    logging::init(&cfg.log);
    exit_code(tokio::spawn(deliver(cfg, args)).await)
}

/// The exit status of a delivery task. A panic (a bug in kst, on whatever input) exits 75 like
/// any temporary failure, never Rust's 101: pipe(8) takes a status outside sysexits as a
/// permanent error and bounces the message, with the sender's text, to a possibly forged
/// envelope sender. Deferred, it stays queued (as with a dropped LMTP connection) until kst is
/// fixed or the queue lifetime ends.
fn exit_code(joined: Result<Result<u8, kst_core::Error>, tokio::task::JoinError>) -> u8 {
    match joined {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "delivery deferred: {e}");
            eprintln!("kst: temporary failure: {e}");
            exit::TEMPFAIL
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "BUG: kst deliver failed unexpectedly; the message stays queued (exit 75). Please report this with the log"
            );
            eprintln!("kst: temporary failure: internal error ({e}); the message stays queued");
            exit::TEMPFAIL
        }
    }
}

async fn deliver(config: Config, args: DeliverArgs) -> Result<u8, kst_core::Error> {
    let started = Instant::now();
    let kst = build_kst(&config).await?;
    let max = kst.policy().max_message_bytes;
    let stdin_error = |e| kst_core::Error::unavailable(kst_core::Component::other("stdin"), e);
    let mut raw = Vec::with_capacity(64 * 1024);
    let mut stdin = tokio::io::stdin();
    (&mut stdin)
        .take(max as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(stdin_error)?;
    if raw.len() > max {
        // Oversize: read the rest without keeping it (pipe(8) would see a broken pipe), so
        // that kst decides (drops it, exit 0) instead of making Postfix bounce it.
        tokio::io::copy(&mut stdin, &mut tokio::io::sink())
            .await
            .map_err(stdin_error)?;
    }
    let recipient = match args.recipient {
        Some(r) => r,
        None => kst
            .policy()
            .domains
            .first()
            .map(|d| format!("{}@{d}", kst.policy().service_local_part))
            .ok_or_else(|| kst_core::Error::Config("kst.domains is empty".into()))?,
    };
    let envelope = Envelope {
        sender: args.sender,
        recipient: recipient.clone(),
        sasl_username: args.sasl_username,
    };
    let result = kst.handle(&envelope, &raw).await;
    let origin = Origin {
        recipient: &recipient,
        raw: &raw,
        queue_id: None,
        peer: None,
    };
    ingest::record(&result, &origin, started.elapsed());
    match result {
        Ok(_) => Ok(exit::OK),
        Err(HandleError::NotForKst(why)) => {
            eprintln!("kst: {why}");
            Ok(exit::DATAERR)
        }
        Err(HandleError::Temporary(e)) => {
            // Logged by `ingest::record`.
            eprintln!("kst: temporary failure: {e}");
            Ok(exit::TEMPFAIL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_defers_the_message_instead_of_exiting_101() {
        let panicked = tokio::spawn(async {
            if exit::OK == 0 {
                panic!("a bug on some input");
            }
            Ok(exit::OK)
        })
        .await;
        assert!(panicked.as_ref().is_err_and(|e| e.is_panic()));
        assert_eq!(exit_code(panicked), exit::TEMPFAIL);
        let failed = Ok(Err(kst_core::Error::Config("x".into())));
        assert_eq!(exit_code(failed), exit::TEMPFAIL);
        assert_eq!(exit_code(Ok(Ok(exit::DATAERR))), exit::DATAERR);
        assert_eq!(exit_code(Ok(Ok(exit::OK))), exit::OK);
    }
}
