//! Key transparency (issue 18, feature `transparency`, on by default):
//!
//! - `fs_directory_store_conformance`: kst-fs's `FsDirectoryStore` against the directory
//!   storage contract (`kst_core::conformance::directory`), two instances on one store.
//! - `record_encoding_round_trips`: every record of a directory through the blob encoding.
//! - `one_address_is_recorded_in_store_order` (fs) and `..._on_postgres`: two processes'
//!   handles publish one address at once; the directory records it in the store's order
//!   (then a deletion, a publication after it, a restore, `record_all`); on PostgreSQL with
//!   the key commits unsynced, as kst-bin wires it (tests/transparency_unsynced.rs).
//! - `postgres_directory_store_conformance`: kst-postgres's `PgDirectoryStore`, the same
//!   suite, two pools on a fresh database; `postgres_directory_refuses_oversized_records`.
//! - `redis_directory_store_conformance`: kst-redis's `RedisDirectoryStore`, the same suite,
//!   two connections on a fresh key prefix; `redis_directory_refuses_planted_records`:
//!   oversized and malformed records planted in Redis are refused, not loaded.
//! - `retrieval_is_checked_against_the_directory` (fs store), `..._on_postgres` and
//!   `..._on_redis` (one scenario over the backend): the real path through the real binaries.
//!   Publications go through `kst deliver` (the client hands them to a sendmail-style script,
//!   as Postfix's pipe(8) would), which records them in the store's directory; `kst serve`
//!   serves the directory on `[http]`; `kst client retrieve --check-transparency` fetches the
//!   signed head and proof and checks them against the head key and the key the KST mailed.
//!   Negative cases: a wrong head key, and a key put in the store behind the directory's back
//!   (a second `kst deliver` configuration without `[transparency]`, standing in for an
//!   insider or a tool that bypasses the directory): the reply's HMAC verifies, the check
//!   does not, exit 5.
//! - `replies_carry_the_proof_in_version_3`: protocol version 3 through the real binaries with
//!   no `kst serve` at all (no HTTP endpoint to reach): `kst client publish/retrieve/delete
//!   --transparency --log-key HEX` offers version 3, `kst deliver` puts the directory's answer
//!   inside the HMAC-covered reply, and the client checks it. A reply whose answer an attacker
//!   on the reply's path stripped, or swapped for one captured from an earlier reply, is exit
//!   5; so is a wrong head key. The insider's key behind the directory's back is never served
//!   in version 3 (the version the directory proves is).
//! - `a_reply_read_after_its_address_changed_is_a_temporary_failure`,
//!   `an_answer_a_moment_behind_the_reply_is_asked_for_again` and
//!   `rt18_a_two_step_check_takes_no_stale_never_recorded_or_forged_key_for_a_race`: the
//!   two-step check of versions 1 and 2 (the key by mail, the answer over HTTP) tells a change
//!   on the reply's way (exit 75) and an answer a moment behind (asked again) from a stale,
//!   never recorded or forged key (exit 5); `rt18_a_deletion_head_re_signed_later_is_no_race`:
//!   epochs are compared, not clocks, so a deletion's head re-signed with a recent time lets
//!   no forged key pass for a race; `rt18_a_mismatch_whose_history_cannot_be_read_is_decided_by_the_answer`
//!   and `two_step_a_stale_key_is_an_attack_by_the_answers_epoch_without_the_history`: the
//!   answer's proof of the newest version's epoch decides without the history (exit 5);
//!   `a_pending_request_without_its_verified_epoch_cannot_tell_and_the_retry_decides`;
//!   review F8, F6, F5: `two_step_a_pending_request_checked_after_a_re_key_compares_no_epoch_of_the_old_directory`
//!   (an epoch of a re-keyed directory is not compared with the new one's: exit 75, no
//!   false alarm), `two_step_the_evidence_of_an_attack_names_the_served_key_and_the_reply`,
//!   `two_step_a_history_answered_503_is_never_taken_for_a_404_by_its_text`; review F9:
//!   `two_step_a_key_superseded_more_than_64_versions_back_is_found_in_the_older_pages`;
//!   review F7: `presend_is_bounded_in_all_not_per_step`.
//! - `history_path`: the two-step check's history path, reached end to end (the address's
//!   newest version recorded after the request's `verified_epoch`): a change on the way is
//!   exit 75, nothing imported; a key (or "no key") superseded at or before the request's
//!   epoch (also across a deletion), a key the directory never held, a history replayed from
//!   before, forked with the head key, or that does not verify is exit 5 with the evidence; a
//!   history that cannot be read, or a directory that keeps moving while it is read, is exit
//!   75 with the mismatch kept.
//! - `gather::replies`: version 3 replies through `Kst::handle` racing changes of their
//!   address (a publication held before its epoch, a newer publication recorded first, a
//!   deletion waiting for its epoch, a red-team stream): every reply passes the client's check.
//! - `rt18_a_head_refused_for_its_witnesses_is_never_remembered`: a fork no witness cosigned
//!   is refused and not remembered, so the honest directory still passes (the other rt18
//!   red-team tests are in tests/transparency_redteam.rs).
//! - `rt18_a_back_dated_deletion_is_not_the_owners`: the owner's monitor checks a deletion's
//!   time against the heads around its epoch; one an insider dated into the window of the
//!   owner's own (confirmed, never recorded) deletion is reported, exit 6.
//! - `serve_starts_while_postgres_is_down_and_the_directory_opens_later`: `kst serve` with
//!   two PostgreSQL hosts that are both down at start; the directory answers 503 and a
//!   publication fails, then one host comes back (a TCP proxy) and the scenario above passes.
//! - `the_head_key_is_found_in_the_wkd_policy_directory_and_pinned`: `kst serve` [web]
//!   serves the directory's keys in the WKD policy directory (`kst-log`); a client whose
//!   DNS has no `_kst-log` record pins them from there, and never replaces the pin silently.
//! - `heads_missing_in_the_middle_are_signed_late_on_fs` and `..._on_postgres`: heads deleted
//!   from the store, `kst serve` restarted: an audit from epoch 0 and a witness across the gap
//!   pass, the heads signed late name the epochs' roots.
//! - `migrate_moves_every_root_of_a_store_of_journal_version_3_before_the_move` and
//!   `..._from_before_the_journal`: the fs upgrade as docs/OPERATIONS.md says it (the pool
//!   stopped, the new release's `kst migrate`, then `kst serve`) on a store an older release
//!   left: every logged domain's root moved (the older releases' reader refuses it), the same
//!   files after a second run and after a run killed part-way, and the same heads and answers;
//!   `migrate_fails_on_a_logged_domain_whose_directory_cannot_be_read`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use kst_core::KeyStore;
use kst_core::transparency::DirectoryStore;
use kst_fs::{FsDirectoryStore, FsStore};
use kst_postgres::{PgDirectoryStore, PostgresStore};
use kst_redis::RedisStore;
use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::{
    Gpg, TestDb, TestPrefix, code, kst_binary, make_maildir, run_json, stderr,
    write_sendmail_script,
};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fs_directory_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
    let b: Arc<dyn DirectoryStore> = Arc::new(FsDirectoryStore::new(dir.path()));
    kst_core::conformance::directory::run_all(a, b).await;
}

/// The test wrapper `DelegatingDirectory` with no hook is a faithful directory store: the
/// conformance suite passes through it on the fs store (both instances wrapped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegating_directory_without_hooks_passes_the_conformance_suite() {
    use kst_core::testing::DelegatingDirectory;
    let dir = tempfile::tempdir().unwrap();
    let wrapped = || -> Arc<dyn DirectoryStore> {
        Arc::new(DelegatingDirectory::new(
            Arc::new(FsDirectoryStore::new(dir.path())),
            (),
        ))
    };
    kst_core::conformance::directory::run_all(wrapped(), wrapped()).await;
}

#[tokio::test]
async fn record_encoding_round_trips() {
    kst_core::conformance::directory::record_encoding_round_trips().await;
}

/// Two stores (two connections) on one fresh key prefix of the shared Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_directory_store_conformance() {
    let prefix = TestPrefix::new();
    let mut stores: Vec<Arc<dyn DirectoryStore>> = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&prefix.url, &prefix.prefix)
            .await
            .expect("Redis store");
        stores.push(Arc::new(store.inner().directory()));
    }
    let (a, b) = (stores[0].clone(), stores[1].clone());
    kst_core::conformance::directory::run_all(a, b).await;
    let keys = prefix.keys().unwrap();
    assert!(
        keys.iter()
            .all(|k| k.starts_with(&format!("{}{{kt:", prefix.prefix))),
        "every directory key is under the prefix and one hash tag per domain: {keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with(":root")),
        "the suite wrote roots: {keys:?}"
    );
}

/// With `[store] min_replicas`, the directory serves an epoch only once that many replicas
/// hold it (a read barrier: a write on the domain's slot and `WAIT`; docs/TRANSPARENCY.md,
/// "Failover with the directory on"). The test server has no replica: a head stored by a
/// directory without `min_replicas` is served by it, and refused as a temporary failure by
/// one that asks for a replica, as a head read on a primary about to die unreplicated would
/// be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_directory_serves_no_epoch_its_replicas_lack() {
    let prefix = TestPrefix::new();
    let plain = RedisStore::connect(&prefix.url, &prefix.prefix)
        .await
        .expect("Redis store")
        .inner()
        .directory();
    plain
        .insert_head("example.net", 1, b"a head")
        .await
        .expect("insert a head");
    assert_eq!(
        plain.heads("example.net", 1, 1).await.expect("heads"),
        vec![(1, b"a head".to_vec())]
    );
    let careful = RedisStore::builder(&prefix.url)
        .prefix(&prefix.prefix)
        .min_replicas(1)
        .connect_lazy()
        .expect("Redis store")
        .inner()
        .directory();
    match careful.heads("example.net", 1, 1).await {
        Err(kst_core::transparency::DirectoryStoreError::Unavailable(m)) => {
            assert!(m.contains("replicas"), "{m}")
        }
        other => panic!("a head no replica holds was served: {other:?}"),
    }
}

/// Someone with write access to Redis plants records the directory must not trust or load: a
/// record larger than the bound (root, node, value state), a non-numeric epoch, a key of the
/// wrong type, a label with too many versions, a domain that would end the hash tag early.
/// Each read fails as corrupt (or the call is refused) instead of loading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_directory_refuses_planted_records() {
    use kst_core::transparency::DirectoryStoreError as E;
    let prefix = TestPrefix::new();
    let store = RedisStore::connect(&prefix.url, &prefix.prefix)
        .await
        .expect("Redis store");
    let dir = store.inner().directory();
    let mut conn = redis::Client::open(prefix.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |domain: &str, rest: &str| format!("{}{{kt:{domain}}}:{rest}", prefix.prefix);
    let big = vec![7u8; kst_redis::MAX_BLOB + 1];
    let set = |k: String, f: Vec<u8>, v: Vec<u8>| {
        let mut c = redis::cmd("HSET");
        c.arg(k).arg(f).arg(v);
        c
    };
    let run = async |conn: &mut redis::aio::MultiplexedConnection, c: redis::Cmd| {
        c.query_async::<()>(conn).await.unwrap();
    };

    // An oversized root record.
    run(
        &mut conn,
        set(key("a.example", "root"), b"epoch".to_vec(), b"1".to_vec()),
    )
    .await;
    run(
        &mut conn,
        set(key("a.example", "root"), b"record".to_vec(), big.clone()),
    )
    .await;
    assert!(matches!(dir.root("a.example").await, Err(E::Corrupt(_))));
    // A root whose epoch is not a number.
    run(
        &mut conn,
        set(key("b.example", "root"), b"epoch".to_vec(), b"x1".to_vec()),
    )
    .await;
    run(
        &mut conn,
        set(key("b.example", "root"), b"record".to_vec(), b"r".to_vec()),
    )
    .await;
    assert!(matches!(dir.root("b.example").await, Err(E::Corrupt(_))));
    // An oversized tree node next to a normal one.
    run(
        &mut conn,
        set(key("c.example", "nodes"), b"n1".to_vec(), b"ok".to_vec()),
    )
    .await;
    run(
        &mut conn,
        set(key("c.example", "nodes"), b"n2".to_vec(), big.clone()),
    )
    .await;
    assert_eq!(
        dir.nodes("c.example", &[b"n1".to_vec()]).await.unwrap(),
        vec![b"ok".to_vec()]
    );
    assert!(matches!(
        dir.nodes("c.example", &[b"n1".to_vec(), b"n2".to_vec()])
            .await,
        Err(E::Corrupt(_))
    ));
    // An oversized value state, and one under a non-numeric epoch.
    let values = format!("{}{{kt:d.example}}:v:{}", prefix.prefix, "6c");
    run(&mut conn, set(values.clone(), b"1".to_vec(), big.clone())).await;
    assert!(matches!(
        dir.value_states("d.example", b"l").await,
        Err(E::Corrupt(_))
    ));
    let values = format!("{}{{kt:e.example}}:v:{}", prefix.prefix, "6c");
    run(&mut conn, set(values, b"one".to_vec(), b"v".to_vec())).await;
    assert!(matches!(
        dir.value_states("e.example", b"l").await,
        Err(E::Corrupt(_))
    ));
    // More versions of one label than the bound.
    let values = format!("{}{{kt:f.example}}:v:{}", prefix.prefix, "6c");
    let mut c = redis::cmd("HSET");
    c.arg(&values);
    for e in 0..=kst_redis::MAX_VALUE_STATES {
        c.arg(e).arg("v");
    }
    run(&mut conn, c).await;
    assert!(matches!(
        dir.value_states("f.example", b"l").await,
        Err(E::Corrupt(_))
    ));
    // A string where the root hash should be.
    let mut c = redis::cmd("SET");
    c.arg(key("g.example", "root")).arg("not a hash");
    run(&mut conn, c).await;
    assert!(dir.root("g.example").await.is_err());
    // A domain that would end the hash tag early, or is not normalized.
    for bad in ["a}b.example", "A.example", ""] {
        assert!(dir.root(bad).await.is_err(), "{bad:?}");
    }
}

/// The same on PostgreSQL: a record over the bound planted in each table is refused (the
/// query reads NULL instead of its bytes), and `kst migrate`'s migrations created the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_directory_refuses_oversized_records() {
    use kst_core::transparency::DirectoryStoreError as E;
    let db = TestDb::new();
    let store = kst_postgres::PostgresStore::connect(&db.url)
        .await
        .expect("store, migrated");
    let dir = store.inner().directory();
    let pool = store.inner().pool().clone();
    let big = vec![7u8; 64 * 1024 + 1];
    for (sql, domain) in [
        (
            "INSERT INTO kt_roots (domain, epoch, record) VALUES ('a.example', 1, $1)",
            "a.example",
        ),
        (
            "INSERT INTO kt_nodes (domain, key, record) VALUES ('b.example', 'n', $1)",
            "b.example",
        ),
        (
            "INSERT INTO kt_values (domain, label, epoch, record) VALUES ('c.example', 'l', 1, $1)",
            "c.example",
        ),
    ] {
        sqlx::query(sql).bind(&big).execute(&pool).await.unwrap();
        let refused = match domain {
            "a.example" => dir.root(domain).await.err(),
            "b.example" => dir.nodes(domain, &[b"n".to_vec()]).await.err(),
            _ => dir.value_states(domain, b"l").await.err(),
        };
        assert!(matches!(refused, Some(E::Corrupt(_))), "{sql}: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_directory_store_conformance() {
    let db = TestDb::new();
    let a: Arc<dyn DirectoryStore> = Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap());
    let b: Arc<dyn DirectoryStore> = Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap());
    kst_core::conformance::directory::run_all(a, b).await;
}

/// Two processes' worth of handles (two key stores, two directory stores on one fs store)
/// publish versions of one address at once through `TransparentStore`: the directory's
/// history is the store's order (`kst_core::conformance::directory::one_address_in_store_order`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_recorded_in_store_order() {
    let dir = tempfile::tempdir().unwrap();
    let stores: [Arc<dyn KeyStore>; 2] = [
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
    ];
    let dirs: [Arc<dyn DirectoryStore>; 2] = [
        Arc::new(FsDirectoryStore::new(dir.path())),
        Arc::new(FsDirectoryStore::new(dir.path())),
    ];
    kst_core::conformance::directory::one_address_in_store_order(stores, dirs).await;
}

/// The same on PostgreSQL: two store pools and two directory pools on a fresh database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_recorded_in_store_order_on_postgres() {
    let db = TestDb::new();
    let stores: [Arc<dyn KeyStore>; 2] = [
        Arc::new(PostgresStore::connect(&db.url).await.unwrap()),
        Arc::new(PostgresStore::connect(&db.url).await.unwrap()),
    ];
    let dirs: [Arc<dyn DirectoryStore>; 2] = [
        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
    ];
    // As kst-bin wires PostgreSQL: the key commits unsynced, covered by the epoch's commit.
    kst_core::conformance::directory::one_address_in_store_order_as(stores, dirs, true).await;
}

/// An epoch's addresses are read from the key store in one read where it batches reads
/// (`kst_core::conformance::directory::an_epochs_addresses_are_read_at_once`): PostgreSQL
/// (unsynced key commits, as kst-bin wires it) and Redis in one `get_many` per epoch, fs one
/// `get` per address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_epochs_addresses_are_read_from_the_store_at_once() {
    use kst_core::conformance::directory::an_epochs_addresses_are_read_at_once as case;
    let db = TestDb::new();
    case(
        Arc::new(PostgresStore::connect(&db.url).await.unwrap()),
        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()),
        true,
    )
    .await;
    let prefix = TestPrefix::new();
    let redis = RedisStore::connect(&prefix.url, &prefix.prefix)
        .await
        .expect("Redis store");
    let redis_dir: Arc<dyn DirectoryStore> = Arc::new(redis.inner().directory());
    case(Arc::new(redis), redis_dir, false).await;
    let dir = tempfile::tempdir().unwrap();
    case(
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
        Arc::new(FsDirectoryStore::new(dir.path())),
        false,
    )
    .await;
    // Red team: a store answering another address's record for the one asked.
    kst_core::conformance::directory::a_record_of_another_address_is_never_recorded(
        Arc::new(FsStore::open(dir.path()).await.unwrap()),
        Arc::new(FsDirectoryStore::new(dir.path())),
    )
    .await;
}

/// The key store (and the directory in it) of a [`Provider`], with what must outlive `kst
/// serve`.
enum Backend {
    /// `<dir>/keys`.
    Fs,
    /// A fresh database.
    Postgres(TestDb),
    /// A fresh key prefix on the shared Redis.
    Redis(TestPrefix),
    /// A fresh database reached through these `[store]` lines (other hosts, a proxy).
    PostgresAt {
        /// Kept until `kst serve` stopped.
        _db: TestDb,
        /// `url = ...` and `urls = [...]`.
        lines: String,
    },
}

impl Backend {
    /// The `[store]` section's lines for the provider in `dir`.
    fn store_lines(&self, dir: &std::path::Path) -> String {
        match self {
            Backend::Fs => format!(
                "backend = \"fs\"\npath = \"{}\"",
                dir.join("keys").display()
            ),
            Backend::Postgres(db) => format!("backend = \"postgres\"\nurl = \"{}\"", db.url),
            Backend::Redis(p) => format!(
                "backend = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"",
                p.url, p.prefix
            ),
            Backend::PostgresAt { lines, .. } => format!("backend = \"postgres\"\n{lines}"),
        }
    }
}

/// The configuration of a KST for example.net on `store`, spooling replies into `p`'s
/// Maildir, serving `[http]` on `http` (no `[transparency]`).
fn base_config(p: &std::path::Path, store: &str, http: std::net::SocketAddr, sock: &str) -> String {
    format!(
        r#"[kst]
domains = ["example.net"]
auth_source = "sasl-argv"

[store]
{store}

[mailer]
kind = "spool"
path = "{new}"

[lmtp]
listen = "unix:{sock}"

[http]
listen = "{http}"
"#,
        new = p.join("Maildir/new").display(),
        sock = p.join(sock).display(),
    )
}

/// A KST for example.net with its directory on, behind sendmail-style scripts, replying into
/// a Maildir, and `kst serve` answering the directory's HTTP endpoint.
struct Provider {
    dir: tempfile::TempDir,
    bin: PathBuf,
    head_key: String,
    /// The `_kst-log` TXT record `kst log keygen` printed.
    txt_record: String,
    log_url: String,
    serve: Option<ServeProcess>,
    // Dropped after `kst serve` stopped.
    _backend: Backend,
}

impl Provider {
    /// The provider on `backend`.
    fn start(backend: Backend) -> Provider {
        Provider::start_with(backend, "", None)
    }

    /// [`Provider::start`] with `transparency` appended to its `[transparency]` section and,
    /// with `log_keys`, that log key file instead of fresh keys (a second directory with the
    /// same keys: a fork).
    fn start_with(
        backend: Backend,
        transparency: &str,
        log_keys: Option<&std::path::Path>,
    ) -> Provider {
        Provider::start_serving(backend, transparency, log_keys, true)
    }

    /// [`Provider::start_with`], with `kst serve` (the directory's HTTP endpoint) only if
    /// `serve`.
    fn start_serving(
        backend: Backend,
        transparency: &str,
        log_keys: Option<&std::path::Path>,
        serve: bool,
    ) -> Provider {
        let bin = kst_binary();
        let dir = tempfile::Builder::new()
            .prefix("kst-transparency-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        make_maildir(&p.join("Maildir"));
        let http = free_port();
        let store = backend.store_lines(p);
        let base = base_config(p, &store, http, "lmtp.sock");
        // The insider's configuration: the same store, no directory.
        std::fs::write(p.join("no-log.toml"), &base).unwrap();
        std::fs::write(
            p.join("kst.toml"),
            format!(
                "{base}\n[transparency]\nkey_file = \"{}\"\n{transparency}\n",
                p.join("log-{domain}.key").display()
            ),
        )
        .unwrap();
        let (head_key, txt_record) = match log_keys {
            Some(file) => {
                use std::os::unix::fs::PermissionsExt;
                let to = p.join("log-example.net.key");
                std::fs::copy(file, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                let keys =
                    kst_core::transparency::LogKeys::parse(&std::fs::read_to_string(&to).unwrap())
                        .unwrap();
                let hex = |k: [u8; 32]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
                let head = hex(keys.head.public_key());
                let vrf = hex(keys.vrf.public_key().unwrap());
                let txt =
                    format!("_kst-log.example.net. IN TXT \"v=kstlog1; head={head}; vrf={vrf}\"");
                (head, txt)
            }
            None => {
                let out = Command::new(&bin)
                    .env_clear()
                    .arg("--config")
                    .arg(p.join("kst.toml"))
                    .args(["log", "keygen", "example.net", "--output"])
                    .arg(p.join("log-example.net.key"))
                    .output()
                    .unwrap();
                assert_eq!(code(&out), 0, "kst log keygen: {}", stderr(&out));
                let printed = String::from_utf8(out.stdout).unwrap();
                let head_key = printed
                    .lines()
                    .find_map(|l| l.strip_prefix("head-key "))
                    .expect("kst log keygen prints the head key")
                    .to_string();
                let txt_record = printed
                    .lines()
                    .find(|l| l.starts_with("_kst-log.example.net. IN TXT \"v=kstlog1; head="))
                    .expect("kst log keygen prints the DNS record")
                    .to_string();
                (head_key, txt_record)
            }
        };
        for (script, config) in [("sendmail", "kst.toml"), ("sendmail-no-log", "no-log.toml")] {
            write_sendmail_script(&p.join(script), &bin, &p.join(config));
        }
        let config = p.join("kst.toml");
        let serve = serve.then(|| {
            ServeProcess::start_binary(&bin, p.join("serve.log"), http, |cmd| {
                cmd.arg("--config").arg(&config);
            })
        });
        Provider {
            bin,
            head_key,
            txt_record,
            log_url: format!("http://{http}"),
            serve,
            _backend: backend,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A second KST and directory with the same keys, started from a copy of the store as it
    /// is now (`sendmail-fork`, `kst serve` at the URL returned), where a twin key for alice
    /// is published next (a fork from the next epoch on); the keyring that made the twin.
    fn fork_with_twin_alice(&self) -> (ServeProcess, String, Gpg, kst_tests::GpgKey) {
        let fork_store = self.copy_of_store("keys-fork");
        let (fork, fork_url) = self.twin_kst("fork", &fork_store);
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
        self.publish("sendmail-fork", "alice@example.net", &twin.public_armored);
        (fork, fork_url, twin_gpg, twin)
    }

    /// A copy of the fs store and its directory as they are now (`cp -a`), named `name`: a
    /// backup, or the start of a second directory with the same keys.
    fn copy_of_store(&self, name: &str) -> PathBuf {
        let copy = self.path(name);
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.path("keys"))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        copy
    }

    /// Stops `kst serve` and starts it again on the same address (the directory reopened).
    fn restart_serve(&mut self) {
        self.serve = None;
        let http: std::net::SocketAddr =
            self.log_url.trim_start_matches("http://").parse().unwrap();
        let config = self.path("kst.toml");
        self.serve = Some(ServeProcess::start_binary(
            &self.bin,
            self.path("serve-restarted.log"),
            http,
            |cmd| {
                cmd.arg("--config").arg(&config);
            },
        ));
    }

    /// With `kst serve` stopped, on fs: example.net's directory written out to the tree's
    /// files with no journal frame above them. The fs directory (journal version 3) writes
    /// its nodes, value states and heads at checkpoints only, reading the epochs since from
    /// their frames: for a test that changes those files behind kst's back, `journal/boot`
    /// is removed, so the next process to touch the domain (a `kst serve` started and
    /// stopped here) replays the frames into the files and moves the checkpoint to the root.
    fn write_out_fs_directory(&mut self) {
        assert!(self.serve.is_none(), "kst serve is stopped first");
        std::fs::remove_file(self.path("keys/kt/example.net/journal/boot")).unwrap();
        self.restart_serve();
        self.serve = None;
    }

    /// Deletes the stored heads of `epochs` of example.net's directory, behind kst's back (a
    /// directory kept from before heads were stored, a store that lost some), `kst serve`
    /// stopped.
    fn delete_heads(&mut self, epochs: &[u64]) {
        match &self._backend {
            Backend::Fs => {
                self.write_out_fs_directory();
                for epoch in epochs {
                    let file = self
                        .path("keys/kt/example.net/heads")
                        .join(format!("{epoch:020}"));
                    std::fs::remove_file(&file)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                }
            }
            Backend::Postgres(db) => {
                let list: Vec<String> = epochs.iter().map(u64::to_string).collect();
                db.execute(&format!(
                    "DELETE FROM kt_heads WHERE domain = 'example.net' AND epoch IN ({})",
                    list.join(", ")
                ));
            }
            _ => panic!("delete_heads: fs and PostgreSQL only"),
        }
    }

    /// Another KST with the same directory keys on the fs store at `store` (a restored
    /// backup, or a second directory: a fork), replying into the same Maildir, with its own
    /// sendmail script `sendmail-NAME` and `kst serve`; returns the serve process and its URL.
    /// A stale replica: a second `kst serve` (with its HTTP URL) on a copy of the store as it
    /// is now, which the provider's later changes do not reach.
    fn stale_twin(&self) -> (ServeProcess, String) {
        let old_store = self.copy_of_store("keys-old");
        self.twin_kst("old", &old_store)
    }

    /// The client's `--log-url` and `--log-key` for this provider's directory.
    /// Alice's address gets 70 versions, more than one history page of 64: an insider
    /// publishes another key (version 2), then the operator restores versions 3 to 70 as
    /// copies of version `copy` (1: alice's key, 2: the insider's) by `kst export` and `kst
    /// import`. The insider's key.
    fn seventy_versions_of_alice(&self, copy: usize) -> kst_tests::GpgKey {
        let twin = Gpg::new().generate("Alice", "alice@example.net", "ed25519");
        let file = self.path("insider.asc");
        std::fs::write(&file, &twin.public_armored).unwrap();
        let (out, v) = self.client_in(
            "insider",
            "sendmail",
            "alice@example.net",
            &["publish", "--key", file.to_str().unwrap()],
        );
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
        let out = self.kst(&["export"]);
        assert_eq!(code(&out), 0, "kst export: {}", stderr(&out));
        let mut line: Value = serde_json::from_slice(&out.stdout).unwrap();
        let history = line["history"].as_array().cloned().unwrap();
        assert_eq!(history.len(), 2, "{line}");
        let mut records = history.clone();
        for n in 3..=70u64 {
            let mut r = history[copy - 1].clone();
            r["version"] = n.into();
            r["publication_id"] = format!("{n:032x}").into();
            r["published_at"] = (r["published_at"].as_u64().unwrap() + n).into();
            records.push(r);
        }
        line["history"] = records.into();
        let export = self.path("history.jsonl");
        std::fs::write(&export, format!("{line}\n")).unwrap();
        let out = self.kst(&["import", export.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "kst import: {}", stderr(&out));
        twin
    }

    fn log_args(&self) -> [&str; 4] {
        [
            "--log-url",
            self.log_url.as_str(),
            "--log-key",
            self.head_key.as_str(),
        ]
    }

    fn twin_kst(&self, name: &str, store: &std::path::Path) -> (ServeProcess, String) {
        let p = self.dir.path();
        let http = free_port();
        let config = p.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "{}\n[transparency]\nkey_file = \"{}\"\n",
                base_config(
                    p,
                    &format!("backend = \"fs\"\npath = \"{}\"", store.display()),
                    http,
                    &format!("lmtp-{name}.sock")
                ),
                p.join("log-{domain}.key").display()
            ),
        )
        .unwrap();
        write_sendmail_script(&p.join(format!("sendmail-{name}")), &self.bin, &config);
        let serve = ServeProcess::start_binary(
            &self.bin,
            p.join(format!("serve-{name}.log")),
            http,
            |cmd| {
                cmd.arg("--config").arg(&config);
            },
        );
        (serve, format!("http://{http}"))
    }

    /// `retrieve ADDRESS --check-transparency` as `account` with `extra` flags (the log URL,
    /// the head key, a resolver), the request handed to `sendmail`.
    fn checked_as(
        &self,
        sendmail: &str,
        account: &str,
        address: &str,
        extra: &[&str],
    ) -> (Output, Value) {
        let mut args = vec!["retrieve", address, "--check-transparency"];
        args.extend_from_slice(extra);
        self.client(sendmail, account, &args)
    }

    /// A key for each of `names` (`NAME@example.net`) published through `sendmail`.
    fn publish_new(&self, gpg: &Gpg, sendmail: &str, names: &[&str]) {
        for who in names {
            let address = format!("{who}@example.net");
            let k = gpg.generate(who, &address, "ed25519");
            self.publish(sendmail, &address, &k.public_armored);
        }
    }

    /// `account`'s checked retrieval of alice's key through `sendmail`, against the directory
    /// at `url`, is refused as an attack (exit 5) saying `why`.
    fn refused_as_attack(&self, sendmail: &str, account: &str, url: &str, why: &str) {
        let (out, v) = self.checked_as(
            sendmail,
            account,
            "alice@example.net",
            &["--log-url", url, "--log-key", &self.head_key],
        );
        assert_eq!(
            (code(&out), v["outcome"].as_str()),
            (5, Some("attack")),
            "{v}\n{}",
            stderr(&out)
        );
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{error}");
    }

    /// `account`'s version 3 retrieval of alice's key through `sendmail` with the head key
    /// given and no resolver, and `extra` flags.
    fn v3_alice(&self, sendmail: &str, account: &str, extra: &[&str]) -> (Output, Value) {
        let mut args = vec![
            "retrieve",
            "alice@example.net",
            "--transparency",
            "--log-key",
            &self.head_key,
            "--resolver",
            NO_RESOLVER,
        ];
        args.extend_from_slice(extra);
        self.client(sendmail, account, &args)
    }

    /// What `account`'s client remembers about example.net's directory.
    fn memory(&self, account: &str) -> Value {
        let path = self.path(&format!("state-{account}/transparency/example.net.json"));
        serde_json::from_slice(&std::fs::read(&path).unwrap_or_default()).unwrap_or(Value::Null)
    }

    /// The remembered epoch of `account`'s client.
    fn remembered_epoch(&self, account: &str) -> Option<u64> {
        self.memory(account)["head"].as_str().map(|h| {
            kst_core::transparency::answer::parse_head(h)
                .unwrap()
                .head
                .epoch
        })
    }

    /// The evidence files `account`'s client kept.
    fn evidence(&self, account: &str) -> Vec<PathBuf> {
        std::fs::read_dir(self.path(&format!("state-{account}/transparency/evidence")))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// The provider on the fs store with alice's key published; the keyring that made it.
    fn with_alice() -> (Provider, Gpg, kst_tests::GpgKey) {
        let provider = Provider::start(Backend::Fs);
        let gpg = Gpg::new();
        let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
        provider.publish("sendmail", "alice@example.net", &alice.public_armored);
        (provider, gpg, alice)
    }

    /// [`Provider::with_alice`] and alice's public key in the file `alice.asc`.
    fn with_alice_key_file() -> (Provider, Gpg, kst_tests::GpgKey, PathBuf) {
        let (provider, gpg, alice) = Provider::with_alice();
        let file = provider.path("alice.asc");
        std::fs::write(&file, &alice.public_armored).unwrap();
        (provider, gpg, alice, file)
    }

    /// The operator's `kst --config kst.toml ARGS` (the directory on).
    fn kst(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .env_clear()
            .arg("--config")
            .arg(self.path("kst.toml"))
            .args(args)
            .output()
            .unwrap()
    }

    /// The operator's `kst log keygen DOMAIN [--force] --output log-DOMAIN.key` (the key
    /// file `[transparency] key_file` names); must succeed. Its output (the public record).
    fn log_keygen(&self, domain: &str, force: bool) -> Output {
        let key_file = self.path(&format!("log-{domain}.key"));
        let mut args = vec!["log", "keygen", domain];
        if force {
            args.push("--force");
        }
        args.extend(["--output", key_file.to_str().unwrap()]);
        let out = self.kst(&args);
        assert_eq!(code(&out), 0, "kst log keygen: {}", stderr(&out));
        out
    }

    /// `kst client --account ACCOUNT --json ... ARGS`, requests handed to `sendmail`.
    fn client(&self, sendmail: &str, account: &str, args: &[&str]) -> (Output, Value) {
        self.client_in(account, sendmail, account, args)
    }

    /// [`Provider::client`] with the client state `state-STATE` (another machine's client).
    fn client_in(
        &self,
        state: &str,
        sendmail: &str,
        account: &str,
        args: &[&str],
    ) -> (Output, Value) {
        self.client_waiting(state, 30, sendmail, account, args)
    }

    /// [`Provider::client_in`] waiting at most `timeout` seconds for the reply (a client that
    /// saw only a forged reply waits for the genuine one until then).
    fn client_waiting(
        &self,
        state: &str,
        timeout: u32,
        sendmail: &str,
        account: &str,
        args: &[&str],
    ) -> (Output, Value) {
        std::fs::write(self.path("no-client.toml"), "").unwrap();
        let mut cmd = Command::new(&self.bin);
        let timeout = timeout.to_string();
        cmd.args([
            "client",
            "--account",
            account,
            "--json",
            "--timeout",
            &timeout,
        ])
        .arg("--sendmail")
        .arg(self.path(sendmail))
        .arg("--maildir")
        .arg(self.path("Maildir"))
        .arg("--state-file")
        .arg(self.path(&format!("state-{state}/pending.json")))
        .arg("--client-config")
        .arg(self.path("no-client.toml"))
        .args(args)
        .env_remove("KST_PASSWORD")
        .env_remove("KST_CLIENT_CONFIG")
        .env("GNUPGHOME", self.path("no-gnupg"));
        run_json(cmd)
    }

    fn publish(&self, sendmail: &str, account: &str, armored: &str) {
        let file = self.path("publish.asc");
        std::fs::write(&file, armored).unwrap();
        let (out, v) = self.client(
            sendmail,
            account,
            &["publish", "--key", file.to_str().unwrap()],
        );
        assert_eq!(
            (code(&out), v["outcome"].as_str()),
            (0, Some("published")),
            "{v}\n{}",
            stderr(&out)
        );
    }

    /// `account`'s owner's monitor: `status --key KEY --check-transparency` against the
    /// directory.
    fn status_of(&self, account: &str, key: &std::path::Path) -> (Output, Value) {
        self.client(
            "sendmail",
            account,
            &[
                "status",
                "--key",
                key.to_str().unwrap(),
                "--check-transparency",
                "--log-url",
                &self.log_url,
                "--log-key",
                &self.head_key,
            ],
        )
    }

    /// Bob's `retrieve ADDRESS --check-transparency` with the head key `head_key`.
    fn checked_retrieve(&self, address: &str, head_key: &str) -> (Output, Value) {
        self.client(
            "sendmail",
            "bob@example.net",
            &[
                "retrieve",
                address,
                "--check-transparency",
                "--log-url",
                &self.log_url,
                "--log-key",
                head_key,
            ],
        )
    }

    fn http_get(&self, path: &str) -> (u16, String) {
        self.http("GET", path, "")
    }

    /// `METHOD path` with `body` to the log's listener; the status and the body.
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let addr = self.log_url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut text = String::new();
        // A server that refuses a large body may close before reading it all.
        let _ = s.read_to_string(&mut text);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }
}

#[test]
fn retrieval_is_checked_against_the_directory() {
    checked_retrievals(&Provider::start(Backend::Fs));
}

#[test]
fn retrieval_is_checked_against_the_directory_on_postgres() {
    checked_retrievals(&Provider::start(Backend::Postgres(TestDb::new())));
}

#[test]
fn retrieval_is_checked_against_the_directory_on_redis() {
    checked_retrievals(&Provider::start(Backend::Redis(TestPrefix::new())));
}

/// `url` with its `host:port` replaced by `authority`.
fn with_authority(url: &str, authority: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, after) = match rest.split_once('@') {
        Some((u, a)) => (format!("{u}@"), a),
        None => (String::new(), rest),
    };
    let path = after.find(['/', '?']).map_or("", |i| &after[i..]);
    format!("{scheme}://{userinfo}{authority}{path}")
}

/// A TCP proxy to PostgreSQL on `listen`, started when PostgreSQL is to "come back".
fn start_proxy(listen: std::net::SocketAddr, to: String) {
    let listener = std::net::TcpListener::bind(listen).expect("the proxy's port is still free");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

/// `kst serve` starts while PostgreSQL is down (two hosts: one that never answers, one whose
/// port is closed), serves the directory's endpoint with 503 meanwhile, and a publication is
/// a temporary failure; once the second host answers, everything works, written to that
/// host (the one that accepts writes) and the directory opened by the first request.
#[test]
fn serve_starts_while_postgres_is_down_and_the_directory_opens_later() {
    let db = TestDb::new();
    let real_authority = {
        let rest = db.url.split_once("://").unwrap().1;
        let after = rest.rsplit_once('@').map_or(rest, |(_, a)| a);
        after[..after.find(['/', '?']).unwrap_or(after.len())].to_string()
    };
    let proxy = free_port();
    let dead = free_port();
    let lines = format!(
        "url = \"{}\"\nurls = [\"{}\"]",
        with_authority(&db.url, &dead.to_string()),
        with_authority(&db.url, &proxy.to_string())
    );
    let provider = Provider::start(Backend::PostgresAt { _db: db, lines });

    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    assert_eq!(status, 503, "the directory cannot be read yet: {body}");
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let file = provider.path("early.asc");
    std::fs::write(&file, &alice.public_armored).unwrap();
    let (out, v) = provider.client(
        "sendmail",
        "alice@example.net",
        &["publish", "--key", file.to_str().unwrap()],
    );
    assert_ne!(
        v["outcome"].as_str(),
        Some("published"),
        "nothing can be published while the database is down: {v}"
    );
    assert_ne!(code(&out), 0, "{v}\n{}", stderr(&out));

    start_proxy(proxy, real_authority);
    checked_retrievals(&provider);
    let log = provider.serve.as_ref().expect("kst serve runs").log();
    assert!(
        log.contains("cannot be read now"),
        "kst serve said the directory was not readable at start:\n{log}"
    );
}

#[test]
fn with_authority_replaces_host_and_port_only() {
    assert_eq!(
        with_authority("postgres://u:p@127.0.0.1:5432/db?x=1", "h:1"),
        "postgres://u:p@h:1/db?x=1"
    );
    assert_eq!(
        with_authority("postgres://a:1/db", "b:2"),
        "postgres://b:2/db"
    );
}

/// The scenario of the module docs against `provider`.
fn checked_retrievals(provider: &Provider) {
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);

    // The endpoint: keys, a signed head, and 404 for a domain it does not serve.
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/keys");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("head-key {}", provider.head_key)),
        "{body}"
    );
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    assert_eq!(status, 200, "{body}");
    let head = kst_core::transparency::answer::parse_head(&body).expect("the head parses");
    assert_eq!(head.head.epoch, 1, "one publication, one epoch: {body}");
    head.verify(&kst_core::transparency::answer::hex32(&provider.head_key).unwrap())
        .expect("the head is signed by the printed head key");
    let (status, _) = provider.http_get("/.well-known/kst/log/example.org/head");
    assert_eq!(status, 404);

    // Bob retrieves alice's key: the HMAC verifies, and so does the directory's proof.
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "found", "{v}");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());

    // An address without a key: an authenticated "not found", and the directory proves the
    // address was never in it.
    let (out, v) = provider.checked_retrieve("nobody@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}\n{}",
        stderr(&out)
    );

    // A head key that is not the domain's: the head's signature fails, exit 5.
    let wrong = "11".repeat(32);
    let (out, v) = provider.checked_retrieve("alice@example.net", &wrong);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (5, Some("attack")),
        "{v}\n{}",
        stderr(&out)
    );

    // Alice's key replaced in the store behind the directory's back: the KST serves the
    // twin with a valid HMAC, which the plain retrieval accepts; the check refuses it.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    assert_eq!(
        (code(&out), v["fingerprint"].as_str()),
        (0, Some(twin.fingerprint.as_str())),
        "without the check the twin passes: {v}\n{}",
        stderr(&out)
    );
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (5, Some("attack")),
        "{v}\n{}",
        stderr(&out)
    );
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not the one the directory commits to"),
        "{error}"
    );

    // Alice publishes her key again through kst: recorded, and the check passes again.
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());

    // Alice deletes her key: "not found" is confirmed by the directory's deletion entry.
    let (out, v) = provider.client("sendmail", "alice@example.net", &["delete"]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}\n{}",
        stderr(&out)
    );
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "{v}\n{}",
        stderr(&out)
    );
    let (_, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    let head = kst_core::transparency::answer::parse_head(&body).unwrap();
    // The twin is in the history too: it was recorded (before her republication, in the
    // store's order) when alice republished, so the owner's monitor sees the change she did
    // not make.
    assert_eq!(
        head.head.epoch, 4,
        "alice's publication, the twin, her republication and her deletion: {body}"
    );
}

/// `kst log ...` with no kst configuration (a witness or an auditor is a third party).
fn kst_log(bin: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin)
        .env_clear()
        .arg("log")
        .args(args)
        .output()
        .unwrap()
}

/// A witness: its key file, public key and state directory.
struct Witness {
    dir: tempfile::TempDir,
    public: String,
}

impl Witness {
    fn new(bin: &std::path::Path) -> Witness {
        let dir = tempfile::Builder::new()
            .prefix("kst-witness-")
            .tempdir()
            .unwrap();
        let key = dir.path().join("witness.key");
        let out = kst_log(
            bin,
            &[
                "witness",
                "keygen",
                "--name",
                "w1",
                "--output",
                key.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&out), 0, "kst log witness keygen: {}", stderr(&out));
        let printed = String::from_utf8(out.stdout).unwrap();
        let public = printed
            .lines()
            .find_map(|l| l.strip_prefix("witness-key "))
            .expect("keygen prints the witness key")
            .to_string();
        assert!(
            printed.contains(&format!("witnesses = [\"w1:{public}\"]")),
            "keygen prints the configuration entry: {printed}"
        );
        Witness { dir, public }
    }

    fn entry(&self) -> String {
        format!("w1:{}", self.public)
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// One round of `kst log witness run --submit` against `url` with `head_key`.
    fn run(&self, bin: &std::path::Path, url: &str, head_key: &str) -> Output {
        kst_log(
            bin,
            &[
                "witness",
                "run",
                "--log-url",
                url,
                "--domain",
                "example.net",
                "--log-key",
                head_key,
                "--key",
                self.dir.path().join("witness.key").to_str().unwrap(),
                "--state",
                self.state().to_str().unwrap(),
                "--once",
                "--submit",
            ],
        )
    }

    /// The fork evidence files in the state directory.
    fn evidence(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("fork-"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `kst log audit URL --once` with its state in `state`.
fn audit(bin: &std::path::Path, url: &str, head_key: &str, state: &std::path::Path) -> Output {
    kst_log(
        bin,
        &[
            "audit",
            url,
            "--domain",
            "example.net",
            "--log-key",
            head_key,
            "--state",
            state.to_str().unwrap(),
            "--once",
        ],
    )
}

impl Provider {
    /// Bob's checked retrieval of `address` requiring the witnesses `witness` (flags added).
    fn witnessed_retrieve(&self, address: &str, extra: &[&str]) -> (Output, Value) {
        let mut args = vec![
            "retrieve",
            address,
            "--check-transparency",
            "--log-url",
            self.log_url.as_str(),
            "--log-key",
            self.head_key.as_str(),
        ];
        args.extend_from_slice(extra);
        self.client("sendmail", "bob@example.net", &args)
    }

    fn http_post(&self, path: &str, body: &str) -> (u16, String) {
        self.http("POST", path, body)
    }

    /// A witness, the provider on the fs store listing it in `[transparency] witnesses`, and
    /// alice's key published there (epoch 1) with the keyring that made it.
    fn with_witness_and_alice(
        bin: &std::path::Path,
    ) -> (Witness, Provider, Gpg, kst_tests::GpgKey) {
        Self::with_witness_and_alice_and(bin, "")
    }

    /// [`Self::with_witness_and_alice`] with `more` in `[transparency]`.
    fn with_witness_and_alice_and(
        bin: &std::path::Path,
        more: &str,
    ) -> (Witness, Provider, Gpg, kst_tests::GpgKey) {
        let witness = Witness::new(bin);
        let provider = Provider::start_with(
            Backend::Fs,
            &format!("witnesses = [\"{}\"]\n{more}", witness.entry()),
            None,
        );
        let gpg = Gpg::new();
        let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
        provider.publish("sendmail", "alice@example.net", &alice.public_armored);
        (witness, provider, gpg, alice)
    }
}

fn outcome(out: &Output, v: &Value) -> (i32, Option<String>) {
    (code(out), v["outcome"].as_str().map(str::to_string))
}

/// A witness cosigns the KST's heads over several epochs (checking the append-only proof
/// each time), the KST serves its cosignatures, a client requiring the witness accepts the
/// cosigned answers (also for an epoch newer than the cosigned one, through the append-only
/// proof in the answer) and exits 5 without the cosignature, with an unknown witness, or with
/// a cosignature older than it allows; an auditor follows the heads from epoch 0.
#[test]
fn a_witness_cosigns_the_heads_and_a_client_requires_it() {
    let bin = kst_binary();
    let (witness, provider, gpg, alice) = Provider::with_witness_and_alice(&bin);
    let require = ["--witness", &witness.entry()];

    // Nothing cosigned yet: the client requiring the witness refuses.
    let (out, v) = provider.witnessed_retrieve("alice@example.net", &require);
    assert_eq!(
        outcome(&out, &v),
        (5, Some("attack".into())),
        "{v}\n{}",
        stderr(&out)
    );
    assert!(
        v["error"].as_str().unwrap_or_default().contains("witness"),
        "{v}"
    );

    // The witness's first round takes the head on trust and cosigns it.
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness: {}", stderr(&out));
    assert!(witness.state().join("example.net.head").exists());
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    assert_eq!(status, 200, "{body}");
    let (head, cosignatures) =
        kst_core::transparency::witness::parse_head_with_cosignatures(&body).unwrap();
    assert_eq!(head.head.epoch, 1, "{body}");
    assert_eq!(
        cosignatures.len(),
        1,
        "the head carries the cosignature: {body}"
    );
    cosignatures[0].verify(&head).unwrap();

    let (out, v) = provider.witnessed_retrieve("alice@example.net", &require);
    assert_eq!(code(&out), 0, "cosigned: {v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());

    // Another witness the client requires did not cosign: refused; with a threshold of one
    // of the two, accepted.
    let other = format!("w2:{}", "22".repeat(32));
    let (out, v) = provider.witnessed_retrieve(
        "alice@example.net",
        &["--witness", &witness.entry(), "--witness", &other],
    );
    assert_eq!(outcome(&out, &v), (5, Some("attack".into())), "{v}");
    let (out, v) = provider.witnessed_retrieve(
        "alice@example.net",
        &[
            "--witness",
            &witness.entry(),
            "--witness",
            &other,
            "--witness-threshold",
            "1",
        ],
    );
    assert_eq!(code(&out), 0, "one of two: {v}\n{}", stderr(&out));

    // Two more epochs: the answer's head (epoch 3) is newer than the cosigned one (1); the
    // answer carries the append-only proof from 1 to 3 and the client accepts it.
    let carol = gpg.generate("Carol", "carol@example.net", "ed25519");
    provider.publish("sendmail", "carol@example.net", &carol.public_armored);
    let dave = gpg.generate("Dave", "dave@example.net", "ed25519");
    provider.publish("sendmail", "dave@example.net", &dave.public_armored);
    let (out, v) = provider.witnessed_retrieve("carol@example.net", &require);
    assert_eq!(
        code(&out),
        0,
        "epoch 3 through the proof from 1: {v}\n{}",
        stderr(&out)
    );
    // An address never published: the absence proof, witnessed the same way.
    let (out, v) = provider.witnessed_retrieve("nobody@example.net", &require);
    assert_eq!(
        outcome(&out, &v),
        (1, Some("not-found".into())),
        "{v}\n{}",
        stderr(&out)
    );

    // The same inside a mail reply (protocol version 3): the request asks for the witnesses'
    // part (`KST-Log-Witnessed: 1`) and the client checks it as it checks the HTTP answer.
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &[
            "retrieve",
            "carol@example.net",
            "--transparency",
            "--log-key",
            &provider.head_key,
            "--witness",
            &witness.entry(),
        ],
    );
    assert_eq!(code(&out), 0, "version 3, witnessed: {v}\n{}", stderr(&out));
    let reply = newest_reply(&provider);
    assert!(reply.contains("kst-log-answer-v2"), "{reply}");
    assert!(reply.contains("\r\ncosigned 1 "), "{reply}");

    // Figures for docs/TRANSPARENCY.md (printed, not asserted).
    let (_, v1) = provider.http_get("/.well-known/kst/log/example.net/lookup/carol@example.net");
    let (_, v2) =
        provider.http_get("/.well-known/kst/log/example.net/lookup/carol@example.net?witnessed=1");
    eprintln!(
        "figure: lookup answer {} bytes; with the witnesses' part over epochs 1 to 3: {} bytes",
        v1.len(),
        v2.len()
    );

    // The witness's second round checks the proof from 1 to 3 and cosigns epoch 3.
    let started = std::time::Instant::now();
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    eprintln!(
        "figure: a witness round over epochs 1 to 3 (process start to exit): {:?}",
        started.elapsed()
    );
    assert_eq!(code(&out), 0, "witness, second round: {}", stderr(&out));
    let (_, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    let (head, cosignatures) =
        kst_core::transparency::witness::parse_head_with_cosignatures(&body).unwrap();
    assert_eq!((head.head.epoch, cosignatures.len()), (3, 1), "{body}");
    // Older heads keep theirs.
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/head/1");
    assert_eq!(status, 200);
    assert!(body.contains("\ncosignature "), "{body}");
    let (status, _) = provider.http_get("/.well-known/kst/log/example.net/head/9");
    assert_eq!(status, 404);

    // A cosignature older than the client allows is refused.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (out, v) = provider.witnessed_retrieve(
        "alice@example.net",
        &["--witness", &witness.entry(), "--witness-max-age", "0"],
    );
    assert_eq!(outcome(&out, &v), (5, Some("attack".into())), "{v}");

    // An auditor follows the heads from epoch 0, then from what it remembers.
    let audit_state = witness.dir.path().join("audit");
    let out = audit(&bin, &provider.log_url, &provider.head_key, &audit_state);
    assert_eq!(code(&out), 0, "audit: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("epoch 3"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = audit(&bin, &provider.log_url, &provider.head_key, &audit_state);
    assert_eq!(code(&out), 0, "audit again: {}", stderr(&out));

    // The endpoint's refusals: a witness the log does not list (403), a cosignature of a
    // head the log did not store (409), a malformed body and a range too long (400).
    let stranger = Witness::new(&bin);
    let out = stranger.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 75, "unlisted witness: {}", stderr(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    let signer = kst_core::transparency::HeadSigner::generate();
    let mut forged = head.clone();
    forged.head.signed_at += 1;
    let text = kst_core::transparency::witness::head_with_cosignatures_text(
        &forged,
        &[signer.cosign(&forged, 1).unwrap()],
    )
    .unwrap();
    let (status, _) = provider.http_post("/.well-known/kst/log/example.net/cosignature", &text);
    assert_eq!(status, 403, "a witness not listed");
    // The listed witness cosigning a head the log did not store for that epoch (another
    // signing time): 409, nothing stored.
    let key_text = std::fs::read_to_string(witness.dir.path().join("witness.key")).unwrap();
    let seed = kst_core::transparency::answer::hex32(
        key_text
            .lines()
            .find_map(|l| l.strip_prefix("witness-key: "))
            .unwrap(),
    )
    .unwrap();
    let listed = kst_core::transparency::HeadSigner::from_bytes(&seed);
    let text = kst_core::transparency::witness::head_with_cosignatures_text(
        &forged,
        &[listed.cosign(&forged, 1).unwrap()],
    )
    .unwrap();
    let (status, _) = provider.http_post("/.well-known/kst/log/example.net/cosignature", &text);
    assert_eq!(status, 409, "a head the log did not store");
    let (status, _) = provider.http_post("/.well-known/kst/log/example.net/cosignature", "junk");
    assert_eq!(status, 400);
    let (status, _) = provider.http_post(
        "/.well-known/kst/log/example.net/cosignature",
        &"x".repeat(64 * 1024),
    );
    assert_eq!(status, 413, "a body over the bound");
    let (status, _) = provider.http_get("/.well-known/kst/log/example.net/audit?from=0&to=5000");
    assert_eq!(status, 400);
    let (status, _) = provider.http_get("/.well-known/kst/log/example.net/audit?from=3&to=1");
    assert_eq!(status, 400);
    let (status, _) = provider.http_get("/.well-known/kst/log/example.net/audit?from=0");
    assert_eq!(status, 400);
    let (status, body) = provider.http_get("/.well-known/kst/log/example.net/audit?from=0&to=3");
    assert_eq!(status, 200, "{body}");
    let answer = kst_core::transparency::witness::AuditAnswer::parse(&body).unwrap();
    assert_eq!(answer.heads.len(), 4);
    eprintln!(
        "figure: audit answer over epochs 0 to 3: {} bytes ({} of them the proof, base64)",
        body.len(),
        body.lines().last().map_or(0, str::len)
    );
}

/// Epochs without a stored head (issue 18's head gaps: a directory kept from before heads were
/// stored, a store that lost some): a witness cosigned epoch 1, then the heads of epochs 0, 2
/// and 3 are deleted from the store and `kst serve` restarts. `kst log audit` from epoch 0
/// passes, the witness checks the audit across the gap and cosigns epoch 4, and the heads
/// signed late name the roots the deleted ones named.
fn heads_missing_in_the_middle_are_signed_late(backend: Backend) {
    let bin = kst_binary();
    let witness = Witness::new(&bin);
    let mut provider = Provider::start_with(
        backend,
        &format!("witnesses = [\"{}\"]", witness.entry()),
        None,
    );
    let gpg = Gpg::new();
    provider.publish_new(&gpg, "sendmail", &["alice"]);
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness at epoch 1: {}", stderr(&out));
    provider.publish_new(&gpg, "sendmail", &["carol", "dave", "erin"]);
    let root_of = |provider: &Provider, epoch: u64| {
        let (status, body) =
            provider.http_get(&format!("/.well-known/kst/log/example.net/head/{epoch}"));
        assert_eq!(status, 200, "head {epoch}: {body}");
        let (head, _) =
            kst_core::transparency::witness::parse_head_with_cosignatures(&body).unwrap();
        head.head.root_hash
    };
    let before: Vec<[u8; 32]> = (0..=4).map(|e| root_of(&provider, e)).collect();
    // Epochs after the latest, up to the largest number, have no head: 404, on every store
    // (PostgreSQL's epochs are `BIGINT`: past `i64::MAX` the look-up of a stored head was
    // "unavailable", a 503 and a warning, for an anonymous request).
    for epoch in [
        "5",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
    ] {
        let (status, body) =
            provider.http_get(&format!("/.well-known/kst/log/example.net/head/{epoch}"));
        assert_eq!(status, 404, "head {epoch}: {body}");
    }

    provider.serve = None;
    provider.delete_heads(&[0, 2, 3]);
    provider.restart_serve();

    let audit_state = witness.dir.path().join("audit");
    let out = audit(&bin, &provider.log_url, &provider.head_key, &audit_state);
    assert_eq!(
        code(&out),
        0,
        "audit from epoch 0 over the gap: {}",
        stderr(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("epoch 4"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness across the gap: {}", stderr(&out));
    let (_, body) = provider.http_get("/.well-known/kst/log/example.net/head");
    let (head, cosignatures) =
        kst_core::transparency::witness::parse_head_with_cosignatures(&body).unwrap();
    assert_eq!((head.head.epoch, cosignatures.len()), (4, 1), "{body}");
    let after: Vec<[u8; 32]> = (0..=4).map(|e| root_of(&provider, e)).collect();
    assert_eq!(
        after, before,
        "the heads signed late name the epochs' roots"
    );
}

#[test]
fn heads_missing_in_the_middle_are_signed_late_on_fs() {
    heads_missing_in_the_middle_are_signed_late(Backend::Fs);
}

#[test]
fn heads_missing_in_the_middle_are_signed_late_on_postgres() {
    heads_missing_in_the_middle_are_signed_late(Backend::Postgres(TestDb::new()));
}

/// `kst serve` stopped (SIGTERM) right after it started on an fs directory missing heads (its
/// background backfill signs them late, each a temporary file linked to its name) returns
/// from `main`, which waits for the directory's thread after the runtime as it does for a
/// one-shot command (`kst_core::transparency::wait_for_log_threads`): it exits at once, not
/// after the 10 s that wait gives up at (no log outlives the runtime), leaving no journal
/// frame after the root and no temporary file; started again, it serves every head.
#[test]
fn serve_stops_at_once_and_leaves_its_fs_directory_whole() {
    let mut provider = Provider::start(Backend::Fs);
    let gpg = Gpg::new();
    provider.publish_new(&gpg, "sendmail", &["alice", "carol", "dave", "erin"]);
    provider.serve = None;
    provider.delete_heads(&[0, 1, 2, 3]);
    provider.restart_serve();
    let serve = provider.serve.take().expect("kst serve runs");
    let stopping = std::time::Instant::now();
    let code = serve.stop();
    let took = stopping.elapsed();
    assert_eq!(code, 0, "kst serve's exit code");
    assert!(
        took < std::time::Duration::from_secs(8),
        "kst serve took {took:?} to exit: a key directory's thread outlived it"
    );
    let dir = provider.path("keys/kt/example.net");
    let root = std::fs::read(dir.join("root.v3")).unwrap();
    let epoch = u64::from_be_bytes(root[..8].try_into().unwrap());
    assert_eq!(epoch, 4, "the stored root's epoch");
    // The slot of the epoch after the root (kst-fs `journal.rs`: `KSTJ2\n` ‖ length (8) ‖
    // expected epoch (8) ‖ epoch (8) ‖ ...) starts no frame of that epoch.
    let slot = std::fs::read(
        dir.join("journal")
            .join(format!("slot-{:03}", (epoch + 1) % 128)),
    )
    .unwrap_or_default();
    assert!(
        !(slot.starts_with(b"KSTJ2\n") && slot.get(22..30) == Some(&(epoch + 1).to_be_bytes()[..])),
        "a journal frame after the root"
    );
    for place in [dir.clone(), dir.join("heads"), dir.join("journal")] {
        for entry in std::fs::read_dir(&place).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with(".tmp-"),
                "{} left in {}",
                name.to_string_lossy(),
                place.display()
            );
        }
    }
    provider.restart_serve();
    for e in 0..=4 {
        let (status, body) =
            provider.http_get(&format!("/.well-known/kst/log/example.net/head/{e}"));
        assert_eq!(status, 200, "head {e}: {body}");
    }
}

/// An fs store's key directory as an older release left it, for `kst migrate` to upgrade.
#[derive(Debug, Clone, Copy)]
enum OlderLayout {
    /// The release before the root moved (journal version 3): the root in
    /// `kt/<domain>/root`, no `root.v3`, the epochs above the checkpoint in the journal's
    /// frames only.
    V3BeforeTheMove,
    /// A kst from before the journal: the root in `root`, the tree's files holding every
    /// epoch, no `journal/`.
    BeforeTheJournal,
}

/// The domains [`migrate_moves_every_root_an_older_release_left`] logs: example.net holds
/// addresses, example.org none (its directory holds akd's first root alone).
const MIGRATED_DOMAINS: [&str; 2] = ["example.net", "example.org"];

/// How every kst before the root moved read a domain's root (the reader kst-fs keeps as
/// `root::tests::older_kst_reads_root`: `kt/<domain>/root` as epoch (8 bytes, big-endian) ‖
/// record; a missing file is no root, a shorter one or one over 64 KiB is refused): the
/// epoch, or `Err` where it refuses the domain (`Corrupt`, "is truncated").
fn older_kst_reads_root(dir: &std::path::Path) -> Result<Option<u64>, String> {
    let bytes = match std::fs::read(dir.join("root")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if bytes.len() > 64 * 1024 {
        return Err("larger than 64 KiB".into());
    }
    let (epoch, _) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("truncated: {} bytes", bytes.len()))?;
    Ok(Some(u64::from_be_bytes(*epoch)))
}

impl Provider {
    /// The directory of `domain` in the fs store.
    fn kt(&self, domain: &str) -> PathBuf {
        self.path("keys/kt").join(domain)
    }

    /// A second served domain, example.org, with its log (its keys made), and `kst serve`
    /// restarted on it: its directory holds akd's first root.
    fn log_example_org(&mut self) {
        let code_of_serve = self.serve.take().expect("kst serve runs").stop();
        assert_eq!(code_of_serve, 0, "kst serve's exit code");
        let config = self.path("kst.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "domains = [\"example.net\"]",
            "domains = [\"example.net\", \"example.org\"]",
        );
        std::fs::write(&config, text).unwrap();
        self.log_keygen("example.org", false);
        self.restart_serve();
        let (status, body) = self.http_get("/.well-known/kst/log/example.org/head");
        assert_eq!(status, 200, "{body}");
    }

    /// With `kst serve` stopped: every logged domain's directory put back as a kst of
    /// `layout` left it.
    fn as_an_older_release_left_it(&mut self, layout: OlderLayout) {
        assert!(self.serve.is_none(), "kst serve is stopped first");
        if let OlderLayout::BeforeTheJournal = layout {
            // Every epoch written out to the tree's files (the checkpoint at the root).
            for domain in MIGRATED_DOMAINS {
                let boot = self.kt(domain).join("journal/boot");
                std::fs::remove_file(&boot).unwrap_or_else(|e| panic!("{}: {e}", boot.display()));
            }
            self.restart_serve();
            let code = self.serve.take().expect("kst serve runs").stop();
            assert_eq!(code, 0, "kst serve's exit code");
        }
        for domain in MIGRATED_DOMAINS {
            let dir = self.kt(domain);
            assert_eq!(std::fs::read(dir.join("root")).unwrap(), b"KSTR3\n");
            std::fs::rename(dir.join("root.v3"), dir.join("root")).unwrap();
            if let OlderLayout::BeforeTheJournal = layout {
                let journal = dir.join("journal");
                let checkpoint = std::fs::read(journal.join("checkpoint")).unwrap();
                let root = std::fs::read(dir.join("root")).unwrap();
                assert_eq!(
                    checkpoint[checkpoint.len() - 8..],
                    root[..8],
                    "{domain}: the tree's files hold every epoch (the checkpoint at the root)"
                );
                std::fs::remove_dir_all(&journal).unwrap();
            }
        }
    }

    /// What `kst migrate` leaves of each logged domain's directory that matters to a reader:
    /// `root`, `root.v3`, the journal's checkpoint and boot files, and the names of the
    /// temporary files there (none).
    fn migrated_state(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut state = Vec::new();
        for domain in MIGRATED_DOMAINS {
            let dir = self.kt(domain);
            for file in ["root", "root.v3", "journal/checkpoint", "journal/boot"] {
                state.push((
                    format!("{domain}/{file}"),
                    std::fs::read(dir.join(file)).ok(),
                ));
            }
            for place in [dir.clone(), dir.join("journal"), dir.join("heads")] {
                for entry in std::fs::read_dir(&place).unwrap() {
                    let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                    if name.starts_with(".tmp-") {
                        state.push((format!("{} left in {}", name, place.display()), None));
                    }
                }
            }
        }
        state
    }

    /// `kst migrate`: exit 0, and it checked `addresses` addresses and recorded none.
    fn migrate_recording_nothing(&self, addresses: usize) {
        let out = self.kst(&["migrate"]);
        assert_eq!(code(&out), 0, "kst migrate: {}", stderr(&out));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains(&format!(
                "key directory: {addresses} address(es) checked, 0 recorded"
            )),
            "{printed}\n{}",
            stderr(&out)
        );
    }

    /// With `kst serve` stopped: `keys/kt` replaced by a copy of `from`.
    fn restore_kt(&self, from: &std::path::Path) {
        let kt = self.path("keys/kt");
        std::fs::remove_dir_all(&kt).unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(&kt)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// What a client is answered about example.net and example.org: the signed heads of every
/// epoch (epoch, root hash, signature), the newest heads, and the look-up answers of
/// `addresses`.
fn answers(provider: &Provider, last: u64, addresses: &[&str]) -> Vec<(String, u16, String)> {
    let mut paths: Vec<String> = (0..=last)
        .map(|e| format!("/.well-known/kst/log/example.net/head/{e}"))
        .collect();
    paths.push("/.well-known/kst/log/example.net/head".into());
    paths.push("/.well-known/kst/log/example.org/head".into());
    paths.push("/.well-known/kst/log/example.org/head/0".into());
    for address in addresses {
        paths.push(format!("/.well-known/kst/log/example.net/lookup/{address}"));
    }
    paths
        .into_iter()
        .map(|path| {
            let (status, body) = provider.http_get(&path);
            assert_eq!(status, 200, "{path}: {body}");
            (path, status, body)
        })
        .collect()
}

/// The upgrade of an fs store an older release left (`layout`), as docs/OPERATIONS.md says
/// to do it: the pool stopped, the new release's `kst migrate`, then `kst serve`. Two
/// logged domains, one holding addresses, one only akd's first root. `kst migrate` moves
/// every logged domain's root to `root.v3` (the marker in `root`: the older releases' reader
/// refuses the domain), records nothing (nothing is missing), and leaves the same files when
/// run again, and when run again after it was killed part-way (`SIGKILL` at points spread
/// over its run, and a move cut between its copy and its marker with a temporary file left).
/// `kst serve` then answers what it answered before: the same head for every epoch (epoch,
/// root hash, signature), the same look-up answers, and a client that remembered the newest
/// head checks its retrieval against it.
fn migrate_moves_every_root_an_older_release_left(layout: OlderLayout) {
    let mut provider = Provider::start(Backend::Fs);
    provider.log_example_org();
    let config = provider.path("kst.toml");
    let gpg = Gpg::new();
    let names = ["alice", "carol", "dave"];
    provider.publish_new(&gpg, "sendmail", &names);
    let addresses: Vec<String> = names.iter().map(|n| format!("{n}@example.net")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let last = names.len() as u64;
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch("bob@example.net"), Some(last));
    let before = answers(&provider, last, &addresses);

    let code_of_serve = provider.serve.take().expect("kst serve runs").stop();
    assert_eq!(code_of_serve, 0, "kst serve's exit code");
    provider.as_an_older_release_left_it(layout);
    let older_roots: Vec<Vec<u8>> = MIGRATED_DOMAINS
        .iter()
        .map(|d| std::fs::read(provider.kt(d).join("root")).unwrap())
        .collect();
    for (domain, epoch) in MIGRATED_DOMAINS.iter().zip([last, 0]) {
        assert_eq!(
            older_kst_reads_root(&provider.kt(domain)),
            Ok(Some(epoch)),
            "{layout:?}: {domain}, as the older release left it"
        );
        assert!(!provider.kt(domain).join("root.v3").exists());
    }
    let older = provider.path("kt-older");
    let status = Command::new("cp")
        .arg("-a")
        .arg(provider.path("keys/kt"))
        .arg(&older)
        .status()
        .unwrap();
    assert!(status.success());

    let started = std::time::Instant::now();
    provider.migrate_recording_nothing(addresses.len());
    let took = started.elapsed();
    let migrated = provider.migrated_state();
    for (domain, older_root) in MIGRATED_DOMAINS.iter().zip(&older_roots) {
        let dir = provider.kt(domain);
        assert_eq!(
            std::fs::read(dir.join("root")).unwrap(),
            b"KSTR3\n",
            "{layout:?}: {domain}'s root moved"
        );
        assert_eq!(
            &std::fs::read(dir.join("root.v3")).unwrap(),
            older_root,
            "{layout:?}: {domain}'s root.v3 is the root the older release left"
        );
        let refused = older_kst_reads_root(&dir);
        assert!(refused.is_err(), "{layout:?}: {domain}: {refused:?}");
        assert!(
            dir.join("journal/checkpoint").is_file(),
            "{layout:?}: {domain}"
        );
    }
    assert!(
        migrated.iter().all(|(name, _)| !name.contains(".tmp-")),
        "{migrated:?}"
    );
    // Run again: nothing changes.
    provider.migrate_recording_nothing(addresses.len());
    assert_eq!(provider.migrated_state(), migrated, "{layout:?}: run twice");
    // Killed part-way, then run again: the same.
    for tenth in [1, 3, 5, 7, 9] {
        provider.restore_kt(&older);
        let mut child = Command::new(&provider.bin)
            .env_clear()
            .arg("--config")
            .arg(&config)
            .arg("migrate")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(took * tenth / 10);
        let _ = child.kill();
        child.wait().unwrap();
        // Where the kill landed (reported, not asserted: it depends on the machine's pace).
        let moved: Vec<bool> = MIGRATED_DOMAINS
            .iter()
            .map(|d| older_kst_reads_root(&provider.kt(d)).is_err())
            .collect();
        eprintln!("{layout:?}: killed after {tenth}/10 of {took:?}: roots moved {moved:?}");
        provider.migrate_recording_nothing(addresses.len());
        assert_eq!(
            provider.migrated_state(),
            migrated,
            "{layout:?}: killed after {tenth}/10 of a run, then run again"
        );
    }
    // A move cut between its copy to root.v3 and its marker (an older kst could still
    // commit meanwhile: `root` is the truth until the marker), with its temporary file left
    // in the other domain.
    provider.restore_kt(&older);
    let net = provider.kt("example.net");
    let mut stale = older_roots[0].clone();
    stale[7] = stale[7].wrapping_sub(1);
    std::fs::write(net.join("root.v3"), &stale).unwrap();
    std::fs::write(
        provider.kt("example.org").join(".tmp-00000000deadbeef"),
        &older_roots[1][..5],
    )
    .unwrap();
    provider.migrate_recording_nothing(addresses.len());
    assert_eq!(
        provider.migrated_state(),
        migrated,
        "{layout:?}: a move cut before its marker, then run again"
    );

    provider.restart_serve();
    assert_eq!(
        answers(&provider, last, &addresses),
        before,
        "{layout:?}: what kst serve answers after the upgrade"
    );
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "found", "{v}");
    assert_eq!(provider.remembered_epoch("bob@example.net"), Some(last));
    for domain in MIGRATED_DOMAINS {
        let refused = older_kst_reads_root(&provider.kt(domain));
        assert!(
            refused.is_err(),
            "{layout:?}: {domain} after kst serve: {refused:?}"
        );
    }
}

#[test]
fn migrate_moves_every_root_of_a_store_of_journal_version_3_before_the_move() {
    migrate_moves_every_root_an_older_release_left(OlderLayout::V3BeforeTheMove);
}

#[test]
fn migrate_moves_every_root_of_a_store_from_before_the_journal() {
    migrate_moves_every_root_an_older_release_left(OlderLayout::BeforeTheJournal);
}

/// `kst migrate` fails (exit 69, naming the domain) when a logged domain's directory cannot
/// be read, also one without an address (here example.org's root cut short). Before, only
/// the recording of addresses read a directory: `kst migrate` said it was done while that
/// domain's directory was neither read nor, on a store an older release left, upgraded. One
/// whose head does not check against the log's keys says that, not that it cannot be read.
#[test]
fn migrate_fails_on_a_logged_domain_whose_directory_cannot_be_read() {
    let mut provider = Provider::start(Backend::Fs);
    provider.log_example_org();
    provider.publish_new(&Gpg::new(), "sendmail", &["alice"]);
    let code_of_serve = provider.serve.take().expect("kst serve runs").stop();
    assert_eq!(code_of_serve, 0, "kst serve's exit code");
    let root_v3 = provider.kt("example.org").join("root.v3");
    let root = std::fs::read(&root_v3).unwrap();
    std::fs::write(&root_v3, b"cut").unwrap();
    let out = provider.kst(&["migrate"]);
    let error = stderr(&out);
    assert_eq!(code(&out), 69, "kst migrate: {error}");
    assert!(
        error.contains("example.org") && error.contains("root.v3 is truncated"),
        "{error}"
    );
    // An operator command's error, not a delivery's (review of wt-fs, L2).
    assert!(!error.contains("stays queued"), "{error}");
    // Review L2: a directory that reads but whose head is of other keys (example.org's log
    // re-keyed, its old directory left in place) says so, not that it "cannot be read".
    std::fs::write(&root_v3, root).unwrap();
    provider.log_keygen("example.org", true);
    let out = provider.kst(&["migrate"]);
    let error = stderr(&out);
    assert_eq!(code(&out), 69, "kst migrate: {error}");
    assert!(
        error.contains("example.org")
            && error.contains("is not signed by this log's keys")
            && !error.contains("cannot be read"),
        "{error}"
    );
}

/// A second directory with the same keys (a provider showing one party another history:
/// here alice's key differs at epoch 1) is a fork: the witness that cosigned the first
/// refuses to cosign the second (exit 5, both heads kept as evidence), and so does an
/// auditor that followed the first; a client requiring the witness refuses the second
/// directory's answers.
#[test]
fn a_forked_directory_is_refused_by_the_witness_and_the_auditor() {
    let bin = kst_binary();
    let witness = Witness::new(&bin);
    let config = format!("witnesses = [\"{}\"]", witness.entry());
    let honest = Provider::start_with(Backend::Fs, &config, None);
    let fork = Provider::start_with(
        Backend::Fs,
        &config,
        Some(&honest.path("log-example.net.key")),
    );
    assert_eq!(honest.head_key, fork.head_key);
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    honest.publish("sendmail", "alice@example.net", &alice.public_armored);
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    fork.publish("sendmail", "alice@example.net", &twin.public_armored);

    let out = witness.run(&bin, &honest.log_url, &honest.head_key);
    assert_eq!(code(&out), 0, "witness on the honest log: {}", stderr(&out));
    let audit_state = witness.dir.path().join("audit");
    let out = audit(&bin, &honest.log_url, &honest.head_key, &audit_state);
    assert_eq!(code(&out), 0, "audit of the honest log: {}", stderr(&out));

    // Same epoch, another root.
    let out = witness.run(&bin, &fork.log_url, &fork.head_key);
    assert_eq!(code(&out), 5, "witness on the fork: {}", stderr(&out));
    assert!(stderr(&out).contains("fork"), "{}", stderr(&out));
    let evidence = witness.evidence();
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    let text = std::fs::read_to_string(&evidence[0]).unwrap();
    assert_eq!(
        text.matches("kst-log-head-v1").count(),
        2,
        "both heads: {text}"
    );
    let out = audit(&bin, &fork.log_url, &fork.head_key, &audit_state);
    assert_eq!(code(&out), 5, "audit of the fork: {}", stderr(&out));

    // The fork moves on: its audit answer from epoch 1 does not start at the honest root.
    let bob = gpg.generate("Bob", "bob@example.net", "ed25519");
    fork.publish("sendmail", "bob@example.net", &bob.public_armored);
    let out = witness.run(&bin, &fork.log_url, &fork.head_key);
    assert_eq!(
        code(&out),
        5,
        "witness on the fork at epoch 2: {}",
        stderr(&out)
    );
    let out = audit(&bin, &fork.log_url, &fork.head_key, &audit_state);
    assert_eq!(
        code(&out),
        5,
        "audit of the fork at epoch 2: {}",
        stderr(&out)
    );

    // The witness's state still holds the honest head: the honest log is still cosigned.
    let out = witness.run(&bin, &honest.log_url, &honest.head_key);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // A client requiring the witness: the honest answer passes, the fork's (never cosigned)
    // does not.
    let require = ["--witness", &witness.entry()];
    let (out, v) = honest.witnessed_retrieve("alice@example.net", &require);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = fork.witnessed_retrieve("alice@example.net", &require);
    assert_eq!(outcome(&out, &v), (5, Some("attack".into())), "{v}");
}

/// rt18 (finding 1): a head the client refuses is never remembered. A second directory with
/// the same keys (a provider's split view) that no witness cosigned answers a client that has
/// no memory of the domain yet and requires the witness: refused (exit 5). Before the fix the
/// client remembered the fork's head anyway (the memory was saved before the witness check),
/// so the honest, witnessed directory then looked like the fork to it (exit 5 "fork or
/// rollback"): the victim was locked onto the forged history. Now nothing is remembered and
/// the honest answer passes.
#[test]
fn rt18_a_head_refused_for_its_witnesses_is_never_remembered() {
    let bin = kst_binary();
    let (witness, provider, gpg, alice) = Provider::with_witness_and_alice(&bin);
    // The fork: a copy of the store at epoch 1, then a twin key for alice (its epoch 2).
    let (_fork, fork_url, _twin_gpg, _twin) = provider.fork_with_twin_alice();
    // The honest side's epoch 2, cosigned.
    let carol = gpg.generate("Carol", "carol@example.net", "ed25519");
    provider.publish("sendmail", "carol@example.net", &carol.public_armored);
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness: {}", stderr(&out));

    let dave = "dave@example.net";
    let entry = witness.entry();
    let require = ["--witness", entry.as_str()];
    let mut fork_args = vec![
        "--log-url",
        fork_url.as_str(),
        "--log-key",
        &provider.head_key,
    ];
    fork_args.extend_from_slice(&require);
    let (out, v) = provider.checked_as("sendmail-fork", dave, "alice@example.net", &fork_args);
    assert_eq!(outcome(&out, &v), (5, Some("attack".into())), "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("witness"),
        "{v}"
    );
    assert_eq!(
        provider.remembered_epoch(dave),
        None,
        "the refused head is not remembered"
    );

    let mut honest_args = vec![
        "--log-url",
        provider.log_url.as_str(),
        "--log-key",
        &provider.head_key,
    ];
    honest_args.extend_from_slice(&require);
    let (out, v) = provider.checked_as("sendmail", dave, "alice@example.net", &honest_args);
    assert_eq!(
        code(&out),
        0,
        "the honest directory passes: {v}\n{}",
        stderr(&out)
    );
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(provider.remembered_epoch(dave), Some(2));
}

/// On `[web]` the log's routes are under `[web.limits]`: the per-client counter WKD and VKS
/// use answers 429 past its budget.
#[test]
fn log_routes_are_rate_limited_on_web() {
    let web = free_port();
    let provider = Provider::start_with(
        Backend::Fs,
        &format!("\n[web]\nlisten = \"{web}\"\n\n[web.limits]\nper_client = 3\n"),
        None,
    );
    let url = format!("http://{web}");
    let web_provider = Provider {
        log_url: url,
        ..provider
    };
    // `kst serve` answered on [http]; wait for [web] too (a connection is no request).
    for _ in 0..100 {
        if std::net::TcpStream::connect(web).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let statuses: Vec<u16> = [
        "/.well-known/kst/log/example.net/head",
        "/.well-known/kst/log/example.net/keys",
        "/.well-known/kst/log/example.net/lookup/alice@example.net",
        "/.well-known/kst/log/example.net/head",
        "/.well-known/kst/log/example.net/audit?from=0&to=0",
    ]
    .iter()
    .map(|path| web_provider.http_get(path).0)
    .collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429], "{statuses:?}");
}

/// Red team (round 7): a look-up holds room in the web limits' counters' queue for its miss
/// from its admission until it ends (`server::web::coalesce`), and a key directory look-up
/// that waits for a turn among the expensive requests (a history, `?since=`, `?witnessed=1`:
/// four at once, a wait of up to five seconds) held it all that wait. Ten clients keeping 60
/// history requests each in flight (the per-client connection cap is 64) filled the queue's
/// bound (1,024 hits, 512 look-ups' rooms) with requests that only waited, and every look-up
/// of the listener, WKD, VKS and HKP alike, was answered 503. A waiting request now gives its
/// room back until its turn comes: the others' look-ups are answered.
#[test]
fn requests_waiting_for_an_expensive_turn_do_not_fill_the_counters_queue() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    let web = free_port();
    let provider = Provider::start_with(
        Backend::Fs,
        &format!(
            "\n[web]\nlisten = \"{web}\"\nmax_connections = 4096\n\n[web.limits]\nper_client = 0\n"
        ),
        None,
    );
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    for _ in 0..100 {
        if std::net::TcpStream::connect(web).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    /// Opens a connection from `from` to `at`.
    async fn connect(from: Ipv4Addr, at: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
        socket.connect(at).await.unwrap()
    }
    /// One request on a kept-alive connection: its status (0 when the connection ended).
    async fn exchange(s: &mut tokio::io::BufReader<tokio::net::TcpStream>, path: &str) -> u16 {
        let head = format!("GET {path} HTTP/1.1\r\nHost: example.net\r\n\r\n");
        if s.get_mut().write_all(head.as_bytes()).await.is_err() {
            return 0;
        }
        let mut status = 0;
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match s.read_line(&mut line).await {
                Ok(0) | Err(_) => return 0,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(code) = l.strip_prefix("HTTP/1.1 ") {
                status = code.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            } else if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if s.read_exact(&mut body).await.is_err() {
            return 0;
        }
        status
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let history = "/.well-known/kst/log/example.net/history/alice@example.net";
    let probes = rt.block_on(async {
        let mut attackers = Vec::new();
        for client in 0..10u8 {
            for _ in 0..60 {
                let (stop, answered, refused) = (stop.clone(), answered.clone(), refused.clone());
                attackers.push(tokio::spawn(async move {
                    let from = Ipv4Addr::new(127, 0, 0, 10 + client);
                    while !stop.load(Ordering::Relaxed) {
                        let mut s = tokio::io::BufReader::new(connect(from, web).await);
                        while !stop.load(Ordering::Relaxed) {
                            match exchange(&mut s, history).await {
                                0 => break,
                                200 => answered.fetch_add(1, Ordering::Relaxed),
                                _ => refused.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    }
                }));
            }
        }
        // The flood under way: another client's look-ups, one at a time.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let mut probes = Vec::new();
        for _ in 0..20 {
            let mut s =
                tokio::io::BufReader::new(connect(Ipv4Addr::new(127, 0, 0, 200), web).await);
            probes.push(exchange(&mut s, "/vks/v1/by-email/alice%40example.net").await);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for a in attackers {
            a.abort();
        }
        probes
    });
    let (answered, refused) = (
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    eprintln!("the flood: {answered} histories answered, {refused} refused; probes {probes:?}");
    assert!(
        answered > 100,
        "the flood's histories were answered: {answered}"
    );
    assert_eq!(
        probes,
        vec![200; 20],
        "another client's look-ups during the flood ({answered} histories answered, {refused} \
         refused)"
    );
}

/// The client's memory of heads (issue 18): bob's client remembers the newest head it
/// verified and asks `?since=` on the next look-up; two retrievals across new epochs pass
/// (one of them three epochs on). A KST restored from a backup (an older epoch) and a second
/// directory with the same keys (a fork: another history from epoch 2 on, serving a twin key
/// for alice with a valid proof of its own) are both caught, exit 5, the evidence kept and
/// the remembered head left as it was.
#[test]
fn the_client_remembers_heads_and_catches_a_rollback_and_a_fork() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let key = provider.head_key.clone();
    let honest = [
        "--log-url",
        provider.log_url.as_str(),
        "--log-key",
        key.as_str(),
    ];

    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &honest);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    assert_eq!(provider.memory(bob)["head_key"], key.as_str());
    assert_eq!(provider.memory(bob)["pinned_from"], "--log-key");

    // A backup of the store and its directory at epoch 1.
    let backup = provider.copy_of_store("keys-backup");

    // A second directory with the same keys: alice's key at epoch 1 (the same root as the
    // honest one), then a twin key for alice at epoch 2, and more epochs.
    let (_fork, fork_url, twin_gpg, twin) = provider.fork_with_twin_alice();

    // New epochs on the honest side: one, then three at once.
    let carol = gpg.generate("Carol", "carol@example.net", "ed25519");
    provider.publish("sendmail", "carol@example.net", &carol.public_armored);
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &honest);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    provider.publish_new(&gpg, "sendmail", &["dave", "erin", "frank"]);
    let (out, v) = provider.checked_as("sendmail", bob, "carol@example.net", &honest);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(5));
    assert!(provider.evidence(bob).is_empty());

    // The KST restored from the backup answers at epoch 1: a rollback.
    let (_restored, restored_url) = provider.twin_kst("restored", &backup);
    provider.refused_as_attack("sendmail", bob, &restored_url, "older than the remembered");
    assert_eq!(provider.remembered_epoch(bob), Some(5), "not rolled back");
    assert_eq!(provider.evidence(bob).len(), 1);

    // The fork: its KST serves the twin with a valid HMAC and its directory proves the twin
    // against its own head of the same key; bob's remembered head says otherwise.
    provider.publish_new(
        &twin_gpg,
        "sendmail-fork",
        &["gina", "hank", "ivan", "jack"],
    );
    provider.refused_as_attack("sendmail-fork", bob, &fork_url, "fork or rollback");
    assert_eq!(provider.remembered_epoch(bob), Some(5));
    assert_eq!(provider.evidence(bob).len(), 2);
    let evidence = std::fs::read_to_string(&provider.evidence(bob)[0]).unwrap();
    assert!(evidence.contains("kst-log-answer-v1"), "{evidence}");

    // A client that never saw the honest directory accepts the fork: the memory is what
    // catches it (and witnesses, later, for first contact).
    let (out, v) = provider.checked_as(
        "sendmail-fork",
        "carol@example.net",
        "alice@example.net",
        &["--log-url", &fork_url, "--log-key", &key],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], twin.fingerprint.as_str());

    // The honest directory still passes for bob, and a bad since= is refused by the server.
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &honest);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (status, _) =
        provider.http_get("/.well-known/kst/log/example.net/lookup/alice@example.net?since=x");
    assert_eq!(status, 400);
    let (status, body) =
        provider.http_get("/.well-known/kst/log/example.net/lookup/alice@example.net?since=99");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("append-only"), "{body}");
}

/// The owner's monitor (issue 18): alice's `status --check-transparency` lists every version
/// the directory recorded for her address. An insider (a second `kst deliver` configuration
/// with the same `[transparency]` key, publishing for alice without alice's client) puts a
/// key in the store and the directory, then puts alice's key back: what is served now is
/// alice's key again, but `status` reports the insider's version, exit 6.
#[test]
fn the_owner_sees_a_key_an_insider_published() {
    let (provider, _gpg, alice, alice_key) = Provider::with_alice_key_file();
    let (_insider, _) = provider.twin_kst("insider", &provider.path("keys"));
    let status = |provider: &Provider| provider.status_of("alice@example.net", &alice_key);
    let (out, v) = status(&provider);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "match", "{v}");
    let versions = v["directory"].as_array().cloned().unwrap_or_default();
    assert_eq!(versions.len(), 1, "{v}");
    assert_eq!(versions[0]["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(versions[0]["yours"], true);

    // The insider publishes a twin for alice, then alice's own key again, from another
    // machine (another client state: alice's client never sees these requests).
    let (_twin_gpg, twin) = insider_publishes_a_twin_then(&provider, &alice);
    let (out, v) = status(&provider);
    let seen = mismatch_listing(&out, &v, &alice, "fingerprint");
    assert_eq!(
        seen,
        vec![
            (alice.fingerprint.clone(), true),
            (twin.fingerprint.clone(), false),
            (alice.fingerprint.clone(), true),
        ],
        "{v}"
    );
    let differences = v["differences"].to_string();
    assert!(
        differences.contains(&twin.fingerprint) && differences.contains("not a key you published"),
        "{differences}"
    );
}

/// The insider's KST (`twin_kst("insider", ...)`, running) publishes a twin key for alice,
/// then `alice`'s own key again, from another machine's client; the twin and its keyring.
fn insider_publishes_a_twin_then(
    provider: &Provider,
    alice: &kst_tests::GpgKey,
) -> (Gpg, kst_tests::GpgKey) {
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    for armored in [&twin.public_armored, &alice.public_armored] {
        let file = provider.path("insider.asc");
        std::fs::write(&file, armored).unwrap();
        let (out, v) = provider.client_in(
            "insider",
            "sendmail-insider",
            "alice@example.net",
            &["publish", "--key", file.to_str().unwrap()],
        );
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    }
    (twin_gpg, twin)
}

/// The owner's monitor's answer is a mismatch (exit 6) while alice's key is served; each
/// listed version's `field` and whether it is hers, newest first.
fn mismatch_listing(
    out: &Output,
    v: &Value,
    alice: &kst_tests::GpgKey,
    field: &str,
) -> Vec<(String, bool)> {
    assert_eq!(
        (code(out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "{v}\n{}",
        stderr(out)
    );
    assert_eq!(v["served"]["fingerprint"], alice.fingerprint.as_str());
    let versions = v["directory"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .map(|x| {
            (
                x[field].as_str().unwrap_or_default().to_string(),
                x["yours"].as_bool().unwrap_or(true),
            )
        })
        .collect()
}

/// Red team (issue 18), through the real store: an insider publishes a twin key for alice
/// and then alice's key again (versions 2 and 3), and overwrites the twin version's value in
/// the fs store with akd's tombstone, so the history shows it withdrawn, as a deletion would
/// leave it. No deletion follows it: the owner's monitor reports it, exit 6, and the history
/// proof still verifies (the tree cannot check a withdrawn value). The rule is the kst-bin
/// unit test `rt18_a_withdrawn_value_without_a_later_deletion_is_not_yours`; this is the real
/// path: `kst serve` reads the planted record and the client judges what it is shown.
#[test]
fn rt18_a_withdrawn_value_planted_in_the_store_is_reported() {
    let (mut provider, _gpg, alice, alice_key) = Provider::with_alice_key_file();
    let (insider, _) = provider.twin_kst("insider", &provider.path("keys"));
    insider_publishes_a_twin_then(&provider, &alice);
    drop(insider);
    provider.serve = None;
    provider.write_out_fs_directory();
    // The twin's value (version 2) overwritten with the tombstone, behind kst's back.
    let values = provider.path("keys/kt/example.net/values");
    let mut planted = 0;
    for label in std::fs::read_dir(&values).unwrap().flatten() {
        for state in std::fs::read_dir(label.path()).unwrap().flatten() {
            let blob = std::fs::read(state.path()).unwrap();
            if let Some(withdrawn) =
                kst_core::conformance::directory::withdrawn_value_state(&blob, 2)
            {
                std::fs::write(state.path(), withdrawn).unwrap();
                planted += 1;
            }
        }
    }
    assert_eq!(planted, 1, "one value state of version 2 (the twin's)");
    provider.restart_serve();

    let (out, v) = provider.status_of("alice@example.net", &alice_key);
    let seen = mismatch_listing(&out, &v, &alice, "state");
    assert_eq!(
        seen,
        vec![
            ("published".to_string(), true),
            ("withdrawn".to_string(), false),
            ("published".to_string(), true),
        ],
        "{v}"
    );
    let differences = v["differences"].to_string();
    assert!(
        differences.contains("withdrawn value") && differences.contains("no deletion after it"),
        "{differences}"
    );
}

/// The owner's monitor sees a deletion the owner did not ask for (issue 18): alice's client
/// notes each deletion it asked for and the KST confirmed; her own deletion is hers, but one an
/// insider makes with the operator's `kst keys delete` (recorded in the directory like any
/// deletion) is reported, exit 6, although nothing is served, as after her own deletion.
#[test]
fn rt18_the_owner_sees_a_deletion_an_insider_made() {
    let (provider, _gpg, alice, alice_key) = Provider::with_alice_key_file();
    let status = || provider.status_of("alice@example.net", &alice_key);
    let deletions = |v: &Value| -> Vec<bool> {
        v["directory"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|x| x["state"] == "deleted")
            .map(|x| x["yours"].as_bool().unwrap_or(true))
            .collect()
    };

    // Alice published, deletes and publishes again, all from her client: all hers.
    let (out, v) = provider.client("sendmail", "alice@example.net", &["delete"]);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (0, Some("deleted")),
        "{v}\n{}",
        stderr(&out)
    );
    let (out, v) = status();
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (1, Some("not-found")),
        "her own deletion: nothing served, nothing foreign: {v}\n{}",
        stderr(&out)
    );
    assert_eq!(deletions(&v), vec![true], "{v}");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    let (out, v) = status();
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["outcome"], "match", "{v}");

    // The insider deletes her key with the operator's tool.
    let out = provider.kst(&["keys", "delete", "alice@example.net"]);
    assert_eq!(code(&out), 0, "kst keys delete: {}", stderr(&out));
    let (out, v) = status();
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "the insider's deletion is reported: {v}\n{}",
        stderr(&out)
    );
    // Newest first: the insider's, then hers.
    assert_eq!(deletions(&v), vec![false, true], "{v}");
    let differences = v["differences"].to_string();
    assert!(
        differences.contains("not a deletion you asked for"),
        "{differences}"
    );
}

/// A back-dated deletion (issue 18, ktfair): a deletion's time (`changed_at`) is the KST's
/// claim. Alice asked for a deletion two hours ago that the KST confirmed but never recorded
/// (her client noted it); an insider now deletes her key behind her back (the store without
/// the directory, then the directory written directly, as a second writer would) and dates
/// the deletion into the window of hers. Before the fix the monitor took it as hers (exit 1,
/// nothing served, nothing foreign). Now it checks each deletion's time against the heads
/// around the epoch that recorded it (signed with their commits, after her window): the
/// deletion is back-dated, not hers, exit 6.
#[test]
fn rt18_a_back_dated_deletion_is_not_the_owners() {
    let (provider, _gpg, _alice, alice_key) = Provider::with_alice_key_file();
    let now = kst_core::time::unix_now();
    // Her client's note of the deletion the KST confirmed two hours ago.
    let memory = provider.path("state-alice@example.net/transparency");
    std::fs::create_dir_all(&memory).unwrap();
    std::fs::write(
        memory.join("own-alice-at-example.net.deletions"),
        format!(
            "[{{\"requested_at\": {}, \"confirmed_at\": {}}}]",
            now - 7205,
            now - 7195
        ),
    )
    .unwrap();

    // The insider: the key goes from the store (no directory), then a deletion dated in her
    // window goes into the directory.
    let out = Command::new(&provider.bin)
        .env_clear()
        .arg("--config")
        .arg(provider.path("no-log.toml"))
        .args(["keys", "delete", "alice@example.net"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "kst keys delete: {}", stderr(&out));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let keys = kst_core::transparency::LogKeys::parse(
            &std::fs::read_to_string(provider.path("log-example.net.key")).unwrap(),
        )
        .unwrap();
        let log = kst_core::transparency::DomainLog::open(
            std::sync::Arc::new(kst_fs::FsDirectoryStore::new(provider.path("keys"))),
            keys,
        )
        .await
        .unwrap();
        let alice = kst_core::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        log.sync(&alice, None, now - 7200).await.unwrap();
    });

    let (out, v) = provider.status_of("alice@example.net", &alice_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "the back-dated deletion is reported: {v}\n{}",
        stderr(&out)
    );
    let deletion = v["directory"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|x| x["state"] == "deleted")
        .expect("the deletion is listed");
    assert_eq!(deletion["yours"], false, "{v}");
    assert!(
        deletion["misdated"].to_string().contains("back-dated"),
        "{deletion}"
    );
    assert!(
        v["differences"].to_string().contains("not the KST's clock"),
        "{v}"
    );
}

/// The owner's monitor checks every version, not only the newest 64: alice's address gets
/// 70 versions (her key, an insider's twin at version 2, then her key again, restored with
/// the operator's `kst import`, which the directory records one epoch per version). `status`
/// follows the history's pages (`?before=<version>`) down to version 1, lists all 70 and
/// reports the twin, exit 6.
#[test]
fn the_owner_checks_more_than_64_versions() {
    let (provider, _gpg, _alice, alice_key) = Provider::with_alice_key_file();
    // Version 2: an insider's key; versions 3 to 70: alice's key again, restored by the operator.
    let twin = provider.seventy_versions_of_alice(1);

    // The endpoint's pages and refusals.
    let (status, body) =
        provider.http_get("/.well-known/kst/log/example.net/history/alice@example.net?before=7");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("kst-log-history-page-v1\n"), "{body}");
    for bad in ["before=1", "before=x", "before=7&x=1", "other=3"] {
        let (status, body) = provider.http_get(&format!(
            "/.well-known/kst/log/example.net/history/alice@example.net?{bad}"
        ));
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let (out, v) = provider.status_of("alice@example.net", &alice_key);
    assert_eq!(
        (code(&out), v["outcome"].as_str()),
        (6, Some("mismatch")),
        "{v}\n{}",
        stderr(&out)
    );
    let versions = v["directory"].as_array().cloned().unwrap_or_default();
    let numbers: Vec<u64> = versions
        .iter()
        .filter_map(|x| x["version"].as_u64())
        .collect();
    assert_eq!(
        numbers,
        (1..=70).rev().collect::<Vec<_>>(),
        "every version, newest first"
    );
    let foreign: Vec<u64> = versions
        .iter()
        .filter(|x| x["yours"] == false)
        .filter_map(|x| x["version"].as_u64())
        .collect();
    assert_eq!(foreign, vec![2], "{v}");
    assert!(
        v["differences"].to_string().contains(&twin.fingerprint),
        "{}",
        v["differences"]
    );
}

/// Head-key discovery through the signed test DNS (scripts/testdns.sh, docs/TESTDNS.md; run
/// under `flock -o /work/team/dns.lock`, needs root for BIND): the `_kst-log.example.net` TXT
/// record exactly as `kst log keygen` printed it, DNSSEC-validated (`--require-dnssec`), is
/// pinned on first use; a different key in DNS afterwards is exit 5 until the user pins again
/// with `kst client log-pin`; a forged (bogus) record is exit 5.
/// The signed test DNS (scripts/testdns.sh): its validating resolver's address, the forged
/// one's, and the trust anchor.
fn test_dns() -> (String, String, String) {
    let port = |var: &str, default: u16| {
        std::env::var(var)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(default)
    };
    let main = format!("127.0.0.1:{}", port("KST_DNS_PORT", 5300));
    let forged = format!("127.0.0.1:{}", port("KST_DNS_FORGED_PORT", 5302));
    let anchor = PathBuf::from(std::env::var("KST_DNS_DIR").unwrap_or("/tmp/kst-dns".into()))
        .join("anchors/root.key");
    (main, forged, anchor.to_str().unwrap().to_string())
}

/// `scripts/testdns.sh up` with `record` as the extra line of example.net's zone (kept in
/// `extra`, a directory of the test's own).
fn test_dns_up(extra: &std::path::Path, record: &str) {
    std::fs::create_dir_all(extra).unwrap();
    std::fs::write(extra.join("example.net"), format!("{record}\n")).unwrap();
    let out = Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/testdns.sh"))
        .arg("up")
        .env("KST_DNS_EXTRA_DIR", extra)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "scripts/testdns.sh up: {}", stderr(&out));
}

#[test]
fn the_head_key_is_found_in_dns_and_pinned() {
    let _turn = kst_tests::test_dns_turn();
    let (provider, _gpg, _alice) = Provider::with_alice();
    let (main, forged, anchor_arg) = test_dns();
    let extra = provider.path("dns-extra");
    let dns_up = |record: &str| test_dns_up(&extra, record);
    let bob = "bob@example.net";
    let via = |resolver: &str| -> Vec<String> {
        [
            "--log-url",
            provider.log_url.as_str(),
            "--resolver",
            resolver,
            "--dns-anchor",
            anchor_arg.as_str(),
            "--require-dnssec",
        ]
        .map(String::from)
        .to_vec()
    };
    let retrieve = |account: &str, resolver: &str| {
        let args = via(resolver);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        provider.checked_as("sendmail", account, "alice@example.net", &args)
    };
    let log_pin = |extra: &[&str]| {
        let args = via(&main);
        let mut all = vec!["log-pin", "example.net"];
        all.extend(args[2..].iter().map(String::as_str));
        all.extend_from_slice(extra);
        provider.client("sendmail", bob, &all)
    };

    dns_up(&provider.txt_record);
    let (out, v) = retrieve(bob, &main);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let memory = provider.memory(bob);
    assert_eq!(memory["head_key"], provider.head_key.as_str(), "{memory}");
    assert_eq!(memory["pinned_from"], "dns (dnssec secure)", "{memory}");
    assert!(
        provider
            .txt_record
            .contains(memory["vrf_key"].as_str().unwrap_or("none")),
        "{memory}"
    );
    assert_eq!(provider.remembered_epoch(bob), Some(1));

    // The domain's record now names another head key: refused until pinned again.
    let other = provider
        .txt_record
        .replace(&provider.head_key, &"22".repeat(32));
    dns_up(&other);
    let (out, v) = retrieve(bob, &main);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("kst client log-pin example.net"), "{error}");
    assert_eq!(provider.memory(bob)["head_key"], provider.head_key.as_str());

    // The user pins what DNS says now: heads are not signed by that key, exit 5.
    let (out, v) = log_pin(&[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["head_key"], "22".repeat(32).as_str(), "{v}");
    assert_eq!(v["forgot_head"], true, "{v}");
    let (out, v) = retrieve(bob, &main);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));

    // The record is right again and pinned again: the check passes.
    dns_up(&provider.txt_record);
    let (out, v) = log_pin(&[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = retrieve(bob, &main);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));

    // A forged record (its signature no longer matches): an attack, nothing pinned.
    let (out, v) = retrieve("carol@example.net", &forged);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    assert_eq!(
        provider.memory("carol@example.net")["head_key"],
        Value::Null
    );
}

/// The head key from the WKD policy directory (issue 18), for a domain without the DNS
/// record: `kst serve` with `[web]` serves the `kst-log` file (the same record `kst log
/// keygen` prints for DNS) at `/.well-known/openpgpkey/[example.net/]kst-log`, in the direct
/// form for Host example.net only, in the advanced form for any Host; nothing for another
/// domain. Through the signed test DNS (no `_kst-log` record there; run under `flock -o
/// /work/team/dns.lock`, needs root for BIND) the client finds no record and reads the file
/// from the directory's listener (`--log-url`): pinned on first use (source `wkd policy
/// directory (plain http)`), the check passes. A policy directory that later names another
/// key is exit 5 and the pin stays (never replaced silently); `kst client log-pin` without
/// `--log-key` pins from the policy directory; with the record in DNS too, the same key
/// passes.
#[test]
fn the_head_key_is_found_in_the_wkd_policy_directory_and_pinned() {
    let _turn = kst_tests::test_dns_turn();
    let provider = Provider::start_serving(Backend::Fs, "", None, false);
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    // `kst serve` with [web]: the directory's routes and the policy directory are there.
    let web = free_port();
    let config = provider.path("kst.toml");
    let _serve =
        ServeProcess::start_binary(&provider.bin, provider.path("serve-web.log"), web, |cmd| {
            cmd.arg("--config")
                .arg(&config)
                .env("KST_WEB__LISTEN", web.to_string());
        });
    let web_url = format!("http://{web}");
    let record = provider
        .txt_record
        .split_once('"')
        .and_then(|(_, r)| r.strip_suffix('"'))
        .expect("the TXT record's text")
        .to_string();

    let get = |host: &str, path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(web).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            status,
            text.split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_string(),
        )
    };
    let file = format!("{record}\n");
    let advanced = "/.well-known/openpgpkey/example.net/kst-log";
    for host in [
        web.to_string(),
        "openpgpkey.example.net".into(),
        "example.org".into(),
    ] {
        assert_eq!(
            get(&host, advanced),
            (200, file.clone()),
            "advanced, Host {host}"
        );
    }
    let direct = "/.well-known/openpgpkey/kst-log";
    assert_eq!(get("example.net", direct), (200, file.clone()));
    assert_eq!(get("example.org", direct).0, 404);
    assert_eq!(get(&web.to_string(), direct).0, 404);
    assert_eq!(
        get("x", "/.well-known/openpgpkey/example.org/kst-log").0,
        404
    );
    // The WKD policy file is still there.
    assert_eq!(get("example.net", "/.well-known/openpgpkey/policy").0, 200);

    let (main, _, anchor) = test_dns();
    test_dns_up(&provider.path("dns-extra"), "");
    let bob = "bob@example.net";
    let dns_args = [
        "--resolver",
        main.as_str(),
        "--dns-anchor",
        anchor.as_str(),
        "--require-dnssec",
    ];
    let retrieve = |url: &str| {
        let mut args = vec!["--log-url", url];
        args.extend_from_slice(&dns_args);
        provider.checked_as("sendmail", bob, "alice@example.net", &args)
    };
    let (out, v) = retrieve(&web_url);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let memory = provider.memory(bob);
    assert_eq!(memory["head_key"], provider.head_key.as_str(), "{memory}");
    assert_eq!(
        memory["pinned_from"], "wkd policy directory (plain http)",
        "{memory}"
    );
    assert!(
        record.contains(memory["vrf_key"].as_str().unwrap_or("none")),
        "{memory}"
    );
    assert_eq!(provider.remembered_epoch(bob), Some(1));

    // A policy directory that names another key (here a server of the attacker's at the
    // log URL): exit 5, the pin stays.
    let other = record.replace(&provider.head_key, &"22".repeat(32));
    let forged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forged_url = format!("http://{}", forged.local_addr().unwrap());
    let forger = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = forged.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{other}\n",
            other.len() + 1
        );
        String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    });
    let (out, v) = retrieve(&forged_url);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("kst client log-pin example.net"), "{error}");
    assert!(
        error.contains("/.well-known/openpgpkey/example.net/kst-log"),
        "{error}"
    );
    assert_eq!(
        forger.join().unwrap(),
        "GET /.well-known/openpgpkey/example.net/kst-log HTTP/1.1"
    );
    assert_eq!(provider.memory(bob)["head_key"], provider.head_key.as_str());
    let (out, v) = retrieve(&web_url);
    assert_eq!(code(&out), 0, "the pin stayed: {v}\n{}", stderr(&out));

    // `kst client log-pin` from the policy directory.
    let mut args = vec!["log-pin", "example.net", "--log-url", web_url.as_str()];
    args.extend_from_slice(&dns_args);
    let (out, v) = provider.client("sendmail", bob, &args);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["head_key"], provider.head_key.as_str(), "{v}");
    assert_eq!(v["source"], "wkd policy directory (plain http)", "{v}");

    // With the record in DNS too, DNS is asked first: the same key, the check passes.
    test_dns_up(&provider.path("dns-extra"), &provider.txt_record);
    let (out, v) = retrieve(&web_url);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
}

/// A policy-directory stand-in: a local HTTP server (a thread of its own, for the test's
/// life) answering every request with `status` and `body`; its base URL.
fn policy_server(status: &'static str, body: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

/// Red team round 3 (issue 18), "DNS and the policy directory are never compared": the
/// client pinned the keys of a `_kst-log` record from a zone without DNSSEC on first use,
/// whatever the domain's WKD policy directory (over HTTPS) said, so a record forged on the
/// DNS path won the first pin. Through the signed test DNS (`insecure.net` is provably
/// unsigned; run under `flock -o /work/team/dns.lock`, needs root for BIND), `kst client
/// log-pin insecure.net` now reads the policy directory too: other keys there are exit 5 and
/// nothing is pinned (before: exit 0, the DNS keys pinned); the same keys, or no file there
/// (404), pin the DNS keys as before; a policy directory that cannot be read is exit 75,
/// nothing pinned.
#[test]
fn rt18_a_first_pin_from_unsigned_dns_is_compared_with_the_policy_directory() {
    let _turn = kst_tests::test_dns_turn();
    let bin = kst_binary();
    let dir = tempfile::tempdir().unwrap();
    let (head, vrf) = ("ab".repeat(32), "cd".repeat(32));
    let record = format!("v=kstlog1; head={head}; vrf={vrf}");
    let extra = dir.path().join("dns-extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(
        extra.join("insecure.net"),
        format!("_kst-log.insecure.net. IN TXT \"{record}\"\n"),
    )
    .unwrap();
    test_dns_up(&extra, "");
    let (main, _, anchor) = test_dns();
    std::fs::write(dir.path().join("no-client.toml"), "").unwrap();
    let log_pin = |state: &str, url: &str| {
        let mut cmd = Command::new(&bin);
        cmd.args(["client", "--account", "bob@insecure.net", "--json"])
            .arg("--state-file")
            .arg(dir.path().join(format!("state-{state}/pending.json")))
            .arg("--client-config")
            .arg(dir.path().join("no-client.toml"))
            .args(["log-pin", "insecure.net", "--log-url", url])
            .args(["--resolver", &main, "--dns-anchor", &anchor])
            .env_remove("KST_CLIENT_CONFIG");
        let (out, v) = run_json(cmd);
        let memory = std::fs::read(
            dir.path()
                .join(format!("state-{state}/transparency/insecure.net.json")),
        )
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null);
        (out, v, memory)
    };

    // The policy directory names other keys: the DNS record is forged (or stale); exit 5.
    let other = record.replace(&head, &"22".repeat(32));
    let (out, v, memory) = log_pin("forged", &policy_server("200 OK", format!("{other}\n")));
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("without DNSSEC") && error.contains(&"22".repeat(32)),
        "{error}"
    );
    assert_eq!(memory["head_key"], Value::Null, "nothing pinned: {memory}");

    // The same keys there: pinned from DNS, as before.
    let (out, v, memory) = log_pin("same", &policy_server("200 OK", format!("{record}\n")));
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(memory["head_key"], head.as_str(), "{memory}");
    assert_eq!(memory["pinned_from"], "dns (not dnssec-signed)", "{memory}");

    // No file there: nothing to compare, the DNS keys are pinned.
    let (out, v, memory) = log_pin("none", &policy_server("404 Not Found", "no\n".into()));
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(memory["head_key"], head.as_str(), "{memory}");

    // The policy directory cannot be read: exit 75, nothing pinned.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (out, v, memory) = log_pin("offline", &nowhere);
    assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("log-pin insecure.net --log-key"),
        "{v}"
    );
    assert_eq!(memory["head_key"], Value::Null, "nothing pinned: {memory}");
}

/// Writes `name`: a sendmail-style script that delivers through `kst deliver` like `sendmail`,
/// then lets the attacker on the reply's path rewrite the reply just spooled: `strip` removes
/// the key directory's answer, `swap` puts the answer block saved in `captured.block` there,
/// `replay` puts the whole older reply saved there in its place (with this request's
/// In-Reply-To and References).
fn write_tampering_script(provider: &Provider, name: &str, how: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tamper = provider.path("tamper.py");
    std::fs::write(
        &tamper,
        r#"import re, sys
path, how, captured = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path, 'rb').read().decode()
block = re.compile(r'-----BEGIN KST LOG ANSWER-----\r?\n.*?-----END KST LOG ANSWER-----\r?\n', re.S)
assert block.search(text), 'no answer block in ' + path
if how == 'strip':
    text = block.sub('', text)
elif how == 'replay':
    # An older genuine reply (in `captured`), made to look like the answer to this request.
    old = open(captured, newline='').read()
    for name in ('In-Reply-To', 'References'):
        fresh = re.search(r'^' + name + r':.*\r?\n', text, re.M | re.I).group(0)
        old = re.sub(r'^' + name + r':.*\r?\n', lambda m: fresh, old, flags=re.M | re.I)
    text = old
else:
    text = block.sub(lambda m: open(captured, newline='').read(), text)
open(path, 'wb').write(text.encode())
"#,
    )
    .unwrap();
    let script = provider.path(name);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{kst}' deliver --config '{cfg}' --sender \"$3\" --recipient \"$5\" --sasl-username \"${{KST_TEST_LOGIN:-$3}}\" || exit $?\nnewest=$(ls -t '{new}' | head -n 1)\nexec python3 '{tamper}' '{new}'/\"$newest\" {how} '{captured}'\n",
            kst = provider.bin.display(),
            cfg = provider.path("kst.toml").display(),
            new = provider.path("Maildir/new").display(),
            tamper = tamper.display(),
            captured = provider.path("captured.block").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The newest reply in the provider's Maildir (`new/`, or `cur/` once the client read it).
fn newest_reply(provider: &Provider) -> String {
    let newest = ["Maildir/new", "Maildir/cur"]
        .iter()
        .flat_map(|d| std::fs::read_dir(provider.path(d)).unwrap().flatten())
        .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
        .expect("a reply");
    std::fs::read_to_string(newest.path()).unwrap()
}

/// The client's exit code and outcome are `code` and `outcome`.
fn expect(out: &Output, v: &Value, code: i32, outcome: &str) {
    assert_eq!(
        (kst_tests::code(out), v["outcome"].as_str()),
        (code, Some(outcome)),
        "{v}\n{}",
        stderr(out)
    );
}

#[test]
fn replies_carry_the_proof_in_version_3() {
    // No `kst serve`: nothing answers HTTP; every proof travels inside the replies.
    let provider = Provider::start_serving(Backend::Fs, "", None, false);
    let key = provider.head_key.clone();
    let v3 = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--transparency".into(), "--log-key".into(), key.clone()]);
        all
    };
    let run = |sendmail: &str, account: &str, args: &[&str]| {
        let args = v3(args);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        provider.client(sendmail, account, &refs)
    };
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    let file = provider.path("alice.asc");
    std::fs::write(&file, &alice.public_armored).unwrap();
    let file = file.to_str().unwrap();

    // Alice publishes in version 3: the confirmation proves her key is the directory's entry.
    let (out, v) = run("sendmail", "alice@example.net", &["publish", "--key", file]);
    expect(&out, &v, 0, "published");
    let reply = newest_reply(&provider);
    assert!(reply.contains("KST-Protocol: 3\r\n"), "{reply}");
    assert!(reply.contains("-----BEGIN KST LOG ANSWER-----"), "{reply}");

    // Bob retrieves it, and an address without a key, in version 3.
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "nobody@example.net"],
    );
    expect(&out, &v, 1, "not-found");
    // Captured by the attacker: the answer block of that "not found".
    let reply = newest_reply(&provider);
    let begin = reply.find("-----BEGIN KST LOG ANSWER-----").unwrap();
    let end = reply.find("-----END KST LOG ANSWER-----").unwrap()
        + "-----END KST LOG ANSWER-----\r\n".len();
    std::fs::write(provider.path("captured.block"), &reply[begin..end]).unwrap();

    // A head key that is not the domain's: exit 5.
    let wrong = "11".repeat(32);
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &[
            "retrieve",
            "alice@example.net",
            "--transparency",
            "--log-key",
            &wrong,
        ],
    );
    expect(&out, &v, 5, "attack");

    // The attacker on the reply's path strips the answer, or swaps in the captured one: the
    // client refuses both (it waits for a genuine reply until its timeout, then exit 5).
    for how in ["strip", "swap"] {
        let script = format!("sendmail-{how}");
        write_tampering_script(&provider, &script, how);
        let args = v3(&["retrieve", "alice@example.net"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, v) =
            provider.client_waiting("bob@example.net", 3, &script, "bob@example.net", &refs);
        assert_eq!(
            (code(&out), v["outcome"].as_str()),
            (5, Some("attack")),
            "{how}: {v}\n{}",
            stderr(&out)
        );
        let error = v["error"].as_str().unwrap_or_default().to_string();
        let tampered = newest_reply(&provider);
        assert!(tampered.contains("KST-Protocol: 3\r\n"), "{tampered}");
        match how {
            "strip" => {
                assert!(!tampered.contains("BEGIN KST LOG ANSWER"), "{tampered}");
                assert!(error.contains("no usable key directory answer"), "{error}");
            }
            _ => {
                assert!(tampered.contains(&reply[begin..end]), "{tampered}");
                assert!(error.contains("HMAC"), "{error}");
            }
        }
    }

    // The insider's twin in the store behind the directory's back: a version 3 reply serves
    // the version the directory's answer proves (alice's key, from the store's history),
    // never the twin the directory does not hold. (Before, it served the twin with the
    // answer about alice's key, and the client reported exit 5; the client's check is as
    // strict as before: `gather::replies`.)
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    expect(&out, &v, 0, "found");
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_ne!(v["fingerprint"], twin.fingerprint.as_str());

    // Alice republishes and then deletes in version 3; "not found" is proven by the deletion.
    let (out, v) = run("sendmail", "alice@example.net", &["publish", "--key", file]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = run("sendmail", "alice@example.net", &["delete"]);
    expect(&out, &v, 0, "deleted");
    let (out, v) = run(
        "sendmail",
        "bob@example.net",
        &["retrieve", "alice@example.net"],
    );
    expect(&out, &v, 1, "not-found");
    // Without --transparency the same KST still answers version 2 clients, without proofs.
    let (out, v) = provider.client(
        "sendmail",
        "bob@example.net",
        &["retrieve", "nobody@example.net"],
    );
    assert_eq!(code(&out), 1, "{v}\n{}", stderr(&out));
    let reply = newest_reply(&provider);
    assert!(reply.contains("KST-Protocol: 2\r\n"), "{reply}");
    assert!(!reply.contains("BEGIN KST LOG ANSWER"), "{reply}");
}

/// Writes `sendmail-queue`: a sendmail-style script that only queues the request (its
/// arguments and message under `queue/`), so that the KST answers it when
/// [`flush_queue`] delivers it, later.
fn write_queue_script(provider: &Provider) {
    use std::os::unix::fs::PermissionsExt;
    let queue = provider.path("queue");
    std::fs::create_dir_all(&queue).unwrap();
    let script = provider.path("sendmail-queue");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nf='{q}'/$(date +%s%N)\nprintf '%s\\n' \"$@\" > \"$f.args\"\ncat > \"$f.eml\"\n",
            q = queue.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Delivers every queued request through `sendmail` (the KST answers them now).
fn flush_queue(provider: &Provider) {
    let mut queued: Vec<PathBuf> = std::fs::read_dir(provider.path("queue"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    queued.sort();
    assert!(!queued.is_empty(), "nothing queued");
    for eml in queued {
        let args = std::fs::read_to_string(eml.with_extension("args")).unwrap();
        let status = Command::new(provider.path("sendmail"))
            .args(args.lines())
            .stdin(std::fs::File::open(&eml).unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "delivering {}", eml.display());
        std::fs::remove_file(&eml).unwrap();
    }
}

/// A resolver address nothing answers on: DNS fails (temporarily), so a pinned head key is
/// used as it is. DNS over TLS to a port where nothing listens: the connection is refused
/// and the look-up fails at once (`DNS: ... no connections available`, exit 75 inside, the
/// same temporary failure as a timeout). Plain UDP to such a port fails only after the
/// resolver's timeouts (5 s, 2 attempts, ~15 s per client run), which made this binary's
/// slowest test spend most of its time waiting.
const NO_RESOLVER: &str = "tls://127.0.0.1:9#dns.example.net";

/// Protocol version 3 with the client's memory (issue 18): the request names the remembered
/// epoch and the reply's answer carries the append-only proof from it; the head key comes
/// from the pin; a rollback and a fork over version 3 are exit 5; witnesses required but
/// absent are exit 5; an older reply replayed for another question fails; `kst client check`
/// checks pending requests the same way, also when the memory moved while one was pending.
#[test]
fn version_3_uses_the_memory_the_pin_and_the_witnesses() {
    let (provider, gpg, alice) = Provider::with_alice();
    let key = provider.head_key.clone();
    let bob = "bob@example.net";
    let v3 = |sendmail: &str, address: &str, extra: &[&str]| {
        let mut args = vec![
            "retrieve",
            address,
            "--transparency",
            "--resolver",
            NO_RESOLVER,
        ];
        args.extend_from_slice(extra);
        provider.client(sendmail, bob, &args)
    };
    let block_of = |reply: &str| -> String {
        let begin = reply
            .find("-----BEGIN KST LOG ANSWER-----")
            .expect("an answer");
        let end = reply.find("-----END KST LOG ANSWER-----").unwrap();
        // Unfolded, as the client reads it.
        reply[begin..end].replace("\r\n ", "").replace("\r\n", "\n")
    };

    // First contact with the key given: pinned, the head remembered.
    let (out, v) = v3("sendmail", "alice@example.net", &["--log-key", &key]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    assert_eq!(provider.memory(bob)["pinned_from"], "--log-key");
    assert!(!block_of(&newest_reply(&provider)).contains("append-only"));

    // The store and its directory at epoch 1: a backup (rollback) and a fork.
    for copy in ["keys-backup", "keys-fork"] {
        let status = Command::new("cp")
            .arg("-a")
            .arg(provider.path("keys"))
            .arg(provider.path(copy))
            .status()
            .unwrap();
        assert!(status.success());
    }

    // A new epoch: the request names epoch 1, the answer proves the log only grew since.
    provider.publish_new(&gpg, "sendmail", &["carol"]);
    let (out, v) = v3("sendmail", "alice@example.net", &["--log-key", &key]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let answer = block_of(&newest_reply(&provider));
    assert!(answer.contains("\nappend-only 1 "), "{answer}");
    assert_eq!(provider.remembered_epoch(bob), Some(2));

    // Three more; now without --log-key: the pinned key is used (DNS, asked first, does not
    // answer: nothing listens on the resolver's port).
    provider.publish_new(&gpg, "sendmail", &["dave", "erin", "frank"]);
    let (out, v) = v3("sendmail", "carol@example.net", &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert!(
        block_of(&newest_reply(&provider)).contains("\nappend-only 2 "),
        "{v}"
    );
    assert_eq!(provider.remembered_epoch(bob), Some(5));
    assert!(provider.evidence(bob).is_empty());

    // A KST restored from the backup answers at epoch 1: a rollback, exit 5, evidence kept.
    let (_restored, _) = provider.twin_kst("restored", &provider.path("keys-backup"));
    let (out, v) = v3("sendmail-restored", "alice@example.net", &[]);
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("older than the remembered"), "{error}");
    assert_eq!(provider.remembered_epoch(bob), Some(5), "not rolled back");
    assert_eq!(provider.evidence(bob).len(), 1);

    // A fork with the same keys, serving a twin for alice and further ahead than bob's head:
    // its proof from epoch 5 does not start at bob's root of epoch 5.
    let (_fork, _) = provider.twin_kst("fork", &provider.path("keys-fork"));
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-fork", "alice@example.net", &twin.public_armored);
    provider.publish_new(
        &twin_gpg,
        "sendmail-fork",
        &["gina", "hank", "ivan", "jack", "kate"],
    );
    let (out, v) = v3("sendmail-fork", "alice@example.net", &[]);
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("fork or rollback"), "{error}");
    assert_eq!(provider.remembered_epoch(bob), Some(5));
    assert_eq!(provider.evidence(bob).len(), 2);

    // Witnesses required, and the KST has none: the answer carries no cosignatures, exit 5.
    let witness = format!("w1:{}", "22".repeat(32));
    let (out, v) = v3("sendmail", "alice@example.net", &["--witness", &witness]);
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("carries no witness cosignatures"), "{error}");
    assert_eq!(
        provider.remembered_epoch(bob),
        Some(5),
        "a rejected head is not remembered"
    );

    // An older genuine version 3 reply to bob (about another address), replayed as the answer
    // to a new request: its tag does not verify for this question and K_auth, exit 5 (the
    // request stays pending for the genuine reply: in another client state, so that `check`
    // below has only its own).
    let (out, v) = v3("sendmail", "nobody@example.net", &[]);
    expect(&out, &v, 1, "not-found");
    std::fs::write(provider.path("captured.block"), newest_reply(&provider)).unwrap();
    write_tampering_script(&provider, "sendmail-replay", "replay");
    let (out, v) = provider.client_waiting(
        "bob-replayed",
        3,
        "sendmail-replay",
        bob,
        &[
            "retrieve",
            "alice@example.net",
            "--transparency",
            "--log-key",
            &key,
        ],
    );
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("HMAC"), "{error}");
    assert_eq!(provider.remembered_epoch("bob-replayed"), None);
    let evidence = provider.evidence(bob).len();

    // `kst client check` finishes a pending version 3 retrieval with the same checks, also
    // when the memory moved while it was pending: queued with epoch 5 remembered, then bob's
    // memory moves to 6, then the KST answers the queued request at epoch 7 with the proof
    // from 5, which must lead through bob's root of epoch 6.
    write_queue_script(&provider);
    let (out, v) = v3("sendmail-queue", "alice@example.net", &["--no-wait"]);
    expect(&out, &v, 75, "pending");
    provider.publish_new(&gpg, "sendmail", &["lena"]);
    // (The queued request is still pending: this one waits for its own reply only.)
    let (out, v) = v3("sendmail", "lena@example.net", &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(6));
    provider.publish_new(&gpg, "sendmail", &["mike"]);
    flush_queue(&provider);
    let answer = block_of(&newest_reply(&provider));
    assert!(
        answer.contains("\nepoch 7\n") && answer.contains("\nappend-only 5 "),
        "{answer}"
    );
    let (out, v) = provider.client("sendmail", bob, &["check", "--resolver", NO_RESOLVER]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "found", "{v}");
    assert_eq!(v[0]["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(provider.remembered_epoch(bob), Some(7));
    assert_eq!(provider.evidence(bob).len(), evidence, "no false alarm");

    // `retrieve --check-transparency --no-wait`: `check` does the HTTP check when it reads
    // the reply (a pending fork reply would be refused there, not imported).
    provider.publish_new(&gpg, "sendmail", &["nina"]);
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &provider.log_url,
            "--resolver",
            NO_RESOLVER,
            "--no-wait",
        ],
    );
    expect(&out, &v, 75, "pending");
    // The directory's head is verified before the request is sent (docs/PROTOCOL.md, "The
    // two-step check of versions 1 and 2", step 0), and kept with it.
    assert_eq!(
        provider.remembered_epoch(bob),
        Some(8),
        "verified before sending"
    );
    let file = provider.path(&format!("state-{bob}/pending.json"));
    let pending: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        pending["requests"][0]["log"]["verified_epoch"], 8,
        "{pending}"
    );
    let (out, v) = provider.client("sendmail", bob, &["check", "--resolver", NO_RESOLVER]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "found", "{v}");
    assert_eq!(provider.remembered_epoch(bob), Some(8), "checked over HTTP");
}

/// Versions 1 and 2 read the key by mail and the directory's answer over HTTP at two moments
/// (issue 18, docs/PROTOCOL.md "Versions"): a reply read after its address changed (a new key,
/// a deletion, a first publication) is a temporary failure (exit 75) saying so, nothing
/// imported and no evidence kept, not an attack; retrieving again passes.
#[test]
fn a_reply_read_after_its_address_changed_is_a_temporary_failure() {
    let (provider, gpg, _alice) = Provider::with_alice();
    write_queue_script(&provider);
    let bob = "bob@example.net";
    let log = provider.log_args();
    // Bob's retrieval of `address`, answered by the KST now, its reply read after `change`.
    let raced = |address: &str, change: &dyn Fn()| {
        let mut flags = log.to_vec();
        flags.push("--no-wait");
        let (out, v) = provider.checked_as("sendmail-queue", bob, address, &flags);
        expect(&out, &v, 75, "pending");
        flush_queue(&provider);
        change();
        let (out, v) = provider.client("sendmail", bob, &["check"]);
        assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
        assert_eq!(v[0]["outcome"], "error", "{v}");
        let error = v[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("changed while the reply was on its way")
                && error.contains("retrieve again"),
            "{error}"
        );
        assert!(provider.evidence(bob).is_empty(), "no false alarm");
        let (out, v) = provider.client("sendmail", bob, &["pending"]);
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
        assert!(!v.to_string().contains(address), "the reply was read: {v}");
    };

    // Alice publishes a new key after the KST mailed bob her first one.
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    raced("alice@example.net", &|| {
        provider.publish("sendmail", "alice@example.net", &alice2.public_armored)
    });
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(v["fingerprint"], alice2.fingerprint.as_str());

    // Alice deletes her key after the KST mailed it (the directory withdraws its value).
    raced("alice@example.net", &|| {
        let (out, v) = provider.client("sendmail", "alice@example.net", &["delete"]);
        expect(&out, &v, 0, "deleted");
    });
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 1, "not-found");

    // Carol publishes her first key after the KST mailed "no key".
    let carol = gpg.generate("Carol", "carol@example.net", "ed25519");
    raced("carol@example.net", &|| {
        provider.publish("sendmail", "carol@example.net", &carol.public_armored)
    });
    let (out, v) = provider.checked_as("sendmail", bob, "carol@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(v["fingerprint"], carol.fingerprint.as_str());
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
}

/// Reads the head of one HTTP request from `client`: its request line and the rest.
fn read_request(client: &mut std::net::TcpStream) -> Option<(String, String)> {
    use std::io::Read;
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    text.split_once("\r\n")
        .map(|(line, rest)| (line.to_string(), rest.to_string()))
}

/// Sends the request (`line`, `rest`) to `to` (`host:port`) asking the server to close
/// after its answer (one request per connection); the whole response.
fn forward(to: &str, line: &str, rest: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut server = std::net::TcpStream::connect(to).ok()?;
    write!(server, "{line}\r\nConnection: close\r\n{rest}").ok()?;
    let mut response = Vec::new();
    let _ = server.read_to_end(&mut response);
    Some(response)
}

/// An HTTP proxy in front of the directory at `honest` (`http://host:port`), one request per
/// connection: a request whose path contains `route` goes to `other` instead (when given)
/// and, with `fresh_time`, the `signed-at` lines of its answer are set to now (a forged time
/// of the same length, so the body's length holds). Returns its URL.
fn forging_proxy(
    honest: &str,
    route: &'static str,
    other: Option<&str>,
    fresh_time: bool,
) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let authority = |url: &str| url.trim_start_matches("http://").to_string();
    let honest = authority(honest);
    let other = other.map(authority);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Some((line, rest)) = read_request(&mut client) else {
                continue;
            };
            let routed = line.contains(route);
            let to = match (&other, routed) {
                (Some(o), true) => o.clone(),
                _ => honest.clone(),
            };
            let Some(mut response) = forward(&to, &line, &rest) else {
                continue;
            };
            if routed && fresh_time {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    .to_string();
                let forged: Vec<String> = String::from_utf8_lossy(&response)
                    .split('\n')
                    .map(|l| match l.strip_prefix("signed-at ") {
                        Some(t) if t.len() == now.len() => format!("signed-at {now}"),
                        _ => l.to_string(),
                    })
                    .collect();
                response = forged.join("\n").into_bytes();
            }
            let _ = client.write_all(&response);
        }
    });
    format!("http://{addr}")
}

/// An HTTP proxy in front of the directory at `honest` that answers its first `times`
/// look-ups with `behind` (a genuine answer of an older epoch: a directory a moment behind)
/// and forwards everything else. Returns its URL.
fn lagging_proxy(honest: &str, behind: String, times: usize) -> String {
    replaying_proxy(honest, "/lookup/", behind, times)
}

/// An HTTP proxy in front of the directory at `honest`: the first `times` requests whose
/// path contains `route` are answered with `body` (a genuine answer captured earlier), the
/// rest forwarded. Returns its URL.
fn replaying_proxy(honest: &str, route: &'static str, body: String, times: usize) -> String {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    answering_proxy(honest, route, response.into_bytes(), times)
}

/// An HTTP proxy in front of the directory at `honest`: the first `times` requests whose
/// path contains `route` are answered 503 (a directory down for a moment), the rest
/// forwarded. Returns its URL.
fn unavailable_proxy(honest: &str, route: &'static str, times: usize) -> String {
    let response = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
                    Content-Length: 5\r\nConnection: close\r\n\r\ndown\n";
    answering_proxy(honest, route, response.as_bytes().to_vec(), times)
}

/// An HTTP proxy in front of the directory at `honest`: the first `times` requests whose
/// path contains `route` are answered with the bytes of `response`, the rest forwarded.
/// Returns its URL.
fn answering_proxy(honest: &str, route: &'static str, response: Vec<u8>, times: usize) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let honest = honest.trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        let mut lagged = 0;
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Some((line, rest)) = read_request(&mut client) else {
                continue;
            };
            let response = if line.contains(route) && lagged < times {
                lagged += 1;
                response.clone()
            } else {
                let Some(r) = forward(&honest, &line, &rest) else {
                    continue;
                };
                r
            };
            let _ = client.write_all(&response);
        }
    });
    format!("http://{addr}")
}

/// Case (a) of the two-step check (issue 18): the reply's key is published, but the
/// directory's answer read right after the reply still shows the version before (an answer
/// a moment behind the store: an epoch not yet recorded, a pool's instance behind). The
/// client asks again and accepts the key once the answer proves it: exit 0, no evidence,
/// the newer head remembered through its append-only proof.
#[test]
fn an_answer_a_moment_behind_the_reply_is_asked_for_again() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let (status, behind) =
        provider.http_get("/.well-known/kst/log/example.net/lookup/alice@example.net");
    assert_eq!(status, 200, "{behind}");
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let lagging = lagging_proxy(&provider.log_url, behind, 2);
    let bob = "bob@example.net";
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &["--log-url", &lagging, "--log-key", &provider.head_key],
    );
    expect(&out, &v, 0, "found");
    assert_eq!(v["fingerprint"], alice2.fingerprint.as_str());
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
}

/// Review of the two-step check (issue 18): a history replayed from before the client's pin
/// (captured by anyone, genuine, signed, of an epoch whose root the client never kept) in
/// front of a reply whose key the directory does not prove: exit 5 with the evidence, not a
/// temporary failure the attacker could repeat for ever.
#[test]
fn rt18_a_history_replayed_from_before_is_an_attack() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let (status, old_history) =
        provider.http_get("/.well-known/kst/log/example.net/history/alice@example.net");
    assert_eq!(status, 200, "{old_history}");
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let bob = "bob@example.net";
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
        ],
    );
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    // A key in the store behind the directory's back (never in it), and the old history.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let replaying = replaying_proxy(&provider.log_url, "/history/", old_history, usize::MAX);
    // The answer's own proof decides first (review F1): alice's newest version recorded at
    // epoch 2, which bob verified before sending; the replayed history is not read.
    provider.refused_as_attack("sendmail", bob, &replaying, "recorded at epoch 2");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");
}

/// Red team of the two-step check (issue 18): what a race is taken for must not let a
/// provider pass off a key it should not serve. A stale replica serving a key the directory
/// superseded at an epoch the client had verified before it sent the request: exit 5 ("a
/// stale key"), at once (no clock compared, nothing to wait for), also when the superseding
/// epoch's head is served with a forged, recent time (no head time is read), and a forged
/// answer at once; a key put in
/// the store behind the directory's back, never in it: exit 5; a history from a fork with
/// the same keys where that key was superseded just now (not tied to the client's verified
/// history): exit 5. Each keeps its evidence; the fork's heads are never remembered.
#[test]
fn rt18_a_two_step_check_takes_no_stale_never_recorded_or_forged_key_for_a_race() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    // A replica restored from a copy of the store as it is now (alice's first key), with
    // the same directory keys: it serves what was current then.
    let (_old, old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let forged_time = forging_proxy(&provider.log_url, "/head/", None, true);
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
        ],
    );
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    // The change that superseded alice's first key (epoch 2) is at the epoch bob verified
    // before each request below: however recent it is by the clock, no race.
    let kept = |n: usize| assert_eq!(provider.evidence(bob).len(), n, "evidence kept");
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    kept(1);
    provider.refused_as_attack("sendmail-old", bob, &forged_time, "not a change on the way");
    kept(2);
    // A forged answer (its time changed) is refused at once, as before.
    let forged_answer = forging_proxy(&provider.log_url, "/lookup/", None, true);
    provider.refused_as_attack(
        "sendmail-old",
        bob,
        &forged_answer,
        "head signature rejected",
    );
    kept(3);

    // The insider's key in the store behind the directory's back: never in the directory.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    // Decided by the answer's proof (review F1): alice's newest version recorded at epoch 2,
    // verified before sending.
    provider.refused_as_attack("sendmail", bob, &provider.log_url, "recorded at epoch 2");
    kept(4);

    // The replica's directory forks: the twin, then a third key, so its history shows the
    // twin superseded just now, at an epoch (3) newer than the honest directory's (2). The
    // history comes from the fork, the answers from the honest directory.
    provider.publish("sendmail-old", "alice@example.net", &twin.public_armored);
    let third = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-old", "alice@example.net", &third.public_armored);
    let forked_history = forging_proxy(&provider.log_url, "/history/", Some(&old_url), false);
    // Decided by the honest answer's proof before the fork's history is read (review F1).
    provider.refused_as_attack("sendmail", bob, &forked_history, "recorded at epoch 2");
    kept(5);
    assert_eq!(
        provider.remembered_epoch(bob),
        Some(2),
        "the fork's head is not remembered"
    );
}

/// Review of the two-step check (issue 18, F2): a provider holding the head key re-signs
/// the head of the epoch that recorded a deletion with `signed-at` = now. Across a deletion
/// the history matches any served key (the deletion withdrew the values before it), so with
/// the clocks compared any forged key got exit 75, for ever. The client compares epochs: the
/// deletion was recorded at an epoch it had verified before it sent the request, so the
/// forged key is no race: exit 5 with the evidence kept, whatever the head's time says.
#[test]
fn rt18_a_deletion_head_re_signed_later_is_no_race() {
    let (provider, _gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (out, v) = provider.client("sendmail", "alice@example.net", &["delete"]);
    expect(&out, &v, 0, "deleted");
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
        ],
    );
    expect(&out, &v, 1, "not-found");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    // The insider's key in the store behind the directory's back, and the deletion's head
    // (epoch 2) signed again now with the head key.
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    let keys = kst_core::transparency::LogKeys::parse(
        &std::fs::read_to_string(provider.path("log-example.net.key")).unwrap(),
    )
    .unwrap();
    let (status, text) = provider.http_get("/.well-known/kst/log/example.net/head/2");
    assert_eq!(status, 200, "{text}");
    let (signed, _) = kst_core::transparency::witness::parse_head_with_cosignatures(&text).unwrap();
    let mut head = signed.head;
    head.signed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 5;
    let re_signed =
        kst_core::transparency::answer::head_text(&keys.head.sign(head).unwrap()).unwrap();
    let proxy = replaying_proxy(&provider.log_url, "/head/2 ", re_signed, usize::MAX);
    provider.refused_as_attack("sendmail", bob, &proxy, "not a change on the way");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");
}

/// A key written to the store behind the directory's back (the directory still records
/// alice's version 1, at epoch 1) served while every history request fails (the route goes
/// to a port where nothing listens): the answer's own proof shows alice's newest version
/// recorded at epoch 1, the epoch the client verified before sending, so the history is not
/// needed: exit 5, the answer kept as evidence (review F1; before, exit 75 on every retry
/// while the history could not be read). With the history readable, the same.
#[test]
fn rt18_a_mismatch_whose_history_cannot_be_read_is_decided_by_the_answer() {
    let (provider, _gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let log = provider.log_args();
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    let twin_gpg = Gpg::new();
    let twin = twin_gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail-no-log", "alice@example.net", &twin.public_armored);
    // Every history request goes to a port where nothing listens.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let no_history = forging_proxy(&provider.log_url, "/history/", Some(&closed), false);
    provider.refused_as_attack("sendmail", bob, &no_history, "recorded at epoch 1");
    let evidence = provider.evidence(bob);
    assert_eq!(evidence.len(), 1, "the mismatch kept");
    let kept = std::fs::read_to_string(&evidence[0]).unwrap();
    assert!(kept.contains("kst-log-answer"), "{kept}");
    provider.refused_as_attack("sendmail", bob, &provider.log_url, "recorded at epoch 1");
    assert_eq!(provider.evidence(bob).len(), 2);
}

/// The two-step check on a busy domain (review F1): a stale replica serves alice's first
/// key, superseded at epoch 2, to a client that verified epoch 2 before sending, while every
/// history request fails (a history route overloaded, a directory committing an epoch before
/// each `/history/`, a provider answering it 503). The answer's own proof shows alice's
/// newest version recorded at epoch 2, at or below the request's `verified_epoch`: exit 5 at
/// the first reply with the answer kept as evidence, without the history. Before, the
/// history decided, so every retry was exit 75.
#[test]
fn two_step_a_stale_key_is_an_attack_by_the_answers_epoch_without_the_history() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let closed = format!("http://127.0.0.1:{}", free_port());
    let no_history = forging_proxy(&provider.log_url, "/history/", Some(&closed), false);
    for attempt in 1..=2 {
        let (out, v) = provider.checked_as(
            "sendmail-old",
            bob,
            "alice@example.net",
            &["--log-url", &no_history, "--log-key", &provider.head_key],
        );
        expect(&out, &v, 5, "attack");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("recorded at epoch 2") && error.contains("verified"),
            "{error}"
        );
        let evidence = provider.evidence(bob);
        assert_eq!(evidence.len(), attempt, "the answer kept as evidence");
        for file in &evidence {
            let kept = std::fs::read_to_string(file).unwrap();
            assert!(kept.contains("kst-log-answer"), "{kept}");
        }
    }
    assert_eq!(provider.remembered_epoch(bob), Some(2));
}

/// The pending-request path of the two-step check (issue 18 review): `retrieve
/// --check-transparency --no-wait` keeps the epoch the client had verified (`verified_epoch`)
/// with the request, and `kst client check` decides with it. A pending file written by a kst
/// from before that field (the field removed here) still loads: the client cannot tell a
/// change on the way from a stale key, exit 75, no evidence; the retrieval made again is
/// compared with the epoch remembered now, and the stale replica's key is exit 5.
#[test]
fn a_pending_request_without_its_verified_epoch_cannot_tell_and_the_retry_decides() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let log = provider.log_args();
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    // The stale replica answers a request left pending.
    let mut flags = log.to_vec();
    flags.push("--no-wait");
    let (file, mut pending) = pending_with_the_stale_replica(&provider, bob, &flags);
    assert_eq!(
        pending["requests"][0]["log"]["verified_epoch"], 2,
        "{pending}"
    );
    pending["requests"][0]["log"]
        .as_object_mut()
        .unwrap()
        .remove("verified_epoch");
    std::fs::write(&file, serde_json::to_vec(&pending).unwrap()).unwrap();
    cannot_tell_then_the_retry_decides(
        &provider,
        bob,
        "retrieve again",
        "no evidence without an epoch",
    );
}

/// The stale replica (`sendmail-old`) answers bob's request for alice, sent with `flags`
/// (`--no-wait`: left pending): the pending file and what it holds.
fn pending_with_the_stale_replica(
    provider: &Provider,
    bob: &str,
    flags: &[&str],
) -> (PathBuf, Value) {
    let (out, v) = provider.checked_as("sendmail-old", bob, "alice@example.net", flags);
    expect(&out, &v, 75, "pending");
    let file = provider.path(&format!("state-{bob}/pending.json"));
    let pending: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    (file, pending)
}

/// `kst client check` of bob's pending request cannot tell (exit 75, its error saying
/// `why`, no evidence: `no_evidence` the assertion's words); the retrieval made again of the
/// stale replica's key is exit 5 with evidence.
fn cannot_tell_then_the_retry_decides(
    provider: &Provider,
    bob: &str,
    why: &str,
    no_evidence: &str,
) {
    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot tell") && error.contains(why),
        "{error}"
    );
    assert!(provider.evidence(bob).is_empty(), "{no_evidence}");
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");
}

/// Review F8: a pending file written by a kst that kept `verified_epoch` but not yet the
/// directory it is of (`verified_log` removed here) still loads; the epoch is not used (it
/// may be of another directory): the stale replica's key is exit 75 "cannot tell", no
/// evidence, and the retrieval made again is exit 5.
#[test]
fn two_step_a_pending_request_without_its_verified_log_cannot_tell_and_the_retry_decides() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let mut flags = provider.log_args().to_vec();
    flags.push("--no-wait");
    let (file, mut pending) = pending_with_the_stale_replica(&provider, bob, &flags);
    let log = &mut pending["requests"][0]["log"];
    assert_eq!(log["verified_epoch"], 2, "{log}");
    assert_eq!(log["verified_log"]["head_key"], provider.head_key.as_str());
    log.as_object_mut().unwrap().remove("verified_log");
    std::fs::write(&file, serde_json::to_vec(&pending).unwrap()).unwrap();
    cannot_tell_then_the_retry_decides(
        &provider,
        bob,
        "older kst",
        "no evidence without the directory",
    );
}

/// Review R1 of the two-step check (issue 18): a pending request's verified epoch counts
/// while the client's memory follows the same start of the directory's history, also when
/// the memory no longer keeps that epoch's root (it keeps the newest 1024; a provider that
/// commits more before the check, or answers it `too-far` with witnessed heads, evicted it):
/// the stale replica's key is exit 5 with evidence, not exit 75 "cannot tell". And a root
/// kept for the request's epoch that differs from the one the request had verified, in
/// the same start with the same keys, is a fork: exit 5.
#[test]
fn two_step_a_pending_requests_epoch_outlives_its_cached_root_and_another_root_is_a_fork() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let mut flags = provider.log_args().to_vec();
    flags.push("--no-wait");
    let (file, pending) = pending_with_the_stale_replica(&provider, bob, &flags);
    let log = &pending["requests"][0]["log"];
    assert_eq!(log["verified_epoch"], 2, "{log}");
    assert!(log["verified_log"]["started_at"].is_string(), "{log}");
    // Epoch 2's root evicted from the memory, and the directory moved on.
    let memory_file = provider.path(&format!("state-{bob}/transparency/example.net.json"));
    let mut memory = provider.memory(bob);
    assert!(memory["roots"]["2"].is_string(), "{memory}");
    memory["roots"].as_object_mut().unwrap().remove("2");
    std::fs::write(&memory_file, serde_json::to_vec(&memory).unwrap()).unwrap();
    provider.publish_new(&gpg, "sendmail", &["carol"]);
    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    assert!(
        provider.memory(bob)["roots"]["2"].is_null(),
        "still evicted"
    );
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");

    // Another root for the request's epoch (3, kept) than the one it had verified.
    let (_, mut pending) = pending_with_the_stale_replica(&provider, bob, &flags);
    let log = &mut pending["requests"][0]["log"];
    assert_eq!(log["verified_epoch"], 3, "{log}");
    log["verified_log"]["root"] = "07".repeat(32).into();
    std::fs::write(&file, serde_json::to_vec(&pending).unwrap()).unwrap();
    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("possible fork"), "{error}");
    assert_eq!(provider.evidence(bob).len(), 2, "evidence kept");
}

/// Review F8 of the two-step check (issue 18): a pending request's `verified_epoch` is an
/// epoch of the directory the client had verified then. When the domain's directory is
/// re-keyed before the reply is read (the operator's `kst log keygen --force`, a new
/// directory starting again at epoch 1, `kst migrate` recording the stored keys in it) and
/// the user pins the new head key (`kst client log-pin`), an honest change of the address
/// on the reply's way (alice's new key, recorded at epoch 2 of the new directory) must not
/// be compared with epoch 6 of the old one (2 <= 6 made it exit 5, a false alarm): the
/// client cannot tell (exit 75, no evidence), and the retrieval made again passes.
#[test]
fn two_step_a_pending_request_checked_after_a_re_key_compares_no_epoch_of_the_old_directory() {
    let (mut provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    // The old directory moves on to epoch 6 (another address published again and again).
    provider.publish_new(&gpg, "sendmail", &["xavier"; 5]);
    let log = provider.log_args();
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(6));
    // A request left pending, the head key taken from the pin (DNS cannot be asked).
    write_queue_script(&provider);
    let (out, v) = provider.checked_as(
        "sendmail-queue",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &provider.log_url,
            "--resolver",
            NO_RESOLVER,
            "--no-wait",
        ],
    );
    expect(&out, &v, 75, "pending");
    flush_queue(&provider);
    // The re-key: a new directory (new keys, its store gone), the stored keys recorded.
    provider.serve = None;
    std::fs::remove_dir_all(provider.path("keys/kt")).unwrap();
    let out = provider.log_keygen("example.net", true);
    let new_key = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("head-key ").map(str::to_string))
        .expect("the new head key");
    let out = provider.kst(&["migrate"]);
    assert_eq!(code(&out), 0, "kst migrate: {}", stderr(&out));
    provider.restart_serve();
    // Alice's new key after the KST mailed bob her first one: epoch 2 of the new directory.
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let (out, v) = provider.client(
        "sendmail",
        bob,
        &["log-pin", "example.net", "--log-key", &new_key],
    );
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    let (out, v) = provider.client("sendmail", bob, &["check", "--resolver", NO_RESOLVER]);
    assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot tell")
            && error.contains("another directory")
            && error.contains("retrieve again"),
        "{error}"
    );
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &["--log-url", &provider.log_url, "--log-key", &new_key],
    );
    expect(&out, &v, 0, "found");
    assert_eq!(v["fingerprint"], alice2.fingerprint.as_str());
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
}

/// Review F6 of the two-step check (issue 18): the evidence of an exit 5 ties it to the
/// reply it is about, so that an owner or an auditor can find that reply: a stale replica
/// serves alice's first key after the directory superseded it; the evidence kept names the
/// served key's fingerprint, the reply's own Message-ID and the request's (its
/// In-Reply-To). Before, it held the directory's answer and the client's memory only.
#[test]
fn two_step_the_evidence_of_an_attack_names_the_served_key_and_the_reply() {
    let (provider, gpg, alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    let evidence = provider.evidence(bob);
    assert_eq!(evidence.len(), 1, "evidence kept");
    let kept = std::fs::read_to_string(&evidence[0]).unwrap();
    names_the_newest_reply(&provider, &kept, &alice);
}

/// `kept` (an evidence file) names the newest reply in the mailbox by its own Message-ID and
/// the request's (its In-Reply-To), and `served`'s fingerprint as the key it served.
fn names_the_newest_reply(provider: &Provider, kept: &str, served: &kst_tests::GpgKey) {
    let reply = newest_reply(provider);
    let header = |name: &str| {
        reply
            .lines()
            .take_while(|l| !l.is_empty() && *l != "\r")
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name)
                    .then(|| v.trim().trim_matches(|c| c == '<' || c == '>').to_string())
            })
            .unwrap_or_else(|| panic!("the reply has no {name}: {reply}"))
    };
    let (reply_id, request_id) = (header("Message-ID"), header("In-Reply-To"));
    assert!(
        kept.contains(&format!("served key {}", served.fingerprint))
            && kept.contains(&format!("reply Message-ID <{reply_id}>"))
            && kept.contains(&format!("request Message-ID <{request_id}>")),
        "{kept}"
    );
}

/// The owner's monitor keeps the same evidence as `retrieve` (issue 18's closing note): a
/// stale replica serves alice her first key after she published her second, and `kst client
/// status --check-transparency` is exit 5 with evidence that names the reply by its own
/// Message-ID too. Before, status checked the reply after the wait had dropped it, and its
/// evidence said "unknown to this check".
#[test]
fn status_evidence_names_the_reply_by_its_message_id() {
    let (provider, gpg, alice, alice_key) = Provider::with_alice_key_file();
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let (out, v) = provider.client(
        "sendmail-old",
        "alice@example.net",
        &[
            "status",
            "--key",
            alice_key.to_str().unwrap(),
            "--check-transparency",
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
        ],
    );
    expect(&out, &v, 5, "attack");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("a stale"), "{error}");
    let evidence = provider.evidence("alice@example.net");
    assert_eq!(evidence.len(), 1, "evidence kept");
    let kept = std::fs::read_to_string(&evidence[0]).unwrap();
    names_the_newest_reply(&provider, &kept, &alice);
}

/// Review F5 of the two-step check (issue 18): an HTTP status is the status the server
/// sent, never words found in its body. A real race (alice's new key recorded after the
/// reply was mailed) whose history request is answered 503 with a body that says
/// "answered 404" (a proxy's error page): the history could not be read, exit 75 with the
/// mismatch kept, not "the directory never held the address" (exit 5, a false alarm, as
/// when the error text was matched).
#[test]
fn two_step_a_history_answered_503_is_never_taken_for_a_404_by_its_text() {
    let (provider, gpg, _alice) = Provider::with_alice();
    write_queue_script(&provider);
    let bob = "bob@example.net";
    let body = "the upstream answered 404 for a moment\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let proxy = answering_proxy(
        &provider.log_url,
        "/history/",
        response.into_bytes(),
        usize::MAX,
    );
    let (out, v) = provider.checked_as(
        "sendmail-queue",
        bob,
        "alice@example.net",
        &[
            "--log-url",
            &proxy,
            "--log-key",
            &provider.head_key,
            "--no-wait",
        ],
    );
    expect(&out, &v, 75, "pending");
    flush_queue(&provider);
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the history could not be read") && error.contains("503"),
        "{error}"
    );
}

/// Review F9 of the two-step check (issue 18): the history is read in pages of 64
/// versions. Alice's key is mailed to bob, then the address changes 69 times (an insider's
/// key, then versions 3 to 70 restored by the operator) before bob's client reads the reply:
/// alice's first key is version 1, below the newest page, superseded at an epoch after the
/// one bob verified before sending. The client reads the older pages (against the same
/// head) and finds the race: exit 75, no evidence. Before, the newest page alone said "never
/// held" (exit 5, a false alarm).
#[test]
fn two_step_a_key_superseded_more_than_64_versions_back_is_found_in_the_older_pages() {
    let (provider, _gpg, _alice) = Provider::with_alice();
    write_queue_script(&provider);
    let bob = "bob@example.net";
    let mut flags = provider.log_args().to_vec();
    flags.push("--no-wait");
    let (out, v) = provider.checked_as("sendmail-queue", bob, "alice@example.net", &flags);
    expect(&out, &v, 75, "pending");
    flush_queue(&provider);
    // Version 2: another key; versions 3 to 70: that key again, restored by the operator.
    provider.seventy_versions_of_alice(2);

    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("changed while the reply was on its way"),
        "{error}"
    );
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
}

/// Review R4 of the two-step check (issue 18): the F9 set-up (alice's first key 69 versions
/// back, read in the older page), with the older page answered by the provider under a head
/// it signed again for the same epoch with another root: two signed heads for one epoch, a
/// fork, exit 5 with both kept as evidence. Before, the page's head was compared with the
/// history's before its signature was checked, and any difference read as "the directory
/// moved" (exit 75, no evidence).
#[test]
fn two_step_an_older_page_under_a_forked_head_is_an_attack() {
    let (provider, _gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    older_page_under(&provider, bob, |head| head.root_hash = [7; 32]);
    let (out, v) = provider.client("sendmail", bob, &["check"]);
    assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
    let error = v[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("fork"), "{error}");
    let evidence = provider.evidence(bob);
    assert_eq!(evidence.len(), 1, "evidence kept");
    let kept = std::fs::read_to_string(&evidence[0]).unwrap();
    assert!(
        kept.contains(&"07".repeat(32)),
        "the forked head kept: {kept}"
    );
}

/// Review R4: the same with the older page under a head the provider signed again for an
/// older epoch (a page replayed from before: exit 5), or naming another VRF key (the page's
/// versions would be checked with it: exit 5).
#[test]
fn two_step_an_older_page_under_an_older_head_or_another_vrf_key_is_an_attack() {
    for (n, (change, why)) in [
        (
            (|head: &mut kst_core::transparency::Head| head.epoch -= 1)
                as fn(&mut kst_core::transparency::Head),
            "replayed from before",
        ),
        (|head| head.vrf_public_key = [9; 32], "VRF key"),
    ]
    .into_iter()
    .enumerate()
    {
        let (provider, _gpg, _alice) = Provider::with_alice();
        let bob = "bob@example.net";
        older_page_under(&provider, bob, change);
        let (out, v) = provider.client("sendmail", bob, &["check"]);
        assert_eq!(code(&out), 5, "case {n}: {v}\n{}", stderr(&out));
        let error = v[0]["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "case {n}: {error}");
        assert_eq!(provider.evidence(bob).len(), 1, "case {n}: evidence kept");
    }
}

/// The F9 set-up for `account`: a request for alice's first key left pending, then 69
/// changes of alice@example.net (an insider's key, versions 3 to 70 restored by the
/// operator), and the pending request's directory a proxy that answers the history's
/// older page (`?before=7`) once under its head changed by `change` and signed again with
/// the head key.
fn older_page_under(
    provider: &Provider,
    account: &str,
    change: impl FnOnce(&mut kst_core::transparency::Head),
) {
    write_queue_script(provider);
    let mut flags = provider.log_args().to_vec();
    flags.push("--no-wait");
    let (out, v) = provider.checked_as("sendmail-queue", account, "alice@example.net", &flags);
    expect(&out, &v, 75, "pending");
    flush_queue(provider);
    provider.seventy_versions_of_alice(2);

    // The older page (versions 1 to 6) under the changed head, signed again.
    let (status, text) =
        provider.http_get("/.well-known/kst/log/example.net/history/alice@example.net?before=7");
    assert_eq!(status, 200, "{text}");
    let mut page = kst_core::transparency::history::HistoryPage::parse(&text).unwrap();
    let keys = kst_core::transparency::LogKeys::parse(
        &std::fs::read_to_string(provider.path("log-example.net.key")).unwrap(),
    )
    .unwrap();
    let mut head = page.head.head.clone();
    change(&mut head);
    page.head = keys.head.sign(head).unwrap();
    let proxy = replaying_proxy(&provider.log_url, "?before=7", page.to_text().unwrap(), 1);
    let pending = provider.path(&format!("state-{account}/pending.json"));
    let mut requests: Value = serde_json::from_slice(&std::fs::read(&pending).unwrap()).unwrap();
    requests["requests"][0]["log"]["log_url"] = proxy.into();
    std::fs::write(&pending, serde_json::to_vec(&requests).unwrap()).unwrap();
}

/// The head verified before sending (issue 18, two-step check): `retrieve
/// --check-transparency` fetches and verifies the directory's current answer before the
/// request is sent and keeps its epoch as `verified_epoch`. A stale replica serving alice's
/// first key, superseded at epoch 2, to a client that never retrieved from example.net (no
/// remembered head, first use): exit 5 "a stale" key at the first reply, evidence kept, the
/// head of epoch 2 remembered. Before, the client could not tell (exit 75).
#[test]
fn presend_a_stale_key_on_first_use_is_an_attack_at_once() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    assert!(provider.evidence(bob).is_empty());
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
}

/// The head verified before sending: a client that remembers an old head (epoch 1, a
/// retrieval days ago) and a key superseded after it (epoch 2), before the request is sent,
/// served by a stale replica: exit 5 at the first reply (before: one exit 75, a change
/// after the verified epoch, then exit 5 on the retry).
#[test]
fn presend_a_stale_key_superseded_after_an_old_remembered_head_is_an_attack_at_once() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let log = provider.log_args();
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");
    assert_eq!(provider.remembered_epoch(bob), Some(2));
}

/// The head verified before sending, when the directory cannot be read then (503): the
/// request is still sent, with the epoch remembered before (1), and the output says so; the
/// stale replica's key superseded at epoch 2 is then decided as without the step (exit 75,
/// a change after the verified epoch), and the retrieval made again (the directory back)
/// is exit 5. A head fetched before sending that fails verification (a forged answer) is
/// an attack at once, and nothing is sent.
#[test]
fn presend_a_head_unreachable_before_sending_still_sends_and_a_forged_one_sends_nothing() {
    let (provider, gpg, _alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let (_old, _old_url) = provider.stale_twin();
    let log = provider.log_args();
    let (out, v) = provider.checked_as("sendmail", bob, "alice@example.net", &log);
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    let alice2 = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice2.public_armored);
    // The first look-up (the one before sending) answered 503.
    let down_once = unavailable_proxy(&provider.log_url, "/lookup/", 1);
    let (out, v) = provider.checked_as(
        "sendmail-old",
        bob,
        "alice@example.net",
        &["--log-url", &down_once, "--log-key", &provider.head_key],
    );
    expect(&out, &v, 75, "error");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("changed while the reply was on its way"),
        "{error}"
    );
    let told = stderr(&out);
    assert!(
        told.contains("could not be verified before sending")
            && told.contains("the epoch remembered before, 1"),
        "{told}"
    );
    assert_eq!(provider.remembered_epoch(bob), Some(2));
    provider.refused_as_attack("sendmail-old", bob, &provider.log_url, "a stale");
    assert_eq!(provider.evidence(bob).len(), 1, "evidence kept");

    // A forged answer before sending: exit 5, evidence kept, no request sent.
    let forged = forging_proxy(&provider.log_url, "/lookup/", None, true);
    provider.refused_as_attack("sendmail", bob, &forged, "nothing was sent");
    assert_eq!(provider.evidence(bob).len(), 2, "evidence kept");
    let (out, v) = provider.client("sendmail", bob, &["pending"]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert!(!v.to_string().contains("alice@example.net"), "sent: {v}");
}

/// An HTTP proxy in front of the directory at `honest` that holds each of the first `times`
/// requests whose path contains `route` for `delay` before forwarding it (a slow directory),
/// and forwards everything else at once; a thread per connection, so a request its client
/// gave up on holds up no other. Returns its URL.
fn delaying_proxy(
    honest: &str,
    route: &'static str,
    delay: std::time::Duration,
    times: usize,
) -> String {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let honest = honest.trim_start_matches("http://").to_string();
    let held = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let (honest, held) = (honest.clone(), Arc::clone(&held));
            std::thread::spawn(move || {
                let Some((line, rest)) = read_request(&mut client) else {
                    return;
                };
                if line.contains(route) && held.fetch_add(1, Ordering::SeqCst) < times {
                    std::thread::sleep(delay);
                }
                if let Some(response) = forward(&honest, &line, &rest) {
                    let _ = client.write_all(&response);
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Review F7 of the two-step check (issue 18): the head verified before sending is bounded
/// in all (20 s, every catch-up step included: the domain's memory is locked meanwhile and
/// the request waits), not per fetch (up to 64 steps of 20 s each). Bob is 9 epochs behind a
/// directory that answers in steps of one epoch, each of its first 6 look-ups held 4 s: the
/// client stops after 20 s, keeps the steps it verified, says so on standard error and
/// sends the request; the reply is then checked as usual (exit 0). Before, it followed every
/// step first (more than 24 s), and said nothing.
#[test]
fn presend_is_bounded_in_all_not_per_step() {
    let provider = Provider::start_with(Backend::Fs, "step_max_epochs = 1", None);
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    let bob = "bob@example.net";
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    expect(&out, &v, 0, "found");
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    provider.publish_new(&gpg, "sendmail", &["u"; 9]);
    let slow = delaying_proxy(
        &provider.log_url,
        "/lookup/",
        std::time::Duration::from_secs(4),
        6,
    );
    let (out, v) = provider.checked_as(
        "sendmail",
        bob,
        "alice@example.net",
        &["--log-url", &slow, "--log-key", &provider.head_key],
    );
    expect(&out, &v, 0, "found");
    let told = stderr(&out);
    assert!(
        told.contains("could not be verified before sending") && told.contains("20 s in all"),
        "{told}"
    );
    assert_eq!(provider.remembered_epoch(bob), Some(10));
    assert!(provider.evidence(bob).is_empty());
}

/// A client far behind catches up in steps (issue 18, "Catching up in steps"): with
/// `[transparency] step_max_epochs = 2` each answer's append-only proof spans at most two
/// epochs. Bob remembers epoch 1, five epochs pass: the HTTP answer to `?since=1&steps=1`
/// is a step to the signed head of epoch 3 (without `steps=1`: today's whole proof), and
/// `retrieve --check-transparency` follows the steps (1 -> 3 -> 5 -> 6), each verified and
/// remembered. Inside version 3 replies (no HTTP): each reply carries one step, the client
/// remembers it and exits 75 ("send the request again"), the next request continues from
/// there, and the last one passes; nothing is ever an attack.
#[test]
fn a_client_far_behind_catches_up_in_steps() {
    let provider = Provider::start_with(Backend::Fs, "step_max_epochs = 2", None);
    let gpg = Gpg::new();
    let alice = gpg.generate("Alice", "alice@example.net", "ed25519");
    provider.publish("sendmail", "alice@example.net", &alice.public_armored);
    let bob = "bob@example.net";
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    let v3 = |account: &str| provider.v3_alice("sendmail", account, &[]);
    let carol = "carol@example.net";
    let (out, v) = v3(carol);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(carol), Some(1));

    provider.publish_new(&gpg, "sendmail", &["u2", "u3", "u4", "u5", "u6"]);
    let path = "/.well-known/kst/log/example.net/lookup/alice@example.net";
    let (status, body) = provider.http_get(&format!("{path}?since=1&steps=1"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\nepoch 6\n") && body.contains("\nappend-step 1 3 "),
        "{body}"
    );
    let (status, body) = provider.http_get(&format!("{path}?since=1"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\nappend-only 1 "), "{body}");
    let (status, body) = provider.http_get(&format!("{path}?since=1&steps=2"));
    assert_eq!(status, 400, "{body}");

    // Over HTTP: the steps in one run.
    let (out, v) = provider.checked_retrieve("alice@example.net", &provider.head_key);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(provider.remembered_epoch(bob), Some(6));
    let roots = provider.memory(bob)["roots"].clone();
    for epoch in 1..=6 {
        assert!(roots[epoch.to_string()].is_string(), "{roots}");
    }
    assert!(provider.evidence(bob).is_empty());

    // Inside version 3 replies: one step per request.
    for (want_code, remembered) in [(75, 3), (75, 5), (0, 6)] {
        let (out, v) = v3(carol);
        assert_eq!(code(&out), want_code, "{v}\n{}", stderr(&out));
        if want_code == 75 {
            let error = v["error"].as_str().unwrap_or_default();
            assert!(error.contains("send the request again"), "{error}");
        }
        assert_eq!(provider.remembered_epoch(carol), Some(remembered));
    }
    assert!(provider.evidence(carol).is_empty());
}

/// A client too far behind for any proof the KST will build (`step_max_bytes = 1`: not even
/// one step fits, the answer says `too-far`, no proof is built) starts again from the
/// newest head its required witness cosigned (issue 18): exit 0, the restart noted on stderr
/// and kept as evidence; without `--witness` it is exit 69, nothing remembered anew.
#[test]
fn a_client_too_far_behind_starts_again_from_a_witnessed_head() {
    let bin = kst_binary();
    let (witness, provider, gpg, alice) =
        Provider::with_witness_and_alice_and(&bin, "step_max_bytes = 1");
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness at epoch 1: {}", stderr(&out));
    let entry = witness.entry();
    let retrieve = |account: &str, witnessed: bool| {
        let mut extra = vec![
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
        ];
        if witnessed {
            extra.extend(["--witness", &entry]);
        }
        provider.checked_as("sendmail", account, "alice@example.net", &extra)
    };
    let (bob, dave) = ("bob@example.net", "dave@example.net");
    for account in [bob, dave] {
        let (out, v) = retrieve(account, account == bob);
        assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
        assert_eq!(provider.remembered_epoch(account), Some(1));
    }
    provider.publish_new(&gpg, "sendmail", &["carol", "erin"]);
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness at epoch 3: {}", stderr(&out));
    let (status, body) = provider
        .http_get("/.well-known/kst/log/example.net/lookup/alice@example.net?since=1&steps=1");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\ntoo-far 1\n") && !body.contains("append-"),
        "{body}"
    );

    // Without witnesses: exit 69, the old head stays.
    let (out, v) = retrieve(dave, false);
    assert_eq!(code(&out), 69, "{v}\n{}", stderr(&out));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("too far behind") && error.contains("log-pin"),
        "{error}"
    );
    assert_eq!(provider.remembered_epoch(dave), Some(1));
    assert!(provider.evidence(dave).is_empty());

    // With the witness: the witnessed head of epoch 3 is the new start, said and kept.
    let (out, v) = retrieve(bob, true);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v["fingerprint"], alice.fingerprint.as_str());
    assert!(
        stderr(&out).contains("started again from the answer's head"),
        "{}",
        stderr(&out)
    );
    assert_eq!(provider.remembered_epoch(bob), Some(3));
    let kept = provider.evidence(bob);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let text = std::fs::read_to_string(&kept[0]).unwrap();
    assert!(text.contains("kst key directory restart"), "{text}");
    // From there on, as usual.
    let (out, v) = retrieve(bob, true);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(3));
}

/// Red team round 3 (issue 18), through the real binaries: a client whose remembered head
/// (epoch 2) the witness never cosigned (it cosigned epochs 1 and 4) cannot be tied to the
/// witnessed history when the answer is `too-far`: exit 69 and `kst client log-pin`, the
/// remembered head kept, no new start (before: a new start, exit 0). A client that remembers
/// the cosigned epoch 1 starts again as before.
#[test]
fn rt18_a_too_far_client_whose_head_was_never_cosigned_must_re_pin() {
    let bin = kst_binary();
    let (witness, provider, gpg, _alice) =
        Provider::with_witness_and_alice_and(&bin, "step_max_bytes = 1");
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness at epoch 1: {}", stderr(&out));
    let entry = witness.entry();
    let retrieve = |account: &str| {
        let extra = [
            "--log-url",
            &provider.log_url,
            "--log-key",
            &provider.head_key,
            "--witness",
            &entry,
        ];
        provider.checked_as("sendmail", account, "alice@example.net", &extra)
    };
    let (bob, frank) = ("bob@example.net", "frank@example.net");
    let (out, v) = retrieve(bob);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(1));
    provider.publish_new(&gpg, "sendmail", &["carol"]);
    let (out, v) = retrieve(frank);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(frank), Some(2), "not cosigned");
    provider.publish_new(&gpg, "sendmail", &["erin", "grace"]);
    let out = witness.run(&bin, &provider.log_url, &provider.head_key);
    assert_eq!(code(&out), 0, "witness at epoch 4: {}", stderr(&out));

    let (out, v) = retrieve(frank);
    assert_eq!(code(&out), 69, "{v}\n{}", stderr(&out));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("0 of the required 1 witness(es) cosigned that remembered head")
            && error.contains("kst client log-pin example.net"),
        "{error}"
    );
    assert_eq!(provider.remembered_epoch(frank), Some(2));

    let (out, v) = retrieve(bob);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert!(stderr(&out).contains("started again from the answer's head"));
    assert_eq!(provider.remembered_epoch(bob), Some(4));
}

/// Two version 3 replies handled in the opposite order of their epochs (issue 18's open
/// point): request A is queued while bob remembers epoch 1 and answered at epoch 2; request B
/// (also from epoch 1) is answered at epoch 3 and read first, so bob remembers 3 and the roots
/// of 2 and 3 its proof established. A's reply, read last by `kst client check`, has a head
/// older than the remembered one but of the same history (its root is the one bob's proof
/// gave for epoch 2), and not older than the head A's request named (epoch 1): not a
/// rollback, exit 0, the newer head stays. (An answer older than the head its request named
/// is still a rollback: `the_client_remembers_heads_and_catches_a_rollback_and_a_fork`,
/// `version_3_uses_the_memory_the_pin_and_the_witnesses`.)
#[test]
fn two_version_3_replies_read_in_reverse_order_are_no_rollback() {
    let (provider, gpg, alice) = Provider::with_alice();
    let bob = "bob@example.net";
    let v3 = |sendmail: &str, extra: &[&str]| provider.v3_alice(sendmail, bob, extra);
    let (out, v) = v3("sendmail", &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(1));

    write_queue_script(&provider);
    let (out, v) = v3("sendmail-queue", &["--no-wait"]);
    expect(&out, &v, 75, "pending");
    provider.publish_new(&gpg, "sendmail", &["carol"]);
    flush_queue(&provider);
    provider.publish_new(&gpg, "sendmail", &["dave"]);
    // B: asked from epoch 1 too (A is pending; the memory has not moved), answered at 3.
    let (out, v) = v3("sendmail", &[]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(provider.remembered_epoch(bob), Some(3));
    // A, read now: epoch 2, older than the remembered 3, in its history.
    let (out, v) = provider.client("sendmail", bob, &["check", "--resolver", NO_RESOLVER]);
    assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
    assert_eq!(v[0]["outcome"], "found", "{v}");
    assert_eq!(v[0]["fingerprint"], alice.fingerprint.as_str());
    assert_eq!(
        provider.remembered_epoch(bob),
        Some(3),
        "the newer head stays"
    );
    assert!(provider.evidence(bob).is_empty(), "no false alarm");
}

/// Gathering an epoch (`DomainLog::with_gather`, `[transparency] gather_us`): the fs key
/// store, whose publications of one address can be held inside their store write.
mod gather {
    use std::time::Duration;

    use async_trait::async_trait;
    use kst_core::conformance::{address, test_key};
    use kst_core::store::{NewKey, PublishOutcome};
    use kst_core::testing::{DelegatingStore, StoreHooks};
    use kst_core::transparency::{DomainLog, LogKeys, TransparentStore};
    use kst_core::{Address, Error, KeyStore, Result};
    use tokio::sync::Notify;

    use super::*;

    /// Over the fs key store: a publication of `held` waits inside its store write (after
    /// the write) until `release`, then returns what it wrote or, with `fail`, an error.
    /// While `pass` is set, publications are not held; with `hold_deletes`, a deletion of
    /// `held` waits the same way after its store write.
    struct Held {
        held: Address,
        entered: Notify,
        release: Notify,
        fail: bool,
        pass: std::sync::atomic::AtomicBool,
        hold_deletes: std::sync::atomic::AtomicBool,
    }

    impl Held {
        /// Waits for `release` after `address`'s store write when it is held.
        async fn hold(&self, address: &Address, hold: bool) -> Result<()> {
            if *address != self.held || !hold {
                return Ok(());
            }
            self.entered.notify_one();
            self.release.notified().await;
            if self.fail {
                return Err(Error::unavailable(
                    kst_core::Component::other("held store"),
                    "made to fail by the test",
                ));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl StoreHooks for Held {
        async fn publish(&self, inner: &dyn KeyStore, key: NewKey) -> Result<PublishOutcome> {
            let address = key.address.clone();
            let outcome = inner.publish(key).await?;
            let hold = !self.pass.load(std::sync::atomic::Ordering::SeqCst);
            self.hold(&address, hold).await?;
            Ok(outcome)
        }
        async fn publish_unsynced(
            &self,
            inner: &dyn KeyStore,
            key: NewKey,
        ) -> Result<PublishOutcome> {
            let address = key.address.clone();
            let outcome = inner.publish_unsynced(key).await?;
            let hold = !self.pass.load(std::sync::atomic::Ordering::SeqCst);
            self.hold(&address, hold).await?;
            Ok(outcome)
        }
        async fn delete(&self, inner: &dyn KeyStore, address: &Address) -> Result<bool> {
            let deleted = inner.delete(address).await?;
            let hold = self.hold_deletes.load(std::sync::atomic::Ordering::SeqCst);
            self.hold(address, hold).await?;
            Ok(deleted)
        }
    }

    /// `inner` with `held`'s writes held (publications, until `pass` is set).
    fn held_store(inner: Arc<dyn KeyStore>, held: Address, fail: bool) -> DelegatingStore<Held> {
        DelegatingStore::new(
            inner,
            Held {
                held,
                entered: Notify::new(),
                release: Notify::new(),
                fail,
                pass: false.into(),
                hold_deletes: false.into(),
            },
        )
    }

    /// A publication under way, on a task of its own.
    type Publishing = tokio::task::JoinHandle<Result<PublishOutcome>>;

    struct Bed {
        _dir: tempfile::TempDir,
        held: Arc<DelegatingStore<Held>>,
        log: Arc<DomainLog>,
        store: Arc<TransparentStore>,
        alice: Address,
        bob: Address,
    }

    /// A fresh fs store whose publications of alice are held, its directory gathering for at
    /// most `gather`.
    async fn bed(gather: Duration, fail: bool) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let alice = address("alice@gather.example");
        let bob = address("bob@gather.example");
        let held = Arc::new(held_store(
            Arc::new(FsStore::open(dir.path()).await.unwrap()),
            alice.clone(),
            fail,
        ));
        let log = Arc::new(
            DomainLog::open(
                Arc::new(FsDirectoryStore::new(dir.path())),
                LogKeys::generate("gather.example"),
            )
            .await
            .unwrap()
            .with_gather(gather),
        );
        let store = Arc::new(TransparentStore::new(
            Arc::clone(&held) as Arc<dyn KeyStore>,
            vec![Arc::clone(&log)],
        ));
        Bed {
            _dir: dir,
            held,
            log,
            store,
            alice,
            bob,
        }
    }

    impl Bed {
        /// Starts alice's publication and returns once it is held inside its store write.
        async fn alice_held(&self) -> Publishing {
            let store = Arc::clone(&self.store);
            let key = test_key(&self.alice, 1, 1);
            let task = tokio::spawn(async move { store.publish(key).await });
            self.held.entered.notified().await;
            task
        }

        /// Holds alice's publication in its store write, then publishes bob's: 300 ms later
        /// his store write is long done and his change asked for, and his epoch still waits
        /// for alice's change, on its way (the bound is longer in every caller).
        async fn bob_waits_for_alice(&self) -> (Publishing, Publishing) {
            let alice = self.alice_held().await;
            let bob = self.publish_bob();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!bob.is_finished(), "bob's epoch waits for alice's change");
            (alice, bob)
        }

        fn publish_bob(&self) -> Publishing {
            let store = Arc::clone(&self.store);
            let key = test_key(&self.bob, 2, 1);
            tokio::spawn(async move { store.publish(key).await })
        }

        /// Releases alice's publication, waits for both, and checks that one epoch
        /// recorded them.
        async fn both_in_one_epoch(&self, alice: Publishing, bob: Publishing) {
            self.held.release.notify_one();
            finished(alice).await.unwrap();
            finished(bob).await.unwrap();
            assert_eq!(
                self.epoch_of(&self.alice).await,
                self.epoch_of(&self.bob).await,
                "one epoch records both"
            );
        }

        /// The epoch that recorded `who`'s only entry.
        async fn epoch_of(&self, who: &Address) -> u64 {
            let entries = self.log.entries(who).await.unwrap();
            assert_eq!(entries.len(), 1, "{who}: {entries:?}");
            entries[0].0
        }
    }

    /// Waits at most a minute for `task` (a hung test fails instead of hanging CI).
    async fn finished<T>(task: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("finished within a minute")
            .unwrap()
    }

    /// Bob's change reaches the writer while alice's is still writing the key store: the
    /// writer waits for hers (the bound is long here), and both are recorded in one epoch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_on_its_way_shares_the_epoch_of_one_queued() {
        let bed = bed(Duration::from_secs(10), false).await;
        let (alice, bob) = bed.bob_waits_for_alice().await;
        bed.both_in_one_epoch(alice, bob).await;
        assert!(bed.log.gathering() > Duration::ZERO);
    }

    /// With the wait off (`gather_us = 0`) bob's epoch does not wait for alice's change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_gathering_an_epoch_waits_for_nothing_on_its_way() {
        let bed = bed(Duration::ZERO, false).await;
        let alice = bed.alice_held().await;
        finished(bed.publish_bob()).await.unwrap();
        assert!(!alice.is_finished(), "alice is still held");
        bed.held.release.notify_one();
        finished(alice).await.unwrap();
        assert!(bed.epoch_of(&bed.bob).await < bed.epoch_of(&bed.alice).await);
        assert_eq!(bed.log.gathering(), Duration::ZERO);
    }

    /// The wait is bounded: a change that stays on its way (a key store write that hangs)
    /// holds the others' epoch back by the bound, not longer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wait_for_a_change_on_its_way_is_bounded() {
        let bed = bed(Duration::from_millis(200), false).await;
        let alice = bed.alice_held().await;
        finished(bed.publish_bob()).await.unwrap();
        assert!(!alice.is_finished(), "alice is still held");
        assert!(bed.log.gathering() >= Duration::from_millis(200));
        bed.held.release.notify_one();
        finished(alice).await.unwrap();
    }

    /// A change that fails in the key store leaves the count: the epoch waiting for it goes
    /// ahead at once, not after the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_that_fails_on_its_way_ends_the_wait() {
        let bed = bed(kst_core::transparency::log::MAX_GATHER, true).await;
        let (alice, bob) = bed.bob_waits_for_alice().await;
        bed.held.release.notify_one();
        assert!(finished(alice).await.is_err(), "alice's store write failed");
        finished(bob).await.unwrap();
        assert!(
            bed.log.gathering() < kst_core::transparency::log::MAX_GATHER,
            "the wait ended when alice's change left, not at the bound"
        );
        assert!(bed.log.entries(&bed.alice).await.unwrap().is_empty());
    }

    /// A publication cancelled inside its key store write (its future dropped: a session
    /// timeout, a closed connection, a store timeout) leaves the count with it: the epoch
    /// waiting for it goes ahead at once, not after the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_cancelled_on_its_way_ends_the_wait() {
        let bed = bed(kst_core::transparency::log::MAX_GATHER, false).await;
        let (alice, bob) = bed.bob_waits_for_alice().await;
        alice.abort();
        assert!(alice.await.unwrap_err().is_cancelled());
        finished(bob).await.unwrap();
        assert!(
            bed.log.gathering() < kst_core::transparency::log::MAX_GATHER,
            "the wait ended when alice's change was dropped, not at the bound"
        );
    }

    /// Reads are answered while the writer waits for a change on its way: the thread is idle
    /// then, and a flood that keeps every epoch waiting the bound must not hold every lookup,
    /// head and audit back by it too (nor leave reads only the time between the waits).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_are_answered_while_the_writer_waits() {
        let bed = bed(kst_core::transparency::log::MAX_GATHER, false).await;
        let (alice, bob) = bed.bob_waits_for_alice().await;
        let carol = address("carol@gather.example");
        assert!(bed.log.entries(&carol).await.unwrap().is_empty());
        bed.log.head(kst_core::time::unix_now()).await.unwrap();
        assert_eq!(
            bed.log.gathering(),
            Duration::ZERO,
            "the reads were answered during the wait, not after it"
        );
        assert!(!bob.is_finished(), "bob's epoch still waits");
        bed.both_in_one_epoch(alice, bob).await;
    }

    /// Version 3 replies through kst's service (`Kst::handle`, the path `kst deliver` and
    /// LMTP take) over a `TransparentStore` on the fs store with a real log, about an address
    /// whose changes race the reply (docs/PROTOCOL.md, "Versions": the reply's key and its
    /// answer agree by construction). Every reply is checked as `kst client --transparency`
    /// checks it: the HMAC over the answer (`verify_reply_with_answer`), then the answer
    /// against the head key and the key served (`LogAnswer::verify`).
    mod replies {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use kst_core::client::{self, Pending, Verified};
        use kst_core::ratelimit::RateLimits;
        use kst_core::service::{Decision, Envelope, HandleError, Handled, Kst, Silence};
        use kst_core::transparency::answer::{LogAnswer, Served};
        use kst_core::transparency::entry::DirectoryEntry;
        use kst_core::{Delivery, Mailer, OutgoingMail, Policy};

        use super::*;

        /// A gpg-made key for alice@example.net (kst-core/testdata/keys): `lifecycle-v1`,
        /// `-v2` and `-revoked` are one primary key's versions, `alice` another primary key.
        fn key(name: &str) -> String {
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kst-core/testdata/keys");
            std::fs::read_to_string(dir.join(format!("{name}.pub.asc"))).expect("fixture")
        }

        /// Keeps every reply.
        #[derive(Default)]
        struct Outbox(Mutex<Vec<OutgoingMail>>);

        #[async_trait]
        impl Mailer for Outbox {
            fn name(&self) -> &'static str {
                "outbox"
            }
            async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
                self.0.lock().unwrap().push(mail.clone());
                Ok(Delivery::Sent)
            }
            async fn check(&self) -> Result<()> {
                Ok(())
            }
        }

        impl Outbox {
            /// The reply to `pending`, if one was sent.
            fn reply_to(&self, pending: &Pending) -> Option<Vec<u8>> {
                let id = pending.message_id.as_bytes();
                self.0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|m| m.message.windows(id.len()).any(|w| w == id))
                    .map(|m| m.message.clone())
            }
        }

        struct KstBed {
            _dir: tempfile::TempDir,
            _shared: Shared,
            held: Arc<DelegatingStore<Held>>,
            /// The pool's instances (the first over `held`), taking requests in turn.
            pool: Vec<Kst>,
            turn: AtomicUsize,
            outbox: Arc<Outbox>,
            head_key: [u8; 32],
            head_hex: String,
            alice: Address,
        }

        /// What a checked reply said, and the directory entry its answer proves.
        #[derive(Debug)]
        struct Checked {
            verified: Verified,
            entry: Option<DirectoryEntry>,
        }

        /// kst serving example.net (no rate limits) over the fs store, whose writes of
        /// alice's key are held as `Held` says, with the directory's writer gathering
        /// an epoch for at most `gather`.
        async fn kst_bed(gather: Duration) -> KstBed {
            kst_pool(gather, 1, Shared::Fs).await
        }

        /// Where a pool's key store and directory are.
        enum Shared {
            /// A fresh fs store.
            Fs,
            /// A fresh PostgreSQL database.
            Postgres(TestDb),
            /// A fresh key prefix on the shared Redis.
            Redis(TestPrefix),
        }

        /// [`kst_bed`] as a pool of `instances` processes' worth of kst on one fs store and
        /// its directory (each its own key store handle, directory store, log and writer,
        /// with the same log keys), or on PostgreSQL as kst-bin wires it (each instance its
        /// pools; the keys commit unsynced, covered by the epoch's commit), or on Redis (each
        /// instance its connection); only the first one's writes are held.
        async fn kst_pool(gather: Duration, instances: usize, shared: Shared) -> KstBed {
            let dir = tempfile::tempdir().unwrap();
            let alice = address("alice@example.net");
            let redis = async |p: &TestPrefix| {
                RedisStore::connect(&p.url, &p.prefix)
                    .await
                    .expect("Redis store")
            };
            let key_store = async || -> Arc<dyn KeyStore> {
                match &shared {
                    Shared::Postgres(db) => {
                        Arc::new(PostgresStore::connect(&db.url).await.unwrap()) as _
                    }
                    Shared::Redis(p) => Arc::new(redis(p).await) as _,
                    Shared::Fs => Arc::new(FsStore::open(dir.path()).await.unwrap()) as _,
                }
            };
            let directory = async || -> Arc<dyn DirectoryStore> {
                match &shared {
                    Shared::Postgres(db) => {
                        Arc::new(PgDirectoryStore::connect(&db.url, 4).await.unwrap()) as _
                    }
                    Shared::Redis(p) => Arc::new(redis(p).await.inner().directory()) as _,
                    Shared::Fs => Arc::new(FsDirectoryStore::new(dir.path())) as _,
                }
            };
            let held = Arc::new(held_store(key_store().await, alice.clone(), false));
            let keys = LogKeys::generate("example.net").to_file();
            let outbox = Arc::new(Outbox::default());
            let (mut pool, mut head_key) = (Vec::new(), [0; 32]);
            for i in 0..instances {
                let log = Arc::new(
                    DomainLog::open(directory().await, LogKeys::parse(&keys).unwrap())
                        .await
                        .unwrap()
                        .with_gather(gather),
                );
                head_key = log.head_public_key();
                let keys: Arc<dyn KeyStore> = match i {
                    0 => Arc::clone(&held) as Arc<dyn KeyStore>,
                    _ => key_store().await,
                };
                let mut store = TransparentStore::new(keys, vec![log]);
                if matches!(shared, Shared::Postgres(_)) {
                    store = store.with_unsynced_publications();
                }
                let store = Arc::new(store);
                let mut policy = Policy::new(&["example.net"], &["mail.example.net"]);
                policy.rate_limits = RateLimits::OFF;
                pool.push(Kst::new(policy, store.clone(), outbox.clone()).with_log_answers(store));
            }
            KstBed {
                _dir: dir,
                _shared: shared,
                held,
                pool,
                turn: AtomicUsize::new(0),
                outbox,
                head_key,
                head_hex: head_key.iter().map(|b| format!("{b:02x}")).collect(),
                alice,
            }
        }

        fn envelope(sender: &str) -> Envelope {
            Envelope {
                sender: Some(sender.into()),
                recipient: "keys@example.net".into(),
                sasl_username: None,
            }
        }

        /// A request under way: its pending state and kst's handling of it.
        type Handling = (
            Pending,
            tokio::task::JoinHandle<std::result::Result<Handled, HandleError>>,
        );

        impl KstBed {
            /// Hands `raw` from `sender` to kst on a task of its own.
            fn handle(&self, sender: &str, pending: Pending, raw: Vec<u8>) -> Handling {
                let turn = self.turn.fetch_add(1, Ordering::SeqCst);
                let kst = self.pool[turn % self.pool.len()].clone();
                let env = envelope(sender);
                (
                    pending,
                    tokio::spawn(async move { kst.handle(&env, &raw).await }),
                )
            }

            /// Alice publishes the key `name` in version 3, as her provider's MTA delivers it.
            fn publish(&self, name: &str) -> Handling {
                let req =
                    client::build_publication_with(&self.alice, &key(name), Some(&self.head_hex))
                        .unwrap();
                let mut raw =
                    kst_tests::received_authenticated("alice@example.net", "mail.example.net")
                        .into_bytes();
                raw.extend_from_slice(&req.message);
                self.handle("alice@example.net", req.pending, raw)
            }

            /// Alice's publication of `name`, started and held inside its key store write.
            async fn publish_held(&self, name: &str) -> Handling {
                let handling = self.publish(name);
                self.held.entered.notified().await;
                handling
            }

            /// Alice deletes her key in version 3.
            fn delete(&self) -> Handling {
                let req = client::build_deletion_with(&self.alice, Some(&self.head_hex));
                let mut raw =
                    kst_tests::received_authenticated("alice@example.net", "mail.example.net")
                        .into_bytes();
                raw.extend_from_slice(&req.message);
                self.handle("alice@example.net", req.pending, raw)
            }

            /// Carol asks for alice's key in version 3.
            fn retrieve(&self) -> Handling {
                let req = client::build_retrieval_with(
                    &address("carol@acme.net"),
                    &self.alice,
                    Some(&self.head_hex),
                );
                self.handle("carol@acme.net", req.pending, req.message)
            }

            /// The reply to `pending`, checked as the client checks it; panics on any failure
            /// (the client's exit 5).
            async fn check(&self, pending: &Pending) -> Checked {
                let raw = self.outbox.reply_to(pending).expect("a reply was sent");
                let reply = client::verify_reply_with_answer(pending, &raw)
                    .unwrap_or_else(|e| panic!("the reply's HMAC: {e}"));
                let text = reply
                    .log_answer
                    .expect("a version 3 reply carries the answer");
                let answer = LogAnswer::parse(&text).unwrap();
                let packets = match &reply.verified {
                    Verified::Published { armored, .. } | Verified::Found { armored, .. } => {
                        Some(kst_core::openpgp::dearmor_public_key(armored, 1 << 20).unwrap())
                    }
                    Verified::NotFound { .. } | Verified::Deleted { .. } => None,
                    other => panic!("not an answer about the address: {other:?}"),
                };
                let served = packets.as_deref().map_or(Served::Nothing, Served::Key);
                let entry = answer
                    .verify(&self.head_key, &self.alice, served)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("the client calls this reply an attack (exit 5): {e}")
                    });
                Checked {
                    verified: reply.verified,
                    entry,
                }
            }

            /// Waits for `handling` and checks its reply.
            async fn answered(&self, handling: Handling) -> Checked {
                let (pending, task) = handling;
                let handled = finished(task).await.unwrap();
                assert!(handled.reply.is_some(), "{handled:?}");
                self.check(&pending).await
            }

            /// The version of alice's current record in the key store.
            async fn stored_version(&self) -> Option<u64> {
                self.held.get(&self.alice).await.unwrap().map(|r| r.version)
            }
        }

        fn fingerprint_of(checked: &Checked) -> &str {
            match &checked.verified {
                Verified::Published { fingerprint, .. } | Verified::Found { fingerprint, .. } => {
                    fingerprint
                }
                other => panic!("no key: {other:?}"),
            }
        }

        /// A retrieval made while a publication of the address waits between its key store
        /// write and the epoch that records it: the store already holds the new key, the
        /// directory proves the version before (or absence). The reply serves what the answer
        /// proves, and the client accepts it. Before: the reply served the store's new key
        /// with the answer about the old one, and the client reported an attack (exit 5).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_retrieval_racing_a_publication_serves_what_the_answer_proves() {
            let bed = kst_bed(Duration::ZERO).await;
            // Alice's first key, in the store and not yet in the directory: "not found",
            // proven by absence.
            let first = bed.publish_held("lifecycle-v1").await;
            assert_eq!(bed.stored_version().await, Some(1));
            let (pending, retrieving) = bed.retrieve();
            let carol = bed.answered((pending.clone(), retrieving)).await;
            assert!(
                matches!(carol.verified, Verified::NotFound { .. }),
                "{carol:?}"
            );
            assert_eq!(carol.entry, None, "absent from the directory");
            // What kst sent before, the store's new key with that answer, is exit 5: the
            // client's check is as strict as ever.
            let raw = bed.outbox.reply_to(&pending).unwrap();
            let text = client::verify_reply_with_answer(&pending, &raw)
                .unwrap()
                .log_answer
                .unwrap();
            let stored = bed.held.get(&bed.alice).await.unwrap().unwrap();
            let refused = LogAnswer::parse(&text)
                .unwrap()
                .verify(&bed.head_key, &bed.alice, Served::Key(&stored.key))
                .await;
            assert!(refused.is_err(), "{refused:?}");
            bed.held.release.notify_one();
            let alice = bed.answered(first).await;
            assert_eq!(alice.entry.as_ref().unwrap().version, 1);

            // Her update, in the store and not yet in the directory: version 1 is served.
            let update = bed.publish_held("lifecycle-v2").await;
            assert_eq!(bed.stored_version().await, Some(2));
            let carol = bed.answered(bed.retrieve()).await;
            assert_eq!(carol.entry.as_ref().unwrap().version, 1, "{carol:?}");
            assert_eq!(fingerprint_of(&carol), fingerprint_of(&alice));
            bed.held.release.notify_one();
            let alice = bed.answered(update).await;
            assert_eq!(alice.entry.as_ref().unwrap().version, 2);
            // Once recorded, version 2 is served.
            let carol = bed.answered(bed.retrieve()).await;
            assert_eq!(carol.entry.as_ref().unwrap().version, 2, "{carol:?}");
        }

        /// A publication's confirmation raced by a newer publication of the address, recorded
        /// first: the directory proves only the newer version. Of the same primary key (it
        /// holds the older one merged), the confirmation carries it, as a redelivery's does;
        /// of another primary key, nothing is sent (`superseded`): no confirmation of the
        /// older key can be proven, and the newer one's is the owner's last word. Before: the
        /// confirmation carried the older key with the answer about the newer one: exit 5.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_confirmation_raced_by_a_newer_publication_is_proven_or_not_sent() {
            let bed = kst_bed(Duration::ZERO).await;
            let older = bed.publish_held("lifecycle-v1").await;
            bed.held.pass.store(true, Ordering::SeqCst);
            let newer = bed.answered(bed.publish("lifecycle-v2")).await;
            assert_eq!(newer.entry.as_ref().unwrap().version, 2);
            bed.held.release.notify_one();
            let confirmed = bed.answered(older).await;
            assert_eq!(
                confirmed.entry.as_ref().unwrap().version,
                2,
                "{confirmed:?}"
            );
            assert_eq!(fingerprint_of(&confirmed), fingerprint_of(&newer));

            // Another primary key published while the revocation of the first waits.
            bed.held.pass.store(false, Ordering::SeqCst);
            let (pending, revoking) = bed.publish_held("lifecycle-revoked").await;
            bed.held.pass.store(true, Ordering::SeqCst);
            let other = bed.answered(bed.publish("alice")).await;
            assert_ne!(fingerprint_of(&other), fingerprint_of(&newer));
            assert_eq!(other.entry.as_ref().unwrap().version, 4);
            bed.held.release.notify_one();
            let handled = finished(revoking).await.unwrap();
            assert_eq!(handled.decision, Decision::Ignored(Silence::Superseded));
            assert!(bed.outbox.reply_to(&pending).is_none(), "no reply");
            assert_eq!(bed.stored_version().await, Some(4), "nothing undone");
        }

        /// A deletion held between its key store write and its epoch: a retrieval meanwhile
        /// cannot serve the key the directory still proves (the store no longer has it), so it
        /// is a temporary failure, nothing sent (the MTA delivers it again); and a publication
        /// made before the deletion's reply leaves that reply unsent (`superseded`).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_deletion_racing_a_retrieval_and_a_publication() {
            let bed = kst_bed(Duration::ZERO).await;
            bed.held.pass.store(true, Ordering::SeqCst);
            bed.answered(bed.publish("lifecycle-v1")).await;
            bed.held.hold_deletes.store(true, Ordering::SeqCst);
            let (pending, deleting) = bed.delete();
            bed.held.entered.notified().await;
            assert_eq!(bed.stored_version().await, None);
            let (carol, retrieving) = bed.retrieve();
            match finished(retrieving).await {
                Err(HandleError::Temporary(e)) => {
                    assert!(e.is_temporary(), "{e}");
                    assert!(e.to_string().contains("does not hold"), "{e}");
                }
                other => panic!("{other:?}"),
            }
            assert!(bed.outbox.reply_to(&carol).is_none(), "no reply");
            // A publication while the deletion waits, recorded first.
            let again = bed.answered(bed.publish("alice")).await;
            assert!(matches!(again.verified, Verified::Published { .. }));
            bed.held.release.notify_one();
            let handled = finished(deleting).await.unwrap();
            assert_eq!(handled.decision, Decision::Ignored(Silence::Superseded));
            assert!(bed.outbox.reply_to(&pending).is_none(), "no reply");
            let carol = bed.answered(bed.retrieve()).await;
            assert_eq!(fingerprint_of(&carol), fingerprint_of(&again));
        }

        /// Red team: a stream of changes of one address (two owners' clients publishing
        /// two primary keys and their versions, and deleting, at once) while three clients
        /// retrieve it without pause, the directory gathering epochs for 2 ms. Every reply is
        /// one the client accepts; the rest are temporary failures (nothing sent) or
        /// confirmations left unsent because a newer change superseded them. Never a wrong
        /// key, never exit 5.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt_replies_racing_a_stream_of_changes_are_all_proven() {
            stream_of_changes(kst_bed(Duration::from_millis(2)).await).await;
        }

        /// The same across a pool: two instances on one fs store and directory take the
        /// requests in turn, so a reply's answer is often read by another process's log than
        /// the one that recorded the change, and the store by another handle.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt_replies_racing_a_stream_of_changes_across_a_pool_are_all_proven() {
            stream_of_changes(kst_pool(Duration::from_millis(2), 2, Shared::Fs).await).await;
        }

        /// The same across a pool on PostgreSQL (a fresh database), as kst-bin wires it: the
        /// keys commit unsynced, covered by the epoch's commit.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt_replies_racing_a_stream_of_changes_on_postgres_are_all_proven() {
            let db = Shared::Postgres(TestDb::new());
            stream_of_changes(kst_pool(Duration::from_millis(2), 2, db).await).await;
        }

        /// The same across a pool on Redis (a fresh key prefix).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn rt_replies_racing_a_stream_of_changes_on_redis_are_all_proven() {
            let prefix = Shared::Redis(TestPrefix::new());
            stream_of_changes(kst_pool(Duration::from_millis(2), 2, prefix).await).await;
        }

        /// The red team's stream: 24 changes by two owners' clients, three readers.
        async fn stream_of_changes(bed: KstBed) {
            let bed = Arc::new(bed);
            bed.held.pass.store(true, Ordering::SeqCst);
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let counts: Arc<[AtomicUsize; 7]> = Arc::new(Default::default());
            const FOUND: usize = 0;
            const NOT_FOUND: usize = 1;
            const CONFIRMED: usize = 2;
            const SUPERSEDED: usize = 3;
            const TEMPORARY: usize = 4;
            const OLDER_THAN_STORE: usize = 5;
            const TEMPORARY_READ: usize = 6;
            async fn tally(bed: &KstBed, counts: &[AtomicUsize; 7], handling: Handling) {
                let (pending, task) = handling;
                let read = matches!(pending.asked, client::Asked::Retrieval { .. });
                match finished(task).await {
                    Ok(h) if h.decision == Decision::Ignored(Silence::Superseded) => {
                        assert!(bed.outbox.reply_to(&pending).is_none());
                        counts[SUPERSEDED].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(h) => {
                        let stored = bed.stored_version().await;
                        let checked = bed.check(&pending).await;
                        let i = match (&h.decision, &checked.verified) {
                            (Decision::Answered { .. }, Verified::Found { .. }) => FOUND,
                            (Decision::Answered { .. }, Verified::NotFound { .. }) => NOT_FOUND,
                            (Decision::Published { .. }, Verified::Published { .. })
                            | (Decision::Deleted { .. }, Verified::Deleted { .. }) => CONFIRMED,
                            other => panic!("{other:?}"),
                        };
                        let served = checked.entry.as_ref().map(|e| e.version);
                        if i == FOUND && stored.is_some_and(|s| Some(s) > served) {
                            counts[OLDER_THAN_STORE].fetch_add(1, Ordering::SeqCst);
                        }
                        counts[i].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(HandleError::Temporary(e)) if e.is_temporary() => {
                        eprintln!("temporary failure (retrieval: {read}): {e}");
                        assert!(bed.outbox.reply_to(&pending).is_none());
                        counts[if read { TEMPORARY_READ } else { TEMPORARY }]
                            .fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let mut owners = tokio::task::JoinSet::new();
            for keys in [
                [
                    "lifecycle-v1",
                    "alice",
                    "lifecycle-v2",
                    "-",
                    "alice",
                    "lifecycle-v1",
                ],
                [
                    "alice",
                    "lifecycle-v2",
                    "lifecycle-v1",
                    "alice",
                    "-",
                    "lifecycle-v2",
                ],
            ] {
                let (bed, counts) = (Arc::clone(&bed), Arc::clone(&counts));
                owners.spawn(async move {
                    for _round in 0..2 {
                        for name in keys {
                            let handling = match name {
                                "-" => bed.delete(),
                                _ => bed.publish(name),
                            };
                            tally(&bed, &counts, handling).await;
                        }
                    }
                });
            }
            let mut readers = tokio::task::JoinSet::new();
            for _ in 0..3 {
                let (bed, counts, done) =
                    (Arc::clone(&bed), Arc::clone(&counts), Arc::clone(&done));
                readers.spawn(async move {
                    while !done.load(Ordering::SeqCst) {
                        tally(&bed, &counts, bed.retrieve()).await;
                    }
                });
            }
            while let Some(owner) = owners.join_next().await {
                owner.unwrap();
            }
            done.store(true, Ordering::SeqCst);
            while let Some(reader) = readers.join_next().await {
                reader.unwrap();
            }
            let n = |i: usize| counts[i].load(Ordering::SeqCst);
            eprintln!(
                "retrievals: found {}, not found {}, temporary {}; found while the store held \
                 a newer version: {}; changes: confirmed {}, superseded {}, temporary {}",
                n(FOUND),
                n(NOT_FOUND),
                n(TEMPORARY_READ),
                n(OLDER_THAN_STORE),
                n(CONFIRMED),
                n(SUPERSEDED),
                n(TEMPORARY),
            );
            assert_eq!(
                n(CONFIRMED) + n(SUPERSEDED) + n(TEMPORARY),
                24,
                "every change decided"
            );
            assert!(n(FOUND) > 0 && n(CONFIRMED) > 0, "the stream was answered");
        }
    }
}

/// A look-up racing another process's deletion of the address: a deletion's epoch overwrites
/// the address's earlier values with akd's tombstone in place ("Deletion"), so a look-up that
/// read the root before that commit and the value after it proves the old epoch's latest
/// version with an empty value, which no client accepts (found by the red team on
/// PostgreSQL, `gather::replies`, where two instances share the directory).
mod withdrawn {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use kst_core::conformance::{address, test_key};
    use kst_core::testing::{DelegatingDirectory, DirectoryHooks};
    use kst_core::transparency::answer::Served;
    use kst_core::transparency::{DirectoryStoreError, DomainLog, LogKeys, TransparentStore};
    use tokio::sync::Notify;

    use super::*;

    /// The hooks of a directory store whose `hold_at`-th value-state read from now (1: the
    /// next) waits for `release` before it reads; 0: none waits.
    struct HeldReads {
        hold_at: AtomicUsize,
        reads: AtomicUsize,
        entered: Notify,
        release: Notify,
    }

    impl HeldReads {
        /// Counts a value-state read and holds it when it is the one.
        async fn read(&self) {
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

    #[async_trait]
    impl DirectoryHooks for HeldReads {
        async fn value_states(
            &self,
            inner: &dyn DirectoryStore,
            domain: &str,
            label: &[u8],
        ) -> std::result::Result<Vec<(u64, Vec<u8>)>, DirectoryStoreError> {
            self.read().await;
            inner.value_states(domain, label).await
        }
        async fn value_states_batch(
            &self,
            inner: &dyn DirectoryStore,
            domain: &str,
            labels: &[Vec<u8>],
        ) -> std::result::Result<Vec<(Vec<u8>, u64, Vec<u8>)>, DirectoryStoreError> {
            self.read().await;
            inner.value_states_batch(domain, labels).await
        }
    }

    /// Process B looks alice up; its last value-state read waits while process A deletes
    /// her key (A's epoch withdraws her value). B's answer must prove what a client accepts:
    /// the deletion (the look-up read again), never her old version with an empty value.
    /// Before: the answer proved epoch 1's version with an empty value: exit 5.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_up_racing_another_process_deletion_proves_what_a_client_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let keys = LogKeys::generate("example.net").to_file();
        let log_a = Arc::new(
            DomainLog::open(
                Arc::new(FsDirectoryStore::new(dir.path())),
                LogKeys::parse(&keys).unwrap(),
            )
            .await
            .unwrap(),
        );
        let held = Arc::new(DelegatingDirectory::new(
            Arc::new(FsDirectoryStore::new(dir.path())),
            HeldReads {
                hold_at: AtomicUsize::new(0),
                reads: AtomicUsize::new(0),
                entered: Notify::new(),
                release: Notify::new(),
            },
        ));
        let log_b = Arc::new(
            DomainLog::open(Arc::clone(&held) as _, LogKeys::parse(&keys).unwrap())
                .await
                .unwrap(),
        );
        let store_a = TransparentStore::new(
            Arc::new(FsStore::open(dir.path()).await.unwrap()),
            vec![Arc::clone(&log_a)],
        );
        let alice = address("alice@example.net");
        store_a.publish(test_key(&alice, 1, 1)).await.unwrap();
        let now = kst_core::time::unix_now();
        // How many value-state reads one look-up of alice at this epoch takes (once warm).
        log_b.answer(&alice, now).await.unwrap();
        let before = held.reads.load(Ordering::SeqCst);
        let answer = log_b.answer(&alice, now).await.unwrap();
        let reads = held.reads.load(Ordering::SeqCst) - before;
        assert!(reads > 0, "a look-up reads value states");
        answer
            .verify(
                &log_b.head_public_key(),
                &alice,
                Served::Key(&test_key(&alice, 1, 1).key),
            )
            .await
            .unwrap();

        // The last of them waits while A deletes alice.
        held.hold_at.store(reads, Ordering::SeqCst);
        let looking = tokio::spawn({
            let (log_b, alice) = (Arc::clone(&log_b), alice.clone());
            async move { log_b.answer(&alice, now).await }
        });
        held.entered.notified().await;
        store_a.delete(&alice).await.unwrap();
        held.release.notify_one();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(60), looking)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        answer
            .verify(&log_b.head_public_key(), &alice, Served::Nothing)
            .await
            .unwrap_or_else(|e| panic!("epoch {}: {e}", answer.head.head.epoch));
        assert_eq!(answer.head.head.epoch, 2, "the deletion's epoch");
    }
}

/// Runs `body` with the URL of a proxy in front of `provider`'s directory, one request per
/// connection: each request is answered with what `answer` returns for its request line,
/// given a function that forwards the request to the directory and returns its response
/// (`None`: the client gets no answer). The proxy stops when `body` returns, also when it
/// fails an assertion.
fn proxied(
    provider: &Provider,
    answer: impl Fn(&str, &dyn Fn() -> Option<Vec<u8>>) -> Option<Vec<u8>> + Sync,
    body: impl FnOnce(&str),
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let honest = provider.log_url.trim_start_matches("http://").to_string();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut client) = client else { continue };
                let Some((line, rest)) = read_request(&mut client) else {
                    continue;
                };
                if let Some(response) = answer(&line, &|| forward(&honest, &line, &rest)) {
                    let _ = client.write_all(&response);
                }
            }
        });
        // The proxy stops also when `body` fails an assertion (else the scope waits for it
        // for ever).
        struct Stop<'a>(&'a AtomicBool, std::net::SocketAddr);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
                let _ = std::net::TcpStream::connect(self.1);
            }
        }
        let _stop = Stop(&stop, at);
        body(&format!("http://{at}"));
    });
}

/// Runs `body` with the URL of a proxy in front of `provider`'s directory that publishes a
/// key for a new address (`busyN@example.net`) before it forwards each request whose line
/// holds `route`: the directory records an epoch right before each such read (a busy
/// domain). Returns how many such requests it forwarded.
fn while_busy(provider: &Provider, gpg: &Gpg, route: &str, body: impl FnOnce(&str)) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = AtomicUsize::new(0);
    proxied(
        provider,
        |line, forward| {
            if line.contains(route) {
                let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                provider.publish_new(gpg, "sendmail", &[&format!("busy{n}")]);
            }
            forward()
        },
        body,
    );
    seen.load(Ordering::SeqCst)
}

/// The two-step check's history path end to end (issue 18, docs/PROTOCOL.md "The two-step
/// check of versions 1 and 2", steps 2 to 5), through the real binaries. The answer's own
/// proof decides first (`log_race::recorded_before_sending`: the address's newest version
/// recorded at or before the request's `verified_epoch`, exit 5 without the history), so
/// the history's checks run only when that version was recorded after `verified_epoch`.
/// Each test here makes that so the way it happens: the client verified epoch 1 (alice's
/// first key), alice publishes a new key (epoch 2), and the request is sent with epoch 1
/// (the directory could not be read just before sending, so the epoch remembered before is
/// used; or the request was sent at epoch 1 and is answered after the change), or the
/// answer proves the address absent (no version's epoch to compare). Then a provider serves
/// a stale key, or one the directory never held, and the history route is honest, replayed,
/// forked with the head key, forged, down, or always an epoch ahead.
mod history_path {
    use super::*;

    const ALICE: &str = "alice@example.net";
    const BOB: &str = "bob@example.net";
    const DAVE: &str = "dave@example.net";

    /// The phrase of a mismatch the answer's own proof decided (not the history).
    const BY_THE_ANSWER: &str = "proves the newest version of";

    /// A provider whose directory recorded alice's first key at epoch 1 and her second at
    /// epoch 2, clients that verified epoch 1, and a stale replica of epoch 1.
    struct Bed {
        provider: Provider,
        gpg: Gpg,
        /// A stale replica (`sendmail-old`, its directory at `old_url`): a KST on a copy of
        /// the store and directory at epoch 1, with the same directory keys.
        old_url: String,
        _old: ServeProcess,
        /// Alice's history as the directory served it at epoch 1 (anyone may capture it).
        history_at_1: String,
        /// Alice's second key, recorded at epoch 2.
        alice2: kst_tests::GpgKey,
    }

    impl Bed {
        /// The bed; each of `accounts` retrieved alice's first key at epoch 1 and remembers
        /// that epoch.
        fn new(accounts: &[&str]) -> Bed {
            use std::os::unix::fs::PermissionsExt;
            let (provider, gpg, _alice) = Provider::with_alice();
            let (old, old_url) = provider.stale_twin();
            let (status, history_at_1) =
                provider.http_get("/.well-known/kst/log/example.net/history/alice@example.net");
            assert_eq!(status, 200, "{history_at_1}");
            for account in accounts {
                let (out, v) =
                    provider.checked_as("sendmail", account, ALICE, &provider.log_args());
                expect(&out, &v, 0, "found");
                assert_eq!(provider.remembered_epoch(account), Some(1));
            }
            // The clients' gpg home (`--import`), empty.
            let keyring = provider.path("no-gnupg");
            std::fs::create_dir(&keyring).unwrap();
            std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o700)).unwrap();
            let alice2 = gpg.generate("Alice", ALICE, "ed25519");
            provider.publish("sendmail", ALICE, &alice2.public_armored);
            Bed {
                provider,
                gpg,
                old_url,
                _old: old,
                history_at_1,
                alice2,
            }
        }

        /// `account`'s `retrieve alice@example.net --check-transparency --import` through
        /// `sendmail`, the directory read at `url` behind a proxy that answers the first
        /// look-up (the one before sending) 503: the request is sent with the epoch
        /// `account` remembered before (1, or that of a later retrieval), and alice's newest
        /// change is after it.
        fn retrieve(&self, sendmail: &str, account: &str, url: &str) -> (Output, Value) {
            let remembered = self
                .provider
                .remembered_epoch(account)
                .expect("a remembered epoch");
            let down_once = unavailable_proxy(url, "/lookup/", 1);
            let (out, v) = self.provider.checked_as(
                sendmail,
                account,
                ALICE,
                &[
                    "--log-url",
                    &down_once,
                    "--log-key",
                    &self.provider.head_key,
                    "--import",
                ],
            );
            let told = stderr(&out);
            assert!(
                told.contains("could not be verified before sending")
                    && told.contains(&format!("the epoch remembered before, {remembered}")),
                "{told}"
            );
            (out, v)
        }

        /// [`Bed::retrieve`] is exit 5, decided by the history (not by the answer's own
        /// proof), its error saying each of `why`, nothing imported, the answer and what was
        /// read of the history kept as `account`'s one evidence file; its text.
        fn refused(&self, sendmail: &str, account: &str, url: &str, why: &[&str]) -> String {
            let (out, v) = self.retrieve(sendmail, account, url);
            expect(&out, &v, 5, "attack");
            let error = v["error"].as_str().unwrap_or_default();
            for w in why {
                assert!(error.contains(w), "{w:?}: {error}");
            }
            assert!(!error.contains(BY_THE_ANSWER), "{error}");
            assert!(error.contains("evidence kept in"), "{error}");
            assert_eq!(self.imported(), "", "nothing imported");
            let evidence = self.provider.evidence(account);
            assert_eq!(evidence.len(), 1, "{evidence:?}");
            let kept = std::fs::read_to_string(&evidence[0]).unwrap();
            assert!(kept.contains("kst-log-answer"), "{kept}");
            kept
        }

        /// The primary keys' fingerprints in the clients' gpg keyring (what `--import`
        /// imported), one per line.
        fn imported(&self) -> String {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(self.provider.path("no-gnupg"))
                .args(["--batch", "--with-colons", "--list-keys"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            lines
                .windows(2)
                .filter(|w| w[0].starts_with("pub:") && w[1].starts_with("fpr:"))
                .map(|w| format!("{}\n", w[1].trim_start_matches("fpr:").trim_matches(':')))
                .collect()
        }
    }

    /// The honest case the history path is for: the stale replica serves alice's first key,
    /// which the directory superseded at epoch 2, after the epoch 1 the request was sent
    /// with: a change on the reply's way as far as the client can tell, exit 75 naming the
    /// epochs, nothing imported, no evidence, the answer's head remembered. Retrieved again
    /// (the head verified before sending), the current key is imported.
    #[test]
    fn a_change_recorded_after_the_verified_epoch_is_a_race_and_nothing_is_imported() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let (out, v) = bed.retrieve("sendmail-old", BOB, &provider.log_url);
        expect(&out, &v, 75, "error");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("changed while the reply was on its way")
                && error.contains("superseded at epoch 2")
                && error.contains("(epoch 1)")
                && error.contains("nothing was imported"),
            "{error}"
        );
        assert!(provider.evidence(BOB).is_empty(), "no false alarm");
        assert_eq!(bed.imported(), "", "nothing imported");
        assert_eq!(provider.remembered_epoch(BOB), Some(2));

        let mut again = provider.log_args().to_vec();
        again.push("--import");
        let (out, v) = provider.checked_as("sendmail", BOB, ALICE, &again);
        expect(&out, &v, 0, "found");
        assert_eq!(v["imported"], true, "{v}");
        assert_eq!(bed.imported(), format!("{}\n", bed.alice2.fingerprint));
    }

    /// Superseded at or before the epoch the request was sent with, decided by the history:
    /// bob verified epoch 2 (alice's second key), alice publishes a third key (epoch 3), and
    /// the stale replica serves her first key, which the change of epoch 2 superseded. The
    /// answer proves the newest version recorded at epoch 3, after 2, so it cannot decide;
    /// the history shows the served key superseded at epoch 2: exit 5, a stale key.
    #[test]
    fn a_key_superseded_by_the_verified_epoch_is_stale_by_the_history() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let (out, v) = provider.checked_as("sendmail", BOB, ALICE, &provider.log_args());
        expect(&out, &v, 0, "found");
        assert_eq!(provider.remembered_epoch(BOB), Some(2));
        let alice3 = bed.gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail", ALICE, &alice3.public_armored);
        let kept = bed.refused(
            "sendmail-old",
            BOB,
            &provider.log_url,
            &[
                "shows the served key superseded at epoch 2, at or before the epoch 2 the client \
               had verified",
            ],
        );
        assert!(kept.contains("kst-log-history-v1"), "{kept}");
    }

    /// "No key" for an address held since before the epoch the request was sent with (a
    /// provider hiding alice's key: deleted on the stale replica only): the history shows
    /// "no key" superseded by her first publication, epoch 1, at or before the epoch 1 bob
    /// sent with: exit 5.
    #[test]
    fn no_key_for_an_address_held_before_the_verified_epoch_is_stale_by_the_history() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let (out, v) = provider.client("sendmail-old", ALICE, &["delete"]);
        expect(&out, &v, 0, "deleted");
        bed.refused(
            "sendmail-old",
            BOB,
            &provider.log_url,
            &["shows \"no key\" superseded at epoch 1, at or before the epoch 1"],
        );
    }

    /// A forged key across a deletion (a deletion withdraws the values before it, so the
    /// history matches any key as the state right before it: docs/TRANSPARENCY.md,
    /// "Deletion"): alice deletes her key (epoch 3), bob verifies that epoch, alice
    /// publishes again (epoch 4), and the KST serves an insider's twin. Sent with epoch 3,
    /// decided by the history: the twin could only be the state before the deletion,
    /// superseded at epoch 3, at or before 3: exit 5.
    #[test]
    fn a_forged_key_across_a_deletion_before_the_verified_epoch_is_stale_by_the_history() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let (out, v) = provider.client("sendmail", ALICE, &["delete"]);
        expect(&out, &v, 0, "deleted");
        let (out, v) = provider.checked_as("sendmail", BOB, ALICE, &provider.log_args());
        expect(&out, &v, 1, "not-found");
        assert_eq!(provider.remembered_epoch(BOB), Some(3));
        let alice3 = bed.gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail", ALICE, &alice3.public_armored);
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
        bed.refused(
            "sendmail",
            BOB,
            &provider.log_url,
            &["shows the served key superseded at epoch 3, at or before the epoch 3"],
        );
    }

    /// A key the directory never held (put in the store behind its back, served by the KST)
    /// sent with epoch 1: the honest history (alice's two versions) never held it, exit 5
    /// with the history kept beside the answer. A history route answering 404 (the directory
    /// never held the address, though its answer proves two versions): exit 5.
    #[test]
    fn a_key_the_directory_never_held_is_an_attack_by_the_history() {
        let bed = Bed::new(&[BOB, DAVE]);
        let provider = &bed.provider;
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
        let kept = bed.refused(
            "sendmail",
            BOB,
            &provider.log_url,
            &["(epoch 2, 2 versions down to version 1) never held the served key"],
        );
        assert!(
            kept.contains("-- history --") && kept.contains("kst-log-history-v1"),
            "{kept}"
        );
        assert_eq!(provider.remembered_epoch(BOB), Some(2));

        let not_found = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\
                          Content-Length: 10\r\nConnection: close\r\n\r\nnot found\n";
        let no_history = answering_proxy(
            &provider.log_url,
            "/history/",
            not_found.to_vec(),
            usize::MAX,
        );
        bed.refused(
            "sendmail",
            DAVE,
            &no_history,
            &["says the directory never held alice@example.net"],
        );
    }

    /// A key for an address the directory never held (an insider's, in the store behind its
    /// back): the answer proves the address absent, which only the history can tie to a
    /// first publication on the way (`recorded_before_sending` cannot decide without a
    /// version), so the history is read even with the head verified before sending. The
    /// directory has no history of the address (404): exit 5, the answer kept, nothing
    /// imported.
    #[test]
    fn a_key_for_an_address_never_held_is_an_attack_by_the_history() {
        let (provider, _gpg, _alice) = Provider::with_alice();
        let nobody = "nobody@example.net";
        let insider = Gpg::new();
        let forged = insider.generate("Nobody", nobody, "ed25519");
        provider.publish("sendmail-no-log", nobody, &forged.public_armored);
        let mut flags = provider.log_args().to_vec();
        flags.push("--import");
        let (out, v) = provider.checked_as("sendmail", BOB, nobody, &flags);
        expect(&out, &v, 5, "attack");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("/history/")
                && error.contains("says the directory never held nobody@example.net")
                && !error.contains(BY_THE_ANSWER),
            "{error}"
        );
        let evidence = provider.evidence(BOB);
        assert_eq!(evidence.len(), 1, "{evidence:?}");
        let kept = std::fs::read_to_string(&evidence[0]).unwrap();
        assert!(kept.contains("kst-log-answer"), "{kept}");
        assert!(!provider.path("no-gnupg").exists(), "nothing imported");
        assert_eq!(provider.remembered_epoch(BOB), Some(1));
    }

    /// A history replayed from before (alice's as epoch 1 served it: genuine, signed with
    /// the head key) in front of the stale replica's key, which the honest history would
    /// call a race (exit 75, above): its head is older than the answer read before it,
    /// exit 5 with it kept.
    #[test]
    fn a_history_replayed_from_before_is_an_attack_on_the_history_path() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let replaying = replaying_proxy(
            &provider.log_url,
            "/history/",
            bed.history_at_1.clone(),
            usize::MAX,
        );
        let kept = bed.refused(
            "sendmail-old",
            BOB,
            &replaying,
            &[
                "the history's head is of epoch 1, older than the directory's answer (epoch 2)",
                "a history replayed from before",
            ],
        );
        assert!(kept.contains(&bed.history_at_1), "{kept}");
        assert_eq!(provider.remembered_epoch(BOB), Some(2));
    }

    /// A fork signed with the head key: the stale replica's directory (the same keys)
    /// records the insider's twin for alice (its epoch 2), then a third key (its epoch 3),
    /// so its history shows the twin superseded at epoch 3, after the epoch 1 the request
    /// was sent with: a race, were it the directory's history. The KST serves the twin (in
    /// its store behind the honest directory's back) and the history comes from the fork.
    /// Ahead of the honest directory (epoch 2): the client asks for a newer answer, which
    /// stays at epoch 2: a history from another directory, exit 5. Once the honest
    /// directory reaches epoch 3 (carol's key): another root for the epoch the client
    /// verified, a fork, exit 5. The fork's head and root are never remembered.
    #[test]
    fn a_forked_history_signed_with_the_head_key_is_an_attack() {
        let bed = Bed::new(&[BOB, DAVE]);
        let provider = &bed.provider;
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
        provider.publish("sendmail-old", ALICE, &twin.public_armored);
        let third = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-old", ALICE, &third.public_armored);
        let (status, forked_text) = kst_tests::serve::http_get(
            bed.old_url.trim_start_matches("http://").parse().unwrap(),
            "/.well-known/kst/log/example.net/history/alice@example.net",
        );
        assert_eq!(status, 200, "{forked_text}");
        assert!(forked_text.contains("\nepoch 3\n"), "{forked_text}");
        let forked = forging_proxy(&provider.log_url, "/history/", Some(&bed.old_url), false);

        let kept = bed.refused(
            "sendmail",
            BOB,
            &forked,
            &[
                "the directory's history was of epoch 3, and its answer read after it is of \
                 epoch 2: a history from another directory",
            ],
        );
        assert!(kept.contains(&forked_text), "{kept}");
        assert_eq!(provider.remembered_epoch(BOB), Some(2));
        assert!(
            provider.memory(BOB)["roots"]["3"].is_null(),
            "the fork's root"
        );

        bed.provider.publish_new(&bed.gpg, "sendmail", &["carol"]);
        bed.refused(
            "sendmail",
            DAVE,
            &forked,
            &["possible fork of the key directory of example.net: the history's head of epoch 3"],
        );
        assert_eq!(provider.remembered_epoch(DAVE), Some(3));
        let (status, honest) = provider.http_get("/.well-known/kst/log/example.net/head/3");
        assert_eq!(status, 200, "{honest}");
        let root = provider.memory(DAVE)["roots"]["3"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !root.is_empty() && honest.contains(&format!("\nroot {root}\n")),
            "remembered root of epoch 3 {root:?}, the honest head {honest}"
        );
    }

    /// A history that does not verify, in front of the stale replica's key (a race by the
    /// honest history): its head's time changed (the signature fails), or another address's
    /// genuine history signed with the head key (carol's: the proof is not alice's). Exit 5
    /// with it kept.
    #[test]
    fn a_history_that_does_not_verify_is_an_attack() {
        let bed = Bed::new(&[BOB, DAVE]);
        let provider = &bed.provider;
        let forged_time = forging_proxy(&provider.log_url, "/history/", None, true);
        bed.refused(
            "sendmail-old",
            BOB,
            &forged_time,
            &["/history/", "head signature rejected"],
        );

        provider.publish_new(&bed.gpg, "sendmail", &["carol"]);
        let (status, carols) =
            provider.http_get("/.well-known/kst/log/example.net/history/carol@example.net");
        assert_eq!(status, 200, "{carols}");
        let swapped = replaying_proxy(&provider.log_url, "/history/", carols.clone(), usize::MAX);
        let kept = bed.refused(
            "sendmail-old",
            DAVE,
            &swapped,
            &["the history of alice@example.net at example.net epoch 3"],
        );
        assert!(kept.contains(&carols), "{kept}");
    }

    /// A history that cannot be read (every `/history/` answered 503) for a key the
    /// directory never held, sent with epoch 1: not decided, exit 75, nothing imported, the
    /// mismatch kept as evidence. Retrieved again, the head verified before sending (epoch
    /// 2) lets the answer's own proof decide: exit 5 (the history path's fallback ends).
    #[test]
    fn a_history_that_cannot_be_read_is_a_temporary_failure_with_the_mismatch_kept() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
        let down = unavailable_proxy(&provider.log_url, "/history/", usize::MAX);
        let (out, v) = bed.retrieve("sendmail", BOB, &down);
        expect(&out, &v, 75, "error");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the address's history did not decide")
                && error.contains("the history could not be read")
                && error.contains("nothing was imported")
                && error.contains("evidence kept in"),
            "{error}"
        );
        assert_eq!(bed.imported(), "", "nothing imported");
        let evidence = provider.evidence(BOB);
        assert_eq!(evidence.len(), 1, "the mismatch kept");
        let kept = std::fs::read_to_string(&evidence[0]).unwrap();
        assert!(
            kept.contains("kst-log-answer") && kept.contains("not decided"),
            "{kept}"
        );
        assert_eq!(provider.remembered_epoch(BOB), Some(2));

        provider.refused_as_attack("sendmail", BOB, &down, BY_THE_ANSWER);
        assert_eq!(provider.evidence(BOB).len(), 2);
        assert_eq!(bed.imported(), "", "nothing imported");
    }

    /// A busy domain: the directory records an epoch before every history read (the proxy
    /// in front of it publishes a key for another address first), so each history is one
    /// epoch ahead of the answer read before it. The client ties the history it read by one
    /// newer answer (its append-only proof holds the root of the history's epoch) and judges
    /// it then, without reading it again (review R6): a change on the way, exit 75, nothing
    /// imported, no evidence. Before, the history was read again after each newer answer,
    /// one epoch ahead again each time: exit 75 "kept moving" every time, with evidence.
    #[test]
    fn a_busy_directorys_history_is_tied_by_a_newer_answer_not_read_again() {
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let histories = while_busy(provider, &bed.gpg, "/history/", |busy| {
            let (out, v) = bed.retrieve("sendmail-old", BOB, busy);
            expect(&out, &v, 75, "error");
            let error = v["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("changed while the reply was on its way")
                    && error.contains("superseded at epoch 2")
                    && error.contains("nothing was imported"),
                "{error}"
            );
        });
        assert_eq!(histories, 1, "the history read once");
        assert_eq!(bed.imported(), "", "nothing imported");
        assert_eq!(provider.remembered_epoch(BOB), Some(3));
        assert!(provider.evidence(BOB).is_empty(), "no false alarm");
    }

    /// Review R6: the older pages of a busy domain. The F9 set-up (alice's first key 69
    /// versions back, in the older page), its check's directory behind a proxy that
    /// publishes a key for another address before each page is read: the page comes under
    /// a head one epoch newer than the history's. The page is taken and its head tied by a
    /// newer answer: a change on the way, exit 75, no evidence. Before, a page under a newer
    /// head was "the directory moved" (exit 75 with the mismatch kept) on every retry.
    #[test]
    fn older_pages_read_under_a_newer_head_are_tied_and_decide() {
        let (provider, gpg, _alice) = Provider::with_alice();
        write_queue_script(&provider);
        let mut flags = provider.log_args().to_vec();
        flags.push("--no-wait");
        let (out, v) = provider.checked_as("sendmail-queue", BOB, ALICE, &flags);
        expect(&out, &v, 75, "pending");
        flush_queue(&provider);
        provider.seventy_versions_of_alice(2);
        let pages = while_busy(&provider, &gpg, "?before=", |busy| {
            let pending = provider.path(&format!("state-{BOB}/pending.json"));
            let mut requests: Value =
                serde_json::from_slice(&std::fs::read(&pending).unwrap()).unwrap();
            requests["requests"][0]["log"]["log_url"] = busy.into();
            std::fs::write(&pending, serde_json::to_vec(&requests).unwrap()).unwrap();
            let (out, v) = provider.client("sendmail", BOB, &["check"]);
            assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
            let error = v[0]["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("changed while the reply was on its way"),
                "{error}"
            );
        });
        assert_eq!(pages, 1, "one older page read");
        assert!(provider.evidence(BOB).is_empty(), "no false alarm");
    }

    /// Review R6: the history is read without the domain's memory lock, and its heads are
    /// tied to the memory as it is after (issue 18's `Decision::Unread` "cannot tie", end
    /// to end). While the check reads the history (epoch 2), the user re-pins the domain
    /// (`kst client log-pin`: the remembered head and its roots forgotten) and the directory
    /// records epoch 3: the newer answer starts the memory again at epoch 3, which holds no
    /// root for the history's epoch 2: not decided, exit 75, nothing imported, the mismatch
    /// and the history kept. Before, `log-pin` waited for the check's lock until the check
    /// ended (every kst command for the domain did, up to minutes with pages).
    #[test]
    fn a_history_read_while_the_domain_is_re_pinned_cannot_be_tied() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let bed = Bed::new(&[BOB]);
        let provider = &bed.provider;
        let pinned = AtomicBool::new(false);
        proxied(
            provider,
            |line, forward| {
                let response = forward();
                if line.contains("/history/") && !pinned.load(Ordering::SeqCst) {
                    // The re-pin, while the client waits for this answer.
                    std::thread::scope(|scope| {
                        let (done, wait) = std::sync::mpsc::channel();
                        let head_key = provider.head_key.clone();
                        scope.spawn(move || {
                            let out = provider.client(
                                "sendmail",
                                BOB,
                                &["log-pin", "example.net", "--log-key", &head_key],
                            );
                            let _ = done.send(out);
                        });
                        if let Ok((out, v)) = wait.recv_timeout(std::time::Duration::from_secs(15))
                        {
                            assert_eq!(code(&out), 0, "{v}\n{}", stderr(&out));
                            pinned.store(true, Ordering::SeqCst);
                        }
                    });
                    provider.publish_new(&bed.gpg, "sendmail", &["busy"]);
                }
                response
            },
            |proxy| {
                let (out, v) = bed.retrieve("sendmail-old", BOB, proxy);
                expect(&out, &v, 75, "error");
                let error = v["error"].as_str().unwrap_or_default();
                assert!(
                    error.contains("did not decide")
                        && error.contains("cannot tie")
                        && error.contains("evidence kept in"),
                    "{error}"
                );
            },
        );
        assert!(
            pinned.load(Ordering::SeqCst),
            "log-pin ran while the history was read"
        );
        assert_eq!(bed.imported(), "", "nothing imported");
        assert_eq!(provider.remembered_epoch(BOB), Some(3));
        let evidence = provider.evidence(BOB);
        assert_eq!(evidence.len(), 1, "{evidence:?}");
        let kept = std::fs::read_to_string(&evidence[0]).unwrap();
        assert!(
            kept.contains("not decided")
                && kept.contains("kst-log-history-v1\ndomain example.net\nepoch 2\n"),
            "{kept}"
        );
    }

    /// Review F3: a key hidden behind a deletion. Bob's request is queued at epoch 1 (the
    /// head verified before sending proved alice's first key); a key is put in the store
    /// behind the directory's back (an insider's twin, or, honestly, a key alice published
    /// and deleted before the directory recorded it: the writer then records the deletion
    /// alone) and the KST serves it; then alice's key is deleted (epoch 2, version 1's value
    /// withdrawn) and a new one published (epoch 3). The history matches the served key
    /// only as version 1's withdrawn value, right before the deletion: before, a race (exit
    /// 75, no evidence) on every such check. Now exit 75 with the mismatch and the history
    /// kept, the message naming the other key verified before sending (not exit 5: the
    /// honest case above looks the same; review F-1 of this change); also for a pending
    /// request without that key (a kst from before it).
    #[test]
    fn a_key_hidden_behind_a_later_deletion_keeps_its_evidence() {
        let (provider, gpg, _alice) = Provider::with_alice();
        write_queue_script(&provider);
        let mut flags = provider.log_args().to_vec();
        flags.push("--no-wait");
        let twin = Gpg::new().generate("Alice", ALICE, "ed25519");
        let pending = provider.path(&format!("state-{BOB}/pending.json"));
        // Bob's request queued, answered with the twin, then the deletion and a new key.
        let hidden = |strip: bool| {
            let (out, v) = provider.checked_as("sendmail-queue", BOB, ALICE, &flags);
            expect(&out, &v, 75, "pending");
            let mut requests: Value =
                serde_json::from_slice(&std::fs::read(&pending).unwrap()).unwrap();
            let state = &mut requests["requests"][0]["log"]["verified_state"];
            assert!(state["key_hash"].is_string(), "{requests}");
            if strip {
                *state = Value::Null;
                std::fs::write(&pending, serde_json::to_vec(&requests).unwrap()).unwrap();
            }
            provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
            flush_queue(&provider);
            let (out, v) = provider.client("sendmail", ALICE, &["delete"]);
            expect(&out, &v, 0, "deleted");
            let next = gpg.generate("Alice", ALICE, "ed25519");
            provider.publish("sendmail", ALICE, &next.public_armored);
            provider.client("sendmail", BOB, &["check"])
        };
        let (out, v) = hidden(false);
        assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
        let error = v[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("did not decide")
                && error.contains("withdrew")
                && error.contains("proved another key")
                && error.contains("evidence kept in"),
            "{error}"
        );
        let evidence = provider.evidence(BOB);
        assert_eq!(evidence.len(), 1, "{evidence:?}");
        let kept = std::fs::read_to_string(&evidence[0]).unwrap();
        assert!(kept.contains("kst-log-history-v1"), "{kept}");

        let (out, v) = hidden(true);
        assert_eq!(code(&out), 75, "{v}\n{}", stderr(&out));
        let error = v[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("did not decide")
                && error.contains("withdrew")
                && error.contains("evidence kept in"),
            "{error}"
        );
        assert_eq!(provider.evidence(BOB).len(), 2, "the mismatch kept");
    }

    /// The request sent at epoch 1 (the head verified before sending) and answered after
    /// alice's change: queued (`--no-wait`), alice publishes her second key (epoch 2), an
    /// insider puts a twin in the store behind the directory's back, the queue is delivered
    /// (the KST serves the twin), and `kst client check` decides with the `verified_epoch`
    /// kept with the request: the history never held the twin, exit 5 with it kept.
    #[test]
    fn a_queued_request_answered_after_a_change_reaches_the_history_by_its_kept_epoch() {
        let (provider, gpg, _alice) = Provider::with_alice();
        write_queue_script(&provider);
        let mut flags = provider.log_args().to_vec();
        flags.push("--no-wait");
        let (out, v) = provider.checked_as("sendmail-queue", BOB, ALICE, &flags);
        expect(&out, &v, 75, "pending");
        let file = provider.path(&format!("state-{BOB}/pending.json"));
        let pending: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(
            pending["requests"][0]["log"]["verified_epoch"], 1,
            "{pending}"
        );
        let alice2 = gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail", ALICE, &alice2.public_armored);
        let twin_gpg = Gpg::new();
        let twin = twin_gpg.generate("Alice", ALICE, "ed25519");
        provider.publish("sendmail-no-log", ALICE, &twin.public_armored);
        flush_queue(&provider);
        let (out, v) = provider.client("sendmail", BOB, &["check"]);
        assert_eq!(code(&out), 5, "{v}\n{}", stderr(&out));
        assert_eq!(v[0]["outcome"], "attack", "{v}");
        let error = v[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("never held the served key") && !error.contains(BY_THE_ANSWER),
            "{error}"
        );
        let evidence = provider.evidence(BOB);
        assert_eq!(evidence.len(), 1, "{evidence:?}");
        let kept = std::fs::read_to_string(&evidence[0]).unwrap();
        assert!(kept.contains("kst-log-history-v1"), "{kept}");
    }
}
