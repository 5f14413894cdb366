//! Expiry reminders through the real binary: a key (`kst-core/testdata/keys/reminder.pub.asc`,
//! expires 2030-01-01) published through `kst deliver`, then `kst reminders send` run by three
//! processes at once (a pool) with the clock set by `--now`, on each backend (filesystem,
//! PostgreSQL, Redis). Each reminder lands in the spool exactly once, addressed to the owner,
//! saying how to extend and republish; nothing before the window, nothing again, nothing with
//! `[reminders] enabled = false`.

use std::path::Path;
use std::process::Command;

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

/// Red team (issue 15): a key whose User ID carries CR/LF and a `Bcc:` header (gpg and the
/// key policy accept it), published through `kst deliver` and about to expire, then three
/// `kst reminders send` at once: one reminder, to the owner's address only, without the
/// User ID's text and without any header of its making.
#[test]
fn a_user_id_with_a_header_in_it_does_not_reach_the_reminder() {
    let kst = TestKst::new("");
    let gpg = kst_tests::Gpg::new();
    gpg.run(&[
        "--passphrase",
        "",
        "--pinentry-mode",
        "loopback",
        "--quick-gen-key",
        "Alice\r\nBcc: victim@evil.example\r\n <alice@example.net>",
        "ed25519",
        "sign,cert",
        "10d",
    ]);
    let armored = gpg.export(ACCOUNT);
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
