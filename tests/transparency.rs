//! Key transparency (issue 18, feature `transparency`, on by default):
//!
//! - `fs_directory_store_conformance`: kst-fs's `FsDirectoryStore` against the directory
//!   storage contract (`kst_core::conformance::directory`), two instances on one store.
//! - `record_encoding_round_trips`: every record of a directory through the blob encoding.
//! - `one_address_is_recorded_in_store_order` (fs) and `..._on_postgres`: two processes'
//!   handles publish one address at once; the directory records it in the store's order
//!   (then a deletion, a publication after it, a restore, `record_all`).
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

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use kst_core::KeyStore;
use kst_core::transparency::DirectoryStore;
use kst_fs::{FsDirectoryStore, FsStore};
use kst_postgres::{PgDirectoryStore, PostgresStore};
use kst_tests::serve::{ServeProcess, free_port, http_get};
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

/// Two processes' worth of handles (two key stores, two directory stores on one fs store)
/// publish versions of one address at once through `TransparentStore`: the directory's
/// history is the store's order (`kst_core::conformance::directory::one_address_in_store_order`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_recorded_in_store_order() {
    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn KeyStore>; 2] = [
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
    ];
    let dirs: [Arc<dyn DirectoryStore>; 2] = [
        Arc::new(FsDirectoryStore::new(dir.path())),
        Arc::new(FsDirectoryStore::new(dir.path())),
    ];
    kst_core::conformance::directory::one_address_in_store_order(stores, dirs).await;
}

/// The same on PostgreSQL: two store pools and two directory pools on a fresh database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_recorded_in_store_order_on_postgres() {
    let db = TestDb::new();
    let stores: [Arc<dyn KeyStore>; 2] = [
        Arc::new(PostgresStore::connect(&db.url).await.unwrap()),
        Arc::new(PostgresStore::connect(&db.url).await.unwrap()),
    ];
    let dirs: [Arc<dyn DirectoryStore>; 2] = [
        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
    ];
    kst_core::conformance::directory::one_address_in_store_order(stores, dirs).await;
}

/// A KST for example.net with its directory on, behind sendmail-style scripts, replying into
/// a Maildir, and `kst serve` answering the directory's HTTP endpoint.
struct Provider {
    dir: tempfile::TempDir,
    bin: PathBuf,
    head_key: String,
    log_url: String,
    _serve: ServeProcess,
    // Dropped after `kst serve` stopped.
    _db: Option<TestDb>,
}

impl Provider {
    /// The provider on the fs store, or on a fresh PostgreSQL database with `postgres`.
    fn start(postgres: bool) -> Provider {
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
        let serve = ServeProcess::start_binary(&bin, p.join("serve.log"), http, |cmd| {
            cmd.arg("--config").arg(&config);
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
        std::fs::write(self.path("no-client.toml"), "").unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["client", "--account", account, "--json", "--timeout", "30"])
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
        let at = self.log_url.trim_start_matches("http://").parse().unwrap();
        http_get(at, path)
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
    // The twin is in the history too: it was recorded (before her republication, in the
    // store's order) when alice republished, so the owner's monitor sees the change she did
    // not make.
    assert_eq!(
        head.head.epoch, 4,
        "alice's publication, the twin, her republication and her deletion: {body}"
    );
}
