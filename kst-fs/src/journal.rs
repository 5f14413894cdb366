//! The write-ahead journal of the fs key directory (feature `transparency`, Linux): each
//! epoch's batch written as one frame **in place** into a slot file of `kt/<domain>/journal/`
//! and made durable with one `fdatasync(2)` of that file, instead of a `syncfs(2)` of the whole
//! file system per epoch (docs/TRANSPARENCY.md, "Write order, as built": the fs journal).
//!
//! ```text
//! kt/<domain>/journal/slot-<nnn>           the frame of the newest epoch e with e mod 128 = nnn
//!                                          (below); overwritten in place, never renamed
//! kt/<domain>/journal/checkpoint           `KSTJ3cp\n` ‖ epoch C (8): every epoch <= C is
//!                                          durable in the tree's own files; frames <= C are
//!                                          garbage
//! kt/<domain>/journal/boot                 `KSTJ3 ` ‖ the boot id under which the frames after
//!                                          C were written (Linux's
//!                                          /proc/sys/kernel/random/boot_id; without one, a
//!                                          token of the process, `unknown_boot`)
//! kt/<domain>/journal/torn-<epoch>-<random> a torn frame's bytes set aside (its writer was
//!                                          killed writing it); never read, kept for an
//!                                          operator, the newest 16 only (`set_aside`)
//! ```
//!
//! **Why slots** (docs/BENCHMARKS.md, "Journal frames in slots"): the frame of an epoch goes
//! into the slot of its epoch modulo [`SLOTS`], written over the frame there from [`SLOTS`]
//! epochs before (under the checkpoint by then, [`room_for`]). A slot's size only changes
//! when a frame is longer than any before it, so the commit is a write over blocks the file
//! has and one `fdatasync`: no new name, no rename, no directory to `fsync`, no block to
//! allocate, so on an ext4 with a journal no commit of the file system's journal per epoch
//! (which waited for every other writer's metadata, the key store's included). Until
//! issue 18's slots a frame was renamed from a spare and the journal's directory synced
//! (version 1 below).
//!
//! A frame is the whole batch of an epoch: `KSTJ2\n` ‖ the frame's length (8) ‖ expected
//! epoch (8) ‖ epoch (8) ‖ nodes (count (4), then key length (4), key, blob length (4),
//! blob) ‖ value states (count (4), then label length (4), label, epoch (8), blob length
//! (4), blob) ‖ root (length (4), blob) ‖ head (0, or 1 ‖ length (4) ‖ head) ‖ SHA-256 of
//! all of it (32). The bytes of a slot after the frame's length are an older frame's and
//! never read. A frame that is short, whose epoch is not the one asked for (a slot holds an
//! older epoch until it is written over), or whose hash does not match (a writer died
//! writing it, or the machine crashed before its `fdatasync`: any mix of old and new pages)
//! is no frame.
//!
//! **Version 3 (this one): the tree's files at checkpoints.** The frames are the only
//! per-epoch write besides the root (29 bytes in place): the tree's own files (nodes, value
//! states, heads) are written out every [`CHECKPOINT_EVERY`] epochs, from the overlay of the
//! epochs since the checkpoint (`overlay.rs`: nodes coalesced, the newest of each), under the
//! domain's exclusive lock, then made durable by a `syncfs` before the checkpoint moves.
//! Readers read every record the epochs above the checkpoint changed from their overlay,
//! built from those frames (issue 18: the file work per epoch was the fs directory's cost,
//! docs/BENCHMARKS.md). The frames are of version 2's form. A store of version 2 (its
//! checkpoint `KSTJ2cp\n` ‖ epoch, its boot file `KSTJ2 ` ‖ id: the tree's files written after
//! every frame) is upgraded by the first process of this version that touches the domain,
//! as version 1 is below: its frames after the checkpoint replayed into the files (a dead
//! writer's durable frame with them), one `syncfs`, the checkpoint and then the boot file of
//! this version written. A kst of version 2 then takes the boot file for another boot's,
//! recovers, and refuses the checkpoint (`Corrupt`): it fails closed instead of reading
//! stale node files; one that had checked the domain before (once per process and boot)
//! read the live root over the stale files (and could sign a head of a wrong root hash,
//! which then stays: review F2) until the root moved: the first process of this version to
//! touch a domain moves it to `root.v3` and leaves a marker in `root` every older kst refuses
//! at its next read of the root (`root.rs`), so every older process fails closed. The pool is
//! still stopped whole for the upgrade: an older process writes a publication to the key store
//! before its directory commit fails (docs/OPERATIONS.md).
//!
//! **Versions 1 and 2.** Version 1 (`KSTJ1\n`, kst before the slots) kept a file per frame,
//! `journal/<epoch, 20 digits>`, renamed from `journal/spare-<nn>`, with a checkpoint file of
//! the bare 8-byte epoch and a boot file of the bare boot id. A store of version 1 is upgraded
//! by the first process of this version that touches the domain (`directory.rs`'s
//! recovery: its frames after the checkpoint written out again, one `syncfs`, then the
//! checkpoint of version 2 written, then version 1's files removed; a recovery killed at any
//! step is done again by the next process, which removes what version 1 files are left).
//! That checkpoint (16 bytes) and boot file (prefixed) are the gate, written before a
//! domain's first epoch (the recovery that makes its journal writes the checkpoint before
//! the boot file) or by the upgrade. What a kst of version 1 does then:
//!
//! - a process that touches the domain afterwards reads the boot file as another boot's and
//!   runs its recovery, which refuses the checkpoint ("is not an epoch": `Corrupt`): every
//!   read and every commit of the domain fails, closed, instead of missing the frames in
//!   slots;
//! - a process that had checked the domain before (it checks once per process and boot) is
//!   not stopped from reading: it reads the tree's files this version writes (under the
//!   same lock), but never rolls forward a frame in a slot, so after a writer of this
//!   version died between its commit point and its files it reads the root of the epoch
//!   before, with whatever nodes the dead writer had overwritten in place already, until a
//!   process of this version rolls the epoch forward; its journaled commits fail at the
//!   checkpoint (`Corrupt`).
//!
//! So a pool is upgraded by restarting every process (docs/OPERATIONS.md). A checkpoint of
//! any other form (a newer kst's) is refused here (`Corrupt`).
//!
//! The fs directory's commit (kst-fs `directory.rs`) is then: under the domain's lock, the
//! fence; the frame written and synced (**the commit point**: the caller is answered); the
//! epoch's root written, on the same thread under the same lock, unsynced (in place; readers
//! wait on the lock meanwhile), the batch added to the process's overlay; every 64 epochs
//! the write-out of the overlay's epochs above the checkpoint, then a background `syncfs(2)`
//! moves the checkpoint up. A writer that died after its frame was durable left an epoch the
//! next writer rolls forward (writes its root) before checking its own fence, and so does a
//! process's first read of the domain. After the machine crashed (the boot id changed), the
//! first process to touch the domain replays every frame after the checkpoint in order into
//! the tree's files, then syncs and moves the checkpoint: what the page cache lost is
//! written again.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use kst_core::durable::{sync_dir, write_atomic};
use kst_core::transparency::{DirectoryStoreError, RecordBatch, RootWrite, ValueStateBlob};
use sha2::{Digest, Sha256};

use crate::recent::Recent;

/// The first bytes of a frame (version 2: in a slot, its length after these).
const MAGIC: &[u8; 6] = b"KSTJ2\n";

/// The first bytes of a frame of version 1 (a file of its own), read only to upgrade.
const MAGIC_V1: &[u8; 6] = b"KSTJ1\n";

/// A frame's fixed start: magic, length, expected epoch, epoch.
const HEADER: usize = 6 + 8 + 8 + 8;

/// The first bytes of the checkpoint file of version 3 (the epoch follows): the tree's files
/// are written at checkpoints only, read through the overlay above them (`overlay.rs`).
const CHECKPOINT_MAGIC: &[u8; 8] = b"KSTJ3cp\n";

/// The first bytes of the checkpoint file of version 2 (files written after every frame),
/// read only to upgrade.
const CHECKPOINT_MAGIC_V2: &[u8; 8] = b"KSTJ2cp\n";

/// What the boot file of version 3 holds before the boot id (version 2's held `KSTJ2 `).
const BOOT_PREFIX: &str = "KSTJ3 ";

/// Largest frame read back: a batch of 512 changes at 10^6 entries is about 6 MB.
const MAX_FRAME: u64 = 64 * 1024 * 1024;

/// Largest record inside a frame (as `MAX_FILE` of the directory's files).
const MAX_RECORD: usize = 64 * 1024;

/// Every this many epochs a commit starts a checkpoint (in the background).
pub(crate) const CHECKPOINT_EVERY: u64 = 64;

/// How many slot files a journal has: the frame of epoch e goes into slot e mod `SLOTS`, over
/// the frame of epoch e − `SLOTS`, which must be under the checkpoint by then (a commit
/// checkpoints itself when it is not: [`room_for`]). Twice [`CHECKPOINT_EVERY`]: a background
/// checkpoint has 64 epochs to finish before a commit waits for one.
pub(crate) const SLOTS: u64 = 2 * CHECKPOINT_EVERY;

pub(crate) fn journal_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// The slot file the frame of `epoch` is written into.
pub(crate) fn slot_path(dir: &Path, epoch: u64) -> PathBuf {
    journal_dir(dir).join(format!("slot-{:03}", epoch % SLOTS))
}

/// Where version 1 kept the frame of `epoch` (read only to upgrade, [`read_frame_v1`]).
pub(crate) fn frame_path_v1(dir: &Path, epoch: u64) -> PathBuf {
    journal_dir(dir).join(format!("{epoch:020}"))
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

/// This boot's id (Linux), `None` where there is none (no `/proc`, as in some containers:
/// the journal is used all the same, under [`unknown_boot`]).
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

/// The boot a process that finds no boot id ([`boot_id`]) writes its frames under: a token
/// of its own, never another process's nor a real boot id, so the first process to touch a
/// domain after it (any process, on this boot or after a crash) takes its frames for
/// another boot's and replays them (crash review: before, a process without a boot id
/// used no journal at all, ignoring the frames other processes left, replayed nothing after
/// a crash and rolled no dead writer's epoch forward). Replaying frames whose files are
/// there already writes the same bytes again: the cost is a replay and a `syncfs` per
/// process and domain, at its first touch.
pub(crate) fn unknown_boot() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "unknown {} {nanos:x} {}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
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
    // The frame's length, filled in below.
    out.extend_from_slice(&0u64.to_be_bytes());
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
    let len = (out.len() + 32) as u64;
    out[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&len.to_be_bytes());
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

/// The frame's length a slot's first bytes give (version 2), `None` unless they start one
/// of a possible length.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    if bytes.get(..MAGIC.len())? != MAGIC {
        return None;
    }
    let len = u64::from_be_bytes(bytes.get(MAGIC.len()..MAGIC.len() + 8)?.try_into().ok()?);
    (len >= (HEADER + 32) as u64 && len <= MAX_FRAME).then_some(len as usize)
}

/// The batch of the frame `bytes` start with (version 2: bytes after its length are
/// ignored; version 1: exactly one frame), `None` unless they hold one whole frame.
pub(crate) fn decode(bytes: &[u8]) -> Option<RecordBatch> {
    let (frame, v2) = match frame_len(bytes) {
        Some(len) => (bytes.get(..len)?, true),
        None if bytes.starts_with(MAGIC_V1) => (bytes, false),
        None => return None,
    };
    let (body, hash) = frame.split_last_chunk::<32>()?;
    if Sha256::digest(body).as_slice() != hash {
        return None;
    }
    let mut r = Reader(body);
    r.take(MAGIC.len())?;
    if v2 {
        r.u64()?;
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

/// The slot of `epoch`, open for reading; `None` when there is none.
fn open_slot(dir: &Path, epoch: u64) -> Result<Option<std::fs::File>, DirectoryStoreError> {
    let path = slot_path(dir, epoch);
    match std::fs::File::open(&path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("open", &path, e)),
    }
}

/// Reads up to `n` bytes of `f` from `at` (fewer at its end).
fn read_at(f: &std::fs::File, at: u64, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    let mut done = 0;
    while done < n {
        match f.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// The epoch the frame in the slot of `epoch` says it is of (its first bytes only, not
/// checked against its hash), with its length; `None` when the slot starts no frame (a slot
/// cut inside its header, by a crash or a full disk, starts none).
fn slot_header(
    dir: &Path,
    f: &std::fs::File,
    epoch: u64,
) -> Result<Option<(u64, usize)>, DirectoryStoreError> {
    let head = read_at(f, 0, HEADER).map_err(|e| unavailable("read", &slot_path(dir, epoch), e))?;
    let Some(len) = frame_len(&head) else {
        return Ok(None);
    };
    let Some(said) = head.get(HEADER - 8..HEADER) else {
        return Ok(None);
    };
    let said = u64::from_be_bytes(said.try_into().unwrap_or([0; 8]));
    Ok(Some((said, len)))
}

/// Whether the slot of `epoch` starts a frame that says it is of `epoch` (whole or torn: its
/// hash is not checked), read from its first bytes alone: a reader's cheap check for a
/// writer that died after (or while) writing the frame after the stored root.
pub(crate) fn holds(dir: &Path, epoch: u64) -> Result<bool, DirectoryStoreError> {
    let Some(f) = open_slot(dir, epoch)? else {
        return Ok(false);
    };
    Ok(slot_header(dir, &f, epoch)?.is_some_and(|(said, _)| said == epoch))
}

/// `epoch`'s slot, open, and the length of the frame its header says is `epoch`'s; `None`
/// when there is no slot, no header, or the header is another epoch's.
fn slot_of(dir: &Path, epoch: u64) -> Result<Option<(std::fs::File, usize)>, DirectoryStoreError> {
    let Some(f) = open_slot(dir, epoch)? else {
        return Ok(None);
    };
    match slot_header(dir, &f, epoch)? {
        Some((said, len)) if said == epoch => Ok(Some((f, len))),
        _ => Ok(None),
    }
}

/// The frame of `epoch`, if its slot holds a whole one.
pub(crate) fn read_frame(
    dir: &Path,
    epoch: u64,
) -> Result<Option<RecordBatch>, DirectoryStoreError> {
    let Some((f, len)) = slot_of(dir, epoch)? else {
        return Ok(None);
    };
    let bytes = read_at(&f, 0, len).map_err(|e| unavailable("read", &slot_path(dir, epoch), e))?;
    Ok(decode(&bytes).filter(|b| b.root.as_ref().map(|r| r.epoch) == Some(epoch)))
}

/// The frame of `epoch` in a journal of version 1 (a file of its own), if there is a whole
/// one: read only to upgrade the journal.
pub(crate) fn read_frame_v1(
    dir: &Path,
    epoch: u64,
) -> Result<Option<RecordBatch>, DirectoryStoreError> {
    let path = frame_path_v1(dir, epoch);
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
    Ok(bytes
        .starts_with(MAGIC_V1)
        .then(|| decode(&bytes))
        .flatten()
        .filter(|b| b.root.as_ref().map(|r| r.epoch) == Some(epoch)))
}

/// The journals whose slot files this process made sure of ([`ensure_slots`]), each for as
/// long as it is used (`recent.rs`: one unused for long is made sure of again, at most 128
/// opens and a directory sync, where a process kept every journal it ever wrote to).
fn slots_ready() -> &'static Mutex<Recent<PathBuf>> {
    static READY: OnceLock<Mutex<Recent<PathBuf>>> = OnceLock::new();
    READY.get_or_init(Default::default)
}

/// Once per process and journal, under the domain's lock: creates the slot files that are
/// missing (empty) and syncs the journal's directory, so that every slot's name is durable
/// before a frame is written into it and synced with `fdatasync` alone (which makes the
/// file's data and size durable, not its name). A slot a writer killed before its directory
/// sync made is made durable by the next process's first commit here.
fn ensure_slots(dir: &Path) -> Result<(), DirectoryStoreError> {
    let journal = journal_dir(dir);
    if slots_ready()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(&journal, std::time::Instant::now())
    {
        return Ok(());
    }
    kst_core::durable::create_dir(&journal).map_err(|e| unavailable("create", &journal, e))?;
    for slot in 0..SLOTS {
        let path = slot_path(dir, slot);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unavailable("create", &path, e))?;
    }
    sync_dir(&journal).map_err(|e| unavailable("sync", &journal, e))?;
    slots_ready()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(journal, std::time::Instant::now());
    Ok(())
}

/// Writes the frame of `batch` into its slot and makes it durable: the epoch is committed
/// once this returns. Written in place at the slot's start, then one `fdatasync`: no name
/// made, none changed. The caller holds the domain's lock and made room ([`room_for`]: the
/// slot's older frame is under the checkpoint). A batch whose frame [`read_frame`] would not
/// read back ([`unreadable`]) is refused (`Corrupt`) before anything is written.
pub(crate) fn write_frame(dir: &Path, batch: &RecordBatch) -> Result<(), DirectoryStoreError> {
    let epoch = batch.root.as_ref().map_or(0, |r| r.epoch);
    let bytes = encode(batch);
    if let Some(why) = unreadable(batch, bytes.len()) {
        // Past this point the caller is answered: a frame its reader refuses would be a
        // confirmed epoch lost to a kill before its files or a crash before the checkpoint.
        return Err(DirectoryStoreError::Corrupt(format!(
            "the batch of epoch {epoch} would make a journal frame that cannot be read back \
             ({why}); nothing was written: a bug of the directory's writer, report it"
        )));
    }
    ensure_slots(dir)?;
    let path = slot_path(dir, epoch);
    let f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            if e.kind() == ErrorKind::NotFound {
                // Removed behind this process's back: made again at the next commit.
                slots_ready()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&journal_dir(dir));
            }
            return Err(unavailable("open", &path, e));
        }
    };
    let written = f
        .write_all_at(&bytes, 0)
        .map_err(|e| ("write", e))
        .and_then(|()| {
            fault::check(dir, fault::Fault::FrameSync)
                .and_then(|()| f.sync_data())
                .map_err(|e| ("sync", e))
        });
    if let Err((op, e)) = written {
        return Err(poison(dir, epoch, &f, op, &e));
    }
    Ok(())
}

/// After the write or the `fdatasync` of `epoch`'s frame into its slot (open as `f`) failed
/// (`op`, `e`): the epoch is not committed (its caller is told so), yet the frame may be
/// whole in the page cache (Linux keeps the pages of a failed write-back, and a later
/// `fdatasync` through another descriptor reports no error), where a later roll-forward or
/// replay would read it and commit the epoch its caller was told failed (crash review F2).
/// So its first bytes are blanked (the slot cut to nothing if that write fails: the older
/// frame there is under the checkpoint, [`room_for`]), then synced again: no reader of this
/// boot takes it, and once that sync succeeds no replay after a crash does either. Returns
/// the commit's error, which says how far the blanking went.
fn poison(
    dir: &Path,
    epoch: u64,
    f: &std::fs::File,
    op: &str,
    e: &std::io::Error,
) -> DirectoryStoreError {
    let path = slot_path(dir, epoch);
    let failed = format!(
        "the journal frame of epoch {epoch} could not be made durable ({op} {}: {e}): the \
         epoch is not committed",
        path.display()
    );
    let blanked = f.write_all_at(&[0; 6], 0).or_else(|_| f.set_len(0));
    let synced = match &blanked {
        Ok(()) => fault::check(dir, fault::Fault::BlankSync).and_then(|()| f.sync_data()),
        Err(_) => Ok(()),
    };
    match (blanked, synced) {
        (Ok(()), Ok(())) => {
            tracing::error!(dir = %dir.display(), epoch, error = %e, "key directory: a journal frame's {op} failed; the epoch is not committed and its frame was blanked (check the disk; the next commit tries again)");
            DirectoryStoreError::Unavailable(format!(
                "{failed} (its frame was blanked; check the disk, the next commit tries again)"
            ))
        }
        (Ok(()), Err(sync)) => {
            tracing::error!(dir = %dir.display(), epoch, error = %e, blank = %sync, "key directory: a journal frame's {op} failed, and the sync of its blanking too; the epoch is not committed, but a replay after a crash may find the frame whole and commit it: check the disk");
            DirectoryStoreError::Unavailable(format!(
                "{failed} (its frame was blanked, but that did not reach the disk: {sync}; a \
                 replay after a crash may still find the frame; check the disk)"
            ))
        }
        (Err(blank), _) => {
            tracing::error!(dir = %dir.display(), epoch, error = %e, blank = %blank, "key directory: a journal frame's {op} failed, and so did blanking it; a later read or replay may take the frame for a committed epoch: stop kst and check the disk");
            DirectoryStoreError::Unavailable(format!(
                "{failed}, and its frame could not be blanked ({blank}): a later read may \
                 still take it for a committed epoch; stop kst and check the disk"
            ))
        }
    }
}

/// Before the frame of `epoch` is written, under the domain's lock (`epoch − 1` is the
/// stored root): when its slot's older frame, of `epoch` − [`SLOTS`], is still above the
/// checkpoint (a background checkpoint is late or failed, or the process never lived long
/// enough to reach one), writes every epoch up to `epoch − 1` out to the tree's files and
/// makes them durable (`sync`: the write-out, one `syncfs`) and moves the checkpoint to
/// `epoch − 1` first. Whether it did.
pub(crate) fn room_for(
    dir: &Path,
    epoch: u64,
    sync: impl FnOnce() -> Result<(), DirectoryStoreError>,
) -> Result<bool, DirectoryStoreError> {
    let checkpoint = checkpoint(dir)?.unwrap_or(0);
    if epoch.saturating_sub(checkpoint) <= SLOTS {
        return Ok(false);
    }
    sync()?;
    set_checkpoint(dir, epoch - 1)?;
    Ok(true)
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

/// What [`set_aside`] did with a torn frame.
#[derive(Debug)]
pub(crate) enum Aside {
    /// Its bytes were copied to this file (kept for an operator, never read).
    Kept(PathBuf),
    /// Its bytes could not be copied (why: a full disk, most often); the slot was blanked all
    /// the same.
    Lost(String),
}

impl Aside {
    /// The file the torn frame's bytes were copied to, if they were.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> Option<&Path> {
        match self {
            Aside::Kept(path) => Some(path),
            Aside::Lost(_) => None,
        }
    }
}

/// Under the domain's lock, when `epoch`'s frame is no whole frame ([`read_frame`] found
/// none) but its slot starts one that says it is of `epoch` ([`holds`]): copies the slot's
/// bytes (up to the length that start gives) to `journal/torn-<epoch>-<random>` (kept for
/// an operator, never read again), then blanks the slot's first bytes, so that it no longer
/// looks like a frame of `epoch` to readers; returns what it did. Its writer was killed
/// writing it (or its write or sync failed, [`write_frame`]), before its commit point (the
/// frame's sync), so it was never confirmed: no epoch. A copy that fails (a full disk: the
/// torn frame is what a writer left when the disk filled up) does not stop the blanking: the
/// bytes lost are a frame no caller was told is committed, and keeping the slot as it is
/// would stop every read and commit of the domain for good ([`Aside::Lost`], logged as an
/// error with the reason). A slot that holds an older epoch's frame is left alone (a crash
/// may need it until the checkpoint passes it). Then keeps at most [`TORN_KEPT`] torn
/// frames ([`prune_torn`]): the older ones are removed, each logged; one that cannot be
/// removed is logged and left (the set-aside stands).
pub(crate) fn set_aside(dir: &Path, epoch: u64) -> Result<Option<Aside>, DirectoryStoreError> {
    let Some((f, len)) = slot_of(dir, epoch)? else {
        return Ok(None);
    };
    let path = slot_path(dir, epoch);
    let aside = journal_dir(dir).join(format!("torn-{epoch:020}-{:016x}", rand_suffix()));
    let copied = read_at(&f, 0, len)
        .map_err(|e| format!("read {}: {e}", path.display()))
        .and_then(|bytes| {
            fault::check(dir, fault::Fault::AsideCopy)
                .and_then(|()| std::fs::write(&aside, &bytes))
                .map_err(|e| {
                    // A copy cut short by the full disk is no use to anyone: not left behind.
                    let _ = std::fs::remove_file(&aside);
                    format!("write {}: {e}", aside.display())
                })
        });
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|w| w.write_all_at(&[0; 6], 0))
        .map_err(|e| unavailable("blank", &path, e))?;
    match copied {
        Ok(()) => {
            if let Err(e) = prune_torn(dir, &aside, TORN_KEPT) {
                tracing::warn!(dir = %journal_dir(dir).display(), error = %e, "key directory: could not remove old torn journal frames; they stay until the next frame is set aside (remove old journal/torn-* files by hand if the disk is full)");
            }
            Ok(Some(Aside::Kept(aside)))
        }
        Err(why) => {
            tracing::error!(dir = %journal_dir(dir).display(), epoch, bytes = len, error = %why, "key directory: a torn journal frame (no epoch: its writer never reached its commit point, no caller was told it is committed) could not be copied aside; its slot was blanked all the same, its bytes are lost (free disk space: the next torn frame is kept)");
            Ok(Some(Aside::Lost(why)))
        }
    }
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
    let path = slot_path(dir, epoch);
    std::fs::File::open(&path)
        .and_then(|f| f.sync_data())
        .map_err(|e| unavailable("sync", &path, e))?;
    let journal = journal_dir(dir);
    sync_dir(&journal).map_err(|e| unavailable("sync", &journal, e))
}

/// A checkpoint file as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Version 1's (the bare epoch): the journal is to be upgraded (`directory.rs`'s recovery).
    V1(u64),
    /// Version 2's (`KSTJ2cp`: the tree's files written after every frame): to be upgraded
    /// the same way.
    V2(u64),
    /// This version's (`KSTJ3cp`: the tree's files written at checkpoints only).
    V3(u64),
}

/// The checkpoint file as stored; `None` before the journal started. One of another form (a
/// newer kst's journal) is refused: `Corrupt`, so this kst fails closed on it.
pub(crate) fn stored_checkpoint(dir: &Path) -> Result<Option<Stored>, DirectoryStoreError> {
    let path = checkpoint_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("read", &path, e)),
    };
    if let Ok(e) = <[u8; 8]>::try_from(bytes.as_slice()) {
        return Ok(Some(Stored::V1(u64::from_be_bytes(e))));
    }
    let epoch = |e: &[u8]| u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
    match (
        bytes.strip_prefix(CHECKPOINT_MAGIC.as_slice()),
        bytes.strip_prefix(CHECKPOINT_MAGIC_V2.as_slice()),
    ) {
        (Some(e), _) if e.len() == 8 => Ok(Some(Stored::V3(epoch(e)))),
        (_, Some(e)) if e.len() == 8 => Ok(Some(Stored::V2(epoch(e)))),
        _ => Err(DirectoryStoreError::Corrupt(format!(
            "{} is not a checkpoint of this kst's journal (a newer kst's?): run the kst that \
             wrote it, or restore the domain's directory",
            path.display()
        ))),
    }
}

/// The checkpoint's epoch; `None` before the journal started. A journal of version 1 or 2
/// not yet upgraded is refused (`Corrupt`): only the recovery upgrades it (`directory.rs`).
pub(crate) fn checkpoint(dir: &Path) -> Result<Option<u64>, DirectoryStoreError> {
    match stored_checkpoint(dir)? {
        None => Ok(None),
        Some(Stored::V3(e)) => Ok(Some(e)),
        Some(Stored::V1(_) | Stored::V2(_)) => Err(DirectoryStoreError::Corrupt(format!(
            "{} is the journal of an older kst, not upgraded yet (a bug: the first process \
             to touch the domain upgrades it; report it)",
            journal_dir(dir).display()
        ))),
    }
}

/// Starts the journal (its directory and slots, the checkpoint at `epoch`: every epoch up to
/// it is durable already) unless it is started.
pub(crate) fn start(dir: &Path, epoch: u64) -> Result<(), DirectoryStoreError> {
    if checkpoint(dir)?.is_some() {
        return Ok(());
    }
    set_checkpoint(dir, epoch)
}

/// Moves the checkpoint to `epoch` (durably; the caller made every epoch up to it durable),
/// in this version's form, after the slots' names are durable ([`ensure_slots`]); then cuts
/// the slots larger than [`SLOT_MAX`] that hold no frame above it to nothing, so that the
/// slots keep at most 128 times that much disk between checkpoints beyond what frames above
/// the checkpoint need.
pub(crate) fn set_checkpoint(dir: &Path, epoch: u64) -> Result<(), DirectoryStoreError> {
    ensure_slots(dir)?;
    let path = checkpoint_path(dir);
    let mut bytes = CHECKPOINT_MAGIC.to_vec();
    bytes.extend_from_slice(&epoch.to_be_bytes());
    write_atomic(&path, &bytes).map_err(|e| unavailable("write", &path, e))?;
    for slot in 0..SLOTS {
        let path = slot_path(dir, slot);
        let f = match std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(unavailable("open", &path, e)),
        };
        let len = f
            .metadata()
            .map_err(|e| unavailable("stat", &path, e))?
            .len();
        if len <= SLOT_MAX {
            continue;
        }
        if slot_header(dir, &f, slot)?.is_some_and(|(said, _)| said > epoch) {
            continue;
        }
        f.set_len(0).map_err(|e| unavailable("cut", &path, e))?;
    }
    Ok(())
}

/// Slots larger than this are cut at a checkpoint ([`set_checkpoint`]) once their frame is
/// under it (the frames of a run at c=8 were 3 to 25 kB, at c=32 up to about 100 kB).
pub(crate) const SLOT_MAX: u64 = 1024 * 1024;

/// After the checkpoint of this version was written (the gate: no kst of version 1 that
/// touches the domain reads or commits any more), by every recovery: removes the frames
/// (`journal/<epoch>`) and spares (`journal/spare-<nn>`) of a journal of version 1, garbage
/// now (none but in a journal upgraded, maybe by a recovery killed before it removed them
/// all); returns how many went. One that cannot be removed is logged and left (never read).
pub(crate) fn remove_v1(dir: &Path) -> Result<usize, DirectoryStoreError> {
    let journal = journal_dir(dir);
    let entries = match std::fs::read_dir(&journal) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(unavailable("list", &journal, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| unavailable("list", &journal, e))?;
        let name = entry.file_name();
        let v1 = name.to_str().is_some_and(|n| {
            (n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit())) || n.starts_with("spare-")
        });
        if !v1 {
            continue;
        }
        crate::directory::cut::step()?;
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "key directory: cannot remove a frame of the older journal (never read again); remove it by hand");
            }
        }
    }
    Ok(removed)
}

/// The boot id the journal's frames were written under; `None` when there is none, or when
/// the boot file is not of this version (version 1's bare id: the journal is to be upgraded).
pub(crate) fn boot(dir: &Path) -> Result<Option<String>, DirectoryStoreError> {
    let path = boot_path(dir);
    match std::fs::read(&path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b)
            .strip_prefix(BOOT_PREFIX)
            .map(str::to_string)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("read", &path, e)),
    }
}

/// Records that the frames from now on are written under `boot` (durably), in this version's
/// form (a kst of version 1 takes it for another boot's and then refuses the checkpoint).
pub(crate) fn set_boot(dir: &Path, boot: &str) -> Result<(), DirectoryStoreError> {
    let journal = journal_dir(dir);
    kst_core::durable::create_dir(&journal).map_err(|e| unavailable("create", &journal, e))?;
    let path = boot_path(dir);
    write_atomic(&path, format!("{BOOT_PREFIX}{boot}").as_bytes())
        .map_err(|e| unavailable("write", &path, e))
}

/// I/O errors a test injects into the journal's writes, by domain directory (a test's
/// stand-in for a full disk or a failing one, `fault::inject`); outside tests none is.
pub(crate) mod fault {
    use std::path::Path;

    /// Where an error is injected.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub(crate) enum Fault {
        /// [`super::set_aside`]'s copy of a torn frame (`ENOSPC`).
        AsideCopy,
        /// [`super::write_frame`]'s `fdatasync` of the frame (`EIO`), the frame written.
        FrameSync,
        /// The `fdatasync` of a failed frame's blanking ([`super::poison`], `EIO`).
        BlankSync,
        /// The root's write after a durable frame (`directory.rs`'s `write_epoch_root`,
        /// `EIO`).
        RootWrite,
    }

    #[cfg(test)]
    type Injected = std::collections::HashMap<(std::path::PathBuf, Fault), usize>;

    #[cfg(test)]
    static INJECTED: std::sync::LazyLock<std::sync::Mutex<Injected>> =
        std::sync::LazyLock::new(Default::default);

    /// Makes the next `times` passes of `dir`'s journal at `fault` fail.
    #[cfg(test)]
    pub(crate) fn inject(dir: &Path, fault: Fault, times: usize) {
        INJECTED
            .lock()
            .unwrap()
            .insert((dir.to_path_buf(), fault), times);
    }

    /// The error injected at `fault` for `dir`, if any is left (each pass uses one).
    #[inline]
    pub(crate) fn check(dir: &Path, fault: Fault) -> std::io::Result<()> {
        #[cfg(test)]
        {
            let mut injected = INJECTED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(left) = injected.get_mut(&(dir.to_path_buf(), fault))
                && *left > 0
            {
                *left -= 1;
                // Linux's ENOSPC (28) and EIO (5).
                return Err(std::io::Error::from_raw_os_error(match fault {
                    Fault::AsideCopy => 28,
                    Fault::FrameSync | Fault::BlankSync | Fault::RootWrite => 5,
                }));
            }
        }
        let _ = (dir, fault);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// [`batch`] at `epoch`, with `n` nodes of 1500 bytes of `fill`.
    fn with_nodes(epoch: u64, n: usize, fill: u8) -> RecordBatch {
        let mut b = batch();
        b.root.as_mut().unwrap().expected_epoch = Some(epoch - 1);
        b.root.as_mut().unwrap().epoch = epoch;
        b.nodes = (0..n)
            .map(|i| (vec![2, 0, 0, 1, 0, i as u8], vec![fill; 1500]))
            .collect();
        b
    }

    /// The frame of an epoch goes into the slot of its epoch modulo [`SLOTS`], over the frame
    /// there, in place: the same file (inode), its name never changed; the slot's older
    /// frame is no frame of the new epoch and the new one no frame of the older.
    #[test]
    fn frames_are_written_in_place_into_their_slots() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 7).unwrap();
        assert_eq!(checkpoint(dir).unwrap(), Some(7));
        for slot in 0..SLOTS {
            assert!(
                slot_path(dir, slot).exists(),
                "slot {slot} made at the start"
            );
        }
        let old = with_nodes(8, 5, 0xaa);
        write_frame(dir, &old).unwrap();
        assert_eq!(read_frame(dir, 8).unwrap(), Some(old.clone()));
        assert!(holds(dir, 8).unwrap() && !holds(dir, 9).unwrap());
        let ino = std::fs::metadata(slot_path(dir, 8)).unwrap().ino();
        set_checkpoint(dir, 8).unwrap();
        // Epoch 8 + SLOTS, shorter, over it.
        let new = with_nodes(8 + SLOTS, 2, 0xbb);
        write_frame(dir, &new).unwrap();
        let meta = std::fs::metadata(slot_path(dir, 8)).unwrap();
        assert_eq!(meta.ino(), ino, "the same file");
        assert_eq!(
            meta.len() as usize,
            encode(&old).len(),
            "never cut by a write"
        );
        assert_eq!(read_frame(dir, 8 + SLOTS).unwrap(), Some(new));
        assert_eq!(read_frame(dir, 8).unwrap(), None, "the older frame is gone");
        assert!(!holds(dir, 8).unwrap());
        let others: Vec<String> = std::fs::read_dir(journal_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with("slot-"))
            .collect();
        assert_eq!(others, ["checkpoint"], "no file per frame");
    }

    /// A commit whose slot still holds a frame above the checkpoint (the background
    /// checkpoint late) moves the checkpoint itself first, after syncing: no frame a crash
    /// may need is ever written over.
    #[test]
    fn a_slot_is_reused_only_under_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 0).unwrap();
        let synced = std::cell::Cell::new(0);
        let sync = || {
            synced.set(synced.get() + 1);
            Ok(())
        };
        assert!(!room_for(dir, 1, sync).unwrap());
        assert!(!room_for(dir, SLOTS, sync).unwrap());
        assert_eq!(synced.get(), 0);
        assert_eq!(checkpoint(dir).unwrap(), Some(0));
        // Epoch SLOTS + 1 goes where epoch 1 is, above the checkpoint: sync, checkpoint.
        assert!(room_for(dir, SLOTS + 1, sync).unwrap());
        assert_eq!(synced.get(), 1);
        assert_eq!(checkpoint(dir).unwrap(), Some(SLOTS));
        // A failed sync moves nothing.
        let failed = room_for(dir, 2 * SLOTS + 1, || {
            Err(DirectoryStoreError::Unavailable("syncfs: EIO".into()))
        });
        assert!(failed.is_err());
        assert_eq!(checkpoint(dir).unwrap(), Some(SLOTS));
    }

    /// Slots larger than [`SLOT_MAX`] are cut to nothing at a checkpoint once their frame is
    /// under it, not before: the slots never hold more than 128 times that between
    /// checkpoints, beyond the frames above the checkpoint.
    #[test]
    fn only_slots_up_to_slot_max_are_kept_whole() {
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
        assert!(std::fs::metadata(slot_path(dir, 9)).unwrap().len() > SLOT_MAX);
        set_checkpoint(dir, 8).unwrap();
        assert_eq!(
            read_frame(dir, 9).unwrap(),
            Some(big),
            "above the checkpoint: kept"
        );
        set_checkpoint(dir, 9).unwrap();
        assert_eq!(std::fs::metadata(slot_path(dir, 9)).unwrap().len(), 0);
        assert!(
            std::fs::metadata(slot_path(dir, 8)).unwrap().len() > 0,
            "a small one is kept"
        );
        // The next frame of slot 9 is written into it, whole.
        let mut next = batch();
        next.root.as_mut().unwrap().expected_epoch = Some(8 + SLOTS);
        next.root.as_mut().unwrap().epoch = 9 + SLOTS;
        write_frame(dir, &next).unwrap();
        assert_eq!(read_frame(dir, 9 + SLOTS).unwrap(), Some(next));
    }

    /// Red team (slots): every state a writer killed, or a machine crashed, anywhere in
    /// [`write_frame`] can leave in a slot: the older frame alone, the new bytes written
    /// over it up to any byte, or pages written back in any order; a slot longer or shorter
    /// than the new frame. Only the whole new frame is a frame of its epoch; the older
    /// epoch is never taken for it, nor is any mix. A torn slot that says it is of the new
    /// epoch is set aside (its bytes kept, its start blanked), one that does not is left
    /// alone.
    #[test]
    fn no_state_of_a_slot_written_over_but_the_whole_frame_is_a_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 7).unwrap();
        let slot = 8 + SLOTS;
        for (old_nodes, new_nodes) in [(7, 3), (3, 7), (4, 4)] {
            let old_batch = with_nodes(8, old_nodes, 0xaa);
            let new_batch = with_nodes(slot, new_nodes, 0xbb);
            let old = encode(&old_batch);
            let new = encode(&new_batch);
            std::fs::write(slot_path(dir, 8), &old).unwrap();
            write_frame(dir, &new_batch).unwrap();
            assert_eq!(read_frame(dir, slot).unwrap(), Some(new_batch.clone()));
            // (what, the slot's bytes, whether to set it aside too: for the first bytes and
            // every 61st prefix, and every order of pages; the rest are read only.)
            let mut states: Vec<(String, Vec<u8>, bool)> =
                vec![("the old frame alone".into(), old.clone(), true)];
            let overlay = |k: usize| {
                let mut f = old.clone();
                if f.len() < k {
                    f.resize(k, 0);
                }
                f[..k].copy_from_slice(&new[..k]);
                f
            };
            for k in 0..=new.len() {
                let aside = k <= HEADER + 1 || k.is_multiple_of(61) || k + 1 >= new.len();
                states.push((format!("{k} bytes written"), overlay(k), aside));
            }
            let pages = new.len().div_ceil(4096);
            for mask in 0..(1u32 << pages) {
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
                states.push((format!("pages {mask:b} written back"), f, true));
            }
            for (what, bytes, check_aside) in &states {
                // Over the file, not through a cut to nothing (ext4 writes back a file cut to
                // nothing and written again when it is closed: slow, and not the real case).
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(slot_path(dir, slot))
                    .unwrap();
                f.write_all_at(bytes, 0).unwrap();
                f.set_len(bytes.len() as u64).unwrap();
                let whole = bytes.starts_with(&new);
                let read = read_frame(dir, slot).unwrap();
                if whole {
                    assert_eq!(read.as_ref(), Some(&new_batch), "{what}");
                    continue;
                }
                assert_eq!(read, None, "{what} (old {old_nodes}, new {new_nodes})");
                assert_eq!(
                    read_frame(dir, 8).unwrap().is_some(),
                    bytes.starts_with(&old),
                    "{what}"
                );
                if !check_aside {
                    continue;
                }
                let says_new = holds(dir, slot).unwrap();
                let aside = set_aside(dir, slot).unwrap();
                assert_eq!(aside.is_some(), says_new, "{what}");
                if let Some(aside) = aside {
                    let aside = aside.kept().expect("copied aside");
                    assert!(bytes.starts_with(&std::fs::read(aside).unwrap()), "{what}");
                    assert!(!holds(dir, slot).unwrap(), "{what}: blanked");
                    assert_eq!(read_frame(dir, slot).unwrap(), None);
                }
            }
        }
    }

    /// Red team (issue 18 spares, frame sizes): a frame [`write_frame`] makes durable (the
    /// commit point: the caller is answered) must be one [`read_frame`] reads back, or a
    /// writer killed before the epoch's files, or a machine crash before the checkpoint,
    /// loses a confirmed epoch (the roll-forward even sets it aside as torn). A record over
    /// [`MAX_RECORD`], or an epoch that is not the one after the expected one, made a frame
    /// that was written, synced and answered, but never read back. Such a batch is refused
    /// before the commit point now, and nothing is written into its slot.
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
            assert_eq!(std::fs::metadata(slot_path(dir, epoch)).unwrap().len(), 0);
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

    /// A torn frame of `epoch` in its slot: the frame's first `n` bytes (its start says
    /// `epoch`, its hash cannot match).
    fn tear(dir: &Path, epoch: u64, n: usize) -> Vec<u8> {
        let mut b = batch();
        b.root.as_mut().unwrap().expected_epoch = Some(epoch - 1);
        b.root.as_mut().unwrap().epoch = epoch;
        let frame = encode(&b);
        let torn = frame[..n.clamp(HEADER, frame.len() - 1)].to_vec();
        std::fs::write(slot_path(dir, epoch), &torn).unwrap();
        torn
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
        let mut torn_bytes = Vec::new();
        for (i, &epoch) in epochs.iter().enumerate() {
            torn_bytes.push(tear(dir, epoch, HEADER + i));
            let aside = set_aside(dir, epoch)
                .unwrap()
                .expect("a frame to set aside");
            let aside = aside.kept().expect("copied aside");
            assert!(!holds(dir, epoch).unwrap());
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
                assert_eq!(bytes.unwrap(), torn_bytes[i]);
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
        tear(dir, 3, HEADER + 5);
        let aside = set_aside(dir, 3).unwrap().expect("a frame to set aside");
        let aside = aside.kept().expect("copied aside");
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

    /// Crash review F4 (issue 18): a writer killed inside its frame's write on a full disk
    /// leaves a torn frame after the root, and the copy of it aside fails on the same full
    /// disk (`ENOSPC`). The slot is blanked all the same (the torn frame is no epoch: no
    /// caller was told it is committed), so the domain goes on; before, the failed copy
    /// stopped `set_aside` before the blanking, and every read and commit of the domain failed
    /// on that slot for good. No partial copy is left behind.
    #[test]
    fn a_torn_frame_that_cannot_be_copied_aside_is_blanked_all_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 0).unwrap();
        tear(dir, 1, HEADER + 40);
        fault::inject(dir, fault::Fault::AsideCopy, 1);
        let aside = set_aside(dir, 1).unwrap();
        assert!(
            matches!(&aside, Some(Aside::Lost(why)) if why.contains("torn-")),
            "{aside:?}"
        );
        assert!(!holds(dir, 1).unwrap(), "blanked");
        assert_eq!(read_frame(dir, 1).unwrap(), None);
        assert!(torn_names(dir).is_empty(), "{:?}", torn_names(dir));
        // Nothing left to set aside; the next frame of the epoch is written and read whole.
        assert!(set_aside(dir, 1).unwrap().is_none());
        let mut b = batch();
        b.root.as_mut().unwrap().expected_epoch = Some(0);
        b.root.as_mut().unwrap().epoch = 1;
        write_frame(dir, &b).unwrap();
        assert_eq!(read_frame(dir, 1).unwrap(), Some(b));
    }

    /// A slot cut inside its header (after the magic and the length, before the epoch: a
    /// crash or a full disk in the frame's first write) is no frame, and reading it panics
    /// nowhere (it did: the header's epoch was sliced out of fewer bytes).
    #[test]
    fn a_slot_shorter_than_a_header_is_no_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 0).unwrap();
        let mut b = batch();
        b.root.as_mut().unwrap().expected_epoch = Some(0);
        b.root.as_mut().unwrap().epoch = 1;
        let frame = encode(&b);
        for n in 0..HEADER {
            std::fs::write(slot_path(dir, 1), &frame[..n]).unwrap();
            assert!(!holds(dir, 1).unwrap(), "cut at {n}");
            assert_eq!(read_frame(dir, 1).unwrap(), None, "cut at {n}");
            set_aside(dir, 1).unwrap();
        }
        write_frame(dir, &b).unwrap();
        assert_eq!(read_frame(dir, 1).unwrap(), Some(b));
    }

    #[test]
    fn frames_round_trip_and_refuse_anything_else() {
        let b = batch();
        let frame = encode(&b);
        assert_eq!(decode(&frame), Some(b.clone()));
        let mut no_head = b.clone();
        no_head.head = None;
        assert_eq!(decode(&encode(&no_head)), Some(no_head));
        // Every truncation is no frame; bytes after it (an older frame's) are not read.
        for n in 0..frame.len() {
            assert_eq!(decode(&frame[..n]), None, "truncated at {n}");
        }
        let mut longer = frame.clone();
        longer.extend_from_slice(&frame);
        assert_eq!(decode(&longer), Some(b.clone()));
        // A flipped bit anywhere is no frame.
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "bit flipped at {i}");
        }
        // A frame whose hash matches but whose lengths lie is refused, not trusted.
        let mut lying = MAGIC.to_vec();
        lying.extend_from_slice(&((HEADER + 4 + 32) as u64).to_be_bytes());
        lying.extend_from_slice(&7u64.to_be_bytes());
        lying.extend_from_slice(&8u64.to_be_bytes());
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        let hash = Sha256::digest(&lying);
        lying.extend_from_slice(&hash);
        assert_eq!(decode(&lying), None);
        // A length over MAX_FRAME is refused before anything is read.
        let mut huge = frame.clone();
        huge[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        assert_eq!(frame_len(&huge), None);
        // An epoch that is not the one after the expected one is refused.
        let mut skip = b.clone();
        skip.root.as_mut().unwrap().epoch = 10;
        assert_eq!(decode(&encode(&skip)), None);
    }

    /// A frame of version 1 as that kst wrote it (`KSTJ1\n`, no length, a file of its own).
    pub(crate) fn encode_v1(batch: &RecordBatch) -> Vec<u8> {
        let v2 = encode(batch);
        let mut out = MAGIC_V1.to_vec();
        out.extend_from_slice(&v2[MAGIC.len() + 8..v2.len() - 32]);
        let hash = Sha256::digest(&out);
        out.extend_from_slice(&hash);
        out
    }

    /// Frames of version 1 are read (by name, exact length) to upgrade the journal; a frame
    /// of version 1 in a slot, or of version 2 under a name of version 1, is none.
    #[test]
    fn frames_of_version_1_are_read_to_upgrade() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(journal_dir(dir)).unwrap();
        let b = batch();
        std::fs::write(frame_path_v1(dir, 8), encode_v1(&b)).unwrap();
        assert_eq!(read_frame_v1(dir, 8).unwrap(), Some(b.clone()));
        assert_eq!(read_frame_v1(dir, 9).unwrap(), None);
        let mut longer = encode_v1(&b);
        longer.push(0);
        std::fs::write(frame_path_v1(dir, 8), &longer).unwrap();
        assert_eq!(read_frame_v1(dir, 8).unwrap(), None);
        std::fs::write(frame_path_v1(dir, 8), encode(&b)).unwrap();
        assert_eq!(read_frame_v1(dir, 8).unwrap(), None);
        std::fs::write(slot_path(dir, 8), encode_v1(&b)).unwrap();
        assert_eq!(read_frame(dir, 8).unwrap(), None);
    }

    /// The gate: this version's checkpoint and boot file are of forms a kst of version 1
    /// refuses (it read the checkpoint as exactly 8 bytes, "is not an epoch" otherwise, and
    /// the boot file as the bare boot id); version 1's are read as such here; any other form
    /// of checkpoint is refused (`Corrupt`), so a kst never misreads a newer journal.
    /// How kst of version 2 (before the tree's files were written at checkpoints) read the
    /// checkpoint file: 8 bytes are version 1's epoch, `KSTJ2cp\n` ‖ 8 bytes its own, any
    /// other form `Corrupt` (its `stored_checkpoint`); and its boot file (`KSTJ2 ` ‖ id).
    pub(crate) fn version_2_reads(dir: &Path) -> (Result<Option<u64>, ()>, Option<String>) {
        let cp = std::fs::read(checkpoint_path(dir)).ok().map(|bytes| {
            if bytes.len() == 8 {
                return Err(());
            }
            match bytes.strip_prefix(b"KSTJ2cp\n".as_slice()) {
                Some(e) if e.len() == 8 => Ok(u64::from_be_bytes(e.try_into().unwrap())),
                _ => Err(()),
            }
        });
        let boot = std::fs::read(boot_path(dir)).ok().and_then(|b| {
            String::from_utf8_lossy(&b)
                .strip_prefix("KSTJ2 ")
                .map(str::to_string)
        });
        (cp.transpose(), boot)
    }

    #[test]
    fn the_checkpoint_and_boot_gate_the_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        start(dir, 5).unwrap();
        set_boot(dir, "boot-1").unwrap();
        let cp = std::fs::read(checkpoint_path(dir)).unwrap();
        assert_ne!(cp.len(), 8, "version 1 reads 8 bytes as an epoch");
        assert_ne!(std::fs::read(boot_path(dir)).unwrap(), b"boot-1");
        assert_eq!(boot(dir).unwrap().as_deref(), Some("boot-1"));
        assert_eq!(stored_checkpoint(dir).unwrap(), Some(Stored::V3(5)));
        // Version 2 refuses this version's checkpoint and takes its boot file for another
        // boot's (so it recovers, and stops at the checkpoint).
        assert_eq!(version_2_reads(dir), (Err(()), None));
        // Version 2's files.
        std::fs::write(checkpoint_path(dir), b"KSTJ2cp\n\0\0\0\0\0\0\0\x07").unwrap();
        std::fs::write(boot_path(dir), b"KSTJ2 boot-1").unwrap();
        assert_eq!(version_2_reads(dir), (Ok(Some(7)), Some("boot-1".into())));
        assert_eq!(stored_checkpoint(dir).unwrap(), Some(Stored::V2(7)));
        assert!(matches!(
            checkpoint(dir),
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(boot(dir).unwrap(), None, "version 2's: to be upgraded");
        // Version 1's files.
        std::fs::write(checkpoint_path(dir), 9u64.to_be_bytes()).unwrap();
        std::fs::write(boot_path(dir), b"boot-1").unwrap();
        assert_eq!(stored_checkpoint(dir).unwrap(), Some(Stored::V1(9)));
        assert!(matches!(
            checkpoint(dir),
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert!(matches!(
            start(dir, 9),
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(
            boot(dir).unwrap(),
            None,
            "not this version's: to be upgraded"
        );
        // A newer form.
        std::fs::write(checkpoint_path(dir), b"KSTJ4cp\n\0\0\0\0\0\0\0\x09").unwrap();
        assert!(matches!(
            stored_checkpoint(dir),
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert!(matches!(
            checkpoint(dir),
            Err(DirectoryStoreError::Corrupt(_))
        ));
    }
}
