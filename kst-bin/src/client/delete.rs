//! `kst client delete`: the owner's authenticated deletion of their key and its history.
//!
//! The request is `DELETE` with a fresh K_auth, sent over authenticated submission like a
//! publication (the KST accepts it only from the account itself); the answer counts only once
//! its HMAC verifies with that K_auth ([`kst_core::client::verify_reply`]).

use super::commands::{LogArgs, Settings, log_plan, send_and_wait_with};
use super::output::Outcome;

/// Sends the deletion for the account and (unless `no_wait`) waits for the verified answer.
/// With `--transparency` (in `log`) the request offers protocol version 3 and the
/// confirmation must carry the key directory's proof that the address has no key now,
/// checked like every version 3 answer.
pub async fn delete(s: &Settings, no_wait: bool, log: &LogArgs) -> Outcome {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return o,
    };
    let plan = match log_plan(s, log, &account).await {
        Ok(p) => p,
        Err(o) => return o,
    };
    let request = kst_core::client::build_deletion_with(&account, plan.head_key.as_deref())
        .with_log_ask(plan.ask);
    send_and_wait_with(s, &account, request, None, false, no_wait, plan.log).await
}
