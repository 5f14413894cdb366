//! `kst serve` over real sockets: LMTP conversations against a real `Kst` (gpg-made keys,
//! filesystem store, spool mailer), timeouts, refused peers, a Redis store whose server is killed
//! or frozen, graceful shutdown, and the HTTP endpoint.

use kst_bin::bench::lmtp::dot_stuff as data;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kst_bin::server::lmtp::Listener;
use kst_bin::server::lmtp::server::{ConnectionContext, ShutdownSignal};
use kst_bin::server::mailer::SpoolMailer;
use kst_bin::shared::config::{HttpConfig, LmtpConfig};
use kst_core::client::{self, Pending, Verified};
use kst_core::{Address, AddressPolicy, KeyStore, Kst, Mailer, Policy};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A throwaway `redis-server` of the test's own on a free port (the shared one on 6379 is never
/// touched): killed, frozen and restarted under a live `kst` to play a store outage.
mod redis_server {
    use std::sync::Arc;
    use std::time::Duration;

    use kst_core::KeyStore;
    use kst_redis::RedisStore;
    use tokio::process::{Child, Command};

    pub struct RedisServer {
        dir: tempfile::TempDir,
        port: u16,
        child: Option<Child>,
    }

    impl RedisServer {
        pub async fn start_new() -> RedisServer {
            let dir = tempfile::Builder::new()
                .prefix("kst-lmtp-redis-")
                .tempdir()
                .expect("temp dir");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut s = RedisServer {
                dir,
                port,
                child: None,
            };
            s.start().await;
            s
        }

        /// A store on this server (prefix `kst:`); it reconnects by itself after an outage.
        pub fn store(&self) -> Arc<dyn KeyStore> {
            Arc::new(
                RedisStore::builder(format!("redis://127.0.0.1:{}", self.port))
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(Duration::from_secs(3))
                    .connect_lazy()
                    .expect("redis store"),
            )
        }

        /// Starts (or restarts on the same port and data directory) the server.
        pub async fn start(&mut self) {
            let dir = self.dir.path().to_str().expect("UTF-8 temp path");
            let child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .args(["--dir", dir, "--logfile", "redis.log"])
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server (run scripts/services.sh to install it)");
            self.child = Some(child);
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the throwaway redis-server did not come up");
        }

        /// SIGKILL: the store is gone.
        pub async fn kill(&mut self) {
            let mut child = self.child.take().expect("running");
            child.kill().await.expect("kill redis-server");
        }

        /// `kill -STOP` (the store stops answering) or `kill -CONT`.
        pub fn signal(&self, sig: &str) {
            let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
            let ok = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .expect("kill")
                .success();
            assert!(ok, "kill {sig} {pid}");
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            // A frozen server must be thawed to die cleanly; kill_on_drop sends SIGKILL.
            if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
        }
    }
}

const ALICE: &str = include_str!("../../kst-core/testdata/alice.pub.asc");

/// How long a test waits for any one reply before it fails (a hang guard, not a speed check).
const PATIENCE: Duration = Duration::from_secs(30);

fn received(login: &str) -> String {
    format!(
        "Received: from [10.0.0.1] (unknown [12.80.3.21])\r\n\t(Authenticated sender: {login})\r\n\tby mail.example.net (Postfix) with ESMTPSA id 1\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100\r\n"
    )
}

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).expect("test address")
}

/// A publication of alice's key, as the provider's MTA hands it on.
fn publication() -> (Vec<u8>, Pending) {
    let req = client::build_publication(&addr("alice@example.net"), ALICE).expect("alice's key");
    let mut raw = received("alice@example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    (raw, req.pending)
}

/// A retrieval of alice's key by bob.
fn retrieval() -> (Vec<u8>, Pending) {
    let req = client::build_retrieval(&addr("bob@example.org"), &addr("alice@example.net"));
    (req.message, req.pending)
}

/// A running `kst serve` LMTP listener on 127.0.0.1:0 with a spool mailer in a temp dir.
struct Server {
    addr: SocketAddr,
    spool: PathBuf,
    store: Arc<dyn KeyStore>,
    kst: Kst,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn lmtp_config() -> LmtpConfig {
    LmtpConfig {
        listen: "127.0.0.1:0".into(),
        ..LmtpConfig::default()
    }
}

/// A KST on the filesystem store in `dir/store`, spooling replies to `dir/spool`.
async fn kst_in(dir: &Path) -> (Kst, Arc<dyn KeyStore>, PathBuf) {
    let store: Arc<dyn KeyStore> = Arc::new(
        kst_fs::FsStore::open(dir.join("store"))
            .await
            .expect("filesystem store"),
    );
    kst_with(dir, store)
}

/// A KST on `store`, spooling replies to `dir/spool`.
fn kst_with(dir: &Path, store: Arc<dyn KeyStore>) -> (Kst, Arc<dyn KeyStore>, PathBuf) {
    let spool = dir.join("spool");
    let mailer: Arc<dyn Mailer> = Arc::new(SpoolMailer::new(&spool));
    let kst = Kst::new(
        Policy::new(&["example.net", "example.org"], &["mail.example.net"]),
        Arc::clone(&store),
        mailer,
    );
    (kst, store, spool)
}

/// Logs go to the test's captured output (shown when a test fails).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("kst_bin=debug")
        .try_init();
}

async fn start(cfg: LmtpConfig) -> Server {
    start_on(cfg, None).await
}

/// Like [`start`], with `limits.max_message_bytes` set to `max` (it bounds LMTP mail too).
async fn start_limited(cfg: LmtpConfig, max: usize) -> Server {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let (kst, store, spool) = kst_in(dir.path()).await;
    let mut policy = kst.policy().clone();
    policy.max_message_bytes = max;
    let kst = Kst::new(policy, Arc::clone(&store), kst.mailer().clone());
    serve_kst(cfg, dir, kst, store, spool).await
}

/// Like [`start`], on `store` instead of a filesystem store.
async fn start_on(cfg: LmtpConfig, store: Option<Arc<dyn KeyStore>>) -> Server {
    logs();
    kst_bin::shared::metrics::init();
    let dir = tempfile::tempdir().expect("temp dir");
    let (kst, store, spool) = match store {
        Some(store) => kst_with(dir.path(), store),
        None => kst_in(dir.path()).await,
    };
    serve_kst(cfg, dir, kst, store, spool).await
}

/// Runs the LMTP server for `kst` on `cfg.listen`.
async fn serve_kst(
    cfg: LmtpConfig,
    dir: tempfile::TempDir,
    kst: Kst,
    store: Arc<dyn KeyStore>,
    spool: PathBuf,
) -> Server {
    let listener = Listener::bind(&cfg.listen).await.expect("bind");
    let addr = listener.local_addr().expect("a TCP address");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(kst_bin::server::lmtp::run(
        listener,
        kst.clone(),
        cfg,
        async {
            let _ = rx.await;
        },
    ));
    Server {
        addr,
        spool,
        store,
        kst,
        shutdown: Some(tx),
        task: Some(task),
        _dir: dir,
    }
}

impl Server {
    async fn connect(&self) -> Client<TcpStream> {
        Client::new(TcpStream::connect(self.addr).await.expect("connect"))
    }

    /// The replies in the spool, oldest first.
    fn spooled(&self) -> Vec<Vec<u8>> {
        let Ok(entries) = std::fs::read_dir(&self.spool) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read(p).expect("spool file"))
            .collect()
    }

    /// Triggers shutdown and waits for `run` to return (all connections finished).
    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("the server stops")
                .expect("server task")
                .expect("run returns Ok");
        }
    }
}

/// A minimal LMTP client.
struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S) -> Self {
        Client {
            io: BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.io
            .get_mut()
            .write_all(bytes.as_ref())
            .await
            .expect("write");
    }

    /// One whole reply (continuation lines joined with '\n'); "" at EOF.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(PATIENCE, self.io.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            let line = line.trim_end();
            if !all.is_empty() {
                all.push('\n');
            }
            all.push_str(line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    async fn greeting_and_lhlo(&mut self) {
        self.expect("220 ").await;
        self.send("LHLO mail.example.net\r\n").await;
        let caps = self.expect("250-").await;
        assert!(caps.contains("PIPELINING") && caps.contains("ENHANCEDSTATUSCODES"));
    }

    /// MAIL, RCPTs (each must be accepted), DATA, message; returns the per-recipient replies.
    async fn transaction(&mut self, sender: &str, rcpts: &[&str], raw: &[u8]) -> Vec<String> {
        self.send(format!("MAIL FROM:<{sender}>\r\n")).await;
        self.expect("250 2.1.0").await;
        for r in rcpts {
            self.send(format!("RCPT TO:<{r}>\r\n")).await;
            self.expect("250 2.1.5").await;
        }
        self.send("DATA\r\n").await;
        self.expect("354 ").await;
        self.send(data(raw)).await;
        let mut replies = Vec::new();
        for _ in rcpts {
            replies.push(self.reply().await);
        }
        replies
    }

    async fn closed(&mut self) -> bool {
        self.reply().await.is_empty()
    }
}

fn verify(pending: &Pending, spooled: &[u8]) -> Verified {
    client::verify_reply(pending, spooled).expect("the reply verifies")
}

#[tokio::test]
async fn two_recipients_one_reply_each_then_retrieval() {
    let mut server = start(lmtp_config()).await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;

    let (raw, pending) = publication();
    let replies = c
        .transaction(
            "alice@example.net",
            &["keys@example.net", "keys@example.org"],
            &raw,
        )
        .await;
    assert_eq!(replies.len(), 2);
    for r in &replies {
        assert!(r.starts_with("250 2.0.0 <"), "{r}");
        assert!(r.ends_with("decided: published"), "{r}");
    }
    let stored = server
        .store
        .get(&addr("alice@example.net"))
        .await
        .expect("store")
        .expect("alice's key is stored");
    assert_eq!(
        stored.version, 1,
        "the second recipient's delivery is idempotent"
    );
    let spooled = server.spooled();
    assert_eq!(spooled.len(), 2, "one confirmation per recipient");
    for s in &spooled {
        assert!(matches!(verify(&pending, s), Verified::Published { .. }));
    }

    // Same connection, next message: bob retrieves alice's key.
    let (raw, pending) = retrieval();
    let replies = c
        .transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].ends_with("decided: found"), "{replies:?}");
    let spooled = server.spooled();
    assert_eq!(spooled.len(), 3);
    match verify(&pending, &spooled[2]) {
        Verified::Found { fingerprint, .. } => assert_eq!(fingerprint, stored.fingerprint),
        other => panic!("expected the key, got {other:?}"),
    }
    c.send("QUIT\r\n").await;
    c.expect("221 2.0.0").await;
    assert!(c.closed().await);
    server.stop().await;
}

/// Red team round 8: an MTA delivers a message once per recipient as the sender spelt it, and
/// `keys@example.net`, `KEYS@example.net` and `Keys@EXAMPLE.NET` are three recipients to
/// Postfix (up to 1,000 per message, in LMTP transactions of 50) but one service address to
/// kst, which parsed and decided the message (and replied) once per spelling: a 2 MiB message
/// with 1,000 spellings cost 1,000 parses. Now each (sender, service address, message) is
/// decided once; the other spellings, and the MTA's next transactions with the same message,
/// get the same answer.
#[tokio::test]
async fn one_message_is_decided_once_per_service_address_however_it_is_spelt() {
    let mut server = start(lmtp_config()).await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    let (raw, pending) = retrieval();
    let spellings = [
        "keys@example.net",
        "KEYS@example.net",
        "Keys@EXAMPLE.NET",
        "keys@example.org",
    ];
    let replies = c.transaction("bob@example.org", &spellings, &raw).await;
    assert_eq!(replies.len(), 4);
    for r in &replies {
        assert!(r.starts_with("250 2.0.0 <"), "{r}");
        assert!(r.ends_with("decided: not-found"), "{r}");
    }
    let spooled = server.spooled();
    assert_eq!(
        spooled.len(),
        2,
        "one reply per service address, not per spelling"
    );
    for s in &spooled {
        assert!(matches!(verify(&pending, s), Verified::NotFound { .. }));
    }

    // The MTA's next transaction with the same message (more spellings): decided already.
    let replies = c
        .transaction(
            "bob@example.org",
            &["kEYS@example.NET", "keYS@example.net"],
            &raw,
        )
        .await;
    for r in &replies {
        assert!(r.ends_with("decided: not-found"), "{r}");
    }
    assert_eq!(server.spooled().len(), 2);

    // The same bytes from another envelope sender are another request.
    let replies = c
        .transaction("carol@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].ends_with("decided: not-found"), "{replies:?}");
    assert_eq!(server.spooled().len(), 3);
    c.send("QUIT\r\n").await;
    c.expect("221 2.0.0").await;
    server.stop().await;
}

#[tokio::test]
async fn pipelined_commands_in_one_write() {
    let mut server = start(lmtp_config()).await;
    let mut c = server.connect().await;
    c.expect("220 ").await;
    c.send(
        "LHLO mail.example.net\r\nMAIL FROM:<bob@example.org>\r\nRCPT TO:<keys@example.net>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<keys@example.org>\r\nDATA\r\n",
    )
    .await;
    c.expect("250-").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("550 5.1.1 <bob@example.net>").await;
    c.expect("250 2.1.5").await;
    c.expect("354 ").await;
    // The message, the next transaction and QUIT in one more write.
    let (raw, _) = retrieval();
    let mut rest = data(&raw);
    rest.extend_from_slice(b"RSET\r\nNOOP\r\nQUIT\r\n");
    c.send(rest).await;
    // One reply per accepted recipient (two), none for the refused one.
    assert!(c.expect("250 2.0.0").await.ends_with("decided: not-found"));
    assert!(c.expect("250 2.0.0").await.ends_with("decided: not-found"));
    c.expect("250 2.0.0 OK").await;
    c.expect("250 2.0.0 OK").await;
    c.expect("221 ").await;
    assert!(c.closed().await);
    assert_eq!(server.spooled().len(), 2);
    server.stop().await;
}

/// Issue 13 item 2: no `SIZE` in LHLO; oversize mail (even with a declared `SIZE=`) and mail for
/// `keys+extension@` are read, dropped and acknowledged with a 250 per recipient, never a 5xx
/// that the MTA would bounce to a possibly forged sender.
#[tokio::test]
async fn oversize_and_extension_mail_is_dropped_with_250_never_bounced() {
    let mut server = start_limited(lmtp_config(), 4096).await;
    let mut c = server.connect().await;
    c.expect("220 ").await;
    c.send("LHLO mail.example.net\r\n").await;
    let lhlo = c.expect("250-").await;
    assert!(!lhlo.contains("SIZE"), "no SIZE announced: {lhlo}");
    c.send("MAIL FROM:<bob@example.org> SIZE=5000\r\nRSET\r\n")
        .await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.0.0").await;

    let (raw, _) = retrieval();
    // 400 KB against a 4 KB limit: read to its end, never kept.
    let mut big = raw.clone();
    big.extend_from_slice(format!("{}\r\n", "x".repeat(70)).repeat(5700).as_bytes());
    let replies = c
        .transaction(
            "victim@acme.example",
            &["keys@example.net", "keys@example.org"],
            &big,
        )
        .await;
    assert_eq!(replies.len(), 2);
    for r in &replies {
        assert!(r.ends_with("decided: ignored (too-large)"), "{r}");
    }
    // keys+anything@ of a served domain: accepted at RCPT, dropped.
    let replies = c
        .transaction(
            "victim@acme.example",
            &["keys+anything@example.net", "Keys-x@example.org"],
            &raw,
        )
        .await;
    for r in &replies {
        assert!(r.ends_with("decided: ignored (address-extension)"), "{r}");
    }
    assert!(
        server.spooled().is_empty(),
        "nothing answered, nothing bounced"
    );
    // The connection is still good for a message within the limit.
    let replies = c
        .transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].starts_with("250 2.0.0"), "{replies:?}");
    assert_eq!(server.spooled().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn helo_and_ehlo_are_refused() {
    let mut server = start(lmtp_config()).await;
    let mut c = server.connect().await;
    c.expect("220 ").await;
    c.send("HELO mail.example.net\r\n").await;
    c.expect("500 5.5.1").await;
    c.send("EHLO mail.example.net\r\n").await;
    c.expect("500 5.5.1").await;
    c.send("MAIL FROM:<bob@example.org>\r\n").await;
    c.expect("503 5.5.1").await;
    server.stop().await;
}

#[tokio::test]
async fn silent_client_gets_a_timeout() {
    let mut server = start(LmtpConfig {
        command_timeout_secs: 1,
        ..lmtp_config()
    })
    .await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    // Send nothing more.
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
    server.stop().await;
}

#[tokio::test]
async fn slow_data_gets_a_timeout_and_nothing_is_handled() {
    let mut server = start(LmtpConfig {
        command_timeout_secs: 60,
        data_timeout_secs: 1,
        ..lmtp_config()
    })
    .await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    let (raw, _) = publication();
    c.send("MAIL FROM:<alice@example.net>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\n")
        .await;
    c.expect("250").await;
    c.expect("250").await;
    c.expect("354").await;
    c.send(&raw[..raw.len() / 2]).await;
    c.expect("421 4.4.2").await;
    assert!(c.closed().await);
    server.stop().await;
    assert!(server.spooled().is_empty());
    assert!(
        server
            .store
            .get(&addr("alice@example.net"))
            .await
            .expect("store")
            .is_none()
    );
}

#[tokio::test]
async fn abrupt_disconnect_mid_data_stores_nothing() {
    let mut server = start(lmtp_config()).await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    let (raw, _) = publication();
    c.send("MAIL FROM:<alice@example.net>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\n")
        .await;
    c.expect("250").await;
    c.expect("250").await;
    c.expect("354").await;
    // All of the message but the final dot, then the connection drops.
    let body = data(&raw);
    c.send(&body[..body.len() - 3]).await;
    drop(c);
    // `stop` returns only once every connection task has ended.
    server.stop().await;
    assert!(server.spooled().is_empty(), "no reply was sent");
    assert!(
        server
            .store
            .get(&addr("alice@example.net"))
            .await
            .expect("store")
            .is_none(),
        "nothing was stored"
    );
}

/// The store's server is killed mid-run: 451 (the MTA keeps the message), then, once it is
/// back, the MTA's retry of the same message is published.
#[tokio::test]
async fn store_stopped_mid_run_defers_with_451_then_recovers() {
    let mut redis = redis_server::RedisServer::start_new().await;
    let mut server = start_on(lmtp_config(), Some(redis.store())).await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    // Up: a retrieval goes through the store.
    let (raw, _) = retrieval();
    let replies = c
        .transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].ends_with("decided: not-found"), "{replies:?}");

    let (raw, pending) = publication();
    redis.kill().await;
    let replies = c
        .transaction("alice@example.net", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].starts_with("451 4.3.0 "), "{replies:?}");
    assert!(replies[0].ends_with("try again later"), "{replies:?}");
    assert_eq!(
        server.spooled().len(),
        1,
        "no reply for the deferred message"
    );

    // The store comes back; the MTA retries the same message (on the same connection).
    redis.start().await;
    let mut replies = Vec::new();
    for _ in 0..50 {
        replies = c
            .transaction("alice@example.net", &["keys@example.net"], &raw)
            .await;
        if !replies[0].starts_with("451") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replies[0].ends_with("decided: published"), "{replies:?}");
    let spooled = server.spooled();
    assert_eq!(spooled.len(), 2);
    assert!(spooled.iter().any(|s| matches!(
        client::verify_reply(&pending, s),
        Ok(Verified::Published { .. })
    )));
    assert_eq!(
        server
            .store
            .get(&addr("alice@example.net"))
            .await
            .expect("store is back")
            .expect("published")
            .version,
        1
    );
    server.stop().await;
}

/// The store's server is frozen (SIGSTOP): the decision is abandoned after the command timeout
/// with a 451 and the connection stays usable; once thawed, messages go through again.
#[tokio::test]
async fn hanging_store_defers_with_451_and_frees_the_connection() {
    let redis = redis_server::RedisServer::start_new().await;
    let mut server = start_on(
        LmtpConfig {
            command_timeout_secs: 1,
            ..lmtp_config()
        },
        Some(redis.store()),
    )
    .await;
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    let (raw, _) = retrieval();
    redis.signal("-STOP");
    let replies = c
        .transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(
        replies[0].starts_with("451 4.3.0 kst unavailable: no decision within 1s"),
        "{replies:?}"
    );
    redis.signal("-CONT");
    let mut replies = Vec::new();
    for _ in 0..50 {
        replies = c
            .transaction("bob@example.org", &["keys@example.net"], &raw)
            .await;
        if !replies[0].starts_with("451") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replies[0].ends_with("decided: not-found"), "{replies:?}");
    server.stop().await;
}

#[tokio::test]
async fn peer_outside_the_allow_list_is_refused() {
    let mut server = start(LmtpConfig {
        allow: vec!["10.0.0.0/8".into()],
        ..lmtp_config()
    })
    .await;
    let mut c = server.connect().await;
    c.expect("554 5.7.1 not allowed").await;
    assert!(c.closed().await);
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_turned_away() {
    let mut server = start(LmtpConfig {
        max_connections: 1,
        ..lmtp_config()
    })
    .await;
    let mut first = server.connect().await;
    first.greeting_and_lhlo().await;
    let mut second = server.connect().await;
    second.expect("421 4.3.2 too busy").await;
    assert!(second.closed().await);
    first.send("QUIT\r\n").await;
    first.expect("221").await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_transaction_in_flight_finish() {
    let mut server = start(lmtp_config()).await;
    let mut idle = server.connect().await;
    idle.greeting_and_lhlo().await;
    let mut busy = server.connect().await;
    busy.greeting_and_lhlo().await;
    let (raw, pending) = publication();
    busy.send("MAIL FROM:<alice@example.net>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\n")
        .await;
    busy.expect("250").await;
    busy.expect("250").await;
    busy.expect("354").await;
    let body = data(&raw);
    let (head, tail) = body.split_at(body.len() / 2);
    busy.send(head).await;

    let _ = server.shutdown.take().expect("running").send(());
    // The idle connection is closed at once: shutdown has reached the connections.
    idle.expect("421 4.3.2").await;
    assert!(idle.closed().await);
    // No new connections.
    assert!(TcpStream::connect(server.addr).await.is_err());
    // The busy one finishes its message, gets its 250, then is closed.
    busy.send(tail).await;
    assert!(
        busy.expect("250 2.0.0")
            .await
            .ends_with("decided: published")
    );
    busy.expect("421 4.3.2").await;
    assert!(busy.closed().await);
    server.stop().await;
    let spooled = server.spooled();
    assert_eq!(spooled.len(), 1);
    assert!(matches!(
        verify(&pending, &spooled[0]),
        Verified::Published { .. }
    ));
}

#[tokio::test]
async fn unix_socket_listener() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (kst, _store, spool) = kst_in(dir.path()).await;
    let path = dir.path().join("lmtp.sock");
    let listen = format!("unix:{}", path.display());
    let cfg = LmtpConfig {
        listen: listen.clone(),
        // Unix socket peers are allowed whatever the list says.
        allow: vec!["10.0.0.0/8".into()],
        ..LmtpConfig::default()
    };
    let listener = Listener::bind(&listen).await.expect("bind");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(kst_bin::server::lmtp::run(listener, kst, cfg, async {
        let _ = rx.await;
    }));
    let mut c = Client::new(
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect"),
    );
    c.greeting_and_lhlo().await;
    let (raw, _) = retrieval();
    let replies = c
        .transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    assert!(replies[0].ends_with("decided: not-found"), "{replies:?}");
    c.send("QUIT\r\n").await;
    c.expect("221").await;
    // A second server cannot take over a live socket.
    assert!(Listener::bind(&listen).await.is_err());
    let _ = tx.send(());
    task.await.expect("task").expect("run");
    assert!(!path.exists(), "the socket file is removed at shutdown");
    assert_eq!(std::fs::read_dir(&spool).expect("spool").count(), 1);
}

#[tokio::test]
async fn a_connection_can_be_driven_over_an_in_memory_pipe() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (kst, _store, _spool) = kst_in(dir.path()).await;
    let ctx = ConnectionContext::new(kst, &LmtpConfig::default(), ShutdownSignal::never());
    let (client_end, server_end) = tokio::io::duplex(4096);
    let server = tokio::spawn(async move {
        kst_bin::server::lmtp::serve_connection(server_end, "pipe", &ctx).await
    });
    let mut c = Client::new(client_end);
    c.greeting_and_lhlo().await;
    c.send("VRFY alice\r\nQUIT\r\n").await;
    c.expect("252 2.5.0").await;
    c.expect("221").await;
    server.await.expect("task").expect("session");
}

/// A raw HTTP/1.1 GET; returns (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.expect("connect http");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut resp = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut resp))
        .await
        .expect("an answer in time")
        .expect("read");
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn start_http(
    kst: Kst,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<std::io::Result<()>>,
) {
    let metrics = kst_bin::shared::metrics::init();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind http");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(kst_bin::server::http::run(l, kst, metrics, async {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

#[tokio::test]
async fn http_endpoint_health_readiness_metrics() {
    let mut redis = redis_server::RedisServer::start_new().await;
    let mut server = start_on(lmtp_config(), Some(redis.store())).await;
    // One message through LMTP so that the counters exist.
    let mut c = server.connect().await;
    c.greeting_and_lhlo().await;
    let (raw, _) = retrieval();
    c.transaction("bob@example.org", &["keys@example.net"], &raw)
        .await;
    let (http, stop_http, http_task) = start_http(server.kst.clone()).await;

    assert_eq!(http_get(http, "/healthz").await.0, 200);
    let (status, body) = http_get(http, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "kst_messages_total{kind=\"retrieval\",outcome=\"not-found\"}",
        "kst_message_duration_seconds_bucket",
        "kst_lmtp_connections ",
        "kst_lmtp_connections_total",
    ] {
        assert!(body.contains(name), "{name} missing in:\n{body}");
    }

    // The store goes down: not ready, and says why; alive all the same.
    redis.kill().await;
    let (status, body) = http_get(http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("store(redis)"), "{body}");
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    redis.start().await;
    let mut status = 0;
    for _ in 0..50 {
        status = http_get(http, "/readyz").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "ready again once the store is back");
    assert_eq!(http_get(http, "/nope").await.0, 404);

    let _ = stop_http.send(());
    http_task.await.expect("task").expect("http run");
    server.stop().await;
}

#[tokio::test]
async fn readyz_names_an_unwritable_spool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn KeyStore> = Arc::new(
        kst_fs::FsStore::open(dir.path().join("store"))
            .await
            .expect("filesystem store"),
    );
    // A directory under a regular file cannot be created, even by root.
    let mailer: Arc<dyn Mailer> = Arc::new(SpoolMailer::new("/dev/null/spool"));
    let kst = Kst::new(
        Policy::new(&["example.net"], &["mail.example.net"]),
        store,
        mailer,
    );
    let (http, stop, task) = start_http(kst).await;
    let (status, body) = http_get(http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("mailer(spool)"), "{body}");
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    let _ = stop.send(());
    task.await.expect("task").expect("http run");
}

#[test]
fn config_sections_parse_with_defaults_and_refuse_unknown_keys() {
    #[derive(serde::Deserialize)]
    struct Sections {
        #[serde(default)]
        lmtp: LmtpConfig,
        #[serde(default)]
        http: HttpConfig,
    }
    let s: Sections =
        toml::from_str("[lmtp]\nlisten = \"unix:/run/kst/lmtp.sock\"\nmax_connections = 8\n")
            .expect("valid");
    assert_eq!(s.lmtp.listen, "unix:/run/kst/lmtp.sock");
    assert_eq!(s.lmtp.max_connections, 8);
    assert_eq!(s.lmtp.allow, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(
        s.lmtp.max_message_size, None,
        "deprecated: limits.max_message_bytes"
    );
    assert_eq!(s.http.listen, "127.0.0.1:8080");
    assert!(toml::from_str::<Sections>("[lmtp]\nlisten_on = \"x\"\n").is_err());
    assert!(toml::from_str::<Sections>("[http]\nport = 1\n").is_err());
    // What `kst config show` would print reads back the same.
    let shown = toml::to_string(&LmtpConfig::default()).expect("serializes");
    assert_eq!(
        toml::from_str::<LmtpConfig>(&shown).expect("reads back"),
        LmtpConfig::default()
    );
}

fn send_signal(name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(std::process::id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// `serve` as `kst serve` runs it: SIGTERM lets the transaction in flight finish; with a second
/// signal it returns at once (here with a grace period far longer than the test's patience).
#[tokio::test]
async fn serve_stops_gracefully_on_sigterm_and_at_once_on_a_second_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (kst, store, spool) = kst_in(dir.path()).await;
    let path = dir.path().join("serve.sock");
    let lmtp = LmtpConfig {
        listen: path.display().to_string(),
        shutdown_grace_secs: 3600,
        ..LmtpConfig::default()
    };
    let http = HttpConfig { listen: "".into() };

    // Round 1: one SIGTERM while a message is half sent.
    let serve = tokio::spawn(kst_bin::server::serve::daemon(
        lmtp.clone(),
        http.clone(),
        kst.clone(),
    ));
    let mut c = loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => break Client::new(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    c.greeting_and_lhlo().await;
    let (raw, pending) = publication();
    c.send("MAIL FROM:<alice@example.net>\r\nRCPT TO:<keys@example.net>\r\nDATA\r\n")
        .await;
    c.expect("250").await;
    c.expect("250").await;
    c.expect("354").await;
    let body = data(&raw);
    let (head, tail) = body.split_at(body.len() / 2);
    c.send(head).await;
    send_signal("TERM");
    // Shutdown has begun once the socket file is gone (the listener closes first).
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.send(tail).await;
    assert!(c.expect("250 2.0.0").await.ends_with("decided: published"));
    c.expect("421 4.3.2").await;
    tokio::time::timeout(PATIENCE, serve)
        .await
        .expect("serve returns")
        .expect("task")
        .expect("serve Ok");
    assert!(
        store
            .get(&addr("alice@example.net"))
            .await
            .expect("store")
            .is_some()
    );
    let replies: Vec<PathBuf> = std::fs::read_dir(&spool)
        .expect("spool")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(replies.len(), 1);
    let reply = std::fs::read(&replies[0]).expect("reply");
    assert!(matches!(
        verify(&pending, &reply),
        Verified::Published { .. }
    ));

    // Round 2: a transaction hangs half sent; two signals end `serve` without waiting for it.
    let serve = tokio::spawn(kst_bin::server::serve::daemon(lmtp, http, kst));
    let mut c = loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => break Client::new(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    c.greeting_and_lhlo().await;
    c.send("MAIL FROM:<alice@example.net>\r\n").await;
    c.expect("250").await;
    send_signal("INT");
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal("TERM");
    tokio::time::timeout(PATIENCE, serve)
        .await
        .expect("serve returns on the second signal")
        .expect("task")
        .expect("serve Ok");
}
