//! The client's memory of key directories (feature `transparency`), in the state directory
//! (the directory of the pending-request file, `~/.local/state/kst/` by default), under
//! `transparency/`:
//!
//! - `<domain>.json`: the domain's pinned head key and VRF key (where they came from, when),
//!   and the newest head the client verified (its signed text). Written atomically and
//!   durably under an exclusive lock on `<domain>.lock`, which a check holds from reading the
//!   remembered head to writing the new one.
//! - `evidence/<domain>-<unix time>-<n>.txt`: what a failed check saw (the remembered head, the
//!   answer, what failed), kept for the user to show: a fork, a rollback or a changed key.
//! - `own-<account>.fingerprints`: the fingerprints the account published through this client
//!   (the owner's monitor, `kst client status`, reports versions of the address not among
//!   them).
//! - `own-<account>.deletions`: the deletions of the account's key this client asked for and
//!   the KST confirmed, each with when it was asked for and confirmed (`status` reports a
//!   deletion in the directory that none of them explains: [`OwnDeletion`]).
//!
//! [`check_and_remember`] is the memory check every verified answer goes through.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;
use kst_core::durable::{self, AtomicFile};
use kst_core::transparency::answer::{LogAnswer, head_text, parse_head};
use kst_core::transparency::{Head, SignedHead};
use serde::{Deserialize, Serialize};

/// What went wrong with the memory or the check against it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The answer does not extend the remembered head: a fork, a rollback, a changed key, a
    /// missing or failing append-only proof. An attack (exit 5); the evidence is kept.
    #[error("{message} (evidence kept in {})", evidence.display())]
    Attack {
        /// What failed.
        message: String,
        /// The evidence file.
        evidence: PathBuf,
    },
    /// The memory could not be read or written: a local problem (exit 78), named with its
    /// file and what to do.
    #[error("key directory memory {}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
}

/// Where a pinned key came from.
pub mod source {
    /// A DNSSEC-validated `_kst-log.<domain>` TXT record.
    pub const DNS_SECURE: &str = "dns (dnssec secure)";
    /// A `_kst-log.<domain>` TXT record from an unsigned zone (or without validation).
    pub const DNS_INSECURE: &str = "dns (not dnssec-signed)";
    /// The `kst-log` file of the domain's WKD policy directory, over HTTPS.
    pub const WKD_HTTPS: &str = "wkd policy directory (https)";
    /// The same over plain HTTP (a `--log-url http://...`: not authenticated).
    pub const WKD_HTTP: &str = "wkd policy directory (plain http)";
    /// `--log-key` on the command line.
    pub const FLAG: &str = "--log-key";
    /// The first head verified with a key pinned without its VRF key (`--log-key`).
    pub const FIRST_HEAD: &str = "the first verified head";
}

/// What the client keeps about one domain's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainMemory {
    /// The served domain.
    pub domain: String,
    /// The pinned head key (64 hex digits).
    pub head_key: Option<String>,
    /// The pinned VRF key (64 hex digits), when known.
    pub vrf_key: Option<String>,
    /// Where the pin came from ([`source`]).
    #[serde(default)]
    pub pinned_from: String,
    /// When it was pinned (Unix time).
    #[serde(default)]
    pub pinned_at: u64,
    /// The newest verified head, as `kst-log-head-v1` text.
    pub head: Option<String>,
    /// The roots of the newest [`MAX_KNOWN_ROOTS`] epochs of the remembered history (epoch →
    /// root, hex): those of the heads remembered and those the verified append-only proofs
    /// established. A head older than the remembered one with a root listed here is of the
    /// same history (a reply that arrived after a newer one), not a rollback.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub roots: std::collections::BTreeMap<u64, String>,
    /// Where the remembered history started (`<epoch>:<root>` of the first head remembered
    /// after a fresh start: a new memory, a new pin, `kst client log-pin`; or, for a memory
    /// written before this field, the head remembered when it was set). Kept across
    /// verified extensions and across a new start from a head the required witnesses
    /// cosigned (they cosigned the remembered head too): the epochs of one start are of one
    /// history, whose roots the cache may no longer hold ([`DomainMemory::same_log`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

/// The most roots [`DomainMemory::roots`] keeps.
pub const MAX_KNOWN_ROOTS: usize = 1024;

impl DomainMemory {
    /// The remembered head, parsed.
    pub fn remembered_head(&self) -> Option<SignedHead> {
        self.head.as_deref().and_then(|t| parse_head(t).ok())
    }

    /// The remembered head's epoch.
    pub fn remembered_epoch(&self) -> Option<u64> {
        self.remembered_head().map(|h| h.head.epoch)
    }

    /// The remembered head's epoch and what identifies the directory it is of (the pinned
    /// head key, the head's VRF key and root), kept with a request sent now
    /// ([`super::state::LogRequirements::verified_log`]); `None` before any verified head.
    pub fn verified(&self) -> Option<(u64, super::state::VerifiedLog)> {
        let head = self.remembered_head()?.head;
        Some((
            head.epoch,
            super::state::VerifiedLog {
                head_key: self.head_key.clone()?,
                vrf_key: hex::encode(head.vrf_public_key),
                root: hex::encode(head.root_hash),
                started_at: self.started_at.clone(),
            },
        ))
    }

    /// Whether `epoch`, verified with `log`, is an epoch of the directory this memory
    /// follows now: the same pinned head key and VRF key, and the same root kept for that
    /// epoch, or, when its root is no longer kept (more than [`MAX_KNOWN_ROOTS`] epochs
    /// past it, or a witnessed new start since), the same start of the remembered history
    /// ([`DomainMemory::started_at`]; review R1). A memory started afresh since (`kst
    /// client log-pin`, a new pin, a deleted memory) counts epochs of its own start only:
    /// a directory the user accepted going back, even with the same keys, may have another
    /// history after that point.
    pub fn same_log(&self, epoch: u64, log: &super::state::VerifiedLog) -> bool {
        if !self.same_keys(log) {
            return false;
        }
        match self.known_root(epoch) {
            Some(r) => hex::encode(r).eq_ignore_ascii_case(&log.root),
            None => self.same_start(log) && self.remembered_epoch().is_some_and(|e| epoch <= e),
        }
    }

    /// The root this memory keeps for `epoch` when it differs from the one `log` names,
    /// although both are of the same start of the history with the same keys: two roots
    /// for one epoch, each verified by this client (a fork; review R1).
    pub fn fork_at(&self, epoch: u64, log: &super::state::VerifiedLog) -> Option<[u8; 32]> {
        if !self.same_keys(log) || !self.same_start(log) {
            return None;
        }
        self.known_root(epoch)
            .filter(|r| !hex::encode(r).eq_ignore_ascii_case(&log.root))
    }

    fn same_keys(&self, log: &super::state::VerifiedLog) -> bool {
        let same =
            |ours: Option<&str>, theirs: &str| ours.is_some_and(|o| o.eq_ignore_ascii_case(theirs));
        same(self.head_key.as_deref(), &log.head_key) && same(self.vrf_key.as_deref(), &log.vrf_key)
    }

    fn same_start(&self, log: &super::state::VerifiedLog) -> bool {
        log.started_at.is_some() && log.started_at == self.started_at
    }

    /// The root of `epoch` in the remembered history, if kept.
    pub fn known_root(&self, epoch: u64) -> Option<[u8; 32]> {
        self.roots
            .get(&epoch)
            .and_then(|r| kst_core::transparency::answer::hex32(r).ok())
    }

    /// Keeps `roots` (verified: of the remembered history), the newest [`MAX_KNOWN_ROOTS`].
    pub fn keep_roots(&mut self, roots: impl IntoIterator<Item = (u64, [u8; 32])>) {
        for (epoch, root) in roots {
            self.roots.insert(epoch, hex::encode(root));
        }
        while self.roots.len() > MAX_KNOWN_ROOTS {
            self.roots.pop_first();
        }
    }

    /// Remembers `head` (verified, extending the remembered history) and its root.
    pub fn remember(&mut self, head: &SignedHead) -> Result<(), String> {
        let text = head_text(head).map_err(|e| format!("cannot encode the head: {e}"))?;
        if self.head.is_none() || self.started_at.is_none() {
            self.started_at = Some(format!(
                "{}:{}",
                head.head.epoch,
                hex::encode(head.head.root_hash)
            ));
        }
        self.head = Some(text);
        self.keep_roots([(head.head.epoch, head.head.root_hash)]);
        Ok(())
    }

    /// Starts the remembered history again at `head` (a head cosigned by the witnesses the
    /// client requires, when the remembered head is too far behind for a proof): the roots
    /// of the old history are forgotten, its start ([`DomainMemory::started_at`]) is kept
    /// (the witnesses cosigned the remembered head too: one history).
    pub fn restart(&mut self, head: &SignedHead) -> Result<(), String> {
        self.roots.clear();
        self.remember(head)
    }
}

/// The memory directory.
#[derive(Debug, Clone)]
pub struct LogMemory {
    dir: PathBuf,
}

/// An exclusive hold on one domain's memory (released when dropped, or for a while by
/// [`LogMemory::release`]).
#[derive(Debug)]
pub struct Held {
    /// The lock; `None` while released ([`LogMemory::release`]): `memory` is then a copy of
    /// what was read, which may be out of date, and is not saved.
    lock: Option<File>,
    /// The domain.
    pub domain: String,
    /// What was read under the lock.
    pub memory: DomainMemory,
}

impl LogMemory {
    /// The memory next to the pending-request file `state_file`.
    pub fn beside(state_file: &Path) -> LogMemory {
        let base = state_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        LogMemory::in_dir(base)
    }

    /// The memory in `<state_dir>/transparency`.
    pub fn in_dir(state_dir: &Path) -> LogMemory {
        LogMemory {
            dir: state_dir.join("transparency"),
        }
    }

    /// The memory's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path, message: impl Into<String>) -> MemoryError {
        MemoryError::Io {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// A domain's file name: the domain is normalized already; anything but letters, digits,
    /// `-` and `.` is refused (no path tricks through a domain name).
    fn file(&self, domain: &str, ext: &str) -> Result<PathBuf, MemoryError> {
        if domain.is_empty()
            || domain.starts_with('.')
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(self.io(
                &self.dir,
                format!("{domain:?} is not a domain name the memory keeps"),
            ));
        }
        Ok(self.dir.join(format!("{domain}.{ext}")))
    }

    /// Locks `domain`'s memory and reads it.
    pub fn hold(&self, domain: &str) -> Result<Held, MemoryError> {
        durable::create_dir(&self.dir).map_err(|e| self.io(&self.dir, e.to_string()))?;
        let lock_path = self.file(domain, "lock")?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(&lock_path, format!("cannot open: {e}")))?;
        lock.lock_exclusive()
            .map_err(|e| self.io(&lock_path, format!("cannot lock: {e}")))?;
        let path = self.file(domain, "json")?;
        let memory = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<DomainMemory>(&bytes).map_err(|e| {
                self.io(
                    &path,
                    format!(
                        "unreadable ({e}); move it away to start afresh (the pinned keys and \
                         the remembered head are then forgotten)"
                    ),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DomainMemory {
                domain: domain.to_string(),
                ..DomainMemory::default()
            },
            Err(e) => return Err(self.io(&path, format!("cannot read: {e}"))),
        };
        if memory.domain != domain {
            return Err(self.io(&path, format!("holds the memory of {:?}", memory.domain)));
        }
        Ok(Held {
            lock: Some(lock),
            domain: domain.to_string(),
            memory,
        })
    }

    /// Lets go of `held`'s lock for a while (review R6: the slow reading of a history and
    /// its older pages must not hold every other kst command for the domain): `held.memory`
    /// stays as read, for reading only; [`LogMemory::hold_again`] takes the lock back and
    /// reads the memory afresh (another process may have moved it meanwhile).
    pub fn release(&self, held: &mut Held) {
        held.lock = None;
    }

    /// Takes `held`'s lock again after [`LogMemory::release`] and reads the memory afresh.
    pub fn hold_again(&self, held: &mut Held) -> Result<(), MemoryError> {
        *held = self.hold(&held.domain)?;
        Ok(())
    }

    /// Writes `held.memory` (atomically, durably; the lock is still held).
    pub fn save(&self, held: &Held) -> Result<(), MemoryError> {
        let path = self.file(&held.domain, "json")?;
        if held.lock.is_none() {
            return Err(self.io(
                &path,
                "not saved: the memory was read without its lock (a kst bug: report it)",
            ));
        }
        let mut body = serde_json::to_vec_pretty(&held.memory)
            .map_err(|e| self.io(&path, format!("cannot encode: {e}")))?;
        body.push(b'\n');
        AtomicFile::create_with_temp(&path, path.with_extension("tmp"))
            .and_then(|mut f| {
                f.write_bytes(&body)?;
                f.commit()
            })
            .map_err(|e| self.io(&path, format!("cannot write: {e}")))
    }

    /// Keeps `text` as evidence about `domain`; returns its path.
    pub fn keep_evidence(&self, domain: &str, text: &str) -> Result<PathBuf, MemoryError> {
        let dir = self.dir.join("evidence");
        durable::create_dir(&dir).map_err(|e| self.io(&dir, e.to_string()))?;
        let stem = self.file(domain, "x")?;
        let stem = stem
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let now = kst_core::time::unix_now();
        for n in 0..1000 {
            let path = dir.join(format!("{stem}-{now}-{n}.txt"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(text.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| self.io(&path, format!("cannot write: {e}")))?;
                    return Ok(path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.io(&path, format!("cannot create: {e}"))),
            }
        }
        Err(self.io(&dir, "too many evidence files this second"))
    }

    /// Keeps evidence about `held`'s domain (the remembered state, what was seen, what
    /// failed: `message`); returns its path.
    pub fn keep(&self, held: &Held, message: &str, seen: &str) -> Result<PathBuf, MemoryError> {
        let text = format!(
            "kst key directory evidence\ndomain {}\ntime {}\nfailure {message}\n\n\
             -- remembered --\n{}\n-- seen --\n{seen}\n",
            held.domain,
            kst_core::time::unix_now(),
            serde_json::to_string_pretty(&held.memory).unwrap_or_default(),
        );
        self.keep_evidence(&held.domain, &text)
    }

    /// An attack about `held`'s domain: keeps the evidence ([`LogMemory::keep`]) and returns
    /// the error to report.
    pub fn attack(&self, held: &Held, message: String, seen: &str) -> MemoryError {
        match self.keep(held, &message, seen) {
            Ok(evidence) => MemoryError::Attack { message, evidence },
            Err(e) => MemoryError::Attack {
                message: format!("{message}; and the evidence could not be kept: {e}"),
                evidence: self.dir.join("evidence"),
            },
        }
    }

    /// The fingerprints `account` published through this client.
    pub fn own_fingerprints(&self, account: &str) -> Vec<String> {
        read_list(self.own_file(account))
    }

    /// Notes that `account` published `fingerprint` (kept for the owner's monitor).
    pub fn note_own_fingerprint(
        &self,
        account: &str,
        fingerprint: &str,
    ) -> Result<(), MemoryError> {
        let held = self.hold(&format!("own-{}", own_name(account)))?;
        let path = self.own_file(account)?;
        let mut list = self.own_fingerprints(account);
        if list.iter().any(|f| f.eq_ignore_ascii_case(fingerprint)) {
            return Ok(());
        }
        list.push(fingerprint.to_string());
        let result = self.write_list(&path, &list);
        drop(held);
        result
    }

    /// Writes `list` to `path` as JSON, atomically and durably (the caller holds its lock).
    fn write_list<T: Serialize>(&self, path: &Path, list: &[T]) -> Result<(), MemoryError> {
        let body = serde_json::to_vec_pretty(list)
            .map_err(|e| self.io(path, format!("cannot encode: {e}")))?;
        AtomicFile::create_with_temp(path, path.with_extension("tmp"))
            .and_then(|mut f| {
                f.write_bytes(&body)?;
                f.commit()
            })
            .map_err(|e| self.io(path, format!("cannot write: {e}")))
    }

    fn own_file(&self, account: &str) -> Result<PathBuf, MemoryError> {
        self.file(&format!("own-{}", own_name(account)), "fingerprints")
    }

    /// The deletions of `account`'s key this client asked for and the KST confirmed, oldest
    /// first (an unreadable file reads as none: the monitor then reports every deletion).
    pub fn own_deletions(&self, account: &str) -> Vec<OwnDeletion> {
        read_list(self.deletions_file(account))
    }

    /// Notes that `account` asked at `requested_at` for its key's deletion and the KST
    /// confirmed it at `confirmed_at` (Unix times of this machine). The newest
    /// [`MAX_OWN_DELETIONS`] are kept.
    pub fn note_own_deletion(
        &self,
        account: &str,
        requested_at: u64,
        confirmed_at: u64,
    ) -> Result<(), MemoryError> {
        let held = self.hold(&format!("own-{}", own_name(account)))?;
        let path = self.deletions_file(account)?;
        let mut list = self.own_deletions(account);
        list.push(OwnDeletion {
            requested_at,
            confirmed_at,
        });
        let excess = list.len().saturating_sub(MAX_OWN_DELETIONS);
        list.drain(..excess);
        let result = self.write_list(&path, &list);
        drop(held);
        result
    }

    fn deletions_file(&self, account: &str) -> Result<PathBuf, MemoryError> {
        self.file(&format!("own-{}", own_name(account)), "deletions")
    }
}

/// A JSON list kept in the memory; a missing or unreadable file reads as empty.
fn read_list<T: serde::de::DeserializeOwned>(path: Result<PathBuf, MemoryError>) -> Vec<T> {
    path.ok()
        .and_then(|p| fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Vec<T>>(&b).ok())
        .unwrap_or_default()
}

/// The most own deletions kept per account.
pub const MAX_OWN_DELETIONS: usize = 1024;

/// How far apart this machine's clock and the KST's may be when a deletion the directory
/// recorded is matched with one the client asked for ([`OwnDeletion::explains`]).
pub const DELETION_CLOCK_SLACK: u64 = 600;

/// A deletion of the account's key that this client asked for and the KST confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnDeletion {
    /// When the request was built (Unix time, this machine's clock).
    pub requested_at: u64,
    /// When the client read the KST's confirmation (Unix time, this machine's clock).
    pub confirmed_at: u64,
}

impl OwnDeletion {
    /// Whether this deletion explains a deletion the directory dated `changed_at` (the KST's
    /// clock): the KST deleted the key between the request and its confirmation, give or take
    /// [`DELETION_CLOCK_SLACK`].
    pub fn explains(&self, changed_at: u64) -> bool {
        self.requested_at.saturating_sub(DELETION_CLOCK_SLACK) <= changed_at
            && changed_at <= self.confirmed_at.saturating_add(DELETION_CLOCK_SLACK)
    }
}

/// An account as a file-name part: `@` becomes `-at-`, anything else unusual `-`.
fn own_name(account: &str) -> String {
    account
        .chars()
        .map(|c| match c {
            '@' => "-at-".to_string(),
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' => c.to_string(),
            _ => "-".to_string(),
        })
        .collect()
}

/// What [`check_and_remember`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The epoch remembered before (`None`: the first head of this domain).
    pub previous: Option<u64>,
    /// The epoch remembered now.
    pub epoch: u64,
}

/// The memory check of a verified answer (its head signature and proof already checked with
/// the domain's head key, e.g. by [`LogAnswer::verify`]): against the newest head remembered
/// for `domain` in `state_dir`, the answer's head must have the pinned VRF key, must not be
/// older, must have the same root for the same epoch, and for a newer epoch must carry an
/// append-only proof from the remembered one that verifies. Then the newer head is remembered.
/// Any failure is [`MemoryError::Attack`] with the evidence kept in the state directory.
///
/// `answer_text` is the answer as received (kept as evidence; `None`: its re-encoding).
pub async fn check_and_remember(
    domain: &str,
    answer: &LogAnswer,
    answer_text: Option<&str>,
    state_dir: &Path,
) -> Result<Remembered, MemoryError> {
    let memory = LogMemory::in_dir(state_dir);
    let mut held = memory.hold(domain)?;
    let remembered = check_held(&memory, &mut held, answer, answer_text, None).await?;
    memory.save(&held)?;
    Ok(remembered)
}

/// The checks of an answer against `held`'s pin, before anything about its history: the
/// head is of the held domain, signed by the pinned head key, and names the pinned VRF key
/// (the first head verified pins its VRF key when only the head key was pinned). Every
/// answer the client takes passes them: [`check_held`], and the new start after a
/// `too-far` answer. `seen`: the evidence kept on failure.
pub fn check_pin(
    memory: &LogMemory,
    held: &mut Held,
    answer: &LogAnswer,
    seen: &dyn Fn() -> String,
) -> Result<(), MemoryError> {
    let head = &answer.head.head;
    if head.domain != held.domain {
        return Err(memory.attack(
            held,
            format!(
                "the answer's head is about {}, not {}",
                head.domain, held.domain
            ),
            &seen(),
        ));
    }
    if let Some(pinned) = &held.memory.head_key
        && let Ok(key) = kst_core::transparency::answer::hex32(pinned)
        && let Err(e) = answer.head.verify(&key)
    {
        return Err(memory.attack(held, e.to_string(), &seen()));
    }
    match &held.memory.vrf_key {
        Some(vrf) if !vrf.eq_ignore_ascii_case(&hex::encode(head.vrf_public_key)) => {
            return Err(memory.attack(
                held,
                format!(
                    "the head of {} at epoch {} names the VRF key {}, not the pinned {vrf}: \
                     another directory",
                    head.domain,
                    head.epoch,
                    hex::encode(head.vrf_public_key)
                ),
                &seen(),
            ));
        }
        Some(_) => {}
        None => {
            held.memory.vrf_key = Some(hex::encode(head.vrf_public_key));
            if held.memory.pinned_from.is_empty() {
                held.memory.pinned_from = source::FIRST_HEAD.into();
            }
        }
    }
    Ok(())
}

/// [`check_and_remember`]'s check on a memory already held (the caller read the remembered
/// epoch under the same lock, to ask for `?since=`): `held` is updated, **not saved**. The
/// caller saves it ([`LogMemory::save`]) only once every other check of the answer passed
/// (its witnesses): a head the client rejects is never remembered, or a forged head that
/// failed a later check would make the honest directory look like the fork. `asked`: the head
/// a version 3 request named (`KST-Log-Since`) when the memory may have moved on since it was
/// sent ([`LogAnswer::verify_extends_via`]).
pub async fn check_held(
    memory: &LogMemory,
    held: &mut Held,
    answer: &LogAnswer,
    answer_text: Option<&str>,
    asked: Option<&Head>,
) -> Result<Remembered, MemoryError> {
    let seen = || match answer_text {
        Some(t) => t.to_string(),
        None => answer.to_text().unwrap_or_default(),
    };
    check_pin(memory, held, answer, &seen)?;
    let head = &answer.head.head;
    let remembered = held.memory.remembered_head();
    if held.memory.head.is_some() && remembered.is_none() {
        return Err(memory.io(
            &memory.dir,
            format!(
                "the remembered head of {} does not parse; move {}.json away to start afresh",
                held.domain, held.domain
            ),
        ));
    }
    let previous = remembered.as_ref().map(|h| h.head.epoch);
    if let Some(old) = &remembered {
        if head.epoch < old.head.epoch
            && asked.is_some_and(|a| a.epoch <= head.epoch)
            && held.memory.known_root(head.epoch) == Some(head.root_hash)
        {
            // An older head of the remembered history, not older than the head the request
            // named (two version 3 replies handled in the opposite order of their epochs):
            // true when it was made, not a rollback; the newer head stays remembered. An
            // answer older than what its request named is a rollback, whatever its root.
            return Ok(Remembered {
                previous,
                epoch: old.head.epoch,
            });
        }
        match answer.verify_extends_via(asked, &old.head).await {
            Ok(roots) => held.memory.keep_roots(roots),
            Err(e) => {
                return Err(memory.attack(
                    held,
                    format!(
                        "possible fork or rollback of the key directory of {}: {e}",
                        held.domain
                    ),
                    &seen(),
                ));
            }
        }
    }
    if previous.is_none_or(|p| head.epoch > p) {
        held.memory
            .remember(&answer.head)
            .map_err(|e| memory.io(&memory.dir, e))?;
    }
    Ok(Remembered {
        previous,
        epoch: previous.map_or(head.epoch, |p| p.max(head.epoch)),
    })
}

/// A signed head of example.net's directory at `epoch` with the root `[root; 32]`, by one
/// signer per test process (the tests of the memory and of the two-step check).
#[cfg(test)]
pub(crate) fn test_head(epoch: u64, root: u8) -> SignedHead {
    static SIGNER: std::sync::OnceLock<kst_core::transparency::HeadSigner> =
        std::sync::OnceLock::new();
    SIGNER
        .get_or_init(kst_core::transparency::HeadSigner::generate)
        .sign(Head {
            domain: "example.net".into(),
            epoch,
            root_hash: [root; 32],
            vrf_public_key: [0xbb; 32],
            signed_at: 1,
        })
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_name_cannot_leave_the_memory_directory() {
        let dir = tempfile::tempdir().unwrap();
        let memory = LogMemory::in_dir(dir.path());
        for bad in ["../etc", ".hidden", "a/b", "", "example.net\0", "x y"] {
            let err = memory.hold(bad).unwrap_err().to_string();
            assert!(err.contains("not a domain name"), "{bad:?}: {err}");
        }
        let held = memory.hold("example.net").unwrap();
        assert_eq!(held.memory.domain, "example.net");
        assert!(held.memory.head.is_none());
    }

    #[test]
    fn the_memory_survives_a_new_instance_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("pending.json");
        let memory = LogMemory::beside(&state_file);
        let mut held = memory.hold("example.net").unwrap();
        held.memory.head_key = Some("11".repeat(32));
        memory.save(&held).unwrap();
        drop(held);
        let again = LogMemory::beside(&state_file).hold("example.net").unwrap();
        assert_eq!(again.memory.head_key, Some("11".repeat(32)));
        drop(again);

        let evidence = memory
            .attack(
                &memory.hold("example.net").unwrap(),
                "a fork".into(),
                "seen text",
            )
            .to_string();
        assert!(
            evidence.contains("a fork") && evidence.contains("evidence"),
            "{evidence}"
        );
        let kept: Vec<_> = fs::read_dir(memory.dir().join("evidence"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(kept.len(), 1);
        let text = fs::read_to_string(kept[0].path()).unwrap();
        assert!(
            text.contains("seen text") && text.contains("11111111"),
            "{text}"
        );

        fs::write(memory.dir().join("example.net.json"), b"{not json").unwrap();
        let err = memory.hold("example.net").unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
        // A file of another domain renamed into place is refused too.
        fs::write(
            memory.dir().join("example.net.json"),
            br#"{"domain":"example.org","head_key":null,"vrf_key":null,"head":null}"#,
        )
        .unwrap();
        let err = memory.hold("example.net").unwrap_err().to_string();
        assert!(err.contains("example.org"), "{err}");
    }

    /// Review F8: an epoch verified before a request counts only against the directory the
    /// memory follows: the same head key, VRF key and root for that epoch.
    #[test]
    fn a_verified_epoch_is_of_the_same_log_only_with_its_keys_and_root() {
        let log = crate::client::state::VerifiedLog {
            head_key: "aa".repeat(32),
            vrf_key: "bb".repeat(32),
            root: "cc".repeat(32),
            started_at: None,
        };
        let mut memory = DomainMemory {
            domain: "example.net".into(),
            head_key: Some("AA".repeat(32)),
            vrf_key: Some("bb".repeat(32)),
            ..DomainMemory::default()
        };
        memory.keep_roots([(6, [0xcc; 32]), (7, [0xdd; 32])]);
        assert!(memory.same_log(6, &log));
        // Another root for that epoch (a directory started again), or none kept.
        assert!(!memory.same_log(7, &log));
        assert!(!memory.same_log(5, &log));
        // Another head key or VRF key (re-keyed, re-pinned).
        let other_head = crate::client::state::VerifiedLog {
            head_key: "ab".repeat(32),
            ..log.clone()
        };
        assert!(!memory.same_log(6, &other_head));
        memory.vrf_key = Some("be".repeat(32));
        assert!(!memory.same_log(6, &log));
        memory.vrf_key = None;
        assert!(!memory.same_log(6, &log));
        // A memory started again forgets the roots.
        memory.vrf_key = Some("bb".repeat(32));
        memory.roots.clear();
        assert!(!memory.same_log(6, &log));
    }

    /// Review R1: the root cache is no identity. An epoch verified before a request stays
    /// of the directory the memory follows while the memory was not started afresh since
    /// (only extended by verified proofs, or started again from a head the required
    /// witnesses cosigned), also once that epoch's root is no longer kept (more than
    /// [`MAX_KNOWN_ROOTS`] epochs later, or after a witnessed new start); a memory started
    /// afresh (a re-pin, `kst client log-pin`, a deleted memory) does not count it, and a
    /// root kept for that epoch that differs is a fork.
    #[test]
    fn a_verified_epoch_outlives_its_cached_root_but_not_a_fresh_start() {
        let head = test_head;
        let fresh = || DomainMemory {
            domain: "example.net".into(),
            head_key: Some("aa".repeat(32)),
            vrf_key: Some("bb".repeat(32)),
            ..DomainMemory::default()
        };
        let mut memory = fresh();
        memory.remember(&head(3, 3)).unwrap();
        memory.remember(&head(6, 6)).unwrap();
        let (epoch, log) = memory.verified().unwrap();
        assert_eq!(epoch, 6);
        assert!(memory.same_log(6, &log));
        // The history moves on by verified proofs past the cache.
        memory.keep_roots((7..=1031).map(|e| (e, [e as u8; 32])));
        memory.remember(&head(1031, 1031u64 as u8)).unwrap();
        assert_eq!(memory.known_root(6), None);
        assert!(memory.same_log(6, &log), "evicted root, same history");
        // A witnessed new start.
        memory.restart(&head(5000, 9)).unwrap();
        assert!(
            memory.same_log(6, &log),
            "witnessed new start, same history"
        );
        assert_eq!(memory.fork_at(6, &log), None);
        // Another root kept for that epoch, in the same history: a fork.
        memory.keep_roots([(6, [0x66; 32])]);
        assert!(!memory.same_log(6, &log));
        assert_eq!(memory.fork_at(6, &log), Some([0x66; 32]));
        // A fresh start (re-pin, log-pin, memory deleted) from another head, even with the
        // same keys: not counted without the root, and another root is no proven fork.
        let mut again = fresh();
        again.remember(&head(7, 7)).unwrap();
        assert!(!again.same_log(6, &log));
        assert_eq!(again.fork_at(6, &log), None);
        again.keep_roots([(6, [0x66; 32])]);
        assert_eq!(again.fork_at(6, &log), None, "another start: cannot tell");
        // A request from a kst that kept no start: as before, by the root only.
        let old = crate::client::state::VerifiedLog {
            started_at: None,
            ..log.clone()
        };
        assert!(!memory.same_log(7, &old));
        assert_eq!(memory.fork_at(6, &old), None);
    }

    /// Review R6: a released hold lets another command take the domain's lock, is not
    /// saved, and reads the memory afresh when held again.
    #[test]
    fn a_released_hold_frees_the_lock_and_reads_afresh_when_held_again() {
        let dir = tempfile::tempdir().unwrap();
        let memory = LogMemory::in_dir(dir.path());
        let mut held = memory.hold("example.net").unwrap();
        let lock = memory.dir().join("example.net.lock");
        let other = OpenOptions::new().write(true).open(&lock).unwrap();
        assert!(!other.try_lock_exclusive().unwrap(), "held: locked");
        memory.release(&mut held);
        assert!(other.try_lock_exclusive().unwrap(), "released: free");
        FileExt::unlock(&other).unwrap();
        // Another command moves the memory meanwhile.
        let mut moved = memory.hold("example.net").unwrap();
        moved.memory.head_key = Some("22".repeat(32));
        memory.save(&moved).unwrap();
        drop(moved);
        let err = memory.save(&held).unwrap_err().to_string();
        assert!(err.contains("without its lock"), "{err}");
        assert_eq!(held.memory.head_key, None, "the copy read before");
        memory.hold_again(&mut held).unwrap();
        assert_eq!(held.memory.head_key, Some("22".repeat(32)), "read afresh");
        assert!(!other.try_lock_exclusive().unwrap(), "held again: locked");
        memory.save(&held).unwrap();
    }

    #[test]
    fn own_fingerprints_are_kept_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let memory = LogMemory::in_dir(dir.path());
        memory
            .note_own_fingerprint("alice@example.net", "AA11")
            .unwrap();
        memory
            .note_own_fingerprint("alice@example.net", "aa11")
            .unwrap();
        memory
            .note_own_fingerprint("alice@example.net", "BB22")
            .unwrap();
        memory
            .note_own_fingerprint("../bob@example.net", "CC33")
            .unwrap();
        assert_eq!(
            memory.own_fingerprints("alice@example.net"),
            vec!["AA11", "BB22"]
        );
        assert!(memory.own_fingerprints("carol@example.net").is_empty());
        assert_eq!(memory.own_fingerprints("../bob@example.net"), vec!["CC33"]);
    }
}
