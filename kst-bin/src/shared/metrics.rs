//! Prometheus metrics of `kst serve` (all named `kst_*`), recorded with the `metrics` crate.
//!
//! [`init`] installs the process-wide recorder once and returns the handle whose
//! [`render`](PrometheusHandle::render) `/metrics` serves. Before `init` every recording
//! function is a no-op, so library code can always call them.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Messages handled, by `kind` (publication, retrieval, deletion, other, unknown) and `outcome`
/// (published, found, not-found, deleted, refused, ignored, rejected, deferred).
pub const MESSAGES_TOTAL: &str = "kst_messages_total";
/// Time from the end of DATA to the decision for one recipient, in seconds.
pub const MESSAGE_DURATION: &str = "kst_message_duration_seconds";
/// Deliveries deferred because the store failed.
pub const STORE_ERRORS_TOTAL: &str = "kst_store_errors_total";
/// Deliveries deferred because the mailer failed.
pub const MAILER_ERRORS_TOTAL: &str = "kst_mailer_errors_total";
/// Replies handed to the SMTP relay, by `session` (`reused` from the pool, `new`).
pub const MAILER_REPLIES_TOTAL: &str = "kst_mailer_replies_total";
/// Replies the SMTP relay refused for good (a 5xx to their recipient or data), by `code`: not
/// sent, their requests decided without them.
pub const MAILER_REFUSED_TOTAL: &str = "kst_mailer_refused_total";
/// Expiry reminders claimed by this instance's runs (`kst serve`), by `outcome`: `sent`,
/// `refused` (the SMTP relay refused it for good: not sent), `rate-limited` (dropped).
pub const REMINDERS_TOTAL: &str = "kst_reminders_total";
/// LMTP connections open now.
pub const LMTP_CONNECTIONS: &str = "kst_lmtp_connections";
/// LMTP connections accepted since start.
pub const LMTP_CONNECTIONS_TOTAL: &str = "kst_lmtp_connections_total";
/// Connections refused because the peer is not in `[lmtp] allow`.
pub const LMTP_REFUSED_PEERS_TOTAL: &str = "kst_lmtp_refused_peers_total";
/// Connections refused because `max_connections` were open.
pub const LMTP_BUSY_TOTAL: &str = "kst_lmtp_busy_total";
/// Sessions closed because the client was too slow.
pub const LMTP_TIMEOUTS_TOTAL: &str = "kst_lmtp_timeouts_total";
/// Answers of the key directory (feature `transparency`) built and refused by the server's
/// check of its own answers (`kst_core::transparency::self_check`: look-ups, histories,
/// append-only parts, audits), by `domain`; `DomainLog::unverified`, copied every
/// [`WATCH_EVERY`]. Any increase is an alarm: a race the reads did not catch is retried and
/// rare, but a request refused after every attempt (logged as an error) means the store
/// holds a head that names another root than the directory's tree (a fork: an insider with
/// the head key and the store, or a store restored behind kst's back). Witnesses then get
/// 503 on `/audit`, not the evidence (docs/SECURITY.md, "the server's check of its own
/// answers").
pub const TRANSPARENCY_UNVERIFIED_TOTAL: &str = "kst_transparency_unverified_total";

/// Version 3 replies sent without the append-only part they asked for (`KST-Log-Since`)
/// because every turn of that work was taken (`kst_core::transparency::mail_bound`: 2 at
/// once per process, 1 per sender); copied every [`WATCH_EVERY`]. Their clients catch up
/// over HTTP or ask again; a steady rise is a flood of such requests (or too small a bound).
pub const TRANSPARENCY_MAIL_PROOFS_OMITTED_TOTAL: &str =
    "kst_transparency_mail_proofs_omitted_total";
/// Version 3 replies' append-only proofs built and checked within a turn (with
/// [`TRANSPARENCY_MAIL_PROOFS_OMITTED_TOTAL`], the share left out).
pub const TRANSPARENCY_MAIL_PROOFS_TAKEN_TOTAL: &str = "kst_transparency_mail_proofs_taken_total";
/// Version 3 replies' append-only proofs being built or checked now (at most the bound).
pub const TRANSPARENCY_MAIL_PROOFS_IN_FLIGHT: &str = "kst_transparency_mail_proofs_in_flight";

/// How often [`watch_unverified`] copies the logs' counts into the metrics.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Histogram buckets of [`MESSAGE_DURATION`]: 0.5 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle. If another
/// recorder was installed first, the handle renders an empty page and a warning is logged.
pub fn init() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            use crate::server::web::metrics as web;
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(MESSAGE_DURATION.into()), DURATION_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(web::REQUEST_DURATION.into()),
                        web::DURATION_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics stays empty");
            } else {
                INSTALLED.store(true, std::sync::atomic::Ordering::Release);
            }
            register_descriptions();
            handle
        })
        .clone()
}

/// Whether [`init`] installed this process's recorder (so handles registered now record).
pub fn installed() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Acquire)
}

/// Set once [`init`] installed the recorder.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Registers the help text of every metric with the exporter.
fn register_descriptions() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        MESSAGES_TOTAL,
        "Messages handled, by request kind and outcome"
    );
    {
        use crate::server::web::metrics as web;
        describe_counter!(
            web::REQUESTS_TOTAL,
            "Public listener requests answered, by endpoint and status"
        );
        describe_histogram!(
            web::REQUEST_DURATION,
            Unit::Seconds,
            "Public listener time from request to response, by endpoint"
        );
        describe_counter!(
            web::REFUSED_TOTAL,
            "Public listener requests refused with 429, by limit"
        );
        describe_counter!(
            web::BUSY_TOTAL,
            "Public listener connections closed because max_connections were open"
        );
        describe_counter!(
            web::TLS_FAILURES_TOTAL,
            "Public listener TLS handshakes that failed or timed out"
        );
        describe_counter!(
            web::TLS_RELOADS_TOTAL,
            "Public listener certificate reloads, by outcome"
        );
    }
    describe_histogram!(
        MESSAGE_DURATION,
        Unit::Seconds,
        "Time to decide about one message for one recipient"
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        "Deliveries deferred because the store failed"
    );
    describe_counter!(
        MAILER_ERRORS_TOTAL,
        "Deliveries deferred because the mailer failed"
    );
    describe_counter!(
        MAILER_REPLIES_TOTAL,
        "Replies handed to the SMTP relay, on a reused or a new session"
    );
    describe_counter!(
        MAILER_REFUSED_TOTAL,
        "Replies the SMTP relay refused for good (5xx), left unsent, by reply code"
    );
    describe_counter!(
        REMINDERS_TOTAL,
        "Expiry reminders claimed by this instance, by outcome (sent, refused by the relay, rate-limited)"
    );
    describe_counter!(
        TRANSPARENCY_UNVERIFIED_TOTAL,
        "Key directory answers built and refused by the server's own check (did not verify against its heads), by domain; alarm on any increase"
    );
    describe_counter!(
        TRANSPARENCY_MAIL_PROOFS_OMITTED_TOTAL,
        "Version 3 replies sent without the append-only part they asked for: every turn of that work was taken"
    );
    describe_counter!(
        TRANSPARENCY_MAIL_PROOFS_TAKEN_TOTAL,
        "Version 3 replies whose append-only part was built and checked within a turn"
    );
    describe_gauge!(
        TRANSPARENCY_MAIL_PROOFS_IN_FLIGHT,
        "Version 3 replies' append-only proofs being built or checked now"
    );
    describe_gauge!(LMTP_CONNECTIONS, "LMTP connections open now");
    describe_counter!(LMTP_CONNECTIONS_TOTAL, "LMTP connections accepted");
    describe_counter!(
        LMTP_REFUSED_PEERS_TOTAL,
        "LMTP connections refused: peer not in [lmtp] allow"
    );
    describe_counter!(
        LMTP_BUSY_TOTAL,
        "LMTP connections refused: max_connections reached"
    );
    describe_counter!(
        LMTP_TIMEOUTS_TOTAL,
        "LMTP sessions closed for a slow client"
    );
}

/// Counts `n` expiry reminders of one run with `outcome` (`sent`, `refused`, `rate-limited`).
pub fn reminders(outcome: &'static str, n: usize) {
    if n > 0 {
        ::metrics::counter!(REMINDERS_TOTAL, "outcome" => outcome)
            .increment(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// Records one handled message (one recipient).
pub fn message(kind: &'static str, outcome: &'static str, duration: Duration) {
    ::metrics::counter!(MESSAGES_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
    ::metrics::histogram!(MESSAGE_DURATION).record(duration.as_secs_f64());
}

/// Records a delivery deferred by a store failure.
pub fn store_error() {
    ::metrics::counter!(STORE_ERRORS_TOTAL).increment(1);
}

/// Records a delivery deferred by a mailer failure.
pub fn mailer_error() {
    ::metrics::counter!(MAILER_ERRORS_TOTAL).increment(1);
}

/// Records a reply the SMTP relay accepted, on a pooled session or a new one.
pub fn mailer_reply(reused: bool) {
    let session = if reused { "reused" } else { "new" };
    ::metrics::counter!(MAILER_REPLIES_TOTAL, "session" => session).increment(1);
}

/// Records a reply the SMTP relay refused with `code` (a 5xx): left unsent.
pub fn mailer_refused(code: u16) {
    ::metrics::counter!(MAILER_REFUSED_TOTAL, "code" => code.to_string()).increment(1);
}

/// Records a refused peer.
pub fn refused_peer() {
    ::metrics::counter!(LMTP_REFUSED_PEERS_TOTAL).increment(1);
}

/// Records a connection turned away for lack of a slot.
pub fn busy() {
    ::metrics::counter!(LMTP_BUSY_TOTAL).increment(1);
}

/// Records a session closed for a timeout.
pub fn timeout() {
    ::metrics::counter!(LMTP_TIMEOUTS_TOTAL).increment(1);
}

/// Counts an LMTP connection as open until the guard is dropped.
#[must_use = "the connection counts as open while the guard lives"]
pub struct ConnectionGuard(());

/// Records a new LMTP connection; drop the guard when it closes.
pub fn connection_opened() -> ConnectionGuard {
    ::metrics::counter!(LMTP_CONNECTIONS_TOTAL).increment(1);
    ::metrics::gauge!(LMTP_CONNECTIONS).increment(1.0);
    ConnectionGuard(())
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        ::metrics::gauge!(LMTP_CONNECTIONS).decrement(1.0);
    }
}

/// Copies each log's count of answers refused by its own check (`DomainLog::unverified`)
/// into [`TRANSPARENCY_UNVERIFIED_TOTAL`] every [`WATCH_EVERY`], in a task of its own, until
/// every log is gone (it holds none of them).
#[cfg(feature = "transparency")]
pub fn watch_unverified(logs: &[std::sync::Arc<kst_core::transparency::DomainLog>]) {
    let logs: Vec<_> = logs.iter().map(std::sync::Arc::downgrade).collect();
    if logs.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let mut alive = false;
            for log in logs.iter().filter_map(std::sync::Weak::upgrade) {
                alive = true;
                ::metrics::counter!(TRANSPARENCY_UNVERIFIED_TOTAL, "domain" => log.domain().to_string())
                    .absolute(log.unverified());
            }
            if !alive {
                return;
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    });
}

/// Copies what the bound on version 3 replies' append-only work did (`Kst::mail_proofs`) into
/// [`TRANSPARENCY_MAIL_PROOFS_OMITTED_TOTAL`], [`TRANSPARENCY_MAIL_PROOFS_TAKEN_TOTAL`] and
/// [`TRANSPARENCY_MAIL_PROOFS_IN_FLIGHT`]
/// every [`WATCH_EVERY`], in a task of its own, for as long as the process runs.
pub fn watch_mail_proofs(kst: kst_core::Kst) {
    tokio::spawn(async move {
        loop {
            let stats = kst.mail_proofs();
            ::metrics::counter!(TRANSPARENCY_MAIL_PROOFS_OMITTED_TOTAL)
                .absolute(stats.omitted_busy);
            ::metrics::counter!(TRANSPARENCY_MAIL_PROOFS_TAKEN_TOTAL).absolute(stats.taken);
            ::metrics::gauge!(TRANSPARENCY_MAIL_PROOFS_IN_FLIGHT).set(stats.in_flight as f64);
            tokio::time::sleep(WATCH_EVERY).await;
        }
    });
}
