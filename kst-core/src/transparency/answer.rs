//! What the log's HTTP endpoint serves for an address, and what a client checks of it.
//!
//! `GET /.well-known/kst/log/<domain>/lookup/<address>` answers a short text (UTF-8, LF):
//!
//! ```text
//! kst-log-answer-v1
//! domain example.net
//! epoch 7
//! root <64 hex>
//! vrf <64 hex>
//! signed-at 1764790000
//! signature <128 hex>
//! present <base64 of the lookup proof>      (or: absent <base64 of the absence proof>)
//! append-only 5 <base64 of the append-only proof from epoch 5>   (only with ?since=5)
//! ```
//!
//! Instead of the `append-only` line, a `?since=` answer may carry one of (docs/TRANSPARENCY.md,
//! "Catching up in steps"; HTTP only with `&steps=1`, version 3 replies always):
//!
//! ```text
//! append-step 5 9 <root hex> <signed-at> <signature hex> <base64 of the proof from 5 to 9>
//! too-far 5
//! ```
//!
//! `append-step`: the whole proof from 5 is larger than one answer carries ([`StepBudget`]),
//! so this is its first part, up to the signed head of epoch 9 (the answer's domain and VRF
//! key, the root, time and signature given): the client verifies it, remembers that head and
//! asks again from 9. `too-far`: even the step of epoch 5 alone is over the budget (akd builds
//! every step from the latest tree, so a client far behind in changes has large steps): no
//! proof is built; the client starts again from a witness-cosigned head or re-pins.
//!
//! Lines 2 to 6 are the head exactly as signed ([`Head::message`] without its context
//! line), the signature is the domain's head key's over that message, and the last line is
//! [`super::wire`]'s encoding of the lookup or absence proof against that head. `/head`
//! serves the same without the last line, under `kst-log-head-v1`.
//!
//! `kst-log-answer-v2` (`lookup/<address>?witnessed=1`) is v1 followed by the witnesses'
//! part ([`super::witness::Witnessed`]): their newest cosignatures and the append-only proof
//! from the cosigned heads to the answer's.
//!
//! `lookup/<address>?since=<epoch>` (a client that remembers the head of `epoch`) adds the
//! append-only proof from that epoch to the answer's epoch ([`AppendOnlyFrom`]; none when
//! `since` is the answer's epoch or newer: the client then compares the heads itself), as the
//! line after the proof line (before the witnesses' part of a v2 answer).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::directory::AbsenceProof;
use super::entry::{DirectoryEntry, EntryState};
use super::head::{Head, SignedHead};
use super::verify::{verify_absence, verify_append_only_roots, verify_lookup_at};
use super::witness::Witnessed;
use super::{Result, TransparencyError, wire};
use crate::Address;

/// First line of a lookup answer.
pub const ANSWER_CONTEXT: &str = "kst-log-answer-v1";
/// First line of a lookup answer with the witnesses' part.
pub const WITNESSED_ANSWER_CONTEXT: &str = "kst-log-answer-v2";
/// Largest answer text accepted with the witnesses' part.
pub const MAX_WITNESSED_ANSWER: usize = MAX_ANSWER + super::witness::MAX_AUDIT_TEXT;
/// First line of a head.
pub const HEAD_CONTEXT: &str = "kst-log-head-v1";
/// Largest answer text accepted without an append-only proof (a lookup proof at 10⁶ entries
/// is a few KiB).
pub const MAX_ANSWER: usize = 2 * wire::MAX_LOOKUP_PROOF;
/// Largest answer text accepted with an append-only proof (`?since=`).
pub const MAX_ANSWER_WITH_AUDIT: usize = MAX_ANSWER + wire::MAX_AUDIT_PROOF * 4 / 3 + 64;
/// The most epochs one `?since=` proof spans without steps (an HTTP client that does not ask
/// for `steps=1`); a client further behind is told to re-pin (the server would otherwise
/// build arbitrarily long proofs for anyone who asks). With steps, [`StepBudget`] bounds each
/// answer by bytes and changes instead.
pub const MAX_SINCE_EPOCHS: u64 = 4096;

/// What one `?since=` answer's append-only proof may hold: the server counts each step before
/// it builds it ([`super::directory::KeyDirectory::audit_step_count`]) and stops before the
/// budget is exceeded; a first step over it is refused unbuilt (`too-far`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    /// Bytes of the encoded proof (estimated as [`STEP_ELEMENT_BYTES`] per element, checked
    /// once built).
    pub bytes: usize,
    /// Leaves inserted across the steps (two per change of an address): what a client's
    /// verification rebuilds.
    pub changes: usize,
    /// Epochs.
    pub epochs: u64,
}

/// Bytes one proof element (a node label and its value) takes in the encoded proof, at most
/// (about 76 measured).
pub const STEP_ELEMENT_BYTES: usize = 80;

/// The most elements the first step of a stepped answer (the step from the client's own
/// epoch) may hold, whatever the budget: a larger one is refused unbuilt (`too-far`) after
/// reading at most `4 * FIRST_STEP_MAX_ELEMENTS + 64` tree nodes
/// ([`super::directory::KeyDirectory::audit_step_walk`]), so a request `?since=1&steps=1` on
/// an old, large directory costs that much, not a walk of the whole answer budget (about
/// 210 000 nodes for 4 MiB). A client whose first step is larger is far behind anyway: it
/// starts again from a witnessed head (docs/TRANSPARENCY.md, "Catching up in steps").
///
/// Not for the step of the newest epoch (a client exactly one epoch behind): that one is
/// measured against the answer's budget alone (not the operator's `step_max_*` either), its
/// count kept for the epoch, so a client that follows every epoch is never sent to a
/// restart by one large epoch (red-team round 5). kst's writer never makes an epoch whose
/// own step comes near the cap ([`super::log::MAX_BATCH`]).
pub const FIRST_STEP_MAX_ELEMENTS: usize = 16_384;

/// The budget of an HTTP answer: 4 MiB of proof (at 10⁶ entries a client verifies about
/// 1 MB a second), 32 768 inserted leaves, 1024 epochs.
pub const HTTP_STEP_BUDGET: StepBudget = StepBudget {
    bytes: 4 << 20,
    changes: 32_768,
    epochs: 1024,
};

/// The budget inside a version 3 reply, whose answer block holds at most 2 MiB (the proof in
/// base64 and the rest of the answer): 1 MiB of proof.
pub const REPLY_STEP_BUDGET: StepBudget = StepBudget {
    bytes: 1 << 20,
    changes: 16_384,
    epochs: 1024,
};

/// The proof in an answer, in [`super::wire`]'s encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerProof {
    /// The address's latest version (a lookup proof).
    Present(Vec<u8>),
    /// The address was never in the directory (an absence proof).
    Absent(Vec<u8>),
}

/// The append-only proof from an older epoch to an answer's head (`?since=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOnlyFrom {
    /// The older epoch (the one the client remembers).
    pub from: u64,
    /// akd's append-only proof from `from` to the answer's epoch (or to `step`'s), in
    /// [`wire`]'s encoding.
    pub proof: Vec<u8>,
    /// A step of a catch-up: the proof ends at this signed head, older than the answer's
    /// (`append-step`); `None`: it reaches the answer's head (`append-only`).
    pub step: Option<SignedHead>,
}

/// A signed head and the proof for one address against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAnswer {
    /// The head of the epoch the proof is against.
    pub head: SignedHead,
    /// The proof.
    pub proof: AnswerProof,
    /// The witnesses' part (v2 answers).
    pub witnessed: Option<Witnessed>,
    /// With `?since=`: the append-only proof from that epoch to `head` (or a step of it).
    pub append_only: Option<AppendOnlyFrom>,
    /// With `?since=`: the epoch the server refused to prove from, unbuilt, because even its
    /// first step is over the budget (`too-far`).
    pub too_far: Option<u64>,
}

/// What the KST served for the address the answer is about.
#[derive(Debug, Clone, Copy)]
pub enum Served<'a> {
    /// This key (binary OpenPGP packets).
    Key(&'a [u8]),
    /// An authenticated "no key".
    Nothing,
}

/// The text of a signed head (what `/head` serves).
pub fn head_text(head: &SignedHead) -> Result<String> {
    Ok(format!("{HEAD_CONTEXT}\n{}", head_lines(head)?))
}

/// Parses the text of [`head_text`].
pub fn parse_head(text: &str) -> Result<SignedHead> {
    let mut lines = text.lines();
    if lines.next() != Some(HEAD_CONTEXT) {
        return Err(malformed("not a kst log head"));
    }
    let head = read_head(&mut lines)?;
    if lines.next().is_some() {
        return Err(malformed("trailing lines"));
    }
    Ok(head)
}

impl LogAnswer {
    /// Whether the answer finds no key for the address: an absence proof, or a lookup proof
    /// whose latest version is a deletion. The server's limits count both as a miss (a
    /// dictionary oracle learns as much from "deleted" as from "absent": docs/SECURITY.md).
    /// A proof that does not decode counts as finding nothing too (the caller built it).
    pub fn finds_no_key(&self) -> bool {
        match &self.proof {
            AnswerProof::Absent(_) => true,
            AnswerProof::Present(bytes) => wire::decode_lookup(bytes)
                .and_then(|proof| DirectoryEntry::from_value(&proof.value))
                .ok()
                .is_none_or(|entry| entry.state == EntryState::Deleted),
        }
    }

    /// The answer's text.
    pub fn to_text(&self) -> Result<String> {
        let (kind, bytes) = match &self.proof {
            AnswerProof::Present(b) => ("present", b),
            AnswerProof::Absent(b) => ("absent", b),
        };
        let (context, witnessed) = match &self.witnessed {
            Some(w) => (WITNESSED_ANSWER_CONTEXT, w.to_lines()?),
            None => (ANSWER_CONTEXT, String::new()),
        };
        let append_only = match (&self.append_only, self.too_far) {
            (
                Some(AppendOnlyFrom {
                    step: None,
                    from,
                    proof,
                }),
                _,
            ) => {
                format!("append-only {from} {}\n", B64.encode(proof))
            }
            (
                Some(AppendOnlyFrom {
                    step: Some(h),
                    from,
                    proof,
                }),
                _,
            ) => {
                if (h.head.domain.as_str(), h.head.vrf_public_key)
                    != (
                        self.head.head.domain.as_str(),
                        self.head.head.vrf_public_key,
                    )
                {
                    return Err(malformed("a step's head of another directory"));
                }
                format!(
                    "append-step {from} {} {} {} {} {}\n",
                    h.head.epoch,
                    hex::encode(h.head.root_hash),
                    h.head.signed_at,
                    hex::encode(h.signature),
                    B64.encode(proof)
                )
            }
            (None, Some(from)) => format!("too-far {from}\n"),
            (None, None) => String::new(),
        };
        Ok(format!(
            "{context}\n{}{kind} {}\n{append_only}{witnessed}",
            head_lines(&self.head)?,
            B64.encode(bytes)
        ))
    }

    /// Parses an answer's text; strict, bounded.
    pub fn parse(text: &str) -> Result<LogAnswer> {
        let mut lines = text.lines();
        let (limit, v2) = match lines.next() {
            Some(ANSWER_CONTEXT) => (MAX_ANSWER_WITH_AUDIT, false),
            Some(WITNESSED_ANSWER_CONTEXT) => (
                MAX_WITNESSED_ANSWER + (MAX_ANSWER_WITH_AUDIT - MAX_ANSWER),
                true,
            ),
            _ => return Err(malformed("not a kst log answer")),
        };
        if text.len() > limit {
            return Err(malformed(&format!("larger than {limit} bytes")));
        }
        let head = read_head(&mut lines)?;
        let (kind, b64) = lines
            .next()
            .and_then(|l| l.split_once(' '))
            .ok_or_else(|| malformed("no proof line"))?;
        let bytes = B64
            .decode(b64)
            .map_err(|_| malformed("the proof is not base64"))?;
        let proof = match kind {
            "present" => AnswerProof::Present(bytes),
            "absent" => AnswerProof::Absent(bytes),
            _ => return Err(malformed("unknown proof kind")),
        };
        if matches!(&proof, AnswerProof::Present(b) | AnswerProof::Absent(b) if b.len() > wire::MAX_LOOKUP_PROOF)
        {
            return Err(malformed("the proof is too large"));
        }
        let mut lines = lines.peekable();
        let (mut append_only, mut too_far) = (None, None);
        let b64 = |b64: &str| {
            B64.decode(b64)
                .map_err(|_| malformed("the append-only proof is not base64"))
        };
        if let Some(rest) = lines.peek().and_then(|l| l.strip_prefix("append-only ")) {
            let (from, proof) = rest
                .split_once(' ')
                .ok_or_else(|| malformed("a bad `append-only` line"))?;
            append_only = Some(AppendOnlyFrom {
                from: number(from)?,
                proof: b64(proof)?,
                step: None,
            });
            lines.next();
        } else if let Some(rest) = lines.peek().and_then(|l| l.strip_prefix("append-step ")) {
            let f: Vec<&str> = rest.split(' ').collect();
            let [from, to, root, signed_at, signature, proof] = f[..] else {
                return Err(malformed("a bad `append-step` line"));
            };
            let mut sig = [0u8; 64];
            hex::decode_to_slice(signature, &mut sig)
                .map_err(|_| malformed("the step's signature is not 128 hex digits"))?;
            append_only = Some(AppendOnlyFrom {
                from: number(from)?,
                proof: b64(proof)?,
                step: Some(SignedHead {
                    head: Head {
                        domain: head.head.domain.clone(),
                        epoch: number(to)?,
                        root_hash: hex32(root)?,
                        vrf_public_key: head.head.vrf_public_key,
                        signed_at: number(signed_at)?,
                    },
                    signature: sig,
                }),
            });
            lines.next();
        } else if let Some(rest) = lines.peek().and_then(|l| l.strip_prefix("too-far ")) {
            too_far = Some(number(rest)?);
            lines.next();
        }
        let witnessed = if v2 {
            Some(Witnessed::parse_lines(&head, lines)?)
        } else if lines.next().is_some() {
            return Err(malformed("want the `append-only` line or the end"));
        } else {
            None
        };
        Ok(LogAnswer {
            head,
            proof,
            witnessed,
            append_only,
            too_far,
        })
    }

    /// Everything a client checks: the head is signed by `head_key` and names `address`'s
    /// domain, the proof verifies against it, and the directory's latest entry for `address`
    /// agrees with what the KST served (the same key, or a deletion or absence for "no key").
    /// Returns the directory's entry (`None` for an address it never held). Any failure is
    /// [`TransparencyError::Verification`] or [`TransparencyError::Signature`]: an attack.
    pub async fn verify(
        &self,
        head_key: &[u8; 32],
        address: &Address,
        served: Served<'_>,
    ) -> Result<Option<DirectoryEntry>> {
        let proven = self.proven(head_key, address).await?;
        let head = &self.head.head;
        let fail = |what: String| {
            TransparencyError::Verification(format!(
                "{address} at {} epoch {}: {what}",
                head.domain, head.epoch
            ))
        };
        match (served, &proven) {
            (Served::Key(key), Some(entry)) => match entry.state {
                EntryState::Published | EntryState::Revoked if entry.commits_to_key(key) => {}
                EntryState::Deleted => {
                    return Err(fail(
                        "a key was served, but the directory records its deletion".into(),
                    ));
                }
                _ => {
                    return Err(fail(format!(
                        "the served key is not the one the directory commits to (version {}, \
                         fingerprint {})",
                        entry.version,
                        entry.key.as_ref().map_or("none", |(fp, _)| fp.as_str())
                    )));
                }
            },
            (Served::Nothing, Some(entry)) if entry.state != EntryState::Deleted => {
                return Err(fail(
                    "\"no key\" was served, but the directory holds a key".into(),
                ));
            }
            (Served::Nothing, _) => {}
            (Served::Key(_), None) => {
                return Err(fail(
                    "a key was served, but the directory never held one for the address".into(),
                ));
            }
        }
        Ok(proven)
    }

    /// What the answer proves, whatever was served: the head is signed by `head_key` and
    /// names `address`'s domain, and the proof verifies against it. Returns the directory's
    /// latest entry for `address` (`None`: an absence proof, the address was never held). A
    /// client that read the key at another moment than this answer (versions 1 and 2) tells
    /// a change of the address between the two reads from a forged answer with it. Any
    /// failure is [`TransparencyError::Verification`] or [`TransparencyError::Signature`].
    pub async fn proven(
        &self,
        head_key: &[u8; 32],
        address: &Address,
    ) -> Result<Option<DirectoryEntry>> {
        Ok(self
            .proven_at(head_key, address)
            .await?
            .map(|(entry, _)| entry))
    }

    /// [`LogAnswer::proven`], with the epoch at which the directory recorded the address's
    /// latest entry (under the proof, [`verify_lookup_at`]). `None`: an absence proof.
    pub async fn proven_at(
        &self,
        head_key: &[u8; 32],
        address: &Address,
    ) -> Result<Option<(DirectoryEntry, u64)>> {
        self.head.verify(head_key)?;
        let head = &self.head.head;
        if head.domain != address.domain() {
            return Err(TransparencyError::Verification(format!(
                "the log answer is about {}, not {}'s domain",
                head.domain, address
            )));
        }
        match &self.proof {
            AnswerProof::Present(bytes) => {
                verify_lookup_at(head, address, wire::decode_lookup(bytes)?).map(Some)
            }
            AnswerProof::Absent(bytes) => {
                let proof: AbsenceProof = wire::decode_absence(bytes)?;
                verify_absence(head, address, &proof).await?;
                Ok(None)
            }
        }
    }
}

impl LogAnswer {
    /// Checks that this answer's head extends `remembered` (a head the client accepted before,
    /// of the same domain and directory) only by appending: the same root for the same epoch,
    /// never an older epoch, and for a newer one the answer's append-only proof from exactly
    /// `remembered`'s epoch. Any failure is [`TransparencyError::Verification`]: a fork or a
    /// rollback. The caller has verified the answer's head signature.
    pub async fn verify_extends(&self, remembered: &Head) -> Result<()> {
        self.extends(remembered).await.map(|_| ())
    }

    /// [`LogAnswer::verify_extends`], returning the roots the verified proof establishes
    /// (epoch and root of every epoch after `remembered`'s up to the answer's).
    async fn extends(&self, remembered: &Head) -> Result<Vec<(u64, [u8; 32])>> {
        let new = &self.head.head;
        if new.epoch <= remembered.epoch {
            return verify_append_only_roots(
                remembered,
                new,
                akd::AppendOnlyProof {
                    proofs: Vec::new(),
                    epochs: Vec::new(),
                },
            )
            .await;
        }
        if let Some(step) = self.append_only.as_ref().and_then(|a| a.step.as_ref()) {
            return Err(TransparencyError::Verification(format!(
                "{}: the answer at epoch {} carries a step of the append-only proof (to epoch \
                 {}), not the proof to its own head",
                new.domain, new.epoch, step.head.epoch
            )));
        }
        if remembered.epoch == 0 {
            // The empty tree: every later state of the same directory extends it.
            return if remembered.domain == new.domain
                && remembered.vrf_public_key == new.vrf_public_key
            {
                Ok(vec![(new.epoch, new.root_hash)])
            } else {
                Err(TransparencyError::Verification(format!(
                    "{}: the heads belong to different directories",
                    new.domain
                )))
            };
        }
        let Some(a) = &self.append_only else {
            return Err(TransparencyError::Verification(format!(
                "{}: the answer at epoch {} carries no append-only proof from the remembered \
                 epoch {}",
                new.domain, new.epoch, remembered.epoch
            )));
        };
        if a.from != remembered.epoch {
            return Err(TransparencyError::Verification(format!(
                "{}: the append-only proof starts at epoch {}, not at the remembered epoch {}",
                new.domain, a.from, remembered.epoch
            )));
        }
        verify_append_only_roots(remembered, new, wire::decode_audit(&a.proof)?).await
    }

    /// A step of a catch-up (`append-step`, [`AppendOnlyFrom::step`]): the step's head is
    /// signed by `head_key`, belongs to the answer's directory, lies after `remembered` and
    /// before the answer's epoch, and the step's proof from exactly `remembered`'s epoch
    /// verifies up to it. Returns the step's head and the roots the proof establishes (the
    /// client remembers them, then asks again from the step's epoch). `Ok(None)`: the answer
    /// carries no step. Any failure is [`TransparencyError::Verification`] or
    /// [`TransparencyError::Signature`]: an attack.
    pub async fn verify_step(
        &self,
        head_key: &[u8; 32],
        remembered: &Head,
    ) -> Result<Option<(SignedHead, Vec<(u64, [u8; 32])>)>> {
        let Some(AppendOnlyFrom {
            from,
            proof,
            step: Some(step),
        }) = &self.append_only
        else {
            return Ok(None);
        };
        let new = &self.head.head;
        let fail = |what: String| {
            TransparencyError::Verification(format!(
                "{}: the append-only step from epoch {from} to {}: {what}",
                new.domain, step.head.epoch
            ))
        };
        step.verify(head_key)?;
        if (step.head.domain.as_str(), step.head.vrf_public_key)
            != (new.domain.as_str(), new.vrf_public_key)
        {
            return Err(fail("its head belongs to another directory".into()));
        }
        if *from != remembered.epoch {
            return Err(fail(format!(
                "it starts at epoch {from}, not at the remembered epoch {}",
                remembered.epoch
            )));
        }
        if step.head.epoch <= remembered.epoch || step.head.epoch >= new.epoch {
            return Err(fail(format!(
                "its head is not between the remembered epoch {} and the answer's {}",
                remembered.epoch, new.epoch
            )));
        }
        let roots = if remembered.epoch == 0 {
            // The empty tree: every later state of the same directory extends it.
            if (remembered.domain.as_str(), remembered.vrf_public_key)
                != (new.domain.as_str(), new.vrf_public_key)
            {
                return Err(fail("the heads belong to different directories".into()));
            }
            vec![(step.head.epoch, step.head.root_hash)]
        } else {
            verify_append_only_roots(remembered, &step.head, wire::decode_audit(proof)?).await?
        };
        Ok(Some((step.clone(), roots)))
    }
}

impl LogAnswer {
    /// [`LogAnswer::verify_extends`] for an answer to a request that named the head `asked`
    /// (protocol version 3's `KST-Log-Since`) while the client meanwhile remembered the newer
    /// `remembered` (another answer arrived while this request was pending): the answer's
    /// append-only proof starts at `asked`, verifies from it to the answer's head, and leads
    /// through `remembered`'s root at `remembered`'s epoch. In every other case (no `asked`,
    /// `asked` is `remembered`'s epoch, the answer is not newer than `remembered`, or its proof
    /// does not start at `asked`) it is [`LogAnswer::verify_extends`] from `remembered`. Any
    /// failure is [`TransparencyError::Verification`]: a fork or a rollback.
    ///
    /// Returns the roots the verified proof establishes (epoch and root of every epoch it
    /// covers after its start, up to the answer's).
    pub async fn verify_extends_via(
        &self,
        asked: Option<&Head>,
        remembered: &Head,
    ) -> Result<Vec<(u64, [u8; 32])>> {
        let new = &self.head.head;
        let (Some(asked), Some(a)) = (asked, &self.append_only) else {
            return self.extends(remembered).await;
        };
        if asked.epoch == 0
            || asked.epoch >= remembered.epoch
            || new.epoch <= remembered.epoch
            || a.from != asked.epoch
            || a.step.is_some()
        {
            return self.extends(remembered).await;
        }
        // The proof verified from `asked` to `new` (each step's trees built once), then the
        // root it gives `remembered`'s epoch compared with `remembered`'s.
        let roots = verify_append_only_roots(asked, new, wire::decode_audit(&a.proof)?).await?;
        let through = roots
            .iter()
            .find(|(epoch, _)| *epoch == remembered.epoch)
            .map(|(_, root)| root);
        if remembered.domain != new.domain
            || remembered.vrf_public_key != new.vrf_public_key
            || through != Some(&remembered.root_hash)
        {
            return Err(TransparencyError::Verification(format!(
                "{}: the answer at epoch {} does not lead through the remembered head of epoch                  {} (a fork)",
                new.domain, new.epoch, remembered.epoch
            )));
        }
        Ok(roots)
    }
}

/// Lines 2.. of the signed head text: the head's fields and the signature.
pub(crate) fn head_lines(head: &SignedHead) -> Result<String> {
    let message = String::from_utf8(head.head.message()?)
        .map_err(|_| malformed("the head message is not text"))?;
    let fields = message
        .split_once('\n')
        .map(|(_, rest)| rest)
        .ok_or_else(|| malformed("empty head message"))?;
    Ok(format!(
        "{fields}signature {}\n",
        hex::encode(head.signature)
    ))
}

pub(crate) fn read_head<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Result<SignedHead> {
    let mut field = |name: &str| -> Result<&'a str> {
        lines
            .next()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|l| l.strip_prefix(' '))
            .ok_or_else(|| malformed(&format!("want the `{name}` line")))
    };
    let domain = field("domain")?.to_string();
    super::head::check_domain(&domain)?;
    let epoch = number(field("epoch")?)?;
    let root_hash = hex32(field("root")?)?;
    let vrf_public_key = hex32(field("vrf")?)?;
    let signed_at = number(field("signed-at")?)?;
    let mut signature = [0u8; 64];
    hex::decode_to_slice(field("signature")?, &mut signature)
        .map_err(|_| malformed("the signature is not 128 hex digits"))?;
    Ok(SignedHead {
        head: Head {
            domain,
            epoch,
            root_hash,
            vrf_public_key,
            signed_at,
        },
        signature,
    })
}

fn number(s: &str) -> Result<u64> {
    s.parse().map_err(|_| malformed("want a number"))
}

/// 32 bytes from 64 hex digits.
pub fn hex32(s: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).map_err(|_| malformed("want 64 hex digits"))?;
    Ok(out)
}

fn malformed(why: &str) -> TransparencyError {
    TransparencyError::Malformed(format!("log answer: {why}"))
}
