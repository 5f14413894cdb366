//! Several versions of one key (a second device, a restored backup, an extension of the
//! expiry, a subkey revocation: `kst-core/testdata/keys/merge-*.pub.asc`) published at the same
//! time through a pool of three instances, on each backend: three streams of `kst deliver`
//! processes (Postfix pipe mode, one process per message) on one filesystem directory, one
//! PostgreSQL database, one Redis key prefix. Each stream sends every version, in its own
//! order, and redelivers one.
//!
//! Checked: every confirmation verifies (HMAC with the request's K_auth) and carries the key as
//! merged so far (the same primary key), and the key served at the end holds every subkey, the
//! subkey revocation and the extended expiry, whatever the interleaving (the read-merge-write
//! with compare-and-set on the version). Then a revocation, an older copy and a deletion with a
//! republication: the key stays revoked.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kst_core::client::{self, Verified};
use kst_core::{Address, AddressPolicy};
use kst_tests::{Store, TestDb, TestKst, TestPrefix, code, kst_binary, received_authenticated};

/// Pool instances (parallel `kst deliver` streams).
const INSTANCES: usize = 3;
const ACCOUNT: &str = "alice@example.net";
/// Key IDs of the fixtures' subkeys: encryption A (revoked in one version), encryption B.
const SUBKEY_A: &str = "C8120EBE439610F0";
const SUBKEY_B: &str = "6BEF6D9E9FFA7E11";
const FINGERPRINT: &str = "F8D6C91E302F59BFA605CCB200CF0EEE38AC134D";
/// The extended expiry (2035-01-01).
const EXTENDED: u64 = 2_051_265_600;
const VERSIONS: [&str; 4] = [
    "merge-base",
    "merge-subkey",
    "merge-extended",
    "merge-subrevoked",
];

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

fn fixture(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kst-core/testdata/keys");
    std::fs::read_to_string(dir.join(format!("{name}.pub.asc"))).expect("fixture")
}

/// One publication message of `name` by the account, as the provider's MTA delivers it.
#[derive(Clone)]
struct Job {
    raw: Vec<u8>,
    pending: client::Pending,
}

fn publication(name: &str) -> Job {
    let req = client::build_publication(&addr(ACCOUNT), &fixture(name)).unwrap();
    let mut raw = received_authenticated(ACCOUNT, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    Job {
        raw,
        pending: req.pending,
    }
}

/// Runs one `kst deliver` with its own spool directory; returns the exit code, stderr and the
/// replies.
fn deliver(kst: &TestKst, raw: &[u8], sender: &str, spool: &Path) -> (i32, String, Vec<Vec<u8>>) {
    let mut child = Command::new(kst_binary())
        .args(["deliver", "--sender", sender])
        .args(["--recipient", "keys@example.net", "--config"])
        .arg(&kst.config)
        .env_remove("RUST_LOG")
        .env("KST_MAILER__PATH", spool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(raw)
        .expect("write the message");
    let out = child.wait_with_output().expect("kst runs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(spool)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
    (
        code(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        files.iter().map(|p| std::fs::read(p).unwrap()).collect(),
    )
}

/// Publishes `job` through a fresh `kst deliver` and returns the confirmed (armored) key.
fn publish(kst: &TestKst, job: &Job, spool: &Path) -> String {
    let (exit, stderr, replies) = deliver(kst, &job.raw, ACCOUNT, spool);
    assert_eq!(exit, 0, "kst deliver failed: {stderr}");
    assert_eq!(replies.len(), 1, "one reply per message: {stderr}");
    match client::verify_reply(&job.pending, &replies[0]) {
        Ok(Verified::Published {
            fingerprint,
            armored,
        }) => {
            assert_eq!(fingerprint, FINGERPRINT);
            armored
        }
        other => panic!("a publication was answered {other:?}: {stderr}"),
    }
}

/// What a retrieval through the pool returns now: the served key, validated.
fn served(kst: &TestKst, spool: &Path) -> kst_core::validate::ValidKey {
    let req = client::build_retrieval(&addr("reader@acme.net"), &addr(ACCOUNT));
    let (exit, stderr, replies) = deliver(kst, &req.message, "reader@acme.net", spool);
    assert_eq!(exit, 0, "{stderr}");
    let Ok(Verified::Found { armored, .. }) = client::verify_reply(&req.pending, &replies[0])
    else {
        panic!("the retrieval found nothing: {stderr}");
    };
    kst_core::validate::validate(
        &armored,
        &addr(ACCOUNT),
        &kst_core::validate::KeyPolicy::default(),
        std::time::SystemTime::now(),
    )
    .expect("the served key passes the key policy")
}

fn subkeys(packets: &[u8]) -> Vec<String> {
    kst_core::certificate::Certificate::from_binary(packets)
        .unwrap()
        .handles()
        .subkeys
        .into_iter()
        .map(|h| h.key_id)
        .collect()
}

/// `gpg --with-colons` validity of each subkey of `armored`, in order.
fn gpg_subkey_validity(armored: &str, dir: &Path) -> Vec<(String, String)> {
    let home = dir.join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let file = dir.join("served.asc");
    std::fs::write(&file, armored).unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(&home)
        .args(["--batch", "--with-colons", "--import-options", "show-only"])
        .arg("--import")
        .arg(&file)
        .output()
        .expect("gpg");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("sub:"))
        .map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[1].to_string(), f[4].to_string())
        })
        .collect()
}

fn run(kst: &TestKst) {
    let spools = kst.dir.path().join("spools");
    // Stream s sends every version, starting at version s, and then redelivers its first.
    let plans: Vec<Vec<Job>> = (0..INSTANCES)
        .map(|s| {
            let mut jobs: Vec<Job> = (0..VERSIONS.len())
                .map(|i| publication(VERSIONS[(i + s) % VERSIONS.len()]))
                .collect();
            jobs.push(jobs[0].clone());
            jobs
        })
        .collect();
    std::thread::scope(|scope| {
        for (s, jobs) in plans.iter().enumerate() {
            let spools = &spools;
            scope.spawn(move || {
                for (n, job) in jobs.iter().enumerate() {
                    let armored = publish(kst, job, &spools.join(format!("{s}-{n}")));
                    // What is confirmed is the merge so far: never less than what was sent.
                    let confirmed = kst_core::openpgp::dearmor_public_key(&armored, usize::MAX)
                        .expect("confirmed key");
                    let sent = kst_core::openpgp::dearmor_public_key(
                        &fixture(VERSIONS[(n + s) % VERSIONS.len()]),
                        usize::MAX,
                    )
                    .unwrap();
                    let sent_subkeys = subkeys(&kst_core::merge::canonical(&sent).unwrap());
                    let have = subkeys(&confirmed);
                    assert!(
                        sent_subkeys.iter().all(|k| have.contains(k)),
                        "stream {s} message {n}: confirmed {have:?}, sent {sent_subkeys:?}"
                    );
                }
            });
        }
    });

    let key = served(kst, &spools.join("final"));
    assert_eq!(
        subkeys(&key.packets),
        [SUBKEY_A, SUBKEY_B],
        "a subkey was lost"
    );
    assert_eq!(
        key.expires_at,
        Some(EXTENDED),
        "the extended expiry was lost"
    );
    assert!(!key.revoked);
    let armored = kst_core::openpgp::armor_public_key(&key.packets);
    assert_eq!(
        gpg_subkey_validity(&armored, kst.dir.path()),
        [
            ("r".to_string(), SUBKEY_A.to_string()),
            ("-".to_string(), SUBKEY_B.to_string())
        ],
        "gpg sees subkey A revoked and B valid"
    );

    // A revocation, then an older copy, then a deletion and a republication: still revoked.
    publish(kst, &publication("merge-revoked"), &spools.join("revoke"));
    publish(kst, &publication("merge-subkey"), &spools.join("old-copy"));
    let after_old_copy = served(kst, &spools.join("after-old-copy"));
    assert!(after_old_copy.revoked, "an older copy un-revoked the key");
    assert_eq!(subkeys(&after_old_copy.packets), [SUBKEY_A, SUBKEY_B]);
    let out = kst.kst(&["keys", "delete", ACCOUNT], b"");
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    publish(kst, &publication("merge-base"), &spools.join("republish"));
    assert!(
        served(kst, &spools.join("after-delete")).revoked,
        "a deletion and republication un-revoked the key"
    );
}

#[test]
fn versions_of_one_key_through_a_pool_of_three_merge_on_every_backend() {
    let fs = TestKst::with_store("", &Store::Fs);
    run(&fs);
    drop(fs);

    let db = TestDb::new();
    let pg = TestKst::with_store("", &Store::Postgres(db.url.clone()));
    let out = pg.kst(&["migrate"], b"");
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    run(&pg);
    drop(pg);
    drop(db);

    let prefix = TestPrefix::new();
    let redis = TestKst::with_store(
        "",
        &Store::Redis {
            url: prefix.url.clone(),
            prefix: prefix.prefix.clone(),
        },
    );
    run(&redis);
    drop(redis);
    drop(prefix);
}

/// Red team (issue 15): the owner's revocation races older copies through a pool of three
/// under a size budget that the merge of everything exceeds (the budget is the largest of the
/// four publications alone). Every message is answered (published, or refused for its size;
/// never a temporary failure left to the MTA), and the key ends revoked on every backend.
#[test]
fn a_revocation_racing_old_copies_under_a_tight_budget_ends_revoked_on_every_backend() {
    let names = [
        "merge-revoked",
        "merge-base",
        "merge-subkey",
        "merge-extended",
    ];
    let limit = names
        .iter()
        .map(|n| {
            kst_core::validate::validate(
                &fixture(n),
                &addr(ACCOUNT),
                &kst_core::validate::KeyPolicy::default(),
                std::time::SystemTime::now(),
            )
            .unwrap()
            .packets
            .len()
        })
        .max()
        .unwrap();
    let extra = format!("[limits]\nmax_published_key_bytes = {limit}\n");
    let race = |kst: &TestKst| {
        let spools = kst.dir.path().join("race");
        std::thread::scope(|scope| {
            for s in 0..INSTANCES {
                let spools = &spools;
                scope.spawn(move || {
                    for i in 0..names.len() {
                        let job = publication(names[(i + s) % names.len()]);
                        let spool = spools.join(format!("{s}-{i}"));
                        let (exit, stderr, replies) = deliver(kst, &job.raw, ACCOUNT, &spool);
                        assert_eq!(exit, 0, "{stderr}");
                        let answer = client::verify_reply(&job.pending, &replies[0]);
                        assert!(
                            matches!(
                                answer,
                                Ok(Verified::Published { .. } | Verified::Refused { .. })
                            ),
                            "{answer:?}"
                        );
                    }
                });
            }
        });
        let key = served(kst, &spools.join("final"));
        assert!(key.revoked, "the revocation was lost");
        assert!(key.packets.len() <= limit);
    };
    let fs = TestKst::with_store(&extra, &Store::Fs);
    race(&fs);
    drop(fs);
    let db = TestDb::new();
    let pg = TestKst::with_store(&extra, &Store::Postgres(db.url.clone()));
    assert_eq!(code(&pg.kst(&["migrate"], b"")), 0);
    race(&pg);
    drop(pg);
    drop(db);
    let prefix = TestPrefix::new();
    let redis = TestKst::with_store(
        &extra,
        &Store::Redis {
            url: prefix.url.clone(),
            prefix: prefix.prefix.clone(),
        },
    );
    race(&redis);
}
