//! Step 8: the subkeys kept (a valid binding, not expired) and the refusal of a weak live one.

use pgp::packet::{PublicKey, PublicSubkey, SignatureType};
use pgp::types::{KeyDetails, KeyVersion};

use super::KeyRejection;
use super::algorithm::key_weakness;
use super::packets::Component;
use super::signature::{Check, Checker};
use super::stripped::Dropped;

/// Which subkeys are kept, each as (index in `subkeys`, indexes of its kept signatures).
/// Dropped subkeys are listed in `dropped`; `revoked` is whether the primary key is revoked.
pub(super) fn judge_subkeys(
    checker: &mut Checker<'_>,
    primary: &PublicKey,
    subkeys: &[Component<PublicSubkey>],
    revoked: bool,
    dropped: &mut Dropped,
) -> Result<Vec<(usize, Vec<usize>)>, KeyRejection> {
    let now = checker.now;
    let policy = checker.policy;
    let v6 = primary.version() == KeyVersion::V6;
    let mut kept_subkeys: Vec<(usize, Vec<usize>)> = Vec::new();
    for (si, sub) in subkeys.iter().enumerate() {
        let sub_fpr = format!("{:X}", sub.packet.fingerprint());
        if v6 && sub.packet.version() != KeyVersion::V6 {
            dropped.subkeys.push(format!(
                "subkey {sub_fpr} (not version 6 under a version 6 key)"
            ));
            continue;
        }
        let sub_created = sub.packet.created_at().as_secs();
        let mut keep = Vec::new();
        let mut newest: Option<(u32, u32)> = None;
        let mut newest_index = None;
        let mut sub_revoked = false;
        let mut weak = None;
        for (i, sig) in sub.sigs.iter().enumerate() {
            let revocation = match sig.typ() {
                Some(SignatureType::SubkeyBinding) => false,
                Some(SignatureType::SubkeyRevocation) => true,
                _ => {
                    dropped.misplaced_sigs += 1;
                    continue;
                }
            };
            let check = checker.check(sig, sub_created, revocation, |s| {
                s.verify_subkey_binding(primary, &sub.packet)
            });
            match check {
                Check::Valid => {
                    let created = sig.created().map_or(0, |t| t.as_secs());
                    if revocation {
                        keep.push(i);
                        sub_revoked = true;
                    } else if newest.is_none_or(|(c, _)| created >= c) {
                        let exp = sig.key_expiration_time().map_or(0, |d| d.as_secs());
                        newest = Some((created, exp));
                        if newest_index.replace(i).is_some() {
                            dropped.superseded += 1;
                        }
                    } else {
                        dropped.superseded += 1;
                    }
                }
                Check::WeakHash(h) => {
                    weak = Some(h);
                    dropped.bad_self_sigs += 1;
                }
                Check::Future(_) => dropped.future_self_sigs += 1,
                Check::Invalid => dropped.bad_self_sigs += 1,
            }
        }
        keep.extend(newest_index);
        keep.sort_unstable();
        let Some((_, exp)) = newest else {
            dropped.subkeys.push(match weak {
                Some(h) => format!("subkey {sub_fpr} (its binding signature uses {h})"),
                None => format!("subkey {sub_fpr} (no valid binding signature)"),
            });
            continue;
        };
        if exp != 0 && u64::from(sub_created) + u64::from(exp) <= now {
            dropped.subkeys.push(format!("subkey {sub_fpr} (expired)"));
            continue;
        }
        if !revoked
            && !sub_revoked
            && let Some(algorithm) = key_weakness(&sub.packet, policy)
        {
            return Err(KeyRejection::WeakSubkey {
                fingerprint: sub_fpr,
                algorithm,
            });
        }
        kept_subkeys.push((si, keep));
    }
    Ok(kept_subkeys)
}
