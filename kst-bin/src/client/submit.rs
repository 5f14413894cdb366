//! Sending a request over SMTP (mail-send): to the account's submission server with SASL AUTH
//! (publication, relayed retrieval), or straight to the queried domain's MX without AUTH
//! (`--direct`). TLS (implicit or STARTTLS) is required unless `--insecure-plaintext`.

use std::net::SocketAddr;
use std::time::Duration;

use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient};
use tokio_rustls::TlsConnector;

use super::config::{Endpoint, Security};
use super::discovery::Dns;
use super::tls::Conn;

/// Where and how to send.
pub struct Route<'a> {
    /// The servers to try, in order (one for submission; the MX hosts for `--direct`).
    pub servers: Vec<Endpoint>,
    /// SASL login and password (submission); `None` for the direct route.
    pub credentials: Option<(String, String)>,
    /// TLS trust.
    pub connector: &'a TlsConnector,
    /// Allow a server that offers no STARTTLS (local tests).
    pub insecure_plaintext: bool,
    /// Limit for each network step.
    pub step_timeout: Duration,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Try again later: no connection, a 4xx reply, a timeout.
    #[error("{0}")]
    Temporary(String),
    /// The server refused the recipient or the message for good (5xx). On the direct route a
    /// refused `keys@` recipient means the domain runs no KST.
    #[error("{message}")]
    Rejected {
        /// The SMTP step that was refused (`RCPT TO`, `DATA`, ...).
        step: &'static str,
        /// The server's reply.
        message: String,
    },
    /// The login or password was refused.
    #[error("{0}")]
    Auth(String),
    /// TLS could not be set up or is not offered.
    #[error("{0}")]
    Tls(String),
}

/// Sends `message` from `from` to `rcpt` along `route`, trying each server until one accepts.
/// Returns the server that took it.
pub async fn send(
    dns: &Dns,
    route: &Route<'_>,
    from: &str,
    rcpt: &str,
    message: &[u8],
) -> Result<Endpoint, SendError> {
    let mut last = SendError::Temporary("no server to send to".into());
    for server in &route.servers {
        let addrs = match dns.addresses(&server.host, server.port).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                last = SendError::Temporary(format!("{} has no address", server.host));
                continue;
            }
            Err(e) => {
                last = SendError::Temporary(e.to_string());
                continue;
            }
        };
        for addr in addrs {
            match send_to(addr, server, route, from, rcpt, message).await {
                Ok(()) => return Ok(server.clone()),
                // A refusal, a bad login or a TLS failure is an answer: do not ask the next.
                Err(e @ (SendError::Rejected { .. } | SendError::Auth(_) | SendError::Tls(_))) => {
                    return Err(e);
                }
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

async fn send_to(
    addr: SocketAddr,
    server: &Endpoint,
    route: &Route<'_>,
    from: &str,
    rcpt: &str,
    message: &[u8],
) -> Result<(), SendError> {
    let t = route.step_timeout;
    let at = format!("{server} at {addr}");
    let conn = Conn::connect(addr, t)
        .await
        .map_err(|e| SendError::Temporary(format!("cannot connect to {at}: {e}")))?;
    let conn = match server.security {
        Security::Implicit => conn
            .into_tls(route.connector, &server.host)
            .await
            .map_err(|e| SendError::Tls(e.to_string()))?,
        Security::StartTls => conn,
    };
    let mut client = SmtpClient {
        stream: conn,
        timeout: t,
    };
    let helo = helo_name();
    client
        .read()
        .await
        .and_then(|r| r.assert_positive_completion())
        .map_err(|e| smtp_error("greeting", &at, e))?;
    let mut ehlo = client
        .ehlo(&helo)
        .await
        .map_err(|e| smtp_error("EHLO", &at, e))?;
    if !client.stream.is_tls() {
        if ehlo.has_capability(smtp_proto::EXT_START_TLS) {
            client
                .cmd(b"STARTTLS\r\n")
                .await
                .and_then(|r| r.assert_positive_completion())
                .map_err(|e| smtp_error("STARTTLS", &at, e))?;
            let SmtpClient { stream, timeout } = client;
            let stream = stream
                .into_tls(route.connector, &server.host)
                .await
                .map_err(|e| SendError::Tls(e.to_string()))?;
            client = SmtpClient { stream, timeout };
            ehlo = client
                .ehlo(&helo)
                .await
                .map_err(|e| smtp_error("EHLO", &at, e))?;
        } else if !route.insecure_plaintext {
            return Err(SendError::Tls(format!(
                "{at} offers no STARTTLS; kst sends requests only over TLS (--insecure-plaintext allows cleartext for a local test)"
            )));
        }
    }
    if let Some((user, password)) = &route.credentials {
        let creds = Credentials::new(user.as_str(), password.as_str());
        client
            .authenticate(&creds, &ehlo)
            .await
            .map_err(|e| match e {
                mail_send::Error::AuthenticationFailed(r) => SendError::Auth(format!(
                    "{at} refused the login {user:?}: {} {} (check --user and the password)",
                    r.code, r.message
                )),
                mail_send::Error::UnsupportedAuthMechanism => SendError::Auth(format!(
                    "{at} offers no SASL mechanism kst can use (PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5)"
                )),
                other => smtp_error("AUTH", &at, other),
            })?;
    }
    client
        .mail_from(from, &Parameters::default())
        .await
        .map_err(|e| smtp_error("MAIL FROM", &at, e))?;
    client
        .rcpt_to(rcpt, &Parameters::default())
        .await
        .map_err(|e| smtp_error("RCPT TO", &at, e))?;
    client
        .data(message)
        .await
        .map_err(|e| smtp_error("DATA", &at, e))?;
    let _ = client.quit().await;
    Ok(())
}

fn smtp_error(step: &'static str, at: &str, e: mail_send::Error) -> SendError {
    match e {
        mail_send::Error::UnexpectedReply(r) if r.code >= 500 => SendError::Rejected {
            step,
            message: format!("{at} refused {step}: {} {}", r.code, r.message),
        },
        mail_send::Error::UnexpectedReply(r) => SendError::Temporary(format!(
            "{at} answered {step} with {} {} (try again later)",
            r.code, r.message
        )),
        mail_send::Error::Tls(e) => SendError::Tls(format!("TLS with {at}: {e}")),
        mail_send::Error::Timeout => {
            SendError::Temporary(format!("{at} did not answer {step} in time"))
        }
        other => SendError::Temporary(format!("{step} with {at} failed: {other}")),
    }
}

/// The name the client says in EHLO: the machine's host name when it looks like one.
fn helo_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "localhost".to_string())
}

/// Hands `message` to a sendmail-compatible command, as many mail clients do:
/// `CMD -oi -f FROM -- RCPT` with the message on stdin. Exit 0 is success; 65 (data error),
/// 67 (no such user) and 68 (no such host) are refusals; anything else is temporary.
pub async fn sendmail(cmd: &str, from: &str, rcpt: &str, message: &[u8]) -> Result<(), SendError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} \"$@\""))
        .arg("sh")
        .args(["-oi", "-f", from, "--", rcpt])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            SendError::Temporary(format!("cannot run the sendmail command {cmd:?}: {e}"))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that exits without reading everything is judged by its exit status.
        let _ = stdin.write_all(message).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| SendError::Temporary(format!("the sendmail command {cmd:?} failed: {e}")))?;
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.lines().last().unwrap_or("").trim();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(code @ (65 | 67 | 68)) => Err(SendError::Rejected {
            step: "RCPT TO",
            message: format!("the sendmail command refused {rcpt} (exit {code}): {said}"),
        }),
        code => Err(SendError::Temporary(format!(
            "the sendmail command {cmd:?} failed ({}): {said}",
            code.map_or("killed by a signal".to_string(), |c| format!("exit {c}"))
        ))),
    }
}
