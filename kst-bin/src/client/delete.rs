//! `kst client delete`: the owner's authenticated deletion of their key and its history.
//!
//! The request is `DELETE` with a fresh K_auth, sent over authenticated submission like a
//! publication (the KST accepts it only from the account itself); the answer counts only once
//! its HMAC verifies with that K_auth ([`kst_core::client::verify_reply`]).

use super::commands::{Settings, send_and_wait};
use super::output::Outcome;

/// Sends the deletion for the account and (unless `no_wait`) waits for the verified answer.
/// With `head_key` the request offers protocol version 3 and the confirmation must carry the
/// key directory's proof that the address has no key now.
pub async fn delete(s: &Settings, no_wait: bool, head_key: Option<&str>) -> Outcome {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return o,
    };
    let request = kst_core::client::build_deletion_with(&account, head_key);
    send_and_wait(s, &account, request, None, false, no_wait).await
}
