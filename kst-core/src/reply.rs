//! Building the KST's replies: confirmation, key response, not-found and refusal.
//!
//! Every reply goes from `keys@<domain>` to the requester, refers to the request
//! (`In-Reply-To`, `References`), says `Auto-Submitted: auto-replied` (RFC 3834) and carries
//! `KST-Protocol` (the negotiated version; version 2 also `KST-MAC: hmac-sha256`) and a
//! machine-readable `KST-Status`. The body is the paper's: the armored
//! key (when there is one) and then the HMAC line; key-less replies carry an explanation for
//! people and then the HMAC line. Version 3 replies about an address then carry the key
//! directory's answer (signed head and proof) in a block after the HMAC line
//! ([`LOG_ANSWER_BEGIN`] ... [`LOG_ANSWER_END`]), whose hash the HMAC covers. See
//! `docs/PROTOCOL.md`.

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address as MbAddress;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use sha2::{Digest, Sha256};

use crate::address::Address;
use crate::error::Error;
use crate::kauth::AuthKey;
use crate::mac;
use crate::openpgp::armor_public_key;
use crate::protocol::{
    HEADER_ADDRESS, HEADER_FINGERPRINT, HEADER_MAC, HEADER_PROTOCOL, HEADER_REASON, HEADER_STATUS,
    LOG_ANSWER_BEGIN, LOG_ANSWER_END, LOG_ANSWER_LINE, LogAsk, MAC_HMAC_SHA256, Question, Reason,
    Status, TRANSPARENCY_VERSION,
};
use crate::store::KeyRecord;

/// The key directories of a KST, as version 3 replies need them: which domains have one, and
/// the directory's answer for an address (feature `transparency`:
/// `kst_core::transparency::TransparentStore` implements it).
#[async_trait::async_trait]
pub trait LogAnswers: Send + Sync {
    /// True when `domain` has a key directory (its KST speaks version 3).
    fn has_directory(&self, domain: &str) -> bool;
    /// The directory's answer for `address` at its latest epoch: the signed head and the
    /// lookup (or absence) proof, as text (`kst-log-answer-v1`), with what `ask` asks for
    /// when the directory can give it: the append-only proof from `ask.since`, and the
    /// witnesses' part (`kst-log-answer-v2`) with `ask.witnessed`; and what the proof proves
    /// ([`Proven`]), so that the reply serves exactly that. A directory that cannot be read is
    /// a temporary error: the request is deferred, never answered without proofs. `asker`:
    /// who the reply goes to (folded, as the rate limits count it), whose share of the
    /// append-only work's turns the request takes (`kst_core::transparency::mail_bound`): a
    /// request that finds no turn free is answered without the append-only part, never
    /// deferred.
    async fn answer(
        &self,
        address: &Address,
        ask: LogAsk,
        asker: &str,
    ) -> Result<DirectoryAnswer, Error>;
    /// What the bound on the replies' append-only work did so far (for metrics); nothing for
    /// answers without such a bound.
    fn mail_proofs(&self) -> MailProofStats {
        MailProofStats::default()
    }
    /// Waits `pause` (on the directory's timer) before a reply whose key and answer could not
    /// be made to agree reads both again (a change written to the key store whose epoch has
    /// not come yet).
    async fn pause(&self, pause: std::time::Duration);
}

/// The bound on version 3 replies' append-only work (`KST-Log-Since`), as counted so far
/// (`kst_core::transparency::mail_bound`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailProofStats {
    /// Turns held now (replies whose append-only proof is being built or checked).
    pub in_flight: u64,
    /// The most turns held at once since start.
    pub peak: u64,
    /// Turns taken since start.
    pub taken: u64,
    /// Replies sent without the append-only part they asked for, for want of a turn.
    pub omitted_busy: u64,
}

/// A key directory's answer for one address, as a version 3 reply carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryAnswer {
    /// The answer's text (`kst-log-answer-v1` or `-v2`).
    pub text: String,
    /// What its proof proves: the directory's latest entry for the address.
    pub proven: Proven,
}

/// The directory's latest entry for an address, as an answer's proof proves it: what a reply
/// carrying that answer must serve, or the client reports an attack (docs/PROTOCOL.md,
/// "Versions": a reply's key and its answer agree by construction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proven {
    /// The address was never in the directory (an absence proof): "no key".
    Absent,
    /// The latest version is a deletion, numbered `version`: "no key".
    Deleted {
        /// kst's version number of the deletion (the deleted key's + 1).
        version: u64,
    },
    /// The latest version is a key: exactly the stored record of that version.
    Key {
        /// kst's version number ([`KeyRecord::version`]).
        version: u64,
        /// The SHA-256 of the key's binary packets as served ([`KeyRecord::key`]).
        sha256: [u8; 32],
    },
}

impl Proven {
    /// What an honest directory proves for the store's current record of an address
    /// (`None`: nothing stored).
    pub fn of_record(record: Option<&KeyRecord>) -> Proven {
        match record {
            Some(r) => Proven::Key {
                version: r.version,
                sha256: Sha256::digest(&r.key).into(),
            },
            None => Proven::Absent,
        }
    }

    /// True when `record` is the key this proves: the same version and the same bytes.
    pub fn is(&self, record: &KeyRecord) -> bool {
        match self {
            Proven::Key { version, sha256 } => {
                *version == record.version
                    && *sha256 == <[u8; 32]>::from(Sha256::digest(&record.key))
            }
            Proven::Absent | Proven::Deleted { .. } => false,
        }
    }

    /// The version number this proves (`None` for an address never held).
    pub fn version(&self) -> Option<u64> {
        match self {
            Proven::Absent => None,
            Proven::Deleted { version } | Proven::Key { version, .. } => Some(*version),
        }
    }
}

/// `text` (the key directory's answer) as it goes in a reply: lines longer than
/// [`LOG_ANSWER_LINE`] are folded, each continuation line starting with one space, between
/// [`LOG_ANSWER_BEGIN`] and [`LOG_ANSWER_END`]; CRLF line ends.
pub fn fold_log_answer(text: &str) -> String {
    let mut out = format!("{LOG_ANSWER_BEGIN}\r\n");
    for line in text.lines() {
        let chars: Vec<char> = line.chars().collect();
        let (first, mut rest) = chars.split_at(fold_at(&chars, LOG_ANSWER_LINE));
        out.extend(first);
        out.push_str("\r\n");
        while !rest.is_empty() {
            let (part, tail) = rest.split_at(fold_at(rest, LOG_ANSWER_LINE - 1));
            out.push(' ');
            out.extend(part);
            out.push_str("\r\n");
            rest = tail;
        }
    }
    out.push_str(LOG_ANSWER_END);
    out.push_str("\r\n");
    out
}

/// Where to cut `chars` for a folded line of at most `width` characters: never right after a
/// space, since a reader drops trailing white space from a line (the space would be lost
/// and the answer's hash would change).
fn fold_at(chars: &[char], width: usize) -> usize {
    let mut at = chars.len().min(width);
    while at > 1 && at < chars.len() && chars[at - 1] == ' ' {
        at -= 1;
    }
    at
}

/// Display name on the From line of every reply.
pub const SERVICE_NAME: &str = "Key Storage Service";

/// Most `References` ids copied from a request.
const MAX_REFERENCES: usize = 10;

/// What a reply says.
#[derive(Debug, Clone)]
pub enum ReplyContent<'a> {
    /// Confirmation: `packets` were published for `address`.
    Published {
        /// The account.
        address: &'a Address,
        /// The key as published (binary packets).
        packets: &'a [u8],
        /// Its fingerprint.
        fingerprint: &'a str,
    },
    /// Key response.
    Found {
        /// The queried address.
        address: &'a Address,
        /// The stored key (binary packets).
        packets: &'a [u8],
        /// Its fingerprint.
        fingerprint: &'a str,
    },
    /// No key for `address`.
    NotFound {
        /// The queried address.
        address: &'a Address,
    },
    /// The key of `address` (and its history) was deleted; nothing is published for it now.
    Deleted {
        /// The account.
        address: &'a Address,
    },
    /// Refused.
    Refused {
        /// Why.
        reason: Reason,
        /// The address concerned, if one is known (authenticated account or queried address).
        address: Option<&'a Address>,
        /// Extra detail for people (not authenticated by the HMAC).
        detail: Option<String>,
    },
}

impl ReplyContent<'_> {
    /// The status this content carries.
    pub fn status(&self) -> Status {
        match self {
            ReplyContent::Published { .. } => Status::Published,
            ReplyContent::Found { .. } => Status::Found,
            ReplyContent::NotFound { .. } => Status::NotFound,
            ReplyContent::Refused { .. } => Status::Refused,
            ReplyContent::Deleted { .. } => Status::Deleted,
        }
    }
}

/// Who a reply goes to and what it answers.
#[derive(Debug, Clone)]
pub struct ReplyTo<'a> {
    /// `keys@<domain>` of the domain the request went to.
    pub service: &'a Address,
    /// The requester (its envelope sender).
    pub requester: &'a Address,
    /// The request's Message-ID (without brackets), if it had a usable one.
    pub in_reply_to: Option<&'a str>,
    /// The request's References ids (without brackets).
    pub references: &'a [String],
    /// The protocol version the reply is written in ([`crate::protocol::negotiate`]).
    pub version: u32,
    /// What the request asked, once its body was read; version 3 binds it into every tag.
    pub question: Option<Question<'a>>,
    /// What a version 3 request asked of the key directory's answer (`KST-Log-*` headers).
    pub log_ask: LogAsk,
    /// What became of the reply once [`crate::Kst`] handed it to its mailer (set once).
    pub sent: std::sync::OnceLock<crate::service::ReplyOutcome>,
}

/// A built reply.
#[derive(Debug, Clone)]
pub struct BuiltReply {
    /// Its Message-ID, without brackets.
    pub message_id: String,
    /// The RFC 5322 message, CRLF line endings.
    pub message: Vec<u8>,
}

/// True when `id` can be copied into a header unchanged: visible ASCII without brackets or
/// whitespace, at most 250 characters.
pub fn is_safe_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 250
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
}

/// A fresh Message-ID for a reply from `domain`.
pub fn new_message_id(domain: &str) -> String {
    let mut r = [0u8; 12];
    rand::fill(&mut r);
    format!("kst.{}@{domain}", hex::encode(r))
}

/// Builds a reply. `k_auth` is `None` only when the request carried no usable K_auth; such a
/// reply has no HMAC line and the client treats it as unauthenticated.
pub fn build(to: &ReplyTo<'_>, content: &ReplyContent<'_>, k_auth: Option<&AuthKey>) -> BuiltReply {
    build_with_answer(to, content, k_auth, None)
}

/// [`build`] with the key directory's answer text (version 3): the HMAC covers its hash and
/// the answer follows the HMAC line. Ignored below version 3.
pub fn build_with_answer(
    to: &ReplyTo<'_>,
    content: &ReplyContent<'_>,
    k_auth: Option<&AuthKey>,
    answer: Option<&str>,
) -> BuiltReply {
    let status = content.status();
    let v3 = to.version >= TRANSPARENCY_VERSION;
    // A refusal carries no answer (there is nothing about an address to prove).
    let answer = answer.filter(|_| v3 && status != Status::Refused);
    // Version 3: one tag input for every reply (mac::v3_data).
    let question = to.question.unwrap_or(Question::Publish);
    let v3_tag =
        |k: &AuthKey, reason: Option<Reason>, address: Option<&Address>, packets: &[u8]| {
            mac::v3_tag(
                k,
                &mac::v3_data(
                    status,
                    reason.map(Reason::as_str),
                    address.map(Address::as_str),
                    &question,
                    answer.map(str::as_bytes),
                    packets,
                ),
            )
        };
    let message_id = new_message_id(to.service.domain());
    let (subject, body, address, fingerprint, reason) = match content {
        ReplyContent::Published {
            address,
            packets,
            fingerprint,
        }
        | ReplyContent::Found {
            address,
            packets,
            fingerprint,
        } => {
            let mut body = String::new();
            if status == Status::Published && k_auth.is_none() {
                // A WKS submission (no K_auth): tell the person, then the key as published.
                body.push_str(&wrap(&format!(
                    "Your key {fingerprint} is now published for {address}. OpenPGP clients \
                     find it through the Web Key Directory (gpg --locate-keys {address}); no \
                     confirmation is needed. This is the key as published:"
                )));
                body.push_str("\r\n");
            }
            body.push_str(&armor_public_key(packets).replace('\n', "\r\n"));
            if let Some(k) = k_auth {
                if v3 {
                    body.push_str(&v3_tag(k, None, Some(*address), packets));
                } else {
                    body.push_str(&mac::key_tag_for(to.version, k, packets));
                }
                body.push_str("\r\n");
            }
            let subject = if status == Status::Published {
                format!("Key published for {address}")
            } else {
                format!("Key for {address}")
            };
            (subject, body, Some(*address), Some(*fingerprint), None)
        }
        ReplyContent::NotFound { address } => {
            let body = with_tag(
                &format!("No key is published for {address}.\r\n"),
                k_auth.map(|k| {
                    if v3 {
                        v3_tag(k, None, Some(*address), &[])
                    } else {
                        mac::statement_tag_for(to.version, k, status, None, Some(address.as_str()))
                    }
                }),
            );
            (
                format!("No key for {address}"),
                body,
                Some(*address),
                None,
                None,
            )
        }
        ReplyContent::Deleted { address } => {
            let body = with_tag(
                &format!(
                    "No key is published for {address} any more: the key and its history were \r\ndeleted.\r\n"
                ),
                k_auth.map(|k| {
                    if v3 {
                        v3_tag(k, None, Some(*address), &[])
                    } else {
                        mac::statement_tag_for(to.version, k, status, None, Some(address.as_str()))
                    }
                }),
            );
            (
                format!("Key deleted for {address}"),
                body,
                Some(*address),
                None,
                None,
            )
        }
        ReplyContent::Refused {
            reason,
            address,
            detail,
        } => {
            let mut text = format!("Your request was refused ({reason}).\r\n\r\n");
            text.push_str(&wrap(reason.explanation()));
            if let Some(d) = detail {
                text.push_str("\r\n");
                text.push_str(&wrap(&d.replace(['\r', '\n'], " ")));
            }
            let body = with_tag(
                &text,
                k_auth.map(|k| {
                    if v3 {
                        v3_tag(k, Some(*reason), *address, &[])
                    } else {
                        mac::statement_tag_for(
                            to.version,
                            k,
                            status,
                            Some(*reason),
                            address.map(Address::as_str),
                        )
                    }
                }),
            );
            (
                format!("Request refused: {reason}"),
                body,
                *address,
                None,
                Some(*reason),
            )
        }
    };

    let safe: Vec<&String> = to
        .references
        .iter()
        .filter(|r| is_safe_message_id(r))
        .collect();
    let mut refs: Vec<String> = safe[safe.len().saturating_sub(MAX_REFERENCES)..]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut b = MessageBuilder::new()
        .from(MbAddress::new_address(
            Some(SERVICE_NAME),
            to.service.as_str().to_string(),
        ))
        .to(MbAddress::new_address(
            None::<&str>,
            to.requester.as_str().to_string(),
        ))
        .subject(subject)
        .message_id(MessageId::new(message_id.clone()))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header(HEADER_PROTOCOL, Raw::new(to.version.to_string()))
        .header(HEADER_STATUS, Raw::new(status.as_str()));
    if to.version >= 2 {
        b = b.header(HEADER_MAC, Raw::new(MAC_HMAC_SHA256));
    }
    if let Some(a) = address {
        b = b.header(HEADER_ADDRESS, Raw::new(a.as_str().to_string()));
    }
    if let Some(f) = fingerprint {
        b = b.header(HEADER_FINGERPRINT, Raw::new(f.to_string()));
    }
    if let Some(r) = reason {
        b = b.header(HEADER_REASON, Raw::new(r.as_str()));
    }
    if let Some(id) = to.in_reply_to.filter(|id| is_safe_message_id(id)) {
        b = b.in_reply_to(MessageId::new(id.to_string()));
        refs.push(id.to_string());
    }
    if !refs.is_empty() {
        b = b.references(MessageId::new_list(refs.iter().map(String::as_str)));
    }
    let body = match answer {
        // After the HMAC line: the HMAC line stays the first 44-character line after the key.
        Some(text) => format!("{body}\r\n{}", fold_log_answer(text)),
        _ => body,
    };
    let message = b
        .text_body(body)
        .write_to_vec()
        .expect("writing a message into a Vec cannot fail");
    BuiltReply {
        message_id,
        message,
    }
}

fn with_tag(text: &str, tag: Option<String>) -> String {
    match tag {
        Some(t) => format!("{text}\r\n{t}\r\n"),
        None => text.to_string(),
    }
}

/// Wraps prose at 72 columns with CRLF.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut col = 0;
    for word in text.split_whitespace() {
        if col > 0 && col + 1 + word.len() > 72 {
            out.push_str("\r\n");
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out.push_str("\r\n");
    out
}
