//! Expiry reminders through the real binary: a key (`kst-core/testdata/keys/reminder.pub.asc`,
//! expires 2030-01-01) published through `kst deliver`, then `kst reminders send` run by three
//! processes at once (a pool) with the clock set by `--now`, on each backend (filesystem,
//! PostgreSQL, Redis). Each reminder lands in the spool exactly once, addressed to the owner,
//! saying how to extend and republish; nothing before the window, nothing again, nothing with
//! `[reminders] enabled = false`. A relay (Postfix's `smtp-sink`) that refuses the owner's
//! address with a 5xx: the reminder is reported refused, never sent, by `kst reminders send`
//! and by `kst serve`'s own run (its log and `/metrics`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kst_core::AddressPolicy;
use kst_core::client::{self, Verified};
use kst_tests::{TestKst, code, kst_binary, on_every_backend, received_authenticated, stderr};

const DAY: u64 = 86_400;
const EXPIRES: u64 = 1_893_499_200;
const ACCOUNT: &str = "alice@example.net";

fn publish(kst: &TestKst) {
    let armored = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kst-core/testdata/keys/reminder.pub.asc"),
    )
    .unwrap();
    let account = AddressPolicy::default().normalize(ACCOUNT).unwrap();
    let req = client::build_publication(&account, &armored).unwrap();
    let mut raw = received_authenticated(ACCOUNT, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = kst.deliver(ACCOUNT, "keys@example.net", &raw);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(matches!(
        client::verify_reply(&req.pending, &kst.last_reply()),
        Ok(Verified::Published { .. })
    ));
}

/// The reminders in the spool, as text.
fn reminders(kst: &TestKst) -> Vec<String> {
    kst.replies()
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r).into_owned())
        .filter(|t| t.contains("Subject: Your OpenPGP key expires in"))
        .collect()
}

/// Three `kst reminders send --now NOW` at once; each prints its run as JSON.
fn pool_run(kst: &TestKst, now: u64, env: &[(&str, &str)]) -> usize {
    let children: Vec<_> = (0..3)
        .map(|_| {
            let mut c = Command::new(kst_binary());
            c.args(["reminders", "send", "--now", &now.to_string(), "--config"])
                .arg(&kst.config)
                .env_remove("RUST_LOG");
            for (k, v) in env {
                c.env(k, v);
            }
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kst runs")
        })
        .collect();
    let mut sent = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        sent += v["sent"].as_array().unwrap().len();
    }
    sent
}

fn run(kst: &TestKst) {
    publish(kst);
    let off = [("KST_REMINDERS__ENABLED", "false")];
    assert_eq!(pool_run(kst, EXPIRES - 10 * DAY, &off), 0, "reminders off");
    assert_eq!(
        pool_run(kst, EXPIRES - 20 * DAY, &[]),
        0,
        "before the window"
    );
    assert!(reminders(kst).is_empty());
    assert_eq!(
        pool_run(kst, EXPIRES - 10 * DAY, &[]),
        1,
        "the 14-day reminder"
    );
    assert_eq!(pool_run(kst, EXPIRES - 10 * DAY, &[]), 0, "once only");
    assert_eq!(
        pool_run(kst, EXPIRES - 2 * DAY, &[]),
        1,
        "the 3-day reminder"
    );
    assert_eq!(pool_run(kst, EXPIRES + DAY, &[]), 0, "after the expiry");
    let mail = reminders(kst);
    assert_eq!(mail.len(), 2, "two reminders in the spool");
    assert!(
        mail[0].contains("To: <alice@example.net>") || mail[0].contains("To: alice@example.net"),
        "{}",
        mail[0]
    );
    assert!(mail[0].contains("keys@example.net"), "{}", mail[0]);
    assert!(mail.iter().any(|m| m.contains("expires in 10 days")));
    assert!(mail.iter().any(|m| m.contains("expires in 2 days")));
    assert!(mail.iter().all(|m| m.contains("gpg --quick-set-expire")
        && m.contains("kst client --account alice@example.net publish")));
}

#[test]
fn reminders_go_out_once_across_a_pool_on_every_backend() {
    on_every_backend(run);
}

/// Makes a key for `uid` (at alice@example.net) that expires ten days from now and publishes
/// it through `kst deliver`, asserting kst's confirmation.
fn publish_new_key(kst: &TestKst, uid: &str) {
    let gpg = kst_tests::Gpg::new();
    gpg.run(&[
        "--passphrase",
        "",
        "--pinentry-mode",
        "loopback",
        "--quick-gen-key",
        uid,
        "ed25519",
        "sign,cert",
        "10d",
    ]);
    let account = AddressPolicy::default().normalize(ACCOUNT).unwrap();
    let req = client::build_publication(&account, &gpg.export(ACCOUNT)).unwrap();
    let mut raw = received_authenticated(ACCOUNT, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = kst.deliver(ACCOUNT, "keys@example.net", &raw);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(matches!(
        client::verify_reply(&req.pending, &kst.last_reply()),
        Ok(Verified::Published { .. })
    ));
}

/// Red team (issue 15): a key whose User ID carries CR/LF and a `Bcc:` header (gpg and the
/// key policy accept it), published through `kst deliver` and about to expire, then three
/// `kst reminders send` at once: one reminder, to the owner's address only, without the
/// User ID's text and without any header of its making.
#[test]
fn a_user_id_with_a_header_in_it_does_not_reach_the_reminder() {
    let kst = TestKst::new("");
    publish_new_key(
        &kst,
        "Alice\r\nBcc: victim@evil.example\r\n <alice@example.net>",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(pool_run(&kst, now, &[]), 1);
    let mail = reminders(&kst);
    assert_eq!(mail.len(), 1);
    let head = mail[0]
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        // A Bcc header line, not the letters anywhere: a random Message-ID can hold "bcc".
        !head.lines().any(|l| l.starts_with("bcc:")) && !mail[0].contains("victim"),
        "{}",
        mail[0]
    );
    let to: Vec<&str> = head.lines().filter(|l| l.starts_with("to:")).collect();
    assert_eq!(to.len(), 1, "{head}");
    assert!(to[0].contains("alice@example.net"), "{head}");
}

/// Postfix's `smtp-sink` on a free loopback port, refusing every `RCPT TO` with a 5xx (`-f
/// RCPT`): a relay that does not know the owner's address. Killed when dropped.
struct RefusingRelay {
    child: Child,
    port: u16,
}

impl RefusingRelay {
    fn start() -> RefusingRelay {
        let bin = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("smtp-sink not found: install Postfix (scripts/test.sh does)");
        let port = kst_tests::serve::free_port().port();
        let mut cmd = Command::new(bin);
        if kst_tests::is_root() {
            // smtp-sink refuses to run as root without a user to drop to.
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .args(["-f", "RCPT", &format!("127.0.0.1:{port}"), "16"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start smtp-sink");
        let mut relay = RefusingRelay { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = relay.child.try_wait().unwrap() {
                panic!("smtp-sink exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "smtp-sink does not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        relay
    }

    /// `[mailer]` overrides that send through this relay.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KST_MAILER__KIND", "smtp".to_string()),
            ("KST_MAILER__HOST", "127.0.0.1".to_string()),
            ("KST_MAILER__PORT", self.port.to_string()),
            ("KST_MAILER__TLS", "none".to_string()),
        ]
    }
}

impl Drop for RefusingRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name` (with its labels, e.g. `kst_x{a="b"}`) in a Prometheus text
/// page; `None` when it is not there.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The relay refuses the owner's address for good (550): `kst serve`'s reminder run logs the
/// reminder as refused, never as sent, and counts it in `kst_reminders_total{outcome="refused"}`
/// and `kst_mailer_refused_total`; `kst reminders send` (cron) reports the next threshold's
/// reminder under `refused` with the relay's code and answer, `sent` empty. Claimed, neither is
/// asked again. (The relay used to refuse and the run said "expiry reminder sent".)
#[test]
fn a_reminder_the_relay_refuses_is_reported_refused_not_sent() {
    let kst = TestKst::new("");
    publish_new_key(&kst, "Alice <alice@example.net>");

    let relay = RefusingRelay::start();
    // kst serve runs the reminders at start: the 14-day reminder is due now.
    let http = kst_tests::serve::free_port();
    let lmtp = kst.dir.path().join("lmtp.sock");
    let serve =
        kst_tests::serve::ServeProcess::start(kst.dir.path().join("serve.log"), http, |cmd| {
            cmd.arg("--config").arg(&kst.config);
            for (k, v) in relay.env() {
                cmd.env(k, v);
            }
            cmd.env("KST_HTTP__LISTEN", http.to_string())
                .env("KST_LMTP__LISTEN", format!("unix:{}", lmtp.display()));
        });
    let refused = r#"kst_reminders_total{outcome="refused"}"#;
    let deadline = Instant::now() + kst_tests::serve::PATIENCE;
    let page = loop {
        let (status, page) = kst_tests::serve::http_get(http, "/metrics");
        if status == 200 && sample(&page, refused).is_some() {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "no refused reminder counted:\n{page}\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(sample(&page, refused), Some(1.0), "{page}");
    assert_eq!(
        sample(&page, r#"kst_reminders_total{outcome="sent"}"#),
        None,
        "{page}"
    );
    let mailer_refused: f64 = page
        .lines()
        .filter(|l| l.starts_with("kst_mailer_refused_total{code=\"5"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(mailer_refused, 1.0, "{page}");
    let log = serve.log();
    assert!(
        log.contains("expiry reminder refused by the relay for good"),
        "{log}"
    );
    assert!(!log.contains("expiry reminder sent"), "{log}");
    drop(serve);

    // `kst reminders send` from cron, when the 3-day reminder is due (the key expires ten days
    // after it was made).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 8 * DAY;
    let env: Vec<(&str, String)> = relay.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = kst.kst_env(&["reminders", "send", "--now", &now.to_string()], b"", &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["sent"].as_array().map(Vec::len), Some(0), "{v}");
    let refused = v["refused"].as_array().expect("refused");
    assert_eq!(refused.len(), 1, "{v}");
    assert_eq!(refused[0]["address"], ACCOUNT, "{v}");
    assert_eq!(refused[0]["days_before"], 3, "{v}");
    let code_5xx = refused[0]["code"].as_u64().unwrap_or(0);
    assert!((500..600).contains(&code_5xx), "{v}");
    assert!(
        refused[0]["relay"]
            .as_str()
            .is_some_and(|t| t.contains("RCPT TO")),
        "{v}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("expiry reminder refused by the relay for good"),
        "{err}"
    );
    assert!(!err.contains("expiry reminder sent"), "{err}");
    assert!(reminders(&kst).is_empty(), "nothing went to the spool");

    // Claimed: the next run does not ask the relay again.
    let again = kst.kst_env(&["reminders", "send", "--now", &now.to_string()], b"", &env);
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(v["refused"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["already_claimed"], 1, "{v}");
}
