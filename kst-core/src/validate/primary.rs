//! The primary key's own signatures: key revocations (0x20) and direct-key signatures (0x1F).

use pgp::packet::{PublicKey, Signature, SignatureType};
use pgp::types::KeyDetails;

use super::signature::{Check, Checker};
use super::stripped::Dropped;

/// The verdict on the signatures right after the primary key.
pub(super) struct DirectVerdict {
    /// A valid key revocation is present.
    pub(super) revoked: bool,
    /// Indexes of the kept signatures: every valid revocation and the newest valid direct-key
    /// signature (older ones are superseded and dropped).
    pub(super) keep: Vec<usize>,
    /// (created, key expiration seconds) of the newest valid direct-key signature.
    pub(super) newest_binding: Option<(u32, u32)>,
}

/// Checks each signature on the primary key; misplaced and failing ones are counted in `dropped`.
pub(super) fn judge_direct(
    checker: &mut Checker<'_>,
    primary: &PublicKey,
    direct: &[Signature],
    dropped: &mut Dropped,
) -> DirectVerdict {
    let key_created = primary.created_at().as_secs();
    let mut revoked = false;
    let mut keep = Vec::new();
    let mut newest_binding: Option<(u32, u32)> = None;
    let mut newest_index = None;
    for (i, sig) in direct.iter().enumerate() {
        let revocation = match sig.typ() {
            Some(SignatureType::KeyRevocation) => true,
            Some(SignatureType::Key) => false,
            _ => {
                dropped.misplaced_sigs += 1;
                continue;
            }
        };
        match checker.check(sig, key_created, revocation, |s| s.verify_key(primary)) {
            Check::Valid => {
                let created = sig.created().map_or(0, |t| t.as_secs());
                if revocation {
                    keep.push(i);
                    revoked = true;
                } else if newest_binding.is_none_or(|(c, _)| created >= c) {
                    let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                    newest_binding = Some((created, exp));
                    if newest_index.replace(i).is_some() {
                        dropped.superseded += 1;
                    }
                } else {
                    dropped.superseded += 1;
                }
            }
            Check::Future(_) => dropped.future_self_sigs += 1,
            Check::WeakHash(_) | Check::Invalid => dropped.bad_self_sigs += 1,
        }
    }
    keep.extend(newest_index);
    keep.sort_unstable();
    DirectVerdict {
        revoked,
        keep,
        newest_binding,
    }
}
