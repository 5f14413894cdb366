//! WKS key submissions in the service: authenticated and checked like a publication, no K_auth.

use mail_parser::Message;
use sha2::{Digest, Sha256};

use super::{Decision, Envelope, Kst};
use crate::address::Address;
use crate::error::Error;
use crate::protocol::Reason;
use crate::reply::ReplyTo;
use crate::wks::{self, Submission, WksError};

impl Kst {
    /// A WKS key submission (`gpg-wks-client --create`, policy `auth-submit`): the sender must
    /// be the authenticated account (From and envelope sender too), exactly as for a paper-style
    /// publication, before anything is decrypted; then the key goes through the same key policy
    /// and is published at once. Every refusal is a reply without an HMAC (there is no K_auth).
    pub(super) async fn wks_publication(
        &self,
        ctx: &ReplyTo<'_>,
        env: &Envelope,
        msg: &Message<'_>,
        raw: &[u8],
        submission: Result<Submission, WksError>,
    ) -> Result<Decision, Error> {
        let account = match self.bound_account(ctx, env, msg) {
            Ok(a) => a,
            Err((reason, account, mut detail)) => {
                if reason == Reason::NotAuthenticated {
                    detail.push_str(
                        ". Send the mail that gpg-wks-client --create writes through your \
                         provider's submission server (port 587, logged in as this address).",
                    );
                }
                tracing::info!(
                    sender = %ctx.requester,
                    reason = %reason,
                    "WKS submission refused before it was opened"
                );
                return self
                    .refuse(ctx, reason, account.as_ref(), Some(detail), None)
                    .await;
            }
        };
        let domain = ctx.service.domain();
        let opened = submission.and_then(|s| {
            wks::extract_key(
                &s,
                self.submission_keys.get(domain),
                domain,
                self.policy.max_key_bytes,
            )
        });
        let armored = match opened {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(account = %account, error = %e, "WKS submission yielded no key");
                return self
                    .refuse(ctx, e.reason(), Some(&account), Some(e.to_string()), None)
                    .await;
            }
        };
        let message_digest = Sha256::digest(raw);
        let id = |packets: &[u8]| wks_publication_id(&account, &message_digest, packets);
        self.publish_valid(ctx, &account, &armored, None, id).await
    }
}

/// The idempotency token of a WKS publication. A submission has no K_auth, so the message
/// itself names it: a redelivery of the same message (same bytes) yields the same token, while
/// a new `gpg-wks-client --create` (fresh encryption) is a new publication, even of a key that
/// was published before.
fn wks_publication_id(account: &Address, message_digest: &[u8], packets: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"kst-wks-publication-v1\0");
    h.update(account.as_str().as_bytes());
    h.update([0]);
    h.update(message_digest);
    h.update(packets);
    hex::encode(h.finalize())
}

#[cfg(test)]
#[path = "service_wks_tests.rs"]
mod tests;
