//! The server side: one domain's key directory, an adapter around Meta's `akd::Directory`.
//!
//! Storage is any [`akd::storage::Database`] (three record kinds: the tree's root record
//! `Azks`, tree nodes, and value states); kst's backends implement it in a later step
//! (docs/TRANSPARENCY.md, "What each backend stores"). akd's publication is single-writer: it
//! reads the root record, computes the next epoch and writes every changed record in one
//! batch. Exactly one instance of a pool may call [`KeyDirectory::publish`] at a time (the
//! sequencer lease, docs/TRANSPARENCY.md); lookups and audits may run anywhere.

use akd::append_only_zks::{Azks, AzksParallelismConfig, DEFAULT_AZKS_KEY};
use akd::directory::Directory;
use akd::ecvrf::VRFKeyStorage;
use akd::errors::StorageError;
use akd::storage::types::{DbRecord, ValueStateRetrievalFlag};
use akd::storage::{Database, StorageManager};
use akd::{AppendOnlyProof, EpochHash, LookupProof, NonMembershipProof, VersionFreshness};

use super::entry::{DirectoryEntry, EntryState};
use super::label::directory_label;
use super::vrf::VrfSecret;
use super::{Config, Result, TransparencyError};
use crate::Address;

/// How long akd's node cache ([`KeyDirectory::open_cached`]) keeps an entry: the nodes near
/// the root are written again by every epoch and stay; the rest is read again when needed.
pub const CACHE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// The size above which akd's node cache drops its oldest entries (checked every 15 s):
/// about 200 000 tree nodes.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A page of older versions of an address, as [`KeyDirectory::history_before`] builds it.
#[derive(Debug, Clone)]
pub struct PageProof {
    /// akd's history proof holding the update proofs of the page's versions only.
    pub proof: akd::HistoryProof,
    /// The latest epoch, which the proofs are against.
    pub epoch: u64,
    /// That epoch's root hash.
    pub root: [u8; 32],
    /// Whether the address's newest version (above the page, or its first) holds no key: a
    /// deletion, or a value that is no kst entry. The page does not say it (its versions are
    /// the older ones); the server's limits count such a page as a miss
    /// ([`super::history::PageAnswer::finds_no_key`]).
    pub newest_finds_no_key: bool,
    /// Whether the address's newest version at `epoch` holds akd's tombstone (a value a
    /// deletion withdrew): never so at that epoch itself, so the values were read after
    /// another process committed a deletion (they are overwritten in place), or were altered
    /// behind kst's back.
    pub newest_withdrawn: bool,
}

/// One domain's verifiable key directory over the storage `S`.
pub struct KeyDirectory<S: Database + 'static> {
    directory: Directory<Config, S, VrfSecret>,
    storage: StorageManager<S>,
    vrf: VrfSecret,
}

/// What the directory says about an address, with the proof, at one epoch.
#[derive(Debug, Clone)]
pub enum LookupAnswer {
    /// The address's latest version, proven fresh (no later version exists at `epoch`).
    Present {
        /// The epoch the proof is against.
        epoch: u64,
        /// The root hash at that epoch.
        root_hash: [u8; 32],
        /// akd's lookup proof: VRF proofs, membership of the version and its marker, and
        /// non-membership of the version's stale position.
        proof: Box<LookupProof>,
    },
    /// The address was never published in this directory.
    Absent(Box<AbsenceProof>),
}

/// Proof that an address has no version at an epoch: the VRF proof of its first position
/// and that position's non-membership in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsenceProof {
    /// The epoch the proof is against.
    pub epoch: u64,
    /// The root hash at that epoch.
    pub root_hash: [u8; 32],
    /// VRF proof (80 bytes) that the position below belongs to the address (version 1).
    pub vrf_proof: Vec<u8>,
    /// The position's non-membership proof.
    pub proof: NonMembershipProof,
}

impl<S: Database + 'static> KeyDirectory<S> {
    /// Opens the directory kept in `db`, creating its empty tree on first use.
    pub async fn open(db: S, vrf: VrfSecret) -> Result<Self> {
        Self::over(StorageManager::new_no_cache(db), vrf).await
    }

    async fn over(storage: StorageManager<S>, vrf: VrfSecret) -> Result<Self> {
        let directory = Directory::new(
            storage.clone(),
            vrf.clone(),
            AzksParallelismConfig::disabled(),
        )
        .await?;
        Ok(KeyDirectory {
            directory,
            storage,
            vrf,
        })
    }

    /// [`KeyDirectory::open`] with akd's node cache: akd then reads the tree level by level
    /// in batches (one read per level instead of one per node) and keeps what it read and
    /// wrote (at most [`CACHE_BYTES`], an entry for at most [`CACHE_LIFETIME`]). The caller
    /// decides when the cache is no longer the stored tree and calls
    /// [`KeyDirectory::forget`] (the writer: whenever another process may have committed;
    /// a batch built on stale nodes is refused by the fence anyway).
    pub async fn open_cached(db: S, vrf: VrfSecret) -> Result<Self> {
        let storage = StorageManager::new(db, Some(CACHE_LIFETIME), Some(CACHE_BYTES), None);
        Self::over(storage, vrf).await
    }

    /// Drops what the node cache holds ([`KeyDirectory::open_cached`]).
    pub async fn forget(&self) {
        self.storage.flush_cache().await;
    }

    /// The VRF public key clients verify labels with.
    pub fn vrf_public_key(&self) -> Result<[u8; 32]> {
        self.vrf.public_key()
    }

    /// Records one batch of changes as the next epoch; returns the epoch and its root hash.
    /// An address may appear once per batch. Only the pool's sequencer may call this.
    pub async fn publish(&self, changes: &[(Address, DirectoryEntry)]) -> Result<(u64, [u8; 32])> {
        let updates = changes
            .iter()
            .map(|(address, entry)| (directory_label(address), entry.to_value()))
            .collect();
        let EpochHash(epoch, root) = self.directory.publish(updates).await?;
        Ok((epoch, root))
    }

    /// The latest epoch and its root hash.
    pub async fn current(&self) -> Result<(u64, [u8; 32])> {
        let EpochHash(epoch, root) = self.directory.get_epoch_hash().await?;
        Ok((epoch, root))
    }

    /// The latest entry the directory holds for `address` (no proof: for the writer, which
    /// compares it with the store), `None` when it never held one.
    pub async fn latest(&self, address: &Address) -> Result<Option<DirectoryEntry>> {
        match self
            .storage
            .get_user_state(&directory_label(address), ValueStateRetrievalFlag::MaxEpoch)
            .await
        {
            Ok(state) => Ok(Some(DirectoryEntry::from_value(&state.value)?)),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(TransparencyError::Directory(e.to_string())),
        }
    }

    /// Every entry the directory holds for `address`, oldest first, each with the epoch that
    /// recorded it (no proof: for the operator's checks and tests); empty when it never held
    /// one. Versions whose value a deletion withdrew (akd's tombstone) are left out.
    pub async fn entries(&self, address: &Address) -> Result<Vec<(u64, DirectoryEntry)>> {
        match self.storage.get_user_data(&directory_label(address)).await {
            Ok(data) => {
                let mut states = data.states;
                states.sort_by_key(|s| s.epoch);
                states
                    .iter()
                    .filter(|s| s.value.0 != akd::TOMBSTONE)
                    .map(|s| Ok((s.epoch, DirectoryEntry::from_value(&s.value)?)))
                    .collect()
            }
            Err(StorageError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(TransparencyError::Directory(e.to_string())),
        }
    }

    /// Proves what the directory holds for `address` at the latest epoch.
    pub async fn lookup(&self, address: &Address) -> Result<LookupAnswer> {
        let label = directory_label(address);
        match self
            .storage
            .get_user_state(&label, ValueStateRetrievalFlag::MaxEpoch)
            .await
        {
            Ok(_) => {
                let (proof, EpochHash(epoch, root_hash)) = self.directory.lookup(label).await?;
                Ok(LookupAnswer::Present {
                    epoch,
                    root_hash,
                    proof: Box::new(proof),
                })
            }
            Err(StorageError::NotFound(_)) => {
                Ok(LookupAnswer::Absent(Box::new(self.absence(address).await?)))
            }
            Err(e) => Err(TransparencyError::Directory(e.to_string())),
        }
    }

    /// Proves that `address` has no version at the latest epoch; an error if it has one
    /// ([`KeyDirectory::lookup`] chooses). A version published between the check and the proof
    /// makes the proof fail to verify, never verify falsely.
    pub async fn absence(&self, address: &Address) -> Result<AbsenceProof> {
        let label = directory_label(address);
        // akd builds a (failing) non-membership proof even for a present position: refuse.
        match self
            .storage
            .get_user_state(&label, ValueStateRetrievalFlag::MaxEpoch)
            .await
        {
            Ok(_) => {
                return Err(TransparencyError::Directory(format!(
                    "{address} has a version in the directory: it gets a lookup proof"
                )));
            }
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(TransparencyError::Directory(e.to_string())),
        }
        let azks = self.azks().await?;
        let position = self
            .vrf
            .get_node_label::<Config>(&label, VersionFreshness::Fresh, 1)
            .await
            .map_err(|e| TransparencyError::Directory(e.to_string()))?;
        let vrf_proof = self
            .vrf
            .get_label_proof::<Config>(&label, VersionFreshness::Fresh, 1)
            .await
            .map_err(|e| TransparencyError::Directory(e.to_string()))?;
        let proof = azks
            .get_non_membership_proof::<Config, _>(&self.storage, position)
            .await?;
        Ok(AbsenceProof {
            epoch: azks.get_latest_epoch(),
            root_hash: azks.get_root_hash::<Config, _>(&self.storage).await?,
            vrf_proof: vrf_proof.to_bytes().to_vec(),
            proof,
        })
    }

    /// akd's history proof of `address` at the latest epoch (its newest
    /// [`super::history::MAX_VERSIONS`] versions), with that epoch and its root hash; `None`
    /// for an address the directory never held.
    pub async fn history(
        &self,
        address: &Address,
    ) -> Result<Option<(akd::HistoryProof, u64, [u8; 32])>> {
        let label = directory_label(address);
        match self
            .storage
            .get_user_state(&label, ValueStateRetrievalFlag::MaxEpoch)
            .await
        {
            Ok(_) => {}
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(TransparencyError::Directory(e.to_string())),
        }
        let (proof, EpochHash(epoch, root)) = self
            .directory
            .key_history(&label, super::history::history_params())
            .await?;
        Ok(Some((proof, epoch, root)))
    }

    /// The versions of `address` older than `before` (the newest
    /// [`super::history::MAX_VERSIONS`] of them, newest first), each with akd's update proof
    /// against the latest epoch (the membership of the version's fresh position with its
    /// committed value, and of the previous version's stale marker), as akd builds them for a
    /// history proof; with that epoch and its root hash. Only the update proofs are filled
    /// (the markers that bound a history belong to the newest page,
    /// [`KeyDirectory::history`]). `None` when the directory holds no such version, or
    /// `before` is above the one after the address's newest version.
    pub async fn history_before(
        &self,
        address: &Address,
        before: u64,
    ) -> Result<Option<PageProof>> {
        use akd::UpdateProof;
        use akd::configuration::Configuration as _;

        let label = directory_label(address);
        let azks = self.azks().await?;
        let epoch = azks.get_latest_epoch();
        let mut states = match self.storage.get_user_data(&label).await {
            Ok(data) => data.states,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(TransparencyError::Directory(e.to_string())),
        };
        states.retain(|s| s.epoch <= epoch);
        let newest_withdrawn = states
            .iter()
            .max_by_key(|s| s.version)
            .is_some_and(|s| s.value.0 == akd::TOMBSTONE);
        let newest_finds_no_key = states
            .iter()
            .max_by_key(|s| s.version)
            .and_then(|s| DirectoryEntry::from_value(&s.value).ok())
            .is_none_or(|e| e.state == EntryState::Deleted);
        // A page starts right below a version the address has, or below the one after its
        // newest: above that there is no such page (a client never asks for one; built, it
        // would hold versions that are not the ones right below `before`, which the server's
        // own check of its answers refuses, a 503 and a false "altered" error for anyone's
        // asking).
        let newest_version = states.iter().map(|s| s.version).max().unwrap_or(0);
        if before > newest_version.saturating_add(1) {
            return Ok(None);
        }
        states.retain(|s| s.version < before);
        states.sort_by_key(|s| std::cmp::Reverse(s.version));
        states.truncate(super::history::MAX_VERSIONS);
        if states.is_empty() {
            return Ok(None);
        }
        let vrf_error = |e: akd::ecvrf::VrfError| TransparencyError::Directory(e.to_string());
        // akd's commitment key: the hash of the VRF secret (akd's `derive_commitment_key`).
        let commitment_key = Config::hash(&self.vrf.retrieve().await.map_err(vrf_error)?);
        let mut update_proofs = Vec::with_capacity(states.len());
        for state in &states {
            let version = state.version;
            let fresh = self
                .vrf
                .get_node_label::<Config>(&label, VersionFreshness::Fresh, version)
                .await
                .map_err(vrf_error)?;
            let existence_vrf_proof = self
                .vrf
                .get_label_proof::<Config>(&label, VersionFreshness::Fresh, version)
                .await
                .map_err(vrf_error)?
                .to_bytes()
                .to_vec();
            let existence_proof = azks
                .get_membership_proof::<Config, _>(&self.storage, fresh)
                .await?;
            let (previous_version_vrf_proof, previous_version_proof) = if version > 1 {
                let stale = self
                    .vrf
                    .get_node_label::<Config>(&label, VersionFreshness::Stale, version - 1)
                    .await
                    .map_err(vrf_error)?;
                let vrf_proof = self
                    .vrf
                    .get_label_proof::<Config>(&label, VersionFreshness::Stale, version - 1)
                    .await
                    .map_err(vrf_error)?
                    .to_bytes()
                    .to_vec();
                let proof = azks
                    .get_membership_proof::<Config, _>(&self.storage, stale)
                    .await?;
                (Some(vrf_proof), Some(proof))
            } else {
                (None, None)
            };
            let commitment_nonce =
                Config::get_commitment_nonce(&commitment_key, &fresh, version, &state.value)
                    .to_vec();
            update_proofs.push(UpdateProof {
                epoch: state.epoch,
                value: state.value.clone(),
                version,
                existence_vrf_proof,
                existence_proof,
                previous_version_vrf_proof,
                previous_version_proof,
                commitment_nonce,
            });
        }
        let root = azks.get_root_hash::<Config, _>(&self.storage).await?;
        Ok(Some(PageProof {
            proof: akd::HistoryProof {
                update_proofs,
                past_marker_vrf_proofs: Vec::new(),
                existence_of_past_marker_proofs: Vec::new(),
                future_marker_vrf_proofs: Vec::new(),
                non_existence_of_future_marker_proofs: Vec::new(),
            },
            epoch,
            root,
            newest_finds_no_key,
            newest_withdrawn,
        }))
    }

    /// The tree's root record.
    async fn azks(&self) -> Result<Azks> {
        match self.storage.get::<Azks>(&DEFAULT_AZKS_KEY).await {
            Ok(DbRecord::Azks(azks)) => Ok(azks),
            Ok(_) => Err(TransparencyError::Directory(
                "the directory's root record has the wrong kind".into(),
            )),
            Err(e) => Err(TransparencyError::Directory(e.to_string())),
        }
    }

    /// The append-only proof from epoch `from` to epoch `to` (one step per epoch between).
    pub async fn audit(&self, from: u64, to: u64) -> Result<AppendOnlyProof> {
        Ok(self.directory.audit(from, to).await?)
    }

    /// How many elements the append-only proof's step from `epoch` to `epoch + 1` holds when
    /// built now (what akd's audit would put in it: the unchanged subtree roots and the
    /// inserted leaves), counted by walking the tree level by level (node reads only: nothing
    /// hashed, nothing encoded), or `None` as soon as it holds more than `cap` elements (the
    /// walk stops there: at most about `4 * cap` nodes are read). akd builds every step from
    /// the latest tree, so the step of an old epoch lists every subtree the later epochs
    /// split: the steps of a client far behind are the large ones, and this is how the server
    /// finds out before it builds one (docs/TRANSPARENCY.md, "Catching up in steps").
    pub async fn audit_step_count(&self, epoch: u64, cap: usize) -> Result<Option<StepCount>> {
        Ok(self.audit_step_walk(epoch, cap).await?.count)
    }

    /// [`KeyDirectory::audit_step_count`] with the number of tree nodes the walk read (what
    /// a refusal cost: the step planner adds them up, [`StepWalk::reads`]).
    pub async fn audit_step_walk(&self, epoch: u64, cap: usize) -> Result<StepWalk> {
        self.walk_step(epoch, cap, cap.saturating_mul(4).saturating_add(64))
            .await
    }

    /// [`KeyDirectory::audit_step_walk`] within `budget`, the reads of a count of many
    /// steps ([`ReadBudget`]): `count` is `None` too when the step needs more reads than
    /// the budget has left, and the reads are taken from it.
    pub async fn audit_step_walk_within(
        &self,
        epoch: u64,
        cap: usize,
        budget: &mut ReadBudget,
    ) -> Result<StepWalk> {
        let read_cap = budget.next_cap(cap);
        let walk = self.walk_step(epoch, cap, read_cap).await?;
        budget.spend(walk.reads);
        Ok(walk)
    }

    /// The walk of [`KeyDirectory::audit_step_walk`], reading at most `read_cap` nodes.
    async fn walk_step(&self, epoch: u64, cap: usize, read_cap: usize) -> Result<StepWalk> {
        use akd::tree_node::{NodeKey, TreeNodeWithPreviousValue};
        let latest = self.azks().await?.get_latest_epoch();
        if epoch >= latest {
            return Err(TransparencyError::Range(format!(
                "no append-only step from epoch {epoch}: the latest is {latest}"
            )));
        }
        let mut count = StepCount::default();
        let mut level = vec![NodeKey(akd::NodeLabel::root())];
        let mut reads = 0usize;
        while !level.is_empty() {
            if reads + level.len() > read_cap {
                return Ok(StepWalk { count: None, reads });
            }
            reads += level.len();
            let records = self
                .storage
                .batch_get::<TreeNodeWithPreviousValue>(&level)
                .await
                .map_err(|e| TransparencyError::Directory(e.to_string()))?;
            if records.len() != level.len() {
                return Err(TransparencyError::Directory(format!(
                    "the tree lacks {} of {} nodes the append-only step from epoch {epoch} \
                     needs",
                    level.len() - records.len(),
                    level.len()
                )));
            }
            let mut next = Vec::new();
            for record in records {
                let DbRecord::TreeNode(record) = record else {
                    return Err(TransparencyError::Directory(
                        "a tree node record has the wrong kind".into(),
                    ));
                };
                // The node as of the latest epoch (a commit under way may have written newer
                // ones: akd then reads the previous value, so does this).
                let node = match (&record.latest_node, &record.previous_node) {
                    (n, _) if n.last_epoch <= latest => n,
                    (_, Some(p)) => p,
                    (_, None) => {
                        return Err(TransparencyError::Directory(
                            "a tree node newer than the latest epoch has no previous value".into(),
                        ));
                    }
                };
                if node.last_epoch <= epoch {
                    if node.node_type != akd::tree_node::TreeNodeType::Root {
                        count.unchanged += 1;
                    }
                } else if node.min_descendant_epoch > epoch + 1 {
                } else if node.node_type == akd::tree_node::TreeNodeType::Leaf {
                    count.inserted += 1;
                } else {
                    next.extend(node.left_child.map(NodeKey));
                    next.extend(node.right_child.map(NodeKey));
                }
                if count.unchanged + count.inserted > cap {
                    return Ok(StepWalk { count: None, reads });
                }
            }
            level = next;
        }
        Ok(StepWalk {
            count: Some(count),
            reads,
        })
    }
}

/// The tree nodes a count of many steps may read in all ([`KeyDirectory::audit_step_walk_within`]):
/// four per element of the count's budget and 64 more a step, and each walk at most its own
/// `4 * cap + 64`. Without it each walk had only its own bound: a step of an old epoch in a
/// tree that grew since reads many more nodes than it holds elements (the subtrees wholly
/// newer than the step are read and skipped: up to two a level of the tree for each
/// element), so a count of many such steps could read 9 to 18 nodes an element in all
/// (red team: `rt18_a_far_behind_count_reads_at_most_four_nodes_an_element`), not the four
/// the bounds were set for.
#[derive(Debug, Clone, Copy)]
pub struct ReadBudget {
    left: usize,
}

impl ReadBudget {
    /// The budget of a count of at most `max_elements` elements.
    pub fn for_elements(max_elements: usize) -> ReadBudget {
        ReadBudget {
            left: max_elements.saturating_mul(4),
        }
    }

    /// The read cap of the next walk (of at most `cap` elements): the 64 of its step added.
    fn next_cap(&mut self, cap: usize) -> usize {
        self.left = self.left.saturating_add(64);
        self.left.min(cap.saturating_mul(4).saturating_add(64))
    }

    fn spend(&mut self, reads: usize) {
        self.left = self.left.saturating_sub(reads);
    }
}

/// What [`KeyDirectory::audit_step_walk`] found, and what it read to find it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepWalk {
    /// The step's size; `None` when it holds more than the cap (the walk stopped there).
    pub count: Option<StepCount>,
    /// Tree nodes read (at most `4 * cap + 64`: a level that would pass that is not read).
    pub reads: usize,
}

/// The size of one step of an append-only proof ([`KeyDirectory::audit_step_count`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCount {
    /// Unchanged subtree roots (what the step's older root is computed from).
    pub unchanged: usize,
    /// Leaves inserted in the step (two per change of an address: its new position and the
    /// previous version's stale marker).
    pub inserted: usize,
}

impl StepCount {
    /// Elements in all.
    pub fn elements(&self) -> usize {
        self.unchanged + self.inserted
    }
}
