//! MTA-STS (RFC 8461) for the direct route: discovery by the `_mta-sts.<domain>` TXT record,
//! the policy from `https://mta-sts.<domain>/.well-known/mta-sts.txt` (PKIX-valid certificate
//! for that name, no redirects, `text/plain`, at most 64 KiB), MX patterns, and a cache on disk
//! that keeps a policy for its `max_age`.
//!
//! A cached, unexpired policy is used while the TXT record's `id` stays the same, and also when
//! the TXT record or the policy host cannot be reached (the point of the cache: an attacker who
//! blocks the look-up does not switch the policy off). A new `id` fetches the policy again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;

use super::discovery::{Dns, DnsError};
use super::tls::Conn;

/// Largest policy body read (RFC 8461 §3.3 suggests 64 KiB).
const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest `max_age` honoured (RFC 8461 §3.2: 31557600, about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Limit for the whole policy fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// MX must match and present a PKIX-valid certificate; otherwise do not send.
    Enforce,
    /// Report only: failures are noted, the message goes anyway.
    Testing,
    /// The domain withdrew its policy.
    None,
}

/// A parsed MTA-STS policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The `id` of the TXT record it was fetched under.
    pub id: String,
    /// `mode`.
    pub mode: Mode,
    /// `mx` patterns (`mail.example.net` or `*.example.net`), lowercase, no final dot.
    pub mx: Vec<String>,
    /// `max_age` in seconds (capped at a year).
    pub max_age: u64,
    /// When it was fetched (Unix seconds).
    pub fetched_at: u64,
}

impl Policy {
    /// Parses the policy text (RFC 8461 §3.2); `id` is the TXT record's.
    pub fn parse(text: &str, id: &str, fetched_at: u64) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("policy line {line:?} is not `key: value`"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    max_age = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| format!("max_age {value:?} is not a number"))?
                            .min(MAX_AGE_LIMIT),
                    )
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {} // unknown keys are ignored (§3.2)
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("the policy does not say `version: STSv1`".into());
        }
        let mode = mode.ok_or("the policy has no mode")?;
        let max_age = max_age.ok_or("the policy has no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("the policy names no mx".into());
        }
        Ok(Policy {
            id: id.to_string(),
            mode,
            mx,
            max_age,
            fetched_at,
        })
    }

    /// True when `host` matches one of the `mx` patterns (§4.1: `*.` stands for exactly one
    /// leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *p == host,
        })
    }

    fn fresh(&self, now: u64) -> bool {
        now < self.fetched_at.saturating_add(self.max_age)
    }

    /// True when a policy read back from the cache is one [`Policy::parse`] could have made at
    /// or before `now` (a day of clock skew allowed): a cache file that was tampered with or
    /// damaged (a `max_age` beyond the limit, a fetch time in the future, an `enforce` policy
    /// without MX patterns, an id no TXT record can carry) is not used.
    fn plausible(&self, now: u64) -> bool {
        self.max_age <= MAX_AGE_LIMIT
            && self.fetched_at <= now.saturating_add(86_400)
            && (self.mode == Mode::None || !self.mx.is_empty())
            && valid_id(&self.id)
    }
}

/// An MTA-STS policy id (RFC 8461 §3.1): 1 to 32 letters and digits.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The `id` of the domain's `_mta-sts` TXT record: `None` without exactly one `v=STSv1`
/// record (§3.1: several mean no policy).
pub fn parse_txt(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    record.split(';').find_map(|field| {
        let (k, v) = field.trim().split_once('=')?;
        let v = v.trim();
        (k.trim() == "id" && valid_id(v)).then(|| v.to_string())
    })
}

/// Why a policy could not be fetched.
#[derive(Debug)]
enum FetchFailure {
    /// The policy host's address failed DNSSEC validation: an attack.
    Bogus(DnsError),
    /// Anything else (unreachable, not PKIX-valid, not a policy): as if there were none, unless
    /// a policy is cached (RFC 8461 §3.3).
    Other(String),
}

impl From<String> for FetchFailure {
    fn from(e: String) -> FetchFailure {
        FetchFailure::Other(e)
    }
}

impl std::fmt::Display for FetchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchFailure::Bogus(e) => e.fmt(f),
            FetchFailure::Other(e) => f.write_str(e),
        }
    }
}

/// Where MTA-STS policies are fetched from and kept.
pub struct PolicySource<'a> {
    /// The validating resolver (for the TXT record and the policy host's address).
    pub dns: &'a Dns,
    /// PKIX connector (web roots plus `--ca-file`).
    pub connector: &'a TlsConnector,
    /// The cache directory.
    pub cache: Option<PathBuf>,
    /// The HTTPS port (443; tests use another through `KST_MTA_STS_PORT`).
    pub port: u16,
}

/// What was learned about a domain's policy.
#[derive(Debug, Clone)]
pub struct Found {
    /// The policy in force, if any.
    pub policy: Option<Policy>,
    /// Where it came from, or why there is none (for the report).
    pub note: String,
}

impl PolicySource<'_> {
    /// The policy in force for `domain`. A bogus TXT answer is an error (an attack); other
    /// failures fall back to the cache, else to "no policy".
    pub async fn policy(&self, domain: &str) -> Result<Found, DnsError> {
        let now = kst_core::time::unix_now();
        let cached = self
            .read_cache(domain)
            .filter(|p| p.plausible(now) && p.fresh(now));
        let id = match self.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(found) => parse_txt(&found.value),
            Err(e @ DnsError::Bogus(_)) => return Err(e),
            Err(e) => {
                return Ok(match cached {
                    Some(p) => Found {
                        note: format!("cached policy {} (TXT look-up failed: {e})", p.id),
                        policy: Some(p),
                    },
                    None => Found {
                        policy: None,
                        note: format!("no MTA-STS policy (TXT look-up failed: {e})"),
                    },
                });
            }
        };
        let Some(id) = id else {
            return Ok(match cached {
                Some(p) => Found {
                    note: format!("cached policy {} (no TXT record now)", p.id),
                    policy: Some(p),
                },
                None => Found {
                    policy: None,
                    note: "no MTA-STS policy".into(),
                },
            });
        };
        if let Some(p) = cached.as_ref().filter(|p| p.id == id) {
            return Ok(Found {
                note: format!("cached policy {id}"),
                policy: Some(p.clone()),
            });
        }
        match self.fetch(domain, &id, now).await {
            // A forged answer for the policy host is an attack like any bogus answer, not a
            // policy that could not be fetched (which would switch MTA-STS off on first contact).
            Err(FetchFailure::Bogus(e)) => Err(e),
            Ok(p) => {
                self.write_cache(domain, &p);
                Ok(Found {
                    note: format!("policy {id} fetched from mta-sts.{domain}"),
                    policy: Some(p),
                })
            }
            Err(e) => Ok(match cached {
                Some(p) => Found {
                    note: format!("cached policy {} (fetching {id} failed: {e})", p.id),
                    policy: Some(p),
                },
                None => Found {
                    policy: None,
                    note: format!("no usable MTA-STS policy (fetching {id} failed: {e})"),
                },
            }),
        }
    }

    async fn fetch(&self, domain: &str, id: &str, now: u64) -> Result<Policy, FetchFailure> {
        let host = format!("mta-sts.{domain}");
        let text = tokio::time::timeout(FETCH_TIMEOUT, self.get(&host))
            .await
            .map_err(|_| format!("https://{host} did not answer in time"))??;
        Ok(Policy::parse(&text, id, now)?)
    }

    async fn get(&self, host: &str) -> Result<String, FetchFailure> {
        let addrs = self
            .dns
            .addresses(host, self.port)
            .await
            .map_err(|e| match e {
                DnsError::Bogus(_) => FetchFailure::Bogus(e),
                e => FetchFailure::Other(e.to_string()),
            })?;
        let addr = addrs
            .first()
            .copied()
            .ok_or_else(|| format!("{host} has no address"))?;
        let conn = Conn::connect(addr, FETCH_TIMEOUT)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?
            .into_tls(self.connector, host)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "kst-client")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
        let status = response.status();
        if status != hyper::StatusCode::OK {
            driver.abort();
            return Err(format!(
                "https://{host}/.well-known/mta-sts.txt answered {status} (redirects are not followed)"
            )
            .into());
        }
        let plain = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
        if !plain {
            driver.abort();
            return Err(format!("the policy from {host} is not text/plain").into());
        }
        let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the policy from {host}: {e}"))?
            .to_bytes();
        driver.abort();
        String::from_utf8(body.to_vec())
            .map_err(|_| format!("the policy from {host} is not UTF-8").into())
    }

    fn cache_file(&self, domain: &str) -> Option<PathBuf> {
        let safe = domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !domain.starts_with('.');
        self.cache
            .as_ref()
            .filter(|_| safe)
            .map(|d| d.join(format!("{}.json", domain.to_ascii_lowercase())))
    }

    fn read_cache(&self, domain: &str) -> Option<Policy> {
        let path = self.cache_file(domain)?;
        let text = std::fs::read(&path).ok()?;
        if text.len() > 2 * MAX_POLICY_BYTES {
            return None;
        }
        serde_json::from_slice(&text).ok()
    }

    fn write_cache(&self, domain: &str, policy: &Policy) {
        let Some(path) = self.cache_file(domain) else {
            return;
        };
        // A cache that cannot be written costs a fetch next time, nothing else.
        let _ = write_atomically(&path, policy);
    }
}

fn write_atomically(path: &Path, policy: &Policy) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(policy)?)?;
    std::fs::rename(&tmp, path)
}

/// The HTTPS port for policy fetches: 443, or `KST_MTA_STS_PORT` (tests on loopback).
pub fn policy_port() -> u16 {
    std::env::var("KST_MTA_STS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .unwrap_or(443)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_match_mx_patterns() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.net\r\nmx: *.backup.example.net\r\nmax_age: 86400\r\n",
            "20261203T000000",
            1000,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.allows("mail.example.net"));
        assert!(p.allows("MAIL.example.net."));
        assert!(p.allows("mx1.backup.example.net"));
        assert!(!p.allows("a.b.backup.example.net"));
        assert!(!p.allows("backup.example.net"));
        assert!(!p.allows("mail.attacker.test"));
        assert!(p.fresh(1000 + 86399));
        assert!(!p.fresh(1000 + 86400));
        assert!(
            Policy::parse("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "x", 0).is_err()
        );
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1\n", "x", 0).is_err());
        assert!(
            Policy::parse("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "x", 0).is_err()
        );
        let long =
            Policy::parse("version: STSv1\nmode: none\nmax_age: 99999999999\n", "x", 0).unwrap();
        assert_eq!(long.max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn a_cached_policy_must_be_one_a_fetch_could_have_made() {
        let good = Policy::parse(
            "version: STSv1\nmode: enforce\nmx: mail.example.net\nmax_age: 86400\n",
            "abc1",
            1000,
        )
        .unwrap();
        assert!(good.plausible(1000));
        let future = Policy {
            fetched_at: 1000 + 2 * 86_400,
            ..good.clone()
        };
        assert!(!future.plausible(1000));
        let endless = Policy {
            max_age: u64::MAX,
            ..good.clone()
        };
        assert!(!endless.plausible(1000));
        let no_mx = Policy {
            mx: vec![],
            ..good.clone()
        };
        assert!(!no_mx.plausible(1000));
        let bad_id = Policy {
            id: "../x".into(),
            ..good
        };
        assert!(!bad_id.plausible(1000));
    }

    #[test]
    fn exactly_one_sts_txt_record_gives_an_id() {
        let one = vec![
            "v=spf1 -all".to_string(),
            "v=STSv1; id=20261203T000000;".to_string(),
        ];
        assert_eq!(parse_txt(&one).as_deref(), Some("20261203T000000"));
        let two = vec!["v=STSv1; id=a1;".to_string(), "v=STSv1; id=a2;".to_string()];
        assert_eq!(parse_txt(&two), None);
        assert_eq!(parse_txt(&["v=STSv1; id=bad-id;".to_string()]), None);
        assert_eq!(parse_txt(&[]), None);
    }
}
