//! `kst-directory-bench`'s code path at a small size (so the benchmark cannot rot): a real fs
//! directory store in a temporary directory, and the in-memory one. The bench verifies every
//! proof it measures and fails otherwise; these tests check that it ran every measurement,
//! that the figures are sane, and that its tables are well-formed.

use std::sync::Arc;

use kst_bin::bench::directory::{self, MemoryDirectoryStore, Options, Report};
use kst_core::transparency::DirectoryStore;

const WHAT: [&str; 15] = [
    "lookup",
    "absence",
    "lookup-self-check",
    "absence-self-check",
    "v3-found-block",
    "v3-not-found-block",
    "history-1",
    "history-1-self-check",
    "history-10",
    "history-10-self-check",
    "audit-1",
    "audit-1-self-check",
    "audit-10",
    "audit-10-self-check",
    "audit-bulk",
];

/// The catch-up measures that follow [`WHAT`] (each names its epochs after the prefix).
const CATCH_UP: [&str; 2] = ["catch-up-10 http ", "catch-up-10 reply "];

fn small(disk_path: std::path::PathBuf) -> Options {
    Options {
        sizes: vec![100, 200],
        epoch_size: 10,
        tail_epoch_size: 8,
        samples: 20,
        verifications: 30,
        audit_seconds: 0.5,
        disk_path,
        min_free_disk: 0,
        max_used_disk: u64::MAX,
        min_free_ram: 0,
        progress: false,
    }
}

/// Checks a report of [`small`]'s sizes.
fn check(report: &Report, opts: &Options) {
    assert_eq!(report.stopped, None);
    let entries: Vec<u64> = report.sizes.iter().map(|s| s.entries).collect();
    assert_eq!(entries, opts.sizes);
    let mut last_epoch = 0;
    for size in &report.sizes {
        assert!(size.epoch > last_epoch + 10, "ten tail epochs per size");
        last_epoch = size.epoch;
        assert!(size.fill.bulk_epochs >= 1 && size.fill.bulk_epoch_size <= opts.epoch_size);
        assert_eq!(size.fill.tail_epoch_size, opts.tail_epoch_size);
        assert!(size.rss_kib > 0 && size.rss_peak_kib >= size.rss_kib);
        let what: Vec<&str> = size.measures.iter().map(|m| m.what.as_str()).collect();
        assert_eq!(what[..WHAT.len()], WHAT, "every measurement, in order");
        // Then the catch-up answers, one measure per answer (`what from->to` and `what
        // from->to thread`, or `what from too-far`), ten tail epochs behind over HTTP and in
        // a reply.
        for prefix in CATCH_UP {
            assert!(
                what[WHAT.len()..].iter().any(|w| w.starts_with(prefix)),
                "{prefix} measured: {what:?}"
            );
        }
        assert!(
            what[WHAT.len()..]
                .iter()
                .all(|w| w.starts_with("catch-up-")),
            "{what:?}"
        );
        for m in &size.measures {
            // A refusal, or how long an answer held the directory's thread (a head asked
            // for meanwhile waited that long).
            if m.what.ends_with("too-far") || m.what.ends_with(" thread") {
                assert!(m.generate.is_some() && m.verify.is_none(), "{m:?}");
                continue;
            }
            assert!(m.bytes_p50 > 0 && m.bytes_max >= m.bytes_p50, "{m:?}");
            if let Some(answer) = m.answer_bytes {
                assert!(
                    answer > m.bytes_p50,
                    "the answer text carries the proof: {m:?}"
                );
            }
            match m.what.as_str() {
                "lookup" | "absence" | "history-1" => {
                    assert_eq!(m.generate.unwrap().n, opts.samples, "{m:?}");
                    assert_eq!(m.verify.unwrap().n, opts.verifications, "{m:?}");
                }
                "history-10" => assert_eq!(m.verify.unwrap().n, opts.verifications, "{m:?}"),
                "lookup-self-check"
                | "absence-self-check"
                | "history-1-self-check"
                | "history-10-self-check" => {
                    assert!(m.generate.is_none(), "{m:?}");
                    assert_eq!(m.verify.unwrap().n, opts.verifications, "{m:?}");
                }
                "audit-1-self-check" | "audit-10-self-check" => {
                    assert!(m.generate.is_none() && m.verify.unwrap().n >= 1, "{m:?}");
                }
                w if w.starts_with("audit") || w.starts_with("catch-up-") => {
                    assert!(
                        m.generate.unwrap().n >= 1 && m.verify.unwrap().n >= 1,
                        "{m:?}"
                    )
                }
                _ => assert!(m.generate.is_none() && m.verify.is_none(), "{m:?}"),
            }
            if let Some(t) = m.verify {
                assert!(t.p99 >= t.p50 && !t.p50.is_zero(), "{m:?}");
            }
        }
        let by = |w: &str| size.measures.iter().find(|m| m.what == w).unwrap();
        // Three VRF proofs in a lookup proof, one in an absence proof, 80 bytes each.
        assert_eq!(by("lookup").vrf_bytes, Some(240));
        assert_eq!(by("absence").vrf_bytes, Some(80));
        assert!(by("history-10").bytes_p50 > by("history-1").bytes_p50);
        assert!(by("audit-10").bytes_p50 > by("audit-1").bytes_p50);
        assert!(by("v3-found-block").bytes_p50 > by("lookup").bytes_p50);
    }
    let text = report.to_markdown();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
    // Two headers with their rules, one fill row per size, one proof row per measurement.
    assert_eq!(
        rows.len(),
        4 + report
            .sizes
            .iter()
            .map(|s| 1 + s.measures.len())
            .sum::<usize>(),
        "{text}"
    );
    let fill_columns = Report::FILL_HEADER
        .lines()
        .next()
        .unwrap()
        .matches('|')
        .count();
    let proof_columns = Report::PROOF_HEADER
        .lines()
        .next()
        .unwrap()
        .matches('|')
        .count();
    for row in &rows {
        let n = row.matches('|').count();
        assert!(n == fill_columns || n == proof_columns, "{row}");
    }
    assert!(rows.iter().any(|r| r.contains("| history-10 |")), "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_bench_measures_verified_proofs_on_the_fs_store() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn DirectoryStore> = Arc::new(kst_fs::FsDirectoryStore::new(dir.path()));
    let opts = small(dir.path().to_path_buf());
    let report = directory::run(store, "fs", &opts).await.unwrap();
    check(&report, &opts);
    assert!(
        dir.path()
            .join("kt")
            .join(directory::DOMAIN)
            .join("root.v3")
            .exists(),
        "the directory is on disk"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_bench_measures_verified_proofs_in_memory() {
    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let opts = small("/".into());
    let report = directory::run(store, "memory", &opts).await.unwrap();
    check(&report, &opts);
}

#[tokio::test(flavor = "current_thread")]
async fn the_bench_stops_filling_when_the_disk_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn DirectoryStore> = Arc::new(kst_fs::FsDirectoryStore::new(dir.path()));
    let mut opts = small(dir.path().to_path_buf());
    opts.min_free_disk = u64::MAX;
    let report = directory::run(store, "fs", &opts).await.unwrap();
    assert!(report.sizes.is_empty());
    let why = report.stopped.clone().expect("stopped");
    assert!(
        why.contains("stopped at 0 addresses") && why.contains("MB free"),
        "{why}"
    );
    assert!(report.to_markdown().contains(&why));
}

#[tokio::test(flavor = "current_thread")]
async fn the_bench_refuses_a_store_that_holds_the_directory_already() {
    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let mut opts = small("/".into());
    opts.sizes = vec![30];
    directory::run(Arc::clone(&store), "memory", &opts)
        .await
        .unwrap();
    let again = directory::run(store, "memory", &opts).await.unwrap_err();
    assert!(again.to_string().contains("use a fresh one"), "{again:#}");
}

/// Red team round 3 (issue 18): a `too-far` answer cost the server a walk of up to about
/// 210 000 tree nodes (the first step counted against the whole answer budget, 4 MiB / 80
/// bytes per element) before it refused, on every request `?since=E&steps=1`. The first
/// step is now capped at `FIRST_STEP_MAX_ELEMENTS`: a larger one is refused after at most
/// `4 * FIRST_STEP_MAX_ELEMENTS + 64` node reads, counted by the step planner
/// (`DomainLog::step_reads`). Here the step from epoch 1 is larger than the cap but within
/// the HTTP budget: before the cap it was counted whole and built (no refusal at all).
#[tokio::test(flavor = "current_thread")]
async fn rt18_a_too_far_refusal_reads_a_bounded_number_of_nodes() {
    use kst_core::transparency::answer::{
        FIRST_STEP_MAX_ELEMENTS, HTTP_STEP_BUDGET, STEP_ELEMENT_BYTES,
    };
    use kst_core::transparency::storage::StoredDirectory;
    use kst_core::transparency::{DomainLog, KeyDirectory, LogKeys};

    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    // Epoch 1: 10 000 addresses; epoch 2: 10 000 more (a step of about 20 000 elements, more
    // than the cap); epoch 3: one more (a small step).
    for (from, to) in [(0, 10_000), (10_000, 20_000), (20_000, 20_001)] {
        tree.publish(&directory::fill_changes(from, to).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(tree.current().await.unwrap().0, 3);
    let big = tree
        .audit_step_count(1, usize::MAX / 8)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "the step from epoch 1: {} elements ({} inserted)",
        big.elements(),
        big.inserted
    );
    assert!(
        big.elements() > FIRST_STEP_MAX_ELEMENTS
            && big.elements() <= HTTP_STEP_BUDGET.bytes / STEP_ELEMENT_BYTES
            && big.inserted <= HTTP_STEP_BUDGET.changes,
        "the fixture: a first step over the cap, within the HTTP budget ({big:?})"
    );

    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let probe = directory::address(20_000).unwrap();
    let answer = log
        .answer_stepped(&probe, Some(1), Some(HTTP_STEP_BUDGET), 1_800_000_000)
        .await
        .unwrap();
    let reads = log.step_reads();
    eprintln!("the too-far refusal read {reads} tree nodes");
    assert_eq!(answer.too_far, Some(1), "refused unbuilt");
    assert!(answer.append_only.is_none());
    assert!(
        reads <= (4 * FIRST_STEP_MAX_ELEMENTS + 64) as u64,
        "the refusal read {reads} nodes"
    );
    // A small first step is answered as before, its reads counted too.
    let answer = log
        .answer_stepped(&probe, Some(2), Some(HTTP_STEP_BUDGET), 1_800_000_000)
        .await
        .unwrap();
    assert_eq!(answer.too_far, None);
    let proof = answer.append_only.expect("the step from epoch 2");
    assert!(proof.from == 2 && proof.step.is_none());
    assert!(log.step_reads() > reads);
}

/// Red-team round 5: an epoch whose own append-only step is over `FIRST_STEP_MAX_ELEMENTS`
/// answered `too-far` to every client one epoch behind it, sending a client that follows
/// every epoch to a restart (or, without witnesses, to a new pin). The step of the newest
/// epoch is now measured against the answer's budget alone: the client one epoch behind gets
/// the proof (and it verifies), whatever the operator's `step_max_*`; a budget it does not fit
/// (a version 3 reply's 1 MiB) is still `too-far`, and asking again costs no second walk.
/// Once a later epoch exists the large step is an old one and the first-step cap applies
/// again (`rt18_a_too_far_refusal_reads_a_bounded_number_of_nodes`).
#[tokio::test(flavor = "current_thread")]
async fn one_epoch_over_the_first_step_cap_still_answers_a_client_one_epoch_behind() {
    use kst_core::transparency::answer::{
        FIRST_STEP_MAX_ELEMENTS, HTTP_STEP_BUDGET, REPLY_STEP_BUDGET, STEP_ELEMENT_BYTES,
        StepBudget,
    };
    use kst_core::transparency::storage::StoredDirectory;
    use kst_core::transparency::{DomainLog, KeyDirectory, LogKeys};

    const NOW: u64 = 1_800_000_000;
    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    // Epoch 1: 10 000 addresses; epoch 2, the newest: 10 000 more, a step over the cap.
    for (from, to) in [(0, 10_000), (10_000, 20_000)] {
        tree.publish(&directory::fill_changes(from, to).unwrap())
            .await
            .unwrap();
    }
    let big = tree
        .audit_step_count(1, usize::MAX / 8)
        .await
        .unwrap()
        .unwrap();
    assert!(
        big.elements() > FIRST_STEP_MAX_ELEMENTS
            && big.elements() <= HTTP_STEP_BUDGET.bytes / STEP_ELEMENT_BYTES
            && big.elements() > REPLY_STEP_BUDGET.bytes / STEP_ELEMENT_BYTES,
        "the fixture: the newest epoch's step is over the cap and a reply's budget, within \
         HTTP's ({big:?})"
    );

    // The operator's limit is far below one epoch: it bounds how far one answer reaches, not
    // the step of the newest epoch.
    let copy = LogKeys::parse(&keys.to_file()).unwrap();
    let log = DomainLog::open(Arc::clone(&store), copy)
        .await
        .unwrap()
        .with_step_limit(StepBudget {
            bytes: 64 << 10,
            changes: 1_000,
            epochs: 1,
        });
    let remembered = log
        .head_at(1, NOW)
        .await
        .unwrap()
        .expect("the head of epoch 1");
    let probe = directory::address(19_999).unwrap();
    let answer = log
        .answer_stepped(&probe, Some(1), Some(HTTP_STEP_BUDGET), NOW)
        .await
        .unwrap();
    assert_eq!(
        answer.too_far, None,
        "a client one epoch behind is answered"
    );
    let proof = answer.append_only.as_ref().expect("the step from epoch 1");
    assert!(
        proof.from == 1 && proof.step.is_none(),
        "the whole way to epoch 2"
    );
    assert_eq!(answer.head.head.epoch, 2);
    answer.verify_extends(&remembered.head).await.unwrap();

    // In a reply (1 MiB) the same step does not fit: `too-far`, counted once per epoch.
    let refused = log
        .answer_stepped(&probe, Some(1), Some(REPLY_STEP_BUDGET), NOW)
        .await
        .unwrap();
    assert_eq!((refused.too_far, refused.append_only), (Some(1), None));
    let reads = log.step_reads();
    let again = log
        .answer_stepped(&probe, Some(1), Some(REPLY_STEP_BUDGET), NOW)
        .await
        .unwrap();
    assert_eq!(again.too_far, Some(1));
    assert_eq!(log.step_reads(), reads, "the newest step's count is kept");

    // A later epoch: the large step is an old one now, capped again.
    drop(log);
    tree.publish(&directory::fill_changes(20_000, 20_001).unwrap())
        .await
        .unwrap();
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let old = log
        .answer_stepped(&probe, Some(1), Some(HTTP_STEP_BUDGET), NOW)
        .await
        .unwrap();
    assert_eq!(old.too_far, Some(1));
    assert!(log.step_reads() <= (4 * FIRST_STEP_MAX_ELEMENTS + 64) as u64);
    let next = log
        .answer_stepped(&probe, Some(2), Some(HTTP_STEP_BUDGET), NOW)
        .await
        .unwrap();
    assert!(next.too_far.is_none() && next.append_only.is_some());
}
