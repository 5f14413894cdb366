//! Web Key Service submissions (GnuPG's `gpg-wks-client`): recognize, decrypt, extract the key.
//!
//! A WKS key submission (draft-koch-openpgp-webkey-service, section 4.2) is a mail to the
//! submission address (`keys@<domain>`) that carries the user's key as `application/pgp-keys`,
//! either in clear or, as `gpg-wks-client --create` sends it, inside PGP/MIME
//! (`multipart/encrypted; protocol="application/pgp-encrypted"`, RFC 3156) encrypted to the
//! domain's submission key. kst runs WKS with `auth-submit`: the submission is a publication like
//! the paper's, authenticated by the provider's MTA and checked by the same key policy; the
//! draft's confirmation request is never used.
//!
//! This module does no authentication and no key policy. [`recognize`] looks only at the MIME
//! structure (no cryptography, so an unauthenticated sender costs kst no decryption);
//! [`extract_key`] decrypts with the domain's [`SubmissionKey`] and returns the armored key.
//! Every size and nesting depth is bounded, and errors say what was wrong and what to do.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::SystemTime;

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};
use pgp::armor::DearmorOptions;
use pgp::composed::{Deserializable, Message as PgpMessage, SignedPublicKey, SignedSecretKey};
use pgp::errors::Error as PgpError;
use pgp::types::{KeyDetails, Password};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::address::Address;
use crate::openpgp::armor_public_key;
use crate::protocol::{PUBLIC_KEY_BEGIN, Reason};
use crate::store::NewKey;
use crate::validate::{KeyPolicy, validate};

/// The header every WKS message carries (`Wks-Draft-Version: 3` from GnuPG 2.2).
pub const HEADER_WKS_DRAFT_VERSION: &str = "Wks-Draft-Version";

/// Most bytes of the armored PGP message in an encrypted submission (a 1 MiB key, base64 and
/// encryption overhead included, stays below this).
pub const MAX_ENCRYPTED_BYTES: usize = 2 << 20;

/// Most bytes of the decrypted MIME entity beyond the key policy's own key cap (its headers).
const PLAINTEXT_HEADROOM: usize = 16 << 10;

/// Most compression layers unpacked inside an encrypted submission (GnuPG sends none).
const MAX_COMPRESSION_LAYERS: usize = 1;

/// Most direct children of a `multipart/mixed` submission that are looked at.
const MAX_CHILD_PARTS: usize = 16;

/// Largest armored secret key file read for a [`SubmissionKey`].
pub const MAX_SECRET_KEY_BYTES: usize = 64 << 10;

/// The WKS submission key of one domain (`keys@<domain>`): an OpenPGP secret key without a
/// passphrase.
///
/// Its secret parts are zeroized when it is dropped (rPGP's secret parameter types do that) and
/// it is never printed: `Debug` shows only the fingerprint, and it has no `Display`.
pub struct SubmissionKey {
    key: SignedSecretKey,
    fingerprint: String,
}

impl fmt::Debug for SubmissionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmissionKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a submission key file was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmissionKeyError {
    /// The file is larger than [`MAX_SECRET_KEY_BYTES`].
    #[error(
        "the submission key file is larger than {MAX_SECRET_KEY_BYTES} bytes; it should hold \
         one armored secret key (kst wks keygen writes one)"
    )]
    TooLarge,
    /// Not an armored secret key.
    #[error(
        "the submission key file is not an armored OpenPGP secret key ({0}); write one with \
         `kst wks keygen` or `gpg --armor --export-secret-keys keys@DOMAIN`"
    )]
    Unreadable(String),
    /// The key has no encryption-capable secret subkey.
    #[error(
        "the submission key {0} has no encryption subkey, so gpg-wks-client cannot encrypt to \
         it; make one with `kst wks keygen`"
    )]
    NoEncryptionSubkey(String),
    /// A secret part is protected by a passphrase.
    #[error(
        "the submission key {0} is protected by a passphrase; kst needs it without one (keep the \
         file mode 0600 instead): `gpg --passwd` to remove it, then export again"
    )]
    Passphrase(String),
}

impl SubmissionKey {
    /// Reads an ASCII-armored secret key (a `PGP PRIVATE KEY BLOCK`). The text is the caller's
    /// to zeroize; see [`SubmissionKey::from_file_contents`] for file contents.
    pub fn from_armored(text: &str) -> Result<Self, SubmissionKeyError> {
        if text.len() > MAX_SECRET_KEY_BYTES {
            return Err(SubmissionKeyError::TooLarge);
        }
        let parsed = catch_unwind(AssertUnwindSafe(|| SignedSecretKey::from_string(text)))
            .map_err(|_| SubmissionKeyError::Unreadable("the OpenPGP library failed on it".into()))?
            .map_err(|e| SubmissionKeyError::Unreadable(e.to_string()))?;
        let key = parsed.0;
        let fingerprint = format!("{:X}", key.fingerprint());
        if !key
            .secret_subkeys
            .iter()
            .any(|k| k.key.algorithm().can_encrypt())
        {
            return Err(SubmissionKeyError::NoEncryptionSubkey(fingerprint));
        }
        let protected = key.primary_key.secret_params().is_encrypted()
            || key
                .secret_subkeys
                .iter()
                .any(|k| k.key.secret_params().is_encrypted());
        if protected {
            return Err(SubmissionKeyError::Passphrase(fingerprint));
        }
        Ok(SubmissionKey { key, fingerprint })
    }

    /// Reads the contents of a key file holding an armored secret key; the bytes are zeroized
    /// when this returns, whatever the outcome.
    pub fn from_file_contents(bytes: Vec<u8>) -> Result<Self, SubmissionKeyError> {
        let bytes = Zeroizing::new(bytes);
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| SubmissionKeyError::Unreadable("the file is not text".into()))?;
        Self::from_armored(text)
    }

    /// The primary key's fingerprint, uppercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The public part (certificate) as binary packets, for the WKD to publish so that
    /// `gpg-wks-client` can encrypt to it.
    pub fn public_packets(&self) -> Result<Vec<u8>, String> {
        use pgp::ser::Serialize;
        let public: SignedPublicKey = self.key.to_public_key();
        public.to_bytes().map_err(|e| e.to_string())
    }

    /// The public part as a publication for `service` (`keys@<domain>`), checked by the same
    /// key policy as users' keys (so its User ID must hold that address). Publishing it puts it
    /// in the WKD, where `gpg-wks-client --create` looks for it. The same key gives the same
    /// publication id, so publishing it again adds no version.
    pub fn publication(&self, service: &Address, policy: &KeyPolicy) -> Result<NewKey, String> {
        let packets = self.public_packets()?;
        let armored = armor_public_key(&packets);
        let valid = validate(&armored, service, policy, SystemTime::now())
            .map_err(|e| format!("the submission key does not pass the key policy: {e}"))?;
        let mut h = Sha256::new();
        h.update(b"kst-wks-submission-key-v1\0");
        h.update(&valid.packets);
        Ok(NewKey {
            address: service.clone(),
            key: valid.packets,
            fingerprint: valid.fingerprint,
            publication_id: hex::encode(h.finalize()),
            published_at: crate::time::unix_now(),
            revoked: valid.revoked,
            expected: crate::store::Expected::Any,
        })
    }
}

/// The submission keys of the served domains, by domain (lowercase A-label).
#[derive(Debug, Default)]
pub struct SubmissionKeys {
    by_domain: BTreeMap<String, SubmissionKey>,
}

impl SubmissionKeys {
    /// No keys: encrypted submissions are refused with [`WksError::NoSubmissionKey`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the key of `domain`.
    pub fn insert(&mut self, domain: &str, key: SubmissionKey) {
        self.by_domain.insert(domain.to_ascii_lowercase(), key);
    }

    /// The key of `domain`, if one is configured.
    pub fn get(&self, domain: &str) -> Option<&SubmissionKey> {
        self.by_domain.get(&domain.to_ascii_lowercase())
    }

    /// Each domain with its key, in domain order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SubmissionKey)> {
        self.by_domain.iter().map(|(d, k)| (d.as_str(), k))
    }

    /// True when no domain has a key.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }
}

/// A recognized WKS submission, before any cryptography.
#[derive(Clone, PartialEq, Eq)]
pub enum Submission {
    /// PGP/MIME: the armored `PGP MESSAGE` of the `application/octet-stream` part.
    Encrypted(Vec<u8>),
    /// `application/pgp-keys` in clear: the part's decoded contents (armored or binary).
    Plain(Vec<u8>),
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Submission::Encrypted(b) => write!(f, "Encrypted(<{} bytes>)", b.len()),
            Submission::Plain(b) => write!(f, "Plain(<{} bytes>)", b.len()),
        }
    }
}

/// Why a WKS submission yielded no key. Every message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WksError {
    /// The MIME structure is not one of the submission shapes.
    #[error(
        "the WKS message is not a key submission ({0}); send the key with \
         `gpg-wks-client --create FINGERPRINT ADDRESS` or as application/pgp-keys"
    )]
    NotASubmission(String),
    /// A WKS message other than a submission (a confirmation response, ...).
    #[error(
        "the WKS message is a {0}, not a key submission; this service publishes on \
         authenticated submission at once (auth-submit) and needs no confirmation"
    )]
    OtherWksMessage(String),
    /// A part or the decrypted data is larger than allowed.
    #[error("the {what} is larger than {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The cap.
        limit: usize,
    },
    /// The domain has no submission key configured.
    #[error(
        "this service has no WKS submission key for {0}, so it cannot read encrypted \
         submissions; send the key unencrypted as application/pgp-keys through authenticated \
         submission, or ask the postmaster to run `kst wks keygen`"
    )]
    NoSubmissionKey(String),
    /// Encrypted, but not to the domain's submission key.
    #[error(
        "the submission is not encrypted to this service's submission key {0}; run \
         gpg-wks-client --create again (it fetches the current key by WKD)"
    )]
    WrongKey(String),
    /// The encrypted part could not be read or decrypted.
    #[error("the encrypted part could not be decrypted ({0}); run gpg-wks-client --create again")]
    Undecryptable(String),
    /// The decrypted data has more than one compression layer.
    #[error("the decrypted data nests compression more than {MAX_COMPRESSION_LAYERS} deep")]
    TooDeep,
}

impl WksError {
    /// The refusal reason sent in `KST-Reason`.
    pub fn reason(&self) -> Reason {
        match self {
            WksError::TooLarge { .. } => Reason::KeyTooLarge,
            WksError::NotASubmission(_)
            | WksError::OtherWksMessage(_)
            | WksError::NoSubmissionKey(_)
            | WksError::WrongKey(_)
            | WksError::Undecryptable(_)
            | WksError::TooDeep => Reason::Malformed,
        }
    }
}

/// `type/subtype` of a part, lowercase (`text/plain` when it has no Content-Type).
fn mime_type(part: &mail_parser::MessagePart<'_>) -> String {
    match part.content_type() {
        Some(ct) => format!(
            "{}/{}",
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("").to_ascii_lowercase()
        ),
        None => "text/plain".into(),
    }
}

/// True when `msg` is meant as a WKS message: it has a `Wks-Draft-Version` header, or its
/// top-level type is `multipart/encrypted` or `application/pgp-keys` (which a paper-style request,
/// a text/plain body, never is).
pub fn is_wks(msg: &Message<'_>) -> bool {
    if crate::service::header_value(msg, HEADER_WKS_DRAFT_VERSION).is_some() {
        return true;
    }
    msg.parts.first().is_some_and(|root| {
        matches!(
            mime_type(root).as_str(),
            "multipart/encrypted" | "application/pgp-keys"
        )
    })
}

/// Recognizes a WKS submission by its MIME structure alone: `None` when `msg` is not a WKS
/// message at all ([`is_wks`]), else the submission or why it is not one.
pub fn recognize(msg: &Message<'_>) -> Option<Result<Submission, WksError>> {
    if !is_wks(msg) {
        return None;
    }
    let root = msg.parts.first()?;
    Some(match mime_type(root).as_str() {
        "multipart/encrypted" => encrypted_part(msg, root).map(Submission::Encrypted),
        _ => keys_part(msg, root).map(Submission::Plain),
    })
}

/// The armored PGP message of a `multipart/encrypted` root (RFC 3156 section 4: exactly two
/// parts, `application/pgp-encrypted` then `application/octet-stream`).
fn encrypted_part(
    msg: &Message<'_>,
    root: &mail_parser::MessagePart<'_>,
) -> Result<Vec<u8>, WksError> {
    let protocol = root
        .content_type()
        .and_then(|ct| ct.attribute("protocol"))
        .unwrap_or("")
        .to_ascii_lowercase();
    if protocol != "application/pgp-encrypted" {
        return Err(WksError::NotASubmission(format!(
            "multipart/encrypted with protocol {protocol:?}, not application/pgp-encrypted"
        )));
    }
    let children = root.sub_parts().unwrap_or(&[]);
    let [control, data] = children else {
        return Err(WksError::NotASubmission(format!(
            "multipart/encrypted has {} parts; PGP/MIME has two",
            children.len()
        )));
    };
    let (Some(control), Some(data)) = (msg.part(*control), msg.part(*data)) else {
        return Err(WksError::NotASubmission(
            "multipart/encrypted parts are missing".into(),
        ));
    };
    if mime_type(control) != "application/pgp-encrypted" {
        return Err(WksError::NotASubmission(format!(
            "the first encrypted part is {}, not application/pgp-encrypted",
            mime_type(control)
        )));
    }
    if data.sub_parts().is_some() || matches!(data.body, PartType::Message(_)) {
        return Err(WksError::NotASubmission(
            "the second encrypted part is not a leaf".into(),
        ));
    }
    let bytes = data.contents();
    if bytes.len() > MAX_ENCRYPTED_BYTES {
        return Err(WksError::TooLarge {
            what: "encrypted part",
            limit: MAX_ENCRYPTED_BYTES,
        });
    }
    Ok(bytes.to_vec())
}

/// The `application/pgp-keys` contents of an entity: the root itself, or exactly one direct
/// child of a `multipart/mixed` root (nothing deeper is read).
fn keys_part(msg: &Message<'_>, root: &mail_parser::MessagePart<'_>) -> Result<Vec<u8>, WksError> {
    let leaf = |part: &mail_parser::MessagePart<'_>| -> Result<Vec<u8>, WksError> {
        if part.sub_parts().is_some() || matches!(part.body, PartType::Message(_)) {
            return Err(WksError::NotASubmission(
                "the application/pgp-keys part is not a leaf".into(),
            ));
        }
        Ok(part.contents().to_vec())
    };
    match mime_type(root).as_str() {
        "application/pgp-keys" => leaf(root),
        "application/vnd.gnupg.wks" => Err(WksError::OtherWksMessage(wks_type(root))),
        "multipart/mixed" => {
            let children = root.sub_parts().unwrap_or(&[]);
            if children.len() > MAX_CHILD_PARTS {
                return Err(WksError::NotASubmission(format!(
                    "multipart/mixed has {} parts; at most {MAX_CHILD_PARTS} are read",
                    children.len()
                )));
            }
            let keys: Vec<&mail_parser::MessagePart<'_>> = children
                .iter()
                .filter_map(|id| msg.part(*id))
                .filter(|p| mime_type(p) == "application/pgp-keys")
                .collect();
            match keys.as_slice() {
                [one] => leaf(one),
                [] => Err(WksError::NotASubmission(
                    "multipart/mixed without an application/pgp-keys part".into(),
                )),
                more => Err(WksError::NotASubmission(format!(
                    "{} application/pgp-keys parts; send one key",
                    more.len()
                ))),
            }
        }
        other => Err(WksError::NotASubmission(format!(
            "the content is {other}, not application/pgp-keys"
        ))),
    }
}

/// The `type:` line of an `application/vnd.gnupg.wks` body, for the error message.
fn wks_type(part: &mail_parser::MessagePart<'_>) -> String {
    let text =
        String::from_utf8_lossy(&part.contents()[..part.contents().len().min(4096)]).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("type:"))
        .map(|t| {
            let t: String = t
                .trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect();
            format!("WKS {t}")
        })
        .unwrap_or_else(|| "WKS message".into())
}

/// The key of a recognized submission as an armored public key block (for
/// [`validate`](crate::validate::validate)). Decrypts an encrypted one with `key` (the
/// submission key of the domain it was sent to; `domain` names it in errors). `max_key_bytes` is
/// the key policy's cap; the decrypted data may exceed it only by a small header allowance.
pub fn extract_key(
    submission: &Submission,
    key: Option<&SubmissionKey>,
    domain: &str,
    max_key_bytes: usize,
) -> Result<String, WksError> {
    match submission {
        Submission::Plain(bytes) => key_text(bytes, max_key_bytes),
        Submission::Encrypted(armored) => {
            let key = key.ok_or_else(|| WksError::NoSubmissionKey(domain.to_string()))?;
            let limit = max_key_bytes.saturating_add(PLAINTEXT_HEADROOM);
            let plain = catch_unwind(AssertUnwindSafe(|| decrypt(armored, key, limit)))
                .unwrap_or_else(|_| {
                    Err(WksError::Undecryptable(
                        "the OpenPGP library failed on it".into(),
                    ))
                })?;
            let entity = MessageParser::default().parse(&plain[..]).ok_or_else(|| {
                WksError::NotASubmission("the decrypted data is not a MIME entity".into())
            })?;
            let root = entity
                .parts
                .first()
                .ok_or_else(|| WksError::NotASubmission("the decrypted data is empty".into()))?;
            if mime_type(root) == "multipart/encrypted" {
                return Err(WksError::NotASubmission(
                    "the decrypted data is encrypted again".into(),
                ));
            }
            let bytes = keys_part(&entity, root)?;
            key_text(&bytes, max_key_bytes)
        }
    }
}

/// The key as armored text: armored contents as they are, binary packets armored.
fn key_text(bytes: &[u8], max_key_bytes: usize) -> Result<String, WksError> {
    if bytes.len() > max_key_bytes {
        return Err(WksError::TooLarge {
            what: "key",
            limit: max_key_bytes,
        });
    }
    let looks_armored = bytes
        .windows(PUBLIC_KEY_BEGIN.len())
        .take(4096)
        .any(|w| w == PUBLIC_KEY_BEGIN.as_bytes())
        || bytes.starts_with(b"-----BEGIN PGP");
    if looks_armored {
        return String::from_utf8(bytes.to_vec())
            .map_err(|_| WksError::NotASubmission("the armored key is not text".into()));
    }
    Ok(armor_public_key(bytes))
}

/// Decrypts an armored PGP message with `key`; at most `limit` bytes of plaintext.
fn decrypt(armored: &[u8], key: &SubmissionKey, limit: usize) -> Result<Vec<u8>, WksError> {
    let reader = BufReader::new(armored);
    let (message, _headers) = PgpMessage::from_armor_with_options(
        reader,
        DearmorOptions::new().set_limit(MAX_ENCRYPTED_BYTES),
    )
    .map_err(|e| WksError::Undecryptable(format!("reading the PGP message: {e}")))?;
    if !message.is_encrypted() {
        return Err(WksError::Undecryptable(
            "the PGP message is not encrypted".into(),
        ));
    }
    let mut message = message
        .decrypt(&Password::empty(), &key.key)
        .map_err(|e| match e {
            PgpError::MissingKey => WksError::WrongKey(key.fingerprint.clone()),
            other => WksError::Undecryptable(other.to_string()),
        })?;
    let mut layers = 0;
    while message.is_compressed() {
        layers += 1;
        if layers > MAX_COMPRESSION_LAYERS {
            return Err(WksError::TooDeep);
        }
        message = message
            .decompress()
            .map_err(|e| WksError::Undecryptable(format!("decompressing: {e}")))?;
    }
    if message.is_encrypted() {
        return Err(WksError::NotASubmission(
            "the decrypted data is encrypted again".into(),
        ));
    }
    let mut out = Vec::new();
    (&mut message)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| WksError::Undecryptable(format!("reading the plaintext: {e}")))?;
    if out.len() > limit {
        return Err(WksError::TooLarge {
            what: "decrypted submission",
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "wks_tests.rs"]
mod tests;
