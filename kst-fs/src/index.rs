//! The look-up index: which addresses hold a current key with a given key ID, fingerprint or
//! WKD hash, so that [`find_by_fingerprint`](kst_core::KeyStore::find_by_fingerprint) and its
//! siblings open one small file instead of reading every history.
//!
//! ```text
//! <root>/index/ids/<kk>/<KEYID>   one line per (fingerprint, address) of the current keys
//!                                 with this 64-bit key ID: "<FINGERPRINT> <address hash>\n"
//! <root>/index/wkd/<hh>/<H>       one line per address: "<address hash>\n"; H is the hex
//!                                 SHA-256 of "<domain>/<WKD hash>"
//! <root>/index/ready              written once every history file is indexed
//! <root>/locks/ids-<kk>.lock      lock of the writers of index/ids/<kk>
//! <root>/locks/wkd-<hh>.lock      lock of the writers of index/wkd/<hh>
//! ```
//!
//! `<kk>` is the key ID's first two hex digits (lowercase), `<hh>` the first two of `H`, and
//! the address hash is the name of the address' history file. A fingerprint is looked up
//! through the file of its key ID. No path component comes from request input: key IDs and
//! fingerprints are validated hex, the domain and WKD hash are hashed.
//!
//! Writes: the writer of an address holds its shard lock ([`crate::lock::ShardLock`]) and
//! takes one index lock at a time after it, so index locks never wait for anything else.
//! Before the history file is replaced, the new current key's lines are added (each index file
//! replaced durably with [`kst_core::durable`]); after it, the lines of the key it replaced
//! that the new one does not have are removed. The index therefore always holds at least the
//! entries of every current key; a line left behind by a crash names an address whose current
//! key does not match, and every hit is checked against the record it names (the entries of
//! [`IndexEntries::of`]), so a stale line is never served. `rebuild_index` removes such lines.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use kst_core::durable;
use kst_core::key_index::IndexEntries;
use kst_core::wkd::WkdHash;
use kst_core::{Fingerprint, KeyId, KeyRecord, Result};
use sha2::{Digest, Sha256};

use crate::error::{durable_error, io};
use crate::file::read_current_at;
use crate::layout::{Layout, address_hash, history_file_hash, is_hash, is_shard};
use crate::lock::ShardLock;

/// Subdirectory of the index.
pub(crate) const INDEX_DIR: &str = "index";
/// Name of the file that says every history file is indexed.
const READY: &str = "ready";
/// Worker threads of [`rebuild`] (the work is file I/O, mostly waiting for the disk).
const REBUILD_THREADS: usize = 8;

/// One index file and the lock of its writers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct IndexFile {
    path: PathBuf,
    lock: PathBuf,
}

fn ids_file(layout: &Layout, key_id: &KeyId) -> IndexFile {
    let id = key_id.as_str();
    let shard = id[..2].to_ascii_lowercase();
    IndexFile {
        path: layout
            .root()
            .join(INDEX_DIR)
            .join("ids")
            .join(&shard)
            .join(id),
        lock: layout.locks_dir().join(format!("ids-{shard}.lock")),
    }
}

fn wkd_file(layout: &Layout, domain: &str, hash: &WkdHash) -> IndexFile {
    let name = hex::encode(Sha256::digest(format!("{domain}/{hash}").as_bytes()));
    let shard = &name[..2];
    IndexFile {
        path: layout
            .root()
            .join(INDEX_DIR)
            .join("wkd")
            .join(shard)
            .join(&name),
        lock: layout.locks_dir().join(format!("wkd-{shard}.lock")),
    }
}

/// The index lines one current key has, per index file.
fn lines_of(layout: &Layout, record: &KeyRecord) -> BTreeMap<IndexFile, BTreeSet<String>> {
    let hash = address_hash(&record.address);
    let entries = IndexEntries::of(record);
    let mut out: BTreeMap<IndexFile, BTreeSet<String>> = BTreeMap::new();
    for f in &entries.fingerprints {
        out.entry(ids_file(layout, &f.key_id()))
            .or_default()
            .insert(format!("{} {hash}", f.as_str()));
    }
    out.entry(wkd_file(layout, &entries.domain, &entries.wkd_hash))
        .or_default()
        .insert(hash);
    out
}

/// The lines of an index file; empty when it does not exist.
fn read_lines(path: &Path) -> Result<Vec<String>> {
    let Some(bytes) = crate::file::read_if_exists(path)? else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        io(
            "read index file",
            path,
            std::io::Error::new(ErrorKind::InvalidData, e),
        )
    })?;
    Ok(text.lines().map(str::to_string).collect())
}

/// Changes the lines of `file` under its lock: adds `add`, removes the lines of `address`
/// (an address hash) that `keep` does not hold when `prune` is set. Writes only on a change;
/// removes the file when it ends up empty.
fn update(
    file: &IndexFile,
    add: &BTreeSet<String>,
    prune: Option<(&str, &BTreeSet<String>)>,
) -> Result<()> {
    let _lock = ShardLock::acquire(&file.lock)?;
    let old: BTreeSet<String> = read_lines(&file.path)?.into_iter().collect();
    let mut new = old.clone();
    new.extend(add.iter().cloned());
    if let Some((address, keep)) = prune {
        new.retain(|line| line_address(line) != Some(address) || keep.contains(line));
    }
    if new == old {
        return Ok(());
    }
    let dir = file.path.parent().unwrap_or(&file.path);
    if new.is_empty() {
        return match fs::remove_file(&file.path) {
            Ok(()) => durable::sync_dir(dir).map_err(durable_error),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove index file", &file.path, e)),
        };
    }
    let mut text = String::with_capacity(new.iter().map(|l| l.len() + 1).sum());
    for line in &new {
        text.push_str(line);
        text.push('\n');
    }
    durable::create_dir(dir).map_err(durable_error)?;
    durable::write_atomic(&file.path, text.as_bytes()).map_err(durable_error)
}

/// The address hash a line names (its last word), if the line is well formed.
fn line_address(line: &str) -> Option<&str> {
    let last = line.rsplit(' ').next()?;
    is_hash(last).then_some(last)
}

/// Adds the entries of `record`, the key about to become current. The caller holds the shard
/// lock of its address and writes the history file after this returns `Ok`.
pub(crate) fn add(layout: &Layout, record: &KeyRecord) -> Result<()> {
    for (file, lines) in lines_of(layout, record) {
        update(&file, &lines, None)?;
    }
    Ok(())
}

/// Removes the entries of `old` (the key that was current) that `new` (the key now current,
/// `None` after a delete) does not have. The caller holds the shard lock of the address and
/// has written the history file. A failure leaves stale lines, which look-ups skip; it is
/// logged, not returned, because the write it follows has succeeded.
pub(crate) fn remove_replaced(layout: &Layout, old: Option<&KeyRecord>, new: Option<&KeyRecord>) {
    let Some(old) = old else {
        return;
    };
    let hash = address_hash(&old.address);
    let keep = new.map(|n| lines_of(layout, n)).unwrap_or_default();
    let none = BTreeSet::new();
    for (file, _) in lines_of(layout, old) {
        let keep_here = keep.get(&file).unwrap_or(&none);
        if let Err(e) = update(&file, &none, Some((&hash, keep_here))) {
            tracing::warn!(
                address = %old.address,
                error = %e,
                "could not remove a replaced key from the look-up index; look-ups skip the \
                 stale entry, and `kst migrate` removes it"
            );
        }
    }
}

/// The current key of the address whose history file is named `hash`, if any.
fn current_of(layout: &Layout, hash: &str) -> Result<Option<KeyRecord>> {
    read_current_at(&layout.history_by_hash(hash), hash)
}

/// Current keys with a (sub)key of this key ID, and of this fingerprint when given; at most
/// `limit`, each checked against its record.
pub(crate) fn find_by_key_id(
    layout: &Layout,
    key_id: &KeyId,
    fingerprint: Option<&Fingerprint>,
    limit: usize,
) -> Result<Vec<KeyRecord>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let file = ids_file(layout, key_id);
    let mut seen = BTreeSet::new();
    for line in read_lines(&file.path)? {
        let Some((fpr, hash)) = line.split_once(' ') else {
            continue;
        };
        if fingerprint.is_some_and(|f| f.as_str() != fpr) || !is_hash(hash) {
            continue;
        }
        if !seen.insert(hash.to_string()) {
            continue;
        }
        let Some(record) = current_of(layout, hash)? else {
            continue;
        };
        let hit = match fingerprint {
            Some(f) => record.fingerprint == *f || IndexEntries::of(&record).has_fingerprint(f),
            None => {
                record.fingerprint.key_id() == *key_id
                    || IndexEntries::of(&record).has_key_id(key_id)
            }
        };
        if hit {
            out.push(record);
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}

/// The current key of the address in `domain` whose local part hashes to `hash`, checked
/// against its record.
pub(crate) fn find_by_wkd_hash(
    layout: &Layout,
    domain: &str,
    hash: &WkdHash,
) -> Result<Option<KeyRecord>> {
    let file = wkd_file(layout, domain, hash);
    for line in read_lines(&file.path)? {
        if !is_hash(&line) {
            continue;
        }
        if let Some(record) = current_of(layout, &line)?
            && record.address.domain() == domain
            && WkdHash::of_address(&record.address) == *hash
        {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

/// Whether every history file is known to be indexed: the store was empty when the index
/// began, or [`rebuild`] ran to its end.
pub(crate) fn is_ready(layout: &Layout) -> bool {
    layout.root().join(INDEX_DIR).join(READY).is_file()
}

/// Marks the index complete when the store has no history file yet (a new store). Called by
/// `open`; a store with histories but no `ready` file needs [`rebuild`] (`kst migrate`).
pub(crate) fn init(layout: &Layout) -> Result<bool> {
    if is_ready(layout) {
        return Ok(true);
    }
    if has_history_files(layout)? {
        return Ok(false);
    }
    // A read-only store may still be opened and read: it is then served by scanning (it has
    // no key to scan).
    Ok(mark_ready(layout).is_ok())
}

fn mark_ready(layout: &Layout) -> Result<()> {
    let dir = layout.root().join(INDEX_DIR);
    durable::create_dir(&dir).map_err(durable_error)?;
    durable::write_atomic(&dir.join(READY), b"kst-fs index 1\n").map_err(durable_error)
}

fn has_history_files(layout: &Layout) -> Result<bool> {
    for shard in shard_dirs(&layout.keys_dir())? {
        for entry in fs::read_dir(&shard).map_err(|e| io("read directory", &shard, e))? {
            let entry = entry.map_err(|e| io("read directory", &shard, e))?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| history_file_hash(n).is_some())
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The two-hex-digit subdirectories of `dir`, sorted; none when `dir` is missing.
fn shard_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("read directory", dir, e))?;
        if entry.file_name().to_str().is_some_and(is_shard) && entry.path().is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The names of the files in `dir` accepted by `keep`.
fn file_names(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("read directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io("read directory", dir, e))?;
        if let Ok(name) = entry.file_name().into_string()
            && keep(&name)
        {
            out.push(name);
        }
    }
    Ok(out)
}

/// Runs `work` on every item of `items` from [`REBUILD_THREADS`] threads; the first error wins.
fn parallel<T: Sync>(items: &[T], work: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<kst_core::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..REBUILD_THREADS.min(items.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else {
                        return;
                    };
                    if failed.lock().is_ok_and(|f| f.is_some()) {
                        return;
                    }
                    if let Err(e) = work(item) {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Rebuilds the index from the history files and returns how many current keys it indexed:
/// adds the entries of every current key (each under its address' shard lock, so it is safe
/// while the store serves), then removes every line whose address' current key does not have
/// it, and marks the index ready. Running it again changes nothing.
pub(crate) fn rebuild(layout: &Layout) -> Result<u64> {
    let indexed = AtomicU64::new(0);
    let shards = shard_dirs(&layout.keys_dir())?;
    parallel(&shards, |shard| {
        let names = file_names(shard, |n| history_file_hash(n).is_some())?;
        for name in names {
            let Some(hash) = history_file_hash(&name) else {
                continue;
            };
            let _lock = ShardLock::acquire(&layout.lock_by_hash(hash))?;
            if let Some(record) = current_of(layout, hash)? {
                add(layout, &record)?;
                indexed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    })?;
    let mut index_shards = shard_dirs(&layout.root().join(INDEX_DIR).join("ids"))?;
    index_shards.extend(shard_dirs(&layout.root().join(INDEX_DIR).join("wkd"))?);
    parallel(&index_shards, |shard| sweep(layout, shard))?;
    mark_ready(layout)?;
    Ok(indexed.into_inner())
}

/// Removes from the index files in `shard` every line the current key of its address does
/// not have. A line that looks stale is checked again under the address' shard lock (a
/// publisher adds its lines before it writes the history file).
fn sweep(layout: &Layout, shard: &Path) -> Result<()> {
    let is_ids = shard.parent().and_then(Path::file_name) == Some("ids".as_ref());
    let lock = layout.locks_dir().join(format!(
        "{}-{}.lock",
        if is_ids { "ids" } else { "wkd" },
        shard.file_name().and_then(|n| n.to_str()).unwrap_or("")
    ));
    for name in file_names(shard, |n| !n.starts_with('.'))? {
        let file = IndexFile {
            path: shard.join(&name),
            lock: lock.clone(),
        };
        let mut suspects = BTreeSet::new();
        for line in read_lines(&file.path)? {
            let Some(hash) = line_address(&line) else {
                // Not a line this crate writes: dropped by the next update of the file.
                continue;
            };
            if !justified(layout, &file, hash, &line)? {
                suspects.insert(hash.to_string());
            }
        }
        let none = BTreeSet::new();
        for hash in suspects {
            let _lock = ShardLock::acquire(&layout.lock_by_hash(&hash))?;
            let keep = match current_of(layout, &hash)? {
                Some(r) => lines_of(layout, &r).remove(&file).unwrap_or_default(),
                None => BTreeSet::new(),
            };
            update(&file, &none, Some((&hash, &keep)))?;
        }
    }
    Ok(())
}

/// Whether the current key of the address `hash` has `line` in `file`.
fn justified(layout: &Layout, file: &IndexFile, hash: &str, line: &str) -> Result<bool> {
    Ok(match current_of(layout, hash)? {
        Some(r) => lines_of(layout, &r)
            .get(file)
            .is_some_and(|lines| lines.contains(line)),
        None => false,
    })
}
