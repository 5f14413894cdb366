//! `kst serve` through the real binary: no configuration file (the embedded default in a
//! temporary working directory), LMTP on a free port, the HTTP endpoint, a publication and a
//! retrieval with a gpg-made key, and SIGTERM while a message is half sent.

use kst_bin::bench::lmtp::dot_stuff as data;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kst_core::AddressPolicy;
use kst_core::client::{self, Verified};
use kst_tests::serve::{PATIENCE, ServeProcess, free_port};
use kst_tests::{
    Gpg, TestDb, TestKst, TestPrefix, code, kst_binary, received_authenticated, stderr,
};

fn addr(s: &str) -> kst_core::Address {
    AddressPolicy::default().normalize(s).expect("test address")
}

/// `kst serve` with no `--config`, in its own working directory.
struct Serve {
    cwd: tempfile::TempDir,
    lmtp: SocketAddr,
    http: SocketAddr,
    process: ServeProcess,
}

impl Serve {
    fn start() -> Serve {
        Serve::start_with(None, &[])
    }

    /// `kst serve` listening for LMTP on `listen` (a free loopback port when `None`; the
    /// default, a Unix socket under `./data`, when it returns ""), with `env` added to its
    /// environment.
    fn start_with(listen: Option<&dyn Fn(&Path) -> String>, env: &[(&str, &str)]) -> Serve {
        let cwd = tempfile::Builder::new()
            .prefix("kst-serve-")
            .tempdir()
            .expect("temp dir");
        let (lmtp, http) = (free_port(), free_port());
        let listen = listen.map_or_else(|| lmtp.to_string(), |f| f(cwd.path()));
        // The HTTP endpoint binds after the LMTP listener: once it answers, both are up.
        let process = ServeProcess::start(cwd.path().join("serve.log"), http, |cmd| {
            cmd.envs(env.iter().copied());
            if !listen.is_empty() {
                cmd.env("KST_LMTP__LISTEN", &listen);
            }
            cmd.current_dir(cwd.path())
                .env("KST_HTTP__LISTEN", http.to_string());
        });
        Serve {
            cwd,
            lmtp,
            http,
            process,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn outbox(&self) -> PathBuf {
        self.cwd.path().join("data/outbox")
    }

    /// Replies in the spool, oldest first: by name, which the spool mailer makes sort in the
    /// order replies were written. (By modification time, as before, two replies written
    /// within one tick of the kernel's coarse file clock tied, and the newest could come
    /// before an older one: CI once saw the publication's confirmation not last.)
    fn replies(&self) -> Vec<Vec<u8>> {
        kst_tests::spool_replies(&self.outbox())
    }

    fn signal(&self, sig: &str) {
        self.process.signal(sig);
    }

    /// Waits for the process to exit; its exit code.
    fn wait(&mut self) -> i32 {
        self.process.wait()
    }
}

/// A byte stream an LMTP client can talk over (TCP or a Unix socket).
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A blocking LMTP client.
struct Lmtp {
    io: BufReader<Box<dyn Stream>>,
}

impl Lmtp {
    fn connect(at: SocketAddr) -> Lmtp {
        let s = TcpStream::connect(at).expect("connect LMTP");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        Lmtp {
            io: BufReader::new(Box::new(s)),
        }
    }

    fn connect_unix(path: &Path) -> Lmtp {
        let s = std::os::unix::net::UnixStream::connect(path).expect("connect LMTP socket");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        Lmtp {
            io: BufReader::new(Box::new(s)),
        }
    }

    fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.io
            .get_mut()
            .write_all(bytes.as_ref())
            .expect("write LMTP");
    }

    /// One whole reply, continuation lines joined with '\n'; "" at EOF.
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.io.read_line(&mut line).unwrap_or(0) == 0 {
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

    fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply();
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    /// Greeting and LHLO; returns the LHLO reply.
    fn hello(&mut self) -> String {
        self.expect("220 ");
        self.send("LHLO localhost\r\n");
        self.expect("250-")
    }

    /// MAIL, RCPT, DATA up to the 354.
    fn begin(&mut self, sender: &str) {
        self.send(format!(
            "MAIL FROM:<{sender}>\r\nRCPT TO:<keys@example.test>\r\nDATA\r\n"
        ));
        self.expect("250 2.1.0");
        self.expect("250 2.1.5");
        self.expect("354 ");
    }

    fn transaction(&mut self, sender: &str, raw: &[u8]) -> String {
        self.begin(sender);
        self.send(data(raw));
        self.reply()
    }
}

/// A raw HTTP/1.1 GET: (status, body).
fn http_get(at: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(at).expect("connect HTTP");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write HTTP");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read HTTP");
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

/// A publication as the local MTA (`localhost`, trusted by the embedded default for `example.test`) hands it on
/// after alice authenticated.
fn publication(key: &str) -> (Vec<u8>, client::Pending) {
    let req = client::build_publication(&addr("alice@example.test"), key).expect("alice's key");
    let mut raw = received_authenticated("alice@example.test", "localhost").into_bytes();
    raw.extend_from_slice(&req.message);
    (raw, req.pending)
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter_map(Result::ok)
            .map(|e| {
                if e.path().is_dir() {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

#[test]
fn serve_without_config_publishes_retrieves_and_stops_gracefully_on_sigterm() {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.test", "ed25519");
    let mut serve = Serve::start();

    // The HTTP endpoint.
    assert_eq!(http_get(serve.http, "/healthz").0, 200, "{}", serve.log());
    let (status, body) = http_get(serve.http, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"), "{}", serve.log());

    // LHLO: our own greeting line, the capabilities.
    let mut c = Lmtp::connect(serve.lmtp);
    let lhlo = c.hello();
    let first = lhlo.lines().next().expect("a line");
    assert!(first.ends_with(" kst LMTP"), "{lhlo}");
    for cap in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(lhlo.contains(cap), "{cap} missing: {lhlo}");
    }
    // No SIZE (issue 13): Postfix would bounce larger mail itself, to a forged sender.
    assert!(!lhlo.contains("SIZE"), "{lhlo}");
    // TCP is an explicit choice here, and kst warns that it has no LMTP AUTH.
    assert!(
        serve.log().contains("does not implement LMTP AUTH"),
        "{}",
        serve.log()
    );

    // A publication, then a retrieval by someone else, over the same connection.
    let (raw, pending) = publication(&alice.public_armored);
    let reply = c.transaction("alice@example.test", &raw);
    assert!(
        reply.starts_with("250 2.0.0") && reply.ends_with("decided: published"),
        "{reply}\n{}",
        serve.log()
    );
    let req = client::build_retrieval(&addr("bob@example.org"), &addr("alice@example.test"));
    let reply = c.transaction("bob@example.org", &req.message);
    assert!(reply.ends_with("decided: found"), "{reply}");
    let replies = serve.replies();
    assert_eq!(replies.len(), 2, "one reply each in ./data/outbox");
    match client::verify_reply(&pending, &replies[0]).expect("the confirmation verifies") {
        Verified::Published { fingerprint, .. } => assert_eq!(fingerprint, alice.fingerprint),
        other => panic!("expected a confirmation, got {other:?}"),
    }
    match client::verify_reply(&req.pending, &replies[1]).expect("the response verifies") {
        Verified::Found { fingerprint, .. } => assert_eq!(fingerprint, alice.fingerprint),
        other => panic!("expected alice's key, got {other:?}"),
    }
    assert!(
        files_under(&serve.cwd.path().join("data/keys")) > 0,
        "the key is in the embedded filesystem store ./data/keys"
    );

    // Metrics count what happened.
    let (status, metrics) = http_get(serve.http, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "kst_messages_total{kind=\"publication\",outcome=\"published\"} 1",
        "kst_messages_total{kind=\"retrieval\",outcome=\"found\"} 1",
        "kst_message_duration_seconds_bucket",
        "kst_lmtp_connections 1",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }

    // SIGTERM while a retrieval is half sent: the message is finished and answered, then the
    // process exits 0.
    let req = client::build_retrieval(&addr("carol@example.org"), &addr("alice@example.test"));
    c.begin("carol@example.org");
    let body = data(&req.message);
    let (head, tail) = body.split_at(body.len() / 2);
    c.send(head);
    serve.signal("-TERM");
    // Shutdown has begun once the listener is closed.
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(serve.lmtp).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send(tail);
    let reply = c.reply();
    assert!(
        reply.ends_with("decided: found"),
        "{reply}\n{}",
        serve.log()
    );
    c.expect("421 4.3.2");
    assert_eq!(serve.wait(), 0, "{}", serve.log());
    let replies = serve.replies();
    assert_eq!(replies.len(), 3, "nothing lost");
    assert!(matches!(
        client::verify_reply(&req.pending, &replies[2]),
        Ok(Verified::Found { .. })
    ));
}

#[test]
fn serve_refuses_an_lmtp_port_in_use_and_names_it() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr");
    let cwd = tempfile::tempdir().expect("temp dir");
    let out = Command::new(kst_binary())
        .arg("serve")
        .current_dir(cwd.path())
        .env_remove("KST_CONFIG")
        .env("KST_LMTP__LISTEN", port.to_string())
        .env("KST_HTTP__LISTEN", "")
        .output()
        .expect("run kst serve");
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lmtp.listen"), "{err}");
}

/// The load tool through the real path: `kst bench lmtp` over a Unix socket against a real
/// `kst serve`, every message decided and every reply spooled.
#[test]
fn bench_lmtp_loads_serve_over_a_unix_socket() {
    let sock = |dir: &Path| format!("unix:{}", dir.join("lmtp.sock").display());
    let mut serve = Serve::start_with(
        Some(&sock),
        &[
            ("KST_LIMITS__PER_SENDER", "0"),
            ("KST_LIMITS__PER_ACCOUNT", "0"),
            ("KST_LIMITS__PER_SOURCE_IP", "0"),
            ("KST_LIMITS__PER_SENDER_QUERY", "0"),
        ],
    );
    let out = Command::new(kst_binary())
        .args(["bench", "lmtp", "--connect"])
        .arg(sock(serve.cwd.path()))
        .args(["--metrics", &serve.http.to_string()])
        .args([
            "--concurrency",
            "2",
            "--publications",
            "4",
            "--retrievals",
            "20",
        ])
        .args(["--json", "--quiet"])
        .env_remove("KST_CONFIG")
        .output()
        .expect("run kst bench lmtp");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serve.log()
    );
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON report per phase"))
        .collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    let (publications, retrievals) = (&reports[0], &reports[1]);
    assert_eq!(publications["phase"], "publication");
    assert_eq!(publications["decided"], 4);
    assert_eq!(publications["outcomes"]["published"], 4);
    assert_eq!(retrievals["phase"], "retrieval");
    assert_eq!(retrievals["decided"], 20);
    let found = retrievals["outcomes"]["found"].as_u64().unwrap_or(0);
    let not_found = retrievals["outcomes"]["not-found"].as_u64().unwrap_or(0);
    assert_eq!(found + not_found, 20, "{retrievals}");
    assert!(found > 0, "{retrievals}");
    assert!(retrievals["server_p99_ms"].is_number(), "{retrievals}");
    // Every decided message left a reply in the spool.
    assert_eq!(serve.replies().len(), 24);
    serve.signal("-TERM");
    assert_eq!(serve.wait(), 0, "{}", serve.log());
}

/// `[mailer] envelope_from = "<>"` (the null sender) passes `kst config check`, and both ingest
/// paths read it the same way: `kst deliver` and `kst serve` answer a retrieval, with replies from
/// `<>`. (It used to pass the check and then defer every message as a configuration error.)
#[test]
fn null_envelope_from_works_in_config_check_deliver_and_serve() {
    const NULL_SENDER: (&str, &str) = ("KST_MAILER__ENVELOPE_FROM", "<>");
    let kst = TestKst::new("");
    let check = kst.kst_env(&["config", "check"], b"", &[NULL_SENDER]);
    assert_eq!(code(&check), 0, "{}", stderr(&check));

    let req = client::build_retrieval(&addr("bob@example.org"), &addr("alice@example.net"));
    let out = kst.deliver_env("bob@example.org", &req.message, &[NULL_SENDER]);
    assert_eq!(code(&out), 0, "kst deliver: {}", stderr(&out));
    let reply = kst.last_reply();
    assert!(
        reply.starts_with(b"Return-Path: <>\r\n"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    let serve = Serve::start_with(None, &[NULL_SENDER]);
    let mut c = Lmtp::connect(serve.lmtp);
    c.hello();
    let req = client::build_retrieval(&addr("bob@example.org"), &addr("alice@example.test"));
    let answer = c.transaction("bob@example.org", &req.message);
    assert!(answer.starts_with("250 2.0.0"), "{answer}\n{}", serve.log());
    let replies = serve.replies();
    assert_eq!(replies.len(), 1, "{}", serve.log());
    assert!(
        replies[0].starts_with(b"Return-Path: <>\r\n"),
        "{}",
        String::from_utf8_lossy(&replies[0])
    );
}

/// Issue 13 item 8: with no `[lmtp] listen` (the README's first command), `kst serve` listens on
/// the Unix socket `./data/lmtp.sock`, mode 0660, in the group `[lmtp] socket_group`; no TCP
/// port, no TCP warning; a retrieval over the socket is answered.
#[test]
fn serve_listens_on_a_unix_socket_under_data_by_default() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let probe = tempfile::tempdir().expect("temp dir");
    let gid = std::fs::metadata(probe.path()).expect("metadata").gid();
    let gid = gid.to_string();
    let serve = Serve::start_with(
        Some(&|_: &Path| String::new()),
        &[("KST_LMTP__SOCKET_GROUP", gid.as_str())],
    );
    let sock = serve.cwd.path().join("data/lmtp.sock");
    let meta = std::fs::symlink_metadata(&sock).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid().to_string(), gid);
    assert!(TcpStream::connect(serve.lmtp).is_err(), "no TCP listener");
    let log = serve.log();
    assert!(log.contains("unix:./data/lmtp.sock"), "{log}");
    assert!(!log.contains("does not implement LMTP AUTH"), "{log}");
    let mut c = Lmtp::connect_unix(&sock);
    c.hello();
    let req = client::build_retrieval(&addr("bob@example.org"), &addr("alice@example.test"));
    let reply = c.transaction("bob@example.org", &req.message);
    assert!(
        reply.ends_with("decided: not-found"),
        "{reply}\n{}",
        serve.log()
    );
    assert_eq!(serve.replies().len(), 1);
}

/// A retrieval from the internet (the local MX, `localhost`, received it from `ip`).
fn internet_retrieval(sender: &str, query: &str, ip: &str) -> Vec<u8> {
    kst_tests::retrieval_from(sender, query, ip, "localhost")
}

/// Issue 13 item 1 through `kst serve` on the shared counters of `store_env`'s backend: floods
/// from many forged senders use up nothing the victim needs.
fn forged_floods_do_not_lock_the_victim_out(store_env: &[(&str, &str)]) {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.test", "ed25519");
    let mut env = vec![
        ("KST_LIMITS__PER_SENDER", "3"),
        ("KST_LIMITS__PER_SENDER_QUERY", "2"),
        ("KST_LIMITS__PER_ACCOUNT", "3"),
    ];
    env.extend_from_slice(store_env);
    let serve = Serve::start_with(None, &env);
    let mut c = Lmtp::connect(serve.lmtp);
    c.hello();
    let (raw, _) = publication(&alice.public_armored);
    let reply = c.transaction("alice@example.test", &raw);
    assert!(
        reply.ends_with("decided: published"),
        "{reply}\n{}",
        serve.log()
    );
    // 10 forged retrievals as alice from 10 hosts: 3 answered (the backscatter cap), the
    // rest silenced on the sender counter.
    let mut limited = 0;
    for i in 0..10 {
        let raw = internet_retrieval(
            "alice@example.test",
            &format!("u{i}@example.org"),
            &format!("198.51.100.{i}"),
        );
        let reply = c.transaction("alice@example.test", &raw);
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        limited += usize::from(reply.ends_with("(rate-limited)"));
    }
    assert_eq!(limited, 7, "{}", serve.log());
    // 10 retrievals of alice's key from throwaway senders of one domain: all answered.
    for i in 0..10 {
        let sender = format!("throwaway{i}@freemail.example");
        let raw = internet_retrieval(&sender, "alice@example.test", "192.0.2.9");
        let reply = c.transaction(&sender, &raw);
        assert!(reply.ends_with("decided: found"), "{reply}");
    }
    // alice publishes again, authenticated: counted on her account only.
    let (raw, pending) = publication(&alice.public_armored);
    let reply = c.transaction("alice@example.test", &raw);
    assert!(
        reply.ends_with("decided: published"),
        "{reply}\n{}",
        serve.log()
    );
    let replies = serve.replies();
    let last = replies.last().expect("a reply");
    let verified = client::verify_reply(&pending, last);
    assert!(
        matches!(verified, Ok(Verified::Published { .. })),
        "{verified:?}\n{} replies, the newest:\n{}\n{}",
        replies.len(),
        String::from_utf8_lossy(last),
        serve.log()
    );
    // Her own retrieval through authenticated submission is answered.
    let q = client::build_retrieval(&addr("alice@example.test"), &addr("bob@example.test"));
    let mut raw = received_authenticated("alice@example.test", "localhost").into_bytes();
    raw.extend_from_slice(&q.message);
    let reply = c.transaction("alice@example.test", &raw);
    assert!(
        reply.ends_with("decided: not-found"),
        "{reply}\n{}",
        serve.log()
    );
    // A new correspondent still gets her key.
    let q = client::build_retrieval(&addr("carol@acme.example"), &addr("alice@example.test"));
    let reply = c.transaction("carol@acme.example", &q.message);
    assert!(reply.ends_with("decided: found"), "{reply}");
    // 1 + 3 + 10 + 1 + 1 + 1 replies.
    assert_eq!(serve.replies().len(), 17, "{}", serve.log());
}

#[test]
fn forged_floods_do_not_lock_the_victim_out_on_postgres() {
    let db = TestDb::new();
    forged_floods_do_not_lock_the_victim_out(&[
        ("KST_STORE__BACKEND", "postgres"),
        ("KST_STORE__URL", db.url.as_str()),
    ]);
}

#[test]
fn forged_floods_do_not_lock_the_victim_out_on_redis() {
    let p = TestPrefix::new();
    forged_floods_do_not_lock_the_victim_out(&[
        ("KST_STORE__BACKEND", "redis"),
        ("KST_STORE__URL", p.url.as_str()),
        ("KST_STORE__PREFIX", p.prefix.as_str()),
    ]);
}
