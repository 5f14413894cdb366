//! The `[wks]` configuration section: each served domain's WKS submission key file.

use std::path::{Path, PathBuf};

use kst_core::Policy;
use kst_core::wks::{SubmissionKey, SubmissionKeys};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[wks]`: the Web Key Service submission keys (`gpg-wks-client` encrypts its submission to
/// `keys@<domain>`'s key). Without an entry for a domain, only unencrypted submissions to it can
/// be read. The files hold secret keys: kst refuses one that group or others may read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WksConfig {
    /// One `[[wks.keys]]` table per served domain that has a submission key.
    pub keys: Vec<WksKeyConfig>,
}

/// `[[wks.keys]]`: one domain's submission key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WksKeyConfig {
    /// The served domain (`keys@<domain>` is the submission address).
    pub domain: String,
    /// The ASCII-armored secret key, without passphrase, mode 0600 (`kst wks keygen` writes it).
    pub file: PathBuf,
}

impl WksConfig {
    /// Checks that every entry names a served domain once and a file; nothing is read.
    pub fn validate(&self, policy: &Policy) -> Result<(), ConfigError> {
        let mut seen = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = format!("wks.keys[{i}]");
            let domain = served_domain(policy, &k.domain).map_err(|m| ConfigError::key(&key, m))?;
            if seen.contains(&domain) {
                return Err(ConfigError::key(
                    key,
                    format!("{domain} has a second submission key; keep one"),
                ));
            }
            if k.file.as_os_str().is_empty() {
                return Err(ConfigError::key(
                    format!("{key}.file"),
                    "must name the submission key file",
                ));
            }
            seen.push(domain);
        }
        Ok(())
    }

    /// The file configured for `domain`, if any.
    pub fn file_for(&self, policy: &Policy, domain: &str) -> Option<&Path> {
        let wanted = served_domain(policy, domain).ok()?;
        self.keys
            .iter()
            .find(|k| served_domain(policy, &k.domain).is_ok_and(|d| d == wanted))
            .map(|k| k.file.as_path())
    }

    /// Reads every configured key: each file must be readable by its owner only and hold a
    /// usable secret key. The secret is never logged; errors name the file, not its contents.
    pub fn load_keys(&self, policy: &Policy) -> Result<SubmissionKeys, ConfigError> {
        self.validate(policy)?;
        let mut keys = SubmissionKeys::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = format!("wks.keys[{i}].file");
            let domain = served_domain(policy, &k.domain).map_err(|m| ConfigError::key(&key, m))?;
            let submission = read_key_file(&k.file).map_err(|m| ConfigError::key(&key, m))?;
            keys.insert(&domain, submission);
        }
        Ok(keys)
    }
}

/// `domain` as the policy spells a served domain, or why it is not one.
fn served_domain(policy: &Policy, domain: &str) -> Result<String, String> {
    let d = policy
        .address_policy
        .normalize_domain(domain.trim())
        .map_err(|e| format!("{domain:?} is not a domain: {e}"))?;
    if policy.serves_domain(&d) {
        Ok(d)
    } else {
        Err(format!("{d} is not in kst.domains"))
    }
}

/// Most permission bits a submission key file may have: read and write for its owner.
const MAX_MODE: u32 = 0o600;

/// Checks the mode of a secret key file: nobody but its owner may read or write it.
pub fn check_key_file_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !MAX_MODE != 0 {
        return Err(format!(
            "{} has mode {mode:04o}; a secret key file must be readable by kst's user only: \
             chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Reads and parses a submission key file after checking its mode.
pub fn read_key_file(path: &Path) -> Result<SubmissionKey, String> {
    check_key_file_mode(path)?;
    let limit = kst_core::wks::MAX_SECRET_KEY_BYTES as u64;
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size > limit {
        return Err(format!(
            "{} is {size} bytes; a submission key file holds one armored key (at most {limit})",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SubmissionKey::from_file_contents(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const SECRET: &str = include_str!("../../../../tests/fixtures/wks/submission-key.secret.asc");

    fn policy() -> Policy {
        Policy::new(&["example.net", "example.org"], &["mail.example.net"])
    }

    fn entry(domain: &str, file: &Path) -> WksKeyConfig {
        WksKeyConfig {
            domain: domain.into(),
            file: file.to_path_buf(),
        }
    }

    #[test]
    fn keys_load_only_from_private_files_of_served_domains() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("example.net.asc");
        std::fs::write(&file, SECRET).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cfg = WksConfig {
            keys: vec![entry("Example.NET", &file)],
        };
        let e = cfg.load_keys(&policy()).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keys = cfg.load_keys(&policy()).unwrap();
        let key = keys.get("example.net").expect("loaded");
        assert_eq!(
            key.fingerprint(),
            "4357D7BD290B536F57376DC8546C22E8C02CD0A6"
        );
        assert_eq!(cfg.file_for(&policy(), "EXAMPLE.net"), Some(file.as_path()));
        assert_eq!(cfg.file_for(&policy(), "example.org"), None);

        let other = WksConfig {
            keys: vec![entry("acme.net", &file)],
        };
        let e = other.validate(&policy()).unwrap_err().to_string();
        assert!(e.contains("acme.net is not in kst.domains"), "{e}");
        let twice = WksConfig {
            keys: vec![entry("example.net", &file), entry("example.NET", &file)],
        };
        assert!(twice.validate(&policy()).is_err());
    }

    #[test]
    fn errors_name_the_file_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.asc");
        let mangled = SECRET.replace("lFgE", "lFgX");
        std::fs::write(&file, &mangled).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_key_file(&file).unwrap_err();
        assert!(e.contains("bad.asc"), "{e}");
        for line in SECRET.lines().filter(|l| l.len() > 20) {
            assert!(!e.contains(line), "the error shows key material: {e}");
        }
        let missing = read_key_file(&dir.path().join("none.asc")).unwrap_err();
        assert!(missing.contains("none.asc"), "{missing}");
    }

    #[test]
    fn the_toml_form_loads_through_the_config_sources() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("example.net.asc");
        let config = dir.path().join("kst.toml");
        std::fs::write(
            &config,
            format!(
                "[kst]\ndomains = [\"example.net\"]\n[store]\nbackend = \"fs\"\npath = \"{d}/keys\"\n\
                 [mailer]\nkind = \"spool\"\npath = \"{d}/out\"\n\
                 [[wks.keys]]\ndomain = \"example.net\"\nfile = \"{k}\"\n",
                d = dir.path().display(),
                k = key.display()
            ),
        )
        .unwrap();
        let cfg = super::super::Config::load_with_env(Some(&config), []).unwrap();
        assert_eq!(cfg.wks.keys, [entry("example.net", &key)]);
        std::fs::write(
            &config,
            "[kst]\ndomains = [\"example.net\"]\n[[wks.keys]]\ndomain = \"acme.net\"\nfile = \"/k\"\n",
        )
        .unwrap();
        let e = super::super::Config::load_with_env(Some(&config), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("wks.keys[0]") && e.contains("acme.net"), "{e}");
    }
}
