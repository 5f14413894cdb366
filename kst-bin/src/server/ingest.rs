//! The log line and the metrics of one handled message, the same for both ingest paths
//! (`kst deliver` and the LMTP server).

use std::time::Duration;

use kst_core::service::{HandleError, Handled, ReplyOutcome};
use kst_core::{ComponentKind, Delivery, Error};

use crate::shared::metrics;

/// Where a message came in, for its log line.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The envelope recipient it was handled for.
    pub recipient: &'a str,
    /// The raw message (for the Message-ID of a message kst did not parse).
    pub raw: &'a [u8],
    /// The LMTP transaction id; `None` for `kst deliver`.
    pub queue_id: Option<&'a str>,
    /// The LMTP peer; `None` for `kst deliver`.
    pub peer: Option<&'a str>,
}

/// Logs one `Kst::handle` result and counts it in the metrics (a no-op without the
/// `kst serve` recorder): `message handled` at info (with `reply` = `sent`, `refused` or
/// `none`), a reply the relay refused for good (`kst_mailer_refused_total`, counted by the
/// mailer), `message rejected` (not for kst) and `message deferred` (the MTA retries) at warn.
pub fn record(result: &Result<Handled, HandleError>, origin: &Origin<'_>, elapsed: Duration) {
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    let recipient = origin.recipient;
    let queue_id = origin.queue_id.unwrap_or("-");
    let peer = origin.peer.unwrap_or("-");
    match result {
        Ok(h) => {
            let (kind, outcome) = (h.kind.as_str(), h.decision.outcome());
            metrics::message(kind, outcome, elapsed);
            tracing::info!(
                message_id = h.message_id.as_deref().unwrap_or("-"),
                queue_id,
                recipient,
                kind,
                outcome,
                reason = h.decision.reason().unwrap_or("-"),
                address = %h.decision.address().map_or("-".to_string(), |a| a.to_string()),
                reply = h.reply.as_ref().map_or("none", |r| r.delivery.as_str()),
                duration_ms,
                peer,
                "message handled"
            );
            if let Some(ReplyOutcome {
                to,
                message_id: reply_id,
                delivery: Delivery::Refused { code, text },
            }) = &h.reply
            {
                tracing::warn!(
                    message_id = h.message_id.as_deref().unwrap_or("-"),
                    queue_id,
                    outcome,
                    reply_to = %to,
                    reply_id = %reply_id,
                    code,
                    relay = %text,
                    "the relay refused this reply for good: not sent, the request is decided without it (a forged request's sender, or a recipient or message the relay does not take)"
                );
            }
        }
        Err(HandleError::NotForKst(why)) => {
            metrics::message("other", "rejected", elapsed);
            tracing::warn!(
                message_id = header_message_id(origin.raw).unwrap_or("-"),
                queue_id,
                recipient,
                kind = "other",
                outcome = "rejected",
                reason = %why,
                duration_ms,
                peer,
                "message rejected"
            );
        }
        Err(HandleError::Temporary(e)) => {
            count_failure(e);
            metrics::message("unknown", "deferred", elapsed);
            tracing::warn!(
                message_id = header_message_id(origin.raw).unwrap_or("-"),
                queue_id,
                recipient,
                kind = "unknown",
                outcome = "deferred",
                reason = %e,
                duration_ms,
                peer,
                "message deferred: the MTA will retry"
            );
        }
    }
}

/// Counts a store or mailer failure by the failing component's kind.
fn count_failure(e: &Error) {
    match e.component().map(|c| c.kind()) {
        Some(ComponentKind::Store) => metrics::store_error(),
        Some(ComponentKind::Mailer) => metrics::mailer_error(),
        _ => {}
    }
}

/// The Message-ID header value of a raw message, for log lines of messages kst did not parse.
fn header_message_id(raw: &[u8]) -> Option<&str> {
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        if line.len() > 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            return std::str::from_utf8(&line[11..])
                .ok()
                .map(|v| v.trim().trim_start_matches('<').trim_end_matches('>'))
                .filter(|v| !v.is_empty());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_of_the_header_block_only() {
        let raw = b"From: a@b\r\nMessage-ID: <x@y>\r\n\r\nMessage-ID: <body@z>\r\n";
        assert_eq!(header_message_id(raw), Some("x@y"));
        assert_eq!(
            header_message_id(b"From: a\r\n\r\nMessage-ID: <b@z>\r\n"),
            None
        );
    }
}
