//! `kst client` through the real binary, with real gpg keys:
//!
//! - `maildir_*`: against `kst deliver` without a mail system. The client hands its requests
//!   to a sendmail-style script that runs `kst deliver` as Postfix's pipe(8) would (the login
//!   passed as `--sasl-username`); kst spools its replies straight into a Maildir's `new/`,
//!   which the client reads.
//! - `mail_system_*`: against the loopback mail system of `scripts/mailsystem.sh` (Postfix
//!   submission with STARTTLS and SASL, Dovecot IMAP, dnsmasq), on a private state directory
//!   and ports so that a shared instance is left alone. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kst_tests::{
    Gpg, GpgKey, code, gpg_fingerprint_of, is_root, kst_binary, mail_system_client, make_maildir,
    run_json, stderr, write_sendmail_script,
};
use serde_json::Value;

/// A KST behind a sendmail-style script, replying into a Maildir.
struct Local {
    dir: tempfile::TempDir,
}

impl Local {
    fn new() -> Local {
        let dir = tempfile::Builder::new()
            .prefix("kst-client-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        make_maildir(&p.join("Maildir"));
        std::fs::write(
            p.join("kst.toml"),
            format!(
                r#"[kst]
domains = ["example.net"]
auth_source = "sasl-argv"

[store]
backend = "fs"
path = "{keys}"

[mailer]
kind = "spool"
path = "{new}"
"#,
                keys = p.join("keys").display(),
                new = p.join("Maildir/new").display()
            ),
        )
        .unwrap();
        // sendmail -oi -f FROM -- RCPT, as the provider's MTA: it knows who logged in
        // (KST_TEST_LOGIN, else the sender) and pipes the message to kst.
        write_sendmail_script(&p.join("sendmail"), &kst_binary(), &p.join("kst.toml"));
        Local { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A GnuPG home with a new ed25519 key for alice@example.net, exported (armored) to
    /// `alice.asc` here; returns the home, the key and that file.
    fn alice_key(&self) -> (Gpg, GpgKey, PathBuf) {
        let gpg = Gpg::new();
        let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
        let key = self.path("alice.asc");
        std::fs::write(&key, &alice.public_armored).unwrap();
        (gpg, alice, key)
    }

    /// `kst client --account ACCOUNT ... ARGS --json`.
    fn client(&self, account: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
        run_json(self.client_command(account, true, args, env))
    }

    /// `kst client --account ACCOUNT ... ARGS` (with `--json` when `json`), not run yet.
    fn client_command(
        &self,
        account: &str,
        json: bool,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let mut cmd = Command::new(kst_binary());
        cmd.args(["client", "--account", account])
            .args(if json { &["--json"][..] } else { &[] })
            .args(["--timeout", "20"])
            .arg("--sendmail")
            .arg(self.path("sendmail"))
            .arg("--maildir")
            .arg(self.path("Maildir"))
            .arg("--state-file")
            .arg(self.path("state/pending.json"))
            .arg("--client-config")
            .arg(self.path("no-client.toml"))
            .args(args)
            .env_remove("KST_PASSWORD")
            .env_remove("KST_CLIENT_CONFIG")
            .env("GNUPGHOME", self.path("no-gnupg"));
        std::fs::write(self.path("no-client.toml"), "").unwrap();
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Writes `armored` to `file` here and runs `publish --key FILE` as `account`.
    fn publish_armored(&self, account: &str, file: &str, armored: &str) -> (Output, Value) {
        let key = self.path(file);
        std::fs::write(&key, armored).unwrap();
        self.client(account, &["publish", "--key", key.to_str().unwrap()], &[])
    }

    fn stored_fingerprint(&self, address: &str) -> Option<String> {
        let out = Command::new(kst_binary())
            .args(["keys", "get", address, "--json", "--config"])
            .arg(self.path("kst.toml"))
            .output()
            .unwrap();
        if code(&out) != 0 {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["fingerprint"].as_str().map(str::to_string)
    }
}

#[test]
fn maildir_publish_then_retrieve_through_kst_deliver() {
    let local = Local::new();
    let (_gpg, alice, key) = local.alice_key();

    // Publication: confirmed, HMAC verified, and the key is in the store.
    let (out, v) = local.client(
        "alice@example.net",
        &["publish", "--key", key.to_str().unwrap()],
        &[],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "published");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(
        local.stored_fingerprint("alice@example.net").as_deref(),
        Some(alice.fingerprint.as_str())
    );

    // Retrieval by someone else: the key verifies and gpg reads the same fingerprint.
    let (out, v) = local.client("bob@example.net", &["retrieve", "alice@example.net"], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "found");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(
        gpg_fingerprint_of(v["key"].as_str().unwrap(), "alice@example.net"),
        alice.fingerprint
    );

    // An address without a key: an authenticated "not found", exit 1.
    let (out, v) = local.client("bob@example.net", &["retrieve", "nobody@example.net"], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}"
    );

    // Every reply was consumed: nothing is left pending, and the replies are marked seen.
    let (out, v) = local.client("bob@example.net", &["pending"], &[]);
    assert_eq!(code(&out), 0);
    assert_eq!(v, Value::Array(vec![]));
    assert_eq!(
        std::fs::read_dir(local.path("Maildir/new"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(local.path("Maildir/cur"))
            .unwrap()
            .count(),
        3
    );
}

/// A character a terminal acts on: C0 controls (ESC, CR, BEL, ...), DEL, C1 controls and the
/// bidi embeddings, overrides and isolates.
fn acts_on_terminal(c: char) -> bool {
    c.is_control() && c != '\n' || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A hostile key whose User ID carries escape sequences (a window title, a screen clear, a
/// carriage return over the line, C1 CSI) and a bidi override: `kst client retrieve` prints
/// it escaped, for people and in JSON (which still carries the exact User ID).
#[test]
fn maildir_retrieve_escapes_a_hostile_user_id_on_the_terminal() {
    let local = Local::new();
    let gpg = Gpg::new();
    let name = "Mallory\u{1b}]0;pwned\u{7}\u{1b}[2J\rBEL\u{7}\u{9b}31m\u{202e}gpj.exe\u{2066}";
    let mallory = gpg.generate(name, "alice@example.net", "ed25519");
    let (out, v) =
        local.publish_armored("alice@example.net", "mallory.asc", &mallory.public_armored);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));

    // For people: the User ID is on stderr, escaped; nothing a terminal acts on is printed.
    let out = local
        .client_command(
            "bob@example.net",
            false,
            &["retrieve", "alice@example.net"],
            &[],
        )
        .output()
        .unwrap();
    let (stdout, err) = (
        String::from_utf8(out.stdout.clone()).unwrap(),
        String::from_utf8(out.stderr.clone()).unwrap(),
    );
    assert_eq!(code(&out), 0, "{err}");
    assert!(err.contains("verified key"), "{err}");
    for (what, text) in [("stdout", &stdout), ("stderr", &err)] {
        assert!(
            !text.chars().any(acts_on_terminal),
            "{what} carries raw control characters: {text:?}"
        );
    }
    assert!(
        err.contains("Mallory\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}BEL\\u{7}\\u{9b}31m\\u{202e}gpj.exe\\u{2066} <alice@example.net>"),
        "the User ID is not shown escaped: {err}"
    );
    assert!(
        stdout.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"),
        "{stdout}"
    );

    // JSON: the same value (the exact User ID), with no raw control character in the text.
    let out = local
        .client_command(
            "bob@example.net",
            true,
            &["retrieve", "alice@example.net"],
            &[],
        )
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !text.chars().any(acts_on_terminal),
        "the JSON carries raw control characters: {text:?}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["user_ids"],
        serde_json::json!([format!("{name} <alice@example.net>")]),
        "{v}"
    );
}

/// An owner whose computer's clock runs two days ahead makes a key and publishes it: the KST
/// refuses it (exit 3, `bad-self-signature`) saying the self-signature is dated in the future
/// and to check the clock, not that the key is damaged.
#[test]
fn maildir_a_key_made_with_the_clock_ahead_is_refused_for_the_clock() {
    let local = Local::new();
    let gpg = Gpg::new();
    let ahead = format!("{}!", kst_core::time::unix_now() + 2 * 86_400);
    let armored = gpg.generate_primary("Alice <alice@example.net>", "never", Some(&ahead));
    let (out, v) = local.publish_armored("alice@example.net", "ahead.asc", &armored);
    assert_eq!(code(&out), 3, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "refused", "{v}");
    assert_eq!(v["reason"], "bad-self-signature", "{v}");
    let explanation = v["explanation"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for part in ["in the future", "clock", "runs ahead"] {
        assert!(explanation.contains(part), "{part:?} not in {explanation}");
    }
    assert!(!explanation.contains("damaged"), "{explanation}");
    assert_eq!(local.stored_fingerprint("alice@example.net"), None);
}

#[test]
fn maildir_pending_requests_are_finished_by_check_and_forgeries_are_reported() {
    let local = Local::new();
    let (_gpg, alice, key) = local.alice_key();
    let (out, v) = local.client(
        "alice@example.net",
        &["publish", "--key", key.to_str().unwrap(), "--no-wait"],
        &[],
    );
    // Sent, not read: exit 75 and the request is in the state file.
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (75, Some("pending")),
        "{v}"
    );
    let (_, list) = local.client("alice@example.net", &["pending"], &[]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["kind"], "publication");
    assert_eq!(list[0]["message_id"], v["message_id"]);
    // `check` reads the confirmation and finishes the request.
    let (out, v) = local.client("alice@example.net", &["check"], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "published");
    assert_eq!(v[0]["fingerprint"], alice.fingerprint.as_str());
    let (_, list) = local.client("alice@example.net", &["pending"], &[]);
    assert_eq!(list, Value::Array(vec![]));

    // A key response altered in transit (one letter of the HMAC line changed) is an attack:
    // exit 5, the key is not printed, and the request stays pending.
    let (out, _) = local.client(
        "bob@example.net",
        &["retrieve", "alice@example.net", "--no-wait"],
        &[],
    );
    assert_eq!(code(&out), 75);
    let reply = std::fs::read_dir(local.path("Maildir/new"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "eml"))
        .expect("the key response");
    let text = std::fs::read_to_string(&reply).unwrap();
    let tag = text
        .lines()
        .skip_while(|l| !l.starts_with("-----END PGP PUBLIC KEY BLOCK"))
        .nth(1)
        .expect("HMAC line")
        .to_string();
    assert_eq!(tag.len(), 44, "{tag}");
    let forged = format!(
        "{}{}",
        if tag.starts_with('A') { "B" } else { "A" },
        &tag[1..]
    );
    std::fs::write(&reply, text.replace(&tag, &forged)).unwrap();
    let (out, v) = local.client("bob@example.net", &["check", "--timeout", "1"], &[]);
    assert_eq!(code(&out), 5, "{v}");
    assert_eq!(v[0]["outcome"], "attack");
    assert!(v[0].get("key").is_none(), "{v}");
    let (_, list) = local.client("bob@example.net", &["pending"], &[]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn maildir_refusals_carry_the_reason() {
    let local = Local::new();
    let (_gpg, _, key) = local.alice_key();
    // The MTA says bob logged in, the envelope says alice: kst refuses (sender-mismatch).
    let (out, v) = local.client(
        "alice@example.net",
        &["publish", "--key", key.to_str().unwrap()],
        &[("KST_TEST_LOGIN", "bob@example.net")],
    );
    assert_eq!(code(&out), 3, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "refused");
    assert_eq!(v["reason"], "sender-mismatch");
    assert_eq!(v["authenticated"], true);
    assert!(local.stored_fingerprint("alice@example.net").is_none());

    // A key without the account's User ID is not even sent.
    let (out, v) = local.client(
        "carol@example.net",
        &["publish", "--key", key.to_str().unwrap()],
        &[],
    );
    assert_eq!(code(&out), 64, "{v}");
    assert!(v["error"].as_str().unwrap().contains("User ID"), "{v}");
}

// ---------------------------------------------------------------------------------------------
// The loopback mail system.

const MS_DIR: &str = "/tmp/kst-mail-clienttest";
const MS_PORTS: [(&str, &str); 7] = [
    ("KST_MAIL_SMTP_PORT", "4625"),
    ("KST_MAIL_SUBMISSION_PORT", "4687"),
    ("KST_MAIL_SUBMISSIONS_PORT", "4665"),
    ("KST_MAIL_IMAP_PORT", "4243"),
    ("KST_MAIL_IMAPS_PORT", "4693"),
    ("KST_MAIL_DNS_PORT", "5356"),
    ("KST_MAIL_LMTP_PORT", "4624"),
];

/// A private instance of scripts/mailsystem.sh; `down` when dropped.
struct MailSystem {
    env: Vec<(String, String)>,
}

impl MailSystem {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/mailsystem.sh")
    }

    fn command(arg: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(Self::script()).arg(arg).env("KST_MAIL_DIR", MS_DIR);
        for (k, v) in MS_PORTS {
            cmd.env(k, v);
        }
        cmd
    }

    fn up(kst_config: &Path) -> MailSystem {
        let out = Self::command("up")
            .env("KST_BIN", kst_binary())
            .env("KST_CONFIG", kst_config)
            .env("KST_MAIL_MODE", "pipe")
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/mailsystem.sh up failed:\n{}",
            stderr(&out)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        MailSystem { env }
    }

    fn var(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("mailsystem.sh printed no {name}"))
    }

    /// `kst client` for `account` (password `<local part>-pw`) with the test CA and DNS.
    fn client(&self, account: &str, state: &Path, args: &[&str]) -> (Output, Value) {
        let mut cmd = self.client_command(account, state);
        cmd.args(["--timeout", "30"]).args(args);
        run_json(cmd)
    }

    /// The same command without `--timeout` or a subcommand, for the caller to finish.
    fn client_command(&self, account: &str, state: &Path) -> Command {
        mail_system_client(
            account,
            Path::new(&self.var("KST_MAIL_CA")),
            &self.var("KST_MAIL_RESOLVER"),
            state,
        )
    }
}

impl Drop for MailSystem {
    fn drop(&mut self) {
        let _ = Self::command("down").output();
    }
}

#[test]
fn mail_system_publish_and_retrieve_relayed_and_direct() {
    if !is_root() {
        eprintln!("SKIPPED: the loopback mail system needs root (scripts/mailsystem.sh)");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("kst-client-ms-")
        .tempdir()
        .unwrap();
    // The KST serves example.net only: mail to keys@acme.net bounces (no KST there).
    let config = work.path().join("kst.toml");
    std::fs::write(
        &config,
        format!(
            r#"[kst]
domains = ["example.net"]
trusted_mta_hosts = ["mail.example.net"]

[store]
backend = "fs"
path = "{MS_DIR}/kst/keys"

[mailer]
kind = "smtp"
host = "127.0.0.1"
port = {smtp}
tls = "none"
"#,
            smtp = MS_PORTS[0].1
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let ms = MailSystem::up(&config);
    let state = work.path().join("pending.json");
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let key = work.path().join("alice.asc");
    std::fs::write(&key, &alice.public_armored).unwrap();

    // Alice publishes; submission and IMAP servers found through SRV records.
    let (out, v) = ms.client(
        "alice@example.net",
        &state,
        &["publish", "--key", key.to_str().unwrap()],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "published");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    let stored = Command::new(kst_binary())
        .args(["keys", "get", "alice@example.net", "--json", "--config"])
        .arg(ms.var("KST_MAIL_KST_CONFIG"))
        .output()
        .unwrap();
    assert_eq!(code(&stored), 0, "{}", stderr(&stored));
    let stored: Value = serde_json::from_slice(&stored.stdout).unwrap();
    assert_eq!(stored["fingerprint"], alice.fingerprint.as_str());

    // Carol retrieves it three ways; each time the key verifies and gpg agrees.
    let submission = format!("127.0.0.1:{}", ms.var("KST_MAIL_SUBMISSION_PORT"));
    let imaps = format!("imaps://127.0.0.1:{}", ms.var("KST_MAIL_IMAPS_PORT"));
    let mx = format!("127.0.0.1:{}", ms.var("KST_MAIL_SMTP_PORT"));
    let smtp_port = ms.var("KST_MAIL_SMTP_PORT");
    for (route, args) in [
        (
            "relayed, explicit servers",
            vec!["--submission", &submission, "--imap", &imaps],
        ),
        (
            "direct, MX looked up",
            vec!["--direct", "--mx-port", &smtp_port],
        ),
        ("direct, --mx", vec!["--direct", "--mx", &mx]),
    ] {
        let mut all = vec!["retrieve", "alice@example.net"];
        all.extend(args);
        let (out, v) = ms.client("carol@acme.net", &state, &all);
        assert_eq!(code(&out), 0, "{route}: {v}\n{}", stderr(&out));
        assert_eq!(v["outcome"], "found", "{route}");
        assert_eq!(v["fingerprint"], alice.fingerprint.as_str(), "{route}");
        assert_eq!(
            gpg_fingerprint_of(v["key"].as_str().unwrap(), "alice@example.net"),
            alice.fingerprint,
            "{route}"
        );
    }

    // acme.net runs no KST here: the request bounces, and the bounce says so.
    let (out, v) = ms.client("alice@example.net", &state, &["retrieve", "carol@acme.net"]);
    assert_eq!(code(&out), 4, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "no-kst");
    assert_eq!(v["service"], "keys@acme.net");

    // A wrong password is refused before anything is sent.
    let mut cmd = ms.client_command("carol@acme.net", &state);
    cmd.args(["retrieve", "alice@example.net"])
        .env("KST_PASSWORD", "wrong");
    let (out, v) = run_json(cmd);
    assert_eq!(code(&out), 77, "{v}");

    // The owner's commands over the real mail path: status (a retrieval of her own address
    // through submission and IMAP found by SRV) matches, delete is answered and verified, and
    // status then says nothing is published (exit 1).
    let (out, v) = ms.client(
        "alice@example.net",
        &state,
        &["status", "--key", key.to_str().unwrap()],
    );
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("match")),
        "{v}\n{}",
        stderr(&out)
    );
    let (out, v) = ms.client("alice@example.net", &state, &["delete"]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}\n{}",
        stderr(&out)
    );
    let gone = Command::new(kst_binary())
        .args(["keys", "get", "alice@example.net", "--config"])
        .arg(ms.var("KST_MAIL_KST_CONFIG"))
        .output()
        .unwrap();
    assert_eq!(code(&gone), 1, "{}", stderr(&gone));
    let (out, v) = ms.client(
        "alice@example.net",
        &state,
        &["status", "--key", key.to_str().unwrap()],
    );
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}"
    );

    let (_, list) = ms.client("carol@acme.net", &state, &["pending"]);
    assert_eq!(list, Value::Array(vec![]));
}

/// Subkey lines (`sub`) of the keys `gpg` in `home` holds for `who`.
fn gpg_subkeys(home: &Path, who: &str) -> usize {
    let out = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--with-colons", "--list-keys", who])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("sub:"))
        .count()
}

/// The owner's commands through `kst deliver`: `status` compares what the KST serves with the
/// owner's key (exit 6 on a difference, for cron), a republication merges, `refresh`
/// re-retrieves a key imported through kst and imports its update, `delete` removes the key
/// with a verified answer, and `publish` warns about a key that expires soon.
#[test]
fn maildir_owner_status_refresh_delete_and_expiry_warning() {
    let local = Local::new();
    let (gpg, alice, key) = local.alice_key();
    let key = key.to_str().unwrap();
    let (out, v) = local.client("alice@example.net", &["publish", "--key", key], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    let (out, v) = local.client("alice@example.net", &["status", "--key", key], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("match")),
        "{v}"
    );
    assert_eq!(v["served"]["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(v["served"], v["local"]);

    // A new subkey on the owner's device: the KST lags behind, status says so (exit 6).
    gpg.run(&[
        "--passphrase",
        "",
        "--pinentry-mode",
        "loopback",
        "--quick-add-key",
        &alice.fingerprint,
        "cv25519",
        "encr",
        "never",
    ]);
    let key2 = local.path("alice2.asc");
    std::fs::write(&key2, gpg.export(&alice.fingerprint)).unwrap();
    let key2 = key2.to_str().unwrap();
    let (out, v) = local.client("alice@example.net", &["status", "--key", key2], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "{v}"
    );
    assert!(
        v["differences"][0]
            .as_str()
            .unwrap()
            .contains("lacks your subkeys"),
        "{v}"
    );

    // Bob imports alice's key through kst: it is noted for refresh, and not due yet.
    let bob_gpg = Gpg::new();
    let bob_home = bob_gpg.home().to_str().unwrap().to_string();
    let bob_env = [("GNUPGHOME", bob_home.as_str())];
    let (out, v) = local.client(
        "bob@example.net",
        &["retrieve", "alice@example.net", "--import"],
        &bob_env,
    );
    assert_eq!(
        (code(&out), v["imported"].as_bool()),
        (0, Some(true)),
        "{v}"
    );
    assert_eq!(gpg_subkeys(bob_gpg.home(), &alice.fingerprint), 1);
    let (out, v) = local.client("bob@example.net", &["refresh"], &bob_env);
    assert_eq!((code(&out), v), (0, Value::Array(vec![])));

    // Alice publishes the new subkey (an old copy published later would not drop it).
    let (out, v) = local.client("alice@example.net", &["publish", "--key", key2], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = local.client("alice@example.net", &["publish", "--key", key], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = local.client("alice@example.net", &["status", "--key", key2], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("match")),
        "{v}"
    );

    // Bob's refresh (every key is due with --max-age-days 0) brings the subkey to his keyring.
    let (out, v) = local.client(
        "bob@example.net",
        &["refresh", "--max-age-days", "0", "--dry-run"],
        &bob_env,
    );
    assert_eq!(code(&out), 0, "{v}");
    assert_eq!(v[0]["address"], "alice@example.net", "{v}");
    let (out, v) = local.client(
        "bob@example.net",
        &["refresh", "--max-age-days", "0"],
        &bob_env,
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "found", "{v}");
    assert_eq!(v[0]["imported"], true, "{v}");
    assert_eq!(gpg_subkeys(bob_gpg.home(), &alice.fingerprint), 2);

    // Deletion: a verified answer, nothing stored, and status then exits 1.
    let (out, v) = local.client("alice@example.net", &["delete"], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}"
    );
    assert_eq!(v["address"], "alice@example.net");
    assert_eq!(local.stored_fingerprint("alice@example.net"), None);
    let (out, v) = local.client("alice@example.net", &["status", "--key", key2], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}"
    );

    // A key that expires in 10 days: published, with a warning that says how to extend it.
    let armored = gpg.generate_primary("Carol <carol@example.net>", "10d", None);
    let (out, v) = local.publish_armored("carol@example.net", "carol.asc", &armored);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("expires in 10 days"),
        "{err}"
    );
    assert!(err.contains("--quick-set-expire"), "{err}");
}

/// A KST that does not sign (no `[dkim]`): the reply is proven by K_auth only, and with
/// `--require-dkim` the client treats it as an attack (exit 5): it is not used and the request
/// stays pending. Signed replies passing are tests/dkim.rs and tests/e2e.rs.
#[test]
fn maildir_require_dkim_refuses_an_unsigned_reply() {
    let local = Local::new();
    let (out, v) = local.client("bob@example.net", &["retrieve", "nobody@example.net"], &[]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}"
    );
    assert_eq!(v["proven_by"], "K_auth only", "{v}");
    assert_eq!(v["dkim"]["result"], "none", "{v}");
    assert_eq!(v["dkim"]["domain"], "example.net", "{v}");
    assert!(
        stderr(&out).is_empty() || !stderr(&out).contains("K_auth and DKIM"),
        "{}",
        stderr(&out)
    );

    // The refused reply is in the Maildir when the sendmail script returns (`kst deliver`
    // writes it); the client then waits for a genuine one until --timeout and reports the
    // attack. 3 s instead of the helper's 20: the same outcome, 17 s sooner.
    let (out, v) = local.client(
        "bob@example.net",
        &[
            "--require-dkim",
            "retrieve",
            "nobody@example.net",
            "--timeout",
            "3",
        ],
        &[],
    );
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "attack", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("--require-dkim") && error.contains("DKIM none"),
        "{error}"
    );
    assert!(v.get("key").is_none());
    let (_, list) = local.client("bob@example.net", &["pending"], &[]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

// --- issue 15 red team: forged and replayed answers to the owner's commands ---------------

/// Every reply file in the Maildir (new/ and cur/), removed; returns their contents.
fn take_replies(local: &Local) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        for e in std::fs::read_dir(local.path("Maildir").join(sub)).unwrap() {
            let p = e.unwrap().path();
            out.push(std::fs::read_to_string(&p).unwrap());
            std::fs::remove_file(&p).unwrap();
        }
    }
    out
}

/// The pending request of `kind` in the state file: (Message-ID, K_auth).
fn pending_of(local: &Local, kind: &str) -> (String, String) {
    let v: Value =
        serde_json::from_slice(&std::fs::read(local.path("state/pending.json")).unwrap()).unwrap();
    let text = v.to_string();
    let entry = v["requests"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"))
        .iter()
        .map(|e| {
            if e.get("pending").is_some() {
                &e["pending"]
            } else {
                e
            }
        })
        .find(|p| p["kind"] == kind)
        .unwrap_or_else(|| panic!("no pending {kind}: {text}"));
    (
        entry["message_id"].as_str().unwrap().to_string(),
        entry["k_auth"].as_str().unwrap().to_string(),
    )
}

/// An answer to `kst client delete` is believed only when it answers this very request, about
/// this very account, with this request's K_auth: the genuine confirmation of an earlier
/// deletion replayed, the same confirmation re-addressed to the new request (HMAC of another
/// K_auth), and a confirmation with a valid HMAC that speaks of another account are all
/// refused (the request stays pending; exit 5 for the forgeries). The genuine answer, put
/// back, is then accepted.
#[test]
fn maildir_forged_and_replayed_deletion_answers_are_not_believed() {
    let local = Local::new();
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let key = local.path("alice.asc");
    std::fs::write(&key, &alice.public_armored).unwrap();
    let key = key.to_str().unwrap();
    let publish = |local: &Local| {
        let (out, v) = local.client("alice@example.net", &["publish", "--key", key], &[]);
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    };
    publish(&local);
    take_replies(&local);

    // A first deletion, answered: its genuine confirmation is what an attacker replays.
    let (out, v) = local.client("alice@example.net", &["delete", "--no-wait"], &[]);
    assert_eq!(code(&out), 75, "{v}");
    let (old_id, _) = pending_of(&local, "deletion");
    let old = take_replies(&local)
        .pop()
        .expect("the deletion confirmation");
    assert!(old.contains("KST-Status: deleted"), "{old}");
    assert!(old.contains(&old_id));
    std::fs::write(local.path("Maildir/new/1.old.eml"), &old).unwrap();
    let (out, v) = local.client("alice@example.net", &["check"], &[]);
    assert_eq!(
        (code(&out), v[0]["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}"
    );
    take_replies(&local);

    // The key again, and a second deletion whose real answer the attacker suppresses.
    publish(&local);
    take_replies(&local);
    let (out, v) = local.client("alice@example.net", &["delete", "--no-wait"], &[]);
    assert_eq!(code(&out), 75, "{v}");
    let (new_id, k_auth) = pending_of(&local, "deletion");
    let genuine = take_replies(&local).pop().expect("the second confirmation");
    let check = |local: &Local, what: &str, reply: &str| {
        std::fs::write(local.path("Maildir/new/2.forged.eml"), reply).unwrap();
        let (out, v) = local.client("alice@example.net", &["check", "--timeout", "1"], &[]);
        take_replies(local);
        assert_ne!(code(&out), 0, "{what}: {v}");
        assert_ne!(v[0]["outcome"], "deleted", "{what}: {v}");
        let (id, _) = pending_of(local, "deletion");
        assert_eq!(id, new_id, "{what}: the request is no longer pending");
        (code(&out), v)
    };

    // 1. The old confirmation, replayed as it is: not an answer to this request.
    check(&local, "replayed", &old);
    // 2. The old confirmation re-addressed to the new request: its HMAC is of the old K_auth.
    let (c, v) = check(&local, "re-addressed", &old.replace(&old_id, &new_id));
    assert_eq!((c, v[0]["outcome"].as_str()), (5, Some("attack")), "{v}");
    // 3. A valid HMAC (someone who read K_auth on the way) about another account.
    let version: u32 = genuine
        .lines()
        .find_map(|l| l.strip_prefix("KST-Protocol:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let k = kst_core::AuthKey::parse(&k_auth).unwrap();
    let tag = kst_core::mac::statement_tag_for(
        version,
        &k,
        kst_core::Status::Deleted,
        None,
        Some("bob@example.net"),
    );
    let real_tag = kst_core::mac::statement_tag_for(
        version,
        &k,
        kst_core::Status::Deleted,
        None,
        Some("alice@example.net"),
    );
    // The body may be quoted-printable (a tag's trailing `=` is then `=3D`).
    let qp = |t: &str| t.replace('=', "=3D");
    assert!(
        genuine.contains(&real_tag) || genuine.contains(&qp(&real_tag)),
        "{genuine}"
    );
    let other = genuine
        .replace(
            "KST-Address: alice@example.net",
            "KST-Address: bob@example.net",
        )
        .replace(&qp(&real_tag), &qp(&tag))
        .replace(&real_tag, &tag);
    assert_ne!(other, genuine);
    let (c, v) = check(&local, "another account", &other);
    assert_eq!((c, v[0]["outcome"].as_str()), (5, Some("attack")), "{v}");

    // The genuine answer is accepted.
    std::fs::write(local.path("Maildir/new/3.genuine.eml"), &genuine).unwrap();
    let (out, v) = local.client("alice@example.net", &["check"], &[]);
    assert_eq!(
        (code(&out), v[0]["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}"
    );
}

/// `refresh` from a frequent cron job against keys that expire or have expired: five keys of
/// strangers imported through kst that expired long ago (never extended) used to be due on
/// every run and, sorted first, took every run's batch, so a correspondent's key fetched long
/// ago was never refreshed again (its revocation never reached the user); and a key that
/// expires soon was fetched again on every run. Now an expired key is due by its age only and
/// a key that expires soon at most once a day.
#[test]
fn maildir_expired_keys_cannot_starve_refresh_and_soon_expiring_keys_are_not_refetched_every_run() {
    let local = Local::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let day = 86_400;
    let entry = |address: &str, expires_at: Option<u64>, fetched_at: u64| {
        serde_json::json!({
            "address": address,
            "fingerprint": "0123456789ABCDEF0123456789ABCDEF01234567",
            "expires_at": expires_at,
            "fetched_at": fetched_at,
        })
    };
    let mut keys: Vec<Value> = (0..5)
        .map(|i| {
            entry(
                &format!("gone{i}@example.org"),
                Some(now - 300 * day),
                now - 2 * day,
            )
        })
        .collect();
    keys.push(entry("friend@example.org", None, now - 100 * day));
    keys.push(entry("soon@example.org", Some(now + 5 * day), now - 60));
    std::fs::create_dir_all(local.path("state")).unwrap();
    std::fs::write(
        local.path("state/imported.json"),
        serde_json::json!({"version": 1, "keys": keys}).to_string(),
    )
    .unwrap();
    let (out, v) = local.client("bob@example.net", &["refresh", "--dry-run"], &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let due: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["address"].as_str().unwrap())
        .collect();
    assert_eq!(due, ["friend@example.org"], "{v}");
}

/// A subkey revocation the KST does not serve is reported, and cannot be rolled back: alice
/// revokes a compromised subkey locally; until she publishes it, `kst client status` (the
/// owner's cron monitor) reports the served subkey as unrevoked (exit 6). Once published,
/// someone with her password, not her key, publishes another key and then an old copy of hers
/// from before the revocation: the store's tombstone keeps subkey revocations, so the old copy
/// is served with the subkey revoked and status still matches.
#[test]
fn maildir_status_reports_a_rolled_back_subkey_revocation() {
    let local = Local::new();
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let old = local.path("old.asc");
    std::fs::write(&old, &alice.public_armored).unwrap();
    let publish = |path: &Path| {
        let (out, v) = local.client(
            "alice@example.net",
            &["publish", "--key", path.to_str().unwrap()],
            &[],
        );
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    };
    publish(&old);
    // Alice revokes her encryption subkey and publishes.
    let mut child = Command::new("gpg")
        .env("GNUPGHOME", gpg.home())
        .args([
            "--batch",
            "--yes",
            "--no-tty",
            "--quiet",
            "--pinentry-mode",
            "loopback",
        ])
        .args([
            "--passphrase",
            "",
            "--command-fd",
            "0",
            "--edit-key",
            &alice.fingerprint,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"key 1\nrevkey\ny\n0\n\ny\nsave\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let current = local.path("current.asc");
    std::fs::write(&current, gpg.export(&alice.fingerprint)).unwrap();
    let status = || {
        local.client(
            "alice@example.net",
            &["status", "--key", current.to_str().unwrap()],
            &[],
        )
    };
    // Not published yet: the KST serves the subkey unrevoked, and status says so.
    let (out, v) = status();
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "{v}"
    );
    assert!(v["differences"].to_string().contains("unrevoked"), "{v}");
    publish(&current);
    let (out, v) = status();
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("match")),
        "{v}"
    );

    // The password holder: another key, then the old copy. The tombstone keeps the subkey
    // revocation, so the old copy is served with the subkey revoked.
    let mallory = Gpg::new();
    let other = mallory.generate("Alice", "alice@example.net", "ed25519");
    let other_path = local.path("other.asc");
    std::fs::write(&other_path, &other.public_armored).unwrap();
    publish(&other_path);
    publish(&old);
    let (out, v) = status();
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("match")),
        "{v}"
    );
    assert!(
        !v["served"]["revoked_subkeys"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{v}"
    );
}
