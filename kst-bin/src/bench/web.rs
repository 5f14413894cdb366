//! `kst bench web`: an open-loop HTTP/1.1 load on the `[web]` listener. Requests go out on a
//! fixed schedule whatever the answers do, and each one's latency counts from the time it was
//! due, so a slow answer cannot hide the requests that waited behind it (no coordinated
//! omission, as wrk2 and `oha --latency-correction` measure).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HOST, HeaderValue, USER_AGENT};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};

use super::report::{millis, nearest_rank};

/// What `kst bench web --help` adds after the options.
pub const WEB_AFTER_HELP: &str = "\
How it measures:
  Request i is due at START + i / RATE, whatever the earlier answers do (an open loop). A due
  request goes out on a free keep-alive connection; when all CONNECTIONS are busy it waits for
  one, and its latency still counts from its due time. So the latency percentiles are those of
  a server that is offered RATE requests per second, including the time a request waited
  because the server (or this tool) fell behind. A closed-loop tool (wrk, ab) instead waits for
  each answer before it sends the next request on that connection: a slow answer then delays
  the requests behind it without their wait being counted, and at C connections the mean
  latency is C / rate whatever the server does (Little's law).

  The schedule runs on a thread of its own that sleeps until the next due time (at least
  --tick, then hands out every request due by then); the requests go out on THREADS worker
  threads. `send delay` says how late the requests went out after their due time; `late`
  counts those sent more than --late-after after it, and `due while every connection was
  busy` those that had to wait for a connection (the server fell behind RATE, or CONNECTIONS
  is too small for RATE x latency). Late requests that did not wait for a connection were
  late because this tool fell behind its schedule (a busy machine: give it a core of its
  own). Either way the latency from the due time holds the wait.

Output:
  answers by status (and `error`, `timeout`); look-ups = 200 + 404 answers (issue 14's
  definition; 429 is reported as a share of all requests); achieved rate = answers / time from
  the start to the last answer; latency from the due time and service time (from the moment
  it was sent) at p50, p90, p99, p99.9 and max; this tool's own CPU time per request (user +
  system, every thread: what it takes of the cores it shares with the server). --json prints
  one JSON object on stdout.

Exit status: 0 when every request got an HTTP answer, 1 when some got an error or timed
out, 2 when the load could not run (bad arguments, no connection before the start).

Example (a kst serve with [web] listen = 127.0.0.1:8443 and trusted_proxies = [\"127.0.0.1\"]):
  kst bench web --url http://127.0.0.1:8443 --paths vks.paths --rate 8000 --duration 10 \\
      --connections 64 --clients 1024 --clients-from 127.9.0.0";

/// At most this many requests in one run (every answer's timings are kept to sort them).
const MAX_REQUESTS: u64 = 10_000_000;

/// `kst bench web`.
#[derive(Debug, Clone, Args)]
pub struct WebArgs {
    /// Where `[web]` listens: `http://HOST:PORT` or `HOST:PORT` (plain HTTP only).
    #[arg(long)]
    pub url: String,
    /// Request paths, one per line, each starting with `/` (e.g. the `*.paths` files of
    /// `scripts/bench-web.sh`); every request takes one at random.
    #[arg(long, value_name = "FILE")]
    pub paths: PathBuf,
    /// Requests per second: request i is due at start + i / RATE.
    #[arg(long)]
    pub rate: u32,
    /// Seconds of load: RATE x SECS requests are sent.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Keep-alive connections, all opened before the clock starts.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// The Host header (WKD's direct method finds the domain by it); default: the URL's
    /// HOST:PORT.
    #[arg(long)]
    pub host: Option<String>,
    /// Name this many client addresses in `X-Forwarded-For`, request i from client i mod N
    /// (0: no header). kst believes it only from a peer in `[web] trusted_proxies`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub clients: u32,
    /// The first client address: client c is this address plus c (127.9.0.0 + 300 is
    /// 127.9.1.44).
    #[arg(long, value_name = "IPV4", default_value = "127.9.0.0")]
    pub clients_from: Ipv4Addr,
    /// A request sent more than MS milliseconds after its due time counts as late.
    #[arg(long, value_name = "MS", default_value_t = 1.0)]
    pub late_after: f64,
    /// An answer not complete SECS after the request went out counts as `timeout`, and its
    /// connection is replaced.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    /// The schedule's thread wakes at most once per MS milliseconds and hands out every
    /// request due by then (0: at each request's due time). Fewer wake-ups leave more of the
    /// machine to the server; the up to MS a request waits for its wake-up counts in its
    /// latency and its send delay.
    #[arg(long, value_name = "MS", default_value_t = 0.25)]
    pub tick: f64,
    /// Worker threads that send the requests (the schedule has a thread of its own).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the random choice of paths (the same seed, the same paths in the same order).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as one JSON object on stdout (the text goes to stderr either way).
    #[arg(long)]
    pub json: bool,
}

/// When each request is due: request i at i / rate seconds after the start (to the
/// nanosecond, rounded down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Requests per second.
    pub rate: u32,
    /// Requests in all.
    pub total: u64,
}

impl Schedule {
    /// `rate` requests per second for `seconds` (rounded to whole requests).
    pub fn new(rate: u32, seconds: f64) -> Schedule {
        let total = (f64::from(rate) * seconds).round();
        Schedule {
            rate,
            total: if total.is_finite() && total > 0.0 {
                total as u64
            } else {
                0
            },
        }
    }

    /// When request `i` is due, after the start.
    pub fn offset(&self, i: u64) -> Duration {
        let nanos = u128::from(i) * 1_000_000_000 / u128::from(self.rate.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How many requests are due `elapsed` after the start: every i with `offset(i) <=
    /// elapsed` (request 0 at once), at most `total`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        // offset(i) <= e  <=>  floor(i * 1e9 / rate) <= e  <=>  i * 1e9 < (e + 1) * rate.
        let n = ((elapsed.as_nanos() + 1) * u128::from(self.rate)).div_ceil(1_000_000_000);
        u64::try_from(n).unwrap_or(u64::MAX).min(self.total)
    }
}

/// SplitMix64: a small, seeded, well-mixed sequence for picking paths (not for secrets).
#[derive(Debug, Clone)]
pub struct PathPicker(u64);

impl PathPicker {
    /// The sequence of `seed`.
    pub fn new(seed: u64) -> PathPicker {
        PathPicker(seed)
    }

    /// The next index below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Lemire's multiply-shift: unbiased enough for a path list of any sane length.
        ((u128::from(z) * n as u128) >> 64) as usize
    }
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    /// An HTTP answer with this status, body read to the end.
    Status(u16),
    /// No connection, or the connection broke before the answer was complete.
    Error,
    /// No complete answer within `--timeout`.
    Timeout,
}

impl Answer {
    fn label(self) -> String {
        match self {
            Answer::Status(s) => s.to_string(),
            Answer::Error => "error".into(),
            Answer::Timeout => "timeout".into(),
        }
    }
}

/// One request's timings, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// From its due time to the end of its answer (the latency an open loop reports).
    pub from_due: u64,
    /// From the moment it went out to the end of its answer (the service time).
    pub from_sent: u64,
    /// From its due time to the moment it went out.
    pub send_delay: u64,
    /// It was due while every connection was busy: the connection that sent it was still
    /// waiting for its previous answer at the due time (and none was idle, or that one would
    /// have taken it first).
    pub waited: bool,
    /// What came back.
    pub answer: Answer,
}

/// Five points of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Of `nanos` (sorted here).
    pub fn of(mut nanos: Vec<u64>) -> Percentiles {
        nanos.sort_unstable();
        let at = |q: f64| nearest_rank(&nanos, q).map_or(0.0, |n| millis(Duration::from_nanos(n)));
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.p50, self.p90, self.p99, self.p999, self.max
        )
    }
}

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct WebReport {
    /// Requests per second asked for.
    pub rate: u32,
    /// Seconds of load asked for.
    pub duration: f64,
    /// Keep-alive connections.
    pub connections: usize,
    /// Client addresses named in `X-Forwarded-For` (0: none).
    pub clients: u32,
    /// Requests sent (the schedule's total).
    pub requests: u64,
    /// Requests by what came back: the status code, `error` or `timeout`.
    pub answers: BTreeMap<String, u64>,
    /// 200 and 404 answers: look-ups that got an answer from the store.
    pub lookups: u64,
    /// Seconds from the start to the last answer.
    pub elapsed: f64,
    /// HTTP answers per second over `elapsed`.
    pub achieved_rate: f64,
    /// Look-ups per second over `elapsed`.
    pub lookup_rate: f64,
    /// Share of all requests answered 429, in percent.
    pub refused_percent: f64,
    /// Requests sent more than `late_after_ms` after their due time.
    pub late: u64,
    /// `late` as a share of all requests, in percent.
    pub late_percent: f64,
    /// The lateness that counts as late.
    pub late_after_ms: f64,
    /// Requests due while every connection was busy (they waited for one; the rest of the
    /// late ones were late because this tool fell behind its schedule).
    pub waited: u64,
    /// `waited` as a share of all requests, in percent.
    pub waited_percent: f64,
    /// Latency from the due time to the end of the answer.
    pub latency_ms: Percentiles,
    /// From the moment a request went out to the end of its answer.
    pub service_ms: Percentiles,
    /// From the due time to the moment a request went out.
    pub send_delay_ms: Percentiles,
    /// Body bytes received.
    pub body_bytes: u64,
    /// This tool's own CPU time (user and system, every thread) from the start to the last
    /// answer, per request, in microseconds: what the load takes of the cores the server
    /// shares with it.
    pub cpu_us_per_request: f64,
}

impl WebReport {
    /// Summarizes `samples` of a run of `schedule` over `connections` (the rest of the
    /// settings from `args`) whose last answer came `elapsed` after the start.
    pub fn new(
        args: &WebArgs,
        schedule: Schedule,
        samples: &[Sample],
        elapsed: Duration,
        body_bytes: u64,
    ) -> WebReport {
        let mut answers = BTreeMap::new();
        for s in samples {
            *answers.entry(s.answer).or_insert(0u64) += 1;
        }
        let count = |a: Answer| answers.get(&a).copied().unwrap_or(0);
        let lookups = count(Answer::Status(200)) + count(Answer::Status(404));
        let answered: u64 = answers
            .iter()
            .filter(|(a, _)| matches!(a, Answer::Status(_)))
            .map(|(_, n)| n)
            .sum();
        let late_after = Duration::from_secs_f64(args.late_after.max(0.0) / 1000.0);
        let late = samples
            .iter()
            .filter(|s| Duration::from_nanos(s.send_delay) > late_after)
            .count() as u64;
        let waited = samples.iter().filter(|s| s.waited).count() as u64;
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let percent = |n: u64| {
            if samples.is_empty() {
                0.0
            } else {
                100.0 * n as f64 / samples.len() as f64
            }
        };
        WebReport {
            rate: schedule.rate,
            duration: args.duration,
            connections: args.connections,
            clients: args.clients,
            requests: samples.len() as u64,
            lookups,
            elapsed: secs,
            achieved_rate: per_sec(answered),
            lookup_rate: per_sec(lookups),
            refused_percent: percent(count(Answer::Status(429))),
            late,
            late_percent: percent(late),
            late_after_ms: args.late_after,
            waited,
            waited_percent: percent(waited),
            latency_ms: Percentiles::of(samples.iter().map(|s| s.from_due).collect()),
            service_ms: Percentiles::of(samples.iter().map(|s| s.from_sent).collect()),
            send_delay_ms: Percentiles::of(samples.iter().map(|s| s.send_delay).collect()),
            body_bytes,
            cpu_us_per_request: 0.0,
            answers: answers.into_iter().map(|(a, n)| (a.label(), n)).collect(),
        }
    }

    /// True when every request got an HTTP answer.
    pub fn all_answered(&self) -> bool {
        !self.answers.contains_key("error") && !self.answers.contains_key("timeout")
    }

    /// A few human-readable lines.
    pub fn text(&self) -> String {
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!(
            "web          {req} requests at {rate}/s for {dur} s over {c} connections{clients}\n\
             {e:12} answers: {answers}\n\
             {e:12} achieved {ach:.0} answers/s, {lk:.0} look-ups/s (200 and 404) in {el:.2} s; 429: {ref_:.1}%\n\
             {e:12} latency from due time (ms): {lat}\n\
             {e:12} service time (ms):          {svc}\n\
             {e:12} send delay (ms):            {dly}\n\
             {e:12} sent late (> {la} ms after due): {late} ({latep:.2}%); due while every connection was busy: {waited} ({waitedp:.2}%)\n\
             {e:12} this tool's CPU: {cpu:.1} µs per request\n",
            e = "",
            req = self.requests,
            rate = self.rate,
            dur = self.duration,
            c = self.connections,
            clients = if self.clients > 0 {
                format!(", {} clients in X-Forwarded-For", self.clients)
            } else {
                String::new()
            },
            answers = answers.join(", "),
            ach = self.achieved_rate,
            lk = self.lookup_rate,
            el = self.elapsed,
            ref_ = self.refused_percent,
            lat = self.latency_ms.text(),
            svc = self.service_ms.text(),
            dly = self.send_delay_ms.text(),
            la = self.late_after_ms,
            late = self.late,
            latep = self.late_percent,
            waited = self.waited,
            waitedp = self.waited_percent,
            cpu = self.cpu_us_per_request,
        )
    }
}

/// `--url` as the `HOST:PORT` to connect to (port 80 when none is named).
pub fn target_of(url: &str) -> anyhow::Result<String> {
    if url.starts_with("https://") {
        bail!("--url {url}: plain HTTP only (measure [web] without TLS, or behind its proxy)");
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        bail!("--url {url}: expected http://HOST:PORT");
    }
    let has_port = match authority.rsplit_once(':') {
        // [::1]:8080 has a port, [::1] has none.
        Some((_, port)) => !port.ends_with(']') && port.parse::<u16>().is_ok(),
        None => false,
    };
    Ok(if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    })
}

/// The request paths of `text`, one per line (blank lines skipped).
pub fn parse_paths(text: &str) -> anyhow::Result<Vec<hyper::Uri>> {
    let mut paths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !line.starts_with('/') {
            bail!("line {}: a path must start with '/': {line:?}", n + 1);
        }
        let uri = line
            .parse::<hyper::Uri>()
            .with_context(|| format!("line {}: not a request path: {line:?}", n + 1))?;
        paths.push(uri);
    }
    if paths.is_empty() {
        bail!("no paths");
    }
    Ok(paths)
}

/// The address of client `c`: `from` plus `c`.
pub fn client_address(from: Ipv4Addr, c: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(from).wrapping_add(c))
}

/// A request the schedule handed out.
#[derive(Debug, Clone, Copy)]
struct Job {
    index: u64,
    due: Instant,
    path: usize,
}

/// What every connection shares.
struct Shared {
    queue: Mutex<mpsc::UnboundedReceiver<Job>>,
    target: String,
    host: HeaderValue,
    paths: Vec<hyper::Uri>,
    clients: Vec<HeaderValue>,
    timeout: Duration,
}

/// One keep-alive HTTP/1.1 connection; its driver task ends with it.
struct Link {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Link {
    async fn open(target: &str) -> anyhow::Result<Link> {
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1.1 with {target}"))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Link { sender, driver })
    }
}

/// Sends `job` on `link` (opening one when there is none): the status and the body's length.
async fn exchange(
    link: &mut Option<Link>,
    shared: &Shared,
    job: &Job,
) -> anyhow::Result<(u16, u64)> {
    if link.is_none() {
        *link = Some(Link::open(&shared.target).await?);
    }
    let Some(l) = link.as_mut() else {
        bail!("no connection");
    };
    let mut request = hyper::Request::builder()
        .uri(shared.paths[job.path].clone())
        .header(HOST, shared.host.clone())
        .header(USER_AGENT, "kst-bench");
    if !shared.clients.is_empty() {
        let c = (job.index % shared.clients.len() as u64) as usize;
        request = request.header("x-forwarded-for", shared.clients[c].clone());
    }
    let request = request.body(Empty::new())?;
    l.sender.ready().await?;
    let response = l.sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body.len() as u64))
}

/// One connection's loop: takes the next due request until the schedule is done; its samples
/// and body bytes.
/// `ready` is when every connection was open (before the start).
async fn connection(
    shared: Arc<Shared>,
    mut link: Option<Link>,
    ready: Instant,
) -> (Vec<Sample>, u64) {
    let mut samples = Vec::new();
    let mut bytes = 0;
    // Since when this connection has been free for the next request.
    let mut free_since = ready;
    loop {
        let job = shared.queue.lock().await.recv().await;
        let Some(job) = job else { break };
        let sent = Instant::now();
        let answer =
            match tokio::time::timeout(shared.timeout, exchange(&mut link, &shared, &job)).await {
                Ok(Ok((status, len))) => {
                    bytes += len;
                    Answer::Status(status)
                }
                Ok(Err(_)) => Answer::Error,
                Err(_) => Answer::Timeout,
            };
        if !matches!(answer, Answer::Status(_)) {
            link = None; // a new connection for the next request
        }
        let done = Instant::now();
        let waited = free_since > job.due;
        free_since = done;
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        samples.push(Sample {
            from_due: nanos(done.saturating_duration_since(job.due)),
            from_sent: nanos(done.saturating_duration_since(sent)),
            send_delay: nanos(sent.saturating_duration_since(job.due)),
            waited,
            answer,
        });
    }
    (samples, bytes)
}

/// Hands out the schedule's requests as they fall due, from a thread of its own that sleeps
/// until the next due time (finer than the async runtime's millisecond timer).
fn tick(
    schedule: Schedule,
    start: Instant,
    tick: Duration,
    jobs: mpsc::UnboundedSender<Job>,
    paths: usize,
    seed: u64,
) {
    let mut picker = PathPicker::new(seed);
    let mut next = 0;
    while next < schedule.total {
        let due = schedule.due_by(start.elapsed());
        while next < due {
            let job = Job {
                index: next,
                due: start + schedule.offset(next),
                path: picker.below(paths),
            };
            if jobs.send(job).is_err() {
                return;
            }
            next += 1;
        }
        if next < schedule.total {
            let now = Instant::now();
            let wake = (start + schedule.offset(next)).max(now + tick);
            std::thread::sleep(wake - now);
        }
    }
}

/// Checks the arguments and runs the load on a runtime of its own with `--threads` workers.
pub async fn run(args: WebArgs) -> anyhow::Result<WebReport> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kst-bench-web".into())
        .spawn(move || {
            let runtime = if args.threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(args.threads)
                    .enable_all()
                    .build()
            };
            let result = match runtime {
                Ok(rt) => rt.block_on(load(args)),
                Err(e) => Err(anyhow::Error::new(e).context("cannot start the load's runtime")),
            };
            let _ = tx.send(result);
        })
        .context("cannot start the load's thread")?;
    rx.await.context("the load's thread ended early")?
}

async fn load(args: WebArgs) -> anyhow::Result<WebReport> {
    if args.rate == 0 {
        bail!("--rate must be at least 1");
    }
    if args.connections == 0 || args.threads == 0 {
        bail!("--connections and --threads must be at least 1");
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        bail!("--timeout must be between 0 and 3600 seconds");
    }
    if !(args.late_after.is_finite() && args.late_after >= 0.0) {
        bail!("--late-after must be 0 or more milliseconds");
    }
    if !(args.tick.is_finite() && (0.0..=100.0).contains(&args.tick)) {
        bail!("--tick must be 0 to 100 milliseconds");
    }
    let schedule = Schedule::new(args.rate, args.duration);
    if schedule.total == 0 || schedule.total > MAX_REQUESTS {
        bail!("--rate x --duration must be 1 to {MAX_REQUESTS} requests");
    }
    if u64::from(u32::from(args.clients_from)) + u64::from(args.clients) > 1 << 32 {
        bail!("--clients-from + --clients runs past 255.255.255.255");
    }
    let target = target_of(&args.url)?;
    let host = HeaderValue::from_str(args.host.as_deref().unwrap_or(&target))
        .context("--host is no header value")?;
    let text = std::fs::read_to_string(&args.paths)
        .with_context(|| format!("cannot read --paths {}", args.paths.display()))?;
    let paths = parse_paths(&text).with_context(|| format!("--paths {}", args.paths.display()))?;
    let clients = (0..args.clients)
        .map(|c| HeaderValue::from_str(&client_address(args.clients_from, c).to_string()))
        .collect::<Result<Vec<_>, _>>()?;

    let mut links = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        links.push(Link::open(&target).await?);
    }
    let (jobs, queue) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        target: target.clone(),
        host,
        paths,
        clients,
        timeout: Duration::from_secs_f64(args.timeout),
    });
    eprintln!(
        "kst bench web: {} requests at {}/s over {} connections to {target}",
        schedule.total, schedule.rate, args.connections
    );
    let ready = Instant::now();
    let tasks: Vec<_> = links
        .into_iter()
        .map(|l| tokio::spawn(connection(Arc::clone(&shared), Some(l), ready)))
        .collect();
    let start = Instant::now();
    let cpu_at_start = process_cpu();
    let (n, seed) = (shared.paths.len(), args.seed);
    let every = Duration::from_secs_f64(args.tick / 1000.0);
    let ticker = std::thread::Builder::new()
        .name("kst-bench-tick".into())
        .spawn(move || tick(schedule, start, every, jobs, n, seed))
        .context("cannot start the schedule's thread")?;
    let mut samples = Vec::with_capacity(usize::try_from(schedule.total).unwrap_or(0));
    let mut bytes = 0;
    for t in tasks {
        let (s, b) = t.await.context("a connection's task failed")?;
        samples.extend(s);
        bytes += b;
    }
    let elapsed = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_at_start);
    if ticker.join().is_err() {
        bail!("the schedule's thread failed");
    }
    let mut report = WebReport::new(&args, schedule, &samples, elapsed, bytes);
    if !samples.is_empty() {
        report.cpu_us_per_request = cpu.as_secs_f64() * 1e6 / samples.len() as f64;
    }
    Ok(report)
}

/// CPU time this process has used so far, user and system, all threads: fields 14 and 15 of
/// `/proc/self/stat`, in clock ticks of 1/100 s (Linux's `USER_HZ` as its ABI fixes it);
/// zero where there is no such file.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    cpu_of_stat(&stat).unwrap_or(Duration::ZERO)
}

/// User plus system time of a `/proc/PID/stat` line (the fields after the command's `)`).
fn cpu_of_stat(stat: &str) -> Option<Duration> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_due_exactly_when_its_offsets_say() {
        for rate in [1, 3, 7, 1000, 8000, 20_000, 33_333, 1_000_000] {
            let s = Schedule::new(rate, 2.0);
            assert_eq!(s.total, 2 * u64::from(rate));
            assert_eq!(s.offset(0), Duration::ZERO);
            assert_eq!(s.offset(u64::from(rate)), Duration::from_secs(1));
            assert_eq!(s.due_by(Duration::ZERO), 1, "request 0 at once");
            let some = [1u64, 2, 3, 17, 999, u64::from(rate) - 1, s.total - 1];
            for i in some.into_iter().filter(|i| (1..s.total).contains(i)) {
                let at = s.offset(i);
                assert_eq!(
                    s.due_by(at),
                    i + 1,
                    "rate {rate}: request {i} due at {at:?}"
                );
                assert_eq!(
                    s.due_by(at - Duration::from_nanos(1)),
                    i,
                    "rate {rate}, {i}"
                );
                assert!(s.offset(i) >= s.offset(i - 1));
            }
            assert_eq!(
                s.due_by(Duration::from_secs(3600)),
                s.total,
                "never past the end"
            );
        }
        // 1 per 3 ns cannot be: 1e9 / 3 is rounded down, every offset still increasing.
        let s = Schedule::new(3, 1.0);
        assert_eq!(
            (s.offset(1), s.offset(2)),
            (
                Duration::from_nanos(333_333_333),
                Duration::from_nanos(666_666_666)
            )
        );
        assert_eq!(Schedule::new(8000, 0.5).total, 4000);
        assert_eq!(Schedule::new(10, 0.0).total, 0);
        assert_eq!(Schedule::new(10, f64::NAN).total, 0);
        assert_eq!(Schedule::new(10, -1.0).total, 0);
    }

    #[test]
    fn the_path_picker_is_seeded_and_stays_in_range() {
        let a: Vec<usize> = {
            let mut p = PathPicker::new(7);
            (0..1000).map(|_| p.below(10)).collect()
        };
        let b: Vec<usize> = {
            let mut p = PathPicker::new(7);
            (0..1000).map(|_| p.below(10)).collect()
        };
        assert_eq!(a, b, "the same seed, the same sequence");
        assert!(a.iter().all(|&i| i < 10));
        for v in 0..10 {
            let n = a.iter().filter(|&&i| i == v).count();
            assert!((50..=150).contains(&n), "{v} picked {n} times of 1000");
        }
        assert_eq!(PathPicker::new(1).below(0), 0);
        assert_eq!(PathPicker::new(1).below(1), 0);
    }

    fn args() -> WebArgs {
        WebArgs {
            url: "http://127.0.0.1:1".into(),
            paths: "p".into(),
            rate: 100,
            duration: 1.0,
            connections: 4,
            host: None,
            clients: 0,
            clients_from: Ipv4Addr::new(127, 9, 0, 0),
            late_after: 1.0,
            tick: 0.25,
            timeout: 10.0,
            threads: 1,
            seed: 1,
            json: false,
        }
    }

    #[test]
    fn the_report_counts_every_request_once_and_takes_latency_from_the_due_time() {
        let ms = 1_000_000;
        // 100 requests: 90 answered 200 (1 ms after due, sent at once), 5 404 that waited 3 ms
        // for a connection and took 2 ms, 3 429, one error, one timeout.
        let mut samples = Vec::new();
        for i in 0..100u64 {
            let (answer, send_delay, service) = match i {
                0..90 => (Answer::Status(200), 0, ms),
                90..95 => (Answer::Status(404), 3 * ms, 2 * ms),
                95..98 => (Answer::Status(429), 0, ms / 2),
                98 => (Answer::Error, 0, ms),
                _ => (Answer::Timeout, 2 * ms, 10_000 * ms),
            };
            samples.push(Sample {
                from_due: send_delay + service,
                from_sent: service,
                send_delay,
                waited: (90..95).contains(&i),
                answer,
            });
        }
        let schedule = Schedule::new(100, 1.0);
        let r = WebReport::new(&args(), schedule, &samples, Duration::from_secs(2), 12345);
        assert_eq!(r.requests, 100);
        assert_eq!(
            r.answers.values().sum::<u64>(),
            r.requests,
            "{:?}",
            r.answers
        );
        assert_eq!(
            r.answers,
            BTreeMap::from([
                ("200".into(), 90),
                ("404".into(), 5),
                ("429".into(), 3),
                ("error".into(), 1),
                ("timeout".into(), 1),
            ])
        );
        assert_eq!(r.lookups, 95);
        assert_eq!(r.achieved_rate, 49.0, "98 HTTP answers in 2 s");
        assert_eq!(r.lookup_rate, 47.5);
        assert_eq!(r.refused_percent, 3.0);
        assert_eq!(
            (r.late, r.late_percent),
            (6, 6.0),
            "the 404s and the timeout"
        );
        assert_eq!((r.waited, r.waited_percent), (5, 5.0), "the 404s");
        assert_eq!(r.latency_ms.p50, 1.0);
        assert_eq!(r.latency_ms.p90, 1.0);
        assert_eq!(
            r.latency_ms.p99, 5.0,
            "the 404s: waited 3 ms, answered in 2"
        );
        assert_eq!(r.latency_ms.max, 10_002.0);
        assert_eq!(r.service_ms.p99, 2.0, "service time leaves the wait out");
        assert_eq!(r.send_delay_ms.p90, 0.0);
        assert_eq!(r.send_delay_ms.p99, 3.0);
        assert_eq!(r.body_bytes, 12345);
        assert!(!r.all_answered());
        let text = r.text();
        assert!(
            text.contains("200: 90, 404: 5, 429: 3, error: 1, timeout: 1"),
            "{text}"
        );
        assert!(
            text.contains("6 (6.00%); due while every connection was busy: 5 (5.00%)"),
            "{text}"
        );
        assert!(
            text.contains("47 look-ups/s") || text.contains("48 look-ups/s"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["latency_ms"]["p99"], 5.0);
        assert_eq!(json["answers"]["429"], 3);
    }

    #[test]
    fn an_empty_run_reports_zeroes() {
        let r = WebReport::new(&args(), Schedule::new(100, 1.0), &[], Duration::ZERO, 0);
        assert_eq!((r.requests, r.lookups, r.late), (0, 0, 0));
        assert_eq!((r.achieved_rate, r.refused_percent), (0.0, 0.0));
        assert_eq!(r.latency_ms, Percentiles::default());
        assert!(r.all_answered());
    }

    #[test]
    fn cpu_time_is_read_from_proc_stat() {
        let line =
            "4242 (kst bench) web) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 37 0 0 20 0 4 0";
        assert_eq!(cpu_of_stat(line), Some(Duration::from_millis(2870)));
        assert_eq!(cpu_of_stat("4242 (kst) S 1"), None);
        #[cfg(target_os = "linux")]
        {
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(30) {
                std::hint::black_box(spin.elapsed());
            }
            assert!(
                process_cpu() >= Duration::from_millis(10),
                "{:?}",
                process_cpu()
            );
        }
    }

    #[test]
    fn urls_paths_and_client_addresses() {
        assert_eq!(
            target_of("http://127.0.0.1:8443").unwrap(),
            "127.0.0.1:8443"
        );
        assert_eq!(target_of("127.0.0.1:8443/").unwrap(), "127.0.0.1:8443");
        assert_eq!(target_of("http://localhost").unwrap(), "localhost:80");
        assert_eq!(target_of("http://[::1]:8080/x").unwrap(), "[::1]:8080");
        assert_eq!(target_of("http://[::1]").unwrap(), "[::1]:80");
        assert!(target_of("https://example.net").is_err());
        assert!(target_of("http://").is_err());
        assert!(target_of("http://user@host:1").is_err());

        let p = parse_paths("/vks/v1/by-email/a%40example.net\n\n  /pks/lookup?op=get&search=x \n")
            .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].path(), "/pks/lookup");
        assert_eq!(p[1].query(), Some("op=get&search=x"));
        assert!(parse_paths("vks/v1/x\n").is_err(), "no leading slash");
        assert!(parse_paths("/a b\n").is_err(), "not a request target");
        assert!(parse_paths("\n\n").is_err(), "no paths at all");

        let base = Ipv4Addr::new(127, 9, 0, 0);
        assert_eq!(client_address(base, 0), Ipv4Addr::new(127, 9, 0, 0));
        assert_eq!(client_address(base, 300), Ipv4Addr::new(127, 9, 1, 44));
        assert_eq!(client_address(base, 1023), Ipv4Addr::new(127, 9, 3, 255));
    }
}
