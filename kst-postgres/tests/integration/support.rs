//! Test helpers: a fresh database per test, dropped again at the end, and test keys.

use kst_core::store::TimeoutStore;
use kst_core::{Address, AddressPolicy, NewKey};
use kst_postgres::PostgresStore;
use kst_postgres::with_database;

/// Admin URL of the shared test server.
pub fn admin_url() -> String {
    std::env::var("KST_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own on the test server, dropped (with its connections) when this value is
/// dropped, also when the test panics.
pub struct TestDb {
    admin: String,
    name: String,
    /// URL of the fresh database.
    pub url: String,
}

impl TestDb {
    /// Creates `kst_t_<random>`. Panics (failing the test) when PostgreSQL is unreachable.
    pub async fn new() -> TestDb {
        Self::on(&admin_url()).await
    }

    /// Creates a fresh database on the server of `admin` (a URL of an existing database).
    pub async fn on(admin: &str) -> TestDb {
        let name = format!("kst_t_{:016x}", rand::random::<u64>());
        let mut conn = connect_admin(admin).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE on the test server");
        TestDb {
            admin: admin.to_string(),
            url: with_database(admin, &name),
            name,
        }
    }

    /// A store on this database (migrated), with short timeouts.
    pub async fn store(&self) -> TimeoutStore<PostgresStore> {
        PostgresStore::builder(&self.url)
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect()
            .await
            .expect("connect to the test database")
    }
}

async fn connect_admin(admin: &str) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    match sqlx::PgConnection::connect(admin).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at KST_TEST_POSTGRES_URL (default \
             postgres://postgres:postgres@127.0.0.1:5432/postgres): {e}. \
             Start it with scripts/services.sh."
        ),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime: do the async work on a runtime of its own.
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = result {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A normalized address.
pub fn addr(s: &str) -> Address {
    AddressPolicy {
        case_sensitive_local_part: true,
        unicode_local_parts: true,
        ..Default::default()
    }
    .normalize(s)
    .expect("test address")
}

/// Test key number `n` for `address`: key bytes, fingerprint and publication id all derive from
/// `n`, so a reader can check that a record is internally consistent.
pub fn key(address: &Address, n: u64) -> NewKey {
    NewKey {
        address: address.clone(),
        key: format!("key-{n}-of-{address}").into_bytes(),
        fingerprint: format!("{n:040X}").parse().expect("40 hex digits"),
        publication_id: format!("{n:032x}"),
        published_at: 1_700_000_000 + n,
        revoked: false,
    }
}

/// Whether `r` is exactly what [`key`] makes for its own `n`.
pub fn consistent(r: &kst_core::KeyRecord) -> bool {
    let Ok(n) = u64::from_str_radix(&r.publication_id, 16) else {
        return false;
    };
    let k = key(&r.address, n);
    r.key == k.key && r.fingerprint == k.fingerprint && r.published_at == k.published_at
}
