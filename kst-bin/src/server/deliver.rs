//! `kst deliver`: one message on stdin, as Postfix's pipe(8) transport runs it.
//!
//! ```text
//! # master.cf
//! kst  unix  -  n  n  -  -  pipe
//!   flags=Rq user=kst argv=/usr/local/bin/kst deliver --config /etc/kst/kst.toml
//!   --sender ${sender} --recipient ${recipient} --sasl-username ${sasl_username}
//! ```
//!
//! Exit codes (sysexits, as pipe(8) reads them):
//! - 0: kst decided (published, answered, refused with a reply, or left unanswered on purpose);
//! - 75 (EX_TEMPFAIL): store or mailer unavailable, or the configuration is wrong: Postfix keeps
//!   the message and retries, nothing was half-done;
//! - 65 (EX_DATAERR): the mail is not for kst (unknown recipient, over the size limit): bounced.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use kst_core::Decision;
use kst_core::service::{Envelope, HandleError, Kst};
use tokio::io::AsyncReadExt;

use crate::cli::DeliverArgs;
use crate::config::Config;

/// sysexits EX_TEMPFAIL: the MTA retries later.
pub const EX_TEMPFAIL: u8 = 75;
/// sysexits EX_DATAERR: the MTA bounces.
pub const EX_DATAERR: u8 = 65;

/// Runs one delivery and returns the exit code Postfix must see.
pub async fn run(config: Config, args: DeliverArgs) -> ExitCode {
    match deliver(config, args).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!(error = %e, "delivery deferred: {e}");
            eprintln!("kst: temporary failure: {e}");
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

/// Builds the KST a configuration describes (store opened, mailer built); a store that cannot
/// be reached is a temporary error.
pub async fn build_kst(config: &Config) -> Result<Kst, kst_core::Error> {
    build_kst_with(config, crate::stores::Reach::Now).await
}

/// [`build_kst`], choosing what happens when a network store cannot be reached.
pub async fn build_kst_with(
    config: &Config,
    reach: crate::stores::Reach,
) -> Result<Kst, kst_core::Error> {
    let policy = config
        .policy()
        .map_err(|e| kst_core::Error::Config(e.to_string()))?;
    let (store, limiter) = crate::stores::open_store_and_limiter(&config.store, reach).await?;
    let mailer = crate::mailer::build_mailer(&config.mailer)
        .map_err(|e| kst_core::Error::Config(e.to_string()))?;
    let envelope_from = match config.mailer.envelope_from.trim() {
        "" => None,
        s => Some(
            policy
                .address_policy
                .normalize(s)
                .map_err(|e| kst_core::Error::Config(format!("mailer.envelope_from: {e}")))?,
        ),
    };
    Ok(Kst::new(policy, store, Arc::clone(&mailer))
        .with_rate_limiter(limiter)
        .with_envelope_from(envelope_from))
}

async fn deliver(config: Config, args: DeliverArgs) -> Result<u8, kst_core::Error> {
    let started = Instant::now();
    let kst = build_kst(&config).await?;
    let max = kst.policy().max_message_bytes;
    let mut raw = Vec::with_capacity(64 * 1024);
    tokio::io::stdin()
        .take(max as u64 + 1)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| kst_core::Error::unavailable("stdin", e))?;
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
    match kst.handle(&envelope, &raw).await {
        Ok(h) => {
            let (reason, address) = describe(&h.decision);
            tracing::info!(
                message_id = h.message_id.as_deref().unwrap_or("-"),
                recipient = %recipient,
                kind = h.kind.as_str(),
                outcome = h.decision.outcome(),
                reason,
                address,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "message handled"
            );
            Ok(0)
        }
        Err(HandleError::NotForKst(why)) => {
            tracing::warn!(recipient = %recipient, outcome = "rejected", "{why}");
            eprintln!("kst: {why}");
            Ok(EX_DATAERR)
        }
        Err(HandleError::Temporary(e)) => Err(e),
    }
}

/// Reason token and address of a decision, for the log line ("-" when none).
pub fn describe(d: &Decision) -> (&'static str, String) {
    match d {
        Decision::Published { address, .. }
        | Decision::Answered { address, .. }
        | Decision::Deleted { address, .. } => ("-", address.to_string()),
        Decision::Refused { reason } => (reason.as_str(), "-".into()),
        Decision::Ignored(why) => (why.as_str(), "-".into()),
    }
}
