//! The parts the DNS-security tests share: the signed test DNS (with this file's extra records),
//! a foreign MX that logs what it is told, certificates made by openssl, the MTA-STS policy
//! server, and the `kst client` invocation.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use kst_tests::{code, is_root, kst_binary, run_json, stderr};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio_rustls::rustls::{self, ServerConfig, ServerConnection, StreamOwned};

/// Exit codes of `kst client`.
pub const ATTACK: i32 = 5;
pub const UNAVAILABLE: i32 = 69;
pub const TEMPFAIL: i32 = 75;
pub const USAGE: i32 = 64;

// ---------------------------------------------------------------------------------------------
// The test DNS

/// The running test DNS and its environment (`scripts/testdns.sh env`).
pub struct TestDns {
    env: HashMap<String, String>,
}

impl TestDns {
    /// A variable `testdns.sh up` printed.
    pub fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("testdns.sh up printed no {name}"))
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// Where this file's extra records live (stable across runs, so a second run re-signs nothing).
fn extra_dir() -> PathBuf {
    std::env::temp_dir().join("kst-dns-security-extra")
}

fn testdns_up() -> TestDns {
    let out = Command::new(repo().join("scripts/testdns.sh"))
        .arg("up")
        .env("KST_DNS_EXTRA_DIR", extra_dir())
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
    TestDns { env }
}

/// `openssl ... | openssl dgst -sha256 -r` over a shell pipeline: the hex digest.
fn sha256_hex(pipeline: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("{pipeline} | openssl dgst -sha256 -r")])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{pipeline}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// SHA-256 of a PEM certificate's DER (TLSA selector 0, matching 1).
pub fn cert_sha256(pem: &str) -> String {
    sha256_hex(&format!("openssl x509 -in '{pem}' -outform DER"))
}

/// SHA-256 of a PEM certificate's SubjectPublicKeyInfo (TLSA selector 1, matching 1).
pub fn spki_sha256(pem: &str) -> String {
    sha256_hex(&format!(
        "openssl x509 -in '{pem}' -pubkey -noout | openssl pkey -pubin -outform DER"
    ))
}

/// The extra records of the red-team tests (all on 127.0.0.1):
///
/// - `dane-ta.example.net`: MX `ta.example.net`, whose `_25._tcp` TLSA is `2 0 1` of the test
///   DNS CA (DANE-TA);
/// - `pkix.example.net`: TLSA `0 0 1` and `1 1 1` only (PKIX-TA/EE, unusable for SMTP);
/// - `selector.example.net`: TLSA `3 0 1` whose data is the TLSA certificate's SPKI hash
///   (right key, wrong selector);
/// - `ins-mx.example.net`: a secure MX naming `mail.insecure.net` (its TLSA is insecure);
/// - `notlsa.example.net`: an address, no MX, no TLSA, no MTA-STS;
/// - `idn-mx.example.net`: MX `xn--mil-qla.example.net` (mäil), TLSA `3 1 1` of the TLSA
///   certificate;
/// - `sts-bogus.example.net`: an `_mta-sts` TXT record, and `mta-sts.sts-bogus.example.net` a
///   CNAME to `tampered.example.net`, whose A record is bogus;
/// - `sec-mx.insecure.net`: an insecure MX naming `mail.example.net` (whose TLSA is secure).
fn extra_records(dns: &TestDns) -> Vec<(&'static str, String)> {
    let ca = cert_sha256(dns.var("KST_DNS_CA"));
    let tlsa_spki = spki_sha256(dns.var("KST_DNS_TLSA_CERT"));
    let example = format!(
        "dane-ta.example.net. 300 IN MX 10 ta.example.net.\n\
         ta.example.net. 300 IN A 127.0.0.1\n\
         _25._tcp.ta.example.net. 300 IN TLSA 2 0 1 {ca}\n\
         pkix.example.net. 300 IN A 127.0.0.1\n\
         _25._tcp.pkix.example.net. 300 IN TLSA 0 0 1 {ca}\n\
         _25._tcp.pkix.example.net. 300 IN TLSA 1 1 1 {tlsa_spki}\n\
         selector.example.net. 300 IN A 127.0.0.1\n\
         _25._tcp.selector.example.net. 300 IN TLSA 3 0 1 {tlsa_spki}\n\
         ins-mx.example.net. 300 IN MX 10 mail.insecure.net.\n\
         notlsa.example.net. 300 IN A 127.0.0.1\n\
         idn-mx.example.net. 300 IN MX 10 xn--mil-qla.example.net.\n\
         xn--mil-qla.example.net. 300 IN A 127.0.0.1\n\
         _25._tcp.xn--mil-qla.example.net. 300 IN TLSA 3 1 1 {tlsa_spki}\n\
         sts-bogus.example.net. 300 IN A 127.0.0.1\n\
         _mta-sts.sts-bogus.example.net. 300 IN TXT \"v=STSv1; id=1;\"\n\
         mta-sts.sts-bogus.example.net. 300 IN CNAME tampered.example.net.\n"
    );
    let insecure = "sec-mx.insecure.net. 300 IN MX 10 mail.example.net.\n".to_string();
    vec![("example.net", example), ("insecure.net", insecure)]
}

/// `scripts/testdns.sh up` (idempotent, serialized by the script) with this file's extra
/// records, once per test process, which keeps its turn at the test DNS
/// (`kst_tests::test_dns_turn`) to its end, so no other test process re-signs the zones under
/// it; `None` without root.
pub fn testdns() -> Option<&'static TestDns> {
    if !is_root() {
        eprintln!("SKIPPED: scripts/testdns.sh needs root (it starts BIND)");
        return None;
    }
    static DNS: OnceLock<TestDns> = OnceLock::new();
    static TURN: OnceLock<kst_tests::TestDnsTurn> = OnceLock::new();
    Some(DNS.get_or_init(|| {
        TURN.get_or_init(kst_tests::test_dns_turn);
        // The records name the test CA and the TLSA certificate, which exist after an `up`.
        let dns = testdns_up();
        let dir = extra_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut changed = false;
        for (zone, text) in extra_records(&dns) {
            let path = dir.join(zone);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&path, text).unwrap();
                changed = true;
            }
        }
        if changed { testdns_up() } else { dns }
    }))
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

/// How the MX treats STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    /// Offers it (when it has a certificate) and runs the handshake.
    Honest,
    /// Offers it, answers `220`, and then goes on in cleartext (a STARTTLS-stripping box that
    /// lies about the upgrade).
    LieAndStayPlain,
    /// Offers it and refuses it with `454` (TLS not available now).
    Refuse,
}

/// An SMTP server on 127.0.0.1 that offers STARTTLS with a certificate (or no STARTTLS),
/// accepts everything, and logs each command verb (and `TLS-OK`, `TLS-FAILED`, `MESSAGE`) and
/// every line it receives.
pub struct Mx {
    pub port: u16,
    log: Arc<Mutex<Vec<String>>>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Mx {
    /// An honest MX: STARTTLS with `tls` (certificate chain PEM, key PEM), or none.
    pub fn start(tls: Option<(&Path, &Path)>) -> Mx {
        Mx::with(tls, StartTls::Honest)
    }

    /// An MX whose STARTTLS behaves as `starttls` says.
    pub fn with(tls: Option<(&Path, &Path)>, starttls: StartTls) -> Mx {
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
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (l, ls) = (log.clone(), lines.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (l, ls, config) = (l.clone(), ls.clone(), config.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, config, starttls, &l, &ls);
                });
            }
        });
        Mx { port, log, lines }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn saw(&self, verb: &str) -> bool {
        self.log().iter().any(|l| l == verb)
    }

    /// True when some line the MX received is a K_auth (base64 of exactly 32 bytes): the
    /// request's secret reached it.
    pub fn got_k_auth(&self) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.lines.lock().unwrap().iter().any(|l| {
            let l = l.trim();
            l.len() == 44 && b64.decode(l).is_ok_and(|b| b.len() == 32)
        })
    }

    /// Asserts that nothing of the request reached the MX: no `MAIL`, `RCPT`, `DATA`, no
    /// message, and no K_auth on any line.
    pub fn assert_nothing_sent(&self, context: &str) {
        let log = self.log();
        for verb in ["MAIL", "RCPT", "DATA", "MESSAGE"] {
            assert!(
                !log.iter().any(|l| l == verb),
                "{context}: {verb} in {log:?}"
            );
        }
        assert!(!self.got_k_auth(), "{context}: K_auth reached the MX");
    }

    /// Asserts that the request (K_auth included) reached the MX.
    pub fn assert_request_received(&self, context: &str) {
        assert!(self.saw("MESSAGE"), "{context}: {:?}", self.log());
        assert!(
            self.got_k_auth(),
            "{context}: no K_auth line in the message"
        );
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
    starttls: StartTls,
    log: &Mutex<Vec<String>>,
    lines: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let note = |s: &str| log.lock().unwrap().push(s.to_string());
    let mut s = Stream::Plain(tcp);
    s.write_all(b"220 mail.example.net ESMTP kst test MX\r\n")?;
    while let Some(line) = read_line(&mut s)? {
        lines.lock().unwrap().push(line.clone());
        let verb = line
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        note(&verb);
        match verb.as_str() {
            "EHLO" | "HELO" => {
                let offer = tls.is_some() && matches!(s, Stream::Plain(_));
                s.write_all(if offer {
                    b"250-mail.example.net\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
                } else {
                    b"250-mail.example.net\r\n250 8BITMIME\r\n"
                })?;
            }
            "STARTTLS" if starttls == StartTls::Refuse => {
                s.write_all(b"454 4.7.0 TLS not available due to temporary reason\r\n")?;
            }
            "STARTTLS" if starttls == StartTls::LieAndStayPlain => {
                // Says yes, then keeps talking SMTP in clear: whatever the client sends next
                // (a TLS ClientHello, or SMTP if it were fooled) is logged.
                s.write_all(b"220 2.0.0 go ahead\r\n")?;
                s.write_all(b"250-mail.example.net\r\n250 8BITMIME\r\n")?;
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
                    lines.lock().unwrap().push(l);
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

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// Who signs a certificate made by [`issue`].
pub enum Issuer<'a> {
    /// The test DNS CA (`KST_DNS_CA`, its key next to it).
    TestCa,
    /// Self-signed.
    SelfSigned,
    /// Another CA: (certificate, key).
    Ca(&'a Path, &'a Path),
}

/// `openssl req` with a fresh P-256 key written to `key` and the subject `/CN=cn`: a
/// self-signed certificate valid for two days with the extensions `addext` when `self_signed`,
/// else a certificate request; written to `out`.
fn new_key(key: &Path, out: &Path, cn: &str, self_signed: bool, addext: &[&str]) {
    let (key, out, subject) = (
        key.to_str().unwrap(),
        out.to_str().unwrap(),
        format!("/CN={cn}"),
    );
    let mut args = vec!["req"];
    args.extend(if self_signed {
        ["-x509", "-days", "2"].as_slice()
    } else {
        ["-new"].as_slice()
    });
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ]);
    args.extend(["-keyout", key, "-out", out, "-subj", &subject]);
    for e in addext {
        args.extend(["-addext", e]);
    }
    openssl(&args);
}

/// A server certificate for `names` signed by `issuer` (valid for two days), made by openssl
/// in `dir`; returns (cert, key).
pub fn issue(
    dns: &TestDns,
    dir: &Path,
    stem: &str,
    names: &[&str],
    issuer: Issuer<'_>,
) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{stem}.key"));
    let cert = dir.join(format!("{stem}.pem"));
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let test_ca_key;
    let (ca_cert, ca_key) = match issuer {
        Issuer::SelfSigned => {
            let san = format!("subjectAltName={san}");
            new_key(&key, &cert, names[0], true, &[&san]);
            return (cert, key);
        }
        Issuer::TestCa => {
            let ca = Path::new(dns.var("KST_DNS_CA"));
            test_ca_key = ca.parent().unwrap().join("ca.key");
            (ca, test_ca_key.as_path())
        }
        Issuer::Ca(cert, key) => (cert, key),
    };
    let csr = dir.join(format!("{stem}.csr"));
    let ext = dir.join(format!("{stem}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
        ),
    )
    .unwrap();
    new_key(&key, &csr, names[0], false, &[]);
    let serial = dir.join(format!("{stem}.srl"));
    let mut args = vec!["x509", "-req", "-days", "2", "-sha256", "-CAcreateserial"];
    for (flag, path) in [
        ("-in", csr.as_path()),
        ("-CA", ca_cert),
        ("-CAkey", ca_key),
        ("-CAserial", serial.as_path()),
        ("-extfile", ext.as_path()),
        ("-out", cert.as_path()),
    ] {
        args.extend([flag, path.to_str().unwrap()]);
    }
    openssl(&args);
    (cert, key)
}

/// A certificate for `names` from the test DNS CA (or self-signed when `self_signed`).
pub fn certificate(
    dns: &TestDns,
    dir: &Path,
    stem: &str,
    names: &[&str],
    self_signed: bool,
) -> (PathBuf, PathBuf) {
    let issuer = if self_signed {
        Issuer::SelfSigned
    } else {
        Issuer::TestCa
    };
    issue(dns, dir, stem, names, issuer)
}

/// A self-signed CA certificate (`CA:TRUE`, keyCertSign) made in `dir`; returns (cert, key).
pub fn make_ca(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{stem}.key"));
    let cert = dir.join(format!("{stem}.pem"));
    new_key(
        &key,
        &cert,
        stem,
        true,
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    (cert, key)
}

/// A self-signed certificate with `key`, for `name`, valid only in January 2020 (long
/// expired), made with `openssl ca -selfsign` in `dir`.
pub fn expired_self_signed(dir: &Path, key: &Path, name: &str) -> PathBuf {
    let csr = dir.join("expired.csr");
    let cert = dir.join("expired.pem");
    openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
        "-subj",
        &format!("/CN={name}"),
    ]);
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    let cnf = dir.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca=d\n[d]\ndir={}\ndatabase=$dir/index.txt\nnew_certs_dir=$dir\n\
             serial=$dir/serial\ndefault_md=sha256\npolicy=p\nunique_subject=no\nx509_extensions=ext\n\
             [p]\ncommonName=supplied\n[ext]\nbasicConstraints=critical,CA:FALSE\n\
             subjectAltName=DNS:{name}\n",
            dir.display()
        ),
    )
    .unwrap();
    openssl(&[
        "ca",
        "-batch",
        "-config",
        cnf.to_str().unwrap(),
        "-selfsign",
        "-keyfile",
        key.to_str().unwrap(),
        "-in",
        csr.to_str().unwrap(),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200201000000Z",
        "-out",
        cert.to_str().unwrap(),
    ]);
    cert
}

/// Concatenates PEM files into `out` (a certificate chain for [`Mx`]).
pub fn chain(out: &Path, parts: &[&Path]) -> PathBuf {
    let mut text = String::new();
    for p in parts {
        text.push_str(&std::fs::read_to_string(p).unwrap());
    }
    std::fs::write(out, text).unwrap();
    out.to_path_buf()
}

/// `openssl s_server -WWW` serving a policy as `/.well-known/mta-sts.txt` for
/// `mta-sts.<domain>` on a free port.
pub struct PolicyServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PolicyServer {
    /// Serves `policy` with a test-CA certificate for `mta-sts.<domain>`.
    pub fn start(dns: &TestDns, domain: &str, policy: &str) -> PolicyServer {
        PolicyServer::serve(dns, domain, policy.as_bytes(), false)
    }

    /// Serves `body`, with a self-signed certificate when `self_signed` (not PKIX-valid).
    pub fn serve(dns: &TestDns, domain: &str, body: &[u8], self_signed: bool) -> PolicyServer {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(
            dns,
            dir.path(),
            "sts",
            &[&format!("mta-sts.{domain}")],
            self_signed,
        );
        std::fs::create_dir_all(dir.path().join(".well-known")).unwrap();
        std::fs::write(dir.path().join(".well-known/mta-sts.txt"), body).unwrap();
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

/// A port on 127.0.0.1 no other test of this process was given (so a closed "no policy
/// server here" port never becomes another test's policy server).
pub fn free_port() -> u16 {
    kst_tests::serve::free_port().port()
}

// ---------------------------------------------------------------------------------------------
// The client

/// One client's state: its pending requests and MTA-STS cache in `dir`.
pub struct Run {
    pub dir: tempfile::TempDir,
    /// The HTTPS port for MTA-STS policies (a closed one unless a test serves a policy).
    pub sts_port: u16,
}

impl Run {
    pub fn new() -> Run {
        Run {
            dir: tempfile::Builder::new()
                .prefix("kst-dnssec-")
                .tempdir()
                .unwrap(),
            sts_port: free_port(),
        }
    }

    /// The MTA-STS cache directory (`$XDG_CACHE_HOME/kst/mta-sts`).
    pub fn sts_cache(&self) -> PathBuf {
        self.dir.path().join("cache/kst/mta-sts")
    }

    /// `kst client --account ACCOUNT --json` through `resolver` with the test root's anchor and
    /// the test CA, no client.toml, this run's state file and MTA-STS cache, then `args`.
    pub fn run_client(
        &self,
        dns: &TestDns,
        resolver: &str,
        account: &str,
        args: &[&str],
    ) -> (Output, Value) {
        let mut cmd = Command::new(kst_binary());
        cmd.args(["client", "--account", account, "--json"])
            .args(["--client-config", "/dev/null", "--resolver", resolver])
            .args(["--dns-anchor", dns.var("KST_DNS_ANCHOR")])
            .args(["--ca-file", dns.var("KST_DNS_CA")])
            .arg("--state-file")
            .arg(self.dir.path().join("pending.json"))
            .args(args)
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
            .env("KST_MTA_STS_PORT", self.sts_port.to_string())
            .env_remove("KST_PASSWORD")
            .env_remove("KST_CLIENT_CONFIG")
            .env_remove("KST_ACCOUNT");
        run_json(cmd)
    }

    /// `kst client --account carol@acme.net retrieve ADDRESS --direct --no-wait ARGS`.
    pub fn retrieve(
        &self,
        dns: &TestDns,
        resolver: &str,
        address: &str,
        args: &[&str],
    ) -> (Output, Value) {
        let mut all = vec!["retrieve", address, "--direct", "--no-wait"];
        all.extend_from_slice(args);
        self.run_client(dns, resolver, "carol@acme.net", &all)
    }
}

impl Run {
    /// [`Run::retrieve`] through the main resolver with `mx` standing in for port 25 of every
    /// MX host (`--mx-port`), then `extra`.
    pub fn to(&self, dns: &TestDns, address: &str, mx: &Mx, extra: &[&str]) -> (Output, Value) {
        let port = mx.port.to_string();
        let mut args = vec!["--mx-port", port.as_str()];
        args.extend_from_slice(extra);
        self.retrieve(dns, dns.var("KST_DNS_RESOLVER"), address, &args)
    }
}

/// Asserts a run's exit code and, when given, how the hop was authenticated (`transport`).
pub fn outcome_is(out: &Output, v: &Value, exit: i32, authentication: Option<&str>, what: &str) {
    assert_eq!(code(out), exit, "{what}: {}", show(out, v));
    if let Some(a) = authentication {
        assert_eq!(
            v["transport"]["authentication"],
            a,
            "{what}: {}",
            show(out, v)
        );
    }
}

/// The test DNS's own certificate and key for mail.example.net, mail.acme.net and
/// mail.insecure.net (`KST_DNS_MX_CERT`), issued by the test DNS CA (`KST_DNS_CA`, the one
/// [`Run`] gives the client with `--ca-file`): what an MX that MTA-STS (PKIX) authenticates
/// shows. Unlike [`tlsa_cert`] it is never the test mail system's certificate (another CA,
/// which the TLSA records name when `/tmp/kst-mail` exists), so these tests do not depend on
/// whether scripts/mailsystem.sh ran before scripts/testdns.sh.
pub fn sts_cert(dns: &TestDns) -> (PathBuf, PathBuf) {
    (
        PathBuf::from(dns.var("KST_DNS_MX_CERT")),
        PathBuf::from(dns.var("KST_DNS_MX_KEY")),
    )
}

/// The certificate and key the TLSA records of mail.example.net name.
pub fn tlsa_cert(dns: &TestDns) -> (PathBuf, PathBuf) {
    let cert = PathBuf::from(dns.var("KST_DNS_TLSA_CERT"));
    let key = if cert == Path::new(dns.var("KST_DNS_MX_CERT")) {
        PathBuf::from(dns.var("KST_DNS_MX_KEY"))
    } else {
        cert.with_extension("key")
    };
    (cert, key)
}

pub fn show(out: &Output, v: &Value) -> String {
    format!("exit {}: {v:#}\nstderr: {}", code(out), stderr(out))
}

/// The `error` text of a JSON outcome ("" when there is none).
pub fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}
