//! The operator's room: `kst keys`, `kst export`/`import`, `kst migrate`, `kst config check`,
//! `kst wks keygen`, `kst dkim keygen`, `kst reminders send`, `kst log keygen` (feature
//! `transparency`).

pub mod config_check;
pub mod dkim;
pub mod keys;
#[cfg(feature = "transparency")]
pub mod log;
pub mod reminders;
pub mod transfer;
#[cfg(all(feature = "transparency", feature = "client"))]
pub mod witness;
pub mod wks;

use std::path::Path;

use crate::exit;
use crate::shared::config::Config;
use crate::shared::{logging, report, stores};

/// Loads the configuration at `path` and starts logging, or reports why it cannot (the exit
/// code).
pub fn load(path: Option<&Path>) -> Result<Config, u8> {
    let cfg = Config::load(path).map_err(|e| report::config_error(&e))?;
    logging::init(&cfg.log);
    Ok(cfg)
}

/// `domain` (as an operator typed it) normalized, when it is one of `[kst] domains`; else the
/// exit code, after saying why (for the commands that make a key per served domain).
pub fn served_domain(cfg: &Config, domain: &str) -> Result<String, u8> {
    let policy = cfg.policy().map_err(|e| report::config_error(&e))?;
    policy
        .address_policy
        .normalize_domain(domain)
        .ok()
        .filter(|d| policy.serves_domain(d))
        .ok_or_else(|| {
            eprintln!("kst: {domain:?} is not a domain in kst.domains");
            exit::USAGE
        })
}

/// `kst migrate`: applies the store's schema migrations and rebuilds its look-up index;
/// with `[transparency]` on, records in the key directory every current key it lacks;
/// prints what it did, the number of indexed keys (and recorded keys) on stdout.
pub async fn migrate(config: Option<&Path>) -> u8 {
    let cfg = match load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match stores::migrate(&cfg.store).await {
        Ok(m) => {
            eprintln!("kst: {}", m.schema);
            println!(
                "look-up index of the {} store rebuilt: {} keys indexed",
                m.backend, m.indexed
            );
        }
        Err(e) => return report::error(&e),
    }
    #[cfg(feature = "transparency")]
    {
        // A directory switched on for a store that already holds keys: record what it lacks.
        let recorded = match stores::open_store(&cfg.store, stores::Reach::Now).await {
            Ok(store) => crate::shared::transparency::record_all(&cfg, store).await,
            Err(e) => Err(e),
        };
        match recorded {
            Ok(Some(r)) => println!(
                "key directory: {} address(es) checked, {} recorded",
                r.checked, r.recorded
            ),
            Ok(None) => {}
            Err(e) => return report::error(&e),
        }
    }
    exit::OK
}
