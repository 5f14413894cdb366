//! The `KeyStore` conformance suite: the contract of [`KeyStore`] as executable checks.
//!
//! Every backend crate runs [`run_all`] on a fresh, empty store (a temporary directory, a fresh
//! PostgreSQL database, a fresh Redis key prefix), then [`concurrent_publishers`] again with
//! genuinely separate store instances (separate pools or connections on the same namespace),
//! standing in for separate KST processes. Each property is also a `pub async fn` of its own, so
//! a backend can run one in isolation while hunting a failure.
//!
//! Every function panics with a message naming the property and the address when the store
//! breaks the contract; it is test code. The properties use addresses of their own (under
//! `conformance.example`), so they do not interfere with each other.
//!
//! Test keys are arbitrary bytes (the store does not parse OpenPGP): [`test_key`] derives the key
//! bytes, fingerprint, publication id and timestamp from a `(series, n)` pair, and
//! [`assert_test_record`] checks that a record read back still belongs together.
//!
//! Use a multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`) so that the
//! concurrent properties really run in parallel; on a current-thread runtime they only
//! interleave at `.await` points.
//!
//! ```ignore
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn conformance() {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = Arc::new(FsStore::open(dir.path()).await.unwrap());
//!     kst_core::conformance::run_all(store).await;
//! }
//! ```
//!
//! The walk in the store's own order ([`KeyStore::list_page`]) is in [`walk`] (part of
//! [`run_all`]); the walk and import of remembered deleted publications in [`deleted`] (part
//! of [`run_all`]). The look-ups by fingerprint, key ID and WKD hash are in [`lookup`] (part of [`run_all`]);
//! [`KeyStore::get_many`] (many addresses in one round trip) in [`batch`] (part of [`run_all`]); the
//! compare-and-set of `publish` and the service's read-merge-write on it are in [`cas`] (part of
//! [`run_all`]; backends run [`cas::compare_and_set_race`] and [`cas::merged_publications`]
//! again with separate instances).
//! The [`RateLimiter`](crate::RateLimiter) has a suite of its own: [`limiter`].

pub mod batch;
pub mod cas;
pub mod deleted;
#[cfg(feature = "transparency")]
pub mod directory;
pub mod limiter;
pub mod lookup;
pub mod reminders;
pub mod revocation;
pub mod walk;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Barrier;

use crate::address::{Address, AddressPolicy};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::store::{KeyRecord, KeyStore, NewKey, PublishOutcome, RECORD_FORMAT};

/// Length of the keys [`test_key`] makes (small; [`atomic_publish`] uses [`BIG_KEY_LEN`]).
pub const SMALL_KEY_LEN: usize = 96;

/// Length of the keys in [`atomic_publish`]: big enough that a backend writing in pieces would
/// show a torn record.
pub const BIG_KEY_LEN: usize = 200 * 1024;

/// Versions [`atomic_publish`] writes while readers watch.
pub const ATOMIC_VERSIONS: u64 = 20;

/// Distinct publications per address in [`concurrent_publishers`] (each is sent twice).
pub const RACE_PUBLICATIONS: u64 = 12;

/// Addresses [`concurrent_publishers`] publishes to.
pub const RACE_ADDRESSES: usize = 3;

/// Domain of every address the suite uses.
pub const DOMAIN: &str = "conformance.example";

// Series numbers: each property derives its keys from series of its own.
const S_BASICS: u32 = 1;
const S_IDEMPOTENT: u32 = 2;
const S_DELETE: u32 = 3;
const S_LIST: u32 = 4;
const S_RESTORE: u32 = 5;
const S_RESTORED: u32 = 6;
const S_INVALID: u32 = 7;
const S_ATOMIC: u32 = 8;
const S_RACE: u32 = 9;
const S_OTHER: u32 = 10;
const S_RACE_DELETE: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

/// `input` normalized by the default [`AddressPolicy`] with non-ASCII local parts allowed;
/// panics when it is not an address.
pub fn address(input: &str) -> Address {
    AddressPolicy {
        unicode_local_parts: true,
        ..AddressPolicy::default()
    }
    .normalize(input)
    .unwrap_or_else(|e| panic!("conformance: {input:?} is not a valid address: {e}"))
}

/// Publication id of key `n` of `series`: 32 hex digits.
pub fn publication_id(series: u32, n: u64) -> String {
    format!("{series:08x}{n:024x}")
}

/// Fingerprint of key `n` of `series`: 40 uppercase hex digits (fake, not a real fingerprint).
pub fn fingerprint(series: u32, n: u64) -> Fingerprint {
    Fingerprint::parse(&format!("{series:08X}{n:032X}")).expect("40 hex digits")
}

/// Key bytes of key `n` of `series`, `len` bytes long (at least a short header): a header naming
/// `series` and `n`, then pseudo-random bytes seeded by both, so keys of different `(series, n)`
/// differ everywhere and a record mixing two keys is detectable.
pub fn key_bytes(series: u32, n: u64, len: usize) -> Vec<u8> {
    let mut out = format!("kst-conformance series {series} key {n}\n").into_bytes();
    let mut state = (u64::from(series) << 40) ^ n ^ 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&z.to_le_bytes()[..take]);
    }
    out
}

/// Test key `n` of `series` for `address`, [`SMALL_KEY_LEN`] bytes long: key bytes,
/// fingerprint, publication id and timestamp all derive from `(series, n)`.
pub fn test_key(address: &Address, series: u32, n: u64) -> NewKey {
    test_key_sized(address, series, n, SMALL_KEY_LEN)
}

/// [`test_key`] with key bytes of length `len`.
pub fn test_key_sized(address: &Address, series: u32, n: u64, len: usize) -> NewKey {
    NewKey {
        address: address.clone(),
        key: key_bytes(series, n, len),
        fingerprint: fingerprint(series, n),
        publication_id: publication_id(series, n),
        published_at: 1_700_000_000 + n,
        revoked: false,
        expected: crate::store::Expected::Any,
    }
}

/// The `(series, n)` a record made from [`test_key`] claims by its publication id.
pub fn parse_publication_id(id: &str) -> Option<(u32, u64)> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let series = u32::from_str_radix(&id[..8], 16).ok()?;
    let n = u64::try_from(u128::from_str_radix(&id[8..], 16).ok()?).ok()?;
    Some((series, n))
}

/// Panics unless `r` is exactly what [`test_key_sized`] makes for the `(series, n)` its
/// publication id names (any key length), i.e. key, fingerprint, publication id and timestamp
/// belong together. Returns that `(series, n)`.
pub fn assert_test_record(what: &str, r: &KeyRecord) -> (u32, u64) {
    let Some((series, n)) = parse_publication_id(&r.publication_id) else {
        panic!(
            "{what}: record {} v{} has publication id {:?}, which no test key has",
            r.address, r.version, r.publication_id
        );
    };
    let ok = r.key == key_bytes(series, n, r.key.len())
        && r.fingerprint == fingerprint(series, n)
        && r.published_at == 1_700_000_000 + n
        && r.format == RECORD_FORMAT;
    assert!(
        ok,
        "{what}: record {} v{} is torn: its fields do not belong together (publication id \
         {:?} names key {n} of series {series}; fingerprint {:?}, published_at {}, format {}, \
         key {} bytes starting {:?})",
        r.address,
        r.version,
        r.publication_id,
        r.fingerprint,
        r.published_at,
        r.format,
        r.key.len(),
        String::from_utf8_lossy(&r.key[..r.key.len().min(48)]),
    );
    (series, n)
}

// ---------------------------------------------------------------------------------------------
// Readable failure messages (a record's Debug prints every key byte)
// ---------------------------------------------------------------------------------------------

/// One line describing `r`, with the key abbreviated.
pub fn describe(r: &KeyRecord) -> String {
    let head = &r.key[..r.key.len().min(40)];
    format!(
        "{} v{} (publication {}, fingerprint {}, published_at {}, revoked {}, format {}, key of \
         {} bytes {:?}{})",
        r.address,
        r.version,
        r.publication_id,
        r.fingerprint,
        r.published_at,
        r.revoked,
        r.format,
        r.key.len(),
        String::from_utf8_lossy(head),
        if r.key.len() > head.len() { "..." } else { "" },
    )
}

fn describe_all(rs: &[KeyRecord]) -> String {
    if rs.is_empty() {
        return "[] (nothing)".into();
    }
    rs.iter()
        .map(|r| format!("\n    {}", describe(r)))
        .collect()
}

fn describe_opt(r: Option<&KeyRecord>) -> String {
    r.map_or_else(|| "None".into(), describe)
}

fn describe_outcome(o: &PublishOutcome) -> String {
    match o {
        PublishOutcome::Published(r) => format!("Published({})", describe(r)),
        PublishOutcome::Unchanged(r) => format!("Unchanged({})", describe(r)),
    }
}

fn same_record(what: &str, ctx: &str, got: Option<&KeyRecord>, want: Option<&KeyRecord>) {
    assert!(
        got == want,
        "{what}: {ctx}:\n  got:  {}\n  want: {}",
        describe_opt(got),
        describe_opt(want)
    );
}

fn same_history(what: &str, ctx: &str, got: &[KeyRecord], want: &[KeyRecord]) {
    assert!(
        got == want,
        "{what}: {ctx}:\n  got: {}\n  want: {}",
        describe_all(got),
        describe_all(want)
    );
}

fn same_outcome(what: &str, ctx: &str, got: &PublishOutcome, want: &PublishOutcome) {
    assert!(
        got == want,
        "{what}: {ctx}:\n  got:  {}\n  want: {}",
        describe_outcome(got),
        describe_outcome(want)
    );
}

// ---------------------------------------------------------------------------------------------
// Store calls that panic with context
// ---------------------------------------------------------------------------------------------

async fn publish(what: &str, store: &dyn KeyStore, key: NewKey) -> PublishOutcome {
    let (a, id) = (key.address.clone(), key.publication_id.clone());
    store
        .publish(key)
        .await
        .unwrap_or_else(|e| panic!("{what}: publish {a} (publication {id}) failed: {e}"))
}

/// Publishes `key`, whose publication id was in a history deleted since, and panics unless the
/// store refuses it with [`Error::DeletedSince`] naming its address and id.
async fn publish_deleted_since(what: &str, store: &dyn KeyStore, key: NewKey, ctx: &str) {
    let (a, id) = (key.address.clone(), key.publication_id.clone());
    match store.publish(key).await {
        Err(Error::DeletedSince {
            address,
            publication_id,
        }) => {
            assert_eq!(
                (&address, &publication_id),
                (&a, &id),
                "{what}: {ctx}: DeletedSince names another publication"
            );
        }
        Err(e) => panic!(
            "{what}: {ctx}: publication {id} of {a} was in the deleted history, so publish must \
             return Error::DeletedSince, not fail with: {e}"
        ),
        Ok(o) => panic!(
            "{what}: {ctx}: publication {id} of {a} was in the deleted history, yet publish \
             answered {} (deletion must win over a redelivery)",
            describe_outcome(&o)
        ),
    }
}

/// A fresh address `<local>-<run>@`[`DOMAIN`] for a property that may run more than once on
/// one store: a store remembers the publication ids of the histories it deleted (and refuses
/// them again), so a second run must not publish the first run's keys to the same address.
fn run_address(local: &str) -> Address {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    address(&format!("{local}-{run}@{DOMAIN}"))
}

async fn publish_new(what: &str, store: &dyn KeyStore, key: NewKey, version: u64) -> KeyRecord {
    let expected = key.clone().into_record(version);
    match publish(what, store, key).await {
        PublishOutcome::Published(r) => {
            same_record(
                what,
                &format!("publish must return the new record, at version {version}"),
                Some(&r),
                Some(&expected),
            );
            r
        }
        PublishOutcome::Unchanged(r) => panic!(
            "{what}: expected a new version {version} of {}, got Unchanged({})",
            expected.address,
            describe(&r)
        ),
    }
}

async fn get(what: &str, store: &dyn KeyStore, a: &Address) -> Option<KeyRecord> {
    store
        .get(a)
        .await
        .unwrap_or_else(|e| panic!("{what}: get {a} failed: {e}"))
}

async fn history(what: &str, store: &dyn KeyStore, a: &Address) -> Vec<KeyRecord> {
    store
        .history(a)
        .await
        .unwrap_or_else(|e| panic!("{what}: history {a} failed: {e}"))
}

async fn delete(what: &str, store: &dyn KeyStore, a: &Address) -> bool {
    store
        .delete(a)
        .await
        .unwrap_or_else(|e| panic!("{what}: delete {a} failed: {e}"))
}

async fn list(
    what: &str,
    store: &dyn KeyStore,
    after: Option<&Address>,
    limit: usize,
) -> Vec<Address> {
    let page = store
        .list(after, limit)
        .await
        .unwrap_or_else(|e| panic!("{what}: list after {after:?} limit {limit} failed: {e}"));
    assert!(
        page.len() <= limit,
        "{what}: list after {after:?} limit {limit} returned {} addresses",
        page.len()
    );
    assert!(
        page.windows(2).all(|w| w[0] < w[1]),
        "{what}: list after {after:?} limit {limit} is not strictly ascending: {page:?}"
    );
    if let (Some(after), Some(first)) = (after, page.first()) {
        assert!(
            first > after,
            "{what}: list after {after} returned {first}, which is not after it"
        );
    }
    page
}

/// Every listed address, fetched in pages of `page` (checks that the pages join up).
async fn list_all(what: &str, store: &dyn KeyStore, page: usize) -> Vec<Address> {
    let mut all: Vec<Address> = Vec::new();
    loop {
        let next = list(what, store, all.last(), page).await;
        let done = next.len() < page;
        all.extend(next);
        if done {
            return all;
        }
    }
}

async fn restore(what: &str, store: &dyn KeyStore, records: &[KeyRecord]) {
    store
        .restore(records)
        .await
        .unwrap_or_else(|e| panic!("{what}: restore of {} failed: {e}", describe_all(records)));
}

/// Panics unless the current key and the history of `a` are exactly `expected` (oldest first).
async fn assert_stored(what: &str, store: &dyn KeyStore, a: &Address, expected: &[KeyRecord]) {
    same_history(
        what,
        &format!("history of {a}"),
        &history(what, store, a).await,
        expected,
    );
    same_record(
        what,
        &format!("the current key of {a} must be the last entry of its history"),
        get(what, store, a).await.as_ref(),
        expected.last(),
    );
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

/// Runs every property in sequence on `store`, which must be empty at the start, then
/// [`check_consistency`].
///
/// [`concurrent_publishers`] and [`publish_races_delete_and_restore`] run here with two handles
/// of the one store; backends run them (and [`atomic_publish_across`]) again with separate
/// instances.
pub async fn run_all(store: Arc<dyn KeyStore>) {
    let s: &dyn KeyStore = &*store;
    let present = list("run_all", s, None, 1).await;
    assert!(
        present.is_empty(),
        "run_all needs an empty store (a fresh directory, database or key prefix), but it lists \
         {present:?}"
    );
    check_succeeds(s).await;
    unknown_address(s).await;
    // First, while the store holds its addresses only (it deletes them when done).
    walk::list_page_walks_every_address_once(s).await;
    publish_get_history(s).await;
    idempotent_publish(s).await;
    delete_restarts_numbering(s).await;
    list_addresses(s).await;
    restore_replaces_history(s).await;
    restore_rejects_invalid(s).await;
    lookup::run_all(s).await;
    batch::get_many_answers_like_get(s).await;
    atomic_publish(store.clone()).await;
    concurrent_publishers(vec![store.clone(), store.clone()]).await;
    publish_races_delete_and_restore(store.clone(), store.clone()).await;
    revocation::revocation_survives_republication_and_deletion(s).await;
    revocation::revocation_race(vec![store.clone(), store.clone()]).await;
    revocation::subkey_revocation_survives_replacement_and_deletion(s).await;
    revocation::user_id_revocation_survives_replacement_and_deletion(s).await;
    cas::compare_and_set(s).await;
    cas::compare_and_set_race(vec![store.clone(), store.clone()]).await;
    cas::merged_publications(vec![store.clone(), store.clone()]).await;
    reminders::reminder_claims(vec![store.clone(), store.clone()]).await;
    reminders::reminders_across_a_pool(vec![store.clone(), store.clone(), store.clone()]).await;
    deleted::deleted_publications_walk_and_remember(s).await;
    check_succeeds(s).await;
    let n = check_consistency(s).await;
    assert!(
        n > 0,
        "run_all: the store lists no address after the whole suite published to many"
    );
}

/// The properties of a pool, on `stores`: at least four separate instances of one store
/// (a pool's processes: their own pools, connections or handles), on which [`run_all`] ran
/// first: revoked and unrevoked publications of one key racing on two instances,
/// compare-and-set writers and the service's read-merge-write across all, expiry reminder
/// claims, reminders sent by a pool of three with a test clock, [`concurrent_publishers`],
/// [`atomic_publish_across`], [`publish_races_delete_and_restore`] on two instances, then
/// [`check_consistency`].
pub async fn run_across_instances(stores: Vec<Arc<dyn KeyStore>>) {
    assert!(
        stores.len() >= 4,
        "run_across_instances needs four instances of one store, got {}",
        stores.len()
    );
    revocation::revocation_race(stores[2..].to_vec()).await;
    cas::compare_and_set_race(stores.clone()).await;
    cas::merged_publications(stores.clone()).await;
    reminders::reminder_claims(stores.clone()).await;
    reminders::reminders_across_a_pool(stores[..3].to_vec()).await;
    concurrent_publishers(stores.clone()).await;
    atomic_publish_across(stores.clone()).await;
    publish_races_delete_and_restore(stores[0].clone(), stores[1].clone()).await;
    assert!(
        check_consistency(&*stores[0]).await > 0,
        "run_across_instances: the store lists no address after the pool published to many"
    );
}

/// `check` succeeds on a healthy store.
pub async fn check_succeeds(store: &dyn KeyStore) {
    if let Err(e) = store.check().await {
        panic!("check on a healthy {} store failed: {e}", store.name());
    }
    assert!(!store.name().is_empty(), "a store needs a name for logs");
}

/// An address nothing was published for: `get` is `Ok(None)`, `history` empty, `delete` false,
/// and `list` does not show it.
pub async fn unknown_address(store: &dyn KeyStore) {
    const W: &str = "unknown_address";
    let a = address(&format!("nobody@{DOMAIN}"));
    same_record(
        W,
        "get of an unknown address",
        get(W, store, &a).await.as_ref(),
        None,
    );
    assert!(
        history(W, store, &a).await.is_empty(),
        "{W}: history of an unknown address must be empty"
    );
    assert!(
        !delete(W, store, &a).await,
        "{W}: delete of an unknown address must return false"
    );
    assert!(
        !list_all(W, store, 100).await.contains(&a),
        "{W}: list shows an address that has no key"
    );
    same_record(
        W,
        "get after a delete of nothing",
        get(W, store, &a).await.as_ref(),
        None,
    );
}

/// Versions start at 1 and go up by one; `publish` returns exactly the stored record; `get`
/// returns the newest; `history` is oldest first with the current key last, in numeric order
/// past version 9 (a store that sorts versions as text puts 10 before 2); fields (including
/// `revoked`, `published_at` and a non-ASCII address) come back verbatim; other addresses are
/// untouched.
pub async fn publish_get_history(store: &dyn KeyStore) {
    const W: &str = "publish_get_history";
    let a = address(&format!("Versions@{DOMAIN}"));
    let other = address(&format!("versions-other@{DOMAIN}"));
    assert_eq!(a.as_str(), format!("versions@{DOMAIN}"));

    let mut expected = Vec::new();
    for n in 1..=11 {
        let r = publish_new(W, store, test_key(&a, S_BASICS, n), n).await;
        expected.push(r);
        assert_stored(W, store, &a, &expected).await;
    }
    let mut revoked = test_key(&a, S_BASICS, 12);
    revoked.revoked = true;
    revoked.published_at = u64::from(u32::MAX) + 7;
    let r = publish_new(W, store, revoked, 12).await;
    assert!(r.revoked, "{W}: revoked must be kept");
    expected.push(r);
    assert_stored(W, store, &a, &expected).await;
    same_record(
        W,
        &format!("publishing to {a} changed {other}"),
        get(W, store, &other).await.as_ref(),
        None,
    );

    // An internationalized address and awkward key bytes survive the round trip.
    let idn = address("Jörg@Bücher.conformance.example");
    assert_eq!(idn.as_str(), "jörg@xn--bcher-kva.conformance.example");
    let mut k = test_key(&idn, S_BASICS, 1);
    k.key = vec![0, 0xFF, b'\n', b'"', b'\\', 0x80];
    let r = publish_new(W, store, k, 1).await;
    assert_stored(W, store, &idn, &[r]).await;
    assert!(
        list_all(W, store, 100).await.contains(&idn),
        "{W}: list must show {idn}"
    );
}

/// Idempotency: a `publication_id` that is anywhere in the history gives `Unchanged` with that
/// record (even with other bytes); the current key's bytes under a new id give
/// `Unchanged(current)`; an older key's bytes under a new id are a new version. Unchanged writes
/// nothing.
pub async fn idempotent_publish(store: &dyn KeyStore) {
    const W: &str = "idempotent_publish";
    let a = address(&format!("idempotent@{DOMAIN}"));
    let k1 = test_key(&a, S_IDEMPOTENT, 1);
    let k2 = test_key(&a, S_IDEMPOTENT, 2);
    let r1 = publish_new(W, store, k1.clone(), 1).await;
    let r2 = publish_new(W, store, k2.clone(), 2).await;
    let before = vec![r1.clone(), r2.clone()];

    let expect_unchanged = async |why: &str, key: NewKey, record: &KeyRecord| {
        let got = publish(W, store, key).await;
        same_outcome(
            W,
            &format!("{why} must be Unchanged with v{}", record.version),
            &got,
            &PublishOutcome::Unchanged(record.clone()),
        );
        assert_stored(W, store, &a, &before).await;
    };

    expect_unchanged("a redelivery of the current publication", k2.clone(), &r2).await;
    expect_unchanged("a redelivery of an older publication", k1.clone(), &r1).await;
    let mut other_bytes = k1.clone();
    other_bytes.key = key_bytes(S_OTHER, 1, SMALL_KEY_LEN);
    other_bytes.fingerprint = fingerprint(S_OTHER, 1);
    expect_unchanged(
        "a known publication id with other key bytes",
        other_bytes,
        &r1,
    )
    .await;
    let mut same_bytes = k2.clone();
    same_bytes.publication_id = publication_id(S_IDEMPOTENT, 100);
    same_bytes.published_at += 1000;
    expect_unchanged(
        "the current key's bytes under a new publication id",
        same_bytes,
        &r2,
    )
    .await;

    // K1 again under a new id: a rollback to the older key is a new version.
    let mut k1_again = k1.clone();
    k1_again.publication_id = publication_id(S_IDEMPOTENT, 101);
    let r3 = publish_new(W, store, k1_again.clone(), 3).await;
    assert!(r3.key == k1.key, "{W}: v3 must hold K1's bytes");
    let after = vec![r1.clone(), r2.clone(), r3.clone()];
    assert_stored(W, store, &a, &after).await;

    // Every id in the history still counts, including the one of the new version.
    for (key, record) in [(k1, &r1), (k2, &r2), (k1_again, &r3)] {
        same_outcome(
            W,
            &format!(
                "publication {} is in the history at v{}",
                record.publication_id, record.version
            ),
            &publish(W, store, key).await,
            &PublishOutcome::Unchanged(record.clone()),
        );
    }
    assert_stored(W, store, &a, &after).await;
}

/// `delete` removes the current key and the whole history of one address (and nothing else),
/// returns whether anything was there, and a later publish starts again at version 1. The old
/// publication ids are not forgotten: deletion wins over a redelivery, so publishing one of
/// them again is [`Error::DeletedSince`] and writes nothing, also once the address has a key
/// again, and also after a second deletion.
pub async fn delete_restarts_numbering(store: &dyn KeyStore) {
    const W: &str = "delete_restarts_numbering";
    let a = address(&format!("delete@{DOMAIN}"));
    let b = address(&format!("delete-keep@{DOMAIN}"));
    for n in 1..=3 {
        publish_new(W, store, test_key(&a, S_DELETE, n), n).await;
    }
    let kept = publish_new(W, store, test_key(&b, S_DELETE, 7), 1).await;

    assert!(
        delete(W, store, &a).await,
        "{W}: delete of {a} (3 versions) must return true"
    );
    assert_stored(W, store, &a, &[]).await;
    assert!(
        !delete(W, store, &a).await,
        "{W}: a second delete of {a} must return false"
    );
    assert_stored(W, store, &b, std::slice::from_ref(&kept)).await;
    let listed = list_all(W, store, 100).await;
    assert!(!listed.contains(&a), "{W}: list shows deleted {a}");
    assert!(listed.contains(&b), "{W}: list lost {b}");

    // Same publication id as the old v1 (the MTA delivers it again): deletion wins.
    for n in 1..=3 {
        publish_deleted_since(
            W,
            store,
            test_key(&a, S_DELETE, n),
            "a redelivery after the deletion",
        )
        .await;
    }
    assert_stored(W, store, &a, &[]).await;
    assert!(
        !list_all(W, store, 100).await.contains(&a),
        "{W}: list shows {a} after a refused redelivery"
    );
    // Another id of the same address is new: at v1 again.
    let r4 = publish_new(W, store, test_key(&a, S_DELETE, 4), 1).await;
    assert_stored(W, store, &a, std::slice::from_ref(&r4)).await;
    // An old id stays refused while the address has a key again, and changes nothing.
    publish_deleted_since(
        W,
        store,
        test_key(&a, S_DELETE, 3),
        "a redelivery after the deletion, the address published again",
    )
    .await;
    let r5 = publish_new(W, store, test_key(&a, S_DELETE, 5), 2).await;
    assert_eq!(r5.version, 2);
    assert_stored(W, store, &a, &[r4.clone(), r5.clone()]).await;
    assert!(
        list_all(W, store, 100).await.contains(&a),
        "{W}: list must show {a} again after it was republished"
    );
    // The ids of the current history are still plain redeliveries (Unchanged).
    same_outcome(
        W,
        "a redelivery of the current history's v1",
        &publish(W, store, test_key(&a, S_DELETE, 4)).await,
        &PublishOutcome::Unchanged(r4.clone()),
    );
    // A second deletion adds its ids; the first one's stay.
    assert!(delete(W, store, &a).await);
    for n in [1, 4, 5] {
        publish_deleted_since(
            W,
            store,
            test_key(&a, S_DELETE, n),
            "a redelivery after the second deletion",
        )
        .await;
    }
    assert_stored(W, store, &a, &[]).await;
    // The other address never had these ids: unaffected.
    let other = publish_new(W, store, test_key(&b, S_DELETE, 1), 2).await;
    assert_stored(W, store, &b, &[kept, other]).await;
}

/// `list` is in ascending byte order (not locale order), strictly after `after`, at most
/// `limit` long, pages join up, and only addresses that have a key appear (not deleted ones;
/// restored ones do).
pub async fn list_addresses(store: &dyn KeyStore) {
    const W: &str = "list_addresses";
    let domain = format!("list.{DOMAIN}");
    // Byte order differs from most locale collations for several of these ("a-c" < "ab" < "a_b"
    // < "aé" in bytes; a locale that ignores punctuation or folds accents orders them otherwise).
    let locals = [
        "ab", "a-c", "a_b", "a.d", "a+b", "a1", "aé", "b", "zz", "z", "0", "~x", "éa", "f",
    ];
    let addrs: Vec<Address> = locals
        .iter()
        .map(|l| address(&format!("{l}@{domain}")))
        .collect();
    for (i, a) in addrs.iter().enumerate() {
        let versions = 1 + (i as u64 % 3);
        for n in 1..=versions {
            publish_new(W, store, test_key(a, S_LIST, n), n).await;
        }
    }
    let gone = address(&format!("deleted@{domain}"));
    publish_new(W, store, test_key(&gone, S_LIST, 1), 1).await;
    assert!(delete(W, store, &gone).await);
    let restored = address(&format!("restored@{domain}"));
    restore(W, store, &[test_key(&restored, S_LIST, 9).into_record(4)]).await;

    let mut expected: BTreeSet<Address> = addrs.iter().cloned().collect();
    expected.insert(restored.clone());
    let expected: Vec<Address> = expected.into_iter().collect();

    let all = list_all(W, store, 1000).await;
    let ours: Vec<Address> = all
        .iter()
        .filter(|a| a.domain() == domain)
        .cloned()
        .collect();
    assert_eq!(
        ours, expected,
        "{W}: list must hold exactly the addresses with keys, in ascending byte order"
    );
    for page in [1, 2, 3, 7] {
        assert_eq!(
            list_all(W, store, page).await,
            all,
            "{W}: listing in pages of {page} differs from one big page"
        );
    }
    assert!(
        list(W, store, None, 0).await.is_empty(),
        "{W}: limit 0 must give nothing"
    );
    let last = all.last().expect("list is not empty here");
    assert!(
        list(W, store, Some(last), 10).await.is_empty(),
        "{W}: nothing comes after the last address"
    );
    // `after` need not be a stored address.
    let probes = [
        address(&format!("a@{domain}")),
        address(&format!("aa@{domain}")),
        address(&format!("a-@{domain}")),
        address(&format!("m@{domain}")),
        gone.clone(),
        address(&format!("a@a.{DOMAIN}")),
        address("zzzz@zzzz.zz"),
    ];
    for after in probes.iter().chain(expected.iter()) {
        for limit in [1, 3, 1000] {
            let want: Vec<Address> = all
                .iter()
                .filter(|a| *a > after)
                .take(limit)
                .cloned()
                .collect();
            assert_eq!(
                list(W, store, Some(after), limit).await,
                want,
                "{W}: list after {after} limit {limit}"
            );
        }
    }
}

/// `restore` replaces the whole history of an address verbatim (gaps in the versions, revoked
/// flags, timestamps and record formats included), also for an address that had nothing; publishing afterwards
/// continues after the last restored version and honours the restored publication ids only.
pub async fn restore_replaces_history(store: &dyn KeyStore) {
    const W: &str = "restore_replaces_history";
    let a = address(&format!("restore@{DOMAIN}"));
    for n in 1..=3 {
        publish_new(W, store, test_key(&a, S_RESTORE, n), n).await;
    }
    let mut records: Vec<KeyRecord> = [(1, 2), (2, 5), (3, 9)]
        .into_iter()
        .map(|(n, v)| test_key(&a, S_RESTORED, n).into_record(v))
        .collect();
    records[0].format = RECORD_FORMAT + 6;
    records[1].revoked = true;
    records[2].published_at = 1_800_000_000;
    restore(W, store, &records).await;
    let mut expected = records;
    assert_stored(W, store, &a, &expected).await;
    assert!(
        list_all(W, store, 100).await.contains(&a),
        "{W}: list must show {a}"
    );

    // The replaced history's publication ids are gone: publishing one is new, after v9.
    let r10 = publish_new(W, store, test_key(&a, S_RESTORE, 1), 10).await;
    // A restored publication id is known.
    same_outcome(
        W,
        "a publication id of the restored history must give Unchanged",
        &publish(W, store, test_key(&a, S_RESTORED, 2)).await,
        &PublishOutcome::Unchanged(expected[1].clone()),
    );
    expected.push(r10);
    assert_stored(W, store, &a, &expected).await;

    // A shorter history replaces a longer one.
    let one = [test_key(&a, S_RESTORED, 7).into_record(1)];
    restore(W, store, &one).await;
    assert_stored(W, store, &a, &one).await;
    publish_new(W, store, test_key(&a, S_RESTORED, 8), 2).await;

    // An address that had nothing.
    let fresh = address(&format!("restore-fresh@{DOMAIN}"));
    let hist: Vec<KeyRecord> = (1..=3)
        .map(|n| test_key(&fresh, S_RESTORED, n).into_record(n))
        .collect();
    restore(W, store, &hist).await;
    assert_stored(W, store, &fresh, &hist).await;
    assert!(
        list_all(W, store, 100).await.contains(&fresh),
        "{W}: list must show restored {fresh}"
    );
    // Restoring the same history again changes nothing.
    restore(W, store, &hist).await;
    assert_stored(W, store, &fresh, &hist).await;
}

/// An invalid history (empty, mixed addresses, versions not strictly increasing, version 0, a
/// publication id twice) gives a permanent [`Error::Invalid`] and changes nothing.
pub async fn restore_rejects_invalid(store: &dyn KeyStore) {
    const W: &str = "restore_rejects_invalid";
    let a = address(&format!("restore-invalid@{DOMAIN}"));
    let b = address(&format!("restore-invalid-other@{DOMAIN}"));
    let kept = vec![
        publish_new(W, store, test_key(&a, S_INVALID, 1), 1).await,
        publish_new(W, store, test_key(&a, S_INVALID, 2), 2).await,
    ];
    let rec = |addr: &Address, n: u64, v: u64| test_key(addr, S_INVALID, n).into_record(v);
    let cases: Vec<(&str, Vec<KeyRecord>)> = vec![
        ("an empty history", vec![]),
        ("mixed addresses", vec![rec(&a, 10, 1), rec(&b, 11, 2)]),
        (
            "mixed addresses, other first",
            vec![rec(&b, 10, 1), rec(&a, 11, 2)],
        ),
        ("a repeated version", vec![rec(&a, 10, 2), rec(&a, 11, 2)]),
        (
            "decreasing versions",
            vec![rec(&a, 10, 3), rec(&a, 11, 1), rec(&a, 12, 4)],
        ),
        ("version 0", vec![rec(&a, 10, 0), rec(&a, 11, 1)]),
        (
            "one publication twice",
            vec![rec(&a, 10, 1), rec(&a, 11, 2), rec(&a, 10, 3)],
        ),
    ];
    for (why, records) in cases {
        match store.restore(&records).await {
            Ok(()) => panic!("{W}: restore of {why} must fail, it succeeded"),
            Err(Error::Invalid(_)) => {}
            Err(e) => panic!("{W}: restore of {why} must give Error::Invalid, got {e:?}"),
        }
        assert_stored(W, store, &a, &kept).await;
        assert_stored(W, store, &b, &[]).await;
    }
    let err = store
        .restore(&[])
        .await
        .expect_err("restore of nothing must fail");
    assert!(
        !err.is_temporary(),
        "{W}: an invalid restore is permanent, got a temporary {err}"
    );
}

/// Atomic publish: while one task publishes [`ATOMIC_VERSIONS`] versions of
/// [`BIG_KEY_LEN`]-byte keys to one address, concurrent readers (`get` and `history`) only ever
/// see whole records (key, fingerprint, version and publication id of one publication), complete
/// histories, and never go back to an older version.
pub async fn atomic_publish(store: Arc<dyn KeyStore>) {
    atomic_publish_across(vec![store]).await;
}

/// [`atomic_publish`] with the writer on `stores[0]` and the readers spread over the others
/// (separate instances on one namespace; all on `stores[0]` when it is the only one). Each run
/// uses an address of its own, so it can run more than once on one store.
pub async fn atomic_publish_across(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "atomic_publish";
    const READERS: usize = 3;
    assert!(!stores.is_empty(), "{W} needs at least one store");
    let store = stores[0].clone();
    let a = run_address("atomic");
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(READERS + 1));

    let mut readers = Vec::new();
    for reader in 0..READERS {
        let store = stores[(reader + 1) % stores.len()].clone();
        let (a, done, start) = (a.clone(), done.clone(), start.clone());
        readers.push(tokio::spawn(async move {
            let what = format!("{W} (reader {reader})");
            let mut seen = 0u64;
            let mut reads = 0u64;
            start.wait().await;
            loop {
                // Read `done` before reading the store: after the writer finished, one more
                // full round of reads happens, which must see the last version.
                let finished = done.load(Ordering::Acquire);
                if (reads + reader as u64).is_multiple_of(2) {
                    if let Some(r) = get(&what, &*store, &a).await {
                        check_atomic_record(&what, &a, &r);
                        assert!(
                            r.version >= seen,
                            "{what}: get went back from v{seen} to v{}",
                            r.version
                        );
                        seen = r.version;
                    }
                } else {
                    let h = history(&what, &*store, &a).await;
                    for (i, r) in h.iter().enumerate() {
                        check_atomic_record(&what, &a, r);
                        assert_eq!(
                            r.version,
                            i as u64 + 1,
                            "{what}: history has a gap or is out of order"
                        );
                    }
                    let v = h.len() as u64;
                    assert!(v >= seen, "{what}: history went back from v{seen} to v{v}");
                    seen = v;
                }
                reads += 1;
                if finished {
                    return (seen, reads);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    start.wait().await;
    for n in 1..=ATOMIC_VERSIONS {
        let key = test_key_sized(&a, S_ATOMIC, n, BIG_KEY_LEN);
        publish_new(W, &*store, key, n).await;
    }
    done.store(true, Ordering::Release);

    for (i, reader) in readers.into_iter().enumerate() {
        let (seen, reads) = reader
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert!(reads > 0, "{W}: reader {i} never read");
        assert_eq!(
            seen, ATOMIC_VERSIONS,
            "{W}: reader {i}'s last read (after the writer finished) must see the last version"
        );
    }
    let h = history(W, &*store, &a).await;
    assert_eq!(h.len() as u64, ATOMIC_VERSIONS, "{W}: final history length");
    for r in &h {
        check_atomic_record(W, &a, r);
    }
}

fn check_atomic_record(what: &str, a: &Address, r: &KeyRecord) {
    assert_eq!(&r.address, a, "{what}: record of another address");
    let (series, n) = assert_test_record(what, r);
    assert!(
        series == S_ATOMIC && n == r.version && r.key.len() == BIG_KEY_LEN,
        "{what}: v{} holds key {n} of series {series} ({} bytes): version and key do not \
         belong together",
        r.version,
        r.key.len()
    );
}

/// Concurrent publishers: many tasks spread over `stores` (separate instances on one namespace,
/// standing in for separate processes) publish distinct keys to an overlapping set of
/// addresses, and every publication is sent twice through different tasks (a redelivery racing
/// the original).
///
/// Afterwards each address has exactly one current key and versions `1..=n` with no gap or
/// duplicate, every publication was `Published` exactly once (its twin got `Unchanged` with the
/// same record), and the history holds each accepted publication exactly once, as returned.
///
/// Each run uses addresses of its own, so it can run more than once on one store.
pub async fn concurrent_publishers(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "concurrent_publishers";
    assert!(!stores.is_empty(), "{W} needs at least one store");
    let addrs: Vec<Address> = (0..RACE_ADDRESSES)
        .map(|i| run_address(&format!("race-{i}")))
        .collect();

    // Jobs: (address index, n), each twice, on two different tasks.
    let tasks = (2 * stores.len()).max(6);
    let mut jobs: Vec<Vec<(usize, u64)>> = vec![Vec::new(); tasks];
    let mut slot = 0usize;
    for n in 1..=RACE_PUBLICATIONS {
        for i in 0..RACE_ADDRESSES {
            jobs[slot % tasks].push((i, n));
            jobs[(slot + 1) % tasks].push((i, n));
            slot += 1;
        }
    }
    let start = Arc::new(Barrier::new(tasks));
    let mut handles = Vec::new();
    for (t, list) in jobs.into_iter().enumerate() {
        let store = stores[t % stores.len()].clone();
        let addrs = addrs.clone();
        let start = start.clone();
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let mut out = Vec::new();
            for (i, n) in list {
                let what = format!("{W} (task {t})");
                let outcome = publish(&what, &*store, test_key(&addrs[i], S_RACE, n)).await;
                out.push((i, n, outcome));
            }
            out
        }));
    }

    // (address, n) -> outcomes
    let mut outcomes: BTreeMap<(usize, u64), Vec<PublishOutcome>> = BTreeMap::new();
    for h in handles {
        let results = h
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        for (i, n, o) in results {
            outcomes.entry((i, n)).or_default().push(o);
        }
    }

    let mut published: Vec<BTreeMap<u64, KeyRecord>> = vec![BTreeMap::new(); RACE_ADDRESSES];
    for ((i, n), outs) in &outcomes {
        let a = &addrs[*i];
        assert_eq!(outs.len(), 2, "{W}: publication {n} of {a} ran twice");
        let mut accepted = None;
        for o in outs {
            let r = o.record();
            assert_eq!(&r.address, a, "{W}: outcome for another address");
            let (series, m) = assert_test_record(W, r);
            assert_eq!(
                (series, m),
                (S_RACE, *n),
                "{W}: publication {n} of {a} answered with the record of another publication"
            );
            if let PublishOutcome::Published(r) = o {
                assert!(
                    accepted.is_none(),
                    "{W}: publication {n} of {a} was Published twice (v{} and v{})",
                    accepted.as_ref().map_or(0, |x: &KeyRecord| x.version),
                    r.version
                );
                accepted = Some(r.clone());
            }
        }
        let accepted = accepted.unwrap_or_else(|| {
            panic!(
                "{W}: publication {n} of {a} was never Published (both Unchanged: {} / {})",
                describe_outcome(&outs[0]),
                describe_outcome(&outs[1])
            )
        });
        for o in outs {
            same_record(
                W,
                &format!(
                    "the Unchanged twin of publication {n} of {a} must carry the stored record"
                ),
                Some(o.record()),
                Some(&accepted),
            );
        }
        if let Some(dup) = published[*i].insert(accepted.version, accepted.clone()) {
            panic!(
                "{W}: {a} v{} was given to two publications: {} and {}",
                accepted.version, dup.publication_id, accepted.publication_id
            );
        }
    }

    for (i, a) in addrs.iter().enumerate() {
        let expected: Vec<KeyRecord> = published[i].values().cloned().collect();
        let versions: Vec<u64> = expected.iter().map(|r| r.version).collect();
        let want: Vec<u64> = (1..=RACE_PUBLICATIONS).collect();
        assert_eq!(
            versions, want,
            "{W}: the Published versions of {a} must be 1..={RACE_PUBLICATIONS}"
        );
        let h = history(W, &*stores[0], a).await;
        let ids: BTreeSet<&str> = h.iter().map(|r| r.publication_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            h.len(),
            "{W}: a publication appears twice in the history of {a}"
        );
        for store in &stores {
            assert_stored(W, &**store, a, &expected).await;
        }
    }
}

/// Publications racing deletes and restores: one task publishes [`RACE_PUBLICATIONS`] keys to
/// one address through `publisher` while `deleter` alternately deletes the address and restores
/// a one-version history. Every call succeeds, and afterwards the history has versions `1..=n`
/// without a gap, only whole records, the current key is its last entry, and `list` shows the
/// address exactly when it has a history. Each run uses an address of its own, so it can run
/// more than once on one store.
pub async fn publish_races_delete_and_restore(
    publisher: Arc<dyn KeyStore>,
    deleter: Arc<dyn KeyStore>,
) {
    const W: &str = "publish_races_delete_and_restore";
    let a = run_address("race-delete");
    let p = {
        let a = a.clone();
        tokio::spawn(async move {
            for n in 1..=RACE_PUBLICATIONS {
                publish(W, &*publisher, test_key(&a, S_RACE_DELETE, n)).await;
            }
        })
    };
    let mut rounds = 0u64;
    while !p.is_finished() || rounds == 0 {
        rounds += 1;
        if rounds.is_multiple_of(2) {
            delete(W, &*deleter, &a).await;
        } else {
            let n = RACE_PUBLICATIONS + rounds;
            restore(
                W,
                &*deleter,
                &[test_key(&a, S_RACE_DELETE, n).into_record(1)],
            )
            .await;
        }
        tokio::task::yield_now().await;
    }
    p.await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let h = history(W, &*deleter, &a).await;
    let versions: Vec<u64> = h.iter().map(|r| r.version).collect();
    let want: Vec<u64> = (1..=h.len() as u64).collect();
    assert_eq!(
        versions, want,
        "{W}: the history of {a} must have versions 1..=n after the race"
    );
    for r in &h {
        assert_eq!(&r.address, &a, "{W}: record of another address");
        assert_test_record(W, r);
    }
    same_record(
        W,
        &format!("the current key of {a} must be the last entry of its history"),
        get(W, &*deleter, &a).await.as_ref(),
        h.last(),
    );
    assert_eq!(
        list_all(W, &*deleter, 100).await.contains(&a),
        !h.is_empty(),
        "{W}: list must show {a} exactly when it has a history"
    );
}

/// Walks every listed address and checks the store's invariants: the listing is strictly
/// ascending; every listed address has a non-empty history of its own records with strictly
/// increasing versions, and its current key is the last entry, found by its fingerprint and
/// its WKD hash. Returns how many addresses it checked. Panics on the first violation.
pub async fn check_consistency(store: &dyn KeyStore) -> usize {
    const W: &str = "check_consistency";
    let all = list_all(W, store, 100).await;
    for a in &all {
        let h = history(W, store, a).await;
        assert!(!h.is_empty(), "{W}: list shows {a}, which has no history");
        let mut prev = 0;
        for r in &h {
            assert!(
                &r.address == a,
                "{W}: the history of {a} holds {}",
                describe(r)
            );
            assert!(
                r.version > prev,
                "{W}: versions of {a} are not strictly increasing ({} after {prev})",
                r.version
            );
            prev = r.version;
        }
        same_record(
            W,
            &format!("the current key of {a} must be the last entry of its history"),
            get(W, store, a).await.as_ref(),
            h.last(),
        );
        lookup::check_index(store, &h[h.len() - 1]).await;
    }
    all.len()
}

#[cfg(test)]
mod tests {
    //! The suite against kst-core's in-memory store, and against stores that each break one
    //! rule of the contract (the suite must notice).

    use std::future::Future;

    use async_trait::async_trait;

    use super::*;
    use crate::error::Result;
    use crate::fingerprint::KeyId;
    use crate::key_index::IndexEntries;
    use crate::testing::MemoryStore;
    use crate::wkd::WkdHash;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_conforms() {
        let store = Arc::new(MemoryStore::default());
        run_all(store.clone()).await;
        let other: Arc<dyn KeyStore> = store.clone();
        concurrent_publishers(vec![other.clone(), other.clone(), other]).await;
        assert!(check_consistency(&*store).await > 10);
    }

    /// The tests' wrapper [`crate::testing::DelegatingStore`], taking over no call, keeps the
    /// contract of the store it wraps: every call reaches the inner store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delegating_store_taking_over_nothing_conforms() {
        let inner = Arc::new(MemoryStore::default());
        let store = Arc::new(crate::testing::DelegatingStore::new(inner.clone(), ()));
        assert_eq!(store.name(), "memory");
        run_all(store.clone()).await;
        assert!(
            check_consistency(&*inner).await > 10,
            "the suite's keys are in the inner store"
        );
    }

    #[test]
    fn test_keys_are_checkable() {
        let a = address("x@conformance.example");
        let r = test_key_sized(&a, 3, 77, 1000).into_record(1);
        assert_eq!(r.key.len(), 1000);
        assert_eq!(assert_test_record("t", &r), (3, 77));
        assert_ne!(key_bytes(3, 77, 1000), key_bytes(3, 78, 1000));
        assert_ne!(key_bytes(3, 77, 1000), key_bytes(4, 77, 1000));
        let mut torn = r.clone();
        torn.key[500] ^= 1;
        let caught = std::panic::catch_unwind(|| assert_test_record("t", &torn));
        assert!(caught.is_err(), "a flipped byte must be noticed");
        let mut torn = r;
        torn.fingerprint = fingerprint(3, 78);
        assert!(std::panic::catch_unwind(|| assert_test_record("t", &torn)).is_err());
    }

    /// One way to break the contract.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Flaw {
        /// Ignores publication ids of older versions (checks only the current one).
        OnlyCurrentIdIsIdempotent,
        /// Does not treat the current key's bytes as unchanged.
        NoByteIdempotency,
        /// Reads the version, yields, then writes: concurrent publishers lose updates.
        LostUpdate,
        /// Lists in descending order.
        DescendingList,
        /// Restores without validating.
        UnvalidatedRestore,
        /// `delete` leaves the version counter behind.
        NumberingSurvivesDelete,
        /// Publishes the new key bytes first, then (after a yield) the rest of the record.
        TornPublish,
        /// `list` ignores `after`.
        ListIgnoresAfter,
        /// The look-ups also find keys of the history, not only current ones.
        IndexKeepsOldKeys,
        /// The look-ups know the primary fingerprint only, not the subkeys.
        IndexIgnoresSubkeys,
        /// The look-ups return every match, whatever the limit.
        IndexIgnoresLimit,
        /// `rebuild_index` counts every version of the history, not the current keys.
        RebuildCountsHistory,
        /// After `rebuild_index` the look-ups know primary fingerprints only.
        RebuildForgetsSubkeys,
        /// The walk's cursor stands after the first address of a page, not the last.
        WalkRepeats,
        /// The walk's cursor skips the address after each page.
        WalkSkips,
        /// `delete` forgets the publication ids: a redelivery after it publishes again.
        ForgetsDeletedPublications,
    }

    impl Broken {
        /// Records matching `hit`, with this store's flaw.
        fn find(
            &self,
            limit: usize,
            hit: impl Fn(&KeyRecord, &IndexEntries) -> bool,
        ) -> Vec<KeyRecord> {
            let map = self.inner.map.lock().unwrap();
            let mut out = Vec::new();
            for h in map.values() {
                let candidates = match self.flaw {
                    Flaw::IndexKeepsOldKeys => &h[..],
                    _ => &h[h.len().saturating_sub(1)..],
                };
                for r in candidates {
                    let mut e = IndexEntries::of(r);
                    if self.flaw == Flaw::IndexIgnoresSubkeys
                        || (self.flaw == Flaw::RebuildForgetsSubkeys
                            && self.rebuilt.load(Ordering::SeqCst))
                    {
                        e.fingerprints.truncate(1);
                        e.key_ids.truncate(1);
                    }
                    if hit(r, &e) {
                        out.push(r.clone());
                        break;
                    }
                }
            }
            if self.flaw != Flaw::IndexIgnoresLimit {
                out.truncate(limit);
            }
            out
        }
    }

    struct Broken {
        inner: MemoryStore,
        flaw: Flaw,
        deleted_versions: std::sync::Mutex<BTreeMap<Address, u64>>,
        rebuilt: AtomicBool,
    }

    impl Broken {
        fn store(flaw: Flaw) -> Arc<dyn KeyStore> {
            Arc::new(Broken {
                inner: MemoryStore::default(),
                flaw,
                deleted_versions: Default::default(),
                rebuilt: AtomicBool::new(false),
            })
        }
    }

    #[async_trait]
    impl KeyStore for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
            let hist = self.inner.history(&key.address).await?;
            let check_ids: &[KeyRecord] = match self.flaw {
                Flaw::OnlyCurrentIdIsIdempotent => &hist[hist.len().saturating_sub(1)..],
                _ => &hist,
            };
            if let Some(r) = check_ids
                .iter()
                .find(|r| r.publication_id == key.publication_id)
            {
                return Ok(PublishOutcome::Unchanged(r.clone()));
            }
            let id = (key.address.clone(), key.publication_id.clone());
            if self.flaw != Flaw::ForgetsDeletedPublications
                && self.inner.deleted.lock().unwrap().contains(&id)
            {
                return Err(Error::deleted_since(&key));
            }
            if self.flaw != Flaw::NoByteIdempotency
                && let Some(cur) = hist.last().filter(|c| c.key == key.key)
            {
                return Ok(PublishOutcome::Unchanged(cur.clone()));
            }
            let base = match self.flaw {
                Flaw::NumberingSurvivesDelete if hist.is_empty() => self
                    .deleted_versions
                    .lock()
                    .unwrap()
                    .get(&key.address)
                    .copied()
                    .unwrap_or(0),
                _ => hist.last().map_or(0, |r| r.version),
            };
            let rec = key.into_record(base + 1);
            match self.flaw {
                Flaw::LostUpdate => {
                    tokio::task::yield_now().await;
                    let mut map = self.inner.map.lock().unwrap();
                    let h = map.entry(rec.address.clone()).or_default();
                    h.retain(|r| r.version < rec.version);
                    h.push(rec.clone());
                }
                Flaw::TornPublish => {
                    {
                        let mut map = self.inner.map.lock().unwrap();
                        let h = map.entry(rec.address.clone()).or_default();
                        let mut half = h.last().cloned().unwrap_or_else(|| rec.clone());
                        half.key = rec.key.clone();
                        half.version = rec.version;
                        h.push(half);
                    }
                    tokio::task::yield_now().await;
                    let mut map = self.inner.map.lock().unwrap();
                    let h = map.entry(rec.address.clone()).or_default();
                    *h.last_mut().unwrap() = rec.clone();
                }
                _ => {
                    let mut map = self.inner.map.lock().unwrap();
                    map.entry(rec.address.clone())
                        .or_default()
                        .push(rec.clone());
                }
            }
            Ok(PublishOutcome::Published(rec))
        }
        async fn get(&self, address: &Address) -> Result<Option<KeyRecord>> {
            self.inner.get(address).await
        }
        async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>> {
            self.inner.history(address).await
        }
        async fn delete(&self, address: &Address) -> Result<bool> {
            if let Some(last) = self.inner.get(address).await? {
                self.deleted_versions
                    .lock()
                    .unwrap()
                    .insert(address.clone(), last.version);
            }
            self.inner.delete(address).await
        }
        async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>> {
            match self.flaw {
                Flaw::DescendingList => {
                    let mut all = self.inner.list(after, usize::MAX).await?;
                    all.reverse();
                    all.truncate(limit);
                    Ok(all)
                }
                Flaw::ListIgnoresAfter => self.inner.list(None, limit).await,
                _ => self.inner.list(after, limit).await,
            }
        }
        async fn list_page(
            &self,
            cursor: Option<&crate::store::WalkCursor>,
            limit: usize,
        ) -> Result<crate::store::WalkPage> {
            let mut page = crate::store::list_page_by_address(self, cursor, limit).await?;
            let all = self.inner.list(None, usize::MAX).await?;
            let after = |a: &Address| {
                crate::store::WalkCursor::new(format!("after-address:{}", a.as_str()))
            };
            match self.flaw {
                Flaw::WalkRepeats if page.next.is_some() => {
                    page.next = page.addresses.first().map(after);
                }
                Flaw::WalkSkips if page.next.is_some() => {
                    let last = page.addresses.last().expect("a full page");
                    page.next = all.iter().find(|a| *a > last).map(after);
                }
                _ => {}
            }
            Ok(page)
        }
        async fn restore(&self, history: &[KeyRecord]) -> Result<()> {
            if self.flaw == Flaw::UnvalidatedRestore
                && let Some(first) = history.first()
            {
                self.inner
                    .map
                    .lock()
                    .unwrap()
                    .insert(first.address.clone(), history.to_vec());
                return Ok(());
            }
            self.inner.restore(history).await
        }
        async fn find_by_fingerprint(
            &self,
            f: &Fingerprint,
            limit: usize,
        ) -> Result<Vec<KeyRecord>> {
            Ok(self.find(limit, |_, e| e.has_fingerprint(f)))
        }
        async fn find_by_key_id(&self, id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>> {
            Ok(self.find(limit, |_, e| e.has_key_id(id)))
        }
        async fn find_by_wkd_hash(
            &self,
            domain: &str,
            hash: &WkdHash,
        ) -> Result<Option<KeyRecord>> {
            Ok(self.find(1, |_, e| e.has_wkd_hash(domain, hash)).pop())
        }
        async fn rebuild_index(&self) -> Result<u64> {
            self.rebuilt.store(true, Ordering::SeqCst);
            let map = self.inner.map.lock().unwrap();
            let n = match self.flaw {
                Flaw::RebuildCountsHistory => map.values().map(Vec::len).sum(),
                _ => map.len(),
            };
            Ok(n as u64)
        }
        async fn check(&self) -> Result<()> {
            self.inner.check().await
        }
        async fn deleted_page(
            &self,
            cursor: Option<&crate::store::WalkCursor>,
            limit: usize,
        ) -> Result<crate::store::DeletedPage> {
            self.inner.deleted_page(cursor, limit).await
        }
        async fn remember_deleted(&self, a: &Address, ids: &[String]) -> Result<()> {
            self.inner.remember_deleted(a, ids).await
        }
    }

    /// Runs `property` on its own task and returns whether it panicked.
    async fn fails<F: Future<Output = ()> + Send + 'static>(property: F) -> bool {
        tokio::spawn(property).await.is_err()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_suite_notices_broken_stores() {
        for flaw in [
            Flaw::OnlyCurrentIdIsIdempotent,
            Flaw::NoByteIdempotency,
            Flaw::LostUpdate,
            Flaw::DescendingList,
            Flaw::UnvalidatedRestore,
            Flaw::NumberingSurvivesDelete,
            Flaw::TornPublish,
            Flaw::ListIgnoresAfter,
            Flaw::IndexKeepsOldKeys,
            Flaw::IndexIgnoresSubkeys,
            Flaw::IndexIgnoresLimit,
            Flaw::RebuildCountsHistory,
            Flaw::RebuildForgetsSubkeys,
            Flaw::WalkRepeats,
            Flaw::WalkSkips,
            Flaw::ForgetsDeletedPublications,
        ] {
            let s = Broken::store(flaw);
            assert!(
                fails(run_all(s)).await,
                "run_all passed a store with {flaw:?}"
            );
        }
        // The specific property catches each flaw on its own.
        let s = Broken::store(Flaw::OnlyCurrentIdIsIdempotent);
        assert!(fails(async move { idempotent_publish(&*s).await }).await);
        let s = Broken::store(Flaw::NoByteIdempotency);
        assert!(fails(async move { idempotent_publish(&*s).await }).await);
        let s = Broken::store(Flaw::LostUpdate);
        assert!(fails(concurrent_publishers(vec![s.clone(), s])).await);
        let s = Broken::store(Flaw::DescendingList);
        assert!(fails(async move { list_addresses(&*s).await }).await);
        let s = Broken::store(Flaw::ListIgnoresAfter);
        assert!(fails(async move { list_addresses(&*s).await }).await);
        let s = Broken::store(Flaw::UnvalidatedRestore);
        assert!(fails(async move { restore_rejects_invalid(&*s).await }).await);
        let s = Broken::store(Flaw::NumberingSurvivesDelete);
        assert!(fails(async move { delete_restarts_numbering(&*s).await }).await);
        let s = Broken::store(Flaw::ForgetsDeletedPublications);
        assert!(fails(async move { delete_restarts_numbering(&*s).await }).await);
        let s = Broken::store(Flaw::TornPublish);
        assert!(fails(atomic_publish(s)).await);
        let s = Broken::store(Flaw::IndexKeepsOldKeys);
        assert!(
            fails(async move { lookup::replaced_key_is_not_found_by_its_old_entries(&*s).await })
                .await
        );
        let s = Broken::store(Flaw::IndexKeepsOldKeys);
        assert!(
            fails(async move { lookup::restore_indexes_the_current_key_only(&*s).await }).await
        );
        let s = Broken::store(Flaw::IndexIgnoresSubkeys);
        assert!(
            fails(async move { lookup::primary_subkeys_key_ids_and_wkd_hash(&*s).await }).await
        );
        for flaw in [Flaw::RebuildCountsHistory, Flaw::RebuildForgetsSubkeys] {
            let s = Broken::store(flaw);
            assert!(
                fails(async move { lookup::rebuild_index_is_idempotent(&*s).await }).await,
                "rebuild_index_is_idempotent passed a store with {flaw:?}"
            );
        }
        for flaw in [Flaw::WalkRepeats, Flaw::WalkSkips] {
            let s = Broken::store(flaw);
            assert!(
                fails(async move { walk::list_page_walks_every_address_once(&*s).await }).await,
                "list_page_walks_every_address_once passed a store with {flaw:?}"
            );
        }
        let s = Broken::store(Flaw::IndexIgnoresLimit);
        assert!(
            fails(
                async move { lookup::shared_key_finds_every_address_within_the_limit(&*s).await }
            )
            .await
        );
    }
}
