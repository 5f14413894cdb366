//! Wire constants of the KST protocol (versions 1, 2 and 3): header names, statuses, refusal
//! reasons, and the version negotiation (paper VI.B, algorithm agility).
//!
//! `docs/PROTOCOL.md` is the normative description; this module is its code form.

use std::fmt;
use std::str::FromStr;

/// Protocol version 1: what a request without `KST-Protocol` (an older client) is answered in.
pub const PROTOCOL_VERSION: u32 = 1;
/// The newest protocol version a KST without a key directory speaks.
pub const LATEST_VERSION: u32 = 2;
/// Every protocol version a KST without a key directory speaks, oldest first.
pub const VERSIONS: [u32; 2] = [1, 2];
/// Protocol version 3: version 2 plus the key directory's answer (signed head and proof) in
/// every reply about an address, covered by the HMAC, and the request's question bound into
/// every tag. A KST speaks it only for a domain that has a key directory.
pub const TRANSPARENCY_VERSION: u32 = 3;
/// Every protocol version a KST with a key directory speaks, oldest first.
pub const VERSIONS_WITH_DIRECTORY: [u32; 3] = [1, 2, 3];
/// The one MAC algorithm of versions 1, 2 and 3: HMAC-SHA256 keyed with K_auth.
pub const MAC_HMAC_SHA256: &str = "hmac-sha256";
/// Line that opens the key directory's answer in a version 3 reply (after the HMAC line).
pub const LOG_ANSWER_BEGIN: &str = "-----BEGIN KST LOG ANSWER-----";
/// Line that closes the key directory's answer in a version 3 reply.
pub const LOG_ANSWER_END: &str = "-----END KST LOG ANSWER-----";
/// Largest key directory answer block a version 3 reply may carry (bytes between the markers,
/// folded). A lookup proof at 10⁶ entries is a few KiB; the append-only proof from the
/// client's remembered head (`KST-Log-Since`) and the witnesses' part (`KST-Log-Witnessed`,
/// up to 1024 heads) need more. A KST leaves out the witnesses' part, then the append-only
/// proof, of an answer that would not fit (the client then reports what it lacks).
pub const MAX_LOG_ANSWER_BYTES: usize = 2 * 1024 * 1024;
/// Longest line of a folded answer block (continuation lines start with one space).
pub const LOG_ANSWER_LINE: usize = 76;

/// Request header (version 3): the epoch of the newest key directory head the client
/// remembers for the domain; the reply's answer then carries the append-only proof from that
/// epoch ([`LogAsk`]).
pub const HEADER_LOG_SINCE: &str = "KST-Log-Since";
/// Request header (version 3): `1` when the client requires witnesses; the reply's answer then
/// carries the witnesses' cosignatures and the heads and proof from them ([`LogAsk`]).
pub const HEADER_LOG_WITNESSED: &str = "KST-Log-Witnessed";
/// Longest `KST-Log-*` header value read (longer ones are ignored).
pub const MAX_LOG_HEADER_VALUE: usize = 64;

/// Request and reply header: the protocol version. A request lists the versions its client
/// speaks (`KST-Protocol: 2, 1`); a reply names the one it is written in.
pub const HEADER_PROTOCOL: &str = "KST-Protocol";
/// Request and reply header (version 2): the MAC algorithm. A request lists those its client
/// accepts (`KST-MAC: hmac-sha256`); a reply names the one its HMAC line uses.
pub const HEADER_MAC: &str = "KST-MAC";
/// Reply header: [`Status`].
pub const HEADER_STATUS: &str = "KST-Status";
/// Reply header: the address the reply is about (queried or published), normalized.
pub const HEADER_ADDRESS: &str = "KST-Address";
/// Reply header: fingerprint of the carried key (uppercase hex).
pub const HEADER_FINGERPRINT: &str = "KST-Fingerprint";
/// Reply header: [`Reason`] of a refusal.
pub const HEADER_REASON: &str = "KST-Reason";

/// First line of a deletion request body (then K_auth); compared case-insensitively.
pub const DELETE_COMMAND: &str = "DELETE";

/// Armor line that opens a public key block.
pub const PUBLIC_KEY_BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
/// Armor line that closes a public key block.
pub const PUBLIC_KEY_END: &str = "-----END PGP PUBLIC KEY BLOCK-----";

/// What a reply says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Confirmation of a publication: the reply carries the key as published.
    Published,
    /// Key response: the reply carries the stored key.
    Found,
    /// Key response: no key is published for the queried address.
    NotFound,
    /// The request was refused; [`Reason`] says why.
    Refused,
    /// Confirmation of a deletion: no key is published for the account any more.
    Deleted,
}

impl Status {
    /// The wire token.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Published => "published",
            Status::Found => "found",
            Status::NotFound => "not-found",
            Status::Refused => "refused",
            Status::Deleted => "deleted",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s.trim() {
            "published" => Status::Published,
            "found" => Status::Found,
            "not-found" => Status::NotFound,
            "refused" => Status::Refused,
            "deleted" => Status::Deleted,
            _ => return Err(()),
        })
    }
}

/// Why a request was refused. Each has a stable wire token and an explanation for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A publication without an authenticated submission recorded by a trusted MTA.
    NotAuthenticated,
    /// The From header or envelope sender differs from the authenticated account.
    SenderMismatch,
    /// The authenticated login maps to no address of a served domain.
    UnknownAccount,
    /// The address (published or queried) is not in a domain this KST serves.
    DomainNotServed,
    /// The key block is not a readable OpenPGP public key: armor or packets unreadable, an
    /// OpenPGP message instead of a key, or no public key in it.
    BadKey,
    /// The key block holds several public keys (certificates).
    SeveralKeys,
    /// The key block is larger, or holds more packets or self-signatures, than the operator
    /// allows.
    KeyTooLarge,
    /// The key (primary key or a live subkey) or its User ID's self-signature uses an algorithm,
    /// key size or hash that is no longer safe.
    WeakAlgorithm,
    /// No User ID of the key holds the authenticated account's address.
    NoMatchingUserId,
    /// The User ID with the account's address has been revoked by the key holder.
    UserIdRevoked,
    /// The User ID with the account's address carries no valid self-signature (or nothing on
    /// the key verifies, or its self-signature is dated in the future).
    BadSelfSignature,
    /// The key has expired.
    KeyExpired,
    /// A secret (private) key was sent.
    SecretKey,
    /// K_auth is missing or not base64 of exactly 32 bytes.
    BadAuthKey,
    /// The queried address is not a single plain address.
    BadAddress,
    /// The body matches neither request format.
    Malformed,
    /// The request's `KST-Protocol` or `KST-MAC` names no version or MAC algorithm this KST
    /// speaks.
    UnsupportedVersion,
}

impl Reason {
    /// Every reason, for docs and tests.
    pub const ALL: [Reason; 17] = [
        Reason::NotAuthenticated,
        Reason::SenderMismatch,
        Reason::UnknownAccount,
        Reason::DomainNotServed,
        Reason::BadKey,
        Reason::SeveralKeys,
        Reason::KeyTooLarge,
        Reason::WeakAlgorithm,
        Reason::NoMatchingUserId,
        Reason::UserIdRevoked,
        Reason::BadSelfSignature,
        Reason::KeyExpired,
        Reason::SecretKey,
        Reason::BadAuthKey,
        Reason::BadAddress,
        Reason::Malformed,
        Reason::UnsupportedVersion,
    ];

    /// The wire token.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotAuthenticated => "not-authenticated",
            Reason::SenderMismatch => "sender-mismatch",
            Reason::UnknownAccount => "unknown-account",
            Reason::DomainNotServed => "domain-not-served",
            Reason::BadKey => "bad-key",
            Reason::SeveralKeys => "several-keys",
            Reason::KeyTooLarge => "key-too-large",
            Reason::WeakAlgorithm => "weak-algorithm",
            Reason::NoMatchingUserId => "no-matching-user-id",
            Reason::UserIdRevoked => "user-id-revoked",
            Reason::BadSelfSignature => "bad-self-signature",
            Reason::KeyExpired => "key-expired",
            Reason::SecretKey => "secret-key",
            Reason::BadAuthKey => "bad-auth-key",
            Reason::BadAddress => "bad-address",
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported-version",
        }
    }

    /// What the requester should know and do.
    pub fn explanation(self) -> &'static str {
        match self {
            Reason::NotAuthenticated => {
                "A key can only be published through your provider's authenticated submission \
                 server (port 587 with your login). This message was not submitted that way, so \
                 nothing was published."
            }
            Reason::SenderMismatch => {
                "The From address or envelope sender of this message is not the account you \
                 logged in with. Keys are published only for the authenticated account; send \
                 from that address."
            }
            Reason::UnknownAccount => {
                "Your login is not mapped to an address that this key service serves. Ask your \
                 provider's postmaster."
            }
            Reason::DomainNotServed => "This key service does not serve that address's domain.",
            Reason::BadKey => {
                "The key block could not be read as an OpenPGP public key (certificate). \
                 Export it with `gpg --armor --export ADDRESS` and send it again."
            }
            Reason::SeveralKeys => {
                "The key block holds several public keys. Send exactly one: \
                 `gpg --armor --export FINGERPRINT`."
            }
            Reason::KeyTooLarge => {
                "The key block is larger, or carries more packets or self-signatures, than this \
                 key service accepts. Export it without third-party signatures \
                 (`gpg --export-options export-minimal --armor --export ADDRESS`) and send it again."
            }
            Reason::WeakAlgorithm => {
                "The key, one of its live subkeys, or the self-signature of its User ID uses an \
                 algorithm, key size or hash that is no longer safe. Create a new key (or renew \
                 the self-signature with SHA-256) and publish that."
            }
            Reason::NoMatchingUserId => {
                "No User ID of the key holds the address you are logged in as. Add it \
                 (`gpg --quick-add-uid FINGERPRINT ADDRESS`) and send the key again."
            }
            Reason::UserIdRevoked => {
                "The User ID with your address has been revoked on this key. To stop publishing \
                 a key, send a deletion request instead."
            }
            Reason::BadSelfSignature => {
                "The User ID with your address is not validly signed by the key itself (or no \
                 self-signature on the key verifies, or it is dated in the future: check the \
                 clock of the computer that made it). Export the key from the computer that \
                 holds its secret key and send it again."
            }
            Reason::KeyExpired => {
                "The key has expired. Extend it (`gpg --quick-set-expire FINGERPRINT 2y '*'`) \
                 and send it again."
            }
            Reason::SecretKey => {
                "You sent a SECRET key. It has now left your machine and passed through mail \
                 servers: consider it compromised, revoke it, create a new key and publish only \
                 its public part. Nothing was stored."
            }
            Reason::BadAuthKey => {
                "The line after the key block (publication) or after the address (retrieval) \
                 must be K_auth: 32 random bytes in base64 (44 characters)."
            }
            Reason::BadAddress => "The queried address is not a single plain email address.",
            Reason::Malformed => {
                "The message body matches neither request format. A publication is an \
                 ASCII-armored public key block followed by a line with K_auth; a retrieval is a \
                 line with the queried address followed by a line with K_auth; a deletion is a \
                 line DELETE followed by a line with K_auth."
            }
            Reason::UnsupportedVersion => {
                "Your client asked for a KST protocol version or MAC algorithm that this key \
                 service does not speak (it speaks versions 1 and 2 with hmac-sha256, and \
                 version 3 for a domain with a key directory). Update the client, or ask \
                 without KST-Protocol for version 1."
            }
        }
    }
}

/// Why no version could be agreed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionMismatch {
    /// `KST-Protocol` names no version this release speaks (or is not a list of numbers).
    #[error(
        "the request asks for KST protocol version(s) {0:?}; this KST speaks 1 and 2 (and 3 for a domain with a key directory)"
    )]
    Version(String),
    /// `KST-MAC` names no MAC algorithm this release speaks.
    #[error("the request accepts the MAC algorithm(s) {0:?}; this KST signs with hmac-sha256")]
    Mac(String),
}

/// The version to answer a request in, from its `KST-Protocol` and `KST-MAC` headers: the
/// newest version both sides speak. No `KST-Protocol` header is version 1 (clients older than
/// version negotiation); version 2 needs `hmac-sha256` among the `KST-MAC` algorithms (a
/// missing `KST-MAC` means hmac-sha256).
pub fn negotiate(protocol: Option<&str>, mac: Option<&str>) -> Result<u32, VersionMismatch> {
    negotiate_among(protocol, mac, &VERSIONS)
}

/// [`negotiate`] among `speaks` (the versions the KST speaks for the request's domain:
/// [`VERSIONS`], or [`VERSIONS_WITH_DIRECTORY`] when the domain has a key directory).
pub fn negotiate_among(
    protocol: Option<&str>,
    mac: Option<&str>,
    speaks: &[u32],
) -> Result<u32, VersionMismatch> {
    let Some(protocol) = protocol else {
        return Ok(PROTOCOL_VERSION);
    };
    let asked = protocol.trim();
    let versions: Option<Vec<u32>> = asked
        .split(',')
        .take(16)
        .map(|v| v.trim().parse::<u32>().ok())
        .collect();
    let version = versions
        .and_then(|vs| vs.into_iter().filter(|v| speaks.contains(v)).max())
        .ok_or_else(|| VersionMismatch::Version(clip(asked)))?;
    if version >= 2
        && let Some(mac) = mac
        && !mac
            .split(',')
            .take(16)
            .any(|m| m.trim().eq_ignore_ascii_case(MAC_HMAC_SHA256))
    {
        return Err(VersionMismatch::Mac(clip(mac.trim())));
    }
    Ok(version)
}

/// What a request asked, as version 3 binds it into every tag of its reply: a reply made for
/// a copy of the request whose question was changed (another query, another kind of request)
/// does not verify for the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question<'a> {
    /// A publication (any key block, or a secret key sent by mistake).
    Publish,
    /// A retrieval, with its query line exactly as the request wrote it (trimmed).
    Retrieve(&'a str),
    /// A deletion.
    Delete,
}

impl Question<'_> {
    /// The question's text: `publish`, `retrieve <query>` or `delete`.
    pub fn text(&self) -> String {
        match self {
            Question::Publish => "publish".into(),
            Question::Retrieve(query) => format!("retrieve {}", query.trim()),
            Question::Delete => "delete".into(),
        }
    }
}

/// What a version 3 request asks of the key directory's answer besides the head and the
/// proof for the address: the `KST-Log-Since` and `KST-Log-Witnessed` headers, read by
/// [`LogAsk::from_headers`]. Only a hint: the client checks what it gets, so a value the KST
/// cannot use is ignored (logged), never refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogAsk {
    /// The epoch of the client's remembered head (never 0: the empty tree needs no proof).
    pub since: Option<u64>,
    /// The client requires witnesses.
    pub witnessed: bool,
}

impl LogAsk {
    /// Reads every value of `KST-Log-Since` (`since`) and `KST-Log-Witnessed`
    /// (`witnessed`), top to bottom. A header is used when it appears exactly once with a
    /// usable value: for `since` 1 to 20 ASCII digits that fit in 64 bits (`0` means none),
    /// for `witnessed` the value `1`; surrounding whitespace is ignored and values longer than
    /// [`MAX_LOG_HEADER_VALUE`] are not read. Returns what is used and, for each header
    /// ignored, a line saying why (for the log).
    pub fn from_headers<'a>(
        since: impl IntoIterator<Item = &'a str>,
        witnessed: impl IntoIterator<Item = &'a str>,
    ) -> (LogAsk, Vec<String>) {
        let mut ignored = Vec::new();
        let since = match one_value(HEADER_LOG_SINCE, since, &mut ignored) {
            Some(v) if (1..=20).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()) => {
                match v.parse::<u64>() {
                    Ok(0) => None,
                    Ok(epoch) => Some(epoch),
                    Err(_) => {
                        ignored.push(format!("{HEADER_LOG_SINCE}: {v} is too large"));
                        None
                    }
                }
            }
            Some(v) => {
                ignored.push(format!("{HEADER_LOG_SINCE}: {:?} is not an epoch", clip(v)));
                None
            }
            None => None,
        };
        let witnessed = match one_value(HEADER_LOG_WITNESSED, witnessed, &mut ignored) {
            Some("1") => true,
            Some(v) => {
                ignored.push(format!("{HEADER_LOG_WITNESSED}: {:?} is not 1", clip(v)));
                false
            }
            None => false,
        };
        (LogAsk { since, witnessed }, ignored)
    }
}

/// The one value of header `name` among `values` (trimmed), or `None` (noting why in
/// `ignored` when the header is there but unusable: repeated or too long).
fn one_value<'a>(
    name: &str,
    values: impl IntoIterator<Item = &'a str>,
    ignored: &mut Vec<String>,
) -> Option<&'a str> {
    let mut values = values.into_iter();
    let first = values.next()?;
    let more = values.count();
    if more > 0 {
        ignored.push(format!("{name} appears {} times", more + 1));
        return None;
    }
    if first.len() > MAX_LOG_HEADER_VALUE {
        ignored.push(format!(
            "{name} is longer than {MAX_LOG_HEADER_VALUE} bytes"
        ));
        return None;
    }
    Some(first.trim())
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or(())
    }
}

#[cfg(test)]
#[path = "protocol_version_tests.rs"]
mod version_tests;

#[cfg(test)]
#[path = "protocol_v3_tests.rs"]
mod v3_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_tokens_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "duplicate token {r}");
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{r}"
            );
            assert!(!r.explanation().is_empty());
        }
        assert_eq!("key-revoked".parse::<Reason>(), Err(()));
    }

    #[test]
    fn the_newest_shared_version_is_chosen() {
        assert_eq!(negotiate(None, None), Ok(1));
        assert_eq!(negotiate(Some("1"), None), Ok(1));
        assert_eq!(negotiate(Some("2, 1"), Some("hmac-sha256")), Ok(2));
        assert_eq!(negotiate(Some("2"), None), Ok(2));
        assert_eq!(negotiate(Some(" 3,2 "), Some("x-new, HMAC-SHA256")), Ok(2));
        assert_eq!(negotiate(Some("1, 3"), Some("x-new")), Ok(1));
        // Version 3 only where the domain has a key directory.
        let with = &VERSIONS_WITH_DIRECTORY;
        assert_eq!(negotiate_among(Some("3, 2, 1"), None, with), Ok(3));
        assert_eq!(negotiate_among(Some("3, 2, 1"), None, &VERSIONS), Ok(2));
        assert_eq!(negotiate_among(Some("2, 1"), None, with), Ok(2));
        assert_eq!(negotiate_among(None, None, with), Ok(1));
        assert!(matches!(
            negotiate_among(Some("3"), Some("hmac-sha3-256"), with),
            Err(VersionMismatch::Mac(_))
        ));
        assert!(matches!(
            negotiate(Some("3"), None),
            Err(VersionMismatch::Version(v)) if v == "3"
        ));
        assert!(matches!(
            negotiate(Some("two"), None),
            Err(VersionMismatch::Version(_))
        ));
        assert!(matches!(
            negotiate(Some("2"), Some("hmac-sha3-256")),
            Err(VersionMismatch::Mac(_))
        ));
    }

    /// The `KST-Log-*` request headers: used when present once with a usable value;
    /// anything else is ignored with a reason, never an error (header fuzz).
    #[test]
    fn log_headers_are_read_strictly_and_bad_ones_ignored() {
        let ask = |since: &[&str], witnessed: &[&str]| {
            LogAsk::from_headers(since.iter().copied(), witnessed.iter().copied())
        };
        assert_eq!(ask(&[], &[]), (LogAsk::default(), vec![]));
        assert_eq!(
            ask(&[" 5\r\n"], &[" 1\r\n"]),
            (
                LogAsk {
                    since: Some(5),
                    witnessed: true
                },
                vec![]
            )
        );
        assert_eq!(ask(&["18446744073709551615"], &[]).0.since, Some(u64::MAX));
        assert_eq!(ask(&["0"], &[]), (LogAsk::default(), vec![]));
        assert_eq!(ask(&["007"], &[]).0.since, Some(7));
        let huge = "9".repeat(10_000);
        for bad in [
            "18446744073709551616",
            "99999999999999999999",
            "123456789012345678901",
            huge.as_str(),
            "-1",
            "+1",
            "1e3",
            "0x10",
            "5 6",
            "5\r\n 6",
            "",
            "five",
            "٣",
        ] {
            let (got, why) = ask(&[bad], &[]);
            assert_eq!(got, LogAsk::default(), "{bad:?}");
            assert_eq!(why.len(), 1, "{bad:?}: {why:?}");
            assert!(why[0].starts_with(HEADER_LOG_SINCE), "{why:?}");
            assert!(why[0].len() < 200, "the log line is bounded: {why:?}");
        }
        // Repeated: ambiguous, so neither value is used.
        let (got, why) = ask(&["5", "5"], &["1", "1"]);
        assert_eq!(got, LogAsk::default());
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("appears 2 times"), "{why:?}");
        for bad in ["0", "yes", "true", "11", "", "1 1"] {
            let (got, why) = ask(&[], &[bad]);
            assert!(!got.witnessed, "{bad:?}");
            assert_eq!(why.len(), 1, "{bad:?}");
        }
    }

    /// docs/PROTOCOL.md lists every reason token, and no other.
    #[test]
    fn protocol_md_lists_every_reason() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
                .expect("docs/PROTOCOL.md");
        let section = doc
            .split("## Refusal reasons")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("a Refusal reasons section");
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|t| *t != "KST-Reason")
            .collect();
        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(listed, all);
    }
}
