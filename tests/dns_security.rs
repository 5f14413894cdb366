//! DNS security of `kst client retrieve --direct` (issue 19) against the signed test DNS of
//! `scripts/testdns.sh` (BIND 9.18: a signed test root, signed example.net and acme.net,
//! unsigned insecure.net with a signed proof of no DS, DNS over TLS, and the forging,
//! signature-stripping and no-DS instances). The client validates with the test root's trust
//! anchor (`--dns-anchor`).
//!
//! The foreign MX is a small SMTP server in this file (STARTTLS with a given certificate) that
//! logs every command it receives, so a test can show that nothing (no `MAIL`, no `DATA`, hence
//! no K_auth) reached it after a failed DANE or MTA-STS check. MTA-STS policies are served by
//! `openssl s_server -WWW` with a certificate from the test DNS CA.
//!
//! Needs root (testdns.sh starts BIND); skipped otherwise. Run alone with
//! `flock /work/team/dns.lock cargo test -p kst-tests --test dns_security` on the shared machine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kst_tests::{code, is_root, kst_binary, run_json, stderr};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio_rustls::rustls::{self, ServerConfig, ServerConnection, StreamOwned};

/// Exit codes of `kst client`.
const ATTACK: i32 = 5;
const UNAVAILABLE: i32 = 69;
const TEMPFAIL: i32 = 75;

// ---------------------------------------------------------------------------------------------
// The test DNS

struct TestDns {
    env: HashMap<String, String>,
}

impl TestDns {
    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("testdns.sh up printed no {name}"))
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// `scripts/testdns.sh up` (idempotent, serialized by the script) and its environment.
fn testdns() -> Option<TestDns> {
    if !is_root() {
        eprintln!("SKIPPED: scripts/testdns.sh needs root (it starts BIND)");
        return None;
    }
    let out = Command::new(repo().join("scripts/testdns.sh"))
        .arg("up")
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/testdns.sh");
    assert!(
        out.status.success(),
        "testdns.sh up failed: {}",
        stderr(&out)
    );
    let env = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(TestDns { env })
}

// ---------------------------------------------------------------------------------------------
// A foreign MX that logs what it is told

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An SMTP server on 127.0.0.1 (port `port`) that offers STARTTLS with `tls` (or no STARTTLS),
/// accepts everything, and logs each command verb (and `TLS-OK`, `TLS-FAILED`, `MESSAGE`).
struct Mx {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Mx {
    fn start(tls: Option<(&Path, &Path)>) -> Mx {
        let config = tls.map(|(cert, key)| {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            Arc::new(
                ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
            )
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (l, config) = (l.clone(), config.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, config, &l);
                });
            }
        });
        Mx { port, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn saw(&self, verb: &str) -> bool {
        self.log().iter().any(|l| l == verb)
    }
}

fn read_line(s: &mut Stream) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte)? == 0 {
            return Ok(None);
        }
        line.push(byte[0]);
        if byte[0] == b'\n' || line.len() > 100_000 {
            return Ok(Some(String::from_utf8_lossy(&line).trim_end().to_string()));
        }
    }
}

fn serve(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let note = |s: &str| log.lock().unwrap().push(s.to_string());
    let mut s = Stream::Plain(tcp);
    s.write_all(b"220 mail.example.net ESMTP kst test MX\r\n")?;
    while let Some(line) = read_line(&mut s)? {
        let verb = line
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        note(&verb);
        match verb.as_str() {
            "EHLO" | "HELO" => {
                let starttls = tls.is_some() && matches!(s, Stream::Plain(_));
                s.write_all(if starttls {
                    b"250-mail.example.net\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
                } else {
                    b"250-mail.example.net\r\n250 8BITMIME\r\n"
                })?;
            }
            "STARTTLS" => {
                let (Some(config), Stream::Plain(tcp)) = (&tls, &s) else {
                    s.write_all(b"502 5.5.1 no\r\n")?;
                    continue;
                };
                let tcp = tcp.try_clone()?;
                s.write_all(b"220 2.0.0 go ahead\r\n")?;
                let mut conn = ServerConnection::new(config.clone()).unwrap();
                let mut tcp = tcp;
                let mut ok = true;
                while conn.is_handshaking() {
                    if conn.complete_io(&mut tcp).is_err() {
                        ok = false;
                        break;
                    }
                }
                note(if ok { "TLS-OK" } else { "TLS-FAILED" });
                if !ok {
                    return Ok(());
                }
                s = Stream::Tls(Box::new(StreamOwned::new(conn, tcp)));
            }
            "MAIL" | "RCPT" | "RSET" | "NOOP" => s.write_all(b"250 2.0.0 ok\r\n")?,
            "DATA" => {
                s.write_all(b"354 go ahead\r\n")?;
                while let Some(l) = read_line(&mut s)? {
                    if l == "." {
                        break;
                    }
                }
                note("MESSAGE");
                s.write_all(b"250 2.0.0 queued\r\n")?;
            }
            "QUIT" => {
                s.write_all(b"221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => s.write_all(b"502 5.5.2 unknown\r\n")?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Certificates and the MTA-STS policy server

/// A certificate for `names` from the test DNS CA (or self-signed when `self_signed`), made by
/// openssl in `dir`; returns (cert, key).
fn certificate(
    dns: &TestDns,
    dir: &Path,
    stem: &str,
    names: &[&str],
    self_signed: bool,
) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{stem}.key"));
    let cert = dir.join(format!("{stem}.pem"));
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    let (k, c) = (key.to_str().unwrap(), cert.to_str().unwrap());
    if self_signed {
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            k,
            "-out",
            c,
            "-days",
            "2",
            "-subj",
            &format!("/CN={}", names[0]),
            "-addext",
            &format!("subjectAltName={san}"),
        ]);
    } else {
        let csr = dir.join(format!("{stem}.csr"));
        let ext = dir.join(format!("{stem}.ext"));
        std::fs::write(
            &ext,
            format!("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"),
        )
        .unwrap();
        run(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            k,
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &format!("/CN={}", names[0]),
        ]);
        let ca_dir = Path::new(dns.var("KST_DNS_CA"))
            .parent()
            .unwrap()
            .to_path_buf();
        run(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            dns.var("KST_DNS_CA"),
            "-CAkey",
            ca_dir.join("ca.key").to_str().unwrap(),
            "-CAcreateserial",
            "-CAserial",
            dir.join("ca.srl").to_str().unwrap(),
            "-days",
            "2",
            "-sha256",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            c,
        ]);
    }
    (cert, key)
}

/// `openssl s_server -WWW` serving `policy` as `/.well-known/mta-sts.txt` for
/// `mta-sts.<domain>` on a free port.
struct PolicyServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PolicyServer {
    fn start(dns: &TestDns, domain: &str, policy: &str) -> PolicyServer {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(
            dns,
            dir.path(),
            "sts",
            &[&format!("mta-sts.{domain}")],
            false,
        );
        std::fs::create_dir_all(dir.path().join(".well-known")).unwrap();
        std::fs::write(dir.path().join(".well-known/mta-sts.txt"), policy).unwrap();
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "openssl s_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PolicyServer {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// The client

struct Run {
    dir: tempfile::TempDir,
    /// The HTTPS port for MTA-STS policies (a closed one unless a test serves a policy).
    sts_port: u16,
}

impl Run {
    fn new() -> Run {
        Run {
            dir: tempfile::Builder::new()
                .prefix("kst-dnssec-")
                .tempdir()
                .unwrap(),
            sts_port: free_port(),
        }
    }

    /// `kst client --account carol@acme.net retrieve ADDRESS --direct --no-wait` through
    /// `resolver` with the test root's anchor and the test CA, plus `args`.
    fn retrieve(
        &self,
        dns: &TestDns,
        resolver: &str,
        address: &str,
        args: &[&str],
    ) -> (Output, Value) {
        let mut cmd = Command::new(kst_binary());
        cmd.args(["client", "--account", "carol@acme.net", "--json"])
            .args(["--client-config", "/dev/null", "--resolver", resolver])
            .args(["--dns-anchor", dns.var("KST_DNS_ANCHOR")])
            .args(["--ca-file", dns.var("KST_DNS_CA")])
            .arg("--state-file")
            .arg(self.dir.path().join("pending.json"))
            .args(["retrieve", address, "--direct", "--no-wait"])
            .args(args)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("KST_MTA_STS_PORT", self.sts_port.to_string())
            .env_remove("KST_CLIENT_CONFIG")
            .env_remove("KST_ACCOUNT");
        run_json(cmd)
    }
}

/// The certificate and key the TLSA records of mail.example.net name.
fn tlsa_cert(dns: &TestDns) -> (PathBuf, PathBuf) {
    let cert = PathBuf::from(dns.var("KST_DNS_TLSA_CERT"));
    let key = if cert == Path::new(dns.var("KST_DNS_MX_CERT")) {
        PathBuf::from(dns.var("KST_DNS_MX_KEY"))
    } else {
        cert.with_extension("key")
    };
    (cert, key)
}

fn show(out: &Output, v: &Value) -> String {
    format!("exit {}: {v:#}\nstderr: {}", code(out), stderr(out))
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn a_secure_mx_with_a_matching_tlsa_record_is_dane_authenticated_and_gets_the_request() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(&dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "alice@example.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["outcome"], "pending", "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    assert_eq!(v["transport"]["mx"], "mail.example.net");
    assert_eq!(v["transport"]["tls"], true);
    assert_eq!(
        v["transport"]["authentication"],
        "dane-ee",
        "{}",
        show(&out, &v)
    );
    assert!(mx.saw("MESSAGE"), "{:?}", mx.log());
}

#[test]
fn dns_over_tls_to_binds_listener_gives_the_same_secure_answers_and_checks_the_name() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(&dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_TLS_RESOLVER"),
        "alice@example.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure", "{}", show(&out, &v));
    assert_eq!(v["transport"]["authentication"], "dane-ee");
    assert!(mx.saw("MESSAGE"));

    // The DoT certificate is for dns.test: another name fails the handshake, nothing is sent.
    let mx2 = Mx::start(Some((&cert, &key)));
    let wrong = format!("tls://127.0.0.1:{}#wrong.test", dns.var("KST_DNS_TLS_PORT"));
    let port2 = mx2.port.to_string();
    let (out, v) = run.retrieve(&dns, &wrong, "alice@example.net", &["--mx-port", &port2]);
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert!(mx2.log().is_empty(), "{:?}", mx2.log());
}

#[test]
fn a_certificate_that_matches_no_tlsa_record_is_refused_before_anything_is_sent() {
    let Some(dns) = testdns() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Valid for the name under the test CA (PKIX would pass), but not the TLSA record's key.
    let (cert, key) = certificate(&dns, dir.path(), "other", &["mail.example.net"], false);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "alice@example.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        v["error"].as_str().unwrap_or("").contains("DANE"),
        "{}",
        show(&out, &v)
    );
    let log = mx.log();
    assert!(log.contains(&"STARTTLS".to_string()), "{log:?}");
    for verb in ["TLS-OK", "MAIL", "RCPT", "DATA", "MESSAGE"] {
        assert!(!log.contains(&verb.to_string()), "{verb} in {log:?}");
    }

    // DANE demands TLS: an MX that stops offering STARTTLS gets nothing, even with
    // --allow-plaintext.
    let plain = Mx::start(None);
    let port = plain.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "alice@example.net",
        &["--mx-port", &port, "--allow-plaintext"],
    );
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        !plain.saw("MAIL") && !plain.saw("DATA"),
        "{:?}",
        plain.log()
    );
}

#[test]
fn forged_stripped_and_no_ds_answers_are_attacks_and_nothing_is_sent() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(&dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    for resolver in [
        "KST_DNS_FORGED_RESOLVER",
        "KST_DNS_STRIPPED_RESOLVER",
        "KST_DNS_NODS_RESOLVER",
    ] {
        let (out, v) = run.retrieve(
            &dns,
            dns.var(resolver),
            "alice@example.net",
            &["--mx-port", &port],
        );
        assert_eq!(code(&out), ATTACK, "{resolver}: {}", show(&out, &v));
        assert!(
            v["error"].as_str().unwrap_or("").contains("DNSSEC"),
            "{resolver}: {}",
            show(&out, &v)
        );
    }
    // Single bogus records in the good zone: the MX host's address is tampered / unsigned.
    for host in ["tampered.example.net", "stripped.example.net"] {
        let mx_arg = format!("{host}:{port}");
        let (out, v) = run.retrieve(
            &dns,
            dns.var("KST_DNS_RESOLVER"),
            "alice@example.net",
            &["--mx", &mx_arg],
        );
        assert_eq!(code(&out), ATTACK, "{host}: {}", show(&out, &v));
    }
    assert!(mx.log().is_empty(), "{:?}", mx.log());
    // Relayed: the forged NODATA for _submissions._tcp.example.net (which would push the client
    // from implicit TLS to STARTTLS) is refused as bogus before any connection or password.
    let mut cmd = Command::new(kst_binary());
    cmd.args(["client", "--account", "alice@example.net", "--json"])
        .args(["--client-config", "/dev/null"])
        .args(["--resolver", dns.var("KST_DNS_FORGED_RESOLVER")])
        .args(["--dns-anchor", dns.var("KST_DNS_ANCHOR")])
        .arg("--state-file")
        .arg(run.dir.path().join("relayed.json"))
        .args([
            "--maildir",
            "/nonexistent",
            "retrieve",
            "dave@acme.net",
            "--no-wait",
        ])
        .env_remove("KST_PASSWORD")
        .env_remove("KST_CLIENT_CONFIG");
    let (out, v) = run_json(cmd);
    assert_eq!(code(&out), ATTACK, "relayed: {}", show(&out, &v));
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("_submissions._tcp.example.net"),
        "{}",
        show(&out, &v)
    );
    // The refusal is about example.net: acme.net still validates through the forging server.
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_FORGED_RESOLVER"),
        "dave@acme.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "secure");
}

#[test]
fn an_unsigned_zone_is_insecure_its_tlsa_ignored_and_require_dnssec_refuses_it() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(&dns);
    let mx = Mx::start(Some((&cert, &key)));
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["dnssec"], "insecure", "{}", show(&out, &v));
    // insecure.net publishes a TLSA record, but an insecure one does not count (RFC 7672).
    assert_eq!(
        v["transport"]["authentication"],
        "unauthenticated",
        "{}",
        show(&out, &v)
    );
    assert_eq!(v["transport"]["tls"], true);
    assert!(
        v["transport"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("encrypted but not authenticated")
    );
    assert!(mx.saw("MESSAGE"));

    let strict = Mx::start(Some((&cert, &key)));
    let port = strict.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port, "--require-dnssec"],
    );
    assert_eq!(code(&out), UNAVAILABLE, "{}", show(&out, &v));
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("--require-dnssec")
    );
    assert!(strict.log().is_empty(), "{:?}", strict.log());
}

#[test]
fn a_plaintext_mx_gets_the_request_only_with_allow_plaintext() {
    let Some(dns) = testdns() else { return };
    let mx = Mx::start(None);
    let run = Run::new();
    let port = mx.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), UNAVAILABLE, "{}", show(&out, &v));
    assert!(!mx.saw("MAIL"), "{:?}", mx.log());
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port, "--allow-plaintext"],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(v["transport"]["tls"], false, "{}", show(&out, &v));
    assert!(mx.saw("MESSAGE"));
}

#[test]
fn mta_sts_enforce_refuses_a_non_matching_mx_and_keeps_the_policy_cached() {
    let Some(dns) = testdns() else { return };
    let (cert, key) = tlsa_cert(&dns);
    let mx = Mx::start(Some((&cert, &key)));
    let port = mx.port.to_string();
    // insecure.net: no DANE (its zone is unsigned), so MTA-STS decides.
    let mut run = Run::new();
    let policy = PolicyServer::start(
        &dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.elsewhere.test\nmax_age: 86400\n",
    );
    run.sts_port = policy.port;
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        v["error"].as_str().unwrap_or("").contains("MTA-STS"),
        "{}",
        show(&out, &v)
    );
    assert!(mx.log().is_empty(), "{:?}", mx.log());
    // The policy is cached for max_age: with the policy server gone it still applies.
    drop(policy);
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("mail.elsewhere.test"),
        "{}",
        show(&out, &v)
    );
    assert!(mx.log().is_empty(), "{:?}", mx.log());

    // A matching policy: the MX must show a PKIX-valid certificate for its name.
    let good = PolicyServer::start(
        &dns,
        "insecure.net",
        "version: STSv1\nmode: enforce\nmx: mail.insecure.net\nmax_age: 86400\n",
    );
    let run = Run {
        sts_port: good.port,
        ..Run::new()
    };
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &port],
    );
    assert_eq!(code(&out), TEMPFAIL, "{}", show(&out, &v));
    assert_eq!(
        v["transport"]["authentication"],
        "mta-sts",
        "{}",
        show(&out, &v)
    );
    assert!(mx.saw("MESSAGE"));

    // ...and a self-signed certificate fails that check before anything is sent.
    let dir = tempfile::tempdir().unwrap();
    let (bad_cert, bad_key) = certificate(&dns, dir.path(), "self", &["mail.insecure.net"], true);
    let bad = Mx::start(Some((&bad_cert, &bad_key)));
    let bad_port = bad.port.to_string();
    let (out, v) = run.retrieve(
        &dns,
        dns.var("KST_DNS_RESOLVER"),
        "bob@insecure.net",
        &["--mx-port", &bad_port],
    );
    assert_eq!(code(&out), ATTACK, "{}", show(&out, &v));
    assert!(!bad.saw("MAIL") && !bad.saw("DATA"), "{:?}", bad.log());
}
