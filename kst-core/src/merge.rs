//! Merging two publications of one primary key into the certificate kst stores (issue 15).
//!
//! A stored key used to be replaced whole by every publication, so an older copy (a second
//! device, a restored backup, a redelivery) dropped a newer subkey or an extended expiry. Now a
//! publication of the same primary key is merged into the stored certificate:
//!
//! - the union of the subkeys and of the User IDs;
//! - per component (the primary key's direct signatures, each User ID, each subkey) the newest
//!   self-signature that is not a revocation, ties between equal creation times broken by the
//!   signature's bytes (the greater wins), and every revocation;
//! - nothing is verified again: both inputs passed [`crate::validate`] when they were received,
//!   and what was valid then is kept. Expiry is not applied here: a subkey that has expired
//!   since stays until the size budget needs its room ([`fit_budget`]); clients judge expiry
//!   when they use the key.
//!
//! The output is canonical (components and signatures in a fixed order that depends only on
//! their content), so [`merge`] is commutative, associative and idempotent, and a key published
//! again unchanged merges into the same bytes. [`fit_budget`] then applies
//! `limits.max_published_key_bytes` to the merged result: expired and superseded subkeys are
//! dropped, oldest first; a revoked subkey (and so every revocation) is never dropped.

use std::collections::{BTreeMap, BTreeSet};

use pgp::packet::{Packet, PacketParser, PacketTrait, Signature, SignatureType};
use pgp::ser::Serialize;
use pgp::types::KeyDetails;

/// Why two certificates could not be merged, or a merged one does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// The certificates have different primary keys: the caller replaces instead of merging.
    #[error("the certificates have different primary keys")]
    DifferentPrimary,
    /// One input is not a certificate as kst stores it.
    #[error("a certificate to merge is unreadable: {0}")]
    Unreadable(String),
    /// The merged certificate exceeds the size budget even without every subkey that may go.
    #[error(
        "merged with the key already published it would be {size} bytes, over the limit of \
         {limit}; revoke or remove old subkeys and publish again"
    )]
    TooLarge {
        /// Size of the smallest certificate the budget allows to build, in bytes.
        size: usize,
        /// `limits.max_published_key_bytes`.
        limit: usize,
    },
}

/// The signatures of one component, as serialized packets.
#[derive(Default, Clone)]
struct Sigs {
    /// Revocations (key, certification or subkey revocation): all kept.
    revocations: BTreeSet<Vec<u8>>,
    /// The newest other signature: (creation time, bytes).
    newest: Option<(u32, Vec<u8>)>,
    /// Its key expiration in seconds after the key's creation (0: none) and key flags, when it
    /// is a subkey binding (for the budget).
    binding: Option<(u32, Vec<u8>)>,
}

impl Sigs {
    fn add(&mut self, sig: &Signature, bytes: Vec<u8>) {
        let revocation = matches!(
            sig.typ(),
            Some(
                SignatureType::KeyRevocation
                    | SignatureType::CertRevocation
                    | SignatureType::SubkeyRevocation
            )
        );
        if revocation {
            self.revocations.insert(bytes);
            return;
        }
        let created = sig.created().map_or(0, |t| t.as_secs());
        let newer = match &self.newest {
            None => true,
            Some((c, b)) => (created, &bytes) > (*c, b),
        };
        if newer {
            self.binding = Some((
                sig.key_expiration_time().map_or(0, |d| d.as_secs()),
                sig.key_flags().to_bytes().unwrap_or_default(),
            ));
            self.newest = Some((created, bytes));
        }
    }

    fn union(&mut self, other: &Sigs) {
        self.revocations.extend(other.revocations.iter().cloned());
        if let Some((c, b)) = &other.newest
            && self
                .newest
                .as_ref()
                .is_none_or(|(mc, mb)| (*c, b) > (*mc, mb))
        {
            self.newest = other.newest.clone();
            self.binding = other.binding.clone();
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        if let Some((_, b)) = &self.newest {
            out.extend(b);
        }
        for r in &self.revocations {
            out.extend(r);
        }
    }

    fn len(&self) -> usize {
        self.newest.as_ref().map_or(0, |(_, b)| b.len())
            + self.revocations.iter().map(Vec::len).sum::<usize>()
    }
}

/// A subkey: its creation time (first in the sort key, so output is oldest first).
#[derive(Clone)]
struct Subkey {
    created: u32,
    sigs: Sigs,
}

/// A certificate as kst stores it, split into canonical parts.
#[derive(Clone)]
struct Parts {
    primary: Vec<u8>,
    direct: Sigs,
    /// User IDs and user attributes by packet bytes.
    uids: BTreeMap<Vec<u8>, Sigs>,
    /// Subkeys by (creation time, packet bytes).
    subkeys: BTreeMap<(u32, Vec<u8>), Subkey>,
}

fn serialized(p: &Packet) -> Result<Vec<u8>, MergeError> {
    let mut out = Vec::new();
    p.to_writer(&mut out)
        .map_err(|e| MergeError::Unreadable(format!("re-serializing a packet: {e}")))?;
    Ok(out)
}

enum Slot {
    Direct,
    Uid(Vec<u8>),
    Subkey((u32, Vec<u8>)),
}

fn split(cert: &[u8]) -> Result<Parts, MergeError> {
    let mut parser = PacketParser::new(cert);
    let mut primary = None;
    let mut parts = Parts {
        primary: Vec::new(),
        direct: Sigs::default(),
        uids: BTreeMap::new(),
        subkeys: BTreeMap::new(),
    };
    let mut slot = Slot::Direct;
    while let Some(body) = parser.next_ref() {
        let body = body.map_err(|e| MergeError::Unreadable(e.to_string()))?;
        let header = body.packet_header();
        let packet =
            Packet::from_reader(header, body).map_err(|e| MergeError::Unreadable(e.to_string()))?;
        let bytes = serialized(&packet)?;
        match &packet {
            Packet::PublicKey(k) if primary.is_none() => {
                primary = Some(k.fingerprint());
                parts.primary = bytes;
            }
            _ if primary.is_none() => {
                return Err(MergeError::Unreadable(
                    "it does not start with a public key packet".into(),
                ));
            }
            Packet::Signature(sig) => match &slot {
                Slot::Direct => parts.direct.add(sig, bytes),
                Slot::Uid(u) => parts.uids.entry(u.clone()).or_default().add(sig, bytes),
                Slot::Subkey(k) => {
                    if let Some(s) = parts.subkeys.get_mut(k) {
                        s.sigs.add(sig, bytes);
                    }
                }
            },
            Packet::UserId(_) | Packet::UserAttribute(_) => {
                parts.uids.entry(bytes.clone()).or_default();
                slot = Slot::Uid(bytes);
            }
            Packet::PublicSubkey(k) => {
                let id = (k.created_at().as_secs(), bytes);
                parts.subkeys.entry(id.clone()).or_insert(Subkey {
                    created: id.0,
                    sigs: Sigs::default(),
                });
                slot = Slot::Subkey(id);
            }
            Packet::PublicKey(_) => {
                return Err(MergeError::Unreadable(
                    "it holds more than one certificate".into(),
                ));
            }
            other => {
                return Err(MergeError::Unreadable(format!(
                    "a {:?} packet does not belong in a stored certificate",
                    other.tag()
                )));
            }
        }
    }
    if primary.is_none() {
        return Err(MergeError::Unreadable("it holds no public key".into()));
    }
    Ok(parts)
}

impl Parts {
    fn union(&mut self, other: &Parts) {
        self.direct.union(&other.direct);
        for (u, s) in &other.uids {
            self.uids.entry(u.clone()).or_default().union(s);
        }
        for (k, s) in &other.subkeys {
            match self.subkeys.get_mut(k) {
                Some(mine) => mine.sigs.union(&s.sigs),
                None => {
                    self.subkeys.insert(k.clone(), s.clone());
                }
            }
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.primary.clone();
        self.direct.write(&mut out);
        for (u, s) in &self.uids {
            out.extend(u);
            s.write(&mut out);
        }
        for ((_, k), s) in &self.subkeys {
            out.extend(k);
            s.sigs.write(&mut out);
        }
        out
    }
}

/// The merge of two certificates of the same primary key (binary packets, each one a key that
/// passed [`crate::validate`]), canonical: see the module documentation. Commutative and
/// idempotent: `merge(a, b) == merge(b, a)` and `merge(merge(a, b), b) == merge(a, b)`.
pub fn merge(a: &[u8], b: &[u8]) -> Result<Vec<u8>, MergeError> {
    let mut pa = split(a)?;
    let pb = split(b)?;
    if pa.primary != pb.primary {
        // The same key material may come with differently encoded headers; compare what the
        // fingerprint covers before refusing.
        let fa = primary_fingerprint(&pa.primary);
        if fa.is_none() || fa != primary_fingerprint(&pb.primary) {
            return Err(MergeError::DifferentPrimary);
        }
        pa.primary = pa.primary.clone().min(pb.primary.clone());
    }
    pa.union(&pb);
    Ok(pa.to_bytes())
}

/// `cert` in canonical form (the merge of it with itself): what kst stores for a first
/// publication, so that publishing the same key again leaves the store unchanged.
pub fn canonical(cert: &[u8]) -> Result<Vec<u8>, MergeError> {
    Ok(split(cert)?.to_bytes())
}

/// True when `cert` carries a revocation of its primary key.
pub fn is_revoked(cert: &[u8]) -> Result<bool, MergeError> {
    Ok(!split(cert)?.direct.revocations.is_empty())
}

fn primary_fingerprint(packet: &[u8]) -> Option<String> {
    let mut parser = PacketParser::new(packet);
    let body = parser.next_ref()?.ok()?;
    let header = body.packet_header();
    match Packet::from_reader(header, body).ok()? {
        Packet::PublicKey(k) => Some(format!("{:X}", k.fingerprint())),
        _ => None,
    }
}

/// `cert` (canonical, as [`merge`] returns it) within `limit` bytes: when it is larger, the
/// subkeys that may go are dropped one by one, oldest first, until it fits. A subkey may go
/// when it is expired at `now` (seconds since the Unix epoch), superseded (a newer subkey
/// with the same key flags that is neither revoked nor expired exists), or unrevoked on a
/// revoked primary key (nobody may use it any more); a revoked subkey never goes, so no
/// revocation is ever dropped. [`MergeError::TooLarge`] when it still does not fit.
pub fn fit_budget(cert: &[u8], limit: usize, now: u64) -> Result<Vec<u8>, MergeError> {
    if cert.len() <= limit {
        return Ok(cert.to_vec());
    }
    let mut parts = split(cert)?;
    let live = |s: &Subkey| {
        let (exp, _) = s.sigs.binding.clone().unwrap_or_default();
        s.sigs.revocations.is_empty() && (exp == 0 || u64::from(s.created) + u64::from(exp) > now)
    };
    let expired = |s: &Subkey| {
        let (exp, _) = s.sigs.binding.clone().unwrap_or_default();
        exp != 0 && u64::from(s.created) + u64::from(exp) <= now
    };
    let primary_revoked = !parts.direct.revocations.is_empty();
    // Candidates, oldest first (the map's order).
    let candidates: Vec<(u32, Vec<u8>)> = parts
        .subkeys
        .iter()
        .filter(|(_, s)| s.sigs.revocations.is_empty())
        .filter(|(key, s)| {
            let flags = s.sigs.binding.as_ref().map(|(_, f)| f.clone());
            primary_revoked
                || expired(s)
                || parts.subkeys.iter().any(|(other, o)| {
                    other > key
                        && live(o)
                        && o.sigs.binding.as_ref().map(|(_, f)| f) == flags.as_ref()
                })
        })
        .map(|(k, _)| k.clone())
        .collect();
    let mut size = cert.len();
    for key in candidates {
        if size <= limit {
            break;
        }
        if let Some(s) = parts.subkeys.remove(&key) {
            size -= key.1.len() + s.sigs.len();
        }
    }
    let out = parts.to_bytes();
    if out.len() > limit {
        return Err(MergeError::TooLarge {
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
