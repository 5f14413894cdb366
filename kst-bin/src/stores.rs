//! Opens the key store `[store]` names.

use std::sync::Arc;

use kst_core::{Error, KeyStore};

use crate::config::{StoreBackend, StoreConfig};

/// Opens the backend of `cfg`. A store that cannot be reached is a temporary
/// [`Error::Unavailable`]; a backend this build does not include is [`Error::Config`].
pub async fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn KeyStore>, Error> {
    match cfg.backend {
        // Interim: kst-fs has no `FsStore` yet. Once it lands this arm is
        // `Ok(Arc::new(kst_fs::FsStore::open(&cfg.path)?))` (plus `.await` if `open` is async).
        StoreBackend::Fs => Err(Error::Config(format!(
            "store.backend = \"fs\" (path {}) is not available in this build yet: the kst-fs store is still being written",
            cfg.path.display()
        ))),
        StoreBackend::Postgres | StoreBackend::Redis => Err(Error::Config(format!(
            "store.backend = \"{}\" is not available in this build yet; use \"fs\"",
            cfg.backend.as_str()
        ))),
    }
}
