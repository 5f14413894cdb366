//! The store seam of the web listener: the look-ups WKD, VKS and HKP need.

use async_trait::async_trait;
use kst_core::wkd::WkdHash;
use kst_core::{Address, KeyRecord, Result};

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
