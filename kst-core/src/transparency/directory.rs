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

use super::entry::DirectoryEntry;
use super::label::directory_label;
use super::vrf::VrfSecret;
use super::{Config, Result, TransparencyError};
use crate::Address;

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
    /// in batches (one read per level instead of one per node) and keeps what it read. The
    /// cache is never trusted across requests: the caller calls [`KeyDirectory::forget`]
    /// before each one, so another process's commits are seen (a batch built on stale nodes
    /// is refused by the fence anyway).
    pub async fn open_cached(db: S, vrf: VrfSecret) -> Result<Self> {
        Self::over(StorageManager::new(db, None, None, None), vrf).await
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
    /// one.
    pub async fn entries(&self, address: &Address) -> Result<Vec<(u64, DirectoryEntry)>> {
        match self.storage.get_user_data(&directory_label(address)).await {
            Ok(data) => {
                let mut states = data.states;
                states.sort_by_key(|s| s.epoch);
                states
                    .iter()
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
    /// [`KeyDirectory::history`]). `None` when the directory holds no such version.
    pub async fn history_before(
        &self,
        address: &Address,
        before: u64,
    ) -> Result<Option<(akd::HistoryProof, u64, [u8; 32])>> {
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
        states.retain(|s| s.epoch <= epoch && s.version < before);
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
        Ok(Some((
            akd::HistoryProof {
                update_proofs,
                past_marker_vrf_proofs: Vec::new(),
                existence_of_past_marker_proofs: Vec::new(),
                future_marker_vrf_proofs: Vec::new(),
                non_existence_of_future_marker_proofs: Vec::new(),
            },
            epoch,
            root,
        )))
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
}
