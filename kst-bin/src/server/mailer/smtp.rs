//! The SMTP mailer: submits each reply to a relay with mail-send, over a small pool of
//! sessions that stay open between replies.

use std::fmt::Display;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kst_core::{Component, Delivery, Error, Mailer, OutgoingMail, Result};
use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use smtp_proto::EXT_PIPELINING;
use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio::time::Instant;

use crate::shared::config::{ConfigError, MailerConfig, SmtpTls};

const COMPONENT: Component = Component::mailer("smtp");

/// The byte stream of a session, plain or TLS, buffered so that a reply leaves in as few
/// segments as its size allows.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connected, greeted (and, as configured, TLS-wrapped and authenticated) session.
struct Session {
    client: SmtpClient<Box<dyn Io>>,
    /// The relay offered PIPELINING (RFC 2920): MAIL, RCPT and DATA go in one write.
    pipelining: bool,
}

/// A session waiting in the pool for the next reply.
struct Idle {
    session: Session,
    since: Instant,
}

/// Why [`SmtpMailer::submit`] did not hand a reply to the relay.
#[derive(Debug)]
pub enum SubmitError {
    /// The relay refused this reply: its `RCPT TO` or the end of its data got `code`. A 5xx
    /// is permanent (the same reply would be refused again); a 4xx is for this reply only.
    /// Either way the relay works, and other replies can still go.
    Refused {
        /// The relay's reply code.
        code: u16,
        /// What happened, for the operator (the relay's reply included).
        error: Error,
    },
    /// The relay cannot be used now (connection, TLS, AUTH, a refused `MAIL FROM` or `DATA`,
    /// a lost session, `[mailer] timeout_secs`): nothing more can be sent until it recovers.
    Relay(Error),
}

impl SubmitError {
    /// True for a 5xx refusal of the reply itself: sending it again is pointless.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SubmitError::Refused { code, .. } if *code >= 500)
    }

    /// The error itself, always temporary (`Error::Unavailable`). [`Mailer::send`] returns it
    /// for everything but a permanent refusal ([`SubmitError::is_permanent`]), so that the
    /// request that wanted this reply stays with the MTA.
    pub fn into_error(self) -> Error {
        match self {
            SubmitError::Refused { error, .. } | SubmitError::Relay(error) => error,
        }
    }
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Refused { error, .. } | SubmitError::Relay(error) => error.fmt(f),
        }
    }
}

/// Hands each reply to an SMTP relay with the envelope of the [`OutgoingMail`] (the null
/// sender `<>` when it has none), returning `Ok` only after the relay's `250` to the data.
///
/// Sessions are reused: after a reply, the session goes back to a pool of at most
/// `[mailer] pool_size` idle sessions (0: one session per reply, closed with QUIT) and is
/// dropped once idle for `[mailer] pool_idle_secs`. TCP_NODELAY is set and writes are buffered,
/// so a reply leaves in one flush without waiting for delayed ACKs. When the relay offers
/// PIPELINING (Postfix does), `MAIL FROM`, `RCPT TO` and `DATA` go out together: two round
/// trips per reply instead of four.
///
/// A pooled session the relay has closed in the meantime shows up as a failed `MAIL FROM`;
/// nothing of the reply has been sent at that point, so the reply goes out on a fresh session
/// instead. A session whose reply the relay refused (its `RCPT TO` or its data) goes back to
/// the pool after an `RSET`, unless the relay took `DATA` for a refused recipient.
///
/// A 5xx to the reply's `RCPT TO` or to the end of its data is the relay's permanent refusal
/// of that one reply (a recipient it does not know, such as a forged request's sender; a
/// message it will not take): asking again would be refused again, so [`Mailer::send`] counts it
/// in `kst_mailer_refused_total` and returns [`Delivery::Refused`] with the relay's answer; the
/// caller logs it (a request is decided without its reply and the MTA does not retry it; an
/// expiry reminder is reported refused, not sent). Every other failure (connection, TLS, AUTH, a refused `MAIL FROM` or `DATA`, a 4xx,
/// `[mailer] timeout_secs` running out) is a temporary `Error::Unavailable`, so the request
/// stays with the MTA and is retried. A lost connection after the data was sent but before
/// the relay's answer can, on that retry, send a reply twice: replies are at-least-once.
pub struct SmtpMailer {
    builder: SmtpClientBuilder<String>,
    tls: SmtpTls,
    timeout: Duration,
    relay: String,
    pool: Mutex<Vec<Idle>>,
    pool_size: usize,
    pool_idle: Duration,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("relay", &self.relay)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("auth", &self.builder.credentials.is_some())
            .field("pool_size", &self.pool_size)
            .field("pool_idle", &self.pool_idle)
            .finish()
    }
}

impl SmtpMailer {
    /// A mailer for the relay in `cfg` (`host`, `port`, `tls`, `username`/`password`,
    /// `timeout_secs`, `pool_size`, `pool_idle_secs`). Nothing is contacted yet.
    pub fn new(cfg: &MailerConfig) -> Result<Self, ConfigError> {
        let host = cfg.host.trim().to_string();
        if host.is_empty() {
            return Err(ConfigError::key("mailer.host", "must name the SMTP relay"));
        }
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let mut builder = SmtpClientBuilder::new(host.clone(), cfg.port)
            .map_err(|e| ConfigError::key("mailer.tls", format!("cannot set up TLS: {e}")))?
            .implicit_tls(cfg.tls == SmtpTls::Implicit)
            // EHLO (after TLS) and AUTH are done in `connect`, which needs the capabilities.
            .say_ehlo(false)
            .timeout(timeout);
        if !cfg.username.is_empty() {
            builder = builder.credentials(Credentials::new(
                cfg.username.clone(),
                cfg.password.expose().to_string(),
            ));
        }
        Ok(SmtpMailer {
            builder,
            tls: cfg.tls,
            timeout,
            relay: format!("{host}:{}", cfg.port),
            pool: Mutex::new(Vec::new()),
            pool_size: cfg.pool_size,
            pool_idle: Duration::from_secs(cfg.pool_idle_secs.max(1)),
        })
    }

    /// `host:port` of the relay.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// How many sessions wait in the pool now.
    pub fn idle_sessions(&self) -> usize {
        self.pool.lock().map_or(0, |p| p.len())
    }

    fn fail(&self, what: &str, e: impl Display) -> Error {
        Error::unavailable(COMPONENT, format!("{what} {}: {e}", self.relay))
    }

    /// Runs one step of a session, bounded by `deadline`.
    async fn step<T>(
        &self,
        deadline: Instant,
        what: &str,
        fut: impl Future<Output = mail_send::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(what, explain(&e))),
            Err(_) => Err(self.fail(
                what,
                format!(
                    "no answer within {}s (mailer.timeout_secs)",
                    self.timeout.as_secs()
                ),
            )),
        }
    }

    /// Opens a session: connects (TCP_NODELAY), greets, and does TLS, EHLO and AUTH as
    /// configured.
    async fn connect(&self, deadline: Instant) -> Result<Session> {
        let mut client = match self.tls {
            SmtpTls::None => {
                let c = self
                    .step(deadline, "connecting to", self.builder.connect_plain())
                    .await?;
                let _ = c.stream.set_nodelay(true);
                SmtpClient {
                    stream: Box::new(BufStream::new(c.stream)) as Box<dyn Io>,
                    timeout: c.timeout,
                }
            }
            SmtpTls::Starttls | SmtpTls::Implicit => {
                let c = self
                    .step(deadline, "connecting to", self.builder.connect())
                    .await?;
                let _ = c.stream.get_ref().0.set_nodelay(true);
                SmtpClient {
                    stream: Box::new(BufStream::new(c.stream)) as Box<dyn Io>,
                    timeout: c.timeout,
                }
            }
        };
        let capabilities = self
            .step(
                deadline,
                "greeting (EHLO)",
                client.capabilities(&self.builder.local_host, false),
            )
            .await?;
        if let Some(credentials) = &self.builder.credentials {
            self.step(
                deadline,
                "authenticating (AUTH) to",
                client.authenticate(credentials, &capabilities),
            )
            .await?;
        }
        Ok(Session {
            client,
            pipelining: capabilities.has_capability(EXT_PIPELINING),
        })
    }

    /// The freshest pooled session that has not been idle too long; older ones are dropped.
    fn take_idle(&self) -> Option<Session> {
        let mut pool = self.pool.lock().ok()?;
        while let Some(idle) = pool.pop() {
            if idle.since.elapsed() < self.pool_idle {
                return Some(idle.session);
            }
        }
        None
    }

    /// Puts `session` back into the pool, or closes it (QUIT) when the pool is full.
    async fn release(&self, session: Session) {
        let session = match self.pool.lock() {
            Ok(mut pool) if pool.len() < self.pool_size => {
                pool.push(Idle {
                    session,
                    since: Instant::now(),
                });
                return;
            }
            _ => session,
        };
        quit(session.client, self.timeout).await;
    }

    /// Sends `mail` on `session`: MAIL FROM, RCPT TO, DATA (pipelined when offered), then
    /// the message.
    async fn transact(
        &self,
        session: &mut Session,
        deadline: Instant,
        mail: &OutgoingMail,
    ) -> std::result::Result<String, Stage> {
        let from = mail.envelope_from.as_ref().map_or("", |a| a.as_str());
        let to = mail.recipient.as_str();
        let client = &mut session.client;
        if session.pipelining {
            let commands = [
                format!("MAIL FROM:<{from}>\r\n"),
                format!("RCPT TO:<{to}>\r\n"),
                "DATA\r\n".to_string(),
            ];
            let replies = self
                .step(
                    deadline,
                    "starting a reply (MAIL FROM, RCPT TO, DATA) on",
                    client.cmds(commands),
                )
                .await
                .map_err(Stage::BeforeData)?;
            // RFC 2920: MAIL's reply says whether the session still works; a refused MAIL
            // or RCPT makes DATA fail too, and nothing of the reply was sent.
            let answers = ["MAIL FROM", "RCPT TO", "DATA"];
            for (i, (reply, command)) in replies.iter().zip(answers).enumerate() {
                let ok = if i == 2 {
                    reply.code() == 354
                } else {
                    reply.is_positive_completion()
                };
                if !ok {
                    let e = self.fail(
                        &format!("{command} refused by"),
                        format!("{} {}", reply.code(), reply.message()),
                    );
                    return Err(match i {
                        0 => Stage::BeforeData(e),
                        // RCPT TO refused: this recipient, not the relay. The session is
                        // between transactions again unless the relay took DATA anyway.
                        1 => Stage::Refused(
                            reply.code(),
                            e,
                            replies.get(2).is_some_and(|data| data.code() != 354),
                        ),
                        _ => Stage::Later(e),
                    });
                }
            }
            if replies.len() != 3 {
                return Err(Stage::Later(self.fail(
                    "starting a reply on",
                    "the relay answered the pipelined commands incompletely",
                )));
            }
            let reply = self
                .step(deadline, "submitting the reply to", async {
                    client.write_message(mail.message.as_slice()).await?;
                    client.read().await
                })
                .await
                .map_err(Stage::Later)?;
            return self.completed(reply);
        }
        let none = Parameters::default();
        self.step(
            deadline,
            "starting a reply (MAIL FROM) on",
            client.mail_from(from, &none),
        )
        .await
        .map_err(Stage::BeforeData)?;
        let rcpt = self
            .step(
                deadline,
                "naming the recipient (RCPT TO) to",
                client.cmd(format!("RCPT TO:<{to}>\r\n")),
            )
            .await
            .map_err(Stage::Later)?;
        if !rcpt.is_positive_completion() {
            return Err(Stage::Refused(
                rcpt.code(),
                self.fail(
                    "RCPT TO refused by",
                    format!("{} {}", rcpt.code(), rcpt.message()),
                ),
                true,
            ));
        }
        let data = self
            .step(
                deadline,
                "starting the data (DATA) on",
                client.cmd(b"DATA\r\n"),
            )
            .await
            .map_err(Stage::Later)?;
        if data.code() != 354 {
            return Err(Stage::Later(self.fail(
                "DATA refused by",
                format!("{} {}", data.code(), data.message()),
            )));
        }
        let reply = self
            .step(deadline, "submitting the reply to", async {
                client.write_message(mail.message.as_slice()).await?;
                client.read().await
            })
            .await
            .map_err(Stage::Later)?;
        self.completed(reply)
    }

    /// The relay's answer to the end of the data: `Ok` for a 2xx; a 4xx or 5xx refuses this
    /// reply (its content or size), not the relay.
    fn completed(&self, reply: smtp_proto::Response<String>) -> std::result::Result<String, Stage> {
        if reply.is_positive_completion() {
            return Ok(reply.message);
        }
        let e = self.fail(
            "submitting the reply to",
            format!("{} {}", reply.code(), reply.message()),
        );
        Err(if (400..600).contains(&reply.code()) {
            Stage::Refused(reply.code(), e, true)
        } else {
            Stage::Later(e)
        })
    }
}

/// Where a transaction failed: before anything of the reply was sent, later, or because the
/// relay refused this reply (its recipient or its data) with a reply code; `true` when the
/// session is between transactions then, so that it can serve the next reply.
enum Stage {
    BeforeData(Error),
    Later(Error),
    Refused(u16, Error, bool),
}

/// Says QUIT, waiting at most `timeout`; the outcome is ignored.
async fn quit<S: AsyncRead + AsyncWrite + Unpin>(client: SmtpClient<S>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, client.quit()).await;
}

/// mail-send's error with a hint for the operator where one helps.
fn explain(e: &mail_send::Error) -> String {
    use mail_send::Error as E;
    match e {
        E::MissingStartTls => format!(
            "{e}: the relay does not offer STARTTLS; use mailer.tls = \"none\" for a local cleartext relay or \"implicit\" for port 465"
        ),
        E::AuthenticationFailed(_) | E::MissingCredentials | E::UnsupportedAuthMechanism => {
            format!("{e} (check mailer.username and mailer.password)")
        }
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{e} (is the relay running? check mailer.host and mailer.port)")
        }
        _ => e.to_string(),
    }
}

impl SmtpMailer {
    /// Hands `mail` to the relay, saying whether a failure was the relay's refusal of this
    /// reply ([`SubmitError::Refused`]) or the relay itself ([`SubmitError::Relay`]), so that
    /// `kst outbox send` can set a refused reply aside and go on with the others.
    pub async fn submit(&self, mail: &OutgoingMail) -> std::result::Result<(), SubmitError> {
        let deadline = Instant::now() + self.timeout;
        // A pooled session first; one the relay closed meanwhile fails at MAIL FROM, before
        // anything of the reply was sent, and the reply goes out on a fresh session.
        while let Some(mut session) = self.take_idle() {
            match self.transact(&mut session, deadline, mail).await {
                Ok(reply) => {
                    self.release(session).await;
                    log_sent(self, mail, &reply, true);
                    return Ok(());
                }
                Err(Stage::BeforeData(e)) => {
                    tracing::debug!(relay = %self.relay, error = %e, "pooled session unusable; trying another");
                }
                Err(Stage::Later(e)) => return Err(SubmitError::Relay(e)),
                Err(Stage::Refused(code, error, idle)) => {
                    if idle {
                        self.recycle(session, deadline).await;
                    }
                    return Err(SubmitError::Refused { code, error });
                }
            }
        }
        let mut session = self.connect(deadline).await.map_err(SubmitError::Relay)?;
        match self.transact(&mut session, deadline, mail).await {
            Ok(reply) => {
                self.release(session).await;
                log_sent(self, mail, &reply, false);
                Ok(())
            }
            Err(Stage::BeforeData(e) | Stage::Later(e)) => Err(SubmitError::Relay(e)),
            Err(Stage::Refused(code, error, idle)) => {
                if idle {
                    self.recycle(session, deadline).await;
                }
                Err(SubmitError::Refused { code, error })
            }
        }
    }

    /// Puts a session whose reply the relay refused back into the pool once `RSET` (within
    /// `deadline`) says it is ready for the next one; drops it otherwise. A flood of replies
    /// the relay refuses (forged senders) then costs no new connection, TLS or AUTH each.
    async fn recycle(&self, mut session: Session, deadline: Instant) {
        match self
            .step(deadline, "resetting (RSET)", session.client.rset())
            .await
        {
            Ok(()) => self.release(session).await,
            Err(e) => {
                tracing::debug!(relay = %self.relay, error = %e, "session not reused after a refused reply");
            }
        }
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    fn name(&self) -> &'static str {
        "smtp"
    }

    /// [`SmtpMailer::submit`]. A permanent refusal of this reply (a 5xx to its `RCPT TO` or
    /// its data) is counted in `kst_mailer_refused_total` and returned as
    /// [`Delivery::Refused`], for the caller to log in its own terms (a request decided without
    /// its reply, a reminder not sent): asking the relay again would only be refused again.
    /// Every other failure is temporary, so that the request that wanted this reply stays with
    /// the MTA and is retried.
    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
        match self.submit(mail).await {
            Ok(()) => Ok(Delivery::Sent),
            Err(SubmitError::Refused { code, error }) if code >= 500 => {
                crate::shared::metrics::mailer_refused(code);
                tracing::debug!(
                    relay = %self.relay,
                    message_id = %mail.message_id,
                    recipient = %mail.recipient,
                    code,
                    error = %error,
                    "the relay refused this reply for good"
                );
                // The relay's answer alone: the error's own wording ("stays queued and is
                // retried") is not true of a refusal.
                let text = match error {
                    Error::Unavailable { message, .. } => message,
                    other => other.to_string(),
                };
                Ok(Delivery::Refused { code, text })
            }
            Err(e) => Err(e.into_error()),
        }
    }

    /// Connects, greets (EHLO, STARTTLS and AUTH as configured) and says QUIT without sending.
    async fn check(&self) -> Result<()> {
        let session = self.connect(Instant::now() + self.timeout).await?;
        quit(session.client, self.timeout).await;
        Ok(())
    }

    /// Says QUIT on every pooled session (at most `timeout_secs` each), so the relay sees a
    /// clean end instead of a lost connection.
    async fn close(&self) {
        let idle: Vec<Idle> = match self.pool.lock() {
            Ok(mut pool) => pool.drain(..).collect(),
            Err(_) => return,
        };
        let n = idle.len();
        for i in idle {
            quit(i.session.client, self.timeout).await;
        }
        if n > 0 {
            tracing::debug!(relay = %self.relay, sessions = n, "closed the pooled relay sessions");
        }
    }
}

fn log_sent(mailer: &SmtpMailer, mail: &OutgoingMail, reply: &str, reused: bool) {
    crate::shared::metrics::mailer_reply(reused);
    tracing::debug!(
        relay = %mailer.relay,
        message_id = %mail.message_id,
        relay_reply = %reply,
        reused,
        "reply submitted"
    );
}

#[cfg(test)]
mod tests {
    //! The pool against a scripted SMTP peer on loopback that counts connections and
    //! messages (the real relay, Postfix, is covered by the end-to-end tests).

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kst_core::AddressPolicy;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;
    use crate::shared::config::MailerKind;

    /// How the peer behaves after each accepted message.
    #[derive(Clone, Copy)]
    enum After {
        /// Waits for the next command, as a relay does.
        Stay,
        /// Closes the connection without a word, as a relay whose idle timeout ran out.
        Hangup,
        /// Answers the end of data with 451 (a temporary failure).
        Refuse,
        /// Answers every RCPT TO with 550 (a recipient the relay does not know), and DATA
        /// without a recipient with 554, as Postfix does.
        RefuseRcpt,
        /// Like `RefuseRcpt`, but takes DATA anyway (354), as a sloppy relay might.
        RefuseRcptTakeData,
        /// Answers the end of data with 554 (a message the relay will not take).
        RefuseData,
    }

    #[derive(Default)]
    struct Counts {
        connections: AtomicUsize,
        messages: AtomicUsize,
        quits: AtomicUsize,
    }

    /// Serves SMTP on 127.0.0.1 until the test ends, offering PIPELINING or not; returns its
    /// port and counters. It answers commands in order, so pipelined ones work as well.
    async fn relay_with(after: After, pipelining: bool) -> (u16, Arc<Counts>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    w.write_all(b"220 relay.test ESMTP\r\n").await.unwrap();
                    let mut in_data = false;
                    let mut recipients = 0;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer: &[u8] = if in_data {
                            if line != "." {
                                continue;
                            }
                            in_data = false;
                            if let After::Refuse = after {
                                b"451 4.3.0 try later\r\n"
                            } else if let After::RefuseData = after {
                                b"554 5.6.0 message refused\r\n"
                            } else {
                                c.messages.fetch_add(1, Ordering::SeqCst);
                                b"250 2.0.0 queued\r\n"
                            }
                        } else {
                            match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                                "EHLO" if pipelining => {
                                    b"250-relay.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                                }
                                "EHLO" => b"250-relay.test\r\n250 8BITMIME\r\n",
                                "RCPT"
                                    if matches!(
                                        after,
                                        After::RefuseRcpt | After::RefuseRcptTakeData
                                    ) =>
                                {
                                    b"550 5.1.1 no such user\r\n"
                                }
                                "RCPT" => {
                                    recipients += 1;
                                    b"250 2.1.5 ok\r\n"
                                }
                                "MAIL" | "RSET" => {
                                    recipients = 0;
                                    b"250 2.0.0 ok\r\n"
                                }
                                "DATA"
                                    if recipients == 0
                                        && !matches!(after, After::RefuseRcptTakeData) =>
                                {
                                    b"554 5.5.1 no valid recipients\r\n"
                                }
                                "DATA" => {
                                    in_data = true;
                                    b"354 go ahead\r\n"
                                }
                                "QUIT" => {
                                    c.quits.fetch_add(1, Ordering::SeqCst);
                                    let _ = w.write_all(b"221 bye\r\n").await;
                                    return;
                                }
                                _ => b"250 2.0.0 ok\r\n",
                            }
                        };
                        if w.write_all(answer).await.is_err() {
                            return;
                        }
                        if answer.starts_with(b"250 2.0.0 queued") && matches!(after, After::Hangup)
                        {
                            return;
                        }
                    }
                });
            }
        });
        (port, counts)
    }

    /// A relay that offers PIPELINING, as Postfix does.
    async fn relay(after: After) -> (u16, Arc<Counts>) {
        relay_with(after, true).await
    }

    fn mailer(port: u16, pool_size: usize) -> SmtpMailer {
        SmtpMailer::new(&MailerConfig {
            kind: MailerKind::Smtp,
            host: "127.0.0.1".into(),
            port,
            tls: SmtpTls::None,
            timeout_secs: 5,
            pool_size,
            ..MailerConfig::default()
        })
        .unwrap()
    }

    fn mail(n: usize) -> OutgoingMail {
        let p = AddressPolicy::default();
        OutgoingMail {
            envelope_from: None,
            recipient: p.normalize("bob@acme.net").unwrap(),
            message: format!("Subject: reply {n}\r\n\r\n.leading dot\r\nbody\r\n").into_bytes(),
            message_id: format!("m{n}@example.net"),
        }
    }

    #[tokio::test]
    async fn replies_reuse_one_session() {
        let (port, counts) = relay(After::Stay).await;
        let m = mailer(port, 4);
        for n in 0..5 {
            m.send(&mail(n)).await.unwrap();
        }
        assert_eq!(counts.messages.load(Ordering::SeqCst), 5);
        assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
        assert_eq!(m.idle_sessions(), 1);
    }

    #[tokio::test]
    async fn concurrent_replies_open_sessions_and_keep_at_most_pool_size() {
        let (port, counts) = relay(After::Stay).await;
        let m = Arc::new(mailer(port, 2));
        let sends: Vec<_> = (0..6)
            .map(|n| {
                let m = m.clone();
                tokio::spawn(async move { m.send(&mail(n)).await })
            })
            .collect();
        for s in sends {
            s.await.unwrap().unwrap();
        }
        assert_eq!(counts.messages.load(Ordering::SeqCst), 6);
        assert!(m.idle_sessions() <= 2, "{}", m.idle_sessions());
        let opened = counts.connections.load(Ordering::SeqCst);
        assert!((1..=6).contains(&opened), "{opened}");
    }

    #[tokio::test]
    async fn a_relay_without_pipelining_gets_one_command_at_a_time() {
        for after in [After::Stay, After::Hangup] {
            let (port, counts) = relay_with(after, false).await;
            let m = mailer(port, 4);
            for n in 0..3 {
                m.send(&mail(n)).await.unwrap();
            }
            assert_eq!(counts.messages.load(Ordering::SeqCst), 3);
        }
        let (port, counts) = relay_with(After::Refuse, false).await;
        let e = mailer(port, 4).send(&mail(0)).await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        assert_eq!(counts.messages.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn close_says_quit_on_pooled_sessions() {
        let (port, counts) = relay(After::Stay).await;
        let m = mailer(port, 4);
        m.send(&mail(0)).await.unwrap();
        assert_eq!(m.idle_sessions(), 1);
        m.close().await;
        assert_eq!(m.idle_sessions(), 0);
        assert_eq!(counts.quits.load(Ordering::SeqCst), 1);
        // A reply after close opens a new session.
        m.send(&mail(1)).await.unwrap();
        assert_eq!(counts.connections.load(Ordering::SeqCst), 2);
        assert_eq!(counts.messages.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn pool_size_zero_opens_a_session_per_reply() {
        let (port, counts) = relay(After::Stay).await;
        let m = mailer(port, 0);
        for n in 0..3 {
            m.send(&mail(n)).await.unwrap();
        }
        assert_eq!(counts.messages.load(Ordering::SeqCst), 3);
        assert_eq!(counts.connections.load(Ordering::SeqCst), 3);
        assert_eq!(m.idle_sessions(), 0);
    }

    #[tokio::test]
    async fn a_session_the_relay_closed_is_replaced_without_losing_or_doubling_a_reply() {
        let (port, counts) = relay(After::Hangup).await;
        let m = mailer(port, 4);
        for n in 0..3 {
            m.send(&mail(n)).await.unwrap();
        }
        // Each reply after the first found its pooled session closed at MAIL FROM and went
        // out on a fresh one: three messages, three connections, none sent twice.
        assert_eq!(counts.messages.load(Ordering::SeqCst), 3);
        assert_eq!(counts.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_reply_is_a_temporary_error_and_its_session_serves_the_next() {
        let (port, counts) = relay(After::Refuse).await;
        let m = mailer(port, 4);
        for n in 0..2 {
            let e = m.send(&mail(n)).await.unwrap_err();
            assert!(e.is_temporary(), "{e}");
            assert!(e.to_string().contains("submitting the reply"), "{e}");
        }
        // After RSET the session went back to the pool and carried the second reply.
        assert_eq!(m.idle_sessions(), 1);
        assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
        assert_eq!(counts.messages.load(Ordering::SeqCst), 0);
    }

    /// A relay that refuses the RCPT TO but then takes the pipelined DATA waits for a message:
    /// that session is dropped, never reset or pooled (RSET would be read as data).
    #[tokio::test]
    async fn a_session_that_took_data_after_a_refused_recipient_is_dropped() {
        let (port, counts) = relay(After::RefuseRcptTakeData).await;
        let m = mailer(port, 4);
        let started = Instant::now();
        for n in 0..2 {
            let e = m.submit(&mail(n)).await.unwrap_err();
            assert!(matches!(e, SubmitError::Refused { code: 550, .. }), "{e}");
        }
        // An RSET sent into the data would wait for the 5 s timeout each time.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(m.idle_sessions(), 0);
        assert_eq!(counts.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_recipient_or_message_is_told_apart_from_a_failing_relay() {
        for pipelining in [true, false] {
            let (port, counts) = relay_with(After::RefuseRcpt, pipelining).await;
            let m = mailer(port, 4);
            for n in 0..2 {
                let e = m.submit(&mail(n)).await.unwrap_err();
                assert!(e.is_permanent(), "{e}");
                assert!(
                    matches!(e, SubmitError::Refused { code: 550, .. }),
                    "pipelining {pipelining}: {e}"
                );
                assert!(e.to_string().contains("RCPT TO refused"), "{e}");
                // The error itself is temporary; `Mailer::send` decides a 5xx instead (see
                // `send_decides_a_reply_the_relay_refuses_for_good_and_defers_a_4xx`).
                assert!(e.into_error().is_temporary());
            }
            assert_eq!(counts.messages.load(Ordering::SeqCst), 0);
            let (port, _) = relay_with(After::Refuse, pipelining).await;
            let e = mailer(port, 4).submit(&mail(0)).await.unwrap_err();
            assert!(matches!(e, SubmitError::Refused { code: 451, .. }), "{e}");
            assert!(!e.is_permanent(), "{e}");
        }
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let e = mailer(port, 4).submit(&mail(0)).await.unwrap_err();
        assert!(matches!(e, SubmitError::Relay(_)), "{e}");
        assert!(!e.is_permanent(), "{e}");
    }

    /// A 5xx to a reply's RCPT TO or to its data is the relay's last word on that reply: `send`
    /// returns `Ok` (the request is decided, its reply left unsent, logged and counted) instead
    /// of deferring the request, which would only ask the relay again; a 4xx stays temporary.
    #[tokio::test]
    async fn send_decides_a_reply_the_relay_refuses_for_good_and_defers_a_4xx() {
        for pipelining in [true, false] {
            for after in [After::RefuseRcpt, After::RefuseData] {
                let (port, counts) = relay_with(after, pipelining).await;
                let m = mailer(port, 4);
                for n in 0..2 {
                    m.send(&mail(n)).await.unwrap();
                }
                assert_eq!(counts.messages.load(Ordering::SeqCst), 0);
                // The refused reply's session was reset and carried the next reply.
                assert_eq!(counts.connections.load(Ordering::SeqCst), 1);
                assert_eq!(m.idle_sessions(), 1);
            }
            let (port, _) = relay_with(After::Refuse, pipelining).await;
            let e = mailer(port, 4).send(&mail(0)).await.unwrap_err();
            assert!(e.is_temporary(), "{e}");
            assert!(e.to_string().contains("451"), "{e}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_relay_is_a_temporary_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let e = mailer(port, 4).send(&mail(0)).await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        assert!(e.to_string().contains("is the relay running"), "{e}");
    }
}
