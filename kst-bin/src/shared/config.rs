//! The operator's configuration: a TOML file, `KST_*` environment overrides, defaults.
//!
//! Sources, later ones winning: the defaults below, the TOML file (`--config`), then environment
//! variables named `KST_<SECTION>__<KEY>` (`KST_MAILER__PORT=2525`, `KST_KST__DOMAINS=a.net,b.net`).
//! Only variables with a `__` after the prefix are configuration; others such as `KST_CONFIG`
//! are left alone. Unknown keys are errors, and every error names the key at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kst_core::ratelimit::RecipientFolding;
use kst_core::{AddressPolicy, AuthSource, Policy, RateLimits};
use serde::{Deserialize, Serialize};

pub mod dkim;
mod http;
mod lmtp;
mod reminders;
mod transparency;
pub mod web;
mod wks;

pub use self::dkim::{DkimAlgorithm, DkimConfig};
pub use self::http::HttpConfig;
pub use self::lmtp::{AllowList, Cidr, LmtpConfig};
pub use self::reminders::RemindersConfig;
pub use self::transparency::TransparencyConfig;
pub use self::web::{CountersBackend, WebConfig, WebCounters, WebLimits};
pub use self::wks::{WksConfig, WksKeyConfig, check_key_file_mode, read_key_file};
pub use crate::shared::logging::{LogConfig, LogFormat};

/// Environment variable prefix of configuration overrides.
pub const ENV_PREFIX: &str = "KST";
/// Separator between the section and the key in an environment override (`KST_MAILER__PORT`).
pub const ENV_SEPARATOR: &str = "__";
/// Keys whose environment value is a comma-separated list.
pub const ENV_LIST_KEYS: [&str; 6] = [
    "kst.domains",
    "kst.trusted_mta_hosts",
    "lmtp.allow",
    "web.trusted_proxies",
    "limits.recipient_folding.dot_insensitive_domains",
    "transparency.witnesses",
];
/// Keys whose environment value is a list of URLs separated by whitespace (spaces, tabs or
/// newlines), not commas: a URL may hold commas (libpq's multi-host
/// `postgres://db1:5432,db2:5432/kst`, a password), never unencoded whitespace.
/// `KST_STORE__URLS="postgres://kst@db1,db2/kst postgres://kst@db3/kst"` is two entries.
pub const ENV_URL_LIST_KEYS: [&str; 6] = [
    "store.urls",
    "store.read_urls",
    "store.sentinels",
    "store.cluster_nodes",
    "web.counters.sentinels",
    "web.counters.cluster_nodes",
];
/// How secrets are shown by [`Config::masked`].
pub const MASK: &str = "********";

/// The whole configuration of a kst instance. Build it with [`Config::load`].
///
/// `Config::default()` holds the embedded defaults; it serves no domain, so it does not pass
/// [`Config::validate`] until `kst.domains` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[kst]`: served domains, trust and address folding.
    pub kst: KstConfig,
    /// `[limits]`: size caps.
    pub limits: LimitsConfig,
    /// `[store]`: where keys are kept.
    pub store: StoreConfig,
    /// `[mailer]`: how replies leave.
    pub mailer: MailerConfig,
    /// `[log]`: log format and level.
    pub log: LogConfig,
    /// `[lmtp]`: the LMTP daemon of `kst serve`.
    pub lmtp: LmtpConfig,
    /// `[http]`: the operations endpoint of `kst serve`.
    pub http: HttpConfig,
    /// `[wks]`: the Web Key Service submission keys.
    pub wks: WksConfig,
    /// `[web]`: the public WKD/VKS/HKP listener of `kst serve` (off unless `listen` is set).
    pub web: WebConfig,
    /// `[dkim]`: DKIM signing of replies (off unless a key file is set).
    pub dkim: DkimConfig,
    /// `[reminders]`: expiry reminders to key owners.
    pub reminders: RemindersConfig,
    /// `[transparency]`: the key directory (off unless a key file is set).
    pub transparency: TransparencyConfig,
}

/// `[kst]`: the protocol policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KstConfig {
    /// Domains whose `keys@` address kst serves. Required, at least one.
    pub domains: Vec<String>,
    /// Host names of the provider's MTAs (the `by` of their `Received:` headers).
    pub trusted_mta_hosts: Vec<String>,
    /// Where the authenticated login comes from: `received` or `sasl-argv`.
    pub auth_source: AuthSource,
    /// Treat `Alice@` and `alice@` as different mailboxes.
    pub case_sensitive_local_part: bool,
    /// Subaddress separator to fold in the served domains' addresses (`"+"`), empty for none.
    pub subaddress_separator: String,
    /// Accept logins and served addresses with non-ASCII local parts (never folded; characters
    /// that Unicode folding would merge with others are refused).
    pub unicode_local_parts: bool,
    /// SASL logins that are not addresses, mapped to the address they own.
    pub login_map: BTreeMap<String, String>,
    /// Answer only senders vouched for: an authenticated submission, or SPF/DKIM/DMARC pass for
    /// the sender's domain in the topmost `Authentication-Results:` header with `authserv_id`.
    pub require_authentication_results: bool,
    /// The authserv-id the provider's MTA writes in `Authentication-Results:` (RFC 8601).
    pub authserv_id: String,
}

/// `[limits]`: size and shape caps, and request rates (0 turns a rate off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message kst reads; larger mail is refused as not for kst.
    pub max_message_bytes: usize,
    /// Largest armored key block accepted.
    pub max_key_bytes: usize,
    /// Largest certificate published (binary bytes, after keeping only the newest
    /// self-signatures); a larger one is refused with `key-too-large`. Bounds the reply a
    /// small retrieval can cause.
    pub max_published_key_bytes: usize,
    /// Most top-level header fields a request may have.
    pub max_headers: usize,
    /// Most MIME parts a request may have.
    pub max_mime_parts: usize,
    /// Deepest multipart nesting a request may have.
    pub max_mime_depth: usize,
    /// Requests per window of one authenticated account (publications, revocations,
    /// deletions, its own retrievals).
    pub per_account: u32,
    /// Unauthenticated requests per window answered to one reply recipient.
    pub per_sender: u32,
    /// Unauthenticated retrievals per window answered to one reply recipient for one address.
    pub per_sender_query: u32,
    /// Unauthenticated requests per window from one source IP (IPv6: per /64) of the topmost
    /// trusted `Received:` header.
    pub per_source_ip: u32,
    /// Length of the rate-limit window in seconds.
    pub window_secs: u64,
    /// Removed (issue 13): strangers could use it up for a whole domain. Read only to say so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_sender_domain: Option<String>,
    /// Removed (issue 13): strangers could use it up for everyone asking about one address.
    /// Read only to say what replaces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_queried_address: Option<String>,
    /// Which variants of another provider's address count as one reply recipient
    /// (`[limits.recipient_folding]`: `dot_insensitive_domains`, `separators`).
    /// A table: kept last so that the TOML rendering puts it after the plain values.
    pub recipient_folding: RecipientFolding,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let r = RateLimits::default();
        LimitsConfig {
            max_message_bytes: Policy::DEFAULT_MAX_MESSAGE_BYTES,
            max_key_bytes: Policy::DEFAULT_MAX_KEY_BYTES,
            max_published_key_bytes: kst_core::validate::DEFAULT_MAX_PUBLISHED_BYTES,
            max_headers: Policy::DEFAULT_MAX_HEADERS,
            max_mime_parts: Policy::DEFAULT_MAX_MIME_PARTS,
            max_mime_depth: Policy::DEFAULT_MAX_MIME_DEPTH,
            per_account: r.per_account,
            per_sender: r.per_sender,
            per_sender_query: r.per_sender_query,
            per_source_ip: r.per_source_ip,
            window_secs: r.window_secs,
            recipient_folding: RecipientFolding::default(),
            per_sender_domain: None,
            per_queried_address: None,
        }
    }
}

/// Which [`kst_core::KeyStore`] backend holds the keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// A directory on this host (`kst-fs`).
    #[default]
    Fs,
    /// PostgreSQL (`kst-postgres`).
    Postgres,
    /// Redis (`kst-redis`).
    Redis,
}

impl StoreBackend {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreBackend::Fs => "fs",
            StoreBackend::Postgres => "postgres",
            StoreBackend::Redis => "redis",
        }
    }
}

/// `[store]`: the key store.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The backend.
    pub backend: StoreBackend,
    /// Directory of the `fs` backend.
    pub path: PathBuf,
    /// Connection URL of the `postgres` and `redis` backends. May hold a password.
    pub url: String,
    /// Key prefix of the `redis` backend, so that several services can share one Redis.
    pub prefix: String,
    /// Most connections one kst process opens to PostgreSQL.
    pub max_connections: u32,

    // --- PostgreSQL replication (issue 16) ---
    /// `postgres`: further hosts of the same database, one URL each, besides `url` (which may
    /// itself list hosts, libpq-style). kst writes to the one that accepts writes.
    pub urls: Vec<String>,
    /// `postgres`: read replicas for the look-ups by fingerprint, key ID and WKD hash (where a
    /// slightly stale answer is safe); every other read and every write goes to the primary.
    pub read_urls: Vec<String>,
    /// `postgres`: bound on one write on the primary, including the wait for a synchronous
    /// standby, in milliseconds (a write cut off is not confirmed and its connection closed).
    pub write_timeout_ms: u64,
    // --- Redis deployments and durability (kst-redis) ---
    /// `redis`: sentinels (`redis://host:port` each) that name the primary; kst follows the
    /// one they elect. `url`, if set, then gives only the data nodes' password and database.
    pub sentinels: Vec<String>,
    /// `redis`: the master name the sentinels monitor (with `sentinels`).
    pub sentinel_master: String,
    /// `redis`: nodes of a Redis Cluster (`redis://host:port` each, some of them), instead of
    /// `url`.
    pub cluster_nodes: Vec<String>,
    /// `redis`: refuse to serve when `CONFIG GET appendonly/appendfsync` cannot be read
    /// (default true). A server that answers and is not durable is refused either way.
    pub require_durable: bool,
    /// `redis`: replicas that must acknowledge a change (`WAIT`) before kst confirms it.
    pub min_replicas: u32,
    // --- end of the Redis block ---
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Fs,
            path: PathBuf::from("./data/keys"),
            url: String::new(),
            prefix: "kst".to_string(),
            max_connections: 8,
            urls: Vec::new(),
            read_urls: Vec::new(),
            write_timeout_ms: 5000,
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            cluster_nodes: Vec::new(),
            require_durable: true,
            min_replicas: 0,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &mask_url(&self.url))
            .field("prefix", &self.prefix)
            .field("max_connections", &self.max_connections)
            .field(
                "urls",
                &self.urls.iter().map(|u| mask_url(u)).collect::<Vec<_>>(),
            )
            .field(
                "read_urls",
                &self
                    .read_urls
                    .iter()
                    .map(|u| mask_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("write_timeout_ms", &self.write_timeout_ms)
            .field("sentinels", &mask_urls(&self.sentinels))
            .field("sentinel_master", &self.sentinel_master)
            .field("cluster_nodes", &mask_urls(&self.cluster_nodes))
            .field("require_durable", &self.require_durable)
            .field("min_replicas", &self.min_replicas)
            .finish()
    }
}

/// How replies leave kst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailerKind {
    /// One `.eml` file per reply in a directory, for another process to send.
    #[default]
    Spool,
    /// Submit to an SMTP relay.
    Smtp,
}

/// Transport security towards the SMTP relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Cleartext; only for a relay on the same host or a trusted network.
    None,
    /// Plain connection upgraded with STARTTLS; fails if the relay does not offer it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// A secret string: shown as [`MASK`] by `Debug` and [`Config::masked`]. It serializes to the
/// real value (so a configuration can be written back); print configurations with `masked`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(MASK)
        }
    }
}

/// `[mailer]`: the reply transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailerConfig {
    /// `spool` or `smtp`.
    pub kind: MailerKind,
    /// Spool directory (`spool`).
    pub path: PathBuf,
    /// Relay host name or IP address (`smtp`).
    pub host: String,
    /// Relay port (`smtp`).
    pub port: u16,
    /// Transport security (`smtp`).
    pub tls: SmtpTls,
    /// SMTP AUTH login; empty for no authentication.
    pub username: String,
    /// SMTP AUTH password.
    pub password: Secret,
    /// Envelope sender of replies; empty for the null sender `<>` (RFC 3834).
    pub envelope_from: String,
    /// Longest one reply submission may take, connection to final reply (`smtp`).
    pub timeout_secs: u64,
    /// Most idle relay sessions kept open for the next replies (`smtp`); 0 opens and closes a
    /// session per reply.
    pub pool_size: usize,
    /// Seconds an idle relay session may wait in the pool before it is dropped (`smtp`). Keep
    /// it below the relay's own idle timeout (Postfix `smtpd_timeout`, 300 s by default).
    pub pool_idle_secs: u64,
}

impl Default for MailerConfig {
    fn default() -> Self {
        MailerConfig {
            kind: MailerKind::Spool,
            path: PathBuf::from("./data/outbox"),
            host: "127.0.0.1".into(),
            port: 25,
            tls: SmtpTls::Starttls,
            username: String::new(),
            password: Secret::default(),
            envelope_from: String::new(),
            timeout_secs: 30,
            pool_size: 8,
            pool_idle_secs: 30,
        }
    }
}

impl MailerConfig {
    /// The envelope sender of replies: `None` for the null sender `<>`.
    pub fn envelope_from(&self) -> Result<Option<kst_core::Address>, ConfigError> {
        let s = self.envelope_from.trim();
        if s.is_empty() || s == "<>" {
            return Ok(None);
        }
        AddressPolicy::default()
            .normalize(s)
            .map(Some)
            .map_err(|e| ConfigError::key("mailer.envelope_from", format!("{s:?}: {e}")))
    }
}

/// A configuration that cannot be used, with the key at fault when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML.
    #[error("{path}: {message}")]
    File {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// One key has a value that cannot be used (or should not be there at all).
    #[error("{key}: {message}")]
    Key {
        /// The dotted key, e.g. `mailer.port`.
        key: String,
        /// What is wrong and, where it helps, what would be right.
        message: String,
    },
    /// Anything else the configuration sources reported.
    #[error("{0}")]
    Other(String),
}

impl ConfigError {
    /// The key at fault, for [`ConfigError::Key`].
    pub fn key_name(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            ConfigError::File { .. } | ConfigError::Other(_) => None,
        }
    }

    /// An error about `key`.
    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<ConfigError> for kst_core::Error {
    fn from(e: ConfigError) -> Self {
        kst_core::Error::Config(e.to_string())
    }
}

impl Config {
    /// Loads the configuration: defaults, then the TOML file at `path` (if any), then the
    /// `KST_<SECTION>__<KEY>` variables of this process's environment; then validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::load_with_env(path, env)
    }

    /// Like [`Config::load`] with the given variables instead of the process environment
    /// (for tests and embedding). Variables without the `KST_` prefix and a `__` are ignored.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        use config::{Environment, File, FileFormat};

        let mut builder = config::Config::builder();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: format!("cannot read the configuration file: {e}"),
            })?;
            // Parse once here for an error message that names the file and the line.
            if let Err(e) = text.parse::<toml::Table>() {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    message: format!("not valid TOML: {}", e.to_string().trim_end()),
                });
            }
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }

        let EnvSplit {
            lists,
            url_lists,
            scalars,
        } = split_env(env);
        let base = || {
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator(ENV_SEPARATOR)
        };
        // Scalars stay strings (no `try_parsing`), so a password like `0123` is kept verbatim;
        // numbers and booleans are converted when the key's type asks for them.
        builder = builder.add_source(base().source(Some(scalars)));
        let mut list_env = base()
            .list_separator(",")
            .try_parsing(true)
            .source(Some(lists));
        for key in ENV_LIST_KEYS {
            list_env = list_env.with_list_parse_key(key);
        }
        builder = builder.add_source(list_env);
        for (key, urls) in url_lists {
            builder = builder.set_override(key, urls).map_err(convert_error)?;
        }

        let merged = builder.build().map_err(convert_error)?;
        let mut cfg: Config = merged.try_deserialize().map_err(convert_error)?;
        cfg.tidy();
        cfg.apply_deprecated_keys()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Moves deprecated keys to their new place, with a warning on stderr (logging is not set
    /// up yet when the configuration loads).
    fn apply_deprecated_keys(&mut self) -> Result<(), ConfigError> {
        if self.limits.per_sender_domain.is_some() {
            return Err(ConfigError::key(
                "limits.per_sender_domain",
                "was removed: forged senders of one domain could use it up and silence the whole \
                 domain. Delete the line; unanswered requests are now capped per reply recipient \
                 (limits.per_sender), per reply recipient and queried address \
                 (limits.per_sender_query) and per source (limits.per_source_ip)",
            ));
        }
        if self.limits.per_queried_address.is_some() {
            return Err(ConfigError::key(
                "limits.per_queried_address",
                "was removed: strangers could use it up and silence the answers about one \
                 address for everyone. Rename it to limits.per_sender_query (retrievals per reply \
                 recipient and queried address, default 5)",
            ));
        }
        if let Some(size) = self.lmtp.max_message_size.take() {
            let limit = self.limits.max_message_bytes;
            if limit != Policy::DEFAULT_MAX_MESSAGE_BYTES && limit != size {
                return Err(ConfigError::key(
                    "lmtp.max_message_size",
                    format!(
                        "({size}) is a deprecated alias of limits.max_message_bytes, which is also \
                         set ({limit}); remove lmtp.max_message_size"
                    ),
                ));
            }
            eprintln!(
                "kst: warning: lmtp.max_message_size is deprecated; use limits.max_message_bytes \
                 (now {size}), which bounds mail from both `kst deliver` and LMTP"
            );
            self.limits.max_message_bytes = size;
        }
        Ok(())
    }

    /// Trims list entries and drops empty ones (`KST_KST__TRUSTED_MTA_HOSTS=` is an empty list).
    fn tidy(&mut self) {
        for list in [
            &mut self.kst.domains,
            &mut self.kst.trusted_mta_hosts,
            &mut self.lmtp.allow,
            &mut self.web.trusted_proxies,
            &mut self.limits.recipient_folding.dot_insensitive_domains,
        ] {
            *list = list
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
    }

    /// Checks everything that can be checked without touching the store or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let policy = self.policy()?;
        self.wks.validate(&policy)?;
        self.dkim.validate()?;
        self.lmtp.validate()?;
        self.reminders.validate()?;
        self.transparency.validate()?;
        self.web
            .validate()
            .map_err(|e| ConfigError::key(e.key, e.message))?;
        let l = &self.limits;
        for (domain, seps) in &l.recipient_folding.separators {
            if seps.is_empty() || !seps.chars().all(|c| c.is_ascii_punctuation() && c != '@') {
                return Err(ConfigError::key(
                    "limits.recipient_folding.separators",
                    format!(
                        "the separators of {domain:?} must be one or more ASCII punctuation \
                         characters other than '@' (e.g. \"-\"), not {seps:?}"
                    ),
                ));
            }
        }
        if l.max_message_bytes == 0 {
            return Err(ConfigError::key(
                "limits.max_message_bytes",
                "must be greater than 0",
            ));
        }
        if l.max_key_bytes == 0 {
            return Err(ConfigError::key(
                "limits.max_key_bytes",
                "must be greater than 0",
            ));
        }
        if l.max_published_key_bytes == 0 {
            return Err(ConfigError::key(
                "limits.max_published_key_bytes",
                "must be greater than 0",
            ));
        }
        for (key, v) in [
            ("limits.max_headers", l.max_headers),
            ("limits.max_mime_parts", l.max_mime_parts),
            ("limits.max_mime_depth", l.max_mime_depth),
        ] {
            if v == 0 {
                return Err(ConfigError::key(key, "must be greater than 0"));
            }
        }
        if l.window_secs == 0 {
            return Err(ConfigError::key(
                "limits.window_secs",
                "must be at least 1 (turn a rate off with 0 on its own key, e.g. limits.per_source_ip = 0)",
            ));
        }
        // Red team (counters and shares), as for [web.limits]: a window of u64::MAX seconds
        // made every PostgreSQL count fail (timestamp out of range) and the in-memory one panic.
        if l.window_secs > web::WebLimits::MAX_WINDOW_SECS {
            return Err(ConfigError::key(
                "limits.window_secs",
                format!(
                    "{} is longer than {} (366 days); write e.g. 3600 (an hour)",
                    l.window_secs,
                    web::WebLimits::MAX_WINDOW_SECS
                ),
            ));
        }
        if self.kst.require_authentication_results && self.kst.authserv_id.trim().is_empty() {
            return Err(ConfigError::key(
                "kst.authserv_id",
                "must name the authserv-id your MTA writes in Authentication-Results (e.g. \"mx.example.net\") when kst.require_authentication_results = true",
            ));
        }
        if l.max_key_bytes > l.max_message_bytes {
            return Err(ConfigError::key(
                "limits.max_key_bytes",
                format!(
                    "{} is larger than limits.max_message_bytes ({}); a key block must fit in a message",
                    l.max_key_bytes, l.max_message_bytes
                ),
            ));
        }
        match self.store.backend {
            StoreBackend::Fs if self.store.path.as_os_str().is_empty() => {
                return Err(ConfigError::key(
                    "store.path",
                    "must name the key directory when store.backend = \"fs\"",
                ));
            }
            StoreBackend::Redis
                if !self.store.sentinels.is_empty() && !self.store.cluster_nodes.is_empty() =>
            {
                return Err(ConfigError::key(
                    "store.cluster_nodes",
                    "cannot be set together with store.sentinels: a Redis Cluster fails over by itself",
                ));
            }
            StoreBackend::Redis
                if !self.store.sentinels.is_empty()
                    && self.store.sentinel_master.trim().is_empty() =>
            {
                return Err(ConfigError::key(
                    "store.sentinel_master",
                    "must name the master the sentinels monitor when store.sentinels is set",
                ));
            }
            StoreBackend::Redis
                if !self.store.sentinels.is_empty() || !self.store.cluster_nodes.is_empty() => {}
            StoreBackend::Postgres | StoreBackend::Redis if self.store.url.trim().is_empty() => {
                return Err(ConfigError::key(
                    "store.url",
                    format!(
                        "must be set when store.backend = \"{}\"",
                        self.store.backend.as_str()
                    ),
                ));
            }
            _ => {}
        }
        let m = &self.mailer;
        match m.kind {
            MailerKind::Spool if m.path.as_os_str().is_empty() => {
                return Err(ConfigError::key(
                    "mailer.path",
                    "must name the spool directory when mailer.kind = \"spool\"",
                ));
            }
            MailerKind::Smtp => {
                if m.host.trim().is_empty() {
                    return Err(ConfigError::key(
                        "mailer.host",
                        "must name the SMTP relay when mailer.kind = \"smtp\"",
                    ));
                }
                if m.port == 0 {
                    return Err(ConfigError::key("mailer.port", "must be 1-65535, not 0"));
                }
                if m.username.is_empty() != m.password.is_empty() {
                    return Err(ConfigError::key(
                        "mailer.username",
                        "mailer.username and mailer.password must be set together (or both empty for no SMTP AUTH)",
                    ));
                }
            }
            MailerKind::Spool => {}
        }
        if m.timeout_secs == 0 {
            return Err(ConfigError::key(
                "mailer.timeout_secs",
                "must be at least 1",
            ));
        }
        m.envelope_from()?;
        crate::shared::logging::parse_level(&self.log.level)
            .map_err(|e| ConfigError::key("log.level", e))?;
        Ok(())
    }

    /// The normalized protocol [`Policy`]: domains as A-labels, login map values as addresses.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let k = &self.kst;
        let mut sep = k.subaddress_separator.chars();
        let subaddress_separator = match (sep.next(), sep.next()) {
            (None, _) => None,
            (Some(c), None) if !c.is_alphanumeric() && !c.is_whitespace() && c != '@' => Some(c),
            _ => {
                return Err(ConfigError::key(
                    "kst.subaddress_separator",
                    format!(
                        "{:?} is not one punctuation character; use e.g. \"+\" or \"-\", or \"\" for none",
                        k.subaddress_separator
                    ),
                ));
            }
        };
        let address_policy = AddressPolicy {
            case_sensitive_local_part: k.case_sensitive_local_part,
            subaddress_separator,
            unicode_local_parts: k.unicode_local_parts,
        };

        if k.domains.is_empty() {
            return Err(ConfigError::key(
                "kst.domains",
                "must list at least one domain, e.g. domains = [\"example.net\"] (or KST_KST__DOMAINS=example.net)",
            ));
        }
        let mut domains = Vec::with_capacity(k.domains.len());
        for d in &k.domains {
            let n = address_policy.normalize_domain(d).map_err(|e| {
                ConfigError::key("kst.domains", format!("{d:?} is not usable: {e}"))
            })?;
            if !domains.contains(&n) {
                domains.push(n);
            }
        }

        let mut hosts = Vec::with_capacity(k.trusted_mta_hosts.len());
        for h in &k.trusted_mta_hosts {
            let n = h.trim().trim_end_matches('.').to_ascii_lowercase();
            if !is_host_name(&n) {
                return Err(ConfigError::key(
                    "kst.trusted_mta_hosts",
                    format!(
                        "{h:?} is not a host name (as in the `by` clause of a Received: header)"
                    ),
                ));
            }
            if !hosts.contains(&n) {
                hosts.push(n);
            }
        }

        let mut login_map = BTreeMap::new();
        for (login, address) in &k.login_map {
            let key = format!("kst.login_map.{login}");
            let login = login.trim();
            if login.is_empty() {
                return Err(ConfigError::key(key, "the login is empty"));
            }
            let a = address_policy.normalize(address).map_err(|e| {
                ConfigError::key(&key, format!("{address:?} is not an address: {e}"))
            })?;
            if !domains.iter().any(|d| d == a.domain()) {
                return Err(ConfigError::key(
                    key,
                    format!("{a} is not in a served domain (kst.domains)"),
                ));
            }
            login_map.insert(login.to_string(), a);
        }

        let mut policy = Policy::new(&[], &[]);
        policy.domains = domains;
        policy.trusted_mta_hosts = hosts;
        policy.auth_source = k.auth_source;
        policy.login_map = login_map;
        policy.address_policy = address_policy;
        policy.max_message_bytes = self.limits.max_message_bytes;
        policy.max_key_bytes = self.limits.max_key_bytes;
        policy.max_published_key_bytes = self.limits.max_published_key_bytes;
        let l = &self.limits;
        policy.max_headers = l.max_headers;
        policy.max_mime_parts = l.max_mime_parts;
        policy.max_mime_depth = l.max_mime_depth;
        policy.rate_limits = RateLimits {
            per_account: l.per_account,
            per_sender: l.per_sender,
            per_sender_query: l.per_sender_query,
            per_source_ip: l.per_source_ip,
            window_secs: l.window_secs,
        };
        policy.recipient_folding = l.recipient_folding.clone();
        policy.require_authentication_results = k.require_authentication_results;
        policy.authserv_id = k.authserv_id.trim().to_string();
        Ok(policy)
    }

    /// Whether `[web.counters]` names a server of the Redis key store itself (the same server
    /// in `url`, a sentinel in common with the same master, or a cluster node in common): the
    /// counters then share the key store's event loop and log syncs, which a Redis of their own
    /// is meant to avoid (red team, counters and shares: accepted silently). Servers are
    /// compared by address: each host is resolved with the system resolver ([`system_resolve`],
    /// which blocks: call it off the async workers), so that a host name and its address, or
    /// two names of one host, are one server; see [`Self::web_counters_on_the_key_store_with`].
    pub fn web_counters_on_the_key_store(&self) -> bool {
        self.web_counters_on_the_key_store_with(&system_resolve)
    }

    /// [`Self::web_counters_on_the_key_store`] with `resolve` giving the addresses of a host
    /// name (nothing when it cannot: the name is then compared as written). Two servers are
    /// one when their ports are equal (6379 when a URL gives none) and their hosts are the
    /// same name (case aside) or have an address in common; every loopback address
    /// (`127.0.0.0/8`, `::1`, their IPv4-mapped forms), the unspecified addresses (`0.0.0.0`,
    /// `::`, which reach this host) and `localhost` (`*.localhost`) are one host; two
    /// `redis+unix://` URLs of one socket path are one server. A URL's host is
    /// only compared for one server on both sides (with `sentinels` or `cluster_nodes`, the
    /// URL's host is not used).
    pub fn web_counters_on_the_key_store_with(
        &self,
        resolve: &dyn Fn(&str, u16) -> Vec<std::net::IpAddr>,
    ) -> bool {
        let c = &self.web.counters;
        let s = &self.store;
        if !c.own() || s.backend != StoreBackend::Redis {
            return false;
        }
        let servers = |urls: &[String]| -> Vec<Endpoints> {
            urls.iter()
                .filter_map(|u| server_of(u))
                .map(|(host, port)| Endpoints::of(host, port, resolve))
                .collect()
        };
        let common = |a: &[String], b: &[String]| {
            let b = servers(b);
            servers(a).iter().any(|x| b.iter().any(|y| x.meets(y)))
        };
        let single =
            |sentinels: &[String], nodes: &[String]| sentinels.is_empty() && nodes.is_empty();
        let same_socket = socket_of(&c.url).is_some() && socket_of(&c.url) == socket_of(&s.url);
        let same_url = single(&c.sentinels, &c.cluster_nodes)
            && single(&s.sentinels, &s.cluster_nodes)
            && (same_socket || common(std::slice::from_ref(&c.url), std::slice::from_ref(&s.url)));
        same_url
            || (c.sentinel_master.trim() == s.sentinel_master.trim()
                && common(&c.sentinels, &s.sentinels))
            || common(&c.cluster_nodes, &s.cluster_nodes)
    }

    /// The effective configuration as TOML, with secrets (`mailer.password`, a password in
    /// any store or counters URL) replaced by [`MASK`].
    pub fn masked(&self) -> String {
        let mut c = self.clone();
        if !c.mailer.password.is_empty() {
            c.mailer.password = Secret::new(MASK);
        }
        c.store.url = mask_url(&c.store.url);
        // PostgreSQL replication (issue 16): every host URL may hold a password.
        c.store.urls = c.store.urls.iter().map(|u| mask_url(u)).collect();
        c.store.read_urls = c.store.read_urls.iter().map(|u| mask_url(u)).collect();
        c.web.counters.url = mask_url(&c.web.counters.url);
        // The effective wait, not nothing: unset, it depends on the store.
        c.transparency.gather_us = Some(
            u64::try_from(c.transparency.gather_for(c.store.backend).as_micros())
                .unwrap_or(u64::MAX),
        );
        // A Redis Cluster's password is in its node URLs; a Sentinel may have one too.
        for urls in [
            &mut c.store.sentinels,
            &mut c.store.cluster_nodes,
            &mut c.web.counters.sentinels,
            &mut c.web.counters.cluster_nodes,
        ] {
            *urls = mask_urls(urls);
        }
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

/// The `KST_*__*` configuration variables of an environment, by how their values are read.
#[derive(Debug, Default)]
struct EnvSplit {
    /// Comma-separated lists ([`ENV_LIST_KEYS`]), by variable name.
    lists: config::Map<String, String>,
    /// Whitespace-separated URL lists ([`ENV_URL_LIST_KEYS`]), split already, by dotted key.
    url_lists: BTreeMap<String, Vec<String>>,
    /// Everything else, by variable name.
    scalars: config::Map<String, String>,
}

/// Splits `KST_*__*` variables into comma lists, URL lists and scalars; drops everything else.
fn split_env(env: impl IntoIterator<Item = (String, String)>) -> EnvSplit {
    let prefix = format!("{ENV_PREFIX}_");
    let mut out = EnvSplit::default();
    for (k, v) in env {
        let Some(rest) = k.strip_prefix(&prefix) else {
            continue;
        };
        if !rest.contains(ENV_SEPARATOR) {
            continue;
        }
        let dotted = rest.to_lowercase().replace(ENV_SEPARATOR, ".");
        if ENV_LIST_KEYS.contains(&dotted.as_str()) {
            out.lists.insert(k, v);
        } else if ENV_URL_LIST_KEYS.contains(&dotted.as_str()) {
            let urls = v.split_whitespace().map(str::to_string).collect();
            out.url_lists.insert(dotted, urls);
        } else {
            out.scalars.insert(k, v);
        }
    }
    out
}

/// LDH labels separated by dots, lowercase; a single label is allowed.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The host (lower case, IPv6 without its brackets) and port (6379 when none is written) of
/// a Redis URL, `None` when it names no host (a Unix socket, a URL without `://`) or its port
/// is not a number.
fn server_of(url: &str) -> Option<(String, u16)> {
    let rest = url.trim().split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = host_port.to_ascii_lowercase();
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port.as_str(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None | Some("") => DEFAULT_REDIS_PORT,
        Some(p) => p.parse().ok()?,
    };
    Some((host.to_string(), port))
}

/// The Unix socket of a `redis+unix://` or `unix://` URL (its path, with the symbolic links
/// and `..` resolved when it exists), `None` for any other URL: two URLs with one socket name
/// one server whatever their database (red team: the same socket was not recognized).
fn socket_of(url: &str) -> Option<std::path::PathBuf> {
    let (scheme, rest) = url.trim().split_once("://")?;
    if !scheme.eq_ignore_ascii_case("redis+unix") && !scheme.eq_ignore_ascii_case("unix") {
        return None;
    }
    let path = rest.split(['?', '#']).next().filter(|p| !p.is_empty())?;
    let path = std::path::Path::new(path);
    Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// The port of a Redis URL that gives none.
const DEFAULT_REDIS_PORT: u16 = 6379;

/// The addresses of `host` (with `port`, which the system resolver takes along) by the system
/// resolver (`getaddrinfo`, which blocks); nothing when it cannot be resolved.
pub fn system_resolve(host: &str, port: u16) -> Vec<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default()
}

/// One server of a Redis URL, for comparing: its port, its host as written, and the
/// addresses it has (loopback and unspecified ones as one, [`Endpoints::LOCAL`]).
#[derive(Debug)]
struct Endpoints {
    port: u16,
    host: String,
    addrs: Vec<std::net::IpAddr>,
}

impl Endpoints {
    /// What stands for every address of this host (loopback, unspecified).
    const LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn of(
        host: String,
        port: u16,
        resolve: &dyn Fn(&str, u16) -> Vec<std::net::IpAddr>,
    ) -> Endpoints {
        let local = |ip: std::net::IpAddr| {
            let ip = ip.to_canonical();
            if ip.is_loopback() || ip.is_unspecified() {
                Endpoints::LOCAL
            } else {
                ip
            }
        };
        let addrs = if host == "localhost" || host.ends_with(".localhost") {
            vec![Endpoints::LOCAL]
        } else if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            vec![local(ip)]
        } else {
            resolve(&host, port).into_iter().map(local).collect()
        };
        Endpoints { port, host, addrs }
    }

    /// Whether `self` and `other` are one server.
    fn meets(&self, other: &Endpoints) -> bool {
        self.port == other.port
            && (self.host == other.host || self.addrs.iter().any(|a| other.addrs.contains(a)))
    }
}

/// [`mask_url`] of each of `urls`.
pub fn mask_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| mask_url(u)).collect()
}

/// `scheme://user:secret@host/...?password=secret` with the secrets replaced by [`MASK`].
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let auth_start = scheme_end + 3;
    let rest = &url[auth_start..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let mut out = url[..auth_start].to_string();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) if colon + 1 < userinfo.len() => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                _ => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[auth_end..];
    match tail.find('?') {
        Some(q) => {
            out.push_str(&tail[..=q]);
            let (query, frag) = match tail[q + 1..].find('#') {
                Some(h) => tail[q + 1..].split_at(h),
                None => (&tail[q + 1..], ""),
            };
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, v))
                        if !v.is_empty()
                            && ["password", "pass", "passwd", "secret"]
                                .contains(&k.to_ascii_lowercase().as_str()) =>
                    {
                        format!("{k}={MASK}")
                    }
                    _ => p.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
            out.push_str(frag);
        }
        None => out.push_str(tail),
    }
    out
}

/// Turns the `config` crate's errors into ones that name the key first.
fn convert_error(e: config::ConfigError) -> ConfigError {
    use config::ConfigError as C;
    match e {
        C::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            let message = format!(
                "invalid value {}, expected {}",
                plain_value(&unexpected.to_string()),
                friendly_expected(expected)
            );
            match key {
                Some(key) => ConfigError::key(key, message),
                None => ConfigError::Other(message),
            }
        }
        C::At { error, key, .. } => {
            let inner = match *error {
                C::Message(m) => m,
                other => other.to_string(),
            };
            keyed_message(key.as_deref(), &inner)
        }
        C::Message(m) => keyed_message(None, &m),
        C::NotFound(key) => ConfigError::key(key, "is required"),
        C::FileParse { uri, cause } => ConfigError::File {
            path: PathBuf::from(uri.unwrap_or_else(|| "configuration".into())),
            message: format!("not valid TOML: {cause}"),
        },
        other => ConfigError::Other(other.to_string()),
    }
}

/// `string "x"` becomes `"x"`, ``64-bit integer `7` `` becomes `7`.
fn plain_value(s: &str) -> String {
    if let Some(q) = s.strip_prefix("string ") {
        return q.to_string();
    }
    match s.split_once('`') {
        Some((_, rest)) => rest.trim_end_matches('`').to_string(),
        None => s.to_string(),
    }
}

/// `an unsigned 16 bit integer` becomes `an integer from 0 to 65535`.
fn friendly_expected(expected: &str) -> String {
    let max = match expected {
        "an unsigned 8 bit integer" => u64::from(u8::MAX),
        "an unsigned 16 bit integer" => u64::from(u16::MAX),
        "an unsigned 32 bit integer" => u64::from(u32::MAX),
        _ => return expected.to_string(),
    };
    format!("an integer from 0 to {max}")
}

/// The values of the keys whose type is an enum, for error messages.
const CHOICES: [(&str, &str); 5] = [
    ("kst.auth_source", "\"received\" or \"sasl-argv\""),
    ("store.backend", "\"fs\", \"postgres\" or \"redis\""),
    ("mailer.kind", "\"spool\" or \"smtp\""),
    ("mailer.tls", "\"none\", \"starttls\" or \"implicit\""),
    ("log.format", "\"text\" or \"json\""),
];

/// `enum X does not have variant constructor y` (the `config` crate's words) at `key`
/// becomes `invalid value "y", expected ...`.
fn bad_variant_message(key: Option<&str>, message: &str) -> Option<String> {
    let (_, value) = message.split_once(" does not have variant constructor ")?;
    let choices = CHOICES.iter().find(|(k, _)| Some(*k) == key).map_or(
        "one of the documented values (see deploy/kst.toml)",
        |(_, c)| c,
    );
    Some(format!("invalid value {value:?}, expected {choices}"))
}

/// A serde message at `key`, with unknown fields turned into the full key they name.
fn keyed_message(key: Option<&str>, message: &str) -> ConfigError {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let full = match key {
            Some(k) if !k.is_empty() => format!("{k}.{field}"),
            _ => field.to_string(),
        };
        let known = expected
            .trim_start_matches(',')
            .trim()
            .strip_prefix("expected ")
            .map(|s| s.strip_prefix("one of ").unwrap_or(s))
            .unwrap_or("");
        let msg = if known.is_empty() {
            "unknown key".to_string()
        } else {
            format!("unknown key (known keys here: {known})")
        };
        return ConfigError::key(full, msg);
    }
    if let Some(m) = bad_variant_message(key, message) {
        return match key {
            Some(k) => ConfigError::key(k, m),
            None => ConfigError::Other(m),
        };
    }
    let message = message
        .strip_prefix("unknown variant ")
        .map(|rest| format!("invalid value {rest}"))
        .unwrap_or_else(|| message.to_string());
    match key {
        Some(k) if !k.is_empty() => ConfigError::key(k, message),
        _ => ConfigError::Other(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_url_hides_passwords_only() {
        assert_eq!(
            mask_url("postgres://kst:s3cret@db.example.net:5432/kst?sslmode=require"),
            "postgres://kst:********@db.example.net:5432/kst?sslmode=require"
        );
        assert_eq!(
            mask_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:********@127.0.0.1:6379/0"
        );
        assert_eq!(
            mask_url("postgres://db/kst?user=kst&password=pw#x"),
            "postgres://db/kst?user=kst&password=********#x"
        );
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(mask_url("postgres://kst@db/kst"), "postgres://kst@db/kst");
        assert_eq!(mask_url(""), "");
    }

    #[test]
    fn secret_debug_is_masked() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), MASK);
        let cfg = StoreConfig {
            url: "redis://:hunter2@h".into(),
            ..StoreConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn choices_list_every_variant() {
        fn name<T: Serialize>(v: T) -> String {
            toml::Value::try_from(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        }
        let table = |k: &str| CHOICES.iter().find(|(key, _)| *key == k).unwrap().1;
        let all = [
            (
                "kst.auth_source",
                vec![name(AuthSource::Received), name(AuthSource::SaslArgv)],
            ),
            (
                "store.backend",
                vec![
                    name(StoreBackend::Fs),
                    name(StoreBackend::Postgres),
                    name(StoreBackend::Redis),
                ],
            ),
            (
                "mailer.kind",
                vec![name(MailerKind::Spool), name(MailerKind::Smtp)],
            ),
            (
                "mailer.tls",
                vec![
                    name(SmtpTls::None),
                    name(SmtpTls::Starttls),
                    name(SmtpTls::Implicit),
                ],
            ),
            (
                "log.format",
                vec![name(LogFormat::Text), name(LogFormat::Json)],
            ),
        ];
        for (key, names) in all {
            for n in names {
                assert!(table(key).contains(&format!("\"{n}\"")), "{key}: {n}");
            }
        }
    }

    #[test]
    fn redis_deployments_are_url_sentinels_or_cluster_nodes() {
        let mut c = Config::default();
        c.kst.domains = vec!["example.net".into()];
        c.store.backend = StoreBackend::Redis;
        let err = |c: &Config| {
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&c).contains("store.url"), "{}", err(&c));
        c.store.cluster_nodes = vec!["redis://127.0.0.1:7000".into()];
        assert_eq!(err(&c), "");
        c.store.sentinels = vec!["redis://127.0.0.1:26379".into()];
        assert!(err(&c).contains("store.cluster_nodes"), "{}", err(&c));
        c.store.cluster_nodes.clear();
        assert!(err(&c).contains("store.sentinel_master"), "{}", err(&c));
        c.store.sentinel_master = "kst".into();
        assert_eq!(err(&c), "");
        assert!(c.store.require_durable && c.store.min_replicas == 0);
    }

    #[test]
    fn host_names() {
        assert!(is_host_name("mail.example.net"));
        assert!(is_host_name("mx1"));
        for bad in [
            "",
            "mail..example.net",
            "-mx.example.net",
            "mail example",
            "MX.example.net",
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn web_counters_from_the_environment_and_masked() {
        let env = |more: &[(&str, &str)]| {
            let mut v = vec![("KST_KST__DOMAINS".to_string(), "example.net".to_string())];
            v.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::load_with_env(None, v)
        };
        let c = env(&[
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__URL", "redis://:hunter2@127.0.0.1:6380"),
            ("KST_WEB__COUNTERS__PREFIX", "pool-a:"),
        ])
        .unwrap();
        assert_eq!(c.web.counters.backend, CountersBackend::Redis);
        assert_eq!(c.web.counters.prefix(), "pool-a:");
        assert!(!c.masked().contains("hunter2"), "{}", c.masked());
        let c = env(&[
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            (
                "KST_WEB__COUNTERS__SENTINELS",
                "redis://10.0.0.1:26379 redis://10.0.0.2:26379",
            ),
            ("KST_WEB__COUNTERS__SENTINEL_MASTER", "counters"),
        ])
        .unwrap();
        assert_eq!(c.web.counters.sentinels.len(), 2);
        let c = env(&[
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__URL", "redis://127.0.0.1:6380"),
            ("KST_WEB__COUNTERS__CONNECT_TIMEOUT_MS", "250"),
            ("KST_WEB__COUNTERS__RESPONSE_TIMEOUT_MS", "400"),
        ])
        .unwrap();
        assert_eq!(
            c.web.counters.connect_timeout(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(
            c.web.counters.response_timeout(),
            std::time::Duration::from_millis(400)
        );
        assert_eq!(
            c.web.counters.call_timeout(),
            std::time::Duration::from_millis(650)
        );
        for (var, value) in [
            ("KST_WEB__COUNTERS__CONNECT_TIMEOUT_MS", "0"),
            ("KST_WEB__COUNTERS__RESPONSE_TIMEOUT_MS", "60001"),
            (
                "KST_WEB__COUNTERS__RESPONSE_TIMEOUT_MS",
                "18446744073709551615",
            ),
        ] {
            let e = env(&[(var, value)]).unwrap_err();
            let key = var
                .trim_start_matches("KST_")
                .replace("__", ".")
                .to_lowercase();
            assert!(e.to_string().contains(&key), "{var}={value}: {e}");
        }
        let e = env(&[("KST_WEB__COUNTERS__BACKEND", "redis")]).unwrap_err();
        assert!(e.to_string().contains("web.counters.url"), "{e}");
        assert!(
            !env(&[]).unwrap().web.counters.own(),
            "the key store by default"
        );
    }

    /// Red team (counters and shares): `limits.window_secs` has the bound of
    /// `web.limits.window_secs` (366 days).
    #[test]
    fn the_mail_sides_window_is_bounded_too() {
        let env = |window: &str| {
            Config::load_with_env(
                None,
                vec![
                    ("KST_KST__DOMAINS".to_string(), "example.net".to_string()),
                    ("KST_LIMITS__WINDOW_SECS".to_string(), window.to_string()),
                ],
            )
        };
        env(&web::WebLimits::MAX_WINDOW_SECS.to_string()).unwrap();
        for long in [web::WebLimits::MAX_WINDOW_SECS + 1, u64::MAX] {
            let e = env(&long.to_string()).unwrap_err();
            assert!(e.to_string().contains("limits.window_secs"), "{e}");
        }
    }

    /// Red team (counters and shares): `[web.counters]` on the key store's own Redis was
    /// accepted silently (nothing collides, but nothing is gained); `kst config check` warns.
    #[test]
    fn web_counters_on_the_key_stores_redis_are_recognized() {
        let env = |more: &[(&str, &str)]| {
            let mut v = vec![
                ("KST_KST__DOMAINS".to_string(), "example.net".to_string()),
                ("KST_STORE__BACKEND".to_string(), "redis".to_string()),
                (
                    "KST_WEB__COUNTERS__BACKEND".to_string(),
                    "redis".to_string(),
                ),
            ];
            v.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::load_with_env(None, v).unwrap()
        };
        // A resolver that knows two names of 10.0.0.1 and one of 10.0.0.2 (what DNS or
        // /etc/hosts would say); every other name is unknown.
        let resolve = |host: &str, _port: u16| -> Vec<std::net::IpAddr> {
            match host {
                "redis.internal" | "kst-redis.internal" => vec!["10.0.0.1".parse().unwrap()],
                "counters.internal" => vec!["10.0.0.2".parse().unwrap()],
                "v6.internal" => vec!["::ffff:10.0.0.1".parse().unwrap()],
                _ => Vec::new(),
            }
        };
        for (store, counters, same) in [
            (
                "redis://:pw@Redis.internal:6379/0",
                "redis://redis.internal/1",
                true,
            ),
            ("redis://10.0.0.1:6379", "redis://:x@10.0.0.1:6379", true),
            ("redis://10.0.0.1:6379", "redis://10.0.0.1:6380", false),
            ("redis://[::1]:6379", "redis://[::1]", true),
            ("redis://[::1]:6380", "redis://[::1]", false),
            // Aliases: a name and its address, two names of one address, a mapped address.
            ("redis://redis.internal", "redis://10.0.0.1:6379", true),
            (
                "redis://redis.internal",
                "redis://kst-redis.internal:6379/2",
                true,
            ),
            ("redis://redis.internal", "redis://v6.internal", true),
            ("redis://[::ffff:10.0.0.1]:6379", "redis://10.0.0.1", true),
            ("redis://redis.internal", "redis://counters.internal", false),
            (
                "redis://redis.internal",
                "redis://kst-redis.internal:6380",
                false,
            ),
            ("redis://unknown.internal", "redis://10.0.0.1", false),
            // Loopback: every spelling of this host is one.
            ("redis://localhost", "redis://127.0.0.1:6379", true),
            ("redis://127.0.0.1:6379", "redis://[::1]:6379/3", true),
            (
                "rediss://LOCALHOST:6379",
                "redis://[::ffff:127.0.0.1]",
                true,
            ),
            ("redis://0.0.0.0", "redis://localhost", true),
            ("redis://kst.localhost:6379", "redis://127.0.0.1", true),
            ("redis://localhost", "redis://127.0.0.1:6380", false),
            ("redis://localhost", "redis://10.0.0.1", false),
            // One Unix socket, whatever the database; another socket.
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis.sock?db=2",
                true,
            ),
            (
                "unix:///run/redis.sock",
                "redis+unix:///run/redis.sock",
                true,
            ),
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis-counters.sock",
                false,
            ),
            ("redis+unix:///run/redis.sock", "redis://localhost", false),
            // No port that is a number: nothing to compare.
            ("redis://localhost:http", "redis://localhost:http", false),
        ] {
            let c = env(&[
                ("KST_STORE__URL", store),
                ("KST_WEB__COUNTERS__URL", counters),
            ]);
            assert_eq!(
                c.web_counters_on_the_key_store_with(&resolve),
                same,
                "{store} {counters}"
            );
        }
        let c = env(&[
            (
                "KST_STORE__CLUSTER_NODES",
                "redis://10.0.0.1:7000 redis://10.0.0.2:7000",
            ),
            ("KST_WEB__COUNTERS__CLUSTER_NODES", "redis://10.0.0.2:7000"),
        ]);
        assert!(c.web_counters_on_the_key_store_with(&resolve));
        let c = env(&[
            (
                "KST_STORE__CLUSTER_NODES",
                "redis://redis.internal:7000 redis://localhost:7001",
            ),
            (
                "KST_WEB__COUNTERS__CLUSTER_NODES",
                "redis://10.0.0.3:7000 redis://[::1]:7001",
            ),
        ]);
        assert!(
            c.web_counters_on_the_key_store_with(&resolve),
            "a node in common, spelt otherwise"
        );
        let c = env(&[
            ("KST_STORE__CLUSTER_NODES", "redis://redis.internal:7000"),
            (
                "KST_WEB__COUNTERS__CLUSTER_NODES",
                "redis://counters.internal:7000",
            ),
        ]);
        assert!(!c.web_counters_on_the_key_store_with(&resolve));
        let sentinels = |master: &str, theirs: &str| {
            env(&[
                ("KST_STORE__SENTINELS", "redis://10.0.0.1:26379"),
                ("KST_STORE__SENTINEL_MASTER", "kst"),
                ("KST_WEB__COUNTERS__SENTINELS", theirs),
                ("KST_WEB__COUNTERS__SENTINEL_MASTER", master),
            ])
        };
        assert!(
            sentinels("kst", "redis://10.0.0.1:26379").web_counters_on_the_key_store_with(&resolve)
        );
        assert!(
            sentinels("kst", "redis://10.0.0.9:26379 redis://redis.internal:26379")
                .web_counters_on_the_key_store_with(&resolve)
        );
        assert!(
            !sentinels("kst-counters", "redis://10.0.0.1:26379")
                .web_counters_on_the_key_store_with(&resolve),
            "other servers watched by the same sentinels"
        );
        // With sentinels, a URL gives only the data nodes' password and database: its host is
        // not a server.
        let c = env(&[
            ("KST_STORE__URL", "redis://:pw@localhost"),
            ("KST_STORE__SENTINELS", "redis://10.0.0.1:26379"),
            ("KST_STORE__SENTINEL_MASTER", "kst"),
            ("KST_WEB__COUNTERS__URL", "redis://127.0.0.1"),
        ]);
        assert!(!c.web_counters_on_the_key_store_with(&resolve));
    }

    /// Red team (counters and shares): a password-protected Redis Cluster takes its password
    /// from the node URLs (`redis://:pw@host:port`), and a Sentinel may have one too; `kst
    /// config check` printed `cluster_nodes` and `sentinels` (of the store and of
    /// `[web.counters]`) as written, passwords included, and so did their `Debug`.
    #[test]
    fn passwords_in_cluster_and_sentinel_urls_are_masked() {
        let env = |more: &[(&str, &str)]| {
            let mut v = vec![("KST_KST__DOMAINS".to_string(), "example.net".to_string())];
            v.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            Config::load_with_env(None, v).unwrap()
        };
        let nodes = "redis://:hunter2@10.0.0.1:7000 redis://:hunter2@10.0.0.2:7000";
        let sentinels = "redis://:hunter2@10.0.0.1:26379 redis://:hunter2@10.0.0.2:26379";
        for c in [
            env(&[
                ("KST_STORE__BACKEND", "redis"),
                ("KST_STORE__CLUSTER_NODES", nodes),
                ("KST_WEB__COUNTERS__BACKEND", "redis"),
                ("KST_WEB__COUNTERS__CLUSTER_NODES", nodes),
            ]),
            env(&[
                ("KST_STORE__BACKEND", "redis"),
                ("KST_STORE__SENTINELS", sentinels),
                ("KST_STORE__SENTINEL_MASTER", "kst"),
                ("KST_WEB__COUNTERS__BACKEND", "redis"),
                ("KST_WEB__COUNTERS__SENTINELS", sentinels),
                ("KST_WEB__COUNTERS__SENTINEL_MASTER", "counters"),
            ]),
        ] {
            let shown = c.masked();
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("10.0.0.2"), "the hosts stay: {shown}");
            for debug in [format!("{:?}", c.store), format!("{:?}", c.web.counters)] {
                assert!(!debug.contains("hunter2"), "{debug}");
            }
            assert!(
                c.store
                    .cluster_nodes
                    .iter()
                    .chain(&c.store.sentinels)
                    .all(|u| u.contains("hunter2")),
                "the configuration itself keeps them"
            );
        }
    }

    #[test]
    fn env_without_double_underscore_is_not_configuration() {
        let split = split_env([
            ("KST_CONFIG".to_string(), "/etc/kst.toml".to_string()),
            ("KST_TEST_POSTGRES_URL".into(), "postgres://x".into()),
            ("PATH".into(), "/bin".into()),
            ("KST_MAILER__PORT".into(), "2525".into()),
            ("KST_KST__DOMAINS".into(), "a.net,b.net".into()),
            (
                "KST_STORE__URLS".into(),
                " postgres://a,b/k\tpostgres://c/k ".into(),
            ),
        ]);
        assert_eq!(
            split.scalars.keys().collect::<Vec<_>>(),
            ["KST_MAILER__PORT"]
        );
        assert_eq!(split.lists.keys().collect::<Vec<_>>(), ["KST_KST__DOMAINS"]);
        assert_eq!(
            split.url_lists["store.urls"],
            ["postgres://a,b/k", "postgres://c/k"]
        );
    }
}
