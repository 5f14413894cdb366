//! Steps 1 to 4 on the packets: packet cap, secret-key packets, shape, and the self-signature
//! cap; third-party signatures are dropped here, unverified.

use pgp::errors::Error as PgpError;
use pgp::packet::{Packet, PacketParser, PublicKey, PublicSubkey, Signature, UserId};
use pgp::types::{Fingerprint, KeyDetails, KeyId, Tag};

use super::stripped::Dropped;
use super::user_id::uid_address;
use super::{KeyPolicy, KeyRejection};
use crate::address::Address;

/// How many other User ID addresses a [`KeyRejection::NoMatchingUserId`] lists at most.
const MAX_LISTED_ADDRESSES: usize = 5;

/// A packet with the signatures that follow it.
pub(super) struct Component<T> {
    pub(super) packet: T,
    pub(super) sigs: Vec<Signature>,
}

/// The first certificate of a block, with third-party signatures already dropped.
pub(super) struct Collected {
    pub(super) primary: PublicKey,
    pub(super) fingerprint: Fingerprint,
    /// Revocations, direct-key and any other signature right after the primary key.
    pub(super) direct: Vec<Signature>,
    /// User IDs whose address is the account.
    pub(super) uids: Vec<Component<UserId>>,
    /// Other User IDs (only their self-signature candidates are kept, to tell a key with no
    /// valid self-signature from one whose matching User ID is unsigned).
    pub(super) other_uids: Vec<Component<UserId>>,
    /// Normalized addresses of other User IDs (a few, deduplicated).
    pub(super) other_addresses: Vec<Address>,
    pub(super) subkeys: Vec<Component<PublicSubkey>>,
    pub(super) dropped: Dropped,
}

/// Where the next signature belongs.
#[derive(Clone, Copy)]
enum Slot {
    /// Before any key packet.
    Start,
    Primary,
    Uid(usize),
    OtherUid(usize),
    Subkey(usize),
    /// A dropped component (user attribute, unreadable packet): its signatures go too.
    Dropped,
    /// Inside a second or later certificate: only scanned for secret keys and counted.
    OtherCertificate,
}

/// Is `e` a packet-level error after which the stream is still positioned at the next packet?
fn is_soft(e: &PgpError) -> bool {
    matches!(
        e,
        PgpError::Unsupported { .. }
            | PgpError::InvalidPacketContent { .. }
            | PgpError::PacketIncomplete { .. }
            | PgpError::PacketTooLarge { .. }
    )
}

/// Whose signature this claims to be.
#[derive(PartialEq, Eq)]
enum Issuer {
    /// Names the primary key (by key ID or fingerprint).
    Primary,
    /// Names no issuer at all: it can only be tried.
    Unnamed,
    /// Names other keys only.
    Other,
}

fn issuer_of(sig: &Signature, key_id: &KeyId, fingerprint: &Fingerprint) -> Issuer {
    let ids = sig.issuer_key_id();
    let fps = sig.issuer_fingerprint();
    if ids.is_empty() && fps.is_empty() {
        Issuer::Unnamed
    } else if ids.contains(&key_id) || fps.contains(&fingerprint) {
        Issuer::Primary
    } else {
        Issuer::Other
    }
}

/// Reads the packets, keeping the first certificate's components and the signatures that may
/// be self-signatures; everything issued by other keys is counted and dropped unverified.
pub(super) fn collect(
    bytes: &[u8],
    account: &Address,
    policy: &KeyPolicy,
) -> Result<Collected, KeyRejection> {
    let mut parser = PacketParser::new(bytes);
    let mut packets = 0usize;
    let mut certificates = 0usize;
    let mut candidates = 0usize;
    let mut slot = Slot::Start;
    let mut primary: Option<(PublicKey, KeyId, Fingerprint)> = None;
    let mut direct = Vec::new();
    let mut uids: Vec<Component<UserId>> = Vec::new();
    let mut other_uids: Vec<Component<UserId>> = Vec::new();
    let mut other_addresses: Vec<Address> = Vec::new();
    let mut subkeys: Vec<Component<PublicSubkey>> = Vec::new();
    let mut dropped = Dropped::default();

    while let Some(body) = parser.next_ref() {
        let body = body.map_err(|e| KeyRejection::Malformed(format!("packet {packets}: {e}")))?;
        packets += 1;
        if packets > policy.max_packets {
            return Err(KeyRejection::TooManyPackets {
                limit: policy.max_packets,
            });
        }
        let header = body.packet_header();
        let tag = header.tag();
        if matches!(tag, Tag::SecretKey | Tag::SecretSubkey) {
            return Err(KeyRejection::SecretKey);
        }
        let packet = match Packet::from_reader(header, body) {
            Ok(p) => Some(p),
            Err(e) if is_soft(&e) => None,
            Err(e) => {
                return Err(KeyRejection::Malformed(format!(
                    "packet {packets} ({tag:?}): {e}"
                )));
            }
        };
        match tag {
            Tag::PublicKey => {
                certificates += 1;
                if certificates > 1 {
                    slot = Slot::OtherCertificate;
                    continue;
                }
                let Some(Packet::PublicKey(key)) = packet else {
                    return Err(KeyRejection::Malformed(
                        "the primary key uses a version or algorithm that cannot be read".into(),
                    ));
                };
                let key_id = key.legacy_key_id();
                let fingerprint = key.fingerprint();
                primary = Some((key, key_id, fingerprint));
                slot = Slot::Primary;
                continue;
            }
            Tag::PublicKeyEncryptedSessionKey
            | Tag::SymKeyEncryptedSessionKey
            | Tag::OnePassSignature
            | Tag::CompressedData
            | Tag::SymEncryptedData
            | Tag::LiteralData
            | Tag::SymEncryptedProtectedData
            | Tag::ModDetectionCode
            | Tag::GnupgAeadData => {
                return Err(KeyRejection::Malformed(format!(
                    "it contains a {tag:?} packet, which belongs in a message, not in a key"
                )));
            }
            _ => {}
        }
        if matches!(slot, Slot::OtherCertificate) {
            continue;
        }
        let Some((_, key_id, fingerprint)) = primary.as_ref() else {
            dropped.other_packets += 1;
            continue;
        };
        match tag {
            Tag::Signature => {
                let Some(Packet::Signature(sig)) = packet else {
                    dropped.unreadable += 1;
                    continue;
                };
                if sig.config().is_none() {
                    dropped.unreadable += 1;
                    continue;
                }
                if issuer_of(&sig, key_id, fingerprint) == Issuer::Other {
                    dropped.third_party += 1;
                    continue;
                }
                let target = match slot {
                    Slot::Primary => &mut direct,
                    Slot::Uid(i) => &mut uids[i].sigs,
                    Slot::OtherUid(i) => &mut other_uids[i].sigs,
                    Slot::Subkey(i) => &mut subkeys[i].sigs,
                    Slot::Start | Slot::Dropped | Slot::OtherCertificate => continue,
                };
                candidates += 1;
                if candidates > policy.max_self_signatures {
                    return Err(KeyRejection::TooManySelfSignatures {
                        limit: policy.max_self_signatures,
                    });
                }
                target.push(sig);
            }
            Tag::UserId => {
                let Some(Packet::UserId(uid)) = packet else {
                    dropped.unreadable += 1;
                    slot = Slot::Dropped;
                    continue;
                };
                let address = uid_address(uid.id(), &policy.address_policy);
                let component = Component {
                    packet: uid,
                    sigs: Vec::new(),
                };
                if address.as_ref() == Some(account) {
                    uids.push(component);
                    slot = Slot::Uid(uids.len() - 1);
                } else {
                    dropped.other_uids += 1;
                    if let Some(a) = address
                        && other_addresses.len() < MAX_LISTED_ADDRESSES
                        && !other_addresses.contains(&a)
                    {
                        other_addresses.push(a);
                    }
                    other_uids.push(component);
                    slot = Slot::OtherUid(other_uids.len() - 1);
                }
            }
            Tag::UserAttribute => {
                dropped.user_attributes += 1;
                slot = Slot::Dropped;
            }
            Tag::PublicSubkey => {
                let Some(Packet::PublicSubkey(key)) = packet else {
                    dropped
                        .subkeys
                        .push("1 subkey that cannot be read (unsupported algorithm)".into());
                    slot = Slot::Dropped;
                    continue;
                };
                subkeys.push(Component {
                    packet: key,
                    sigs: Vec::new(),
                });
                slot = Slot::Subkey(subkeys.len() - 1);
            }
            // Trust, marker, padding, and unknown non-critical packets: not part of what is
            // published; they do not end the current component.
            _ => {
                if packet.is_none() {
                    dropped.unreadable += 1;
                } else {
                    dropped.other_packets += 1;
                }
            }
        }
    }

    match certificates {
        0 => return Err(KeyRejection::NoCertificate),
        1 => {}
        n => return Err(KeyRejection::SeveralCertificates(n)),
    }
    let Some((primary, _, fingerprint)) = primary else {
        return Err(KeyRejection::NoCertificate);
    };
    Ok(Collected {
        primary,
        fingerprint,
        direct,
        uids,
        other_uids,
        other_addresses,
        subkeys,
        dropped,
    })
}
