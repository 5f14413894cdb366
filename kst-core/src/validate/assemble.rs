//! What is kept: the published certificate, re-serialized in order, with each kept signature's
//! unhashed area cleaned.

use pgp::packet::{PacketTrait, Signature, SubpacketData};

use super::KeyRejection;
use super::packets::Collected;

/// What the steps decided to keep, as indexes into [`Collected`].
pub(super) struct Kept {
    /// The primary key's kept signatures.
    pub(super) direct: Vec<usize>,
    /// The kept User ID and its kept signatures.
    pub(super) uid: (usize, Vec<usize>),
    /// The kept subkeys, each with its kept signatures.
    pub(super) subkeys: Vec<(usize, Vec<usize>)>,
}

/// Serializes the primary key, the kept User ID and the kept subkeys with their kept
/// signatures; the count of removed unhashed subpackets goes to `c.dropped`.
pub(super) fn assemble(c: &mut Collected, kept: Kept) -> Result<Vec<u8>, KeyRejection> {
    let dropped = &mut c.dropped;
    let mut out = Vec::new();
    let ser = |r: pgp::errors::Result<()>| {
        r.map_err(|e| KeyRejection::Malformed(format!("re-serializing: {e}")))
    };
    ser(c.primary.to_writer_with_header(&mut out))?;
    for i in kept.direct {
        let sig = &mut c.direct[i];
        dropped.unhashed_subpackets += clean_unhashed(sig);
        ser(sig.to_writer_with_header(&mut out))?;
    }
    let (chosen, keep_uid_sigs) = kept.uid;
    let uid = &mut c.uids[chosen];
    ser(uid.packet.to_writer_with_header(&mut out))?;
    for i in keep_uid_sigs {
        let sig = &mut uid.sigs[i];
        dropped.unhashed_subpackets += clean_unhashed(sig);
        ser(sig.to_writer_with_header(&mut out))?;
    }
    for (si, keep) in kept.subkeys {
        let sub = &mut c.subkeys[si];
        ser(sub.packet.to_writer_with_header(&mut out))?;
        for i in keep {
            let sig = &mut sub.sigs[i];
            dropped.unhashed_subpackets += clean_unhashed(sig);
            ser(sig.to_writer_with_header(&mut out))?;
        }
    }
    Ok(out)
}

/// Drops unhashed subpackets other than Issuer, Issuer Fingerprint and Embedded Signature.
fn clean_unhashed(sig: &mut Signature) -> usize {
    let drop: Vec<usize> = match sig.config() {
        Some(c) => c
            .unhashed_subpackets()
            .enumerate()
            .filter(|(_, sp)| {
                !matches!(
                    sp.data,
                    SubpacketData::IssuerKeyId(_)
                        | SubpacketData::IssuerFingerprint(_)
                        | SubpacketData::EmbeddedSignature(_)
                )
            })
            .map(|(i, _)| i)
            .collect(),
        None => return 0,
    };
    drop.iter()
        .rev()
        .filter(|&&i| sig.unhashed_subpacket_remove(i).is_ok())
        .count()
}
