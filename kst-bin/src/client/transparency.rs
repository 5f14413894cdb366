//! `kst client retrieve --check-transparency` (feature `transparency`): once the reply's HMAC
//! verified, ask the domain's key directory (`/.well-known/kst/log/<domain>/lookup/<address>`)
//! for its signed head and proof, and check them against the domain's head key and the key
//! (or "no key") the KST served (`kst_core::transparency::answer`). A failure is a possible
//! attack (exit 5) and the key is not imported; a log that cannot be reached is temporary
//! (exit 75).
//!
//! With `--witness NAME:HEX` (repeatable) the client asks for the witnesses' part of the
//! answer (`?witnessed=1`, `kst-log-answer-v2`) and requires that `--witness-threshold` of
//! them (default: all) cosigned a head the answer's head extends, no longer than
//! `--witness-max-age` seconds ago; otherwise exit 5.
//!
//! Not yet (docs/TRANSPARENCY.md, "Next steps"): the head key found in DNS, and the newest
//! head remembered per domain with the append-only proof to it.

use std::path::Path;
use std::time::Duration;

use kst_core::openpgp::dearmor_public_key;
use kst_core::time::unix_now;
use kst_core::transparency::answer::{LogAnswer, MAX_ANSWER, MAX_WITNESSED_ANSWER, Served, hex32};
use kst_core::transparency::witness::{WitnessPolicy, parse_witness};

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
    /// The domain's head key, 64 hex digits (`kst log keygen` prints it; the domain publishes
    /// it). Required with --check-transparency.
    #[arg(long, value_name = "HEX", requires = "check_transparency")]
    pub log_key: Option<String>,
    /// Require this witness's cosignature, NAME:HEX (HEX: its Ed25519 key, 64 hex digits);
    /// repeatable. The answer must carry a cosigned head that the answer's head extends.
    #[arg(
        long = "witness",
        value_name = "NAME:HEX",
        requires = "check_transparency"
    )]
    pub witnesses: Vec<String>,
    /// How many of the --witness witnesses must have cosigned. [default: all]
    #[arg(long, value_name = "N", requires = "check_transparency")]
    pub witness_threshold: Option<usize>,
    /// The oldest cosignature accepted, in seconds: a log whose witnesses stopped cosigning
    /// longer ago is refused (exit 5).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub witness_max_age: u64,
}

impl LogCheckArgs {
    /// The witnesses required, or what is wrong with the flags.
    fn witness_policy(&self) -> Result<Option<WitnessPolicy>, String> {
        if self.witnesses.is_empty() {
            return match self.witness_threshold {
                Some(_) => Err("--witness-threshold needs --witness".into()),
                None => Ok(None),
            };
        }
        let witnesses = self
            .witnesses
            .iter()
            .map(|w| parse_witness(w).map_err(|e| format!("--witness: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = self.witness_threshold.unwrap_or(witnesses.len());
        if threshold == 0 || threshold > witnesses.len() {
            return Err(format!(
                "--witness-threshold: want 1 to {} (the number of --witness)",
                witnesses.len()
            ));
        }
        Ok(Some(WitnessPolicy {
            witnesses,
            threshold,
            not_before: unix_now().saturating_sub(self.witness_max_age),
        }))
    }
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
    let Some(key_hex) = &args.log_key else {
        return Outcome::error(
            exit::USAGE,
            "--check-transparency needs --log-key (the domain's head key, 64 hex digits)",
        );
    };
    let head_key = match hex32(key_hex) {
        Ok(k) => k,
        Err(_) => return Outcome::error(exit::USAGE, "--log-key: want 64 hex digits"),
    };
    let policy = match args.witness_policy() {
        Ok(p) => p,
        Err(e) => return Outcome::error(exit::USAGE, e),
    };
    let Ok(address) = kst_core::AddressPolicy::default().normalize(address) else {
        return Outcome::error(exit::SOFTWARE, format!("{address:?} is not an address"));
    };
    let base = args
        .log_url
        .clone()
        .unwrap_or_else(|| format!("https://{}", address.domain()));
    let mut path = format!(
        "/.well-known/kst/log/{}/lookup/{}",
        address.domain(),
        path_segment(address.as_str())
    );
    let limit = if policy.is_some() {
        path.push_str("?witnessed=1");
        MAX_WITNESSED_ANSWER
    } else {
        MAX_ANSWER
    };
    let text = match tokio::time::timeout(FETCH_TIMEOUT, get(&base, &path, ca_file, limit)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Outcome::error(exit::TEMPFAIL, format!("key directory: {e}")),
        Err(_) => {
            return Outcome::error(
                exit::TEMPFAIL,
                format!("key directory: {base} did not answer in time"),
            );
        }
    };
    let answer = match LogAnswer::parse(&text) {
        Ok(a) => a,
        Err(e) => return attack(format!("key directory {base}: {e}")),
    };
    let served = match &served {
        Some(bytes) => Served::Key(bytes),
        None => Served::Nothing,
    };
    if let Err(e) = answer.verify(&head_key, &address, served).await {
        return attack(format!(
            "the key directory does not confirm the reply (epoch {}): {e}",
            answer.head.head.epoch
        ));
    }
    let Some(policy) = policy else {
        return outcome;
    };
    let Some(witnessed) = &answer.witnessed else {
        return attack(format!(
            "the key directory's answer (epoch {}) carries no witness cosignatures",
            answer.head.head.epoch
        ));
    };
    match witnessed.verify(&answer.head, &head_key, &policy).await {
        Ok(_) => outcome,
        Err(e) => attack(format!(
            "the key directory's head (epoch {}) is not witnessed as required: {e}",
            answer.head.head.epoch
        )),
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

/// `GET base + path` ([`fetch`]), 200 with a body of at most `limit` bytes.
async fn get(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
    limit: usize,
) -> Result<String, String> {
    let (status, text) = fetch(base, hyper::Method::GET, path, None, ca_file, limit).await?;
    if status != hyper::StatusCode::OK {
        return Err(format!(
            "{base}{path} answered {status}: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    Ok(text)
}

/// `method base + path` with `body`: `http://` or `https://` (PKIX, the client's roots and
/// `ca_file`), no redirects; the status and the text body of at most `limit` bytes.
pub async fn fetch(
    base: &str,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
    ca_file: Option<&Path>,
    limit: usize,
) -> Result<(hyper::StatusCode, String), String> {
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
    let fetched = tokio::time::timeout(
        FETCH_TIMEOUT,
        super::http_get::request(conn, authority, method, path, body, limit),
    )
    .await
    .map_err(|_| format!("{base} did not answer in time"))??;
    let text = String::from_utf8(fetched.body).map_err(|_| format!("{base}{path}: not UTF-8"))?;
    Ok((fetched.status, text))
}
