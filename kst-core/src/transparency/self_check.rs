//! The server's check of its own answers: before a look-up or absence proof is served (HTTP
//! `/lookup`, a version 3 reply), it is verified against the answer's own head exactly as a
//! client verifies it ([`super::verify`], akd's `lookup_verify`), from the encoded bytes the
//! client gets. An answer that does not verify was built from reads that do not belong to
//! one epoch (a race the directory's reads did not detect) or from a store altered behind
//! kst's back: the log builds it again from fresh reads, a bounded number of times, and then
//! fails temporarily ([`super::log`]), so no client is ever handed a proof it calls an attack.

use super::answer::{AnswerProof, LogAnswer};
use super::verify::{verify_absence, verify_lookup};
use super::{Result, wire};
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
