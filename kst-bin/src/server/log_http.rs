//! The key directory's HTTP endpoint (feature `transparency`), read-only, on `[web]` (or
//! `[http]` when `[web]` is off):
//!
//! - `GET /.well-known/kst/log/<domain>/keys`: the head key and the VRF key (hex lines);
//! - `GET /.well-known/kst/log/<domain>/head`: the signed head of the latest epoch;
//! - `GET /.well-known/kst/log/<domain>/lookup/<address>`: the signed head and the lookup
//!   (or absence) proof for the address against it
//!   (`kst_core::transparency::answer`); with `?since=<epoch>` also the append-only proof
//!   from that epoch (at most `MAX_SINCE_EPOCHS` epochs back, else 422);
//! - `GET /.well-known/kst/log/<domain>/history/<address>`: the signed head and akd's history
//!   proof of the address's newest versions (`kst_core::transparency::history`); 404 for an
//!   address the directory never held.
//!
//! Unknown domain or an address of another domain: 404; not an address: 400; the directory
//! unreadable: 503 (retry). Answers are not cached (`Cache-Control: no-store`): each names
//! the latest epoch.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kst_core::AddressPolicy;
use kst_core::time::unix_now;
use kst_core::transparency::answer::head_text;
use kst_core::transparency::{DomainLog, TransparencyError};

#[derive(Clone)]
struct LogState {
    logs: Arc<HashMap<String, Arc<DomainLog>>>,
    address_policy: AddressPolicy,
}

/// The routes of the logs in `logs`.
pub fn router(logs: Vec<Arc<DomainLog>>, address_policy: AddressPolicy) -> Router {
    let logs = logs
        .into_iter()
        .map(|l| (l.domain().to_string(), l))
        .collect();
    Router::new()
        .route("/.well-known/kst/log/{domain}/keys", get(keys))
        .route("/.well-known/kst/log/{domain}/head", get(head))
        .route(
            "/.well-known/kst/log/{domain}/lookup/{address}",
            get(lookup),
        )
        .route(
            "/.well-known/kst/log/{domain}/history/{address}",
            get(history),
        )
        .with_state(LogState {
            logs: Arc::new(logs),
            address_policy,
        })
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    text(StatusCode::NOT_FOUND, format!("{what}\n"))
}

fn failed(domain: &str, e: &kst_core::transparency::TransparencyError) -> Response {
    tracing::warn!(domain, error = %e, "key directory: cannot answer");
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key directory cannot answer now; retry later\n".into(),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r
}

async fn keys(State(s): State<LogState>, Path(domain): Path<String>) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    match log.vrf_public_key() {
        Ok(vrf) => text(
            StatusCode::OK,
            format!(
                "head-key {}\nvrf-key {}\n",
                hex::encode(log.head_public_key()),
                hex::encode(vrf)
            ),
        ),
        Err(e) => failed(&domain, &e),
    }
}

async fn head(State(s): State<LogState>, Path(domain): Path<String>) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    match log.head(unix_now()).await.and_then(|h| head_text(&h)) {
        Ok(body) => text(StatusCode::OK, body),
        Err(e) => failed(&domain, &e),
    }
}

// A `Response` is what the handler returns, once; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
/// The domain's log and the normalized address of a `.../<domain>/<route>/<address>` path,
/// or the answer to give instead.
fn log_and_address(
    s: &LogState,
    domain: &str,
    address: &str,
) -> Result<(Arc<DomainLog>, kst_core::Address), Response> {
    let Some(log) = s.logs.get(domain) else {
        return Err(not_found("no key directory for this domain"));
    };
    let Ok(address) = s.address_policy.normalize(address) else {
        return Err(text(StatusCode::BAD_REQUEST, "not an address\n".into()));
    };
    if address.domain() != domain {
        return Err(not_found("the address is not in this domain"));
    }
    Ok((log.clone(), address))
}

#[allow(clippy::result_large_err)]
/// `since=<epoch>` of a query string (`None` without it); `Err` for anything else.
fn since(query: Option<&str>) -> Result<Option<u64>, Response> {
    let bad = || {
        text(
            StatusCode::BAD_REQUEST,
            "the only query is since=<epoch>, a number\n".into(),
        )
    };
    match query {
        None | Some("") => Ok(None),
        Some(q) => match q.strip_prefix("since=").map(str::parse::<u64>) {
            Some(Ok(epoch)) => Ok(Some(epoch)),
            _ => Err(bad()),
        },
    }
}

async fn lookup(
    State(s): State<LogState>,
    Path((domain, address)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let (log, address) = match log_and_address(&s, &domain, &address) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let since = match since(query.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match log
        .answer_since(&address, since, unix_now())
        .await
        .and_then(|a| a.to_text())
    {
        Ok(body) => text(StatusCode::OK, body),
        Err(TransparencyError::Range(m)) => {
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n"))
        }
        Err(e) => failed(&domain, &e),
    }
}

async fn history(
    State(s): State<LogState>,
    Path((domain, address)): Path<(String, String)>,
) -> Response {
    let (log, address) = match log_and_address(&s, &domain, &address) {
        Ok(found) => found,
        Err(r) => return r,
    };
    match log.history(&address, unix_now()).await {
        Ok(Some(h)) => match h.to_text() {
            Ok(body) => text(StatusCode::OK, body),
            Err(e) => failed(&domain, &e),
        },
        Ok(None) => not_found("the directory holds no version of this address"),
        Err(e) => failed(&domain, &e),
    }
}
