//! The key directory's writer while its store is down (red-team round 6's leftovers): after a
//! failed open, the requests queued behind it fail at once with its error instead of each
//! trying the store again, and a request after the pause tries again.

#![cfg(feature = "transparency")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kst_core::transparency::storage::{DirectoryStore, DirectoryStoreError, RecordBatch};
use kst_core::transparency::{DomainLog, LogKeys, TransparencyError};

/// A store that is down: every call fails as unavailable, and is counted.
#[derive(Default)]
struct Down {
    calls: AtomicU64,
}

impl Down {
    fn fail<T>(&self) -> Result<T, DirectoryStoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(DirectoryStoreError::Unavailable(
            "connection refused".into(),
        ))
    }
}

#[async_trait::async_trait]
impl DirectoryStore for Down {
    fn name(&self) -> &'static str {
        "down"
    }
    async fn root(&self, _: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.fail()
    }
    async fn nodes(&self, _: &str, _: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        self.fail()
    }
    async fn value_states(
        &self,
        _: &str,
        _: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.fail()
    }
    async fn commit(&self, _: &str, _: RecordBatch) -> Result<(), DirectoryStoreError> {
        self.fail()
    }
    async fn insert_head(&self, _: &str, _: u64, _: &[u8]) -> Result<Vec<u8>, DirectoryStoreError> {
        self.fail()
    }
    async fn heads(
        &self,
        _: &str,
        _: u64,
        _: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.fail()
    }
    async fn put_cosignature(
        &self,
        _: &str,
        _: u64,
        _: &[u8; 32],
        _: u64,
        _: &[u8],
    ) -> Result<(), DirectoryStoreError> {
        self.fail()
    }
    async fn cosignatures(
        &self,
        _: &str,
        _: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        self.fail()
    }
    async fn latest_cosignature(
        &self,
        _: &str,
        _: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.fail()
    }
}

/// Before: every queued read tried to open the store in turn (against a real refused port,
/// 150 to 300 ms each: 256 queued reads waited about a minute). Now 200 reads queued at once
/// cost one attempt (or a few, should the thread be held up past the pause), all failing as
/// temporary errors; one read after the pause tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_behind_a_failed_open_fail_at_once_and_the_next_after_the_pause_tries_again() {
    let store = Arc::new(Down::default());
    let log = Arc::new(
        DomainLog::open(store.clone(), LogKeys::generate("example.net"))
            .await
            .expect("a store that is down does not fail the open"),
    );
    let after_start = store.calls.load(Ordering::SeqCst);
    assert!(after_start > 0, "the open at start tried the store");
    let alice = kst_core::AddressPolicy::default()
        .normalize("alice@example.net")
        .unwrap();
    let reads: Vec<_> = (0..200)
        .map(|_| {
            let (log, alice) = (Arc::clone(&log), alice.clone());
            tokio::spawn(async move { log.entries(&alice).await })
        })
        .collect();
    for r in reads {
        let e = r.await.unwrap().expect_err("the store is down");
        // The directory's failure: a temporary one (HTTP 503, LMTP 4xx).
        assert!(
            matches!(&e, TransparencyError::Directory(m) if m.contains("connection refused")),
            "{e:?}"
        );
    }
    let during = store.calls.load(Ordering::SeqCst) - after_start;
    assert!(
        during < 50,
        "{during} store calls for 200 reads queued behind a failed open"
    );

    // After the pause (250 ms), the next read tries the store again.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let before = store.calls.load(Ordering::SeqCst);
    assert!(log.entries(&alice).await.is_err());
    assert!(
        store.calls.load(Ordering::SeqCst) > before,
        "a read after the pause tries to open the store again"
    );
}
