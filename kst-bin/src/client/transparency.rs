//! `kst client retrieve --check-transparency` (feature `transparency`): once the reply's HMAC
//! verified, ask the domain's key directory (`/.well-known/kst/log/<domain>/lookup/<address>`)
//! for its signed head and proof, and check them against the domain's head key and the key
//! (or "no key") the KST served (`kst_core::transparency::answer`). A failure is a possible
//! attack (exit 5) and the key is not imported; a log that cannot be reached is temporary
//! (exit 75).
//!
//! `kst client publish/retrieve/delete --transparency --log-key HEX` (protocol version 3):
//! the request offers version 3, the KST puts the directory's answer inside the reply under
//! the HMAC, and [`check_reply_answer`] checks it the same way, with no HTTP request. A reply
//! in an older version or without the answer is refused by `kst_core::client` (exit 5).
//!
//! Not yet (docs/TRANSPARENCY.md, "Next steps"): the head key found in DNS, witnesses'
//! cosignatures, and the newest head remembered per domain with the append-only proof to it.

use std::path::Path;
use std::time::Duration;

use kst_core::openpgp::dearmor_public_key;
use kst_core::transparency::answer::{LogAnswer, MAX_ANSWER, Served, hex32};

use super::exit;
use super::output::Outcome;
use super::tls::Conn;

/// Limit for the whole fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest key dearmored for the check.
const MAX_KEY_TEXT: usize = 4 << 20;

/// The flags of `retrieve` for the check.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogCheckArgs {
    /// After the reply verifies, check the key against the domain's key directory: the
    /// signed head (with --log-key) and the proof that the served key (or "no key") is the
    /// directory's latest entry for the address. A failure exits 5 and nothing is imported.
    #[arg(long)]
    pub check_transparency: bool,
    /// Where the domain's key directory is served (its `/.well-known/kst/log/`).
    /// [default: https://<domain>]
    #[arg(long, value_name = "URL", requires = "check_transparency")]
    pub log_url: Option<String>,
    /// Protocol version 3 and the head key.
    #[command(flatten)]
    pub reply: ReplyProofArgs,
}

/// The flags of `publish`, `retrieve` and `delete` for protocol version 3.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplyProofArgs {
    /// Ask for protocol version 3: the KST's reply must carry the key directory's signed head
    /// and proof for the address, covered by its HMAC, checked against --log-key (no HTTP
    /// request). A reply in an older version or without the proof, or a proof that fails, is
    /// an attack (exit 5) and nothing is imported.
    #[arg(long, requires = "log_key")]
    pub transparency: bool,
    /// The domain's head key, 64 hex digits (`kst log keygen` prints it; the domain publishes
    /// it). Required with --check-transparency and --transparency.
    #[arg(long, value_name = "HEX")]
    pub log_key: Option<String>,
}

impl ReplyProofArgs {
    /// The head key to offer version 3 with (`--transparency`), checked to be 64 hex digits;
    /// `Ok(None)` without `--transparency`; `Err` says what is wrong with the flags.
    pub fn head_key(&self) -> Result<Option<String>, String> {
        self.head_key_checking(false)
    }

    /// [`ReplyProofArgs::head_key`]; `http_check` when `--check-transparency` also uses
    /// `--log-key` (otherwise `--log-key` without `--transparency` is a usage error, not a
    /// silently skipped check).
    pub fn head_key_checking(&self, http_check: bool) -> Result<Option<String>, String> {
        if !self.transparency {
            if self.log_key.is_some() && !http_check {
                return Err("--log-key goes with --transparency (the proof inside the reply) or, for retrieve, --check-transparency".into());
            }
            return Ok(None);
        }
        let Some(key) = &self.log_key else {
            return Err(
                "--transparency needs --log-key (the domain's head key, 64 hex digits)".into(),
            );
        };
        hex32(key)
            .map(|_| Some(key.trim().to_ascii_lowercase()))
            .map_err(|_| "--log-key: want 64 hex digits".into())
    }
}

/// Version 3: checks the key directory's answer a verified reply carried (`answer`, the text
/// the HMAC covers the hash of) against the head key the request was made with and what the
/// reply served: the key of a `found` or `published`, "no key" for `not-found` and `deleted`.
/// Any failure is an attack (exit 5); other outcomes (a refusal, an attack already) are
/// returned as they are.
pub async fn check_reply_answer(
    pending: &kst_core::client::Pending,
    answer: Option<&str>,
    outcome: Outcome,
) -> Outcome {
    let Some(key_hex) = &pending.head_key else {
        return outcome;
    };
    let (address, served) = match &outcome {
        Outcome::Found { address, key, .. }
        | Outcome::Published {
            account: address,
            key,
            ..
        } => match dearmor_public_key(key, MAX_KEY_TEXT) {
            Ok(bytes) => (address.clone(), Some(bytes)),
            Err(e) => return Outcome::error(exit::SOFTWARE, format!("the served key: {e}")),
        },
        Outcome::NotFound { address, .. } | Outcome::Deleted { address, .. } => {
            (address.clone(), None)
        }
        _ => return outcome,
    };
    let attack = |error: String| Outcome::Attack {
        service: pending.service.to_string(),
        message_id: pending.message_id.clone(),
        error,
    };
    let Ok(head_key) = hex32(key_hex) else {
        return Outcome::error(
            exit::SOFTWARE,
            "the pending request's head key is not 64 hex digits",
        );
    };
    let Ok(address) = kst_core::AddressPolicy::default().normalize(&address) else {
        return Outcome::error(exit::SOFTWARE, format!("{address:?} is not an address"));
    };
    let Some(text) = answer else {
        return attack(
            "the reply carries no key directory answer (KST protocol 3 was asked for): stripped on the way (possible attack)".into(),
        );
    };
    match verify_text(text, &head_key, &address, served.as_deref(), "the reply's").await {
        Ok(()) => outcome,
        Err(e) => attack(e),
    }
}

/// Parses the key directory's answer `text` (from `source`: the reply, or the log's URL) and
/// checks it with `head_key` against what was served for `address` (a key's packets, or
/// `None` for "no key"); the error says why it is an attack.
async fn verify_text(
    text: &str,
    head_key: &[u8; 32],
    address: &kst_core::Address,
    served: Option<&[u8]>,
    source: &str,
) -> Result<(), String> {
    let answer =
        LogAnswer::parse(text).map_err(|e| format!("{source} key directory answer: {e}"))?;
    let served = match served {
        Some(bytes) => Served::Key(bytes),
        None => Served::Nothing,
    };
    answer
        .verify(head_key, address, served)
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{source} key directory answer does not confirm the reply (epoch {}): {e}",
                answer.head.head.epoch
            )
        })
}

/// Checks a retrieval's outcome against the key directory; `Found` and `NotFound` are
/// checked, every other outcome is returned as it is.
pub async fn check(args: &LogCheckArgs, ca_file: Option<&Path>, outcome: Outcome) -> Outcome {
    let (address, service, message_id, served) = match &outcome {
        Outcome::Found {
            address,
            service,
            message_id,
            key,
            ..
        } => match dearmor_public_key(key, MAX_KEY_TEXT) {
            Ok(bytes) => (address, service, message_id.clone(), Some(bytes)),
            Err(e) => return Outcome::error(exit::SOFTWARE, format!("the served key: {e}")),
        },
        Outcome::NotFound {
            address, service, ..
        } => (address, service, String::new(), None),
        _ => return outcome,
    };
    let attack = |error: String| Outcome::Attack {
        service: service.clone(),
        message_id: message_id.clone(),
        error,
    };
    let Some(key_hex) = &args.reply.log_key else {
        return Outcome::error(
            exit::USAGE,
            "--check-transparency needs --log-key (the domain's head key, 64 hex digits)",
        );
    };
    let head_key = match hex32(key_hex) {
        Ok(k) => k,
        Err(_) => return Outcome::error(exit::USAGE, "--log-key: want 64 hex digits"),
    };
    let Ok(address) = kst_core::AddressPolicy::default().normalize(address) else {
        return Outcome::error(exit::SOFTWARE, format!("{address:?} is not an address"));
    };
    let base = args
        .log_url
        .clone()
        .unwrap_or_else(|| format!("https://{}", address.domain()));
    let path = format!(
        "/.well-known/kst/log/{}/lookup/{}",
        address.domain(),
        path_segment(address.as_str())
    );
    let text = match tokio::time::timeout(FETCH_TIMEOUT, get(&base, &path, ca_file)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Outcome::error(exit::TEMPFAIL, format!("key directory: {e}")),
        Err(_) => {
            return Outcome::error(
                exit::TEMPFAIL,
                format!("key directory: {base} did not answer in time"),
            );
        }
    };
    let source = format!("{base}'s");
    match verify_text(&text, &head_key, &address, served.as_deref(), &source).await {
        Ok(()) => outcome,
        Err(e) => attack(e),
    }
}

/// `s` with everything but unreserved characters, `@` and `+` percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@+".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET base + path`: `http://` or `https://` (PKIX, the client's roots and --ca-file), no
/// redirects, 200 with a body of at most [`MAX_ANSWER`] bytes.
async fn get(base: &str, path: &str, ca_file: Option<&Path>) -> Result<String, String> {
    let (tls, rest) = if let Some(r) = base.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = base.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{base:?}: want an http:// or https:// URL"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!(
            "{base:?}: want scheme://host[:port] without a path"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{base:?}: bad port"))?,
        ),
        None => (authority, if tls { 443 } else { 80 }),
    };
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut conn = Conn::connect(addr, FETCH_TIMEOUT)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    if tls {
        let connector = super::tls::connector(ca_file)?;
        conn = conn
            .into_tls(&connector, host)
            .await
            .map_err(|e| e.to_string())?;
    }
    let fetched = super::http_get::get(conn, authority, path, MAX_ANSWER).await?;
    let text = String::from_utf8(fetched.body).map_err(|_| format!("{base}{path}: not UTF-8"))?;
    if fetched.status != hyper::StatusCode::OK {
        return Err(format!(
            "{base}{path} answered {}: {}",
            fetched.status,
            text.lines().next().unwrap_or("")
        ));
    }
    Ok(text)
}
