//! The key directory's part of the failover drills (issue 18; `tests/drill_postgres.rs`,
//! `tests/drill_redis.rs`): a pool of `kst serve` with `[transparency]` on while the store's
//! primary fails over.
//!
//! - [`DrillKeys`]: the log keys of the served domains, one file per domain (mode 0600), the
//!   same for every instance of the pool.
//! - [`HeadWatch`]: a thread that asks every instance for every domain's latest head
//!   (`/.well-known/kst/log/<domain>/head`) over and over during the drill and keeps every
//!   head it was served: afterwards no epoch may have had two different heads, every head
//!   must carry the domain's signature, and each must still be the one stored for its epoch
//!   (`/head/<epoch>`): an epoch served and then lost in the failover, built again with
//!   other contents, is a fork even if the watcher saw only one side of it.
//! - [`check_directory`]: every confirmed key is the directory's latest entry for its address
//!   at the latest epoch (the lookup answer of an instance verifies for the key the store
//!   serves), and `kst log audit` from epoch 0 passes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kst_core::transparency::answer::{LogAnswer, Served};
use kst_core::transparency::witness::parse_head_with_cosignatures;
use kst_core::transparency::{DirectoryEntry, LogKeys, SignedHead};
use kst_core::{Address, KeyRecord};

use crate::{code, kst_binary, stderr};

/// The log keys of the drill's domains.
pub struct DrillKeys {
    /// `[transparency] key_file` for the pool (`.../log-{domain}.key`).
    pub key_file: String,
    /// Each domain's head key.
    pub head_keys: BTreeMap<String, [u8; 32]>,
}

impl DrillKeys {
    /// Fresh keys for `domains`, written to `dir/log-<domain>.key` (mode 0600).
    pub fn write(dir: &Path, domains: &[&str]) -> DrillKeys {
        use std::os::unix::fs::PermissionsExt;
        let mut head_keys = BTreeMap::new();
        for domain in domains {
            let keys = LogKeys::generate(domain);
            let path = dir.join(format!("log-{domain}.key"));
            std::fs::write(&path, keys.to_file().as_bytes()).expect("write a log key file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            head_keys.insert(domain.to_string(), keys.head.public_key());
        }
        DrillKeys {
            key_file: dir.join("log-{domain}.key").display().to_string(),
            head_keys,
        }
    }

    /// The `[transparency]` section.
    pub fn toml(&self) -> String {
        format!("[transparency]\nkey_file = {:?}\n", self.key_file)
    }

    /// The environment that sets the same (for pools configured by environment), and turns
    /// the `[web.limits]` counters off (the watcher asks many times a second).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("KST_TRANSPARENCY__KEY_FILE", self.key_file.clone())];
        env.extend(limits_off_env());
        env
    }
}

/// `[web.limits]` off, as environment (the key directory's routes are under it on `[http]`
/// too).
pub fn limits_off_env() -> Vec<(&'static str, String)> {
    vec![
        ("KST_WEB__LIMITS__PER_CLIENT", "0".into()),
        ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "0".into()),
        ("KST_WEB__LIMITS__GLOBAL_MISSES", "0".into()),
    ]
}

/// `GET path` from `at` with timeouts; `None` when it cannot be asked (the status and body
/// otherwise).
pub fn get(at: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The distinct heads served for one (domain, epoch): (root, signing time) → the instance
/// that served it first.
pub type HeadsOfEpoch = BTreeMap<([u8; 32], u64), SocketAddr>;

/// What a [`HeadWatch`] was served.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every distinct head per (domain, epoch): root, signing time, and the instance that
    /// served it first.
    pub heads: BTreeMap<(String, u64), HeadsOfEpoch>,
    /// Heads fetched (200).
    pub fetched: usize,
    /// Requests not answered 200 (503 while the store fails over, connections refused).
    pub unanswered: usize,
    /// Heads that did not parse or verify: (instance, why).
    pub bad: Vec<(SocketAddr, String)>,
    /// Time spent in head requests, all together, and the slowest.
    pub waited: Duration,
    /// The slowest head request.
    pub slowest: Duration,
}

impl Seen {
    /// The epochs that were served with more than one head.
    pub fn forks(&self) -> Vec<String> {
        self.heads
            .iter()
            .filter(|(_, h)| h.len() > 1)
            .map(|((domain, epoch), h)| {
                let heads: Vec<String> = h
                    .iter()
                    .map(|((root, at), by)| {
                        format!("root {} signed at {at} (from {by})", hex(root))
                    })
                    .collect();
                format!("{domain} epoch {epoch}: {}", heads.join(", "))
            })
            .collect()
    }

    /// The newest epoch seen per domain.
    pub fn latest(&self) -> BTreeMap<String, u64> {
        let mut latest = BTreeMap::new();
        for (domain, epoch) in self.heads.keys() {
            let e = latest.entry(domain.clone()).or_insert(0);
            *e = (*e).max(*epoch);
        }
        latest
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses and verifies a head text: the head when it is `domain`'s, signed with `key`.
fn checked_head(text: &str, domain: &str, key: &[u8; 32]) -> Result<SignedHead, String> {
    let (head, _) = parse_head_with_cosignatures(text).map_err(|e| e.to_string())?;
    if head.head.domain != domain {
        return Err(format!(
            "a head of {} at the {domain} route",
            head.head.domain
        ));
    }
    head.verify(key).map_err(|e| e.to_string())?;
    Ok(head)
}

/// Asks every instance for every domain's latest head, over and over, until stopped: one
/// thread per instance, so a slow answer of one does not thin out the others' samples.
pub struct HeadWatch {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Seen>>,
}

impl HeadWatch {
    /// Starts watching `instances` (their listener with the log routes) for the domains of
    /// `keys`, pausing `every` between rounds.
    pub fn start(instances: Vec<SocketAddr>, keys: &DrillKeys, every: Duration) -> HeadWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = instances
            .into_iter()
            .map(|at| {
                let keys = keys.head_keys.clone();
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut seen = Seen::default();
                    while !stop.load(Ordering::SeqCst) {
                        for (domain, key) in &keys {
                            seen.ask(at, domain, key);
                        }
                        std::thread::sleep(every);
                    }
                    seen
                })
            })
            .collect();
        HeadWatch { stop, threads }
    }

    /// Stops the watcher; what it was served.
    pub fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Seen::default();
        for t in self.threads.drain(..) {
            let seen = t.join().expect("a head watcher");
            all.fetched += seen.fetched;
            all.unanswered += seen.unanswered;
            all.bad.extend(seen.bad);
            all.waited += seen.waited;
            all.slowest = all.slowest.max(seen.slowest);
            for (k, heads) in seen.heads {
                let merged = all.heads.entry(k).or_default();
                for (h, by) in heads {
                    merged.entry(h).or_insert(by);
                }
            }
        }
        all
    }
}

impl Seen {
    /// One request for `domain`'s latest head at `at`.
    fn ask(&mut self, at: SocketAddr, domain: &str, key: &[u8; 32]) {
        let asked = Instant::now();
        let got = get(at, &format!("/.well-known/kst/log/{domain}/head"));
        self.waited += asked.elapsed();
        self.slowest = self.slowest.max(asked.elapsed());
        match got {
            Some((200, body)) => {
                self.fetched += 1;
                match checked_head(&body, domain, key) {
                    Ok(h) => {
                        self.heads
                            .entry((domain.to_string(), h.head.epoch))
                            .or_default()
                            .entry((h.head.root_hash, h.head.signed_at))
                            .or_insert(at);
                    }
                    Err(e) => self.bad.push((at, e)),
                }
            }
            _ => self.unanswered += 1,
        }
    }
}

impl Drop for HeadWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What [`check_directory`] found.
#[derive(Debug, Default)]
pub struct DirectoryReport {
    /// The latest epoch per domain after the drill.
    pub epochs: BTreeMap<String, u64>,
    /// Distinct heads served during the drill, over all domains and epochs.
    pub heads_seen: usize,
    /// Head requests of the watcher answered 200, and not.
    pub fetched: usize,
    /// Head requests of the watcher not answered 200.
    pub unanswered: usize,
    /// The mean and the slowest head request of the watcher.
    pub head_mean: Duration,
    /// The slowest head request of the watcher.
    pub head_slowest: Duration,
    /// Confirmed keys checked against the directory.
    pub keys_checked: usize,
}

impl DirectoryReport {
    /// One line for the drill's output, with how the writers shared the store.
    pub fn line(&self, turns: WriterTurns) -> String {
        format!(
            "latest epochs {:?}, {} heads served ({} head requests answered, {} not; mean \
             {:?}, slowest {:?}), {} confirmed keys proven at the latest epoch, audit from 0 \
             passed; the writers committed {} epochs and read again {} times (another \
             instance committed first)",
            self.epochs,
            self.heads_seen,
            self.fetched,
            self.unanswered,
            self.head_mean,
            self.head_slowest,
            self.keys_checked,
            turns.committed,
            turns.moved
        )
    }
}

/// After the drill (no change in flight any more): the checks of the module comment, on the
/// instances at `instances`, for the confirmed `keys` (address, the store's current record,
/// whose fingerprint the caller checked against the confirmation) and what `seen` saw.
/// Panics with what is wrong.
pub async fn check_directory(
    instances: &[SocketAddr],
    keys: &DrillKeys,
    confirmed: &[(Address, KeyRecord)],
    seen: &Seen,
) -> DirectoryReport {
    assert!(
        seen.bad.is_empty(),
        "heads served that do not verify: {:?}",
        seen.bad
    );
    let forks = seen.forks();
    assert!(
        forks.is_empty(),
        "two different heads served for one epoch:\n{}",
        forks.join("\n")
    );
    let mut report = DirectoryReport {
        heads_seen: seen.heads.len(),
        fetched: seen.fetched,
        unanswered: seen.unanswered,
        head_mean: seen.waited / (seen.fetched + seen.unanswered).max(1) as u32,
        head_slowest: seen.slowest,
        ..DirectoryReport::default()
    };
    // Every instance serves the same latest head per domain, at or after every epoch seen.
    let latest_seen = seen.latest();
    for (domain, key) in &keys.head_keys {
        let mut latest: Option<SignedHead> = None;
        for at in instances {
            let head = until_answered(*at, &format!("/.well-known/kst/log/{domain}/head"));
            let head = checked_head(&head, domain, key)
                .unwrap_or_else(|e| panic!("{domain}: the head from {at}: {e}"));
            if let Some(l) = &latest {
                assert_eq!(
                    (l.head.epoch, l.head.root_hash),
                    (head.head.epoch, head.head.root_hash),
                    "{domain}: the instances serve different latest heads"
                );
            }
            latest = Some(head);
        }
        let latest = latest.expect("an instance");
        assert!(
            latest.head.epoch >= latest_seen.get(domain).copied().unwrap_or(0),
            "{domain}: the latest epoch went back to {} after the drill (seen {:?})",
            latest.head.epoch,
            latest_seen.get(domain)
        );
        report.epochs.insert(domain.clone(), latest.head.epoch);
    }
    // Each head served during the drill is still the one stored for its epoch.
    for ((domain, epoch), heads) in &seen.heads {
        let at = instances[(*epoch as usize) % instances.len()];
        let text = until_answered(at, &format!("/.well-known/kst/log/{domain}/head/{epoch}"));
        let stored = checked_head(&text, domain, &keys.head_keys[domain])
            .unwrap_or_else(|e| panic!("{domain}: the stored head of epoch {epoch}: {e}"));
        let ((root, signed_at), by) = heads.iter().next().expect("a head");
        assert_eq!(
            (stored.head.root_hash, stored.head.signed_at),
            (*root, *signed_at),
            "{domain}: the head of epoch {epoch} served during the drill (by {by}) is not the \
             one stored now: the epoch was lost and built again (a fork)"
        );
    }
    // Every confirmed key is the latest entry of its address at the latest epoch.
    for (i, (address, record)) in confirmed.iter().enumerate() {
        let domain = address.domain();
        let at = instances[i % instances.len()];
        let body = until_answered(
            at,
            &format!("/.well-known/kst/log/{domain}/lookup/{address}"),
        );
        let answer = LogAnswer::parse(&body)
            .unwrap_or_else(|e| panic!("{address}: the answer from {at}: {e}\n{body}"));
        let entry = answer
            .verify(&keys.head_keys[domain], address, Served::Key(&record.key))
            .await
            .unwrap_or_else(|e| panic!("{address}: the directory does not prove its key: {e}"))
            .unwrap_or_else(|| panic!("{address}: no entry"));
        assert_eq!(
            entry,
            DirectoryEntry::for_record(record),
            "{address}: the directory's entry"
        );
        assert_eq!(
            Some(answer.head.head.epoch),
            report.epochs.get(domain).copied(),
            "{address}: the answer is not at the latest epoch"
        );
        report.keys_checked += 1;
    }
    // A third party's audit from epoch 0 to the latest, through one instance.
    let state = tempfile::tempdir().expect("temp dir");
    for (domain, key) in &keys.head_keys {
        std::fs::create_dir_all(state.path().join(domain)).expect("the auditor's state");
        let out = Command::new(kst_binary())
            .args(["log", "audit", &format!("http://{}", instances[0])])
            .args(["--domain", domain, "--log-key", &hex(key), "--once"])
            .arg("--state")
            .arg(state.path().join(domain))
            .env_remove("RUST_LOG")
            .env_remove("KST_CONFIG")
            .output()
            .expect("kst log audit");
        assert_eq!(
            code(&out),
            0,
            "kst log audit {domain} from epoch 0: {}",
            stderr(&out)
        );
    }
    report
}

/// `GET path` until it is answered 200 (the store may still be settling), at most a minute.
fn until_answered(at: SocketAddr, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = get(at, path);
        if let Some((200, body)) = got {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{at}{path}: not answered 200 within a minute: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How the pool's directory writers shared the store, from their logs: epochs each
/// committed, and the attempts refused because another instance committed first (the fence:
/// `directory epoch moved under this writer`).
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterTurns {
    /// `key directory epoch committed` lines.
    pub committed: usize,
    /// `directory epoch moved under this writer` lines (an attempt read again).
    pub moved: usize,
}

impl WriterTurns {
    /// Counted in the logs of the pool's instances.
    pub fn count<'a>(logs: impl IntoIterator<Item = &'a str>) -> WriterTurns {
        let mut t = WriterTurns::default();
        for log in logs {
            for line in log.lines() {
                if line.contains("key directory epoch committed") {
                    t.committed += 1;
                } else if line.contains("directory epoch moved under this writer") {
                    t.moved += 1;
                }
            }
        }
        t
    }
}
