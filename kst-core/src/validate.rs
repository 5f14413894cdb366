//! Key policy: what kst accepts, and what it keeps, when a user publishes an OpenPGP key.
//!
//! [`validate`] takes the armored block a user sent, the address their provider authenticated
//! and a [`KeyPolicy`], and returns either a [`ValidKey`] (the certificate reduced to what kst
//! publishes) or a [`KeyRejection`] whose message tells the user what to do.
//!
//! # Refused
//!
//! The first failing rule is reported; they are checked roughly in this order.
//!
//! 1. **Size**: the armored text is longer than [`KeyPolicy::max_key_bytes`] (default 1 MiB, the
//!    cap of keys.openpgp.org), or holds more than [`KeyPolicy::max_packets`] packets (default
//!    20 000; a genuine 1 MiB key holds well under 10 000).
//! 2. **Secret key**: any `PRIVATE`/`SECRET KEY BLOCK` armor line anywhere in the text, or any
//!    Secret-Key or Secret-Subkey packet (tag 5 or 7) inside a public key armor, readable or not.
//!    The message tells the user that the key has left their machine and should be revoked.
//! 3. **Shape**: armor or packets that cannot be read; a packet of an OpenPGP *message*
//!    (literal, compressed or encrypted data, session keys, one-pass signatures, MDC); not
//!    exactly one certificate (one Public-Key packet); a primary key rPGP cannot read.
//! 4. **Self-signature flood**: more than [`KeyPolicy::max_self_signatures`] (default 256)
//!    signatures that name the primary key as issuer (or name no issuer) on the primary key,
//!    its User IDs and its subkeys. This bounds the cryptographic work (at most that many
//!    verifications); third-party signatures never count, and neither do signatures on user
//!    attributes, which are dropped unread.
//! 5. **Weak primary key** (unless the key is revoked): version 2/3 keys; RSA (algorithms 1, 2,
//!    3) with a modulus under [`KeyPolicy::min_rsa_bits`] (default 2048); DSA (17); ElGamal (16,
//!    20); an algorithm or elliptic curve rPGP does not know (unknown/private algorithm ids,
//!    unknown curve OIDs, ECDSA on brainpool curves, which rPGP cannot verify). Accepted: RSA ≥
//!    the minimum, EdDSA (Ed25519 legacy, RFC 9580 Ed25519/Ed448), ECDSA on NIST P-256/384/521
//!    and secp256k1, ECDH on Curve25519, NIST and brainpool curves, X25519/X448.
//! 6. **User ID**: no User ID whose address equals the authenticated account. The address of a
//!    User ID is the part inside the last `<...>` when it ends with `>`, else the whole User ID
//!    (a bare `alice@example.net`); both sides are normalized with [`KeyPolicy::address_policy`].
//!    Reported distinctly ([`KeyRejection::NoMatchingUserId`]) so that a later revocation-only
//!    upload can be recognised. Then the matching User ID must carry a valid self-certification
//!    (types 0x10–0x13, issued and verified by the primary key); otherwise
//!    [`KeyRejection::WeakSelfSignatureHash`] when its only verifying self-certifications use a
//!    weak hash, [`KeyRejection::UserIdRevoked`] when it is revoked (a verified 0x30 newer than
//!    its newest certification; ignored when the key itself is revoked),
//!    [`KeyRejection::NoValidSelfSignature`] when nothing on the key verifies at all (no
//!    direct-key signature, no self-certification on any User ID), else
//!    [`KeyRejection::UserIdNotSelfSigned`].
//! 7. **Expired** (unless revoked): the key expiration time of the newest valid direct-key
//!    signature (0x1F) or self-certification of the kept User ID, added to the key's creation
//!    time, is not after `now`.
//! 8. **Weak live subkey** (unless the key or that subkey is revoked): a subkey that is kept
//!    (see below) and not revoked fails the algorithm rule of 5.
//!
//! # What counts as a valid signature
//!
//! A signature that names the primary key as issuer (Issuer or Issuer Fingerprint subpacket,
//! hashed or not; a signature naming no issuer at all is also tried) and is of the right type for
//! where it sits, has a creation time no earlier than the creation of the key it binds and no
//! later than `now` + [`KeyPolicy::clock_skew_secs`] (default 15 minutes), has not passed its
//! signature expiration time, verifies cryptographically with the primary key, and uses an
//! acceptable hash:
//! - binding signatures (self-certifications, direct-key, subkey binding): SHA-224, SHA-256,
//!   SHA-384, SHA-512, SHA3-256, SHA3-512; SHA-1 and RIPEMD-160 only with
//!   [`KeyPolicy::allow_sha1_bindings`]; never MD5 or unknown hashes;
//! - revocations (0x20, 0x28, 0x30): the same, plus SHA-1 and RIPEMD-160 always (a forged
//!   revocation only disables a key; refusing a genuine old revocation would hide it).
//!
//! A key with old SHA-1 self-signatures and a newer SHA-256 one is accepted; the SHA-1 ones are
//! dropped. Signatures issued by other keys are **never verified**: they are dropped as soon as
//! their issuer is read, so a flooded key costs one parse plus one verification per
//! self-signature.
//!
//! # Kept (the published certificate, re-serialized by rPGP in this order)
//!
//! - the primary key, its valid key revocations (0x20) and valid direct-key signatures (0x1F);
//! - ONE User ID: the matching one whose newest valid self-certification is flagged primary, or
//!   else is newest; with its valid self-certifications and valid self-revocations (0x30);
//! - each subkey with a valid binding signature (0x18) whose newest valid binding does not give
//!   an expiration at or before `now`, with its valid bindings (embedded primary-key binding
//!   "back" signatures kept as they are, not checked) and valid subkey revocations (0x28);
//!   a revoked subkey is kept so that clients learn of the revocation;
//! - in every kept signature, the unhashed area keeps only Issuer, Issuer Fingerprint and
//!   Embedded Signature subpackets (anything else there is unauthenticated and could be grown by
//!   anyone).
//!
//! # Stripped (listed in [`ValidKey::stripped`])
//!
//! Every other User ID (with all its signatures); User Attributes (photo IDs); every third-party
//! signature, including third-party certifications (the SKS keyserver flooding attack,
//! CVE-2019-13050) and revocations by designated revokers (they cannot be checked without the
//! revoker's key); self-signatures that fail the rules above; signatures of a type that does not
//! belong where they sit; subkeys without a valid binding, expired subkeys; unreadable packets
//! of unknown or unsupported kinds; trust, marker and padding packets.
//!
//! A revoked key (a valid 0x20) is accepted with [`ValidKey::revoked`] set, whatever its
//! expiration and algorithms, so that a revocation can be published and reach clients. It still
//! needs the matching, self-certified User ID.
//!
//! Validation is a pure function of its inputs: publishing the result again gives the same
//! packets ([`validate`] is idempotent), and the primary key packet is kept as sent, so the
//! fingerprint does not change.

use std::io::{BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{SystemTime, UNIX_EPOCH};

use pgp::armor::{BlockType, Dearmor, DearmorOptions};
use pgp::crypto::hash::HashAlgorithm;
use pgp::errors::Error as PgpError;
use pgp::packet::{
    Packet, PacketParser, PacketTrait, PublicKey, PublicSubkey, Signature, SignatureType,
    SubpacketData, UserId,
};
use pgp::ser::Serialize;
use pgp::types::{
    EcdhPublicParams, EcdsaPublicParams, EddsaLegacyPublicParams, Fingerprint, KeyDetails, KeyId,
    KeyVersion, PublicParams, Tag,
};

use crate::address::{Address, AddressPolicy};
use crate::protocol::Reason;

/// Default [`KeyPolicy::max_key_bytes`]: 1 MiB of armored text (keys.openpgp.org's cap).
pub const DEFAULT_MAX_KEY_BYTES: usize = 1 << 20;
/// Default [`KeyPolicy::max_packets`].
pub const DEFAULT_MAX_PACKETS: usize = 20_000;
/// Default [`KeyPolicy::max_self_signatures`].
pub const DEFAULT_MAX_SELF_SIGNATURES: usize = 256;
/// Default [`KeyPolicy::min_rsa_bits`].
pub const DEFAULT_MIN_RSA_BITS: u32 = 2048;
/// Default [`KeyPolicy::clock_skew_secs`]: 15 minutes.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 900;

/// How many other User ID addresses a [`KeyRejection::NoMatchingUserId`] lists at most.
const MAX_LISTED_ADDRESSES: usize = 5;

/// What kst accepts as a publishable key. See the [module documentation](self) for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// Longest armored key block accepted, in bytes. Default [`DEFAULT_MAX_KEY_BYTES`].
    pub max_key_bytes: usize,
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
            max_packets: DEFAULT_MAX_PACKETS,
            max_self_signatures: DEFAULT_MAX_SELF_SIGNATURES,
            min_rsa_bits: DEFAULT_MIN_RSA_BITS,
            allow_sha1_bindings: false,
            clock_skew_secs: DEFAULT_CLOCK_SKEW_SECS,
            address_policy: AddressPolicy::default(),
        }
    }
}

/// A key that passed the policy, reduced to what kst publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidKey {
    /// The published certificate as binary OpenPGP packets (armor with
    /// [`armor_public_key`](crate::openpgp::armor_public_key)).
    pub packets: Vec<u8>,
    /// Primary key fingerprint, uppercase hex.
    pub fingerprint: String,
    /// The kept User ID, as in the key (UTF-8, but otherwise whatever the key holder wrote:
    /// escape it before putting it in a header).
    pub user_id: String,
    /// A verified key revocation signature is present: clients must not use the key.
    pub revoked: bool,
    /// When the key expires (seconds since the Unix epoch), if it does.
    pub expires_at: Option<u64>,
    /// What was removed, for the confirmation (e.g. `"2 other User IDs"`,
    /// `"41 third-party certifications"`). Empty when nothing was.
    pub stripped: Vec<String>,
}

/// Why a key was refused. Each message says what the user can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRejection {
    /// The armored block is longer than the cap.
    #[error(
        "the key block is larger than {limit} bytes; export it without third-party signatures \
         (gpg --export-options export-minimal --armor --export YOUR-ADDRESS) and send it again"
    )]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// More packets than the cap.
    #[error(
        "the key block holds more than {limit} OpenPGP packets; export it without third-party \
         signatures (gpg --export-options export-minimal --armor --export YOUR-ADDRESS) and send it again"
    )]
    TooManyPackets {
        /// The cap.
        limit: usize,
    },
    /// A secret key was sent.
    #[error(
        "the message contains a SECRET (private) key. It was not stored. Your secret key has \
         left your computer and must be considered compromised: revoke it, create a new key, \
         and send only the public key (gpg --armor --export YOUR-ADDRESS)"
    )]
    SecretKey,
    /// Armor or packets could not be read, or the block is not a key.
    #[error(
        "the key block is not a readable OpenPGP public key ({0}); send the output of \
         gpg --armor --export YOUR-ADDRESS"
    )]
    Malformed(String),
    /// No public key in the block.
    #[error(
        "the block holds no public key. If you sent a revocation certificate, import it into \
         your key first (gpg --import FILE) and then send the key (gpg --armor --export YOUR-ADDRESS)"
    )]
    NoCertificate,
    /// Several public keys in the block.
    #[error("the block holds {0} public keys; send exactly one (gpg --armor --export FINGERPRINT)")]
    SeveralCertificates(usize),
    /// Too many signatures claim to be self-signatures.
    #[error(
        "the key carries more than {limit} signatures that claim to be its own \
         self-signatures; clean it (gpg --edit-key FINGERPRINT clean save) and send it again"
    )]
    TooManySelfSignatures {
        /// The cap.
        limit: usize,
    },
    /// The primary key uses an algorithm or size kst does not accept.
    #[error(
        "the primary key uses {algorithm}, which is no longer safe; create a new key \
         (gpg --quick-gen-key YOUR-ADDRESS future-default) and publish that one"
    )]
    WeakPrimaryKey {
        /// What is weak, e.g. "RSA with 1024 bits (at least 2048 required)".
        algorithm: String,
    },
    /// A live subkey uses an algorithm or size kst does not accept.
    #[error(
        "the subkey {fingerprint} uses {algorithm}, which is no longer safe; revoke or delete \
         that subkey (gpg --edit-key), add a new one (gpg --quick-add-key) and send the key again"
    )]
    WeakSubkey {
        /// The subkey's fingerprint, uppercase hex.
        fingerprint: String,
        /// What is weak.
        algorithm: String,
    },
    /// No User ID holds the authenticated address.
    #[error("{}", no_matching_message(account, found))]
    NoMatchingUserId {
        /// The authenticated account.
        account: Address,
        /// Addresses the key's User IDs do hold (a few, normalized).
        found: Vec<Address>,
    },
    /// The matching User ID is not certified by the key itself.
    #[error(
        "the User ID with {account} is not signed by the key itself (no valid self-signature); \
         add it with gpg --quick-add-uid FINGERPRINT {account} and send the key again"
    )]
    UserIdNotSelfSigned {
        /// The authenticated account.
        account: Address,
    },
    /// No self-signature on the key verifies.
    #[error(
        "no self-signature on the key verifies: the key is damaged or was altered; send the \
         output of gpg --armor --export YOUR-ADDRESS from the computer that holds the secret key"
    )]
    NoValidSelfSignature,
    /// The matching User ID's self-signatures use a weak hash.
    #[error(
        "the User ID's self-signature uses the {hash} hash, which is no longer safe; renew it \
         with gpg --cert-digest-algo SHA256 --quick-set-expire FINGERPRINT 2y '*' and send the \
         key again"
    )]
    WeakSelfSignatureHash {
        /// The hash algorithm, e.g. "SHA1".
        hash: String,
    },
    /// The matching User ID was revoked by the key holder.
    #[error(
        "the User ID with {account} has been revoked on this key; to stop publishing a key, \
         send a deletion request instead"
    )]
    UserIdRevoked {
        /// The authenticated account.
        account: Address,
    },
    /// The key has expired.
    #[error(
        "the key expired on {}; extend it (gpg --quick-set-expire FINGERPRINT 2y '*') and send \
         it again",
        format_utc(*at)
    )]
    Expired {
        /// When it expired, seconds since the Unix epoch.
        at: u64,
    },
}

fn no_matching_message(account: &Address, found: &[Address]) -> String {
    let mut m = format!("no User ID of the key holds your address {account}");
    if found.is_empty() {
        m.push_str(" (the key has no User ID with an address)");
    } else {
        let list: Vec<&str> = found.iter().map(Address::as_str).collect();
        m.push_str(&format!(" (it holds: {})", list.join(", ")));
    }
    m.push_str(&format!(
        "; add it with gpg --quick-add-uid FINGERPRINT {account} and send the key again"
    ));
    m
}

impl KeyRejection {
    /// The protocol reason carried by the refusal reply: a token a client can act on (see
    /// `docs/PROTOCOL.md`); the message itself says more.
    pub fn reason(&self) -> Reason {
        match self {
            KeyRejection::SecretKey => Reason::SecretKey,
            KeyRejection::TooLarge { .. }
            | KeyRejection::TooManyPackets { .. }
            | KeyRejection::TooManySelfSignatures { .. } => Reason::KeyTooLarge,
            KeyRejection::Malformed(_) | KeyRejection::NoCertificate => Reason::BadKey,
            KeyRejection::SeveralCertificates(_) => Reason::SeveralKeys,
            KeyRejection::WeakPrimaryKey { .. }
            | KeyRejection::WeakSubkey { .. }
            | KeyRejection::WeakSelfSignatureHash { .. } => Reason::WeakAlgorithm,
            KeyRejection::NoMatchingUserId { .. } => Reason::NoMatchingUserId,
            KeyRejection::UserIdRevoked { .. } => Reason::UserIdRevoked,
            KeyRejection::UserIdNotSelfSigned { .. } | KeyRejection::NoValidSelfSignature => {
                Reason::BadSelfSignature
            }
            KeyRejection::Expired { .. } => Reason::KeyExpired,
        }
    }
}

/// Applies the key policy to an armored key block published for `account` at time `now`.
///
/// Never panics on any input (a panic inside the OpenPGP library is caught and reported as
/// [`KeyRejection::Malformed`]). See the [module documentation](self) for the rules.
pub fn validate(
    armored: &str,
    account: &Address,
    policy: &KeyPolicy,
    now: SystemTime,
) -> Result<ValidKey, KeyRejection> {
    validate_counting(armored, account, policy, now).0
}

/// [`validate`], also returning how many signatures were verified cryptographically.
fn validate_counting(
    armored: &str,
    account: &Address,
    policy: &KeyPolicy,
    now: SystemTime,
) -> (Result<ValidKey, KeyRejection>, usize) {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut verifications = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let bytes = dearmor(armored, policy)?;
        let collected = collect(&bytes, account, policy)?;
        evaluate(collected, account, policy, now, &mut verifications)
    }))
    .unwrap_or_else(|_| {
        Err(KeyRejection::Malformed(
            "the OpenPGP library failed on it".into(),
        ))
    });
    (result, verifications)
}

/// Armor lines that open a secret key block (current and historical spellings).
const SECRET_ARMOR: [&str; 2] = [
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
    "-----BEGIN PGP SECRET KEY BLOCK-----",
];

fn dearmor(armored: &str, policy: &KeyPolicy) -> Result<Vec<u8>, KeyRejection> {
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

/// A packet with the signatures that follow it.
struct Component<T> {
    packet: T,
    sigs: Vec<Signature>,
}

/// Counts of what was dropped, for [`ValidKey::stripped`].
#[derive(Default)]
struct Dropped {
    other_uids: usize,
    user_attributes: usize,
    third_party: usize,
    bad_self_sigs: usize,
    misplaced_sigs: usize,
    unreadable: usize,
    other_packets: usize,
    subkeys: Vec<String>,
    unhashed_subpackets: usize,
}

/// The first certificate of a block, with third-party signatures already dropped.
struct Collected {
    primary: PublicKey,
    fingerprint: Fingerprint,
    /// Revocations, direct-key and any other signature right after the primary key.
    direct: Vec<Signature>,
    /// User IDs whose address is the account.
    uids: Vec<Component<UserId>>,
    /// Other User IDs (only their self-signature candidates are kept, to tell a key with no
    /// valid self-signature from one whose matching User ID is unsigned).
    other_uids: Vec<Component<UserId>>,
    /// Normalized addresses of other User IDs (a few, deduplicated).
    other_addresses: Vec<Address>,
    subkeys: Vec<Component<PublicSubkey>>,
    dropped: Dropped,
}

/// Where the next signature belongs.
#[derive(Clone, Copy)]
enum Slot {
    /// Before any key packet.
    Start,
    Primary,
    Uid(usize),
    OtherUid(usize),
    Subkey(usize),
    /// A dropped component (user attribute, unreadable packet): its signatures go too.
    Dropped,
    /// Inside a second or later certificate: only scanned for secret keys and counted.
    OtherCertificate,
}

/// Is `e` a packet-level error after which the stream is still positioned at the next packet?
fn is_soft(e: &PgpError) -> bool {
    matches!(
        e,
        PgpError::Unsupported { .. }
            | PgpError::InvalidPacketContent { .. }
            | PgpError::PacketIncomplete { .. }
            | PgpError::PacketTooLarge { .. }
    )
}

/// Whose signature this claims to be.
#[derive(PartialEq, Eq)]
enum Issuer {
    /// Names the primary key (by key ID or fingerprint).
    Primary,
    /// Names no issuer at all: it can only be tried.
    Unnamed,
    /// Names other keys only.
    Other,
}

fn issuer_of(sig: &Signature, key_id: &KeyId, fingerprint: &Fingerprint) -> Issuer {
    let ids = sig.issuer_key_id();
    let fps = sig.issuer_fingerprint();
    if ids.is_empty() && fps.is_empty() {
        Issuer::Unnamed
    } else if ids.contains(&key_id) || fps.contains(&fingerprint) {
        Issuer::Primary
    } else {
        Issuer::Other
    }
}

/// The address a User ID holds: inside the last `<...>` when it ends with `>`, else the whole.
fn uid_address(uid: &[u8], policy: &AddressPolicy) -> Option<Address> {
    let text = std::str::from_utf8(uid).ok()?.trim();
    let candidate = if text.ends_with('>') {
        &text[text.rfind('<')?..]
    } else {
        text
    };
    policy.normalize(candidate).ok()
}

/// Reads the packets, keeping the first certificate's components and the signatures that may
/// be self-signatures; everything issued by other keys is counted and dropped unverified.
fn collect(bytes: &[u8], account: &Address, policy: &KeyPolicy) -> Result<Collected, KeyRejection> {
    let mut parser = PacketParser::new(bytes);
    let mut packets = 0usize;
    let mut certificates = 0usize;
    let mut candidates = 0usize;
    let mut slot = Slot::Start;
    let mut primary: Option<(PublicKey, KeyId, Fingerprint)> = None;
    let mut direct = Vec::new();
    let mut uids: Vec<Component<UserId>> = Vec::new();
    let mut other_uids: Vec<Component<UserId>> = Vec::new();
    let mut other_addresses: Vec<Address> = Vec::new();
    let mut subkeys: Vec<Component<PublicSubkey>> = Vec::new();
    let mut dropped = Dropped::default();

    while let Some(body) = parser.next_ref() {
        let body = body.map_err(|e| KeyRejection::Malformed(format!("packet {packets}: {e}")))?;
        packets += 1;
        if packets > policy.max_packets {
            return Err(KeyRejection::TooManyPackets {
                limit: policy.max_packets,
            });
        }
        let header = body.packet_header();
        let tag = header.tag();
        if matches!(tag, Tag::SecretKey | Tag::SecretSubkey) {
            return Err(KeyRejection::SecretKey);
        }
        let packet = match Packet::from_reader(header, body) {
            Ok(p) => Some(p),
            Err(e) if is_soft(&e) => None,
            Err(e) => {
                return Err(KeyRejection::Malformed(format!(
                    "packet {packets} ({tag:?}): {e}"
                )));
            }
        };
        match tag {
            Tag::PublicKey => {
                certificates += 1;
                if certificates > 1 {
                    slot = Slot::OtherCertificate;
                    continue;
                }
                let Some(Packet::PublicKey(key)) = packet else {
                    return Err(KeyRejection::Malformed(
                        "the primary key uses a version or algorithm that cannot be read".into(),
                    ));
                };
                let key_id = key.legacy_key_id();
                let fingerprint = key.fingerprint();
                primary = Some((key, key_id, fingerprint));
                slot = Slot::Primary;
                continue;
            }
            Tag::PublicKeyEncryptedSessionKey
            | Tag::SymKeyEncryptedSessionKey
            | Tag::OnePassSignature
            | Tag::CompressedData
            | Tag::SymEncryptedData
            | Tag::LiteralData
            | Tag::SymEncryptedProtectedData
            | Tag::ModDetectionCode
            | Tag::GnupgAeadData => {
                return Err(KeyRejection::Malformed(format!(
                    "it contains a {tag:?} packet, which belongs in a message, not in a key"
                )));
            }
            _ => {}
        }
        if matches!(slot, Slot::OtherCertificate) {
            continue;
        }
        let Some((_, key_id, fingerprint)) = primary.as_ref() else {
            dropped.other_packets += 1;
            continue;
        };
        match tag {
            Tag::Signature => {
                let Some(Packet::Signature(sig)) = packet else {
                    dropped.unreadable += 1;
                    continue;
                };
                if sig.config().is_none() {
                    dropped.unreadable += 1;
                    continue;
                }
                if issuer_of(&sig, key_id, fingerprint) == Issuer::Other {
                    dropped.third_party += 1;
                    continue;
                }
                let target = match slot {
                    Slot::Primary => &mut direct,
                    Slot::Uid(i) => &mut uids[i].sigs,
                    Slot::OtherUid(i) => &mut other_uids[i].sigs,
                    Slot::Subkey(i) => &mut subkeys[i].sigs,
                    Slot::Start | Slot::Dropped | Slot::OtherCertificate => continue,
                };
                candidates += 1;
                if candidates > policy.max_self_signatures {
                    return Err(KeyRejection::TooManySelfSignatures {
                        limit: policy.max_self_signatures,
                    });
                }
                target.push(sig);
            }
            Tag::UserId => {
                let Some(Packet::UserId(uid)) = packet else {
                    dropped.unreadable += 1;
                    slot = Slot::Dropped;
                    continue;
                };
                let address = uid_address(uid.id(), &policy.address_policy);
                let component = Component {
                    packet: uid,
                    sigs: Vec::new(),
                };
                if address.as_ref() == Some(account) {
                    uids.push(component);
                    slot = Slot::Uid(uids.len() - 1);
                } else {
                    dropped.other_uids += 1;
                    if let Some(a) = address
                        && other_addresses.len() < MAX_LISTED_ADDRESSES
                        && !other_addresses.contains(&a)
                    {
                        other_addresses.push(a);
                    }
                    other_uids.push(component);
                    slot = Slot::OtherUid(other_uids.len() - 1);
                }
            }
            Tag::UserAttribute => {
                dropped.user_attributes += 1;
                slot = Slot::Dropped;
            }
            Tag::PublicSubkey => {
                let Some(Packet::PublicSubkey(key)) = packet else {
                    dropped
                        .subkeys
                        .push("1 subkey that cannot be read (unsupported algorithm)".into());
                    slot = Slot::Dropped;
                    continue;
                };
                subkeys.push(Component {
                    packet: key,
                    sigs: Vec::new(),
                });
                slot = Slot::Subkey(subkeys.len() - 1);
            }
            // Trust, marker, padding, and unknown non-critical packets: not part of what is
            // published; they do not end the current component.
            _ => {
                if packet.is_none() {
                    dropped.unreadable += 1;
                } else {
                    dropped.other_packets += 1;
                }
            }
        }
    }

    match certificates {
        0 => return Err(KeyRejection::NoCertificate),
        1 => {}
        n => return Err(KeyRejection::SeveralCertificates(n)),
    }
    let Some((primary, _, fingerprint)) = primary else {
        return Err(KeyRejection::NoCertificate);
    };
    Ok(Collected {
        primary,
        fingerprint,
        direct,
        uids,
        other_uids,
        other_addresses,
        subkeys,
        dropped,
    })
}

/// Outcome of checking one signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Valid,
    /// It verifies, but its hash is not acceptable for its kind.
    WeakHash(HashAlgorithm),
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
struct Checker<'a> {
    policy: &'a KeyPolicy,
    now: u64,
    verifications: &'a mut usize,
}

impl Checker<'_> {
    fn check(
        &mut self,
        sig: &Signature,
        bound_key_created: u32,
        revocation: bool,
        verify: impl FnOnce(&Signature) -> pgp::errors::Result<()>,
    ) -> Check {
        let Some(created) = sig.created().map(|t| u64::from(t.as_secs())) else {
            return Check::Invalid;
        };
        if created < u64::from(bound_key_created)
            || created > self.now.saturating_add(self.policy.clock_skew_secs)
        {
            return Check::Invalid;
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

/// Why a key's algorithm is not accepted, if it is not.
fn key_weakness(key: &impl KeyDetails, policy: &KeyPolicy) -> Option<String> {
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

/// Drops unhashed subpackets other than Issuer, Issuer Fingerprint and Embedded Signature.
fn clean_unhashed(sig: &mut Signature) -> usize {
    let drop: Vec<usize> = match sig.config() {
        Some(c) => c
            .unhashed_subpackets()
            .enumerate()
            .filter(|(_, sp)| {
                !matches!(
                    sp.data,
                    SubpacketData::IssuerKeyId(_)
                        | SubpacketData::IssuerFingerprint(_)
                        | SubpacketData::EmbeddedSignature(_)
                )
            })
            .map(|(i, _)| i)
            .collect(),
        None => return 0,
    };
    drop.iter()
        .rev()
        .filter(|&&i| sig.unhashed_subpacket_remove(i).is_ok())
        .count()
}

/// The verdict on one User ID.
struct UidVerdict {
    /// Indexes of its valid self-signatures (certifications and revocations).
    keep: Vec<usize>,
    /// Newest valid certification: (created, primary flag, key expiration seconds).
    newest: Option<(u32, bool, u32)>,
    /// Newest valid certification revocation.
    revoked_at: Option<u32>,
    weak: Option<HashAlgorithm>,
}

fn judge_uid(
    checker: &mut Checker<'_>,
    primary: &PublicKey,
    uid: &Component<UserId>,
    dropped: &mut Dropped,
) -> UidVerdict {
    let key_created = primary.created_at().as_secs();
    let mut v = UidVerdict {
        keep: Vec::new(),
        newest: None,
        revoked_at: None,
        weak: None,
    };
    for (i, sig) in uid.sigs.iter().enumerate() {
        let revocation = match sig.typ() {
            Some(
                SignatureType::CertGeneric
                | SignatureType::CertPersona
                | SignatureType::CertCasual
                | SignatureType::CertPositive,
            ) => false,
            Some(SignatureType::CertRevocation) => true,
            _ => {
                dropped.misplaced_sigs += 1;
                continue;
            }
        };
        let check = checker.check(sig, key_created, revocation, |s| {
            s.verify_certification(primary, Tag::UserId, &uid.packet)
        });
        let created = sig.created().map_or(0, |t| t.as_secs());
        match check {
            Check::Valid => {
                v.keep.push(i);
                if revocation {
                    v.revoked_at = v.revoked_at.max(Some(created));
                } else {
                    let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                    let candidate = (created, sig.is_primary(), exp);
                    if v.newest.is_none_or(|(c, _, _)| created >= c) {
                        v.newest = Some(candidate);
                    }
                }
            }
            Check::WeakHash(h) => {
                v.weak = Some(h);
                dropped.bad_self_sigs += 1;
            }
            Check::Invalid => dropped.bad_self_sigs += 1,
        }
    }
    v
}

fn evaluate(
    mut c: Collected,
    account: &Address,
    policy: &KeyPolicy,
    now: u64,
    verifications: &mut usize,
) -> Result<ValidKey, KeyRejection> {
    let mut checker = Checker {
        policy,
        now,
        verifications,
    };
    let primary = &c.primary;
    let key_created = primary.created_at().as_secs();
    let dropped = &mut c.dropped;

    // Primary key: revocations and direct-key signatures.
    let mut revoked = false;
    let mut keep_direct = Vec::new();
    // (created, key expiration seconds) of the newest valid binding self-signature so far.
    let mut newest_binding: Option<(u32, u32)> = None;
    for (i, sig) in c.direct.iter().enumerate() {
        let revocation = match sig.typ() {
            Some(SignatureType::KeyRevocation) => true,
            Some(SignatureType::Key) => false,
            _ => {
                dropped.misplaced_sigs += 1;
                continue;
            }
        };
        match checker.check(sig, key_created, revocation, |s| s.verify_key(primary)) {
            Check::Valid => {
                keep_direct.push(i);
                let created = sig.created().map_or(0, |t| t.as_secs());
                if revocation {
                    revoked = true;
                } else if newest_binding.is_none_or(|(c, _)| created >= c) {
                    let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                    newest_binding = Some((created, exp));
                }
            }
            Check::WeakHash(_) | Check::Invalid => dropped.bad_self_sigs += 1,
        }
    }

    if !revoked && let Some(algorithm) = key_weakness(primary, policy) {
        return Err(KeyRejection::WeakPrimaryKey { algorithm });
    }

    // The matching User ID.
    if c.uids.is_empty() {
        return Err(KeyRejection::NoMatchingUserId {
            account: account.clone(),
            found: c.other_addresses,
        });
    }
    let verdicts: Vec<UidVerdict> = c
        .uids
        .iter()
        .map(|u| judge_uid(&mut checker, primary, u, dropped))
        .collect();
    let usable = |v: &UidVerdict| match v.newest {
        Some((created, _, _)) => revoked || v.revoked_at.is_none_or(|r| r < created),
        None => false,
    };
    let chosen = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| usable(v))
        .max_by_key(|(i, v)| {
            let (created, primary_flag, _) = v.newest.unwrap_or_default();
            (primary_flag, created, std::cmp::Reverse(*i))
        })
        .map(|(i, _)| i);
    let Some(chosen) = chosen else {
        if verdicts.iter().any(|v| v.newest.is_some()) {
            return Err(KeyRejection::UserIdRevoked {
                account: account.clone(),
            });
        }
        if let Some(h) = verdicts.iter().find_map(|v| v.weak) {
            return Err(KeyRejection::WeakSelfSignatureHash {
                hash: h.to_string(),
            });
        }
        // Does anything else on the key verify? (Only reached on this error path.)
        let mut scratch = Dropped::default();
        let other_valid = c.other_uids.iter().any(|u| {
            judge_uid(&mut checker, primary, u, &mut scratch)
                .newest
                .is_some()
        });
        if keep_direct.is_empty() && !other_valid {
            return Err(KeyRejection::NoValidSelfSignature);
        }
        return Err(KeyRejection::UserIdNotSelfSigned {
            account: account.clone(),
        });
    };
    dropped.other_uids += c.uids.len() - 1;
    let verdict = &verdicts[chosen];
    if let Some((created, _, exp)) = verdict.newest
        && newest_binding.is_none_or(|(c, _)| created >= c)
    {
        newest_binding = Some((created, exp));
    }

    // Expiration of the primary key.
    let expires_at = newest_binding
        .and_then(|(_, exp)| (exp != 0).then(|| u64::from(key_created) + u64::from(exp)));
    if !revoked
        && let Some(at) = expires_at
        && at <= now
    {
        return Err(KeyRejection::Expired { at });
    }

    // Subkeys.
    let v6 = primary.version() == KeyVersion::V6;
    let mut kept_subkeys: Vec<(usize, Vec<usize>)> = Vec::new();
    for (si, sub) in c.subkeys.iter().enumerate() {
        let sub_fpr = format!("{:X}", sub.packet.fingerprint());
        if v6 && sub.packet.version() != KeyVersion::V6 {
            dropped.subkeys.push(format!(
                "subkey {sub_fpr} (not version 6 under a version 6 key)"
            ));
            continue;
        }
        let sub_created = sub.packet.created_at().as_secs();
        let mut keep = Vec::new();
        let mut newest: Option<(u32, u32)> = None;
        let mut sub_revoked = false;
        let mut weak = None;
        for (i, sig) in sub.sigs.iter().enumerate() {
            let revocation = match sig.typ() {
                Some(SignatureType::SubkeyBinding) => false,
                Some(SignatureType::SubkeyRevocation) => true,
                _ => {
                    dropped.misplaced_sigs += 1;
                    continue;
                }
            };
            let check = checker.check(sig, sub_created, revocation, |s| {
                s.verify_subkey_binding(primary, &sub.packet)
            });
            match check {
                Check::Valid => {
                    keep.push(i);
                    let created = sig.created().map_or(0, |t| t.as_secs());
                    if revocation {
                        sub_revoked = true;
                    } else if newest.is_none_or(|(c, _)| created >= c) {
                        let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                        newest = Some((created, exp));
                    }
                }
                Check::WeakHash(h) => {
                    weak = Some(h);
                    dropped.bad_self_sigs += 1;
                }
                Check::Invalid => dropped.bad_self_sigs += 1,
            }
        }
        let Some((_, exp)) = newest else {
            dropped.subkeys.push(match weak {
                Some(h) => format!("subkey {sub_fpr} (its binding signature uses {h})"),
                None => format!("subkey {sub_fpr} (no valid binding signature)"),
            });
            continue;
        };
        if exp != 0 && u64::from(sub_created) + u64::from(exp) <= now {
            dropped.subkeys.push(format!("subkey {sub_fpr} (expired)"));
            continue;
        }
        if !revoked
            && !sub_revoked
            && let Some(algorithm) = key_weakness(&sub.packet, policy)
        {
            return Err(KeyRejection::WeakSubkey {
                fingerprint: sub_fpr,
                algorithm,
            });
        }
        kept_subkeys.push((si, keep));
    }

    // Assemble what is published.
    let user_id = String::from_utf8_lossy(c.uids[chosen].packet.id()).into_owned();
    let mut out = Vec::new();
    let ser = |r: pgp::errors::Result<()>| {
        r.map_err(|e| KeyRejection::Malformed(format!("re-serializing: {e}")))
    };
    ser(c.primary.to_writer_with_header(&mut out))?;
    for i in keep_direct {
        let sig = &mut c.direct[i];
        dropped.unhashed_subpackets += clean_unhashed(sig);
        ser(sig.to_writer_with_header(&mut out))?;
    }
    let keep_uid_sigs = verdicts[chosen].keep.clone();
    let uid = &mut c.uids[chosen];
    ser(uid.packet.to_writer_with_header(&mut out))?;
    for i in keep_uid_sigs {
        let sig = &mut uid.sigs[i];
        dropped.unhashed_subpackets += clean_unhashed(sig);
        ser(sig.to_writer_with_header(&mut out))?;
    }
    for (si, keep) in kept_subkeys {
        let sub = &mut c.subkeys[si];
        ser(sub.packet.to_writer_with_header(&mut out))?;
        for i in keep {
            let sig = &mut sub.sigs[i];
            dropped.unhashed_subpackets += clean_unhashed(sig);
            ser(sig.to_writer_with_header(&mut out))?;
        }
    }

    Ok(ValidKey {
        packets: out,
        fingerprint: format!("{:X}", c.fingerprint),
        user_id,
        revoked,
        expires_at,
        stripped: describe(&c.dropped),
    })
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn describe(d: &Dropped) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |n: usize, one: &str, many: &str| {
        if n > 0 {
            out.push(plural(n, one, many));
        }
    };
    add(d.other_uids, "other User ID", "other User IDs");
    add(
        d.user_attributes,
        "user attribute (photo ID)",
        "user attributes (photo IDs)",
    );
    add(
        d.third_party,
        "third-party certification or signature",
        "third-party certifications and signatures",
    );
    add(
        d.bad_self_sigs,
        "self-signature that does not verify or uses a weak hash",
        "self-signatures that do not verify or use a weak hash",
    );
    add(
        d.misplaced_sigs,
        "signature of a type that does not belong where it was",
        "signatures of a type that does not belong where they were",
    );
    add(d.unreadable, "unreadable packet", "unreadable packets");
    add(
        d.other_packets,
        "other packet (trust, marker or padding)",
        "other packets (trust, marker or padding)",
    );
    add(
        d.unhashed_subpackets,
        "unauthenticated subpacket in a signature's unhashed area",
        "unauthenticated subpackets in signatures' unhashed areas",
    );
    out.extend(d.subkeys.iter().cloned());
    out
}

/// `secs` as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian calendar).
fn format_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60
    )
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use pgp::composed::{Deserializable, SignedSecretKey};
    use pgp::packet::{SignatureConfig, Subpacket};
    use pgp::types::{PacketHeaderVersion, Password, Timestamp};
    use proptest::prelude::*;

    use super::*;
    use crate::openpgp::{armor_public_key, dearmor_public_key, parse_armored};

    const ALICE: &str = include_str!("../testdata/keys/alice.pub.asc");
    const ALICE_SECRET: &str = include_str!("../testdata/keys/alice.sec.asc");
    const CERTIFIED: &str = include_str!("../testdata/keys/alice-certified.pub.asc");
    const FLOODED: &str = include_str!("../testdata/keys/alice-flooded.pub.asc");
    const REVOKED: &str = include_str!("../testdata/keys/revoked.pub.asc");
    const EXPIRED: &str = include_str!("../testdata/keys/expired.pub.asc");
    const RSA1024: &str = include_str!("../testdata/keys/rsa1024.pub.asc");
    const DSA_ELG: &str = include_str!("../testdata/keys/dsa-elg.pub.asc");
    const SHA1: &str = include_str!("../testdata/keys/sha1.pub.asc");
    const SHA1_RESIGNED: &str = include_str!("../testdata/keys/sha1-resigned.pub.asc");
    const SUBKEYS: &str = include_str!("../testdata/keys/subkeys.pub.asc");
    const FOREIGN: &str = include_str!("../testdata/keys/foreign.pub.asc");
    const TWO_CERTS: &str = include_str!("../testdata/keys/two-certs.pub.asc");
    const UID_REVOKED: &str = include_str!("../testdata/keys/uid-revoked.pub.asc");

    /// Fingerprint of the committed alice.pub.asc, as `gpg --show-keys` prints it (running
    /// make-fixtures.sh again makes new keys: update this then).
    const ALICE_FPR: &str = "637895003B05333E2D3782F2EE62CCF91EB2D657";

    /// 2026-06-01T00:00:00Z: after every fixture was made, before nothing in them expires
    /// except expired.pub.asc and the first subkey of subkeys.pub.asc (both 2020-01-02).
    fn now() -> SystemTime {
        at(1_780_272_000)
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn addr(s: &str) -> Address {
        AddressPolicy::default().normalize(s).unwrap()
    }

    fn alice() -> Address {
        addr("alice@example.net")
    }

    fn check(armored: &str) -> Result<ValidKey, KeyRejection> {
        validate(armored, &alice(), &KeyPolicy::default(), now())
    }

    fn ok(armored: &str) -> ValidKey {
        check(armored).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn binary(armored: &str) -> Vec<u8> {
        dearmor_public_key(armored, 1 << 20).unwrap()
    }

    fn packets(bytes: &[u8]) -> Vec<Packet> {
        PacketParser::new(bytes).map(|p| p.unwrap()).collect()
    }

    fn serialize(packets: &[Packet]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            p.to_writer(&mut out).unwrap();
        }
        out
    }

    fn tags(bytes: &[u8]) -> Vec<Tag> {
        packets(bytes).iter().map(|p| p.tag()).collect()
    }

    fn sig_types(bytes: &[u8]) -> Vec<SignatureType> {
        packets(bytes)
            .iter()
            .filter_map(|p| match p {
                Packet::Signature(s) => s.typ(),
                _ => None,
            })
            .collect()
    }

    fn user_ids(bytes: &[u8]) -> Vec<String> {
        packets(bytes)
            .iter()
            .filter_map(|p| match p {
                Packet::UserId(u) => Some(String::from_utf8_lossy(u.id()).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn secret_alice() -> SignedSecretKey {
        SignedSecretKey::from_string(ALICE_SECRET).unwrap().0
    }

    /// A v4 signature config by alice's primary key, created at `created`, SHA-256.
    fn alice_config(typ: SignatureType, created: u32, hash: HashAlgorithm) -> SignatureConfig {
        let sec = secret_alice();
        let mut cfg = SignatureConfig::v4(typ, sec.primary_key.algorithm(), hash);
        cfg.hashed_subpackets = vec![
            Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::from_secs(
                created,
            )))
            .unwrap(),
            Subpacket::regular(SubpacketData::IssuerFingerprint(
                sec.primary_key.fingerprint(),
            ))
            .unwrap(),
        ];
        cfg
    }

    fn has(v: &ValidKey, needle: &str) -> bool {
        v.stripped.iter().any(|s| s.contains(needle))
    }

    // ---- the good key --------------------------------------------------------------------

    #[test]
    fn good_key_keeps_primary_matching_uid_and_subkey() {
        let v = ok(ALICE);
        assert_eq!(v.fingerprint, ALICE_FPR);
        assert_eq!(v.user_id, "alice <alice@example.net>");
        assert!(!v.revoked);
        assert_eq!(v.expires_at, None);
        assert_eq!(
            tags(&v.packets),
            [
                Tag::PublicKey,
                Tag::UserId,
                Tag::Signature,
                Tag::PublicSubkey,
                Tag::Signature
            ]
        );
        assert_eq!(
            sig_types(&v.packets),
            [SignatureType::CertPositive, SignatureType::SubkeyBinding]
        );
        assert_eq!(
            v.stripped,
            ["2 other User IDs", "1 user attribute (photo ID)"],
            "{:?}",
            v.stripped
        );
    }

    #[test]
    fn good_key_with_the_real_clock() {
        let v = validate(ALICE, &alice(), &KeyPolicy::default(), SystemTime::now()).unwrap();
        assert_eq!(v.fingerprint, ALICE_FPR);
    }

    #[test]
    fn fingerprint_is_unchanged_by_stripping() {
        let v = ok(ALICE);
        let original = parse_armored(ALICE, 1 << 20).unwrap();
        assert_eq!(original.fingerprint, ALICE_FPR);
        let stripped = crate::openpgp::parse_binary(&v.packets).unwrap();
        assert_eq!(stripped.fingerprint, ALICE_FPR);
        assert_eq!(stripped.user_ids, ["alice <alice@example.net>"]);
        // The primary key packet is byte-for-byte the one that was sent.
        let sent = packets(&binary(ALICE));
        let kept = packets(&v.packets);
        assert_eq!(serialize(&sent[..1]), serialize(&kept[..1]));
    }

    #[test]
    fn other_uids_of_the_same_key_can_be_published_by_their_owner() {
        let v = validate(
            ALICE,
            &addr("alice@personal.example"),
            &KeyPolicy::default(),
            now(),
        )
        .unwrap();
        assert_eq!(v.user_id, "Alice Private <alice@personal.example>");
        assert_eq!(user_ids(&v.packets), [v.user_id.as_str()]);
        assert_eq!(v.fingerprint, ALICE_FPR);
    }

    #[test]
    fn address_comparison_uses_the_address_policy() {
        // The account is normalized by the service; the UID side by the policy here.
        let v = validate(
            ALICE,
            &addr("ALICE@Example.NET"),
            &KeyPolicy::default(),
            now(),
        );
        assert_eq!(v.unwrap().user_id, "alice <alice@example.net>");
        let folding = KeyPolicy {
            address_policy: AddressPolicy {
                subaddress_separator: Some('+'),
                ..AddressPolicy::default()
            },
            ..KeyPolicy::default()
        };
        let p = &folding.address_policy;
        assert_eq!(uid_address(b"a <alice+x@example.net>", p), Some(alice()));
    }

    #[test]
    fn uid_addresses() {
        let p = AddressPolicy::default();
        let a = |s: &[u8]| uid_address(s, &p).map(|a| a.as_str().to_string());
        assert_eq!(
            a(b"alice@example.net").as_deref(),
            Some("alice@example.net")
        );
        assert_eq!(
            a(b"  Alice@Example.net ").as_deref(),
            Some("alice@example.net")
        );
        assert_eq!(
            a(b"<alice@example.net>").as_deref(),
            Some("alice@example.net")
        );
        assert_eq!(
            a(b"Alice (work) <Alice@EXAMPLE.net>").as_deref(),
            Some("alice@example.net")
        );
        assert_eq!(
            a(b"Eve <eve@evil.example> <alice@example.net>").as_deref(),
            Some("alice@example.net")
        );
        assert_eq!(a(b"Alice (no mail)"), None);
        assert_eq!(a(b"alice <alice@example.net> extra"), None);
        assert_eq!(a(b"alice@example.net>"), None);
        assert_eq!(a(b"\xffalice@example.net"), None);
        assert_eq!(a(b""), None);
    }

    // ---- stripping and flooding -----------------------------------------------------------

    #[test]
    fn third_party_certifications_are_stripped() {
        let v = ok(CERTIFIED);
        assert_eq!(v.packets, ok(ALICE).packets);
        assert!(
            has(&v, "4 third-party certifications and signatures"),
            "{:?}",
            v.stripped
        );
    }

    #[test]
    fn flooded_key_is_stripped_to_the_self_signatures_without_verifying_the_flood() {
        let all_sigs = sig_types(&binary(FLOODED)).len();
        assert!(all_sigs > 2000, "the fixture holds {all_sigs} signatures");
        let (v, verifications) = validate_counting(FLOODED, &alice(), &KeyPolicy::default(), now());
        let v = v.unwrap();
        assert_eq!(v.packets, ok(ALICE).packets);
        assert_eq!(v.fingerprint, ALICE_FPR);
        assert!(
            has(&v, "2004 third-party certifications and signatures"),
            "{:?}",
            v.stripped
        );
        // One verification for the UID's self-signature, one for the subkey binding: none of
        // the thousands of third-party signatures was checked.
        assert_eq!(verifications, 2);
    }

    #[test]
    fn stripping_is_idempotent() {
        let fixtures = [ALICE, CERTIFIED, FLOODED, REVOKED, SHA1_RESIGNED, SUBKEYS];
        for f in fixtures {
            let first = ok(f);
            let again = ok(&armor_public_key(&first.packets));
            assert_eq!(again.packets, first.packets);
            assert_eq!(again.fingerprint, first.fingerprint);
            assert_eq!(again.user_id, first.user_id);
            assert_eq!(again.revoked, first.revoked);
            assert_eq!(again.expires_at, first.expires_at);
            assert!(again.stripped.is_empty(), "{:?}", again.stripped);
        }
    }

    #[test]
    fn unhashed_junk_in_a_self_signature_is_removed() {
        let clean = ok(ALICE).packets;
        let mut ps = packets(&clean);
        let Packet::Signature(sig) = &mut ps[2] else {
            panic!("expected the UID self-signature")
        };
        sig.unhashed_subpacket_push(
            Subpacket::regular(SubpacketData::PreferredKeyServer(
                "hkps://keys.evil.example".into(),
            ))
            .unwrap(),
        )
        .unwrap();
        let dirty = serialize(&ps);
        assert_ne!(dirty, clean);
        let v = ok(&armor_public_key(&dirty));
        assert_eq!(v.packets, clean);
        assert!(has(&v, "1 unauthenticated subpacket"), "{:?}", v.stripped);
    }

    /// Imports `armored` into a fresh GNUPGHOME and returns `gpg --with-colons --list-sigs`.
    fn gpg_import_and_list(armored: &str) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let home = std::env::temp_dir().join(format!(
            "kst-validate-gpg-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&home).unwrap();
        let gpg = |args: &[&str], stdin: Option<&str>| {
            let mut child = Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--no-tty", "--no-auto-check-trustdb"])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("gpg is installed");
            if let Some(input) = stdin {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
            }
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "gpg {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        gpg(&["--import"], Some(armored));
        let listing = gpg(&["--with-colons", "--fixed-list-mode", "--list-sigs"], None);
        let _ = std::fs::remove_dir_all(&home);
        listing
    }

    #[test]
    fn stripped_flooded_key_round_trips_through_gpg() {
        let v = ok(FLOODED);
        let listing = gpg_import_and_list(&armor_public_key(&v.packets));
        let records: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|r| r[0] != "tru")
            .collect();
        let kinds: Vec<&str> = records.iter().map(|r| r[0]).collect();
        assert_eq!(
            kinds,
            ["pub", "fpr", "uid", "sig", "sub", "fpr", "sig"],
            "{listing}"
        );
        assert_eq!(records[1][9], ALICE_FPR);
        assert_eq!(records[2][9], "alice <alice@example.net>");
        let key_id = &ALICE_FPR[24..];
        for sig in records.iter().filter(|r| r[0] == "sig") {
            assert_eq!(sig[4], key_id, "only self-signatures: {listing}");
        }
        // gpg validates the key: the UID is not marked invalid/revoked/expired.
        assert!(!["i", "r", "e"].contains(&records[0][1]), "{listing}");
    }

    #[test]
    fn revoked_key_round_trips_through_gpg_as_revoked() {
        let v = ok(REVOKED);
        let listing = gpg_import_and_list(&armor_public_key(&v.packets));
        let pub_line = listing.lines().find(|l| l.starts_with("pub:")).unwrap();
        assert!(pub_line.starts_with("pub:r:"), "{listing}");
        assert!(listing.lines().any(|l| l.starts_with("rev:")), "{listing}");
    }

    // ---- refusals --------------------------------------------------------------------------

    #[test]
    fn secret_keys_are_refused_in_any_armor() {
        let e = check(ALICE_SECRET).unwrap_err();
        assert_eq!(e, KeyRejection::SecretKey);
        assert_eq!(e.reason(), Reason::SecretKey);
        assert!(e.to_string().contains("revoke"));

        // The secret packets re-armored as a PUBLIC KEY BLOCK.
        let mut d = Dearmor::new(BufReader::new(ALICE_SECRET.as_bytes()));
        let mut secret = Vec::new();
        d.read_to_end(&mut secret).unwrap();
        assert_eq!(
            check(&armor_public_key(&secret)),
            Err(KeyRejection::SecretKey)
        );
        // A secret key appended after a good public key.
        let mut both = binary(ALICE);
        both.extend_from_slice(&secret);
        assert_eq!(
            check(&armor_public_key(&both)),
            Err(KeyRejection::SecretKey)
        );
        // A secret block after a public block in the same text.
        let text = format!("{ALICE}\n{ALICE_SECRET}");
        assert_eq!(check(&text), Err(KeyRejection::SecretKey));
        // A secret subkey packet whose body is garbage is still a secret key.
        let mut garbage = binary(ALICE);
        garbage.extend_from_slice(&[0xC7, 0x03, 0xff, 0xff, 0xff]);
        assert_eq!(
            check(&armor_public_key(&garbage)),
            Err(KeyRejection::SecretKey)
        );
    }

    #[test]
    fn size_caps() {
        let small = KeyPolicy {
            max_key_bytes: 1000,
            ..KeyPolicy::default()
        };
        let e = validate(FLOODED, &alice(), &small, now()).unwrap_err();
        assert_eq!(e, KeyRejection::TooLarge { limit: 1000 });
        assert_eq!(e.reason(), Reason::KeyTooLarge);

        let huge = "x".repeat(DEFAULT_MAX_KEY_BYTES + 1);
        assert_eq!(
            check(&huge),
            Err(KeyRejection::TooLarge {
                limit: DEFAULT_MAX_KEY_BYTES
            })
        );

        let few_packets = KeyPolicy {
            max_packets: 100,
            ..KeyPolicy::default()
        };
        let e = validate(FLOODED, &alice(), &few_packets, now()).unwrap_err();
        assert_eq!(e, KeyRejection::TooManyPackets { limit: 100 });
        assert_eq!(e.reason(), Reason::KeyTooLarge);
        // The flooded fixture (about 320 KiB) is within the defaults: it is stripped, not refused.
        assert!(FLOODED.len() < DEFAULT_MAX_KEY_BYTES);
    }

    #[test]
    fn too_many_self_signature_candidates() {
        let strict = KeyPolicy {
            max_self_signatures: 1,
            ..KeyPolicy::default()
        };
        // alice: one UID self-signature + one subkey binding.
        assert_eq!(
            validate(ALICE, &alice(), &strict, now()),
            Err(KeyRejection::TooManySelfSignatures { limit: 1 })
        );
        // 300 copies of the UID self-signature: over the default cap, refused before any check.
        let mut ps = packets(&ok(ALICE).packets);
        let sig = ps[2].clone();
        for _ in 0..300 {
            ps.insert(2, sig.clone());
        }
        let (r, verifications) = validate_counting(
            &armor_public_key(&serialize(&ps)),
            &alice(),
            &KeyPolicy::default(),
            now(),
        );
        assert_eq!(
            r,
            Err(KeyRejection::TooManySelfSignatures {
                limit: DEFAULT_MAX_SELF_SIGNATURES
            })
        );
        assert_eq!(verifications, 0);
    }

    #[test]
    fn not_exactly_one_certificate() {
        assert_eq!(check(TWO_CERTS), Err(KeyRejection::SeveralCertificates(2)));
        assert_eq!(
            check(&armor_public_key(&[])),
            Err(KeyRejection::NoCertificate)
        );
        // A bare revocation certificate (the signature packet alone).
        let rev: Vec<Packet> = packets(&binary(REVOKED))
            .into_iter()
            .filter(|p| {
                matches!(p, Packet::Signature(s) if s.typ() == Some(SignatureType::KeyRevocation))
            })
            .collect();
        assert_eq!(rev.len(), 1);
        let e = check(&armor_public_key(&serialize(&rev))).unwrap_err();
        assert_eq!(e, KeyRejection::NoCertificate);
        assert!(e.to_string().contains("gpg --import"));
        assert_eq!(e.reason(), Reason::BadKey);
    }

    #[test]
    fn foreign_uid_only() {
        let e = check(FOREIGN).unwrap_err();
        assert_eq!(
            e,
            KeyRejection::NoMatchingUserId {
                account: alice(),
                found: vec![addr("alice@example.org")]
            }
        );
        assert!(e.to_string().contains("alice@example.org"));
        assert_eq!(e.reason(), Reason::NoMatchingUserId);
        // Alice's key published by bob: bob's address is not on it.
        let e = validate(
            ALICE,
            &addr("bob@example.com"),
            &KeyPolicy::default(),
            now(),
        );
        assert_eq!(
            e,
            Err(KeyRejection::NoMatchingUserId {
                account: addr("bob@example.com"),
                found: vec![addr("alice@personal.example"), alice()]
            })
        );
    }

    #[test]
    fn matching_uid_without_self_signature() {
        // mallory's key with an unsigned "alice" User ID appended.
        let mut ps = packets(&binary(FOREIGN));
        ps.push(Packet::UserId(
            UserId::from_str(PacketHeaderVersion::New, "alice <alice@example.net>").unwrap(),
        ));
        assert_eq!(
            check(&armor_public_key(&serialize(&ps))),
            Err(KeyRejection::UserIdNotSelfSigned { account: alice() })
        );
    }

    #[test]
    fn no_valid_self_signature() {
        // The User ID altered after signing: its self-signature no longer verifies.
        let mut ps = packets(&ok(ALICE).packets);
        ps[1] = Packet::UserId(
            UserId::from_str(PacketHeaderVersion::Old, "Alice <alice@example.net>").unwrap(),
        );
        let e = check(&armor_public_key(&serialize(&ps))).unwrap_err();
        assert_eq!(e, KeyRejection::NoValidSelfSignature);
        assert_eq!(e.reason(), Reason::BadSelfSignature);
    }

    /// gpg --quick-revoke-uid: alice's User ID revoked (2025-06-01), another one still valid.
    #[test]
    fn revoked_user_id_of_the_account() {
        let e = check(UID_REVOKED).unwrap_err();
        assert_eq!(e, KeyRejection::UserIdRevoked { account: alice() });
        assert_eq!(e.reason(), Reason::UserIdRevoked);
        // The User ID that is still valid can be published by its owner.
        let elsewhere = crate::AddressPolicy::default()
            .normalize("alice@elsewhere.example")
            .unwrap();
        let v = validate(UID_REVOKED, &elsewhere, &KeyPolicy::default(), now()).unwrap();
        assert_eq!(v.user_id, "Alice Elsewhere <alice@elsewhere.example>");
        // Before the revocation (2025-05-01) alice's User ID was fine.
        assert!(
            validate(
                UID_REVOKED,
                &alice(),
                &KeyPolicy::default(),
                at(1_746_057_600)
            )
            .is_ok()
        );
    }

    #[test]
    fn expired_key() {
        let e = check(EXPIRED).unwrap_err();
        assert_eq!(e, KeyRejection::Expired { at: 1_577_923_200 });
        assert!(e.to_string().contains("2020-01-02 00:00 UTC"), "{e}");
        assert_eq!(e.reason(), Reason::KeyExpired);
        // Before it expired (2020-01-01 12:00) it was fine, subkey included.
        let v = validate(EXPIRED, &alice(), &KeyPolicy::default(), at(1_577_880_000)).unwrap();
        assert_eq!(v.expires_at, Some(1_577_923_200));
        assert!(tags(&v.packets).contains(&Tag::PublicSubkey));
    }

    #[test]
    fn expiry_from_a_newer_direct_key_signature() {
        let sec = secret_alice();
        let public = sec.primary_key.public_key();
        // A direct-key signature made 2025-06-01 setting expiry 200 days after creation
        // (2025-01-01 + 200 d = 2025-07-20), newer than the UID self-signature.
        let mut cfg = alice_config(SignatureType::Key, 1_748_736_000, HashAlgorithm::Sha256);
        cfg.hashed_subpackets.push(
            Subpacket::regular(SubpacketData::KeyExpirationTime(
                pgp::types::Duration::from_secs(200 * 86_400),
            ))
            .unwrap(),
        );
        let direct = cfg
            .sign_key(&sec.primary_key, &Password::empty(), &public)
            .unwrap();
        let mut ps = packets(&ok(ALICE).packets);
        ps.insert(1, Packet::Signature(direct));
        let armored = armor_public_key(&serialize(&ps));
        let expires = 1_735_689_600 + 200 * 86_400;
        assert_eq!(check(&armored), Err(KeyRejection::Expired { at: expires }));
        let v = validate(&armored, &alice(), &KeyPolicy::default(), at(1_750_000_000)).unwrap();
        assert_eq!(v.expires_at, Some(expires));
        assert_eq!(sig_types(&v.packets)[0], SignatureType::Key);
    }

    #[test]
    fn future_and_expired_self_signatures_are_dropped() {
        let sec = secret_alice();
        let public = sec.primary_key.public_key();
        let uid = UserId::from_str(PacketHeaderVersion::Old, "alice <alice@example.net>").unwrap();
        // Made a day after `now()`, beyond the clock skew.
        let future = alice_config(
            SignatureType::CertPositive,
            1_780_272_000 + 86_400,
            HashAlgorithm::Sha256,
        )
        .sign_certification(
            &sec.primary_key,
            &public,
            &Password::empty(),
            Tag::UserId,
            &uid,
        )
        .unwrap();
        // A direct-key signature whose own validity ended (made 2025-06-01, valid one day).
        // (rPGP refuses to make SHA-1 EdDSA signatures; the gpg-made sha1 fixtures cover that.)
        let mut cfg = alice_config(SignatureType::Key, 1_748_736_000, HashAlgorithm::Sha256);
        cfg.hashed_subpackets.push(
            Subpacket::regular(SubpacketData::SignatureExpirationTime(
                pgp::types::Duration::from_secs(86_400),
            ))
            .unwrap(),
        );
        let expired = cfg
            .sign_key(&sec.primary_key, &Password::empty(), &public)
            .unwrap();
        let clean = ok(ALICE).packets;
        let mut ps = packets(&clean);
        ps.insert(3, Packet::Signature(future));
        ps.insert(1, Packet::Signature(expired));
        let v = ok(&armor_public_key(&serialize(&ps)));
        assert_eq!(v.packets, clean);
        assert!(
            has(&v, "2 self-signatures that do not verify"),
            "{:?}",
            v.stripped
        );
        // Within the clock skew, a signature from slightly in the future is accepted.
        let soon = alice_config(
            SignatureType::CertPositive,
            1_780_272_000 + 60,
            HashAlgorithm::Sha256,
        )
        .sign_certification(
            &sec.primary_key,
            &public,
            &Password::empty(),
            Tag::UserId,
            &uid,
        )
        .unwrap();
        let mut ps = packets(&clean);
        ps.insert(3, Packet::Signature(soon));
        let v = ok(&armor_public_key(&serialize(&ps)));
        assert_eq!(sig_types(&v.packets).len(), 3);
    }

    #[test]
    fn revoked_key_is_accepted_and_marked() {
        let v = ok(REVOKED);
        assert!(v.revoked);
        assert_eq!(v.user_id, "alice <alice@example.net>");
        assert_eq!(
            sig_types(&v.packets),
            [
                SignatureType::KeyRevocation,
                SignatureType::CertPositive,
                SignatureType::SubkeyBinding
            ]
        );
        assert!(v.stripped.is_empty(), "{:?}", v.stripped);
        // Still revoked long after any expiry.
        let later = validate(REVOKED, &alice(), &KeyPolicy::default(), at(4_000_000_000));
        assert!(later.unwrap().revoked);
    }

    #[test]
    fn weak_primary_keys() {
        let e = check(RSA1024).unwrap_err();
        let KeyRejection::WeakPrimaryKey { algorithm } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(algorithm, "RSA with 1024 bits (at least 2048 are required)");
        assert_eq!(e.reason(), Reason::WeakAlgorithm);
        let lenient = KeyPolicy {
            min_rsa_bits: 1024,
            ..KeyPolicy::default()
        };
        assert!(validate(RSA1024, &alice(), &lenient, now()).is_ok());

        assert_eq!(
            check(DSA_ELG),
            Err(KeyRejection::WeakPrimaryKey {
                algorithm: "DSA".into()
            })
        );
    }

    #[test]
    fn sha1_self_signatures() {
        let e = check(SHA1).unwrap_err();
        assert_eq!(
            e,
            KeyRejection::WeakSelfSignatureHash {
                hash: "SHA1".into()
            }
        );
        assert_eq!(e.reason(), Reason::WeakAlgorithm);
        let lenient = KeyPolicy {
            allow_sha1_bindings: true,
            ..KeyPolicy::default()
        };
        let v = validate(SHA1, &alice(), &lenient, now()).unwrap();
        assert!(tags(&v.packets).contains(&Tag::PublicSubkey));
        // RSA-3072 passes the size rule.
        assert!(v.stripped.is_empty(), "{:?}", v.stripped);
    }

    #[test]
    fn old_sha1_self_signature_next_to_a_new_one_is_dropped() {
        let v = ok(SHA1_RESIGNED);
        let kept = packets(&v.packets);
        let hashes: Vec<HashAlgorithm> = kept
            .iter()
            .filter_map(|p| match p {
                Packet::Signature(s) => s.hash_alg(),
                _ => None,
            })
            .collect();
        assert_eq!(hashes, [HashAlgorithm::Sha256, HashAlgorithm::Sha256]);
        assert!(
            has(&v, "1 self-signature that does not verify"),
            "{:?}",
            v.stripped
        );
    }

    #[test]
    fn subkeys_expired_stripped_revoked_kept() {
        let v = ok(SUBKEYS);
        let ps = packets(&v.packets);
        let subkeys: Vec<String> = ps
            .iter()
            .filter_map(|p| match p {
                Packet::PublicSubkey(k) => Some(format!("{:X}", k.fingerprint())),
                _ => None,
            })
            .collect();
        assert_eq!(subkeys.len(), 2, "the expired one is gone");
        assert_eq!(
            sig_types(&v.packets),
            [
                SignatureType::CertPositive,
                SignatureType::SubkeyBinding,
                SignatureType::SubkeyRevocation,
                SignatureType::SubkeyBinding
            ]
        );
        assert!(has(&v, "(expired)"), "{:?}", v.stripped);
        // In 2020, before the first subkey expired and before the others existed, only the
        // first is kept (the others' bindings are from 2025, "in the future").
        let v2020 = validate(SUBKEYS, &alice(), &KeyPolicy::default(), at(1_577_880_000));
        let v2020 = v2020.unwrap();
        assert_eq!(
            tags(&v2020.packets)
                .iter()
                .filter(|t| **t == Tag::PublicSubkey)
                .count(),
            1
        );
    }

    #[test]
    fn subkey_with_a_binding_that_does_not_verify_is_stripped() {
        let mut ps = packets(&ok(ALICE).packets);
        let other_subkey = packets(&binary(REVOKED))
            .into_iter()
            .find(|p| p.tag() == Tag::PublicSubkey)
            .unwrap();
        ps[3] = other_subkey;
        let v = ok(&armor_public_key(&serialize(&ps)));
        assert!(!tags(&v.packets).contains(&Tag::PublicSubkey));
        assert!(has(&v, "no valid binding signature"), "{:?}", v.stripped);
    }

    #[test]
    fn message_packets_are_refused() {
        let mut bytes = binary(ALICE);
        // An (empty, uncompressed) Compressed Data packet.
        bytes.extend_from_slice(&[0xC8, 0x01, 0x00]);
        let e = check(&armor_public_key(&bytes)).unwrap_err();
        assert!(matches!(e, KeyRejection::Malformed(_)), "{e:?}");
    }

    #[test]
    fn garbage_is_refused_not_a_panic() {
        assert!(matches!(check("hello"), Err(KeyRejection::Malformed(_))));
        assert!(matches!(
            check(&armor_public_key(b"\x99\x00\x01\x04garbage")),
            Err(KeyRejection::Malformed(_))
        ));
        // Truncated key.
        let bytes = binary(ALICE);
        for len in [1, 10, 50, bytes.len() / 2, bytes.len() - 1] {
            assert!(check(&armor_public_key(&bytes[..len])).is_err());
        }
    }

    #[test]
    fn reasons() {
        assert_eq!(KeyRejection::SecretKey.reason(), Reason::SecretKey);
        assert_eq!(
            KeyRejection::TooLarge { limit: 1 }.reason(),
            Reason::KeyTooLarge
        );
        assert_eq!(
            KeyRejection::TooManyPackets { limit: 1 }.reason(),
            Reason::KeyTooLarge
        );
        assert_eq!(
            KeyRejection::TooManySelfSignatures { limit: 1 }.reason(),
            Reason::KeyTooLarge
        );
        assert_eq!(KeyRejection::NoCertificate.reason(), Reason::BadKey);
        assert_eq!(KeyRejection::Malformed("x".into()).reason(), Reason::BadKey);
        assert_eq!(
            KeyRejection::SeveralCertificates(2).reason(),
            Reason::SeveralKeys
        );
        assert_eq!(KeyRejection::Expired { at: 0 }.reason(), Reason::KeyExpired);
        let weak = "DSA".to_string();
        assert_eq!(
            KeyRejection::WeakPrimaryKey {
                algorithm: weak.clone()
            }
            .reason(),
            Reason::WeakAlgorithm
        );
        assert_eq!(
            KeyRejection::WeakSubkey {
                fingerprint: "AB".into(),
                algorithm: weak
            }
            .reason(),
            Reason::WeakAlgorithm
        );
        assert_eq!(
            KeyRejection::WeakSelfSignatureHash {
                hash: "SHA1".into()
            }
            .reason(),
            Reason::WeakAlgorithm
        );
        assert_eq!(
            KeyRejection::NoMatchingUserId {
                account: alice(),
                found: vec![]
            }
            .reason(),
            Reason::NoMatchingUserId
        );
        assert_eq!(
            KeyRejection::UserIdRevoked { account: alice() }.reason(),
            Reason::UserIdRevoked
        );
        assert_eq!(
            KeyRejection::UserIdNotSelfSigned { account: alice() }.reason(),
            Reason::BadSelfSignature
        );
        assert_eq!(
            KeyRejection::NoValidSelfSignature.reason(),
            Reason::BadSelfSignature
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_577_923_200 + 3_660), "2020-01-02 01:01 UTC");
        assert_eq!(format_utc(4_102_444_799), "2099-12-31 23:59 UTC");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = check(&armor_public_key(&bytes));
        }

        #[test]
        fn mutated_keys_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = ok(ALICE).packets;
            for (i, b) in edits {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let end = bytes.len() - cut.index(bytes.len() / 4 + 1);
            let _ = check(&armor_public_key(&bytes[..end]));
        }
    }
}
