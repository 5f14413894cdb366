//! In-memory [`KeyStore`] and [`Mailer`] for tests and fuzzing (feature `testing`), and
//! [`DelegatingStore`], a wrapper around a real store whose tests take over only the calls they
//! hold, count or watch; with `transparency`, [`DelegatingDirectory`], the same for a
//! [`DirectoryStore`](crate::transparency::DirectoryStore).
//!
//! One copy for every user: kst-core's unit tests, the fuzz targets, and tests in other crates
//! that need a store or mailer without a server. Not for production: the store keeps nothing
//! across restarts. Production builds do not enable the feature.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, KeyId};
use crate::key_index::IndexEntries;
use crate::mailer::{Delivery, Mailer, OutgoingMail};
use crate::reminder::ReminderClaim;
use crate::store::{
    DeletedPage, KeyRecord, KeyStore, NewKey, PublishOutcome, WalkCursor, WalkPage,
    validate_history,
};
use crate::wkd::WkdHash;

#[cfg(feature = "transparency")]
mod directory;
#[cfg(feature = "transparency")]
pub use directory::{DelegatingDirectory, DirectoryHooks};

/// A store in a mutex; `down` makes every call fail temporarily.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Every address' history, oldest first.
    pub map: Mutex<BTreeMap<Address, Vec<KeyRecord>>>,
    /// While true, every call fails with a temporary error (an outage).
    pub down: AtomicBool,
    /// Tombstones: key revocations per primary-key fingerprint (never removed).
    pub tombstones: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Expiry reminders claimed: (address, claim id).
    pub reminders: Mutex<std::collections::BTreeSet<(Address, String)>>,
    /// Publication ids of deleted histories (never removed): (address, publication id).
    pub deleted: Mutex<std::collections::BTreeSet<(Address, String)>>,
}

impl MemoryStore {
    fn up(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::unavailable("store(memory)", "down for the test"))
        } else {
            Ok(())
        }
    }

    /// Current keys whose index entries satisfy `hit`, in address order, at most `limit`
    /// (a scan: this store is for tests only).
    fn find(&self, limit: usize, hit: impl Fn(&IndexEntries) -> bool) -> Result<Vec<KeyRecord>> {
        self.up()?;
        Ok(self
            .map
            .lock()
            .unwrap()
            .values()
            .filter_map(|h| h.last())
            .filter(|r| hit(&IndexEntries::of(r)))
            .take(limit)
            .cloned()
            .collect())
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.up()?;
        // Both locks held for the whole step, tombstones first: atomic like a real backend.
        let mut tombstones = self.tombstones.lock().unwrap();
        let fingerprint = key.fingerprint.as_str().to_string();
        let (key, grown) = crate::revocation::apply_tombstone(
            key,
            tombstones.get(&fingerprint).map(Vec::as_slice),
        )?;
        if let Some(bytes) = grown {
            tombstones.insert(fingerprint, bytes);
        }
        let mut map = self.map.lock().unwrap();
        let hist = map.entry(key.address.clone()).or_default();
        if let Some(r) = hist.iter().find(|r| r.publication_id == key.publication_id) {
            return Ok(PublishOutcome::Unchanged(r.clone()));
        }
        let id = (key.address.clone(), key.publication_id.clone());
        if self.deleted.lock().unwrap().contains(&id) {
            if hist.is_empty() {
                map.remove(&key.address);
            }
            return Err(Error::deleted_since(&key));
        }
        if let Some(cur) = hist.last().filter(|c| c.key == key.key) {
            return Ok(PublishOutcome::Unchanged(cur.clone()));
        }
        let current = hist.last().map(|c| c.version);
        if !key.expected.admits(current) {
            return Err(key.expected.conflict(&key.address, current));
        }
        let rec = key.into_record(hist.last().map_or(1, |c| c.version + 1));
        hist.push(rec.clone());
        Ok(PublishOutcome::Published(rec))
    }
    async fn claim_reminder(&self, claim: &crate::reminder::ReminderClaim) -> Result<bool> {
        self.up()?;
        Ok(self
            .reminders
            .lock()
            .unwrap()
            .insert((claim.address.clone(), claim.id())))
    }
    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.up()?;
        Ok(self
            .map
            .lock()
            .unwrap()
            .get(address)
            .and_then(|h| h.last().cloned()))
    }
    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.up()?;
        Ok(self
            .map
            .lock()
            .unwrap()
            .get(address)
            .cloned()
            .unwrap_or_default())
    }
    /// In address order; the cursor is the last address handed out.
    async fn deleted_page(
        &self,
        cursor: Option<&crate::WalkCursor>,
        limit: usize,
    ) -> Result<crate::DeletedPage> {
        self.up()?;
        crate::store::check_walk_limit(limit)?;
        let after = cursor
            .map(|c| {
                c.token()
                    .strip_prefix("memory-deleted:")
                    .and_then(|a| Address::from_normalized(a).ok())
                    .ok_or_else(|| Error::Invalid(crate::store::bad_cursor(c)))
            })
            .transpose()?;
        let deleted = self.deleted.lock().unwrap();
        let mut entries: Vec<crate::DeletedPublications> = Vec::new();
        for (address, id) in deleted.iter() {
            if after.as_ref().is_some_and(|a| address <= a) {
                continue;
            }
            if let Some(e) = entries.last_mut().filter(|e| &e.address == address) {
                e.publication_ids.push(id.clone());
                continue;
            }
            if entries.len() == limit {
                break;
            }
            entries.push(crate::DeletedPublications {
                address: address.clone(),
                publication_ids: vec![id.clone()],
            });
        }
        let next = match entries.last() {
            Some(last) if entries.len() == limit => Some(crate::WalkCursor::new(format!(
                "memory-deleted:{}",
                last.address.as_str()
            ))),
            _ => None,
        };
        Ok(crate::DeletedPage { entries, next })
    }
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        self.up()?;
        crate::store::check_publication_ids(address, publication_ids)?;
        self.deleted.lock().unwrap().extend(
            publication_ids
                .iter()
                .map(|id| (address.clone(), id.clone())),
        );
        Ok(())
    }
    async fn delete(&self, address: &Address) -> Result<bool> {
        self.up()?;
        let mut map = self.map.lock().unwrap();
        let Some(history) = map.remove(address) else {
            return Ok(false);
        };
        self.deleted.lock().unwrap().extend(
            history
                .into_iter()
                .map(|r| (address.clone(), r.publication_id)),
        );
        Ok(true)
    }
    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.up()?;
        Ok(self
            .map
            .lock()
            .unwrap()
            .keys()
            .filter(|a| after.is_none_or(|x| *a > x))
            .take(limit)
            .cloned()
            .collect())
    }
    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.up()?;
        validate_history(history)?;
        self.map
            .lock()
            .unwrap()
            .insert(history[0].address.clone(), history.to_vec());
        Ok(())
    }
    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        self.find(limit, |e| e.has_fingerprint(fingerprint))
    }
    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.find(limit, |e| e.has_key_id(key_id))
    }
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        Ok(self.find(1, |e| e.has_wkd_hash(domain, hash))?.pop())
    }
    async fn check(&self) -> Result<()> {
        self.up()
    }
}

/// The calls of a [`DelegatingStore`] a test takes over: each method is one [`KeyStore`] call,
/// given the wrapped store as `inner`; its default passes the same call on to `inner`
/// unchanged. A test implements only the calls it holds, counts, fails or watches, and keeps
/// its own state (counters, notifications, switches) in the implementing type.
///
/// The defaults are independent of each other: `publish_unsynced`'s passes the call on to
/// `inner.publish_unsynced`, not through this trait's `publish` (a test that watches every
/// publication takes over both), and `get_many`'s to `inner.get_many`, not through `get`.
/// `()` takes over nothing: a pure pass-through.
#[async_trait]
pub trait StoreHooks: Send + Sync {
    /// [`KeyStore::name`].
    fn name(&self, inner: &dyn KeyStore) -> &'static str {
        inner.name()
    }
    /// [`KeyStore::publish`].
    async fn publish(&self, inner: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
        inner.publish(key).await
    }
    /// [`KeyStore::publish_unsynced`].
    async fn publish_unsynced(&self, inner: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
        inner.publish_unsynced(key).await
    }
    /// [`KeyStore::sync_published`].
    async fn sync_published(&self, inner: &dyn KeyStore) -> Result<()> {
        inner.sync_published().await
    }
    /// [`KeyStore::get`].
    async fn get(&self, inner: &dyn KeyStore, address: &Address) -> Result<Option<KeyRecord>> {
        inner.get(address).await
    }
    /// [`KeyStore::get_many`].
    async fn get_many(
        &self,
        inner: &dyn KeyStore,
        addresses: &[Address],
    ) -> Result<Vec<Option<KeyRecord>>> {
        inner.get_many(addresses).await
    }
    /// [`KeyStore::batches_reads`].
    fn batches_reads(&self, inner: &dyn KeyStore) -> bool {
        inner.batches_reads()
    }
    /// [`KeyStore::history`].
    async fn history(&self, inner: &dyn KeyStore, address: &Address) -> Result<Vec<KeyRecord>> {
        inner.history(address).await
    }
    /// [`KeyStore::delete`].
    async fn delete(&self, inner: &dyn KeyStore, address: &Address) -> Result<bool> {
        inner.delete(address).await
    }
    /// [`KeyStore::list`].
    async fn list(
        &self,
        inner: &dyn KeyStore,
        after: Option<&Address>,
        limit: usize,
    ) -> Result<Vec<Address>> {
        inner.list(after, limit).await
    }
    /// [`KeyStore::list_page`].
    async fn list_page(
        &self,
        inner: &dyn KeyStore,
        cursor: Option<&WalkCursor>,
        limit: usize,
    ) -> Result<WalkPage> {
        inner.list_page(cursor, limit).await
    }
    /// [`KeyStore::deleted_page`].
    async fn deleted_page(
        &self,
        inner: &dyn KeyStore,
        cursor: Option<&WalkCursor>,
        limit: usize,
    ) -> Result<DeletedPage> {
        inner.deleted_page(cursor, limit).await
    }
    /// [`KeyStore::remember_deleted`].
    async fn remember_deleted(
        &self,
        inner: &dyn KeyStore,
        address: &Address,
        publication_ids: &[String],
    ) -> Result<()> {
        inner.remember_deleted(address, publication_ids).await
    }
    /// [`KeyStore::restore`].
    async fn restore(&self, inner: &dyn KeyStore, history: &[KeyRecord]) -> Result<()> {
        inner.restore(history).await
    }
    /// [`KeyStore::find_by_fingerprint`].
    async fn find_by_fingerprint(
        &self,
        inner: &dyn KeyStore,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        inner.find_by_fingerprint(fingerprint, limit).await
    }
    /// [`KeyStore::find_by_key_id`].
    async fn find_by_key_id(
        &self,
        inner: &dyn KeyStore,
        key_id: &KeyId,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        inner.find_by_key_id(key_id, limit).await
    }
    /// [`KeyStore::find_by_wkd_hash`].
    async fn find_by_wkd_hash(
        &self,
        inner: &dyn KeyStore,
        domain: &str,
        hash: &WkdHash,
    ) -> Result<Option<KeyRecord>> {
        inner.find_by_wkd_hash(domain, hash).await
    }
    /// [`KeyStore::rebuild_index`].
    async fn rebuild_index(&self, inner: &dyn KeyStore) -> Result<u64> {
        inner.rebuild_index().await
    }
    /// [`KeyStore::claim_reminder`].
    async fn claim_reminder(&self, inner: &dyn KeyStore, claim: &ReminderClaim) -> Result<bool> {
        inner.claim_reminder(claim).await
    }
    /// [`KeyStore::check`].
    async fn check(&self, inner: &dyn KeyStore) -> Result<()> {
        inner.check().await
    }
    /// [`KeyStore::topology`].
    async fn topology(&self, inner: &dyn KeyStore) -> Result<Vec<(String, String)>> {
        inner.topology().await
    }
}

/// Takes over nothing: [`DelegatingStore`] over `()` passes every call on.
impl StoreHooks for () {}

/// A [`KeyStore`] for tests that wraps a real one: every call goes to the `hooks`' method of
/// the same name ([`StoreHooks`]), which passes it on to the wrapped store unless the test
/// took that call over (to hold it, count it, fail it or watch it). Dereferences to the hooks,
/// so a test reads its counters and pulls its switches on the wrapper itself.
pub struct DelegatingStore<H> {
    inner: Arc<dyn KeyStore>,
    hooks: H,
}

impl<H: StoreHooks> DelegatingStore<H> {
    /// `inner` with the calls `hooks` takes over.
    pub fn new(inner: Arc<dyn KeyStore>, hooks: H) -> Self {
        DelegatingStore { inner, hooks }
    }

    /// The wrapped store (its calls bypass the hooks).
    pub fn inner(&self) -> &Arc<dyn KeyStore> {
        &self.inner
    }

    /// The hooks (also reached through `Deref`).
    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<H> std::ops::Deref for DelegatingStore<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.hooks
    }
}

#[async_trait]
impl<H: StoreHooks> KeyStore for DelegatingStore<H> {
    fn name(&self) -> &'static str {
        self.hooks.name(&*self.inner)
    }
    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.hooks.publish(&*self.inner, key).await
    }
    async fn publish_unsynced(&self, key: NewKey) -> Result<PublishOutcome> {
        self.hooks.publish_unsynced(&*self.inner, key).await
    }
    async fn sync_published(&self) -> Result<()> {
        self.hooks.sync_published(&*self.inner).await
    }
    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.hooks.get(&*self.inner, address).await
    }
    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        self.hooks.get_many(&*self.inner, addresses).await
    }
    fn batches_reads(&self) -> bool {
        self.hooks.batches_reads(&*self.inner)
    }
    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.hooks.history(&*self.inner, address).await
    }
    async fn delete(&self, address: &Address) -> Result<bool> {
        self.hooks.delete(&*self.inner, address).await
    }
    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.hooks.list(&*self.inner, after, limit).await
    }
    async fn list_page(&self, cursor: Option<&WalkCursor>, limit: usize) -> Result<WalkPage> {
        self.hooks.list_page(&*self.inner, cursor, limit).await
    }
    async fn deleted_page(&self, cursor: Option<&WalkCursor>, limit: usize) -> Result<DeletedPage> {
        self.hooks.deleted_page(&*self.inner, cursor, limit).await
    }
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        self.hooks
            .remember_deleted(&*self.inner, address, publication_ids)
            .await
    }
    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.hooks.restore(&*self.inner, history).await
    }
    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        self.hooks
            .find_by_fingerprint(&*self.inner, fingerprint, limit)
            .await
    }
    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.hooks.find_by_key_id(&*self.inner, key_id, limit).await
    }
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        self.hooks
            .find_by_wkd_hash(&*self.inner, domain, hash)
            .await
    }
    async fn rebuild_index(&self) -> Result<u64> {
        self.hooks.rebuild_index(&*self.inner).await
    }
    async fn claim_reminder(&self, claim: &ReminderClaim) -> Result<bool> {
        self.hooks.claim_reminder(&*self.inner, claim).await
    }
    async fn check(&self) -> Result<()> {
        self.hooks.check(&*self.inner).await
    }
    async fn topology(&self) -> Result<Vec<(String, String)>> {
        self.hooks.topology(&*self.inner).await
    }
}

/// Collects sent mail; `down` makes sending fail temporarily, `refusing` refuses every reply
/// for good as a relay's 5xx would.
#[derive(Debug, Default)]
pub struct MemoryMailer {
    /// Every mail sent, in order.
    pub sent: Mutex<Vec<OutgoingMail>>,
    /// While true, sending fails with a temporary error (an outage).
    pub down: AtomicBool,
    /// While true, every reply is refused for good ([`Delivery::Refused`] with a 550) and not
    /// kept in `sent`.
    pub refusing: AtomicBool,
}

#[async_trait]
impl Mailer for MemoryMailer {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("mailer(memory)", "down for the test"));
        }
        if self.refusing.load(Ordering::SeqCst) {
            return Ok(Delivery::Refused {
                code: 550,
                text: format!(
                    "RCPT TO refused by memory: 550 5.1.1 <{}>: Recipient address rejected",
                    mail.recipient
                ),
            });
        }
        self.sent.lock().unwrap().push(mail.clone());
        Ok(Delivery::Sent)
    }
    async fn check(&self) -> Result<()> {
        Ok(())
    }
}
