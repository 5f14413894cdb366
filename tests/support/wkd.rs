//! The WKD test bed of `scripts/wkd-testbed.sh`: Debian's gpg, dirmngr, gpg-wks-client, curl
//! and sq resolve example.net, acme.net and their `openpgpkey.` names to a test's own loopback
//! address on port 443, with the test bed's CA in the system trust store.
//!
//! A test brings the bed up ([`WkdTestbed::up`]), picks an address of its own
//! ([`WkdTestbed::free_addr`]), starts `kst serve` with `[web] listen = "<addr>:443"` and the
//! bed's [`WkdTestbed::cert`] / [`WkdTestbed::key`], and runs the clients through a
//! [`WkdView`] with a fresh [`WkdHome`] each. The view is a private mount namespace in which
//! /etc/hosts and /etc/resolv.conf are the test's own; the network is the machine's, so kst
//! stays reachable for Postfix, PostgreSQL and Redis. Needs root. docs/WKD-TESTBED.md has what
//! each client asks and needs.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// `gpg-wks-client` as Debian installs it (not on PATH).
pub const GPG_WKS_CLIENT: &str = "/usr/lib/gnupg/gpg-wks-client";

/// The test bed as `scripts/wkd-testbed.sh up` left it (paths from its env file).
#[derive(Debug, Clone)]
pub struct WkdTestbed {
    script: PathBuf,
    dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Which WKD methods the names of a [`WkdView`] allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WkdMethod {
    /// All four names resolve: gpg uses the advanced method (`openpgpkey.<domain>`).
    Advanced,
    /// `openpgpkey.<domain>` does not resolve: gpg falls back to the direct method.
    DirectOnly,
}

impl WkdTestbed {
    /// Brings the test bed up once per test process (`scripts/wkd-testbed.sh up`: idempotent,
    /// installs what is missing) and returns it. Err says why not (not root, script failed),
    /// so that a test can tell a skipped run from a failed one.
    pub fn up() -> Result<&'static WkdTestbed, String> {
        static BED: OnceLock<Result<WkdTestbed, String>> = OnceLock::new();
        BED.get_or_init(|| {
            if !crate::is_root() {
                return Err(
                    "the WKD test bed needs root (trust store, mount namespaces, port 443)".into(),
                );
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/wkd-testbed.sh");
            let out = Command::new(&script)
                .arg("up")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} up failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Self::from_env_file(script, &String::from_utf8_lossy(&out.stdout))
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Parses the `KEY=value` lines that `up` prints (the state dir's `env` file).
    fn from_env_file(script: PathBuf, env: &str) -> Result<WkdTestbed, String> {
        let get = |name: &str| -> Result<PathBuf, String> {
            env.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(PathBuf::from)
                .ok_or_else(|| format!("wkd-testbed.sh up printed no {name}: {env}"))
        };
        Ok(WkdTestbed {
            script,
            dir: get("KST_WKD_DIR")?,
            ca: get("KST_WKD_CA")?,
            cert: get("KST_WKD_CERT")?,
            key: get("KST_WKD_KEY")?,
        })
    }

    /// The state directory (`KST_WKD_DIR`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The test CA (PEM), already in the system trust store; for clients told a CA file.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The server certificate chain (PEM) for all four names: `[web]`'s certificate file.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// The server's PKCS#8 private key (PEM): `[web]`'s key file.
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// A loopback address 127.1.x.y where port 443 is free now, different for every call in
    /// this process (and, by the process id, most likely from other processes').
    pub fn free_addr() -> Ipv4Addr {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::process::id() % 200;
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            assert!(n < 50_000, "no free 127.1.x.y:443 found");
            // 127.1.<base + n / 250>.<1 + n % 250>; .250 and up are left to the self-check.
            let third = ((base + n / 250) % 250) as u8;
            let addr = Ipv4Addr::new(127, 1, third, 1 + (n % 249) as u8);
            if TcpListener::bind(SocketAddrV4::new(addr, 443)).is_ok() {
                return addr;
            }
        }
    }

    /// A resolver view in which the test bed's names point at `addr` (port 443 there).
    pub fn view(&self, addr: Ipv4Addr, method: WkdMethod) -> WkdView {
        let dir = tempfile::Builder::new()
            .prefix("kst-wkd-view-")
            .tempdir()
            .expect("temp dir");
        let hosts = dir.path().join("hosts");
        let mut cmd = Command::new(&self.script);
        cmd.args(["hosts", &addr.to_string()]);
        if method == WkdMethod::DirectOnly {
            cmd.arg("direct");
        }
        let out = cmd.output().expect("run wkd-testbed.sh hosts");
        assert!(
            out.status.success(),
            "wkd-testbed.sh hosts: {}",
            crate::stderr(&out)
        );
        std::fs::write(&hosts, &out.stdout).expect("write hosts file");
        WkdView {
            script: self.script.clone(),
            hosts,
            addr,
            _dir: dir,
        }
    }
}

/// A resolver view: commands run through it see the test's own /etc/hosts (and a resolv.conf
/// that answers nothing else), and reach the machine's network as usual.
#[derive(Debug)]
pub struct WkdView {
    script: PathBuf,
    hosts: PathBuf,
    addr: Ipv4Addr,
    _dir: tempfile::TempDir,
}

impl WkdView {
    /// The address the names resolve to.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `program` inside the view with `GNUPGHOME=home`, stdin closed; the caller adds
    /// arguments and runs it. gpg starts dirmngr inside the view itself.
    pub fn command(&self, home: &Path, program: &str) -> Command {
        let mut cmd = Command::new(&self.script);
        cmd.arg("run")
            .arg("--hosts")
            .arg(&self.hosts)
            .arg("--")
            .arg("env")
            .arg(format!("GNUPGHOME={}", home.display()))
            .arg(program)
            .stdin(Stdio::null())
            .env_remove("GPG_AGENT_INFO");
        cmd
    }

    /// Runs `program args` inside the view with `GNUPGHOME=home` and returns its output.
    pub fn run(&self, home: &Path, program: &str, args: &[&str]) -> Output {
        self.command(home, program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in the WKD view: {e}"))
    }

    /// `gpg --batch --auto-key-locate clear,nodefault,wkd --locate-keys address`: WKD only.
    pub fn gpg_locate_wkd(&self, home: &Path, address: &str) -> Output {
        self.run(
            home,
            "gpg",
            &[
                "--batch",
                "--no-tty",
                "--auto-key-locate",
                "clear,nodefault,wkd",
                "--locate-keys",
                address,
            ],
        )
    }

    /// `gpg-wks-client ARGS` (Debian's path) inside the view.
    pub fn wks_client(&self, home: &Path, args: &[&str]) -> Output {
        self.run(home, GPG_WKS_CLIENT, args)
    }
}

/// A fresh GnuPG home for one client run; its gpg-agent and dirmngr are ended on drop.
#[derive(Debug)]
pub struct WkdHome {
    dir: tempfile::TempDir,
}

impl Default for WkdHome {
    fn default() -> Self {
        Self::new()
    }
}

impl WkdHome {
    /// An empty home under /tmp (short path: the daemons' sockets live in it).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kst-gh-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        WkdHome { dir }
    }

    /// The GNUPGHOME path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Imports `armored` (public or secret keys) with the machine's gpg.
    pub fn import(&self, armored: &[u8]) {
        use std::io::Write as _;
        let mut child = Command::new("gpg")
            .env("GNUPGHOME", self.path())
            .args(["--batch", "--no-tty", "--import"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gpg must be installed (Debian package gnupg)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(armored)
            .expect("feed gpg");
        let out = child.wait_with_output().expect("gpg runs");
        assert!(
            out.status.success(),
            "gpg --import: {}",
            crate::stderr(&out)
        );
    }

    /// Fingerprints of the public keys in this home, uppercase hex, primary keys only.
    pub fn fingerprints(&self) -> Vec<String> {
        let out = Command::new("gpg")
            .env("GNUPGHOME", self.path())
            .args(["--batch", "--with-colons", "--list-keys"])
            .output()
            .expect("gpg runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fprs = Vec::new();
        let mut want = false;
        for line in text.lines() {
            if line.starts_with("pub:") {
                want = true;
            } else if want && line.starts_with("fpr:") {
                fprs.extend(line.split(':').nth(9).map(str::to_owned));
                want = false;
            }
        }
        fprs
    }
}

impl Drop for WkdHome {
    fn drop(&mut self) {
        // Unix sockets in the home: reachable from outside the view too.
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.path())
            .args(["--kill", "all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
