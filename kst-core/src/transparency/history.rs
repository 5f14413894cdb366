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
//!
//! Older versions come in pages (`.../history/<address>?before=<version>`, [`HistoryPage`]):
//! the [`MAX_VERSIONS`] versions below `before` (down to version 1), each with akd's update
//! proof against the signed head of the latest epoch:
//!
//! ```text
//! kst-log-history-page-v1
//! domain example.net
//! ... (the head's lines, as above)
//! signature <128 hex>
//! before <version>
//! history <base64 of akd's HistoryProof: the update proofs only>
//! ```
//!
//! A client follows pages from the oldest version of the newest page down to version 1, at
//! most [`MAX_PAGES`] of them, every page against the same head as the newest page; since
//! versions are numbered 1, 2, ... without gaps, and each page must hold exactly the versions
//! asked for, no version can be left out.

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

/// First line of a page of older versions.
pub const HISTORY_PAGE_CONTEXT: &str = "kst-log-history-page-v1";
/// The most pages of older versions a client follows after the newest page: with it, at
/// most `MAX_VERSIONS * (1 + MAX_PAGES)` versions of one address are checked.
pub const MAX_PAGES: usize = 32;

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
        let (head, _, proof) = parse_text(text, HISTORY_CONTEXT, None)?;
        Ok(HistoryAnswer { head, proof })
    }

    /// Whether the address's newest version in this answer is a deletion (or does not decode):
    /// the server's limits count such a history as a miss, like a look-up of a deleted address
    /// (docs/SECURITY.md). No proof is checked (the caller built it).
    pub fn finds_no_key(&self) -> bool {
        wire::decode_history(&self.proof)
            .ok()
            .and_then(|p| p.update_proofs.into_iter().max_by_key(|u| u.version))
            .and_then(|u| DirectoryEntry::from_value(&u.value).ok())
            .is_none_or(|e| e.state == super::entry::EntryState::Deleted)
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

/// Parses `context`, the head's lines, a line starting with `extra` (when given) and the
/// `history <base64>` line: the head, the rest of the extra line, the proof. Strict, bounded.
fn parse_text<'a>(
    text: &'a str,
    context: &str,
    extra: Option<&str>,
) -> Result<(SignedHead, Option<&'a str>, Vec<u8>)> {
    let malformed = |why: &str| TransparencyError::Malformed(format!("{context}: {why}"));
    if text.len() > MAX_HISTORY_ANSWER {
        return Err(malformed("too large"));
    }
    let mut lines = text.lines();
    if lines.next() != Some(context) {
        return Err(malformed("not this kind of kst log answer"));
    }
    let head = read_head(&mut lines)?;
    let extra = match extra {
        Some(prefix) => Some(
            lines
                .next()
                .and_then(|l| l.strip_prefix(prefix))
                .ok_or_else(|| malformed(&format!("no `{}` line", prefix.trim())))?,
        ),
        None => None,
    };
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
    Ok((head, extra, proof))
}

/// A page of older versions of one address: the [`MAX_VERSIONS`] versions below `before`
/// (down to version 1), with akd's update proofs against a signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The head of the epoch the proofs are against (the latest when the page was built).
    pub head: SignedHead,
    /// The page holds the versions below this one.
    pub before: u64,
    /// akd's history proof holding the update proofs only, in [`wire`]'s encoding.
    pub proof: Vec<u8>,
}

/// A page of older versions as the server's directory answers it: the [`HistoryPage`] it
/// serves, and what the server's limits need that the page does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAnswer {
    /// The page served.
    pub page: HistoryPage,
    /// Whether the address's newest version (above the page, or its first) holds no key: a
    /// deletion, or a value that is no kst entry.
    pub newest_finds_no_key: bool,
}

impl PageAnswer {
    /// Whether the page is of an address whose newest version is a deletion (or does not
    /// decode): the server's limits count such a page as a miss, like the look-up and the
    /// newest history of that address ([`HistoryAnswer::finds_no_key`]). A page holds only
    /// older versions, whose values are still the keys a deleted address once had, so the
    /// page alone cannot tell; the directory that built it read the newest version.
    pub fn finds_no_key(&self) -> bool {
        self.newest_finds_no_key
    }
}

impl HistoryPage {
    /// The versions a page below `before` holds, newest first.
    pub fn versions_below(before: u64) -> std::ops::RangeInclusive<u64> {
        before.saturating_sub(MAX_VERSIONS as u64).max(1)..=before.saturating_sub(1)
    }

    /// The page's text.
    pub fn to_text(&self) -> Result<String> {
        Ok(format!(
            "{HISTORY_PAGE_CONTEXT}\n{}before {}\nhistory {}\n",
            head_lines(&self.head)?,
            self.before,
            B64.encode(&self.proof)
        ))
    }

    /// Parses a page's text; strict, bounded.
    pub fn parse(text: &str) -> Result<HistoryPage> {
        let (head, before, proof) = parse_text(text, HISTORY_PAGE_CONTEXT, Some("before "))?;
        let before = before
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| TransparencyError::Malformed("history page: no before line".into()))?;
        Ok(HistoryPage {
            head,
            before,
            proof,
        })
    }

    /// Checks the head's signature with `head_key`, that it names `address`'s domain, that the
    /// page holds exactly the versions below `before` ([`HistoryPage::versions_below`]) in
    /// epochs that go down with the versions, all before `before_epoch` (the epoch of version
    /// `before`, from the page above), and every version's update proof
    /// ([`super::verify::verify_update`]); returns the versions, newest first. Any failure is
    /// an attack ([`TransparencyError::Verification`] or [`TransparencyError::Signature`]).
    pub async fn verify(
        &self,
        head_key: &[u8; 32],
        address: &Address,
        before: u64,
        before_epoch: u64,
    ) -> Result<Vec<HistoryVersion>> {
        self.head.verify(head_key)?;
        let head = &self.head.head;
        let fail = |what: String| {
            TransparencyError::Verification(format!(
                "the history of {address} below version {before} at {} epoch {}: {what}",
                head.domain, head.epoch
            ))
        };
        if head.domain != address.domain() {
            return Err(fail(format!("the head is about {}", head.domain)));
        }
        if self.before != before || before < 2 {
            return Err(fail(format!("the page is below version {}", self.before)));
        }
        let proof = wire::decode_history(&self.proof)?;
        if !proof.past_marker_vrf_proofs.is_empty()
            || !proof.existence_of_past_marker_proofs.is_empty()
            || !proof.future_marker_vrf_proofs.is_empty()
            || !proof.non_existence_of_future_marker_proofs.is_empty()
        {
            return Err(fail("a page holds update proofs only".into()));
        }
        let wanted: Vec<u64> = Self::versions_below(before).rev().collect();
        let got: Vec<u64> = proof.update_proofs.iter().map(|u| u.version).collect();
        if got != wanted {
            return Err(fail(format!(
                "the page holds versions {:?}, not {:?}",
                got.first()..=got.last(),
                wanted.first()..=wanted.last()
            )));
        }
        let mut newer_epoch = before_epoch.min(head.epoch.saturating_add(1));
        let mut out = Vec::with_capacity(proof.update_proofs.len());
        for update in &proof.update_proofs {
            if update.epoch >= newer_epoch {
                return Err(fail(format!(
                    "version {} is dated epoch {}, not before the version after it",
                    update.version, update.epoch
                )));
            }
            newer_epoch = update.epoch;
            super::verify::verify_update(head, address, update).await?;
            let entry = if update.value.0 == akd::TOMBSTONE {
                None
            } else {
                Some(DirectoryEntry::from_value(&update.value).map_err(|e| {
                    fail(format!(
                        "version {} holds no kst entry: {e}",
                        update.version
                    ))
                })?)
            };
            out.push(HistoryVersion {
                epoch: update.epoch,
                akd_version: update.version,
                entry,
            });
        }
        Ok(out)
    }
}
