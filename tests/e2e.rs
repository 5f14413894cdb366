//! kst end to end through a real mail system: Postfix (submission with STARTTLS + SASL, a
//! port-25 stand-in, pipe(8) or LMTP to kst), Dovecot (the users' mailboxes, read over IMAP)
//! and the real `kst` binary, on each store (fs, PostgreSQL, Redis). Needs root: it starts the
//! mail system with `scripts/mailsystem.sh up` (see docs/MAILSYSTEM.md) when it does not run.
//!
//! The honest users of the matrix ({pipe, LMTP} x {fs, PostgreSQL, Redis}) are the real `kst
//! client --json`: alice publishes through example.net's submission (STARTTLS + SASL) and the
//! client reads and verifies the confirmation over IMAP (STARTTLS); carol@acme.net retrieves
//! alice's key relayed through acme.net's submission (implicit TLS, reply over IMAPS) and direct
//! to example.net's MX (looked up through the mail system's dnsmasq, STARTTLS, no AUTH; IMAP
//! found by SRV). The tests assert on the JSON the client prints, on gpg reading the retrieved
//! key, and on the store.
//!
//! The forgery, fault and pool tests craft their messages: requests built with
//! `kst_core::client`, altered where the attack needs it, and sent with mail-send through
//! submission or to the port-25 stand-in; their replies are fetched over IMAP (async-imap,
//! STARTTLS, the test CA) and verified with `kst_core::client::verify_reply`.

#[path = "e2e/harness.rs"]
mod harness;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Output;

use harness::{
    MailSystem, Mode, Serve, Store, StoreKind, addr, exclusive, lmtp_direct, stored_fingerprint,
    stored_history,
};
use kst_core::client::{self, ReplyError, Request, Verified};
use kst_core::protocol::Reason;
use kst_tests::{Gpg, GpgKey, code, gpg_fingerprint_of, stderr};
use serde_json::Value;

/// A mail system in `mode` with a fresh store and, in LMTP mode, a `kst serve`.
struct Setup {
    ms: MailSystem,
    store: Store,
    serve: Option<Serve>,
}

impl Setup {
    async fn new(mode: Mode, kind: StoreKind) -> Setup {
        let ms = MailSystem::up(mode);
        let store = Store::new(kind, &ms);
        ms.install_config(&ms.kst_toml(&store.toml, ms.lmtp_port));
        let serve = match mode {
            Mode::Lmtp => Some(Serve::start(&ms.kst_config, ms.lmtp_port).await),
            _ => None,
        };
        Setup { ms, store, serve }
    }

    fn config(&self) -> PathBuf {
        self.ms.kst_config.clone()
    }
}

fn publication(account: &str, key: &GpgKey) -> Request {
    client::build_publication(&addr(account), &key.public_armored)
        .expect("a gpg key with the account's User ID")
}

fn retrieval(requester: &str, address: &str) -> Request {
    client::build_retrieval(&addr(requester), &addr(address))
}

fn expect_published(r: Result<Verified, ReplyError>, key: &GpgKey) {
    match r {
        Ok(Verified::Published { fingerprint, .. }) => assert_eq!(fingerprint, key.fingerprint),
        other => panic!(
            "expected a verified confirmation of {}: {other:?}",
            key.fingerprint
        ),
    }
}

fn expect_refused(r: Result<Verified, ReplyError>, want: Reason) {
    match r {
        Ok(Verified::Refused {
            reason,
            authenticated,
            explanation,
            ..
        }) => {
            assert_eq!(reason, Some(want), "{explanation}");
            assert!(authenticated, "the refusal carries a verified HMAC");
        }
        other => panic!("expected a refusal ({}): {other:?}", want.as_str()),
    }
}

/// Asserts that `kst client` exited 0 having verified alice's key (`key`) in a reply, and that
/// gpg reads the key it printed as the same key.
fn expect_found(route: &str, out: &Output, v: &Value, key: &GpgKey) {
    assert_eq!(code(out), 0, "{route}: {v}\n{}", stderr(out));
    assert_eq!(v["outcome"], "found", "{route}: {v}");
    assert_eq!(v["fingerprint"], key.fingerprint.as_str(), "{route}");
    let user_ids = v["user_ids"].as_array().expect("user_ids");
    assert!(
        user_ids
            .iter()
            .any(|u| u.as_str().is_some_and(|u| u.contains(&key.address))),
        "{route}: {user_ids:?}"
    );
    // The reply was DKIM-signed by kst and verified by the client through dnsmasq (the test
    // key's record): proven by K_auth and DKIM, also under --require-dkim.
    assert_eq!(v["proven_by"], "K_auth and DKIM", "{route}: {v}");
    assert_eq!(v["dkim"]["result"], "pass", "{route}: {v}");
    assert_eq!(v["dkim"]["domain"], "example.net", "{route}: {v}");
    assert_eq!(v["dkim"]["selector"], "kst-ed25519", "{route}: {v}");
    // The key as retrieved is usable by a real OpenPGP implementation.
    let armored = v["key"].as_str().expect("the armored key");
    assert_eq!(
        gpg_fingerprint_of(armored, &key.address),
        key.fingerprint,
        "{route}"
    );
}

/// alice publishes with `kst client` through submission and the client verifies the
/// confirmation it reads over IMAP; carol@acme.net retrieves her key relayed (acme.net's
/// submission) and direct (example.net's MX, port 25), and gets a verified key each time.
async fn publish_and_retrieve(mode: Mode, kind: StoreKind) {
    let _only = exclusive().await;
    let s = Setup::new(mode, kind).await;
    let work = tempfile::Builder::new()
        .prefix("kst-e2e-client-")
        .tempdir()
        .expect("temp dir");
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let key_file = work.path().join("alice.asc");
    std::fs::write(&key_file, &alice.public_armored).expect("write alice.asc");
    let state = work.path().join("pending.json");

    // Submission with STARTTLS, the confirmation read over IMAP with STARTTLS.
    let submission = format!("mail.example.net:{}", s.ms.submission_port);
    let imap = format!("mail.example.net:{}", s.ms.imap_port);
    let (out, v) = s.ms.client(
        "alice@example.net",
        &state,
        &[
            "--submission",
            &submission,
            "--imap",
            &imap,
            "publish",
            "--key",
            key_file.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_eq!(code(&out), 0, "publish: {v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "published", "{v}");
    assert_eq!(v["proven_by"], "K_auth and DKIM", "{v}");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(v["service"], "keys@example.net");
    assert_eq!(
        stored_fingerprint(&s.config(), "alice@example.net"),
        Some(alice.fingerprint.clone()),
        "the {:?} store holds the key",
        s.store.kind
    );

    // Relayed: carol submits through acme.net's submission (implicit TLS); the key response
    // comes back to her mailbox, read over IMAPS.
    let submissions = format!("smtps://mail.acme.net:{}", s.ms.submissions_port);
    let imaps = format!("imaps://mail.acme.net:{}", s.ms.imaps_port);
    let (out, v) = s.ms.client(
        "carol@acme.net",
        &state,
        &[
            "--submission",
            &submissions,
            "--imap",
            &imaps,
            "--require-dkim",
            "retrieve",
            "alice@example.net",
        ],
    );
    expect_found("relayed", &out, &v, &alice);

    // Direct: example.net's MX looked up through dnsmasq; DNS cannot say that its "port 25" is
    // the stand-in's port, so --mx-port does. carol's IMAP server is found by SRV.
    let smtp_port = s.ms.smtp_port.to_string();
    let (out, v) = s.ms.client(
        "carol@acme.net",
        &state,
        &[
            "retrieve",
            "alice@example.net",
            "--direct",
            "--mx-port",
            &smtp_port,
        ],
    );
    expect_found("direct", &out, &v, &alice);

    // Every reply was read: nothing is left pending.
    let (out, v) = s.ms.client("carol@acme.net", &state, &["pending"]);
    assert_eq!(code(&out), 0, "pending: {v}\n{}", stderr(&out));
    assert_eq!(v, Value::Array(vec![]), "nothing pending");
}

#[tokio::test]
async fn pipe_fs_publish_and_retrieve() {
    publish_and_retrieve(Mode::Pipe, StoreKind::Fs).await;
}

#[tokio::test]
async fn pipe_postgres_publish_and_retrieve() {
    publish_and_retrieve(Mode::Pipe, StoreKind::Postgres).await;
}

#[tokio::test]
async fn pipe_redis_publish_and_retrieve() {
    publish_and_retrieve(Mode::Pipe, StoreKind::Redis).await;
}

#[tokio::test]
async fn lmtp_fs_publish_and_retrieve() {
    publish_and_retrieve(Mode::Lmtp, StoreKind::Fs).await;
}

#[tokio::test]
async fn lmtp_postgres_publish_and_retrieve() {
    publish_and_retrieve(Mode::Lmtp, StoreKind::Postgres).await;
}

#[tokio::test]
async fn lmtp_redis_publish_and_retrieve() {
    publish_and_retrieve(Mode::Lmtp, StoreKind::Redis).await;
}

/// A forged "Postfix wrote this for an authenticated alice" header.
fn forged_received() -> &'static str {
    "Received: from [10.0.0.1] (unknown [10.0.0.1])\r\n\t(Authenticated sender: alice@example.net)\r\n\tby mail.example.net (Postfix) with ESMTPSA id 3F2A1160923\r\n\tfor <keys@example.net>; Mon, 30 Nov 2026 06:00:00 +0000 (UTC)\r\n"
}

/// `message` with `header` put on top.
fn with_header(header: &str, message: &[u8]) -> Vec<u8> {
    let mut m = header.as_bytes().to_vec();
    m.extend_from_slice(message);
    m
}

/// `message` with its From: header naming `from` instead.
fn with_from(message: &[u8], from: &str) -> Vec<u8> {
    let text = String::from_utf8(message.to_vec()).expect("built messages are ASCII");
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    let head: Vec<String> = head
        .split("\r\n")
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("from:") {
                format!("From: <{from}>")
            } else {
                l.to_string()
            }
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

/// Every forgery through the real Postfix is refused and alice's key stays hers.
async fn forgeries(mode: Mode) {
    let _only = exclusive().await;
    let s = Setup::new(mode, StoreKind::Fs).await;
    let alice = Gpg::new().generate("Alice", "alice@example.net", "ed25519");
    // Mallory's own key, with alice's address as its only User ID.
    let mallory = Gpg::new().generate("Alice (not really)", "alice@example.net", "ed25519");

    let genuine = publication("alice@example.net", &alice);
    s.ms.submit_request("alice@example.net", &genuine).await;
    expect_published(
        s.ms.reply("alice@example.net", &genuine.pending).await,
        &alice,
    );

    // 1. Unauthenticated, on port 25, with a Received: header claiming alice authenticated.
    //    Postfix puts its own Received: on top; kst trusts only that one (with ESMTP, no AUTH).
    let fake = publication("alice@example.net", &mallory);
    s.ms.send_direct(
        "mx.evil.example",
        "alice@example.net",
        "keys@example.net",
        &with_header(forged_received(), &fake.message),
    )
    .await
    .expect("port 25 accepts it: kst must refuse it");
    expect_refused(
        s.ms.reply("alice@example.net", &fake.pending).await,
        Reason::NotAuthenticated,
    );

    // 2a. bob authenticated with alice's envelope sender: Postfix refuses it
    //     (reject_sender_login_mismatch), kst never sees it.
    let as_alice = publication("alice@example.net", &mallory);
    let err =
        s.ms.submit(
            "bob@example.net",
            "alice@example.net",
            "keys@example.net",
            &as_alice.message,
        )
        .await
        .expect_err("Postfix refuses MAIL FROM alice for login bob");
    assert!(
        err.to_string().contains("553"),
        "Postfix's reject_sender_login_mismatch answers 553: {err}"
    );
    // 2b. bob authenticated, his own envelope sender, From: alice: Postfix passes it (the
    //     header is not its business), kst refuses it (sender-mismatch) and tells bob.
    s.ms.submit(
        "bob@example.net",
        "bob@example.net",
        "keys@example.net",
        &as_alice.message,
    )
    .await
    .expect("Postfix passes bob's own envelope sender");
    expect_refused(
        s.ms.reply("bob@example.net", &as_alice.pending).await,
        Reason::SenderMismatch,
    );

    // 3. bob authenticated, From: bob, a key whose only User ID is alice's: no-matching-user-id.
    let bobs = publication("alice@example.net", &mallory);
    s.ms.submit(
        "bob@example.net",
        "bob@example.net",
        "keys@example.net",
        &with_from(&bobs.message, "bob@example.net"),
    )
    .await
    .expect("submission by bob");
    expect_refused(
        s.ms.reply("bob@example.net", &bobs.pending).await,
        Reason::NoMatchingUserId,
    );

    // 4. A HELO that imitates the trusted host, on port 25.
    let helo = publication("alice@example.net", &mallory);
    s.ms.send_direct(
        "mail.example.net",
        "alice@example.net",
        "keys@example.net",
        &helo.message,
    )
    .await
    .expect("port 25 accepts any HELO");
    expect_refused(
        s.ms.reply("alice@example.net", &helo.pending).await,
        Reason::NotAuthenticated,
    );

    // 5. (LMTP) Straight to kst's LMTP port from outside [lmtp] allow (127.0.0.1/32), with the
    //    header Postfix would have written: refused at the greeting.
    if mode == Mode::Lmtp {
        let direct = publication("alice@example.net", &mallory);
        let err = lmtp_direct(
            s.ms.tls(),
            Ipv4Addr::new(127, 0, 0, 2),
            s.ms.lmtp_port,
            "alice@example.net",
            "keys@example.net",
            &with_header(forged_received(), &direct.message),
        )
        .await
        .expect_err("kst refuses LMTP peers outside [lmtp] allow");
        assert!(err.to_string().contains("554"), "554 5.7.1: {err}");
        let log = s.serve.as_ref().expect("kst serve").log_text();
        assert!(
            log.contains("REFUSED LMTP connection from 127.0.0.2"),
            "kst logs the refused peer:\n{log}"
        );
    }

    assert_eq!(
        stored_history(&s.config(), "alice@example.net"),
        vec![alice.fingerprint.clone()],
        "only alice's own publication was stored"
    );
}

#[tokio::test]
async fn pipe_forgeries_are_refused() {
    forgeries(Mode::Pipe).await;
}

#[tokio::test]
async fn lmtp_forgeries_are_refused() {
    forgeries(Mode::Lmtp).await;
}

/// Sends alice's publication while kst is unavailable and waits until Postfix defers it;
/// returns the queue id, the key and the request. `store_config` reaches the store.
async fn publish_while_down(
    s: &Setup,
    why: &str,
    store_config: &std::path::Path,
) -> (String, GpgKey, Request) {
    let alice = Gpg::new().generate("Alice", "alice@example.net", "ed25519");
    let before = s.ms.queue_ids();
    let req = publication("alice@example.net", &alice);
    s.ms.submit_request("alice@example.net", &req).await;
    let (id, reason) =
        s.ms.deferred("alice@example.net", "keys@example.net", &before)
            .await;
    eprintln!("{why}: Postfix deferred {id}: {reason}");
    assert!(
        s.ms.imap_replies("alice@example.net", &req.pending.message_id)
            .await
            .is_empty(),
        "no reply while kst is unavailable"
    );
    assert_eq!(stored_fingerprint(store_config, "alice@example.net"), None);
    (id, alice, req)
}

/// Once kst is back: `postqueue -f`, and the publication is confirmed, stored, and gone from
/// the queue.
async fn delivered_after_flush(s: &Setup, id: &str, alice: &GpgKey, req: &Request) {
    s.ms.flush();
    expect_published(s.ms.reply("alice@example.net", &req.pending).await, alice);
    assert_eq!(
        stored_fingerprint(&s.config(), "alice@example.net"),
        Some(alice.fingerprint.clone())
    );
    let deadline = std::time::Instant::now() + harness::PATIENCE;
    while s.ms.queued(id) {
        assert!(
            std::time::Instant::now() < deadline,
            "{id} is still queued after its delivery: {:?}",
            s.ms.queue()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// LMTP: `kst serve` is down (killed); Postfix defers; kst starts again; flush; nothing lost.
#[tokio::test]
async fn lmtp_kst_down_mail_waits_in_postfix() {
    let _only = exclusive().await;
    let mut s = Setup::new(Mode::Lmtp, StoreKind::Postgres).await;
    s.serve.as_mut().expect("kst serve").kill();
    let (id, alice, req) = publish_while_down(&s, "kst serve stopped", &s.config()).await;
    s.serve = Some(Serve::start(&s.ms.kst_config, s.ms.lmtp_port).await);
    delivered_after_flush(&s, &id, &alice, &req).await;
}

/// pipe: the store is unreachable, `kst deliver` exits 75; Postfix defers; the store is back
/// (config restored); flush; nothing lost.
#[tokio::test]
async fn pipe_store_down_mail_waits_in_postfix() {
    let _only = exclusive().await;
    let s = Setup::new(Mode::Pipe, StoreKind::Redis).await;
    let good = s.ms.kst_toml(&s.store.toml, s.ms.lmtp_port);
    let good_file = s.ms.config_file("store-up", &good);
    // Nothing listens on port 1: the store is unavailable.
    s.ms.install_config(&s.ms.kst_toml(
        "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"",
        s.ms.lmtp_port,
    ));
    let (id, alice, req) = publish_while_down(&s, "store unreachable", &good_file).await;
    s.ms.install_config(&good);
    delivered_after_flush(&s, &id, &alice, &req).await;
}

/// The pool: three `kst serve` instances (one PostgreSQL) behind Postfix's list of LMTP next
/// hops. The first takes the load until it is killed (SIGKILL) with mail in flight; the rest of
/// the load goes to the next one. Every publication ends in a stored key and a verified
/// confirmation, every retrieval in a verified key.
#[tokio::test]
// `round` picks the key of every user in turn; an iterator would hide that.
#[allow(clippy::needless_range_loop)]
async fn pool_of_three_survives_killing_one_mid_load() {
    let _only = exclusive().await;
    let ms = MailSystem::up(Mode::Pool);
    let store = Store::new(StoreKind::Postgres, &ms);
    assert_eq!(ms.pool_ports.len(), 3);
    let mut pool = Vec::new();
    for (i, port) in ms.pool_ports.iter().enumerate() {
        let toml = ms.kst_toml(&store.toml, *port);
        if i == 0 {
            ms.install_config(&toml); // for `kst keys`
        }
        let config = ms.config_file(&format!("pool-{i}"), &toml);
        pool.push(Serve::start(&config, *port).await);
    }

    // Two keys per user before the kill, two after.
    let users = ["alice@example.net", "bob@example.net", "carol@acme.net"];
    let gpg: Vec<Gpg> = users.iter().map(|_| Gpg::new()).collect();
    let mut keys: Vec<Vec<GpgKey>> = vec![Vec::new(); users.len()];
    let mut sent: Vec<(usize, GpgKey, Request)> = Vec::new();
    for round in 0..4 {
        for (u, user) in users.iter().enumerate() {
            let k = gpg[u].generate(&format!("{user} #{round}"), user, "ed25519");
            keys[u].push(k);
        }
    }

    for round in 0..2 {
        for (u, user) in users.iter().enumerate() {
            let req = publication(user, &keys[u][round]);
            ms.submit_request(user, &req).await;
            sent.push((u, keys[u][round].clone(), req));
        }
    }
    // Kill the first instance as soon as it has handled a message, with the rest in flight.
    let deadline = std::time::Instant::now() + harness::PATIENCE;
    while pool[0].handled() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first instance handled nothing:\n{}",
            pool[0].log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    pool[0].kill();
    let handled_by_first = pool[0].handled();

    for round in 2..4 {
        for (u, user) in users.iter().enumerate() {
            let req = publication(user, &keys[u][round]);
            ms.submit_request(user, &req).await;
            sent.push((u, keys[u][round].clone(), req));
        }
    }
    let mut retrievals = Vec::new();
    for (u, user) in users.iter().enumerate() {
        let req = retrieval("carol@acme.net", user);
        ms.submit_request("carol@acme.net", &req).await;
        retrievals.push((u, req));
    }

    for (u, key, req) in &sent {
        expect_published(ms.reply(users[*u], &req.pending).await, key);
    }
    for (u, req) in &retrievals {
        match ms.reply("carol@acme.net", &req.pending).await {
            Ok(Verified::Found { fingerprint, .. }) => assert!(
                keys[*u].iter().any(|k| k.fingerprint == fingerprint),
                "{fingerprint} is one of {}'s keys",
                users[*u]
            ),
            other => panic!("expected {}'s key: {other:?}", users[*u]),
        }
    }
    for (u, user) in users.iter().enumerate() {
        let history = stored_history(&ms.kst_config, user);
        for k in &keys[u] {
            assert!(
                history.contains(&k.fingerprint),
                "{user}'s history {history:?} lacks {}",
                k.fingerprint
            );
        }
    }
    let counts: Vec<usize> = pool.iter().map(Serve::handled).collect();
    eprintln!(
        "pool: messages handled per instance {counts:?} (the first was killed after {handled_by_first}); {} publications, {} retrievals",
        sent.len(),
        retrievals.len()
    );
    assert!(
        counts[1] + counts[2] > 0,
        "the surviving instances took the load after the kill"
    );
}

/// Sends `message` from `sender` to the port-25 stand-in, one `RCPT TO` per (address, ESMTP
/// parameters) of `rcpts` (each must be accepted); returns Postfix's queue id.
fn send_raw(ms: &MailSystem, sender: &str, rcpts: &[(&str, &str)], message: &[u8]) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let stream = std::net::TcpStream::connect(("127.0.0.1", ms.smtp_port)).expect("connect");
    stream
        .set_read_timeout(Some(harness::PATIENCE))
        .expect("timeout");
    let mut w = stream.try_clone().expect("clone");
    let mut r = BufReader::new(stream);
    let mut reply = |want: &str| {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("an SMTP reply");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        assert!(all.starts_with(want), "expected {want}, got {all:?}");
        all
    };
    reply("220");
    w.write_all(b"EHLO mx.acme.net\r\n").expect("write");
    reply("250");
    w.write_all(format!("MAIL FROM:<{sender}>\r\n").as_bytes())
        .expect("write");
    reply("250");
    for (rcpt, params) in rcpts {
        w.write_all(format!("RCPT TO:<{rcpt}>{params}\r\n").as_bytes())
            .expect("write");
        reply("250");
    }
    w.write_all(b"DATA\r\n").expect("write");
    reply("354");
    w.write_all(&kst_bin::bench::lmtp::dot_stuff(message))
        .expect("write");
    let queued = reply("250");
    let _ = w.write_all(b"QUIT\r\n");
    queued
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("a queue id")
        .to_string()
}

/// Waits until Postfix has finished the message `id` (its `removed` line); returns the log.
async fn postfix_log_after(ms: &MailSystem, id: &str) -> String {
    let log_path = ms.dir.join("postfix.log");
    let deadline = std::time::Instant::now() + harness::PATIENCE;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains(&format!("{id}: removed")) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Postfix did not finish {id}:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A retrieval whose envelope sender the provider's own Postfix does not know
/// (`nosuchuser@example.net`), replies through that Postfix (`[mailer] kind = "smtp"`): the
/// relay refuses the reply's `RCPT TO` with `550 5.1.1 ... User unknown`. That used to defer
/// the request (exit 75 / 451), and Postfix offered it to kst again and again for its whole
/// queue lifetime, each time asking the relay again. Now the request is decided at once:
/// Postfix's delivery to kst is `status=sent` and the message leaves the queue.
async fn a_reply_the_relay_refuses_for_good_decides_the_request(mode: Mode) {
    let _guard = exclusive().await;
    let s = Setup::new(mode, StoreKind::Fs).await;
    let request = retrieval("nosuchuser@example.net", "alice@example.net");
    let id = send_raw(
        &s.ms,
        "nosuchuser@example.net",
        &[("keys@example.net", "")],
        &request.message,
    );
    let log = postfix_log_after(&s.ms, &id).await;
    let to_kst: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("{id}: to=<keys@example.net>")))
        .collect();
    assert_eq!(to_kst.len(), 1, "{to_kst:#?}");
    assert!(to_kst[0].contains("status=sent"), "{to_kst:#?}");
    assert!(
        log.contains("<nosuchuser@example.net>: Recipient address rejected"),
        "the relay refused the reply:\n{log}"
    );
    if let Some(serve) = &s.serve {
        assert!(
            serve
                .log_text()
                .contains("the relay refused this reply for good"),
            "{}",
            serve.log_text()
        );
    }
}

#[tokio::test]
async fn pipe_a_reply_the_relay_refuses_for_good_decides_the_request() {
    a_reply_the_relay_refuses_for_good_decides_the_request(Mode::Pipe).await;
}

#[tokio::test]
async fn lmtp_a_reply_the_relay_refuses_for_good_decides_the_request() {
    a_reply_the_relay_refuses_for_good_decides_the_request(Mode::Lmtp).await;
}

/// Red team round 8 left this open: pipe mode runs one `kst deliver` per recipient
/// (`kstpipe_destination_recipient_limit = 1`), and one message may name `keys@` up to
/// `smtpd_recipient_limit` (1,000) times. Postfix's duplicate filter already merges spellings
/// that differ only in case (`KEYS@`, `Keys@EXAMPLE.NET`), but it compares the original
/// recipient and the DSN parameters too, so a quoted local part, a trailing dot, and each
/// `ORCPT=` or `NOTIFY=` made one more recipient and one more `kst deliver` (7 for the
/// recipients below on Postfix 3.7). With `enable_original_recipient = no`
/// (deploy/postfix/main.cf.snippet) the filter compares the final address only: Postfix runs
/// `kst deliver` once for the message.
#[tokio::test]
async fn pipe_one_message_to_keys_in_many_spellings_runs_kst_deliver_once() {
    let _guard = exclusive().await;
    let s = Setup::new(Mode::Pipe, StoreKind::Fs).await;
    let request = retrieval("bob@example.net", "alice@example.net");
    let rcpts = [
        ("keys@example.net", ""),
        ("KEYS@example.net", ""),
        ("Keys@EXAMPLE.NET", ""),
        ("\"keys\"@example.net", ""),
        ("keys@example.net.", ""),
        ("keys@example.net", " ORCPT=rfc822;a@example.org"),
        ("keys@example.net", " ORCPT=rfc822;b@example.org"),
        ("keys@example.net", " NOTIFY=NEVER"),
        ("keys@example.net", " NOTIFY=SUCCESS,FAILURE"),
    ];
    let id = send_raw(&s.ms, "bob@example.net", &rcpts, &request.message);
    let log = postfix_log_after(&s.ms, &id).await;
    let deliveries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("{id}: to=<")) && l.contains("relay=kstpipe"))
        .collect();
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    assert!(
        deliveries[0].contains("to=<keys@example.net>") && deliveries[0].contains("status=sent"),
        "{deliveries:#?}"
    );
    // One recipient left after the duplicate filter, in the queue file itself.
    let queued = format!("{id}: from=<bob@example.net>, size=");
    assert!(
        log.lines()
            .any(|l| l.contains(&queued) && l.contains(", nrcpt=1 ")),
        "{log}"
    );
}
