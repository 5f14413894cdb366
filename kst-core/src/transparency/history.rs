//! The owner's view of the directory: every version recorded for one address, with akd's
//! history proof against a signed head (`GET /.well-known/kst/log/<domain>/history/<address>`).
//!
//! ```text
//! kst-log-history-v1
//! domain example.net
//! epoch 7
//! root <64 hex>
//! vrf <64 hex>
//! signed-at 1764790000
//! signature <128 hex>
//! history <base64 of akd's HistoryProof>
//! ```
//!
//! The proof holds at most [`MAX_VERSIONS`] versions, newest first (akd's
//! `HistoryParams::MostRecent`); the verifier checks the same bound, so a server cannot leave
//! out versions between the newest and the oldest it sends, nor hide that older ones exist.

use akd::{HistoryParams, HistoryVerificationParams};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::answer::{head_lines, read_head};
use super::entry::DirectoryEntry;
use super::head::SignedHead;
use super::label::directory_label;
use super::{Config, Result, TransparencyError, wire};
use crate::Address;

/// First line of a history answer.
pub const HISTORY_CONTEXT: &str = "kst-log-history-v1";
/// The most versions of one address a history answer proves (the newest ones).
pub const MAX_VERSIONS: usize = 64;
/// Largest history answer text accepted.
pub const MAX_HISTORY_ANSWER: usize = wire::MAX_HISTORY_PROOF * 4 / 3 + 4096;

/// akd's history parameters of kst's history answers.
pub fn history_params() -> HistoryParams {
    HistoryParams::MostRecent(MAX_VERSIONS)
}

/// A signed head and the history proof for one address against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryAnswer {
    /// The head of the epoch the proof is against.
    pub head: SignedHead,
    /// akd's history proof, in [`wire`]'s encoding.
    pub proof: Vec<u8>,
}

/// One version of an address, as the directory recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryVersion {
    /// The epoch the version was published in.
    pub epoch: u64,
    /// akd's version number of the address (1, 2, ...).
    pub akd_version: u64,
    /// What the version commits to; `None` when the value was withdrawn (a deletion drops the
    /// values of earlier versions; their positions stay provable).
    pub entry: Option<DirectoryEntry>,
}

impl HistoryAnswer {
    /// The answer's text.
    pub fn to_text(&self) -> Result<String> {
        Ok(format!(
            "{HISTORY_CONTEXT}\n{}history {}\n",
            head_lines(&self.head)?,
            B64.encode(&self.proof)
        ))
    }

    /// Parses an answer's text; strict, bounded.
    pub fn parse(text: &str) -> Result<HistoryAnswer> {
        let malformed = |why: &str| TransparencyError::Malformed(format!("history answer: {why}"));
        if text.len() > MAX_HISTORY_ANSWER {
            return Err(malformed("too large"));
        }
        let mut lines = text.lines();
        if lines.next() != Some(HISTORY_CONTEXT) {
            return Err(malformed("not a kst log history answer"));
        }
        let head = read_head(&mut lines)?;
        let proof = lines
            .next()
            .and_then(|l| l.strip_prefix("history "))
            .ok_or_else(|| malformed("no history line"))?;
        let proof = B64
            .decode(proof)
            .map_err(|_| malformed("the proof is not base64"))?;
        if lines.next().is_some() {
            return Err(malformed("trailing lines"));
        }
        Ok(HistoryAnswer { head, proof })
    }

    /// Checks the head's signature with `head_key`, that it names `address`'s domain, and the
    /// history proof; returns the versions, newest first. Any failure is an attack
    /// ([`TransparencyError::Verification`] or [`TransparencyError::Signature`]).
    pub fn verify(&self, head_key: &[u8; 32], address: &Address) -> Result<Vec<HistoryVersion>> {
        self.head.verify(head_key)?;
        let head = &self.head.head;
        let fail = |what: String| {
            TransparencyError::Verification(format!(
                "the history of {address} at {} epoch {}: {what}",
                head.domain, head.epoch
            ))
        };
        if head.domain != address.domain() {
            return Err(fail(format!("the head is about {}", head.domain)));
        }
        let proof = wire::decode_history(&self.proof)?;
        let results = akd::client::key_history_verify::<Config>(
            &head.vrf_public_key,
            head.root_hash,
            head.epoch,
            directory_label(address),
            proof,
            HistoryVerificationParams::AllowMissingValues {
                history_params: history_params(),
            },
        )
        .map_err(|e| fail(e.to_string()))?;
        results
            .into_iter()
            .map(|r| {
                let entry = if r.value.0 == akd::TOMBSTONE {
                    None
                } else {
                    Some(DirectoryEntry::from_value(&r.value).map_err(|e| {
                        fail(format!("version {} holds no kst entry: {e}", r.version))
                    })?)
                };
                Ok(HistoryVersion {
                    epoch: r.epoch,
                    akd_version: r.version,
                    entry,
                })
            })
            .collect()
    }
}
