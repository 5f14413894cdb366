//! Red team round 10 (docs/SECURITY.md): what one outsider's request to the key directory
//! costs the server. The directory is kst-core's, on the in-memory store of
//! `kst-directory-bench` (filled in bulk epochs, as the benchmark does), asked through
//! [`DomainLog`] as the HTTP routes ask it (`server::log_http`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kst_bin::bench::directory::{self, MemoryDirectoryStore};
use kst_core::testing::{DelegatingDirectory, DirectoryHooks};
use kst_core::transparency::answer::head_text;
use kst_core::transparency::head::{Head, HeadSigner};
use kst_core::transparency::storage::{
    DirectoryStore, DirectoryStoreError, RootAndNodes, StoredDirectory,
};
use kst_core::transparency::{DomainLog, KeyDirectory, LogKeys, TransparencyError, wire};

const NOW: u64 = 1_800_000_000;

/// Peak resident memory of this process so far, in MiB (Linux), for the figures printed.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// An append-only proof over busy epochs that is larger than any client or witness accepts
/// (`wire::MAX_AUDIT_PROOF`, 16 MiB) was built whole before anything looked at its size: the
/// HTTP `?since=` without `steps=1` (bounded by 4096 epochs only), `audit?from=&to=` (1024
/// epochs) and the witnesses' part of `?witnessed=1` (from the oldest cosignature of a listed
/// witness within 1024 epochs). On the domain's one directory thread, which publications
/// wait behind, for any outsider who asks; the answer was then refused by every client
/// (`LogAnswer::parse`, `AuditAnswer::parse`). Now each is counted before it is built and
/// refused unbuilt (HTTP 422); the witnesses' part leaves out a witness whose proof does not
/// fit. Before the fix: `answer_since(1)` and `audit(1, latest)` built the whole proof (the
/// figures printed say how large and how long).
#[tokio::test(flavor = "current_thread")]
async fn rt10_an_append_only_proof_no_client_accepts_is_refused_unbuilt() {
    use kst_core::transparency::log::{MAX_PROOF_ELEMENTS, MAX_WITNESSED_ELEMENTS};
    // 10 000 addresses, then 44 busy epochs of 512: a client that remembers epoch 1 is 44
    // busy epochs behind, and the proof from there (about 32 MB) is twice what a client
    // accepts, because every step of an old epoch lists the subtrees the later epochs split
    // (docs/TRANSPARENCY.md, "Catching up in steps"; at 10^6 entries a dozen such epochs do
    // it).
    let started = std::time::Instant::now();
    let (store, keys, tree) = busy_directory(44, true).await;
    let latest = tree.current().await.unwrap().0;
    eprintln!(
        "fixture: {latest} epochs filled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // The epoch from which the proof to the latest just passes what surely fits in 16 MiB
    // at the largest element size (80 bytes): a proof a client still accepts (elements are
    // 42 to 75 bytes), which a bound in those units would refuse.
    let (mut band, mut counted) = (latest, 0usize);
    while counted <= MAX_WITNESSED_ELEMENTS {
        band -= 1;
        counted += tree
            .audit_step_count(band, usize::MAX / 8)
            .await
            .unwrap()
            .unwrap()
            .elements();
    }
    assert!(band > 1, "the fixture: the proof from 1 is larger still");

    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let probe = directory::address(0).unwrap();
    let head = log.head(NOW).await.unwrap();
    assert_eq!(head.head.epoch, latest);

    // `?since=1` without steps: refused unbuilt, as the client would refuse it.
    let rss = peak_rss_mib();
    let t = std::time::Instant::now();
    let legacy = log.answer_since(&probe, Some(1), NOW).await;
    let reads = log.step_reads();
    eprintln!(
        "since=1 without steps: {} in {:.2}s, {reads} tree nodes counted, peak RSS {rss} -> {} MiB",
        match &legacy {
            Ok(a) => format!(
                "built, a proof of {} bytes",
                a.append_only.as_ref().map_or(0, |p| p.proof.len())
            ),
            Err(e) => format!("refused ({e})"),
        },
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    assert!(
        matches!(&legacy, Err(TransparencyError::Range(m)) if m.contains("steps=1")),
        "a proof over what a client accepts is refused: {:?}",
        legacy.as_ref().map(|_| "an answer")
    );
    assert!(
        reads <= (4 * MAX_PROOF_ELEMENTS + 64 * latest as usize) as u64,
        "the refusal read {reads} nodes"
    );

    // The audit route (witnesses, auditors): the same.
    let t = std::time::Instant::now();
    let audit = log.audit_answer(1, latest).await;
    eprintln!(
        "audit 1..{latest}: {} in {:.2}s",
        match &audit {
            Ok(a) => format!(
                "built, a proof of {} bytes",
                a.proof.as_ref().map_or(0, Vec::len)
            ),
            Err(e) => format!("refused ({e})"),
        },
        t.elapsed().as_secs_f64()
    );
    assert!(
        matches!(&audit, Err(TransparencyError::Range(m)) if m.contains("shorter range")),
        "an audit over what a witness accepts is refused"
    );
    assert!(matches!(
        log.audit(1, latest).await,
        Err(TransparencyError::Range(_))
    ));

    // What a client accepts is answered as before, and verifies: the band's proof
    // (more elements than surely fit, fewer bytes than accepted) and the newest step.
    let t = std::time::Instant::now();
    let remembered = log.head_at(band, NOW).await.unwrap().unwrap();
    let answer = log.answer_since(&probe, Some(band), NOW).await.unwrap();
    let proof = answer
        .append_only
        .as_ref()
        .expect("the proof from the band");
    eprintln!(
        "since={band} ({counted} elements): answered, {} bytes in {:.2}s",
        proof.proof.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(proof.proof.len() <= wire::MAX_AUDIT_PROOF);
    answer.verify_extends(&remembered.head).await.unwrap();
    let newest = log.head_at(latest - 1, NOW).await.unwrap().unwrap();
    let one = log.audit_answer(latest - 1, latest).await.unwrap();
    one.verify(&log.head_public_key()).await.unwrap();

    // `?witnessed=1`: a witness that cosigned epoch 1 and stopped, another that cosigned
    // the epoch before the latest. Only the second's part is built.
    let (lagging, current) = (HeadSigner::generate(), HeadSigner::generate());
    let first = log.head_at(1, NOW).await.unwrap().unwrap();
    log.add_cosignature(1, &lagging.cosign(&first, NOW).unwrap())
        .await
        .unwrap();
    log.add_cosignature(latest - 1, &current.cosign(&newest, NOW).unwrap())
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let witnessed = log
        .witnessed(&head, &[lagging.public_key(), current.public_key()])
        .await
        .unwrap()
        .expect("the current witness's part");
    eprintln!(
        "witnessed=1 with a witness lagging at epoch 1: from epoch {}, a proof of {} bytes, in \
         {:.2}s",
        witnessed.audit.heads[0].head.epoch,
        witnessed.audit.proof.as_ref().map_or(0, Vec::len),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        witnessed
            .cosignatures
            .iter()
            .map(|(e, c)| (*e, c.witness))
            .collect::<Vec<_>>(),
        vec![(latest - 1, current.public_key())],
        "the lagging witness is left out"
    );
    assert_eq!(witnessed.audit.heads[0].head.epoch, latest - 1);
}

/// A directory on the bench's memory store: 10,000 addresses, then `busy` epochs of 512 (the
/// most kst's writer records in one epoch), each epoch's head stored with it as kst's writer
/// does (with `heads`; without, a directory kept from before heads were stored). The store,
/// the keys, and the tree (written around the log, as the bench does).
async fn busy_directory(
    busy: u64,
    heads: bool,
) -> (
    Arc<dyn DirectoryStore>,
    LogKeys,
    KeyDirectory<StoredDirectory<dyn DirectoryStore>>,
) {
    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    for k in 0..=busy {
        let (from, to) = match k {
            0 => (0, 10_000),
            k => (10_000 + (k - 1) * 512, 10_000 + k * 512),
        };
        tree.publish(&directory::fill_changes(from, to).unwrap())
            .await
            .unwrap();
        if !heads {
            continue;
        }
        let (epoch, root_hash) = tree.current().await.unwrap();
        store_head(&store, &keys, epoch, root_hash).await;
    }
    (store, keys, tree)
}

/// Signs the head of `epoch` (root `root_hash`) with `keys` and stores it, as the writer does.
async fn store_head(
    store: &Arc<dyn DirectoryStore>,
    keys: &LogKeys,
    epoch: u64,
    root_hash: [u8; 32],
) {
    let head = keys
        .head
        .sign(Head {
            domain: directory::DOMAIN.to_string(),
            epoch,
            root_hash,
            vrf_public_key: keys.vrf.public_key().unwrap(),
            signed_at: NOW,
        })
        .unwrap();
    store
        .insert_head(
            directory::DOMAIN,
            epoch,
            head_text(&head).unwrap().as_bytes(),
        )
        .await
        .unwrap();
}

/// Two witnesses, one that cosigned the head of epoch `behind` and one that cosigned the head
/// of epoch `newest`, both cosignatures stored in `log`.
async fn two_witnesses(log: &DomainLog, behind: u64, newest: u64) -> (HeadSigner, HeadSigner) {
    let mut witnesses = Vec::new();
    for epoch in [behind, newest] {
        let witness = HeadSigner::generate();
        let head = log.head_at(epoch, NOW).await.unwrap().unwrap();
        log.add_cosignature(epoch, &witness.cosign(&head, NOW).unwrap())
            .await
            .unwrap();
        witnesses.push(witness);
    }
    let current = witnesses.pop().unwrap();
    (witnesses.pop().unwrap(), current)
}

/// An audit over epochs without a stored head (a directory kept from before heads were
/// stored) first has their heads signed late (`backfill::fill`), which builds akd's proof over
/// them in chunks of 32 epochs with no bound of its own, and only then was the audit's proof
/// counted and refused: anyone asking `audit?from=1&to=latest` of such a directory behind busy
/// epochs had the directory's thread build and check the whole 33 MB proof (chunk by chunk)
/// for an answer that was refused. Now the proof over the range is counted before anything is
/// filled, and nothing is signed for an audit that is refused. Before: the heads of every epoch
/// of the range were signed, and the audit refused after.
#[tokio::test(flavor = "current_thread")]
async fn rt10_no_head_is_signed_late_for_an_audit_that_is_refused() {
    let (store, keys, tree) = busy_directory(44, false).await;
    let latest = tree.current().await.unwrap().0;
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let started = std::time::Instant::now();
    let refused = log.audit_answer(1, latest).await;
    eprintln!(
        "audit from 1 to {latest} without heads: {:.1}s, {} tree nodes counted, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        log.step_reads(),
        peak_rss_mib()
    );
    assert!(
        matches!(refused, Err(TransparencyError::Range(_))),
        "{:?}",
        refused.map(|a| a.heads.len())
    );
    let signed = store.heads(directory::DOMAIN, 1, latest - 1).await.unwrap();
    assert!(
        signed.is_empty(),
        "{} heads signed late for an audit that was refused",
        signed.len()
    );
    // A range whose proof fits is filled and served as before.
    let answer = log.audit_answer(latest - 2, latest).await.unwrap();
    assert_eq!(
        answer
            .heads
            .iter()
            .map(|h| h.head.epoch)
            .collect::<Vec<_>>(),
        vec![latest - 2, latest - 1, latest]
    );
    answer.verify(&log.head_public_key()).await.unwrap();
}

/// A version 3 reply asked for the witnesses' part (`KST-Log-Witnessed`, by anyone who mails
/// a retrieval) had it built with the HTTP bound and, when it did not fit the reply's 2 MiB,
/// dropped whole: one listed witness that lags a few busy epochs behind (here 14, its part
/// about 7 MB) made every such reply carry no cosignature at all, the current witness's
/// neither, and clients requiring that witness refuse every reply. Now the part is bounded
/// by what a reply holds, before it is built, and leaves out only the lagging witness. Over
/// HTTP (16 MiB) both witnesses stay. Before: the reply had no witnesses' part.
#[tokio::test(flavor = "current_thread")]
async fn rt10_one_lagging_witness_does_not_strip_a_reply_of_every_cosignature() {
    use kst_core::reply::LogAnswers;
    use kst_core::transparency::TransparentStore;
    use kst_core::transparency::answer::LogAnswer;

    let (store, keys, _tree) = busy_directory(16, true).await;
    let log = Arc::new(DomainLog::open(Arc::clone(&store), keys).await.unwrap());
    let head = log.head(NOW).await.unwrap();
    let latest = head.head.epoch;
    let (lagging, current) = two_witnesses(&log, 2, latest - 1).await;
    let witnesses = vec![lagging.public_key(), current.public_key()];

    // Over HTTP both witnesses' part fits.
    let http = log.witnessed(&head, &witnesses).await.unwrap().unwrap();
    let proof = http.audit.proof.as_ref().map_or(0, Vec::len);
    eprintln!("the witnesses' part from epoch 2 to {latest}: {proof} bytes");
    assert_eq!(http.cosignatures.len(), 2);
    assert!(
        proof > kst_core::protocol::MAX_LOG_ANSWER_BYTES,
        "the fixture: the lagging witness's part does not fit a reply"
    );

    // In a version 3 reply: the current witness's part.
    let inner = tempfile::tempdir().unwrap();
    let keystore = kst_fs::FsStore::open(inner.path()).await.unwrap();
    let transparent =
        TransparentStore::new(Arc::new(keystore), vec![Arc::clone(&log)]).with_witnesses(witnesses);
    let ask = kst_core::protocol::LogAsk {
        since: None,
        witnessed: true,
    };
    let text = transparent
        .answer(&directory::address(3).unwrap(), ask, "carol@acme.net")
        .await
        .unwrap()
        .text;
    let answer = LogAnswer::parse(&text).unwrap();
    let part = answer
        .witnessed
        .expect("the reply carries the current witness's part");
    assert_eq!(
        part.cosignatures
            .iter()
            .map(|(e, c)| (*e, c.witness))
            .collect::<Vec<_>>(),
        vec![(latest - 1, current.public_key())]
    );
    part.audit.verify(&log.head_public_key()).await.unwrap();

    // Beside an append-only part (a client that remembers a head 3 busy epochs back, as a
    // version 3 client asks): the part is bounded by what the reply has left. A witness 4 busy
    // epochs behind (its part, about 1 MB, alone fits a reply) is left out; one that cosigned
    // the newest head stays. Before: the two parts together did not fit, and the reply
    // carried no cosignature at all.
    let (behind, newest) = (HeadSigner::generate(), HeadSigner::generate());
    let behind_head = log.head_at(latest - 4, NOW).await.unwrap().unwrap();
    log.add_cosignature(latest - 4, &behind.cosign(&behind_head, NOW).unwrap())
        .await
        .unwrap();
    log.add_cosignature(latest, &newest.cosign(&head, NOW).unwrap())
        .await
        .unwrap();
    let witnesses = vec![behind.public_key(), newest.public_key()];
    let behind_part = log
        .witnessed(&head, &witnesses)
        .await
        .unwrap()
        .unwrap()
        .audit
        .proof
        .map_or(0, |p| p.len());
    let inner = tempfile::tempdir().unwrap();
    let keystore = kst_fs::FsStore::open(inner.path()).await.unwrap();
    let transparent =
        TransparentStore::new(Arc::new(keystore), vec![Arc::clone(&log)]).with_witnesses(witnesses);
    let ask = kst_core::protocol::LogAsk {
        since: Some(latest - 3),
        witnessed: true,
    };
    let text = transparent
        .answer(&directory::address(3).unwrap(), ask, "carol@acme.net")
        .await
        .unwrap()
        .text;
    let answer = LogAnswer::parse(&text).unwrap();
    let append_only = answer.append_only.as_ref().map_or(0, |a| a.proof.len());
    eprintln!(
        "since {}: the append-only part {append_only} bytes; the witness 4 epochs behind's \
         part {behind_part} bytes",
        latest - 3
    );
    assert!(
        (append_only + behind_part) * 4 / 3 > kst_core::protocol::MAX_LOG_ANSWER_BYTES,
        "the fixture: both parts do not fit a reply together"
    );
    let part = answer
        .witnessed
        .expect("the reply carries the newest head's cosignature");
    assert_eq!(
        part.cosignatures
            .iter()
            .map(|(e, c)| (*e, c.witness))
            .collect::<Vec<_>>(),
        vec![(latest, newest.public_key())]
    );
    assert!(
        part.audit.proof.is_none(),
        "no proof from the answer's own head"
    );
}

/// The witnesses' part of an answer (`?witnessed=1`, `KST-Log-Witnessed`) counted the
/// append-only proof of its range twice before building it: once to leave out a witness too
/// far behind (`DomainLog::witnessed_within`'s reach), and again in the audit it then asked
/// for (`bounded_audit`); and an audit (`kst log witness run`, `kst log audit`) over epochs
/// without a stored head counted it twice too: before signing their heads late
/// (`fill_heads`) and in the audit. Now a count is kept for the directory's latest epoch
/// (`Worker::counted_already`): the part and the audit cost the tree-node reads of one
/// count, the same audit asked again at the same epoch none, and one asked after a new epoch
/// is counted again (later epochs add to the steps of older ones). Before: twice as many.
#[tokio::test(flavor = "current_thread")]
async fn the_witnesses_part_counts_its_range_once() {
    let (store, keys, tree) = busy_directory(4, true).await;
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let head = log.head(NOW).await.unwrap();
    let latest = head.head.epoch;
    let (behind, current) = two_witnesses(&log, 1, latest - 1).await;

    let before = log.step_reads();
    let audit = log.audit_answer(1, latest).await.unwrap();
    let one_count = log.step_reads() - before;
    assert!(one_count > 0, "the audit's proof is counted");

    let before = log.step_reads();
    let witnessed = log
        .witnessed(&head, &[behind.public_key(), current.public_key()])
        .await
        .unwrap()
        .expect("both witnesses' part");
    let reads = log.step_reads() - before;
    eprintln!(
        "an audit from 1 to {latest}: {one_count} nodes counted; the witnesses' part: {reads}"
    );
    assert_eq!(witnessed.cosignatures.len(), 2);
    assert_eq!(
        witnessed.audit, audit,
        "the part's audit is the same range's"
    );
    witnessed
        .audit
        .verify(&log.head_public_key())
        .await
        .unwrap();
    assert_eq!(reads, one_count, "the part's range is counted once");

    // An epoch committed since (here by another writer of the store) adds to the steps of
    // the older ones: the same audit is counted again.
    tree.publish(&directory::fill_changes(20_000, 20_100).unwrap())
        .await
        .unwrap();
    let before = log.step_reads();
    log.audit_answer(1, latest).await.unwrap();
    assert!(
        log.step_reads() > before,
        "a count made before the latest epoch is not trusted"
    );

    // An audit over epochs without a stored head (a directory kept from before heads were
    // stored): its heads are signed late, and its range counted once.
    let (store, keys, _tree) = busy_directory(4, false).await;
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let latest = log.head(NOW).await.unwrap().head.epoch;
    assert!(
        store
            .heads(directory::DOMAIN, 1, latest - 1)
            .await
            .unwrap()
            .is_empty()
    );
    let before = log.step_reads();
    let filled = log.audit_answer(1, latest).await.unwrap();
    let reads = log.step_reads() - before;
    assert_eq!(
        store
            .heads(directory::DOMAIN, 1, latest)
            .await
            .unwrap()
            .len() as u64,
        latest,
        "the heads were signed late"
    );
    filled.verify(&log.head_public_key()).await.unwrap();
    // One count of the range: `?since=1` without steps counts it before building its proof.
    let before = log.step_reads();
    let probe = directory::address(0).unwrap();
    log.answer_since(&probe, Some(1), NOW).await.unwrap();
    let one_count = log.step_reads() - before;
    // The same audit again (a witness asking again), no epoch since: not counted again.
    let before = log.step_reads();
    let again = log.audit_answer(1, latest).await.unwrap();
    let counted_again = log.step_reads() - before;
    eprintln!(
        "an audit from 1 to {latest} signing its heads late: {reads} nodes counted; one count: \
         {one_count}; the same audit again: {counted_again}"
    );
    assert!(one_count > 0, "the proof is counted");
    assert_eq!(reads, one_count, "the range is counted once");
    assert_eq!(filled, again);
    assert_eq!(
        counted_again, 0,
        "a range counted at the latest epoch is not counted again"
    );
}

/// The status of `GET path` sent to `at` from the local address `from` (a loopback address
/// of its own: one client as `[web.limits]` counts clients).
async fn status_of(from: std::net::Ipv4Addr, at: std::net::SocketAddr, path: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut conn = socket.connect(at).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: kst\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// The HTTP routes serve at most 4 expensive requests at once (`log_http::MAX_HEAVY_AT_ONCE`),
/// first come first served: one client holding 4 connections of `?since=` look-ups (each held
/// as long as the directory takes, here held on purpose) kept every other client's expensive
/// requests waiting, answered 503 after `HEAVY_WAIT` (5 s), within its request budget. Now one
/// client holds at most 2 of the turns (`MAX_HEAVY_PER_CLIENT`, clients named as the web
/// limits name them: here two loopback addresses): its other requests wait behind its own, and
/// another client's request gets a turn. Before: the other client's look-up was answered 503
/// and all 4 of the first client's were served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rt10_one_client_does_not_hold_every_expensive_turn() {
    use kst_bin::server::log_http::{HEAVY_WAIT, MAX_HEAVY_AT_ONCE, MAX_HEAVY_PER_CLIENT};
    use std::net::Ipv4Addr;

    let (held, at, probe) = held_log_routes().await;
    let path = format!(
        "/.well-known/kst/log/{}/lookup/{probe}?since=1",
        directory::DOMAIN
    );
    let (hog, other) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));

    held.hold.store(true, Ordering::SeqCst);
    let before = held.roots.load(Ordering::SeqCst);
    let mut hogged = vec![tokio::spawn(status_of(hog, at, path.clone()))];
    // Wait until the directory's thread holds the first (poll, generous deadline).
    held.reached_since(before).await;
    // The rest of the turns asked for by the same client (they take a turn at once, before
    // anything is read: a second is plenty; later would only make the other client's
    // request find a turn free, the fix or not).
    for _ in 1..MAX_HEAVY_AT_ONCE {
        hogged.push(tokio::spawn(status_of(hog, at, path.clone())));
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let asked = tokio::spawn(status_of(other, at, path.clone()));
    // Past its wait for a turn: a request without one is answered 503 by then.
    tokio::time::sleep(HEAVY_WAIT + std::time::Duration::from_secs(1)).await;
    held.hold.store(false, Ordering::SeqCst);
    held.released.notify_waiters();
    let other_status = asked.await.unwrap();
    let mut hog_statuses = Vec::new();
    for h in hogged {
        hog_statuses.push(h.await.unwrap());
    }
    hog_statuses.sort_unstable();
    eprintln!("the other client: {other_status}; the client holding the turns: {hog_statuses:?}");
    assert_eq!(
        other_status, 200,
        "another client's expensive request got a turn while one client held its share"
    );
    let mut expected = vec![200; MAX_HEAVY_PER_CLIENT];
    expected.resize(MAX_HEAVY_AT_ONCE, 503);
    assert_eq!(
        hog_statuses, expected,
        "the client's requests past its share waited behind its own and timed out"
    );
}

/// The log's HTTP routes ([`log_routes`]) over a [`Held`] store holding a directory of 600 entries in two epochs whose
/// head is signed: the held store, the routes' address, and an address of the directory to
/// look up.
async fn held_log_routes() -> (
    Arc<DelegatingDirectory<Held>>,
    std::net::SocketAddr,
    kst_core::Address,
) {
    let held = Held::store();
    let store: Arc<dyn DirectoryStore> = Arc::clone(&held) as Arc<dyn DirectoryStore>;
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    for (from, to) in [(0, 300), (300, 600)] {
        tree.publish(&directory::fill_changes(from, to).unwrap())
            .await
            .unwrap();
    }
    let log = Arc::new(DomainLog::open(Arc::clone(&store), keys).await.unwrap());
    let probe = directory::address(5).unwrap();
    // The directory opened and its head signed before any hold.
    log.answer_since(&probe, Some(1), NOW).await.unwrap();
    let at = log_routes(log).await;
    (held, at, probe)
}

/// The hooks of a [`MemoryDirectoryStore`] whose reads of the root (every request the
/// directory's thread handles starts with one: `StoredDirectory::unchanged`) can be held, and
/// are counted.
#[derive(Default)]
struct Held {
    hold: AtomicBool,
    released: tokio::sync::Notify,
    /// Root reads begun.
    roots: AtomicU64,
}

impl Held {
    /// A [`MemoryDirectoryStore`] with these hooks, none held.
    fn store() -> Arc<DelegatingDirectory<Held>> {
        Arc::new(DelegatingDirectory::new(
            Arc::new(MemoryDirectoryStore::default()),
            Held::default(),
        ))
    }

    /// Waits until a root read began after `before` root reads (the directory's thread is
    /// then held on it): polls, with a generous deadline.
    async fn reached_since(&self, before: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.roots.load(Ordering::SeqCst) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the first request never reached the store"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

#[async_trait::async_trait]
impl DirectoryHooks for Held {
    fn name(&self, _inner: &dyn DirectoryStore) -> &'static str {
        "held"
    }
    async fn root_and_nodes(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<RootAndNodes, DirectoryStoreError> {
        self.roots.fetch_add(1, Ordering::SeqCst);
        while self.hold.load(Ordering::SeqCst) {
            let released = self.released.notified();
            if !self.hold.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        inner.root_and_nodes(domain, keys).await
    }
}

/// The HTTP routes serve at most 4 expensive requests (`?since=`, audits, histories) at once
/// (`log_http::MAX_HEAVY_AT_ONCE`), but a request's turn ends when its client goes away,
/// while what it asked of the directory's thread stayed queued and was built all the same: a
/// client that sent expensive requests and closed each connection at once had the thread
/// build every one (up to `MAX_QUEUED_READS`, 256, queued), ahead of every later look-up.
/// Here the thread is held on one request while 200 `?since=` look-ups are asked and
/// given up (as a dropped handler gives them up); then one more is asked and waited for.
/// Before: the thread handled all 200 given up (200 root reads, one per request handled);
/// now none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rt10_requests_whose_caller_went_away_are_not_built() {
    const GIVEN_UP: u64 = 200;
    let held = Held::store();
    let store: Arc<dyn DirectoryStore> = Arc::clone(&held) as Arc<dyn DirectoryStore>;
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    for (from, to) in [(0, 300), (300, 600), (600, 900)] {
        tree.publish(&directory::fill_changes(from, to).unwrap())
            .await
            .unwrap();
    }
    let log = Arc::new(DomainLog::open(Arc::clone(&store), keys).await.unwrap());
    let probe = directory::address(5).unwrap();
    // One request answered first (the directory opened, its head signed), then one more to
    // see how many root reads one request handled costs.
    log.answer_since(&probe, Some(1), NOW).await.unwrap();
    let at = held.roots.load(Ordering::SeqCst);
    log.answer_since(&probe, Some(1), NOW).await.unwrap();
    let per_request = held.roots.load(Ordering::SeqCst) - at;
    assert!(per_request >= 1, "a request handled reads the root");

    held.hold.store(true, Ordering::SeqCst);
    let before = held.roots.load(Ordering::SeqCst);
    let first = tokio::spawn({
        let log = Arc::clone(&log);
        let probe = probe.clone();
        async move { log.answer_since(&probe, Some(1), NOW).await }
    });
    // Wait until the thread holds it (poll, generous deadline).
    held.reached_since(before).await;
    // Each asked (queued: the first poll sends it) and given up at once, as a handler whose
    // client closed the connection is dropped.
    for _ in 0..GIVEN_UP {
        let asked = log.answer_since(&probe, Some(1), NOW);
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, asked)
                .await
                .is_err(),
            "not answered while the thread is held"
        );
    }
    let queued = held.roots.load(Ordering::SeqCst);
    held.hold.store(false, Ordering::SeqCst);
    held.released.notify_waiters();
    first.await.unwrap().unwrap();
    // One more, waited for: the reads are handled in order, so once it is answered every
    // request given up before it was handled or skipped.
    let last = log.answer_since(&probe, Some(1), NOW).await.unwrap();
    assert!(last.append_only.is_some());
    // The held request's rest and the last one: at most two requests' worth.
    let reads = held.roots.load(Ordering::SeqCst) - queued;
    eprintln!(
        "{GIVEN_UP} requests given up; root reads after the hold: {reads} ({per_request} per \
         request handled)"
    );
    assert!(
        reads <= 2 * per_request,
        "{reads} root reads after the hold: the {GIVEN_UP} requests given up were handled"
    );
}

/// A directory on the bench's memory store whose epochs hold `sizes[i]` new addresses each
/// (epoch `i + 1`; written in one `publish` each, as akd's `publish` of a larger batch than
/// kst's writer makes would write them), with a stored head for the epochs in `heads` only
/// (a directory kept from before heads were stored, or a store that lost some). The store,
/// the keys, and the latest epoch.
async fn directory_of_epochs(
    sizes: &[u64],
    heads: &[u64],
) -> (Arc<dyn DirectoryStore>, LogKeys, u64) {
    let store: Arc<dyn DirectoryStore> = Arc::new(MemoryDirectoryStore::default());
    let keys = LogKeys::generate(directory::DOMAIN);
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    let mut next = 0;
    for size in sizes {
        tree.publish(&directory::fill_changes(next, next + size).unwrap())
            .await
            .unwrap();
        next += size;
        let (epoch, root_hash) = tree.current().await.unwrap();
        if !heads.contains(&epoch) {
            continue;
        }
        store_head(&store, &keys, epoch, root_hash).await;
    }
    let latest = tree.current().await.unwrap().0;
    (store, keys, latest)
}

/// Serves the log routes of `log` on a listener of its own (as `kst serve` serves them,
/// under the web limits' guard, limits off; the background backfill starts with them) and
/// returns its address.
async fn log_routes(log: Arc<DomainLog>) -> std::net::SocketAddr {
    use kst_bin::server::log_http;
    use kst_bin::server::web::client::LogPseudonym;
    use kst_bin::server::web::handlers::{Guard, PeerAddr, ops_routes};
    use kst_bin::server::web::limits::Limiter;
    use kst_bin::server::web::{WebConfig, WebLimits};
    let guard = Guard {
        trusted_proxies: WebConfig::default().validate().unwrap(),
        limiter: Limiter::new(WebLimits::OFF, Arc::new(kst_core::MemoryRateLimiter::new())),
        pseudonym: LogPseudonym::random(),
    };
    let routes = ops_routes(
        log_http::router(vec![log], kst_core::AddressPolicy::default(), Vec::new()),
        guard,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            routes.into_make_service_with_connect_info::<PeerAddr>(),
        )
        .await
    });
    at
}

/// A head signed late (`/head/<epoch>` of an epoch without a stored head, `/audit` across
/// it, the background backfill) needs akd's append-only proof around the epoch, built on the
/// directory's one thread; it was bounded by epochs only (32 a proof), not by size, and
/// `/head/<epoch>` was no expensive request: anyone could have the thread build the proof of
/// an epoch as large as the directory holds (here one of 56 000 changes, about 4.5 MB of
/// proof; an old epoch's step lists every subtree the later epochs split, so at 10⁶ entries
/// one step is tens of MB). Now the proof is counted before it is built
/// (`backfill::FILL_MAX_ELEMENTS`): such an epoch is refused unbuilt (HTTP 422), the
/// background backfill leaves it and fills the rest, and a head that needs no large proof is
/// signed as before. Before: the head of epoch 2 was signed (200), its proof built whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rt18_a_head_signed_late_is_bounded_in_size_not_only_in_epochs() {
    use kst_core::transparency::backfill::FILL_MAX_ELEMENTS;
    const BIG: u64 = 56_000;
    assert!(
        BIG as usize > FILL_MAX_ELEMENTS,
        "the fixture: epoch 2 alone is over the bound"
    );
    // Epoch 1 with its head, epoch 2 large, epochs 3 to 5 small, none of 2 to 5 with a head.
    let started = std::time::Instant::now();
    let (store, keys, latest) = directory_of_epochs(&[300, BIG, 300, 300, 300], &[1]).await;
    assert_eq!(latest, 5);
    eprintln!(
        "fixture: {latest} epochs in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let log = Arc::new(DomainLog::open(Arc::clone(&store), keys).await.unwrap());
    let stored = |from, to| {
        let store = Arc::clone(&store);
        async move {
            store
                .heads(directory::DOMAIN, from, to)
                .await
                .unwrap()
                .into_iter()
                .map(|(e, _)| e)
                .collect::<Vec<_>>()
        }
    };

    // Asked directly: refused unbuilt, nothing signed.
    let refused = log.head_at(2, NOW).await;
    assert!(
        matches!(&refused, Err(TransparencyError::Range(m)) if m.contains("epoch 2")),
        "the head of a large epoch is refused: {:?}",
        refused.as_ref().map(|h| h.as_ref().map(|h| h.head.epoch))
    );
    assert_eq!(stored(2, 2).await, Vec::<u64>::new());

    // Over HTTP (the background backfill starts with the routes): 422 for epoch 2, an audit
    // across it too; every other epoch's head is signed late and verifies.
    let at = log_routes(Arc::clone(&log)).await;
    let me = std::net::Ipv4Addr::new(127, 0, 0, 4);
    let path = |rest: &str| format!("/.well-known/kst/log/{}/{rest}", directory::DOMAIN);
    assert_eq!(status_of(me, at, path("head/2")).await, 422);
    assert_eq!(status_of(me, at, path("audit?from=1&to=3")).await, 422);
    // The background backfill leaves epoch 2 and fills 3 and 4 (poll, generous deadline).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while stored(3, 4).await.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the background backfill never filled epochs 3 and 4"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored(1, latest - 1).await, vec![1, 3, 4]);
    assert_eq!(status_of(me, at, path("head/3")).await, 200);
    let answer = log.audit_answer(3, latest).await.unwrap();
    answer.verify(&log.head_public_key()).await.unwrap();
    let refused = log.audit_answer(1, 3).await;
    assert!(matches!(refused, Err(TransparencyError::Range(_))));
}

/// A run of epochs without heads is filled in chunks whose proofs fit the bound: epochs of
/// 15 000 changes, the proof of the whole run over `FILL_MAX_ELEMENTS`, each epoch's within
/// it: filled in several proofs, each anchored on the head the one before signed, and every
/// head signed late names the root the epoch had (the audit over them verifies).
#[tokio::test(flavor = "current_thread")]
async fn rt18_a_chunk_of_heads_signed_late_shrinks_to_fit_the_bound() {
    use kst_core::transparency::backfill::FILL_MAX_ELEMENTS;
    let (store, keys, latest) = directory_of_epochs(&[300, 15_000, 300, 15_000, 300], &[1]).await;
    // The fixture: the steps of epochs 1 to 5, counted as the fill counts them.
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    let mut steps = Vec::new();
    for epoch in 1..latest {
        let count = tree.audit_step_count(epoch, usize::MAX / 8).await.unwrap();
        steps.push(count.unwrap().elements());
    }
    eprintln!(
        "elements of the steps from epochs 1 to {}: {steps:?}",
        latest - 1
    );
    assert!(
        steps.iter().sum::<usize>() > FILL_MAX_ELEMENTS,
        "the fixture: the run's proof is over the bound"
    );
    assert!(
        steps.windows(2).all(|w| w[0] + w[1] <= FILL_MAX_ELEMENTS),
        "the fixture: each epoch's proof is within it"
    );
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let answer = log.audit_answer(1, latest).await.unwrap();
    answer.verify(&log.head_public_key()).await.unwrap();
    assert_eq!(
        answer
            .heads
            .iter()
            .map(|h| h.head.epoch)
            .collect::<Vec<_>>(),
        (1..=latest).collect::<Vec<_>>()
    );
}

/// Counting a far-behind proof (`Worker::reach_back`: `?since=` without steps, `/audit`, the
/// witnesses' part) was documented as reading at most 4 tree nodes per element of its
/// budget, and 64 more a step, but each step's walk had only its own bound (`4 * left + 64`):
/// a step of an old epoch in a tree that grew since reads many more nodes than it holds
/// elements (here 40 epochs of 50 addresses, then 30 000 in one: 9 to 18 reads an element),
/// so a witness behind such a directory made the count read far more than its budget says
/// (before: about 480 000 nodes for a budget of about 72 000 elements, 65 % over
/// `4 * elements + 64 * 42`; the test fails at its last bound).
/// Now the reads of all the steps come from one budget (`ReadBudget`): the count stops where
/// it runs out, and the witnesses further back are left out, as for a proof too large.
#[tokio::test(flavor = "current_thread")]
async fn rt18_a_far_behind_count_reads_at_most_four_nodes_an_element() {
    let mut sizes = vec![50u64; 40];
    sizes.extend([30_000, 10]);
    let heads: Vec<u64> = (1..=sizes.len() as u64).collect();
    let (store, keys, latest) = directory_of_epochs(&sizes, &heads).await;
    // The budget: exactly the elements of the whole proof from epoch 1.
    let db = StoredDirectory::new(Arc::clone(&store), directory::DOMAIN);
    let tree = KeyDirectory::open_cached(db, keys.vrf.clone())
        .await
        .unwrap();
    let (mut elements, mut reads_alone) = (0usize, 0usize);
    for epoch in 1..latest {
        let walk = tree.audit_step_walk(epoch, usize::MAX / 8).await.unwrap();
        elements += walk.count.unwrap().elements();
        reads_alone += walk.reads;
    }
    let bound = 4 * elements + 64 * latest as usize;
    eprintln!(
        "the proof from epoch 1: {elements} elements, {reads_alone} nodes read to count it \
         (the bound: {bound})"
    );
    assert!(
        reads_alone > bound,
        "the fixture: counting the old steps reads more than 4 nodes an element"
    );

    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let head = log.head(NOW).await.unwrap();
    let (behind, current) = two_witnesses(&log, 1, latest - 1).await;
    let before = log.step_reads();
    let part = log
        .witnessed_within(&head, &[behind.public_key(), current.public_key()], |_| {
            elements
        })
        .await
        .unwrap()
        .expect("the current witness's part");
    let reads = log.step_reads() - before;
    eprintln!(
        "the witnesses' part within {elements} elements: {reads} nodes read, from epoch {}",
        part.audit.heads[0].head.epoch
    );
    assert!(reads <= bound as u64, "{reads} nodes read, over {bound}");
    assert!(
        part.cosignatures
            .iter()
            .any(|(e, c)| *e == latest - 1 && c.witness == current.public_key()),
        "the current witness stays"
    );
    part.audit.verify(&log.head_public_key()).await.unwrap();
}

/// With heads signed late bounded, the head of an epoch just before a large one still gets
/// signed: its proof is anchored on the stored head below and leaves out the large step after
/// it. So a client catching up in steps (`?since=1&steps=1`) on a directory without heads is
/// stepped up to the epoch before the large one, and verifies the step. Without it the
/// bound refused the step's head (the fill's proof ended one epoch past it, over the bound),
/// and the answer with it (422).
#[tokio::test(flavor = "current_thread")]
async fn rt18_a_client_steps_up_to_the_epoch_before_a_large_one() {
    use kst_core::transparency::answer::HTTP_STEP_BUDGET;
    // Epoch 1 with its head, epoch 2 small, 3 large (over the bound), 4 small (the latest).
    let (store, keys, latest) = directory_of_epochs(&[300, 300, 56_000, 300], &[1]).await;
    assert_eq!(latest, 4);
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let probe = directory::address(5).unwrap();
    let remembered = log.head_at(1, NOW).await.unwrap().unwrap();
    let answer = log
        .answer_stepped(&probe, Some(1), Some(HTTP_STEP_BUDGET), NOW)
        .await
        .unwrap();
    let (step, roots) = answer
        .verify_step(&log.head_public_key(), &remembered.head)
        .await
        .unwrap()
        .expect("a step");
    assert_eq!(step.head.epoch, 2);
    assert!(roots.contains(&(2, step.head.root_hash)), "{roots:?}");
    // The large epoch itself has no head that could be signed within the bound.
    assert!(matches!(
        log.head_at(3, NOW).await,
        Err(TransparencyError::Range(_))
    ));
}

/// `/head/<epoch>` of an epoch without a stored head is an expensive request (a head signed
/// late), and so was one of an epoch after the latest: its turn was taken before the directory
/// said 404. While the turns were held (two clients' `?since=` look-ups, each two, held at the
/// store), a third client asking for an epoch to come waited `HEAVY_WAIT` and got 503: a
/// few clients looping on such epochs held the turns that audits and witnessed look-ups wait
/// for. Now an epoch after the newest head served is no expensive request: 404 once the
/// directory answers (red team, fresh eyes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rt19_a_head_of_an_epoch_to_come_takes_no_expensive_turn() {
    use kst_bin::server::log_http::{HEAVY_WAIT, MAX_HEAVY_PER_CLIENT};
    use std::net::Ipv4Addr;

    let (held, at, probe) = held_log_routes().await;
    let heavy = format!(
        "/.well-known/kst/log/{}/lookup/{probe}?since=1",
        directory::DOMAIN
    );
    // The latest head, as any client reads it first; then an epoch long after it.
    let latest = format!("/.well-known/kst/log/{}/head", directory::DOMAIN);
    assert_eq!(
        status_of(Ipv4Addr::new(127, 0, 0, 4), at, latest).await,
        200
    );
    let to_come = format!("/.well-known/kst/log/{}/head/1000000", directory::DOMAIN);

    held.hold.store(true, Ordering::SeqCst);
    let before = held.roots.load(Ordering::SeqCst);
    let mut hogged = Vec::new();
    for client in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)] {
        for _ in 0..MAX_HEAVY_PER_CLIENT {
            hogged.push(tokio::spawn(status_of(client, at, heavy.clone())));
        }
    }
    held.reached_since(before).await;
    // Every turn taken (they are taken at once, before anything is read).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let asked = tokio::spawn(status_of(Ipv4Addr::new(127, 0, 0, 4), at, to_come));
    // Past its wait for a turn: a request that needed one is answered 503 by then.
    tokio::time::sleep(HEAVY_WAIT + std::time::Duration::from_secs(1)).await;
    held.hold.store(false, Ordering::SeqCst);
    held.released.notify_waiters();
    let status = asked.await.unwrap();
    for h in hogged {
        h.await.unwrap();
    }
    assert_eq!(
        status, 404,
        "a head of an epoch to come waited for an expensive turn"
    );
}
