//! The `[lmtp]` configuration section of `kst serve`, with its defaults and the allow-list.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[lmtp]`: where the LMTP daemon listens, whom it talks to, and its limits.
///
/// **The LMTP port is as trusted as the MTA**: whoever can connect to it can write a "trusted"
/// `Received:` header and so publish keys for any account. The default is therefore a Unix
/// socket (`./data/lmtp.sock`, mode 0660, group [`LmtpConfig::socket_group`]); TCP is an
/// explicit choice, and kst warns at start on TCP (it does not implement LMTP AUTH).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmtpConfig {
    /// A Unix socket as `"unix:/path"` (default `"unix:./data/lmtp.sock"`, relative to the
    /// working directory) or an absolute path starting with `/`; or `"host:port"` for TCP.
    pub listen: String,
    /// Group of the Unix socket (a name from `/etc/group` or a numeric gid), so that the MTA's
    /// LMTP client (Postfix: `lmtp:unix:/path`, running as `postfix`) can connect to the 0660
    /// socket. Unset: kst's own group. Only with a Unix socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
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
            listen: DEFAULT_LISTEN.into(),
            socket_group: None,
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
                "is empty; set \"unix:/run/kst/lmtp.sock\" (or, explicitly, \"127.0.0.1:2424\")",
            ));
        }
        // The group itself is looked up when the socket is made (`kst serve` start), so that
        // `kst config check` works on a host without the MTA's group.
        if let Some(group) = &self.socket_group
            && self.unix_socket().is_none()
        {
            return Err(ConfigError::key(
                "lmtp.socket_group",
                format!(
                    "is set ({group:?}) but lmtp.listen ({:?}) is TCP; it applies to a Unix socket only: remove it or listen on \"unix:/path\"",
                    self.listen
                ),
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

    /// The Unix socket path of [`LmtpConfig::listen`], `None` for TCP.
    pub fn unix_socket(&self) -> Option<&str> {
        let listen = self.listen.trim();
        listen
            .strip_prefix("unix:")
            .or_else(|| listen.starts_with('/').then_some(listen))
    }

    /// The gid of [`LmtpConfig::socket_group`], `None` when unset.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        self.socket_group
            .as_deref()
            .map(|g| resolve_group(g).map_err(|why| ConfigError::key("lmtp.socket_group", why)))
            .transpose()
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

/// Where `kst serve` listens for LMTP unless `[lmtp] listen` says otherwise: a Unix socket next
/// to the embedded default's store (`./data/keys`).
pub const DEFAULT_LISTEN: &str = "unix:./data/lmtp.sock";

/// A group name (looked up in `/etc/group`) or a numeric gid.
fn resolve_group(group: &str) -> Result<u32, String> {
    let group = group.trim();
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let table = std::fs::read_to_string("/etc/group").map_err(|e| {
        format!("cannot read /etc/group to look up {group:?} ({e}); give a numeric gid")
    })?;
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            format!("no group {group:?} in /etc/group; create it, or give a numeric gid (e.g. the gid of postfix)")
        })
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
    fn default_is_a_unix_socket_and_socket_group_needs_one() {
        let cfg = LmtpConfig::default();
        assert_eq!(cfg.unix_socket(), Some("./data/lmtp.sock"));
        let root = LmtpConfig {
            socket_group: Some("0".into()),
            ..LmtpConfig::default()
        };
        assert_eq!(root.socket_gid().expect("numeric gid"), Some(0));
        let tcp = LmtpConfig {
            listen: "127.0.0.1:2424".into(),
            ..root
        };
        assert!(tcp.unix_socket().is_none());
        let err = tcp.validate().expect_err("socket_group on TCP");
        assert_eq!(err.key_name(), Some("lmtp.socket_group"));
        let missing = LmtpConfig {
            socket_group: Some("no-such-group-kst".into()),
            ..LmtpConfig::default()
        };
        let err = missing.socket_gid().expect_err("unknown group");
        assert!(err.to_string().contains("numeric gid"), "{err}");
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
