//! The `[transparency]` configuration section: the key directory (issue 18,
//! docs/TRANSPARENCY.md).
//!
//! ```toml
//! [transparency]
//! key_file = "/etc/kst/log-{domain}.key"   # KST_TRANSPARENCY__KEY_FILE; `kst log keygen` writes it
//! # Witnesses whose cosignatures `POST .../cosignature` accepts (`kst log witness keygen`
//! # prints the entry); every lookup answer carries each one's newest cosignature.
//! witnesses = ["witness.example.org:<64 hex, Ed25519 public key>"]
//! # Bounds on each answer's append-only proof for a client that remembers an older head
//! # (`?since=&steps=1`, version 3 replies): 0 keeps the built-in bound (HTTP 4 MiB, 32 768
//! # inserted leaves, 1024 epochs; replies 1 MiB, 16 384, 1024); a smaller one makes more,
//! # smaller steps; never below the newest epoch's own step (docs/TRANSPARENCY.md, "Catching
//! # up in steps").
//! step_max_bytes = 0
//! step_max_changes = 0
//! step_max_epochs = 0
//! # Before an epoch, the writer waits up to this long (µs) for the publications and deletions
//! # writing the key store at that moment, so that they share the epoch (its reads, commit and
//! # head) instead of waiting for the next one; never longer than none is on its way. 0: no
//! # wait. At most 100000. Unset: 2000 on PostgreSQL and Redis, 0 on fs (whose key store
//! # writes flush to disk themselves: waiting for them costs more than it saves).
//! # gather_us = 2000
//! ```
//!
//! Empty `key_file` (the default): no directory. Set, every served domain must have its key
//! file (mode 0600) and kst must be built with the `transparency` feature (the default); each
//! is a configuration error otherwise. The directory is kept in the store `[store]` names
//! (fs, postgres or redis). Every publication and deletion is then recorded in the domain's
//! directory, and `kst serve` answers `/.well-known/kst/log/<domain>/...` on `[web]` (or `[http]` when
//! `[web]` is off).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::dkim::DOMAIN_PLACEHOLDER;

/// `[transparency]`: the key directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransparencyConfig {
    /// The log key file of each served domain (`kst log keygen`); `{domain}` stands for the
    /// domain. Empty: no key directory.
    pub key_file: PathBuf,
    /// The witnesses whose cosignatures the log accepts, `NAME:HEX` (a name for logs, the
    /// witness's Ed25519 public key in 64 hex digits).
    pub witnesses: Vec<String>,
    /// The most bytes of append-only proof in one answer to a client that remembers an
    /// older head; 0: the built-in bound.
    pub step_max_bytes: u64,
    /// The most inserted leaves (two per change) in one such answer; 0: the built-in bound.
    pub step_max_changes: u64,
    /// The most epochs one such answer's proof spans; 0: the built-in bound.
    pub step_max_epochs: u64,
    /// The longest the directory's writer waits before an epoch for the changes on their way
    /// (their key store writes under way), µs; 0: it does not wait. At most
    /// [`MAX_GATHER_US`]. Unset: [`TransparencyConfig::gather_for`] the store.
    pub gather_us: Option<u64>,
}

/// The default of `[transparency] gather_us` on PostgreSQL and Redis.
pub const DEFAULT_GATHER_US: u64 = 2_000;

/// The largest `[transparency] gather_us`: every change of an epoch may wait this long.
pub const MAX_GATHER_US: u64 = 100_000;

impl Default for TransparencyConfig {
    fn default() -> Self {
        TransparencyConfig {
            key_file: PathBuf::new(),
            witnesses: Vec::new(),
            step_max_bytes: 0,
            step_max_changes: 0,
            step_max_epochs: 0,
            gather_us: None,
        }
    }
}

/// The most witnesses `[transparency] witnesses` may list.
pub const MAX_WITNESSES: usize = 16;

impl TransparencyConfig {
    /// Whether the directory is on.
    pub fn enabled(&self) -> bool {
        !self.key_file.as_os_str().is_empty()
    }

    /// The key file of `domain`.
    pub fn key_file_for(&self, domain: &str) -> PathBuf {
        PathBuf::from(
            self.key_file
                .to_string_lossy()
                .replace(DOMAIN_PLACEHOLDER, domain),
        )
    }

    /// The witnesses, parsed (validated by [`TransparencyConfig::validate`]).
    pub fn witness_keys(&self) -> Result<Vec<(String, [u8; 32])>, ConfigError> {
        if self.witnesses.len() > MAX_WITNESSES {
            return Err(ConfigError::key(
                "transparency.witnesses",
                format!("at most {MAX_WITNESSES} witnesses"),
            ));
        }
        #[cfg(feature = "transparency")]
        return self
            .witnesses
            .iter()
            .map(|w| {
                kst_core::transparency::witness::parse_witness(w)
                    .map_err(|e| ConfigError::key("transparency.witnesses", e.to_string()))
            })
            .collect();
        #[cfg(not(feature = "transparency"))]
        match self.witnesses.is_empty() {
            true => Ok(Vec::new()),
            false => Err(ConfigError::key(
                "transparency.witnesses",
                "this kst was built without the `transparency` feature; leave witnesses empty",
            )),
        }
    }

    /// The writer's wait for changes on their way (`gather_us`) with the directory kept in
    /// `backend`: the configured one, else [`DEFAULT_GATHER_US`] on PostgreSQL and Redis and
    /// none on fs. Measured (docs/BENCHMARKS.md, "Gathering an epoch"): on Redis and
    /// PostgreSQL epochs hold 3-4 times the changes at 8 connections and publications are as
    /// fast or faster; on fs, whose key store writes each flush to disk, waiting for them
    /// made publications slower.
    pub fn gather_for(&self, backend: super::StoreBackend) -> std::time::Duration {
        let us = self.gather_us.unwrap_or(match backend {
            super::StoreBackend::Fs => 0,
            super::StoreBackend::Postgres | super::StoreBackend::Redis => DEFAULT_GATHER_US,
        });
        std::time::Duration::from_micros(us)
    }

    /// The operator's bounds on each stepped answer (`step_max_*`; 0: no bound beyond the
    /// built-in ones), or `None` when none is set.
    #[cfg(feature = "transparency")]
    pub fn step_limit(&self) -> Option<kst_core::transparency::answer::StepBudget> {
        let or_max = |v: u64| match v {
            0 => usize::MAX,
            v => usize::try_from(v).unwrap_or(usize::MAX),
        };
        (self.step_max_bytes | self.step_max_changes | self.step_max_epochs != 0).then(|| {
            kst_core::transparency::answer::StepBudget {
                bytes: or_max(self.step_max_bytes),
                changes: or_max(self.step_max_changes),
                epochs: match self.step_max_epochs {
                    0 => u64::MAX,
                    e => e,
                },
            }
        })
    }

    /// Checks what can be checked without reading the key files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.witness_keys()?;
        if let Some(us) = self.gather_us
            && us > MAX_GATHER_US
        {
            return Err(ConfigError::key(
                "transparency.gather_us",
                format!(
                    "{us} is more than {MAX_GATHER_US} µs (every change of an epoch may wait this \
                     long); 2000 is the default on PostgreSQL and Redis, 0 turns the wait off"
                ),
            ));
        }
        if !self.enabled() {
            return Ok(());
        }
        if !cfg!(feature = "transparency") {
            return Err(ConfigError::key(
                "transparency.key_file",
                "this kst was built without the `transparency` feature (cargo build --features \
                 transparency); leave key_file empty",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witnesses_are_name_and_key_and_bounded() {
        let key = "ab".repeat(32);
        let config = |witnesses: Vec<String>| TransparencyConfig {
            key_file: PathBuf::new(),
            witnesses,
            ..TransparencyConfig::default()
        };
        let ok = config(vec![format!("w.example.org:{key}")]);
        if cfg!(feature = "transparency") {
            assert_eq!(
                ok.witness_keys().unwrap(),
                vec![("w.example.org".to_string(), [0xab; 32])]
            );
        }
        for bad in ["", "w", "w:zz", &format!("a b:{key}"), &format!(":{key}")] {
            let c = config(vec![bad.to_string()]);
            assert!(c.validate().is_err(), "{bad:?}");
        }
        let many = config(vec![format!("w:{key}"); MAX_WITNESSES + 1]);
        assert!(many.validate().is_err());
    }

    #[test]
    fn gather_defaults_by_store_and_is_bounded() {
        let load = |v: &str| {
            crate::shared::config::Config::load_with_env(
                None,
                [
                    ("KST_KST__DOMAINS".to_string(), "example.net".to_string()),
                    ("KST_TRANSPARENCY__GATHER_US".to_string(), v.to_string()),
                ],
            )
        };
        use crate::shared::config::StoreBackend;
        let unset = TransparencyConfig::default();
        assert_eq!(unset.gather_us, None);
        let ms = std::time::Duration::from_millis;
        assert_eq!(unset.gather_for(StoreBackend::Postgres), ms(2));
        assert_eq!(unset.gather_for(StoreBackend::Redis), ms(2));
        assert_eq!(unset.gather_for(StoreBackend::Fs), ms(0));
        let off = load("0").unwrap().transparency;
        assert_eq!(off.gather_for(StoreBackend::Redis), ms(0));
        let most = load("100000").unwrap().transparency;
        assert_eq!(most.gather_for(StoreBackend::Fs), ms(100));
        let err = load("100001").unwrap_err().to_string();
        assert!(err.contains("transparency.gather_us"), "{err}");
        assert!(load("-1").is_err());
    }
}
