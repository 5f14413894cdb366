//! The bound on the append-only work of version 3 replies (`KST-Log-Since`): how many
//! replies' append-only proofs are built and checked at once per process, and how many of
//! them one sender holds.
//!
//! A reply's append-only proof is built on its domain's directory thread (serialised with
//! every publication's epoch) and checked on a blocking thread beside it: up to 1 MiB of proof,
//! about 0.1 s of the directory's thread and more CPU beside it (docs/BENCHMARKS.md, "The
//! append-only checks off the directory's thread"). Mail comes from anyone, under as many
//! sender addresses as an outsider likes (the per-sender rate limits do not stop that), so
//! without a bound a flood of `KST-Log-Since: 1` requests held the directory's thread that
//! publications need. The HTTP endpoint bounds the same work with turns and answers 503 when
//! none comes; mail is never deferred for it (a 4xx makes the MTA deliver the message again,
//! counted again, red team of the first attempt): a reply that finds no turn free is sent at
//! once without the append-only part, as a reply too large for the part is, and its client
//! catches up over HTTP (`?since=`, under the HTTP turns) or asks again later
//! (docs/PROTOCOL.md, "Versions").
//!
//! Turns are only tried, never waited for: a reply is never held back by another's proof.
//! A reply with nothing to prove (no `KST-Log-Since`, or one not older than the directory's
//! latest epoch) takes none ([`super::store::TransparentStore`] decides).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::reply::MailProofStats;

/// Replies' append-only proofs built and checked at once per process: two, a sliver of the
/// directory's thread beside the publications' epochs, and at most two blocking threads'
/// checks (tests set another bound: `TransparentStore::with_mail_proofs_at_once`).
pub const MAIL_PROOFS_AT_ONCE: usize = 2;

/// Of those turns, the most one sender holds at once (its further requests meanwhile are
/// answered without the part): one sender alone cannot hold every turn.
pub const MAIL_PROOFS_PER_SENDER: usize = 1;

/// The turns of the replies' append-only work, and what became of the replies that asked.
#[derive(Debug)]
pub struct MailProofs {
    at_once: usize,
    per_sender: usize,
    held: Mutex<Held>,
    peak: AtomicU64,
    taken: AtomicU64,
    omitted: AtomicU64,
}

/// The turns held now: in all, and per sender (a sender's entry goes with its last turn).
#[derive(Debug, Default)]
struct Held {
    total: usize,
    senders: HashMap<String, usize>,
}

impl Default for MailProofs {
    fn default() -> Self {
        MailProofs::new(MAIL_PROOFS_AT_ONCE, MAIL_PROOFS_PER_SENDER)
    }
}

impl MailProofs {
    /// `at_once` turns in all (at least 1), at most `per_sender` (at least 1) of them one
    /// sender's.
    pub fn new(at_once: usize, per_sender: usize) -> MailProofs {
        MailProofs {
            at_once: at_once.max(1),
            per_sender: per_sender.max(1),
            held: Mutex::default(),
            peak: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            omitted: AtomicU64::new(0),
        }
    }

    /// The turns in all.
    pub fn at_once(&self) -> usize {
        self.at_once
    }

    /// A turn for `sender` (the reply's recipient, folded), if one is free now: fewer than
    /// [`MailProofs::at_once`] held in all and fewer than the share held by `sender`. The
    /// turn is given back when the [`MailTurn`] is dropped.
    pub fn try_take(self: &Arc<Self>, sender: &str) -> Option<MailTurn> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.senders.get(sender).copied().unwrap_or(0);
        if held.total >= self.at_once || mine >= self.per_sender {
            return None;
        }
        held.total += 1;
        held.senders.insert(sender.to_string(), mine + 1);
        self.peak.fetch_max(held.total as u64, Ordering::SeqCst);
        self.taken.fetch_add(1, Ordering::SeqCst);
        Some(MailTurn {
            proofs: Arc::clone(self),
            sender: sender.to_string(),
        })
    }

    /// Counts a reply sent without the append-only part it asked for, for want of a turn.
    pub fn omitted(&self) {
        self.omitted.fetch_add(1, Ordering::SeqCst);
    }

    /// What the turns did so far.
    pub fn stats(&self) -> MailProofStats {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        MailProofStats {
            in_flight: held.total as u64,
            peak: self.peak.load(Ordering::SeqCst),
            taken: self.taken.load(Ordering::SeqCst),
            omitted_busy: self.omitted.load(Ordering::SeqCst),
        }
    }
}

/// One reply's turn: held while its append-only proof is built and checked (kept by the
/// check's blocking thread until it ends, [`super::self_check::holding`]).
#[derive(Debug)]
pub struct MailTurn {
    proofs: Arc<MailProofs>,
    sender: String,
}

impl Drop for MailTurn {
    fn drop(&mut self) {
        let mut held = self
            .proofs
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        match held.senders.get_mut(&self.sender) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                held.senders.remove(&self.sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound in all and the sender's share: a sender holding its share gets no second
    /// turn while another sender still gets one; no turn past the bound; a turn dropped is
    /// free again, and the map forgets a sender without turns.
    #[test]
    fn turns_are_bounded_in_all_and_per_sender() {
        let proofs = Arc::new(MailProofs::new(2, 1));
        let a = proofs.try_take("a@example.org").expect("a free turn");
        assert!(
            proofs.try_take("a@example.org").is_none(),
            "one sender holds its share"
        );
        let b = proofs
            .try_take("b@example.org")
            .expect("another sender's turn");
        assert!(proofs.try_take("c@example.org").is_none(), "the bound");
        assert_eq!(proofs.stats().in_flight, 2);
        drop(a);
        let c = proofs.try_take("c@example.org").expect("a turn given back");
        drop((b, c));
        let stats = proofs.stats();
        assert_eq!((stats.in_flight, stats.peak, stats.taken), (0, 2, 3));
        assert!(proofs.held.lock().unwrap().senders.is_empty());
        let wide = Arc::new(MailProofs::new(3, 2));
        let turns: Vec<_> = (0..3).filter_map(|_| wide.try_take("a")).collect();
        assert_eq!(turns.len(), 2, "a share of 2");
    }
}
