//! OpenPGP key blocks: dearmoring what a requester sent, armoring what a reply carries.
//!
//! Built on rPGP (`pgp`). The HMAC of a reply covers the binary packets that this module
//! produces, so armoring and dearmoring must round-trip exactly.

use std::io::{BufReader, Read};

use pgp::armor::{BlockType, Dearmor, DearmorOptions};
use pgp::composed::{Deserializable, SignedPublicKey, SignedSecretKey};
use pgp::ser::Serialize;
use pgp::types::KeyDetails;

/// A public key (certificate) read from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The certificate as binary OpenPGP packets, re-serialized by rPGP (only packets it
    /// understood; armor headers and checksum gone).
    pub packets: Vec<u8>,
    /// Primary key fingerprint, uppercase hex.
    pub fingerprint: String,
    /// User IDs as UTF-8 text (undecodable ones skipped).
    pub user_ids: Vec<String>,
}

/// Why a key block was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text holds a secret key.
    #[error("the block holds a secret key")]
    SecretKey,
    /// The armored block is larger than allowed.
    #[error("the key block is larger than {0} bytes")]
    TooLarge(usize),
    /// Armor or packets could not be read.
    #[error("the key block is not a readable OpenPGP public key: {0}")]
    Malformed(String),
    /// Zero or several certificates.
    #[error("expected exactly one certificate, found {0}")]
    NotOneCertificate(usize),
}

/// Dearmors and parses an ASCII-armored public key block of at most `max_bytes` bytes.
pub fn parse_armored(armored: &str, max_bytes: usize) -> Result<PublicKey, KeyError> {
    if armored.len() > max_bytes {
        return Err(KeyError::TooLarge(max_bytes));
    }
    let mut dearmor = Dearmor::with_options(
        BufReader::new(armored.as_bytes()),
        DearmorOptions::new().set_limit(max_bytes),
    );
    let mut bytes = Vec::new();
    dearmor
        .read_to_end(&mut bytes)
        .map_err(|e| KeyError::Malformed(format!("armor: {e}")))?;
    match dearmor.typ {
        Some(BlockType::PublicKey) => {}
        Some(BlockType::PrivateKey) => return Err(KeyError::SecretKey),
        Some(other) => {
            return Err(KeyError::Malformed(format!(
                "armor holds a {other:?} block, not a public key"
            )));
        }
        None => return Err(KeyError::Malformed("no armor header".into())),
    }
    parse_binary(&bytes)
}

/// Parses binary OpenPGP packets holding exactly one public certificate.
pub fn parse_binary(bytes: &[u8]) -> Result<PublicKey, KeyError> {
    if SignedSecretKey::from_bytes(bytes).is_ok() {
        return Err(KeyError::SecretKey);
    }
    let certs: Vec<SignedPublicKey> = SignedPublicKey::from_bytes_many(bytes)
        .map_err(|e| KeyError::Malformed(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    if certs.len() != 1 {
        return Err(KeyError::NotOneCertificate(certs.len()));
    }
    let cert = &certs[0];
    let packets = cert
        .to_bytes()
        .map_err(|e| KeyError::Malformed(format!("re-serializing: {e}")))?;
    Ok(PublicKey {
        packets,
        fingerprint: format!("{:X}", cert.fingerprint()),
        user_ids: cert
            .details
            .users
            .iter()
            .filter_map(|u| u.id.as_str().map(str::to_string))
            .collect(),
    })
}

/// Raw packets handed to rPGP's armor writer as they are.
struct RawPackets<'a>(&'a [u8]);

impl Serialize for RawPackets<'_> {
    fn to_writer<W: std::io::Write>(&self, w: &mut W) -> pgp::errors::Result<()> {
        w.write_all(self.0)?;
        Ok(())
    }
    fn write_len(&self) -> usize {
        self.0.len()
    }
}

/// ASCII-armors binary packets as a `PGP PUBLIC KEY BLOCK` (LF line endings, with CRC).
/// Dearmoring the result gives back exactly `packets`.
pub fn armor_public_key(packets: &[u8]) -> String {
    let mut out = Vec::with_capacity(packets.len() * 4 / 3 + 128);
    pgp::armor::write(
        &RawPackets(packets),
        BlockType::PublicKey,
        &mut out,
        None,
        true,
    )
    .expect("writing armor into a Vec cannot fail");
    String::from_utf8(out).expect("armor is ASCII")
}

/// The packets of `bytes` by their headers alone (RFC 9580 section 4.2, both header formats):
/// each packet's tag and body, in order, without reading any body. `None` unless the headers
/// frame `bytes` exactly: a header or body that runs past the end, a partial or indeterminate
/// length (never used by key packets), or a byte that is no packet header. Cheap (no key
/// material is decoded): for bytes kst wrote itself, such as a stored certificate.
pub fn packet_bodies(bytes: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((&first, after)) = rest.split_first() {
        if first & 0x80 == 0 {
            return None;
        }
        let (tag, len, after) = if first & 0x40 != 0 {
            // New format: the tag in the low six bits, then a one-, two- or five-octet length.
            let (&o1, after) = after.split_first()?;
            match o1 {
                0..=191 => (first & 0x3f, usize::from(o1), after),
                192..=223 => {
                    let (&o2, after) = after.split_first()?;
                    let len = ((usize::from(o1) - 192) << 8) + usize::from(o2) + 192;
                    (first & 0x3f, len, after)
                }
                255 => {
                    let (len, after) = after.split_first_chunk::<4>()?;
                    (
                        first & 0x3f,
                        usize::try_from(u32::from_be_bytes(*len)).ok()?,
                        after,
                    )
                }
                _ => return None, // partial body length
            }
        } else {
            // Old format: the tag in bits 5..2, the length type in bits 1..0.
            let tag = (first >> 2) & 0x0f;
            match first & 0x03 {
                0 => {
                    let (&len, after) = after.split_first()?;
                    (tag, usize::from(len), after)
                }
                1 => {
                    let (len, after) = after.split_first_chunk::<2>()?;
                    (tag, usize::from(u16::from_be_bytes(*len)), after)
                }
                2 => {
                    let (len, after) = after.split_first_chunk::<4>()?;
                    (tag, usize::try_from(u32::from_be_bytes(*len)).ok()?, after)
                }
                _ => return None, // indeterminate length
            }
        };
        if len > after.len() {
            return None;
        }
        let (body, next) = after.split_at(len);
        out.push((tag, body));
        rest = next;
    }
    Some(out)
}

/// Dearmors a public key block without parsing the packets (the client verifies the HMAC over
/// exactly these bytes before trusting anything else).
pub fn dearmor_public_key(armored: &str, max_bytes: usize) -> Result<Vec<u8>, KeyError> {
    if armored.len() > max_bytes {
        return Err(KeyError::TooLarge(max_bytes));
    }
    let mut dearmor = Dearmor::with_options(
        BufReader::new(armored.as_bytes()),
        DearmorOptions::new().set_limit(max_bytes),
    );
    let mut bytes = Vec::new();
    dearmor
        .read_to_end(&mut bytes)
        .map_err(|e| KeyError::Malformed(format!("armor: {e}")))?;
    match dearmor.typ {
        Some(BlockType::PublicKey) => Ok(bytes),
        Some(BlockType::PrivateKey) => Err(KeyError::SecretKey),
        _ => Err(KeyError::Malformed("not a public key block".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armor_round_trips_arbitrary_bytes() {
        for len in [0usize, 1, 47, 48, 49, 1000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let armored = armor_public_key(&bytes);
            assert!(armored.starts_with(crate::protocol::PUBLIC_KEY_BEGIN));
            assert_eq!(dearmor_public_key(&armored, 1 << 20).unwrap(), bytes);
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            parse_armored("hello", 1000),
            Err(KeyError::Malformed(_))
        ));
        let fake = armor_public_key(b"\x99\x00\x01\x04garbage");
        assert!(parse_armored(&fake, 1 << 20).is_err());
        assert_eq!(parse_armored(&fake, 10), Err(KeyError::TooLarge(10)));
    }
}
