//! The storage contract of the directory: what a kst backend implements so that akd's
//! [`Database`] runs on it, and the adapter ([`StoredDirectory`]) between the two.
//!
//! A backend stores, per served domain, opaque blobs ([`super::records`]) in three kinds: the
//! root record (one, with its epoch), tree nodes (by key) and value states (by label and
//! epoch). It implements [`DirectoryStore`]: four calls for the tree, no akd type in sight,
//! so PostgreSQL and Redis implement the same four against tables or keys; and five for the
//! signed heads (one per epoch, insert-if-absent) and the witnesses' cosignatures (one per
//! epoch and witness), opaque blobs too. The conformance suite
//! (`kst_core::conformance::directory`, features `conformance` + `transparency`) checks a
//! backend.
//!
//! Write order and fencing (docs/TRANSPARENCY.md, "What each backend stores"):
//! - [`DirectoryStore::commit`] writes one batch. akd builds epoch N+1 from what it read at
//!   epoch N; the batch's root carries the epoch it was built on
//!   ([`RootWrite::expected_epoch`]) and the backend writes **nothing** unless its stored root
//!   is still at that epoch ([`DirectoryStoreError::Conflict`]), checked atomically with the
//!   whole batch (a transaction, a Lua script, a file lock). Two writers (a pool) therefore
//!   never interleave epochs: the loser reloads and retries.
//! - Inside a batch the root record is written last. A backend without transactions (kst-fs)
//!   writes nodes and value states first: a node keeps its previous value, so readers at the
//!   stored epoch still read that epoch, and [`StoredDirectory`] hides value states newer than
//!   the stored root. A crash half-way leaves the directory at the old epoch; the retried
//!   batch overwrites the leftovers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use akd::errors::StorageError;
use akd::storage::types::{DbRecord, KeyData, StorageType, ValueState, ValueStateRetrievalFlag};
use akd::storage::{Database, DbSetState, Storable};
use akd::{AkdLabel, AkdValue};
use async_trait::async_trait;

use super::records;

/// What a backend fails with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryStoreError {
    /// The batch was built on another epoch than the stored one: another writer committed
    /// first. Nothing was written; reload and retry.
    #[error("directory write conflict: {0}")]
    Conflict(String),
    /// The store could not be reached or failed part-way. Temporary.
    #[error("directory store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back. An operator must look.
    #[error("directory store holds corrupt data: {0}")]
    Corrupt(String),
}

/// A key store's error met by a backend's directory: corrupt data stays corrupt, everything
/// else (unreachable, a configuration the server refuses) is a temporary failure of the
/// directory.
impl From<crate::Error> for DirectoryStoreError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Corrupt { .. } => DirectoryStoreError::Corrupt(e.to_string()),
            e => DirectoryStoreError::Unavailable(e.to_string()),
        }
    }
}

/// The prefix of the akd storage error a fenced write fails with (how the conflict crosses
/// akd, which only carries strings).
pub const CONFLICT_MARKER: &str = "kst-directory-conflict: ";

/// Checks that `domain` is a normalized domain name (lowercase ASCII letters, digits, `.` and
/// `-`, at most 253 bytes, not starting with a dot), the form backends build keys and paths
/// from; anything else is refused before it reaches the store.
pub fn check_domain(domain: &str) -> Result<(), DirectoryStoreError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DirectoryStoreError::Unavailable(format!(
            "{domain:?} is not a normalized domain name"
        )))
    }
}

/// Runs `work` as a task on `runtime` (the runtime a backend's connections belong to: the
/// directory calls its store from a thread and runtime of its own, see
/// [`super::log`]), or right here without one.
pub async fn on_runtime<T: Send + 'static>(
    runtime: Option<&tokio::runtime::Handle>,
    work: impl std::future::Future<Output = Result<T, DirectoryStoreError>> + Send + 'static,
) -> Result<T, DirectoryStoreError> {
    match runtime {
        Some(rt) => rt.spawn(work).await.map_err(|e| {
            DirectoryStoreError::Unavailable(format!("the directory store's task failed: {e}"))
        })?,
        None => work.await,
    }
}

/// The root record a batch writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootWrite {
    /// `None`: write only if the domain has no root record yet (the empty directory every
    /// instance creates on first use: the first one's stays, the others' writes are dropped
    /// without an error). `Some(e)`: write the batch only if the stored root is at epoch `e`.
    pub expected_epoch: Option<u64>,
    /// The epoch of the root written.
    pub epoch: u64,
    /// The encoded root record.
    pub blob: Vec<u8>,
}

/// One value state: the version of a label published at an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueStateBlob {
    /// The akd label (kst's [`super::directory_label`] of an address).
    pub label: Vec<u8>,
    /// The epoch it was published in.
    pub epoch: u64,
    /// The encoded record.
    pub blob: Vec<u8>,
}

/// One batch of writes; see the module docs for the order and the fence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordBatch {
    /// Tree nodes: (key, encoded record); a node's key is [`records::node_key`].
    pub nodes: Vec<(Vec<u8>, Vec<u8>)>,
    /// Value states.
    pub value_states: Vec<ValueStateBlob>,
    /// The root record, written last and fenced; `None` for a batch of nodes alone (akd's
    /// empty tree on first use).
    pub root: Option<RootWrite>,
    /// The signed head of the root's epoch (an opaque blob, as
    /// [`DirectoryStore::insert_head`] stores it), stored with the batch and only when the
    /// batch is written, after the root, insert-if-absent (a head already stored for that
    /// epoch stays); `None`: no head (the writer stores it afterwards).
    pub head: Option<Vec<u8>>,
}

impl RecordBatch {
    /// The root fence every backend applies before writing, given the epoch of the stored
    /// root (`None` before the first): `Ok(true)` to write the batch, `Ok(false)` to drop it,
    /// a [`DirectoryStoreError::Conflict`] when it was built on another epoch. akd's empty
    /// tree (nodes alone, then an epoch-0 root) is written by whoever finds no root; once one
    /// exists, a late starter's copy is dropped (it equals what is stored or would overwrite
    /// newer nodes).
    pub fn passes_fence(&self, stored: Option<u64>) -> Result<bool, DirectoryStoreError> {
        match (&self.root, stored) {
            (None, Some(_)) => Ok(false),
            (Some(r), Some(_)) if r.expected_epoch.is_none() => Ok(false),
            (Some(r), stored) if r.expected_epoch.is_some() && r.expected_epoch != stored => {
                Err(DirectoryStoreError::Conflict(format!(
                    "the batch for epoch {} was built on epoch {:?}, the stored root is at {stored:?}",
                    r.epoch, r.expected_epoch
                )))
            }
            _ => Ok(true),
        }
    }
}

/// What [`DirectoryStore::root_and_nodes`] returns: the root record with its epoch (`None`
/// before the first) and the stored nodes asked for.
pub type RootAndNodes = (Option<(u64, Vec<u8>)>, Vec<Vec<u8>>);

/// Where a backend keeps the directories of its domains, as blobs.
#[async_trait]
pub trait DirectoryStore: Send + Sync {
    /// Short name for logs (`fs`, `postgres`, ...).
    fn name(&self) -> &'static str;

    /// The stored root record of `domain` and its epoch; `None` before the first.
    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError>;

    /// The stored tree nodes with these keys; missing ones are left out, order is free.
    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError>;

    /// Every stored value state of `label` as (epoch, blob), also ones newer than the root
    /// (a crashed batch's leftovers; the adapter hides them).
    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError>;

    /// [`DirectoryStore::value_states`] of several labels, as (label, epoch, blob); labels
    /// without states are left out, order is free. The writer reads every address of an
    /// epoch at once (at most a batch's worth, 512); a backend answers in one round trip
    /// where it can. The default asks for each label in turn.
    async fn value_states_batch(
        &self,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
        let mut out = Vec::new();
        for label in labels {
            for (epoch, blob) in self.value_states(domain, label).await? {
                out.push((label.clone(), epoch, blob));
            }
        }
        Ok(out)
    }

    /// [`DirectoryStore::root`] and [`DirectoryStore::nodes`] of `keys` (the writer's check
    /// that nothing changed since it last read or wrote: the root record and the tree's root
    /// node); a backend answers in one round trip where it can, at one point in time. The
    /// default reads the root, then the nodes.
    async fn root_and_nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<RootAndNodes, DirectoryStoreError> {
        let root = self.root(domain).await?;
        let nodes = self.nodes(domain, keys).await?;
        Ok((root, nodes))
    }

    /// Writes `batch` (see the module docs): all of it or, on
    /// [`DirectoryStoreError::Conflict`], nothing. Its head, if any, is stored as by
    /// [`DirectoryStore::insert_head`] once the root is written (in the same transaction or
    /// script where the backend has one; a crash between the two leaves the epoch without a
    /// head, which is signed on first read).
    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError>;

    /// Stores `head` (an opaque blob: the signed head's text) for `epoch` unless a head is
    /// stored for that epoch already, atomically (insert-if-absent: a head is signed once per
    /// epoch, and of two writers signing one epoch the first one's stays). Returns the head
    /// stored for `epoch` afterwards: `head`, or the one that was there.
    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError>;

    /// The stored heads of the epochs `from..=to`, as (epoch, blob), oldest first; epochs
    /// without a stored head are left out. The caller bounds the range.
    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError>;

    /// Stores `witness`'s cosignature (an opaque blob) of the head of `epoch`, checked at
    /// `checked_at`, replacing one the same witness gave for that epoch before **unless that
    /// one was checked later**: the comparison and the write are one atomic step, so of two
    /// checks of one epoch stored at once (two instances of a pool) the later stays, in
    /// whichever order they arrive. The caller has verified it.
    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> Result<(), DirectoryStoreError>;

    /// The cosignatures of the head of `epoch`, as (witness key, blob); order is free.
    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError>;

    /// The newest epoch `witness` cosigned, with that cosignature; `None` before its first.
    async fn latest_cosignature(
        &self,
        domain: &str,
        witness: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError>;
}

/// akd's [`Database`] over one domain of a [`DirectoryStore`].
///
/// Clones share the *pin* ([`StoredDirectory::pin`]): the writer pins the epoch it read
/// before reading the key store, and a batch akd built on any other epoch is refused
/// ([`DirectoryStoreError::Conflict`]) before it reaches the backend. akd reads the root again
/// inside `publish`, so without the pin a batch could land on an epoch another process
/// committed after the writer read the key store, recording a stale read after a newer one.
///
/// While pinned, value states are read as of the pinned epoch (newer ones are hidden, as a
/// batch built on them would be refused anyway) and kept until the pin changes, so the
/// writer's reads of an epoch's addresses ([`StoredDirectory::prefetch`]) and akd's own
/// reads of the same labels in `publish` cost one backend call together. An epoch batch this
/// handle commits moves what is kept to the new epoch: the states of the batch's labels with
/// the batch's own added (states of other labels are dropped, bounding what is kept), so the
/// writer's next epoch, pinned on that one, reads none of them again. A batch built on a
/// stale view (another process committed meanwhile) is refused by the backend's fence, and
/// what is kept is dropped with it.
///
/// Clones also share what this handle last read or wrote of the root record and the tree's
/// root node: [`StoredDirectory::unchanged`] compares that with the store, so the writer
/// keeps akd's node cache between epochs while no other process committed.
pub struct StoredDirectory<T: ?Sized> {
    store: Arc<T>,
    domain: String,
    pinned: Arc<Mutex<Option<u64>>>,
    /// Value states as of one epoch, by label ([`Memo`]).
    memo: Arc<Mutex<Memo>>,
    /// The root record and root node this handle last read or committed.
    seen: Arc<Mutex<Seen>>,
    /// Signs the head each epoch batch carries ([`StoredDirectory::sign_heads`]).
    signer: Arc<Mutex<Option<SignHead>>>,
    /// The epoch and root hash of the head the last committed batch carried.
    signed: Arc<Mutex<Option<EpochRoot>>>,
    /// Batches with a root this handle (and its clones) committed.
    committed: Arc<AtomicU64>,
    /// How long the backend took for the last batch ([`StoredDirectory::last_commit_micros`]).
    commit_micros: Arc<AtomicU64>,
    /// Epoch batches the backend's fence refused ([`StoredDirectory::fenced`]).
    fenced: Arc<AtomicU64>,
    /// The epoch of the root record akd read or wrote last through this handle: the newest
    /// epoch akd's reads can be at ([`StoredDirectory::check_generation`]).
    read_at: Arc<Mutex<Option<u64>>>,
    /// Node reads refused because the node's version at `read_at` was gone
    /// ([`StoredDirectory::torn_reads`]).
    torn: Arc<AtomicU64>,
}

/// The committed value states of some labels, each list complete as of `epoch` (oldest
/// first): read while pinned at `epoch`, or committed by this handle in the batch that made
/// `epoch`. Used only while the pin is `epoch`.
#[derive(Debug, Default)]
struct Memo {
    epoch: Option<u64>,
    states: HashMap<Vec<u8>, Vec<ValueState>>,
}

impl Memo {
    fn clear(&mut self, epoch: Option<u64>) {
        self.epoch = epoch;
        self.states.clear();
    }
}

/// An epoch and its root hash.
type EpochRoot = (u64, [u8; 32]);

/// Signs the head of an epoch with its root hash, for [`StoredDirectory::sign_heads`]:
/// returns the head's blob, `None` when it cannot sign (the writer then stores the head
/// after the commit).
pub type SignHead = Arc<dyn Fn(u64, [u8; 32]) -> Option<Vec<u8>> + Send + Sync>;

/// The root record (epoch, blob) and the tree's root node (blob) last read or committed;
/// `None` when unknown (never read, or a write failed after akd cached its records).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    root: Option<(u64, Vec<u8>)>,
    root_node: Option<Vec<u8>>,
}

impl<T: ?Sized> Clone for StoredDirectory<T> {
    fn clone(&self) -> Self {
        StoredDirectory {
            store: Arc::clone(&self.store),
            domain: self.domain.clone(),
            pinned: Arc::clone(&self.pinned),
            memo: Arc::clone(&self.memo),
            seen: Arc::clone(&self.seen),
            signer: Arc::clone(&self.signer),
            signed: Arc::clone(&self.signed),
            committed: Arc::clone(&self.committed),
            commit_micros: Arc::clone(&self.commit_micros),
            fenced: Arc::clone(&self.fenced),
            read_at: Arc::clone(&self.read_at),
            torn: Arc::clone(&self.torn),
        }
    }
}

/// The storage key of the tree's root node.
fn root_node_key() -> Vec<u8> {
    records::node_key(&akd::NodeLabel::root())
}

/// Whether `blob` is the tree's root node.
fn is_root_node(record: &DbRecord) -> bool {
    matches!(record, DbRecord::TreeNode(n) if n.label == akd::NodeLabel::root())
}

impl<T: DirectoryStore + ?Sized> StoredDirectory<T> {
    /// The directory of `domain` in `store`.
    pub fn new(store: Arc<T>, domain: &str) -> Self {
        StoredDirectory {
            store,
            domain: domain.to_string(),
            pinned: Arc::new(Mutex::new(None)),
            memo: Arc::new(Mutex::new(Memo::default())),
            seen: Arc::new(Mutex::new(Seen::default())),
            signer: Arc::new(Mutex::new(None)),
            signed: Arc::new(Mutex::new(None)),
            committed: Arc::new(AtomicU64::new(0)),
            commit_micros: Arc::new(AtomicU64::new(0)),
            fenced: Arc::new(AtomicU64::new(0)),
            read_at: Arc::new(Mutex::new(None)),
            torn: Arc::new(AtomicU64::new(0)),
        }
    }

    /// This handle counting its refused batches ([`StoredDirectory::fenced`]) in `counter`
    /// (shared with whoever reads it).
    pub fn counting_fenced_in(mut self, counter: Arc<AtomicU64>) -> Self {
        self.fenced = counter;
        self
    }

    /// From now on (and in every clone), every epoch's batch carries its head, signed by
    /// `signer` with the root hash of the batch's root node (so the head is stored with the
    /// commit, not in a write of its own); `None`: no heads.
    pub fn sign_heads(&self, signer: Option<SignHead>) {
        *self.signer.lock().unwrap_or_else(PoisonError::into_inner) = signer;
    }

    /// The epoch and root hash of the head the last committed epoch batch carried (taken:
    /// a second call returns `None`).
    pub fn take_signed(&self) -> Option<EpochRoot> {
        self.signed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// How many epochs this handle (and its clones) committed: akd's `publish` returns the
    /// current epoch *without writing* when every value equals the stored latest one (another
    /// writer recorded it meanwhile), so the writer compares this before and after.
    pub fn commits(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// How long the backend's [`DirectoryStore::commit`] of the last batch took, in µs (the
    /// writer's epoch timings: the commit alone, next to akd's work).
    pub fn last_commit_micros(&self) -> u64 {
        self.commit_micros.load(Ordering::Relaxed)
    }

    /// From now on (and in every clone), write only a batch built on epoch `epoch`: one
    /// built on another epoch fails as a conflict without touching the backend. `None`
    /// lifts the pin. The value states kept ([`StoredDirectory`]) stay when they are as of
    /// `epoch` (read under the same pin before, or committed by this handle at `epoch`)
    /// or when the pin is lifted (they are used only under a pin of their epoch); else they
    /// are dropped.
    pub fn pin(&self, epoch: Option<u64>) {
        *self.pinned.lock().unwrap_or_else(PoisonError::into_inner) = epoch;
        let mut memo = self.memo.lock().unwrap_or_else(PoisonError::into_inner);
        if epoch.is_some() && memo.epoch != epoch {
            memo.clear(epoch);
        }
    }

    /// How many epoch batches the backend refused because another writer had committed
    /// since the epoch they were built on (its fence, [`DirectoryStoreError::Conflict`]),
    /// in this handle and its clones: each one was built on a stale view and written nowhere.
    pub fn fenced(&self) -> u64 {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Drops the value states kept ([`StoredDirectory`]): after a failed write (what akd
    /// cached of it is not trusted either).
    fn drop_memo(&self) {
        self.memo
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear(None);
    }

    /// How many node reads this handle (and its clones) refused as torn
    /// ([`StoredDirectory::check_generation`]): each one was an answer or an epoch read across
    /// two or more commits of another process, built again instead of served.
    pub fn torn_reads(&self) -> u64 {
        self.torn.load(Ordering::SeqCst)
    }

    /// Remembers `epoch` as the root akd reads at (it read or wrote that root record last).
    fn reading_at(&self, epoch: u64) {
        *self.read_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(epoch);
    }

    /// Refuses a stored node that no longer holds its version at the epoch akd reads at.
    ///
    /// A backend keeps two generations of a node (akd's latest and previous; a commit moves
    /// latest to previous and writes its own as latest), and akd picks the generation of the
    /// epoch it reads at: the latest when it is not newer, else the previous **without
    /// checking that one's epoch**. A read at epoch E of a node another process rewrote at
    /// E+1 and again at E+2 (two commits while one answer is read: each backend call is its
    /// own read, no snapshot spans them) therefore gets E+1's node as if it were E's: a proof
    /// mixing two epochs that no client accepts, or a root hash for E that is E+1's (a head
    /// signed for it would be a fork). `read_at` is the newest root record akd read or wrote
    /// through this handle (it caches that record; every read of an operation is at or before
    /// it), so a node whose both generations are newer has no version any of akd's reads can
    /// use: a conflict, and the caller builds its answer or epoch again on fresh reads (the
    /// log's retries). A node created after `read_at` (no previous generation) is left to
    /// akd, which treats it as absent at that epoch.
    fn check_generation(&self, record: &DbRecord) -> Result<(), StorageError> {
        let DbRecord::TreeNode(node) = record else {
            return Ok(());
        };
        let Some(at) = *self.read_at.lock().unwrap_or_else(PoisonError::into_inner) else {
            return Ok(());
        };
        match &node.previous_node {
            Some(previous) if node.latest_node.last_epoch > at && previous.last_epoch > at => {
                self.torn.fetch_add(1, Ordering::SeqCst);
                Err(storage_error(DirectoryStoreError::Conflict(format!(
                    "a tree node read at epoch {at} holds only the versions of epochs {} and \
                     {}: another process committed twice meanwhile; read again",
                    previous.last_epoch, node.latest_node.last_epoch
                ))))
            }
            _ => Ok(()),
        }
    }

    fn pinned(&self) -> Option<u64> {
        *self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the stored root record and root node are the ones this handle last read or
    /// committed (one backend call): then no other process committed since, and what akd
    /// cached from this handle's reads and writes is still the stored tree. `false` also
    /// when nothing was seen yet or a write failed since (akd caches a batch's records before
    /// the backend accepts them). Remembers what it read, so the next call compares with it.
    pub async fn unchanged(&self) -> Result<bool, DirectoryStoreError> {
        let (root, nodes) = self
            .store
            .root_and_nodes(&self.domain, &[root_node_key()])
            .await?;
        let now = Seen {
            root,
            root_node: nodes.into_iter().next(),
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let same = now.root.is_some() && now.root_node.is_some() && *seen == now;
        *seen = now;
        Ok(same)
    }

    fn see(&self, update: impl FnOnce(&mut Seen)) {
        update(&mut self.seen.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The stored root's epoch (`None` before the first).
    async fn committed_epoch(&self) -> Result<Option<u64>, StorageError> {
        Ok(self
            .store
            .root(&self.domain)
            .await
            .map_err(storage_error)?
            .map(|(e, _)| e))
    }

    /// Reads the value states of `labels` in one backend call (while pinned: those not read
    /// under this pin yet), so the writer's and akd's reads of an epoch's addresses that
    /// follow are answered from memory. Without a pin it reads nothing.
    pub async fn prefetch(&self, labels: &[AkdLabel]) -> Result<(), StorageError> {
        if self.pinned().is_some() {
            self.states_of(labels).await?;
        }
        Ok(())
    }

    /// The committed value states of each of `labels`, oldest first (labels without states
    /// map to an empty list): as of the pinned epoch while pinned (kept until the pin
    /// changes), else as of the stored root.
    async fn states_of(
        &self,
        labels: &[AkdLabel],
    ) -> Result<HashMap<AkdLabel, Vec<ValueState>>, StorageError> {
        let pinned = self.pinned();
        let mut out = HashMap::with_capacity(labels.len());
        let mut missing = Vec::new();
        {
            let memo = self.memo.lock().unwrap_or_else(PoisonError::into_inner);
            let usable = pinned.is_some() && memo.epoch == pinned;
            for label in labels {
                match memo.states.get(&label.0).filter(|_| usable) {
                    Some(states) => {
                        out.insert(label.clone(), states.clone());
                    }
                    None => missing.push(label.0.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let committed = match pinned {
            Some(e) => Some(e),
            None => self.committed_epoch().await?,
        };
        let Some(committed) = committed else {
            for label in missing {
                out.insert(AkdLabel(label), Vec::new());
            }
            return Ok(out);
        };
        let mut read: HashMap<Vec<u8>, Vec<ValueState>> =
            missing.iter().map(|l| (l.clone(), Vec::new())).collect();
        for (label, epoch, blob) in self
            .store
            .value_states_batch(&self.domain, &missing)
            .await
            .map_err(storage_error)?
        {
            if epoch > committed {
                continue;
            }
            let Some(states) = read.get_mut(&label) else {
                return Err(corrupt(
                    "the store answered a value state of a label not asked for",
                ));
            };
            match records::decode(&blob) {
                Ok(DbRecord::ValueState(state))
                    if state.epoch == epoch && state.username.0 == label =>
                {
                    states.push(state)
                }
                Ok(_) => return Err(corrupt("a value state slot holds another record")),
                Err(e) => return Err(corrupt(&e.to_string())),
            }
        }
        for states in read.values_mut() {
            states.sort_by_key(|s| s.epoch);
        }
        if pinned.is_some() && self.pinned() == pinned {
            let mut memo = self.memo.lock().unwrap_or_else(PoisonError::into_inner);
            if memo.epoch == pinned {
                for (label, states) in &read {
                    memo.states.insert(label.clone(), states.clone());
                }
            }
        }
        out.extend(read.into_iter().map(|(l, s)| (AkdLabel(l), s)));
        Ok(out)
    }

    /// Deletion drops the values (docs/TRANSPARENCY.md, "Deletion"): for each value state of
    /// `records` that records a deletion ([`EntryState::Deleted`]), adds to `batch` every
    /// committed earlier value state of its address that still holds a key's entry, its value
    /// replaced by akd's tombstone (as akd's own `tombstone_value_states` does), so the
    /// fingerprints and key hashes of the deleted versions go in the same commit as the
    /// deletion. The tree keeps their commitments: audits and proofs still verify, and a
    /// history shows those versions as withdrawn. Returns the labels withdrawn from.
    ///
    /// [`EntryState::Deleted`]: super::EntryState::Deleted
    async fn withdraw_deleted(
        &self,
        records: &[DbRecord],
        batch: &mut RecordBatch,
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let labels: Vec<AkdLabel> = records
            .iter()
            .filter_map(|r| match r {
                DbRecord::ValueState(s) if is_deletion(&s.value) => Some(s.username.clone()),
                _ => None,
            })
            .collect();
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let mut withdrawn = Vec::new();
        for (label, states) in self.states_of(&labels).await? {
            for mut state in states {
                if state.value.0 == akd::TOMBSTONE || is_deletion(&state.value) {
                    continue; // withdrawn already, or a deletion (no key in it)
                }
                state.value = AkdValue(akd::TOMBSTONE.to_vec());
                batch.value_states.push(ValueStateBlob {
                    label: label.0.clone(),
                    epoch: state.epoch,
                    blob: records::encode(&DbRecord::ValueState(state)),
                });
            }
            withdrawn.push(label.0);
        }
        Ok(withdrawn)
    }

    /// After a batch was committed: moves the value states kept to the batch's epoch
    /// `epoch` (`None`: a batch without a root, nothing moves). The batch was built on the
    /// epoch before (akd publishes one epoch at a time, the fence checked it), so a label's
    /// states as of `epoch` are those kept as of the epoch before plus the batch's own. Keeps
    /// only the batch's labels (at most a batch's worth); drops those a deletion withdrew
    /// from (their earlier states were rewritten: read again) and everything when what was
    /// kept was not as of the epoch before.
    fn keep_committed(&self, records: &[DbRecord], withdrawn: &[Vec<u8>], epoch: Option<u64>) {
        let mut memo = self.memo.lock().unwrap_or_else(PoisonError::into_inner);
        for label in withdrawn {
            memo.states.remove(label);
        }
        let Some(epoch) = epoch else {
            return;
        };
        if memo.epoch.map(|e| e + 1) != Some(epoch) {
            memo.clear(None);
            return;
        }
        let mut kept = HashMap::new();
        for record in records {
            let DbRecord::ValueState(state) = record else {
                continue;
            };
            let label = &state.username.0;
            let Some(mut states) = memo.states.remove(label).or_else(|| kept.remove(label)) else {
                continue;
            };
            states.retain(|s: &ValueState| s.epoch != state.epoch);
            states.push(state.clone());
            states.sort_by_key(|s| s.epoch);
            kept.insert(label.clone(), states);
        }
        memo.states = kept;
        memo.epoch = Some(epoch);
    }

    /// The committed value states of `label`, oldest first.
    async fn states(&self, label: &AkdLabel) -> Result<Vec<ValueState>, StorageError> {
        Ok(self
            .states_of(std::slice::from_ref(label))
            .await?
            .remove(label)
            .unwrap_or_default())
    }
}

/// Whether `value` is kst's entry of a deletion.
fn is_deletion(value: &AkdValue) -> bool {
    super::DirectoryEntry::from_value(value).is_ok_and(|e| e.state == super::EntryState::Deleted)
}

fn storage_error(e: DirectoryStoreError) -> StorageError {
    match e {
        DirectoryStoreError::Conflict(m) => {
            StorageError::Transaction(format!("{CONFLICT_MARKER}{m}"))
        }
        DirectoryStoreError::Unavailable(m) => StorageError::Connection(m),
        DirectoryStoreError::Corrupt(m) => StorageError::Other(m),
    }
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Other(format!("corrupt directory record: {what}"))
}

fn decode(blob: &[u8]) -> Result<DbRecord, StorageError> {
    records::decode(blob).map_err(|e| corrupt(&e.to_string()))
}

/// The state `flag` picks out of `states` (oldest first).
fn pick(states: &[ValueState], flag: ValueStateRetrievalFlag) -> Option<&ValueState> {
    match flag {
        ValueStateRetrievalFlag::MaxEpoch => states.last(),
        ValueStateRetrievalFlag::MinEpoch => states.first(),
        ValueStateRetrievalFlag::SpecificVersion(v) => states.iter().find(|s| s.version == v),
        ValueStateRetrievalFlag::SpecificEpoch(e) => states.iter().find(|s| s.epoch == e),
        ValueStateRetrievalFlag::LeqEpoch(e) => states.iter().rev().find(|s| s.epoch <= e),
    }
}

#[async_trait]
impl<T: DirectoryStore + ?Sized + 'static> Database for StoredDirectory<T> {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    async fn batch_set(
        &self,
        records: Vec<DbRecord>,
        _state: DbSetState,
    ) -> Result<(), StorageError> {
        let mut batch = RecordBatch::default();
        for record in &records {
            let blob = records::encode(record);
            match record {
                DbRecord::Azks(azks) => {
                    let epoch = azks.get_latest_epoch();
                    batch.root = Some(RootWrite {
                        // akd publishes one epoch at a time: N+1 is built on N.
                        expected_epoch: epoch.checked_sub(1),
                        epoch,
                        blob,
                    });
                }
                DbRecord::TreeNode(node) => {
                    batch.nodes.push((records::node_key(&node.label), blob))
                }
                DbRecord::ValueState(state) => batch.value_states.push(ValueStateBlob {
                    label: state.username.0.clone(),
                    epoch: state.epoch,
                    blob,
                }),
            }
        }
        // akd cached this batch's root record before handing it over (it reads at that epoch
        // from now on, whatever the backend answers: a failed write is followed by `forget`).
        if let Some(root) = &batch.root {
            self.reading_at(root.epoch);
        }
        let withdrawn = self.withdraw_deleted(&records, &mut batch).await?;
        if let (Some(pinned), Some(root)) = (self.pinned(), &batch.root)
            && root.expected_epoch != Some(pinned)
        {
            self.see(|s| *s = Seen::default());
            self.drop_memo();
            return Err(storage_error(DirectoryStoreError::Conflict(format!(
                "batch built on epoch {:?}, the writer read the key store at epoch {pinned}",
                root.expected_epoch
            ))));
        }
        let epoch_batch = batch.root.is_some();
        // The head of the new epoch, from the root node akd wrote for it.
        let signer = self
            .signer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut signed = None;
        if let (Some(signer), Some(root)) = (signer, &batch.root) {
            let root_node = records.iter().find_map(|r| match r {
                DbRecord::TreeNode(n)
                    if n.label == akd::NodeLabel::root()
                        && n.latest_node.last_epoch == root.epoch =>
                {
                    Some(n)
                }
                _ => None,
            });
            if let Some(node) = root_node {
                let root_hash = <super::Config as akd::Configuration>::compute_root_hash_from_val(
                    &node.latest_node.hash,
                );
                if let Some(head) = signer(root.epoch, root_hash) {
                    batch.head = Some(head);
                    signed = Some((root.epoch, root_hash));
                }
            }
        }
        *self.signed.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let root_key = root_node_key();
        let written = Seen {
            root: batch.root.as_ref().map(|r| (r.epoch, r.blob.clone())),
            root_node: batch
                .nodes
                .iter()
                .find(|(key, _)| *key == root_key)
                .map(|(_, blob)| blob.clone()),
        };
        let started = std::time::Instant::now();
        let result = self.store.commit(&self.domain, batch).await;
        self.commit_micros.store(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Err(e) = result {
            // akd cached this batch's records already: whatever was seen no longer vouches
            // for the cache, nor do the value states kept.
            self.see(|s| *s = Seen::default());
            self.drop_memo();
            if matches!(e, DirectoryStoreError::Conflict(_)) && epoch_batch {
                self.fenced.fetch_add(1, Ordering::SeqCst);
            }
            return Err(storage_error(e));
        }
        self.keep_committed(&records, &withdrawn, written.root.as_ref().map(|r| r.0));
        if epoch_batch {
            self.committed.fetch_add(1, Ordering::SeqCst);
            *self.signed.lock().unwrap_or_else(PoisonError::into_inner) = signed;
            self.see(|s| {
                s.root = written.root;
                if written.root_node.is_some() {
                    s.root_node = written.root_node;
                }
            });
        }
        Ok(())
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let key = St::get_full_binary_key_id(id);
        let not_found = || StorageError::NotFound(format!("{:?} {id:?}", St::data_type()));
        match St::data_type() {
            StorageType::Azks => {
                match self.store.root(&self.domain).await.map_err(storage_error)? {
                    Some((epoch, blob)) => {
                        let record = decode(&blob)?;
                        self.see(|s| s.root = Some((epoch, blob)));
                        self.reading_at(epoch);
                        Ok(record)
                    }
                    None => Err(not_found()),
                }
            }
            StorageType::TreeNode => {
                let found = self
                    .store
                    .nodes(&self.domain, std::slice::from_ref(&key))
                    .await
                    .map_err(storage_error)?;
                match found.into_iter().next() {
                    Some(blob) => {
                        let record = decode(&blob)?;
                        self.check_generation(&record)?;
                        if is_root_node(&record) {
                            self.see(|s| s.root_node = Some(blob));
                        }
                        Ok(record)
                    }
                    None => Err(not_found()),
                }
            }
            StorageType::ValueState => {
                let vs = ValueState::key_from_full_binary(&key).map_err(|e| corrupt(&e))?;
                let states = self.states(&AkdLabel(vs.0)).await?;
                pick(&states, ValueStateRetrievalFlag::SpecificEpoch(vs.1))
                    .map(|s| DbRecord::ValueState(s.clone()))
                    .ok_or_else(not_found)
            }
        }
    }

    async fn batch_get<St: Storable>(
        &self,
        ids: &[St::StorageKey],
    ) -> Result<Vec<DbRecord>, StorageError> {
        if St::data_type() == StorageType::TreeNode {
            let keys: Vec<Vec<u8>> = ids.iter().map(St::get_full_binary_key_id).collect();
            let blobs = self
                .store
                .nodes(&self.domain, &keys)
                .await
                .map_err(storage_error)?;
            let mut out = Vec::with_capacity(blobs.len());
            for blob in blobs {
                let record = decode(&blob)?;
                self.check_generation(&record)?;
                if is_root_node(&record) {
                    self.see(|s| s.root_node = Some(blob));
                }
                out.push(record);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get::<St>(id).await {
                Ok(r) => out.push(r),
                Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn get_user_data(&self, username: &AkdLabel) -> Result<KeyData, StorageError> {
        let states = self.states(username).await?;
        if states.is_empty() {
            return Err(StorageError::NotFound(format!("ValueState {username:?}")));
        }
        Ok(KeyData { states })
    }

    async fn get_user_state(
        &self,
        username: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        let states = self.states(username).await?;
        pick(&states, flag)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(format!("ValueState {username:?}")))
    }

    async fn get_user_state_versions(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        let mut map = HashMap::new();
        for (username, states) in self.states_of(usernames).await? {
            if let Some(s) = pick(&states, flag) {
                map.insert(username, (s.version, s.value.clone()));
            }
        }
        Ok(map)
    }
}
