//! Outage: a throwaway `redis-server` of this test's own is killed, frozen and restarted under a
//! live store. (The shared server on 6379 is never touched.)

use std::time::Duration;

use kst_core::store::TimeoutStore;
use kst_core::{Error, KeyStore, PublishOutcome};
use kst_redis::RedisStore;
use tokio::process::{Child, Command};

use crate::support::{addr, key};

/// A `redis-server` on a free port of 127.0.0.1 with an fsync-always append-only file in a
/// temporary directory, so a restart keeps everything that was acknowledged.
pub(crate) struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Arguments that replace the durable defaults (`--appendonly yes --appendfsync always`).
    settings: Vec<String>,
}

impl Server {
    async fn start_new() -> Server {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    }

    /// A throwaway server with these persistence (or other) settings.
    pub(crate) async fn start_with(settings: &[&str]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("kst-redis-outage-")
            .tempdir()
            .expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = Server {
            dir,
            port,
            child: None,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        s.start().await;
        s
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) {
        let dir = self.dir.path().to_str().expect("UTF-8 temp path");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(&self.settings)
            .args(["--dir", dir, "--logfile", "redis.log"])
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (run scripts/services.sh to install it)");
        self.child = Some(child);
        // Wait until it answers (it reloads the append-only file first).
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the throwaway redis-server did not come up");
    }

    /// SIGKILL: no shutdown, no final save.
    pub(crate) async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.expect("kill redis-server");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // A frozen server must be thawed to die cleanly; kill_on_drop sends SIGKILL.
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
        }
    }
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

async fn all_operations_fail_temporarily(store: &TimeoutStore<RedisStore>, when: &str) {
    let a = addr("outage@example.net");
    let b = addr("other@example.net");
    let restored = [key(&a, 9).into_record(1)];
    let (publish, republish, get, history, list, delete, restore, check) = bounded(when, async {
        tokio::join!(
            store.publish(key(&a, 4)),
            store.publish(key(&a, 2)),
            store.get(&a),
            store.history(&a),
            store.list(None, 10),
            store.delete(&b),
            store.restore(&restored),
            store.check(),
        )
    })
    .await;
    assert_unavailable(&format!("publish {when}"), publish);
    assert_unavailable(&format!("republish {when}"), republish);
    assert_unavailable(&format!("get {when}"), get);
    assert_unavailable(&format!("history {when}"), history);
    assert_unavailable(&format!("list {when}"), list);
    assert_unavailable(&format!("delete {when}"), delete);
    assert_unavailable(&format!("restore {when}"), restore);
    assert_unavailable(&format!("check {when}"), check);
}

async fn wait_until_back(store: &TimeoutStore<RedisStore>) {
    for _ in 0..50 {
        if store.check().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the store did not reconnect after the server came back");
}

#[tokio::test]
async fn server_outage_gives_temporary_errors_and_the_store_recovers() {
    let mut server = Server::start_new().await;
    let store = RedisStore::builder(server.url())
        .prefix("kst:")
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the throwaway server");
    let a = addr("outage@example.net");
    let b = addr("other@example.net");
    let mut accepted = Vec::new();
    for n in 1..=3 {
        accepted.push(store.publish(key(&a, n)).await.unwrap().record().clone());
    }
    store.publish(key(&b, 1)).await.unwrap();

    // Down: connection refused.
    server.kill().await;
    all_operations_fail_temporarily(&store, "while the server is down").await;
    let late = RedisStore::builder(server.url())
        .connection_timeout(Duration::from_secs(1))
        .connect_lazy()
        .unwrap();
    assert_unavailable("lazy get", bounded("lazy get", late.get(&a)).await);
    assert_unavailable(
        "connect",
        bounded("connect", RedisStore::connect(&server.url(), "kst:")).await,
    );

    // Back on the same port with the same data directory: nothing acknowledged is lost.
    server.start().await;
    wait_until_back(&store).await;
    assert_eq!(store.history(&a).await.unwrap(), accepted);
    assert_eq!(store.get(&b).await.unwrap().unwrap().version, 1);
    assert_eq!(
        store.publish(key(&a, 4)).await.unwrap(),
        PublishOutcome::Published(key(&a, 4).into_record(4))
    );
    // The lazy store's last connection attempt failed during the outage; its first call after
    // the restart must still succeed (the stale "connection refused" is retried).
    assert_eq!(late.get(&a).await.unwrap().unwrap().version, 4);

    // Frozen (accepts nothing, answers nothing): the response timeout bounds every call.
    server.signal("-STOP");
    all_operations_fail_temporarily(&store, "while the server is frozen").await;
    server.signal("-CONT");
    wait_until_back(&store).await;
    assert!(matches!(
        store.publish(key(&a, 4)).await.unwrap(),
        PublishOutcome::Unchanged(_)
    ));
    assert_eq!(store.history(&a).await.unwrap().len(), 4);
}
