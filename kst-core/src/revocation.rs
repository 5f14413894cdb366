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
//! User ID revocations (certification revocations, 0x30) are kept the same way, each with its
//! User ID packet, so an old copy certifying a User ID its owner revoked since is served with
//! that revocation. The User ID part is bounded ([`MAX_USER_IDS`], [`MAX_USER_ID_REVOCATIONS`],
//! [`MAX_USER_ID_BYTES`]); what is kept is never evicted, so only the first ones count.
//! [`merge_primary_revocations`] is the merge of primary-key revocations on OpenPGP packets.
//!
//! Only signatures from a certificate that passed [`crate::validate`] reach a tombstone, so
//! they were verified with that primary key when published.

use pgp::packet::{Packet, PacketParser, PacketTrait, SignatureType};
use pgp::ser::Serialize;

use crate::error::{Error, Result};
use crate::store::NewKey;

/// Most User IDs a tombstone keeps revocations of; the revocations of further User IDs are not
/// kept (only the primary key's holder can make them, so only the owner reaches this).
pub const MAX_USER_IDS: usize = 32;
/// Most revocations a tombstone keeps per User ID (one is enough to revoke it).
pub const MAX_USER_ID_REVOCATIONS: usize = 8;
/// Most bytes of User ID packets and their revocations a tombstone keeps.
pub const MAX_USER_ID_BYTES: usize = 64 << 10;

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

/// What a tombstone holds: the primary key's revocations and, per subkey or User ID, its
/// packet and its revocations. Stored as packets: the primary key's revocation signatures
/// first, then each subkey or User ID packet followed by its revocation signatures (a tombstone
/// written before subkey or User ID revocations were kept holds signatures only, or signatures
/// and subkeys, and reads the same way).
#[derive(Clone, Default, PartialEq)]
struct Tombstone {
    /// Key revocation signatures (0x20) of the primary key, serialized.
    primary: Vec<Vec<u8>>,
    /// Each revoked subkey or User ID (its packet, serialized) with its revocation signatures
    /// (0x28 for a subkey, 0x30 for a User ID).
    components: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

/// Whether serialized packet `bytes` is a User ID packet (tag 13, in either header format).
fn is_user_id(bytes: &[u8]) -> bool {
    match bytes.first() {
        Some(b) if b & 0x40 != 0 => b & 0x3f == 13,
        Some(b) => (b >> 2) & 0x0f == 13,
        None => false,
    }
}

impl Tombstone {
    /// Reads a stored tombstone.
    fn parse(bytes: &[u8]) -> Result<Self> {
        let mut t = Tombstone::default();
        for p in parse(bytes, "a tombstone")? {
            match &p {
                Packet::Signature(_) => {
                    let sig = serialized(&p)?;
                    match t.components.last_mut() {
                        Some((_, revs)) => revs.push(sig),
                        None => t.primary.push(sig),
                    }
                }
                Packet::PublicSubkey(_) | Packet::UserId(_) => {
                    t.components.push((serialized(&p)?, Vec::new()));
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "a tombstone holds a {:?} packet, not a signature, a subkey or a User ID",
                        other.tag()
                    )));
                }
            }
        }
        Ok(t)
    }

    /// The revocations `cert` (binary packets) carries: its primary key's when `revoked`, and
    /// every subkey and User ID revocation.
    fn of_cert(cert: &[u8], revoked: bool) -> Result<Self> {
        let mut t = Tombstone {
            primary: if revoked {
                signatures(&primary_revocations(cert)?)?
            } else {
                Vec::new()
            },
            components: Vec::new(),
        };
        // The component being read, its packet and revocations, and the revocation type it takes.
        let mut current: Option<(Vec<u8>, Vec<Vec<u8>>, SignatureType)> = None;
        for p in parse(cert, "a key")? {
            match &p {
                Packet::Signature(s) => {
                    if let Some((_, revs, typ)) = current.as_mut()
                        && s.typ() == Some(*typ)
                    {
                        revs.push(serialized(&p)?);
                    }
                }
                other => {
                    if let Some((packet, revs, _)) = current.take()
                        && !revs.is_empty()
                    {
                        t.components.push((packet, revs));
                    }
                    current = match other {
                        Packet::PublicSubkey(_) => {
                            Some((serialized(&p)?, Vec::new(), SignatureType::SubkeyRevocation))
                        }
                        Packet::UserId(_) => {
                            Some((serialized(&p)?, Vec::new(), SignatureType::CertRevocation))
                        }
                        _ => None,
                    };
                }
            }
        }
        if let Some((packet, revs, _)) = current
            && !revs.is_empty()
        {
            t.components.push((packet, revs));
        }
        Ok(t)
    }

    fn is_empty(&self) -> bool {
        self.primary.is_empty() && self.components.is_empty()
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.primary.concat();
        for (packet, revs) in &self.components {
            out.extend(packet);
            out.extend(revs.concat());
        }
        out
    }

    /// Bytes of the User ID part: User ID packets and their revocations.
    fn user_id_bytes(&self) -> usize {
        self.components
            .iter()
            .filter(|(packet, _)| is_user_id(packet))
            .map(|(packet, revs)| packet.len() + revs.iter().map(Vec::len).sum::<usize>())
            .sum()
    }

    /// Adds what `other` holds and `self` does not, within the User ID bounds (a User ID
    /// revocation over them is not kept; nothing kept is evicted); whether anything was added.
    fn absorb(&mut self, other: &Tombstone) -> bool {
        let mut grew = false;
        for sig in &other.primary {
            if !self.primary.contains(sig) {
                self.primary.push(sig.clone());
                grew = true;
            }
        }
        for (packet, revs) in &other.components {
            let uid = is_user_id(packet);
            let i = match self.components.iter().position(|(s, _)| s == packet) {
                Some(i) => i,
                None if uid
                    && (self
                        .components
                        .iter()
                        .filter(|(p, _)| is_user_id(p))
                        .count()
                        >= MAX_USER_IDS
                        || self.user_id_bytes() + packet.len() > MAX_USER_ID_BYTES) =>
                {
                    continue;
                }
                None => {
                    self.components.push((packet.clone(), Vec::new()));
                    self.components.len() - 1
                }
            };
            for sig in revs {
                if self.components[i].1.contains(sig) {
                    continue;
                }
                if uid
                    && (self.components[i].1.len() >= MAX_USER_ID_REVOCATIONS
                        || self.user_id_bytes() + sig.len() > MAX_USER_ID_BYTES)
                {
                    break;
                }
                self.components[i].1.push(sig.clone());
                grew = true;
            }
        }
        // A User ID added above whose every revocation was over the bounds is not kept.
        let before = self.components.len();
        self.components.retain(|(_, revs)| !revs.is_empty());
        grew || self.components.len() != before
    }

    /// `cert` with every revocation of the tombstone it does not hold: the primary key's
    /// after its own signatures, a subkey's or User ID's after that component's signatures (a
    /// revoked subkey or User ID the certificate does not carry is not added: there is nothing
    /// to serve revoked).
    fn apply_to(&self, cert: &[u8]) -> Result<Vec<u8>> {
        let cert = if self.primary.is_empty() {
            cert.to_vec()
        } else {
            merge_primary_revocations(cert, &self.primary.concat())?
        };
        if self.components.is_empty() {
            return Ok(cert);
        }
        let mut out = Vec::with_capacity(cert.len());
        // The stored revocations of the component being copied, and the signatures it has.
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
                if let Packet::PublicSubkey(_) | Packet::UserId(_) = p {
                    pending = self
                        .components
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
/// primary key's, which set `revoked`, each subkey's and each User ID's), and the tombstone to write back
/// when it changed (the union of the stored revocations and those `key` carries). Bytes that
/// are not a certificate (the conformance suite's synthetic keys) carry no revocation.
pub fn apply_tombstone(
    mut key: NewKey,
    stored: Option<&[u8]>,
) -> Result<(NewKey, Option<Vec<u8>>)> {
    let stored = stored.filter(|t| !t.is_empty());
    let carried = Tombstone::of_cert(&key.key, key.revoked).unwrap_or_default();
    let Some(stored) = stored else {
        let mut tombstone = Tombstone::default();
        tombstone.absorb(&carried);
        return Ok((key, (!tombstone.is_empty()).then(|| tombstone.to_bytes())));
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

    const UID_V1: &str = include_str!("../testdata/keys/uidrev-v1.pub.asc");
    const UID_RECERT: &str = include_str!("../testdata/keys/uidrev-recert.pub.asc");

    /// Whether alice's User ID of `cert` is revoked (the HKP index's rule).
    fn alice_revoked(cert: &[u8]) -> bool {
        let index = crate::certificate::Certificate::from_binary(cert)
            .unwrap()
            .hkp_index_entry(0);
        let line = index
            .lines()
            .find(|l| l.starts_with("uid:alice <alice@example.net>:"))
            .unwrap();
        line.ends_with(":r")
    }

    #[test]
    fn user_id_revocations_are_kept_and_applied_to_an_old_copy() {
        let (k, t) = apply_tombstone(new_key(bin(UID_RECERT), false), None).unwrap();
        let tomb = t.expect("a User ID revocation leaves a tombstone");
        assert!(
            !alice_revoked(&k.key),
            "certified again after the revocation"
        );
        let parsed = Tombstone::parse(&tomb).unwrap();
        assert!(parsed.primary.is_empty());
        assert_eq!(parsed.components.len(), 1);
        assert!(is_user_id(&parsed.components[0].0));
        assert_eq!(parsed.to_bytes(), tomb);
        assert!(!alice_revoked(&bin(UID_V1)));
        let (k, t) = apply_tombstone(new_key(bin(UID_V1), false), Some(&tomb)).unwrap();
        assert!(!k.revoked, "a User ID revocation does not revoke the key");
        assert!(
            alice_revoked(&k.key),
            "the old copy is served with its User ID revoked"
        );
        assert_eq!(t, None, "nothing new to remember");
        let (served, revoked) = serve_with_tombstone(&bin(UID_V1), &tomb).unwrap();
        assert_eq!((served, revoked), (k.key.clone(), false));
        // applying it again changes nothing, and the result is still a key kst accepts
        assert_eq!(
            Tombstone::parse(&tomb).unwrap().apply_to(&k.key).unwrap(),
            k.key
        );
        // the served old copy's only User ID of the account is revoked, as a client sees it
        let refused = crate::validate::validate(
            &crate::openpgp::armor_public_key(&k.key),
            &crate::AddressPolicy::default()
                .normalize("alice@example.net")
                .unwrap(),
            &crate::validate::KeyPolicy::default(),
            std::time::SystemTime::now(),
        );
        assert!(
            matches!(
                refused,
                Err(crate::validate::KeyRejection::UserIdRevoked { .. })
            ),
            "{:?}",
            refused.map(|v| v.user_id)
        );
    }

    #[test]
    fn tombstones_of_every_earlier_format_read_the_same() {
        // signatures only (primary revocations), then with a subkey: as written before
        let revs = primary_revocations(&bin(REVOKED)).unwrap();
        let t = Tombstone::parse(&revs).unwrap();
        assert_eq!((t.primary.len(), t.components.len()), (1, 0));
        assert_eq!(t.to_bytes(), revs);
        let (_, uid_tomb) = apply_tombstone(new_key(bin(UID_RECERT), false), None).unwrap();
        let mut both = revs.clone();
        both.extend(uid_tomb.unwrap());
        let t = Tombstone::parse(&both).unwrap();
        assert_eq!((t.primary.len(), t.components.len()), (1, 1));
        assert_eq!(t.to_bytes(), both);
    }

    /// A fake User ID packet (new-format header, tag 13) of `len` bytes of body.
    fn fake_uid(n: usize, len: usize) -> Vec<u8> {
        let mut body = format!("u{n} <u{n}@example.net>").into_bytes();
        body.resize(len.max(body.len()), b'x');
        let mut out = vec![0xCD, 0xFF];
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn the_user_id_part_is_bounded_and_never_evicted() {
        assert!(is_user_id(&fake_uid(1, 10)));
        assert!(is_user_id(&[0xB4, 1, b'a']), "old-format header");
        assert!(!is_user_id(&[0xCE, 1, 0]), "a subkey packet (tag 14)");
        let many = Tombstone {
            primary: Vec::new(),
            components: (0..MAX_USER_IDS + 10)
                .map(|n| {
                    let revs = (0..MAX_USER_ID_REVOCATIONS + 5)
                        .map(|r| vec![0xC2, 2, n as u8, r as u8])
                        .collect();
                    (fake_uid(n, 10), revs)
                })
                .collect(),
        };
        let mut t = Tombstone::default();
        assert!(t.absorb(&many));
        assert_eq!(t.components.len(), MAX_USER_IDS);
        assert!(
            t.components
                .iter()
                .all(|(_, r)| r.len() == MAX_USER_ID_REVOCATIONS)
        );
        assert_eq!(t.components[0].0, fake_uid(0, 10), "the first ones stay");
        assert!(!t.absorb(&many), "full: nothing more is kept");
        // bytes: one huge User ID is not kept, a small one after it is
        let huge = Tombstone {
            primary: Vec::new(),
            components: vec![
                (fake_uid(1, MAX_USER_ID_BYTES), vec![vec![0xC2, 1, 1]]),
                (fake_uid(2, 10), vec![vec![0xC2, 1, 2]]),
            ],
        };
        let mut t = Tombstone::default();
        assert!(t.absorb(&huge));
        assert_eq!(t.components.len(), 1);
        assert_eq!(t.components[0].0, fake_uid(2, 10));
        assert!(t.user_id_bytes() <= MAX_USER_ID_BYTES);
        // subkeys are not subject to the User ID bounds
        let subkeys = Tombstone {
            primary: Vec::new(),
            components: (0..MAX_USER_IDS + 1)
                .map(|n| (vec![0xCE, 1, n as u8], vec![vec![0xC2, 1, n as u8]]))
                .collect(),
        };
        assert!(t.absorb(&subkeys));
        assert_eq!(t.components.len(), MAX_USER_IDS + 2);
    }
}
