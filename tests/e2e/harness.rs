//! Harness of the end-to-end tests: the real mail system of `scripts/mailsystem.sh` (Postfix,
//! Dovecot, dnsmasq on 127.0.0.1), kst configs for the three stores, `kst serve` instances, the
//! real `kst client` for the requests of honest users, and for the messages the tests craft
//! (forgeries, requests sent while kst is down, the pool's load) a submission client (mail-send)
//! and an IMAP client (async-imap) that reads and verifies the replies.
//!
//! The mail system has one kst config and one ingest mode at a time, so the tests that use it
//! take [`exclusive`] first. It runs in its own state directory and on its own ports
//! (`/tmp/kst-mail-e2e`, ports 6143-6993; every `KST_MAIL_*` variable of the script
//! overrides them) and is left running for the next run; `scripts/mailsystem.sh down` with the
//! same variables removes it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use kst_core::Address;
use kst_core::client::{Pending, ReplyError, Request, Verified};
use mail_send::SmtpClientBuilder;
use mail_send::smtp::message::Message;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

/// Upper bound for anything to arrive (a reply, a deferral). Not a speed assertion: mail takes
/// well under a second here; the bound only stops a broken run from hanging.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The state directory and ports of the e2e mail system, unless the environment says otherwise.
const DEFAULTS: [(&str, &str); 8] = [
    ("KST_MAIL_DIR", "/tmp/kst-mail-e2e"),
    ("KST_MAIL_SMTP_PORT", "6525"),
    ("KST_MAIL_SUBMISSION_PORT", "6587"),
    ("KST_MAIL_SUBMISSIONS_PORT", "6465"),
    ("KST_MAIL_IMAP_PORT", "6143"),
    ("KST_MAIL_IMAPS_PORT", "6993"),
    ("KST_MAIL_DNS_PORT", "6353"),
    ("KST_MAIL_LMTP_PORT", "6424"),
];

static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serializes the tests that use the mail system (one config, one mode at a time).
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    LOCK.lock().await
}

/// How Postfix hands `keys@` mail to kst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// pipe(8) runs `kst deliver` as user kst.
    Pipe,
    /// LMTP to one `kst serve`.
    Lmtp,
    /// LMTP to a list of three `kst serve` instances, tried in order.
    Pool,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Pipe => "pipe",
            Mode::Lmtp => "lmtp",
            Mode::Pool => "pool",
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A running mail system (see `docs/MAILSYSTEM.md`).
pub struct MailSystem {
    /// The state directory.
    pub dir: PathBuf,
    /// The port-25 stand-in (no AUTH).
    pub smtp_port: u16,
    /// Submission (STARTTLS + AUTH).
    pub submission_port: u16,
    /// Submissions (implicit TLS + AUTH).
    pub submissions_port: u16,
    /// IMAP (STARTTLS).
    pub imap_port: u16,
    /// IMAPS (implicit TLS).
    pub imaps_port: u16,
    /// The test CA (PEM), the only root the clients trust.
    pub ca: PathBuf,
    /// dnsmasq (`IP:PORT`): MX, SRV and host records of example.net and acme.net.
    pub resolver: String,
    /// Where Postfix dials `kst serve` in lmtp mode.
    pub lmtp_port: u16,
    /// The three instances of pool mode.
    pub pool_ports: Vec<u16>,
    /// The kst config pipe mode reads on every delivery.
    pub kst_config: PathBuf,
    /// Postfix's config directory (for postqueue -c).
    pub postfix_config: PathBuf,
    tls: TlsConnector,
}

fn env_or_default(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        DEFAULTS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    })
}

impl MailSystem {
    /// `scripts/mailsystem.sh up --mode MODE` (starts what does not run, switches the mode), with
    /// the pipe transport running this build's `kst`.
    pub fn up(mode: Mode) -> MailSystem {
        assert!(
            kst_tests::is_root(),
            "the end-to-end tests start Postfix, Dovecot and dnsmasq: run them as root (scripts/test.sh does)"
        );
        let mut cmd = Command::new(repo_root().join("scripts/mailsystem.sh"));
        cmd.args(["up", "--mode", mode.as_str()])
            .env("KST_BIN", kst_tests::kst_binary())
            .env_remove("KST_CONFIG")
            .env_remove("KST_MAIL_MODE")
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, _) in DEFAULTS {
            cmd.env(k, env_or_default(k));
        }
        let out = cmd.output().expect("run scripts/mailsystem.sh");
        assert!(
            out.status.success(),
            "scripts/mailsystem.sh up --mode {} failed:\n{}",
            mode.as_str(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = kst_tests::export_lines(&out.stdout);
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("mailsystem.sh printed no {k}"))
                .clone()
        };
        let port = |k: &str| get(k).parse::<u16>().expect("a port number");
        let ms = MailSystem {
            dir: PathBuf::from(get("KST_MAIL_DIR")),
            smtp_port: port("KST_MAIL_SMTP_PORT"),
            submission_port: port("KST_MAIL_SUBMISSION_PORT"),
            submissions_port: port("KST_MAIL_SUBMISSIONS_PORT"),
            imap_port: port("KST_MAIL_IMAP_PORT"),
            imaps_port: port("KST_MAIL_IMAPS_PORT"),
            ca: PathBuf::from(get("KST_MAIL_CA")),
            resolver: get("KST_MAIL_RESOLVER"),
            lmtp_port: port("KST_MAIL_LMTP_PORT"),
            pool_ports: get("KST_MAIL_LMTP_POOL_PORTS")
                .split_whitespace()
                .map(|p| p.parse().expect("a port number"))
                .collect(),
            kst_config: PathBuf::from(get("KST_MAIL_KST_CONFIG")),
            postfix_config: PathBuf::from(get("KST_MAIL_POSTFIX_CONFIG")),
            tls: tls_connector(Path::new(&get("KST_MAIL_CA"))),
        };
        // Mail an earlier (failed) run left queued would reach this test's kst.
        let st = Command::new("postsuper")
            .arg("-c")
            .arg(&ms.postfix_config)
            .args(["-d", "ALL"])
            .stderr(Stdio::null())
            .status()
            .expect("run postsuper");
        assert!(st.success(), "postsuper -d ALL failed");
        ms.install_dkim_key();
        ms
    }

    /// Where kst's DKIM signing key lives: the test key of tests/fixtures/dkim, whose public
    /// half the mail system's dnsmasq publishes as `kst-ed25519._domainkey` of both domains.
    pub fn dkim_key(&self) -> PathBuf {
        self.dir.join("kst").join("dkim.ed25519.pem")
    }

    /// Installs the DKIM test key for user kst, mode 0600 (kst refuses a wider one).
    fn install_dkim_key(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        let key = std::fs::read(repo_root().join("tests/fixtures/dkim/test.ed25519.pem"))
            .expect("the DKIM test key");
        let path = self.dkim_key();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, key).expect("write the DKIM key");
        let (uid, gid) = kst_ids();
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).expect("chown the DKIM key");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the DKIM key");
        std::fs::rename(&tmp, &path).expect("install the DKIM key");
    }

    /// A kst config for this mail system: both domains, trusting Postfix's `mail.example.net`,
    /// replies DKIM-signed with the test key ([`MailSystem::dkim_key`]) and sent through the
    /// port-25 stand-in, `store` as the `[store]` table, LMTP on
    /// `lmtp_port` admitting 127.0.0.1 only, JSON logs.
    pub fn kst_toml(&self, store: &str, lmtp_port: u16) -> String {
        self.kst_toml_for(
            &["example.net", "acme.net"],
            store,
            self.smtp_port,
            lmtp_port,
            "kst",
        )
    }

    /// [`MailSystem::kst_toml`] serving `domains`, sending replies to 127.0.0.1:`mailer_port`
    /// and signing them under the DKIM selector prefix `selector`.
    pub fn kst_toml_for(
        &self,
        domains: &[&str],
        store: &str,
        mailer_port: u16,
        lmtp_port: u16,
        selector: &str,
    ) -> String {
        format!(
            r#"# written by the kst e2e tests
[kst]
domains = {domains:?}
trusted_mta_hosts = ["mail.example.net"]

[store]
{store}

[mailer]
kind = "smtp"
host = "127.0.0.1"
port = {mailer_port}
tls = "none"
timeout_secs = 30

[lmtp]
listen = "127.0.0.1:{lmtp_port}"
allow = ["127.0.0.1/32"]
shutdown_grace_secs = 5

[http]
listen = ""

[dkim]
selector = "{selector}"
ed25519_key = "{dkim_key}"

[log]
format = "json"
level = "info"
"#,
            dkim_key = self.dkim_key().display(),
        )
    }

    /// Installs `toml` as the config pipe mode reads (readable by user kst).
    pub fn install_config(&self, toml: &str) {
        write_for_kst(&self.kst_config, toml, 0o640);
    }

    /// Writes `toml` to a config file of its own under the state directory, for `kst serve`.
    pub fn config_file(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.dir.join("kst").join(format!("{name}.toml"));
        write_for_kst(&path, toml, 0o640);
        path
    }

    /// Runs the real `kst client --json` as `account` (password local part + `-pw`) with the
    /// test CA, DNS through dnsmasq, pending requests in `state` and `--timeout` [`PATIENCE`],
    /// then `args`; returns its output and the JSON it printed. It submits, fetches the reply
    /// over IMAP and verifies it itself.
    pub fn client(&self, account: &str, state: &Path, args: &[&str]) -> (Output, Value) {
        let mut cmd = kst_tests::mail_system_client(account, &self.ca, &self.resolver, state);
        cmd.args(["--timeout", &PATIENCE.as_secs().to_string()])
            .args(args);
        kst_tests::run_json(cmd)
    }

    /// Submits `message` through submission (STARTTLS, AUTH as `login`, password local part +
    /// `-pw`), envelope from `envelope_from` to `rcpt`.
    pub async fn submit(
        &self,
        login: &str,
        envelope_from: &str,
        rcpt: &str,
        message: &[u8],
    ) -> Result<(), mail_send::Error> {
        let password = format!("{}-pw", login.split('@').next().unwrap_or(login));
        // The server certificate names 127.0.0.1 too (and the test CA is the only root).
        let mut smtp = SmtpClientBuilder::new_with_tls_connector(
            "127.0.0.1".to_string(),
            self.submission_port,
            self.tls.clone(),
        )
        .implicit_tls(false)
        .helo_host("client.example.net")
        .credentials((login.to_string(), password))
        .timeout(Duration::from_secs(30))
        .connect()
        .await?;
        smtp.send(Message::new(envelope_from, [rcpt], message))
            .await?;
        let _ = smtp.quit().await;
        Ok(())
    }

    /// Sends a request of `login` through submission (its envelope sender is `login`).
    pub async fn submit_request(&self, login: &str, request: &Request) {
        let to = request.pending.service.as_str().to_string();
        self.submit(login, login, &to, &request.message)
            .await
            .unwrap_or_else(|e| panic!("submission by {login} failed: {e}"));
    }

    /// Sends `message` to the port-25 stand-in without AUTH, saying `HELO helo`.
    pub async fn send_direct(
        &self,
        helo: &str,
        envelope_from: &str,
        rcpt: &str,
        message: &[u8],
    ) -> Result<(), mail_send::Error> {
        let mut smtp = SmtpClientBuilder::new_with_tls_connector(
            "127.0.0.1",
            self.smtp_port,
            self.tls.clone(),
        )
        .implicit_tls(false)
        .helo_host(helo)
        .timeout(Duration::from_secs(30))
        .connect_plain()
        .await?;
        smtp.send(Message::new(envelope_from, [rcpt], message))
            .await?;
        let _ = smtp.quit().await;
        Ok(())
    }

    /// The raw messages in `user`'s INBOX whose In-Reply-To holds `message_id`, over IMAP
    /// (STARTTLS, login = address, password = local part + `-pw`).
    pub async fn imap_replies(&self, user: &str, message_id: &str) -> Vec<Vec<u8>> {
        let password = format!("{}-pw", user.split('@').next().unwrap_or(user));
        let tcp = TcpStream::connect(("127.0.0.1", self.imap_port))
            .await
            .expect("connect to Dovecot IMAP");
        let mut plain = async_imap::Client::new(tcp);
        plain
            .read_response()
            .await
            .expect("IMAP greeting")
            .expect("IMAP greeting");
        plain
            .run_command_and_check_ok("STARTTLS", None)
            .await
            .expect("IMAP STARTTLS");
        let tcp = plain.into_inner();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("a name");
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .expect("IMAP TLS handshake with the test CA");
        let client = async_imap::Client::new(tls);
        let mut session = client
            .login(user, &password)
            .await
            .map_err(|(e, _)| e)
            .expect("IMAP LOGIN");
        session.select("INBOX").await.expect("IMAP SELECT INBOX");
        let uids = session
            .uid_search(format!("HEADER In-Reply-To \"{message_id}\""))
            .await
            .expect("IMAP UID SEARCH");
        let mut out = Vec::new();
        if !uids.is_empty() {
            let mut list: Vec<u32> = uids.into_iter().collect();
            list.sort_unstable();
            let set = list
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let fetches: Vec<_> = session
                .uid_fetch(set, "BODY.PEEK[]")
                .await
                .expect("IMAP UID FETCH")
                .try_collect()
                .await
                .expect("IMAP FETCH responses");
            out.extend(fetches.iter().filter_map(|f| f.body().map(<[u8]>::to_vec)));
        }
        let _ = session.logout().await;
        out
    }

    /// Waits until `user`'s mailbox holds the reply to `pending` and returns it verified.
    pub async fn reply(&self, user: &str, pending: &Pending) -> Result<Verified, ReplyError> {
        self.replies(user, pending, 1)
            .await
            .into_iter()
            .next()
            .expect("one reply")
    }

    /// Waits until `user`'s mailbox holds at least `n` replies to `pending`; verifies each.
    pub async fn replies(
        &self,
        user: &str,
        pending: &Pending,
        n: usize,
    ) -> Vec<Result<Verified, ReplyError>> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let raw = self.imap_replies(user, &pending.message_id).await;
            if raw.len() >= n {
                return raw
                    .iter()
                    .map(|r| kst_core::client::verify_reply(pending, r))
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "no reply to {} in {user}'s mailbox after {PATIENCE:?}; see {}/postfix.log and the kst logs\nqueue: {:?}",
                pending.message_id,
                self.dir.display(),
                self.queue()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `postqueue -j`: one JSON object per queued message.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(&self.postfix_config)
            .arg("-j")
            .output()
            .expect("run postqueue");
        assert!(out.status.success(), "postqueue -j failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `postqueue -f`: retry every deferred message now.
    pub fn flush(&self) {
        let st = Command::new("postqueue")
            .arg("-c")
            .arg(&self.postfix_config)
            .arg("-f")
            .status()
            .expect("run postqueue -f");
        assert!(st.success(), "postqueue -f failed");
    }

    /// Waits until a message from `sender` to `rcpt` that is not in `before` (queue ids) sits
    /// in the deferred queue with a reason; returns (queue id, delay reason).
    pub async fn deferred(&self, sender: &str, rcpt: &str, before: &[String]) -> (String, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            for m in self.queue() {
                let id = m["queue_id"].as_str().unwrap_or_default().to_string();
                if m["queue_name"] != "deferred" || m["sender"] != sender || before.contains(&id) {
                    continue;
                }
                if let Some(r) = m["recipients"].as_array().and_then(|rs| {
                    rs.iter()
                        .find(|r| r["address"] == rcpt && r["delay_reason"].is_string())
                }) {
                    return (
                        id,
                        r["delay_reason"].as_str().unwrap_or_default().to_string(),
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "Postfix did not defer the message from {sender} to {rcpt} within {PATIENCE:?}: {:?}",
                self.queue()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Queue ids of every message queued now.
    pub fn queue_ids(&self) -> Vec<String> {
        self.queue()
            .iter()
            .filter_map(|m| m["queue_id"].as_str().map(str::to_string))
            .collect()
    }

    /// True while the queue holds `id`.
    pub fn queued(&self, id: &str) -> bool {
        self.queue_ids().iter().any(|q| q == id)
    }

    /// The TLS connector that trusts the test CA only.
    pub fn tls(&self) -> TlsConnector {
        self.tls.clone()
    }
}

/// A TLS client config trusting only the test CA (no system roots).
fn tls_connector(ca: &Path) -> TlsConnector {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("read the test CA") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("the test CA is a usable root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// uid and gid of the system user `kst` (made by mailsystem.sh).
fn kst_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "kst"])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .expect("user kst exists (scripts/mailsystem.sh up creates it)")
    };
    (id("-u"), id("-g"))
}

/// Writes `text` to `path`, owned by root, group kst, with `mode`.
fn write_for_kst(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).expect("write a kst config");
    f.write_all(text.as_bytes()).expect("write a kst config");
    drop(f);
    std::os::unix::fs::chown(&tmp, Some(0), Some(kst_ids().1)).expect("chown config");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod config");
    std::fs::rename(&tmp, path).expect("install config");
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// Which key store a scenario uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A directory owned by user kst.
    Fs,
    /// A fresh PostgreSQL database.
    Postgres,
    /// A fresh Redis key prefix.
    Redis,
}

/// A store of its own for one test; removed on drop.
pub struct Store {
    /// The kind.
    pub kind: StoreKind,
    /// The `[store]` table body.
    pub toml: String,
    fs_dir: Option<PathBuf>,
    pg_db: Option<String>,
    redis_prefix: Option<String>,
}

fn postgres_url() -> String {
    std::env::var("KST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

fn redis_url() -> String {
    std::env::var("KST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .arg(postgres_url())
        .args(["-Atqc", sql])
        .output()
        .expect("psql must be installed (scripts/services.sh installs PostgreSQL)");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Store {
    /// Makes a fresh store of `kind` for `ms`.
    pub fn new(kind: StoreKind, ms: &MailSystem) -> Store {
        match kind {
            StoreKind::Fs => {
                let dir = ms.dir.join("kst").join(unique("keys-"));
                std::fs::create_dir_all(&dir).expect("store dir");
                let (uid, gid) = kst_ids();
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown store");
                Store {
                    kind,
                    toml: format!("backend = \"fs\"\npath = \"{}\"", dir.display()),
                    fs_dir: Some(dir),
                    pg_db: None,
                    redis_prefix: None,
                }
            }
            StoreKind::Postgres => {
                let db = unique("kst_e2e_");
                psql(&format!("CREATE DATABASE {db}"));
                let base = postgres_url();
                let url = match base.rsplit_once('/') {
                    Some((server, _)) => format!("{server}/{db}"),
                    None => panic!("KST_TEST_POSTGRES_URL has no database part: {base}"),
                };
                Store {
                    kind,
                    toml: format!("backend = \"postgres\"\nurl = \"{url}\""),
                    fs_dir: None,
                    pg_db: Some(db),
                    redis_prefix: None,
                }
            }
            StoreKind::Redis => {
                let prefix = unique("kst-e2e-");
                Store {
                    kind,
                    toml: format!(
                        "backend = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"",
                        redis_url()
                    ),
                    fs_dir: None,
                    pg_db: None,
                    redis_prefix: Some(prefix),
                }
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(d) = &self.fs_dir {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(db) = &self.pg_db {
            let _ = Command::new("psql")
                .arg(postgres_url())
                .args([
                    "-Atqc",
                    &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
                ])
                .output();
        }
        if let Some(p) = &self.redis_prefix {
            let url = redis_url();
            if let Ok(out) = Command::new("redis-cli")
                .args(["-u", &url, "--scan", "--pattern", &format!("{p}*")])
                .output()
            {
                let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect();
                for chunk in keys.chunks(100) {
                    let _ = Command::new("redis-cli")
                        .args(["-u", &url, "DEL"])
                        .args(chunk)
                        .output();
                }
            }
        }
    }
}

/// A `kst serve` child process; killed on drop.
pub struct Serve {
    child: Option<Child>,
    /// Its stderr (JSON log lines).
    pub log: PathBuf,
}

impl Serve {
    /// Starts `kst serve --config CONFIG` and waits until its LMTP port greets.
    pub async fn start(config: &Path, port: u16) -> Serve {
        let log = config.with_extension(format!("{}.log", rand::random::<u32>()));
        let err = std::fs::File::create(&log).expect("serve log");
        let child = Command::new(kst_tests::kst_binary())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn kst serve");
        let mut s = Serve {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 3];
                if c.read_exact(&mut buf).await.is_ok() && &buf == b"220" {
                    break;
                }
            }
            if let Some(Some(st)) = s.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "kst serve exited ({st}) at start:\n{}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "kst serve did not greet on 127.0.0.1:{port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    }

    /// SIGKILL: the instance dies like a crashed host (nothing in flight is acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many messages it handled (its "message handled" log lines).
    pub fn handled(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("message handled"))
            .count()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `kst keys get ADDRESS --json --config CONFIG`: the stored fingerprint, or None (exit 1).
pub fn stored_fingerprint(config: &Path, address: &str) -> Option<String> {
    let out = Command::new(kst_tests::kst_binary())
        .args(["keys", "get", address, "--json", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kst keys get");
    match out.status.code() {
        Some(0) => {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("kst keys get --json prints JSON");
            Some(
                v["fingerprint"]
                    .as_str()
                    .expect("a fingerprint")
                    .to_string(),
            )
        }
        Some(1) => None,
        _ => panic!(
            "kst keys get {address} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `kst keys history ADDRESS --json`: fingerprints of every version, oldest first.
pub fn stored_history(config: &Path, address: &str) -> Vec<String> {
    let out = Command::new(kst_tests::kst_binary())
        .args(["keys", "history", address, "--json", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kst keys history");
    if out.status.code() == Some(1) {
        return Vec::new();
    }
    assert!(
        out.status.success(),
        "kst keys history: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// An address (normalized).
pub fn addr(s: &str) -> Address {
    kst_core::AddressPolicy::default()
        .normalize(s)
        .expect("a test address")
}

/// Sends a message straight to an LMTP port from `local_ip` (bound as the client address); an
/// error carries the server's refusal.
pub async fn lmtp_direct(
    tls: TlsConnector,
    local_ip: Ipv4Addr,
    port: u16,
    from: &str,
    rcpt: &str,
    message: &[u8],
) -> Result<(), mail_send::Error> {
    let mut c = SmtpClientBuilder::new_with_tls_connector("127.0.0.1", port, tls)
        .lmtp(true)
        .local_ip(IpAddr::V4(local_ip))
        .helo_host("mail.example.net")
        .timeout(Duration::from_secs(30))
        .connect_plain()
        .await?;
    c.send(Message::new(from, [rcpt], message)).await?;
    let _ = c.quit().await;
    Ok(())
}
