//! Multi-host PostgreSQL URLs (libpq's `postgres://u:p@a:5432,b:5433/db`), split into one URL per host.
//!
//! sqlx takes one host per connection: `PgConnectOptions::from_str` refuses a host list
//! ("invalid port number") and silently ignores `target_session_attrs`. kst-postgres therefore
//! splits the list itself and chooses among the hosts (docs/HA-NOTES.md).

use kst_core::Error;

use crate::error::COMPONENT;

/// libpq's `target_session_attrs`: which of the listed hosts a session may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// `any` (libpq's default): the first host that accepts the connection.
    Any,
    /// `read-write`: a host whose sessions accept writes (`transaction_read_only` is off).
    ReadWrite,
    /// `read-only`: a host whose sessions are read-only.
    ReadOnly,
    /// `primary`: a host that is not in recovery.
    Primary,
    /// `standby`: a host in recovery.
    Standby,
    /// `prefer-standby`: a standby if there is one, else any host.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// Parses libpq's spelling (`read-write`, `prefer-standby`, ...).
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            _ => return None,
        })
    }
}

/// A connection URL split into one single-host URL per listed host, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostUrls {
    /// One URL per host: the same scheme, user, password, database and query parameters, minus
    /// `target_session_attrs`. Each is accepted by `PgConnectOptions::from_str`.
    pub urls: Vec<String>,
    /// The URL's `target_session_attrs` (`Any` when absent).
    pub target: TargetSessionAttrs,
}

/// Splits `url` (`postgres://` or `postgresql://`) at the commas of its host list. A URL with one
/// host (or none: the local socket) comes back as one URL, unchanged apart from a removed
/// `target_session_attrs`. A host without a port gets libpq's default, 5432. `host`, `hostaddr`
/// and `port` query parameters are refused next to a host list (libpq would pair them up by
/// position; say the hosts once, in the authority).
pub fn split_hosts(url: &str) -> Result<HostUrls, Error> {
    let bad = |why: &str| Error::Config(format!("{COMPONENT}: database URL: {why}"));
    let scheme_len = ["postgres://", "postgresql://"]
        .iter()
        .find(|s| url.starts_with(*s))
        .map(|s| s.len())
        .ok_or_else(|| bad("must start with postgres:// or postgresql://"))?;
    let (scheme, rest) = url.split_at(scheme_len);
    // Authority: up to the first '/' or '?' (a '/' or '?' in a password must be percent-encoded).
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let (userinfo, hostlist) = match authority.rfind('@') {
        Some(i) => (&authority[..=i], &authority[i + 1..]),
        None => ("", authority),
    };
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };

    let mut target = TargetSessionAttrs::Any;
    let mut params = Vec::new();
    let mut host_params = Vec::new();
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "target_session_attrs" => {
                target = TargetSessionAttrs::parse(value).ok_or_else(|| {
                    bad(&format!(
                        "target_session_attrs={value} is not one of any, read-write, read-only, \
                         primary, standby, prefer-standby"
                    ))
                })?;
            }
            "host" | "hostaddr" | "port" => {
                host_params.push(key);
                params.push(pair);
            }
            _ => params.push(pair),
        }
    }
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };

    let hosts: Vec<&str> = hostlist.split(',').collect();
    if hosts.len() == 1 {
        return Ok(HostUrls {
            urls: vec![format!("{scheme}{authority}{path}{query}")],
            target,
        });
    }
    if let Some(key) = host_params.first() {
        return Err(bad(&format!(
            "the query parameter `{key}` cannot be combined with a list of hosts; list every \
             host:port in the URL's authority"
        )));
    }
    let mut urls = Vec::with_capacity(hosts.len());
    for host in hosts {
        let (name, port) =
            host_and_port(host).map_err(|why| bad(&format!("host `{host}`: {why}")))?;
        urls.push(format!("{scheme}{userinfo}{name}:{port}{path}{query}"));
    }
    Ok(HostUrls { urls, target })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (name as written, port); port 5432 when absent.
fn host_and_port(host: &str) -> Result<(&str, u16), &'static str> {
    let (name, port) = if host.starts_with('[') {
        let close = host
            .find(']')
            .ok_or("an IPv6 address needs its closing `]`")?;
        let (name, after) = host.split_at(close + 1);
        match after {
            "" => (name, None),
            _ => (
                name,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("expected `:port` after `]`")?,
                ),
            ),
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    if name.is_empty() || name == "[]" {
        return Err("empty host name");
    }
    let port = match port {
        None => 5432,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port must be a number from 1 to 65535")?,
    };
    Ok((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;

    fn split(url: &str) -> HostUrls {
        split_hosts(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn one_host_comes_back_unchanged() {
        for url in [
            "postgres://u:p@db.internal:5432/kst",
            "postgresql://db/kst?sslmode=require&application_name=x",
            "postgres:///kst",
            "postgres://u@127.0.0.1/kst?host=/run/postgresql",
        ] {
            assert_eq!(split(url).urls, vec![url.to_string()], "{url}");
            assert_eq!(split(url).target, TargetSessionAttrs::Any);
        }
    }

    #[test]
    fn a_host_list_becomes_one_url_per_host_in_order() {
        let h = split(
            "postgres://kst:s%40cret@pg-a:5432,pg-b:5433,pg-c/kst?sslmode=disable&target_session_attrs=read-write",
        );
        assert_eq!(
            h.urls,
            [
                "postgres://kst:s%40cret@pg-a:5432/kst?sslmode=disable",
                "postgres://kst:s%40cret@pg-b:5433/kst?sslmode=disable",
                "postgres://kst:s%40cret@pg-c:5432/kst?sslmode=disable",
            ]
        );
        assert_eq!(h.target, TargetSessionAttrs::ReadWrite);
    }

    #[test]
    fn ipv6_hosts_without_user_or_database() {
        let h = split("postgresql://[::1]:15432,[fd00::2],10.0.0.3:15434");
        assert_eq!(
            h.urls,
            [
                "postgresql://[::1]:15432",
                "postgresql://[fd00::2]:5432",
                "postgresql://10.0.0.3:15434",
            ]
        );
    }

    #[test]
    fn target_session_attrs_is_removed_even_for_one_host() {
        let h = split("postgres://h/kst?target_session_attrs=primary&sslmode=disable");
        assert_eq!(h.urls, ["postgres://h/kst?sslmode=disable"]);
        assert_eq!(h.target, TargetSessionAttrs::Primary);
        let h = split("postgres://h/kst?target_session_attrs=prefer-standby");
        assert_eq!(h.urls, ["postgres://h/kst"]);
        assert_eq!(h.target, TargetSessionAttrs::PreferStandby);
    }

    #[test]
    fn every_split_url_is_accepted_by_sqlx_with_its_own_host_and_port() {
        // sqlx itself refuses the list (the reason for this module).
        let list = "postgres://postgres:postgres@127.0.0.1:15432,127.0.0.1:15433/postgres";
        assert!(PgConnectOptions::from_str(list).is_err());
        let h = split(list);
        let got: Vec<(String, u16, String)> = h
            .urls
            .iter()
            .map(|u| {
                let o = PgConnectOptions::from_str(u).unwrap_or_else(|e| panic!("{u}: {e}"));
                (
                    o.get_host().to_string(),
                    o.get_port(),
                    o.get_database().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1".to_string(), 15432, "postgres".to_string()),
                ("127.0.0.1".to_string(), 15433, "postgres".to_string()),
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_split_with_a_reason() {
        for (url, why) in [
            ("mysql://h/kst", "must start with postgres://"),
            ("postgres://a,,b/kst", "host ``: empty host name"),
            (
                "postgres://a:5432,b:99999/kst",
                "host `b:99999`: the port must be",
            ),
            ("postgres://a:0,b/kst", "host `a:0`: the port must be"),
            ("postgres://a:x,b/kst", "host `a:x`: the port must be"),
            ("postgres://[::1,b/kst", "needs its closing"),
            ("postgres://[::1]x,b/kst", "expected `:port` after `]`"),
            (
                "postgres://a,b/kst?port=5433",
                "`port` cannot be combined with a list of hosts",
            ),
            ("postgres://a,b/kst?host=c", "`host` cannot be combined"),
            (
                "postgres://a/kst?target_session_attrs=writable",
                "target_session_attrs=writable is not one of",
            ),
        ] {
            match split_hosts(url) {
                Ok(h) => panic!("{url}: accepted as {h:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(why), "{url}: `{msg}` does not say `{why}`");
                    assert!(
                        msg.contains("store(postgres)"),
                        "{url}: `{msg}` names no component"
                    );
                }
            }
        }
    }
}
