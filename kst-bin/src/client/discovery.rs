//! Finding servers in DNS: RFC 6186 SRV records for the account's submission and IMAP servers,
//! MX records for the direct route, TLSA records for DANE, and host addresses.
//!
//! Every look-up is DNSSEC-validated (see [`super::dnssec`]): the root's trust anchor by
//! default, `--dns-anchor FILE` for a private root. A bogus answer is [`DnsError::Bogus`] (an
//! attack); an insecure one is allowed unless `--require-dnssec` ([`DnsError::NotSecure`]).
//! `--resolver IP:PORT` sends every query to one server, `--resolver tls://IP:853#NAME` over
//! TLS; otherwise the system's resolv.conf names the servers (which must pass DNSSEC records
//! through: the client validates itself).
//!
//! Other client modules ask "was this look-up secure" through [`Dns::lookup`], which returns
//! the records with their [`DnsSecurity`]; [`Dns::resolver`] hands out the validating hickory
//! resolver itself (for mail-auth).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::{RData, Record, RecordType};

use super::config::{Endpoint, Security};
use super::dnssec::{DnsSecurity, ResolverSpec, verdict};

/// How the client's resolver is set up.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    /// The server to ask; `None`: the system's resolv.conf.
    pub server: Option<ResolverSpec>,
    /// DNSSEC trust anchor: a file of root DNSKEY records (`. IN DNSKEY 257 3 13 ...`);
    /// `None`: the IANA root's keys built into hickory.
    pub anchor: Option<PathBuf>,
    /// False only with `--no-dnssec` (a test resolver that serves unsigned zones).
    pub no_validation: bool,
    /// Refuse answers from unsigned zones (`--require-dnssec`).
    pub require_secure: bool,
    /// Extra CA certificates for DNS over TLS (`--ca-file`).
    pub ca_file: Option<PathBuf>,
}

/// A DNS resolver for the client.
pub struct Dns {
    resolver: TokioResolver,
    /// True when `--resolver` named the server, or validation is on: host names are then
    /// resolved through it (not through /etc/hosts and the unvalidated system stub).
    via_resolver: bool,
    validate: bool,
    require_secure: bool,
    /// The weakest verdict of the look-ups made so far (what `--json` reports as `dnssec`).
    seen: Arc<Mutex<Option<DnsSecurity>>>,
}

/// A DNS failure, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No answer, a server failure, a name that does not exist: try again later or fix the
    /// name.
    #[error("DNS: {0}")]
    Failed(String),
    /// The answer failed DNSSEC validation: forged, or its signatures stripped. An attack.
    #[error("DNSSEC: {0}")]
    Bogus(String),
    /// The answer is from an unsigned zone and `--require-dnssec` refuses it.
    #[error("DNSSEC: {0}")]
    NotSecure(String),
}

/// A validated answer.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The records of the asked type (RRSIGs left out).
    Records(Vec<Record>),
    /// The name exists but has no record of this type (proven when the zone is signed).
    NoData,
    /// The name does not exist (proven when the zone is signed).
    NxDomain,
}

/// A value with the DNSSEC verdict of the look-up(s) it came from.
#[derive(Debug, Clone)]
pub struct Secured<T> {
    /// What was found.
    pub value: T,
    /// What DNSSEC proved about it.
    pub security: DnsSecurity,
}

impl Dns {
    /// A validating resolver set up as `settings` say.
    pub fn new(settings: &DnsSettings) -> Result<Dns, DnsError> {
        let mut builder = match &settings.server {
            Some(spec) => {
                let addr = spec.addr();
                let mut conns = match spec {
                    ResolverSpec::Plain(_) => vec![ConnectionConfig::udp(), ConnectionConfig::tcp()],
                    ResolverSpec::Tls { name, .. } => {
                        vec![ConnectionConfig::new(ProtocolConfig::Tls {
                            server_name: Arc::from(name.as_str()),
                        })]
                    }
                };
                for c in &mut conns {
                    c.port = addr.port();
                }
                let ns = NameServerConfig::new(addr.ip(), true, conns);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| {
                DnsError::Failed(format!(
                    "cannot read the system resolver configuration: {e}; name one with --resolver IP:PORT"
                ))
            })?,
        };
        if let Some(ResolverSpec::Tls { .. }) = &settings.server {
            let tls = super::tls::client_config(settings.ca_file.as_deref())
                .map_err(|e| DnsError::Failed(format!("DNS over TLS: {e}")))?;
            builder = builder.with_tls_config(tls);
        }
        let validate = !settings.no_validation;
        if validate {
            builder.options_mut().validate = true;
            if let Some(path) = &settings.anchor {
                let anchors = TrustAnchors::from_file(path).map_err(|e| {
                    DnsError::Failed(format!(
                        "cannot read the DNSSEC trust anchor {}: {e} (it must hold DNSKEY records, e.g. `. 3600 IN DNSKEY 257 3 13 ...`)",
                        path.display()
                    ))
                })?;
                builder = builder.with_trust_anchor(Arc::new(anchors));
            }
        }
        let opts = builder.options_mut();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        let via_resolver = settings.server.is_some() || validate;
        if via_resolver {
            opts.use_hosts_file = ResolveHosts::Never;
        }
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Failed(format!("cannot set up the resolver: {e}")))?;
        Ok(Dns {
            resolver,
            via_resolver,
            validate,
            require_secure: settings.require_secure && validate,
            seen: Arc::new(Mutex::new(None)),
        })
    }

    /// Reports the weakest verdict into `seen` (shared with the command's report) from now on.
    pub fn reporting_to(mut self, seen: Arc<Mutex<Option<DnsSecurity>>>) -> Dns {
        self.seen = seen;
        self
    }

    /// The validating hickory resolver (trust anchor and DNS over TLS included), for code that
    /// needs the resolver type itself (mail-auth's `MessageAuthenticator`, the DKIM key record in
    /// `client::dkim`). Its answers carry per-record proofs; judge them with
    /// [`super::dnssec::verdict`], or ask through [`Dns::lookup`] / [`Dns::txt`], which do.
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// The weakest DNSSEC verdict of the look-ups made so far (`None`: none was made).
    pub fn security(&self) -> Option<DnsSecurity> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, security: DnsSecurity) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        *seen = Some(seen.map_or(security, |s| s.weakest(security)));
    }

    /// Looks up `name`'s records of type `rtype` and judges the answer: a bogus answer is
    /// [`DnsError::Bogus`], an insecure one [`DnsError::NotSecure`] under `--require-dnssec`.
    /// Negative answers are judged by the proof of their SOA and NSEC/NSEC3 records.
    pub async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Secured<Answer>, DnsError> {
        let what = format!("{name} {rtype}");
        let (answer, security) = match self.resolver.lookup(fqdn(name), rtype).await {
            Ok(lookup) => {
                let records: Vec<Record> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .cloned()
                    .collect();
                let security = self.judge(&what, lookup.answers())?;
                if records.is_empty() {
                    (Answer::NoData, security)
                } else {
                    (Answer::Records(records), security)
                }
            }
            Err(NetError::Dns(HickoryDnsError::NoRecordsFound(no))) => {
                let answer = if no.response_code == ResponseCode::NXDomain {
                    Answer::NxDomain
                } else {
                    Answer::NoData
                };
                let security = match &no.authorities {
                    Some(auth) if !auth.is_empty() => self.judge(&what, auth.iter())?,
                    _ => match &no.soa {
                        Some(soa) => self.judge_proof(&what, soa.proof)?,
                        None if !self.validate => DnsSecurity::Unvalidated,
                        None => {
                            return Err(DnsError::Bogus(format!(
                                "{what}: a negative answer without SOA or NSEC proof"
                            )));
                        }
                    },
                };
                (answer, security)
            }
            Err(NetError::Dns(HickoryDnsError::Nsec { proof, .. })) => {
                (Answer::NoData, self.judge_proof(&what, proof)?)
            }
            Err(NetError::Dns(HickoryDnsError::DnssecBogus)) => {
                return Err(DnsError::Bogus(format!(
                    "{what}: the answer failed DNSSEC validation (forged, or its signatures stripped)"
                )));
            }
            Err(e) => return Err(DnsError::Failed(format!("{what}: {e}"))),
        };
        if security == DnsSecurity::Insecure && self.require_secure {
            return Err(DnsError::NotSecure(format!(
                "{what} comes from a zone without DNSSEC (provably unsigned), and --require-dnssec refuses it"
            )));
        }
        self.note(security);
        Ok(Secured {
            value: answer,
            security,
        })
    }

    fn judge<'a>(
        &self,
        what: &str,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<DnsSecurity, DnsError> {
        if !self.validate {
            return Ok(DnsSecurity::Unvalidated);
        }
        verdict(records).map_err(|e| DnsError::Bogus(format!("{what}: {e}")))
    }

    fn judge_proof(&self, what: &str, proof: Proof) -> Result<DnsSecurity, DnsError> {
        match proof {
            _ if !self.validate => Ok(DnsSecurity::Unvalidated),
            Proof::Secure => Ok(DnsSecurity::Secure),
            Proof::Insecure => Ok(DnsSecurity::Insecure),
            other => Err(DnsError::Bogus(format!(
                "{what}: the negative answer is {other}, not proven"
            ))),
        }
    }

    /// The best SRV target of `name` (lowest priority, then highest weight) as `(host, port)`;
    /// `None` when there is no record or the record says "not offered" (target `.`).
    pub async fn srv(&self, name: &str) -> Result<Option<(String, u16)>, DnsError> {
        let records = match self.lookup(name, RecordType::SRV).await?.value {
            Answer::Records(r) => r,
            Answer::NoData | Answer::NxDomain => return Ok(None),
        };
        let mut best: Option<(u16, u16, String, u16)> = None;
        for record in &records {
            if let RData::SRV(srv) = &record.data {
                // The A-label: what the resolver, the TLS name check and MTA-STS patterns use.
                let target = srv.target.to_ascii();
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

    /// The mail exchangers of `domain`, most preferred first, with the MX RRset's verdict. No
    /// MX record means the domain itself (RFC 5321 §5.1); a null MX (`.`) means the domain
    /// accepts no mail: empty list.
    pub async fn mx(&self, domain: &str) -> Result<Secured<Vec<String>>, DnsError> {
        let found = self.lookup(domain, RecordType::MX).await?;
        let records = match found.value {
            Answer::Records(r) => r,
            Answer::NoData => {
                return Ok(Secured {
                    value: vec![domain.to_string()],
                    security: found.security,
                });
            }
            Answer::NxDomain => {
                return Err(DnsError::Failed(format!(
                    "the domain {domain} does not exist"
                )));
            }
        };
        let mut mx: Vec<(u16, String)> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(m) => Some((
                    m.preference,
                    m.exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                )),
                _ => None,
            })
            .collect();
        mx.sort();
        Ok(Secured {
            value: mx
                .into_iter()
                .map(|(_, h)| h)
                .filter(|h| !h.is_empty())
                .collect(),
            security: found.security,
        })
    }

    /// The TLSA records of `_PORT._tcp.HOST` (RFC 6698), with their verdict. Empty when there
    /// are none.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<Secured<Vec<TLSA>>, DnsError> {
        let found = self
            .lookup(&format!("_{port}._tcp.{host}"), RecordType::TLSA)
            .await?;
        let value = match found.value {
            Answer::Records(r) => r
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TLSA(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            Answer::NoData | Answer::NxDomain => Vec::new(),
        };
        Ok(Secured {
            value,
            security: found.security,
        })
    }

    /// The TXT strings of `name` (each record's strings joined), with their verdict.
    pub async fn txt(&self, name: &str) -> Result<Secured<Vec<String>>, DnsError> {
        let found = self.lookup(name, RecordType::TXT).await?;
        let value = match found.value {
            Answer::Records(r) => r
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect(),
            Answer::NoData | Answer::NxDomain => Vec::new(),
        };
        Ok(Secured {
            value,
            security: found.security,
        })
    }

    /// The addresses of `host` (an IP literal is its own address; `localhost` is loopback).
    /// A and AAAA are looked up separately, so a bogus A cannot hide behind a good AAAA.
    pub async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        Ok(self.addresses_secured(host, port).await?.value)
    }

    /// [`Dns::addresses`] with the weaker verdict of the A and AAAA look-ups (`Secure` for IP
    /// literals and `localhost`, which need no DNS).
    pub async fn addresses_secured(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Secured<Vec<SocketAddr>>, DnsError> {
        let literal = |addrs: Vec<SocketAddr>| Secured {
            value: addrs,
            security: DnsSecurity::Secure,
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(literal(vec![SocketAddr::new(ip, port)]));
        }
        if host.eq_ignore_ascii_case("localhost") {
            return Ok(literal(vec![
                SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port),
                SocketAddr::new(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), port),
            ]));
        }
        if !self.via_resolver {
            let found = tokio::net::lookup_host((host, port))
                .await
                .map(|a| a.collect())
                .map_err(|e| DnsError::Failed(format!("cannot resolve {host}: {e}")))?;
            return Ok(Secured {
                value: found,
                security: DnsSecurity::Unvalidated,
            });
        }
        let mut addrs = Vec::new();
        let mut security: Option<DnsSecurity> = None;
        let mut last_failure = None;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match self.lookup(host, rtype).await {
                Ok(found) => {
                    security = Some(security.map_or(found.security, |s| s.weakest(found.security)));
                    if let Answer::Records(records) = found.value {
                        addrs.extend(records.iter().filter_map(|r| match &r.data {
                            RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), port)),
                            RData::AAAA(a) => Some(SocketAddr::new(IpAddr::V6(a.0), port)),
                            _ => None,
                        }));
                    }
                }
                Err(e @ (DnsError::Bogus(_) | DnsError::NotSecure(_))) => return Err(e),
                Err(e) => last_failure = Some(e),
            }
        }
        match (addrs.is_empty(), last_failure, security) {
            (false, _, Some(security)) => Ok(Secured {
                value: addrs,
                security,
            }),
            (_, Some(e), _) => Err(e),
            _ => Err(DnsError::Failed(format!("{host} has no address"))),
        }
    }

    /// Whether `host` has an address (an A or AAAA record; an IP literal and `localhost` do),
    /// with what DNSSEC proved about the answer (for `false`: the weaker of the two
    /// look-ups; an IP literal or `localhost` needs no look-up and counts as secure).
    /// `false` only when both look-ups answer that it has none (the name does not exist, or
    /// has neither record); a look-up that fails is an error, never `false`. WKD's direct
    /// method is used only when the advanced host has no address, and a failure an attacker
    /// can cause must not look like that; a `false` that is not `Secure` may itself be
    /// forged (a zone without DNSSEC).
    pub async fn has_address(&self, host: &str) -> Result<Secured<bool>, DnsError> {
        if host.parse::<IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost") {
            return Ok(Secured {
                value: true,
                security: DnsSecurity::Secure,
            });
        }
        let mut security = DnsSecurity::Secure;
        for rtype in [RecordType::A, RecordType::AAAA] {
            let found = self.lookup(host, rtype).await?;
            security = security.min(found.security);
            if let Answer::Records(_) = found.value {
                return Ok(Secured {
                    value: true,
                    security: found.security,
                });
            }
        }
        Ok(Secured {
            value: false,
            security,
        })
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
