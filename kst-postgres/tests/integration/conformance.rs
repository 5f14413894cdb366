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
    // Revoked and unrevoked publications of one key racing on two pools.
    conformance::revocation::revocation_race(stores[2..].to_vec()).await;
    // Compare-and-set writers and the service's read-merge-write across instances.
    conformance::cas::compare_and_set_race(stores.clone()).await;
    conformance::cas::merged_publications(stores.clone()).await;
    // Expiry reminder claims, and reminders sent by a pool of three with a test clock.
    conformance::reminders::reminder_claims(stores.clone()).await;
    conformance::reminders::reminders_across_a_pool(stores[..3].to_vec()).await;
    conformance::concurrent_publishers(stores.clone()).await;
    conformance::atomic_publish_across(stores.clone()).await;
    conformance::publish_races_delete_and_restore(stores[0].clone(), stores[1].clone()).await;
    assert!(conformance::check_consistency(&*stores[0]).await > 0);
}
