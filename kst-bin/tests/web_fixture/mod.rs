//! The fixture of the `[web]` listener tests (`web.rs`, `web_attacks.rs`): a real filesystem
//! store holding gpg-made test keys, served by the real listener on a free loopback port, its
//! look-ups by scanning the store.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use kst_bin::server::web::{KeyLookup, WebConfig, WebLimits, WebService, serve};
use kst_core::certificate::{Certificate, KeyHandle};
use kst_core::validate::{KeyPolicy, validate};
use kst_core::wkd::WkdHash;
use kst_core::{
    Address, AddressPolicy, KeyRecord, KeyStore, MemoryRateLimiter, NewKey, RateLimiter,
};
use kst_fs::FsStore;
use tokio::net::TcpListener;

/// A test key of `kst-core/testdata/keys/`, armored.
pub fn testkey(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../kst-core/testdata/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// `s` as a normalized address.
pub fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Publishes `armored` for `address` the way a mail publication does (validated, stripped);
/// returns the key's fingerprint.
pub async fn publish(store: &FsStore, armored: &str, address: &str) -> String {
    let a = addr(address);
    let v = validate(armored, &a, &KeyPolicy::default(), SystemTime::now()).unwrap();
    store
        .publish(NewKey {
            address: a,
            key: v.packets,
            fingerprint: v.fingerprint.clone(),
            publication_id: hex::encode(rand::random::<[u8; 16]>()),
            published_at: now(),
            revoked: v.revoked,
            expected: kst_core::Expected::Any,
        })
        .await
        .unwrap();
    v.fingerprint.to_string()
}

/// The listener's configuration with every limit off.
pub fn open() -> WebConfig {
    WebConfig {
        limits: WebLimits::OFF,
        ..WebConfig::default()
    }
}

/// Look-ups on a real store: by address through the store, the rest by scanning every address
/// (test-only; the stores get indexes in phase 2).
pub struct ScanLookup(pub Arc<FsStore>);

impl ScanLookup {
    async fn all(&self) -> kst_core::Result<Vec<KeyRecord>> {
        let mut out = Vec::new();
        let mut after: Option<Address> = None;
        loop {
            let page = self.0.list(after.as_ref(), 100).await?;
            let Some(last) = page.last().cloned() else {
                return Ok(out);
            };
            for a in &page {
                out.extend(self.0.get(a).await?);
            }
            after = Some(last);
        }
    }
}

#[async_trait]
impl KeyLookup for ScanLookup {
    fn name(&self) -> &'static str {
        "fs-scan"
    }
    async fn by_address(&self, address: &Address) -> kst_core::Result<Option<KeyRecord>> {
        self.0.get(address).await
    }
    async fn by_wkd_hash(
        &self,
        domain: &str,
        hash: &WkdHash,
    ) -> kst_core::Result<Option<KeyRecord>> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .find(|r| r.address.domain() == domain && WkdHash::of_address(&r.address) == *hash))
    }
    async fn by_fingerprint(&self, fpr: &str) -> kst_core::Result<Vec<KeyRecord>> {
        self.matching(|h| h.fingerprint == fpr).await
    }
    async fn by_key_id(&self, id: &str) -> kst_core::Result<Vec<KeyRecord>> {
        self.matching(|h| h.key_id == id).await
    }
}

impl ScanLookup {
    /// Records whose primary key or a subkey satisfies `wanted`.
    async fn matching(
        &self,
        wanted: impl Fn(&KeyHandle) -> bool,
    ) -> kst_core::Result<Vec<KeyRecord>> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .filter(|r| {
                let h = Certificate::from_binary(&r.key).unwrap().handles();
                wanted(&h.primary) || h.subkeys.iter().any(&wanted)
            })
            .collect())
    }
}

/// A running listener and its store.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The store behind it.
    pub store: Arc<FsStore>,
    _dir: tempfile::TempDir,
}

/// A fresh filesystem store in a temporary directory, holding alice@example.net's key
/// (`alice.pub.asc`) as published by mail.
pub async fn alice_store() -> (tempfile::TempDir, Arc<FsStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path().join("store")).await.unwrap());
    publish(&store, &testkey("alice.pub.asc"), "alice@example.net").await;
    (dir, store)
}

/// Serves `store` (in `dir`, kept as long as the server) for `domains` with `config` on a free
/// port of 127.0.0.1, its look-ups through [`ScanLookup`].
pub async fn serve_store(
    (dir, store): (tempfile::TempDir, Arc<FsStore>),
    domains: &[&str],
    config: WebConfig,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = WebService {
        lookup: Arc::new(ScanLookup(Arc::clone(&store))),
        counters: Arc::new(MemoryRateLimiter::new()),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        address_policy: AddressPolicy::default(),
        config: WebConfig {
            listen: addr.to_string(),
            ..config
        },
        log_keys: Default::default(),
    };
    tokio::spawn(async move {
        serve(listener, service, std::future::pending())
            .await
            .unwrap();
    });
    Server {
        addr,
        store,
        _dir: dir,
    }
}

/// Serves `store` for `domains` with `config` on a free port of 127.0.0.1, its limits counted
/// in `counters` (the store's own, say, shared with other listeners as a pool shares them):
/// where it listens.
pub async fn serve_counted(
    store: Arc<FsStore>,
    counters: Arc<dyn RateLimiter>,
    domains: &[&str],
    config: WebConfig,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = WebService {
        lookup: Arc::new(ScanLookup(store)),
        counters,
        domains: domains.iter().map(|d| d.to_string()).collect(),
        address_policy: AddressPolicy::default(),
        config: WebConfig {
            listen: addr.to_string(),
            ..config
        },
        log_keys: Default::default(),
    };
    tokio::spawn(async move {
        serve(listener, service, std::future::pending())
            .await
            .unwrap();
    });
    addr
}
