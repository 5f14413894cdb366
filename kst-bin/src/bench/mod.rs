//! `kst bench`: a load generator for a running `kst serve` (LMTP) or for pipe mode (one
//! `kst deliver` per message), with real keys and varied addresses. It prints messages per
//! second and latency percentiles for the publications and then for the retrievals. `kst bench
//! web` ([`web`]) offers the `[web]` listener look-ups at a fixed rate (an open loop).
//!
//! The load is built before any timing starts: one new Ed25519 key per published address
//! (rPGP), the trusted `Received:` header the provider's MTA would write, and retrievals spread
//! over the published addresses (one in ten for an address with no key).

#[cfg(feature = "transparency")]
pub mod directory;
pub mod lmtp;
pub mod messages;
pub mod pipe;
pub mod report;
pub mod web;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use messages::{LoadSpec, Message};
use report::{Report, Sample};

/// `kst bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load a running `kst serve` over C reused LMTP connections.
    ///
    /// Example: kst bench lmtp --connect unix:./data/lmtp.sock --concurrency 8 --publications 2000 --retrievals 20000
    Lmtp(LmtpArgs),
    /// Run one `kst deliver --config FILE` process per message (Postfix pipe mode), C at a time.
    ///
    /// Example: kst --config kst.toml bench pipe --concurrency 4 --publications 200 --retrievals 1000
    Pipe(LoadArgs),
    /// Offer a running `kst serve`'s [web] listener look-ups at a fixed rate (open loop) and
    /// report latency from each request's due time.
    ///
    /// Example: kst bench web --url http://127.0.0.1:8443 --paths vks.paths --rate 8000 --duration 10
    #[command(after_help = web::WEB_AFTER_HELP)]
    Web(web::WebArgs),
}

/// What to send, common to both modes.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Concurrent connections (LMTP) or processes (pipe).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Publications, each for its own address `user<N>@DOMAIN` with its own new key.
    #[arg(long, default_value_t = 1000)]
    pub publications: usize,
    /// Retrievals of the published addresses (one in ten asks for an address with no key).
    #[arg(long, default_value_t = 10000)]
    pub retrievals: usize,
    /// A domain the server serves (`kst.domains`).
    #[arg(long, default_value = "example.test")]
    pub domain: String,
    /// The `by` host of the trusted Received header (one of `kst.trusted_mta_hosts`).
    #[arg(long, default_value = "localhost")]
    pub mta: String,
    /// Print one JSON object per phase on stdout (the text summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `kst bench lmtp`.
#[derive(Debug, Clone, Args)]
pub struct LmtpArgs {
    /// The LMTP address of `kst serve`: unix:/path for a Unix socket (default: the one `kst
    /// serve` makes without a configuration, run from the same directory), or host:port. A
    /// comma-separated list spreads the connections over the instances of a pool.
    #[arg(long, default_value = "unix:./data/lmtp.sock")]
    pub connect: String,
    /// Send a message again after a temporary failure (`4xx`, or a broken connection: then
    /// reconnect) every 100 ms, until this many seconds have passed since its first try, as
    /// an MTA would; 0 never retries. For failover drills.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub retry_temporary: u64,
    /// Write, for every message, what verifies its reply (`kst_core::client::Pending`: the
    /// request's Message-ID and K_auth) to FILE, one JSON object per line with its phase and
    /// index. For drills that check every reply's HMAC; holds the test requests' secrets.
    #[arg(long, value_name = "FILE")]
    pub pending_out: Option<std::path::PathBuf>,
    /// Also read the server's own latency histogram from its `/metrics` (e.g.
    /// 127.0.0.1:8080) before and after each phase.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Run this shell command (`sh -c`) right before and right after each phase's timed part,
    /// with `KST_BENCH_PHASE` (publication, retrieval) and `KST_BENCH_EDGE` (start, end) in its
    /// environment: for sampling the store's counters and the processes' CPU time at the edges
    /// of each phase (`scripts/bench.sh pool`). A failing command stops the run.
    #[arg(long, value_name = "CMD")]
    pub phase_hook: Option<String>,
    /// The load.
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Runs `kst bench`; the exit code is 0 when every message got a decision, 1 when some did not
/// (the summary says which outcomes), 2 when the load could not be run at all.
pub async fn run(cmd: BenchCommand, config: Option<&Path>) -> u8 {
    if let BenchCommand::Web(args) = cmd {
        return run_web(args).await;
    }
    match run_inner(cmd, config).await {
        Ok(true) => 0,
        Ok(false) => {
            eprintln!("kst bench: some messages got no decision (see the outcomes above)");
            1
        }
        Err(e) => {
            eprintln!("kst bench: {e:#}");
            2
        }
    }
}

/// `kst bench web`: 0 when every request got an HTTP answer, 1 when some did not, 2 when the
/// load could not run.
async fn run_web(args: web::WebArgs) -> u8 {
    let json = args.json;
    match web::run(args).await {
        Ok(report) => {
            eprint!("{}", report.text());
            if json {
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => {
                        eprintln!("kst bench web: {e}");
                        return 2;
                    }
                }
            }
            if report.all_answered() {
                0
            } else {
                eprintln!("kst bench web: some requests got no HTTP answer (see above)");
                1
            }
        }
        Err(e) => {
            eprintln!("kst bench web: {e:#}");
            2
        }
    }
}

async fn run_inner(cmd: BenchCommand, config: Option<&Path>) -> anyhow::Result<bool> {
    let load = match &cmd {
        BenchCommand::Lmtp(a) => &a.load,
        BenchCommand::Pipe(a) => a,
        BenchCommand::Web(_) => bail!("kst bench web runs on its own"),
    };
    if load.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let spec = LoadSpec {
        domain: load.domain.clone(),
        mta: load.mta.clone(),
        publications: load.publications,
        retrievals: load.retrievals,
    };
    let bar = bar(load.quiet, load.publications, "making keys");
    let (publications, retrievals) = {
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || messages::build(&spec, || bar.inc(1)))
            .await
            .context("the key generation task failed")??
    };
    bar.finish_and_clear();
    if let BenchCommand::Lmtp(LmtpArgs {
        pending_out: Some(path),
        ..
    }) = &cmd
    {
        write_pending(path, &publications, &retrievals)?;
    }
    let mut all_decided = true;
    for (phase, msgs) in [("publication", publications), ("retrieval", retrievals)] {
        if msgs.is_empty() {
            continue;
        }
        let report = match &cmd {
            BenchCommand::Lmtp(a) => lmtp_phase(a, phase, msgs).await?,
            BenchCommand::Pipe(a) => pipe_phase(a, config, phase, msgs).await?,
            BenchCommand::Web(_) => bail!("kst bench web runs on its own"),
        };
        eprint!("{}", report.text());
        if load.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        all_decided &= report.decided == report.messages;
    }
    Ok(all_decided)
}

/// `--pending-out`: one JSON line per message, `{"phase", "index", "pending"}`.
fn write_pending(
    path: &Path,
    publications: &[Message],
    retrievals: &[Message],
) -> anyhow::Result<()> {
    let mut out = String::new();
    for (phase, msgs) in [("publication", publications), ("retrieval", retrievals)] {
        for (index, m) in msgs.iter().enumerate() {
            let line = serde_json::json!({ "phase": phase, "index": index, "pending": m.pending });
            out.push_str(&line.to_string());
            out.push('\n');
        }
    }
    std::fs::write(path, out)
        .with_context(|| format!("cannot write --pending-out {}", path.display()))
}

fn bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

async fn lmtp_phase(a: &LmtpArgs, phase: &str, msgs: Vec<Message>) -> anyhow::Result<Report> {
    let prepared: Arc<Vec<lmtp::Prepared>> =
        Arc::new(msgs.iter().map(lmtp::Prepared::new).collect());
    drop(msgs);
    let before = match &a.metrics {
        Some(m) => Some(report::duration_buckets(&scrape(m).await?)),
        None => None,
    };
    let bar = bar(a.load.quiet, prepared.len(), phase);
    let addrs: Vec<String> = a
        .connect
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let retry = (a.retry_temporary > 0).then(|| Duration::from_secs(a.retry_temporary));
    phase_hook(a.phase_hook.as_deref(), phase, "start").await?;
    let (samples, elapsed) =
        lmtp::run(&addrs, a.load.concurrency, prepared, bar.clone(), retry).await?;
    phase_hook(a.phase_hook.as_deref(), phase, "end").await?;
    bar.finish_and_clear();
    let mut report = Report::new(phase, "lmtp", a.load.concurrency, samples, elapsed);
    if let (Some(m), Some(before)) = (&a.metrics, before) {
        let after = report::duration_buckets(&scrape(m).await?);
        report.server_p99_ms = report::quantile_between(&before, &after, 0.99);
    }
    Ok(report)
}

/// Runs `--phase-hook` (if given) for `edge` (start, end) of `phase`.
async fn phase_hook(cmd: Option<&str>, phase: &str, edge: &str) -> anyhow::Result<()> {
    let Some(cmd) = cmd else { return Ok(()) };
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("KST_BENCH_PHASE", phase)
        .env("KST_BENCH_EDGE", edge)
        .status()
        .await
        .with_context(|| format!("cannot run --phase-hook {cmd:?}"))?;
    if !status.success() {
        bail!("--phase-hook {cmd:?} failed at the {edge} of the {phase}s: {status}");
    }
    Ok(())
}

async fn pipe_phase(
    a: &LoadArgs,
    config: Option<&Path>,
    phase: &str,
    msgs: Vec<Message>,
) -> anyhow::Result<Report> {
    let kst = std::env::current_exe().context("cannot find the kst executable")?;
    let bar = bar(a.quiet, msgs.len(), phase);
    let (samples, elapsed): (Vec<Sample>, Duration) =
        pipe::run(&kst, config, a.concurrency, Arc::new(msgs), bar.clone()).await?;
    bar.finish_and_clear();
    Ok(Report::new(phase, "pipe", a.concurrency, samples, elapsed))
}

/// GET /metrics from `addr` (`host:port`, optionally with `http://` and a path).
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let rest = addr.strip_prefix("http://").unwrap_or(addr);
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/metrics".to_string()),
    };
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("cannot connect to {host} for /metrics (--metrics)"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut page = String::new();
    s.read_to_string(&mut page).await?;
    Ok(page)
}
