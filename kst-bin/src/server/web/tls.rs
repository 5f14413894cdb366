//! TLS for the public listener: rustls with a certificate that is re-read when its files change.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// Why the certificate files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS certificate {cert} / key {key}: {message}")]
pub struct TlsError {
    cert: String,
    key: String,
    message: String,
}

/// Reads a PEM certificate chain and private key into a rustls [`CertifiedKey`].
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let fail = |message: String| TlsError {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| fail(format!("cannot read the certificate file: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("the certificate file is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(fail(
            "the certificate file holds no CERTIFICATE block".into(),
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        fail(format!(
            "cannot read a private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
        fail(format!(
            "the key does not fit the certificate or is unusable: {e}"
        ))
    })?;
    Ok(certified)
}

/// The current certificate, swapped in place when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl ReloadingCert {
    /// Loads the pair once; an error here stops the start.
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let stamp_now = stamp(cert, key);
        let loaded = load(cert, key)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
            stamp: RwLock::new(stamp_now),
        }))
    }

    /// Re-reads the files if their modification times changed. Returns whether a new pair is in
    /// use; a pair that does not load is logged and the old one kept.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.cert_path, &self.key_path);
        if now.is_none() || now == *self.stamp.read().unwrap_or_else(|e| e.into_inner()) {
            return false;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(k) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
                *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
                super::metrics::tls_reload(true);
                tracing::info!(cert = %self.cert_path.display(), "web: TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Remember the stamp so a broken pair is reported once, not every interval.
                *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
                super::metrics::tls_reload(false);
                tracing::error!(error = %e, "web: TLS certificate not reloaded; the old one stays in use");
                false
            }
        }
    }

    /// Checks the files every `every` until the returned task is aborted or the process ends.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let me = Arc::clone(&me);
                let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
            }
        })
    }

    /// A rustls server configuration that always uses the current pair (HTTP/1.1 by ALPN).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError {
                cert: self.cert_path.display().to_string(),
                key: self.key_path.display().to_string(),
                message: format!("TLS set-up: {e}"),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}
