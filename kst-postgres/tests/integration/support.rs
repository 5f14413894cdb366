//! Test helpers: a fresh database per test, dropped again at the end, and test keys.

use kst_core::conformance;
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

/// Test key `n` for `address`: series 0 of [`conformance::test_key`], whose fields all derive
/// from `n` ([`conformance::assert_test_record`] checks that they still belong together).
pub fn key(address: &Address, n: u64) -> NewKey {
    conformance::test_key(address, 0, n)
}
