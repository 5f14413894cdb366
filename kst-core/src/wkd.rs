//! Web Key Directory (draft-koch-openpgp-webkey-service): the hash, the request paths, the policy.
//!
//! A WKD client asks for `hu/<hash>`, where the hash is the z-base-32 encoding of the SHA-1 of
//! the ASCII-lowercased local part. Two URL forms exist:
//! - **advanced**: `https://openpgpkey.<domain>/.well-known/openpgpkey/<domain>/hu/<hash>`;
//! - **direct**: `https://<domain>/.well-known/openpgpkey/hu/<hash>`.
//!
//! Both may carry `?l=<local part>`; kst never trusts it (see [`WkdRequest::parse`]).
//! Nothing here does network I/O: the web listener in kst-bin calls these functions.

use pgp::crypto::hash::HashAlgorithm;

use crate::address::{Address, AddressPolicy};

/// Path prefix every WKD request starts with.
pub const WELL_KNOWN: &str = "/.well-known/openpgpkey";

/// Label before the domain in the host name of the advanced method.
pub const ADVANCED_HOST_LABEL: &str = "openpgpkey.";

/// The WKS protocol version kst's policy file announces (draft-koch-openpgp-webkey-service-21,
/// section 4.5: `protocol-version` gives the Web Key Service protocol version; 5 is current).
/// GnuPG's `gpg-wks-client` sends an encrypted submission for any version above 1.
pub const PROTOCOL_VERSION: u32 = 5;

/// Length of a WKD hash in z-base-32 characters (160 bits / 5).
pub const HASH_LEN: usize = 32;

/// The z-base-32 alphabet (Zooko's human-oriented base-32).
const ZBASE32: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";

/// Encodes bytes in z-base-32, most significant bit first, without padding. 20 bytes (a SHA-1)
/// give exactly [`HASH_LEN`] characters.
pub fn zbase32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ZBASE32[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ZBASE32[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// A WKD hash: 32 characters of z-base-32, as it appears after `hu/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WkdHash(String);

impl WkdHash {
    /// The hash of a local part: SHA-1 of its ASCII-lowercased bytes (non-ASCII bytes are kept
    /// as they are, as GnuPG does), in z-base-32.
    pub fn of_local_part(local: &str) -> WkdHash {
        let lower = local.to_ascii_lowercase();
        let digest = HashAlgorithm::Sha1
            .digest(lower.as_bytes())
            .expect("SHA-1 is always available in rPGP");
        WkdHash(zbase32(&digest))
    }

    /// The hash of a normalized address's local part.
    pub fn of_address(address: &Address) -> WkdHash {
        WkdHash::of_local_part(address.local())
    }

    /// Accepts a hash from a request path: exactly [`HASH_LEN`] characters of the z-base-32
    /// alphabet (lowercase, as clients send it).
    pub fn parse(s: &str) -> Option<WkdHash> {
        (s.len() == HASH_LEN && s.bytes().all(|b| ZBASE32.contains(&b)))
            .then(|| WkdHash(s.to_string()))
    }

    /// The 32 characters.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WkdHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which of the two URL forms a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `openpgpkey.<domain>/.well-known/openpgpkey/<domain>/...`
    Advanced,
    /// `<domain>/.well-known/openpgpkey/...`
    Direct,
}

impl Method {
    /// Stable token for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Advanced => "advanced",
            Method::Direct => "direct",
        }
    }
}

/// What a WKD request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `hu/<hash>`: the key of the address with that hash.
    Key(WkdHash),
    /// `policy`: the policy flags of the domain.
    Policy,
    /// `submission-address`: where WKS submissions go.
    SubmissionAddress,
    /// `kst-log` ([`LOG_KEYS_FILE`]): the public keys of the domain's key directory (issue
    /// 18), the same record as the `_kst-log.<domain>` TXT record. Not a WKD resource: kst
    /// adds it to the policy directory, where clients look for the domain's policy.
    LogKeys,
}

/// The file name of [`Resource::LogKeys`] in the policy directory.
pub const LOG_KEYS_FILE: &str = "kst-log";

/// A parsed WKD request: the domain it is about, the URL form, and the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WkdRequest {
    /// The domain, normalized (lowercase IDNA A-label).
    pub domain: String,
    /// The URL form.
    pub method: Method,
    /// What is asked for.
    pub resource: Resource,
}

/// Why a path under [`WELL_KNOWN`] is not a WKD request kst answers. Each is a 404 for the
/// client; the variants exist for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WkdPathError {
    /// The path does not start with `/.well-known/openpgpkey/`.
    #[error("not a WKD path")]
    NotWkd,
    /// The Host header is missing or not a valid domain name.
    #[error("the Host header is not a domain name")]
    BadHost,
    /// The advanced form was used, but the host is not `openpgpkey.` + the domain in the path.
    #[error("the advanced form needs Host openpgpkey.{path_domain}, got {host}")]
    HostMismatch {
        /// The domain in the path.
        path_domain: String,
        /// The Host header, normalized.
        host: String,
    },
    /// The hash is not 32 z-base-32 characters.
    #[error("the hash is not 32 z-base-32 characters")]
    BadHash,
    /// The path names something WKD does not define (including a directory listing).
    #[error("no such WKD resource")]
    Unknown,
}

impl WkdRequest {
    /// Parses the path (without query; `?l=...` is the caller's to drop and ignore) and the Host
    /// header (a port is allowed and dropped). Domains are normalized with `policy`.
    ///
    /// The `l=` parameter is never used to find a key: the hash alone names the address, so a
    /// client cannot reach a key by a local part that hashes elsewhere.
    ///
    /// [`Resource::LogKeys`] in the advanced form (`<domain>/kst-log`) is the one exception
    /// to the Host rule: the path names the domain and any Host is accepted, as for the key
    /// directory's own `/.well-known/kst/log/<domain>/keys` (the file is public, and a client
    /// given the directory's URL finds it on the same listener).
    pub fn parse(path: &str, host: &str, policy: &AddressPolicy) -> Result<Self, WkdPathError> {
        let rest = path
            .strip_prefix(WELL_KNOWN)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(WkdPathError::NotWkd)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let log_keys_at_path = matches!(parts.as_slice(), [_, LOG_KEYS_FILE]);
        let host = match normalize_host(host, policy) {
            Some(h) => h,
            None if log_keys_at_path => String::new(),
            None => return Err(WkdPathError::BadHost),
        };
        let (method, domain, resource) = match parts.as_slice() {
            resource if is_resource(resource) => (Method::Direct, host, resource),
            [domain, resource @ ..] if is_resource(resource) => {
                let path_domain = policy
                    .normalize_domain(domain)
                    .map_err(|_| WkdPathError::Unknown)?;
                match host.strip_prefix(ADVANCED_HOST_LABEL) {
                    Some(d) if d == path_domain => {}
                    _ if log_keys_at_path => {}
                    _ => {
                        return Err(WkdPathError::HostMismatch { path_domain, host });
                    }
                }
                (Method::Advanced, path_domain, resource)
            }
            _ => return Err(WkdPathError::Unknown),
        };
        let resource = match resource {
            ["hu", hash] => Resource::Key(WkdHash::parse(hash).ok_or(WkdPathError::BadHash)?),
            ["policy"] => Resource::Policy,
            ["submission-address"] => Resource::SubmissionAddress,
            [LOG_KEYS_FILE] => Resource::LogKeys,
            _ => return Err(WkdPathError::Unknown),
        };
        Ok(WkdRequest {
            domain,
            method,
            resource,
        })
    }
}

/// True for the resource shapes WKD defines after the domain part.
fn is_resource(parts: &[&str]) -> bool {
    matches!(
        parts,
        ["hu", _] | ["policy"] | ["submission-address"] | [LOG_KEYS_FILE]
    )
}

/// The Host header without port, normalized as a domain.
fn normalize_host(host: &str, policy: &AddressPolicy) -> Option<String> {
    let host = host.trim();
    if host.starts_with('[') {
        return None; // an IP literal names no domain
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    policy.normalize_domain(name).ok()
}

/// The domain a Host header serves under either method: `openpgpkey.example.net` and
/// `example.net` both give `example.net` when it is in `domains`; `None` otherwise.
pub fn served_domain<'a>(
    host: &str,
    domains: &'a [String],
    policy: &AddressPolicy,
) -> Option<&'a str> {
    let host = normalize_host(host, policy)?;
    let bare = host.strip_prefix(ADVANCED_HOST_LABEL);
    domains
        .iter()
        .find(|d| d.as_str() == host || Some(d.as_str()) == bare)
        .map(String::as_str)
}

/// The policy flags kst publishes for a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyFlags {
    /// `mailbox-only`: the provider takes keys whose User ID is only the mailbox. kst stores
    /// exactly one User ID per key, the one whose address is the account's (the key policy
    /// strips every other), and WKD serves that one only. The flag makes `gpg-wks-client` add a
    /// bare-address User ID to the key and submit only that one; a key published by another
    /// path (`kst client`, a paper-style mail) keeps the name its User ID may carry, because
    /// kst neither rejects nor rewrites it (docs/PROTOCOL.md, "WKD").
    pub mailbox_only: bool,
    /// `auth-submit`: the submission is authenticated by the provider, no confirmation round.
    pub auth_submit: bool,
    /// `protocol-version: N`.
    pub protocol_version: u32,
}

impl Default for PolicyFlags {
    /// kst's policy: `mailbox-only` (WKS submissions carry the bare address as their one User
    /// ID), `auth-submit` (publication rides on the provider's authentication) and the current
    /// protocol version.
    fn default() -> Self {
        PolicyFlags {
            mailbox_only: true,
            auth_submit: true,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

impl PolicyFlags {
    /// The `policy` file text: one flag per line, LF line ends, a comment line first.
    pub fn to_text(&self, domain: &str) -> String {
        let mut out = format!("# Policy flags for domain {domain}\n");
        if self.mailbox_only {
            out.push_str("mailbox-only\n");
        }
        if self.auth_submit {
            out.push_str("auth-submit\n");
        }
        out.push_str(&format!("protocol-version: {}\n", self.protocol_version));
        out
    }
}

/// The `submission-address` file text: the address and a line end.
pub fn submission_address_text(address: &Address) -> String {
    format!("{address}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn hash_matches_the_draft_example() {
        assert_eq!(
            WkdHash::of_local_part("Joe.Doe").as_str(),
            "iy9q119eutrkn8s1mk4r39qejnbu3n5q"
        );
    }

    #[test]
    fn hash_matches_gpg_wks_client() {
        let Ok(out) = std::process::Command::new("/usr/lib/gnupg/gpg-wks-client")
            .args([
                "--print-wkd-hash",
                "alice@example.net",
                "Bob.Smith@example.net",
                "x@example.net",
                "a.very-long_local+part.with.many.dots.and.more.text@example.net",
            ])
            .output()
        else {
            panic!(
                "gpg-wks-client is part of the test environment (apt-get install gpg-wks-client)"
            );
        };
        let text = String::from_utf8(out.stdout).unwrap();
        let mut n = 0;
        for line in text.lines() {
            let (hash, addr) = line.split_once(' ').unwrap();
            let local = addr.rsplit_once('@').unwrap().0;
            assert_eq!(WkdHash::of_local_part(local).as_str(), hash, "{addr}");
            n += 1;
        }
        assert_eq!(n, 4, "{text}");
    }

    #[test]
    fn zbase32_of_short_inputs() {
        // Each group of 5 bits maps to one character; a partial group is padded with zeros.
        assert_eq!(zbase32(&[]), "");
        assert_eq!(zbase32(&[0]), "yy");
        assert_eq!(zbase32(&[0xff]), "9h");
        assert_eq!(zbase32(&[0xff; 5]), "99999999");
    }

    #[test]
    fn hash_parsing_is_strict() {
        assert!(WkdHash::parse("iy9q119eutrkn8s1mk4r39qejnbu3n5q").is_some());
        assert!(WkdHash::parse("IY9Q119EUTRKN8S1MK4R39QEJNBU3N5Q").is_none());
        assert!(WkdHash::parse("iy9q119eutrkn8s1mk4r39qejnbu3n5").is_none());
        assert!(
            WkdHash::parse("iy9q119eutrkn8s1mk4r39qejnbu3n5l").is_none(),
            "l is not in the alphabet"
        );
        assert!(WkdHash::parse("").is_none());
    }

    const H: &str = "iy9q119eutrkn8s1mk4r39qejnbu3n5q";

    #[test]
    fn direct_and_advanced_paths() {
        let direct = WkdRequest::parse(
            &format!("{WELL_KNOWN}/hu/{H}"),
            "Example.NET:443",
            &policy(),
        )
        .unwrap();
        assert_eq!(direct.domain, "example.net");
        assert_eq!(direct.method, Method::Direct);
        assert_eq!(direct.resource, Resource::Key(WkdHash::parse(H).unwrap()));

        let adv = WkdRequest::parse(
            &format!("{WELL_KNOWN}/example.net/hu/{H}"),
            "openpgpkey.example.net",
            &policy(),
        )
        .unwrap();
        assert_eq!(adv.domain, "example.net");
        assert_eq!(adv.method, Method::Advanced);

        let pol = WkdRequest::parse(
            &format!("{WELL_KNOWN}/example.net/policy"),
            "openpgpkey.example.net",
            &policy(),
        )
        .unwrap();
        assert_eq!(pol.resource, Resource::Policy);
        let sub = WkdRequest::parse(
            &format!("{WELL_KNOWN}/submission-address"),
            "example.net.",
            &policy(),
        )
        .unwrap();
        assert_eq!(sub.resource, Resource::SubmissionAddress);
        assert_eq!(sub.domain, "example.net");
    }

    /// `kst-log`: in the direct form the Host names the domain, as for `policy`; in the
    /// advanced form the path does, whatever the Host.
    #[test]
    fn the_log_keys_file_is_in_the_policy_directory() {
        let p = policy();
        let direct =
            WkdRequest::parse(&format!("{WELL_KNOWN}/kst-log"), "example.net", &p).unwrap();
        assert_eq!(
            (direct.domain.as_str(), direct.method, direct.resource),
            ("example.net", Method::Direct, Resource::LogKeys)
        );
        for host in [
            "openpgpkey.example.net",
            "127.0.0.1:8443",
            "other.example",
            "",
        ] {
            let adv =
                WkdRequest::parse(&format!("{WELL_KNOWN}/Example.NET/kst-log"), host, &p).unwrap();
            assert_eq!(
                (adv.domain.as_str(), adv.method, adv.resource),
                ("example.net", Method::Advanced, Resource::LogKeys),
                "{host}"
            );
        }
        // The exception is for kst-log only.
        assert_eq!(
            WkdRequest::parse(
                &format!("{WELL_KNOWN}/example.net/policy"),
                "[::1]:8443",
                &p
            ),
            Err(WkdPathError::BadHost)
        );
        assert!(matches!(
            WkdRequest::parse(
                &format!("{WELL_KNOWN}/example.net/policy"),
                "other.example",
                &p
            ),
            Err(WkdPathError::HostMismatch { .. })
        ));
        assert_eq!(
            WkdRequest::parse(&format!("{WELL_KNOWN}/kst-log"), "[::1]:443", &p),
            Err(WkdPathError::BadHost)
        );
        for bad in ["kst-log/x", "a/b/kst-log", "example.net/kst-log/"] {
            assert!(
                WkdRequest::parse(&format!("{WELL_KNOWN}/{bad}"), "example.net", &p).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn idn_domains_are_compared_as_a_labels() {
        let r = WkdRequest::parse(
            &format!("{WELL_KNOWN}/bücher.example/hu/{H}"),
            "openpgpkey.xn--bcher-kva.example",
            &policy(),
        )
        .unwrap();
        assert_eq!(r.domain, "xn--bcher-kva.example");
    }

    #[test]
    fn bad_requests_are_refused() {
        let p = policy();
        let e = |path: &str, host: &str| WkdRequest::parse(path, host, &p).unwrap_err();
        assert_eq!(e("/vks/v1/by-email/x", "example.net"), WkdPathError::NotWkd);
        assert_eq!(
            e("/.well-known/openpgpkeyhu/x", "example.net"),
            WkdPathError::NotWkd
        );
        // Listings and anything WKD does not define.
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/"), "example.net"),
            WkdPathError::BadHash
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu"), "example.net"),
            WkdPathError::Unknown
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/"), "example.net"),
            WkdPathError::Unknown
        );
        assert_eq!(
            e(
                &format!("{WELL_KNOWN}/example.net/hu/"),
                "openpgpkey.example.net"
            ),
            WkdPathError::BadHash
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/{H}/x"), "example.net"),
            WkdPathError::Unknown
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/../policy"), "example.net"),
            WkdPathError::Unknown
        );
        // The advanced form on the wrong host.
        assert!(matches!(
            e(&format!("{WELL_KNOWN}/example.net/hu/{H}"), "example.net"),
            WkdPathError::HostMismatch { .. }
        ));
        assert!(matches!(
            e(
                &format!("{WELL_KNOWN}/example.net/hu/{H}"),
                "openpgpkey.other.org"
            ),
            WkdPathError::HostMismatch { .. }
        ));
        // Hosts that name no domain.
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/{H}"), "[::1]:443"),
            WkdPathError::BadHost
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/{H}"), ""),
            WkdPathError::BadHost
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/{H}"), "a b"),
            WkdPathError::BadHost
        );
        assert_eq!(
            e(&format!("{WELL_KNOWN}/hu/{H}"), "example.net:x"),
            WkdPathError::BadHost
        );
    }

    #[test]
    fn served_domains_by_host() {
        let domains = vec!["example.net".to_string(), "example.org".to_string()];
        let p = policy();
        assert_eq!(
            served_domain("example.net", &domains, &p),
            Some("example.net")
        );
        assert_eq!(
            served_domain("OpenPGPkey.Example.org:8443", &domains, &p),
            Some("example.org")
        );
        assert_eq!(served_domain("other.net", &domains, &p), None);
        assert_eq!(served_domain("openpgpkey.other.net", &domains, &p), None);
    }

    #[test]
    fn policy_and_submission_texts() {
        assert_eq!(
            PolicyFlags::default().to_text("example.net"),
            "# Policy flags for domain example.net\nmailbox-only\nauth-submit\n\
             protocol-version: 5\n"
        );
        let named = PolicyFlags {
            mailbox_only: false,
            ..PolicyFlags::default()
        };
        let text = named.to_text("example.net");
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, ["auth-submit", "protocol-version: 5"]);
        let a = policy().normalize("keys@example.net").unwrap();
        assert_eq!(submission_address_text(&a), "keys@example.net\n");
    }
}
