//! [`KeyRejection`]: why a key was refused, with a message that says what to do, and its protocol reason.

use crate::address::Address;
use crate::protocol::Reason;
use crate::time::civil;

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
    /// The certificate, reduced to what kst publishes, is still larger than the budget.
    #[error(
        "the key is {size} bytes even after kst kept only its newest self-signatures, more \
         than the {limit} bytes it publishes; remove large notations and unneeded User IDs and \
         subkeys (gpg --edit-key FINGERPRINT minimize save) and send it again"
    )]
    PublishedTooLarge {
        /// Size of the reduced certificate, in bytes.
        size: usize,
        /// The budget ([`KeyPolicy::max_published_bytes`](super::KeyPolicy::max_published_bytes)).
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
    /// The matching User ID's only self-signatures that verify are dated in the future: the
    /// clock of the computer that made them runs ahead (or this KST's runs behind).
    #[error("{}", future_message(*at, *now, *key_created))]
    SignedInTheFuture {
        /// Creation time of the newest such self-signature, seconds since the Unix epoch.
        at: u64,
        /// This KST's clock when it checked, seconds since the Unix epoch.
        now: u64,
        /// When the primary key was made (also in the future when the clock ran ahead then).
        key_created: u64,
    },
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
        format_utc_minutes(*at)
    )]
    Expired {
        /// When it expired, seconds since the Unix epoch.
        at: u64,
    },
}

fn future_message(at: u64, now: u64, key_created: u64) -> String {
    let mut m = format!(
        "the self-signature of your User ID is dated {}, in the future: this key service's \
         clock says {}. The clock of the computer that made it runs ahead; check it (date -u; \
         turn on network time) ",
        format_utc_minutes(at),
        format_utc_minutes(now)
    );
    if key_created > now {
        m.push_str(&format!(
            "and make a new key (this one says it was made at {}), or send this key again after \
             that time",
            format_utc_minutes(key_created.max(at))
        ));
    } else {
        m.push_str(
            "and renew the self-signature (gpg --quick-set-expire FINGERPRINT 2y '*') before \
             sending the key again",
        );
    }
    m
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
            | KeyRejection::PublishedTooLarge { .. }
            | KeyRejection::TooManyPackets { .. }
            | KeyRejection::TooManySelfSignatures { .. } => Reason::KeyTooLarge,
            KeyRejection::Malformed(_) | KeyRejection::NoCertificate => Reason::BadKey,
            KeyRejection::SeveralCertificates(_) => Reason::SeveralKeys,
            KeyRejection::WeakPrimaryKey { .. }
            | KeyRejection::WeakSubkey { .. }
            | KeyRejection::WeakSelfSignatureHash { .. } => Reason::WeakAlgorithm,
            KeyRejection::NoMatchingUserId { .. } => Reason::NoMatchingUserId,
            KeyRejection::UserIdRevoked { .. } => Reason::UserIdRevoked,
            KeyRejection::UserIdNotSelfSigned { .. }
            | KeyRejection::NoValidSelfSignature
            | KeyRejection::SignedInTheFuture { .. } => Reason::BadSelfSignature,
            KeyRejection::Expired { .. } => Reason::KeyExpired,
        }
    }
}

/// `secs` as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian calendar), for people to read.
pub(super) fn format_utc_minutes(secs: u64) -> String {
    let c = civil(secs);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        c.year, c.month, c.day, c.hour, c.minute
    )
}
