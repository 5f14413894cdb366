//! What a client or an auditor checks. Every function takes the head the caller has already
//! accepted (signature and cosignatures checked, [`super::head`]) and fails with
//! [`TransparencyError::Verification`] on anything but the directory's committed state.

use akd::append_only_zks::Azks;
use akd::ecvrf::{Proof, VRFKeyStorage, VRFPublicKey, VrfError};
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AkdLabel, AppendOnlyProof, Configuration, LookupProof, VersionFreshness};

use super::directory::AbsenceProof;
use super::entry::DirectoryEntry;
use super::head::Head;
use super::label::directory_label;
use super::{Config, Result, TransparencyError};
use crate::Address;

/// Verifies that `proof` shows `address`'s latest version at `head` and returns what that
/// version commits to. A superseded version (an older key, a key from before its revocation)
/// fails: its stale position is in the tree.
pub fn verify_lookup(head: &Head, address: &Address, proof: LookupProof) -> Result<DirectoryEntry> {
    verify_lookup_at(head, address, proof).map(|(entry, _)| entry)
}

/// [`verify_lookup`], with the epoch at which `address`'s latest version was recorded: akd's
/// lookup proof commits to it (the leaf's value is bound to the epoch that inserted it), so
/// it is proven as the entry is.
pub fn verify_lookup_at(
    head: &Head,
    address: &Address,
    proof: LookupProof,
) -> Result<(DirectoryEntry, u64)> {
    let result = akd::client::lookup_verify::<Config>(
        &head.vrf_public_key,
        head.root_hash,
        head.epoch,
        directory_label(address),
        proof,
    )
    .map_err(|e| rejected(head, address, &e.to_string()))?;
    let entry = DirectoryEntry::from_value(&result.value)?;
    if entry.version == 0 {
        return Err(rejected(head, address, "the entry has version 0"));
    }
    if result.epoch > head.epoch {
        return Err(rejected(
            head,
            address,
            &format!(
                "the entry is recorded at epoch {}, after the head's",
                result.epoch
            ),
        ));
    }
    Ok((entry, result.epoch))
}

/// Verifies that `address` has no version at `head`.
pub async fn verify_absence(head: &Head, address: &Address, proof: &AbsenceProof) -> Result<()> {
    if proof.epoch != head.epoch || proof.root_hash != head.root_hash {
        return Err(rejected(
            head,
            address,
            &format!("the absence proof is against epoch {}", proof.epoch),
        ));
    }
    let label = directory_label(address);
    let key = VRFPublicKey::try_from(&head.vrf_public_key[..])
        .map_err(|e| rejected(head, address, &e.to_string()))?;
    let vrf_proof = Proof::try_from(&proof.vrf_proof[..])
        .map_err(|e| rejected(head, address, &e.to_string()))?;
    key.verify(&vrf_proof, &first_position_input(&label))
        .map_err(|e| rejected(head, address, &e.to_string()))?;
    let position = PublicVrf.get_node_label_from_vrf_proof(vrf_proof).await;
    if position != proof.proof.label {
        return Err(rejected(
            head,
            address,
            "the non-membership proof is for another position than the address's",
        ));
    }
    // The empty tree (every directory's epoch 0, before its first publication) holds no
    // address at all; akd's non-membership verifier refuses its proof (the root has no
    // children to take a longest prefix from), so its root, computed here, is the proof.
    if head.root_hash == empty_root().await? {
        return Ok(());
    }
    // akd exposes its non-membership verifier only behind `public_tests`; it is the same
    // function its lookup verification calls for the freshness proof.
    akd::verify::verify_nonmembership_for_tests_only::<Config>(head.root_hash, &proof.proof)
        .map_err(|e| rejected(head, address, &e.to_string()))
}

/// The root hash of an empty directory (akd's empty tree: every directory's epoch 0),
/// computed once per process.
pub(crate) async fn empty_root() -> Result<[u8; 32]> {
    static EMPTY_ROOT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if let Some(root) = EMPTY_ROOT.get() {
        return Ok(*root);
    }
    let manager = StorageManager::new_no_cache(AsyncInMemoryDatabase::new());
    let azks = Azks::new::<Config, _>(&manager).await?;
    let root = azks.get_root_hash::<Config, _>(&manager).await?;
    Ok(*EMPTY_ROOT.get_or_init(|| root))
}

/// Verifies that the directory went from `old` to `new` only by appending: `intermediate`
/// holds the root hashes of the epochs strictly between the two (the server sends them with
/// the proof). Two different heads for the same epoch are a fork.
pub async fn verify_append_only(
    old: &Head,
    new: &Head,
    intermediate: &[[u8; 32]],
    proof: AppendOnlyProof,
) -> Result<()> {
    let fail = between(old, new);
    same_directory(old, new)?;
    if new.epoch == old.epoch {
        return if new.root_hash == old.root_hash {
            Ok(())
        } else {
            Err(fail("two different roots for one epoch (a fork)".into()))
        };
    }
    if new.epoch < old.epoch {
        return Err(fail("the new head is older than the remembered one".into()));
    }
    let steps = new.epoch - old.epoch;
    // Counted before compared: a signed head may name any epoch, and the gap is not
    // materialised (a head 2^40 epochs ahead must be refused, not exhaust memory).
    if !covers_exactly(&proof.epochs, old.epoch, new.epoch)
        || u64::try_from(intermediate.len()) != Ok(steps - 1)
    {
        return Err(fail(format!(
            "the proof covers epochs {:?} with {} intermediate roots",
            proof.epochs,
            intermediate.len()
        )));
    }
    let mut roots = Vec::with_capacity(intermediate.len() + 2);
    roots.push(old.root_hash);
    roots.extend_from_slice(intermediate);
    roots.push(new.root_hash);
    akd::auditor::audit_verify::<Config>(roots, proof)
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Verifies one version of `address` as a history page proves it against `head` (akd's
/// update proof; the check akd's `key_history_verify` makes of each version it lists): the
/// version's fresh position (its VRF proof checked) holds the version's committed value at
/// its epoch, and, after version 1, the previous version's stale marker is in the tree from
/// the same epoch. A value withdrawn by a deletion (akd's tombstone) is taken as it is, as
/// `HistoryVerificationParams::AllowMissingValues` takes it.
pub async fn verify_update(head: &Head, address: &Address, proof: &akd::UpdateProof) -> Result<()> {
    let label = directory_label(address);
    let fail = |what: &str| rejected(head, address, &format!("version {}: {what}", proof.version));
    let position = vrf_position(
        head,
        &label,
        VersionFreshness::Fresh,
        proof.version,
        &proof.existence_vrf_proof,
    )
    .await
    .map_err(|e| fail(&e))?;
    if position != proof.existence_proof.label {
        return Err(fail("the membership proof is for another position"));
    }
    if proof.value.0 != akd::TOMBSTONE {
        let leaf = Config::hash_leaf_with_value(&proof.value, proof.epoch, &proof.commitment_nonce);
        if leaf.0 != proof.existence_proof.hash_val.0 {
            return Err(fail("the value is not the one the tree commits to"));
        }
    }
    akd::verify::verify_membership_for_tests_only::<Config>(head.root_hash, &proof.existence_proof)
        .map_err(|e| fail(&e.to_string()))?;
    if proof.version <= 1 {
        return Ok(());
    }
    let (Some(vrf_proof), Some(stale)) = (
        &proof.previous_version_vrf_proof,
        &proof.previous_version_proof,
    ) else {
        return Err(fail("no proof that the version before it was superseded"));
    };
    let position = vrf_position(
        head,
        &label,
        VersionFreshness::Stale,
        proof.version - 1,
        vrf_proof,
    )
    .await
    .map_err(|e| fail(&e))?;
    if position != stale.label
        || Config::hash_leaf_with_commitment(Config::stale_azks_value(), proof.epoch).0
            != stale.hash_val.0
    {
        return Err(fail(
            "the stale marker of the version before it is not the one of its epoch",
        ));
    }
    akd::verify::verify_membership_for_tests_only::<Config>(head.root_hash, stale)
        .map_err(|e| fail(&e.to_string()))
}

/// The tree position a VRF proof gives, after checking the proof for `label`'s `version` with
/// `head`'s VRF key.
async fn vrf_position(
    head: &Head,
    label: &AkdLabel,
    freshness: VersionFreshness,
    version: u64,
    vrf_proof: &[u8],
) -> std::result::Result<akd::NodeLabel, String> {
    let key = VRFPublicKey::try_from(&head.vrf_public_key[..]).map_err(|e| e.to_string())?;
    let proof = Proof::try_from(vrf_proof).map_err(|e| e.to_string())?;
    key.verify(
        &proof,
        &Config::get_hash_from_label_input(label, freshness, version),
    )
    .map_err(|e| e.to_string())?;
    Ok(PublicVrf.get_node_label_from_vrf_proof(proof).await)
}

/// The VRF input of an address's first position (version 1, fresh).
fn first_position_input(label: &AkdLabel) -> Vec<u8> {
    Config::get_hash_from_label_input(label, VersionFreshness::Fresh, 1)
}

fn rejected(head: &Head, address: &Address, what: &str) -> TransparencyError {
    TransparencyError::Verification(format!(
        "{address} at {} epoch {}: {what}",
        head.domain, head.epoch
    ))
}

/// A verifier's stand-in for akd's key storage: it holds no secret, and is used only for
/// akd's derivation of a tree position from a VRF proof.
#[derive(Clone)]
struct PublicVrf;

#[async_trait::async_trait]
impl VRFKeyStorage for PublicVrf {
    async fn retrieve(&self) -> std::result::Result<Vec<u8>, VrfError> {
        Err(VrfError::SigningKey(
            "a verifier holds no VRF secret".into(),
        ))
    }
}

/// The root hashes an append-only proof leads through: the root after each of its steps (the
/// last is the root of the proof's final epoch). A step's "after" tree is the step's unchanged
/// nodes with its inserted leaves, as akd's auditor builds it; [`verify_append_only_from`]
/// then checks every step against these roots, so a server need not send (and a client need
/// not trust) the intermediate roots.
pub async fn append_only_roots(proof: &AppendOnlyProof) -> Result<Vec<[u8; 32]>> {
    check_shape(proof)?;
    let mut roots = Vec::with_capacity(proof.proofs.len());
    for (epoch, step) in proof.epochs.iter().zip(&proof.proofs) {
        roots.push(root_after(*epoch, step).await?);
    }
    Ok(roots)
}

/// The root an append-only proof starts at: the hash of its first step's unchanged nodes
/// (the root of the epoch before that step), as akd's auditor computes it.
pub async fn append_only_start_root(proof: &AppendOnlyProof) -> Result<[u8; 32]> {
    check_shape(proof)?;
    match proof.epochs.iter().zip(&proof.proofs).next() {
        Some((epoch, step)) => root_before(*epoch, step).await,
        None => Err(TransparencyError::Verification(
            "the append-only proof has no step".into(),
        )),
    }
}

/// The roots an append-only proof leads through, from the root it starts at: the root of
/// every epoch from the first step's to the last step's end, oldest first (one more than its
/// steps), each step checked to start where the step before it ended (akd's `audit_verify`
/// over these roots, each tree built once: two builds a step). An error is
/// [`TransparencyError::Verification`]: the proof does not hold together.
pub async fn append_only_chain(proof: &AppendOnlyProof) -> Result<Vec<[u8; 32]>> {
    check_shape(proof)?;
    let mut roots = Vec::with_capacity(proof.proofs.len() + 1);
    for (epoch, step) in proof.epochs.iter().zip(&proof.proofs) {
        let start = root_before(*epoch, step).await?;
        match roots.last() {
            Some(end) if *end != start => {
                return Err(TransparencyError::Verification(format!(
                    "the append-only step from epoch {epoch} starts at root {}, not at {}, \
                     where the step before it ended",
                    hex::encode(start),
                    hex::encode(end)
                )));
            }
            Some(_) => {}
            None => roots.push(start),
        }
        roots.push(root_after(*epoch, step).await?);
    }
    Ok(roots)
}

/// The error of a check from `old` to `new`: what failed, named with the domain and both
/// epochs.
fn between<'a>(old: &'a Head, new: &'a Head) -> impl Fn(String) -> TransparencyError + 'a {
    move |what| {
        TransparencyError::Verification(format!(
            "{}: epoch {} -> {}: {what}",
            new.domain, old.epoch, new.epoch
        ))
    }
}

/// Whether `old` and `new` are heads of one directory (the same domain and VRF key): an
/// append-only proof between heads of two directories proves nothing.
fn same_directory(old: &Head, new: &Head) -> Result<()> {
    if old.domain != new.domain || old.vrf_public_key != new.vrf_public_key {
        return Err(between(old, new)(
            "the heads belong to different directories".into(),
        ));
    }
    Ok(())
}

/// Whether `epochs` are exactly `from..to`, one after another; the length is compared first,
/// so an absurd gap (a hostile head's epoch) costs nothing.
fn covers_exactly(epochs: &[u64], from: u64, to: u64) -> bool {
    u64::try_from(epochs.len()) == Ok(to.saturating_sub(from))
        && epochs.iter().copied().eq(from..to)
}

/// An append-only proof with as many epochs as steps.
fn check_shape(proof: &AppendOnlyProof) -> Result<()> {
    if proof.epochs.len() != proof.proofs.len() {
        return Err(TransparencyError::Verification(format!(
            "the append-only proof has {} epochs and {} steps",
            proof.epochs.len(),
            proof.proofs.len()
        )));
    }
    Ok(())
}

/// The root of the tree akd's auditor builds from `nodes` (with `latest_epoch` as its
/// latest epoch, when given): one tree build in memory, the work of a proof's check.
async fn root_of_nodes(
    nodes: Vec<akd::AzksElement>,
    latest_epoch: Option<u64>,
) -> std::result::Result<[u8; 32], akd::errors::AkdError> {
    use akd::append_only_zks::{AzksParallelismConfig, InsertMode};
    let manager = StorageManager::new_no_cache(
        AsyncInMemoryDatabase::new_with_remove_child_nodes_on_insertion(),
    );
    let mut azks = Azks::new::<Config, _>(&manager).await?;
    if let Some(epoch) = latest_epoch {
        azks.latest_epoch = epoch;
    }
    azks.batch_insert_nodes::<Config, _>(
        &manager,
        nodes,
        InsertMode::Auditor,
        AzksParallelismConfig::disabled(),
    )
    .await?;
    azks.get_root_hash::<Config, _>(&manager).await
}

/// The root after the step from `epoch` to `epoch + 1`: its unchanged nodes with its
/// inserted leaves (each bound to `epoch + 1`), as akd's auditor computes it.
async fn root_after(epoch: u64, step: &akd::SingleAppendOnlyProof) -> Result<[u8; 32]> {
    let end_epoch = epoch.checked_add(1).ok_or_else(|| {
        TransparencyError::Verification("the append-only proof's epochs overflow".into())
    })?;
    let mut nodes = step.unchanged_nodes.clone();
    nodes.extend(step.inserted.iter().map(|x| {
        let mut y = *x;
        y.value = akd::AzksValue(Config::hash_leaf_with_commitment(x.value, end_epoch).0);
        y
    }));
    root_of_nodes(nodes, Some(epoch)).await.map_err(|e| {
        TransparencyError::Verification(format!("the append-only step to epoch {end_epoch}: {e}"))
    })
}

/// The root before the step from `epoch`: the hash of its unchanged nodes alone, as akd's
/// auditor computes it.
async fn root_before(epoch: u64, step: &akd::SingleAppendOnlyProof) -> Result<[u8; 32]> {
    root_of_nodes(step.unchanged_nodes.clone(), None)
        .await
        .map_err(|e| {
            TransparencyError::Verification(format!("the append-only step from epoch {epoch}: {e}"))
        })
}

/// [`verify_append_only`] with the intermediate roots taken from the proof itself
/// ([`append_only_roots`]): what a client that remembers `old` checks of a newer head `new`.
pub async fn verify_append_only_from(old: &Head, new: &Head, proof: AppendOnlyProof) -> Result<()> {
    verify_append_only_roots(old, new, proof).await.map(|_| ())
}

/// [`verify_append_only_from`], returning the roots the verified proof establishes: the root
/// of every epoch after `old`'s up to `new`'s (the last is `new`'s), oldest first; none when
/// `new` is not newer. A client keeps them to recognise an older head of the same history
/// (a reply that arrives after a newer one).
pub async fn verify_append_only_roots(
    old: &Head,
    new: &Head,
    proof: AppendOnlyProof,
) -> Result<Vec<(u64, [u8; 32])>> {
    if new.epoch <= old.epoch {
        return verify_append_only(old, new, &[], proof)
            .await
            .map(|()| Vec::new());
    }
    let fail = between(old, new);
    same_directory(old, new)?;
    check_shape(&proof)?;
    if !covers_exactly(&proof.epochs, old.epoch, new.epoch) {
        return Err(fail(format!(
            "the proof covers epochs {:?}, not {} to {}",
            proof.epochs, old.epoch, new.epoch
        )));
    }
    // akd's `audit_verify` over the roots the proof leads through, each tree built once:
    // every step's tree before it must be the root the step before led to (the remembered
    // head's, for the first), and the last step must lead to `new`'s root. (Computing the
    // roots first and then calling `audit_verify` built every "after" tree twice: 3 builds
    // a step instead of 2.)
    let mut roots = Vec::with_capacity(proof.proofs.len());
    let mut before = old.root_hash;
    for (epoch, step) in proof.epochs.iter().zip(&proof.proofs) {
        let start = root_before(*epoch, step).await?;
        if start != before {
            return Err(fail(format!(
                "the step from epoch {epoch} starts at root {}, not at {}",
                hex::encode(start),
                hex::encode(before)
            )));
        }
        before = root_after(*epoch, step).await?;
        roots.push((*epoch + 1, before));
    }
    if before != new.root_hash {
        return Err(fail(format!(
            "the proof leads to root {}, not to the new head's {}",
            hex::encode(before),
            hex::encode(new.root_hash)
        )));
    }
    Ok(roots)
}
