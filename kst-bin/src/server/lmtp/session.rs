//! One LMTP conversation as a sans-IO state machine on smtp-proto: bytes in, replies out.
//!
//! The server feeds whatever it read to [`Session::ingest`], writes [`Session::take_output`]
//! back, and when `ingest` returns [`Step::Deliver`] runs `Kst::handle` once per recipient and
//! hands the replies to [`Session::finish`] (RFC 2033: one reply per accepted recipient, in RCPT
//! order). Nothing here does I/O or waits, so every path is tested with plain byte strings.

use std::slice::Iter;

use kst_core::service::{HandleError, Handled, NotForKst};
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver, RequestReceiver};
use smtp_proto::{
    EXT_8BIT_MIME, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EhloResponse, Error, Request,
    Response,
};

use crate::shared::config::LmtpConfig;

/// Bad commands tolerated between two delivered messages before the session is closed.
pub const MAX_ERRORS: u32 = 20;
/// Commands tolerated between two delivered messages (on top of the accepted recipients; a
/// refused RCPT counts) before the session is closed: a client that only talks cannot hold a
/// connection slot forever.
pub const MAX_COMMANDS_BETWEEN_MESSAGES: u32 = 1000;
/// Longest reply text sent (bytes); longer texts (error details) are cut.
const MAX_REPLY_TEXT: usize = 400;

/// The limits one session enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest message kept (bytes). Not announced (no `SIZE` in LHLO): a larger message is
    /// read to its end, discarded and acknowledged with a `250`, so that the MTA never bounces
    /// it to a possibly forged sender.
    pub max_message_size: usize,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Bad commands between two messages before the session is closed.
    pub max_errors: u32,
    /// Commands between two messages (accepted recipients excluded) before the session is
    /// closed.
    pub max_commands: u32,
}

impl SessionLimits {
    /// The limits `[lmtp]` sets, with `max_message_bytes` from `[limits]` (the policy's).
    pub fn from_config(cfg: &LmtpConfig, max_message_bytes: usize) -> Self {
        SessionLimits {
            max_message_size: max_message_bytes,
            max_recipients: cfg.max_recipients,
            max_errors: MAX_ERRORS,
            max_commands: MAX_COMMANDS_BETWEEN_MESSAGES,
        }
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self::from_config(
            &LmtpConfig::default(),
            kst_core::Policy::DEFAULT_MAX_MESSAGE_BYTES,
        )
    }
}

/// One SMTP/LMTP reply: code, enhanced status code, one line of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code (RFC 3463), e.g. `[2, 0, 0]`.
    pub esc: [u8; 3],
    /// The text: one line of printable ASCII.
    pub text: String,
}

impl Reply {
    /// A reply; `text` is made safe for the wire (control and non-ASCII characters replaced,
    /// cut at a few hundred bytes), so error details can be passed as they are.
    pub fn new(code: u16, esc: [u8; 3], text: impl AsRef<str>) -> Self {
        let mut clean: String = text
            .as_ref()
            .chars()
            .map(|c| match c {
                ' '..='~' => c,
                '\t' | '\r' | '\n' => ' ',
                _ => '?',
            })
            .collect();
        clean.truncate(MAX_REPLY_TEXT);
        Reply {
            code,
            esc,
            text: clean,
        }
    }

    /// The reply as its wire line, CRLF included.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let [a, b, c] = self.esc;
        // Writing into a Vec cannot fail.
        let _ = Response::new(self.code, a, b, c, &self.text).write(out);
    }

    /// The reply as a string (for logs and tests), without CRLF.
    pub fn line(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out);
        String::from_utf8_lossy(&out).trim_end().to_string()
    }
}

/// A complete message to hand to `Kst::handle`, once per recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// MAIL FROM without angle brackets; `""` is the null sender `<>`.
    pub sender: String,
    /// The accepted recipients, in RCPT order.
    pub recipients: Vec<String>,
    /// The message, un-dot-stuffed, CRLF line endings as received.
    pub message: Vec<u8>,
}

/// What the server must do after [`Session::ingest`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// All input is consumed: write the output and read more.
    NeedMore,
    /// A message is complete: deliver it for each recipient, then call [`Session::finish`]
    /// and call `ingest` again with the rest of the input.
    Deliver(Transaction),
    /// A message grew past `max_message_size` and was discarded (its `message` is empty):
    /// record it as dropped for each recipient, then call [`Session::finish`] with a `250`
    /// each (never a 5xx: the MTA would bounce the sender's text to a forged sender).
    Oversize(Transaction),
    /// Write the output and close the connection.
    Close,
}

enum Phase {
    /// Reading commands.
    Command,
    /// Discarding the rest of an overlong command line.
    SkipLine,
    /// Reading the message after `354`.
    Data(DataReceiver),
    /// The message grew past the limit: reading it to its end without keeping it.
    DataDiscard(DummyDataReceiver),
    /// Waiting for [`Session::finish`] with this many replies.
    Delivering(usize),
    /// Done: nothing more is read.
    Closed,
}

struct MailTx {
    sender: String,
    recipients: Vec<String>,
}

/// The state of one LMTP conversation.
pub struct Session {
    limits: SessionLimits,
    hostname: String,
    receiver: RequestReceiver,
    phase: Phase,
    lhlo: bool,
    mail: Option<MailTx>,
    data: Vec<u8>,
    out: Vec<u8>,
    errors: u32,
    commands: u32,
    progress: u64,
}

impl Session {
    /// A new session; the `220` greeting is already in the output.
    pub fn new(limits: SessionLimits, hostname: &str) -> Self {
        let mut s = Session {
            limits,
            hostname: clean_hostname(hostname),
            receiver: RequestReceiver::default(),
            phase: Phase::Command,
            lhlo: false,
            mail: None,
            data: Vec::new(),
            out: Vec::new(),
            errors: 0,
            commands: 0,
            progress: 0,
        };
        // No enhanced status code before LHLO has announced them (RFC 2034).
        let greeting = format!("220 {} LMTP kst ready\r\n", s.hostname);
        s.out.extend_from_slice(greeting.as_bytes());
        s
    }

    /// Takes the bytes to write to the client.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// True while a message is being received (the DATA timeout applies).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::DataDiscard(_))
    }

    /// True from MAIL FROM until the transaction's replies are out: shutdown waits for it.
    pub fn in_transaction(&self) -> bool {
        self.mail.is_some() || self.in_data() || matches!(self.phase, Phase::Delivering(_))
    }

    /// True once the session is over (QUIT, too many errors, a close by the server).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// A counter that grows with every complete command and message: the server restarts its
    /// command timeout when it changes.
    pub fn progress(&self) -> u64 {
        self.progress
    }

    /// Ends the session from the server's side (timeout, shutdown) with `reply`.
    pub fn close_with(&mut self, reply: Reply) {
        reply.write_to(&mut self.out);
        self.phase = Phase::Closed;
        self.mail = None;
        self.data = Vec::new();
    }

    /// Consumes `input` up to the next thing the server must do. `accept_rcpt` tells whether a
    /// RCPT TO address is one kst serves (`Kst::service_recipient`).
    pub fn ingest(&mut self, input: &mut Iter<'_, u8>, accept_rcpt: impl Fn(&str) -> bool) -> Step {
        loop {
            match &mut self.phase {
                Phase::Closed => return Step::Close,
                Phase::Delivering(_) => return Step::NeedMore,
                _ if input.as_slice().is_empty() => return Step::NeedMore,
                Phase::SkipLine => {
                    let rest = input.as_slice();
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(pos) => {
                            *input = rest[pos + 1..].iter();
                            self.phase = Phase::Command;
                        }
                        None => *input = [].iter(),
                    }
                }
                Phase::Data(receiver) => {
                    let done = receiver.ingest(input, &mut self.data);
                    if self.data.len() > self.limits.max_message_size {
                        let discard = DummyDataReceiver::new_data(receiver);
                        self.data = Vec::new();
                        if done {
                            return self.oversize();
                        }
                        self.phase = Phase::DataDiscard(discard);
                    } else if done {
                        self.progress += 1;
                        let Some(mail) = self.mail.take() else {
                            // Unreachable: Data is entered only with a transaction.
                            self.phase = Phase::Command;
                            continue;
                        };
                        self.phase = Phase::Delivering(mail.recipients.len());
                        return Step::Deliver(Transaction {
                            sender: mail.sender,
                            recipients: mail.recipients,
                            message: std::mem::take(&mut self.data),
                        });
                    }
                }
                Phase::DataDiscard(receiver) => {
                    if receiver.ingest(input) {
                        return self.oversize();
                    }
                }
                Phase::Command => match self.receiver.ingest(input) {
                    Ok(request) => {
                        let request = request.into_owned();
                        self.progress += 1;
                        self.command(request, &accept_rcpt);
                    }
                    Err(Error::NeedsMoreData { .. }) => return Step::NeedMore,
                    Err(Error::ResponseTooLong) => {
                        self.error(500, [5, 5, 2], "line too long");
                        if !self.is_closed() {
                            self.phase = Phase::SkipLine;
                        }
                    }
                    Err(e) => self.parse_error(e),
                },
            }
        }
    }

    /// Writes the replies of a delivered transaction: one per recipient, in RCPT order. A
    /// missing reply (a bug in the caller) becomes a `451` so that the MTA retries.
    pub fn finish(&mut self, replies: Vec<Reply>) {
        let Phase::Delivering(recipients) = self.phase else {
            return;
        };
        let mut replies = replies.into_iter();
        for _ in 0..recipients {
            let r = replies.next().unwrap_or_else(|| {
                Reply::new(451, [4, 3, 0], "internal error: no result, try again later")
            });
            r.write_to(&mut self.out);
        }
        self.errors = 0;
        self.commands = 0;
        self.phase = Phase::Command;
    }

    /// The end of a discarded oversize message: its transaction, without the message, for
    /// the server to record and acknowledge.
    fn oversize(&mut self) -> Step {
        self.progress += 1;
        self.data = Vec::new();
        let Some(mail) = self.mail.take() else {
            // Unreachable: Data is entered only with a transaction.
            self.phase = Phase::Command;
            return Step::NeedMore;
        };
        self.phase = Phase::Delivering(mail.recipients.len());
        Step::Oversize(Transaction {
            sender: mail.sender,
            recipients: mail.recipients,
            message: Vec::new(),
        })
    }

    fn reply(&mut self, code: u16, esc: [u8; 3], text: impl AsRef<str>) {
        Reply::new(code, esc, text).write_to(&mut self.out);
    }

    /// A refused command: reply, and close once the client has erred too often.
    fn error(&mut self, code: u16, esc: [u8; 3], text: impl AsRef<str>) {
        self.reply(code, esc, text);
        self.errors += 1;
        if self.errors >= self.limits.max_errors {
            self.close_with(Reply::new(421, [4, 7, 0], "too many errors, closing"));
        }
    }

    fn parse_error(&mut self, e: Error) {
        match e {
            Error::UnknownCommand => self.error(500, [5, 5, 1], "unknown command"),
            Error::InvalidSenderAddress => self.error(501, [5, 1, 7], "bad sender address"),
            Error::InvalidRecipientAddress => self.error(501, [5, 1, 3], "bad recipient address"),
            Error::SyntaxError { syntax } => {
                self.error(501, [5, 5, 2], format!("syntax: {syntax}"))
            }
            Error::InvalidParameter { param } => {
                self.error(501, [5, 5, 4], format!("invalid parameter {param}"))
            }
            Error::UnsupportedParameter { param } => {
                self.error(555, [5, 5, 4], format!("unsupported parameter {param}"))
            }
            Error::NeedsMoreData { .. }
            | Error::ResponseTooLong
            | Error::InvalidResponse { .. } => self.error(500, [5, 5, 2], "syntax error"),
        }
    }

    fn command(&mut self, request: Request<String>, accept_rcpt: &impl Fn(&str) -> bool) {
        // Only an accepted recipient is free (there are at most `max_recipients` per MAIL);
        // a refused one (not kst's, over the cap, no MAIL) counts like any other command, or
        // a client could keep a connection slot forever with RCPTs that are never accepted.
        let rcpt_accepted = match &request {
            Request::Rcpt { to } => self.mail.as_ref().is_some_and(|m| {
                m.recipients.len() < self.limits.max_recipients && accept_rcpt(&to.address)
            }),
            _ => false,
        };
        if !rcpt_accepted {
            self.commands += 1;
            if self.commands > self.limits.max_commands {
                self.close_with(Reply::new(
                    421,
                    [4, 7, 0],
                    "too many commands without a message, closing",
                ));
                return;
            }
        }
        match request {
            Request::Lhlo { .. } => {
                self.lhlo = true;
                self.mail = None;
                let mut ehlo = EhloResponse::new(self.hostname.as_str());
                // No SIZE: Postfix's LMTP client would bounce larger mail itself, with the
                // sender's text, to a possibly forged sender. kst reads and drops it instead.
                ehlo.capabilities = EXT_PIPELINING | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES;
                // smtp-proto's first line is a joke ("you had me at EHLO"); write our own
                // and keep its capability lines. Writing into a Vec cannot fail.
                let mut lines = Vec::new();
                let _ = ehlo.write(&mut lines);
                let caps = lines
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(&[][..], |end| &lines[end + 1..]);
                self.out
                    .extend_from_slice(format!("250-{} kst LMTP\r\n", self.hostname).as_bytes());
                self.out.extend_from_slice(caps);
            }
            Request::Helo { .. } | Request::Ehlo { .. } => {
                self.error(500, [5, 5, 1], "this is LMTP: say LHLO (RFC 2033)")
            }
            Request::Mail { from } => {
                if !self.lhlo {
                    self.error(503, [5, 5, 1], "say LHLO first");
                } else if self.mail.is_some() {
                    self.error(503, [5, 5, 1], "nested MAIL command: RSET first");
                } else {
                    // A declared SIZE= over the limit is not refused either: the message is
                    // read, dropped and acknowledged like any other oversize message.
                    self.mail = Some(MailTx {
                        sender: from.address,
                        recipients: Vec::new(),
                    });
                    self.reply(250, [2, 1, 0], "sender OK");
                }
            }
            Request::Rcpt { to } => {
                let max = self.limits.max_recipients;
                match &mut self.mail {
                    None => self.error(503, [5, 5, 1], "need MAIL before RCPT"),
                    Some(mail) if mail.recipients.len() >= max => self.reply(
                        452,
                        [4, 5, 3],
                        format!("too many recipients (at most {max})"),
                    ),
                    Some(mail) => {
                        if rcpt_accepted {
                            mail.recipients.push(to.address);
                            self.reply(250, [2, 1, 5], "recipient OK");
                        } else {
                            let text = format!("<{}>: not a key service address here", to.address);
                            self.reply(550, [5, 1, 1], text);
                        }
                    }
                }
            }
            Request::Data => match &self.mail {
                None => self.error(503, [5, 5, 1], "need MAIL and RCPT before DATA"),
                Some(m) if m.recipients.is_empty() => {
                    self.error(503, [5, 5, 1], "no valid recipients")
                }
                Some(_) => {
                    // RFC 3463 gives no enhanced code to 354.
                    self.out
                        .extend_from_slice(b"354 start mail input; end with <CRLF>.<CRLF>\r\n");
                    self.data = Vec::new();
                    let mut receiver = DataReceiver::new();
                    // The message starts right after the DATA line's CRLF: tell the receiver,
                    // so that a dot on the first line is un-stuffed or ends the message too.
                    let mut scratch = Vec::new();
                    receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
                    self.phase = Phase::Data(receiver);
                }
            },
            Request::Bdat { .. } => {
                // The chunk that follows cannot be read as commands: close.
                self.close_with(Reply::new(
                    503,
                    [5, 5, 1],
                    "BDAT is not offered (no CHUNKING), use DATA; closing",
                ));
            }
            Request::Rset => {
                self.mail = None;
                self.reply(250, [2, 0, 0], "OK");
            }
            Request::Noop { .. } => self.reply(250, [2, 0, 0], "OK"),
            Request::Quit => {
                self.close_with(Reply::new(221, [2, 0, 0], "bye"));
            }
            Request::Vrfy { .. } => self.reply(
                252,
                [2, 5, 0],
                "cannot VRFY, but will accept the message and attempt delivery",
            ),
            Request::Help { .. } => self.reply(
                214,
                [2, 0, 0],
                "kst LMTP (RFC 2033): LHLO MAIL RCPT DATA RSET NOOP VRFY QUIT",
            ),
            Request::StartTls
            | Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error(502, [5, 5, 1], "command not implemented"),
        }
    }
}

/// `hostname` reduced to what may stand in a greeting (letters, digits, `.-_`).
fn clean_hostname(hostname: &str) -> String {
    let h: String = hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(255)
        .collect();
    if h.is_empty() { "localhost".into() } else { h }
}

/// The LMTP reply for one recipient's `Kst::handle` result: `250` once kst decided (oversize
/// mail included: dropped), `5xx` for a recipient that is not kst's, `451` when the store or
/// mailer failed (the MTA retries).
/// `queue_id` names the transaction when the message has no Message-ID.
pub fn delivery_reply(result: &Result<Handled, HandleError>, queue_id: &str) -> Reply {
    match result {
        Ok(h) => {
            let id = h
                .message_id
                .as_deref()
                .map_or_else(|| queue_id.to_string(), |m| format!("<{m}>"));
            let detail = h
                .decision
                .reason()
                .map_or_else(String::new, |r| format!(" ({r})"));
            Reply::new(
                250,
                [2, 0, 0],
                format!("{id} decided: {}{detail}", h.decision.outcome()),
            )
        }
        Err(HandleError::NotForKst(NotForKst::UnknownRecipient)) => {
            Reply::new(550, [5, 1, 1], "not a key service address here")
        }
        Err(HandleError::Temporary(e)) => {
            Reply::new(451, [4, 3, 0], format!("{e}, try again later"))
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
