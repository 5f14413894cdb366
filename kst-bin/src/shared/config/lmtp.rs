//! The `[lmtp]` configuration section of `kst serve`, with its defaults and the allow-list.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[lmtp]`: where the LMTP daemon listens, whom it talks to, and its limits.
///
/// **The LMTP port is as trusted as the MTA**: whoever can connect to it can write a "trusted"
/// `Received:` header and so publish keys for any account. Keep it on loopback or a Unix socket
/// and keep `allow` as narrow as the MTA hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmtpConfig {
    /// `"host:port"` for TCP (default `"127.0.0.1:2424"`), or a Unix socket as `"unix:/path"` or
    /// an absolute path starting with `/`.
    pub listen: String,
    /// Peers that may talk LMTP: IP addresses or CIDRs (`"10.1.2.3"`, `"10.0.0.0/8"`,
    /// `"::1/128"`). Default: loopback only. Unix socket peers are always allowed (file
    /// permissions guard the socket). Anyone else gets `554 5.7.1` and is logged.
    pub allow: Vec<String>,
    /// Deprecated alias of `limits.max_message_bytes`, which now bounds LMTP mail too; when
    /// set, [`super::Config::load`] copies it there and warns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<usize>,
    /// Connections served at once (default 256); one more gets `421 4.3.2` and is closed.
    pub max_connections: usize,
    /// Seconds a client has to send each command (default 300, as RFC 5321 suggests).
    pub command_timeout_secs: u64,
    /// Seconds a client has to send a whole message after `354` (default 600).
    pub data_timeout_secs: u64,
    /// Recipients per transaction (default 100); more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Seconds to let transactions in flight finish after SIGTERM/SIGINT (default 30).
    pub shutdown_grace_secs: u64,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            listen: "127.0.0.1:2424".into(),
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            max_message_size: None,
            max_connections: 256,
            command_timeout_secs: 300,
            data_timeout_secs: 600,
            max_recipients: 100,
            shutdown_grace_secs: 30,
        }
    }
}

impl LmtpConfig {
    /// Checks every value and parses the allow-list. Call it before binding so that a typo is
    /// reported at start, not at the first connection.
    pub fn validate(&self) -> Result<AllowList, ConfigError> {
        if self.listen.trim().is_empty() {
            return Err(ConfigError::key(
                "lmtp.listen",
                "is empty; set \"127.0.0.1:2424\" or \"unix:/run/kst/lmtp.sock\"",
            ));
        }
        for (key, value) in [
            ("lmtp.max_connections", self.max_connections as u64),
            ("lmtp.command_timeout_secs", self.command_timeout_secs),
            ("lmtp.data_timeout_secs", self.data_timeout_secs),
            ("lmtp.max_recipients", self.max_recipients as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        AllowList::parse(&self.allow)
    }

    /// [`LmtpConfig::command_timeout_secs`] as a duration.
    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs)
    }

    /// [`LmtpConfig::data_timeout_secs`] as a duration.
    pub fn data_timeout(&self) -> Duration {
        Duration::from_secs(self.data_timeout_secs)
    }

    /// [`LmtpConfig::shutdown_grace_secs`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// One allowed network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `"10.0.0.0/8"`, `"::1/128"` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => {
                p.parse::<u8>().ok().filter(|&p| p <= max)?
            }
            Some(_) => return None,
        };
        Some(Cidr { addr, prefix })
    }

    /// True when `ip` is inside this network (IPv4-mapped IPv6 peers count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (a >> shift) == (b >> shift)
}

/// The parsed `[lmtp] allow` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Cidr>);

impl AllowList {
    /// Parses every entry; the error names the first bad one.
    pub fn parse(entries: &[String]) -> Result<AllowList, ConfigError> {
        entries
            .iter()
            .map(|e| {
                Cidr::parse(e).ok_or_else(|| {
                    ConfigError::key(
                        "lmtp.allow",
                        format!(
                            "entry {e:?} is not an IP address or CIDR; write e.g. \"127.0.0.1\", \"10.0.0.0/8\" or \"::1/128\""
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    /// True when `ip` may talk LMTP.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn default_allows_loopback_only() {
        let allow = LmtpConfig::default().validate().expect("default is valid");
        assert!(allow.allows(ip("127.0.0.1")));
        assert!(allow.allows(ip("127.3.4.5")));
        assert!(allow.allows(ip("::1")));
        assert!(allow.allows(ip("::ffff:127.0.0.1")));
        assert!(!allow.allows(ip("10.0.0.1")));
        assert!(!allow.allows(ip("::2")));
        assert!(!allow.allows(ip("128.0.0.1")));
    }

    #[test]
    fn cidrs_and_bare_addresses() {
        let allow = AllowList::parse(&[
            "10.0.0.0/8".into(),
            "192.168.1.7".into(),
            "2001:db8::/32".into(),
            "0.0.0.0/0".into(),
        ])
        .expect("valid list");
        assert!(allow.allows(ip("10.255.0.1")));
        assert!(allow.allows(ip("192.168.1.7")));
        assert!(allow.allows(ip("2001:db8:1::5")));
        assert!(!allow.allows(ip("2001:db9::1")));
        // 0.0.0.0/0 matches every IPv4 address.
        assert!(allow.allows(ip("8.8.8.8")));
        let only = AllowList::parse(&["192.168.1.7".into()]).expect("valid");
        assert!(!only.allows(ip("192.168.1.8")));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "10.0.0.0/33",
            "::1/129",
            "localhost",
            "10.0.0.0/",
            "1.2.3.4/x",
            "",
        ] {
            let err = AllowList::parse(&[bad.to_string()]).expect_err(bad);
            assert_eq!(err.key_name(), Some("lmtp.allow"));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn zero_limits_are_refused() {
        let cfg = LmtpConfig {
            max_connections: 0,
            ..LmtpConfig::default()
        };
        assert_eq!(
            cfg.validate().expect_err("zero").key_name(),
            Some("lmtp.max_connections")
        );
    }
}
