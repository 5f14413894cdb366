//! The KST itself: decide about one incoming message, store, reply.
//!
//! [`Kst::handle`] is what both ingest modes (Postfix pipe, LMTP) call per recipient. Its result
//! maps onto what the MTA must hear:
//! - `Ok(Handled)`: kst decided (published, answered, refused with a reply, or left unanswered on
//!   purpose); accept the message (exit 0, LMTP 250). [`Handled::reply`] says whether its reply
//!   went out or an SMTP relay refused it for good (a 5xx: the request is decided without it).
//! - `Err(HandleError::Temporary)`: the store or mailer failed; nothing half-done is visible;
//!   the MTA keeps the message and retries (exit 75, LMTP 4xx).
//! - `Err(HandleError::NotForKst)`: a recipient that is not kst's at all (exit 65, LMTP 5xx).
//!   Oversize mail and mail for `keys+extension@` of a served domain are accepted and dropped
//!   (`Ok`, silent), never bounced: a bounce would carry an outsider's text to a forged sender.

use std::sync::Arc;
use std::time::SystemTime;

use mail_parser::{Message, MessageParser};
use sha2::{Digest, Sha256};

use crate::address::Address;
use crate::authres;
use crate::body::{self, RequestBody};
use crate::error::{Component, Error};
use crate::kauth::AuthKey;
use crate::mailer::{Delivery, Mailer, OutgoingMail};
use crate::policy::{AuthSource, Policy};
use crate::protocol::{
    HEADER_LOG_SINCE, HEADER_LOG_WITNESSED, LogAsk, Question, Reason, Status, TRANSPARENCY_VERSION,
};
use crate::ratelimit::{self, LimitKind, MemoryRateLimiter, RateLimiter};
use crate::received;
use crate::reply::{self, DirectoryAnswer, LogAnswers, Proven, ReplyContent, ReplyTo};
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome};
use crate::validate::{self, KeyPolicy};
use crate::wks::{self, SubmissionKeys};

/// The SMTP envelope of one delivery, as the provider's MTA states it.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// MAIL FROM. `Some("")` is the null sender; `None` means the MTA did not say (pipe mode
    /// without `--sender`), in which case `Return-Path:` and then `From:` stand in.
    pub sender: Option<String>,
    /// The recipient this delivery is for (`keys@<domain>`).
    pub recipient: String,
    /// The SASL login passed by the MTA (pipe mode `--sasl-username`); used only with
    /// [`AuthSource::SaslArgv`].
    pub sasl_username: Option<String>,
}

/// Why kst deliberately left a message unanswered (it is still accepted and logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Null envelope sender (a bounce or auto-reply).
    NullSender,
    /// `Auto-Submitted:` other than `no` (RFC 3834).
    AutoSubmitted,
    /// `Precedence: bulk/junk/list`.
    BulkPrecedence,
    /// From MAILER-DAEMON.
    MailerDaemon,
    /// Mailing-list mail (`List-Id:`, `List-Post:`) or from a list address (`owner-*`,
    /// `*-request`).
    MailingList,
    /// From a `keys@` address this KST serves (a loop).
    OwnAddress,
    /// The envelope sender is not a single plain address; there is nobody to answer.
    BadSender,
    /// The message could not be parsed at all.
    Unparseable,
    /// A rate limit is exhausted (which one is logged).
    RateLimited(LimitKind),
    /// `require_authentication_results` is on and the sender is not vouched for: neither an
    /// authenticated submission nor an SPF/DKIM/DMARC pass in the provider's
    /// `Authentication-Results:` header.
    SenderNotVouched,
    /// The message exceeds `max_message_bytes`: dropped unread, never bounced.
    TooLarge,
    /// Sent to `keys<delimiter>extension@` of a served domain (the MTA's recipient delimiter
    /// routed it here): dropped, never bounced.
    AddressExtension,
    /// A publication the MTA delivered again after the owner deleted the key it had published
    /// (its publication id is one of the deleted history, [`Error::DeletedSince`]): deletion
    /// wins, nothing is published and nothing is sent.
    DeletedSince,
    /// A publication or deletion (version 3) that a newer change of the address replaced
    /// before its confirmation was written: the key directory proves only the address's
    /// latest version, which is a deletion or another primary key (a publication), or a key
    /// (a deletion). No confirmation of the older change can carry a proof the client
    /// accepts; the newer change's own reply is the owner's last word (docs/PROTOCOL.md,
    /// "Versions"). Nothing is undone and nothing is sent.
    Superseded,
}

impl Silence {
    /// Stable token for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Silence::NullSender => "null-sender",
            Silence::AutoSubmitted => "auto-submitted",
            Silence::BulkPrecedence => "bulk-precedence",
            Silence::MailerDaemon => "mailer-daemon",
            Silence::MailingList => "mailing-list",
            Silence::OwnAddress => "own-address",
            Silence::BadSender => "bad-sender",
            Silence::Unparseable => "unparseable",
            Silence::RateLimited(_) => "rate-limited",
            Silence::SenderNotVouched => "sender-not-vouched",
            Silence::TooLarge => "too-large",
            Silence::AddressExtension => "address-extension",
            Silence::DeletedSince => "deleted-since",
            Silence::Superseded => "superseded",
        }
    }
}

/// What kst decided about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A key is published for `address` and a confirmation was sent.
    Published {
        /// The account.
        address: Address,
        /// The version that holds the key.
        version: u64,
        /// Its fingerprint.
        fingerprint: String,
        /// False when the store already held this publication (redelivery or same key).
        new_version: bool,
    },
    /// A retrieval was answered (`found` or `not-found`).
    Answered {
        /// The status sent.
        status: Status,
        /// The queried address.
        address: Address,
    },
    /// The request was refused and the refusal sent.
    Refused {
        /// Why.
        reason: Reason,
    },
    /// The account's key and history were deleted (or there was none) and this was confirmed.
    Deleted {
        /// The account.
        address: Address,
        /// False when nothing was published (a redelivered or repeated deletion).
        existed: bool,
    },
    /// Deliberately unanswered.
    Ignored(Silence),
}

impl Decision {
    /// Stable reason token of a refusal or a silence (`"rate-limited"`, `"auto-submitted"`),
    /// `None` for a decision that needs no reason. LMTP replies and log lines show it.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Decision::Refused { reason } => Some(reason.as_str()),
            Decision::Ignored(why) => Some(why.as_str()),
            Decision::Published { .. } | Decision::Answered { .. } | Decision::Deleted { .. } => {
                None
            }
        }
    }

    /// The account the decision is about (published, answered, deleted), for log lines.
    pub fn address(&self) -> Option<&Address> {
        match self {
            Decision::Published { address, .. }
            | Decision::Answered { address, .. }
            | Decision::Deleted { address, .. } => Some(address),
            Decision::Refused { .. } | Decision::Ignored(_) => None,
        }
    }

    /// Stable outcome token for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Published { .. } => "published",
            Decision::Answered { status, .. } => status.as_str(),
            Decision::Refused { .. } => "refused",
            Decision::Deleted { .. } => "deleted",
            Decision::Ignored(_) => "ignored",
        }
    }
}

/// Which request format a message had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A key block.
    Publication,
    /// A query.
    Retrieval,
    /// A deletion (`DELETE` and K_auth).
    Deletion,
    /// Neither, or not looked at.
    Other,
}

impl RequestKind {
    /// Stable token for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Publication => "publication",
            RequestKind::Retrieval => "retrieval",
            RequestKind::Deletion => "deletion",
            RequestKind::Other => "other",
        }
    }
}

/// The result of handling one message for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// The request's Message-ID, if it had one (for logs).
    pub message_id: Option<String>,
    /// Which format it had.
    pub kind: RequestKind,
    /// What kst decided.
    pub decision: Decision,
    /// The reply kst handed to its mailer and what became of it; `None` when the request is
    /// left unanswered ([`Decision::Ignored`]).
    pub reply: Option<ReplyOutcome>,
}

/// The reply to one request and what became of it: durable ([`Delivery::Sent`]), or refused
/// for good by the SMTP relay ([`Delivery::Refused`]: not sent, the request decided without it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// Its envelope recipient (the requester's envelope sender).
    pub to: Address,
    /// Its Message-ID (without angle brackets).
    pub message_id: String,
    /// Sent, or refused by the relay.
    pub delivery: Delivery,
}

/// Mail that is not for kst at all: refuse permanently (5xx, exit 65).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotForKst {
    /// The recipient is neither `keys@` of a served domain nor one of its extensions.
    #[error("recipient is not a key service address of this KST")]
    UnknownRecipient,
}

/// Characters an MTA may use as its recipient delimiter (Postfix `recipient_delimiter`):
/// `keys` followed by one of them, at a served domain, is an extension of the service address.
pub const RECIPIENT_DELIMITERS: &[char] = &['+', '-', '_', '.', '='];

/// Why [`Kst::handle`] did not decide.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Permanent: bounce.
    #[error(transparent)]
    NotForKst(#[from] NotForKst),
    /// Temporary: the MTA must retry.
    #[error(transparent)]
    Temporary(#[from] Error),
}

/// How many times a version 3 reply reads the key directory's answer and the key store
/// before it gives up on making its key agree with the answer (docs/PROTOCOL.md,
/// "Versions"): then a temporary failure.
pub const AGREE_ATTEMPTS: u32 = 8;

/// The first pause between two of those reads; each next one is twice as long (10 ms, then
/// 20 ms, ... 640 ms: 1.27 s in all, more than an epoch takes with `gather_us` at its
/// largest, 100 ms).
pub const AGREE_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The Key Storage Service: policy, store and mailer.
#[derive(Clone)]
pub struct Kst {
    policy: Arc<Policy>,
    store: Arc<dyn KeyStore>,
    mailer: Arc<dyn Mailer>,
    limiter: Arc<dyn RateLimiter>,
    envelope_from: Option<Address>,
    submission_keys: Arc<SubmissionKeys>,
    reminders: Arc<crate::reminder::ReminderSettings>,
    log_answers: Option<Arc<dyn LogAnswers>>,
}

impl Kst {
    /// A KST with `policy`, storing in `store` and replying through `mailer`. Replies go out
    /// with the null envelope sender (RFC 3834) unless [`Kst::with_envelope_from`] says otherwise.
    /// Rate limits are counted in this process ([`MemoryRateLimiter`]) unless
    /// [`Kst::with_rate_limiter`] names a shared limiter.
    pub fn new(policy: Policy, store: Arc<dyn KeyStore>, mailer: Arc<dyn Mailer>) -> Self {
        Kst {
            policy: Arc::new(policy),
            store,
            mailer,
            limiter: Arc::new(MemoryRateLimiter::new()),
            envelope_from: None,
            submission_keys: Arc::new(SubmissionKeys::new()),
            reminders: Arc::new(crate::reminder::ReminderSettings::default()),
            log_answers: None,
        }
    }

    /// Answers in protocol version 3 (the key directory's answer inside every reply about an
    /// address) for the domains `answers` has a directory for, when the request offers it.
    pub fn with_log_answers(mut self, answers: Arc<dyn LogAnswers>) -> Self {
        self.log_answers = Some(answers);
        self
    }

    /// What the bound on version 3 replies' append-only work did so far (metrics; zeros
    /// without a key directory).
    pub fn mail_proofs(&self) -> reply::MailProofStats {
        self.log_answers
            .as_ref()
            .map(|l| l.mail_proofs())
            .unwrap_or_default()
    }

    /// True when `domain` has a key directory, so that this KST speaks version 3 for it.
    pub fn has_directory(&self, domain: &str) -> bool {
        self.log_answers
            .as_ref()
            .is_some_and(|l| l.has_directory(domain))
    }

    /// Sends expiry reminders with these settings ([`crate::reminder`]; the default: on, 14
    /// and 3 days before, hourly in a daemon).
    pub fn with_reminders(mut self, settings: crate::reminder::ReminderSettings) -> Self {
        self.reminders = Arc::new(settings);
        self
    }

    /// The expiry reminder settings.
    pub fn reminders(&self) -> &crate::reminder::ReminderSettings {
        &self.reminders
    }

    /// Decrypts WKS submissions with these per-domain submission keys (without them, only
    /// unencrypted `application/pgp-keys` submissions can be read).
    pub fn with_submission_keys(mut self, keys: Arc<SubmissionKeys>) -> Self {
        self.submission_keys = keys;
        self
    }

    /// The WKS submission keys.
    pub fn submission_keys(&self) -> &Arc<SubmissionKeys> {
        &self.submission_keys
    }

    /// Counts rate limits in `limiter` (shared by a pool: Redis or PostgreSQL).
    pub fn with_rate_limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &Arc<dyn RateLimiter> {
        &self.limiter
    }

    /// Sets the envelope sender of replies (`None`: null sender `<>`).
    pub fn with_envelope_from(mut self, from: Option<Address>) -> Self {
        self.envelope_from = from;
        self
    }

    /// The envelope sender of replies (`None`: the null sender `<>`).
    pub fn envelope_from(&self) -> Option<&Address> {
        self.envelope_from.as_ref()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The mailer.
    pub fn mailer(&self) -> &Arc<dyn Mailer> {
        &self.mailer
    }

    /// Checks whether `recipient` is a service address (`keys@` of a served domain) and returns
    /// it normalized. LMTP uses this at RCPT time.
    pub fn service_recipient(&self, recipient: &str) -> Result<Address, NotForKst> {
        let rcpt = self
            .policy
            .address_policy
            .normalize(recipient)
            .map_err(|_| NotForKst::UnknownRecipient)?;
        if rcpt
            .local()
            .eq_ignore_ascii_case(&self.policy.service_local_part)
            && self.policy.serves_domain(rcpt.domain())
        {
            self.policy
                .service_address(rcpt.domain())
                .ok_or(NotForKst::UnknownRecipient)
        } else {
            Err(NotForKst::UnknownRecipient)
        }
    }

    /// True when `recipient` is `keys<delimiter>anything@` of a served domain (a delimiter of
    /// [`RECIPIENT_DELIMITERS`] or the configured subaddress separator): mail the MTA routed to
    /// kst through its recipient delimiter. kst accepts and drops it.
    pub fn is_service_extension(&self, recipient: &str) -> bool {
        let Some((local, domain)) = recipient.trim().rsplit_once('@') else {
            return false;
        };
        let service = self.policy.service_local_part.as_str();
        let Some(rest) = local
            .get(..service.len())
            .filter(|head| head.eq_ignore_ascii_case(service))
            .map(|_| &local[service.len()..])
        else {
            return false;
        };
        let delimiter = rest.chars().next();
        let is_delimiter = delimiter.is_some_and(|c| {
            RECIPIENT_DELIMITERS.contains(&c)
                || self.policy.address_policy.subaddress_separator == Some(c)
        });
        is_delimiter
            && self
                .policy
                .address_policy
                .normalize(&format!("{service}@{domain}"))
                .is_ok_and(|a| self.policy.serves_domain(a.domain()))
    }

    /// True when kst takes mail for `recipient`: a service address or one of its extensions
    /// (LMTP accepts these at RCPT time; everything else is refused there).
    pub fn accepts_recipient(&self, recipient: &str) -> bool {
        self.service_recipient(recipient).is_ok() || self.is_service_extension(recipient)
    }

    /// Decides about one message delivered to `envelope.recipient`. See the module docs for
    /// what each result means to the MTA.
    pub async fn handle(&self, envelope: &Envelope, raw: &[u8]) -> Result<Handled, HandleError> {
        let service = match self.service_recipient(&envelope.recipient) {
            Ok(service) => service,
            Err(_) if self.is_service_extension(&envelope.recipient) => {
                return Ok(silent(None, RequestKind::Other, Silence::AddressExtension));
            }
            Err(e) => return Err(e.into()),
        };
        if raw.len() > self.policy.max_message_bytes {
            return Ok(silent(None, RequestKind::Other, Silence::TooLarge));
        }
        let Some(message) = MessageParser::default().parse(raw) else {
            return Ok(silent(None, RequestKind::Other, Silence::Unparseable));
        };
        let message_id = message.message_id().map(str::to_string);
        let requester = match self.reply_address(envelope, &message) {
            Ok(a) => a,
            Err(why) => return Ok(silent(message_id, RequestKind::Other, why)),
        };
        let body = match self.shape_problem(&message) {
            Some(problem) => Err(problem),
            None => Ok(match wks::recognize(&message) {
                Some(submission) => RequestBody::WksSubmission(submission),
                None => body::classify(&body::plain_text(&message).unwrap_or_default()),
            }),
        };
        let kind = match &body {
            Ok(
                RequestBody::Publication { .. }
                | RequestBody::SecretKey { .. }
                | RequestBody::WksSubmission(_),
            ) => RequestKind::Publication,
            Ok(RequestBody::Retrieval { .. }) => RequestKind::Retrieval,
            Ok(RequestBody::Deletion { .. }) => RequestKind::Deletion,
            _ => RequestKind::Other,
        };
        // The gate first, so that requests it silences use up no counter; then the limits,
        // on the authenticated account alone when there is one.
        let owner = self.owner(envelope, &message, &requester);
        if self.policy.require_authentication_results
            && owner.is_none()
            && let Err(why) = self.vouched(&message, &requester)
        {
            tracing::info!(
                message_id = message_id.as_deref().unwrap_or("-"),
                sender = %requester,
                why = %why,
                "sender not vouched for; the request is left unanswered"
            );
            return Ok(silent(message_id, kind, Silence::SenderNotVouched));
        }
        let hits = self.limit_hits(&message, &requester, owner.as_ref(), &body);
        let hits: Vec<(LimitKind, &str)> = hits.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let limits = &self.policy.rate_limits;
        if let Some(limit) = ratelimit::check(self.limiter.as_ref(), limits, &hits).await? {
            tracing::info!(
                message_id = message_id.as_deref().unwrap_or("-"),
                sender = %requester,
                limit = limit.as_str(),
                "rate limit exhausted; the request is left unanswered"
            );
            return Ok(silent(message_id, kind, Silence::RateLimited(limit)));
        }
        let decided = self
            .decide(
                envelope, raw, &message, body, service, requester, message_id, kind,
            )
            .await;
        // Deferred: the MTA delivers the message again and it is counted again then, so what
        // it counted on the sender's and the account's counters is taken back (an honest
        // sender's retries during an outage must not use up its budget: red team S1). The
        // source's counter is not: it bounds how many full decisions one host makes kst take,
        // and a sender can make its own replies fail temporarily (a relay's 4xx to a
        // recipient domain whose DNS it breaks), which would otherwise never be counted
        // (review F1). No reply went out as far as kst knows: sending it is the last fallible
        // step of every decision (a relay that lost its final answer aside).
        let victim_facing: Vec<(LimitKind, &str)> = hits
            .iter()
            .copied()
            .filter(|(kind, _)| *kind != LimitKind::SourceIp)
            .collect();
        if decided.is_err()
            && let Err(e) = ratelimit::refund(self.limiter.as_ref(), limits, &victim_facing).await
        {
            tracing::warn!(error = %e, "the rate limits a deferred message counted could not be taken back; its retry is counted again");
        }
        decided
    }

    /// [`Kst::handle`] for a message through its gate and limits: answers it (or refuses
    /// it) in the version negotiated. An error defers it (the caller's limits are taken back).
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        envelope: &Envelope,
        raw: &[u8],
        message: &Message<'_>,
        body: Result<RequestBody, String>,
        service: Address,
        requester: Address,
        message_id: Option<String>,
        kind: RequestKind,
    ) -> Result<Handled, HandleError> {
        let references: Vec<String> = message
            .references()
            .as_text_list()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        let ctx = ReplyTo {
            service: &service,
            requester: &requester,
            in_reply_to: message_id.as_deref(),
            references: &references,
            version: crate::protocol::PROTOCOL_VERSION,
            question: None,
            log_ask: LogAsk::default(),
            sent: std::sync::OnceLock::new(),
        };
        // What the request asks (version 3 binds it into every tag), and whether this KST
        // speaks version 3 for it: the service's domain, and a queried address's domain when it
        // serves that, must have a key directory.
        let query: Option<String> = match &body {
            Ok(RequestBody::Retrieval { query, .. }) => Some(query.trim().to_string()),
            _ => None,
        };
        let question = match (&body, &query) {
            (_, Some(q)) => Some(Question::Retrieve(q)),
            (Ok(RequestBody::Deletion { .. }), _) => Some(Question::Delete),
            (Ok(RequestBody::Retrieval { .. } | RequestBody::Unrecognized(_)), _) | (Err(_), _) => {
                None
            }
            (Ok(_), _) => Some(Question::Publish),
        };
        let queried_domain_ok = query
            .as_deref()
            .and_then(|q| self.policy.normalize_address(q).ok())
            .filter(|a| self.policy.serves_domain(a.domain()))
            .is_none_or(|a| self.has_directory(a.domain()));
        let speaks: &[u32] = if self.has_directory(service.domain()) && queried_domain_ok {
            &crate::protocol::VERSIONS_WITH_DIRECTORY
        } else {
            &crate::protocol::VERSIONS
        };
        // Algorithm agility (paper VI.B): answer in the newest version both sides speak; a
        // request naming none this KST speaks is refused (in version 1, which every client reads).
        let ctx = match crate::protocol::negotiate_among(
            header_value(message, crate::protocol::HEADER_PROTOCOL),
            header_value(message, crate::protocol::HEADER_MAC),
            speaks,
        ) {
            Ok(version) => ReplyTo {
                version,
                question,
                log_ask: self.log_ask(message, version, message_id.as_deref()),
                ..ctx
            },
            Err(mismatch) => {
                let decision = self
                    .refuse(
                        &ctx,
                        Reason::UnsupportedVersion,
                        None,
                        Some(mismatch.to_string()),
                        None,
                    )
                    .await?;
                let reply = ctx.sent.get().cloned();
                return Ok(Handled {
                    message_id,
                    kind,
                    decision,
                    reply,
                });
            }
        };
        let body = match body {
            Ok(b) => b,
            Err(problem) => {
                let decision = self
                    .refuse(&ctx, Reason::Malformed, None, Some(problem), None)
                    .await?;
                let reply = ctx.sent.get().cloned();
                return Ok(Handled {
                    message_id,
                    kind,
                    decision,
                    reply,
                });
            }
        };
        let decision = match body {
            RequestBody::Publication { armored, k_auth } => {
                self.publication(&ctx, envelope, message, &armored, k_auth.as_deref())
                    .await?
            }
            RequestBody::SecretKey { k_auth } => {
                let k = k_auth.as_deref().and_then(|l| AuthKey::parse(l).ok());
                self.refuse(&ctx, Reason::SecretKey, None, None, k.as_ref())
                    .await?
            }
            RequestBody::Retrieval { query, k_auth } => {
                self.retrieval(&ctx, &query, &k_auth).await?
            }
            RequestBody::Deletion { k_auth } => {
                self.deletion(&ctx, envelope, message, &k_auth).await?
            }
            RequestBody::WksSubmission(submission) => {
                self.wks_publication(&ctx, envelope, message, raw, submission)
                    .await?
            }
            RequestBody::Unrecognized(why) => {
                self.refuse(&ctx, Reason::Malformed, None, Some(why.to_string()), None)
                    .await?
            }
        };
        let reply = ctx.sent.get().cloned();
        Ok(Handled {
            message_id,
            kind,
            decision,
            reply,
        })
    }

    /// What a version 3 request asks of the key directory's answer (`KST-Log-Since`,
    /// `KST-Log-Witnessed`); nothing below version 3. A value that cannot be used is logged
    /// and ignored: the client checks what it gets.
    fn log_ask(&self, msg: &Message<'_>, version: u32, message_id: Option<&str>) -> LogAsk {
        if version < TRANSPARENCY_VERSION {
            return LogAsk::default();
        }
        let (ask, ignored) = LogAsk::from_headers(
            headers_named(msg, HEADER_LOG_SINCE),
            headers_named(msg, HEADER_LOG_WITNESSED),
        );
        for why in ignored {
            tracing::info!(
                message_id = message_id.unwrap_or("-"),
                why = %why,
                "a KST-Log header was ignored"
            );
        }
        ask
    }

    /// Why the message's shape is outside the caps (header count, MIME parts, nesting), if it is.
    fn shape_problem(&self, msg: &Message<'_>) -> Option<String> {
        let p = &self.policy;
        let headers = msg.parts.first().map_or(0, |root| root.headers.len());
        if headers > p.max_headers {
            return Some(format!(
                "the message has {headers} header fields; at most {} are read",
                p.max_headers
            ));
        }
        if msg.parts.len() > p.max_mime_parts {
            return Some(format!(
                "the message has {} MIME parts; at most {} are read",
                msg.parts.len(),
                p.max_mime_parts
            ));
        }
        let depth = body::mime_depth(msg);
        if depth > p.max_mime_depth {
            return Some(format!(
                "the message nests MIME parts {depth} deep; at most {} levels are read",
                p.max_mime_depth
            ));
        }
        None
    }

    /// The rate limits' counters this request counts on, in the order they are counted
    /// ([`ratelimit::check`]; taken back with [`ratelimit::refund`] when it is deferred).
    ///
    /// An authenticated account's own request counts on that account only. Anything else
    /// counts on its source (IPv6 per /64), on (reply recipient, queried address) for a
    /// retrieval, and on its reply recipient, in that order, so that once a source is used up
    /// its further requests use up no victim's budget (see `ratelimit`).
    fn limit_hits(
        &self,
        msg: &Message<'_>,
        requester: &Address,
        owner: Option<&Address>,
        body: &Result<RequestBody, String>,
    ) -> Vec<(LimitKind, String)> {
        if let Some(account) = owner {
            return vec![(LimitKind::Account, account.as_str().to_string())];
        }
        let source = header_value(msg, "Received")
            .and_then(|r| received::source_ip(r, &self.policy.trusted_mta_hosts))
            .map(|ip| ratelimit::source_counter(&ip));
        let pair = match body {
            Ok(RequestBody::Retrieval { query, .. }) => {
                self.policy.normalize_address(query).ok().map(|q| {
                    ratelimit::recipient_query_counter(
                        requester,
                        &q,
                        &self.policy.recipient_folding,
                    )
                })
            }
            _ => None,
        };
        let recipient = ratelimit::recipient_counter(requester, &self.policy.recipient_folding);
        let mut hits = Vec::with_capacity(3);
        if let Some(ip) = source {
            hits.push((LimitKind::SourceIp, ip));
        }
        if let Some(p) = pair {
            hits.push((LimitKind::SenderQuery, p));
        }
        hits.push((LimitKind::Sender, recipient));
        hits
    }

    /// The authenticated account, when the envelope sender (the reply recipient) is that very
    /// account: the only requests counted on an account and let through the gate unasked.
    fn owner(&self, env: &Envelope, msg: &Message<'_>, requester: &Address) -> Option<Address> {
        let account = self.authenticated_account(env, msg).ok()?;
        let sender = self.policy.normalize_address(requester.as_str()).ok()?;
        (sender == account).then_some(account)
    }

    /// The gate of `require_authentication_results` for a sender that did not submit with
    /// authentication: the provider's topmost `Authentication-Results:` header must vouch for
    /// the sender's mailbox (an aligned DKIM pass on a message whose one `From:` is the sender).
    fn vouched(&self, msg: &Message<'_>, requester: &Address) -> Result<(), authres::GateError> {
        let from = (headers_named(msg, "From").count() == 1)
            .then(|| single_mailbox(msg))
            .flatten();
        authres::check(
            provider_authentication_results(msg),
            &self.policy.authserv_id,
            requester.as_str(),
            from.as_deref(),
        )
    }

    /// Where a reply goes (RFC 3834: the envelope sender), or why there must be none.
    ///
    /// RFC 3834 section 2: no reply to a null sender, to any `Auto-Submitted:` other than `no`
    /// (every such header is read; comments and parameters after the keyword are ignored), to
    /// `Precedence: bulk/junk/list` or mailing-list mail (`List-Id:`, `List-Post:`), nor to
    /// list and system addresses (`MAILER-DAEMON`, `owner-*`, `*-request`); and never to a
    /// `keys@` this KST serves (a loop between two KSTs or with itself).
    fn reply_address(&self, env: &Envelope, msg: &Message<'_>) -> Result<Address, Silence> {
        if headers_named(msg, "Auto-Submitted").any(|v| !auto_submitted_is_no(v)) {
            return Err(Silence::AutoSubmitted);
        }
        if headers_named(msg, "Precedence").any(|v| {
            let v = v.trim().to_ascii_lowercase();
            ["bulk", "junk", "list"].contains(&v.as_str())
        }) {
            return Err(Silence::BulkPrecedence);
        }
        if header_value(msg, "List-Id").is_some() || header_value(msg, "List-Post").is_some() {
            return Err(Silence::MailingList);
        }
        // Without an envelope from the MTA, the topmost `Return-Path:` (what pipe(8) writes
        // with flag R) stands in, `<>` included: a null sender never gets a reply.
        let raw_sender = match &env.sender {
            Some(s) => s.clone(),
            None => match header_value(msg, "Return-Path") {
                Some(rp) => rp.trim().to_string(),
                None => single_mailbox(msg).unwrap_or_default(),
            },
        };
        if raw_sender.trim().trim_matches(['<', '>']).trim().is_empty() {
            return Err(Silence::NullSender);
        }
        // Replies go to the envelope sender as received; only the checks below fold it.
        let sender = self
            .policy
            .address_policy
            .as_received(&raw_sender)
            .map_err(|_| Silence::BadSender)?;
        let local = sender.local().to_ascii_lowercase();
        if local == "mailer-daemon" {
            return Err(Silence::MailerDaemon);
        }
        if local.starts_with("owner-") || local.ends_with("-request") {
            return Err(Silence::MailingList);
        }
        let folded = self.policy.normalize_address(sender.as_str());
        if self.policy.serves_domain(sender.domain())
            && folded.is_ok_and(|f| {
                f.local()
                    .eq_ignore_ascii_case(&self.policy.service_local_part)
            })
        {
            return Err(Silence::OwnAddress);
        }
        Ok(sender)
    }

    /// The account that authenticated the submission, or the refusal reason.
    fn authenticated_account(
        &self,
        env: &Envelope,
        msg: &Message<'_>,
    ) -> Result<Address, (Reason, String)> {
        let login = match self.policy.auth_source {
            AuthSource::SaslArgv => env
                .sasl_username
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or((
                    Reason::NotAuthenticated,
                    "the MTA passed no SASL login".to_string(),
                ))?,
            AuthSource::Received => {
                let top = header_value(msg, "Received")
                    .ok_or((Reason::NotAuthenticated, "no Received header".to_string()))?;
                received::authenticated_login(top, &self.policy.trusted_mta_hosts)
                    .map_err(|e| (Reason::NotAuthenticated, e.to_string()))?
            }
        };
        let account = match self.policy.login_map.get(&login) {
            Some(a) => a.clone(),
            None => self.policy.address_policy.normalize(&login).map_err(|e| {
                (
                    Reason::UnknownAccount,
                    format!("the login is not a usable address ({e}) and not in kst.login_map"),
                )
            })?,
        };
        if !self.policy.serves_domain(account.domain()) {
            return Err((
                Reason::DomainNotServed,
                format!("{} is not a served domain", account.domain()),
            ));
        }
        Ok(account)
    }

    async fn publication(
        &self,
        ctx: &ReplyTo<'_>,
        env: &Envelope,
        msg: &Message<'_>,
        armored: &str,
        k_auth_line: Option<&str>,
    ) -> Result<Decision, Error> {
        let (account, k_auth) = match self.owner_request(ctx, env, msg, k_auth_line).await? {
            Ok(owner) => owner,
            Err(refused) => return Ok(refused),
        };
        let id = |packets: &[u8]| publication_id(&account, &k_auth, packets);
        self.publish_valid(ctx, &account, armored, Some(&k_auth), id)
            .await
    }

    /// Publishes `armored` for the authenticated `account` if it passes the key policy, and
    /// confirms (with the HMAC when there is a K_auth); otherwise refuses. `id` makes the
    /// publication's idempotency token from the packets that will be stored.
    async fn publish_valid(
        &self,
        ctx: &ReplyTo<'_>,
        account: &Address,
        armored: &str,
        k_auth: Option<&AuthKey>,
        id: impl FnOnce(&[u8]) -> String,
    ) -> Result<Decision, Error> {
        let key_policy = KeyPolicy {
            max_key_bytes: self.policy.max_key_bytes,
            max_published_bytes: self.policy.max_published_key_bytes,
            address_policy: self.policy.address_policy.clone(),
            ..KeyPolicy::default()
        };
        let key = match validate::validate(armored, account, &key_policy, SystemTime::now()) {
            Ok(k) => k,
            Err(e) => {
                return self
                    .refuse(ctx, e.reason(), Some(account), Some(e.to_string()), k_auth)
                    .await;
            }
        };
        if !key.stripped.is_empty() {
            tracing::info!(account = %account, stripped = ?key.stripped, "key published without parts that do not belong to the account");
        }
        let publication_id = id(&key.packets);
        let published = crate::publication::publish_merged(
            self.store.as_ref(),
            NewKey {
                address: account.clone(),
                key: key.packets,
                fingerprint: key.fingerprint,
                publication_id,
                published_at: crate::time::unix_now(),
                revoked: key.revoked,
                expected: crate::store::Expected::Any,
            },
            self.policy.max_published_key_bytes,
            crate::time::unix_now(),
        )
        .await;
        let merged = match published {
            Err(e @ Error::DeletedSince { .. }) => {
                // A redelivery of a publication whose key the owner deleted since: the
                // deletion stands, and its confirmation was the owner's last word.
                tracing::info!(account = %account, error = %e, "publication not applied: the owner deleted the key since");
                return Ok(Decision::Ignored(Silence::DeletedSince));
            }
            other => other?,
        };
        let outcome = match merged {
            Ok(o) => o,
            Err(e) => {
                let (size, limit) = match e {
                    crate::merge::MergeError::TooLarge { size, limit } => (size, limit),
                    _ => (0, self.policy.max_published_key_bytes),
                };
                let e = validate::KeyRejection::PublishedTooLarge { size, limit };
                let detail = format!(
                    "{e} (merged with the key already published; revoke or remove old subkeys)"
                );
                return self
                    .refuse(ctx, e.reason(), Some(account), Some(detail), k_auth)
                    .await;
            }
        };
        let new_version = matches!(outcome, PublishOutcome::Published(_));
        let mut record = outcome.record().clone();
        // Version 3: the directory's answer, read after the store and the directory recorded
        // the publication (TransparentStore writes both before `publish` returns), and the
        // version it proves, which the confirmation carries when it has this publication's
        // primary key (its own version, or a newer one holding it merged, as a redelivery is
        // confirmed). The fingerprint decides, not the version number: after a deletion the
        // store starts again at version 1, so a racing publication of another key may hold
        // the same number.
        let mut answer = None;
        if ctx.version >= TRANSPARENCY_VERSION {
            let (proven, read) = self.proven_record(ctx, account, Some(&record)).await?;
            match proven {
                Some(p) if p.fingerprint == record.fingerprint => {
                    record = p;
                }
                other => {
                    tracing::info!(account = %account, version = record.version,
                        latest = ?read.proven.version(), deleted = other.is_none(),
                        "publication superseded by a newer change of the address before its \
                         confirmation: no confirmation sent");
                    return Ok(Decision::Ignored(Silence::Superseded));
                }
            }
            answer = Some(read.text);
        }
        let record = &record;
        let built = reply::build_with_answer(
            ctx,
            &ReplyContent::Published {
                address: account,
                packets: &record.key,
                fingerprint: record.fingerprint.as_str(),
            },
            k_auth,
            answer.as_deref(),
        );
        self.send(ctx, built).await?;
        Ok(Decision::Published {
            address: account.clone(),
            version: record.version,
            fingerprint: record.fingerprint.to_string(),
            new_version,
        })
    }

    /// The account and K_auth of a request only the key's owner may make (publication,
    /// deletion): authenticated, bound to From and envelope sender, with a valid K_auth.
    /// Otherwise the refusal already sent, as the inner `Err`.
    async fn owner_request(
        &self,
        ctx: &ReplyTo<'_>,
        env: &Envelope,
        msg: &Message<'_>,
        k_auth_line: Option<&str>,
    ) -> Result<Result<(Address, AuthKey), Decision>, Error> {
        let k_auth = k_auth_line.and_then(|l| AuthKey::parse(l).ok());
        let account = match self.bound_account(ctx, env, msg) {
            Ok(a) => a,
            Err((reason, account, detail)) => {
                return self
                    .refuse(ctx, reason, account.as_ref(), Some(detail), k_auth.as_ref())
                    .await
                    .map(Err);
            }
        };
        match k_auth {
            Some(k_auth) => Ok(Ok((account, k_auth))),
            None => self
                .refuse(ctx, Reason::BadAuthKey, Some(&account), None, None)
                .await
                .map(Err),
        }
    }

    /// The authenticated account when the From header and the envelope sender are that account
    /// too (publications and deletions); otherwise the refusal reason, the account if known, and
    /// a detail for people.
    fn bound_account(
        &self,
        ctx: &ReplyTo<'_>,
        env: &Envelope,
        msg: &Message<'_>,
    ) -> Result<Address, (Reason, Option<Address>, String)> {
        let account = self
            .authenticated_account(env, msg)
            .map_err(|(reason, detail)| (reason, None, detail))?;
        let from = single_mailbox(msg).and_then(|f| self.policy.normalize_address(&f).ok());
        let sender = self.policy.normalize_address(ctx.requester.as_str()).ok();
        if from.as_ref() != Some(&account) || sender.as_ref() != Some(&account) {
            let detail = format!(
                "authenticated as {account}; From: {}; envelope sender: {}",
                from.as_ref().map_or("(none or several)", Address::as_str),
                ctx.requester
            );
            return Err((Reason::SenderMismatch, Some(account), detail));
        }
        Ok(account)
    }

    /// A deletion: authenticated and bound like a publication; removes the key and its history.
    async fn deletion(
        &self,
        ctx: &ReplyTo<'_>,
        env: &Envelope,
        msg: &Message<'_>,
        k_auth_line: &str,
    ) -> Result<Decision, Error> {
        let (account, k_auth) = match self.owner_request(ctx, env, msg, Some(k_auth_line)).await? {
            Ok(owner) => owner,
            Err(refused) => return Ok(refused),
        };
        let existed = self.store.delete(&account).await?;
        tracing::info!(account = %account, existed, "key and history deleted on the owner's request");
        // Version 3: the answer must prove the deletion (or nothing ever held); a key proven
        // now is a publication made after this deletion.
        let mut answer = None;
        if ctx.version >= TRANSPARENCY_VERSION {
            let (proven, read) = self.proven_record(ctx, &account, None).await?;
            if let Some(p) = proven {
                tracing::info!(account = %account, latest = p.version,
                    "deletion superseded by a newer publication before its confirmation: no \
                     confirmation sent");
                return Ok(Decision::Ignored(Silence::Superseded));
            }
            answer = Some(read.text);
        }
        let built = reply::build_with_answer(
            ctx,
            &ReplyContent::Deleted { address: &account },
            Some(&k_auth),
            answer.as_deref(),
        );
        self.send(ctx, built).await?;
        Ok(Decision::Deleted {
            address: account,
            existed,
        })
    }

    async fn retrieval(
        &self,
        ctx: &ReplyTo<'_>,
        query: &str,
        k_auth_line: &str,
    ) -> Result<Decision, Error> {
        let Ok(k_auth) = AuthKey::parse(k_auth_line) else {
            return self.refuse(ctx, Reason::BadAuthKey, None, None, None).await;
        };
        let Ok(address) = self.policy.normalize_address(query) else {
            return self
                .refuse(ctx, Reason::BadAddress, None, None, Some(&k_auth))
                .await;
        };
        if !self.policy.serves_domain(address.domain()) {
            return self
                .refuse(
                    ctx,
                    Reason::DomainNotServed,
                    Some(&address),
                    None,
                    Some(&k_auth),
                )
                .await;
        }
        // Version 3: the directory's answer first, then the stored version it proves (or "no
        // key"), so the key served is exactly the one the answer commits to.
        let (content_record, answer) = if ctx.version >= TRANSPARENCY_VERSION {
            let (record, read) = self.proven_record(ctx, &address, None).await?;
            (record, Some(read.text))
        } else {
            (self.store.get(&address).await?, None)
        };
        let (content, status) = match &content_record {
            Some(r) => (
                ReplyContent::Found {
                    address: &address,
                    packets: &r.key,
                    fingerprint: r.fingerprint.as_str(),
                },
                Status::Found,
            ),
            None => (
                ReplyContent::NotFound { address: &address },
                Status::NotFound,
            ),
        };
        let built = reply::build_with_answer(ctx, &content, Some(&k_auth), answer.as_deref());
        self.send(ctx, built).await?;
        Ok(Decision::Answered { status, address })
    }

    /// The key directory's answer for `address` (for a version 3 reply) and the stored record
    /// of the version it proves: `None` when it proves a deletion or that the address was
    /// never held. A reply that serves that record (or "no key") with that answer agrees
    /// with it by construction, whatever changes of the address race the reply: a change
    /// written to the key store and not yet recorded in an epoch is not served, and a
    /// version recorded since the store was read is served from the store's history.
    /// `known`: a record the caller holds already (a publication's own), taken without
    /// reading the store when it is the one proven.
    ///
    /// An answer proving a key the store does not hold (a deletion written to the store and
    /// not yet recorded) is read again after a pause, [`AGREE_ATTEMPTS`] times in all; then a
    /// temporary error
    /// (the MTA delivers the request again; nothing is lost). A directory that cannot be
    /// read is a temporary error too: never a reply without proofs.
    async fn proven_record(
        &self,
        ctx: &ReplyTo<'_>,
        address: &Address,
        known: Option<&KeyRecord>,
    ) -> Result<(Option<KeyRecord>, DirectoryAnswer), Error> {
        let logs = match &self.log_answers {
            Some(logs) if logs.has_directory(address.domain()) => logs,
            _ => {
                return Err(Error::Config(format!(
                    "a version 3 reply about {address} needs its domain's key directory, and there is none"
                )));
            }
        };
        // Whose share of the append-only work's turns this takes: the reply's recipient,
        // folded as its rate limit counts it (case and `+tag` variants share one).
        let asker = ratelimit::recipient_counter(ctx.requester, &self.policy.recipient_folding);
        let mut pause = AGREE_PAUSE;
        let mut problem = String::new();
        for attempt in 1..=AGREE_ATTEMPTS {
            if attempt > 1 {
                logs.pause(pause).await;
                pause = pause.saturating_mul(2);
            }
            let answer = logs.answer(address, ctx.log_ask, &asker).await?;
            let Proven::Key { version, .. } = answer.proven else {
                return Ok((None, answer));
            };
            if let Some(known) = known.filter(|k| answer.proven.is(k)) {
                return Ok((Some(known.clone()), answer));
            }
            if let Some(current) = self.store.get(address).await?
                && answer.proven.is(&current)
            {
                return Ok((Some(current), answer));
            }
            // A version the store replaced since (or whose epoch came after the store read):
            // the history holds every version until a deletion.
            let history = self.store.history(address).await?;
            if let Some(held) = history.into_iter().rev().find(|r| answer.proven.is(r)) {
                return Ok((Some(held), answer));
            }
            problem = format!(
                "the key directory's latest entry for {address} is version {version}, which \
                 the key store does not hold (a deletion not yet recorded; or a store changed \
                 behind kst's back: `kst migrate` records the key it holds, `kst keys delete` \
                 a deletion)"
            );
        }
        tracing::warn!(address = %address, attempts = AGREE_ATTEMPTS, problem = %problem,
            "the key directory and the key store do not agree; the request is deferred");
        Err(Error::unavailable(
            Component::other("key directory"),
            format!("{problem}; the request is deferred (delivered again later)"),
        ))
    }

    async fn refuse(
        &self,
        ctx: &ReplyTo<'_>,
        reason: Reason,
        address: Option<&Address>,
        detail: Option<String>,
        k_auth: Option<&AuthKey>,
    ) -> Result<Decision, Error> {
        let built = reply::build(
            ctx,
            &ReplyContent::Refused {
                reason,
                address,
                detail,
            },
            k_auth,
        );
        self.send(ctx, built).await?;
        Ok(Decision::Refused { reason })
    }

    /// Hands the reply `built` to the mailer and notes in `ctx` what became of it (for
    /// [`Handled::reply`]); a temporary failure is the error.
    async fn send(&self, ctx: &ReplyTo<'_>, built: reply::BuiltReply) -> Result<(), Error> {
        let delivery = self
            .mailer
            .send(&OutgoingMail {
                envelope_from: self.envelope_from.clone(),
                recipient: ctx.requester.clone(),
                message: built.message,
                message_id: built.message_id.clone(),
            })
            .await?;
        // One reply per request: a second would not replace the first's outcome.
        let _ = ctx.sent.set(ReplyOutcome {
            to: ctx.requester.clone(),
            message_id: built.message_id,
            delivery,
        });
        Ok(())
    }
}

fn silent(message_id: Option<String>, kind: RequestKind, why: Silence) -> Handled {
    Handled {
        message_id,
        kind,
        decision: Decision::Ignored(why),
        reply: None,
    }
}

/// The raw value of the first header named `name` (case-insensitive).
pub(crate) fn header_value<'m>(msg: &'m Message<'_>, name: &str) -> Option<&'m str> {
    msg.headers_raw()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The topmost `Authentication-Results:` header, read only when it sits above the topmost
/// `Received:` header: the provider's milter writes its own there, while one below the
/// provider's `Received:` came with the message (the sender's own, when the provider added
/// none) and is never read. `None` when there is no `Received:` at all.
fn provider_authentication_results<'m>(msg: &'m Message<'_>) -> Option<&'m str> {
    let mut found = None;
    for (name, value) in msg.headers_raw() {
        if name.eq_ignore_ascii_case("Received") {
            return found;
        }
        if found.is_none() && name.eq_ignore_ascii_case("Authentication-Results") {
            found = Some(value);
        }
    }
    None
}

/// The raw values of every header named `name` (case-insensitive), top to bottom.
fn headers_named<'m>(msg: &'m Message<'_>, name: &'m str) -> impl Iterator<Item = &'m str> {
    msg.headers_raw()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// True when an `Auto-Submitted:` value is the keyword `no` (RFC 3834 section 5: the keyword,
/// then optional comments and `; parameters`).
fn auto_submitted_is_no(value: &str) -> bool {
    let keyword = value.split([';', '(']).next().unwrap_or("").trim();
    keyword.eq_ignore_ascii_case("no")
}

/// The address of a From header that holds exactly one mailbox.
fn single_mailbox(msg: &Message<'_>) -> Option<String> {
    let from = msg.from()?;
    let mut it = from.iter();
    let first = it.next()?;
    if it.next().is_some() {
        return None;
    }
    first.address().map(str::to_string)
}

/// The idempotency token of a publication: a redelivery of the same message (same K_auth, same
/// key) yields the same token. K_auth itself is never stored; only this hash of it.
pub fn publication_id(account: &Address, k_auth: &AuthKey, packets: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"kst-publication-v1\0");
    h.update(account.as_str().as_bytes());
    h.update([0]);
    h.update(k_auth.expose());
    h.update(packets);
    hex::encode(h.finalize())
}

#[path = "service_wks.rs"]
mod wks_submission;

#[cfg(test)]
#[path = "service_tests.rs"]
pub(crate) mod tests;
