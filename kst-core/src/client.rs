//! The mail client's side of the protocol: building requests and verifying replies.
//!
//! No network code: a mail client (or `kst client`) sends the bytes of [`Request::message`]
//! however it sends mail, keeps the [`Pending`] (it holds K_auth) until the reply arrives, and
//! hands the reply's bytes to [`verify_reply`]. Only a reply whose HMAC verifies is trusted.

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address as MbAddress;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_parser::MessageParser;
use serde::{Deserialize, Serialize};

use crate::address::{Address, AddressPolicy};
use crate::body;
use crate::kauth::AuthKey;
use crate::mac;
use crate::openpgp::{self, KeyError};
use crate::protocol::{
    HEADER_ADDRESS, HEADER_LOG_SINCE, HEADER_LOG_WITNESSED, HEADER_MAC, HEADER_PROTOCOL,
    HEADER_REASON, HEADER_STATUS, LOG_ANSWER_BEGIN, LOG_ANSWER_END, LogAsk, MAC_HMAC_SHA256,
    MAX_LOG_ANSWER_BYTES, PUBLIC_KEY_BEGIN, PUBLIC_KEY_END, Question, Reason, Status,
    TRANSPARENCY_VERSION, VERSIONS,
};
use crate::reply::new_message_id;

/// Largest reply a client reads (bytes).
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// What a pending request asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Asked {
    /// Publish the key with `fingerprint` for `account`.
    Publication {
        /// The account that publishes.
        account: Address,
        /// Fingerprint of the submitted key (uppercase hex).
        fingerprint: String,
    },
    /// Retrieve the key of `address`.
    Retrieval {
        /// The queried address.
        address: Address,
    },
    /// Delete the key (and history) of `account`.
    Deletion {
        /// The account that deletes its key.
        account: Address,
    },
}

/// A request sent and not yet answered: what a client must keep (e.g. in a state file) to
/// verify the reply. Holds K_auth: keep it private.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// What was asked.
    #[serde(flatten)]
    pub asked: Asked,
    /// The request's Message-ID (without brackets); the reply's In-Reply-To must match.
    pub message_id: String,
    /// The service address the request went to.
    pub service: Address,
    /// K_auth, standard base64.
    pub k_auth: String,
    /// Seconds since the Unix epoch when the request was built.
    pub created_at: u64,
    /// Set when the request offered protocol version 3 (`KST-Protocol: 3, 2, 1`): the
    /// domain's key directory head key (64 hex digits) the answer in the reply must be signed
    /// by. Only a version 3 reply carrying the directory's answer is then accepted: a reply in
    /// an older version, or without the answer, is refused as an attack (no downgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_key: Option<String>,
}

impl Pending {
    /// What the request asked, as version 3 binds it into the reply's tag.
    pub fn question(&self) -> Question<'_> {
        match &self.asked {
            Asked::Publication { .. } => Question::Publish,
            Asked::Retrieval { address } => Question::Retrieve(address.as_str()),
            Asked::Deletion { .. } => Question::Delete,
        }
    }
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Request {
    /// The RFC 5322 message (CRLF). Envelope: MAIL FROM the requester, RCPT TO `pending.service`.
    pub message: Vec<u8>,
    /// What to keep until the reply arrives.
    pub pending: Pending,
}

impl Request {
    /// A version 3 request (`pending.head_key` set) that also asks for the parts of the key
    /// directory's answer in `ask`: the `KST-Log-Since` and `KST-Log-Witnessed` headers
    /// (docs/PROTOCOL.md, "Versions"). Unchanged below version 3 or when `ask` asks nothing.
    pub fn with_log_ask(mut self, ask: LogAsk) -> Request {
        if self.pending.head_key.is_none() {
            return self;
        }
        let mut headers = String::new();
        if let Some(epoch) = ask.since.filter(|e| *e > 0) {
            headers.push_str(&format!("{HEADER_LOG_SINCE}: {epoch}\r\n"));
        }
        if ask.witnessed {
            headers.push_str(&format!("{HEADER_LOG_WITNESSED}: 1\r\n"));
        }
        if !headers.is_empty() {
            let mut message = headers.into_bytes();
            message.extend_from_slice(&self.message);
            self.message = message;
        }
        self
    }
}

/// Why a request could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The key to publish is not a usable public key.
    #[error("the key to publish is not usable: {0}")]
    Key(#[from] KeyError),
    /// The key has no User ID for the account (the KST would refuse or strip it).
    #[error("the key has no User ID with the address {0}")]
    NoMatchingUserId(Address),
}

/// The `KST-Protocol` of every request: the versions this client speaks, newest first. A KST
/// answers in the newest it speaks too (version 1 when it predates negotiation).
pub const REQUEST_VERSIONS: &str = "2, 1";
/// The `KST-Protocol` of a request that asks for the key directory's answer in the reply
/// (version 3) and accepts nothing older.
pub const REQUEST_VERSIONS_TRANSPARENCY: &str = "3, 2, 1";

fn service_of(domain: &str) -> Address {
    Address::from_normalized(&format!("keys@{domain}")).expect("domain of a normalized address")
}

fn message(
    from: &Address,
    to: &Address,
    subject: &str,
    body: String,
    id: &str,
    transparency: bool,
) -> Vec<u8> {
    let versions = if transparency {
        REQUEST_VERSIONS_TRANSPARENCY
    } else {
        REQUEST_VERSIONS
    };
    MessageBuilder::new()
        .from(MbAddress::new_address(
            None::<&str>,
            from.as_str().to_string(),
        ))
        .to(MbAddress::new_address(
            None::<&str>,
            to.as_str().to_string(),
        ))
        .subject(subject)
        .message_id(MessageId::new(id.to_string()))
        .header(HEADER_PROTOCOL, Raw::new(versions))
        .header(HEADER_MAC, Raw::new(MAC_HMAC_SHA256))
        .text_body(body)
        .write_to_vec()
        .expect("writing into a Vec cannot fail")
}

/// Builds a publication (paper Fig. 3) of `armored_key` for `account`, to `keys@<its domain>`,
/// with a fresh K_auth. The key must hold a User ID with the account's address.
pub fn build_publication(account: &Address, armored_key: &str) -> Result<Request, BuildError> {
    build_publication_with(account, armored_key, None)
}

/// [`build_publication`] offering version 3 when `head_key` (the domain's key directory head
/// key, 64 hex digits) is given: the confirmation must then carry the directory's answer.
pub fn build_publication_with(
    account: &Address,
    armored_key: &str,
    head_key: Option<&str>,
) -> Result<Request, BuildError> {
    let key = openpgp::parse_armored(armored_key, usize::MAX)?;
    let policy = AddressPolicy::default();
    let has_uid = key.user_ids.iter().any(|u| {
        uid_address(u)
            .and_then(|a| policy.normalize(a).ok())
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(account.as_str()))
    });
    if !has_uid {
        return Err(BuildError::NoMatchingUserId(account.clone()));
    }
    let k_auth = AuthKey::generate();
    let service = service_of(account.domain());
    let id = new_message_id(account.domain());
    let armored = openpgp::armor_public_key(&key.packets).replace('\n', "\r\n");
    let body = format!("{armored}{}\r\n", k_auth.to_base64());
    Ok(Request {
        message: message(
            account,
            &service,
            "Key publication",
            body,
            &id,
            head_key.is_some(),
        ),
        pending: Pending {
            asked: Asked::Publication {
                account: account.clone(),
                fingerprint: key.fingerprint,
            },
            message_id: id,
            service,
            k_auth: k_auth.to_base64(),
            created_at: crate::time::unix_now(),
            head_key: head_key.map(str::to_string),
        },
    })
}

/// Builds a retrieval (paper Fig. 5) from `requester` for `address`, to `keys@<its domain>`.
pub fn build_retrieval(requester: &Address, address: &Address) -> Request {
    build_retrieval_with(requester, address, None)
}

/// [`build_retrieval`] offering version 3 when `head_key` (the domain's key directory head
/// key, 64 hex digits) is given: the answer must then carry the directory's proof.
pub fn build_retrieval_with(
    requester: &Address,
    address: &Address,
    head_key: Option<&str>,
) -> Request {
    let k_auth = AuthKey::generate();
    let service = service_of(address.domain());
    let id = new_message_id(requester.domain());
    let body = format!("{address}\r\n{}\r\n", k_auth.to_base64());
    Request {
        message: message(
            requester,
            &service,
            "Key request",
            body,
            &id,
            head_key.is_some(),
        ),
        pending: Pending {
            asked: Asked::Retrieval {
                address: address.clone(),
            },
            message_id: id,
            service,
            k_auth: k_auth.to_base64(),
            created_at: crate::time::unix_now(),
            head_key: head_key.map(str::to_string),
        },
    }
}

/// The address inside a User ID such as `Alice <alice@example.net>` (or a bare address).
pub fn uid_address(uid: &str) -> Option<&str> {
    match (uid.rfind('<'), uid.rfind('>')) {
        (Some(a), Some(b)) if a < b => Some(&uid[a + 1..b]),
        _ if uid.contains('@') && !uid.contains(' ') => Some(uid),
        _ => None,
    }
}

/// Builds a deletion of `account`'s key: `DELETE` and a fresh K_auth, to `keys@<its domain>`.
/// Send it through the provider's authenticated submission, like a publication.
pub fn build_deletion(account: &Address) -> Request {
    build_deletion_with(account, None)
}

/// [`build_deletion`] offering version 3 when `head_key` (the domain's key directory head
/// key, 64 hex digits) is given: the confirmation must then carry the directory's answer.
pub fn build_deletion_with(account: &Address, head_key: Option<&str>) -> Request {
    let k_auth = AuthKey::generate();
    let service = service_of(account.domain());
    let id = new_message_id(account.domain());
    let body = format!(
        "{}\r\n{}\r\n",
        crate::protocol::DELETE_COMMAND,
        k_auth.to_base64()
    );
    Request {
        message: message(
            account,
            &service,
            "Key deletion",
            body,
            &id,
            head_key.is_some(),
        ),
        pending: Pending {
            asked: Asked::Deletion {
                account: account.clone(),
            },
            message_id: id,
            service,
            k_auth: k_auth.to_base64(),
            created_at: crate::time::unix_now(),
            head_key: head_key.map(str::to_string),
        },
    }
}

/// A reply whose HMAC verified, or an unauthenticated refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The publication was confirmed; the key as published is attached.
    Published {
        /// Its fingerprint (equal to the one submitted).
        fingerprint: String,
        /// The key as published, armored.
        armored: String,
    },
    /// The queried key.
    Found {
        /// The queried address.
        address: Address,
        /// Its fingerprint.
        fingerprint: String,
        /// The key, armored (re-armored from the verified packets).
        armored: String,
        /// User IDs of the key.
        user_ids: Vec<String>,
    },
    /// The KST states, authenticated, that no key is published for `address`.
    NotFound {
        /// The queried address (as the KST normalized it).
        address: Address,
    },
    /// The KST states, authenticated, that the account's key and history are deleted.
    Deleted {
        /// The account (as the KST normalized it).
        address: Address,
    },
    /// The KST refused the request.
    Refused {
        /// Why (if the reply named a reason this release knows).
        reason: Option<Reason>,
        /// The `KST-Reason` token as sent, also one this release does not know (a newer
        /// KST's); `None` when the reply named none or something that is not a token.
        token: Option<String>,
        /// The explanation text of the reply.
        explanation: String,
        /// True when the refusal's HMAC verified (the KST itself said it); false when the
        /// request had no usable K_auth and the refusal cannot be authenticated.
        authenticated: bool,
    },
}

/// Why a reply is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not a reply to this request (wrong In-Reply-To or sender).
    #[error("this message is not the reply to request {0}")]
    NotThisRequest(String),
    /// Not a KST reply at all (no `KST-Protocol` header): e.g. a bounce, which means the
    /// domain runs no KST.
    #[error("not a KST reply (no {HEADER_PROTOCOL} header): the domain may not run a KST")]
    NotKst,
    /// A protocol version this client does not speak.
    #[error("unsupported KST protocol version {0:?}")]
    Version(String),
    /// A version-2 reply whose `KST-MAC` names an algorithm this client does not speak.
    #[error("the reply uses the MAC algorithm {0:?}, which this client does not speak")]
    Mac(String),
    /// Unreadable reply.
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The HMAC is missing or wrong: the reply was forged or altered in transit. Never use it.
    #[error("the reply's HMAC does not verify: forged or altered in transit (possible attack)")]
    BadHmac,
    /// The HMAC verified but the key is not the one published / asked for.
    #[error("the reply's key does not match: {0}")]
    KeyMismatch(String),
    /// The request offered version 3 (the key directory's answer in the reply) and the reply
    /// is written in an older version: stripped on the way (a downgrade). Never use it.
    #[error(
        "the request asked for the key directory's proof (KST protocol 3) and the reply is in version {0}: downgraded on the way (possible attack)"
    )]
    Downgrade(String),
    /// A version 3 reply about an address without the key directory's answer (or with one
    /// that cannot be read): stripped or damaged on the way. Never use it.
    #[error("the version 3 reply carries no usable key directory answer: {0} (possible attack)")]
    MissingProof(String),
}

/// A reply whose HMAC verified, with the key directory's answer it carried (version 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReply {
    /// What the KST said.
    pub verified: Verified,
    /// The key directory's answer text (`kst-log-answer-v1`), unfolded, exactly the bytes the
    /// HMAC covers the hash of; `None` below version 3 and for refusals. The caller checks it
    /// against the head key (`kst_core::transparency::answer::LogAnswer`).
    pub log_answer: Option<String>,
}

/// The key directory's answer block of a reply's `lines`: `Ok(None)` when there is none, the
/// unfolded text (LF line ends, a final LF), or why it is unusable. Bounded: at most
/// [`MAX_LOG_ANSWER_BYTES`] between the markers.
fn log_answer_block(lines: &[&str]) -> Result<Option<(usize, String)>, ReplyError> {
    let Some(begin) = lines.iter().position(|l| l.trim_end() == LOG_ANSWER_BEGIN) else {
        return Ok(None);
    };
    let bad = |why: &str| ReplyError::MissingProof(why.to_string());
    let end = lines[begin + 1..]
        .iter()
        .position(|l| l.trim_end() == LOG_ANSWER_END)
        .map(|i| begin + 1 + i)
        .ok_or_else(|| bad("the answer block has no end line"))?;
    let inner = &lines[begin + 1..end];
    if inner.iter().map(|l| l.len() + 1).sum::<usize>() > MAX_LOG_ANSWER_BYTES {
        return Err(bad(&format!(
            "the answer block is larger than {MAX_LOG_ANSWER_BYTES} bytes"
        )));
    }
    let mut text = String::new();
    for line in inner {
        let line = line.trim_end_matches([' ', '\r', '\t']);
        if let Some(rest) = line.strip_prefix(' ') {
            if text.is_empty() {
                return Err(bad("the answer block starts with a continuation line"));
            }
            text.pop();
            text.push_str(rest);
        } else if line.is_empty() {
            return Err(bad("the answer block holds an empty line"));
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    if text.is_empty() {
        return Err(bad("the answer block is empty"));
    }
    Ok(Some((begin, text)))
}

/// Verifies a reply to `pending` and returns the key directory's answer it carried (version
/// 3). See the module docs and [`verify_reply`].
pub fn verify_reply_with_answer(
    pending: &Pending,
    raw: &[u8],
) -> Result<VerifiedReply, ReplyError> {
    verify(pending, raw)
}

/// Verifies a reply to `pending`. See the module docs. A version 3 reply's key directory
/// answer is checked to be the one the HMAC covers, and then dropped: use
/// [`verify_reply_with_answer`] to check it against the head key.
pub fn verify_reply(pending: &Pending, raw: &[u8]) -> Result<Verified, ReplyError> {
    verify(pending, raw).map(|r| r.verified)
}

fn verify(pending: &Pending, raw: &[u8]) -> Result<VerifiedReply, ReplyError> {
    if raw.len() > MAX_REPLY_BYTES {
        return Err(ReplyError::Malformed("reply too large".into()));
    }
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or_else(|| ReplyError::Malformed("not a mail message".into()))?;
    let in_reply_to = msg.in_reply_to().as_text().map(str::to_string);
    if in_reply_to.as_deref() != Some(pending.message_id.as_str()) {
        return Err(ReplyError::NotThisRequest(pending.message_id.clone()));
    }
    let header =
        |name: &str| crate::service::header_value(&msg, name).map(|v| v.trim().to_string());
    let version_text = header(HEADER_PROTOCOL).ok_or(ReplyError::NotKst)?;
    let version = version_text.parse::<u32>().ok();
    let v3 = pending.head_key.is_some();
    let version = match version {
        // Asked for version 3: nothing older is accepted (no downgrade).
        Some(TRANSPARENCY_VERSION) if v3 => TRANSPARENCY_VERSION,
        Some(v) if v3 && VERSIONS.contains(&v) => return Err(ReplyError::Downgrade(version_text)),
        Some(v) if !v3 && VERSIONS.contains(&v) => v,
        _ => return Err(ReplyError::Version(version_text)),
    };
    if version >= 2 {
        let mac = header(HEADER_MAC).unwrap_or_default();
        if !mac.eq_ignore_ascii_case(MAC_HMAC_SHA256) {
            return Err(ReplyError::Mac(mac));
        }
    }
    let status: Status = header(HEADER_STATUS)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ReplyError::Malformed("missing or unknown KST-Status".into()))?;
    let k_auth = AuthKey::parse(&pending.k_auth)
        .map_err(|_| ReplyError::Malformed("the pending request's K_auth is invalid".into()))?;
    let text = body::plain_text(&msg).unwrap_or_default();
    let all_lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches([' ', '\r']))
        .collect();
    // The key directory's answer (version 3) follows the HMAC line; nothing in it is read as
    // part of the reply's text.
    let block = if v3 {
        log_answer_block(&all_lines)?
    } else {
        None
    };
    let lines: &[&str] = match &block {
        Some((begin, _)) => &all_lines[..*begin],
        None => &all_lines,
    };
    let answer: Option<String> = block.map(|(_, text)| text);
    let question = pending.question();
    let needs_answer = v3 && status != Status::Refused;
    if needs_answer && answer.is_none() {
        return Err(ReplyError::MissingProof(
            "the reply has no key directory answer block".into(),
        ));
    }
    // Version 3's one tag input, for this reply's status, reason and key.
    let v3_data = |reason: Option<&str>, packets: &[u8]| {
        mac::v3_data(
            status,
            reason,
            header(HEADER_ADDRESS).as_deref(),
            &question,
            answer
                .as_deref()
                .filter(|_| status != Status::Refused)
                .map(str::as_bytes),
            packets,
        )
    };
    let with_answer = |verified: Verified| VerifiedReply {
        verified,
        log_answer: answer.clone().filter(|_| needs_answer),
    };

    match status {
        Status::Published | Status::Found => {
            let begin = lines.iter().position(|l| *l == PUBLIC_KEY_BEGIN);
            let end = lines.iter().position(|l| *l == PUBLIC_KEY_END);
            let (Some(b), Some(e)) = (begin, end) else {
                return Err(ReplyError::BadHmac);
            };
            if e < b {
                return Err(ReplyError::Malformed("key block out of order".into()));
            }
            let armored = lines[b..=e].join("\n");
            let packets = openpgp::dearmor_public_key(&armored, MAX_REPLY_BYTES)
                .map_err(|e| ReplyError::Malformed(e.to_string()))?;
            let tag = lines[e + 1..].iter().find(|l| mac::is_tag_line(l));
            let data = if v3 {
                v3_data(None, &packets)
            } else {
                mac::key_data(version, &packets)
            };
            if !tag.is_some_and(|t| mac::verify(&k_auth, &data, t)) {
                return Err(ReplyError::BadHmac);
            }
            let key = openpgp::parse_binary(&packets)
                .map_err(|e| ReplyError::KeyMismatch(e.to_string()))?;
            let armored = openpgp::armor_public_key(&packets);
            match (&pending.asked, status) {
                (Asked::Publication { fingerprint, .. }, Status::Published) => {
                    if !fingerprint.eq_ignore_ascii_case(&key.fingerprint) {
                        return Err(ReplyError::KeyMismatch(format!(
                            "published {} but the confirmation carries {}",
                            fingerprint, key.fingerprint
                        )));
                    }
                    Ok(with_answer(Verified::Published {
                        fingerprint: key.fingerprint,
                        armored,
                    }))
                }
                (Asked::Retrieval { address }, Status::Found) => {
                    // The key tag covers the key only, not the address it answers for. Anyone
                    // holding this request's K_auth and Message-ID (every hop of the request
                    // sees both) can have the KST itself sign a `found` for another address,
                    // their own, under them: the HMAC and kst's DKIM signature then both verify.
                    // `KST-Address` (covered by the DKIM signature) says which address the KST
                    // answered about; it must be the one asked.
                    let said = header(HEADER_ADDRESS)
                        .and_then(|a| Address::from_normalized(&a).ok())
                        .ok_or_else(|| ReplyError::Malformed("missing KST-Address".into()))?;
                    if !said.as_str().eq_ignore_ascii_case(address.as_str()) {
                        return Err(ReplyError::KeyMismatch(format!(
                            "asked for {address}, the KST answered with the key of {said}"
                        )));
                    }
                    Ok(with_answer(Verified::Found {
                        address: address.clone(),
                        fingerprint: key.fingerprint,
                        armored,
                        user_ids: key.user_ids,
                    }))
                }
                _ => Err(ReplyError::Malformed(format!(
                    "status {status} does not answer this request"
                ))),
            }
        }
        Status::NotFound | Status::Refused | Status::Deleted => {
            // A reason token this release does not know (a newer KST's) is kept as it was
            // sent: the HMAC covers the token, known or not.
            let token = header(HEADER_REASON)
                .map(|t| t.trim().to_string())
                .filter(|t| mac::is_reason_token(t));
            let reason = token.as_deref().and_then(|r| r.parse().ok());
            let address = header(HEADER_ADDRESS);
            let tag = lines.iter().find(|l| mac::is_tag_line(l));
            let reason_token = if status == Status::Refused {
                token.as_deref()
            } else {
                None
            };
            let data = if v3 {
                v3_data(reason_token, &[])
            } else {
                mac::statement_for(version, status, reason_token, address.as_deref()).into_bytes()
            };
            let authenticated = tag.is_some_and(|t| mac::verify(&k_auth, &data, t));
            let explanation: String = lines
                .iter()
                .filter(|l| !mac::is_tag_line(l))
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_string();
            if status == Status::NotFound {
                if !authenticated {
                    return Err(ReplyError::BadHmac);
                }
                let Asked::Retrieval { address: asked } = &pending.asked else {
                    return Err(ReplyError::Malformed(
                        "not-found answers no publication".into(),
                    ));
                };
                let said = address
                    .and_then(|a| Address::from_normalized(&a).ok())
                    .ok_or_else(|| ReplyError::Malformed("missing KST-Address".into()))?;
                if !said.as_str().eq_ignore_ascii_case(asked.as_str()) {
                    return Err(ReplyError::KeyMismatch(format!(
                        "asked for {asked}, the KST answered about {said}"
                    )));
                }
                return Ok(with_answer(Verified::NotFound { address: said }));
            }
            if status == Status::Deleted {
                if !authenticated {
                    return Err(ReplyError::BadHmac);
                }
                let Asked::Deletion { account } = &pending.asked else {
                    return Err(ReplyError::Malformed(
                        "deleted answers no deletion of this client".into(),
                    ));
                };
                let said = address
                    .and_then(|a| Address::from_normalized(&a).ok())
                    .ok_or_else(|| ReplyError::Malformed("missing KST-Address".into()))?;
                if !said.as_str().eq_ignore_ascii_case(account.as_str()) {
                    return Err(ReplyError::KeyMismatch(format!(
                        "asked to delete {account}, the KST answered about {said}"
                    )));
                }
                return Ok(with_answer(Verified::Deleted { address: said }));
            }
            // A refusal with an HMAC line that does not verify is forged: only a request
            // without usable K_auth gets an unauthenticated refusal, and this client always
            // sends one.
            if tag.is_some() && !authenticated {
                return Err(ReplyError::BadHmac);
            }
            Ok(with_answer(Verified::Refused {
                reason,
                token,
                explanation,
                authenticated,
            }))
        }
    }
}
