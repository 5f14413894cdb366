//! The server's check of its own answers: before a look-up or absence proof is served (HTTP
//! `/lookup`, a version 3 reply), it is verified against the answer's own head exactly as a
//! client verifies it ([`super::verify`], akd's `lookup_verify`), from the encoded bytes the
//! client gets; so is the append-only part such an answer carries (`?since=`,
//! `KST-Log-Since`: from the stored head of its first epoch, the head the client remembers),
//! and every history answer and page of older versions (`/history`, as the owner's monitor
//! verifies them). An answer that does not verify was built from reads that do not belong to
//! one epoch (a race the directory's reads did not detect) or from a store altered behind
//! kst's back: the log builds it again from fresh reads, a bounded number of times, and then
//! fails temporarily ([`super::log`]), so no client is ever handed a proof it calls an attack.

use super::answer::{AnswerProof, LogAnswer};
use super::head::Head;
use super::history::{HistoryAnswer, HistoryPage};
use super::verify::{verify_absence, verify_lookup};
use super::{Result, TransparencyError, wire};
use crate::Address;

/// How often one request's answer is built again after it failed [`check`] before the
/// request fails (temporarily): a race clears on the next fresh read, damage does not.
pub const ATTEMPTS: u64 = 4;

/// Verifies `answer`'s look-up or absence proof for `address` against the answer's own head
/// (the head's signature is the log's own, checked when it was stored or read): `Ok` when a
/// client accepts the proof, else the verifier's error
/// ([`super::TransparencyError::Verification`]).
pub async fn check(answer: &LogAnswer, address: &Address) -> Result<()> {
    let head = &answer.head.head;
    match &answer.proof {
        AnswerProof::Present(bytes) => {
            verify_lookup(head, address, wire::decode_lookup(bytes)?).map(|_| ())
        }
        AnswerProof::Absent(bytes) => {
            verify_absence(head, address, &wire::decode_absence(bytes)?).await
        }
    }
}

/// Verifies the append-only part of `answer` (`?since=`, `KST-Log-Since`) as a client that
/// remembers `remembered` (the stored head of the part's first epoch) verifies it: a step of
/// a catch-up ([`LogAnswer::verify_step`], its head signed by `head_key`), else the proof up
/// to the answer's own head ([`LogAnswer::verify_extends`]). `Ok` when the answer carries
/// none.
pub async fn check_append_only(
    answer: &LogAnswer,
    head_key: &[u8; 32],
    remembered: &Head,
) -> Result<()> {
    let Some(part) = &answer.append_only else {
        return Ok(());
    };
    if part.step.is_none() {
        return answer.verify_extends(remembered).await;
    }
    match answer.verify_step(head_key, remembered).await? {
        Some(_) => Ok(()),
        None => Err(TransparencyError::Verification(
            "the append-only step was not checked".into(),
        )),
    }
}

/// Verifies a history answer of `address` as the owner's monitor does
/// ([`HistoryAnswer::verify`]: the head's signature with `head_key`, its domain, akd's
/// `key_history_verify` with kst's bound).
pub fn check_history(answer: &HistoryAnswer, head_key: &[u8; 32], address: &Address) -> Result<()> {
    answer.verify(head_key, address).map(|_| ())
}

/// Verifies a page of older versions of `address` as the owner's monitor does
/// ([`HistoryPage::verify`]: exactly the versions below its `before`, each version's update
/// proof), but for the epoch of version `before`, which only the page above it tells the
/// client (the page's versions must be older than it): every epoch up to the head's is
/// taken.
pub async fn check_page(page: &HistoryPage, head_key: &[u8; 32], address: &Address) -> Result<()> {
    page.verify(head_key, address, page.before, u64::MAX)
        .await
        .map(|_| ())
}
