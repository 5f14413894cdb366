//! The `Mailer` trait: how kst hands a reply on (spool directory, SMTP relay).

use async_trait::async_trait;

use crate::address::Address;
use crate::error::Result;

/// One reply ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMail {
    /// The envelope sender (MAIL FROM). `None` is the null path `<>`, which RFC 3834 asks of
    /// automatic responses so that they never cause bounces or loops.
    pub envelope_from: Option<Address>,
    /// The one envelope recipient: the requester's envelope sender.
    pub recipient: Address,
    /// The complete RFC 5322 message, CRLF line endings.
    pub message: Vec<u8>,
    /// The reply's Message-ID (without angle brackets), for logs.
    pub message_id: String,
}

/// Hands replies on. `send` returns `Ok` only once the reply is durable (written and synced to
/// the spool, or accepted by the relay with a 250), or once it is certain never to go (an SMTP
/// relay's 5xx refusal of that reply, which the mailer logs and counts: asking again would be
/// refused again); anything else is a temporary error so that the request stays with the MTA
/// and is retried.
#[async_trait]
pub trait Mailer: Send + Sync {
    /// Short name for logs and metrics, e.g. `"spool"` or `"smtp"`.
    fn name(&self) -> &'static str;

    /// Sends one reply durably (or, for a reply its relay refuses for good, logs that it is
    /// not sent).
    async fn send(&self, mail: &OutgoingMail) -> Result<()>;

    /// Checks that the mailer can accept mail now (for `/readyz`).
    async fn check(&self) -> Result<()>;

    /// Ends what the mailer keeps open between replies (a relay session says QUIT), at
    /// shutdown. Replies sent before stay sent; a later `send` opens anew. Nothing by default.
    async fn close(&self) {}
}
