//! [`KeyPolicy`]: the limits and switches of the key policy, with their defaults.

use crate::address::AddressPolicy;

/// Default [`KeyPolicy::max_key_bytes`]: 1 MiB of armored text (keys.openpgp.org's cap).
pub const DEFAULT_MAX_KEY_BYTES: usize = 1 << 20;
/// Default [`KeyPolicy::max_published_bytes`]: 64 KiB of binary packets after the reduction.
pub const DEFAULT_MAX_PUBLISHED_BYTES: usize = 64 << 10;
/// Default [`KeyPolicy::max_packets`].
pub const DEFAULT_MAX_PACKETS: usize = 20_000;
/// Default [`KeyPolicy::max_self_signatures`].
pub const DEFAULT_MAX_SELF_SIGNATURES: usize = 256;
/// Default [`KeyPolicy::min_rsa_bits`].
pub const DEFAULT_MIN_RSA_BITS: u32 = 2048;
/// Default [`KeyPolicy::clock_skew_secs`]: 15 minutes.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 900;

/// What kst accepts as a publishable key. See the [module documentation](super) for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// Longest armored key block accepted, in bytes. Default [`DEFAULT_MAX_KEY_BYTES`].
    pub max_key_bytes: usize,
    /// Largest certificate kst publishes, in bytes of binary OpenPGP packets, measured after
    /// the reduction (only the newest self-signature per User ID, per subkey and on the
    /// primary key, plus revocations). A retrieval reply carries the certificate armored, so
    /// this budget bounds how much one small request can make kst send. Default
    /// [`DEFAULT_MAX_PUBLISHED_BYTES`].
    pub max_published_bytes: usize,
    /// Most OpenPGP packets read from one key block. Default [`DEFAULT_MAX_PACKETS`].
    pub max_packets: usize,
    /// Most signatures that claim the primary key as issuer (or claim none) on the primary
    /// key, User IDs and subkeys: each may cost a verification. Default
    /// [`DEFAULT_MAX_SELF_SIGNATURES`].
    pub max_self_signatures: usize,
    /// Smallest RSA modulus accepted, in bits. Default [`DEFAULT_MIN_RSA_BITS`].
    pub min_rsa_bits: u32,
    /// Accept SHA-1 (and RIPEMD-160) in self-certifications, direct-key and subkey binding
    /// signatures. Default false. Revocations may always use them.
    pub allow_sha1_bindings: bool,
    /// How far in the future a signature's creation time may be (the sender's clock may run
    /// ahead). Default [`DEFAULT_CLOCK_SKEW_SECS`].
    pub clock_skew_secs: u64,
    /// How User ID addresses are normalized before comparing them with the account; should be
    /// the service's own [`Policy::address_policy`](crate::Policy). Default: case-insensitive
    /// local part, no subaddress folding.
    pub address_policy: AddressPolicy,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_published_bytes: DEFAULT_MAX_PUBLISHED_BYTES,
            max_packets: DEFAULT_MAX_PACKETS,
            max_self_signatures: DEFAULT_MAX_SELF_SIGNATURES,
            min_rsa_bits: DEFAULT_MIN_RSA_BITS,
            allow_sha1_bindings: false,
            clock_skew_secs: DEFAULT_CLOCK_SKEW_SECS,
            address_policy: AddressPolicy::default(),
        }
    }
}
