//! Sending a request over SMTP (mail-send): to the account's submission server with SASL AUTH
//! (publication, relayed retrieval), or straight to the queried domain's MX without AUTH
//! (`--direct`). TLS (implicit or STARTTLS) is required unless `--insecure-plaintext` (or, on
//! the direct route, `--allow-plaintext`). On the direct route each MX hop is authenticated as
//! [`super::dane`] says (DANE, MTA-STS, or reported as unauthenticated) during the handshake,
//! before anything of the request is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::RootCertStore;

use super::config::{Endpoint, Security};
use super::dane::{self, HopAuth, HopResult, HopSlot};
use super::discovery::{Dns, DnsError};
use super::tls::Conn;

/// The direct route's per-hop rules.
pub struct DirectHops<'a> {
    /// How each server (same order as [`Route::servers`]) must be authenticated.
    pub auth: Vec<HopAuth>,
    /// PKIX roots (web roots plus `--ca-file`) for MTA-STS and the report.
    pub roots: Arc<RootCertStore>,
    /// Send in clear to an MX without STARTTLS, when no DANE or MTA-STS policy demands TLS.
    pub allow_plaintext: bool,
    /// Where the hop that took the request is described (`transport` in `--json`).
    pub report: &'a Mutex<Option<serde_json::Value>>,
}

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
    /// The direct route's hop rules; `None` for submission.
    pub direct: Option<DirectHops<'a>>,
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
    /// A DNSSEC, DANE or MTA-STS check failed: possible attack. Nothing of the request was sent.
    #[error("{0}")]
    Attack(String),
    /// The server may not be used (an insecure DNS answer under `--require-dnssec`).
    #[error("{0}")]
    Unusable(String),
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
    for (i, server) in route.servers.iter().enumerate() {
        let addrs = match dns.addresses(&server.host, server.port).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                last = SendError::Temporary(format!("{} has no address", server.host));
                continue;
            }
            Err(DnsError::Bogus(m)) => {
                return Err(SendError::Attack(format!(
                    "possible attack: {m}; nothing was sent"
                )));
            }
            Err(e @ DnsError::NotSecure(_)) => return Err(SendError::Unusable(e.to_string())),
            Err(e) => {
                last = SendError::Temporary(e.to_string());
                continue;
            }
        };
        let hop = route
            .direct
            .as_ref()
            .map(|d| d.auth.get(i).cloned().unwrap_or(HopAuth::Opportunistic));
        for addr in addrs {
            match send_to(addr, server, route, hop.as_ref(), from, rcpt, message).await {
                Ok(()) => return Ok(server.clone()),
                // A refusal, a bad login or a TLS failure is an answer: do not ask the next.
                Err(
                    e @ (SendError::Rejected { .. }
                    | SendError::Auth(_)
                    | SendError::Tls(_)
                    | SendError::Attack(_)
                    | SendError::Unusable(_)),
                ) => {
                    return Err(e);
                }
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

/// The TLS connector for a connection: the route's own, or on the direct route one that
/// enforces the hop's DANE or MTA-STS rule.
fn hop_connector(
    route: &Route<'_>,
    hop: Option<&HopAuth>,
) -> Result<(TlsConnector, Option<HopSlot>), SendError> {
    match (hop, &route.direct) {
        (Some(auth), Some(d)) => {
            let c = dane::connector(auth, d.roots.clone()).map_err(SendError::Tls)?;
            Ok((c.connector, Some(c.result)))
        }
        _ => Ok((route.connector.clone(), None)),
    }
}

/// A TLS failure: on a hop with DANE or MTA-STS, a failed check is a possible attack.
fn tls_failure(hop: Option<&HopAuth>, e: std::io::Error) -> SendError {
    match hop {
        Some(h) if h.demands_tls() => SendError::Attack(e.to_string()),
        _ => SendError::Tls(e.to_string()),
    }
}

/// Writes what secured the hop into the direct route's report.
fn report_hop(route: &Route<'_>, server: &Endpoint, result: Option<&HopResult>) {
    let Some(d) = &route.direct else { return };
    let value = match result {
        Some(r) => serde_json::json!({
            "mx": server.host,
            "tls": true,
            "authentication": r.as_str(),
            "pkix": matches!(r, HopResult::MtaSts | HopResult::Unauthenticated { pkix: true }),
            "detail": r.to_string(),
        }),
        None => serde_json::json!({
            "mx": server.host,
            "tls": false,
            "authentication": "none",
            "detail": "PLAINTEXT: the MX offers no STARTTLS and --allow-plaintext let the request (and K_auth) travel in clear",
        }),
    };
    let mut report = d.report.lock().unwrap_or_else(|e| e.into_inner());
    match (report.as_mut(), value) {
        (Some(serde_json::Value::Object(old)), serde_json::Value::Object(new)) => old.extend(new),
        (_, value) => *report = Some(value),
    }
}

async fn send_to(
    addr: SocketAddr,
    server: &Endpoint,
    route: &Route<'_>,
    hop: Option<&HopAuth>,
    from: &str,
    rcpt: &str,
    message: &[u8],
) -> Result<(), SendError> {
    let t = route.step_timeout;
    let at = format!("{server} at {addr}");
    let conn = Conn::connect(addr, t)
        .await
        .map_err(|e| SendError::Temporary(format!("cannot connect to {at}: {e}")))?;
    let (connector, hop_result) = hop_connector(route, hop)?;
    let conn = match server.security {
        Security::Implicit => conn
            .into_tls(&connector, &server.host)
            .await
            .map_err(|e| tls_failure(hop, e))?,
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
                .into_tls(&connector, &server.host)
                .await
                .map_err(|e| tls_failure(hop, e))?;
            client = SmtpClient { stream, timeout };
            ehlo = client
                .ehlo(&helo)
                .await
                .map_err(|e| smtp_error("EHLO", &at, e))?;
        } else if let Some(h) = hop.filter(|h| h.demands_tls()) {
            return Err(SendError::Attack(format!(
                "{at} offers no STARTTLS, but {} demands TLS on this hop (possible downgrade attack; nothing was sent)",
                match h {
                    HopAuth::Dane(_) => "DANE (secure TLSA records)",
                    HopAuth::EncryptOnly =>
                        "DANE (secure TLSA records, none usable: TLS without authentication)",
                    _ => "the domain's MTA-STS policy (enforce)",
                }
            )));
        } else if route.direct.as_ref().is_some_and(|d| d.allow_plaintext) {
            // --allow-plaintext on the direct route: reported below as a plaintext hop.
        } else if !route.insecure_plaintext {
            return Err(SendError::Tls(format!(
                "{at} offers no STARTTLS; kst sends requests only over TLS ({})",
                if route.direct.is_some() {
                    "--allow-plaintext sends in clear to an MX without it"
                } else {
                    "--insecure-plaintext allows cleartext for a local test"
                }
            )));
        }
    }
    if let Some(result) = &hop_result {
        let r = result.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if client.stream.is_tls() && r.is_none() {
            return Err(SendError::Tls(format!(
                "{at}: the TLS handshake ended without a certificate check (bug; nothing was sent)"
            )));
        }
        report_hop(route, server, r.as_ref());
    } else if route.direct.is_some() && !client.stream.is_tls() {
        report_hop(route, server, None);
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
