//! `kst deliver` end to end: the real binary, real gpg keys, the filesystem store and the spool
//! mailer, driven the way Postfix's pipe(8) drives it.

use kst_core::client::{self, Asked, Verified};
use kst_core::{AddressPolicy, Reason};
use kst_tests::{
    Gpg, TestKst, code, on_every_backend, received_authenticated, received_plain, stderr,
};

fn addr(s: &str) -> kst_core::Address {
    AddressPolicy::default().normalize(s).unwrap()
}

/// The paper's Fig. 3 message, rebuilt with a real key: Return-Path, the trusted Received
/// header, To, From, Message-ID, Date, the key block and K_auth.
fn fig3(key: &str, k_auth: &str) -> Vec<u8> {
    format!(
        "Return-Path: <alice@example.net>\r\n{}To: keys@example.net\r\nFrom: Alice <alice@example.net>\r\nMessage-ID: <0efca192bb11e87d9978@example.net>\r\nDate: Sun, 4 Mar 2018 16:47:09 +0100\r\n\r\n{}{}\r\n",
        received_authenticated("alice@example.net", "mail.example.net"),
        key.replace('\n', "\r\n"),
        k_auth
    )
    .into_bytes()
}

/// The paper's Fig. 5 message with one address (see docs/PROTOCOL.md).
fn fig5(query: &str, k_auth: &str) -> Vec<u8> {
    format!(
        "Return-Path: <bob@acme.net>\r\n{}Message-Id: <2018031160923@acme.net>\r\nDate: Sun, 4 Mar 2018 16:34:15 +0100\r\nFrom: bob@acme.net\r\nTo: keys@example.net\r\n\r\n{query}\r\n{k_auth}\r\n",
        received_plain("mx.acme.net", "mail.example.net"),
    )
    .into_bytes()
}

fn pending(asked: Asked, id: &str, k: &kst_core::AuthKey) -> client::Pending {
    client::Pending {
        asked,
        message_id: id.into(),
        service: addr("keys@example.net"),
        k_auth: k.to_base64(),
        created_at: 0,
        head_key: None,
    }
}

#[test]
fn paper_figures_3_and_5_with_real_keys() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new("");

    let k_pub = kst_core::AuthKey::generate();
    let out = kst.deliver(
        "alice@example.net",
        "keys@example.net",
        &fig3(&alice.public_armored, &k_pub.to_base64()),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let confirmation = kst.last_reply();
    let p = pending(
        Asked::Publication {
            account: addr("alice@example.net"),
            fingerprint: alice.fingerprint.clone(),
        },
        "0efca192bb11e87d9978@example.net",
        &k_pub,
    );
    match client::verify_reply(&p, &confirmation).unwrap() {
        Verified::Published { fingerprint, .. } => assert_eq!(fingerprint, alice.fingerprint),
        other => panic!("{other:?}"),
    }

    let k_ret = kst_core::AuthKey::generate();
    let out = kst.deliver(
        "bob@acme.net",
        "keys@example.net",
        &fig5("alice@example.net", &k_ret.to_base64()),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let response = kst.last_reply();
    let text = String::from_utf8_lossy(&response);
    assert!(text.contains("X-Kst-Envelope-To: bob@acme.net") || text.contains("bob@acme.net"));
    let p = pending(
        Asked::Retrieval {
            address: addr("alice@example.net"),
        },
        "2018031160923@acme.net",
        &k_ret,
    );
    match client::verify_reply(&p, &response).unwrap() {
        Verified::Found {
            fingerprint,
            armored,
            ..
        } => {
            assert_eq!(fingerprint, alice.fingerprint);
            // The key a third party receives imports into real gpg.
            let other = Gpg::new();
            let status = other.import(&armored);
            assert!(status.contains("IMPORT_OK"), "{status}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_built_requests_round_trip_and_rsa_keys_work() {
    let gpg = Gpg::new();
    let carol = gpg.generate("Carol", "carol@example.org", "rsa3072");
    let kst = TestKst::new("");
    let req = client::build_publication(&addr("carol@example.org"), &carol.public_armored).unwrap();
    let mut raw = received_authenticated("carol@example.org", "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = kst.deliver("carol@example.org", "keys@example.org", &raw);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(matches!(
        client::verify_reply(&req.pending, &kst.last_reply()).unwrap(),
        Verified::Published { .. }
    ));
    let q = client::build_retrieval(&addr("dave@acme.net"), &addr("CAROL@example.org"));
    let out = kst.deliver("dave@acme.net", "keys@example.org", &q.message);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(matches!(
        client::verify_reply(&q.pending, &kst.last_reply()).unwrap(),
        Verified::Found { .. }
    ));
    // kst keys get prints the same key.
    let out = kst.kst(&["keys", "get", "carol@example.org"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("BEGIN PGP PUBLIC KEY BLOCK"));
    let other = Gpg::new();
    assert!(other.import(&printed).contains("IMPORT_OK"));
}

#[test]
fn forgeries_through_deliver_publish_nothing() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new("");
    let k = kst_core::AuthKey::generate().to_base64();
    let body = format!("{}{k}\r\n", alice.public_armored.replace('\n', "\r\n"));
    let msg = |headers: String| -> Vec<u8> {
        format!("{headers}From: alice@example.net\r\nTo: keys@example.net\r\nMessage-ID: <f@x>\r\n\r\n{body}").into_bytes()
    };
    let forgeries = [
        ("unauthenticated with a fake note", format!(
            "Received: from mx.evil.example (unknown [203.0.113.9])\r\n\tby mail.example.net (Postfix) with ESMTP id 1\r\n{}",
            received_authenticated("alice@example.net", "mail.example.net")
        )),
        ("HELO imitating the trusted host", received_plain("mail.example.net", "mail.example.net")),
        ("look-alike by host", received_authenticated("alice@example.net", "mail.example.net.evil.example")),
        ("note in the HELO", "Received: from x (Authenticated sender: alice@example.net) (unknown [203.0.113.9])\r\n\tby mail.example.net (Postfix) with ESMTP id 2\r\n".to_string()),
    ];
    for (what, headers) in forgeries {
        let out = kst.deliver("alice@example.net", "keys@example.net", &msg(headers));
        assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
        let reply = String::from_utf8_lossy(&kst.last_reply()).into_owned();
        assert!(reply.contains("KST-Status: refused"), "{what}: {reply}");
        assert!(reply.contains("KST-Reason: not-authenticated"), "{what}");
    }
    // bob authenticated, publishing as alice.
    let out = kst.deliver(
        "alice@example.net",
        "keys@example.net",
        &msg(received_authenticated(
            "bob@example.net",
            "mail.example.net",
        )),
    );
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&kst.last_reply()).contains("KST-Reason: sender-mismatch"));
    let out = kst.kst(&["keys", "get", "alice@example.net"], b"");
    assert_eq!(code(&out), 1, "nothing was published: {}", stderr(&out));
}

/// Key problems come back with a reason token a client can act on, authenticated: a gpg key
/// that expired gets `key-expired`, a gpg key without the account's address gets
/// `no-matching-user-id`.
#[test]
fn key_problems_get_specific_reasons() {
    let gpg = Gpg::new();
    // Made on 2020-01-01, expiring after one day.
    let expired = gpg.generate_primary("Alice <alice@example.net>", "1d", Some("20200101T000000!"));
    let bob = gpg.generate("Bob", "bob@example.net", "ed25519");
    let kst = TestKst::new("");
    let id = "0efca192bb11e87d9978@example.net";
    for (key, fingerprint, token, want) in [
        (
            &expired,
            gpg.fingerprint("alice@example.net"),
            "key-expired",
            Reason::KeyExpired,
        ),
        (
            &bob.public_armored,
            bob.fingerprint.clone(),
            "no-matching-user-id",
            Reason::NoMatchingUserId,
        ),
    ] {
        let k = kst_core::AuthKey::generate();
        let out = kst.deliver(
            "alice@example.net",
            "keys@example.net",
            &fig3(key, &k.to_base64()),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let reply = kst.last_reply();
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(&format!("KST-Reason: {token}")), "{text}");
        let p = pending(
            Asked::Publication {
                account: addr("alice@example.net"),
                fingerprint,
            },
            id,
            &k,
        );
        match client::verify_reply(&p, &reply).unwrap() {
            Verified::Refused {
                reason,
                token: sent,
                authenticated,
                ..
            } => {
                assert_eq!(reason, Some(want));
                assert_eq!(sent.as_deref(), Some(token));
                assert!(authenticated, "the refusal's HMAC verifies");
            }
            other => panic!("{other:?}"),
        }
    }
    let out = kst.kst(&["keys", "get", "alice@example.net"], b"");
    assert_eq!(code(&out), 1, "nothing was published: {}", stderr(&out));
}

#[test]
fn exit_codes_follow_sysexits() {
    let kst = TestKst::new("");
    let q = client::build_retrieval(&addr("dave@acme.net"), &addr("alice@example.net"));
    // Not for kst: a recipient that is not kst's.
    let out = kst.deliver("dave@acme.net", "alice@example.net", &q.message);
    assert_eq!(code(&out), 65, "{}", stderr(&out));
    let out = kst.deliver("dave@acme.net", "keys@acme.net", &q.message);
    assert_eq!(code(&out), 65);
    // Loops: accepted, unanswered.
    let out = kst.deliver("", "keys@example.net", &q.message);
    assert_eq!(code(&out), 0);
    assert!(kst.replies().is_empty());
    // Mailer unavailable (spool path under a file), store unavailable, configuration error:
    // all temporary (75), so that Postfix keeps the message; nothing is half-done.
    for (key, value) in [
        ("KST_MAILER__PATH", "/dev/null/outbox"),
        ("KST_STORE__PATH", "/dev/null/keys"),
        ("KST_MAILER__KIND", "carrier-pigeon"),
    ] {
        let out = kst.deliver_env("dave@acme.net", &q.message, &[(key, value)]);
        assert_eq!(code(&out), 75, "{key}={value}: {}", stderr(&out));
        assert!(kst.replies().is_empty(), "{key}={value}: no reply yet");
    }
    // And the retry once things are fine is answered.
    let out = kst.deliver("dave@acme.net", "keys@example.net", &q.message);
    assert_eq!(code(&out), 0);
    assert_eq!(kst.replies().len(), 1);
}

#[test]
fn sasl_argv_mode_uses_only_the_command_line() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new(r#"auth_source = "sasl-argv""#);
    let req = client::build_publication(&addr("alice@example.net"), &alice.public_armored).unwrap();
    // A perfect trusted header is not enough in this mode.
    let mut raw = received_authenticated("alice@example.net", "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = kst.deliver("alice@example.net", "keys@example.net", &raw);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&kst.last_reply()).contains("not-authenticated"));
    let out = kst.kst(
        &[
            "deliver",
            "--sender",
            "alice@example.net",
            "--recipient",
            "keys@example.net",
            "--sasl-username",
            "alice@example.net",
        ],
        &req.message,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(matches!(
        client::verify_reply(&req.pending, &kst.last_reply()).unwrap(),
        Verified::Published { .. }
    ));
}

#[test]
fn secret_key_is_never_stored() {
    let gpg = Gpg::new();
    gpg.generate("Alice", "alice@example.net", "ed25519");
    let secret = gpg.export_secret("alice@example.net");
    let kst = TestKst::new("");
    let k = kst_core::AuthKey::generate().to_base64();
    let raw = format!(
        "{}From: alice@example.net\r\nTo: keys@example.net\r\nMessage-ID: <s@x>\r\n\r\n{}{k}\r\n",
        received_authenticated("alice@example.net", "mail.example.net"),
        secret.replace('\n', "\r\n")
    );
    let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reply = String::from_utf8_lossy(&kst.last_reply()).into_owned();
    assert!(reply.contains("KST-Reason: secret-key"), "{reply}");
    assert_eq!(
        code(&kst.kst(&["keys", "get", "alice@example.net"], b"")),
        1
    );
    // Nothing of the secret key is on disk.
    for entry in walk(kst.dir.path()) {
        let data = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&data).contains("PRIVATE KEY"),
            "{}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn rate_limits_hold_across_deliver_processes() {
    // One `kst deliver` process per message: the fs store's counters are shared on disk.
    let kst = TestKst::new("");
    let env = [("KST_LIMITS__PER_SENDER", "2")];
    let mut outcomes = Vec::new();
    for i in 0..3 {
        let q =
            client::build_retrieval(&addr("dave@acme.net"), &addr(&format!("u{i}@example.net")));
        let out = kst.deliver_env("dave@acme.net", &q.message, &env);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        outcomes.push(stderr(&out));
    }
    assert_eq!(
        kst.replies().len(),
        2,
        "the third request is left unanswered"
    );
    assert!(outcomes[2].contains("rate-limited"), "{}", outcomes[2]);
    assert!(
        outcomes[2].contains("\"limit\":\"sender\""),
        "{}",
        outcomes[2]
    );
    // Another sender is not affected.
    let q = client::build_retrieval(&addr("erin@acme.net"), &addr("u0@example.net"));
    let out = kst.deliver_env("erin@acme.net", &q.message, &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(kst.replies().len(), 3);
}

/// Issue 13 item 2: oversize mail and `keys+extension@` of a served domain are decided (dropped,
/// logged, exit 0), never bounced (exit 65 made Postfix mail the attacker's text to whatever
/// sender was forged). The oversize message is read to its end: pipe(8) sees no broken pipe.
#[test]
fn oversize_and_extension_mail_is_dropped_never_bounced() {
    let kst = TestKst::new("");
    let q = client::build_retrieval(&addr("victim@acme.net"), &addr("alice@example.net"));
    for rcpt in ["keys+anything@example.net", "keys+x@example.org"] {
        let out = kst.deliver("victim@acme.net", rcpt, &q.message);
        assert_eq!(code(&out), 0, "{rcpt}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("address-extension"),
            "{}",
            stderr(&out)
        );
    }
    // 20 MiB, ten times the limit: read to its end and dropped.
    let mut big = q.message.clone();
    big.resize(20 * 1024 * 1024, b'x');
    let mut cmd = std::process::Command::new(kst_tests::kst_binary());
    cmd.args(["deliver", "--sender", "victim@acme.net"])
        .args(["--recipient", "keys@example.net", "--config"])
        .arg(&kst.config)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kst");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&big)
    });
    let out = child.wait_with_output().expect("kst runs");
    writer
        .join()
        .expect("writer")
        .expect("kst reads the whole oversize message (no broken pipe)");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("too-large"), "{}", stderr(&out));
    assert!(
        kst.replies().is_empty(),
        "nothing answered, nothing bounced"
    );
}

/// Issue 13 item 9: without `--sender`, a retrieval whose topmost `Return-Path:` is `<>` (what
/// pipe(8) flag R writes for a bounce) gets no reply; it does not fall back to `From:`.
#[test]
fn null_return_path_without_sender_is_never_answered() {
    let kst = TestKst::new("");
    let q = client::build_retrieval(&addr("bob@acme.net"), &addr("alice@example.net"));
    for rp in ["Return-Path: <>\r\n", "Return-Path:  < >\r\n"] {
        let mut raw = rp.as_bytes().to_vec();
        raw.extend_from_slice(&q.message);
        let out = kst.kst(&["deliver", "--recipient", "keys@example.net"], &raw);
        assert_eq!(code(&out), 0, "{rp}: {}", stderr(&out));
        assert!(stderr(&out).contains("null-sender"), "{}", stderr(&out));
    }
    assert!(kst.replies().is_empty(), "a null sender never gets a reply");
    // The same request with a real Return-Path is answered there.
    let mut raw = b"Return-Path: <bob@acme.net>\r\n".to_vec();
    raw.extend_from_slice(&q.message);
    let out = kst.kst(&["deliver", "--recipient", "keys@example.net"], &raw);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(kst.replies().len(), 1);
}

/// A retrieval from the internet, through the MX `mail.example.net` from `ip`.
fn forged_retrieval(sender: &str, query: &str, ip: &str) -> Vec<u8> {
    kst_tests::retrieval_from(sender, query, ip, "mail.example.net")
}

/// Issue 13 item 1 through `kst deliver` and the fs store's counters shared on disk by every
/// process: floods from many forged senders (envelope sender alice, from many hosts; retrievals
/// of alice's key from many throwaway senders of one domain) use up nothing alice needs. Her
/// authenticated publication and her own retrieval are answered, and so is a stranger's
/// retrieval of her key.
#[test]
fn forged_floods_do_not_lock_the_victim_out_of_deliver() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new("");
    let env = [
        ("KST_LIMITS__PER_SENDER", "3"),
        ("KST_LIMITS__PER_SENDER_QUERY", "2"),
        ("KST_LIMITS__PER_ACCOUNT", "3"),
    ];
    let deliver = |sender: &str, raw: &[u8]| {
        let out = kst.deliver_env(sender, raw, &env);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        stderr(&out)
    };
    // 8 forged requests as alice, each from another host: 3 answered (the backscatter cap),
    // then the sender counter is spent.
    let mut limited = 0;
    for i in 0..8 {
        let log = deliver(
            "alice@example.net",
            &forged_retrieval(
                "alice@example.net",
                &format!("u{i}@example.org"),
                &format!("198.51.100.{i}"),
            ),
        );
        limited += usize::from(log.contains("\"limit\":\"sender\""));
    }
    assert_eq!(
        limited, 5,
        "the per-recipient cap bounds backscatter to alice"
    );
    assert_eq!(kst.replies().len(), 3);
    // 8 retrievals of alice's key from 8 throwaway senders of one domain: all answered (the
    // queried address is no counter strangers can use up; nor is a sender domain).
    for i in 0..8 {
        let sender = format!("throwaway{i}@freemail.example");
        let log = deliver(
            &sender,
            &forged_retrieval(&sender, "alice@example.net", "192.0.2.9"),
        );
        assert!(!log.contains("rate-limited"), "{log}");
    }
    assert_eq!(kst.replies().len(), 11);
    // alice's own authenticated publication is published.
    let k = kst_core::AuthKey::generate();
    let log = deliver(
        "alice@example.net",
        &fig3(&alice.public_armored, &k.to_base64()),
    );
    assert!(log.contains("\"outcome\":\"published\""), "{log}");
    let p = pending(
        Asked::Publication {
            account: addr("alice@example.net"),
            fingerprint: alice.fingerprint.clone(),
        },
        "0efca192bb11e87d9978@example.net",
        &k,
    );
    assert!(matches!(
        client::verify_reply(&p, &kst.last_reply()).unwrap(),
        Verified::Published { .. }
    ));
    // Her own retrieval, through the provider's authenticated submission, is answered.
    let q = client::build_retrieval(&addr("alice@example.net"), &addr("bob@example.org"));
    let mut raw = received_authenticated("alice@example.net", "mail.example.net").into_bytes();
    raw.extend_from_slice(&q.message);
    let log = deliver("alice@example.net", &raw);
    assert!(log.contains("not-found"), "{log}");
    assert!(matches!(
        client::verify_reply(&q.pending, &kst.last_reply()).unwrap(),
        Verified::NotFound { .. }
    ));
    // And a new correspondent still gets her key.
    let q = client::build_retrieval(&addr("carol@acme.net"), &addr("alice@example.net"));
    deliver("carol@acme.net", &q.message);
    assert!(matches!(
        client::verify_reply(&q.pending, &kst.last_reply()).unwrap(),
        Verified::Found { .. }
    ));
}

const AMPLIFIED: &str = include_str!("../kst-core/testdata/keys/amplified.pub.asc");
const AMPLIFIED_TOO_LARGE: &str =
    include_str!("../kst-core/testdata/keys/amplified-too-large.pub.asc");

/// Publishes `key` as alice (Fig. 3 through `kst deliver`) and verifies the reply.
fn publish_as_alice(kst: &TestKst, key: &str, fingerprint: &str) -> Verified {
    let k = kst_core::AuthKey::generate();
    let out = kst.deliver(
        "alice@example.net",
        "keys@example.net",
        &fig3(key, &k.to_base64()),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let p = pending(
        Asked::Publication {
            account: addr("alice@example.net"),
            fingerprint: fingerprint.into(),
        },
        "0efca192bb11e87d9978@example.net",
        &k,
    );
    client::verify_reply(&p, &kst.last_reply()).unwrap()
}

/// Issue 13, item 4: a key flooded with self-signatures carrying large hashed notations is
/// published reduced to its newest self-signatures, a key still over the budget after that is
/// refused with `key-too-large`, and what one small unauthenticated retrieval makes kst send is
/// bounded by the budget. Measures the reply-to-request size ratio (docs/SECURITY.md).
#[test]
fn amplification_is_bounded_by_the_published_key_budget() {
    let budget = kst_core::validate::DEFAULT_MAX_PUBLISHED_BYTES;
    let kst = TestKst::new("");
    let fingerprint = "076B6B1C4E3D8B6CA4FB5B2D8C7C9568AC2194E2";

    // Still too large after the reduction: refused, with an authenticated key-too-large.
    match publish_as_alice(&kst, AMPLIFIED_TOO_LARGE, fingerprint) {
        Verified::Refused {
            reason,
            authenticated,
            ..
        } => {
            assert_eq!(reason, Some(Reason::KeyTooLarge));
            assert!(authenticated);
        }
        other => panic!("{other:?}"),
    }
    let out = kst.kst(&["keys", "get", "alice@example.net"], b"");
    assert_eq!(code(&out), 1, "nothing was published: {}", stderr(&out));

    // 65 self-certifications with 9 KB notations (902 KB armored): published reduced.
    assert!(matches!(
        publish_as_alice(&kst, AMPLIFIED, fingerprint),
        Verified::Published { .. }
    ));

    // An unauthenticated retrieval of it, as a client builds it, and as small as an attacker
    // can write one (no Message-ID, no Date): the reply carries the reduced key, armored.
    // Bound: armor is 4/3 of the binary plus a line break per 64 characters, plus the reply's
    // headers and text (well under 4 KiB).
    let reply_bound = budget * 4 / 3 * 66 / 64 + 4096;
    let built = client::build_retrieval(&addr("mallory@acme.net"), &addr("alice@example.net"));
    let small_k = kst_core::AuthKey::generate();
    let small = format!(
        "From: m@acme.net\r\nTo: keys@example.net\r\n\r\nalice@example.net\r\n{}\r\n",
        small_k.to_base64()
    )
    .into_bytes();
    for (what, sender, request) in [
        ("client-built", "mallory@acme.net", &built.message),
        ("minimal", "m@acme.net", &small),
    ] {
        let before = kst.replies().len();
        let out = kst.deliver(sender, "keys@example.net", request);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            kst.replies().len(),
            before + 1,
            "{what} request was answered"
        );
        let reply = kst.last_reply();
        if what == "client-built" {
            match client::verify_reply(&built.pending, &reply).unwrap() {
                Verified::Found {
                    fingerprint: got, ..
                } => assert_eq!(got, fingerprint),
                other => panic!("{other:?}"),
            }
        }
        let ratio = reply.len() as f64 / request.len() as f64;
        eprintln!(
            "amplification ({what} retrieval): request {} bytes, reply {} bytes, ratio {ratio:.1} \
             (bound {reply_bound} bytes of reply for a {budget}-byte budget)",
            request.len(),
            reply.len()
        );
        assert!(reply.len() <= reply_bound, "{what}: {}", reply.len());
        assert!(ratio <= reply_bound as f64 / request.len() as f64);
        // Without the reduction the same request would have carried the 902 KB key.
        assert!(reply.len() * 8 < AMPLIFIED.len(), "{what}: {}", reply.len());
    }
}

/// Deletion wins over a redelivery, on every backend, through `kst deliver`: alice publishes,
/// then deletes; the MTA then delivers her publication message again (a lost pipe(8) exit
/// status, a queue restored from a backup). The redelivery exits 0 (accepted: decided and
/// logged as `deleted-since`), sends no reply and publishes nothing; a retrieval finds nothing.
/// A new publication of hers is published, and the old message delivered once more still is
/// not.
#[test]
fn a_publication_redelivered_after_the_deletion_is_not_published_again() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let account = addr("alice@example.net");
    let authenticated = |message: &[u8]| {
        let mut raw = received_authenticated("alice@example.net", "mail.example.net").into_bytes();
        raw.extend_from_slice(message);
        raw
    };
    on_every_backend(|kst| {
        let publication = client::build_publication(&account, &alice.public_armored).unwrap();
        let first = authenticated(&publication.message);
        let out = kst.deliver("alice@example.net", "keys@example.net", &first);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(matches!(
            client::verify_reply(&publication.pending, &kst.last_reply()).unwrap(),
            Verified::Published { .. }
        ));
        let deletion = client::build_deletion(&account);
        let out = kst.deliver(
            "alice@example.net",
            "keys@example.net",
            &authenticated(&deletion.message),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            client::verify_reply(&deletion.pending, &kst.last_reply()).unwrap(),
            Verified::Deleted {
                address: account.clone()
            }
        );

        let replies = kst.replies().len();
        let out = kst.deliver("alice@example.net", "keys@example.net", &first);
        assert_eq!(code(&out), 0, "accepted, not deferred: {}", stderr(&out));
        assert!(
            stderr(&out).contains("deleted-since"),
            "logged: {}",
            stderr(&out)
        );
        assert_eq!(kst.replies().len(), replies, "no reply to the redelivery");
        let out = kst.kst(&["keys", "get", "alice@example.net"], b"");
        assert_eq!(code(&out), 1, "nothing published again: {}", stderr(&out));
        let q = client::build_retrieval(&addr("bob@acme.net"), &account);
        let out = kst.deliver("bob@acme.net", "keys@example.net", &q.message);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(matches!(
            client::verify_reply(&q.pending, &kst.last_reply()).unwrap(),
            Verified::NotFound { .. }
        ));

        // A new publication (new K_auth, new id) is published; the old message still is not.
        let again = client::build_publication(&account, &alice.public_armored).unwrap();
        let out = kst.deliver(
            "alice@example.net",
            "keys@example.net",
            &authenticated(&again.message),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(matches!(
            client::verify_reply(&again.pending, &kst.last_reply()).unwrap(),
            Verified::Published { .. }
        ));
        let replies = kst.replies().len();
        let out = kst.deliver("alice@example.net", "keys@example.net", &first);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(stderr(&out).contains("deleted-since"), "{}", stderr(&out));
        assert_eq!(kst.replies().len(), replies);
        let out = kst.kst(&["keys", "history", "alice@example.net"], b"");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let listing = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            listing.matches(&alice.fingerprint).count(),
            1,
            "one version, the new publication: {listing}"
        );
    });
}
