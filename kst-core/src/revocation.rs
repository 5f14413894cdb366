//! Revocations of a primary key that no later publication or deletion can take back (tombstones).
//!
//! A store keeps, per primary-key fingerprint, the key revocation signatures (0x20) it has ever
//! been given (the *tombstone*), across republication and deletion. Inside its atomic publish
//! step a backend calls [`apply_tombstone`] with the stored tombstone of the key's fingerprint:
//! the key to store gets every stored revocation merged in, and the backend writes back the
//! tombstone it returns. So a revoked key published again without its revocation (an old
//! device, a redelivery deferred across an outage, a stolen password) is served revoked, and
//! so is one published again after a deletion. [`merge_primary_revocations`] is the merge on
//! OpenPGP packets, for the key lifecycle (issue 15) to build a full merge on.
//!
//! Only signatures from a certificate that passed [`crate::validate`] reach a tombstone, so
//! they were verified with that primary key when published.

use pgp::packet::{Packet, PacketParser, PacketTrait, SignatureType};
use pgp::ser::Serialize;

use crate::error::{Error, Result};
use crate::store::NewKey;

/// One certificate's packets as serialized bytes: the primary key's own signatures split out.
struct Split {
    /// The primary key packet.
    primary: Vec<u8>,
    /// Each signature right after the primary key (direct-key signatures and key revocations),
    /// with whether it is a key revocation.
    direct: Vec<(bool, Vec<u8>)>,
    /// Everything after them (User IDs, subkeys and their signatures).
    rest: Vec<u8>,
}

/// `p` with its header (the `Packet` enum writes its own header, as it was read).
fn serialized(p: &Packet) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    p.to_writer(&mut out)
        .map_err(|e| Error::Invalid(format!("re-serializing an OpenPGP packet: {e}")))?;
    Ok(out)
}

/// Every packet of `bytes` (read as [`crate::validate`] reads them: packet by packet).
fn parse(bytes: &[u8], what: &str) -> Result<Vec<Packet>> {
    let mut parser = PacketParser::new(bytes);
    let mut out = Vec::new();
    while let Some(body) = parser.next_ref() {
        let body = body.map_err(|e| Error::Invalid(format!("{what} is unreadable: {e}")))?;
        let header = body.packet_header();
        out.push(
            Packet::from_reader(header, body)
                .map_err(|e| Error::Invalid(format!("{what} is unreadable: {e}")))?,
        );
    }
    Ok(out)
}

fn split(cert: &[u8]) -> Result<Split> {
    let mut packets = parse(cert, "a stored key")?.into_iter();
    let primary = match packets.next() {
        Some(p @ Packet::PublicKey(_)) => serialized(&p)?,
        _ => {
            return Err(Error::Invalid(
                "a stored key does not start with a public key packet".into(),
            ));
        }
    };
    let mut direct = Vec::new();
    let mut rest = Vec::new();
    let mut in_direct = true;
    for p in packets {
        match &p {
            Packet::Signature(s) if in_direct => {
                direct.push((
                    s.typ() == Some(SignatureType::KeyRevocation),
                    serialized(&p)?,
                ));
            }
            _ => {
                in_direct = false;
                rest.extend(serialized(&p)?);
            }
        }
    }
    Ok(Split {
        primary,
        direct,
        rest,
    })
}

/// Each packet of a run of serialized signature packets, as bytes.
fn signatures(run: &[u8]) -> Result<Vec<Vec<u8>>> {
    parse(run, "a tombstone")?
        .iter()
        .map(|p| match p {
            Packet::Signature(_) => serialized(p),
            other => Err(Error::Invalid(format!(
                "a tombstone holds a {:?} packet, not a signature",
                other.tag()
            ))),
        })
        .collect()
}

/// The key revocation signatures (0x20) on the primary key of `cert` (binary packets), as
/// concatenated signature packets; empty when there are none.
pub fn primary_revocations(cert: &[u8]) -> Result<Vec<u8>> {
    Ok(split(cert)?
        .direct
        .into_iter()
        .filter(|(revocation, _)| *revocation)
        .flat_map(|(_, bytes)| bytes)
        .collect())
}

/// `cert` (binary packets) with every signature of `revocations` (concatenated signature
/// packets, as [`primary_revocations`] returns) that it does not already hold added after its
/// primary key's own signatures. The caller vouches that `revocations` belong to the same
/// primary key (same fingerprint). Applying it twice changes nothing.
pub fn merge_primary_revocations(cert: &[u8], revocations: &[u8]) -> Result<Vec<u8>> {
    let Split {
        primary,
        mut direct,
        rest,
    } = split(cert)?;
    for sig in signatures(revocations)? {
        if !direct.iter().any(|(_, have)| *have == sig) {
            direct.push((true, sig));
        }
    }
    let mut out = primary;
    for (_, sig) in direct {
        out.extend(sig);
    }
    out.extend(rest);
    Ok(out)
}

/// What a backend stores, inside its atomic publish step, for `key` given the tombstone
/// (`stored`) of `key.fingerprint`: the key with every stored revocation merged in (and
/// `revoked` set when there is one), and the tombstone to write back when it changed (the union
/// of the stored revocations and those `key` carries). A key that is not revoked and has no
/// tombstone is returned as it is, without being parsed.
pub fn apply_tombstone(
    mut key: NewKey,
    stored: Option<&[u8]>,
) -> Result<(NewKey, Option<Vec<u8>>)> {
    let stored = stored.filter(|t| !t.is_empty());
    let carried = if key.revoked {
        primary_revocations(&key.key).unwrap_or_default()
    } else {
        Vec::new()
    };
    let Some(stored) = stored else {
        return Ok((key, (!carried.is_empty()).then_some(carried)));
    };
    key.key = merge_primary_revocations(&key.key, stored)?;
    key.revoked = true;
    let tombstone = merge_revocation_runs(stored, &carried)?;
    let changed = tombstone != stored;
    Ok((key, changed.then_some(tombstone)))
}

/// `stored` followed by each signature of `more` that it does not hold.
fn merge_revocation_runs(stored: &[u8], more: &[u8]) -> Result<Vec<u8>> {
    let have = signatures(stored)?;
    let mut out = stored.to_vec();
    for sig in signatures(more)? {
        if !have.contains(&sig) {
            out.extend(sig);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = include_str!("../testdata/keys/lifecycle-v1.pub.asc");
    const REVOKED: &str = include_str!("../testdata/keys/lifecycle-revoked.pub.asc");

    /// The fixture as kst stores it: validated (`KeyStore` only ever gets validated keys).
    fn bin(armored: &str) -> Vec<u8> {
        crate::validate::validate(
            armored,
            &crate::AddressPolicy::default()
                .normalize("alice@example.net")
                .unwrap(),
            &crate::validate::KeyPolicy::default(),
            std::time::SystemTime::now(),
        )
        .unwrap()
        .packets
    }

    fn new_key(key: Vec<u8>, revoked: bool) -> NewKey {
        NewKey {
            address: crate::AddressPolicy::default()
                .normalize("alice@example.net")
                .unwrap(),
            key,
            fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
            publication_id: "aa".into(),
            published_at: 1,
            revoked,
            expected: crate::store::Expected::Any,
        }
    }

    #[test]
    fn revocations_of_a_revoked_key_are_merged_into_an_unrevoked_copy() {
        let revs = primary_revocations(&bin(REVOKED)).unwrap();
        assert!(!revs.is_empty());
        assert!(primary_revocations(&bin(V1)).unwrap().is_empty());
        let merged = merge_primary_revocations(&bin(V1), &revs).unwrap();
        assert_eq!(primary_revocations(&merged).unwrap(), revs);
        assert_eq!(merge_primary_revocations(&merged, &revs).unwrap(), merged);
        // the result is still a key kst accepts, now revoked, with v1's content
        let v = crate::validate::validate(
            &crate::openpgp::armor_public_key(&merged),
            &crate::AddressPolicy::default()
                .normalize("alice@example.net")
                .unwrap(),
            &crate::validate::KeyPolicy::default(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        assert!(v.revoked);
        assert_eq!(v.packets, merged);
    }

    #[test]
    fn tombstones_are_written_for_revoked_keys_and_applied_to_later_ones() {
        let (k, t) = apply_tombstone(new_key(bin(V1), false), None).unwrap();
        assert_eq!((k.key, t), (bin(V1), None));
        let (k, t) = apply_tombstone(new_key(bin(REVOKED), true), None).unwrap();
        let tomb = t.expect("a revoked key leaves a tombstone");
        assert_eq!(k.key, bin(REVOKED));
        let (k, t) = apply_tombstone(new_key(bin(V1), false), Some(&tomb)).unwrap();
        assert!(k.revoked);
        assert_eq!(primary_revocations(&k.key).unwrap(), tomb);
        assert_eq!(t, None, "nothing new to remember");
        // arbitrary bytes marked revoked (the conformance suite's fake keys) leave no tombstone
        let (k, t) = apply_tombstone(new_key(vec![0x99; 10], true), None).unwrap();
        assert_eq!((k.key, t), (vec![0x99; 10], None));
        assert!(apply_tombstone(new_key(vec![0x99; 10], false), Some(&tomb)).is_err());
    }
}
