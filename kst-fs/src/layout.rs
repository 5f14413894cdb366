//! Where things live under the store's root: hashed file names, shard directories, lock files.
//!
//! ```text
//! <root>/keys/<aa>/<sha256hex>.json   the whole history of one address
//! <root>/keys/<aa>/<sha256hex>.tmp    a write in progress (renamed over the .json)
//! <root>/keys/<aa>/<sha256hex>.deleted      publication ids of the address' deleted histories
//! <root>/keys/<aa>/<sha256hex>.deleted.tmp  a write of it in progress
//! <root>/locks/<aa>.lock              exclusive lock of writers to shard <aa>
//! <root>/index/...                    the look-up index (see `crate::index`)
//! ```
//!
//! `<sha256hex>` is the lowercase hex SHA-256 of the normalized address and `<aa>` its first two
//! digits, so no part of a path ever comes from request input.

use std::path::{Path, PathBuf};

use kst_core::Address;
use sha2::{Digest, Sha256};

/// Subdirectory holding the history files.
pub(crate) const KEYS_DIR: &str = "keys";
/// Subdirectory holding the shard lock files.
pub(crate) const LOCKS_DIR: &str = "locks";
/// Directory of the tombstones (revocations kept per primary-key fingerprint).
pub(crate) const TOMBSTONES_DIR: &str = "tombstones";
/// Suffix of a history file.
const HISTORY_SUFFIX: &str = ".json";
/// Suffix of a history file being written.
const TEMP_SUFFIX: &str = ".tmp";
/// Suffix of the file of the publication ids of deleted histories.
const DELETED_SUFFIX: &str = ".deleted";

/// Lowercase hex SHA-256 of the normalized address: the file name stem of its history.
pub(crate) fn address_hash(address: &Address) -> String {
    hex::encode(Sha256::digest(address.as_str().as_bytes()))
}

/// The stem of a history file name (`<64 hex>.json`), or `None` for anything else (temporary
/// files, stray files).
pub(crate) fn history_file_hash(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(HISTORY_SUFFIX)?;
    is_hash(stem).then_some(stem)
}

/// The stem of a file of deleted publication ids (`<64 hex>.deleted`), or `None` for anything
/// else.
pub(crate) fn deleted_file_hash(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(DELETED_SUFFIX)?;
    is_hash(stem).then_some(stem)
}

/// Whether `s` is 64 lowercase hex digits.
pub(crate) fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` names a shard directory (two lowercase hex digits).
pub(crate) fn is_shard(s: &str) -> bool {
    s.len() == 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The paths of one store.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

/// The paths that belong to one address.
#[derive(Debug, Clone)]
pub(crate) struct AddressPaths {
    /// `<root>/keys/<aa>`.
    pub shard_dir: PathBuf,
    /// `<root>/keys/<aa>/<hash>.json`.
    pub history: PathBuf,
    /// `<root>/keys/<aa>/<hash>.tmp`.
    pub temp: PathBuf,
    /// `<root>/keys/<aa>/<hash>.deleted`: the publication ids of the deleted histories.
    pub deleted: PathBuf,
    /// `<root>/keys/<aa>/<hash>.deleted.tmp`.
    pub deleted_temp: PathBuf,
    /// `<root>/locks/<aa>.lock`.
    pub lock: PathBuf,
}

/// Where the tombstone of one primary-key fingerprint lives.
#[derive(Debug, Clone)]
pub(crate) struct TombstonePaths {
    /// `<root>/tombstones`.
    pub dir: PathBuf,
    /// `<root>/tombstones/<FINGERPRINT>`: the key revocation signatures, binary packets.
    pub file: PathBuf,
    /// `<root>/tombstones/<FINGERPRINT>.tmp`.
    pub temp: PathBuf,
    /// `<root>/locks/tombstone-<first two hex digits>.lock`, taken before any shard lock.
    pub lock: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn keys_dir(&self) -> PathBuf {
        self.root.join(KEYS_DIR)
    }

    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.root.join(LOCKS_DIR)
    }

    /// The paths of the tombstone of `fingerprint` (40 or 64 hex digits, so a safe file name).
    pub(crate) fn tombstone(&self, fingerprint: &kst_core::Fingerprint) -> TombstonePaths {
        let fpr = fingerprint.as_str();
        let dir = self.root.join(TOMBSTONES_DIR);
        TombstonePaths {
            file: dir.join(fpr),
            temp: dir.join(format!("{fpr}{TEMP_SUFFIX}")),
            lock: self
                .locks_dir()
                .join(format!("tombstone-{}.lock", &fpr[..2])),
            dir,
        }
    }

    /// The history file of the address whose hash is `hash` (64 lowercase hex digits).
    pub(crate) fn history_by_hash(&self, hash: &str) -> PathBuf {
        self.keys_dir()
            .join(&hash[..2])
            .join(format!("{hash}{HISTORY_SUFFIX}"))
    }

    /// The shard lock of the address whose hash is `hash` (64 lowercase hex digits).
    pub(crate) fn lock_by_hash(&self, hash: &str) -> PathBuf {
        self.locks_dir().join(format!("{}.lock", &hash[..2]))
    }

    /// The paths of `address`.
    pub(crate) fn address(&self, address: &Address) -> AddressPaths {
        let hash = address_hash(address);
        let shard = &hash[..2];
        let shard_dir = self.keys_dir().join(shard);
        AddressPaths {
            history: shard_dir.join(format!("{hash}{HISTORY_SUFFIX}")),
            temp: shard_dir.join(format!("{hash}{TEMP_SUFFIX}")),
            deleted: shard_dir.join(format!("{hash}{DELETED_SUFFIX}")),
            deleted_temp: shard_dir.join(format!("{hash}{DELETED_SUFFIX}{TEMP_SUFFIX}")),
            lock: self.locks_dir().join(format!("{shard}.lock")),
            shard_dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_come_from_the_hash_only() {
        let a = kst_core::AddressPolicy::default()
            .normalize("/etc/passwd@example.net")
            .unwrap();
        let layout = Layout::new(PathBuf::from("/srv/kst"));
        let p = layout.address(&a);
        let hash = address_hash(&a);
        assert!(is_hash(&hash));
        assert_eq!(
            p.history,
            PathBuf::from(format!("/srv/kst/keys/{}/{}.json", &hash[..2], hash))
        );
        assert_eq!(
            p.lock,
            PathBuf::from(format!("/srv/kst/locks/{}.lock", &hash[..2]))
        );
        assert_eq!(history_file_hash(&format!("{hash}.json")), Some(&*hash));
        assert_eq!(history_file_hash(&format!("{hash}.tmp")), None);
        assert_eq!(p.deleted, p.history.with_extension("deleted"));
        assert_eq!(history_file_hash(&format!("{hash}.deleted")), None);
        assert_eq!(history_file_hash("../x.json"), None);
        assert!(is_shard("0f") && !is_shard("0F") && !is_shard(".."));
    }

    #[test]
    fn hash_is_sha256_of_the_normalized_address() {
        let a = kst_core::AddressPolicy::default()
            .normalize("Alice@Example.NET")
            .unwrap();
        // printf 'alice@example.net' | sha256sum
        assert_eq!(
            address_hash(&a),
            "85956a993804cda14f8e09d3903088da91ddba81e48dbb1234421b49e28e958a"
        );
    }
}
