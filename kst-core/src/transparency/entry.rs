//! The value committed in the directory for an address.
//!
//! akd stores `commitment = H(value ‖ nonce)` in the tree, with `nonce = H(commitment key ‖
//! position)` and the commitment key derived from the VRF key. The value itself is only in the
//! backend's record and in the proofs handed to someone who asked for that address. Deleting an
//! address publishes a [`EntryState::Deleted`] entry (no fingerprint, no key hash); the backend
//! then overwrites the earlier values with akd's tombstone, so the commitments of the deleted
//! versions can no longer be opened (docs/TRANSPARENCY.md, "After deletion").

use akd::AkdValue;
use sha2::{Digest, Sha256};

use super::{Result, TransparencyError};
use crate::Fingerprint;
use crate::store::KeyRecord;

/// Magic and layout version of an encoded entry.
const MAGIC: &[u8; 5] = b"KSTE1";
/// Longest fingerprint kst knows (v6: 64 hex digits).
const MAX_FINGERPRINT: usize = 64;

/// What an address's latest version says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// A key is published.
    Published = 1,
    /// The published key carries a revocation of its primary key.
    Revoked = 2,
    /// The owner deleted the key: nothing is served.
    Deleted = 3,
}

/// One version of an address in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// What the version says.
    pub state: EntryState,
    /// kst's version of the address (the store's `KeyRecord::version`; a deletion gets the
    /// next number).
    pub version: u64,
    /// Seconds since the Unix epoch of the change.
    pub changed_at: u64,
    /// The key's primary fingerprint and the SHA-256 of the key's binary packets as served
    /// (`None` for a deletion).
    pub key: Option<(Fingerprint, [u8; 32])>,
}

impl DirectoryEntry {
    /// The entry for a stored key record.
    pub fn for_record(record: &KeyRecord) -> Self {
        DirectoryEntry {
            state: if record.revoked {
                EntryState::Revoked
            } else {
                EntryState::Published
            },
            version: record.version,
            changed_at: record.published_at,
            key: Some((record.fingerprint.clone(), key_hash(&record.key))),
        }
    }

    /// The entry recording the deletion of an address at kst version `version`.
    pub fn deleted(version: u64, changed_at: u64) -> Self {
        DirectoryEntry {
            state: EntryState::Deleted,
            version,
            changed_at,
            key: None,
        }
    }

    /// Whether this entry commits to exactly `key` (the binary packets a reply serves).
    pub fn commits_to_key(&self, key: &[u8]) -> bool {
        matches!(&self.key, Some((_, hash)) if *hash == key_hash(key))
    }

    /// The canonical bytes akd commits to.
    pub fn to_value(&self) -> AkdValue {
        let mut out = Vec::with_capacity(MAGIC.len() + 17 + 1 + MAX_FINGERPRINT + 32);
        out.extend_from_slice(MAGIC);
        out.push(self.state as u8);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.changed_at.to_be_bytes());
        if let Some((fingerprint, hash)) = &self.key {
            let fp = fingerprint.as_str().as_bytes();
            // Fingerprints are at most 64 hex digits, so the length fits one byte.
            out.push(fp.len() as u8);
            out.extend_from_slice(fp);
            out.extend_from_slice(hash);
        }
        AkdValue(out)
    }

    /// Decodes the bytes of [`DirectoryEntry::to_value`]; rejects anything else.
    pub fn from_value(value: &AkdValue) -> Result<Self> {
        let bad = |what: &str| TransparencyError::Malformed(format!("directory entry: {what}"));
        let bytes = value.0.as_slice();
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| bad("unknown layout"))?;
        let (&state, rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
        let state = match state {
            1 => EntryState::Published,
            2 => EntryState::Revoked,
            3 => EntryState::Deleted,
            _ => return Err(bad("unknown state")),
        };
        let (version, rest) = take_u64(rest).ok_or_else(|| bad("truncated version"))?;
        let (changed_at, rest) = take_u64(rest).ok_or_else(|| bad("truncated time"))?;
        let key = if state == EntryState::Deleted {
            if !rest.is_empty() {
                return Err(bad("a deletion carries a key"));
            }
            None
        } else {
            let (&len, rest) = rest.split_first().ok_or_else(|| bad("no key"))?;
            let len = usize::from(len);
            if len > MAX_FINGERPRINT || rest.len() != len + 32 {
                return Err(bad("wrong key length"));
            }
            let fp = std::str::from_utf8(&rest[..len]).map_err(|_| bad("fingerprint not text"))?;
            let fingerprint = Fingerprint::parse(fp).map_err(|e| bad(&e.to_string()))?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&rest[len..]);
            Some((fingerprint, hash))
        };
        Ok(DirectoryEntry {
            state,
            version,
            changed_at,
            key,
        })
    }
}

/// SHA-256 of a key's binary packets, what an entry commits to.
pub fn key_hash(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn take_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*head), rest))
}
