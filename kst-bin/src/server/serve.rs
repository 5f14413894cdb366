//! `kst serve`: the LMTP daemon that the MTA delivers `keys@` mail to, with its HTTP endpoint,
//! until SIGTERM or SIGINT.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kst_core::service::Kst;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::exit;
use crate::server::lmtp::{Listener, run};
use crate::server::web::{self, StoreLookup, WebService};
use crate::shared::config::{Config, HttpConfig, LmtpConfig, WebConfig};
use crate::shared::stores::{self, Reach, WebCounterStore};
use crate::shared::{logging, metrics, report, wiring};

/// `kst serve --help`: what it does, and the warning about the LMTP port.
pub const SERVE_LONG: &str = "\
Runs the LMTP daemon that Postfix (or Exim) delivers keys@ mail to: one long-running process
instead of one per message. Without --config it runs on the embedded default: keys@example.test,
filesystem store in ./data/keys, replies spooled to ./data/outbox (`kst outbox send` sends them
to the [mailer] relay), LMTP on the Unix socket ./data/lmtp.sock (mode 0660) and /healthz
/readyz /metrics on 127.0.0.1:8080.

WARNING: the LMTP socket is as trusted as the MTA. Whoever can connect to it can write a
\"trusted\" Received: header and publish keys for any account. Keep [lmtp] listen on a Unix
socket with [lmtp] socket_group set to the MTA's group. TCP (listen = \"127.0.0.1:2424\") is an
explicit choice that kst warns about: it does not implement LMTP AUTH, so keep [lmtp] allow as
narrow as your MTA hosts.

SIGTERM or SIGINT stops accepting, lets transactions in flight finish, then exits; a second
signal exits at once (unacknowledged messages stay with the MTA).";

/// `kst serve --help`: the Postfix set-up and the config keys.
pub const SERVE_AFTER: &str = "\
Postfix set-up:

  # /etc/postfix/main.cf
  smtpd_sasl_authenticated_header = yes
  transport_maps = hash:/etc/postfix/transport    # keys@example.net  lmtp:unix:/run/kst/lmtp.sock

Config keys: [lmtp] listen, socket_group, allow, max_connections, command_timeout_secs,
data_timeout_secs, max_recipients, shutdown_grace_secs; [limits] max_message_bytes; [http]
listen (\"\" turns it off); [web] listen (the public WKD/VKS/HKP listener, off unless set),
tls_cert, tls_key, trusted_proxies, [web.limits] and [web.counters] (the limits' counters on a
Redis of their own, with its connect_timeout_ms and response_timeout_ms).
See deploy/kst.toml and docs/OPERATIONS.md.";

/// Runs `kst serve` with the configuration at `config` (without one: the embedded quick-start
/// configuration) and returns its exit code.
pub async fn run_command(config: Option<&Path>) -> u8 {
    let loaded = match config {
        Some(path) => Config::load(Some(path)),
        None => Config::load_with_env(None, embedded_env()),
    };
    match loaded {
        Ok(cfg) => start(cfg).await,
        Err(e) => report::config_error(&e),
    }
}

/// The process environment, plus the embedded quick-start domain (`example.test`, RFC 2606, trusting the
/// local MTA) unless `KST_KST__DOMAINS` names one: `kst serve` with no configuration file.
fn embedded_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if !env.iter().any(|(k, _)| k == "KST_KST__DOMAINS") {
        env.push(("KST_KST__DOMAINS".into(), "example.test".into()));
        if !env.iter().any(|(k, _)| k == "KST_KST__TRUSTED_MTA_HOSTS") {
            env.push(("KST_KST__TRUSTED_MTA_HOSTS".into(), "localhost".into()));
        }
    }
    env
}

/// `kst serve`: builds the KST (a PostgreSQL or Redis store that is down does not stop the
/// start; `/readyz` says so) and runs the LMTP daemon until a signal.
async fn start(cfg: Config) -> u8 {
    if let Some(note) = logging::init(&cfg.log) {
        tracing::warn!("{note}");
    }
    // The logs the store records in are the ones served: one directory thread per domain.
    #[cfg_attr(not(feature = "transparency"), allow(unused_variables))]
    let (kst, logs) = match wiring::build_kst_and_logs(&cfg, Reach::Lazily).await {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return report::error(&e);
        }
    };
    tracing::info!(
        domains = ?cfg.kst.domains,
        store = kst.store().name(),
        "kst serve starting"
    );
    wiring::publish_submission_keys(&kst).await;
    // The policy directory's `kst-log` file of each domain with a directory (on [web]).
    #[cfg(feature = "transparency")]
    let log_keys = match crate::shared::transparency::public_records(&logs) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return report::error(&e);
        }
    };
    #[cfg(not(feature = "transparency"))]
    let log_keys = HashMap::new();
    #[cfg(feature = "transparency")]
    crate::shared::metrics::watch_unverified(&logs);
    #[cfg(feature = "transparency")]
    if !logs.is_empty() {
        crate::shared::metrics::watch_mail_proofs(kst.clone());
    }
    #[cfg(feature = "transparency")]
    let extra = if logs.is_empty() {
        axum::Router::new()
    } else {
        match cfg.transparency.witness_keys() {
            Ok(witnesses) => crate::server::log_http::router(
                logs,
                kst.policy().address_policy.clone(),
                witnesses,
            ),
            Err(e) => {
                let e = kst_core::Error::Config(e.to_string());
                tracing::error!(error = %e, "cannot start");
                return report::error(&e);
            }
        }
    };
    #[cfg(not(feature = "transparency"))]
    let extra = axum::Router::new();
    match daemon_full(
        cfg.lmtp.clone(),
        cfg.http.clone(),
        cfg.web.clone(),
        kst,
        extra,
        log_keys,
    )
    .await
    {
        Ok(()) => {
            tracing::info!("kst serve stopped");
            exit::OK
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kst serve failed");
            eprintln!("kst: {e:#}");
            exit::UNAVAILABLE
        }
    }
}

/// Runs `kst serve` without the public listener (see [`daemon_with_web`]).
pub async fn daemon(lmtp: LmtpConfig, http: HttpConfig, kst: Kst) -> anyhow::Result<()> {
    daemon_with_web(lmtp, http, WebConfig::default(), kst).await
}

/// Runs `kst serve`: binds the LMTP listener (`[lmtp] listen`), the HTTP endpoint (`[http]
/// listen`, off when empty) and the public listener (`[web] listen`, off when empty), serves
/// until SIGTERM or SIGINT, then lets transactions in flight finish for up to `[lmtp]
/// shutdown_grace_secs`. A second signal returns at once.
pub async fn daemon_with_web(
    lmtp: LmtpConfig,
    http: HttpConfig,
    web_cfg: WebConfig,
    kst: Kst,
) -> anyhow::Result<()> {
    daemon_full(
        lmtp,
        http,
        web_cfg,
        kst,
        axum::Router::new(),
        HashMap::new(),
    )
    .await
}

/// [`daemon_with_web`], with `extra` routes on `[web]`, or on `[http]` when `[web]` is off
/// (the key directory's, feature `transparency`); on either under `[web.limits]`. `log_keys`:
/// the WKD policy directory's `kst-log` file per domain (on `[web]`).
pub async fn daemon_full(
    lmtp: LmtpConfig,
    http: HttpConfig,
    web_cfg: WebConfig,
    kst: Kst,
    mut extra: axum::Router,
    log_keys: HashMap<String, String>,
) -> anyhow::Result<()> {
    lmtp.validate().context("invalid [lmtp] section")?;
    web_cfg
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid [web] section: {e}"))?;
    let signals = signal_count().context("cannot install the SIGTERM/SIGINT handlers")?;
    let metrics = metrics::init();
    let counters = web_counters(&web_cfg, &kst).await?;
    // Without [web], the extra routes go to [http], under [web.limits] there too (the
    // loopback operations listener may be what a proxy forwards the public to).
    let ops_guard = match web_cfg.enabled() {
        true => None,
        false => Some(
            web::guard_of(&web_cfg, counters.limiter())
                .map_err(|e| anyhow::anyhow!("invalid [web] section: {e}"))?,
        ),
    };
    let listener = Listener::bind_config(&lmtp)
        .await
        .with_context(|| format!("cannot listen for LMTP on {:?} (lmtp.listen)", lmtp.listen))?;
    let web_task = if web_cfg.enabled() {
        let addr = web_cfg.listen.trim().to_string();
        let l = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen for WKD/VKS/HKP on {addr:?} (web.listen)"))?;
        let service = WebService {
            lookup: Arc::new(StoreLookup::new(Arc::clone(kst.store()))),
            counters: counters.limiter(),
            domains: kst.policy().domains.clone(),
            address_policy: kst.policy().address_policy.clone(),
            config: web_cfg,
            log_keys,
        };
        tracing::info!(
            listen = %addr,
            tls = service.config.tls_cert.is_some(),
            "public listener (WKD, VKS, HKP) listening"
        );
        Some(tokio::spawn(web::serve_with(
            l,
            service,
            std::mem::take(&mut extra),
            at_least(signals.clone(), 1),
        )))
    } else {
        None
    };
    if let Some(guard) = ops_guard {
        extra = web::handlers::ops_routes(std::mem::take(&mut extra), guard);
    }
    let http_task = match http.listen.trim() {
        "" => None,
        addr => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for HTTP on {addr:?} (http.listen)"))?;
            tracing::info!(listen = %addr, "HTTP endpoint listening (/healthz /readyz /metrics)");
            Some(tokio::spawn(crate::server::http::run_with_counters(
                l,
                kst.clone(),
                metrics.clone(),
                extra,
                counters.clone(),
                at_least(signals.clone(), 1),
            )))
        }
    };
    let upkeep = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        }
    });
    let reminders = kst
        .reminders()
        .enabled
        .then(|| tokio::spawn(reminder_loop(kst.clone())));
    let mailer = kst.mailer().clone();
    let (result, graceful) = tokio::select! {
        r = run(listener, kst, lmtp, at_least(signals.clone(), 1)) => (r, true),
        () = at_least(signals, 2) => {
            tracing::warn!("second signal: exiting at once; unacknowledged messages will be retried by the MTA");
            (Ok(()), false)
        }
    };
    upkeep.abort();
    if let Some(task) = reminders {
        task.abort();
    }
    if graceful {
        // Pooled relay sessions end with QUIT rather than a dropped connection.
        mailer.close().await;
    }
    if let Some(task) = web_task {
        match tokio::time::timeout(Duration::from_secs(2), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = format!("{e:#}"), "public listener failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "public listener task failed"),
            Err(_) => tracing::warn!("public listener did not stop within 2s"),
        }
    }
    if let Some(task) = http_task {
        match tokio::time::timeout(Duration::from_secs(2), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP endpoint failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP endpoint task failed"),
            Err(_) => tracing::warn!("HTTP endpoint did not stop within 2s"),
        }
    }
    result
}

/// The counters of `[web.limits]` (`[web.counters]`): the key store's, or a Redis of their
/// own, checked once here (unreachable: a warning, and `kst serve` starts anyway, as with the
/// key store; `/readyz` reports it until it answers).
async fn web_counters(web_cfg: &WebConfig, kst: &Kst) -> anyhow::Result<WebCounterStore> {
    let counters = stores::open_web_counters(&web_cfg.counters, Arc::clone(kst.rate_limiter()))
        .map_err(|e| anyhow::anyhow!("invalid [web.counters] section: {e}"))?;
    match counters.check().await {
        None => {}
        Some(Ok(())) => tracing::info!(
            prefix = web_cfg.counters.prefix(),
            "[web.limits] counted on a Redis of their own ([web.counters])"
        ),
        Some(Err(e)) => tracing::warn!(
            error = %e,
            "the [web.counters] Redis cannot be reached; starting anyway: requests that the \
             limits count are answered 503 until it answers (after 1 s of failing counters)"
        ),
    }
    Ok(counters)
}

/// Keys a second that a run of the expiry reminders in `kst serve` reads at most. A run reads
/// every current key of the store (and parses it); unpaced, the first run at start took a core
/// and the store's server away from the look-ups for as long as it lasted (minutes at 10^6
/// keys). At this pace 10^6 keys take about 33 minutes, within the default interval of an
/// hour, for a few percent of a core.
pub const REMINDER_KEYS_PER_SEC: u64 = 500;

/// When a run that began at `start` may go on after reading `read` keys
/// ([`REMINDER_KEYS_PER_SEC`]).
pub fn reminder_pace(start: tokio::time::Instant, read: usize) -> tokio::time::Instant {
    let read = u64::try_from(read).unwrap_or(u64::MAX);
    start + Duration::from_millis(read.saturating_mul(1000) / REMINDER_KEYS_PER_SEC)
}

/// Sends the expiry reminders every `[reminders] interval_secs`, the first run at start, each
/// run paced ([`REMINDER_KEYS_PER_SEC`]). A failed run (store or mailer down) is logged and
/// the next one tries again; each reminder goes out at most once across a pool (claimed in
/// the store first). What each run did is counted in `kst_reminders_total{outcome}`.
async fn reminder_loop(kst: Kst) {
    let settings = kst.reminders().clone();
    let mut every = tokio::time::interval(Duration::from_secs(settings.interval_secs.max(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let start = tokio::time::Instant::now();
        let pace = |read| tokio::time::sleep_until(reminder_pace(start, read));
        match kst_core::reminder::send_due_paced(&kst, &settings, kst_core::time::unix_now(), pace)
            .await
        {
            Ok(run) => {
                crate::shared::metrics::reminders("sent", run.sent.len());
                crate::shared::metrics::reminders("refused", run.refused.len());
                crate::shared::metrics::reminders("rate-limited", run.rate_limited);
                if !run.sent.is_empty() || !run.refused.is_empty() || run.rate_limited > 0 {
                    tracing::info!(
                        sent = run.sent.len(),
                        refused = run.refused.len(),
                        already_claimed = run.already_claimed,
                        rate_limited = run.rate_limited,
                        "expiry reminders"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry reminders failed; retried next run"),
        }
    }
}

/// Counts SIGTERM and SIGINT deliveries.
fn signal_count() -> std::io::Result<watch::Receiver<u32>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            n += 1;
            if n == 1 {
                tracing::info!(
                    "shutdown signal: finishing transactions in flight (signal again to exit at once)"
                );
            }
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Completes once `n` signals have arrived (never if the counter is gone).
async fn at_least(mut signals: watch::Receiver<u32>, n: u32) {
    if signals.wait_for(|&count| count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reminder_run_reads_at_most_its_pace() {
        let start = tokio::time::Instant::now();
        assert_eq!(reminder_pace(start, 0), start);
        let per_sec = usize::try_from(REMINDER_KEYS_PER_SEC).unwrap();
        assert_eq!(
            reminder_pace(start, per_sec),
            start + Duration::from_secs(1)
        );
        // 10^6 keys within the default interval of an hour.
        let million = reminder_pace(start, 1_000_000) - start;
        assert!(million < Duration::from_secs(3_600), "{million:?}");
        assert!(million >= Duration::from_secs(1_000), "{million:?}");
        // No overflow on absurd counts.
        let _ = reminder_pace(start, usize::MAX);
    }
}
