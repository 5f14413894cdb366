//! The spool mailer: one durable `.eml` file per reply in a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
#[cfg(target_os = "linux")]
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kst_core::durable::{self, AtomicFile, DurableError};
use kst_core::{Component, Delivery, Error, GroupCommit, Mailer, OutgoingMail, Result};

const COMPONENT: Component = Component::mailer("spool");

/// Writes each reply as `<unix-nanos>-<random hex>.eml` into a directory, for another process
/// to send: `kst outbox send` ([`crate::server::outbox`]) from a timer, or a relay's pickup.
///
/// The envelope travels in two header lines put in front of the message:
/// `Return-Path: <sender>` (`<>` for the null sender) and `X-Kst-Envelope-To: recipient`.
/// A file appears under its final name only once it is complete and synced: on Linux it is
/// written unnamed (`O_TMPFILE`) and then linked in place (`write_durably`); elsewhere, or on
/// a file system without unnamed files, through a temporary file renamed in place, so readers
/// should ignore names that do not end in `.eml` (temporary files start with
/// [`durable::TEMP_PREFIX`]). File names sort in the order replies were written.
///
/// `send` returns once the file and its directory entry are on disk. Replies written at the
/// same time share the directory `fsync` (a [`GroupCommit`]): each file is synced on its own,
/// the directory once per round of concurrent writers.
#[derive(Debug, Clone)]
pub struct SpoolMailer {
    dir: PathBuf,
    dir_sync: Arc<GroupCommit>,
    /// Set once this spool's file system could not make or link an unnamed file: every reply
    /// goes through a named temporary file from then on.
    named_only: Arc<AtomicBool>,
}

impl SpoolMailer {
    /// A spool in `dir`; created (mode 0700) with the first reply or [`Mailer::check`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolMailer {
            dir: dir.into(),
            dir_sync: Arc::new(GroupCommit::new()),
            named_only: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bytes of the spool file for `mail`: envelope header lines, then the message.
    pub fn render(mail: &OutgoingMail) -> Vec<u8> {
        let from = mail
            .envelope_from
            .as_ref()
            .map(|a| a.as_str())
            .unwrap_or("");
        let mut out = Vec::with_capacity(mail.message.len() + 96);
        out.extend_from_slice(format!("Return-Path: <{from}>\r\n").as_bytes());
        out.extend_from_slice(format!("X-Kst-Envelope-To: {}\r\n", mail.recipient).as_bytes());
        out.extend_from_slice(&mail.message);
        out
    }
}

#[async_trait]
impl Mailer for SpoolMailer {
    fn name(&self) -> &'static str {
        "spool"
    }

    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
        let dir = self.dir.clone();
        let dir_sync = self.dir_sync.clone();
        let named_only = self.named_only.clone();
        let bytes = Self::render(mail);
        let name =
            tokio::task::spawn_blocking(move || write_durably(&dir, &dir_sync, &named_only, &bytes))
            .await
            .map_err(|e| Error::unavailable(COMPONENT, format!("writer task failed: {e}")))?
            .map_err(|e| {
                Error::unavailable(
                    COMPONENT,
                    format!(
                        "cannot write a reply into {}: {e}; check that the directory exists or can be created and is writable by this user",
                        self.dir.display()
                    ),
                )
            })?;
        tracing::debug!(file = %name.display(), message_id = %mail.message_id, "reply spooled");
        Ok(Delivery::Sent)
    }

    async fn check(&self) -> Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || probe(&dir))
            .await
            .map_err(|e| Error::unavailable(COMPONENT, format!("probe task failed: {e}")))?
            .map_err(|e| {
                Error::unavailable(
                    COMPONENT,
                    format!("{} is not writable: {e}", self.dir.display()),
                )
            })
    }
}

/// Writes `bytes` durably as a new `.eml` file in `dir` (created if missing), with the
/// directory fsync shared with concurrent writers through `dir_sync`. Returns the final path.
///
/// On Linux the file is made unnamed (`O_TMPFILE`), written, synced and then linked under its
/// name ([`unnamed::write`]): the spool directory is locked only for the link, not while the
/// kernel allocates the file's inode. With a named temporary file, the directory stays locked
/// through that allocation, which on ext4 without a journal after many deletions takes hundreds
/// of µs, and replies written at once (a key directory's epoch answers its publications
/// together) spent their CPU spinning on the lock (docs/BENCHMARKS.md, "Redis at 20 and 32
/// connections"). Where unnamed files cannot be made or linked (`named_only` is then set),
/// through a temporary file renamed in place.
fn write_durably(
    dir: &Path,
    dir_sync: &GroupCommit,
    named_only: &AtomicBool,
    bytes: &[u8],
) -> Result<PathBuf, DurableError> {
    durable::create_dir(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let target = dir.join(format!("{nanos:020}-{:016x}.eml", rand::random::<u64>()));
    #[cfg(target_os = "linux")]
    if !named_only.load(Ordering::Relaxed) {
        match unnamed::write(dir, &target, bytes)? {
            unnamed::Written::Linked => {
                dir_sync.commit(|| durable::sync_dir(dir))?;
                return Ok(target);
            }
            unnamed::Written::Unsupported => named_only.store(true, Ordering::Relaxed),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = named_only;
    let mut file = AtomicFile::create(&target)?;
    file.write_bytes(bytes)?;
    file.commit_shared(dir_sync)?;
    Ok(target)
}

/// Linux's unnamed files: a reply has no name until it is complete and synced.
#[cfg(target_os = "linux")]
mod unnamed {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::path::Path;

    use kst_core::durable::DurableError;
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    use rustix::io::Errno;

    /// What [`write`] did.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Written {
        /// The file is synced and linked under its name (its directory is not synced yet).
        Linked,
        /// This file system (or kernel, or a missing `/proc`) cannot make or link unnamed
        /// files; nothing was left behind.
        Unsupported,
    }

    fn error(step: &'static str, path: &Path, e: Errno) -> DurableError {
        DurableError {
            step,
            path: path.to_path_buf(),
            source: e.into(),
        }
    }

    /// Writes `bytes` into a new unnamed file in `dir`, syncs it and links it as `target`, a
    /// name in `dir` that must not exist (an existing file is never replaced: `link into
    /// place` fails with "File exists"). A file not linked is freed when it is closed, so a
    /// failure or a crash leaves nothing in the spool.
    pub(super) fn write(dir: &Path, target: &Path, bytes: &[u8]) -> Result<Written, DurableError> {
        let fd = match rustix::fs::open(
            dir,
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            // No O_TMPFILE in this file system (EOPNOTSUPP) or kernel (EISDIR, EINVAL).
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => return Ok(Written::Unsupported),
            Err(e) => return Err(error("create", dir, e)),
        };
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes).map_err(|e| DurableError {
            step: "write",
            path: target.to_path_buf(),
            source: e,
        })?;
        file.sync_all().map_err(|e| DurableError {
            step: "fsync",
            path: target.to_path_buf(),
            source: e,
        })?;
        // By its /proc name: linkat(2) of the descriptor itself (AT_EMPTY_PATH) needs
        // CAP_DAC_READ_SEARCH.
        let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
        match rustix::fs::linkat(CWD, proc.as_str(), CWD, target, AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => Ok(Written::Linked),
            Err(Errno::NOENT) if !Path::new("/proc/self/fd").is_dir() => Ok(Written::Unsupported),
            Err(e) => Err(error("link into place", target, e)),
        }
    }
}

/// Creates the directory if needed, then creates a temporary file in it and removes it.
fn probe(dir: &Path) -> Result<(), DurableError> {
    durable::create_dir(dir)?;
    // Dropped uncommitted: the temporary file is removed again.
    drop(AtomicFile::create(dir.join("probe"))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use kst_core::AddressPolicy;

    fn mail(from: Option<&str>) -> OutgoingMail {
        let p = AddressPolicy::default();
        OutgoingMail {
            envelope_from: from.map(|f| p.normalize(f).unwrap()),
            recipient: p.normalize("bob@acme.net").unwrap(),
            message: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
            message_id: "m1@example.net".into(),
        }
    }

    #[test]
    fn render_puts_the_envelope_first() {
        let text = String::from_utf8(SpoolMailer::render(&mail(None))).unwrap();
        assert_eq!(
            text,
            "Return-Path: <>\r\nX-Kst-Envelope-To: bob@acme.net\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        let text = String::from_utf8(SpoolMailer::render(&mail(Some("keys@example.net")))).unwrap();
        assert!(text.starts_with("Return-Path: <keys@example.net>\r\n"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_replies_each_land_complete_and_share_directory_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let spool = SpoolMailer::new(dir.path().join("outbox"));
        let sends: Vec<_> = (0..32)
            .map(|n| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    let mut m = mail(None);
                    m.message = format!("Subject: reply {n}\r\n\r\nbody {n}\r\n").into_bytes();
                    spool.send(&m).await
                })
            })
            .collect();
        for s in sends {
            s.await.unwrap().unwrap();
        }
        let mut bodies: Vec<String> = fs::read_dir(spool.dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .inspect(|p| assert!(p.extension().is_some_and(|x| x == "eml"), "{p:?}"))
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        bodies.sort();
        let mut want: Vec<String> = (0..32)
            .map(|n| {
                format!(
                    "Return-Path: <>\r\nX-Kst-Envelope-To: bob@acme.net\r\nSubject: reply {n}\r\n\r\nbody {n}\r\n"
                )
            })
            .collect();
        want.sort();
        assert_eq!(bodies, want);
        // Every send waited for a directory sync, but they shared them.
        let flushes = spool.dir_sync.flushes();
        assert!((1..=32).contains(&flushes), "{flushes}");
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn both_ways_write_the_same_complete_reply_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let m = mail(Some("keys@example.net"));
        let mut written = Vec::new();
        for named in [false, true] {
            let spool = SpoolMailer::new(dir.path().join(format!("outbox-{named}")));
            spool
                .named_only
                .store(named, std::sync::atomic::Ordering::Relaxed);
            spool.send(&m).await.unwrap();
            let names = names(spool.dir());
            assert_eq!(names.len(), 1, "{names:?}");
            assert!(names[0].ends_with(".eml"), "{names:?}");
            written.push(fs::read(spool.dir().join(&names[0])).unwrap());
        }
        assert_eq!(written[0], SpoolMailer::render(&m));
        assert_eq!(written[1], written[0]);
    }

    /// An unnamed reply is linked under a new name only: a file already there (a name taken
    /// by chance, or planted) is neither replaced nor joined by a temporary file.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unnamed_reply_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("00000000000000000001-0000000000000001.eml");
        fs::write(&target, b"the earlier reply").unwrap();
        match unnamed::write(dir.path(), &target, b"another reply") {
            Err(e) => {
                assert_eq!(e.step, "link into place", "{e}");
                assert_eq!(e.source.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            }
            // A file system without unnamed files: nothing was written either.
            Ok(w) => assert_eq!(w, unnamed::Written::Unsupported),
        }
        assert_eq!(fs::read(&target).unwrap(), b"the earlier reply");
        assert_eq!(
            names(dir.path()),
            vec!["00000000000000000001-0000000000000001.eml"]
        );
    }

    #[tokio::test]
    async fn send_fails_temporarily_when_the_directory_cannot_exist() {
        let m = SpoolMailer::new("/dev/null/outbox");
        let e = m.send(&mail(None)).await.unwrap_err();
        assert!(e.is_temporary());
        assert!(e.to_string().contains("mailer(spool)"), "{e}");
        assert!(m.check().await.unwrap_err().is_temporary());
    }
}
