//! OpenPGP keys made in-process with rPGP: the shape `gpg --quick-gen-key ADDRESS` makes.

use pgp::composed::{
    EncryptionCaps, KeyType, SecretKeyParamsBuilder, SignedSecretKey, SubkeyParamsBuilder,
};
use pgp::crypto::ecc_curve::ECCCurve;

/// A fresh v4 key: an Ed25519 primary key (certify, sign) with a Curve25519 encryption subkey
/// and the one User ID `user_id`, no passphrase. GnuPG 2.2 reads and encrypts to it. The error
/// is rPGP's, for a "cannot generate" message.
pub fn ed25519_cv25519(user_id: &str) -> Result<SignedSecretKey, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut encrypt = SubkeyParamsBuilder::default();
    encrypt
        .key_type(KeyType::ECDH(ECCCurve::Curve25519Legacy))
        .can_sign(false)
        .can_encrypt(EncryptionCaps::All)
        .can_authenticate(false);
    let mut params = SecretKeyParamsBuilder::default();
    params
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .can_encrypt(EncryptionCaps::None)
        .primary_user_id(user_id.to_string())
        .subkeys(vec![encrypt.build().map_err(|e| err(&e))?]);
    params
        .build()
        .map_err(|e| err(&e))?
        .generate(rand08::thread_rng())
        .map_err(|e| err(&e))
}
