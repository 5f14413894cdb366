//! One served domain's log on the server: its directory over a [`DirectoryStore`], its head
//! key, and the one writer per domain and process.
//!
//! Writing (docs/TRANSPARENCY.md, "Write order, as built"): [`DomainLog::record`] makes the
//! directory say what the key store says about an address. The writer (the directory's
//! thread) reads the store itself, on every attempt, *after* reading the directory's epoch,
//! and pins that epoch ([`StoredDirectory::pin`]): the batch is committed only on that epoch,
//! else it is rebuilt from fresh reads. So a change is never recorded after a newer one, in
//! one process or across processes (a pool, `kst deliver` next to `kst serve`): whatever
//! another writer committed before the pinned epoch it read from the store earlier, and
//! whatever it commits after makes this batch conflict.
//!
//! Group commit: the requests that queue while an epoch is being written are recorded together
//! in the next one (one epoch, one entry per address: several changes of one address need one
//! entry, the store's current state read after they all happened). Each caller is answered once
//! the epoch holding its address is committed.
//!
//! The directory runs on a thread of its own (a current-thread Tokio runtime) and is asked
//! through a channel: rustc cannot prove akd's futures `Send` ("implementation of `Send` is
//! not general enough", rust-lang/rust#102211), and every caller here needs `Send` futures
//! (`#[async_trait]` key stores, axum handlers). The key store is read on the runtime that
//! opened the log (its connections live there).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::answer::{AnswerProof, LogAnswer};
use super::directory::{KeyDirectory, LookupAnswer};
use super::entry::{DirectoryEntry, EntryState};
use super::head::{Head, SignedHead};
use super::keys::LogKeys;
use super::storage::{DirectoryStore, StoredDirectory};
use super::{Result, TransparencyError, wire};
use crate::Address;
use crate::store::{KeyRecord, KeyStore};

/// How often a batch refused by the fence is rebuilt on the newer epoch before the change is
/// reported as a temporary failure. Between attempts the writer waits a random while (up to
/// 10 ms times the attempt), so a slower writer is not starved by a faster one.
const MAX_ATTEMPTS: u64 = 32;

/// At most this many requests are recorded in one epoch; more wait for the next.
const MAX_BATCH: usize = 512;

/// Where the writer reads what the key store holds for an address (again on every attempt).
#[async_trait]
pub trait CurrentKeys: Send + Sync {
    /// The current record of `address`; `None` when the store has no key for it.
    async fn current(&self, address: &Address) -> crate::Result<Option<KeyRecord>>;

    /// Every version of `address` the store holds, oldest first (read only when the
    /// directory lacks versions before the current one).
    async fn history(&self, address: &Address) -> crate::Result<Vec<KeyRecord>>;
}

/// A key store as the writer's source: its current record.
pub struct StoreKeys(pub Arc<dyn KeyStore>);

#[async_trait]
impl CurrentKeys for StoreKeys {
    async fn current(&self, address: &Address) -> crate::Result<Option<KeyRecord>> {
        self.0.get(address).await
    }

    async fn history(&self, address: &Address) -> crate::Result<Vec<KeyRecord>> {
        self.0.history(address).await
    }
}

/// A record the caller already holds ([`DomainLog::sync`]): its only version.
struct Fixed(Option<KeyRecord>);

#[async_trait]
impl CurrentKeys for Fixed {
    async fn current(&self, _: &Address) -> crate::Result<Option<KeyRecord>> {
        Ok(self.0.clone())
    }

    async fn history(&self, _: &Address) -> crate::Result<Vec<KeyRecord>> {
        Ok(self.0.iter().cloned().collect())
    }
}

/// One domain's log.
pub struct DomainLog {
    domain: String,
    head_key: [u8; 32],
    vrf_key: [u8; 32],
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for DomainLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainLog")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What [`DomainLog::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The directory already said this; nothing was written.
    AlreadyRecorded,
    /// A new epoch records the entry.
    Recorded {
        /// The epoch.
        epoch: u64,
        /// Its root hash.
        root_hash: [u8; 32],
        /// The entry recorded.
        entry: DirectoryEntry,
    },
}

/// One caller's request to record an address.
struct SyncRequest {
    address: Address,
    source: Arc<dyn CurrentKeys>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
    reply: oneshot::Sender<Result<Synced>>,
}

/// A request to the directory's thread, with where its answer goes.
enum Request {
    Sync(SyncRequest),
    History {
        address: Address,
        reply: oneshot::Sender<Result<Vec<(u64, DirectoryEntry)>>>,
    },
    Head {
        now: u64,
        reply: oneshot::Sender<Result<SignedHead>>,
    },
    Answer {
        address: Address,
        now: u64,
        reply: oneshot::Sender<Result<LogAnswer>>,
    },
    Audit {
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<akd::AppendOnlyProof>>,
    },
}

/// The directory and the head key, owned by the directory's thread.
struct Worker {
    keys: LogKeys,
    /// The storage akd writes through (shares the pin with the directory's copy).
    db: StoredDirectory<dyn DirectoryStore>,
    directory: KeyDirectory<StoredDirectory<dyn DirectoryStore>>,
    /// The runtime that opened the log: key store reads run there.
    caller: tokio::runtime::Handle,
}

/// The requests of one epoch for one address.
struct Pending {
    source: Arc<dyn CurrentKeys>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
    replies: Vec<oneshot::Sender<Result<Synced>>>,
    recorded: Synced,
}

/// What the writer records for one address in the next epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The directory says what the store says.
    Nothing,
    /// This entry, and the address is done.
    Record(DirectoryEntry),
    /// The store's record of this version first (the store accepted versions the directory
    /// has not recorded yet: they are recorded one epoch each, oldest first), then again.
    Fill(u64),
    /// This deletion first, then the store's key in a later epoch: the store holds a key
    /// whose version is not above the directory's (it deleted the address and started
    /// again at version 1, or a restore replaced its history) and the directory missed it.
    DeleteFirst(DirectoryEntry),
}

/// What to record for an address whose store record is `current` and whose latest entry is
/// `latest`. A kst version at or below the latest published entry's is never recorded as
/// newer; versions between the latest entry's and the current one are recorded first, in
/// order (with `current_only`, only after a published entry: `kst migrate` records the
/// current key of an address the directory never saw, not its past). A deletion gets the
/// version after the directory's latest (at least `deleted_version`, the store's deleted
/// version + 1 when the caller knew it).
fn next_step(
    current: Option<&KeyRecord>,
    latest: Option<&DirectoryEntry>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
) -> Step {
    let deletion = |latest: &DirectoryEntry| {
        DirectoryEntry::deleted((latest.version + 1).max(deleted_version.unwrap_or(0)), now)
    };
    match (current, latest) {
        // A first publication, or one after a deletion (the store counts from 1 again).
        (Some(record), Some(l)) if l.state != EntryState::Deleted => {
            let wanted = DirectoryEntry::for_record(record);
            if wanted == *l {
                Step::Nothing
            } else if record.version == l.version + 1 {
                Step::Record(wanted)
            } else if record.version > l.version {
                Step::Fill(l.version + 1)
            } else {
                Step::DeleteFirst(deletion(l))
            }
        }
        // A first publication, or one after a deletion (the store counts from 1 again).
        (Some(record), _) => {
            if record.version > 1 && !current_only {
                Step::Fill(1)
            } else {
                Step::Record(DirectoryEntry::for_record(record))
            }
        }
        (None, Some(l)) if l.state != EntryState::Deleted => Step::Record(deletion(l)),
        (None, _) => Step::Nothing,
    }
}

/// Waits a random while before attempt `attempt + 1` of a write.
async fn back_off(attempt: u64) {
    let millis = rand::random::<u64>() % (10 * attempt);
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

fn gone() -> TransparencyError {
    TransparencyError::Directory("the key directory's thread stopped".into())
}

impl DomainLog {
    /// Opens the log of `keys.domain` kept in `store` (creating the empty directory on first
    /// use) on a thread of its own, which ends when the log is dropped.
    pub async fn open(store: Arc<dyn DirectoryStore>, keys: LogKeys) -> Result<Self> {
        let domain = keys.domain.clone();
        let head_key = keys.head.public_key();
        let (requests, mut inbox) = mpsc::unbounded_channel::<Request>();
        let (opened, open_result) = oneshot::channel::<Result<[u8; 32]>>();
        let caller = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("kst-log-{domain}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = opened.send(Err(TransparencyError::Directory(format!(
                            "cannot start the key directory's runtime: {e}"
                        ))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let worker = match Worker::open(store, keys, caller).await {
                        Ok(w) => w,
                        Err(e) => {
                            let _ = opened.send(Err(e));
                            return;
                        }
                    };
                    if opened.send(worker.directory.vrf_public_key()).is_err() {
                        return;
                    }
                    while let Some(request) = inbox.recv().await {
                        let mut syncs = Vec::new();
                        let mut others = Vec::new();
                        match request {
                            Request::Sync(s) => syncs.push(s),
                            other => others.push(other),
                        }
                        // Group commit: every request queued meanwhile joins the epoch.
                        while !syncs.is_empty() && syncs.len() < MAX_BATCH {
                            match inbox.try_recv() {
                                Ok(Request::Sync(s)) => syncs.push(s),
                                Ok(other) => others.push(other),
                                Err(_) => break,
                            }
                        }
                        if !syncs.is_empty() {
                            worker.sync_batch(syncs).await;
                        }
                        for other in others {
                            worker.handle(other).await;
                        }
                    }
                });
            })
            .map_err(|e| {
                TransparencyError::Directory(format!(
                    "cannot start the key directory's thread: {e}"
                ))
            })?;
        let vrf_key = open_result.await.map_err(|_| gone())??;
        Ok(DomainLog {
            domain,
            head_key,
            vrf_key,
            requests,
        })
    }

    /// The served domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The head key clients verify heads with.
    pub fn head_public_key(&self) -> [u8; 32] {
        self.head_key
    }

    /// The directory's VRF public key.
    pub fn vrf_public_key(&self) -> Result<[u8; 32]> {
        Ok(self.vrf_key)
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(request(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Makes the directory say what `source` holds for `address`: the writer reads it after
    /// this call, once per attempt (see the module docs), and records the key (after every
    /// version of the store's history the directory lacks, one epoch each, oldest first), a
    /// deletion (when the store has no key and the directory's latest entry is not a
    /// deletion; its version is the directory's latest + 1, at least `deleted_version`), or
    /// nothing when the directory says so already. Returns once the last epoch is committed.
    /// `now` dates a deletion.
    pub async fn record(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        deleted_version: Option<u64>,
        now: u64,
    ) -> Result<Synced> {
        self.ask_record(address, source, deleted_version, false, now)
            .await
    }

    /// [`DomainLog::record`] for `kst migrate`: an address the directory never saw (or saw
    /// deleted) gets its current key only, not the versions before it.
    pub async fn record_current(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        now: u64,
    ) -> Result<Synced> {
        self.ask_record(address, source, None, true, now).await
    }

    async fn ask_record(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        deleted_version: Option<u64>,
        current_only: bool,
        now: u64,
    ) -> Result<Synced> {
        self.ask(|reply| {
            Request::Sync(SyncRequest {
                address: address.clone(),
                source,
                deleted_version,
                current_only,
                now,
                reply,
            })
        })
        .await
    }

    /// [`DomainLog::record`] with the store's current record given (`None`: no key).
    pub async fn sync(
        &self,
        address: &Address,
        current: Option<&KeyRecord>,
        now: u64,
    ) -> Result<Synced> {
        self.record(address, Arc::new(Fixed(current.cloned())), None, now)
            .await
    }

    /// Every entry the directory holds for `address`, oldest first, with the epoch that
    /// recorded it (no proofs: for operators and tests).
    pub async fn history(&self, address: &Address) -> Result<Vec<(u64, DirectoryEntry)>> {
        self.ask(|reply| Request::History {
            address: address.clone(),
            reply,
        })
        .await
    }

    /// The signed head of the latest epoch.
    pub async fn head(&self, now: u64) -> Result<SignedHead> {
        self.ask(|reply| Request::Head { now, reply }).await
    }

    /// What the directory says about `address` at the latest epoch, with the signed head of
    /// that epoch: what the HTTP endpoint serves.
    pub async fn answer(&self, address: &Address, now: u64) -> Result<LogAnswer> {
        self.ask(|reply| Request::Answer {
            address: address.clone(),
            now,
            reply,
        })
        .await
    }

    /// The append-only proof from epoch `from` to `to` (auditors, witnesses, clients that
    /// remember an older head).
    pub async fn audit(&self, from: u64, to: u64) -> Result<akd::AppendOnlyProof> {
        self.ask(|reply| Request::Audit { from, to, reply }).await
    }
}

impl Worker {
    async fn open(
        store: Arc<dyn DirectoryStore>,
        keys: LogKeys,
        caller: tokio::runtime::Handle,
    ) -> Result<Self> {
        let db = StoredDirectory::new(store, &keys.domain);
        let directory = KeyDirectory::open_cached(db.clone(), keys.vrf.clone()).await?;
        Ok(Worker {
            keys,
            db,
            directory,
            caller,
        })
    }

    /// Answers one request; a caller that gave up is not an error.
    async fn handle(&self, request: Request) {
        // Another process may have committed since the last request.
        self.directory.forget().await;
        match request {
            Request::Sync(s) => self.sync_batch(vec![s]).await,
            Request::History { address, reply } => {
                let _ = reply.send(self.directory.history(&address).await);
            }
            Request::Head { now, reply } => {
                let result = match self.directory.current().await {
                    Ok((epoch, root)) => self.sign(epoch, root, now),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Request::Answer {
                address,
                now,
                reply,
            } => {
                let _ = reply.send(self.answer(&address, now).await);
            }
            Request::Audit { from, to, reply } => {
                let _ = reply.send(self.directory.audit(from, to).await);
            }
        }
    }

    /// Records one epoch's requests (several epochs when a deletion must come first), again
    /// on a newer epoch when another writer committed meanwhile; answers every caller.
    async fn sync_batch(&self, requests: Vec<SyncRequest>) {
        let mut pending: BTreeMap<Address, Pending> = BTreeMap::new();
        for r in requests {
            let p = pending.entry(r.address).or_insert_with(|| Pending {
                source: r.source,
                deleted_version: None,
                current_only: true,
                now: r.now,
                replies: Vec::new(),
                recorded: Synced::AlreadyRecorded,
            });
            p.deleted_version = p.deleted_version.max(r.deleted_version);
            p.current_only &= r.current_only;
            p.now = p.now.max(r.now);
            p.replies.push(r.reply);
        }
        let mut failures = 0;
        while !pending.is_empty() {
            // Every attempt reads afresh (another process may have committed).
            self.directory.forget().await;
            let built_on = self.directory.current().await.ok().map(|(e, _)| e);
            self.db.pin(built_on);
            let round = self.round(&mut pending).await;
            self.db.pin(None);
            match round {
                Ok(done) => {
                    for address in done {
                        if let Some(p) = pending.remove(&address) {
                            for reply in p.replies {
                                let _ = reply.send(Ok(p.recorded.clone()));
                            }
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures < MAX_ATTEMPTS && self.retryable(&e, built_on).await {
                        tracing::info!(domain = %self.keys.domain, attempt = failures, error = %e, "directory epoch moved under this writer; reading the store again");
                        back_off(failures).await;
                        continue;
                    }
                    for p in std::mem::take(&mut pending).into_values() {
                        for reply in p.replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
    }

    /// One attempt: reads every pending address's latest entry and the store's current
    /// record (in that order, after the caller pinned the epoch), publishes what differs as
    /// one epoch. Returns the addresses that are done.
    async fn round(&self, pending: &mut BTreeMap<Address, Pending>) -> Result<Vec<Address>> {
        // Every store read starts now, after the epoch was read and pinned.
        let reads: Vec<_> = pending
            .iter()
            .map(|(address, p)| {
                let (source, address) = (Arc::clone(&p.source), address.clone());
                self.caller
                    .spawn(async move { source.current(&address).await })
            })
            .collect();
        let mut changes = Vec::new();
        let mut done = Vec::new();
        for ((address, p), read) in pending.iter().zip(reads) {
            let current = read
                .await
                .map_err(|e| {
                    TransparencyError::Directory(format!("the key store read stopped: {e}"))
                })?
                .map_err(|e| {
                    TransparencyError::Directory(format!("cannot read the key store: {e}"))
                })?;
            let latest = self.directory.latest(address).await?;
            let step = next_step(
                current.as_ref(),
                latest.as_ref(),
                p.deleted_version,
                p.current_only,
                p.now,
            );
            match step {
                Step::Nothing => done.push(address.clone()),
                Step::Record(entry) => {
                    changes.push((address.clone(), entry));
                    done.push(address.clone());
                }
                // Stays pending: the versions after it follow, one epoch each.
                Step::Fill(version) => {
                    let history = self.read_history(&p.source, address).await?;
                    match history.iter().find(|r| r.version == version) {
                        Some(older) => {
                            changes.push((address.clone(), DirectoryEntry::for_record(older)))
                        }
                        // The store no longer holds it (replaced meanwhile): the current key.
                        None => {
                            if let Some(record) = &current {
                                changes.push((address.clone(), DirectoryEntry::for_record(record)));
                            }
                            done.push(address.clone());
                        }
                    }
                }
                // Stays pending: the key follows in the next epoch.
                Step::DeleteFirst(entry) => changes.push((address.clone(), entry)),
            }
        }
        if changes.is_empty() {
            return Ok(done);
        }
        let before = self.db.commits();
        let (epoch, root_hash) = self.directory.publish(&changes).await?;
        if self.db.commits() == before {
            // akd wrote nothing: another writer recorded these values meanwhile. Read again.
            return Err(TransparencyError::Conflict(
                "another writer recorded the same entries first".into(),
            ));
        }
        // One line per epoch, with its root: what an operator (or a test) audits the history
        // against until heads are stored.
        tracing::info!(
            domain = %self.keys.domain,
            epoch,
            root = %hex::encode(root_hash),
            entries = changes.len(),
            "key directory epoch committed"
        );
        for (address, entry) in changes {
            if let Some(p) = pending.get_mut(&address) {
                p.recorded = Synced::Recorded {
                    epoch,
                    root_hash,
                    entry,
                };
            }
        }
        Ok(done)
    }

    /// The store's history of `address`, read on the caller's runtime.
    async fn read_history(
        &self,
        source: &Arc<dyn CurrentKeys>,
        address: &Address,
    ) -> Result<Vec<KeyRecord>> {
        let (source, address) = (Arc::clone(source), address.clone());
        self.caller
            .spawn(async move { source.history(&address).await })
            .await
            .map_err(|e| TransparencyError::Directory(format!("the key store read stopped: {e}")))?
            .map_err(|e| TransparencyError::Directory(format!("cannot read the key store: {e}")))
    }

    /// Whether a failed write or read is worth doing again: the fence refused it, or another
    /// process committed while it ran (akd keeps two generations of a node, so reads at an
    /// epoch two commits old fail).
    async fn retryable(&self, e: &TransparencyError, built_on: Option<u64>) -> bool {
        matches!(e, TransparencyError::Conflict(_))
            || match built_on {
                Some(epoch) => self.epoch_moved(epoch).await,
                None => true,
            }
    }

    /// Whether the stored epoch is no longer `epoch`.
    async fn epoch_moved(&self, epoch: u64) -> bool {
        self.directory.forget().await;
        matches!(self.directory.current().await, Ok((e, _)) if e != epoch)
    }

    /// [`Worker::answer_once`], again when another process committed meanwhile (a proof
    /// built across a commit can fail to read the old epoch's nodes).
    async fn answer(&self, address: &Address, now: u64) -> Result<LogAnswer> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.directory.forget().await;
            let built_on = self.directory.current().await.ok().map(|(e, _)| e);
            match self.answer_once(address, now).await {
                Err(e) if attempt < MAX_ATTEMPTS && self.retryable(&e, built_on).await => {
                    tracing::debug!(error = %e, "directory epoch moved during a lookup; again");
                    back_off(attempt).await;
                }
                result => return result,
            }
        }
    }

    async fn answer_once(&self, address: &Address, now: u64) -> Result<LogAnswer> {
        let (head, proof) = match self.directory.lookup(address).await? {
            LookupAnswer::Present {
                epoch,
                root_hash,
                proof,
            } => (
                self.sign(epoch, root_hash, now)?,
                AnswerProof::Present(wire::encode_lookup(&proof)?),
            ),
            LookupAnswer::Absent(proof) => (
                self.sign(proof.epoch, proof.root_hash, now)?,
                AnswerProof::Absent(wire::encode_absence(&proof)?),
            ),
        };
        Ok(LogAnswer { head, proof })
    }

    fn sign(&self, epoch: u64, root_hash: [u8; 32], now: u64) -> Result<SignedHead> {
        self.keys.head.sign(Head {
            domain: self.keys.domain.clone(),
            epoch,
            root_hash,
            vrf_public_key: self.directory.vrf_public_key()?,
            signed_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewKey;

    /// Version `version` of a@example.net holding key `n`.
    fn rec(version: u64, n: u64) -> KeyRecord {
        NewKey {
            address: crate::AddressPolicy::default()
                .normalize("a@example.net")
                .unwrap(),
            key: format!("key {n}").into_bytes(),
            fingerprint: crate::Fingerprint::parse(&format!("{n:040X}")).unwrap(),
            publication_id: format!("{n:032x}"),
            published_at: 1_700_000_000 + n,
            revoked: false,
            expected: crate::store::Expected::Any,
        }
        .into_record(version)
    }

    fn entry(version: u64, n: u64) -> DirectoryEntry {
        DirectoryEntry::for_record(&rec(version, n))
    }

    #[test]
    fn the_next_step_keeps_the_store_order() {
        let step = |current: Option<&KeyRecord>, latest: Option<&DirectoryEntry>| {
            next_step(current, latest, None, false, 99)
        };
        // Nothing to do, first publication, the next version.
        assert_eq!(step(None, None), Step::Nothing);
        assert_eq!(step(Some(&rec(1, 1)), None), Step::Record(entry(1, 1)));
        assert_eq!(
            step(Some(&rec(2, 2)), Some(&entry(1, 1))),
            Step::Record(entry(2, 2))
        );
        assert_eq!(step(Some(&rec(2, 2)), Some(&entry(2, 2))), Step::Nothing);
        // Versions the directory lacks come first, oldest first.
        assert_eq!(step(Some(&rec(5, 5)), Some(&entry(2, 2))), Step::Fill(3));
        assert_eq!(step(Some(&rec(3, 3)), None), Step::Fill(1));
        assert_eq!(
            next_step(Some(&rec(3, 3)), None, None, true, 99),
            Step::Record(entry(3, 3)),
            "migrate records the current key of an unknown address"
        );
        // Never an older or equal version as newer: a deletion first.
        assert_eq!(
            step(Some(&rec(2, 7)), Some(&entry(4, 4))),
            Step::DeleteFirst(DirectoryEntry::deleted(5, 99))
        );
        assert_eq!(
            step(Some(&rec(2, 7)), Some(&entry(2, 2))),
            Step::DeleteFirst(DirectoryEntry::deleted(3, 99))
        );
        // After a deletion the store counts from 1 again.
        let deleted = DirectoryEntry::deleted(5, 50);
        assert_eq!(
            step(Some(&rec(1, 8)), Some(&deleted)),
            Step::Record(entry(1, 8))
        );
        assert_eq!(step(None, Some(&deleted)), Step::Nothing);
        // A deletion: the directory's latest + 1, or the store's deleted version + 1.
        assert_eq!(
            step(None, Some(&entry(4, 4))),
            Step::Record(DirectoryEntry::deleted(5, 99))
        );
        assert_eq!(
            next_step(None, Some(&entry(4, 4)), Some(7), false, 99),
            Step::Record(DirectoryEntry::deleted(7, 99))
        );
    }
}
