//! Test helpers: a fresh key prefix per test, its keys deleted at the end, and test keys.

use kst_core::conformance;
use kst_core::store::TimeoutStore;
use kst_core::{Address, AddressPolicy, NewKey};
use kst_redis::RedisStore;

/// URL of the shared test server.
pub fn url() -> String {
    std::env::var("KST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A random key prefix on the test server; every key under it is deleted when this value is
/// dropped, also when the test panics.
pub struct TestPrefix {
    /// The server.
    pub url: String,
    /// The prefix, `kst-test-<random>:`.
    pub prefix: String,
}

impl TestPrefix {
    /// A fresh prefix. Panics (failing the test) when Redis is unreachable.
    pub async fn new() -> TestPrefix {
        let t = TestPrefix {
            url: url(),
            prefix: format!("kst-test-{:016x}:", rand::random::<u64>()),
        };
        let mut conn = t.raw().await;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("Redis at {} does not answer: {e}", t.url));
        assert_eq!(pong, "PONG");
        make_durable(&mut conn).await;
        t
    }

    /// A store under this prefix.
    pub async fn store(&self) -> TimeoutStore<RedisStore> {
        RedisStore::connect(&self.url, &self.prefix)
            .await
            .expect("connect to the test Redis")
    }

    /// A plain connection, to look at or damage the stored data.
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url.as_str()).expect("KST_TEST_REDIS_URL");
        match client.get_multiplexed_async_connection().await {
            Ok(c) => c,
            Err(e) => panic!(
                "Redis is not reachable at KST_TEST_REDIS_URL (default redis://127.0.0.1:6379): \
                 {e}. Start it with scripts/services.sh."
            ),
        }
    }

    /// Every key under the prefix.
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.raw().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        keys
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        let cleanup = || -> redis::RedisResult<()> {
            let client = redis::Client::open(self.url.as_str())?;
            let mut conn = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).exec(&mut conn)?;
            }
            Ok(())
        };
        if let Err(e) = cleanup() {
            eprintln!("could not delete the keys under {}: {e}", self.prefix);
        }
    }
}

/// Makes the shared test server durable (`appendonly yes`, `appendfsync always`), as the
/// store requires; scripts/services.sh starts it so, this covers a server started otherwise.
pub async fn make_durable(conn: &mut redis::aio::MultiplexedConnection) {
    for (name, value) in [("appendonly", "yes"), ("appendfsync", "always")] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .exec_async(conn)
            .await
            .unwrap_or_else(|e| panic!("CONFIG SET {name} {value} on the test Redis: {e}"));
    }
}

/// A normalized address (local part kept as written).
pub fn addr(s: &str) -> Address {
    AddressPolicy {
        case_sensitive_local_part: true,
        unicode_local_parts: true,
        ..Default::default()
    }
    .normalize(s)
    .expect("test address")
}

/// Test key `n` for `address`: series 0 of [`conformance::test_key`], whose fields all derive
/// from `n` ([`conformance::assert_test_record`] checks that they still belong together).
pub fn key(address: &Address, n: u64) -> NewKey {
    conformance::test_key(address, 0, n)
}

/// A TCP proxy in front of the test server that counts the commands clients send through it
/// (RESP arrays; each command of a pipeline counts). For tests of round trips per operation.
pub struct CountingProxy {
    /// `redis://` URL of the proxy.
    pub url: String,
    commands: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to the server of
    /// [`url`].
    pub async fn start() -> CountingProxy {
        let upstream = url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let commands = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = commands.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream)
                    .await
                    .unwrap_or_else(|e| panic!("proxy: connect to {upstream}: {e}"));
                tokio::spawn(forward(client, server, counted.clone()));
            }
        });
        CountingProxy {
            url: format!("redis://127.0.0.1:{port}"),
            commands,
        }
    }

    /// Commands sent through the proxy so far.
    pub fn commands(&self) -> usize {
        self.commands.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies both ways, counting the complete commands from the client.
async fn forward(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    commands: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(len) = resp_command_len(&pending) {
            pending.drain(..len);
            commands.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if server_tx.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The length of the complete command (`*<n>\r\n` and n bulk strings) at the start of `b`, if
/// it is all there.
fn resp_command_len(b: &[u8]) -> Option<usize> {
    fn line(b: &[u8], at: usize) -> Option<(usize, usize)> {
        let end = at + b[at..].windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    if b.first() != Some(&b'*') {
        return None;
    }
    let (items, mut at) = line(b, 0)?;
    for _ in 0..items {
        if b.get(at) != Some(&b'$') {
            return None;
        }
        let (len, start) = line(b, at)?;
        at = start + len + 2;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}
