//! The operations endpoint of `kst serve`: `/healthz`, `/readyz` and `/metrics` (axum, no TLS).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kst_core::service::Kst;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// How long `/readyz` waits for the store and the mailer to answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    kst: Kst,
    metrics: PrometheusHandle,
}

/// The routes: `/healthz` (200 while the process runs), `/readyz` (200 when the store and the
/// mailer answer their checks, else 503 and why), `/metrics` (Prometheus text format).
pub fn router(kst: Kst, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { kst, metrics })
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    kst: Kst,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(kst, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    let store = state.kst.store();
    match tokio::time::timeout(CHECK_TIMEOUT, store.check()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("store({}): {e}", store.name())),
        Err(_) => problems.push(format!(
            "store({}): no answer within {}s",
            store.name(),
            CHECK_TIMEOUT.as_secs()
        )),
    }
    let mailer = state.kst.mailer();
    match tokio::time::timeout(CHECK_TIMEOUT, mailer.check()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("mailer({}): {e}", mailer.name())),
        Err(_) => problems.push(format!(
            "mailer({}): no answer within {}s",
            mailer.name(),
            CHECK_TIMEOUT.as_secs()
        )),
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        tracing::warn!(problems = %problems.join("; "), "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
