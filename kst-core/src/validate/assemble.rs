//! What is kept: the published certificate, re-serialized in order, with each kept signature's
//! unhashed area cleaned, every packet with a definite length ([`write_fixed`]).

use pgp::packet::{PacketHeader, PacketTrait, Signature, SubpacketData};
use pgp::ser::Serialize as _;
use pgp::types::{Fingerprint, KeyDetails, KeyId, PacketLength};

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
    ser(write_fixed(&c.primary, &mut out))?;
    for i in kept.direct {
        let sig = &mut c.direct[i];
        dropped.unhashed_subpackets += clean(sig);
        ser(write_fixed(sig, &mut out))?;
    }
    for (ui, keep) in kept.uids {
        let uid = &mut c.uids[ui];
        ser(write_fixed(&uid.packet, &mut out))?;
        for i in keep {
            let sig = &mut uid.sigs[i];
            dropped.unhashed_subpackets += clean(sig);
            ser(write_fixed(sig, &mut out))?;
        }
    }
    for (si, keep) in kept.subkeys {
        let sub = &mut c.subkeys[si];
        ser(write_fixed(&sub.packet, &mut out))?;
        for i in keep {
            let sig = &mut sub.sigs[i];
            dropped.unhashed_subpackets += clean(sig);
            ser(write_fixed(sig, &mut out))?;
        }
    }
    Ok(out)
}

/// Writes `packet` with its header and a definite length, in the header format it was read
/// with (old or new). rPGP's `to_writer_with_header` keeps an old-format indeterminate length
/// (length type 3: the packet runs to the end of the input) as it was read; such a packet is
/// only readable last, and the kept packets are written in another order than they came (the
/// User ID before the subkeys), so a stored key could swallow the packets after it and no
/// longer parse. The body is the same: only its framing changes.
fn write_fixed<P: PacketTrait>(packet: &P, out: &mut Vec<u8>) -> pgp::errors::Result<()> {
    let read_with = packet.packet_header();
    let len = u32::try_from(packet.write_len())?;
    PacketHeader::from_parts(
        read_with.version(),
        read_with.tag(),
        PacketLength::Fixed(len),
    )?
    .to_writer(out)?;
    packet.to_writer(out)
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
