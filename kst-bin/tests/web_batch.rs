//! Look-ups by address read in batches (`server::web::batch`) through the real listener on
//! PostgreSQL and on Redis: many concurrent VKS look-ups (keys found, addresses never
//! published, an address deleted, an address whose key was replaced) each get their own right
//! answer, the key of their own address, byte for byte.
//!
//! Needs PostgreSQL (`KST_TEST_POSTGRES_URL`, default postgres://postgres:postgres@127.0.0.1:5432/postgres)
//! and Redis (`KST_TEST_REDIS_URL`, default redis://127.0.0.1:6379), as the other tests
//! (scripts/services.sh).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kst_bin::server::web::{StoreLookup, WebConfig, WebLimits, WebService, serve};
use kst_core::testing::{DelegatingStore, StoreHooks};
use kst_core::{
    Address, AddressPolicy, Fingerprint, KeyRecord, KeyStore, MemoryRateLimiter, NewKey, Result,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Concurrent requests of the load.
const REQUESTS: usize = 400;

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

/// A test key of `kst-core/testdata/keys/` as binary packets, with its fingerprint.
fn testkey(name: &str) -> (Vec<u8>, Fingerprint) {
    let armored = std::fs::read_to_string(format!(
        "{}/../kst-core/testdata/keys/{name}.pub.asc",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let key = kst_core::openpgp::dearmor_public_key(&armored, 1 << 20).unwrap();
    let fingerprint = kst_core::certificate::Certificate::from_binary(&key)
        .unwrap()
        .fingerprint();
    (key, Fingerprint::parse(&fingerprint).unwrap())
}

async fn publish(store: &dyn KeyStore, address: &Address, name: &str) -> KeyRecord {
    let (key, fingerprint) = testkey(name);
    store
        .publish(NewKey {
            address: address.clone(),
            key,
            fingerprint,
            publication_id: format!("{:032x}", rand::random::<u128>()),
            published_at: 1_700_000_000,
            revoked: false,
            expected: kst_core::Expected::Any,
        })
        .await
        .unwrap()
        .record()
        .clone()
}

/// Over the real store: the calls that reach it counted (for the figures printed).
#[derive(Default)]
struct Counted {
    gets: AtomicUsize,
    batches: AtomicUsize,
    batched: AtomicUsize,
}

impl Counted {
    /// `store` with its calls counted from zero.
    fn over(store: &Arc<dyn KeyStore>) -> Arc<DelegatingStore<Counted>> {
        Arc::new(DelegatingStore::new(Arc::clone(store), Counted::default()))
    }
}

#[async_trait]
impl StoreHooks for Counted {
    async fn get(&self, inner: &dyn KeyStore, address: &Address) -> Result<Option<KeyRecord>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        inner.get(address).await
    }
    async fn get_many(
        &self,
        inner: &dyn KeyStore,
        addresses: &[Address],
    ) -> Result<Vec<Option<KeyRecord>>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.batched.fetch_add(addresses.len(), Ordering::SeqCst);
        inner.get_many(addresses).await
    }
}

/// `GET /vks/v1/by-email/<address>` on a connection of its own: status and body.
async fn vks(at: SocketAddr, address: &str) -> (u16, Vec<u8>) {
    vks_on(TcpStream::connect(at).await.expect("connect"), address).await
}

/// [`vks`] as the `i`-th request of a load from 16 clients (127.0.0.16 to 127.0.0.31): a
/// load of many users, each within its share of the web queues (`batcher::CLIENT_SHARE`:
/// past half a queue, one client's look-ups beyond 1/16 of it are refused, and 400 look-ups
/// of one client, queued faster than a loaded store reads them, got 503).
async fn vks_spread(at: SocketAddr, address: &str, i: usize) -> (u16, Vec<u8>) {
    let s = connect_from(&format!("127.0.0.{}", 16 + i % 16), at).await;
    vks_on(s, address).await
}

/// [`vks`] on the connection `s`.
async fn vks_on(mut s: TcpStream, address: &str) -> (u16, Vec<u8>) {
    let head = format!(
        "GET /vks/v1/by-email/{} HTTP/1.1\r\nHost: example.net\r\nConnection: close\r\n\r\n",
        address.replace('@', "%40")
    );
    s.write_all(head.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head end: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    (status, raw[split + 4..].to_vec())
}

/// The corrupt-record tests' store: three keys (address -> the key it must be served),
/// `misses` addresses without one (None: 404), and `broken@example.net` published, for the
/// test to corrupt.
async fn corrupt_record_set_up(
    s: &dyn KeyStore,
    misses: usize,
) -> (HashMap<String, Option<Vec<u8>>>, Address) {
    let mut want: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    for (local, name) in [
        ("alice", "alice"),
        ("subkeys", "subkeys"),
        ("rsa", "rsa1024"),
    ] {
        let a = addr(&format!("{local}@example.net"));
        want.insert(a.to_string(), Some(publish(s, &a, name).await.key));
    }
    for i in 0..misses {
        want.insert(format!("nobody-{i}@example.net"), None);
    }
    let broken = addr("broken@example.net");
    publish(s, &broken, "dsa-elg").await;
    (want, broken)
}

/// Publishes the test's keys to `store`, serves it with its look-ups batched, sends
/// [`REQUESTS`] look-ups at once and checks each answer.
async fn each_look_up_gets_its_own_answer(store: Arc<dyn KeyStore>) {
    let counted = Counted::over(&store);
    let s: &dyn KeyStore = &*store;
    // Address -> the key it must be served (None: 404).
    let mut want: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    for (local, name) in [
        ("alice", "alice"),
        ("subkeys", "subkeys"),
        ("dsa", "dsa-elg"),
        ("rsa", "rsa1024"),
        ("foreign", "foreign"),
        ("expired", "expired"),
    ] {
        let a = addr(&format!("{local}@example.net"));
        let r = publish(s, &a, name).await;
        want.insert(a.to_string(), Some(r.key));
    }
    let replaced = addr("replaced@example.net");
    publish(s, &replaced, "lifecycle-v1").await;
    let now = publish(s, &replaced, "lifecycle-v2").await;
    assert_eq!(now.version, 2);
    want.insert(replaced.to_string(), Some(now.key));
    let deleted = addr("deleted@example.net");
    publish(s, &deleted, "sha1").await;
    assert!(s.delete(&deleted).await.unwrap());
    want.insert(deleted.to_string(), None);
    for i in 0..6 {
        want.insert(format!("nobody-{i}@example.net"), None);
    }

    let lookup = StoreLookup::new(counted.clone());
    assert!(lookup.batches(), "{} reads in batches", store.name());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let service = WebService {
        lookup: Arc::new(lookup),
        counters: Arc::new(MemoryRateLimiter::new()),
        domains: vec!["example.net".into()],
        address_policy: AddressPolicy::default(),
        config: WebConfig {
            listen: at.to_string(),
            limits: WebLimits::OFF,
            max_connections: 4096,
            max_connections_per_client: 4096,
            ..WebConfig::default()
        },
        log_keys: Default::default(),
    };
    let server = tokio::spawn(async move {
        serve(listener, service, std::future::pending())
            .await
            .unwrap();
    });

    let mut addresses: Vec<String> = want.keys().cloned().collect();
    addresses.sort();
    let start = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let address = addresses[i % addresses.len()].clone();
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let answer = vks_spread(at, &address, i).await;
                (address, answer)
            })
        })
        .collect();
    let (mut found, mut missing) = (0, 0);
    for t in tasks {
        let (address, (status, body)) = t.await.expect("request task");
        match &want[&address] {
            Some(key) => {
                assert_eq!(status, 200, "{address}: {}", String::from_utf8_lossy(&body));
                let served = kst_core::openpgp::dearmor_public_key(
                    std::str::from_utf8(&body).expect("armored text"),
                    1 << 20,
                )
                .unwrap_or_else(|e| panic!("{address}: served no armored key: {e}"));
                assert!(served == *key, "{address}: served another key");
                found += 1;
            }
            None => {
                assert_eq!(status, 404, "{address}: {}", String::from_utf8_lossy(&body));
                missing += 1;
            }
        }
    }
    assert_eq!(found + missing, REQUESTS);
    eprintln!(
        "{}: {REQUESTS} look-ups ({found} found, {missing} not) read in {} get and {} get_many \
         ({} addresses) calls",
        store.name(),
        counted.gets.load(Ordering::SeqCst),
        counted.batches.load(Ordering::SeqCst),
        counted.batched.load(Ordering::SeqCst)
    );
    server.abort();
}

fn postgres_admin() -> String {
    std::env::var("KST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

async fn admin_sql(sql: String) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&postgres_admin())
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable (scripts/services.sh starts it): {e}")
        });
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .expect("admin statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_look_ups_each_get_their_own_answer() {
    let db = format!("kst_webbatch_{:016x}", rand::random::<u64>());
    admin_sql(format!("CREATE DATABASE {db}")).await;
    let url = kst_postgres::with_database(&postgres_admin(), &db);
    let store = kst_postgres::PostgresStore::builder(&url)
        .max_connections(8)
        .connect()
        .await
        .expect("connect to the test database");
    each_look_up_gets_its_own_answer(Arc::new(store)).await;
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_concurrent_look_ups_each_get_their_own_answer() {
    let url =
        std::env::var("KST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("kst-webbatch-{:016x}:", rand::random::<u64>());
    let store = kst_redis::RedisStore::connect(&url, &prefix)
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable (scripts/services.sh starts it): {e}"));
    each_look_up_gets_its_own_answer(Arc::new(store)).await;
    // The test's keys go with their prefix.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// The fs store's look-ups read local files: nothing to gain from batches, each goes alone.
#[tokio::test]
async fn fs_look_ups_go_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = kst_fs::FsStore::open(dir.path().join("store"))
        .await
        .unwrap();
    assert!(!StoreLookup::new(Arc::new(store)).batches());
}

// Red team round 9: the read batcher attacked through the real listener on PostgreSQL, the
// store stalled for real (a transaction holding `LOCK TABLE kst_keys`), so that look-ups queue.

/// Held by the tests that flood the loopback with connections or stall a store, one at a
/// time: thousands of connections of one (and their ports) disturb another's timing.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh PostgreSQL database with the schema: its store, and its URL.
async fn postgres_store() -> (Arc<dyn KeyStore>, String, String) {
    let db = format!("kst_webbatch_{:016x}", rand::random::<u64>());
    admin_sql(format!("CREATE DATABASE {db}")).await;
    let url = kst_postgres::with_database(&postgres_admin(), &db);
    let store = kst_postgres::PostgresStore::builder(&url)
        .max_connections(8)
        .connect()
        .await
        .expect("connect to the test database");
    (Arc::new(store), url, db)
}

/// A transaction on `url` holding `kst_keys` locked: every read of the store waits until
/// [`unlock`].
async fn lock_keys(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE kst_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .expect("lock kst_keys");
    conn
}

async fn unlock(mut conn: sqlx::PgConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("unlock");
}

/// Serves `lookup` with `config` on a free port of 127.0.0.1.
async fn serve_lookup(lookup: StoreLookup, config: WebConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let service = WebService {
        lookup: Arc::new(lookup),
        counters: Arc::new(MemoryRateLimiter::new()),
        domains: vec!["example.net".into()],
        address_policy: AddressPolicy::default(),
        config: WebConfig {
            listen: at.to_string(),
            ..config
        },
        log_keys: Default::default(),
    };
    tokio::spawn(async move {
        serve(listener, service, std::future::pending())
            .await
            .unwrap();
    });
    at
}

/// A connection to `at` from the loopback address `source` (another client than 127.0.0.1).
async fn connect_from(source: &str, at: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{source}:0").parse().unwrap())
        .expect("bind a loopback source address");
    socket.connect(at).await.expect("connect")
}

/// The request head of `GET /vks/v1/by-email/<address>`.
fn by_email(address: &str) -> String {
    format!(
        "GET /vks/v1/by-email/{} HTTP/1.1\r\nHost: example.net\r\nConnection: close\r\n\r\n",
        address.replace('@', "%40")
    )
}

/// Status and body of the response on `s` to `request`.
async fn exchange(mut s: TcpStream, request: &str) -> (u16, Vec<u8>) {
    s.write_all(request.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    let status = std::str::from_utf8(raw.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, raw.get(split + 4..).unwrap_or_default().to_vec())
}

/// Unlocks the store (`lock`) and waits for the victim's look-up: answered 200 within 10 s,
/// its body an armored key, which it returns.
async fn served_once_unlocked(
    lock: sqlx::PgConnection,
    victim: tokio::task::JoinHandle<(u16, Vec<u8>)>,
) -> Vec<u8> {
    unlock(lock).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), victim)
        .await
        .expect("answered once the store is back")
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    kst_core::openpgp::dearmor_public_key(std::str::from_utf8(&body).unwrap(), 1 << 20).unwrap()
}

/// Red team round 9: look-ups whose client closed the connection stayed in the batcher's
/// queue (512 places) until a batch took them. A client held at most 64 connections at once
/// (`max_connections_per_client`), but by sending look-ups and closing the connections it
/// queued as many as its request budget allowed (1,000 per window by default): while the
/// store was slow, one client filled the queue and every other client's look-up was answered
/// 503 at once. Look-ups nobody waits for now hold no place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_look_ups_whose_client_went_away_hold_no_place_in_the_queue() {
    let _one_at_a_time = FLOODS.lock().await;
    let (store, url, db) = postgres_store().await;
    let alice = addr("alice@example.net");
    let key = publish(&*store, &alice, "alice").await.key;
    let at = serve_lookup(
        StoreLookup::new(Arc::clone(&store)),
        WebConfig {
            // The defaults: 1,000 requests and 100 misses per client and window, 64
            // connections per client.
            limits: WebLimits::default(),
            ..WebConfig::default()
        },
    )
    .await;

    let lock = lock_keys(&url).await;
    // The attacker (127.0.0.1): rounds of 64 look-ups (its connection cap), each connection
    // closed once the look-up waits, 640 in all (within its request budget; each a miss would
    // be, but none is answered, so none is counted).
    for round in 0..10 {
        let mut open = Vec::new();
        for i in 0..64 {
            let mut s = TcpStream::connect(at).await.expect("connect");
            let _ = s
                .write_all(by_email(&format!("nobody-{round}-{i}@example.net")).as_bytes())
                .await;
            open.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(open);
        // The listener notices the closed connections and frees their slots.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another client (127.0.0.2) asks for a key meanwhile: it waits for the store, as it would
    // without the attacker.
    let victim = tokio::spawn(async move {
        let s = connect_from("127.0.0.2", at).await;
        exchange(s, &by_email("alice@example.net")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if victim.is_finished() {
        let (status, body) = victim.await.unwrap();
        panic!(
            "another client's look-up was answered {status} while the store was slow: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let served = served_once_unlocked(lock, victim).await;
    assert!(served == key, "alice's own key");
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Red team (counters and shares): a client is an IPv4 address or an IPv6 /64, and each
/// may hold 1/16 of a web queue once it is half full; but a /56 (a home connection's
/// delegation) holds 256 /64s. Behind a trusted proxy, 16 /64s of one /48 send 40 look-ups
/// each (all within their request and miss budgets) while the store is stalled: within
/// their shares they held the counters' whole queue (room for their misses), and another
/// client's look-up was answered 503 at once. Past half a queue, the clients of one /48 now
/// hold at most a quarter of it together, so the other client's look-up waits for the store
/// like theirs and is answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_many_ipv6_clients_of_one_network_leave_room_for_another() {
    let _one_at_a_time = FLOODS.lock().await;
    let db = format!("kst_webbatch_{:016x}", rand::random::<u64>());
    admin_sql(format!("CREATE DATABASE {db}")).await;
    let url = kst_postgres::with_database(&postgres_admin(), &db);
    // Reads wait for the lock as long as the test holds it (the default 10 s operation
    // timeout would answer the flood 503 on a loaded machine before the victim asks).
    let store: Arc<dyn KeyStore> = Arc::new(
        kst_postgres::PostgresStore::builder(&url)
            .max_connections(8)
            .operation_timeout(Duration::from_secs(120))
            .acquire_timeout(Duration::from_secs(120))
            .connect()
            .await
            .expect("connect to the test database"),
    );
    let alice = addr("alice@example.net");
    let key = publish(&*store, &alice, "alice").await.key;
    let at = serve_lookup(
        StoreLookup::new(Arc::clone(&store)),
        WebConfig {
            // The defaults, behind a proxy on 127.0.0.1 that names the client.
            limits: WebLimits::default(),
            trusted_proxies: vec!["127.0.0.1".into()],
            ..WebConfig::default()
        },
    )
    .await;

    let lock = lock_keys(&url).await;
    let mut flood = Vec::new();
    for c in 0..16 {
        for i in 0..40 {
            let request = format!(
                "GET /vks/v1/by-email/nobody-{c}-{i}%40example.net HTTP/1.1\r\nHost: example.net\r\n\
                 X-Forwarded-For: 2001:db8:1:{c:x}::{:x}\r\nConnection: close\r\n\r\n",
                i + 1
            );
            flood.push(tokio::spawn(async move {
                let s = TcpStream::connect(at).await.expect("connect");
                exchange(s, &request).await
            }));
        }
    }
    // The flood settles: its look-ups wait for the store, or were refused (at once, or after
    // the write-behind's second of grace when its writes find no room either).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut refused, mut stable) = (0, 0);
    while stable < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never settled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let finished = flood.iter().filter(|t| t.is_finished()).count();
        stable = if finished == refused && finished > 0 {
            stable + 1
        } else {
            0
        };
        refused = finished;
    }
    // Another client (127.0.0.2, not behind the proxy) asks for a key meanwhile.
    let victim = tokio::spawn(async move {
        let s = connect_from("127.0.0.2", at).await;
        exchange(s, &by_email("alice@example.net")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if victim.is_finished() {
        let (status, body) = victim.await.unwrap();
        unlock(lock).await;
        panic!(
            "another client's look-up was answered {status} while one /48's clients flooded \
             ({refused} of their 640 refused): {}",
            String::from_utf8_lossy(&body)
        );
    }
    let served = served_once_unlocked(lock, victim).await;
    assert!(served == key, "alice's own key");
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in flood {
        let (status, _) = t.await.unwrap();
        *statuses.entry(status).or_default() += 1;
    }
    assert!(
        refused > 0 && statuses.keys().all(|s| [404, 503].contains(s)),
        "the flood is bounded, and answered 404 or 503: {statuses:?}"
    );
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Red team round 9 (held): a client refused for its request budget (429) is answered before
/// any look-up, so it takes no place in the batcher's queue, even while the store is stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_refused_client_takes_no_place_in_the_queue() {
    let _one_at_a_time = FLOODS.lock().await;
    let (store, url, db) = postgres_store().await;
    let alice = addr("alice@example.net");
    publish(&*store, &alice, "alice").await;
    let at = serve_lookup(
        StoreLookup::new(Arc::clone(&store)),
        WebConfig {
            limits: WebLimits {
                per_client: 2,
                ..WebLimits::default()
            },
            max_connections: 4096,
            max_connections_per_client: 4096,
            ..WebConfig::default()
        },
    )
    .await;
    let lock = lock_keys(&url).await;
    // Its two admitted look-ups wait for the store; the next 600, at once, are refused
    // without waiting for it: 429 by its budget, or 503 when its share of the counters' queue
    // (`batcher::CLIENT_SHARE`) is full of its own refusals being counted (under load).
    let admitted: Vec<_> = (0..2)
        .map(|i| tokio::spawn(async move { vks(at, &format!("nobody-{i}@example.net")).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused: Vec<_> = (0..600)
        .map(|i| tokio::spawn(async move { vks(at, &format!("flood-{i}@example.net")).await }))
        .collect();
    let mut too_many = 0;
    for r in refused {
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("refused without waiting for the store")
            .unwrap();
        assert!([429, 503].contains(&status), "{status}");
        too_many += usize::from(status == 429);
    }
    assert!(too_many > 0, "refused by its budget");
    let victim = tokio::spawn(async move {
        let s = connect_from("127.0.0.2", at).await;
        exchange(s, &by_email("alice@example.net")).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !victim.is_finished(),
        "another client's look-up waits for the store"
    );
    unlock(lock).await;
    assert_eq!(victim.await.unwrap().0, 200);
    for a in admitted {
        assert_eq!(a.await.unwrap().0, 404);
    }
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Fairness (red team round 9, what remained): four clients (127.0.0.11 to .14) with 150
/// look-ups each in flight while the store is stalled (`LOCK TABLE kst_keys`): before, they
/// filled the read batcher's queue (512 look-ups) and another client's look-up was answered
/// 503 at once. Past half the queue a client may hold 32 look-ups in it
/// (`batcher::CLIENT_SHARE`): the flood's surplus is refused (503) at once, and the other
/// client's look-up waits for the store and gets its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_few_clients_flooding_a_stalled_store_leave_room_for_another() {
    let _one_at_a_time = FLOODS.lock().await;
    let (store, url, db) = postgres_store().await;
    publish(&*store, &addr("alice@example.net"), "alice").await;
    let at = serve_lookup(
        StoreLookup::new(Arc::clone(&store)),
        WebConfig {
            limits: WebLimits::OFF,
            max_connections: 4096,
            max_connections_per_client: 4096,
            ..WebConfig::default()
        },
    )
    .await;
    let lock = lock_keys(&url).await;
    let flood: Vec<_> = (11..=14)
        .flat_map(|c| (0..150).map(move |i| (c, i)))
        .map(|(c, i)| {
            tokio::spawn(async move {
                let s = connect_from(&format!("127.0.0.{c}"), at).await;
                exchange(s, &by_email(&format!("flood{c}-{i}@example.net")))
                    .await
                    .0
            })
        })
        .collect();
    // Until the flood has settled: its surplus answered at once, the rest waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut settled = (0, std::time::Instant::now());
    loop {
        let done = flood.iter().filter(|t| t.is_finished()).count();
        if done != settled.0 {
            settled = (done, std::time::Instant::now());
        } else if done > 0 && settled.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = tokio::spawn(async move {
        let s = connect_from("127.0.0.2", at).await;
        exchange(s, &by_email("alice@example.net")).await.0
    });
    while !victim.is_finished() && settled.1.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unlock(lock).await;
    assert_eq!(
        victim.await.unwrap(),
        200,
        "another client's look-up waits for the store and is answered"
    );
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for t in flood {
        *statuses.entry(t.await.unwrap()).or_default() += 1;
    }
    eprintln!("the flood's answers: {statuses:?}");
    assert_eq!(
        statuses.keys().filter(|s| ![404, 503].contains(*s)).count(),
        0,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) >= 600 - 512,
        "the surplus is refused: {statuses:?}"
    );
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Red team round 9: a look-up of an address whose record cannot be read (here: its current
/// version missing from the history) made its batch be read again one address at a time, a
/// round trip each, holding one of the two readers meanwhile: a client asking for that
/// address over and over multiplied the store's load by the batch size. Each look-up still
/// gets its own answer (503 for the corrupt record only); the batch costs a few round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_corrupt_record_costs_its_batch_a_few_round_trips() {
    let _one_at_a_time = FLOODS.lock().await;
    let (store, url, db) = postgres_store().await;
    let counted = Counted::over(&store);
    let s: &dyn KeyStore = &*store;
    let (want, broken) = corrupt_record_set_up(s, 100).await;
    admin_on(
        &url,
        "UPDATE kst_keys SET current_version = current_version + 100 \
         WHERE address = 'broken@example.net'",
    )
    .await;
    let at = serve_lookup(
        StoreLookup::new(counted.clone()),
        WebConfig {
            limits: WebLimits::OFF,
            max_connections: 4096,
            max_connections_per_client: 4096,
            ..WebConfig::default()
        },
    )
    .await;

    let lock = lock_keys(&url).await;
    // Two look-ups take the two readers (waiting for the store); the others queue, and are
    // read in one batch when the store is back.
    let mut tasks: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                (
                    "alice@example.net".to_string(),
                    vks(at, "alice@example.net").await,
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut asked: Vec<String> = want.keys().cloned().collect();
    asked.push(broken.to_string());
    for address in asked {
        tasks.push(tokio::spawn(async move {
            let answer = vks(at, &address).await;
            (address, answer)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    for t in tasks {
        let (address, (status, body)) = t.await.unwrap();
        match want.get(&address) {
            Some(Some(key)) => {
                assert_eq!(status, 200, "{address}");
                let served = kst_core::openpgp::dearmor_public_key(
                    std::str::from_utf8(&body).unwrap(),
                    1 << 20,
                )
                .unwrap();
                assert!(served == *key, "{address}: served another key");
            }
            Some(None) => assert_eq!(status, 404, "{address}"),
            None => assert_eq!(status, 503, "{address}: the corrupt record is not served"),
        }
    }
    let (gets, batches) = (
        counted.gets.load(Ordering::SeqCst),
        counted.batches.load(Ordering::SeqCst),
    );
    eprintln!(
        "104 look-ups queued behind a stalled store, one record corrupt: {gets} get and {batches} get_many calls"
    );
    // The two first look-ups, the batch of 104, then about 2 log2(104) halves and singles.
    assert!(
        gets + batches <= 2 + 1 + 2 * 7 + 2,
        "{gets} get and {batches} get_many calls"
    );
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Runs `sql` on the database at `url`.
async fn admin_on(url: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .expect("statement");
}

/// Red team round 9 (the corrupt record, on Redis): a record whose JSON cannot be read fails
/// the look-ups of its own address only (503), however the concurrent look-ups were batched
/// with it; every other look-up gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_corrupt_record_fails_its_own_look_ups_only() {
    let url =
        std::env::var("KST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("kst-webbatch-{:016x}:", rand::random::<u64>());
    let store: Arc<dyn KeyStore> = Arc::new(
        kst_redis::RedisStore::connect(&url, &prefix)
            .await
            .unwrap_or_else(|e| panic!("Redis is not reachable: {e}")),
    );
    let counted = Counted::over(&store);
    let s: &dyn KeyStore = &*store;
    let (want, broken) = corrupt_record_set_up(s, 20).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}{{broken@example.net}}:cur"))
        .arg("{\"not\": \"a record\"")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        s.get(&broken).await.is_err(),
        "the record is unreadable now"
    );

    let at = serve_lookup(
        StoreLookup::new(counted.clone()),
        WebConfig {
            limits: WebLimits::OFF,
            max_connections: 4096,
            max_connections_per_client: 4096,
            ..WebConfig::default()
        },
    )
    .await;
    let mut asked: Vec<String> = want.keys().cloned().collect();
    asked.push(broken.to_string());
    asked.sort();
    let start = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let address = asked[i % asked.len()].clone();
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let answer = vks_spread(at, &address, i).await;
                (address, answer)
            })
        })
        .collect();
    for t in tasks {
        let (address, (status, body)) = t.await.unwrap();
        match want.get(&address) {
            Some(Some(key)) => {
                assert_eq!(status, 200, "{address}");
                let served = kst_core::openpgp::dearmor_public_key(
                    std::str::from_utf8(&body).unwrap(),
                    1 << 20,
                )
                .unwrap();
                assert!(served == *key, "{address}: served another key");
            }
            Some(None) => assert_eq!(status, 404, "{address}"),
            None => assert_eq!(status, 503, "{address}: the corrupt record is not served"),
        }
    }
    eprintln!(
        "redis: {REQUESTS} look-ups, one address of {} corrupt: {} get and {} get_many calls",
        asked.len(),
        counted.gets.load(Ordering::SeqCst),
        counted.batches.load(Ordering::SeqCst)
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Serves `lookup` with `config` on a free port of 127.0.0.1, its limits counted in
/// `counters` (a pool's listeners share the store's).
async fn serve_counted_by(
    lookup: StoreLookup,
    counters: Arc<dyn kst_core::RateLimiter>,
    config: WebConfig,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let service = WebService {
        lookup: Arc::new(lookup),
        counters,
        domains: vec!["example.net".into()],
        address_policy: AddressPolicy::default(),
        config: WebConfig {
            listen: at.to_string(),
            ..config
        },
        log_keys: Default::default(),
    };
    tokio::spawn(async move {
        serve(listener, service, std::future::pending())
            .await
            .unwrap();
    });
    at
}

/// Red team round 9, the per-client request counter written behind the requests
/// (`server::web::writebehind`) on PostgreSQL's counters: a client floods a pool of two
/// listeners from 32 connections while the counters are stalled (a transaction holding
/// `LOCK TABLE kst_rate_limits`), hoping that requests admitted while no count can be written
/// escape its limit. Once the counters answer again it has had its limit and at most 8 more
/// per listener (CAP), stays refused, and others are served. (The counter it replaced,
/// `precount.rs`, admitted only 19 of the 64 here: each of the 32 requests that found no
/// reservation wrote one of 8, and the refusals of the surplus replaced the admissions.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_client_flooding_a_pool_while_the_counters_stall_gets_its_limit() {
    let _one_at_a_time = FLOODS.lock().await;
    const LIMIT: u32 = 64;
    let (store, url, db) = postgres_store().await;
    let counters: Arc<dyn kst_core::RateLimiter> = Arc::new(
        kst_postgres::PostgresStore::builder(&url)
            .max_connections(8)
            .connect()
            .await
            .expect("connect to the test database"),
    );
    let config = || WebConfig {
        trusted_proxies: vec!["127.0.0.1".into()],
        limits: WebLimits {
            per_client: LIMIT,
            ..WebLimits::OFF
        },
        ..WebConfig::default()
    };
    let pool = [
        serve_counted_by(
            StoreLookup::new(Arc::clone(&store)),
            Arc::clone(&counters),
            config(),
        )
        .await,
        serve_counted_by(
            StoreLookup::new(Arc::clone(&store)),
            Arc::clone(&counters),
            config(),
        )
        .await,
    ];
    let policy = |at: SocketAddr, client: &'static str| async move {
        let Ok(s) = TcpStream::connect(at).await else {
            return 0;
        };
        let request = format!(
            "GET /.well-known/openpgpkey/policy HTTP/1.1\r\nHost: example.net\r\n\
             Connection: close\r\nX-Forwarded-For: {client}\r\n\r\n"
        );
        tokio::time::timeout(Duration::from_secs(20), exchange(s, &request))
            .await
            .map_or(0, |(status, _)| status)
    };
    // The counters' table exists once a count was written.
    assert_eq!(policy(pool[0], "198.51.100.99").await, 200);
    let lock = {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE kst_rate_limits IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock kst_rate_limits");
        conn
    };
    let client = "198.51.100.7";
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let at = pool[i % 2];
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..6 {
                    statuses.push(policy(at, client).await);
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = tasks.iter().filter(|t| t.is_finished()).count();
    eprintln!("{done} of 32 connections done while the counters stalled");
    // 8 requests admitted at once per listener: at most 2 connections' 6 each.
    assert!(
        done <= 2,
        "{done} connections done: each waits for a count past its listener's 8"
    );
    unlock(lock).await;
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u32;
    let refused = statuses.iter().filter(|s| **s == 429).count() as u32;
    eprintln!("{admitted} admitted, {refused} refused of a limit of {LIMIT} over two listeners");
    assert_eq!(admitted + refused, 32 * 6, "only 200 and 429: {statuses:?}");
    assert!(
        (LIMIT..=LIMIT + 2 * 8).contains(&admitted),
        "{admitted} admitted of a limit of {LIMIT} over two listeners"
    );
    for at in pool {
        assert_eq!(policy(at, client).await, 429, "refused stays refused");
        assert_eq!(policy(at, "198.51.100.8").await, 200, "others served");
    }
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}

/// Red team round 9, the per-client request counter written behind the requests: a request
/// that goes away while it waits for the counters' verdict leaves its hit pending (it is
/// counted all the same), and while the counters stalled (here `LOCK TABLE kst_rate_limits`),
/// one client (127.0.0.1, within its 64 connections) that sent requests and closed their
/// connections filled the bound of hits outstanding (16,384), so that another client's first
/// request, which is admitted at once while the counters have not failed yet, was answered
/// 503. One client's hits outstanding are now bounded (128): its own requests beyond are
/// refused (503), another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_abandoned_requests_of_one_client_do_not_fill_the_counts_outstanding() {
    let _one_at_a_time = FLOODS.lock().await;
    let (store, url, db) = postgres_store().await;
    let counters: Arc<dyn kst_core::RateLimiter> = Arc::new(
        kst_postgres::PostgresStore::builder(&url)
            .max_connections(8)
            // The stall outlasts the test: no flush fails meanwhile (a flush is a write: the
            // write timeout, 5 s by default, cut it off when the flood took 20 s at load 11).
            .write_timeout(Duration::from_secs(100))
            .operation_timeout(Duration::from_secs(120))
            .connect()
            .await
            .expect("connect"),
    );
    let at = serve_counted_by(
        StoreLookup::new(Arc::clone(&store)),
        Arc::clone(&counters),
        WebConfig {
            limits: WebLimits {
                per_client_misses: 0,
                global_misses: 0,
                ..WebLimits::default()
            },
            ..WebConfig::default()
        },
    )
    .await;
    let policy = "GET /.well-known/openpgpkey/policy HTTP/1.1\r\nHost: example.net\r\nConnection: close\r\n\r\n";
    assert_eq!(
        exchange(TcpStream::connect(at).await.unwrap(), policy)
            .await
            .0,
        200
    );
    let lock = {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql("BEGIN; LOCK TABLE kst_rate_limits IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .expect("lock");
        conn
    };
    let s = connect_from("127.0.0.3", at).await;
    assert_eq!(
        exchange(s, policy).await.0,
        200,
        "a client is served while the counters stall"
    );
    let started = std::time::Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                while sent.load(Ordering::SeqCst) < 20_000 {
                    if let Ok(mut s) = TcpStream::connect(at).await {
                        let _ = s.write_all(policy.as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // The listener works off the connections it accepted (seconds on a loaded debug build).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = connect_from("127.0.0.2", at).await;
    let victim = tokio::time::timeout(Duration::from_secs(20), exchange(s, policy)).await;
    eprintln!(
        "{} requests sent and abandoned in {:?}; another client: {:?}",
        sent.load(Ordering::SeqCst),
        started.elapsed(),
        victim.as_ref().map(|v| v.0)
    );
    assert_eq!(
        victim.map(|v| v.0).ok(),
        Some(200),
        "another client's first request is admitted at once while the counters stall"
    );
    // The flooding client's own requests are refused while its counts wait.
    let own = tokio::time::timeout(
        Duration::from_secs(20),
        exchange(TcpStream::connect(at).await.unwrap(), policy),
    )
    .await;
    assert_eq!(own.map(|v| v.0).ok(), Some(503));
    unlock(lock).await;
    admin_sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
}
