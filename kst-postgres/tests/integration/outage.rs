//! Outage: a throwaway PostgreSQL cluster of this test's own is stopped and started again under
//! a live store. (The shared server on 5432 is never touched.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use kst_core::{Error, KeyStore, PublishOutcome};
use kst_postgres::PostgresStore;
use tokio::process::Command;

use crate::support::{addr, key};

/// A PostgreSQL cluster in a temporary directory, run as the `postgres` OS user (initdb refuses
/// root), listening on a free port of 127.0.0.1 with trust authentication.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

impl Cluster {
    async fn init() -> Cluster {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("kst-pg-outage-")
            .tempdir()
            .expect("temp dir");
        let as_root = run("id", &["-u"]).await.trim() == "0";
        if as_root {
            run("chown", &["postgres:", path(dir.path())]).await;
        }
        let port = free_port();
        let c = Cluster {
            dir,
            bin,
            port,
            as_root,
        };
        let data = c.data();
        c.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )
        .await;
        c
    }

    fn data(&self) -> String {
        format!("{}/data", path(self.dir.path()))
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c shared_buffers=16MB -c fsync=on",
            self.port,
            path(self.dir.path())
        );
        let log = format!("{}/log", path(self.dir.path()));
        let data = self.data();
        self.pg(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
            ],
        )
        .await;
    }

    /// Stops like a crash (no shutdown checkpoint): committed work must survive via the WAL.
    async fn crash(&self) {
        let data = self.data();
        self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .await;
    }

    /// Runs a PostgreSQL program as the `postgres` user; panics when it fails.
    async fn pg(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let exe = path(&exe);
        let out = if self.as_root {
            let mut all = vec!["-u", "postgres", "--", exe];
            all.extend_from_slice(args);
            Command::new("runuser").args(&all).output().await
        } else {
            Command::new(exe).args(args).output().await
        }
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Best effort, also when the test failed half-way; the directory goes with `dir`.
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = [path(&exe), "-D", &data, "-m", "immediate", "stop"];
        let mut cmd = if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        } else {
            let mut c = std::process::Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let _ = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or `KST_TEST_PG_BIN`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("KST_TEST_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (run scripts/services.sh)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql")
        .1
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

async fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test if `fut` hangs: every operation must give up by itself well before this.
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hung with the server down"))
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, r: kst_core::Result<T>) {
    match r {
        Err(e @ Error::Unavailable { .. }) => assert!(e.is_temporary()),
        other => panic!("{what} with the server down: expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn server_outage_gives_temporary_errors_and_the_store_recovers() {
    let cluster = Cluster::init().await;
    cluster.start().await;
    let store = PostgresStore::builder(cluster.url())
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the throwaway cluster");
    let a = addr("outage@example.net");
    let b = addr("other@example.net");
    let mut accepted = Vec::new();
    for n in 1..=3 {
        accepted.push(store.publish(key(&a, n)).await.unwrap().record().clone());
    }
    store.publish(key(&b, 1)).await.unwrap();

    cluster.crash().await;

    // Every operation at once: each gives up by itself after about the acquire timeout.
    let (publish, republish, get, history, list, delete, restore, check) =
        bounded("operations", async {
            tokio::join!(
                store.publish(key(&a, 4)),
                store.publish(key(&a, 2)),
                store.get(&a),
                store.history(&a),
                store.list(None, 10),
                store.delete(&b),
                store.restore(&accepted[..1]),
                store.check(),
            )
        })
        .await;
    assert_unavailable("publish", publish);
    assert_unavailable("republish", republish);
    assert_unavailable("get", get);
    assert_unavailable("history", history);
    assert_unavailable("list", list);
    assert_unavailable("delete", delete);
    assert_unavailable("restore", restore);
    assert_unavailable("check", check);
    // A store opened lazily during the outage fails the same way.
    let late = PostgresStore::builder(cluster.url())
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy()
        .unwrap();
    assert_unavailable("lazy get", bounded("lazy get", late.get(&a)).await);
    assert_unavailable(
        "connect",
        bounded("connect", PostgresStore::connect(&cluster.url())).await,
    );

    cluster.start().await;

    // The same store reconnects by itself; the server may need a moment after recovery.
    let mut recovered = false;
    for _ in 0..50 {
        if store.check().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the store did not reconnect after the restart");

    assert_eq!(store.history(&a).await.unwrap(), accepted);
    assert_eq!(store.get(&b).await.unwrap().unwrap().version, 1);
    // The publication refused during the outage goes through on retry, exactly once.
    assert_eq!(
        store.publish(key(&a, 4)).await.unwrap(),
        PublishOutcome::Published(key(&a, 4).into_record(4))
    );
    assert!(matches!(
        store.publish(key(&a, 4)).await.unwrap(),
        PublishOutcome::Unchanged(_)
    ));
    // The lazily opened store remembers its failed probe for a moment (`RETRY_PROBE`), then
    // probes again by itself: it answers within a few seconds without being rebuilt.
    let mut late_answer = late.get(&a).await;
    for _ in 0..50 {
        if late_answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        late_answer = late.get(&a).await;
    }
    assert_eq!(late_answer.unwrap().unwrap().version, 4);
}

/// A pooled connection whose backend went away while it sat idle (a restart, a firewall) is
/// pinged before its next use and replaced: the operation succeeds. Connections in steady use
/// are not pinged first (see the builder); a dead one of those fails one operation with a
/// temporary error and is then dropped.
#[tokio::test]
async fn an_idle_connection_whose_backend_died_is_replaced() {
    let db = crate::support::TestDb::new().await;
    let store = kst_postgres::PostgresStore::builder(&db.url)
        .max_connections(1)
        .connect()
        .await
        .unwrap();
    let a = addr("idle@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    // Kill the pooled connection's backend from outside.
    let admin = kst_postgres::PostgresStore::builder(&db.url)
        .max_connections(1)
        .run_migrations(false)
        .connect()
        .await
        .unwrap();
    let own: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(admin.inner().pool())
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'kst' AND pid <> $1) t",
    )
    .bind(own)
    .fetch_one(admin.inner().pool())
    .await
    .unwrap();
    assert!(killed >= 1, "the store's pooled connection");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let got = store
        .get(&a)
        .await
        .expect("a dead idle connection is replaced, not used");
    assert!(got.is_some());
}
