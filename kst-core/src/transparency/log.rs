//! One served domain's log on the server: its directory over a [`DirectoryStore`], its head
//! key, and the one writer per domain and process.
//!
//! Writing (docs/TRANSPARENCY.md, "Write order, as built"): [`DomainLog::record`] makes the
//! directory say what the key store says about an address. The writer (the directory's
//! thread) reads the store itself, on every attempt, *after* reading the directory's epoch,
//! and pins that epoch ([`StoredDirectory::pin`]): the batch is committed only on that epoch,
//! else it is rebuilt from fresh reads. So a change is never recorded after a newer one, in
//! one process or across processes (a pool, `kst deliver` next to `kst serve`): whatever
//! another writer committed before the pinned epoch it read from the store earlier, and
//! whatever it commits after makes this batch conflict.
//!
//! Group commit: the requests that queue while an epoch is being written are recorded together
//! in the next one (one epoch, one entry per address: several changes of one address need one
//! entry, the store's current state read after they all happened). Each caller is answered once
//! the epoch holding its address is committed. Before an epoch, the writer waits a little for
//! the changes on their way ([`DomainLog::incoming`]: callers writing the key store, about to
//! ask), at most [`DomainLog::with_gather`]'s bound, so that under load an epoch holds more
//! changes and its fixed costs (the reads, the commit, the head) are paid by more of them.
//!
//! Heads (docs/TRANSPARENCY.md, "Signed heads, witnesses"): each epoch's head is signed once
//! and stored: by the writer with its commit (the batch carries it,
//! [`StoredDirectory::sign_heads`]), else right after it ([`DirectoryStore::insert_head`]),
//! and before it builds the next epoch on the current one unless it stored or checked that
//! head itself (so no epoch is superseded without its head, unless a writer dies between its
//! commit and its head while another one commits); a missing head of the latest epoch is
//! signed on first read, and one of an older epoch (a directory kept from before heads were
//! stored) is signed late with the root akd's append-only proof gives it
//! ([`super::backfill`]: on demand, and in the background for the logs `kst serve` serves).
//! Every head served (`/head`, lookups) is the stored one, so witnesses' cosignatures of it
//! match what clients see.
//!
//! The directory runs on a thread of its own (a current-thread Tokio runtime) and is asked
//! through a channel: rustc cannot prove akd's futures `Send` ("implementation of `Send` is
//! not general enough", rust-lang/rust#102211), and every caller here needs `Send` futures
//! (`#[async_trait]` key stores, axum handlers). The key store is read on the runtime that
//! opened the log (its connections live there).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::answer::{
    AnswerProof, AppendOnlyFrom, FIRST_STEP_MAX_ELEMENTS, LogAnswer, MAX_SINCE_EPOCHS,
    STEP_ELEMENT_BYTES, StepBudget, head_text, parse_head,
};
use super::backfill::{self, Backfill, Filler};
use super::directory::{KeyDirectory, LookupAnswer, ReadBudget};
use super::entry::{DirectoryEntry, EntryState};
use super::head::{Cosignature, Head, SignedHead};
use super::history::{HistoryAnswer, HistoryPage, PageAnswer};
use super::keys::LogKeys;
use super::self_check;
use super::storage::{DirectoryStore, DirectoryStoreError, StoredDirectory};
use super::witness::{AuditAnswer, MAX_AUDIT_EPOCHS, Witnessed};
use super::{Result, TransparencyError, wire};
use crate::Address;
use crate::store::{KeyRecord, KeyStore};

/// How often a batch refused by the fence is rebuilt on the newer epoch before the change is
/// reported as a temporary failure. Between attempts the writer waits a random while (up to
/// 10 ms times the attempt), so a slower writer is not starved by a faster one.
const MAX_ATTEMPTS: u64 = 32;

/// At most this many addresses are recorded in one epoch (one entry each); more wait for
/// the next. This also bounds the newest epoch's own append-only step, the one a client one
/// epoch behind asks for: at most 1024 inserted leaves, and about 4 000 elements (300 KB)
/// measured at 10⁶ entries (docs/BENCHMARKS.md), far inside every answer's budget
/// ([`super::answer::REPLY_STEP_BUDGET`]: 1 MiB, 16 384 leaves) and
/// [`FIRST_STEP_MAX_ELEMENTS`]. Only a directory written another way (akd's `publish` of a
/// larger batch directly) can hold a larger epoch; docs/TRANSPARENCY.md, "Catching up in
/// steps".
pub const MAX_BATCH: usize = 512;

/// The fewest bytes one element of an append-only proof takes encoded: akd's `AzksElement`
/// in its repeated field is 42 bytes and the label's significant bytes (0 to 32: a node near
/// the root has a short label); [`STEP_ELEMENT_BYTES`] is the most.
pub const MIN_ELEMENT_BYTES: usize = 42;

/// The most elements an append-only proof that a client or witness can accept may hold
/// ([`wire::MAX_AUDIT_PROOF`] at [`MIN_ELEMENT_BYTES`] each): a proof built in one piece (an
/// audit, a `?since=` answer without steps) is counted before it is built
/// ([`Worker::reach_back`]) and refused unbuilt when it holds more. One that holds fewer is
/// built and may still be larger than accepted (up to [`STEP_ELEMENT_BYTES`] /
/// [`MIN_ELEMENT_BYTES`] times it): it is refused then, never served; so no answer a client
/// accepts is refused, and no request makes the server build more than about 30 MB.
pub const MAX_PROOF_ELEMENTS: usize = wire::MAX_AUDIT_PROOF / MIN_ELEMENT_BYTES;

/// The most elements of the witnesses' part of an answer ([`DomainLog::witnessed`]): what
/// surely fits in [`wire::MAX_AUDIT_PROOF`] ([`STEP_ELEMENT_BYTES`] each). A witness whose
/// cosigned head is further back is left out of the part, before anything is built.
pub const MAX_WITNESSED_ELEMENTS: usize = wire::MAX_AUDIT_PROOF / STEP_ELEMENT_BYTES;

/// Reads (heads, lookups, histories, audits) that may wait for the directory's thread; one
/// more is refused at once as a temporary failure (HTTP 503), never queued without bound.
pub const MAX_QUEUED_READS: usize = 256;

/// Changes that may wait for the directory's thread (two epochs' worth); one more is a
/// temporary failure (LMTP 4xx, `kst deliver` exit 75: the MTA tries again).
pub const MAX_QUEUED_WRITES: usize = 2 * MAX_BATCH;

/// Reads the thread answers at least between two batches of changes (changes go first); more
/// while the reads took less time than the batch before them.
pub const READS_BETWEEN_WRITES: usize = 16;

/// The longest the writer waits, before an epoch, for changes on their way
/// ([`DomainLog::with_gather`]; `[transparency] gather_us`).
pub const DEFAULT_GATHER: std::time::Duration = std::time::Duration::from_micros(2_000);

/// The largest bound [`DomainLog::with_gather`] takes (`[transparency] gather_us` allows at
/// most 100 ms): every change of an epoch may wait this long.
pub const MAX_GATHER: std::time::Duration = std::time::Duration::from_secs(10);

/// Changes of one address that may wait for (or be in) the directory's thread at once; one
/// more is a temporary failure for that address alone. An authenticated account changes only
/// its own address, so one account cannot fill the queue ([`MAX_QUEUED_WRITES`]) and make
/// everyone else's changes fail: the changes of one address are recorded together anyway
/// (one entry per address and epoch), so more waiting would add nothing.
pub const MAX_QUEUED_PER_ADDRESS: usize = 16;

/// How far past the latest epoch the log looks for heads stored for epochs the directory
/// never committed ([`Worker::check_heads_ahead`]).
const AHEAD_WINDOW: u64 = 1024;

/// The budgets of a stepped answer ([`DomainLog::answer_stepped`]).
#[derive(Debug, Clone, Copy)]
struct Steps {
    /// What the answer's proof may hold: the caller's budget within the operator's limit.
    budget: StepBudget,
    /// What the step of the newest epoch alone may hold, for a client one epoch behind: the
    /// caller's budget, neither the first-step cap nor the operator's limit (one epoch is
    /// the smallest step there is; refusing it would leave that client nowhere to go).
    newest: StepBudget,
}

/// What the step planner last counted of the newest epoch's own step (the step from
/// `from` to `from + 1`, the latest epoch then): reused while the counting cap it was
/// counted with says enough, so repeated requests one epoch behind a large epoch cost one
/// walk of the tree per epoch, not one each.
#[derive(Debug, Clone, Copy)]
struct NewestStep {
    from: u64,
    /// The root of epoch `from + 1` it was counted on.
    root: [u8; 32],
    /// The cap it was counted with.
    cap: usize,
    /// Its size; `None` when over `cap`.
    count: Option<super::directory::StepCount>,
}

/// The range whose append-only proof [`Worker::reach_back`] counted last: from `from` to `to`
/// it holds at most `max_elements`, on the directory whose latest epoch and root were
/// `latest` when the count started (a later epoch, of any process, adds to the steps of
/// older ones: the count holds only while `latest` does).
#[derive(Clone, Copy)]
struct CountedRange {
    from: u64,
    to: u64,
    max_elements: usize,
    latest: (u64, [u8; 32]),
}

/// Where the writer reads what the key store holds for an address (again on every attempt).
#[async_trait]
pub trait CurrentKeys: Send + Sync {
    /// The current record of `address`; `None` when the store has no key for it.
    async fn current(&self, address: &Address) -> crate::Result<Option<KeyRecord>>;

    /// The current records of `addresses`, in the order asked, as [`CurrentKeys::current`]
    /// answers each: in one read where [`CurrentKeys::batches_reads`] says so (an epoch's
    /// addresses on PostgreSQL or Redis: one round trip instead of one each). This default
    /// reads them one after the other.
    async fn current_many(&self, addresses: &[Address]) -> crate::Result<Vec<Option<KeyRecord>>> {
        let mut records = Vec::with_capacity(addresses.len());
        for address in addresses {
            records.push(self.current(address).await?);
        }
        Ok(records)
    }

    /// Whether [`CurrentKeys::current_many`] reads many addresses in fewer round trips than
    /// a `current` each ([`KeyStore::batches_reads`]). When it does not, the writer reads an
    /// epoch's addresses one task each, concurrently.
    fn batches_reads(&self) -> bool {
        false
    }

    /// Every version of `address` the store holds, oldest first (read only when the
    /// directory lacks versions before the current one).
    async fn history(&self, address: &Address) -> crate::Result<Vec<KeyRecord>>;
}

/// A key store as the writer's source: its current record.
pub struct StoreKeys(pub Arc<dyn KeyStore>);

#[async_trait]
impl CurrentKeys for StoreKeys {
    async fn current(&self, address: &Address) -> crate::Result<Option<KeyRecord>> {
        self.0.get(address).await
    }

    async fn current_many(&self, addresses: &[Address]) -> crate::Result<Vec<Option<KeyRecord>>> {
        self.0.get_many(addresses).await
    }

    fn batches_reads(&self) -> bool {
        self.0.batches_reads()
    }

    async fn history(&self, address: &Address) -> crate::Result<Vec<KeyRecord>> {
        self.0.history(address).await
    }
}

/// A record the caller already holds ([`DomainLog::sync`]): its only version.
struct Fixed(Option<KeyRecord>);

#[async_trait]
impl CurrentKeys for Fixed {
    async fn current(&self, _: &Address) -> crate::Result<Option<KeyRecord>> {
        Ok(self.0.clone())
    }

    async fn history(&self, _: &Address) -> crate::Result<Vec<KeyRecord>> {
        Ok(self.0.iter().cloned().collect())
    }
}

/// The logs' threads still running in this process ([`wait_for_log_threads`]).
static LOG_THREADS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static LOG_THREAD_ENDED: std::sync::Condvar = std::sync::Condvar::new();

/// Counts one log thread from before it is spawned until it ends (its runtime, and the
/// backend's file work that runtime waits for, dropped first).
struct LogThread;

impl LogThread {
    fn start() -> LogThread {
        *LOG_THREADS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        LogThread
    }
}

impl Drop for LogThread {
    fn drop(&mut self) {
        let mut running = LOG_THREADS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *running = running.saturating_sub(1);
        LOG_THREAD_ENDED.notify_all();
    }
}

/// Waits, at most `timeout`, until the thread of every [`DomainLog`] this process opened and
/// dropped has ended; returns whether they all did. A log's thread ends once the log is
/// dropped and its runtime has finished the backend's work, which may go on after a commit
/// answered: kst-fs writes a journaled epoch's files after its frame is durable. A one-shot
/// command (`kst deliver`) calls this before it exits, so its process does not cut those
/// files short (the next reader would have to roll the epoch forward; before the head went
/// in ahead of the root, a cut could leave the epoch without its head, CI flake of
/// `rt18_a_back_dated_deletion_is_not_the_owners`). Logs still open are waited for too, so
/// call it once they are dropped.
pub fn wait_for_log_threads(timeout: std::time::Duration) -> bool {
    let running = LOG_THREADS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (running, _) = LOG_THREAD_ENDED
        .wait_timeout_while(running, timeout, |n| *n > 0)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *running == 0
}

/// One domain's log.
pub struct DomainLog {
    domain: String,
    head_key: [u8; 32],
    vrf_key: [u8; 32],
    /// Changes ([`Request::Sync`]), answered before reads.
    writes: mpsc::Sender<Request>,
    /// Everything else.
    reads: mpsc::Sender<Request>,
    store: Arc<dyn DirectoryStore>,
    /// Held while a cosignature is checked against the stored ones and stored.
    cosigning: tokio::sync::Mutex<()>,
    /// Changes waiting (or being recorded) per address ([`MAX_QUEUED_PER_ADDRESS`]).
    queued_per_address: std::sync::Mutex<std::collections::HashMap<Address, usize>>,
    /// The operator's bound on every stepped answer's budget (`[transparency] step_max_*`).
    step_limit: Option<StepBudget>,
    /// Tree nodes the step planner read, in all ([`DomainLog::step_reads`]).
    step_reads: Arc<std::sync::atomic::AtomicU64>,
    /// Epoch batches the store's fence refused ([`DomainLog::fenced`]).
    fenced: Arc<std::sync::atomic::AtomicU64>,
    /// Node reads refused as torn ([`DomainLog::torn_reads`]).
    torn: Arc<std::sync::atomic::AtomicU64>,
    /// Answers that failed the self-check ([`DomainLog::unverified`]).
    unverified: Arc<std::sync::atomic::AtomicU64>,
    /// Where the thread's time went ([`DomainLog::thread_shares`]).
    shares: Arc<ThreadShares>,
    /// The changes on their way to the writer, and how long it waits for them.
    gather: Arc<Gather>,
}

/// The changes on their way to the writer ([`DomainLog::incoming`]) and the longest it waits
/// for them before an epoch ([`DomainLog::with_gather`]).
#[derive(Debug)]
struct Gather {
    /// Callers counted by [`DomainLog::incoming`] that have not asked to be recorded yet.
    incoming: std::sync::atomic::AtomicUsize,
    /// The bound, µs; 0: the writer never waits.
    limit_us: std::sync::atomic::AtomicU64,
    /// Woken whenever a counted caller leaves the count.
    left: tokio::sync::Notify,
    /// The writer's time waiting for them (answering reads meanwhile), µs
    /// ([`DomainLog::gathering`]).
    waited_us: std::sync::atomic::AtomicU64,
}

impl Gather {
    fn new() -> Self {
        Gather {
            incoming: std::sync::atomic::AtomicUsize::new(0),
            limit_us: std::sync::atomic::AtomicU64::new(
                u64::try_from(DEFAULT_GATHER.as_micros()).unwrap_or(u64::MAX),
            ),
            left: tokio::sync::Notify::new(),
            waited_us: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn incoming(&self) -> usize {
        self.incoming.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Before an epoch of `syncs`: while changes are on their way ([`DomainLog::incoming`])
    /// and the batch is not full, takes what arrives on `inbox`, for at most the bound; then
    /// whatever queued meanwhile. Other requests met go to `others`. The thread is idle
    /// meanwhile, so `worker` answers the reads queued on `reads` (changes first): a wait,
    /// which a stream of changes can make every epoch's, holds no lookup, head or audit back.
    /// A read begun before the bound may end after it: the epoch waits for that one read.
    async fn wait(
        &self,
        inbox: &mut mpsc::Receiver<Request>,
        reads: &mut mpsc::Receiver<Request>,
        worker: &mut Worker,
        syncs: &mut Vec<SyncRequest>,
        others: &mut Vec<Request>,
    ) {
        let limit = self.limit_us.load(std::sync::atomic::Ordering::Relaxed);
        if limit == 0 || self.incoming() == 0 || syncs.len() >= MAX_BATCH {
            return;
        }
        let started = tokio::time::Instant::now();
        let deadline = started + std::time::Duration::from_micros(limit);
        while syncs.len() < MAX_BATCH && self.incoming() > 0 {
            tokio::select! {
                biased;
                request = inbox.recv() => match request {
                    Some(Request::Sync(s)) => syncs.push(s),
                    Some(other) => others.push(other),
                    None => break,
                },
                () = self.left.notified() => {}
                () = tokio::time::sleep_until(deadline) => break,
                Some(read) = reads.recv() => worker.handle(read).await,
            }
        }
        while syncs.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(Request::Sync(s)) => syncs.push(s),
                Ok(other) => others.push(other),
                Err(_) => break,
            }
        }
        self.waited_us.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// A change on its way to a log's writer ([`DomainLog::incoming`]): counted from before its
/// caller writes the key store until it asks to be recorded ([`DomainLog::record_incoming`])
/// or is dropped (the write failed), so the writer can wait for it before an epoch.
pub struct IncomingChange {
    gather: Arc<Gather>,
}

impl Drop for IncomingChange {
    fn drop(&mut self) {
        self.gather
            .incoming
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.gather.left.notify_one();
    }
}

/// The time the directory's thread spent writing epochs, and answering the reads it serves
/// between two epochs, in µs since the log was opened ([`DomainLog::thread_shares`]).
#[derive(Debug, Default)]
struct ThreadShares {
    writes_us: std::sync::atomic::AtomicU64,
    reads_between_us: std::sync::atomic::AtomicU64,
}

/// One change of an address counted in [`DomainLog::queued_per_address`] until it is
/// answered (or its caller gives up).
struct QueuedChange<'a> {
    counts: &'a std::sync::Mutex<std::collections::HashMap<Address, usize>>,
    address: Address,
}

impl Drop for QueuedChange<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

impl std::fmt::Debug for DomainLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainLog")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What [`DomainLog::record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The directory already said this; nothing was written.
    AlreadyRecorded,
    /// A new epoch records the entry.
    Recorded {
        /// The epoch.
        epoch: u64,
        /// Its root hash.
        root_hash: [u8; 32],
        /// The entry recorded.
        entry: DirectoryEntry,
    },
}

/// One caller's request to record an address.
struct SyncRequest {
    address: Address,
    source: Arc<dyn CurrentKeys>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
    reply: oneshot::Sender<Result<Synced>>,
}

/// A history proof as the directory's thread built it ([`Request::History`]).
struct BuiltHistory {
    /// The proof against a signed head (an older page's proof, when one was asked for).
    answer: HistoryAnswer,
    /// Whether the address's newest version holds no key (a deletion, or no kst entry).
    newest_finds_no_key: bool,
}

/// A request to the directory's thread, with where its answer goes.
enum Request {
    Sync(SyncRequest),
    Entries {
        address: Address,
        reply: oneshot::Sender<Result<Vec<(u64, DirectoryEntry)>>>,
    },
    Head {
        now: u64,
        reply: oneshot::Sender<Result<SignedHead>>,
    },
    HeadAt {
        epoch: u64,
        now: u64,
        reply: oneshot::Sender<Result<Option<SignedHead>>>,
    },
    Answer {
        address: Address,
        since: Option<u64>,
        /// Steps within this budget instead of one proof ([`DomainLog::answer_stepped`]).
        steps: Option<Steps>,
        now: u64,
        /// Built from fresh reads: akd's node cache dropped first (the answer built before
        /// did not verify).
        fresh: bool,
        reply: oneshot::Sender<Result<LogAnswer>>,
    },
    History {
        address: Address,
        /// A page of the versions below this one ([`HistoryPage`]).
        before: Option<u64>,
        now: u64,
        reply: oneshot::Sender<Result<Option<BuiltHistory>>>,
    },
    Audit {
        from: u64,
        to: u64,
        /// Built from fresh reads: akd's node cache dropped first (the answer built before
        /// did not verify, [`DomainLog::audit_answer`]).
        fresh: bool,
        reply: oneshot::Sender<Result<akd::AppendOnlyProof>>,
    },
    /// The oldest epoch, not before `lowest`, from which an append-only proof to `to` holds
    /// at most `max_elements` ([`Worker::reach_back`]).
    Reach {
        lowest: u64,
        to: u64,
        max_elements: usize,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Heads for the epochs of a range that have none ([`backfill::fill`]).
    FillHeads {
        from: u64,
        to: u64,
        now: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Starts the background backfill of missing heads.
    StartBackfill,
}

/// The directory and the head key, owned by the directory's thread. The directory is opened
/// by the first request that finds it closed (a store that is down at start: every request
/// fails as a temporary error until it is back).
struct Worker {
    keys: Arc<LogKeys>,
    /// The runtime that opened the log: key store reads run there.
    caller: tokio::runtime::Handle,
    /// The directory once opened.
    opened: Option<Opened>,
    store: Arc<dyn DirectoryStore>,
    /// The newest epoch (with its root) whose stored head this writer stored or checked:
    /// heads are never replaced, so it is not read again before the next epoch is built.
    head_known: std::cell::Cell<Option<(u64, [u8; 32])>>,
    /// The epoch (with its root) this writer committed last, while its next attempt may
    /// build on it without asking the store whether another process committed since
    /// ([`Worker::round`]); cleared by any failed attempt.
    own_commit: std::cell::Cell<Option<(u64, [u8; 32])>>,
    /// Where the background backfill of missing heads stands.
    backfill: Backfill,
    /// The first epoch after the latest that has a stored head although the directory never
    /// committed it ([`Worker::check_heads_ahead`]): the writer builds no epoch up to it.
    ahead: std::cell::Cell<Option<u64>>,
    /// Tree nodes the step planner read ([`DomainLog::step_reads`]).
    step_reads: Arc<std::sync::atomic::AtomicU64>,
    /// Epoch batches the store's fence refused ([`DomainLog::fenced`]).
    fenced: Arc<std::sync::atomic::AtomicU64>,
    /// Node reads refused as torn ([`DomainLog::torn_reads`]).
    torn: Arc<std::sync::atomic::AtomicU64>,
    /// Answers that failed the self-check ([`DomainLog::unverified`]).
    unverified: Arc<std::sync::atomic::AtomicU64>,
    /// The newest epoch's own step, as last counted.
    newest_step: std::cell::Cell<Option<NewestStep>>,
    /// The range whose append-only proof was counted last ([`Worker::counted_already`]).
    counted: std::cell::Cell<Option<CountedRange>>,
    /// After a failed open: until when requests fail with its error ([`Worker::open`]).
    open_backoff: OpenBackoff,
}

/// The pause after a failed attempt to open the directory ([`Worker::open`]): short, so a
/// store that is back is used again within it (a longer one, doubling to 4 s, made requests
/// fail for seconds after the database returned).
pub const OPEN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);

/// The last failed attempt to open the directory, while it is remembered.
#[derive(Default)]
struct OpenBackoff {
    /// Its error, and until when requests fail with it without another attempt.
    failed: Option<(TransparencyError, std::time::Instant)>,
}

/// An open directory.
struct Opened {
    /// The storage akd writes through (shares the pin with the directory's copy).
    db: StoredDirectory<dyn DirectoryStore>,
    directory: KeyDirectory<StoredDirectory<dyn DirectoryStore>>,
}

/// The requests of one epoch for one address.
struct Pending {
    source: Arc<dyn CurrentKeys>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
    replies: Vec<oneshot::Sender<Result<Synced>>>,
    recorded: Synced,
}

/// The reads of the store's current records that [`Worker::read_current`] started, each
/// with the positions (in the pending addresses' order) of the records it answers.
struct CurrentReads {
    count: usize,
    tasks: Vec<(Vec<usize>, CurrentRead)>,
}

/// The addresses of one source that batches reads, and their positions among the pending.
type SourceBatch<'a> = (&'a Arc<dyn CurrentKeys>, Vec<usize>, Vec<Address>);

/// One read of [`CurrentReads`]: the records of its addresses, in their order.
type CurrentRead = tokio::task::JoinHandle<crate::Result<Vec<Option<KeyRecord>>>>;

impl CurrentReads {
    /// Every pending address's current record, in the pending addresses' order; the first
    /// read that failed is the error.
    async fn collect(self) -> Result<Vec<Option<KeyRecord>>> {
        let mut records = vec![None; self.count];
        for (at, task) in self.tasks {
            let read = task
                .await
                .map_err(|e| {
                    TransparencyError::Directory(format!("the key store read stopped: {e}"))
                })?
                .map_err(|e| {
                    TransparencyError::Directory(format!("cannot read the key store: {e}"))
                })?;
            if read.len() != at.len() {
                return Err(TransparencyError::Directory(format!(
                    "the key store answered {} records for {} addresses",
                    read.len(),
                    at.len()
                )));
            }
            for (i, record) in at.into_iter().zip(read) {
                records[i] = record;
            }
        }
        Ok(records)
    }
}

/// What the writer records for one address in the next epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The directory says what the store says.
    Nothing,
    /// This entry, and the address is done.
    Record(DirectoryEntry),
    /// The store's record of this version first (the store accepted versions the directory
    /// has not recorded yet: they are recorded one epoch each, oldest first), then again.
    Fill(u64),
    /// This deletion first, then the store's key in a later epoch: the store holds a key
    /// whose version is not above the directory's (it deleted the address and started
    /// again at version 1, or a restore replaced its history) and the directory missed it.
    DeleteFirst(DirectoryEntry),
}

/// What to record for an address whose store record is `current` and whose latest entry is
/// `latest`. A kst version at or below the latest published entry's is never recorded as
/// newer; versions between the latest entry's and the current one are recorded first, in
/// order (with `current_only`, only after a published entry: `kst migrate` records the
/// current key of an address the directory never saw, not its past). A deletion gets the
/// version after the directory's latest (at least `deleted_version`, the store's deleted
/// version + 1 when the caller knew it).
fn next_step(
    current: Option<&KeyRecord>,
    latest: Option<&DirectoryEntry>,
    deleted_version: Option<u64>,
    current_only: bool,
    now: u64,
) -> Step {
    let deletion = |latest: &DirectoryEntry| {
        DirectoryEntry::deleted((latest.version + 1).max(deleted_version.unwrap_or(0)), now)
    };
    match (current, latest) {
        // The next version of a published address.
        (Some(record), Some(l)) if l.state != EntryState::Deleted => {
            let wanted = DirectoryEntry::for_record(record);
            if wanted == *l {
                Step::Nothing
            } else if record.version == l.version + 1 {
                Step::Record(wanted)
            } else if record.version > l.version {
                Step::Fill(l.version + 1)
            } else {
                Step::DeleteFirst(deletion(l))
            }
        }
        // A first publication, or one after a deletion (the store counts from 1 again).
        (Some(record), _) => {
            if record.version > 1 && !current_only {
                Step::Fill(1)
            } else {
                Step::Record(DirectoryEntry::for_record(record))
            }
        }
        (None, Some(l)) if l.state != EntryState::Deleted => Step::Record(deletion(l)),
        (None, _) => Step::Nothing,
    }
}

/// Waits a random while before attempt `attempt + 1` of a write.
async fn back_off(attempt: u64) {
    let millis = rand::random::<u64>() % (10 * attempt);
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

/// Parses a stored head and checks it is the head of `domain`'s log (its VRF key, signed by
/// `head_key`) of `epoch`, with `root_hash` when the directory knows it. Anything else means
/// the store holds another directory's heads or was altered: [`TransparencyError::Directory`].
pub(super) fn check_stored_head(
    domain: &str,
    vrf_key: &[u8; 32],
    head_key: &[u8; 32],
    epoch: u64,
    root_hash: Option<[u8; 32]>,
    blob: &[u8],
) -> Result<SignedHead> {
    let inconsistent = |what: &str| {
        TransparencyError::Directory(format!(
            "the head stored for {domain} epoch {epoch} {what}; the store holds another \
             directory's heads or was altered: an operator must look"
        ))
    };
    let head = std::str::from_utf8(blob)
        .map_err(|_| inconsistent("is not text"))
        .and_then(|t| parse_head(t).map_err(|e| inconsistent(&e.to_string())))?;
    if head.head.epoch != epoch || head.head.domain != domain {
        return Err(inconsistent("names another epoch or domain"));
    }
    if root_hash.is_some_and(|r| r != head.head.root_hash) {
        return Err(inconsistent(&format!(
            "names root {}, not the directory's",
            hex::encode(head.head.root_hash)
        )));
    }
    if &head.head.vrf_public_key != vrf_key || head.verify(head_key).is_err() {
        return Err(inconsistent("is not signed by this log's keys"));
    }
    Ok(head)
}

/// A failure of the store's head and cosignature calls.
/// The temporary failure of a request whose answer (`what`) about `address` at `epoch` did not
/// verify against its own head in `failures` attempts, the last one's error `e`.
fn not_verified_error(
    what: &str,
    address: &Address,
    epoch: u64,
    failures: u64,
    e: &TransparencyError,
) -> TransparencyError {
    TransparencyError::Directory(format!(
        "the {what} about {address} did not verify against its own head (epoch {epoch}) in \
         {failures} attempts, so it was not served: {e}; retry later; if it persists, the \
         directory's store was altered or damaged and an operator must look"
    ))
}

fn store_error(e: DirectoryStoreError) -> TransparencyError {
    TransparencyError::Directory(e.to_string())
}

fn gone() -> TransparencyError {
    TransparencyError::Directory("the key directory's thread stopped".into())
}

impl DomainLog {
    /// Opens the log of `keys.domain` kept in `store` (creating the empty directory on first
    /// use) on a thread of its own, which ends when the log is dropped. A store that cannot be
    /// read now does not fail this (a daemon starts while its database is down): it is logged,
    /// and requests open the directory until that succeeds, failing meanwhile (at most one
    /// attempt per back-off: [`Worker::open`]).
    pub async fn open(store: Arc<dyn DirectoryStore>, keys: LogKeys) -> Result<Self> {
        let domain = keys.domain.clone();
        let head_key = keys.head.public_key();
        let vrf_key = keys.vrf.public_key()?;
        // Two bounded queues: changes (answered first) and reads. A full queue refuses at
        // once (a temporary failure), so a flood neither hangs callers nor grows memory.
        let (writes, mut write_inbox) = mpsc::channel::<Request>(MAX_QUEUED_WRITES);
        let (reads, mut read_inbox) = mpsc::channel::<Request>(MAX_QUEUED_READS);
        let worker_store = Arc::clone(&store);
        let (opened, open_result) = oneshot::channel::<Result<()>>();
        let caller = tokio::runtime::Handle::current();
        let step_reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_step_reads = Arc::clone(&step_reads);
        let fenced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_fenced = Arc::clone(&fenced);
        let torn = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_torn = Arc::clone(&torn);
        let unverified = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker_unverified = Arc::clone(&unverified);
        let shares = Arc::new(ThreadShares::default());
        let thread_shares = Arc::clone(&shares);
        let gather = Arc::new(Gather::new());
        let thread_gather = Arc::clone(&gather);
        // Counted until the thread ends, after its runtime (dropped first: declared later).
        let counted = LogThread::start();
        std::thread::Builder::new()
            .name(format!("kst-log-{domain}"))
            .spawn(move || {
                let _counted = counted;
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = opened.send(Err(TransparencyError::Directory(format!(
                            "cannot start the key directory's runtime: {e}"
                        ))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut worker = Worker {
                        keys: Arc::new(keys),
                        caller,
                        opened: None,
                        store: worker_store,
                        head_known: std::cell::Cell::new(None),
                        own_commit: std::cell::Cell::new(None),
                        backfill: Backfill::default(),
                        ahead: std::cell::Cell::new(None),
                        step_reads: worker_step_reads,
                        fenced: worker_fenced,
                        torn: worker_torn,
                        unverified: worker_unverified,
                        newest_step: std::cell::Cell::new(None),
                        counted: std::cell::Cell::new(None),
                        open_backoff: OpenBackoff::default(),
                    };
                    if let Err(e) = worker.open().await {
                        tracing::warn!(
                            domain = %worker.keys.domain,
                            error = %e,
                            backoff_ms = OPEN_BACKOFF.as_millis() as u64,
                            "the key directory cannot be read now; requests in the next backoff_ms get a temporary failure at once, and the first request after them opens it again"
                        );
                    }
                    if opened.send(Ok(())).is_err() {
                        return;
                    }
                    // Writes first: a flood of reads never holds a change back. While no
                    // request waits, the background backfill takes a step.
                    loop {
                        let request = match write_inbox.try_recv().or_else(|_| read_inbox.try_recv()) {
                            Ok(r) => r,
                            Err(mpsc::error::TryRecvError::Empty) if worker.backfill.pending() => {
                                worker.backfill_step().await;
                                continue;
                            }
                            Err(_) => tokio::select! {
                                biased;
                                Some(r) = write_inbox.recv() => r,
                                Some(r) = read_inbox.recv() => r,
                                else => break,
                            },
                        };
                        let mut syncs = Vec::new();
                        let mut others = Vec::new();
                        match request {
                            Request::Sync(s) => syncs.push(s),
                            other => others.push(other),
                        }
                        // Group commit: every change queued meanwhile joins the epoch.
                        while !syncs.is_empty() && syncs.len() < MAX_BATCH {
                            match write_inbox.try_recv() {
                                Ok(Request::Sync(s)) => syncs.push(s),
                                Ok(other) => others.push(other),
                                Err(_) => break,
                            }
                        }
                        // And the changes on their way, for a moment.
                        if !syncs.is_empty() {
                            thread_gather
                                .wait(
                                    &mut write_inbox,
                                    &mut read_inbox,
                                    &mut worker,
                                    &mut syncs,
                                    &mut others,
                                )
                                .await;
                        }
                        let batch = std::time::Instant::now();
                        let wrote = !syncs.is_empty();
                        if wrote {
                            worker.sync_batch(syncs).await;
                        }
                        let took = batch.elapsed();
                        for other in others {
                            worker.handle(other).await;
                        }
                        if wrote {
                            // Reads between two batches: at least READS_BETWEEN_WRITES, and
                            // more while they took less time than the batch did, so a stream
                            // of changes leaves waiting reads about half the thread.
                            let reads = std::time::Instant::now();
                            let mut served = 0;
                            while served < READS_BETWEEN_WRITES || reads.elapsed() < took {
                                match read_inbox.try_recv() {
                                    Ok(r) => worker.handle(r).await,
                                    Err(_) => break,
                                }
                                served += 1;
                            }
                            let micros = |d: std::time::Duration| {
                                u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
                            };
                            thread_shares
                                .writes_us
                                .fetch_add(micros(took), std::sync::atomic::Ordering::Relaxed);
                            thread_shares.reads_between_us.fetch_add(
                                micros(reads.elapsed()),
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                    }
                });
            })
            .map_err(|e| {
                TransparencyError::Directory(format!(
                    "cannot start the key directory's thread: {e}"
                ))
            })?;
        open_result.await.map_err(|_| gone())??;
        Ok(DomainLog {
            domain,
            head_key,
            vrf_key,
            writes,
            reads,
            store,
            cosigning: tokio::sync::Mutex::new(()),
            queued_per_address: std::sync::Mutex::new(std::collections::HashMap::new()),
            step_limit: None,
            step_reads,
            fenced,
            torn,
            unverified,
            shares,
            gather,
        })
    }

    /// Where the directory's thread spent its time since the log was opened: writing epochs
    /// (each batch of changes, reads and commit), and answering the reads it serves between
    /// two epochs (at least [`READS_BETWEEN_WRITES`], and more while they took less time than
    /// the epoch before them: under a stream of changes waiting reads get about half the
    /// thread). For tests and operators; the count of reads says little on a slow machine,
    /// where each read takes long.
    pub fn thread_shares(&self) -> (std::time::Duration, std::time::Duration) {
        let load = |a: &std::sync::atomic::AtomicU64| {
            std::time::Duration::from_micros(a.load(std::sync::atomic::Ordering::Relaxed))
        };
        (
            load(&self.shares.writes_us),
            load(&self.shares.reads_between_us),
        )
    }

    /// Tree nodes read by the step planner of stepped answers
    /// ([`DomainLog::answer_stepped`]) since the log was opened: what counting the steps of
    /// `?since=` cost, refusals included (a first step over
    /// [`FIRST_STEP_MAX_ELEMENTS`] is refused after at most `4 * FIRST_STEP_MAX_ELEMENTS +
    /// 64`).
    pub fn step_reads(&self) -> u64 {
        self.step_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Epoch batches this log's writer built and the store's fence refused since the log was
    /// opened: another process (a pool's other instance, `kst deliver`) had committed since
    /// the epoch the batch was built on, and the writer built it again from the store. A
    /// writer building on the epoch it committed itself asks the store nothing before its
    /// tree work, so this is where another writer's commit in between shows.
    pub fn fenced(&self) -> u64 {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tree-node reads refused since the log was opened because the node no longer held its
    /// version at the epoch being read (another process committed twice while one answer or
    /// epoch was read: `StoredDirectory::torn_reads`); each was read again.
    pub fn torn_reads(&self) -> u64 {
        self.torn.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers built since the log was opened that did not verify against their own head
    /// ([`self_check`]) and were not served (built again, or the request failed).
    pub fn unverified(&self) -> u64 {
        self.unverified.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The served domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The head key clients verify heads with.
    pub fn head_public_key(&self) -> [u8; 32] {
        self.head_key
    }

    /// The directory's VRF public key.
    pub fn vrf_public_key(&self) -> Result<[u8; 32]> {
        Ok(self.vrf_key)
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        self.ask_counted(request, None).await
    }

    /// [`DomainLog::ask`], leaving `incoming`'s count once the request is queued.
    async fn ask_counted<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
        incoming: Option<IncomingChange>,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let request = request(reply);
        let (queue, what, bound) = match request {
            Request::Sync(_) => (&self.writes, "changes", MAX_QUEUED_WRITES),
            _ => (&self.reads, "reads", MAX_QUEUED_READS),
        };
        queue.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransparencyError::Directory(format!(
                "the key directory of {} has {bound} {what} waiting already; retry later",
                self.domain
            )),
            mpsc::error::TrySendError::Closed(_) => gone(),
        })?;
        // Asked: no longer on its way (the writer finds it queued).
        drop(incoming);
        answer.await.map_err(|_| gone())?
    }

    /// Makes the directory say what `source` holds for `address`: the writer reads it after
    /// this call, once per attempt (see the module docs), and records the key (after every
    /// version of the store's history the directory lacks, one epoch each, oldest first), a
    /// deletion (when the store has no key and the directory's latest entry is not a
    /// deletion; its version is the directory's latest + 1, at least `deleted_version`), or
    /// nothing when the directory says so already. Returns once the last epoch is committed.
    /// `now` dates a deletion.
    pub async fn record(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        deleted_version: Option<u64>,
        now: u64,
    ) -> Result<Synced> {
        self.ask_record(address, source, deleted_version, false, now, None)
            .await
    }

    /// Counts one change on its way to this log's writer, until the returned guard is given
    /// to [`DomainLog::record_incoming`] (or dropped). A caller takes it before writing the
    /// key store: the writer, about to build an epoch, waits for counted changes (at most
    /// [`DomainLog::with_gather`]'s bound) so that they share it rather than wait for the
    /// next one.
    pub fn incoming(&self) -> IncomingChange {
        self.gather
            .incoming
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        IncomingChange {
            gather: Arc::clone(&self.gather),
        }
    }

    /// [`DomainLog::record`] of a change counted by [`DomainLog::incoming`]: the count is
    /// left once the request is queued.
    pub async fn record_incoming(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        deleted_version: Option<u64>,
        now: u64,
        incoming: IncomingChange,
    ) -> Result<Synced> {
        self.ask_record(address, source, deleted_version, false, now, Some(incoming))
            .await
    }

    /// Sets the longest the writer waits before an epoch for changes on their way
    /// ([`DomainLog::incoming`]), bounded by [`MAX_GATHER`]; zero: it never waits (each epoch
    /// holds what queued while the one before was written). Default [`DEFAULT_GATHER`]. The
    /// wait ends as soon as none is on its way, so a lone change is not delayed.
    pub fn with_gather(self, limit: std::time::Duration) -> Self {
        let us = u64::try_from(limit.min(MAX_GATHER).as_micros()).unwrap_or(u64::MAX);
        self.gather
            .limit_us
            .store(us, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// The time the writer spent waiting for changes on their way
    /// ([`DomainLog::with_gather`]) since the log was opened, the reads it answered
    /// meanwhile included.
    pub fn gathering(&self) -> std::time::Duration {
        std::time::Duration::from_micros(
            self.gather
                .waited_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// [`DomainLog::record`] for `kst migrate`: an address the directory never saw (or saw
    /// deleted) gets its current key only, not the versions before it.
    pub async fn record_current(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        now: u64,
    ) -> Result<Synced> {
        self.ask_record(address, source, None, true, now, None)
            .await
    }

    async fn ask_record(
        &self,
        address: &Address,
        source: Arc<dyn CurrentKeys>,
        deleted_version: Option<u64>,
        current_only: bool,
        now: u64,
        incoming: Option<IncomingChange>,
    ) -> Result<Synced> {
        let _counted = self.count_change(address)?;
        self.ask_counted(
            |reply| {
                Request::Sync(SyncRequest {
                    address: address.clone(),
                    source,
                    deleted_version,
                    current_only,
                    now,
                    reply,
                })
            },
            incoming,
        )
        .await
    }

    /// Counts one more change of `address` waiting, unless [`MAX_QUEUED_PER_ADDRESS`] wait
    /// already: then a temporary failure for this address alone (the caller tries again).
    fn count_change(&self, address: &Address) -> Result<QueuedChange<'_>> {
        let mut counts = self
            .queued_per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(address.clone()).or_insert(0);
        if *n >= MAX_QUEUED_PER_ADDRESS {
            return Err(TransparencyError::Directory(format!(
                "the key directory of {} has {MAX_QUEUED_PER_ADDRESS} changes of {address} \
                 waiting already; retry later",
                self.domain
            )));
        }
        *n += 1;
        Ok(QueuedChange {
            counts: &self.queued_per_address,
            address: address.clone(),
        })
    }

    /// [`DomainLog::record`] with the store's current record given (`None`: no key).
    pub async fn sync(
        &self,
        address: &Address,
        current: Option<&KeyRecord>,
        now: u64,
    ) -> Result<Synced> {
        self.record(address, Arc::new(Fixed(current.cloned())), None, now)
            .await
    }

    /// Every entry the directory holds for `address`, oldest first, with the epoch that
    /// recorded it (no proofs: for operators and tests).
    pub async fn entries(&self, address: &Address) -> Result<Vec<(u64, DirectoryEntry)>> {
        self.ask(|reply| Request::Entries {
            address: address.clone(),
            reply,
        })
        .await
    }

    /// The signed head of the latest epoch (the stored one; signed at `now` and stored if
    /// there is none yet).
    pub async fn head(&self, now: u64) -> Result<SignedHead> {
        self.ask(|reply| Request::Head { now, reply }).await
    }

    /// The stored signed head of `epoch`; signed at `now` and stored if there is none yet (for
    /// an older epoch with the root akd's append-only proof gives it, [`super::backfill`]).
    /// `None`: no such epoch.
    pub async fn head_at(&self, epoch: u64, now: u64) -> Result<Option<SignedHead>> {
        self.ask(|reply| Request::HeadAt { epoch, now, reply })
            .await
    }

    /// The stored heads of the epochs `from..=to` (the caller bounds the range), oldest first;
    /// epochs without a stored head are left out.
    pub async fn stored_heads(&self, from: u64, to: u64) -> Result<Vec<SignedHead>> {
        let stored = self
            .store
            .heads(&self.domain, from, to)
            .await
            .map_err(store_error)?;
        stored
            .into_iter()
            .map(|(epoch, blob)| self.stored_head(epoch, &blob))
            .collect()
    }

    /// Parses a stored head and checks it is this log's head of `epoch`.
    fn stored_head(&self, epoch: u64, blob: &[u8]) -> Result<SignedHead> {
        check_stored_head(
            &self.domain,
            &self.vrf_key,
            &self.head_key,
            epoch,
            None,
            blob,
        )
    }

    /// The witnesses' cosignatures of the head of `epoch` (stored ones that no longer verify
    /// against the stored head are left out and logged).
    pub async fn cosignatures(&self, head: &SignedHead) -> Result<Vec<Cosignature>> {
        let stored = self
            .store
            .cosignatures(&self.domain, head.head.epoch)
            .await
            .map_err(store_error)?;
        let mut out = Vec::with_capacity(stored.len());
        for (witness, blob) in stored {
            match self.stored_cosignature(head, &witness, &blob) {
                Ok(c) => out.push(c),
                Err(e) => {
                    tracing::warn!(domain = %self.domain, epoch = head.head.epoch, error = %e, "a stored cosignature does not verify; left out")
                }
            }
        }
        out.sort_by_key(|c| c.witness);
        Ok(out)
    }

    fn stored_cosignature(
        &self,
        head: &SignedHead,
        witness: &[u8; 32],
        blob: &[u8],
    ) -> Result<Cosignature> {
        let c = std::str::from_utf8(blob)
            .map_err(|_| TransparencyError::Malformed("a stored cosignature is not text".into()))
            .and_then(Cosignature::parse_line)?;
        if &c.witness != witness {
            return Err(TransparencyError::Malformed(
                "a stored cosignature names another witness".into(),
            ));
        }
        c.verify(head)?;
        Ok(c)
    }

    /// Stores a witness's cosignature of the head of `epoch` after checking it against the
    /// stored head of that epoch (the caller checks that it trusts the witness). No stored
    /// head for `epoch`, or a cosignature that does not verify:
    /// [`TransparencyError::Verification`] / [`TransparencyError::Signature`]. One older than
    /// the newest stored for that witness (an earlier epoch, or the same epoch checked
    /// earlier: a replay) is [`TransparencyError::Stale`] and changes nothing; the same one
    /// again is stored already (`Ok`). Cosignatures are stored one at a time per process, so
    /// of two at once the newer stays.
    pub async fn add_cosignature(&self, epoch: u64, cosignature: &Cosignature) -> Result<()> {
        let _one_at_a_time = self.cosigning.lock().await;
        let Some(head) = self.stored_heads(epoch, epoch).await?.pop() else {
            return Err(TransparencyError::Verification(format!(
                "{} has no stored head of epoch {epoch} to cosign",
                self.domain
            )));
        };
        cosignature.verify(&head)?;
        if let Some((newest, blob)) = self
            .store
            .latest_cosignature(&self.domain, &cosignature.witness)
            .await
            .map_err(store_error)?
        {
            // A stored line that does not parse is replaced (it is never served).
            let checked_at = std::str::from_utf8(&blob)
                .ok()
                .and_then(|l| Cosignature::parse_line(l).ok())
                .map_or(0, |c| c.checked_at);
            if (epoch, cosignature.checked_at) < (newest, checked_at) {
                return Err(TransparencyError::Stale(format!(
                    "witness {} cosigned epoch {newest} (checked at {checked_at}) already; a \
                     cosignature of epoch {epoch} checked at {} is older and is dropped",
                    hex::encode(cosignature.witness),
                    cosignature.checked_at
                )));
            }
            if (epoch, cosignature.checked_at) == (newest, checked_at) {
                return Ok(());
            }
        }
        self.store
            .put_cosignature(
                &self.domain,
                epoch,
                &cosignature.witness,
                cosignature.checked_at,
                cosignature.to_line().as_bytes(),
            )
            .await
            .map_err(store_error)
    }

    /// The newest head `witness` cosigned, with its cosignature.
    pub async fn latest_cosigned(
        &self,
        witness: &[u8; 32],
    ) -> Result<Option<(SignedHead, Cosignature)>> {
        let Some((epoch, blob)) = self
            .store
            .latest_cosignature(&self.domain, witness)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let Some(head) = self.stored_heads(epoch, epoch).await?.pop() else {
            return Err(TransparencyError::Directory(format!(
                "{} epoch {epoch} has a cosignature but no stored head",
                self.domain
            )));
        };
        let c = self.stored_cosignature(&head, witness, &blob)?;
        Ok(Some((head, c)))
    }

    /// The witnesses' part of an answer whose head is `head` ([`Witnessed`]): the newest
    /// cosignature of each of `witnesses` (keys; one listed twice counts once) at or before
    /// `head`'s epoch, at most [`MAX_AUDIT_EPOCHS`] epochs older and not so old that the
    /// append-only proof from it to `head` is over [`MAX_WITNESSED_ELEMENTS`] (counted before
    /// anything is built), and the heads and the append-only proof from the oldest of them to
    /// `head`. `None` when none of them cosigned such a head.
    pub async fn witnessed(
        &self,
        head: &SignedHead,
        witnesses: &[[u8; 32]],
    ) -> Result<Option<Witnessed>> {
        self.witnessed_within(head, witnesses, |_| MAX_WITNESSED_ELEMENTS)
            .await
    }

    /// [`DomainLog::witnessed`] whose append-only proof holds at most
    /// `max_elements(epochs)` elements (counted before anything is built), `epochs` being the
    /// most heads the part then carries (from the oldest cosigned head considered to `head`):
    /// the witnesses whose cosigned head is further back are left out. A version 3 reply
    /// carries less than an HTTP answer (`TransparentStore`'s answers): with the HTTP bound,
    /// one witness far behind made the part too large for the reply, and the reply then
    /// dropped the whole part, the current witnesses' cosignatures too (red team round 10).
    pub async fn witnessed_within(
        &self,
        head: &SignedHead,
        witnesses: &[[u8; 32]],
        max_elements: impl FnOnce(u64) -> usize,
    ) -> Result<Option<Witnessed>> {
        let to = head.head.epoch;
        let oldest = to.saturating_sub(MAX_AUDIT_EPOCHS - 1);
        let mut cosignatures = Vec::new();
        for (i, witness) in witnesses.iter().enumerate() {
            // A witness configured twice is listed once (clients refuse two lines of one).
            if witnesses[..i].contains(witness) {
                continue;
            }
            if let Some((h, c)) = self.latest_cosigned(witness).await?
                && (oldest..=to).contains(&h.head.epoch)
            {
                cosignatures.push((h.head.epoch, c));
            }
        }
        // Only the cosignatures from which the append-only proof to `head` fits what a client
        // accepts: a witness that lags far behind busy epochs would otherwise make every
        // `witnessed=1` look-up build a proof no client reads (red team round 10).
        if let Some(lowest) = cosignatures.iter().map(|(e, _)| *e).min()
            && lowest < to
        {
            let max_elements = max_elements(to - lowest + 1);
            let reach = self
                .ask(|reply| Request::Reach {
                    lowest,
                    to,
                    max_elements,
                    reply,
                })
                .await?;
            cosignatures.retain(|(e, _)| *e >= reach);
        }
        let Some(from) = cosignatures.iter().map(|(e, _)| *e).min() else {
            return Ok(None);
        };
        let audit = self.audit_answer(from, to).await?;
        if audit.heads.last() != Some(head) {
            return Err(TransparencyError::Directory(format!(
                "{}: the stored head of epoch {to} is not the answer's",
                self.domain
            )));
        }
        Ok(Some(Witnessed {
            cosignatures,
            audit,
        }))
    }

    /// What an auditor or witness checks between epochs `from` and `to` (`from <= to`; the
    /// caller bounds the range): the stored head of every epoch in it and akd's append-only
    /// proof. Epochs without a stored head get one signed late first ([`super::backfill`]);
    /// one that still has none fails ([`TransparencyError::Directory`]).
    ///
    /// Checked before it is served as a witness checks it ([`self_check::check_audit`], on a
    /// blocking thread, [`self_check::off_thread`]): an answer that does not verify (a stored
    /// head naming another root than the directory's, a store altered behind kst's back) is
    /// built again from fresh reads, [`self_check::ATTEMPTS`] times in all, each counted in
    /// [`DomainLog::unverified`], then the request fails temporarily
    /// ([`TransparencyError::Directory`]), logged as an error: a witness or auditor handed it
    /// would report a fork (`kst log audit`, exit 5) that third parties publish. A proof read
    /// across another process's commits is read again by the directory's thread
    /// ([`Worker::audit`]).
    pub async fn audit_answer(&self, from: u64, to: u64) -> Result<AuditAnswer> {
        let mut failures = 0;
        loop {
            let answer = self.audit_answer_once(from, to, failures > 0).await?;
            let (answer, checked) = self_check::off_thread(move |rt| {
                let checked = rt.block_on(self_check::check_audit(&answer));
                (answer, checked)
            })
            .await?;
            let Err(e) = checked else {
                return Ok(answer);
            };
            failures += 1;
            self.unverified
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if failures >= self_check::ATTEMPTS {
                tracing::error!(domain = %self.domain, from, to, error = %e, "the audit answer built {failures} times did not verify against its own heads; not served");
                return Err(TransparencyError::Directory(format!(
                    "the audit answer of {} from epoch {from} to {to} did not verify against its \
                     own heads in {failures} attempts, so it was not served: {e}; retry later; \
                     if it persists, the directory's store was altered or damaged and an \
                     operator must look",
                    self.domain
                )));
            }
            tracing::warn!(domain = %self.domain, from, to, attempt = failures, error = %e, "the audit answer did not verify against its own heads; building it again from fresh reads");
            back_off(failures).await;
        }
    }

    /// One attempt of [`DomainLog::audit_answer`], unchecked; its proof from fresh reads when
    /// `fresh`.
    async fn audit_answer_once(&self, from: u64, to: u64, fresh: bool) -> Result<AuditAnswer> {
        let mut heads = self.stored_heads(from, to).await?;
        if heads.len() as u64 != to - from + 1 {
            // Epochs without a head: signed late (docs/TRANSPARENCY.md), then read again.
            let now = crate::time::unix_now();
            self.ask(|reply| Request::FillHeads {
                from,
                to,
                now,
                reply,
            })
            .await?;
            heads = self.stored_heads(from, to).await?;
        }
        if let Some(missing) = (from..=to)
            .zip(
                heads
                    .iter()
                    .map(|h| h.head.epoch)
                    .chain(std::iter::repeat(u64::MAX)),
            )
            .find(|(want, got)| want != got)
            .map(|(want, _)| want)
        {
            return Err(TransparencyError::Directory(format!(
                "{} has no stored head of epoch {missing}; the audit from {from} to {to} cannot \
                 be served",
                self.domain
            )));
        }
        let proof = if from < to {
            let proof = wire::encode_audit(&self.audit_built(from, to, fresh).await?)?;
            // Counted within what can fit, built, and still larger than a witness accepts.
            if proof.len() > wire::MAX_AUDIT_PROOF {
                return Err(TransparencyError::Range(format!(
                    "the append-only proof from epoch {from} to {to} is {} bytes, more than \
                     the {} a witness or client accepts: ask for a shorter range",
                    proof.len(),
                    wire::MAX_AUDIT_PROOF
                )));
            }
            Some(proof)
        } else {
            None
        };
        Ok(AuditAnswer {
            domain: self.domain.clone(),
            vrf_public_key: self.vrf_key,
            heads,
            proof,
        })
    }

    /// What the directory says about `address` at the latest epoch, with the signed head of
    /// that epoch: what the HTTP endpoint serves.
    pub async fn answer(&self, address: &Address, now: u64) -> Result<LogAnswer> {
        self.answer_since(address, None, now).await
    }

    /// [`DomainLog::answer`] for a client that remembers the head of epoch `since`: the answer
    /// also carries the append-only proof from `since` to its epoch when that is newer (at
    /// most [`MAX_SINCE_EPOCHS`] epochs: further is [`TransparencyError::Range`], the
    /// client's to fix by re-pinning).
    pub async fn answer_since(
        &self,
        address: &Address,
        since: Option<u64>,
        now: u64,
    ) -> Result<LogAnswer> {
        self.answer_stepped(address, since, None, now).await
    }

    /// [`DomainLog::answer_since`] bounded by `steps` instead of [`MAX_SINCE_EPOCHS`]: the
    /// append-only proof from `since` is counted step by step before it is built
    /// ([`KeyDirectory::audit_step_count`](super::directory::KeyDirectory::audit_step_count));
    /// what fits in the budget is built: the whole proof to the answer's epoch, or its first
    /// steps up to an older signed head ([`AppendOnlyFrom::step`]: the client verifies them,
    /// remembers that head and asks again). When not even the step of `since` itself fits,
    /// nothing is built and the answer says so ([`LogAnswer::too_far`]). `steps: None` is
    /// [`DomainLog::answer_since`].
    ///
    /// Every answer is checked before it is served as its client checks it: the look-up or
    /// absence proof on the directory's thread ([`Worker::answer`]), the append-only part on a
    /// blocking thread ([`DomainLog::check_append_only`]); one that does not verify is built
    /// again from fresh reads, [`self_check::ATTEMPTS`] times in all, each counted in
    /// [`DomainLog::unverified`], then a temporary failure.
    pub async fn answer_stepped(
        &self,
        address: &Address,
        since: Option<u64>,
        steps: Option<StepBudget>,
        now: u64,
    ) -> Result<LogAnswer> {
        let steps = steps.map(|b| Steps {
            budget: match self.step_limit {
                Some(l) => StepBudget {
                    bytes: b.bytes.min(l.bytes),
                    changes: b.changes.min(l.changes),
                    epochs: b.epochs.min(l.epochs),
                },
                None => b,
            },
            newest: b,
        });
        let mut failures = 0;
        loop {
            let answer = self
                .ask(|reply| Request::Answer {
                    address: address.clone(),
                    since,
                    steps,
                    now,
                    fresh: failures > 0,
                    reply,
                })
                .await?;
            let Some(from) = answer.append_only.as_ref().map(|a| a.from) else {
                return Ok(answer);
            };
            let (answer, checked) = self.check_append_only(answer, from).await?;
            let Err(e) = checked else {
                return Ok(answer);
            };
            failures += 1;
            self.unverified
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let epoch = answer.head.head.epoch;
            if failures >= self_check::ATTEMPTS {
                tracing::error!(domain = %self.domain, %address, epoch, error = %e, "the answer built {failures} times did not verify against its own head; not served");
                return Err(not_verified_error("answer", address, epoch, failures, &e));
            }
            tracing::warn!(domain = %self.domain, %address, epoch, attempt = failures, error = %e, "the answer did not verify against its own head; building it again from fresh reads");
            back_off(failures).await;
        }
    }

    /// [`self_check::check_append_only`] of `answer`'s append-only part, which starts at
    /// epoch `from`, on a blocking thread ([`self_check::off_thread`]: seconds of CPU for a
    /// client far behind, which the directory's thread spent before, every other request and
    /// change of the domain waiting), as a client that remembers the head of `from` checks
    /// it: the stored head of `from`; when none is stored (a store that lost heads, an epoch
    /// whose writer died before its head), the root the proof itself starts at
    /// ([`self_check::check_append_only_unanchored`]). The outer error: the stored head could
    /// not be read, or is not this log's; the inner one: the answer does not verify.
    async fn check_append_only(
        &self,
        answer: LogAnswer,
        from: u64,
    ) -> Result<(LogAnswer, Result<()>)> {
        let remembered = self.stored_heads(from, from).await?.pop();
        let head_key = self.head_key;
        self_check::off_thread(move |rt| {
            let checked = rt.block_on(async {
                match &remembered {
                    Some(h) => self_check::check_append_only(&answer, &head_key, &h.head).await,
                    None => self_check::check_append_only_unanchored(&answer, &head_key).await,
                }
            });
            (answer, checked)
        })
        .await
    }

    /// Bounds every budget [`DomainLog::answer_stepped`] is given by `limit` (the operator's
    /// `[transparency] step_max_*`: smaller steps for slow clients, or tests).
    pub fn with_step_limit(mut self, limit: StepBudget) -> Self {
        self.step_limit = Some(limit);
        self
    }

    /// Every version of `address` the directory recorded (the newest
    /// [`super::history::MAX_VERSIONS`]) with akd's history proof, against the signed head of
    /// the latest epoch; `None` for an address it never held.
    pub async fn history(&self, address: &Address, now: u64) -> Result<Option<HistoryAnswer>> {
        let built = self
            .ask(|reply| Request::History {
                address: address.clone(),
                before: None,
                now,
                reply,
            })
            .await?;
        Ok(built.map(|b| b.answer))
    }

    /// The versions of `address` below `before` (the newest
    /// [`super::history::MAX_VERSIONS`] of them) with akd's update proofs, against the signed
    /// head of the latest epoch, and whether the address's newest version finds no key (for
    /// the server's limits, [`PageAnswer::finds_no_key`]); `None` when the directory holds no
    /// such version.
    pub async fn history_page(
        &self,
        address: &Address,
        before: u64,
        now: u64,
    ) -> Result<Option<PageAnswer>> {
        let built = self
            .ask(|reply| Request::History {
                address: address.clone(),
                before: Some(before),
                now,
                reply,
            })
            .await?;
        Ok(built.map(|b| PageAnswer {
            page: HistoryPage {
                head: b.answer.head,
                before,
                proof: b.answer.proof,
            },
            newest_finds_no_key: b.newest_finds_no_key,
        }))
    }

    /// Starts filling, in the background, the heads of epochs that have none (a directory
    /// kept from before heads were stored, a store that lost some): bounded steps while no
    /// request waits (docs/TRANSPARENCY.md, "Heads signed late"). `kst serve` does this for
    /// the logs it serves.
    pub fn start_backfill(&self) {
        // At start the queue is empty; a log whose thread stopped answers every request with
        // an error anyway.
        let _ = self.writes.try_send(Request::StartBackfill);
    }

    /// The append-only proof from epoch `from` to `to` (auditors, witnesses, clients that
    /// remember an older head).
    pub async fn audit(&self, from: u64, to: u64) -> Result<akd::AppendOnlyProof> {
        self.audit_built(from, to, false).await
    }

    /// [`DomainLog::audit`], from fresh reads when `fresh`.
    async fn audit_built(&self, from: u64, to: u64, fresh: bool) -> Result<akd::AppendOnlyProof> {
        self.ask(|reply| Request::Audit {
            from,
            to,
            fresh,
            reply,
        })
        .await
    }
}

impl Request {
    /// Whether this is a read whose caller went away (an HTTP client that closed its
    /// connection: the handler's future, and the receiver of the answer, are dropped). Its
    /// answer would be thrown away, so the thread skips it: otherwise a client that sends
    /// expensive requests (`?since=`, audits) and closes each connection at once has the
    /// thread build every one of them, up to [`MAX_QUEUED_READS`] queued, while the HTTP
    /// listener's bound on expensive requests at once holds only for requests still waited
    /// for (red team round 10). A change ([`Request::Sync`]) is recorded all the same: the
    /// store holds it already, and the directory must say so.
    fn abandoned(&self) -> bool {
        match self {
            Request::Sync(_) | Request::StartBackfill => false,
            Request::Entries { reply, .. } => reply.is_closed(),
            Request::Head { reply, .. } => reply.is_closed(),
            Request::HeadAt { reply, .. } => reply.is_closed(),
            Request::Answer { reply, .. } => reply.is_closed(),
            Request::History { reply, .. } => reply.is_closed(),
            Request::Audit { reply, .. } => reply.is_closed(),
            Request::FillHeads { reply, .. } => reply.is_closed(),
            Request::Reach { reply, .. } => reply.is_closed(),
        }
    }

    /// Answers with `e`.
    fn fail(self, e: TransparencyError) {
        // A caller that gave up is not an error.
        match self {
            Request::Sync(s) => drop(s.reply.send(Err(e))),
            Request::Entries { reply, .. } => drop(reply.send(Err(e))),
            Request::Head { reply, .. } => drop(reply.send(Err(e))),
            Request::HeadAt { reply, .. } => drop(reply.send(Err(e))),
            Request::Answer { reply, .. } => drop(reply.send(Err(e))),
            Request::History { reply, .. } => drop(reply.send(Err(e))),
            Request::Audit { reply, .. } => drop(reply.send(Err(e))),
            Request::FillHeads { reply, .. } => drop(reply.send(Err(e))),
            Request::Reach { reply, .. } => drop(reply.send(Err(e))),
            Request::StartBackfill => {}
        }
    }
}

impl Worker {
    /// Opens the directory (creating the empty one on first use) unless it is open. After a
    /// failed attempt, the requests of the next [`OPEN_BACKOFF`] fail at once with its
    /// error (a store that is down is a temporary failure: HTTP 503, LMTP 4xx), and the first
    /// one after it tries again. Without it (red-team round 6's leftovers), every queued request
    /// tried in turn, one store timeout each (150 to 300 ms against a refused port), so a
    /// full read queue waited about a minute and connections were cut unanswered.
    async fn open(&mut self) -> Result<()> {
        if self.opened.is_some() {
            return Ok(());
        }
        if let Some((e, until)) = &self.open_backoff.failed
            && std::time::Instant::now() < *until
        {
            return Err(e.clone());
        }
        let db = StoredDirectory::new(Arc::clone(&self.store), &self.keys.domain)
            .counting_fenced_in(Arc::clone(&self.fenced))
            .counting_torn_in(Arc::clone(&self.torn));
        match KeyDirectory::open_cached(db.clone(), self.keys.vrf.clone()).await {
            Ok(directory) => {
                self.open_backoff = OpenBackoff::default();
                self.opened = Some(Opened { db, directory });
                self.check_heads_ahead().await;
                Ok(())
            }
            Err(e) => {
                self.open_backoff.failed =
                    Some((e.clone(), std::time::Instant::now() + OPEN_BACKOFF));
                Err(e)
            }
        }
    }

    /// Looks for heads stored for epochs after the latest one (at most [`AHEAD_WINDOW`]
    /// epochs ahead): a head the directory never committed (a store restored from an older
    /// backup under newer heads, a head written by hand or by a writer that never committed
    /// its epoch). Such a head is never served (every head served is checked against the
    /// directory's root), and building that epoch would put another root under it, so the
    /// writer refuses to build up to it ([`Worker::round`]) and the error is logged: an
    /// operator must look. Run when the directory is opened and when the background backfill
    /// has scanned the stored heads. A store that cannot be read is logged and skipped.
    async fn check_heads_ahead(&self) {
        let domain = &self.keys.domain;
        let latest = |root: Option<(u64, Vec<u8>)>| root.map_or(0, |(e, _)| e);
        let found = async {
            let before = latest(self.store.root(domain).await?);
            let stored = self
                .store
                .heads(
                    domain,
                    before.saturating_add(1),
                    before.saturating_add(AHEAD_WINDOW),
                )
                .await?;
            let Some(first) = stored.first().map(|(e, _)| *e) else {
                return Ok(None);
            };
            // Another writer may have committed meanwhile (its head follows its root): the
            // root read again decides.
            let after = latest(self.store.root(domain).await?);
            Ok::<_, DirectoryStoreError>((after < first).then_some((first, after)))
        };
        match found.await {
            Ok(Some((epoch, latest))) => {
                tracing::error!(
                    domain = %domain,
                    epoch,
                    latest,
                    "the store holds a head for epoch {epoch}, which the directory never committed (its latest epoch is {latest}): a store restored under newer heads, or a head written outside kst; it is never served, and no epoch is built up to it: an operator must look"
                );
                self.ahead.set(Some(epoch));
            }
            Ok(None) => self.ahead.set(None),
            Err(e) => {
                tracing::warn!(domain = %domain, error = %e, "cannot look for heads after the latest epoch now")
            }
        }
    }

    /// The open directory and its storage.
    fn opened(&self) -> Result<&Opened> {
        self.opened
            .as_ref()
            .ok_or_else(|| TransparencyError::Directory("the directory is not open yet".into()))
    }

    /// The open directory.
    fn dir(&self) -> Result<&KeyDirectory<StoredDirectory<dyn DirectoryStore>>> {
        Ok(&self.opened()?.directory)
    }

    /// Drops akd's node cache (another process may have committed), if the directory is open.
    async fn forget(&self) {
        if let Some(o) = &self.opened {
            o.directory.forget().await;
        }
    }

    /// Keeps akd's node cache when the stored root record and root node are the ones this
    /// writer last read or committed (one read: no other process committed since), else
    /// drops it. A store that cannot be read drops it too (the reads that follow fail).
    async fn refresh(&self) {
        if let Some(o) = &self.opened {
            match o.db.unchanged().await {
                Ok(true) => {}
                Ok(false) | Err(_) => o.directory.forget().await,
            }
        }
    }

    /// Answers one request (opening the directory first if needed); a caller that gave up is
    /// not an error.
    async fn handle(&mut self, request: Request) {
        if request.abandoned() {
            return;
        }
        if let Err(e) = self.open().await {
            request.fail(e);
            return;
        }
        // Another process may have committed since the last request.
        self.refresh().await;
        match request {
            Request::Sync(s) => self.sync_batch(vec![s]).await,
            Request::Entries { address, reply } => {
                let result = match self.dir() {
                    Ok(d) => d.entries(&address).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Request::Head { now, reply } => {
                let result = match self.current().await {
                    Ok((epoch, root)) => self.ensure_head(epoch, root, now).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Request::HeadAt { epoch, now, reply } => {
                let _ = reply.send(self.head_at(epoch, now).await);
            }
            Request::Answer {
                address,
                since,
                steps,
                now,
                fresh,
                reply,
            } => {
                if fresh {
                    self.forget().await;
                }
                let _ = reply.send(self.answer(&address, since, steps, now).await);
            }
            Request::History {
                address,
                before,
                now,
                reply,
            } => {
                let _ = reply.send(self.history(&address, before, now).await);
            }
            Request::Audit {
                from,
                to,
                fresh,
                reply,
            } => {
                if fresh {
                    self.forget().await;
                }
                let _ = reply.send(self.audit(from, to).await);
            }
            Request::Reach {
                lowest,
                to,
                max_elements,
                reply,
            } => {
                let _ = reply.send(self.reach_back(lowest, to, max_elements).await);
            }
            Request::FillHeads {
                from,
                to,
                now,
                reply,
            } => {
                let _ = reply.send(self.fill_heads(from, to, now).await);
            }
            Request::StartBackfill => self.backfill.start(),
        }
    }

    /// What [`backfill`] works with.
    fn filler(&self) -> Result<Filler<'_>> {
        Ok(Filler {
            directory: self.dir()?,
            store: &self.store,
            keys: &self.keys,
        })
    }

    /// Heads for the epochs of `from..=to` that have none ([`backfill::fill`]), for a request
    /// (an audit over them). The append-only proof over the range is counted first, as the
    /// audit's own is ([`Worker::bounded_audit`]): when it is over [`MAX_PROOF_ELEMENTS`] the
    /// audit would be refused anyway, so nothing is filled (the fill built akd's proof over
    /// the missing epochs, in chunks, with no bound of its own then: an audit over a long run of
    /// busy epochs without heads made the thread build and check all of it, for anyone who
    /// asked, before the audit was refused; red team round 10). The background backfill still
    /// fills them, one chunk at a time while the log is idle. Each chunk's proof is bounded
    /// too ([`backfill::FILL_MAX_ELEMENTS`]): a single epoch over it is
    /// [`TransparencyError::Range`], unbuilt (a `/head/<epoch>` of it is refused).
    async fn fill_heads(&self, from: u64, to: u64, now: u64) -> Result<u64> {
        let to = to.min(self.dir()?.current().await?.0);
        if from < to
            && !self.counted_already(from, to).await?
            && self.reach_back(from, to, MAX_PROOF_ELEMENTS).await? > from
        {
            return Err(TransparencyError::Range(format!(
                "the append-only proof from epoch {from} to {to} is larger than {} bytes, more \
                 than a witness or client accepts: ask for a shorter range",
                wire::MAX_AUDIT_PROOF
            )));
        }
        backfill::fill(&self.filler()?, from, to, now).await
    }

    /// One step of the background backfill (the directory opened first); a failure is
    /// logged, and the step runs again when the log is next idle.
    async fn backfill_step(&mut self) {
        if let Err(e) = self.open().await {
            tracing::debug!(domain = %self.keys.domain, error = %e, "head backfill waits for the directory");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            return;
        }
        self.forget().await;
        let Some(opened) = &self.opened else { return };
        let filler = Filler {
            directory: &opened.directory,
            store: &self.store,
            keys: &self.keys,
        };
        if let Err(e) = self.backfill.step(&filler, crate::time::unix_now()).await {
            tracing::warn!(domain = %self.keys.domain, error = %e, "key directory: head backfill step failed");
            // Not at once again: a store that is down is retried after a pause.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        if !self.backfill.pending() {
            // The scan of the stored heads is through: and after the latest epoch?
            self.check_heads_ahead().await;
        }
    }

    /// Records one epoch's requests (several epochs when a deletion must come first), again
    /// on a newer epoch when another writer committed meanwhile; answers every caller.
    async fn sync_batch(&mut self, requests: Vec<SyncRequest>) {
        if let Err(e) = self.open().await {
            for r in requests {
                let _ = r.reply.send(Err(e.clone()));
            }
            return;
        }
        let mut pending: BTreeMap<Address, Pending> = BTreeMap::new();
        for r in requests {
            let p = pending.entry(r.address).or_insert_with(|| Pending {
                source: r.source,
                deleted_version: None,
                current_only: true,
                now: r.now,
                replies: Vec::new(),
                recorded: Synced::AlreadyRecorded,
            });
            p.deleted_version = p.deleted_version.max(r.deleted_version);
            p.current_only &= r.current_only;
            p.now = p.now.max(r.now);
            p.replies.push(r.reply);
        }
        let mut failures = 0;
        while !pending.is_empty() {
            // Every attempt reads afresh what another process may have committed: akd's node
            // cache (and the epoch it gives) is kept only while nobody else committed, which
            // `round` checks next to its reads (or, on the epoch this writer committed last,
            // leaves to the fence).
            let started = std::time::Instant::now();
            let current = self.current().await.ok();
            let built_on = current.map(|(e, _)| e);
            let db = match self.opened() {
                Ok(o) => o.db.clone(),
                Err(e) => {
                    for p in std::mem::take(&mut pending).into_values() {
                        for reply in p.replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                    return;
                }
            };
            db.pin(built_on);
            let round = self.round(&mut pending, current, started).await;
            db.pin(None);
            match round {
                Ok(done) => {
                    for address in done {
                        if let Some(p) = pending.remove(&address) {
                            for reply in p.replies {
                                let _ = reply.send(Ok(p.recorded.clone()));
                            }
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    // What akd cached during a failed attempt is not trusted, and the next
                    // attempt asks the store what it holds.
                    self.own_commit.set(None);
                    self.forget().await;
                    if failures < MAX_ATTEMPTS && self.retryable(&e, built_on).await {
                        tracing::info!(domain = %self.keys.domain, attempt = failures, error = %e, "directory epoch moved under this writer; reading the store again");
                        back_off(failures).await;
                        continue;
                    }
                    for p in std::mem::take(&mut pending).into_values() {
                        for reply in p.replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
    }

    /// One attempt: reads every pending address's latest entry and the store's current
    /// record (in that order, after the caller pinned the epoch), publishes what differs as
    /// one epoch. Returns the addresses that are done.
    async fn round(
        &self,
        pending: &mut BTreeMap<Address, Pending>,
        built_on: Option<(u64, [u8; 32])>,
        started: std::time::Instant,
    ) -> Result<Vec<Address>> {
        let pinned = started.elapsed();
        // Every store read starts now, after the epoch was read and pinned.
        let reads = self.read_current(pending);
        // Every pending address's value states in one read (kept for akd's `publish`; none
        // for the addresses this writer committed in the epoch pinned), and at the same time
        // the check that no other process committed since this writer last read or wrote the
        // root (the epoch pinned, and akd's node cache, came from there): one round trip less
        // per epoch. The store reads above are later than what the pinned epoch was learnt
        // from, so the order argument of the module docs holds; a batch built on a stale cache
        // is refused by the fence, the check only spares building it. So the check is left
        // out when the pinned epoch is the one this writer committed last: then the cache is
        // what it wrote, and only another process's commit since (in a pool) can make it
        // stale, which the fence refuses (`StoredDirectory::fenced`) and the next attempt
        // reads again from the store.
        let labels: Vec<_> = pending.keys().map(super::directory_label).collect();
        let db = &self.opened()?.db;
        let own = built_on.is_some() && self.own_commit.get() == built_on;
        let check = async { if own { Ok(true) } else { db.unchanged().await } };
        let (unchanged, prefetched) = tokio::join!(check, db.prefetch(&labels));
        prefetched.map_err(|e| TransparencyError::Directory(e.to_string()))?;
        match unchanged {
            Ok(true) => {}
            Ok(false) => {
                return Err(TransparencyError::Conflict(
                    "the stored root is not the one this writer last read or wrote: another \
                     process committed; reading again"
                        .into(),
                ));
            }
            // Retried like a conflict (another process's commit can make the read fail:
            // akd keeps two generations of a node), but the log says what failed: a store
            // that keeps failing is not taken for a busy pool (red team round 7).
            Err(e) => {
                return Err(TransparencyError::Conflict(format!(
                    "the stored root could not be read ({e}); another process may have \
                     committed; reading again"
                )));
            }
        }
        let currents = reads.collect().await?;
        let mut changes = Vec::new();
        let mut done = Vec::new();
        for ((address, p), current) in pending.iter().zip(currents) {
            // A store that answered another address's record (a `get_many` out of order) would
            // have it recorded under this one, for good: refused instead.
            if let Some(r) = &current
                && r.address != *address
            {
                return Err(TransparencyError::Directory(format!(
                    "the key store answered a record of {} for {address}",
                    r.address
                )));
            }
            let latest = self.dir()?.latest(address).await?;
            let step = next_step(
                current.as_ref(),
                latest.as_ref(),
                p.deleted_version,
                p.current_only,
                p.now,
            );
            match step {
                Step::Nothing => done.push(address.clone()),
                Step::Record(entry) => {
                    changes.push((address.clone(), entry));
                    done.push(address.clone());
                }
                // Stays pending: the versions after it follow, one epoch each.
                Step::Fill(version) => {
                    let history = self.read_history(&p.source, address).await?;
                    match history.iter().find(|r| r.version == version) {
                        Some(older) => {
                            changes.push((address.clone(), DirectoryEntry::for_record(older)))
                        }
                        // The store no longer holds it (replaced meanwhile): the current key.
                        None => {
                            if let Some(record) = &current {
                                changes.push((address.clone(), DirectoryEntry::for_record(record)));
                            }
                            done.push(address.clone());
                        }
                    }
                }
                // Stays pending: the key follows in the next epoch.
                Step::DeleteFirst(entry) => changes.push((address.clone(), entry)),
            }
        }
        if changes.is_empty() {
            return Ok(done);
        }
        let now = pending.values().map(|p| p.now).max().unwrap_or(0);
        // The epoch this one is built on keeps its head (signed now if its writer did not).
        let (epoch, root) = match built_on {
            Some(c) => c,
            None => self.current().await?,
        };
        if let Some(ahead) = self.ahead.get().filter(|a| *a > epoch) {
            return Err(TransparencyError::Directory(format!(
                "{}: the store holds a head for epoch {ahead}, which the directory never \
                 committed (latest {epoch}); no epoch is built up to it: an operator must look",
                self.keys.domain
            )));
        }
        let read = started.elapsed();
        self.head_before_building(epoch, root, now).await?;
        let head_before = started.elapsed();
        let Opened { db, directory } = self.opened()?;
        let before = db.commits();
        // The new epoch's head goes in with its commit.
        let keys = Arc::clone(&self.keys);
        db.sign_heads(Some(Arc::new(move |epoch, root_hash| {
            let head = Head {
                domain: keys.domain.clone(),
                epoch,
                root_hash,
                vrf_public_key: keys.vrf.public_key().ok()?,
                signed_at: now,
            };
            let text = head_text(&keys.head.sign(head).ok()?).ok()?;
            Some(text.into_bytes())
        })));
        let published = directory.publish(&changes).await;
        db.sign_heads(None);
        let (epoch, root_hash) = published?;
        let signed = db.take_signed();
        let published = started.elapsed();
        if db.commits() == before {
            // akd wrote nothing: another writer recorded these values meanwhile. Read again.
            return Err(TransparencyError::Conflict(
                "another writer recorded the same entries first".into(),
            ));
        }
        self.own_commit.set(Some((epoch, root_hash)));
        // One line per epoch, with its root (next to the stored head: the test of a pool
        // audits the history against these lines).
        tracing::info!(
            domain = %self.keys.domain,
            epoch,
            root = %hex::encode(root_hash),
            entries = changes.len(),
            "key directory epoch committed"
        );
        let entries = changes.len();
        for (address, entry) in changes {
            if let Some(p) = pending.get_mut(&address) {
                p.recorded = Synced::Recorded {
                    epoch,
                    root_hash,
                    entry,
                };
            }
        }
        // The new epoch's head, unless it went in with the commit. Should this fail, the
        // batch is tried again (it finds its entries recorded) and the head is signed by
        // whoever next needs it.
        match signed {
            Some(s) if s == (epoch, root_hash) => self.head_known.set(Some(s)),
            Some((e, r)) => {
                return Err(TransparencyError::Directory(format!(
                    "{}: the head stored with epoch {e} names root {}, akd's root of epoch \
                     {epoch} is {}; the heads of this log need an operator's look",
                    self.keys.domain,
                    hex::encode(r),
                    hex::encode(root_hash)
                )));
            }
            None => {
                self.store_head(epoch, root_hash, now).await?;
            }
        }
        // Where an epoch's time goes (docs/BENCHMARKS.md, "Key transparency"), in µs since
        // the attempt started: the epoch read and pinned, the store and directory reads,
        // the previous head, akd's publish (tree work and the commit), the new head; and the
        // backend's commit alone (`commit_us`, a duration, part of `published_us`).
        tracing::debug!(
            domain = %self.keys.domain,
            epoch,
            entries,
            pinned_us = pinned.as_micros() as u64,
            read_us = read.as_micros() as u64,
            head_before_us = head_before.as_micros() as u64,
            published_us = published.as_micros() as u64,
            commit_us = db.last_commit_micros(),
            done_us = started.elapsed().as_micros() as u64,
            "key directory epoch timings"
        );
        Ok(done)
    }

    /// Starts reading the store's current record of every pending address on the caller's
    /// runtime: the addresses of a source that batches reads in one read
    /// ([`CurrentKeys::current_many`]; on PostgreSQL and Redis, one round trip per epoch
    /// instead of one per address), the others one task each.
    fn read_current(&self, pending: &BTreeMap<Address, Pending>) -> CurrentReads {
        // Per source that batches reads: its addresses and their positions.
        let mut batches: Vec<SourceBatch<'_>> = Vec::new();
        let mut tasks = Vec::with_capacity(pending.len());
        for (i, (address, p)) in pending.iter().enumerate() {
            if p.source.batches_reads() {
                match batches
                    .iter_mut()
                    .find(|(s, _, _)| Arc::ptr_eq(s, &p.source))
                {
                    Some((_, at, addresses)) => {
                        at.push(i);
                        addresses.push(address.clone());
                    }
                    None => batches.push((&p.source, vec![i], vec![address.clone()])),
                }
                continue;
            }
            let (source, address) = (Arc::clone(&p.source), address.clone());
            let task = self
                .caller
                .spawn(async move { source.current(&address).await.map(|r| vec![r]) });
            tasks.push((vec![i], task));
        }
        for (source, at, addresses) in batches {
            let source = Arc::clone(source);
            let task = self
                .caller
                .spawn(async move { source.current_many(&addresses).await });
            tasks.push((at, task));
        }
        CurrentReads {
            count: pending.len(),
            tasks,
        }
    }

    /// The store's history of `address`, read on the caller's runtime.
    async fn read_history(
        &self,
        source: &Arc<dyn CurrentKeys>,
        address: &Address,
    ) -> Result<Vec<KeyRecord>> {
        let (source, address) = (Arc::clone(source), address.clone());
        self.caller
            .spawn(async move { source.history(&address).await })
            .await
            .map_err(|e| TransparencyError::Directory(format!("the key store read stopped: {e}")))?
            .map_err(|e| TransparencyError::Directory(format!("cannot read the key store: {e}")))
    }

    /// Whether a failed write or read is worth doing again: the fence refused it, or another
    /// process committed while it ran (akd keeps two generations of a node, so reads at an
    /// epoch two commits old fail).
    async fn retryable(&self, e: &TransparencyError, built_on: Option<u64>) -> bool {
        matches!(e, TransparencyError::Conflict(_))
            || match built_on {
                Some(epoch) => self.epoch_moved(epoch).await,
                None => true,
            }
    }

    /// The latest epoch and its root hash.
    async fn current(&self) -> Result<(u64, [u8; 32])> {
        self.dir()?.current().await
    }

    /// Whether the stored epoch is no longer `epoch`.
    async fn epoch_moved(&self, epoch: u64) -> bool {
        self.forget().await;
        matches!(self.current().await, Ok((e, _)) if e != epoch)
    }

    /// [`Worker::answer_once`], again when another process committed meanwhile (a proof
    /// built across a commit can fail to read the old epoch's nodes), and checked before it
    /// is served ([`self_check::check`]: its look-up or absence proof; the append-only part
    /// is checked off this thread, [`DomainLog::answer_stepped`]): an answer a client would
    /// refuse is built again from fresh reads, at most [`self_check::ATTEMPTS`] times in
    /// all, then the request fails with [`TransparencyError::Directory`] (temporary), logged.
    async fn answer(
        &self,
        address: &Address,
        since: Option<u64>,
        steps: Option<Steps>,
        now: u64,
    ) -> Result<LogAnswer> {
        let mut attempt = 0;
        let mut unverified = 0;
        loop {
            attempt += 1;
            self.refresh().await;
            let built_on = self.current().await.ok().map(|(e, _)| e);
            let result = match self.answer_once(address, since, steps, now).await {
                Ok(answer) => match self_check::check(&answer, address).await {
                    Ok(()) => Ok(answer),
                    Err(e) => {
                        unverified += 1;
                        let epoch = answer.head.head.epoch;
                        self.not_verified("answer", address, epoch, unverified, &e)
                            .await?;
                        continue;
                    }
                },
                Err(e) => Err(e),
            };
            match result {
                Err(e) if attempt < MAX_ATTEMPTS && self.retryable(&e, built_on).await => {
                    tracing::debug!(error = %e, "directory epoch moved during a lookup; again");
                    back_off(attempt).await;
                }
                result => return result,
            }
        }
    }

    /// An answer (`what`) about `address` at `epoch` failed the server's check of it
    /// ([`self_check`]) for the `failures`-th time in this request: counted
    /// ([`DomainLog::unverified`]) and akd's cache dropped. `Ok` (after a pause): build it
    /// again from fresh reads; after [`self_check::ATTEMPTS`] failures the request's
    /// temporary failure ([`TransparencyError::Directory`]), logged as an error.
    async fn not_verified(
        &self,
        what: &str,
        address: &Address,
        epoch: u64,
        failures: u64,
        e: &TransparencyError,
    ) -> Result<()> {
        self.unverified
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // What akd cached for it is not trusted either.
        self.forget().await;
        if failures < self_check::ATTEMPTS {
            tracing::warn!(domain = %self.keys.domain, %address, epoch, attempt = failures, error = %e, "the {what} did not verify against its own head; building it again from fresh reads");
            back_off(failures).await;
            return Ok(());
        }
        tracing::error!(domain = %self.keys.domain, %address, epoch, error = %e, "the {what} built {failures} times did not verify against its own head; not served");
        Err(not_verified_error(what, address, epoch, failures, e))
    }

    /// The history proof of `address` (with `before`, the page below that version) with
    /// [`Worker::answer`]'s retries, checked before it is served as the owner's monitor
    /// checks it ([`self_check::check_history`], [`self_check::check_page`]; built again
    /// from fresh reads as an answer is, then a temporary failure).
    async fn history(
        &self,
        address: &Address,
        before: Option<u64>,
        now: u64,
    ) -> Result<Option<BuiltHistory>> {
        let mut attempt = 0;
        let mut unverified = 0;
        loop {
            attempt += 1;
            self.refresh().await;
            let built_on = self.current().await.ok().map(|(e, _)| e);
            let result = match self.history_once(address, before, now).await {
                Ok(Some(built)) => {
                    let head_key = self.keys.head.public_key();
                    let answer = &built.answer;
                    let checked = match before {
                        None => self_check::check_history(answer, &head_key, address),
                        Some(before) => {
                            let page = HistoryPage {
                                head: answer.head.clone(),
                                before,
                                proof: answer.proof.clone(),
                            };
                            self_check::check_page(&page, &head_key, address).await
                        }
                    };
                    match checked {
                        Ok(()) => Ok(Some(built)),
                        Err(e) => {
                            unverified += 1;
                            let epoch = answer.head.head.epoch;
                            self.not_verified("history", address, epoch, unverified, &e)
                                .await?;
                            continue;
                        }
                    }
                }
                other => other,
            };
            match result {
                Err(e) if attempt < MAX_ATTEMPTS && self.retryable(&e, built_on).await => {
                    back_off(attempt).await;
                }
                result => return result,
            }
        }
    }

    /// One attempt of [`Worker::history`]: akd's proof on the stored head of its epoch
    /// ([`Worker::ensure_head`], as a look-up's): a stored head naming another root than
    /// akd's (a store restored under newer heads, heads written behind kst's back) refuses
    /// it, [`TransparencyError::Directory`] for an operator; a second head is never signed
    /// for an epoch (a fork made by kst itself).
    async fn history_once(
        &self,
        address: &Address,
        before: Option<u64>,
        now: u64,
    ) -> Result<Option<BuiltHistory>> {
        // (proof, epoch, root, whether the newest version finds no key, whether it is
        // withdrawn): the newest page holds the newest version itself; an older page is told
        // by the directory.
        let (proof, epoch, root, newest, withdrawn) = match before {
            None => match self.dir()?.history(address).await? {
                Some((proof, epoch, root)) => {
                    let withdrawn = proof
                        .update_proofs
                        .iter()
                        .max_by_key(|u| u.version)
                        .is_some_and(|u| u.value.0 == akd::TOMBSTONE);
                    (proof, epoch, root, None, withdrawn)
                }
                None => return Ok(None),
            },
            Some(before) => match self.dir()?.history_before(address, before).await? {
                Some(p) => (
                    p.proof,
                    p.epoch,
                    p.root,
                    Some(p.newest_finds_no_key),
                    p.newest_withdrawn,
                ),
                None => return Ok(None),
            },
        };
        // A deletion's epoch overwrites the address's earlier values in place ("Deletion" in
        // docs/TRANSPARENCY.md), which the torn-read guard does not see (no tree node is
        // involved): a history that read the root before another process committed one and
        // the values after it shows the old epoch's newest version withdrawn with no
        // deletion after it, which the owner's monitor reports as a key withdrawn behind
        // kst's back. The newest version of an epoch is never withdrawn at that epoch, so
        // when the epoch moved meanwhile this is such a race: read again (the retries of
        // [`Worker::history`]), on the new epoch. When it did not move, the store holds that
        // value (altered behind kst's back): served, so that the monitor reports it.
        if withdrawn {
            if self.epoch_moved(epoch).await {
                return Err(TransparencyError::Conflict(format!(
                    "the history of {address} at epoch {epoch} read a withdrawn value as its \
                     newest version: a deletion another process committed meanwhile"
                )));
            }
            tracing::warn!(domain = %self.keys.domain, %address, epoch, "the newest version of an address is withdrawn with no deletion after it: its value was altered behind kst's back (the owner's monitor, `kst client status`, reports it)");
        }
        let answer = HistoryAnswer {
            head: self.ensure_head(epoch, root, now).await?,
            proof: wire::encode_history(&proof)?,
        };
        Ok(Some(BuiltHistory {
            newest_finds_no_key: newest.unwrap_or_else(|| answer.finds_no_key()),
            answer,
        }))
    }

    async fn answer_once(
        &self,
        address: &Address,
        since: Option<u64>,
        steps: Option<Steps>,
        now: u64,
    ) -> Result<LogAnswer> {
        let (head, proof) = match self.dir()?.lookup(address).await? {
            // A deletion's epoch overwrites the address's earlier values with akd's tombstone
            // in place ("Deletion" in docs/TRANSPARENCY.md): a look-up that read the root
            // before another process committed one and the value after it holds the old
            // epoch's latest version with an empty value, which no client accepts. The
            // latest version of an epoch is never withdrawn at that epoch, so this is always
            // such a race: built again ([`Worker::answer`]'s retries), on the new epoch.
            LookupAnswer::Present { epoch, proof, .. } if proof.value.0 == akd::TOMBSTONE => {
                return Err(TransparencyError::Conflict(format!(
                    "the look-up of {address} at epoch {epoch} read a withdrawn value as its \
                     latest version: a deletion another process committed meanwhile (if this \
                     persists, that value was overwritten behind kst's back: the owner's \
                     `kst client status` reports it)"
                )));
            }
            LookupAnswer::Present {
                epoch,
                root_hash,
                proof,
            } => (
                self.ensure_head(epoch, root_hash, now).await?,
                AnswerProof::Present(wire::encode_lookup(&proof)?),
            ),
            LookupAnswer::Absent(proof) => (
                self.ensure_head(proof.epoch, proof.root_hash, now).await?,
                AnswerProof::Absent(wire::encode_absence(&proof)?),
            ),
        };
        let latest = head.head.epoch;
        let mut too_far = None;
        let append_only = match (since, steps) {
            (Some(from), Some(steps)) if from > 0 && from < latest => {
                let budget = steps.budget;
                match self
                    .plan_steps(from, (latest, head.head.root_hash), steps)
                    .await?
                {
                    None => {
                        too_far = Some(from);
                        None
                    }
                    Some(to) => {
                        let proof = wire::encode_audit(&self.dir()?.audit(from, to).await?)?;
                        let bytes = match to == from + 1 && to == latest {
                            true => steps.newest.bytes,
                            false => budget.bytes,
                        };
                        if proof.len() > bytes {
                            tracing::warn!(
                                from,
                                to,
                                bytes = proof.len(),
                                budget = bytes,
                                "an append-only step is larger than counted"
                            );
                        }
                        let step = match to == latest {
                            true => None,
                            false => Some(self.head_at(to, now).await?.ok_or_else(|| {
                                TransparencyError::Directory(format!(
                                    "no head for epoch {to}, where an append-only step ends"
                                ))
                            })?),
                        };
                        Some(AppendOnlyFrom { from, proof, step })
                    }
                }
            }
            (Some(from), None) if from > 0 && from < head.head.epoch => {
                if head.head.epoch - from > MAX_SINCE_EPOCHS {
                    return Err(TransparencyError::Range(format!(
                        "since={from}: more than {MAX_SINCE_EPOCHS} epochs before the latest \
                         ({}); forget the remembered head and pin the domain's key again",
                        head.head.epoch
                    )));
                }
                if self.reach_back(from, latest, MAX_PROOF_ELEMENTS).await? > from {
                    return Err(TransparencyError::Range(format!(
                        "since={from}: the append-only proof to the latest epoch ({latest}) is \
                         larger than {} bytes, more than a client accepts; ask with steps=1 \
                         (kst client does), or forget the remembered head and pin the domain's \
                         key again",
                        wire::MAX_AUDIT_PROOF
                    )));
                }
                let proof = wire::encode_audit(&self.dir()?.audit(from, latest).await?)?;
                if proof.len() > wire::MAX_AUDIT_PROOF {
                    return Err(TransparencyError::Range(format!(
                        "since={from}: the append-only proof to the latest epoch ({latest}) is \
                         {} bytes, more than the {} a client accepts; ask with steps=1 (kst \
                         client does), or forget the remembered head and pin the domain's key \
                         again",
                        proof.len(),
                        wire::MAX_AUDIT_PROOF
                    )));
                }
                Some(AppendOnlyFrom {
                    from,
                    proof,
                    step: None,
                })
            }
            _ => None,
        };
        Ok(LogAnswer {
            head,
            proof,
            witnessed: None,
            append_only,
            too_far,
        })
    }

    /// [`Worker::bounded_audit`], again when another process committed meanwhile: a read of
    /// a tree node that process rewrote twice since this one read the root record is refused
    /// as torn ([`StoredDirectory`]'s guard; a node rewritten once still holds its version of
    /// the epoch read, so a proof read across one commit is the proof of that epoch's tree),
    /// and the proof is built again from fresh reads, at most [`MAX_ATTEMPTS`] times, as a
    /// look-up is. Before, the request failed (a witness's or auditor's `/audit`, 503).
    async fn audit(&self, from: u64, to: u64) -> Result<akd::AppendOnlyProof> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.refresh().await;
            let built_on = self.current().await.ok().map(|(e, _)| e);
            match self.bounded_audit(from, to).await {
                Err(e)
                    if attempt < MAX_ATTEMPTS
                        && !matches!(e, TransparencyError::Range(_))
                        && self.retryable(&e, built_on).await =>
                {
                    tracing::debug!(error = %e, from, to, "directory epoch moved during an audit; again");
                    back_off(attempt).await;
                }
                result => return result,
            }
        }
    }

    /// akd's append-only proof from `from` to `to`, built only when it holds at most
    /// [`MAX_PROOF_ELEMENTS`] ([`Worker::reach_back`]); a larger one is
    /// [`TransparencyError::Range`], unbuilt.
    async fn bounded_audit(&self, from: u64, to: u64) -> Result<akd::AppendOnlyProof> {
        if from < to
            && !self.counted_already(from, to).await?
            && self.reach_back(from, to, MAX_PROOF_ELEMENTS).await? > from
        {
            return Err(TransparencyError::Range(format!(
                "the append-only proof from epoch {from} to {to} is larger than {} bytes, more \
                 than a witness or client accepts: ask for a shorter range",
                wire::MAX_AUDIT_PROOF
            )));
        }
        self.dir()?.audit(from, to).await
    }

    /// The oldest epoch `e`, not before `lowest`, from which akd's append-only proof to `to`
    /// holds at most `max_elements` elements (`to` itself when not even the step from
    /// `to - 1` does): each step counted before anything is built, newest first
    /// ([`KeyDirectory::audit_step_walk_within`], at most `4 * max_elements` node reads in
    /// all, and 64 more per step: [`ReadBudget`]; a step that needs more ends the reach there,
    /// as one over the elements does). The steps of old epochs are the large ones (akd builds
    /// every step from the latest tree), so without this a request for a proof over many
    /// busy epochs made the server build hundreds of megabytes that every client refuses
    /// (red team round 10). The nodes read are added to [`DomainLog::step_reads`].
    async fn reach_back(&self, lowest: u64, to: u64, max_elements: usize) -> Result<u64> {
        let latest = self.current().await?;
        let (mut reached, mut left, mut reads) = (to, max_elements, 0usize);
        let mut budget = ReadBudget::for_elements(max_elements);
        let result: Result<()> = async {
            while reached > lowest {
                let walk = self
                    .dir()?
                    .audit_step_walk_within(reached - 1, left, &mut budget)
                    .await?;
                reads += walk.reads;
                match walk.count {
                    Some(c) => {
                        left -= c.elements();
                        reached -= 1;
                    }
                    None => break,
                }
            }
            Ok(())
        }
        .await;
        self.count_step_reads(reads);
        result?;
        self.counted.set(Some(CountedRange {
            from: reached,
            to,
            max_elements,
            latest,
        }));
        Ok(reached)
    }

    /// Whether the append-only proof from `from` to `to` is counted within
    /// [`MAX_PROOF_ELEMENTS`] already, on the directory as it is now: the last count
    /// ([`CountedRange`]) covered it and no epoch was committed since. The witnesses' part
    /// (its reach, then its audit), and an audit over epochs without a head (the count before
    /// they are signed late, then the audit's), counted the same range two or three times,
    /// each count reading as many tree nodes as the proof has elements, or more.
    async fn counted_already(&self, from: u64, to: u64) -> Result<bool> {
        let Some(c) = self.counted.get() else {
            return Ok(false);
        };
        if c.to != to || c.from > from || c.max_elements > MAX_PROOF_ELEMENTS {
            return Ok(false);
        }
        Ok(self.current().await? == c.latest)
    }

    /// How far from `from` (toward `latest`) one answer's append-only proof reaches within
    /// `steps.budget`, each step counted before anything is built; `None` when the step of
    /// `from` alone is over it or over [`FIRST_STEP_MAX_ELEMENTS`] (the answer is then
    /// `too-far`, built from nothing, after at most `4 * FIRST_STEP_MAX_ELEMENTS + 64` node
    /// reads). The step of the newest epoch (`from + 1 == latest`: a client one epoch
    /// behind) is counted against `steps.newest` instead, without the first-step cap: it is
    /// the smallest that epoch's step will ever be (later epochs only add to it), and what
    /// witnesses and auditors verify anyway; refusing it would send a client that follows
    /// every epoch to a restart (red-team round 5). Its count is kept for the epoch
    /// ([`NewestStep`]), so a refusal of it costs one walk per epoch, not one per request.
    /// The nodes read are added to [`DomainLog::step_reads`].
    async fn plan_steps(
        &self,
        from: u64,
        (latest, root): (u64, [u8; 32]),
        steps: Steps,
    ) -> Result<Option<u64>> {
        if from + 1 == latest {
            let newest = steps.newest;
            let count = self
                .newest_step_count(from, root, newest.bytes / STEP_ELEMENT_BYTES)
                .await?;
            let fits = count.is_some_and(|c| c.inserted <= newest.changes) && newest.epochs > 0;
            tracing::debug!(
                from,
                latest,
                ?count,
                fits,
                "the newest epoch's step counted"
            );
            return Ok(fits.then_some(latest));
        }
        let budget = steps.budget;
        let max_elements = budget.bytes / STEP_ELEMENT_BYTES;
        let (mut elements, mut inserted, mut to, mut reads) = (0usize, 0usize, from, 0usize);
        // The reads of all the steps' walks: 4 a budgeted element and 64 a step.
        let mut read_budget = ReadBudget::for_elements(max_elements);
        let result: Result<()> = async {
            while to < latest && to - from < budget.epochs {
                let left = max_elements.saturating_sub(elements);
                // The first step decides between an answer and a refusal: capped far below
                // the budget, so that a refusal costs a bounded walk.
                let cap = match to == from {
                    true => left.min(FIRST_STEP_MAX_ELEMENTS),
                    false => left,
                };
                let walk = self
                    .dir()?
                    .audit_step_walk_within(to, cap, &mut read_budget)
                    .await?;
                reads += walk.reads;
                match walk.count {
                    Some(c) if inserted + c.inserted <= budget.changes => {
                        elements += c.elements();
                        inserted += c.inserted;
                        to += 1;
                    }
                    _ => break,
                }
            }
            Ok(())
        }
        .await;
        self.count_step_reads(reads);
        result?;
        tracing::debug!(
            from,
            to,
            latest,
            elements,
            inserted,
            reads,
            "append-only steps counted"
        );
        Ok((to > from).then_some(to))
    }

    /// The size of the step from `from` to the latest epoch `from + 1` (whose root is
    /// `root`), or `None` when it holds more than `cap` elements: from
    /// [`Worker::newest_step`] when what was counted there answers it, else walked (and
    /// kept).
    async fn newest_step_count(
        &self,
        from: u64,
        root: [u8; 32],
        cap: usize,
    ) -> Result<Option<super::directory::StepCount>> {
        let known = self.newest_step.get();
        if let Some(known) = known.filter(|k| k.from == from && k.root == root) {
            match known.count {
                Some(c) => return Ok((c.elements() <= cap).then_some(c)),
                None if cap <= known.cap => return Ok(None),
                None => {}
            }
        }
        let walk = self.dir()?.audit_step_walk(from, cap).await?;
        self.count_step_reads(walk.reads);
        self.newest_step.set(Some(NewestStep {
            from,
            root,
            cap,
            count: walk.count,
        }));
        Ok(walk.count)
    }

    fn count_step_reads(&self, reads: usize) {
        self.step_reads
            .fetch_add(reads as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The stored head of `epoch` if it is the latest; else a head stored for it, if any.
    async fn head_at(&self, epoch: u64, now: u64) -> Result<Option<SignedHead>> {
        let (latest, root) = self.current().await?;
        if epoch == latest {
            return self.ensure_head(epoch, root, now).await.map(Some);
        }
        if epoch > latest {
            return Ok(None);
        }
        let mut stored = self
            .store
            .heads(&self.keys.domain, epoch, epoch)
            .await
            .map_err(store_error)?;
        if stored.is_empty() {
            // An older epoch without a head (signed late, docs/TRANSPARENCY.md).
            self.fill_heads(epoch, epoch, now).await?;
            stored = self
                .store
                .heads(&self.keys.domain, epoch, epoch)
                .await
                .map_err(store_error)?;
        }
        match stored.into_iter().next() {
            Some((_, blob)) => self.check_stored(epoch, None, &blob).map(Some),
            None => Ok(None),
        }
    }

    /// The stored head of `epoch`, whose root the directory says is `root_hash`; signed at
    /// `now` and stored first if there is none (of two writers signing at once the first's
    /// stays). A stored head with another root, domain, VRF key or signer means the store
    /// holds another directory's heads: [`TransparencyError::Directory`], for an operator.
    async fn ensure_head(&self, epoch: u64, root_hash: [u8; 32], now: u64) -> Result<SignedHead> {
        let head = self.ensure_head_once(epoch, root_hash, now).await?;
        self.head_known.set(Some((epoch, root_hash)));
        Ok(head)
    }

    /// [`Worker::ensure_head`] before building on `epoch`: nothing to read when this writer
    /// stored or checked that head already.
    async fn head_before_building(&self, epoch: u64, root_hash: [u8; 32], now: u64) -> Result<()> {
        if self.head_known.get() != Some((epoch, root_hash)) {
            self.ensure_head(epoch, root_hash, now).await?;
        }
        Ok(())
    }

    /// The head of an epoch this writer just committed: signed and stored at once (a head
    /// another writer stored for it first stays, and is checked, as in
    /// [`Worker::ensure_head`]).
    async fn store_head(&self, epoch: u64, root_hash: [u8; 32], now: u64) -> Result<SignedHead> {
        let text = head_text(&self.sign(epoch, root_hash, now)?)?;
        let blob = self
            .store
            .insert_head(&self.keys.domain, epoch, text.as_bytes())
            .await
            .map_err(store_error)?;
        let head = self.check_stored(epoch, Some(root_hash), &blob)?;
        self.head_known.set(Some((epoch, root_hash)));
        Ok(head)
    }

    async fn ensure_head_once(
        &self,
        epoch: u64,
        root_hash: [u8; 32],
        now: u64,
    ) -> Result<SignedHead> {
        let domain = &self.keys.domain;
        let stored = self
            .store
            .heads(domain, epoch, epoch)
            .await
            .map_err(store_error)?;
        let blob = match stored.into_iter().next() {
            Some((_, blob)) => blob,
            None => {
                let text = head_text(&self.sign(epoch, root_hash, now)?)?;
                self.store
                    .insert_head(domain, epoch, text.as_bytes())
                    .await
                    .map_err(store_error)?
            }
        };
        self.check_stored(epoch, Some(root_hash), &blob)
    }

    /// [`check_stored_head`] with this log's keys; a stored head that fails it is logged as
    /// an error (an operator must look).
    fn check_stored(
        &self,
        epoch: u64,
        root_hash: Option<[u8; 32]>,
        blob: &[u8],
    ) -> Result<SignedHead> {
        check_stored_head(
            &self.keys.domain,
            &self.keys.vrf.public_key()?,
            &self.keys.head.public_key(),
            epoch,
            root_hash,
            blob,
        )
        .inspect_err(|e| {
            tracing::error!(domain = %self.keys.domain, epoch, error = %e, "a stored head is not the directory's; nothing is served or signed on it");
        })
    }

    fn sign(&self, epoch: u64, root_hash: [u8; 32], now: u64) -> Result<SignedHead> {
        self.keys.head.sign(Head {
            domain: self.keys.domain.clone(),
            epoch,
            root_hash,
            vrf_public_key: self.keys.vrf.public_key()?,
            signed_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewKey;

    /// Version `version` of a@example.net holding key `n`.
    fn rec(version: u64, n: u64) -> KeyRecord {
        NewKey {
            address: crate::AddressPolicy::default()
                .normalize("a@example.net")
                .unwrap(),
            key: format!("key {n}").into_bytes(),
            fingerprint: crate::Fingerprint::parse(&format!("{n:040X}")).unwrap(),
            publication_id: format!("{n:032x}"),
            published_at: 1_700_000_000 + n,
            revoked: false,
            expected: crate::store::Expected::Any,
        }
        .into_record(version)
    }

    fn entry(version: u64, n: u64) -> DirectoryEntry {
        DirectoryEntry::for_record(&rec(version, n))
    }

    #[test]
    fn the_next_step_keeps_the_store_order() {
        let step = |current: Option<&KeyRecord>, latest: Option<&DirectoryEntry>| {
            next_step(current, latest, None, false, 99)
        };
        // Nothing to do, first publication, the next version.
        assert_eq!(step(None, None), Step::Nothing);
        assert_eq!(step(Some(&rec(1, 1)), None), Step::Record(entry(1, 1)));
        assert_eq!(
            step(Some(&rec(2, 2)), Some(&entry(1, 1))),
            Step::Record(entry(2, 2))
        );
        assert_eq!(step(Some(&rec(2, 2)), Some(&entry(2, 2))), Step::Nothing);
        // Versions the directory lacks come first, oldest first.
        assert_eq!(step(Some(&rec(5, 5)), Some(&entry(2, 2))), Step::Fill(3));
        assert_eq!(step(Some(&rec(3, 3)), None), Step::Fill(1));
        assert_eq!(
            next_step(Some(&rec(3, 3)), None, None, true, 99),
            Step::Record(entry(3, 3)),
            "migrate records the current key of an unknown address"
        );
        // Never an older or equal version as newer: a deletion first.
        assert_eq!(
            step(Some(&rec(2, 7)), Some(&entry(4, 4))),
            Step::DeleteFirst(DirectoryEntry::deleted(5, 99))
        );
        assert_eq!(
            step(Some(&rec(2, 7)), Some(&entry(2, 2))),
            Step::DeleteFirst(DirectoryEntry::deleted(3, 99))
        );
        // After a deletion the store counts from 1 again.
        let deleted = DirectoryEntry::deleted(5, 50);
        assert_eq!(
            step(Some(&rec(1, 8)), Some(&deleted)),
            Step::Record(entry(1, 8))
        );
        assert_eq!(step(None, Some(&deleted)), Step::Nothing);
        // A deletion: the directory's latest + 1, or the store's deleted version + 1.
        assert_eq!(
            step(None, Some(&entry(4, 4))),
            Step::Record(DirectoryEntry::deleted(5, 99))
        );
        assert_eq!(
            next_step(None, Some(&entry(4, 4)), Some(7), false, 99),
            Step::Record(DirectoryEntry::deleted(7, 99))
        );
    }
}
