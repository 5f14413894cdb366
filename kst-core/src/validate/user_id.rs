//! Step 6: the User ID that holds the account's address, its self-certifications and
//! revocations, which one is published for clients to use, and which revoked ones are kept
//! beside it.

use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{PublicKey, SignatureType, UserId};
use pgp::types::{KeyDetails, Tag};

use super::KeyRejection;
use super::packets::Component;
use super::signature::{Check, Checker};
use super::stripped::Dropped;
use crate::address::{Address, AddressPolicy};

/// The address a User ID holds: inside the last `<...>` when it ends with `>`, else the whole.
pub(super) fn uid_address(uid: &[u8], policy: &AddressPolicy) -> Option<Address> {
    let text = std::str::from_utf8(uid).ok()?.trim();
    let candidate = if text.ends_with('>') {
        &text[text.rfind('<')?..]
    } else {
        text
    };
    policy.normalize(candidate).ok()
}

/// The verdict on one User ID.
pub(super) struct UidVerdict {
    /// Indexes of its kept self-signatures: every valid revocation and the newest valid
    /// certification (older ones are superseded and dropped).
    pub(super) keep: Vec<usize>,
    /// Newest valid certification: (created, primary flag, key expiration seconds).
    pub(super) newest: Option<(u32, bool, u32)>,
    /// Newest valid certification revocation.
    revoked_at: Option<u32>,
    weak: Option<HashAlgorithm>,
    /// Newest certification that verifies but is dated in the future.
    future: Option<u32>,
}

impl UidVerdict {
    /// Revoked by its own signatures: a valid revocation no older than its newest valid
    /// certification (or it has no valid certification at all).
    fn is_revoked(&self) -> bool {
        self.revoked_at
            .is_some_and(|r| self.newest.is_none_or(|(created, _, _)| r >= created))
    }
}

fn judge_uid(
    checker: &mut Checker<'_>,
    primary: &PublicKey,
    uid: &Component<UserId>,
    dropped: &mut Dropped,
) -> UidVerdict {
    let key_created = primary.created_at().as_secs();
    let mut newest_index = None;
    let mut v = UidVerdict {
        keep: Vec::new(),
        newest: None,
        revoked_at: None,
        weak: None,
        future: None,
    };
    for (i, sig) in uid.sigs.iter().enumerate() {
        let revocation = match sig.typ() {
            Some(
                SignatureType::CertGeneric
                | SignatureType::CertPersona
                | SignatureType::CertCasual
                | SignatureType::CertPositive,
            ) => false,
            Some(SignatureType::CertRevocation) => true,
            _ => {
                dropped.misplaced_sigs += 1;
                continue;
            }
        };
        let check = checker.check(sig, key_created, revocation, |s| {
            s.verify_certification(primary, Tag::UserId, &uid.packet)
        });
        let created = sig.created().map_or(0, |t| t.as_secs());
        match check {
            Check::Valid => {
                if revocation {
                    v.keep.push(i);
                    v.revoked_at = v.revoked_at.max(Some(created));
                } else {
                    let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                    let candidate = (created, sig.is_primary(), exp);
                    if v.newest.is_none_or(|(c, _, _)| created >= c) {
                        v.newest = Some(candidate);
                        if newest_index.replace(i).is_some() {
                            dropped.superseded += 1;
                        }
                    } else {
                        dropped.superseded += 1;
                    }
                }
            }
            Check::WeakHash(h) => {
                v.weak = Some(h);
                dropped.bad_self_sigs += 1;
            }
            Check::Future(at) => {
                if !revocation {
                    v.future = v.future.max(Some(at));
                }
                dropped.future_self_sigs += 1;
            }
            Check::Invalid => dropped.bad_self_sigs += 1,
        }
    }
    v.keep.extend(newest_index);
    v.keep.sort_unstable();
    v
}

/// The User IDs found on the certificate, as [`choose`] needs them.
pub(super) struct Candidates<'a> {
    /// User IDs whose address is the account.
    pub(super) uids: &'a [Component<UserId>],
    /// The other User IDs (consulted only to word the refusal).
    pub(super) other_uids: &'a [Component<UserId>],
    /// Normalized addresses of the other User IDs (a few).
    pub(super) other_addresses: &'a [Address],
}

/// The User IDs of the account that are published.
pub(super) struct Chosen {
    /// Index in [`Candidates::uids`] of the User ID clients should use.
    pub(super) index: usize,
    /// Its verdict.
    pub(super) verdict: UidVerdict,
    /// The account's other User IDs that are revoked, each as (index in [`Candidates::uids`],
    /// indexes of its kept signatures: its revocations and newest valid certification), in
    /// the order of the block. They are published so that clients which hold such a User ID
    /// from an earlier copy of the key learn that it is revoked.
    pub(super) revoked: Vec<(usize, Vec<usize>)>,
}

/// Picks the matching User ID to publish: among those with a valid self-certification not
/// revoked since (unless the key itself is `revoked`), the one flagged primary, else the newest.
/// The account's other User IDs that are revoked are kept too, with their revocations (see
/// [`Chosen::revoked`]); its other live ones are dropped. `has_direct` says whether a valid
/// direct-key signature or key revocation was kept (to word the refusal).
pub(super) fn choose(
    checker: &mut Checker<'_>,
    primary: &PublicKey,
    found: Candidates<'_>,
    account: &Address,
    revoked: bool,
    has_direct: bool,
    dropped: &mut Dropped,
) -> Result<Chosen, KeyRejection> {
    if found.uids.is_empty() {
        return Err(KeyRejection::NoMatchingUserId {
            account: account.clone(),
            found: found.other_addresses.to_vec(),
        });
    }
    let mut verdicts: Vec<UidVerdict> = found
        .uids
        .iter()
        .map(|u| judge_uid(checker, primary, u, dropped))
        .collect();
    let usable = |v: &UidVerdict| v.newest.is_some() && (revoked || !v.is_revoked());
    let chosen = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| usable(v))
        .max_by_key(|(i, v)| {
            let (created, primary_flag, _) = v.newest.unwrap_or_default();
            (primary_flag, created, std::cmp::Reverse(*i))
        })
        .map(|(i, _)| i);
    let Some(chosen) = chosen else {
        if verdicts.iter().any(|v| v.newest.is_some()) {
            return Err(KeyRejection::UserIdRevoked {
                account: account.clone(),
            });
        }
        if let Some(at) = verdicts.iter().filter_map(|v| v.future).max() {
            return Err(KeyRejection::SignedInTheFuture {
                at: u64::from(at),
                now: checker.now,
                key_created: u64::from(primary.created_at().as_secs()),
            });
        }
        if let Some(h) = verdicts.iter().find_map(|v| v.weak) {
            return Err(KeyRejection::WeakSelfSignatureHash {
                hash: h.to_string(),
            });
        }
        // Does anything else on the key verify? (Only reached on this error path.)
        let mut scratch = Dropped::default();
        let other_valid = found.other_uids.iter().any(|u| {
            judge_uid(checker, primary, u, &mut scratch)
                .newest
                .is_some()
        });
        if !has_direct && !other_valid {
            return Err(KeyRejection::NoValidSelfSignature);
        }
        return Err(KeyRejection::UserIdNotSelfSigned {
            account: account.clone(),
        });
    };
    let revoked_uids: Vec<(usize, Vec<usize>)> = verdicts
        .iter_mut()
        .enumerate()
        .filter(|(i, v)| *i != chosen && v.is_revoked())
        .map(|(i, v)| (i, std::mem::take(&mut v.keep)))
        .collect();
    dropped.other_uids += found.uids.len() - 1 - revoked_uids.len();
    Ok(Chosen {
        index: chosen,
        verdict: verdicts.swap_remove(chosen),
        revoked: revoked_uids,
    })
}
