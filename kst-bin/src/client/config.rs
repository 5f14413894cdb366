//! The client's settings: `client.toml`, overridden by command-line flags.
//!
//! ```toml
//! account = "alice@example.net"
//! submission = "mail.example.net:587"        # HOST:PORT = STARTTLS; smtps://HOST:PORT = implicit TLS
//! # sendmail = "/usr/sbin/sendmail"        # hand requests to a local MTA instead
//! imap = "imaps://mail.example.net:993"      # HOST:PORT = STARTTLS; imaps://HOST:PORT = implicit TLS
//! # maildir = "/home/alice/Maildir"          # read replies from a Maildir instead of IMAP
//! user = "alice@example.net"                 # login; default: the account
//! password_command = "pass show mail/alice"  # or the KST_PASSWORD environment variable
//! ca_file = "/etc/ssl/private-ca.pem"        # trust a private CA as well
//! resolver = "127.0.0.1:53"                  # DNS server; or "tls://IP:853#NAME" (DNS over TLS)
//! # dns_anchor = "/etc/kst/root.key"         # DNSSEC trust anchor (DNSKEY); default: IANA root
//! # require_dnssec = true                    # refuse answers from unsigned zones
//! # allow_plaintext = true                   # --direct: allow an MX without STARTTLS
//! # mta_sts_cache = "/home/alice/.cache/kst/mta-sts"
//! timeout_secs = 120
//! state_file = "/home/alice/.local/state/kst/pending.json"
//! require_dkim = true                        # replies must carry kst's DKIM signature
//! # dkim_selector = "kst"                    # kst's selector (and kst-*), the default
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default seconds to wait for a reply.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// The environment variable holding the account's password.
pub const PASSWORD_ENV: &str = "KST_PASSWORD";

/// `client.toml` as written by the user. Every key is optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The user's own address.
    pub account: Option<String>,
    /// Submission server (`HOST:PORT` or `smtps://HOST:PORT`).
    pub submission: Option<String>,
    /// Sendmail-compatible command to hand requests to instead of SMTP submission.
    pub sendmail: Option<String>,
    /// IMAP server (`HOST:PORT` or `imaps://HOST:PORT`).
    pub imap: Option<String>,
    /// Maildir to read replies from instead of IMAP.
    pub maildir: Option<PathBuf>,
    /// Login for submission and IMAP (default: the account).
    pub user: Option<String>,
    /// Environment variable holding the password (default `KST_PASSWORD`).
    pub password_env: Option<String>,
    /// Shell command whose first output line is the password.
    pub password_command: Option<String>,
    /// PEM file with extra CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// DNS server `IP:PORT`, or `tls://IP:853#NAME` for DNS over TLS.
    pub resolver: Option<String>,
    /// DNSSEC trust anchor file (root DNSKEY records); default: the IANA root's keys.
    pub dns_anchor: Option<PathBuf>,
    /// Refuse DNS answers from unsigned zones.
    pub require_dnssec: Option<bool>,
    /// Do not validate DNS answers (a test resolver serving unsigned zones only).
    pub no_dnssec: Option<bool>,
    /// `--direct`: allow an MX that offers no STARTTLS.
    pub allow_plaintext: Option<bool>,
    /// Where MTA-STS policies are cached (default `~/.cache/kst/mta-sts`).
    pub mta_sts_cache: Option<PathBuf>,
    /// Seconds to wait for a reply.
    pub timeout_secs: Option<u64>,
    /// Where pending requests are kept.
    pub state_file: Option<PathBuf>,
    /// Allow cleartext connections (local tests only).
    pub insecure_plaintext: Option<bool>,
    /// Refuse replies without a valid, aligned DKIM signature (`--require-dkim`).
    pub require_dkim: Option<bool>,
    /// kst's DKIM selector (`--dkim-selector`, default `kst`).
    pub dkim_selector: Option<String>,
}

/// Why the client configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// The file cannot be read.
    #[error("cannot read the client configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("the client configuration {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (from the TOML parser).
        message: String,
    },
    /// A value is wrong.
    #[error("{what}: {message}")]
    Value {
        /// Which setting.
        what: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ClientFile {
    /// Parses TOML text (`path` only names the file in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ClientConfigError> {
        toml::from_str(text).map_err(|e| ClientConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })
    }

    /// Reads `path`; a missing file is an error only when `required` (it was named explicitly).
    pub fn load(path: &Path, required: bool) -> Result<Self, ClientConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(source) => Err(ClientConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// `~/.config/kst/client.toml` (or `$XDG_CONFIG_HOME/kst/client.toml`).
pub fn default_config_path() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("kst").join("client.toml"))
}

/// `~/.local/state/kst/pending.json` (or `$XDG_STATE_HOME/kst/pending.json`).
pub fn default_state_path() -> Option<PathBuf> {
    xdg_dir("XDG_STATE_HOME", ".local/state").map(|d| d.join("kst").join("pending.json"))
}

fn xdg_dir(var: &str, below_home: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(below_home)),
    }
}

/// How a connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Cleartext first, then STARTTLS (required unless `--insecure-plaintext`).
    StartTls,
    /// TLS from the first byte (`smtps://`, `imaps://`).
    Implicit,
}

/// A server to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (no brackets); also the TLS server name.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// STARTTLS or implicit TLS.
    pub security: Security,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.security {
            Security::StartTls => write!(f, "{host}:{} (STARTTLS)", self.port),
            Security::Implicit => write!(f, "{host}:{} (TLS)", self.port),
        }
    }
}

/// Which protocol an endpoint string is for (its scheme names and default ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// SMTP submission: `smtp://` (587), `smtps://` (465).
    Submission,
    /// IMAP: `imap://` (143), `imaps://` (993).
    Imap,
    /// SMTP to an MX: `smtp://` (25).
    Mx,
}

impl Endpoint {
    /// Parses `HOST:PORT`, `[V6]:PORT`, `HOST` (default port), or with a scheme:
    /// `smtps://` / `imaps://` mean implicit TLS, `smtp://` / `imap://` (or none) STARTTLS.
    pub fn parse(input: &str, service: Service) -> Result<Self, String> {
        let input = input.trim();
        let (plain, tls, plain_port, tls_port) = match service {
            Service::Submission => ("smtp", "smtps", 587, 465),
            Service::Imap => ("imap", "imaps", 143, 993),
            Service::Mx => ("smtp", "smtps", 25, 465),
        };
        let (security, rest) = match input.split_once("://") {
            None => (Security::StartTls, input),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(plain) => {
                (Security::StartTls, rest)
            }
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(tls) => (Security::Implicit, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "unknown scheme {scheme}:// in {input:?}: use HOST:PORT (STARTTLS) or {tls}://HOST:PORT (implicit TLS)"
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        let default_port = match security {
            Security::StartTls => plain_port,
            Security::Implicit => tls_port,
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed [ in {input:?}"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(format!("unexpected {after:?} after ] in {input:?}")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => {
                    return Err(format!(
                        "write an IPv6 address as [ADDRESS]:PORT: {input:?}"
                    ));
                }
                None => (rest, None),
            }
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == '@')
        {
            return Err(format!("no usable host name in {input:?}"));
        }
        // A name goes to the resolver and into the TLS check as its A-label; anything that is
        // no host name (bidi controls, spaces, empty labels) is refused here, not sent to DNS.
        // A single-label name (`localhost`, a host from /etc/hosts) is kept when it is plain
        // letters, digits and hyphens.
        let single_label =
            !host.contains('.') && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let host = if host.parse::<std::net::IpAddr>().is_ok() || single_label {
            host.to_ascii_lowercase()
        } else {
            kst_core::AddressPolicy::default()
                .normalize_domain(host.trim_end_matches('.'))
                .map_err(|_| {
                    format!(
                        "{host:?} in {input:?} is not a host name (letters, digits, hyphens and dots; an IDN is taken as its A-label)"
                    )
                })?
        };
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port {p:?} in {input:?}"))?,
        };
        Ok(Endpoint {
            host,
            port,
            security,
        })
    }
}

/// A DNS server given as `IP:PORT` (port 53 when left out) or `tls://IP:PORT#NAME` (DNS over
/// TLS, port 853 when left out).
pub fn parse_resolver(input: &str) -> Result<super::dnssec::ResolverSpec, String> {
    super::dnssec::ResolverSpec::parse(input)
}

/// `~/.cache/kst/mta-sts` (or `$XDG_CACHE_HOME/kst/mta-sts`): cached MTA-STS policies.
pub fn default_mta_sts_cache() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache").map(|d| d.join("kst").join("mta-sts"))
}

/// The password: from the environment variable, else from the command's first line.
pub fn password(env_var: &str, command: Option<&str>) -> Result<Option<String>, ClientConfigError> {
    if let Ok(p) = std::env::var(env_var)
        && !p.is_empty()
    {
        return Ok(Some(p));
    }
    let Some(cmd) = command else {
        return Ok(None);
    };
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| ClientConfigError::Value {
            what: "password command".into(),
            message: format!("cannot run {cmd:?}: {e}"),
        })?;
    if !out.status.success() {
        return Err(ClientConfigError::Value {
            what: "password command".into(),
            message: format!("{cmd:?} failed ({})", out.status),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(ClientConfigError::Value {
            what: "password command".into(),
            message: format!("{cmd:?} printed no password"),
        });
    }
    Ok(Some(line.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_and_without_scheme() {
        let e = Endpoint::parse("mail.example.net:2587", Service::Submission).unwrap();
        assert_eq!(
            e,
            Endpoint {
                host: "mail.example.net".into(),
                port: 2587,
                security: Security::StartTls
            }
        );
        let e = Endpoint::parse("smtps://mail.example.net", Service::Submission).unwrap();
        assert_eq!((e.port, e.security), (465, Security::Implicit));
        let e = Endpoint::parse("IMAPS://127.0.0.1:2993/", Service::Imap).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.security),
            ("127.0.0.1", 2993, Security::Implicit)
        );
        let e = Endpoint::parse("imap://[::1]:143", Service::Imap).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 143));
        assert_eq!(e.to_string(), "[::1]:143 (STARTTLS)");
        let e = Endpoint::parse("mx.acme.net", Service::Mx).unwrap();
        assert_eq!((e.port, e.security), (25, Security::StartTls));
        // Host names as their A-label; bidi controls and empty labels are no host names.
        let e = Endpoint::parse("M\u{e4}il.Example.net.:2525", Service::Mx).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("xn--mil-qla.example.net", 2525));
        assert!(Endpoint::parse("mail.example.net\u{202e}:25", Service::Mx).is_err());
        assert!(Endpoint::parse("mail..example.net:25", Service::Mx).is_err());
        assert_eq!(
            Endpoint::parse("localhost:25", Service::Mx).unwrap().host,
            "localhost"
        );
        assert_eq!(
            Endpoint::parse("[::1]:25", Service::Mx).unwrap().host,
            "::1"
        );
        assert!(Endpoint::parse("m\u{202e}ail:25", Service::Mx).is_err());
        let e = Endpoint::parse("mail.example.net", Service::Imap).unwrap();
        assert_eq!(e.port, 143);
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for (input, says) in [
            ("pop3://mail.example.net:110", "unknown scheme"),
            ("mail.example.net:0", "bad port"),
            ("mail.example.net:99999", "bad port"),
            ("mail.example.net:x", "bad port"),
            (":587", "no usable host"),
            ("", "no usable host"),
            ("::1:587", "IPv6"),
            ("[::1", "unclosed"),
            ("alice@mail.example.net:587", "no usable host"),
        ] {
            let err = Endpoint::parse(input, Service::Submission).unwrap_err();
            assert!(err.contains(says), "{input:?}: {err}");
        }
    }

    #[test]
    fn the_file_parses_and_rejects_unknown_keys() {
        let text = r#"
account = "alice@example.net"
submission = "smtps://mail.example.net:465"
imap = "mail.example.net:143"
user = "alice"
password_command = "echo secret"
ca_file = "/tmp/ca.pem"
resolver = "127.0.0.1:5353"
timeout_secs = 30
insecure_plaintext = false
"#;
        let f = ClientFile::parse(text, Path::new("client.toml")).unwrap();
        assert_eq!(f.account.as_deref(), Some("alice@example.net"));
        assert_eq!(f.user.as_deref(), Some("alice"));
        assert_eq!(f.timeout_secs, Some(30));
        assert_eq!(f.ca_file.as_deref(), Some(Path::new("/tmp/ca.pem")));
        assert_eq!(f.insecure_plaintext, Some(false));

        let err = ClientFile::parse("acount = \"x\"\n", Path::new("client.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("client.toml") && msg.contains("acount"),
            "{msg}"
        );
        let err = ClientFile::parse("timeout_secs = \"soon\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("timeout_secs"), "{err}");
    }

    #[test]
    fn a_missing_default_file_is_empty_but_a_named_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("client.toml");
        assert_eq!(
            ClientFile::load(&missing, false).unwrap(),
            ClientFile::default()
        );
        assert!(matches!(
            ClientFile::load(&missing, true),
            Err(ClientConfigError::Read { .. })
        ));
    }

    #[test]
    fn resolver_addresses() {
        assert_eq!(
            parse_resolver("127.0.0.1:5353").unwrap().addr().to_string(),
            "127.0.0.1:5353"
        );
        assert_eq!(
            parse_resolver("::1").unwrap().addr().to_string(),
            "[::1]:53"
        );
        assert!(parse_resolver("dns.example:53").is_err());
    }

    #[test]
    fn password_from_a_command() {
        let p = password(
            "KST_TEST_UNSET_PASSWORD_VAR",
            Some("printf 'alice-pw\\nrest\\n'"),
        )
        .unwrap();
        assert_eq!(p.as_deref(), Some("alice-pw"));
        assert!(password("KST_TEST_UNSET_PASSWORD_VAR", Some("exit 3")).is_err());
        assert!(password("KST_TEST_UNSET_PASSWORD_VAR", Some("true")).is_err());
        assert_eq!(password("KST_TEST_UNSET_PASSWORD_VAR", None).unwrap(), None);
    }
}
