//! [`TransparentStore`]: a [`KeyStore`] that records every publication and deletion in its
//! domain's log.
//!
//! Write order (docs/TRANSPARENCY.md, "Write order, as built"): the key store first, then the
//! directory, and the call returns only when both are written. A publication or deletion
//! whose directory write fails returns a temporary error, so the MTA keeps the message (LMTP
//! 4xx, `kst deliver` exit 75) and delivers it again; the store answers the redelivery with
//! [`PublishOutcome::Unchanged`] (same publication id) and the directory write is done then.
//! If kst dies between the two writes, the same redelivery repairs it: until then the
//! directory is one version behind the store, which a client checking over HTTP
//! (`--check-transparency`) reports as an attack, while a version 3 reply serves the version
//! the directory proves (`Kst`'s replies read the answer first; docs/PROTOCOL.md, "Versions")
//! (never the other way round: the directory never commits to a key the store has not
//! accepted).
//!
//! `restore` (`kst import`) is recorded the same way: the directory then says what the
//! restored history's current record says (a deletion first when the restored version is not
//! above the directory's). Not recorded: changes made to the store behind kst's back; a
//! client checking over HTTP reports those keys (tests/transparency.rs), a version 3 reply
//! does not serve them, and `kst migrate` records them ([`TransparentStore::record_all`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::TransparencyError;
use super::answer::{AnswerProof, REPLY_STEP_BUDGET, STEP_ELEMENT_BYTES};
use super::entry::{DirectoryEntry, EntryState};
use super::log::{
    CurrentKeys, DomainLog, IncomingChange, MAX_WITNESSED_ELEMENTS, StoreKeys, Synced,
};
use super::mail_bound::{MAIL_PROOFS_PER_SENDER, MailProofs};
use super::self_check;
use super::wire;
use crate::error::{Component, Error, Result};
use crate::fingerprint::{Fingerprint, KeyId};
use crate::protocol::{LogAsk, MAX_LOG_ANSWER_BYTES};
use crate::reply::{DirectoryAnswer, MailProofStats, Proven};
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome};
use crate::wkd::WkdHash;
use crate::{Address, time};

/// The component a directory failure is reported as.
const COMPONENT: Component = Component::other("key directory");

/// A key store whose changes are recorded in the logs of their domains.
pub struct TransparentStore {
    inner: Arc<dyn KeyStore>,
    /// `inner`, as the writer reads it.
    source: Arc<dyn CurrentKeys>,
    logs: HashMap<String, Arc<DomainLog>>,
    /// The witnesses whose cosignatures version 3 answers carry when asked
    /// (`KST-Log-Witnessed`): `[transparency] witnesses`.
    witnesses: Vec<[u8; 32]>,
    /// A publication of a logged domain commits its key with
    /// [`KeyStore::publish_unsynced`]: the directory commits to the key store's own
    /// PostgreSQL server ([`TransparentStore::with_unsynced_publications`]).
    unsynced: bool,
    /// The turns of version 3 replies' append-only work ([`super::mail_bound`]).
    mail_proofs: Arc<MailProofs>,
    /// Per domain, the newest epoch this store saw recorded or answered, plus one (0: none
    /// yet): a `KST-Log-Since` not older than it has nothing to prove but the epochs
    /// committed since (a few), and takes no turn.
    latest: HashMap<String, AtomicU64>,
}

/// What [`TransparentStore::record_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordedAll {
    /// Addresses of a logged domain looked at.
    pub checked: u64,
    /// Of those, the ones the directory lacked (or had out of date) and now records.
    pub recorded: u64,
}

impl TransparentStore {
    /// Wraps `inner`; addresses of a domain in `logs` are recorded in its log, others pass.
    pub fn new(inner: Arc<dyn KeyStore>, logs: Vec<Arc<DomainLog>>) -> Self {
        TransparentStore {
            source: Arc::new(StoreKeys(Arc::clone(&inner))),
            inner,
            latest: logs
                .iter()
                .map(|l| (l.domain().to_string(), AtomicU64::new(0)))
                .collect(),
            logs: logs
                .into_iter()
                .map(|l| (l.domain().to_string(), l))
                .collect(),
            witnesses: Vec::new(),
            unsynced: false,
            mail_proofs: Arc::default(),
        }
    }

    /// Builds and checks at most `at_once` version 3 replies' append-only proofs at once
    /// (default [`super::mail_bound::MAIL_PROOFS_AT_ONCE`]), at most
    /// [`MAIL_PROOFS_PER_SENDER`] of them for one sender; a reply that finds no turn free is
    /// sent without the part ([`super::mail_bound`]).
    pub fn with_mail_proofs_at_once(mut self, at_once: usize) -> Self {
        self.mail_proofs = Arc::new(MailProofs::new(at_once, MAIL_PROOFS_PER_SENDER));
        self
    }

    /// Notes that `domain`'s directory reached `epoch`.
    fn saw_epoch(&self, domain: &str, epoch: u64) {
        if let Some(latest) = self.latest.get(domain) {
            latest.fetch_max(epoch.saturating_add(1), Ordering::SeqCst);
        }
    }

    /// Whether a client that remembers epoch `since` of `domain` is up to date as far as
    /// this store saw: not older than the newest epoch it saw (false when it saw none).
    fn up_to_date(&self, domain: &str, since: u64) -> bool {
        self.latest
            .get(domain)
            .map(|l| l.load(Ordering::SeqCst))
            .is_some_and(|l| l > 0 && since >= l - 1)
    }

    /// Publications of a logged domain commit their key without waiting for it to be durable
    /// ([`KeyStore::publish_unsynced`]); the call returns only after a synchronous commit
    /// that covers it: the epoch recording the key, which the directory's writer commits
    /// after reading the key, or, when no epoch of this call recorded anything (the directory
    /// held the key already), [`KeyStore::sync_published`]. Only for a directory whose
    /// commits go to the key store's own PostgreSQL server (the same WAL: kst-bin sets it
    /// when `[store] backend = "postgres"`): a commit on another server covers nothing.
    /// docs/TRANSPARENCY.md, "Write order, as built".
    pub fn with_unsynced_publications(mut self) -> Self {
        self.unsynced = true;
        self
    }

    /// The witnesses (Ed25519 keys) whose cosignatures a version 3 answer carries when the
    /// request asks for them (`[transparency] witnesses`).
    pub fn with_witnesses(mut self, witnesses: Vec<[u8; 32]>) -> Self {
        self.witnesses = witnesses;
        self
    }

    /// Makes `address`'s log say what the store holds for it now (the log's writer reads
    /// the store; see [`DomainLog::record`]). `deleted_version`: the version a deletion
    /// removed + 1, when known. Returns the version an epoch of this call recorded for
    /// `address`, if one did.
    async fn record(
        &self,
        address: &Address,
        deleted_version: Option<u64>,
        incoming: Option<IncomingChange>,
    ) -> Result<Option<u64>> {
        let Some(log) = self.logs.get(address.domain()) else {
            return Ok(None);
        };
        let source = Arc::clone(&self.source);
        let now = time::unix_now();
        let recorded = match incoming {
            Some(incoming) => {
                log.record_incoming(address, source, deleted_version, now, incoming)
                    .await
            }
            None => log.record(address, source, deleted_version, now).await,
        };
        match recorded.map_err(|e| Error::unavailable(COMPONENT, e))? {
            Synced::AlreadyRecorded => Ok(None),
            Synced::Recorded { epoch, entry, .. } => {
                self.saw_epoch(address.domain(), epoch);
                tracing::info!(
                    address = %address,
                    epoch,
                    version = entry.version,
                    state = ?entry.state,
                    "recorded in the key directory"
                );
                Ok(Some(entry.version))
            }
        }
    }

    /// `address`'s change counted on its way to its log's writer
    /// ([`DomainLog::incoming`]); `None` for an address of a domain without a log.
    fn incoming(&self, address: &Address) -> Option<IncomingChange> {
        self.logs.get(address.domain()).map(|log| log.incoming())
    }

    /// Checks that `ours`, a record an unsynced publication wrote, is in `address`'s history
    /// on the server the store reads now: else a temporary failure (the MTA delivers the
    /// publication again). Its synchronous write came first, so a record found is durable.
    async fn check_kept(&self, address: &Address, ours: &KeyRecord) -> Result<()> {
        let kept = self
            .inner
            .history(address)
            .await?
            .iter()
            .any(|r| r.version == ours.version && r.publication_id == ours.publication_id);
        if kept {
            return Ok(());
        }
        tracing::warn!(
            address = %address,
            version = ours.version,
            "a publication's key is not on the store's server after its synchronous write \
             (a failover between the two, or a deletion of the address that came after it): \
             not confirmed, the sender's MTA retries (a deleted publication is then refused)"
        );
        Err(Error::unavailable(
            COMPONENT,
            format!(
                "the key published for {address} (version {}) is not on the store's server \
                 after its synchronous write (a failover, or a deletion since?); deliver the \
                 message again",
                ours.version
            ),
        ))
    }

    /// Records every address of a logged domain whose current key (or deletion) the
    /// directory lacks: a directory switched on for a store that already holds keys, or keys
    /// written behind kst's back (`kst migrate`). Idempotent: an address the directory
    /// already agrees with costs a read and writes nothing. Up to `concurrency` addresses
    /// are asked at once, so the log's writer records them in shared epochs.
    pub async fn record_all(&self, concurrency: usize) -> Result<RecordedAll> {
        let mut done = RecordedAll::default();
        let mut cursor = None;
        let page = concurrency.clamp(1, 512);
        loop {
            // The store's own order: a whole walk reads the store about once.
            let crate::store::WalkPage { addresses, next } =
                self.inner.list_page(cursor.as_ref(), page).await?;
            let mut asked = tokio::task::JoinSet::new();
            for address in addresses {
                let Some(log) = self.logs.get(address.domain()) else {
                    continue;
                };
                let (log, source) = (Arc::clone(log), Arc::clone(&self.source));
                asked.spawn(async move {
                    let result = log.record_current(&address, source, time::unix_now()).await;
                    (address, result)
                });
            }
            while let Some(joined) = asked.join_next().await {
                let (address, result) = joined.map_err(|e| {
                    Error::unavailable(COMPONENT, format!("recording stopped: {e}"))
                })?;
                done.checked += 1;
                match result.map_err(|e| Error::unavailable(COMPONENT, e))? {
                    Synced::AlreadyRecorded => {}
                    Synced::Recorded { epoch, entry, .. } => {
                        done.recorded += 1;
                        tracing::info!(address = %address, epoch, version = entry.version, state = ?entry.state, "recorded in the key directory");
                    }
                }
            }
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(done),
            }
        }
    }
}

/// Bytes one `head` or `cosigned` line of the witnesses' part takes in a reply's answer
/// block, at most: up to 244 characters (numbers of 20 digits), folded
/// ([`crate::reply::fold_log_answer`]: 76 on the first line, 75 on each continuation, which
/// starts with a space; CRLF line ends).
const REPLY_PART_LINE: usize = 256;

/// The most elements of the witnesses' append-only proof that fit in a version 3 reply
/// beside an answer whose folded text (without the part) is `answer_bytes`, when the part
/// carries at most `epochs` heads and `cosigned` cosignatures: the rest of
/// [`MAX_LOG_ANSWER_BYTES`], less those lines, in folded base64 (78 bytes per 75 characters,
/// 4 characters per 3 bytes) at [`STEP_ELEMENT_BYTES`] (the most an element takes).
/// A witness whose cosigned head is further back is left out of the part (the others stay),
/// before anything is built (red team round 10: with the HTTP bound, one witness far behind
/// made the part too large for the reply, and the reply then dropped the whole part).
fn reply_witnessed_elements(answer_bytes: usize, cosigned: usize, epochs: u64) -> usize {
    let lines = (cosigned as u64)
        .saturating_add(epochs)
        .saturating_mul(REPLY_PART_LINE as u64);
    let left = (MAX_LOG_ANSWER_BYTES as u64)
        .saturating_sub(answer_bytes as u64)
        .saturating_sub(lines)
        // The `proof ` word, the folding of the proof line's first part, rounding.
        .saturating_sub(256);
    let proof_bytes = left / 78 * 75 / 4 * 3;
    usize::try_from(proof_bytes / STEP_ELEMENT_BYTES as u64)
        .unwrap_or(usize::MAX)
        .min(MAX_WITNESSED_ELEMENTS)
}

/// What [`TransparentStore`]'s answer leaves out when it is too large for a reply.
#[derive(Debug, Clone, Copy)]
enum Omitted {
    Witnesses,
    AppendOnly,
}

/// Version 3 replies: the answer of the address's log, read after any write `publish` or
/// `delete` made (they return only once the directory recorded it).
#[async_trait]
impl crate::reply::LogAnswers for TransparentStore {
    fn has_directory(&self, domain: &str) -> bool {
        self.logs.contains_key(domain)
    }

    async fn answer(&self, address: &Address, ask: LogAsk, asker: &str) -> Result<DirectoryAnswer> {
        let Some(log) = self.logs.get(address.domain()) else {
            return Err(Error::Config(format!(
                "no key directory for {}: a version 3 reply about {address} cannot be made",
                address.domain()
            )));
        };
        let unavailable = |e: TransparencyError| Error::unavailable(COMPONENT, e);
        let now = time::unix_now();
        // The append-only proof from the client's remembered epoch, or its first steps, within
        // what a reply carries; `too-far` when not even the first step fits (the client then
        // starts from a witness-cosigned head or re-pins). Built and checked within one of the
        // process's turns for this work (`mail_bound`), which a client up to date as far as
        // this store saw does not need; without a turn free, the answer is made without the
        // part: the answer a client up to date gets, or one that lacks the part it asked for.
        let domain = address.domain();
        let turn = match ask.since {
            Some(since) if !self.up_to_date(domain, since) => {
                Some(self.mail_proofs.try_take(asker))
            }
            _ => None,
        };
        let busy = matches!(turn, Some(None));
        let stepped = |since| log.answer_stepped(address, since, Some(REPLY_STEP_BUDGET), now);
        let mut answer = match turn {
            None => stepped(ask.since).await,
            // The turn stays with the check of the part until it ends
            // (`self_check::holding`), also when this request is dropped first.
            Some(Some(turn)) => self_check::holding(Arc::new(turn), stepped(ask.since)).await,
            Some(None) => stepped(None).await,
        }
        .map_err(unavailable)?;
        self.saw_epoch(domain, answer.head.head.epoch);
        if busy && let Some(since) = ask.since.filter(|s| answer.head.head.epoch > *s) {
            self.mail_proofs.omitted();
            tracing::info!(
                address = %address,
                asker,
                since,
                epoch = answer.head.head.epoch,
                at_once = self.mail_proofs.at_once(),
                "every turn of the replies' append-only proofs is taken (or the sender's \
                 share): the reply goes without the append-only part; its client catches up \
                 over HTTP or asks again later"
            );
        }
        let proven = proven(&answer.proof).map_err(unavailable)?;
        if ask.witnessed {
            // Bounded by what is left of the reply beside the rest of the answer (its
            // append-only part too): the witnesses far behind are left out, not all of them.
            let answer_bytes =
                crate::reply::fold_log_answer(&answer.to_text().map_err(unavailable)?).len();
            let cosigned = self.witnesses.len();
            answer.witnessed = log
                .witnessed_within(&answer.head, &self.witnesses, |epochs| {
                    reply_witnessed_elements(answer_bytes, cosigned, epochs)
                })
                .await
                .map_err(unavailable)?;
        }
        let mut text = answer.to_text().map_err(unavailable)?;
        // A reply carries at most MAX_LOG_ANSWER_BYTES: what the client asked for is dropped
        // first (it then reports the missing part), the head and the proof never.
        for omit in [Omitted::Witnesses, Omitted::AppendOnly] {
            if crate::reply::fold_log_answer(&text).len() <= MAX_LOG_ANSWER_BYTES {
                break;
            }
            match omit {
                Omitted::Witnesses => answer.witnessed = None,
                Omitted::AppendOnly => answer.append_only = None,
            }
            tracing::warn!(address = %address, bytes = text.len(), omitted = ?omit, "the key directory's answer is too large for a reply");
            text = answer.to_text().map_err(unavailable)?;
        }
        Ok(DirectoryAnswer { text, proven })
    }

    async fn pause(&self, pause: std::time::Duration) {
        tokio::time::sleep(pause).await;
    }

    fn mail_proofs(&self) -> MailProofStats {
        self.mail_proofs.stats()
    }
}

/// What `proof` (the log's own, just built) proves: the latest entry it carries, or absence.
fn proven(proof: &AnswerProof) -> std::result::Result<Proven, TransparencyError> {
    let bytes = match proof {
        AnswerProof::Absent(_) => return Ok(Proven::Absent),
        AnswerProof::Present(bytes) => bytes,
    };
    let entry = DirectoryEntry::from_value(&wire::decode_lookup(bytes)?.value)?;
    Ok(match (entry.state, entry.key) {
        (EntryState::Deleted, _) => Proven::Deleted {
            version: entry.version,
        },
        (EntryState::Published | EntryState::Revoked, Some((_, sha256))) => Proven::Key {
            version: entry.version,
            sha256,
        },
        (EntryState::Published | EntryState::Revoked, None) => {
            return Err(TransparencyError::Malformed(format!(
                "the directory's entry version {} holds a key but names none",
                entry.version
            )));
        }
    })
}

#[async_trait]
impl KeyStore for TransparentStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        let address = key.address.clone();
        let incoming = self.incoming(&address);
        if !(self.unsynced && self.logs.contains_key(address.domain())) {
            let outcome = self.inner.publish(key).await?;
            // Also for `Unchanged`: a redelivery after a failed or interrupted directory write.
            self.record(&address, None, incoming).await?;
            return Ok(outcome);
        }
        // The key's commit need not be durable yet: the epoch that records it is a
        // synchronous commit on the same server, after it (the writer reads the key first).
        let outcome = self.inner.publish_unsynced(key).await?;
        let ours = outcome.record();
        if self.record(&address, None, incoming).await? != Some(ours.version) {
            // No epoch of this call recorded this key (another writer's epoch holds it, or it
            // was there already: a redelivery; or the server the writer read does not hold
            // it): one synchronous write of our own, so nothing is confirmed before a
            // synchronous commit after the key's, and then the key must be on the server
            // that commit went to. A failover between the key's unsynced commit and the
            // writer's read leaves the key on the old primary only: the writer finds nothing
            // to record and the new primary's synchronous write covers nothing of it, so
            // without this check the publication would be confirmed and lost.
            self.inner.sync_published().await?;
            self.check_kept(&address, ours).await?;
        }
        Ok(outcome)
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.inner.get(address).await
    }

    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        self.inner.get_many(addresses).await
    }

    fn batches_reads(&self) -> bool {
        self.inner.batches_reads()
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.inner.history(address).await
    }

    async fn delete(&self, address: &Address) -> Result<bool> {
        // The version being deleted, so the deletion entry gets the one after it.
        let before = match self.logs.contains_key(address.domain()) {
            true => self.inner.get(address).await?.map(|r| r.version + 1),
            false => None,
        };
        let incoming = self.incoming(address);
        let deleted = self.inner.delete(address).await?;
        // Also when nothing was there: a redelivered deletion whose directory write failed.
        self.record(address, before, incoming).await?;
        Ok(deleted)
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.inner.list(after, limit).await
    }

    async fn list_page(
        &self,
        cursor: Option<&crate::store::WalkCursor>,
        limit: usize,
    ) -> Result<crate::store::WalkPage> {
        self.inner.list_page(cursor, limit).await
    }

    async fn deleted_page(
        &self,
        cursor: Option<&crate::store::WalkCursor>,
        limit: usize,
    ) -> Result<crate::store::DeletedPage> {
        self.inner.deleted_page(cursor, limit).await
    }

    /// Passed on: remembered ids change no key, so the directory records nothing.
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        self.inner.remember_deleted(address, publication_ids).await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.inner.restore(history).await?;
        if let Some(first) = history.first() {
            self.record(&first.address, None, None).await?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    /// A witnesses' part at the bound, with every line at its longest, fits what the reply's
    /// block has left: the bound is not an estimate that a large part gets past.
    #[test]
    fn a_witnesses_part_at_the_reply_bound_fits_the_reply() {
        let line = format!("cosigned {} {}", u64::MAX, "f".repeat(234 - 20));
        assert_eq!(line.len(), 244, "the longest `cosigned` line");
        for (answer_bytes, cosigned, epochs) in [
            (4 << 10, 2, 1),
            (4 << 10, 32, 1024),
            (1 << 20, 3, 12),
            (MAX_LOG_ANSWER_BYTES / 2, 32, 300),
        ] {
            let elements = reply_witnessed_elements(answer_bytes, cosigned, epochs);
            assert!(elements > 0, "room for a proof beside {answer_bytes} bytes");
            let mut part = format!("{line}\n").repeat(cosigned + epochs as usize);
            let proof = vec![0xa5; elements * STEP_ELEMENT_BYTES];
            part.push_str(&format!(
                "proof {}\n",
                base64::engine::general_purpose::STANDARD.encode(proof)
            ));
            let folded = crate::reply::fold_log_answer(&part).len();
            assert!(
                answer_bytes + folded <= MAX_LOG_ANSWER_BYTES,
                "{answer_bytes} + {folded} bytes: over the block ({cosigned} cosignatures, \
                 {epochs} heads, {elements} elements)"
            );
        }
        // Nothing left: no proof at all (a cosignature of the answer's own head needs none).
        assert_eq!(reply_witnessed_elements(MAX_LOG_ANSWER_BYTES, 2, 5), 0);
        // Plenty left: never past what an HTTP answer carries.
        assert!(reply_witnessed_elements(0, 0, 1) <= MAX_WITNESSED_ELEMENTS);
    }
}
