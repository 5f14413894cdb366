//! Prometheus metrics of the public listener (`kst_web_*`), recorded with the `metrics` crate.

use std::sync::OnceLock;
use std::time::Duration;

use super::handlers::Endpoint;
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
/// Writes of the per-client request counts to the shared counters (one
/// `RateLimiter::hit_many` each, [`super::writebehind`]), by `outcome` (ok, failed).
pub const COUNTER_FLUSHES_TOTAL: &str = "kst_web_counter_flushes_total";
/// Request hits sent in those writes.
pub const COUNTER_FLUSHED_HITS_TOTAL: &str = "kst_web_counter_flushed_hits_total";
/// Look-ups by address answered 503 at once because too many were waiting for a read batch
/// (the store is slow or stalled; [`super::batch::MAX_QUEUED`]).
pub const LOOKUPS_BUSY_TOTAL: &str = "kst_web_lookups_busy_total";
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
pub fn request(endpoint: Endpoint, status: u16, duration: Duration) {
    if let Some(ready) = ready_handles() {
        ready.record(endpoint, status, duration);
        return;
    }
    record_by_labels(endpoint, status, duration);
}

/// [`request`] through the recorder's registry.
fn record_by_labels(endpoint: Endpoint, status: u16, duration: Duration) {
    let endpoint = endpoint.as_str();
    ::metrics::counter!(REQUESTS_TOTAL, "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
    ::metrics::histogram!(REQUEST_DURATION, "endpoint" => endpoint).record(duration.as_secs_f64());
}

/// The statuses the listener answers with, whose counters are kept once registered.
const STATUSES: [u16; 8] = [200, 304, 400, 404, 429, 500, 501, 503];

/// One endpoint's handles, each registered with the recorder when first used (so `/metrics`
/// shows the series that were counted, as before).
#[derive(Default)]
struct EndpointHandles {
    by_status: [OnceLock<::metrics::Counter>; STATUSES.len()],
    duration: OnceLock<::metrics::Histogram>,
}

/// Every endpoint's counter per status and duration histogram, kept once registered: a
/// request then increments a counter and records a duration, where the macros would build the
/// labels (the status formatted anew), hash them and look them up in the recorder's registry,
/// twice per request.
struct Handles(Vec<EndpointHandles>);

impl Handles {
    fn new() -> Handles {
        Handles(
            Endpoint::ALL
                .iter()
                .map(|_| EndpointHandles::default())
                .collect(),
        )
    }

    fn record(&self, endpoint: Endpoint, status: u16, duration: Duration) {
        // `Endpoint::ALL` lists the endpoints in their order: an endpoint is its index.
        let (Some(h), Some(i)) = (
            self.0.get(endpoint as usize),
            STATUSES.iter().position(|s| *s == status),
        ) else {
            return record_by_labels(endpoint, status, duration);
        };
        let label = endpoint.as_str();
        h.by_status[i]
            .get_or_init(|| {
                ::metrics::counter!(REQUESTS_TOTAL, "endpoint" => label, "status" => status.to_string())
            })
            .increment(1);
        h.duration
            .get_or_init(|| ::metrics::histogram!(REQUEST_DURATION, "endpoint" => label))
            .record(duration.as_secs_f64());
    }
}

/// The handles, registered on first use once `kst serve`'s recorder is installed
/// ([`crate::shared::metrics::init`]); `None` before (a handle registered then would record
/// nowhere for good).
fn ready_handles() -> Option<&'static Handles> {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    if let Some(h) = HANDLES.get() {
        return Some(h);
    }
    crate::shared::metrics::installed().then(|| HANDLES.get_or_init(Handles::new))
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

/// Records one write of the request counts ([`super::writebehind`]) of `hits` hits.
pub fn counter_flush(ok: bool, hits: usize) {
    let outcome = if ok { "ok" } else { "failed" };
    ::metrics::counter!(COUNTER_FLUSHES_TOTAL, "outcome" => outcome).increment(1);
    ::metrics::counter!(COUNTER_FLUSHED_HITS_TOTAL).increment(hits as u64);
}

/// Records a look-up refused because the read batches' queue was full.
pub fn lookups_busy() {
    ::metrics::counter!(LOOKUPS_BUSY_TOTAL).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_its_index_in_all() {
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
        let labels: std::collections::HashSet<&str> =
            Endpoint::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(labels.len(), Endpoint::ALL.len(), "one label each");
    }
}
