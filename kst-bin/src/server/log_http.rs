//! The key directory's HTTP endpoint (feature `transparency`), read-only, on `[web]` (or
//! `[http]` when `[web]` is off):
//!
//! - `GET /.well-known/kst/log/<domain>/keys`: the head key and the VRF key (hex lines);
//! - `GET /.well-known/kst/log/<domain>/head`: the stored signed head of the latest epoch
//!   and the witnesses' cosignatures of it (`kst_core::transparency::witness`);
//! - `GET /.well-known/kst/log/<domain>/head/<epoch>`: the same for an older epoch (404 for
//!   an epoch after the latest; an older epoch without a stored head gets one signed late,
//!   `kst_core::transparency::backfill`, also in the background for every log served here:
//!   an expensive request then (not for an epoch after the newest head served, `/head`),
//!   and 422 when the proof it needs is over
//!   `backfill::FILL_MAX_ELEMENTS`, counted before it is built);
//! - `GET /.well-known/kst/log/<domain>/lookup/<address>`: the signed head and the lookup
//!   (or absence) proof for the address against it
//!   (`kst_core::transparency::answer`); with `?witnessed=1` also the witnesses' newest
//!   cosignatures and the append-only proof from their heads (`kst-log-answer-v2`);
//! - `GET /.well-known/kst/log/<domain>/audit?from=A&to=B`: the signed head of every epoch
//!   from A to B and the append-only proof between them (at most
//!   [`MAX_AUDIT_EPOCHS`] epochs, else 400; a proof over what a witness accepts,
//!   `kst_core::transparency::log::MAX_PROOF_ELEMENTS`, is 422, counted before it is built);
//! - `POST /.well-known/kst/log/<domain>/cosignature`: a witness of `[transparency]
//!   witnesses` hands in its cosignature (the head text with one cosignature line, at most
//!   [`MAX_HEAD_TEXT`] bytes): 204 when stored (or stored already); 403 for a witness not
//!   listed; 409 when the head is not the one stored for its epoch, or the cosignature is
//!   older than the newest stored for that witness (a replay: an earlier epoch, or the same
//!   epoch checked earlier); 400 when it does not verify.
//! - with `?since=<epoch>`, a lookup also carries the append-only proof from that epoch (at
//!   most `MAX_SINCE_EPOCHS` epochs back and `MAX_PROOF_ELEMENTS`, counted before it is
//!   built, else 422); with `&steps=1` instead bounded by
//!   bytes and changes (`HTTP_STEP_BUDGET`, counted before anything is built): the whole
//!   proof, or its first steps up to an older signed head (`append-step`), or, when not even
//!   the first step fits, none (`too-far`, 200: the client starts from a witness-cosigned
//!   head or re-pins); `since`, `steps` and `witnessed` combine;
//! - `GET /.well-known/kst/log/<domain>/history/<address>`: the signed head and akd's history
//!   proof of the address's newest versions (`kst_core::transparency::history`); 404 for an
//!   address the directory never held. With `?before=<version>`, the page of the versions
//!   below that one (`HistoryPage`, at most `MAX_VERSIONS` of them, each with its update
//!   proof); 404 when there is none, 400 for any other query.
//!
//! Unknown domain or an address of another domain: 404; not an address: 400; the directory
//! unreadable or busy: 503 (retry). Answers are not cached (`Cache-Control: no-store`): each
//! names the latest epoch.
//!
//! Limits (docs/SECURITY.md, "Key transparency (issue 18): threat model"): every route is
//! under `[web.limits]`, on `[web]` and on `[http]` alike (`web::handlers::ops_routes`), and
//! an absence answer, and a look-up, history or history page (`?before=`) of an address whose
//! newest version is a deletion, counts as a miss like a WKD 404 (the response carries
//! [`FoundNothing`]), so the log is no better a dictionary oracle than WKD. The expensive
//! requests (audits, look-ups with `since` or `witnessed`, histories, a head signed late)
//! are served at most
//! [`MAX_HEAVY_AT_ONCE`] at a time per process, at most [`MAX_HEAVY_PER_CLIENT`] of them one
//! client's (a client as `[web.limits]` counts it: an IPv4 address or an IPv6 /64); one that
//! waits longer than [`HEAVY_WAIT`] for its turn is answered 503. The directory's own queue
//! is bounded too (`kst_core::transparency::log::MAX_QUEUED_READS`: 503 beyond it), and a
//! queued request whose client went away is dropped there unbuilt, so a client that closes
//! its connections does not get past the bound on expensive requests at once; nor past it
//! with the checks of its answers that had started (an answer's append-only part and an
//! audit are verified before they are served, on blocking threads that cannot be stopped):
//! the turn is given back when the last of them ends, not when the client goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kst_core::AddressPolicy;
use kst_core::time::unix_now;
use kst_core::transparency::answer::HTTP_STEP_BUDGET;
use kst_core::transparency::witness::{
    MAX_AUDIT_EPOCHS, MAX_HEAD_TEXT, head_with_cosignatures_text, parse_head_with_cosignatures,
};
use kst_core::transparency::{DomainLog, SignedHead, TransparencyError, self_check};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::web::client::ClientKey;
use super::web::handlers::WARN_EVERY;
use super::web::limits::{FoundNothing, MissRoom};
use crate::shared::logging::LogEvery;

/// "key directory: cannot answer", written at most once per [`WARN_EVERY`] and kind of error
/// ([`TransparencyError`]'s variant) with a count of those left out (a flood while the
/// directory's store is down is no flood of log lines, and one kind leaves out no other).
static CANNOT_ANSWER: LogEvery = LogEvery::new(WARN_EVERY);

/// Expensive requests (audits, look-ups with `since` or `witnessed`, histories) served at once
/// per process.
pub const MAX_HEAVY_AT_ONCE: usize = 4;

/// Of the [`MAX_HEAVY_AT_ONCE`] turns, the most one client holds or waits for at once (its
/// further expensive requests wait behind its own): one client holding every turn kept every
/// other client's expensive requests waiting, and answered 503 after [`HEAVY_WAIT`] (red
/// team round 10). The clients whose forwarding chain the guard cannot read share one
/// (`web::client::UNKNOWN_CLIENT`), as they share one request budget; routes served without
/// the guard (no client named) have no share.
pub const MAX_HEAVY_PER_CLIENT: usize = 2;

/// How long an expensive request waits for its turn before it is answered 503.
pub const HEAVY_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct LogState {
    logs: Arc<HashMap<String, Arc<DomainLog>>>,
    address_policy: AddressPolicy,
    /// `[transparency] witnesses`: name and key.
    witnesses: Arc<Vec<(String, [u8; 32])>>,
    /// Turns of the expensive requests ([`MAX_HEAVY_AT_ONCE`]).
    heavy: Arc<Semaphore>,
    /// Each client's share of them ([`MAX_HEAVY_PER_CLIENT`]).
    shares: Arc<Shares>,
    /// Per domain, the newest epoch whose head this process served, plus one (0: none yet).
    /// A `/head/<epoch>` after it is not an expensive request: the directory answers 404
    /// (or, for an epoch committed since, has its head stored at the commit).
    newest: Arc<HashMap<String, AtomicU64>>,
}

impl LogState {
    /// Notes that the head of `epoch` of `domain` was served.
    fn served(&self, domain: &str, epoch: u64) {
        if let Some(n) = self.newest.get(domain) {
            n.fetch_max(epoch.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Whether `epoch` of `domain` is after the newest head served here.
    fn after_newest(&self, domain: &str, epoch: u64) -> bool {
        self.newest
            .get(domain)
            .map(|n| n.load(Ordering::Relaxed))
            .is_some_and(|n| n > 0 && epoch >= n)
    }
}

/// The clients' shares of the expensive turns: a semaphore of [`MAX_HEAVY_PER_CLIENT`] per
/// client that has an expensive request in hand (the entry goes with its last one, so the map
/// holds at most one entry per request being served or waiting).
#[derive(Default)]
struct Shares(std::sync::Mutex<HashMap<Arc<str>, Arc<Semaphore>>>);

impl Shares {
    /// `client`'s share, not taken yet.
    fn of(self: &Arc<Self>, client: &Arc<str>) -> Share {
        let semaphore = Arc::clone(
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(Arc::clone(client))
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_HEAVY_PER_CLIENT))),
        );
        Share {
            shares: Arc::clone(self),
            client: Arc::clone(client),
            semaphore: Some(semaphore),
            permit: None,
        }
    }
}

/// One request's place in its client's share: taken (`permit`) or not yet; dropping it
/// gives it back, and removes the client's entry when no request of it is left.
struct Share {
    shares: Arc<Shares>,
    client: Arc<str>,
    semaphore: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Share {
    /// Takes the place if the share has room now; true when taken.
    fn try_take(&mut self) -> bool {
        if self.permit.is_none() {
            self.permit = self
                .semaphore
                .as_ref()
                .and_then(|s| Arc::clone(s).try_acquire_owned().ok());
        }
        self.permit.is_some()
    }

    /// Takes the place, waiting for room in the share.
    async fn take(&mut self) -> Result<(), tokio::sync::AcquireError> {
        if self.permit.is_none()
            && let Some(s) = &self.semaphore
        {
            self.permit = Some(Arc::clone(s).acquire_owned().await?);
        }
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        drop(self.permit.take());
        drop(self.semaphore.take());
        let mut map = self
            .shares
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Clones are made under the lock: a count of one is the map's own, nobody else's.
        if map
            .get(&self.client)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.client);
        }
    }
}

/// An expensive request's turn: held until the request is answered (or dropped) and the
/// append-only checks it started on blocking threads have ended
/// (`kst_core::transparency::self_check::holding`): a check cannot be stopped, so a turn
/// given back on the client's disconnect let the checks run on past [`MAX_HEAVY_AT_ONCE`]
/// (review R2).
struct HeavyTurn {
    _turn: OwnedSemaphorePermit,
    _share: Option<Share>,
}

impl LogState {
    // A `Response` is what the handler returns, once; boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    /// A turn for an expensive request, or the 503 to answer when none comes in time. A
    /// look-up that must wait for its turn gives the room it holds for its miss in the web
    /// limits' counters' queue back meanwhile, and holds it again once its turn comes (503
    /// when the queue has no room then): waiting requests holding that room for up to
    /// [`HEAVY_WAIT`] filled it, and every look-up of the listener was answered 503
    /// ([`MissRoom`]). With `client` (the web limits' guard names it), the turn is taken
    /// within that client's share first ([`MAX_HEAVY_PER_CLIENT`]), so its other requests
    /// wait behind its own, not in front of other clients'.
    async fn heavy_turn(
        &self,
        room: Option<&MissRoom>,
        client: Option<&ClientKey>,
    ) -> Result<HeavyTurn, Response> {
        let mut share = client.map(|c| self.shares.of(&c.0));
        if share.as_mut().is_none_or(Share::try_take)
            && let Ok(turn) = Arc::clone(&self.heavy).try_acquire_owned()
        {
            return Ok(HeavyTurn {
                _turn: turn,
                _share: share,
            });
        }
        if let Some(room) = room {
            room.give_back();
        }
        let waited = tokio::time::timeout(HEAVY_WAIT, async {
            if let Some(share) = share.as_mut() {
                share.take().await?;
            }
            Arc::clone(&self.heavy).acquire_owned().await
        })
        .await;
        let turn = match waited {
            Ok(Ok(turn)) => HeavyTurn {
                _turn: turn,
                _share: share,
            },
            _ => return Err(busy()),
        };
        match room.map(MissRoom::hold_again) {
            Some(Err(_)) => Err(counters_busy()),
            _ => Ok(turn),
        }
    }
}

/// The routes of the logs in `logs`; `witnesses` (name, key) are the witnesses whose
/// cosignatures `POST .../cosignature` accepts.
pub fn router(
    logs: Vec<Arc<DomainLog>>,
    address_policy: AddressPolicy,
    witnesses: Vec<(String, [u8; 32])>,
) -> Router {
    let logs: HashMap<String, Arc<DomainLog>> = logs
        .into_iter()
        .map(|l| {
            // Epochs without a stored head (a directory kept from before heads were stored)
            // get one in the background, so audits from epoch 0 can be served.
            l.start_backfill();
            (l.domain().to_string(), l)
        })
        .collect();
    Router::new()
        .route("/.well-known/kst/log/{domain}/keys", get(keys))
        .route("/.well-known/kst/log/{domain}/head", get(head))
        .route("/.well-known/kst/log/{domain}/head/{epoch}", get(head_at))
        .route(
            "/.well-known/kst/log/{domain}/lookup/{address}",
            get(lookup),
        )
        .route("/.well-known/kst/log/{domain}/audit", get(audit))
        .route(
            "/.well-known/kst/log/{domain}/cosignature",
            post(cosignature).layer(DefaultBodyLimit::max(MAX_HEAD_TEXT)),
        )
        .route(
            "/.well-known/kst/log/{domain}/history/{address}",
            get(history),
        )
        .with_state(LogState {
            newest: Arc::new(
                logs.keys()
                    .map(|d| (d.clone(), AtomicU64::new(0)))
                    .collect(),
            ),
            logs: Arc::new(logs),
            address_policy,
            witnesses: Arc::new(witnesses),
            heavy: Arc::new(Semaphore::new(MAX_HEAVY_AT_ONCE)),
            shares: Arc::default(),
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
    let class = match e {
        TransparencyError::Directory(_) => "directory",
        TransparencyError::Verification(_) => "verification",
        TransparencyError::Conflict(_) => "conflict",
        TransparencyError::Signature(_) => "signature",
        TransparencyError::Range(_) => "range",
        TransparencyError::Stale(_) => "stale",
        TransparencyError::Malformed(_) => "malformed",
    };
    if let Some(suppressed) = CANNOT_ANSWER.check_class(class) {
        tracing::warn!(domain, error = %e, suppressed, "key directory: cannot answer");
    }
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key directory cannot answer now; retry later\n".into(),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r
}

/// 503: the web limits' counters' queue has no room for the miss of a look-up whose turn
/// came (the counters are slow or stalled).
fn counters_busy() -> Response {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the rate limiter's counters are busy; retry later\n".into(),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    r
}

/// 503: too many expensive requests at once.
fn busy() -> Response {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key directory is busy with other expensive requests; retry later\n".into(),
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

/// A stored head with its cosignatures, as text.
async fn with_cosignatures(
    log: &DomainLog,
    head: &SignedHead,
) -> Result<String, TransparencyError> {
    let cosignatures = log.cosignatures(head).await?;
    head_with_cosignatures_text(head, &cosignatures)
}

async fn head(State(s): State<LogState>, Path(domain): Path<String>) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    let result = match log.head(unix_now()).await {
        Ok(h) => {
            s.served(&domain, h.head.epoch);
            with_cosignatures(log, &h).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(body) => text(StatusCode::OK, body),
        Err(e) => failed(&domain, &e),
    }
}

async fn head_at(
    State(s): State<LogState>,
    Path((domain, epoch)): Path<(String, String)>,
    client: Option<Extension<ClientKey>>,
) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    let Ok(epoch) = epoch.parse::<u64>() else {
        return text(
            StatusCode::BAD_REQUEST,
            "the epoch must be a number\n".into(),
        );
    };
    // A stored head is read; an epoch without one may get one signed late, which builds an
    // append-only proof on the directory's thread: an expensive request, under the turns'
    // bound (one client asking for many such epochs holds its share, not the thread). An
    // epoch after the newest head served here is not one: it was a turn (red team: a few
    // clients asking for epochs to come held the turns audits wait for), now 404 at once.
    let _turn = match log.stored_heads(epoch, epoch).await {
        Ok(stored) if !stored.is_empty() => None,
        Ok(_) if s.after_newest(&domain, epoch) => None,
        Ok(_) => match s.heavy_turn(None, client.as_ref().map(|c| &c.0)).await {
            Ok(t) => Some(t),
            Err(r) => return r,
        },
        Err(e) => return failed(&domain, &e),
    };
    let result = match log.head_at(epoch, unix_now()).await {
        Ok(Some(h)) => with_cosignatures(log, &h).await.map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match result {
        Ok(Some(body)) => text(StatusCode::OK, body),
        Ok(None) => not_found("no head is stored for this epoch"),
        // A head whose proof is over what kst builds for one, refused before it was built.
        Err(TransparencyError::Range(m)) => {
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n"))
        }
        Err(e) => failed(&domain, &e),
    }
}

/// The number of the query parameter `name` (the last one, if repeated).
fn query_number(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .rfind(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn audit(
    State(s): State<LogState>,
    Path(domain): Path<String>,
    RawQuery(query): RawQuery,
    client: Option<Extension<ClientKey>>,
) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    let query = query.as_deref();
    let (Some(from), Some(to)) = (query_number(query, "from"), query_number(query, "to")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "want ?from=A&to=B, two epochs\n".into(),
        );
    };
    if from > to || to - from >= MAX_AUDIT_EPOCHS {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "from must not be after to, and one answer spans at most {MAX_AUDIT_EPOCHS} \
                 epochs: ask for shorter ranges\n"
            ),
        );
    }
    let latest = match log.head(unix_now()).await {
        Ok(h) => h.head.epoch,
        Err(e) => return failed(&domain, &e),
    };
    if to > latest {
        return not_found(&format!("the latest epoch is {latest}"));
    }
    let turn = match s.heavy_turn(None, client.as_ref().map(|c| &c.0)).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    // The turn stays with the answer's check until it ends (`self_check::holding`).
    let answer = self_check::holding(Arc::new(turn), log.audit_answer(from, to)).await;
    match answer.and_then(|a| a.to_text()) {
        Ok(body) => text(StatusCode::OK, body),
        // A proof over what a witness accepts, refused before it was built.
        Err(TransparencyError::Range(m)) => {
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n"))
        }
        Err(e) => failed(&domain, &e),
    }
}

async fn cosignature(
    State(s): State<LogState>,
    Path(domain): Path<String>,
    body: Bytes,
) -> Response {
    let Some(log) = s.logs.get(&domain) else {
        return not_found("no key directory for this domain");
    };
    let parsed = std::str::from_utf8(&body)
        .map_err(|_| TransparencyError::Malformed("not UTF-8".into()))
        .and_then(parse_head_with_cosignatures);
    let (head, cosignature) = match parsed {
        Ok((head, mut c)) if c.len() == 1 => (head, c.remove(0)),
        Ok(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "want the head text with exactly one cosignature line\n".into(),
            );
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Some((name, _)) = s.witnesses.iter().find(|(_, k)| *k == cosignature.witness) else {
        return text(
            StatusCode::FORBIDDEN,
            "this witness is not in the log's [transparency] witnesses\n".into(),
        );
    };
    if head.head.domain != domain {
        return text(
            StatusCode::BAD_REQUEST,
            "the head is of another domain\n".into(),
        );
    }
    let stored = match log.head_at(head.head.epoch, unix_now()).await {
        Ok(h) => h,
        Err(e) => return failed(&domain, &e),
    };
    if stored.as_ref() != Some(&head) {
        tracing::warn!(domain, witness = %name, epoch = head.head.epoch, "a witness cosigned a head this log did not store for that epoch");
        return text(
            StatusCode::CONFLICT,
            "the head is not the one this log stored for its epoch\n".into(),
        );
    }
    match log.add_cosignature(head.head.epoch, &cosignature).await {
        Ok(()) => {
            tracing::info!(domain, witness = %name, epoch = head.head.epoch, "cosignature stored");
            (
                StatusCode::NO_CONTENT,
                [(header::CACHE_CONTROL, "no-store")],
            )
                .into_response()
        }
        Err(e @ (TransparencyError::Signature(_) | TransparencyError::Verification(_))) => {
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        // A replay of an older cosignature: the newer one stays.
        Err(e @ TransparencyError::Stale(_)) => {
            tracing::warn!(domain, witness = %name, epoch = head.head.epoch, error = %e, "an older cosignature was handed in; dropped");
            text(StatusCode::CONFLICT, format!("{e}\n"))
        }
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
/// `since=<epoch>` of a query string (`None` without it) and whether it asks for `steps=1`;
/// `Err` for anything else.
fn since(query: Option<&str>) -> Result<(Option<u64>, bool), Response> {
    let bad = || {
        text(
            StatusCode::BAD_REQUEST,
            "the query may hold since=<epoch> (a number), steps=1 and witnessed=1, nothing else\n"
                .into(),
        )
    };
    let (mut since, mut steps) = (None, false);
    for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("since", v)) if since.is_none() => match v.parse::<u64>() {
                Ok(epoch) => since = Some(epoch),
                Err(_) => return Err(bad()),
            },
            Some(("steps", "1")) => steps = true,
            Some(("witnessed", "1")) => {}
            _ => return Err(bad()),
        }
    }
    Ok((since, steps))
}

async fn lookup(
    State(s): State<LogState>,
    Path((domain, address)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    room: Option<Extension<MissRoom>>,
    client: Option<Extension<ClientKey>>,
) -> Response {
    let (log, address) = match log_and_address(&s, &domain, &address) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let (since, steps) = match since(query.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let witnessed = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv == "witnessed=1"));
    let turn: self_check::Held = if since.is_some() || witnessed {
        match s
            .heavy_turn(room.as_ref().map(|r| &r.0), client.as_ref().map(|c| &c.0))
            .await
        {
            Ok(t) => Arc::new(t),
            Err(r) => return r,
        }
    } else {
        Arc::new(())
    };
    let budget = steps.then_some(HTTP_STEP_BUDGET);
    // The turn stays with the answer's append-only checks until they end
    // (`self_check::holding`), also when the client goes away first.
    let answered = self_check::holding(turn, async {
        let mut answer = match log
            .answer_stepped(&address, since, budget, unix_now())
            .await
        {
            Ok(a) => a,
            Err(TransparencyError::Range(m)) => {
                return Err(text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n")));
            }
            Err(e) => return Err(failed(&domain, &e)),
        };
        if witnessed {
            let keys: Vec<[u8; 32]> = s.witnesses.iter().map(|(_, k)| *k).collect();
            match log.witnessed(&answer.head, &keys).await {
                Ok(w) => answer.witnessed = w,
                Err(e) => return Err(failed(&domain, &e)),
            }
        }
        Ok(answer)
    })
    .await;
    let answer = match answered {
        Ok(a) => a,
        Err(r) => return r,
    };
    // An absence proof, or a deletion entry: no key either way.
    let found_nothing = answer.finds_no_key();
    match answer.to_text() {
        Ok(body) => {
            let mut r = text(StatusCode::OK, body);
            if found_nothing {
                // A look-up that found nothing, for [web.limits]' miss counters.
                r.extensions_mut().insert(FoundNothing);
            }
            r
        }
        Err(TransparencyError::Range(m)) => {
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{m}\n"))
        }
        Err(e) => failed(&domain, &e),
    }
}

async fn history(
    State(s): State<LogState>,
    Path((domain, address)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    room: Option<Extension<MissRoom>>,
    client: Option<Extension<ClientKey>>,
) -> Response {
    let (log, address) = match log_and_address(&s, &domain, &address) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let _turn = match s
        .heavy_turn(room.as_ref().map(|r| &r.0), client.as_ref().map(|c| &c.0))
        .await
    {
        Ok(t) => t,
        Err(r) => return r,
    };
    match query.as_deref().filter(|q| !q.is_empty()) {
        None => {}
        Some(q) => {
            return match q
                .strip_prefix("before=")
                .and_then(|v| v.parse::<u64>().ok())
            {
                Some(before) if before >= 2 => history_page(&log, &domain, &address, before).await,
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "the query may hold before=<version> (a number from 2), nothing else\n".into(),
                ),
            };
        }
    }
    match log.history(&address, unix_now()).await {
        Ok(Some(h)) => match h.to_text() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                if h.finds_no_key() {
                    // The history of a deleted address: a miss, like its look-up.
                    r.extensions_mut().insert(FoundNothing);
                }
                r
            }
            Err(e) => failed(&domain, &e),
        },
        Ok(None) => not_found("the directory holds no version of this address"),
        Err(e) => failed(&domain, &e),
    }
}

/// `.../history/<address>?before=<version>`: the page of older versions.
async fn history_page(
    log: &DomainLog,
    domain: &str,
    address: &kst_core::Address,
    before: u64,
) -> Response {
    match log.history_page(address, before, unix_now()).await {
        Ok(Some(answer)) => match answer.page.to_text() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                if answer.finds_no_key() {
                    // A page of a deleted address: a miss, like its look-up and its newest
                    // history (the page's older versions still name the keys it had).
                    r.extensions_mut().insert(FoundNothing);
                }
                r
            }
            Err(e) => failed(domain, &e),
        },
        Ok(None) => not_found("the directory holds no version of this address below that one"),
        Err(e) => failed(domain, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's share holds [`MAX_HEAVY_PER_CLIENT`] places, another client's is its own,
    /// and the entry goes with the client's last request, also one that gave up waiting (the
    /// map never grows with clients that came and went).
    #[tokio::test]
    async fn a_clients_share_is_bounded_and_forgotten_with_its_last_request() {
        let shares = Arc::new(Shares::default());
        let (one, other): (Arc<str>, Arc<str>) = ("192.0.2.1".into(), "192.0.2.2".into());
        let mut held: Vec<Share> = (0..MAX_HEAVY_PER_CLIENT).map(|_| shares.of(&one)).collect();
        assert!(held.iter_mut().all(Share::try_take));
        let mut past = shares.of(&one);
        assert!(!past.try_take(), "the share is full");
        let mut theirs = shares.of(&other);
        assert!(theirs.try_take(), "another client's share is its own");
        // One that waits and gives up.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), past.take())
                .await
                .is_err()
        );
        drop(past);
        drop(theirs);
        assert_eq!(
            shares.0.lock().unwrap().len(),
            1,
            "the other client is forgotten"
        );
        // A place given back is taken by the next request.
        held.pop();
        let mut next = shares.of(&one);
        assert!(next.try_take());
        drop(next);
        drop(held);
        assert!(
            shares.0.lock().unwrap().is_empty(),
            "every client is forgotten"
        );
    }
}
