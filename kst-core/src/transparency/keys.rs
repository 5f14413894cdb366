//! The domain's log key file: the head signing key and the VRF key, written by
//! `kst log keygen` (mode 0600) and read by the server.
//!
//! Format (text, one `name: hex` per line, `#` comments):
//! ```text
//! # kst transparency log keys for example.net
//! domain: example.net
//! head-key: <64 hex digits, Ed25519 seed>
//! vrf-key: <64 hex digits, ECVRF secret>
//! ```

use zeroize::Zeroizing;

use super::head::HeadSigner;
use super::vrf::VrfSecret;
use super::{Result, TransparencyError};

/// Largest key file accepted (it holds three short lines).
const MAX_FILE: usize = 4096;

/// The public record of a domain's directory keys, as the `_kst-log.<domain>` TXT record
/// and the WKD policy directory's `kst-log` file (`crate::wkd::LOG_KEYS_FILE`) publish it:
/// `v=kstlog1; head=<hex>; vrf=<hex>` (without a line end).
pub fn public_record(head: &[u8; 32], vrf: &[u8; 32]) -> String {
    format!(
        "v=kstlog1; head={}; vrf={}",
        hex::encode(head),
        hex::encode(vrf)
    )
}

/// A domain's transparency keys.
#[derive(Debug)]
pub struct LogKeys {
    /// The served domain the keys belong to.
    pub domain: String,
    /// Signs the domain's heads.
    pub head: HeadSigner,
    /// Computes the directory's labels.
    pub vrf: VrfSecret,
}

impl LogKeys {
    /// Fresh keys for `domain`.
    pub fn generate(domain: &str) -> Self {
        LogKeys {
            domain: domain.to_string(),
            head: HeadSigner::generate(),
            vrf: VrfSecret::generate(),
        }
    }

    /// The key file's text (secret: write it with mode 0600).
    pub fn to_file(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "# kst transparency log keys for {d}: keep secret, back up; the vrf-key cannot be\n\
             # changed for the life of the directory\ndomain: {d}\nhead-key: {}\nvrf-key: {}\n",
            hex::encode(*self.head.to_bytes()),
            hex::encode(*self.vrf.to_bytes()),
            d = self.domain,
        ))
    }

    /// Parses a key file; says which line is wrong.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |what: String| TransparencyError::Malformed(format!("log key file: {what}"));
        if text.len() > MAX_FILE {
            return Err(bad(format!("larger than {MAX_FILE} bytes")));
        }
        let (mut domain, mut head, mut vrf) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("line {}: want `name: value`", n + 1)))?;
            let value = value.trim();
            let slot = match name.trim() {
                "domain" => {
                    domain = Some(value.to_string());
                    continue;
                }
                "head-key" => &mut head,
                "vrf-key" => &mut vrf,
                other => return Err(bad(format!("line {}: unknown field {other:?}", n + 1))),
            };
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(value, &mut bytes[..])
                .map_err(|_| bad(format!("line {}: want 64 hex digits", n + 1)))?;
            *slot = Some(bytes);
        }
        let domain = domain.ok_or_else(|| bad("no `domain:` line".into()))?;
        let head = head.ok_or_else(|| bad("no `head-key:` line".into()))?;
        let vrf = vrf.ok_or_else(|| bad("no `vrf-key:` line".into()))?;
        Ok(LogKeys {
            domain,
            head: HeadSigner::from_bytes(&head),
            vrf: VrfSecret::from_bytes(*vrf),
        })
    }
}
