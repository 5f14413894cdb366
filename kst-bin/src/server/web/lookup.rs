//! The store seam of the web listener: the look-ups WKD, VKS and HKP need.

use std::sync::Arc;

use async_trait::async_trait;
use kst_core::wkd::WkdHash;
use kst_core::{Address, Fingerprint, KeyId, KeyRecord, KeyStore, Result};

use super::batch::ReadBatcher;

/// Most certificates one look-up by fingerprint or key ID serves (a key ID can be shared by
/// crafted keys; a subkey can be bound to several primary keys).
pub const MAX_MATCHES: usize = 16;

/// What the web endpoints read from the store. Every method returns current keys only (the
/// last version of each address). A store that cannot be reached returns a temporary
/// [`kst_core::Error`]; the listener answers 503 with `Retry-After`.
#[async_trait]
pub trait KeyLookup: Send + Sync + 'static {
    /// Short name for logs, e.g. `"fs"`.
    fn name(&self) -> &'static str;

    /// The current key of `address`.
    async fn by_address(&self, address: &Address) -> Result<Option<KeyRecord>>;

    /// The current key of the address in `domain` whose local part has the WKD hash `hash`.
    /// The listener first tries the `l=` parameter of the request (only when that local part,
    /// normalized, has this very hash, so it finds nothing an index would not); a store without
    /// a hash index may return `Ok(None)` here, and then clients that send no `l=` find nothing.
    async fn by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>>;

    /// The current keys whose primary key or one of whose subkeys has `fingerprint` (uppercase
    /// hex), at most [`MAX_MATCHES`].
    async fn by_fingerprint(&self, fingerprint: &str) -> Result<Vec<KeyRecord>>;

    /// The current keys whose primary key or one of whose subkeys has the 64-bit `key_id`
    /// (16 uppercase hex digits), at most [`MAX_MATCHES`].
    async fn by_key_id(&self, key_id: &str) -> Result<Vec<KeyRecord>>;
}

/// [`KeyLookup`] over any [`KeyStore`]: the store's own indexes (by address, WKD hash,
/// fingerprint and key ID), so the cost of a look-up does not grow with the number of keys.
/// On a store whose reads of many addresses take one round trip
/// ([`KeyStore::batches_reads`]: PostgreSQL, Redis), the look-ups by address of concurrent
/// requests are read together ([`ReadBatcher`]); on the others (fs) each goes alone.
pub struct StoreLookup {
    store: Arc<dyn KeyStore>,
    batcher: Option<ReadBatcher>,
}

impl StoreLookup {
    /// Look-ups on `store` (the same store, and the same pool, that mail publishes to).
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        StoreLookup {
            batcher: store
                .batches_reads()
                .then(|| ReadBatcher::new(Arc::clone(&store))),
            store,
        }
    }

    /// Whether the look-ups by address are read in batches.
    pub fn batches(&self) -> bool {
        self.batcher.is_some()
    }
}

#[async_trait]
impl KeyLookup for StoreLookup {
    fn name(&self) -> &'static str {
        self.store.name()
    }

    async fn by_address(&self, address: &Address) -> Result<Option<KeyRecord>> {
        match &self.batcher {
            Some(batcher) => batcher.get(address).await,
            None => self.store.get(address).await,
        }
    }

    async fn by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        self.store.find_by_wkd_hash(domain, hash).await
    }

    async fn by_fingerprint(&self, fingerprint: &str) -> Result<Vec<KeyRecord>> {
        // The handlers pass validated hex; anything else cannot match a key.
        match Fingerprint::parse(fingerprint) {
            Ok(f) => self.store.find_by_fingerprint(&f, MAX_MATCHES).await,
            Err(_) => Ok(Vec::new()),
        }
    }

    async fn by_key_id(&self, key_id: &str) -> Result<Vec<KeyRecord>> {
        match KeyId::parse(key_id) {
            Ok(k) => self.store.find_by_key_id(&k, MAX_MATCHES).await,
            Err(_) => Ok(Vec::new()),
        }
    }
}
