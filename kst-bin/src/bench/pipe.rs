//! Pipe mode: one `kst deliver` process per message, as Postfix's pipe(8) runs it, C at a time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::ProgressBar;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::messages::Message;
use super::report::{Outcome, Sample};

/// Runs `kst [--config FILE] deliver` once per message with at most `concurrency` at a time.
pub async fn run(
    kst: &Path,
    config: Option<&Path>,
    concurrency: usize,
    messages: Arc<Vec<Message>>,
    progress: ProgressBar,
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (next, messages, progress) = (next.clone(), messages.clone(), progress.clone());
        let kst: PathBuf = kst.to_path_buf();
        let config: Option<PathBuf> = config.map(Path::to_path_buf);
        tasks.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(m) = messages.get(i) else { break };
                let t = Instant::now();
                let outcome = deliver(&kst, config.as_deref(), m).await;
                samples.push(Sample {
                    latency: t.elapsed(),
                    outcome,
                    tries: 1,
                });
                progress.inc(1);
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(messages.len());
    while let Some(done) = tasks.join_next().await {
        samples.extend(done.context("a pipe task failed")?);
    }
    Ok((samples, started.elapsed()))
}

async fn deliver(kst: &Path, config: Option<&Path>, m: &Message) -> Outcome {
    let mut cmd = Command::new(kst);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args([
        "deliver",
        "--sender",
        &m.sender,
        "--recipient",
        &m.recipient,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("spawn: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A child that exits early (oversize mail) closes its end: not our failure.
        let _ = stdin.write_all(&m.raw).await;
    }
    match child.wait().await {
        Ok(s) => match s.code() {
            Some(0) => Outcome::Decided("exit 0".into()),
            Some(75) => Outcome::Deferred("exit 75".into()),
            Some(c) => Outcome::Failed(format!("exit {c}")),
            None => Outcome::Failed("killed".into()),
        },
        Err(e) => Outcome::Failed(format!("wait: {e}")),
    }
}
