//! The `[dkim]` configuration section: the selector and key files kst signs its replies with.
//!
//! ```toml
//! [dkim]
//! selector = "kst"                                     # KST_DKIM__SELECTOR (s=kst-ed25519, s=kst-rsa)
//! ed25519_key = "/etc/kst/dkim/{domain}.ed25519.pem"   # KST_DKIM__ED25519_KEY
//! rsa_key = "/etc/kst/dkim/{domain}.rsa.pem"           # KST_DKIM__RSA_KEY
//! ```
//!
//! `{domain}` in a key path stands for each served domain, so one setting names every domain's
//! key (and environment overrides work for all of them). With no key path set, replies are not
//! signed. With one set, every served domain must have its key file, and every reply is signed
//! (with both keys when both are set: ed25519-sha256 and rsa-sha256). Reading and parsing the
//! keys is the signer's job (`crate::server::mailer::dkim`).

use std::path::PathBuf;

use kst_core::Policy;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The selector kst signs with unless `[dkim] selector` says otherwise. Clients take a
/// signature as kst's only when its selector is this one or begins with `kst-` (see
/// docs/CLIENT.md): a selector that no other signer of the domain uses, so that a user's own
/// DKIM-signed mail cannot pass for a reply.
pub const DEFAULT_SELECTOR: &str = "kst";

/// The placeholder for the served domain in key paths.
pub const DOMAIN_PLACEHOLDER: &str = "{domain}";

/// `[dkim]`: DKIM signing of replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DkimConfig {
    /// The selector prefix: the Ed25519 key signs with `s=<selector>-ed25519` and is
    /// published at `<selector>-ed25519._domainkey.<domain>`, the RSA key with
    /// `<selector>-rsa`.
    pub selector: String,
    /// The Ed25519 private key (PKCS#8 PEM, mode 0600; `kst dkim keygen` writes it); `{domain}`
    /// stands for the served domain. Empty: no ed25519-sha256 signature.
    pub ed25519_key: PathBuf,
    /// The RSA private key (PKCS#8 or PKCS#1 PEM, mode 0600, 2048 bits or more); `{domain}`
    /// stands for the served domain. Empty: no rsa-sha256 signature.
    pub rsa_key: PathBuf,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            selector: DEFAULT_SELECTOR.to_string(),
            ed25519_key: PathBuf::new(),
            rsa_key: PathBuf::new(),
        }
    }
}

/// The two kinds of DKIM key kst signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
    /// rsa-sha256 (RFC 6376).
    Rsa,
}

impl DkimAlgorithm {
    /// The configuration key naming this kind's file.
    pub fn config_key(self) -> &'static str {
        match self {
            DkimAlgorithm::Ed25519 => "dkim.ed25519_key",
            DkimAlgorithm::Rsa => "dkim.rsa_key",
        }
    }

    /// The `k=` tag of the DNS record.
    pub fn key_type(self) -> &'static str {
        match self {
            DkimAlgorithm::Ed25519 => "ed25519",
            DkimAlgorithm::Rsa => "rsa",
        }
    }
}

impl DkimConfig {
    /// True when replies are signed (a key path is set).
    pub fn enabled(&self) -> bool {
        !self.ed25519_key.as_os_str().is_empty() || !self.rsa_key.as_os_str().is_empty()
    }

    /// Checks the selector and the paths; nothing is read (see [`DkimConfig::key_files`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        check_selector(&self.selector).map_err(|m| ConfigError::key("dkim.selector", m))?;
        for alg in [DkimAlgorithm::Ed25519, DkimAlgorithm::Rsa] {
            let path = self.template(alg);
            if path.to_str().is_none() {
                return Err(ConfigError::key(alg.config_key(), "must be valid UTF-8"));
            }
        }
        Ok(())
    }

    fn template(&self, alg: DkimAlgorithm) -> &PathBuf {
        match alg {
            DkimAlgorithm::Ed25519 => &self.ed25519_key,
            DkimAlgorithm::Rsa => &self.rsa_key,
        }
    }

    /// The selector of the key of kind `alg`: `<selector>-ed25519` or `<selector>-rsa`. Each
    /// kind has a name of its own because verifiers (mail-auth, dkimpy) take the first key
    /// record they find under a name: two records under one selector would fail one signature.
    pub fn selector_for(&self, alg: DkimAlgorithm) -> String {
        format!("{}-{}", self.selector, alg.key_type())
    }

    /// The key file of kind `alg` for `domain` (the placeholder replaced), or `None` when that
    /// kind is not configured.
    pub fn key_file(&self, alg: DkimAlgorithm, domain: &str) -> Option<PathBuf> {
        let t = self.template(alg);
        if t.as_os_str().is_empty() {
            return None;
        }
        let s = t.to_string_lossy();
        Some(PathBuf::from(s.replace(DOMAIN_PLACEHOLDER, domain)))
    }

    /// Every served domain with the key files configured for it: `(domain, kind, path)`.
    pub fn key_files(&self, policy: &Policy) -> Vec<(String, DkimAlgorithm, PathBuf)> {
        let mut out = Vec::new();
        for domain in &policy.domains {
            for alg in [DkimAlgorithm::Ed25519, DkimAlgorithm::Rsa] {
                if let Some(p) = self.key_file(alg, domain) {
                    out.push((domain.to_string(), alg, p));
                }
            }
        }
        out
    }
}

/// Checks that `s` can be a selector: dot-separated DNS labels of letters, digits and hyphens.
pub fn check_selector(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 50
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a selector: use letters, digits and hyphens, e.g. \"{DEFAULT_SELECTOR}\" \
             or \"{DEFAULT_SELECTOR}-2027\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_paths_follow_the_domain() {
        let d = DkimConfig::default();
        assert!(!d.enabled());
        assert_eq!(d.selector, "kst");
        assert!(d.validate().is_ok());
        let c = DkimConfig {
            ed25519_key: "/k/{domain}.ed25519.pem".into(),
            ..DkimConfig::default()
        };
        assert!(c.enabled());
        assert_eq!(
            c.key_file(DkimAlgorithm::Ed25519, "acme.net"),
            Some(PathBuf::from("/k/acme.net.ed25519.pem"))
        );
        assert_eq!(c.key_file(DkimAlgorithm::Rsa, "acme.net"), None);
        assert_eq!(c.selector_for(DkimAlgorithm::Ed25519), "kst-ed25519");
        assert_eq!(c.selector_for(DkimAlgorithm::Rsa), "kst-rsa");
        let policy = Policy::new(&["example.net", "acme.net"], &["mx.example.net"]);
        let files = c.key_files(&policy);
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|(_, a, _)| *a == DkimAlgorithm::Ed25519));
    }

    #[test]
    fn selectors_are_dns_labels() {
        for good in ["kst", "kst-2027", "a.b"] {
            assert!(check_selector(good).is_ok(), "{good}");
        }
        for bad in ["", "kst_1", "-kst", "kst..x", "k st", "kst;d=evil"] {
            assert!(check_selector(bad).is_err(), "{bad}");
        }
        let c = DkimConfig {
            selector: "bad selector".into(),
            rsa_key: "/k".into(),
            ..DkimConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key_name(), Some("dkim.selector"));
    }
}
