//! What witnesses and auditors fetch, and what they and clients check of it
//! (docs/TRANSPARENCY.md, "Signed heads, witnesses"): texts of the log's HTTP endpoint.
//!
//! `GET /.well-known/kst/log/<domain>/head` and `.../head/<epoch>`: the stored signed head and
//! the witnesses' cosignatures of it ([`head_with_cosignatures_text`]):
//!
//! ```text
//! kst-log-head-v1
//! domain example.net
//! epoch 7
//! root <64 hex>
//! vrf <64 hex>
//! signed-at 1764790000
//! signature <128 hex>
//! cosignature <witness key, 64 hex> <checked-at> <128 hex>     (zero or more)
//! ```
//!
//! `POST .../cosignature` takes the same text with exactly one cosignature: the head the
//! witness checked and its signature over it.
//!
//! `GET .../audit?from=A&to=B` ([`AuditAnswer`], at most [`MAX_AUDIT_EPOCHS`] epochs): the
//! signed head of every epoch from A to B and akd's append-only proof between A and B:
//!
//! ```text
//! kst-log-audit-v1
//! domain example.net
//! vrf <64 hex>
//! head <epoch> <root, 64 hex> <signed-at> <signature, 128 hex>   (one per epoch, A to B)
//! proof <base64 of the append-only proof>                         (absent when A = B)
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::answer::{HEAD_CONTEXT, head_text, hex32, parse_head};
use super::head::{Cosignature, Head, SignedHead};
use super::verify::verify_append_only;
use super::{Result, TransparencyError, wire};

/// First line of an audit answer.
pub const AUDIT_CONTEXT: &str = "kst-log-audit-v1";
/// The most epochs one audit answer spans; auditors and witnesses further behind step
/// through in ranges of this size.
pub const MAX_AUDIT_EPOCHS: u64 = 1024;
/// The most cosignatures one head text carries.
pub const MAX_COSIGNATURES: usize = 32;
/// Largest head text (with its cosignatures) accepted.
pub const MAX_HEAD_TEXT: usize = 512 + MAX_COSIGNATURES * 256;
/// Largest audit answer accepted: the heads and the proof in base64.
pub const MAX_AUDIT_TEXT: usize =
    1024 + MAX_AUDIT_EPOCHS as usize * 256 + wire::MAX_AUDIT_PROOF / 3 * 4 + 8;

fn malformed(what: &str) -> TransparencyError {
    TransparencyError::Malformed(what.to_string())
}

/// The text of a signed head followed by its cosignatures.
pub fn head_with_cosignatures_text(
    head: &SignedHead,
    cosignatures: &[Cosignature],
) -> Result<String> {
    let mut text = head_text(head)?;
    for c in cosignatures {
        text.push_str(&c.to_line());
        text.push('\n');
    }
    Ok(text)
}

/// A second cosignature line of one witness: refused, so that a text has one reading (one
/// check must not take the first line of a witness and another check a later one).
fn duplicate(what: &str, witness: &[u8; 32]) -> TransparencyError {
    malformed(&format!(
        "{what}: two cosignature lines of witness {}; the log lists each witness once",
        hex::encode(witness)
    ))
}

/// Parses [`head_with_cosignatures_text`]; strict and bounded. The cosignatures are parsed,
/// not verified; two of one witness are refused.
pub fn parse_head_with_cosignatures(text: &str) -> Result<(SignedHead, Vec<Cosignature>)> {
    if text.len() > MAX_HEAD_TEXT {
        return Err(malformed(&format!(
            "log head: larger than {MAX_HEAD_TEXT} bytes"
        )));
    }
    if !text.starts_with(HEAD_CONTEXT) {
        return Err(malformed("log head: not a kst log head"));
    }
    // The head is the first seven lines; cosignature lines follow.
    let mut split = 0;
    for _ in 0..7 {
        split += text[split..]
            .find('\n')
            .ok_or_else(|| malformed("log head: truncated"))?
            + 1;
    }
    let head = parse_head(&text[..split])?;
    let mut cosignatures = Vec::new();
    for line in text[split..].lines() {
        if cosignatures.len() == MAX_COSIGNATURES {
            return Err(malformed(&format!(
                "log head: more than {MAX_COSIGNATURES} cosignatures"
            )));
        }
        let c = Cosignature::parse_line(line)?;
        if cosignatures
            .iter()
            .any(|o: &Cosignature| o.witness == c.witness)
        {
            return Err(duplicate("log head", &c.witness));
        }
        cosignatures.push(c);
    }
    Ok((head, cosignatures))
}

/// The signed heads of a range of epochs and the append-only proof across it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnswer {
    /// The domain.
    pub domain: String,
    /// The directory's VRF public key (in every head).
    pub vrf_public_key: [u8; 32],
    /// The signed head of every epoch of the range, oldest first.
    pub heads: Vec<SignedHead>,
    /// akd's append-only proof from the first to the last epoch, in [`wire`]'s encoding;
    /// `None` for a range of one epoch.
    pub proof: Option<Vec<u8>>,
}

impl AuditAnswer {
    /// The answer's text.
    pub fn to_text(&self) -> Result<String> {
        let mut text = format!(
            "{AUDIT_CONTEXT}\ndomain {}\nvrf {}\n",
            self.domain,
            hex::encode(self.vrf_public_key)
        );
        text.push_str(&self.body_lines()?);
        Ok(text)
    }

    /// The `head` lines and the `proof` line.
    fn body_lines(&self) -> Result<String> {
        let mut text = String::new();
        for h in &self.heads {
            if h.head.domain != self.domain || h.head.vrf_public_key != self.vrf_public_key {
                return Err(malformed("audit answer: a head of another directory"));
            }
            text.push_str(&format!(
                "head {} {} {} {}\n",
                h.head.epoch,
                hex::encode(h.head.root_hash),
                h.head.signed_at,
                hex::encode(h.signature)
            ));
        }
        if let Some(p) = &self.proof {
            text.push_str(&format!("proof {}\n", B64.encode(p)));
        }
        Ok(text)
    }

    /// Parses an answer's text; strict and bounded. Nothing is verified.
    pub fn parse(text: &str) -> Result<AuditAnswer> {
        let bad = |what: &str| malformed(&format!("audit answer: {what}"));
        if text.len() > MAX_AUDIT_TEXT {
            return Err(bad(&format!("larger than {MAX_AUDIT_TEXT} bytes")));
        }
        let mut lines = text.lines().peekable();
        if lines.next() != Some(AUDIT_CONTEXT) {
            return Err(bad("not a kst log audit answer"));
        }
        let domain = lines
            .next()
            .and_then(|l| l.strip_prefix("domain "))
            .ok_or_else(|| bad("want the `domain` line"))?
            .to_string();
        let vrf_public_key = hex32(
            lines
                .next()
                .and_then(|l| l.strip_prefix("vrf "))
                .ok_or_else(|| bad("want the `vrf` line"))?,
        )?;
        Self::parse_body(domain, vrf_public_key, &mut lines)
    }

    /// Parses the `head` lines and the `proof` line up to the end of `lines`.
    fn parse_body<'a>(
        domain: String,
        vrf_public_key: [u8; 32],
        lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
    ) -> Result<AuditAnswer> {
        let bad = |what: &str| malformed(&format!("audit answer: {what}"));
        let mut heads = Vec::new();
        while let Some(fields) = lines.peek().and_then(|l| l.strip_prefix("head ")) {
            if heads.len() as u64 == MAX_AUDIT_EPOCHS {
                return Err(bad(&format!("more than {MAX_AUDIT_EPOCHS} heads")));
            }
            let f: Vec<&str> = fields.split(' ').collect();
            let [epoch, root, signed_at, signature] = f[..] else {
                return Err(bad("a `head` line wants epoch, root, signed-at, signature"));
            };
            let mut sig = [0u8; 64];
            hex::decode_to_slice(signature, &mut sig)
                .map_err(|_| bad("a head signature is not 128 hex digits"))?;
            heads.push(SignedHead {
                head: Head {
                    domain: domain.clone(),
                    epoch: epoch
                        .parse()
                        .map_err(|_| bad("a head epoch is no number"))?,
                    root_hash: hex32(root)?,
                    vrf_public_key,
                    signed_at: signed_at
                        .parse()
                        .map_err(|_| bad("a head's signed-at is no number"))?,
                },
                signature: sig,
            });
            lines.next();
        }
        let proof = match lines.next() {
            None => None,
            Some(l) => Some(
                B64.decode(
                    l.strip_prefix("proof ")
                        .ok_or_else(|| bad("want a `head` line, the `proof` line or the end"))?,
                )
                .map_err(|_| bad("the proof is not base64"))?,
            ),
        };
        if lines.next().is_some() {
            return Err(bad("trailing lines"));
        }
        Ok(AuditAnswer {
            domain,
            vrf_public_key,
            heads,
            proof,
        })
    }

    /// Checks that every head is signed by `head_key`, the heads are consecutive epochs, and
    /// the directory went from the first to the last only by appending. Returns the last
    /// head. Any failure is [`TransparencyError::Verification`] or
    /// [`TransparencyError::Signature`]: the log is not append-only, or not the one named.
    pub async fn verify(&self, head_key: &[u8; 32]) -> Result<&SignedHead> {
        let (Some(first), Some(last)) = (self.heads.first(), self.heads.last()) else {
            return Err(TransparencyError::Verification(
                "the audit answer holds no head".into(),
            ));
        };
        for (i, h) in self.heads.iter().enumerate() {
            if Some(h.head.epoch) != first.head.epoch.checked_add(i as u64) {
                return Err(TransparencyError::Verification(format!(
                    "{}: the audit answer's heads are not consecutive epochs from {}",
                    self.domain, first.head.epoch
                )));
            }
            h.verify(head_key)?;
        }
        match (&self.proof, self.heads.len()) {
            (None, 1) => Ok(last),
            (Some(bytes), n) if n > 1 => {
                let intermediate: Vec<[u8; 32]> = self.heads[1..n - 1]
                    .iter()
                    .map(|h| h.head.root_hash)
                    .collect();
                verify_append_only(
                    &first.head,
                    &last.head,
                    &intermediate,
                    wire::decode_audit(bytes)?,
                )
                .await?;
                Ok(last)
            }
            _ => Err(TransparencyError::Verification(format!(
                "{}: the audit answer's proof does not match its {} heads",
                self.domain,
                self.heads.len()
            ))),
        }
    }
}

/// What a lookup answer (`kst-log-answer-v2`, `lookup/<address>?witnessed=1`) adds for
/// clients that require witnesses: the newest cosignature of each of the log's witnesses
/// (those of `[transparency] witnesses` that cosigned), and the heads and the append-only
/// proof from the oldest of the cosigned epochs to the answer's epoch, so a fresh epoch need
/// not wait for the witnesses. Lines, after the answer's proof:
///
/// ```text
/// cosigned <epoch> <witness, 64 hex> <checked-at> <signature, 128 hex>   (one per witness)
/// head <epoch> <root> <signed-at> <signature>    (every epoch from the oldest cosigned one to the answer's)
/// proof <base64 of the append-only proof>          (absent when they are the same epoch)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witnessed {
    /// Each witness's newest cosignature, with the epoch of the head it cosigned.
    pub cosignatures: Vec<(u64, Cosignature)>,
    /// The heads from the oldest cosigned epoch to the answer's, and the proof across them.
    pub audit: AuditAnswer,
}

/// The witnesses a client requires (`kst client retrieve --witness`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessPolicy {
    /// (name, key) of each witness the client trusts.
    pub witnesses: Vec<(String, [u8; 32])>,
    /// How many of them must have cosigned (1 to `witnesses.len()`).
    pub threshold: usize,
    /// The oldest acceptable cosignature, seconds since the Unix epoch.
    pub not_before: u64,
}

impl Witnessed {
    /// The lines this adds to an answer.
    pub fn to_lines(&self) -> Result<String> {
        let mut text = String::new();
        for (epoch, c) in &self.cosignatures {
            let line = c.to_line();
            let rest = line.strip_prefix("cosignature ").unwrap_or(&line);
            text.push_str(&format!("cosigned {epoch} {rest}\n"));
        }
        text.push_str(&self.audit.body_lines()?);
        Ok(text)
    }

    /// Parses the lines of [`Witnessed::to_lines`] up to the end of `lines`, for the answer
    /// whose head is `head`; strict and bounded; two `cosigned` lines of one witness are
    /// refused (red-team round 5: [`Witnessed::verify`] read the first, the client's restart
    /// check any). Nothing is verified.
    pub fn parse_lines<'a>(
        head: &SignedHead,
        lines: impl Iterator<Item = &'a str>,
    ) -> Result<Witnessed> {
        let mut lines = lines.peekable();
        let mut cosignatures = Vec::new();
        while let Some(rest) = lines.peek().and_then(|l| l.strip_prefix("cosigned ")) {
            if cosignatures.len() == MAX_COSIGNATURES {
                return Err(malformed(&format!(
                    "log answer: more than {MAX_COSIGNATURES} cosignatures"
                )));
            }
            let (epoch, c) = rest
                .split_once(' ')
                .ok_or_else(|| malformed("log answer: a `cosigned` line is short"))?;
            let epoch = epoch
                .parse()
                .map_err(|_| malformed("log answer: a cosigned epoch is no number"))?;
            let c = Cosignature::parse_line(&format!("cosignature {c}"))?;
            if cosignatures
                .iter()
                .any(|(_, o): &(u64, Cosignature)| o.witness == c.witness)
            {
                return Err(duplicate("log answer", &c.witness));
            }
            cosignatures.push((epoch, c));
            lines.next();
        }
        let audit = AuditAnswer::parse_body(
            head.head.domain.clone(),
            head.head.vrf_public_key,
            &mut lines,
        )?;
        Ok(Witnessed {
            cosignatures,
            audit,
        })
    }

    /// Checks that `head` (the answer's head, signature already checked against `head_key`)
    /// is cosigned as `policy` requires: the heads from each cosigned epoch to `head`'s are
    /// signed by `head_key` and append-only, and at least `policy.threshold` of
    /// `policy.witnesses` cosigned one of them no earlier than `policy.not_before`. Returns
    /// the names of the witnesses that did. Any failure is
    /// [`TransparencyError::Verification`] or [`TransparencyError::Signature`].
    pub async fn verify(
        &self,
        head: &SignedHead,
        head_key: &[u8; 32],
        policy: &WitnessPolicy,
    ) -> Result<Vec<String>> {
        let last = self.audit.verify(head_key).await?;
        if last != head {
            return Err(TransparencyError::Verification(format!(
                "{}: the witnessed heads lead to epoch {}, not to the answer's epoch {}",
                head.head.domain, last.head.epoch, head.head.epoch
            )));
        }
        let first = self.audit.heads[0].head.epoch;
        let mut confirmed = Vec::new();
        let mut confirmed_keys: Vec<&[u8; 32]> = Vec::new();
        let mut problems = Vec::new();
        for (name, key) in &policy.witnesses {
            // A witness listed twice counts once towards the threshold.
            if confirmed_keys.contains(&key) {
                continue;
            }
            let Some((epoch, c)) = self.cosignatures.iter().find(|(_, c)| &c.witness == key) else {
                problems.push(format!("{name} has no cosignature in the answer"));
                continue;
            };
            let Some(cosigned) = epoch
                .checked_sub(first)
                .and_then(|i| self.audit.heads.get(usize::try_from(i).ok()?))
            else {
                problems.push(format!(
                    "{name}'s cosignature is of epoch {epoch}, outside the answer's heads"
                ));
                continue;
            };
            if let Err(e) = c.verify(cosigned) {
                problems.push(format!("{name}: {e}"));
                continue;
            }
            if c.checked_at < policy.not_before {
                problems.push(format!(
                    "{name}'s newest cosignature (epoch {epoch}) was made at {}, older than allowed",
                    c.checked_at
                ));
                continue;
            }
            confirmed.push(name.clone());
            confirmed_keys.push(key);
        }
        if confirmed.len() < policy.threshold.max(1) {
            return Err(TransparencyError::Verification(format!(
                "{}: {} of the required {} witness(es) cosigned the directory ({})",
                head.head.domain,
                confirmed.len(),
                policy.threshold.max(1),
                problems.join("; ")
            )));
        }
        Ok(confirmed)
    }
}

/// One `NAME:HEX` witness entry (`[transparency] witnesses`, `kst client retrieve
/// --witness`): a name of 1 to 64 printable characters without `:` or spaces, and the
/// witness's Ed25519 public key in 64 hex digits. Says what is wrong.
pub fn parse_witness(entry: &str) -> Result<(String, [u8; 32])> {
    let bad = |what: &str| TransparencyError::Malformed(format!("witness {entry:?}: {what}"));
    let (name, key) = entry
        .rsplit_once(':')
        .ok_or_else(|| bad("want NAME:HEX (HEX: the witness's key, 64 hex digits)"))?;
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    {
        return Err(bad(
            "the name must be 1 to 64 printable characters without ':' or spaces",
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(key, &mut out).map_err(|_| bad("the key must be 64 hex digits"))?;
    Ok((name.to_string(), out))
}

/// Whether `new` may follow `old` (heads of one directory the caller accepted): a later
/// epoch, or the same epoch with the same root. Two roots for one epoch, or an epoch going
/// backwards, is a fork: [`TransparencyError::Verification`].
pub fn check_follows(old: &Head, new: &Head) -> Result<()> {
    if old.domain != new.domain || old.vrf_public_key != new.vrf_public_key {
        return Err(TransparencyError::Verification(format!(
            "the heads of epochs {} and {} belong to different directories",
            old.epoch, new.epoch
        )));
    }
    if new.epoch < old.epoch {
        return Err(TransparencyError::Verification(format!(
            "{}: the log went back from epoch {} to {} (a fork or a rollback)",
            new.domain, old.epoch, new.epoch
        )));
    }
    if new.epoch == old.epoch && new.root_hash != old.root_hash {
        return Err(TransparencyError::Verification(format!(
            "{}: two different roots for epoch {} ({} and {}): a fork",
            new.domain,
            new.epoch,
            hex::encode(old.root_hash),
            hex::encode(new.root_hash)
        )));
    }
    Ok(())
}
