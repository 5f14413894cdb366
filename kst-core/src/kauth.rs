//! K_auth: the 32 random bytes a requester sends so that the KST's reply can be authenticated.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of K_auth in bytes.
pub const AUTH_KEY_LEN: usize = 32;

/// A requester's K_auth. Zeroized on drop; `Debug` never shows it; never log it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct AuthKey([u8; AUTH_KEY_LEN]);

/// Why a K_auth line was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthKeyError {
    /// The line is missing.
    #[error("K_auth is missing")]
    Missing,
    /// Not standard base64.
    #[error("K_auth is not base64")]
    NotBase64,
    /// Decodes to another length than 32 bytes.
    #[error("K_auth must be 32 bytes, got {0}")]
    WrongLength(usize),
}

impl AuthKey {
    /// A fresh random K_auth from the operating system's CSPRNG (via `rand`'s thread RNG).
    pub fn generate() -> Self {
        let mut k = [0u8; AUTH_KEY_LEN];
        rand::fill(&mut k);
        AuthKey(k)
    }

    /// Wraps raw bytes (test vectors, state files).
    pub fn from_bytes(bytes: [u8; AUTH_KEY_LEN]) -> Self {
        AuthKey(bytes)
    }

    /// Parses one line: standard base64 (RFC 4648 section 4) of exactly 32 bytes, padding
    /// optional, surrounding whitespace ignored.
    pub fn parse(line: &str) -> Result<Self, AuthKeyError> {
        let s = line.trim();
        if s.is_empty() {
            return Err(AuthKeyError::Missing);
        }
        if s.len() > 64 {
            return Err(AuthKeyError::WrongLength(s.len() * 3 / 4));
        }
        let padded;
        let s = if !s.len().is_multiple_of(4) {
            padded = format!("{s}{}", "=".repeat(4 - s.len() % 4));
            padded.as_str()
        } else {
            s
        };
        let mut bytes = STANDARD.decode(s).map_err(|_| AuthKeyError::NotBase64)?;
        let n = bytes.len();
        let out = <[u8; AUTH_KEY_LEN]>::try_from(bytes.as_slice())
            .map(AuthKey)
            .map_err(|_| AuthKeyError::WrongLength(n));
        bytes.zeroize();
        out
    }

    /// The bytes, for computing an HMAC.
    pub fn expose(&self) -> &[u8; AUTH_KEY_LEN] {
        &self.0
    }

    /// Standard base64 with padding (44 characters), as sent on the wire.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paper_example() {
        // Fig. 3 of the paper.
        let k = AuthKey::parse("40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E=").unwrap();
        assert_eq!(
            k.to_base64(),
            "40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E="
        );
        assert_eq!(
            AuthKey::parse(" 40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E \r").unwrap(),
            k
        );
    }

    #[test]
    fn refuses_wrong_lengths_and_alphabets() {
        assert_eq!(AuthKey::parse(""), Err(AuthKeyError::Missing));
        assert_eq!(AuthKey::parse("AAAA"), Err(AuthKeyError::WrongLength(3)));
        assert!(matches!(
            AuthKey::parse(&STANDARD.encode([1u8; 33])),
            Err(AuthKeyError::WrongLength(33))
        ));
        assert_eq!(
            AuthKey::parse("40Pe0_MY6VCZ_8TczgZemiLKP2rvbCwxXGhC7S2v80E="),
            Err(AuthKeyError::NotBase64)
        );
        assert!(AuthKey::parse(&"A".repeat(5000)).is_err());
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let a = AuthKey::generate();
        let b = AuthKey::generate();
        assert_ne!(a, b);
        assert_eq!(AuthKey::parse(&a.to_base64()).unwrap(), a);
        assert_eq!(format!("{a:?}"), "AuthKey(<redacted>)");
    }
}
