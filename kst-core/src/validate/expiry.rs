//! Step 7: when the primary key expires, and the refusal of an expired key.

use super::KeyRejection;

/// The primary key's expiration (seconds since the Unix epoch), from the newer of the newest
/// valid direct-key signature and the kept User ID's newest self-certification (both as
/// (created, key expiration seconds)); refuses a key that is not revoked and has expired by `now`.
pub(super) fn key_expiry(
    key_created: u32,
    direct: Option<(u32, u32)>,
    user_id: Option<(u32, u32)>,
    revoked: bool,
    now: u64,
) -> Result<Option<u64>, KeyRejection> {
    let mut newest_binding = direct;
    if let Some((created, exp)) = user_id
        && newest_binding.is_none_or(|(c, _)| created >= c)
    {
        newest_binding = Some((created, exp));
    }
    let expires_at = newest_binding
        .and_then(|(_, exp)| (exp != 0).then(|| u64::from(key_created) + u64::from(exp)));
    if !revoked
        && let Some(at) = expires_at
        && at <= now
    {
        return Err(KeyRejection::Expired { at });
    }
    Ok(expires_at)
}
