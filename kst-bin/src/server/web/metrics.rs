//! Prometheus metrics of the public listener (`kst_web_*`), recorded with the `metrics` crate.

use std::time::Duration;

use super::limits::Refusal;

/// Requests answered, by `endpoint` and `status`.
pub const REQUESTS_TOTAL: &str = "kst_web_requests_total";
/// Time from the request to the response, in seconds, by `endpoint`.
pub const REQUEST_DURATION: &str = "kst_web_request_duration_seconds";
/// Requests refused with 429, by `limit` (client-requests, client-misses, global-misses).
pub const REFUSED_TOTAL: &str = "kst_web_rate_limited_total";
/// Connections closed at once because `max_connections` were open.
pub const BUSY_TOTAL: &str = "kst_web_busy_total";
/// Requests answered 503 at once because too many counter hits were waiting for the shared
/// counters (slow or stalled; [`super::coalesce::MAX_QUEUED_HITS`]).
pub const COUNTERS_BUSY_TOTAL: &str = "kst_web_counters_busy_total";
/// TLS handshakes that failed or timed out.
pub const TLS_FAILURES_TOTAL: &str = "kst_web_tls_handshake_failures_total";
/// Certificate reloads, by `outcome` (loaded, failed).
pub const TLS_RELOADS_TOTAL: &str = "kst_web_tls_reloads_total";

/// Histogram buckets for [`REQUEST_DURATION`]: 50 µs to 1 s (`kst serve` sets them when it
/// installs the recorder).
pub const DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Records one answered request.
pub fn request(endpoint: &'static str, status: u16, duration: Duration) {
    ::metrics::counter!(REQUESTS_TOTAL, "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
    ::metrics::histogram!(REQUEST_DURATION, "endpoint" => endpoint).record(duration.as_secs_f64());
}

/// Records a 429.
pub fn refused(why: Refusal) {
    ::metrics::counter!(REFUSED_TOTAL, "limit" => why.as_str()).increment(1);
}

/// Records a connection turned away for lack of a slot.
pub fn busy() {
    ::metrics::counter!(BUSY_TOTAL).increment(1);
}

/// Records a request refused because the counters' queue was full.
pub fn counters_busy() {
    ::metrics::counter!(COUNTERS_BUSY_TOTAL).increment(1);
}

/// Records a failed TLS handshake.
pub fn tls_failure() {
    ::metrics::counter!(TLS_FAILURES_TOTAL).increment(1);
}

/// Records a certificate reload.
pub fn tls_reload(ok: bool) {
    let outcome = if ok { "loaded" } else { "failed" };
    ::metrics::counter!(TLS_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}
