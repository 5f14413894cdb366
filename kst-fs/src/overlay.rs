//! The epochs of the fs key directory above the tree's files, kept in memory (feature
//! `transparency`, the journal of version 3, `journal.rs`): a commit writes its journal frame
//! and the root, and the tree's own files (nodes, value states, heads) only at a checkpoint
//! (`directory.rs`'s write-out). So a read of the tree at the stored root R reads each record
//! from this overlay first, built from the frames of epochs base + 1 to R, and from the
//! record's file only when no epoch since base changed it.
//!
//! Why that is exact: the files hold every change of the epochs up to the checkpoint (the
//! checkpoint moves only after a write-out of every epoch up to it and a `syncfs`, or a
//! replay of the frames after a crash), and never a change newer than the stored root (a
//! write-out is done under the domain's exclusive lock, of epochs at or under the root). So
//! with base at or under the checkpoint, a record no epoch in base + 1 ..= R changed has its
//! newest value, as of R, in its file; one that an epoch there changed has it here.
//!
//! One overlay per domain and [`crate::FsDirectoryStore`] (one per process in kst): a
//! commit adds its own batch without reading it back ([`Overlay::apply`]); a read first adds
//! the frames other processes of a pool committed since ([`sync`]). Entries at or under the
//! checkpoint are dropped when the checkpoint moves ([`Overlay::prune`]): by the writer as it
//! moves it, by a process that only reads as soon as it sees it moved (it reads the
//! checkpoint every [`PRUNE_STEP`] epochs once it holds more than
//! [`journal::CHECKPOINT_EVERY`]: review F6, it held up to 256 epochs). And a domain's overlay
//! unused for [`IDLE`] is dropped whole ([`Overlays`]): a process that read many domains once
//! kept each one's for good.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kst_core::transparency::{DirectoryStoreError, RecordBatch};

use crate::journal;

/// The records changed by the epochs `base + 1 ..= upto`, the newest of each.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    /// Whether `base` and `upto` were set ([`Overlay::reset`]); a new overlay is not.
    started: bool,
    base: u64,
    upto: u64,
    /// `upto` when [`sync`] last read the checkpoint (or the overlay was started).
    checked: u64,
    /// Node key → (the epoch that wrote it last, its blob).
    nodes: HashMap<Vec<u8>, (u64, Vec<u8>)>,
    /// Label → value states by their epoch → (the epoch of the frame that wrote it last, its
    /// blob). Not always the same epoch: a deletion's batch rewrites the value states of
    /// earlier epochs (akd's tombstones), so the write-out and the prune go by the frame's.
    values: HashMap<Vec<u8>, BTreeMap<u64, Written>>,
    /// Epoch → its head.
    heads: BTreeMap<u64, Vec<u8>>,
}

/// A record as the overlay keeps it: (the epoch of the frame that wrote it last, its blob).
type Written = (u64, Vec<u8>);

/// What a write-out writes: the records of the epochs above some epoch.
#[derive(Debug, Default)]
pub(crate) struct Records {
    /// (key, blob), the newest of each key.
    pub(crate) nodes: Vec<(Vec<u8>, Vec<u8>)>,
    /// (label, epoch, blob).
    pub(crate) values: Vec<(Vec<u8>, u64, Vec<u8>)>,
    /// (epoch, head).
    pub(crate) heads: Vec<(u64, Vec<u8>)>,
}

impl Overlay {
    /// Empties the overlay at `epoch`: the files hold every change up to it.
    pub(crate) fn reset(&mut self, epoch: u64) {
        *self = Overlay {
            started: true,
            base: epoch,
            upto: epoch,
            checked: epoch,
            ..Overlay::default()
        };
    }

    /// The last epoch the overlay holds, if it was started.
    pub(crate) fn upto(&self) -> Option<u64> {
        self.started.then_some(self.upto)
    }

    /// Adds the batch of epoch `upto + 1` (a commit's own, or a frame read); a batch of any
    /// other epoch is ignored (the next [`sync`] reads the frames in order).
    pub(crate) fn apply(&mut self, batch: &RecordBatch) {
        let Some(epoch) = batch.root.as_ref().map(|r| r.epoch) else {
            return;
        };
        if !self.started || self.upto.checked_add(1) != Some(epoch) {
            return;
        }
        for (key, blob) in &batch.nodes {
            self.nodes.insert(key.clone(), (epoch, blob.clone()));
        }
        for vs in &batch.value_states {
            self.values
                .entry(vs.label.clone())
                .or_default()
                .insert(vs.epoch, (epoch, vs.blob.clone()));
        }
        if let Some(head) = &batch.head {
            self.heads.entry(epoch).or_insert_with(|| head.clone());
        }
        self.upto = epoch;
    }

    /// Drops the entries of the epochs at or under `checkpoint` (their files hold them, or
    /// newer ones no newer than the root).
    pub(crate) fn prune(&mut self, checkpoint: u64) {
        if !self.started || checkpoint <= self.base {
            return;
        }
        if checkpoint >= self.upto {
            self.reset(checkpoint);
            return;
        }
        self.nodes.retain(|_, (e, _)| *e > checkpoint);
        self.values.retain(|_, states| {
            states.retain(|_, (e, _)| *e > checkpoint);
            !states.is_empty()
        });
        self.heads.retain(|e, _| *e > checkpoint);
        self.base = checkpoint;
    }

    /// The newest blob of node `key` above the files, if an epoch of the overlay wrote it.
    pub(crate) fn node(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.nodes.get(key).map(|(_, blob)| blob)
    }

    /// The value states of `label` the overlay's epochs wrote.
    pub(crate) fn value_states(&self, label: &[u8]) -> Vec<(u64, Vec<u8>)> {
        self.values.get(label).map_or_else(Vec::new, |states| {
            states.iter().map(|(e, (_, b))| (*e, b.clone())).collect()
        })
    }

    /// The head of `epoch`, if its frame carried one.
    pub(crate) fn head(&self, epoch: u64) -> Option<&Vec<u8>> {
        self.heads.get(&epoch)
    }

    /// The records the epochs above `above` wrote (a write-out's: those at or under the
    /// checkpoint are in their files already), by the epoch of the frame that wrote them.
    pub(crate) fn records_above(&self, above: u64) -> Records {
        Records {
            nodes: self
                .nodes
                .iter()
                .filter(|(_, (e, _))| *e > above)
                .map(|(k, (_, b))| (k.clone(), b.clone()))
                .collect(),
            values: self
                .values
                .iter()
                .flat_map(|(label, states)| {
                    states
                        .iter()
                        .filter(|(_, (written, _))| *written > above)
                        .map(|(e, (_, b))| (label.clone(), *e, b.clone()))
                })
                .collect(),
            heads: self
                .heads
                .range(above.saturating_add(1)..)
                .map(|(e, h)| (*e, h.clone()))
                .collect(),
        }
    }

    /// How many records the overlay holds (a test's measure).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.nodes.len() + self.values.values().map(BTreeMap::len).sum::<usize>() + self.heads.len()
    }

    /// How many epochs the overlay holds (a test's measure).
    #[cfg(test)]
    pub(crate) fn epochs(&self) -> u64 {
        self.upto - self.base
    }
}

/// How many epochs an overlay holding more than [`journal::CHECKPOINT_EVERY`] adds between
/// two reads of the checkpoint by [`sync`] (a process that only reads sees the checkpoint
/// move no other way). The checkpoint is never more than [`journal::SLOTS`] epochs under
/// the root (a commit moves it first, `journal::room_for`), and most often within
/// [`journal::CHECKPOINT_EVERY`] and a background `syncfs` of it: so an overlay holds at
/// most `SLOTS + PRUNE_STEP` epochs, most often about 64 to 80, at the cost of one read of
/// the checkpoint file per 16 epochs.
pub(crate) const PRUNE_STEP: u64 = journal::CHECKPOINT_EVERY / 4;

/// How long a domain's overlay is kept unused (no read or commit of the domain by this
/// store) before [`Overlays`] drops it; the next use builds it again from the frames above
/// the checkpoint (at most [`journal::SLOTS`] frames read once).
pub(crate) const IDLE: Duration = Duration::from_secs(60);

/// An overlay [`Overlays`] took out, unused: freed when dropped.
pub(crate) type Idle = Arc<Mutex<Overlay>>;

/// The overlays of one store's domains, each with when it was last handed out.
#[derive(Debug, Default)]
pub(crate) struct Overlays {
    by_dir: HashMap<PathBuf, (Arc<Mutex<Overlay>>, Instant)>,
    /// When the idle ones were last dropped.
    swept: Option<Instant>,
}

impl Overlays {
    /// The overlay of the domain at `dir` (a new one, not started, at its first use or after
    /// it was dropped), used `now`; first, at most every quarter of [`IDLE`], takes out those
    /// unused for [`IDLE`] ([`Overlays::drop_idle`]), returned for the caller to free once it
    /// let the store's lock of its overlays go (review L5: a burst of domains freed at once
    /// held every read and commit of the store meanwhile).
    pub(crate) fn get(&mut self, dir: &Path, now: Instant) -> (Arc<Mutex<Overlay>>, Vec<Idle>) {
        let idle = if self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= IDLE / 4)
        {
            self.drop_idle(now)
        } else {
            Vec::new()
        };
        let (ov, used) = self
            .by_dir
            .entry(dir.to_path_buf())
            .or_insert_with(|| (Arc::default(), now));
        *used = now;
        (ov.clone(), idle)
    }

    /// Takes out the overlays unused for [`IDLE`] as of `now` that nobody holds (a read, a
    /// commit or a background checkpoint under way holds its domain's), and returns them.
    pub(crate) fn drop_idle(&mut self, now: Instant) -> Vec<Idle> {
        self.swept = Some(now);
        let expired: Vec<PathBuf> = self
            .by_dir
            .iter()
            .filter(|(_, (ov, used))| {
                Arc::strong_count(ov) == 1 && now.saturating_duration_since(*used) >= IDLE
            })
            .map(|(dir, _)| dir.clone())
            .collect();
        expired
            .iter()
            .filter_map(|dir| self.by_dir.remove(dir).map(|(ov, _)| ov))
            .collect()
    }

    /// How many domains' overlays are held (a test's measure).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.by_dir.len()
    }
}

/// Brings `ov` to the stored root `root` of the domain at `dir`, under the domain's lock
/// (shared or exclusive: the root, the checkpoint and the frames up to the root do not change
/// meanwhile): reads the frames after the last epoch it holds, in order. Started (or
/// started again) at the checkpoint when it was not started, when it holds an epoch above
/// the root (a root write failed after its frame: the frame is rolled forward, then read
/// again here), or when it is so far behind that the frames it needs may be written over;
/// a frame that is gone at or under the checkpoint starts it again there as well. A frame
/// missing above the checkpoint and at or under the root is `Corrupt` (no writer leaves one).
pub(crate) fn sync(dir: &Path, ov: &mut Overlay, root: u64) -> Result<(), DirectoryStoreError> {
    let behind = ov
        .upto()
        .is_none_or(|upto| upto > root || root - upto >= journal::SLOTS - 1);
    if behind {
        ov.reset(start(dir, root)?);
    }
    // Whether the overlay started (again) at the checkpoint read here.
    let mut fresh = behind;
    while ov.upto < root {
        let epoch = ov.upto + 1;
        match journal::read_frame(dir, epoch)? {
            Some(frame) => ov.apply(&frame),
            None => {
                let checkpoint = start(dir, root)?;
                if checkpoint < epoch {
                    return Err(DirectoryStoreError::Corrupt(format!(
                        "{}: the journal frame of epoch {epoch} is missing, though the \
                         checkpoint is at epoch {checkpoint} and the root at epoch {root}: \
                         the tree's files may not hold that epoch; restore the domain's \
                         directory from a backup",
                        journal::journal_dir(dir).display()
                    )));
                }
                ov.reset(checkpoint);
                fresh = true;
            }
        }
    }
    if fresh {
        // Its checkpoint was just read: not read again at once (review L7).
        ov.checked = ov.upto;
    }
    if ov.upto - ov.base > journal::CHECKPOINT_EVERY && ov.upto - ov.checked >= PRUNE_STEP {
        ov.checked = ov.upto;
        ov.prune(start(dir, root)?);
    }
    Ok(())
}

/// The epoch an overlay of the domain at `dir` starts at: the checkpoint (the stored root
/// `root` when there is no journal: the files hold every epoch). A checkpoint above the root
/// is `Corrupt` (files newer than the root).
fn start(dir: &Path, root: u64) -> Result<u64, DirectoryStoreError> {
    match journal::checkpoint(dir)? {
        None => Ok(root),
        Some(c) if c <= root => Ok(c),
        Some(c) => Err(DirectoryStoreError::Corrupt(format!(
            "{}: the journal's checkpoint (epoch {c}) is above the stored root (epoch {root}); \
             restore the domain's directory from a backup",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review L6: [`Overlays::get`] takes out the overlays unused for [`IDLE`], but sweeps at
    /// most every quarter of it: an overlay idle past [`IDLE`] stays until the next sweep.
    #[test]
    fn get_takes_out_idle_overlays_at_most_every_quarter_of_idle() {
        let mut ovs = Overlays::default();
        let (a, b) = (Path::new("/kt/a.example"), Path::new("/kt/b.example"));
        let t0 = Instant::now();
        let (ov, idle) = ovs.get(a, t0);
        assert!(idle.is_empty());
        drop(ov);
        // A sweep (a quarter of IDLE since the first): `a` unused for less than IDLE stays.
        let (_b, idle) = ovs.get(b, t0 + IDLE - IDLE / 8);
        assert!(idle.is_empty());
        assert_eq!(ovs.held(), 2);
        // `a` unused for longer than IDLE now, but the last sweep is less than a quarter
        // of IDLE ago: no sweep.
        let (_b, idle) = ovs.get(b, t0 + IDLE + IDLE / 16);
        assert!(idle.is_empty());
        assert_eq!(ovs.held(), 2);
        // A quarter of IDLE after that sweep: `a` is taken out, `b` (held) stays.
        let (_b, idle) = ovs.get(b, t0 + IDLE + IDLE / 8);
        assert_eq!(idle.len(), 1);
        assert_eq!(ovs.held(), 1);
        // Taken out, `a` comes back new (not started).
        let (ov, _) = ovs.get(a, t0 + 2 * IDLE);
        assert_eq!(ov.lock().unwrap().upto(), None);
    }
}
