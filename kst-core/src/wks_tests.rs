//! Tests of WKS submissions with the real `gpg-wks-client --create` mail and hostile input.

use std::time::SystemTime;

use mail_parser::MessageParser;
use proptest::prelude::*;

use super::*;
use crate::address::AddressPolicy;
use crate::openpgp::parse_armored;
use crate::validate::{KeyPolicy, validate};

const REQUEST: &[u8] = include_bytes!("../../tests/fixtures/wks/create-request.eml");
const DECRYPTED: &str = include_str!("../../tests/fixtures/wks/create-request.decrypted.txt");
const SUBMISSION_SECRET: &str = include_str!("../../tests/fixtures/wks/submission-key.secret.asc");
const SUBMISSION_PUBLIC: &str = include_str!("../../tests/fixtures/wks/submission-key.asc");
const ALICE_SECRET: &str = include_str!("../../tests/fixtures/wks/alice.secret.asc");
/// Another key with an encryption subkey (not one the request was encrypted to).
const OTHER_SECRET: &str = include_str!("../testdata/alice.sec.asc");

const SUBMISSION_FPR: &str = "4357D7BD290B536F57376DC8546C22E8C02CD0A6";
const ALICE_FPR: &str = "E45AB727B2B452C91A2F74DA390B192D3F231610";
const MAX_KEY: usize = 1 << 20;

fn submission_key() -> SubmissionKey {
    SubmissionKey::from_armored(SUBMISSION_SECRET).expect("the fixture submission key")
}

fn recognized(raw: &[u8]) -> Option<Result<Submission, WksError>> {
    let msg = MessageParser::default().parse(raw)?;
    recognize(&msg)
}

/// The armored key block of the decrypted fixture body.
fn fixture_key_block() -> &'static str {
    let start = DECRYPTED.find(PUBLIC_KEY_BEGIN).expect("a key block");
    &DECRYPTED[start..]
}

#[test]
fn real_request_decrypts_to_alices_key() {
    let sub = recognized(REQUEST)
        .expect("a WKS message")
        .expect("a submission");
    assert!(matches!(sub, Submission::Encrypted(_)), "{sub:?}");
    let key = submission_key();
    assert_eq!(key.fingerprint(), SUBMISSION_FPR);
    let armored = extract_key(&sub, Some(&key), "example.net", MAX_KEY).expect("decrypts");
    assert_eq!(armored.trim_end(), fixture_key_block().trim_end());
    let public = parse_armored(&armored, MAX_KEY).expect("a public key");
    assert_eq!(public.fingerprint, ALICE_FPR);
    assert_eq!(public.user_ids, ["alice@example.net"]);
}

/// gpg-wks-client with `mailbox-only` sends a key whose only User ID is the bare address: the
/// key policy accepts it and keeps that User ID.
#[test]
fn mailbox_only_key_passes_the_key_policy() {
    let sub = recognized(REQUEST).unwrap().unwrap();
    let armored = extract_key(&sub, Some(&submission_key()), "example.net", MAX_KEY).unwrap();
    let alice = AddressPolicy::default()
        .normalize("alice@example.net")
        .unwrap();
    let valid = validate(&armored, &alice, &KeyPolicy::default(), SystemTime::now())
        .expect("the key policy accepts a bare-address User ID");
    assert_eq!(valid.fingerprint, ALICE_FPR);
    assert_eq!(valid.user_id, "alice@example.net");
}

#[test]
fn encrypted_to_another_key_is_a_clear_error() {
    let sub = recognized(REQUEST).unwrap().unwrap();
    let other = SubmissionKey::from_armored(OTHER_SECRET).expect("a usable key");
    let e = extract_key(&sub, Some(&other), "example.net", MAX_KEY).unwrap_err();
    assert_eq!(e, WksError::WrongKey(other.fingerprint().to_string()));
    assert!(e.to_string().contains("gpg-wks-client --create"), "{e}");
    assert_eq!(e.reason(), Reason::Malformed);
}

#[test]
fn encrypted_without_a_configured_key_says_so() {
    let sub = recognized(REQUEST).unwrap().unwrap();
    let e = extract_key(&sub, None, "example.net", MAX_KEY).unwrap_err();
    assert_eq!(e, WksError::NoSubmissionKey("example.net".into()));
    assert!(e.to_string().contains("kst wks keygen"), "{e}");
}

#[test]
fn the_users_own_key_can_decrypt_too_but_is_just_another_key() {
    // The request is encrypted to alice as well; a service configured with a key that is in
    // the recipient list decrypts it, whichever it is.
    let sub = recognized(REQUEST).unwrap().unwrap();
    let alice = SubmissionKey::from_armored(ALICE_SECRET).unwrap();
    let armored = extract_key(&sub, Some(&alice), "example.net", MAX_KEY).unwrap();
    assert_eq!(
        parse_armored(&armored, MAX_KEY).unwrap().fingerprint,
        ALICE_FPR
    );
}

fn plain_mail(content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "From: alice@example.net\r\nTo: keys@example.net\r\nSubject: Key publishing request\r\n\
         Wks-Draft-Version: 3\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n{body}"
    )
    .into_bytes()
}

#[test]
fn plain_pgp_keys_submission_yields_the_key() {
    let raw = plain_mail("application/pgp-keys", fixture_key_block());
    let sub = recognized(&raw).unwrap().unwrap();
    assert!(matches!(sub, Submission::Plain(_)));
    // No submission key is needed for a key sent in clear.
    let armored = extract_key(&sub, None, "example.net", MAX_KEY).unwrap();
    assert_eq!(
        parse_armored(&armored, MAX_KEY).unwrap().fingerprint,
        ALICE_FPR
    );
}

#[test]
fn plain_submission_without_the_wks_header_is_recognized_by_its_type() {
    let raw = format!(
        "From: alice@example.net\r\nTo: keys@example.net\r\nContent-Type: application/pgp-keys\r\n\r\n{}",
        fixture_key_block()
    );
    let sub = recognized(raw.as_bytes()).unwrap().unwrap();
    let armored = extract_key(&sub, None, "example.net", MAX_KEY).unwrap();
    assert_eq!(
        parse_armored(&armored, MAX_KEY).unwrap().fingerprint,
        ALICE_FPR
    );
}

#[test]
fn binary_key_in_base64_is_armored() {
    let packets = parse_armored(fixture_key_block(), MAX_KEY).unwrap().packets;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&packets);
    let raw = format!(
        "From: alice@example.net\r\nWks-Draft-Version: 3\r\nContent-Type: application/pgp-keys\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n"
    );
    let sub = recognized(raw.as_bytes()).unwrap().unwrap();
    let armored = extract_key(&sub, None, "example.net", MAX_KEY).unwrap();
    assert_eq!(parse_armored(&armored, MAX_KEY).unwrap().packets, packets);
}

#[test]
fn multipart_mixed_with_one_keys_part() {
    let body = format!(
        "--b\r\nContent-Type: text/plain\r\n\r\nplease publish\r\n--b\r\nContent-Type: \
         application/pgp-keys\r\n\r\n{}\r\n--b--\r\n",
        fixture_key_block()
    );
    let raw = plain_mail("multipart/mixed; boundary=b", &body);
    let sub = recognized(&raw).unwrap().unwrap();
    let armored = extract_key(&sub, None, "example.net", MAX_KEY).unwrap();
    assert_eq!(
        parse_armored(&armored, MAX_KEY).unwrap().fingerprint,
        ALICE_FPR
    );

    let two = "--b\r\nContent-Type: application/pgp-keys\r\n\r\nx\r\n--b\r\nContent-Type: \
         application/pgp-keys\r\n\r\ny\r\n--b--\r\n";
    let e = recognized(&plain_mail("multipart/mixed; boundary=b", two))
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string().contains("2 application/pgp-keys parts"),
        "{e}"
    );
}

#[test]
fn paper_style_requests_are_not_wks() {
    let raw = b"From: alice@example.net\r\nTo: keys@example.net\r\nSubject: x\r\n\r\n\
                bob@example.net\r\n40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E=\r\n";
    assert!(recognized(raw).is_none());
    let html = b"From: a@example.net\r\nContent-Type: text/html\r\n\r\n<p>hi</p>";
    assert!(recognized(html).is_none());
}

#[test]
fn other_wks_shapes_are_clear_errors() {
    let text = plain_mail("text/plain", "hello");
    let e = recognized(&text).unwrap().unwrap_err();
    assert!(matches!(e, WksError::NotASubmission(_)), "{e:?}");
    assert!(e.to_string().contains("text/plain"), "{e}");

    let confirm = plain_mail(
        "application/vnd.gnupg.wks",
        "type: confirmation-response\nsender: keys@example.net\nnonce: x\n",
    );
    let e = recognized(&confirm).unwrap().unwrap_err();
    assert_eq!(
        e,
        WksError::OtherWksMessage("WKS confirmation-response".into())
    );
    assert!(e.to_string().contains("auth-submit"), "{e}");

    let wrong_protocol = plain_mail(
        "multipart/encrypted; protocol=\"application/pkcs7-mime\"; boundary=b",
        "--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b--\r\n",
    );
    let e = recognized(&wrong_protocol).unwrap().unwrap_err();
    assert!(e.to_string().contains("application/pkcs7-mime"), "{e}");

    let one_part = plain_mail(
        "multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=b",
        "--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--b--\r\n",
    );
    let e = recognized(&one_part).unwrap().unwrap_err();
    assert!(e.to_string().contains("has 1 parts"), "{e}");
}

#[test]
fn oversize_key_is_refused_before_parsing() {
    let raw = plain_mail("application/pgp-keys", fixture_key_block());
    let sub = recognized(&raw).unwrap().unwrap();
    let e = extract_key(&sub, None, "example.net", 100).unwrap_err();
    assert_eq!(
        e,
        WksError::TooLarge {
            what: "key",
            limit: 100
        }
    );
    assert_eq!(e.reason(), Reason::KeyTooLarge);
    // The decrypted data is capped too: the fixture's key is over 600 bytes.
    let enc = recognized(REQUEST).unwrap().unwrap();
    let e = extract_key(&enc, Some(&submission_key()), "example.net", 10).unwrap_err();
    assert_eq!(
        e,
        WksError::TooLarge {
            what: "key",
            limit: 10
        }
    );
}

#[test]
fn garbage_in_the_encrypted_part_is_undecryptable() {
    let key = submission_key();
    for body in [
        &b""[..],
        b"hello",
        b"-----BEGIN PGP MESSAGE-----\r\n\r\nAAAA\r\n-----END PGP MESSAGE-----\r\n",
        SUBMISSION_PUBLIC.as_bytes(),
    ] {
        let e = extract_key(
            &Submission::Encrypted(body.to_vec()),
            Some(&key),
            "example.net",
            MAX_KEY,
        )
        .unwrap_err();
        assert!(matches!(e, WksError::Undecryptable(_)), "{e:?}");
    }
}

#[test]
fn submission_keys_are_checked_and_never_printed() {
    let key = submission_key();
    let shown = format!("{key:?}");
    assert!(shown.contains(SUBMISSION_FPR), "{shown}");
    assert!(!shown.contains("secret") && shown.len() < 120, "{shown}");
    let mut keys = SubmissionKeys::new();
    keys.insert("Example.NET", key);
    assert!(keys.get("example.net").is_some());
    assert!(format!("{keys:?}").len() < 200);

    let e = SubmissionKey::from_armored(SUBMISSION_PUBLIC).unwrap_err();
    assert!(matches!(e, SubmissionKeyError::Unreadable(_)), "{e:?}");
    assert!(e.to_string().contains("kst wks keygen"), "{e}");
    assert!(matches!(
        SubmissionKey::from_armored("garbage"),
        Err(SubmissionKeyError::Unreadable(_))
    ));
    let huge = "x".repeat(MAX_SECRET_KEY_BYTES + 1);
    assert_eq!(
        SubmissionKey::from_armored(&huge).unwrap_err(),
        SubmissionKeyError::TooLarge
    );
}

#[test]
fn the_submission_key_publishes_for_its_service_address_only() {
    let key = submission_key();
    let policy = KeyPolicy::default();
    let service = AddressPolicy::default()
        .normalize("keys@example.net")
        .unwrap();
    let a = key.publication(&service, &policy).unwrap();
    let b = key.publication(&service, &policy).unwrap();
    assert_eq!(a.fingerprint.as_str(), SUBMISSION_FPR);
    assert_eq!(a.address, service);
    assert_eq!(a.publication_id, b.publication_id, "idempotent");
    let other = AddressPolicy::default()
        .normalize("keys@example.org")
        .unwrap();
    let e = key.publication(&other, &policy).unwrap_err();
    assert!(e.contains("key policy"), "{e}");
}

#[test]
fn public_packets_are_the_submission_certificate() {
    let packets = submission_key().public_packets().unwrap();
    let public = crate::openpgp::parse_binary(&packets).unwrap();
    assert_eq!(public.fingerprint, SUBMISSION_FPR);
    assert_eq!(public.user_ids, ["Key Submission <keys@example.net>"]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Every truncation of the real request is recognized or not, and extracting from it ends
    /// in a key or an error, never a panic.
    #[test]
    fn truncated_requests_never_panic(cut in 0usize..REQUEST.len()) {
        let key = submission_key();
        if let Some(Ok(sub)) = recognized(&REQUEST[..cut]) {
            let _ = extract_key(&sub, Some(&key), "example.net", MAX_KEY);
        }
    }

    /// Flipping bytes of the real request: the same.
    #[test]
    fn corrupted_requests_never_panic(
        flips in proptest::collection::vec((0usize..REQUEST.len(), any::<u8>()), 1..8)
    ) {
        let mut raw = REQUEST.to_vec();
        for (at, b) in flips {
            raw[at] = b;
        }
        let key = submission_key();
        if let Some(Ok(sub)) = recognized(&raw)
            && let Ok(armored) = extract_key(&sub, Some(&key), "example.net", MAX_KEY)
        {
            // Whatever decrypts must still be an armored key text.
            prop_assert!(armored.contains("-----BEGIN PGP"));
        }
    }

    /// Arbitrary bytes as the encrypted part or as a plain key part.
    #[test]
    fn arbitrary_parts_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let key = submission_key();
        let _ = extract_key(&Submission::Encrypted(bytes.clone()), Some(&key), "example.net", MAX_KEY);
        let _ = extract_key(&Submission::Plain(bytes), None, "example.net", MAX_KEY);
    }
}
