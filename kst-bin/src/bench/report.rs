//! Results of one timed phase: rate, latency percentiles, outcomes; printed as text or JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// What one message got.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// `250` with kst's decision (`published`, `found`, `not-found`, `refused`, ...).
    Decided(String),
    /// `4xx`: deferred (the MTA would retry).
    Deferred(String),
    /// `5xx`, a broken connection, or a `kst deliver` exit code other than 0/75.
    Failed(String),
}

impl Outcome {
    /// The outcome of an LMTP reply to DATA.
    pub fn of_reply(reply: &str) -> Outcome {
        match reply.as_bytes().first() {
            Some(b'2') => Outcome::Decided(
                reply
                    .rsplit_once("decided: ")
                    .map_or("accepted", |(_, d)| d.trim())
                    .to_string(),
            ),
            Some(b'4') => Outcome::Deferred(reply.chars().take(9).collect()),
            _ => Outcome::Failed(reply.chars().take(40).collect()),
        }
    }

    fn label(&self) -> String {
        match self {
            Outcome::Decided(d) => d.clone(),
            Outcome::Deferred(d) => format!("deferred {d}"),
            Outcome::Failed(d) => format!("failed {d}"),
        }
    }
}

/// One message's result.
#[derive(Debug, Clone)]
pub struct Sample {
    /// From the first byte sent to the final reply.
    pub latency: Duration,
    /// What it got.
    pub outcome: Outcome,
    /// Times it was sent (more than 1 when a temporary failure was retried).
    pub tries: u32,
}

/// The summary of a phase.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `publication` or `retrieval`.
    pub phase: String,
    /// `lmtp` or `pipe`.
    pub mode: String,
    /// Concurrent connections (or processes).
    pub concurrency: usize,
    /// Messages sent.
    pub messages: usize,
    /// Messages that got a decision (250 / exit 0).
    pub decided: usize,
    /// Wall-clock seconds of the phase.
    pub seconds: f64,
    /// Decided messages per second.
    pub rate: f64,
    /// Latency percentiles seen by the client, in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest latency.
    pub max_ms: f64,
    /// Messages per outcome (the final one, after retries).
    pub outcomes: BTreeMap<String, usize>,
    /// Messages sent more than once because a try failed temporarily (`--retry-temporary`).
    pub retried: usize,
    /// The server's own 99th percentile (end of DATA to decision, from `/metrics`), when
    /// `--metrics` was given: the upper bound of the histogram bucket that holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_p99_ms: Option<f64>,
}

impl Report {
    /// Summarizes `samples` of a phase that took `elapsed`.
    pub fn new(
        phase: &str,
        mode: &str,
        concurrency: usize,
        mut samples: Vec<Sample>,
        elapsed: Duration,
    ) -> Report {
        samples.sort_by_key(|s| s.latency);
        let latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        let pct = |p: f64| -> f64 { nearest_rank(&latencies, p).map_or(0.0, millis) };
        let mut outcomes = BTreeMap::new();
        for s in &samples {
            *outcomes.entry(s.outcome.label()).or_insert(0) += 1;
        }
        let decided = samples
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Decided(_)))
            .count();
        let retried = samples.iter().filter(|s| s.tries > 1).count();
        let seconds = elapsed.as_secs_f64();
        Report {
            phase: phase.into(),
            mode: mode.into(),
            concurrency,
            messages: samples.len(),
            decided,
            seconds,
            rate: if seconds > 0.0 {
                decided as f64 / seconds
            } else {
                0.0
            },
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            outcomes,
            retried,
            server_p99_ms: None,
        }
    }

    /// A few human-readable lines.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{phase:<12} {n} messages over {c} {what} in {secs:.2}s: {rate:.0} msg/s; latency p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms, max {max:.2} ms\n",
            phase = self.phase,
            n = self.messages,
            c = self.concurrency,
            what = if self.mode == "pipe" {
                "processes"
            } else {
                "connections"
            },
            secs = self.seconds,
            rate = self.rate,
            p50 = self.p50_ms,
            p95 = self.p95_ms,
            p99 = self.p99_ms,
            max = self.max_ms,
        );
        if let Some(p99) = self.server_p99_ms {
            s.push_str(&format!(
                "{:<12} inside kst (from /metrics): p99 <= {p99} ms\n",
                ""
            ));
        }
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        s.push_str(&format!("{:<12} outcomes: {}\n", "", outcomes.join(", ")));
        if self.retried > 0 {
            s.push_str(&format!(
                "{:<12} retried after a temporary failure: {}\n",
                "", self.retried
            ));
        }
        s
    }
}

/// The `q` quantile (0 < q <= 1) of `sorted` (ascending) by the nearest-rank method: the
/// smallest value that at least `q` of the values do not exceed; `None` when it is empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `d` in milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Cumulative counts of the `kst_message_duration_seconds` histogram by upper bound (seconds),
/// summed over every label set, from a Prometheus text page.
pub fn duration_buckets(page: &str) -> BTreeMap<u64, f64> {
    let mut buckets = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("kst_message_duration_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("le=\""))
            .map(|l| l.trim_end_matches('"'))
        else {
            continue;
        };
        let (Ok(count), Some(bound)) = (value.trim().parse::<f64>(), bound_micros(le)) else {
            continue;
        };
        *buckets.entry(bound).or_insert(0.0) += count;
    }
    buckets
}

fn bound_micros(le: &str) -> Option<u64> {
    if le == "+Inf" {
        return Some(u64::MAX);
    }
    le.parse::<f64>().ok().map(|s| (s * 1e6).round() as u64)
}

/// The upper bound (ms) of the bucket holding quantile `q` of what was recorded between two
/// scrapes; `None` when nothing was.
pub fn quantile_between(
    before: &BTreeMap<u64, f64>,
    after: &BTreeMap<u64, f64>,
    q: f64,
) -> Option<f64> {
    let delta: Vec<(u64, f64)> = after
        .iter()
        .map(|(b, n)| (*b, n - before.get(b).copied().unwrap_or(0.0)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = total * q;
    delta.iter().find(|(_, n)| *n >= want).map(|(b, _)| {
        if *b == u64::MAX {
            f64::INFINITY
        } else {
            *b as f64 / 1000.0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_outcomes() {
        let samples: Vec<Sample> = (1..=100)
            .map(|ms| Sample {
                latency: Duration::from_millis(ms),
                outcome: if ms == 100 {
                    Outcome::of_reply("451 4.3.0 kst unavailable")
                } else {
                    Outcome::of_reply("250 2.0.0 <x> L1.2 decided: found")
                },
                tries: if ms <= 3 { 2 } else { 1 },
            })
            .collect();
        let r = Report::new("retrieval", "lmtp", 4, samples, Duration::from_secs(2));
        assert_eq!((r.messages, r.decided), (100, 99));
        assert_eq!(r.rate, 49.5);
        assert_eq!(
            (r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(r.outcomes["found"], 99);
        assert_eq!(r.outcomes["deferred 451 4.3.0"], 1);
        assert_eq!(r.retried, 3);
        assert!(r.text().contains("retried after a temporary failure: 3"));
        assert!(r.text().contains("49 msg/s") || r.text().contains("50 msg/s"));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(500));
        assert_eq!(nearest_rank(&v, 0.99), Some(990));
        assert_eq!(nearest_rank(&v, 0.999), Some(999));
        assert_eq!(nearest_rank(&v, 1.0), Some(1000));
        assert_eq!(
            nearest_rank(&v, 0.0),
            Some(1),
            "never below the first value"
        );
        assert_eq!(nearest_rank(&[7u32], 0.99), Some(7));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
        assert_eq!(millis(Duration::from_micros(1500)), 1.5);
    }

    #[test]
    fn server_quantile_from_two_scrapes() {
        let page = |fast: u32, slow: u32| {
            format!(
                "# TYPE kst_message_duration_seconds histogram\n\
                 kst_message_duration_seconds_bucket{{kind=\"retrieval\",outcome=\"found\",le=\"0.001\"}} {fast}\n\
                 kst_message_duration_seconds_bucket{{kind=\"retrieval\",outcome=\"found\",le=\"0.005\"}} {}\n\
                 kst_message_duration_seconds_bucket{{kind=\"retrieval\",outcome=\"found\",le=\"+Inf\"}} {}\n\
                 kst_message_duration_seconds_count{{kind=\"retrieval\",outcome=\"found\"}} {}\n",
                fast + slow,
                fast + slow,
                fast + slow
            )
        };
        let before = duration_buckets(&page(10, 0));
        let after = duration_buckets(&page(108, 2));
        assert_eq!(before.len(), 3);
        assert_eq!(quantile_between(&before, &after, 0.5), Some(1.0));
        assert_eq!(quantile_between(&before, &after, 0.99), Some(5.0));
        assert_eq!(quantile_between(&after, &after, 0.99), None);
    }
}
