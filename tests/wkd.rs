//! The public listener `[web]` of the real `kst serve`, asked by clients nobody here wrote:
//! Debian's gpg/dirmngr (WKD both methods, HKP), gpg-wks-client, curl and Sequoia's sq find the
//! key alice published by authenticated mail (`kst deliver`, as Postfix's pipe runs it) while
//! `kst serve` runs on the same store. The names resolve through the WKD test bed
//! (`kst_tests::wkd`, docs/WKD-TESTBED.md), which needs root; without root these tests say
//! SKIPPED loudly. The limits test needs only curl.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use kst_core::AddressPolicy;
use kst_core::wkd::WkdHash;
use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::wkd::{WkdHome, WkdMethod, WkdTestbed, WkdView};
use kst_tests::{Gpg, TestKst, code, stderr};

fn bed() -> Option<&'static WkdTestbed> {
    match WkdTestbed::up() {
        Ok(bed) => Some(bed),
        Err(e) if !kst_tests::is_root() => {
            eprintln!("SKIPPED (the WKD interop tests need root): {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Starts `kst serve --config` of a [`TestKst`] with `[web] listen = web` (TLS with `tls` =
/// (cert, key)) and `env`, and waits until the public listener accepts connections.
fn start_serve(
    kst: &TestKst,
    web: SocketAddr,
    tls: Option<(&Path, &Path)>,
    env: &[(&str, &str)],
) -> ServeProcess {
    let log = kst.dir.path().join(format!("serve-{}.log", web.port()));
    ServeProcess::start(log, web, |cmd| {
        if let Some((cert, key)) = tls {
            cmd.env("KST_WEB__TLS_CERT", cert)
                .env("KST_WEB__TLS_KEY", key);
        }
        cmd.envs(env.iter().copied())
            .arg("--config")
            .arg(&kst.config)
            .env("KST_LMTP__LISTEN", free_port().to_string())
            .env("KST_HTTP__LISTEN", free_port().to_string())
            .env("KST_WEB__LISTEN", web.to_string());
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// curl ARGS inside `view` (names resolve to the test's address; system trust store).
fn curl(view: &WkdView, args: &[&str]) -> Output {
    let home = WkdHome::new();
    view.run(home.path(), "curl", args)
}

/// Status line and headers of `curl -sS -D - -o /dev/null ARGS`, lowercased.
fn head_of(view: &WkdView, args: &[&str]) -> String {
    let mut all = vec!["-sS", "-D", "-", "-o", "/dev/null"];
    all.extend_from_slice(args);
    let out = curl(view, &all);
    assert!(out.status.success(), "curl {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).to_lowercase()
}

fn status_of(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("")
}

#[test]
fn gpg_finds_the_key_alice_published_by_mail_by_both_wkd_methods_and_wks_client_agrees() {
    let Some(bed) = bed() else { return };
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new("");
    let addr = WkdTestbed::free_addr();
    let serve = start_serve(
        &kst,
        SocketAddr::from((addr, 443)),
        Some((bed.cert(), bed.key())),
        &[],
    );
    let advanced = bed.view(addr, WkdMethod::Advanced);

    // Before the publication: WKD answers, but has no key for alice.
    let home = WkdHome::new();
    let out = advanced.gpg_locate_wkd(home.path(), "alice@example.net");
    assert_ne!(code(&out), 0, "nothing published yet: {}", text(&out));
    assert!(home.fingerprints().is_empty());

    kst.publish_by_mail(&alice);

    // At once afterwards, by the advanced method (openpgpkey.example.net) ...
    let home = WkdHome::new();
    let out = advanced.gpg_locate_wkd(home.path(), "alice@example.net");
    assert_eq!(
        code(&out),
        0,
        "advanced method: {}\n{}",
        text(&out),
        serve.log()
    );
    assert_eq!(home.fingerprints(), vec![alice.fingerprint.to_string()]);

    // ... and by the direct method when openpgpkey.example.net does not resolve.
    let direct = bed.view(addr, WkdMethod::DirectOnly);
    let home = WkdHome::new();
    let out = direct.gpg_locate_wkd(home.path(), "alice@example.net");
    assert_eq!(
        code(&out),
        0,
        "direct method: {}\n{}",
        text(&out),
        serve.log()
    );
    assert_eq!(home.fingerprints(), vec![alice.fingerprint.to_string()]);

    // gpg-wks-client: the domain supports WKS (policy and submission-address served) ...
    let home = WkdHome::new();
    let out = advanced.wks_client(home.path(), &["--supported", "alice@example.net"]);
    assert_eq!(code(&out), 0, "--supported: {}", text(&out));
    // ... finds alice's key ...
    let out = advanced.wks_client(home.path(), &["-v", "--check", "alice@example.net"]);
    assert_eq!(code(&out), 0, "--check: {}", text(&out));
    assert!(
        text(&out).contains(&alice.fingerprint.to_string()),
        "--check names the fingerprint: {}",
        text(&out)
    );
    // ... reports a miss for bob ...
    let out = advanced.wks_client(home.path(), &["--check", "bob@example.net"]);
    assert_ne!(code(&out), 0, "--check bob: {}", text(&out));
    // ... and hashes as kst does.
    let out = advanced.wks_client(home.path(), &["--print-wkd-hash", "Alice@example.net"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let ours = WkdHash::of_address(
        &AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap(),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{ours} alice@example.net")
    );

    assert_eq!(serve.stop(), 0, "kst serve exits 0 on SIGTERM");
}

#[test]
fn keyserver_clients_curl_and_sq_get_the_key_by_address_fingerprint_and_key_id() {
    let Some(bed) = bed() else { return };
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let fpr = alice.fingerprint.to_string();
    let key_id = fpr[fpr.len() - 16..].to_string();
    let kst = TestKst::new("");
    kst.publish_by_mail(&alice);
    let addr = WkdTestbed::free_addr();
    let tls = start_serve(
        &kst,
        SocketAddr::from((addr, 443)),
        Some((bed.cert(), bed.key())),
        &[],
    );
    let plain_at = free_port();
    let plain = start_serve(&kst, plain_at, None, &[]);
    let view = bed.view(addr, WkdMethod::Advanced);

    // HKP, plain HTTP on any port: gpg --recv-keys by fingerprint and by key ID.
    let keyserver = format!("hkp://{plain_at}");
    for wanted in [&fpr, &key_id] {
        let home = WkdHome::new();
        let out = view.run(
            home.path(),
            "gpg",
            &["--batch", "--keyserver", &keyserver, "--recv-keys", wanted],
        );
        assert_eq!(
            code(&out),
            0,
            "--recv-keys {wanted}: {}\n{}",
            text(&out),
            plain.log()
        );
        assert_eq!(home.fingerprints(), vec![fpr.clone()]);
    }
    // --search-keys lists the exact match (then stops for input in batch mode).
    let home = WkdHome::new();
    let out = view.run(
        home.path(),
        "gpg",
        &[
            "--batch",
            "--keyserver",
            &keyserver,
            "--search-keys",
            "alice@example.net",
        ],
    );
    let listing = text(&out);
    assert!(
        listing.contains("Alice <alice@example.net>") && listing.contains(&key_id),
        "--search-keys: {listing}"
    );
    // A substring finds nothing: exact matches only.
    let out = view.run(
        home.path(),
        "gpg",
        &[
            "--batch",
            "--keyserver",
            &keyserver,
            "--search-keys",
            "alice",
        ],
    );
    assert!(
        !text(&out).contains("Alice <alice@example.net>"),
        "{}",
        text(&out)
    );

    // VKS over TLS with curl (system trust store): armored, with CORS.
    let base = "https://openpgpkey.example.net";
    for path in [
        "/vks/v1/by-email/alice%40example.net".to_string(),
        "/vks/v1/by-email/alice@example.net".to_string(),
        format!("/vks/v1/by-fingerprint/{fpr}"),
        format!("/vks/v1/by-keyid/{key_id}"),
    ] {
        let url = format!("{base}{path}");
        let out = curl(&view, &["-sS", "-f", &url]);
        assert!(out.status.success(), "curl {url}: {}", stderr(&out));
        let home = WkdHome::new();
        home.import(&out.stdout);
        assert_eq!(home.fingerprints(), vec![fpr.clone()], "{url}");
        let head = head_of(&view, &[&url]);
        assert!(
            head.contains("access-control-allow-origin: *"),
            "{url}: {head}"
        );
    }
    // WKD: the binary key, CORS, HEAD without a body, 404 for an unknown hash, policy files.
    let hash = WkdHash::of_local_part("alice");
    let wkd = format!("{base}/.well-known/openpgpkey/example.net/hu/{hash}");
    let head = head_of(&view, &[&wkd]);
    assert_eq!(status_of(&head), "200", "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    let out = curl(&view, &["-sS", "-I", &wkd]);
    let head_only = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert_eq!(status_of(&head_only), "200", "HEAD: {head_only}");
    assert!(!head_only.contains("-----begin pgp"), "HEAD has no body");
    let unknown = format!(
        "{base}/.well-known/openpgpkey/example.net/hu/{}",
        WkdHash::of_local_part("nobody")
    );
    assert_eq!(status_of(&head_of(&view, &[&unknown])), "404");
    assert_eq!(
        status_of(&head_of(
            &view,
            &[&format!("{base}/.well-known/openpgpkey/example.net/hu/")]
        )),
        "404",
        "no listing"
    );
    let out = curl(
        &view,
        &[
            "-sS",
            "-f",
            &format!("{base}/.well-known/openpgpkey/example.net/policy"),
        ],
    );
    assert!(out.status.success(), "policy: {}", stderr(&out));
    let policy = String::from_utf8_lossy(&out.stdout);
    // kst_core::wkd::PolicyFlags: one flag per line after the comment.
    let flags: Vec<&str> = policy.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        flags,
        ["mailbox-only", "auth-submit", "protocol-version: 5"],
        "{policy}"
    );
    let out = curl(
        &view,
        &[
            "-sS",
            "-f",
            &format!("{base}/.well-known/openpgpkey/example.net/submission-address"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "keys@example.net"
    );

    // Sequoia's sq (Debian 12: 0.27): WKD, and its keyserver client over hkps://. Required,
    // as gpg is: scripts/test.sh installs Debian's package.
    assert!(
        Command::new("sq").arg("--version").output().is_ok(),
        "Sequoia's sq is not installed: `apt-get install sq` (scripts/test.sh does)"
    );
    let home = WkdHome::new();
    for args in [
        vec!["wkd", "get", "alice@example.net"],
        vec!["keyserver", "--server", "hkps://example.net", "get", &fpr],
    ] {
        let out = view.run(home.path(), "sq", &args);
        assert!(out.status.success(), "sq {args:?}: {}", text(&out));
        let got = WkdHome::new();
        got.import(&out.stdout);
        assert_eq!(got.fingerprints(), vec![fpr.clone()], "sq {args:?}");
    }

    assert_eq!(tls.stop(), 0);
    assert_eq!(plain.stop(), 0);
}

/// curl without the test bed: `(status, headers)` of `GET url`.
fn curl_plain(url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", url])
        .output()
        .expect("curl must be installed");
    assert!(out.status.success(), "curl {url}: {}", stderr(&out));
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    (status_of(&head).to_string(), head)
}

#[test]
fn misses_beyond_the_per_client_budget_get_429_with_retry_after() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let kst = TestKst::new("");
    kst.publish_by_mail(&alice);
    let at = free_port();
    let serve = start_serve(
        &kst,
        at,
        None,
        &[
            ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "2"),
            ("KST_WEB__LIMITS__WINDOW_SECS", "60"),
        ],
    );
    let url = |who: &str| format!("http://{at}/vks/v1/by-email/{who}%40example.net");
    assert_eq!(curl_plain(&url("alice")).0, "200");
    // The limiter counts a miss after answering it: the miss that spends the budget is still
    // answered, the next look-up is not.
    for n in 1..=3 {
        assert_eq!(curl_plain(&url(&format!("nobody{n}"))).0, "404");
    }
    let (status, head) = curl_plain(&url("nobody4"));
    assert_eq!(status, "429", "{head}\n{}", serve.log());
    assert!(head.contains("retry-after:"), "{head}");
    // The client is now refused for key look-ups altogether until the window ends.
    assert_eq!(curl_plain(&url("alice")).0, "429");
    assert_eq!(serve.stop(), 0);
}

/// `kst migrate` on an fs store written before the look-up index (its `index/` removed):
/// `kst serve` still answers look-ups by fingerprint (reading every address), `kst migrate`
/// prints how many keys it indexed, again the same, and the running `kst serve` answers from
/// the index at once (gpg-made keys published by mail, curl for VKS). Needs only curl.
#[test]
fn migrate_indexes_an_fs_store_written_before_the_index() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let bob = gpg.generate("Bob", "bob@example.org", "ed25519");
    let kst = TestKst::new("");
    kst.publish_by_mail(&alice);
    kst.publish_by_mail(&bob);
    let store = kst.dir.path().join("keys");
    std::fs::remove_dir_all(store.join("index")).expect("the fs store has an index");

    let at = free_port();
    let serve = start_serve(&kst, at, None, &[]);
    let by_fpr = |fpr: &str| format!("http://{at}/vks/v1/by-fingerprint/{fpr}");
    let by_id = |fpr: &str| format!("http://{at}/vks/v1/by-keyid/{}", &fpr[fpr.len() - 16..]);
    assert_eq!(curl_plain(&by_fpr(&alice.fingerprint)).0, "200");
    assert!(
        serve.log().contains("no look-up index yet"),
        "kst serve warns about the missing index:\n{}",
        serve.log()
    );

    for _ in 0..2 {
        let out = kst.kst(&["migrate"], b"");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "look-up index of the fs store rebuilt: 2 keys indexed\n",
            "{}",
            stderr(&out)
        );
    }
    assert!(store.join("index/ready").is_file());
    for key in [&alice, &bob] {
        assert_eq!(
            curl_plain(&by_fpr(&key.fingerprint)).0,
            "200",
            "{}",
            key.address
        );
        assert_eq!(
            curl_plain(&by_id(&key.fingerprint)).0,
            "200",
            "{}",
            key.address
        );
    }
    assert_eq!(
        curl_plain(&by_fpr("0123456789ABCDEF0123456789ABCDEF01234567")).0,
        "404"
    );
    assert_eq!(serve.stop(), 0);
}
