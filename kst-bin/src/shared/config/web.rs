//! The `[web]` section: the public HTTP(S) listener for WKD, VKS and HKP, with its limits.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Cidr;

/// `[web]`: the public listener. Separate from `[http]` (operations, loopback only).
///
/// Plain HTTP behind a reverse proxy (list the proxy in `trusted_proxies`), or TLS with
/// `tls_cert` and `tls_key` (PEM files, re-read when they change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// `"host:port"`; empty (the default) turns the listener off. E.g. `"0.0.0.0:443"` with TLS,
    /// `"127.0.0.1:8081"` behind a proxy.
    pub listen: String,
    /// PEM certificate chain for TLS; set with `tls_key`, or leave both empty for plain HTTP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for TLS. Keep it mode 0600.
    pub tls_key: Option<PathBuf>,
    /// Seconds between checks of the certificate files for a change (default 60). A changed pair
    /// is loaded without a restart; a broken one is logged and the old one kept.
    pub tls_reload_secs: u64,
    /// Peers whose forwarding header names the client: IP addresses or CIDRs (default none:
    /// the TCP peer is the client).
    pub trusted_proxies: Vec<String>,
    /// The one header the trusted proxies write: `"x-forwarded-for"` (the default) or
    /// `"forwarded"` (RFC 7239). Only that header is read, never the other, which a proxy
    /// passes through from the client.
    pub trusted_proxy_header: ProxyHeader,
    /// Connections one client (IPv4 address or IPv6 /64, as the TCP peer; trusted proxies are
    /// exempt) may hold at once (default 64); more from it are closed at once. The clients of
    /// one IPv6 /48 together hold at most a quarter of `max_connections` (at least this).
    pub max_connections_per_client: usize,
    /// Connections served at once (default 1024); more are closed at once.
    pub max_connections: usize,
    /// Seconds a connection may stay without any byte read or written (default 15); also the
    /// time a whole request head has to arrive, however it trickles in.
    pub idle_timeout_secs: u64,
    /// Seconds a client has to finish the TLS handshake (default 10).
    pub handshake_timeout_secs: u64,
    /// `Cache-Control: max-age` of served keys and policy files, in seconds (default 300).
    /// Misses are never cached, so a key is found as soon as it is published.
    pub cache_max_age_secs: u64,
    /// Request limits (see [`WebLimits`]).
    pub limits: WebLimits,
    /// Where the limits' counters live (see [`WebCounters`]; default: the key store's).
    pub counters: WebCounters,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: String::new(),
            tls_cert: None,
            tls_key: None,
            tls_reload_secs: 60,
            trusted_proxies: Vec::new(),
            trusted_proxy_header: ProxyHeader::XForwardedFor,
            max_connections_per_client: 64,
            max_connections: 1024,
            idle_timeout_secs: 15,
            handshake_timeout_secs: 10,
            cache_max_age_secs: 300,
            limits: WebLimits::default(),
            counters: WebCounters::default(),
        }
    }
}

/// The forwarding header the trusted proxies write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyHeader {
    /// `X-Forwarded-For` (nginx `$proxy_add_x_forwarded_for`, HAProxy `option forwardfor`).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239), for proxies that append `for=` to it.
    Forwarded,
}

/// `[web.limits]`: per-client and global counters, shared through the store's rate limiter.
/// A client is an IPv4 address or an IPv6 /64. 0 turns a counter off.
///
/// Exact matching still tells whether an address has a key (200 or 404): misses are counted
/// per client and against a global budget, so walking a dictionary of addresses is slow for
/// one client and bounded for all of them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebLimits {
    /// Requests per window from one client (default 1,000 per 10 minutes). Counted in the
    /// store behind the requests, every client's together in one write at most every 25 ms,
    /// so a client may get up to 8 more per window and instance (`server::web::writebehind`);
    /// limits below 32 are counted one by one.
    pub per_client: u32,
    /// Look-ups that found nothing (404) one client may make per window and still be served
    /// (default 100). A miss is only known once it is answered, so the one that goes over the
    /// budget (the 101st by default) is still answered 404; it blocks the client, whose later
    /// look-ups get 429 until the window ends: at most `per_client_misses + 1` answers 404
    /// per window.
    pub per_client_misses: u32,
    /// Misses per window from all clients together (default 10,000); after that the key
    /// look-ups of every client that missed in the window get 429 until the window ends
    /// (one more miss each for clients that had none). Clients without misses, and policy
    /// files, are still served.
    pub global_misses: u32,
    /// Window length in seconds (default 600, at most 366 days).
    pub window_secs: u64,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            per_client: 1_000,
            per_client_misses: 100,
            global_misses: 10_000,
            window_secs: 600,
        }
    }
}

impl WebLimits {
    /// Every counter off (benchmarks of the look-up path itself).
    pub const OFF: WebLimits = WebLimits {
        per_client: 0,
        per_client_misses: 0,
        global_misses: 0,
        window_secs: 600,
    };

    /// The longest window (`window_secs`): 366 days. Longer ones are refused by
    /// [`WebConfig::validate`] (red team, counters and shares: `window_secs = 18446744073709551615`
    /// made every miss panic, adding the window to the clock, and every Redis counting script
    /// fail after its `INCRBY`, leaving the counter without expiry).
    pub const MAX_WINDOW_SECS: u64 = 366 * 86_400;

    /// The window (at least one second, at most [`WebLimits::MAX_WINDOW_SECS`]).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs.clamp(1, Self::MAX_WINDOW_SECS))
    }
}

/// Where `[web.counters]` keeps the counters of `[web.limits]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CountersBackend {
    /// The key store's own rate limiter (`[store]`), as the mail side's limits (the default).
    #[default]
    Store,
    /// A Redis of their own (`url`, `sentinels` or `cluster_nodes`), which holds only soft
    /// state: no durability guard, `appendonly no` recommended.
    Redis,
}

/// `[web.counters]`: where the counters of `[web.limits]` live. By default in the key store
/// (`backend = "store"`). `backend = "redis"` puts them on a Redis of their own, shared by a
/// pool like the store: the counters are soft state (losing them resets the windows), so that
/// Redis needs no durability (`appendonly no`, `save ""`), and its writes never wait for the
/// key store's log sync, nor make the key store's look-ups wait for theirs (on a Redis key
/// store with `appendfsync always`, each counter write holds every look-up queued behind it
/// for one fsync). Any key store (fs, PostgreSQL, Redis) may use it. The mail side's limits
/// stay in the key store.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebCounters {
    /// `"store"` (the default) or `"redis"`.
    pub backend: CountersBackend,
    /// `redis`: the server's URL (`redis://[user:password@]host:port[/db]`, `rediss://` for
    /// TLS). With `sentinels`, only the data nodes' password and database. May hold a password.
    pub url: String,
    /// `redis`: key prefix of the counters (default `kst-web:`; no `{` or `}`, no control
    /// characters, at most [`MAX_COUNTERS_PREFIX_BYTES`]), so that several pools can share one
    /// server.
    pub prefix: String,
    /// `redis`: sentinels (`redis://host:port` each) that name the primary.
    pub sentinels: Vec<String>,
    /// `redis`: the master name the sentinels monitor (with `sentinels`).
    pub sentinel_master: String,
    /// `redis`: nodes of a Redis Cluster (`redis://host:port` each, some of them), instead of
    /// `url`.
    pub cluster_nodes: Vec<String>,
    /// `redis`: bound on opening one connection to the counters' Redis (TCP and the
    /// connection's set-up, a sentinel's or cluster node's too), in milliseconds (default
    /// [`DEFAULT_COUNTERS_CONNECT_TIMEOUT_MS`], 1 to [`MAX_COUNTERS_TIMEOUT_MS`]).
    pub connect_timeout_ms: u64,
    /// `redis`: bound on waiting for one reply of the counters' Redis, in milliseconds
    /// (default [`DEFAULT_COUNTERS_RESPONSE_TIMEOUT_MS`], 1 to [`MAX_COUNTERS_TIMEOUT_MS`]).
    /// One counters call (a request's hits, a write-behind flush, a check) is cut off after
    /// `connect_timeout_ms + response_timeout_ms` (see [`WebCounters::call_timeout`]).
    pub response_timeout_ms: u64,
}

/// The default `[web.counters] connect_timeout_ms` (as the key store's Redis: 2 s).
pub const DEFAULT_COUNTERS_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// The default `[web.counters] response_timeout_ms` (as the key store's Redis: 3 s).
pub const DEFAULT_COUNTERS_RESPONSE_TIMEOUT_MS: u64 = 3_000;
/// The longest `[web.counters] connect_timeout_ms` and `response_timeout_ms`: 60 s (a web
/// request that the limits count may wait for a counters call).
pub const MAX_COUNTERS_TIMEOUT_MS: u64 = 60_000;

/// The default key prefix of `[web.counters]` on Redis.
pub const DEFAULT_COUNTERS_PREFIX: &str = "kst-web:";

impl Default for WebCounters {
    fn default() -> Self {
        WebCounters {
            backend: CountersBackend::Store,
            url: String::new(),
            prefix: DEFAULT_COUNTERS_PREFIX.into(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            cluster_nodes: Vec::new(),
            connect_timeout_ms: DEFAULT_COUNTERS_CONNECT_TIMEOUT_MS,
            response_timeout_ms: DEFAULT_COUNTERS_RESPONSE_TIMEOUT_MS,
        }
    }
}

impl WebCounters {
    /// `connect_timeout_ms` as a duration (within 1 ms and [`MAX_COUNTERS_TIMEOUT_MS`]).
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.clamp(1, MAX_COUNTERS_TIMEOUT_MS))
    }

    /// `response_timeout_ms` as a duration (within 1 ms and [`MAX_COUNTERS_TIMEOUT_MS`]).
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms.clamp(1, MAX_COUNTERS_TIMEOUT_MS))
    }

    /// The bound on one counters call, reconnecting included: one connection's set-up and one
    /// reply (`connect_timeout_ms + response_timeout_ms`, 5 s by default). A request that waits
    /// for the counters waits at most this per call; the call then fails as when the counters
    /// are down.
    pub fn call_timeout(&self) -> Duration {
        self.connect_timeout() + self.response_timeout()
    }

    /// Whether the counters live apart from the key store.
    pub fn own(&self) -> bool {
        self.backend != CountersBackend::Store
    }

    /// The key prefix (`prefix`, or [`DEFAULT_COUNTERS_PREFIX`] when empty).
    pub fn prefix(&self) -> &str {
        match self.prefix.trim() {
            "" => DEFAULT_COUNTERS_PREFIX,
            p => p,
        }
    }

    fn validate(&self) -> Result<(), WebConfigError> {
        for (key, value) in [
            ("web.counters.connect_timeout_ms", self.connect_timeout_ms),
            ("web.counters.response_timeout_ms", self.response_timeout_ms),
        ] {
            if !(1..=MAX_COUNTERS_TIMEOUT_MS).contains(&value) {
                return Err(err(
                    key,
                    format!(
                        "{value} is not between 1 and {MAX_COUNTERS_TIMEOUT_MS} (60 s): a web \
                         request the limits count may wait that long for the counters; write \
                         e.g. 500"
                    ),
                ));
            }
        }
        let set = !self.url.trim().is_empty()
            || !self.sentinels.is_empty()
            || !self.cluster_nodes.is_empty();
        match self.backend {
            CountersBackend::Store if set => Err(err(
                "web.counters.backend",
                "is \"store\" (the default: the counters live in the key store), but \
                 web.counters names a Redis; set web.counters.backend = \"redis\" to use it, or \
                 remove its url, sentinels and cluster_nodes",
            )),
            CountersBackend::Store => Ok(()),
            CountersBackend::Redis if !set => Err(err(
                "web.counters.url",
                "must be set when web.counters.backend = \"redis\" (e.g. \
                 \"redis://127.0.0.1:6380\"), or name web.counters.sentinels or \
                 web.counters.cluster_nodes",
            )),
            CountersBackend::Redis
                if !self.sentinels.is_empty() && !self.cluster_nodes.is_empty() =>
            {
                Err(err(
                    "web.counters.cluster_nodes",
                    "cannot be set together with web.counters.sentinels: a Redis Cluster fails \
                     over by itself",
                ))
            }
            CountersBackend::Redis
                if !self.sentinels.is_empty() && self.sentinel_master.trim().is_empty() =>
            {
                Err(err(
                    "web.counters.sentinel_master",
                    "must name the master the sentinels monitor when web.counters.sentinels is set",
                ))
            }
            CountersBackend::Redis if self.prefix().contains(['{', '}']) => Err(err(
                "web.counters.prefix",
                format!(
                    "{:?} holds a brace ({{ or }}), which Redis Cluster reads as a hash tag; \
                     write e.g. \"kst-web:\"",
                    self.prefix
                ),
            )),
            CountersBackend::Redis if self.prefix().len() > MAX_COUNTERS_PREFIX_BYTES => Err(err(
                "web.counters.prefix",
                format!(
                    "is {} bytes long; at most {MAX_COUNTERS_PREFIX_BYTES} (it starts every \
                     counter's key: a flush sends it once per client), e.g. \"kst-web:\"",
                    self.prefix().len()
                ),
            )),
            CountersBackend::Redis if self.prefix().chars().any(char::is_control) => Err(err(
                "web.counters.prefix",
                format!(
                    "{:?} holds a control character (a line break, an escape: a typo, which \
                     makes the counters' keys hard to find); write e.g. \"kst-web:\"",
                    self.prefix
                ),
            )),
            CountersBackend::Redis => Ok(()),
        }
    }
}

/// The longest `[web.counters] prefix`, in bytes.
pub const MAX_COUNTERS_PREFIX_BYTES: usize = 256;

impl std::fmt::Debug for WebCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCounters")
            .field("backend", &self.backend)
            .field("url", &super::mask_url(&self.url))
            .field("prefix", &self.prefix)
            .field("sentinels", &super::mask_urls(&self.sentinels))
            .field("sentinel_master", &self.sentinel_master)
            .field("cluster_nodes", &super::mask_urls(&self.cluster_nodes))
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .finish()
    }
}

/// A `[web]` value that cannot be used: which key, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {message}")]
pub struct WebConfigError {
    /// The key, e.g. `web.trusted_proxies`.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> WebConfigError {
    WebConfigError {
        key,
        message: message.into(),
    }
}

/// The parsed `trusted_proxies` list and the header they write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    cidrs: Vec<Cidr>,
    header: ProxyHeader,
}

impl TrustedProxies {
    /// True when `ip` is a trusted proxy.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(ip))
    }

    /// The one header that names the client.
    pub fn header(&self) -> ProxyHeader {
        self.header
    }
}

impl WebConfig {
    /// True when `listen` is set.
    pub fn enabled(&self) -> bool {
        !self.listen.trim().is_empty()
    }

    /// Checks every value; returns the parsed proxy list. Call it at start so that a typo is
    /// reported then, not at the first request.
    pub fn validate(&self) -> Result<TrustedProxies, WebConfigError> {
        if self.enabled() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(err(
                "web.listen",
                format!(
                    "{:?} is not \"ip:port\"; write e.g. \"0.0.0.0:443\" or \"127.0.0.1:8081\"",
                    self.listen
                ),
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(err(
                    "web.tls_cert",
                    "and web.tls_key go together: set both for TLS, or neither for plain HTTP",
                ));
            }
            _ => {}
        }
        for (key, value) in [
            ("web.max_connections", self.max_connections as u64),
            (
                "web.max_connections_per_client",
                self.max_connections_per_client as u64,
            ),
            ("web.idle_timeout_secs", self.idle_timeout_secs),
            ("web.handshake_timeout_secs", self.handshake_timeout_secs),
            ("web.tls_reload_secs", self.tls_reload_secs),
        ] {
            if value == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        if self.limits.window_secs > WebLimits::MAX_WINDOW_SECS {
            return Err(err(
                "web.limits.window_secs",
                format!(
                    "{} is longer than {} (366 days); write e.g. 600 (10 minutes)",
                    self.limits.window_secs,
                    WebLimits::MAX_WINDOW_SECS
                ),
            ));
        }
        self.counters.validate()?;
        self.trusted_proxies
            .iter()
            .map(|e| {
                Cidr::parse(e).ok_or_else(|| {
                    err(
                        "web.trusted_proxies",
                        format!(
                            "entry {e:?} is not an IP address or CIDR; write e.g. \"127.0.0.1\" or \"10.0.0.0/8\""
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(|cidrs| TrustedProxies {
                cidrs,
                header: self.trusted_proxy_header,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_valid() {
        let c = WebConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.validate().unwrap(), TrustedProxies::default());
    }

    #[test]
    fn parses_from_toml() {
        let c: WebConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:8443"
            tls_cert = "/etc/kst/web.crt"
            tls_key = "/etc/kst/web.key"
            trusted_proxies = ["10.0.0.0/8", "::1"]
            [limits]
            per_client = 5
            "#,
        )
        .unwrap();
        let proxies = c.validate().unwrap();
        assert!(proxies.contains("10.1.2.3".parse().unwrap()));
        assert!(proxies.contains("::1".parse().unwrap()));
        assert!(!proxies.contains("192.0.2.1".parse().unwrap()));
        assert_eq!(c.limits.per_client, 5);
        assert_eq!(c.limits.per_client_misses, 100);
        assert_eq!(proxies.header(), ProxyHeader::XForwardedFor);
        for (text, header) in [
            ("x-forwarded-for", ProxyHeader::XForwardedFor),
            ("forwarded", ProxyHeader::Forwarded),
        ] {
            let c: WebConfig = toml::from_str(&format!("trusted_proxy_header = {text:?}")).unwrap();
            assert_eq!(c.validate().unwrap().header(), header);
        }
        assert!(toml::from_str::<WebConfig>(r#"trusted_proxy_header = "x-real-ip""#).is_err());
    }

    #[test]
    fn mistakes_name_the_key() {
        let bad = |c: WebConfig| c.validate().unwrap_err().key;
        let on = WebConfig {
            listen: "127.0.0.1:443".into(),
            ..WebConfig::default()
        };
        assert_eq!(
            bad(WebConfig {
                listen: "example.net:443".into(),
                ..on.clone()
            }),
            "web.listen"
        );
        assert_eq!(
            bad(WebConfig {
                tls_cert: Some("/x".into()),
                ..on.clone()
            }),
            "web.tls_cert"
        );
        assert_eq!(
            bad(WebConfig {
                trusted_proxies: vec!["10.0.0.0/33".into()],
                ..on.clone()
            }),
            "web.trusted_proxies"
        );
        assert_eq!(
            bad(WebConfig {
                max_connections: 0,
                ..on
            }),
            "web.max_connections"
        );
        assert!(toml::from_str::<WebConfig>("listn = \"x\"").is_err());
    }

    /// Red team (counters and shares): a window too long for the clock or Redis is refused
    /// at start, and [`WebLimits::window`] caps it anyway.
    #[test]
    fn a_window_longer_than_a_year_is_refused_and_capped() {
        let with = |window_secs: u64| WebConfig {
            limits: WebLimits {
                window_secs,
                ..WebLimits::default()
            },
            ..WebConfig::default()
        };
        with(WebLimits::MAX_WINDOW_SECS).validate().unwrap();
        for long in [WebLimits::MAX_WINDOW_SECS + 1, u64::MAX] {
            let e = with(long).validate().unwrap_err();
            assert_eq!(e.key, "web.limits.window_secs", "{e}");
            assert_eq!(
                with(long).limits.window(),
                Duration::from_secs(WebLimits::MAX_WINDOW_SECS)
            );
        }
        assert_eq!(with(0).limits.window(), Duration::from_secs(1));
    }

    /// `[web.counters]` has timeouts of its own (they were the key store Redis's defaults,
    /// with a 10 s bound on a call that no setting changed); a call is bounded by their sum.
    #[test]
    fn counters_timeouts_default_bound_a_call_and_are_checked() {
        let c = WebCounters::default();
        assert_eq!(c.connect_timeout(), Duration::from_secs(2));
        assert_eq!(c.response_timeout(), Duration::from_secs(3));
        assert_eq!(c.call_timeout(), Duration::from_secs(5));
        let own: WebConfig = toml::from_str(
            r#"
            [counters]
            backend = "redis"
            url = "redis://127.0.0.1:6380"
            connect_timeout_ms = 200
            response_timeout_ms = 300
            "#,
        )
        .unwrap();
        own.validate().unwrap();
        assert_eq!(own.counters.call_timeout(), Duration::from_millis(500));
        for (connect, response, key) in [
            (0, 300, Some("web.counters.connect_timeout_ms")),
            (200, 0, Some("web.counters.response_timeout_ms")),
            (
                MAX_COUNTERS_TIMEOUT_MS + 1,
                300,
                Some("web.counters.connect_timeout_ms"),
            ),
            (200, u64::MAX, Some("web.counters.response_timeout_ms")),
            (1, MAX_COUNTERS_TIMEOUT_MS, None),
        ] {
            let c = WebConfig {
                counters: WebCounters {
                    connect_timeout_ms: connect,
                    response_timeout_ms: response,
                    ..own.counters.clone()
                },
                ..WebConfig::default()
            };
            assert_eq!(
                c.validate().err().map(|e| e.key),
                key,
                "{connect} {response}"
            );
            // Out of range values never overflow the bound on a call.
            assert!(c.counters.call_timeout() <= Duration::from_secs(120));
        }
    }

    #[test]
    fn counters_default_to_the_key_store_and_a_redis_of_their_own_is_checked() {
        let c = WebConfig::default();
        assert!(!c.counters.own());
        assert_eq!(c.counters.prefix(), DEFAULT_COUNTERS_PREFIX);
        let own: WebConfig = toml::from_str(
            r#"
            [counters]
            backend = "redis"
            url = "redis://:secret@127.0.0.1:6380"
            "#,
        )
        .unwrap();
        assert!(own.counters.own());
        own.validate().unwrap();
        assert!(
            !format!("{:?}", own.counters).contains("secret"),
            "the password is masked"
        );
        let bad = |counters: WebCounters| {
            WebConfig {
                counters,
                ..WebConfig::default()
            }
            .validate()
            .unwrap_err()
            .key
        };
        let redis = WebCounters {
            backend: CountersBackend::Redis,
            ..WebCounters::default()
        };
        assert_eq!(bad(redis.clone()), "web.counters.url");
        assert_eq!(
            bad(WebCounters {
                url: "redis://127.0.0.1:6380".into(),
                ..WebCounters::default()
            }),
            "web.counters.backend",
            "a Redis named with backend = \"store\" is a mistake, not ignored"
        );
        assert_eq!(
            bad(WebCounters {
                sentinels: vec!["redis://127.0.0.1:26379".into()],
                ..redis.clone()
            }),
            "web.counters.sentinel_master"
        );
        assert_eq!(
            bad(WebCounters {
                sentinels: vec!["redis://127.0.0.1:26379".into()],
                sentinel_master: "m".into(),
                cluster_nodes: vec!["redis://127.0.0.1:7000".into()],
                ..redis.clone()
            }),
            "web.counters.cluster_nodes"
        );
        assert_eq!(
            bad(WebCounters {
                url: "redis://127.0.0.1:6380".into(),
                prefix: "kst{web}:".into(),
                ..redis
            }),
            "web.counters.prefix"
        );
        for (prefix, ok) in [
            ("x".repeat(MAX_COUNTERS_PREFIX_BYTES), true),
            ("x".repeat(MAX_COUNTERS_PREFIX_BYTES + 1), false),
            ("kst\nweb:".to_string(), false),
            ("kst\u{1b}[2Jweb:".to_string(), false),
            ("kst-wéb-🔑:".to_string(), true),
        ] {
            let c = WebConfig {
                counters: WebCounters {
                    backend: CountersBackend::Redis,
                    url: "redis://127.0.0.1:6380".into(),
                    prefix: prefix.clone(),
                    ..WebCounters::default()
                },
                ..WebConfig::default()
            };
            match c.validate() {
                Ok(_) => assert!(ok, "{prefix:?} accepted"),
                Err(e) => {
                    assert!(!ok, "{prefix:?}: {e}");
                    assert_eq!(e.key, "web.counters.prefix");
                }
            }
        }
        assert!(toml::from_str::<WebConfig>("[counters]\nbackend = \"memcached\"").is_err());
    }
}
