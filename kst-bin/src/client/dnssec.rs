//! DNSSEC for the client's look-ups: what a validated answer proves, and how the resolver is
//! reached (plain UDP/TCP or DNS over TLS).
//!
//! hickory validates every answer from the trust anchor down (the IANA root's KSKs by default,
//! `--dns-anchor FILE` for a private root such as the test DNS's) and marks each record with a
//! [`Proof`]. This module turns those marks into one verdict per RRset:
//!
//! - **secure**: every record (RRSIGs aside) is `Secure`;
//! - **insecure**: every record is `Insecure`, which hickory says only after a *signed* proof
//!   that the zone has no DS at its parent (an unsigned zone, allowed but reported);
//! - anything else is **bogus**: a failed or missing signature under a signed delegation, a
//!   forged "no DS", an `Indeterminate` record, an unprovable negative answer. The client treats
//!   that as an attack (exit 5).
//!
//! hickory's own `DnssecSummary` lumps `Indeterminate` with `Insecure`; this module does not.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::{Record, RecordType};
use serde::Serialize;

/// What DNSSEC proved about a look-up (or about the weakest of several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsSecurity {
    /// Validation was switched off (`--no-dnssec`, a test resolver serving unsigned zones):
    /// nothing is proven.
    Unvalidated,
    /// The zone is provably unsigned: the parent's signed answer says it has no DS.
    Insecure,
    /// Signed and validated from the trust anchor.
    Secure,
}

impl DnsSecurity {
    /// The token used in `--json` (`secure`, `insecure`, `unvalidated`).
    pub fn as_str(self) -> &'static str {
        match self {
            DnsSecurity::Secure => "secure",
            DnsSecurity::Insecure => "insecure",
            DnsSecurity::Unvalidated => "unvalidated",
        }
    }

    /// The weaker of two verdicts (for a result that rests on several look-ups).
    pub fn weakest(self, other: DnsSecurity) -> DnsSecurity {
        self.min(other)
    }
}

impl std::fmt::Display for DnsSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on a set of records from one validated answer: `Ok(secure | insecure)`, or
/// `Err(why)` when it is bogus. RRSIG records are left out (they carry no proof of their own);
/// an empty set is bogus (an answer needs records or a negative proof).
pub fn verdict<'a>(records: impl IntoIterator<Item = &'a Record>) -> Result<DnsSecurity, String> {
    let mut seen: Option<DnsSecurity> = None;
    for r in records {
        if r.record_type() == RecordType::RRSIG {
            continue;
        }
        let this = match r.proof {
            Proof::Secure => DnsSecurity::Secure,
            Proof::Insecure => DnsSecurity::Insecure,
            other => {
                return Err(format!(
                    "{} {} is {other} (not validated from the trust anchor)",
                    r.name,
                    r.record_type()
                ));
            }
        };
        match seen {
            None => seen = Some(this),
            Some(s) if s == this => {}
            Some(_) => {
                return Err(format!(
                    "{} mixes secure and insecure records in one answer",
                    r.name
                ));
            }
        }
    }
    seen.ok_or_else(|| "the answer carries no record that proves it".to_string())
}

/// How the resolver is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverSpec {
    /// Plain DNS, UDP and TCP: `IP:PORT` (port 53 when left out).
    Plain(SocketAddr),
    /// DNS over TLS (RFC 7858): `tls://IP:PORT#NAME` (port 853 when left out); the server's
    /// certificate must be valid for NAME (the web roots plus `--ca-file`).
    Tls {
        /// Where to connect.
        addr: SocketAddr,
        /// The name the certificate must carry.
        name: String,
    },
}

impl ResolverSpec {
    /// Parses `IP[:PORT]`, `[V6]:PORT` or `tls://IP[:PORT]#NAME`.
    pub fn parse(input: &str) -> Result<ResolverSpec, String> {
        let input = input.trim();
        if let Some(rest) = input.strip_prefix("tls://") {
            let (addr, name) = rest.split_once('#').ok_or_else(|| {
                format!(
                    "DNS over TLS needs the name the server's certificate carries: tls://IP:853#NAME, not {input:?}"
                )
            })?;
            // The certificate's name: an IP address, or a host name as its A-label (bidi
            // controls, spaces and the like are refused here rather than failing every look-up).
            let name = name.trim().trim_end_matches('.');
            let name = if name.parse::<IpAddr>().is_ok() {
                name.to_string()
            } else {
                kst_core::AddressPolicy::default()
                    .normalize_domain(name)
                    .map_err(|_| format!("no usable TLS server name in {input:?}"))?
            };
            return Ok(ResolverSpec::Tls {
                addr: socket_addr(addr, 853).map_err(|e| format!("{e} in {input:?}"))?,
                name,
            });
        }
        if input.contains("://") {
            return Err(format!(
                "unknown resolver scheme in {input:?}: use IP:PORT (plain DNS) or tls://IP:853#NAME (DNS over TLS)"
            ));
        }
        socket_addr(input, 53)
            .map(ResolverSpec::Plain)
            .map_err(|e| format!("--resolver wants IP:PORT or tls://IP:853#NAME: {e}"))
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            ResolverSpec::Plain(a) | ResolverSpec::Tls { addr: a, .. } => *a,
        }
    }
}

fn socket_addr(input: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = input.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = input.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    if let Some(v6) = input.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
        && let Ok(ip) = v6.parse::<IpAddr>()
    {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(format!(
        "{input:?} is not an IP address with an optional port"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::{Name, RData, rdata::A};

    fn rec(proof: Proof) -> Record {
        let mut r = Record::from_rdata(
            Name::from_ascii("mail.example.net.").unwrap(),
            300,
            RData::A(A::new(127, 0, 0, 1)),
        );
        r.proof = proof;
        r
    }

    #[test]
    fn only_all_secure_or_all_insecure_is_accepted() {
        assert_eq!(
            verdict(&[rec(Proof::Secure), rec(Proof::Secure)]),
            Ok(DnsSecurity::Secure)
        );
        assert_eq!(verdict(&[rec(Proof::Insecure)]), Ok(DnsSecurity::Insecure));
        assert!(verdict(&[rec(Proof::Secure), rec(Proof::Insecure)]).is_err());
        assert!(verdict(&[rec(Proof::Bogus)]).is_err());
        // hickory's summary would call this insecure; here it is not proven, so refused.
        assert!(verdict(&[rec(Proof::Indeterminate)]).is_err());
        assert!(verdict(&[]).is_err());
    }

    #[test]
    fn weakest_orders_the_verdicts() {
        use DnsSecurity::*;
        assert_eq!(Secure.weakest(Insecure), Insecure);
        assert_eq!(Insecure.weakest(Unvalidated), Unvalidated);
        assert_eq!(Secure.weakest(Secure), Secure);
    }

    #[test]
    fn resolver_specs_parse() {
        assert_eq!(
            ResolverSpec::parse("127.0.0.1:5300"),
            Ok(ResolverSpec::Plain("127.0.0.1:5300".parse().unwrap()))
        );
        assert_eq!(
            ResolverSpec::parse("::1"),
            Ok(ResolverSpec::Plain("[::1]:53".parse().unwrap()))
        );
        assert_eq!(
            ResolverSpec::parse("tls://127.0.0.1:5301#dns.test"),
            Ok(ResolverSpec::Tls {
                addr: "127.0.0.1:5301".parse().unwrap(),
                name: "dns.test".into()
            })
        );
        assert_eq!(
            ResolverSpec::parse("tls://[2001:db8::1]#dns.example").unwrap(),
            ResolverSpec::Tls {
                addr: "[2001:db8::1]:853".parse().unwrap(),
                name: "dns.example".into()
            }
        );
        assert!(ResolverSpec::parse("tls://127.0.0.1:853").is_err());
        assert!(ResolverSpec::parse("tls://127.0.0.1:853#dns.test\u{202e}").is_err());
        assert!(ResolverSpec::parse("tls://127.0.0.1:853#").is_err());
        assert_eq!(
            ResolverSpec::parse("tls://127.0.0.1#1.1.1.1").unwrap(),
            ResolverSpec::Tls {
                addr: "127.0.0.1:853".parse().unwrap(),
                name: "1.1.1.1".into()
            }
        );
        assert!(ResolverSpec::parse("https://1.1.1.1/dns-query").is_err());
        assert!(ResolverSpec::parse("dns.example:53").is_err());
    }
}
