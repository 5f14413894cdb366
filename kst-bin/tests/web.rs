//! The `[web]` listener over a real TCP socket: WKD (both methods, at the URLs gpg-wks-client
//! prints), VKS and HKP, limits, forwarding headers, metrics and TLS with certificate reload.
//! Keys are the gpg-made test keys, validated and published into a real filesystem store; the
//! fingerprint and key ID look-ups scan that store (phase 2 gives the stores an index).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kst_bin::server::web::{WebConfig, WebLimits};
use kst_core::ratelimit::Hit;
use kst_core::{KeyStore, NewKey, RateLimiter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod web_fixture;
use web_fixture::{
    Server, addr, alice_store, now, open, publish, serve_store, serve_store_counting, testkey,
};

const DOMAINS: [&str; 3] = ["example.net", "personal.example", "elsewhere.example"];

async fn start(config: WebConfig) -> Server {
    let (dir, store) = alice_store().await;
    // The same key for a second address, stored with all three User IDs (as an import could
    // hold it): WKD must serve only this address's User ID.
    let full = kst_core::openpgp::parse_armored(&testkey("alice.pub.asc"), 1 << 20).unwrap();
    restore(
        &store,
        "alice@personal.example",
        full.packets,
        &full.fingerprint,
    )
    .await;
    serve_store((dir, store), &DOMAINS, config).await
}

/// Puts `key` into `store` as it is (no key policy: as `kst import` restores a record, or a
/// hand-edited backend holds it), version 1 of `address`, recorded under `fingerprint`.
async fn restore(store: &kst_fs::FsStore, address: &str, key: Vec<u8>, fingerprint: &str) {
    let local = address.split('@').next().unwrap_or(address);
    store
        .restore(&[NewKey {
            address: addr(address),
            key,
            fingerprint: kst_core::Fingerprint::parse(fingerprint).unwrap(),
            publication_id: local.into(),
            published_at: now(),
            revoked: false,
            expected: kst_core::Expected::Any,
        }
        .into_record(1)])
        .await
        .unwrap();
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on `stream`, `Connection: close`, read to the end.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    host: &str,
    target: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

async fn get(s: &Server, host: &str, target: &str) -> Reply {
    request(s, "GET", host, target, &[]).await
}

async fn request(
    s: &Server,
    method: &str,
    host: &str,
    target: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    exchange(tcp, method, host, target, extra).await
}

/// The URL gpg asks for (advanced method), split into host and path+query.
fn gpg_wkd_url(address: &str) -> (String, String) {
    let out = Command::new("/usr/lib/gnupg/gpg-wks-client")
        .args(["--print-wkd-url", address])
        .output()
        .expect("gpg-wks-client is part of the test environment");
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let rest = url.strip_prefix("https://").expect(&url);
    let (host, path) = rest.split_once('/').unwrap();
    (host.to_string(), format!("/{path}"))
}

/// `gpg --with-colons` listing of the key material in `bytes` (binary or armored).
fn gpg_list(bytes: &[u8]) -> Vec<Vec<String>> {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("key");
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args([
            "--batch",
            "--with-colons",
            "--import-options",
            "show-only",
            "--import",
        ])
        .arg(&file)
        .output()
        .expect("gpg is part of the test environment");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

fn fields<'a>(listing: &'a [Vec<String>], kind: &str, index: usize) -> Vec<&'a str> {
    listing
        .iter()
        .filter(|r| r[0] == kind)
        .map(|r| r[index].as_str())
        .collect()
}

const ALICE_FPR: &str = "637895003B05333E2D3782F2EE62CCF91EB2D657";
const ALICE_SUB_FPR: &str = "436DE0697AB947804B2EB9219BFD1A0722FF4E8F";

#[tokio::test]
async fn wkd_both_methods_serve_the_binary_key_gpg_asks_for() {
    let s = start(open()).await;
    let (host, target) = gpg_wkd_url("alice@example.net");
    assert_eq!(host, "openpgpkey.example.net");
    assert!(target.ends_with("?l=alice"), "{target}");
    let adv = get(&s, &host, &target).await;
    assert_eq!(adv.status, 200, "{}", adv.text());
    assert_eq!(adv.header("content-type"), Some("application/octet-stream"));
    assert_eq!(adv.header("access-control-allow-origin"), Some("*"));
    assert!(adv.header("cache-control").unwrap().contains("max-age="));
    assert!(!adv.body.starts_with(b"-----"), "binary, not armored");
    let listing = gpg_list(&adv.body);
    assert_eq!(fields(&listing, "fpr", 9)[0], ALICE_FPR);
    assert_eq!(fields(&listing, "uid", 9), ["alice <alice@example.net>"]);

    // The direct method: same hash, on the domain itself, with and without l=.
    let hash = target
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let direct = get(
        &s,
        "example.net",
        &format!("/.well-known/openpgpkey/hu/{hash}?l=alice"),
    )
    .await;
    assert_eq!(direct.status, 200);
    assert_eq!(direct.body, adv.body);
    let no_l = get(
        &s,
        "example.net",
        &format!("/.well-known/openpgpkey/hu/{hash}"),
    )
    .await;
    assert_eq!(no_l.status, 200, "the hash alone finds the key");
    assert_eq!(no_l.body, adv.body);
    // A lying l= does not change what the hash names.
    let lying = get(
        &s,
        "example.net",
        &format!("/.well-known/openpgpkey/hu/{hash}?l=bob"),
    )
    .await;
    assert_eq!(lying.body, adv.body);
}

#[tokio::test]
async fn wkd_serves_only_the_user_id_of_the_address_asked_for() {
    let s = start(open()).await;
    let (host, target) = gpg_wkd_url("alice@personal.example");
    let r = get(&s, &host, &target).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listing = gpg_list(&r.body);
    assert_eq!(
        fields(&listing, "uid", 9),
        ["Alice Private <alice@personal.example>"]
    );
    assert_eq!(
        fields(&listing, "fpr", 9),
        [ALICE_FPR, ALICE_SUB_FPR],
        "subkey kept"
    );
    // VKS by-email serves the stored certificate as it is.
    let v = get(
        &s,
        "keys.example",
        "/vks/v1/by-email/alice@personal.example",
    )
    .await;
    assert_eq!(v.status, 200);
    assert_eq!(fields(&gpg_list(&v.body), "uid", 9).len(), 3);
}

#[tokio::test]
async fn head_etag_and_misses() {
    let s = start(open()).await;
    let (host, target) = gpg_wkd_url("alice@example.net");
    let g = get(&s, &host, &target).await;
    let etag = g.header("etag").unwrap().to_string();
    let h = request(&s, "HEAD", &host, &target, &[]).await;
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(h.header("etag"), Some(etag.as_str()));
    assert_eq!(
        h.header("content-length"),
        Some(g.body.len().to_string().as_str())
    );
    let cached = request(&s, "GET", &host, &target, &[("If-None-Match", &etag)]).await;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());

    let (host, target) = gpg_wkd_url("nobody@example.net");
    let miss = get(&s, &host, &target).await;
    assert_eq!(miss.status, 404);
    assert_eq!(
        miss.header("cache-control"),
        Some("no-store"),
        "a miss is not cached"
    );
    assert_eq!(miss.header("access-control-allow-origin"), Some("*"));
    for (host, path) in [
        ("example.net", "/.well-known/openpgpkey/hu/"),
        ("example.net", "/.well-known/openpgpkey/"),
        (
            "openpgpkey.example.net",
            "/.well-known/openpgpkey/example.net/hu/",
        ),
        (
            "openpgpkey.example.net",
            "/.well-known/openpgpkey/example.net/",
        ),
        ("example.net", "/.well-known/openpgpkey/hu/not-a-hash"),
        ("other.org", &target.replace("example.net", "other.org")),
        // The advanced path on the wrong host.
        ("example.net", target.as_str()),
        ("example.net", "/"),
        ("example.net", "/pks/add"),
    ] {
        let r = get(&s, host, path).await;
        assert_eq!(r.status, 404, "{host} {path}");
    }
    let post = request(
        &s,
        "POST",
        "example.net",
        "/pks/lookup?op=get&search=x",
        &[("Content-Length", "0")],
    )
    .await;
    assert_eq!(post.status, 405, "no upload, no other methods");
}

#[tokio::test]
async fn policy_and_submission_address_on_both_forms() {
    let s = start(open()).await;
    for (host, prefix) in [
        ("example.net", "/.well-known/openpgpkey".to_string()),
        (
            "openpgpkey.example.net",
            "/.well-known/openpgpkey/example.net".to_string(),
        ),
    ] {
        let p = get(&s, host, &format!("{prefix}/policy")).await;
        assert_eq!(p.status, 200, "{host}");
        let text = p.text();
        let flags: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            flags,
            ["mailbox-only", "auth-submit", "protocol-version: 5"],
            "{host}: {text}"
        );
        let a = get(&s, host, &format!("{prefix}/submission-address")).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.text(), "keys@example.net\n");
    }
    assert_eq!(
        get(&s, "unserved.org", "/.well-known/openpgpkey/policy")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn vks_by_email_fingerprint_and_key_id() {
    let s = start(open()).await;
    for target in [
        "/vks/v1/by-email/alice@example.net".to_string(),
        "/vks/v1/by-email/Alice%40Example.NET".to_string(),
        format!("/vks/v1/by-fingerprint/{ALICE_FPR}"),
        format!("/vks/v1/by-fingerprint/{ALICE_SUB_FPR}"),
        format!("/vks/v1/by-keyid/{}", &ALICE_FPR[24..]),
        format!("/vks/v1/by-keyid/{}", &ALICE_SUB_FPR[24..]),
    ] {
        let r = get(&s, "keys.example", &target).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/pgp-keys"));
        assert!(r.text().starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
        let listing = gpg_list(&r.body);
        assert_eq!(fields(&listing, "pub", 4), [&ALICE_FPR[24..]], "{target}");
    }
    // The key is published for two addresses: a fingerprint look-up serves one certificate with
    // the User IDs of both (merged), which gpg reads as one key.
    let merged = get(
        &s,
        "keys.example",
        &format!("/vks/v1/by-fingerprint/{ALICE_FPR}"),
    )
    .await;
    let mut uids = fields(&gpg_list(&merged.body), "uid", 9)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    uids.sort();
    assert!(
        uids.contains(&"alice <alice@example.net>".to_string()),
        "{uids:?}"
    );
    assert!(
        uids.contains(&"Alice Private <alice@personal.example>".to_string()),
        "{uids:?}"
    );
    for (target, status) in [
        ("/vks/v1/by-fingerprint/1234", 400),
        ("/vks/v1/by-keyid/1EB2D657", 400),
        ("/vks/v1/by-email/nobody@example.net", 404),
        ("/vks/v1/by-email/alice@unserved.org", 404),
        (
            "/vks/v1/by-fingerprint/0000000000000000000000000000000000000000",
            404,
        ),
    ] {
        assert_eq!(
            get(&s, "keys.example", target).await.status,
            status,
            "{target}"
        );
    }
}

#[tokio::test]
async fn hkp_get_and_machine_readable_index_exact_only() {
    let s = start(open()).await;
    let r = get(
        &s,
        "keys.example",
        &format!("/pks/lookup?op=get&options=mr&search=0x{ALICE_FPR}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fields(&gpg_list(&r.body), "fpr", 9)[0], ALICE_FPR);
    let idx = get(
        &s,
        "keys.example",
        "/pks/lookup?op=index&options=mr&search=alice%40example.net",
    )
    .await;
    assert_eq!(idx.status, 200);
    let text = idx.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "info:1:1", "{text}");
    assert!(
        lines[1].starts_with(&format!("pub:{ALICE_FPR}:22:255:1735689600::")),
        "{text}"
    );
    assert_eq!(
        lines[2], "uid:alice <alice@example.net>:1735689600::",
        "{text}"
    );
    for target in [
        "/pks/lookup?op=index&options=mr&search=alice",
        "/pks/lookup?op=index&options=mr&search=example.net",
        "/pks/lookup?op=get&search=alice%25",
        "/pks/lookup?op=get&search=nobody%40example.net",
    ] {
        assert_eq!(
            get(&s, "keys.example", target).await.status,
            404,
            "{target}"
        );
    }
    assert_eq!(
        get(&s, "keys.example", "/pks/lookup?op=stats").await.status,
        501
    );
    assert_eq!(
        get(&s, "keys.example", "/pks/lookup?op=get").await.status,
        400
    );
}

#[tokio::test]
async fn requests_over_the_client_limit_get_429_with_retry_after() {
    let s = start(WebConfig {
        limits: WebLimits {
            per_client: 3,
            ..WebLimits::OFF
        },
        ..WebConfig::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&s, "example.net", "/.well-known/openpgpkey/policy")
                .await
                .status,
            200
        );
    }
    let r = get(&s, "example.net", "/.well-known/openpgpkey/policy").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("600"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
}

/// The filesystem store's own counters, answering only while the gate is open (a stalled
/// store), counting the writes that reached them and those answered.
struct GatedCounters {
    store: Arc<kst_fs::FsStore>,
    open: tokio::sync::watch::Receiver<bool>,
    started: AtomicUsize,
    answered: AtomicUsize,
}

#[async_trait::async_trait]
impl RateLimiter for GatedCounters {
    fn name(&self) -> &'static str {
        "gated-fs"
    }
    async fn hit(&self, key: &str, limit: u32, window: Duration) -> kst_core::Result<bool> {
        let v = self.hit_many(&[Hit::new(key, limit, window)]).await?;
        Ok(v.first().copied().unwrap_or(false))
    }
    async fn hit_many(&self, hits: &[Hit]) -> kst_core::Result<Vec<bool>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _ = self.open.clone().wait_for(|o| *o).await;
        let v = self.store.hit_many(hits).await;
        self.answered.fetch_add(1, Ordering::SeqCst);
        v
    }
}

/// Reserving ahead (`server::web::precount`), through the real listener and the filesystem
/// store's counters: a client's requests after its first are answered from the batches written
/// ahead, without waiting for the counters (stalled here while the client asks: a request
/// that wrote would wait at the gate), and at its limit the client is refused with 429 within
/// the documented bound (the limit, a multiple of the batch here, and fewer than a batch
/// more), after which it does not write to the counters again.
#[tokio::test]
async fn a_clients_requests_after_its_first_do_not_wait_for_the_counters() {
    use kst_bin::server::web::precount::BATCH;
    let (dir, store) = alice_store().await;
    let (gate, open) = tokio::sync::watch::channel(true);
    let counters = Arc::new(GatedCounters {
        store: Arc::clone(&store),
        open,
        started: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
    });
    let limit = 8 * BATCH;
    let s = serve_store_counting(
        (dir, store),
        &DOMAINS,
        WebConfig {
            limits: WebLimits {
                per_client: limit,
                ..WebLimits::OFF
            },
            ..WebConfig::default()
        },
        counters.clone(),
    )
    .await;
    const POLICY: &str = "/.well-known/openpgpkey/policy";
    // The first request writes a batch and waits for it; the one that leaves half of it
    // writes the next one ahead.
    for _ in 0..BATCH / 2 {
        assert_eq!(get(&s, "example.net", POLICY).await.status, 200);
    }
    while counters.answered.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            counters.started.load(Ordering::SeqCst),
            2,
            "the next batch is written ahead"
        );
    }
    // The store stalls. What the client holds, the rest of its batch and the batch written
    // ahead, answers its next requests; the one that leaves half a batch (the 12th) writes
    // the next batch ahead, which waits at the gate. A request that wrote would wait at the
    // gate too, one more write waiting there.
    gate.send_replace(false);
    let mut admitted = BATCH / 2;
    for n in (BATCH / 2 + 1)..=(2 * BATCH) {
        let ahead = usize::from(n >= BATCH / 2 + BATCH);
        let mut reply = std::pin::pin!(get(&s, "example.net", POLICY));
        let reply = loop {
            tokio::select! {
                r = &mut reply => break r,
                () = tokio::time::sleep(Duration::from_millis(1)) => assert!(
                    counters.started.load(Ordering::SeqCst)
                        - counters.answered.load(Ordering::SeqCst)
                        <= ahead,
                    "request {n} waits for the stalled counters"
                ),
            }
        };
        assert_eq!(reply.status, 200);
        admitted += 1;
    }
    assert_eq!(counters.started.load(Ordering::SeqCst), 3);
    gate.send_replace(true);
    // At the limit: 429, having been admitted the limit and fewer than a batch more.
    let mut refused = 0;
    for _ in 0..(2 * limit) {
        match get(&s, "example.net", POLICY).await.status {
            200 => admitted += 1,
            429 => {
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(refused, 3, "refused at its limit");
    assert!(
        (limit..limit + BATCH).contains(&admitted),
        "admitted {admitted} of a limit of {limit}"
    );
    // A refused client does not write to the counters again (while the refusal is held).
    let writes = counters.started.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(get(&s, "example.net", POLICY).await.status, 429);
    }
    assert_eq!(counters.started.load(Ordering::SeqCst), writes);
}

/// `kst bench web` against the real listener: it reads every answer whole on its keep-alive
/// connections, 200s and 429s alike, and counts the body bytes the server sent.
#[cfg(feature = "bench")]
#[tokio::test]
async fn the_load_tool_reads_every_answer_of_the_real_listener() {
    use kst_bin::bench::web::{WebArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let args = |s: &Server, paths: &[&str], rate: u32| {
        let file = dir.path().join(format!("{rate}.paths"));
        std::fs::write(&file, paths.join("\n")).unwrap();
        WebArgs {
            url: format!("http://{}", s.addr),
            paths: file,
            rate,
            duration: 0.5,
            connections: 4,
            host: Some("example.net".into()),
            clients: 0,
            clients_from: "127.9.0.0".parse().unwrap(),
            late_after: 1.0,
            timeout: 10.0,
            tick: 0.25,
            threads: 1,
            seed: 1,
            json: false,
        }
    };
    let alice = "/vks/v1/by-email/alice%40example.net";

    let s = start(open()).await;
    let one = get(&s, "example.net", alice).await;
    assert_eq!(one.status, 200);
    let r = run(args(&s, &[alice], 400)).await.unwrap();
    assert_eq!(r.requests, 200);
    assert_eq!(r.answers, [("200".to_string(), 200)].into(), "{}", r.text());
    assert_eq!(r.body_bytes, 200 * one.body.len() as u64);
    assert!(r.all_answered());

    // 429s (with bodies) on the same connections: at most 10 requests of this client pass.
    let s = start(WebConfig {
        limits: WebLimits {
            per_client: 10,
            ..WebLimits::OFF
        },
        ..WebConfig::default()
    })
    .await;
    let paths = [alice, "/vks/v1/by-email/nobody%40example.net"];
    let r = run(args(&s, &paths, 300)).await.unwrap();
    assert_eq!(r.requests, 150);
    assert_eq!(r.lookups, 10, "{}", r.text());
    assert_eq!(r.answers.get("429"), Some(&140), "{}", r.text());
    assert!(r.all_answered());
}

#[tokio::test]
async fn misses_close_the_oracle_for_that_client() {
    let s = start(WebConfig {
        limits: WebLimits {
            per_client_misses: 2,
            ..WebLimits::OFF
        },
        ..WebConfig::default()
    })
    .await;
    for name in ["a", "b", "c"] {
        let r = get(
            &s,
            "keys.example",
            &format!("/vks/v1/by-email/{name}@example.net"),
        )
        .await;
        assert_eq!(r.status, 404);
    }
    // Now even a key that exists is not confirmed, so the dictionary walk stops...
    let r = get(&s, "keys.example", "/vks/v1/by-email/alice@example.net").await;
    assert_eq!(r.status, 429);
    // ...while the policy file is still served.
    assert_eq!(
        get(&s, "example.net", "/.well-known/openpgpkey/policy")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limited = WebLimits {
        per_client: 1,
        ..WebLimits::OFF
    };
    // Trusted: each forwarded client has its own counter.
    let s = start(WebConfig {
        trusted_proxies: vec!["127.0.0.1".into()],
        limits: limited,
        ..WebConfig::default()
    })
    .await;
    for i in 1..=3 {
        let xff = format!("198.51.100.{i}");
        let r = request(
            &s,
            "GET",
            "example.net",
            "/.well-known/openpgpkey/policy",
            &[("X-Forwarded-For", &xff)],
        )
        .await;
        assert_eq!(r.status, 200, "{xff}");
    }
    let again = request(
        &s,
        "GET",
        "example.net",
        "/.well-known/openpgpkey/policy",
        &[("X-Forwarded-For", "198.51.100.1")],
    )
    .await;
    assert_eq!(again.status, 429);
    // IPv6 clients are counted per /64.
    let v6 = |a: &'static str| [("X-Forwarded-For", a)];
    let first = request(
        &s,
        "GET",
        "example.net",
        "/.well-known/openpgpkey/policy",
        &v6("2001:db8:1:2::1"),
    )
    .await;
    assert_eq!(first.status, 200);
    let same64 = request(
        &s,
        "GET",
        "example.net",
        "/.well-known/openpgpkey/policy",
        &v6("[2001:db8:1:2::99]:4711"),
    )
    .await;
    assert_eq!(same64.status, 429);

    // Untrusted: the header is ignored, everyone is 127.0.0.1.
    let s = start(WebConfig {
        limits: limited,
        ..WebConfig::default()
    })
    .await;
    let one = request(
        &s,
        "GET",
        "example.net",
        "/.well-known/openpgpkey/policy",
        &[("X-Forwarded-For", "198.51.100.1")],
    )
    .await;
    assert_eq!(one.status, 200);
    let two = request(
        &s,
        "GET",
        "example.net",
        "/.well-known/openpgpkey/policy",
        &[("X-Forwarded-For", "198.51.100.2")],
    )
    .await;
    assert_eq!(two.status, 429);
}

#[tokio::test]
async fn metrics_count_requests_per_endpoint_and_status() {
    let handle = kst_bin::shared::metrics::init();
    let s = start(open()).await;
    let (host, target) = gpg_wkd_url("alice@example.net");
    assert_eq!(get(&s, &host, &target).await.status, 200);
    assert_eq!(
        get(&s, "keys.example", "/vks/v1/by-email/nobody@example.net")
            .await
            .status,
        404
    );
    let text = handle.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("kst_web_requests_total{")
                && l.contains("endpoint=\"wkd-advanced\"")
                && l.contains("status=\"200\"")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("kst_web_requests_total{")
                && l.contains("endpoint=\"vks-by-email\"")
                && l.contains("status=\"404\"")),
        "{text}"
    );
    assert!(text.contains("kst_web_request_duration_seconds"), "{text}");
}

#[tokio::test]
async fn a_revoked_key_is_served_so_clients_learn_the_revocation() {
    let s = start(open()).await;
    let fpr = publish(&s.store, &testkey("revoked.pub.asc"), "alice@example.net").await;
    let (host, target) = gpg_wkd_url("alice@example.net");
    let r = get(&s, &host, &target).await;
    assert_eq!(r.status, 200);
    let listing = gpg_list(&r.body);
    assert_eq!(fields(&listing, "fpr", 9)[0], fpr);
    assert_eq!(
        fields(&listing, "pub", 1),
        ["r"],
        "gpg sees the key as revoked"
    );
    let idx = get(
        &s,
        "keys.example",
        "/pks/lookup?op=index&options=mr&search=alice@example.net",
    )
    .await;
    let text = idx.text();
    let pub_line = text.lines().nth(1).unwrap();
    assert_eq!(pub_line.split(':').nth(6), Some("r"), "{text}");
}

// ---- TLS ----

fn openssl(args: &[&str], dir: &Path) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is part of the test environment");
    assert!(
        st.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A private CA and a leaf for example.net signed by it; returns the leaf's DER.
fn make_ca(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=kst test CA",
        ],
        dir,
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:example.net,DNS:openpgpkey.example.net\n",
    )
    .unwrap();
}

fn make_leaf(dir: &Path, name: &str) -> Vec<u8> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=example.net",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ],
        dir,
    );
    let out = Command::new("openssl")
        .args(["x509", "-in", &pem, "-outform", "DER"])
        .current_dir(dir)
        .output()
        .unwrap();
    out.stdout
}

async fn tls_get(addr: SocketAddr, ca: &Path, host: &str, target: &str) -> (Reply, Vec<u8>) {
    let connector = kst_bin::client::tls::connector(Some(ca)).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (exchange(tls, "GET", host, target, &[]).await, cert)
}

#[tokio::test]
async fn tls_serves_wkd_and_reloads_a_renewed_certificate_without_restart() {
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path());
    let first = make_leaf(certs.path(), "one");
    let live_cert: PathBuf = certs.path().join("live.pem");
    let live_key: PathBuf = certs.path().join("live.key");
    std::fs::copy(certs.path().join("one.pem"), &live_cert).unwrap();
    std::fs::copy(certs.path().join("one.key"), &live_key).unwrap();
    let s = start(WebConfig {
        tls_cert: Some(live_cert.clone()),
        tls_key: Some(live_key.clone()),
        tls_reload_secs: 1,
        ..open()
    })
    .await;
    let ca = certs.path().join("ca.pem");
    let (host, target) = gpg_wkd_url("alice@example.net");
    let (r, served) = tls_get(s.addr, &ca, &host, &target).await;
    assert_eq!(r.status, 200);
    assert_eq!(served, first);

    // Renewal: new files in place (mtime later), no restart.
    let second = make_leaf(certs.path(), "two");
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::copy(certs.path().join("two.key"), &live_key).unwrap();
    std::fs::copy(certs.path().join("two.pem"), &live_cert).unwrap();
    let mut now_served = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now_served = tls_get(s.addr, &ca, "example.net", "/.well-known/openpgpkey/policy")
            .await
            .1;
        if now_served == second {
            break;
        }
    }
    assert_eq!(now_served, second, "the renewed certificate is served");

    // A broken file is not loaded: the good one stays.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&live_cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (r, still) = tls_get(s.addr, &ca, "example.net", "/.well-known/openpgpkey/policy").await;
    assert_eq!(r.status, 200);
    assert_eq!(still, second);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let s = start(WebConfig {
        idle_timeout_secs: 1,
        ..open()
    })
    .await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "the server closed the half-sent request within the idle timeout"
    );
}

/// A stored record that is not one readable public certificate is never served as it is
/// (the look-ups serve the stored packets without parsing them when their headers frame one
/// public certificate): cut short, or with the key packets marked secret, WKD, VKS and HKP
/// answer 404.
#[tokio::test]
async fn a_stored_record_that_is_no_readable_certificate_is_not_served() {
    let (dir, store) = alice_store().await;
    let full = kst_core::openpgp::parse_armored(&testkey("alice.pub.asc"), 1 << 20).unwrap();
    let mut secret = Vec::new();
    for (tag, body) in kst_core::openpgp::packet_bodies(&full.packets).unwrap() {
        let tag = match tag {
            6 => 5,
            14 => 7,
            t => t,
        };
        secret.extend_from_slice(&[0xc0 | tag, 255]);
        secret.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        secret.extend_from_slice(body);
    }
    let cut = full.packets[..full.packets.len() - 1].to_vec();
    for (local, key) in [("cut", cut), ("secret", secret)] {
        let address = format!("{local}@example.net");
        restore(&store, &address, key, &full.fingerprint).await;
    }
    let s = serve_store((dir, store), &DOMAINS, open()).await;
    for local in ["cut", "secret"] {
        let a = addr(&format!("{local}@example.net"));
        let hash = kst_core::wkd::WkdHash::of_address(&a);
        for (host, target) in [
            (
                "example.net",
                format!("/.well-known/openpgpkey/hu/{}?l={local}", hash.as_str()),
            ),
            ("keys.example", format!("/vks/v1/by-email/{a}")),
            (
                "keys.example",
                format!("/pks/lookup?op=get&options=mr&search={a}"),
            ),
        ] {
            let r = get(&s, host, &target).await;
            assert_eq!(r.status, 404, "{target}: {}", r.text());
        }
    }
    // The readable key next to them is served.
    let r = get(&s, "keys.example", "/vks/v1/by-email/alice@example.net").await;
    assert_eq!(r.status, 200);
}

/// `alice.sec.asc` (gpg's export of a secret key) as binary packets, by `gpg --dearmor`.
fn secret_packets() -> Vec<u8> {
    let home = tempfile::tempdir().unwrap();
    let armored = home.path().join("secret.asc");
    std::fs::write(&armored, testkey("alice.sec.asc")).unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--dearmor", "--output", "-"])
        .arg(&armored)
        .output()
        .expect("gpg is part of the test environment");
    assert!(
        out.status.success(),
        "gpg --dearmor: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A record holding a secret key after alice's public certificate, put straight into a real
/// store (as `kst import` or a hand-edited backend could leave it; the key policy never
/// stores one). Its headers do not frame one public certificate, so the look-ups parse it;
/// rPGP skips the packets after the certificate that it does not expect and reads one
/// certificate, and VKS `by-email`, seeing it parse, served the stored bytes as they were,
/// secret key included (red-team round 4). Every look-up (WKD both methods, VKS by address,
/// fingerprint and key ID, HKP get and index) must serve only the certificate it read,
/// re-written: no secret packet, nothing of the secret key's bytes.
#[tokio::test]
async fn a_stored_secret_key_behind_a_certificate_is_never_served() {
    let full = kst_core::openpgp::parse_armored(&testkey("alice.pub.asc"), 1 << 20).unwrap();
    let secret = secret_packets();
    let secret_bodies = kst_core::openpgp::packet_bodies(&secret).unwrap();
    assert!(
        secret_bodies.iter().any(|(tag, _)| *tag == 5),
        "gpg's export holds a secret key packet"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        kst_fs::FsStore::open(dir.path().join("store"))
            .await
            .unwrap(),
    );
    let key = [&full.packets[..], &secret[..]].concat();
    restore(&store, "alice@example.net", key, &full.fingerprint).await;
    let s = serve_store((dir, store), &DOMAINS, open()).await;
    let hash = kst_core::wkd::WkdHash::of_address(&addr("alice@example.net"));
    let key_id = &ALICE_FPR[24..];
    for (host, target) in [
        (
            "example.net",
            format!("/.well-known/openpgpkey/hu/{hash}?l=alice"),
        ),
        (
            "openpgpkey.example.net",
            format!("/.well-known/openpgpkey/example.net/hu/{hash}"),
        ),
        ("keys.example", "/vks/v1/by-email/alice@example.net".into()),
        (
            "keys.example",
            format!("/vks/v1/by-fingerprint/{ALICE_FPR}"),
        ),
        ("keys.example", format!("/vks/v1/by-keyid/{key_id}")),
        (
            "keys.example",
            "/pks/lookup?op=get&options=mr&search=alice@example.net".into(),
        ),
        (
            "keys.example",
            format!("/pks/lookup?op=get&options=mr&search=0x{ALICE_FPR}"),
        ),
        (
            "keys.example",
            "/pks/lookup?op=index&options=mr&search=alice@example.net".into(),
        ),
    ] {
        let r = get(&s, host, &target).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        if target.contains("op=index") {
            continue;
        }
        let served = if target.starts_with("/.well-known/") {
            r.body.clone()
        } else {
            kst_core::openpgp::dearmor_public_key(&r.text(), 1 << 20).unwrap()
        };
        let tags: Vec<u8> = kst_core::openpgp::packet_bodies(&served)
            .unwrap_or_else(|| panic!("{target}: the served packets are framed"))
            .iter()
            .map(|(tag, _)| *tag)
            .collect();
        assert!(
            !tags.iter().any(|t| matches!(t, 5 | 7)),
            "{target}: served a secret key packet: {tags:?}"
        );
        // The secret key packets (their bodies hold the public key's too, then the secret).
        for (_, body) in secret_bodies.iter().filter(|(tag, _)| matches!(tag, 5 | 7)) {
            assert!(
                !served.windows(body.len()).any(|w| w == *body),
                "{target}: served the bytes of a secret packet"
            );
        }
        let listing = gpg_list(&r.body);
        assert_eq!(fields(&listing, "fpr", 9)[0], ALICE_FPR, "{target}");
        assert!(
            fields(&listing, "sec", 0).is_empty() && fields(&listing, "ssb", 0).is_empty(),
            "{target}: gpg sees secret key material: {listing:?}"
        );
    }
}
