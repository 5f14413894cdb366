//! One served domain's log on the server: its directory over a [`DirectoryStore`], its head
//! key, and the one writer per domain and process.
//!
//! Writing (docs/TRANSPARENCY.md, "Write order, as built"): [`DomainLog::sync`] makes the
//! directory say what the key store says *now* about an address. The caller holds
//! [`DomainLog::writer`] across reading the store and the sync, so two publications of one
//! process cannot record their versions out of order. Between processes (a pool, or `kst
//! deliver` next to `kst serve`) the backend's fence ([`super::storage`]) keeps the history
//! one: a batch built on a stale epoch is refused and retried here on the new epoch.
//!
//! The directory runs on a thread of its own (a current-thread Tokio runtime) and is asked
//! through a channel: rustc cannot prove akd's futures `Send` ("implementation of `Send` is
//! not general enough", rust-lang/rust#102211), and every caller here needs `Send` futures
//! (`#[async_trait]` key stores, axum handlers). The thread also runs one request at a time.

use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard, mpsc, oneshot};

use super::answer::{AnswerProof, LogAnswer};
use super::directory::{KeyDirectory, LookupAnswer};
use super::entry::{DirectoryEntry, EntryState};
use super::head::{Head, SignedHead};
use super::keys::LogKeys;
use super::storage::{DirectoryStore, StoredDirectory};
use super::{Result, TransparencyError, wire};
use crate::Address;
use crate::store::KeyRecord;

/// How often a batch refused by the fence is rebuilt on the newer epoch before the change is
/// reported as a temporary failure. Between attempts the writer waits a random while (up to
/// 10 ms times the attempt), so a slower writer is not starved by a faster one.
const MAX_ATTEMPTS: u64 = 32;

/// One domain's log.
pub struct DomainLog {
    domain: String,
    head_key: [u8; 32],
    vrf_key: [u8; 32],
    requests: mpsc::UnboundedSender<Request>,
    writer: Mutex<()>,
}

impl std::fmt::Debug for DomainLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainLog")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What [`DomainLog::sync`] did.
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

/// A request to the directory's thread, with where its answer goes.
enum Request {
    Sync {
        address: Address,
        current: Option<KeyRecord>,
        now: u64,
        reply: oneshot::Sender<Result<Synced>>,
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

/// The directory and the head key, owned by the directory's thread. The directory is opened
/// by the first request that finds it closed (a store that is down at start: every request
/// fails as a temporary error until it is back).
struct Worker {
    keys: LogKeys,
    store: Arc<dyn DirectoryStore>,
    directory: Option<KeyDirectory<StoredDirectory<dyn DirectoryStore>>>,
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
    /// use) on a thread of its own, which ends when the log is dropped. A store that cannot be
    /// read now does not fail this (a daemon starts while its database is down): it is logged,
    /// and each request opens the directory until that succeeds, failing meanwhile.
    pub async fn open(store: Arc<dyn DirectoryStore>, keys: LogKeys) -> Result<Self> {
        let domain = keys.domain.clone();
        let head_key = keys.head.public_key();
        let vrf_key = keys.vrf.public_key()?;
        let (requests, mut inbox) = mpsc::unbounded_channel::<Request>();
        let (opened, open_result) = oneshot::channel::<Result<()>>();
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
                    let mut worker = Worker {
                        keys,
                        store,
                        directory: None,
                    };
                    if let Err(e) = worker.open().await {
                        tracing::warn!(domain = %worker.keys.domain, error = %e, "the key directory cannot be read now; opening it again with the next request");
                    }
                    if opened.send(Ok(())).is_err() {
                        return;
                    }
                    while let Some(request) = inbox.recv().await {
                        worker.handle(request).await;
                    }
                });
            })
            .map_err(|e| {
                TransparencyError::Directory(format!(
                    "cannot start the key directory's thread: {e}"
                ))
            })?;
        open_result.await.map_err(|_| gone())??;
        Ok(DomainLog {
            domain,
            head_key,
            vrf_key,
            requests,
            writer: Mutex::new(()),
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

    /// The domain's writer lock: hold it across reading the key store and [`DomainLog::sync`].
    pub async fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(request(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Records what the key store holds for `address` now (`current`: its current record,
    /// `None` when it has none), unless the directory says so already. A deletion is recorded
    /// only for an address the directory holds a key for. `now` dates a deletion.
    pub async fn sync(
        &self,
        address: &Address,
        current: Option<&KeyRecord>,
        now: u64,
    ) -> Result<Synced> {
        self.ask(|reply| Request::Sync {
            address: address.clone(),
            current: current.cloned(),
            now,
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

impl Request {
    /// Answers with `e`.
    fn fail(self, e: TransparencyError) {
        // A caller that gave up is not an error.
        match self {
            Request::Sync { reply, .. } => drop(reply.send(Err(e))),
            Request::Head { reply, .. } => drop(reply.send(Err(e))),
            Request::Answer { reply, .. } => drop(reply.send(Err(e))),
            Request::Audit { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

impl Worker {
    /// Opens the directory (creating the empty one on first use) unless it is open.
    async fn open(&mut self) -> Result<()> {
        if self.directory.is_none() {
            let db = StoredDirectory::new(Arc::clone(&self.store), &self.keys.domain);
            self.directory = Some(KeyDirectory::open(db, self.keys.vrf.clone()).await?);
        }
        Ok(())
    }

    /// The open directory.
    fn dir(&self) -> Result<&KeyDirectory<StoredDirectory<dyn DirectoryStore>>> {
        self.directory
            .as_ref()
            .ok_or_else(|| TransparencyError::Directory("the directory is not open yet".into()))
    }

    /// Answers one request (opening the directory first if needed); a caller that gave up is
    /// not an error.
    async fn handle(&mut self, request: Request) {
        if let Err(e) = self.open().await {
            request.fail(e);
            return;
        }
        match request {
            Request::Sync {
                address,
                current,
                now,
                reply,
            } => {
                let _ = reply.send(self.sync(&address, current.as_ref(), now).await);
            }
            Request::Head { now, reply } => {
                let result = match self.current().await {
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
                let result = match self.dir() {
                    Ok(d) => d.audit(from, to).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
    }

    async fn sync(
        &self,
        address: &Address,
        current: Option<&KeyRecord>,
        now: u64,
    ) -> Result<Synced> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let built_on = self.current().await.ok().map(|(e, _)| e);
            match self.sync_once(address, current, now).await {
                Err(e) if attempt < MAX_ATTEMPTS && self.retryable(&e, built_on).await => {
                    tracing::info!(domain = %self.keys.domain, attempt, error = %e, "directory epoch moved under this writer; rebuilding the batch");
                    back_off(attempt).await;
                }
                result => return result,
            }
        }
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

    async fn sync_once(
        &self,
        address: &Address,
        current: Option<&KeyRecord>,
        now: u64,
    ) -> Result<Synced> {
        let latest = self.dir()?.latest(address).await?;
        let wanted = match (current, &latest) {
            (Some(record), _) => DirectoryEntry::for_record(record),
            (None, Some(entry)) if entry.state != EntryState::Deleted => {
                DirectoryEntry::deleted(entry.version + 1, now)
            }
            (None, _) => return Ok(Synced::AlreadyRecorded),
        };
        if latest.as_ref() == Some(&wanted) {
            return Ok(Synced::AlreadyRecorded);
        }
        let (epoch, root_hash) = self
            .dir()?
            .publish(&[(address.clone(), wanted.clone())])
            .await?;
        Ok(Synced::Recorded {
            epoch,
            root_hash,
            entry: wanted,
        })
    }

    /// The latest epoch and its root hash.
    async fn current(&self) -> Result<(u64, [u8; 32])> {
        self.dir()?.current().await
    }

    /// Whether the stored epoch is no longer `epoch`.
    async fn epoch_moved(&self, epoch: u64) -> bool {
        matches!(self.current().await, Ok((e, _)) if e != epoch)
    }

    /// [`Worker::answer_once`], again when another process committed meanwhile (a proof
    /// built across a commit can fail to read the old epoch's nodes).
    async fn answer(&self, address: &Address, now: u64) -> Result<LogAnswer> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let built_on = self.current().await.ok().map(|(e, _)| e);
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
        let (head, proof) = match self.dir()?.lookup(address).await? {
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
            vrf_public_key: self.keys.vrf.public_key()?,
            signed_at: now,
        })
    }
}
