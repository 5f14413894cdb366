//! The [`DirectoryStore`] conformance suite (features `conformance` + `transparency`): the
//! storage contract of the key directory (docs/TRANSPARENCY.md) as executable checks.
//!
//! A backend runs [`run_all`] with two store instances on one fresh, empty namespace (two
//! processes of a pool, or two connections): the blob-level contract (round trip, fence,
//! insert-if-absent root, nodes-only batches), then akd's directory over it (lookups, absence,
//! deletion, append-only proofs), then two writers publishing at once into one history. Each
//! property is a `pub async fn` of its own. Every function panics naming the property.
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn directory_conformance() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let a: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
//!     let b: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
//!     kst_core::conformance::directory::run_all(a, b).await;
//! }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::Address;
use crate::conformance::{address, describe, test_key};
use crate::store::{KeyRecord, KeyStore, PublishOutcome};
use crate::testing::{DelegatingDirectory, DirectoryHooks};
use crate::transparency::answer::Served;
use crate::transparency::log::{DomainLog, Synced};
use crate::transparency::storage::{RootWrite, ValueStateBlob};
use crate::transparency::{
    DirectoryEntry, DirectoryStore, DirectoryStoreError, EntryState, Head, LogKeys, RecordBatch,
    TransparentStore,
};

/// Runs every property; `a` and `b` are two instances on one fresh, empty namespace.
pub async fn run_all(a: Arc<dyn DirectoryStore>, b: Arc<dyn DirectoryStore>) {
    blobs_round_trip(&a, &b).await;
    batched_reads_and_heads_with_the_commit(&a, &b).await;
    fence_and_first_root(&a).await;
    heads_and_cosignatures(&a, &b).await;
    directory_proves_the_store(Arc::clone(&a)).await;
    deletion_withdraws_every_earlier_value(Arc::clone(&a)).await;
    log_stores_heads_and_cosignatures(Arc::clone(&a), Arc::clone(&b)).await;
    heads_are_signed_late(Arc::clone(&a), Arc::clone(&b)).await;
    an_altered_head_stops_the_backfill(Arc::clone(&a)).await;
    a_head_after_the_latest_epoch_is_never_built_over(Arc::clone(&a), Arc::clone(&b)).await;
    a_history_is_never_signed_over_another_stored_head(Arc::clone(&a)).await;
    a_far_behind_client_catches_up_in_steps(Arc::clone(&a), Arc::clone(&b)).await;
    a_stale_writer_is_fenced(Arc::clone(&a), Arc::clone(&b)).await;
    an_answer_read_across_two_commits_is_read_again(Arc::clone(&a), Arc::clone(&b)).await;
    an_audit_read_across_commits_is_served_whole(Arc::clone(&a), Arc::clone(&b)).await;
    an_answer_that_does_not_verify_is_not_served(Arc::clone(&a)).await;
    a_history_read_across_a_deletion_is_read_again(Arc::clone(&a), Arc::clone(&b)).await;
    an_append_only_part_that_does_not_verify_is_not_served(Arc::clone(&a)).await;
    an_answer_from_an_epoch_without_a_head_is_served(Arc::clone(&a)).await;
    two_writers_one_history(a, b).await;
}

/// A value state record (in [`crate::transparency::records`]' encoding) of `version` with its
/// value replaced by akd's tombstone: what an insider who overwrites a version's value in the
/// store behind kst's back leaves (the owner's monitor must report it unless a deletion
/// follows). `None` for a record of another version or kind.
pub fn withdrawn_value_state(blob: &[u8], version: u64) -> Option<Vec<u8>> {
    use crate::transparency::records;
    use akd::storage::types::DbRecord;
    match records::decode(blob).ok()? {
        DbRecord::ValueState(mut state) if state.version == version => {
            state.value = akd::AkdValue(akd::TOMBSTONE.to_vec());
            Some(records::encode(&DbRecord::ValueState(state)))
        }
        _ => None,
    }
}

/// A client far behind catches up in steps: `answer_stepped` bounds each answer by epochs,
/// changes and bytes (counted before anything is built), the steps' heads are the stored
/// ones, each step verifies from the last, and the last answer carries the rest of the
/// proof; a budget the first step does not fit is `too-far`, with no proof. Answers through
/// the second instance (another process of a pool).
pub async fn a_far_behind_client_catches_up_in_steps(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    use crate::transparency::answer::{LogAnswer, STEP_ELEMENT_BYTES, StepBudget};
    const D: &str = "steps.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let copy = LogKeys::parse(&keys.to_file()).unwrap();
    let writer = DomainLog::open(a, keys).await.unwrap();
    let reader = DomainLog::open(b, copy).await.unwrap();
    let alice = address("alice@steps.example");
    let alice1 = record(&alice, 8, 0, 1);
    writer.sync(&alice, Some(&alice1), 10).await.unwrap();
    for n in 1..8u64 {
        let other = address(&format!("user{n}@steps.example"));
        writer
            .sync(&other, Some(&record(&other, 8, n, 1)), 10 + n)
            .await
            .unwrap();
    }
    let first = reader.stored_heads(1, 1).await.unwrap().remove(0);
    let latest = reader.answer(&alice, 30).await.unwrap().head.head.epoch;
    assert_eq!(latest, 8, "steps: one epoch per publication");
    let budget = |epochs: u64, changes: usize, bytes: usize| StepBudget {
        bytes,
        changes,
        epochs,
    };
    // Each budget and the epochs its steps reach.
    for (what, b, reached) in [
        ("3 epochs", budget(3, 1 << 20, 1 << 20), vec![4, 7, 8]),
        ("2 changes", budget(1024, 2, 1 << 20), vec![3, 5, 7, 8]),
        ("everything", budget(1024, 1 << 20, 1 << 20), vec![8]),
    ] {
        let mut remembered = first.head.clone();
        let mut got = Vec::new();
        while got.len() < 10 {
            let answer = reader
                .answer_stepped(&alice, Some(remembered.epoch), Some(b), 31)
                .await
                .unwrap_or_else(|e| panic!("steps ({what}): {e}"));
            let answer = LogAnswer::parse(&answer.to_text().unwrap())
                .unwrap_or_else(|e| panic!("steps ({what}): the text: {e}"));
            answer
                .verify(&head_key, &alice, Served::Key(&alice1.key))
                .await
                .unwrap_or_else(|e| panic!("steps ({what}): the lookup: {e}"));
            match answer.verify_step(&head_key, &remembered).await {
                Ok(Some((head, _))) => {
                    let stored = reader
                        .stored_heads(head.head.epoch, head.head.epoch)
                        .await
                        .unwrap();
                    assert_eq!(stored, vec![head.clone()], "steps ({what}): a stored head");
                    got.push(head.head.epoch);
                    remembered = head.head;
                }
                Ok(None) => {
                    answer
                        .verify_extends(&remembered)
                        .await
                        .unwrap_or_else(|e| panic!("steps ({what}): the rest: {e}"));
                    got.push(answer.head.head.epoch);
                    break;
                }
                Err(e) => panic!("steps ({what}): {e}"),
            }
        }
        assert_eq!(got, reached, "steps ({what}): the epochs reached");
    }
    // Not even the first step fits: `too-far`, nothing built; the same from a newer epoch
    // with room for its step passes.
    let tight = budget(1024, 1 << 20, STEP_ELEMENT_BYTES);
    let far = reader
        .answer_stepped(&alice, Some(1), Some(tight), 32)
        .await
        .unwrap();
    assert_eq!(
        (far.too_far, far.append_only.is_none()),
        (Some(1), true),
        "steps: a first step over the budget is too far"
    );
    // Without a budget: today's single proof, bounded by epochs only.
    let whole = reader.answer_since(&alice, Some(1), 33).await.unwrap();
    whole.verify_extends(&first.head).await.unwrap();
    assert!(whole.append_only.is_some_and(|a| a.step.is_none()));
}

fn batch(nodes: &[(&[u8], &[u8])], root: Option<RootWrite>) -> RecordBatch {
    RecordBatch {
        nodes: nodes
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect(),
        value_states: Vec::new(),
        root,
        head: None,
    }
}

fn root(expected_epoch: Option<u64>, epoch: u64, blob: &[u8]) -> Option<RootWrite> {
    Some(RootWrite {
        expected_epoch,
        epoch,
        blob: blob.to_vec(),
    })
}

/// Blobs written through one instance read back through the other; missing nodes are left
/// out; value states are listed per label with their epochs; domains are separate.
pub async fn blobs_round_trip(a: &Arc<dyn DirectoryStore>, b: &Arc<dyn DirectoryStore>) {
    const D: &str = "round-trip.example";
    assert_eq!(b.root(D).await.unwrap(), None, "round trip: fresh root");
    let node1 = [2u8, 0, 0, 1, 0, 7, 7];
    let node2 = [2u8, 0, 0, 1, 0, 8, 8];
    let mut first = batch(&[(&node1, b"n1"), (&node2, b"n2")], root(None, 0, b"r0"));
    first.value_states = vec![
        ValueStateBlob {
            label: b"label-a".to_vec(),
            epoch: 0,
            blob: b"a0".to_vec(),
        },
        ValueStateBlob {
            label: b"label-b".to_vec(),
            epoch: 0,
            blob: b"b0".to_vec(),
        },
    ];
    a.commit(D, first).await.unwrap();
    let mut second = batch(&[(&node1, b"n1'")], root(Some(0), 1, b"r1"));
    second.value_states = vec![ValueStateBlob {
        label: b"label-a".to_vec(),
        epoch: 1,
        blob: b"a1".to_vec(),
    }];
    a.commit(D, second).await.unwrap();

    assert_eq!(
        b.root(D).await.unwrap(),
        Some((1, b"r1".to_vec())),
        "round trip: root"
    );
    let mut nodes = b
        .nodes(D, &[node1.to_vec(), vec![2, 0, 0, 0, 9, 9], node2.to_vec()])
        .await
        .unwrap();
    nodes.sort();
    assert_eq!(
        nodes,
        vec![b"n1'".to_vec(), b"n2".to_vec()],
        "round trip: nodes"
    );
    let mut states = b.value_states(D, b"label-a").await.unwrap();
    states.sort();
    assert_eq!(
        states,
        vec![(0, b"a0".to_vec()), (1, b"a1".to_vec())],
        "round trip: value states of one label"
    );
    assert!(
        b.value_states(D, b"label-c").await.unwrap().is_empty(),
        "round trip: unknown label"
    );
    assert_eq!(
        b.root("other.example").await.unwrap(),
        None,
        "round trip: another domain is separate"
    );
}

/// The writer's batched reads agree with the single ones: the value states of several labels
/// (one missing) in one call, the root with nodes in one call. A batch's head is stored with
/// its root (insert-if-absent: a head stored before stays), not when the fence refuses it.
pub async fn batched_reads_and_heads_with_the_commit(
    a: &Arc<dyn DirectoryStore>,
    b: &Arc<dyn DirectoryStore>,
) {
    const D: &str = "batched.example";
    let node = [2u8, 0, 0, 1, 0, 5, 5];
    assert_eq!(
        b.root_and_nodes(D, &[node.to_vec()]).await.unwrap(),
        (None, Vec::new()),
        "batched: nothing before the first commit"
    );
    a.commit(D, batch(&[(&node, b"n0")], root(None, 0, b"r0")))
        .await
        .unwrap();
    let mut first = batch(&[(&node, b"n1")], root(Some(0), 1, b"r1"));
    first.head = Some(b"head of 1".to_vec());
    first.value_states = ["x", "y"]
        .iter()
        .flat_map(|l| {
            [1u64, 2].map(|e| ValueStateBlob {
                label: format!("label-{l}").into_bytes(),
                epoch: e,
                blob: format!("{l}{e}").into_bytes(),
            })
        })
        .collect();
    a.commit(D, first).await.unwrap();
    assert_eq!(
        b.heads(D, 1, 1).await.unwrap(),
        vec![(1, b"head of 1".to_vec())],
        "batched: a batch's head is stored with it"
    );
    let labels = [
        b"label-x".to_vec(),
        b"label-none".to_vec(),
        b"label-y".to_vec(),
    ];
    let mut batched = b.value_states_batch(D, &labels).await.unwrap();
    batched.sort();
    let mut single = Vec::new();
    for label in &labels {
        for (epoch, blob) in b.value_states(D, label).await.unwrap() {
            single.push((label.clone(), epoch, blob));
        }
    }
    single.sort();
    assert_eq!(single.len(), 4, "batched: the single reads see four states");
    assert_eq!(batched, single, "batched: value states of several labels");
    let (root_read, nodes) = b
        .root_and_nodes(D, &[node.to_vec(), vec![2, 0, 0, 0, 1]])
        .await
        .unwrap();
    assert_eq!(
        (root_read, nodes),
        (Some((1, b"r1".to_vec())), vec![b"n1".to_vec()]),
        "batched: the root and the nodes asked for"
    );
    // A head stored before the epoch's batch stays; a refused batch stores none.
    b.insert_head(D, 2, b"earlier head of 2").await.unwrap();
    let mut second = batch(&[(&node, b"n2")], root(Some(1), 2, b"r2"));
    second.head = Some(b"head of 2".to_vec());
    a.commit(D, second).await.unwrap();
    let mut stale = batch(&[(&node, b"stale")], root(Some(1), 2, b"fork"));
    stale.head = Some(b"fork head".to_vec());
    stale.value_states = vec![ValueStateBlob {
        label: b"label-x".to_vec(),
        epoch: 2,
        blob: b"fork".to_vec(),
    }];
    let refused = a.commit(D, stale).await;
    assert!(
        matches!(refused, Err(DirectoryStoreError::Conflict(_))),
        "batched: a stale batch with a head must conflict, got {refused:?}"
    );
    let mut stale3 = batch(&[(&node, b"stale")], root(Some(1), 3, b"fork"));
    stale3.head = Some(b"fork head 3".to_vec());
    assert!(
        matches!(
            a.commit(D, stale3).await,
            Err(DirectoryStoreError::Conflict(_))
        ),
        "batched: a batch for epoch 3 built on 1 must conflict"
    );
    assert_eq!(
        b.heads(D, 1, 3).await.unwrap(),
        vec![
            (1, b"head of 1".to_vec()),
            (2, b"earlier head of 2".to_vec())
        ],
        "batched: the head stored first stays, a refused batch stores none"
    );
    assert_eq!(
        b.value_states(D, b"label-x").await.unwrap().len(),
        2,
        "batched: a refused batch writes no value state"
    );
}

/// The root is insert-if-absent at epoch 0; a batch built on a stale epoch writes nothing and
/// fails with `Conflict`; a batch of nodes alone is dropped once a root exists.
pub async fn fence_and_first_root(store: &Arc<dyn DirectoryStore>) {
    const D: &str = "fence.example";
    store
        .commit(D, batch(&[(b"\x02first", b"empty tree")], None))
        .await
        .unwrap();
    store
        .commit(D, batch(&[], root(None, 0, b"first")))
        .await
        .unwrap();
    store
        .commit(D, batch(&[], root(None, 0, b"second")))
        .await
        .unwrap();
    assert_eq!(
        store.root(D).await.unwrap(),
        Some((0, b"first".to_vec())),
        "fence: a second empty root must not replace the first"
    );
    store
        .commit(D, batch(&[(b"\x02first", b"late starter")], None))
        .await
        .unwrap();
    assert_eq!(
        store.nodes(D, &[b"\x02first".to_vec()]).await.unwrap(),
        vec![b"empty tree".to_vec()],
        "fence: nodes alone must be dropped once a root exists"
    );
    store
        .commit(
            D,
            batch(&[(b"\x02n", b"epoch 1")], root(Some(0), 1, b"one")),
        )
        .await
        .unwrap();
    let stale = store
        .commit(D, batch(&[(b"\x02n", b"stale")], root(Some(0), 1, b"fork")))
        .await;
    assert!(
        matches!(stale, Err(DirectoryStoreError::Conflict(_))),
        "fence: a batch built on epoch 0 after epoch 1 must conflict, got {stale:?}"
    );
    assert_eq!(
        store.nodes(D, &[b"\x02n".to_vec()]).await.unwrap(),
        vec![b"epoch 1".to_vec()],
        "fence: a refused batch must write nothing"
    );
    assert_eq!(
        store.root(D).await.unwrap(),
        Some((1, b"one".to_vec())),
        "fence: root after the refused batch"
    );
}

/// Heads are insert-if-absent per epoch (the first of two writers' heads stays, through
/// either instance) and listed by epoch range; cosignatures are per (epoch, witness), a
/// witness's second one for an epoch replaces its first, and a witness's newest is found;
/// domains are separate.
pub async fn heads_and_cosignatures(a: &Arc<dyn DirectoryStore>, b: &Arc<dyn DirectoryStore>) {
    const D: &str = "heads.example";
    assert_eq!(
        a.heads(D, 0, 10).await.unwrap(),
        Vec::new(),
        "heads: none before the first"
    );
    assert_eq!(
        a.insert_head(D, 1, b"head 1").await.unwrap(),
        b"head 1".to_vec(),
        "heads: the first head of an epoch is stored"
    );
    assert_eq!(
        b.insert_head(D, 1, b"other head 1").await.unwrap(),
        b"head 1".to_vec(),
        "heads: a second head for one epoch must not replace the first"
    );
    b.insert_head(D, 3, b"head 3").await.unwrap();
    b.insert_head(D, 12, b"head 12").await.unwrap();
    assert_eq!(
        a.heads(D, 0, 10).await.unwrap(),
        vec![(1, b"head 1".to_vec()), (3, b"head 3".to_vec())],
        "heads: a range lists the stored heads in it, oldest first"
    );
    assert_eq!(
        a.heads(D, 12, 12).await.unwrap(),
        vec![(12, b"head 12".to_vec())],
        "heads: one epoch"
    );
    // Epochs no directory reaches (`/head/<epoch>` looks them up as a client wrote them,
    // up to `u64::MAX`) have no head: not an error (on PostgreSQL, whose epochs are
    // `BIGINT`, they were "unavailable", a 503 with a warning for an anonymous request).
    for (from, to) in [
        (u64::MAX, u64::MAX),
        (i64::MAX as u64 + 1, i64::MAX as u64 + 2),
        (i64::MAX as u64, i64::MAX as u64 + 1),
    ] {
        assert_eq!(
            a.heads(D, from, to).await.unwrap(),
            Vec::new(),
            "heads: none from {from} to {to}"
        );
    }
    assert_eq!(
        a.heads("other.example", 0, 20).await.unwrap(),
        Vec::new(),
        "heads: another domain is separate"
    );

    let (w1, w2, w3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    assert_eq!(
        a.latest_cosignature(D, &w1).await.unwrap(),
        None,
        "cosignatures: none before the first"
    );
    a.put_cosignature(D, 1, &w1, 10, b"w1 at 1").await.unwrap();
    b.put_cosignature(D, 1, &w2, 10, b"w2 at 1").await.unwrap();
    a.put_cosignature(D, 3, &w1, 30, b"w1 at 3").await.unwrap();
    // A late cosignature of an older epoch must not hide the witness's newest.
    b.put_cosignature(D, 2, &w1, 40, b"w1 at 2").await.unwrap();
    let mut at1 = b.cosignatures(D, 1).await.unwrap();
    at1.sort();
    assert_eq!(
        at1,
        vec![(w1, b"w1 at 1".to_vec()), (w2, b"w2 at 1".to_vec())],
        "cosignatures: per epoch and witness"
    );
    assert_eq!(
        b.latest_cosignature(D, &w1).await.unwrap(),
        Some((3, b"w1 at 3".to_vec())),
        "cosignatures: a witness's newest"
    );
    assert_eq!(
        a.latest_cosignature(D, &w2).await.unwrap(),
        Some((1, b"w2 at 1".to_vec())),
        "cosignatures: another witness's newest"
    );
    assert_eq!(
        a.latest_cosignature(D, &w3).await.unwrap(),
        None,
        "cosignatures: a witness that never cosigned"
    );
    // Epoch 3 holds w1's check "again" (at 31), as its cosignature and its newest.
    let holds_again = async |store: &Arc<dyn DirectoryStore>, what: &str| {
        let again = b"w1 at 3, again".to_vec();
        assert_eq!(
            store.cosignatures(D, 3).await.unwrap(),
            vec![(w1, again.clone())],
            "cosignatures: {what}"
        );
        assert_eq!(
            store.latest_cosignature(D, &w1).await.unwrap(),
            Some((3, again)),
            "cosignatures: {what} (the newest)"
        );
    };
    b.put_cosignature(D, 3, &w1, 31, b"w1 at 3, again")
        .await
        .unwrap();
    holds_again(
        a,
        "a witness's second cosignature of an epoch replaces its first",
    )
    .await;
    // Red team (issue 18, ktfair): two instances storing two checks of one epoch at once,
    // the later one first. The earlier check arriving second used to replace it.
    a.put_cosignature(D, 3, &w1, 29, b"w1 at 3, an earlier check")
        .await
        .unwrap();
    holds_again(b, "an earlier check of an epoch never replaces a later one").await;
    b.put_cosignature(D, 3, &w1, 31, b"w1 at 3, again")
        .await
        .unwrap();
    holds_again(a, "the same check again is stored").await;
    assert!(
        a.cosignatures(D, 4).await.unwrap().is_empty(),
        "cosignatures: an epoch nobody cosigned"
    );
    assert!(
        a.cosignatures("other.example", 1).await.unwrap().is_empty(),
        "cosignatures: another domain is separate"
    );
}

/// A log stores one signed head per epoch as it commits (the same head through either
/// instance, whatever the time of the later read); the audit answer over them verifies; a
/// witness's cosignature is stored only when it verifies against the stored head, and is
/// found as that witness's newest; an altered stored head is refused.
pub async fn log_stores_heads_and_cosignatures(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    use crate::transparency::HeadSigner;

    const D: &str = "witnessed.example";
    let keys_a = LogKeys::generate(D);
    let keys_b = LogKeys::parse(&keys_a.to_file()).unwrap();
    let head_key = keys_a.head.public_key();
    let log_a = DomainLog::open(Arc::clone(&a), keys_a).await.unwrap();
    let log_b = DomainLog::open(b, keys_b).await.unwrap();
    let mut roots = BTreeMap::new();
    for n in 0..3u64 {
        let addr = address(&format!("w{n}@witnessed.example"));
        match log_a
            .sync(&addr, Some(&record(&addr, 4, n, 1)), 100 + n)
            .await
        {
            Ok(Synced::Recorded {
                epoch, root_hash, ..
            }) => {
                roots.insert(epoch, root_hash);
            }
            other => panic!("heads: {addr}: {other:?}"),
        }
    }
    let heads = log_b.stored_heads(0, 10).await.unwrap();
    assert_eq!(
        heads.iter().map(|h| h.head.epoch).collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "heads: one stored head per epoch, the empty directory's included"
    );
    for h in &heads[1..] {
        assert_eq!(
            Some(&h.head.root_hash),
            roots.get(&h.head.epoch),
            "heads: the stored head names the epoch's root"
        );
        h.verify(&head_key).expect("heads: signed by the log's key");
    }
    let latest = log_b.head(999).await.unwrap();
    assert_eq!(
        &latest, &heads[3],
        "heads: the latest head is the stored one, not signed again per request"
    );
    assert_eq!(
        log_a.head_at(2, 999).await.unwrap().as_ref(),
        Some(&heads[2]),
        "heads: an older epoch's stored head"
    );
    assert_eq!(
        log_a.head_at(4, 999).await.unwrap(),
        None,
        "heads: an epoch that does not exist yet"
    );
    let audit = log_b.audit_answer(0, 3).await.unwrap();
    audit
        .verify(&head_key)
        .await
        .unwrap_or_else(|e| panic!("heads: the audit answer from 0 to 3: {e}"));
    let parsed = crate::transparency::witness::AuditAnswer::parse(&audit.to_text().unwrap())
        .expect("heads: the audit answer's text parses");
    assert_eq!(parsed, audit, "heads: the audit answer survives its text");

    let witness = HeadSigner::generate();
    let other = HeadSigner::generate();
    let good = witness.cosign(&heads[3], 1000).unwrap();
    log_a.add_cosignature(3, &good).await.unwrap();
    assert!(
        log_a
            .add_cosignature(2, &witness.cosign(&heads[3], 1000).unwrap())
            .await
            .is_err(),
        "cosignatures: a cosignature of epoch 3 must not be stored for epoch 2"
    );
    let mut forged = heads[3].clone();
    forged.head.root_hash = [7; 32];
    assert!(
        log_a
            .add_cosignature(3, &other.cosign(&forged, 1000).unwrap())
            .await
            .is_err(),
        "cosignatures: a cosignature of another head for epoch 3 must be refused"
    );
    assert!(
        log_a
            .add_cosignature(9, &other.cosign(&heads[3], 1000).unwrap())
            .await
            .is_err(),
        "cosignatures: an epoch without a stored head cannot be cosigned"
    );
    assert_eq!(
        log_b.cosignatures(&heads[3]).await.unwrap(),
        vec![good.clone()],
        "cosignatures: the stored cosignature, through the other instance"
    );
    assert_eq!(
        log_b.latest_cosigned(&witness.public_key()).await.unwrap(),
        Some((heads[3].clone(), good)),
        "cosignatures: the witness's newest"
    );
    assert_eq!(
        log_b.latest_cosigned(&other.public_key()).await.unwrap(),
        None,
        "cosignatures: a witness whose cosignatures were refused has none"
    );

    // A head stored behind the log's back (another key) is refused, not served.
    let intruder = LogKeys::generate(D);
    let mut fake = heads[3].head.clone();
    fake.epoch = 4;
    let fake = intruder.head.sign(fake).unwrap();
    a.insert_head(
        D,
        4,
        crate::transparency::answer::head_text(&fake)
            .unwrap()
            .as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        log_b.stored_heads(4, 4).await.is_err(),
        "heads: a stored head signed by another key must be refused"
    );
}

/// Publishes one epoch per name with akd alone (no head signed: a directory kept from before
/// heads were stored); the epochs and their roots go into `roots`.
async fn publish_without_heads(
    store: &Arc<dyn DirectoryStore>,
    keys: &LogKeys,
    names: &[&str],
    roots: &mut BTreeMap<u64, [u8; 32]>,
) {
    use crate::transparency::{KeyDirectory, StoredDirectory};
    let dir = KeyDirectory::open(
        StoredDirectory::new(Arc::clone(store), &keys.domain),
        keys.vrf.clone(),
    )
    .await
    .expect("late heads: open the directory");
    let (epoch, root) = dir.current().await.unwrap();
    roots.insert(epoch, root);
    for (n, name) in names.iter().enumerate() {
        let addr = address(&format!("{name}@{}", keys.domain));
        let entry = DirectoryEntry::for_record(&record(&addr, 5, n as u64, 1));
        let (epoch, root) = dir
            .publish(&[(addr, entry)])
            .await
            .expect("late heads: publish");
        roots.insert(epoch, root);
    }
}

/// The epochs of the stored heads of `from..=to`.
async fn stored_epochs(log: &DomainLog, from: u64, to: u64) -> Vec<u64> {
    let heads = log.stored_heads(from, to).await.unwrap();
    heads.iter().map(|h| h.head.epoch).collect()
}

/// Epochs without a stored head (a directory kept from before heads were stored, a store
/// that lost some) get one signed late, naming the root the epoch had: on demand (one older
/// epoch; an audit from epoch 0, which then verifies) and in the background; a stored head
/// that disagrees with the directory stops it, and nothing is signed.
pub async fn heads_are_signed_late(a: Arc<dyn DirectoryStore>, b: Arc<dyn DirectoryStore>) {
    const D: &str = "late.example";
    let keys = LogKeys::generate(D);
    let copy = || LogKeys::parse(&keys.to_file()).unwrap();
    let head_key = keys.head.public_key();
    let mut roots = BTreeMap::new();
    // Epochs 1 to 3 without heads, 4 and 5 through the log (heads 3 to 5), 6 and 7 without.
    publish_without_heads(&a, &keys, &["a1", "a2", "a3"], &mut roots).await;
    let log_a = DomainLog::open(Arc::clone(&a), copy()).await.unwrap();
    for (n, name) in ["l4", "l5"].iter().enumerate() {
        let addr = address(&format!("{name}@{D}"));
        match log_a
            .sync(&addr, Some(&record(&addr, 6, n as u64, 1)), 200)
            .await
        {
            Ok(Synced::Recorded {
                epoch, root_hash, ..
            }) => {
                roots.insert(epoch, root_hash);
            }
            other => panic!("late heads: {addr}: {other:?}"),
        }
    }
    publish_without_heads(&a, &keys, &["a6", "a7"], &mut roots).await;
    assert_eq!(
        stored_epochs(&log_a, 0, 7).await,
        vec![3, 4, 5],
        "late heads: the writer signs the epoch it builds on and its own"
    );

    // One older epoch, asked for alone (no stored head on either side): the epoch's root.
    let log_b = DomainLog::open(Arc::clone(&b), copy()).await.unwrap();
    let one = log_b
        .head_at(1, 300)
        .await
        .unwrap()
        .expect("late heads: the head of epoch 1 is signed on demand");
    one.verify(&head_key).unwrap();
    assert_eq!(
        (one.head.root_hash, one.head.signed_at),
        (roots[&1], 300),
        "late heads: the late head names the epoch's root and the time it was signed"
    );
    // An audit from epoch 0: every missing head signed, every root the epoch's; it verifies.
    let audit = log_b.audit_answer(0, 7).await.unwrap();
    audit
        .verify(&head_key)
        .await
        .unwrap_or_else(|e| panic!("late heads: the audit from 0 to 7: {e}"));
    let got: BTreeMap<u64, [u8; 32]> = audit
        .heads
        .iter()
        .map(|h| (h.head.epoch, h.head.root_hash))
        .collect();
    assert_eq!(got, roots, "late heads: each head names its epoch's root");
    assert_eq!(
        stored_epochs(&log_a, 0, 7).await,
        (0..=7).collect::<Vec<_>>()
    );

    // In the background: epochs 8 to 10 without heads; a log that starts its backfill signs
    // 8 and 9 (10, the latest, is signed by its first reader).
    publish_without_heads(&a, &keys, &["a8", "a9", "a10"], &mut roots).await;
    let log_c = DomainLog::open(Arc::clone(&a), copy()).await.unwrap();
    log_c.start_backfill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while stored_epochs(&log_c, 0, 9).await.len() < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "late heads: the background backfill signs epochs 8 and 9 (stored: {:?})",
            stored_epochs(&log_c, 0, 10).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for h in log_c.stored_heads(8, 9).await.unwrap() {
        assert_eq!(
            h.head.root_hash, roots[&h.head.epoch],
            "late heads: background"
        );
    }

    // A stored head (signed with the log's key) that names another root than the directory
    // gives its epoch: the heads next to it are not signed, the audit fails.
    publish_without_heads(&a, &keys, &["a11", "a12", "a13"], &mut roots).await;
    let forged = keys
        .head
        .sign(Head {
            domain: D.into(),
            epoch: 12,
            root_hash: [7; 32],
            vrf_public_key: keys.vrf.public_key().unwrap(),
            signed_at: 400,
        })
        .unwrap();
    let text = crate::transparency::answer::head_text(&forged).unwrap();
    a.insert_head(D, 12, text.as_bytes()).await.unwrap();
    let refused = log_b.audit_answer(9, 13).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("inconsistent")),
        "late heads: a planted head with another root must stop the late signing: {refused:?}"
    );
    assert_eq!(
        stored_epochs(&log_b, 10, 11).await,
        Vec::<u64>::new(),
        "late heads: nothing signed next to an inconsistent head"
    );
}

/// The hooks of a store that counts the reads of stored heads (the backfill's every step
/// reads some).
#[derive(Default)]
struct CountingHeads {
    reads: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl DirectoryHooks for CountingHeads {
    async fn heads(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        inner.heads(domain, from, to).await
    }
}

/// Red team (issue 18): a stored head an attacker with write access to the store altered
/// (here: not a head at all) next to a run of missing heads stops the background backfill,
/// as an inconsistent directory does. It used to count as a store that is down: the backfill
/// tried again every idle second, forever, each time pausing the log's thread for a second
/// (a write arriving then waited) and logging a warning.
pub async fn an_altered_head_stops_the_backfill(a: Arc<dyn DirectoryStore>) {
    const D: &str = "altered.example";
    let keys = LogKeys::generate(D);
    let mut roots = BTreeMap::new();
    // Epochs 1 to 4 without heads; epoch 2's head is garbage.
    publish_without_heads(&a, &keys, &["g1", "g2", "g3", "g4"], &mut roots).await;
    a.insert_head(D, 2, b"not a head").await.unwrap();
    let counting = Arc::new(DelegatingDirectory::new(
        Arc::clone(&a),
        CountingHeads::default(),
    ));
    let store: Arc<dyn DirectoryStore> = counting.clone();
    let log = DomainLog::open(store, keys).await.unwrap();
    log.start_backfill();
    let reads = || counting.reads.load(std::sync::atomic::Ordering::SeqCst);
    // The scan, then the fill that meets the altered head, then (after one pause) nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while reads() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "altered head: the backfill never read the stored heads ({} reads)",
            reads()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let settled = reads();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        reads(),
        settled,
        "altered head: the backfill must stop at a stored head that is not this log's, not \
         retry it every idle second"
    );
    assert_eq!(
        stored_epochs(&log, 0, 1).await,
        Vec::<u64>::new(),
        "altered head: nothing signed next to it"
    );
}

/// Red team (issue 18, ktfair): a head stored for an epoch after the latest (a store
/// restored from a backup under newer heads, a head written outside kst) used to be built
/// over: the writer committed that epoch with another root (its own head dropped by
/// insert-if-absent), and every read of the latest head then failed. Now a log finds it when
/// it opens (and after its backfill scan), serves the committed epochs as before, and builds
/// no epoch up to it (the change fails as temporary: an operator must look); another
/// instance's ordinary commits are not mistaken for one.
pub async fn a_head_after_the_latest_epoch_is_never_built_over(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    const D: &str = "ahead.example";
    let keys = LogKeys::generate(D);
    let copy = || LogKeys::parse(&keys.to_file()).unwrap();
    let alice = address("alice@ahead.example");
    let bob = address("bob@ahead.example");
    // Two instances of a pool: the second one's commits are ordinary, not leftovers.
    let first = DomainLog::open(Arc::clone(&a), copy()).await.unwrap();
    let second = DomainLog::open(Arc::clone(&b), copy()).await.unwrap();
    first
        .sync(&alice, Some(&record(&alice, 40, 1, 1)), 10)
        .await
        .unwrap();
    second
        .sync(&bob, Some(&record(&bob, 40, 2, 1)), 11)
        .await
        .unwrap();
    let reopened = DomainLog::open(Arc::clone(&a), copy()).await.unwrap();
    reopened
        .sync(&alice, Some(&record(&alice, 40, 3, 2)), 12)
        .await
        .expect("ahead: another instance's commits are no leftover");
    drop((first, second, reopened));
    let latest = 3;

    // The leftover: a head of the next epoch with a root the directory never had.
    let leftover = keys
        .head
        .sign(Head {
            domain: D.into(),
            epoch: latest + 1,
            root_hash: [7; 32],
            vrf_public_key: keys.vrf.public_key().unwrap(),
            signed_at: 13,
        })
        .unwrap();
    a.insert_head(
        D,
        latest + 1,
        crate::transparency::answer::head_text(&leftover)
            .unwrap()
            .as_bytes(),
    )
    .await
    .unwrap();
    let log = DomainLog::open(Arc::clone(&b), copy()).await.unwrap();
    let refused = log
        .sync(&bob, Some(&record(&bob, 40, 4, 2)), 14)
        .await
        .expect_err("ahead: no epoch is built over a head the directory never committed");
    assert!(
        refused.to_string().contains("never committed"),
        "ahead: the refusal names it: {refused}"
    );
    assert_eq!(
        log.head(15).await.unwrap().head.epoch,
        latest,
        "ahead: the latest committed epoch is served"
    );
    assert_eq!(
        log.head_at(latest + 1, 15).await.unwrap(),
        None,
        "ahead: the leftover is never served"
    );
}

/// Review of issue 18 (F5): a history is answered on the stored head of its epoch, as a
/// look-up is, never on a head signed for that epoch anew. A store restored from a backup
/// under newer heads holds, for its latest epoch, a head naming another root than akd's:
/// look-ups refused to answer on it (an operator must look), but a history, and a page of
/// older versions, signed a second head for the epoch over akd's root (a fork made by kst
/// itself, which every client that saw the stored head calls an attack). Now both are
/// refused as temporary failures ([`TransparencyError::Directory`], naming the root) and the
/// stored head stays the only one of its epoch.
///
/// [`TransparencyError::Directory`]: crate::transparency::TransparencyError::Directory
pub async fn a_history_is_never_signed_over_another_stored_head(a: Arc<dyn DirectoryStore>) {
    use crate::transparency::answer::head_text;
    use crate::transparency::{KeyDirectory, StoredDirectory, TransparencyError};
    const D: &str = "restored.example";
    let keys = LogKeys::generate(D);
    let alice = address("alice@restored.example");
    // Two versions of alice (a page below version 2 holds version 1), without heads.
    let dir = KeyDirectory::open(StoredDirectory::new(Arc::clone(&a), D), keys.vrf.clone())
        .await
        .expect("restored: open the directory");
    for v in 1..=2 {
        let entry = DirectoryEntry::for_record(&record(&alice, 41, v, v));
        dir.publish(&[(alice.clone(), entry)])
            .await
            .expect("restored: publish");
    }
    let (latest, root) = dir.current().await.unwrap();
    // The head the restored store holds for its latest epoch: this log's keys, another root.
    let other = keys
        .head
        .sign(Head {
            domain: D.into(),
            epoch: latest,
            root_hash: [9; 32],
            vrf_public_key: keys.vrf.public_key().unwrap(),
            signed_at: 20,
        })
        .unwrap();
    assert_ne!(root, other.head.root_hash);
    a.insert_head(D, latest, head_text(&other).unwrap().as_bytes())
        .await
        .unwrap();
    let log = DomainLog::open(Arc::clone(&a), keys).await.unwrap();
    let refused = |what: &str, result: Result<(), TransparencyError>| match result {
        Err(TransparencyError::Directory(e)) => assert!(
            e.contains("not the directory's"),
            "restored: the {what}'s refusal names the stored head's root: {e}"
        ),
        other => panic!(
            "restored: the {what} at epoch {latest} was answered over another head than the \
             stored one (a second head for the epoch): {other:?}"
        ),
    };
    refused("look-up", log.answer(&alice, 21).await.map(|_| ()));
    refused("history", log.history(&alice, 22).await.map(|_| ()));
    refused("page", log.history_page(&alice, 2, 23).await.map(|_| ()));
    let stored = log.stored_heads(latest, latest).await.unwrap();
    assert_eq!(
        stored,
        vec![other],
        "restored: the stored head stays the only one of epoch {latest}"
    );
}

fn record(address: &Address, series: u32, n: u64, version: u64) -> KeyRecord {
    test_key(address, series, n).into_record(version)
}

/// A directory over the store records publications, replacements and deletions; every
/// answer verifies against the signed head and agrees with what the store serves; the
/// append-only proof from the first epoch verifies.
pub async fn directory_proves_the_store(store: Arc<dyn DirectoryStore>) {
    const D: &str = "proofs.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let log = DomainLog::open(store, keys).await.unwrap();
    let alice = address("alice@proofs.example");
    let bob = address("bob@proofs.example");
    let carol = address("carol@proofs.example");
    let mut roots = BTreeMap::new();
    let mut remember = |s: Synced| match s {
        Synced::Recorded {
            epoch, root_hash, ..
        } => {
            roots.insert(epoch, root_hash);
        }
        Synced::AlreadyRecorded => panic!("proofs: a change was not recorded"),
    };
    let alice1 = record(&alice, 1, 1, 1);
    let alice2 = record(&alice, 1, 2, 2);
    let bob1 = record(&bob, 1, 3, 1);
    remember(log.sync(&alice, Some(&alice1), 10).await.unwrap());
    remember(log.sync(&bob, Some(&bob1), 11).await.unwrap());
    remember(log.sync(&alice, Some(&alice2), 12).await.unwrap());
    remember(log.sync(&bob, None, 13).await.unwrap());
    assert_eq!(
        log.sync(&alice, Some(&alice2), 14).await.unwrap(),
        Synced::AlreadyRecorded,
        "proofs: syncing the same record again must write nothing"
    );
    assert_eq!(
        log.sync(&carol, None, 14).await.unwrap(),
        Synced::AlreadyRecorded,
        "proofs: an address never published has no deletion to record"
    );

    let answer = log.answer(&alice, 20).await.unwrap();
    let entry = answer
        .verify(&head_key, &alice, Served::Key(&alice2.key))
        .await
        .unwrap_or_else(|e| panic!("proofs: alice's current key: {e}"))
        .expect("proofs: alice has an entry");
    assert_eq!(entry.version, 2, "proofs: alice's version");
    assert!(
        answer
            .verify(&head_key, &alice, Served::Key(&alice1.key))
            .await
            .is_err(),
        "proofs: alice's superseded key must be refused"
    );
    assert!(
        answer
            .verify(&head_key, &alice, Served::Nothing)
            .await
            .is_err(),
        "proofs: \"no key\" for alice must be refused"
    );
    let other_key = LogKeys::generate(D).head.public_key();
    assert!(
        answer
            .verify(&other_key, &alice, Served::Key(&alice2.key))
            .await
            .is_err(),
        "proofs: a head signed by another key must be refused"
    );
    let parsed = crate::transparency::answer::LogAnswer::parse(&answer.to_text().unwrap())
        .expect("proofs: the answer's text parses");
    assert_eq!(parsed, answer, "proofs: the answer survives its text");

    let answer = log.answer(&bob, 21).await.unwrap();
    let entry = answer
        .verify(&head_key, &bob, Served::Nothing)
        .await
        .unwrap_or_else(|e| panic!("proofs: bob's deletion: {e}"))
        .expect("proofs: bob has an entry");
    assert_eq!(entry.state, EntryState::Deleted, "proofs: bob is deleted");
    assert!(
        answer
            .verify(&head_key, &bob, Served::Key(&bob1.key))
            .await
            .is_err(),
        "proofs: bob's deleted key must be refused"
    );

    let answer = log.answer(&carol, 22).await.unwrap();
    assert_eq!(
        answer
            .verify(&head_key, &carol, Served::Nothing)
            .await
            .unwrap_or_else(|e| panic!("proofs: carol's absence: {e}")),
        None,
        "proofs: carol was never published"
    );
    assert!(
        answer
            .verify(&head_key, &carol, Served::Key(&alice2.key))
            .await
            .is_err(),
        "proofs: a key for carol must be refused"
    );
    audit_all(&log, &roots).await;
}

/// The stored value states of `address` in domain `d` as (akd version, value), by version.
async fn stored_values(
    store: &Arc<dyn DirectoryStore>,
    d: &str,
    address: &Address,
) -> Vec<(u64, akd::AkdValue)> {
    use akd::storage::types::DbRecord;
    let label = crate::transparency::directory_label(address);
    let mut out: Vec<(u64, akd::AkdValue)> = store
        .value_states(d, &label.0)
        .await
        .unwrap_or_else(|e| panic!("withdraw: value states of {address}: {e}"))
        .into_iter()
        .map(
            |(epoch, blob)| match crate::transparency::records::decode(&blob) {
                Ok(DbRecord::ValueState(s)) if s.epoch == epoch => (s.version, s.value),
                other => panic!("withdraw: {address} epoch {epoch}: not a value state: {other:?}"),
            },
        )
        .collect();
    out.sort_by_key(|(v, _)| *v);
    out
}

/// Deletion drops the values (docs/TRANSPARENCY.md, "Deletion"; docs/SECURITY.md): the
/// epoch that records a deletion also replaces the value of every earlier version of the
/// address that held a key (its fingerprint and key hash) with akd's tombstone, in the
/// stored value states themselves. The deletion's entry and other addresses' values stay;
/// the look-up, the history (the withdrawn versions as `None`) and the audit still verify; a
/// key published after the deletion is served and proven, and a second deletion withdraws it
/// too while the first deletion's entry stays.
pub async fn deletion_withdraws_every_earlier_value(store: Arc<dyn DirectoryStore>) {
    const D: &str = "withdraw.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let log = DomainLog::open(Arc::clone(&store), keys).await.unwrap();
    let alice = address("alice@withdraw.example");
    let bob = address("bob@withdraw.example");
    let mut roots = BTreeMap::new();
    let alice1 = record(&alice, 3, 1, 1);
    let alice2 = record(&alice, 3, 2, 2);
    let bob1 = record(&bob, 3, 3, 1);
    let alice3 = record(&alice, 3, 4, 1);
    let tombstone = akd::AkdValue(akd::TOMBSTONE.to_vec());
    let deleted = |value: &akd::AkdValue| {
        DirectoryEntry::from_value(value).is_ok_and(|e| e.state == EntryState::Deleted)
    };
    let steps: [(&Address, Option<&KeyRecord>); 6] = [
        (&alice, Some(&alice1)),
        (&bob, Some(&bob1)),
        (&alice, Some(&alice2)),
        (&alice, None),
        (&alice, Some(&alice3)),
        (&alice, None),
    ];
    for (i, (a, r)) in steps.into_iter().enumerate() {
        match log.sync(a, r, 10 + i as u64).await {
            Ok(Synced::Recorded {
                epoch, root_hash, ..
            }) => {
                roots.insert(epoch, root_hash);
            }
            other => panic!("withdraw: step {i} ({a}) was not recorded: {other:?}"),
        }
        if i == 3 {
            // The first deletion: alice's two keys withdrawn, bob's kept.
            let values = stored_values(&store, D, &alice).await;
            assert_eq!(values.len(), 3, "withdraw: alice's versions");
            assert_eq!(
                (&values[0].1, &values[1].1),
                (&tombstone, &tombstone),
                "withdraw: the deletion must withdraw alice's v1 and v2"
            );
            assert!(deleted(&values[2].1), "withdraw: v3 is the deletion");
            assert_eq!(
                stored_values(&store, D, &bob).await,
                vec![(1, DirectoryEntry::for_record(&bob1).to_value())],
                "withdraw: bob's value must stay"
            );
            let answer = log.answer(&alice, 30).await.unwrap();
            let entry = answer
                .verify(&head_key, &alice, Served::Nothing)
                .await
                .unwrap_or_else(|e| panic!("withdraw: alice's deletion: {e}"))
                .expect("withdraw: alice has an entry");
            assert_eq!(entry.state, EntryState::Deleted);
            let history = log
                .history(&alice, 31)
                .await
                .unwrap()
                .expect("withdraw: alice's history")
                .verify(&head_key, &alice)
                .unwrap_or_else(|e| panic!("withdraw: alice's history after the deletion: {e}"));
            let shown: Vec<(u64, Option<EntryState>)> = history
                .iter()
                .map(|v| (v.akd_version, v.entry.as_ref().map(|e| e.state)))
                .collect();
            assert_eq!(
                shown,
                vec![(3, Some(EntryState::Deleted)), (2, None), (1, None)],
                "withdraw: the history shows the deletion and two withdrawn versions"
            );
            log.answer(&bob, 32)
                .await
                .unwrap()
                .verify(&head_key, &bob, Served::Key(&bob1.key))
                .await
                .unwrap_or_else(|e| panic!("withdraw: bob after alice's deletion: {e}"));
        }
        if i == 4 {
            log.answer(&alice, 33)
                .await
                .unwrap()
                .verify(&head_key, &alice, Served::Key(&alice3.key))
                .await
                .unwrap_or_else(|e| panic!("withdraw: alice published again: {e}"));
        }
    }
    let values = stored_values(&store, D, &alice).await;
    let shown: Vec<(u64, &str)> = values
        .iter()
        .map(|(v, value)| {
            let what = if *value == tombstone {
                "withdrawn"
            } else if deleted(value) {
                "deleted"
            } else {
                "a key"
            };
            (*v, what)
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            (1, "withdrawn"),
            (2, "withdrawn"),
            (3, "deleted"),
            (4, "withdrawn"),
            (5, "deleted")
        ],
        "withdraw: after the second deletion"
    );
    audit_all(&log, &roots).await;
}

/// Verifies the append-only proof from the first to the last epoch of `roots`.
async fn audit_all(log: &DomainLog, roots: &BTreeMap<u64, [u8; 32]>) {
    let (&first, _) = roots.first_key_value().expect("audit: epochs");
    let (&last, _) = roots.last_key_value().expect("audit: epochs");
    let expected: Vec<u64> = (first..=last).collect();
    let got: Vec<u64> = roots.keys().copied().collect();
    assert_eq!(
        got, expected,
        "audit: every epoch was committed by exactly one writer"
    );
    let head = |epoch: u64| Head {
        domain: log.domain().to_string(),
        epoch,
        root_hash: roots[&epoch],
        vrf_public_key: log.vrf_public_key().unwrap(),
        signed_at: 0,
    };
    let intermediate: Vec<[u8; 32]> = (first + 1..last).map(|e| roots[&e]).collect();
    let proof = log.audit(first, last).await.unwrap();
    crate::transparency::verify::verify_append_only(
        &head(first),
        &head(last),
        &intermediate,
        proof,
    )
    .await
    .unwrap_or_else(|e| panic!("audit: epochs {first} to {last}: {e}"));
}

/// Two writers (two store instances, one log key) record different addresses at once: every
/// change lands in its own epoch, the epochs form one history whose append-only proof
/// verifies, and every address's answer verifies through either instance.
pub async fn two_writers_one_history(a: Arc<dyn DirectoryStore>, b: Arc<dyn DirectoryStore>) {
    const D: &str = "pool.example";
    const PER_WRITER: u64 = 12;
    let keys_a = LogKeys::generate(D);
    let keys_b = LogKeys::parse(&keys_a.to_file()).unwrap();
    let head_key = keys_a.head.public_key();
    let log_a = Arc::new(DomainLog::open(a, keys_a).await.unwrap());
    let log_b = Arc::new(DomainLog::open(b, keys_b).await.unwrap());
    // Both writers run at once (the fs store's calls are blocking tasks on other threads).
    let writer = |log: Arc<DomainLog>, who: &'static str| async move {
        let mut roots = Vec::new();
        for n in 0..PER_WRITER {
            let addr = address(&format!("{who}{n}@pool.example"));
            let rec = record(&addr, 2, n, 1);
            match log.sync(&addr, Some(&rec), 30 + n).await {
                Ok(Synced::Recorded {
                    epoch, root_hash, ..
                }) => roots.push((epoch, root_hash)),
                other => panic!("pool: {addr}: {other:?}"),
            }
        }
        roots
    };
    let (ra, rb) = tokio::join!(
        writer(Arc::clone(&log_a), "a"),
        writer(Arc::clone(&log_b), "b")
    );
    let mut roots = BTreeMap::new();
    for (epoch, root) in ra.into_iter().chain(rb) {
        assert!(
            roots.insert(epoch, root).is_none(),
            "pool: two writers both committed epoch {epoch}"
        );
    }
    assert_eq!(
        roots.len() as u64,
        2 * PER_WRITER,
        "pool: one epoch per change"
    );
    audit_all(&log_a, &roots).await;
    for (who, log) in [("a", &log_b), ("b", &log_a)] {
        for n in 0..PER_WRITER {
            let addr = address(&format!("{who}{n}@pool.example"));
            let rec = record(&addr, 2, n, 1);
            log.answer(&addr, 40)
                .await
                .unwrap()
                .verify(&head_key, &addr, Served::Key(&rec.key))
                .await
                .unwrap_or_else(|e| panic!("pool: {addr} through the other instance: {e}"));
        }
    }
}

/// A writer building on the epoch it committed itself asks the store nothing before its tree
/// work (it keeps akd's cache and the value states it committed): when another process
/// committed in between, that batch was built on a stale view, and the backend's fence must
/// refuse it and the writer build it again from the store. Writer A records three versions
/// of one address, the third after writer B (another store instance) recorded one between:
/// A's third attempt is fenced once ([`DomainLog::fenced`]) and lands after B's epoch with
/// the next version; the history is one (every epoch once, the append-only proof verifies)
/// and both instances read the same entries.
pub async fn a_stale_writer_is_fenced(a: Arc<dyn DirectoryStore>, b: Arc<dyn DirectoryStore>) {
    const D: &str = "stale.example";
    let keys_a = LogKeys::generate(D);
    let keys_b = LogKeys::parse(&keys_a.to_file()).unwrap();
    let head_key = keys_a.head.public_key();
    let log_a = DomainLog::open(a, keys_a).await.unwrap();
    let log_b = DomainLog::open(b, keys_b).await.unwrap();
    let alice = address("alice@stale.example");
    let bob = address("bob@stale.example");
    let mut roots = BTreeMap::new();
    let mut recorded = |what: &str, synced: crate::transparency::Result<Synced>| match synced {
        Ok(Synced::Recorded {
            epoch,
            root_hash,
            entry,
        }) => {
            assert!(
                roots.insert(epoch, root_hash).is_none(),
                "stale: {what}: epoch {epoch} committed twice"
            );
            (epoch, entry)
        }
        other => panic!("stale: {what}: {other:?}"),
    };
    let v = |version: u64| record(&alice, 3, version, version);
    // A: version 1, then version 2 on its own epoch (no read of the root between).
    let (e1, _) = recorded("a v1", log_a.sync(&alice, Some(&v(1)), 10).await);
    let (e2, entry) = recorded("a v2", log_a.sync(&alice, Some(&v(2)), 11).await);
    assert_eq!(
        (e2, entry.version),
        (e1 + 1, 2),
        "stale: A's second version on its own epoch"
    );
    // B (another process) commits version 3 and bob's key.
    let (e3, entry) = recorded("b v3", log_b.sync(&alice, Some(&v(3)), 12).await);
    assert_eq!((e3, entry.version), (e2 + 1, 3), "stale: B's epoch");
    let rec_bob = record(&bob, 3, 9, 1);
    let (e4, _) = recorded("b bob", log_b.sync(&bob, Some(&rec_bob), 13).await);
    assert_eq!(log_a.fenced(), 0, "stale: nothing fenced yet");
    // A builds version 4 on its own epoch e2 (stale: B committed e3 and e4). The fence
    // refuses it; rebuilt from the store, it lands after B's epochs as the next version.
    let (e5, entry) = recorded("a v4", log_a.sync(&alice, Some(&v(4)), 14).await);
    assert_eq!(
        log_a.fenced(),
        1,
        "stale: A's batch built on its own (stale) epoch {e2} was refused by the fence once"
    );
    assert_eq!(
        (e5, entry.version),
        (e4 + 1, 4),
        "stale: A's rebuilt batch follows B's epochs with the next version"
    );
    assert_eq!(log_b.fenced(), 0, "stale: B was never fenced");
    // A again on its own epoch: no fence.
    let (e6, entry) = recorded("a v5", log_a.sync(&alice, Some(&v(5)), 15).await);
    assert_eq!(
        (e6, entry.version, log_a.fenced()),
        (e5 + 1, 5, 1),
        "stale: A on its own epoch again"
    );
    // One history, read alike through both instances.
    let history = log_b.entries(&alice).await.unwrap();
    let versions: Vec<(u64, u64)> = history.iter().map(|(e, d)| (*e, d.version)).collect();
    assert_eq!(
        versions,
        vec![(e1, 1), (e2, 2), (e3, 3), (e5, 4), (e6, 5)],
        "stale: alice's history: {}",
        show_history(&history)
    );
    assert_eq!(
        log_a.entries(&alice).await.unwrap(),
        history,
        "stale: both instances"
    );
    assert_eq!(
        log_a.entries(&bob).await.unwrap().pop().map(|(_, e)| e),
        Some(DirectoryEntry::for_record(&rec_bob)),
        "stale: bob's key, committed by B, is there for A"
    );
    audit_all(&log_a, &roots).await;
    log_a
        .answer(&alice, 20)
        .await
        .unwrap()
        .verify(&head_key, &alice, Served::Key(&v(5).key))
        .await
        .unwrap_or_else(|e| panic!("stale: alice's answer through A: {e}"));
    log_b
        .answer(&bob, 20)
        .await
        .unwrap()
        .verify(&head_key, &bob, Served::Key(&rec_bob.key))
        .await
        .unwrap_or_else(|e| panic!("stale: bob's answer through B: {e}"));
}

/// Writers per process in [`one_address_in_store_order`].
pub const ORDER_WRITERS: u64 = 3;
/// Publications per writer in [`one_address_in_store_order`].
pub const ORDER_PUBLICATIONS: u64 = 8;

/// The directory's history of `address`, one line per entry (for failure messages).
fn show_history(history: &[(u64, DirectoryEntry)]) -> String {
    history
        .iter()
        .map(|(epoch, e)| format!("epoch {epoch}: v{} {:?}", e.version, e.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Two processes (two key store handles `stores`, two directory handles `dirs`, each pair
/// wrapped in its own [`TransparentStore`] and log) publish versions of ONE address at once,
/// [`ORDER_WRITERS`] tasks each. Then: the directory's history of the address is the
/// store's, in its order (every version, each entry the store's record of that version) and
/// ends at the store's current key; a deletion is recorded with the deleted
/// version + 1; a publication after it starts again at version 1; a restore whose version is
/// not above the directory's is recorded as a deletion, then the restored key; a key
/// written behind the log's back is recorded by `record_all`, once. `stores` must be empty
/// for `order.example`.
pub async fn one_address_in_store_order(
    stores: [Arc<dyn KeyStore>; 2],
    dirs: [Arc<dyn DirectoryStore>; 2],
) {
    one_address_in_store_order_as(stores, dirs, false).await
}

/// How many addresses [`an_epochs_addresses_are_read_at_once`] publishes at once.
const AT_ONCE: usize = 12;

/// Counts the key store calls the directory's writer makes through a [`TransparentStore`]
/// (`get`, `get_many`), and holds the first of them until `release` is set, so that the
/// publications made meanwhile queue for one epoch.
#[derive(Default)]
struct ReadCounter {
    /// The addresses read with `get`, one each.
    gets: std::sync::Mutex<Vec<Address>>,
    /// The addresses of each `get_many`.
    many: std::sync::Mutex<Vec<Vec<Address>>>,
    first: std::sync::atomic::AtomicBool,
    release: std::sync::atomic::AtomicBool,
}

impl ReadCounter {
    /// Waits (at most 20 s) for `release` when this is the first read.
    async fn hold_first(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.first.swap(true, SeqCst) {
            return;
        }
        for _ in 0..2000 {
            if self.release.load(SeqCst) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[async_trait::async_trait]
impl crate::testing::StoreHooks for ReadCounter {
    async fn get(
        &self,
        inner: &dyn KeyStore,
        address: &Address,
    ) -> crate::Result<Option<KeyRecord>> {
        self.hold_first().await;
        self.gets.lock().unwrap().push(address.clone());
        inner.get(address).await
    }

    async fn get_many(
        &self,
        inner: &dyn KeyStore,
        addresses: &[Address],
    ) -> crate::Result<Vec<Option<KeyRecord>>> {
        self.hold_first().await;
        self.many.lock().unwrap().push(addresses.to_vec());
        inner.get_many(addresses).await
    }
}

/// The directory's writer reads the key store's current records of an epoch's addresses in
/// one read ([`KeyStore::get_many`]) where `store` batches reads (PostgreSQL, Redis on one
/// server: one round trip per epoch instead of one per address), and one `get` each where it
/// does not (fs). [`AT_ONCE`] addresses are published at once through a
/// [`TransparentStore`] (`unsynced`: as kst-bin wires PostgreSQL) while the writer's first
/// read is held, so the others queue for the next epoch; every publication is then recorded
/// and proven by the directory as the store holds it.
pub async fn an_epochs_addresses_are_read_at_once(
    store: Arc<dyn KeyStore>,
    dir: Arc<dyn DirectoryStore>,
    unsynced: bool,
) {
    use std::sync::atomic::Ordering::SeqCst;
    const D: &str = "batch.example";
    let batches = store.batches_reads();
    let counted = Arc::new(crate::testing::DelegatingStore::new(
        Arc::clone(&store),
        ReadCounter::default(),
    ));
    let log = Arc::new(DomainLog::open(dir, LogKeys::generate(D)).await.unwrap());
    let wrapped = TransparentStore::new(counted.clone(), vec![Arc::clone(&log)]);
    let wrapped = Arc::new(match unsynced {
        true => wrapped.with_unsynced_publications(),
        false => wrapped,
    });
    let addresses: Vec<Address> = (0..AT_ONCE)
        .map(|i| address(&format!("reader{i}@{D}")))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, a) in addresses.iter().enumerate() {
        let (wrapped, key) = (Arc::clone(&wrapped), test_key(a, 60, i as u64));
        tasks.spawn(async move { wrapped.publish(key).await });
    }
    // Every publication but the first epoch's has reached the directory's queue once the
    // store holds all of them (the writer is held at its first read meanwhile).
    for _ in 0..2000 {
        let held = store.get_many(&addresses).await.unwrap();
        if held.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    counted.release.store(true, SeqCst);
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("a publication panicked") {
            Ok(PublishOutcome::Published(r)) => assert_eq!(r.version, 1),
            other => panic!("batched reads: a publication failed: {other:?}"),
        }
    }
    // The writer may read an address again (an attempt retried after another commit): what
    // counts is how it reads, and that every address was read.
    let many: Vec<usize> = counted.many.lock().unwrap().iter().map(Vec::len).collect();
    let gets = counted.gets.lock().unwrap().clone();
    let read: std::collections::BTreeSet<Address> = counted
        .many
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .chain(gets.iter())
        .cloned()
        .collect();
    assert_eq!(
        read.len(),
        AT_ONCE,
        "{}: every address read (get_many calls of {many:?} addresses, gets {gets:?})",
        store.name()
    );
    if batches {
        assert!(
            gets.is_empty(),
            "{}: a store that batches reads is read with get_many only (gets {gets:?}, get_many \
             calls of {many:?} addresses)",
            store.name()
        );
        assert!(
            many.iter().any(|n| *n > 1),
            "{}: the addresses that queued were read at once: get_many calls of {many:?} addresses",
            store.name()
        );
    } else {
        assert!(
            many.is_empty(),
            "{}: a store that does not batch reads is read address by address: get_many calls \
             of {many:?} addresses",
            store.name()
        );
    }
    // Every key is recorded as the store holds it, each provably the latest.
    for a in &addresses {
        let stored = store.get(a).await.unwrap().expect("published");
        let recorded = log.entries(a).await.unwrap();
        assert_eq!(recorded.len(), 1, "{a}: one version recorded");
        assert!(
            recorded[0].1.commits_to_key(&stored.key),
            "{a}: the directory commits to the stored key"
        );
    }
}

/// A store whose `get_many` answers every address with one other address's record (a store
/// answering out of order), and says it batches reads.
struct Misdirected {
    decoy: KeyRecord,
}

#[async_trait::async_trait]
impl crate::testing::StoreHooks for Misdirected {
    fn batches_reads(&self, _: &dyn KeyStore) -> bool {
        true
    }

    async fn get_many(
        &self,
        _: &dyn KeyStore,
        addresses: &[Address],
    ) -> crate::Result<Vec<Option<KeyRecord>>> {
        Ok(vec![Some(self.decoy.clone()); addresses.len()])
    }
}

/// Red team: a key store that answers the writer's batched read with another address's record
/// never gets that key recorded under the address asked: the publication fails temporarily
/// (the MTA retries), and the directory holds nothing for the address.
pub async fn a_record_of_another_address_is_never_recorded(
    store: Arc<dyn KeyStore>,
    dir: Arc<dyn DirectoryStore>,
) {
    const D: &str = "misdirected.example";
    let (decoy, alice) = (
        address(&format!("decoy@{D}")),
        address(&format!("alice@{D}")),
    );
    let decoy = match store.publish(test_key(&decoy, 61, 1)).await.unwrap() {
        PublishOutcome::Published(r) => r,
        other => panic!("the decoy's publication: {other:?}"),
    };
    let hooked = Arc::new(crate::testing::DelegatingStore::new(
        Arc::clone(&store),
        Misdirected { decoy },
    ));
    let log = Arc::new(DomainLog::open(dir, LogKeys::generate(D)).await.unwrap());
    let wrapped = TransparentStore::new(hooked, vec![Arc::clone(&log)]);
    let outcome = wrapped.publish(test_key(&alice, 61, 2)).await;
    assert!(
        matches!(&outcome, Err(e) if e.is_temporary()),
        "{}: a publication whose record the store answered for another address fails \
         temporarily: {outcome:?}",
        store.name()
    );
    assert!(
        log.entries(&alice).await.unwrap().is_empty(),
        "{}: nothing recorded for alice",
        store.name()
    );
}

/// [`one_address_in_store_order`], with the publications' key commits unsynced when
/// `unsynced` ([`TransparentStore::with_unsynced_publications`]: for a directory on the key
/// store's own PostgreSQL server, as kst-bin wires it).
pub async fn one_address_in_store_order_as(
    stores: [Arc<dyn KeyStore>; 2],
    dirs: [Arc<dyn DirectoryStore>; 2],
    unsynced: bool,
) {
    const D: &str = "order.example";
    let keys = LogKeys::generate(D);
    let [dir_a, dir_b] = dirs;
    let [store_a, store_b] = stores;
    let log_a = Arc::new(
        DomainLog::open(dir_a, LogKeys::parse(&keys.to_file()).unwrap())
            .await
            .unwrap(),
    );
    let log_b = Arc::new(DomainLog::open(dir_b, keys).await.unwrap());
    let wrap = |store: &Arc<dyn KeyStore>, log: &Arc<DomainLog>| {
        let wrapped = TransparentStore::new(Arc::clone(store), vec![Arc::clone(log)]);
        Arc::new(match unsynced {
            true => wrapped.with_unsynced_publications(),
            false => wrapped,
        })
    };
    let a = wrap(&store_a, &log_a);
    let b = wrap(&store_b, &log_b);
    let alice = address("alice@order.example");

    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..2 * ORDER_WRITERS {
        let store = if w % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        let alice = alice.clone();
        tasks.spawn(async move {
            let mut versions = Vec::new();
            for n in 0..ORDER_PUBLICATIONS {
                let key = test_key(&alice, 40 + w as u32, n);
                match store.publish(key).await {
                    Ok(PublishOutcome::Published(r)) => versions.push(r.version),
                    other => panic!("order: writer {w} publication {n}: {other:?}"),
                }
            }
            versions
        });
    }
    let mut confirmed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        confirmed.extend(joined.expect("order: a writer panicked"));
    }
    let total = 2 * ORDER_WRITERS * ORDER_PUBLICATIONS;
    assert_eq!(
        confirmed.len() as u64,
        total,
        "order: every publication confirmed"
    );

    let stored = store_a.history(&alice).await.unwrap();
    assert_eq!(stored.len() as u64, total, "order: the store's history");
    let history = log_a.entries(&alice).await.unwrap();
    assert_eq!(
        history.len() as u64,
        total,
        "order: every version the store accepted is recorded: {}",
        show_history(&history)
    );
    let mut last_version = 0;
    let mut last_epoch = 0;
    for (epoch, entry) in &history {
        assert!(
            entry.version > last_version && *epoch > last_epoch,
            "order: the directory's history is out of the store's order: {}",
            show_history(&history)
        );
        let record = stored
            .iter()
            .find(|r| r.version == entry.version)
            .unwrap_or_else(|| panic!("order: the store never held v{}", entry.version));
        assert_eq!(
            *entry,
            DirectoryEntry::for_record(record),
            "order: epoch {epoch} records v{} but not the store's key {}",
            entry.version,
            describe(record)
        );
        (last_version, last_epoch) = (entry.version, *epoch);
    }
    let current = store_b.get(&alice).await.unwrap().unwrap();
    assert_eq!(
        history.last().map(|(_, e)| e),
        Some(&DirectoryEntry::for_record(&current)),
        "order: the history ends at the store's current key {}: {}",
        describe(&current),
        show_history(&history)
    );
    // Both handles read the same history.
    assert_eq!(
        log_b.entries(&alice).await.unwrap(),
        history,
        "order: log b"
    );

    // A deletion: the deleted version + 1.
    assert!(a.delete(&alice).await.unwrap(), "order: the deletion");
    let (_, deleted) = log_b.entries(&alice).await.unwrap().pop().unwrap();
    assert_eq!(
        (deleted.state, deleted.version),
        (EntryState::Deleted, current.version + 1),
        "order: the deletion's entry"
    );
    // A publication after it: version 1 again, recorded after the deletion.
    let again = b.publish(test_key(&alice, 50, 1)).await.unwrap();
    assert_eq!(again.record().version, 1, "order: the store starts again");
    let (_, entry) = log_a.entries(&alice).await.unwrap().pop().unwrap();
    assert_eq!(
        entry,
        DirectoryEntry::for_record(again.record()),
        "order: republished"
    );

    // A restore of another key at version 1: the directory holds v1 already, so it records
    // a deletion (v2), then the restored key.
    let restored = test_key(&alice, 51, 1).into_record(1);
    a.restore(std::slice::from_ref(&restored)).await.unwrap();
    let tail: Vec<DirectoryEntry> = log_b
        .entries(&alice)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .take(2)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(
        tail,
        vec![
            DirectoryEntry::for_record(&restored),
            DirectoryEntry::deleted(2, tail.get(1).map_or(0, |e| e.changed_at)),
        ],
        "order: a restore over a newer directory entry"
    );

    // Behind the log's back, then `record_all`: recorded once.
    let bob = address("bob@order.example");
    let behind = store_b
        .publish(test_key(&bob, 52, 1))
        .await
        .unwrap()
        .record()
        .clone();
    assert!(
        log_a.entries(&bob).await.unwrap().is_empty(),
        "order: not yet"
    );
    let first = b.record_all(16).await.unwrap();
    assert_eq!((first.checked, first.recorded), (2, 1), "order: record_all");
    assert_eq!(
        log_a.entries(&bob).await.unwrap().pop().map(|(_, e)| e),
        Some(DirectoryEntry::for_record(&behind)),
        "order: record_all recorded bob"
    );
    let second = a.record_all(16).await.unwrap();
    assert_eq!(
        (second.checked, second.recorded),
        (2, 0),
        "order: record_all again"
    );
}

/// The record encoding (`transparency::records`, what every backend stores) gives back every
/// record of a directory after three epochs (root record, tree nodes with and without a
/// previous value, value states), and refuses truncated or longer bytes. Independent of any
/// backend: akd's in-memory database holds the directory.
pub async fn record_encoding_round_trips() {
    use akd::storage::StorageUtil;
    use akd::storage::memory::AsyncInMemoryDatabase;
    use akd::storage::types::DbRecord;

    use crate::transparency::{DirectoryEntry, KeyDirectory, VrfSecret, records};

    let db = AsyncInMemoryDatabase::new();
    let dir = KeyDirectory::open(db.clone(), VrfSecret::generate())
        .await
        .unwrap();
    for n in 1..=3u64 {
        let batch: Vec<_> = (0..5u64)
            .map(|i| {
                let a = address(&format!("u{i}@records.example"));
                let entry = DirectoryEntry::for_record(&record(&a, 3, i * 10 + n, n));
                (a, entry)
            })
            .collect();
        dir.publish(&batch).await.unwrap();
    }
    let all = db.batch_get_all_direct().await.unwrap();
    let count = |k: fn(&DbRecord) -> bool| all.iter().filter(|r| k(r)).count();
    assert_eq!(
        count(|r| matches!(r, DbRecord::Azks(_))),
        1,
        "records: one root"
    );
    assert!(
        count(|r| matches!(r, DbRecord::TreeNode(n) if n.previous_node.is_some())) > 0,
        "records: nodes with a previous value"
    );
    assert_eq!(
        count(|r| matches!(r, DbRecord::ValueState(_))),
        15,
        "records: value states"
    );
    for r in &all {
        let bytes = records::encode(r);
        assert_eq!(&records::decode(&bytes).unwrap(), r, "records: round trip");
        assert!(
            records::decode(&bytes[..bytes.len() - 1]).is_err(),
            "records: truncated"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(records::decode(&longer).is_err(), "records: trailing byte");
    }
    assert!(
        records::decode(b"KSR1\x09").is_err(),
        "records: unknown kind"
    );
    assert!(records::decode(b"nope").is_err(), "records: unknown layout");
}

/// The hooks of a directory store whose `hold_at`-th value-state read from now (1: the
/// next; 0: none) waits for `release` (telling `entered`) before it reads; `reads` counts them.
#[derive(Default)]
struct HeldValues {
    hold_at: std::sync::atomic::AtomicUsize,
    reads: std::sync::atomic::AtomicUsize,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl HeldValues {
    /// Counts a value-state read and holds it when it is the one.
    async fn read(&self) {
        use std::sync::atomic::Ordering;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let left = self
            .hold_at
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if left == 1 {
            self.entered.notify_one();
            self.release.notified().await;
        }
    }
}

#[async_trait::async_trait]
impl DirectoryHooks for HeldValues {
    async fn value_states(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        label: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
        self.read().await;
        inner.value_states(domain, label).await
    }
    async fn value_states_batch(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        labels: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
        self.read().await;
        inner.value_states_batch(domain, labels).await
    }
}

/// The hooks of a directory store whose next tree-node read, once armed, waits for `release`
/// (telling `entered`); with `tamper`, every non-root node it reads has its hash altered (a
/// store changed behind kst's back).
#[derive(Default)]
struct HeldNodes {
    armed: std::sync::atomic::AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    tamper: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl DirectoryHooks for HeldNodes {
    async fn nodes(
        &self,
        inner: &dyn DirectoryStore,
        domain: &str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, DirectoryStoreError> {
        use std::sync::atomic::Ordering;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        let blobs = inner.nodes(domain, keys).await?;
        if !self.tamper.load(Ordering::SeqCst) {
            return Ok(blobs);
        }
        use crate::transparency::records;
        use akd::storage::types::DbRecord;
        Ok(blobs
            .into_iter()
            .map(|blob| match records::decode(&blob) {
                Ok(DbRecord::TreeNode(mut node)) if node.label != akd::NodeLabel::root() => {
                    node.latest_node.hash.0[0] ^= 1;
                    if let Some(previous) = &mut node.previous_node {
                        previous.hash.0[0] ^= 1;
                    }
                    records::encode(&DbRecord::TreeNode(node))
                }
                _ => blob,
            })
            .collect())
    }
}

/// A look-up read across two commits of another process: the store keeps two generations
/// of a tree node, so a node another process rewrote twice after the reader read the root
/// record (epoch E) holds no version of E any more, and akd takes the newer generation as
/// E's without a word. Process B's look-up reads the root record at epoch 2, then its first
/// tree-node read (the root node, for E's root hash) waits while A commits epochs 3 and 4.
/// B must read again and answer on a consistent epoch: the answer verifies, and every head
/// stored names the root A committed for its epoch. Before, on fs, PostgreSQL and Redis
/// alike: B answered at epoch 2 with nodes of epoch 3 taken as epoch 2's, and the proof did
/// not verify ("Membership proof ... did not verify", or "Hash of plaintext value did not
/// match existence proof hash"); the same mixed read of the root node can give epoch 3's root
/// as epoch 2's, which B would sign and store as epoch 2's head when none is stored yet.
pub async fn an_answer_read_across_two_commits_is_read_again(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    use crate::transparency::{KeyDirectory, StoredDirectory};
    use std::sync::atomic::Ordering;
    const D: &str = "torn.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    // A: akd alone (no heads: B signs them on first read, as for epochs whose writer died
    // between its commit and its head).
    let writer = KeyDirectory::open(StoredDirectory::new(a, D), keys.vrf.clone())
        .await
        .expect("torn reads: open A's directory");
    let held = Arc::new(DelegatingDirectory::new(b, HeldNodes::default()));
    let log_b = Arc::new(
        DomainLog::open(
            Arc::clone(&held) as Arc<dyn DirectoryStore>,
            LogKeys::parse(&keys.to_file()).unwrap(),
        )
        .await
        .expect("torn reads: open B's log"),
    );
    let mut roots = BTreeMap::new();
    let mut publish = async |name: &str, n: u64| {
        let addr = address(&format!("{name}@{D}"));
        let rec = record(&addr, 6, n, 1);
        let (epoch, root) = writer
            .publish(&[(addr, DirectoryEntry::for_record(&rec))])
            .await
            .expect("torn reads: A publishes");
        roots.insert(epoch, root);
        rec
    };
    let alice = address(&format!("alice@{D}"));
    let rec = publish("alice", 0).await;
    let now = 50;
    log_b
        .answer(&alice, now)
        .await
        .expect("torn reads: B's first look-up")
        .verify(&head_key, &alice, Served::Key(&rec.key))
        .await
        .expect("torn reads: B's first look-up verifies");
    // Epoch 2: B's next look-up reads the tree afresh (another process committed).
    publish("bob", 1).await;
    held.armed.store(true, Ordering::SeqCst);
    let looking = tokio::spawn({
        let (log_b, alice) = (Arc::clone(&log_b), alice.clone());
        async move { log_b.answer(&alice, now).await }
    });
    tokio::time::timeout(std::time::Duration::from_secs(30), held.entered.notified())
        .await
        .expect("torn reads: B reads the tree");
    publish("carol", 2).await;
    publish("dave", 3).await;
    held.release.notify_one();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(60), looking)
        .await
        .expect("torn reads: B answers")
        .unwrap()
        .expect("torn reads: B's look-up across A's commits");
    let epoch = answer.head.head.epoch;
    answer
        .verify(&head_key, &alice, Served::Key(&rec.key))
        .await
        .unwrap_or_else(|e| panic!("torn reads: B's answer at epoch {epoch}: {e}"));
    assert_eq!(
        answer.head.head.root_hash, roots[&epoch],
        "torn reads: B's head of epoch {epoch} names another root than A committed"
    );
    assert!(
        log_b.torn_reads() >= 1,
        "torn reads: B's read of a node rewritten twice was refused and read again"
    );
    assert_eq!(
        log_b.unverified(),
        0,
        "torn reads: caught before any answer was built"
    );
    for head in log_b.stored_heads(0, 4).await.unwrap() {
        let e = head.head.epoch;
        if let Some(root) = roots.get(&e) {
            assert_eq!(
                &head.head.root_hash, root,
                "torn reads: the head stored for epoch {e} names another root than A \
                 committed (a fork)"
            );
        }
    }
}

/// Issue 18, audits (`/audit`, served to witnesses and auditors, and the witnesses' part of an
/// answer): an audit answer read across another process's commits. Its heads are stored heads
/// (each written once, insert-if-absent, never rewritten), and its proof is akd's, read from
/// the tree at the latest epoch akd read (every step of it from that one tree): a node the
/// other process rewrote once still holds its version of that epoch (its previous
/// generation), so a proof read across one commit is that epoch's proof, and verifies; a node
/// rewritten twice holds none, and its read is refused as torn ([`StoredDirectory`]'s guard).
/// B's audit reads the tree afresh, its first tree-node read waits while A commits once,
/// then (the next audit) twice: both answers must be served and verify as a witness verifies
/// them, with nothing refused by the self-check. Before, the read across two commits failed
/// the request (the torn read's conflict, a 503 for the witness) instead of being read again.
///
/// [`StoredDirectory`]: crate::transparency::StoredDirectory
pub async fn an_audit_read_across_commits_is_served_whole(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    use std::sync::atomic::Ordering;
    const D: &str = "torn-audit.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let log_a = DomainLog::open(a, LogKeys::parse(&keys.to_file()).unwrap())
        .await
        .expect("torn audit: open A's log");
    let held = Arc::new(DelegatingDirectory::new(b, HeldNodes::default()));
    let log_b = Arc::new(
        DomainLog::open(Arc::clone(&held) as Arc<dyn DirectoryStore>, keys)
            .await
            .expect("torn audit: open B's log"),
    );
    let mut n = 0;
    let mut publish = async || {
        n += 1;
        let addr = address(&format!("p{n}@{D}"));
        match log_a.sync(&addr, Some(&record(&addr, 44, n, 1)), 90).await {
            Ok(Synced::Recorded { epoch, .. }) => epoch,
            other => panic!("torn audit: A records: {other:?}"),
        }
    };
    for _ in 0..3 {
        publish().await;
    }
    let verified = async |what: &str, answer: crate::transparency::witness::AuditAnswer| {
        let last = answer
            .verify(&head_key)
            .await
            .unwrap_or_else(|e| panic!("torn audit: {what}: a witness refuses it: {e}"));
        assert_eq!(
            (answer.heads[0].head.epoch, last.head.epoch),
            (1, 3),
            "torn audit: {what}: the range asked for"
        );
    };
    verified(
        "before any race",
        log_b.audit_answer(1, 3).await.expect("torn audit: warm"),
    )
    .await;
    for commits in [1, 2] {
        // Another process committed: B's next audit reads the tree afresh.
        publish().await;
        held.armed.store(true, Ordering::SeqCst);
        let auditing = tokio::spawn({
            let log_b = Arc::clone(&log_b);
            async move { log_b.audit_answer(1, 3).await }
        });
        tokio::time::timeout(std::time::Duration::from_secs(30), held.entered.notified())
            .await
            .expect("torn audit: B reads the tree");
        for _ in 0..commits {
            publish().await;
        }
        held.release.notify_one();
        let what = format!("read across {commits} commit(s)");
        let answer = tokio::time::timeout(std::time::Duration::from_secs(60), auditing)
            .await
            .expect("torn audit: B answers")
            .unwrap()
            .unwrap_or_else(|e| panic!("torn audit: {what}: not served: {e}"));
        verified(&what, answer).await;
    }
    assert!(
        log_b.torn_reads() >= 1,
        "torn audit: B's read of a node rewritten twice was refused and read again"
    );
    assert_eq!(
        log_b.unverified(),
        0,
        "torn audit: every answer built verified (the guard, not the self-check, caught it)"
    );
}

/// Review of issue 18 (F6): a history read across another process's deletion. A deletion's
/// epoch overwrites the address's earlier values in place ("Deletion" in
/// docs/TRANSPARENCY.md), which the torn-read guard does not see (no tree node is read
/// across two commits): B's history read the root at epoch E, its last value-state read
/// waited while A committed the deletion (E+1), and B proved E's newest version withdrawn
/// with no deletion after it, which the owner's monitor reports as a key withdrawn behind
/// kst's back. B must read again and answer on the deletion's epoch. The same for a page
/// of older versions (its newest version's value read after the deletion: the page showed
/// version 1 withdrawn against a head whose newest version held a key).
pub async fn a_history_read_across_a_deletion_is_read_again(
    a: Arc<dyn DirectoryStore>,
    b: Arc<dyn DirectoryStore>,
) {
    use crate::transparency::history::{HistoryAnswer, HistoryPage};
    use std::sync::atomic::Ordering;
    const D: &str = "withdrawing.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let log_a = DomainLog::open(a, LogKeys::parse(&keys.to_file()).unwrap())
        .await
        .expect("history across a deletion: open A's log");
    let held = Arc::new(DelegatingDirectory::new(b, HeldValues::default()));
    let log_b = Arc::new(
        DomainLog::open(Arc::clone(&held) as Arc<dyn DirectoryStore>, keys)
            .await
            .expect("history across a deletion: open B's log"),
    );
    let (alice, bob) = (
        address("alice@withdrawing.example"),
        address("bob@withdrawing.example"),
    );
    for (addr, n) in [(&alice, 0), (&bob, 2)] {
        for v in 1..=2 {
            log_a
                .sync(addr, Some(&record(addr, 43, n + v, v)), 70)
                .await
                .expect("history across a deletion: record");
        }
    }
    let now = 71;
    // How many value-state reads an answer takes (once warm); the last one waits while A
    // deletes the address, then the answer of B.
    let race = async |address: &Address, before: Option<u64>| {
        let ask = {
            let log_b = Arc::clone(&log_b);
            let address = address.clone();
            move || {
                let (log_b, address) = (Arc::clone(&log_b), address.clone());
                // The head and the proof, of a history or of a page.
                async move {
                    match before {
                        None => log_b
                            .history(&address, now)
                            .await
                            .map(|h| h.map(|h| (h.head, h.proof))),
                        Some(before) => log_b
                            .history_page(&address, before, now)
                            .await
                            .map(|p| p.map(|p| (p.page.head, p.page.proof))),
                    }
                }
            }
        };
        ask().await.expect("history across a deletion: warm");
        let before_reads = held.reads.load(Ordering::SeqCst);
        ask().await.expect("history across a deletion: count");
        let reads = held.reads.load(Ordering::SeqCst) - before_reads;
        assert!(
            reads > 0,
            "history across a deletion: a history reads value states"
        );
        held.hold_at.store(reads, Ordering::SeqCst);
        let asking = tokio::spawn(ask());
        tokio::time::timeout(std::time::Duration::from_secs(30), held.entered.notified())
            .await
            .expect("history across a deletion: B reads the values");
        let deletion = match log_a.sync(address, None, 72).await {
            Ok(Synced::Recorded { epoch, .. }) => epoch,
            other => panic!("history across a deletion: A's deletion: {other:?}"),
        };
        held.release.notify_one();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(60), asking)
            .await
            .expect("history across a deletion: B answers")
            .unwrap()
            .expect("history across a deletion: B's answer")
            .expect("history across a deletion: the address has a history");
        (answer, deletion)
    };
    let ((head, proof), deletion) = race(&alice, None).await;
    let history = HistoryAnswer { head, proof };
    let versions = history
        .verify(&head_key, &alice)
        .unwrap_or_else(|e| panic!("history across a deletion: alice's history: {e}"));
    let shown: Vec<(u64, Option<EntryState>)> = versions
        .iter()
        .map(|v| (v.akd_version, v.entry.as_ref().map(|e| e.state)))
        .collect();
    assert_eq!(
        (history.head.head.epoch, shown),
        (
            deletion,
            vec![(3, Some(EntryState::Deleted)), (2, None), (1, None)]
        ),
        "history across a deletion: B's history must show the deletion after the withdrawn \
         versions (epoch {} is the one before it: a value withdrawn with no deletion after \
         it)",
        deletion - 1
    );
    let ((head, proof), deletion) = race(&bob, Some(2)).await;
    let page = HistoryPage {
        head,
        before: 2,
        proof,
    };
    let versions = page
        .verify(&head_key, &bob, 2, u64::MAX)
        .await
        .unwrap_or_else(|e| panic!("history across a deletion: bob's page: {e}"));
    assert_eq!(
        (page.head.head.epoch, versions.len()),
        (deletion, 1),
        "history across a deletion: bob's page, showing version 1 withdrawn, must be against \
         the deletion's head, not the one before it (whose newest version holds a key)"
    );
    assert!(
        versions[0].entry.is_none(),
        "history across a deletion: bob's v1 is withdrawn"
    );
}

/// A store altered behind kst's back (every tree node's hash but the root's changed, as
/// another process B reads them): a look-up's proof no longer verifies against its head, and
/// B does not serve it:
/// it builds the answer again from fresh reads a few times, then fails temporarily
/// ([`TransparencyError::Directory`], naming the check). Once the store reads true again,
/// the answers verify.
///
/// [`TransparencyError::Directory`]: crate::transparency::TransparencyError::Directory
pub async fn an_answer_that_does_not_verify_is_not_served(a: Arc<dyn DirectoryStore>) {
    use crate::transparency::TransparencyError;
    use std::sync::atomic::Ordering;
    const D: &str = "altered.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    // A writes; B, another process on the same store, reads through the altered calls (its
    // node cache holds nothing it did not read there).
    let log_a = DomainLog::open(Arc::clone(&a), LogKeys::parse(&keys.to_file()).unwrap())
        .await
        .expect("self-check: open A's log");
    let held = Arc::new(DelegatingDirectory::new(a, HeldNodes::default()));
    let log = DomainLog::open(Arc::clone(&held) as Arc<dyn DirectoryStore>, keys)
        .await
        .expect("self-check: open B's log");
    let mut records = Vec::new();
    for (n, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let addr = address(&format!("{name}@{D}"));
        let rec = record(&addr, 7, n as u64, 1);
        log_a
            .sync(&addr, Some(&rec), 60)
            .await
            .expect("self-check: record");
        records.push((addr, rec));
    }
    // A second version of alice: her history has a page below version 2.
    let (alice, _) = &records[0];
    let rec = record(alice, 7, 9, 2);
    log_a
        .sync(alice, Some(&rec), 60)
        .await
        .expect("self-check: record");
    let attempts = crate::transparency::self_check::ATTEMPTS;
    let not_served = |what: &str, result: Result<(), TransparencyError>, n: u64| {
        match result {
            Err(TransparencyError::Directory(e)) => assert!(
                e.contains("did not verify against its own head"),
                "self-check: {what}: {e}"
            ),
            other => panic!("self-check: an altered store's {what} was served: {other:?}"),
        }
        assert_eq!(
            log.unverified(),
            n * attempts,
            "self-check: the {what} was built again from fresh reads, a bounded number of times"
        );
    };
    held.tamper.store(true, Ordering::SeqCst);
    not_served("look-up", log.answer(alice, 61).await.map(|_| ()), 1);
    // Review of issue 18 (F7): histories and their pages are checked too (before, an altered
    // store's history was served, and the owner's monitor called it an attack).
    not_served("history", log.history(alice, 61).await.map(|_| ()), 2);
    not_served("page", log.history_page(alice, 2, 61).await.map(|_| ()), 3);
    held.tamper.store(false, Ordering::SeqCst);
    log.answer(alice, 62)
        .await
        .expect("self-check: the store reads true again")
        .verify(&head_key, alice, Served::Key(&rec.key))
        .await
        .expect("self-check: the answer verifies again");
    log.history(alice, 62)
        .await
        .expect("self-check: the history, the store read true again")
        .expect("self-check: alice has a history")
        .verify(&head_key, alice)
        .expect("self-check: the history verifies again");
    let page = log
        .history_page(alice, 2, 62)
        .await
        .expect("self-check: the page, the store read true again")
        .expect("self-check: alice has a page below version 2")
        .page;
    page.verify(&head_key, alice, 2, u64::MAX)
        .await
        .expect("self-check: the page verifies again");
    assert_eq!(
        log.unverified(),
        3 * attempts,
        "self-check: nothing more refused"
    );
}

/// Review of issue 18 (F7): the append-only part of an answer (`?since=`, `KST-Log-Since`)
/// is checked before it is served, as a client that remembers the stored head of its first
/// epoch checks it. A store whose head of epoch 1 names another root than the directory's
/// (restored under newer heads, written behind kst's back: a head of an older epoch is
/// checked against no root when it is read) made every answer from epoch 1 carry a proof
/// that the client remembering that head refuses as an attack, and the answer was served:
/// now it is built again, a bounded number of times, then a temporary failure; the whole
/// proof and a step of a catch-up alike; so is an audit answer from epoch 1 (`/audit`, checked
/// as a witness checks it: before, it was served, and every witness or auditor handed it
/// reported a fork). From an epoch whose head is the directory's the answers are served, and
/// verify.
pub async fn an_append_only_part_that_does_not_verify_is_not_served(a: Arc<dyn DirectoryStore>) {
    use crate::transparency::TransparencyError;
    use crate::transparency::answer::{HTTP_STEP_BUDGET, StepBudget, head_text};
    const D: &str = "since.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let mut roots = BTreeMap::new();
    publish_without_heads(&a, &keys, &["s1", "s2", "s3", "s4"], &mut roots).await;
    // The heads: epoch 1's with another root, the others the directory's.
    for (&epoch, &root) in &roots {
        let head = keys
            .head
            .sign(Head {
                domain: D.into(),
                epoch,
                root_hash: if epoch == 1 { [3; 32] } else { root },
                vrf_public_key: keys.vrf.public_key().unwrap(),
                signed_at: 80,
            })
            .unwrap();
        a.insert_head(D, epoch, head_text(&head).unwrap().as_bytes())
            .await
            .unwrap();
    }
    let log = DomainLog::open(Arc::clone(&a), keys).await.unwrap();
    let s1 = address("s1@since.example");
    let step = StepBudget {
        epochs: 1,
        ..HTTP_STEP_BUDGET
    };
    let attempts = crate::transparency::self_check::ATTEMPTS;
    for (n, (what, steps)) in [("the whole proof", None), ("a step", Some(step))]
        .into_iter()
        .enumerate()
    {
        match log.answer_stepped(&s1, Some(1), steps, 81).await {
            Err(TransparencyError::Directory(e)) => assert!(
                e.contains("did not verify against its own head"),
                "since: {what}: {e}"
            ),
            other => panic!(
                "since: {what} from epoch 1 was served, which a client remembering the stored \
                 head of epoch 1 refuses: {other:?}"
            ),
        }
        assert_eq!(
            log.unverified(),
            (n as u64 + 1) * attempts,
            "since: {what}: built again a bounded number of times"
        );
    }
    let remembered = log
        .head_at(2, 82)
        .await
        .unwrap()
        .expect("since: the head of epoch 2");
    let whole = log
        .answer_since(&s1, Some(2), 82)
        .await
        .expect("since: from epoch 2");
    whole
        .verify_extends(&remembered.head)
        .await
        .expect("since: the whole proof from epoch 2 verifies");
    let stepped = log
        .answer_stepped(&s1, Some(2), Some(step), 82)
        .await
        .expect("since: a step from epoch 2");
    let (to, _) = stepped
        .verify_step(&head_key, &remembered.head)
        .await
        .expect("since: the step from epoch 2 verifies")
        .expect("since: a step from epoch 2");
    assert_eq!(to.head.epoch, 3, "since: one epoch a step");
    assert_eq!(
        log.unverified(),
        2 * attempts,
        "since: nothing more refused"
    );
    // Audits (`/audit`, the witnesses' part of an answer) are checked as a witness checks
    // them: before, the audit from epoch 1 was served, and every witness or auditor handed it
    // reported a fork (`kst log audit`, exit 5).
    match log.audit_answer(1, 3).await {
        Err(TransparencyError::Directory(e)) => assert!(
            e.contains("did not verify against its own head"),
            "since: the audit from epoch 1: {e}"
        ),
        Err(e) => panic!("since: the audit from epoch 1: {e}"),
        Ok(_) => {
            panic!("since: the audit from epoch 1 was served, which a witness refuses as a fork")
        }
    }
    assert_eq!(
        log.unverified(),
        3 * attempts,
        "since: the audit was built again a bounded number of times"
    );
    let audit = log
        .audit_answer(2, 4)
        .await
        .expect("since: the audit from epoch 2");
    audit
        .verify(&head_key)
        .await
        .expect("since: the audit from epoch 2 verifies");
    assert_eq!(
        log.unverified(),
        3 * attempts,
        "since: nothing more refused"
    );
}

/// Issue 18 (I2): the append-only part of an answer (`?since=`, `KST-Log-Since`) is checked
/// against the stored head of its first epoch, and an honest store can lack that head (a
/// store that lost heads, an epoch whose writer died between its commit and its head:
/// "Heads signed late" in docs/TRANSPARENCY.md) while a client remembers it (it was served
/// before it was lost). Such an answer is checked from the root its proof starts at (every
/// step leading to the next, the last to the head it ends at) and served, whole or as a
/// step, and the client that remembers the head the log once signed for that epoch accepts
/// it; no head is signed late for it on the way (before, the check signed one first: an
/// append-only proof of its own over the epoch, built and verified for an anonymous request,
/// and refused outright when that proof was over the bound of heads signed late). A stored
/// head with another root is still refused ([`an_append_only_part_that_does_not_verify_is_not_served`]).
pub async fn an_answer_from_an_epoch_without_a_head_is_served(a: Arc<dyn DirectoryStore>) {
    use crate::transparency::answer::{HTTP_STEP_BUDGET, StepBudget, head_text};
    const D: &str = "headless.example";
    let keys = LogKeys::generate(D);
    let head_key = keys.head.public_key();
    let mut roots = BTreeMap::new();
    publish_without_heads(&a, &keys, &["h1", "h2", "h3", "h4"], &mut roots).await;
    // The head of epoch 2 the log signed (and a client remembers), lost from the store: the
    // others stored.
    let head = |epoch: u64| {
        keys.head
            .sign(Head {
                domain: D.into(),
                epoch,
                root_hash: roots[&epoch],
                vrf_public_key: keys.vrf.public_key().unwrap(),
                signed_at: 85,
            })
            .unwrap()
    };
    for epoch in [1, 3, 4] {
        a.insert_head(D, epoch, head_text(&head(epoch)).unwrap().as_bytes())
            .await
            .unwrap();
    }
    let remembered = head(2);
    let log = DomainLog::open(Arc::clone(&a), LogKeys::parse(&keys.to_file()).unwrap())
        .await
        .unwrap();
    let h1 = address("h1@headless.example");
    let whole = log
        .answer_since(&h1, Some(2), 86)
        .await
        .expect("headless: the whole proof from epoch 2 is served");
    whole
        .verify_extends(&remembered.head)
        .await
        .expect("headless: the client remembering epoch 2's head accepts the whole proof");
    let step = StepBudget {
        epochs: 1,
        ..HTTP_STEP_BUDGET
    };
    let stepped = log
        .answer_stepped(&h1, Some(2), Some(step), 86)
        .await
        .expect("headless: a step from epoch 2 is served");
    let (to, _) = stepped
        .verify_step(&head_key, &remembered.head)
        .await
        .expect("headless: the client remembering epoch 2's head accepts the step")
        .expect("headless: a step from epoch 2");
    assert_eq!(to.head.epoch, 3, "headless: one epoch a step");
    assert_eq!(log.unverified(), 0, "headless: nothing refused");
    assert_eq!(
        stored_epochs(&log, 1, 4).await,
        vec![1, 3, 4],
        "headless: served without signing a head late for epoch 2"
    );
}
