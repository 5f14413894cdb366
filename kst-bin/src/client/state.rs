//! The pending-requests file: every request is written here (with its K_auth) before it is sent
//! and removed once its reply has been read, so that a crash or a timeout between sending and
//! reading loses nothing: `kst client pending` lists them, `kst client check` finishes them.
//!
//! JSON, mode 0600 (it holds K_auth), replaced atomically and durably ([`kst_core::durable`]) under an
//! exclusive lock on `<file>.lock`, so parallel `kst client` runs do not lose each other's
//! entries.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;
use kst_core::client::Pending;
use kst_core::durable::{self, AtomicFile};
use serde::{Deserialize, Serialize};

/// One pending request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The request as `kst-core` needs it to verify the reply (holds K_auth).
    pub pending: Pending,
    /// The account whose mailbox receives the reply.
    pub account: String,
    /// `submission` or `direct`.
    pub route: String,
    /// Import the retrieved key into gpg when the reply arrives.
    #[serde(default)]
    pub import: bool,
    /// The key directory checks the reply must pass (feature `transparency`): also when
    /// `kst client check` reads it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogRequirements>,
}

/// The key directory checks a pending request's reply must pass, as the command's flags
/// asked (`--check-transparency`, `--transparency`, `--witness`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequirements {
    /// `retrieve --check-transparency`: ask the directory over HTTP too.
    #[serde(default)]
    pub http: bool,
    /// `--log-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_url: Option<String>,
    /// `--log-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_key: Option<String>,
    /// `--witness NAME:HEX`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<String>,
    /// `--witness-threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_threshold: Option<usize>,
    /// `--witness-max-age` (seconds before the check, not before the request).
    #[serde(default)]
    pub witness_max_age: u64,
    /// Protocol version 3: the remembered head the request named in `KST-Log-Since`
    /// (`kst-log-head-v1` text), so a reply is checked from it even when another reply moved
    /// the memory meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_head: Option<String>,
    /// The newest epoch of the domain's directory the client had verified (its remembered
    /// head) when the request was made; `None` when it had verified none, or for a request
    /// written by a kst from before this field. The two-step check of versions 1 and 2
    /// (`client/log_race.rs`) takes a change recorded at or before this epoch for one made
    /// before the request (exit 5), and with `None` cannot tell (exit 75, retrieve again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_epoch: Option<u64>,
    /// The directory `verified_epoch` is an epoch of (its head key, VRF key and the root of
    /// that epoch): the two-step check compares epochs with `verified_epoch` only while the
    /// client's memory holds that root for it (the same directory, not one re-pinned or
    /// started again since: its epochs count again from the start). `None` for a request
    /// written by a kst from before this field: then `verified_epoch` is not used (the
    /// check cannot tell, exit 75, and the retry decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_log: Option<VerifiedLog>,
    /// The key the directory's answer verified just before the request was sent proved as
    /// the address's newest version (review F3): with it the two-step check tells a key
    /// whose value a later deletion withdrew (the history no longer shows it) from a forged
    /// one. `None`: no such answer (the head could not be verified before sending, the
    /// answer proved no key, or a request of a kst from before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_state: Option<VerifiedState>,
}

/// The key the directory proved for the address just before a request was sent
/// ([`LogRequirements::verified_state`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedState {
    /// The epoch of the answer that proved it (counted only when it is the request's
    /// `verified_epoch`).
    pub epoch: u64,
    /// The epoch at which the directory recorded that version.
    pub recorded_at: u64,
    /// The SHA-256 of the key's binary packets (64 hex digits), as the entry commits to it.
    pub key_hash: String,
}

/// What identifies the key directory whose head the client had verified when it sent a
/// request ([`LogRequirements::verified_log`]), all 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedLog {
    /// The head key the head was verified with (the pin then).
    pub head_key: String,
    /// The VRF key the head names.
    pub vrf_key: String,
    /// The head's root: the directory's state at `verified_epoch`.
    pub root: String,
    /// Where the client's remembered history then had started
    /// ([`super::log_memory::DomainMemory::started_at`]; absent in a request of a kst from
    /// before it, or of a memory without it: the root alone decides then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    requests: Vec<Entry>,
}

/// The state file.
#[derive(Debug, Clone)]
pub struct State {
    path: PathBuf,
}

/// A state-file failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("pending-request file {path}: {message}")]
pub struct StateError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong and what to do.
    pub message: String,
}

impl State {
    /// The state kept in `path` (created on first use).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        State { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: impl Into<String>) -> StateError {
        StateError {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Every pending request, oldest first.
    pub fn list(&self) -> Result<Vec<Entry>, StateError> {
        let _lock = self.lock()?;
        Ok(self.read()?.requests)
    }

    /// Adds a request (before it is sent).
    pub fn add(&self, entry: Entry) -> Result<(), StateError> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
        file.requests
            .retain(|e| e.pending.message_id != entry.pending.message_id);
        file.requests.push(entry);
        self.write(&file)
    }

    /// Removes the request with `message_id` (answered, or never sent). True when it was there.
    pub fn remove(&self, message_id: &str) -> Result<bool, StateError> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
        let before = file.requests.len();
        file.requests.retain(|e| e.pending.message_id != message_id);
        if file.requests.len() == before {
            return Ok(false);
        }
        self.write(&file)?;
        Ok(true)
    }

    fn lock(&self) -> Result<File, StateError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            durable::create_dir(dir).map_err(|e| self.err(e.to_string()))?;
        }
        let lock_path = self.path.with_extension("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.err(format!("cannot open {}: {e}", lock_path.display())))?;
        f.lock_exclusive()
            .map_err(|e| self.err(format!("cannot lock {}: {e}", lock_path.display())))?;
        Ok(f)
    }

    fn read(&self) -> Result<StateFile, StateError> {
        match fs::read(&self.path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(StateFile::default()),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                self.err(format!(
                    "unreadable ({e}); move it away to start afresh (its requests are then lost)"
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(e) => Err(self.err(format!("cannot read: {e}"))),
        }
    }

    fn write(&self, file: &StateFile) -> Result<(), StateError> {
        let mut body = serde_json::to_vec_pretty(&StateFile {
            version: 1,
            requests: file.requests.clone(),
        })
        .map_err(|e| self.err(format!("cannot encode: {e}")))?;
        body.push(b'\n');
        // A fixed temporary name, under the lock: one a crash left behind is overwritten.
        let result = AtomicFile::create_with_temp(&self.path, self.path.with_extension("tmp"))
            .and_then(|mut f| {
                f.write_bytes(&body)?;
                f.commit()
            });
        result.map_err(|e| self.err(format!("cannot write: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::Address;
    use kst_core::client::build_retrieval;

    fn entry(to: &str) -> Entry {
        let req = build_retrieval(
            &Address::from_normalized("carol@acme.net").unwrap(),
            &Address::from_normalized(to).unwrap(),
        );
        Entry {
            pending: req.pending,
            account: "carol@acme.net".into(),
            route: "submission".into(),
            import: false,
            log: None,
        }
    }

    /// A pending-request file written before the key directory requirements existed still
    /// reads (no `log`), and one with them round-trips.
    #[test]
    fn entries_without_and_with_log_requirements_read() {
        let old = r#"{"pending":{"kind":"retrieval","address":"bob@example.net","message_id":"m@x","service":"keys@example.net","k_auth":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","created_at":1},"account":"carol@acme.net","route":"submission"}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!(e.log, None);
        assert!(!serde_json::to_string(&e).unwrap().contains("\"log\""));
        // Requirements kept before the verified epoch was: unknown.
        let old_log = old.replace(
            r#""route":"submission"}"#,
            r#""route":"submission","log":{"http":true,"witness_max_age":86400}}"#,
        );
        let e: Entry = serde_json::from_str(&old_log).unwrap();
        assert!(
            e.log
                .as_ref()
                .is_some_and(|l| l.http && l.verified_epoch.is_none() && l.verified_log.is_none())
        );
        // A verified epoch kept before the directory it is of was (review F8): it loads,
        // without the directory (the check then does not use the epoch).
        let epoch_only = old.replace(
            r#""route":"submission"}"#,
            r#""route":"submission","log":{"http":true,"witness_max_age":86400,"verified_epoch":500}}"#,
        );
        let e: Entry = serde_json::from_str(&epoch_only).unwrap();
        assert!(
            e.log
                .as_ref()
                .is_some_and(|l| l.verified_epoch == Some(500) && l.verified_log.is_none())
        );
        let mut with = entry("bob@example.net");
        with.log = Some(LogRequirements {
            http: true,
            witnesses: vec!["w:00".into()],
            since_head: Some("kst-log-head-v1\n".into()),
            verified_epoch: Some(7),
            verified_log: Some(VerifiedLog {
                head_key: "11".repeat(32),
                vrf_key: "22".repeat(32),
                root: "33".repeat(32),
                started_at: Some("5:".to_string() + &"44".repeat(32)),
            }),
            verified_state: Some(VerifiedState {
                epoch: 7,
                recorded_at: 6,
                key_hash: "55".repeat(32),
            }),
            ..LogRequirements::default()
        });
        let text = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), with);
    }

    #[test]
    fn add_list_remove_survive_a_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/pending.json");
        let a = entry("alice@example.net");
        let b = entry("bob@example.net");
        State::new(&path).add(a.clone()).unwrap();
        State::new(&path).add(b.clone()).unwrap();
        assert_eq!(
            State::new(&path).list().unwrap(),
            vec![a.clone(), b.clone()]
        );
        assert!(State::new(&path).remove(&a.pending.message_id).unwrap());
        assert!(!State::new(&path).remove(&a.pending.message_id).unwrap());
        assert_eq!(State::new(&path).list().unwrap(), vec![b]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the file holds K_auth: {mode:o}");
        }
    }

    #[test]
    fn a_missing_file_is_empty_and_a_corrupt_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.json");
        assert!(State::new(&path).list().unwrap().is_empty());
        fs::write(&path, b"{not json").unwrap();
        let err = State::new(&path).list().unwrap_err().to_string();
        assert!(
            err.contains("pending.json") && err.contains("move it away"),
            "{err}"
        );
    }
}
