//! Heads for epochs that have none (docs/TRANSPARENCY.md, "Heads signed late").
//!
//! A directory kept from before heads were stored, or a store that lost some heads, has
//! epochs without a stored head; an audit across them could not be served. Their roots are
//! not stored either (akd keeps only the latest root), but akd's append-only proof gives them:
//! the root *before* a step is the hash of the step's unchanged nodes, the root *after* it is
//! the unchanged nodes with the step's inserted leaves (what akd's auditor computes). So a
//! head signed late names the root the epoch had, derived from the tree as it is now:
//!
//! - one append-only proof is built across the missing epochs and one epoch on each side
//!   where that epoch's root is known (a stored head, the latest epoch's root, or epoch 0,
//!   whose root is the empty tree's); the derived roots must meet those known roots, and the
//!   whole proof must verify step by step over the derived roots
//!   ([`append_only_chain`](super::verify::append_only_chain): akd's `audit_verify` check,
//!   each step's trees built once). Anything else is an inconsistent directory: nothing is
//!   signed, the error names the epochs, an operator must look.
//! - the head's `signed-at` is the moment it is signed, as for every head: it says when the
//!   log signed the head, never when the epoch was committed, so a head signed late carries a
//!   later time than the heads of the epochs after it. Nothing in a head claims more.
//! - heads are stored insert-if-absent, as the writer stores them: of two processes filling
//!   one gap the first one's head stays, and the other's check of it must pass.
//!
//! The work is bounded: [`Backfill::step`] reads at most [`SCAN_WINDOW`] stored heads or signs
//! at most [`FILL_CHUNK`] heads (one proof), and the log's thread runs a step only while no
//! request waits, so a log of 10⁵ epochs starts at once and fills its gaps in the background.
//! A request that needs a missing head ([`fill`], for an audit range or one epoch) fills just
//! those, in chunks of [`FILL_CHUNK`]. Each chunk's proof is also bounded in size: its steps
//! are counted before it is built ([`KeyDirectory::audit_step_walk_within`]) and the chunk shrinks
//! until they hold at most [`FILL_MAX_ELEMENTS`]; an epoch whose proof alone holds more is
//! refused unbuilt ([`TransparencyError::Range`]; the background backfill logs it and goes
//! on past it). Before, one chunk of 32 busy epochs was one proof of many MB (about 300 KB a
//! step at 10⁶ entries, far more for an old epoch, whose step lists every subtree the later
//! epochs split), built on the log's one thread for an anonymous `/head/<epoch>`.

use std::sync::Arc;

use super::answer::{HTTP_STEP_BUDGET, STEP_ELEMENT_BYTES, head_text};
use super::directory::{KeyDirectory, ReadBudget};
use super::head::Head;
use super::keys::LogKeys;
use super::log::check_stored_head;
use super::storage::{DirectoryStore, StoredDirectory};
use super::verify::{append_only_chain, empty_root};
use super::{Result, TransparencyError};

/// The most stored heads one scan step reads.
pub const SCAN_WINDOW: u64 = 1024;
/// The most heads one fill step signs (under one append-only proof).
pub const FILL_CHUNK: u64 = 32;
/// The most elements the append-only proof of one fill step may hold (counted before it is
/// built): what one HTTP answer's proof may hold ([`HTTP_STEP_BUDGET`], 4 MiB at
/// [`STEP_ELEMENT_BYTES`] an element). A step of an epoch kst's writer makes (at most
/// [`super::log::MAX_BATCH`] changes) is about 4 000 elements at 10⁶ entries, so a chunk of
/// such epochs shrinks to about a dozen; one epoch needs the steps on either side of it.
pub const FILL_MAX_ELEMENTS: usize = HTTP_STEP_BUDGET.bytes / STEP_ELEMENT_BYTES;

/// What a fill needs: the open directory, its store and the log's keys.
pub(super) struct Filler<'a> {
    /// The open directory (its append-only proofs and latest root).
    pub directory: &'a KeyDirectory<StoredDirectory<dyn DirectoryStore>>,
    /// Where heads are stored.
    pub store: &'a Arc<dyn DirectoryStore>,
    /// The domain's keys.
    pub keys: &'a LogKeys,
}

/// Where the background backfill of one log stands.
#[derive(Debug, Default)]
pub(super) struct Backfill {
    /// Whether the log runs it (the logs `kst serve` serves over HTTP do; a `kst deliver`'s
    /// short-lived writer does not).
    on: bool,
    /// The next epoch the scan reads.
    next: u64,
    /// The first epoch of a run of missing heads the scan is in.
    gap_from: Option<u64>,
    /// A run of missing heads found and not filled yet (from, to).
    gap: Option<(u64, u64)>,
    /// The scan reached the latest epoch.
    done: bool,
}

impl Backfill {
    /// Starts the background backfill (idempotent).
    pub fn start(&mut self) {
        self.on = true;
    }

    /// Whether a step is waiting to run.
    pub fn pending(&self) -> bool {
        self.on && !self.done
    }

    /// One bounded step: fills (part of) the gap found, or scans the next window of stored
    /// heads for one. Returns the number of heads signed. After an error the step is tried
    /// again the next time the log is idle (a store that is down), unless the directory is
    /// inconsistent, which stops the backfill (logged; an operator must look).
    pub async fn step(&mut self, f: &Filler<'_>, now: u64) -> Result<u64> {
        let (latest, _) = f.directory.current().await?;
        if let Some((from, to)) = self.gap {
            let end = to.min(from.saturating_add(FILL_CHUNK - 1));
            let (signed, end) = match fill_range(f, from, end, now).await {
                Ok(filled) => filled,
                Err(e @ TransparencyError::Verification(_)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(TransparencyError::Range(what)) => {
                    // An epoch whose proof alone is over the bound: left without a head (an
                    // audit across it is refused), the rest of the gap filled.
                    tracing::warn!(domain = %f.keys.domain, epoch = from, "key directory: {what}; the background backfill leaves it");
                    self.gap = (from < to).then(|| (from + 1, to));
                    return Ok(0);
                }
                Err(e) => return Err(e),
            };
            self.gap = (end < to).then(|| (end + 1, to));
            return Ok(signed);
        }
        // The latest epoch's head is the writer's and the first reader's to sign.
        if self.next >= latest {
            if let Some(from) = self.gap_from.take() {
                self.gap = Some((from, latest - 1));
                return Ok(0);
            }
            self.done = true;
            return Ok(0);
        }
        let to = (latest - 1).min(self.next.saturating_add(SCAN_WINDOW - 1));
        let stored = f
            .store
            .heads(&f.keys.domain, self.next, to)
            .await
            .map_err(|e| TransparencyError::Directory(e.to_string()))?;
        let mut present = stored.iter().map(|(e, _)| *e).peekable();
        for epoch in self.next..=to {
            if present.peek() == Some(&epoch) {
                present.next();
                if let Some(from) = self.gap_from.take() {
                    // The run ends here: fill it before scanning on.
                    self.gap = Some((from, epoch - 1));
                    self.next = epoch + 1;
                    return Ok(0);
                }
            } else if self.gap_from.is_none() {
                self.gap_from = Some(epoch);
            }
        }
        self.next = to + 1;
        Ok(0)
    }
}

/// Signs and stores a head for every epoch of `from..=to` that has none (the caller bounds
/// the range; epochs after the latest are ignored), in chunks of at most [`FILL_CHUNK`] and
/// [`FILL_MAX_ELEMENTS`]. Returns the number of heads signed; an epoch whose proof alone is
/// over [`FILL_MAX_ELEMENTS`] is [`TransparencyError::Range`] (the heads before it signed).
pub(super) async fn fill(f: &Filler<'_>, from: u64, to: u64, now: u64) -> Result<u64> {
    let (latest, _) = f.directory.current().await?;
    let to = to.min(latest);
    let mut signed = 0;
    let mut at = from;
    while at <= to {
        let end = to.min(at.saturating_add(FILL_CHUNK - 1));
        let (n, end) = fill_range(f, at, end, now).await?;
        signed += n;
        at = end + 1;
    }
    Ok(signed)
}

/// [`fill`] for one chunk (`to - from < FILL_CHUNK`, `to` at most the latest epoch), shrunk
/// from its end until its proof holds at most [`FILL_MAX_ELEMENTS`] (counted before it is
/// built). Returns the heads signed and the last epoch the chunk covered (at least `from`);
/// [`TransparencyError::Range`] when even the first missing epoch's proof is over the bound.
async fn fill_range(f: &Filler<'_>, from: u64, to: u64, now: u64) -> Result<(u64, u64)> {
    let domain = &f.keys.domain;
    let (latest, latest_root) = f.directory.current().await?;
    if to > latest || from > to {
        return Ok((0, to.max(from)));
    }
    let stored = f
        .store
        .heads(
            domain,
            from.saturating_sub(1),
            to.saturating_add(1).min(latest),
        )
        .await
        .map_err(|e| TransparencyError::Directory(e.to_string()))?;
    let root_of = |epoch: u64| -> Result<Option<[u8; 32]>> {
        match stored.iter().find(|(e, _)| *e == epoch) {
            Some((_, blob)) => Ok(Some(checked(f, epoch, None, blob)?.head.root_hash)),
            None => Ok(None),
        }
    };
    // The chunk starts at its first missing epoch (the ones before it have heads).
    let Some(from) = (from..=to).find(|e| !stored.iter().any(|(s, _)| s == e)) else {
        return Ok((0, to));
    };
    let lower = from.saturating_sub(1);
    // The proof starts one epoch lower when that epoch's head is stored (its root anchors the
    // first derived root); it ends at `upper`, one epoch higher when there is one (and it
    // fits, [`bounded_end`]).
    let start = match root_of(lower)? {
        Some(_) if lower < from => lower,
        _ => from,
    };
    let (to, upper) = bounded_end(f, start, from, to, latest).await?;
    let missing: Vec<u64> = (from..=to)
        .filter(|e| !stored.iter().any(|(s, _)| s == e))
        .collect();
    // The roots of every epoch of the proof, each step checked to start where the one
    // before it ended (akd's `audit_verify` over these roots, each tree built once; before,
    // the roots were derived and then checked again, three builds a step).
    let roots: Vec<[u8; 32]> = if start < upper {
        let proof = f.directory.audit(start, upper).await?;
        if !proof.epochs.iter().copied().eq(start..upper) {
            return Err(inconsistent(
                domain,
                start,
                upper,
                "the append-only proof has not one step an epoch",
            ));
        }
        append_only_chain(&proof)
            .await
            .map_err(|e| inconsistent(domain, start, upper, &e.to_string()))?
    } else {
        // One epoch, the latest, and nothing on either side: its root is the directory's.
        vec![latest_root]
    };
    // roots[i] is the root of epoch start + i; check it against every root known otherwise.
    let root_at = |epoch: u64| roots[(epoch - start) as usize];
    for epoch in start..=upper {
        let known = if epoch == latest {
            Some(latest_root)
        } else if epoch == 0 {
            Some(empty_root().await?)
        } else {
            root_of(epoch)?
        };
        if let Some(known) = known
            && known != root_at(epoch)
        {
            return Err(inconsistent(
                domain,
                start,
                upper,
                &format!(
                    "the proof gives epoch {epoch} the root {}, its head or the tree says {}",
                    hex::encode(root_at(epoch)),
                    hex::encode(known)
                ),
            ));
        }
    }
    let vrf_public_key = f.keys.vrf.public_key()?;
    for epoch in &missing {
        let root = root_at(*epoch);
        let head = f.keys.head.sign(Head {
            domain: domain.clone(),
            epoch: *epoch,
            root_hash: root,
            vrf_public_key,
            signed_at: now,
        })?;
        let blob = f
            .store
            .insert_head(domain, *epoch, head_text(&head)?.as_bytes())
            .await
            .map_err(|e| TransparencyError::Directory(e.to_string()))?;
        checked(f, *epoch, Some(root), &blob)?;
    }
    tracing::info!(
        domain = %domain,
        from,
        to,
        signed = missing.len(),
        "key directory: heads signed for epochs that had none"
    );
    Ok((missing.len() as u64, to))
}

/// The last epoch, at most `to`, up to which a chunk from `from` can be filled with a proof
/// starting at `start` (`start` is `from` or the epoch before it) of at most
/// [`FILL_MAX_ELEMENTS`], and the epoch that proof ends at: its steps counted one at a time,
/// before anything is built (at most `4 *` [`FILL_MAX_ELEMENTS`] tree nodes read, and 64 more
/// a step). The proof ends one epoch past the chunk (or at the latest), whose root, when
/// known, is one more check; when `start` is below `from` (its stored head anchors the
/// derived roots) and that last step does not fit, the proof ends at the chunk's last epoch
/// instead (a client stepping up to an epoch just before a large one still gets its head).
/// [`TransparencyError::Range`] when even the chunk of `from` alone is over it.
async fn bounded_end(
    f: &Filler<'_>,
    start: u64,
    from: u64,
    to: u64,
    latest: u64,
) -> Result<(u64, u64)> {
    let (mut counted, mut left) = (start, FILL_MAX_ELEMENTS);
    let mut budget = ReadBudget::for_elements(FILL_MAX_ELEMENTS);
    let mut end = None;
    'chunk: for epoch in from..=to {
        // The proof must reach `epoch` (its root is derived from the step into it, anchored
        // below) or, without an anchor below, the epoch after it (the root before that step).
        let upper = epoch.saturating_add(1).min(latest);
        let needed = if start < from { epoch } else { upper };
        while counted < upper {
            let walk = f
                .directory
                .audit_step_walk_within(counted, left, &mut budget)
                .await?;
            match walk.count {
                Some(c) => {
                    left -= c.elements();
                    counted += 1;
                }
                None => {
                    if counted >= needed {
                        end = Some((epoch, counted));
                    }
                    break 'chunk;
                }
            }
        }
        end = Some((epoch, upper));
    }
    end.ok_or_else(|| {
        TransparencyError::Range(format!(
            "{}: the head of epoch {from} cannot be signed late: the append-only proof it needs \
             (epochs {start} to {}) holds more than {FILL_MAX_ELEMENTS} elements (about {} \
             MiB), more than kst builds for a head",
            f.keys.domain,
            match start < from {
                true => from,
                false => from.saturating_add(1).min(latest),
            },
            HTTP_STEP_BUDGET.bytes >> 20
        ))
    })
}

/// [`check_stored_head`] for the fill: a stored head that fails it (not a head, another
/// epoch or key, another root) makes the directory inconsistent, which stops the background
/// backfill; left a temporary failure, the backfill retried it every idle second forever,
/// each time pausing the log's thread (red team, issue 18).
fn checked(
    f: &Filler<'_>,
    epoch: u64,
    root: Option<[u8; 32]>,
    blob: &[u8],
) -> Result<super::head::SignedHead> {
    check_stored_head(
        &f.keys.domain,
        &f.keys.vrf.public_key()?,
        &f.keys.head.public_key(),
        epoch,
        root,
        blob,
    )
    .map_err(|e| match e {
        TransparencyError::Directory(what) => TransparencyError::Verification(what),
        e => e,
    })
}

fn inconsistent(domain: &str, from: u64, to: u64, what: &str) -> TransparencyError {
    TransparencyError::Verification(format!(
        "{domain}: the heads of epochs {from} to {to} cannot be signed late: {what}; the \
         directory is inconsistent, an operator must look"
    ))
}
