//! Key policy: what kst accepts, and what it keeps, when a user publishes an OpenPGP key.
//!
//! [`validate`] takes the armored block a user sent, the address their provider authenticated
//! and a [`KeyPolicy`], and returns either a [`ValidKey`] (the certificate reduced to what kst
//! publishes) or a [`KeyRejection`] whose message tells the user what to do.
//!
//! The rules (what is refused, what counts as a valid signature, what is kept and what is
//! stripped) are written down in `docs/KEY-POLICY.md`, with the file of this module that
//! implements each step: `armor` and `packets` read the block (size, secret keys, shape, the
//! self-signature cap), `primary`, `user_id`, `expiry` and `subkey` judge the certificate's
//! parts with `signature` and `algorithm`, `assemble` writes what is kept and `stripped` lists
//! what is not.
//!
//! Validation is a pure function of its inputs: publishing the result again gives the same
//! packets ([`validate`] is idempotent), and the primary key packet is kept as sent, so the
//! fingerprint does not change.

mod algorithm;
mod armor;
mod assemble;
mod expiry;
mod packets;
mod policy;
mod primary;
mod rejection;
mod signature;
mod stripped;
mod subkey;
#[cfg(test)]
mod tests;
mod user_id;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{SystemTime, UNIX_EPOCH};

use pgp::types::KeyDetails;

pub use policy::{
    DEFAULT_CLOCK_SKEW_SECS, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_PACKETS,
    DEFAULT_MAX_PUBLISHED_BYTES, DEFAULT_MAX_SELF_SIGNATURES, DEFAULT_MIN_RSA_BITS, KeyPolicy,
};
pub use rejection::KeyRejection;

use crate::address::Address;
use crate::fingerprint::Fingerprint;
use algorithm::key_weakness;
use assemble::{Kept, assemble};
use packets::Collected;
use signature::Checker;
use user_id::Candidates;

/// A key that passed the policy, reduced to what kst publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidKey {
    /// The published certificate as binary OpenPGP packets (armor with
    /// [`armor_public_key`](crate::openpgp::armor_public_key)).
    pub packets: Vec<u8>,
    /// Primary key fingerprint.
    pub fingerprint: Fingerprint,
    /// The User ID clients should use, as in the key (UTF-8, but otherwise whatever the key
    /// holder wrote: escape it before putting it in a header). It comes first in
    /// [`packets`](Self::packets).
    pub user_id: String,
    /// The account's other User IDs that are revoked, published after [`user_id`](Self::user_id)
    /// with their revocations so that clients learn of them (same text caveat). Usually empty.
    pub revoked_user_ids: Vec<String>,
    /// A verified key revocation signature is present: clients must not use the key.
    pub revoked: bool,
    /// When the key expires (seconds since the Unix epoch), if it does.
    pub expires_at: Option<u64>,
    /// What was removed, for the confirmation (e.g. `"2 other User IDs"`,
    /// `"41 third-party certifications"`). Empty when nothing was.
    pub stripped: Vec<String>,
}

/// Applies the key policy to an armored key block published for `account` at time `now`.
///
/// Never panics on any input (a panic inside the OpenPGP library is caught and reported as
/// [`KeyRejection::Malformed`]). See `docs/KEY-POLICY.md` for the rules.
pub fn validate(
    armored: &str,
    account: &Address,
    policy: &KeyPolicy,
    now: SystemTime,
) -> Result<ValidKey, KeyRejection> {
    validate_counting(armored, account, policy, now).0
}

/// [`validate`], also returning how many signatures were verified cryptographically.
fn validate_counting(
    armored: &str,
    account: &Address,
    policy: &KeyPolicy,
    now: SystemTime,
) -> (Result<ValidKey, KeyRejection>, usize) {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut verifications = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let bytes = armor::dearmor(armored, policy)?;
        let collected = packets::collect(&bytes, account, policy)?;
        evaluate(collected, account, policy, now, &mut verifications)
    }))
    .unwrap_or_else(|_| {
        Err(KeyRejection::Malformed(
            "the OpenPGP library failed on it".into(),
        ))
    });
    (result, verifications)
}

/// Steps 5 to 8 and the assembly, on a certificate that passed steps 1 to 4.
fn evaluate(
    mut c: Collected,
    account: &Address,
    policy: &KeyPolicy,
    now: u64,
    verifications: &mut usize,
) -> Result<ValidKey, KeyRejection> {
    let mut checker = Checker {
        policy,
        now,
        verifications,
    };
    let key_created = c.primary.created_at().as_secs();
    let direct = primary::judge_direct(&mut checker, &c.primary, &c.direct, &mut c.dropped);
    let revoked = direct.revoked;

    if !revoked && let Some(algorithm) = key_weakness(&c.primary, policy) {
        return Err(KeyRejection::WeakPrimaryKey { algorithm });
    }
    // Only v4 and v6 fingerprints are kept; a revoked key of an older format ends here.
    let fingerprint = Fingerprint::parse(&format!("{:X}", c.fingerprint)).map_err(|_| {
        KeyRejection::WeakPrimaryKey {
            algorithm: format!("a version {} key format", u8::from(c.primary.version())),
        }
    })?;

    let found = Candidates {
        uids: &c.uids,
        other_uids: &c.other_uids,
        other_addresses: &c.other_addresses,
    };
    let chosen = user_id::choose(
        &mut checker,
        &c.primary,
        found,
        account,
        revoked,
        !direct.keep.is_empty(),
        &mut c.dropped,
    )?;

    let expires_at = expiry::key_expiry(
        key_created,
        direct.newest_binding,
        chosen
            .verdict
            .newest
            .map(|(created, _, exp)| (created, exp)),
        revoked,
        now,
    )?;

    let subkeys = subkey::judge_subkeys(
        &mut checker,
        &c.primary,
        &c.subkeys,
        revoked,
        &mut c.dropped,
    )?;

    let uid_text = |i: usize| String::from_utf8_lossy(c.uids[i].packet.id()).into_owned();
    let user_id = uid_text(chosen.index);
    let revoked_user_ids = chosen.revoked.iter().map(|(i, _)| uid_text(*i)).collect();
    let mut uids = vec![(chosen.index, chosen.verdict.keep)];
    uids.extend(chosen.revoked);
    let kept = Kept {
        direct: direct.keep,
        uids,
        subkeys,
    };
    let packets = assemble(&mut c, kept)?;
    if packets.len() > policy.max_published_bytes {
        return Err(KeyRejection::PublishedTooLarge {
            size: packets.len(),
            limit: policy.max_published_bytes,
        });
    }

    Ok(ValidKey {
        packets,
        fingerprint,
        user_id,
        revoked_user_ids,
        revoked,
        expires_at,
        stripped: stripped::describe(&c.dropped),
    })
}
