//! The spool mailer: one durable `.eml` file per reply in a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
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
/// A file appears under its final name only once it is complete and synced: readers should
/// ignore names that do not end in `.eml` (temporary files start with
/// [`durable::TEMP_PREFIX`]). File names sort
/// in the order replies were written.
///
/// `send` returns once the file and its directory entry are on disk. Replies written at the
/// same time share the directory `fsync` (a [`GroupCommit`]): each file is synced on its own,
/// the directory once per round of concurrent writers.
#[derive(Debug, Clone)]
pub struct SpoolMailer {
    dir: PathBuf,
    dir_sync: Arc<GroupCommit>,
}

impl SpoolMailer {
    /// A spool in `dir`; created (mode 0700) with the first reply or [`Mailer::check`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolMailer {
            dir: dir.into(),
            dir_sync: Arc::new(GroupCommit::new()),
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
        let bytes = Self::render(mail);
        let name = tokio::task::spawn_blocking(move || write_durably(&dir, &dir_sync, &bytes))
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

/// Writes `bytes` durably as a new `.eml` file in `dir` (created if missing): through a
/// temporary file, with the directory fsync shared with concurrent writers through `dir_sync`.
/// Returns the final path.
fn write_durably(
    dir: &Path,
    dir_sync: &GroupCommit,
    bytes: &[u8],
) -> Result<PathBuf, DurableError> {
    durable::create_dir(dir)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let target = dir.join(format!("{nanos:020}-{:016x}.eml", rand::random::<u64>()));
    let mut file = AtomicFile::create(&target)?;
    file.write_bytes(bytes)?;
    file.commit_shared(dir_sync)?;
    Ok(target)
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

    #[tokio::test]
    async fn send_fails_temporarily_when_the_directory_cannot_exist() {
        let m = SpoolMailer::new("/dev/null/outbox");
        let e = m.send(&mail(None)).await.unwrap_err();
        assert!(e.is_temporary());
        assert!(e.to_string().contains("mailer(spool)"), "{e}");
        assert!(m.check().await.unwrap_err().is_temporary());
    }
}
