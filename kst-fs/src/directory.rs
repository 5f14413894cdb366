//! The key directory's records on the filesystem (feature `transparency`): kst-fs's
//! [`DirectoryStore`], under `<store>/kt/<domain>/`.
//!
//! ```text
//! kt/<domain>/root                      epoch (8 bytes, big-endian) ‖ the root record
//! kt/<domain>/nodes/<xx>/<node key hex> one tree node (xx: the label's first byte)
//! kt/<domain>/values/<sha256(label)>/<epoch, 20 digits>   one value state
//! kt/<domain>/lock                      flock(2) of the writer committing a batch
//! kt/<domain>/heads/<epoch, 20 digits>  the signed head of an epoch (created once, by link)
//! kt/<domain>/cosignatures/<epoch, 20 digits>/<witness hex>   a witness's cosignature
//! kt/<domain>/cosignatures/<epoch, 20 digits>/<witness hex>.at    when it was checked
//! kt/<domain>/witnesses/<witness hex>   epoch (8 bytes) ‖ the witness's newest cosignature
//! ```
//!
//! A head is written to a temporary file, synced, and hard-linked to its name: the link fails
//! when a head is there already, so the first writer's head stays (insert-if-absent without a
//! lock). A cosignature is written (durable replace) under the domain's lock unless the one
//! stored for that epoch and witness was checked later (its `.at` file), then the witness's
//! newest one if its epoch is not older than the stored one.
//!
//! A commit takes the domain's lock, checks the fence against `root`, then writes the nodes
//! and value states (each file written to a temporary name and renamed into place), makes
//! them all durable at once, and writes the root last (durable replace). On Linux "at once" is
//! one `syncfs(2)` of the store's file system: an epoch writes about two tree-depths of node
//! files per change, and one flush instead of an `fsync` per file and directory is what makes
//! a batched epoch cheap. The new root (and the epoch's head, when the batch carries it) is
//! written to a temporary file before that flush and renamed (linked) into place after it,
//! the root first; then the two directories are synced: the flush covers their contents. Elsewhere each file and directory is synced. Each read takes the lock
//! shared, so it never sees a commit half-way; the root is the commit point (see
//! `kst_core::transparency::storage` for why a crash half-way is harmless).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fs4::fs_std::FileExt;
use kst_core::durable::{sync_dir, write_atomic};
use kst_core::transparency::{
    DirectoryStore, DirectoryStoreError, RecordBatch, RootWrite, check_domain,
};
use sha2::{Digest, Sha256};

/// Directory of the key directories, under the store's root.
pub(crate) const KT_DIR: &str = "kt";
/// Largest file read back (a record is at most a few hundred bytes).
const MAX_FILE: u64 = 64 * 1024;

/// The key directories of an fs store.
#[derive(Debug, Clone)]
pub struct FsDirectoryStore {
    root: PathBuf,
}

impl FsDirectoryStore {
    /// The directories kept in the fs store at `store_root` (the `[store] path`); nothing is
    /// created until the first write.
    pub fn new(store_root: impl AsRef<Path>) -> Self {
        FsDirectoryStore {
            root: store_root.as_ref().join(KT_DIR),
        }
    }

    fn domain_dir(&self, domain: &str) -> Result<PathBuf, DirectoryStoreError> {
        check_domain(domain)?;
        Ok(self.root.join(domain))
    }
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

fn unavailable(op: &str, path: &Path, e: impl std::fmt::Display) -> DirectoryStoreError {
    DirectoryStoreError::Unavailable(format!("{op} {}: {e}", path.display()))
}

/// Reads `path`; `None` when it does not exist.
fn read(path: &Path) -> Result<Option<Vec<u8>>, DirectoryStoreError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE => {
            return Err(DirectoryStoreError::Corrupt(format!(
                "{} is larger than {MAX_FILE} bytes",
                path.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable("stat", path, e)),
    }
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable("read", path, e)),
    }
}

fn read_root(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    read_epoch_blob(&dir.join("root"))
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
}

impl DomainLock {
    /// The shared lock readers take: no read sees a commit half-way (a tree node written for
    /// the next epoch next to one not yet written).
    fn shared(dir: &Path) -> Result<Option<DomainLock>, DirectoryStoreError> {
        let path = dir.join("lock");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable("open", &path, e)),
        };
        loop {
            match FileExt::lock_shared(&file) {
                Ok(()) => return Ok(Some(DomainLock { _file: file })),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(unavailable("lock", &path, e)),
            }
        }
    }

    fn acquire(dir: &Path) -> Result<DomainLock, DirectoryStoreError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable("create", dir, e))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| unavailable("open", &path, e))?;
        loop {
            match FileExt::lock_exclusive(&file) {
                Ok(()) => return Ok(DomainLock { _file: file }),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(unavailable("lock", &path, e)),
            }
        }
    }
}

fn commit(dir: &Path, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
    let _lock = DomainLock::acquire(dir)?;
    let stored = read_root(dir)?.map(|(e, _)| e);
    if !batch.passes_fence(stored)? {
        return Ok(());
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
            let path = dir.join("root");
            write_atomic(&path, &root_bytes(root)).map_err(|e| unavailable("write", &path, e))?;
            if let Some(head) = &batch.head {
                insert_head(dir, root.epoch, head)?;
            }
        }
        return Ok(());
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
            let path = dir.join("root");
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
    Ok(())
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
    let d = std::fs::File::open(dir).map_err(|e| unavailable("open", dir, e))?;
    rustix::fs::syncfs(&d).map_err(|e| unavailable("syncfs", dir, e))
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
) -> Result<(), DirectoryStoreError> {
    let _lock = DomainLock::acquire(dir)?;
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DirectoryStoreError> + Send + 'static,
) -> Result<T, DirectoryStoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(DirectoryStoreError::Unavailable(format!(
            "file operation cancelled: {e}"
        ))),
    }
}

#[async_trait]
impl DirectoryStore for FsDirectoryStore {
    fn name(&self) -> &'static str {
        "fs"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        let dir = self.domain_dir(domain)?;
        blocking(move || {
            let _shared = DomainLock::shared(&dir)?;
            read_root(&dir)
        })
        .await
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        let dir = self.domain_dir(domain)?;
        let keys = keys.to_vec();
        blocking(move || {
            let _shared = DomainLock::shared(&dir)?;
            let mut out = Vec::with_capacity(keys.len());
            for key in &keys {
                if let Some(blob) = read(&node_path(&dir, key))? {
                    out.push(blob);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let domain_dir = self.domain_dir(domain)?;
        let dir = values_dir(&domain_dir, label);
        blocking(move || {
            let _shared = DomainLock::shared(&domain_dir)?;
            list_files(&dir, |name| name.parse::<u64>().ok())
        })
        .await
    }

    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        let dir = self.domain_dir(domain)?;
        blocking(move || commit(&dir, batch)).await
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        let dir = self.domain_dir(domain)?;
        let head = head.to_vec();
        blocking(move || insert_head(&dir, epoch, &head)).await
    }

    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        let dir = heads_dir(&self.domain_dir(domain)?);
        blocking(move || {
            let mut out = Vec::new();
            for epoch in from..=to {
                if let Some(blob) = read(&dir.join(epoch_name(epoch)))? {
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
        let dir = self.domain_dir(domain)?;
        let (witness, cosignature) = (*witness, cosignature.to_vec());
        blocking(move || put_cosignature(&dir, epoch, &witness, checked_at, &cosignature)).await
    }

    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        let dir = self
            .domain_dir(domain)?
            .join("cosignatures")
            .join(epoch_name(epoch));
        blocking(move || {
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
        let path = self
            .domain_dir(domain)?
            .join("witnesses")
            .join(hex::encode(witness));
        blocking(move || read_epoch_blob(&path)).await
    }
}
