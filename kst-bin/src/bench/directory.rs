//! The key directory at scale (issue 18, "Measured"): proof sizes, server-side generation
//! times and client-side verification times at 10^3 to 10^6 entries, for `kst-directory-bench`
//! (`kst-bin/src/bin/kst-directory-bench.rs`; docs/BENCHMARKS.md, "Key transparency at 10^6
//! entries").
//!
//! Filling: one domain's directory grows through the path the server's writer takes:
//! [`KeyDirectory::publish`] over [`StoredDirectory`] on a real [`DirectoryStore`] (akd's node
//! cache dropped and the epoch pinned before every epoch, as `DomainLog`'s writer does). Each
//! size is reached in *bulk* epochs of up to `epoch_size` new addresses, then ten *tail*
//! epochs of `tail_epoch_size` (by default 512, the most the writer records in one epoch),
//! each also publishing the next version of a probe address. The values are real kst entries
//! ([`DirectoryEntry::for_record`]) of synthetic records: a fingerprint and key bytes made from
//! the address's number (the tree only sees the entry's hidden commitment, so real keys would
//! change no size or time here).
//!
//! Measuring, at each size, through a [`DomainLog`] on the same store (what `kst serve`'s
//! HTTP endpoint and version 3 replies call): lookup answers of stored addresses (present) and
//! of unknown ones (absent), history answers of an address with 1 and with 10 versions, the
//! append-only proof over the last 1 and 10 (tail) epochs and over the last bulk epoch, and the
//! version 3 reply's log block. Every proof is verified the way a client does (parsed from its
//! text, head signature, proof, and the served key against the entry); a proof that does not
//! verify stops the run with an error, so the figures are only ever of proofs that verify.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use kst_core::reply::fold_log_answer;
use kst_core::store::{Expected, KeyRecord, NewKey};
use kst_core::transparency::answer::{
    AnswerProof, AppendOnlyFrom, HTTP_STEP_BUDGET, LogAnswer, REPLY_STEP_BUDGET, Served,
};
use kst_core::transparency::history::HistoryAnswer;
use kst_core::transparency::self_check;
use kst_core::transparency::storage::RecordBatch;
use kst_core::transparency::verify::verify_append_only_from;
use kst_core::transparency::{
    DirectoryEntry, DirectoryStore, DirectoryStoreError, DomainLog, Head, HeadSigner, KeyDirectory,
    LogKeys, StoredDirectory, VrfSecret, wire,
};
use kst_core::{Address, AddressPolicy, Fingerprint};

/// The domain the bench's directory serves.
pub const DOMAIN: &str = "bench.test";

/// Tail epochs per size (the append-only proofs over 1 and 10 epochs span them).
const TAIL_EPOCHS: u64 = 10;

/// What to measure and the guards.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sizes (numbers of addresses) to measure at, ascending.
    pub sizes: Vec<u64>,
    /// Most new addresses in one bulk epoch.
    pub epoch_size: u64,
    /// New addresses in each of the ten tail epochs before a size (less for small sizes).
    pub tail_epoch_size: u64,
    /// Addresses sampled per measurement (distinct proofs generated).
    pub samples: usize,
    /// Verifications timed per measurement (the samples' proofs, round robin).
    pub verifications: usize,
    /// Most seconds spent generating, and then verifying, each append-only proof (these take
    /// long at large sizes; at least one of each is timed).
    pub audit_seconds: f64,
    /// Stop filling when the file system holding this path has less free space.
    pub disk_path: PathBuf,
    /// The free space (bytes) below which filling stops.
    pub min_free_disk: u64,
    /// Stop filling when the free space on `disk_path` fell by more than this since the start
    /// (bytes; the bench's own use, roughly: others write too).
    pub max_used_disk: u64,
    /// The available memory (bytes, `MemAvailable`) below which filling stops.
    pub min_free_ram: u64,
    /// Print each epoch and phase on stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sizes: vec![1_000, 10_000, 100_000, 1_000_000],
            epoch_size: 10_000,
            tail_epoch_size: 512,
            samples: 1000,
            verifications: 1000,
            audit_seconds: 20.0,
            disk_path: PathBuf::from("/"),
            min_free_disk: 15 << 30,
            max_used_disk: 15 << 30,
            min_free_ram: 2 << 30,
            progress: false,
        }
    }
}

/// p50 and p99 of a series of timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How many were timed.
    pub n: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile (nearest rank).
    pub p99: Duration,
}

impl Timing {
    /// The percentiles of `samples` (empty: zeros).
    pub fn of(mut samples: Vec<Duration>) -> Timing {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                Duration::ZERO
            } else {
                let rank = (q * samples.len() as f64).ceil() as usize;
                samples[rank.clamp(1, samples.len()) - 1]
            }
        };
        Timing {
            n: samples.len(),
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

/// One measured kind of proof (or answer) at one size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measure {
    /// What: `lookup`, `absence`, `lookup-self-check`, `absence-self-check` (the server's
    /// check of its own answer, timed in `verify`), `history-1`, `history-1-self-check`,
    /// `history-10`, `history-10-self-check`, `audit-1`, `audit-1-self-check` (the server's
    /// check of an answer's append-only part), `audit-10`, `audit-10-self-check`,
    /// `audit-bulk`, `v3-found-block`, `v3-not-found-block`, `catch-up-...`.
    pub what: String,
    /// Median size in bytes (of the proof, or of the whole block).
    pub bytes_p50: usize,
    /// Largest size seen.
    pub bytes_max: usize,
    /// Bytes of VRF proofs in it (80 each), where the proof carries any.
    pub vrf_bytes: Option<usize>,
    /// The whole answer text carrying the proof (median), where there is one.
    pub answer_bytes: Option<usize>,
    /// Server-side generation (the `DomainLog` call, with encoding).
    pub generate: Option<Timing>,
    /// Client-side verification (single thread).
    pub verify: Option<Timing>,
}

impl Measure {
    /// A measure of proofs of `sizes` bytes (with `vrf` bytes of VRF proofs) in answers of
    /// `texts` bytes, generated and verified in the times given.
    fn timed(
        what: &str,
        sizes: &[usize],
        vrf: usize,
        texts: &[usize],
        generate: Vec<Duration>,
        verify: Vec<Duration>,
    ) -> Measure {
        Measure {
            what: what.into(),
            bytes_p50: p50(sizes),
            bytes_max: max(sizes),
            vrf_bytes: Some(vrf),
            answer_bytes: Some(p50(texts)),
            generate: Some(Timing::of(generate)),
            verify: Some(Timing::of(verify)),
        }
    }
}

/// How a size was reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Fill {
    /// Bulk epochs written for this size.
    pub bulk_epochs: usize,
    /// New addresses in the largest bulk epoch.
    pub bulk_epoch_size: u64,
    /// Median time of a bulk epoch.
    pub bulk_epoch_p50: Duration,
    /// New addresses per second at the median bulk epoch.
    pub bulk_rate: f64,
    /// New addresses in each tail epoch (plus the probe's next version).
    pub tail_epoch_size: u64,
    /// Median time of a tail epoch.
    pub tail_epoch_p50: Duration,
}

/// Everything measured at one size.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeReport {
    /// Addresses in the directory (not counting the probe addresses, one per size).
    pub entries: u64,
    /// The latest epoch.
    pub epoch: u64,
    /// How this size was reached.
    pub fill: Fill,
    /// The measurements.
    pub measures: Vec<Measure>,
    /// The process's resident set after measuring (KiB, `VmRSS`).
    pub rss_kib: u64,
    /// Its peak so far (KiB, `VmHWM`).
    pub rss_peak_kib: u64,
    /// Free space on `disk_path` after filling (bytes).
    pub disk_free: u64,
}

/// A whole run on one store.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The store's name (`fs`, `postgres`, `memory`).
    pub store: String,
    /// One per size reached.
    pub sizes: Vec<SizeReport>,
    /// Why filling stopped before the last size asked for, if it did.
    pub stopped: Option<String>,
}

/// A synthetic record: version `version` of `address`, with key bytes and a fingerprint made
/// from `n`.
pub fn record(address: &Address, n: u64, version: u64) -> anyhow::Result<KeyRecord> {
    Ok(NewKey {
        address: address.clone(),
        key: synthetic_key(n),
        fingerprint: Fingerprint::parse(&format!("{n:040X}"))
            .map_err(|e| anyhow::anyhow!("synthetic fingerprint {n}: {e}"))?,
        publication_id: format!("{n:032x}"),
        published_at: 1_764_806_400 + n % 1_000_000,
        revoked: false,
        expected: Expected::Any,
    }
    .into_record(version))
}

/// The key bytes of synthetic record `n` (only their hash is committed).
pub fn synthetic_key(n: u64) -> Vec<u8> {
    format!("kst-directory-bench synthetic key {n}").into_bytes()
}

/// Address number `i` of the fill.
pub fn address(i: u64) -> anyhow::Result<Address> {
    named(&format!("u{i}"))
}

/// The entries of fill addresses `from..to` (version 1 each): the changes of a bulk epoch
/// (also the tests' busy epochs, kst-bin tests/directory_*.rs).
pub fn fill_changes(from: u64, to: u64) -> anyhow::Result<Vec<(Address, DirectoryEntry)>> {
    (from..to)
        .map(|i| {
            let address = address(i)?;
            let entry = DirectoryEntry::for_record(&record(&address, i, 1)?);
            Ok((address, entry))
        })
        .collect()
}

/// The probe address of size `size` (10 versions).
fn probe(size: u64) -> anyhow::Result<Address> {
    named(&format!("probe{size}"))
}

/// The synthetic record number of the probe of `size` at `version`.
fn probe_n(size: u64, version: u64) -> u64 {
    (1 << 62) + size * 16 + version
}

fn named(local: &str) -> anyhow::Result<Address> {
    AddressPolicy::default()
        .normalize(&format!("{local}@{DOMAIN}"))
        .map_err(|e| anyhow::anyhow!("bench address {local}: {e}"))
}

/// A deterministic spread of sample numbers below `below`.
fn spread(k: u64, below: u64) -> u64 {
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % below.max(1)
}

/// `VmRSS` and `VmHWM` of this process, KiB (zeros where `/proc` is missing).
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `MemAvailable` in bytes (`u64::MAX` where `/proc` is missing).
fn ram_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

/// Free bytes on the file system holding `path`, from `df` (`u64::MAX` if it cannot say).
pub fn disk_free(path: &std::path::Path) -> u64 {
    std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
        })
        .unwrap_or(u64::MAX)
}

fn now() -> u64 {
    kst_core::time::unix_now()
}

/// The bench's state between sizes.
struct Bench<'a> {
    opts: &'a Options,
    db: StoredDirectory<dyn DirectoryStore>,
    directory: KeyDirectory<StoredDirectory<dyn DirectoryStore>>,
    log: DomainLog,
    head_key: [u8; 32],
    vrf_key: [u8; 32],
    /// The root of every epoch, by epoch.
    roots: Vec<[u8; 32]>,
    /// Fill addresses so far (numbered 0..filled).
    filled: u64,
    /// Free space on `disk_path` at the start.
    disk_at_start: u64,
}

/// Fills `store`'s directory of [`DOMAIN`] to each of `opts.sizes` in turn and measures at
/// each; the store should hold no directory of that domain yet. Stops filling early (and says
/// why in [`Report::stopped`]) when disk or memory runs short. Fails on any error of the
/// directory and on any proof that does not verify.
pub async fn run(
    store: Arc<dyn DirectoryStore>,
    name: &str,
    opts: &Options,
) -> anyhow::Result<Report> {
    if opts.sizes.windows(2).any(|w| w[0] >= w[1]) || opts.sizes.first() == Some(&0) {
        bail!("the sizes must be ascending and above 0");
    }
    if opts.epoch_size == 0 || opts.tail_epoch_size == 0 || opts.samples == 0 {
        bail!("the epoch sizes and the sample count must be at least 1");
    }
    let vrf = VrfSecret::generate();
    let signer = HeadSigner::generate();
    let head_key = signer.public_key();
    let db = StoredDirectory::new(Arc::clone(&store), DOMAIN);
    let directory = KeyDirectory::open_cached(db.clone(), vrf.clone())
        .await
        .context("open the directory")?;
    let log = DomainLog::open(
        Arc::clone(&store),
        LogKeys {
            domain: DOMAIN.to_string(),
            head: signer,
            vrf: vrf.clone(),
        },
    )
    .await
    .context("open the domain's log")?;
    let (epoch, root) = directory.current().await?;
    if epoch != 0 {
        bail!("the store already holds a directory of {DOMAIN} (epoch {epoch}): use a fresh one");
    }
    let mut bench = Bench {
        opts,
        db,
        directory,
        log,
        head_key,
        vrf_key: vrf.public_key()?,
        roots: vec![root],
        filled: 0,
        disk_at_start: disk_free(&opts.disk_path),
    };
    let mut report = Report {
        store: name.to_string(),
        sizes: Vec::new(),
        stopped: None,
    };
    for &size in &opts.sizes {
        match bench.fill_to(size).await? {
            Ok(fill) => {
                let measures = bench.measure(size, &fill).await?;
                let (rss_kib, rss_peak_kib) = rss_kib();
                let done = SizeReport {
                    entries: size,
                    epoch: bench.latest(),
                    fill,
                    measures,
                    rss_kib,
                    rss_peak_kib,
                    disk_free: disk_free(&opts.disk_path),
                };
                if opts.progress {
                    eprintln!("{}", Report::row_text(name, &done));
                }
                report.sizes.push(done);
            }
            Err(why) => {
                report.stopped = Some(why);
                break;
            }
        }
    }
    Ok(report)
}

impl Bench<'_> {
    fn latest(&self) -> u64 {
        (self.roots.len() - 1) as u64
    }

    fn say(&self, what: impl FnOnce() -> String) {
        if self.opts.progress {
            eprintln!("[{}] {}", now(), what());
        }
    }

    /// Why filling must stop now, if it must.
    fn short_of_room(&self) -> Option<String> {
        let disk = disk_free(&self.opts.disk_path);
        if disk < self.opts.min_free_disk {
            return Some(format!(
                "stopped at {} addresses: {} has {} MB free, below the {} MB kept free",
                self.filled,
                self.opts.disk_path.display(),
                disk >> 20,
                self.opts.min_free_disk >> 20
            ));
        }
        let used = self.disk_at_start.saturating_sub(disk);
        if used > self.opts.max_used_disk {
            return Some(format!(
                "stopped at {} addresses: {} MB of {} used since the start, more than the {} MB \
                 allowed",
                self.filled,
                used >> 20,
                self.opts.disk_path.display(),
                self.opts.max_used_disk >> 20
            ));
        }
        let ram = ram_available();
        if ram < self.opts.min_free_ram {
            return Some(format!(
                "stopped at {} addresses: {} MB of memory available, below the {} MB kept free",
                self.filled,
                ram >> 20,
                self.opts.min_free_ram >> 20
            ));
        }
        None
    }

    /// Publishes one epoch the way the writer does: cache dropped, epoch pinned.
    async fn epoch(&mut self, changes: &[(Address, DirectoryEntry)]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.directory.forget().await;
        let (current, _) = self.directory.current().await?;
        if current != self.latest() {
            bail!(
                "the directory moved to epoch {current} under the bench (at {}): another writer?",
                self.latest()
            );
        }
        self.db.pin(Some(current));
        let published = self.directory.publish(changes).await;
        self.db.pin(None);
        let (epoch, root) = published?;
        if epoch != current + 1 {
            bail!("epoch {current} was followed by {epoch}");
        }
        self.roots.push(root);
        Ok(started.elapsed())
    }

    /// Adds addresses up to `size` (bulk epochs, then the tail epochs with the probe);
    /// `Ok(Err(why))` when disk or memory ran short first.
    async fn fill_to(&mut self, size: u64) -> anyhow::Result<Result<Fill, String>> {
        let new = size.saturating_sub(self.filled);
        let tail = self
            .opts
            .tail_epoch_size
            .min(new / (TAIL_EPOCHS + 1))
            .max(1);
        let bulk = new.saturating_sub(tail * TAIL_EPOCHS);
        let probe_address = probe(size)?;
        let mut bulk_times = Vec::new();
        let mut bulk_epoch_size = 0;
        let mut tail_times = Vec::new();
        let bulk_end = self.filled + bulk;
        while self.filled < bulk_end {
            if let Some(why) = self.short_of_room() {
                return Ok(Err(why));
            }
            let to = (self.filled + self.opts.epoch_size).min(bulk_end);
            let changes = fill_changes(self.filled, to)?;
            let took = self.epoch(&changes).await?;
            bulk_epoch_size = bulk_epoch_size.max(to - self.filled);
            self.filled = to;
            self.say(|| {
                format!(
                    "bulk epoch {}: {} addresses in {took:?}, {} in all",
                    self.latest(),
                    changes.len(),
                    self.filled
                )
            });
            bulk_times.push(took);
        }
        for version in 1..=TAIL_EPOCHS {
            if let Some(why) = self.short_of_room() {
                return Ok(Err(why));
            }
            let to = (self.filled + tail).min(size.max(self.filled));
            let mut changes = fill_changes(self.filled, to)?;
            let probe_record = record(&probe_address, probe_n(size, version), version)?;
            changes.push((
                probe_address.clone(),
                DirectoryEntry::for_record(&probe_record),
            ));
            let took = self.epoch(&changes).await?;
            self.filled = to;
            self.say(|| {
                format!(
                    "tail epoch {}: {} entries in {took:?}",
                    self.latest(),
                    changes.len()
                )
            });
            tail_times.push(took);
        }
        let bulk_epoch_p50 = Timing::of(bulk_times.clone()).p50;
        Ok(Ok(Fill {
            bulk_epochs: bulk_times.len(),
            bulk_epoch_size,
            bulk_epoch_p50,
            bulk_rate: if bulk_epoch_p50.is_zero() {
                0.0
            } else {
                bulk_epoch_size as f64 / bulk_epoch_p50.as_secs_f64()
            },
            tail_epoch_size: tail,
            tail_epoch_p50: Timing::of(tail_times).p50,
        }))
    }

    /// Every measurement at the current size.
    async fn measure(&self, size: u64, fill: &Fill) -> anyhow::Result<Vec<Measure>> {
        let mut out = Vec::new();
        let stored: Vec<u64> = (0..self.opts.samples as u64)
            .map(|k| spread(k, self.filled))
            .collect();
        let present = stored
            .iter()
            .map(|&i| Ok((address(i)?, Some(synthetic_key(i)))))
            .collect::<anyhow::Result<_>>()?;
        let (lookup, found_block, lookup_check, first) =
            self.lookups("lookup", "v3-found-block", present).await?;
        out.push(lookup);
        let absent = (0..self.opts.samples)
            .map(|k| Ok((named(&format!("absent{k}"))?, None)))
            .collect::<anyhow::Result<_>>()?;
        let (absence, not_found_block, absence_check, _) = self
            .lookups("absence", "v3-not-found-block", absent)
            .await?;
        out.push(absence);
        out.push(lookup_check);
        out.push(absence_check);
        out.push(found_block);
        out.push(not_found_block);
        let sample: Vec<(Address, u64)> = stored
            .iter()
            .map(|&i| Ok((address(i)?, 1)))
            .collect::<anyhow::Result<_>>()?;
        out.extend(self.histories("history-1", &sample).await?);
        let probe = vec![(probe(size)?, TAIL_EPOCHS); self.opts.samples.min(100)];
        out.extend(self.histories("history-10", &probe).await?);
        let latest = self.latest();
        out.extend(self.audit("audit-1", latest - 1, latest, &first).await?);
        out.extend(
            self.audit("audit-10", latest - TAIL_EPOCHS, latest, &first)
                .await?,
        );
        // The last bulk epoch ends where the tail begins (one from epoch 0 is left out: a
        // client checks nothing against the empty tree).
        let bulk_end = latest - TAIL_EPOCHS;
        if fill.bulk_epochs > 0 && bulk_end >= 2 {
            out.extend(
                self.audit("audit-bulk", bulk_end - 1, bulk_end, &first)
                    .await?,
            );
        }
        // A client ten tail epochs behind catching up in steps (`?since=&steps=1`, and inside
        // a version 3 reply), and one behind the last bulk epoch too.
        let (alice, alice_key) = (address(stored[0])?, synthetic_key(stored[0]));
        for (what, budget) in [
            ("catch-up-10 http", HTTP_STEP_BUDGET),
            ("catch-up-10 reply", REPLY_STEP_BUDGET),
        ] {
            out.extend(
                self.catch_up(what, latest - TAIL_EPOCHS, budget, &alice, &alice_key)
                    .await?,
            );
        }
        if fill.bulk_epochs > 0 && bulk_end >= 2 {
            out.extend(
                self.catch_up(
                    "catch-up-bulk http",
                    bulk_end - 1,
                    HTTP_STEP_BUDGET,
                    &alice,
                    &alice_key,
                )
                .await?,
            );
        }
        Ok(out)
    }

    /// A client that remembers the head of `from` catches up as `kst client` does: an answer
    /// with `?since=` bounded by `budget` (`DomainLog::answer_stepped`), each step verified
    /// (`verify_step`) and the next asked from its head, until the answer carries the rest
    /// (`verify_extends`) or says `too-far`. One measure per answer: `what from->to` (the
    /// proof's bytes, the answer's, the server's time and the client's check), or `what
    /// from too-far` (the server's time to refuse).
    async fn catch_up(
        &self,
        what: &str,
        from: u64,
        budget: kst_core::transparency::answer::StepBudget,
        address: &Address,
        key: &[u8],
    ) -> anyhow::Result<Vec<Measure>> {
        self.say(|| format!("{what} from epoch {from}"));
        let mut out = Vec::new();
        let mut remembered = Head {
            domain: DOMAIN.to_string(),
            epoch: from,
            root_hash: self.roots[from as usize],
            vrf_public_key: self.vrf_key,
            signed_at: 0,
        };
        for _ in 0..64 {
            let started = Instant::now();
            // A head asked for right after the answer: it waits while the directory's thread
            // works on the answer (`what from->to thread`: how long the answer held the thread
            // every other request and change of the domain needs).
            let (answer, held) = tokio::join!(
                self.log
                    .answer_stepped(address, Some(remembered.epoch), Some(budget), now()),
                async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let asked = Instant::now();
                    self.log.head(now()).await.map(|_| asked.elapsed())
                }
            );
            let answer = answer?;
            let held = held?;
            let text = answer.to_text()?;
            let generate = started.elapsed();
            let started = Instant::now();
            let answer = LogAnswer::parse(&text)?;
            answer
                .verify(&self.head_key, address, Served::Key(key))
                .await
                .with_context(|| format!("{what}: the lookup does not verify"))?;
            let proof_bytes = answer.append_only.as_ref().map_or(0, |a| a.proof.len());
            let (to, done) = match answer.verify_step(&self.head_key, &remembered).await {
                Ok(Some((head, _))) => (head.head, false),
                Ok(None) if answer.too_far.is_some() => {
                    out.push(Measure {
                        what: format!("{what} {} too-far", remembered.epoch),
                        bytes_p50: 0,
                        bytes_max: 0,
                        vrf_bytes: None,
                        answer_bytes: Some(text.len()),
                        generate: Some(Timing::of(vec![generate])),
                        verify: None,
                    });
                    return Ok(out);
                }
                Ok(None) => {
                    answer
                        .verify_extends(&remembered)
                        .await
                        .with_context(|| format!("{what}: the rest does not verify"))?;
                    (answer.head.head.clone(), true)
                }
                Err(e) => bail!("{what}: a step does not verify: {e}"),
            };
            out.push(Measure {
                what: format!("{what} {}->{}", remembered.epoch, to.epoch),
                bytes_p50: proof_bytes,
                bytes_max: proof_bytes,
                vrf_bytes: None,
                answer_bytes: Some(text.len()),
                generate: Some(Timing::of(vec![generate])),
                verify: Some(Timing::of(vec![started.elapsed()])),
            });
            out.push(Measure {
                what: format!("{what} {}->{} thread", remembered.epoch, to.epoch),
                bytes_p50: 0,
                bytes_max: 0,
                vrf_bytes: None,
                answer_bytes: None,
                generate: Some(Timing::of(vec![held])),
                verify: None,
            });
            if done {
                return Ok(out);
            }
            remembered = to;
        }
        bail!("{what}: more than 64 steps")
    }

    /// Lookup answers of `sample`: addresses with their key (stored, version 1: a lookup
    /// proof) or without (never stored: an absence proof). Returns the proofs' measure
    /// (`what`), the version 3 block's (`block`), the server's own check of each answer
    /// before serving it (`what-self-check`: `self_check::check`, part of the generation
    /// time already, timed here alone as `verify`), and one answer (for the append-only
    /// measurements).
    async fn lookups(
        &self,
        what: &str,
        block: &str,
        sample: Vec<(Address, Option<Vec<u8>>)>,
    ) -> anyhow::Result<(Measure, Measure, Measure, LogAnswer)> {
        self.say(|| what.to_string());
        let mut answers = Vec::new();
        let mut generate = Vec::new();
        for (address, key) in sample {
            let started = Instant::now();
            let answer = self.log.answer(&address, now()).await?;
            let text = answer.to_text()?;
            generate.push(started.elapsed());
            answers.push((address, key, answer, text));
        }
        if answers.is_empty() {
            bail!("no sample to measure {what} with");
        }
        let mut verify = Vec::new();
        for k in 0..self.opts.verifications.max(answers.len()) {
            let (address, key, _, text) = &answers[k % answers.len()];
            let served = key.as_deref().map_or(Served::Nothing, Served::Key);
            let started = Instant::now();
            let entry = LogAnswer::parse(text)?
                .verify(&self.head_key, address, served)
                .await
                .with_context(|| format!("the answer about {address} does not verify"))?;
            verify.push(started.elapsed());
            if entry.map(|e| e.version) != key.as_ref().map(|_| 1) {
                bail!("the answer about {address} verified, but not at the version stored");
            }
        }
        let mut checks = Vec::new();
        for k in 0..self.opts.verifications.max(answers.len()) {
            let (address, _, answer, _) = &answers[k % answers.len()];
            let started = Instant::now();
            self_check::check(answer, address)
                .await
                .with_context(|| format!("the answer about {address} fails the self-check"))?;
            checks.push(started.elapsed());
        }
        let mut sizes = Vec::new();
        let mut vrf = 0;
        for (address, key, answer, _) in &answers {
            match (&answer.proof, key) {
                (AnswerProof::Present(b), Some(_)) => {
                    let p = wire::decode_lookup(b)?;
                    vrf = p.existence_vrf_proof.len()
                        + p.marker_vrf_proof.len()
                        + p.freshness_vrf_proof.len();
                    sizes.push(b.len());
                }
                (AnswerProof::Absent(b), None) => {
                    vrf = 80;
                    sizes.push(b.len());
                }
                _ => bail!("the answer about {address} carries the wrong kind of proof"),
            }
        }
        let texts: Vec<usize> = answers.iter().map(|(.., t)| t.len()).collect();
        let blocks: Vec<usize> = answers
            .iter()
            .map(|(.., t)| fold_log_answer(t).len())
            .collect();
        let first = answers.swap_remove(0).2;
        Ok((
            Measure::timed(what, &sizes, vrf, &texts, generate, verify),
            Measure {
                what: block.into(),
                bytes_p50: p50(&blocks),
                bytes_max: max(&blocks),
                vrf_bytes: None,
                answer_bytes: None,
                generate: None,
                verify: None,
            },
            Measure {
                what: format!("{what}-self-check"),
                bytes_p50: p50(&sizes),
                bytes_max: max(&sizes),
                vrf_bytes: Some(vrf),
                answer_bytes: None,
                generate: None,
                verify: Some(Timing::of(checks)),
            },
            first,
        ))
    }

    /// History answers of `addresses`, each expected to have the given number of versions;
    /// then the server's own check of each answer before serving it (`what-self-check`:
    /// `self_check::check_history`, part of the generation time already, timed here alone as
    /// `verify`).
    async fn histories(
        &self,
        what: &str,
        addresses: &[(Address, u64)],
    ) -> anyhow::Result<[Measure; 2]> {
        self.say(|| what.to_string());
        let mut answers = Vec::new();
        let mut generate = Vec::new();
        for (address, versions) in addresses {
            let started = Instant::now();
            let Some(answer) = self.log.history(address, now()).await? else {
                bail!("{address} has no history in the directory");
            };
            let text = answer.to_text()?;
            generate.push(started.elapsed());
            answers.push((address, *versions, answer, text));
        }
        let mut verify = Vec::new();
        for k in 0..self.opts.verifications.max(answers.len()) {
            let (address, versions, _, text) = &answers[k % answers.len()];
            let started = Instant::now();
            let found = HistoryAnswer::parse(text)?
                .verify(&self.head_key, address)
                .with_context(|| format!("the history answer of {address} does not verify"))?;
            verify.push(started.elapsed());
            if found.len() as u64 != *versions {
                bail!(
                    "the history of {address} holds {} versions, not {versions}",
                    found.len()
                );
            }
        }
        let first = wire::decode_history(&answers[0].2.proof)?;
        let vrf: usize = first
            .update_proofs
            .iter()
            .map(|u| {
                u.existence_vrf_proof.len()
                    + u.previous_version_vrf_proof.as_ref().map_or(0, Vec::len)
            })
            .chain(first.past_marker_vrf_proofs.iter().map(Vec::len))
            .chain(first.future_marker_vrf_proofs.iter().map(Vec::len))
            .sum();
        let mut checks = Vec::new();
        for k in 0..self.opts.verifications.max(answers.len()) {
            let (address, _, answer, _) = &answers[k % answers.len()];
            let started = Instant::now();
            self_check::check_history(answer, &self.head_key, address)
                .with_context(|| format!("the history of {address} fails the self-check"))?;
            checks.push(started.elapsed());
        }
        let sizes: Vec<usize> = answers.iter().map(|(_, _, a, _)| a.proof.len()).collect();
        let texts: Vec<usize> = answers.iter().map(|(.., t)| t.len()).collect();
        Ok([
            Measure::timed(what, &sizes, vrf, &texts, generate, verify),
            Measure {
                what: format!("{what}-self-check"),
                bytes_p50: p50(&sizes),
                bytes_max: max(&sizes),
                vrf_bytes: Some(vrf),
                answer_bytes: None,
                generate: None,
                verify: Some(Timing::of(checks)),
            },
        ])
    }

    /// The append-only proof from `from` to `to` (the latest epoch): generated, then checked
    /// as a client that remembers the head of `from` checks a lookup answer carrying it; when
    /// `to` is the latest epoch, also the server's own check of that part of the answer
    /// before serving it (`what-self-check`: `self_check::check_append_only`, timed alone as
    /// `verify`).
    async fn audit(
        &self,
        what: &str,
        from: u64,
        to: u64,
        answer: &LogAnswer,
    ) -> anyhow::Result<Vec<Measure>> {
        self.say(|| what.to_string());
        let budget = Duration::from_secs_f64(self.opts.audit_seconds);
        let mut generate = Vec::new();
        let mut proof = Vec::new();
        let started_all = Instant::now();
        while generate.len() < self.opts.samples
            && (generate.is_empty() || started_all.elapsed() < budget)
        {
            let started = Instant::now();
            proof = wire::encode_audit(&self.log.audit(from, to).await?)?;
            generate.push(started.elapsed());
        }
        let root = |epoch: u64| {
            self.roots
                .get(epoch as usize)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("no root of epoch {epoch}"))
        };
        let head = |epoch: u64| -> anyhow::Result<Head> {
            Ok(Head {
                domain: DOMAIN.to_string(),
                epoch,
                root_hash: root(epoch)?,
                vrf_public_key: self.vrf_key,
                signed_at: 0,
            })
        };
        let (remembered, new) = (head(from)?, head(to)?);
        if proof.len() > wire::MAX_AUDIT_PROOF {
            // A client refuses it unread (and the server's `?since=` answers would carry it).
            self.say(|| format!("{what}: {} bytes, over the client's bound", proof.len()));
            return Ok(vec![Measure {
                what: what.into(),
                bytes_p50: proof.len(),
                bytes_max: proof.len(),
                vrf_bytes: None,
                answer_bytes: None,
                generate: Some(Timing::of(generate)),
                verify: None,
            }]);
        }
        // When `to` is the latest epoch: the lookup answer a client that remembers `from`
        // gets, checked as it checks it (parse, `verify_extends`); else what `verify_extends`
        // does with the proof (decode, derive the roots between, check every step).
        let carrying = if to == self.latest() {
            if answer.head.head.epoch != to || answer.head.head.root_hash != new.root_hash {
                bail!("the answer's head is not the latest epoch's");
            }
            let mut carrying = answer.clone();
            carrying.append_only = Some(AppendOnlyFrom {
                from,
                proof: proof.clone(),
                step: None,
            });
            Some(carrying)
        } else {
            None
        };
        let text = carrying.as_ref().map(LogAnswer::to_text).transpose()?;
        let mut verify = Vec::new();
        let started_all = Instant::now();
        while verify.len() < self.opts.verifications
            && (verify.is_empty() || started_all.elapsed() < budget)
        {
            let started = Instant::now();
            match &text {
                Some(text) => LogAnswer::parse(text)?.verify_extends(&remembered).await,
                None => {
                    verify_append_only_from(&remembered, &new, wire::decode_audit(&proof)?).await
                }
            }
            .with_context(|| format!("the append-only proof {from} -> {to} does not verify"))?;
            verify.push(started.elapsed());
        }
        let answer_bytes = text.map(|t| t.len());
        let mut out = vec![Measure {
            what: what.into(),
            bytes_p50: proof.len(),
            bytes_max: proof.len(),
            vrf_bytes: None,
            answer_bytes,
            generate: Some(Timing::of(generate)),
            verify: Some(Timing::of(verify)),
        }];
        if let Some(carrying) = carrying {
            let mut checks = Vec::new();
            let started_all = Instant::now();
            while checks.len() < self.opts.verifications
                && (checks.is_empty() || started_all.elapsed() < budget)
            {
                let started = Instant::now();
                self_check::check_append_only(&carrying, &self.head_key, &remembered)
                    .await
                    .with_context(|| {
                        format!("the append-only part {from} -> {to} fails the self-check")
                    })?;
                checks.push(started.elapsed());
            }
            out.push(Measure {
                what: format!("{what}-self-check"),
                bytes_p50: proof.len(),
                bytes_max: proof.len(),
                vrf_bytes: None,
                answer_bytes: None,
                generate: None,
                verify: Some(Timing::of(checks)),
            });
        }
        Ok(out)
    }
}

fn p50(sizes: &[usize]) -> usize {
    let mut s = sizes.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

fn max(sizes: &[usize]) -> usize {
    sizes.iter().copied().max().unwrap_or(0)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

impl Report {
    /// The fill table's header (Markdown).
    pub const FILL_HEADER: &'static str = "| store | entries | epoch | bulk epochs | bulk epoch size | bulk epoch p50 (s) | bulk entries/s | tail epoch size | tail epoch p50 (ms) | RSS (MiB) | peak RSS (MiB) | disk free (GB) |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

    /// The proof table's header (Markdown).
    pub const PROOF_HEADER: &'static str = "| store | entries | what | bytes p50 | bytes max | VRF bytes | answer bytes | generate p50 / p99 (ms) | n | verify p50 / p99 (ms) | n |\n|---|---|---|---|---|---|---|---|---|---|---|";

    fn row_text(store: &str, s: &SizeReport) -> String {
        let f = &s.fill;
        format!(
            "| {store} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {:.1} |",
            s.entries,
            s.epoch,
            f.bulk_epochs,
            f.bulk_epoch_size,
            f.bulk_epoch_p50.as_secs_f64(),
            f.bulk_rate,
            f.tail_epoch_size,
            ms(f.tail_epoch_p50),
            s.rss_kib / 1024,
            s.rss_peak_kib / 1024,
            s.disk_free as f64 / 1e9,
        )
    }

    /// The two tables (fill, then proofs) as Markdown, and the reason filling stopped early.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("{}\n", Self::FILL_HEADER);
        for s in &self.sizes {
            out.push_str(&Self::row_text(&self.store, s));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(Self::PROOF_HEADER);
        out.push('\n');
        let timing = |t: &Option<Timing>| match t {
            Some(t) => (format!("{} / {}", ms(t.p50), ms(t.p99)), t.n.to_string()),
            None => ("".into(), "".into()),
        };
        for s in &self.sizes {
            for m in &s.measures {
                let (g, gn) = timing(&m.generate);
                let (v, vn) = timing(&m.verify);
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {g} | {gn} | {v} | {vn} |\n",
                    self.store,
                    s.entries,
                    m.what,
                    m.bytes_p50,
                    m.bytes_max,
                    m.vrf_bytes.map_or(String::new(), |b| b.to_string()),
                    m.answer_bytes.map_or(String::new(), |b| b.to_string()),
                ));
            }
        }
        if let Some(why) = &self.stopped {
            out.push_str(&format!("\n{why}\n"));
        }
        out
    }
}

/// A directory store in memory (the `memory` column: the tree's cost without storage). The
/// same contract as the backends' (fence, insert-if-absent heads), one lock around it all.
#[derive(Default)]
pub struct MemoryDirectoryStore {
    domains: Mutex<HashMap<String, MemoryDomain>>,
}

#[derive(Default)]
struct MemoryDomain {
    root: Option<(u64, Vec<u8>)>,
    nodes: HashMap<Vec<u8>, Vec<u8>>,
    values: HashMap<Vec<u8>, Vec<(u64, Vec<u8>)>>,
    heads: std::collections::BTreeMap<u64, Vec<u8>>,
    /// (epoch, witness) → (checked at, cosignature).
    cosignatures: std::collections::BTreeMap<(u64, [u8; 32]), (u64, Vec<u8>)>,
}

impl MemoryDirectoryStore {
    fn with<T>(&self, domain: &str, f: impl FnOnce(&mut MemoryDomain) -> T) -> T {
        let mut domains = self.domains.lock().unwrap_or_else(PoisonError::into_inner);
        f(domains.entry(domain.to_string()).or_default())
    }
}

#[async_trait]
impl DirectoryStore for MemoryDirectoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn root(&self, domain: &str) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        Ok(self.with(domain, |d| d.root.clone()))
    }

    async fn nodes(
        &self,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        Ok(self.with(domain, |d| {
            keys.iter()
                .filter_map(|k| d.nodes.get(k).cloned())
                .collect()
        }))
    }

    async fn value_states(
        &self,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        Ok(self.with(domain, |d| d.values.get(label).cloned().unwrap_or_default()))
    }

    async fn commit(&self, domain: &str, batch: RecordBatch) -> Result<(), DirectoryStoreError> {
        self.with(domain, |d| {
            let stored = d.root.as_ref().map(|(e, _)| *e);
            if !batch.passes_fence(stored)? {
                return Ok(());
            }
            d.nodes.extend(batch.nodes);
            for vs in batch.value_states {
                let states = d.values.entry(vs.label).or_default();
                states.retain(|(e, _)| *e != vs.epoch);
                states.push((vs.epoch, vs.blob));
            }
            if let Some(r) = batch.root {
                d.root = Some((r.epoch, r.blob));
            }
            Ok(())
        })
    }

    async fn insert_head(
        &self,
        domain: &str,
        epoch: u64,
        head: &[u8],
    ) -> Result<Vec<u8>, DirectoryStoreError> {
        Ok(self.with(domain, |d| {
            d.heads
                .entry(epoch)
                .or_insert_with(|| head.to_vec())
                .clone()
        }))
    }

    async fn heads(
        &self,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        Ok(self.with(domain, |d| {
            d.heads
                .range(from..=to)
                .map(|(e, h)| (*e, h.clone()))
                .collect()
        }))
    }

    async fn put_cosignature(
        &self,
        domain: &str,
        epoch: u64,
        witness: &[u8; 32],
        checked_at: u64,
        cosignature: &[u8],
    ) -> Result<(), DirectoryStoreError> {
        self.with(domain, |d| {
            let slot = d.cosignatures.entry((epoch, *witness)).or_default();
            if slot.1.is_empty() || slot.0 <= checked_at {
                *slot = (checked_at, cosignature.to_vec());
            }
        });
        Ok(())
    }

    async fn cosignatures(
        &self,
        domain: &str,
        epoch: u64,
    ) -> Result<Vec<([u8; 32], Vec<u8>)>, DirectoryStoreError> {
        Ok(self.with(domain, |d| {
            d.cosignatures
                .range((epoch, [0; 32])..=(epoch, [0xff; 32]))
                .map(|((_, w), (_, c))| (*w, c.clone()))
                .collect()
        }))
    }

    async fn latest_cosignature(
        &self,
        domain: &str,
        witness: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, DirectoryStoreError> {
        Ok(self.with(domain, |d| {
            d.cosignatures
                .iter()
                .rev()
                .find(|((_, w), _)| w == witness)
                .map(|((e, _), (_, c))| (*e, c.clone()))
        }))
    }
}
