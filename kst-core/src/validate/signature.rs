//! What counts as a valid self-signature: issuer, creation and expiration times, the
//! cryptographic check, and the hash.

use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::Signature;

use super::KeyPolicy;

/// Outcome of checking one signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    Valid,
    /// It verifies, but its hash is not acceptable for its kind.
    WeakHash(HashAlgorithm),
    /// It verifies, but it is dated later than now plus the allowed clock skew (the signer's
    /// clock runs ahead): its creation time, seconds since the Unix epoch.
    Future(u32),
    Invalid,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum HashClass {
    Strong,
    Sha1Like,
    Broken,
}

fn hash_class(h: HashAlgorithm) -> HashClass {
    match h {
        HashAlgorithm::Sha224
        | HashAlgorithm::Sha256
        | HashAlgorithm::Sha384
        | HashAlgorithm::Sha512
        | HashAlgorithm::Sha3_256
        | HashAlgorithm::Sha3_512 => HashClass::Strong,
        HashAlgorithm::Sha1 | HashAlgorithm::Ripemd160 => HashClass::Sha1Like,
        _ => HashClass::Broken,
    }
}

/// Checks everything about `sig` but the signature type (the caller dispatches on it).
pub(super) struct Checker<'a> {
    pub(super) policy: &'a KeyPolicy,
    pub(super) now: u64,
    pub(super) verifications: &'a mut usize,
}

impl Checker<'_> {
    pub(super) fn check(
        &mut self,
        sig: &Signature,
        bound_key_created: u32,
        revocation: bool,
        verify: impl FnOnce(&Signature) -> pgp::errors::Result<()>,
    ) -> Check {
        let Some(created) = sig.created().map(|t| u64::from(t.as_secs())) else {
            return Check::Invalid;
        };
        if created < u64::from(bound_key_created) {
            return Check::Invalid;
        }
        if created > self.now.saturating_add(self.policy.clock_skew_secs) {
            // Never valid; verified only to tell a signer whose clock runs ahead what is wrong
            // (a forged future-dated signature stays Invalid).
            *self.verifications += 1;
            return match (u32::try_from(created), verify(sig)) {
                (Ok(at), Ok(())) => Check::Future(at),
                _ => Check::Invalid,
            };
        }
        if let Some(d) = sig.signature_expiration_time() {
            let d = u64::from(d.as_secs());
            if d != 0 && created + d <= self.now {
                return Check::Invalid;
            }
        }
        let Some(hash) = sig.hash_alg() else {
            return Check::Invalid;
        };
        *self.verifications += 1;
        if verify(sig).is_err() {
            return Check::Invalid;
        }
        match hash_class(hash) {
            HashClass::Strong => Check::Valid,
            HashClass::Sha1Like if revocation || self.policy.allow_sha1_bindings => Check::Valid,
            HashClass::Sha1Like | HashClass::Broken => Check::WeakHash(hash),
        }
    }
}
