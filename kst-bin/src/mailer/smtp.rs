//! The SMTP mailer: submits each reply to a relay with mail-send.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use kst_core::{Error, Mailer, OutgoingMail, Result};
use mail_send::smtp::message::Message;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::config::{ConfigError, MailerConfig, SmtpTls};

const COMPONENT: &str = "mailer(smtp)";

/// Hands each reply to an SMTP relay with the envelope of the [`OutgoingMail`] (the null
/// sender `<>` when it has none), returning `Ok` only after the relay's `250` to the data.
///
/// One connection per reply: simple and robust for the rate of key requests; a pooled client
/// that keeps a session open is a later optimization. Every failure (connection, TLS, AUTH, a
/// 4xx or 5xx reply, `[mailer] timeout_secs` running out) is a temporary
/// `Error::Unavailable`, so the request stays with the MTA and is retried. A lost connection
/// after the data was sent but before the relay's answer can, on that retry, send a reply
/// twice: replies are at-least-once.
pub struct SmtpMailer {
    builder: SmtpClientBuilder<String>,
    tls: SmtpTls,
    timeout: Duration,
    relay: String,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("relay", &self.relay)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .field("auth", &self.builder.credentials.is_some())
            .finish()
    }
}

impl SmtpMailer {
    /// A mailer for the relay in `cfg` (`host`, `port`, `tls`, `username`/`password`,
    /// `timeout_secs`). Nothing is contacted yet.
    pub fn new(cfg: &MailerConfig) -> Result<Self, ConfigError> {
        let host = cfg.host.trim().to_string();
        if host.is_empty() {
            return Err(ConfigError::key("mailer.host", "must name the SMTP relay"));
        }
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let mut builder = SmtpClientBuilder::new(host.clone(), cfg.port)
            .map_err(|e| ConfigError::key("mailer.tls", format!("cannot set up TLS: {e}")))?
            .implicit_tls(cfg.tls == SmtpTls::Implicit)
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
        })
    }

    /// `host:port` of the relay.
    pub fn relay(&self) -> &str {
        &self.relay
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

    /// Sends `mail` on a connected session, then says QUIT (its outcome no longer matters).
    async fn transact<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: SmtpClient<S>,
        deadline: Instant,
        mail: &OutgoingMail,
    ) -> Result<String> {
        let from = mail.envelope_from.as_ref().map_or("", |a| a.as_str());
        let message = Message::empty()
            .from(from)
            .to(mail.recipient.as_str())
            .body(mail.message.as_slice());
        let reply = self
            .step(deadline, "submitting the reply to", client.send(message))
            .await?;
        quit(client, self.timeout).await;
        Ok(reply.message)
    }

    /// Connects (TLS and AUTH as configured), sends `mail` if given, and says QUIT.
    async fn session(&self, mail: Option<&OutgoingMail>) -> Result<String> {
        let deadline = Instant::now() + self.timeout;
        match self.tls {
            SmtpTls::None => {
                let c = self
                    .step(deadline, "connecting to", self.builder.connect_plain())
                    .await?;
                match mail {
                    Some(m) => self.transact(c, deadline, m).await,
                    None => {
                        quit(c, self.timeout).await;
                        Ok(String::new())
                    }
                }
            }
            SmtpTls::Starttls | SmtpTls::Implicit => {
                let c = self
                    .step(deadline, "connecting to", self.builder.connect())
                    .await?;
                match mail {
                    Some(m) => self.transact(c, deadline, m).await,
                    None => {
                        quit(c, self.timeout).await;
                        Ok(String::new())
                    }
                }
            }
        }
    }
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

#[async_trait]
impl Mailer for SmtpMailer {
    fn name(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, mail: &OutgoingMail) -> Result<()> {
        let reply = self.session(Some(mail)).await?;
        tracing::debug!(
            relay = %self.relay,
            message_id = %mail.message_id,
            relay_reply = %reply,
            "reply submitted"
        );
        Ok(())
    }

    /// Connects, greets (EHLO, STARTTLS and AUTH as configured) and says QUIT without sending.
    async fn check(&self) -> Result<()> {
        self.session(None).await.map(|_| ())
    }
}
