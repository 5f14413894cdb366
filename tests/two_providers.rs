//! Two real providers talking over SMTP (issue 17): example.net and acme.net as two Postfix
//! instances (`scripts/providers.sh`, docs/MAILSYSTEM.md "Two providers"), each on its own
//! loopback address, finding the other's MX in the signed test DNS (`scripts/testdns.sh`), and
//! checking SPF (policyd-spf) and DKIM (OpenDKIM) on what arrives on port 25. kst serves
//! example.net behind its Postfix (pipe or LMTP) and signs its replies with DKIM itself.
//!
//! The real `kst client` does what users do: alice publishes through example.net's submission;
//! carol@acme.net retrieves alice's key relayed through acme.net's submission (acme.net's
//! Postfix looks up example.net's MX and delivers over SMTP) and direct to example.net's MX. The
//! tests assert on what the client prints (the reply proven by K_auth and DKIM, also under
//! `--require-dkim`, the DKIM key DNSSEC-secure) and on the two Postfix logs: the request
//! leaving acme.net for `mail.example.net[127.0.0.1]:25` and arriving there from 127.0.0.2 with
//! SPF checked, the reply leaving example.net for `mail.acme.net[127.0.0.2]:25` and arriving
//! there with SPF (the HELO name: replies have the null sender) and DKIM checked; and that a
//! HELO name whose SPF record does not cover the client is refused, and a reply altered after
//! signing gets `dkim=fail` there.
//!
//! Needs root (Postfix, OpenDKIM, BIND, a second address on lo). Uses the e2e mail system's
//! Dovecot (`/tmp/kst-mail-e2e`) and the shared test DNS.

#[path = "e2e/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{MailSystem, Mode, PATIENCE, Serve, Store, StoreKind, exclusive, repo_root};
use kst_tests::{Gpg, code, kst_binary, run_json, stderr};
use serde_json::Value;

/// The two providers, up in one ingest mode (`scripts/providers.sh up`).
struct Providers {
    env: HashMap<String, String>,
}

impl Providers {
    fn up(mode: Mode, ms: &MailSystem, kst_config: &Path, lmtp_port: u16) -> Providers {
        let mode = match mode {
            Mode::Pipe => "pipe",
            Mode::Lmtp => "lmtp",
            Mode::Pool => panic!("the two providers have no pool mode"),
        };
        let out = Command::new(repo_root().join("scripts/providers.sh"))
            .args(["up", "--mode", mode])
            .env("KST_MAIL_DIR", &ms.dir)
            .env("KST_PROV_KST_CONFIG", kst_config)
            .env("KST_PROV_LMTP_PORT", lmtp_port.to_string())
            .env_remove("KST_PROV_MODE")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/providers.sh");
        assert!(
            out.status.success(),
            "scripts/providers.sh up --mode {mode} failed:\n{}",
            stderr(&out)
        );
        Providers {
            env: kst_tests::export_lines(&out.stdout),
        }
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("providers.sh printed no {key}"))
    }

    /// Where both Postfix logs are now: what a step adds is read from there on.
    fn mark(&self) -> Marks {
        let len = |key| {
            std::fs::metadata(self.var(key))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        Marks {
            example: (
                PathBuf::from(self.var("KST_PROV_EXAMPLE_LOG")),
                len("KST_PROV_EXAMPLE_LOG"),
            ),
            acme: (
                PathBuf::from(self.var("KST_PROV_ACME_LOG")),
                len("KST_PROV_ACME_LOG"),
            ),
        }
    }
}

/// Offsets into the two Postfix logs.
struct Marks {
    example: (PathBuf, u64),
    acme: (PathBuf, u64),
}

/// Which provider's log.
#[derive(Clone, Copy, Debug)]
enum Side {
    Example,
    Acme,
}

impl Marks {
    /// The log lines of `side` written since the mark.
    fn lines(&self, side: Side) -> Vec<String> {
        let (path, from) = match side {
            Side::Example => &self.example,
            Side::Acme => &self.acme,
        };
        let text = std::fs::read(path).unwrap_or_default();
        let from = (*from as usize).min(text.len());
        String::from_utf8_lossy(&text[from..])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until a line of `side` since the mark holds every one of `parts`, and returns it
    /// (Postfix may log a delivery a moment after the mailbox got it).
    fn wait_line(&self, side: Side, parts: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(l) = self
                .lines(side)
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {parts:?} in {side:?}'s Postfix log; since the mark:\n{}",
                self.lines(side).join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The queue id the receiving Postfix gave a message: `... status=sent (250 2.0.0 Ok: queued as
/// ID)`.
fn queued_as(line: &str) -> String {
    line.split("queued as ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no 'queued as' in {line}"))
        .to_string()
}

/// The log lines a test asserts, printed so that a run shows them.
fn show(what: &str, line: &str) {
    eprintln!("{what}:\n  {line}");
}

/// The request crossed from acme.net's Postfix to example.net's over SMTP: acme.net's smtp
/// client delivered it to the MX it looked up, example.net's smtpd got it from acme.net's
/// address with SPF checked for carol@acme.net, and handed it to kst (`kst_relay`).
fn assert_request_crossed(marks: &Marks, kst_relay: &str) {
    let sent = marks.wait_line(
        Side::Acme,
        &[
            "postfix/smtp[",
            "to=<keys@example.net>, relay=mail.example.net[127.0.0.1]:25,",
            "status=sent (250 2.0.0 Ok: queued as ",
        ],
    );
    show(
        "acme.net's smtp client sent the request to example.net's MX",
        &sent,
    );
    let id = queued_as(&sent);
    let client = marks.wait_line(
        Side::Example,
        &[
            "postfix/smtp/smtpd[",
            &format!("{id}: client=unknown[127.0.0.2]"),
        ],
    );
    show(
        "example.net's smtpd received it from acme.net's address",
        &client,
    );
    let spf = marks.wait_line(
        Side::Example,
        &[
            &format!("{id}: info: header Received-SPF: Pass (mailfrom) identity=mailfrom;"),
            "client-ip=127.0.0.2; helo=mail.acme.net; envelope-from=carol@acme.net;",
        ],
    );
    show("example.net checked SPF", &spf);
    let dkim = marks.wait_line(
        Side::Example,
        &[&format!(
            "{id}: milter-header-info: header Authentication-Results: mail.example.net;"
        )],
    );
    show("example.net's OpenDKIM looked at it", &dkim);
    let kst = marks.wait_line(
        Side::Example,
        &[
            &format!("{id}: to=<keys@example.net>, relay={kst_relay}"),
            "status=sent",
        ],
    );
    show("example.net handed it to kst", &kst);
}

/// The header section of the message in `maildir` that the Postfix queue id `id` delivered
/// (its `Received: ... with ESMTPS id ID`), folded lines joined.
fn delivered_headers(maildir: &Path, id: &str) -> String {
    let needle = format!(" id {id}\n");
    for sub in ["new", "cur"] {
        let Ok(dir) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in dir.flatten() {
            let text = String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap_or_default())
                .replace("\r\n", "\n");
            let head = text.split("\n\n").next().unwrap_or_default();
            if head.contains(&needle) {
                return head.replace("\n\t", " ").replace("\n ", " ");
            }
        }
    }
    panic!("no message with queue id {id} in {}", maildir.display());
}

/// The value of the first `name:` header in unfolded `headers`.
fn header<'a>(headers: &'a str, name: &str) -> &'a str {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} header in\n{headers}"))
        .trim()
}

/// kst's reply to carol crossed from example.net's Postfix to acme.net's over SMTP, and
/// acme.net checked SPF (the HELO name `mail.example.net`: the reply has the null sender) and
/// kst's DKIM signature (`dkim=pass` for example.net, selector kst-2p-ed25519) before carol's
/// mailbox (`maildir`) got it. Returns acme.net's queue id of the reply.
fn assert_reply_crossed(marks: &Marks, maildir: &Path) -> String {
    let sent = marks.wait_line(
        Side::Example,
        &[
            "postfix/smtp[",
            "to=<carol@acme.net>, relay=mail.acme.net[127.0.0.2]:25,",
            "status=sent (250 2.0.0 Ok: queued as ",
        ],
    );
    show(
        "example.net's smtp client sent the reply to acme.net's MX",
        &sent,
    );
    let id = queued_as(&sent);
    let client = marks.wait_line(
        Side::Acme,
        &[
            "postfix/smtp/smtpd[",
            &format!("{id}: client=unknown[127.0.0.1]"),
        ],
    );
    show(
        "acme.net's smtpd received it from example.net's address",
        &client,
    );
    let spf = marks.wait_line(
        Side::Acme,
        &[
            &format!(
                "{id}: info: header Received-SPF: Pass (sender SPF authorized) identity=helo;"
            ),
            "client-ip=127.0.0.1; helo=mail.example.net; envelope-from=<>;",
        ],
    );
    show("acme.net checked SPF (HELO, null sender)", &spf);
    // Postfix logs the first 60 characters of a milter's header: the verdict, not the rest.
    let dkim = marks.wait_line(
        Side::Acme,
        &[
            &format!("{id}: milter-header-info: header Authentication-Results: mail.acme.net;"),
            "dkim=pass",
        ],
    );
    show("acme.net's OpenDKIM verified a signature", &dkim);
    let delivered = marks.wait_line(
        Side::Acme,
        &[
            &format!("{id}: to=<carol@acme.net>, relay=mail.acme.net["),
            "dovecot/run/lmtp]",
            "status=sent",
        ],
    );
    show("acme.net delivered it to carol's mailbox", &delivered);
    // The whole header as carol's mailbox has it: kst's signature (d=example.net, kst's
    // selector) is the one that passed, checked by acme.net (its authserv-id).
    let headers = delivered_headers(maildir, &id);
    let ar = header(&headers, "Authentication-Results");
    show("Authentication-Results in carol's mailbox", ar);
    for want in [
        "mail.acme.net;",
        "dkim=pass",
        "header.d=example.net",
        "header.a=ed25519-sha256",
        "header.s=kst-2p-ed25519",
    ] {
        assert!(
            ar.contains(want),
            "{want} not in Authentication-Results: {ar}"
        );
    }
    let spf = header(&headers, "Received-SPF");
    assert!(
        spf.starts_with("Pass (sender SPF authorized) identity=helo;"),
        "{spf}"
    );
    id
}

/// A plain SMTP client for the checks of the receiving side (no TLS, no AUTH).
struct Smtp {
    r: std::io::BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl Smtp {
    /// Connects to `host:port` and returns the greeting too.
    fn connect(host: &str, port: u16) -> (Smtp, String) {
        let w = std::net::TcpStream::connect((host, port)).expect("an SMTP server");
        w.set_read_timeout(Some(PATIENCE)).expect("a read timeout");
        let r = std::io::BufReader::new(w.try_clone().expect("the socket"));
        let mut smtp = Smtp { r, w };
        let greeting = smtp.reply();
        (smtp, greeting)
    }

    /// The last line of the next reply.
    fn reply(&mut self) -> String {
        use std::io::BufRead as _;
        let mut line = String::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).expect("an SMTP reply");
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.trim_end().to_string();
            }
        }
    }

    /// Sends one command and returns the reply.
    fn cmd(&mut self, cmd: &str) -> String {
        use std::io::Write as _;
        self.w
            .write_all(format!("{cmd}\r\n").as_bytes())
            .expect("write to the SMTP server");
        self.reply()
    }

    /// DATA with `message` (CRLF line ends, dots stuffed); returns the final reply.
    fn data(&mut self, message: &str) -> String {
        use std::io::Write as _;
        assert!(self.cmd("DATA").starts_with("354"));
        let mut text = String::new();
        for line in message.replace("\r\n", "\n").lines() {
            if line.starts_with('.') {
                text.push('.');
            }
            text.push_str(line);
            text.push_str("\r\n");
        }
        text.push_str(".\r\n");
        self.w.write_all(text.as_bytes()).expect("write DATA");
        self.reply()
    }
}

/// SPF is enforced, not only written down: a null-sender message to acme.net's MX saying
/// `HELO mail.acme.net` (whose SPF record allows 127.0.0.2 only) from 127.0.0.1 is refused at
/// RCPT. Returns the refusal.
fn assert_spf_enforced() -> String {
    let (mut smtp, greeting) = Smtp::connect("127.0.0.2", 25);
    assert!(greeting.starts_with("220 mail.acme.net"), "{greeting}");
    assert!(smtp.cmd("HELO mail.acme.net").starts_with("250"));
    assert!(smtp.cmd("MAIL FROM:<>").starts_with("250"));
    let refusal = smtp.cmd("RCPT TO:<carol@acme.net>");
    smtp.cmd("QUIT");
    assert!(
        refusal.starts_with("550") && refusal.contains("SPF fail"),
        "{refusal}"
    );
    refusal
}

/// DKIM is verified, not assumed: kst's reply as carol got it (from its DKIM-Signature on),
/// one body line changed, sent again through example.net's relay port to carol; acme.net's
/// OpenDKIM says `dkim=fail` for it. Returns that log line.
fn assert_altered_reply_fails(p: &Providers, maildir: &Path, id: &str, relay_port: u16) -> String {
    let raw = std::fs::read_dir(maildir.join("new"))
        .into_iter()
        .chain(std::fs::read_dir(maildir.join("cur")))
        .flatten()
        .flatten()
        .map(|e| String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default()).into_owned())
        .find(|t| t.contains(&format!(" id {id}")))
        .expect("the delivered reply");
    let signed = &raw[raw.find("DKIM-Signature:").expect("a signature")..];
    let altered = signed.replacen("\n\n", "\n\nAltered on the way.\n", 1);
    let marks = p.mark();
    let (mut smtp, _) = Smtp::connect("127.0.0.1", relay_port);
    assert!(smtp.cmd("HELO mail.example.net").starts_with("250"));
    assert!(smtp.cmd("MAIL FROM:<>").starts_with("250"));
    assert!(smtp.cmd("RCPT TO:<carol@acme.net>").starts_with("250"));
    let queued = smtp.data(&altered);
    smtp.cmd("QUIT");
    assert!(queued.starts_with("250"), "{queued}");
    marks.wait_line(
        Side::Acme,
        &[
            "milter-header-info: header Authentication-Results: mail.acme.net;",
            "dkim=fail",
        ],
    )
}

/// The client verified the reply: HMAC (K_auth) and kst's DKIM signature, the key looked up
/// DNSSEC-secure in the signed test DNS.
fn assert_proven(route: &str, out: &Output, v: &Value) {
    assert_eq!(code(out), 0, "{route}: {v}\n{}", stderr(out));
    assert_eq!(v["proven_by"], "K_auth and DKIM", "{route}: {v}");
    assert_eq!(v["dkim"]["result"], "pass", "{route}: {v}");
    assert_eq!(v["dkim"]["domain"], "example.net", "{route}: {v}");
    assert_eq!(v["dkim"]["selector"], "kst-2p-ed25519", "{route}: {v}");
    assert_eq!(v["dkim"]["dnssec"], "secure", "{route}: {v}");
}

/// One run of the real `kst client --json` as `account`, DNS through the signed test DNS
/// (validating, the test root's anchor), the CAs of the mail system (its IMAP server) and of
/// the certificate the providers present (the one the TLSA records name), that IMAP server.
struct Client<'a> {
    ms: &'a MailSystem,
    p: &'a Providers,
    work: &'a Path,
    sts_port: u16,
}

impl Client<'_> {
    fn run(&self, account: &str, args: &[&str]) -> (Output, Value) {
        let local = account.split('@').next().unwrap_or(account);
        let imap = format!("127.0.0.1:{}", self.ms.imap_port);
        let mut cmd = Command::new(kst_binary());
        cmd.args(["client", "--account", account, "--json"])
            .args(["--client-config", "/dev/null"])
            .args(["--ca-file", self.p.var("KST_PROV_CA")])
            .args(["--resolver", self.p.var("KST_DNS_RESOLVER")])
            .args(["--dns-anchor", self.p.var("KST_DNS_ANCHOR")])
            .arg("--state-file")
            .arg(self.work.join("pending.json"))
            .args(["--timeout", &PATIENCE.as_secs().to_string()])
            .args(["--imap", &imap])
            .args(args)
            .env("KST_PASSWORD", format!("{local}-pw"))
            .env("XDG_CACHE_HOME", self.work.join("cache"))
            // No MTA-STS policy server: the direct hop is authenticated by DANE (the TLSA
            // record of mail.example.net names the mail system's certificate).
            .env("KST_MTA_STS_PORT", self.sts_port.to_string())
            .env_remove("KST_CLIENT_CONFIG")
            .env_remove("KST_ACCOUNT")
            .env_remove("RUST_LOG");
        run_json(cmd)
    }
}

/// alice publishes at example.net; carol@acme.net retrieves her key relayed through acme.net's
/// submission and direct to example.net's MX; every request and reply that crosses from one
/// provider to the other is followed through both Postfix logs.
async fn two_providers(mode: Mode) {
    let _only = exclusive().await;
    let _turn = kst_tests::test_dns_turn();
    let started = Instant::now();
    let ms = MailSystem::up(Mode::Pipe);
    let store = Store::new(StoreKind::Fs, &ms);
    let lmtp_port = kst_tests::serve::free_port().port();
    let config = ms.dir.join("kst").join("two-providers.toml");
    let p = Providers::up(mode, &ms, &config, lmtp_port);
    // kst for example.net behind its Postfix: replies through example.net's relay port,
    // DKIM-signed with the test key under selector kst-2p (published in the test DNS).
    let relay_port = p.var("KST_PROV_RELAY_PORT").parse().expect("a port");
    let toml = ms.kst_toml_for(
        &["example.net"],
        &store.toml,
        relay_port,
        lmtp_port,
        "kst-2p",
    );
    let config = ms.config_file("two-providers", &toml);
    let _serve = match mode {
        Mode::Lmtp => Some(Serve::start(&config, lmtp_port).await),
        _ => None,
    };
    let kst_relay = match mode {
        Mode::Lmtp => format!("127.0.0.1[127.0.0.1]:{lmtp_port},"),
        _ => "kstpipe,".to_string(),
    };
    eprintln!(
        "{mode:?}: mail system and providers up after {:?}",
        started.elapsed()
    );

    let work = tempfile::Builder::new()
        .prefix("kst-2p-")
        .tempdir()
        .expect("temp dir");
    let client = Client {
        ms: &ms,
        p: &p,
        work: work.path(),
        sts_port: kst_tests::serve::free_port().port(),
    };
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let carol_maildir = ms.dir.join("mail/acme.net/carol/Maildir");
    let key_file = work.path().join("alice.asc");
    std::fs::write(&key_file, &alice.public_armored).expect("write alice.asc");

    // alice publishes through example.net's submission and gets her confirmation.
    let t = Instant::now();
    let (out, v) = client.run(
        "alice@example.net",
        &[
            "--submission",
            "mail.example.net:587",
            "--require-dkim",
            "publish",
            "--key",
            key_file.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_proven("publish", &out, &v);
    assert_eq!(v["outcome"], "published", "{v}");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str(), "{v}");
    eprintln!("{mode:?}: publish took {:?}", t.elapsed());

    // Relayed: carol submits to acme.net, whose Postfix relays to example.net's MX.
    let marks = p.mark();
    let t = Instant::now();
    let (out, v) = client.run(
        "carol@acme.net",
        &[
            "--submission",
            "mail.acme.net:587",
            "--require-dkim",
            "retrieve",
            "alice@example.net",
        ],
    );
    assert_proven("relayed", &out, &v);
    assert_eq!(v["outcome"], "found", "{v}");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str(), "{v}");
    eprintln!("{mode:?}: relayed retrieval took {:?}", t.elapsed());
    assert_request_crossed(&marks, &kst_relay);
    let reply_id = assert_reply_crossed(&marks, &carol_maildir);

    // Direct: carol's client looks up example.net's MX (DNSSEC, DANE) and delivers itself;
    // the reply still crosses from example.net to acme.net.
    let marks = p.mark();
    let t = Instant::now();
    let (out, v) = client.run(
        "carol@acme.net",
        &[
            "--require-dkim",
            "retrieve",
            "alice@example.net",
            "--direct",
        ],
    );
    assert_proven("direct", &out, &v);
    assert_eq!(v["outcome"], "found", "{v}");
    assert_eq!(v["dnssec"], "secure", "{v}");
    eprintln!("{mode:?}: direct retrieval took {:?}", t.elapsed());
    // The request came from carol's machine (127.0.0.1), not from acme.net's MTA: SPF for
    // acme.net says softfail there (acme.net publishes ~all for its users' direct sending).
    let spf = marks.wait_line(
        Side::Example,
        &[
            "info: header Received-SPF: Softfail",
            "identity=mailfrom; client-ip=127.0.0.1;",
            "envelope-from=carol@acme.net;",
        ],
    );
    show("example.net checked SPF of the direct request", &spf);
    marks.wait_line(
        Side::Example,
        &[
            "to=<keys@example.net>",
            &format!("relay={kst_relay}"),
            "status=sent",
        ],
    );
    assert_reply_crossed(&marks, &carol_maildir);
    show(
        "acme.net refuses a HELO name whose SPF does not cover the client",
        &assert_spf_enforced(),
    );
    show(
        "acme.net's OpenDKIM fails kst's reply altered after signing",
        &assert_altered_reply_fails(&p, &carol_maildir, &reply_id, relay_port),
    );
    eprintln!("{mode:?}: the whole scenario took {:?}", started.elapsed());
}

#[tokio::test]
async fn pipe_two_providers_over_smtp() {
    two_providers(Mode::Pipe).await;
}

#[tokio::test]
async fn lmtp_two_providers_over_smtp() {
    two_providers(Mode::Lmtp).await;
}
