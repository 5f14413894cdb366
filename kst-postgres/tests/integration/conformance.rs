//! The shared `KeyStore` conformance suite (`kst_core::conformance`) on PostgreSQL.

use std::sync::Arc;

use kst_core::KeyStore;
use kst_core::conformance;

use crate::support::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_on_an_empty_database() {
    let db = TestDb::new().await;
    conformance::run_all(Arc::new(db.store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_concurrency_on_separate_pools() {
    let db = TestDb::new().await;
    let mut stores: Vec<Arc<dyn KeyStore>> = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(db.store().await));
    }
    // The pool's properties, each instance with its own pools.
    conformance::run_across_instances(stores).await;
}
