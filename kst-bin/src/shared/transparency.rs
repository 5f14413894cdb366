//! Opens the key directory `[transparency]` names (feature `transparency`): one
//! [`DomainLog`] per served domain, kept in the store `[store]` names (fs, PostgreSQL or
//! Redis), and the [`TransparentStore`] that records every publication and deletion in it
//! (docs/TRANSPARENCY.md).

use std::sync::Arc;

use kst_core::reply::LogAnswers;
use kst_core::transparency::{DirectoryStore, DomainLog, LogKeys, RecordedAll, TransparentStore};
use kst_core::{Component, Error, KeyStore};

use crate::shared::config::{Config, StoreBackend, check_key_file_mode};
use crate::shared::stores;

const COMPONENT: Component = Component::other("key directory");

/// The logs of every served domain; empty when `[transparency]` is off. A missing, too open
/// or malformed key file is a configuration error; a directory that cannot be read is
/// temporary.
pub async fn open_logs(config: &Config) -> Result<Vec<Arc<DomainLog>>, Error> {
    let t = &config.transparency;
    if !t.enabled() {
        return Ok(Vec::new());
    }
    // Network stores are opened without touching the server: a database that is down at
    // start fails the directory's calls (temporary failures) until it is back.
    let store: Arc<dyn DirectoryStore> = match config.store.backend {
        StoreBackend::Fs => Arc::new(kst_fs::FsDirectoryStore::new(&config.store.path)),
        // Small pools of its own on the hosts of `url` and `urls`, writing to the one that
        // accepts writes, as the key store does; the tables come with the migrations.
        StoreBackend::Postgres => Arc::new(
            stores::postgres_builder(&config.store)
                .max_connections(4)
                .connect_lazy()?
                .inner()
                .directory(),
        ),
        // One server, Sentinel or Cluster, under the store's key prefix.
        StoreBackend::Redis => Arc::new(
            stores::redis_builder(&config.store)
                .connect_lazy()?
                .inner()
                .directory(),
        ),
    };
    let policy = config.policy()?;
    let mut logs = Vec::with_capacity(policy.domains.len());
    for domain in &policy.domains {
        let path = t.key_file_for(domain);
        let bad = |what: String| {
            Error::Config(format!(
                "transparency.key_file {}: {what} (kst log keygen {domain} --output {} makes it)",
                path.display(),
                path.display()
            ))
        };
        check_key_file_mode(&path).map_err(bad)?;
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let keys = LogKeys::parse(&text).map_err(|e| bad(e.to_string()))?;
        if keys.domain != *domain {
            return Err(bad(format!(
                "the file is for {}, not {domain}",
                keys.domain
            )));
        }
        let mut log = DomainLog::open(Arc::clone(&store), keys)
            .await
            .map_err(|e| Error::unavailable(COMPONENT, e))?
            .with_gather(t.gather_for(config.store.backend));
        if let Some(limit) = t.step_limit() {
            log = log.with_step_limit(limit);
        }
        logs.push(Arc::new(log));
    }
    Ok(logs)
}

/// The WKD policy directory's `kst-log` file of each log's domain (issue 18): the public
/// record of its keys, as `kst log keygen` prints it for DNS, with a line end.
pub fn public_records(
    logs: &[Arc<DomainLog>],
) -> Result<std::collections::HashMap<String, String>, Error> {
    logs.iter()
        .map(|log| {
            let vrf = log.vrf_public_key().map_err(|e| {
                Error::Config(format!("the key directory of {}: {e}", log.domain()))
            })?;
            let record = kst_core::transparency::keys::public_record(&log.head_public_key(), &vrf);
            Ok((log.domain().to_string(), record + "\n"))
        })
        .collect()
}

/// `store`, recording its changes in the logs of `[transparency]` when it is on, and the
/// same logs' answers for protocol version 3 replies (`None` when it is off).
pub async fn wrap_store(
    config: &Config,
    store: Arc<dyn KeyStore>,
) -> Result<(Arc<dyn KeyStore>, Option<Arc<dyn LogAnswers>>), Error> {
    let logs = open_logs(config).await?;
    Ok(wrap_store_in(
        store,
        logs,
        witness_keys(config)?,
        unsynced_publications(config),
    ))
}

/// Whether publications may commit their key unsynced
/// ([`TransparentStore::with_unsynced_publications`]): on PostgreSQL, whose directory
/// [`open_logs`] opens on the key store's own hosts, so the epoch's synchronous commit covers
/// the key's.
pub fn unsynced_publications(config: &Config) -> bool {
    config.store.backend == StoreBackend::Postgres
}

/// The keys of `[transparency] witnesses`: version 3 answers carry their cosignatures when a
/// request asks (`KST-Log-Witnessed`), as the HTTP endpoint's `?witnessed=1` does.
pub fn witness_keys(config: &Config) -> Result<Vec<[u8; 32]>, Error> {
    Ok(config
        .transparency
        .witness_keys()
        .map_err(|e| Error::Config(e.to_string()))?
        .into_iter()
        .map(|(_, key)| key)
        .collect())
}

/// [`wrap_store`] with logs already open (`kst serve` serves the same ones over HTTP: one
/// directory thread per domain), the witnesses' keys ([`witness_keys`]) and whether
/// publications commit their key unsynced ([`unsynced_publications`]).
pub fn wrap_store_in(
    store: Arc<dyn KeyStore>,
    logs: Vec<Arc<DomainLog>>,
    witnesses: Vec<[u8; 32]>,
    unsynced: bool,
) -> (Arc<dyn KeyStore>, Option<Arc<dyn LogAnswers>>) {
    if logs.is_empty() {
        return (store, None);
    }
    let mut wrapped = TransparentStore::new(store, logs).with_witnesses(witnesses);
    if unsynced {
        wrapped = wrapped.with_unsynced_publications();
    }
    let wrapped = Arc::new(wrapped);
    (wrapped.clone(), Some(wrapped))
}

/// `kst migrate` with `[transparency]` on: reads every logged domain's directory (on fs that
/// upgrades it: its root moves to `root.v3`, docs/OPERATIONS.md), then records in it every
/// current key of a served domain it lacks (a directory switched on for a store that already
/// holds keys); `None` when `[transparency]` is off. A directory that cannot be read, or
/// whose stored head of epoch 0 does not check against the log's keys, fails the command,
/// one without an address included (before, only the addresses' recording read
/// a directory, and one that could not be opened went unnoticed: `kst migrate` said it was
/// done and the root had not moved). Idempotent.
pub async fn record_all(
    config: &Config,
    store: Arc<dyn KeyStore>,
) -> Result<Option<RecordedAll>, Error> {
    let logs = open_logs(config).await?;
    if logs.is_empty() {
        return Ok(None);
    }
    for log in &logs {
        // One read of the store's directory (its head of epoch 0), past any cache.
        // Its error says what is wrong: a store that cannot be read, or a stored head that
        // does not check against this log's keys (review L2: not "cannot be read").
        log.stored_heads(0, 0).await.map_err(|e| {
            Error::unavailable(
                COMPONENT,
                format!(
                    "the key directory of {} failed its check: {e}; fix it (the error says \
                     how) and run kst migrate again",
                    log.domain()
                ),
            )
        })?;
    }
    TransparentStore::new(store, logs)
        .record_all(RECORD_ALL_AT_ONCE)
        .await
        .map(Some)
}

/// Addresses `kst migrate` asks the directory to record at once (they share epochs).
const RECORD_ALL_AT_ONCE: usize = 256;
