//! The hosts of one store: which one accepts writes (probed, re-checked every second, forgotten
//! on a temporary error), optional read replicas for look-ups, and the write path that confirms
//! a change only once a synchronous standby holds it (docs/HA-NOTES.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kst_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection as _, PgConnection, Row};

use crate::error::{COMPONENT, db};

/// How long a chosen primary is trusted before the hosts are probed again.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);
/// How much longer than [`RECHECK`] the last choice still serves the operations that arrive
/// while one of them probes again: a re-check does not stall every operation behind its probe
/// (which opens a connection of its own when no pooled one is idle: under load, every second
/// every operation in flight waited for a new backend; docs/BENCHMARKS.md, "PostgreSQL's
/// tail"). A choice forgotten after an error ([`Cluster::suspect`]) never serves.
pub(crate) const STALE_SERVE: Duration = Duration::from_secs(1);
/// After a probe found no single primary, how long operations fail at once before probing again.
const RETRY_PROBE: Duration = Duration::from_millis(250);
/// Pause between two reads of the standby's position while confirming a write.
const CONFIRM_POLL: Duration = Duration::from_millis(2);

/// One row: the role and replication settings of a host.
const PROBE: &str = "SELECT pg_is_in_recovery() AS rec, \
     current_setting('transaction_read_only') AS ro, \
     current_setting('synchronous_standby_names') AS ssn, \
     current_setting('synchronous_commit') AS sc, \
     (SELECT count(*) FROM pg_stat_replication \
       WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming') AS sync_standbys";

/// Whether a synchronous standby streaming from this host has reached `$1` (the position
/// measured by `$2`, the session's `synchronous_commit`), and how many are attached at all.
const REPLICATED: &str = "SELECT \
     EXISTS (SELECT 1 FROM pg_stat_replication \
       WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming' \
       AND CASE $2 WHEN 'remote_write' THEN write_lsn WHEN 'remote_apply' THEN replay_lsn \
           ELSE flush_lsn END >= $1::pg_lsn) AS reached, \
     (SELECT count(*) FROM pg_stat_replication \
       WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming') AS attached";

/// A future borrowing a connection, as the write closures return it.
pub(crate) type ConnFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'c>>;

/// One listed host and its own connection pool.
#[derive(Clone, Debug)]
pub(crate) struct Host {
    /// `host:port`, for logs, `/readyz` and `/metrics`.
    pub label: String,
    /// Connections to this host only.
    pub pool: PgPool,
    /// How to open one more (probes open their own when no pooled one is idle).
    pub options: PgConnectOptions,
}

/// What a probe read from one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Facts {
    /// `pg_is_in_recovery()`: a standby.
    pub in_recovery: bool,
    /// `transaction_read_only` of a new session.
    pub read_only: bool,
    /// `synchronous_commit` of kst's sessions.
    pub synchronous_commit: String,
    /// `synchronous_standby_names`.
    pub synchronous_standby_names: String,
    /// Synchronous standbys streaming from this host.
    pub sync_standbys: i64,
}

impl Facts {
    /// Accepts writes: not in recovery, sessions not read-only.
    pub fn writable(&self) -> bool {
        !self.in_recovery && !self.read_only
    }

    /// The host is configured for synchronous replication: kst confirms a change only once a
    /// synchronous standby holds it.
    pub fn wants_sync(&self) -> bool {
        !self.synchronous_standby_names.trim().is_empty()
            && matches!(
                self.synchronous_commit.as_str(),
                "on" | "remote_write" | "remote_apply"
            )
    }
}

/// The host chosen for writes and what its probe said.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    /// Index into the host list.
    pub index: usize,
    /// The host.
    pub host: Host,
    /// Its probe.
    pub facts: Facts,
}

#[derive(Default)]
struct Choice {
    primary: Option<(usize, Facts)>,
    checked: Option<Instant>,
    /// Why the last probe chose no host.
    problem: Option<String>,
}

/// Every host of one store.
pub(crate) struct Cluster {
    hosts: Vec<Host>,
    readers: Vec<Host>,
    next_reader: AtomicUsize,
    choice: Mutex<Choice>,
    probing: tokio::sync::Mutex<()>,
    write_timeout: Duration,
    probe_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("hosts", &self.labels())
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The hosts of one store (at least one) and its read replicas (maybe none); a probe of
    /// one host gives up after `probe_timeout`.
    pub fn new(
        hosts: Vec<Host>,
        readers: Vec<Host>,
        write_timeout: Duration,
        probe_timeout: Duration,
    ) -> Cluster {
        assert!(!hosts.is_empty(), "a store has at least one host");
        Cluster {
            hosts,
            readers,
            next_reader: AtomicUsize::new(0),
            choice: Mutex::new(Choice::default()),
            probing: tokio::sync::Mutex::new(()),
            write_timeout,
            probe_timeout,
        }
    }

    /// Closes every pool.
    pub async fn close(&self) {
        for h in self.hosts.iter().chain(&self.readers) {
            h.pool.close().await;
        }
    }

    /// The pool of the first listed host (single-host tooling and tests).
    pub fn first_pool(&self) -> &PgPool {
        &self.hosts[0].pool
    }

    fn labels(&self) -> Vec<&str> {
        self.hosts.iter().map(|h| h.label.as_str()).collect()
    }

    /// The last choice while it is fresh; with `stale`, also up to [`STALE_SERVE`] after that
    /// (while another operation probes).
    fn cached(&self, stale: bool) -> Option<Result<Writer>> {
        let c = self.choice.lock().unwrap_or_else(|p| p.into_inner());
        let age = c.checked?.elapsed();
        let trusted = if stale {
            RECHECK + STALE_SERVE
        } else {
            RECHECK
        };
        match (&c.primary, &c.problem) {
            (Some((i, facts)), _) if age < trusted => Some(Ok(Writer {
                index: *i,
                host: self.hosts[*i].clone(),
                facts: facts.clone(),
            })),
            (None, Some(problem)) if age < RETRY_PROBE => {
                Some(Err(Error::unavailable(COMPONENT, problem.clone())))
            }
            _ => None,
        }
    }

    /// The host that accepts writes: the last choice while it is fresh, else a new probe of
    /// every host. While one operation probes, the others keep the last choice for up to
    /// [`STALE_SERVE`] more (then, or with no choice, they wait for the probe). A temporary
    /// error when none accepts writes, or more than one does.
    pub async fn writer(&self) -> Result<Writer> {
        if let Some(w) = self.cached(false) {
            return w;
        }
        let _one_prober = match self.probing.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(w) = self.cached(true) {
                    return w;
                }
                self.probing.lock().await
            }
        };
        if let Some(w) = self.cached(false) {
            return w;
        }
        let probes = self.probe_all().await;
        let writable: Vec<usize> = probes
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Ok(f) if f.writable()))
            .map(|(i, _)| i)
            .collect();
        let mut c = self.choice.lock().unwrap_or_else(|p| p.into_inner());
        let before = c.primary.as_ref().map(|(i, _)| *i);
        c.checked = Some(Instant::now());
        if let [i] = writable[..] {
            let facts = probes[i].as_ref().cloned().unwrap_or_default();
            if before != Some(i) {
                tracing::warn!(primary = %self.hosts[i].label, "PostgreSQL: writing to this host now");
            }
            c.primary = Some((i, facts.clone()));
            c.problem = None;
            return Ok(Writer {
                index: i,
                host: self.hosts[i].clone(),
                facts,
            });
        }
        let roles: Vec<String> = probes
            .iter()
            .zip(&self.hosts)
            .map(|(p, h)| match p {
                Ok(f) if f.writable() => format!("{} accepts writes", h.label),
                Ok(f) if f.in_recovery => format!("{} is a standby", h.label),
                Ok(_) => format!("{} is read-only", h.label),
                Err(e) => format!("{} unreachable ({e})", h.label),
            })
            .collect();
        let problem = if writable.is_empty() {
            format!(
                "no host accepts writes ({}); retrying until one does",
                roles.join("; ")
            )
        } else {
            format!(
                "{} hosts accept writes at once ({}): refusing to write until only one does \
                 (a promotion in progress? stop the old primary)",
                writable.len(),
                roles.join("; ")
            )
        };
        if c.primary.is_some() || c.problem.as_deref() != Some(problem.as_str()) {
            tracing::warn!(problem = %problem, "PostgreSQL: no single primary");
        }
        c.primary = None;
        c.problem = Some(problem.clone());
        Err(Error::unavailable(COMPONENT, problem))
    }

    /// Forgets the chosen primary if it is host `index`: the next operation probes again.
    pub fn suspect(&self, index: usize) {
        let mut c = self.choice.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(c.primary, Some((i, _)) if i == index) {
            c.primary = None;
            c.checked = None;
        }
    }

    /// Probes every host at once, each within the probe timeout.
    async fn probe_all(&self) -> Vec<std::result::Result<Facts, String>> {
        let mut set = tokio::task::JoinSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let (h, limit) = (h.clone(), self.probe_timeout);
            set.spawn(async move { (i, probe(&h, limit).await) });
        }
        let mut out: Vec<std::result::Result<Facts, String>> =
            vec![Err("not probed".to_string()); self.hosts.len()];
        while let Some(done) = set.join_next().await {
            if let Ok((i, result)) = done {
                out[i] = result.map_err(|e| e.to_string());
            }
        }
        out
    }

    /// Pools for a look-up whose answer may be a little stale: the read replicas, starting with
    /// the next in turn, then the primary's. Without replicas: only the primary's.
    pub async fn readers(&self) -> Result<Vec<PgPool>> {
        let mut pools = Vec::with_capacity(self.readers.len() + 1);
        if !self.readers.is_empty() {
            let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
            for k in 0..self.readers.len() {
                pools.push(self.readers[(start + k) % self.readers.len()].pool.clone());
            }
        }
        match self.writer().await {
            Ok(w) => pools.push(w.host.pool),
            Err(e) if pools.is_empty() => return Err(e),
            Err(_) => {}
        }
        Ok(pools)
    }

    /// Runs the write `f` on one connection of the primary, bounded by the write timeout. With
    /// `confirm` (a change kst will confirm to a user) on a host with synchronous replication,
    /// `Ok` only once a synchronous standby holds everything this host had written when `f`
    /// returned, so a commit whose synchronous wait was cancelled is never confirmed. On a
    /// temporary error or the timeout the connection is closed, not pooled (its backend may
    /// still wait for a standby, holding row locks), and the primary is probed again.
    pub async fn write<T, F>(&self, confirm: bool, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> ConnFuture<'c, T>,
    {
        self.write_on(confirm, |conn, _| f(conn)).await
    }

    /// [`Cluster::write`], `f` also told whether the host it runs on is set up for
    /// synchronous replication ([`Facts::wants_sync`], as its probe found it): the write
    /// and its confirmation follow the same probe.
    pub async fn write_on<T, F>(&self, confirm: bool, f: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection, bool) -> ConnFuture<'c, T>,
    {
        let w = self.writer().await?;
        let mut conn = match w.host.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                self.suspect(w.index);
                return Err(db(e));
            }
        };
        let outcome = tokio::time::timeout(self.write_timeout, async {
            let value = f(&mut conn, w.facts.wants_sync()).await?;
            if confirm && w.facts.wants_sync() {
                confirm_replicated(&mut conn, &w).await?;
            }
            Ok::<T, Error>(value)
        })
        .await;
        let err = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if !e.is_temporary() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => Error::unavailable(
                COMPONENT,
                format!(
                    "{}: the write did not finish within {:?} (a commit waiting for a \
                     synchronous standby that is gone?); not confirmed, retry later",
                    w.host.label, self.write_timeout
                ),
            ),
        };
        conn.close_on_drop();
        self.suspect(w.index);
        Err(err)
    }

    /// For reads kst serves as settled (the key directory's epochs and heads): `Ok` once a
    /// synchronous standby holds everything `w` (the host the read ran on) had written when
    /// this is called, on a host with synchronous replication; at once otherwise. A commit
    /// whose synchronous wait was cancelled (or whose backend was terminated) is visible on
    /// that host although no standby has it, and a failover then loses it: what was read of
    /// it must not be served. No standby attached, or none caught up within the write
    /// timeout: a temporary error (and the host is probed again).
    #[cfg(feature = "transparency")]
    pub async fn confirm_settled(&self, w: &Writer) -> Result<()> {
        if !w.facts.wants_sync() {
            return Ok(());
        }
        let mut conn = match w.host.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                self.suspect(w.index);
                return Err(db(e));
            }
        };
        let err = match tokio::time::timeout(self.write_timeout, confirm_replicated(&mut conn, w))
            .await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => Error::unavailable(
                COMPONENT,
                format!(
                    "{}: no synchronous standby caught up within {:?}; what was read is not \
                     served yet",
                    w.host.label, self.write_timeout
                ),
            ),
        };
        conn.close_on_drop();
        self.suspect(w.index);
        Err(err)
    }

    /// Facts for `/readyz` and `/metrics` (see `KeyStore::topology`).
    pub async fn topology(&self) -> Vec<(String, String)> {
        let mut out = vec![("hosts".to_string(), self.labels().join(","))];
        match self.writer().await {
            Ok(w) => {
                out.push(("primary".into(), w.host.label.clone()));
                out.push((
                    "synchronous_commit".into(),
                    w.facts.synchronous_commit.clone(),
                ));
                out.push((
                    "synchronous_standby_names".into(),
                    w.facts.synchronous_standby_names.clone(),
                ));
                out.push((
                    "sync_standby_attached".into(),
                    (w.facts.sync_standbys > 0).to_string(),
                ));
                out.push((
                    "confirm_after_sync_standby".into(),
                    w.facts.wants_sync().to_string(),
                ));
            }
            Err(e) => {
                out.push(("primary".into(), "none".into()));
                out.push(("problem".into(), e.to_string()));
            }
        }
        if !self.readers.is_empty() {
            let labels: Vec<&str> = self.readers.iter().map(|h| h.label.as_str()).collect();
            out.push(("read_replicas".into(), labels.join(",")));
        }
        out
    }
}

/// Probes `host` on an idle pooled connection, or else (none idle, or the idle one is dead: its
/// backend went away while it sat in the pool, which `try_acquire` does not check) on a
/// connection of its own (not through the pool, which would retry a refused connection until
/// its acquire timeout: a stopped host must count as gone at once).
async fn probe(host: &Host, limit: Duration) -> Result<Facts> {
    let run = async {
        if let Some(mut c) = host.pool.try_acquire() {
            match probe_on(&mut c).await {
                Ok(facts) => return Ok(facts),
                Err(_) => c.close_on_drop(),
            }
        }
        let mut c = PgConnection::connect_with(&host.options)
            .await
            .map_err(db)?;
        let facts = probe_on(&mut c).await;
        let _ = c.close().await;
        facts
    };
    match tokio::time::timeout(limit, run).await {
        Ok(facts) => facts,
        Err(_) => Err(Error::unavailable(
            COMPONENT,
            format!("no answer within {limit:?}"),
        )),
    }
}

async fn probe_on(conn: &mut PgConnection) -> Result<Facts> {
    let row = sqlx::query(PROBE).fetch_one(&mut *conn).await.map_err(db)?;
    let ro: String = row.try_get("ro").map_err(db)?;
    Ok(Facts {
        in_recovery: row.try_get("rec").map_err(db)?,
        read_only: ro == "on",
        synchronous_standby_names: row.try_get("ssn").map_err(db)?,
        synchronous_commit: row.try_get("sc").map_err(db)?,
        sync_standbys: row.try_get("sync_standbys").map_err(db)?,
    })
}

/// Waits until a synchronous standby streaming from this host has reached this host's current
/// WAL position (which is at or after the commit just made, or the commit an idempotency look-up
/// just found). Fails at once when no synchronous standby is attached.
async fn confirm_replicated(conn: &mut PgConnection, w: &Writer) -> Result<()> {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let started = Instant::now();
    loop {
        let row = sqlx::query(REPLICATED)
            .bind(&lsn)
            .bind(&w.facts.synchronous_commit)
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        let reached: Option<bool> = row.try_get("reached").map_err(db)?;
        let attached: i64 = row.try_get("attached").map_err(db)?;
        if reached == Some(true) {
            if started.elapsed() > Duration::from_millis(100) {
                tracing::info!(host = %w.host.label, waited = ?started.elapsed(), "synchronous standby caught up");
            }
            return Ok(());
        }
        if attached == 0 {
            return Err(Error::unavailable(
                COMPONENT,
                format!(
                    "{}: no synchronous standby is attached (synchronous_standby_names = {:?}), \
                     so this write is on one host only; not confirmed, retry later (kst's role \
                     needs pg_monitor to read pg_stat_replication)",
                    w.host.label, w.facts.synchronous_standby_names
                ),
            ));
        }
        tokio::time::sleep(CONFIRM_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// A cluster of one host where nothing listens, with `age` as the age of its last choice
    /// (a writable primary).
    fn cluster_chosen(age: Duration) -> Cluster {
        let options = PgConnectOptions::from_str("postgres://kst@127.0.0.1:1/kst").unwrap();
        let host = Host {
            label: "127.0.0.1:1".into(),
            pool: sqlx::postgres::PgPoolOptions::new()
                .acquire_timeout(Duration::from_millis(200))
                .connect_lazy_with(options.clone()),
            options,
        };
        let cluster = Cluster::new(
            vec![host],
            Vec::new(),
            Duration::from_secs(1),
            Duration::from_millis(200),
        );
        {
            let mut c = cluster.choice.lock().unwrap();
            c.primary = Some((0, Facts::default()));
            c.checked = Some(Instant::now().checked_sub(age).unwrap());
        }
        cluster
    }

    /// Whether `writer()` answers within 100 ms, and with the chosen host.
    async fn answers_at_once(cluster: &Cluster) -> bool {
        match tokio::time::timeout(Duration::from_millis(100), cluster.writer()).await {
            Ok(Ok(w)) => w.index == 0,
            Ok(Err(e)) => panic!("unexpected error: {e}"),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn while_one_operation_probes_the_others_keep_the_last_choice() {
        let cluster = cluster_chosen(RECHECK + Duration::from_millis(100));
        let probe_in_flight = cluster.probing.lock().await;
        assert!(
            answers_at_once(&cluster).await,
            "a choice just past RECHECK serves while another operation probes"
        );
        drop(probe_in_flight);
    }

    #[tokio::test]
    async fn a_choice_older_than_the_grace_waits_for_the_probe() {
        let cluster = cluster_chosen(RECHECK + STALE_SERVE + Duration::from_millis(100));
        let _probe_in_flight = cluster.probing.lock().await;
        assert!(
            !answers_at_once(&cluster).await,
            "too old to serve: waits for the probe in flight"
        );
    }

    #[tokio::test]
    async fn a_suspected_choice_never_serves() {
        let cluster = cluster_chosen(Duration::from_millis(10));
        assert!(answers_at_once(&cluster).await, "fresh");
        cluster.suspect(0);
        let _probe_in_flight = cluster.probing.lock().await;
        assert!(
            !answers_at_once(&cluster).await,
            "forgotten after an error: waits for the probe"
        );
    }

    #[tokio::test]
    async fn without_a_probe_in_flight_an_expired_choice_is_probed_again() {
        let cluster = cluster_chosen(RECHECK + Duration::from_millis(100));
        let err = cluster
            .writer()
            .await
            .expect_err("this operation probes the host, and nothing listens there");
        assert!(err.is_temporary(), "{err}");
    }
}
