//! The independent red-team round on issue 19: each attack through the real `kst` binary, the
//! signed BIND test DNS (with the extra records of [`super::harness`]), real TLS on loopback,
//! and an MX that records every line it receives, so "K_auth never left" is asserted on what
//! the MX saw rather than on what the client says.

use std::path::Path;
use std::process::Command;

use kst_tests::{TestKst, code, kst_binary, retrieval_from, run_json, stderr};
use serde_json::Value;

use super::harness::{
    ATTACK, Issuer, Mx, PolicyServer, Run, StartTls, TEMPFAIL, UNAVAILABLE, USAGE, chain, error_of,
    expired_self_signed, issue, make_ca, outcome_is, show, sts_cert, testdns, tlsa_cert,
};

// ---------------------------------------------------------------------------------------------
// DANE

#[test]
fn dane_ta_authenticates_a_chain_the_named_ca_issued_and_nothing_else() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let test_ca = Path::new(dns.var("KST_DNS_CA"));
    // dane-ta.example.net's MX is ta.example.net, whose TLSA record is `2 0 1` of the test CA.
    let (leaf, key) = issue(dns, d, "ta", &["ta.example.net"], Issuer::TestCa);
    let good = chain(&d.join("good-chain.pem"), &[&leaf, test_ca]);
    let mx = Mx::start(Some((&good, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "alice@dane-ta.example.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, Some("dane-ta"), "DANE-TA");
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    assert_eq!(v["transport"]["mx"], "ta.example.net");
    mx.assert_request_received("DANE-TA, chain from the named CA");

    // Another CA's chain: no certificate in it matches the record.
    let (other_ca, other_key) = make_ca(d, "other-ca");
    let (leaf2, key2) = issue(
        dns,
        d,
        "ta-other",
        &["ta.example.net"],
        Issuer::Ca(&other_ca, &other_key),
    );
    let foreign = chain(&d.join("foreign-chain.pem"), &[&leaf2, &other_ca]);
    // The named CA's certificate is sent along, but did not issue the server's certificate:
    // the chain does not lead to the trust anchor.
    let decoy = chain(&d.join("decoy-chain.pem"), &[&leaf2, test_ca]);
    // The named CA issued it, but for another name: DANE-TA checks the MX name (RFC 7672
    // §3.2.2), unlike DANE-EE.
    let (leaf3, key3) = issue(dns, d, "ta-name", &["mail.attacker.test"], Issuer::TestCa);
    let misnamed = chain(&d.join("misnamed-chain.pem"), &[&leaf3, test_ca]);
    for (what, cert, key) in [
        ("another CA's chain", &foreign, &key2),
        ("the anchor sent along but not the issuer", &decoy, &key2),
        (
            "the anchor's certificate for another name",
            &misnamed,
            &key3,
        ),
    ] {
        let mx = Mx::start(Some((cert, key)));
        let (out, v) = run.to(dns, "alice@dane-ta.example.net", &mx, &[]);
        outcome_is(&out, &v, ATTACK, None, what);
        assert!(error_of(&v).contains("DANE"), "{what}: {}", show(&out, &v));
        assert!(mx.saw("STARTTLS"), "{what}: {:?}", mx.log());
        mx.assert_nothing_sent(what);
    }
}

#[test]
fn dane_ee_ignores_expiry_and_name_of_a_matching_certificate_as_rfc_7672_says() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The TLSA record's key in a self-signed certificate for another name, expired in 2020:
    // RFC 7672 §3.1.1 says DANE-EE checks neither (the key is what is pinned).
    let (_, key) = tlsa_cert(dns);
    let expired = expired_self_signed(dir.path(), &key, "expired.invalid");
    let mx = Mx::start(Some((&expired, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "alice@example.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, Some("dane-ee"), "");
    assert_eq!(v["transport"]["pkix"], false, "{}", show(&out, &v));
    mx.assert_request_received("expired DANE-EE certificate");
}

#[test]
fn a_tlsa_record_with_the_right_key_under_the_wrong_selector_matches_nothing() {
    let Some(dns) = testdns() else { return };
    // selector.example.net: `3 0 1 <SHA-256 of the SPKI>`: the hash of the key, but selector 0
    // (whole certificate). A client that ignored the selector would accept it.
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let (out, v) = run.retrieve(
        dns,
        dns.var("KST_DNS_RESOLVER"),
        "alice@example.net",
        &["--mx", &format!("selector.example.net:{}", mx.port)],
    );
    outcome_is(&out, &v, ATTACK, None, "");
    mx.assert_nothing_sent("wrong selector");
}

#[test]
fn only_unusable_tlsa_records_demand_tls_but_do_not_authenticate() {
    let Some(dns) = testdns() else { return };
    // pkix.example.net has only PKIX-TA(0) and PKIX-EE(1) records, which RFC 7672 §3.1.3 makes
    // unusable for SMTP: the hop is not authenticated by them, but a secure TLSA RRset still
    // means TLS is mandatory (RFC 7672 §2.2; Postfix's "encrypt" level): no cleartext, not
    // even with --allow-plaintext.
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let resolver = dns.var("KST_DNS_RESOLVER");
    let target = format!("pkix.example.net:{}", mx.port);
    let (out, v) = run.retrieve(dns, resolver, "alice@example.net", &["--mx", &target]);
    outcome_is(&out, &v, TEMPFAIL, Some("unauthenticated"), "");
    mx.assert_request_received("unusable TLSA records, TLS");

    let plain = Mx::start(None);
    let target = format!("pkix.example.net:{}", plain.port);
    let (out, v) = run.retrieve(
        dns,
        resolver,
        "alice@example.net",
        &["--mx", &target, "--allow-plaintext"],
    );
    outcome_is(&out, &v, ATTACK, None, "");
    plain.assert_nothing_sent("unusable TLSA records, MX without STARTTLS");
}

#[test]
fn dane_is_not_used_unless_both_the_mx_and_the_tlsa_rrsets_are_secure() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A certificate the TLSA records of mail.example.net do not name. Were DANE applied, the
    // hop would be refused; without it the hop is opportunistic and reported as such.
    let (cert, key) = issue(
        dns,
        dir.path(),
        "mx",
        &["mail.example.net", "mail.insecure.net"],
        Issuer::TestCa,
    );
    let run = Run::new();
    // sec-mx.insecure.net: an insecure MX RRset naming mail.example.net (secure TLSA): the MX
    // name itself could be forged, so its TLSA records prove nothing (RFC 7672 §2.2.1).
    // ins-mx.example.net: a secure MX RRset naming mail.insecure.net, whose TLSA is insecure.
    for (address, mx_name) in [
        ("bob@sec-mx.insecure.net", "mail.example.net"),
        ("bob@ins-mx.example.net", "mail.insecure.net"),
    ] {
        let mx = Mx::start(Some((&cert, &key)));
        let (out, v) = run.to(dns, address, &mx, &[]);
        outcome_is(&out, &v, TEMPFAIL, None, address);
        assert_eq!(v["dnssec"], "insecure", "{address}: {}", show(&out, &v));
        assert_eq!(
            v["transport"]["mx"],
            mx_name,
            "{address}: {}",
            show(&out, &v)
        );
        assert_eq!(
            v["transport"]["authentication"],
            "unauthenticated",
            "{address}: {}",
            show(&out, &v)
        );
        mx.assert_request_received(address);
        // --require-dnssec refuses either: part of the way rests on an unsigned zone.
        let strict = Mx::start(Some((&cert, &key)));
        let (out, v) = run.to(dns, address, &strict, &["--require-dnssec"]);
        outcome_is(&out, &v, UNAVAILABLE, None, address);
        strict.assert_nothing_sent(address);
        assert!(strict.log().is_empty(), "{address}: {:?}", strict.log());
    }
}

// ---------------------------------------------------------------------------------------------
// STARTTLS stripping

#[test]
fn starttls_stripping_and_lying_servers_never_get_the_request() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let resolver = dns.var("KST_DNS_RESOLVER");
    let run = Run::new();
    // An MX that says `220` to STARTTLS and then goes on in cleartext: the handshake fails and
    // nothing follows, on an opportunistic hop (insecure.net) with --allow-plaintext too, and
    // on a DANE hop (example.net), where it is an attack.
    for (address, args, exit) in [
        ("bob@insecure.net", &[][..], UNAVAILABLE),
        ("bob@insecure.net", &["--allow-plaintext"][..], UNAVAILABLE),
        ("alice@example.net", &["--allow-plaintext"][..], ATTACK),
    ] {
        let mx = Mx::with(Some((&cert, &key)), StartTls::LieAndStayPlain);
        let mut all = vec!["--mx-port".to_string(), mx.port.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (out, v) = run.retrieve(dns, resolver, address, &all);
        assert_eq!(code(&out), exit, "{address} {args:?}: {}", show(&out, &v));
        assert!(mx.saw("STARTTLS"), "{:?}", mx.log());
        mx.assert_nothing_sent(&format!("lying STARTTLS, {address} {args:?}"));
    }
    // `454` to STARTTLS on a DANE hop: try again later, never in clear.
    let mx = Mx::with(Some((&cert, &key)), StartTls::Refuse);
    let (out, v) = run.to(dns, "alice@example.net", &mx, &["--allow-plaintext"]);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    mx.assert_nothing_sent("STARTTLS refused with 454 on a DANE hop");
}

// ---------------------------------------------------------------------------------------------
// MTA-STS

const ENFORCE_ELSEWHERE: &str =
    "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n";

/// The policy note and authentication of a run that reached the MX.
fn sts_note(v: &Value) -> String {
    v["transport"]["mta_sts"].as_str().unwrap_or("").to_string()
}

#[test]
fn mta_sts_testing_reports_only_and_enforce_refuses_cleartext_even_when_allowed() {
    let Some(dns) = testdns() else { return };
    // MTA-STS authenticates the MX by PKIX, with the test DNS CA only.
    let (cert, key) = sts_cert(dns);
    let testing = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: testing\nmx: mail.elsewhere.test\nmax_age: 86400\n",
    );
    let mut run = Run::new();
    run.sts_port = testing.port;
    let mx = Mx::start(Some((&cert, &key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    assert_eq!(v["transport"]["authentication"], "unauthenticated");
    assert!(sts_note(&v).contains("fetched"), "{}", show(&out, &v));
    mx.assert_request_received("MTA-STS testing");
    drop(testing);

    // enforce, the MX named, but it offers no STARTTLS: no cleartext, --allow-plaintext or not.
    let enforce = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.insecure.net\nmax_age: 86400\n",
    );
    let run = Run {
        sts_port: enforce.port,
        ..Run::new()
    };
    let plain = Mx::start(None);
    let (out, v) = run.to(dns, "bob@insecure.net", &plain, &["--allow-plaintext"]);
    outcome_is(&out, &v, ATTACK, None, "");
    plain.assert_nothing_sent("MTA-STS enforce, MX without STARTTLS");
}

#[test]
fn mta_sts_a_wildcard_pattern_matches_exactly_one_label() {
    let Some(dns) = testdns() else { return };
    // MTA-STS authenticates the MX by PKIX, with the test DNS CA only.
    let (cert, key) = sts_cert(dns);
    let policy = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: *.insecure.net\nmax_age: 86400\n",
    );
    let run = Run {
        sts_port: policy.port,
        ..Run::new()
    };
    let resolver = dns.var("KST_DNS_RESOLVER");
    let mx = Mx::start(Some((&cert, &key)));
    // Two labels in place of the `*`: refused before any look-up or connection.
    let deep = format!("x.mail.insecure.net:{}", mx.port);
    let (out, v) = run.retrieve(dns, resolver, "bob@insecure.net", &["--mx", &deep]);
    outcome_is(&out, &v, ATTACK, None, "");
    assert!(
        error_of(&v).contains("x.mail.insecure.net"),
        "{}",
        show(&out, &v)
    );
    // The bare domain is no match for `*.insecure.net` either.
    let bare = format!("insecure.net:{}", mx.port);
    let (out, v) = run.retrieve(dns, resolver, "bob@insecure.net", &["--mx", &bare]);
    outcome_is(&out, &v, ATTACK, None, "");
    mx.assert_nothing_sent("MX outside the wildcard");
    // One label: mail.insecure.net (the real MX) matches.
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    assert_eq!(v["transport"]["authentication"], "mta-sts");
    mx.assert_request_received("MX inside the wildcard");
}

#[test]
fn mta_sts_policies_that_are_not_valid_are_no_policies() {
    let Some(dns) = testdns() else { return };
    // MTA-STS authenticates the MX by PKIX, with the test DNS CA only.
    let (cert, key) = sts_cert(dns);
    let mut oversize = ENFORCE_ELSEWHERE.as_bytes().to_vec();
    for i in 0..2000 {
        oversize.extend_from_slice(format!("x_padding_{i}: {}\n", "a".repeat(30)).as_bytes());
    }
    assert!(oversize.len() > 64 * 1024);
    // Each would refuse the MX if it were taken as a policy. RFC 8461 §3.3: a policy that
    // cannot be fetched or parsed (and none cached) means "as if the domain had no MTA-STS".
    for (what, body, self_signed) in [
        (
            "max_age negative",
            "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: -1\n".as_bytes(),
            false,
        ),
        ("over 64 KiB", &oversize[..], false),
        (
            "served with a self-signed (not PKIX-valid) certificate",
            ENFORCE_ELSEWHERE.as_bytes(),
            true,
        ),
    ] {
        let policy = PolicyServer::serve(dns, "insecure.net", body, self_signed);
        let run = Run {
            sts_port: policy.port,
            ..Run::new()
        };
        let mx = Mx::start(Some((&cert, &key)));
        let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
        outcome_is(&out, &v, TEMPFAIL, Some("unauthenticated"), what);
        assert!(
            sts_note(&v).contains("failed"),
            "{what}: {}",
            show(&out, &v)
        );
        assert!(
            !run.sts_cache().join("insecure.net.json").exists(),
            "{what}: cached"
        );
        mx.assert_request_received(what);
    }

    // A huge max_age is cut to RFC 8461's limit (about a year) in the cache.
    let policy = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.insecure.net\nmax_age: 99999999999999999\n",
    );
    let run = Run {
        sts_port: policy.port,
        ..Run::new()
    };
    let mx = Mx::start(Some((&cert, &key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    let cached: Value =
        serde_json::from_slice(&std::fs::read(run.sts_cache().join("insecure.net.json")).unwrap())
            .unwrap();
    assert_eq!(cached["max_age"], 31_557_600, "{cached}");
}

/// Writes a cached policy for insecure.net into `run`'s cache.
fn plant_cache(run: &Run, text: &str) {
    std::fs::create_dir_all(run.sts_cache()).unwrap();
    std::fs::write(run.sts_cache().join("insecure.net.json"), text).unwrap();
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn mta_sts_cache_follows_the_policy_id_and_survives_tampering_and_blocking() {
    let Some(dns) = testdns() else { return };
    // MTA-STS authenticates the MX by PKIX, with the test DNS CA only.
    let (cert, key) = sts_cert(dns);
    let stale = format!(
        r#"{{"id":"old1","mode":"enforce","mx":["mail.elsewhere.test"],"max_age":86400,"fetched_at":{}}}"#,
        now() - 60
    );

    // The TXT record's id (20261203T000000) differs from the cached one: the policy is fetched
    // again and replaces the cache.
    let policy = PolicyServer::start(
        dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.insecure.net\nmax_age: 86400\n",
    );
    let run = Run {
        sts_port: policy.port,
        ..Run::new()
    };
    plant_cache(&run, &stale);
    let mx = Mx::start(Some((&cert, &key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    assert_eq!(v["transport"]["authentication"], "mta-sts");
    let cached: Value =
        serde_json::from_slice(&std::fs::read(run.sts_cache().join("insecure.net.json")).unwrap())
            .unwrap();
    assert_eq!(cached["id"], "20261203T000000", "{cached}");
    mx.assert_request_received("new policy id");
    drop(policy);

    // An attacker announces a new id and blocks the policy host: the cached policy still
    // applies (an enforce policy that does not name the MX: refused).
    let run = Run::new();
    plant_cache(&run, &stale);
    let mx = Mx::start(Some((&cert, &key)));
    let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
    outcome_is(&out, &v, ATTACK, None, "");
    mx.assert_nothing_sent("cached enforce policy, policy host blocked");

    // A cache file that is not a policy (garbage, a wrong shape, an enforce policy without
    // MX patterns, a policy from the future) is ignored, never a crash; without a policy host
    // the hop is then opportunistic.
    for junk in [
        "\u{0}\u{1}garbage".to_string(),
        r#"{"id":"x","mode":"enforce"}"#.to_string(),
        format!(
            r#"{{"id":"20261203T000000","mode":"enforce","mx":[],"max_age":86400,"fetched_at":{}}}"#,
            now()
        ),
        format!(
            r#"{{"id":"20261203T000000","mode":"enforce","mx":["mail.elsewhere.test"],"max_age":18446744073709551615,"fetched_at":{}}}"#,
            now() + 10 * 365 * 86400
        ),
    ] {
        let run = Run::new();
        plant_cache(&run, &junk);
        let mx = Mx::start(Some((&cert, &key)));
        let (out, v) = run.to(dns, "bob@insecure.net", &mx, &[]);
        outcome_is(&out, &v, TEMPFAIL, Some("unauthenticated"), "");
        mx.assert_request_received(&junk);
    }
}

#[test]
fn a_bogus_answer_for_the_mta_sts_policy_host_is_an_attack_not_a_missing_policy() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    // sts-bogus.example.net announces a policy; its policy host resolves (through a signed
    // CNAME) to a tampered A record. Treated as "could not fetch", the hop would go out
    // opportunistically on first contact, as if the domain had no MTA-STS.
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let (out, v) = run.to(dns, "alice@sts-bogus.example.net", &mx, &[]);
    outcome_is(&out, &v, ATTACK, None, "");
    assert!(error_of(&v).contains("DNSSEC"), "{}", show(&out, &v));
    mx.assert_nothing_sent("bogus MTA-STS policy host");
    assert!(mx.log().is_empty(), "{:?}", mx.log());
}

// ---------------------------------------------------------------------------------------------
// DNS over TLS

#[test]
fn dns_over_tls_never_falls_back_to_cleartext() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    // The plain DNS port spoken to as DoT (no TLS there), and the DoT port with the right
    // name but a CA the client does not trust (no --ca-file: the web roots only).
    let plain_as_tls = format!("tls://127.0.0.1:{}#dns.test", dns.var("KST_DNS_PORT"));
    let (out, v) = run.retrieve(
        dns,
        &plain_as_tls,
        "alice@example.net",
        &["--mx-port", &mx.port.to_string()],
    );
    outcome_is(&out, &v, TEMPFAIL, None, "");
    let mut cmd = Command::new(kst_binary());
    cmd.args(["client", "--account", "carol@acme.net", "--json"])
        .args(["--client-config", "/dev/null"])
        .args(["--resolver", dns.var("KST_DNS_TLS_RESOLVER")])
        .args(["--dns-anchor", dns.var("KST_DNS_ANCHOR")])
        .arg("--state-file")
        .arg(run.dir.path().join("untrusted.json"))
        .args(["retrieve", "alice@example.net", "--direct", "--no-wait"])
        .args(["--mx-port", &mx.port.to_string()])
        .env_remove("KST_CLIENT_CONFIG");
    let (out, v) = run_json(cmd);
    outcome_is(&out, &v, TEMPFAIL, None, "");
    mx.assert_nothing_sent("DoT that fails");
    assert!(mx.log().is_empty(), "{:?}", mx.log());
}

// ---------------------------------------------------------------------------------------------
// Odd Unicode in what is handed to the resolver

#[test]
fn odd_unicode_in_addresses_and_mx_names_is_refused_or_resolved_as_its_a_label() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(dns);
    let resolver = dns.var("KST_DNS_RESOLVER");
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    // Bidi controls, zero-width characters and other invisible or control characters in the
    // domain: not an address (exit 64), nothing looked up or sent.
    for address in [
        "alice@example.net\u{200f}",
        "alice@\u{202e}ten.elpmaxe",
        "alice@example.net\u{7}",
        "alice@example..net",
        "alice@-example.net",
    ] {
        let (out, v) = run.retrieve(dns, resolver, address, &["--mx-port", &port]);
        assert_eq!(code(&out), USAGE, "{address:?}: {}", show(&out, &v));
    }
    // U+0000 cannot travel in argv, but a client.toml can carry it (TOML's \u0000 escape).
    let toml = run.dir.path().join("nul.toml");
    std::fs::write(&toml, "account = \"carol\\u0000@acme.net\"\n").unwrap();
    let mut cmd = Command::new(kst_binary());
    cmd.args(["client", "--json", "--client-config"])
        .arg(&toml)
        .args([
            "--resolver",
            resolver,
            "--dns-anchor",
            dns.var("KST_DNS_ANCHOR"),
        ])
        .arg("--state-file")
        .arg(run.dir.path().join("nul.json"))
        .args(["retrieve", "alice@example.net", "--direct", "--no-wait"])
        .args(["--mx-port", &port])
        .env_remove("KST_ACCOUNT")
        .env_remove("KST_CLIENT_CONFIG");
    let (out, v) = run_json(cmd);
    assert_eq!(code(&out), USAGE, "NUL in the account: {}", show(&out, &v));
    // A homograph (Cyrillic а in "exаmple.net") is another domain: the resolver gets its
    // A-label, which the signed net. zone proves does not exist; the output names the A-label.
    let (out, v) = run.retrieve(
        dns,
        resolver,
        "alice@ex\u{430}mple.net",
        &["--mx-port", &port],
    );
    assert_ne!(code(&out), 0, "{}", show(&out, &v));
    assert!(
        error_of(&v).contains("xn--"),
        "the A-label is shown: {}",
        show(&out, &v)
    );
    // Spellings that are the same domain under UTS 46 (full-width letters, an ideographic full
    // stop, a zero-width space, which UTS 46 ignores) reach the same, DANE-authenticated MX,
    // and the output names the domain as resolved, so nothing invisible is hidden in it.
    for address in [
        "alice@\u{ff45}xample\u{3002}net",
        "alice@exa\u{200b}mple.net",
    ] {
        let (out, v) = run.retrieve(dns, resolver, address, &["--mx-port", &port]);
        assert_eq!(code(&out), TEMPFAIL, "{address:?}: {}", show(&out, &v));
        assert_eq!(
            v["address"],
            "alice@example.net",
            "{address:?}: {}",
            show(&out, &v)
        );
        assert_eq!(v["transport"]["authentication"], "dane-ee");
    }
    // An MX host that is an IDN (xn--mil-qla.example.net, "mäil") is used as its A-label for
    // TLSA, the address and TLS, and authenticated by its TLSA record like any other.
    let (out, v) = run.to(dns, "alice@idn-mx.example.net", &mx, &[]);
    outcome_is(&out, &v, TEMPFAIL, Some("dane-ee"), "IDN MX");
    assert_eq!(
        v["transport"]["mx"],
        "xn--mil-qla.example.net",
        "{}",
        show(&out, &v)
    );
    // An MX given with a bidi control in its name: refused, not sent anywhere.
    let (out, v) = run.retrieve(
        dns,
        resolver,
        "alice@example.net",
        &["--mx", &format!("mail.example.net\u{202e}:{port}")],
    );
    outcome_is(&out, &v, USAGE, None, "");
    assert_eq!(
        mx.log().iter().filter(|l| *l == "MESSAGE").count(),
        3,
        "{:?}",
        mx.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Protocol version negotiation (no DNS needed)

/// A KST (`kst deliver`, example.net, `auth_source = "sasl-argv"`) whose replies are spooled,
/// and a client whose requests a sendmail-style script hands to it, reading replies from a
/// Maildir the test fills.
struct Negotiation {
    dir: tempfile::TempDir,
}

impl Negotiation {
    fn new() -> Negotiation {
        let dir = tempfile::Builder::new()
            .prefix("kst-version-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(p.join("Maildir").join(sub)).unwrap();
        }
        std::fs::write(
            p.join("kst.toml"),
            format!(
                "[kst]\ndomains = [\"example.net\"]\nauth_source = \"sasl-argv\"\n\n[store]\nbackend = \"fs\"\npath = \"{}\"\n\n[mailer]\nkind = \"spool\"\npath = \"{}\"\n",
                p.join("keys").display(),
                p.join("outbox").display()
            ),
        )
        .unwrap();
        let script = p.join("sendmail");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec '{}' deliver --config '{}' --sender \"$3\" --recipient \"$5\"\n",
                kst_binary().display(),
                p.join("kst.toml").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Negotiation { dir }
    }

    fn client(&self, args: &[&str]) -> (std::process::Output, Value) {
        let p = self.dir.path();
        let mut cmd = Command::new(kst_binary());
        cmd.args(["client", "--account", "carol@acme.net", "--json"])
            .args(["--client-config", "/dev/null", "--timeout", "0"])
            .args(["--resolver", "127.0.0.1:9"])
            .arg("--sendmail")
            .arg(p.join("sendmail"))
            .arg("--maildir")
            .arg(p.join("Maildir"))
            .arg("--state-file")
            .arg(p.join("pending.json"))
            .args(args)
            .env_remove("KST_CLIENT_CONFIG")
            .env_remove("KST_PASSWORD");
        run_json(cmd)
    }

    fn deliver_to_maildir(&self, name: &str, raw: &[u8]) {
        std::fs::write(self.dir.path().join("Maildir/new").join(name), raw).unwrap();
    }

    fn reply(&self) -> String {
        let outbox = self.dir.path().join("outbox");
        let file = std::fs::read_dir(&outbox)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "eml"))
            .expect("a reply in the outbox");
        String::from_utf8(std::fs::read(file).unwrap()).unwrap()
    }

    fn pending(&self) -> usize {
        let (_, v) = self.client(&["pending"]);
        v.as_array().map_or(0, Vec::len)
    }
}

/// `raw` with the header line starting `name:` replaced by `line` (removed when `None`).
fn with_header(raw: &str, name: &str, line: Option<&str>) -> String {
    let mut out = String::new();
    let mut done = false;
    for l in raw.split_inclusive('\n') {
        if !done
            && l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        {
            if let Some(new) = line {
                out.push_str(new);
                out.push_str("\r\n");
            }
            done = true;
            continue;
        }
        out.push_str(l);
    }
    assert!(done, "no {name} header in {raw}");
    out
}

#[test]
fn a_reply_relabelled_to_another_version_or_mac_is_never_used_and_the_request_stays_pending() {
    let n = Negotiation::new();
    let (out, v) = n.client(&["retrieve", "alice@example.net", "--no-wait"]);
    assert_eq!(code(&out), TEMPFAIL, "{v}\n{}", stderr(&out));
    assert_eq!(n.pending(), 1);
    let genuine = n.reply();
    assert!(genuine.contains("KST-Protocol: 2\r\n"), "{genuine}");
    assert!(genuine.contains("KST-MAC: hmac-sha256\r\n"), "{genuine}");

    // What an attacker on the reply's path (without K_auth) can do to the version headers.
    let forged = [
        (
            "version 1 (the HMAC is version 2's)",
            with_header(&genuine, "KST-Protocol", Some("KST-Protocol: 1")),
        ),
        (
            "a version the request did not offer",
            with_header(&genuine, "KST-Protocol", Some("KST-Protocol: 3")),
        ),
        ("KST-MAC removed", with_header(&genuine, "KST-MAC", None)),
        (
            "another MAC named",
            with_header(&genuine, "KST-MAC", Some("KST-MAC: hmac-sha512")),
        ),
        (
            "a second KST-Protocol: 1 above the genuine one",
            format!("KST-Protocol: 1\r\n{genuine}"),
        ),
        (
            "an oversize version",
            with_header(
                &genuine,
                "KST-Protocol",
                Some(&format!("KST-Protocol: {}", "9".repeat(5000))),
            ),
        ),
    ];
    for (i, (what, raw)) in forged.iter().enumerate() {
        n.deliver_to_maildir(&format!("forged-{i}"), raw.as_bytes());
        let (out, v) = n.client(&["check"]);
        assert_eq!(code(&out), ATTACK, "{what}: {v}\n{}", stderr(&out));
        assert_eq!(n.pending(), 1, "{what}: the request must stay pending");
    }
    // The genuine reply, still in the mailbox after all that, is used.
    n.deliver_to_maildir("genuine", genuine.as_bytes());
    let (out, v) = n.client(&["check"]);
    assert_eq!(code(&out), 1, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "not-found", "{v}");
    assert_eq!(n.pending(), 0);
}

/// The `KST-Protocol` header of a reply ("" when missing) and whether it has an HMAC line.
fn reply_version(raw: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(raw);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("KST-Protocol: "))
        .unwrap_or("")
        .trim()
        .to_string();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let hmac = body.lines().any(|l| {
        let l = l.trim();
        l.len() == 44 && l.ends_with('=')
    });
    (version, hmac)
}

/// A change an attacker makes to a request's headers on the way.
type Tamper = Box<dyn Fn(&str) -> String>;

fn replace(name: &'static str, line: String) -> Tamper {
    Box::new(move |raw| with_header(raw, name, Some(&line)))
}

#[test]
fn request_version_headers_tampered_on_the_way_are_decided_without_panic() {
    let kst = TestKst::new("");
    // (what, the change, the reply's version, an HMAC line expected)
    let cases: Vec<(&str, Tamper, &str, bool)> = vec![
        ("as sent", Box::new(|r| r.to_string()), "2", true),
        (
            "KST-Protocol and KST-MAC stripped (forced to version 1)",
            Box::new(|r| with_header(&with_header(r, "KST-Protocol", None), "KST-MAC", None)),
            "1",
            true,
        ),
        (
            "duplicated, version 1 first",
            Box::new(|r| format!("KST-Protocol: 1\r\n{r}")),
            "1",
            true,
        ),
        (
            "a huge number",
            replace(
                "KST-Protocol",
                "KST-Protocol: 99999999999999999999999".into(),
            ),
            "1",
            false,
        ),
        (
            "an RTL mark in the list",
            replace("KST-Protocol", "KST-Protocol: 2\u{200f}, 1".into()),
            "1",
            false,
        ),
        (
            "an oversize list",
            replace(
                "KST-Protocol",
                format!("KST-Protocol: {}2", "9, ".repeat(5000)),
            ),
            "1",
            false,
        ),
        (
            "another MAC only",
            replace("KST-MAC", "KST-MAC: hmac-sha1".into()),
            "1",
            false,
        ),
        (
            "an oversize MAC list",
            replace("KST-MAC", format!("KST-MAC: {}", "x".repeat(20_000))),
            "1",
            false,
        ),
        (
            "empty",
            replace("KST-Protocol", "KST-Protocol:".into()),
            "1",
            false,
        ),
    ];
    for (i, (what, tamper, version, hmac)) in cases.into_iter().enumerate() {
        // A fresh queried address each time, so the per-(sender, address) limit stays out.
        let query = format!("q{i}@example.net");
        let base = retrieval_from("carol@acme.net", &query, "203.0.113.9", "mx.example.net");
        let raw = tamper(&String::from_utf8(base).unwrap());
        let before = kst.replies().len();
        let out = kst.deliver("carol@acme.net", "keys@example.net", raw.as_bytes());
        assert_eq!(code(&out), 0, "{what}: {}", stderr(&out));
        let replies = kst.replies();
        assert_eq!(replies.len(), before + 1, "{what}: one reply");
        let reply = replies.last().unwrap();
        let (got, has_hmac) = reply_version(reply);
        assert_eq!(got, version, "{what}");
        assert_eq!(has_hmac, hmac, "{what}");
        if !hmac {
            let text = String::from_utf8_lossy(reply);
            assert!(
                text.contains("KST-Reason: unsupported-version"),
                "{what}: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A denial without its NSEC proof

/// Where a DNS name ends in `msg` from `pos` (labels up to the root, or a compression pointer).
fn skip_name(msg: &[u8], mut pos: usize) -> usize {
    loop {
        let len = msg[pos] as usize;
        if len == 0 {
            return pos + 1;
        }
        if len & 0xC0 == 0xC0 {
            return pos + 2;
        }
        pos += 1 + len;
    }
}

/// A resource record's (type, end) at `pos`.
fn record_at(msg: &[u8], pos: usize) -> (u16, usize) {
    let p = skip_name(msg, pos);
    let rtype = u16::from_be_bytes([msg[p], msg[p + 1]]);
    let rdlen = u16::from_be_bytes([msg[p + 8], msg[p + 9]]) as usize;
    (rtype, p + 10 + rdlen)
}

const TLSA: u16 = 52;
const SOA: u16 = 6;
const RRSIG: u16 = 46;

/// Turns BIND's signed "no SOA at NAME" answer into a "no TLSA at NAME" answer; with `strip`
/// it keeps only the zone's signed SOA, the NSEC records that prove the denial cut out. An
/// on-path attacker can do exactly this with a genuine denial captured for any type at that
/// name. Without `strip` the answer is a genuine denial when NAME has no TLSA record either.
fn strip_denial(mut msg: Vec<u8>, strip: bool) -> Vec<u8> {
    let q = skip_name(&msg, 12);
    msg[q..q + 2].copy_from_slice(&TLSA.to_be_bytes());
    let count = |m: &[u8], i: usize| u16::from_be_bytes([m[i], m[i + 1]]) as usize;
    let mut pos = q + 4;
    for _ in 0..count(&msg, 6) {
        pos = record_at(&msg, pos).1;
    }
    let auth_start = pos;
    let mut kept = Vec::new();
    let mut n = 0u16;
    for _ in 0..count(&msg, 8) {
        let (rtype, end) = record_at(&msg, pos);
        let p = skip_name(&msg, pos);
        let rd = p + 10;
        let covers_soa = rtype == RRSIG && u16::from_be_bytes([msg[rd], msg[rd + 1]]) == SOA;
        if !strip || rtype == SOA || covers_soa {
            kept.extend_from_slice(&msg[pos..end]);
            n += 1;
        }
        pos = end;
    }
    let mut out = msg[..auth_start].to_vec();
    out.extend_from_slice(&kept);
    out.extend_from_slice(&msg[pos..]);
    out[8..10].copy_from_slice(&n.to_be_bytes());
    out
}

/// A UDP DNS "resolver" on 127.0.0.1 that passes every query to `upstream`, except TLSA
/// queries, which it answers with a denial ([`strip_denial`], stripped of its NSEC proof when
/// `strip`).
fn nsec_stripper(upstream: std::net::SocketAddr, strip: bool) -> u16 {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut query = buf[..n].to_vec();
            let q = skip_name(&query, 12);
            let tlsa = u16::from_be_bytes([query[q], query[q + 1]]) == TLSA;
            if tlsa {
                query[q..q + 2].copy_from_slice(&SOA.to_be_bytes());
            }
            let up = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            up.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            up.send_to(&query, upstream).unwrap();
            let mut answer = [0u8; 4096];
            let Ok(m) = up.recv(&mut answer) else {
                continue;
            };
            let answer = answer[..m].to_vec();
            let answer = if tlsa {
                strip_denial(answer, strip)
            } else {
                answer
            };
            let _ = sock.send_to(&answer, from);
        }
    });
    port
}

#[test]
fn a_tlsa_denial_stripped_of_its_nsec_proof_does_not_switch_dane_off() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The attacker's certificate: valid for mail.example.net under the test CA, but not the
    // key the TLSA record names. Were the forged "no TLSA" believed, the hop would be
    // opportunistic and this MX would get the request.
    let (cert, key) = issue(
        dns,
        dir.path(),
        "mitm",
        &["mail.example.net"],
        Issuer::TestCa,
    );
    let mx = Mx::start(Some((&cert, &key)));
    let upstream = format!("127.0.0.1:{}", dns.var("KST_DNS_PORT"));
    let run = Run::new();
    // The proxy is faithful when it keeps the proof: notlsa.example.net has no TLSA record,
    // its genuine denial validates, and the hop is opportunistic.
    let faithful = nsec_stripper(upstream.parse().unwrap(), false);
    let (out, v) = run.retrieve(
        dns,
        &format!("127.0.0.1:{faithful}"),
        "alice@notlsa.example.net",
        &["--mx-port", &mx.port.to_string()],
    );
    outcome_is(
        &out,
        &v,
        TEMPFAIL,
        Some("unauthenticated"),
        "genuine denial",
    );
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    mx.assert_request_received("genuine denial");
    // A genuine, signed "no SOA here" for mail.example.net's TLSA name replayed as "no TLSA":
    // its NSEC record lists TLSA, so the denial is bogus.
    let mx = Mx::start(Some((&cert, &key)));
    let (out, v) = run.retrieve(
        dns,
        &format!("127.0.0.1:{faithful}"),
        "alice@example.net",
        &["--mx-port", &mx.port.to_string()],
    );
    outcome_is(&out, &v, ATTACK, None, "denial replayed from another type");
    mx.assert_nothing_sent("denial replayed from another type");
    let port = nsec_stripper(upstream.parse().unwrap(), true);
    let (out, v) = run.retrieve(
        dns,
        &format!("127.0.0.1:{port}"),
        "alice@example.net",
        &["--mx-port", &mx.port.to_string()],
    );
    outcome_is(&out, &v, ATTACK, None, "TLSA denial without NSEC");
    assert!(error_of(&v).contains("DNSSEC"), "{}", show(&out, &v));
    mx.assert_nothing_sent("TLSA denial without NSEC");
}
