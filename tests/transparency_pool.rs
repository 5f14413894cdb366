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
    let keys_text = std::fs::read_to_string(pool.path("log-example.test.key")).unwrap();
    let head_key = LogKeys::parse(&keys_text).unwrap().head.public_key();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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
