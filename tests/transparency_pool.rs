//! Key transparency through a pool (issue 18): three `kst serve` (LMTP) on one store with
//! `[transparency]`, loaded at once by two `kst bench lmtp` runs spread over the three
//! instances. Both publish `user000000..user000029@example.test` (the same addresses, each with its
//! own new keys: two publications of one address race through different instances), and one
//! also `user30..user44` (addresses only it publishes). Then `kst keys delete` (through the
//! directory) and `kst migrate` (records nothing: nothing is missing).
//!
//! Checked afterwards, against the store and the directory read in this process and over
//! HTTP:
//! - every publication the store accepted (its history) is in the directory, in the store's
//!   order, and each address's latest entry commits to the key the store serves;
//! - the epochs the three instances committed (each logs one line per epoch with its root)
//!   are 1..=N, each committed once, and N is the signed head's epoch;
//! - the append-only proof from epoch 1 to N verifies against those roots;
//! - the lookup answer of every instance verifies for the key the store serves.
//!
//! `a_pool_of_three_records_one_history` runs on the fs store, `..._on_postgres` on a fresh
//! PostgreSQL database.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use kst_core::transparency::answer::{LogAnswer, Served};
use kst_core::transparency::{
    DirectoryEntry, DirectoryStore, DomainLog, EntryState, Head, LogKeys, verify,
};
use kst_core::{Address, AddressPolicy, KeyStore};
use kst_tests::serve::{ServeProcess, free_port, http_get};
use kst_tests::{TestDb, code, kst_binary, stderr};

const DOMAIN: &str = "example.test";
/// Addresses both load runs publish.
const SHARED: usize = 30;
/// Addresses only the second run publishes (after the shared ones).
const OWN: usize = 15;
const INSTANCES: usize = 3;

struct Pool {
    dir: tempfile::TempDir,
    bin: PathBuf,
    config: PathBuf,
    lmtp: Vec<String>,
    http: Vec<std::net::SocketAddr>,
    serves: Vec<ServeProcess>,
    db: Option<TestDb>,
}

impl Pool {
    fn start(postgres: bool) -> Pool {
        let bin = kst_binary();
        let dir = tempfile::Builder::new()
            .prefix("kst-transparency-pool-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        let db = postgres.then(TestDb::new);
        let store = match &db {
            Some(db) => format!("backend = \"postgres\"\nurl = \"{}\"", db.url),
            None => format!("backend = \"fs\"\npath = \"{}\"", p.join("keys").display()),
        };
        let config = p.join("kst.toml");
        std::fs::write(
            &config,
            format!(
                r#"[kst]
domains = ["{DOMAIN}"]
trusted_mta_hosts = ["localhost"]

[store]
{store}

[limits]
per_sender = 0
per_account = 0
per_source_ip = 0
per_sender_query = 0

[mailer]
kind = "spool"
path = "{outbox}"

[transparency]
key_file = "{keys}"

[log]
format = "json"
level = "info"
"#,
                outbox = p.join("outbox").display(),
                keys = p.join("log-{domain}.key").display(),
            ),
        )
        .unwrap();
        let mut pool = Pool {
            bin,
            config,
            lmtp: Vec::new(),
            http: Vec::new(),
            serves: Vec::new(),
            db,
            dir,
        };
        let out = pool.kst(&[
            "log",
            "keygen",
            DOMAIN,
            "--output",
            pool.path("log-example.test.key").to_str().unwrap(),
        ]);
        assert_eq!(code(&out), 0, "kst log keygen: {}", stderr(&out));
        // The schema before the pool starts (so no instance waits on its lock).
        let out = pool.kst(&["migrate"]);
        assert_eq!(code(&out), 0, "kst migrate: {}", stderr(&out));
        for i in 0..INSTANCES {
            let lmtp = format!("unix:{}", pool.path(&format!("lmtp-{i}.sock")).display());
            let http = free_port();
            let config = pool.config.clone();
            let serve = ServeProcess::start_binary(
                &pool.bin,
                pool.path(&format!("serve-{i}.log")),
                http,
                |cmd| {
                    cmd.arg("--config")
                        .arg(&config)
                        .env("KST_LMTP__LISTEN", &lmtp)
                        .env("KST_HTTP__LISTEN", http.to_string());
                },
            );
            pool.lmtp.push(lmtp);
            pool.http.push(http);
            pool.serves.push(serve);
        }
        pool
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the checks after a run need: the directory's key file (its text), its head key,
    /// and a runtime to read the stores on.
    fn checker(&self) -> (String, [u8; 32], tokio::runtime::Runtime) {
        let keys_text = std::fs::read_to_string(self.path("log-example.test.key")).unwrap();
        let head_key = LogKeys::parse(&keys_text).unwrap().head.public_key();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        (keys_text, head_key, runtime)
    }

    /// `kst --config FILE ARGS`.
    fn kst(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("KST_CONFIG")
            .output()
            .unwrap()
    }

    /// One `kst bench lmtp` over the three instances: `publications` new keys for
    /// `user0..`; its publication report.
    fn load(&self, publications: usize) -> serde_json::Value {
        let out = Command::new(&self.bin)
            .args(["bench", "lmtp", "--connect", &self.lmtp.join(",")])
            .args([
                "--concurrency",
                "6",
                "--retrievals",
                "0",
                "--json",
                "--quiet",
            ])
            .args(["--publications", &publications.to_string()])
            .args(["--domain", DOMAIN, "--retry-temporary", "60"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "kst bench lmtp: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kst bench lmtp --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The epochs the instances (and the commands whose logs are in `more`) logged as
    /// committed, with their roots; panics on an epoch committed twice.
    fn committed_epochs(&self, more: &[String]) -> BTreeMap<u64, [u8; 32]> {
        let mut epochs = BTreeMap::new();
        let logs = self
            .serves
            .iter()
            .map(|s| s.log())
            .chain(more.iter().cloned());
        for (i, log) in logs.enumerate() {
            for line in log.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let fields = if v["fields"].is_object() {
                    &v["fields"]
                } else {
                    &v
                };
                if fields["message"] != "key directory epoch committed" {
                    continue;
                }
                let epoch = fields["epoch"].as_u64().expect("epoch");
                let root =
                    kst_core::transparency::answer::hex32(fields["root"].as_str().expect("root"))
                        .expect("root hex");
                if epochs.insert(epoch, root).is_some() {
                    let all: Vec<String> = self
                        .serves
                        .iter()
                        .map(|s| s.log())
                        .chain(more.iter().cloned())
                        .enumerate()
                        .flat_map(|(n, log)| {
                            log.lines()
                                .filter(|l| l.contains(&format!("\"epoch\":{epoch},")))
                                .map(|l| format!("log {n}: {l}"))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    panic!(
                        "epoch {epoch} committed twice (log {i}):\n{}",
                        all.join("\n")
                    );
                }
            }
        }
        epochs
    }
}

fn user(i: usize) -> Address {
    AddressPolicy::default()
        .normalize(&format!("user{i:06}@{DOMAIN}"))
        .unwrap()
}

#[test]
fn a_pool_of_three_records_one_history() {
    run(Pool::start(false));
}

#[test]
fn a_pool_of_three_records_one_history_on_postgres() {
    run(Pool::start(true));
}

fn run(pool: Pool) {
    // Two load runs at once over the three instances: the shared addresses race.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| pool.load(SHARED));
        let b = s.spawn(|| pool.load(SHARED + OWN));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (report, n) in [(&a, SHARED), (&b, SHARED + OWN)] {
        assert_eq!(
            report["outcomes"]["published"].as_u64(),
            Some(n as u64),
            "every publication confirmed: {report}"
        );
    }
    // A deletion through the operator's command is recorded too.
    let deleted = user(SHARED + OWN - 1);
    let out = pool.kst(&["keys", "delete", deleted.as_str()]);
    assert_eq!(code(&out), 0, "kst keys delete: {}", stderr(&out));
    let delete_log = stderr(&out);
    // Nothing is missing, so `kst migrate` records nothing.
    let out = pool.kst(&["migrate"]);
    assert_eq!(code(&out), 0, "kst migrate: {}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!(
            "key directory: {} address(es) checked, 0 recorded",
            SHARED + OWN - 1
        )),
        "{printed}"
    );

    let epochs = pool.committed_epochs(&[delete_log]);
    let (keys_text, head_key, runtime) = pool.checker();
    runtime.block_on(async {
        let (store, dirs): (Arc<dyn KeyStore>, Arc<dyn DirectoryStore>) = match &pool.db {
            Some(db) => (
                Arc::new(kst_postgres::PostgresStore::connect(&db.url).await.unwrap()),
                Arc::new(
                    kst_postgres::PgDirectoryStore::connect(&db.url, 2)
                        .await
                        .unwrap(),
                ),
            ),
            None => (
                Arc::new(kst_fs::FsStore::open(pool.path("keys")).await.unwrap()),
                Arc::new(kst_fs::FsDirectoryStore::new(pool.path("keys"))),
            ),
        };
        let log = DomainLog::open(dirs, LogKeys::parse(&keys_text).unwrap())
            .await
            .unwrap();

        // Every accepted publication, in the store's order; the latest is what is served.
        let mut recorded_in = Vec::new();
        for i in 0..SHARED + OWN {
            let address = user(i);
            let history = log.entries(&address).await.unwrap();
            recorded_in.extend(history.iter().map(|(e, _)| *e));
            let entries: Vec<&DirectoryEntry> = history.iter().map(|(_, e)| e).collect();
            let stored = store.history(&address).await.unwrap();
            if address == deleted {
                // The deletion withdrew the earlier values (docs/TRANSPARENCY.md, "Deletion"):
                // `entries` shows the deletion only, the history proof every version.
                let versions = log
                    .history(&address, 0)
                    .await
                    .unwrap()
                    .expect("a history")
                    .verify(&head_key, &address)
                    .unwrap_or_else(|e| panic!("{address}: the history: {e}"));
                let (newest, older) = versions.split_first().expect("versions");
                recorded_in.extend(older.iter().map(|v| v.epoch));
                assert!(
                    older.iter().all(|v| v.entry.is_none()),
                    "{address}: the earlier values are withdrawn"
                );
                let last = newest.entry.as_ref().expect("the deletion's entry");
                assert_eq!(
                    (last.state, last.version),
                    (EntryState::Deleted, older.len() as u64 + 1),
                    "{address}: the deletion"
                );
                assert_eq!(
                    entries,
                    vec![last],
                    "{address}: entries show the deletion only"
                );
                assert!(stored.is_empty());
                continue;
            }
            let expected: Vec<DirectoryEntry> =
                stored.iter().map(DirectoryEntry::for_record).collect();
            assert_eq!(
                entries,
                expected.iter().collect::<Vec<_>>(),
                "{address}: the directory's history is not the store's"
            );
            assert_eq!(
                stored.len(),
                if i < SHARED { 2 } else { 1 },
                "{address}: the store's history"
            );
        }

        // Epochs 1..=N, each committed once, N the head's; every epoch recorded something.
        let (&last, _) = epochs.last_key_value().expect("epochs committed");
        assert_eq!(
            epochs.keys().copied().collect::<Vec<_>>(),
            (1..=last).collect::<Vec<_>>(),
            "the epochs are not contiguous"
        );
        let head = log.head(0).await.unwrap();
        assert_eq!(
            (head.head.epoch, head.head.root_hash),
            (last, epochs[&last]),
            "the head is the last epoch committed"
        );
        recorded_in.sort_unstable();
        recorded_in.dedup();
        assert_eq!(
            recorded_in,
            (1..=last).collect::<Vec<_>>(),
            "an empty epoch"
        );
        // Fewer epochs than changes: concurrent changes shared epochs (group commit).
        let changes = 2 * SHARED + OWN + 1;
        eprintln!("{changes} changes in {last} epochs");

        // The append-only proof over every epoch.
        let vrf = log.vrf_public_key().unwrap();
        let at = |epoch: u64| Head {
            domain: DOMAIN.to_string(),
            epoch,
            root_hash: epochs[&epoch],
            vrf_public_key: vrf,
            signed_at: 0,
        };
        let intermediate: Vec<[u8; 32]> = (2..last).map(|e| epochs[&e]).collect();
        let proof = log.audit(1, last).await.unwrap();
        verify::verify_append_only(&at(1), &at(last), &intermediate, proof)
            .await
            .unwrap_or_else(|e| panic!("the append-only proof from 1 to {last}: {e}"));

        // Each instance's HTTP answer proves the key the store serves.
        for i in 0..SHARED + OWN - 1 {
            let address = user(i);
            let current = store.get(&address).await.unwrap().expect("a key");
            let (status, body) = http_get(
                pool.http[i % INSTANCES],
                &format!("/.well-known/kst/log/{DOMAIN}/lookup/{address}"),
            );
            assert_eq!(status, 200, "{address}: {body}");
            let answer = LogAnswer::parse(&body).expect("the answer parses");
            let entry = answer
                .verify(&head_key, &address, Served::Key(&current.key))
                .await
                .unwrap_or_else(|e| panic!("{address} through instance {}: {e}", i % INSTANCES))
                .expect("an entry");
            assert_eq!(entry, DirectoryEntry::for_record(&current));
        }
    });
}

/// Red team (round 7, the fs directory commit answered at its journal frame): one instance of
/// the pool killed with SIGKILL at random moments (and started again at once) while the pool
/// takes a flood of publications. Afterwards: every publication confirmed (the load's MTA
/// retries what a killed instance never answered), the store serving every address's key and
/// the directory's latest entry for every address committing to it, no torn epoch (the
/// append-only proof over every epoch verifies against the stored heads' roots), and every
/// instance's lookup answer verifies. A kill inside a frame's write left a torn frame after
/// the root (red-1: every read of the pool failed on it, so nothing could commit again).
#[test]
fn a_pool_member_killed_at_random_during_a_flood_loses_no_confirmed_publication() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;
    const PUBLICATIONS: usize = 1000;
    let pool = Pool::start(false);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        | 1;
    eprintln!("kill seed {seed}");
    let done = AtomicBool::new(false);
    let kills = AtomicU32::new(0);
    let (report, restarted) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            // Done also when the load panics, so the killer stops.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
            let _done = Done(&done);
            pool.load(PUBLICATIONS)
        });
        let killer = s.spawn(|| {
            let mut rng = seed;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                rng
            };
            let mut current: Option<ServeProcess> = None;
            let mut logs = Vec::new();
            let lmtp = pool.lmtp[0].clone();
            let http = pool.http[0];
            // The kills start once the flood is under way (the load connects to every
            // instance first, once; its retries reconnect).
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::SeqCst)
                && std::time::Instant::now() < deadline
                && pool.serves[1..]
                    .iter()
                    .map(|s| s.log().matches("key directory epoch committed").count())
                    .sum::<usize>()
                    < 10
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50 + u64::from(next() % 400)));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                match &current {
                    Some(serve) => serve.signal("-KILL"),
                    None => pool.serves[0].signal("-KILL"),
                }
                if let Some(mut serve) = current.take() {
                    serve.wait();
                    logs.push(serve.log());
                }
                let n = kills.fetch_add(1, Ordering::SeqCst) + 1;
                let config = pool.config.clone();
                let lmtp = lmtp.clone();
                current = Some(ServeProcess::start_binary(
                    &pool.bin,
                    pool.path(&format!("serve-0-after-kill-{n}.log")),
                    http,
                    |cmd| {
                        cmd.arg("--config")
                            .arg(&config)
                            .env("KST_LMTP__LISTEN", &lmtp)
                            .env("KST_HTTP__LISTEN", http.to_string());
                    },
                ));
            }
            if let Some(serve) = &current {
                logs.push(serve.log());
            }
            (current, logs)
        });
        (load.join().unwrap(), killer.join().unwrap())
    });
    let kills = kills.load(Ordering::SeqCst);
    eprintln!("{kills} kills; the load: {report}");
    assert!(
        kills >= 2,
        "the flood outlasted at least two kills: {kills}"
    );
    assert_eq!(
        report["outcomes"]["published"].as_u64(),
        Some(PUBLICATIONS as u64),
        "every publication confirmed: {report}"
    );
    let (alive, mut logs) = restarted;
    logs.extend(pool.serves.iter().map(ServeProcess::log));
    let count = |what: &str| logs.iter().map(|l| l.matches(what).count()).sum::<usize>();
    eprintln!(
        "rolled forward by the pool: {} epochs of a killed writer, {} torn frames set aside",
        count("rolled forward an epoch whose writer died"),
        count("the torn frame is set aside")
    );
    let _alive = alive;

    let (keys_text, head_key, runtime) = pool.checker();
    runtime.block_on(async {
        let store: Arc<dyn KeyStore> =
            Arc::new(kst_fs::FsStore::open(pool.path("keys")).await.unwrap());
        let dirs: Arc<dyn DirectoryStore> =
            Arc::new(kst_fs::FsDirectoryStore::new(pool.path("keys")));
        let log = DomainLog::open(dirs, LogKeys::parse(&keys_text).unwrap())
            .await
            .unwrap();
        for i in 0..PUBLICATIONS {
            let address = user(i);
            let current = store
                .get(&address)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{address}: confirmed, and not in the store"));
            let entries = log.entries(&address).await.unwrap();
            let (_, last) = entries
                .last()
                .unwrap_or_else(|| panic!("{address}: confirmed, and not in the directory"));
            assert_eq!(
                *last,
                DirectoryEntry::for_record(&current),
                "{address}: the directory's latest entry is not the key served"
            );
        }
        // No torn epoch: the append-only proof over every epoch, against the stored heads.
        let head = log.head(0).await.unwrap();
        let last = head.head.epoch;
        let mut roots = BTreeMap::new();
        for e in 1..=last {
            let h = log
                .head_at(e, 0)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no head for epoch {e} of {last}"));
            roots.insert(e, h.head.root_hash);
        }
        let vrf = log.vrf_public_key().unwrap();
        let at = |epoch: u64| Head {
            domain: DOMAIN.to_string(),
            epoch,
            root_hash: roots[&epoch],
            vrf_public_key: vrf,
            signed_at: 0,
        };
        if last >= 2 {
            let intermediate: Vec<[u8; 32]> = (2..last).map(|e| roots[&e]).collect();
            let proof = log.audit(1, last).await.unwrap();
            verify::verify_append_only(&at(1), &at(last), &intermediate, proof)
                .await
                .unwrap_or_else(|e| panic!("the append-only proof from 1 to {last}: {e}"));
        }
        eprintln!("{PUBLICATIONS} publications in {last} epochs, {kills} kills");
        // Every instance answers, and its answer verifies for the key served.
        for i in 0..INSTANCES * 3 {
            let address = user(i);
            let current = store.get(&address).await.unwrap().expect("a key");
            let (status, body) = http_get(
                pool.http[i % INSTANCES],
                &format!("/.well-known/kst/log/{DOMAIN}/lookup/{address}"),
            );
            assert_eq!(
                status,
                200,
                "{address} through instance {}: {body}",
                i % INSTANCES
            );
            let answer = LogAnswer::parse(&body).expect("the answer parses");
            answer
                .verify(&head_key, &address, Served::Key(&current.key))
                .await
                .unwrap_or_else(|e| panic!("{address} through instance {}: {e}", i % INSTANCES))
                .expect("an entry");
        }
    });
}
