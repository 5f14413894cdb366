//! Protocol version 3 through [`crate::Kst::handle`] with in-memory fakes: a KST whose domain
//! has a key directory ([`LogAnswers`]) answers a request offering 3 in 3, with the
//! directory's answer after the HMAC line and its hash under the HMAC; the client refuses a
//! reply whose answer was stripped, swapped or damaged, and any reply in an older version
//! (no downgrade). The answers here are opaque text: the real directory's proofs are checked
//! through the real binaries (tests/transparency.rs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::client::{self, ReplyError, Verified};
use crate::error::{Component, Error};
use crate::protocol::{LOG_ANSWER_BEGIN, LOG_ANSWER_END, LOG_ANSWER_LINE, LogAsk, Reason};
use crate::reply::{DirectoryAnswer, LogAnswers, Proven, fold_log_answer};
use crate::service::tests::{Fixture, addr, env, fixture, received};
use crate::service::{Decision, HandleError};
use crate::store::KeyStore;
use crate::testing::MemoryStore;
use crate::{Address, client::Pending};

const ALICE: &str = include_str!("../testdata/alice.pub.asc");
const HEAD_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A key directory for example.net that answers a text naming the address (with a long
/// line, as a real proof's base64 is) and proves what `store` holds for it, as an honest
/// directory that recorded every change does; or fails while `down`.
#[derive(Default)]
struct FakeLog {
    store: Arc<MemoryStore>,
    /// When set, what every answer proves instead (a directory behind or ahead of the store).
    proves: std::sync::Mutex<Option<Proven>>,
    down: AtomicBool,
    asked: AtomicUsize,
    /// What each request asked of the answer (`KST-Log-*` headers).
    asks: std::sync::Mutex<Vec<LogAsk>>,
}

#[async_trait::async_trait]
impl LogAnswers for FakeLog {
    fn has_directory(&self, domain: &str) -> bool {
        domain == "example.net"
    }

    async fn answer(
        &self,
        address: &Address,
        ask: LogAsk,
        _asker: &str,
    ) -> Result<DirectoryAnswer, Error> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.asks.lock().unwrap().push(ask);
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable(
                Component::other("key directory"),
                "the test directory is down",
            ));
        }
        let proves = *self.proves.lock().unwrap();
        Ok(DirectoryAnswer {
            text: answer_for(address.as_str()),
            proven: match proves {
                Some(proven) => proven,
                None => Proven::of_record(self.store.get(address).await?.as_ref()),
            },
        })
    }

    async fn pause(&self, pause: std::time::Duration) {
        tokio::time::sleep(pause).await;
    }
}

fn answer_for(address: &str) -> String {
    // The last line has a space at every other position, so folds fall next to spaces (as
    // in a witness's `cosigned` line): none may be lost.
    format!(
        "kst-log-answer-v1\ndomain example.net\nepoch 7\nfor {address}\npresent {}\nx{}\n",
        "QUJD".repeat(700),
        " y".repeat(200)
    )
}

fn with_log(f: Fixture) -> (Fixture, Arc<FakeLog>) {
    let log = Arc::new(FakeLog {
        store: f.store.clone(),
        ..FakeLog::default()
    });
    let kst = f.kst.clone().with_log_answers(log.clone());
    (Fixture { kst, ..f }, log)
}

fn reply_text(f: &Fixture) -> String {
    String::from_utf8(f.last_reply().message).unwrap()
}

/// Alice publishes in version 3; returns the fixture and her confirmation.
async fn published() -> (Fixture, Arc<FakeLog>, Pending, String) {
    let (f, log) = with_log(fixture());
    let req =
        client::build_publication_with(&addr("alice@example.net"), ALICE, Some(HEAD_KEY)).unwrap();
    let text = String::from_utf8(req.message.clone()).unwrap();
    assert!(text.contains("KST-Protocol: 3, 2, 1\r\n"), "{text}");
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(&req.message);
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(h.decision, Decision::Published { .. }), "{h:?}");
    let reply = reply_text(&f);
    (f, log, req.pending, reply)
}

/// Carol's version 3 retrieval of `address`.
fn carol_asks(address: &str) -> client::Request {
    client::build_retrieval_with(&addr("carol@acme.net"), &addr(address), Some(HEAD_KEY))
}

/// What the KST answers Carol's request `req`.
async fn answered(f: &Fixture, req: &client::Request) -> String {
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    reply_text(f)
}

/// Carol's version 3 retrieval of `address`, answered; returns her pending request and the reply.
async fn retrieved(f: &Fixture, address: &str) -> (Pending, String) {
    let req = carol_asks(address);
    let reply = answered(f, &req).await;
    (req.pending, reply)
}

/// The answer block of a reply (from its begin line to its end line, CRLF).
fn block(reply: &str) -> String {
    let begin = reply.find(LOG_ANSWER_BEGIN).expect("an answer block");
    let end = reply.find(LOG_ANSWER_END).expect("an end line") + LOG_ANSWER_END.len();
    reply[begin..end].to_string()
}

#[tokio::test]
async fn every_reply_about_an_address_carries_the_answer_under_the_hmac() {
    let (f, _log, pending, reply) = published().await;
    assert!(reply.contains("KST-Protocol: 3\r\n"), "{reply}");
    assert!(reply.contains("KST-MAC: hmac-sha256\r\n"), "{reply}");
    // The block follows the HMAC line, folded: no line longer than the fold width.
    let tag_at = reply.find("-----END PGP PUBLIC KEY BLOCK-----").unwrap();
    assert!(reply.find(LOG_ANSWER_BEGIN).unwrap() > tag_at, "{reply}");
    assert!(
        block(&reply)
            .lines()
            .all(|l| l.trim_end().len() <= LOG_ANSWER_LINE),
        "{reply}"
    );
    let r = client::verify_reply_with_answer(&pending, reply.as_bytes()).unwrap();
    assert!(matches!(r.verified, Verified::Published { .. }), "{r:?}");
    assert_eq!(
        r.log_answer.as_deref(),
        Some(answer_for("alice@example.net").as_str())
    );

    // Found and not-found.
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    let r = client::verify_reply_with_answer(&pending, reply.as_bytes()).unwrap();
    assert!(matches!(r.verified, Verified::Found { .. }), "{r:?}");
    assert_eq!(r.log_answer.unwrap(), answer_for("alice@example.net"));
    let (pending, reply) = retrieved(&f, "nobody@example.net").await;
    let r = client::verify_reply_with_answer(&pending, reply.as_bytes()).unwrap();
    assert!(matches!(r.verified, Verified::NotFound { .. }), "{r:?}");
    assert_eq!(r.log_answer.unwrap(), answer_for("nobody@example.net"));

    // A deletion's confirmation.
    let req = client::build_deletion_with(&addr("alice@example.net"), Some(HEAD_KEY));
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(&req.message);
    f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    let reply = reply_text(&f);
    let r = client::verify_reply_with_answer(&req.pending, reply.as_bytes()).unwrap();
    assert!(matches!(r.verified, Verified::Deleted { .. }), "{r:?}");
    assert_eq!(r.log_answer.unwrap(), answer_for("alice@example.net"));
}

#[tokio::test]
async fn a_stripped_swapped_or_altered_answer_is_refused() {
    let (f, _log, _, _) = published().await;
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    let (_, other) = retrieved(&f, "nobody@example.net").await;
    // Stripped: the block removed (with the blank line before it).
    let stripped = reply.replace(&format!("\r\n{}\r\n", block(&reply)), "\r\n");
    assert_ne!(stripped, reply);
    assert!(matches!(
        client::verify_reply(&pending, stripped.as_bytes()),
        Err(ReplyError::MissingProof(_))
    ));
    // Swapped for the answer of another reply (a captured one about another address).
    let swapped = reply.replace(&block(&reply), &block(&other));
    assert_ne!(swapped, reply);
    assert_eq!(
        client::verify_reply(&pending, swapped.as_bytes()),
        Err(ReplyError::BadHmac)
    );
    // One character of the proof changed; a line folded differently is the same answer.
    let b = block(&reply);
    let altered = reply.replace(&b, &b.replacen("QUJD", "QUJE", 1));
    assert_eq!(
        client::verify_reply(&pending, altered.as_bytes()),
        Err(ReplyError::BadHmac)
    );
    let refolded = reply.replace(&b, &b.replacen("QUJD", "QU\r\n JD", 1));
    assert!(
        client::verify_reply(&pending, refolded.as_bytes()).is_ok(),
        "{refolded}"
    );
    // The whole reply replayed for another request with the same K_auth is not this one.
    let (carol2, _) = retrieved(&f, "alice@example.net").await;
    assert!(client::verify_reply(&carol2, reply.as_bytes()).is_err());
}

#[tokio::test]
async fn a_version_3_client_refuses_older_versions() {
    // A KST without a directory answers in version 2: a downgrade for this client.
    let f = fixture();
    let req = carol_asks("alice@example.net");
    let reply = answered(&f, &req).await;
    assert!(reply.contains("KST-Protocol: 2\r\n"), "{reply}");
    assert_eq!(
        client::verify_reply(&req.pending, reply.as_bytes()),
        Err(ReplyError::Downgrade("2".into()))
    );
    // A version 3 reply relabelled 2 or 1: the same.
    let (f, _log, _, _) = published().await;
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    for v in ["1", "2"] {
        let relabelled = reply.replace("KST-Protocol: 3\r\n", &format!("KST-Protocol: {v}\r\n"));
        assert_eq!(
            client::verify_reply(&pending, relabelled.as_bytes()),
            Err(ReplyError::Downgrade(v.into()))
        );
    }
    // And a client that did not offer 3 does not take a version 3 reply.
    let mut v2 = pending.clone();
    v2.head_key = None;
    assert_eq!(
        client::verify_reply(&v2, reply.as_bytes()),
        Err(ReplyError::Version("3".into()))
    );
    // An old request to the KST with a directory is answered as before, without an answer.
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let reply = answered(&f, &req).await;
    assert!(reply.contains("KST-Protocol: 2\r\n"), "{reply}");
    assert!(!reply.contains(LOG_ANSWER_BEGIN), "{reply}");
    let r = client::verify_reply_with_answer(&req.pending, reply.as_bytes()).unwrap();
    assert_eq!(r.log_answer, None);
}

#[tokio::test]
async fn a_directory_that_cannot_be_read_defers_the_request() {
    let (f, log) = with_log(fixture());
    log.down.store(true, Ordering::SeqCst);
    let req = carol_asks("alice@example.net");
    let result = f.kst.handle(&env("carol@acme.net"), &req.message).await;
    assert!(
        matches!(result, Err(HandleError::Temporary(ref e)) if e.is_temporary()),
        "{result:?}"
    );
    assert_eq!(f.sent(), 0, "no reply without proofs");
    assert_eq!(log.asked.load(Ordering::SeqCst), 1);
    // A version 2 request is answered without asking the directory.
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    assert_eq!(f.sent(), 1);
    assert_eq!(log.asked.load(Ordering::SeqCst), 1);
}

/// The copy attack of tests/dkim.rs: Mallory sends a copy of Carol's request (her Message-ID
/// and K_auth) with another question. In version 3 the tag binds the question, so what kst
/// answers the copy does not verify for Carol.
#[tokio::test]
async fn an_answer_made_for_a_copy_with_another_question_does_not_verify() {
    let (f, _log, _, _) = published().await;
    let carol = carol_asks("bob@example.net");
    let text = String::from_utf8(carol.message.clone()).unwrap();
    for query in ["not an address", "alice@example.net", "bob@example.org"] {
        let forged = text.replace("\r\nbob@example.net\r\n", &format!("\r\n{query}\r\n"));
        assert_ne!(forged, text);
        f.kst
            .handle(&env("mallory@example.net"), forged.as_bytes())
            .await
            .unwrap();
        let reply = reply_text(&f);
        let v = client::verify_reply(&carol.pending, reply.as_bytes());
        assert!(
            matches!(v, Err(ReplyError::BadHmac | ReplyError::KeyMismatch(_))),
            "{query}: {v:?}\n{reply}"
        );
    }
    // As a deletion (refused: not authenticated): another question as well.
    let forged = text.replace("\r\nbob@example.net\r\n", "\r\nDELETE\r\n");
    f.kst
        .handle(&env("mallory@example.net"), forged.as_bytes())
        .await
        .unwrap();
    let reply = reply_text(&f);
    assert!(reply.contains("KST-Reason: not-authenticated"), "{reply}");
    assert_eq!(
        client::verify_reply(&carol.pending, reply.as_bytes()),
        Err(ReplyError::BadHmac)
    );
    // The genuine refusal of Carol's own question still verifies.
    let own = carol_asks("bob@example.org");
    f.kst
        .handle(&env("carol@acme.net"), &own.message)
        .await
        .unwrap();
    match client::verify_reply(&own.pending, reply_text(&f).as_bytes()) {
        Ok(Verified::Refused {
            reason: Some(Reason::DomainNotServed),
            authenticated: true,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// Hostile answer blocks: unterminated, continuation first, blank lines, oversized, binary,
/// nested markers. Each is an error, never a panic, never an accepted reply.
#[tokio::test]
async fn hostile_answer_blocks_are_refused_without_panicking() {
    let (f, _log, _, _) = published().await;
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    let b = block(&reply);
    // 30000 lines of 76 characters: over the 2 MiB bound (and under the reply's 4 MiB).
    let huge = format!(
        "{LOG_ANSWER_BEGIN}\r\n{}{LOG_ANSWER_END}",
        format!("{}\r\n", "Q".repeat(76)).repeat(30_000)
    );
    let cases = [
        b.replace(LOG_ANSWER_END, ""),
        b.replace(
            &format!("{LOG_ANSWER_BEGIN}\r\n"),
            &format!("{LOG_ANSWER_BEGIN}\r\n continued\r\n"),
        ),
        b.replace("epoch 7\r\n", "epoch 7\r\n\r\n"),
        format!("{LOG_ANSWER_BEGIN}\r\n{LOG_ANSWER_END}"),
        huge,
        b.replace("epoch 7", "epoch \u{0}\u{7f}\u{1F600}"),
        b.replace("epoch 7", LOG_ANSWER_BEGIN),
        format!("{LOG_ANSWER_END}\r\n{LOG_ANSWER_BEGIN}"),
    ];
    for (i, case) in cases.iter().enumerate() {
        let hostile = reply.replace(&b, case);
        assert_ne!(hostile, reply, "case {i}");
        let v = client::verify_reply_with_answer(&pending, hostile.as_bytes());
        assert!(
            matches!(
                v,
                Err(ReplyError::MissingProof(_) | ReplyError::BadHmac | ReplyError::Malformed(_))
            ),
            "case {i}: {v:?}"
        );
    }
    // Folding round-trips any text, also lines of exactly the fold width and longer.
    for len in [
        0,
        1,
        LOG_ANSWER_LINE - 1,
        LOG_ANSWER_LINE,
        LOG_ANSWER_LINE + 1,
        1000,
    ] {
        let text = format!("first\n{}\nlast\n", "x".repeat(len.max(1)));
        let folded = fold_log_answer(&text);
        let lines: Vec<&str> = folded.lines().collect();
        let inner = &lines[1..lines.len() - 1];
        let unfolded = inner.iter().fold(String::new(), |mut acc, l| {
            match l.strip_prefix(' ') {
                Some(rest) => {
                    acc.pop();
                    acc.push_str(rest);
                }
                None => acc.push_str(l),
            }
            acc.push('\n');
            acc
        });
        assert_eq!(unfolded, text, "{len}");
    }
}

/// The `KST-Log-*` headers reach the directory (version 3 only), bad values are ignored and
/// the request is still answered (header fuzz: huge epoch, non-digits, repeated header).
#[tokio::test]
async fn log_headers_reach_the_directory_and_bad_ones_are_ignored() {
    let (f, log) = with_log(fixture());
    let ask = |since: Option<u64>, witnessed: bool| LogAsk { since, witnessed };
    let req = carol_asks("alice@example.net").with_log_ask(ask(Some(41), true));
    let text = String::from_utf8(req.message.clone()).unwrap();
    assert!(text.contains("KST-Log-Since: 41\r\n"), "{text}");
    assert!(text.contains("KST-Log-Witnessed: 1\r\n"), "{text}");
    let reply = answered(&f, &req).await;
    client::verify_reply_with_answer(&req.pending, reply.as_bytes()).unwrap();
    assert_eq!(log.asks.lock().unwrap().pop(), Some(ask(Some(41), true)));

    // Hostile values: the request is answered in version 3, as if the header were absent
    // (each about another address: the rate limit per requester and address).
    let huge = "9".repeat(100_000);
    for (i, headers) in [
        "KST-Log-Since: 99999999999999999999999\r\n".to_string(),
        "KST-Log-Since: 18446744073709551616\r\n".into(),
        format!("KST-Log-Since: {huge}\r\n"),
        "KST-Log-Since: -3\r\nKST-Log-Witnessed: yes\r\n".into(),
        "KST-Log-Since: 5\r\nKST-Log-Since: 6\r\n".into(),
        "KST-Log-Since: 5\r\n 6\r\n".into(),
        "KST-Log-Witnessed: 1\r\nKST-Log-Witnessed: 1\r\n".into(),
        "KST-Log-Since: \u{663}\r\n".into(),
    ]
    .into_iter()
    .enumerate()
    {
        let req = carol_asks(&format!("q{i}@example.net"));
        let mut raw = headers.clone().into_bytes();
        raw.extend_from_slice(&req.message);
        let h = f.kst.handle(&env("carol@acme.net"), &raw).await.unwrap();
        assert!(
            matches!(h.decision, Decision::Answered { .. }),
            "{headers}: {h:?}"
        );
        let reply = reply_text(&f);
        client::verify_reply_with_answer(&req.pending, reply.as_bytes())
            .unwrap_or_else(|e| panic!("{headers}: {e}"));
        assert_eq!(
            log.asks.lock().unwrap().pop(),
            Some(LogAsk::default()),
            "{headers}"
        );
    }

    // Below version 3 the headers are not read (and nothing is asked of the directory).
    let before = log.asked.load(Ordering::SeqCst);
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let mut raw = b"KST-Log-Since: 3\r\n".to_vec();
    raw.extend_from_slice(&req.message);
    f.kst.handle(&env("carol@acme.net"), &raw).await.unwrap();
    assert!(reply_text(&f).contains("KST-Protocol: 2\r\n"));
    assert_eq!(log.asked.load(Ordering::SeqCst), before);
    // `with_log_ask` adds nothing to a request below version 3.
    let plain = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let before = plain.message.clone();
    assert_eq!(plain.with_log_ask(ask(Some(3), true)).message, before);
}

/// The reply serves what the answer proves, not what the store holds (docs/PROTOCOL.md,
/// "Versions"): a directory one version behind the store (a publication between its store
/// write and its epoch) gets the older version served from the store's history, or "not
/// found" for a first key; a proven key the store does not hold is read again and then a
/// temporary failure, nothing sent; a confirmation whose answer proves a newer deletion is
/// not sent (`superseded`).
#[tokio::test]
async fn the_reply_serves_what_the_answer_proves() {
    let (f, log, _, _) = published().await;
    let first = f
        .store
        .get(&addr("alice@example.net"))
        .await
        .unwrap()
        .unwrap();
    // Another primary key for alice, version 2, with the directory still at version 1.
    let other = include_str!("../testdata/keys/lifecycle-v1.pub.asc");
    let req =
        client::build_publication_with(&addr("alice@example.net"), other, Some(HEAD_KEY)).unwrap();
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(&req.message);
    f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    let second = f
        .store
        .get(&addr("alice@example.net"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.version, 2);
    assert_ne!(second.fingerprint, first.fingerprint);
    *log.proves.lock().unwrap() = Some(Proven::of_record(Some(&first)));
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    match client::verify_reply_with_answer(&pending, reply.as_bytes())
        .unwrap()
        .verified
    {
        Verified::Found { fingerprint, .. } => {
            assert_eq!(fingerprint, first.fingerprint.as_str());
        }
        other => panic!("{other:?}"),
    }
    // Absent: "not found", although the store holds a key.
    *log.proves.lock().unwrap() = Some(Proven::Absent);
    let (pending, reply) = retrieved(&f, "alice@example.net").await;
    assert!(matches!(
        client::verify_reply_with_answer(&pending, reply.as_bytes())
            .unwrap()
            .verified,
        Verified::NotFound { .. }
    ));
    // A version the store never held: read again, then a temporary failure.
    *log.proves.lock().unwrap() = Some(Proven::Key {
        version: 7,
        sha256: [7; 32],
    });
    let (sent, asked) = (f.sent(), log.asked.load(Ordering::SeqCst));
    let req = carol_asks("alice@example.net");
    let result = f.kst.handle(&env("carol@acme.net"), &req.message).await;
    match result {
        Err(HandleError::Temporary(e)) => {
            assert!(e.is_temporary(), "{e}");
            assert!(e.to_string().contains("version 7"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.sent(), sent, "nothing sent");
    assert_eq!(
        log.asked.load(Ordering::SeqCst) - asked,
        crate::service::AGREE_ATTEMPTS as usize
    );
    // A confirmation whose answer proves a deletion after it: not sent.
    *log.proves.lock().unwrap() = Some(Proven::Deleted { version: 9 });
    let req =
        client::build_publication_with(&addr("alice@example.net"), ALICE, Some(HEAD_KEY)).unwrap();
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(&req.message);
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert_eq!(
        h.decision,
        Decision::Ignored(crate::service::Silence::Superseded)
    );
    assert_eq!(f.sent(), sent, "nothing sent");
}
