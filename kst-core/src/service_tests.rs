//! Unit tests of the decision logic with in-memory fakes (real gpg-made keys from testdata/).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;
use crate::AddressPolicy;
use crate::client::{self, Verified};
use crate::ratelimit::{LimitKind, RateLimiter};
use crate::testing::{MemoryMailer, MemoryStore};

const ALICE: &str = include_str!("../testdata/alice.pub.asc");
const BOB: &str = include_str!("../testdata/bob.pub.asc");
const ALICE_SECRET: &str = include_str!("../testdata/alice.sec.asc");

pub(crate) fn received(login: &str, by: &str, proto: &str) -> String {
    format!(
        "Received: from [10.0.0.1] (unknown [12.80.3.21])\r\n\t(Authenticated sender: {login})\r\n\tby {by} (Postfix) with {proto} id 53F3A161B01\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100 (AT)\r\n"
    )
}

pub(crate) struct Fixture {
    pub(crate) kst: Kst,
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) mailer: Arc<MemoryMailer>,
}

pub(crate) fn fixture() -> Fixture {
    let store = Arc::new(MemoryStore::default());
    let mailer = Arc::new(MemoryMailer::default());
    let kst = Kst::new(
        Policy::new(&["example.net"], &["mail.example.net"]),
        store.clone(),
        mailer.clone(),
    );
    Fixture { kst, store, mailer }
}

pub(crate) fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

pub(crate) fn env(sender: &str) -> Envelope {
    Envelope {
        sender: Some(sender.into()),
        recipient: "keys@example.net".into(),
        sasl_username: None,
    }
}

/// A client-built publication with `headers` prepended, as the MTA would.
fn publication(account: &str, key: &str, headers: &str) -> (Vec<u8>, client::Pending) {
    let req = client::build_publication(&addr(account), key).unwrap();
    let mut raw = headers.as_bytes().to_vec();
    raw.extend_from_slice(&req.message);
    (raw, req.pending)
}

impl Fixture {
    pub(crate) fn last_reply(&self) -> OutgoingMail {
        self.mailer
            .sent
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a reply was sent")
    }
    pub(crate) fn sent(&self) -> usize {
        self.mailer.sent.lock().unwrap().len()
    }
}

#[tokio::test]
async fn publish_then_retrieve_round_trip() {
    let f = fixture();
    let (raw, pending) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Published {
            version: 1,
            new_version: true,
            ..
        }
    ));
    assert_eq!(h.kind, RequestKind::Publication);
    let reply = f.last_reply();
    assert_eq!(reply.recipient.as_str(), "alice@example.net");
    assert_eq!(reply.envelope_from, None);
    match client::verify_reply(&pending, &reply.message).unwrap() {
        Verified::Published { fingerprint, .. } => {
            let Asked::Publication {
                fingerprint: fp, ..
            } = &pending.asked
            else {
                unreachable!()
            };
            assert_eq!(&fingerprint, fp);
        }
        other => panic!("{other:?}"),
    }

    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("Alice@Example.net"));
    let h = f
        .kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    assert_eq!(
        h.decision,
        Decision::Answered {
            status: Status::Found,
            address: addr("alice@example.net")
        }
    );
    let reply = f.last_reply();
    assert_eq!(reply.recipient.as_str(), "carol@acme.net");
    match client::verify_reply(&req.pending, &reply.message).unwrap() {
        Verified::Found { user_ids, .. } => {
            assert!(user_ids.iter().any(|u| u.contains("alice@example.net")))
        }
        other => panic!("{other:?}"),
    }
}

use crate::client::Asked;

#[tokio::test]
async fn redelivery_creates_no_second_version() {
    let f = fixture();
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPA"),
    );
    f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Published {
            version: 1,
            new_version: false,
            ..
        }
    ));
    assert_eq!(
        f.store
            .history(&addr("alice@example.net"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(f.sent(), 2, "the confirmation is sent again");
}

#[tokio::test]
async fn not_found_is_authenticated() {
    let f = fixture();
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("nobody@example.net"));
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    assert_eq!(
        client::verify_reply(&req.pending, &f.last_reply().message).unwrap(),
        Verified::NotFound {
            address: addr("nobody@example.net")
        }
    );
    // Another request's K_auth cannot verify it: a forged "no key" is detected.
    let other = client::build_retrieval(&addr("carol@acme.net"), &addr("nobody@example.net"));
    let mut forged = other.pending.clone();
    forged.message_id = req.pending.message_id.clone();
    assert_eq!(
        client::verify_reply(&forged, &f.last_reply().message),
        Err(client::ReplyError::BadHmac)
    );
}

async fn refused(f: &Fixture, env: &Envelope, raw: &[u8]) -> Reason {
    let before = f.store.map.lock().unwrap().len();
    let h = f.kst.handle(env, raw).await.unwrap();
    assert_eq!(f.store.map.lock().unwrap().len(), before, "nothing stored");
    match h.decision {
        Decision::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn forgeries_never_publish() {
    let f = fixture();
    let e = env("alice@example.net");
    let cases: Vec<(&str, String)> = vec![
        ("no Received at all", String::new()),
        (
            "untrusted host",
            received("alice@example.net", "mx.evil.example", "ESMTPSA"),
        ),
        (
            "look-alike host",
            received("alice@example.net", "mail.example.net.evil.example", "ESMTPSA"),
        ),
        (
            "unauthenticated protocol",
            received("alice@example.net", "mail.example.net", "ESMTPS"),
        ),
        (
            "note only in a lower Received header",
            format!(
                "Received: from mx.evil.example (unknown [1.2.3.4])\r\n\tby mail.example.net (Postfix) with ESMTP id 1\r\n{}",
                received("alice@example.net", "mail.example.net", "ESMTPSA")
            ),
        ),
        (
            "note in another header",
            "Received: from x (unknown [1.2.3.4])\r\n\tby mail.example.net (Postfix) with ESMTP id 1\r\nX-Note: (Authenticated sender: alice@example.net)\r\n".to_string(),
        ),
        (
            "HELO imitating the note",
            "Received: from a (Authenticated sender: alice@example.net) (unknown [1.2.3.4])\r\n\tby mail.example.net (Postfix) with ESMTP id 1\r\n".to_string(),
        ),
    ];
    for (what, headers) in cases {
        let (raw, _) = publication("alice@example.net", ALICE, &headers);
        assert_eq!(
            refused(&f, &e, &raw).await,
            Reason::NotAuthenticated,
            "{what}"
        );
    }
    // The note in the body.
    let (mut raw, _) = publication("alice@example.net", ALICE, "");
    raw.extend_from_slice(b"(Authenticated sender: alice@example.net)\r\n");
    assert!(matches!(
        f.kst.handle(&e, &raw).await.unwrap().decision,
        Decision::Refused { .. }
    ));
    assert!(f.store.map.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bob_cannot_publish_for_alice() {
    let f = fixture();
    // Authenticated as bob, From alice.
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("bob@example.net", "mail.example.net", "ESMTPSA"),
    );
    assert_eq!(
        refused(&f, &env("alice@example.net"), &raw).await,
        Reason::SenderMismatch
    );
    // Authenticated as alice, envelope sender bob.
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    assert_eq!(
        refused(&f, &env("bob@example.net"), &raw).await,
        Reason::SenderMismatch
    );
    assert_eq!(f.last_reply().recipient.as_str(), "bob@example.net");
}

#[tokio::test]
async fn sasl_argv_mode_ignores_headers() {
    let store = Arc::new(MemoryStore::default());
    let mailer = Arc::new(MemoryMailer::default());
    let mut policy = Policy::new(&["example.net"], &["mail.example.net"]);
    policy.auth_source = AuthSource::SaslArgv;
    let kst = Kst::new(policy, store.clone(), mailer.clone());
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let h = kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert_eq!(
        h.decision,
        Decision::Refused {
            reason: Reason::NotAuthenticated
        }
    );
    let mut e = env("alice@example.net");
    e.sasl_username = Some("alice@example.net".into());
    let (raw, _) = publication("alice@example.net", ALICE, "");
    assert!(matches!(
        kst.handle(&e, &raw).await.unwrap().decision,
        Decision::Published { .. }
    ));
}

#[tokio::test]
async fn login_map_maps_plain_logins() {
    let store = Arc::new(MemoryStore::default());
    let mailer = Arc::new(MemoryMailer::default());
    let mut policy = Policy::new(&["example.net"], &["mail.example.net"]);
    policy
        .login_map
        .insert("alice".into(), addr("alice@example.net"));
    let kst = Kst::new(policy, store, mailer);
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice", "mail.example.net", "ESMTPSA"),
    );
    assert!(matches!(
        kst.handle(&env("alice@example.net"), &raw)
            .await
            .unwrap()
            .decision,
        Decision::Published { .. }
    ));
    let (raw, _) = publication(
        "bob@example.net",
        BOB,
        &received("bob", "mail.example.net", "ESMTPSA"),
    );
    assert_eq!(
        kst.handle(&env("bob@example.net"), &raw)
            .await
            .unwrap()
            .decision,
        Decision::Refused {
            reason: Reason::UnknownAccount
        }
    );
}

#[tokio::test]
async fn secret_key_is_refused_with_advice() {
    let f = fixture();
    let k = AuthKey::generate();
    let raw = format!(
        "{}From: alice@example.net\r\nTo: keys@example.net\r\nMessage-ID: <s1@example.net>\r\n\r\n{ALICE_SECRET}{}\r\n",
        received("alice@example.net", "mail.example.net", "ESMTPSA"),
        k.to_base64()
    );
    assert_eq!(
        refused(&f, &env("alice@example.net"), raw.as_bytes()).await,
        Reason::SecretKey
    );
    let text = String::from_utf8(f.last_reply().message).unwrap();
    assert!(text.contains("revoke"), "{text}");
}

#[tokio::test]
async fn loops_and_bounces_get_no_reply() {
    let f = fixture();
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let cases: Vec<(Envelope, String, Silence)> = vec![
        (env(""), String::new(), Silence::NullSender),
        (
            env("MAILER-DAEMON@acme.net"),
            String::new(),
            Silence::MailerDaemon,
        ),
        (env("keys@example.net"), String::new(), Silence::OwnAddress),
        (
            env("carol@acme.net"),
            "Auto-Submitted: auto-replied\r\n".into(),
            Silence::AutoSubmitted,
        ),
        (
            env("carol@acme.net"),
            "Precedence: bulk\r\n".into(),
            Silence::BulkPrecedence,
        ),
        (
            env("\"odd one\"@acme.net"),
            String::new(),
            Silence::BadSender,
        ),
    ];
    for (e, headers, why) in cases {
        let mut raw = headers.into_bytes();
        raw.extend_from_slice(&req.message);
        let h = f.kst.handle(&e, &raw).await.unwrap();
        assert_eq!(h.decision, Decision::Ignored(why));
    }
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn not_for_kst_is_permanent() {
    let f = fixture();
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    for rcpt in [
        "alice@example.net",
        "keys@acme.net",
        "keys@example.net.evil.example",
        "bogus",
    ] {
        let mut e = env("carol@acme.net");
        e.recipient = rcpt.into();
        assert!(matches!(
            f.kst.handle(&e, &req.message).await,
            Err(HandleError::NotForKst(NotForKst::UnknownRecipient))
        ));
    }
    // Oversize mail and a served domain's keys+extension@ are decided (dropped), never
    // bounced: a bounce would carry the sender's text to a forged envelope sender.
    let big = vec![b'a'; Policy::DEFAULT_MAX_MESSAGE_BYTES + 1];
    let h = f
        .kst
        .handle(&env("carol@acme.net"), &big)
        .await
        .expect("decided");
    assert_eq!(h.decision, Decision::Ignored(Silence::TooLarge));
    for rcpt in [
        "keys+anything@example.net",
        "KEYS+x@Example.NET",
        "keys-foo@example.net",
    ] {
        let mut e = env("carol@acme.net");
        e.recipient = rcpt.into();
        assert!(f.kst.accepts_recipient(rcpt), "{rcpt}");
        let h = f.kst.handle(&e, &req.message).await.expect(rcpt);
        assert_eq!(
            h.decision,
            Decision::Ignored(Silence::AddressExtension),
            "{rcpt}"
        );
    }
    assert_eq!(f.sent(), 0, "nothing answered");
    for rcpt in [
        "keysx@example.net",
        "keys+x@example.net.evil.example",
        "keys+x@acme.net",
        "alice+keys@example.net",
    ] {
        assert!(!f.kst.accepts_recipient(rcpt), "{rcpt}");
    }
}

#[tokio::test]
async fn store_or_mailer_down_is_temporary_and_nothing_half_done() {
    let f = fixture();
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    f.store.down.store(true, Ordering::SeqCst);
    let err = f
        .kst
        .handle(&env("alice@example.net"), &raw)
        .await
        .unwrap_err();
    assert!(matches!(err, HandleError::Temporary(ref e) if e.is_temporary()));
    assert_eq!(f.sent(), 0);
    f.store.down.store(false, Ordering::SeqCst);
    f.mailer.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        f.kst.handle(&env("alice@example.net"), &raw).await,
        Err(HandleError::Temporary(_))
    ));
    // The retry after the mailer recovers publishes nothing new and confirms.
    f.mailer.down.store(false, Ordering::SeqCst);
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Published {
            version: 1,
            new_version: false,
            ..
        }
    ));
    assert_eq!(f.sent(), 1);
}

#[tokio::test]
async fn bad_requests_are_refused_with_reasons() {
    let f = fixture();
    let e = env("carol@acme.net");
    let k = AuthKey::generate().to_base64();
    let mk = |body: &str| {
        format!(
            "From: carol@acme.net\r\nTo: keys@example.net\r\nMessage-ID: <r@acme.net>\r\n\r\n{body}"
        )
        .into_bytes()
    };
    assert_eq!(
        refused(&f, &e, &mk(&format!("bob@acme.net\r\n{k}\r\n"))).await,
        Reason::DomainNotServed
    );
    assert_eq!(
        refused(&f, &e, &mk(&format!("not an address\r\n{k}\r\n"))).await,
        Reason::BadAddress
    );
    assert_eq!(
        refused(&f, &e, &mk("alice@example.net\r\nshort\r\n")).await,
        Reason::BadAuthKey
    );
    assert_eq!(refused(&f, &e, &mk("hello\r\n")).await, Reason::Malformed);
    // A header injection attempt in the query never reaches a reply header.
    let raw = mk(&format!(
        "alice@example.net\rBcc: x@evil.example\r\n{k}\r\n"
    ));
    f.kst.handle(&e, &raw).await.unwrap();
    let reply = String::from_utf8(f.last_reply().message).unwrap();
    assert!(!reply.contains("\nBcc:"), "{reply}");
}

#[tokio::test]
async fn html_only_and_multipart_alternative() {
    let f = fixture();
    let k = AuthKey::generate().to_base64();
    let raw = format!(
        "From: carol@acme.net\r\nTo: keys@example.net\r\nMessage-ID: <m@acme.net>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nalice@example.net\r\n{}\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>alice@example.net</p>\r\n--b--\r\n",
        k.replace('=', "=3D")
    );
    let h = f
        .kst
        .handle(&env("carol@acme.net"), raw.as_bytes())
        .await
        .unwrap();
    assert_eq!(
        h.decision,
        Decision::Answered {
            status: Status::NotFound,
            address: addr("alice@example.net")
        }
    );
    let html = "From: carol@acme.net\r\nTo: keys@example.net\r\nContent-Type: text/html\r\n\r\n<p>alice@example.net</p>\r\n";
    assert_eq!(
        refused(&f, &env("carol@acme.net"), html.as_bytes()).await,
        Reason::Malformed
    );
}

// ---- abuse resistance: RFC 3834, rate limits, the Authentication-Results gate, shape caps ----

pub(crate) fn fixture_with(policy: Policy) -> Fixture {
    let store = Arc::new(MemoryStore::default());
    let mailer = Arc::new(MemoryMailer::default());
    let kst = Kst::new(policy, store.clone(), mailer.clone());
    Fixture { kst, store, mailer }
}

fn base_policy() -> Policy {
    Policy::new(&["example.net"], &["mail.example.net", "mx.example.net"])
}

/// A retrieval by `sender` for `queried`, arriving through the provider's MX from `ip`, with
/// `extra` headers written by the sender (below the MX's Received header).
fn inbound_retrieval(sender: &str, queried: &str, ip: &str, extra: &str) -> Vec<u8> {
    let req = client::build_retrieval(&addr(sender), &addr(queried));
    let mut raw = format!(
        "Received: from out.acme.net (out.acme.net [{ip}])\r\n\tby mx.example.net (Postfix) with ESMTPS id 1\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100\r\n{extra}"
    )
    .into_bytes();
    raw.extend_from_slice(&req.message);
    raw
}

#[tokio::test]
async fn rfc3834_list_and_system_mail_gets_no_reply() {
    let f = fixture();
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let cases: Vec<(&str, &str, Silence)> = vec![
        (
            "carol@acme.net",
            "Auto-Submitted: auto-generated; owner-email=\"x@y\"\r\n",
            Silence::AutoSubmitted,
        ),
        (
            "carol@acme.net",
            "Auto-Submitted: No\r\nAuto-Submitted: auto-replied\r\n",
            Silence::AutoSubmitted,
        ),
        (
            "carol@acme.net",
            "Precedence: junk\r\n",
            Silence::BulkPrecedence,
        ),
        (
            "carol@acme.net",
            "Precedence: List\r\n",
            Silence::BulkPrecedence,
        ),
        (
            "carol@acme.net",
            "List-Id: <talk.acme.net>\r\n",
            Silence::MailingList,
        ),
        (
            "carol@acme.net",
            "List-Post: <mailto:talk@acme.net>\r\n",
            Silence::MailingList,
        ),
        ("owner-talk@acme.net", "", Silence::MailingList),
        ("talk-request@acme.net", "", Silence::MailingList),
        ("Mailer-Daemon@acme.net", "", Silence::MailerDaemon),
        ("keys@example.net", "", Silence::OwnAddress),
        ("<>", "", Silence::NullSender),
    ];
    for (sender, headers, why) in cases {
        let mut raw = headers.as_bytes().to_vec();
        raw.extend_from_slice(&req.message);
        let h = f.kst.handle(&env(sender), &raw).await.unwrap();
        assert_eq!(h.decision, Decision::Ignored(why), "{sender} {headers:?}");
    }
    assert_eq!(f.sent(), 0);
    // `Auto-Submitted: no`, with a comment or parameters, is a person's mail: answered.
    for v in ["no", "NO (sent by hand)", "no; x=y"] {
        let mut raw = format!("Auto-Submitted: {v}\r\n").into_bytes();
        raw.extend_from_slice(&req.message);
        let h = f.kst.handle(&env("carol@acme.net"), &raw).await.unwrap();
        assert!(matches!(h.decision, Decision::Answered { .. }), "{v}");
    }
    // Replies themselves are marked so that other responders stay silent.
    let reply = String::from_utf8(f.last_reply().message).unwrap();
    assert!(reply.contains("Auto-Submitted: auto-replied"), "{reply}");
    assert_eq!(f.last_reply().envelope_from, None, "null envelope sender");
}

#[tokio::test]
async fn each_rate_limit_silences_only_what_it_counts() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_account: 2,
        per_sender: 4,
        per_sender_query: 2,
        per_source_ip: 6,
        window_secs: 3600,
    };
    // acme.net delivers dot variants to one mailbox (as Gmail does).
    p.recipient_folding.dot_insensitive_domains = vec!["acme.net".into()];
    let f = fixture_with(p);
    let handle = |sender: &str, queried: &str, ip: &str| {
        let raw = inbound_retrieval(sender, queried, ip, "");
        let kst = f.kst.clone();
        let env = env(sender);
        async move { kst.handle(&env, &raw).await.unwrap().decision }
    };
    let answered = |d: &Decision| matches!(d, Decision::Answered { .. });
    let limited = |k| Decision::Ignored(Silence::RateLimited(k));
    // Per (recipient, queried address): bob gets alice's key twice, then silence.
    for ip in ["192.0.2.1", "192.0.2.2"] {
        assert!(answered(
            &handle("bob@acme.net", "alice@example.net", ip).await
        ));
    }
    assert_eq!(
        handle("bob@acme.net", "alice@example.net", "192.0.2.3").await,
        limited(LimitKind::SenderQuery)
    );
    // Per recipient: 4 in all (the pair-stopped one was not counted on bob); case, `+tag` and
    // (at a dot-insensitive domain) dot variants of bob's mailbox share his budget.
    assert!(answered(
        &handle("Bob+1@acme.net", "u1@example.net", "192.0.2.4").await
    ));
    assert!(answered(
        &handle("b.o.b@acme.net", "u2@example.net", "192.0.2.5").await
    ));
    assert_eq!(
        handle("BOB+2@acme.net", "u3@example.net", "192.0.2.6").await,
        limited(LimitKind::Sender)
    );
    // Per source: 6 from one IPv6 /64, whatever the senders; another /64 is not affected.
    for i in 0..6 {
        let d = handle(
            &format!("s{i}@other{i}.example"),
            "y@example.net",
            &format!("IPv6:2001:db8:1:2::{i}"),
        )
        .await;
        assert!(answered(&d), "{i}: {d:?}");
    }
    assert_eq!(
        handle(
            "s9@other9.example",
            "y@example.net",
            "IPv6:2001:db8:1:2:ffff::9"
        )
        .await,
        limited(LimitKind::SourceIp)
    );
    assert!(answered(
        &handle("s9@other9.example", "y@example.net", "IPv6:2001:db8:1:3::9").await
    ));
    // Many strangers asking for one address do not silence it for anyone.
    for i in 0..10 {
        let d = handle(
            &format!("q{i}@q{i}.example"),
            "y@example.net",
            &format!("198.51.100.{i}"),
        )
        .await;
        assert!(answered(&d), "{i}: {d:?}");
    }
    // Per account: alice's own authenticated requests, 2 per window.
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    for _ in 0..2 {
        let d = f
            .kst
            .handle(&env("alice@example.net"), &raw)
            .await
            .unwrap()
            .decision;
        assert!(matches!(d, Decision::Published { .. }), "{d:?}");
    }
    assert_eq!(
        f.kst
            .handle(&env("alice@example.net"), &raw)
            .await
            .unwrap()
            .decision,
        limited(LimitKind::Account)
    );
    // Silenced requests sent nothing: 2 + 2 + 6 + 1 + 10 answers and 2 confirmations.
    assert_eq!(f.sent(), 23);
}

#[tokio::test]
async fn forged_received_headers_do_not_move_the_source() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_source_ip: 2,
        ..crate::RateLimits::default()
    };
    let f = fixture_with(p);
    // A sender that writes its own Received headers still counts against the MX-recorded IP.
    for i in 0..3 {
        let s = format!("m{i}@m{i}.example");
        let forged = format!(
            "Received: from x (x [10.9.9.{i}])\r\n\tby mx.example.net (Postfix) with ESMTP id {i}\r\n"
        );
        let raw = inbound_retrieval(&s, "alice@example.net", "192.0.2.77", &forged);
        let d = f.kst.handle(&env(&s), &raw).await.unwrap().decision;
        if i < 2 {
            assert!(matches!(d, Decision::Answered { .. }), "{i}: {d:?}");
        } else {
            assert_eq!(
                d,
                Decision::Ignored(Silence::RateLimited(LimitKind::SourceIp))
            );
        }
    }
}

/// Red team round 8: a client certificate's issuer (written by Postfix with
/// `smtpd_tls_received_header`) cannot give each request a source IP of its own.
#[tokio::test]
async fn a_client_certificate_cannot_move_the_source() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_source_ip: 2,
        ..crate::RateLimits::default()
    };
    let f = fixture_with(p);
    for i in 0..3 {
        let s = format!("m{i}@m{i}.example");
        let req = client::build_retrieval(&addr(&s), &addr("alice@example.net"));
        let mut raw = format!(
            "Received: from out.acme.net (out.acme.net [192.0.2.77])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\t(Client CN \"c\", Issuer \"a) ([10.9.9.{i}]) (\" (not verified))\r\n\tby mx.example.net (Postfix) with ESMTPS id {i}\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100\r\n"
        )
        .into_bytes();
        raw.extend_from_slice(&req.message);
        let d = f.kst.handle(&env(&s), &raw).await.unwrap().decision;
        if i < 2 {
            assert!(matches!(d, Decision::Answered { .. }), "{i}: {d:?}");
        } else {
            assert_eq!(
                d,
                Decision::Ignored(Silence::RateLimited(LimitKind::SourceIp))
            );
        }
    }
}

/// A forged publication, revocation or deletion for alice (From: alice, no authenticated
/// Received header), from bot number `i`.
fn forged_owner_request(i: usize) -> Vec<u8> {
    let alice = addr("alice@example.net");
    let body = match i % 3 {
        0 => client::build_publication(&alice, ALICE).unwrap().message,
        1 => {
            client::build_publication(&alice, LIFE_REVOKED)
                .unwrap()
                .message
        }
        _ => client::build_deletion(&alice).message,
    };
    let mut raw = format!(
        "Received: from bot{i} (bot{i} [203.0.{}.{}])\r\n\tby mx.example.net (Postfix) with ESMTP id {i}\r\n",
        i / 200,
        i % 200
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    raw
}

#[tokio::test]
async fn floods_from_forged_senders_leave_the_victims_own_requests_through() {
    // Default limits: what an operator gets.
    let f = fixture_with(base_policy());
    let alice = "alice@example.net";
    let own = received(alice, "mail.example.net", "ESMTPSA");
    // 1. Hundreds of forged retrievals, publications, revocations and deletions with alice (and
    //    variants of her address) as envelope sender, from as many hosts.
    let mut answered_to_alice = 0;
    for i in 0..300 {
        let sender = match i % 3 {
            0 => alice.to_string(),
            1 => format!("Alice+{i}@example.net"),
            _ => "ALICE@example.net".to_string(),
        };
        let raw = if i % 2 == 0 {
            inbound_retrieval(
                &sender,
                &format!("u{i}@example.net"),
                &format!("10.1.{}.{}", i / 200, i % 200),
                "",
            )
        } else {
            forged_owner_request(i)
        };
        let d = f.kst.handle(&env(&sender), &raw).await.unwrap().decision;
        match d {
            Decision::Answered { .. } | Decision::Refused { .. } => answered_to_alice += 1,
            Decision::Ignored(Silence::RateLimited(LimitKind::Sender)) => {}
            other => panic!("{i}: {other:?}"),
        }
    }
    // The backscatter cap held: at most per_sender replies reached alice's mailbox.
    assert_eq!(answered_to_alice, crate::RateLimits::default().per_sender);
    // 2. Strangers of one big domain asking for alice's key 300 times.
    for i in 0..300 {
        let s = format!("s{i}@freemail.example");
        let raw = inbound_retrieval(&s, alice, &format!("10.2.{}.{}", i / 200, i % 200), "");
        let d = f.kst.handle(&env(&s), &raw).await.unwrap().decision;
        assert!(matches!(d, Decision::Answered { .. }), "{i}: {d:?}");
    }
    assert!(
        f.store.map.lock().unwrap().is_empty(),
        "nothing forged was stored"
    );
    // 3. Alice's own authenticated publication, revocation and deletion go through.
    let (raw, _) = publication(alice, LIFE_V1, &own);
    let d = f.kst.handle(&env(alice), &raw).await.unwrap().decision;
    assert!(matches!(d, Decision::Published { .. }), "{d:?}");
    let (raw, _) = publication(alice, LIFE_REVOKED, &own);
    let d = f.kst.handle(&env(alice), &raw).await.unwrap().decision;
    assert!(matches!(d, Decision::Published { .. }), "{d:?}");
    assert!(
        f.kst
            .store()
            .get(&addr(alice))
            .await
            .unwrap()
            .unwrap()
            .revoked
    );
    let mut raw = own.clone().into_bytes();
    raw.extend_from_slice(&client::build_deletion(&addr(alice)).message);
    let d = f.kst.handle(&env(alice), &raw).await.unwrap().decision;
    assert!(
        matches!(d, Decision::Deleted { existed: true, .. }),
        "{d:?}"
    );
    let (raw, _) = publication(alice, ALICE, &own);
    let d = f.kst.handle(&env(alice), &raw).await.unwrap().decision;
    assert!(matches!(d, Decision::Published { .. }), "{d:?}");
    // 4. Her own retrieval through her authenticated submission is answered, and so is a
    //    correspondent's retrieval of her key.
    let req = client::build_retrieval(&addr(alice), &addr("bob@example.net"));
    let mut raw = own.clone().into_bytes();
    raw.extend_from_slice(&req.message);
    let d = f.kst.handle(&env(alice), &raw).await.unwrap().decision;
    assert!(matches!(d, Decision::Answered { .. }), "{d:?}");
    let raw = inbound_retrieval("carol@acme.net", alice, "192.0.2.50", "");
    let d = f
        .kst
        .handle(&env("carol@acme.net"), &raw)
        .await
        .unwrap()
        .decision;
    assert_eq!(
        d,
        Decision::Answered {
            status: Status::Found,
            address: addr(alice)
        }
    );
}

#[tokio::test]
async fn a_forged_flood_delays_a_foreign_victims_retrievals_by_at_most_one_window() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_sender: 5,
        window_secs: 2,
        ..crate::RateLimits::default()
    };
    let f = fixture_with(p);
    let victim = "victim@freemail.example";
    for i in 0..40 {
        let raw = inbound_retrieval(
            victim,
            &format!("u{i}@example.net"),
            &format!("10.3.0.{i}"),
            "",
        );
        f.kst.handle(&env(victim), &raw).await.unwrap();
    }
    // The victim's own request looks exactly like the forged ones: silenced in this window...
    let own = inbound_retrieval(victim, "alice@example.net", "192.0.2.99", "");
    assert_eq!(
        f.kst.handle(&env(victim), &own).await.unwrap().decision,
        Decision::Ignored(Silence::RateLimited(LimitKind::Sender))
    );
    // ...and answered once the window has passed.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let own = inbound_retrieval(victim, "alice@example.net", "192.0.2.99", "");
    assert!(matches!(
        f.kst.handle(&env(victim), &own).await.unwrap().decision,
        Decision::Answered { .. }
    ));
}

#[tokio::test]
async fn replies_go_to_the_envelope_sender_as_received() {
    let mut p = base_policy();
    p.address_policy.subaddress_separator = Some('-');
    let f = fixture_with(p);
    for sender in ["john-smith@partner.example", "John.Smith@Partner.Example"] {
        let raw = inbound_retrieval(sender, "alice@example.net", "192.0.2.1", "");
        let d = f.kst.handle(&env(sender), &raw).await.unwrap().decision;
        assert!(matches!(d, Decision::Answered { .. }), "{d:?}");
        let expected = sender.replace("Partner.Example", "partner.example");
        assert_eq!(f.last_reply().recipient.as_str(), expected);
    }
    // A served domain's subaddress still belongs to its account, and the confirmation goes to
    // the subaddress the user wrote from.
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let d = f
        .kst
        .handle(&env("alice-keys@example.net"), &raw)
        .await
        .unwrap()
        .decision;
    assert!(
        matches!(&d, Decision::Published { address, .. } if address.as_str() == "alice@example.net"),
        "{d:?}"
    );
    assert_eq!(f.last_reply().recipient.as_str(), "alice-keys@example.net");
}

#[tokio::test]
async fn a_kelvin_sign_login_is_refused_not_folded_into_karl() {
    let karl_k = "\u{212A}arl@example.net";
    for unicode in [false, true] {
        let mut p = base_policy();
        p.address_policy.unicode_local_parts = unicode;
        let f = fixture_with(p);
        // The provider authenticated a login written with U+212A, which Unicode lowercases to
        // "karl"; the key's User ID is irrelevant: the login itself is refused.
        let raw = format!(
            "{}From: {karl_k}\r\nTo: keys@example.net\r\nSubject: Key publication\r\n\r\n{ALICE}\r\n{}\r\n",
            received(karl_k, "mail.example.net", "ESMTPSA"),
            AuthKey::generate().to_base64()
        )
        .into_bytes();
        let d = f.kst.handle(&env(karl_k), &raw).await.unwrap().decision;
        assert_eq!(
            d,
            Decision::Refused {
                reason: Reason::UnknownAccount
            },
            "unicode_local_parts = {unicode}"
        );
        assert!(f.store.map.lock().unwrap().is_empty());
        // A retrieval for the look-alike address is refused as a bad address, not answered
        // with karl's key.
        let mut q = format!("From: carol@acme.net\r\nTo: keys@example.net\r\n\r\n{karl_k}\r\n")
            .into_bytes();
        q.extend_from_slice(AuthKey::generate().to_base64().as_bytes());
        q.extend_from_slice(b"\r\n");
        assert_eq!(
            f.kst
                .handle(&env("carol@acme.net"), &q)
                .await
                .unwrap()
                .decision,
            Decision::Refused {
                reason: Reason::BadAddress
            }
        );
    }
}

#[tokio::test]
async fn gate_answers_only_a_mailbox_vouched_for_by_aligned_dkim() {
    let f = fixture_with(gated_policy());
    let decide = |ar: &str, sender: &str| {
        let mut raw = format!("Authentication-Results: {ar}\r\n").into_bytes();
        raw.extend_from_slice(&inbound_retrieval(
            sender,
            "alice@example.net",
            "192.0.2.1",
            "",
        ));
        let kst = f.kst.clone();
        let env = env(sender);
        async move { kst.handle(&env, &raw).await.unwrap().decision }
    };
    // A replayed freemail message: Mallory's own DKIM-signed request (DMARC passes on her From),
    // sent again with the victim as envelope sender; SPF fails.
    let victim = "victim@freemail.example";
    let mut raw = format!(
        "Authentication-Results: mx.example.net; dkim=pass header.d=freemail.example; spf=fail smtp.mailfrom={victim}; dmarc=pass header.from=freemail.example\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(&inbound_retrieval(
        "mallory@freemail.example",
        "alice@example.net",
        "192.0.2.1",
        "",
    ));
    assert_eq!(
        f.kst.handle(&env(victim), &raw).await.unwrap().decision,
        Decision::Ignored(Silence::SenderNotVouched)
    );
    // SPF or DMARC pass alone vouches for the domain only.
    assert_eq!(
        decide(
            &format!("mx.example.net; spf=pass smtp.mailfrom={victim}"),
            victim
        )
        .await,
        Decision::Ignored(Silence::SenderNotVouched)
    );
    assert_eq!(
        decide(
            "mx.example.net; dmarc=pass header.from=freemail.example",
            victim
        )
        .await,
        Decision::Ignored(Silence::SenderNotVouched)
    );
    // DKIM aligned with the victim's own From: her mailbox is vouched for.
    assert!(matches!(
        decide(
            "mx.example.net; dkim=pass header.d=freemail.example",
            victim
        )
        .await,
        Decision::Answered { .. }
    ));
    // Two From headers: whichever was signed is unknown, so no mailbox is vouched for.
    let mut raw = "Authentication-Results: mx.example.net; dkim=pass header.d=freemail.example\r\nFrom: mallory@freemail.example\r\n".as_bytes().to_vec();
    raw.extend_from_slice(&inbound_retrieval(
        victim,
        "alice@example.net",
        "192.0.2.1",
        "",
    ));
    assert_eq!(
        f.kst.handle(&env(victim), &raw).await.unwrap().decision,
        Decision::Ignored(Silence::SenderNotVouched)
    );
    assert_eq!(f.sent(), 1);
}

#[tokio::test]
async fn requests_the_gate_silences_use_up_no_counter() {
    let mut p = gated_policy();
    p.rate_limits.per_sender = 2;
    let f = fixture_with(p);
    let victim = "victim@freemail.example";
    for i in 0..20 {
        let raw = inbound_retrieval(
            victim,
            &format!("u{i}@example.net"),
            &format!("10.4.0.{i}"),
            "",
        );
        assert_eq!(
            f.kst.handle(&env(victim), &raw).await.unwrap().decision,
            Decision::Ignored(Silence::SenderNotVouched)
        );
    }
    let mut raw = "Authentication-Results: mx.example.net; dkim=pass header.d=freemail.example\r\n"
        .as_bytes()
        .to_vec();
    raw.extend_from_slice(&inbound_retrieval(
        victim,
        "alice@example.net",
        "192.0.2.9",
        "",
    ));
    assert!(matches!(
        f.kst.handle(&env(victim), &raw).await.unwrap().decision,
        Decision::Answered { .. }
    ));
}

/// Red team S1 (the mail path's bound): a message deferred for a temporary failure (the store
/// down: 451, the MTA delivers it again) is counted again on every retry; its hits were not
/// taken back, so an outage of a few retries used up an honest sender's budget and the
/// message, once the store was back, was silenced as rate-limited. Now a deferred message's
/// hits on the sender's (and the account's) counters are refunded: however many retries, the
/// sender's limits are as if it came once. (The source's counter keeps them: review F1,
/// below.)
#[tokio::test]
async fn a_deferred_messages_retries_do_not_use_up_its_senders_limits() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_account: 2,
        per_sender: 2,
        per_sender_query: 2,
        per_source_ip: 1_000,
        window_secs: 3_600,
    };
    let f = fixture_with(p);
    let sender = "carol@acme.net";
    let raw = inbound_retrieval(sender, "alice@example.net", "192.0.2.7", "");
    f.store.down.store(true, Ordering::SeqCst);
    for retry in 0..6 {
        assert!(
            matches!(
                f.kst.handle(&env(sender), &raw).await,
                Err(HandleError::Temporary(_))
            ),
            "retry {retry} is deferred"
        );
    }
    f.store.down.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        let h = f.kst.handle(&env(sender), &raw).await.unwrap();
        assert!(
            matches!(h.decision, Decision::Answered { .. }),
            "answered once the store is back, within the limits: {:?}",
            h.decision
        );
    }
    // The limit still holds: the third answered request is over it.
    assert_eq!(
        f.kst.handle(&env(sender), &raw).await.unwrap().decision,
        Decision::Ignored(Silence::RateLimited(LimitKind::SenderQuery))
    );
    // An authenticated account's deferred publication alike.
    let (publication, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    f.store.down.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        assert!(
            f.kst
                .handle(&env("alice@example.net"), &publication)
                .await
                .is_err()
        );
    }
    f.store.down.store(false, Ordering::SeqCst);
    let h = f
        .kst
        .handle(&env("alice@example.net"), &publication)
        .await
        .unwrap();
    assert!(
        matches!(h.decision, Decision::Published { .. }),
        "{:?}",
        h.decision
    );
}

/// Review F1 of the refunds: a host whose messages' replies fail temporarily (a relay's 4xx to
/// a reply recipient whose domain's DNS the sender breaks; here the mailer fails every reply)
/// had every hit refunded, so its messages, each with another sender, were decided in full
/// without end (20 of 20 with a source limit of 2). The source's counter is not refunded: the
/// host's third message is silenced.
#[tokio::test]
async fn a_source_whose_replies_fail_temporarily_is_still_rate_limited() {
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits {
        per_account: 2,
        per_sender: 2,
        per_sender_query: 2,
        per_source_ip: 2,
        window_secs: 3_600,
    };
    let f = fixture_with(p);
    f.mailer.down.store(true, Ordering::SeqCst);
    let mut decided_in_full = 0;
    for i in 0..20 {
        let sender = format!("x{i}@attacker.example");
        let raw = inbound_retrieval(&sender, "alice@example.net", "192.0.2.66", "");
        match f.kst.handle(&env(&sender), &raw).await {
            Err(HandleError::Temporary(_)) => decided_in_full += 1,
            Ok(h) => assert_eq!(
                h.decision,
                Decision::Ignored(Silence::RateLimited(LimitKind::SourceIp))
            ),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        decided_in_full, 2,
        "decided in full within the source's limit only"
    );
}

/// A limiter whose backend is down.
struct DownLimiter;

#[async_trait::async_trait]
impl RateLimiter for DownLimiter {
    fn name(&self) -> &'static str {
        "down"
    }
    async fn hit(&self, _: &str, _: u32, _: std::time::Duration) -> crate::Result<bool> {
        Err(Error::unavailable("ratelimit(test)", "down for the test"))
    }
}

#[tokio::test]
async fn limiter_outage_is_temporary_and_sends_nothing() {
    let f = fixture();
    let kst = f.kst.clone().with_rate_limiter(Arc::new(DownLimiter));
    let raw = inbound_retrieval("bob@acme.net", "alice@example.net", "192.0.2.1", "");
    let err = kst.handle(&env("bob@acme.net"), &raw).await.unwrap_err();
    assert!(
        matches!(err, HandleError::Temporary(ref e) if e.is_temporary()),
        "{err}"
    );
    assert_eq!(f.sent(), 0);
    // With every limit off the limiter is never asked.
    let mut p = base_policy();
    p.rate_limits = crate::RateLimits::OFF;
    let g = fixture_with(p);
    let kst = g.kst.clone().with_rate_limiter(Arc::new(DownLimiter));
    let h = kst.handle(&env("bob@acme.net"), &raw).await.unwrap();
    assert!(matches!(h.decision, Decision::Answered { .. }));
}

fn gated_policy() -> Policy {
    let mut p = base_policy();
    p.require_authentication_results = true;
    p.authserv_id = "mx.example.net".into();
    p
}

#[tokio::test]
async fn authentication_results_gate_resists_forgeries() {
    let f = fixture_with(gated_policy());
    let pass = "Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=bob@acme.net; dkim=pass header.d=acme.net\r\n";
    let decide = |top: String, sender: &'static str| {
        let kst = f.kst.clone();
        async move {
            // `top` sits above the MX's Received header: what the provider's MTA prepends.
            let mut raw = top.into_bytes();
            raw.extend_from_slice(&inbound_retrieval(
                sender,
                "alice@example.net",
                "192.0.2.1",
                "",
            ));
            kst.handle(&env(sender), &raw).await.unwrap().decision
        }
    };
    let silenced = Decision::Ignored(Silence::SenderNotVouched);
    assert!(matches!(
        decide(pass.into(), "bob@acme.net").await,
        Decision::Answered { .. }
    ));
    // No header at all.
    assert_eq!(decide(String::new(), "bob@acme.net").await, silenced);
    // The pass is for another domain than the envelope sender's (a forged envelope sender).
    assert_eq!(decide(pass.into(), "victim@victim.example").await, silenced);
    // Wrong authserv-id on top.
    assert_eq!(
        decide(
            pass.replace("mx.example.net", "mx.acme.net"),
            "bob@acme.net"
        )
        .await,
        silenced
    );
    // A forged header with the right authserv-id lower in the message, under the provider's own
    // (failing) one: only the topmost counts.
    let f2 = fixture_with(gated_policy());
    let mut raw = "Authentication-Results: mx.example.net; spf=fail smtp.mailfrom=bob@acme.net\r\n"
        .as_bytes()
        .to_vec();
    raw.extend_from_slice(&inbound_retrieval(
        "bob@acme.net",
        "alice@example.net",
        "192.0.2.1",
        pass,
    ));
    assert_eq!(
        f2.kst
            .handle(&env("bob@acme.net"), &raw)
            .await
            .unwrap()
            .decision,
        silenced
    );
    // A sender-written header with a foreign authserv-id (the provider wrote none).
    let forged_foreign =
        "Authentication-Results: mx.acme.net; spf=pass smtp.mailfrom=bob@acme.net\r\n";
    let raw = inbound_retrieval(
        "bob@acme.net",
        "alice@example.net",
        "192.0.2.1",
        forged_foreign,
    );
    assert_eq!(
        f2.kst
            .handle(&env("bob@acme.net"), &raw)
            .await
            .unwrap()
            .decision,
        silenced
    );
    // A pass hidden in a comment of a failing result.
    assert_eq!(
        decide(
            "Authentication-Results: mx.example.net; spf=fail (spf=pass smtp.mailfrom=bob@acme.net) smtp.mailfrom=bob@acme.net\r\n".into(),
            "bob@acme.net"
        )
        .await,
        silenced
    );
    assert_eq!(f.sent() + f2.sent(), 1);
}

#[tokio::test]
async fn gate_lets_authenticated_submissions_through() {
    let f = fixture_with(gated_policy());
    let (raw, _) = publication(
        "alice@example.net",
        ALICE,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(
        matches!(h.decision, Decision::Published { .. }),
        "{:?}",
        h.decision
    );
    // The same message without the authenticated Received header is silenced, not refused:
    // its envelope sender is unverified.
    let (raw, _) = publication("alice@example.net", ALICE, "");
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert_eq!(h.decision, Decision::Ignored(Silence::SenderNotVouched));
}

#[tokio::test]
async fn shape_caps_refuse_before_reading_the_body() {
    let f = fixture();
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let many_headers: String = (0..Policy::DEFAULT_MAX_HEADERS)
        .map(|i| format!("X-Filler-{i}: x\r\n"))
        .collect();
    let mut raw = many_headers.into_bytes();
    raw.extend_from_slice(&req.message);
    assert_eq!(
        refused(&f, &env("carol@acme.net"), &raw).await,
        Reason::Malformed
    );
    assert!(
        String::from_utf8(f.last_reply().message)
            .unwrap()
            .contains("header fields")
    );

    let k = AuthKey::generate().to_base64();
    let head = "From: carol@acme.net\r\nTo: keys@example.net\r\nMIME-Version: 1.0\r\n";
    // 70 sibling parts.
    let mut parts = format!("{head}Content-Type: multipart/mixed; boundary=b\r\n\r\n");
    for _ in 0..70 {
        parts.push_str(&format!(
            "--b\r\nContent-Type: text/plain\r\n\r\nalice@example.net\r\n{k}\r\n"
        ));
    }
    parts.push_str("--b--\r\n");
    assert_eq!(
        refused(&f, &env("carol@acme.net"), parts.as_bytes()).await,
        Reason::Malformed
    );
    assert!(
        String::from_utf8(f.last_reply().message)
            .unwrap()
            .contains("MIME parts")
    );
    // 12 levels of nesting.
    let mut nested = format!("{head}Content-Type: multipart/mixed; boundary=b0\r\n\r\n");
    for d in 1..12 {
        nested.push_str(&format!(
            "--b{}\r\nContent-Type: multipart/mixed; boundary=b{d}\r\n\r\n",
            d - 1
        ));
    }
    nested.push_str(&format!(
        "--b11\r\nContent-Type: text/plain\r\n\r\nalice@example.net\r\n{k}\r\n"
    ));
    for d in (0..12).rev() {
        nested.push_str(&format!("--b{d}--\r\n"));
    }
    assert_eq!(
        refused(&f, &env("carol@acme.net"), nested.as_bytes()).await,
        Reason::Malformed
    );
    assert!(
        String::from_utf8(f.last_reply().message)
            .unwrap()
            .contains("deep")
    );
    // Within the caps the same shapes are read: 3 levels, a few parts.
    let mut ok = format!(
        "{head}Content-Type: multipart/mixed; boundary=b0\r\n\r\n--b0\r\nContent-Type: multipart/alternative; boundary=b1\r\n\r\n"
    );
    ok.push_str(&format!(
        "--b1\r\nContent-Type: text/plain\r\n\r\nalice@example.net\r\n{k}\r\n--b1--\r\n--b0--\r\n"
    ));
    let h = f
        .kst
        .handle(&env("carol@acme.net"), ok.as_bytes())
        .await
        .unwrap();
    assert!(
        matches!(h.decision, Decision::Answered { .. }),
        "{:?}",
        h.decision
    );
}

// ---- key lifecycle: update, revocation, replacement, deletion ----

const LIFE_V1: &str = include_str!("../testdata/keys/lifecycle-v1.pub.asc");
const LIFE_V2: &str = include_str!("../testdata/keys/lifecycle-v2.pub.asc");
const LIFE_REVOKED: &str = include_str!("../testdata/keys/lifecycle-revoked.pub.asc");

async fn publish_ok(f: &Fixture, key: &str) -> Decision {
    let (raw, pending) = publication(
        "alice@example.net",
        key,
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(
        matches!(
            client::verify_reply(&pending, &f.last_reply().message),
            Ok(Verified::Published { .. })
        ),
        "{:?}",
        h.decision
    );
    h.decision
}

pub(crate) async fn retrieve(f: &Fixture) -> Verified {
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    client::verify_reply(&req.pending, &f.last_reply().message).unwrap()
}

/// The packets kst publishes for `armored` (validated and stripped as the service does).
fn as_published(armored: &str) -> Vec<u8> {
    crate::validate::validate(
        armored,
        &addr("alice@example.net"),
        &crate::validate::KeyPolicy::default(),
        SystemTime::now(),
    )
    .unwrap()
    .packets
}

#[tokio::test]
async fn updates_replace_revocations_are_served_and_history_is_kept() {
    let f = fixture();
    let fpr = "05C0049DC1EA001AAE1F780E200E64A5B843DF65";
    assert!(matches!(
        publish_ok(&f, LIFE_V1).await,
        Decision::Published { version: 1, .. }
    ));
    // A newer version of the same key (a new subkey) replaces it.
    assert!(matches!(
        publish_ok(&f, LIFE_V2).await,
        Decision::Published { version: 2, .. }
    ));
    let Verified::Found {
        fingerprint,
        armored,
        ..
    } = retrieve(&f).await
    else {
        panic!("found expected")
    };
    assert_eq!(fingerprint, fpr);
    assert_eq!(
        crate::openpgp::dearmor_public_key(&armored, usize::MAX).unwrap(),
        as_published(LIFE_V2),
        "the update (with its new subkey) is served"
    );
    assert_ne!(as_published(LIFE_V1), as_published(LIFE_V2));
    // The revocation is stored, marked, and served so that clients learn of it.
    assert!(matches!(
        publish_ok(&f, LIFE_REVOKED).await,
        Decision::Published { version: 3, .. }
    ));
    let history = f.store.history(&addr("alice@example.net")).await.unwrap();
    assert_eq!(history.len(), 3);
    assert!(history[2].revoked && !history[1].revoked);
    let Verified::Found { armored, .. } = retrieve(&f).await else {
        panic!("found expected")
    };
    let served = crate::validate::validate(
        &armored,
        &addr("alice@example.net"),
        &crate::validate::KeyPolicy::default(),
        SystemTime::now(),
    )
    .unwrap();
    assert!(served.revoked, "the served key carries its revocation");
    // A different key replaces the revoked one; the old ones stay in the history.
    assert!(matches!(
        publish_ok(&f, ALICE).await,
        Decision::Published { version: 4, .. }
    ));
    let history = f.store.history(&addr("alice@example.net")).await.unwrap();
    assert_eq!(history.len(), 4);
    assert_ne!(history[3].fingerprint, fpr);
}

const UID2REV_SECOND: &str = include_str!("../testdata/keys/uid2rev-second.pub.asc");

/// A key with two User IDs of the account, one revoked (make-uid2rev-fixtures.sh): published,
/// stored and served with the revoked User ID and its revocation, so a client that knew that
/// User ID learns it is revoked.
#[tokio::test]
async fn a_revoked_second_user_id_is_published_and_served_with_its_revocation() {
    let f = fixture();
    assert!(matches!(
        publish_ok(&f, UID2REV_SECOND).await,
        Decision::Published { version: 1, .. }
    ));
    let Verified::Found {
        armored, user_ids, ..
    } = retrieve(&f).await
    else {
        panic!("found expected")
    };
    assert_eq!(
        user_ids,
        ["alice <alice@example.net>", "Alice Old <alice@example.net>"]
    );
    let served = crate::openpgp::dearmor_public_key(&armored, usize::MAX).unwrap();
    assert_eq!(
        served,
        crate::merge::canonical(&as_published(UID2REV_SECOND)).unwrap(),
        "stored as validated, in the store's canonical order"
    );
    let index = crate::certificate::Certificate::from_binary(&served)
        .unwrap()
        .hkp_index_entry(0);
    assert!(
        index.contains("uid:Alice Old <alice@example.net>:1735689600::r\n"),
        "the served key carries the revocation: {index}"
    );
    assert!(
        index.contains("uid:alice <alice@example.net>:1735689600::\n"),
        "{index}"
    );
}

fn deletion(account: &str, headers: &str) -> (Vec<u8>, client::Pending) {
    let req = client::build_deletion(&addr(account));
    let mut raw = headers.as_bytes().to_vec();
    raw.extend_from_slice(&req.message);
    (raw, req.pending)
}

#[tokio::test]
async fn the_owner_deletes_the_key_and_history() {
    let f = fixture();
    publish_ok(&f, LIFE_V1).await;
    publish_ok(&f, LIFE_V2).await;
    let (raw, pending) = deletion(
        "alice@example.net",
        &received("alice@example.net", "mail.example.net", "ESMTPSA"),
    );
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert_eq!(h.kind, RequestKind::Deletion);
    assert_eq!(
        h.decision,
        Decision::Deleted {
            address: addr("alice@example.net"),
            existed: true
        }
    );
    assert_eq!(
        client::verify_reply(&pending, &f.last_reply().message).unwrap(),
        Verified::Deleted {
            address: addr("alice@example.net")
        }
    );
    assert!(
        f.store
            .history(&addr("alice@example.net"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(retrieve(&f).await, Verified::NotFound { .. }));
    // The same deletion delivered again is confirmed again and changes nothing.
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Deleted { existed: false, .. }
    ));
    // A confirmation cannot be replayed to another request: its HMAC is bound to K_auth.
    let (_, other) = deletion("alice@example.net", "");
    let mut forged = other.clone();
    forged.message_id = pending.message_id.clone();
    assert_eq!(
        client::verify_reply(&forged, &f.last_reply().message),
        Err(client::ReplyError::BadHmac)
    );
}

/// The MTA delivers a publication again after the owner deleted the key (a lost LMTP reply, a
/// queue restored from backup): deletion wins. The redelivery is accepted, logged as
/// `deleted-since`, publishes nothing and sends nothing, also once the owner published anew.
#[tokio::test]
async fn a_publication_redelivered_after_the_deletion_is_not_published_again() {
    let f = fixture();
    let auth = received("alice@example.net", "mail.example.net", "ESMTPSA");
    let (first, _) = publication("alice@example.net", LIFE_V1, &auth);
    let h = f
        .kst
        .handle(&env("alice@example.net"), &first)
        .await
        .unwrap();
    assert!(matches!(h.decision, Decision::Published { version: 1, .. }));
    let (raw, _) = deletion("alice@example.net", &auth);
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Deleted { existed: true, .. }
    ));
    let sent = f.sent();

    let h = f
        .kst
        .handle(&env("alice@example.net"), &first)
        .await
        .unwrap();
    assert_eq!(h.kind, RequestKind::Publication);
    assert_eq!(h.decision, Decision::Ignored(Silence::DeletedSince));
    assert_eq!(h.decision.reason(), Some("deleted-since"));
    assert_eq!(
        f.sent(),
        sent,
        "no reply to a redelivery after the deletion"
    );
    assert!(
        f.store
            .get(&addr("alice@example.net"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(retrieve(&f).await, Verified::NotFound { .. }));

    // A new publication by the owner (new K_auth, so a new publication id) is published, and
    // the old message delivered once more still publishes nothing.
    assert!(matches!(
        publish_ok(&f, LIFE_V2).await,
        Decision::Published { version: 1, .. }
    ));
    let sent = f.sent();
    let h = f
        .kst
        .handle(&env("alice@example.net"), &first)
        .await
        .unwrap();
    assert_eq!(h.decision, Decision::Ignored(Silence::DeletedSince));
    assert_eq!(f.sent(), sent);
    let history = f.store.history(&addr("alice@example.net")).await.unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].key, as_published(LIFE_V2));
}

#[tokio::test]
async fn deletions_are_authenticated_like_publications() {
    let f = fixture();
    publish_ok(&f, LIFE_V1).await;
    let auth = |login: &str| received(login, "mail.example.net", "ESMTPSA");
    let cases: Vec<(&str, &str, String, Reason)> = vec![
        // Not submitted with authentication (from outside, or through an untrusted host).
        (
            "alice@example.net",
            "alice@example.net",
            String::new(),
            Reason::NotAuthenticated,
        ),
        (
            "alice@example.net",
            "alice@example.net",
            received("alice@example.net", "mx.evil.example", "ESMTPSA"),
            Reason::NotAuthenticated,
        ),
        (
            "alice@example.net",
            "alice@example.net",
            received("alice@example.net", "mail.example.net", "ESMTPS"),
            Reason::NotAuthenticated,
        ),
        // Bob authenticated, but asks for alice's account: From / envelope differ.
        (
            "alice@example.net",
            "alice@example.net",
            auth("bob@example.net"),
            Reason::SenderMismatch,
        ),
        (
            "alice@example.net",
            "bob@example.net",
            auth("bob@example.net"),
            Reason::SenderMismatch,
        ),
    ];
    for (from, sender, headers, reason) in cases {
        let (raw, _) = deletion(from, &headers);
        assert_eq!(refused(&f, &env(sender), &raw).await, reason, "{headers}");
    }
    // Bob deleting "his" key deletes only bob's (nothing), never alice's.
    let (raw, _) = deletion("bob@example.net", &auth("bob@example.net"));
    let h = f.kst.handle(&env("bob@example.net"), &raw).await.unwrap();
    assert!(matches!(
        h.decision,
        Decision::Deleted { existed: false, .. }
    ));
    assert_eq!(
        f.store
            .history(&addr("alice@example.net"))
            .await
            .unwrap()
            .len(),
        1
    );
    // A deletion without a usable K_auth is refused and deletes nothing.
    let body = "From: alice@example.net\r\nTo: keys@example.net\r\n\r\nDELETE\r\nnot-a-key\r\n";
    let raw = format!("{}{body}", auth("alice@example.net"));
    assert_eq!(
        refused(&f, &env("alice@example.net"), raw.as_bytes()).await,
        Reason::BadAuthKey
    );
    assert_eq!(
        f.store
            .history(&addr("alice@example.net"))
            .await
            .unwrap()
            .len(),
        1
    );
}

const EXPIRED: &str = include_str!("../testdata/keys/expired.pub.asc");
const TWO_CERTS: &str = include_str!("../testdata/keys/two-certs.pub.asc");
const UID_REVOKED: &str = include_str!("../testdata/keys/uid-revoked.pub.asc");

/// Key problems are refused with their own reason token, and the client reads it from an
/// authenticated reply.
#[tokio::test]
async fn key_problems_have_specific_reasons() {
    let f = fixture();
    let e = env("alice@example.net");
    let auth = received("alice@example.net", "mail.example.net", "ESMTPSA");
    let (raw, pending) = publication("alice@example.net", EXPIRED, &auth);
    assert_eq!(refused(&f, &e, &raw).await, Reason::KeyExpired);
    let reply = f.last_reply().message;
    assert!(String::from_utf8_lossy(&reply).contains("KST-Reason: key-expired"));
    match client::verify_reply(&pending, &reply).unwrap() {
        Verified::Refused {
            reason,
            token,
            authenticated,
            ..
        } => {
            assert_eq!(reason, Some(Reason::KeyExpired));
            assert_eq!(token.as_deref(), Some("key-expired"));
            assert!(authenticated);
        }
        other => panic!("{other:?}"),
    }

    // Hand-made bodies (the client refuses to build these): two keys; a key without alice.
    let k = AuthKey::generate();
    let body = |key: &str| {
        format!(
            "{auth}From: alice@example.net\r\nTo: keys@example.net\r\nMessage-ID: <k1@example.net>\r\n\r\n{}{}\r\n",
            key.replace('\n', "\r\n"),
            k.to_base64()
        )
    };
    assert_eq!(
        refused(&f, &e, body(TWO_CERTS).as_bytes()).await,
        Reason::SeveralKeys
    );
    assert_eq!(
        refused(&f, &e, body(BOB).as_bytes()).await,
        Reason::NoMatchingUserId
    );
    assert!(
        String::from_utf8_lossy(&f.last_reply().message)
            .contains("KST-Reason: no-matching-user-id")
    );
    // gpg --quick-revoke-uid on alice's User ID.
    assert_eq!(
        refused(&f, &e, body(UID_REVOKED).as_bytes()).await,
        Reason::UserIdRevoked
    );
    assert!(
        String::from_utf8_lossy(&f.last_reply().message).contains("KST-Reason: user-id-revoked")
    );
}

/// A reason token this client does not know (a newer KST's) is still authenticated and
/// reported as sent, not taken for a forgery.
#[tokio::test]
async fn unknown_reason_token_is_reported_not_rejected() {
    let f = fixture();
    let auth = received("alice@example.net", "mail.example.net", "ESMTPSA");
    let (raw, pending) = publication("alice@example.net", EXPIRED, &auth);
    refused(&f, &env("alice@example.net"), &raw).await;
    let reply = String::from_utf8(f.last_reply().message).unwrap();
    let k = AuthKey::parse(&pending.k_auth).unwrap();
    // The client asks for version 2, so the reply's HMAC is version 2's.
    let old_tag = crate::mac::statement_tag_for(
        2,
        &k,
        Status::Refused,
        Some(Reason::KeyExpired),
        Some("alice@example.net"),
    );
    assert!(reply.contains(&old_tag), "{reply}");
    let future = "key-from-the-future";
    let new_tag = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        crate::mac::hmac(
            &k,
            crate::mac::statement_for(2, Status::Refused, Some(future), Some("alice@example.net"))
                .as_bytes(),
        ),
    );
    let renamed = reply.replace("KST-Reason: key-expired", &format!("KST-Reason: {future}"));
    assert_eq!(
        client::verify_reply(&pending, renamed.replace(&old_tag, &new_tag).as_bytes()).unwrap(),
        Verified::Refused {
            reason: None,
            token: Some(future.into()),
            explanation: client::verify_reply(&pending, reply.as_bytes())
                .map(|v| match v {
                    Verified::Refused { explanation, .. } => explanation,
                    other => panic!("{other:?}"),
                })
                .unwrap(),
            authenticated: true,
        }
    );
    // The token is authenticated: renaming it without the tag is a forgery.
    assert_eq!(
        client::verify_reply(&pending, renamed.as_bytes()),
        Err(client::ReplyError::BadHmac)
    );
}

/// Fuzz findings (kst-core/testdata/fuzz/, minimized by `cargo fuzz tmin`) go through the
/// whole decision again: each must be decided without a panic.
#[tokio::test]
async fn fuzz_findings_are_decided_without_panic() {
    // handle target: a Received comment with a multi-byte character across byte 21.
    let raw = include_bytes!("../testdata/fuzz/handle-received-char-boundary.eml");
    let f = fixture();
    let h = f.kst.handle(&env("alice@example.net"), raw).await.unwrap();
    assert_eq!(
        h.decision,
        Decision::Refused {
            reason: Reason::NotAuthenticated
        }
    );
    assert!(f.store.map.lock().unwrap().is_empty());
}

#[tokio::test]
async fn without_an_envelope_the_topmost_return_path_decides_and_null_is_never_answered() {
    let f = fixture();
    let no_envelope = Envelope {
        sender: None,
        recipient: "keys@example.net".into(),
        sasl_username: None,
    };
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let with = |rp: &str| {
        let mut raw = rp.as_bytes().to_vec();
        raw.extend_from_slice(&req.message);
        raw
    };
    // pipe(8) flag R writes `Return-Path: <>` for a bounce: silence, not the From: address.
    for rp in ["Return-Path: <>\r\n", "Return-Path:  < >\r\n"] {
        let h = f.kst.handle(&no_envelope, &with(rp)).await.unwrap();
        assert_eq!(h.decision, Decision::Ignored(Silence::NullSender), "{rp:?}");
    }
    assert_eq!(f.sent(), 0);
    // A sender-written Return-Path lower in the message does not count.
    let raw = with("Return-Path: <>\r\nReturn-Path: <mallory@evil.example>\r\n");
    let h = f.kst.handle(&no_envelope, &raw).await.unwrap();
    assert_eq!(h.decision, Decision::Ignored(Silence::NullSender));
    let h = f
        .kst
        .handle(&no_envelope, &with("Return-Path: <Bob@acme.net>\r\n"))
        .await
        .unwrap();
    assert!(matches!(h.decision, Decision::Answered { .. }));
    assert_eq!(f.last_reply().recipient.as_str(), "Bob@acme.net");
    // No Return-Path at all: From stands in.
    let h = f.kst.handle(&no_envelope, &req.message).await.unwrap();
    assert!(matches!(h.decision, Decision::Answered { .. }));
    assert_eq!(f.last_reply().recipient.as_str(), "carol@acme.net");
}

/// The packets of the key a verified confirmation carries.
fn confirmed_key(pending: &client::Pending, message: &[u8]) -> Vec<u8> {
    match client::verify_reply(pending, message).unwrap() {
        Verified::Published { armored, .. } => {
            crate::openpgp::dearmor_public_key(&armored, 1 << 20).unwrap()
        }
        other => panic!("not a confirmation: {other:?}"),
    }
}

/// A publication delivered again after later publications of the same primary key (a subkey
/// from a second device, then a revocation) is confirmed with the key as stored now, which holds
/// it merged with them, at the current version, creating no version; after the key was
/// replaced by another primary key, with the version it made itself (the client's fingerprint
/// check still passes).
#[tokio::test]
async fn a_redelivery_is_confirmed_with_the_current_key_of_its_primary_key() {
    const BASE: &str = include_str!("../testdata/keys/merge-base.pub.asc");
    const SUBKEY: &str = include_str!("../testdata/keys/merge-subkey.pub.asc");
    const REVOKED: &str = include_str!("../testdata/keys/merge-revoked.pub.asc");
    const OTHER: &str = include_str!("../testdata/keys/lifecycle-v1.pub.asc");
    let f = fixture();
    let alice = addr("alice@example.net");
    let headers = received("alice@example.net", "mail.example.net", "ESMTPSA");
    let deliver = async |raw: &[u8]| {
        f.kst
            .handle(&env("alice@example.net"), raw)
            .await
            .unwrap()
            .decision
    };
    let (first, pending) = publication("alice@example.net", BASE, &headers);
    deliver(&first).await;
    let v1 = f.store.get(&alice).await.unwrap().unwrap();
    for (n, later) in [SUBKEY, REVOKED].into_iter().enumerate() {
        deliver(&publication("alice@example.net", later, &headers).0).await;
        let current = f.store.get(&alice).await.unwrap().unwrap();
        assert_eq!(current.version, 2 + n as u64);
        let decision = deliver(&first).await;
        assert_eq!(
            decision,
            Decision::Published {
                address: alice.clone(),
                version: current.version,
                fingerprint: v1.fingerprint.to_string(),
                new_version: false,
            }
        );
        assert_eq!(
            confirmed_key(&pending, &f.last_reply().message),
            current.key,
            "the redelivery is confirmed with the key as stored now"
        );
        assert_ne!(current.key, v1.key);
        assert_eq!(f.store.history(&alice).await.unwrap().len(), 2 + n);
    }
    assert!(f.store.get(&alice).await.unwrap().unwrap().revoked);

    deliver(&publication("alice@example.net", OTHER, &headers).0).await;
    let decision = deliver(&first).await;
    assert!(
        matches!(&decision, Decision::Published { version: 1, new_version: false, fingerprint, .. }
            if fingerprint == v1.fingerprint.as_str()),
        "{decision:?}"
    );
    assert_eq!(confirmed_key(&pending, &f.last_reply().message), v1.key);
    assert_eq!(f.store.history(&alice).await.unwrap().len(), 4);
}

/// `Handled::reply` says what became of the reply: sent (with its recipient and Message-ID),
/// refused for good by the relay (a 5xx: the request is still decided, the refusal reported,
/// never taken for a sent reply), or none for a request left unanswered.
#[tokio::test]
async fn the_reply_outcome_is_reported_sent_or_refused() {
    let f = fixture();
    let retrieve = |requester: &'static str| {
        let req = client::build_retrieval(&addr(requester), &addr("alice@example.net"));
        let kst = f.kst.clone();
        async move { (kst.handle(&env(requester), &req.message).await, req.message) }
    };
    let (h, _) = retrieve("carol@acme.net").await;
    let reply = h.unwrap().reply.expect("a reply");
    assert_eq!(reply.delivery, Delivery::Sent);
    assert_eq!(reply.to, addr("carol@acme.net"));
    assert_eq!(reply.message_id, f.last_reply().message_id);

    f.mailer.refusing.store(true, Ordering::SeqCst);
    let (h, request) = retrieve("dave@acme.net").await;
    let h = h.unwrap();
    assert_eq!(
        h.decision,
        Decision::Answered {
            status: Status::NotFound,
            address: addr("alice@example.net")
        },
        "decided without its reply"
    );
    let reply = h.reply.expect("a reply was handed to the mailer");
    assert_eq!(reply.to, addr("dave@acme.net"));
    match &reply.delivery {
        Delivery::Refused { code, text } => {
            assert_eq!(*code, 550);
            assert!(text.contains("dave@acme.net"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.sent(), 1, "only the first reply was sent");

    let mut ignored = request;
    ignored.splice(0..0, b"Auto-Submitted: auto-replied\r\n".iter().copied());
    let h = f.kst.handle(&env("dave@acme.net"), &ignored).await.unwrap();
    assert!(matches!(h.decision, Decision::Ignored(_)), "{h:?}");
    assert_eq!(h.reply, None);
}
