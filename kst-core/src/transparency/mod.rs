//! Key transparency (issue 18): every key kst serves is committed in a verifiable key directory
//! whose signed head owners, requesters and auditors check. See docs/TRANSPARENCY.md.
//!
//! The pure part, no storage or network code:
//! - [`label`]: the directory label of an address (the VRF input) and the hash domain.
//! - [`entry`]: the value committed for an address (state, kst version, fingerprint, key hash,
//!   time); akd hides it in a commitment `H(value ‖ nonce)`.
//! - [`vrf`]: the directory's RFC 9381 VRF key (ECVRF-EDWARDS25519-SHA512-TAI, akd's own).
//! - [`head`]: signed heads per domain (Ed25519) and witness cosignatures.
//! - [`directory`]: the server side, an adapter around Meta's `akd::Directory` over any
//!   [`akd::storage::Database`] (each backend implements that trait in a later step).
//! - [`verify`]: what a client or auditor checks: lookup (latest version), absence, and
//!   append-only proofs between heads.
//! - [`wire`]: the proofs' wire format (akd's protobuf messages) with size bounds.
//! - [`keys`]: the domain's log key file (head signing key and VRF key) that `kst log keygen`
//!   writes.
//! - [`records`] and [`storage`]: the storage contract a backend implements
//!   ([`DirectoryStore`]: blobs per domain, fenced batches) and akd's database over it.
//! - [`backfill`]: heads signed late for epochs that have none (their roots from akd's
//!   append-only proofs).
//! - [`log`]: one domain's log on the server: the directory, its head key, one writer per
//!   domain and process that records concurrent changes in one epoch; [`store`]: the [`crate::KeyStore`] wrapper that records every
//!   publication and deletion in it.
//! - [`answer`]: what the HTTP endpoint serves for an address (signed head + proof) and what
//!   a client checks of it.
//! - [`witness`]: heads with their cosignatures, audit answers (every head of a range and the
//!   append-only proof), what witnesses, auditors and clients check of them.
//! - [`answer`]: what the HTTP endpoint serves for an address (signed head + proof, and the
//!   append-only proof from the client's remembered epoch) and what a client checks of it;
//!   [`history`]: the owner's view, every version of an address with akd's history proof.

pub mod answer;
pub mod backfill;
pub mod directory;
pub mod entry;
pub mod head;
pub mod history;
pub mod keys;
pub mod label;
pub mod log;
pub mod mail_bound;
pub mod records;
pub mod self_check;
pub mod storage;
pub mod store;
pub mod verify;
pub mod vrf;
pub mod wire;
pub mod witness;

#[cfg(test)]
mod tests;

pub use directory::{AbsenceProof, KeyDirectory, LookupAnswer};
pub use entry::{DirectoryEntry, EntryState};
pub use head::{Cosignature, Head, HeadSigner, SignedHead};
pub use keys::LogKeys;
pub use label::{KstDomainLabel, directory_label};
pub use log::{CurrentKeys, DomainLog, IncomingChange, StoreKeys, Synced, wait_for_log_threads};
pub use storage::{
    DirectoryStore, DirectoryStoreError, RecordBatch, RootAndNodes, RootWrite, SignHead,
    StoredDirectory, ValueStateBlob, check_domain, on_runtime,
};
pub use store::{RecordedAll, TransparentStore};
pub use vrf::VrfSecret;

/// The akd configuration kst uses: BLAKE3 with kst's domain label, akd's "experimental" tree
/// hashing (the one akd's main branch deploys).
pub type Config = akd::ExperimentalConfiguration<KstDomainLabel>;

/// What went wrong in the transparency layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransparencyError {
    /// The directory (akd) failed: a storage fault or an inconsistent state. Retry later; if it
    /// persists, the directory's store needs an operator.
    #[error("key directory: {0}")]
    Directory(String),
    /// A proof did not verify: the answer is not the directory's latest committed state. Treat
    /// it as an attack (the client exits 5).
    #[error("transparency proof rejected: {0}")]
    Verification(String),
    /// Another writer committed the epoch this one was built on (a pool without its lease,
    /// or two processes on one host): reload and retry.
    #[error("key directory: {0}")]
    Conflict(String),
    /// A signature over a head did not verify, or a key is malformed.
    #[error("head signature rejected: {0}")]
    Signature(String),
    /// A request asked for more epochs than one answer carries (`?since=` too far back): the
    /// client forgets its remembered head and pins again, or asks in shorter steps.
    #[error("key directory: {0}")]
    Range(String),
    /// A witness's cosignature older than the one stored for it (a replay of an earlier
    /// epoch's, or of an earlier check of the same epoch): dropped, the newer one stays.
    #[error("stale cosignature: {0}")]
    Stale(String),
    /// Bytes that should hold a proof, entry, head or key file could not be decoded.
    #[error("malformed transparency data: {0}")]
    Malformed(String),
}

/// Result of the transparency layer.
pub type Result<T> = std::result::Result<T, TransparencyError>;

impl From<akd::errors::AkdError> for TransparencyError {
    fn from(e: akd::errors::AkdError) -> Self {
        use akd::errors::{AkdError, StorageError};
        match e {
            AkdError::Storage(StorageError::Transaction(m))
                if m.starts_with(storage::CONFLICT_MARKER) =>
            {
                TransparencyError::Conflict(m)
            }
            e => TransparencyError::Directory(e.to_string()),
        }
    }
}
