//! `kst outbox send`: hands the replies the spool mailer wrote to an SMTP relay.
//!
//! The spool (`[mailer] kind = "spool"`) makes each reply durable as one `.eml` file before kst
//! answers `250`; something must then send the files. This command does, with the relay settings
//! of `[mailer]` (`host`, `port`, `tls`, `username`, `password`, `timeout_secs`: the same keys
//! `kind = "smtp"` uses) over the pooled SMTP mailer:
//!
//! - files are sent oldest first (their names sort by the time they were written);
//! - a file is removed only after the relay's `250` to its data, and the directory is synced at
//!   the end, so a crash can at worst send a reply twice, never lose one;
//! - a file that is not a spool file (no envelope lines, a bad address) is renamed to
//!   `<name>.bad`, logged and skipped: readers ignore names that do not end in `.eml`;
//! - a reply the relay refuses with a 5xx (to its `RCPT TO` or its data: a recipient that does
//!   not exist, a message it will not take) is renamed to `<name>.refused`, logged and not sent
//!   again; one it defers with a 4xx stays for the next run as `<name>.deferred.eml` (sent
//!   after the replies never tried), up to [`MAX_DEFERRED`] (5 days) after it was written,
//!   then it is set aside the same way; either way the run goes on, so
//!   that one reply (a forged request's sender, say) cannot hold back everyone else's;
//! - the first failure of the relay itself (connection, TLS, AUTH, a refused `MAIL FROM`, a
//!   timeout) stops the run: the rest stays for the next run;
//! - one sender at a time: a second run while one holds `<dir>/.send.lock` does nothing.
//!
//! Run it from a timer (every minute) or after `kst serve` in a loop; see docs/OPERATIONS.md.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;
use kst_core::durable;
use kst_core::{Address, AddressPolicy, Mailer, OutgoingMail};

use clap::Subcommand;

use crate::exit;
use crate::server::mailer::{SmtpMailer, SubmitError};
use crate::shared::config::{Config, MailerConfig};
use crate::shared::{logging, report};

/// `kst outbox ...`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Hand every reply in the spool (`[mailer] path`) to the SMTP relay of `[mailer]` (`host`,
    /// `port`, `tls`, `username`, `password`), oldest first, removing each file after the
    /// relay's 250.
    ///
    /// For `[mailer] kind = "spool"`: kst makes each reply durable in the spool before it answers
    /// its MTA, and this command sends them, e.g. every minute from a timer:
    ///   kst --config /etc/kst/kst.toml outbox send
    /// A file that is not a spool file is renamed to <name>.bad and skipped; a reply the relay
    /// refuses with a 5xx is renamed to <name>.refused (logged, not sent again); one it defers
    /// with a 4xx stays for the next run as <name>.deferred.eml, sent after the new replies
    /// (for at most 5 days, then it is set aside too). Only one run sends at a time. Exit codes: 0
    /// everything sent or refused (or nothing to send), 65 some files set aside as .bad, 75 the
    /// relay failed or deferred a reply (what is left stays for the next run), 78
    /// configuration.
    Send {
        /// The spool directory, instead of `[mailer] path`.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs `kst outbox ...` with the configuration at `config`; returns its exit code.
pub async fn run_command(config: Option<&Path>, cmd: OutboxCommand) -> u8 {
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => return report::config_error(&e),
    };
    logging::init(&cfg.log);
    match cmd {
        OutboxCommand::Send { dir } => {
            let dir = dir.unwrap_or_else(|| cfg.mailer.path.clone());
            send_and_report(&cfg.mailer, &dir).await
        }
    }
}

/// `kst outbox send`: runs it and says what it did.
async fn send_and_report(cfg: &MailerConfig, dir: &Path) -> u8 {
    match send(cfg, dir).await {
        Ok(r) if r.busy => {
            eprintln!(
                "kst: another `kst outbox send` is sending {}; nothing done",
                dir.display()
            );
            exit::OK
        }
        Ok(r) => {
            eprintln!(
                "kst: {} sent, {} set aside as .bad, {} refused, {} deferred by the relay, {} left in {}",
                r.sent,
                r.set_aside,
                r.refused,
                r.deferred,
                r.left,
                dir.display()
            );
            if let Some(e) = &r.error {
                eprintln!("kst: stopped: {e}; the rest is sent by the next run");
                exit::TEMPFAIL
            } else if r.deferred > 0 {
                eprintln!("kst: the relay deferred some replies; the next run tries them again");
                exit::TEMPFAIL
            } else if r.set_aside > 0 {
                exit::DATAERR
            } else {
                exit::OK
            }
        }
        Err(e) => {
            eprintln!("kst: {e:#}");
            exit::TEMPFAIL
        }
    }
}

/// How long a reply the relay keeps deferring (4xx to its recipient) stays in the spool before
/// it is set aside as `.refused`: Postfix's default `maximal_queue_lifetime`.
pub const MAX_DEFERRED: std::time::Duration = std::time::Duration::from_secs(5 * 86_400);

/// True when the spool file at `path` was written more than [`MAX_DEFERRED`] ago.
fn deferred_too_long(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > MAX_DEFERRED)
}

/// What one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Replies the relay accepted (their files are gone).
    pub sent: usize,
    /// Files that are not spool files, renamed to `<name>.bad`.
    pub set_aside: usize,
    /// Replies the relay refused with a 5xx, renamed to `<name>.refused`.
    pub refused: usize,
    /// Replies the relay deferred with a 4xx; they stay for the next run.
    pub deferred: usize,
    /// Replies not tried because the relay failed (they stay for the next run).
    pub left: usize,
    /// The relay failure that stopped the run.
    pub error: Option<String>,
    /// Another `kst outbox send` held the lock: nothing was done.
    pub busy: bool,
}

/// A spool file split into its envelope and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolFile<'a> {
    /// `Return-Path:`: `None` for the null sender `<>`.
    pub envelope_from: Option<Address>,
    /// `X-Kst-Envelope-To:`.
    pub recipient: Address,
    /// The message after the two envelope lines.
    pub message: &'a [u8],
}

/// Splits `raw` (as written by [`crate::server::mailer::SpoolMailer::render`]) into envelope and
/// message; says what is wrong otherwise.
pub fn parse(raw: &[u8]) -> Result<SpoolFile<'_>, String> {
    let policy = AddressPolicy::default();
    let (first, rest) = line(raw).ok_or("no Return-Path line")?;
    let (second, message) = line(rest).ok_or("no X-Kst-Envelope-To line")?;
    let from = first
        .strip_prefix("Return-Path:")
        .ok_or("the first line is not Return-Path:")?
        .trim();
    let from = from
        .strip_prefix('<')
        .and_then(|f| f.strip_suffix('>'))
        .ok_or("Return-Path is not <address> or <>")?;
    let envelope_from = match from {
        "" => None,
        f => Some(
            policy
                .as_received(f)
                .map_err(|e| format!("Return-Path {f:?}: {e}"))?,
        ),
    };
    let to = second
        .strip_prefix("X-Kst-Envelope-To:")
        .ok_or("the second line is not X-Kst-Envelope-To:")?
        .trim();
    let recipient = policy
        .as_received(to)
        .map_err(|e| format!("X-Kst-Envelope-To {to:?}: {e}"))?;
    if message.is_empty() {
        return Err("no message after the envelope lines".into());
    }
    Ok(SpoolFile {
        envelope_from,
        recipient,
        message,
    })
}

/// The first CRLF-terminated line of `raw` (as UTF-8) and what follows it.
fn line(raw: &[u8]) -> Option<(&str, &[u8])> {
    let end = raw.windows(2).position(|w| w == b"\r\n")?;
    let text = std::str::from_utf8(&raw[..end]).ok()?;
    Some((text, &raw[end + 2..]))
}

/// Sets the spool file at `path` (named `name`) aside as `<name>.refused`, never to be sent
/// again, and logs `why` with the relay's `error`: the relay refused the reply for good, or
/// kept deferring it for longer than [`MAX_DEFERRED`].
fn set_aside(
    path: &Path,
    name: &str,
    recipient: &Address,
    error: &dyn std::fmt::Display,
    why: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let refused = path.with_file_name(format!("{name}.refused"));
    fs::rename(path, &refused).with_context(|| format!("cannot set aside {}", path.display()))?;
    tracing::error!(
        file = %name,
        recipient = %recipient,
        error = %error,
        "{why}: renamed to .refused, not sent again"
    );
    Ok(())
}

/// The suffix of a reply the relay deferred (4xx) in an earlier run: `<name>.deferred.eml`.
const DEFERRED_SUFFIX: &str = ".deferred.eml";

/// True for a spool file the relay deferred before.
fn was_deferred(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(DEFERRED_SUFFIX))
}

/// The `.eml` files of `dir` in the order a run sends them: the replies never tried first,
/// oldest first, then the ones the relay deferred before, oldest first (so that a pile of
/// deferred replies never holds back a new one); an empty list when the directory does not
/// exist.
pub fn pending(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_eml = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".eml") && !n.starts_with('.'));
        if is_eml {
            files.push(path);
        }
    }
    files.sort();
    let (deferred, fresh): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|p| was_deferred(p));
    Ok(fresh.into_iter().chain(deferred).collect())
}

/// Sends every spool file of `dir` to the relay of `cfg`. Errors only for a spool directory
/// that cannot be read or locked, or relay settings that cannot be used.
pub async fn send(cfg: &MailerConfig, dir: &Path) -> anyhow::Result<Report> {
    use anyhow::Context as _;
    let mailer = SmtpMailer::new(cfg).context("the relay settings of [mailer]")?;
    let mut report = Report::default();
    if !dir.is_dir() {
        return Ok(report);
    }
    let lock_path = dir.join(".send.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if !FileExt::try_lock_exclusive(&lock).unwrap_or(false) {
        report.busy = true;
        return Ok(report);
    }
    let files = pending(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let total = files.len();
    for (i, path) in files.iter().enumerate() {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let raw = match fs::read(path) {
            Ok(raw) => raw,
            // Gone meanwhile (someone else moved it): nothing to send.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mail = match parse(&raw) {
            Ok(f) => OutgoingMail {
                envelope_from: f.envelope_from,
                recipient: f.recipient,
                message: f.message.to_vec(),
                message_id: name.clone(),
            },
            Err(why) => {
                let bad = path.with_file_name(format!("{name}.bad"));
                fs::rename(path, &bad)
                    .with_context(|| format!("cannot set aside {}", path.display()))?;
                tracing::error!(file = %name, problem = %why, "not a spool file: renamed to .bad, not sent");
                report.set_aside += 1;
                continue;
            }
        };
        match mailer.submit(&mail).await {
            Ok(()) => {
                fs::remove_file(path)
                    .with_context(|| format!("sent, but cannot remove {}", path.display()))?;
                tracing::info!(file = %name, recipient = %mail.recipient, "reply sent");
                report.sent += 1;
            }
            Err(e) if e.is_permanent() => {
                set_aside(
                    path,
                    &name,
                    &mail.recipient,
                    &e,
                    "the relay refused this reply for good (a forged request's sender, or a recipient the relay does not know)",
                )?;
                report.refused += 1;
            }
            Err(SubmitError::Refused { error, .. }) if deferred_too_long(path) => {
                set_aside(
                    path,
                    &name,
                    &mail.recipient,
                    &error,
                    "the relay still defers this reply after the longest time a reply is kept (5 days, MAX_DEFERRED)",
                )?;
                report.refused += 1;
            }
            Err(SubmitError::Refused { error, .. }) => {
                // Marked, so that later runs send new replies before it (the rename keeps its
                // modification time, which says how long it has been waiting).
                if !was_deferred(path) {
                    let stem = name.strip_suffix(".eml").unwrap_or(&name);
                    let marked = path.with_file_name(format!("{stem}{DEFERRED_SUFFIX}"));
                    fs::rename(path, &marked)
                        .with_context(|| format!("cannot mark {} deferred", path.display()))?;
                }
                tracing::warn!(
                    file = %name,
                    recipient = %mail.recipient,
                    error = %error,
                    "the relay deferred this reply: it stays for the next run, after the new ones"
                );
                report.deferred += 1;
            }
            Err(SubmitError::Relay(e)) => {
                report.left = total - i;
                report.error = Some(e.to_string());
                break;
            }
        }
    }
    mailer.close().await;
    // Make the removals durable; a crash before this can only send a reply again.
    if report.sent > 0 || report.set_aside > 0 || report.refused > 0 || report.deferred > 0 {
        durable::sync_dir(dir)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::mailer::SpoolMailer;

    #[test]
    fn parses_what_the_spool_writes() {
        let p = AddressPolicy::default();
        for from in [None, Some("keys-bounces@example.net")] {
            let mail = OutgoingMail {
                envelope_from: from.map(|f| p.normalize(f).unwrap()),
                recipient: p.normalize("bob@acme.net").unwrap(),
                message: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
                message_id: "m@example.net".into(),
            };
            let raw = SpoolMailer::render(&mail);
            let f = parse(&raw).unwrap();
            assert_eq!(f.envelope_from, mail.envelope_from);
            assert_eq!(f.recipient, mail.recipient);
            assert_eq!(f.message, mail.message.as_slice());
        }
    }

    #[test]
    fn refuses_what_is_not_a_spool_file() {
        for (raw, why) in [
            (&b""[..], "no Return-Path"),
            (b"Subject: hi\r\n\r\nbody\r\n", "not Return-Path"),
            (
                b"Return-Path: bob@acme.net\r\nX-Kst-Envelope-To: bob@acme.net\r\nS: x\r\n",
                "<address>",
            ),
            (
                b"Return-Path: <>\r\nTo: bob@acme.net\r\nS: x\r\n",
                "not X-Kst-Envelope-To",
            ),
            (
                b"Return-Path: <>\r\nX-Kst-Envelope-To: a@b@c\r\nS: x\r\n",
                "X-Kst-Envelope-To",
            ),
            (
                b"Return-Path: <>\r\nX-Kst-Envelope-To: bob@acme.net\r\n",
                "no message",
            ),
            (
                b"Return-Path: <\xff>\r\nX-Kst-Envelope-To: bob@acme.net\r\nS: x\r\n",
                "no Return-Path",
            ),
        ] {
            let e = parse(raw).unwrap_err();
            assert!(e.contains(why), "{raw:?}: {e}");
        }
    }

    /// The names `pending` lists in a spool directory holding `files`.
    fn pending_names(files: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        for n in files {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        pending(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn pending_sends_new_replies_before_deferred_ones() {
        let names = pending_names(&[
            "00000000000000000003-c.eml",
            "00000000000000000001-a.deferred.eml",
            "00000000000000000004-d.eml",
            "00000000000000000002-b.deferred.eml",
        ]);
        assert_eq!(
            names,
            [
                "00000000000000000003-c.eml",
                "00000000000000000004-d.eml",
                "00000000000000000001-a.deferred.eml",
                "00000000000000000002-b.deferred.eml",
            ]
        );
    }

    #[test]
    fn pending_lists_eml_files_oldest_first_and_nothing_else() {
        let names = pending_names(&[
            "00000000000000000002-b.eml",
            "00000000000000000001-a.eml",
            ".tmp-x",
            "x.eml.bad",
            ".send.lock",
        ]);
        assert_eq!(
            names,
            ["00000000000000000001-a.eml", "00000000000000000002-b.eml"]
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(pending(&dir.path().join("missing")).unwrap().is_empty());
    }
}
