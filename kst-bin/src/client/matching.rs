//! Which pending request a message in the mailbox answers: a KST reply (its `In-Reply-To` is
//! the request's Message-ID, verified by `kst-core`), or a bounce (a delivery status
//! notification that quotes the request), which means the provider runs no KST.

use kst_core::client::{Pending, ReplyError, Verified, verify_reply_with_answer};
use mail_parser::{MessageParser, MimeHeaders};

/// What a message means for one pending request.
#[derive(Debug)]
pub enum Matched {
    /// A reply to the request, with the result of verifying it.
    Reply {
        /// The request's Message-ID.
        message_id: String,
        /// Verified, or why not.
        result: Result<Verified, ReplyError>,
        /// The key directory's answer the verified reply carried (protocol version 3), whose
        /// hash its HMAC covers; checked against the head key by the caller.
        log_answer: Option<String>,
        /// The reply as read (at most the mailbox's size limit), for the DKIM check.
        raw: Vec<u8>,
        /// The reply's own Message-ID (without `<>`), when it has a readable one: named in
        /// the evidence a failed key directory check keeps.
        reply_id: Option<String>,
    },
    /// The request bounced: the provider runs no KST (or `keys@` does not take mail).
    Bounce {
        /// The request's Message-ID.
        message_id: String,
        /// The bounce's diagnostic (`Diagnostic-Code:` or `Status:`), if it has one.
        detail: String,
    },
}

impl Matched {
    /// The request it is about.
    pub fn message_id(&self) -> &str {
        match self {
            Matched::Reply { message_id, .. } | Matched::Bounce { message_id, .. } => message_id,
        }
    }
}

/// Classifies `raw` against the pending requests; `None` when it concerns none of them (or is a
/// mere delay warning).
pub fn classify<'a>(pending: impl IntoIterator<Item = &'a Pending>, raw: &[u8]) -> Option<Matched> {
    let msg = MessageParser::default().parse(raw)?;
    let in_reply_to = msg.in_reply_to().as_text().map(str::to_string);
    let pending: Vec<&Pending> = pending.into_iter().collect();
    let dsn = is_dsn(&msg);
    if let Some(irt) = in_reply_to.as_deref()
        && let Some(p) = pending.iter().find(|p| p.message_id == irt)
    {
        let result = verify_reply_with_answer(p, raw);
        if dsn && matches!(result, Err(ReplyError::NotKst)) {
            return bounce(p, raw);
        }
        let (result, log_answer) = match result {
            Ok(r) => (Ok(r.verified), r.log_answer),
            Err(e) => (Err(e), None),
        };
        return Some(Matched::Reply {
            message_id: p.message_id.clone(),
            result,
            log_answer,
            raw: raw.to_vec(),
            reply_id: msg.message_id().and_then(readable_id),
        });
    }
    if !dsn {
        return None;
    }
    let text = String::from_utf8_lossy(raw);
    let p = pending
        .iter()
        .find(|p| text.contains(&format!("<{}>", p.message_id)))?;
    bounce(p, raw)
}

/// The longest reply Message-ID kept (RFC 5322 lines are at most 998 characters).
const MAX_REPLY_ID: usize = 256;

/// A Message-ID as kept in evidence: printable ASCII without `<>` and spaces, at most
/// [`MAX_REPLY_ID`] characters; anything else is not kept (`None`).
fn readable_id(id: &str) -> Option<String> {
    (!id.is_empty()
        && id.len() <= MAX_REPLY_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>'))
    .then(|| id.to_string())
}

fn bounce(p: &Pending, raw: &[u8]) -> Option<Matched> {
    let text = String::from_utf8_lossy(raw);
    // Header-style fields of the delivery-status part, folded lines unfolded.
    let mut unfolded: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        match unfolded.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) && !line.trim().is_empty() => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => unfolded.push(line.to_string()),
        }
    }
    let field = |name: &str| {
        unfolded
            .iter()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .collect::<Vec<_>>()
    };
    let actions = field("Action");
    if !actions.is_empty() && actions.iter().all(|a| !a.eq_ignore_ascii_case("failed")) {
        // "delayed", "delivered", "relayed", "expanded": not a failure (yet).
        return None;
    }
    let detail = field("Diagnostic-Code")
        .into_iter()
        .next()
        .or_else(|| field("Status").into_iter().next())
        .unwrap_or_default();
    Some(Matched::Bounce {
        message_id: p.message_id.clone(),
        detail,
    })
}

/// True for a delivery status notification (RFC 3464 `multipart/report;
/// report-type=delivery-status`), or a classic bounce from MAILER-DAEMON.
fn is_dsn(msg: &mail_parser::Message<'_>) -> bool {
    if let Some(ct) = msg.content_type()
        && ct.ctype().eq_ignore_ascii_case("multipart")
        && ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        && ct
            .attribute("report-type")
            .is_some_and(|r| r.eq_ignore_ascii_case("delivery-status"))
    {
        return true;
    }
    let from_daemon = msg
        .from()
        .and_then(|f| f.first())
        .and_then(|a| a.address())
        .is_some_and(|a| {
            let local = a.split('@').next().unwrap_or("");
            local.eq_ignore_ascii_case("mailer-daemon")
        });
    from_daemon
        && msg
            .return_path()
            .as_text()
            .is_none_or(|rp| rp.trim().is_empty() || rp.trim() == "<>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::Address;
    use kst_core::client::build_retrieval;

    fn pending(to: &str) -> Pending {
        build_retrieval(
            &Address::from_normalized("carol@acme.net").unwrap(),
            &Address::from_normalized(to).unwrap(),
        )
        .pending
    }

    fn dsn(id: &str, action: &str) -> Vec<u8> {
        format!(
            "From: MAILER-DAEMON@mail.acme.net (Mail Delivery System)\r\n\
To: carol@acme.net\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mail.acme.net\r\n\
\r\n\
Final-Recipient: rfc822; keys@example.org\r\n\
Action: {action}\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <keys@example.org>:\r\n    Recipient address rejected\r\n\
\r\n\
--B\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: carol@acme.net\r\n\
To: keys@example.org\r\n\
Message-ID: <{id}>\r\n\
Subject: Key request\r\n\
--B--\r\n"
        )
        .into_bytes()
    }

    fn reply(in_reply_to: &str, kst: bool) -> Vec<u8> {
        format!(
            "From: keys@example.org\r\nTo: carol@acme.net\r\nMessage-ID: <r1@example.org>\r\nIn-Reply-To: <{in_reply_to}>\r\n{}Subject: x\r\n\r\nhello\r\n",
            if kst { "KST-Protocol: 1\r\nKST-Status: not-found\r\nKST-Address: bob@example.org\r\n" } else { "" }
        )
        .into_bytes()
    }

    /// Review F6: only a readable Message-ID is kept for the evidence.
    #[test]
    fn only_a_readable_reply_id_is_kept() {
        assert_eq!(
            readable_id("r1@example.org").as_deref(),
            Some("r1@example.org")
        );
        for bad in ["", "a b@x", "a\nb@x", "<a@x>", "a\u{e9}@x"] {
            assert_eq!(readable_id(bad), None, "{bad:?}");
        }
        assert_eq!(readable_id(&"a".repeat(MAX_REPLY_ID + 1)), None);
    }

    #[test]
    fn a_bounce_quoting_the_request_means_no_kst() {
        let p = pending("bob@example.org");
        let other = pending("dave@example.org");
        let m = classify([&other, &p], &dsn(&p.message_id, "failed")).unwrap();
        match m {
            Matched::Bounce { message_id, detail } => {
                assert_eq!(message_id, p.message_id);
                assert!(
                    detail.contains("550 5.1.1 <keys@example.org>: Recipient address rejected"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_delay_warning_or_a_bounce_of_another_message_is_ignored() {
        let p = pending("bob@example.org");
        assert!(classify([&p], &dsn(&p.message_id, "delayed")).is_none());
        assert!(classify([&p], &dsn("other-id@acme.net", "failed")).is_none());
    }

    #[test]
    fn replies_are_matched_by_in_reply_to_only() {
        let p = pending("bob@example.org");
        // Right In-Reply-To, KST headers, no valid HMAC: verified and refused as an attack.
        match classify([&p], &reply(&p.message_id, true)).unwrap() {
            Matched::Reply {
                message_id,
                result,
                reply_id,
                ..
            } => {
                assert_eq!(message_id, p.message_id);
                assert_eq!(result.unwrap_err(), ReplyError::BadHmac);
                assert_eq!(reply_id.as_deref(), Some("r1@example.org"));
            }
            other => panic!("{other:?}"),
        }
        // Right In-Reply-To, no KST headers: not a KST.
        match classify([&p], &reply(&p.message_id, false)).unwrap() {
            Matched::Reply { result, .. } => assert_eq!(result.unwrap_err(), ReplyError::NotKst),
            other => panic!("{other:?}"),
        }
        // Wrong In-Reply-To, or none, or not mail at all: not ours.
        assert!(classify([&p], &reply("someone-else@acme.net", true)).is_none());
        assert!(classify([&p], b"Subject: hi\r\n\r\nno headers of interest\r\n").is_none());
        assert!(classify([&p], b"").is_none());
        assert!(classify([], &reply(&p.message_id, true)).is_none());
    }
}
