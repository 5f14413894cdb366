//! Finding servers in DNS: RFC 6186 SRV records for the account's submission and IMAP servers,
//! MX records for the direct route, and host addresses. `--resolver IP:PORT` sends every query
//! to one server (tests run dnsmasq on loopback); otherwise the system's resolv.conf applies.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use super::config::{Endpoint, Security};

/// A DNS resolver for the client.
pub struct Dns {
    resolver: TokioResolver,
    /// True when `--resolver` named the server: host names are then resolved through it too
    /// (not through /etc/hosts).
    explicit: bool,
}

/// A DNS failure, said plainly.
#[derive(Debug, thiserror::Error)]
#[error("DNS: {0}")]
pub struct DnsError(pub String);

impl Dns {
    /// A resolver asking `server`, or the system's configured servers when `None`.
    pub fn new(server: Option<SocketAddr>) -> Result<Dns, DnsError> {
        let mut builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| {
                DnsError(format!(
                    "cannot read the system resolver configuration: {e}; name one with --resolver IP:PORT"
                ))
            })?,
        };
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        let resolver = builder
            .build()
            .map_err(|e| DnsError(format!("cannot set up the resolver: {e}")))?;
        Ok(Dns {
            resolver,
            explicit: server.is_some(),
        })
    }

    /// The resolver itself, for look-ups made elsewhere (the DKIM key record in
    /// `client::dkim`): the same servers and, once it validates, the same DNSSEC checks.
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// The best SRV target of `name` (lowest priority, then highest weight) as `(host, port)`;
    /// `None` when there is no record or the record says "not offered" (target `.`).
    pub async fn srv(&self, name: &str) -> Result<Option<(String, u16)>, DnsError> {
        let lookup = match self.resolver.lookup(fqdn(name), RecordType::SRV).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => return Ok(None),
            Err(e) => return Err(DnsError(format!("SRV {name}: {e}"))),
        };
        let mut best: Option<(u16, u16, String, u16)> = None;
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                let target = srv.target.to_utf8();
                let target = target.trim_end_matches('.').to_string();
                let candidate = (srv.priority, u16::MAX - srv.weight, target, srv.port);
                if best
                    .as_ref()
                    .is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1))
                {
                    best = Some(candidate);
                }
            }
        }
        Ok(best
            .and_then(|(_, _, host, port)| (!host.is_empty() && port != 0).then_some((host, port))))
    }

    /// The mail exchangers of `domain`, most preferred first. No MX record means the domain
    /// itself (RFC 5321 §5.1); a null MX (`.`) means the domain accepts no mail: empty list.
    pub async fn mx(&self, domain: &str) -> Result<Vec<String>, DnsError> {
        let lookup = match self.resolver.lookup(fqdn(domain), RecordType::MX).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() && !e.is_nx_domain() => {
                return Ok(vec![domain.to_string()]);
            }
            Err(e) if e.is_nx_domain() => {
                return Err(DnsError(format!("the domain {domain} does not exist")));
            }
            Err(e) => return Err(DnsError(format!("MX {domain}: {e}"))),
        };
        let mut mx: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(m) => Some((
                    m.preference,
                    m.exchange.to_utf8().trim_end_matches('.').to_string(),
                )),
                _ => None,
            })
            .collect();
        mx.sort();
        Ok(mx
            .into_iter()
            .map(|(_, h)| h)
            .filter(|h| !h.is_empty())
            .collect())
    }

    /// The addresses of `host` (an IP literal is its own address).
    pub async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if !self.explicit {
            return tokio::net::lookup_host((host, port))
                .await
                .map(|a| a.collect())
                .map_err(|e| DnsError(format!("cannot resolve {host}: {e}")));
        }
        match self.resolver.lookup_ip(fqdn(host)).await {
            Ok(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect()),
            Err(e) => Err(DnsError(format!("cannot resolve {host}: {e}"))),
        }
    }

    /// The account's submission server from `_submissions._tcp` (implicit TLS, RFC 8314) or
    /// `_submission._tcp` (STARTTLS, RFC 6186).
    pub async fn submission(&self, domain: &str) -> Result<Option<Endpoint>, DnsError> {
        self.first_srv(&[
            (format!("_submissions._tcp.{domain}"), Security::Implicit),
            (format!("_submission._tcp.{domain}"), Security::StartTls),
        ])
        .await
    }

    /// The account's IMAP server from `_imaps._tcp` or `_imap._tcp` (RFC 6186).
    pub async fn imap(&self, domain: &str) -> Result<Option<Endpoint>, DnsError> {
        self.first_srv(&[
            (format!("_imaps._tcp.{domain}"), Security::Implicit),
            (format!("_imap._tcp.{domain}"), Security::StartTls),
        ])
        .await
    }

    async fn first_srv(&self, names: &[(String, Security)]) -> Result<Option<Endpoint>, DnsError> {
        for (name, security) in names {
            if let Some((host, port)) = self.srv(name).await? {
                return Ok(Some(Endpoint {
                    host,
                    port,
                    security: *security,
                }));
            }
        }
        Ok(None)
    }
}

/// `name` with a final dot, so no search domain is tried.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}
