//! `kst serve` as a child process of a test: started with only the test's own `KST_*`
//! settings, its log in a file, stopped by signal, killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kst_binary;

/// How long the helpers wait for `kst serve` to listen or to exit (a hang guard, not a speed
/// check).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon), never one this process was
/// given before: the kernel may hand a just-released port out again, and a pool of `kst serve`
/// started one after the other would then get the same port twice.
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// `GET path` over a new HTTP/1.1 connection to `at`: the status and the body (0 and the
/// raw text when the reply is not HTTP).
pub fn http_get(at: SocketAddr, path: &str) -> (u16, String) {
    http_request(at, "GET", path, "")
}

/// `METHOD path` with `body` over a new HTTP/1.1 connection to `at`: the status and the body
/// (0 when the reply is not HTTP, e.g. a server that closed before reading a large body).
pub fn http_request(at: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(at).expect("connect to kst serve");
    // A server that refuses a large body may close before reading it all.
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A running `kst serve`.
pub struct ServeProcess {
    child: Child,
    log: PathBuf,
}

impl ServeProcess {
    /// Starts `kst serve` with no `KST_*` variable and no `RUST_LOG` of the test run in its
    /// environment, then lets `configure` add its arguments (`--config`), environment and
    /// working directory. Its stderr goes to `log`. Returns once `ready` (a listener it opens
    /// last, e.g. `[http]` or `[web]`) accepts connections; panics with the log after
    /// [`PATIENCE`].
    pub fn start(
        log: PathBuf,
        ready: SocketAddr,
        configure: impl FnOnce(&mut Command),
    ) -> ServeProcess {
        Self::start_binary(&kst_binary(), log, ready, configure)
    }

    /// [`ServeProcess::start`] with the binary `bin` (e.g.
    /// another build of kst).
    pub fn start_binary(
        bin: &std::path::Path,
        log: PathBuf,
        ready: SocketAddr,
        configure: impl FnOnce(&mut Command),
    ) -> ServeProcess {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KST_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("RUST_LOG").arg("serve");
        configure(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let serve = ServeProcess {
            child: cmd.spawn().expect("spawn kst serve"),
            log,
        };
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(ready).is_err() {
            assert!(
                Instant::now() < deadline,
                "kst serve did not listen on {ready}:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` (e.g. `-TERM`, `-HUP`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for the process to exit; its exit code (-1 when a signal ended it).
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "kst serve did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal("-TERM");
        self.wait()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
