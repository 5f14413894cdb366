//! DNS security of `kst client retrieve --direct` (issue 19) against the signed test DNS of
//! `scripts/testdns.sh` (BIND 9.18: a signed test root, signed example.net and acme.net,
//! unsigned insecure.net with a signed proof of no DS, DNS over TLS, and the forging,
//! signature-stripping and no-DS instances). The client validates with the test root's trust
//! anchor (`--dns-anchor`).
//!
//! The foreign MX is a small SMTP server in this file (STARTTLS with a given certificate) that
//! logs every command it receives, so a test can show that nothing (no `MAIL`, no `DATA`, hence
//! no K_auth) reached it after a failed DANE or MTA-STS check. MTA-STS policies are served by
//! `openssl s_server -WWW` with a certificate from the test DNS CA.
//!
//! `redteam` holds the attacks of the independent red-team round (DANE-TA, unusable and
//! mismatched TLSA records, expired DANE-EE certificates, STARTTLS stripping, MTA-STS policy
//! and cache attacks, protocol version tampering, odd Unicode); `harness` the shared parts.
//!
//! Needs root (testdns.sh starts BIND); the tests that need the DNS are skipped otherwise. Run
//! alone with `flock -o /work/team/dns.lock cargo test -p kst-tests --test dns_security` on the
//! shared machine.

#[path = "dns_security/harness.rs"]
mod harness;
#[path = "dns_security/redteam.rs"]
mod redteam;

use harness::{
    ATTACK, Mx, PolicyServer, Run, TEMPFAIL, UNAVAILABLE, certificate, error_of, show, sts_cert,
    testdns, tlsa_cert,
};
use kst_tests::code;

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn a_secure_mx_with_a_matching_tlsa_record_is_dane_authenticated_and_gets_the_request() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "alice@example.net", &mx, &[]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["outcome"], "pending", "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    assert_eq!(v["transport"]["mx"], "mail.example.net");
    assert_eq!(v["transport"]["tls"], true);
    assert_eq!(
        v["transport"]["authentication"],
        "dane-ee",
        "{}",
        show(&out, &v)
    );
    assert!(mx.saw("MESSAGE"), "{:?}", mx.log());
}

#[test]
fn dns_over_tls_to_binds_listener_gives_the_same_secure_answers_and_checks_the_name() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        dns,
        dns.var("KST_DNS_TLS_RESOLVER"),
        "alice@example.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    assert_eq!(v["transport"]["authentication"], "dane-ee");
    assert!(mx.saw("MESSAGE"));

    // The DoT certificate is for dns.test: another name fails the handshake, nothing is sent.
    let mx2 = Mx::start(Some((&cert, &key)));
    let wrong = format!("tls://127.0.0.1:{}#wrong.test", dns.var("KST_DNS_TLS_PORT"));
    let port2 = mx2.port.to_string();
    let (out, v) = run.retrieve(dns, &wrong, "alice@example.net", &["--mx-port", &port2]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert!(mx2.log().is_empty(), "{:?}", mx2.log());
}

#[test]
fn a_certificate_that_matches_no_tlsa_record_is_refused_before_anything_is_sent() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Valid for the name under the test CA (PKIX would pass), but not the TLSA record's key.
    let (cert, key) = certificate(dns, dir.path(), "other", &["mail.example.net"], false);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "alice@example.net", &mx, &[]);
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(error_of(&v).contains("DANE"), "{}", show(&out, &v));
    let log = mx.log();
    assert!(log.contains(&"STARTTLS".to_string()), "{log:?}");
    for verb in ["TLS-OK", "MAIL", "RCPT", "DATA", "MESSAGE"] {
        assert!(!log.contains(&verb.to_string()), "{verb} in {log:?}");
    }

    // DANE demands TLS: an MX that stops offering STARTTLS gets nothing, even with
    // --allow-plaintext.
    let plain = Mx::start(None);
    let (out, v) = run.to(dns, "alice@example.net", &plain, &["--allow-plaintext"]);
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        !plain.saw("MAIL") && !plain.saw("DATA"),
        "{:?}",
        plain.log()
    );
}

#[test]
fn forged_stripped_and_no_ds_answers_are_attacks_and_nothing_is_sent() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    for resolver in [
        "KST_DNS_FORGED_RESOLVER",
        "KST_DNS_STRIPPED_RESOLVER",
        "KST_DNS_NODS_RESOLVER",
    ] {
        let (out, v) = run.retrieve(
            dns,
            dns.var(resolver),
            "alice@example.net",
            &["--mx-port", &port],
        );
        assert_eq!(code(&out), ATTACK, "{resolver}: {}", show(&out, &v));
        assert!(
            error_of(&v).contains("DNSSEC"),
            "{resolver}: {}",
            show(&out, &v)
        );
    }
    // Single bogus records in the good zone: the MX host's address is tampered / unsigned.
    for host in ["tampered.example.net", "stripped.example.net"] {
        let mx_arg = format!("{host}:{port}");
        let (out, v) = run.retrieve(
            dns,
            dns.var("KST_DNS_RESOLVER"),
            "alice@example.net",
            &["--mx", &mx_arg],
        );
        assert_eq!(code(&out), ATTACK, "{host}: {}", show(&out, &v));
    }
    assert!(mx.log().is_empty(), "{:?}", mx.log());
    // Relayed: the forged NODATA for _submissions._tcp.example.net (which would push the client
    // from implicit TLS to STARTTLS) is refused as bogus before any connection or password.
    let (out, v) = run.run_client(
        dns,
        dns.var("KST_DNS_FORGED_RESOLVER"),
        "alice@example.net",
        &[
            "--maildir",
            "/nonexistent",
            "retrieve",
            "dave@acme.net",
            "--no-wait",
        ],
    );
    assert_eq!(code(&out), ATTACK, "relayed: {}", show(&out, &v));
    assert!(
        error_of(&v).contains("_submissions._tcp.example.net"),
        "{}",
        show(&out, &v)
    );
    // The refusal is about example.net: acme.net still validates through the forging server.
    let (out, v) = run.retrieve(
        dns,
        dns.var("KST_DNS_FORGED_RESOLVER"),
        "dave@acme.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure");
}

#[test]
fn an_unsigned_zone_is_insecure_its_tlsa_ignored_and_require_dnssec_refuses_it() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "insecure", "{}", show(&out, &v));
    // insecure.net publishes a TLSA record, but an insecure one does not count (RFC 7672).
    assert_eq!(
        v["transport"]["authentication"],
        "unauthenticated",
        "{}",
        show(&out, &v)
    );
    assert_eq!(v["transport"]["tls"], true);
    assert!(
        v["transport"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("encrypted but not authenticated")
    );
    assert!(mx.saw("MESSAGE"));

    let strict = Mx::start(Some((&cert, &key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &strict, &["--require-dnssec"]);
    assert_eq!(code(&out), UNAVAILABLE, "{}", show(&out, &v));
    assert!(error_of(&v).contains("--require-dnssec"));
    assert!(strict.log().is_empty(), "{:?}", strict.log());
}

#[test]
fn a_plaintext_mx_gets_the_request_only_with_allow_plaintext() {
    let Some(dns) = testdns() else { return };
    let mx = Mx::start(None);
    let run = Run::new();
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    assert_eq!(code(&out), UNAVAILABLE, "{}", show(&out, &v));
    assert!(!mx.saw("MAIL"), "{:?}", mx.log());
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &["--allow-plaintext"]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["transport"]["tls"], false, "{}", show(&out, &v));
    assert!(mx.saw("MESSAGE"));
}

#[test]
fn mta_sts_enforce_refuses_a_non_matching_mx_and_keeps_the_policy_cached() {
    let Some(dns) = testdns() else { return };
    // MTA-STS authenticates the MX by PKIX, with the test DNS CA only.
    let (cert, key) = sts_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    // insecure.net: no DANE (its zone is unsigned), so MTA-STS decides.
    let mut run = Run::new();
    let policy = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n",
    );
    run.sts_port = policy.port;
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(error_of(&v).contains("MTA-STS"), "{}", show(&out, &v));
    assert!(mx.log().is_empty(), "{:?}", mx.log());
    // The policy is cached for max_age: with the policy server gone it still applies.
    drop(policy);
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        error_of(&v).contains("mail.elsewhere.test"),
        "{}",
        show(&out, &v)
    );
    assert!(mx.log().is_empty(), "{:?}", mx.log());

    // A matching policy: the MX must show a PKIX-valid certificate for its name.
    let good = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.insecure.net\nmax_age: 86400\n",
    );
    let run = Run {
        sts_port: good.port,
        ..Run::new()
    };
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(
        v["transport"]["authentication"],
        "mta-sts",
        "{}",
        show(&out, &v)
    );
    assert!(mx.saw("MESSAGE"));

    // ...and a self-signed certificate fails that check before anything is sent.
    let dir = tempfile::tempdir().unwrap();
    let (bad_cert, bad_key) = certificate(dns, dir.path(), "self", &["mail.insecure.net"], true);
    let bad = Mx::start(Some((&bad_cert, &bad_key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &bad, &[]);
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(!bad.saw("MAIL") && !bad.saw("DATA"), "{:?}", bad.log());
}
