//! [`RateLimiter`] on the store's directory, shared by every process on the host (`kst deliver`
//! runs once per message, so counters in memory would count nothing).
//!
//! ```text
//! <root>/ratelimit/<aa>.json   {"<sha256 of the limiter key>": [window end (unix s), count], ...}
//! ```
//!
//! A hit locks its shard file (`flock`), reads it, counts, drops windows that have ended and
//! writes it back. Counters are soft state: a file that cannot be parsed counts as empty and is
//! rewritten, and nothing is fsynced.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fs4::fs_std::FileExt;
use kst_core::{RateLimiter, Result};
use sha2::{Digest, Sha256};

use crate::error::io;
use crate::store::FsStore;

/// Subdirectory holding the counter shards.
pub(crate) const RATELIMIT_DIR: &str = "ratelimit";

type Shard = BTreeMap<String, (u64, u64)>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts one hit of `key` in the shard files under `dir`; returns the window's count.
pub(crate) fn hit_in(dir: &Path, key: &str, window: Duration) -> Result<u64> {
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| io("create directory", dir, e))?;
    }
    let path = dir.join(format!("{}.json", &hash[..2]));
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| io("open", &path, e))?;
    loop {
        match FileExt::lock_exclusive(&file) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("lock", &path, e)),
        }
    }
    let mut text = String::new();
    // An unreadable or damaged shard counts as empty (soft state).
    let mut shard: Shard = match file.read_to_string(&mut text) {
        Ok(_) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => Shard::new(),
    };
    let now = now_secs();
    shard.retain(|_, (end, _)| *end > now);
    let window = window.as_secs().max(1);
    let entry = shard.entry(hash).or_insert((now.saturating_add(window), 0));
    entry.1 = entry.1.saturating_add(1);
    let count = entry.1;
    let json = serde_json::to_vec(&shard).unwrap_or_default();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.set_len(0))
        .and_then(|_| file.write_all(&json))
        .map_err(|e| io("write", &path, e))?;
    Ok(count)
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
}
