//! WKS publication through the real path: `kst wks keygen`, then `kst deliver` with submissions
//! that GnuPG made (Debian's `gpg-wks-client --create` against kst's own WKD when root, the
//! committed `--create` mail, a PGP/MIME submission that gpg encrypts at test time to the key kst
//! generated), the filesystem store, the spool; and `kst serve` publishing a configured key and
//! serving it (and the published keys) on its `[web]` listener.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::wkd::{WkdHome, WkdMethod, WkdTestbed};
use kst_tests::{Gpg, TestKst, code, received_authenticated, received_plain, stderr};

const REQUEST: &str = include_str!("fixtures/wks/create-request.eml");
const SUBMISSION_SECRET: &str = include_str!("fixtures/wks/submission-key.secret.asc");
const ALICE_SECRET: &str = include_str!("fixtures/wks/alice.secret.asc");
const ALICE_FPR: &str = "E45AB727B2B452C91A2F74DA390B192D3F231610";

/// A KST serving example.net with `[[wks.keys]]` pointing at `<dir>/wks/example.net.asc` and
/// `limits` as the `[limits]` table.
fn wks_kst(limits: &str) -> (TestKst, PathBuf) {
    let kst = TestKst::new("");
    let key = kst.dir.path().join("wks").join("example.net.asc");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let mut text = std::fs::read_to_string(&kst.config).unwrap();
    text.push_str(&format!(
        "\n[limits]\n{limits}\n\n[[wks.keys]]\ndomain = \"example.net\"\nfile = \"{}\"\n",
        key.display()
    ));
    std::fs::write(&kst.config, text).unwrap();
    (kst, key)
}

fn install_fixture_key(path: &Path) {
    std::fs::write(path, SUBMISSION_SECRET).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The reply with wrapped prose joined, for phrase checks.
fn words(reply: &[u8]) -> String {
    String::from_utf8_lossy(reply)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `kst keys get ADDRESS --json`'s fingerprint, or None when nothing is published.
fn published_fingerprint(kst: &TestKst, address: &str) -> Option<String> {
    let out = kst.kst(&["keys", "get", address, "--json"], b"");
    if code(&out) == 1 {
        return None;
    }
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(v["fingerprint"].as_str().unwrap().to_string())
}

/// `kst config check`: its exit code, and stdout and stderr together.
fn config_check(kst: &TestKst) -> (i32, String) {
    let out = kst.kst(&["config", "check"], b"");
    let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    (code(&out), all)
}

/// A submission as `gpg-wks-client --create` writes it, around an armored PGP message.
fn wks_mail(pgp_message: &str) -> String {
    format!(
        "From: alice@example.net\r\nTo: keys@example.net\r\nSubject: Key publishing request\r\n\
         Wks-Draft-Version: 3\r\nMIME-Version: 1.0\r\nContent-Type: multipart/encrypted; \
         protocol=\"application/pgp-encrypted\";\r\n\tboundary=\"=-=01-b=-=\"\r\n\r\n\
         --=-=01-b=-=\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n\
         --=-=01-b=-=\r\nContent-Type: application/octet-stream\r\n\r\n{}\r\n--=-=01-b=-=--\r\n",
        pgp_message
            .replace("\r\n", "\n")
            .replace('\n', "\r\n")
            .trim_end()
    )
}

#[test]
fn keygen_key_receives_a_gpg_encrypted_submission_and_publishes_it() {
    let (kst, key_file) = wks_kst("");
    let out = kst.kst(&["wks", "keygen", "example.net"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let fpr = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(fpr.len(), 40, "{fpr}");
    assert_eq!(mode(&key_file), 0o600);
    // Its public part is published for keys@example.net (where the WKD serves it).
    assert_eq!(
        published_fingerprint(&kst, "keys@example.net").as_deref(),
        Some(fpr.as_str())
    );
    // Running it again keeps the key unless --force.
    let again = kst.kst(&["wks", "keygen", "example.net"], b"");
    assert_eq!(code(&again), 73, "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    // Real gpg takes the submission key as the WKD serves it and encrypts alice's key to it.
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let served = kst.kst(&["keys", "get", "keys@example.net"], b"");
    let status = gpg.import(&String::from_utf8(served.stdout).unwrap());
    assert!(status.contains("IMPORT_OK"), "{status}");
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner.txt");
    std::fs::write(
        &inner,
        format!(
            "Content-Type: application/pgp-keys\n\n{}",
            alice.public_armored
        ),
    )
    .unwrap();
    let encrypted = dir.path().join("inner.asc");
    gpg.run(&[
        "--trust-model",
        "always",
        "--armor",
        "-z0",
        "--recipient",
        &fpr,
        "--recipient",
        &alice.fingerprint,
        "--output",
        encrypted.to_str().unwrap(),
        "--encrypt",
        inner.to_str().unwrap(),
    ]);
    let pgp_message = std::fs::read_to_string(&encrypted).unwrap();
    let mut raw = received_authenticated("alice@example.net", "mail.example.net");
    raw.push_str(&wks_mail(&pgp_message));
    let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        published_fingerprint(&kst, "alice@example.net"),
        Some(alice.fingerprint.clone())
    );
    let reply = words(&kst.last_reply());
    assert!(reply.contains("KST-Status: published"), "{reply}");
    assert!(
        reply.contains("is now published for alice@example.net"),
        "{reply}"
    );
    assert!(reply.contains("Auto-Submitted: auto-replied"), "{reply}");
}

#[test]
fn the_real_gpg_wks_client_mail_publishes_when_authenticated() {
    let (kst, key_file) = wks_kst("");
    install_fixture_key(&key_file);
    let mut raw = received_authenticated("alice@example.net", "mail.example.net");
    raw.push_str(REQUEST);
    let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        published_fingerprint(&kst, "alice@example.net").as_deref(),
        Some(ALICE_FPR)
    );
    let reply = kst.last_reply();
    let text = words(&reply);
    assert!(text.contains("To: <alice@example.net>"), "{text}");
    assert!(text.contains("is now published"), "{text}");
    // The published key is the one alice holds (the bare-address User ID kept), and gpg takes it.
    let gpg = Gpg::new();
    let status = gpg.import(ALICE_SECRET);
    assert!(status.contains("IMPORT_OK"), "{status}");
    let served = kst.kst(&["keys", "get", "alice@example.net"], b"");
    let other = Gpg::new();
    let status = other.import(&String::from_utf8(served.stdout).unwrap());
    assert!(
        status.contains(&format!("IMPORT_OK 1 {ALICE_FPR}")),
        "{status}"
    );
}

#[test]
fn unauthenticated_submission_is_not_published_and_its_replies_are_limited() {
    let (kst, key_file) = wks_kst("per_sender = 2");
    install_fixture_key(&key_file);
    let mut raw = received_plain("mail.attacker.example", "mail.example.net");
    raw.push_str(REQUEST);
    for _ in 0..3 {
        let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
        assert_eq!(code(&out), 0, "decided, never lost: {}", stderr(&out));
    }
    assert_eq!(published_fingerprint(&kst, "alice@example.net"), None);
    let replies = kst.replies();
    assert_eq!(
        replies.len(),
        2,
        "the third reply is over the per-sender limit"
    );
    for r in &replies {
        let text = words(r);
        assert!(text.contains("KST-Reason: not-authenticated"), "{text}");
        assert!(text.contains("Auto-Submitted: auto-replied"), "{text}");
        assert!(text.contains("gpg-wks-client --create writes"), "{text}");
    }
}

#[test]
fn garbage_submissions_are_decided_and_a_bad_key_file_defers() {
    let (kst, key_file) = wks_kst("");
    install_fixture_key(&key_file);
    let head = received_authenticated("alice@example.net", "mail.example.net");
    for body in [
        wks_mail("-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n"),
        wks_mail("not even armor"),
        REQUEST[..REQUEST.len() / 2].to_string(),
        "From: alice@example.net\r\nContent-Type: application/pgp-keys\r\n\r\nnot a key\r\n"
            .to_string(),
    ] {
        let out = kst.deliver(
            "alice@example.net",
            "keys@example.net",
            format!("{head}{body}").as_bytes(),
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    assert_eq!(kst.replies().len(), 4);
    assert_eq!(published_fingerprint(&kst, "alice@example.net"), None);

    // A key file others may read: kst refuses to use it, and the mail stays queued (75).
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut raw = head.clone();
    raw.push_str(REQUEST);
    let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    // `kst config check` says what is wrong and what to do, and shows no key material.
    let (status, all) = config_check(&kst);
    assert_eq!(status, 78, "{all}");
    assert!(
        all.contains("mode 0644") && all.contains("chmod 600"),
        "{all}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, all) = config_check(&kst);
    assert_eq!(status, 0, "{all}");
    assert!(
        all.contains("4357D7BD290B536F57376DC8546C22E8C02CD0A6"),
        "the fingerprint is shown: {all}"
    );
    for line in SUBMISSION_SECRET.lines().filter(|l| l.len() > 20) {
        assert!(!all.contains(line), "key material in the output: {all}");
    }
}

/// The real `kst serve` of `kst`'s config with its `[web]` listener on `addr:443` (TLS with the
/// WKD test bed's certificate); returns once the listener accepts connections. Killed when the
/// returned process is dropped.
fn start_web(kst: &TestKst, bed: &WkdTestbed, addr: std::net::Ipv4Addr) -> ServeProcess {
    let web = std::net::SocketAddr::from((addr, 443));
    ServeProcess::start(kst.dir.path().join("serve.log"), web, |cmd| {
        cmd.arg("--config")
            .arg(&kst.config)
            .env("KST_LMTP__LISTEN", free_port().to_string())
            .env("KST_HTTP__LISTEN", free_port().to_string())
            .env("KST_WEB__LISTEN", web.to_string())
            .env("KST_WEB__TLS_CERT", bed.cert())
            .env("KST_WEB__TLS_KEY", bed.key());
    })
}

/// The whole GnuPG path: `kst wks keygen` publishes the submission key, kst's own WKD serves it,
/// Debian's `gpg-wks-client --create` finds it there and writes the request, authenticated
/// `kst deliver` publishes the key, and gpg finds it by WKD afterwards. Needs root (the WKD test
/// bed: trust store, port 443, mount namespaces); says so and returns otherwise.
#[test]
fn gpg_wks_client_publishes_through_kst_own_wkd() {
    let bed = match WkdTestbed::up() {
        Ok(bed) => bed,
        Err(why) => {
            eprintln!("SKIPPED gpg_wks_client_publishes_through_kst_own_wkd: {why}");
            return;
        }
    };
    let (kst, _key_file) = wks_kst("");
    let out = kst.kst(&["wks", "keygen", "example.net"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let addr = WkdTestbed::free_addr();
    let serve = start_web(&kst, bed, addr);
    let view = bed.view(addr, WkdMethod::Advanced);

    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let home = WkdHome::new();
    home.import(gpg.export_secret("alice@example.net").as_bytes());
    let supported = view.wks_client(home.path(), &["--supported", "alice@example.net"]);
    assert!(
        supported.status.success(),
        "--supported: {}",
        stderr(&supported)
    );
    let request = kst.dir.path().join("request.eml");
    let created = view.wks_client(
        home.path(),
        &[
            "-o",
            request.to_str().unwrap(),
            "--create",
            &alice.fingerprint,
            "alice@example.net",
        ],
    );
    assert!(created.status.success(), "--create: {}", stderr(&created));
    let mail = std::fs::read_to_string(&request).unwrap();
    assert!(mail.contains("Wks-Draft-Version"), "{mail}");
    assert!(mail.contains("multipart/encrypted"), "{mail}");

    let mut raw = received_authenticated("alice@example.net", "mail.example.net");
    raw.push_str(&mail);
    let out = kst.deliver("alice@example.net", "keys@example.net", raw.as_bytes());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        published_fingerprint(&kst, "alice@example.net"),
        Some(alice.fingerprint.clone())
    );
    assert!(words(&kst.last_reply()).contains("is now published for alice@example.net"));

    // Afterwards gpg's WKD look-up and gpg-wks-client --check find it.
    let fresh = WkdHome::new();
    let located = view.gpg_locate_wkd(fresh.path(), "alice@example.net");
    assert!(located.status.success(), "{}", stderr(&located));
    assert!(fresh.fingerprints().contains(&alice.fingerprint));
    let check = view.wks_client(fresh.path(), &["--check", "alice@example.net"]);
    assert!(check.status.success(), "--check: {}", stderr(&check));
    assert_eq!(serve.stop(), 0, "kst serve exits 0 on SIGTERM");
}

/// `kst serve` publishes a configured submission key that gpg made (not `kst wks keygen`), so the
/// WKD serves it from the first start on.
#[test]
fn serve_publishes_a_configured_submission_key() {
    let (kst, key_file) = wks_kst("");
    install_fixture_key(&key_file);
    assert_eq!(published_fingerprint(&kst, "keys@example.net"), None);
    let http = free_port();
    let serve = ServeProcess::start(kst.dir.path().join("serve.log"), http, |cmd| {
        cmd.arg("--config")
            .arg(&kst.config)
            .env("KST_HTTP__LISTEN", http.to_string())
            .env("KST_LMTP__LISTEN", free_port().to_string());
    });
    // The [http] listener opens after the store is set up, the key published included.
    let published = published_fingerprint(&kst, "keys@example.net");
    assert_eq!(serve.stop(), 0);
    assert_eq!(
        published.as_deref(),
        Some("4357D7BD290B536F57376DC8546C22E8C02CD0A6")
    );
}
