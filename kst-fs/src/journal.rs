//! The write-ahead journal of the fs key directory (feature `transparency`, Linux): one
//! file per epoch under `kt/<domain>/journal/`, made durable with one `fdatasync(2)` (and
//! the journal directory's `fsync`), instead of a `syncfs(2)` of the whole file system per
//! epoch (docs/TRANSPARENCY.md, "Write order, as built": the fs journal).
//!
//! ```text
//! kt/<domain>/journal/<epoch, 20 digits>   one epoch's batch (a frame, below)
//! kt/<domain>/journal/checkpoint           epoch C (8 bytes): every epoch <= C is durable in
//!                                          the tree's own files; frames <= C are garbage
//! kt/<domain>/journal/boot                 the boot id under which the frames after C were
//!                                          written (Linux's /proc/sys/kernel/random/boot_id)
//! kt/<domain>/journal/spare-<nn>           a frame under the checkpoint kept for reuse (nn:
//!                                          its epoch modulo 64; at most 1 MiB); never read
//! kt/<domain>/journal/torn-<epoch>-<random> a torn frame set aside (its writer was killed
//!                                          writing it); never read, kept for an operator,
//!                                          the newest 16 only (`set_aside`)
//! ```
//!
//! A frame under the checkpoint is not removed but renamed to the spare of its slot, and the
//! frame of an epoch of that slot is written over that spare (renamed to the frame's name,
//! then overwritten in place): no new inode per epoch and none freed per checkpoint, which
//! on an ext4 without a journal cost far more than the frame's write (its allocator skips
//! every inode freed in the last minutes one by one, docs/BENCHMARKS.md). A spare renamed to
//! a frame's name but not yet (or partly) overwritten holds an older epoch, or a bad hash: no
//! frame (below), like a frame its writer was killed writing.
//!
//! A frame is the whole batch of an epoch: `KSTJ1\n` ‖ expected epoch (8) ‖ epoch (8) ‖
//! nodes (count (4), then key length (4), key, blob length (4), blob) ‖ value states (count
//! (4), then label length (4), label, epoch (8), blob length (4), blob) ‖ root (length (4),
//! blob) ‖ head (0, or 1 ‖ length (4) ‖ head) ‖ SHA-256 of all of it (32). A frame that is
//! short, long, or whose hash does not match is no frame (a writer died writing it).
//!
//! The fs directory's commit (kst-fs `directory.rs`) is then: under the domain's lock, the
//! fence; the frame written and synced (**the commit point**: the caller is answered); the
//! epoch's files written, on the same thread under the same lock, unsynced (nodes and value
//! states overwritten in place, the head linked, the root overwritten in place last; readers
//! wait on the lock meanwhile); every 64 epochs a background `syncfs(2)` moves the
//! checkpoint up and makes the frames under it spares. A writer that died after its frame was
//! durable left an epoch the next writer rolls forward (writes its files) before checking
//! its own fence, and so does a process's first read of the domain. After the machine
//! crashed (the boot id changed), the first process to touch the domain replays every frame
//! after the checkpoint in order, then syncs and moves the checkpoint: the files the page
//! cache lost are written again.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use kst_core::durable::{sync_dir, write_atomic};
use kst_core::transparency::{DirectoryStoreError, RecordBatch, RootWrite, ValueStateBlob};
use sha2::{Digest, Sha256};

/// The first bytes of a frame.
const MAGIC: &[u8; 6] = b"KSTJ1\n";

/// Largest frame read back: a batch of 512 changes at 10^6 entries is about 6 MB.
const MAX_FRAME: u64 = 64 * 1024 * 1024;

/// Largest record inside a frame (as `MAX_FILE` of the directory's files).
const MAX_RECORD: usize = 64 * 1024;

/// Every this many epochs a commit starts a checkpoint (in the background).
pub(crate) const CHECKPOINT_EVERY: u64 = 64;

/// When this many epochs wait above the checkpoint, the commit checkpoints itself (a process
/// that never lived long enough to finish a background one).
pub(crate) const CHECKPOINT_AT_MOST: u64 = 1024;

pub(crate) fn journal_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

pub(crate) fn frame_path(dir: &Path, epoch: u64) -> PathBuf {
    journal_dir(dir).join(format!("{epoch:020}"))
}

/// The spare of `epoch`'s slot: a frame under the checkpoint, kept to be written over by the
/// frame of a later epoch of the same slot ([`write_frame`]).
fn spare_path(dir: &Path, epoch: u64) -> PathBuf {
    journal_dir(dir).join(format!("spare-{:02}", epoch % CHECKPOINT_EVERY))
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    journal_dir(dir).join("checkpoint")
}

fn boot_path(dir: &Path) -> PathBuf {
    journal_dir(dir).join("boot")
}

fn unavailable(op: &str, path: &Path, e: impl std::fmt::Display) -> DirectoryStoreError {
    DirectoryStoreError::Unavailable(format!("{op} {}: {e}", path.display()))
}

/// This boot's id (Linux), `None` where there is none: the journal is not used then.
pub(crate) fn boot_id() -> Option<String> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() <= 64)
    })
    .clone()
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every length is bounded by MAX_RECORD or MAX_FRAME, both far below u32::MAX.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Whether `batch` can be a frame: an epoch built on another (akd's first root and its empty
/// tree are written the old way, synced, once per directory).
pub(crate) fn journaled(batch: &RecordBatch) -> bool {
    matches!(
        &batch.root,
        Some(RootWrite {
            expected_epoch: Some(_),
            ..
        })
    )
}

/// The frame of `batch` ([`journaled`] batches only).
pub(crate) fn encode(batch: &RecordBatch) -> Vec<u8> {
    let root = batch.root.as_ref();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(
        &root
            .and_then(|r| r.expected_epoch)
            .unwrap_or(0)
            .to_be_bytes(),
    );
    out.extend_from_slice(&root.map_or(0, |r| r.epoch).to_be_bytes());
    out.extend_from_slice(&(batch.nodes.len() as u32).to_be_bytes());
    for (key, blob) in &batch.nodes {
        put_bytes(&mut out, key);
        put_bytes(&mut out, blob);
    }
    out.extend_from_slice(&(batch.value_states.len() as u32).to_be_bytes());
    for vs in &batch.value_states {
        put_bytes(&mut out, &vs.label);
        out.extend_from_slice(&vs.epoch.to_be_bytes());
        put_bytes(&mut out, &vs.blob);
    }
    put_bytes(&mut out, root.map_or(&[][..], |r| &r.blob));
    match &batch.head {
        Some(head) => {
            out.push(1);
            put_bytes(&mut out, head);
        }
        None => out.push(0),
    }
    let hash = Sha256::digest(&out);
    out.extend_from_slice(&hash);
    out
}

/// Reads a frame's fields in order, refusing anything out of bounds.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        if n > MAX_RECORD {
            return None;
        }
        Some(self.take(n)?.to_vec())
    }

    /// A count of items, each at least `min` bytes long: never more than the bytes left allow.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n <= self.0.len() / min).then_some(n)
    }
}

/// The batch in `bytes`, `None` unless it is one whole frame.
pub(crate) fn decode(bytes: &[u8]) -> Option<RecordBatch> {
    let (body, hash) = bytes.split_last_chunk::<32>()?;
    if Sha256::digest(body).as_slice() != hash {
        return None;
    }
    let mut r = Reader(body);
    if r.take(MAGIC.len())? != MAGIC {
        return None;
    }
    let expected = r.u64()?;
    let epoch = r.u64()?;
    let mut nodes = Vec::new();
    for _ in 0..r.count(8)? {
        nodes.push((r.bytes()?, r.bytes()?));
    }
    let mut value_states = Vec::new();
    for _ in 0..r.count(16)? {
        let label = r.bytes()?;
        let epoch = r.u64()?;
        value_states.push(ValueStateBlob {
            label,
            epoch,
            blob: r.bytes()?,
        });
    }
    let root = r.bytes()?;
    let head = match r.take(1)? {
        [0] => None,
        [1] => Some(r.bytes()?),
        _ => return None,
    };
    if !r.0.is_empty() || expected.checked_add(1) != Some(epoch) {
        return None;
    }
    Some(RecordBatch {
        nodes,
        value_states,
        root: Some(RootWrite {
            expected_epoch: Some(expected),
            epoch,
            blob: root,
        }),
        head,
    })
}

/// The frame of `epoch`, if there is a whole one.
pub(crate) fn read_frame(
    dir: &Path,
    epoch: u64,
) -> Result<Option<RecordBatch>, DirectoryStoreError> {
    let path = frame_path(dir, epoch);
    let bytes = match std::fs::File::open(&path) {
        Ok(f) => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FRAME + 1), &mut bytes)
                .map_err(|e| unavailable("read", &path, e))?;
            bytes
        }
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("open", &path, e)),
    };
    Ok(decode(&bytes).filter(|b| b.root.as_ref().map(|r| r.epoch) == Some(epoch)))
}

/// Writes the frame of `batch` and makes it durable: the epoch is committed once this
/// returns. A frame a dead writer left under that name is replaced. Written over the spare of
/// its slot when there is one ([`spare_path`]: renamed to the frame's name, overwritten in
/// place), else to a new file. Under the domain's lock. A batch whose frame [`read_frame`]
/// would not read back ([`unreadable`]) is refused (`Corrupt`) before anything is written.
pub(crate) fn write_frame(dir: &Path, batch: &RecordBatch) -> Result<(), DirectoryStoreError> {
    use std::os::unix::fs::FileExt as _;
    let epoch = batch.root.as_ref().map_or(0, |r| r.epoch);
    let journal = journal_dir(dir);
    let path = frame_path(dir, epoch);
    let bytes = encode(batch);
    if let Some(why) = unreadable(batch, bytes.len()) {
        // Past this point the caller is answered: a frame its reader refuses would be a
        // confirmed epoch lost to a kill before its files or a crash before the checkpoint.
        return Err(DirectoryStoreError::Corrupt(format!(
            "the batch of epoch {epoch} would make a journal frame that cannot be read back \
             ({why}); nothing was written: a bug of the directory's writer, report it"
        )));
    }
    // A spare that cannot be renamed (none there, most often) is no error: a new file then.
    let reused = std::fs::rename(spare_path(dir, epoch), &path).is_ok();
    let written = (|| {
        let f = if reused {
            std::fs::OpenOptions::new().write(true).open(&path)?
        } else {
            std::fs::File::create(&path)?
        };
        f.write_all_at(&bytes, 0)?;
        if reused && f.metadata()?.len() != bytes.len() as u64 {
            f.set_len(bytes.len() as u64)?;
        }
        f.sync_data()
    })();
    written.map_err(|e| unavailable("write", &path, e))?;
    sync_dir(&journal).map_err(|e| unavailable("sync", &journal, e))
}

/// Why the frame of `batch` (`len` bytes, [`encode`]) would be no frame to [`decode`]
/// (a record over [`MAX_RECORD`], a frame over [`MAX_FRAME`], an epoch that is not the one
/// after the expected one); `None` when it reads back.
fn unreadable(batch: &RecordBatch, len: usize) -> Option<String> {
    let Some(RootWrite {
        expected_epoch: Some(expected),
        epoch,
        blob,
    }) = &batch.root
    else {
        return Some("no root built on a stored epoch".into());
    };
    if expected.checked_add(1) != Some(*epoch) {
        return Some(format!("epoch {epoch} built on epoch {expected}"));
    }
    if len as u64 > MAX_FRAME {
        return Some(format!("{len} bytes, over {MAX_FRAME}"));
    }
    let records = batch
        .nodes
        .iter()
        .flat_map(|(key, blob)| [key, blob])
        .chain(
            batch
                .value_states
                .iter()
                .flat_map(|vs| [&vs.label, &vs.blob]),
        )
        .chain([blob])
        .chain(batch.head.iter());
    records
        .map(Vec::len)
        .max()
        .filter(|&n| n > MAX_RECORD)
        .map(|n| format!("a record of {n} bytes, over {MAX_RECORD}"))
}

/// How many torn frames [`set_aside`] keeps in `journal/` (the one it sets aside and the
/// newest others); older ones are removed, so that a full disk, or a pool whose writers keep
/// being killed inside their frames' writes, does not pile them up without bound.
pub(crate) const TORN_KEPT: usize = 16;

/// Under the domain's lock, when `epoch`'s frame is no whole frame ([`read_frame`] found
/// none): moves the file there, if any, out of the journal's frames to
/// `journal/torn-<epoch>-<random>` (kept for an operator, never read again); returns that
/// name. Its writer was killed writing it, before its commit point (the frame's sync), so it
/// was never confirmed. Then keeps at most [`TORN_KEPT`] torn frames ([`prune_torn`]): the
/// older ones are removed, each logged; one that cannot be removed is logged and left (the
/// set-aside stands).
pub(crate) fn set_aside(dir: &Path, epoch: u64) -> Result<Option<PathBuf>, DirectoryStoreError> {
    let path = frame_path(dir, epoch);
    if !path.exists() {
        return Ok(None);
    }
    let aside = journal_dir(dir).join(format!("torn-{epoch:020}-{:016x}", rand_suffix()));
    match std::fs::rename(&path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("set aside", &path, e)),
    }
    if let Err(e) = prune_torn(dir, &aside, TORN_KEPT) {
        tracing::warn!(dir = %journal_dir(dir).display(), error = %e, "key directory: could not remove old torn journal frames; they stay until the next frame is set aside (remove old journal/torn-* files by hand if the disk is full)");
    }
    Ok(Some(aside))
}

/// Removes the oldest torn frames of `journal/` (`torn-<epoch>-<random>`, older: a lower
/// epoch, then an older modification time, then the name) until at most `keep` are left,
/// never `newest` (the one just set aside); each removal is logged. Returns the paths
/// removed. Files whose names do not parse as a torn frame's are left alone.
fn prune_torn(dir: &Path, newest: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut torn = Vec::new();
    for entry in std::fs::read_dir(journal_dir(dir))? {
        let entry = entry?;
        let path = entry.path();
        if path == newest {
            continue;
        }
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_prefix("torn-"))
            .and_then(|n| n.split_once('-'))
            .filter(|(e, _)| e.len() == 20)
            .and_then(|(e, _)| e.parse::<u64>().ok())
        else {
            continue;
        };
        let modified = match entry.metadata().and_then(|m| m.modified()) {
            Ok(t) => t,
            // Removed meanwhile (by another process's pruning): nothing to count.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        torn.push((epoch, modified, path));
    }
    // `newest` is one of the kept.
    let excess = (torn.len() + 1).saturating_sub(keep.max(1));
    torn.sort();
    let mut removed = Vec::with_capacity(excess);
    for (_, _, path) in torn.into_iter().take(excess) {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), kept = keep, "key directory: removed an old torn journal frame (only the newest are kept)");
                removed.push(path);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A suffix no other temporary name of this process or another one has.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32) ^ u64::from(nanos) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Makes a frame another writer left (complete, maybe never synced) durable before it is
/// rolled forward.
pub(crate) fn sync_frame(dir: &Path, epoch: u64) -> Result<(), DirectoryStoreError> {
    let path = frame_path(dir, epoch);
    std::fs::File::open(&path)
        .and_then(|f| f.sync_data())
        .map_err(|e| unavailable("sync", &path, e))?;
    let journal = journal_dir(dir);
    sync_dir(&journal).map_err(|e| unavailable("sync", &journal, e))
}

/// The checkpoint's epoch; `None` before the journal started.
pub(crate) fn checkpoint(dir: &Path) -> Result<Option<u64>, DirectoryStoreError> {
    let path = checkpoint_path(dir);
    match std::fs::read(&path) {
        Ok(b) => match <[u8; 8]>::try_from(b.as_slice()) {
            Ok(e) => Ok(Some(u64::from_be_bytes(e))),
            Err(_) => Err(DirectoryStoreError::Corrupt(format!(
                "{} is not an epoch",
                path.display()
            ))),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("read", &path, e)),
    }
}

/// Starts the journal (its directory, the checkpoint at `epoch`: every epoch up to it is
/// durable already) unless it is started.
pub(crate) fn start(dir: &Path, epoch: u64) -> Result<(), DirectoryStoreError> {
    if checkpoint(dir)?.is_some() {
        return Ok(());
    }
    let journal = journal_dir(dir);
    kst_core::durable::create_dir(&journal).map_err(|e| unavailable("create", &journal, e))?;
    set_checkpoint(dir, epoch)
}

/// Moves the checkpoint to `epoch` (durably; the caller made every epoch up to it durable)
/// and removes the frames at or under it ([`remove_frames`]: they become spares).
pub(crate) fn set_checkpoint(dir: &Path, epoch: u64) -> Result<(), DirectoryStoreError> {
    let path = checkpoint_path(dir);
    write_atomic(&path, &epoch.to_be_bytes()).map_err(|e| unavailable("write", &path, e))?;
    remove_frames(dir, |e| e <= epoch)
}

/// Frames larger than this are removed rather than kept as spares ([`remove_frames`]): the
/// spares hold at most 64 times this much disk (the frames of a run at c=8 were 3 to 25 kB).
pub(crate) const SPARE_MAX: u64 = 1024 * 1024;

/// Removes the frames whose epoch `drop` accepts (not synced: the checkpoint, written first,
/// says which frames count): each is renamed to the spare of its slot ([`spare_path`],
/// replacing the one there), for a later frame to be written over; one larger than
/// [`SPARE_MAX`] is removed.
pub(crate) fn remove_frames(
    dir: &Path,
    drop: impl Fn(u64) -> bool,
) -> Result<(), DirectoryStoreError> {
    let journal = journal_dir(dir);
    let entries = match std::fs::read_dir(&journal) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unavailable("list", &journal, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| unavailable("list", &journal, e))?;
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .filter(|n| n.len() == 20)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if drop(epoch) {
            let path = entry.path();
            let gone = match std::fs::metadata(&path) {
                Ok(m) if m.len() > SPARE_MAX => std::fs::remove_file(&path),
                Ok(_) => std::fs::rename(&path, spare_path(dir, epoch)),
                Err(e) => Err(e),
            };
            match gone {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(unavailable("remove", &path, e));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The boot id the journal's frames were written under.
pub(crate) fn boot(dir: &Path) -> Result<Option<String>, DirectoryStoreError> {
    let path = boot_path(dir);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("read", &path, e)),
    }
}

/// Records that the frames from now on are written under `boot` (durably).
pub(crate) fn set_boot(dir: &Path, boot: &str) -> Result<(), DirectoryStoreError> {
    let journal = journal_dir(dir);
    kst_core::durable::create_dir(&journal).map_err(|e| unavailable("create", &journal, e))?;
    let path = boot_path(dir);
    write_atomic(&path, boot.as_bytes()).map_err(|e| unavailable("write", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> RecordBatch {
        RecordBatch {
            nodes: vec![(vec![2, 0, 0, 1, 0, 7], b"n1".to_vec()), (vec![3], vec![])],
            value_states: vec![ValueStateBlob {
                label: b"label".to_vec(),
                epoch: 8,
                blob: b"vs".to_vec(),
            }],
            root: Some(RootWrite {
                expected_epoch: Some(7),
                epoch: 8,
                blob: b"root".to_vec(),
            }),
            head: Some(b"head".to_vec()),
        }
    }

    /// Frames under the checkpoint become the spares of their slots, but one larger than
    /// [`SPARE_MAX`] is removed: the spares never hold more than 64 times that.
    #[test]
    fn only_frames_up_to_spare_max_are_kept_as_spares() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 7).unwrap();
        write_frame(dir, &batch()).unwrap();
        let mut big = batch();
        big.root.as_mut().unwrap().expected_epoch = Some(8);
        big.root.as_mut().unwrap().epoch = 9;
        big.nodes = (0..20u8)
            .map(|i| (vec![2, 0, 0, 1, 0, i], vec![i; 60 * 1024]))
            .collect();
        write_frame(dir, &big).unwrap();
        assert!(std::fs::metadata(frame_path(dir, 9)).unwrap().len() > SPARE_MAX);
        set_checkpoint(dir, 9).unwrap();
        assert!(!frame_path(dir, 8).exists() && !frame_path(dir, 9).exists());
        assert!(spare_path(dir, 8).exists(), "a small frame is kept");
        assert!(!spare_path(dir, 9).exists(), "a large one is not");
        // The next frame of slot 8 is written over its spare, whole.
        let mut next = batch();
        next.root.as_mut().unwrap().expected_epoch = Some(8 + CHECKPOINT_EVERY - 1);
        next.root.as_mut().unwrap().epoch = 8 + CHECKPOINT_EVERY;
        write_frame(dir, &next).unwrap();
        assert!(!spare_path(dir, 8).exists());
        assert_eq!(read_frame(dir, 8 + CHECKPOINT_EVERY).unwrap(), Some(next));
    }

    /// Red team (spares): every file a writer killed, or a machine crashed, anywhere in
    /// [`write_frame`] over a spare can leave under the frame's name: the spare's old frame
    /// (the rename alone), the new bytes written over it up to any byte (unwritten, or
    /// written back, page by page in any order), with the cut to the new length or
    /// without. Only the whole new frame is a frame of its epoch; the older epoch a spare
    /// holds is never taken for it, nor is any mix, whether the spare was longer or
    /// shorter than the frame written over it.
    #[test]
    fn no_state_of_a_frame_written_over_a_spare_but_the_whole_one_is_a_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 7).unwrap();
        let slot = 8 + CHECKPOINT_EVERY;
        let with_nodes = |epoch: u64, n: usize, fill: u8| {
            let mut b = batch();
            b.root.as_mut().unwrap().expected_epoch = Some(epoch - 1);
            b.root.as_mut().unwrap().epoch = epoch;
            b.nodes = (0..n)
                .map(|i| (vec![2, 0, 0, 1, 0, i as u8], vec![fill; 1500]))
                .collect();
            b
        };
        // Spare (epoch 8) longer than the new frame (epoch 72), then shorter: each spans
        // several 4 KiB pages.
        for (spare_nodes, new_nodes) in [(7, 3), (3, 7), (4, 4)] {
            let old_batch = with_nodes(8, spare_nodes, 0xaa);
            let new_batch = with_nodes(slot, new_nodes, 0xbb);
            let old = encode(&old_batch);
            let new = encode(&new_batch);
            // The real write over a real spare gives the whole new frame.
            write_frame(dir, &old_batch).unwrap();
            set_checkpoint(dir, 8).unwrap();
            assert!(spare_path(dir, 8).exists());
            write_frame(dir, &new_batch).unwrap();
            assert_eq!(read_frame(dir, slot).unwrap(), Some(new_batch.clone()));
            assert_eq!(std::fs::read(frame_path(dir, slot)).unwrap(), new);
            std::fs::remove_file(frame_path(dir, slot)).unwrap();
            // Every state a kill or a crash can leave.
            let mut states: Vec<(String, Vec<u8>)> = vec![("the spare alone".into(), old.clone())];
            let overlay = |k: usize, cut: bool| {
                let mut f = old.clone();
                if f.len() < k {
                    f.resize(k, 0);
                }
                f[..k].copy_from_slice(&new[..k]);
                if cut {
                    f.resize(new.len(), 0);
                }
                f
            };
            for k in 0..=new.len() {
                states.push((format!("{k} bytes written, not cut"), overlay(k, false)));
                states.push((format!("{k} bytes written, cut"), overlay(k, true)));
            }
            // Pages written back in any order (the cut done or not).
            let pages = new.len().div_ceil(4096);
            for mask in 0..(1u32 << pages) {
                for cut in [false, true] {
                    let mut f = old.clone();
                    if f.len() < new.len() {
                        f.resize(new.len(), 0);
                    }
                    for p in 0..pages {
                        if mask & (1 << p) != 0 {
                            let end = ((p + 1) * 4096).min(new.len());
                            f[p * 4096..end].copy_from_slice(&new[p * 4096..end]);
                        }
                    }
                    if cut {
                        f.truncate(new.len());
                    }
                    states.push((format!("pages {mask:b} written back, cut {cut}"), f));
                }
            }
            for (what, bytes) in &states {
                std::fs::write(frame_path(dir, slot), bytes).unwrap();
                let read = read_frame(dir, slot).unwrap();
                if *bytes == new {
                    assert_eq!(read.as_ref(), Some(&new_batch), "{what}");
                } else {
                    assert_eq!(read, None, "{what} (spare {spare_nodes}, new {new_nodes})");
                }
            }
            std::fs::remove_file(frame_path(dir, slot)).unwrap();
            // Back to a clean journal for the next pair.
            let _ = std::fs::remove_file(spare_path(dir, 8));
        }
    }

    /// Red team (issue 18 spares, frame sizes): a frame [`write_frame`] makes durable (the
    /// commit point: the caller is answered) must be one [`read_frame`] reads back, or a
    /// writer killed before the epoch's files, or a machine crash before the checkpoint,
    /// loses a confirmed epoch (the roll-forward even sets it aside as torn). A record over
    /// [`MAX_RECORD`], or an epoch that is not the one after the expected one, made a frame
    /// that was written, synced and answered, but never read back. Such a batch is refused
    /// before the commit point now, and nothing is left under the frame's name.
    #[test]
    fn a_frame_that_would_not_read_back_is_refused_before_the_commit_point() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 7).unwrap();
        let mut big = batch();
        big.nodes
            .push((vec![2, 0, 0, 1, 0, 9], vec![1; MAX_RECORD + 1]));
        let mut skip = batch();
        skip.root.as_mut().unwrap().epoch = 10;
        for b in [big, skip] {
            let epoch = b.root.as_ref().unwrap().epoch;
            let written = write_frame(dir, &b);
            assert!(
                matches!(&written, Err(DirectoryStoreError::Corrupt(_))),
                "epoch {epoch}: {written:?}, read back as {:?}",
                read_frame(dir, epoch).unwrap().is_some()
            );
            assert!(!frame_path(dir, epoch).exists());
        }
        // A record of MAX_RECORD bytes is a frame, read back whole.
        let mut at_max = batch();
        at_max
            .nodes
            .push((vec![2, 0, 0, 1, 0, 9], vec![1; MAX_RECORD]));
        write_frame(dir, &at_max).unwrap();
        assert_eq!(read_frame(dir, 8).unwrap(), Some(at_max));
    }

    /// The names of the torn frames in `dir`'s journal, sorted.
    fn torn_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(journal_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("torn-"))
            .collect();
        names.sort();
        names
    }

    /// A pool whose writers keep being killed inside their frames' writes (or a full disk)
    /// leaves a torn frame per try: the journal keeps the newest [`TORN_KEPT`] (by epoch),
    /// the one just set aside always among them, each with its bytes.
    #[test]
    fn torn_frames_set_aside_are_bounded_to_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 0).unwrap();
        // Writers killed at epochs 1 to 10, then ten times at epoch 11.
        let epochs: Vec<u64> = (1..=10).chain(std::iter::repeat_n(11, 10)).collect();
        let mut set_aside_names = Vec::new();
        for (i, &epoch) in epochs.iter().enumerate() {
            std::fs::write(frame_path(dir, epoch), format!("torn frame {i}")).unwrap();
            let aside = set_aside(dir, epoch)
                .unwrap()
                .expect("a frame to set aside");
            assert!(!frame_path(dir, epoch).exists());
            let name = aside.file_name().unwrap().to_str().unwrap().to_string();
            assert!(name.starts_with(&format!("torn-{epoch:020}-")), "{name}");
            let names = torn_names(dir);
            assert!(names.contains(&name), "try {i}: {name} kept, in {names:?}");
            assert_eq!(names.len(), (i + 1).min(TORN_KEPT), "try {i}: {names:?}");
            set_aside_names.push(name);
        }
        // 20 set aside, 16 kept: the oldest four epochs (1 to 4) are gone.
        let mut want = set_aside_names[epochs.len() - TORN_KEPT..].to_vec();
        want.sort();
        assert_eq!(torn_names(dir), want);
        for (i, name) in set_aside_names.iter().enumerate() {
            let bytes = std::fs::read(journal_dir(dir).join(name));
            if i < epochs.len() - TORN_KEPT {
                assert!(bytes.is_err(), "{name} removed");
            } else {
                assert_eq!(bytes.unwrap(), format!("torn frame {i}").into_bytes());
            }
        }
        // The journal's other files are untouched.
        assert_eq!(checkpoint(dir).unwrap(), Some(0));
    }

    /// Torn frames of one epoch (a pool's writers killed again and again at the same epoch)
    /// go oldest first by modification time, whatever their names' order; a file whose name
    /// is no torn frame's is left alone.
    #[test]
    fn torn_frames_of_one_epoch_go_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 0).unwrap();
        let journal = journal_dir(dir);
        // TORN_KEPT older ones, their names in the reverse order of their times.
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for i in 0..TORN_KEPT as u64 {
            let path = journal.join(format!("torn-{:020}-{:016x}", 3, 1000 - i));
            std::fs::write(&path, b"old torn frame").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t0 + std::time::Duration::from_secs(i))
                .unwrap();
        }
        std::fs::write(journal.join("torn-notes"), b"an operator's").unwrap();
        std::fs::write(frame_path(dir, 3), b"torn again").unwrap();
        let aside = set_aside(dir, 3).unwrap().expect("a frame to set aside");
        let names = torn_names(dir);
        assert_eq!(names.len(), TORN_KEPT + 1, "{names:?}");
        // The oldest by time (the highest name) is gone; the newest by name stays.
        let oldest = format!("torn-{:020}-{:016x}", 3, 1000);
        assert!(!names.contains(&oldest), "{names:?}");
        assert!(names.contains(&format!(
            "torn-{:020}-{:016x}",
            3,
            1000 - (TORN_KEPT as u64 - 1)
        )));
        assert!(aside.exists());
        assert_eq!(
            std::fs::read(journal.join("torn-notes")).unwrap(),
            b"an operator's"
        );
    }

    #[test]
    fn frames_round_trip_and_refuse_anything_else() {
        let b = batch();
        let frame = encode(&b);
        assert_eq!(decode(&frame), Some(b.clone()));
        let mut no_head = b.clone();
        no_head.head = None;
        assert_eq!(decode(&encode(&no_head)), Some(no_head));
        // Every truncation, and one byte more, is no frame.
        for n in 0..frame.len() {
            assert_eq!(decode(&frame[..n]), None, "truncated at {n}");
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        // A flipped bit anywhere is no frame.
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "bit flipped at {i}");
        }
        // A frame whose hash matches but whose lengths lie is refused, not trusted.
        let mut lying = MAGIC.to_vec();
        lying.extend_from_slice(&7u64.to_be_bytes());
        lying.extend_from_slice(&8u64.to_be_bytes());
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        let hash = Sha256::digest(&lying);
        lying.extend_from_slice(&hash);
        assert_eq!(decode(&lying), None);
        // An epoch that is not the one after the expected one is refused.
        let mut skip = b.clone();
        skip.root.as_mut().unwrap().epoch = 10;
        assert_eq!(decode(&encode(&skip)), None);
    }
}
