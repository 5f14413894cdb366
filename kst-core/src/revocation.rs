//! Revocations of a primary key that no later publication or deletion can take back (tombstones).
//!
//! A store keeps, per primary-key fingerprint, the key revocation signatures (0x20) it has ever
//! been given (the *tombstone*), across republication and deletion. Inside its atomic publish
//! step a backend calls [`apply_tombstone`] with the stored tombstone of the key's fingerprint:
//! the key to store gets every stored revocation merged in, and the backend writes back the
//! tombstone it returns. So a revoked key published again without its revocation (an old
//! device, a redelivery deferred across an outage, a stolen password) is served revoked, and
//! so is one published again after a deletion. Subkey revocations (0x28) are kept the same way,
//! each with its subkey packet: an old copy of the key from before a subkey was revoked is
//! served with that subkey revoked, also after the key was replaced by another one or deleted.
//! [`merge_primary_revocations`] is the merge of primary-key revocations on OpenPGP packets.
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

/// What a tombstone holds: the primary key's revocations and, per subkey, the subkey packet
/// and its revocations. Stored as packets: the primary key's revocation signatures first, then
/// each subkey packet followed by its revocation signatures (a tombstone written before subkey
/// revocations were kept holds signatures only, and reads the same way).
#[derive(Clone, Default, PartialEq)]
struct Tombstone {
    /// Key revocation signatures (0x20) of the primary key, serialized.
    primary: Vec<Vec<u8>>,
    /// Each revoked subkey (its packet, serialized) with its revocation signatures (0x28).
    subkeys: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

impl Tombstone {
    /// Reads a stored tombstone.
    fn parse(bytes: &[u8]) -> Result<Self> {
        let mut t = Tombstone::default();
        for p in parse(bytes, "a tombstone")? {
            match &p {
                Packet::Signature(_) => {
                    let sig = serialized(&p)?;
                    match t.subkeys.last_mut() {
                        Some((_, revs)) => revs.push(sig),
                        None => t.primary.push(sig),
                    }
                }
                Packet::PublicSubkey(_) => t.subkeys.push((serialized(&p)?, Vec::new())),
                other => {
                    return Err(Error::Invalid(format!(
                        "a tombstone holds a {:?} packet, not a signature or a subkey",
                        other.tag()
                    )));
                }
            }
        }
        Ok(t)
    }

    /// The revocations `cert` (binary packets) carries: its primary key's when `revoked`, and
    /// every subkey revocation.
    fn of_cert(cert: &[u8], revoked: bool) -> Result<Self> {
        let mut t = Tombstone {
            primary: if revoked {
                signatures(&primary_revocations(cert)?)?
            } else {
                Vec::new()
            },
            subkeys: Vec::new(),
        };
        let mut current: Option<(Vec<u8>, Vec<Vec<u8>>)> = None;
        for p in parse(cert, "a key")? {
            match &p {
                Packet::Signature(s) => {
                    if let Some((_, revs)) = current.as_mut()
                        && s.typ() == Some(SignatureType::SubkeyRevocation)
                    {
                        revs.push(serialized(&p)?);
                    }
                }
                other => {
                    if let Some(done) = current.take().filter(|(_, revs)| !revs.is_empty()) {
                        t.subkeys.push(done);
                    }
                    if let Packet::PublicSubkey(_) = other {
                        current = Some((serialized(&p)?, Vec::new()));
                    }
                }
            }
        }
        if let Some(done) = current.filter(|(_, revs)| !revs.is_empty()) {
            t.subkeys.push(done);
        }
        Ok(t)
    }

    fn is_empty(&self) -> bool {
        self.primary.is_empty() && self.subkeys.is_empty()
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.primary.concat();
        for (subkey, revs) in &self.subkeys {
            out.extend(subkey);
            out.extend(revs.concat());
        }
        out
    }

    /// Adds what `other` holds and `self` does not; whether anything was added.
    fn absorb(&mut self, other: &Tombstone) -> bool {
        let mut grew = false;
        for sig in &other.primary {
            if !self.primary.contains(sig) {
                self.primary.push(sig.clone());
                grew = true;
            }
        }
        for (subkey, revs) in &other.subkeys {
            let i = match self.subkeys.iter().position(|(s, _)| s == subkey) {
                Some(i) => i,
                None => {
                    self.subkeys.push((subkey.clone(), Vec::new()));
                    self.subkeys.len() - 1
                }
            };
            for sig in revs {
                if !self.subkeys[i].1.contains(sig) {
                    self.subkeys[i].1.push(sig.clone());
                    grew = true;
                }
            }
        }
        grew
    }

    /// `cert` with every revocation of the tombstone it does not hold: the primary key's
    /// after its own signatures, a subkey's after that subkey's signatures (a revoked subkey
    /// the certificate does not carry is not added: there is nothing to serve revoked).
    fn apply_to(&self, cert: &[u8]) -> Result<Vec<u8>> {
        let cert = if self.primary.is_empty() {
            cert.to_vec()
        } else {
            merge_primary_revocations(cert, &self.primary.concat())?
        };
        if self.subkeys.is_empty() {
            return Ok(cert);
        }
        let mut out = Vec::with_capacity(cert.len());
        // The stored revocations of the subkey being copied, and the signatures it has.
        let mut pending: Option<&Vec<Vec<u8>>> = None;
        let mut have: Vec<Vec<u8>> = Vec::new();
        let flush = |out: &mut Vec<u8>, pending: Option<&Vec<Vec<u8>>>, have: &[Vec<u8>]| {
            for sig in pending.into_iter().flatten() {
                if !have.contains(sig) {
                    out.extend(sig);
                }
            }
        };
        for p in parse(&cert, "a stored key")? {
            let bytes = serialized(&p)?;
            if let Packet::Signature(_) = p {
                if pending.is_some() {
                    have.push(bytes.clone());
                }
            } else {
                flush(&mut out, pending.take(), &have);
                have.clear();
                if let Packet::PublicSubkey(_) = p {
                    pending = self
                        .subkeys
                        .iter()
                        .find(|(s, _)| *s == bytes)
                        .map(|(_, revs)| revs);
                }
            }
            out.extend(bytes);
        }
        flush(&mut out, pending, &have);
        Ok(out)
    }
}

/// What a backend stores, inside its atomic publish step, for `key` given the tombstone
/// (`stored`) of `key.fingerprint`: the key with every stored revocation merged in (the
/// primary key's, which set `revoked`, and each subkey's), and the tombstone to write back
/// when it changed (the union of the stored revocations and those `key` carries). Bytes that
/// are not a certificate (the conformance suite's synthetic keys) carry no revocation.
pub fn apply_tombstone(
    mut key: NewKey,
    stored: Option<&[u8]>,
) -> Result<(NewKey, Option<Vec<u8>>)> {
    let stored = stored.filter(|t| !t.is_empty());
    let carried = Tombstone::of_cert(&key.key, key.revoked).unwrap_or_default();
    let Some(stored) = stored else {
        return Ok((key, (!carried.is_empty()).then(|| carried.to_bytes())));
    };
    let mut tombstone = Tombstone::parse(stored)?;
    key.key = tombstone.apply_to(&key.key)?;
    key.revoked |= !tombstone.primary.is_empty();
    let grew = tombstone.absorb(&carried);
    Ok((key, grew.then(|| tombstone.to_bytes())))
}

/// `cert` (binary packets, a stored key) as it is served given the stored tombstone of its
/// fingerprint: with every stored revocation merged in, and whether the tombstone revokes
/// the primary key. For a backend that applies the tombstone again when reading.
pub fn serve_with_tombstone(cert: &[u8], tombstone: &[u8]) -> Result<(Vec<u8>, bool)> {
    let tombstone = Tombstone::parse(tombstone)?;
    Ok((tombstone.apply_to(cert)?, !tombstone.primary.is_empty()))
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
