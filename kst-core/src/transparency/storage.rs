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
}

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

    /// Writes `batch` (see the module docs): all of it or, on
    /// [`DirectoryStoreError::Conflict`], nothing.
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

    /// Stores `witness`'s cosignature (an opaque blob) of the head of `epoch`, replacing one
    /// the same witness gave for that epoch before. The caller has verified it.
    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
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
pub struct StoredDirectory<T: ?Sized> {
    store: Arc<T>,
    domain: String,
    pinned: Arc<Mutex<Option<u64>>>,
    /// Batches with a root this handle (and its clones) committed.
    committed: Arc<AtomicU64>,
}

impl<T: ?Sized> Clone for StoredDirectory<T> {
    fn clone(&self) -> Self {
        StoredDirectory {
            store: Arc::clone(&self.store),
            domain: self.domain.clone(),
            pinned: Arc::clone(&self.pinned),
            committed: Arc::clone(&self.committed),
        }
    }
}

impl<T: DirectoryStore + ?Sized> StoredDirectory<T> {
    /// The directory of `domain` in `store`.
    pub fn new(store: Arc<T>, domain: &str) -> Self {
        StoredDirectory {
            store,
            domain: domain.to_string(),
            pinned: Arc::new(Mutex::new(None)),
            committed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many epochs this handle (and its clones) committed: akd's `publish` returns the
    /// current epoch *without writing* when every value equals the stored latest one (another
    /// writer recorded it meanwhile), so the writer compares this before and after.
    pub fn commits(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// From now on (and in every clone), write only a batch built on epoch `epoch`: one
    /// built on another epoch fails as a conflict without touching the backend. `None`
    /// lifts the pin.
    pub fn pin(&self, epoch: Option<u64>) {
        *self.pinned.lock().unwrap_or_else(PoisonError::into_inner) = epoch;
    }

    fn pinned(&self) -> Option<u64> {
        *self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stored root's epoch (`None` before the first root).
    async fn committed_epoch(&self) -> Result<Option<u64>, StorageError> {
        Ok(self
            .store
            .root(&self.domain)
            .await
            .map_err(storage_error)?
            .map(|(e, _)| e))
    }

    /// The committed value states of `label`, oldest first.
    async fn states(&self, label: &AkdLabel) -> Result<Vec<ValueState>, StorageError> {
        let Some(committed) = self.committed_epoch().await? else {
            return Ok(Vec::new());
        };
        let mut states = Vec::new();
        for (epoch, blob) in self
            .store
            .value_states(&self.domain, &label.0)
            .await
            .map_err(storage_error)?
        {
            if epoch > committed {
                continue;
            }
            match records::decode(&blob) {
                Ok(DbRecord::ValueState(state)) if state.epoch == epoch => states.push(state),
                Ok(_) => return Err(corrupt("a value state slot holds another record")),
                Err(e) => return Err(corrupt(&e.to_string())),
            }
        }
        states.sort_by_key(|s| s.epoch);
        Ok(states)
    }
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
        if let (Some(pinned), Some(root)) = (self.pinned(), &batch.root)
            && root.expected_epoch != Some(pinned)
        {
            return Err(storage_error(DirectoryStoreError::Conflict(format!(
                "batch built on epoch {:?}, the writer read the key store at epoch {pinned}",
                root.expected_epoch
            ))));
        }
        let epoch_batch = batch.root.is_some();
        self.store
            .commit(&self.domain, batch)
            .await
            .map_err(storage_error)?;
        if epoch_batch {
            self.committed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let key = St::get_full_binary_key_id(id);
        let not_found = || StorageError::NotFound(format!("{:?} {id:?}", St::data_type()));
        match St::data_type() {
            StorageType::Azks => {
                match self.store.root(&self.domain).await.map_err(storage_error)? {
                    Some((_, blob)) => decode(&blob),
                    None => Err(not_found()),
                }
            }
            StorageType::TreeNode => {
                let found = self
                    .store
                    .nodes(&self.domain, std::slice::from_ref(&key))
                    .await
                    .map_err(storage_error)?;
                match found.first() {
                    Some(blob) => decode(blob),
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
            return blobs.iter().map(|b| decode(b)).collect();
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
        for username in usernames {
            let states = self.states(username).await?;
            if let Some(s) = pick(&states, flag) {
                map.insert(username.clone(), (s.version, s.value.clone()));
            }
        }
        Ok(map)
    }
}
