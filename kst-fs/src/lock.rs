//! Exclusive per-shard file locks, shared by the threads and processes that write one store.
//!
//! `flock(2)` locks belong to an open file description, so two `FsStore` instances in one process
//! exclude each other just like two processes do. The lock is released when the guard (and with
//! it the file) is dropped, also when the process dies.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::Path;

use fs4::fs_std::FileExt;
use kst_core::Result;

use crate::error::io;

/// Holds the exclusive lock of one shard while it lives.
#[derive(Debug)]
pub(crate) struct ShardLock {
    _file: File,
}

impl ShardLock {
    /// Opens (creating if needed) the lock file at `path` and waits for its exclusive lock.
    pub(crate) fn acquire(path: &Path) -> Result<ShardLock> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(path)
            .map_err(|e| io("open lock file", path, e))?;
        loop {
            match FileExt::lock_exclusive(&file) {
                Ok(()) => return Ok(ShardLock { _file: file }),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("lock", path, e)),
            }
        }
    }
}
