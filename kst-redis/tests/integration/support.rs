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
