//! The bound on the store's blocking file work (`kst_fs::MAX_BLOCKING`): a flood of look-ups
//! never has more than that many running on Tokio's blocking pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kst_core::KeyStore;
use kst_core::conformance::test_key;
use kst_fs::{MAX_BLOCKING, blocking_in_flight, blocking_peak};

use crate::support::{addr, temp_store};

/// 2,000 look-ups at once (`history` always reads on the blocking pool, `get` when its file
/// is not cached) over 50 addresses: a watcher sees at most MAX_BLOCKING in flight, so does
/// the store's own peak, and every look-up answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_look_ups_never_run_more_than_max_blocking() {
    let (_dir, store) = temp_store().await;
    let addresses: Vec<_> = (0..50)
        .map(|i| addr(&format!("flood{i}@example.net")))
        .collect();
    for (i, a) in addresses.iter().enumerate() {
        store.publish(test_key(a, 1, i as u64)).await.unwrap();
    }
    let store = Arc::new(store);
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (done, seen) = (done.clone(), seen.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                seen.fetch_max(blocking_in_flight(), Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let mut lookups = tokio::task::JoinSet::new();
    for n in 0..2_000usize {
        let (store, a) = (store.clone(), addresses[n % addresses.len()].clone());
        lookups.spawn(async move {
            if n % 2 == 0 {
                store.history(&a).await.map(|h| h.len())
            } else {
                store.get(&a).await.map(|r| usize::from(r.is_some()))
            }
        });
    }
    while let Some(r) = lookups.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 1);
    }
    done.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let (seen, peak) = (seen.load(Ordering::Relaxed), blocking_peak());
    assert!(seen <= MAX_BLOCKING, "{seen} in flight at once");
    assert!(peak <= MAX_BLOCKING, "peak {peak}");
    assert!(
        peak > 1,
        "the look-ups ran one at a time (peak {peak}): the test shows nothing"
    );
}
