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

/// What became of a reply handed to a [`Mailer`] that did not fail temporarily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The reply is durable: written and synced to the spool, or accepted by the relay with a
    /// 250. Nothing more to do.
    Sent,
    /// The relay refused this reply for good (a 5xx to its `RCPT TO` or to the end of its
    /// data: a recipient it does not know, a message it will not take). It is not sent and never
    /// will be: asking again would be refused again. The caller says so in its own terms (a
    /// request decided without its reply, a reminder not sent).
    Refused {
        /// The relay's reply code (500 to 599).
        code: u16,
        /// What the relay was asked and what it answered, for the operator (e.g.
        /// `RCPT TO refused by 127.0.0.1:25: 550 5.1.1 <bob@example.org>: Recipient address
        /// rejected`).
        text: String,
    },
}

impl Delivery {
    /// True for [`Delivery::Sent`].
    pub fn is_sent(&self) -> bool {
        matches!(self, Delivery::Sent)
    }

    /// Stable token for logs and metrics: `"sent"` or `"refused"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Delivery::Sent => "sent",
            Delivery::Refused { .. } => "refused",
        }
    }
}

/// Hands replies on. `send` returns [`Delivery::Sent`] only once the reply is durable (written
/// and synced to the spool, or accepted by the relay with a 250), and [`Delivery::Refused`] once
/// it is certain never to go (an SMTP relay's 5xx refusal of that reply: asking again would be
/// refused again); anything else is a temporary error, so that the request stays with the MTA
/// and is retried.
#[async_trait]
pub trait Mailer: Send + Sync {
    /// Short name for logs and metrics, e.g. `"spool"` or `"smtp"`.
    fn name(&self) -> &'static str;

    /// Sends one reply durably, or says that its relay refused it for good. The caller logs
    /// and counts what it got: a refused reply is not a sent one.
    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery>;

    /// Checks that the mailer can accept mail now (for `/readyz`).
    async fn check(&self) -> Result<()>;

    /// Ends what the mailer keeps open between replies (a relay session says QUIT), at
    /// shutdown. Replies sent before stay sent; a later `send` opens anew. Nothing by default.
    async fn close(&self) {}
}
