//! The durability guard (`appendonly yes` + `appendfsync always`, read with `CONFIG GET`),
//! `min_replicas` (`WAIT`) and `topology`, on throwaway servers of these tests' own (the shared
//! server is only read).

use std::time::Duration;

use kst_core::{Error, KeyStore};
use kst_redis::RedisStore;

use crate::outage::Server;
use crate::support::{TestPrefix, addr, key};

fn assert_refused(what: &str, r: kst_core::Result<impl std::fmt::Debug>, words: &[&str]) {
    match r {
        Err(Error::Config(m)) => {
            for w in words {
                assert!(m.contains(w), "{what}: the error does not say {w:?}: {m}");
            }
        }
        other => panic!("{what}: expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_that_does_not_fsync_every_write_is_refused() {
    for settings in [
        &["--appendonly", "no"][..],
        &["--appendonly", "yes", "--appendfsync", "everysec"][..],
    ] {
        let server = Server::start_with(settings).await;
        let what = format!("{settings:?}");
        assert_refused(
            &what,
            RedisStore::connect(&server.url(), "kst:").await,
            &["appendfsync always", "appendonly yes"],
        );
        // require_durable = false only covers a CONFIG that cannot be read.
        assert_refused(
            &what,
            RedisStore::builder(server.url())
                .require_durable(false)
                .connect()
                .await,
            &["not durable"],
        );
        // A daemon started lazily refuses every publication and fails /readyz meanwhile...
        let lazy = RedisStore::builder(server.url()).connect_lazy().unwrap();
        let a = addr("uma@example.net");
        assert_refused(&what, lazy.publish(key(&a, 1)).await, &["appendonly"]);
        assert_refused(&what, lazy.check().await, &["appendonly"]);
        assert_eq!(lazy.get(&a).await.unwrap(), None);
        // ...until the operator fixes the server.
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        crate::support::make_durable(&mut c).await;
        lazy.check().await.unwrap();
        lazy.publish(key(&a, 1)).await.unwrap();
        RedisStore::connect(&server.url(), "kst:").await.unwrap();
    }
}

#[tokio::test]
async fn an_unreadable_config_is_refused_unless_durability_is_waived() {
    let server = Server::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--rename-command",
        "CONFIG",
        "",
    ])
    .await;
    assert_refused(
        "renamed CONFIG",
        RedisStore::connect(&server.url(), "kst:").await,
        &["CONFIG GET", "require_durable = false"],
    );
    let store = RedisStore::builder(server.url())
        .require_durable(false)
        .connect()
        .await
        .unwrap();
    let a = addr("vera@example.net");
    store.publish(key(&a, 1)).await.unwrap();
    let topology = store.topology().await.unwrap();
    assert!(
        topology.contains(&("redis_appendonly".into(), "unreadable".into())),
        "{topology:?}"
    );
}

#[tokio::test]
async fn min_replicas_confirms_only_what_a_replica_acknowledged() {
    let primary = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let port = primary.url().rsplit(':').next().unwrap().to_string();
    let mut replica = Server::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--replicaof",
        "127.0.0.1",
        &port,
    ])
    .await;
    let store = RedisStore::builder(primary.url())
        .min_replicas(1)
        .replica_timeout(Duration::from_millis(2000))
        .connect()
        .await
        .unwrap();
    // The replica attaches in the background: the first publications may time out.
    let a = addr("wes@example.net");
    let mut confirmed = None;
    for _ in 0..50 {
        match store.publish(key(&a, 1)).await {
            Ok(o) => {
                confirmed = Some(o);
                break;
            }
            Err(e) => {
                assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let confirmed = confirmed.expect("the replica never acknowledged");
    let replica_store = RedisStore::builder(replica.url()).connect_lazy().unwrap();
    assert_eq!(
        replica_store.inner().get(&a).await.unwrap().as_ref(),
        Some(confirmed.record())
    );
    let topology = store.topology().await.unwrap();
    assert!(
        topology.contains(&("redis_connected_replicas".into(), "1".into())),
        "{topology:?}"
    );
    assert!(
        topology.contains(&("redis_min_replicas".into(), "1".into())),
        "{topology:?}"
    );
    // Without the replica, a publication is applied on the primary but not confirmed.
    replica.kill().await;
    let b = addr("xena@example.net");
    let err = store.publish(key(&b, 2)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { message, .. } if message.contains("min_replicas")),
        "{err:?}"
    );
    assert!(store.get(&b).await.unwrap().is_some());
}

#[tokio::test]
async fn topology_of_one_durable_server() {
    let t = TestPrefix::new().await;
    let store = t.store().await;
    let topology = store.topology().await.unwrap();
    for pair in [
        ("redis_mode", "single"),
        ("redis_role", "master"),
        ("redis_appendonly", "yes"),
        ("redis_appendfsync", "always"),
        ("redis_min_replicas", "0"),
        ("redis_require_durable", "true"),
    ] {
        assert!(
            topology.contains(&(pair.0.to_string(), pair.1.to_string())),
            "{pair:?} missing from {topology:?}"
        );
    }
    assert!(
        topology
            .iter()
            .any(|(k, _)| k == "redis_connected_replicas")
    );
}
