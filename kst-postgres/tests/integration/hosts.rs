//! Several hosts for one store (issue 16), on the one test server: a host that cannot be
//! reached is passed over, two hosts that both accept writes stop every write, read replicas
//! answer the look-ups and nothing else. The failover itself (a promoted standby, the old
//! primary still running) is drilled in tests/drill_postgres.rs.

use std::collections::BTreeMap;
use std::time::Duration;

use kst_core::conformance::lookup::real_key;
use kst_core::{Error, KeyStore};
use kst_postgres::PostgresStore;

use crate::support::{TestDb, addr};

/// `url` with its `host:port` replaced by `hosts` (a comma-separated list).
fn with_hosts(url: &str, hosts: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (auth, tail) = rest.split_at(rest.find('/').expect("a database"));
    let userinfo = auth
        .rsplit_once('@')
        .map_or(String::new(), |(u, _)| format!("{u}@"));
    format!("{scheme}://{userinfo}{hosts}{tail}")
}

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn host_of(url: &str) -> String {
    let rest = url.split_once("://").expect("scheme").1;
    let auth = &rest[..rest.find('/').expect("database")];
    auth.rsplit_once('@').map_or(auth, |(_, h)| h).to_string()
}

async fn topology(store: &dyn KeyStore) -> BTreeMap<String, String> {
    store
        .topology()
        .await
        .expect("topology")
        .into_iter()
        .collect()
}

#[tokio::test]
async fn an_unreachable_host_is_passed_over_and_topology_names_the_primary() {
    let db = TestDb::new().await;
    let real = host_of(&db.url);
    let dead = format!("127.0.0.1:{}", closed_port());
    let url = with_hosts(&db.url, &format!("{dead},{real}")) + "?target_session_attrs=read-write";
    let store = PostgresStore::builder(&url)
        .acquire_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("the reachable host is chosen");
    let a = addr("lin@example.net");
    store
        .publish(real_key(&a, "alice", 1, false))
        .await
        .expect("publish on the reachable host");
    let t = topology(&store).await;
    assert_eq!(t["primary"], real, "{t:?}");
    assert_eq!(t["hosts"], format!("{dead},{real}"));
    assert_eq!(t["synchronous_commit"], "on", "{t:?}");
    assert_eq!(t["sync_standby_attached"], "false", "{t:?}");
    assert_eq!(t["confirm_after_sync_standby"], "false", "{t:?}");
    store.check().await.expect("ready");
}

#[tokio::test]
async fn two_hosts_that_accept_writes_stop_every_write() {
    let db = TestDb::new().await;
    let a = addr("max@example.net");
    db.store()
        .await
        .publish(real_key(&a, "alice", 1, false))
        .await
        .unwrap();
    // The same server under two names: to kst, two hosts that both accept writes.
    let port = host_of(&db.url)
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .unwrap();
    let url = with_hosts(&db.url, &format!("127.0.0.1:{port},localhost:{port}"));
    let store = PostgresStore::builder(&url)
        .run_migrations(false)
        .connect_lazy()
        .expect("a valid host list");
    let err = store
        .publish(real_key(&a, "bob", 2, false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unavailable { .. }) && err.is_temporary(),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("2 hosts accept writes at once"),
        "{err}"
    );
    let err = store.get(&a).await.unwrap_err();
    assert!(err.is_temporary(), "{err:?}");
    assert!(store.check().await.unwrap_err().is_temporary());
    let t = topology(&store).await;
    assert_eq!(t["primary"], "none", "{t:?}");
    assert!(t["problem"].contains("accept writes at once"), "{t:?}");
    // Nothing was written.
    let current = db.store().await.get(&a).await.unwrap().unwrap();
    assert_eq!(current.version, 1);
}

#[tokio::test]
async fn read_replicas_answer_the_look_ups_and_nothing_else() {
    let primary = TestDb::new().await;
    let replica = TestDb::new().await;
    let a = addr("ned@example.net");
    // The "replica" (another database) holds another key for the address: whatever a read
    // returns shows where it was read.
    let on_primary = primary
        .store()
        .await
        .publish(real_key(&a, "alice", 1, false))
        .await
        .unwrap()
        .record()
        .clone();
    let on_replica = replica
        .store()
        .await
        .publish(real_key(&a, "bob", 1, false))
        .await
        .unwrap()
        .record()
        .clone();
    let store = PostgresStore::builder(&primary.url)
        .read_urls(vec![replica.url.clone()])
        .connect()
        .await
        .unwrap();
    assert_eq!(store.get(&a).await.unwrap().unwrap(), on_primary);
    assert_eq!(store.history(&a).await.unwrap(), vec![on_primary.clone()]);
    assert_eq!(
        store
            .find_by_fingerprint(&on_replica.fingerprint, 5)
            .await
            .unwrap(),
        vec![on_replica.clone()]
    );
    assert!(
        store
            .find_by_fingerprint(&on_primary.fingerprint, 5)
            .await
            .unwrap()
            .is_empty()
    );
    let hash = kst_core::wkd::WkdHash::of_address(&a);
    assert_eq!(
        store.find_by_wkd_hash(a.domain(), &hash).await.unwrap(),
        Some(on_replica)
    );
    let t = topology(&store).await;
    assert_eq!(t["read_replicas"], host_of(&replica.url), "{t:?}");

    // A replica that cannot be reached: the primary answers instead.
    let dead = with_hosts(&replica.url, &format!("127.0.0.1:{}", closed_port()));
    let store = PostgresStore::builder(&primary.url)
        .read_urls(vec![dead])
        .acquire_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    assert_eq!(
        store
            .find_by_fingerprint(&on_primary.fingerprint, 5)
            .await
            .unwrap(),
        vec![on_primary]
    );
}
