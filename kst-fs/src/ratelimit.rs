//! [`RateLimiter`] on the store's directory, shared by every process on the host (`kst deliver`
//! runs once per message, so counters in memory would count nothing).
//!
//! ```text
//! <root>/ratelimit/<aa>.json   {"<sha256 of the limiter key>": [window end (unix s), count], ...}
//! ```
//!
//! A hit locks its shard file (`flock`), reads it, counts, drops windows that have ended and
//! writes it back. [`RateLimiter::hit_many`] does the same once per shard its keys fall in,
//! one shard after the other (never two locks at once), in one hand-off to the blocking pool. Counters are soft state: a file that cannot be parsed counts as empty and is
//! rewritten, and nothing is fsynced.
//!
//! The new content is written over the old one from offset 0 and the file is cut to its length
//! afterwards, never truncated to 0 first: ext4 (`auto_da_alloc`, on by default) takes "truncate
//! to 0, write, close" for a file being replaced and starts writing it to disk at the close, a
//! disk write per hit that cost the web listener most of its throughput. Written in place, the
//! counters stay in the page cache like any other file until the kernel writes them back. A
//! reader never sees a half-written shard because every reader and writer holds the lock.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Read;
#[cfg(unix)]
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fs4::fs_std::FileExt;
use kst_core::ratelimit::{Hit, Tally};
use kst_core::{RateLimiter, Result};
use sha2::{Digest, Sha256};

use crate::error::io;
use crate::store::FsStore;

/// Subdirectory holding the counter shards.
pub(crate) const RATELIMIT_DIR: &str = "ratelimit";

type Shard = BTreeMap<String, (u64, u64)>;

/// Hits of one key in its shard: the hash of the key, how many, the window of the first.
type ShardHit = (String, u64, Duration);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts one hit of `key` in the shard files under `dir`; returns the window's count.
pub(crate) fn hit_in(dir: &Path, key: &str, window: Duration) -> Result<u64> {
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let shard = hash[..2].to_string();
    let counts = hit_shard(dir, &shard, &[(hash, 1, window)])?;
    Ok(counts[0])
}

/// Counts `n` hits of each `(key, n, window)` of `keys` (distinct keys, as
/// [`kst_core::ratelimit::Tally`] lists them) in the shard files under `dir`, one shard at a
/// time (each locked, read and written once); returns each key's window count, in order.
pub(crate) fn hit_many_in(dir: &Path, keys: &[(&str, u32, Duration)]) -> Result<Vec<u64>> {
    let mut by_shard: BTreeMap<String, Vec<(usize, ShardHit)>> = BTreeMap::new();
    for (i, (key, n, window)) in keys.iter().enumerate() {
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        by_shard
            .entry(hash[..2].to_string())
            .or_default()
            .push((i, (hash, u64::from(*n), *window)));
    }
    let mut counts = vec![0; keys.len()];
    for (shard, entries) in by_shard {
        let (at, entries): (Vec<usize>, Vec<_>) = entries.into_iter().unzip();
        for (i, c) in at.into_iter().zip(hit_shard(dir, &shard, &entries)?) {
            counts[i] = c;
        }
    }
    Ok(counts)
}

/// Adds `n` hits to each `(hash of the key, n, window)` of `entries` in the shard file
/// `<dir>/<name>.json` under its lock; returns each one's window count, in order.
fn hit_shard(dir: &Path, name: &str, entries: &[ShardHit]) -> Result<Vec<u64>> {
    update_shard(dir, name, |shard, now| {
        entries
            .iter()
            .map(|(hash, n, window)| {
                let window = window.as_secs().max(1);
                let entry = shard
                    .entry(hash.clone())
                    .or_insert((now.saturating_add(window), 0));
                entry.1 = entry.1.saturating_add(*n);
                entry.1
            })
            .collect()
    })
}

/// Takes back one hit of each key of `keys` (a key named n times, n hits) from its open
/// window in the shard files under `dir`, one shard at a time; never below 0.
pub(crate) fn refund_in(dir: &Path, keys: &[&str]) -> Result<()> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in keys {
        let hash = hex::encode(Sha256::digest(key.as_bytes()));
        by_shard
            .entry(hash[..2].to_string())
            .or_default()
            .push(hash);
    }
    for (name, hashes) in by_shard {
        update_shard(dir, &name, |shard, _| {
            for hash in &hashes {
                if let Some(entry) = shard.get_mut(hash) {
                    entry.1 = entry.1.saturating_sub(1);
                }
            }
        })?;
    }
    Ok(())
}

/// Runs `change` on the shard file `<dir>/<name>.json` (its windows that ended dropped
/// first; `now` in Unix seconds) under its lock, and writes it back.
fn update_shard<T>(dir: &Path, name: &str, change: impl FnOnce(&mut Shard, u64) -> T) -> Result<T> {
    let path = dir.join(format!("{name}.json"));
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io("create directory", dir, e))?;
            options.open(&path)
        }
        other => other,
    }
    .map_err(|e| io("open", &path, e))?;
    loop {
        match FileExt::lock_exclusive(&file) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("lock", &path, e)),
        }
    }
    let mut raw = Vec::new();
    // An unreadable or damaged shard counts as empty (soft state); one that could not be read
    // to its end is cut to what is written.
    let (mut shard, old_len): (Shard, usize) = match file.read_to_end(&mut raw) {
        Ok(n) => (serde_json::from_slice(&raw).unwrap_or_default(), n),
        Err(_) => (Shard::new(), usize::MAX),
    };
    let now = now_secs();
    shard.retain(|_, (end, _)| *end > now);
    let out = change(&mut shard, now);
    let json = serde_json::to_vec(&shard).unwrap_or_default();
    write_over(&file, &json, old_len).map_err(|e| io("write", &path, e))?;
    Ok(out)
}

/// Replaces the `old_len` bytes of `file` with `bytes`: written from offset 0, then cut to
/// their length if the file was longer (see the module documentation for why never to 0).
fn write_over(file: &std::fs::File, bytes: &[u8], old_len: usize) -> std::io::Result<()> {
    #[cfg(unix)]
    file.write_all_at(bytes, 0)?;
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = file;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(bytes)?;
    }
    if bytes.len() < old_len {
        file.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

#[async_trait]
impl RateLimiter for FsStore {
    fn name(&self) -> &'static str {
        "fs"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        let dir = self.root().join(RATELIMIT_DIR);
        let key = key.to_string();
        let count = crate::store::blocking(move || hit_in(&dir, &key, window)).await?;
        Ok(count <= u64::from(limit))
    }

    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.root().join(RATELIMIT_DIR);
        let tally = Tally::of(hits);
        let keys: Vec<(String, u32, Duration)> = tally
            .keys
            .iter()
            .map(|(k, n, w)| (k.to_string(), *n, *w))
            .collect();
        let counts = crate::store::blocking(move || {
            let keys: Vec<(&str, u32, Duration)> =
                keys.iter().map(|(k, n, w)| (k.as_str(), *n, *w)).collect();
            hit_many_in(&dir, &keys)
        })
        .await?;
        tally.verdicts(hits, &counts)
    }

    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        if hits.is_empty() {
            return Ok(());
        }
        let dir = self.root().join(RATELIMIT_DIR);
        let keys: Vec<String> = hits.iter().map(|h| h.key.clone()).collect();
        crate::store::blocking(move || {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            refund_in(&dir, &keys)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    // Counting, sharing between instances and concurrency: the limiter conformance suite
    // (tests/integration/conformance.rs).

    #[tokio::test]
    async fn damaged_shards_count_as_empty_and_ended_windows_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rl = dir.path().join(RATELIMIT_DIR);
        let hash = hex::encode(Sha256::digest(b"sender:bob@acme.net"));
        std::fs::create_dir_all(&rl).unwrap();
        let shard = rl.join(format!("{}.json", &hash[..2]));
        std::fs::write(&shard, b"{not json").unwrap();
        assert_eq!(hit_in(&rl, "sender:bob@acme.net", HOUR).unwrap(), 1);
        // An ended window (end in the past) starts again at 1 and old entries go.
        std::fs::write(
            &shard,
            format!("{{\"{hash}\":[1,99],\"{}\":[1,5]}}", "0".repeat(64)),
        )
        .unwrap();
        assert_eq!(hit_in(&rl, "sender:bob@acme.net", HOUR).unwrap(), 1);
        let left: Shard = serde_json::from_slice(&std::fs::read(&shard).unwrap()).unwrap();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn a_shard_is_cut_to_its_new_content_and_its_directory_made_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        // The directory does not exist yet: the first hit makes it.
        let rl = dir.path().join(RATELIMIT_DIR);
        assert_eq!(hit_in(&rl, "web-client:192.0.2.1", HOUR).unwrap(), 1);
        let hash = hex::encode(Sha256::digest(b"web-client:192.0.2.1"));
        let shard = rl.join(format!("{}.json", &hash[..2]));
        // A damaged shard much longer than the new content: what is left after the hit is
        // exactly the new content.
        std::fs::write(&shard, vec![b'x'; 4096]).unwrap();
        assert_eq!(hit_in(&rl, "web-client:192.0.2.1", HOUR).unwrap(), 1);
        assert_eq!(hit_in(&rl, "web-client:192.0.2.1", HOUR).unwrap(), 2);
        let left: Shard = serde_json::from_slice(&std::fs::read(&shard).unwrap()).unwrap();
        assert_eq!(left[&hash].1, 2);
    }
}
