//! The public listener `[web]`: WKD (both methods), VKS and HKP from the key store, over plain
//! HTTP (behind a proxy) or TLS with certificates reloaded without a restart.
//!
//! [`serve`] takes the store as a [`KeyLookup`], the shared [`kst_core::RateLimiter`] and a
//! [`WebConfig`]; `kst serve` wires them in.

pub mod batch;
mod batcher;
pub mod client;
pub mod coalesce;
pub mod handlers;
pub mod limits;
pub mod listener;
pub mod lookup;
pub mod metrics;
pub mod tls;
pub mod writebehind;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kst_core::wkd::PolicyFlags;
use kst_core::{AddressPolicy, RateLimiter};
use tokio::net::TcpListener;

/// The `[web]` section, kept with the rest of the configuration.
pub mod config {
    pub use crate::shared::config::web::{
        ProxyHeader, TrustedProxies, WebConfig, WebConfigError, WebLimits,
    };
}
pub use config::{ProxyHeader, WebConfig, WebLimits};
pub use handlers::{PeerAddr, WebState, router, router_with};
pub use lookup::{KeyLookup, StoreLookup};

/// The local part of each domain's WKS submission address (`keys@<domain>`).
pub const SUBMISSION_LOCAL_PART: &str = "keys";

/// Everything [`serve`] needs besides the socket.
pub struct WebService {
    /// The store's look-ups.
    pub lookup: Arc<dyn KeyLookup>,
    /// Shared counters for the limits (the store's limiter, or the Redis of their own that
    /// `[web.counters]` names).
    pub counters: Arc<dyn RateLimiter>,
    /// Served domains, normalized.
    pub domains: Vec<String>,
    /// The address folding of `[kst]`.
    pub address_policy: AddressPolicy,
    /// The `[web]` section.
    pub config: WebConfig,
    /// The policy directory's `kst-log` file per domain with a key directory (issue 18;
    /// empty without `[transparency]`).
    pub log_keys: HashMap<String, String>,
}

/// The guard of `[web.limits]` (the shared `counters`) with the clients named as `[web]
/// trusted_proxies` says: the public listener's, and the key directory's routes' on `[http]`
/// when `[web]` is off.
pub fn guard_of(
    config: &WebConfig,
    counters: Arc<dyn RateLimiter>,
) -> Result<handlers::Guard, config::WebConfigError> {
    Ok(handlers::Guard {
        trusted_proxies: config.validate()?,
        limiter: limits::Limiter::new(config.limits, counters),
        pseudonym: client::LogPseudonym::random(),
    })
}

impl WebService {
    /// The handlers' state (validates `[web]`).
    pub fn state(&self) -> Result<WebState, config::WebConfigError> {
        let trusted_proxies = self.config.validate()?;
        Ok(WebState {
            lookup: Arc::clone(&self.lookup),
            domains: Arc::new(self.domains.clone()),
            address_policy: self.address_policy.clone(),
            policy_flags: PolicyFlags::default(),
            submission_local_part: SUBMISSION_LOCAL_PART.into(),
            trusted_proxies,
            limiter: limits::Limiter::new(self.config.limits, Arc::clone(&self.counters)),
            pseudonym: client::LogPseudonym::random(),
            cache_max_age_secs: self.config.cache_max_age_secs,
            log_keys: Arc::new(self.log_keys.clone()),
        })
    }
}

/// Serves `service` on `listener` until `shutdown` completes: TLS when `[web]` names a
/// certificate (checked for changes every `tls_reload_secs`), plain HTTP otherwise.
pub async fn serve(
    listener: TcpListener,
    service: WebService,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, service, axum::Router::new(), shutdown).await
}

/// [`serve`], with `extra` routes next to WKD, VKS and HKP (the key directory's, feature
/// `transparency`), under the same `[web.limits]` guard.
pub async fn serve_with(
    listener: TcpListener,
    service: WebService,
    extra: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = service.state()?;
    let c = &service.config;
    let (tls, watcher) = match (&c.tls_cert, &c.tls_key) {
        (Some(cert), Some(key)) => {
            let reloading = tls::ReloadingCert::open(cert, key)?;
            let watcher = reloading.watch(Duration::from_secs(c.tls_reload_secs.max(1)));
            (Some(reloading.server_config()?), Some(watcher))
        }
        _ => (None, None),
    };
    let limits = listener::AcceptLimits {
        max_connections: c.max_connections,
        idle_timeout: Duration::from_secs(c.idle_timeout_secs.max(1)),
        handshake_timeout: Duration::from_secs(c.handshake_timeout_secs.max(1)),
        max_per_client: c.max_connections_per_client,
        // An honest client sends its request head at once; one idle timeout is ample.
        head_timeout: Duration::from_secs(c.idle_timeout_secs.max(1)),
    };
    let web_listener = listener::WebListener::new(listener, tls, limits, c.validate()?)?;
    let result = axum::serve(
        web_listener,
        router_with(state, extra).into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    if let Some(w) = watcher {
        w.abort();
    }
    Ok(result?)
}
