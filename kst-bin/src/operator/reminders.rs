//! `kst reminders send`: one run of the expiry reminders ([`kst_core::reminder`]), for a
//! pipe-mode deployment's cron (`kst serve` runs them itself every `[reminders]
//! interval_secs`). Several instances may run it at once: each reminder goes out once.

use clap::Subcommand;

use crate::exit;
use crate::shared::{report, wiring};

/// `kst reminders ...`.
#[derive(Debug, Subcommand)]
pub enum RemindersCommand {
    /// Mail the owners of keys that expire soon (`[reminders]`), once per key, expiry and
    /// threshold; prints what was sent as JSON (`sent`; `refused`: the ones the SMTP relay
    /// refused for good, with its code and answer, not sent and not tried again;
    /// `already_claimed`; `rate_limited`).
    Send {
        /// Run as if it were this time (seconds since the Unix epoch), for tests and drills.
        #[arg(long, value_name = "UNIX_SECONDS", hide = true)]
        now: Option<u64>,
    },
}

/// Runs a `kst reminders` command.
pub async fn run(config: Option<&std::path::Path>, cmd: RemindersCommand) -> u8 {
    let RemindersCommand::Send { now } = cmd;
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    if !cfg.reminders.enabled {
        eprintln!("kst: reminders are off ([reminders] enabled = false)");
        println!("{{\"sent\":[],\"refused\":[],\"already_claimed\":0,\"rate_limited\":0}}");
        return exit::OK;
    }
    let kst = match wiring::build_kst(&cfg).await {
        Ok(k) => k,
        Err(e) => return report::error(&e),
    };
    let now = now.unwrap_or_else(kst_core::time::unix_now);
    match kst_core::reminder::send_due(&kst, kst.reminders(), now).await {
        Ok(run) => {
            let sent: Vec<serde_json::Value> = run
                .sent
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "address": c.address.as_str(),
                        "fingerprint": c.fingerprint.as_str(),
                        "expires_at": c.expires_at,
                        "days_before": c.days_before,
                    })
                })
                .collect();
            let refused: Vec<serde_json::Value> = run
                .refused
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "address": r.claim.address.as_str(),
                        "fingerprint": r.claim.fingerprint.as_str(),
                        "expires_at": r.claim.expires_at,
                        "days_before": r.claim.days_before,
                        "code": r.code,
                        "relay": r.text,
                    })
                })
                .collect();
            let report = serde_json::json!({
                "sent": sent,
                "refused": refused,
                "already_claimed": run.already_claimed,
                "rate_limited": run.rate_limited,
            })
            .to_string();
            // Stored addresses may hold BiDi controls: escaped, the same JSON value.
            println!("{}", crate::terminal::json(&report));
            exit::OK
        }
        Err(e) => report::error(&e),
    }
}
