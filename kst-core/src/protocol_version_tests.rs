//! Version negotiation through [`crate::Kst::handle`] with in-memory fakes: one KST that speaks
//! versions 1 and 2 answers a version 2 request in 2, an old client's request (no
//! `KST-Protocol`) in 1, and refuses one that shares no version or MAC with it.

use crate::client::{self, ReplyError, Verified};
use crate::protocol::Reason;
use crate::service::Decision;
use crate::service::tests::{Fixture, addr, env, fixture, received};

const ALICE: &str = include_str!("../testdata/alice.pub.asc");

async fn published() -> Fixture {
    let f = fixture();
    let req = client::build_publication(&addr("alice@example.net"), ALICE).unwrap();
    let mut raw = received("alice@example.net", "mail.example.net", "ESMTPSA").into_bytes();
    raw.extend_from_slice(&req.message);
    let h = f.kst.handle(&env("alice@example.net"), &raw).await.unwrap();
    assert!(matches!(h.decision, Decision::Published { .. }), "{h:?}");
    f
}

/// The request with its `KST-Protocol` / `KST-MAC` lines replaced by `headers` (CRLF lines).
fn with_version_headers(message: &[u8], headers: &str) -> Vec<u8> {
    let text = String::from_utf8(message.to_vec()).unwrap();
    let kept: String = text
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("KST-Protocol:") && !l.starts_with("KST-MAC:"))
        .collect();
    assert_ne!(kept, text, "the client's request names its versions");
    format!("{headers}{kept}").into_bytes()
}

fn reply_text(f: &Fixture) -> String {
    String::from_utf8(f.last_reply().message).unwrap()
}

#[tokio::test]
async fn a_version_2_request_is_answered_in_version_2_by_a_kst_that_also_speaks_1() {
    let f = published().await;
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let text = String::from_utf8(req.message.clone()).unwrap();
    assert!(text.contains("KST-Protocol: 2, 1\r\n"), "{text}");
    assert!(text.contains("KST-MAC: hmac-sha256\r\n"), "{text}");
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    let reply = reply_text(&f);
    assert!(reply.contains("KST-Protocol: 2\r\n"), "{reply}");
    assert!(reply.contains("KST-MAC: hmac-sha256\r\n"), "{reply}");
    assert!(matches!(
        client::verify_reply(&req.pending, reply.as_bytes()),
        Ok(Verified::Found { .. })
    ));
    // Relabelled as version 1, the version 2 tag no longer verifies.
    let relabelled = reply
        .replace("KST-Protocol: 2\r\n", "KST-Protocol: 1\r\n")
        .replace("KST-MAC: hmac-sha256\r\n", "");
    assert_eq!(
        client::verify_reply(&req.pending, relabelled.as_bytes()),
        Err(ReplyError::BadHmac)
    );
}

#[tokio::test]
async fn an_old_clients_request_is_answered_in_version_1() {
    let f = published().await;
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    let old = with_version_headers(&req.message, "");
    f.kst.handle(&env("carol@acme.net"), &old).await.unwrap();
    let reply = reply_text(&f);
    assert!(reply.contains("KST-Protocol: 1\r\n"), "{reply}");
    assert!(!reply.contains("KST-MAC:"), "{reply}");
    assert!(matches!(
        client::verify_reply(&req.pending, reply.as_bytes()),
        Ok(Verified::Found { .. })
    ));
    // An explicit "1" is the same.
    let one = with_version_headers(&req.message, "KST-Protocol: 1\r\n");
    f.kst.handle(&env("carol@acme.net"), &one).await.unwrap();
    assert!(reply_text(&f).contains("KST-Protocol: 1\r\n"));
}

#[tokio::test]
async fn no_shared_version_or_mac_is_refused_clearly() {
    let f = published().await;
    let req = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    for (headers, says) in [
        ("KST-Protocol: 3\r\n", "version(s) \"3\""),
        (
            "KST-Protocol: 2\r\nKST-MAC: hmac-sha3-256\r\n",
            "MAC algorithm(s) \"hmac-sha3-256\"",
        ),
    ] {
        let raw = with_version_headers(&req.message, headers);
        let h = f.kst.handle(&env("carol@acme.net"), &raw).await.unwrap();
        assert_eq!(
            h.decision,
            Decision::Refused {
                reason: Reason::UnsupportedVersion
            }
        );
        let reply = reply_text(&f);
        assert!(reply.contains("KST-Protocol: 1\r\n"), "{reply}");
        assert!(reply.contains("KST-Reason: unsupported-version"), "{reply}");
        assert!(reply.contains(says), "{says} in {reply}");
        match client::verify_reply(&req.pending, reply.as_bytes()) {
            Ok(Verified::Refused {
                reason: Some(Reason::UnsupportedVersion),
                authenticated: false,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }
    // A reply in a version the client does not speak is an incompatibility, not an attack.
    f.kst
        .handle(&env("carol@acme.net"), &req.message)
        .await
        .unwrap();
    let future = reply_text(&f).replace("KST-Protocol: 2\r\n", "KST-Protocol: 3\r\n");
    assert_eq!(
        client::verify_reply(&req.pending, future.as_bytes()),
        Err(ReplyError::Version("3".into()))
    );
}
