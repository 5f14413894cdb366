//! [`DelegatingDirectory`]: a wrapper around a real [`DirectoryStore`] whose tests take over
//! only the calls they hold, count or watch (features `testing` + `transparency`).

use std::sync::Arc;

use async_trait::async_trait;

use crate::transparency::{DirectoryStore, DirectoryStoreError, RecordBatch, RootAndNodes};

/// Shorthand for the results of [`DirectoryStore`] calls.
type DirResult<T> = std::result::Result<T, DirectoryStoreError>;

/// The calls of a [`DelegatingDirectory`] a test takes over: each method is one
/// [`DirectoryStore`] call, given the wrapped store as `inner`; its default passes the same call
/// on to `inner` unchanged. A test implements only the calls it holds, counts, fails or
/// watches, and keeps its own state (counters, notifications, switches) in the implementing
/// type.
///
/// The defaults are independent of each other: `value_states_batch`'s passes the call on to
/// `inner.value_states_batch` (the backend's one round trip), not through this trait's
/// `value_states`, and `root_and_nodes`'s to `inner.root_and_nodes`, not through `root` and
/// `nodes` (a test that watches every read of a kind takes over both). `()` takes over
/// nothing: a pure pass-through.
#[async_trait]
pub trait DirectoryHooks: Send + Sync {
    /// [`DirectoryStore::name`].
    fn name(&self, inner: &dyn DirectoryStore) -> &'static str {
        inner.name()
    }
    /// [`DirectoryStore::root`].
    async fn root(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
    ) -> DirResult<Option<(u64, Vec<u8>)>> {
        inner.root(domain).await
    }
    /// [`DirectoryStore::nodes`].
    async fn nodes(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> DirResult<Vec<Vec<u8>>> {
        inner.nodes(domain, keys).await
    }
    /// [`DirectoryStore::value_states`].
    async fn value_states(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        label: &[u8],
    ) -> DirResult<Vec<(u64, Vec<u8>)>> {
        inner.value_states(domain, label).await
    }
    /// [`DirectoryStore::value_states_batch`].
    async fn value_states_batch(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> DirResult<Vec<(Vec<u8>, u64, Vec<u8>)>> {
        inner.value_states_batch(domain, labels).await
    }
    /// [`DirectoryStore::root_and_nodes`].
    async fn root_and_nodes(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> DirResult<RootAndNodes> {
        inner.root_and_nodes(domain, keys).await
    }
    /// [`DirectoryStore::commit`].
    async fn commit(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        batch: RecordBatch,
    ) -> DirResult<()> {
        inner.commit(domain, batch).await
    }
    /// [`DirectoryStore::insert_head`].
    async fn insert_head(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> DirResult<Vec<u8>> {
        inner.insert_head(domain, epoch, head).await
    }
    /// [`DirectoryStore::heads`].
    async fn heads(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        from: u64,
        to: u64,
    ) -> DirResult<Vec<(u64, Vec<u8>)>> {
        inner.heads(domain, from, to).await
    }
    /// [`DirectoryStore::put_cosignature`].
    async fn put_cosignature(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> DirResult<()> {
        inner
            .put_cosignature(domain, epoch, witness, checked_at, cosignature)
            .await
    }
    /// [`DirectoryStore::cosignatures`].
    async fn cosignatures(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        epoch: u64,
    ) -> DirResult<Vec<([u8; 32], Vec<u8>)>> {
        inner.cosignatures(domain, epoch).await
    }
    /// [`DirectoryStore::latest_cosignature`].
    async fn latest_cosignature(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        witness: &[u8; 32],
    ) -> DirResult<Option<(u64, Vec<u8>)>> {
        inner.latest_cosignature(domain, witness).await
    }
}

/// Takes over nothing: [`DelegatingDirectory`] over `()` passes every call on.
impl DirectoryHooks for () {}

/// A [`DirectoryStore`] for tests that wraps a real one: every call goes to the `hooks`'
/// method of the same name ([`DirectoryHooks`]), which passes it on to the wrapped store unless
/// the test took that call over (to hold it, count it, fail it or watch it). Dereferences to
/// the hooks, so a test reads its counters and pulls its switches on the wrapper itself.
pub struct DelegatingDirectory<H> {
    inner: Arc<dyn DirectoryStore>,
    hooks: H,
}

impl<H: DirectoryHooks> DelegatingDirectory<H> {
    /// `inner` with the calls `hooks` takes over.
    pub fn new(inner: Arc<dyn DirectoryStore>, hooks: H) -> Self {
        DelegatingDirectory { inner, hooks }
    }

    /// The wrapped store (its calls bypass the hooks).
    pub fn inner(&self) -> &Arc<dyn DirectoryStore> {
        &self.inner
    }

    /// The hooks (also reached through `Deref`).
    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<H> std::ops::Deref for DelegatingDirectory<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.hooks
    }
}

#[async_trait]
impl<H: DirectoryHooks> DirectoryStore for DelegatingDirectory<H> {
    fn name(&self) -> &'static str {
        self.hooks.name(&*self.inner)
    }
    async fn root(&self, domain: &str) -> DirResult<Option<(u64, Vec<u8>)>> {
        self.hooks.root(&*self.inner, domain).await
    }
    async fn nodes(&self, domain: &str, keys: &[Vec<u8>]) -> DirResult<Vec<Vec<u8>>> {
        self.hooks.nodes(&*self.inner, domain, keys).await
    }
    async fn value_states(&self, domain: &str, label: &[u8]) -> DirResult<Vec<(u64, Vec<u8>)>> {
        self.hooks.value_states(&*self.inner, domain, label).await
    }
    async fn value_states_batch(
        &self,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> DirResult<Vec<(Vec<u8>, u64, Vec<u8>)>> {
        self.hooks
            .value_states_batch(&*self.inner, domain, labels)
            .await
    }
    async fn root_and_nodes(&self, domain: &str, keys: &[Vec<u8>]) -> DirResult<RootAndNodes> {
        self.hooks.root_and_nodes(&*self.inner, domain, keys).await
    }
    async fn commit(&self, domain: &str, batch: RecordBatch) -> DirResult<()> {
        self.hooks.commit(&*self.inner, domain, batch).await
    }
    async fn insert_head(&self, domain: &str, epoch: u64, head: &[u8]) -> DirResult<Vec<u8>> {
        self.hooks
            .insert_head(&*self.inner, domain, epoch, head)
            .await
    }
    async fn heads(&self, domain: &str, from: u64, to: u64) -> DirResult<Vec<(u64, Vec<u8>)>> {
        self.hooks.heads(&*self.inner, domain, from, to).await
    }
    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> DirResult<()> {
        self.hooks
            .put_cosignature(
                &*self.inner,
                domain,
                epoch,
                witness,
                checked_at,
                cosignature,
            )
            .await
    }
    async fn cosignatures(&self, domain: &str, epoch: u64) -> DirResult<Vec<([u8; 32], Vec<u8>)>> {
        self.hooks.cosignatures(&*self.inner, domain, epoch).await
    }
    async fn latest_cosignature(
        &self,
        domain: &str,
        witness: &[u8; 32],
    ) -> DirResult<Option<(u64, Vec<u8>)>> {
        self.hooks
            .latest_cosignature(&*self.inner, domain, witness)
            .await
    }
}
