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

use async_trait::async_trait;
use kst_bin::server::web::{StoreLookup, WebConfig, WebLimits, WebService, serve};
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, AddressPolicy, Fingerprint, KeyId, KeyRecord, KeyStore, MemoryRateLimiter, NewKey,
    PublishOutcome, Result,
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

/// The real store, with the calls that reach it counted (for the figures printed).
struct Counted {
    inner: Arc<dyn KeyStore>,
    gets: AtomicUsize,
    batches: AtomicUsize,
    batched: AtomicUsize,
}

#[async_trait]
impl KeyStore for Counted {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.inner.publish(key).await
    }
    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(address).await
    }
    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.batched.fetch_add(addresses.len(), Ordering::SeqCst);
        self.inner.get_many(addresses).await
    }
    fn batches_reads(&self) -> bool {
        self.inner.batches_reads()
    }
    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.inner.history(address).await
    }
    async fn delete(&self, address: &Address) -> Result<bool> {
        self.inner.delete(address).await
    }
    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.inner.list(after, limit).await
    }
    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.inner.restore(history).await
    }
    async fn find_by_fingerprint(&self, f: &Fingerprint, limit: usize) -> Result<Vec<KeyRecord>> {
        self.inner.find_by_fingerprint(f, limit).await
    }
    async fn find_by_key_id(&self, k: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.inner.find_by_key_id(k, limit).await
    }
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        self.inner.find_by_wkd_hash(domain, hash).await
    }
    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }
}

/// `GET /vks/v1/by-email/<address>` on a connection of its own: status and body.
async fn vks(at: SocketAddr, address: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(at).await.expect("connect");
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

/// Publishes the test's keys to `store`, serves it with its look-ups batched, sends
/// [`REQUESTS`] look-ups at once and checks each answer.
async fn each_look_up_gets_its_own_answer(store: Arc<dyn KeyStore>) {
    let counted = Arc::new(Counted {
        inner: Arc::clone(&store),
        gets: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
        batched: AtomicUsize::new(0),
    });
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
                let answer = vks(at, &address).await;
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
