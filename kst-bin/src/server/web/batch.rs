//! Look-ups by address of concurrent web requests read together: one
//! [`KeyStore::get_many`] (one PostgreSQL statement, one Redis command) for many requests,
//! instead of a round trip per request. A look-up costs the store's client and server mostly
//! per round trip (the statement, the command), little per address. [`super::StoreLookup`]
//! puts one in front of a store whose [`KeyStore::batches_reads`] says so (PostgreSQL, Redis
//! on one server); on the fs store each look-up reads its file alone, as before.
//!
//! It works like the counters' [`super::coalesce`], on the same queue and tasks
//! ([`super::batcher`]): a request's address joins a queue. When
//! fewer than [`MAX_IN_FLIGHT`] batches are being read, a reader task starts at once and
//! reads what is queued; otherwise the address waits until a reader is done with its batch
//! and takes everything queued meanwhile (up to [`MAX_BATCH`] addresses a batch, each
//! address once however many requests ask for it). So a lone request waits for nothing (and
//! is read with [`KeyStore::get`], as before), and under load a batch holds the requests
//! that arrived during the previous one's round trip.
//!
//! Each request gets the answer for its own address, exactly what [`KeyStore::get`] would
//! answer (the conformance suite checks `get_many` against `get`). A reader runs as a task of
//! its own, so a request that goes away (its client closed the connection) does not cancel
//! the others' batch; one that went away before its batch was taken is left out of it. An
//! error of the store is the error of every request of that batch, when it says the store is
//! unavailable (down, timed out: the listener answers 503 as for a lone look-up, and the
//! requests are not read again one by one, which would multiply the load on a store that is
//! struggling); any other error (a corrupt record of one address) reads the batch again in
//! halves, down to the address alone, so that it is the error of the requests for that
//! address only, at a cost of about `2 log2(n)` round trips for a batch of `n` addresses, not
//! `n` (an unavailable store met on the way fails what is not read yet).
//!
//! The queue is bounded ([`MAX_QUEUED`] requests): while the store is slow or stalled, a
//! request that does not fit is refused at once with a temporary error (503 with
//! `Retry-After`, counted in `kst_web_lookups_busy_total`) rather than sent alone, which
//! would add round trips to a store that is already behind, or queued without bound behind
//! batches that wait for the store's timeout. Only requests still waiting for their answer
//! count: those whose caller went away are dropped from a full queue before a request is
//! refused, so a client that sends look-ups and closes its connections holds no more of the
//! queue than its open connections. Past half the bound, one client's look-ups may take at
//! most 1/16 of it ([`super::batcher::CLIENT_SHARE`]: 32), so that a few clients flooding
//! while the store is slow leave room for the others.

use std::collections::HashMap;
use std::sync::Arc;

use kst_core::{Address, Error, KeyRecord, KeyStore, Result};
use tokio::sync::oneshot;

use super::batcher::{self, Ask, Batcher, Job, Limits};

/// Most batches being read at once (each one round trip to the store).
pub const MAX_IN_FLIGHT: usize = 2;

/// Most distinct addresses in one batch (at most [`kst_core::store::MAX_GET_MANY`], one
/// round trip).
pub const MAX_BATCH: usize = 128;

/// Most look-ups waiting for a batch (four batches' worth); one more is refused at once as a
/// temporary failure. Under load the store keeps up with, the queue holds what arrived during
/// one round trip, far below the bound.
pub const MAX_QUEUED: usize = 4 * MAX_BATCH;

/// The look-ups waiting: each request's address (one unit of the bound each).
type Queue = batcher::Queue<Address, Option<KeyRecord>>;

/// The reads of a [`ReadBatcher`]: batches of addresses from `store`.
struct Reading {
    store: Arc<dyn KeyStore>,
}

impl Job for Reading {
    type Request = Address;
    type Answer = Option<KeyRecord>;
    type Batch = Batch;

    const COMPONENT: &'static str = "store(read batch)";
    const WORK: &'static str = "reading this batch of look-ups";

    fn take(queue: &mut Queue, max_batch: usize) -> Option<Batch> {
        let batch = next_batch(queue, max_batch);
        (!batch.requests.is_empty()).then_some(batch)
    }

    async fn run(&self, batch: Batch) {
        let answers = read_batch(&*self.store, &batch.addresses).await;
        answer(batch, answers);
    }
}

/// Reads the look-ups by address of concurrent callers together from its store (see the
/// module documentation). Needs a Tokio runtime. Cheap to clone (clones share the queue).
#[derive(Clone)]
pub struct ReadBatcher {
    batcher: Batcher<Reading>,
}

impl ReadBatcher {
    /// Reads from `store`, at most [`MAX_IN_FLIGHT`] batches of [`MAX_BATCH`] addresses at
    /// once, at most [`MAX_QUEUED`] look-ups waiting.
    pub fn new(store: Arc<dyn KeyStore>) -> ReadBatcher {
        ReadBatcher::with_limits(store, MAX_IN_FLIGHT, MAX_BATCH, MAX_QUEUED)
    }

    /// Reads from `store`, at most `max_in_flight` batches (at least 1) of `max_batch`
    /// distinct addresses (at least 1, at most [`kst_core::store::MAX_GET_MANY`]) at once, at
    /// most `max_queued` look-ups (at least 1) waiting.
    pub fn with_limits(
        store: Arc<dyn KeyStore>,
        max_in_flight: usize,
        max_batch: usize,
        max_queued: usize,
    ) -> ReadBatcher {
        let limits = Limits {
            max_in_flight,
            max_batch: max_batch.clamp(1, kst_core::store::MAX_GET_MANY),
            max_queued,
        };
        ReadBatcher {
            batcher: Batcher::new(Reading { store }, limits),
        }
    }

    /// The store read from.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.batcher.job().store
    }

    /// Look-ups waiting for a batch now (not those being read).
    pub fn queued(&self) -> usize {
        self.batcher.lock().len()
    }

    /// The current key of `address`, as [`KeyStore::get`] answers it, read in a batch with
    /// the concurrent look-ups; a temporary error at once when [`MAX_QUEUED`] look-ups are
    /// waiting already, or when the queue is half full and the client of this request
    /// ([`super::batcher::for_client`]) has its share of it waiting
    /// ([`super::batcher::CLIENT_SHARE`]).
    pub async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
        let admit = |q: &mut Queue, ask: &Ask<'_>| {
            if q.len() >= ask.max_queued || !q.within_share(ask) {
                // Requests whose caller went away hold no place: they need no answer (red
                // team round 9: a client that sent look-ups and closed their connections left
                // them queued until a batch took them, and so filled the queue of everyone
                // beyond its own connections' share while the store was slow).
                q.drop_gone();
            }
            if q.len() >= ask.max_queued || !q.within_share(ask) {
                Err(q.len())
            } else {
                Ok(())
            }
        };
        let client = batcher::current_client();
        match self.batcher.enqueue(address.clone(), 1, client, admit) {
            Ok(ticket) => ticket.answer().await,
            Err(queued) => {
                super::metrics::lookups_busy();
                Err(busy(self.store().name(), queued))
            }
        }
    }
}

impl std::fmt::Debug for ReadBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limits = self.batcher.limits();
        f.debug_struct("ReadBatcher")
            .field("store", &self.store().name())
            .field("max_in_flight", &limits.max_in_flight)
            .field("max_batch", &limits.max_batch)
            .field("max_queued", &limits.max_queued)
            .finish()
    }
}

/// The refusal of a look-up that does not fit in the queue.
fn busy(store: &str, queued: usize) -> Error {
    Error::unavailable(
        "store(read batch)",
        format!(
            "{queued} look-ups are waiting for the {store} store already (it is slow or \
             stalled); try again later"
        ),
    )
}

fn lost() -> Error {
    batcher::lost::<Reading>()
}

/// One batch: its distinct addresses, and for each request the index of its address.
struct Batch {
    addresses: Vec<Address>,
    requests: Vec<(usize, oneshot::Sender<Result<Option<KeyRecord>>>)>,
}

/// Takes the next batch off `queue`: requests in order while their distinct addresses fit in
/// `max_batch`; requests whose caller went away are dropped.
fn next_batch(queue: &mut Queue, max_batch: usize) -> Batch {
    let mut batch = Batch {
        addresses: Vec::new(),
        requests: Vec::new(),
    };
    let mut index: HashMap<Address, usize> = HashMap::new();
    while let Some(p) = queue.front() {
        if p.is_gone() {
            queue.pop_front();
            continue;
        }
        let known = index.get(&p.request).copied();
        if known.is_none() && batch.addresses.len() >= max_batch {
            break;
        }
        let Some((address, reply)) = queue.pop_front().map(batcher::Pending::into_parts) else {
            break;
        };
        let i = match known {
            Some(i) => i,
            None => {
                let i = batch.addresses.len();
                index.insert(address.clone(), i);
                batch.addresses.push(address);
                i
            }
        };
        batch.requests.push((i, reply));
    }
    batch
}

/// The answer for each of `addresses` (distinct): one `get` for one address, one
/// `get_many` for more. When that fails for another reason than an unavailable store (a
/// record that cannot be read), the batch is read again in halves, each half that fails
/// again in halves, down to single addresses read with `get`: a corrupt record costs its
/// batch about `2 log2(n)` more round trips, not one per address (red team round 9: a client
/// asking for an address whose record is corrupt made every batch it joined `n` round trips
/// long, holding one of the [`MAX_IN_FLIGHT`] readers meanwhile). An unavailable store
/// (down, timed out) fails the part read and everything not read yet with that error, which
/// is not read again (before, the addresses were read one by one to the end, each waiting
/// for the store's timeout).
async fn read_batch(store: &dyn KeyStore, addresses: &[Address]) -> Vec<Result<Option<KeyRecord>>> {
    let mut answers: Vec<Option<Result<Option<KeyRecord>>>> = vec![None; addresses.len()];
    // Parts of `addresses` (start, end) still to read, the next one last.
    let mut todo = vec![(0, addresses.len())];
    while let Some((start, end)) = todo.pop() {
        let part = &addresses[start..end];
        let read = match part {
            [address] => store.get(address).await.map(|r| vec![r]),
            _ => match store.get_many(part).await {
                Ok(records) if records.len() == part.len() => Ok(records),
                Ok(records) => Err(Error::corrupt(
                    "store(read batch)",
                    format!(
                        "{} answered {} records for {} addresses",
                        store.name(),
                        records.len(),
                        part.len()
                    ),
                )),
                Err(e) => Err(e),
            },
        };
        match read {
            Ok(records) => {
                for (slot, record) in answers[start..end].iter_mut().zip(records) {
                    *slot = Some(Ok(record));
                }
            }
            Err(e @ Error::Unavailable { .. }) => {
                todo.push((start, end));
                for (s, e2) in todo.drain(..) {
                    for slot in &mut answers[s..e2] {
                        *slot = Some(Err(e.clone()));
                    }
                }
            }
            Err(e) if part.len() == 1 => answers[start] = Some(Err(e)),
            Err(_) => {
                let middle = start + part.len() / 2;
                todo.push((middle, end));
                todo.push((start, middle));
            }
        }
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(lost())))
        .collect()
}

/// Sends each request of `batch` the answer for its address.
fn answer(batch: Batch, mut answers: Vec<Result<Option<KeyRecord>>>) {
    // How many requests still want each answer: the last one takes it, the others a clone.
    let mut wanted = vec![0usize; answers.len()];
    for (i, _) in &batch.requests {
        wanted[*i] += 1;
    }
    for (i, reply) in batch.requests {
        wanted[i] -= 1;
        let mine = match wanted[i] {
            0 => std::mem::replace(&mut answers[i], Ok(None)),
            _ => answers[i].clone(),
        };
        // A request that went away no longer listens; the others got theirs.
        let _ = reply.send(mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use kst_core::wkd::WkdHash;
    use kst_core::{Fingerprint, KeyId, NewKey, PublishOutcome};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    fn addr(local: &str) -> Address {
        kst_core::AddressPolicy::default()
            .normalize(&format!("{local}@example.net"))
            .unwrap()
    }

    fn record(local: &str) -> KeyRecord {
        NewKey {
            address: addr(local),
            key: local.as_bytes().to_vec(),
            fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
            publication_id: "aa".into(),
            published_at: 1_700_000_000,
            revoked: false,
            expected: kst_core::Expected::Any,
        }
        .into_record(1)
    }

    /// Look-ups only, from a map; each call takes a while (a round trip) and is counted. One
    /// address may be unreadable (a corrupt record); `down` fails every call as unavailable.
    #[derive(Default)]
    struct Reads {
        keys: HashMap<Address, KeyRecord>,
        corrupt: Option<Address>,
        down: AtomicBool,
        delay: Option<Duration>,
        gets: AtomicUsize,
        batches: AtomicUsize,
        largest: AtomicUsize,
        /// Unavailable from the call after this many calls (`get` and `get_many`) on.
        down_after: Option<usize>,
    }

    impl Reads {
        fn with(locals: &[&str]) -> Reads {
            Reads {
                keys: locals.iter().map(|l| (addr(l), record(l))).collect(),
                ..Reads::default()
            }
        }

        async fn read(&self, address: &Address) -> Result<Option<KeyRecord>> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::unavailable("store(reads)", "down for the test"));
            }
            if self.corrupt.as_ref() == Some(address) {
                return Err(Error::corrupt("store(reads)", "unreadable"));
            }
            Ok(self.keys.get(address).cloned())
        }

        /// Counts a call; unavailable once `down_after` calls were made.
        fn call(&self, counter: &AtomicUsize) -> Result<()> {
            counter.fetch_add(1, Ordering::SeqCst);
            let calls = self.gets.load(Ordering::SeqCst) + self.batches.load(Ordering::SeqCst);
            match self.down_after {
                Some(n) if calls > n => Err(Error::unavailable("store(reads)", "went down")),
                _ => Ok(()),
            }
        }

        async fn pause(&self) {
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
        }
    }

    #[async_trait]
    impl KeyStore for Reads {
        fn name(&self) -> &'static str {
            "reads"
        }
        async fn publish(&self, _: NewKey) -> Result<PublishOutcome> {
            Err(Error::Invalid("read-only".into()))
        }
        async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
            self.call(&self.gets)?;
            self.pause().await;
            self.read(address).await
        }
        async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
            self.call(&self.batches)?;
            self.largest.fetch_max(addresses.len(), Ordering::SeqCst);
            self.pause().await;
            let mut out = Vec::new();
            for a in addresses {
                out.push(self.read(a).await?);
            }
            Ok(out)
        }
        async fn history(&self, _: &Address) -> Result<Vec<KeyRecord>> {
            Ok(Vec::new())
        }
        async fn delete(&self, _: &Address) -> Result<bool> {
            Err(Error::Invalid("read-only".into()))
        }
        async fn list(&self, _: Option<&Address>, _: usize) -> Result<Vec<Address>> {
            Ok(Vec::new())
        }
        async fn restore(&self, _: &[KeyRecord]) -> Result<()> {
            Err(Error::Invalid("read-only".into()))
        }
        async fn find_by_fingerprint(&self, _: &Fingerprint, _: usize) -> Result<Vec<KeyRecord>> {
            Ok(Vec::new())
        }
        async fn find_by_key_id(&self, _: &KeyId, _: usize) -> Result<Vec<KeyRecord>> {
            Ok(Vec::new())
        }
        async fn find_by_wkd_hash(&self, _: &str, _: &WkdHash) -> Result<Option<KeyRecord>> {
            Ok(None)
        }
        async fn check(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_holds_each_address_once_up_to_the_limit_and_skips_the_gone() {
        let mut q = Queue::default();
        let mut answers = Vec::new();
        for local in ["a", "b", "a", "gone", "c", "b", "d"] {
            let (reply, answer) = oneshot::channel();
            q.push_for_test(batcher::Pending::new(addr(local), 1, reply));
            if local != "gone" {
                answers.push(answer);
            }
        }
        let b = next_batch(&mut q, 3);
        assert_eq!(b.addresses, vec![addr("a"), addr("b"), addr("c")]);
        let idx: Vec<usize> = b.requests.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![0, 1, 0, 2, 1], "the gone request is left out");
        let b = next_batch(&mut q, 3);
        assert_eq!(b.addresses, vec![addr("d")]);
        assert!(next_batch(&mut q, 3).requests.is_empty());
        drop(answers);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_look_ups_share_round_trips_and_each_gets_its_own_answer() {
        let locals: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = locals.iter().map(String::as_str).collect();
        let store = Arc::new(Reads {
            delay: Some(Duration::from_millis(10)),
            ..Reads::with(&refs)
        });
        let batcher = ReadBatcher::with_limits(store.clone(), 1, 16, MAX_QUEUED);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let b = batcher.clone();
                // Ten addresses with a key, ten without, each asked five times.
                let local = format!("k{}", i % 20);
                tokio::spawn(async move { (local.clone(), b.get(&addr(&local)).await.unwrap()) })
            })
            .collect();
        for t in tasks {
            let (local, got) = t.await.unwrap();
            let want = store.keys.get(&addr(&local));
            assert_eq!(got.as_ref(), want, "{local}");
        }
        let trips = store.gets.load(Ordering::SeqCst) + store.batches.load(Ordering::SeqCst);
        assert!(trips < 30, "100 look-ups in {trips} round trips");
        assert!(
            store.largest.load(Ordering::SeqCst) <= 16,
            "batches stay small"
        );
        assert_eq!(batcher.queued(), 0);
    }

    #[tokio::test]
    async fn a_lone_look_up_is_one_get_and_an_unavailable_store_fails_each() {
        let store = Arc::new(Reads::with(&["a"]));
        let batcher = ReadBatcher::new(store.clone());
        assert_eq!(batcher.get(&addr("a")).await.unwrap(), Some(record("a")));
        assert_eq!(batcher.get(&addr("nobody")).await.unwrap(), None);
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
        assert_eq!(store.batches.load(Ordering::SeqCst), 0);

        store.down.store(true, Ordering::SeqCst);
        let answers = read_batch(&*store, &[addr("a"), addr("b"), addr("c")]).await;
        assert_eq!(store.batches.load(Ordering::SeqCst), 1);
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            2,
            "not read again one by one"
        );
        for a in answers {
            let e = a.unwrap_err();
            assert!(e.is_temporary() && e.to_string().contains("down"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_corrupt_record_fails_the_look_ups_of_its_address_only() {
        let store = Reads {
            corrupt: Some(addr("bad")),
            ..Reads::with(&["good"])
        };
        let answers = read_batch(&store, &[addr("bad"), addr("good"), addr("none")]).await;
        assert!(
            matches!(answers[0], Err(Error::Corrupt { .. })),
            "{answers:?}"
        );
        assert_eq!(answers[1].as_ref().unwrap(), &Some(record("good")));
        assert_eq!(answers[2].as_ref().unwrap(), &None);
    }

    #[test]
    fn each_request_gets_the_answer_of_its_address() {
        let mut receivers = Vec::new();
        let mut requests = Vec::new();
        for i in [0, 1, 0, 2, 0] {
            let (reply, answer) = oneshot::channel();
            requests.push((i, reply));
            receivers.push((i, answer));
        }
        let batch = Batch {
            addresses: vec![addr("a"), addr("b"), addr("c")],
            requests,
        };
        let e = Error::unavailable("store(reads)", "down");
        answer(batch, vec![Ok(Some(record("a"))), Ok(None), Err(e)]);
        for (i, mut r) in receivers {
            let got = r.try_recv().unwrap();
            match i {
                0 => assert_eq!(got.unwrap(), Some(record("a"))),
                1 => assert_eq!(got.unwrap(), None),
                _ => assert!(got.unwrap_err().is_temporary()),
            }
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let batcher = ReadBatcher::with_limits(Arc::new(Reads::default()), 1, 4, 2);
        // Fill the queue by hand (no reader runs for it), then ask once more.
        let mut keep = Vec::new();
        {
            let mut q = batcher.batcher.lock();
            q.set_workers_for_test(1);
            for i in 0..2 {
                let (reply, answer) = oneshot::channel();
                q.push_for_test(batcher::Pending::new(addr(&format!("q{i}")), 1, reply));
                keep.push(answer);
            }
        }
        let e = batcher.get(&addr("late")).await.unwrap_err();
        assert!(
            e.is_temporary() && e.to_string().contains("try again later"),
            "{e}"
        );
        assert_eq!(batcher.queued(), 2);
    }

    /// Red team round 9: a corrupt record sent its whole batch to the store one address at a
    /// time (129 round trips for a batch of 128); it is now found by halving the batch.
    #[tokio::test]
    async fn a_corrupt_record_costs_its_batch_a_few_round_trips_not_one_per_address() {
        let locals: Vec<String> = (0..128).map(|i| format!("k{i}")).collect();
        let with_keys: Vec<&str> = locals.iter().step_by(2).map(String::as_str).collect();
        let store = Reads {
            corrupt: Some(addr("k77")),
            ..Reads::with(&with_keys)
        };
        let addresses: Vec<Address> = locals.iter().map(|l| addr(l)).collect();
        let answers = read_batch(&store, &addresses).await;
        for (local, answer) in locals.iter().zip(&answers) {
            match local.as_str() {
                "k77" => assert!(matches!(answer, Err(Error::Corrupt { .. })), "{answer:?}"),
                _ => assert_eq!(
                    answer.as_ref().unwrap(),
                    &store.keys.get(&addr(local)).cloned(),
                    "{local}"
                ),
            }
        }
        let trips = store.gets.load(Ordering::SeqCst) + store.batches.load(Ordering::SeqCst);
        // 128, then two of each size from 64 down to 1.
        assert!(trips <= 15, "{trips} round trips for a batch of 128");
    }

    /// Red team round 9: after a corrupt record, every address of the batch was read alone to
    /// the end, each waiting for the store's timeout when it had gone down meanwhile.
    #[tokio::test]
    async fn a_store_that_goes_down_while_a_batch_is_split_fails_the_rest_unread() {
        let locals: Vec<String> = (0..128).map(|i| format!("k{i}")).collect();
        let store = Reads {
            corrupt: Some(addr("k3")),
            down_after: Some(1),
            ..Reads::with(&["k1"])
        };
        let addresses: Vec<Address> = locals.iter().map(|l| addr(l)).collect();
        let answers = read_batch(&store, &addresses).await;
        for answer in &answers {
            let e = answer.as_ref().unwrap_err();
            assert!(
                e.is_temporary() && e.to_string().contains("went down"),
                "{e}"
            );
        }
        let trips = store.gets.load(Ordering::SeqCst) + store.batches.load(Ordering::SeqCst);
        assert_eq!(
            trips, 2,
            "the batch, its first half; nothing after the store went down"
        );
    }

    /// Red team round 9: look-ups whose client went away stayed in a full queue until a batch
    /// took them, so a client that sent look-ups and closed its connections (freeing them
    /// for more) filled the queue for everyone while the store was slow. They are dropped
    /// before a live request is refused; live requests still count.
    #[tokio::test]
    async fn a_full_queue_drops_the_look_ups_that_went_away_before_it_refuses() {
        let store = Arc::new(Reads::with(&["late"]));
        let batcher = ReadBatcher::with_limits(store.clone(), 1, 4, 2);
        {
            let mut q = batcher.batcher.lock();
            // A reader busy with its batch: nothing is taken off the queue meanwhile.
            q.set_workers_for_test(1);
            for i in 0..2 {
                let (reply, answer) = oneshot::channel();
                q.push_for_test(batcher::Pending::new(addr(&format!("gone{i}")), 1, reply));
                // Its client closed the connection.
                drop(answer);
            }
        }
        let spawn_get = |local: &str| {
            let (b, a) = (batcher.clone(), addr(local));
            tokio::spawn(async move { b.get(&a).await })
        };
        let late = spawn_get("late");
        let nobody = spawn_get("nobody");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !late.is_finished() && !nobody.is_finished(),
            "queued, not refused: the queue was full of look-ups nobody waits for"
        );
        assert_eq!(batcher.queued(), 2);
        let e = batcher.get(&addr("third")).await.unwrap_err();
        assert!(e.is_temporary(), "live look-ups fill the queue: {e}");
        // The busy reader is done with its batch and reads the queue.
        tokio::spawn(batcher.batcher.work_for_test());
        assert_eq!(late.await.unwrap().unwrap(), Some(record("late")));
        assert_eq!(nobody.await.unwrap().unwrap(), None);
        assert_eq!(batcher.queued(), 0);
        assert_eq!(batcher.batcher.lock().workers(), 0);
    }

    /// Fairness: three clients flooding the queue while the store is slow (no reader takes
    /// anything off meanwhile) take at most half of it and their shares; another client's
    /// look-up still queues, and is answered once the store reads again. Before, the flood
    /// filled the queue (64 of 90 queued) and the other client was refused at once.
    #[tokio::test]
    async fn a_few_clients_flooding_leave_room_for_another() {
        const BOUND: usize = 64;
        let batcher = ReadBatcher::with_limits(Arc::new(Reads::with(&["d"])), 1, 4, BOUND);
        // A reader busy with its batch: nothing is taken off the queue meanwhile.
        batcher.batcher.lock().set_workers_for_test(1);
        let get_as = |client: &'static str, local: String| {
            let b = batcher.clone();
            tokio::spawn(batcher::for_client(client, None, async move {
                b.get(&addr(&local)).await
            }))
        };
        let mut flood = Vec::new();
        for client in ["a", "b", "c"] {
            for i in 0..30 {
                flood.push(get_as(client, format!("{client}{i}")));
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while flood.iter().filter(|t| t.is_finished()).count() + batcher.queued() < flood.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "the flood never settled"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let queued = batcher.queued();
        let share = BOUND / batcher::CLIENT_SHARE;
        assert!(
            queued <= BOUND / 2 + 3 * share,
            "{queued} of the flood queued: half the bound and the three shares at most"
        );
        assert_eq!(
            flood.iter().filter(|t| t.is_finished()).count(),
            90 - queued,
            "the rest refused at once"
        );
        let victim = get_as("d", "d".to_string());
        while batcher.queued() == queued && !victim.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the victim never queued"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            batcher.queued(),
            queued + 1,
            "the other client's look-up is queued"
        );
        // The store reads again.
        tokio::spawn(batcher.batcher.work_for_test());
        assert_eq!(victim.await.unwrap().unwrap(), Some(record("d")));
        for t in flood {
            match t.await.unwrap() {
                Ok(found) => assert_eq!(found, None),
                Err(e) => assert!(
                    e.is_temporary() && e.to_string().contains("try again"),
                    "{e}"
                ),
            }
        }
        assert_eq!(batcher.queued(), 0);
        assert_eq!(
            batcher.batcher.lock().of_client("a"),
            0,
            "nothing left counted"
        );
    }

    /// Red team (counters and shares): a client is an IPv6 /64, and a /56 (a home
    /// connection's delegation) holds 256 of them. 16 /64s of one /48, each within its share,
    /// filled the queue while the store was slow, and another client's look-up was refused.
    /// Past half the bound a network's clients now hold at most 1/`NETWORK_SHARE` of it
    /// together.
    #[tokio::test]
    async fn many_clients_of_one_network_leave_room_for_another() {
        const BOUND: usize = 64;
        let batcher = ReadBatcher::with_limits(Arc::new(Reads::with(&["v"])), 1, 4, BOUND);
        // A reader busy with its batch: nothing is taken off the queue meanwhile.
        batcher.batcher.lock().set_workers_for_test(1);
        let network = "2001:db8:1::/48";
        let mut flood = Vec::new();
        for c in 0..16 {
            for i in 0..8 {
                let (b, a) = (batcher.clone(), addr(&format!("n{c}-{i}")));
                let client = format!("2001:db8:1:{c:x}::/64");
                flood.push(tokio::spawn(async move {
                    batcher::for_client(&client, Some(network), b.get(&a)).await
                }));
            }
            // Each client's look-ups queue (or are refused) before the next client's.
            while flood.iter().filter(|t| t.is_finished()).count() + batcher.queued() < flood.len()
            {
                tokio::task::yield_now().await;
            }
        }
        let queued = batcher.queued();
        assert!(
            queued <= BOUND / 2 + BOUND / batcher::NETWORK_SHARE,
            "{queued} of the network's 128 look-ups queued: half the bound and its share at most"
        );
        assert_eq!(batcher.batcher.lock().of_network(network), queued);
        let victim = {
            let b = batcher.clone();
            tokio::spawn(async move {
                batcher::for_client("198.51.100.7", None, b.get(&addr("v"))).await
            })
        };
        while batcher.queued() == queued && !victim.is_finished() {
            tokio::task::yield_now().await;
        }
        assert!(
            !victim.is_finished(),
            "the other client's look-up is queued, not refused"
        );
        tokio::spawn(batcher.batcher.work_for_test());
        assert_eq!(victim.await.unwrap().unwrap(), Some(record("v")));
        for t in flood {
            if let Err(e) = t.await.unwrap() {
                assert!(e.is_temporary(), "{e}");
            }
        }
        assert_eq!(batcher.queued(), 0);
        assert_eq!(
            batcher.batcher.lock().of_network(network),
            0,
            "nothing left counted"
        );
    }
}
