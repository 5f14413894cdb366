//! The directory's VRF key.
//!
//! akd_core implements ECVRF-EDWARDS25519-SHA512-TAI of RFC 9381 (its tests carry the RFC's
//! section B.3 vectors); the secret is an Ed25519 secret key's 32 bytes. The key is fixed for
//! the life of a directory: changing it moves every position in the tree.

use akd::ecvrf::{VRFKeyStorage, VRFPrivateKey, VRFPublicKey, VrfError};
use zeroize::Zeroizing;

use super::{Result, TransparencyError};

/// A domain directory's VRF secret key (wiped from memory when dropped).
#[derive(Clone)]
pub struct VrfSecret(std::sync::Arc<Zeroizing<[u8; 32]>>);

impl std::fmt::Debug for VrfSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VrfSecret(..)")
    }
}

impl VrfSecret {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::fill(&mut bytes[..]);
        VrfSecret(std::sync::Arc::new(bytes))
    }

    /// The key with these secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        VrfSecret(std::sync::Arc::new(Zeroizing::new(bytes)))
    }

    /// The secret bytes (for writing the key file).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(**self.0)
    }

    /// The public key that clients verify VRF proofs with (published with the head key).
    pub fn public_key(&self) -> Result<[u8; 32]> {
        let private = VRFPrivateKey::try_from(&self.0[..])
            .map_err(|e| TransparencyError::Signature(format!("VRF key: {e}")))?;
        let public = VRFPublicKey::from(&private);
        let mut out = [0u8; 32];
        out.copy_from_slice(public.as_bytes());
        Ok(out)
    }
}

#[async_trait::async_trait]
impl VRFKeyStorage for VrfSecret {
    async fn retrieve(&self) -> std::result::Result<Vec<u8>, VrfError> {
        Ok(self.0.to_vec())
    }
}
