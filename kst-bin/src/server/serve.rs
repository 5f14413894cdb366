//! `kst serve`: the LMTP daemon that the MTA delivers `keys@` mail to, with its HTTP endpoint.
//!
//! **The LMTP port is as trusted as the MTA**: whoever can talk to it can write a "trusted"
//! `Received:` header. It listens on loopback (or a Unix socket) by default and refuses peers
//! outside `[lmtp] allow`.

pub mod config;
pub mod server;
pub mod session;

use std::time::Duration;

use anyhow::Context as _;
use kst_core::service::Kst;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

pub use config::{HttpConfig, LmtpConfig};
pub use server::{Listener, run, serve_connection};

/// Runs `kst serve`: binds the LMTP listener (`[lmtp] listen`) and the HTTP endpoint (`[http]
/// listen`, off when empty), serves until SIGTERM or SIGINT, then lets transactions in flight
/// finish for up to `[lmtp] shutdown_grace_secs`. A second signal returns at once.
pub async fn serve(lmtp: LmtpConfig, http: HttpConfig, kst: Kst) -> anyhow::Result<()> {
    lmtp.validate().context("invalid [lmtp] section")?;
    let signals = signal_count().context("cannot install the SIGTERM/SIGINT handlers")?;
    let metrics = crate::metrics::init();
    let listener = Listener::bind(&lmtp.listen)
        .await
        .with_context(|| format!("cannot listen for LMTP on {:?} (lmtp.listen)", lmtp.listen))?;
    let http_task = match http.listen.trim() {
        "" => None,
        addr => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for HTTP on {addr:?} (http.listen)"))?;
            tracing::info!(listen = %addr, "HTTP endpoint listening (/healthz /readyz /metrics)");
            Some(tokio::spawn(crate::http::run(
                l,
                kst.clone(),
                metrics.clone(),
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
    let mailer = kst.mailer().clone();
    let (result, graceful) = tokio::select! {
        r = run(listener, kst, lmtp, at_least(signals.clone(), 1)) => (r, true),
        () = at_least(signals, 2) => {
            tracing::warn!("second signal: exiting at once; unacknowledged messages will be retried by the MTA");
            (Ok(()), false)
        }
    };
    upkeep.abort();
    if graceful {
        // Pooled relay sessions end with QUIT rather than a dropped connection.
        mailer.close().await;
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
