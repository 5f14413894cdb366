//! Reading replies: from the account's IMAP mailbox (async-imap; IDLE where the server offers
//! it, else polling) or from a Maildir. A message that answers a pending request is marked
//! seen (IMAP `\Seen`; Maildir: moved from `new/` to `cur/` with the `S` flag); other mail is
//! left alone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_imap::Session;
use futures_util::TryStreamExt;
use kst_core::client::{MAX_REPLY_BYTES, Pending};
use tokio_rustls::TlsConnector;

use super::config::{Endpoint, Security};
use super::discovery::Dns;
use super::matching::{Matched, classify};
use super::tls::Conn;

/// How often a Maildir, or an IMAP server without IDLE, is looked at again.
const MAILDIR_POLL: Duration = Duration::from_millis(250);
const IMAP_POLL: Duration = Duration::from_secs(2);
/// Longest single IDLE: a message that arrives during the search before IDLE is seen at the
/// latest then.
const IDLE_SLICE: Duration = Duration::from_secs(10);

/// A mailbox failure.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Cannot reach or talk to the server, or read the Maildir: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The login was refused.
    #[error("{0}")]
    Auth(String),
    /// TLS could not be set up or is not offered.
    #[error("{0}")]
    Tls(String),
}

/// Where replies are read from.
pub enum Mailbox {
    /// An IMAP INBOX.
    Imap(Box<ImapBox>),
    /// A Maildir.
    Maildir(MaildirBox),
}

/// What the IMAP connection needs.
pub struct ImapSettings<'a> {
    /// The server.
    pub endpoint: Endpoint,
    /// Login.
    pub user: String,
    /// Password.
    pub password: String,
    /// TLS trust.
    pub connector: &'a TlsConnector,
    /// Allow a server that offers no STARTTLS (local tests).
    pub insecure_plaintext: bool,
    /// Limit for connecting and for each command.
    pub step_timeout: Duration,
}

impl Mailbox {
    /// A Maildir at `path` (it must have `new/` and `cur/`).
    pub fn maildir(path: &Path) -> Result<Mailbox, FetchError> {
        for sub in ["new", "cur"] {
            if !path.join(sub).is_dir() {
                return Err(FetchError::Unavailable(format!(
                    "{} is not a Maildir (no {sub}/ directory)",
                    path.display()
                )));
            }
        }
        Ok(Mailbox::Maildir(MaildirBox {
            path: path.to_path_buf(),
            looked_at: HashSet::new(),
        }))
    }

    /// Logs in to the IMAP server and selects INBOX.
    pub async fn imap(dns: &Dns, s: &ImapSettings<'_>) -> Result<Mailbox, FetchError> {
        ImapBox::open(dns, s)
            .await
            .map(|b| Mailbox::Imap(Box::new(b)))
    }

    /// Finds the not yet handled messages that concern the `pending` requests.
    pub async fn scan(&mut self, pending: &[Pending]) -> Result<Vec<Matched>, FetchError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Mailbox::Imap(b) => b.scan(pending).await,
            Mailbox::Maildir(m) => m.scan(pending),
        }
    }

    /// Waits at most `limit` for something to change.
    pub async fn wait(&mut self, limit: Duration) -> Result<(), FetchError> {
        match self {
            Mailbox::Imap(b) => b.wait(limit).await,
            Mailbox::Maildir(_) => {
                tokio::time::sleep(limit.min(MAILDIR_POLL)).await;
                Ok(())
            }
        }
    }

    /// How the mailbox is read, for messages: `IMAP IDLE on HOST:PORT`, `Maildir PATH`.
    pub fn how_read(&self) -> String {
        match self {
            Mailbox::Imap(b) => format!(
                "IMAP {} on {}",
                if b.idle { "IDLE" } else { "polling" },
                b.endpoint
            ),
            Mailbox::Maildir(m) => format!("Maildir {}", m.path.display()),
        }
    }

    /// Logs out (IMAP).
    pub async fn close(self) {
        if let Mailbox::Imap(mut b) = self
            && let Some(s) = b.session.as_mut()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.logout()).await;
        }
    }
}

/// A Maildir being watched.
pub struct MaildirBox {
    path: PathBuf,
    looked_at: HashSet<PathBuf>,
}

impl MaildirBox {
    fn scan(&mut self, pending: &[Pending]) -> Result<Vec<Matched>, FetchError> {
        let mut found = Vec::new();
        for sub in ["new", "cur"] {
            let dir = self.path.join(sub);
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                FetchError::Unavailable(format!("cannot read {}: {e}", dir.display()))
            })?;
            for entry in entries.flatten() {
                let file = entry.path();
                if self.looked_at.contains(&file)
                    || entry.file_name().to_string_lossy().starts_with('.')
                {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() || meta.len() > (MAX_REPLY_BYTES as u64) * 2 {
                    self.looked_at.insert(file);
                    continue;
                }
                // A file that vanished (another client moved it) is simply skipped.
                let Ok(raw) = std::fs::read(&file) else {
                    continue;
                };
                if let Some(m) = classify(pending, &raw) {
                    let kept = if sub == "new" {
                        mark_seen(&self.path, &file).unwrap_or(file.clone())
                    } else {
                        file.clone()
                    };
                    self.looked_at.insert(kept);
                    found.push(m);
                }
                self.looked_at.insert(file);
            }
        }
        Ok(found)
    }
}

/// Moves `new/NAME` to `cur/NAME:2,S` (Maildir's "seen"); returns the new path.
fn mark_seen(maildir: &Path, file: &Path) -> Option<PathBuf> {
    let name = file.file_name()?.to_string_lossy().into_owned();
    let base = name.split(":2,").next().unwrap_or(&name);
    let target = maildir.join("cur").join(format!("{base}:2,S"));
    std::fs::rename(file, &target).ok()?;
    Some(target)
}

/// An IMAP session on INBOX.
pub struct ImapBox {
    session: Option<Session<Conn>>,
    endpoint: Endpoint,
    idle: bool,
    looked_at: HashSet<u32>,
    step_timeout: Duration,
}

impl ImapBox {
    async fn open(dns: &Dns, s: &ImapSettings<'_>) -> Result<ImapBox, FetchError> {
        let addrs = dns
            .addresses(&s.endpoint.host, s.endpoint.port)
            .await
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        let mut last = FetchError::Unavailable(format!("{} has no address", s.endpoint.host));
        for addr in addrs {
            match tokio::time::timeout(s.step_timeout * 3, Self::login(addr, s)).await {
                Ok(Ok(session)) => return Self::ready(session, s).await,
                Ok(Err(e @ (FetchError::Auth(_) | FetchError::Tls(_)))) => return Err(e),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = FetchError::Unavailable(format!(
                        "IMAP {} at {addr} did not answer in time",
                        s.endpoint
                    ))
                }
            }
        }
        Err(last)
    }

    async fn login(
        addr: std::net::SocketAddr,
        s: &ImapSettings<'_>,
    ) -> Result<Session<Conn>, FetchError> {
        let at = format!("IMAP {} at {addr}", s.endpoint);
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            FetchError::Unavailable(format!("{at}: {what}: {e}"))
        };
        let conn = Conn::connect(addr, s.step_timeout)
            .await
            .map_err(|e| unavailable("cannot connect", &e))?;
        let conn = match s.endpoint.security {
            Security::Implicit => conn
                .into_tls(s.connector, &s.endpoint.host)
                .await
                .map_err(|e| FetchError::Tls(e.to_string()))?,
            Security::StartTls => conn,
        };
        let mut client = async_imap::Client::new(conn);
        client
            .read_response()
            .await
            .map_err(|e| unavailable("no greeting", &e))?
            .ok_or_else(|| unavailable("no greeting", &"connection closed"))?;
        if !client.get_ref().is_tls() {
            // STARTTLS refused (NO/BAD) leaves the connection usable in cleartext.
            match client.run_command_and_check_ok("STARTTLS", None).await {
                Ok(()) => {
                    let conn = client
                        .into_inner()
                        .into_tls(s.connector, &s.endpoint.host)
                        .await
                        .map_err(|e| FetchError::Tls(e.to_string()))?;
                    client = async_imap::Client::new(conn);
                }
                Err(async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_))
                    if s.insecure_plaintext => {}
                Err(async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m)) => {
                    return Err(FetchError::Tls(format!(
                        "{at} refused STARTTLS ({m}); kst logs in only over TLS (--insecure-plaintext allows cleartext for a local test)"
                    )));
                }
                Err(e) => return Err(unavailable("STARTTLS", &e)),
            }
        }
        let mut session = client
            .login(&s.user, &s.password)
            .await
            .map_err(|(e, _)| match e {
                async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m) => {
                    FetchError::Auth(format!(
                        "{at} refused the login {:?}: {m} (check --user and the password)",
                        s.user
                    ))
                }
                other => unavailable("LOGIN", &other),
            })?;
        session
            .select("INBOX")
            .await
            .map_err(|e| unavailable("SELECT INBOX", &e))?;
        Ok(session)
    }

    async fn ready(
        mut session: Session<Conn>,
        s: &ImapSettings<'_>,
    ) -> Result<ImapBox, FetchError> {
        let idle = session
            .capabilities()
            .await
            .map(|c| c.has_str("IDLE"))
            .unwrap_or(false);
        Ok(ImapBox {
            session: Some(session),
            endpoint: s.endpoint.clone(),
            idle,
            looked_at: HashSet::new(),
            step_timeout: s.step_timeout,
        })
    }

    fn lost(&self, what: &str, e: &dyn std::fmt::Display) -> FetchError {
        FetchError::Unavailable(format!("IMAP {}: {what}: {e}", self.endpoint))
    }

    async fn scan(&mut self, pending: &[Pending]) -> Result<Vec<Matched>, FetchError> {
        let t = self.step_timeout;
        let Some(session) = self.session.as_mut() else {
            return Err(self.lost("connection", &"closed"));
        };
        while session.unsolicited_responses.try_recv().is_ok() {}
        let mut uids = HashSet::new();
        let since = imap_date(
            pending
                .iter()
                .map(|p| p.created_at)
                .min()
                .unwrap_or(0)
                .saturating_sub(86_400),
        );
        // Replies carry In-Reply-To; bounces (DSNs) quote the request in a part that servers do
        // not search as header or body text, so every recent DSN is fetched and read.
        let mut queries = vec![format!(
            "SINCE {since} OR HEADER Content-Type \"delivery-status\" FROM \"MAILER-DAEMON\""
        )];
        for p in pending {
            // Our Message-IDs are hex@domain; anything else is not searched for (no injection).
            if p.message_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "@.-_+=$".contains(c))
            {
                queries.push(format!("HEADER In-Reply-To \"{}\"", p.message_id));
            }
        }
        for query in queries {
            let found = tokio::time::timeout(t, session.uid_search(&query))
                .await
                .map_err(|_| {
                    FetchError::Unavailable(format!("IMAP {}: SEARCH timed out", self.endpoint))
                })?
                .map_err(|e| {
                    FetchError::Unavailable(format!("IMAP {}: SEARCH: {e}", self.endpoint))
                })?;
            uids.extend(found.into_iter().filter(|u| !self.looked_at.contains(u)));
        }
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let mut list: Vec<u32> = uids.into_iter().collect();
        list.sort_unstable();
        let set = list
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let endpoint = self.endpoint.clone();
        let fetched: Vec<(Option<u32>, Vec<u8>)> = tokio::time::timeout(t * 2, async {
            let stream = session.uid_fetch(&set, "BODY.PEEK[]").await?;
            let fetches: Vec<_> = stream.try_collect().await?;
            Ok::<_, async_imap::error::Error>(
                fetches
                    .iter()
                    .map(|f| (f.uid, f.body().map(<[u8]>::to_vec).unwrap_or_default()))
                    .collect(),
            )
        })
        .await
        .map_err(|_| FetchError::Unavailable(format!("IMAP {endpoint}: FETCH timed out")))?
        .map_err(|e| FetchError::Unavailable(format!("IMAP {endpoint}: FETCH: {e}")))?;
        let mut found = Vec::new();
        let mut seen = Vec::new();
        for (uid, raw) in fetched {
            let Some(uid) = uid else { continue };
            self.looked_at.insert(uid);
            if let Some(m) = classify(pending, &raw) {
                seen.push(uid.to_string());
                found.push(m);
            }
        }
        if !seen.is_empty() {
            let set = seen.join(",");
            let _ = tokio::time::timeout(t, async {
                let stream = session.uid_store(&set, "+FLAGS.SILENT (\\Seen)").await?;
                let _: Vec<_> = stream.try_collect().await?;
                Ok::<_, async_imap::error::Error>(())
            })
            .await;
        }
        Ok(found)
    }

    async fn wait(&mut self, limit: Duration) -> Result<(), FetchError> {
        let Some(mut session) = self.session.take() else {
            return Err(self.lost("connection", &"closed"));
        };
        if !self.idle {
            tokio::time::sleep(limit.min(IMAP_POLL)).await;
            let r = tokio::time::timeout(self.step_timeout, session.noop()).await;
            self.session = Some(session);
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.lost("NOOP", &e)),
                Err(_) => Err(self.lost("NOOP", &"timed out")),
            };
        }
        let mut handle = session.idle();
        handle.init().await.map_err(|e| self.lost("IDLE", &e))?;
        {
            let (fut, _stop) = handle.wait_with_timeout(limit.min(IDLE_SLICE));
            fut.await.map_err(|e| self.lost("IDLE", &e))?;
        }
        let session = tokio::time::timeout(self.step_timeout, handle.done())
            .await
            .map_err(|_| self.lost("DONE", &"timed out"))?
            .map_err(|e| self.lost("DONE", &e))?;
        self.session = Some(session);
        Ok(())
    }
}

/// An IMAP date (`30-Nov-2026`) for `secs` since the epoch.
fn imap_date(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let iso = kst_core::time::format_utc(secs);
    let year = &iso[0..4];
    let month: usize = iso[5..7].parse().unwrap_or(1);
    let day = &iso[8..10];
    format!(
        "{}-{}-{year}",
        day.trim_start_matches('0'),
        MONTHS[month.clamp(1, 12) - 1]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn imap_dates() {
        assert_eq!(super::imap_date(0), "1-Jan-1970");
        assert_eq!(super::imap_date(1_520_178_429), "4-Mar-2018");
    }
}
