//! Steps 1 and 2 on the armored text: the size cap and secret-key armor, then dearmoring.

use std::io::{BufReader, Read};

use pgp::armor::{BlockType, Dearmor, DearmorOptions};

use super::{KeyPolicy, KeyRejection};

/// Armor lines that open a secret key block (current and historical spellings).
const SECRET_ARMOR: [&str; 2] = [
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
    "-----BEGIN PGP SECRET KEY BLOCK-----",
];

pub(super) fn dearmor(armored: &str, policy: &KeyPolicy) -> Result<Vec<u8>, KeyRejection> {
    if armored.len() > policy.max_key_bytes {
        return Err(KeyRejection::TooLarge {
            limit: policy.max_key_bytes,
        });
    }
    if SECRET_ARMOR.iter().any(|s| armored.contains(s)) {
        return Err(KeyRejection::SecretKey);
    }
    let mut dearmor = Dearmor::with_options(
        BufReader::new(armored.as_bytes()),
        DearmorOptions::new().set_limit(policy.max_key_bytes),
    );
    let mut bytes = Vec::new();
    dearmor
        .read_to_end(&mut bytes)
        .map_err(|e| KeyRejection::Malformed(format!("armor: {e}")))?;
    match dearmor.typ {
        Some(BlockType::PublicKey) => Ok(bytes),
        Some(BlockType::PrivateKey) => Err(KeyRejection::SecretKey),
        Some(other) => Err(KeyRejection::Malformed(format!(
            "the armor holds a {other} block, not a public key"
        ))),
        None => Err(KeyRejection::Malformed("no armor header".into())),
    }
}
