//! The walk of the store in its own order ([`kst_core::KeyStore::list_page`]): by file name,
//! shard directory by shard directory (`keys/00` to `keys/ff`), names sorted within each.
//!
//! The cursor is the name of the last history file handed out (`fs:<hash>`), so a page starts
//! right after it without reading anything before it: a whole walk opens each history file
//! once and reads only its head ([`crate::file::read_address_head`]), whatever the page size.
//! (`list`, in address order, must read every file for every page.) A page lists the shard
//! directories it passes through (one `readdir` each); the file names are the SHA-256 of the
//! addresses, so they spread evenly over the 256 shards.
//!
//! A file removed meanwhile (a deletion) is skipped; one created behind the cursor (a new
//! address whose hash sorts before it) is not seen by this walk, one ahead of it is.

use std::fs;
use std::path::{Path, PathBuf};

use kst_core::store::{WalkCursor, bad_cursor};
use kst_core::{Address, DeletedPublications, Error, Result};

use crate::error::io;
use crate::layout::{Layout, deleted_file_hash, history_file_hash, is_hash, is_shard};

/// Prefix of this store's walk cursors.
const CURSOR_PREFIX: &str = "fs:";

/// Prefix of the cursors of its walk over deleted publications (`fs-deleted:<hash>`).
const DELETED_CURSOR_PREFIX: &str = "fs-deleted:";

/// One page of at most `limit` addresses after `cursor`, and the cursor after it (`None` when
/// the walk is over), reading each file with `read` (the address in the file at the path,
/// whose name is the hash; `None` when the file vanished).
pub(crate) fn page_with(
    layout: &Layout,
    cursor: Option<&WalkCursor>,
    limit: usize,
    mut read: impl FnMut(&Path, &str) -> Result<Option<Address>>,
) -> Result<(Vec<Address>, Option<WalkCursor>)> {
    kst_core::store::check_walk_limit(limit)?;
    let after = cursor.map(|c| parse(c, CURSOR_PREFIX)).transpose()?;
    let after_shard = after.as_deref().map(|h| &h[..2]);
    let mut out = Vec::new();
    for shard in shards(&layout.keys_dir())? {
        if after_shard.is_some_and(|s| shard.as_str() < s) {
            continue;
        }
        for (hash, path) in files(&layout.keys_dir().join(&shard), history_file_hash)? {
            if after.as_deref().is_some_and(|a| hash.as_str() <= a) {
                continue;
            }
            if let Some(address) = read(&path, &hash)? {
                out.push(address);
                if out.len() == limit {
                    return Ok((out, Some(WalkCursor::new(format!("{CURSOR_PREFIX}{hash}")))));
                }
            }
        }
    }
    Ok((out, None))
}

/// [`page_with`] reading the head of each file only.
pub(crate) fn page(
    layout: &Layout,
    cursor: Option<&WalkCursor>,
    limit: usize,
) -> Result<(Vec<Address>, Option<WalkCursor>)> {
    page_with(layout, cursor, limit, crate::file::read_address_head)
}

/// One page of the walk over the files of deleted publication ids (`<hash>.deleted`, see
/// [`kst_core::KeyStore::deleted_page`]): at most `limit` addresses with their ids, by file
/// name like the walk of the keys, and the cursor after it (`None` when the walk is over).
pub(crate) fn deleted_page(
    layout: &Layout,
    cursor: Option<&WalkCursor>,
    limit: usize,
) -> Result<(Vec<DeletedPublications>, Option<WalkCursor>)> {
    kst_core::store::check_walk_limit(limit)?;
    let after = cursor
        .map(|c| parse(c, DELETED_CURSOR_PREFIX))
        .transpose()?;
    let after_shard = after.as_deref().map(|h| &h[..2]);
    let mut out = Vec::new();
    for shard in shards(&layout.keys_dir())? {
        if after_shard.is_some_and(|s| shard.as_str() < s) {
            continue;
        }
        for (hash, path) in files(&layout.keys_dir().join(&shard), deleted_file_hash)? {
            if after.as_deref().is_some_and(|a| hash.as_str() <= a) {
                continue;
            }
            if let Some((address, ids)) = crate::file::read_deleted_at(&path, &hash)? {
                out.push(DeletedPublications {
                    address,
                    publication_ids: ids.into_iter().collect(),
                });
                if out.len() == limit {
                    let next = WalkCursor::new(format!("{DELETED_CURSOR_PREFIX}{hash}"));
                    return Ok((out, Some(next)));
                }
            }
        }
    }
    Ok((out, None))
}

/// The hash a cursor with `prefix` of this store stands after.
fn parse(cursor: &WalkCursor, prefix: &str) -> Result<String> {
    cursor
        .token()
        .strip_prefix(prefix)
        .filter(|h| is_hash(h))
        .map(str::to_string)
        .ok_or_else(|| Error::Invalid(bad_cursor(cursor)))
}

/// The shard directories under `keys`, sorted.
fn shards(keys: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = names(keys)?.into_iter().filter(|n| is_shard(n)).collect();
    out.sort_unstable();
    Ok(out)
}

/// The files of one shard directory whose names `stem` takes (history files, files of
/// deleted publication ids) as (hash, path), sorted by hash. A shard directory that vanished
/// (never the case today: they are not removed) holds none.
fn files(shard_dir: &Path, stem: impl Fn(&str) -> Option<&str>) -> Result<Vec<(String, PathBuf)>> {
    let names = match names(shard_dir) {
        Ok(n) => n,
        Err(_) if !shard_dir.exists() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<(String, PathBuf)> = names
        .iter()
        .filter_map(|n| stem(n.as_str()).map(|h| (h.to_string(), shard_dir.join(n))))
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The UTF-8 entry names of `dir` (no file of the store has another).
fn names(dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).map_err(|e| io("read directory", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("read directory", dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kst_core::KeyStore;

    use super::*;
    use crate::FsStore;

    fn address(i: usize) -> Address {
        kst_core::AddressPolicy::default()
            .normalize(&format!("walker{i}@example.net"))
            .unwrap()
    }

    async fn store_with(n: usize) -> (tempfile::TempDir, FsStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).await.unwrap();
        for i in 0..n {
            let record = kst_core::NewKey {
                address: address(i),
                key: vec![0x99; 4096],
                fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
                publication_id: format!("{i:04}"),
                published_at: 1,
                revoked: false,
                expected: kst_core::Expected::Any,
            }
            .into_record(1);
            store.restore(&[record]).await.unwrap();
        }
        (dir, store)
    }

    /// A whole walk in pages of 7 opens each history file once (counted through the reader it
    /// is given), hands out every address once, and goes on across deletions between pages.
    #[tokio::test]
    async fn a_whole_walk_opens_each_history_file_once() {
        let (_dir, store) = store_with(300).await;
        let layout = Layout::new(store.root().to_path_buf());
        let mut opens: BTreeMap<PathBuf, usize> = BTreeMap::new();
        let mut seen: BTreeMap<Address, usize> = BTreeMap::new();
        let mut cursor = None;
        let mut pages = 0;
        let mut deleted = Vec::new();
        loop {
            let (addresses, next) = page_with(&layout, cursor.as_ref(), 7, |path, hash| {
                *opens.entry(path.to_path_buf()).or_default() += 1;
                crate::file::read_address_head(path, hash)
            })
            .unwrap();
            assert!(addresses.len() <= 7);
            for a in &addresses {
                *seen.entry(a.clone()).or_default() += 1;
            }
            pages += 1;
            if pages == 3 {
                // The address the cursor stands on, and some not handed out yet.
                let mut gone = vec![addresses.last().unwrap().clone()];
                gone.extend(
                    (0..300)
                        .map(address)
                        .filter(|a| !seen.contains_key(a))
                        .take(5),
                );
                for a in &gone {
                    assert!(store.delete(a).await.unwrap());
                }
                deleted = gone;
            }
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert!(pages >= 300 / 7, "{pages} pages");
        assert!(
            opens.values().all(|&n| n == 1),
            "a history file was opened twice: {:?}",
            opens.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
        );
        assert_eq!(opens.len(), 300 - (deleted.len() - 1), "files opened");
        assert!(seen.values().all(|&n| n == 1));
        assert_eq!(seen.len(), 300 - (deleted.len() - 1));
        for a in &deleted[1..] {
            assert!(!seen.contains_key(a), "{a} walked after its deletion");
        }
    }

    /// The store's `list_page` is this walk: the same pages, and the cursor is checked.
    #[tokio::test]
    async fn list_page_walks_by_file_name() {
        let (_dir, store) = store_with(20).await;
        let layout = Layout::new(store.root().to_path_buf());
        let (first, next) = page(&layout, None, 8).unwrap();
        let got = store.list_page(None, 8).await.unwrap();
        assert_eq!(got.addresses, first);
        assert_eq!(got.next, next);
        let hashes: Vec<String> = first.iter().map(crate::layout::address_hash).collect();
        let mut sorted = hashes.clone();
        sorted.sort();
        assert_eq!(hashes, sorted, "file name order");
        let bad = WalkCursor::new("fs:../../etc");
        let e = store.list_page(Some(&bad), 8).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(e.to_string().contains("start the walk again"), "{e}");
    }
}
