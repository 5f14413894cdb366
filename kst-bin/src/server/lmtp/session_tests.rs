//! Unit tests of the LMTP state machine: whole conversations fed in chunks of every size.

use kst_core::service::{Decision, HandleError, Handled, NotForKst, RequestKind, Silence};
use kst_core::{Address, Error as KstError, Reason};

use super::*;

const LIMITS: SessionLimits = SessionLimits {
    max_message_size: 1000,
    max_recipients: 3,
    max_errors: 5,
    max_commands: 50,
};

fn accept(rcpt: &str) -> bool {
    rcpt.starts_with("keys@")
}

/// Feeds `chunks` in order; every delivery is answered `250 2.0.0 delivered to <rcpt>`.
/// Returns the whole output and the transactions delivered.
fn drive(session: &mut Session, chunks: &[&[u8]]) -> (String, Vec<Transaction>) {
    let mut out = session.take_output();
    let mut delivered = Vec::new();
    'chunks: for chunk in chunks {
        let mut input = chunk.iter();
        loop {
            match session.ingest(&mut input, accept) {
                Step::NeedMore => break,
                Step::Close => {
                    out.extend(session.take_output());
                    break 'chunks;
                }
                Step::Deliver(tx) => {
                    let replies = tx
                        .recipients
                        .iter()
                        .map(|r| Reply::new(250, [2, 0, 0], format!("delivered to {r}")))
                        .collect();
                    delivered.push(tx);
                    session.finish(replies);
                }
                Step::Oversize(tx) => {
                    assert!(tx.message.is_empty(), "an oversize message is not kept");
                    let replies = tx
                        .recipients
                        .iter()
                        .map(|r| Reply::new(250, [2, 0, 0], format!("dropped for {r}")))
                        .collect();
                    session.finish(replies);
                }
            }
        }
        out.extend(session.take_output());
    }
    (
        String::from_utf8(out).expect("replies are ASCII"),
        delivered,
    )
}

fn run(input: &str) -> (String, Vec<Transaction>) {
    drive(
        &mut Session::new(LIMITS, "kst.example.net"),
        &[input.as_bytes()],
    )
}

/// Reply lines without the greeting and the LHLO block.
fn codes(out: &str) -> Vec<&str> {
    let capability = |l: &str| {
        ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE"]
            .iter()
            .any(|c| l.strip_prefix("250 ").is_some_and(|r| r.starts_with(c)))
    };
    out.lines()
        .filter(|l| !l.starts_with("220 ") && !l.starts_with("250-") && !capability(l))
        .collect()
}

const TWO_RCPTS: &str = "LHLO mx.example.net\r\nMAIL FROM:<alice@example.net> SIZE=100\r\nRCPT TO:<keys@example.net>\r\nRCPT TO:<keys@example.org>\r\nDATA\r\nSubject: hi\r\n\r\n..dot-stuffed\r\nbody\r\n.\r\nQUIT\r\n";

#[test]
fn greeting_and_lhlo_capabilities() {
    let (out, _) = run("LHLO mx.example.net\r\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "220 kst.example.net LMTP kst ready");
    assert_eq!(lines[1], "250-kst.example.net kst LMTP", "{out}");
    for cap in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(
            lines.iter().any(|l| l[4..] == *cap),
            "{cap} missing in {out}"
        );
    }
    // No SIZE: the MTA would bounce larger mail itself, to a possibly forged sender.
    assert!(!out.contains("SIZE"), "{out}");
    assert!(lines.last().expect("lines").starts_with("250 "), "{out}");
}

#[test]
fn two_recipients_get_one_reply_each_in_order() {
    let (out, txs) = run(TWO_RCPTS);
    assert_eq!(txs.len(), 1);
    let tx = &txs[0];
    assert_eq!(tx.sender, "alice@example.net");
    assert_eq!(tx.recipients, ["keys@example.net", "keys@example.org"]);
    assert_eq!(tx.message, b"Subject: hi\r\n\r\n.dot-stuffed\r\nbody\r\n");
    assert_eq!(
        codes(&out),
        [
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            "250 2.1.5 recipient OK",
            "354 start mail input; end with <CRLF>.<CRLF>",
            "250 2.0.0 delivered to keys@example.net",
            "250 2.0.0 delivered to keys@example.org",
            "221 2.0.0 bye",
        ]
    );
}

#[test]
fn every_chunking_gives_the_same_conversation() {
    let (whole, txs) = run(TWO_RCPTS);
    for size in [1, 2, 3, 7, 64] {
        let chunks: Vec<&[u8]> = TWO_RCPTS.as_bytes().chunks(size).collect();
        let (out, t) = drive(&mut Session::new(LIMITS, "kst.example.net"), &chunks);
        assert_eq!(out, whole, "chunk size {size}");
        assert_eq!(t, txs, "chunk size {size}");
    }
}

#[test]
fn several_messages_on_one_connection() {
    let one = "MAIL FROM:<a@example.net>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\nx\r\n.\r\n";
    let (out, txs) = run(&format!("LHLO h\r\n{one}{one}{one}QUIT\r\n"));
    assert_eq!(txs.len(), 3, "{out}");
    assert!(txs.iter().all(|t| t.message == b"x\r\n"));
}

#[test]
fn null_sender_is_empty() {
    let (_, txs) =
        run("LHLO h\r\nMAIL FROM:<>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(txs[0].sender, "");
}

#[test]
fn helo_and_ehlo_are_refused() {
    let (out, _) = run("HELO h\r\nEHLO h\r\nMAIL FROM:<a@b.c>\r\n");
    assert_eq!(
        codes(&out),
        [
            "500 5.5.1 this is LMTP: say LHLO (RFC 2033)",
            "500 5.5.1 this is LMTP: say LHLO (RFC 2033)",
            "503 5.5.1 say LHLO first",
        ]
    );
}

#[test]
fn unknown_recipient_and_data_without_recipients() {
    let (out, txs) =
        run("LHLO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nRSET\r\n");
    assert!(txs.is_empty());
    assert_eq!(
        codes(&out),
        [
            "250 2.1.0 sender OK",
            "550 5.1.1 <bob@example.net>: not a key service address here",
            "503 5.5.1 no valid recipients",
            "250 2.0.0 OK",
        ]
    );
}

#[test]
fn sequence_errors() {
    let (out, _) =
        run("LHLO h\r\nRCPT TO:<keys@x>\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n");
    assert_eq!(
        codes(&out),
        [
            "503 5.5.1 need MAIL before RCPT",
            "503 5.5.1 need MAIL and RCPT before DATA",
            "250 2.1.0 sender OK",
            "503 5.5.1 nested MAIL command: RSET first",
        ]
    );
}

#[test]
fn declared_size_over_the_limit_is_not_refused() {
    // A 5xx at MAIL would make the MTA bounce to a possibly forged sender: accept, read, drop.
    let (out, _) = run("LHLO h\r\nMAIL FROM:<a@b.c> SIZE=1001\r\n");
    assert_eq!(codes(&out), ["250 2.1.0 sender OK"]);
}

#[test]
fn oversize_message_is_discarded_and_acknowledged_per_recipient() {
    let big = "y".repeat(600);
    let input = format!(
        "LHLO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@a>\r\nRCPT TO:<keys@b>\r\nDATA\r\n{big}\r\n{big}\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@a>\r\nDATA\r\nsmall\r\n.\r\n"
    );
    for size in [1, 5, 100, input.len()] {
        let chunks: Vec<&[u8]> = input.as_bytes().chunks(size).collect();
        let (out, txs) = drive(&mut Session::new(LIMITS, "h"), &chunks);
        assert_eq!(txs.len(), 1, "only the small message is delivered");
        assert_eq!(txs[0].message, b"small\r\n");
        let c = codes(&out);
        assert_eq!(
            c[4..6],
            [
                "250 2.0.0 dropped for keys@a",
                "250 2.0.0 dropped for keys@b"
            ],
            "{out}"
        );
        assert!(!out.contains("552"), "{out}");
    }
}

#[test]
fn too_many_recipients() {
    let (out, txs) = run(
        "LHLO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@1>\r\nRCPT TO:<keys@2>\r\nRCPT TO:<keys@3>\r\nRCPT TO:<keys@4>\r\nDATA\r\nx\r\n.\r\n",
    );
    assert!(codes(&out).contains(&"452 4.5.3 too many recipients (at most 3)"));
    assert_eq!(txs[0].recipients.len(), 3);
    assert_eq!(
        codes(&out)
            .iter()
            .filter(|l| l.contains("delivered"))
            .count(),
        3
    );
}

#[test]
fn dot_on_first_line_and_empty_message() {
    let (_, txs) = run(
        "LHLO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@a>\r\nDATA\r\n..first\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@a>\r\nDATA\r\n.\r\n",
    );
    assert_eq!(txs.len(), 2);
    assert_eq!(txs[0].message, b".first\r\n");
    assert_eq!(txs[1].message, b"");
}

#[test]
fn bare_lf_dot_does_not_end_the_message() {
    // SMTP smuggling: "\n.\n" and "\r.\r\n" are not the end of data.
    let (out, txs) = run(
        "LHLO h\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<keys@a>\r\nDATA\r\nx\n.\nMAIL FROM:<evil@b.c>\r\nRCPT TO:<keys@b>\r\nDATA\r\ny\r.\r\nz\r\n.\r\n",
    );
    assert_eq!(txs.len(), 1, "{out}");
    assert_eq!(txs[0].recipients, ["keys@a"]);
    assert!(
        txs[0]
            .message
            .starts_with(b"x\n.\nMAIL FROM:<evil@b.c>\r\n")
    );
}

#[test]
fn overlong_line_is_refused_and_its_rest_ignored() {
    let filler = "x".repeat(5000);
    // The rest of the overlong line must not be read as a command.
    let input = format!("LHLO h\r\nNOOP {filler} QUIT\r\nNOOP\r\n");
    for size in [100, 1000, input.len()] {
        let chunks: Vec<&[u8]> = input.as_bytes().chunks(size).collect();
        let mut s = Session::new(LIMITS, "h");
        let (out, _) = drive(&mut s, &chunks);
        assert!(!s.is_closed(), "chunk {size}: {out}");
        assert_eq!(
            codes(&out).last(),
            Some(&"250 2.0.0 OK"),
            "chunk {size}: {out}"
        );
        assert!(!out.contains("221"), "chunk {size}: {out}");
    }
}

#[test]
fn too_many_errors_close_the_session() {
    let mut s = Session::new(LIMITS, "h");
    let (out, _) = drive(&mut s, &[b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n"]);
    assert!(s.is_closed());
    assert_eq!(
        codes(&out).last(),
        Some(&"421 4.7.0 too many errors, closing")
    );
    assert!(
        !out.contains("250 2.0.0 OK"),
        "nothing is read after the close"
    );
}

#[test]
fn too_many_commands_without_a_message_close_the_session() {
    let mut s = Session::new(LIMITS, "h");
    let input = "NOOP\r\n".repeat(60);
    let (out, _) = drive(&mut s, &[input.as_bytes()]);
    assert!(s.is_closed());
    assert_eq!(out.matches("250 2.0.0 OK").count(), 50);
    assert!(out.ends_with("421 4.7.0 too many commands without a message, closing\r\n"));
}

/// Red team round 8: refused recipients (not kst's: 550; over the cap: 452) were not counted
/// as commands, and each one restarted the command timeout, so a client could hold a
/// connection slot forever with RCPTs that are never accepted.
#[test]
fn refused_recipients_count_as_commands() {
    for rcpt in ["bob@example.net", "keys@example.net"] {
        let mut s = Session::new(LIMITS, "h");
        let input = format!(
            "LHLO h\r\nMAIL FROM:<a@b.c>\r\n{}",
            format!("RCPT TO:<{rcpt}>\r\n").repeat(200)
        );
        let (out, _) = drive(&mut s, &[input.as_bytes()]);
        assert!(s.is_closed(), "{rcpt}: {out}");
        assert!(
            out.ends_with("421 4.7.0 too many commands without a message, closing\r\n"),
            "{rcpt}: {out}"
        );
        let refused = out.matches("550 5.1.1").count() + out.matches("452 4.5.3").count();
        // LHLO and MAIL are 2 of the 50 commands; accepted recipients are free.
        assert_eq!(refused, 48, "{rcpt}: {out}");
    }
    // Accepted recipients do not count: a message with the most recipients after 48 commands.
    let mut s = Session::new(LIMITS, "h");
    let input = format!(
        "LHLO h\r\n{}MAIL FROM:<a@b.c>\r\nRCPT TO:<keys@1>\r\nRCPT TO:<keys@2>\r\nRCPT TO:<keys@3>\r\nDATA\r\nx\r\n.\r\n",
        "NOOP\r\n".repeat(46)
    );
    let (out, txs) = drive(&mut s, &[input.as_bytes()]);
    assert!(!s.is_closed(), "{out}");
    assert_eq!(txs.len(), 1, "{out}");
    assert_eq!(txs[0].recipients.len(), 3);
}

#[test]
fn misc_commands() {
    let (out, _) = run(
        "LHLO h\r\nVRFY bob\r\nNOOP\r\nHELP\r\nSTARTTLS\r\nAUTH PLAIN\r\nMAIL FROM:<a@b.c> FOO=1\r\nMAIL FROM:<bad\r\nQUIT\r\nNOOP\r\n",
    );
    let c = codes(&out);
    assert_eq!(
        c[0],
        "252 2.5.0 cannot VRFY, but will accept the message and attempt delivery"
    );
    assert_eq!(c[1], "250 2.0.0 OK");
    assert!(c[2].starts_with("214 2.0.0"));
    assert_eq!(c[3], "502 5.5.1 command not implemented");
    assert_eq!(c[4], "502 5.5.1 command not implemented");
    assert!(
        c[5].starts_with("555 5.5.4 unsupported parameter FOO"),
        "{}",
        c[5]
    );
    assert!(c[6].starts_with("501 "), "{}", c[6]);
    assert_eq!(c[7], "221 2.0.0 bye");
    assert_eq!(c.len(), 8, "nothing after QUIT: {out}");
}

#[test]
fn bdat_closes_the_session() {
    let mut s = Session::new(LIMITS, "h");
    let (out, _) = drive(&mut s, &[b"LHLO h\r\nBDAT 10 LAST\r\nNOOP\r\n"]);
    assert!(s.is_closed());
    assert!(out.ends_with("503 5.5.1 BDAT is not offered (no CHUNKING), use DATA; closing\r\n"));
}

#[test]
fn transaction_state_for_shutdown_and_timeouts() {
    let mut s = Session::new(LIMITS, "h");
    assert!(!s.in_transaction());
    let mut input = b"LHLO h\r\nMAIL FROM:<a@b.c>\r\n".iter();
    assert_eq!(s.ingest(&mut input, accept), Step::NeedMore);
    assert!(s.in_transaction() && !s.in_data());
    let p = s.progress();
    let mut input = b"RCPT TO:<keys@a>\r\nDATA\r\npartial".iter();
    assert_eq!(s.ingest(&mut input, accept), Step::NeedMore);
    assert!(s.in_data());
    assert!(s.progress() > p);
    let mut input = b" line\r\n.\r\nNOOP\r\n".iter();
    let Step::Deliver(tx) = s.ingest(&mut input, accept) else {
        panic!("expected a delivery");
    };
    assert_eq!(tx.message, b"partial line\r\n");
    assert!(
        s.in_transaction(),
        "still in it until the replies are written"
    );
    // Nothing is read while the delivery is pending.
    assert_eq!(s.ingest(&mut input, accept), Step::NeedMore);
    assert_eq!(input.as_slice(), b"NOOP\r\n");
    s.finish(vec![]);
    assert!(!s.in_transaction());
    assert!(
        String::from_utf8(s.take_output())
            .expect("ascii")
            .ends_with("451 4.3.0 internal error: no result, try again later\r\n")
    );
    s.close_with(Reply::new(421, [4, 4, 2], "timeout"));
    assert!(s.is_closed());
    assert_eq!(s.ingest(&mut input, accept), Step::Close);
}

#[test]
fn reply_text_is_one_safe_line() {
    let r = Reply::new(451, [4, 3, 0], "store down:\r\n250 fake\tü");
    assert_eq!(r.line(), "451 4.3.0 store down:  250 fake ?");
    assert_eq!(
        Reply::new(250, [2, 0, 0], "x".repeat(1000)).text.len(),
        MAX_REPLY_TEXT
    );
}

fn handled(message_id: Option<&str>, decision: Decision) -> Result<Handled, HandleError> {
    Ok(Handled {
        message_id: message_id.map(str::to_string),
        kind: RequestKind::Publication,
        decision,
        reply: None,
    })
}

#[test]
fn delivery_replies() {
    let addr = Address::from_normalized("alice@example.net").expect("address");
    let published = Decision::Published {
        address: addr,
        version: 1,
        fingerprint: "AB".into(),
        new_version: true,
    };
    assert_eq!(
        delivery_reply(&handled(Some("id@x"), published.clone()), "Q1").line(),
        "250 2.0.0 <id@x> decided: published"
    );
    assert_eq!(
        delivery_reply(&handled(None, published), "Q1").line(),
        "250 2.0.0 Q1 decided: published"
    );
    assert_eq!(
        delivery_reply(
            &handled(
                None,
                Decision::Refused {
                    reason: Reason::BadKey
                }
            ),
            "Q1"
        )
        .line(),
        "250 2.0.0 Q1 decided: refused (bad-key)"
    );
    assert_eq!(
        delivery_reply(&handled(None, Decision::Ignored(Silence::NullSender)), "Q").line(),
        "250 2.0.0 Q decided: ignored (null-sender)"
    );
    assert_eq!(
        delivery_reply(&handled(None, Decision::Ignored(Silence::TooLarge)), "Q").line(),
        "250 2.0.0 Q decided: ignored (too-large)"
    );
    assert_eq!(
        delivery_reply(&Err(NotForKst::UnknownRecipient.into()), "Q").line(),
        "550 5.1.1 not a key service address here"
    );
    let temp = delivery_reply(
        &Err(HandleError::Temporary(KstError::unavailable(
            "store(fs)",
            "disk gone",
        ))),
        "Q",
    );
    assert_eq!(temp.code, 451);
    assert_eq!(temp.esc, [4, 3, 0]);
    assert!(
        temp.text.starts_with("store(fs) unavailable: disk gone"),
        "{}",
        temp.text
    );
    assert!(temp.text.ends_with(", try again later"));
}

/// xorshift64: deterministic noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn hostile_input_never_panics_and_every_reply_is_well_formed() {
    const PIECES: &[&str] = &[
        "LHLO h\r\n",
        "MAIL FROM:<a@b.c>\r\n",
        "MAIL FROM:<> SIZE=99999999999999999999\r\n",
        "RCPT TO:<keys@a>\r\n",
        "RCPT TO:<x@y>\r\n",
        "DATA\r\n",
        "BDAT 5\r\n",
        ".\r\n",
        "..\r\n",
        "\r\n.\r\n",
        "\n.\n",
        "\r",
        "\n",
        "RSET\r\n",
        "NOOP\r\n",
        "QUIT\r\n",
        "\u{0}\u{ff}",
        "é",
        "RCPT TO:<\r\n",
        "MAIL FROM:<a@b.c> BODY=FOO\r\n",
    ];
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    for _ in 0..300 {
        let mut input = Vec::new();
        for _ in 0..noise.below(60) {
            if noise.below(10) == 0 {
                let n = noise.below(5000);
                input.extend((0..n).map(|_| noise.next() as u8));
            } else {
                input.extend_from_slice(PIECES[noise.below(PIECES.len())].as_bytes());
            }
        }
        let mut s = Session::new(LIMITS, "h");
        let mut out = s.take_output();
        let mut rest: &[u8] = &input;
        while !rest.is_empty() && !s.is_closed() {
            let (chunk, tail) = rest.split_at(1 + noise.below(rest.len().min(700)));
            rest = tail;
            let mut it = chunk.iter();
            loop {
                match s.ingest(&mut it, accept) {
                    Step::NeedMore | Step::Close => break,
                    Step::Deliver(tx) | Step::Oversize(tx) => {
                        assert!(tx.message.len() <= LIMITS.max_message_size);
                        assert!(!tx.recipients.is_empty());
                        s.finish(vec![]);
                    }
                }
            }
            out.extend(s.take_output());
        }
        let text = String::from_utf8(out).expect("replies are ASCII");
        for line in text.split_terminator("\r\n") {
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            assert!(
                code.is_some_and(|c| (200..600).contains(&c)),
                "bad reply line {line:?}"
            );
            assert!(
                matches!(line.as_bytes().get(3), Some(b' ' | b'-')),
                "{line:?}"
            );
            assert!(!line.contains(['\r', '\n']));
        }
    }
}
