//! Key transparency (issue 18, feature `transparency`, on by default):
//!
//! - `fs_directory_store_conformance`: kst-fs's `FsDirectoryStore` against the directory
//!   storage contract (`kst_core::conformance::directory`), two instances on one store.
//! - `record_encoding_round_trips`: every record of a directory through the blob encoding.
//! - `postgres_directory_store_conformance`: kst-postgres's `PgDirectoryStore`, the same
//!   suite, two pools on a fresh database.
//! - `retrieval_is_checked_against_the_directory` (fs store) and `..._on_postgres`: the real path through the real binaries.
//!   Publications go through `kst deliver` (the client hands them to a sendmail-style script,
//!   as Postfix's pipe(8) would), which records them in the store's directory; `kst serve`
//!   serves the directory on `[http]`; `kst client retrieve --check-transparency` fetches the
//!   signed head and proof and checks them against the head key and the key the KST mailed.
//!   Negative cases: a wrong head key, and a key put in the store behind the directory's back
//!   (a second `kst deliver` configuration without `[transparency]`, standing in for an
//!   insider or a tool that bypasses the directory): the reply's HMAC verifies, the check
//!   does not, exit 5.
//! - `replies_carry_the_proof_in_version_3`: protocol version 3 through the real binaries with
//!   no `kst serve` at all (no HTTP endpoint to reach): `kst client publish/retrieve/delete
//!   --transparency --log-key HEX` offers version 3, `kst deliver` puts the directory's answer
//!   inside the HMAC-covered reply, and the client checks it. A reply whose answer an attacker
//!   on the reply's path stripped, or swapped for one captured from an earlier reply, is exit
//!   5; so is the insider's key behind the directory's back, and a wrong head key.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use kst_core::transparency::DirectoryStore;
use kst_fs::FsDirectoryStore;
use kst_postgres::PgDirectoryStore;
use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::{
    Gpg, TestDb, code, kst_binary, make_maildir, run_json, stderr, write_sendmail_script,
};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fs_directory_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
    let b: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
    kst_core::conformance::directory::run_all(a, b).await;
}

#[tokio::test]
async fn record_encoding_round_trips() {
    kst_core::conformance::directory::record_encoding_round_trips().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_directory_store_conformance() {
    let db = TestDb::new();
    let a: Arc<dyn DirectoryStore> = Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap());
    let b: Arc<dyn DirectoryStore> = Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap());
    kst_core::conformance::directory::run_all(a, b).await;
}

/// A KST for example.net with its directory on, behind sendmail-style scripts, replying into
/// a Maildir, and `kst serve` answering the directory's HTTP endpoint.
struct Provider {
    dir: tempfile::TempDir,
    bin: PathBuf,
    head_key: String,
    log_url: String,
    _serve: Option<ServeProcess>,
    // Dropped after `kst serve` stopped.
    _db: Option<TestDb>,
}

impl Provider {
    /// The provider on the fs store, or on a fresh PostgreSQL database with `postgres`.
    fn start(postgres: bool) -> Provider {
        Provider::start_with(postgres, true)
    }

    /// [`Provider::start`], with `kst serve` (the directory's HTTP endpoint) only if `serve`.
    fn start_with(postgres: bool, serve: bool) -> Provider {
        let bin = kst_binary();
        let dir = tempfile::Builder::new()
            .prefix("kst-transparency-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        make_maildir(&p.join("Maildir"));
        let http = free_port();
        let db = postgres.then(TestDb::new);
        let store = match &db {
            Some(db) => format!("backend = \"postgres\"\nurl = \"{}\"", db.url),
            None => format!("backend = \"fs\"\npath = \"{}\"", p.join("keys").display()),
        };
        let base = format!(
            r#"[kst]
domains = ["example.net"]
auth_source = "sasl-argv"

[store]
{store}

[mailer]
kind = "spool"
path = "{new}"

[lmtp]
listen = "unix:{sock}"

[http]
listen = "{http}"
"#,
            new = p.join("Maildir/new").display(),
            sock = p.join("lmtp.sock").display(),
        );
        // The insider's configuration: the same store, no directory.
        std::fs::write(p.join("no-log.toml"), &base).unwrap();
        std::fs::write(
            p.join("kst.toml"),
            format!(
                "{base}\n[transparency]\nkey_file = \"{}\"\n",
                p.join("log-{domain}.key").display()
            ),
        )
        .unwrap();
        let out = Command::new(&bin)
            .env_clear()
            .arg("--config")
            .arg(p.join("kst.toml"))
            .args(["log", "keygen", "example.net", "--output"])
            .arg(p.join("log-example.net.key"))
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "kst log keygen: {}", stderr(&out));
        let printed = String::from_utf8(out.stdout).unwrap();
        let head_key = printed
            .lines()
            .find_map(|l| l.strip_prefix("head-key "))
            .expect("kst log keygen prints the head key")
            .to_string();
        for (script, config) in [("sendmail", "kst.toml"), ("sendmail-no-log", "no-log.toml")] {
            write_sendmail_script(&p.join(script), &bin, &p.join(config));
        }
        let config = p.join("kst.toml");
        let serve = serve.then(|| {
            ServeProcess::start_binary(&bin, p.join("serve.log"), http, |cmd| {
                cmd.arg("--config").arg(&config);
            })
        });
        Provider {
            bin,
            head_key,
            log_url: format!("http://{http}"),
            _serve: serve,
            _db: db,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kst client --account ACCOUNT --json ... ARGS`, requests handed to `sendmail`.
    fn client(&self, sendmail: &str, account: &str, args: &[&str]) -> (Output, Value) {
        self.client_waiting(30, sendmail, account, args)
    }

    /// [`Provider::client`] waiting at most `timeout` seconds for the reply (a client that
    /// saw only a forged reply waits for the genuine one until then).
    fn client_waiting(
        &self,
        timeout: u32,
        sendmail: &str,
        account: &str,
        args: &[&str],
    ) -> (Output, Value) {
        std::fs::write(self.path("no-client.toml"), "").unwrap();
        let mut cmd = Command::new(&self.bin);
        let timeout = timeout.to_string();
        cmd.args([
            "client",
            "--account",
            account,
            "--json",
            "--timeout",
            &timeout,
        ])
        .arg("--sendmail")
        .arg(self.path(sendmail))
        .arg("--maildir")
        .arg(self.path("Maildir"))
        .arg("--state-file")
        .arg(self.path(&format!("state-{account}/pending.json")))
        .arg("--client-config")
        .arg(self.path("no-client.toml"))
        .args(args)
        .env_remove("KST_PASSWORD")
        .env_remove("KST_CLIENT_CONFIG")
        .env("GNUPGHOME", self.path("no-gnupg"));
        run_json(cmd)
    }

    fn publish(&self, sendmail: &str, account: &str, armored: &str) {
        let file = self.path("publish.asc");
        std::fs::write(&file, armored).unwrap();
        let (out, v) = self.client(
            sendmail,
            account,
            &["publish", "--key", file.to_str().unwrap()],
        );
        assert_eq!(
            (code(&out), v["outcome"].as_str()),
            (0, Some("published")),
            "{v}\n{}",
            stderr(&out)
        );
    }

    /// Bob's `retrieve ADDRESS --check-transparency` with the head key `head_key`.
    fn checked_retrieve(&self, address: &str, head_key: &str) -> (Output, Value) {
        self.client(
            "sendmail",
            "bob@example.net",
            &[
                "retrieve",
                address,
                "--check-transparency",
                "--log-url",
                &self.log_url,
                "--log-key",
                head_key,
            ],
        )
    }

    fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.log_url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }
}

#[test]
fn retrieval_is_checked_against_the_directory() {
    checked_retrievals(&Provider::start(false));
}

#[test]
fn retrieval_is_checked_against_the_directory_on_postgres() {
    checked_retrievals(&Provider::start(true));
}

/// The scenario of the module docs against `provider`.
fn checked_retrievals(provider: &Provider) {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);

    // The endpoint: keys, a signed head, and 404 for a domain it does not serve.
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/keys");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("head-key {}", provider.head_key)),
        "{body}"
    );
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    assert_eq!(status, 200, "{body}");
    let head = kst_core::transparency::answer::parse_head(&body).expect("the head parses");
    assert_eq!(head.head.epoch, 1, "one publication, one epoch: {body}");
    head.verify(&kst_core::transparency::answer::hex32(&provider.head_key).unwrap())
        .expect("the head is signed by the printed head key");
    let (status, _) = provider.http_get("/.well-known/kst/log/example.org/head");
    assert_eq!(status, 404);

    // Bob retrieves alice's key: the HMAC verifies, and so does the directory's proof.
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "found", "{v}");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());

    // An address without a key: an authenticated "not found", and the directory proves the
    // address was never in it.
    let (out, v) = provider.checked_retrieve("nobody@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}\n{}",
        stderr(&out)
    );

    // A head key that is not the domain's: the head's signature fails, exit 5.
    let wrong = "11".repeat(32);
    let (out, v) = provider.checked_retrieve("alice@example.net", &wrong);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (5, Some("attack")),
        "{v}\n{}",
        stderr(&out)
    );

    // Alice's key replaced in the store behind the directory's back: the KST serves the
    // twin with a valid HMAC, which the plain retrieval accepts; the check refuses it.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    assert_eq!(
        (code(&out), v["fingerprint"].as_str()),
        (0, Some(twin.fingerprint.as_str())),
        "without the check the twin passes: {v}\n{}",
        stderr(&out)
    );
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (5, Some("attack")),
        "{v}\n{}",
        stderr(&out)
    );
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not the one the directory commits to"),
        "{error}"
    );

    // Alice publishes her key again through kst: recorded, and the check passes again.
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());

    // Alice deletes her key: "not found" is confirmed by the directory's deletion entry.
    let (out, v) = provider.client("sendmail", "alice@example.net", &["delete"]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}\n{}",
        stderr(&out)
    );
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}\n{}",
        stderr(&out)
    );
    let (_, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    let head = kst_core::transparency::answer::parse_head(&body).unwrap();
    assert_eq!(
        head.head.epoch, 3,
        "alice's publication, her republication and her deletion: {body}"
    );
}

/// Writes `name`: a sendmail-style script that delivers through `kst deliver` like `sendmail`,
/// then lets the attacker on the reply's path rewrite the reply just spooled: `strip` removes
/// the key directory's answer, `swap` puts the answer block saved in `captured.block` there.
fn write_tampering_script(provider: &Provider, name: &str, how: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tamper = provider.path("tamper.py");
    std::fs::write(
        &tamper,
        r#"import re, sys
path, how, captured = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path, 'rb').read().decode()
block = re.compile(r'-----BEGIN KST LOG ANSWER-----\r?\n.*?-----END KST LOG ANSWER-----\r?\n', re.S)
assert block.search(text), 'no answer block in ' + path
if how == 'strip':
    text = block.sub('', text)
else:
    text = block.sub(lambda m: open(captured, newline='').read(), text)
open(path, 'wb').write(text.encode())
"#,
    )
    .unwrap();
    let script = provider.path(name);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{kst}' deliver --config '{cfg}' --sender \"$3\" --recipient \"$5\" --sasl-username \"${{KST_TEST_LOGIN:-$3}}\" || exit $?\nnewest=$(ls -t '{new}' | head -n 1)\nexec python3 '{tamper}' '{new}'/\"$newest\" {how} '{captured}'\n",
            kst = provider.bin.display(),
            cfg = provider.path("kst.toml").display(),
            new = provider.path("Maildir/new").display(),
            tamper = tamper.display(),
            captured = provider.path("captured.block").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The newest reply in the provider's Maildir (`new/`, or `cur/` once the client read it).
fn newest_reply(provider: &Provider) -> String {
    let newest = ["Maildir/new", "Maildir/cur"]
        .iter()
        .flat_map(|d| std::fs::read_dir(provider.path(d)).unwrap().flatten())
        .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
        .expect("a reply");
    std::fs::read_to_string(newest.path()).unwrap()
}

/// The client's exit code and outcome are `code` and `outcome`.
fn expect(out: &Output, v: &Value, code: i32, outcome: &str) {
    assert_eq!(
        (kst_tests::code(out), v["outcome"].as_str()),
        (code, Some(outcome)),
        "{v}\n{}",
        stderr(out)
    );
}

#[test]
fn replies_carry_the_proof_in_version_3() {
    // No `kst serve`: nothing answers HTTP; every proof travels inside the replies.
    let provider = Provider::start_with(false, false);
    let key = provider.head_key.clone();
    let v3 = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--transparency".into(), "--log-key".into(), key.clone()]);
        all
    };
    let run = |sendmail: &str, account: &str, args: &[&str]| {
        let args = v3(args);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        provider.client(sendmail, account, &refs)
    };
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let file = provider.path("alice.asc");
    std::fs::write(&file, &alice.public_armored).unwrap();
    let file = file.to_str().unwrap();

    // Alice publishes in version 3: the confirmation proves her key is the directory's entry.
    let (out, v) = run("sendmail", "alice@example.net", &["publish", "--key", file]);
    expect(&out, &v, 0, "published");
    let reply = newest_reply(&provider);
    assert!(reply.contains("KST-Protocol: 3\r\n"), "{reply}");
    assert!(reply.contains("-----BEGIN KST LOG ANSWER-----"), "{reply}");

    // Bob retrieves it, and an address without a key, in version 3.
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "nobody@example.net"],
    );
    expect(&out, &v, 1, "not-found");
    // Captured by the attacker: the answer block of that "not found".
    let reply = newest_reply(&provider);
    let begin = reply.find("-----BEGIN KST LOG ANSWER-----").unwrap();
    let end = reply.find("-----END KST LOG ANSWER-----").unwrap()
        + "-----END KST LOG ANSWER-----\r\n".len();
    std::fs::write(provider.path("captured.block"), &reply[begin..end]).unwrap();

    // A head key that is not the domain's: exit 5.
    let wrong = "11".repeat(32);
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &[
            "retrieve",
            "alice@example.net",
            "--transparency",
            "--log-key",
            &wrong,
        ],
    );
    expect(&out, &v, 5, "attack");

    // The attacker on the reply's path strips the answer, or swaps in the captured one: the
    // client refuses both (it waits for a genuine reply until its timeout, then exit 5).
    for how in ["strip", "swap"] {
        let script = format!("sendmail-{how}");
        write_tampering_script(&provider, &script, how);
        let args = v3(&["retrieve", "alice@example.net"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, v) = provider.client_waiting(3, &script, "bob@example.net", &refs);
        assert_eq!(
            (code(&out), v["outcome"].as_str()),
            (5, Some("attack")),
            "{how}: {v}\n{}",
            stderr(&out)
        );
        let error = v["error"].as_str().unwrap_or_default().to_string();
        let tampered = newest_reply(&provider);
        assert!(tampered.contains("KST-Protocol: 3\r\n"), "{tampered}");
        match how {
            "strip" => {
                assert!(!tampered.contains("BEGIN KST LOG ANSWER"), "{tampered}");
                assert!(error.contains("no usable key directory answer"), "{error}");
            }
            _ => {
                assert!(tampered.contains(&reply[begin..end]), "{tampered}");
                assert!(error.contains("HMAC"), "{error}");
            }
        }
    }

    // The insider's twin in the store behind the directory's back: the version 3 reply
    // carries the directory's answer, which commits to alice's key, not the twin: exit 5.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not the one the directory commits to"),
        "{error}"
    );

    // Alice republishes and then deletes in version 3; "not found" is proven by the deletion.
    let (out, v) = run("sendmail", "alice@example.net", &["publish", "--key", file]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = run("sendmail", "alice@example.net", &["delete"]);
    expect(&out, &v, 0, "deleted");
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    expect(&out, &v, 1, "not-found");
    // Without --transparency the same KST still answers version 2 clients, without proofs.
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &["retrieve", "nobody@example.net"],
    );
    assert_eq!(code(&out), 1, "{v}\n{}", stderr(&out));
    let reply = newest_reply(&provider);
    assert!(reply.contains("KST-Protocol: 2\r\n"), "{reply}");
    assert!(!reply.contains("BEGIN KST LOG ANSWER"), "{reply}");
}
