//! The operations endpoint of `kst serve`: `/healthz`, `/readyz` and `/metrics` (axum, no TLS).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use kst_core::service::Kst;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::web::PeerAddr;
use crate::shared::stores::WebCounterStore;

/// How long `/readyz` waits for the store and the mailer to answer.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    kst: Kst,
    metrics: PrometheusHandle,
    /// The counters of `[web.limits]` when they live apart from the key store
    /// (`[web.counters]`), checked by `/readyz` too.
    counters: Option<WebCounterStore>,
}

/// The routes: `/healthz` (200 while the process runs), `/readyz` (200 when the store and the
/// mailer answer their checks, else 503 and why; as JSON with the store's topology when asked
/// with `?format=json` or `Accept: application/json`), `/readyz/lmtp` and `/readyz/web` (the
/// same for one side: [`Side`]), `/metrics` (Prometheus text format, with the store's
/// topology as `kst_store_info`).
pub fn router(kst: Kst, metrics: PrometheusHandle) -> Router {
    router_with_counters(kst, metrics, None)
}

/// [`router`], whose `/readyz` also checks the web limits' counter store when it is one of
/// their own (`[web.counters]`), and whose `/metrics` gives its topology as
/// `kst_store_info{store="web-counters(redis)",...}`.
pub fn router_with_counters(
    kst: Kst,
    metrics: PrometheusHandle,
    counters: Option<WebCounterStore>,
) -> Router {
    let counters = counters.filter(WebCounterStore::is_own);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz_all))
        .route("/readyz/lmtp", get(readyz_lmtp))
        .route("/readyz/web", get(readyz_web))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            kst,
            metrics,
            counters,
        })
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    kst: Kst,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, kst, metrics, Router::new(), shutdown).await
}

/// [`run`], with `extra` routes (the key directory's when `[web]` is off, feature
/// `transparency`, under `web::handlers::ops_routes`' guard, which reads the peer address).
pub async fn run_with(
    listener: TcpListener,
    kst: Kst,
    metrics: PrometheusHandle,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let counters = WebCounterStore::in_key_store(Arc::clone(kst.rate_limiter()));
    run_with_counters(listener, kst, metrics, extra, counters, shutdown).await
}

/// [`run_with`], with the web limits' `counters` (`[web.counters]`): when they live apart
/// from the key store, `/readyz` checks them too ([`router_with_counters`]).
pub async fn run_with_counters(
    listener: TcpListener,
    kst: Kst,
    metrics: PrometheusHandle,
    extra: Router,
    counters: WebCounterStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router_with_counters(kst, metrics, Some(counters))
            .merge(extra)
            .into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// What one readiness check covers: an orchestrator that routes the mail side and the web
/// side apart asks for its side only, so that a component one side does not use (the web
/// limits' counter Redis, for the LMTP side) does not take the other side out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `/readyz`: everything the process uses (the store, the web limits' counters when they
    /// are of their own, the mailer).
    All,
    /// `/readyz/lmtp`: what mail needs (the store, the mailer); the web limits' counters are
    /// not checked.
    Lmtp,
    /// `/readyz/web`: what the web listener needs (the store, the web limits' counters when
    /// they are of their own); the mailer is not checked.
    Web,
}

impl Side {
    fn checks_counters(self) -> bool {
        self != Side::Lmtp
    }

    fn checks_mailer(self) -> bool {
        self != Side::Web
    }
}

type Readiness = (StatusCode, [(header::HeaderName, &'static str); 1], String);

async fn readyz_all(state: State<AppState>, uri: Uri, headers: HeaderMap) -> Readiness {
    readyz(state, uri, headers, Side::All).await
}

async fn readyz_lmtp(state: State<AppState>, uri: Uri, headers: HeaderMap) -> Readiness {
    readyz(state, uri, headers, Side::Lmtp).await
}

async fn readyz_web(state: State<AppState>, uri: Uri, headers: HeaderMap) -> Readiness {
    readyz(state, uri, headers, Side::Web).await
}

async fn readyz(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    side: Side,
) -> Readiness {
    let json = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "format=json"))
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"));
    let problems = readiness_problems(&state, side).await;
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        tracing::warn!(problems = %problems.join("; "), ?side, "not ready");
        StatusCode::SERVICE_UNAVAILABLE
    };
    if json {
        let store = state.kst.store();
        let topology: serde_json::Map<String, serde_json::Value> = store_topology(&state)
            .await
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let body = serde_json::json!({
            "ready": problems.is_empty(),
            "problems": problems,
            "store": { "name": store.name(), "topology": topology },
        });
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body}\n"),
        );
    }
    let body = if problems.is_empty() {
        "ready\n".to_string()
    } else {
        format!("not ready: {}\n", problems.join("; "))
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
}

/// The store's [`topology`](kst_core::KeyStore::topology) facts, or one `error` entry when it
/// cannot say within [`CHECK_TIMEOUT`].
async fn store_topology(state: &AppState) -> Vec<(String, String)> {
    match tokio::time::timeout(CHECK_TIMEOUT, state.kst.store().topology()).await {
        Ok(Ok(facts)) => facts,
        Ok(Err(e)) => vec![("error".into(), e.to_string())],
        Err(_) => vec![(
            "error".into(),
            format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
        )],
    }
}

/// What keeps this instance's `side` from being ready (empty when it is).
async fn readiness_problems(state: &AppState, side: Side) -> Vec<String> {
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
    if let Some(counters) = state.counters.as_ref().filter(|_| side.checks_counters()) {
        match tokio::time::timeout(CHECK_TIMEOUT, counters.check()).await {
            Ok(None | Some(Ok(()))) => {}
            Ok(Some(Err(e))) => problems.push(format!(
                "{} (the [web.limits] counters; requests they count are answered 503): {e}",
                counters.name()
            )),
            Err(_) => problems.push(format!(
                "{} (the [web.limits] counters): no answer within {}s",
                counters.name(),
                CHECK_TIMEOUT.as_secs()
            )),
        }
    }
    if !side.checks_mailer() {
        return problems;
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
    problems
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = state.metrics.render();
    let mut info = store_info(state.kst.store().name(), &store_topology(&state).await);
    if let Some(counters) = &state.counters {
        let facts = match tokio::time::timeout(CHECK_TIMEOUT, counters.topology()).await {
            Ok(Some(Ok(facts))) => facts,
            Ok(None) => Vec::new(),
            Ok(Some(Err(e))) => vec![("error".into(), e.to_string())],
            Err(_) => vec![(
                "error".into(),
                format!("no answer within {}s", CHECK_TIMEOUT.as_secs()),
            )],
        };
        let more = store_info(counters.name(), &facts);
        // One HELP/TYPE header per metric name.
        match info.is_empty() {
            true => info = more,
            false => info.extend(
                more.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n")),
            ),
        }
    }
    body.push_str(&info);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// The store's topology facts as one Prometheus info gauge per fact:
/// `kst_store_info{store="postgres",name="primary",value="db1:5432"} 1`. Rendered on each
/// scrape (not kept in the registry), so a fact that changed leaves no stale series behind.
fn store_info(store: &str, facts: &[(String, String)]) -> String {
    if facts.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "# HELP kst_store_info Facts about the store's topology (primary in use, replication \
         settings), one series per fact, value 1\n# TYPE kst_store_info gauge\n",
    );
    for (name, value) in facts {
        out.push_str(&format!(
            "kst_store_info{{store=\"{}\",name=\"{}\",value=\"{}\"}} 1\n",
            label_value(store),
            label_value(name),
            label_value(value)
        ));
    }
    out
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_info_lines_escape_their_labels() {
        assert_eq!(store_info("fs", &[]), "");
        let text = store_info(
            "postgres",
            &[
                ("primary".into(), "db1:5432".into()),
                ("problem".into(), "a \"b\"\\c\nd".into()),
            ],
        );
        assert!(text.starts_with("# HELP kst_store_info "), "{text}");
        assert!(text.contains(
            "kst_store_info{store=\"postgres\",name=\"primary\",value=\"db1:5432\"} 1\n"
        ));
        assert!(text.contains(r#"value="a \"b\"\\c\nd"} 1"#), "{text}");
    }
}
