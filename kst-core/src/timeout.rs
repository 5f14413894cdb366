//! [`TimeoutStore`]: a per-operation timeout around any [`KeyStore`] (and [`RateLimiter`]).
//!
//! A network store whose server accepts connections but stops answering would otherwise hang
//! a delivery. Wrapped, every operation that takes longer than the timeout fails with a
//! temporary [`Error::Unavailable`] naming the store and the operation
//! (`store(postgres): publish timed out after 5s`), so the MTA keeps the message and retries.
//! A write cut off this way may or may not have been applied; the store's idempotence (the
//! publication ID) makes the retry safe.
//!
//! Needs the `timeout` feature (Tokio's timer).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use crate::address::Address;
use crate::error::{Component, Error, Result};
use crate::fingerprint::{Fingerprint, KeyId};
use crate::ratelimit::RateLimiter;
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome};
use crate::wkd::WkdHash;

/// Runs `fut` for at most `timeout`; past it, a temporary error of `component` that says which
/// operation (`op`) timed out.
pub async fn within<T>(
    component: impl Into<Component>,
    op: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::unavailable(
            component,
            format!("{op} timed out after {timeout:?}"),
        )),
    }
}

/// A [`KeyStore`] (and, when the store is one, a [`RateLimiter`]) whose every operation is
/// bounded by one timeout. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct TimeoutStore<S> {
    inner: S,
    timeout: Duration,
    component: Component,
}

impl<S: KeyStore> TimeoutStore<S> {
    /// Wraps `inner`; errors name it as `store(<name>)`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        let component = Component::from(format!("store({})", inner.name()));
        TimeoutStore {
            inner,
            timeout,
            component,
        }
    }
}

impl<S> TimeoutStore<S> {
    /// The wrapped store, for what is not a [`KeyStore`] operation (its pool, migrations).
    /// Calls made on it directly are not bounded.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The timeout of each operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `fut` (an operation named `op` in the error) within the timeout: for the wrapped
    /// store's own operations beyond the traits.
    pub async fn run<T>(&self, op: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        within(self.component.clone(), op, self.timeout, fut).await
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for TimeoutStore<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        self.run("publish", self.inner.publish(key)).await
    }

    async fn publish_unsynced(&self, key: NewKey) -> Result<PublishOutcome> {
        self.run("publish", self.inner.publish_unsynced(key)).await
    }

    async fn sync_published(&self) -> Result<()> {
        self.run("sync published", self.inner.sync_published())
            .await
    }

    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        self.run("get", self.inner.get(address)).await
    }

    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        self.run("get many", self.inner.get_many(addresses)).await
    }

    fn batches_reads(&self) -> bool {
        self.inner.batches_reads()
    }

    async fn claim_reminder(&self, claim: &crate::reminder::ReminderClaim) -> Result<bool> {
        self.run("claim reminder", self.inner.claim_reminder(claim))
            .await
    }

    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
        self.run("history", self.inner.history(address)).await
    }

    async fn delete(&self, address: &Address) -> Result<bool> {
        self.run("delete", self.inner.delete(address)).await
    }

    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
        self.run("list", self.inner.list(after, limit)).await
    }

    async fn list_page(
        &self,
        cursor: Option<&crate::store::WalkCursor>,
        limit: usize,
    ) -> Result<crate::store::WalkPage> {
        self.run("list page", self.inner.list_page(cursor, limit))
            .await
    }

    async fn deleted_page(
        &self,
        cursor: Option<&crate::store::WalkCursor>,
        limit: usize,
    ) -> Result<crate::store::DeletedPage> {
        self.run("deleted page", self.inner.deleted_page(cursor, limit))
            .await
    }

    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        self.run(
            "remember deleted",
            self.inner.remember_deleted(address, publication_ids),
        )
        .await
    }

    async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
        self.run("restore", self.inner.restore(history)).await
    }

    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>> {
        self.run(
            "find by fingerprint",
            self.inner.find_by_fingerprint(fingerprint, limit),
        )
        .await
    }

    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
        self.run("find by key ID", self.inner.find_by_key_id(key_id, limit))
            .await
    }

    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>> {
        self.run(
            "find by WKD hash",
            self.inner.find_by_wkd_hash(domain, hash),
        )
        .await
    }

    /// Not bounded by the per-operation timeout: a rebuild reads every stored key.
    async fn rebuild_index(&self) -> Result<u64> {
        self.inner.rebuild_index().await
    }

    async fn check(&self) -> Result<()> {
        self.run("check", self.inner.check()).await
    }

    async fn topology(&self) -> Result<Vec<(String, String)>> {
        self.run("topology", self.inner.topology()).await
    }
}

#[async_trait]
impl<S: RateLimiter> RateLimiter for TimeoutStore<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        self.run("rate limit", self.inner.hit(key, limit, window))
            .await
    }

    async fn hit_many(&self, hits: &[crate::ratelimit::Hit]) -> Result<Vec<bool>> {
        self.run("rate limit", self.inner.hit_many(hits)).await
    }

    async fn refund(&self, hits: &[crate::ratelimit::Hit]) -> Result<()> {
        self.run("rate limit", self.inner.refund(hits)).await
    }
}

#[cfg(all(test, feature = "conformance"))]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::ratelimit::MemoryRateLimiter;
    use crate::testing::MemoryStore;

    /// A store and limiter whose every call hangs (a server that stops answering).
    struct Hanging;

    #[async_trait]
    impl KeyStore for Hanging {
        fn name(&self) -> &'static str {
            "hanging"
        }
        async fn publish(&self, _: NewKey) -> Result<PublishOutcome> {
            std::future::pending().await
        }
        async fn get(&self, _: &Address) -> Result<Option<KeyRecord>> {
            std::future::pending().await
        }
        async fn history(&self, _: &Address) -> Result<Vec<KeyRecord>> {
            std::future::pending().await
        }
        async fn delete(&self, _: &Address) -> Result<bool> {
            std::future::pending().await
        }
        async fn list(&self, _: Option<&Address>, _: usize) -> Result<Vec<Address>> {
            std::future::pending().await
        }
        async fn restore(&self, _: &[KeyRecord]) -> Result<()> {
            std::future::pending().await
        }
        async fn find_by_fingerprint(&self, _: &Fingerprint, _: usize) -> Result<Vec<KeyRecord>> {
            std::future::pending().await
        }
        async fn find_by_key_id(&self, _: &KeyId, _: usize) -> Result<Vec<KeyRecord>> {
            std::future::pending().await
        }
        async fn find_by_wkd_hash(&self, _: &str, _: &WkdHash) -> Result<Option<KeyRecord>> {
            std::future::pending().await
        }
        async fn check(&self) -> Result<()> {
            std::future::pending().await
        }
    }

    #[async_trait]
    impl RateLimiter for Hanging {
        fn name(&self) -> &'static str {
            "hanging"
        }
        async fn hit(&self, _: &str, _: u32, _: Duration) -> Result<bool> {
            std::future::pending().await
        }
    }

    fn expect_timeout<T: std::fmt::Debug>(op: &str, r: Result<T>) {
        let e = r.expect_err(op);
        assert!(e.is_temporary(), "{op}: {e}");
        let text = e.to_string();
        assert!(
            text.contains("store(hanging)") && text.contains(&format!("{op} timed out after 50ms")),
            "{op}: {text}"
        );
    }

    #[tokio::test]
    async fn every_operation_of_a_hanging_store_times_out_temporarily() {
        let s = TimeoutStore::new(Hanging, Duration::from_millis(50));
        let a = conformance::address("alice@conformance.example");
        let key = conformance::test_key(&a, 1, 1);
        let record = key.clone().into_record(1);
        expect_timeout("publish", s.publish(key).await);
        expect_timeout("get", s.get(&a).await);
        expect_timeout("get many", s.get_many(std::slice::from_ref(&a)).await);
        expect_timeout("history", s.history(&a).await);
        expect_timeout("delete", s.delete(&a).await);
        expect_timeout("list", s.list(None, 10).await);
        expect_timeout("restore", s.restore(&[record]).await);
        expect_timeout("check", s.check().await);
        let f = conformance::fingerprint(1, 1);
        expect_timeout("find by fingerprint", s.find_by_fingerprint(&f, 1).await);
        expect_timeout("find by key ID", s.find_by_key_id(&f.key_id(), 1).await);
        let h = WkdHash::of_address(&a);
        expect_timeout("find by WKD hash", s.find_by_wkd_hash(a.domain(), &h).await);
        expect_timeout("rate limit", s.hit("k", 1, Duration::from_secs(1)).await);
        expect_timeout(
            "sweep",
            s.run("sweep", std::future::pending::<Result<()>>()).await,
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_answers_passes_the_conformance_suite_through_the_wrapper() {
        let s = TimeoutStore::new(MemoryStore::default(), Duration::from_secs(30));
        assert_eq!(KeyStore::name(&s), "memory");
        assert_eq!(s.timeout(), Duration::from_secs(30));
        conformance::run_all(std::sync::Arc::new(s)).await;
    }

    #[tokio::test]
    async fn errors_of_the_store_pass_through_unchanged() {
        let inner = MemoryStore::default();
        inner.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let s = TimeoutStore::new(inner, Duration::from_secs(30));
        let e = s.check().await.unwrap_err();
        assert!(e.to_string().contains("down for the test"), "{e}");
        assert!(s.inner().down.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_limiter_is_wrapped_too() {
        struct Limited(MemoryRateLimiter);
        #[async_trait]
        impl RateLimiter for Limited {
            fn name(&self) -> &'static str {
                "limited"
            }
            async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
                self.0.hit(key, limit, window).await
            }
        }
        let s = TimeoutStore {
            inner: Limited(MemoryRateLimiter::new()),
            timeout: Duration::from_secs(30),
            component: "limiter(limited)".into(),
        };
        assert!(s.hit("k", 1, Duration::from_secs(60)).await.unwrap());
        assert!(!s.hit("k", 1, Duration::from_secs(60)).await.unwrap());
        assert_eq!(RateLimiter::name(&s), "limited");
        assert_eq!(s.into_inner().0.len(), 1);
    }
}
