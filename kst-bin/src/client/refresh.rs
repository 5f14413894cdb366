//! `kst client refresh`: retrieve again the keys imported through kst, so that revocations and
//! extended expiries reach the user (a correspondent's revocation otherwise goes unnoticed).
//!
//! Every key imported by `retrieve --import` (or `check --import`) is noted in
//! `imported.json` next to the pending-request file: address, fingerprint, expiry, when it was
//! fetched. A key is due when it expires within `--expiry-days`, or when it was fetched more
//! than `--max-age-days` ago plus a delay of up to a quarter of that age derived from the
//! address: so keys imported on the same day fall due on different days, and a daily cron
//! job sends a few retrievals a day rather than all at once. A run fetches at most `--batch`
//! keys (most urgent first); the others stay due for the next run.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;
use kst_core::AddressPolicy;
use kst_core::certificate::Certificate;
use kst_core::durable;
use serde::{Deserialize, Serialize};

use super::commands::{Settings, send_and_wait};
use super::exit;
use super::output::{self, Outcome};

/// `--max-age-days` by default.
pub const DEFAULT_MAX_AGE_DAYS: u64 = 30;
/// `--expiry-days` by default.
pub const DEFAULT_EXPIRY_DAYS: u64 = 14;
/// `--batch` by default: few enough for the KST's per-sender retrieval limit.
pub const DEFAULT_BATCH: usize = 4;

const DAY: u64 = 86_400;

/// When a key is due.
#[derive(Debug, Clone)]
pub struct Due {
    /// Refresh keys fetched more than this many days ago (plus the per-address spread).
    pub max_age_days: u64,
    /// Refresh keys expiring within this many days.
    pub expiry_days: u64,
    /// At most this many retrievals per run.
    pub batch: usize,
}

/// One key imported through kst.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imported {
    /// The address it was retrieved for.
    pub address: String,
    /// Its fingerprint when last fetched.
    pub fingerprint: String,
    /// Its expiry when last fetched (seconds since the Unix epoch), if any.
    pub expires_at: Option<u64>,
    /// When it was last fetched (seconds since the Unix epoch).
    pub fetched_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ImportedFile {
    version: u32,
    keys: Vec<Imported>,
}

/// A stable spread of up to a quarter of `max_age` seconds for `address` (FNV-1a).
fn spread(address: &str, max_age: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % (max_age / 4 + 1)
}

/// Why `key` is due at `now`, or `None`. A key that expires within `expiry_days` is due at
/// most once a day (not on every run of a frequent cron job); a key that has expired is due
/// by its age only, like any other: otherwise a few expired keys, sorted first, would take
/// every run's batch for good and no other key would ever be refreshed (no revocation would
/// reach the user).
pub fn due_reason(key: &Imported, due: &Due, now: u64) -> Option<&'static str> {
    let expires_soon = key
        .expires_at
        .is_some_and(|at| at > now && at <= now.saturating_add(due.expiry_days * DAY));
    if expires_soon && now >= key.fetched_at.saturating_add(DAY) {
        return Some("expires soon");
    }
    let max_age = due.max_age_days * DAY;
    let at = key
        .fetched_at
        .saturating_add(max_age)
        .saturating_add(spread(&key.address, max_age));
    (now >= at).then_some("last fetched long ago")
}

/// The due keys, most urgent first (soonest expiry, then oldest fetch), at most `due.batch`.
pub fn select(keys: &[Imported], due: &Due, now: u64) -> Vec<(Imported, &'static str)> {
    let mut out: Vec<(Imported, &'static str)> = keys
        .iter()
        .filter_map(|k| due_reason(k, due, now).map(|r| (k.clone(), r)))
        .collect();
    out.sort_by_key(|(k, _)| (k.expires_at.unwrap_or(u64::MAX), k.fetched_at));
    out.truncate(due.batch);
    out
}

/// The file of imported keys of `s`: `imported.json` beside the pending-request file.
fn file_of(s: &Settings) -> PathBuf {
    s.state.path().with_file_name("imported.json")
}

fn lock(path: &Path) -> Result<File, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        durable::create_dir(dir).map_err(|e| e.to_string())?;
    }
    let lock_path = path.with_extension("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    f.lock_exclusive()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    Ok(f)
}

fn load(path: &Path) -> Result<Vec<Imported>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice::<ImportedFile>(&b)
            .map(|f| f.keys)
            .map_err(|e| {
                format!(
                    "{} is unreadable ({e}); move it away to start afresh",
                    path.display()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn save(path: &Path, keys: Vec<Imported>) -> Result<(), String> {
    let mut body =
        serde_json::to_vec_pretty(&ImportedFile { version: 1, keys }).map_err(|e| e.to_string())?;
    body.push(b'\n');
    durable::write_atomic(path, &body).map_err(|e| format!("{}: {e}", path.display()))
}

/// Updates the entry of `address` (adding it when `add`) under the file's lock.
fn upsert(path: &Path, entry: Imported, add: bool) -> Result<(), String> {
    let _lock = lock(path)?;
    let mut keys = load(path)?;
    match keys.iter_mut().find(|k| k.address == entry.address) {
        Some(k) => *k = entry,
        None if add => keys.push(entry),
        None => return Ok(()),
    }
    save(path, keys)
}

/// Notes a key that a finished request imported into gpg (called for every finished request;
/// anything else is ignored). A failure to note is reported on stderr, not fatal: the import
/// itself succeeded.
pub fn note_import(s: &Settings, o: &Outcome) {
    let Outcome::Found {
        address,
        fingerprint,
        key,
        imported: true,
        ..
    } = o
    else {
        return;
    };
    let entry = Imported {
        address: address.clone(),
        fingerprint: fingerprint.clone(),
        expires_at: Certificate::from_armored(key, 1 << 20)
            .ok()
            .and_then(|c| c.expiration()),
        fetched_at: kst_core::time::unix_now(),
    };
    if let Err(e) = upsert(&file_of(s), entry, true) {
        eprintln!("kst: the key was imported, but noting it for refresh failed: {e}");
    }
}

/// Runs `refresh`: retrieves (and imports) the due keys; returns the exit code (the worst of
/// the retrievals', 0 when nothing was due).
pub async fn refresh(s: &Settings, due: &Due, dry_run: bool) -> u8 {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return output::finish(&[o], s.json, true),
    };
    let path = file_of(s);
    let keys = match lock(&path).and_then(|_l| load(&path)) {
        Ok(k) => k,
        Err(e) => return output::finish(&[Outcome::error(exit::CONFIG, e)], s.json, true),
    };
    let now = kst_core::time::unix_now();
    let selected = select(&keys, due, now);
    if dry_run || selected.is_empty() {
        if s.json {
            let list: Vec<serde_json::Value> = selected
                .iter()
                .map(|(k, why)| serde_json::json!({"address": k.address, "fingerprint": k.fingerprint, "due": why}))
                .collect();
            super::terminal::print_json(&list, "[]");
        } else if selected.is_empty() {
            eprintln!(
                "kst: no imported key is due ({} noted in {})",
                keys.len(),
                path.display()
            );
        } else {
            for (k, why) in &selected {
                super::output::out(format!("{:<32} {} ({why})", k.address, k.fingerprint));
            }
        }
        return exit::OK;
    }
    let mut outcomes = Vec::new();
    for (k, _) in selected {
        let Ok(address) = AddressPolicy::default().normalize(&k.address) else {
            continue;
        };
        let request = kst_core::client::build_retrieval(&account, &address);
        let o = send_and_wait(s, &account, request, None, true, false).await;
        if let Outcome::NotFound { .. } = &o {
            // Answered: the next try waits a full age again.
            let mut seen = k.clone();
            seen.fetched_at = now;
            if let Err(e) = upsert(&path, seen, false) {
                eprintln!("kst: {e}");
            }
        }
        outcomes.push(o);
    }
    output::finish(&outcomes, s.json, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(address: &str, expires_at: Option<u64>, fetched_at: u64) -> Imported {
        Imported {
            address: address.into(),
            fingerprint: "F".repeat(40),
            expires_at,
            fetched_at,
        }
    }

    #[test]
    fn keys_fall_due_by_expiry_or_age_spread_per_address() {
        let due = Due {
            max_age_days: 30,
            expiry_days: 14,
            batch: 2,
        };
        let now = 1_800_000_000;
        assert_eq!(due_reason(&key("a@x.net", None, now), &due, now), None);
        assert_eq!(
            due_reason(&key("a@x.net", Some(now + 13 * DAY), now - DAY), &due, now),
            Some("expires soon")
        );
        assert_eq!(
            due_reason(&key("a@x.net", Some(now + 13 * DAY), now - 60), &due, now),
            None,
            "fetched within the day"
        );
        assert_eq!(
            due_reason(&key("a@x.net", Some(now - DAY), now - DAY), &due, now),
            None,
            "expired: by age only"
        );
        assert_eq!(
            due_reason(&key("a@x.net", Some(now + 15 * DAY), now), &due, now),
            None
        );
        // Past the age plus the largest spread: due whatever the address.
        let old = now - 30 * DAY - 8 * DAY;
        assert_eq!(
            due_reason(&key("a@x.net", None, old), &due, now),
            Some("last fetched long ago")
        );
        // Fetched exactly `max_age` ago: the spread differs per address, so not every key is
        // due on the same day.
        let at_age = now - 30 * DAY;
        let due_now = (0..40)
            .filter(|i| due_reason(&key(&format!("u{i}@x.net"), None, at_age), &due, now).is_some())
            .count();
        assert!(due_now < 40, "the spread kept no key back");
        for i in 0..40 {
            assert!(spread(&format!("u{i}@x.net"), 30 * DAY) <= 30 * DAY / 4);
        }
        // The batch: most urgent first.
        let keys = vec![
            key("old@x.net", None, old),
            key("soon@x.net", Some(now + DAY), now - DAY),
            key("sooner@x.net", Some(now + 60), now - DAY),
            key("fresh@x.net", None, now),
        ];
        let picked: Vec<String> = select(&keys, &due, now)
            .into_iter()
            .map(|(k, _)| k.address)
            .collect();
        assert_eq!(picked, ["sooner@x.net", "soon@x.net"]);
        let every = Due {
            max_age_days: 0,
            ..due
        };
        assert_eq!(
            select(&keys, &every, now).len(),
            2,
            "the batch bounds a run"
        );
    }
}
