//! The server's check of its own answers: before a look-up or absence proof is served (HTTP
//! `/lookup`, a version 3 reply), it is verified against the answer's own head exactly as a
//! client verifies it ([`super::verify`], akd's `lookup_verify`), from the encoded bytes the
//! client gets; so is the append-only part such an answer carries (`?since=`,
//! `KST-Log-Since`: from the stored head of its first epoch, the head the client remembers),
//! and every history answer and page of older versions (`/history`, as the owner's monitor
//! verifies them), and every audit answer (`/audit`, the witnesses' part of an answer: as a
//! witness or auditor verifies it, [`check_audit`]). An answer that does not verify was built
//! from reads that do not belong to one epoch (a race the directory's reads did not detect)
//! or from a store altered behind kst's back: the log builds it again from fresh reads, a
//! bounded number of times, and then fails temporarily ([`super::log`]), so no client,
//! witness or auditor is ever handed a proof it calls an attack.
//!
//! The checks of append-only proofs (audits, the append-only part of an answer) are the
//! expensive ones (a tree built in memory twice a step, as large as the proof): they run on
//! a blocking thread of the caller's runtime ([`off_thread`]), not on the directory's thread,
//! which answers every other request of the domain and records its changes meanwhile.

use super::answer::{AnswerProof, LogAnswer};
use super::head::Head;
use super::history::{HistoryAnswer, HistoryPage};
use super::verify::{verify_absence, verify_append_only_roots, verify_lookup};
use super::witness::AuditAnswer;
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

/// [`check_append_only`] for an answer whose first epoch has no stored head (a store that
/// lost heads, an epoch whose writer died between its commit and its head: "Heads signed
/// late" in docs/TRANSPARENCY.md), from the root the proof itself starts at
/// ([`super::verify::append_only_start_root`]): every step must lead to the next and the
/// last to the head the part ends at, so an answer built from reads across another process's
/// commits, or ending at a stored head that names another root than the directory's, is
/// still caught. What is not checked is that the client's remembered head of that epoch names
/// that root; the log keeps no record of it to check against, and a client whose head names
/// another root than the directory's tree gives that epoch is shown a real inconsistency of
/// the log (a head it signed that its tree does not lead through), which it must report. So
/// such an answer is served without signing a head late for it first: that needed an
/// append-only proof of its own over the epoch, built and verified for an anonymous request,
/// and was refused outright when that proof was over the bound of heads signed late.
pub async fn check_append_only_unanchored(answer: &LogAnswer, head_key: &[u8; 32]) -> Result<()> {
    let Some(part) = &answer.append_only else {
        return Ok(());
    };
    let proof = wire::decode_audit(&part.proof)?;
    let root_hash = super::verify::append_only_start_root(&proof).await?;
    let head = &answer.head.head;
    let start = Head {
        domain: head.domain.clone(),
        epoch: part.from,
        root_hash,
        vrf_public_key: head.vrf_public_key,
        signed_at: 0,
    };
    check_append_only(answer, head_key, &start).await
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

/// Verifies an audit answer as a witness or auditor does ([`AuditAnswer::verify`]) but for
/// the heads' signatures (the log's own, checked when each head was stored or read): the
/// heads are consecutive epochs, one head and no proof or several and akd's append-only
/// proof over their roots (the predicate of akd's `audit_verify`, checked step by step on
/// the calling thread: [`verify_append_only_roots`], which spawns no task).
pub async fn check_audit(answer: &AuditAnswer) -> Result<()> {
    let (Some(first), Some(last)) = (answer.heads.first(), answer.heads.last()) else {
        return Err(TransparencyError::Verification(
            "the audit answer holds no head".into(),
        ));
    };
    for (i, h) in answer.heads.iter().enumerate() {
        if Some(h.head.epoch) != first.head.epoch.checked_add(i as u64) {
            return Err(TransparencyError::Verification(format!(
                "{}: the audit answer's heads are not consecutive epochs from {}",
                answer.domain, first.head.epoch
            )));
        }
    }
    match (&answer.proof, answer.heads.len()) {
        (None, 1) => Ok(()),
        (Some(bytes), n) if n > 1 => {
            // akd's `audit_verify` (what `verify_append_only` calls) builds its trees with
            // akd's default parallelism: it spawns half of them onto the runtime, whose
            // workers `off_thread` is there to keep free (review R3). The same predicate,
            // each step's tree built on this thread (`verify_append_only_roots`: parallelism
            // off), and every root the proof leads through compared with its head's.
            let roots =
                verify_append_only_roots(&first.head, &last.head, wire::decode_audit(bytes)?)
                    .await?;
            let heads = answer.heads[1..]
                .iter()
                .map(|h| (h.head.epoch, h.head.root_hash));
            match roots.iter().copied().zip(heads).find(|(r, h)| r != h) {
                None if roots.len() == n - 1 => Ok(()),
                None => Err(TransparencyError::Verification(format!(
                    "{}: the audit answer's proof leads through {} epochs, not {}",
                    answer.domain,
                    roots.len(),
                    n - 1
                ))),
                Some(((epoch, root), _)) => Err(TransparencyError::Verification(format!(
                    "{}: the audit answer's proof leads to root {} at epoch {epoch}, not to \
                     the root its head of that epoch names",
                    answer.domain,
                    hex::encode(root)
                ))),
            }
        }
        _ => Err(TransparencyError::Verification(format!(
            "{}: the audit answer's proof does not match its {} heads",
            answer.domain,
            answer.heads.len()
        ))),
    }
}

/// What a check started within [`holding`] keeps until it ends: the caller's turn among
/// the expensive requests (kst-bin's `log_http`), or anything else to be given back only
/// once the check's CPU is spent.
pub type Held = std::sync::Arc<dyn std::any::Any + Send + Sync>;

tokio::task_local! {
    /// The [`Held`] of the request being served ([`holding`]).
    static HELD: Held;
}

/// Runs `work`; every check it starts off its thread ([`off_thread`]) keeps a clone of
/// `held` until the check ends, also when `work` is dropped first (its client went away: a
/// blocking thread cannot be stopped, its check runs to the end). So a turn given here is
/// given back when the last of the request and its checks ends, and a client that closes
/// its connections does not get more checks running at once than it has turns (review R2:
/// the turn went back on the disconnect and the checks ran on beyond the bound).
pub async fn holding<F: std::future::Future>(held: Held, work: F) -> F::Output {
    HELD.scope(held, work).await
}

/// Runs `check` on a blocking thread of the current Tokio runtime and waits for it: the
/// check of an append-only proof is seconds of CPU for a large one (docs/BENCHMARKS.md,
/// "The server's check of its own answers"), which would otherwise hold the thread it runs
/// on (the directory's, or one of the runtime's workers). `check` gets the runtime's handle
/// to run akd's (non-`Send`) verification futures on (`Handle::block_on`; they need no I/O
/// and no timer, and spawn no task: the checks build their trees with akd's parallelism
/// off, so the runtime's workers are left alone). Within [`holding`], the check keeps what
/// it holds until it ends. A check that panicked or was cancelled is
/// [`TransparencyError::Directory`].
pub async fn off_thread<T: Send + 'static>(
    check: impl FnOnce(&tokio::runtime::Handle) -> T + Send + 'static,
) -> Result<T> {
    let held = HELD.try_with(std::sync::Arc::clone).ok();
    tokio::task::spawn_blocking(move || {
        let out = check(&tokio::runtime::Handle::current());
        drop(held);
        out
    })
    .await
    .map_err(|e| TransparencyError::Directory(format!("the check of an answer stopped: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// Review R2: a check started off the thread within [`holding`] keeps the turn it was
    /// given after its request is dropped (the client went away), and gives it back when
    /// it ends; without [`holding`], or on the old code, the turn went back with the
    /// request while the check ran on.
    #[tokio::test]
    async fn a_check_keeps_its_turn_until_it_ends_not_until_its_request_goes() {
        let turns = Arc::new(Semaphore::new(1));
        let turn = Arc::clone(&turns).try_acquire_owned().unwrap();
        let (started, has_started) = tokio::sync::oneshot::channel();
        let (finish, may_finish) = std::sync::mpsc::channel::<()>();
        let request = tokio::spawn(holding(Arc::new(turn), async move {
            off_thread(move |_| {
                let _ = started.send(());
                let _ = may_finish.recv();
            })
            .await
        }));
        has_started.await.unwrap();
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        assert_eq!(
            turns.available_permits(),
            0,
            "the request is gone, its check runs on and keeps the turn"
        );
        finish.send(()).unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), turns.acquire()).await;
        assert!(back.is_ok(), "the turn is given back when the check ends");
    }
}
