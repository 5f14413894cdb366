//! `kst bench web` through the real path: a real `kst serve` with `[web]` on a loopback port
//! and a filesystem store holding a key published by mail, offered look-ups at a fixed rate.
//! The bench's counts add up and agree with kst's own `/metrics`; with the per-client limit on
//! and the clients named in `X-Forwarded-For`, exactly the requests past each client's budget
//! are refused (so the header reaches the limiter, one client per address). No timing is
//! asserted beyond a loose check that the schedule was kept.
//!
//! Needs gpg, as the other tests.

use std::net::SocketAddr;
use std::process::Command;

use kst_core::wkd::WkdHash;
use kst_core::{AddressPolicy, client};
use kst_tests::serve::{ServeProcess, free_port, http_get};
use kst_tests::{Gpg, GpgKey, TestKst, kst_binary, received_authenticated, run_json, stderr};

/// Publishes `key` for its address the real way: an authenticated mail through `kst deliver`.
fn publish_by_mail(kst: &TestKst, key: &GpgKey) {
    let account = AddressPolicy::default().normalize(&key.address).unwrap();
    let req = client::build_publication(&account, &key.public_armored).unwrap();
    let mut raw = received_authenticated(&key.address, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = kst.deliver(&key.address, "keys@example.net", &raw);
    assert!(out.status.success(), "deliver: {}", stderr(&out));
}

/// A `kst serve` of a store holding alice@example.net's key, with `[web]` and `[http]` on free
/// loopback ports and the `[web]` settings of `env`.
struct Served {
    kst: TestKst,
    serve: ServeProcess,
    web: SocketAddr,
    http: SocketAddr,
}

fn serve(env: &[(&str, &str)]) -> Served {
    let kst = TestKst::new("");
    let gpg = Gpg::new();
    publish_by_mail(&kst, &gpg.generate("Alice", "alice@example.net", "ed25519"));
    let (web, http) = (free_port(), free_port());
    let serve = ServeProcess::start(kst.dir.path().join("serve.log"), web, |cmd| {
        cmd.arg("--config")
            .arg(&kst.config)
            .env("KST_LMTP__LISTEN", free_port().to_string())
            .env("KST_HTTP__LISTEN", http.to_string())
            .env("KST_WEB__LISTEN", web.to_string())
            .envs(env.iter().copied());
    });
    Served {
        kst,
        serve,
        web,
        http,
    }
}

/// `kst_web_requests_total` of `status`, summed over its labels, on kst's `/metrics`.
fn served(http: SocketAddr, status: u16) -> u64 {
    let (code, page) = http_get(http, "/metrics");
    assert_eq!(code, 200, "{page}");
    let label = format!("status=\"{status}\"");
    page.lines()
        .filter(|l| l.starts_with("kst_web_requests_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Runs `kst bench web --json` against `s` with `paths` (written to a file) and `args`.
fn bench(s: &Served, paths: &[String], args: &[&str]) -> serde_json::Value {
    let file = s.kst.dir.path().join("bench.paths");
    std::fs::write(&file, paths.join("\n")).unwrap();
    let mut cmd = Command::new(kst_binary());
    cmd.args(["bench", "web", "--json", "--url"])
        .arg(format!("http://{}", s.web))
        .arg("--paths")
        .arg(&file)
        .args(args);
    let (out, report) = run_json(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    eprintln!("{}", stderr(&out));
    report
}

fn count(report: &serde_json::Value, answer: &str) -> u64 {
    report["answers"][answer].as_u64().unwrap_or(0)
}

/// The loose check that the schedule was kept: every request was sent, and the answers came
/// at no more than the rate asked for (the schedule cannot run ahead) and not far below it.
fn kept_the_rate(report: &serde_json::Value, rate: f64, requests: u64) {
    assert_eq!(report["requests"], requests, "{report}");
    let achieved = report["achieved_rate"].as_f64().unwrap();
    assert!(
        achieved <= rate * 1.05 && achieved >= rate / 4.0,
        "achieved {achieved}/s for {rate}/s: {report}"
    );
    let lat = &report["latency_ms"];
    for (a, b) in [
        ("p50", "p90"),
        ("p90", "p99"),
        ("p99", "p999"),
        ("p999", "max"),
    ] {
        assert!(lat[a].as_f64() <= lat[b].as_f64(), "{a} <= {b}: {report}");
    }
}

#[test]
fn an_open_loop_load_is_counted_as_kst_counts_it() {
    let s = serve(&[
        ("KST_WEB__LIMITS__PER_CLIENT", "0"),
        ("KST_WEB__LIMITS__PER_CLIENT_MISSES", "0"),
        ("KST_WEB__LIMITS__GLOBAL_MISSES", "0"),
    ]);
    let hash = WkdHash::of_local_part("alice");
    let paths = [
        "/vks/v1/by-email/alice%40example.net".to_string(),
        // WKD's direct method: the domain comes from --host.
        format!("/.well-known/openpgpkey/hu/{}?l=alice", hash.as_str()),
        "/vks/v1/by-email/nobody%40example.net".to_string(),
    ];
    let (ok0, missing0) = (served(s.http, 200), served(s.http, 404));
    let report = bench(
        &s,
        &paths,
        &[
            "--rate",
            "200",
            "--duration",
            "2",
            "--connections",
            "4",
            "--host",
            "example.net",
        ],
    );
    let (ok, missing) = (count(&report, "200"), count(&report, "404"));
    assert_eq!(ok + missing, 400, "only 200 and 404: {report}");
    assert!(ok > 0 && missing > 0, "both paths were asked for: {report}");
    assert_eq!(report["lookups"], 400);
    assert_eq!(served(s.http, 200) - ok0, ok, "kst answered 200 as often");
    assert_eq!(
        served(s.http, 404) - missing0,
        missing,
        "kst answered 404 as often"
    );
    kept_the_rate(&report, 200.0, 400);
    assert!(report["body_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(s.serve.stop(), 0);
}

#[test]
fn clients_named_in_x_forwarded_for_are_limited_one_by_one() {
    // 4 clients, 25 requests each (request i from client i mod 4), 5 allowed per client.
    let s = serve(&[
        ("KST_WEB__TRUSTED_PROXIES", "127.0.0.1"),
        ("KST_WEB__LIMITS__PER_CLIENT", "5"),
        ("KST_WEB__LIMITS__WINDOW_SECS", "600"),
    ]);
    let report = bench(
        &s,
        &["/vks/v1/by-email/alice%40example.net".to_string()],
        &[
            "--rate",
            "100",
            "--duration",
            "1",
            "--connections",
            "4",
            "--clients",
            "4",
            "--clients-from",
            "127.77.0.0",
        ],
    );
    assert_eq!(count(&report, "200"), 4 * 5, "{report}");
    assert_eq!(count(&report, "429"), 4 * 20, "{report}");
    assert_eq!(report["lookups"], 20);
    assert_eq!(report["refused_percent"], 80.0);
    kept_the_rate(&report, 100.0, 100);
    assert_eq!(served(s.http, 429), 80, "kst refused as many");
    assert_eq!(s.serve.stop(), 0);
}
