//! The `KeyStore` and `RateLimiter` conformance suites on `FsStore`.

use std::sync::Arc;

use kst_core::conformance::limiter;
use kst_core::conformance::{check_consistency, concurrent_publishers, run_all};
use kst_core::{KeyStore, RateLimiter};
use kst_fs::FsStore;

use crate::support::{root, temp_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_on_a_fresh_directory() {
    let (dir, store) = temp_store().await;
    let store = Arc::new(store);
    run_all(store.clone()).await;

    // Another instance on the directory (a restart) sees exactly the same.
    let reopened = FsStore::open(root(&dir)).await.expect("reopen");
    let n = check_consistency(&reopened).await;
    assert_eq!(n, check_consistency(&*store).await);
    for a in store.list(None, usize::MAX).await.unwrap() {
        assert_eq!(
            reopened.history(&a).await.unwrap(),
            store.history(&a).await.unwrap(),
            "history of {a} after reopening"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_on_separate_instances() {
    let (dir, first) = temp_store().await;
    let mut stores: Vec<Arc<dyn KeyStore>> = vec![Arc::new(first)];
    for _ in 0..3 {
        stores.push(Arc::new(FsStore::open(root(&dir)).await.expect("open")));
    }
    // Revoked and unrevoked publications of one key racing on two instances.
    kst_core::conformance::revocation::revocation_race(stores[2..].to_vec()).await;
    // Compare-and-set writers and the service's read-merge-write across instances.
    kst_core::conformance::cas::compare_and_set_race(stores.clone()).await;
    kst_core::conformance::cas::merged_publications(stores.clone()).await;
    // Expiry reminder claims, and reminders sent by a pool of three with a test clock.
    kst_core::conformance::reminders::reminder_claims(stores.clone()).await;
    kst_core::conformance::reminders::reminders_across_a_pool(stores[..3].to_vec()).await;
    concurrent_publishers(stores.clone()).await;
    // Again on the same directory: the suite starts by deleting its addresses.
    concurrent_publishers(stores.clone()).await;
    assert!(check_consistency(&*stores[3]).await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limiter_conformance_on_separate_instances() {
    let (dir, first) = temp_store().await;
    let mut limiters: Vec<Arc<dyn RateLimiter>> = vec![Arc::new(first)];
    for _ in 0..2 {
        limiters.push(Arc::new(FsStore::open(root(&dir)).await.expect("open")));
    }
    limiter::run_all(limiters).await;
}
