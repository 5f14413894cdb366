//! `[web.counters]`: the web limits' counters on a Redis of their own (soft state, no
//! durability guard), through real `kst serve` processes, a real key store and a second real
//! `redis-server` that each test starts on a free loopback port (`appendonly no`, `save ""`:
//! the recommended set-up). The counters land there and never in the key store (Redis or
//! fs); a pool of two shares them; the counter store going down answers as failing counters
//! do (write-behind: admitted for `STALE`, then 503), `/readyz` says so, and it recovers when
//! the Redis is back; `kst config check` validates and probes it, and the key store's
//! durability guard still refuses a Redis that is not durable.
//!
//! Needs gpg, Redis (`redis-server` and the shared test server) as the other tests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kst_tests::serve::{ServeProcess, free_port, http_get};
use kst_tests::{Gpg, Store, TestKst, TestPrefix, code, stderr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a poll waits for what must happen (a hang guard, not a speed check).
const DEADLINE: Duration = Duration::from_secs(30);

/// The prefix the tests give the counters.
const PREFIX: &str = "ctr-web:";

const FOUND: &str = "/vks/v1/by-email/alice%40example.net";

fn missing(tag: &str) -> String {
    format!("/vks/v1/by-email/nobody-{tag}%40example.net")
}

/// A `redis-server` of the test's own on a free loopback port, holding only soft state
/// (`appendonly no`, `save ""`); killed when dropped.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let mut r = OwnRedis {
            port: free_port().port(),
            dir: tempfile::Builder::new()
                .prefix("kst-test-counters-")
                .tempdir()
                .expect("temp dir"),
            child: None,
        };
        r.up();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port) and waits until it answers PING.
    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.connection().is_ok_and(|mut c| {
                redis::cmd("PING")
                    .query::<String>(&mut c)
                    .is_ok_and(|p| p == "PONG")
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the server: a stalled Redis, whose
    /// connections stay open and answer nothing.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the server (its counters are gone: soft state).
    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url().as_str())?
            .get_connection_with_timeout(Duration::from_secs(5))
    }

    /// The count of limiter key `key` (0 when there is none).
    fn count(&self, key: &str) -> u64 {
        let mut c = self.connection().expect("connect to the counters' Redis");
        redis::cmd("GET")
            .arg(format!("{PREFIX}rl:{key}"))
            .query::<Option<u64>>(&mut c)
            .expect("GET a counter")
            .unwrap_or(0)
    }

    /// Polls until `key`'s count is `want` (the counts arrive within a flush, 25 ms).
    fn wait_for_count(&self, key: &str, want: u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.count(key);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: {got} counted, {want} expected"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// `GET path` from the source address `from` to `at` (Host `example.net`): the status.
async fn get_from(from: Ipv4Addr, at: SocketAddr, path: &str) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    let mut s = socket
        .connect(at)
        .await
        .unwrap_or_else(|e| panic!("connect from {from} to {at}: {e}"));
    let head = format!("GET {path} HTTP/1.1\r\nHost: example.net\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("send request");
    let mut text = Vec::new();
    s.read_to_end(&mut text).await.expect("read response");
    let text = String::from_utf8_lossy(&text);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from {at}: {text:?}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A `kst serve` of `kst` with `[web]` on `web`, `[http]` on `http`, the counters on
/// `counters`, and the `[web.limits]` settings `limits`.
fn serve(
    kst: &TestKst,
    name: &str,
    (web, http): (SocketAddr, SocketAddr),
    counters: &OwnRedis,
    limits: &[(&str, &str)],
) -> ServeProcess {
    serve_lmtp(kst, name, (web, http, free_port()), counters, limits)
}

/// [`serve`] with LMTP on `lmtp`.
fn serve_lmtp(
    kst: &TestKst,
    name: &str,
    ports: (SocketAddr, SocketAddr, SocketAddr),
    counters: &OwnRedis,
    limits: &[(&str, &str)],
) -> ServeProcess {
    serve_url(kst, name, ports, &counters.url(), limits)
}

/// [`serve_lmtp`] with the counters at `url` (and more settings in `env`).
fn serve_url(
    kst: &TestKst,
    name: &str,
    (web, http, lmtp): (SocketAddr, SocketAddr, SocketAddr),
    url: &str,
    env: &[(&str, &str)],
) -> ServeProcess {
    ServeProcess::start(kst.dir.path().join(format!("{name}.log")), http, |cmd| {
        cmd.arg("--config")
            .arg(&kst.config)
            .env("KST_LMTP__LISTEN", lmtp.to_string())
            .env("KST_HTTP__LISTEN", http.to_string())
            .env("KST_WEB__LISTEN", web.to_string())
            .env("KST_WEB__COUNTERS__BACKEND", "redis")
            .env("KST_WEB__COUNTERS__URL", url)
            .env("KST_WEB__COUNTERS__PREFIX", PREFIX)
            .envs(env.iter().copied());
    })
}

/// The keys of every fs rate-limit shard under `keys` (hashes of limiter keys).
fn fs_counter_keys(keys: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(keys.join("ratelimit")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) {
            out.extend(map.keys().cloned());
        }
    }
    out.sort();
    out
}

/// A Redis key store, the counters on a Redis of their own: the web limits' hits and misses
/// are counted there, exactly, and nothing of them in the key store; the key store's mail-side
/// counters stay where they were. `/readyz` is ready, and `/metrics` gives the counter store's
/// topology (a Redis with `appendonly no`, which kst accepts for counters).
#[test]
fn web_counters_land_in_their_own_redis_never_in_a_redis_key_store() {
    let t = TestPrefix::new();
    let kst = TestKst::with_store("", &t.store());
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let counters = OwnRedis::start();
    let (web, http) = (free_port(), free_port());
    let serve = serve(
        &kst,
        "serve",
        (web, http),
        &counters,
        &[
            ("KST_WEB__LIMITS__PER_CLIENT", "40"),
            ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "3"),
            ("KST_WEB__LIMITS__GLOBAL_MISSES", "100"),
        ],
    );
    let rt = runtime();
    let (asker, misser) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    for _ in 0..10 {
        assert_eq!(
            rt.block_on(get_from(asker, web, FOUND)),
            200,
            "{}",
            serve.log()
        );
    }
    assert_eq!(rt.block_on(get_from(misser, web, &missing("1"))), 404);
    counters.wait_for_count(&format!("web-client:{asker}"), 10);
    counters.wait_for_count(&format!("web-client:{misser}"), 1);
    assert_eq!(counters.count(&format!("web-miss:{misser}")), 1);
    assert_eq!(counters.count("web-miss-global"), 1);
    let in_key_store: Vec<String> = t
        .keys()
        .expect("list the key store's keys")
        .into_iter()
        .filter(|k| k.contains("rl:web"))
        .collect();
    assert!(
        in_key_store.is_empty(),
        "web counters in the key store: {in_key_store:?}"
    );
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "kst_store_info{store=\"web-counters(redis)\",name=\"redis_appendonly\",value=\"no\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("kst_store_info{store=\"redis\""),
        "{metrics}"
    );
    drop(rt);
    assert_eq!(serve.stop(), 0);
}

/// Two `kst serve` on one fs key store and one counter Redis (a pool, as far as the counters
/// go): one client flooding both from 16 connections gets its limit and at most 8 (write-
/// behind's CAP) more per instance; the counter Redis holds every admitted request; the fs
/// store's rate-limit shards get no web counter.
#[test]
fn a_pool_of_two_on_an_fs_store_shares_the_counter_redis() {
    const LIMIT: u32 = 64;
    const CAP: u32 = 8;
    const CONNECTIONS: u32 = 16;
    const EACH: u32 = 12;
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let keys = kst.dir.path().join("keys");
    let shards_before = fs_counter_keys(&keys);
    let counters = OwnRedis::start();
    let limits = [
        ("KST_WEB__LIMITS__PER_CLIENT", "64"),
        ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "0"),
        ("KST_WEB__LIMITS__GLOBAL_MISSES", "0"),
    ];
    let pool: Vec<(SocketAddr, ServeProcess)> = (0..2)
        .map(|i| {
            let web = free_port();
            let s = serve(
                &kst,
                &format!("serve-{i}"),
                (web, free_port()),
                &counters,
                &limits,
            );
            (web, s)
        })
        .collect();
    let at: Vec<SocketAddr> = pool.iter().map(|(a, _)| *a).collect();
    let rt = runtime();
    let flooder = Ipv4Addr::new(127, 0, 0, 70);
    let statuses: Vec<u16> = rt.block_on(async {
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let at = at[i as usize % 2];
                tokio::spawn(async move {
                    let mut s = Vec::new();
                    for _ in 0..EACH {
                        s.push(get_from(flooder, at, FOUND).await);
                    }
                    s
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("flood task"));
        }
        all
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u32;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u32;
    assert_eq!(
        admitted + refused,
        CONNECTIONS * EACH,
        "only 200 and 429: {statuses:?}\n{}\n{}",
        pool[0].1.log(),
        pool[1].1.log()
    );
    assert!(
        (LIMIT..=LIMIT + 2 * CAP).contains(&admitted),
        "{admitted} admitted of a limit of {LIMIT} over a pool of two"
    );
    for a in &at {
        assert_eq!(
            rt.block_on(get_from(flooder, *a, FOUND)),
            429,
            "refused by both instances"
        );
    }
    // A client in good standing is served by both (and counted once by each).
    let good = Ipv4Addr::new(127, 0, 0, 71);
    for a in &at {
        assert_eq!(rt.block_on(get_from(good, *a, FOUND)), 200);
    }
    counters.wait_for_count(&format!("web-client:{good}"), 2);
    let stored = counters.count(&format!("web-client:{flooder}"));
    assert!(
        (u64::from(admitted)..=u64::from(CONNECTIONS * EACH + 2)).contains(&stored),
        "{stored} counted in the counter Redis, {admitted} admitted"
    );
    assert_eq!(
        fs_counter_keys(&keys),
        shards_before,
        "no web counter in the fs store's shards"
    );
    drop(rt);
    for (_, s) in pool {
        assert_eq!(s.stop(), 0);
    }
}

/// The counter Redis goes down: requests are answered as when the counters fail (a client in
/// good standing is admitted for write-behind's `STALE` and up to `CAP` requests, then every
/// counted request is answered 503), `/readyz` is 503 and names the counter store,
/// `kst_web_counter_flushes_total{outcome="failed"}` counts the failed flushes. The key store's
/// look-ups are not touched: once the Redis is back (empty: soft state), requests are 200
/// again and `/readyz` is ready.
#[test]
fn the_counter_redis_down_answers_503_and_readyz_says_so_until_it_is_back() {
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let mut counters = OwnRedis::start();
    let (web, http) = (free_port(), free_port());
    // The limits at their defaults.
    let serve = serve(&kst, "serve", (web, http), &counters, &[]);
    let rt = runtime();
    let client = Ipv4Addr::new(127, 0, 0, 80);
    assert_eq!(rt.block_on(get_from(client, web, FOUND)), 200);
    counters.wait_for_count(&format!("web-client:{client}"), 1);
    assert_eq!(http_get(http, "/readyz").0, 200);

    counters.down();
    let deadline = Instant::now() + DEADLINE;
    let mut answers = Vec::new();
    loop {
        let status = rt.block_on(get_from(client, web, FOUND));
        answers.push(status);
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "admitted while STALE lasts: {answers:?}");
        assert!(
            Instant::now() < deadline,
            "never 503 with the counters down: {answers:?}\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        answers.len() as u32 <= kst_bin::server::web::writebehind::CAP + 1,
        "at most CAP admitted without a verdict: {answers:?}"
    );
    // Everyone's counted requests now wait for a flush and get its error.
    assert_eq!(
        rt.block_on(get_from(Ipv4Addr::new(127, 0, 0, 81), web, FOUND)),
        503
    );
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("web-counters(redis)"), "{body}");
    assert!(!body.contains("store(fs)"), "the key store is fine: {body}");
    let (_, metrics) = http_get(http, "/metrics");
    let failed = metrics
        .lines()
        .find(|l| {
            l.starts_with("kst_web_counter_flushes_total") && l.contains("outcome=\"failed\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "failed flushes counted: {metrics}");

    counters.up();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = rt.block_on(get_from(client, web, FOUND));
        if status == 200 && http_get(http, "/readyz").0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back after the Redis came back (last {status}):\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        counters.count(&format!("web-client:{client}")) >= 1,
        "counted in the new Redis"
    );
    drop(rt);
    assert_eq!(serve.stop(), 0);
}

/// Red team (counters and shares): the counter Redis stalls (`SIGSTOP`: connections open,
/// nothing answered), which is worse than down (refused at once). Every request is still
/// answered, 200 while write-behind admits it or 503 once it waits for a write, within the
/// counters' bound on a call (`connect_timeout_ms + response_timeout_ms`, 5 s) and a margin; `/readyz` says so; once the Redis answers
/// again, requests are 200 and `/readyz` is ready.
#[test]
fn a_stalled_counter_redis_answers_503_within_its_timeout_and_recovers() {
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let counters = OwnRedis::start();
    let (web, http) = (free_port(), free_port());
    let serve = serve(&kst, "serve", (web, http), &counters, &[]);
    let rt = runtime();
    let first = Ipv4Addr::new(127, 0, 0, 90);
    assert_eq!(rt.block_on(get_from(first, web, FOUND)), 200);
    counters.wait_for_count(&format!("web-client:{first}"), 1);

    counters.signal("-STOP");
    let started = Instant::now();
    // 4 clients, 12 look-ups each at once: 8 each are admitted without a verdict, the rest
    // wait for a write that the stalled Redis never answers.
    let answers: Vec<(u16, Duration)> = rt.block_on(async {
        let tasks: Vec<_> = (0..48u8)
            .map(|i| {
                let from = Ipv4Addr::new(127, 0, 0, 91 + i % 4);
                tokio::spawn(async move {
                    let status = get_from(from, web, FOUND).await;
                    (status, started.elapsed())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("request task"));
        }
        out
    });
    let slowest = answers.iter().map(|a| a.1).max().unwrap_or_default();
    let served = answers.iter().filter(|a| a.0 == 200).count();
    let refused = answers.iter().filter(|a| a.0 == 503).count();
    eprintln!("stalled counters: {served} x 200, {refused} x 503, slowest {slowest:?}");
    assert_eq!(
        served + refused,
        answers.len(),
        "200 or 503 only: {answers:?}"
    );
    assert!(
        refused > 0,
        "requests that wait for a write are refused: {answers:?}"
    );
    assert!(
        served <= 4 * kst_bin::server::web::writebehind::CAP as usize,
        "at most CAP admitted per client without a verdict: {answers:?}"
    );
    assert!(
        slowest < Duration::from_secs(20),
        "every request answered within the counters' timeout and a margin: {answers:?}"
    );
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("web-counters(redis)"), "{body}");

    counters.signal("-CONT");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = rt.block_on(get_from(first, web, FOUND));
        if status == 200 && http_get(http, "/readyz").0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not back after the Redis continued (last {status}):\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(rt);
    assert_eq!(serve.stop(), 0);
}

/// What a [`MuteRedis`] says before it falls silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mute {
    /// Nothing: a connection's set-up (`CLIENT SETINFO`) is never answered.
    Always,
    /// `+OK` to the set-up's two `CLIENT SETINFO`, then nothing: the connection is up and
    /// no command is ever answered.
    AfterSetup,
}

/// A loopback listener that accepts TCP connections and reads what they send, but answers
/// nothing (or only the connection's set-up): a Redis that hangs, which is worse than down
/// (refused at once). Its threads end with the connections (or the test process).
struct MuteRedis {
    addr: SocketAddr,
}

impl MuteRedis {
    fn start(mute: Mute) -> MuteRedis {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a mute Redis");
        let addr = listener.local_addr().expect("its address");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let (mut seen, mut answered) = (Vec::new(), 0);
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        if mute == Mute::Always || answered == 2 {
                            continue;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        let asked = seen.windows(7).filter(|w| w == b"SETINFO").count();
                        while answered < asked.min(2) {
                            if conn.write_all(b"+OK\r\n").is_err() {
                                return;
                            }
                            answered += 1;
                        }
                    }
                });
            }
        });
        MuteRedis { addr }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

/// The limits with `per_client` below write-behind's `EXACT_BELOW`: every request waits for
/// its own counters call.
const EXACT: [(&str, &str); 3] = [
    ("KST_WEB__LIMITS__PER_CLIENT", "10"),
    ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "0"),
    ("KST_WEB__LIMITS__GLOBAL_MISSES", "0"),
];

/// The status of each of `n` look-ups of one client (answered one after another) and how
/// long it took, against a `kst serve` with `env` whose counters are at `url`, which cannot
/// be reached: `/readyz` says so.
fn look_ups_against(
    kst: &TestKst,
    name: &str,
    url: &str,
    env: &[(&str, &str)],
    n: usize,
) -> Vec<(u16, Duration)> {
    let (web, http) = (free_port(), free_port());
    let serve = serve_url(kst, name, (web, http, free_port()), url, env);
    let rt = runtime();
    let client = Ipv4Addr::new(127, 0, 0, 100);
    let answers: Vec<(u16, Duration)> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let status = rt
                .block_on(async {
                    tokio::time::timeout(DEADLINE, get_from(client, web, FOUND)).await
                })
                .unwrap_or_else(|_| panic!("a request hung:\n{}", serve.log()));
            (status, started.elapsed())
        })
        .collect();
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("web-counters(redis)"), "{body}");
    drop(rt);
    assert_eq!(serve.stop(), 0);
    answers
}

/// `[web.counters] connect_timeout_ms` and `response_timeout_ms` bound what a counters Redis
/// that accepts TCP and never answers costs a request: one that never answers a connection's
/// set-up costs about `connect_timeout_ms` (the connection is tried twice, and a call is cut
/// off after `connect_timeout_ms + response_timeout_ms`), one that answers the set-up and then
/// nothing about `response_timeout_ms`. With `per_client` below 32 every request waits for its
/// call and is answered 503 (as when the counters are down); with the default limits
/// (write-behind) a client is served up to `CAP` requests, then waits for a write and gets 503.
/// None hangs. The bounds asserted are below what the defaults (2 s, 3 s: 5 s a call, a
/// mute set-up about 4 s) would cost, so they show the settings are used, with a wide margin
/// for a busy host; they are not a speed check.
#[test]
fn a_counter_redis_that_never_answers_costs_a_request_about_its_timeouts() {
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let connect = ("KST_WEB__COUNTERS__CONNECT_TIMEOUT_MS", "250");
    let response = ("KST_WEB__COUNTERS__RESPONSE_TIMEOUT_MS", "250");

    let silent = MuteRedis::start(Mute::Always);
    let mute = MuteRedis::start(Mute::AfterSetup);
    for (name, redis, setting, bound, what) in [
        (
            "connect",
            &silent,
            connect,
            2_500,
            "set-up never answered, connect_timeout_ms = 250: about 2 x connect_timeout_ms, \
             far below the default's 4 s",
        ),
        (
            "response",
            &mute,
            response,
            2_000,
            "commands never answered, response_timeout_ms = 250: about response_timeout_ms, \
             far below the default's 3 s",
        ),
    ] {
        let answers = look_ups_against(
            &kst,
            name,
            &redis.url(),
            &[&EXACT[..], &[setting]].concat(),
            3,
        );
        eprintln!("{what}: {answers:?}");
        for (status, took) in &answers {
            assert_eq!(*status, 503, "the counters cannot be reached: {answers:?}");
            assert!(*took < Duration::from_millis(bound), "{what}: {answers:?}");
        }
    }

    // The default limits: write-behind admits a client's first requests without a verdict,
    // then they wait for a write (the one in flight, then theirs: two calls at most).
    let cap = kst_bin::server::web::writebehind::CAP as usize;
    let answers = look_ups_against(&kst, "write-behind", &silent.url(), &[connect], cap + 4);
    eprintln!("write-behind, set-up never answered, connect_timeout_ms = 250: {answers:?}");
    let served = answers.iter().take_while(|a| a.0 == 200).count();
    assert!(
        served <= cap && answers[served..].iter().all(|a| a.0 == 503),
        "at most CAP admitted, then 503: {answers:?}"
    );
    for (_, took) in &answers {
        assert!(
            *took < Duration::from_millis(3_500),
            "about two calls of 2 x connect_timeout_ms at most, below one call at the \
             defaults (4 s): {answers:?}"
        );
    }
}

/// Bob's retrieval of alice@example.net, relayed from `relay_ip`, over LMTP at `lmtp` is
/// answered: found (mail does not use the web counters).
fn assert_lmtp_finds_alice(lmtp: SocketAddr, relay_ip: &str, serve: &ServeProcess) {
    let raw = kst_tests::retrieval_from(
        "bob@example.org",
        "alice@example.net",
        relay_ip,
        "mail.example.net",
    );
    let reply = lmtp_transaction(lmtp, "bob@example.org", &raw);
    assert!(
        reply.starts_with("250 ") && reply.trim_end().ends_with("decided: found"),
        "{reply}\n{}",
        serve.log()
    );
}

/// One LMTP transaction on a new connection to `at`: `sender`'s message `raw` for
/// keys@example.net; the reply to its DATA.
fn lmtp_transaction(at: SocketAddr, sender: &str, raw: &[u8]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::net::TcpStream::connect(at).expect("connect LMTP");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220 "));
    w.write_all(b"LHLO localhost\r\n").unwrap();
    assert!(reply().starts_with("250"));
    write!(
        w,
        "MAIL FROM:<{sender}>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\n"
    )
    .unwrap();
    for want in ["250", "250", "354"] {
        let got = reply();
        assert!(got.starts_with(want), "{want}: {got}");
    }
    let mut data = Vec::new();
    for line in raw.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b".") {
            data.push(b'.');
        }
        data.extend_from_slice(line);
    }
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".\r\nQUIT\r\n");
    w.write_all(&data).unwrap();
    reply()
}

/// Red team (counters and shares): the mail side does not use the web counters. With the
/// counter Redis down, the web look-ups of the same `kst serve` get 503 and `/readyz` is 503,
/// while a retrieval through its LMTP listener is answered (the key store's own limits
/// count it). (An orchestrator routing the LMTP side reads `/readyz/lmtp`, which stays 200:
/// `the_lmtp_side_is_ready_while_the_counter_redis_is_down`.)
#[test]
fn the_mail_side_answers_while_the_counter_redis_is_down() {
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    let mut counters = OwnRedis::start();
    let (web, http, lmtp) = (free_port(), free_port(), free_port());
    let serve = serve_lmtp(&kst, "serve", (web, http, lmtp), &counters, &[]);
    let rt = runtime();
    counters.down();
    let client = Ipv4Addr::new(127, 0, 0, 70);
    let deadline = Instant::now() + DEADLINE;
    while rt.block_on(get_from(client, web, FOUND)) != 503 {
        assert!(Instant::now() < deadline, "never 503:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(http, "/readyz").0, 503);
    assert_lmtp_finds_alice(lmtp, "192.0.2.44", &serve);
    drop(rt);
    assert_eq!(serve.stop(), 0);
}

/// A counter Redis that is down made `/readyz` 503, which takes the LMTP side out of a load
/// balancer's rotation too, though mail does not use those counters. Now each side has its
/// own readiness: with the counters' URL on a closed loopback port, `/readyz` (everything)
/// and `/readyz/web` are 503 naming the counters, `/readyz/lmtp` is 200 (also as JSON), and
/// a retrieval over LMTP is answered. Before: `/readyz/lmtp` was 404.
#[test]
fn the_lmtp_side_is_ready_while_the_counter_redis_is_down() {
    let kst = TestKst::with_store("", &Store::Fs);
    let gpg = Gpg::new();
    kst.publish_by_mail(&gpg.generate("Alice", "alice@example.net", "ed25519"));
    // A loopback port nobody listens on (bound, then closed).
    let closed = format!("redis://{}", free_port());
    let (web, http, lmtp) = (free_port(), free_port(), free_port());
    let serve = serve_url(&kst, "serve", (web, http, lmtp), &closed, &[]);

    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("web-counters(redis)"), "{body}");
    let (status, body) = http_get(http, "/readyz/web");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("web-counters(redis)"), "{body}");
    assert!(
        !body.contains("mailer("),
        "the web side sends no mail: {body}"
    );
    let (status, body) = http_get(http, "/readyz/lmtp");
    assert_eq!((status, body.as_str()), (200, "ready\n"), "{}", serve.log());
    let (status, body) = http_get(http, "/readyz/lmtp?format=json");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], true, "{body}");
    assert_eq!(json["store"]["name"], "fs", "{body}");

    assert_lmtp_finds_alice(lmtp, "192.0.2.45", &serve);
    assert_eq!(serve.stop(), 0);
}

/// `kst config check` says what is wrong with `[web.counters]` (exit 78) and `--probe`
/// reaches it (exit 69 when it cannot); a counter Redis with `appendonly no` passes the probe,
/// while the same server as the key store is still refused by the durability guard.
#[test]
fn config_check_validates_and_probes_the_counter_redis() {
    let kst = TestKst::with_store("", &Store::Fs);
    let out = kst.kst_env(
        &["config", "check"],
        b"",
        &[("KST_WEB__COUNTERS__BACKEND", "redis")],
    );
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web.counters.url"),
        "{}",
        stderr(&out)
    );

    let nowhere = format!("redis://{}", free_port());
    let out = kst.kst_env(
        &["config", "check", "--probe"],
        b"",
        &[
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__URL", &nowhere),
        ],
    );
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(stderr(&out).contains("redis-counters"), "{}", stderr(&out));

    let counters = OwnRedis::start();
    let url = counters.url();
    let out = kst.kst_env(
        &["config", "check", "--probe"],
        b"",
        &[
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__URL", &url),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("web counters"), "{}", stderr(&out));

    // The key store's guard is untouched: the same server as the key store is refused.
    let out = kst.kst_env(
        &["config", "check", "--probe"],
        b"",
        &[
            ("KST_STORE__BACKEND", "redis"),
            ("KST_STORE__URL", &url),
            ("KST_STORE__PREFIX", "ctr-keys:"),
        ],
    );
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("appendonly no"), "{}", stderr(&out));

    // Red team (counters and shares): the counters on the key store's own Redis are
    // accepted (nothing collides), with a warning that nothing is gained.
    let out = kst.kst_env(
        &["config", "check"],
        b"",
        &[
            ("KST_STORE__BACKEND", "redis"),
            ("KST_STORE__URL", &url),
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__URL", &format!("{url}/1")),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: web.counters names a server of the Redis key store"),
        "{}",
        stderr(&out)
    );
}
