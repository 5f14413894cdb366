//! `kst client retrieve --check-transparency` (feature `transparency`): once the reply's HMAC
//! verified, ask the domain's key directory (`/.well-known/kst/log/<domain>/lookup/<address>`)
//! for its signed head and proof, and check them against the domain's head key and the key
//! (or "no key") the KST served (`kst_core::transparency::answer`), then against the newest
//! head the client remembers for the domain ([`super::log_memory`]): the server adds the
//! append-only proof from that head (`?since=<epoch>`). A failure is a possible attack (exit
//! 5) and the key is not imported; a log that cannot be reached is temporary (exit 75).
//!
//! The head key: `--log-key` (which pins it), else the `_kst-log.<domain>` TXT record
//! (`v=kstlog1; head=<hex>; vrf=<hex>`, what `kst log keygen` prints), looked up through the
//! client's validating resolver (`--require-dnssec` applies) and pinned on first use. A key in
//! DNS that differs from the pinned one is exit 5 until the user pins again
//! (`kst client log-pin DOMAIN`).
//!
//! With `--witness NAME:HEX` (repeatable) the client asks for the witnesses' part of the
//! answer (`?witnessed=1`, `kst-log-answer-v2`) and requires that `--witness-threshold` of
//! them (default: all) cosigned a head the answer's head extends, no longer than
//! `--witness-max-age` seconds ago; otherwise exit 5.
//!
//! `kst client publish/retrieve/delete --transparency` (protocol version 3): the request
//! offers version 3 and names the epoch of the remembered head (`KST-Log-Since`) and, with
//! `--witness`, asks for the witnesses' part (`KST-Log-Witnessed: 1`); the KST puts the
//! directory's answer inside the reply under the HMAC, and [`check_reply_answer`] checks it
//! with the same checks as the HTTP answer ([`verify_and_remember`]: the same head key
//! rule, the memory, the witnesses), with no HTTP request. A reply in an older version or
//! without the answer is refused by `kst_core::client` (exit 5). Each check's requirements
//! are kept with the pending request, so `kst client check` applies them to a reply read
//! later (and runs `--check-transparency`'s HTTP check then).

use std::path::Path;
use std::time::Duration;

use kst_core::Address;
use kst_core::openpgp::dearmor_public_key;
use kst_core::protocol::LogAsk;
use kst_core::time::unix_now;
use kst_core::transparency::answer::{
    LogAnswer, MAX_ANSWER, MAX_ANSWER_WITH_AUDIT, MAX_SINCE_EPOCHS, MAX_WITNESSED_ANSWER, Served,
    hex32, parse_head,
};
use kst_core::transparency::history::{
    HistoryAnswer, HistoryPage, HistoryVersion, MAX_HISTORY_ANSWER, MAX_PAGES, MAX_VERSIONS,
};
use kst_core::transparency::witness::{
    MAX_HEAD_TEXT, WitnessPolicy, parse_head_with_cosignatures, parse_witness,
};
use kst_core::transparency::{DirectoryEntry, Head};

use super::commands::{LogPlan, Settings, dns_outcome};
use super::discovery::{DnsError, Secured};
use super::dnssec::DnsSecurity;
use super::exit;
pub use super::log_memory::check_and_remember;
use super::log_memory::{
    DomainMemory, Held, LogMemory, MemoryError, check_held, check_pin, source,
};
use super::output::Outcome;
use super::state::{Entry, LogRequirements, VerifiedLog, VerifiedState};
use super::tls::Conn;

mod presend;

/// Limit for the whole fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest key dearmored for the check.
const MAX_KEY_TEXT: usize = 4 << 20;

/// The flags of `retrieve` for the check.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogCheckArgs {
    /// After the reply verifies, check the key against the domain's key directory: the
    /// signed head (with --log-key) and the proof that the served key (or "no key") is the
    /// directory's latest entry for the address. A failure exits 5 and nothing is imported.
    #[arg(long)]
    pub check_transparency: bool,
    /// Where the domain's key directory is served (its `/.well-known/kst/log/`).
    /// [default: https://<domain>]
    #[arg(long, value_name = "URL", requires = "check_transparency")]
    pub log_url: Option<String>,
    /// Protocol version 3, the head key and the witnesses.
    #[command(flatten)]
    pub reply: ReplyProofArgs,
}

/// The flags of `publish`, `retrieve` and `delete` for protocol version 3, and the head key
/// and witnesses both checks use.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReplyProofArgs {
    /// Ask for protocol version 3: the KST's reply must carry the key directory's signed head
    /// and proof for the address, covered by its HMAC (no HTTP request), checked like
    /// --check-transparency's: against the head key, the newest head remembered for the
    /// domain (the request names its epoch, the reply proves the log only grew since) and the
    /// --witness witnesses. A reply in an older version or without the proof, or a proof that
    /// fails, is an attack (exit 5) and nothing is imported.
    #[arg(long)]
    pub transparency: bool,
    /// The domain's head key, 64 hex digits (`kst log keygen` prints it); pinned from now
    /// on. [default: the pinned key, else the `_kst-log.<domain>` TXT record, pinned on
    /// first use]
    #[arg(long, value_name = "HEX")]
    pub log_key: Option<String>,
    /// Require this witness's cosignature, NAME:HEX (HEX: its Ed25519 key, 64 hex digits);
    /// repeatable. The answer must carry a cosigned head that the answer's head extends.
    #[arg(long = "witness", value_name = "NAME:HEX")]
    pub witnesses: Vec<String>,
    /// How many of the --witness witnesses must have cosigned. [default: all]
    #[arg(long, value_name = "N")]
    pub witness_threshold: Option<usize>,
    /// The oldest cosignature accepted, in seconds: a log whose witnesses stopped cosigning
    /// longer ago is refused (exit 5).
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub witness_max_age: u64,
}

impl LogCheckArgs {
    /// The requirements of these flags, kept with a pending request (`since_head` and
    /// `verified_epoch` unset: [`plan`] sets them).
    pub fn requirements(&self) -> LogRequirements {
        LogRequirements {
            http: self.check_transparency,
            log_url: self.log_url.clone(),
            log_key: self.reply.log_key.clone(),
            witnesses: self.reply.witnesses.clone(),
            witness_threshold: self.reply.witness_threshold,
            witness_max_age: self.reply.witness_max_age,
            since_head: None,
            verified_epoch: None,
            verified_log: None,
            verified_state: None,
        }
    }

    /// The flags that `requirements` (kept with a pending request) stand for.
    pub fn from_requirements(r: &LogRequirements, transparency: bool) -> LogCheckArgs {
        LogCheckArgs {
            check_transparency: r.http,
            log_url: r.log_url.clone(),
            reply: ReplyProofArgs {
                transparency,
                log_key: r.log_key.clone(),
                witnesses: r.witnesses.clone(),
                witness_threshold: r.witness_threshold,
                witness_max_age: r.witness_max_age,
            },
        }
    }

    /// The witnesses required, or what is wrong with the flags.
    fn witness_policy(&self) -> Result<Option<WitnessPolicy>, String> {
        self.reply.witness_policy()
    }
}

impl ReplyProofArgs {
    /// The witnesses required, or what is wrong with the flags.
    fn witness_policy(&self) -> Result<Option<WitnessPolicy>, String> {
        if self.witnesses.is_empty() {
            return match self.witness_threshold {
                Some(_) => Err("--witness-threshold needs --witness".into()),
                None => Ok(None),
            };
        }
        let witnesses = self
            .witnesses
            .iter()
            .map(|w| parse_witness(w).map_err(|e| format!("--witness: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = self.witness_threshold.unwrap_or(witnesses.len());
        if threshold == 0 || threshold > witnesses.len() {
            return Err(format!(
                "--witness-threshold: want 1 to {} (the number of --witness)",
                witnesses.len()
            ));
        }
        Ok(Some(WitnessPolicy {
            witnesses,
            threshold,
            not_before: unix_now().saturating_sub(self.witness_max_age),
        }))
    }

    /// Checks the flags: `--log-key` and `--witness` go with `--transparency` or, for
    /// retrieve, `--check-transparency` (`http_check`); otherwise they would be a silently
    /// skipped check.
    pub fn validate(&self, http_check: bool) -> Result<(), String> {
        if let Some(key) = &self.log_key {
            hex32(key).map_err(|_| "--log-key: want 64 hex digits".to_string())?;
        }
        self.witness_policy()?;
        if !self.transparency && !http_check {
            if self.log_key.is_some() {
                return Err("--log-key goes with --transparency (the proof inside the reply) or, for retrieve, --check-transparency".into());
            }
            if !self.witnesses.is_empty() {
                return Err("--witness goes with --transparency (the proof inside the reply) or, for retrieve, --check-transparency".into());
            }
        }
        Ok(())
    }
}

/// Protocol version 3 for a request about `domain` (`--transparency`): the head key the
/// reply's answer must be signed by (`--log-key`, else the pin, else DNS, pinned on first
/// use: [`head_key`]), what the request asks of the answer (the remembered epoch, the
/// witnesses) and what the reply's check needs later. Without `--transparency`, only the
/// HTTP check's requirements (`retrieve --check-transparency`), for which the directory's
/// current head is first fetched and verified ([`presend::verify_head`]; one that cannot be
/// fetched is told on standard error, one that fails verification is an attack and nothing
/// is sent). Both keep the epoch of the head remembered for the domain then, before the
/// request is sent ([`LogRequirements::verified_epoch`]: the two-step check compares epochs
/// with it).
pub async fn plan(
    s: &Settings,
    check: &LogCheckArgs,
    address: &Address,
) -> Result<LogPlan, Outcome> {
    let domain = address.domain();
    let args = &check.reply;
    args.validate(check.check_transparency)
        .map_err(|e| Outcome::error(exit::USAGE, e))?;
    let mut log = check.requirements();
    if !args.transparency && !log.http {
        return Ok(LogPlan::default());
    }
    let memory = LogMemory::beside(s.state.path());
    let mut held = memory
        .hold(domain)
        .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
    let mut state = None;
    if log.http {
        state = verify_before_sending(s, check, address, &memory, &mut held).await?;
    }
    let verified = held.memory.verified();
    log.verified_epoch = verified.as_ref().map(|(e, _)| *e);
    log.verified_log = verified.map(|(_, l)| l);
    log.verified_state = state.filter(|st| Some(st.epoch) == log.verified_epoch);
    if !args.transparency {
        return Ok(LogPlan {
            log: Some(log),
            ..LogPlan::default()
        });
    }
    let key = head_key(
        s,
        args.log_key.as_deref(),
        check.log_url.as_deref(),
        &memory,
        &mut held,
    )
    .await?;
    let since = held.memory.remembered_head().filter(|h| h.head.epoch > 0);
    log.since_head = since.as_ref().and_then(|_| held.memory.head.clone());
    Ok(LogPlan {
        head_key: Some(hex::encode(key)),
        ask: LogAsk {
            since: since.map(|h| h.head.epoch),
            witnessed: !args.witnesses.is_empty(),
        },
        log: Some(log),
    })
}

/// `status --check-transparency`: the head of `address`'s domain verified before the request
/// is sent ([`presend::verify_head`]): its epoch and directory (none verified yet: no
/// epoch). A memory that cannot be read is a local problem (exit 78), a head that fails
/// verification an attack (exit 5).
pub async fn verified_epoch_before_sending(
    s: &Settings,
    check: &LogCheckArgs,
    address: &Address,
) -> Result<VerifiedBefore, Outcome> {
    let memory = LogMemory::beside(s.state.path());
    let mut held = memory
        .hold(address.domain())
        .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
    let state = verify_before_sending(s, check, address, &memory, &mut held).await?;
    let verified = held.memory.verified();
    let epoch = verified.as_ref().map(|(e, _)| *e);
    Ok(VerifiedBefore {
        epoch,
        log: verified.map(|(_, l)| l),
        state: state.filter(|st| Some(st.epoch) == epoch),
    })
}

/// The head the client had verified when it sent a request: its epoch
/// ([`LogRequirements::verified_epoch`]) and the directory it is of
/// ([`LogRequirements::verified_log`]). The two-step check compares epochs with it only
/// while the memory still follows that directory ([`VerifiedBefore::epoch_in`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifiedBefore {
    /// The epoch (`None`: none verified then).
    pub epoch: Option<u64>,
    /// The directory (`None`: not known, a request written by an older kst).
    pub log: Option<VerifiedLog>,
    /// The key the directory proved for the address then
    /// ([`LogRequirements::verified_state`]).
    pub state: Option<VerifiedState>,
}

impl VerifiedBefore {
    /// What a pending request kept.
    pub fn of(r: &LogRequirements) -> VerifiedBefore {
        VerifiedBefore {
            epoch: r.verified_epoch,
            log: r.verified_log.clone(),
            state: r.verified_state.clone(),
        }
    }

    /// The epoch, when it is one of the directory `memory` follows now
    /// ([`super::log_memory::DomainMemory::same_log`]); else why it cannot be used, the end
    /// of a sentence starting "the client ...": epochs of another directory (one re-pinned or
    /// started again since the request: its epochs count from the start again) say nothing
    /// about this one's.
    pub fn epoch_in(&self, memory: &super::log_memory::DomainMemory) -> Result<u64, String> {
        match (self.epoch, &self.log) {
            (None, _) => {
                Err("had verified no epoch of the directory when it sent the request".into())
            }
            (Some(e), None) => Err(format!(
                "kept no record of which directory its verified epoch {e} was of (a request \
                 written by an older kst)"
            )),
            (Some(e), Some(log)) if memory.same_log(e, log) => Ok(e),
            (Some(e), Some(log)) => Err(format!(
                "had verified epoch {e} of another directory than the one it follows now (head \
                 key {}, root {} then: the directory was re-keyed or started again, or the \
                 client re-pinned it, since the request was sent; or the client no longer \
                 holds that epoch's root and the request, made by an older kst, did not keep \
                 where the client's history had started)",
                log.head_key, log.root
            )),
        }
    }
}

/// [`presend::verify_head`], its note (a head that could not be verified; the request is
/// sent anyway) told on standard error; the key the verified answer proved, if any.
async fn verify_before_sending(
    s: &Settings,
    check: &LogCheckArgs,
    address: &Address,
    memory: &LogMemory,
    held: &mut Held,
) -> Result<Option<VerifiedState>, Outcome> {
    match presend::verify_head(s, check, address, memory, held).await? {
        presend::Presend::Verified(state) => Ok(state),
        presend::Presend::NotVerified(note) => {
            super::output::err(format!("kst: {note}"));
            Ok(None)
        }
    }
}

/// Version 3: checks the key directory's answer a verified reply to `entry` carried (`answer`,
/// the text the HMAC covers the hash of) as [`check`] checks the HTTP answer
/// ([`verify_and_remember`]): against the head key the request was made with, what the reply
/// served (the key of a `found` or `published`, "no key" for `not-found` and `deleted`), the
/// head remembered for the domain (from the one the request named) and the witnesses the
/// request required; then the new head is remembered. Any failure is an attack (exit 5, the
/// evidence kept); other outcomes (a refusal, an attack already) are returned as they are.
pub async fn check_reply_answer(
    s: &Settings,
    entry: &Entry,
    answer: Option<&str>,
    reply: &ReplyRef,
    outcome: Outcome,
) -> Outcome {
    let pending = &entry.pending;
    let Some(key_hex) = &pending.head_key else {
        return outcome;
    };
    let (address, served, fingerprint) = match &outcome {
        Outcome::Found {
            address,
            key,
            fingerprint,
            ..
        }
        | Outcome::Published {
            account: address,
            key,
            fingerprint,
            ..
        } => match dearmor_public_key(key, MAX_KEY_TEXT) {
            Ok(bytes) => (address.clone(), Some(bytes), Some(fingerprint.clone())),
            Err(e) => return Outcome::error(exit::SOFTWARE, format!("the served key: {e}")),
        },
        Outcome::NotFound { address, .. } | Outcome::Deleted { address, .. } => {
            (address.clone(), None, None)
        }
        _ => return outcome,
    };
    let about = reply.evidence(fingerprint.as_deref());
    let attack = |error: String| Outcome::Attack {
        service: pending.service.to_string(),
        message_id: pending.message_id.clone(),
        error,
    };
    let Ok(head_key) = hex32(key_hex) else {
        return Outcome::error(
            exit::SOFTWARE,
            "the pending request's head key is not 64 hex digits",
        );
    };
    let Ok(address) = kst_core::AddressPolicy::default().normalize(&address) else {
        return Outcome::error(exit::SOFTWARE, format!("{address:?} is not an address"));
    };
    let Some(text) = answer else {
        return attack(
            "the reply carries no key directory answer (KST protocol 3 was asked for): stripped on the way (possible attack)".into(),
        );
    };
    // A request made before the memory was used in version 3 asks nothing more.
    let required = entry.log.clone().unwrap_or_default();
    let policy = match LogCheckArgs::from_requirements(&required, true).witness_policy() {
        Ok(p) => p,
        Err(e) => return Outcome::error(exit::USAGE, e),
    };
    let asked = match required.since_head.as_deref().map(parse_head) {
        None => None,
        Some(Ok(h)) => Some(h.head),
        Some(Err(e)) => {
            return Outcome::error(
                exit::CONFIG,
                format!("the pending request's remembered head does not parse: {e}"),
            );
        }
    };
    let memory = LogMemory::beside(s.state.path());
    let mut held = match memory.hold(address.domain()) {
        Ok(h) => h,
        Err(e) => return memory_outcome(e, &attack),
    };
    let base = log_base(&LogCheckArgs::from_requirements(&required, true), &address);
    let checked = Checked {
        head_key: &head_key,
        address: &address,
        served: served.as_deref(),
        policy: policy.as_ref(),
        asked: asked.as_ref(),
        source: "the reply's key directory answer",
        log_base: &base,
        ca_file: s.ca_file(),
        read_apart: false,
        about: &about,
    };
    match verify_and_remember(&memory, &mut held, text, &checked).await {
        Ok(Accepted::Remembered) => outcome,
        Ok(Accepted::Restarted { note }) => {
            super::output::err(format!("kst: {note}"));
            outcome
        }
        // The reply carried the first steps of the proof from the remembered head (all a
        // reply holds): verified and remembered; the next request continues from there.
        Ok(Accepted::Step { from, to, latest }) => Outcome::error(
            exit::TEMPFAIL,
            format!(
                "key directory of {}: the reply's head (epoch {latest}) is far ahead of the \
                 remembered one (epoch {from}); the reply carried a verified append-only step \
                 to epoch {to}, now remembered; send the request again to continue (or \
                 retrieve --check-transparency catches up over HTTP)",
                address.domain()
            ),
        ),
        // Not asked for (the proof came with the reply itself).
        Ok(Accepted::Differs { .. }) => Outcome::error(
            exit::SOFTWARE,
            "a version 3 answer was checked as one read apart from its reply",
        ),
        Err(o) => o.with_attack(&attack),
    }
}

/// The most append-only steps one `--check-transparency` check follows (each verified and
/// remembered; a run that stops there is continued by the next).
pub const MAX_CATCH_UP_STEPS: usize = 64;

/// What [`verify_and_remember`] checks an answer against.
struct Checked<'a> {
    /// The domain's head key.
    head_key: &'a [u8; 32],
    /// The address the answer is about.
    address: &'a Address,
    /// What the KST served: a key's packets, or `None` for "no key".
    served: Option<&'a [u8]>,
    /// The witnesses required, if any.
    policy: Option<&'a WitnessPolicy>,
    /// Version 3: the head the request named (`KST-Log-Since`).
    asked: Option<&'a Head>,
    /// Where the answer came from, for messages ("the reply's", "the key directory's").
    source: &'a str,
    /// Where the domain's directory is served (`--log-url`, else `https://<domain>`): a
    /// new start after a `too-far` answer asks it for the remembered epoch's head
    /// ([`remembered_head_cosigned`]).
    log_base: &'a str,
    /// The extra CA file of `--ca-file`, for that request.
    ca_file: Option<&'a Path>,
    /// Versions 1 and 2 (`--check-transparency`): the key was read by mail at another moment
    /// than the answer, so an answer that verifies but proves another state of the address
    /// is [`Accepted::Differs`] (the caller asks again, then decides: [`super::log_race`]),
    /// not an attack at once.
    read_apart: bool,
    /// What the answer is checked for ([`ReplyRef::evidence`]: the reply and the key it
    /// served), put before it in the evidence of a failure; empty before sending.
    about: &'a str,
}

/// What ties the evidence of a failed check to the reply it is about (review F6), so that an
/// owner or an auditor can find that reply (by its Message-ID, or the request's, which the
/// reply names in `In-Reply-To`) and tie the evidence to the key it served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyRef {
    /// The request's Message-ID (without `<>`).
    pub request_id: String,
    /// The reply's own Message-ID (without `<>`; `None`: the reply has none that is
    /// readable).
    pub reply_id: Option<String>,
}

impl ReplyRef {
    /// The lines the evidence's `-- seen --` part starts with: the reply's and the request's
    /// Message-IDs and what the reply served (`served`: the key's fingerprint, `None` for
    /// "no key"), then `-- answer --` (the directory's answer follows).
    pub fn evidence(&self, served: Option<&str>) -> String {
        let reply = match &self.reply_id {
            Some(id) => format!("<{id}>"),
            None => "unknown to this check (the reply names the request's Message-ID in \
                     In-Reply-To)"
                .into(),
        };
        let served = match served {
            Some(fingerprint) => format!("key {fingerprint}"),
            None => "no key".into(),
        };
        format!(
            "-- reply --\nrequest Message-ID <{}>\nreply Message-ID {reply}\nserved {served}\n\
             -- answer --\n",
            self.request_id
        )
    }
}

/// Why [`verify_and_remember`] refused an answer.
enum Refused {
    /// An attack, with what failed (the evidence is kept already).
    Attack(String),
    /// Not an attack: the outcome to report.
    Other(Box<Outcome>),
}

impl Refused {
    fn with_attack(self, attack: &dyn Fn(String) -> Outcome) -> Outcome {
        match self {
            Refused::Attack(m) => attack(m),
            Refused::Other(o) => *o,
        }
    }
}

/// Everything a client checks of a key directory answer `text` (the HTTP answer of
/// `--check-transparency`, or the one inside a version 3 reply), in one place: the head's
/// signature and domain, the proof and that the entry commits to what was served, the
/// witnesses required, and against the head remembered in `held` (never older, the same root
/// for the same epoch, an append-only proof for a newer one, from the head the request named
/// when another answer moved the memory meanwhile); only then is the new head remembered.
/// Every failure keeps its evidence.
async fn verify_and_remember(
    memory: &LogMemory,
    held: &mut Held,
    text: &str,
    c: &Checked<'_>,
) -> Result<Accepted, Refused> {
    // The evidence of a failure: what the answer was about (the reply, review F6), then it.
    let seen = format!("{}{text}", c.about);
    let answer = LogAnswer::parse(text)
        .map_err(|e| attack_kept(memory, held, format!("{}: {e}", c.source), &seen))?;
    let epoch = answer.head.head.epoch;
    let served = match c.served {
        Some(bytes) => Served::Key(bytes),
        None => Served::Nothing,
    };
    // Versions 1 and 2: an answer that proves another state than the one served, and
    // verifies otherwise, goes through every other check (its head is a verified head of the
    // directory, remembered as any other) and is then reported as `Differs`.
    let mut differs = None;
    if let Err(e) = answer.verify(c.head_key, c.address, served).await {
        let message = format!(
            "{} does not confirm the reply (epoch {epoch}): {e}",
            c.source
        );
        if c.read_apart
            && let Ok(proven) = answer.proven_at(c.head_key, c.address).await
        {
            differs = Some((message, proven));
        } else {
            return Err(attack_kept(memory, held, message, &seen));
        }
    }
    let finish = |accepted: Accepted| match &differs {
        None => accepted,
        Some((why, newest)) => Accepted::Differs {
            why: why.clone(),
            epoch,
            newest: newest.clone(),
            note: match accepted {
                Accepted::Restarted { note } => Some(note),
                _ => None,
            },
        },
    };
    // The witnesses that cosigned a head the answer's head extends (with `--witness`).
    let mut confirmed = Vec::new();
    if let Some(policy) = c.policy {
        let Some(witnessed) = &answer.witnessed else {
            return Err(attack_kept(
                memory,
                held,
                format!(
                    "{} (epoch {epoch}) carries no witness cosignatures",
                    c.source
                ),
                &seen,
            ));
        };
        match witnessed.verify(&answer.head, c.head_key, policy).await {
            Ok(names) => confirmed = names,
            Err(e) => {
                return Err(attack_kept(
                    memory,
                    held,
                    format!(
                        "the key directory's head (epoch {epoch}) is not witnessed as required: \
                         {e}"
                    ),
                    &seen,
                ));
            }
        }
    }
    let remembered = held.memory.remembered_head().map(|h| h.head);
    // A step of a catch-up: the proof from the remembered head reaches an older head than
    // the answer's. The step is verified and its head remembered; the answer itself is not
    // accepted yet (the caller asks again from the step's head).
    if let Some(step) = answer.append_only.as_ref().and_then(|a| a.step.as_ref()) {
        let to = step.head.epoch;
        let from = answer.append_only.as_ref().map_or(0, |a| a.from);
        // A reply to a request that named an older head than the one remembered now (another
        // reply moved the memory while it was pending): its step starts where the request
        // asked, not where the memory is. Nothing to take from it; send again.
        if let Some(asked) = c.asked
            && from == asked.epoch
            && remembered
                .as_ref()
                .is_none_or(|old| old.epoch != asked.epoch)
        {
            return Err(Refused::Other(Box::new(Outcome::error(
                exit::TEMPFAIL,
                format!(
                    "key directory of {}: the reply carries an append-only step from epoch \
                     {from}, which the request named, but the remembered head moved meanwhile; \
                     send the request again",
                    held.domain
                ),
            ))));
        }
        let Some(old) = &remembered else {
            return Err(attack_kept(
                memory,
                held,
                format!(
                    "{} carries an append-only step (to epoch {to}) but no head is remembered",
                    c.source
                ),
                &seen,
            ));
        };
        return match answer.verify_step(c.head_key, old).await {
            Ok(Some((head, roots))) => {
                held.memory.keep_roots(roots);
                held.memory
                    .remember(&head)
                    .and_then(|()| memory.save(held).map_err(|e| e.to_string()))
                    .map_err(|e| Refused::Other(Box::new(Outcome::error(exit::CONFIG, e))))?;
                Ok(Accepted::Step {
                    from: old.epoch,
                    to,
                    latest: epoch,
                })
            }
            Ok(None) => Err(Refused::Other(Box::new(Outcome::error(
                exit::SOFTWARE,
                "an append-only step vanished",
            )))),
            Err(e) => Err(attack_kept(
                memory,
                held,
                format!(
                    "possible fork or rollback of the key directory of {}: {e}",
                    held.domain
                ),
                &seen,
            )),
        };
    }
    // A `too-far` reply to a version 3 request that named an older head than the one
    // remembered now (another reply moved the memory while it was pending): it says nothing
    // about the remembered head, and is no attack either. Nothing to take from it; send
    // the request again (it then names the remembered head).
    if answer.append_only.is_none()
        && let (Some(asked), Some(from)) = (c.asked, answer.too_far)
        && from == asked.epoch
        && remembered
            .as_ref()
            .is_some_and(|old| old.epoch != asked.epoch && epoch > old.epoch)
    {
        return Err(Refused::Other(Box::new(Outcome::error(
            exit::TEMPFAIL,
            format!(
                "key directory of {}: the reply says epoch {from}, which the request named, is \
                 too far behind for a proof, but the remembered head moved meanwhile; send the \
                 request again",
                held.domain
            ),
        ))));
    }
    // Too far behind for any proof: the KST says so (`too-far`: not even the first step
    // fits its budget), or an older KST left the proof out beyond MAX_SINCE_EPOCHS. With
    // witnesses required (and verified above), the answer's witnessed head is the new start;
    // without, nothing is remembered and the user is told.
    if answer.append_only.is_none()
        && let Some(old) = &remembered
        && epoch > old.epoch
        && (answer.too_far == Some(old.epoch) || epoch.saturating_sub(old.epoch) > MAX_SINCE_EPOCHS)
    {
        let Some(policy) = c.policy else {
            return Err(Refused::Other(Box::new(Outcome::error(
                exit::UNAVAILABLE,
                format!(
                    "key directory of {}: the remembered head (epoch {}) is too far behind the \
                     answer's (epoch {epoch}) for an append-only proof the KST will build \
                     (a version 3 reply carries at most 1 MiB of it: retrieve \
                     --check-transparency catches up over HTTP in larger steps); with \
                     --witness the client starts again from the newest head the witnesses \
                     cosigned, else kst client log-pin {} forgets the remembered head",
                    held.domain, old.epoch, held.domain
                ),
            ))));
        };
        // The new start is of the pinned directory: the checks of `check_held` against the
        // pin, which this path would otherwise skip (a `too-far` answer never moves the
        // client to a directory with another VRF key, whatever its witnesses cosigned).
        check_pin(memory, held, &answer, &|| seen.clone()).map_err(refused)?;
        // The remembered head's epoch inside the witnessed heads of the answer: there the
        // witnessed history has a root for it, and that root decides. Another root is a fork
        // the client was shown (a `too-far` must not bury it); the same root proves the
        // answer extends the remembered head, so it is remembered as usual, no new start.
        if let Some(w) = &answer.witnessed
            && let Some(first) = w.audit.heads.first()
            && let Some(there) = old
                .epoch
                .checked_sub(first.head.epoch)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| w.audit.heads.get(i))
        {
            if there.head.root_hash != old.root_hash {
                return Err(attack_kept(
                    memory,
                    held,
                    format!(
                        "possible fork of the key directory of {}: the remembered head of epoch \
                         {} has the root {}, the witnessed history of the answer (a `too-far` \
                         answer, epoch {epoch}) has the root {} at that epoch",
                        held.domain,
                        old.epoch,
                        hex::encode(old.root_hash),
                        hex::encode(there.head.root_hash)
                    ),
                    &seen,
                ));
            }
            held.memory.keep_roots(
                w.audit
                    .heads
                    .iter()
                    .filter(|h| h.head.epoch > old.epoch)
                    .map(|h| (h.head.epoch, h.head.root_hash)),
            );
            held.memory
                .remember(&answer.head)
                .and_then(|()| memory.save(held).map_err(|e| e.to_string()))
                .map_err(|e| Refused::Other(Box::new(Outcome::error(exit::CONFIG, e))))?;
            return Ok(finish(Accepted::Remembered));
        }
        // Nothing in the answer ties the remembered head to the witnessed history: the
        // witnesses must have cosigned the remembered head themselves (each honest witness
        // cosigns one linear history, so its later cosigned head extends it).
        let tied =
            remembered_head_cosigned(memory, held, old, &answer, &seen, c, policy, &confirmed)
                .await?;
        let note = format!(
            "key directory of {}: the remembered head (epoch {}) is too far behind the answer's \
             (epoch {epoch}) for an append-only proof; started again from the answer's head, \
             which {} of the required witnesses ({}) cosigned (or reach by a verified proof) \
             after cosigning the remembered head themselves: the history between the two is \
             the witnesses' word, not checked by this client",
            held.domain,
            old.epoch,
            policy.threshold,
            tied.join(", ")
        );
        let evidence = memory
            .keep_evidence(
                &held.domain,
                &format!(
                    "kst key directory restart\ndomain {}\ntime {}\nnote {note}\n\n-- \
                     remembered --\n{}\n-- seen --\n{text}\n",
                    held.domain,
                    unix_now(),
                    serde_json::to_string_pretty(&held.memory).unwrap_or_default()
                ),
            )
            .map_err(|e| Refused::Other(Box::new(Outcome::error(exit::CONFIG, e.to_string()))))?;
        held.memory
            .restart(&answer.head)
            .and_then(|()| memory.save(held).map_err(|e| e.to_string()))
            .map_err(|e| Refused::Other(Box::new(Outcome::error(exit::CONFIG, e))))?;
        return Ok(finish(Accepted::Restarted {
            note: format!("{note} (evidence kept in {})", evidence.display()),
        }));
    }
    // Version 3: the answer lacks the append-only part the request asked for (`KST-Log-Since`)
    // although its head is newer: the KST left it out (every turn of its append-only work
    // was taken, or the part was too large for a reply: docs/PROTOCOL.md, "Versions"). No
    // proof of an attack (nothing in it contradicts the remembered head) and no answer
    // either: the new head cannot be tied to the remembered one, so nothing is remembered and
    // the reply is not taken as verified (exit 75: send again, or catch up over HTTP): a
    // retrieved key is not imported; a publication or deletion it confirms was made all the
    // same, only its proof is missing (review F6).
    if answer.append_only.is_none()
        && answer.too_far.is_none()
        && let Some(asked) = c.asked
        && let Some(old) = &remembered
        && epoch > old.epoch
        && epoch > asked.epoch
    {
        return Err(Refused::Other(Box::new(Outcome::error(
            exit::TEMPFAIL,
            format!(
                "key directory of {}: the reply's answer (epoch {epoch}) left out the \
                 append-only proof from epoch {}, which the request asked for (the KST was busy \
                 with other such proofs, or the proof was too large for a reply); nothing is \
                 remembered and the reply is not taken as verified (a retrieved key is not \
                 imported; a publication or deletion it confirms was made, only its proof is \
                 missing): send the request again later, or retrieve --check-transparency \
                 catches up over HTTP",
                held.domain, asked.epoch
            ),
        ))));
    }
    // Everything verified: only now is the new head remembered (a head refused for any
    // reason is never remembered).
    check_held(memory, held, &answer, Some(&seen), c.asked)
        .await
        .and_then(|_| memory.save(held))
        .map(|()| finish(Accepted::Remembered))
        .map_err(refused)
}

/// Red team round 3 (issue 18): before a new start after a `too-far` answer, the head the
/// client remembers (`old`, epoch E) must be one the required witnesses cosigned, so that
/// the answer's witnessed head is tied to it: `GET <log_base>/.well-known/kst/log/<domain>/head/<E>`
/// must return a head signed with the head key whose root is the remembered one (another
/// root for E is a fork: an attack, exit 5, the evidence kept), cosigned by at least
/// `policy.threshold` of the required witnesses that also cosigned the answer's history at
/// epoch E or later (`confirmed`, from [`Witnessed::verify`]). Too few is exit 69 (the
/// client cannot tie its memory to the witnessed history: the user re-pins with `kst client
/// log-pin`); a server that cannot be asked now is exit 75. The age limit of
/// `--witness-max-age` does not apply to these cosignatures (the remembered head is old by
/// nature). Returns the names of the witnesses that tie the two.
///
/// [`Witnessed::verify`]: kst_core::transparency::witness::Witnessed::verify
#[allow(clippy::too_many_arguments)]
async fn remembered_head_cosigned(
    memory: &LogMemory,
    held: &Held,
    old: &Head,
    answer: &LogAnswer,
    text: &str,
    c: &Checked<'_>,
    policy: &WitnessPolicy,
    confirmed: &[String],
) -> Result<Vec<String>, Refused> {
    let domain = &held.domain;
    let epoch = old.epoch;
    let path = format!("/.well-known/kst/log/{domain}/head/{epoch}");
    let url = format!("{}{path}", c.log_base);
    let re_pin = format!(
        "the client does not start again from a head it cannot tie to the remembered one; if \
         you trust the keys {domain} publishes, kst client log-pin {domain} starts afresh \
         (forgetting the remembered head)"
    );
    let unavailable = |why: String| {
        Refused::Other(Box::new(Outcome::error(
            exit::UNAVAILABLE,
            format!(
                "key directory of {domain}: the remembered head (epoch {epoch}) is too far \
                 behind the answer's (epoch {}) for an append-only proof, and {why}; {re_pin}",
                answer.head.head.epoch
            ),
        )))
    };
    let fetched = match fetch_or_missing(c.log_base, &path, c.ca_file, MAX_HEAD_TEXT).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(unavailable(format!(
                "{url} has no head for that epoch (404)"
            )));
        }
        Err(Outcome::Error { error, exit: code }) if code == exit::TEMPFAIL => {
            return Err(Refused::Other(Box::new(Outcome::error(
                exit::TEMPFAIL,
                format!(
                    "key directory of {domain}: the remembered head (epoch {epoch}) is too far \
                     behind for an append-only proof, and its cosigned head cannot be read now \
                     to start again ({error}); try again later"
                ),
            ))));
        }
        Err(o) => return Err(Refused::Other(Box::new(o))),
    };
    let (head, cosignatures) = parse_head_with_cosignatures(&fetched)
        .map_err(|e| unavailable(format!("{url} is unreadable ({e})")))?;
    let seen = format!("-- the answer --\n{text}\n-- {url} --\n{fetched}");
    if let Err(e) = head.verify(c.head_key) {
        return Err(attack_kept(
            memory,
            held,
            format!("{url}: {e} (not a head of the pinned directory)"),
            &seen,
        ));
    }
    if head.head.domain != *domain
        || head.head.epoch != epoch
        || head.head.vrf_public_key != old.vrf_public_key
    {
        return Err(attack_kept(
            memory,
            held,
            format!(
                "{url} answered the head of {} epoch {} (VRF key {}), not the remembered \
                 directory's head of epoch {epoch}",
                head.head.domain,
                head.head.epoch,
                hex::encode(head.head.vrf_public_key)
            ),
            &seen,
        ));
    }
    if head.head.root_hash != old.root_hash {
        return Err(attack_kept(
            memory,
            held,
            format!(
                "possible fork of the key directory of {domain}: the remembered head of epoch \
                 {epoch} has the root {}, the head {url} serves for that epoch (both signed \
                 with the head key) has the root {}",
                hex::encode(old.root_hash),
                hex::encode(head.head.root_hash)
            ),
            &seen,
        ));
    }
    // The witnesses that cosigned both the remembered head and (at E or later) the answer's
    // history; a witness listed twice counts once.
    let cosigned_in_answer = |key: &[u8; 32]| {
        answer.witnessed.as_ref().is_some_and(|w| {
            w.cosignatures
                .iter()
                .any(|(e, c)| &c.witness == key && *e >= epoch)
        })
    };
    let mut tied: Vec<String> = Vec::new();
    let mut tied_keys: Vec<&[u8; 32]> = Vec::new();
    let mut problems = Vec::new();
    for (name, key) in &policy.witnesses {
        if tied_keys.contains(&key) {
            continue;
        }
        if !confirmed.contains(name) || !cosigned_in_answer(key) {
            problems.push(format!("{name} did not cosign the answer's history"));
            continue;
        }
        match cosignatures.iter().find(|c| &c.witness == key) {
            None => problems.push(format!("{name} did not cosign it")),
            Some(cs) => match cs.verify(&head) {
                Ok(()) => {
                    tied.push(name.clone());
                    tied_keys.push(key);
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            },
        }
    }
    if tied.len() < policy.threshold.max(1) {
        return Err(unavailable(format!(
            "{} of the required {} witness(es) cosigned that remembered head ({})",
            tied.len(),
            policy.threshold.max(1),
            problems.join("; ")
        )));
    }
    Ok(tied)
}

/// A failed check of the memory as [`verify_and_remember`] reports it.
fn refused(e: MemoryError) -> Refused {
    match e {
        e @ MemoryError::Attack { .. } => Refused::Attack(e.to_string()),
        e @ MemoryError::Io { .. } => {
            Refused::Other(Box::new(Outcome::error(exit::CONFIG, e.to_string())))
        }
    }
}

/// What [`verify_and_remember`] accepted.
#[derive(Debug)]
enum Accepted {
    /// The answer: its head is remembered (or an older head of the remembered history).
    Remembered,
    /// A step of a catch-up, verified: the head of `to` is remembered; the answer (at
    /// `latest`) is not accepted yet, ask again from `to`.
    Step { from: u64, to: u64, latest: u64 },
    /// The answer, its head the new start of the memory (too far behind, witnessed): what
    /// to tell the user.
    Restarted { note: String },
    /// Versions 1 and 2 ([`Checked::read_apart`]): the answer (at `epoch`) passed every
    /// check, its head is remembered, but it proves another state of the address than the
    /// one served (`why`); `note`: what a new start of the memory tells the user.
    Differs {
        why: String,
        epoch: u64,
        /// The address's newest version and the epoch at which the directory recorded it,
        /// as the answer's proof shows them (`None`: the answer proves the address never
        /// held).
        newest: Option<(DirectoryEntry, u64)>,
        note: Option<String>,
    },
}

/// An attack on `held`'s domain with its evidence kept.
fn attack_kept(memory: &LogMemory, held: &Held, message: String, seen: &str) -> Refused {
    Refused::Attack(memory.attack(held, message, seen).to_string())
}

/// Checks a retrieval's outcome against the key directory; `Found` and `NotFound` are
/// checked, every other outcome is returned as it is. `verified_epoch`: the newest epoch of
/// the domain's directory the client had verified when the request was made
/// ([`LogRequirements::verified_epoch`]): an answer that proves another state than the reply
/// served, because the address changed while the reply was on its way, is asked for again,
/// then decided by the directory's history ([`super::log_race`]): a change recorded after
/// `verified_epoch` is a temporary failure (exit 75), anything else an attack (exit 5); a
/// history that cannot be read is exit 75 with the mismatch kept as evidence.
pub async fn check(
    s: &Settings,
    args: &LogCheckArgs,
    outcome: Outcome,
    verified: &VerifiedBefore,
    reply: &ReplyRef,
) -> Outcome {
    let (address, service, message_id, served, fingerprint) = match &outcome {
        Outcome::Found {
            address,
            service,
            message_id,
            key,
            fingerprint,
            ..
        } => match dearmor_public_key(key, MAX_KEY_TEXT) {
            Ok(bytes) => (
                address,
                service,
                message_id.clone(),
                Some(bytes),
                Some(fingerprint.as_str()),
            ),
            Err(e) => return Outcome::error(exit::SOFTWARE, format!("the served key: {e}")),
        },
        Outcome::NotFound {
            address, service, ..
        } => (address, service, reply.request_id.clone(), None, None),
        _ => return outcome,
    };
    let about = reply.evidence(fingerprint);
    let attack = |error: String| Outcome::Attack {
        service: service.clone(),
        message_id: message_id.clone(),
        error,
    };
    let policy = match args.witness_policy() {
        Ok(p) => p,
        Err(e) => return Outcome::error(exit::USAGE, e),
    };
    let Ok(address) = kst_core::AddressPolicy::default().normalize(address) else {
        return Outcome::error(exit::SOFTWARE, format!("{address:?} is not an address"));
    };
    let memory = LogMemory::beside(s.state.path());
    let mut held = match memory.hold(address.domain()) {
        Ok(h) => h,
        Err(e) => return memory_outcome(e, &attack),
    };
    let head_key = match head_key(
        s,
        args.reply.log_key.as_deref(),
        args.log_url.as_deref(),
        &memory,
        &mut held,
    )
    .await
    {
        Ok(k) => k,
        Err(o) => return o,
    };
    let base = log_base(args, &address);
    let source = format!("the key directory answer from {base}");
    let checked = Checked {
        head_key: &head_key,
        address: &address,
        served: served.as_deref(),
        policy: policy.as_ref(),
        asked: None,
        source: &source,
        log_base: &base,
        ca_file: s.ca_file(),
        read_apart: true,
        about: &about,
    };
    // A client far behind catches up in steps (`steps=1`): each answer carries the proof
    // from the remembered head, or its first steps within the server's budget; each step is
    // verified, then remembered, then the next asked for.
    let mut steps = 0;
    // A KST from before steps answers `steps=1` with 400: then without it (the whole proof).
    let mut ask_steps = true;
    // An answer proving another state than the reply's: asked again (`ASK_AGAIN_MS`), then
    // decided by the history, which may need a newer answer first (`MAX_NEWER_ANSWERS`).
    let mut asked_again = 0;
    let mut newer_answers = 0;
    // The history read (`log_race::read`), kept while a newer answer ties its heads
    // (`Decision::AskAgain`): judged again, not read again (review R6: on a busy domain a
    // history read again is one epoch ahead again), and kept as evidence if the newer answer
    // does not reach it.
    let mut history: Option<super::log_race::Read> = None;
    loop {
        let since = held.memory.remembered_epoch().filter(|e| *e > 0);
        let (path, limit) = lookup_path(&address, since, ask_steps, policy.is_some());
        let text = match fetch_answer(&base, &path, s.ca_file(), limit).await {
            Ok(t) => t,
            Err(u)
                if ask_steps
                    && since.is_some()
                    && u.status == Some(hyper::StatusCode::BAD_REQUEST) =>
            {
                ask_steps = false;
                continue;
            }
            Err(u) => return u.outcome,
        };
        match verify_and_remember(&memory, &mut held, &text, &checked).await {
            Ok(Accepted::Remembered) => return outcome,
            Ok(Accepted::Restarted { note }) => {
                super::output::err(format!("kst: {note}"));
                return outcome;
            }
            Ok(Accepted::Step { from, to, latest }) => {
                steps += 1;
                tracing::info!(domain = %address.domain(), from, to, latest, "key directory: an append-only step verified and remembered");
                if steps >= MAX_CATCH_UP_STEPS {
                    return Outcome::error(
                        exit::TEMPFAIL,
                        format!(
                            "key directory of {}: caught up from the remembered head to epoch \
                             {to} of {latest} in {steps} verified steps (remembered); run \
                             again to continue",
                            address.domain()
                        ),
                    );
                }
            }
            Ok(Accepted::Differs {
                why: mismatch,
                epoch,
                newest,
                note,
            }) => {
                let newest_at = newest.map(|(_, at)| at);
                if let Some(note) = note {
                    super::output::err(format!("kst: {note}"));
                }
                if let Some(ms) = super::log_race::ASK_AGAIN_MS.get(asked_again) {
                    asked_again += 1;
                    tracing::info!(domain = %address.domain(), epoch, "key directory: the answer proves another state than the reply served; asking again");
                    // The domain's memory is not locked while the client waits (review R6).
                    memory.release(&mut held);
                    tokio::time::sleep(Duration::from_millis(*ms)).await;
                    if let Err(o) = held_again(&memory, &mut held, &head_key, &attack) {
                        return o;
                    }
                    continue;
                }
                let keep = |held: &Held, why: String, seen: &str| {
                    attack(
                        memory
                            .attack(
                                held,
                                format!("{mismatch}; {why}"),
                                &format!("{about}{seen}"),
                            )
                            .to_string(),
                    )
                };
                // Review R1: two roots for the epoch verified before sending, both verified
                // by this client in one history with the same keys: a fork.
                if let Some(why) = fork_seen(verified, &held.memory, &address) {
                    return keep(&held, why, &text);
                }
                // Review F8: an epoch verified before sending counts only against the same
                // directory (not one re-keyed, restarted or re-pinned since).
                let (verified_epoch, no_epoch) = verified_in(verified, &held.memory);
                let mut race = super::log_race::Race {
                    log_base: &base,
                    ca_file: s.ca_file(),
                    head_key: &head_key,
                    address: &address,
                    served: served.as_deref(),
                    verified_epoch,
                    // Only with the epoch it was proven at, of the directory followed now.
                    verified_state: verified
                        .state
                        .as_ref()
                        .filter(|st| verified_epoch == Some(st.epoch)),
                    no_epoch: &no_epoch,
                    answer_epoch: epoch,
                };
                // The answer's own proof decides first: a newest version recorded at or
                // before the epoch verified before sending (no history needed).
                if let Some(why) = super::log_race::recorded_before_sending(&race, newest_at) {
                    return keep(&held, why, &text);
                }
                if let Some(read) = &history
                    && held
                        .memory
                        .remembered_epoch()
                        .is_none_or(|e| e < read.newest_epoch())
                {
                    return keep(
                        &held,
                        format!(
                            "the directory's history was of epoch {}, and its answer read \
                             after it is of epoch {epoch}: a history from another directory",
                            read.newest_epoch()
                        ),
                        &with_history(text, &read.evidence()),
                    );
                }
                let no_epoch_now;
                let read = match history.take() {
                    Some(read) => read,
                    None => {
                        // Review R6: the history and its pages are read without the
                        // domain's memory lock (up to `log_race::READ_BUDGET`); the memory
                        // is read afresh after.
                        memory.release(&mut held);
                        let read = super::log_race::read(&race).await;
                        if let Err(o) = held_again(&memory, &mut held, &head_key, &attack) {
                            return o;
                        }
                        // Review F-4 (of this change): what the verified epoch means, and
                        // whether the memory now holds another root for it, are taken from
                        // the memory as it is now (it may have started again meanwhile).
                        if let Some(why) = fork_seen(verified, &held.memory, &address) {
                            return keep(&held, why, &text);
                        }
                        let now_epoch;
                        (now_epoch, no_epoch_now) = verified_in(verified, &held.memory);
                        race.verified_epoch = now_epoch;
                        race.verified_state = verified
                            .state
                            .as_ref()
                            .filter(|st| now_epoch == Some(st.epoch));
                        race.no_epoch = &no_epoch_now;
                        match read {
                            Ok(read) => read,
                            Err(decision) => {
                                return decided(
                                    &memory, &held, decision, &mismatch, &about, text, epoch,
                                    &address, &keep,
                                );
                            }
                        }
                    }
                };
                match super::log_race::judge(&race, &read, &held.memory) {
                    super::log_race::Decision::AskAgain { .. }
                        if newer_answers < super::log_race::MAX_NEWER_ANSWERS =>
                    {
                        newer_answers += 1;
                        history = Some(read);
                        continue;
                    }
                    super::log_race::Decision::AskAgain { epoch: ahead } => {
                        let kept = super::log_race::Decision::Unread {
                            why: kept_moving(ahead),
                            seen: read.evidence(),
                        };
                        return decided(
                            &memory, &held, kept, &mismatch, &about, text, epoch, &address, &keep,
                        );
                    }
                    decision => {
                        return decided(
                            &memory, &held, decision, &mismatch, &about, text, epoch, &address,
                            &keep,
                        );
                    }
                }
            }
            Err(o) => return o.with_attack(&attack),
        }
    }
}

/// Review R1: the root the memory keeps for the epoch verified before sending, when it is
/// another than the one the request kept, both verified by this client in one history with
/// the same keys (a fork): why, for the evidence.
fn fork_seen(
    verified: &VerifiedBefore,
    memory: &DomainMemory,
    address: &Address,
) -> Option<String> {
    let (Some(e), Some(log)) = (verified.epoch, &verified.log) else {
        return None;
    };
    let root = memory.fork_at(e, log)?;
    Some(format!(
        "possible fork of the key directory of {}: the client had verified the root {} for \
         epoch {e} when it sent the request, and holds the root {} for it now, both in one \
         history with the same keys",
        address.domain(),
        log.root,
        hex::encode(root)
    ))
}

/// Review F8: the epoch verified before sending when it is of the directory `memory` follows
/// now, else `None` and why not.
fn verified_in(verified: &VerifiedBefore, memory: &DomainMemory) -> (Option<u64>, String) {
    match verified.epoch_in(memory) {
        Ok(e) => (Some(e), String::new()),
        Err(why) => (None, why),
    }
}

/// Takes the domain's memory lock back after the check let go of it (review R6) and reads
/// the memory afresh: it must still pin `head_key`, the key the check verifies with (a
/// domain pinned again meanwhile, or a memory deleted, stops the check: exit 75, nothing
/// imported; the retry uses the new pin).
fn held_again(
    memory: &LogMemory,
    held: &mut Held,
    head_key: &[u8; 32],
    attack: &dyn Fn(String) -> Outcome,
) -> Result<(), Outcome> {
    memory
        .hold_again(held)
        .map_err(|e| memory_outcome(e, attack))?;
    let pinned = held.memory.head_key.as_deref();
    if pinned.is_some_and(|k| k.eq_ignore_ascii_case(&hex::encode(head_key))) {
        return Ok(());
    }
    Err(Outcome::error(
        exit::TEMPFAIL,
        format!(
            "key directory of {}: the domain's head key was pinned again (or its memory \
             removed) while the check ran; nothing was imported; retrieve again",
            held.domain
        ),
    ))
}

/// The outcome of a [`super::log_race`] decision other than `AskAgain` about the mismatch
/// between the reply and the directory's answer (`answer`, at `epoch`): a race is exit 75,
/// an attack exit 5 with its evidence kept (`keep`), a history not read or not tied exit 75
/// with the mismatch kept ([`undecided`]).
#[allow(clippy::too_many_arguments)]
fn decided(
    memory: &LogMemory,
    held: &Held,
    decision: super::log_race::Decision,
    mismatch: &str,
    about: &str,
    answer: String,
    epoch: u64,
    address: &Address,
    keep: &dyn Fn(&Held, String, &str) -> Outcome,
) -> Outcome {
    use super::log_race::Decision;
    match decision {
        Decision::Race(message) => Outcome::error(exit::TEMPFAIL, message),
        Decision::Attack { why, seen } => keep(held, why, &with_history(answer, &seen)),
        Decision::Unread { why, seen } => {
            let seen = format!("{about}{}", with_history(answer, &seen));
            undecided(memory, held, mismatch, &why, &seen, epoch, address)
        }
        Decision::AskAgain { epoch: ahead } => {
            let seen = format!("{about}{answer}");
            undecided(
                memory,
                held,
                mismatch,
                &kept_moving(ahead),
                &seen,
                epoch,
                address,
            )
        }
    }
}

/// Why a history of epoch `ahead` was not decided: newer answers did not tie it.
fn kept_moving(ahead: u64) -> String {
    format!("the directory kept moving while the client read its history (of epoch {ahead})")
}

/// The evidence of a two-step check: the directory's `answer`, and the `history` read after
/// it when one was (empty: none).
fn with_history(answer: String, history: &str) -> String {
    match history.is_empty() {
        true => answer,
        false => format!("{answer}\n-- history --\n{history}"),
    }
}

/// The lookup path of `address` (from the remembered epoch `since`, in steps when
/// `ask_steps`, with the witnesses' part when `witnessed`) and the largest answer taken.
fn lookup_path(
    address: &Address,
    since: Option<u64>,
    ask_steps: bool,
    witnessed: bool,
) -> (String, usize) {
    let path = format!(
        "/.well-known/kst/log/{}/lookup/{}",
        address.domain(),
        path_segment(address.as_str()),
    );
    let mut query: Vec<String> = since
        .map(|e| match ask_steps {
            true => vec![format!("since={e}"), "steps=1".into()],
            false => vec![format!("since={e}")],
        })
        .unwrap_or_default();
    let limit = if witnessed {
        query.push("witnessed=1".into());
        MAX_WITNESSED_ANSWER + (MAX_ANSWER_WITH_AUDIT - MAX_ANSWER)
    } else {
        MAX_ANSWER_WITH_AUDIT
    };
    let path = if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    };
    (path, limit)
}

/// A mismatch between the reply and the directory's verified answer (at `epoch`) that the
/// address's history could not decide (`why`): a temporary failure (exit 75), nothing
/// imported, with the mismatch and what was `seen` kept as evidence, so that a retrieval
/// that keeps failing so leaves something to show.
fn undecided(
    memory: &LogMemory,
    held: &Held,
    mismatch: &str,
    why: &str,
    seen: &str,
    epoch: u64,
    address: &Address,
) -> Outcome {
    let failure = format!("{mismatch}; not decided: {why}");
    let kept = match memory.keep(held, &failure, seen) {
        Ok(path) => format!(
            "the mismatch is kept as evidence (evidence kept in {})",
            path.display()
        ),
        Err(e) => format!("the mismatch could not be kept as evidence: {e}"),
    };
    Outcome::error(
        exit::TEMPFAIL,
        format!(
            "key directory of {}: what the reply served for {address} differs from the \
             directory's verified answer (epoch {epoch}), and the address's history did not \
             decide whether it changed on the way: {why}; nothing was imported; {kept}; \
             retrieve again (if it keeps failing so, show the evidence)",
            address.domain()
        ),
    )
}

/// The outcome of a memory failure: an attack, or a local problem (exit 78).
fn memory_outcome(e: MemoryError, attack: &dyn Fn(String) -> Outcome) -> Outcome {
    match e {
        e @ MemoryError::Attack { .. } => attack(e.to_string()),
        e @ MemoryError::Io { .. } => Outcome::error(exit::CONFIG, e.to_string()),
    }
}

/// Where the domain's directory is served.
fn log_base(args: &LogCheckArgs, address: &Address) -> String {
    args.log_url
        .clone()
        .unwrap_or_else(|| format!("https://{}", address.domain()))
}

/// A key directory request that brought no answer to use: the outcome to report, and the
/// HTTP status the server answered when it answered one (review F5: a status is the
/// server's, as [`fetch`] read it, never words found in an error's text, which holds the
/// first line of the server's body).
#[derive(Debug)]
pub(super) struct Unfetched {
    /// The status (not 200), `None` when no response was read (no connection, TLS, a
    /// timeout, a body over the limit or not UTF-8).
    pub status: Option<hyper::StatusCode>,
    /// What to report: exit 75, or 69 for a 422.
    pub outcome: Outcome,
}

/// [`fetch_status`], a 404 being a temporary failure too.
async fn fetch_answer(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
    max: usize,
) -> Result<String, Unfetched> {
    fetch_status(base, path, ca_file, max)
        .await?
        .ok_or_else(|| Unfetched {
            status: Some(hyper::StatusCode::NOT_FOUND),
            outcome: Outcome::error(
                exit::TEMPFAIL,
                format!("key directory: {base}{path} answered 404"),
            ),
        })
}

/// [`fetch_status`] as an outcome, with `None` for a 404.
pub(super) async fn fetch_or_missing(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
    max: usize,
) -> Result<Option<String>, Outcome> {
    fetch_status(base, path, ca_file, max)
        .await
        .map_err(|u| u.outcome)
}

/// [`get`] within [`FETCH_TIMEOUT`]: the body of a 200, `None` for a 404; a 422 (the
/// remembered head is too far back for one proof: retrying will not help) is exit 69,
/// anything else temporary (exit 75). Decided by the status the server sent.
async fn fetch_status(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
    max: usize,
) -> Result<Option<String>, Unfetched> {
    let e = match tokio::time::timeout(FETCH_TIMEOUT, get(base, path, ca_file, max)).await {
        Ok(Ok(t)) => return Ok(Some(t)),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(Unfetched {
                status: None,
                outcome: Outcome::error(
                    exit::TEMPFAIL,
                    format!("key directory: {base} did not answer in time"),
                ),
            });
        }
    };
    let status = match &e {
        GetError::Status { status, .. } => Some(*status),
        GetError::Failed(_) => None,
    };
    let outcome = match status {
        Some(hyper::StatusCode::NOT_FOUND) => return Ok(None),
        Some(hyper::StatusCode::UNPROCESSABLE_ENTITY) => Outcome::error(
            exit::UNAVAILABLE,
            format!("key directory: {e}; kst client log-pin DOMAIN forgets the remembered head"),
        ),
        _ => Outcome::error(exit::TEMPFAIL, format!("key directory: {e}")),
    };
    Err(Unfetched { status, outcome })
}

/// The keys a `_kst-log.<domain>` TXT record publishes: `v=kstlog1; head=<hex>; vrf=<hex>`.
pub fn parse_log_record(txt: &str) -> Option<([u8; 32], [u8; 32])> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=kstlog1") {
        return None;
    }
    let (mut head, mut vrf) = (None, None);
    for f in fields {
        let (k, v) = f.split_once('=')?;
        let slot = match k.trim() {
            "head" => &mut head,
            "vrf" => &mut vrf,
            _ => continue,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(hex32(v.trim()).ok()?);
    }
    Some((head?, vrf?))
}

/// The domain's published keys from DNS: `Ok(None)` when it publishes none.
async fn dns_keys(
    s: &Settings,
    domain: &str,
) -> Result<Option<([u8; 32], [u8; 32], DnsSecurity)>, Outcome> {
    let dns = s.dns()?;
    let name = format!("_kst-log.{domain}");
    let found = match dns.txt(&name).await {
        Ok(f) => f,
        Err(e @ DnsError::Bogus(_)) => {
            return Err(Outcome::error(
                exit::ATTACK,
                format!("possible attack: the head key record {name}: {e}"),
            ));
        }
        Err(e) => return Err(dns_outcome(e)),
    };
    let keys: Vec<_> = found
        .value
        .iter()
        .filter(|t| t.trim_start().starts_with("v=kstlog1"))
        .collect();
    match keys.as_slice() {
        [] => Ok(None),
        [one] => match parse_log_record(one) {
            Some((head, vrf)) => Ok(Some((head, vrf, found.security))),
            None => Err(Outcome::error(
                exit::UNAVAILABLE,
                format!(
                    "{name}: unreadable record {one:?} (want v=kstlog1; head=<64 hex>; vrf=<64 hex>)"
                ),
            )),
        },
        _ => Err(Outcome::error(
            exit::UNAVAILABLE,
            format!("{name}: more than one v=kstlog1 record; the domain must publish one"),
        )),
    }
}

/// The largest `kst-log` file read from a WKD policy directory (one record line).
const MAX_WKD_FILE: usize = 1024;

/// A domain's directory keys as it publishes them: in DNS or in its WKD policy directory.
struct Published {
    head: [u8; 32],
    vrf: [u8; 32],
    /// How they were found ([`source`]).
    from: &'static str,
    /// Where, for messages: `DNS` or the file's URL.
    place: String,
}

/// [`dns_keys`] as [`Published`] keys.
async fn dns_published(s: &Settings, domain: &str) -> Result<Option<Published>, Outcome> {
    Ok(dns_keys(s, domain)
        .await?
        .map(|(head, vrf, security)| Published {
            head,
            vrf,
            from: if security == DnsSecurity::Secure {
                source::DNS_SECURE
            } else {
                source::DNS_INSECURE
            },
            place: format!("DNS (the _kst-log.{domain} TXT record)"),
        }))
}

/// The domain's keys from the `kst-log` file of its WKD policy directory (the same record as
/// the `_kst-log` TXT record), `Ok(None)` when it has none (404). With `log_url`, at
/// `<log_url>/.well-known/openpgpkey/<domain>/kst-log` (the directory's own listener);
/// else at WKD's advanced host `https://openpgpkey.<domain>`, or at the direct one,
/// `https://<domain>`, only when the advanced host has no address (`Dns::has_address`:
/// WKD's rule). Any failure at the advanced host is its answer, never a reason to ask the
/// direct one (which may be a web host or CDN the domain does not run itself): not
/// reachable, a TLS failure, a 429 or 5xx is temporary (exit 75), an unreadable file exit
/// 69; a forged (bogus) DNS answer about the advanced host is exit 5. `confirming`: the
/// answer decides whether keys from DNS without DNSSEC are pinned ([`confirm_first_pin`]),
/// so "no file" counts only where it is proven (see [`wkd_choose`]).
async fn wkd_keys(
    s: &Settings,
    domain: &str,
    log_url: Option<&str>,
    confirming: bool,
) -> Result<Option<Published>, Outcome> {
    if let Some(base) = log_url {
        let path = WkdPlaces::of(domain).advanced.1;
        return wkd_file(base.trim_end_matches('/'), &path, s.ca_file()).await;
    }
    let places = WkdPlaces::of(domain);
    let exists = s.dns()?.has_address(&places.advanced_host).await;
    wkd_choose(&places, exists, confirming, s.ca_file()).await
}

/// Where WKD's two methods keep a domain's `kst-log` file: (base URL, path) each.
struct WkdPlaces {
    /// `openpgpkey.<domain>`: the direct method is for a domain without it.
    advanced_host: String,
    advanced: (String, String),
    direct: (String, String),
}

impl WkdPlaces {
    fn of(domain: &str) -> WkdPlaces {
        let (file, well_known) = (kst_core::wkd::LOG_KEYS_FILE, kst_core::wkd::WELL_KNOWN);
        let advanced_host = format!("openpgpkey.{domain}");
        WkdPlaces {
            advanced: (
                format!("https://{advanced_host}"),
                format!("{well_known}/{domain}/{file}"),
            ),
            direct: (format!("https://{domain}"), format!("{well_known}/{file}")),
            advanced_host,
        }
    }
}

/// [`wkd_keys`]' choice once DNS said whether the advanced host has an address (`exists`,
/// `Dns::has_address`): that host's answer when it has, the direct host's only when it has
/// not; a forged DNS answer is exit 5, a failed look-up exit 75 (neither is a reason to ask
/// the direct host).
///
/// When `confirming` (red team round 5): a "no address" for the advanced host that DNSSEC
/// did not prove may be forged by the same DNS path that gave the keys to confirm, and the
/// direct host (the domain's web site) then answers 404 for a file that only the advanced
/// host keeps; so a 404 of the direct host after an unproven "no address" confirms nothing
/// (exit 69), where a proven one means the domain has no file.
async fn wkd_choose(
    places: &WkdPlaces,
    exists: Result<Secured<bool>, DnsError>,
    confirming: bool,
    ca_file: Option<&Path>,
) -> Result<Option<Published>, Outcome> {
    let host = &places.advanced_host;
    match exists {
        Ok(Secured { value: true, .. }) => {
            wkd_file(&places.advanced.0, &places.advanced.1, ca_file).await
        }
        Ok(Secured {
            value: false,
            security,
        }) => {
            let found = wkd_file(&places.direct.0, &places.direct.1, ca_file).await?;
            if found.is_none() && confirming && security != DnsSecurity::Secure {
                return Err(Outcome::error(
                    exit::UNAVAILABLE,
                    format!(
                        "DNS says {host} has no address, but the answer is {} (no DNSSEC \
                         proof: it may be forged), and {}{} has no file; nothing to compare \
                         with",
                        security.as_str(),
                        places.direct.0,
                        places.direct.1
                    ),
                ));
            }
            Ok(found)
        }
        Err(e @ DnsError::Bogus(_)) => Err(Outcome::error(
            exit::ATTACK,
            format!("possible attack: the WKD host {host}: {e}"),
        )),
        Err(e) => Err(Outcome::error(
            exit::TEMPFAIL,
            format!(
                "the WKD policy directory cannot be found now (whether {host} exists: {e}); try \
                 again later"
            ),
        )),
    }
}

/// The `kst-log` file at `base` + `path` ([`wkd_keys`]): `Ok(None)` for a 404; a file that
/// is not one record line, larger than [`MAX_WKD_FILE`] or not UTF-8 is exit 69; no answer,
/// a TLS failure or another status is temporary (exit 75).
async fn wkd_file(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
) -> Result<Option<Published>, Outcome> {
    let place = format!("{base}{path}");
    let fetched = tokio::time::timeout(
        FETCH_TIMEOUT,
        fetch(base, hyper::Method::GET, path, None, ca_file, MAX_WKD_FILE),
    )
    .await;
    let text = match fetched {
        Ok(Ok((status, text))) if status == hyper::StatusCode::OK => text,
        Ok(Ok((status, _))) if status == hyper::StatusCode::NOT_FOUND => return Ok(None),
        Ok(Ok((status, text))) => {
            return Err(Outcome::error(
                exit::TEMPFAIL,
                format!(
                    "the WKD policy directory {place} answered {status}: {}; try again later",
                    text.lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            ));
        }
        // What `fetch` says of a body it could not take (over the limit, not UTF-8).
        Ok(Err(e)) if e.contains("length limit exceeded") || e.ends_with("not UTF-8") => {
            return Err(Outcome::error(
                exit::UNAVAILABLE,
                format!(
                    "{place}: unreadable key directory record ({e}; want one line of at most \
                     {MAX_WKD_FILE} bytes)"
                ),
            ));
        }
        Ok(Err(e)) => {
            return Err(Outcome::error(
                exit::TEMPFAIL,
                format!("the WKD policy directory {place} cannot be read now: {e}"),
            ));
        }
        Err(_) => {
            return Err(Outcome::error(
                exit::TEMPFAIL,
                format!("the WKD policy directory {place} did not answer in time"),
            ));
        }
    };
    let line = text.trim();
    match parse_log_record(line).filter(|_| !line.contains('\n')) {
        Some((head, vrf)) => Ok(Some(Published {
            head,
            vrf,
            from: if base.starts_with("https://") {
                source::WKD_HTTPS
            } else {
                source::WKD_HTTP
            },
            place,
        })),
        None => Err(Outcome::error(
            exit::UNAVAILABLE,
            format!(
                "{place}: unreadable key directory record {:?} (want one line v=kstlog1; \
                 head=<64 hex>; vrf=<64 hex>)",
                line.chars().take(200).collect::<String>()
            ),
        )),
    }
}

/// Red team round 3 (issue 18): keys `p` from a `_kst-log` record of a zone that is not
/// DNSSEC-signed are whatever the DNS path says; before they are pinned for the first time
/// they are compared with the domain's WKD policy directory ([`wkd_keys`], over HTTPS): other
/// keys there are an attack (exit 5, the evidence kept, nothing pinned); no file there (404)
/// leaves the DNS keys as they are, but only where that "no file" is proven (a 404 of the
/// direct host after an unsigned "no such advanced host" is exit 69, [`wkd_choose`]); a policy directory that cannot be read now is exit 75
/// (the DNS path's attacker could otherwise hide it), exit 69 when its file is unreadable.
/// Keys from a DNSSEC-signed zone, or from the policy directory itself, pass unchanged.
async fn confirm_first_pin(
    s: &Settings,
    log_url: Option<&str>,
    memory: &LogMemory,
    held: &Held,
    p: Published,
) -> Result<Published, Outcome> {
    if p.from != source::DNS_INSECURE {
        return Ok(p);
    }
    let domain = &held.domain;
    let wkd = wkd_keys(s, domain, log_url, true)
        .await
        .map_err(|o| match o {
            Outcome::Error { error, exit: code } if code != exit::ATTACK => Outcome::error(
                code,
                format!(
                    "the key directory keys of {domain} come from DNS without DNSSEC, and the \
                 client compares them with the WKD policy directory before it pins them: \
                 {error}; or pin them yourself: kst client log-pin {domain} --log-key HEX"
                ),
            ),
            other => other,
        })?;
    match wkd {
        Some(w) if (w.head, w.vrf) != (p.head, p.vrf) => {
            let message = format!(
                "possible attack: the key directory keys of {domain} in {} (head {}, vrf {}; a \
                 zone without DNSSEC) are not those of {} (head {}, vrf {}); nothing pinned. \
                 If {domain} really publishes these, pin the right ones yourself: kst client \
                 log-pin {domain} --log-key HEX",
                p.place,
                hex::encode(p.head),
                hex::encode(p.vrf),
                w.place,
                hex::encode(w.head),
                hex::encode(w.vrf)
            );
            let e = memory.attack(held, message, "the two published records above");
            Err(Outcome::error(exit::ATTACK, e.to_string()))
        }
        _ => Ok(p),
    }
}

/// The keys the domain publishes: its `_kst-log` TXT record, else (DNS has none, or cannot
/// answer now and `fallback_on_dns_failure`) the `kst-log` file of its WKD policy
/// directory ([`wkd_keys`]).
async fn published_keys(
    s: &Settings,
    domain: &str,
    log_url: Option<&str>,
    fallback_on_dns_failure: bool,
) -> Result<Option<Published>, Outcome> {
    match dns_published(s, domain).await {
        Ok(Some(p)) => Ok(Some(p)),
        Ok(None) => wkd_keys(s, domain, log_url, false).await,
        Err(o) if fallback_on_dns_failure && o.exit_code() == exit::TEMPFAIL => {
            match wkd_keys(s, domain, log_url, false).await {
                Ok(Some(p)) => Ok(Some(p)),
                _ => Err(o),
            }
        }
        Err(o) => Err(o),
    }
}

/// Pins `head` (and `vrf`) as `held`'s keys from `source`; a different head key than the
/// pinned one forgets the remembered head (the user chose to trust the new key).
fn pin(held: &mut Held, head: [u8; 32], vrf: Option<[u8; 32]>, from: &str) -> bool {
    let head_hex = hex::encode(head);
    let vrf_hex = vrf.map(hex::encode);
    let changed = held.memory.head_key.as_deref() != Some(head_hex.as_str())
        || (vrf_hex.is_some() && held.memory.vrf_key != vrf_hex);
    if !changed {
        return false;
    }
    if held.memory.head_key.is_some() {
        held.memory.head = None;
        held.memory.roots.clear();
    }
    held.memory.head_key = Some(head_hex);
    held.memory.vrf_key = vrf_hex;
    held.memory.pinned_from = from.to_string();
    held.memory.pinned_at = kst_core::time::unix_now();
    true
}

/// The head key to check `held`'s domain with: `--log-key` (pinned), else the published
/// keys ([`published_keys`]: DNS, else the WKD policy directory) against the pin (pinned on
/// first use; a change is an attack, never a silent replacement), else the pin alone when
/// the domain publishes none or cannot be asked now.
async fn head_key(
    s: &Settings,
    log_key: Option<&str>,
    log_url: Option<&str>,
    memory: &LogMemory,
    held: &mut Held,
) -> Result<[u8; 32], Outcome> {
    if let Some(key_hex) = log_key {
        let key = hex32(key_hex)
            .map_err(|_| Outcome::error(exit::USAGE, "--log-key: want 64 hex digits"))?;
        if pin(held, key, None, source::FLAG) {
            memory
                .save(held)
                .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
        }
        return Ok(key);
    }
    let pinned = held.memory.head_key.as_deref().and_then(|k| hex32(k).ok());
    let domain = held.domain.clone();
    match (
        published_keys(s, &domain, log_url, pinned.is_none()).await,
        pinned,
    ) {
        (Ok(Some(p)), None) => {
            let p = confirm_first_pin(s, log_url, memory, held, p).await?;
            pin(held, p.head, Some(p.vrf), p.from);
            memory
                .save(held)
                .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
            Ok(p.head)
        }
        (Ok(Some(p)), Some(pinned)) => {
            let vrf_changed = held
                .memory
                .vrf_key
                .as_deref()
                .is_some_and(|v| !v.eq_ignore_ascii_case(&hex::encode(p.vrf)));
            if p.head != pinned || vrf_changed {
                let message = format!(
                    "possible attack: the key directory keys of {domain} in {} (head {}, vrf \
                     {}) are not the pinned ones (head {}, vrf {}, pinned from {}); if \
                     {domain} really changed them, pin them again: kst client log-pin {domain}",
                    p.place,
                    hex::encode(p.head),
                    hex::encode(p.vrf),
                    hex::encode(pinned),
                    held.memory.vrf_key.as_deref().unwrap_or("unknown"),
                    held.memory.pinned_from
                );
                let e = memory.attack(held, message, "the published record above");
                return Err(Outcome::error(exit::ATTACK, e.to_string()));
            }
            if held.memory.vrf_key.is_none() {
                held.memory.vrf_key = Some(hex::encode(p.vrf));
                memory
                    .save(held)
                    .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
            }
            Ok(p.head)
        }
        (Ok(None), Some(pinned)) => Ok(pinned),
        (Err(o), Some(pinned)) if o.exit_code() == exit::TEMPFAIL => Ok(pinned),
        (Ok(None), None) => Err(Outcome::error(
            exit::UNAVAILABLE,
            format!(
                "{domain} publishes no key directory key (no v=kstlog1 TXT record at \
                 _kst-log.{domain}, no kst-log file in its WKD policy directory); give \
                 --log-key HEX"
            ),
        )),
        (Err(o), _) => Err(o),
    }
}

/// `kst client log-pin DOMAIN`: pins the domain's directory keys from `--log-key` /
/// `--vrf-key`, or from DNS now, replacing the pin and forgetting the remembered head (a
/// fresh start). Prints what is pinned; returns the exit code.
pub async fn log_pin(
    s: &Settings,
    domain: &str,
    log_key: Option<&str>,
    vrf_key: Option<&str>,
    log_url: Option<&str>,
) -> u8 {
    let outcome = pin_command(s, domain, log_key, vrf_key, log_url).await;
    match outcome {
        Ok(report) => {
            if s.json {
                super::terminal::print_json(&report, "{}");
            } else {
                // The keys may come from DNS: terminal-safe like every key-derived text.
                super::output::out(format!(
                    "pinned the key directory keys of {}: head {}, vrf {} (from {})",
                    report["domain"].as_str().unwrap_or_default(),
                    report["head_key"].as_str().unwrap_or_default(),
                    report["vrf_key"]
                        .as_str()
                        .unwrap_or("taken from the first verified head"),
                    report["source"].as_str().unwrap_or_default(),
                ));
                if report["forgot_head"] == true {
                    eprintln!("kst: the remembered head was forgotten");
                }
            }
            exit::OK
        }
        Err(o) => super::output::finish(&[o], s.json, false),
    }
}

async fn pin_command(
    s: &Settings,
    domain: &str,
    log_key: Option<&str>,
    vrf_key: Option<&str>,
    log_url: Option<&str>,
) -> Result<serde_json::Value, Outcome> {
    let domain = match kst_core::AddressPolicy::default().normalize_domain(domain) {
        Ok(d) => d,
        Err(_) => {
            return Err(Outcome::error(
                exit::USAGE,
                format!("{domain:?} is not a domain"),
            ));
        }
    };
    let memory = LogMemory::beside(s.state.path());
    let mut held = match memory.hold(&domain) {
        Ok(h) => h,
        Err(e) => return Err(Outcome::error(exit::CONFIG, e.to_string())),
    };
    let parse = |what: &str, v: Option<&str>| -> Result<Option<[u8; 32]>, Outcome> {
        v.map(|v| {
            hex32(v).map_err(|_| Outcome::error(exit::USAGE, format!("{what}: want 64 hex digits")))
        })
        .transpose()
    };
    let (head, vrf, from) = match (parse("--log-key", log_key), parse("--vrf-key", vrf_key)) {
        (Ok(Some(h)), Ok(v)) => (h, v, source::FLAG),
        (Ok(None), Ok(None)) => match published_keys(s, &domain, log_url, true).await {
            Ok(Some(p)) => {
                let p = confirm_first_pin(s, log_url, &memory, &held, p).await?;
                (p.head, Some(p.vrf), p.from)
            }
            Ok(None) => {
                return Err(Outcome::error(
                    exit::UNAVAILABLE,
                    format!(
                        "no v=kstlog1 TXT record at _kst-log.{domain} and no kst-log file in \
                         its WKD policy directory: give --log-key HEX"
                    ),
                ));
            }
            Err(o) => return Err(o),
        },
        (Ok(None), Ok(Some(_))) => {
            return Err(Outcome::error(exit::USAGE, "--vrf-key needs --log-key"));
        }
        (Err(o), _) | (_, Err(o)) => return Err(o),
    };
    let forgot = held.memory.head.is_some();
    let changed = pin(&mut held, head, vrf, from);
    // A fresh start: also after a rollback the user accepts, or a head too far back.
    held.memory.head = None;
    held.memory.roots.clear();
    memory
        .save(&held)
        .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
    Ok(serde_json::json!({
        "outcome": "pinned",
        "exit": exit::OK,
        "domain": domain,
        "head_key": hex::encode(head),
        "vrf_key": held.memory.vrf_key,
        "source": held.memory.pinned_from,
        "changed": changed,
        "forgot_head": forgot,
    }))
}

/// The most deletions of an address whose time the owner's monitor checks against the heads
/// around them (the newest ones; two head requests each).
pub const MAX_DATED_DELETIONS: usize = 128;

/// What the owner's monitor reads from the directory about its address ([`history`]).
#[derive(Debug, Clone)]
pub struct DirectoryHistory {
    /// The epoch of the head the history is proven against.
    pub epoch: u64,
    /// Every version, newest first.
    pub versions: Vec<HistoryVersion>,
    /// The `signed-at` of the stored head of the epochs around each deletion (the epoch
    /// that recorded it and the one before; the newest [`MAX_DATED_DELETIONS`] deletions),
    /// each head checked with the domain's head key.
    pub signed_at: std::collections::BTreeMap<u64, u64>,
}

/// What the directory recorded for `address` (the owner's monitor, `kst client status`):
/// the versions, newest first, verified against the domain's head key, the head's epoch, and
/// the times of the heads around each deletion (to check the deletion's time, which is the
/// KST's claim). `Ok(None)`: the directory never held the address.
pub async fn history(
    s: &Settings,
    args: &LogCheckArgs,
    address: &Address,
) -> Result<Option<DirectoryHistory>, Outcome> {
    let memory = LogMemory::beside(s.state.path());
    let mut held = memory
        .hold(address.domain())
        .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))?;
    let head_key = head_key(
        s,
        args.reply.log_key.as_deref(),
        args.log_url.as_deref(),
        &memory,
        &mut held,
    )
    .await?;
    let base = log_base(args, address);
    let path = format!(
        "/.well-known/kst/log/{}/history/{}",
        address.domain(),
        path_segment(address.as_str())
    );
    let Some(text) = get_history(s, &base, &path).await? else {
        return Ok(None);
    };
    let attack = |message: String| {
        let e = memory.attack(&held, message, &text);
        Outcome::error(exit::ATTACK, format!("possible attack: {e}"))
    };
    let answer = HistoryAnswer::parse(&text).map_err(|e| attack(format!("{base}: {e}")))?;
    let mut versions = answer
        .verify(&head_key, address)
        .map_err(|e| attack(e.to_string()))?;
    // Older versions, page by page down to version 1 (at most MAX_PAGES pages), each against
    // the same head: every version is checked.
    let mut pages = 0;
    while let Some(oldest) = versions.last().filter(|v| v.akd_version > 1) {
        let (before, before_epoch) = (oldest.akd_version, oldest.epoch);
        if pages == MAX_PAGES {
            return Err(Outcome::error(
                exit::UNAVAILABLE,
                format!(
                    "the key directory holds {before} versions of {address} before the newest \
                     {} this client checked; it checks at most {}",
                    versions.len(),
                    MAX_VERSIONS * (1 + MAX_PAGES)
                ),
            ));
        }
        pages += 1;
        let page_path = format!("{path}?before={before}");
        let Some(page_text) = get_history(s, &base, &page_path).await? else {
            return Err(attack(format!(
                "{base}{page_path}: no versions below {before}, which the newest versions proved"
            )));
        };
        let attack = |message: String| {
            let e = memory.attack(&held, message, &page_text);
            Outcome::error(exit::ATTACK, format!("possible attack: {e}"))
        };
        let page = HistoryPage::parse(&page_text).map_err(|e| attack(format!("{base}: {e}")))?;
        if (page.head.head.epoch, page.head.head.root_hash)
            != (answer.head.head.epoch, answer.head.head.root_hash)
        {
            // A newer epoch was committed between the requests: no attack, read again later.
            return Err(Outcome::error(
                exit::TEMPFAIL,
                format!(
                    "key directory: {base} moved from epoch {} to {} while the history of \
                     {address} was read; try again",
                    answer.head.head.epoch, page.head.head.epoch
                ),
            ));
        }
        let older = page
            .verify(&head_key, address, before, before_epoch)
            .await
            .map_err(|e| attack(e.to_string()))?;
        versions.extend(older);
    }
    // The history's head against the remembered one: never older, the same root at the same
    // epoch (a newer one is checked by the next look-up's append-only proof).
    if let Some(old) = held.memory.remembered_head() {
        let new = &answer.head.head;
        if new.epoch < old.head.epoch
            || (new.epoch == old.head.epoch && new.root_hash != old.head.root_hash)
        {
            return Err(attack(format!(
                "the history's head (epoch {}) is older than, or forks from, the remembered head \
                 (epoch {})",
                new.epoch, old.head.epoch
            )));
        }
    }
    // The heads around each deletion: a deletion's time is the KST's claim, and these say
    // when the epochs around it were signed (docs/SECURITY.md, "What the monitor proves").
    let mut epochs = std::collections::BTreeSet::new();
    for v in versions
        .iter()
        .filter(|v| {
            v.entry
                .as_ref()
                .is_some_and(|e| e.state == kst_core::transparency::EntryState::Deleted)
        })
        .take(MAX_DATED_DELETIONS)
    {
        epochs.insert(v.epoch);
        epochs.insert(v.epoch.saturating_sub(1));
    }
    let mut signed_at = std::collections::BTreeMap::new();
    for epoch in epochs {
        let head_path = format!("/.well-known/kst/log/{}/head/{epoch}", address.domain());
        let Some(head_text) =
            fetch_or_missing(&base, &head_path, s.ca_file(), MAX_HEAD_TEXT).await?
        else {
            return Err(attack(format!(
                "{base}{head_path}: no head of epoch {epoch}, which the history names"
            )));
        };
        let attack = |message: String| {
            let e = memory.attack(&held, message, &head_text);
            Outcome::error(exit::ATTACK, format!("possible attack: {e}"))
        };
        let (head, _) = parse_head_with_cosignatures(&head_text)
            .map_err(|e| attack(format!("{base}{head_path}: {e}")))?;
        head.verify(&head_key)
            .map_err(|e| attack(format!("{base}{head_path}: {e}")))?;
        if head.head.epoch != epoch || head.head.domain != address.domain() {
            return Err(attack(format!(
                "{base}{head_path}: the head of {} epoch {} answered",
                head.head.domain, head.head.epoch
            )));
        }
        signed_at.insert(epoch, head.head.signed_at);
    }
    Ok(Some(DirectoryHistory {
        epoch: answer.head.head.epoch,
        versions,
        signed_at,
    }))
}

/// A history answer or page (`GET base + path`); `None` for a 404.
async fn get_history(s: &Settings, base: &str, path: &str) -> Result<Option<String>, Outcome> {
    fetch_or_missing(base, path, s.ca_file(), MAX_HISTORY_ANSWER).await
}

/// `s` with everything but unreserved characters, `@` and `+` percent-encoded.
pub(super) fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@+".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why [`get`] brought no answer.
#[derive(Debug)]
enum GetError {
    /// The server answered with `status` (not 200); `message` names the URL, the status and
    /// the first line of the body (the server's words: for messages only).
    Status {
        status: hyper::StatusCode,
        message: String,
    },
    /// No response to use ([`fetch`]'s error).
    Failed(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::Status { message, .. } | GetError::Failed(message) => f.write_str(message),
        }
    }
}

/// `GET base + path` ([`fetch`]), 200 with a body of at most `limit` bytes.
async fn get(
    base: &str,
    path: &str,
    ca_file: Option<&Path>,
    limit: usize,
) -> Result<String, GetError> {
    let (status, text) = fetch(base, hyper::Method::GET, path, None, ca_file, limit)
        .await
        .map_err(GetError::Failed)?;
    if status != hyper::StatusCode::OK {
        return Err(GetError::Status {
            status,
            message: format!(
                "{base}{path} answered {status}: {}",
                text.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        });
    }
    Ok(text)
}

/// `method base + path` with `body`: `http://` or `https://` (PKIX, the client's roots and
/// `ca_file`), no redirects; the status and the text body of at most `limit` bytes.
pub async fn fetch(
    base: &str,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
    ca_file: Option<&Path>,
    limit: usize,
) -> Result<(hyper::StatusCode, String), String> {
    let (tls, rest) = if let Some(r) = base.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = base.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{base:?}: want an http:// or https:// URL"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!(
            "{base:?}: want scheme://host[:port] without a path"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{base:?}: bad port"))?,
        ),
        None => (authority, if tls { 443 } else { 80 }),
    };
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut conn = Conn::connect(addr, FETCH_TIMEOUT)
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    if tls {
        let connector = super::tls::connector(ca_file)?;
        conn = conn
            .into_tls(&connector, host)
            .await
            .map_err(|e| e.to_string())?;
    }
    let fetched = tokio::time::timeout(
        FETCH_TIMEOUT,
        super::http_get::request(conn, authority, method, path, body, limit),
    )
    .await
    .map_err(|_| format!("{base} did not answer in time"))??;
    let text = String::from_utf8(fetched.body).map_err(|_| format!("{base}{path}: not UTF-8"))?;
    Ok((fetched.status, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local server answering every request with `response` (one request per
    /// connection, `times` connections); its base URL.
    fn answering(response: &'static str, times: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for conn in listener.incoming().take(times) {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ = c.write_all(response.as_bytes());
            }
        });
        base
    }

    /// Review F5: the status decides, as the server sent it; a body that speaks of another
    /// status changes nothing.
    #[tokio::test]
    async fn a_status_is_the_servers_never_words_in_its_body() {
        let r503 = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 23\r\nConnection: close\r\n\r\nthe x answered 404 now\n";
        let base = answering(r503, 2);
        let u = fetch_status(&base, "/p", None, 1024).await.unwrap_err();
        assert_eq!(u.status, Some(hyper::StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(u.outcome.exit_code(), exit::TEMPFAIL);
        assert!(fetch_or_missing(&base, "/p", None, 1024).await.is_err());
        let r404 = "HTTP/1.1 404 Not Found\r\nContent-Length: 23\r\nConnection: close\r\n\r\nthe x answered 400 now\n";
        let base = answering(r404, 2);
        assert_eq!(
            fetch_or_missing(&base, "/p", None, 1024).await.ok(),
            Some(None)
        );
        let u = fetch_answer(&base, "/p", None, 1024).await.unwrap_err();
        assert_eq!(u.status, Some(hyper::StatusCode::NOT_FOUND));
        let r422 = "HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n";
        let base = answering(r422, 1);
        let u = fetch_status(&base, "/p", None, 1024).await.unwrap_err();
        assert_eq!(u.outcome.exit_code(), exit::UNAVAILABLE);
        // No server: no status.
        let closed = format!("http://127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let u = fetch_status(&closed, "/p", None, 1024).await.unwrap_err();
        assert_eq!(u.status, None);
        assert_eq!(u.outcome.exit_code(), exit::TEMPFAIL);
    }

    /// The look-up the check and the head verified before sending ask for: the address
    /// percent-encoded, `since` the remembered epoch (none for epoch 0 or no memory), `steps=1`
    /// unless an older KST refused it, `witnessed=1` with the larger limit.
    #[test]
    fn the_lookup_path_names_the_remembered_epoch_steps_and_witnesses() {
        let a = kst_core::AddressPolicy::default()
            .normalize("a+b@example.net")
            .unwrap();
        let base = "/.well-known/kst/log/example.net/lookup/a+b@example.net";
        assert_eq!(
            lookup_path(&a, None, true, false),
            (base.to_string(), MAX_ANSWER_WITH_AUDIT)
        );
        assert_eq!(
            lookup_path(&a, Some(4), true, false).0,
            format!("{base}?since=4&steps=1")
        );
        assert_eq!(
            lookup_path(&a, Some(4), false, true),
            (
                format!("{base}?since=4&witnessed=1"),
                MAX_WITNESSED_ANSWER + (MAX_ANSWER_WITH_AUDIT - MAX_ANSWER)
            )
        );
    }

    /// `--log-key` and `--witness` need `--transparency` or `--check-transparency`; bad values
    /// are usage errors; the requirements kept with a pending request give the same flags back.
    #[test]
    fn flags_are_checked_and_survive_the_pending_request() {
        let witness = format!("w1:{}", "22".repeat(32));
        let args = |transparency: bool, key: Option<&str>, witnesses: &[&str]| ReplyProofArgs {
            transparency,
            log_key: key.map(str::to_string),
            witnesses: witnesses.iter().map(|w| w.to_string()).collect(),
            witness_threshold: None,
            witness_max_age: 60,
        };
        let key = "ab".repeat(32);
        assert!(
            args(true, None, &[]).validate(false).is_ok(),
            "the pin or DNS"
        );
        assert!(args(true, Some(&key), &[&witness]).validate(false).is_ok());
        assert!(args(false, Some(&key), &[&witness]).validate(true).is_ok());
        for (bad, http, want) in [
            (args(false, Some(&key), &[]), false, "--log-key goes with"),
            (args(false, None, &[&witness]), false, "--witness goes with"),
            (args(true, Some("abc"), &[]), false, "64 hex digits"),
            (args(true, None, &["w1"]), false, "--witness"),
        ] {
            let e = bad.validate(http).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let mut threshold = args(true, None, &[&witness]);
        threshold.witness_threshold = Some(2);
        assert!(threshold.validate(false).is_err());

        let check = LogCheckArgs {
            check_transparency: true,
            log_url: Some("http://127.0.0.1:1".into()),
            reply: args(false, Some(&key), &[&witness]),
        };
        let kept: LogRequirements =
            serde_json::from_str(&serde_json::to_string(&check.requirements()).unwrap()).unwrap();
        let back = LogCheckArgs::from_requirements(&kept, false);
        assert_eq!(back.check_transparency, check.check_transparency);
        assert_eq!(back.log_url, check.log_url);
        assert_eq!(back.reply.log_key, check.reply.log_key);
        assert_eq!(back.reply.witnesses, check.reply.witnesses);
        assert_eq!(back.reply.witness_max_age, 60);
        assert_eq!(back.witness_policy().unwrap().map(|p| p.threshold), Some(1));
    }

    #[test]
    fn the_dns_record_keygen_prints_parses_and_others_do_not() {
        let (h, v) = ("ab".repeat(32), "cd".repeat(32));
        let good = format!("v=kstlog1; head={h}; vrf={v}");
        assert_eq!(
            parse_log_record(&good),
            Some((hex32(&h).unwrap(), hex32(&v).unwrap()))
        );
        assert!(parse_log_record(&format!("v=kstlog1;head={h};vrf={v};future=1")).is_some());
        for bad in [
            format!("v=kstlog2; head={h}; vrf={v}"),
            format!("v=kstlog1; head={h}"),
            format!("v=kstlog1; head={h}; head={h}; vrf={v}"),
            format!("v=kstlog1; head={}; vrf={v}", &h[..62]),
            format!("head={h}; vrf={v}"),
            format!("v=kstlog1; head={h}; vrf"),
            String::new(),
        ] {
            assert_eq!(parse_log_record(&bad), None, "{bad}");
        }
    }

    /// A local HTTP server answering every request with `status` and `body`; its base URL
    /// and the number of requests it had.
    async fn http_server(
        status: &'static str,
        body: String,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            }
        });
        (base, hits)
    }

    /// What `Dns::has_address` would have said about the advanced host.
    fn found(value: bool, security: DnsSecurity) -> Result<Secured<bool>, DnsError> {
        Ok(Secured { value, security })
    }

    /// example.net's `kst-log` places with the advanced host's file at the base URL
    /// `advanced` and the direct host's at `direct` (local servers).
    fn places(advanced: &str, direct: &str) -> WkdPlaces {
        WkdPlaces {
            advanced_host: "openpgpkey.example.net".into(),
            advanced: (
                advanced.to_string(),
                "/.well-known/openpgpkey/example.net/kst-log".into(),
            ),
            direct: (direct.to_string(), "/.well-known/openpgpkey/kst-log".into()),
        }
    }

    /// What [`wkd_choose`] decided, in a word: `keys from <place>`, `none` or `exit <code>`.
    fn chosen(r: &Result<Option<Published>, Outcome>) -> String {
        match r {
            Ok(Some(p)) => format!("keys from {}", p.place),
            Ok(None) => "none".into(),
            Err(o) => format!("exit {}", o.exit_code()),
        }
    }

    /// A base URL where nothing listens (a local port just let go).
    async fn nowhere() -> String {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", closed.local_addr().unwrap())
    }

    /// Red team round 5 (issue 18): a first pin from a zone without DNSSEC is compared with
    /// the WKD policy directory, but a forged "no such host" for `openpgpkey.<domain>` (an
    /// insecure answer, accepted as such) sent the comparison to the domain's web site,
    /// whose 404 let the DNS keys be pinned (exit 0). Now a 404 of the direct host after an
    /// unproven "no address" confirms nothing (exit 69); a proven one still means the
    /// domain has no file, a file on the direct host is still what is compared, and looking
    /// keys up (not confirming) is unchanged.
    #[tokio::test]
    async fn rt18_a_forged_no_such_host_for_the_advanced_host_confirms_nothing() {
        let record = format!(
            "v=kstlog1; head={}; vrf={}\n",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        let (advanced, advanced_hits) = http_server("200 OK", record.clone()).await;
        let (missing, missing_hits) = http_server("404 Not Found", "no".into()).await;
        let (present, _) = http_server("200 OK", record).await;
        let choose = async |direct: &str, security: DnsSecurity, confirming: bool| {
            let exists = found(false, security);
            chosen(&wkd_choose(&places(&advanced, direct), exists, confirming, None).await)
        };
        for security in [DnsSecurity::Insecure, DnsSecurity::Unvalidated] {
            assert_eq!(
                choose(&missing, security, true).await,
                format!("exit {}", exit::UNAVAILABLE),
                "an unproven no-address and a 404 confirm nothing ({security:?})"
            );
            assert_eq!(
                choose(&missing, security, false).await,
                "none",
                "looking keys up: no file"
            );
            assert_eq!(
                choose(&present, security, true).await,
                format!("keys from {present}/.well-known/openpgpkey/kst-log"),
                "a direct file is compared"
            );
        }
        assert_eq!(
            choose(&missing, DnsSecurity::Secure, true).await,
            "none",
            "a proven no-address: the domain has no file"
        );
        assert_eq!(advanced_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(missing_hits.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    /// Red team round 3 (issue 18): the direct WKD host was asked whenever the advanced one
    /// failed (a 500, a 429, a file over 1024 bytes, a TLS failure), so whoever answers at
    /// `https://<domain>` (a web host, a CDN) decided the first pin whenever the advanced
    /// host could be made to fail. Now the direct host is asked only when the advanced host
    /// has no address (`Dns::has_address`); any answered failure is the advanced host's
    /// (exit 75, or 69 for an unreadable file), a forged DNS answer exit 5, a failed DNS
    /// look-up exit 75, and the direct host is never asked for them. Both hosts are local
    /// HTTP servers here (the real `fetch`); DNS's verdict is given.
    #[tokio::test]
    async fn rt18_the_direct_wkd_host_is_asked_only_when_the_advanced_one_does_not_exist() {
        let (h, v) = ("ab".repeat(32), "cd".repeat(32));
        let record = format!("v=kstlog1; head={h}; vrf={v}\n");
        let (direct, direct_hits) = http_server("200 OK", record.clone()).await;
        let choose = async |advanced: &str, exists: Result<Secured<bool>, DnsError>| {
            chosen(&wkd_choose(&places(advanced, &direct), exists, false, None).await)
        };
        for (status, body, want) in [
            (
                "500 Internal Server Error",
                "busy".to_string(),
                exit::TEMPFAIL,
            ),
            (
                "429 Too Many Requests",
                "slow down".to_string(),
                exit::TEMPFAIL,
            ),
            ("200 OK", "x".repeat(MAX_WKD_FILE + 1), exit::UNAVAILABLE),
            (
                "200 OK",
                "v=kstlog1; garbage".to_string(),
                exit::UNAVAILABLE,
            ),
        ] {
            let (advanced, hits) = http_server(status, body).await;
            assert_eq!(
                choose(&advanced, found(true, DnsSecurity::Secure)).await,
                format!("exit {want}"),
                "advanced answers {status}"
            );
            assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        }
        // An advanced host that exists but cannot be reached (a TLS failure is the same).
        let unreachable = nowhere().await;
        assert_eq!(
            choose(&unreachable, found(true, DnsSecurity::Secure)).await,
            format!("exit {}", exit::TEMPFAIL)
        );
        // DNS could not say, or said it forged: never the direct host.
        assert_eq!(
            choose(&unreachable, Err(DnsError::Failed("SERVFAIL".into()))).await,
            format!("exit {}", exit::TEMPFAIL)
        );
        assert_eq!(
            choose(&unreachable, Err(DnsError::Bogus("forged".into()))).await,
            format!("exit {}", exit::ATTACK)
        );
        assert_eq!(
            direct_hits.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the direct host was never asked"
        );
        // The advanced host's own 404: the domain has no file (no fallback either).
        let (advanced, _) = http_server("404 Not Found", "no".into()).await;
        assert_eq!(
            choose(&advanced, found(true, DnsSecurity::Secure)).await,
            "none"
        );
        // The advanced host has no address: the direct method.
        let (advanced, advanced_hits) = http_server("200 OK", record).await;
        assert_eq!(
            choose(&advanced, found(false, DnsSecurity::Secure)).await,
            format!("keys from {direct}/.well-known/openpgpkey/kst-log")
        );
        assert_eq!(advanced_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(direct_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// Red team round 3 (issue 18): a `too-far` answer is a new start only when nothing the
    /// client can check says otherwise. These build the answers with kst-core's real
    /// directory on an fs store (as `kst serve` does), and hand them to the client's one
    /// check of an answer, [`verify_and_remember`].
    #[cfg(feature = "server")]
    mod too_far {
        use super::*;
        use kst_core::Fingerprint;
        use kst_core::store::{Expected, NewKey};
        use kst_core::transparency::answer::{StepBudget, head_text};
        use kst_core::transparency::{DomainLog, HeadSigner, LogKeys, SignedHead, VrfSecret};
        use std::sync::Arc;

        const NOW: u64 = 1_800_000_000;

        fn address(name: &str) -> Address {
            kst_core::AddressPolicy::default()
                .normalize(&format!("{name}@example.net"))
                .unwrap()
        }

        /// A directory of example.net in `dir` with `keys`, holding one key each for `names`
        /// (one epoch each); its head after every epoch, oldest first.
        async fn directory(dir: &Path, keys: &str, names: &[&str]) -> (DomainLog, Vec<SignedHead>) {
            let log = DomainLog::open(
                Arc::new(kst_fs::FsDirectoryStore::new(dir)),
                LogKeys::parse(keys).unwrap(),
            )
            .await
            .unwrap();
            let mut heads = Vec::new();
            for (n, name) in names.iter().enumerate() {
                let a = address(name);
                let record = NewKey {
                    address: a.clone(),
                    key: format!("key of {name}").into_bytes(),
                    fingerprint: Fingerprint::parse(&format!("{:040X}", n + 1)).unwrap(),
                    publication_id: format!("{n:032x}"),
                    published_at: NOW,
                    revoked: false,
                    expected: Expected::Any,
                }
                .into_record(1);
                log.sync(&a, Some(&record), NOW).await.unwrap();
                let head = log
                    .answer_stepped(&address("nobody"), None, None, NOW)
                    .await
                    .unwrap()
                    .head;
                heads.push(head);
            }
            (log, heads)
        }

        /// The `too-far` answer (witnessed by `witness`, which cosigned `cosigned`) of `log`
        /// for nobody@example.net to a client that remembers epoch `since`.
        async fn too_far_answer(
            log: &DomainLog,
            since: u64,
            witness: &HeadSigner,
            cosigned: &SignedHead,
        ) -> String {
            log.add_cosignature(cosigned.head.epoch, &witness.cosign(cosigned, NOW).unwrap())
                .await
                .unwrap();
            too_far_witnessed(log, since, &[witness.public_key()]).await
        }

        /// What the client makes of `text` when it pinned `head_key` and `vrf` and remembers
        /// `remembered`, requiring `witness`.
        async fn check(
            state: &Path,
            head_key: [u8; 32],
            vrf: [u8; 32],
            remembered: &SignedHead,
            witness: &HeadSigner,
            text: &str,
            asked: Option<&Head>,
        ) -> (Result<Accepted, Refused>, Option<u64>) {
            let unused = "http://127.0.0.1:9";
            check_at(
                state, head_key, vrf, remembered, witness, text, asked, unused,
            )
            .await
        }

        /// [`check`] with the directory served at `log_base` (where a new start asks for
        /// the remembered epoch's head).
        #[allow(clippy::too_many_arguments)]
        async fn check_at(
            state: &Path,
            head_key: [u8; 32],
            vrf: [u8; 32],
            remembered: &SignedHead,
            witness: &HeadSigner,
            text: &str,
            asked: Option<&Head>,
            log_base: &str,
        ) -> (Result<Accepted, Refused>, Option<u64>) {
            let memory = LogMemory::in_dir(state);
            let mut held = memory.hold("example.net").unwrap();
            held.memory.head_key = Some(hex::encode(head_key));
            held.memory.vrf_key = Some(hex::encode(vrf));
            held.memory.head = Some(head_text(remembered).unwrap());
            memory.save(&held).unwrap();
            let policy = WitnessPolicy {
                witnesses: vec![("w1".into(), witness.public_key())],
                threshold: 1,
                not_before: 0,
            };
            let nobody = address("nobody");
            let checked = Checked {
                head_key: &head_key,
                address: &nobody,
                served: None,
                policy: Some(&policy),
                asked,
                source: "the test's answer",
                log_base,
                ca_file: None,
                read_apart: false,
                about: "",
            };
            let result = verify_and_remember(&memory, &mut held, text, &checked).await;
            // (The memory's lock is per open file: let go before reading it again.)
            drop(held);
            let held = memory.hold("example.net").unwrap();
            (result, held.memory.remembered_epoch())
        }

        fn refused_as_attack(result: &Result<Accepted, Refused>, want: &str) {
            match result {
                Err(Refused::Attack(m)) => assert!(m.contains(want), "{m}"),
                Err(Refused::Other(o)) => panic!("not an attack: {o:?}"),
                Ok(a) => panic!("accepted: {a:?}"),
            }
        }

        /// The head key is pinned with the VRF key; a `too-far` answer of a directory with
        /// the same head key but another VRF key (a second directory, where the provider can
        /// give the victim's address another label), witnessed, was accepted as the new
        /// start (exit 0; check_held's VRF check is skipped on that path). Now an attack.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt18_too_far_never_moves_the_client_to_another_vrf_key() {
            let tmp = tempfile::tempdir().unwrap();
            let keys = LogKeys::generate("example.net");
            let head_key = keys.head.public_key();
            let pinned_vrf = keys.vrf.public_key().unwrap();
            let other = format!(
                "domain: example.net\nhead-key: {}\nvrf-key: {}\n",
                hex::encode(*keys.head.to_bytes()),
                hex::encode(*VrfSecret::generate().to_bytes())
            );
            let (_, pinned_heads) =
                directory(&tmp.path().join("pinned"), &keys.to_file(), &["alice"]).await;
            let (second, heads) =
                directory(&tmp.path().join("second"), &other, &["alice", "bob"]).await;
            let witness = HeadSigner::generate();
            let text = too_far_answer(&second, 1, &witness, &heads[1]).await;
            let (result, remembered) = check(
                &tmp.path().join("client"),
                head_key,
                pinned_vrf,
                &pinned_heads[0],
                &witness,
                &text,
                None,
            )
            .await;
            refused_as_attack(&result, "not the pinned");
            assert_eq!(remembered, Some(1), "the pinned directory's head stays");
        }

        /// The client was shown a fork (a head of epoch 2 the witnessed history does not
        /// hold); the provider then answers `too-far` to it, one epoch behind, with the
        /// witnessed history whose heads include epoch 2 with another root. That was a
        /// silent new start (the fork buried, exit 0); now the fork is an attack. The same
        /// answer to a client that remembers the witnessed history's own head of epoch 2 is
        /// a proven extension: remembered as usual, no new start.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt18_too_far_does_not_bury_a_fork_the_witnesses_can_see() {
            let tmp = tempfile::tempdir().unwrap();
            let keys = LogKeys::generate("example.net");
            let (head_key, vrf) = (keys.head.public_key(), keys.vrf.public_key().unwrap());
            let (main, heads) = directory(
                &tmp.path().join("main"),
                &keys.to_file(),
                &["alice", "bob", "carol"],
            )
            .await;
            let (_, fork) = directory(
                &tmp.path().join("fork"),
                &keys.to_file(),
                &["alice", "mallory"],
            )
            .await;
            assert_ne!(fork[1].head.root_hash, heads[1].head.root_hash);
            let witness = HeadSigner::generate();
            // The witness cosigned epoch 1; the answer's witnessed heads are 1, 2, 3.
            let text = too_far_answer(&main, 2, &witness, &heads[0]).await;
            let (result, remembered) = check(
                &tmp.path().join("victim"),
                head_key,
                vrf,
                &fork[1],
                &witness,
                &text,
                None,
            )
            .await;
            refused_as_attack(&result, "possible fork");
            assert_eq!(remembered, Some(2), "nothing remembered from the answer");

            let (result, remembered) = check(
                &tmp.path().join("honest"),
                head_key,
                vrf,
                &heads[1],
                &witness,
                &text,
                None,
            )
            .await;
            assert!(matches!(result, Ok(Accepted::Remembered)));
            assert_eq!(remembered, Some(3));
        }

        /// Two version 3 requests sent from epoch 1; the first reply moved the memory to
        /// epoch 2 meanwhile, the second says `too-far 1` (what its request named). That was
        /// exit 5 (no proof from the remembered epoch 2: "a fork"), a false alarm; now exit
        /// 75 (send again), nothing remembered from it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt18_a_too_far_reply_after_the_memory_moved_is_no_attack() {
            let tmp = tempfile::tempdir().unwrap();
            let keys = LogKeys::generate("example.net");
            let (head_key, vrf) = (keys.head.public_key(), keys.vrf.public_key().unwrap());
            let (main, heads) = directory(
                &tmp.path().join("main"),
                &keys.to_file(),
                &["alice", "bob", "carol"],
            )
            .await;
            let witness = HeadSigner::generate();
            let text = too_far_answer(&main, 1, &witness, &heads[2]).await;
            let (result, remembered) = check(
                &tmp.path().join("client"),
                head_key,
                vrf,
                &heads[1],
                &witness,
                &text,
                Some(&heads[0].head),
            )
            .await;
            match result {
                Err(Refused::Other(o)) => assert_eq!(o.exit_code(), exit::TEMPFAIL, "{o:?}"),
                Err(Refused::Attack(m)) => panic!("a false alarm: {m}"),
                Ok(a) => panic!("accepted: {a:?}"),
            }
            assert_eq!(remembered, Some(2));
        }

        /// `log`'s key directory routes (`kst serve`'s own, `server::log_http`) on a
        /// local port; the base URL.
        async fn serve(log: Arc<DomainLog>) -> String {
            let router = crate::server::log_http::router(
                vec![log],
                kst_core::AddressPolicy::default(),
                Vec::new(),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            base
        }

        /// The `too-far` answer of `log` for nobody@example.net to a client that remembers
        /// epoch `since`, with the cosignatures stored of `witnesses`.
        async fn too_far_witnessed(log: &DomainLog, since: u64, witnesses: &[[u8; 32]]) -> String {
            let tight = StepBudget {
                bytes: 1,
                changes: 1,
                epochs: 1,
            };
            let mut answer = log
                .answer_stepped(&address("nobody"), Some(since), Some(tight), NOW)
                .await
                .unwrap();
            assert_eq!(answer.too_far, Some(since), "a too-far answer");
            answer.witnessed = log.witnessed(&answer.head, witnesses).await.unwrap();
            assert!(answer.witnessed.is_some());
            answer.to_text().unwrap()
        }

        fn refused_with(result: &Result<Accepted, Refused>, code: u8, want: &str) {
            match result {
                Err(Refused::Other(o)) => {
                    assert_eq!(o.exit_code(), code, "{o:?}");
                    let Outcome::Error { error, .. } = &**o else {
                        panic!("{o:?}")
                    };
                    assert!(error.contains(want), "{error}");
                }
                Err(Refused::Attack(m)) => panic!("an attack: {m}"),
                Ok(a) => panic!("accepted: {a:?}"),
            }
        }

        /// Red team round 3 (issue 18), "a fork shown after the last cosigned head can
        /// still be buried": a client shown a fork at epoch 1 (a head signed with the head
        /// key that the witnessed history does not hold) is answered `too-far` once the
        /// witness cosigned a head past it; the answer's witnessed heads start after epoch
        /// 1, so nothing in it ties the remembered head to them, and the client started
        /// again from the witnessed head (exit 0, the fork buried). Now a new start needs the
        /// remembered head itself cosigned by the required witnesses (`/head/1`): the true
        /// head of epoch 1 has another root, an attack (exit 5); a remembered head no
        /// required witness cosigned is exit 69 (re-pin); a server that cannot be asked is
        /// exit 75; a remembered head the witness cosigned is the honest new start (exit 0).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt18_too_far_restarts_only_from_a_remembered_head_the_witnesses_cosigned() {
            let tmp = tempfile::tempdir().unwrap();
            let keys = LogKeys::generate("example.net");
            let (head_key, vrf) = (keys.head.public_key(), keys.vrf.public_key().unwrap());
            let (main, heads) = directory(
                &tmp.path().join("main"),
                &keys.to_file(),
                &["alice", "bob", "carol", "dave"],
            )
            .await;
            let (_, fork) =
                directory(&tmp.path().join("fork"), &keys.to_file(), &["mallory"]).await;
            assert_ne!(fork[0].head.root_hash, heads[0].head.root_hash);
            // w1 cosigned epochs 1 and 3; w2 only epoch 3.
            let (w1, w2) = (HeadSigner::generate(), HeadSigner::generate());
            for (w, epoch) in [(&w1, 1usize), (&w1, 3), (&w2, 3)] {
                main.add_cosignature(epoch as u64, &w.cosign(&heads[epoch - 1], NOW).unwrap())
                    .await
                    .unwrap();
            }
            let main = Arc::new(main);
            let base = serve(Arc::clone(&main)).await;
            let by_w1 = too_far_witnessed(&main, 1, &[w1.public_key()]).await;
            let by_w2 = too_far_witnessed(&main, 1, &[w2.public_key()]).await;
            assert!(by_w1.contains("\ncosigned 3 "), "{by_w1}");

            // The fork: the true head of epoch 1 (cosigned by w1) has another root.
            let victim = tmp.path().join("victim");
            let (result, remembered) =
                check_at(&victim, head_key, vrf, &fork[0], &w1, &by_w1, None, &base).await;
            refused_as_attack(&result, "possible fork");
            assert_eq!(remembered, Some(1), "nothing remembered from the answer");

            // An honest client whose remembered head w2 never cosigned: exit 69, re-pin.
            let (result, remembered) = check_at(
                &tmp.path().join("uncosigned"),
                head_key,
                vrf,
                &heads[0],
                &w2,
                &by_w2,
                None,
                &base,
            )
            .await;
            refused_with(&result, exit::UNAVAILABLE, "log-pin");
            assert_eq!(remembered, Some(1));

            // The directory's server cannot be asked: exit 75, nothing remembered.
            let nowhere = nowhere().await;
            let (result, remembered) = check_at(
                &tmp.path().join("offline"),
                head_key,
                vrf,
                &heads[0],
                &w1,
                &by_w1,
                None,
                &nowhere,
            )
            .await;
            refused_with(&result, exit::TEMPFAIL, "try again later");
            assert_eq!(remembered, Some(1));

            // The remembered head w1 cosigned, and w1 cosigned the answer's history later:
            // the new start, as before.
            let (result, remembered) = check_at(
                &tmp.path().join("honest"),
                head_key,
                vrf,
                &heads[0],
                &w1,
                &by_w1,
                None,
                &base,
            )
            .await;
            match result {
                Ok(Accepted::Restarted { note }) => assert!(note.contains("w1"), "{note}"),
                other => panic!("{:?}", other.map_err(|_| "refused")),
            }
            assert_eq!(remembered, Some(4));
        }

        /// The bound on a KST's replies' append-only work (`mail_bound`): a version 3 reply
        /// whose answer lacks the append-only part its request asked for (every turn was
        /// taken) is exit 75, nothing remembered; it was an attack (exit 5, evidence kept).
        /// Over HTTP (no head asked by a request) the same answer is still an attack: the
        /// HTTP endpoint never leaves the part out (it answers 503).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_reply_without_the_asked_append_only_part_is_tempfail_not_an_attack() {
            let tmp = tempfile::tempdir().unwrap();
            let keys = LogKeys::generate("example.net");
            let (head_key, vrf) = (keys.head.public_key(), keys.vrf.public_key().unwrap());
            let (log, heads) = directory(
                &tmp.path().join("log"),
                &keys.to_file(),
                &["alice", "bob", "carol"],
            )
            .await;
            let witness = HeadSigner::generate();
            log.add_cosignature(
                heads[2].head.epoch,
                &witness.cosign(&heads[2], NOW).unwrap(),
            )
            .await
            .unwrap();
            // The answer a busy KST sends a client that remembers epoch 1: no append-only part.
            let mut answer = log
                .answer_stepped(&address("nobody"), None, None, NOW)
                .await
                .unwrap();
            assert!(answer.head.head.epoch > heads[0].head.epoch);
            answer.witnessed = log
                .witnessed(&answer.head, &[witness.public_key()])
                .await
                .unwrap();
            let text = answer.to_text().unwrap();
            let first = heads[0].head.epoch;
            let (result, remembered) = check(
                &tmp.path().join("mail"),
                head_key,
                vrf,
                &heads[0],
                &witness,
                &text,
                Some(&heads[0].head),
            )
            .await;
            refused_with(&result, exit::TEMPFAIL, "left out the append-only proof");
            assert_eq!(remembered, Some(first), "nothing remembered");
            let (result, remembered) = check(
                &tmp.path().join("http"),
                head_key,
                vrf,
                &heads[0],
                &witness,
                &text,
                None,
            )
            .await;
            refused_as_attack(&result, "no append-only proof");
            assert_eq!(remembered, Some(first));
        }
    }
}
