//! [`TransparentStore`]: a [`KeyStore`] that records every publication and deletion in its
//! domain's log.
//!
//! Write order (docs/TRANSPARENCY.md, "Write order, as built"): the key store first, then the
//! directory, and the call returns only when both are written. A publication or deletion
//! whose directory write fails returns a temporary error, so the MTA keeps the message (LMTP
//! 4xx, `kst deliver` exit 75) and delivers it again; the store answers the redelivery with
//! [`PublishOutcome::Unchanged`] (same publication id) and the directory write is done then.
//! If kst dies between the two writes, the same redelivery repairs it: until then the
//! directory is one version behind the store, which a checking client reports as an attack
//! (never the other way round: the directory never commits to a key the store has not
//! accepted).
//!
//! Not recorded: `restore` (`kst import`) and changes made to the store behind kst's back;
//! a checking client reports those keys (tests/transparency.rs).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::log::{DomainLog, Synced};
use crate::error::{Component, Error, Result};
use crate::fingerprint::{Fingerprint, KeyId};
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome};
use crate::wkd::WkdHash;
use crate::{Address, time};

/// The component a directory failure is reported as.
const COMPONENT: Component = Component::other("key directory");

/// A key store whose changes are recorded in the logs of their domains.
pub struct TransparentStore {
    inner: Arc<dyn KeyStore>,
    logs: HashMap<String, Arc<DomainLog>>,
}

impl TransparentStore {
    /// Wraps `inner`; addresses of a domain in `logs` are recorded in its log, others pass.
    pub fn new(inner: Arc<dyn KeyStore>, logs: Vec<Arc<DomainLog>>) -> Self {
        TransparentStore {
            inner,
            logs: logs
                .into_iter()
                .map(|l| (l.domain().to_string(), l))
                .collect(),
        }
    }

    /// Makes `address`'s log say what the store holds for it now.
    async fn record(&self, address: &Address) -> Result<()> {
        let Some(log) = self.logs.get(address.domain()) else {
            return Ok(());
        };
        let _writer = log.writer().await;
        let current = self.inner.get(address).await?;
        match log
            .sync(address, current.as_ref(), time::unix_now())
            .await
            .map_err(|e| Error::unavailable(COMPONENT, e))?
        {
            Synced::AlreadyRecorded => {}
            Synced::Recorded { epoch, entry, .. } => tracing::info!(
                address = %address,
                epoch,
                version = entry.version,
                state = ?entry.state,
                "recorded in the key directory"
            ),
        }
        Ok(())
    }
}

/// Version 3 replies: the answer of the address's log, read after any write `publish` or
/// `delete` made (they return only once the directory recorded it).
#[async_trait]
impl crate::reply::LogAnswers for TransparentStore {
    fn has_directory(&self, domain: &str) -> bool {
        self.logs.contains_key(domain)
    }

    async fn answer(&self, address: &Address) -> Result<String> {
        let Some(log) = self.logs.get(address.domain()) else {
            return Err(Error::Config(format!(
                "no key directory for {}: a version 3 reply about {address} cannot be made",
                address.domain()
            )));
        };
        log.answer(address, time::unix_now())
            .await
            .and_then(|a| a.to_text())
            .map_err(|e| Error::unavailable(COMPONENT, e))
    }
}

#[async_trait]
impl KeyStore for TransparentStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        let address = key.address.clone();
        let outcome = self.inner.publish(key).await?;
        // Also for `Unchanged`: a redelivery after a failed or interrupted directory write.
        self.record(&address).await?;
        Ok(outcome)
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.inner.get(address).await
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.inner.history(address).await
    }

    async fn delete(&self, address: &Address) -> Result<bool> {
        let deleted = self.inner.delete(address).await?;
        // Also when nothing was there: a redelivered deletion whose directory write failed.
        self.record(address).await?;
        Ok(deleted)
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.inner.list(after, limit).await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.inner.restore(history).await
    }

    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        self.inner.find_by_fingerprint(fingerprint, limit).await
    }

    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.inner.find_by_key_id(key_id, limit).await
    }

    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        self.inner.find_by_wkd_hash(domain, hash).await
    }

    async fn rebuild_index(&self) -> Result<u64> {
        self.inner.rebuild_index().await
    }

    async fn claim_reminder(&self, claim: &crate::reminder::ReminderClaim) -> Result<bool> {
        self.inner.claim_reminder(claim).await
    }

    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }

    async fn topology(&self) -> Result<Vec<(String, String)>> {
        self.inner.topology().await
    }
}
