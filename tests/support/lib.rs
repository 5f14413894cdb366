//! Shared helpers for kst's cross-crate tests: real gpg keys, the real `kst` binary, temporary
//! KST set-ups on the filesystem store with the spool mailer.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use std::io::Write as _;

mod services;
pub use services::{TestDb, TestPrefix, postgres_admin_url, redis_url};
#[cfg(feature = "transparency")]
pub mod directory_drill;
pub mod serve;
pub mod wkd;

/// A throwaway GnuPG home with keys made by the real `gpg`.
pub struct Gpg {
    home: tempfile::TempDir,
}

/// A key made by gpg.
#[derive(Debug, Clone)]
pub struct GpgKey {
    /// The User ID's address.
    pub address: String,
    /// Primary key fingerprint, uppercase hex.
    pub fingerprint: String,
    /// `gpg --armor --export`.
    pub public_armored: String,
}

impl Default for Gpg {
    fn default() -> Self {
        Self::new()
    }
}

impl Gpg {
    /// A fresh, empty GnuPG home.
    pub fn new() -> Self {
        let home = tempfile::Builder::new()
            .prefix("kst-gpg-")
            .tempdir()
            .expect("temp dir");
        Gpg { home }
    }

    /// The GNUPGHOME path.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Runs gpg with this home; panics with gpg's stderr on failure.
    pub fn run(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--yes", "--no-tty", "--quiet"])
            .args(args)
            .output()
            .expect("gpg must be installed (Debian package gnupg)");
        assert!(
            out.status.success(),
            "gpg {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Makes a key for `name <address>` with `algo` (`ed25519`, `rsa3072`, ...) and an
    /// encryption subkey, and returns its public part.
    pub fn generate(&self, name: &str, address: &str, algo: &str) -> GpgKey {
        let uid = format!("{name} <{address}>");
        self.run(&[
            "--passphrase",
            "",
            "--pinentry-mode",
            "loopback",
            "--quick-gen-key",
            &uid,
            algo,
            "sign,cert",
            "never",
        ]);
        let fingerprint = self.fingerprint(address);
        let sub = if algo == "ed25519" { "cv25519" } else { algo };
        self.run(&[
            "--passphrase",
            "",
            "--pinentry-mode",
            "loopback",
            "--quick-add-key",
            &fingerprint,
            sub,
            "encr",
            "never",
        ]);
        GpgKey {
            address: address.to_string(),
            public_armored: self.export(&fingerprint),
            fingerprint,
        }
    }

    /// Makes a primary key only (ed25519, sign and certify) for `uid` expiring after `expire`
    /// (`never`, `1d`, ...), with gpg's clock at `faked_time` (`--faked-system-time`, e.g.
    /// `20200101T000000!`) when given; returns its armored public part.
    pub fn generate_primary(&self, uid: &str, expire: &str, faked_time: Option<&str>) -> String {
        let mut args = Vec::new();
        if let Some(t) = faked_time {
            args.extend(["--faked-system-time", t]);
        }
        args.extend([
            "--passphrase",
            "",
            "--pinentry-mode",
            "loopback",
            "--quick-gen-key",
            uid,
            "ed25519",
            "sign,cert",
            expire,
        ]);
        self.run(&args);
        self.export(uid)
    }

    /// The fingerprint of the first key matching `who`.
    pub fn fingerprint(&self, who: &str) -> String {
        let out = self.run(&["--with-colons", "--list-keys", who]);
        String::from_utf8_lossy(&out)
            .lines()
            .find_map(|l| {
                l.strip_prefix("fpr:")
                    .map(|r| r.trim_matches(':').to_string())
            })
            .expect("gpg lists a fingerprint")
    }

    /// `gpg --armor --export WHO`.
    pub fn export(&self, who: &str) -> String {
        String::from_utf8(self.run(&["--armor", "--export", who])).expect("armor is ASCII")
    }

    /// `gpg --armor --export-secret-keys WHO`.
    pub fn export_secret(&self, who: &str) -> String {
        String::from_utf8(self.run(&[
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--armor",
            "--export-secret-keys",
            who,
        ]))
        .expect("armor is ASCII")
    }

    /// Imports armored key text; returns gpg's status output.
    pub fn import(&self, armored: &str) -> String {
        let mut child = Command::new("gpg")
            .env("GNUPGHOME", self.home.path())
            .args(["--batch", "--status-fd", "1", "--import"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gpg");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(armored.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Path of the `kst` binary of this build.
///
/// `cargo test --workspace` builds it before any test runs (kst-bin's own tests need it), so it
/// is used as it is: a nested `cargo build -p kst-bin` would resolve features for that package
/// alone and rebuild half the dependency graph in the shared target directory. Only when the
/// binary is missing or older than a source file of the workspace (e.g. `cargo test -p
/// kst-tests` after an edit) is it built here. `KST_TEST_BINARY` names another binary.
pub fn kst_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("KST_TEST_BINARY") {
            return PathBuf::from(bin);
        }
        // current_exe: target/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let bin = profile_dir.join("kst");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        if !is_fresh(&bin, &workspace) {
            build_kst(&workspace, &[]);
        }
        assert!(bin.exists(), "no kst binary at {}", bin.display());
        bin
    })
    .clone()
}

/// `cargo build -p kst-bin --bin kst` with `extra` arguments (e.g. `--features X`), in
/// `workspace`, without the variables Cargo set for the test process.
fn build_kst(workspace: &Path, extra: &[&str]) {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "-p", "kst-bin", "--bin", "kst"])
        .args(extra)
        .current_dir(workspace);
    // Cargo sets these for the test process. Build scripts (ring's) track some of them,
    // so passing them on would make this build and the next `cargo test` rebuild half
    // of the dependency tree each time.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&key)
        {
            cargo.env_remove(key);
        }
    }
    let status = cargo.status().expect("cargo build kst");
    assert!(status.success(), "building the kst binary failed");
}

/// Creates the Maildir `dir` (its `tmp`, `new` and `cur`).
pub fn make_maildir(dir: &Path) {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub)).expect("create the Maildir");
    }
}

/// Writes `path`, mode 0755: a sendmail-style script (`sendmail -oi -f FROM -- RCPT`) that
/// pipes the message to `kst deliver --config CONFIG` as the provider's MTA would; the login is
/// `KST_TEST_LOGIN`, else the sender.
pub fn write_sendmail_script(path: &Path, kst: &Path, config: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\nexec '{kst}' deliver --config '{cfg}' --sender \"$3\" --recipient \"$5\" --sasl-username \"${{KST_TEST_LOGIN:-$3}}\"\n",
            kst = kst.display(),
            cfg = config.display()
        ),
    )
    .expect("write the sendmail script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the sendmail script");
}

/// The binary exists and no `.rs`, `.toml` or `.sql` file of the workspace crates is newer.
fn is_fresh(bin: &Path, workspace: &Path) -> bool {
    fn newest(dir: &Path, newest_seen: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                newest(&p, newest_seen);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("rs" | "toml" | "sql")
            ) && let Ok(m) = meta.modified()
            {
                *newest_seen = (*newest_seen).max(m);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let mut seen = std::time::SystemTime::UNIX_EPOCH;
    for krate in ["kst-core", "kst-fs", "kst-postgres", "kst-redis", "kst-bin"] {
        newest(&workspace.join(krate).join("src"), &mut seen);
        newest(&workspace.join(krate).join("migrations"), &mut seen);
        if let Ok(m) =
            std::fs::metadata(workspace.join(krate).join("Cargo.toml")).and_then(|m| m.modified())
        {
            seen = seen.max(m);
        }
    }
    seen <= built
}

/// A `Received:` header as Postfix writes it for an authenticated submission.
pub fn received_authenticated(login: &str, by: &str) -> String {
    format!(
        "Received: from [10.0.0.1] (unknown [12.80.3.21])\r\n\t(Authenticated sender: {login})\r\n\tby {by} (Postfix) with ESMTPSA id 53F3A161B01\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100 (CET)\r\n"
    )
}

/// A `Received:` header for unauthenticated mail from the internet.
pub fn received_plain(helo: &str, by: &str) -> String {
    format!(
        "Received: from {helo} (unknown [203.0.113.7])\r\n\tby {by} (Postfix) with ESMTPS id 61A40160923\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:34:15 +0100 (CET)\r\n"
    )
}

/// A retrieval of `query` by `sender` from the internet, as the MX `by` received it from the
/// client at `ip` (the source kst counts).
pub fn retrieval_from(sender: &str, query: &str, ip: &str, by: &str) -> Vec<u8> {
    let policy = kst_core::AddressPolicy::default();
    let (sender, query) = (
        policy.normalize(sender).expect("sender"),
        policy.normalize(query).expect("query"),
    );
    let q = kst_core::client::build_retrieval(&sender, &query);
    let mut raw = format!(
        "Received: from mx.forger.example (unknown [{ip}])\r\n\tby {by} (Postfix) with ESMTPS id F1\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:34:15 +0100 (CET)\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(&q.message);
    raw
}

/// The key store of a [`TestKst`].
#[derive(Debug, Clone)]
pub enum Store {
    /// The filesystem store in the test's temporary directory.
    Fs,
    /// PostgreSQL at this URL (see [`TestDb`]).
    Postgres(String),
    /// Redis at `url` under `prefix` (see [`TestPrefix`]).
    Redis {
        /// Server URL.
        url: String,
        /// Key prefix.
        prefix: String,
    },
}

/// A KST on a temporary directory: a key store, spool mailer, config file.
pub struct TestKst {
    /// The temporary directory holding config, keys and outbox.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
}

impl TestKst {
    /// Serves `example.net` (and `example.org`), trusting `mail.example.net`; `extra` is TOML
    /// appended to the `[kst]` table.
    pub fn new(extra_kst: &str) -> Self {
        Self::with_store(extra_kst, &Store::Fs)
    }

    /// Like [`TestKst::new`] on the key store `store` (`Store::Fs` is `<dir>/keys`).
    pub fn with_store(extra_kst: &str, store: &Store) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kst-test-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("kst.toml");
        let store = match store {
            Store::Fs => format!(
                "backend = \"fs\"\npath = \"{}\"",
                dir.path().join("keys").display()
            ),
            Store::Postgres(url) => format!("backend = \"postgres\"\nurl = \"{url}\""),
            Store::Redis { url, prefix } => {
                format!("backend = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"")
            }
        };
        let text = format!(
            r#"[kst]
domains = ["example.net", "example.org"]
trusted_mta_hosts = ["mail.example.net"]
{extra_kst}

[store]
{store}

[mailer]
kind = "spool"
path = "{outbox}"

[log]
format = "json"
level = "info"
"#,
            outbox = dir.path().join("outbox").display(),
        );
        std::fs::write(&config, text).expect("write config");
        TestKst { dir, config }
    }

    /// The spool directory.
    pub fn outbox(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }

    /// Runs `kst ARGS --config FILE` with `stdin`; returns the process output.
    pub fn kst(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.kst_env(args, stdin, &[])
    }

    /// Like [`TestKst::kst`] with extra environment variables.
    pub fn kst_env(&self, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(kst_binary());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kst");
        let mut input = child.stdin.take().unwrap();
        // The child may exit before reading everything (oversize mail): ignore EPIPE.
        let _ = input.write_all(stdin);
        drop(input);
        child.wait_with_output().expect("kst runs")
    }

    /// `kst deliver` as Postfix's pipe runs it.
    pub fn deliver(&self, sender: &str, recipient: &str, message: &[u8]) -> Output {
        self.kst(
            &["deliver", "--sender", sender, "--recipient", recipient],
            message,
        )
    }

    /// `kst deliver` from `sender` to `keys@example.net` with the replies spooled to `spool`
    /// instead of the outbox (each run its own spool, as for a pool's parallel pipe(8) runs);
    /// returns the process output and the replies in `spool`.
    pub fn deliver_spooled(
        &self,
        sender: &str,
        message: &[u8],
        spool: &Path,
    ) -> (Output, Vec<Vec<u8>>) {
        let spool_env = (
            "KST_MAILER__PATH",
            spool.to_str().expect("UTF-8 spool path"),
        );
        let out = self.deliver_env(sender, message, &[spool_env]);
        (out, spool_replies(spool))
    }

    /// `kst deliver` from `sender` to `keys@example.net` with extra environment variables.
    pub fn deliver_env(&self, sender: &str, message: &[u8], env: &[(&str, &str)]) -> Output {
        let args = [
            "deliver",
            "--sender",
            sender,
            "--recipient",
            "keys@example.net",
        ];
        self.kst_env(&args, message, env)
    }

    /// `kst migrate` (the schema, before a pool starts, so that no instance waits on its
    /// lock; and the look-up index); asserts exit 0 and returns the output.
    pub fn migrate(&self) -> Output {
        let out = self.kst(&["migrate"], b"");
        assert_eq!(code(&out), 0, "kst migrate: {}", stderr(&out));
        out
    }

    /// Replies in the spool, oldest first, as raw bytes.
    pub fn replies(&self) -> Vec<Vec<u8>> {
        spool_replies(&self.outbox())
    }

    /// The newest reply; panics when there is none.
    pub fn last_reply(&self) -> Vec<u8> {
        self.replies().pop().expect("a reply in the spool")
    }

    /// Publishes `key` for its address the real way: an authenticated mail through `kst
    /// deliver` with the provider MTA's trusted Received header (`mail.example.net`); asserts
    /// exit 0 and that kst's confirmation says published.
    pub fn publish_by_mail(&self, key: &GpgKey) {
        use kst_core::client;
        let account = kst_core::AddressPolicy::default()
            .normalize(&key.address)
            .expect("a valid address");
        let req = client::build_publication(&account, &key.public_armored).expect("a request");
        let mut raw = received_authenticated(&key.address, "mail.example.net").into_bytes();
        raw.extend_from_slice(&req.message);
        let out = self.deliver(&key.address, "keys@example.net", &raw);
        assert_eq!(code(&out), 0, "kst deliver: {}", stderr(&out));
        assert!(
            matches!(
                client::verify_reply(&req.pending, &self.last_reply()).expect("a reply"),
                client::Verified::Published { .. }
            ),
            "kst's confirmation must say published"
        );
    }
}

/// The replies (`*.eml`) in a spool directory, oldest first, as raw bytes; none when it does
/// not exist.
pub fn spool_replies(spool: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = std::fs::read_dir(spool) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Runs `check` on a [`TestKst`] of each backend in turn, each removed before the next: the
/// filesystem store, PostgreSQL (a fresh database, migrated) and Redis (a fresh prefix).
pub fn on_every_backend(mut check: impl FnMut(&TestKst)) {
    check(&TestKst::with_store("", &Store::Fs));

    let db = TestDb::new();
    let pg = TestKst::with_store("", &db.store());
    pg.migrate();
    check(&pg);
    drop(pg);
    drop(db);

    let prefix = TestPrefix::new();
    check(&TestKst::with_store("", &prefix.store()));
}

/// The exit code of a finished process (-1 when killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Stderr as text, for assertion messages.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `cmd` with stdin closed and parses its stdout as JSON (a `kst ... --json` command);
/// panics with stdout and stderr when it is not JSON.
pub fn run_json(mut cmd: Command) -> (Output, serde_json::Value) {
    let out = cmd.stdin(Stdio::null()).output().expect("kst runs");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out, v)
}

/// The `export KEY=VALUE` lines a set-up script prints (`scripts/mailsystem.sh up`,
/// `scripts/providers.sh up`), as a map; double quotes around a value are dropped.
pub fn export_lines(stdout: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// Imports `armored` into a fresh keyring and returns the fingerprint gpg sees for `address`.
pub fn gpg_fingerprint_of(armored: &str, address: &str) -> String {
    let gpg = Gpg::new();
    let status = gpg.import(armored);
    assert!(status.contains("IMPORT_OK"), "gpg import: {status}");
    gpg.fingerprint(address)
}

/// True when the tests run as root (the loopback mail system needs it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `kst client --account ACCOUNT --json` for a mailbox of the loopback mail system of
/// `scripts/mailsystem.sh`: its test CA (`ca`, `KST_MAIL_CA`) trusted, every DNS query to its
/// dnsmasq (`resolver`, `KST_MAIL_RESOLVER`) without DNSSEC validation (dnsmasq serves
/// unsigned zones; the signed test DNS is scripts/testdns.sh), pending requests in `state`, no
/// client.toml, and the password (local part + `-pw`) in `KST_PASSWORD`. The caller appends
/// the rest.
pub fn mail_system_client(account: &str, ca: &Path, resolver: &str, state: &Path) -> Command {
    let local = account.split('@').next().unwrap_or(account);
    let mut cmd = Command::new(kst_binary());
    cmd.args(["client", "--account", account, "--json"])
        .arg("--ca-file")
        .arg(ca)
        .args(["--resolver", resolver, "--no-dnssec"])
        .arg("--state-file")
        .arg(state)
        .args(["--client-config", "/dev/null"])
        .env("KST_PASSWORD", format!("{local}-pw"))
        .env_remove("KST_CLIENT_CONFIG")
        .env_remove("RUST_LOG");
    cmd
}

/// A turn at the machine's one signed test DNS (`scripts/testdns.sh`): an exclusive `flock` of
/// `<KST_DNS_DIR>.turn` (`/tmp/kst-dns.turn` by default), held until it is dropped.
///
/// Every test that re-signs the test DNS with records of its own (`testdns.sh up` with
/// `KST_DNS_EXTRA_DIR`) and then queries them takes a turn first and keeps it to its end, so
/// two tests (threads of one test binary, or two test binaries run at once, as an engineer's
/// run beside CI's) never replace each other's records in the middle. The script's own lock
/// covers only one `up`. Blocks until the turn is free.
pub struct TestDnsTurn {
    _file: std::fs::File,
}

/// Takes a turn at the test DNS ([`TestDnsTurn`]), waiting for it.
pub fn test_dns_turn() -> TestDnsTurn {
    let dir = std::env::var("KST_DNS_DIR").unwrap_or_else(|_| "/tmp/kst-dns".into());
    let path = format!("{}.turn", dir.trim_end_matches('/'));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open the test DNS's turn file {path}: {e}"));
    file.lock()
        .unwrap_or_else(|e| panic!("flock the test DNS's turn file {path}: {e}"));
    TestDnsTurn { _file: file }
}
