//! Where the fs key directory keeps a domain's root (feature `transparency`), and how the
//! journal's version 3 makes every older kst fail closed on it (review F2/F3 of issue 18).
//!
//! ```text
//! kt/<domain>/root.v3   epoch (8 bytes, big-endian) ‖ the root record: the root, with the
//!                       journal (Linux, `journal.rs` version 3)
//! kt/<domain>/root      `KSTR3\n` (6 bytes, [`MOVED`]) once the root is in `root.v3`;
//!                       without the journal (elsewhere) the root itself, epoch ‖ record
//! ```
//!
//! **Why the root moved.** From version 3 the tree's files (nodes, value states, heads) hold
//! the epochs up to the journal's checkpoint only; the epochs above it are read from the
//! journal's frames (`overlay.rs`). Every kst before that (from before the journal, journal
//! versions 1 and 2, and version 3 before this file) read the root from `kt/<domain>/root`
//! (every one of them with the same reader: `epoch (8) ‖ record`, and a file of fewer than 8
//! bytes `Corrupt`, "is truncated"), and the nodes from their files alone. One still running
//! after the upgrade (a pool rolled one process at a time) read the live root over stale
//! node files and could sign and serve a head of a wrong root hash; only one that touched
//! the domain afresh was stopped by the journal's version gate (its checkpoint). Now the
//! first process of this version to touch a domain ([`move_to_v3`], in its recovery, under
//! the domain's exclusive lock) copies the root to `root.v3` and then writes [`MOVED`] over
//! `root`: too short to be a root, so every older kst refuses the domain (`Corrupt`) at its
//! next read of the root, which each of its reads of the tree (the server's first step for
//! any answer) and each commit starts with, whether or not it had checked the domain
//! before. A domain without a root gets the marker too: an older kst would take it for
//! empty and start a tree of its own.
//!
//! The marker is the upgrade's commit point: until it is there, `root` is the truth (an
//! older kst may commit after an upgrade killed between the copy and the marker), and the
//! next process of this version copies it again. Once it is there, no older kst writes the
//! root again (each reads it first, and fails).

use std::path::{Path, PathBuf};

use kst_core::durable::write_atomic;
use kst_core::transparency::DirectoryStoreError;

use crate::directory::{cut, read, unavailable};
use crate::journal;

/// The root's file of every kst before this one, and without the journal (elsewhere than
/// Linux): epoch (8 bytes) ‖ the root record. With the journal it holds [`MOVED`].
pub(crate) const ROOT_LEGACY: &str = "root";

/// The root's file with the journal (its version 3): epoch (8 bytes) ‖ the root record.
pub(crate) const ROOT_V3: &str = "root.v3";

/// What [`ROOT_LEGACY`] holds once the root is in [`ROOT_V3`]: fewer than the 8 bytes of an
/// epoch, so every older kst's reader of the root refuses it (`Corrupt`, "is truncated").
pub(crate) const MOVED: &[u8] = b"KSTR3\n";

/// `dir`'s root file with the journal.
pub(crate) fn path_v3(dir: &Path) -> PathBuf {
    dir.join(ROOT_V3)
}

/// `dir`'s root file without the journal (and the marker's place with it).
pub(crate) fn path_legacy(dir: &Path) -> PathBuf {
    dir.join(ROOT_LEGACY)
}

/// `bytes` of the root file at `path` as `epoch (8 bytes) ‖ record`; `Corrupt` when shorter.
fn parse(path: &Path, bytes: &[u8]) -> Result<(u64, Vec<u8>), DirectoryStoreError> {
    let (epoch, blob) = bytes.split_first_chunk::<8>().ok_or_else(|| {
        DirectoryStoreError::Corrupt(format!(
            "{} is truncated ({} bytes, no epoch and root record): if a newer kst keeps this \
             directory, run that one; otherwise restore the domain's directory from a backup",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok((u64::from_be_bytes(*epoch), blob.to_vec()))
}

/// The stored root with the journal: [`ROOT_V3`]; before a process of this version moved it
/// ([`move_to_v3`], at its first touch of the domain) the older kst's [`ROOT_LEGACY`]. A
/// domain moved before its first root has none; one moved whose journal holds an epoch
/// (its checkpoint above 0, or the frame of epoch 1) lost its root: `Corrupt` (review L1:
/// taken for a domain without a root, akd's empty tree was committed over its nodes).
pub(crate) fn read_v3(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    let path = path_v3(dir);
    if let Some(bytes) = read(&path)? {
        return parse(&path, &bytes).map(Some);
    }
    let legacy = path_legacy(dir);
    match read(&legacy)? {
        None => Ok(None),
        Some(bytes) if bytes == MOVED => {
            let checkpoint = journal::stored_checkpoint(dir)?;
            let empty = matches!(checkpoint, None | Some(journal::Stored::V3(0)))
                && !journal::holds(dir, 1)?;
            if empty {
                return Ok(None);
            }
            Err(DirectoryStoreError::Corrupt(format!(
                "{} is missing, but {} says the root moved there and the journal holds epochs \
                 ({checkpoint:?}): the domain's root was lost; restore the domain's directory \
                 from a backup",
                path.display(),
                legacy.display()
            )))
        }
        Some(bytes) => parse(&legacy, &bytes).map(Some),
    }
}

/// The stored root without the journal: [`ROOT_LEGACY`]. A domain whose root a kst with the
/// journal moved ([`MOVED`]) is refused (`Corrupt`): its epochs above the checkpoint are in
/// the journal's frames, which this kst does not read.
pub(crate) fn read_legacy(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    let path = path_legacy(dir);
    match read(&path)? {
        None => Ok(None),
        Some(bytes) if bytes == MOVED => Err(DirectoryStoreError::Corrupt(format!(
            "{} says the domain's root moved to {ROOT_V3}: a kst with the journal's version 3 \
             (Linux) keeps this directory, its newest epochs in the journal, which this kst \
             (without the journal) does not read; run that kst on it",
            path.display()
        ))),
        Some(bytes) => parse(&path, &bytes).map(Some),
    }
}

/// The stored root, with the journal (`journal`) or without.
pub(crate) fn read_root(
    dir: &Path,
    journal: bool,
) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
    if journal {
        read_v3(dir)
    } else {
        read_legacy(dir)
    }
}

/// Whether `dir`'s root is moved ([`ROOT_LEGACY`] holds [`MOVED`]): a process's check that
/// it has nothing to upgrade before it reads the domain without taking its lock.
pub(crate) fn moved(dir: &Path) -> Result<bool, DirectoryStoreError> {
    Ok(read(&path_legacy(dir))?.is_some_and(|bytes| bytes == MOVED))
}

/// Under the domain's exclusive lock, at a process's recovery of the domain, before
/// anything else: the root an older kst left in [`ROOT_LEGACY`] copied to [`ROOT_V3`]
/// (durably), then [`MOVED`] written over it (durably: the upgrade's commit point); a domain
/// without a root gets the marker alone. Nothing when the marker is there. A root file that
/// is no root is refused (`Corrupt`), nothing written. Returns whether it moved anything.
pub(crate) fn move_to_v3(dir: &Path) -> Result<bool, DirectoryStoreError> {
    let legacy = path_legacy(dir);
    match read(&legacy)? {
        Some(bytes) if bytes == MOVED => return Ok(false),
        Some(bytes) => {
            parse(&legacy, &bytes)?;
            let v3 = path_v3(dir);
            write_atomic(&v3, &bytes).map_err(|e| unavailable("write", &v3, e))?;
            cut::step()?;
        }
        None => {}
    }
    write_atomic(&legacy, MOVED).map_err(|e| unavailable("write", &legacy, e))?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// How every kst before this file read a domain's root, as the releases wrote it (kst-fs
    /// `directory.rs`'s `read_root` from the first directory, 193a3b7, through journal
    /// versions 1 and 2 to version 3 at d191855: `read_epoch_blob(&dir.join("root"))`, the
    /// same check inlined before 130310f), over its `read` (a missing file is no root, one
    /// over 64 KiB `Corrupt`): `Err(())` where it refuses the domain (`Corrupt`).
    pub(crate) fn older_kst_reads_root(dir: &Path) -> Result<Option<u64>, ()> {
        let path = dir.join("root");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => return Err(()),
        };
        if bytes.len() > 64 * 1024 {
            return Err(());
        }
        let (epoch, _blob) = bytes.split_first_chunk::<8>().ok_or(())?;
        Ok(Some(u64::from_be_bytes(*epoch)))
    }

    /// Puts `dir`'s root back where an older kst keeps it (a store as one left it).
    pub(crate) fn as_an_older_kst_left_it(dir: &Path) {
        let v3 = path_v3(dir);
        if v3.exists() {
            std::fs::rename(&v3, path_legacy(dir)).unwrap();
        } else if moved(dir).unwrap() {
            std::fs::remove_file(path_legacy(dir)).unwrap();
        }
    }
}
