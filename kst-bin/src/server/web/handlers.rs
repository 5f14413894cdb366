//! The routes of the public listener: WKD (both methods), VKS and HKP, and the layer that
//! limits, measures and logs every request.

use sha2::Digest as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kst_core::AddressPolicy;
use kst_core::certificate::{Certificate, Outline, hkp_index, merge_all};
use kst_core::wkd::{PolicyFlags, Resource, WkdHash, WkdRequest, submission_address_text};
use kst_core::{Address, KeyRecord};

use super::client::{
    ClientKey, LogPseudonym, UNKNOWN_CLIENT, client_ip, client_key, client_network,
};
use super::config::TrustedProxies;
use super::limits::{FoundNothing, Limiter};
use super::lookup::{KeyLookup, MAX_MATCHES};
use super::metrics;
use crate::shared::logging::{LogEvery, error_class};

/// How often each warning of a fault that every request meets (the counters or the store
/// down) is written at most: one line per interval and class of error ([`error_class`]: the
/// coalescer's queue full, which a client's flood causes, leaves out no line of the counters'
/// backend failing) with the count of those left out, not one per request (a flood while the
/// store is down would be a flood of log lines).
pub const WARN_EVERY: Duration = Duration::from_secs(10);
static COUNTERS_DOWN: LogEvery = LogEvery::new(WARN_EVERY);
static MISS_UNCOUNTED: LogEvery = LogEvery::new(WARN_EVERY);
static STORE_FAILED: LogEvery = LogEvery::new(WARN_EVERY);

/// Everything the handlers share.
#[derive(Clone)]
pub struct WebState {
    /// The store's look-ups.
    pub lookup: Arc<dyn KeyLookup>,
    /// Served domains, normalized (IDNA A-labels).
    pub domains: Arc<Vec<String>>,
    /// How addresses are folded (the same policy the mail side uses).
    pub address_policy: AddressPolicy,
    /// The WKD policy flags.
    pub policy_flags: PolicyFlags,
    /// The submission address per domain (`keys@<domain>` unless configured otherwise).
    pub submission_local_part: String,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// Request and miss limits.
    pub limiter: Limiter,
    /// Pseudonyms of client addresses for logs.
    pub pseudonym: LogPseudonym,
    /// `Cache-Control: max-age` of positive answers, seconds.
    pub cache_max_age_secs: u64,
    /// The policy directory's `kst-log` file per domain with a key directory (issue 18): the
    /// public record of its keys ([`kst_core::wkd::Resource::LogKeys`]); empty without
    /// `[transparency]`.
    pub log_keys: Arc<std::collections::HashMap<String, String>>,
}

/// The peer of a connection (the listener's connect info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Which endpoint a request hit, for limits, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// WKD `hu/<hash>`, advanced method.
    WkdAdvanced,
    /// WKD `hu/<hash>`, direct method.
    WkdDirect,
    /// WKD `policy` or `submission-address`.
    WkdPolicy,
    /// VKS `by-email`.
    VksEmail,
    /// VKS `by-fingerprint`.
    VksFingerprint,
    /// VKS `by-keyid`.
    VksKeyId,
    /// HKP `op=get`.
    HkpGet,
    /// HKP `op=index`.
    HkpIndex,
    /// The key directory's routes (`/.well-known/kst/log/`, feature `transparency`) that
    /// name no address: keys, heads, audits, cosignatures.
    Log,
    /// The key directory's look-ups of an address (`.../lookup/`, `.../history/`).
    LogLookup,
    /// Anything else.
    Other,
}

impl Endpoint {
    /// Every endpoint, in the order of their declaration.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::WkdAdvanced,
        Endpoint::WkdDirect,
        Endpoint::WkdPolicy,
        Endpoint::VksEmail,
        Endpoint::VksFingerprint,
        Endpoint::VksKeyId,
        Endpoint::HkpGet,
        Endpoint::HkpIndex,
        Endpoint::Log,
        Endpoint::LogLookup,
        Endpoint::Other,
    ];

    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::WkdAdvanced => "wkd-advanced",
            Endpoint::WkdDirect => "wkd-direct",
            Endpoint::WkdPolicy => "wkd-policy",
            Endpoint::VksEmail => "vks-by-email",
            Endpoint::VksFingerprint => "vks-by-fingerprint",
            Endpoint::VksKeyId => "vks-by-keyid",
            Endpoint::HkpGet => "hkp-get",
            Endpoint::HkpIndex => "hkp-index",
            Endpoint::Log => "kst-log",
            Endpoint::LogLookup => "kst-log-lookup",
            Endpoint::Other => "other",
        }
    }

    /// True for endpoints that look a key up (and so count misses). The key directory
    /// answers every address, an unknown one with an absence proof: that answer is a miss
    /// too ([`FoundNothing`]), or the log would be a dictionary oracle WKD is not.
    pub fn is_lookup(self) -> bool {
        !matches!(self, Endpoint::WkdPolicy | Endpoint::Log | Endpoint::Other)
    }

    /// Classifies a request from its path and query, before any handler runs, as the handler
    /// will see it: the path percent-decoded as axum decodes path parameters (each `/`-segment
    /// on its own, a wildcard's segments joined, so `hu%2F<hash>` is `hu/<hash>`), the query
    /// as [`query_param`] decodes it. Classifying the raw text let `%68u/<hash>` or
    /// `op=%67et` reach a look-up as [`Endpoint::Other`], whose misses were not counted. A
    /// spelling the router does not match (`by%2Demail`) is classified like the plain one: its
    /// 404 then counts as a miss, which costs only the client that wrote it.
    fn classify(path: &str, query: Option<&str>) -> Endpoint {
        if !path.contains('%') {
            // Nothing to decode (every request of an ordinary client): the path's own
            // segments, without copying them.
            let segments: Vec<&str> = path.split('/').collect();
            return Endpoint::classify_decoded(path, &segments, query);
        }
        let owned: Vec<String> = path.split('/').map(percent_decode_segment).collect();
        let segments: Vec<&str> = owned.iter().map(String::as_str).collect();
        Endpoint::classify_decoded(&owned.join("/"), &segments, query)
    }

    /// [`Endpoint::classify`] of the decoded path `decoded`, whose segments (split before
    /// decoding, each decoded on its own) are `segments`.
    fn classify_decoded(decoded: &str, segments: &[&str], query: Option<&str>) -> Endpoint {
        if let Some(rest) = decoded.strip_prefix(kst_core::wkd::WELL_KNOWN) {
            let n = rest.split('/').filter(|s| !s.is_empty()).count();
            return if rest.ends_with("/policy")
                || rest.ends_with("/submission-address")
                || rest
                    .strip_suffix(kst_core::wkd::LOG_KEYS_FILE)
                    .is_some_and(|r| r.ends_with('/'))
            {
                Endpoint::WkdPolicy
            } else if rest.contains("/hu/") && n == 3 {
                Endpoint::WkdAdvanced
            } else if rest.contains("/hu/") {
                Endpoint::WkdDirect
            } else {
                Endpoint::Other
            };
        }
        // The other routes take one segment per parameter: segment by segment, so that an
        // escaped `/` inside a parameter (a domain, an address) moves nothing.
        Endpoint::classify_segments(segments, query)
    }

    /// The routes outside WKD by the path's segments.
    fn classify_segments(segments: &[&str], query: Option<&str>) -> Endpoint {
        match segments {
            // /.well-known/kst/log/<domain>/<route>/...
            ["", ".well-known", "kst", "log", _, route, ..] => match *route {
                "lookup" | "history" => Endpoint::LogLookup,
                _ => Endpoint::Log,
            },
            ["", ".well-known", "kst", "log", ..] => Endpoint::Log,
            ["", "vks", "v1", kind, ..] => match *kind {
                "by-email" => Endpoint::VksEmail,
                "by-fingerprint" => Endpoint::VksFingerprint,
                "by-keyid" => Endpoint::VksKeyId,
                _ => Endpoint::Other,
            },
            ["", "pks", "lookup"] => {
                // The operation [`hkp_lookup`] reads: the first `op`, decoded.
                let op = query.and_then(|q| query_param(q, "op")).unwrap_or_default();
                match op.as_str() {
                    "get" => Endpoint::HkpGet,
                    "index" | "vindex" => Endpoint::HkpIndex,
                    _ => Endpoint::Other,
                }
            }
            _ => Endpoint::Other,
        }
    }
}

/// One path segment percent-decoded as axum decodes a path parameter: every `%XX` escape
/// (`+` stays `+`), an escape that is not two hex digits left as it is, bytes that are not
/// UTF-8 replaced (axum refuses such a parameter before any handler runs).
fn percent_decode_segment(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The router: WKD under `/.well-known/openpgpkey/`, VKS under `/vks/v1/`, HKP at
/// `/pks/lookup`; GET and HEAD only; everything else 404 (no listings). Every response carries
/// `Access-Control-Allow-Origin: *`.
pub fn router(state: WebState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] with `extra` routes (the key directory's) next to them, under the same guard:
/// limits, metrics and logs cover them too.
pub fn router_with(state: WebState, extra: Router) -> Router {
    let guarded = Guard::of(&state);
    Router::new()
        .route("/.well-known/openpgpkey/{*rest}", get(wkd))
        .route("/vks/v1/by-email/{address}", get(vks_by_email))
        .route("/vks/v1/by-fingerprint/{fpr}", get(vks_by_fingerprint))
        .route("/vks/v1/by-keyid/{keyid}", get(vks_by_keyid))
        .route("/pks/lookup", get(hkp_lookup))
        .fallback(not_found)
        // Shared, not cloned per request (its fields hold vectors and strings).
        .with_state(Arc::new(state))
        .merge(extra)
        .layer(middleware::from_fn_with_state(Arc::new(guarded), guard))
}

/// What the guard needs: who the client is, the limits, log pseudonyms.
#[derive(Clone)]
pub struct Guard {
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// Request and miss limits.
    pub limiter: Limiter,
    /// Pseudonyms of client addresses for logs.
    pub pseudonym: LogPseudonym,
}

impl Guard {
    /// The guard of the public listener's state.
    pub fn of(state: &WebState) -> Guard {
        Guard {
            trusted_proxies: state.trusted_proxies.clone(),
            limiter: state.limiter.clone(),
            pseudonym: state.pseudonym.clone(),
        }
    }
}

/// `extra` routes (the key directory's) as served on the operations listener `[http]` when
/// `[web]` is off: under `guard` (`[web.limits]`, clients named as `[web] trusted_proxies`
/// says), as on `[web]`. The listener must provide [`PeerAddr`] as connect info.
pub fn ops_routes(extra: Router, guard_with: Guard) -> Router {
    extra.layer(middleware::from_fn_with_state(Arc::new(guard_with), guard))
}

/// Limits, measures and logs every request; counts misses (a 404, or an answer marked
/// [`FoundNothing`]). The request is handled as its client's
/// ([`super::batcher::for_client`]): what it queues for the store and the counters counts
/// against that client's share of their queues, and its network's (an IPv6 /48).
async fn guard(
    State(state): State<Arc<Guard>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer.ip(), request.headers(), &state.trusted_proxies);
    let client = ip.map_or_else(|| UNKNOWN_CLIENT.to_string(), client_key);
    let network = ip.and_then(client_network);
    let handled = guarded(state, client.clone(), request, next);
    super::batcher::for_client(&client, network.as_deref(), handled).await
}

/// [`guard`] for the request of `client`.
async fn guarded(state: Arc<Guard>, client: String, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = Endpoint::classify(request.uri().path(), request.uri().query());
    let method = request.method().clone();
    let mut response = match state.limiter.admit(&client, endpoint.is_lookup()).await {
        Ok(Err(refusal)) => {
            metrics::refused(refusal);
            too_many(state.limiter.retry_after())
        }
        Err(e) => {
            if let Some(suppressed) = COUNTERS_DOWN.check_class(&error_class(&e)) {
                tracing::warn!(error = %e, suppressed, "web: the rate limiter cannot be reached");
            }
            unavailable()
        }
        Ok(Ok(admitted)) => {
            // `admitted` holds room for a look-up's miss until here: a miss is counted even
            // when the counters' queue is full (`coalesce`); otherwise it is given back. The
            // handler may give it back while it waits for a turn (`MissRoom`).
            if let Some(room) = admitted.miss_room() {
                request.extensions_mut().insert(room);
            }
            request
                .extensions_mut()
                .insert(ClientKey(client.as_str().into()));
            let response = next.run(request).await;
            if (response.status() == StatusCode::NOT_FOUND
                || response.extensions().get::<FoundNothing>().is_some())
                && endpoint.is_lookup()
                && let Err(e) = state.limiter.miss(&client, admitted).await
                && let Some(suppressed) = MISS_UNCOUNTED.check_class(&error_class(&e))
            {
                tracing::warn!(error = %e, suppressed, "web: a miss could not be counted");
            }
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    let elapsed = started.elapsed();
    let status = response.status();
    metrics::request(endpoint, status.as_u16(), elapsed);
    tracing::info!(
        target: "kst::web",
        method = %method,
        endpoint = endpoint.as_str(),
        status = status.as_u16(),
        micros = elapsed.as_micros() as u64,
        client = %state.pseudonym.of(&client),
        "request"
    );
    response
}

fn too_many(retry_after: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::RETRY_AFTER, retry_after.to_string()),
            (header::CACHE_CONTROL, "no-store".into()),
        ],
        "Too many requests; try again later.\n",
    )
        .into_response()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::RETRY_AFTER, "30".to_string()),
            (header::CACHE_CONTROL, "no-store".into()),
        ],
        "The key store is not available; try again later.\n",
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CACHE_CONTROL, "no-store")],
        "Not found.\n",
    )
        .into_response()
}

fn bad_request(why: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        format!("{why}\n"),
    )
        .into_response()
}

/// A positive answer with ETag and Cache-Control; `304` when `If-None-Match` matches.
fn found(
    state: &WebState,
    headers: &HeaderMap,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response {
    let digest = sha2::Sha256::digest(&body);
    let etag = format!("\"{}\"", hex::encode(&digest[..16]));
    let cache = format!("public, max-age={}", state.cache_max_age_secs);
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        });
    if matches {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        Body::from(body),
    )
        .into_response()
}

fn store_failed(state: &WebState, e: &kst_core::Error) -> Response {
    if let Some(suppressed) = STORE_FAILED.check_class(&error_class(e)) {
        tracing::warn!(
            store = state.lookup.name(),
            error = %e,
            suppressed,
            "web: store look-up failed"
        );
    }
    unavailable()
}

/// Parses a stored record, logging (not serving) one that cannot be read.
fn certificate(record: &KeyRecord) -> Option<Certificate> {
    match Certificate::from_binary(&record.key) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(
                fingerprint = %record.fingerprint,
                version = record.version,
                error = %e,
                "web: a stored key cannot be parsed; not served"
            );
            None
        }
    }
}

async fn wkd(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let path = format!("{}/{rest}", kst_core::wkd::WELL_KNOWN);
    let Ok(req) = WkdRequest::parse(&path, host, &state.address_policy) else {
        return not_found().await;
    };
    if !state.domains.contains(&req.domain) {
        return not_found().await;
    }
    match req.resource {
        Resource::Policy => found(
            &state,
            &headers,
            "text/plain; charset=utf-8",
            state.policy_flags.to_text(&req.domain).into_bytes(),
        ),
        Resource::LogKeys => match state.log_keys.get(&req.domain) {
            Some(record) => found(
                &state,
                &headers,
                "text/plain; charset=utf-8",
                record.clone().into_bytes(),
            ),
            None => not_found().await,
        },
        Resource::SubmissionAddress => {
            match state
                .address_policy
                .normalize(&format!("{}@{}", state.submission_local_part, req.domain))
            {
                Ok(a) => found(
                    &state,
                    &headers,
                    "text/plain; charset=utf-8",
                    submission_address_text(&a).into_bytes(),
                ),
                Err(_) => not_found().await,
            }
        }
        Resource::Key(hash) => {
            let hint = query.as_deref().and_then(|q| query_param(q, "l"));
            let record = match wkd_record(&state, &req.domain, &hash, hint.as_deref()).await {
                Ok(r) => r,
                Err(e) => return store_failed(&state, &e),
            };
            let Some(record) = record else {
                return not_found().await;
            };
            // Nothing to filter out (read from the packet headers, see `Outline`): the stored
            // packets as they are, without parsing them.
            if Outline::of(&record.key)
                .is_some_and(|o| o.is_only_address(&record.address, &state.address_policy))
            {
                return found(&state, &headers, "application/octet-stream", record.key);
            }
            let Some(cert) = certificate(&record) else {
                return not_found().await;
            };
            match cert.only_address(&record.address, &state.address_policy) {
                Some(c) => found(&state, &headers, "application/octet-stream", c.to_binary()),
                None => not_found().await,
            }
        }
    }
}

/// The record a WKD hash names: by the `l=` hint when it hashes to `hash` after normalization,
/// else by the store's hash look-up. A record whose address does not hash to `hash` is never
/// returned.
async fn wkd_record(
    state: &WebState,
    domain: &str,
    hash: &WkdHash,
    hint: Option<&str>,
) -> kst_core::Result<Option<KeyRecord>> {
    if let Some(local) = hint
        && local.len() <= kst_core::address::MAX_LOCAL_LEN * 4
        && let Ok(address) = state.address_policy.normalize(&format!("{local}@{domain}"))
        && address.domain() == domain
        && WkdHash::of_address(&address) == *hash
        && let Some(record) = state.lookup.by_address(&address).await?
    {
        return Ok(Some(record));
    }
    let record = state.lookup.by_wkd_hash(domain, hash).await?;
    Ok(record.filter(|r| r.address.domain() == domain && WkdHash::of_address(&r.address) == *hash))
}

/// A normalized address of a served domain, or `None`.
fn served_address(state: &WebState, text: &str) -> Option<Address> {
    let a = state.address_policy.normalize(text).ok()?;
    state.domains.iter().any(|d| d == a.domain()).then_some(a)
}

async fn vks_by_email(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(address): Path<String>,
) -> Response {
    let Some(address) = served_address(&state, &address) else {
        return not_found().await;
    };
    match state.lookup.by_address(&address).await {
        // The stored packets as they are when their headers frame one public certificate
        // (see `Outline`): what the certificate would serialize to. Anything else is parsed
        // and only the certificate rPGP read is served, re-serialized: the parser skips
        // packets it does not expect (a secret key after the certificate), so the stored
        // bytes of a record that parses may still hold them. Refused when unreadable.
        Ok(Some(record)) if Outline::of(&record.key).is_some() => {
            armored_packets(&state, &headers, &record.key)
        }
        Ok(Some(record)) => match certificate(&record) {
            Some(cert) => armored(&state, &headers, &[cert]),
            None => not_found().await,
        },
        Ok(None) => not_found().await,
        Err(e) => store_failed(&state, &e),
    }
}

fn armored(state: &WebState, headers: &HeaderMap, certs: &[Certificate]) -> Response {
    let mut binary = Vec::new();
    for c in certs {
        binary.extend_from_slice(&c.to_binary());
    }
    armored_packets(state, headers, &binary)
}

/// `packets` (binary certificates) ASCII-armored, as VKS and HKP serve them.
fn armored_packets(state: &WebState, headers: &HeaderMap, packets: &[u8]) -> Response {
    found(
        state,
        headers,
        "application/pgp-keys",
        kst_core::openpgp::armor_public_key(packets).into_bytes(),
    )
}

/// What a key search names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Search {
    Fingerprint(String),
    KeyId(String),
    Address(Address),
}

/// Parses a fingerprint (40 or 64 hex digits) or key ID (16), with or without `0x`, any case.
/// Short (8-digit) key IDs are refused: they collide by design.
fn parse_key_handle(s: &str) -> Option<Search> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let upper = hex.to_ascii_uppercase();
    match hex.len() {
        40 | 64 => Some(Search::Fingerprint(upper)),
        16 => Some(Search::KeyId(upper)),
        _ => None,
    }
}

/// The records a fingerprint, key ID or address search finds (at most [`MAX_MATCHES`]).
async fn find_records(state: &WebState, search: &Search) -> kst_core::Result<Vec<KeyRecord>> {
    let mut records = match search {
        Search::Fingerprint(f) => state.lookup.by_fingerprint(f).await?,
        Search::KeyId(k) => state.lookup.by_key_id(k).await?,
        Search::Address(a) => state.lookup.by_address(a).await?.into_iter().collect(),
    };
    records.truncate(MAX_MATCHES);
    Ok(records)
}

/// The certificates of `records` (a search's), merged per primary key. A fingerprint that is
/// some certificate's primary fingerprint finds only that certificate.
fn certificates_of(records: &[KeyRecord], search: &Search) -> Vec<Certificate> {
    let mut certs: Vec<Certificate> = records.iter().filter_map(certificate).collect();
    if let Search::Fingerprint(f) = search
        && certs.iter().any(|c| c.fingerprint() == *f)
    {
        certs.retain(|c| c.fingerprint() == *f);
    }
    merge_all(certs)
}

/// The search's certificates armored: the stored packets as they are when the search found
/// one record framed as one public certificate (see `Outline`: what parsing, merging and
/// serializing it would give), else [`certificates_of`]; 404 when there are none.
async fn armored_found(
    state: &WebState,
    headers: &HeaderMap,
    records: &[KeyRecord],
    search: &Search,
) -> Response {
    if let [record] = records
        && Outline::of(&record.key).is_some()
    {
        return armored_packets(state, headers, &record.key);
    }
    let certs = certificates_of(records, search);
    if certs.is_empty() {
        return not_found().await;
    }
    armored(state, headers, &certs)
}

async fn vks_handle(
    state: Arc<WebState>,
    headers: HeaderMap,
    text: &str,
    want_fpr: bool,
) -> Response {
    let search = match parse_key_handle(text) {
        Some(s @ Search::Fingerprint(_)) if want_fpr => s,
        Some(s @ Search::KeyId(_)) if !want_fpr => s,
        _ if want_fpr => return bad_request("Not a fingerprint: expected 40 or 64 hex digits."),
        _ => return bad_request("Not a key ID: expected 16 hex digits."),
    };
    match find_records(&state, &search).await {
        Ok(records) => armored_found(&state, &headers, &records, &search).await,
        Err(e) => store_failed(&state, &e),
    }
}

async fn vks_by_fingerprint(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(fpr): Path<String>,
) -> Response {
    vks_handle(state, headers, &fpr, true).await
}

async fn vks_by_keyid(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Path(keyid): Path<String>,
) -> Response {
    vks_handle(state, headers, &keyid, false).await
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space). `None` when
/// absent or not UTF-8 after decoding.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

async fn hkp_lookup(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    let op = query_param(&query, "op").unwrap_or_default();
    let op = op.as_str();
    if !matches!(op, "get" | "index" | "vindex") {
        return (
            StatusCode::NOT_IMPLEMENTED,
            [(header::CACHE_CONTROL, "no-store")],
            "Only op=get and op=index are served.\n",
        )
            .into_response();
    }
    let search = query_param(&query, "search");
    let Some(text) = search.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return bad_request("search= is missing.");
    };
    let search = match parse_key_handle(text) {
        Some(s) => s,
        None => match served_address(&state, text).or_else(|| {
            // "Alice <alice@example.net>": the address inside the brackets.
            kst_core::certificate::user_id_address(text.as_bytes(), &state.address_policy)
                .filter(|a| state.domains.iter().any(|d| d == a.domain()))
        }) {
            Some(a) => Search::Address(a),
            None => return not_found().await,
        },
    };
    let records = match find_records(&state, &search).await {
        Ok(r) => r,
        Err(e) => return store_failed(&state, &e),
    };
    if op == "get" {
        armored_found(&state, &headers, &records, &search).await
    } else {
        let certs = certificates_of(&records, &search);
        if certs.is_empty() {
            return not_found().await;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        found(
            &state,
            &headers,
            "text/plain; charset=utf-8",
            hkp_index(&certs, now).into_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_classified_before_routing() {
        let c = |p: &str, q: Option<&str>| Endpoint::classify(p, q);
        assert_eq!(
            c("/.well-known/openpgpkey/example.net/hu/abc", None),
            Endpoint::WkdAdvanced
        );
        assert_eq!(
            c("/.well-known/openpgpkey/hu/abc", None),
            Endpoint::WkdDirect
        );
        assert_eq!(
            c("/.well-known/openpgpkey/policy", None),
            Endpoint::WkdPolicy
        );
        assert_eq!(
            c(
                "/.well-known/openpgpkey/example.net/submission-address",
                None
            ),
            Endpoint::WkdPolicy
        );
        assert_eq!(c("/.well-known/openpgpkey/", None), Endpoint::Other);
        assert_eq!(c("/vks/v1/by-email/a@b", None), Endpoint::VksEmail);
        assert_eq!(
            c("/vks/v1/by-fingerprint/AB", None),
            Endpoint::VksFingerprint
        );
        assert_eq!(c("/vks/v1/by-keyid/AB", None), Endpoint::VksKeyId);
        assert_eq!(c("/pks/lookup", Some("search=x&op=get")), Endpoint::HkpGet);
        assert_eq!(
            c("/pks/lookup", Some("op=index&options=mr")),
            Endpoint::HkpIndex
        );
        assert_eq!(c("/pks/lookup", Some("op=stats")), Endpoint::Other);
        assert_eq!(c("/", None), Endpoint::Other);
    }

    #[test]
    fn escaped_spellings_are_classified_as_the_handler_sees_them() {
        let c = |p: &str, q: Option<&str>| Endpoint::classify(p, q);
        let hash = "kei1q4tipxxu1yj79k9kfukdhfy631xe";
        for path in [
            format!("/.well-known/openpgpkey/%68u/{hash}"),
            format!("/.well-known/openpgpkey/hu%2F{hash}"),
            format!("/.well-known/openpgpkey/hu%2f{hash}"),
            format!("/%2Ewell-known/openpgpkey/hu/{hash}"),
        ] {
            assert_eq!(c(&path, None), Endpoint::WkdDirect, "{path}");
        }
        for path in [
            format!("/.well-known/openpgpkey/example.net/%68u/{hash}"),
            format!("/.well-known/openpgpkey/example%2Enet%2Fhu%2F{hash}"),
        ] {
            assert_eq!(c(&path, None), Endpoint::WkdAdvanced, "{path}");
        }
        assert_eq!(
            c("/.well-known/openpgpkey/example.net/p%6Flicy", None),
            Endpoint::WkdPolicy
        );
        assert_eq!(c("/vks/v1/by%2Demail/a%40b", None), Endpoint::VksEmail);
        assert_eq!(c("/%76ks/v1/by-keyid/AB", None), Endpoint::VksKeyId);
        for q in [
            "op=%67et&search=x",
            "%6Fp=get&search=x",
            "%6fp=get&op=stats&search=x",
        ] {
            assert_eq!(c("/pks/lookup", Some(q)), Endpoint::HkpGet, "{q}");
        }
        assert_eq!(c("/pks/%6Cookup", Some("op=%69ndex")), Endpoint::HkpIndex);
        assert_eq!(c("/pks/lookup", Some("op=g%65t%")), Endpoint::Other);
        // An escaped `/` inside the log's domain parameter moves no segment.
        assert_eq!(
            c("/.well-known/kst/log/a%2Fb/lookup/c%40a", None),
            Endpoint::LogLookup
        );
        assert_eq!(
            c("/.well-known/kst/log/example.net/%6Cookup/c", None),
            Endpoint::LogLookup
        );
        assert_eq!(
            c("/.well-known/kst/log/example.net/head", None),
            Endpoint::Log
        );
    }

    #[test]
    fn path_segments_decode_as_axum_decodes_them() {
        assert_eq!(percent_decode_segment("a%40b+c"), "a@b+c");
        assert_eq!(percent_decode_segment("%zz%4"), "%zz%4");
        assert_eq!(percent_decode_segment("%+1x"), "%+1x");
        assert_eq!(percent_decode_segment("%ff"), "\u{FFFD}");
        assert_eq!(percent_decode_segment(""), "");
    }

    #[test]
    fn key_handles() {
        let f = "637895003B05333E2D3782F2EE62CCF91EB2D657";
        assert_eq!(parse_key_handle(f), Some(Search::Fingerprint(f.into())));
        assert_eq!(
            parse_key_handle(&format!("0x{}", f.to_lowercase())),
            Some(Search::Fingerprint(f.into()))
        );
        assert_eq!(
            parse_key_handle("0xEE62CCF91EB2D657"),
            Some(Search::KeyId("EE62CCF91EB2D657".into()))
        );
        assert_eq!(
            parse_key_handle("0x1EB2D657"),
            None,
            "short key IDs are refused"
        );
        assert_eq!(parse_key_handle("alice@example.net"), None);
        assert_eq!(parse_key_handle(""), None);
    }

    #[test]
    fn query_parameters() {
        let q = "op=index&options=mr&search=Alice+%3Calice%40example.net%3E&l=x";
        assert_eq!(query_param(q, "op").as_deref(), Some("index"));
        assert_eq!(
            query_param(q, "search").as_deref(),
            Some("Alice <alice@example.net>")
        );
        assert_eq!(query_param(q, "exact"), None);
        assert_eq!(query_param("search=%4", "search"), None, "truncated escape");
        assert_eq!(query_param("search=%ff", "search"), None, "not UTF-8");
        assert_eq!(query_param("flag&l=a", "flag").as_deref(), Some(""));
    }
}
