//! Red-team round on the key directory (issue 18, `rt18`): each test is an attack that worked
//! before its fix (docs/SECURITY.md, "Red-team round on issue 18").
//!
//! The set-up is small and real: a `kst serve` on the fs store with `[transparency]` on, and
//! the same directory opened in the test process as a second writer (a pool member would do
//! the same) to make epochs without mail. Tests that need the mail round trip (a client's
//! memory) live in tests/transparency.rs next to its `Provider`.
//!
//! - `rt18_a_flood_of_reads_is_refused_not_queued_and_changes_go_first`: the directory's
//!   queue is bounded (reads and changes apart), a flood is refused at once as a temporary
//!   failure, and a change is not held back behind the reads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kst_core::store::{Expected, KeyRecord, NewKey};
use kst_core::transparency::log::{MAX_QUEUED_READS, MAX_QUEUED_WRITES};
use kst_core::transparency::{DomainLog, LogKeys};
use kst_core::{Address, AddressPolicy, Fingerprint};
use kst_fs::FsDirectoryStore;

/// `NAME@example.net`, normalized.
fn address(name: &str) -> Address {
    AddressPolicy::default()
        .normalize(&format!("{name}@example.net"))
        .unwrap()
}

/// Version `version` of `address` holding key number `n`.
fn record(address: &Address, version: u64, n: u64) -> KeyRecord {
    NewKey {
        address: address.clone(),
        key: format!("key {n}").into_bytes(),
        fingerprint: Fingerprint::parse(&format!("{:040X}", n + 1)).unwrap(),
        publication_id: format!("{n:032x}"),
        published_at: 1_700_000_000 + n,
        revoked: false,
        expected: Expected::Any,
    }
    .into_record(version)
}

/// Opens example.net's directory in the fs store at `store` with `keys`.
async fn open_log(store: &Path, keys: &LogKeys) -> DomainLog {
    let keys = LogKeys::parse(&keys.to_file()).unwrap();
    DomainLog::open(Arc::new(FsDirectoryStore::new(store)), keys)
        .await
        .unwrap()
}

/// Whether `e` is the refusal of a full queue.
fn is_full(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("waiting already; retry later")
}

/// A flood of reads (four times the read queue, all at once) while a change comes in: reads
/// beyond the queue are refused at once (a temporary failure the HTTP endpoint answers 503),
/// every caller gets an answer (no hang), and the change is committed before the queued reads
/// are through (changes go first). Then a flood of changes beyond their queue: the surplus is
/// refused as temporary, the rest is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rt18_a_flood_of_reads_is_refused_not_queued_and_changes_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let keys = LogKeys::generate("example.net");
    let log = Arc::new(open_log(dir.path(), &keys).await);
    let alice = address("alice");
    log.sync(&alice, Some(&record(&alice, 1, 1)), 1)
        .await
        .unwrap();

    // Reads answered (not refused) so far.
    let done_reads = Arc::new(AtomicUsize::new(0));
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..4 * MAX_QUEUED_READS {
        let (log, done) = (Arc::clone(&log), Arc::clone(&done_reads));
        let who = address(&format!("r{i}"));
        reads.spawn(async move {
            let r = log.answer(&who, 2).await;
            if r.is_ok() {
                done.fetch_add(1, Ordering::SeqCst);
            }
            r.map(|_| ())
        });
    }
    // The change arrives behind a full read queue.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bob = address("bob");
    let synced = tokio::time::timeout(
        Duration::from_secs(120),
        log.sync(&bob, Some(&record(&bob, 1, 2)), 3),
    )
    .await
    .expect("a change is answered (hang guard)");
    let reads_before_change = done_reads.load(Ordering::SeqCst);
    synced.expect("the change is recorded");

    let (mut answered, mut refused) = (0, 0);
    let outcomes = tokio::time::timeout(Duration::from_secs(300), reads.join_all())
        .await
        .expect("every read is answered (hang guard)");
    for r in outcomes {
        match r {
            Ok(()) => answered += 1,
            Err(e) if is_full(&e) => refused += 1,
            Err(e) => panic!("a read failed otherwise: {e}"),
        }
    }
    eprintln!(
        "figure: {} reads at once: {answered} answered, {refused} refused at once; the change \
         was committed after {reads_before_change} reads",
        4 * MAX_QUEUED_READS
    );
    assert!(
        refused > 0,
        "the read queue is bounded: {answered} answered"
    );
    assert!(
        reads_before_change < answered,
        "the change went before the queued reads ({reads_before_change} of {answered} first)"
    );

    // Changes beyond their queue: refused as temporary, never queued without bound.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..3 * MAX_QUEUED_WRITES {
        let log = Arc::clone(&log);
        let who = address(&format!("w{i}"));
        writes.spawn(async move {
            let rec = record(&who, 1, 1000 + i as u64);
            log.sync(&who, Some(&rec), 4).await.map(|_| ())
        });
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(600), writes.join_all())
        .await
        .expect("every change is answered (hang guard)");
    let refused = outcomes
        .iter()
        .filter(|r| r.as_ref().is_err_and(is_full))
        .count();
    let recorded = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        refused + recorded,
        outcomes.len(),
        "only refusals of a full queue"
    );
    assert!(refused > 0, "the change queue is bounded");
    assert!(recorded >= MAX_QUEUED_WRITES, "{recorded} recorded");
}
