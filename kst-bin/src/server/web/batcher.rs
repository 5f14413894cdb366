//! The queue and the worker tasks that [`super::batch`] (look-ups read together) and
//! [`super::coalesce`] (counter hits counted together) share: what each caller asks joins a
//! bounded queue; when fewer than `max_in_flight` batches are at work, a worker task starts at
//! once and takes what is queued; otherwise the request waits until a worker is done with its
//! batch and takes everything queued meanwhile (up to `max_batch` a batch). So a lone request
//! waits for nothing, and under load a batch holds the requests that arrived during the
//! previous one's round trip.
//!
//! What differs stays with each user, as a [`Job`]: what one request is, how a batch is taken
//! off the queue (the look-ups: each address once, leaving out requests whose caller went
//! away; the counters: whole requests, every hit counted even for a caller gone), how a batch
//! is done and its answers given out (errors of a batch to all its callers, the look-ups'
//! halving around a corrupt record), and who may join a full queue (the `admit` of
//! [`Batcher::enqueue`]: the look-ups drop requests nobody waits for first; the counters count
//! room held ahead for misses, [`Queue::hold`]).
//!
//! Each client's share of a queue is bounded: past half the bound, a client (the listener's
//! guard runs each request in [`for_client`]) may hold at most 1/[`CLIENT_SHARE`] of it,
//! queued and held together ([`Queue::within_share`]), so that a few clients flooding while
//! the store or the counters are slow fill at most half the queue and their shares, and
//! another client's request still finds room (before, 8 clients with 64 look-ups each could
//! fill the counters' queue, and every other client was answered 503). The clients of one
//! network (an IPv6 /48) may hold at most 1/[`NETWORK_SHARE`] of it together past half the
//! bound: a client is an IPv6 /64, and anyone with a /56 (a home connection's delegation)
//! holds 256 of them, 9 of which filled a queue within their shares (red team, counters and
//! shares). Requests of no client (kst's own tasks) take no share.
//!
//! Common to both: each caller is answered through a oneshot channel, so a caller that goes
//! away (its client closed the connection) cancels nothing of the others' batch; a worker runs
//! as a task of its own; a worker that panics hands its place to a new one ([`WorkerGuard`]),
//! so that nobody waits for a worker that is gone; a caller whose worker ended without
//! answering gets a temporary error.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use kst_core::{Error, Result};
use tokio::sync::oneshot;

/// Parts of a queue's bound one client may hold once the queue is half full (see the module
/// documentation): 32 of the read batcher's 512 look-ups, 64 of the counters' 1,024 hits.
pub const CLIENT_SHARE: usize = 16;

/// Parts of a queue's bound the clients of one network (an IPv6 /48) may hold together once
/// the queue is half full: 128 of the read batcher's 512 look-ups, 256 of the counters'
/// 1,024 hits. A network that took more while the queue was less than half full adds
/// nothing more past it.
pub const NETWORK_SHARE: usize = 4;

/// Who a request is for ([`for_client`]): its client (as the limits count it) and the network
/// it belongs to, if its clients share a larger part of a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Client {
    key: Arc<str>,
    network: Option<Arc<str>>,
}

impl Client {
    /// The network it belongs to, if its clients share a larger part of a bound.
    pub(super) fn network(&self) -> Option<&Arc<str>> {
        self.network.as_ref()
    }
}

tokio::task_local! {
    /// The client the request being served is for ([`for_client`]).
    static CLIENT: Client;
}

/// Runs `fut` (one request's handling) as the request of `client` in `network` (an IPv6 /48;
/// `None` for an IPv4 client): what it queues in a [`Batcher`] counts against that client's
/// share and its network's.
pub(super) async fn for_client<F: Future>(
    client: &str,
    network: Option<&str>,
    fut: F,
) -> F::Output {
    let client = Client {
        key: Arc::from(client),
        network: network.map(Arc::from),
    };
    CLIENT.scope(client, fut).await
}

/// The client of the request being served, if any ([`for_client`]).
pub(super) fn current_client() -> Option<Client> {
    CLIENT.try_with(Client::clone).ok()
}

/// One caller's request, what it takes of the queue's bound, and where its answer goes.
pub(super) struct Pending<R, A> {
    /// What the caller asks (an address; hits).
    pub(super) request: R,
    /// Its share of the bound: 1 for a look-up, its hits for the counters.
    units: usize,
    /// The client it is for (`None`: kst's own).
    client: Option<Client>,
    reply: oneshot::Sender<Result<A>>,
}

impl<R, A> Pending<R, A> {
    /// A request of no client taking `units` of the bound, answered on `reply`.
    #[cfg(test)]
    pub(super) fn new(request: R, units: usize, reply: oneshot::Sender<Result<A>>) -> Self {
        Pending {
            request,
            units,
            client: None,
            reply,
        }
    }

    /// True when its caller went away (nobody reads the answer).
    pub(super) fn is_gone(&self) -> bool {
        self.reply.is_closed()
    }

    /// Its request and where its answer goes.
    pub(super) fn into_parts(self) -> (R, oneshot::Sender<Result<A>>) {
        (self.request, self.reply)
    }
}

/// The requests waiting for a batch, the units of the bound they take, room held for requests
/// to come, and the workers at work.
pub(super) struct Queue<R, A> {
    waiting: VecDeque<Pending<R, A>>,
    /// Units of the requests in `waiting`.
    units: usize,
    /// Units held ahead for requests not yet queued ([`Queue::hold`]).
    held: usize,
    /// Units queued and held per client (clients with none are not kept).
    by_client: HashMap<Arc<str>, usize>,
    /// Units queued and held per network, of all its clients (likewise).
    by_network: HashMap<Arc<str>, usize>,
    /// Worker tasks running.
    workers: usize,
}

impl<R, A> Default for Queue<R, A> {
    fn default() -> Self {
        Queue {
            waiting: VecDeque::new(),
            units: 0,
            held: 0,
            by_client: HashMap::new(),
            by_network: HashMap::new(),
            workers: 0,
        }
    }
}

/// What a request asks of a queue's bound, for the `admit` of [`Batcher::enqueue`].
pub(super) struct Ask<'a> {
    /// Its units.
    pub(super) units: usize,
    /// Its client.
    pub(super) client: Option<&'a Client>,
    /// The bound.
    pub(super) max_queued: usize,
}

impl<R, A> Queue<R, A> {
    /// Requests waiting.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Units the waiting requests take.
    pub(super) fn units(&self) -> usize {
        self.units
    }

    /// Units held ahead.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// The next request, if any.
    pub(super) fn front(&self) -> Option<&Pending<R, A>> {
        self.waiting.front()
    }

    /// Takes the next request off the queue.
    pub(super) fn pop_front(&mut self) -> Option<Pending<R, A>> {
        let p = self.waiting.pop_front()?;
        self.units -= p.units;
        self.refund(p.client.as_ref(), p.units);
        Some(p)
    }

    /// Drops the requests whose caller went away.
    pub(super) fn drop_gone(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for p in waiting {
            if p.is_gone() {
                self.units -= p.units;
                self.refund(p.client.as_ref(), p.units);
            } else {
                self.waiting.push_back(p);
            }
        }
    }

    /// Holds `units` of the bound for a request of `client` to come.
    pub(super) fn hold(&mut self, units: usize, client: Option<&Client>) {
        self.held += units;
        self.charge(client, units);
    }

    /// Gives back `units` held with [`Queue::hold`] for `client`.
    pub(super) fn release(&mut self, units: usize, client: Option<&Client>) {
        self.held -= units;
        self.refund(client, units);
    }

    /// Units `client` has queued and held now.
    pub(super) fn of_client(&self, client: &str) -> usize {
        self.by_client.get(client).copied().unwrap_or(0)
    }

    /// Units the clients of `network` have queued and held now.
    pub(super) fn of_network(&self, network: &str) -> usize {
        self.by_network.get(network).copied().unwrap_or(0)
    }

    /// Whether the request `ask` stays within its client's share: always for a request of no
    /// client, and while the queue (queued, held and these units) is within half the bound;
    /// past it, only while the client's units and these stay within `max_queued /`
    /// [`CLIENT_SHARE`], and its network's within `max_queued /` [`NETWORK_SHARE`] (each at
    /// least 1).
    pub(super) fn within_share(&self, ask: &Ask<'_>) -> bool {
        let Some(client) = ask.client else {
            return true;
        };
        if self.units + self.held + ask.units <= ask.max_queued / 2 {
            return true;
        }
        let share = (ask.max_queued / CLIENT_SHARE).max(1);
        let network_share = (ask.max_queued / NETWORK_SHARE).max(1);
        self.of_client(&client.key) + ask.units <= share
            && client
                .network
                .as_ref()
                .is_none_or(|n| self.of_network(n) + ask.units <= network_share)
    }

    fn charge(&mut self, client: Option<&Client>, units: usize) {
        if let Some(c) = client
            && units > 0
        {
            *self.by_client.entry(Arc::clone(&c.key)).or_insert(0) += units;
            if let Some(n) = &c.network {
                *self.by_network.entry(Arc::clone(n)).or_insert(0) += units;
            }
        }
    }

    fn refund(&mut self, client: Option<&Client>, units: usize) {
        let Some(c) = client else {
            return;
        };
        let maps = [
            (&mut self.by_client, Some(&c.key)),
            (&mut self.by_network, c.network.as_ref()),
        ];
        for (map, key) in maps {
            if let Some(key) = key
                && let Some(n) = map.get_mut(key)
            {
                *n = n.saturating_sub(units);
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }

    fn push_back(&mut self, p: Pending<R, A>) {
        self.units += p.units;
        self.charge(p.client.as_ref(), p.units);
        self.waiting.push_back(p);
    }

    #[cfg(test)]
    pub(super) fn push_for_test(&mut self, p: Pending<R, A>) {
        self.push_back(p);
    }

    /// Pretends `n` workers are busy with their batches (nothing is taken off meanwhile).
    #[cfg(test)]
    pub(super) fn set_workers_for_test(&mut self, n: usize) {
        self.workers = n;
    }

    #[cfg(test)]
    pub(super) fn workers(&self) -> usize {
        self.workers
    }
}

/// What a [`Batcher`] does with its queue: the look-ups' reads, the counters' hits.
pub(super) trait Job: Send + Sync + 'static {
    /// What one caller asks.
    type Request: Send + 'static;
    /// What one caller is answered (as `Result<Answer>`).
    type Answer: Send + 'static;
    /// What a worker takes off the queue at once.
    type Batch: Send + 'static;

    /// The component named in this job's errors (`store(read batch)`).
    const COMPONENT: &'static str;
    /// What a worker does, for a caller whose worker ended before it answered (`reading this
    /// batch of look-ups`).
    const WORK: &'static str;

    /// The next batch off `queue`, at most `max_batch` (as the job counts it); `None` when
    /// there is nothing to do, and the worker ends.
    fn take(
        queue: &mut Queue<Self::Request, Self::Answer>,
        max_batch: usize,
    ) -> Option<Self::Batch>;

    /// Does `batch` and answers each of its callers.
    fn run(&self, batch: Self::Batch) -> impl Future<Output = ()> + Send;
}

/// The error of a caller whose worker ended before it answered.
pub(super) fn lost<J: Job>() -> Error {
    Error::unavailable(
        J::COMPONENT,
        format!("the task {} ended before it answered", J::WORK),
    )
}

/// The bounds of a [`Batcher`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Most batches at work at once (at least 1).
    pub(super) max_in_flight: usize,
    /// Most a batch takes, as the job counts it (at least 1).
    pub(super) max_batch: usize,
    /// Most units waiting (at least 1); what `admit` compares with.
    pub(super) max_queued: usize,
}

struct Shared<J: Job> {
    job: J,
    queue: Mutex<Queue<J::Request, J::Answer>>,
    limits: Limits,
}

impl<J: Job> Shared<J> {
    fn lock(&self) -> MutexGuard<'_, Queue<J::Request, J::Answer>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A bounded queue of requests done in batches by at most `max_in_flight` worker tasks (see
/// the module documentation). Needs a Tokio runtime to do work. Cheap to clone (clones share
/// the queue).
pub(super) struct Batcher<J: Job> {
    shared: Arc<Shared<J>>,
}

impl<J: Job> Clone for Batcher<J> {
    fn clone(&self) -> Self {
        Batcher {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<J: Job> Batcher<J> {
    /// Does `job` within `limits` (each raised to at least 1).
    pub(super) fn new(job: J, limits: Limits) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                job,
                queue: Mutex::default(),
                limits: Limits {
                    max_in_flight: limits.max_in_flight.max(1),
                    max_batch: limits.max_batch.max(1),
                    max_queued: limits.max_queued.max(1),
                },
            }),
        }
    }

    /// The job.
    pub(super) fn job(&self) -> &J {
        &self.shared.job
    }

    /// The bounds.
    pub(super) fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// The queue, locked.
    pub(super) fn lock(&self) -> MutexGuard<'_, Queue<J::Request, J::Answer>> {
        self.shared.lock()
    }

    /// True when `other` shares this one's queue.
    pub(super) fn same(&self, other: &Batcher<J>) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Queues `request` of `client`, taking `units` of the bound, when `admit(queue, ask)`
    /// (called under the queue's lock) lets it in, and starts a worker when fewer than
    /// `max_in_flight` are at work; then the [`Ticket`] waits for its answer. Refused: `Err`
    /// with what `admit` said (the units in use, for the caller's error).
    pub(super) fn enqueue(
        &self,
        request: J::Request,
        units: usize,
        client: Option<Client>,
        admit: impl FnOnce(
            &mut Queue<J::Request, J::Answer>,
            &Ask<'_>,
        ) -> std::result::Result<(), usize>,
    ) -> std::result::Result<Ticket<J>, usize> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.shared.lock();
            let ask = Ask {
                units,
                client: client.as_ref(),
                max_queued: self.shared.limits.max_queued,
            };
            admit(&mut q, &ask)?;
            q.push_back(Pending {
                request,
                units,
                client,
                reply,
            });
            let start = q.workers < self.shared.limits.max_in_flight;
            if start {
                q.workers += 1;
            }
            start
        };
        if start {
            tokio::spawn(work(Arc::clone(&self.shared)));
        }
        Ok(Ticket {
            answer,
            job: std::marker::PhantomData,
        })
    }

    /// A worker for what is queued now, not counted in `max_in_flight` (a test's stand-in for
    /// a worker that was busy and is done with its batch).
    #[cfg(test)]
    pub(super) fn work_for_test(&self) -> impl Future<Output = ()> + Send + 'static {
        work(Arc::clone(&self.shared))
    }
}

/// A queued request's answer to come.
pub(super) struct Ticket<J: Job> {
    answer: oneshot::Receiver<Result<J::Answer>>,
    job: std::marker::PhantomData<fn() -> J>,
}

impl<J: Job> Ticket<J> {
    /// Waits for the answer; a temporary error when its worker ended without one.
    pub(super) async fn answer(self) -> Result<J::Answer> {
        self.answer.await.unwrap_or_else(|_| Err(lost::<J>()))
    }
}

/// Ends a worker: on a normal end it has already left the count (under the lock, when it found
/// nothing to do); when it panicked, this leaves it and starts another worker for what is
/// queued, so that nobody waits for a worker that is gone.
struct WorkerGuard<J: Job> {
    shared: Arc<Shared<J>>,
    done: bool,
}

impl<J: Job> Drop for WorkerGuard<J> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut q = self.shared.lock();
        if q.waiting.is_empty() {
            q.workers -= 1;
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Takes this worker's place.
            rt.spawn(work(Arc::clone(&self.shared)));
        } else {
            q.workers -= 1;
            while let Some(p) = q.pop_front() {
                let _ = p.reply.send(Err(lost::<J>()));
            }
        }
    }
}

/// Does batches off the queue until the job finds nothing to take.
async fn work<J: Job>(shared: Arc<Shared<J>>) {
    let mut guard = WorkerGuard {
        shared: Arc::clone(&shared),
        done: false,
    };
    loop {
        let batch = {
            let mut q = shared.lock();
            match J::take(&mut q, shared.limits.max_batch) {
                Some(batch) => batch,
                None => {
                    q.workers -= 1;
                    guard.done = true;
                    return;
                }
            }
        };
        shared.job.run(batch).await;
    }
}
