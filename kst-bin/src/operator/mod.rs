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

/// `kst migrate`: applies the store's schema migrations and rebuilds its look-up index;
/// prints what it did, the number of indexed keys on stdout.
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
            exit::OK
        }
        Err(e) => report::error(&e),
    }
}
