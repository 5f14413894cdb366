//! `kst keys get|history|delete`: the operator's view of one address's keys.
//!
//! Everything printed that comes from the store (addresses, User IDs) goes through
//! [`crate::terminal`]: a User ID is whatever the key holder wrote, ESC sequences and BiDi
//! overrides included, and must not drive the operator's terminal.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use clap::Subcommand;
use kst_core::{Address, KeyRecord, KeyStore};
use serde::Serialize;

use crate::exit;
use crate::shared::report;
use crate::shared::stores::{self, Reach};
use crate::terminal::{self, Safe};

/// `kst keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the current key of ADDRESS, ASCII-armored (exit 1 when there is none).
    ///
    /// Example: kst keys get alice@example.net --config /etc/kst/kst.toml | gpg --import
    Get {
        /// The address, folded like incoming requests (case, subaddress as configured).
        address: String,
        /// Print the record's metadata (version, fingerprint, dates) as JSON instead.
        #[arg(long)]
        json: bool,
    },

    /// Delete the current key and the whole history of ADDRESS (exit 1 when there is none).
    ///
    /// A later publication starts again at version 1.
    /// Example: kst keys delete alice@example.net --config /etc/kst/kst.toml
    Delete {
        /// The address.
        address: String,
    },

    /// List every published version of ADDRESS, oldest first (exit 1 when there is none).
    ///
    /// Example: kst keys history alice@example.net --json
    History {
        /// The address.
        address: String,
        /// One JSON array of record metadata instead of text lines.
        #[arg(long)]
        json: bool,
    },
}

/// Record metadata printed by `--json`.
#[derive(Debug, Serialize)]
struct KeyMeta<'a> {
    address: &'a Address,
    version: u64,
    fingerprint: &'a str,
    published_at: u64,
    published: String,
    publication_id: &'a str,
    revoked: bool,
    format: u32,
    key_bytes: usize,
    /// The User IDs of the stored key, as the key holder wrote them (JSON-escaped).
    user_ids: Vec<String>,
}

impl<'a> KeyMeta<'a> {
    fn of(r: &'a KeyRecord) -> Self {
        KeyMeta {
            address: &r.address,
            version: r.version,
            fingerprint: r.fingerprint.as_str(),
            published_at: r.published_at,
            published: kst_core::time::format_utc(r.published_at),
            publication_id: &r.publication_id,
            revoked: r.revoked,
            format: r.format,
            key_bytes: r.key.len(),
            user_ids: user_ids(r),
        }
    }
}

/// The User IDs of `r`'s key (none when it does not parse as one certificate).
fn user_ids(r: &KeyRecord) -> Vec<String> {
    kst_core::certificate::Certificate::from_binary(&r.key)
        .map(|c| c.user_ids())
        .unwrap_or_default()
}

/// Runs `kst keys ...` with the configuration at `config`; returns its exit code.
pub async fn run(config: Option<&Path>, cmd: KeysCommand) -> u8 {
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let raw = match &cmd {
        KeysCommand::Get { address, .. }
        | KeysCommand::Delete { address }
        | KeysCommand::History { address, .. } => address.clone(),
    };
    let address = match cfg.policy() {
        Ok(p) => match p.address_policy.normalize(&raw) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("kst: \"{}\" is not an address: {e}", Safe(&raw));
                return exit::USAGE;
            }
        },
        Err(e) => return report::config_error(&e),
    };
    // A deletion is recorded in the key directory when `[transparency]` is on; reads need
    // no directory.
    let opened = match &cmd {
        KeysCommand::Delete { .. } => stores::open_recorded_store(&cfg, Reach::Now).await,
        _ => stores::open_store(&cfg.store, Reach::Now).await,
    };
    let store: Arc<dyn KeyStore> = match opened {
        Ok(s) => s,
        Err(e) => return report::error(&e),
    };
    match cmd {
        KeysCommand::Get { json, .. } => match store.get(&address).await {
            Ok(Some(r)) => {
                if json {
                    print_json(&KeyMeta::of(&r));
                } else {
                    print!("{}", kst_core::openpgp::armor_public_key(&r.key));
                }
                exit::OK
            }
            Ok(None) => {
                eprintln!("kst: no key is published for {}", Safe(address.as_str()));
                exit::NOT_FOUND
            }
            Err(e) => report::error(&e),
        },
        KeysCommand::History { json, .. } => match store.history(&address).await {
            Ok(h) if h.is_empty() => {
                eprintln!(
                    "kst: nothing was ever published for {} (or it was deleted)",
                    Safe(address.as_str())
                );
                exit::NOT_FOUND
            }
            Ok(h) => {
                if json {
                    print_json(&h.iter().map(KeyMeta::of).collect::<Vec<_>>());
                } else {
                    println!(
                        "{}: {} version(s), oldest first",
                        Safe(address.as_str()),
                        h.len()
                    );
                    for r in &h {
                        print!("{}", record_lines(r));
                    }
                }
                exit::OK
            }
            Err(e) => report::error(&e),
        },
        KeysCommand::Delete { .. } => {
            // Read what is there first, to say what was removed.
            let history = match store.history(&address).await {
                Ok(h) => h,
                Err(e) => return report::error(&e),
            };
            match store.delete(&address).await {
                Ok(true) => {
                    println!(
                        "deleted {}: {} version(s) removed",
                        Safe(address.as_str()),
                        history.len()
                    );
                    for r in &history {
                        print!("{}", record_lines(r));
                    }
                    exit::OK
                }
                Ok(false) => {
                    eprintln!(
                        "kst: nothing is stored for {}; nothing deleted",
                        Safe(address.as_str())
                    );
                    exit::NOT_FOUND
                }
                Err(e) => report::error(&e),
            }
        }
    }
}

/// Prints `v` as pretty JSON, terminal-safe ([`terminal::json`]: the same JSON value).
fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{}", terminal::json(&s)),
        Err(e) => eprintln!("kst: cannot render JSON: {e}"),
    }
}

/// The text lines about a record, each ending in a newline: version, date, fingerprint; then
/// one line per User ID of its key, terminal-safe.
fn record_lines(r: &KeyRecord) -> String {
    let mut out = format!(
        "  v{:<3} {}  {}{}\n",
        r.version,
        kst_core::time::format_utc(r.published_at),
        r.fingerprint,
        if r.revoked { "  (revoked)" } else { "" }
    );
    for uid in user_ids(r) {
        let _ = writeln!(out, "         uid {}", Safe(&uid));
    }
    out
}
