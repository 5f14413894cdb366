//! Issue 18: with the key directory on PostgreSQL, a publication commits its key with
//! `synchronous_commit = off` and is confirmed only after a synchronous commit on the same
//! server that covers it (docs/TRANSPARENCY.md, "Write order, as built"). On real PostgreSQL
//! (a fresh database each), with the calls that reach the key store and the directory's
//! backend watched:
//!
//! - `a_publication_returns_after_the_epoch_that_covers_its_key`: the key's transaction is
//!   unsynced, the epoch recording it commits after it and before the call returns, and the
//!   server's WAL is flushed past the key's commit when it returns; no extra write.
//! - `a_key_the_directory_holds_already_gets_a_synchronous_write`: a redelivery, at the same
//!   instance and at another instance of the pool, whose key the directory holds (no epoch):
//!   the call returns only after `sync_published`, whose commit flushed the WAL past it.
//! - `a_directory_failure_is_a_temporary_failure_and_the_redelivery_records_it`: the
//!   directory's commit fails: the publication is a temporary failure (the MTA retries),
//!   nothing is confirmed; the redelivery is recorded and confirmed after its epoch.
//! - `only_a_directory_on_the_same_server_makes_publications_unsynced`: without
//!   `with_unsynced_publications`, or for a domain without a log, the key commits
//!   synchronously (`publish`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kst_core::conformance::{address, test_key};
use kst_core::store::{NewKey, PublishOutcome};
use kst_core::testing::{DelegatingDirectory, DelegatingStore, DirectoryHooks, StoreHooks};
use kst_core::transparency::{
    DirectoryStore, DirectoryStoreError, DomainLog, LogKeys, RecordBatch, TransparentStore,
};
use kst_core::{Address, KeyStore, Result};
use kst_postgres::{PgDirectoryStore, PostgresStore};
use kst_tests::TestDb;
use sqlx::PgPool;

const D: &str = "unsynced.example";

/// What reached the key store or the directory's backend, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// `publish` returned (synchronous); the WAL insert position right after.
    Published(u64),
    /// `publish_unsynced` returned; the WAL insert position right after (at or past the
    /// end of the key's commit record).
    PublishedUnsynced(u64),
    /// `sync_published` returned; the WAL flush position right after.
    Synced(u64),
    /// An epoch's commit returned `Ok`; the WAL flush position right after.
    EpochCommitted(u64),
    /// An epoch's commit failed (made to fail by the test).
    EpochFailed,
}

type Events = Arc<Mutex<Vec<Event>>>;

/// A position in the WAL as a number (`pg_lsn` minus `0/0`), read by `sql`.
async fn lsn(pool: &PgPool, sql: &'static str) -> u64 {
    let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
    u64::try_from(n).unwrap()
}

/// How far WAL was inserted (at or past the end of every commit record written so far).
async fn insert_lsn(pool: &PgPool) -> u64 {
    lsn(
        pool,
        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
    )
    .await
}

/// How far WAL is flushed to disk.
async fn flush_lsn(pool: &PgPool) -> u64 {
    lsn(
        pool,
        "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint",
    )
    .await
}

/// Over the real PostgreSQL key store: its writes logged.
struct Watched {
    pool: PgPool,
    events: Events,
    /// When set, the next unsynced publication goes to this store instead (the old primary
    /// of a failover: the key's commit reached it, the writer then reads the new one).
    old_primary: Mutex<Option<Arc<dyn KeyStore>>>,
}

#[async_trait]
impl StoreHooks for Watched {
    async fn publish(&self, inner: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
        let outcome = inner.publish(key).await?;
        let at = insert_lsn(&self.pool).await;
        self.events.lock().unwrap().push(Event::Published(at));
        Ok(outcome)
    }
    async fn publish_unsynced(&self, inner: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
        let old_primary = self.old_primary.lock().unwrap().take();
        if let Some(old_primary) = old_primary {
            return old_primary.publish_unsynced(key).await;
        }
        let outcome = inner.publish_unsynced(key).await?;
        let at = insert_lsn(&self.pool).await;
        self.events
            .lock()
            .unwrap()
            .push(Event::PublishedUnsynced(at));
        Ok(outcome)
    }
    async fn sync_published(&self, inner: &dyn KeyStore) -> Result<()> {
        inner.sync_published().await?;
        let at = flush_lsn(&self.pool).await;
        self.events.lock().unwrap().push(Event::Synced(at));
        Ok(())
    }
}

/// The hooks of the real PostgreSQL directory backend: its commits logged (and failed on
/// demand).
struct WatchedDirectory {
    pool: PgPool,
    events: Events,
    fail_commits: AtomicBool,
}

#[async_trait]
impl DirectoryHooks for WatchedDirectory {
    async fn commit(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        batch: RecordBatch,
    ) -> std::result::Result<(), DirectoryStoreError> {
        // Only epochs (a root) fail: the first nodes of a new directory are written before.
        if self.fail_commits.load(Ordering::SeqCst) && batch.root.is_some() {
            self.events.lock().unwrap().push(Event::EpochFailed);
            return Err(DirectoryStoreError::Unavailable(
                "the test made this commit fail".into(),
            ));
        }
        let epoch = batch.root.is_some();
        inner.commit(domain, batch).await?;
        if epoch {
            let at = flush_lsn(&self.pool).await;
            self.events.lock().unwrap().push(Event::EpochCommitted(at));
        }
        Ok(())
    }
}

/// One instance of a pool on `db`: its key store and directory handles (pools of their own),
/// watched, and the `TransparentStore` over them.
struct Instance {
    store: Arc<TransparentStore>,
    watched: Arc<DelegatingStore<Watched>>,
    log: Arc<DomainLog>,
    directory: Arc<DelegatingDirectory<WatchedDirectory>>,
    events: Events,
    pool: PgPool,
}

impl Instance {
    async fn new(db: &TestDb, keys: &LogKeys, unsynced: bool) -> Instance {
        let events: Events = Arc::default();
        let pg = PostgresStore::connect(&db.url).await.unwrap();
        let pool = pg.inner().pool().clone();
        let store = Arc::new(DelegatingStore::new(
            Arc::new(pg),
            Watched {
                pool: pool.clone(),
                events: Arc::clone(&events),
                old_primary: Mutex::new(None),
            },
        ));
        let watched = Arc::clone(&store);
        let directory = Arc::new(DelegatingDirectory::new(
            Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
            WatchedDirectory {
                pool: pool.clone(),
                events: Arc::clone(&events),
                fail_commits: AtomicBool::new(false),
            },
        ));
        let keys = LogKeys::parse(&keys.to_file()).unwrap();
        let dyn_directory: Arc<dyn DirectoryStore> = directory.clone();
        let log = Arc::new(DomainLog::open(dyn_directory, keys).await.unwrap());
        let mut transparent = TransparentStore::new(store, vec![Arc::clone(&log)]);
        if unsynced {
            transparent = transparent.with_unsynced_publications();
        }
        Instance {
            store: Arc::new(transparent),
            watched,
            log,
            directory,
            events,
            pool,
        }
    }

    /// Publishes one key for `warm-up@` and forgets what it caused: the directory's empty
    /// tree and first epoch are written by then.
    async fn warm_up(&self) {
        let who = address(&format!("warm-up@{D}"));
        self.store.publish(test_key(&who, 9, 0)).await.unwrap();
        self.take();
    }

    /// The events so far, emptied.
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// The version the directory's latest entry for `address` records.
    async fn latest_version(&self, address: &Address) -> Option<u64> {
        let entries = self.log.entries(address).await.unwrap();
        entries.last().map(|(_, e)| e.version)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publication_returns_after_the_epoch_that_covers_its_key() {
    let db = TestDb::new();
    let keys = LogKeys::generate(D);
    let a = Instance::new(&db, &keys, true).await;
    a.warm_up().await;
    for n in 0..3u64 {
        let alice = address(&format!("alice{n}@{D}"));
        let outcome = a.store.publish(test_key(&alice, 1, n)).await.unwrap();
        assert!(
            matches!(outcome, PublishOutcome::Published(_)),
            "{outcome:?}"
        );
        // Taken after the call returned: the WAL must be durable past the key's commit.
        let flushed = flush_lsn(&a.pool).await;
        let events = a.take();
        let [Event::PublishedUnsynced(key), Event::EpochCommitted(epoch)] = events[..] else {
            panic!("publication {n}: the key unsynced, then one epoch, nothing else: {events:?}");
        };
        assert!(
            epoch >= key,
            "publication {n}: the epoch's commit (WAL flushed to {epoch}) covers the key's \
             (inserted up to {key})"
        );
        assert!(
            flushed >= key,
            "publication {n}: flushed {flushed} < key {key}"
        );
        assert_eq!(a.latest_version(&alice).await, Some(1), "publication {n}");
    }
    // A new version of an address: the same order.
    let alice = address(&format!("alice0@{D}"));
    a.store.publish(test_key(&alice, 2, 0)).await.unwrap();
    let events = a.take();
    assert!(
        matches!(
            events[..],
            [Event::PublishedUnsynced(k), Event::EpochCommitted(e)] if e >= k
        ),
        "{events:?}"
    );
    assert_eq!(a.latest_version(&alice).await, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_the_directory_holds_already_gets_a_synchronous_write() {
    let db = TestDb::new();
    let keys = LogKeys::generate(D);
    let a = Instance::new(&db, &keys, true).await;
    a.warm_up().await;
    let b = Instance::new(&db, &keys, true).await;
    let bob = address(&format!("bob@{D}"));
    let key = test_key(&bob, 3, 0);
    a.store.publish(key.clone()).await.unwrap();
    assert!(matches!(
        a.take()[..],
        [Event::PublishedUnsynced(_), Event::EpochCommitted(_)]
    ));
    // The same message again, at the same instance and at another one of the pool: the store
    // answers it unchanged and the directory holds it, so no epoch is written; each call
    // returns only after a synchronous write of its own.
    for (name, instance) in [("same instance", &a), ("other instance", &b)] {
        let outcome = instance.store.publish(key.clone()).await.unwrap();
        assert!(
            matches!(outcome, PublishOutcome::Unchanged(_)),
            "{name}: {outcome:?}"
        );
        let events = instance.take();
        let [Event::PublishedUnsynced(at), Event::Synced(flushed)] = events[..] else {
            panic!("{name}: the key, no epoch, then the synchronous write: {events:?}");
        };
        assert!(flushed >= at, "{name}: flushed {flushed} < {at}");
        assert_eq!(instance.latest_version(&bob).await, Some(1), "{name}");
    }
    // `sync_published` alone writes and flushes (a transaction without WAL would not).
    let store = PostgresStore::connect(&db.url).await.unwrap();
    let before = insert_lsn(&a.pool).await;
    store.sync_published().await.unwrap();
    let flushed = flush_lsn(&a.pool).await;
    assert!(
        flushed > before,
        "sync_published wrote WAL and flushed it: {flushed} > {before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_failure_is_a_temporary_failure_and_the_redelivery_records_it() {
    let db = TestDb::new();
    let keys = LogKeys::generate(D);
    let a = Instance::new(&db, &keys, true).await;
    a.warm_up().await;
    a.directory.fail_commits.store(true, Ordering::SeqCst);
    let carol = address(&format!("carol@{D}"));
    let key = test_key(&carol, 4, 1);
    let failed = a.store.publish(key.clone()).await;
    let err = failed.expect_err("the directory failed: no confirmation");
    assert!(err.is_temporary(), "a temporary failure (LMTP 4xx): {err}");
    let events = a.take();
    assert!(
        matches!(events.first(), Some(Event::PublishedUnsynced(_)))
            && events[1..].iter().all(|e| *e == Event::EpochFailed)
            && events.len() > 1,
        "the key, then only failed epochs: {events:?}"
    );
    assert_eq!(a.latest_version(&carol).await, None);
    // The MTA delivers it again once the directory is back.
    a.directory.fail_commits.store(false, Ordering::SeqCst);
    let outcome = a.store.publish(key).await.unwrap();
    assert!(
        matches!(outcome, PublishOutcome::Unchanged(_)),
        "{outcome:?}"
    );
    let events = a.take();
    assert!(
        matches!(events[..], [Event::PublishedUnsynced(k), Event::EpochCommitted(e)] if e >= k),
        "the redelivery is recorded in an epoch: {events:?}"
    );
    assert_eq!(a.latest_version(&carol).await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_directory_on_the_same_server_makes_publications_unsynced() {
    let db = TestDb::new();
    let keys = LogKeys::generate(D);
    // Without `with_unsynced_publications`: the key commits synchronously, then the epoch.
    let plain = Instance::new(&db, &keys, false).await;
    plain.warm_up().await;
    let dave = address(&format!("dave@{D}"));
    plain.store.publish(test_key(&dave, 5, 0)).await.unwrap();
    let events = plain.take();
    assert!(
        matches!(events[..], [Event::Published(_), Event::EpochCommitted(_)]),
        "{events:?}"
    );
    // A redelivery there: no extra write either (the key's commit was synchronous).
    plain.store.publish(test_key(&dave, 5, 0)).await.unwrap();
    assert!(matches!(plain.take()[..], [Event::Published(_)]));
    // With it, an address of a domain without a log: synchronous, no epoch.
    let unsynced = Instance::new(&db, &keys, true).await;
    let erin = address("erin@elsewhere.example");
    unsynced.store.publish(test_key(&erin, 5, 1)).await.unwrap();
    let events = unsynced.take();
    assert!(matches!(events[..], [Event::Published(_)]), "{events:?}");
}

/// A failover between the key's unsynced commit and the writer's read: the key reached the old
/// primary only (simulated by a second database), the writer reads the new one and finds
/// nothing to record, and the new primary's synchronous write covers nothing of the key. The
/// publication must not be confirmed: a temporary failure, so the MTA delivers it again, and
/// that redelivery publishes and records the key on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_lost_in_a_failover_before_its_epoch_is_not_confirmed() {
    let db = TestDb::new();
    let old = TestDb::new();
    let keys = LogKeys::generate(D);
    let a = Instance::new(&db, &keys, true).await;
    a.warm_up().await;
    let old_primary: Arc<dyn KeyStore> = Arc::new(PostgresStore::connect(&old.url).await.unwrap());
    *a.watched.old_primary.lock().unwrap() = Some(old_primary);
    let carol = address(&format!("carol@{D}"));
    let key = test_key(&carol, 4, 0);
    let err = a
        .store
        .publish(key.clone())
        .await
        .expect_err("a key the store's server does not hold must not be confirmed");
    assert!(err.is_temporary(), "a temporary failure: {err}");
    assert_eq!(a.store.get(&carol).await.unwrap(), None);
    assert_eq!(a.latest_version(&carol).await, None, "nothing recorded");
    // The MTA's redelivery, now on the new primary: published, recorded, confirmed.
    let outcome = a.store.publish(key).await.unwrap();
    assert!(
        matches!(outcome, PublishOutcome::Published(_)),
        "{outcome:?}"
    );
    assert_eq!(a.latest_version(&carol).await, Some(1));
}
