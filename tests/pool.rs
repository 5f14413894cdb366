//! A KST pool: four streams of `kst deliver` processes (Postfix pipe mode, one process per
//! message) share one PostgreSQL database, then one Redis key prefix. They publish keys for
//! overlapping addresses (every address gets a different real key from each stream), redeliver
//! some publications as an MTA does after a timeout, and retrieve keys while all that runs.
//!
//! Checked afterwards: every reply (the confirmation's HMAC verifies with the request's K_auth
//! and carries the key sent; a retrieval's reply verifies and carries a key published for that
//! address), and the final state: one current key per address, versions 1..n without gaps, the
//! history holding every accepted publication exactly once, redeliveries adding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kst_core::client::{self, Verified};
use kst_core::{Address, AddressPolicy, AuthKey};
use kst_tests::{Gpg, TestDb, TestKst, TestPrefix, code, received_authenticated, stderr};

/// Parallel `kst deliver` streams (pool instances).
const STREAMS: usize = 4;
/// Addresses every stream publishes for.
const ADDRESSES: usize = 6;

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

fn address(i: usize) -> String {
    format!("user{i}@example.net")
}

/// One key per stream, each with a User ID for every address, so that the key stored for
/// (address, stream) is unique: the service strips every other User ID.
struct Keys {
    armored: Vec<String>,
    fingerprints: Vec<String>,
    _gpg: Gpg,
}

fn make_keys() -> Keys {
    let gpg = Gpg::new();
    let (mut armored, mut fingerprints) = (Vec::new(), Vec::new());
    for k in 0..STREAMS {
        // A primary User ID of its own, so that gpg finds this key by it (the service strips it).
        let first = gpg.generate(
            &format!("Pool Key {k}"),
            &format!("pool-key-{k}@example.org"),
            "ed25519",
        );
        for i in 0..ADDRESSES {
            gpg.run(&[
                "--passphrase",
                "",
                "--pinentry-mode",
                "loopback",
                "--quick-add-uid",
                &first.fingerprint,
                &format!("Pool Key {k} <{}>", address(i)),
            ]);
        }
        armored.push(gpg.export(&first.fingerprint));
        fingerprints.push(first.fingerprint);
    }
    Keys {
        armored,
        fingerprints,
        _gpg: gpg,
    }
}

/// What a job asks.
#[derive(Clone)]
enum Ask {
    /// Publish key `key` for address `address`.
    Publish { address: usize, key: usize },
    /// Retrieve the key of `address`.
    Retrieve { address: usize },
}

/// One message for `kst deliver`, with what is needed to check its reply.
#[derive(Clone)]
struct Job {
    ask: Ask,
    sender: String,
    raw: Vec<u8>,
    pending: client::Pending,
}

/// What happened to a job.
struct Done {
    job: Job,
    exit: i32,
    stderr: String,
    replies: Vec<Vec<u8>>,
}

fn publication(keys: &Keys, address: usize, key: usize) -> Job {
    let account = self::address(address);
    let req = client::build_publication(&addr(&account), &keys.armored[key]).unwrap();
    let mut raw = received_authenticated(&account, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    Job {
        ask: Ask::Publish { address, key },
        sender: account,
        raw,
        pending: req.pending,
    }
}

fn retrieval(stream: usize, address: usize) -> Job {
    let requester = format!("reader{stream}@acme.net");
    let req = client::build_retrieval(&addr(&requester), &addr(&self::address(address)));
    Job {
        ask: Ask::Retrieve { address },
        sender: requester,
        raw: req.message,
        pending: req.pending,
    }
}

/// The jobs of each stream: stream `s` publishes key `s` for every address (starting at a
/// different address than the other streams, so that all of them write the same addresses at
/// the same time), retrieves every address, and redelivers a publication of the next stream.
fn plan(keys: &Keys) -> Vec<Vec<Job>> {
    let publications: Vec<Vec<Job>> = (0..STREAMS)
        .map(|s| {
            (0..ADDRESSES)
                .map(|i| publication(keys, (i + s) % ADDRESSES, s))
                .collect()
        })
        .collect();
    (0..STREAMS)
        .map(|s| {
            let mut jobs = Vec::new();
            for (i, p) in publications[s].iter().enumerate() {
                jobs.push(p.clone());
                jobs.push(retrieval(s, (i + s + 3) % ADDRESSES));
            }
            // The MTA delivers messages of another instance again (a retry after a timeout).
            let other = &publications[(s + 1) % STREAMS];
            jobs.insert(5, other[0].clone());
            jobs.push(other[3].clone());
            jobs
        })
        .collect()
}

/// Runs one `kst deliver` with its own spool directory, as Postfix's pipe(8) would.
fn deliver(kst: &TestKst, job: &Job, spool: &Path) -> Done {
    let (out, replies) = kst.deliver_spooled(&job.sender, &job.raw, spool);
    Done {
        job: job.clone(),
        exit: code(&out),
        stderr: stderr(&out),
        replies,
    }
}

/// Record metadata of `kst keys history --json` / `kst keys get --json`.
#[derive(Debug)]
struct Meta {
    version: u64,
    fingerprint: String,
    publication_id: String,
}

impl Meta {
    fn of(v: &serde_json::Value) -> Meta {
        Meta {
            version: v["version"].as_u64().expect("version"),
            fingerprint: v["fingerprint"].as_str().expect("fingerprint").into(),
            publication_id: v["publication_id"].as_str().expect("publication_id").into(),
        }
    }
}

/// Packets of a key as the service stored it (the armored key of a verified reply).
fn packets(armored: &str) -> Vec<u8> {
    kst_core::openpgp::dearmor_public_key(armored, usize::MAX).expect("reply key dearmors")
}

fn run_pool(kst: &TestKst, keys: &Keys) {
    let jobs = plan(keys);
    let spools = kst.dir.path().join("spools");
    let done: Vec<Done> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(s, stream)| {
                let spools = &spools;
                scope.spawn(move || {
                    stream
                        .iter()
                        .enumerate()
                        .map(|(n, job)| deliver(kst, job, &spools.join(format!("{s}-{n}"))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("stream thread"))
            .collect()
    });

    // Every reply. Publications first: the key each (address, key) became once stored.
    let mut stored: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
    let mut accepted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut found = 0;
    for d in &done {
        assert_eq!(d.exit, 0, "kst deliver failed: {}", d.stderr);
        assert_eq!(d.replies.len(), 1, "one reply per message: {}", d.stderr);
        let verified = client::verify_reply(&d.job.pending, &d.replies[0])
            .unwrap_or_else(|e| panic!("reply does not verify: {e}"));
        if let Ask::Publish { address, key } = d.job.ask {
            let Verified::Published {
                fingerprint,
                armored,
            } = verified
            else {
                panic!("publication of key {key} for {address} answered {verified:?}");
            };
            assert_eq!(fingerprint, keys.fingerprints[key]);
            let p = packets(&armored);
            let k_auth = AuthKey::parse(&d.job.pending.k_auth).unwrap();
            let id = kst_core::service::publication_id(&addr(&self::address(address)), &k_auth, &p);
            accepted.entry(address).or_default().insert(id);
            let before = stored.insert((address, key), p.clone());
            assert!(before.is_none_or(|b| b == p), "same key stored differently");
        }
    }
    for d in &done {
        if let Ask::Retrieve { address } = d.job.ask {
            match client::verify_reply(&d.job.pending, &d.replies[0]).unwrap() {
                Verified::Found {
                    fingerprint,
                    armored,
                    ..
                } => {
                    let key = keys
                        .fingerprints
                        .iter()
                        .position(|f| *f == fingerprint)
                        .expect("a retrieval returned a key nobody published");
                    assert_eq!(
                        stored.get(&(address, key)),
                        Some(&packets(&armored)),
                        "a retrieval for {address} returned key {key} other than published"
                    );
                    found += 1;
                }
                // Asked before any stream published for this address.
                Verified::NotFound { address: a } => assert_eq!(a, addr(&self::address(address))),
                other => panic!("retrieval answered {other:?}"),
            }
        }
    }
    assert!(found > 0, "no retrieval found a key");

    // The final state.
    for i in 0..ADDRESSES {
        let a = address(i);
        let out = kst.kst(&["keys", "history", &a, "--json"], b"");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let history: Vec<Meta> = json.as_array().unwrap().iter().map(Meta::of).collect();
        let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
        let expected: Vec<u64> = (1..=STREAMS as u64).collect();
        assert_eq!(
            versions, expected,
            "{a}: one version per accepted publication"
        );
        let ids: BTreeSet<String> = history.iter().map(|m| m.publication_id.clone()).collect();
        assert_eq!(
            ids.len(),
            history.len(),
            "{a}: a publication twice in the history"
        );
        assert_eq!(
            Some(&ids),
            accepted.get(&i),
            "{a}: history and confirmed publications differ"
        );
        let fingerprints: BTreeSet<&String> = history.iter().map(|m| &m.fingerprint).collect();
        assert_eq!(fingerprints.len(), STREAMS, "{a}: every stream's key once");

        // One current key: `keys get` and a retrieval now agree with the history's last entry.
        let current = &history.last().unwrap().fingerprint;
        let out = kst.kst(&["keys", "get", &a, "--json"], b"");
        let meta = Meta::of(&serde_json::from_slice(&out.stdout).unwrap());
        assert_eq!(&meta.fingerprint, current);
        let job = retrieval(0, i);
        let d = deliver(kst, &job, &spools.join(format!("final-{i}")));
        assert_eq!(d.exit, 0, "{}", d.stderr);
        match client::verify_reply(&job.pending, &d.replies[0]).unwrap() {
            Verified::Found { fingerprint, .. } => assert_eq!(&fingerprint, current),
            other => panic!("{a}: {other:?}"),
        }
    }
}

#[test]
fn four_deliver_streams_on_one_postgres_database_then_one_redis_prefix() {
    let keys = make_keys();

    let db = TestDb::new();
    let pg = TestKst::with_store("", &db.store());
    // As before a rolling upgrade: the schema first, so that no instance waits on its lock.
    pg.migrate();
    run_pool(&pg, &keys);
    assert_migrate_indexes_every_address(&pg, "postgres");
    drop(pg);
    drop(db);

    let prefix = TestPrefix::new();
    let redis = TestKst::with_store("", &prefix.store());
    run_pool(&redis, &keys);
    assert_migrate_indexes_every_address(&redis, "redis");
    drop(redis);
    drop(prefix);
}

/// `kst migrate` through the real binary: exit 0, and on stdout the number of keys its
/// `rebuild_index` indexed, twice the same: every exported address (one current key each), or
/// 0 for a backend whose look-ups keep the trait's default (no index of its own).
fn assert_migrate_indexes_every_address(kst: &TestKst, backend: &str) {
    let export = kst.kst(&["export"], b"");
    assert_eq!(code(&export), 0, "{}", stderr(&export));
    let addresses = String::from_utf8_lossy(&export.stdout).lines().count();
    assert!(addresses > 0, "the pool published keys");
    let mut counts = Vec::new();
    for _ in 0..2 {
        let out = kst.migrate();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let n: usize = text
            .strip_prefix(&format!("look-up index of the {backend} store rebuilt: "))
            .and_then(|t| t.strip_suffix(" keys indexed\n"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("kst migrate printed {text:?}"));
        assert!(
            n == 0 || n == addresses,
            "kst migrate indexed {n} keys of {addresses} addresses"
        );
        counts.push(n);
    }
    assert_eq!(counts[0], counts[1], "kst migrate is idempotent");
}
