//! Attacks on issue 13 through the real `kst deliver` binary and the filesystem store: the
//! per-source counter, forged null senders, and the Authentication-Results gate fooled by
//! From-header tricks or a forged header below the provider's. A passing test documents a
//! defence that holds; an `#[ignore = "BUG: ..."]` test reproduces a weakness still open.

use kst_core::AddressPolicy;
use kst_core::client;
use kst_tests::{TestKst, code, stderr};

fn addr(s: &str) -> kst_core::Address {
    AddressPolicy::default().normalize(s).unwrap()
}

/// What Postfix writes for an unauthenticated client that said `HELO {helo}` from `ip`.
fn received(helo: &str, ip: &str) -> String {
    format!(
        "Received: from {helo} (unknown [{ip}])\r\n\tby mail.example.net (Postfix) with ESMTPS id 61A40160923\r\n\tfor <keys@example.net>; Thu, 3 Dec 2026 13:00:00 +0000 (UTC)\r\n"
    )
}

/// A retrieval of `query` built by the real client for `requester`, with `from` (a whole
/// `From:` line, or "" to keep the client's) and `headers` prepended as the MTA would.
fn retrieval(requester: &str, query: &str, from: &str, headers: &str) -> Vec<u8> {
    let q = client::build_retrieval(&addr(requester), &addr(query));
    let text = String::from_utf8(q.message).unwrap();
    let text = if from.is_empty() {
        text
    } else {
        text.split_inclusive("\r\n")
            .map(|l| {
                if l.to_ascii_lowercase().starts_with("from:") {
                    format!("{from}\r\n")
                } else {
                    l.to_string()
                }
            })
            .collect()
    };
    format!("{headers}{text}").into_bytes()
}

fn deliver(kst: &TestKst, sender: Option<&str>, msg: &[u8], env: &[(&str, &str)]) -> String {
    let mut args = vec!["deliver", "--recipient", "keys@example.net"];
    if let Some(s) = sender {
        args.extend(["--sender", s]);
    }
    let out = kst.kst_env(&args, msg, env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    stderr(&out)
}

const SOURCE_LIMIT: [(&str, &str); 1] = [("KST_LIMITS__PER_SOURCE_IP", "2")];

#[test]
fn one_source_cannot_spray_many_forged_victims() {
    let kst = TestKst::new("");
    for i in 0..3 {
        let victim = format!("victim{i}@freemail.example");
        let msg = retrieval(&victim, "u@example.net", "", &received("x", "203.0.113.7"));
        deliver(&kst, Some(&victim), &msg, &SOURCE_LIMIT);
    }
    assert_eq!(kst.replies().len(), 2, "the third victim is not written to");
}

/// A HELO such as `x(y)by` (one word, accepted by a default Postfix) makes the parser see a
/// `by` clause of the client's, swallow Postfix's `by mail.example.net`, and find no trusted
/// header, so the request counts on no source at all: one host reaches every forged victim.
#[test]
fn a_helo_with_a_comment_and_by_cannot_escape_the_source_counter() {
    let kst = TestKst::new("");
    for i in 0..3 {
        let victim = format!("victim{i}@freemail.example");
        let msg = retrieval(
            &victim,
            "u@example.net",
            "",
            &received("x(y)by", "203.0.113.7"),
        );
        deliver(&kst, Some(&victim), &msg, &SOURCE_LIMIT);
    }
    assert_eq!(kst.replies().len(), 2, "the third victim is not written to");
}

#[test]
fn null_senders_in_any_spelling_get_no_reply() {
    let kst = TestKst::new("");
    let base = received("x", "203.0.113.7");
    for (sender, return_path) in [
        (Some(""), ""),
        (Some("<>"), ""),
        (Some(" <> "), ""),
        (None, "Return-Path: <>\r\n"),
        (None, "Return-Path: < >\r\n"),
        (None, "Return-Path: <> (bounce)\r\n"),
        (None, "Return-Path:\r\n"),
        (None, "Return-Path: <MAILER-DAEMON@freemail.example>\r\n"),
        (
            None,
            "Return-Path: <@relay.example:victim@freemail.example>\r\n",
        ),
        (None, "Return-Path: <\"victim\"@freemail.example>\r\n"),
        (
            None,
            "Return-Path: <>\r\nReturn-Path: <victim@freemail.example>\r\n",
        ),
    ] {
        let msg = retrieval(
            "victim@freemail.example",
            "u@example.net",
            "",
            &format!("{return_path}{base}"),
        );
        let log = deliver(&kst, sender, &msg, &[]);
        assert!(
            kst.replies().is_empty(),
            "{sender:?} {return_path:?} was answered: {log}"
        );
    }
}

const GATE: &str = "require_authentication_results = true\nauthserv_id = \"mx.example.net\"";

/// The provider's verdict on a message mallory really sent and signed through her freemail
/// account, replayed or sent with the victim as envelope sender.
fn signed_by_freemail() -> String {
    format!(
        "Authentication-Results: mx.example.net;\r\n\tdkim=pass header.d=freemail.example header.s=s1 header.b=abc;\r\n\tspf=fail smtp.mailfrom=victim@freemail.example;\r\n\tdmarc=pass header.from=freemail.example\r\n{}",
        received("smtp.freemail.example", "198.51.100.25")
    )
}

#[test]
fn the_gate_answers_the_mailbox_owner_it_vouches_for() {
    let kst = TestKst::new(GATE);
    let msg = retrieval(
        "victim@freemail.example",
        "u@example.net",
        "From: Victim <victim@freemail.example>",
        &signed_by_freemail(),
    );
    deliver(&kst, Some("victim@freemail.example"), &msg, &[]);
    assert_eq!(kst.replies().len(), 1, "the control case is answered");
}

#[test]
fn from_header_tricks_do_not_make_the_gate_vouch_for_the_victim() {
    let kst = TestKst::new(GATE);
    for from in [
        "From: \"victim@freemail.example\" <mallory@freemail.example>",
        "From: victim@freemail.example <mallory@freemail.example>",
        "From: mallory@freemail.example (victim@freemail.example)",
        "From: =?utf-8?q?victim=40freemail=2Eexample?= <mallory@freemail.example>",
        "From: <mallory@freemail.example> victim@freemail.example",
        "From: mallory@freemail.example, victim@freemail.example",
        "From: victim@freemail.example, mallory@freemail.example",
        "From: mallory@freemail.example\r\nFrom: victim@freemail.example",
        "From: victim@freemail.example\r\nFrom: mallory@freemail.example",
        "From: <victim@freemail.example\u{0}>",
        "From: \"victim\"@freemail.example",
        "From: victim@freemail.example.",
        "From: victim@xn--frmail-9ua.example",
    ] {
        let msg = retrieval(
            "victim@freemail.example",
            "u@example.net",
            from,
            &signed_by_freemail(),
        );
        let log = deliver(&kst, Some("victim@freemail.example"), &msg, &[]);
        assert!(kst.replies().is_empty(), "{from:?} was answered: {log}");
    }
}

#[test]
fn a_forged_authentication_results_below_the_providers_is_not_read() {
    let kst = TestKst::new(GATE);
    // The provider's own header on top says fail; the sender's own pass sits below it.
    let headers = format!(
        "Authentication-Results: mx.example.net; dkim=fail header.d=freemail.example\r\n{}Authentication-Results: mx.example.net; dkim=pass header.d=freemail.example\r\n",
        received("x", "203.0.113.7")
    );
    let msg = retrieval(
        "victim@freemail.example",
        "u@example.net",
        "From: victim@freemail.example",
        &headers,
    );
    deliver(&kst, Some("victim@freemail.example"), &msg, &[]);
    assert!(kst.replies().is_empty());
}

/// When the provider's MTA adds no `Authentication-Results:` (rspamd down with Postfix's
/// `milter_default_action = accept`, a message over rspamd's size limit, a path that skips the
/// milter), the sender's own header is the topmost one and the gate reads it. The provider's
/// milter writes its header above its own `Received:`; one below the topmost trusted
/// `Received:` was written by someone else and should never count.
#[test]
fn a_senders_authentication_results_below_the_trusted_received_is_not_read() {
    let kst = TestKst::new(GATE);
    let own_only = format!(
        "{}Authentication-Results: mx.example.net; dkim=pass header.d=freemail.example\r\n",
        received("x", "203.0.113.7")
    );
    let msg = retrieval(
        "victim@freemail.example",
        "u@example.net",
        "From: victim@freemail.example",
        &own_only,
    );
    let log = deliver(&kst, Some("victim@freemail.example"), &msg, &[]);
    assert!(kst.replies().is_empty(), "answered: {log}");
}

// --- issue 15: the merge and the size budget through the real `kst deliver` ---------------

/// A copy of the GnuPG home of `from` (a second device holding the same key).
fn fork_gpg(from: &kst_tests::Gpg) -> kst_tests::Gpg {
    let to = kst_tests::Gpg::new();
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.home().display()))
        .arg(to.home())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let _ = std::fs::remove_file(to.home().join("S.gpg-agent"));
    to
}

/// Publishes `armored` for alice through `kst deliver` (an authenticated submission) with
/// `env`; returns the verified reply.
fn publish_as_alice(kst: &TestKst, armored: &str, env: &[(&str, &str)]) -> client::Verified {
    let req = client::build_publication(&addr("alice@example.net"), armored).unwrap();
    let mut raw =
        kst_tests::received_authenticated("alice@example.net", "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let args = [
        "deliver",
        "--sender",
        "alice@example.net",
        "--recipient",
        "keys@example.net",
    ];
    let out = kst.kst_env(&args, &raw, env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    client::verify_reply(&req.pending, &kst.last_reply()).expect("a verified reply")
}

/// The owner's revocation must never be refused for the size of the merge. Device 2 published
/// a new signing subkey; device 1 never saw it and publishes the key's revocation. Each key
/// fits `limits.max_published_key_bytes` alone, their merge does not, and nothing is expired
/// or superseded: kst answered `key-too-large` and kept serving the key unrevoked. Now the
/// revocation is stored (within the budget) and served.
#[test]
fn a_revocation_is_published_even_when_the_merge_would_exceed_the_budget() {
    let kst = TestKst::new("");
    let device1 = kst_tests::Gpg::new();
    let alice = device1.generate("Alice", "alice@example.net", "ed25519");
    let device2 = fork_gpg(&device1);
    device2.run(&[
        "--passphrase",
        "",
        "--pinentry-mode",
        "loopback",
        "--quick-add-key",
        &alice.fingerprint,
        "ed25519",
        "sign",
        "never",
    ]);
    let with_signing = device2.export(&alice.fingerprint);
    let rev = std::fs::read_to_string(
        device1
            .home()
            .join("openpgp-revocs.d")
            .join(format!("{}.rev", alice.fingerprint)),
    )
    .unwrap()
    .replacen(":-----BEGIN", "-----BEGIN", 1);
    device1.import(&rev);
    let revocation = device1.export(&alice.fingerprint);
    let size = |armored: &str| {
        kst_core::validate::validate(
            armored,
            &addr("alice@example.net"),
            &kst_core::validate::KeyPolicy::default(),
            std::time::SystemTime::now(),
        )
        .unwrap()
        .packets
        .len()
    };
    let limit = size(&with_signing).max(size(&revocation)).to_string();
    let env = [("KST_LIMITS__MAX_PUBLISHED_KEY_BYTES", limit.as_str())];

    let first = publish_as_alice(&kst, &with_signing, &env);
    assert!(
        matches!(first, client::Verified::Published { .. }),
        "{first:?}"
    );
    let second = publish_as_alice(&kst, &revocation, &env);
    let client::Verified::Published { armored, .. } = second else {
        panic!("the revocation was refused: {second:?}");
    };
    let served = kst_core::certificate::Certificate::from_armored(&armored, 1 << 20).unwrap();
    assert!(
        served.is_revoked(),
        "the confirmation carries no revocation"
    );
    let out = kst.kst(&["keys", "get", "alice@example.net", "--json"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["revoked"], true, "{v}");
}
