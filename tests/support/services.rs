//! A PostgreSQL database and a Redis key prefix of a test's own on the shared test servers,
//! removed again when the test ends (also when it panics).

/// Admin URL of the shared PostgreSQL server: `KST_TEST_POSTGRES_URL`, default
/// `postgres://postgres:postgres@127.0.0.1:5432/postgres` (the password is ignored under trust
/// authentication).
pub fn postgres_admin_url() -> String {
    std::env::var("KST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// URL of the shared Redis server: `KST_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("KST_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Runs `fut` to completion on a runtime of its own, on a thread of its own (so that it also
/// works inside a test's runtime and in `Drop`).
fn block_on<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(fut)
    })
    .join()
    .expect("helper thread")
}

async fn admin_sql(admin: String, sql: String) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// A fresh database `kst_test_<random>` on the shared PostgreSQL server, dropped (with its
/// connections) when this value is dropped.
pub struct TestDb {
    admin: String,
    name: String,
    /// URL of the database.
    pub url: String,
}

impl TestDb {
    /// Creates the database. Panics (failing the test) when PostgreSQL is unreachable.
    pub fn new() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("kst_test_{:016x}", rand::random::<u64>());
        if let Err(e) = block_on(admin_sql(admin.clone(), format!("CREATE DATABASE {name}"))) {
            panic!(
                "cannot create a test database at KST_TEST_POSTGRES_URL ({}): {e}. \
                 Start PostgreSQL with scripts/services.sh.",
                admin
            );
        }
        TestDb {
            url: with_database(&admin, &name),
            admin,
            name,
        }
    }

    /// The database as a [`TestKst`](crate::TestKst)'s key store.
    pub fn store(&self) -> crate::Store {
        crate::Store::Postgres(self.url.clone())
    }

    /// Runs `sql` in the database (what an operator or an intruder with a `psql` would do);
    /// panics, failing the test, when it fails.
    pub fn execute(&self, sql: &str) {
        if let Err(e) = block_on(admin_sql(self.url.clone(), sql.to_string())) {
            panic!("{sql}: {e}");
        }
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = block_on(admin_sql(self.admin.clone(), sql)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A random key prefix `kst-test-<random>:` on the shared Redis server; every key under it is
/// deleted when this value is dropped.
pub struct TestPrefix {
    /// The server.
    pub url: String,
    /// The prefix.
    pub prefix: String,
}

impl TestPrefix {
    /// A fresh prefix. Panics (failing the test) when Redis is unreachable.
    pub fn new() -> TestPrefix {
        let t = TestPrefix {
            url: redis_url(),
            prefix: format!("kst-test-{:016x}:", rand::random::<u64>()),
        };
        if let Err(e) = t.keys() {
            panic!(
                "Redis is not reachable at KST_TEST_REDIS_URL ({}): {e}. Start it with \
                 scripts/services.sh.",
                t.url
            );
        }
        t.make_durable();
        t
    }

    /// Makes the shared server durable (`appendonly yes`, `appendfsync always`), which
    /// kst-redis requires; scripts/services.sh starts it so, this covers one started otherwise.
    fn make_durable(&self) {
        let mut conn = self.connection().expect("Redis connection");
        for (name, value) in [("appendonly", "yes"), ("appendfsync", "always")] {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .exec(&mut conn)
                .unwrap_or_else(|e| panic!("CONFIG SET {name} {value} on the test Redis: {e}"));
        }
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url.as_str())?
            .get_connection_with_timeout(std::time::Duration::from_secs(5))
    }

    /// The prefix as a [`TestKst`](crate::TestKst)'s key store.
    pub fn store(&self) -> crate::Store {
        crate::Store::Redis {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// Every key under the prefix (SCAN, so the shared server is not blocked).
    pub fn keys(&self) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.connection()?;
        let mut keys: Vec<String> = conn
            .scan_match::<_, String>(format!("{}*", self.prefix))?
            .collect::<redis::RedisResult<_>>()?;
        keys.sort();
        Ok(keys)
    }
}

impl Default for TestPrefix {
    fn default() -> Self {
        Self::new()
    }
}

use kst_postgres::with_database;
use redis::Commands as _;

impl Drop for TestPrefix {
    fn drop(&mut self) {
        let cleanup = || -> redis::RedisResult<()> {
            let keys = self.keys()?;
            let mut conn = self.connection()?;
            for chunk in keys.chunks(500) {
                redis::cmd("DEL").arg(chunk).exec(&mut conn)?;
            }
            Ok(())
        };
        if let Err(e) = cleanup() {
            eprintln!("could not delete the keys under {}: {e}", self.prefix);
        }
    }
}
