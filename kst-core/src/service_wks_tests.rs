//! The service with WKS submissions: the real `gpg-wks-client --create` mail, authenticated or
//! not, through [`Kst::handle`] with in-memory fakes.

use std::sync::Arc;

use crate::Policy;
use crate::client::Verified;
use crate::protocol::Reason;
use crate::ratelimit::{LimitKind, RateLimits};
use crate::service::tests::{Fixture, addr, env, fixture, fixture_with, received, retrieve};
use crate::service::{Decision, RequestKind, Silence};
use crate::wks::{SubmissionKey, SubmissionKeys};

const REQUEST: &str = include_str!("../../tests/fixtures/wks/create-request.eml");
const DECRYPTED: &str = include_str!("../../tests/fixtures/wks/create-request.decrypted.txt");
const SUBMISSION_SECRET: &str = include_str!("../../tests/fixtures/wks/submission-key.secret.asc");
const ALICE_FPR: &str = "E45AB727B2B452C91A2F74DA390B192D3F231610";

fn keys() -> Arc<SubmissionKeys> {
    let mut keys = SubmissionKeys::new();
    keys.insert(
        "example.net",
        SubmissionKey::from_armored(SUBMISSION_SECRET).unwrap(),
    );
    Arc::new(keys)
}

fn with_keys(f: Fixture) -> Fixture {
    Fixture {
        kst: f.kst.with_submission_keys(keys()),
        ..f
    }
}

/// The real request as the provider's submission server hands it on: its `Received:` header on
/// top, stating the SASL login.
fn authenticated(login: &str) -> Vec<u8> {
    let mut raw = received(login, "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(REQUEST.as_bytes());
    raw
}

/// The real request arriving from the Internet at the provider's MX: no authentication.
fn from_outside() -> Vec<u8> {
    let mut raw =
        b"Received: from mail.attacker.example (mail.attacker.example [198.51.100.7])\r\n\
        \tby mail.example.net (Postfix) with ESMTPS id 4B1C2D3E4F\r\n\
        \tfor <keys@example.net>; Thu, 3 Dec 2026 12:00:00 +0000 (UTC)\r\n"
            .to_vec();
    raw.extend_from_slice(REQUEST.as_bytes());
    raw
}

/// The message with every run of whitespace (line breaks of wrapped prose too) as one space.
/// Hands `raw` to kst with alice as the envelope sender.
async fn submit(f: &Fixture, raw: &[u8]) -> crate::service::Handled {
    let envelope = env("alice@example.net");
    f.kst.handle(&envelope, raw).await.unwrap()
}

async fn alice_has_no_key(f: &Fixture) -> bool {
    let key = f.kst.store().get(&addr("alice@example.net")).await;
    key.unwrap().is_none()
}

fn text(message: &[u8]) -> String {
    String::from_utf8_lossy(message)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn authenticated_submission_is_published_at_once_and_the_reply_says_so() {
    let f = with_keys(fixture());
    let h = submit(&f, &authenticated("alice@example.net")).await;
    assert_eq!(h.kind, RequestKind::Publication);
    let Decision::Published {
        address,
        version,
        fingerprint,
        new_version,
    } = &h.decision
    else {
        panic!("{:?}", h.decision)
    };
    assert_eq!(
        (address, *version, fingerprint.as_str(), *new_version),
        (&addr("alice@example.net"), 1, ALICE_FPR, true)
    );
    let stored = f.kst.store().get(&addr("alice@example.net")).await.unwrap();
    assert_eq!(stored.unwrap().fingerprint, ALICE_FPR);

    let reply = f.last_reply();
    assert_eq!(reply.recipient.as_str(), "alice@example.net");
    assert_eq!(reply.envelope_from, None, "RFC 3834: null envelope sender");
    let t = text(&reply.message);
    assert!(t.contains("Auto-Submitted: auto-replied"), "{t}");
    assert!(t.contains("KST-Status: published"), "{t}");
    assert!(t.contains(&format!("KST-Fingerprint: {ALICE_FPR}")), "{t}");
    assert!(t.contains("is now published for alice@example.net"), "{t}");
    assert!(t.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----"), "{t}");
    assert_eq!(f.sent(), 1);
}

#[tokio::test]
async fn redelivery_of_the_same_submission_adds_no_version() {
    let f = with_keys(fixture());
    let raw = authenticated("alice@example.net");
    for round in 0..2 {
        let h = submit(&f, &raw).await;
        assert!(
            matches!(h.decision, Decision::Published { version: 1, new_version, .. } if new_version == (round == 0)),
            "{:?}",
            h.decision
        );
    }
    let history = f
        .kst
        .store()
        .history(&addr("alice@example.net"))
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
}

#[tokio::test]
async fn unauthenticated_submission_is_never_published() {
    let f = with_keys(fixture());
    for raw in [REQUEST.as_bytes().to_vec(), from_outside()] {
        let h = submit(&f, &raw).await;
        assert_eq!(h.kind, RequestKind::Publication);
        assert_eq!(
            h.decision,
            Decision::Refused {
                reason: Reason::NotAuthenticated
            }
        );
        let reply = f.last_reply();
        assert_eq!(reply.recipient.as_str(), "alice@example.net");
        assert_eq!(reply.envelope_from, None);
        let t = text(&reply.message);
        assert!(t.contains("Auto-Submitted: auto-replied"), "{t}");
        assert!(t.contains("KST-Reason: not-authenticated"), "{t}");
        assert!(t.contains("authenticated submission"), "{t}");
        assert!(t.contains("gpg-wks-client --create writes"), "{t}");
    }
    assert!(alice_has_no_key(&f).await);
}

#[tokio::test]
async fn unauthenticated_refusals_are_rate_limited() {
    let mut p = Policy::new(&["example.net"], &["mail.example.net"]);
    p.rate_limits = RateLimits {
        per_sender: 2,
        ..RateLimits::OFF
    };
    let f = with_keys(fixture_with(p));
    let raw = from_outside();
    let mut decisions = Vec::new();
    for _ in 0..4 {
        let h = submit(&f, &raw).await;
        decisions.push(h.decision);
    }
    let refused = Decision::Refused {
        reason: Reason::NotAuthenticated,
    };
    let silenced = Decision::Ignored(Silence::RateLimited(LimitKind::Sender));
    assert_eq!(
        decisions,
        [refused.clone(), refused, silenced.clone(), silenced]
    );
    assert_eq!(f.sent(), 2, "only the replies within the limit went out");
}

#[tokio::test]
async fn auto_submitted_submission_gets_no_reply() {
    let f = with_keys(fixture());
    let mut raw = b"Auto-Submitted: auto-generated\r\n".to_vec();
    raw.extend_from_slice(&from_outside());
    let h = submit(&f, &raw).await;
    assert_eq!(h.decision, Decision::Ignored(Silence::AutoSubmitted));
    assert_eq!(f.sent(), 0);
}

#[tokio::test]
async fn another_account_cannot_submit_for_alice() {
    let f = with_keys(fixture());
    let h = submit(&f, &authenticated("bob@example.net")).await;
    assert_eq!(
        h.decision,
        Decision::Refused {
            reason: Reason::SenderMismatch
        }
    );
    assert!(alice_has_no_key(&f).await);
}

#[tokio::test]
async fn without_a_submission_key_the_refusal_says_what_to_do() {
    let f = fixture();
    let h = submit(&f, &authenticated("alice@example.net")).await;
    assert_eq!(
        h.decision,
        Decision::Refused {
            reason: Reason::Malformed
        }
    );
    let t = text(&f.last_reply().message);
    assert!(t.contains("no WKS submission key for example.net"), "{t}");
}

#[tokio::test]
async fn plain_pgp_keys_submission_is_published_without_a_submission_key() {
    let f = fixture();
    let key = &DECRYPTED[DECRYPTED.find("-----BEGIN").unwrap()..];
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPA").into_bytes();
    raw.extend_from_slice(
        format!(
            "From: alice@example.net\r\nTo: keys@example.net\r\nSubject: Key publishing request\r\n\
             Wks-Draft-Version: 3\r\nMIME-Version: 1.0\r\nContent-Type: application/pgp-keys\r\n\r\n{key}"
        )
        .as_bytes(),
    );
    let h = submit(&f, &raw).await;
    assert!(
        matches!(&h.decision, Decision::Published { fingerprint, .. } if fingerprint == ALICE_FPR),
        "{:?}",
        h.decision
    );
}

/// Garbage that claims to be a submission is decided (refused with a reason), never lost or a
/// temporary failure.
#[tokio::test]
async fn garbage_submissions_are_decided() {
    let f = with_keys(fixture());
    let head = received("alice@example.net", "mail.example.net", "ESMTPSA");
    let bodies = [
        "Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=b\r\n\r\n\
         --b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b\r\n\
         Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nAAAA\r\n\
         -----END PGP MESSAGE-----\r\n--b--\r\n"
            .to_string(),
        "Content-Type: application/pgp-keys\r\n\r\nnot a key\r\n".to_string(),
        "Wks-Draft-Version: 3\r\nContent-Type: text/plain\r\n\r\nhello\r\n".to_string(),
        "Content-Type: multipart/encrypted; boundary=b\r\n\r\n--b--\r\n".to_string(),
    ];
    for body in bodies {
        let raw = format!(
            "{head}From: alice@example.net\r\nTo: keys@example.net\r\nMIME-Version: 1.0\r\n{body}"
        );
        let h = submit(&f, raw.as_bytes()).await;
        assert_eq!(h.kind, RequestKind::Publication, "{body}");
        assert!(
            matches!(
                h.decision,
                Decision::Refused {
                    reason: Reason::Malformed | Reason::BadKey
                }
            ),
            "{body}: {:?}",
            h.decision
        );
    }
    assert_eq!(f.sent(), 4);
}

/// A published WKS key is what a paper-style retrieval then finds.
#[tokio::test]
async fn published_key_is_found_by_retrieval() {
    let f = with_keys(fixture());
    submit(&f, &authenticated("alice@example.net")).await;
    match retrieve(&f).await {
        Verified::Found { fingerprint, .. } => assert_eq!(fingerprint, ALICE_FPR),
        other => panic!("{other:?}"),
    }
}
