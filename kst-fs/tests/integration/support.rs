//! Test helpers: stores in temporary directories, addresses, error checks.

use std::path::PathBuf;

use kst_core::{Address, AddressPolicy, Error};
use kst_fs::FsStore;
use tempfile::TempDir;

/// A fresh temporary directory and a store in its `store` subdirectory (created by `open`).
pub async fn temp_store() -> (TempDir, FsStore) {
    let dir = TempDir::new().expect("temporary directory");
    let store = FsStore::open(dir.path().join("store"))
        .await
        .expect("open a store in a fresh directory");
    (dir, store)
}

/// `<tmp>/store`.
pub fn root(dir: &TempDir) -> PathBuf {
    dir.path().join("store")
}

/// A normalized address.
pub fn addr(s: &str) -> Address {
    AddressPolicy {
        unicode_local_parts: true,
        ..AddressPolicy::default()
    }
    .normalize(s)
    .expect("test address")
}

/// Panics unless `r` failed with `Error::Corrupt`.
#[track_caller]
pub fn assert_corrupt<T: std::fmt::Debug>(what: &str, r: kst_core::Result<T>) {
    match r {
        Err(Error::Corrupt { component, message }) => {
            assert_eq!(component, "store(fs)", "{what}: {message}");
        }
        other => panic!("{what}: expected Error::Corrupt, got {other:?}"),
    }
}

/// Panics unless `r` failed with a temporary `Error::Unavailable` of the fs store.
#[track_caller]
pub fn assert_unavailable<T: std::fmt::Debug>(what: &str, r: kst_core::Result<T>) {
    match r {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(e.is_temporary(), "{what}: {e}");
            assert!(e.to_string().contains("store(fs)"), "{what}: {e}");
        }
        other => panic!("{what}: expected a temporary Error::Unavailable, got {other:?}"),
    }
}
