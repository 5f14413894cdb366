//! The SMTP mailer against a real SMTP server, Postfix's `smtp-sink`, and against relays that
//! refuse or never answer.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kst_bin::server::mailer::SmtpMailer;
use kst_bin::shared::config::{MailerConfig, MailerKind, SmtpTls};
use kst_bin::shared::wiring::build_mailer;
use kst_core::{AddressPolicy, Error, Mailer, OutgoingMail};

/// `smtp-sink` on a free loopback port, dumping each message into a temporary directory.
struct Sink {
    child: Child,
    port: u16,
    dump: tempfile::TempDir,
}

fn smtp_sink_binary() -> PathBuf {
    for p in ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "smtp-sink not found: install Postfix (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix); scripts/test.sh does"
    );
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sink {
    fn start() -> Sink {
        Sink::start_with(&[])
    }

    /// A sink started with extra smtp-sink options, e.g. `-f RCPT` (refuse every recipient
    /// with a 5xx) or `-r RCPT` (with a 4xx).
    fn start_with(options: &[&str]) -> Sink {
        let dump = tempfile::tempdir().unwrap();
        let root = running_as_root();
        if root {
            // smtp-sink drops privileges to `nobody` and must still write the dumps.
            std::fs::set_permissions(dump.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let mut cmd = Command::new(smtp_sink_binary());
        if root {
            cmd.args(["-u", "nobody"]);
        }
        let template = format!("{}/%Y%m%d%H%M%S.", dump.path().display());
        let child = cmd
            .args(options)
            .args(["-d", &template, &format!("127.0.0.1:{port}"), "16"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start smtp-sink");
        let mut sink = Sink { child, port, dump };
        // Wait until it listens (bounded; a failure to start ends the test).
        for _ in 0..400 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return sink;
            }
            if let Some(status) = sink.child.try_wait().unwrap() {
                panic!("smtp-sink exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("smtp-sink does not listen on 127.0.0.1:{port}");
    }

    /// The dumped messages; waits (bounded) until `n` are there.
    fn dumps(&self, n: usize) -> Vec<String> {
        for _ in 0..400 {
            let files: Vec<PathBuf> = std::fs::read_dir(self.dump.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            if files.len() >= n {
                // smtp-sink closes a dump when the data ends; give a partial write a moment.
                let texts: Vec<String> = files
                    .iter()
                    .map(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned())
                    .collect();
                if texts.iter().all(|t| t.contains("\nbody line\n")) {
                    return texts;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("smtp-sink did not dump {n} message(s)");
    }

    fn config(&self, tls: SmtpTls) -> MailerConfig {
        MailerConfig {
            kind: MailerKind::Smtp,
            host: "127.0.0.1".into(),
            port: self.port,
            tls,
            timeout_secs: 20,
            ..MailerConfig::default()
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mail(from: Option<&str>, to: &str) -> OutgoingMail {
    let p = AddressPolicy::default();
    OutgoingMail {
        envelope_from: from.map(|f| p.normalize(f).unwrap()),
        recipient: p.normalize(to).unwrap(),
        // A line starting with a dot must survive SMTP's dot-stuffing.
        message: format!(
            "From: keys@example.net\r\nTo: {to}\r\nSubject: kst reply\r\n\r\n.leading dot\r\nbody line\r\n"
        )
        .into_bytes(),
        message_id: "reply-1@example.net".into(),
    }
}

#[tokio::test]
async fn a_reply_reaches_a_real_smtp_server_with_the_null_sender() {
    let sink = Sink::start();
    let mailer = build_mailer(&sink.config(SmtpTls::None)).unwrap();
    assert_eq!(mailer.name(), "smtp");
    mailer.send(&mail(None, "bob@acme.net")).await.unwrap();

    let dumps = sink.dumps(1);
    assert_eq!(dumps.len(), 1);
    let d = &dumps[0];
    assert!(d.contains("X-Mail-Args: <>\n"), "{d}");
    assert!(d.contains("X-Rcpt-Args: <bob@acme.net>\n"), "{d}");
    assert_eq!(
        d.matches("X-Rcpt-Args:").count(),
        1,
        "exactly one recipient: {d}"
    );
    assert!(d.contains("Subject: kst reply\n"), "{d}");
    assert!(d.contains("\n.leading dot\nbody line\n"), "{d}");
}

#[tokio::test]
async fn an_explicit_envelope_sender_is_used() {
    let sink = Sink::start();
    let mailer = SmtpMailer::new(&sink.config(SmtpTls::None)).unwrap();
    mailer
        .send(&mail(Some("keys-bounces@example.net"), "carol@example.org"))
        .await
        .unwrap();
    let d = &sink.dumps(1)[0];
    assert!(
        d.contains("X-Mail-Args: <keys-bounces@example.net>\n"),
        "{d}"
    );
    assert!(d.contains("X-Rcpt-Args: <carol@example.org>\n"), "{d}");
}

#[tokio::test]
async fn check_talks_to_the_relay_without_sending() {
    let sink = Sink::start();
    let mailer = SmtpMailer::new(&sink.config(SmtpTls::None)).unwrap();
    mailer.check().await.unwrap();
    // And a real send afterwards is the only message there.
    mailer.send(&mail(None, "bob@acme.net")).await.unwrap();
    assert_eq!(sink.dumps(1).len(), 1);
}

#[tokio::test]
async fn starttls_is_required_when_configured() {
    // smtp-sink offers no STARTTLS: no silent downgrade to cleartext.
    let sink = Sink::start();
    let mailer = SmtpMailer::new(&sink.config(SmtpTls::Starttls)).unwrap();
    let e = mailer.send(&mail(None, "bob@acme.net")).await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(e.to_string().contains("STARTTLS"), "{e}");
    let files = std::fs::read_dir(sink.dump.path()).unwrap().count();
    assert_eq!(files, 0, "nothing may be sent in cleartext");
}

#[tokio::test]
async fn an_unreachable_relay_is_a_temporary_error() {
    let cfg = MailerConfig {
        kind: MailerKind::Smtp,
        host: "127.0.0.1".into(),
        port: free_port(),
        tls: SmtpTls::None,
        ..MailerConfig::default()
    };
    let mailer = SmtpMailer::new(&cfg).unwrap();
    for e in [
        mailer.send(&mail(None, "bob@acme.net")).await.unwrap_err(),
        mailer.check().await.unwrap_err(),
    ] {
        assert!(e.is_temporary(), "{e}");
        match &e {
            Error::Unavailable { component, message } => {
                assert_eq!(component, "mailer(smtp)");
                assert!(
                    message.contains(&format!("127.0.0.1:{}", cfg.port)),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn a_relay_that_never_answers_is_given_up_on() {
    // Accepts connections but never sends a greeting.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn
    });
    let cfg = MailerConfig {
        kind: MailerKind::Smtp,
        host: "127.0.0.1".into(),
        port,
        tls: SmtpTls::None,
        timeout_secs: 1,
        ..MailerConfig::default()
    };
    let e = SmtpMailer::new(&cfg)
        .unwrap()
        .send(&mail(None, "bob@acme.net"))
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(e.to_string().contains("mailer.timeout_secs"), "{e}");
    drop(held.join().unwrap());
}

/// A config whose spool is `dir` and whose relay is 127.0.0.1:`port`, cleartext.
fn outbox_config(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kst.toml");
    std::fs::write(
        &path,
        format!(
            "[kst]\ndomains = [\"example.net\"]\ntrusted_mta_hosts = [\"localhost\"]\n\
             [store]\npath = \"{keys}\"\n\
             [mailer]\nkind = \"spool\"\npath = \"{outbox}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n",
            keys = dir.join("keys").display(),
            outbox = dir.join("outbox").display(),
        ),
    )
    .unwrap();
    path
}

fn outbox_send(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kst"))
        .args(["--config", config.to_str().unwrap(), "outbox", "send"])
        .env_remove("KST_CONFIG")
        .output()
        .expect("run kst outbox send")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// `kst outbox send` hands what the spool mailer wrote to a real relay (smtp-sink), with each
/// reply's envelope, removes what the relay accepted and sets aside what is not a spool file.
#[tokio::test]
async fn outbox_send_delivers_the_spool_to_the_relay() {
    let sink = Sink::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = outbox_config(tmp.path(), sink.port);
    let outbox = tmp.path().join("outbox");
    let spool = kst_bin::server::mailer::SpoolMailer::new(&outbox);
    spool.send(&mail(None, "bob@acme.net")).await.unwrap();
    spool
        .send(&mail(Some("keys-bounces@example.net"), "carol@example.org"))
        .await
        .unwrap();
    std::fs::write(
        outbox.join("00000000000000000000-0000000000000000.eml"),
        b"junk\r\n",
    )
    .unwrap();

    let out = outbox_send(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("2 sent, 1 set aside as .bad, 0 refused, 0 deferred by the relay, 0 left"),
        "{err}"
    );
    assert_eq!(
        files_in(&outbox),
        ["00000000000000000000-0000000000000000.eml.bad"]
    );
    let dumps = sink.dumps(2);
    assert_eq!(dumps.len(), 2);
    let bob = dumps
        .iter()
        .find(|d| d.contains("X-Rcpt-Args: <bob@acme.net>\n"));
    let carol = dumps
        .iter()
        .find(|d| d.contains("X-Rcpt-Args: <carol@example.org>\n"));
    assert!(
        bob.is_some_and(|d| d.contains("X-Mail-Args: <>\n")),
        "{dumps:?}"
    );
    assert!(
        carol.is_some_and(|d| d.contains("X-Mail-Args: <keys-bounces@example.net>\n")),
        "{dumps:?}"
    );
    // The envelope lines of the spool file are not part of the message sent.
    assert!(
        dumps.iter().all(|d| !d.contains("X-Kst-Envelope-To")),
        "{dumps:?}"
    );

    // Nothing left to send: a second run sends nothing and succeeds.
    let again = outbox_send(&config);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(sink.dumps(2).len(), 2);
}

/// With the relay down nothing is lost: exit 75, every file stays for the next run.
#[tokio::test]
async fn outbox_send_keeps_the_spool_when_the_relay_is_down() {
    let tmp = tempfile::tempdir().unwrap();
    let config = outbox_config(tmp.path(), free_port());
    let outbox = tmp.path().join("outbox");
    let spool = kst_bin::server::mailer::SpoolMailer::new(&outbox);
    spool.send(&mail(None, "bob@acme.net")).await.unwrap();
    spool.send(&mail(None, "carol@example.org")).await.unwrap();
    let before = files_in(&outbox);
    let out = outbox_send(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("0 sent, 0 set aside as .bad, 0 refused, 0 deferred by the relay, 2 left"),
        "{err}"
    );
    assert!(err.contains("is the relay running"), "{err}");
    assert_eq!(files_in(&outbox), before);
}

/// Red team round 8: a reply the relay refuses for its recipient used to stop every run at that
/// reply, which is the oldest file and so the first of every later run: one forged retrieval
/// with an envelope sender the relay refuses (`nosuchuser@` a served domain: Postfix answers
/// `550 5.1.1 User unknown`) held back every reply to everyone for good. Now a 5xx to the
/// recipient sets that reply aside as `<name>.refused` and the run goes on; a 4xx leaves it for
/// the next run (at most 5 days) and the run goes on too.
#[tokio::test]
async fn outbox_send_sets_aside_what_the_relay_refuses_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let outbox = tmp.path().join("outbox");
    let spool = kst_bin::server::mailer::SpoolMailer::new(&outbox);
    spool
        .send(&mail(None, "nosuchuser@example.net"))
        .await
        .unwrap();
    spool.send(&mail(None, "bob@acme.net")).await.unwrap();
    let before = files_in(&outbox);
    assert_eq!(before.len(), 2);

    // A relay that answers every RCPT TO with a 4xx: both replies are tried, both stay.
    let soft = Sink::start_with(&["-r", "RCPT"]);
    let out = outbox_send(&outbox_config(tmp.path(), soft.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("0 sent, 0 set aside as .bad, 0 refused, 2 deferred by the relay, 0 left"),
        "{err}"
    );
    // Marked deferred, so that later runs send new replies first.
    let before: Vec<String> = before
        .iter()
        .map(|n| n.replace(".eml", ".deferred.eml"))
        .collect();
    assert_eq!(files_in(&outbox), before);
    // Deferred again: still there, not marked twice.
    let out = outbox_send(&outbox_config(tmp.path(), soft.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 deferred by the relay"), "{err}");
    assert_eq!(files_in(&outbox), before);
    drop(soft);

    // A relay that answers every RCPT TO with a 5xx: both are set aside, none blocks the other.
    let hard = Sink::start_with(&["-f", "RCPT"]);
    let out = outbox_send(&outbox_config(tmp.path(), hard.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("0 sent, 0 set aside as .bad, 2 refused, 0 deferred by the relay, 0 left"),
        "{err}"
    );
    let refused: Vec<String> = before.iter().map(|n| format!("{n}.refused")).collect();
    assert_eq!(files_in(&outbox), refused);
    drop(hard);

    // A reply the relay has deferred for longer than Postfix keeps mail (5 days) is set aside.
    spool.send(&mail(None, "dave@example.org")).await.unwrap();
    let dave = files_in(&outbox)
        .into_iter()
        .find(|n| n.ends_with(".eml"))
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(outbox.join(&dave))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(6 * 86_400))
        .unwrap();
    let soft = Sink::start_with(&["-r", "RCPT"]);
    let out = outbox_send(&outbox_config(tmp.path(), soft.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("0 sent, 0 set aside as .bad, 1 refused, 0 deferred by the relay, 0 left"),
        "{err}"
    );
    let mut all_refused = refused.clone();
    all_refused.push(format!("{dave}.refused"));
    all_refused.sort();
    assert_eq!(files_in(&outbox), all_refused);
    drop(soft);

    // Replies written later go out; what was refused is not sent again.
    let sink = Sink::start();
    spool.send(&mail(None, "carol@example.org")).await.unwrap();
    let out = outbox_send(&outbox_config(tmp.path(), sink.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("1 sent, 0 set aside as .bad, 0 refused"),
        "{err}"
    );
    let dumps = sink.dumps(1);
    assert_eq!(dumps.len(), 1);
    assert!(
        dumps[0].contains("X-Rcpt-Args: <carol@example.org>\n"),
        "{dumps:?}"
    );
    assert_eq!(files_in(&outbox), all_refused);
}

/// A config for `kst deliver` and `kst serve` on an fs store in `dir`, serving example.net,
/// replying through the relay at 127.0.0.1:`port` (`[mailer] kind = "smtp"`), LMTP on
/// 127.0.0.1:`lmtp` and `/metrics` on 127.0.0.1:`http`.
fn smtp_mailer_config(dir: &Path, port: u16, lmtp: u16, http: u16) -> PathBuf {
    let path = dir.join(format!("kst-{port}.toml"));
    std::fs::write(
        &path,
        format!(
            "[kst]\ndomains = [\"example.net\"]\ntrusted_mta_hosts = [\"mail.example.net\"]\n\
             [store]\npath = \"{keys}\"\n\
             [mailer]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout_secs = 20\n\
             [lmtp]\nlisten = \"127.0.0.1:{lmtp}\"\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n",
            keys = dir.join("keys").display(),
        ),
    )
    .unwrap();
    path
}

/// bob@example.org asks for alice@example.net's key: kst answers `not-found` (the store is
/// empty), a reply to bob@example.org.
fn retrieval_request() -> Vec<u8> {
    let p = AddressPolicy::default();
    kst_core::client::build_retrieval(
        &p.normalize("bob@example.org").unwrap(),
        &p.normalize("alice@example.net").unwrap(),
    )
    .message
}

/// Runs `kst deliver` as Postfix's pipe(8) does, the request on stdin.
fn kst_deliver(config: &Path, request: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kst"))
        .args(["--config", config.to_str().unwrap(), "deliver"])
        .args([
            "--sender",
            "bob@example.org",
            "--recipient",
            "keys@example.net",
        ])
        .env_remove("KST_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kst deliver");
    child.stdin.take().unwrap().write_all(request).unwrap();
    child.wait_with_output().unwrap()
}

/// `[mailer] kind = "smtp"`, pipe mode: a relay's 5xx to the reply (its `RCPT TO` or its
/// data) used to defer the request (exit 75), and Postfix asked kst again, which asked the
/// relay again, until the queue lifetime ended. Now that refusal is the relay's last word on
/// the reply: the request is decided (exit 0), the refusal logged with the relay's answer. A
/// 4xx and an unreachable relay stay temporary (exit 75).
#[test]
fn deliver_decides_a_request_whose_reply_the_relay_refuses_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let request = retrieval_request();
    for refuse in ["RCPT", "."] {
        let hard = Sink::start_with(&["-f", refuse]);
        let config = smtp_mailer_config(tmp.path(), hard.port, free_port(), free_port());
        let out = kst_deliver(&config, &request);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "-f {refuse}: {err}");
        assert!(
            err.contains("the relay refused this reply for good"),
            "-f {refuse}: {err}"
        );
        assert!(err.contains("bob@example.org"), "-f {refuse}: {err}");
    }
    let soft = Sink::start_with(&["-r", "RCPT"]);
    let config = smtp_mailer_config(tmp.path(), soft.port, free_port(), free_port());
    let out = kst_deliver(&config, &request);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(!err.contains("refused this reply for good"), "{err}");
    let config = smtp_mailer_config(tmp.path(), free_port(), free_port(), free_port());
    let out = kst_deliver(&config, &request);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("is the relay running"), "{err}");
}

/// A `kst serve` child process, killed when dropped.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    /// Starts `kst serve` with `config`; returns once its `/metrics` listener (`http`) accepts.
    fn start(config: &Path, http: u16) -> Serve {
        let log = config.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_kst"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("KST_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start kst serve");
        let serve = Serve { child, log };
        for _ in 0..1200 {
            if TcpStream::connect(("127.0.0.1", http)).is_ok() {
                return serve;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("kst serve did not listen:\n{}", serve.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One LMTP transaction (bob@example.org to keys@example.net, `message`) with the server on
/// 127.0.0.1:`port`; returns its answer to the data.
fn lmtp_once(port: u16, message: &[u8]) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("an LMTP reply in time");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220 "));
    w.write_all(b"LHLO mail.example.net\r\n").unwrap();
    assert!(reply().starts_with("250"));
    w.write_all(b"MAIL FROM:<bob@example.org>\r\n").unwrap();
    assert!(reply().starts_with("250"));
    w.write_all(b"RCPT TO:<keys@example.net>\r\n").unwrap();
    assert!(reply().starts_with("250"));
    w.write_all(b"DATA\r\n").unwrap();
    assert!(reply().starts_with("354"));
    w.write_all(&kst_bin::bench::lmtp::dot_stuff(message))
        .unwrap();
    let answer = reply();
    let _ = w.write_all(b"QUIT\r\n");
    answer
}

/// The body of `GET /metrics` from 127.0.0.1:`port`.
fn metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// `[mailer] kind = "smtp"`, LMTP (`kst serve`): a relay's 5xx to the reply decides the
/// request (250, counted in `kst_mailer_refused_total`, logged); a 4xx defers it (451), so
/// that Postfix keeps the message and retries.
#[test]
fn serve_decides_a_request_whose_reply_the_relay_refuses_for_good() {
    let tmp = tempfile::tempdir().unwrap();
    let request = retrieval_request();
    let hard = Sink::start_with(&["-f", "RCPT"]);
    let (lmtp, http) = (free_port(), free_port());
    let serve = Serve::start(&smtp_mailer_config(tmp.path(), hard.port, lmtp, http), http);
    let answer = lmtp_once(lmtp, &request);
    assert!(
        answer.starts_with("250 ") && answer.contains("decided: not-found"),
        "{answer}\n{}",
        serve.log()
    );
    let text = metrics(http);
    let refused = text
        .lines()
        .find(|l| l.starts_with("kst_mailer_refused_total{"))
        .unwrap_or_default();
    assert!(refused.contains("code=\"5"), "{text}");
    assert!(refused.ends_with(" 1"), "{text}");
    assert!(
        serve
            .log()
            .contains("the relay refused this reply for good"),
        "{}",
        serve.log()
    );
    drop(serve);

    let soft = Sink::start_with(&["-r", "RCPT"]);
    let (lmtp, http) = (free_port(), free_port());
    let serve = Serve::start(&smtp_mailer_config(tmp.path(), soft.port, lmtp, http), http);
    let answer = lmtp_once(lmtp, &request);
    assert!(answer.starts_with("451 "), "{answer}\n{}", serve.log());
    assert!(
        !metrics(http).contains("kst_mailer_refused_total{"),
        "{}",
        serve.log()
    );
}
