//! The read-merge-write of a publication: what the service stores for a validated key.
//!
//! [`publish_merged`] reads the current key of the address, merges the new key into it when
//! both have the same primary key ([`crate::merge`]) or replaces it otherwise (the history
//! keeps the old one), applies the size budget to the result, and publishes it with a
//! compare-and-set on the version it read ([`Expected`]). When another publisher was first
//! ([`Error::Conflict`]) it reads and merges again, at most [`PUBLISH_ATTEMPTS`] times; so
//! concurrent publications of versions of one key, on any instance of a pool, lose nothing.

use crate::error::{Error, Result};
use crate::merge::{self, MergeError};
use crate::store::{Expected, KeyRecord, KeyStore, NewKey, PublishOutcome};

/// How many times a publication reads, merges and tries to write before it gives up with the
/// (temporary) conflict: the MTA then delivers the message again later.
pub const PUBLISH_ATTEMPTS: usize = 8;

/// Stores `key` (validated, as [`crate::validate`] returns it) for its address: merged into
/// the current key of the same primary key, else replacing it. The outer error is the store's
/// (temporary); the inner one is [`MergeError::TooLarge`] when the merged key exceeds
/// `limit` bytes (`limits.max_published_key_bytes`) even after [`merge::fit_budget`] dropped
/// what it may; `now` (seconds since the Unix epoch) judges which subkeys have expired. A
/// publication already applied (a redelivery) is [`PublishOutcome::Unchanged`] with the current
/// key when it still has the same primary key (see `docs/PROTOCOL.md`, "Publication").
pub async fn publish_merged(
    store: &dyn KeyStore,
    key: NewKey,
    limit: usize,
    now: u64,
) -> Result<std::result::Result<PublishOutcome, MergeError>> {
    let mut last_conflict = None;
    for _ in 0..PUBLISH_ATTEMPTS {
        let current = store.get(&key.address).await?;
        let (packets, expected) = match &current {
            Some(c) if c.fingerprint == key.fingerprint => {
                let merged = match merge::merge(&c.key, &key.key) {
                    Ok(m) => m,
                    Err(e) => {
                        // Only validated keys are stored, so this is a record written by hand
                        // or by an older tool: the new key replaces it, the history keeps it.
                        tracing::warn!(address = %key.address, version = c.version, error = %e,
                            "the current key cannot be merged; the publication replaces it");
                        canonical_or_as_is(&key.key)
                    }
                };
                (merged, Expected::Version(c.version))
            }
            Some(c) => (canonical_or_as_is(&key.key), Expected::Version(c.version)),
            None => (canonical_or_as_is(&key.key), Expected::Nothing),
        };
        let packets = match merge::fit_budget(&packets, limit, now) {
            Ok(p) => p,
            // A revocation is never refused for its size: the revoked publication passed the
            // key policy's budget alone, and a revoked key needs nothing of the stored one
            // (the store's tombstone adds the stored key revocations).
            Err(MergeError::TooLarge { .. }) if key.revoked => canonical_or_as_is(&key.key),
            Err(e @ MergeError::TooLarge { .. }) => return Ok(Err(e)),
            Err(_) => packets,
        };
        let revoked = key.revoked || merge::is_revoked(&packets).unwrap_or(false);
        let attempt = NewKey {
            key: packets,
            revoked,
            expected,
            ..key.clone()
        };
        match store.publish(attempt).await {
            Err(e @ Error::Conflict(_)) => {
                tracing::debug!(address = %key.address, error = %e, "publication raced another; merging again");
                last_conflict = Some(e);
            }
            Ok(PublishOutcome::Unchanged(applied)) => {
                return Ok(Ok(PublishOutcome::Unchanged(
                    confirmed_record(store, applied).await?,
                )));
            }
            other => return other.map(Ok),
        }
    }
    Err(last_conflict.unwrap_or_else(|| Error::Conflict(format!("publishing for {}", key.address))))
}

/// What confirms a publication that was already applied (a redelivery: the store found its
/// `publication_id` in the history, or the same bytes current), `applied` being the version
/// that holds it: the current key when it has the same primary key and is at least as new (it
/// holds this publication merged with everything published since: a subkey, a revocation),
/// else `applied` itself (the address' key was replaced by another primary key since).
async fn confirmed_record(store: &dyn KeyStore, applied: KeyRecord) -> Result<KeyRecord> {
    Ok(match store.get(&applied.address).await? {
        Some(current)
            if current.fingerprint == applied.fingerprint && current.version >= applied.version =>
        {
            current
        }
        _ => applied,
    })
}

/// The canonical form of a validated key, or the bytes as they are when they are not a
/// certificate (the conformance suite's synthetic keys).
fn canonical_or_as_is(key: &[u8]) -> Vec<u8> {
    merge::canonical(key).unwrap_or_else(|_| key.to_vec())
}
