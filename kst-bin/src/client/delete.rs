//! `kst client delete`: the owner's authenticated deletion of their key and its history.
//!
//! The request is `DELETE` with a fresh K_auth, sent over authenticated submission like a
//! publication (the KST accepts it only from the account itself); the answer counts only once
//! its HMAC verifies with that K_auth ([`kst_core::client::verify_reply`]).

use super::commands::{Settings, send_and_wait};
use super::output::Outcome;

/// Sends the deletion for the account and (unless `no_wait`) waits for the verified answer.
pub async fn delete(s: &Settings, no_wait: bool) -> Outcome {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return o,
    };
    let request = kst_core::client::build_deletion(&account);
    send_and_wait(s, &account, request, None, false, no_wait).await
}
