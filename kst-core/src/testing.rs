//! In-memory [`KeyStore`] and [`Mailer`] for tests and fuzzing (feature `testing`).
//!
//! One copy for every user: kst-core's unit tests, the fuzz targets, and tests in other crates
//! that need a store or mailer without a server. Not for production: the store keeps nothing
//! across restarts. Production builds do not enable the feature.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use crate::address::Address;
use crate::error::{Error, Result};
use crate::fingerprint::{Fingerprint, KeyId};
use crate::key_index::IndexEntries;
use crate::mailer::{Delivery, Mailer, OutgoingMail};
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome, validate_history};
use crate::wkd::WkdHash;

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
