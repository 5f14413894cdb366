//! What is kept: the published certificate, re-serialized in order, with each kept signature's
//! unhashed area cleaned.

use pgp::packet::{PacketTrait, Signature, SubpacketData};
use pgp::types::{Fingerprint, KeyDetails, KeyId};

use super::KeyRejection;
use super::packets::Collected;

/// What the steps decided to keep, as indexes into [`Collected`].
pub(super) struct Kept {
    /// The primary key's kept signatures.
    pub(super) direct: Vec<usize>,
    /// The kept User IDs, each with its kept signatures: the chosen one first, then the
    /// account's revoked ones in the order of the block.
    pub(super) uids: Vec<(usize, Vec<usize>)>,
    /// The kept subkeys, each with its kept signatures.
    pub(super) subkeys: Vec<(usize, Vec<usize>)>,
}

/// Serializes the primary key, the kept User IDs and the kept subkeys with their kept
/// signatures; the count of removed unhashed subpackets goes to `c.dropped`.
pub(super) fn assemble(c: &mut Collected, kept: Kept) -> Result<Vec<u8>, KeyRejection> {
    let dropped = &mut c.dropped;
    let issuer = (c.primary.legacy_key_id(), c.primary.fingerprint());
    let clean = |sig: &mut Signature| clean_unhashed(sig, &issuer);
    let mut out = Vec::new();
    let ser = |r: pgp::errors::Result<()>| {
        r.map_err(|e| KeyRejection::Malformed(format!("re-serializing: {e}")))
    };
    ser(c.primary.to_writer_with_header(&mut out))?;
    for i in kept.direct {
        let sig = &mut c.direct[i];
        dropped.unhashed_subpackets += clean(sig);
        ser(sig.to_writer_with_header(&mut out))?;
    }
    for (ui, keep) in kept.uids {
        let uid = &mut c.uids[ui];
        ser(uid.packet.to_writer_with_header(&mut out))?;
        for i in keep {
            let sig = &mut uid.sigs[i];
            dropped.unhashed_subpackets += clean(sig);
            ser(sig.to_writer_with_header(&mut out))?;
        }
    }
    for (si, keep) in kept.subkeys {
        let sub = &mut c.subkeys[si];
        ser(sub.packet.to_writer_with_header(&mut out))?;
        for i in keep {
            let sig = &mut sub.sigs[i];
            dropped.unhashed_subpackets += clean(sig);
            ser(sig.to_writer_with_header(&mut out))?;
        }
    }
    Ok(out)
}

/// Drops unhashed subpackets other than one Issuer and one Issuer Fingerprint naming the
/// primary key (`issuer`: every kept signature is the primary key's) and one Embedded
/// Signature. The unhashed area is not signed: anyone can add to it without breaking the
/// signature, so without the "one of each" rule a publisher could pad a valid self-signature
/// with thousands of issuer subpackets of other keys (served to every requester, kept by the
/// merge's newest-signature rule, and eating the owner's size budget for good).
fn clean_unhashed(sig: &mut Signature, issuer: &(KeyId, Fingerprint)) -> usize {
    let drop: Vec<usize> = match sig.config() {
        Some(c) => {
            let (mut id, mut fpr, mut embedded) = (false, false, false);
            c.unhashed_subpackets()
                .enumerate()
                .filter(|(_, sp)| {
                    let first = |seen: &mut bool| !std::mem::replace(seen, true);
                    let keep = match &sp.data {
                        SubpacketData::IssuerKeyId(k) => *k == issuer.0 && first(&mut id),
                        SubpacketData::IssuerFingerprint(f) => *f == issuer.1 && first(&mut fpr),
                        SubpacketData::EmbeddedSignature(_) => first(&mut embedded),
                        _ => false,
                    };
                    !keep
                })
                .map(|(i, _)| i)
                .collect()
        }
        None => return 0,
    };
    drop.iter()
        .rev()
        .filter(|&&i| sig.unhashed_subpacket_remove(i).is_ok())
        .count()
}
