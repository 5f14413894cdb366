//! The key directory's records on the filesystem (feature `transparency`): kst-fs's
//! [`DirectoryStore`], under `<store>/kt/<domain>/`.
//!
//! ```text
//! kt/<domain>/root.v3                   epoch (8 bytes, big-endian) ‖ the root record
//!                                       (with the journal: Linux; `root.rs`)
//! kt/<domain>/root                      with the journal `KSTR3\n`, a marker every older
//!                                       kst refuses (`root.rs`); without it the root
//! kt/<domain>/nodes/<xx>/<node key hex> one tree node (xx: the label's first byte)
//! kt/<domain>/values/<sha256(label)>/<epoch, 20 digits>   one value state
//! kt/<domain>/lock                      flock(2) of the writer committing a batch
//! kt/<domain>/intent                    flock(2) a writer takes first: new readers wait
//! kt/<domain>/heads/<epoch, 20 digits>  the signed head of an epoch (created once, by link)
//! kt/<domain>/cosignatures/<epoch, 20 digits>/<witness hex>   a witness's cosignature
//! kt/<domain>/cosignatures/<epoch, 20 digits>/<witness hex>.at    when it was checked
//! kt/<domain>/witnesses/<witness hex>   epoch (8 bytes) ‖ the witness's newest cosignature
//! kt/<domain>/journal/                  the write-ahead journal (Linux): 128 slot files the
//!                                       frames are written into in place, the checkpoint
//!                                       and the boot id (`journal.rs`)
//! ```
//!
//! A head is written to a temporary file, synced, and hard-linked to its name: the link fails
//! when a head is there already, so the first writer's head stays (insert-if-absent without
//! the exclusive lock; heads are read and inserted under the shared lock, so after the files
//! of a commit under way, whose head is among them). A cosignature is written (durable replace) under the domain's lock unless the one
//! stored for that epoch and witness was checked later (its `.at` file), then the witness's
//! newest one if its epoch is not older than the stored one.
//!
//! A writer killed half-way leaves its temporary files (`.tmp-...`); a commit removes them
//! after its answer, at most every 10 minutes per process (`sweep_temporaries`: in `heads/`
//! only old ones, as `insert_head` writes there under the shared lock).
//!
//! A commit takes the domain's lock and checks the fence against `root`. On Linux (the
//! journal) it then writes the whole batch as one frame in place into its slot,
//! `journal/slot-<epoch mod 128>`, with one `fdatasync(2)` of that file (no name made or
//! changed, so no directory to sync): **the commit point**, where the caller is answered.
//! Then, on the same blocking thread and still holding the lock, the epoch's root is written
//! in place (29 bytes, within a sector), unsynced, and the batch added to the store's
//! overlay of the domain (`overlay.rs`); readers wait on the lock meanwhile. The tree's own
//! files (nodes, value states, heads) are not written per epoch (journal version 3,
//! `journal.rs`): every 64 epochs the commit, after its answer and under the lock, writes
//! out the overlay's epochs above the checkpoint (nodes coalesced, the newest of each,
//! overwritten in place; value states; heads linked), and a background `syncfs(2)` makes
//! them durable and moves the journal's checkpoint (a commit whose slot still holds a frame
//! above it does both itself first, `journal.rs`). Every read of the tree (nodes, value
//! states, heads) brings its overlay to the stored root (the frames other processes of a
//! pool committed since) and reads a record from its file only when no epoch above the
//! checkpoint changed it: the files hold every epoch up to the checkpoint and nothing newer
//! than the root. So an epoch costs one small file's flush and the root's write. A writer
//! that died after its frame left an epoch the next commit (or a process's first read of
//! the domain) rolls forward (writes its root) before its own fence; after the machine
//! crashed (another boot id) the first process to touch the domain replays the frames
//! after the checkpoint into the tree's files, then syncs (a process without a boot id
//! replays them at its first touch, `journal::unknown_boot`); a stored root above the
//! frames it replays is refused (`Corrupt`, [`above_the_journal`]). A store written by a
//! kst from before the journal is read as it is; the first touch of this kst starts the
//! journal at the stored root, and moves the root to `root.v3` (`root.rs`): every older
//! kst then refuses the domain at its next read of the root (it would read the tree's files
//! alone, stale above the checkpoint). A journal of version 1 (a file per frame) or 2 (the
//! tree's files after every frame) is upgraded by the first process to touch the domain, and
//! a kst of that version then fails closed on it (`journal.rs`, "Versions").
//!
//! Without the journal (elsewhere, and for akd's first root, written once per directory)
//! the nodes and value states are written, made durable at once, and the root written last
//! (durable replace); "at once" is one `syncfs(2)` on Linux, each file and directory synced
//! elsewhere. Each read takes the lock shared, so it never sees a commit half-way; the root
//! is the commit point for readers (see `kst_core::transparency::storage` for why a crash
//! half-way is harmless).
//!
//! Waiting for the lock holds no permit of the directory's lane ([`crate::pool`]): within
//! one process, reads and commits take the domain's turn first (`turns`: shared and
//! exclusive, first come, first served; a commit keeps it until its files are written), and
//! a read or a commit that finds the `flock` held by another process of the pool lets its
//! permit go and tries again after a pause (`reading`, [`FsDirectoryStore`]'s `commit`). So
//! one domain's lock, held long by a stalled process, never stops the other domains. A
//! writer takes the domain's `intent` exclusively before the lock and keeps it; readers take
//! it shared only while they take the lock, so a writer waits only for the reads under way
//! (`flock` alone grants new shared locks to another process's flood of reads for ever).

use std::collections::{BTreeSet, HashSet};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use async_trait::async_trait;
use fs4::fs_std::FileExt;
use kst_core::durable::{sync_dir, write_atomic};
use kst_core::transparency::{
    DirectoryStore, DirectoryStoreError, RecordBatch, RootAndNodes, RootWrite, check_domain,
};
use sha2::{Digest, Sha256};

use crate::journal;
use crate::overlay::{self, Overlay, Overlays};
use crate::pool::Lane;
use crate::recent::Recent;
use crate::root;

/// Directory of the key directories, under the store's root.
pub(crate) const KT_DIR: &str = "kt";
/// Largest file read back (a record is at most a few hundred bytes).
const MAX_FILE: u64 = 64 * 1024;

/// The key directories of an fs store.
#[derive(Debug, Clone)]
pub struct FsDirectoryStore {
    root: PathBuf,
    /// This boot's id (or this process's token, where there is none) when epochs are
    /// committed through the journal (Linux), else `None`.
    boot: Option<String>,
    /// The overlay of each domain's epochs above the tree's files (`overlay.rs`), when
    /// epochs are committed through the journal.
    overlays: std::sync::Arc<Mutex<Overlays>>,
}

/// A domain's overlay (`overlay.rs`), shared by the reads and commits of one store.
type Ov = std::sync::Arc<Mutex<Overlay>>;

impl FsDirectoryStore {
    /// The directories kept in the fs store at `store_root` (the `[store] path`); nothing is
    /// created until the first write.
    pub fn new(store_root: impl AsRef<Path>) -> Self {
        Self::with_found_boot(store_root, journal::boot_id())
    }

    /// [`FsDirectoryStore::new`] where the machine's boot id is `found`: on Linux the
    /// journal is used under it, or, where there is none, under a token of this process
    /// ([`journal::unknown_boot`], one per process), so that every process replays the
    /// frames the others left when it first touches a domain.
    fn with_found_boot(store_root: impl AsRef<Path>, found: Option<String>) -> Self {
        static UNKNOWN: OnceLock<String> = OnceLock::new();
        FsDirectoryStore {
            root: store_root.as_ref().join(KT_DIR),
            boot: SYNCFS.then(|| {
                found.unwrap_or_else(|| UNKNOWN.get_or_init(journal::unknown_boot).clone())
            }),
            overlays: Default::default(),
        }
    }

    /// [`FsDirectoryStore::new`] as if the machine had booted with `boot` (a test's stand-in
    /// for a reboot); `None`: without the journal, as kst wrote before it.
    #[cfg(test)]
    fn with_boot(store_root: impl AsRef<Path>, boot: Option<&str>) -> Self {
        FsDirectoryStore {
            root: store_root.as_ref().join(KT_DIR),
            boot: boot.map(str::to_string),
            overlays: Default::default(),
        }
    }

    fn domain_dir(&self, domain: &str) -> Result<PathBuf, DirectoryStoreError> {
        check_domain(domain)?;
        Ok(self.root.join(domain))
    }

    /// The overlay of the domain at `dir` (made empty at first use, and after it was
    /// dropped unused, [`Overlays`]); `None` without the journal (the files hold every
    /// epoch).
    fn overlay(&self, dir: &Path) -> Option<Ov> {
        self.boot.as_ref()?;
        let (ov, idle) = self
            .overlays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(dir, std::time::Instant::now());
        // Those unused for long, freed once the store's overlays are let go (review L5).
        drop(idle);
        Some(ov)
    }
}

/// `ov`, locked (a panic of another holder leaves nothing half-done that matters: the
/// overlay is rebuilt from the frames when it is behind or ahead of the root).
fn locked(ov: &Ov) -> std::sync::MutexGuard<'_, Overlay> {
    ov.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The stored root, with `ov` brought to it ([`overlay::sync`]), under the domain's lock.
fn tree_root(dir: &Path, ov: Option<&Ov>) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    let root = root::read_root(dir, ov.is_some())?;
    if let (Some(ov), Some((epoch, _))) = (ov, &root) {
        overlay::sync(dir, &mut locked(ov), *epoch)?;
    }
    Ok(root)
}

/// The nodes with these keys at the stored root (missing ones left out): from the overlay
/// where an epoch above the files wrote them, else from their files.
fn tree_nodes(
    dir: &Path,
    ov: Option<&Ov>,
    keys: &[Vec<u8>],
) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
    let Some(ov) = ov else {
        return read_nodes(dir, keys);
    };
    let above: Vec<Option<Vec<u8>>> = {
        let ov = locked(ov);
        keys.iter().map(|k| ov.node(k).cloned()).collect()
    };
    let mut out = Vec::with_capacity(keys.len());
    for (key, above) in keys.iter().zip(above) {
        match above {
            Some(blob) => out.push(blob),
            None => out.extend(read(&node_path(dir, key))?),
        }
    }
    Ok(out)
}

/// The value states of `label` at the stored root: its files', and the overlay's over them.
fn tree_value_states(
    dir: &Path,
    ov: Option<&Ov>,
    label: &[u8],
) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
    let files = list_files(&values_dir(dir, label), |name| name.parse::<u64>().ok())?;
    let Some(ov) = ov else {
        return Ok(files);
    };
    let mut states: std::collections::BTreeMap<u64, Vec<u8>> = files.into_iter().collect();
    states.extend(locked(ov).value_states(label));
    Ok(states.into_iter().collect())
}

/// The head of `epoch`: its file, else the overlay's (its frame's). The first head stored
/// for an epoch stays: one inserted before the epoch's batch ([`insert_head`]) is in its
/// file, and the write-out, which links the frame's, keeps it.
fn tree_head(
    dir: &Path,
    ov: Option<&Ov>,
    epoch: u64,
) -> Result<Option<Vec<u8>>, DirectoryStoreError> {
    if let Some(head) = read(&heads_dir(dir).join(epoch_name(epoch)))? {
        return Ok(Some(head));
    }
    Ok(ov.and_then(|ov| locked(ov).head(epoch).cloned()))
}

fn node_path(dir: &Path, key: &[u8]) -> PathBuf {
    // The key is kind (1) ‖ bit length (4) ‖ label (32): shard on the label's first byte.
    let shard = key
        .get(5)
        .map_or_else(|| "00".to_string(), |b| format!("{b:02x}"));
    dir.join("nodes").join(shard).join(hex::encode(key))
}

fn values_dir(dir: &Path, label: &[u8]) -> PathBuf {
    dir.join("values").join(hex::encode(Sha256::digest(label)))
}

pub(crate) fn unavailable(op: &str, path: &Path, e: impl std::fmt::Display) -> DirectoryStoreError {
    DirectoryStoreError::Unavailable(format!("{op} {}: {e}", path.display()))
}

/// Reads `path`; `None` when it does not exist. One path lookup (the open), then the open
/// file's length and bytes (a `stat` of the path before cost a lookup per read).
pub(crate) fn read(path: &Path) -> Result<Option<Vec<u8>>, DirectoryStoreError> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("open", path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| unavailable("stat", path, e))?
        .len();
    if len > MAX_FILE {
        return Err(DirectoryStoreError::Corrupt(format!(
            "{} is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    // Bounded all the same: the file may grow between the stat and the read.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unavailable("read", path, e))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(DirectoryStoreError::Corrupt(format!(
            "{} is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// The stored nodes with these keys (missing ones left out).
fn read_nodes(dir: &Path, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(blob) = read(&node_path(dir, key))? {
            out.push(blob);
        }
    }
    Ok(out)
}

/// The stored root with the journal (`root.rs`: `root.v3`).
fn read_root(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    root::read_v3(dir)
}

/// Whether one `syncfs(2)` makes a batch durable (else each file and directory is synced).
const SYNCFS: bool = cfg!(target_os = "linux");

/// Writes `bytes` to `path` through a temporary file, renamed into place; synced first unless
/// [`SYNCFS`] (then the caller syncs the file system); the caller makes the directory durable.
fn write_unsynced_dir(path: &Path, bytes: &[u8]) -> Result<(), DirectoryStoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| unavailable("create", dir, e))?;
    let temp = dir.join(format!(".tmp-{:016x}", rand_suffix()));
    let result = (|| {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(bytes)?;
        if !SYNCFS {
            f.sync_all()?;
        }
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(unavailable("write", path, e));
    }
    Ok(())
}

/// A suffix for temporary names: unique enough within one writer holding the domain's lock.
fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Holds the exclusive lock of one domain's directory while it lives.
struct DomainLock {
    _file: std::fs::File,
    /// A writer's intent, held exclusively with the lock ([`INTENT`]); `None` for a reader.
    _intent: Option<std::fs::File>,
}

/// The file whose `flock` a writer takes exclusively before the domain's lock, and keeps
/// with it: readers take it shared only while they take the lock, and give up (to try again)
/// while a writer holds it. `flock` itself grants a new shared lock while a writer waits, so
/// without it another process's flood of reads, each holding the lock shared in turn, kept
/// the writer's commit waiting for ever (`another_processs_flood_of_reads_starves_no_commit`).
const INTENT: &str = "intent";

/// `op` (a `flock` that does not wait) again while interrupted: whether it was granted.
fn try_flock(
    file: &std::fs::File,
    path: &Path,
    op: fn(&std::fs::File) -> std::io::Result<bool>,
) -> Result<bool, DirectoryStoreError> {
    loop {
        match op(file) {
            Ok(granted) => return Ok(granted),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(unavailable("lock", path, e)),
        }
    }
}

/// `op` (a `flock` that waits) again while interrupted.
fn wait_flock(
    file: &std::fs::File,
    path: &Path,
    op: fn(&std::fs::File) -> std::io::Result<()>,
) -> Result<(), DirectoryStoreError> {
    loop {
        match op(file) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(unavailable("lock", path, e)),
        }
    }
}

impl DomainLock {
    /// The shared lock readers take, if it is free now: no read sees a commit half-way (a
    /// tree node written for the next epoch next to one not yet written). [`Shared::Busy`]
    /// while a writer holds the lock: the read waits for it without a permit of the
    /// directory's lane ([`reading`]).
    fn try_shared(dir: &Path) -> Result<Shared, DirectoryStoreError> {
        let path = dir.join("lock");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Shared::Held(None)),
            Err(e) => return Err(unavailable("open", &path, e)),
        };
        // A writer's intent first (none in a store no writer of this build wrote yet):
        // held only until the lock is, so a writer waiting for it bars new readers.
        let intent_path = dir.join(INTENT);
        let intent = match std::fs::File::open(&intent_path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(unavailable("open", &intent_path, e)),
        };
        if let Some(intent) = &intent
            && !try_flock(intent, &intent_path, FileExt::try_lock_shared)?
        {
            return Ok(Shared::Busy);
        }
        if !try_flock(&file, &path, FileExt::try_lock_shared)? {
            return Ok(Shared::Busy);
        }
        Ok(Shared::Held(Some(DomainLock {
            _file: file,
            _intent: None,
        })))
    }

    /// The domain's lock, exclusive, after the writer's intent ([`INTENT`]), waiting for both.
    fn acquire(dir: &Path) -> Result<DomainLock, DirectoryStoreError> {
        let (intent, intent_path) = Self::open_exclusive(dir, INTENT)?;
        wait_flock(&intent, &intent_path, FileExt::lock_exclusive)?;
        let (file, path) = Self::open_exclusive(dir, "lock")?;
        wait_flock(&file, &path, FileExt::lock_exclusive)?;
        Ok(DomainLock {
            _file: file,
            _intent: Some(intent),
        })
    }

    /// [`DomainLock::acquire`] if no other writer holds the intent now (`None` while one
    /// does); then it waits only for the readers under the lock now (no new one comes in).
    fn try_acquire(dir: &Path) -> Result<Option<DomainLock>, DirectoryStoreError> {
        let (intent, intent_path) = Self::open_exclusive(dir, INTENT)?;
        if !try_flock(&intent, &intent_path, FileExt::try_lock_exclusive)? {
            return Ok(None);
        }
        let (file, path) = Self::open_exclusive(dir, "lock")?;
        wait_flock(&file, &path, FileExt::lock_exclusive)?;
        Ok(Some(DomainLock {
            _file: file,
            _intent: Some(intent),
        }))
    }

    /// The domain's file `name` (the lock, the intent), made if missing, opened to be
    /// locked exclusively.
    fn open_exclusive(
        dir: &Path,
        name: &str,
    ) -> Result<(std::fs::File, PathBuf), DirectoryStoreError> {
        let path = dir.join(name);
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        };
        // The domain's directory made only when it is missing (not probed per commit).
        let file = match open() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| unavailable("create", dir, e))?;
                open()
            }
            other => other,
        }
        .map_err(|e| unavailable("open", &path, e))?;
        Ok((file, path))
    }
}

/// A read's hold on its domain's lock ([`DomainLock::try_shared`], [`read_lock`]).
enum Shared {
    /// The lock held shared (`None`: the domain has no lock file, nothing committed yet).
    Held(Option<DomainLock>),
    /// A writer (of this process or another of the pool) holds the lock now.
    Busy,
}

/// The domains (with the boot id) this process found free of frames a machine crash left:
/// checked once per process and domain, and again once unused for [`crate::recent::IDLE`]
/// (`recent.rs`: a process that touched many domains kept an entry of each for good).
fn recovered() -> &'static Mutex<Recent<(PathBuf, String)>> {
    static RECOVERED: OnceLock<Mutex<Recent<(PathBuf, String)>>> = OnceLock::new();
    RECOVERED.get_or_init(Default::default)
}

fn is_recovered(dir: &Path, boot: &str) -> bool {
    recovered()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .contains(
            &(dir.to_path_buf(), boot.to_string()),
            std::time::Instant::now(),
        )
}

/// Records that this process found `dir` recovered under `boot` ([`recovered`]).
fn set_recovered(dir: &Path, boot: &str) {
    recovered()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            (dir.to_path_buf(), boot.to_string()),
            std::time::Instant::now(),
        );
}

/// Before this process first reads or writes the directory of `dir`: when its journal's
/// frames were written under another boot (the machine crashed or restarted since), they
/// are replayed first ([`recover_locked`]). Nothing to do without a journal (`boot` is
/// `None`) or once checked.
fn ensure_recovered(dir: &Path, boot: Option<&str>) -> Result<(), DirectoryStoreError> {
    try_recover(dir, boot, true).map(drop)
}

/// [`ensure_recovered`]; without `wait`, `false` (nothing done) when the domain must be
/// recovered or rolled forward while another holds its lock: a read then waits for the lock
/// without a permit of the directory's lane ([`read_lock`], [`reading`]).
fn try_recover(dir: &Path, boot: Option<&str>, wait: bool) -> Result<bool, DirectoryStoreError> {
    let Some(boot) = boot else { return Ok(true) };
    // Without a lock file nothing was committed (nothing to recover), unless an older
    // release's root is there (its `lock` left out by a restore, review L1): that one is
    // moved like any other.
    if is_recovered(dir, boot) || (!dir.join("lock").exists() && !root::path_legacy(dir).exists()) {
        return Ok(true);
    }
    if journal::boot(dir)?.as_deref() == Some(boot)
        && journal::stored_checkpoint(dir)?.is_some()
        && root::moved(dir)?
        && !dead_writer(dir)?
        && !headless_root(dir)?
    {
        set_recovered(dir, boot);
        return Ok(true);
    }
    let _lock = if wait {
        DomainLock::acquire(dir)?
    } else {
        match DomainLock::try_acquire(dir)? {
            Some(lock) => lock,
            None => return Ok(false),
        }
    };
    recover_locked(dir, boot)?;
    sweep_temporaries(dir);
    roll_forward(dir).map(|_| true).inspect_err(|_| {
        // Not rolled forward: the next read tries again.
        forget_recovered(dir, boot);
    })
}

/// Whether a durable frame lies after the stored root: a writer (of this process or another
/// of the pool) passed its commit point and died, or failed, before the root's file was
/// written. Under the shared lock nobody is writing an epoch's files, so such a frame is
/// always one to roll forward.
fn dead_writer(dir: &Path) -> Result<bool, DirectoryStoreError> {
    Ok(match read_root(dir)? {
        Some((e, _)) => journal::holds(dir, e + 1)?,
        None => false,
    })
}

/// The shared lock a read of `dir` holds, after [`ensure_recovered`], or [`Shared::Busy`]
/// while a writer holds it (or holds the lock a recovery or a roll-forward needs) (the read tries again later, [`reading`]). A read that finds, once
/// it holds the lock, that a commit's files failed to be written after its answer (the commit
/// then made this process check again, [`write_files`]) lets the lock go and rolls the epoch
/// forward first, so no read sees the root of one epoch with files of the next.
fn read_lock(dir: &Path, boot: Option<&str>) -> Result<Shared, DirectoryStoreError> {
    for _ in 0..3 {
        if !try_recover(dir, boot, false)? {
            return Ok(Shared::Busy);
        }
        let shared = match DomainLock::try_shared(dir)? {
            Shared::Held(Some(shared)) => shared,
            other => return Ok(other),
        };
        match boot {
            Some(boot) if !is_recovered(dir, boot) => drop(shared),
            // Another process of the pool died (or failed) between its commit point and
            // its files: roll its epoch forward before reading. Or a root was put back into
            // `root` behind this process's back (a partial restore: older kst would read it):
            // moved again, as at a first touch (`root.rs`; review L2).
            Some(boot) if dead_writer(dir)? || !root::moved(dir)? => {
                drop(shared);
                forget_recovered(dir, boot);
            }
            _ => return Ok(Shared::Held(Some(shared))),
        }
    }
    Err(DirectoryStoreError::Unavailable(format!(
        "{}: an epoch's files keep failing to be written",
        dir.display()
    )))
}

/// Makes this process's next read of `dir` check again for an epoch whose frame is durable
/// but whose files are not all written ([`ensure_recovered`]), and roll it forward.
fn forget_recovered(dir: &Path, boot: &str) {
    recovered()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&(dir.to_path_buf(), boot.to_string()));
}

/// Whether the stored root's epoch has no head while its frame, still in the journal, carries
/// one: a writer of a build that renamed the root into place before linking the head died
/// between the two ([`materialize`] links the head first now). Checked once per process
/// ([`ensure_recovered`]) and by every commit ([`roll_forward`]), which link that head.
fn headless_root(dir: &Path) -> Result<bool, DirectoryStoreError> {
    let Some((e, _)) = read_root(dir)? else {
        return Ok(false);
    };
    if above_the_files(dir, e)? || heads_dir(dir).join(epoch_name(e)).exists() {
        return Ok(false);
    }
    Ok(journal::read_frame(dir, e)?.is_some_and(|frame| frame.head.is_some()))
}

/// Whether epoch `epoch` is above the checkpoint of a journal of this version: its head is
/// served from its frame (`overlay.rs`) until a write-out links it, so a missing head file
/// is no head missing.
fn above_the_files(dir: &Path, epoch: u64) -> Result<bool, DirectoryStoreError> {
    Ok(matches!(journal::stored_checkpoint(dir)?, Some(journal::Stored::V3(c)) if epoch > c))
}

/// How old a head's temporary file (`heads/.tmp-...`) must be before [`sweep_temporaries`]
/// removes it: [`insert_head`] writes its temporary under the shared lock (or none, before
/// the first commit made the lock file), so another process may be writing a fresh one.
/// No live writer keeps one for minutes (it writes, syncs and links a few hundred bytes); one
/// stalled longer loses it: its link then fails, a temporary error (`Unavailable`).
const STALE_HEAD_TEMP: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// How often a process sweeps a domain's temporary files ([`sweep_temporaries`]): at its
/// first commit (or recovery) of the domain and then at most this often, so a commit does
/// not list `heads/` (a file per epoch) each time.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// When this process last swept each domain's temporary files.
fn swept() -> &'static Mutex<std::collections::HashMap<PathBuf, std::time::Instant>> {
    static SWEPT: OnceLock<Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>> =
        OnceLock::new();
    SWEPT.get_or_init(Default::default)
}

/// Under the domain's exclusive lock (after a commit's answer and files, [`commit`], or a
/// process's recovery, [`ensure_recovered`]), at most every [`SWEEP_EVERY`] per process
/// and domain: removes the
/// temporary files (`.tmp-...`) a writer killed half-way left. In the domain's directory and
/// in `journal/` every writer of a temporary holds the exclusive lock, so each one there is
/// a dead writer's and goes. In `heads/`, [`insert_head`] writes under the shared lock, so
/// only temporaries older than [`STALE_HEAD_TEMP`] go. (`nodes/`, `values/` and
/// `cosignatures/` are not listed: on Linux their files are written in place or rarely.)
/// A failure is logged: the next sweep tries again.
fn sweep_temporaries(dir: &Path) {
    {
        let mut swept = swept().lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if swept
            .get(dir)
            .is_some_and(|at| now.duration_since(*at) < SWEEP_EVERY)
        {
            return;
        }
        // The domains swept longer ago than SWEEP_EVERY count as never swept: dropped, so
        // a process that touched many domains keeps no entry of each for good.
        swept.retain(|_, at| now.saturating_duration_since(*at) < SWEEP_EVERY);
        swept.insert(dir.to_path_buf(), now);
    }
    let mut removed = 0usize;
    for (place, min_age) in [
        (dir.to_path_buf(), None),
        (journal::journal_dir(dir), None),
        (heads_dir(dir), Some(STALE_HEAD_TEMP)),
    ] {
        match remove_temporaries(&place, min_age) {
            Ok(n) => removed += n,
            Err(e) => {
                tracing::warn!(dir = %place.display(), error = %e, "key directory: cannot remove the temporary files a killed writer left; the next sweep tries again");
            }
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "key directory: removed temporary files a killed writer left");
    }
}

/// Removes the files of `place` named `.tmp-...` (older than `min_age`, when given); returns
/// how many went. A file gone meanwhile is no error.
fn remove_temporaries(
    place: &Path,
    min_age: Option<std::time::Duration>,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(place) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(kst_core::durable::TEMP_PREFIX))
        {
            continue;
        }
        if let Some(min_age) = min_age {
            let modified = match entry.metadata().and_then(|m| m.modified()) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // A time in the future (a clock set back) counts as young.
            if !matches!(now.duration_since(modified), Ok(age) if age >= min_age) {
                continue;
            }
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Under the domain's lock: writes the files of a durable frame a dead writer left after
/// the stored root (its epoch is committed); else links the stored root's head from its
/// frame when the head is missing ([`headless_root`]). Returns the stored root's epoch
/// afterwards. A file after the root that is no whole frame (its writer was killed writing
/// it, before its commit point: never confirmed, no epoch) is set aside
/// ([`journal::set_aside`]), or every read would take it for a dead writer's epoch
/// ([`dead_writer`]) and fail.
fn roll_forward(dir: &Path) -> Result<Option<u64>, DirectoryStoreError> {
    let stored = read_root(dir)?;
    if let Some((e, _)) = stored {
        match journal::read_frame(dir, e + 1)? {
            Some(frame) => {
                journal::sync_frame(dir, e + 1)?;
                // Its root alone: the tree's files are written at checkpoints, and every
                // overlay reads its frame (`overlay.rs`).
                if let Some(root) = &frame.root {
                    write_epoch_root(dir, root)?;
                }
                tracing::info!(dir = %dir.display(), epoch = e + 1, "key directory: rolled forward an epoch whose writer died after its commit point");
                return Ok(Some(e + 1));
            }
            None => match journal::set_aside(dir, e + 1)? {
                Some(journal::Aside::Kept(aside)) => {
                    tracing::warn!(dir = %dir.display(), epoch = e + 1, file = %aside.display(), "key directory: a writer died writing its epoch's journal frame (before its commit point: no epoch); the torn frame is set aside");
                }
                Some(journal::Aside::Lost(why)) => {
                    tracing::warn!(dir = %dir.display(), epoch = e + 1, error = %why, "key directory: a writer died writing its epoch's journal frame (before its commit point: no epoch); the torn frame was blanked, not kept");
                }
                None => {}
            },
        }
    }
    if let Some((e, blob)) = &stored
        && !above_the_files(dir, *e)?
        && !heads_dir(dir).join(epoch_name(*e)).exists()
        && let Some(frame) = journal::read_frame(dir, *e)?
        && let (Some(root), Some(head)) = (&frame.root, &frame.head)
        && root.epoch == *e
        && root.blob == *blob
    {
        link_head(dir, *e, head)?;
        tracing::info!(dir = %dir.display(), epoch = e, "key directory: linked the head an epoch's frame carries (its writer died between the root and the head)");
    }
    Ok(stored.map(|(e, _)| e))
}

/// [`ensure_recovered`] under the domain's lock: the frames after the checkpoint, in order,
/// have their files written again (the page cache that held them is gone); a stored root
/// past them is refused, nothing written (`Corrupt`, [`above_the_journal`]: epochs without
/// a durable frame, whose files may be lost); then one `syncfs`, the checkpoint moved to
/// the stored root (the frames are garbage then), and this boot recorded. A journal of
/// version 1 (a file per frame; its boot file is not of this version, so it always comes
/// here) is replayed the same way from its own frames, whatever the boot, and upgraded: the
/// checkpoint of this version written (a kst of version 1 refuses the domain from then on),
/// then its frames and spares removed. A domain without a journal gets one started at its
/// stored root (durable: written the old way), the checkpoint, this version's gate, before
/// the boot file.
fn recover_locked(dir: &Path, boot: &str) -> Result<(), DirectoryStoreError> {
    if is_recovered(dir, boot) {
        return Ok(());
    }
    // Before anything else: every older kst refuses the domain from here on (`root.rs`).
    if root::move_to_v3(dir)? {
        tracing::info!(dir = %dir.display(), "key directory: moved the root to root.v3 (journal version 3): a kst older than this one refuses the domain now");
    }
    if journal::boot(dir)?.as_deref() != Some(boot) {
        if let Some(found) = journal::stored_checkpoint(dir)? {
            let (checkpoint, v1, older) = match found {
                journal::Stored::V1(e) => (e, true, true),
                journal::Stored::V2(e) => (e, false, true),
                journal::Stored::V3(e) => (e, false, false),
            };
            let stored = read_root(dir)?.map(|(e, _)| e);
            let mut frames = Vec::new();
            let mut epoch = checkpoint;
            loop {
                let next = if v1 {
                    journal::read_frame_v1(dir, epoch + 1)?
                } else {
                    journal::read_frame(dir, epoch + 1)?
                };
                let Some(frame) = next else { break };
                frames.push(frame);
                epoch += 1;
            }
            if let Some(root) = stored
                && root > epoch
            {
                return Err(above_the_journal(dir, root, checkpoint, epoch));
            }
            let to_sync = open_for_sync(dir)?;
            for frame in &frames {
                materialize(dir, frame)?;
            }
            cut::step()?;
            sync_opened(dir, &to_sync)?;
            let durable = read_root(dir)?.map_or(checkpoint, |(e, _)| e);
            cut::step()?;
            // Of this version: the gate a kst of version 1 stops at.
            journal::set_checkpoint(dir, durable)?;
            if older {
                tracing::info!(dir = %dir.display(), checkpoint = durable, "key directory: upgraded the journal to version 3 (tree files at checkpoints; a kst older than this one refuses the domain now)");
            }
            if !frames.is_empty() {
                tracing::warn!(
                    dir = %dir.display(),
                    checkpoint,
                    epochs = frames.len(),
                    root = durable,
                    "key directory: replayed the journal's epochs after a restart of the machine (or, without a boot id, at a process's first touch of the domain)"
                );
            }
        } else {
            // The journal starts here, its gate first (crash review F3): the checkpoint of
            // this version before the boot file, so a kst of version 1 touching the domain
            // from now on fails closed on it ("is not an epoch"), where with no checkpoint
            // it took the domain over (its own journal, its bare boot id) until this
            // version's first journaled commit. At the stored root: every epoch up to it
            // was written the old way, synced (akd's first root; a kst from before the
            // journal, or without it).
            journal::start(dir, read_root(dir)?.map_or(0, |(e, _)| e))?;
        }
        // Version 1's files are garbage once this version's checkpoint is written, and every
        // recovery removes those left: an upgrade killed after the checkpoint (its boot file
        // still version 1's, so the next process recovers again) is finished by the next,
        // where before they stayed for good.
        let removed = journal::remove_v1(dir)?;
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "key directory: removed the files of the journal of an older kst");
        }
        cut::step()?;
        journal::set_boot(dir, boot)?;
    } else if journal::stored_checkpoint(dir)?.is_none() {
        // This boot's, without the gate: a domain a kst from before the gate was written at
        // made (its boot file, akd's first root, no journaled commit yet).
        journal::start(dir, read_root(dir)?.map_or(0, |(e, _)| e))?;
    }
    set_recovered(dir, boot);
    Ok(())
}

/// The error of a recovery that finds the stored root, of epoch `root`, above `last`, the
/// last epoch whose frame the journal replays from its checkpoint, `checkpoint` (crash review
/// F2): epochs `last` + 1 to `root` have no durable frame, so their files, written unsynced,
/// may be lost with the machine's restart, and the root is not served on them. Kst writes
/// no such epoch (a frame whose sync failed is blanked, `journal.rs`'s `write_frame`); a kst
/// from before that did (it rolled such a frame forward), and so does a kst from before the
/// journal (it syncs each epoch and writes no frame: its epochs are durable, and the error
/// says how to accept them).
fn above_the_journal(dir: &Path, root: u64, checkpoint: u64, last: u64) -> DirectoryStoreError {
    let checkpoint_file = journal::journal_dir(dir).join("checkpoint");
    tracing::error!(dir = %dir.display(), root, checkpoint, last, "key directory: the stored root is above the journal's last frame after a restart of the machine; the domain is refused until an operator acts");
    DirectoryStoreError::Corrupt(format!(
        "{}: the stored root is of epoch {root}, but the journal's frames after its checkpoint \
         (epoch {checkpoint}) stop at epoch {last}: epochs {} to {root} have no durable frame \
         (a frame whose sync failed, rolled forward by an older kst, or commits of a kst from \
         before the journal), and after the machine's restart their files may be lost, so the \
         domain is refused. If a kst from before the journal committed them (it syncs every \
         epoch) while no frame lay above the checkpoint (it reads the tree's files alone), \
         remove {} and the journal starts again at the stored root; otherwise restore the \
         domain's directory from a backup",
        dir.display(),
        last + 1,
        checkpoint_file.display()
    ))
}

/// Writes the files of an epoch whose frame is durable: nodes and value states (overwritten
/// in place, not synced), its head (linked unless one is there), then the root, last
/// ([`write_root`]: in place). A reader at the old epoch still reads the old epoch meanwhile (a
/// node keeps its previous value), and a writer that dies half-way leaves the frame for the
/// next one: the frame lies after the stored root until the root is written, so whatever
/// came before it is written again ([`roll_forward`]). The head goes before the root for
/// that reason: a writer that died between a root written first and its head (a one-shot
/// `kst deliver` exits while its log's thread writes the files) left the epoch committed
/// without its head and nothing to roll forward; the next one to need the head signed it
/// late with its own clock (`a_writer_dying_anywhere_in_its_files_leaves_its_head`).
fn materialize(dir: &Path, batch: &RecordBatch) -> Result<(), DirectoryStoreError> {
    for (key, blob) in &batch.nodes {
        cut::step()?;
        write_in_place(&node_path(dir, key), blob)?;
    }
    for vs in &batch.value_states {
        cut::step()?;
        let path = values_dir(dir, &vs.label).join(format!("{:020}", vs.epoch));
        write_in_place(&path, &vs.blob)?;
    }
    let Some(root) = &batch.root else {
        return Ok(());
    };
    if let Some(head) = &batch.head {
        cut::step()?;
        link_head(dir, root.epoch, head)?;
    }
    cut::step()?;
    write_root(dir, &root_bytes(root))
}

/// The root of an epoch whose frame is durable, written ([`write_root`]) after a commit's
/// frame or by a roll-forward: the tree's other files wait for a checkpoint.
fn write_epoch_root(dir: &Path, root: &RootWrite) -> Result<(), DirectoryStoreError> {
    cut::step()?;
    journal::fault::check(dir, journal::fault::Fault::RootWrite)
        .map_err(|e| unavailable("write", &root::path_v3(dir), e))?;
    write_root(dir, &root_bytes(root))
}

/// The largest root file [`write_root`] overwrites in place: one disk sector, written whole
/// or not at all when the machine fails (the root file is 29 bytes).
const ROOT_IN_PLACE_MAX: u64 = 512;

/// Writes the root file of an epoch whose frame is durable, unsynced: overwritten in place
/// when it is as long as the one stored (always, the root record having a fixed length) and
/// fits in a sector, else through a temporary file renamed into place. In place, a single
/// write of a few bytes at offset 0 is whole or absent for a writer killed meanwhile, and
/// readers wait on the domain's lock; a machine that fails before the next checkpoint has the
/// epoch's frame replayed. A temporary name and `rename` cost an inode allocated and one
/// freed per epoch, which on an ext4 without a journal costs far more than the write (its
/// allocator skips every recently freed inode one by one: docs/BENCHMARKS.md).
fn write_root(dir: &Path, bytes: &[u8]) -> Result<(), DirectoryStoreError> {
    use std::os::unix::fs::FileExt as _;
    let path = root::path_v3(dir);
    let len = bytes.len() as u64;
    let in_place = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(file) => {
            let stored = file.metadata().map_err(|e| unavailable("stat", &path, e))?;
            if stored.len() == len && len <= ROOT_IN_PLACE_MAX {
                Some(file)
            } else {
                None
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(unavailable("open", &path, e)),
    };
    match in_place {
        Some(file) => file
            .write_all_at(bytes, 0)
            .map_err(|e| unavailable("write", &path, e)),
        None => write_unsynced_dir(&path, bytes),
    }
}

/// Links `head` to the name of epoch `epoch`'s head, unsynced (the epoch's frame holds it
/// durably), unless a head is there (the first one stays).
fn link_head(dir: &Path, epoch: u64, head: &[u8]) -> Result<(), DirectoryStoreError> {
    let heads = heads_dir(dir);
    let path = heads.join(epoch_name(epoch));
    let temp = heads.join(format!(".tmp-{:016x}", rand_suffix()));
    // `heads/` is made when it is missing, not probed for each epoch.
    let linked = match std::fs::write(&temp, head) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(&heads).and_then(|()| std::fs::write(&temp, head))
        }
        other => other,
    }
    .and_then(|()| match std::fs::hard_link(&temp, &path) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => repair_head(&path, &temp, head),
        other => other,
    });
    let _ = std::fs::remove_file(&temp);
    linked.map_err(|e| unavailable("link", &path, e))
}

/// A head file already at `path` when `link_head` links the epoch's head (from its frame):
/// the first head of an epoch stays, unless the file holds a torn copy of this very head.
/// The commit links its head unsynced (the frame holds it durably), and after a power loss
/// ext4 (or xfs) can leave the linked file empty or cut short: the inode and its link were
/// in the file system's journal, the data not yet written. The replay of the frame then
/// finds the file there; keeping it would keep an empty head for good once the checkpoint
/// passes the frame. A file that is empty, all zeros, or a prefix of `head` is replaced by
/// `temp` (a rename: atomic), any other content is another head and stays.
fn repair_head(path: &Path, temp: &Path, head: &[u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    let mut stored = Vec::with_capacity(head.len() + 1);
    std::fs::File::open(path)?
        .take(head.len() as u64 + 1)
        .read_to_end(&mut stored)?;
    let torn =
        stored.len() < head.len() && (head.starts_with(&stored) || stored.iter().all(|b| *b == 0));
    if torn {
        tracing::warn!(path = %path.display(), stored = stored.len(), "a head file torn by a crash is written again from its journal frame");
        std::fs::rename(temp, path)?;
    }
    Ok(())
}

/// Overwrites `path` with `bytes` in place, unsynced (the journal's frame holds them
/// durably): no temporary file, no rename, no freed inode, which on ext4 cost about 20 times
/// the write (docs/BENCHMARKS.md). The length is cut only when the stored file was longer
/// (a tree node keeps its length, most often: no inode change beyond the write's). Only
/// under the domain's lock, while no reader reads; a writer that dies between the write and
/// the length change leaves the file for the next commit's roll-forward (or the first read
/// of a process) to write again.
fn write_in_place(path: &Path, bytes: &[u8]) -> Result<(), DirectoryStoreError> {
    use std::os::unix::fs::FileExt as _;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    };
    let file = match open() {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(|e| unavailable("create", parent, e))?;
            open()
        }
        other => other,
    }
    .map_err(|e| unavailable("open", path, e))?;
    let len = bytes.len() as u64;
    file.write_all_at(bytes, 0)
        .and_then(|()| file.metadata())
        .and_then(|stored| {
            if stored.len() > len {
                file.set_len(len)
            } else {
                Ok(())
            }
        })
        .map_err(|e| unavailable("write", path, e))
}

/// The directories of this process whose checkpoint is being moved in the background.
fn checkpointing() -> &'static Mutex<HashSet<PathBuf>> {
    static RUNNING: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

/// After epoch `epoch` was committed through the journal: every
/// [`journal::CHECKPOINT_EVERY`] epochs, one `syncfs` through `to_sync` (opened before the
/// write-out, [`open_for_sync`]; on a thread of its own, so no commit waits for it) makes
/// the tree's files durable and moves the checkpoint to `epoch` ([`move_checkpoint`]). A
/// commit whose slot still holds a frame above the checkpoint (background ones late, or never
/// finished: short-lived processes) does it itself first ([`journal::room_for`], in
/// [`commit_locked`]).
fn maybe_checkpoint(
    dir: &Path,
    epoch: u64,
    ov: &Ov,
    to_sync: std::fs::File,
) -> Result<(), DirectoryStoreError> {
    if !checkpointing()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(dir.to_path_buf())
    {
        return Ok(());
    }
    let owned = dir.to_path_buf();
    let ov = ov.clone();
    let spawned = std::thread::Builder::new()
        .name("kst-kt-checkpoint".into())
        .spawn(move || {
            let moved = sync_opened(&owned, &to_sync).and_then(|()| {
                let _lock = DomainLock::acquire(&owned)?;
                move_checkpoint(&owned, epoch, &ov)
            });
            if let Err(e) = moved {
                tracing::warn!(dir = %owned.display(), epoch, error = %e, "key directory: the journal's checkpoint did not move; the next one tries again");
            }
            checkpointing()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&owned);
        });
    if spawned.is_err() {
        checkpointing()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(dir);
    }
    Ok(())
}

/// A background checkpoint's move, under the domain's lock, after its write-out of every
/// epoch up to `epoch` and a `syncfs`: the checkpoint moves to `epoch` unless it is there
/// already, or the stored root is under `epoch` (review F4: a replay of the journal killed
/// half-way since, in a process without a boot id, rewound the files to an earlier frame's,
/// so they no longer hold every epoch up to `epoch`; the next replay starts from the
/// checkpoint as it is). Then `ov` drops what the files hold.
fn move_checkpoint(dir: &Path, epoch: u64, ov: &Ov) -> Result<(), DirectoryStoreError> {
    let root = read_root(dir)?.map(|(e, _)| e);
    if journal::checkpoint(dir)?.unwrap_or(0) < epoch && root.is_some_and(|r| r >= epoch) {
        journal::set_checkpoint(dir, epoch)?;
    }
    // The files hold every epoch up to the checkpoint now, durably.
    if let Some(checkpoint) = journal::checkpoint(dir)? {
        locked(ov).prune(checkpoint);
    }
    Ok(())
}

/// Where a commit's caller is told whether the epoch is committed.
type CommitAnswer = crate::pool::Answer<Result<bool, DirectoryStoreError>>;

/// [`DirectoryStore::commit`], on a blocking thread: under the domain's lock, answers
/// `answer` at the commit point and, for an epoch committed through the journal, writes the
/// epoch's files **afterwards, on this thread, still holding the lock** (readers take it
/// shared, so none reads the epoch before its files are whole), then lets the lock go. The
/// caller goes on as soon as the frame is durable. Handing the lock to other work instead
/// (another blocking task, queued behind reads that wait for this lock on the bounded pool)
/// would deadlock: `reads_queued_behind_a_commit_do_not_deadlock_its_file_writes`.
///
/// Without `wait`, a lock another holds now is answered `Ok(false)` at once (nothing done):
/// the caller waits for it without a permit of the directory's lane and tries again
/// ([`FsDirectoryStore`]'s `commit`). `Ok(true)`: committed (or dropped by the fence).
/// A caller that stopped waiting (its `answer` closed) before the commit's last step before
/// its commit point (the frame's write, [`commit_locked`]) gets nothing committed, and no
/// answer; one that stops waiting during the frame's write and `fdatasync` may find the
/// epoch committed all the same (nobody can undo a durable frame), as after any timeout of
/// a commit: its retry's fence then tells. Returns whether it did its work (`false`: the lock was busy,
/// or the caller gone, nothing done) once the epoch's files are written and the lock let go.
fn commit(
    dir: &Path,
    batch: &RecordBatch,
    boot: Option<&str>,
    ov: Option<&Ov>,
    answer: CommitAnswer,
    wait: bool,
) -> bool {
    // A caller that stopped waiting (its timeout) before this try ran, or while it waited
    // for the lock, was told nothing was committed: nothing is (review of the lane: a try
    // handed to the blocking pool, still queued for a thread when its caller gave up,
    // committed the epoch behind the caller's back once the lock was free).
    if answer.is_closed() {
        return false;
    }
    let lock = if wait {
        DomainLock::acquire(dir).map(Some)
    } else {
        DomainLock::try_acquire(dir)
    };
    let lock = match lock {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            let _ = answer.send(Ok(false));
            return false;
        }
        Err(e) => {
            let _ = answer.send(Err(e));
            return true;
        }
    };
    if answer.is_closed() {
        return false;
    }
    match commit_locked(dir, batch, boot, ov, &|| answer.is_closed()) {
        Ok(Some(epoch)) => {
            // The frame is durable: the epoch is committed, whatever happens to its files.
            let _ = answer.send(Ok(true));
            #[cfg(test)]
            gate::wait(dir, epoch);
            write_files(dir, batch, epoch, boot, ov);
        }
        done => {
            let _ = answer.send(done.map(|_| true));
        }
    }
    // After the answer, still under the lock: no commit waits for the listing.
    sweep_temporaries(dir);
    drop(lock);
    true
}

/// A test's hold on a commit between its answer and its files: [`commit`] waits in
/// [`gate::wait`] while a test holds the gate of its directory.
#[cfg(test)]
mod gate {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::sync::{LazyLock, Mutex};

    /// The gates set, by directory and epoch.
    type Gates = HashMap<(PathBuf, u64), Receiver<()>>;

    static GATES: LazyLock<Mutex<Gates>> = LazyLock::new(Default::default);

    /// Holds the journaled commit of epoch `epoch` in `dir` after its answer, before its
    /// files, until the returned sender sends or is dropped. (By epoch: the files of the
    /// epoch before may still be being written when a test sets the gate.)
    pub(super) fn hold(dir: &Path, epoch: u64) -> Sender<()> {
        let (open, gate) = channel();
        GATES
            .lock()
            .unwrap()
            .insert((dir.to_path_buf(), epoch), gate);
        open
    }

    pub(super) fn wait(dir: &Path, epoch: u64) {
        let gate = GATES.lock().unwrap().remove(&(dir.to_path_buf(), epoch));
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
    }
}

/// A test's stand-in for a writer that dies part-way through an epoch's files (a one-shot
/// `kst deliver` whose process exits while its log's thread still writes them) or through
/// a recovery of the journal: with [`cut::after`] set on a thread, [`materialize`] and
/// [`recover_locked`] (and the removal of a version 1 journal's files, `journal.rs`) on
/// that thread stop before its `n`th step. Outside tests [`cut::step`] does nothing.
pub(crate) mod cut {
    use kst_core::transparency::DirectoryStoreError;

    #[cfg(test)]
    thread_local! {
        static LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    /// Cuts [`super::materialize`] on this thread short before its `n`th file operation
    /// (counted from 0); `None`: not at all.
    #[cfg(test)]
    pub(super) fn after(n: Option<usize>) {
        LEFT.with(|left| left.set(n));
    }

    /// Before each step (a file operation of [`super::materialize`], a stage of
    /// [`super::recover_locked`]): the error that stops it where a test cuts the writer short.
    #[inline]
    pub(crate) fn step() -> Result<(), DirectoryStoreError> {
        #[cfg(test)]
        if LEFT.with(|left| match left.get() {
            Some(0) => true,
            Some(n) => {
                left.set(Some(n - 1));
                false
            }
            None => false,
        }) {
            return Err(DirectoryStoreError::Unavailable(
                "the writer died here (a test's cut)".into(),
            ));
        }
        Ok(())
    }
}

/// [`commit`] answered in place (the cost measurement's).
#[cfg(test)]
fn commit_now(
    dir: &Path,
    batch: RecordBatch,
    boot: Option<&str>,
) -> Result<(), DirectoryStoreError> {
    let (answer, mut answered) = tokio::sync::oneshot::channel();
    let ov = boot.map(|_| Ov::default());
    commit(dir, &batch, boot, ov.as_ref(), answer, true);
    answered
        .try_recv()
        .map_err(|e| DirectoryStoreError::Unavailable(format!("no answer: {e}")))?
        .map(drop)
}

/// After the commit point of journaled epoch `epoch` (its caller answered, the domain's lock
/// held): writes its root (in place, [`write_root`]) and adds its batch to the overlay `ov`
/// (the tree's files are written at checkpoints only); every
/// [`journal::CHECKPOINT_EVERY`] epochs writes the overlay's epochs out to the tree's files
/// ([`write_out`]) and moves the checkpoint in the background ([`maybe_checkpoint`]). A
/// failure of the root does not undo the epoch (its frame is durable): it is logged, and the
/// next commit, or this process's next read (made to check again), rolls the epoch forward
/// (writes its root) before anything else. A write-out that fails leaves the checkpoint where
/// it is (the overlay keeps masking the files it wrote; the next one writes them all again).
fn write_files(dir: &Path, batch: &RecordBatch, epoch: u64, boot: Option<&str>, ov: Option<&Ov>) {
    let rooted = match &batch.root {
        Some(root) => write_epoch_root(dir, root),
        None => Ok(()),
    };
    if let Err(e) = rooted {
        if let Some(boot) = boot {
            forget_recovered(dir, boot);
        }
        tracing::error!(
            dir = %dir.display(),
            epoch,
            error = %e,
            "key directory: the epoch is committed (its journal frame is durable) but its root \
             was not written; the next commit or read writes it"
        );
        return;
    }
    let Some(ov) = ov else { return };
    locked(ov).apply(batch);
    if !epoch.is_multiple_of(journal::CHECKPOINT_EVERY) {
        return;
    }
    let written = open_for_sync(dir).and_then(|to_sync| Ok((write_out(dir, ov)?, to_sync)));
    match written {
        Ok((upto, to_sync)) => {
            if let Err(e) = maybe_checkpoint(dir, upto, ov, to_sync) {
                tracing::warn!(dir = %dir.display(), epoch, error = %e, "key directory: the journal's checkpoint did not move; the next one tries again");
            }
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), epoch, error = %e, "key directory: the tree's files were not all written out at a checkpoint; the checkpoint stays, the next one writes them again");
        }
    }
}

/// Under the domain's exclusive lock, with `ov` at the stored root: writes the records of
/// the overlay's epochs above the checkpoint to the tree's files, unsynced (nodes, the
/// newest of each key, and value states overwritten in place, heads linked unless one is
/// there). Returns the last epoch written out (the overlay's): once a `syncfs` made the
/// files durable, the checkpoint may move to it. Readers wait on the lock meanwhile, and a
/// writer killed half-way leaves files no newer than the root, which the overlay of every
/// process masks until the checkpoint passes them.
fn write_out(dir: &Path, ov: &Ov) -> Result<u64, DirectoryStoreError> {
    let started = std::time::Instant::now();
    let checkpoint = journal::checkpoint(dir)?.unwrap_or(0);
    let (upto, records) = {
        let ov = locked(ov);
        let upto = ov.upto().ok_or_else(|| {
            DirectoryStoreError::Unavailable(format!(
                "{}: the overlay was never brought to the root (a bug: report it)",
                dir.display()
            ))
        })?;
        (upto, ov.records_above(checkpoint))
    };
    for (key, blob) in &records.nodes {
        cut::step()?;
        write_in_place(&node_path(dir, key), blob)?;
    }
    for (label, epoch, blob) in &records.values {
        cut::step()?;
        write_in_place(&values_dir(dir, label).join(epoch_name(*epoch)), blob)?;
    }
    for (epoch, head) in &records.heads {
        cut::step()?;
        link_head(dir, *epoch, head)?;
    }
    // How long the domain's reads waited for it (review F5; docs/BENCHMARKS.md).
    tracing::debug!(
        dir = %dir.display(),
        checkpoint,
        upto,
        nodes = records.nodes.len(),
        value_states = records.values.len(),
        heads = records.heads.len(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "key directory: wrote the epochs above the checkpoint out to the tree's files, under the domain's lock"
    );
    Ok(upto)
}

/// The error of a commit whose caller stopped waiting before its commit point (nobody reads
/// it: the caller is gone).
fn caller_gone() -> DirectoryStoreError {
    DirectoryStoreError::Unavailable(
        "the caller stopped waiting before the commit point: nothing committed".into(),
    )
}

/// [`commit`]'s work up to its commit point, under the domain's lock: `Some(epoch)` when
/// epoch `epoch`'s journal frame is durable and its files are still to be written
/// ([`write_files`]); `None` when the commit is whole (written without the journal, or a
/// batch of nodes alone dropped by the fence).
fn commit_locked(
    dir: &Path,
    batch: &RecordBatch,
    boot: Option<&str>,
    ov: Option<&Ov>,
    gone: &dyn Fn() -> bool,
) -> Result<Option<u64>, DirectoryStoreError> {
    if let Some(boot) = boot {
        recover_locked(dir, boot)?;
    }
    // A writer died after its frame was durable: its epoch is committed; write its files
    // before anything is built on it.
    let stored = match boot {
        // Not rolled forward: this process's reads try again before reading.
        Some(boot) => roll_forward(dir).inspect_err(|_| forget_recovered(dir, boot))?,
        None => root::read_legacy(dir)?.map(|(e, _)| e),
    };
    if !batch.passes_fence(stored)? {
        return Ok(None);
    }
    if let (Some(_), Some(ov), Some(expected), true) = (boot, ov, stored, journal::journaled(batch))
    {
        // The journal starts at the stored root, durable already (written the old way).
        journal::start(dir, expected)?;
        // The overlay at the stored root (the epochs other processes of the pool committed).
        overlay::sync(dir, &mut locked(ov), expected)?;
        // A slot still above the checkpoint: every epoch up to `expected` written out and
        // synced first.
        let moved = journal::room_for(dir, expected + 1, || {
            let to_sync = open_for_sync(dir)?;
            let upto = write_out(dir, ov)?;
            if upto != expected {
                return Err(DirectoryStoreError::Unavailable(format!(
                    "{}: the overlay holds epoch {upto}, not the root's {expected} (a bug: \
                     report it)",
                    dir.display()
                )));
            }
            sync_opened(dir, &to_sync)
        })?;
        if moved {
            locked(ov).prune(expected);
            tracing::info!(dir = %dir.display(), epoch = expected + 1, "key directory: moved the journal's checkpoint before a commit (its slot held a frame above it: the background checkpoint was late)");
        }
        // The last moment a caller that gave up (a timeout, a cancel) gets nothing committed:
        // the work above is right either way; from the frame's write on, the epoch may be
        // committed with nobody told (review M1).
        if gone() {
            return Err(caller_gone());
        }
        journal::write_frame(dir, batch)?;
        return Ok(Some(expected + 1));
    }
    if gone() {
        return Err(caller_gone());
    }
    let mut dirs = BTreeSet::new();
    for (key, blob) in &batch.nodes {
        let path = node_path(dir, key);
        write_unsynced_dir(&path, blob)?;
        dirs.insert(path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for vs in &batch.value_states {
        let path = values_dir(dir, &vs.label).join(format!("{:020}", vs.epoch));
        write_unsynced_dir(&path, &vs.blob)?;
        dirs.insert(path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    if !SYNCFS {
        for d in &dirs {
            sync_dir(d).map_err(|e| unavailable("sync", d, e))?;
            // New shard directories must survive too: sync their parents once.
            if let Some(parent) = d.parent() {
                sync_dir(parent).map_err(|e| unavailable("sync", parent, e))?;
            }
        }
        if let Some(root) = &batch.root {
            // Elsewhere than Linux: no journal, the root where every kst kept it.
            let path = root::path_legacy(dir);
            write_atomic(&path, &root_bytes(root)).map_err(|e| unavailable("write", &path, e))?;
            if let Some(head) = &batch.head {
                insert_head(dir, root.epoch, head)?;
            }
        }
        return Ok(None);
    }
    // The root goes in under a temporary name before the one flush, so renaming it into
    // place afterwards needs only the directory's sync, not a flush of its own.
    let root_temp = match &batch.root {
        Some(root) => {
            let temp = dir.join(format!(".tmp-root-{:016x}", rand_suffix()));
            if let Err(e) = std::fs::write(&temp, root_bytes(root)) {
                let _ = std::fs::remove_file(&temp);
                return Err(unavailable("write", &temp, e));
            }
            Some(temp)
        }
        None => None,
    };
    // The head too: its file goes in under a temporary name now and is linked to its name
    // after the root (a crash between them leaves the epoch without a head, never a head
    // without its epoch).
    let head_temp = match (&batch.head, &batch.root, &root_temp) {
        (Some(head), Some(root), Some(_)) => {
            let heads = heads_dir(dir);
            let temp = heads.join(format!(".tmp-{:016x}", rand_suffix()));
            let written = std::fs::create_dir_all(&heads)
                .and_then(|()| std::fs::write(&temp, head))
                .map_err(|e| unavailable("write", &temp, e));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&temp);
                for t in root_temp.iter() {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
            Some((temp, heads.join(epoch_name(root.epoch))))
        }
        _ => None,
    };
    let synced = sync_file_system(dir).and_then(|()| match &root_temp {
        Some(temp) => {
            // With the journal (akd's first root) in `root.v3` (the recovery moved the
            // root, or marked a domain without one: `root.rs`).
            let path = match boot {
                Some(_) => root::path_v3(dir),
                None => root::path_legacy(dir),
            };
            std::fs::rename(temp, &path).map_err(|e| unavailable("rename into place", &path, e))
        }
        None => Ok(()),
    });
    if let Err(e) = synced {
        for t in root_temp.iter().chain(head_temp.iter().map(|(t, _)| t)) {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    if root_temp.is_some() {
        sync_dir(dir).map_err(|e| unavailable("sync", dir, e))?;
    }
    if let Some((temp, path)) = head_temp {
        // Linking fails when a head is there already: the first one stays.
        let linked = match std::fs::hard_link(&temp, &path) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(unavailable("link", &path, e)),
            _ => Ok(()),
        };
        let _ = std::fs::remove_file(&temp);
        linked?;
        let heads = heads_dir(dir);
        sync_dir(&heads).map_err(|e| unavailable("sync", &heads, e))?;
    }
    Ok(None)
}

/// The root file's bytes: epoch (8 bytes, big-endian) ‖ the root record.
fn root_bytes(root: &RootWrite) -> Vec<u8> {
    let mut bytes = root.epoch.to_be_bytes().to_vec();
    bytes.extend_from_slice(&root.blob);
    bytes
}

/// Makes everything written to the file system holding `dir` durable (file contents, new
/// names, new directories): one `syncfs(2)`, which reports write-back errors since Linux 5.8.
#[cfg(target_os = "linux")]
fn sync_file_system(dir: &Path) -> Result<(), DirectoryStoreError> {
    sync_opened(dir, &open_for_sync(dir)?)
}

/// `dir`, opened for a later [`sync_opened`]: opened **before** the writes that sync is to
/// make durable, since `syncfs(2)` reports only the write-back errors recorded after its
/// descriptor was opened (review F7: a page of a write-out written back and lost between the
/// write-out and an open after it went unreported, and the checkpoint moved over it).
fn open_for_sync(dir: &Path) -> Result<std::fs::File, DirectoryStoreError> {
    std::fs::File::open(dir).map_err(|e| unavailable("open", dir, e))
}

/// [`sync_file_system`] through `d`, opened by [`open_for_sync`] before the writes.
#[cfg(target_os = "linux")]
fn sync_opened(dir: &Path, d: &std::fs::File) -> Result<(), DirectoryStoreError> {
    rustix::fs::syncfs(d).map_err(|e| unavailable("syncfs", dir, e))
}

#[cfg(not(target_os = "linux"))]
fn sync_opened(_: &Path, _: &std::fs::File) -> Result<(), DirectoryStoreError> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn sync_file_system(_: &Path) -> Result<(), DirectoryStoreError> {
    Ok(())
}

fn heads_dir(dir: &Path) -> PathBuf {
    dir.join("heads")
}

fn epoch_name(epoch: u64) -> String {
    format!("{epoch:020}")
}

/// [`DirectoryStore::insert_head`]: link a synced temporary file to the head's name.
fn insert_head(dir: &Path, epoch: u64, head: &[u8]) -> Result<Vec<u8>, DirectoryStoreError> {
    let heads = heads_dir(dir);
    let path = heads.join(epoch_name(epoch));
    if let Some(stored) = read(&path)? {
        return Ok(stored);
    }
    let new_dir = !heads.is_dir();
    std::fs::create_dir_all(&heads).map_err(|e| unavailable("create", &heads, e))?;
    let temp = heads.join(format!(".tmp-{:016x}", rand_suffix()));
    let written = (|| {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(head)?;
        f.sync_all()?;
        std::fs::hard_link(&temp, &path)
    })();
    let _ = std::fs::remove_file(&temp);
    match written {
        Ok(()) => {
            sync_dir(&heads).map_err(|e| unavailable("sync", &heads, e))?;
            if new_dir {
                sync_dir(dir).map_err(|e| unavailable("sync", dir, e))?;
            }
            Ok(head.to_vec())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read(&path)?.ok_or_else(|| {
            DirectoryStoreError::Corrupt(format!("{} vanished after it was linked", path.display()))
        }),
        Err(e) => Err(unavailable("write", &path, e)),
    }
}

/// Reads `epoch (8 bytes) ‖ blob`.
fn read_epoch_blob(path: &Path) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    let Some(bytes) = read(path)? else {
        return Ok(None);
    };
    let (epoch, blob) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| DirectoryStoreError::Corrupt(format!("{} is truncated", path.display())))?;
    Ok(Some((u64::from_be_bytes(*epoch), blob.to_vec())))
}

/// [`DirectoryStore::put_cosignature`], under the domain's lock: nothing when the stored
/// cosignature of that epoch and witness was checked later (`<hex>.at` beside it: the check
/// time, 8 bytes big-endian).
fn put_cosignature(
    dir: &Path,
    epoch: u64,
    witness: &[u8; 32],
    checked_at: u64,
    cosignature: &[u8],
    _lock: DomainLock,
) -> Result<(), DirectoryStoreError> {
    let name = hex::encode(witness);
    let path = dir.join("cosignatures").join(epoch_name(epoch)).join(&name);
    let at_path = path.with_extension("at");
    if let Some(stored) = read(&at_path)? {
        let stored = stored
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| {
                DirectoryStoreError::Corrupt(format!("{} is not a time", at_path.display()))
            })?;
        if stored > checked_at {
            return Ok(());
        }
    }
    write_unsynced_dir(&path, cosignature)?;
    write_unsynced_dir(&at_path, &checked_at.to_be_bytes())?;
    for d in [path.parent(), path.parent().and_then(Path::parent)]
        .into_iter()
        .flatten()
    {
        sync_dir(d).map_err(|e| unavailable("sync", d, e))?;
    }
    let newest = dir.join("witnesses").join(&name);
    if matches!(read_epoch_blob(&newest)?, Some((e, _)) if e > epoch) {
        return Ok(());
    }
    let mut bytes = epoch.to_be_bytes().to_vec();
    bytes.extend_from_slice(cosignature);
    if let Some(d) = newest.parent() {
        std::fs::create_dir_all(d).map_err(|e| unavailable("create", d, e))?;
    }
    write_atomic(&newest, &bytes).map_err(|e| unavailable("write", &newest, e))
}

/// The files in `dir` whose names `key` accepts, as (key, contents); none when `dir` does not
/// exist. A writer's temporary files (`.tmp-...`) are no key's.
fn list_files<K>(
    dir: &Path,
    key: impl Fn(&str) -> Option<K>,
) -> Result<Vec<(K, Vec<u8>)>, DirectoryStoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unavailable("list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| unavailable("list", dir, e))?;
        let Some(k) = entry.file_name().to_str().and_then(&key) else {
            continue;
        };
        if let Some(blob) = read(&entry.path())? {
            out.push((k, blob));
        }
    }
    Ok(out)
}

/// Runs the directory's file work on the blocking pool in the directory's lane
/// ([`crate::MAX_DIRECTORY_BLOCKING`] at once per process, FIFO, beside the key store's
/// bound: [`crate::pool`]).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DirectoryStoreError> + Send + 'static,
) -> Result<T, DirectoryStoreError> {
    crate::pool::bounded(Lane::Directory, f)
        .await
        .map_err(DirectoryStoreError::Unavailable)?
}

/// This process's turns at each domain's lock: reads take a turn shared, a commit takes one
/// exclusively, first come, first served (Tokio's `RwLock` is fair), before a permit of the
/// lane. A commit then finds the domain's `flock` held only by another process of the pool
/// (or by a commit's files still being written): a flood of this process's reads, each
/// trying the lock between the others' shared holds, no longer keeps the writer's commit
/// waiting, and the reads queued behind a commit wait for it without a permit.
/// (A commit holds its turn until its epoch's files are written, [`FsDirectoryStore`]'s
/// `commit`.)
fn turns(dir: &Path) -> Turn {
    turns_at(dir, std::time::Instant::now())
}

/// A domain's turns ([`turns`]).
type Turn = std::sync::Arc<tokio::sync::RwLock<()>>;

/// This process's turns of each domain, and when those nobody held were last dropped.
#[derive(Default)]
struct Turns {
    of: std::collections::HashMap<PathBuf, Turn>,
    swept: Option<std::time::Instant>,
}

fn all_turns() -> std::sync::MutexGuard<'static, Turns> {
    static TURNS: OnceLock<Mutex<Turns>> = OnceLock::new();
    TURNS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// [`turns`] at `now`: a domain's turns made when missing; first, at most every quarter of
/// [`crate::recent::IDLE`], the turns nobody holds or waits for are dropped (a later one is
/// as good: the order only counts among those waiting), so a process that touched many
/// domains keeps no turns of each for good.
fn turns_at(dir: &Path, now: std::time::Instant) -> Turn {
    let mut turns = all_turns();
    if let Some(turn) = turns.of.get(dir) {
        return turn.clone();
    }
    if turns
        .swept
        .is_none_or(|at| now.saturating_duration_since(at) >= crate::recent::IDLE / 4)
    {
        turns.swept = Some(now);
        // Under the map's lock: nobody takes a clone meanwhile.
        turns
            .of
            .retain(|_, turn| std::sync::Arc::strong_count(turn) > 1);
    }
    turns.of.entry(dir.to_path_buf()).or_default().clone()
}

/// The first pause of a read that found its domain's lock held by a writer, doubled after
/// each try up to [`LOCK_PAUSE_MOST`].
const LOCK_PAUSE_FIRST: std::time::Duration = std::time::Duration::from_millis(1);

/// The longest pause between a read's tries of its domain's lock.
const LOCK_PAUSE_MOST: std::time::Duration = std::time::Duration::from_millis(16);

/// A read of the domain at `dir`: `f` on the directory's lane ([`blocking`]) under the
/// domain's shared lock ([`read_lock`]). While a writer holds the lock (a commit writing its
/// epoch's files, or another process of the pool stalled mid-commit), the read gives its
/// permit back and tries again after a pause, so reads piling up behind one domain's lock
/// never hold every permit of the lane while other domains' reads and commits wait for one.
async fn reading<T, F>(dir: PathBuf, boot: Option<String>, f: F) -> Result<T, DirectoryStoreError>
where
    T: Send + 'static,
    F: Fn(&Path) -> Result<T, DirectoryStoreError> + Send + Sync + 'static,
{
    let f = std::sync::Arc::new(f);
    let turns = turns(&dir);
    let _turn = turns.read().await;
    let mut pause = LOCK_PAUSE_FIRST;
    loop {
        let (d, b, g) = (dir.clone(), boot.clone(), f.clone());
        let read = blocking(move || match read_lock(&d, b.as_deref())? {
            Shared::Held(_shared) => g(&d).map(Some),
            Shared::Busy => Ok(None),
        })
        .await?;
        if let Some(read) = read {
            return Ok(read);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LOCK_PAUSE_MOST);
    }
}

#[async_trait]
impl DirectoryStore for FsDirectoryStore {
    fn name(&self) -> &'static str {
        "fs"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let journal = boot.is_some();
        reading(dir, boot, move |dir| root::read_root(dir, journal)).await
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&dir);
        let keys = keys.to_vec();
        reading(dir, boot, move |dir| {
            tree_root(dir, ov.as_ref())?;
            tree_nodes(dir, ov.as_ref(), &keys)
        })
        .await
    }

    async fn root_and_nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<RootAndNodes, DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&dir);
        let keys = keys.to_vec();
        // One blocking call and one shared lock: the root and the nodes of one moment.
        reading(dir, boot, move |dir| {
            Ok((
                tree_root(dir, ov.as_ref())?,
                tree_nodes(dir, ov.as_ref(), &keys)?,
            ))
        })
        .await
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain_dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&domain_dir);
        let label = label.to_vec();
        reading(domain_dir, boot, move |dir| {
            tree_root(dir, ov.as_ref())?;
            tree_value_states(dir, ov.as_ref(), &label)
        })
        .await
    }

    async fn value_states_batch(
        &self,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain_dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&domain_dir);
        let labels = labels.to_vec();
        // Every label in one blocking call under one shared lock.
        reading(domain_dir, boot, move |dir| {
            tree_root(dir, ov.as_ref())?;
            let mut out = Vec::new();
            for label in &labels {
                let states = tree_value_states(dir, ov.as_ref(), label)?;
                out.extend(states.into_iter().map(|(e, b)| (label.clone(), e, b)));
            }
            Ok(out)
        })
        .await
    }

    /// Returns at the commit point: for a journaled epoch once its frame is durable, while
    /// its files are still being written under the domain's lock ([`commit`]).
    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&dir);
        let batch = std::sync::Arc::new(batch);
        // This process's turn, held until the epoch's files are written (this process's
        // reads of the domain wait for them without a permit, woken as soon as they end).
        let turn = std::sync::Arc::new(Mutex::new(Some(turns(&dir).write_owned().await)));
        // While another process of the pool holds the domain's lock (mid-commit, or its
        // reads), the commit waits for it without a permit of the lane.
        let mut pause = LOCK_PAUSE_FIRST;
        loop {
            let (dir, boot, batch, ov) = (dir.clone(), boot.clone(), batch.clone(), ov.clone());
            let turn = turn.clone();
            let committed = crate::pool::bounded_answering(Lane::Directory, move |answer| {
                if commit(&dir, &batch, boot.as_deref(), ov.as_ref(), answer, false) {
                    drop(turn.lock().unwrap_or_else(PoisonError::into_inner).take());
                }
            })
            .await
            .map_err(DirectoryStoreError::Unavailable)??;
            if committed {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LOCK_PAUSE_MOST);
        }
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&dir);
        let head = head.to_vec();
        reading(dir, boot, move |dir| {
            // The first head of an epoch stays: one stored in its file, else, above the
            // tree's files, the one its frame carries (the write-out links it).
            tree_root(dir, ov.as_ref())?;
            if let Some(stored) = tree_head(dir, ov.as_ref(), epoch)? {
                return Ok(stored);
            }
            insert_head(dir, epoch, &head)
        })
        .await
    }

    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain_dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let ov = self.overlay(&domain_dir);
        reading(domain_dir, boot, move |dir| {
            // A committed epoch's head is in its frame (the overlay) until the write-out
            // links it, under the lock.
            tree_root(dir, ov.as_ref())?;
            let mut out = Vec::new();
            for epoch in from..=to {
                if let Some(blob) = tree_head(dir, ov.as_ref(), epoch)? {
                    out.push((epoch, blob));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> Result<(), DirectoryStoreError> {
        let (dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let (witness, cosignature) = (*witness, std::sync::Arc::new(cosignature.to_vec()));
        // Under the domain's lock, waited for as a commit waits: without a permit.
        let turns = turns(&dir);
        let _turn = turns.write().await;
        let mut pause = LOCK_PAUSE_FIRST;
        loop {
            let (dir, boot, cosignature) = (dir.clone(), boot.clone(), cosignature.clone());
            let put = blocking(move || {
                if !try_recover(&dir, boot.as_deref(), false)? {
                    return Ok(false);
                }
                let Some(lock) = DomainLock::try_acquire(&dir)? else {
                    return Ok(false);
                };
                put_cosignature(&dir, epoch, &witness, checked_at, &cosignature, lock)
                    .map(|()| true)
            })
            .await?;
            if put {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LOCK_PAUSE_MOST);
        }
    }

    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        let (domain_dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let dir = domain_dir.join("cosignatures").join(epoch_name(epoch));
        blocking(move || {
            ensure_recovered(&domain_dir, boot.as_deref())?;
            list_files(&dir, |name| {
                let mut witness = [0u8; 32];
                hex::decode_to_slice(name, &mut witness)
                    .ok()
                    .map(|()| witness)
            })
        })
        .await
    }

    async fn latest_cosignature(
        &self,
        domain: &str,
        witness: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let (domain_dir, boot) = (self.domain_dir(domain)?, self.boot.clone());
        let path = domain_dir.join("witnesses").join(hex::encode(witness));
        blocking(move || {
            ensure_recovered(&domain_dir, boot.as_deref())?;
            read_epoch_blob(&path)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "journal.example";

    fn node(n: u8) -> Vec<u8> {
        vec![2, 0, 0, 1, 0, n, n]
    }

    /// The node of epoch `e` of its own ([`epoch`]): `node(e)` up to 98 (99 is the shared
    /// one), another key from 99 on.
    fn own(e: u64) -> Vec<u8> {
        match u8::try_from(e) {
            Ok(n) if n < 99 => node(n),
            _ => vec![2, 0, 0, 1, 1, (e >> 8) as u8, e as u8],
        }
    }

    /// The epoch-0 root with one node (written the old way, synced).
    fn first() -> RecordBatch {
        RecordBatch {
            nodes: vec![(node(0), b"n0".to_vec()), (node(99), b"s0".to_vec())],
            value_states: Vec::new(),
            root: Some(RootWrite {
                expected_epoch: None,
                epoch: 0,
                blob: b"r0".to_vec(),
            }),
            head: None,
        }
    }

    /// Epoch `e` built on `e - 1`: a node of its own, the shared node 99 again, a value
    /// state and its head.
    fn epoch(e: u64) -> RecordBatch {
        RecordBatch {
            nodes: vec![
                (own(e), format!("n{e}").into_bytes()),
                (node(99), format!("s{e}").into_bytes()),
            ],
            value_states: vec![kst_core::transparency::ValueStateBlob {
                label: b"label".to_vec(),
                epoch: e,
                blob: format!("v{e}").into_bytes(),
            }],
            root: Some(RootWrite {
                expected_epoch: Some(e - 1),
                epoch: e,
                blob: format!("r{e}").into_bytes(),
            }),
            head: Some(format!("h{e}").into_bytes()),
        }
    }

    /// Reads the root and the shared node (99) at once and checks they are one epoch's
    /// (the root `r<e>`, the node `s<e>`); returns that epoch.
    async fn read_whole(store: &FsDirectoryStore) -> u64 {
        let (root, nodes) = store.root_and_nodes(D, &[node(99)]).await.unwrap();
        let (e, blob) = root.unwrap();
        assert_eq!(blob, format!("r{e}").into_bytes());
        assert_eq!(
            nodes,
            vec![format!("s{e}").into_bytes()],
            "epoch {e}'s root read with another epoch's node"
        );
        e
    }

    /// The store holds epochs 0..=`last` exactly as committed.
    async fn holds(store: &FsDirectoryStore, last: u64) {
        assert_eq!(
            store.root(D).await.unwrap(),
            Some((last, format!("r{last}").into_bytes())),
            "root"
        );
        let keys: Vec<_> = (0..=last).map(own).chain([node(99)]).collect();
        let mut nodes = store.nodes(D, &keys).await.unwrap();
        nodes.sort();
        let mut want: Vec<_> = (0..=last)
            .map(|e| format!("n{e}").into_bytes())
            .chain([format!("s{last}").into_bytes()])
            .collect();
        want.sort();
        assert_eq!(nodes, want, "nodes");
        let mut states = store.value_states(D, b"label").await.unwrap();
        states.sort();
        let want: Vec<_> = (1..=last)
            .map(|e| (e, format!("v{e}").into_bytes()))
            .collect();
        assert_eq!(states, want, "value states");
        let heads = store.heads(D, 1, last).await.unwrap();
        let want: Vec<_> = (1..=last)
            .map(|e| (e, format!("h{e}").into_bytes()))
            .collect();
        assert_eq!(heads, want, "heads");
    }

    /// A journaled store at `root` holding epochs 0 and 1, and its domain's directory.
    async fn at_epoch_1(root: &Path) -> (FsDirectoryStore, PathBuf) {
        let a = FsDirectoryStore::with_boot(root, Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        a.commit(D, epoch(1)).await.unwrap();
        (a, root.join(KT_DIR).join(D))
    }

    /// The epochs of the whole frames the journal's slots hold above its checkpoint (the
    /// frames that count; those under it are garbage).
    fn frames(dir: &Path) -> Vec<u64> {
        let checkpoint = match journal::stored_checkpoint(dir).unwrap() {
            Some(journal::Stored::V1(e) | journal::Stored::V2(e) | journal::Stored::V3(e)) => e,
            None => 0,
        };
        let mut out: Vec<u64> = (0..journal::SLOTS)
            .filter_map(|slot| std::fs::read(journal::slot_path(dir, slot)).ok())
            .filter_map(|bytes| Some(journal::decode(&bytes)?.root?.epoch))
            .filter(|&e| e > checkpoint)
            .collect();
        out.sort();
        out
    }

    /// Red-team round 6 (a guard for deferred file writes, docs/SECURITY.md): a commit and
    /// the reads that arrive while another holds the domain's lock all finish, however few
    /// threads the blocking pool has. A commit that handed its lock to a task needing a new
    /// blocking thread (queued behind reads that wait on that lock) hung here for ever.
    #[test]
    fn reads_queued_behind_a_commit_do_not_deadlock_its_file_writes() {
        use std::time::Duration;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = rt.block_on(at_epoch_1(tmp.path()));
        let a = std::sync::Arc::new(a);
        // Someone (another process's commit) holds the lock while the commit and the reads
        // arrive.
        let held = DomainLock::acquire(&dir).unwrap();
        let done = rt.block_on(async {
            let commit = {
                let a = a.clone();
                tokio::spawn(async move { a.commit(D, epoch(2)).await })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            let reads: Vec<_> = (0..50)
                .map(|_| {
                    let a = a.clone();
                    tokio::spawn(async move { a.root(D).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
            tokio::time::timeout(Duration::from_secs(10), async move {
                commit.await.unwrap().unwrap();
                for r in reads {
                    r.await.unwrap().unwrap();
                }
            })
            .await
        });
        rt.shutdown_background();
        assert!(done.is_ok(), "the commit and the reads hang");
    }

    /// A journaled commit answers its caller once the frame is durable, before the epoch's
    /// files are written (held here between the two by [`gate`]), and every read (root,
    /// nodes, value states, heads) waits until they are: none sees the epoch without them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_answers_at_its_frame_and_reads_wait_for_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        // The gate holds epoch 2's commit only: epoch 1's commit answered at its frame and
        // may still be writing its files (a gate for any commit of the directory once caught
        // it, held the lock, and epoch 2's commit waited for it for ever).
        let open = gate::hold(&dir, 2);
        a.commit(D, epoch(2)).await.unwrap();
        // Answered: the frame is durable, none of the epoch's files is written yet.
        assert_eq!(journal::read_frame(&dir, 2).unwrap(), Some(epoch(2)));
        assert_eq!(read_root(&dir).unwrap(), Some((1, b"r1".to_vec())));
        assert!(!node_path(&dir, &node(2)).exists(), "epoch 2's node");
        assert!(
            !heads_dir(&dir).join(epoch_name(2)).exists(),
            "epoch 2's head"
        );
        let reads = {
            let a = a.clone();
            tokio::spawn(async move {
                (
                    a.root(D).await.unwrap(),
                    a.root_and_nodes(D, &[node(2), node(99)]).await.unwrap(),
                    a.value_states(D, b"label").await.unwrap(),
                    a.heads(D, 2, 2).await.unwrap(),
                )
            })
        };
        // Not a measurement: while the gate holds the files no read can finish, however
        // long this waits (a read that did finish read epoch 1 after epoch 2 was answered).
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let finished_early = reads.is_finished();
        open.send(()).unwrap();
        assert!(
            !finished_early,
            "a read finished before the epoch's files were written"
        );
        let (root, (root_too, mut nodes), mut states, heads) = reads.await.unwrap();
        assert_eq!(root, Some((2, b"r2".to_vec())));
        assert_eq!(root_too, root);
        nodes.sort();
        assert_eq!(nodes, vec![b"n2".to_vec(), b"s2".to_vec()]);
        states.sort();
        assert_eq!(states.last(), Some(&(2, b"v2".to_vec())));
        assert_eq!(heads, vec![(2, b"h2".to_vec())]);
        holds(&a, 2).await;
    }

    /// `n` tasks reading `store`'s directory until `done`, each checking that every read is
    /// whole and no epoch goes back, counting its reads in `reading` as it goes; each returns
    /// how many reads it made.
    fn spawn_readers(
        store: &FsDirectoryStore,
        n: usize,
        done: &std::sync::Arc<std::sync::atomic::AtomicBool>,
        reading: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Vec<tokio::task::JoinHandle<u64>> {
        (0..n)
            .map(|_| {
                let (store, done, reading) = (store.clone(), done.clone(), reading.clone());
                tokio::spawn(async move {
                    let (mut reads, mut last) = (0u64, 1);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let e = read_whole(&store).await;
                        assert!(e >= last, "epoch {e} after {last}");
                        last = e;
                        reads += 1;
                        reading.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    reads
                })
            })
            .collect()
    }

    /// Readers on many tasks while one writer commits epoch after epoch: every read of the
    /// root and a node every epoch rewrites is of one epoch, whole; and the committer, answered
    /// before the files are written, reads its own epoch whole at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_see_every_epoch_whole() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let tmp = tempfile::tempdir().unwrap();
        let (a, _dir) = at_epoch_1(tmp.path()).await;
        let done = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(&a, 8, &done, &Default::default());
        for e in 2..=40 {
            a.commit(D, epoch(e)).await.unwrap();
            let (root, mut nodes) = a
                .root_and_nodes(D, &[node(e as u8), node(99)])
                .await
                .unwrap();
            assert_eq!(root, Some((e, format!("r{e}").into_bytes())));
            nodes.sort();
            let want = vec![format!("n{e}").into_bytes(), format!("s{e}").into_bytes()];
            assert_eq!(nodes, want, "epoch {e} read by its committer");
            let head = a.heads(D, e, e).await.unwrap();
            assert_eq!(head, vec![(e, format!("h{e}").into_bytes())]);
        }
        done.store(true, Ordering::Relaxed);
        let mut reads = 0;
        for r in readers {
            reads += r.await.unwrap();
        }
        assert!(reads > 0, "the readers read nothing");
        holds(&a, 40).await;
    }

    /// A root that cannot be written after the answer (`EIO`, injected) does not undo the
    /// committed epoch: this process's next reads try to roll it forward (a temporary
    /// failure while the fault lasts, never epoch 1's root with epoch 2's nodes), and once
    /// the fault is gone the epoch is whole. (Before the tree's files waited for a
    /// checkpoint, the fault was a directory in the way of the epoch's value state.)
    #[tokio::test]
    async fn files_that_fail_after_the_answer_are_rolled_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        holds(&a, 1).await;
        // The commit's root, two reads' roll-forwards, the next commit's roll-forward.
        journal::fault::inject(&dir, journal::fault::Fault::RootWrite, 4);
        a.commit(D, epoch(2)).await.unwrap();
        // The first read waits for the root (which fails): no read of epoch 1's root with
        // epoch 2's node, whether it started before or after the failure.
        for _ in 0..2 {
            let read = a.root_and_nodes(D, &[node(99)]).await;
            assert!(
                matches!(read, Err(DirectoryStoreError::Unavailable(_))),
                "{read:?}"
            );
        }
        assert_eq!(read_root(&dir).unwrap(), Some((1, b"r1".to_vec())));
        assert!(matches!(
            a.commit(D, epoch(3)).await,
            Err(DirectoryStoreError::Unavailable(_))
        ));
        holds(&a, 2).await;
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
        assert_eq!(frames(&dir), vec![1, 2, 3]);
        // Another process of the pool reads the same epochs through its own overlay.
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&b, 3).await;
    }

    /// Crash review F2 (issue 18): the `fdatasync` of a commit's frame fails (`EIO`), the
    /// frame written, whole in the page cache. The commit fails (`Unavailable`: not
    /// committed) and the epoch never becomes one: no read of this process or another of
    /// the pool rolls it forward (a fresh descriptor's sync reports no error), no replay
    /// after a restart takes it, and the caller's next try at the epoch is the one. Before,
    /// the next read rolled the frame forward: the epoch its caller was told failed was
    /// committed.
    #[tokio::test]
    async fn a_frame_whose_sync_failed_is_never_an_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        holds(&a, 1).await;
        journal::fault::inject(&dir, journal::fault::Fault::FrameSync, 1);
        let failed = a.commit(D, epoch(2)).await;
        assert!(
            matches!(&failed, Err(DirectoryStoreError::Unavailable(m)) if m.contains("not committed")),
            "{failed:?}"
        );
        holds(&a, 1).await;
        // Another process of the pool, then one after a restart.
        forget_recovered(&dir, "boot-1");
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&b, 1).await;
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&c, 1).await;
        assert!(frames(&dir).is_empty(), "{:?}", frames(&dir));
        // The caller's next try, another batch of epoch 2.
        let mut retry = epoch(2);
        retry.nodes.push((node(50), b"retry".to_vec()));
        c.commit(D, retry).await.unwrap();
        holds(&c, 2).await;
        assert_eq!(
            c.nodes(D, &[node(50)]).await.unwrap(),
            vec![b"retry".to_vec()]
        );
        // The sync of the blanking fails too: the error says a replay after a crash may
        // still find the frame; this boot's readers do not take it.
        journal::fault::inject(&dir, journal::fault::Fault::FrameSync, 1);
        journal::fault::inject(&dir, journal::fault::Fault::BlankSync, 1);
        let failed = c.commit(D, epoch(3)).await;
        assert!(
            matches!(&failed, Err(DirectoryStoreError::Unavailable(m))
                if m.contains("not committed") && m.contains("may still find")),
            "{failed:?}"
        );
        forget_recovered(&dir, "boot-2");
        holds(&c, 2).await;
        assert!(!journal::holds(&dir, 3).unwrap());
    }

    #[tokio::test]
    async fn epochs_are_replayed_after_the_machine_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        for e in 1..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        let dir = tmp.path().join(KT_DIR).join(D);
        assert_eq!(frames(&dir), vec![1, 2, 3], "one frame per epoch");
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(0));
        // The tree's files wait for a checkpoint: epochs 1 to 3 are in their frames only.
        assert_eq!(std::fs::read(node_path(&dir, &node(99))).unwrap(), b"s0");
        assert!(!node_path(&dir, &node(3)).exists());
        assert!(!values_dir(&dir, b"label").exists());
        assert!(!heads_dir(&dir).join(epoch_name(3)).exists());
        // The machine stops; the page cache lost the root (written in place, unsynced):
        // back at epoch 1.
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(1).root.unwrap())).unwrap();
        // After the restart the first read replays the frames after the checkpoint into the
        // tree's files, and syncs them.
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, 3).await;
        assert_eq!(std::fs::read(node_path(&dir, &node(99))).unwrap(), b"s3");
        assert!(heads_dir(&dir).join(epoch_name(3)).exists());
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(3));
        assert!(frames(&dir).is_empty(), "the frames are gone once durable");
        assert_eq!(journal::boot(&dir).unwrap().as_deref(), Some("boot-2"));
        // And the directory goes on.
        b.commit(D, epoch(4)).await.unwrap();
        holds(&b, 4).await;
        assert_eq!(frames(&dir), vec![4]);
    }

    /// Crash review (issue 18): a process that finds no boot id (no `/proc`, as in some
    /// containers) uses the journal under a token of its own, so it replays the frames
    /// another process left when it first touches the domain: after a crash, and on the same
    /// boot (it cannot tell). Before, it used no journal at all: it read the root the crash
    /// left without replaying the epochs the page cache lost (and rolled no dead writer's
    /// epoch forward).
    #[tokio::test]
    async fn a_process_without_a_boot_id_replays_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        for e in 1..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        let dir = tmp.path().join(KT_DIR).join(D);
        // The machine stops, the page cache lost the root (epochs 1 to 3 are in their
        // frames only: the tree's files wait for a checkpoint).
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(1).root.unwrap())).unwrap();
        // It comes back without a boot id.
        let b = FsDirectoryStore::with_found_boot(tmp.path(), None);
        assert!(b.boot.is_some(), "the journal is used");
        holds(&b, 3).await;
        b.commit(D, epoch(4)).await.unwrap();
        holds(&b, 4).await;
        assert_eq!(frames(&dir), vec![4]);
        // Another process without a boot id, after a crash that lost epoch 4's root.
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(3).root.unwrap())).unwrap();
        let c = FsDirectoryStore::with_boot(tmp.path(), Some(&journal::unknown_boot()));
        holds(&c, 4).await;
        assert!(frames(&dir).is_empty(), "{:?}", frames(&dir));
        // A process of the machine's boot id replays what the token's left.
        c.commit(D, epoch(5)).await.unwrap();
        holds(&c, 5).await;
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(4).root.unwrap())).unwrap();
        let d = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&d, 5).await;
    }

    /// Crash review (issue 18): the commit links an epoch's head unsynced, and a power loss
    /// can leave the linked file empty or cut short (its inode and link journaled, its data
    /// not yet written). The replay of the epoch's frame must write it again: before, it
    /// kept the torn file (the first head of an epoch stays) and the checkpoint then made it
    /// permanent, the frame that held the head gone.
    #[tokio::test]
    async fn a_head_torn_by_a_power_loss_is_written_again_from_its_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        for e in 1..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        let dir = tmp.path().join(KT_DIR).join(D);
        let head = |e: u64| epoch(e).head.unwrap();
        // A write-out linked the heads (unsynced), and the machine stops before its
        // `syncfs`: epoch 3's head file is there but empty, epoch 2's cut short.
        std::fs::create_dir_all(heads_dir(&dir)).unwrap();
        std::fs::write(heads_dir(&dir).join(epoch_name(3)), b"").unwrap();
        std::fs::write(heads_dir(&dir).join(epoch_name(2)), &head(2)[..1]).unwrap();
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, 3).await;
        for e in 1..=3 {
            assert_eq!(
                std::fs::read(heads_dir(&dir).join(epoch_name(e))).unwrap(),
                head(e),
                "the head of epoch {e} after the replay"
            );
        }
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(3));
        // Another head stored for an epoch (not a torn copy of the frame's) stays.
        b.commit(D, epoch(4)).await.unwrap();
        std::fs::write(heads_dir(&dir).join(epoch_name(4)), b"another head").unwrap();
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-3"));
        c.root(D).await.unwrap();
        assert_eq!(
            std::fs::read(heads_dir(&dir).join(epoch_name(4))).unwrap(),
            b"another head"
        );
    }

    #[tokio::test]
    async fn a_durable_frame_of_a_dead_writer_is_rolled_forward() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        // A writer wrote epoch 2's frame (its commit point) and died before its files.
        journal::write_frame(&dir, &epoch(2)).unwrap();
        // Epoch 2 is committed: a reader of this process rolls it forward (red team, issue
        // 18: it may have been half written, `a_reader_of_a_pool_never_sees_half_...`).
        assert_eq!(
            a.root(D).await.unwrap(),
            Some((2, b"r2".to_vec())),
            "a read rolls the dead writer's epoch forward"
        );
        // The next writer, built on epoch 1, finds epoch 2 committed: a conflict, and epoch
        // 2's files are there.
        let mut late = epoch(2);
        late.nodes = vec![(node(50), b"other".to_vec())];
        assert!(matches!(
            a.commit(D, late).await,
            Err(DirectoryStoreError::Conflict(_))
        ));
        holds(&a, 2).await;
        assert!(a.nodes(D, &[node(50)]).await.unwrap().is_empty());
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
        // A process that starts after a writer died half-way through writing epoch 4's
        // files (a node half written) rolls it forward on its first read.
        journal::write_frame(&dir, &epoch(4)).unwrap();
        std::fs::write(node_path(&dir, &node(99)), b"s4 and the tail of s3").unwrap();
        recovered()
            .lock()
            .unwrap()
            .remove(&(dir.clone(), "boot-1".to_string()));
        holds(&a, 4).await;
    }

    /// Red team (issue 18): a process of a pool that has read the domain already (checked
    /// once per process) while another process of the pool passed its commit point (its
    /// caller answered) and was killed half-way through the epoch's files, or failed to
    /// write them after its answer: this process's reads must not see epoch 1's root with
    /// epoch 2's node (a node is overwritten in place before the root). The other process is
    /// simulated by what it leaves on disk: the durable frame and one node written.
    #[tokio::test]
    async fn a_reader_of_a_pool_never_sees_half_of_a_dead_writers_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        // This process has read the domain: checked, not checked again.
        holds(&a, 1).await;
        journal::write_frame(&dir, &epoch(2)).unwrap();
        write_in_place(&node_path(&dir, &node(99)), b"s2").unwrap();
        read_whole(&a).await;
        holds(&a, 2).await;
    }

    /// CI flake of `rt18_a_back_dated_deletion_is_not_the_owners` (issue 18): a writer that
    /// dies anywhere in an epoch's files after its commit point (a one-shot `kst deliver`
    /// exits while its log's thread still writes them) leaves an epoch that every reader,
    /// a process of the pool that read the domain before or one reading it first, finds
    /// whole with the head in its frame. Never the root without that head: nothing rolled
    /// it forward, and the next one to need it signed it late with its own clock (the
    /// insider's writer, whose back-dated clock then hid the back-dating).
    #[tokio::test]
    async fn a_writer_dying_anywhere_in_its_files_leaves_its_head() {
        let mut cuts = 0;
        for n in 0.. {
            let tmp = tempfile::tempdir().unwrap();
            let (a, dir) = at_epoch_1(tmp.path()).await;
            holds(&a, 1).await;
            journal::write_frame(&dir, &epoch(2)).unwrap();
            cut::after(Some(n));
            let whole = materialize(&dir, &epoch(2)).is_ok();
            cut::after(None);
            if n % 2 == 1 {
                // A process that has not read the domain yet.
                forget_recovered(&dir, "boot-1");
            }
            let root = read_root(&dir).unwrap();
            let head = std::fs::read(heads_dir(&dir).join(epoch_name(2))).ok();
            assert!(
                root.as_ref().is_some_and(|(e, _)| *e == 1)
                    || head.as_deref() == Some(b"h2".as_slice()),
                "cut before file operation {n}: epoch 2's root without its head ({root:?})"
            );
            holds(&a, 2).await;
            if whole {
                break;
            }
            cuts += 1;
        }
        assert_eq!(cuts, 5, "two nodes, a value state, the root and the head");
    }

    /// A one-shot command's exit waits for its log's thread
    /// (`kst_core::transparency::wait_for_log_threads`, kst-bin's `main`): the log dropped
    /// once its change is answered (at the frame, the files held back here by [`gate`]),
    /// the wait does not return while the files are still to be written, and returns once
    /// they are, the epoch whole with its head and no frame after the root.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_exit_waits_for_the_files_of_a_dropped_log() {
        use kst_core::transparency::{DomainLog, LogKeys, wait_for_log_threads};
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let store = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        let dir = tmp.path().join(KT_DIR).join("example.net");
        let log = DomainLog::open(std::sync::Arc::new(store), LogKeys::generate("example.net"))
            .await
            .unwrap();
        let alice = kst_core::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        let record = kst_core::store::NewKey {
            address: alice.clone(),
            key: b"key 1".to_vec(),
            fingerprint: kst_core::Fingerprint::parse(&format!("{:040X}", 1)).unwrap(),
            publication_id: format!("{:032x}", 1),
            published_at: 1_700_000_001,
            revoked: false,
            expected: kst_core::store::Expected::Any,
        }
        .into_record(1);
        let open = gate::hold(&dir, 1);
        log.sync(&alice, Some(&record), 1_700_000_001)
            .await
            .unwrap();
        drop(log);
        // Answered at the frame; the files wait for the gate, and so does the log's thread.
        let waited =
            tokio::task::spawn_blocking(|| wait_for_log_threads(Duration::from_millis(300)))
                .await
                .unwrap();
        let root_before = read_root(&dir).unwrap().map(|(e, _)| e);
        open.send(()).unwrap();
        assert!(
            !waited,
            "the wait returned while the epoch's files were held"
        );
        assert_eq!(
            root_before,
            Some(0),
            "the files were written before the gate opened"
        );
        let ended = tokio::task::spawn_blocking(|| wait_for_log_threads(Duration::from_secs(30)))
            .await
            .unwrap();
        assert!(ended, "the log's thread did not end");
        assert_eq!(read_root(&dir).unwrap().map(|(e, _)| e), Some(1));
        // Epoch 1's head is in its frame (the tree's files wait for a checkpoint).
        let other = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        assert_eq!(
            other.heads("example.net", 1, 1).await.unwrap().len(),
            1,
            "epoch 1's head"
        );
        assert!(!journal::holds(&dir, 2).unwrap());
    }

    /// A writer killed while writing an epoch's files (or a head) leaves `.tmp-...` files:
    /// the next sweep under the domain's lock (a commit, at most every [`SWEEP_EVERY`])
    /// removes those of the domain's directory and `journal/` (only lock holders write
    /// there) and the old ones of `heads/`, and leaves a fresh one of `heads/` (an
    /// [`insert_head`] of another process may be writing it under the shared lock).
    #[tokio::test]
    async fn temporaries_a_killed_writer_left_are_removed() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        // A read waits for the lock: epoch 1's files (and the commit's sweep) are done.
        holds(&a, 1).await;
        let old = SystemTime::now() - STALE_HEAD_TEMP - Duration::from_secs(60);
        let plant = |path: PathBuf, modified: Option<SystemTime>| {
            let f =
                std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(at) = modified {
                f.set_modified(at).unwrap();
            }
            path
        };
        // `heads/` as a write-out (or `insert_head`) made it.
        std::fs::create_dir_all(heads_dir(&dir)).unwrap();
        let stale_head = plant(heads_dir(&dir).join(".tmp-00000001deadbeef"), Some(old));
        let fresh_head = plant(heads_dir(&dir).join(".tmp-00000002deadbeef"), None);
        let root_temp = plant(dir.join(".tmp-root-00000003deadbeef"), None);
        let root_file_temp = plant(dir.join(".tmp-00000004deadbeef"), None);
        let journal_temp = plant(
            journal::journal_dir(&dir).join(".tmp-00000005deadbeef"),
            None,
        );
        // This process swept at its first commit: as if it were another process's first.
        swept()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&dir);
        a.commit(D, epoch(2)).await.unwrap();
        // The sweep follows the answer, under the lock: a read waits for it.
        holds(&a, 2).await;
        for gone in [&stale_head, &root_temp, &root_file_temp, &journal_temp] {
            assert!(!gone.exists(), "{} was left", gone.display());
        }
        assert!(fresh_head.exists(), "a fresh head temporary was removed");
        // Swept at most every SWEEP_EVERY: the next commit lists nothing.
        let stale_again = plant(heads_dir(&dir).join(".tmp-00000006deadbeef"), Some(old));
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
        assert!(stale_again.exists(), "swept again within SWEEP_EVERY");
    }

    /// A store a build from before the head went in ahead of the root left with an epoch's
    /// root and no head (its writer died between the two), while the epoch's frame is in the
    /// journal: a process's first read links the frame's head, and so does the next commit
    /// (not signed late by whoever needs it next, with that one's clock).
    #[tokio::test]
    async fn a_root_left_without_its_head_gets_it_from_its_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        a.commit(D, epoch(2)).await.unwrap();
        holds(&a, 2).await;
        let head = heads_dir(&dir).join(epoch_name(2));
        // Above the checkpoint the head is the frame's, no file needed.
        assert!(!head.exists());
        // At or under it, the files hold the epoch, the head missing (the old build's
        // writer died between its root and its head).
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            materialize(&dir, &epoch(1)).unwrap();
            materialize(&dir, &epoch(2)).unwrap();
            journal::set_checkpoint(&dir, 2).unwrap();
        }
        std::fs::remove_file(&head).unwrap();
        // A process reading the domain first.
        forget_recovered(&dir, "boot-1");
        assert_eq!(a.heads(D, 2, 2).await.unwrap(), vec![(2, b"h2".to_vec())]);
        // The next commit, in a process that has read the domain already.
        std::fs::remove_file(&head).unwrap();
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
        // A frame without a head (its writer could not sign): nothing to link, and reads
        // go on (the head is signed late, as before).
        let mut no_head = epoch(4);
        no_head.head = None;
        a.commit(D, no_head).await.unwrap();
        forget_recovered(&dir, "boot-1");
        assert_eq!(a.heads(D, 4, 4).await.unwrap(), vec![]);
        assert_eq!(a.root(D).await.unwrap(), Some((4, b"r4".to_vec())));
    }

    #[tokio::test]
    async fn a_torn_frame_is_no_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (_a, dir) = at_epoch_1(tmp.path()).await;
        // A writer died writing epoch 2's frame: never committed, never confirmed.
        let frame = journal::encode(&epoch(2));
        std::fs::write(journal::slot_path(&dir, 2), &frame[..frame.len() / 2]).unwrap();
        // Not rolled forward, not replayed after a restart.
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, 1).await;
        assert!(frames(&dir).is_empty());
        // The next writer's epoch 2 is the one; a torn frame in its way is replaced.
        std::fs::write(journal::slot_path(&dir, 2), &frame[..frame.len() - 1]).unwrap();
        b.commit(D, epoch(2)).await.unwrap();
        holds(&b, 2).await;
        assert_eq!(journal::read_frame(&dir, 2).unwrap(), Some(epoch(2)));
    }

    /// Red team (round 7): a writer of the pool killed (SIGKILL) inside its frame's write,
    /// before the bytes were all written, leaves a torn frame after
    /// the root on this boot. It was never confirmed (the commit point is after the frame's
    /// sync), so it is no epoch; but reads took any file there for a dead writer's epoch to
    /// roll forward, found none to roll, and failed ("an epoch's files keep failing to be
    /// written"), every read of every process of the pool, and publishing (which reads the
    /// tree before it commits) could not write the frame that would have replaced it: the
    /// domain's directory stopped for good on one badly timed kill.
    #[tokio::test]
    async fn a_torn_frame_of_a_killed_writer_of_this_boot_stops_no_read() {
        for torn in [0, 1, 2] {
            let tmp = tempfile::tempdir().unwrap();
            let (a, dir) = at_epoch_1(tmp.path()).await;
            // This process has read the domain (checked once per process).
            holds(&a, 1).await;
            let frame = journal::encode(&epoch(2));
            let bytes: &[u8] = match torn {
                0 => &frame[..64],              // only its first bytes written
                1 => &frame[..frame.len() / 2], // half of the frame written
                _ => &frame[..frame.len() - 1], // all but its last byte
            };
            std::fs::write(journal::slot_path(&dir, 2), bytes).unwrap();
            // This process reads on, epoch 1 whole; the torn frame is set aside, not lost.
            holds(&a, 1).await;
            read_whole(&a).await;
            assert!(!frames(&dir).contains(&2), "{:?}", frames(&dir));
            let aside: Vec<_> = std::fs::read_dir(journal::journal_dir(&dir))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("torn-00000000000000000002-"))
                .collect();
            assert_eq!(aside.len(), 1, "{aside:?}");
            // So does another process of the pool (same boot, never checked the domain).
            std::fs::write(journal::slot_path(&dir, 2), bytes).unwrap();
            forget_recovered(&dir, "boot-1");
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
            holds(&b, 1).await;
            // The next writer commits epoch 2.
            b.commit(D, epoch(2)).await.unwrap();
            holds(&b, 2).await;
            holds(&a, 2).await;
        }
    }

    #[tokio::test]
    async fn the_checkpoint_moves_every_64_epochs() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        for e in 1..=journal::CHECKPOINT_EVERY + 2 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        let dir = tmp.path().join(KT_DIR).join(D);
        // In the background (the tree synced, then the checkpoint written): wait for it,
        // bounded.
        let e = journal::CHECKPOINT_EVERY;
        for _ in 0..300 {
            if journal::checkpoint(&dir).unwrap() == Some(e) && frames(&dir) == [e + 1, e + 2] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            journal::checkpoint(&dir).unwrap(),
            Some(journal::CHECKPOINT_EVERY)
        );
        assert_eq!(
            frames(&dir),
            vec![e + 1, e + 2],
            "frames under it are garbage"
        );
        // The tree's files were written out up to the checkpoint, not after it.
        assert_eq!(
            std::fs::read(node_path(&dir, &node(99))).unwrap(),
            format!("s{e}").into_bytes()
        );
        assert!(node_path(&dir, &own(e)).exists());
        assert!(!node_path(&dir, &own(e + 1)).exists());
        assert!(heads_dir(&dir).join(epoch_name(e)).exists());
        assert!(!heads_dir(&dir).join(epoch_name(e + 1)).exists());
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        assert_eq!(
            b.root(D).await.unwrap(),
            Some((e + 2, format!("r{}", e + 2).into_bytes()))
        );
    }

    /// Every frame is written in place into the slot of its epoch (modulo
    /// [`journal::SLOTS`]): after more than [`journal::SLOTS`] epochs the slots are the same
    /// files (inodes) they were, the journal holds no other file, a slot longer than the frame
    /// written over it keeps its length, and the epochs read back whole, after a restart too
    /// (replayed from the frames written over older ones).
    #[tokio::test]
    async fn frames_are_written_in_place_into_the_slots_of_their_epochs() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        // A long epoch 1 (epoch 1 + SLOTS is written over it).
        let mut long = epoch(1);
        long.nodes.push((node(200), vec![7; 4000]));
        a.commit(D, long).await.unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        let inodes: Vec<u64> = (0..journal::SLOTS)
            .map(|slot| {
                std::fs::metadata(journal::slot_path(&dir, slot))
                    .unwrap()
                    .ino()
            })
            .collect();
        let long_len = std::fs::metadata(journal::slot_path(&dir, 1))
            .unwrap()
            .len();
        assert!(long_len > 4000);
        let last = journal::SLOTS + 2;
        for e in 2..=last {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, last).await;
        // The background checkpoint (every CHECKPOINT_EVERY epochs) writes `checkpoint`
        // through a temporary file: wait until it has ended, bounded, before listing.
        for _ in 0..300 {
            if !checkpointing()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&dir)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        for slot in 0..journal::SLOTS {
            let meta = std::fs::metadata(journal::slot_path(&dir, slot)).unwrap();
            assert_eq!(
                meta.ino(),
                inodes[slot as usize],
                "slot {slot} is the same file"
            );
        }
        assert_eq!(
            std::fs::metadata(journal::slot_path(&dir, 1))
                .unwrap()
                .len(),
            long_len,
            "a slot is not cut by a shorter frame"
        );
        let mut others: Vec<String> = std::fs::read_dir(journal::journal_dir(&dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with("slot-"))
            .collect();
        others.sort();
        assert_eq!(others, ["boot", "checkpoint"]);
        for e in [journal::SLOTS + 1, last] {
            assert_eq!(journal::read_frame(&dir, e).unwrap(), Some(epoch(e)));
        }
        assert_eq!(journal::read_frame(&dir, 1).unwrap(), None, "written over");
        // After a restart the frames after the checkpoint are replayed like any other.
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, last).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(last));
    }

    /// A process that never lets a background checkpoint finish (none ran here: the
    /// checkpoint is set back by hand, as a late one leaves it) still never writes a frame
    /// over one above the checkpoint: the commit whose slot holds one syncs and moves the
    /// checkpoint first, and a restart then replays every epoch.
    #[tokio::test]
    async fn a_commit_whose_slot_holds_a_frame_above_the_checkpoint_moves_it_first() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let last = journal::SLOTS + 3;
        for e in 2..=last {
            if e.is_multiple_of(journal::CHECKPOINT_EVERY) || e == journal::SLOTS + 1 {
                // Wait out the background checkpoint, then set it back to 0 (as if it had
                // never finished).
                for _ in 0..300 {
                    if !checkpointing().lock().unwrap().contains(&dir) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                let _lock = DomainLock::acquire(&dir).unwrap();
                std::fs::write(
                    journal::journal_dir(&dir).join("checkpoint"),
                    [b"KSTJ3cp\n".as_slice(), &0u64.to_be_bytes()].concat(),
                )
                .unwrap();
            }
            a.commit(D, epoch(e)).await.unwrap();
            if e == journal::SLOTS + 1 {
                // Epoch 1 + SLOTS went where epoch 1 was, above checkpoint 0: the commit
                // moved the checkpoint to the epoch before it first.
                assert_eq!(journal::checkpoint(&dir).unwrap(), Some(journal::SLOTS));
            }
        }
        holds(&a, last).await;
        // The machine restarts having lost the files of the epochs after the checkpoint.
        std::fs::write(
            root::path_v3(&dir),
            root_bytes(&epoch(journal::SLOTS).root.unwrap()),
        )
        .unwrap();
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, last).await;
    }

    /// Red team (slots): the machine crashed while a writer wrote epoch 129's frame into the
    /// slot of epoch 1 (under the checkpoint, whole): none, part, or all but the last byte
    /// of the new bytes reached the disk. After the restart the replay takes none of it for
    /// epoch 129 (never confirmed), the store is at epoch 128, and the next epoch 129 is the
    /// one committed.
    #[tokio::test]
    async fn a_slot_torn_by_a_crash_is_not_replayed() {
        let e = journal::SLOTS;
        for torn in [0, 1, 2] {
            let tmp = tempfile::tempdir().unwrap();
            let (a, dir) = at_epoch_1(tmp.path()).await;
            for n in 2..=e {
                a.commit(D, epoch(n)).await.unwrap();
            }
            holds(&a, e).await;
            {
                let _lock = DomainLock::acquire(&dir).unwrap();
                if journal::checkpoint(&dir).unwrap() != Some(e) {
                    journal::set_checkpoint(&dir, e).unwrap();
                }
            }
            let slot = journal::slot_path(&dir, e + 1);
            assert_eq!(journal::read_frame(&dir, 1).unwrap(), Some(epoch(1)));
            let new = journal::encode(&epoch(e + 1));
            let left: &[u8] = match torn {
                0 => &[],
                1 => &new[..new.len() / 2],
                _ => &new[..new.len() - 1],
            };
            let f = std::fs::OpenOptions::new().write(true).open(&slot).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, left, 0).unwrap();
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
            holds(&b, e).await;
            assert_eq!(journal::checkpoint(&dir).unwrap(), Some(e));
            assert!(frames(&dir).is_empty(), "{:?}", frames(&dir));
            b.commit(D, epoch(e + 1)).await.unwrap();
            holds(&b, e + 1).await;
            let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-3"));
            holds(&c, e + 1).await;
        }
    }

    /// A store whose journal a kst of version 1 wrote (a file per frame, spares, the bare
    /// checkpoint and boot id), with epochs above its checkpoint, and one a writer of it
    /// died after (a durable frame, no files): the first process of this version replays
    /// them, upgrades the journal (its checkpoint and boot file of this version, the frames
    /// and spares of version 1 gone) and goes on; a restart then replays this version's.
    /// A store at `root` whose journal a kst of version 1 wrote under "boot-1" (a file per
    /// frame, a spare, the bare checkpoint and boot id): checkpoint 0, frames 1 to 3 (their
    /// files written, not synced), frame 4 durable, its writer dead (no files); its domain's
    /// directory.
    async fn version_1_store(root: &Path) -> PathBuf {
        let old = FsDirectoryStore::with_boot(root, None);
        old.commit(D, first()).await.unwrap();
        let dir = root.join(KT_DIR).join(D);
        // Under the domain's lock, as a writer: the commit above sweeps the domain's
        // temporary files after its answer, and `materialize` writes the root through one
        // (there is no `root.v3` to overwrite in place yet).
        let _lock = DomainLock::acquire(&dir).unwrap();
        let journal_dir = journal::journal_dir(&dir);
        std::fs::create_dir_all(&journal_dir).unwrap();
        std::fs::write(journal_dir.join("checkpoint"), 0u64.to_be_bytes()).unwrap();
        std::fs::write(journal_dir.join("boot"), b"boot-1").unwrap();
        for e in 1..=4 {
            std::fs::write(
                journal::frame_path_v1(&dir, e),
                journal::tests::encode_v1(&epoch(e)),
            )
            .unwrap();
            if e < 4 {
                materialize(&dir, &epoch(e)).unwrap();
            }
        }
        std::fs::write(journal_dir.join("spare-05"), b"an old frame").unwrap();
        root::tests::as_an_older_kst_left_it(&dir);
        dir
    }

    /// The names in `dir`'s journal but the slots, sorted.
    fn journal_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(journal::journal_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with("slot-"))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_journal_of_version_1_is_upgraded() {
        for same_boot in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = version_1_store(tmp.path()).await;
            let journal_dir = journal::journal_dir(&dir);
            let boot = if same_boot { "boot-1" } else { "boot-2" };
            let a = FsDirectoryStore::with_boot(tmp.path(), Some(boot));
            holds(&a, 4).await;
            assert_eq!(
                journal::stored_checkpoint(&dir).unwrap(),
                Some(journal::Stored::V3(4))
            );
            assert_eq!(journal::boot(&dir).unwrap().as_deref(), Some(boot));
            assert_eq!(
                journal_names(&dir),
                ["boot", "checkpoint"],
                "version 1's files gone"
            );
            // A kst of version 1 refuses it now: the boot file is another boot's to it, and
            // then its checkpoint is not 8 bytes ("is not an epoch").
            assert_ne!(
                std::fs::read(journal_dir.join("boot")).unwrap(),
                boot.as_bytes()
            );
            assert_ne!(
                std::fs::read(journal_dir.join("checkpoint")).unwrap().len(),
                8
            );
            a.commit(D, epoch(5)).await.unwrap();
            holds(&a, 5).await;
            assert_eq!(frames(&dir), vec![5]);
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-9"));
            holds(&b, 5).await;
        }
    }

    /// What a kst of version 1 (before the slots) does when it first touches the domain of
    /// `dir` under boot `boot`, as its recovery read the journal: its own boot id in the boot
    /// file (bare), or no checkpoint, or a checkpoint of 8 bytes, and it goes on (`true`:
    /// with no checkpoint it writes its bare boot id, then its own checkpoint and frames at
    /// its first commit: it takes the domain over); any other checkpoint is "not an epoch"
    /// (`Corrupt`): every read and commit refused (`false`).
    fn version_1_goes_on(dir: &Path, boot: &str) -> bool {
        let journal = journal::journal_dir(dir);
        if std::fs::read(journal.join("boot")).is_ok_and(|b| b == boot.as_bytes()) {
            return true;
        }
        match std::fs::read(journal.join("checkpoint")) {
            Ok(bytes) => bytes.len() == 8,
            Err(e) => e.kind() == ErrorKind::NotFound,
        }
    }

    /// Crash review F3 (issue 18): the gate that stops a kst of version 1 (this version's
    /// checkpoint) is written as the domain's journal starts, before its first epoch: before,
    /// a fresh domain had this version's boot file and no checkpoint until its first
    /// journaled commit, and a kst of version 1 touching it then went on and took it over
    /// (its bare boot id, its own journal). So is a store from before the journal, at its
    /// first read by this version.
    #[tokio::test]
    async fn a_kst_of_version_1_is_refused_from_the_first_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        assert_eq!(
            journal::stored_checkpoint(&dir).unwrap(),
            Some(journal::Stored::V3(0))
        );
        for boot in ["boot-1", "boot-2"] {
            assert!(!version_1_goes_on(&dir, boot), "under {boot}");
        }
        a.commit(D, epoch(1)).await.unwrap();
        holds(&a, 1).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(0));
        // A store from before the journal: gated at its first read, at its root.
        let tmp = tempfile::tempdir().unwrap();
        let old = FsDirectoryStore::with_boot(tmp.path(), None);
        old.commit(D, first()).await.unwrap();
        old.commit(D, epoch(1)).await.unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        assert!(version_1_goes_on(&dir, "boot-1"), "no journal yet");
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&b, 1).await;
        assert_eq!(
            journal::stored_checkpoint(&dir).unwrap(),
            Some(journal::Stored::V3(1))
        );
        assert!(!version_1_goes_on(&dir, "boot-1"));
        b.commit(D, epoch(2)).await.unwrap();
        holds(&b, 2).await;
        assert_eq!(frames(&dir), vec![2]);
        // A domain a kst from before the gate made on this boot (its boot file, akd's first
        // root, no checkpoint): gated by this boot's first process to touch it.
        let tmp = tempfile::tempdir().unwrap();
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        c.commit(D, first()).await.unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        std::fs::remove_file(journal::journal_dir(&dir).join("checkpoint")).unwrap();
        assert!(version_1_goes_on(&dir, "boot-2"));
        forget_recovered(&dir, "boot-1");
        assert_eq!(c.root(D).await.unwrap(), Some((0, b"r0".to_vec())));
        assert_eq!(
            journal::stored_checkpoint(&dir).unwrap(),
            Some(journal::Stored::V3(0))
        );
        assert!(!version_1_goes_on(&dir, "boot-2"));
    }

    /// Crash review (issue 18): an upgrade of a journal of version 1 killed at any step (in
    /// the replay of any frame's files, before the `syncfs`, before this version's
    /// checkpoint, between the removals of version 1's files, before the boot file) is
    /// finished by the next process of the same boot, and by one after a restart: every
    /// epoch there, this version's checkpoint, no file of version 1 left. Before, an upgrade
    /// killed after the checkpoint left version 1's frames and spares for good (the next
    /// recovery found a journal of this version and removed nothing).
    #[tokio::test]
    async fn an_upgrade_killed_at_any_step_is_finished_by_the_next_process() {
        let mut kills = 0;
        for n in 0.. {
            let tmp = tempfile::tempdir().unwrap();
            let dir = version_1_store(tmp.path()).await;
            let killed = {
                let _lock = DomainLock::acquire(&dir).unwrap();
                cut::after(Some(n));
                let recovered = recover_locked(&dir, "boot-2");
                cut::after(None);
                recovered.is_err()
            };
            // The killed process's memory goes with it.
            forget_recovered(&dir, "boot-2");
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
            holds(&b, 4).await;
            assert_eq!(
                journal::stored_checkpoint(&dir).unwrap(),
                Some(journal::Stored::V3(4)),
                "killed at step {n}"
            );
            assert_eq!(
                journal_names(&dir),
                ["boot", "checkpoint"],
                "killed at step {n}: version 1's files left"
            );
            assert!(!version_1_goes_on(&dir, "boot-1"), "killed at step {n}");
            assert_eq!(
                root::tests::older_kst_reads_root(&dir),
                Err(()),
                "killed at step {n}: the root not moved"
            );
            b.commit(D, epoch(5)).await.unwrap();
            let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-3"));
            holds(&c, 5).await;
            if !killed {
                break;
            }
            kills += 1;
        }
        // The root's move (killed between its copy and its marker), four frames of five
        // file operations each, the sync, the checkpoint, four frames and a spare of version
        // 1 removed, the boot file.
        assert_eq!(kills, 1 + 4 * 5 + 1 + 1 + 5 + 1);
    }

    /// A checkpoint of a form this kst does not know (a newer kst's journal) stops every
    /// read and commit of the domain (`Corrupt`, for an operator), and nothing is written.
    #[tokio::test]
    async fn a_journal_of_a_newer_kst_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        holds(&a, 1).await;
        let newer = b"KSTJ4cp\n\0\0\0\0\0\0\0\x01".to_vec();
        std::fs::write(journal::journal_dir(&dir).join("checkpoint"), &newer).unwrap();
        std::fs::write(journal::journal_dir(&dir).join("boot"), b"KSTJ4 boot-1").unwrap();
        // Another process (not yet checked the domain).
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-7"));
        assert!(matches!(
            b.root(D).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert!(matches!(
            b.commit(D, epoch(2)).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(read_root(&dir).unwrap().map(|(e, _)| e), Some(1));
        assert_eq!(
            std::fs::read(journal::journal_dir(&dir).join("checkpoint")).unwrap(),
            newer
        );
    }

    /// Red team (slots): two writers of the pool take turns across checkpoints and all the
    /// slots (the frames under a checkpoint written over by later ones) while readers of
    /// a third instance read; every read sees one epoch whole and never an older one, and
    /// the store holds every epoch, on this boot and after a restart (the frames after the
    /// checkpoint, written over older ones, replayed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_taking_turns_across_a_checkpoint_keep_every_epoch_whole() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        let r = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        let done = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(&r, 3, &done, &Default::default());
        let last = journal::SLOTS + 10;
        for e in 2..=last {
            let writer = if e % 2 == 0 { &a } else { &b };
            writer.commit(D, epoch(e)).await.unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let mut reads = 0;
        for t in readers {
            reads += t.await.unwrap();
        }
        assert!(reads > 0, "the readers read nothing");
        holds(&r, last).await;
        // The checkpoint at 64 moved (in the background) or not yet: either way a restart
        // replays what lies after it.
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&c, last).await;
        assert!(frames(&dir).is_empty(), "{:?}", frames(&dir));
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(last));
    }

    /// The root file is overwritten in place when its length does not change (no inode made
    /// and freed per epoch), and replaced through a temporary file when it does.
    #[tokio::test]
    async fn the_root_is_overwritten_in_place_when_its_length_stays() {
        use std::os::unix::fs::MetadataExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let ino = || std::fs::metadata(root::path_v3(&dir)).unwrap().ino();
        let at_1 = ino();
        for e in 2..=9 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 9).await;
        assert_eq!(ino(), at_1, "same length (r1 .. r9): in place");
        // r10 is longer: a new file, then in place again.
        a.commit(D, epoch(10)).await.unwrap();
        holds(&a, 10).await;
        let at_10 = ino();
        assert_ne!(at_10, at_1);
        a.commit(D, epoch(11)).await.unwrap();
        holds(&a, 11).await;
        assert_eq!(ino(), at_10);
    }

    #[tokio::test]
    async fn a_store_from_before_the_journal_starts_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        // Written by a kst without the journal (a syncfs per epoch).
        let old = FsDirectoryStore::with_boot(tmp.path(), None);
        old.commit(D, first()).await.unwrap();
        for e in 1..=2 {
            old.commit(D, epoch(e)).await.unwrap();
        }
        assert!(!journal::journal_dir(&dir).exists());
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&a, 2).await;
        a.commit(D, epoch(3)).await.unwrap();
        assert_eq!(
            journal::checkpoint(&dir).unwrap(),
            Some(2),
            "starts at the durable root"
        );
        assert_eq!(frames(&dir), vec![3]);
        // A restart replays epoch 3 into the tree's files (an older kst reads only those,
        // so it must never touch a store with frames above the checkpoint).
        let restarted = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1b"));
        holds(&restarted, 3).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(3));
        // A kst from before the journal is refused now (the root moved, `root.rs`): it
        // reads no root, commits nothing.
        assert!(matches!(
            old.root(D).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert!(matches!(
            old.commit(D, epoch(4)).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(root::tests::older_kst_reads_root(&dir), Err(()));
        // Before the root moved (a store of journal version 2 or 1), an older kst could
        // commit epoch 4 without a frame (synced). After a restart the root is above the
        // journal's last frame: refused (crash review F2: such an epoch may as well be one
        // whose frame was lost, its files with it), until an operator who knows an older
        // kst wrote it removes the checkpoint, as the error says.
        root::tests::as_an_older_kst_left_it(&dir);
        old.commit(D, epoch(4)).await.unwrap();
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        let refused = b.root(D).await;
        assert!(
            matches!(&refused, Err(DirectoryStoreError::Corrupt(m)) if m.contains("remove")),
            "{refused:?}"
        );
        std::fs::remove_file(journal::journal_dir(&dir).join("checkpoint")).unwrap();
        holds(&b, 4).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(4));
        b.commit(D, epoch(5)).await.unwrap();
        holds(&b, 5).await;
        assert_eq!(frames(&dir), vec![5]);
    }

    /// Crash review F2 (issue 18): after a restart the stored root lies above the last frame
    /// the journal replays from its checkpoint (here epoch 2's frame is gone: its sync had
    /// failed, and a kst from before its blanking rolled it forward and built epoch 3 on it;
    /// the restart lost epoch 3's node, written unsynced). The files of the epochs without
    /// a frame may be lost, so the domain is refused (`Corrupt`, every read and commit,
    /// saying what to do) and nothing is written, where before the replay was skipped and
    /// the root served without its node.
    #[tokio::test]
    async fn a_root_above_the_journals_frames_after_a_restart_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        for e in 2..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        let slot = journal::slot_path(&dir, 2);
        let len = std::fs::metadata(&slot).unwrap().len() as usize;
        std::fs::write(&slot, vec![0; len]).unwrap();
        // Epoch 3's node was never written to its file (tree files at checkpoints only).
        assert!(!node_path(&dir, &node(3)).exists());
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        for _ in 0..2 {
            let read = b.root_and_nodes(D, &[node(3)]).await;
            assert!(
                matches!(&read, Err(DirectoryStoreError::Corrupt(m))
                    if m.contains("epoch 3") && m.contains("stop at epoch 1")),
                "{read:?}"
            );
        }
        assert!(matches!(
            b.commit(D, epoch(4)).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(read_root(&dir).unwrap().map(|(e, _)| e), Some(3));
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(0));
        assert_eq!(journal::boot(&dir).unwrap().as_deref(), Some("boot-1"));
    }

    /// Journal version 3 (issue 18, fs): a process of a pool reads the epochs another
    /// committed through its own overlay, built from their frames (the tree's files are
    /// written at checkpoints only), and the other reads its epochs the same way; the
    /// files hold none of them meanwhile.
    #[tokio::test]
    async fn a_process_of_a_pool_reads_anothers_epochs_through_its_overlay() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&b, 1).await;
        for e in 2..=10 {
            a.commit(D, epoch(e)).await.unwrap();
            assert_eq!(read_whole(&b).await, e);
        }
        holds(&b, 10).await;
        b.commit(D, epoch(11)).await.unwrap();
        holds(&a, 11).await;
        holds(&b, 11).await;
        // None of it in the tree's files: the overlay holds it.
        assert_eq!(std::fs::read(node_path(&dir, &node(99))).unwrap(), b"s0");
        assert!(!heads_dir(&dir).join(epoch_name(11)).exists());
        let ov = b.overlay(&dir).unwrap();
        assert!(locked(&ov).len() > 0);
        assert_eq!(locked(&ov).upto(), Some(11));
    }

    /// Review F6 (journal version 3): a process that only reads a domain another process
    /// writes holds the epochs above the checkpoint it has seen moved, at most
    /// `SLOTS + PRUNE_STEP` (most often about 64 to 80), where it held up to 256 epochs; and
    /// a domain's overlay unused for `overlay::IDLE` is dropped whole (the writer's too: its
    /// next commit builds it again from the frames, and the next write-out writes every
    /// epoch), unless a read or commit holds it.
    #[tokio::test]
    async fn a_reading_process_holds_few_epochs_and_drops_an_idle_domains() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        let last = 4 * journal::CHECKPOINT_EVERY + 10;
        let (mut most, mut records) = (0, 0);
        for e in 2..=last {
            a.commit(D, epoch(e)).await.unwrap();
            if e.is_multiple_of(journal::CHECKPOINT_EVERY) {
                // The background checkpoint moved (bounded wait), as a live pool's does
                // between two of its epochs most often.
                for _ in 0..300 {
                    if !checkpointing().lock().unwrap().contains(&dir)
                        && journal::checkpoint(&dir).unwrap() == Some(e)
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            assert_eq!(read_whole(&b).await, e);
            let ov = b.overlay(&dir).unwrap();
            let ov = locked(&ov);
            most = most.max(ov.epochs());
            records = records.max(ov.len());
        }
        eprintln!("the reading process held at most {most} epochs, {records} records");
        // At most the 64 epochs a checkpoint spans, and the 16 before it sees it moved (the
        // rule's bound, without the background checkpoint's lag: SLOTS + PRUNE_STEP).
        assert!(
            most <= journal::CHECKPOINT_EVERY + 2 * overlay::PRUNE_STEP,
            "the reading process held {most} epochs ({records} records)"
        );
        holds(&b, last).await;
        let held = locked(&b.overlay(&dir).unwrap()).len();
        assert!(held > 0);
        // As of a moment IDLE after the last use.
        let later = || std::time::Instant::now() + overlay::IDLE;
        // In use (a read under way holds it): kept.
        {
            let _in_use = b.overlay(&dir).unwrap();
            assert!(b.overlays.lock().unwrap().drop_idle(later()).is_empty());
        }
        assert_eq!(b.overlays.lock().unwrap().drop_idle(later()).len(), 1);
        assert_eq!(b.overlays.lock().unwrap().held(), 0, "{held} records freed");
        holds(&b, last).await;
        assert_eq!(b.overlays.lock().unwrap().held(), 1);
        // The writer's, dropped between two commits (once its background checkpoint let it
        // go): the next commits and write-out keep every epoch.
        for _ in 0..300 {
            if !checkpointing().lock().unwrap().contains(&dir) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(a.overlays.lock().unwrap().drop_idle(later()).len(), 1);
        let next = 5 * journal::CHECKPOINT_EVERY + 1;
        for e in last + 1..=next {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, next).await;
        holds(&b, next).await;
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&c, next).await;
    }

    /// Review F4: a background checkpoint whose write-out was followed by a replay killed
    /// half-way (a process without a boot id, at its first touch: the files rewound to an
    /// early frame's, the root with them) does not move the checkpoint over them; the next
    /// replay starts from the old checkpoint and every epoch is there.
    #[tokio::test]
    async fn a_checkpoint_does_not_move_over_files_a_killed_replay_rewound() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        for e in 2..=10 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        let ov = a.overlay(&dir).unwrap();
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            assert_eq!(write_out(&dir, &ov).unwrap(), 10);
            // Another process's replay from checkpoint 0, killed after frame 3.
            for e in 1..=3 {
                materialize(&dir, &epoch(e)).unwrap();
            }
            move_checkpoint(&dir, 10, &ov).unwrap();
        }
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(0), "not moved");
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, 10).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(10));
    }

    /// Review F1 (journal version 3): a deletion's batch rewrites value states of earlier
    /// epochs (akd's tombstones, kst-core `withdraw_deleted`). The overlay keeps them by the
    /// epoch of the frame that wrote them, so a tombstone for an epoch under the checkpoint,
    /// written by a frame above it, is written out at the next checkpoint and not dropped by
    /// a prune (a late background checkpoint's included): every process reads the tombstone,
    /// before and after the checkpoint. Before, it was skipped and pruned, and the deleted
    /// value came back from its file.
    #[tokio::test]
    async fn a_value_state_rewritten_for_an_epoch_under_the_checkpoint_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let c = journal::CHECKPOINT_EVERY;
        let wait_checkpoint = |want: u64| {
            let dir = dir.clone();
            async move {
                for _ in 0..300 {
                    if !checkpointing().lock().unwrap().contains(&dir)
                        && journal::checkpoint(&dir).unwrap() == Some(want)
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                assert_eq!(journal::checkpoint(&dir).unwrap(), Some(want));
            }
        };
        for e in 2..=c {
            a.commit(D, epoch(e)).await.unwrap();
        }
        wait_checkpoint(c).await;
        // A deletion's batch: the value of epoch 2 withdrawn.
        let mut del = epoch(c + 1);
        del.value_states
            .push(kst_core::transparency::ValueStateBlob {
                label: b"label".to_vec(),
                epoch: 2,
                blob: b"tomb".to_vec(),
            });
        a.commit(D, del).await.unwrap();
        let at2 = |s: Vec<(u64, Vec<u8>)>| s.into_iter().find(|(e, _)| *e == 2).unwrap().1;
        assert_eq!(at2(a.value_states(D, b"label").await.unwrap()), b"tomb");
        // What a late background checkpoint of epoch c does.
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            locked(&a.overlay(&dir).unwrap()).prune(c);
        }
        assert_eq!(at2(a.value_states(D, b"label").await.unwrap()), b"tomb");
        for e in c + 2..=2 * c {
            a.commit(D, epoch(e)).await.unwrap();
        }
        wait_checkpoint(2 * c).await;
        assert_eq!(
            std::fs::read(values_dir(&dir, b"label").join(epoch_name(2))).unwrap(),
            b"tomb"
        );
        assert_eq!(at2(a.value_states(D, b"label").await.unwrap()), b"tomb");
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        assert_eq!(at2(b.value_states(D, b"label").await.unwrap()), b"tomb");
    }

    /// Journal version 3: the machine crashes after a write-out wrote the tree's files but
    /// before its `syncfs` moved the checkpoint, and the page cache lost part of them (a
    /// node back at an older epoch, another gone, the root back): the restart replays every
    /// frame after the checkpoint, and no epoch is lost.
    #[tokio::test]
    async fn a_crash_between_checkpoints_loses_no_epoch() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let last = 2 * journal::CHECKPOINT_EVERY + 3;
        for e in 2..=last {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, last).await;
        for _ in 0..300 {
            if !checkpointing().lock().unwrap().contains(&dir) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        {
            // The checkpoint as if the second write-out's syncfs never finished.
            let _lock = DomainLock::acquire(&dir).unwrap();
            std::fs::write(
                journal::journal_dir(&dir).join("checkpoint"),
                [
                    b"KSTJ3cp\n".as_slice(),
                    &journal::CHECKPOINT_EVERY.to_be_bytes(),
                ]
                .concat(),
            )
            .unwrap();
        }
        // What the crash lost of the write-out, and the root.
        std::fs::write(node_path(&dir, &node(99)), b"s70").unwrap();
        std::fs::remove_file(node_path(&dir, &own(100))).unwrap();
        std::fs::remove_file(values_dir(&dir, b"label").join(epoch_name(90))).unwrap();
        std::fs::write(heads_dir(&dir).join(epoch_name(120)), b"").unwrap();
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(100).root.unwrap())).unwrap();
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        holds(&b, last).await;
        assert_eq!(journal::checkpoint(&dir).unwrap(), Some(last));
        // And a crash before any write-out of the epochs after the checkpoint.
        b.commit(D, epoch(last + 1)).await.unwrap();
        std::fs::write(root::path_v3(&dir), root_bytes(&epoch(last).root.unwrap())).unwrap();
        let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-3"));
        holds(&c, last + 1).await;
    }

    /// Journal version 3: a writer killed anywhere in a write-out (before any of its file
    /// operations) leaves files no newer than the root, masked by every overlay: its own
    /// process, another of the pool and one after a restart read every epoch whole, and
    /// the next write-out finishes it.
    #[tokio::test]
    async fn a_write_out_killed_half_way_loses_nothing() {
        let mut kills = 0;
        for n in 0.. {
            let tmp = tempfile::tempdir().unwrap();
            let (a, dir) = at_epoch_1(tmp.path()).await;
            for e in 2..=4 {
                a.commit(D, epoch(e)).await.unwrap();
            }
            let ov = a.overlay(&dir).unwrap();
            let killed = {
                let _lock = DomainLock::acquire(&dir).unwrap();
                cut::after(Some(n));
                let out = write_out(&dir, &ov);
                cut::after(None);
                out.is_err()
            };
            holds(&a, 4).await;
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
            holds(&b, 4).await;
            a.commit(D, epoch(5)).await.unwrap();
            holds(&b, 5).await;
            let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
            holds(&c, 5).await;
            assert_eq!(journal::checkpoint(&dir).unwrap(), Some(5));
            if !killed {
                break;
            }
            kills += 1;
        }
        // Four nodes of their own and the shared one, four value states, four heads.
        assert_eq!(kills, 5 + 4 + 4);
    }

    /// A store at `root` a kst of journal version 2 left under "boot-1" (the tree's files
    /// written after every frame): checkpoint 0, epochs 1 to 3 with their files, epoch 4's
    /// frame durable and its writer dead (no files, no root); its domain's directory.
    async fn version_2_store(root: &Path) -> PathBuf {
        let (a, dir) = at_epoch_1(root).await;
        for e in 2..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            for e in 1..=3 {
                materialize(&dir, &epoch(e)).unwrap();
            }
            journal::write_frame(&dir, &epoch(4)).unwrap();
            let journal_dir = journal::journal_dir(&dir);
            std::fs::write(
                journal_dir.join("checkpoint"),
                [b"KSTJ2cp\n".as_slice(), &0u64.to_be_bytes()].concat(),
            )
            .unwrap();
            std::fs::write(journal_dir.join("boot"), b"KSTJ2 boot-1").unwrap();
            root::tests::as_an_older_kst_left_it(&dir);
        }
        // Processes of this version forget it (a kst of version 2 wrote it).
        forget_recovered(&dir, "boot-1");
        dir
    }

    /// Journal version 3: a store of version 2 is upgraded by the first process of this
    /// version to touch it, on the same boot or after a restart (its frames replayed, the
    /// dead writer's epoch with them, a `syncfs`, then the checkpoint and boot file of
    /// version 3); a kst of version 2 that touches the domain afterwards fails closed (it
    /// takes the boot file for another boot's, recovers, and refuses the checkpoint).
    #[tokio::test]
    async fn a_journal_of_version_2_is_upgraded_and_version_2_refused() {
        for same_boot in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = version_2_store(tmp.path()).await;
            assert_eq!(
                journal::tests::version_2_reads(&dir),
                (Ok(Some(0)), Some("boot-1".into()))
            );
            let boot = if same_boot { "boot-1" } else { "boot-2" };
            let a = FsDirectoryStore::with_boot(tmp.path(), Some(boot));
            holds(&a, 4).await;
            assert_eq!(
                journal::stored_checkpoint(&dir).unwrap(),
                Some(journal::Stored::V3(4))
            );
            assert_eq!(journal::boot(&dir).unwrap().as_deref(), Some(boot));
            assert_eq!(journal::tests::version_2_reads(&dir), (Err(()), None));
            a.commit(D, epoch(5)).await.unwrap();
            holds(&a, 5).await;
            assert_eq!(frames(&dir), vec![5]);
            assert!(
                !node_path(&dir, &node(5)).exists(),
                "version 3 from epoch 5"
            );
            let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-9"));
            holds(&b, 5).await;
        }
    }

    /// A legacy store (no journal: as a kst from before it wrote it) at `root` holding epochs
    /// 0 to 2; its domain's directory.
    async fn store_from_before_the_journal(root: &Path) -> PathBuf {
        let old = FsDirectoryStore::with_boot(root, None);
        old.commit(D, first()).await.unwrap();
        for e in 1..=2 {
            old.commit(D, epoch(e)).await.unwrap();
        }
        root.join(KT_DIR).join(D)
    }

    /// A store of journal version 3 as a kst of that version before the root moved left it
    /// (its root in `root`, frames above the checkpoint, this boot's boot file): epochs 0 to
    /// 5; its domain's directory.
    async fn version_3_store_before_the_move(root: &Path) -> PathBuf {
        let (a, dir) = at_epoch_1(root).await;
        for e in 2..=5 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 5).await;
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            root::tests::as_an_older_kst_left_it(&dir);
        }
        forget_recovered(&dir, "boot-1");
        dir
    }

    /// Review F2/F3 (issue 18): once a process of this version touched a domain, every
    /// older kst fails closed on it, a process that had read the domain before included:
    /// its every read of the root (which each read of the tree and each commit starts with)
    /// is refused (`Corrupt`), where before it read the live root over node files stale
    /// since the checkpoint and could sign a head of a wrong root hash. The older kst's
    /// reader is `root::tests::older_kst_reads_root` (the one check of every release from
    /// the first directory to journal version 3 before the move), and a kst without the
    /// journal (this build's legacy path, as a kst from before the journal) is run for real.
    /// For each store an older kst left (from before the journal, journal versions 1, 2 and 3
    /// before the move, on this boot or after a restart) and a fresh domain: the older
    /// kst reads it before, refuses it after, across checkpoints; this version reads and
    /// commits every epoch.
    #[tokio::test]
    async fn every_older_kst_fails_closed_on_a_store_this_version_touched() {
        let refused = |dir: &Path| root::tests::older_kst_reads_root(dir) == Err(());
        // A fresh domain: refused from its first root (an older kst would take a domain
        // without one for empty and start a tree of its own).
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.commit(D, first()).await.unwrap();
        let dir = tmp.path().join(KT_DIR).join(D);
        assert!(refused(&dir));
        assert_eq!(std::fs::read(dir.join("root")).unwrap(), root::MOVED);
        let old = FsDirectoryStore::with_boot(tmp.path(), None);
        assert!(matches!(
            old.root(D).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        for (name, last) in [
            ("before the journal", 2),
            ("journal version 1", 4),
            ("journal version 2", 4),
            ("journal version 3 before the move, same boot", 5),
            ("journal version 3 before the move, after a restart", 5),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = match name {
                "before the journal" => store_from_before_the_journal(tmp.path()).await,
                "journal version 1" => version_1_store(tmp.path()).await,
                "journal version 2" => version_2_store(tmp.path()).await,
                _ => version_3_store_before_the_move(tmp.path()).await,
            };
            let stored = root::tests::older_kst_reads_root(&dir);
            assert!(matches!(stored, Ok(Some(_))), "{name}: {stored:?}");
            let boot = if name.ends_with("restart") {
                "boot-2"
            } else {
                "boot-1"
            };
            let b = FsDirectoryStore::with_boot(tmp.path(), Some(boot));
            holds(&b, last).await;
            assert!(refused(&dir), "{name}");
            let old = FsDirectoryStore::with_boot(tmp.path(), None);
            for e in last + 1..=last + journal::CHECKPOINT_EVERY + 2 {
                b.commit(D, epoch(e)).await.unwrap();
                assert!(refused(&dir), "{name}, epoch {e}");
                let read = old.root_and_nodes(D, &[node(99)]).await;
                assert!(
                    matches!(&read, Err(DirectoryStoreError::Corrupt(m)) if m.contains("root.v3")),
                    "{name}, epoch {e}: {read:?}"
                );
            }
            let last = last + journal::CHECKPOINT_EVERY + 2;
            assert!(matches!(
                old.commit(D, epoch(last + 1)).await,
                Err(DirectoryStoreError::Corrupt(_))
            ));
            let c = FsDirectoryStore::with_boot(tmp.path(), Some("boot-3"));
            holds(&c, last).await;
            holds(&b, last).await;
        }
    }

    /// Review L1 (of `kst migrate`'s read of every logged domain): an older release's domain
    /// whose empty `lock` file is gone (a restore that left out empty files) has its root
    /// moved by a read like any other, and reads and commits go on. Before, a domain without
    /// a lock file counted as one with nothing to recover: the read served the older root
    /// from `root`, nothing moved, and an older kst still read the domain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_of_an_older_domain_without_its_lock_file_moves_its_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = store_from_before_the_journal(tmp.path()).await;
        std::fs::remove_file(dir.join("lock")).unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        a.heads(D, 0, 0).await.unwrap();
        assert_eq!(root::tests::older_kst_reads_root(&dir), Err(()), "moved");
        holds(&a, 2).await;
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
    }

    /// Review of F2/F3, L1: `root.v3` lost (a partial restore, a backup tool's exclude)
    /// while `root` holds the marker and the journal holds epochs: the domain is refused
    /// (`Corrupt`), and a first root is not committed over the real tree's nodes. Before, it
    /// read as a domain without a root, and akd's empty tree overwrote the root node's file.
    #[tokio::test]
    async fn a_lost_root_v3_is_refused_not_taken_for_an_empty_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        for e in 2..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        std::fs::remove_file(root::path_v3(&dir)).unwrap();
        let node_file = node_path(&dir, &node(0));
        let before = std::fs::read(&node_file).unwrap();
        // Another process of the boot (a restart would replay the frames above the
        // checkpoint, the root with them).
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        for _ in 0..2 {
            let read = b.root(D).await;
            assert!(
                matches!(&read, Err(DirectoryStoreError::Corrupt(m)) if m.contains("root.v3")),
                "{read:?}"
            );
        }
        let mut empty = first();
        empty.nodes[0].1 = b"the empty tree".to_vec();
        assert!(matches!(
            b.commit(D, empty).await,
            Err(DirectoryStoreError::Corrupt(_))
        ));
        assert_eq!(std::fs::read(&node_file).unwrap(), before);
        assert!(!root::path_v3(&dir).exists());
    }

    /// Review of F2/F3, L2: a root put back into `root` under a running process (a partial
    /// restore) is moved again at that process's next read, so older kst refuse the domain
    /// again, and the restored root is rolled forward by the journal's frames above it.
    /// Before, the process read `root.v3` on, and older kst read the restored root.
    #[tokio::test]
    async fn a_root_restored_under_a_running_process_is_moved_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        for e in 2..=3 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        holds(&a, 3).await;
        std::fs::write(root::path_legacy(&dir), root_bytes(&epoch(2).root.unwrap())).unwrap();
        assert_eq!(root::tests::older_kst_reads_root(&dir), Ok(Some(2)));
        holds(&a, 3).await;
        assert_eq!(root::tests::older_kst_reads_root(&dir), Err(()));
        a.commit(D, epoch(4)).await.unwrap();
        holds(&a, 4).await;
    }

    /// Review F2/F3: the root's move is killed between its copy to `root.v3` and the marker
    /// (its commit point); a kst from before the journal, not refused yet, commits epoch 3
    /// meanwhile: the next process of this version copies the root again and serves epoch
    /// 3, not the copy's epoch 2.
    #[tokio::test]
    async fn a_move_of_the_root_killed_before_its_marker_is_done_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = store_from_before_the_journal(tmp.path()).await;
        {
            let _lock = DomainLock::acquire(&dir).unwrap();
            cut::after(Some(0));
            let moved = root::move_to_v3(&dir);
            cut::after(None);
            assert!(moved.is_err());
        }
        assert_eq!(read_root(&dir).unwrap().map(|r| r.0), Some(2), "copied");
        assert_eq!(root::tests::older_kst_reads_root(&dir), Ok(Some(2)));
        let old = FsDirectoryStore::with_boot(tmp.path(), None);
        old.commit(D, epoch(3)).await.unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        holds(&a, 3).await;
        assert_eq!(root::tests::older_kst_reads_root(&dir), Err(()));
        a.commit(D, epoch(4)).await.unwrap();
        holds(&a, 4).await;
    }

    /// The directory's file work has a lane of its own beside the key store's bound: while
    /// [`crate::MAX_BLOCKING`] file operations of the key store run (publications flushing
    /// their keys), a directory read and a commit still run at once, so the writer's epoch,
    /// which every publication waits for, does not queue behind them. The directory's lane is
    /// bounded in turn: while [`crate::MAX_DIRECTORY_BLOCKING`] directory operations run, the
    /// next one waits, and it finishes once they do. (Before, the directory shared the key
    /// store's permits, FIFO; on `spawn_blocking` of its own before that, it ran beside them up
    /// to Tokio's 512 threads.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn directory_work_has_a_bounded_lane_of_its_own() {
        use crate::{MAX_BLOCKING, MAX_DIRECTORY_BLOCKING};
        let tmp = tempfile::tempdir().unwrap();
        let store = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        store.commit(D, first()).await.unwrap();

        // `n` operations of `lane` that run until released.
        let hold = |lane: Lane, n: usize| {
            let (started, running) = tokio::sync::mpsc::unbounded_channel();
            let release = std::sync::Arc::new(std::sync::Barrier::new(n + 1));
            let holders: Vec<_> = (0..n)
                .map(|_| {
                    let (started, release) = (started.clone(), release.clone());
                    tokio::spawn(crate::pool::bounded(lane, move || {
                        started.send(()).unwrap();
                        release.wait();
                    }))
                })
                .collect();
            (holders, running, release)
        };

        // The key store's bound taken whole: the directory reads and commits meanwhile.
        let (holders, mut running, release) = hold(Lane::Store, MAX_BLOCKING);
        for _ in 0..MAX_BLOCKING {
            running.recv().await.unwrap();
        }
        let ran = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let root = store.root(D).await?;
            store.commit(D, epoch(1)).await?;
            Ok::<_, DirectoryStoreError>(root)
        })
        .await;
        let released = release.clone();
        tokio::task::spawn_blocking(move || released.wait())
            .await
            .unwrap();
        for h in holders {
            h.await.unwrap().unwrap();
        }
        let root = ran
            .expect("the directory waited behind the key store's file operations")
            .unwrap();
        assert_eq!(root.map(|(e, _)| e), Some(0));
        holds(&store, 1).await;

        // The directory's own lane taken whole: the next directory read waits for it.
        let (holders, mut running, release) = hold(Lane::Directory, MAX_DIRECTORY_BLOCKING);
        for _ in 0..MAX_DIRECTORY_BLOCKING {
            running.recv().await.unwrap();
        }
        let read = tokio::spawn({
            let store = store.clone();
            async move { store.root(D).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let ran_early = read.is_finished();
        let in_flight = crate::directory_blocking_in_flight();
        // Released before any assertion: a failing test must not leave threads waiting.
        tokio::task::spawn_blocking(move || release.wait())
            .await
            .unwrap();
        assert!(
            !ran_early,
            "directory work ran while {MAX_DIRECTORY_BLOCKING} directory operations held its lane"
        );
        assert!(
            in_flight <= MAX_DIRECTORY_BLOCKING,
            "{in_flight} directory operations in flight"
        );
        for h in holders {
            h.await.unwrap().unwrap();
        }
        let root = read.await.unwrap().unwrap().unwrap();
        assert_eq!(root.0, 1);
        assert!(crate::blocking_peak() <= MAX_BLOCKING);
        assert!(crate::directory_blocking_peak() <= MAX_DIRECTORY_BLOCKING);
    }

    /// Red team (the directory's lane): 20 domains, each with a writer committing epoch
    /// after epoch (as `kst serve`'s 20 `DomainLog` threads do), while 32 readers flood every
    /// domain with whole reads (lookups, audits), and one domain's epoch 3 cannot have its
    /// files written after its answer for a while (a real `EISDIR`), so its readers take the
    /// domain's lock exclusively inside their permits to roll it forward. Every writer
    /// finishes every epoch, no read of any domain sees an epoch half-way, only the faulty
    /// domain's reads fail (temporarily, while the fault lasts), and at no moment do more
    /// than [`crate::MAX_BLOCKING`] + [`crate::MAX_DIRECTORY_BLOCKING`] file operations run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_reads_over_20_domains_starves_no_writer() {
        use crate::{MAX_BLOCKING, MAX_DIRECTORY_BLOCKING};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        use std::time::Duration;
        const DOMAINS: usize = 20;
        const LAST: u64 = 6;
        const FAULTY: usize = 0;
        let name = |i: usize| format!("d{i}.example");
        let tmp = tempfile::tempdir().unwrap();
        let store = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        let obstacle =
            values_dir(&tmp.path().join(KT_DIR).join(name(FAULTY)), b"label").join(epoch_name(3));
        std::fs::create_dir_all(&obstacle).unwrap();
        for i in 0..DOMAINS {
            store.commit(&name(i), first()).await.unwrap();
        }

        let done = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let sampler = tokio::task::spawn_blocking({
            let (done, most) = (done.clone(), most.clone());
            move || {
                while !done.load(Ordering::Relaxed) {
                    most.fetch_max(
                        crate::blocking_in_flight() + crate::directory_blocking_in_flight(),
                        Ordering::Relaxed,
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        let faulty_failures = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..32)
            .map(|r| {
                let (store, done, failures) =
                    (store.clone(), done.clone(), faulty_failures.clone());
                tokio::spawn(async move {
                    let mut last = [0u64; DOMAINS];
                    let mut i = r % DOMAINS;
                    let mut reads = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        match store.root_and_nodes(&name(i), &[node(99)]).await {
                            Ok((root, nodes)) => {
                                let (e, blob) = root.unwrap();
                                assert_eq!(blob, format!("r{e}").into_bytes());
                                assert_eq!(
                                    nodes,
                                    vec![format!("s{e}").into_bytes()],
                                    "domain {i}: epoch {e}'s root read with another epoch's node"
                                );
                                assert!(e >= last[i], "domain {i}: epoch {e} after {}", last[i]);
                                last[i] = e;
                                reads += 1;
                            }
                            Err(DirectoryStoreError::Unavailable(_)) if i == FAULTY => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("domain {i}: {e:?}"),
                        }
                        i = (i + 1) % DOMAINS;
                    }
                    reads
                })
            })
            .collect();
        let writers: Vec<_> = (0..DOMAINS)
            .map(|i| {
                let (store, obstacle) = (store.clone(), obstacle.clone());
                tokio::spawn(async move {
                    for e in 1..=LAST {
                        store.commit(&name(i), epoch(e)).await.unwrap();
                        if i == FAULTY && e == 3 {
                            // Readers try (and fail) to roll epoch 3 forward meanwhile.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            std::fs::remove_dir(&obstacle).unwrap();
                        }
                    }
                })
            })
            .collect();
        let finished = tokio::time::timeout(Duration::from_secs(60), async {
            for w in writers {
                w.await.unwrap();
            }
        })
        .await;
        done.store(true, Ordering::Relaxed);
        let mut reads = 0;
        for r in readers {
            reads += r.await.unwrap();
        }
        sampler.await.unwrap();
        finished.expect("a domain's writer did not finish its epochs within 60 s of reads");
        assert!(reads > 0);
        let most = most.load(Ordering::Relaxed);
        assert!(
            most <= MAX_BLOCKING + MAX_DIRECTORY_BLOCKING,
            "{most} file operations ran at once"
        );
        assert!(crate::blocking_peak() <= MAX_BLOCKING);
        assert!(crate::directory_blocking_peak() <= MAX_DIRECTORY_BLOCKING);
        for i in 0..DOMAINS {
            assert_eq!(
                store.root(&name(i)).await.unwrap(),
                Some((LAST, format!("r{LAST}").into_bytes())),
                "domain {i}"
            );
            let heads = store.heads(&name(i), 1, LAST).await.unwrap();
            let want: Vec<_> = (1..=LAST)
                .map(|e| (e, format!("h{e}").into_bytes()))
                .collect();
            assert_eq!(heads, want, "domain {i}'s heads");
        }
        eprintln!(
            "{reads} whole reads, {} failed reads of the faulty domain, at most {most} file operations at once",
            faulty_failures.load(Ordering::Relaxed)
        );
    }

    /// Red team (the directory's lane): 32 readers flooding one domain with shared locks
    /// (Linux's `flock` does not queue a writer's exclusive lock ahead of new shared ones)
    /// while its writer commits 30 epochs: every commit still gets its permit and the
    /// domain's lock, and every read is whole. A commit that does not finish in time is
    /// reported with the reads of the domain made meanwhile (reads going on: starved; none:
    /// the whole process or machine stalled) and what each commit before it took.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_reads_of_one_domain_starves_no_commit() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::Duration;
        const LAST: u64 = 30;
        const WITHIN: Duration = Duration::from_secs(60);
        let tmp = tempfile::tempdir().unwrap();
        let (a, _dir) = at_epoch_1(tmp.path()).await;
        let done = Arc::new(AtomicBool::new(false));
        let reading = Arc::new(AtomicU64::new(0));
        let readers = spawn_readers(&a, 32, &done, &reading);
        // (epoch, how long its commit took, the reads made meanwhile), and the pending one.
        let mut commits: Vec<(u64, Duration, u64)> = Vec::new();
        let mut pending = (2, std::time::Instant::now(), 0);
        let committed = tokio::time::timeout(WITHIN, async {
            for e in 2..=LAST {
                pending = (
                    e,
                    std::time::Instant::now(),
                    reading.load(Ordering::Relaxed),
                );
                a.commit(D, epoch(e)).await?;
                let meanwhile = reading.load(Ordering::Relaxed) - pending.2;
                commits.push((e, pending.1.elapsed(), meanwhile));
            }
            Ok::<_, DirectoryStoreError>(())
        })
        .await;
        let meanwhile = reading.load(Ordering::Relaxed) - pending.2;
        done.store(true, Ordering::Relaxed);
        let mut reads = 0;
        for r in readers {
            reads += r.await.unwrap_or_else(|e| panic!("a reader failed: {e}"));
        }
        if committed.is_err() {
            panic!(
                "epoch {}'s commit did not finish within {WITHIN:?}: {meanwhile} whole reads \
                 of the domain meanwhile ({}); the commits before it (epoch, time, reads \
                 meanwhile): {commits:?}",
                pending.0,
                if meanwhile > 0 {
                    "the reads went on: the commit starved behind them"
                } else {
                    "none: the whole process or machine stalled"
                }
            );
        }
        committed.unwrap().unwrap();
        assert!(reads > 0);
        holds(&a, LAST).await;
        let slowest = commits.iter().max_by_key(|c| c.1);
        eprintln!(
            "{reads} whole reads; the slowest commit (epoch, time, reads meanwhile): {slowest:?}"
        );
    }

    /// Red team (the directory's lane): a commit whose caller stops waiting (a timeout)
    /// while the commit waits for the domain's lock (another process of the pool holds it)
    /// waits without a permit, between tries, so the caller's timeout ends it: nothing is
    /// committed once the lock is free, and the caller's retry commits the epoch once, the
    /// next epoch built on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_whose_caller_gave_up_waiting_for_the_lock_commits_nothing() {
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        // Another process of the pool, mid-commit: its own open file, the lock exclusive.
        let other = DomainLock::acquire(&dir).unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(200), a.commit(D, epoch(2))).await;
        drop(other);
        assert!(
            gave_up.is_err(),
            "the commit ran while another held the lock"
        );
        // Time for an abandoned try to run, if one were left.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(read_root(&dir).unwrap(), Some((1, b"r1".to_vec())));
        a.commit(D, epoch(2)).await.unwrap();
        holds(&a, 2).await;
        a.commit(D, epoch(3)).await.unwrap();
        holds(&a, 3).await;
        assert_eq!(frames(&dir), vec![1, 2, 3]);
    }

    /// Per-domain maps: the turns of the domains nobody holds or waits for are dropped when
    /// another domain's turns are made, a quarter of [`crate::recent::IDLE`] after the last
    /// such sweep; a held one stays, and a domain whose turns went gets new ones that work.
    /// Before, a process kept the turns of every domain it ever touched.
    #[tokio::test]
    async fn turns_nobody_holds_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let under = |root: &Path| {
            all_turns()
                .of
                .keys()
                .filter(|d| d.starts_with(root))
                .count()
        };
        let held = turns(&tmp.path().join("held.example"));
        let reading = held.clone().read_owned().await;
        for i in 0..50 {
            drop(turns(&tmp.path().join(format!("d{i}.example"))));
        }
        let later = std::time::Instant::now() + crate::recent::IDLE;
        drop(turns_at(&tmp.path().join("new.example"), later));
        assert_eq!(under(tmp.path()), 2, "the held domain's and the new one's");
        drop(reading);
        drop(held);
        // A domain whose turns went: new ones, taken and given back as before.
        let again = turns(&tmp.path().join("d0.example"));
        drop(again.write().await);
    }

    /// Review M1: a caller that gives up once its try holds the domain's lock (here while the
    /// try replays the journal for a new boot, under the lock, before its frame) gets nothing
    /// committed: the try checks its caller once more just before the frame. Before, the
    /// caller was told nothing (cancelled) and the epoch was committed all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_after_its_try_took_the_lock_gets_nothing_committed() {
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        for e in 2..=60 {
            a.commit(D, epoch(e)).await.unwrap();
        }
        // Epoch 60's files written (its commit holds the lock until then).
        drop(DomainLock::acquire(&dir).unwrap());
        // The machine restarted: the next commit replays epochs 2..=60 under the lock.
        let b = FsDirectoryStore::with_boot(tmp.path(), Some("boot-2"));
        let task = {
            let b = b.clone();
            tokio::spawn(async move { b.commit(D, epoch(61)).await })
        };
        // Until the try holds the lock.
        while let Some(lock) = DomainLock::try_acquire(&dir).unwrap() {
            drop(lock);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        task.abort();
        let gave_up = task.await;
        // The try is done once the lock is free.
        drop(DomainLock::acquire(&dir).unwrap());
        assert!(
            gave_up.as_ref().is_err_and(|e| e.is_cancelled()),
            "the commit finished before its caller gave up: {gave_up:?}"
        );
        assert_eq!(
            read_root(&dir).unwrap().map(|(e, _)| e),
            Some(60),
            "the caller gave up (no answer), yet the try committed epoch 61"
        );
        assert!(!frames(&dir).contains(&61));
        b.commit(D, epoch(61)).await.unwrap();
        holds(&b, 61).await;
    }

    /// [`a_commit_whose_caller_gave_up_waiting_for_the_lock_commits_nothing`] where the
    /// caller gives up while its try is handed to the blocking pool but not yet run (every
    /// thread of the pool busy: here the one thread this runtime allows): once the lock is
    /// free and the try runs, it commits nothing, since its caller was told the commit did not
    /// happen. Before, it committed the epoch behind the caller's back (that test failed in 2
    /// of 3 runs of the whole lib under a build's load: its tries' threads came late).
    #[test]
    fn a_commit_tried_after_its_caller_gave_up_commits_nothing() {
        use std::time::Duration;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = rt.block_on(at_epoch_1(tmp.path()));
        // Another process of the pool holds the lock; this runtime's one blocking thread is
        // busy until released, so the commit's try waits for it, queued.
        let other = DomainLock::acquire(&dir).unwrap();
        let (release, busy) = std::sync::mpsc::channel::<()>();
        let (running, started) = std::sync::mpsc::channel::<()>();
        let hog = rt.spawn_blocking(move || {
            running.send(()).unwrap();
            let _ = busy.recv();
        });
        started.recv().unwrap();
        let gave_up = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(200), a.commit(D, epoch(2))).await
        });
        drop(other);
        release.send(()).unwrap();
        rt.block_on(hog).unwrap();
        // The pool runs its queue in order on its one thread: the try has run once this has.
        rt.block_on(async { tokio::task::spawn_blocking(|| ()).await })
            .unwrap();
        assert!(gave_up.is_err(), "the commit ran while its try was queued");
        assert_eq!(
            read_root(&dir).unwrap(),
            Some((1, b"r1".to_vec())),
            "a try run after its caller gave up committed the epoch"
        );
        assert_eq!(frames(&dir), vec![1]);
        rt.block_on(async {
            a.commit(D, epoch(2)).await.unwrap();
            holds(&a, 2).await;
        });
    }

    /// Red team (the directory's lane): one domain's lock held for long (another process of
    /// the pool stalled mid-commit: frozen, or its disk slow) while lookups of that domain
    /// keep coming. Those reads wait for the lock, but not on the lane's permits: the other
    /// domains' reads and commits go on meanwhile, and the waiting reads finish once the lock
    /// is free. (Reads that waited for the lock holding their permits took all
    /// [`crate::MAX_DIRECTORY_BLOCKING`] of them, and every domain's epoch stopped behind one
    /// domain's lock.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_waiting_for_one_domains_lock_stop_no_other_domain() {
        reads_behind_a_held_lock_stop_no_other_domain("other.example", false).await;
    }

    /// [`reads_waiting_for_one_domains_lock_stop_no_other_domain`] for a process's first
    /// reads of a domain (or reads after a failed epoch): another process of the pool stalled
    /// after its commit point (its frame durable, its files not written, its lock held), so
    /// this process's reads take it for a dead writer and want the lock exclusively to roll
    /// the epoch forward. They wait for it without permits too, and roll it forward once
    /// it is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_waiting_to_roll_one_domain_forward_stop_no_other_domain() {
        reads_behind_a_held_lock_stop_no_other_domain("other-roll.example", true).await;
    }

    /// Domain `D` at epoch 1 with its lock held by a stalled process (with `frame`: after
    /// writing epoch 2's frame, so this process's reads want to roll it forward): twice the
    /// lane's permits of reads of `D` wait, and meanwhile a commit and a read of `other` run;
    /// once the lock is free every read of `D` answers the epoch it then holds.
    async fn reads_behind_a_held_lock_stop_no_other_domain(other: &str, frame: bool) {
        use crate::MAX_DIRECTORY_BLOCKING;
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        a.commit(other, first()).await.unwrap();
        let stalled = DomainLock::acquire(&dir).unwrap();
        if frame {
            journal::write_frame(&dir, &epoch(2)).unwrap();
            forget_recovered(&dir, "boot-1");
        }
        let waiting: Vec<_> = (0..2 * MAX_DIRECTORY_BLOCKING)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.root_and_nodes(D, &[node(99)]).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let others = tokio::time::timeout(Duration::from_secs(5), async {
            a.commit(other, epoch(1)).await?;
            a.root(other).await
        })
        .await;
        let still_waiting = waiting.iter().all(|w| !w.is_finished());
        // Released before any assertion: a failing test must not leave reads waiting.
        drop(stalled);
        let (e, r, n) = if frame {
            (2, b"r2", b"s2")
        } else {
            (1, b"r1", b"s1")
        };
        for w in waiting {
            let (root, nodes) = w.await.unwrap().unwrap();
            assert_eq!(root, Some((e, r.to_vec())));
            assert_eq!(nodes, vec![n.to_vec()]);
        }
        assert!(
            still_waiting,
            "a read ran while another held the domain's lock"
        );
        let other_root = others
            .expect("another domain's commit waited behind reads of one domain's held lock")
            .unwrap();
        assert_eq!(other_root, Some((1, b"r1".to_vec())));
        holds(&a, e).await;
    }

    /// Red team (the directory's lane): another process of the pool stalled (frozen, its disk
    /// hung) while writing the files of [`crate::MAX_DIRECTORY_BLOCKING`] domains' epochs,
    /// their locks held: this process's commits of those domains wait for the locks, but
    /// not on the lane's permits, so a commit of another domain goes on meanwhile; and they
    /// commit once the locks are free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_waiting_for_stalled_locks_stop_no_other_domain() {
        use crate::MAX_DIRECTORY_BLOCKING;
        use std::time::Duration;
        let name = |i: usize| format!("stalled-{i}.example");
        let tmp = tempfile::tempdir().unwrap();
        let a = FsDirectoryStore::with_boot(tmp.path(), Some("boot-1"));
        for i in 0..=MAX_DIRECTORY_BLOCKING {
            a.commit(&name(i), first()).await.unwrap();
        }
        let stalled: Vec<_> = (0..MAX_DIRECTORY_BLOCKING)
            .map(|i| DomainLock::acquire(&tmp.path().join(KT_DIR).join(name(i))).unwrap())
            .collect();
        let waiting: Vec<_> = (0..MAX_DIRECTORY_BLOCKING)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move { a.commit(&name(i), epoch(1)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let free = name(MAX_DIRECTORY_BLOCKING);
        let other = tokio::time::timeout(Duration::from_secs(5), a.commit(&free, epoch(1))).await;
        let still_waiting = waiting.iter().all(|w| !w.is_finished());
        // Released before any assertion: a failing test must not leave commits waiting.
        drop(stalled);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert!(
            still_waiting,
            "a commit ran while another held the domain's lock"
        );
        other
            .expect("another domain's commit waited behind commits of stalled domains")
            .unwrap();
        for i in 0..=MAX_DIRECTORY_BLOCKING {
            assert_eq!(
                a.root(&name(i)).await.unwrap(),
                Some((1, b"r1".to_vec())),
                "domain {i}"
            );
        }
    }

    /// Red team (the directory's lane): another process of the pool floods the domain with
    /// reads (8 threads, each taking the lock shared on a file of its own, as that process's
    /// reads do, reading the root and a node, letting it go, again at once) while this
    /// process commits 20 epochs: the commits still get the lock, since a writer's intent
    /// ([`INTENT`]) bars new readers while it waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_processs_flood_of_reads_starves_no_commit() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::Duration;
        const LAST: u64 = 21;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        let done = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (dir, done, reads) = (dir.clone(), done.clone(), reads.clone());
                // That process's overlay of the epochs above the tree's files.
                let ov = Ov::default();
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        let Shared::Held(Some(shared)) = DomainLock::try_shared(&dir).unwrap()
                        else {
                            std::thread::sleep(Duration::from_micros(100));
                            continue;
                        };
                        let (e, _) = tree_root(&dir, Some(&ov)).unwrap().unwrap();
                        let nodes = tree_nodes(&dir, Some(&ov), &[node(99)]).unwrap();
                        assert_eq!(nodes, vec![format!("s{e}").into_bytes()]);
                        drop(shared);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        let committed = tokio::time::timeout(Duration::from_secs(30), async {
            for e in 2..=LAST {
                let started = std::time::Instant::now();
                a.commit(D, epoch(e)).await?;
                slowest = slowest.max(started.elapsed());
            }
            Ok::<_, DirectoryStoreError>(())
        })
        .await;
        done.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        committed
            .expect("the commits starved behind another process's shared locks")
            .unwrap();
        holds(&a, LAST).await;
        eprintln!(
            "{} reads of the other process; the slowest commit took {slowest:?}",
            reads.load(Ordering::Relaxed)
        );
    }

    /// Red team (the directory's lane): witnesses' cosignatures of a domain whose lock a
    /// stalled process of the pool holds wait for it without permits, so another domain's
    /// commit goes on meanwhile; and they are stored once the lock is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cosignatures_waiting_for_a_stalled_lock_stop_no_other_domain() {
        use crate::MAX_DIRECTORY_BLOCKING;
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let (a, dir) = at_epoch_1(tmp.path()).await;
        const OTHER: &str = "other-cosigned.example";
        a.commit(OTHER, first()).await.unwrap();
        let stalled = DomainLock::acquire(&dir).unwrap();
        let waiting: Vec<_> = (0..2 * MAX_DIRECTORY_BLOCKING)
            .map(|w| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.put_cosignature(D, 1, &[w as u8; 32], 10, &[w as u8; 64])
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let other = tokio::time::timeout(Duration::from_secs(5), a.commit(OTHER, epoch(1))).await;
        let still_waiting = waiting.iter().all(|w| !w.is_finished());
        // Released before any assertion: a failing test must not leave work waiting.
        drop(stalled);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert!(
            still_waiting,
            "a cosignature was put while another held the lock"
        );
        other
            .expect("another domain's commit waited behind cosignatures of a stalled domain")
            .unwrap();
        let mut stored = a.cosignatures(D, 1).await.unwrap();
        stored.sort();
        let want: Vec<_> = (0..2 * MAX_DIRECTORY_BLOCKING)
            .map(|w| ([w as u8; 32], vec![w as u8; 64]))
            .collect();
        assert_eq!(stored, want);
    }
}

/// What an fs epoch's commit costs, journaled and not (run by hand:
/// `cargo test --release -p kst-fs --features transparency --lib -- --ignored --nocapture
/// commit_costs`; docs/BENCHMARKS.md quotes it).
#[cfg(test)]
mod costs {
    use super::*;

    /// An epoch of `changes` changes: about 40 nodes of 250 bytes per change (akd's two
    /// leaves and their paths), one value state each.
    fn epoch(e: u64, changes: usize) -> RecordBatch {
        let nodes = (0..changes * 40)
            .map(|i| {
                let mut key = vec![2, 0, 0, 1, 0];
                key.extend_from_slice(&(i as u64 * 7919 % 100_003).to_be_bytes());
                (key, vec![e as u8; 250])
            })
            .collect();
        let value_states = (0..changes)
            .map(|i| kst_core::transparency::ValueStateBlob {
                label: format!("label-{e}-{i}").into_bytes(),
                epoch: e,
                blob: vec![1; 200],
            })
            .collect();
        RecordBatch {
            nodes,
            value_states,
            root: Some(RootWrite {
                expected_epoch: Some(e - 1),
                epoch: e,
                blob: vec![3; 100],
            }),
            head: Some(vec![4; 300]),
        }
    }

    fn ms(d: std::time::Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    }

    /// This thread's CPU time so far (user and system), from the scheduler's count.
    fn cpu_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// A directory of domain `d` in a new temporary directory under `base`, at its empty
    /// epoch 0 (committed without the journal), for the measurements below.
    fn costs_dir(base: &str, d: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir_in(base).unwrap();
        let dir = tmp.path().join(d);
        std::fs::create_dir_all(&dir).unwrap();
        let mut first = epoch(1, 1);
        first.root.as_mut().unwrap().expected_epoch = None;
        first.root.as_mut().unwrap().epoch = 0;
        commit_now(&dir, first, None).unwrap();
        (tmp, dir)
    }

    /// What an fs epoch's journaled files cost in CPU (this thread's, the kernel's work
    /// included) and time, over 320 epochs of 3 changes with the checkpoint moved every 64
    /// (without its `syncfs`) as a process does (run by hand:
    /// `cargo test -p kst-fs --features transparency --lib -- --ignored --nocapture
    /// epoch_file_costs`; KST_COSTS_DIR: where to write, /var/tmp by default).
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn epoch_file_costs() {
        const D: &str = "costs.example";
        const EPOCHS: u64 = 320;
        let base = std::env::var("KST_COSTS_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let (_tmp, dir) = costs_dir(&base, D);
        journal::start(&dir, 0).unwrap();
        let (mut frame_cpu, mut files_cpu, mut cp_cpu) = (0u64, 0u64, 0u64);
        let (mut frame_wall, mut files_wall) = (0f64, 0f64);
        for e in 1..=EPOCHS {
            // Three changes, about 30 nodes (a tree of some thousands), as at c=8.
            let mut batch = epoch(e, 3);
            batch.nodes.truncate(30);
            let (c, t) = (cpu_ns(), std::time::Instant::now());
            journal::write_frame(&dir, &batch).unwrap();
            frame_cpu += cpu_ns() - c;
            frame_wall += ms(t.elapsed());
            let (c, t) = (cpu_ns(), std::time::Instant::now());
            materialize(&dir, &batch).unwrap();
            files_cpu += cpu_ns() - c;
            files_wall += ms(t.elapsed());
            if e.is_multiple_of(journal::CHECKPOINT_EVERY) {
                let c = cpu_ns();
                journal::set_checkpoint(&dir, e).unwrap();
                cp_cpu += cpu_ns() - c;
            }
        }
        let per = |ns: u64| ns as f64 / EPOCHS as f64 / 1000.0;
        eprintln!(
            "per epoch (3 changes, 30 nodes), µs: frame CPU {:.0} (wall {:.0}), files CPU {:.0} \
             (wall {:.0}), checkpoint's frame removal CPU {:.1}",
            per(frame_cpu),
            frame_wall * 1000.0 / EPOCHS as f64,
            per(files_cpu),
            files_wall * 1000.0 / EPOCHS as f64,
            per(cp_cpu)
        );
    }

    /// An epoch of `changes` changes spread over a tree as akd's are: per change 12 nodes
    /// of 250 bytes of its own (two leaves and the lower parts of their paths, keys spread
    /// over the shards as a label's hash spreads them) and 8 upper nodes every epoch writes
    /// again (20 nodes for one change: `kst serve` at 8 connections wrote about 21 files per
    /// epoch before journal version 3, docs/BENCHMARKS.md); one value state each; a head.
    fn spread_epoch(e: u64, changes: usize) -> RecordBatch {
        let key = |id: u64| {
            let mut key = vec![2, 0, 0, 1, 0];
            key.extend_from_slice(&Sha256::digest(id.to_be_bytes()));
            key
        };
        let mut batch = epoch(e, changes);
        batch.nodes = (0..changes as u64)
            .flat_map(|c| {
                let own = (0..12).map(move |j| 1_000 + (e * 64 + c) * 12 + j);
                own.chain(c * 8..c * 8 + 8)
                    .map(move |id| (key(id), vec![e as u8; 250]))
            })
            .collect();
        batch
    }

    /// Review F5: how long a write-out of 64 epochs holds the domain's lock (every read of
    /// the domain waits meanwhile), against one epoch's frame: four write-outs at 1, 3 and
    /// 8 changes per epoch, each creating the files of its epochs' own nodes and value states
    /// and overwriting the upper nodes (run by hand, release build:
    /// `cargo test --release -p kst-fs --features transparency --lib -- --ignored
    /// --nocapture write_out_costs`; KST_COSTS_DIR: where to write, /var/tmp by default).
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn write_out_costs() {
        const D: &str = "costs.example";
        let base = std::env::var("KST_COSTS_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let every = journal::CHECKPOINT_EVERY;
        for changes in [1, 3, 8] {
            let (_tmp, dir) = costs_dir(&base, D);
            journal::start(&dir, 0).unwrap();
            let ov = Ov::default();
            locked(&ov).reset(0);
            let mut frames = Vec::new();
            for round in 0..4 {
                for e in round * every + 1..=(round + 1) * every {
                    let batch = spread_epoch(e, changes);
                    let t = std::time::Instant::now();
                    journal::write_frame(&dir, &batch).unwrap();
                    frames.push(ms(t.elapsed()));
                    write_root(&dir, &root_bytes(batch.root.as_ref().unwrap())).unwrap();
                    locked(&ov).apply(&batch);
                }
                let records = locked(&ov).records_above(round * every);
                let (c, t) = (cpu_ns(), std::time::Instant::now());
                write_out(&dir, &ov).unwrap();
                let (wall, cpu) = (ms(t.elapsed()), (cpu_ns() - c) as f64 / 1e6);
                eprintln!(
                    "{changes} changes per epoch, write-out {round} of 64 epochs ({} nodes, {} \
                     value states, {} heads): lock held {wall:.1} ms (CPU {cpu:.1} ms)",
                    records.nodes.len(),
                    records.values.len(),
                    records.heads.len()
                );
                sync_file_system(&dir).unwrap();
                journal::set_checkpoint(&dir, (round + 1) * every).unwrap();
                locked(&ov).prune((round + 1) * every);
            }
            eprintln!(
                "{changes} changes per epoch: a frame's write and fdatasync, median {:.2} ms",
                median(frames)
            );
        }
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn commit_costs() {
        const D: &str = "costs.example";
        for changes in [3, 8] {
            let (_tmp, dir) = costs_dir("/var/tmp", D);
            let (mut legacy, mut frame, mut files) = (Vec::new(), Vec::new(), Vec::new());
            for e in 1..=60u64 {
                let batch = epoch(e, changes);
                if e % 2 == 1 {
                    let t = std::time::Instant::now();
                    commit_now(&dir, batch, None).unwrap();
                    legacy.push(ms(t.elapsed()));
                } else {
                    let t = std::time::Instant::now();
                    journal::start(&dir, e - 1).unwrap();
                    journal::write_frame(&dir, &batch).unwrap();
                    frame.push(ms(t.elapsed()));
                    let t = std::time::Instant::now();
                    materialize(&dir, &batch).unwrap();
                    files.push(ms(t.elapsed()));
                }
            }
            eprintln!(
                "{changes} changes ({} nodes) per epoch, median ms: syncfs commit {:.2}; \
                 journaled: frame {:.2} + files {:.2}",
                changes * 40,
                median(legacy),
                median(frame),
                median(files)
            );
        }
    }
}
