//! [`FsStore`]: the [`KeyStore`] on a directory, one history file per address.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use kst_core::key_index::scan;
use kst_core::store::validate_history;
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, Error, Fingerprint, KeyId, KeyRecord, KeyStore, NewKey, PublishOutcome, Result,
};

use crate::error::{COMPONENT, corrupt, io, unavailable};
use crate::file::{
    add_deleted, create_dir, read_address, read_deleted, read_history, read_tombstone,
    remove_history, write_history, write_tombstone,
};
use crate::index;
use crate::layout::{Layout, history_file_hash, is_shard};
use crate::lock::ShardLock;

/// A [`KeyStore`] on a local directory (see the crate documentation for the layout).
///
/// Several instances, in one process or in several, may use one directory at once: writers of
/// an address take the exclusive lock of its shard, readers need no lock. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FsStore {
    layout: Arc<Layout>,
    /// Whether the look-up index covers every history file (see [`crate::index`]); until it
    /// does (a store written before the index, not yet migrated), look-ups read every address.
    indexed: Arc<AtomicBool>,
}

impl FsStore {
    /// Opens the store in `path`, creating the directory (mode 0700) and its `keys` and `locks`
    /// subdirectories if they are missing.
    ///
    /// Fails with [`Error::Config`] when `path` exists but is not a directory, and with a
    /// temporary [`Error::Unavailable`] when it cannot be created or read.
    pub async fn open(path: impl AsRef<Path>) -> Result<FsStore> {
        let root = path.as_ref().to_path_buf();
        blocking(move || {
            if root.exists() && !root.is_dir() {
                return Err(Error::Config(format!(
                    "{COMPONENT}: {} is not a directory",
                    root.display()
                )));
            }
            let layout = Layout::new(root);
            // Each directory created is synced into its parent.
            for dir in [
                layout.root().to_path_buf(),
                layout.keys_dir(),
                layout.locks_dir(),
            ] {
                create_dir(&dir)?;
            }
            let indexed = index::init(&layout)?;
            if !indexed {
                tracing::warn!(
                    root = %layout.root().display(),
                    "the fs store has no look-up index yet: look-ups by fingerprint, key ID \
                     and WKD hash read every address until `kst migrate` builds it"
                );
            }
            Ok(FsStore {
                layout: Arc::new(layout),
                indexed: Arc::new(AtomicBool::new(indexed)),
            })
        })
        .await
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// The file that holds (or would hold) the history of `address`:
    /// `<root>/keys/<aa>/<sha256 of the address, hex>.json`.
    pub fn history_path(&self, address: &Address) -> PathBuf {
        self.layout.address(address).history
    }

    /// Whether look-ups can use the index (rechecked while it is not: `kst migrate` may have
    /// built it in another process meanwhile).
    fn use_index(&self) -> bool {
        if self.indexed.load(Ordering::Relaxed) {
            return true;
        }
        let ready = index::is_ready(&self.layout);
        if ready {
            self.indexed.store(true, Ordering::Relaxed);
        }
        ready
    }

    /// Runs the read-only `op` here if every file it reads is in the kernel's caches (see
    /// [`crate::nowait`]): no hand-off to the blocking pool for a look-up that cannot wait for
    /// the disk. `None` when it would have waited: then run it with [`Self::run`].
    fn cached<T>(&self, op: impl FnOnce(&Layout) -> Result<T>) -> Option<Result<T>> {
        crate::nowait::attempt(|| op(&self.layout))
    }

    /// Runs `op` on the blocking thread pool with this store's layout.
    async fn run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Layout) -> Result<T> + Send + 'static,
    {
        let layout = self.layout.clone();
        blocking(move || op(&layout)).await
    }
}

pub(crate) use crate::pool::blocking;

fn publish(layout: &Layout, key: NewKey) -> Result<PublishOutcome> {
    // The tombstone lock first (it serializes publishers of one fingerprint, whatever the
    // address), then the address' shard lock; nothing takes them in the other order.
    let tomb = layout.tombstone(&key.fingerprint);
    let _tomb_lock = ShardLock::acquire(&tomb.lock)?;
    let (key, tombstone) =
        kst_core::revocation::apply_tombstone(key, read_tombstone(&tomb)?.as_deref())?;
    if let Some(bytes) = tombstone {
        // Written before the key: a tombstone only ever grows, so a crash in between leaves
        // it ahead of the history, never behind.
        write_tombstone(&tomb, &bytes)?;
    }
    let paths = layout.address(&key.address);
    let _lock = ShardLock::acquire(&paths.lock)?;
    let mut history = read_history(&key.address, &paths)?;
    if let Some(earlier) = history
        .iter()
        .find(|r| r.publication_id == key.publication_id)
    {
        return Ok(PublishOutcome::Unchanged(earlier.clone()));
    }
    if read_deleted(&key.address, &paths)?.contains(&key.publication_id) {
        return Err(Error::deleted_since(&key));
    }
    if let Some(current) = history.last().filter(|c| c.key == key.key) {
        return Ok(PublishOutcome::Unchanged(current.clone()));
    }
    let current = history.last().map(|c| c.version);
    if !key.expected.admits(current) {
        return Err(key.expected.conflict(&key.address, current));
    }
    let version = match history.last() {
        None => 1,
        Some(c) => c
            .version
            .checked_add(1)
            .ok_or_else(|| corrupt(&paths.history, "version counter overflow"))?,
    };
    let record = key.into_record(version);
    index::add(layout, &record)?;
    let replaced = history.last().cloned();
    history.push(record.clone());
    write_history(&paths, &history)?;
    index::remove_replaced(layout, replaced.as_ref(), Some(&record));
    tracing::debug!(address = %record.address, version, "published");
    Ok(PublishOutcome::Published(record))
}

fn delete(layout: &Layout, address: &Address) -> Result<bool> {
    let paths = layout.address(address);
    let _lock = ShardLock::acquire(&paths.lock)?;
    // A corrupt file is removed all the same; its entries, if any, are skipped as stale (and
    // its publication ids cannot be remembered).
    let history = read_history(address, &paths).unwrap_or_default();
    // The ids first: a crash in between leaves them remembered and the history still there,
    // where publish finds a redelivery in the history before it looks at them.
    if !history.is_empty() {
        add_deleted(
            address,
            &paths,
            history.iter().map(|r| r.publication_id.clone()),
        )?;
    }
    let current = history.last();
    let removed = remove_history(&paths)?;
    index::remove_replaced(layout, current, None);
    Ok(removed)
}

fn restore(layout: &Layout, history: &[KeyRecord]) -> Result<()> {
    validate_history(history)?;
    let address = &history[0].address;
    // The file name derives from the address: refuse one that bypassed normalization (e.g.
    // deserialized from an import file).
    Address::from_normalized(address.as_str())
        .map_err(|e| Error::Invalid(format!("restore of {address:?}: {e}")))?;
    let paths = layout.address(address);
    let _lock = ShardLock::acquire(&paths.lock)?;
    let replaced = read_history(address, &paths).ok().and_then(|mut h| h.pop());
    let current = &history[history.len() - 1];
    index::add(layout, current)?;
    write_history(&paths, history)?;
    index::remove_replaced(layout, replaced.as_ref(), Some(current));
    Ok(())
}

/// Reads every history file: O(number of addresses), and each file is read whole.
fn list(layout: &Layout, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let keys = layout.keys_dir();
    let mut found = Vec::new();
    for (shard, shard_dir) in read_dir_sorted(&keys)? {
        if !is_shard(&shard) || !shard_dir.is_dir() {
            continue;
        }
        for (name, path) in read_dir_sorted(&shard_dir)? {
            let Some(hash) = history_file_hash(&name) else {
                continue;
            };
            if let Some(address) = read_address(&path, hash)?
                && after.is_none_or(|a| &address > a)
            {
                found.push(address);
            }
        }
    }
    found.sort_unstable();
    found.truncate(limit);
    Ok(found)
}

/// The entries of `dir` as (file name, path), sorted; names that are not UTF-8 are skipped (no
/// file of the store has one).
fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = fs::read_dir(dir).map_err(|e| io("read directory", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("read directory", dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Unique names for probe files of this process.
static PROBE: AtomicU64 = AtomicU64::new(0);

fn check(layout: &Layout) -> Result<()> {
    for dir in [
        layout.root().to_path_buf(),
        layout.keys_dir(),
        layout.locks_dir(),
    ] {
        let meta = fs::metadata(&dir).map_err(|e| io("stat", &dir, e))?;
        if !meta.is_dir() {
            return Err(unavailable(format!("{} is not a directory", dir.display())));
        }
    }
    // Writes go to the shard directories (like this probe, in keys/) and the lock files.
    for dir in [layout.keys_dir(), layout.locks_dir()] {
        let probe = dir.join(format!(
            ".probe-{}-{}",
            std::process::id(),
            PROBE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&probe, b"kst\n").map_err(|e| io("write probe file", &probe, e))?;
        fs::remove_file(&probe).map_err(|e| io("remove probe file", &probe, e))?;
    }
    Ok(())
}

#[async_trait]
impl KeyStore for FsStore {
    fn name(&self) -> &'static str {
        "fs"
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.run(move |l| publish(l, key)).await
    }

    async fn claim_reminder(&self, claim: &kst_core::reminder::ReminderClaim) -> Result<bool> {
        let claim = claim.clone();
        self.run(move |l| crate::reminders::claim(l, &claim)).await
    }

    /// On this thread when the files are cached ([`crate::nowait`]), else on the blocking pool.
    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        if let Some(found) = self.cached(|l| Ok(read_history(address, &l.address(address))?.pop()))
        {
            return found;
        }
        let address = address.clone();
        self.run(move |l| Ok(read_history(&address, &l.address(&address))?.pop()))
            .await
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        let address = address.clone();
        self.run(move |l| read_history(&address, &l.address(&address)))
            .await
    }

    async fn delete(&self, address: &Address) -> Result<bool> {
        let address = address.clone();
        self.run(move |l| delete(l, &address)).await
    }

    /// Reads every history file: O(n) in the number of addresses (meant for export and audits;
    /// runs over the whole store walk with `list_page`).
    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        let after = after.cloned();
        self.run(move |l| list(l, after.as_ref(), limit)).await
    }

    /// By file name ([`crate::walk`]): a whole walk opens each history file once and reads
    /// its head only.
    async fn list_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::WalkPage> {
        let cursor = cursor.cloned();
        let (addresses, next) = self
            .run(move |l| crate::walk::page(l, cursor.as_ref(), limit))
            .await?;
        Ok(kst_core::WalkPage { addresses, next })
    }

    /// By file name, like `list_page` ([`crate::walk::deleted_page`]): each file of deleted
    /// publication ids (`<hash>.deleted`) read once.
    async fn deleted_page(
        &self,
        cursor: Option<&kst_core::WalkCursor>,
        limit: usize,
    ) -> Result<kst_core::DeletedPage> {
        let cursor = cursor.cloned();
        let (entries, next) = self
            .run(move |l| crate::walk::deleted_page(l, cursor.as_ref(), limit))
            .await?;
        Ok(kst_core::DeletedPage { entries, next })
    }

    /// Under the address' shard lock, like a deletion's.
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        kst_core::store::check_publication_ids(address, publication_ids)?;
        // The file name derives from the address: refuse one that bypassed normalization
        // (an import file).
        Address::from_normalized(address.as_str())
            .map_err(|e| Error::Invalid(format!("remember_deleted of {address:?}: {e}")))?;
        let (address, ids) = (address.clone(), publication_ids.to_vec());
        self.run(move |l| {
            let paths = l.address(&address);
            let _lock = ShardLock::acquire(&paths.lock)?;
            add_deleted(&address, &paths, ids)
        })
        .await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        let history = history.to_vec();
        self.run(move |l| restore(l, &history)).await
    }

    /// Through the index: one index file and the history file of each hit (on this thread
    /// when they are cached, see [`crate::nowait`]).
    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        if !self.use_index() {
            return scan(self, limit, |e| e.has_fingerprint(fingerprint)).await;
        }
        if let Some(found) = self
            .cached(|l| index::find_by_key_id(l, &fingerprint.key_id(), Some(fingerprint), limit))
        {
            return found;
        }
        let f = fingerprint.clone();
        self.run(move |l| index::find_by_key_id(l, &f.key_id(), Some(&f), limit))
            .await
    }

    /// Through the index: one index file and the history file of each hit.
    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        if !self.use_index() {
            return scan(self, limit, |e| e.has_key_id(key_id)).await;
        }
        if let Some(found) = self.cached(|l| index::find_by_key_id(l, key_id, None, limit)) {
            return found;
        }
        let id = key_id.clone();
        self.run(move |l| index::find_by_key_id(l, &id, None, limit))
            .await
    }

    /// Through the index: one index file and the history file of the hit.
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        if !self.use_index() {
            return Ok(scan(self, 1, |e| e.has_wkd_hash(domain, hash)).await?.pop());
        }
        if let Some(found) = self.cached(|l| index::find_by_wkd_hash(l, domain, hash)) {
            return found;
        }
        let (domain, hash) = (domain.to_string(), hash.clone());
        self.run(move |l| index::find_by_wkd_hash(l, &domain, &hash))
            .await
    }

    /// Indexes every history file and drops stale index lines (see [`crate::index`]); safe
    /// while the store serves. Returns the number of current keys.
    async fn rebuild_index(&self) -> Result<u64> {
        let n = self.run(index::rebuild).await?;
        self.indexed.store(true, Ordering::Relaxed);
        Ok(n)
    }

    async fn check(&self) -> Result<()> {
        self.run(check).await
    }
}
