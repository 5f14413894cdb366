//! Steps 5 and 8: which public-key algorithms and sizes are accepted, for the primary key and
//! live subkeys.

use pgp::ser::Serialize;
use pgp::types::{
    EcdhPublicParams, EcdsaPublicParams, EddsaLegacyPublicParams, KeyDetails, KeyVersion,
    PublicParams,
};

use super::KeyPolicy;

/// Why a key's algorithm is not accepted, if it is not.
pub(super) fn key_weakness(key: &impl KeyDetails, policy: &KeyPolicy) -> Option<String> {
    if !matches!(key.version(), KeyVersion::V4 | KeyVersion::V6) {
        return Some(format!("a version {} key format", u8::from(key.version())));
    }
    match key.public_params() {
        PublicParams::RSA(_) => {
            let bits = rsa_bits(key.public_params());
            (bits < policy.min_rsa_bits).then(|| {
                format!(
                    "RSA with {bits} bits (at least {} are required)",
                    policy.min_rsa_bits
                )
            })
        }
        PublicParams::DSA(_) => Some("DSA".into()),
        PublicParams::Elgamal(_) => Some("ElGamal".into()),
        PublicParams::ECDSA(EcdsaPublicParams::Unsupported { curve, .. })
        | PublicParams::ECDH(EcdhPublicParams::Unsupported { curve, .. })
        | PublicParams::EdDSALegacy(EddsaLegacyPublicParams::Unsupported { curve, .. }) => {
            Some(format!("an unsupported elliptic curve ({})", curve.name()))
        }
        PublicParams::Unknown { .. } => Some(format!(
            "an unknown public-key algorithm ({})",
            u8::from(key.algorithm())
        )),
        _ => None,
    }
}

/// The RSA modulus size, read from the first MPI of the serialized public parameters.
fn rsa_bits(params: &PublicParams) -> u32 {
    match params.to_bytes() {
        Ok(b) if b.len() >= 2 => u32::from(u16::from_be_bytes([b[0], b[1]])),
        _ => 0,
    }
}
