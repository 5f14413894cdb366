//! Several OS processes publishing to one directory at once lose nothing.
//!
//! The test binary re-executes itself (`std::env::current_exe()`) with [`WRITER_ENV`] set; in
//! that mode this same test acts as one writer instead of the coordinator.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kst_core::conformance::{assert_test_record, test_key};
use kst_core::{KeyStore, PublishOutcome};
use kst_fs::FsStore;

use crate::support::addr;

/// Set in a child: `<store dir>\t<gate dir>\t<writer number>`.
const WRITER_ENV: &str = "KST_FS_TEST_WRITER";
/// This test's name, for the child's test filter.
const TEST_NAME: &str = "processes::writer_processes_publishing_at_once_lose_nothing";
const WRITERS: u32 = 3;
const ROUNDS: u64 = 15;
const ADDRESSES: usize = 3;
/// Series every writer publishes (the same publications: redeliveries racing across processes).
const SHARED_SERIES: u32 = 99;
/// How long a child waits for the start signal before giving up (not an assertion on timing:
/// only a guard against a child that would otherwise wait forever).
const GATE_TIMEOUT: Duration = Duration::from_secs(300);

fn addresses() -> Vec<kst_core::Address> {
    (0..ADDRESSES)
        .map(|i| addr(&format!("proc-{i}@example.net")))
        .collect()
}

fn own_series(writer: u32) -> u32 {
    100 + writer
}

#[test]
fn writer_processes_publishing_at_once_lose_nothing() {
    if let Ok(spec) = std::env::var(WRITER_ENV) {
        return writer(&spec);
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let store_dir = tmp.path().join("store");
    let gate = tmp.path().join("gate");
    fs::create_dir(&gate).unwrap();

    let exe = std::env::current_exe().expect("path of the test binary");
    let mut children: Vec<(u32, Child)> = (0..WRITERS)
        .map(|w| {
            let log = fs::File::create(gate.join(format!("log-{w}"))).unwrap();
            let child = Command::new(&exe)
                .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(
                    WRITER_ENV,
                    format!("{}\t{}\t{w}", store_dir.display(), gate.display()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start a writer process");
            (w, child)
        })
        .collect();

    // Start them together once all have opened the store.
    while (0..WRITERS).any(|w| !gate.join(format!("ready-{w}")).exists()) {
        for (w, c) in &mut children {
            if let Some(status) = c.try_wait().unwrap() {
                panic!("writer {w} exited early ({status}):\n{}", log_of(&gate, *w));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    fs::write(gate.join("go"), b"").unwrap();
    for (w, mut c) in children {
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "writer {w} failed ({status}):\n{}",
            log_of(&gate, w)
        );
    }

    // Outcomes reported by the writers, per address: version -> (series, n) of Published ones.
    let addrs = addresses();
    let mut published: Vec<BTreeMap<u64, (u32, u64)>> = vec![BTreeMap::new(); ADDRESSES];
    let mut shared: BTreeMap<(usize, u64), Vec<(bool, u64)>> = BTreeMap::new();
    let mut reported = 0;
    for w in 0..WRITERS {
        let out = fs::read_to_string(gate.join(format!("out-{w}"))).unwrap();
        for line in out.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let [i, kind, version, series, n] = f[..] else {
                panic!("bad line from writer {w}: {line:?}")
            };
            let (i, version): (usize, u64) = (i.parse().unwrap(), version.parse().unwrap());
            let (series, n): (u32, u64) = (series.parse().unwrap(), n.parse().unwrap());
            let is_published = kind == "P";
            reported += 1;
            if series == SHARED_SERIES {
                shared
                    .entry((i, n))
                    .or_default()
                    .push((is_published, version));
            } else {
                assert!(
                    is_published,
                    "writer {w}: its own publication {n} for {} was not Published",
                    addrs[i]
                );
            }
            if is_published && let Some(other) = published[i].insert(version, (series, n)) {
                panic!(
                    "{} v{version} was given to two publications: {other:?} and {:?}",
                    addrs[i],
                    (series, n)
                );
            }
        }
    }
    let per_address = ROUNDS * (u64::from(WRITERS) + 1);
    assert_eq!(
        reported,
        u64::from(WRITERS) * ROUNDS * 2 * ADDRESSES as u64,
        "every writer reports every publication"
    );
    for ((i, n), outs) in &shared {
        assert_eq!(outs.len(), WRITERS as usize);
        let accepted: Vec<u64> = outs.iter().filter(|o| o.0).map(|o| o.1).collect();
        assert_eq!(
            accepted.len(),
            1,
            "shared publication {n} for {} must be Published exactly once: {outs:?}",
            addrs[*i]
        );
        assert!(
            outs.iter().all(|o| o.1 == accepted[0]),
            "every redelivery of shared publication {n} for {} must name v{}: {outs:?}",
            addrs[*i],
            accepted[0]
        );
    }

    // The store holds exactly what was accepted: versions 1..=n, each the reported publication.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(FsStore::open(&store_dir)).unwrap();
    for (i, a) in addrs.iter().enumerate() {
        let history = rt.block_on(store.history(a)).unwrap();
        assert_eq!(history.len() as u64, per_address, "history length of {a}");
        assert_eq!(published[i].len() as u64, per_address, "Published for {a}");
        for (idx, r) in history.iter().enumerate() {
            assert_eq!(r.version, idx as u64 + 1, "{a}: versions must be 1..=n");
            let claimed = assert_test_record("history", r);
            assert_eq!(
                published[i].get(&r.version),
                Some(&claimed),
                "{a} v{}: the history holds another publication than the one reported",
                r.version
            );
        }
        assert_eq!(
            rt.block_on(store.get(a)).unwrap().as_ref(),
            history.last(),
            "{a}: current key"
        );
    }
}

fn log_of(gate: &Path, w: u32) -> String {
    fs::read_to_string(gate.join(format!("log-{w}"))).unwrap_or_default()
}

/// Child mode: open the store, signal readiness, wait for the start, publish, report.
fn writer(spec: &str) {
    let mut parts = spec.split('\t');
    let (Some(store_dir), Some(gate), Some(w)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {WRITER_ENV}: {spec:?}");
    };
    let (store_dir, gate, w) = (
        PathBuf::from(store_dir),
        PathBuf::from(gate),
        w.parse::<u32>().unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(FsStore::open(&store_dir))
        .expect("open the store");
    fs::write(gate.join(format!("ready-{w}")), b"").unwrap();
    let waiting = Instant::now();
    while !gate.join("go").exists() {
        assert!(
            waiting.elapsed() < GATE_TIMEOUT,
            "writer {w}: no start signal"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let addrs = addresses();
    let mut report = String::new();
    rt.block_on(async {
        for n in 1..=ROUNDS {
            for (i, a) in addrs.iter().enumerate() {
                // Alternate the order so that the processes also race on the shared ones.
                let mut series = [own_series(w), SHARED_SERIES];
                if (n + u64::from(w)).is_multiple_of(2) {
                    series.reverse();
                }
                for s in series {
                    let outcome = store
                        .publish(test_key(a, s, n))
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}: publish to {a}: {e}"));
                    let (kind, r) = match &outcome {
                        PublishOutcome::Published(r) => ("P", r),
                        PublishOutcome::Unchanged(r) => ("U", r),
                    };
                    report.push_str(&format!("{i} {kind} {} {s} {n}\n", r.version));
                }
            }
        }
    });
    fs::write(gate.join(format!("out-{w}")), report).unwrap();
}
