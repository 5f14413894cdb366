//! [`Fingerprint`] and [`KeyId`]: an OpenPGP primary key's identity as validated newtypes.
//!
//! A fingerprint is 40 hex digits (version 4 keys, SHA-1) or 64 (version 6, SHA-256); a key ID
//! is 16 (the 64-bit ID: the last 8 bytes of a v4 fingerprint, the first 8 of a v6 one). Both
//! are kept and shown in uppercase, parsed from either case, and written in serde as strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that is not a fingerprint or key ID; says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not {expected}")]
pub struct FingerprintError {
    input: String,
    expected: &'static str,
}

impl FingerprintError {
    fn new(input: &str, expected: &'static str) -> Self {
        // Bound what an error message repeats of a hostile input.
        let input: String = input.chars().take(80).collect();
        FingerprintError { input, expected }
    }
}

/// `s` in uppercase when it is `lens` hex digits and nothing else.
fn upper_hex(s: &str, lens: &[usize]) -> Option<String> {
    (lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| s.to_ascii_uppercase())
}

/// Display, Debug, FromStr (by `parse`), `AsRef<str>` and serde (as a validated string) for a
/// newtype over an uppercase hex `String`.
macro_rules! hex_newtype {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl FromStr for $t {
            type Err = FingerprintError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_newtype!(Fingerprint);
hex_newtype!(KeyId);

/// The fingerprint of an OpenPGP primary key: 40 (v4) or 64 (v6) uppercase hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Parses 40 or 64 hex digits, in either case.
    pub fn parse(s: &str) -> Result<Self, FingerprintError> {
        upper_hex(s, &[40, 64])
            .map(Fingerprint)
            .ok_or_else(|| FingerprintError::new(s, "a fingerprint (40 or 64 hex digits)"))
    }

    /// The fingerprint of `bytes` (20 or 32 bytes, as rPGP and the packets hold it).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FingerprintError> {
        Self::parse(&hex::encode_upper(bytes))
    }

    /// The uppercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a version 6 (SHA-256, 64 digits) fingerprint.
    pub fn is_v6(&self) -> bool {
        self.0.len() == 64
    }

    /// The 64-bit key ID this fingerprint implies: its last 8 bytes (v4) or its first 8 (v6).
    pub fn key_id(&self) -> KeyId {
        let digits = if self.is_v6() {
            &self.0[..16]
        } else {
            &self.0[self.0.len() - 16..]
        };
        KeyId(digits.to_string())
    }
}

impl PartialEq<str> for Fingerprint {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Fingerprint {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Fingerprint {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Fingerprint> for String {
    fn eq(&self, other: &Fingerprint) -> bool {
        *self == other.0
    }
}

impl PartialEq<Fingerprint> for &str {
    fn eq(&self, other: &Fingerprint) -> bool {
        *self == other.0
    }
}

/// The 64-bit ID of an OpenPGP key: 16 uppercase hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Parses 16 hex digits, in either case.
    pub fn parse(s: &str) -> Result<Self, FingerprintError> {
        upper_hex(s, &[16])
            .map(KeyId)
            .ok_or_else(|| FingerprintError::new(s, "a key ID (16 hex digits)"))
    }

    /// The uppercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "637895003B05333E2D3782F2EE62CCF91EB2D657";
    const V6: &str = "CB186C4F0609A697E4D52DFA6C722B0C1F1E27C18A56708F6525EC27BAD9ACC9";

    #[test]
    fn parses_v4_and_v6_in_either_case_and_shows_uppercase() {
        let v4: Fingerprint = V4.to_lowercase().parse().unwrap();
        assert_eq!(v4.to_string(), V4);
        assert!(!v4.is_v6());
        let v6 = Fingerprint::parse(V6).unwrap();
        assert_eq!(v6.as_str(), V6);
        assert!(v6.is_v6());
        assert_eq!(format!("{v4:?}"), format!("{V4:?}"));
    }

    #[test]
    fn refuses_what_is_not_a_fingerprint() {
        for bad in [
            "",
            "AB",
            &V4[1..],
            &format!("{V4}0"),
            &format!("{}G", &V4[1..]),
            &format!(" {}", &V4[1..]),
            "0x637895003B05333E2D3782F2EE62CCF91EB2D6",
            &"A".repeat(63),
            "ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄ",
        ] {
            let e = Fingerprint::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("40 or 64 hex digits"),
                "{bad:?}: {e}"
            );
        }
        let long = "Z".repeat(10_000);
        assert!(Fingerprint::parse(&long).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn key_ids_are_the_last_eight_bytes_of_v4_and_the_first_of_v6() {
        assert_eq!(
            Fingerprint::parse(V4).unwrap().key_id().as_str(),
            "EE62CCF91EB2D657"
        );
        assert_eq!(
            Fingerprint::parse(V6).unwrap().key_id().as_str(),
            "CB186C4F0609A697"
        );
        assert_eq!(
            KeyId::parse("ee62ccf91eb2d657").unwrap(),
            Fingerprint::parse(V4).unwrap().key_id()
        );
        assert!(KeyId::parse("EE62CCF91EB2D65").is_err());
        assert!(KeyId::parse(V4).is_err());
    }

    #[test]
    fn from_bytes() {
        let bytes = hex::decode(V4).unwrap();
        assert_eq!(Fingerprint::from_bytes(&bytes).unwrap().as_str(), V4);
        assert!(Fingerprint::from_bytes(&bytes[..19]).is_err());
    }

    #[test]
    fn serde_as_a_validated_string() {
        let f = Fingerprint::parse(V4).unwrap();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, format!("\"{V4}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), f);
        let lower = format!("\"{}\"", V4.to_lowercase());
        assert_eq!(serde_json::from_str::<Fingerprint>(&lower).unwrap(), f);
        assert!(serde_json::from_str::<Fingerprint>("\"AB\"").is_err());
        assert!(serde_json::from_str::<Fingerprint>("17").is_err());
        let id = f.key_id();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }
}
