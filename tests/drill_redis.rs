//! Redis failover drills (issue 16), each under load, on the topologies of
//! `scripts/ha-services.sh` (started here, as root): Redis Sentinel (a primary, one replica,
//! three sentinels) and Redis Cluster (three primaries with one replica each).
//!
//! For each: the store conformance suite (on the cluster also the rate-limit suite) through
//! `kst_redis`; then a pool of three `kst serve` (`[store] min_replicas = 1`), background load
//! from three `kst bench lmtp` (one per instance), and the drill's own stream of publications
//! (each its own address and key, sent round-robin to the pool, a temporary failure sent again
//! to the next instance). The primary is killed (SIGKILL) once a quarter of the stream is
//! decided, and brought back as a replica by `ha-services.sh up` right after the failover (until
//! then the promoted node has no replica, so `min_replicas = 1` makes its publications 4xx,
//! which the stream sends again). Asserted: every publication of the stream ends decided; every confirmation's HMAC
//! verifies with the request's K_auth and names the key sent; every confirmed key is on the
//! new primary; every instance is ready again by itself. Printed: sent, decided, retried, lost,
//! seconds from the kill to the end of the last temporary failure, and the bench's summary.
//!
//! `cluster_passes_the_directory_conformance_suite` and
//! `sentinel_passes_the_directory_conformance_suite`: the key directory's conformance suite
//! (`kst_redis::RedisDirectoryStore`) on each topology, without a drill.
//! `sentinel_failover_with_the_directory_on_loses_no_key_and_forks_no_epoch`: the Sentinel
//! drill with `[transparency]` on (issue 18, `kst_tests::directory_drill`): also every
//! confirmed key at the latest epoch of the directory, no epoch served with two heads, every
//! head served still the stored one, `kst log audit` from epoch 0.
//!
//! The topologies are left up (with the killed node back as a replica) for the next run.
//! Run alone: `cargo test -p kst-tests --test drill_redis -- --nocapture`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kst_bin::bench::lmtp::dot_stuff as data;
use kst_core::client::{self, Pending, Verified};
use kst_core::{Address, AddressPolicy, KeyStore};
use kst_tests::directory_drill::{DrillKeys, HeadWatch, WriterTurns, check_directory};
use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::{kst_binary, received_authenticated, spool_replies};

/// `kst serve` instances in the pool.
const INSTANCES: usize = 3;
/// Publications of the drill's own stream.
const PUBLICATIONS: usize = 120;
/// Bound on everything that waits.
const PATIENCE: Duration = Duration::from_secs(90);
/// The trusted MTA of the drill's configuration.
const MTA: &str = "mail.example.net";

/// One drill at a time: both use the pool's ports and kill nodes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Runs `scripts/ha-services.sh TOPOLOGY ARGS...` and returns the `export K=V` lines it printed.
fn ha(topology: &str, args: &[&str]) -> BTreeMap<String, String> {
    let out = Command::new(repo().join("scripts/ha-services.sh"))
        .arg(topology)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/ha-services.sh");
    assert!(
        out.status.success(),
        "scripts/ha-services.sh {topology} {args:?} failed (it needs root): {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
        .collect()
}

fn urls(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.contains("://") {
                s.to_string()
            } else {
                format!("redis://{s}")
            }
        })
        .collect()
}

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).expect("address")
}

/// The drills' store: Redis behind the timeout wrapper, as `kst serve` runs it.
type TopologyStore = kst_core::store::TimeoutStore<kst_redis::RedisStore>;

/// How the pool reaches the topology: the `[store]` lines and a store for the checks.
struct Topology {
    name: &'static str,
    store_toml: String,
    builder: kst_redis::RedisStoreBuilder,
}

impl Topology {
    fn sentinel() -> Topology {
        let env = ha("sentinel", &["up"]);
        let sentinels = urls(&env["KST_HA_SENTINEL_ADDRS"]);
        let master = env["KST_HA_SENTINEL_MASTER"].clone();
        Topology {
            name: "sentinel",
            store_toml: format!(
                "sentinels = {sentinels:?}\nsentinel_master = {master:?}\nmin_replicas = 1\n"
            ),
            builder: kst_redis::RedisStore::builder("")
                .sentinel(sentinels, master)
                .min_replicas(1),
        }
    }

    fn cluster() -> Topology {
        let env = ha("cluster", &["up"]);
        let nodes = urls(&env["KST_HA_CLUSTER_NODES"]);
        Topology {
            name: "cluster",
            store_toml: format!("cluster_nodes = {nodes:?}\nmin_replicas = 1\n"),
            builder: kst_redis::RedisStore::builder("")
                .cluster(nodes)
                .min_replicas(1),
        }
    }

    fn store(&self, prefix: &str) -> TopologyStore {
        self.builder
            .clone()
            .prefix(prefix)
            .connect_lazy()
            .expect("store")
    }

    /// The start of both tests: on a multi-threaded runtime, a store on a fresh prefix that
    /// answers `check()` (every primary durable and answering) and passes the store conformance
    /// suite (`kst_core::conformance::run_all`). Returns the runtime, the prefix and the store.
    fn conformance_suite(&self) -> (tokio::runtime::Runtime, String, Arc<TopologyStore>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let prefix = format!("kst-conf-{:08x}:", rand::random::<u32>());
        let store = Arc::new(self.store(&prefix));
        rt.block_on(async {
            store.check().await.unwrap_or_else(|e| {
                panic!("the {} store is durable and answers: {e:?}", self.name)
            });
            kst_core::conformance::run_all(store.clone()).await;
        });
        (rt, prefix, store)
    }
}

/// One `kst serve` of the pool (stopped before its directory is removed).
struct Instance {
    serve: ServeProcess,
    dir: tempfile::TempDir,
    lmtp: SocketAddr,
    http: SocketAddr,
}

impl Instance {
    /// An instance on `topology` under `prefix`; with `directory`, `[transparency]` on with
    /// those keys (and `[web.limits]` off: the head watcher asks many times a second).
    fn start(topology: &Topology, prefix: &str, directory: Option<&DrillKeys>) -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("kst-drill-")
            .tempdir()
            .expect("temp dir");
        let (lmtp, http) = (free_port(), free_port());
        let config = dir.path().join("kst.toml");
        std::fs::write(
            &config,
            format!(
                "[kst]\ndomains = [\"example.net\", \"example.org\"]\ntrusted_mta_hosts = [\"{MTA}\"]\n\n\
                 [store]\nbackend = \"redis\"\nprefix = \"{prefix}\"\n{}\n\
                 [mailer]\nkind = \"spool\"\npath = \"{}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n{}",
                topology.store_toml,
                dir.path().join("outbox").display(),
                directory.map_or(String::new(), |keys| format!(
                    "\n{}\n[web.limits]\nper_client = 0\nper_client_misses = 0\nglobal_misses = 0\n",
                    keys.toml()
                )),
            ),
        )
        .expect("config");
        let serve = ServeProcess::start(dir.path().join("serve.log"), http, |cmd| {
            cmd.arg("--config")
                .arg(&config)
                .current_dir(dir.path())
                .env("KST_LMTP__LISTEN", lmtp.to_string())
                .env("KST_HTTP__LISTEN", http.to_string());
        });
        let i = Instance {
            serve,
            dir,
            lmtp,
            http,
        };
        i.wait_ready();
        i
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    fn ready(&self) -> bool {
        http_status(self.http, "/readyz") == Some(200)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        while !self.ready() {
            assert!(
                Instant::now() < deadline,
                "kst serve did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn replies(&self) -> Vec<Vec<u8>> {
        spool_replies(&self.dir.path().join("outbox"))
    }
}

fn http_status(at: SocketAddr, path: &str) -> Option<u16> {
    kst_tests::directory_drill::get(at, path).map(|(status, _)| status)
}

/// One LMTP transaction: the reply to DATA (or the first refusal; `None`: the connection
/// failed, which counts as a temporary failure).
fn transaction(at: SocketAddr, sender: &str, raw: &[u8]) -> Option<String> {
    let s = TcpStream::connect_timeout(&at, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut w = s.try_clone().ok()?;
    let mut io = BufReader::new(s);
    let mut reply = || -> Option<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if io.read_line(&mut line).ok()? == 0 {
                return None;
            }
            all.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(all);
            }
            all.push('\n');
        }
    };
    let greeting = reply()?;
    if !greeting.starts_with("220") {
        return Some(greeting);
    }
    w.write_all(b"LHLO drill\r\n").ok()?;
    reply()?;
    w.write_all(format!("MAIL FROM:<{sender}>\r\n").as_bytes())
        .ok()?;
    let r = reply()?;
    if !r.starts_with('2') {
        return Some(r);
    }
    w.write_all(b"RCPT TO:<keys@example.net>\r\n").ok()?;
    let r = reply()?;
    if !r.starts_with('2') {
        return Some(r);
    }
    w.write_all(b"DATA\r\n").ok()?;
    let r = reply()?;
    if !r.starts_with("354") {
        return Some(r);
    }
    w.write_all(&data(raw)).ok()?;
    let r = reply();
    let _ = w.write_all(b"QUIT\r\n");
    r
}

/// One publication of the stream.
struct Publication {
    account: String,
    raw: Vec<u8>,
    pending: Pending,
    fingerprint: String,
}

fn publications(tag: &str) -> Vec<Publication> {
    (0..PUBLICATIONS)
        .map(|i| {
            let account = format!("drill-{tag}-{i}@example.net");
            let armored = kst_bin::bench::messages::make_key(&account).expect("key");
            let req = client::build_publication(&addr(&account), &armored).expect("publication");
            let fingerprint = kst_core::certificate::Certificate::from_armored(&armored, 1 << 20)
                .map(|c| c.fingerprint())
                .unwrap_or_default();
            let mut raw = received_authenticated(&account, MTA).into_bytes();
            raw.extend_from_slice(&req.message);
            Publication {
                account,
                raw,
                pending: req.pending,
                fingerprint,
            }
        })
        .collect()
}

/// What the stream saw.
#[derive(Default)]
struct Tally {
    decided: usize,
    retried: usize,
    last_temporary: Option<Instant>,
}

/// The drill on `topology`, killing its primary with `kill` (ha-services arguments); with
/// `directory`, the key directory on (those keys) and its checks
/// (`kst_tests::directory_drill`).
fn drill(topology: &Topology, kill: &[&str], directory: Option<&DrillKeys>) {
    let prefix = format!("kst-drill-{:08x}:", rand::random::<u32>());
    let pool: Vec<Instance> = (0..INSTANCES)
        .map(|_| Instance::start(topology, &prefix, directory))
        .collect();
    let stream = Arc::new(publications(topology.name));
    let watch = directory.map(|keys| {
        HeadWatch::start(
            pool.iter().map(|i| i.http).collect(),
            keys,
            Duration::from_millis(50),
        )
    });

    // Background load: one `kst bench lmtp` per instance (its own domain, example.org).
    let benches: Vec<Child> = pool
        .iter()
        .map(|i| {
            Command::new(kst_binary())
                .args(["bench", "lmtp", "--connect", &i.lmtp.to_string()])
                .args(["--concurrency", "2", "--publications", "60"])
                .args(["--retrievals", "400", "--domain", "example.org"])
                .args(["--mta", MTA, "--json", "-q"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kst bench lmtp")
        })
        .collect();

    let lmtp: Vec<SocketAddr> = pool.iter().map(|i| i.lmtp).collect();
    let done = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..INSTANCES {
        let (stream, lmtp, done, tally) =
            (stream.clone(), lmtp.clone(), done.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            for (n, p) in stream
                .iter()
                .enumerate()
                .filter(|(n, _)| n % INSTANCES == w)
            {
                let mut attempt = 0;
                loop {
                    let at = lmtp[(n + attempt) % lmtp.len()];
                    let reply = transaction(at, &p.account, &p.raw);
                    match reply.as_deref().and_then(|r| r.bytes().next()) {
                        Some(b'2') => {
                            tally.lock().unwrap().decided += 1;
                            done.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Some(b'5') => panic!("{}: refused permanently: {reply:?}", p.account),
                        _ => {
                            let mut t = tally.lock().unwrap();
                            t.retried += 1;
                            t.last_temporary = Some(Instant::now());
                            drop(t);
                            attempt += 1;
                            assert!(
                                start.elapsed() < PATIENCE * 2,
                                "{}: still not decided after {attempt} attempts: {reply:?}",
                                p.account
                            );
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        }));
    }
    while done.load(Ordering::SeqCst) < PUBLICATIONS / 4 {
        assert!(start.elapsed() < PATIENCE, "the stream does not get going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    ha(topology.name, kill);
    let failover = killed.elapsed();
    // The promoted replica has no replica of its own: with min_replicas = 1 its shard answers
    // 4xx until the killed node is back (as a replica), which the operator's `up` does.
    ha(topology.name, &["up"]);
    for w in workers {
        w.join().expect("stream worker");
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());

    // Every instance is ready again by itself.
    for i in &pool {
        i.wait_ready();
    }

    // Every confirmation verifies and names the key sent.
    let replies: Vec<Vec<u8>> = pool.iter().flat_map(Instance::replies).collect();
    let mut confirmed = Vec::new();
    for p in stream.iter() {
        let verified = replies
            .iter()
            .find_map(|r| match client::verify_reply(&p.pending, r) {
                Ok(Verified::Published { fingerprint, .. }) => Some(fingerprint),
                _ => None,
            });
        let fingerprint = verified
            .unwrap_or_else(|| panic!("{}: no confirmation whose HMAC verifies", p.account));
        assert_eq!(fingerprint, p.fingerprint, "{}", p.account);
        confirmed.push(p);
    }

    // Every confirmed key is on the new primary.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (lost, records) = rt.block_on(async {
        let store = topology.store(&prefix);
        let mut lost = Vec::new();
        let mut records = Vec::new();
        for p in &confirmed {
            let r = store
                .get(&addr(&p.account))
                .await
                .expect("read the new primary");
            match r {
                Some(r) if r.fingerprint.as_str() == p.fingerprint => {
                    records.push((addr(&p.account), r))
                }
                _ => lost.push(p.account.clone()),
            }
        }
        (lost, records)
    });
    let recover = tally
        .last_temporary
        .filter(|t| *t > killed)
        .map_or(failover, |t| t - killed);
    for b in benches {
        let out = b.wait_with_output().expect("bench");
        eprintln!(
            "drill_redis {}: kst bench lmtp exited {} (deferred messages are not retried by the bench): {}",
            topology.name,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    eprintln!(
        "drill_redis {}{}: sent {PUBLICATIONS}, decided {}, retried {}, lost {}, seconds to recover {:.2} (ha-services kill took {:.2})",
        topology.name,
        if directory.is_some() {
            " with the directory on"
        } else {
            ""
        },
        tally.decided,
        tally.retried,
        lost.len(),
        recover.as_secs_f64(),
        failover.as_secs_f64()
    );
    assert_eq!(tally.decided, PUBLICATIONS);
    assert!(
        lost.is_empty(),
        "confirmed but missing after the failover: {lost:?}"
    );
    // The benches are done: nothing is in flight. Every confirmed key is in the directory at
    // the latest epoch, no epoch was served with two heads, the audit from 0 passes.
    if let (Some(keys), Some(watch)) = (directory, watch) {
        let seen = watch.stop();
        let http: Vec<SocketAddr> = pool.iter().map(|i| i.http).collect();
        let report = rt.block_on(check_directory(&http, keys, &records, &seen));
        let logs: Vec<String> = pool.iter().map(Instance::log).collect();
        let turns = WriterTurns::count(logs.iter().map(String::as_str));
        eprintln!(
            "drill_redis {} directory: {}",
            topology.name,
            report.line(turns)
        );
    }
    rt.block_on(async {
        let store = topology.store(&prefix);
        kst_core::conformance::check_consistency(&store).await;
        delete_prefix(&store, &confirmed).await;
    });
    // Bring the killed node back (as a replica) for the next run.
    ha(topology.name, &["up"]);
}

async fn delete_prefix(store: &dyn KeyStore, confirmed: &[&Publication]) {
    for p in confirmed {
        let _ = store.delete(&addr(&p.account)).await;
    }
}

#[test]
fn sentinel_failover_under_load_loses_no_confirmed_publication() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let topology = Topology::sentinel();
    let _suite = topology.conformance_suite();
    drill(&topology, &["kill-primary"], None);
}

/// The key directory (`kst_redis::RedisDirectoryStore`) on Redis Sentinel: its conformance
/// suite with two connections through the sentinels, on a fresh prefix.
#[test]
fn sentinel_passes_the_directory_conformance_suite() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let topology = Topology::sentinel();
    directory_conformance(&topology);
}

/// The Sentinel drill with the key directory on (issue 18): besides the store's checks, every
/// confirmed key is the directory's latest entry at the latest epoch, no epoch was served with
/// two heads (a watcher asks the pool for the heads throughout), every head served is still
/// the one stored for its epoch, and `kst log audit` from epoch 0 passes.
#[test]
fn sentinel_failover_with_the_directory_on_loses_no_key_and_forks_no_epoch() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let topology = Topology::sentinel();
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = DrillKeys::write(keys_dir.path(), &["example.net", "example.org"]);
    drill(&topology, &["kill-primary"], Some(&keys));
}

/// The directory conformance suite on `topology`, two connections on a fresh prefix (whose
/// keys are left there).
fn directory_conformance(topology: &Topology) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("kst-kt-{:08x}:", rand::random::<u32>());
    rt.block_on(async {
        let open = || -> Arc<dyn kst_core::transparency::DirectoryStore> {
            Arc::new(topology.store(&prefix).inner().directory())
        };
        kst_core::conformance::directory::run_all(open(), open()).await;
    });
}

/// The key directory (`kst_redis::RedisDirectoryStore`) on the Redis Cluster: the directory
/// conformance suite with two connections on a fresh prefix (every commit one script on the
/// domain's `{kt:<domain>}` slot, the fence included; a key outside that slot would make the
/// cluster refuse the script with CROSSSLOT). The prefix's keys are left on the cluster.
#[test]
fn cluster_passes_the_directory_conformance_suite() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let topology = Topology::cluster();
    directory_conformance(&topology);
}

#[test]
fn cluster_passes_the_conformance_suites_and_a_primary_failover_under_load() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let topology = Topology::cluster();
    let (rt, prefix, store) = topology.conformance_suite();
    rt.block_on(async {
        let stores: Vec<Arc<dyn KeyStore>> = (0..4)
            .map(|_| Arc::new(topology.store(&prefix)) as Arc<dyn KeyStore>)
            .collect();
        kst_core::conformance::concurrent_publishers(stores.clone()).await;
        kst_core::conformance::revocation::revocation_race(stores[2..].to_vec()).await;
        let limiters: Vec<Arc<dyn kst_core::RateLimiter>> = (0..3)
            .map(|_| Arc::new(topology.store(&prefix)) as Arc<dyn kst_core::RateLimiter>)
            .collect();
        kst_core::conformance::limiter::run_all(limiters).await;
        let topo = store.topology().await.unwrap();
        assert!(
            topo.contains(&("redis_mode".into(), "cluster".into())),
            "{topo:?}"
        );
        let primaries = topo
            .iter()
            .find(|(k, _)| k == "redis_primary")
            .map(|(_, v)| v.split(',').count());
        assert_eq!(primaries, Some(3), "{topo:?}");
    });
    drill(&topology, &["kill-primary", "1"], None);
}
