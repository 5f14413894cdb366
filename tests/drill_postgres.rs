//! The PostgreSQL failover drill (issue 16), on loopback, under load.
//!
//! `scripts/ha-services.sh pg up` (a primary `a` with a synchronous streaming standby `b`, as
//! root), a pool of three `kst serve` on the multi-host URL `postgres://...@a,b/kst_drill`, load
//! from `kst bench lmtp` spread over the three (temporary failures retried, as an MTA does).
//! Mid-load the standby is promoted while the old primary still runs; once kst has noticed two
//! hosts accepting writes, the old primary is stopped. Asserted: every message ends decided,
//! every reply's HMAC verifies, no confirmed publication is missing on the new primary (lost =
//! 0), and every instance follows the new primary by itself (`/readyz`, `/metrics`). Printed:
//! sent, decided, retried, lost, seconds to recover.
//!
//! `postgres_failover_drill_with_the_directory_on_loses_no_key_and_forks_no_epoch`: the same
//! with `[transparency]` on (issue 18, `kst_tests::directory_drill`): also every confirmed
//! key at the latest epoch of the directory, no epoch served with two heads, every head served
//! still the stored one, `kst log audit` from epoch 0.
//!
//! Needs root (the script runs PostgreSQL as user postgres). It holds the lock file
//! `KST_HA_LOCK` (default `/tmp/kst-ha-pg-drill.lock`) for its whole run, so two drills never
//! share the topology; `scripts/ha-services.sh pg down` at the end leaves nothing running.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kst_core::client::{self, Pending, Verified};
use kst_tests::directory_drill::{DrillKeys, HeadWatch, WriterTurns, check_directory};
use kst_tests::serve::{ServeProcess, free_port};
use kst_tests::{is_root, kst_binary, spool_replies};
use sqlx::Connection as _;

/// How long the drill waits for any one thing (a hang guard, not a speed check).
const PATIENCE: Duration = Duration::from_secs(60);
/// The load: publications (each its own address and key) and retrievals.
const PUBLICATIONS: usize = 300;
const RETRIEVALS: usize = 600;
/// Publications on the old primary before the promotion.
const PROMOTE_AFTER: i64 = 60;
/// The database the pool uses on the HA pair.
const DB: &str = "kst_drill";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs `scripts/ha-services.sh pg ARGS`; its stdout (env lines for `up`). Panics with the
/// script's stderr when it fails.
fn ha(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/ha-services.sh"))
        .arg("pg")
        .args(args)
        .output()
        .expect("run scripts/ha-services.sh");
    assert!(
        out.status.success(),
        "scripts/ha-services.sh pg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "ha-services.sh pg {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `export KEY=VALUE` lines.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(['\'', '"']).to_string()))
        .collect()
}

/// `url` with its database replaced by `db`.
fn on_db(url: &str, db: &str) -> String {
    kst_postgres::with_database(url, db)
}

/// `host:port` of a single-host URL.
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").expect("scheme").1;
    let auth = &rest[..rest.find('/').expect("database")];
    auth.rsplit_once('@').map_or(auth, |(_, h)| h).to_string()
}

fn http_get(at: SocketAddr, path: &str) -> Option<(u16, String)> {
    kst_tests::directory_drill::get(at, path)
}

/// One `kst serve` of the pool, in its own working directory (spool under `data/outbox`;
/// stopped before that directory is removed).
struct Serve {
    serve: ServeProcess,
    cwd: tempfile::TempDir,
    lmtp: SocketAddr,
    http: SocketAddr,
}

impl Serve {
    /// An instance on `url`; with `directory`, `[transparency]` on with those keys.
    fn start(url: &str, directory: Option<&DrillKeys>) -> Serve {
        let cwd = tempfile::Builder::new()
            .prefix("kst-drill-pg-")
            .tempdir()
            .expect("temp dir");
        let (lmtp, http) = (free_port(), free_port());
        let serve = ServeProcess::start(cwd.path().join("serve.log"), http, |cmd| {
            cmd.current_dir(cwd.path()).envs([
                ("KST_LMTP__LISTEN", lmtp.to_string()),
                ("KST_HTTP__LISTEN", http.to_string()),
                ("KST_STORE__BACKEND", "postgres".into()),
                ("KST_STORE__URL", url.to_string()),
                ("KST_STORE__WRITE_TIMEOUT_MS", "2000".into()),
                ("KST_LIMITS__PER_SENDER", "0".into()),
                ("KST_LIMITS__PER_ACCOUNT", "0".into()),
                ("KST_LIMITS__PER_SOURCE_IP", "0".into()),
                ("KST_LIMITS__PER_SENDER_QUERY", "0".into()),
            ]);
            if let Some(keys) = directory {
                cmd.envs(keys.env());
            }
        });
        Serve {
            serve,
            cwd,
            lmtp,
            http,
        }
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    /// `/readyz?format=json`: (status, parsed body).
    fn readyz(&self) -> Option<(u16, serde_json::Value)> {
        let (status, body) = http_get(self.http, "/readyz?format=json")?;
        Some((status, serde_json::from_str(&body).ok()?))
    }

    /// Every reply in the spool.
    fn replies(&self) -> Vec<Vec<u8>> {
        spool_replies(&self.cwd.path().join("data/outbox"))
    }
}

/// Waits until `ok` holds for every instance, or panics with `what` and the logs.
fn wait_all(pool: &[Serve], what: &str, ok: impl Fn(&Serve) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !pool.iter().all(&ok) {
        if Instant::now() > deadline {
            let logs: Vec<String> = pool.iter().map(Serve::log).collect();
            panic!(
                "{what}: not reached within {PATIENCE:?}\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn primary_of(s: &Serve) -> Option<String> {
    let (status, body) = s.readyz()?;
    (status == 200).then(|| {
        body["store"]["topology"]["primary"]
            .as_str()
            .map(str::to_string)
    })?
}

/// The In-Reply-To of a reply, without brackets.
fn in_reply_to(raw: &[u8]) -> Option<String> {
    let msg = mail_parser::MessageParser::default().parse(raw)?;
    msg.in_reply_to().as_text().map(str::to_string)
}

/// `scripts/ha-services.sh pg down` when dropped: also when the drill fails half-way, so no
/// PostgreSQL of the drill keeps running.
struct Topology;

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/ha-services.sh"))
            .args(["pg", "down"])
            .stdout(Stdio::null())
            .status();
    }
}

/// Holds the drill's lock file for the whole run.
fn lock() -> std::fs::File {
    let path = std::env::var("KST_HA_LOCK").unwrap_or_else(|_| "/tmp/kst-ha-pg-drill.lock".into());
    let f = std::fs::File::create(&path).expect("the drill's lock file");
    f.lock().expect("lock the drill's lock file");
    f
}

/// While both hosts accept writes: a publication through a store on the old primary alone waits
/// in SyncRep (its standby was promoted); `pg_cancel_backend` ends the wait and PostgreSQL
/// reports the commit as a success (the row stays on the old primary only). kst-postgres must
/// not confirm it: a temporary error, the row on the old primary, not on the new one.
async fn cancelled_sync_wait_is_never_confirmed(old_primary: &str, new_primary: &str) {
    use kst_core::{Address, AddressPolicy, Expected, KeyStore, NewKey};
    let store = kst_postgres::PostgresStore::builder(old_primary)
        .run_migrations(false)
        .write_timeout(Duration::from_secs(60))
        .operation_timeout(Duration::from_secs(90))
        .connect()
        .await
        .expect("a store on the old primary alone");
    let template = store
        .get(
            &AddressPolicy::default()
                .normalize("user000000@example.test")
                .unwrap(),
        )
        .await
        .expect("read the old primary")
        .expect("the first publication of the load is on the old primary");
    let address: Address = AddressPolicy::default()
        .normalize("cancelled-sync-wait@example.test")
        .unwrap();
    let key = NewKey {
        address: address.clone(),
        key: template.key,
        fingerprint: template.fingerprint,
        publication_id: "drill-cancelled-sync-wait".into(),
        published_at: 1_700_000_000,
        revoked: false,
        expected: Expected::Any,
    };
    let publish = tokio::spawn(async move { store.publish(key).await });
    let mut admin = sqlx::PgConnection::connect(old_primary)
        .await
        .expect("admin connection to the old primary");
    let deadline = Instant::now() + PATIENCE;
    let mut cancelled_any = false;
    loop {
        let cancelled: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
             WHERE wait_event = 'SyncRep' AND datname = current_database()",
        )
        .fetch_all(&mut admin)
        .await
        .expect("cancel SyncRep waits");
        cancelled_any |= cancelled.iter().any(|c| *c);
        if cancelled_any && publish.is_finished() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no publication waited for the promoted standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcome = publish.await.expect("publish task");
    let err = outcome.expect_err("a commit whose synchronous wait was cancelled was confirmed");
    assert!(err.is_temporary(), "{err:?}");
    assert!(err.to_string().contains("no synchronous standby"), "{err}");
    let count = |url: String| async move {
        let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kst_keys WHERE address = $1")
            .bind("cancelled-sync-wait@example.test")
            .fetch_one(&mut c)
            .await
            .expect("count")
    };
    assert_eq!(
        count(old_primary.to_string()).await,
        1,
        "PostgreSQL committed it locally after the cancel"
    );
    assert_eq!(count(new_primary.to_string()).await, 0);
    println!("postgres drill: a commit whose synchronous wait was cancelled was refused: {err}");
}

/// While both hosts accept writes: a key directory head inserted on the old primary alone
/// waits in SyncRep; `pg_cancel_backend` ends the wait and the insert returns (the row is
/// committed there only, visible to every reader of that host). The directory must not serve
/// it: read back through a directory store on the old primary, the head is a temporary error
/// (no synchronous standby holds it), not a head. Before `PgDirectoryStore::read_settled`,
/// the read returned it, and the drill saw an epoch served with two heads once the new
/// primary committed that epoch again.
async fn cancelled_head_is_never_served(old_primary: &str) {
    use kst_core::transparency::DirectoryStore;
    let store = kst_postgres::PostgresStore::builder(old_primary)
        .run_migrations(false)
        .write_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a store on the old primary alone");
    let dir = store.inner().directory();
    let domain = "cancelled-head.example";
    let insert = tokio::spawn({
        let dir = dir.clone();
        async move {
            dir.insert_head(domain, 1, b"a head only the old primary has")
                .await
        }
    });
    let mut admin = sqlx::PgConnection::connect(old_primary)
        .await
        .expect("admin connection to the old primary");
    let deadline = Instant::now() + PATIENCE;
    while !insert.is_finished() {
        sqlx::query("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND datname = current_database()")
            .execute(&mut admin)
            .await
            .expect("cancel SyncRep waits");
        assert!(Instant::now() < deadline, "the head insert never returned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // PostgreSQL reports the insert as done; the row is on the old primary only.
    let inserted = insert.await.expect("insert task");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kt_heads WHERE domain = $1")
        .bind(domain)
        .fetch_one(&mut admin)
        .await
        .expect("count");
    assert_eq!(
        n, 1,
        "the cancelled insert is committed locally: {inserted:?}"
    );
    let read = dir.heads(domain, 1, 1).await;
    match read {
        Err(e @ kst_core::transparency::DirectoryStoreError::Unavailable(_)) => {
            println!(
                "postgres drill: a head whose synchronous wait was cancelled is not served: {e}"
            )
        }
        other => panic!("a head only the old primary holds was read back: {other:?}"),
    }
}

#[test]
fn postgres_failover_drill_loses_no_confirmed_publication() {
    drill(None);
}

/// The drill with the key directory on (issue 18, `kst_tests::directory_drill`): besides
/// the store's checks, every confirmed key is the directory's latest entry at the latest
/// epoch on the new primary, no epoch was served with two heads (a watcher asks the pool for
/// the heads throughout, the overlap of two writable hosts included), every head served is
/// still the one stored for its epoch, and `kst log audit` from epoch 0 passes.
#[test]
fn postgres_failover_drill_with_the_directory_on_loses_no_key_and_forks_no_epoch() {
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys = DrillKeys::write(keys_dir.path(), &["example.test"]);
    drill(Some(&keys));
}

fn drill(directory: Option<&DrillKeys>) {
    assert!(
        is_root(),
        "the PostgreSQL drill needs root: scripts/ha-services.sh runs initdb and pg_ctl as \
         user postgres (run scripts/test.sh as root)"
    );
    let _lock = lock();
    let env = parse_env(&ha(&["up"]));
    let _topology = Topology;
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("ha-services.sh pg up printed no {k}: {env:?}"))
    };
    let (primary_url, standby_url) = (get("KST_HA_PG_PRIMARY_URL"), get("KST_HA_PG_STANDBY_URL"));
    let (a, b) = (host_of(&primary_url), host_of(&standby_url));
    let multi = on_db(&get("KST_HA_PG_MULTIHOST_URL"), DB) + "?target_session_attrs=read-write";

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(&primary_url)
            .await
            .expect("connect to the primary");
        for sql in [
            format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"),
            format!("CREATE DATABASE {DB}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut c)
                .await
                .expect("make the drill database");
        }
    });

    let pool: Vec<Serve> = (0..3).map(|_| Serve::start(&multi, directory)).collect();
    wait_all(&pool, "every instance ready on the primary a", |s| {
        primary_of(s).as_deref() == Some(a.as_str())
    });
    let watch = directory.map(|keys| {
        HeadWatch::start(
            pool.iter().map(|s| s.http).collect(),
            keys,
            Duration::from_millis(50),
        )
    });

    let work = tempfile::tempdir().expect("temp dir");
    let pending_file = work.path().join("pending.jsonl");
    let connect: Vec<String> = pool.iter().map(|s| s.lmtp.to_string()).collect();
    let bench = Command::new(kst_binary())
        .args(["bench", "lmtp", "--connect", &connect.join(",")])
        .args(["--concurrency", "12"])
        .args(["--publications", &PUBLICATIONS.to_string()])
        .args(["--retrievals", &RETRIEVALS.to_string()])
        .args(["--retry-temporary", "120", "--json", "--quiet"])
        .arg("--pending-out")
        .arg(&pending_file)
        .env_remove("KST_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kst bench lmtp");

    // Mid-load: promote once the old primary holds PROMOTE_AFTER keys.
    let keys_on = |url: String| {
        rt.block_on(async move {
            let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kst_keys")
                .fetch_one(&mut c)
                .await
                .ok()
        })
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n = keys_on(on_db(&primary_url, DB)).unwrap_or(0);
        if n >= PROMOTE_AFTER {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the load did not start: {n} keys"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let promoted = Instant::now();
    ha(&["promote"]);
    // Both hosts accept writes now: kst must refuse to write until the old primary is gone.
    wait_all(
        &pool[..1],
        "an instance reporting two hosts that accept writes",
        |s| {
            s.readyz().is_some_and(|(status, body)| {
                status == 503 && body.to_string().contains("accept writes at once")
            })
        },
    );
    let overlap = promoted.elapsed();
    if directory.is_some() {
        rt.block_on(cancelled_head_is_never_served(&on_db(&primary_url, DB)));
    }
    rt.block_on(cancelled_sync_wait_is_never_confirmed(
        &on_db(&primary_url, DB),
        &on_db(&standby_url, DB),
    ));
    let stopped = Instant::now();
    ha(&["stop-old-primary"]);
    wait_all(&pool, "every instance following the new primary b", |s| {
        primary_of(s).as_deref() == Some(b.as_str())
    });
    let recovered_after_stop = stopped.elapsed();
    let recovered_after_promote = promoted.elapsed();

    let out = bench.wait_with_output().expect("kst bench lmtp");
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON report per phase"))
        .collect();
    let logs = || {
        pool.iter()
            .map(Serve::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "some messages ended undecided:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert_eq!(reports.len(), 2, "{reports:?}");
    let (mut sent, mut decided, mut retried) = (0, 0, 0);
    for r in &reports {
        assert_eq!(r["decided"], r["messages"], "{r}");
        sent += r["messages"].as_u64().unwrap_or(0);
        decided += r["decided"].as_u64().unwrap_or(0);
        retried += r["retried"].as_u64().unwrap_or(0);
    }
    assert_eq!(sent as usize, PUBLICATIONS + RETRIEVALS);
    assert_eq!(
        reports[0]["outcomes"]["published"], PUBLICATIONS,
        "{}",
        reports[0]
    );

    // Every reply verifies against its request's K_auth.
    let pendings: Vec<(String, Pending)> = std::fs::read_to_string(&pending_file)
        .expect("--pending-out file")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            let phase = v["phase"].as_str().expect("phase").to_string();
            let p: Pending = serde_json::from_value(v["pending"].clone()).expect("pending");
            (phase, p)
        })
        .collect();
    assert_eq!(pendings.len(), PUBLICATIONS + RETRIEVALS);
    let mut replies: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for s in &pool {
        for raw in s.replies() {
            let id = in_reply_to(&raw).expect("a reply names its request");
            replies.entry(id).or_default().push(raw);
        }
    }
    let mut confirmed: BTreeMap<String, String> = BTreeMap::new();
    for (phase, p) in &pendings {
        let got = replies
            .get(&p.message_id)
            .unwrap_or_else(|| panic!("no reply to the {phase} {}", p.message_id));
        for raw in got {
            match client::verify_reply(p, raw) {
                Ok(Verified::Published { fingerprint, .. }) => {
                    let client::Asked::Publication { account, .. } = &p.asked else {
                        panic!("a publication reply to a {phase}");
                    };
                    confirmed.insert(account.as_str().to_string(), fingerprint);
                }
                Ok(Verified::Found { .. } | Verified::NotFound { .. }) => {
                    assert_eq!(phase, "retrieval");
                }
                Ok(other) => panic!("unexpected reply to the {phase}: {other:?}"),
                Err(e) => panic!(
                    "a reply to the {phase} {} does not verify: {e}",
                    p.message_id
                ),
            }
        }
    }
    assert_eq!(confirmed.len(), PUBLICATIONS);

    // No confirmed publication is missing on the new primary.
    let on_b: HashMap<String, String> = rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(&on_db(&standby_url, DB))
            .await
            .expect("connect to the new primary");
        sqlx::query_as::<_, (String, String)>(
            "SELECT k.address, h.fingerprint FROM kst_keys k JOIN kst_key_history h \
             ON h.address = k.address AND h.version = k.current_version",
        )
        .fetch_all(&mut c)
        .await
        .expect("read the new primary")
        .into_iter()
        .collect()
    });
    let lost: Vec<&String> = confirmed
        .iter()
        .filter(|(addr, fpr)| on_b.get(*addr).is_none_or(|f| !f.eq_ignore_ascii_case(fpr)))
        .map(|(addr, _)| addr)
        .collect();

    // kst follows the new primary by itself, and says so.
    let (status, metrics) = http_get(pool[2].http, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let line = format!("kst_store_info{{store=\"postgres\",name=\"primary\",value=\"{b}\"}} 1");
    assert!(metrics.contains(&line), "{line} missing in:\n{metrics}");
    let (_, ready) = pool[1].readyz().expect("/readyz");
    assert_eq!(ready["store"]["topology"]["primary"], b.as_str(), "{ready}");
    assert_eq!(
        ready["store"]["topology"]["hosts"],
        format!("{a},{b}"),
        "{ready}"
    );

    println!(
        "postgres drill{}: sent {sent}, decided {decided}, retried {retried}, lost {}, \
         seconds to recover {:.2} after the promotion ({:.2} of it with both hosts writable, \
         {:.2} after the old primary was stopped)",
        if directory.is_some() {
            " with the directory on"
        } else {
            ""
        },
        lost.len(),
        recovered_after_promote.as_secs_f64(),
        overlap.as_secs_f64(),
        recovered_after_stop.as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "confirmed publications missing on the new primary: {lost:?}"
    );
    assert!(
        retried > 0,
        "the failover caused no retry at all: was it under load?"
    );
    // The load is done: nothing is in flight. Every confirmed key is in the directory at the
    // latest epoch, no epoch was served with two heads, the audit from 0 passes.
    if let (Some(keys), Some(watch)) = (directory, watch) {
        let seen = watch.stop();
        let http: Vec<SocketAddr> = pool.iter().map(|s| s.http).collect();
        let report = rt.block_on(async {
            use kst_core::{AddressPolicy, KeyStore};
            let store = kst_postgres::PostgresStore::builder(on_db(&standby_url, DB))
                .run_migrations(false)
                .connect()
                .await
                .expect("a store on the new primary");
            let mut records = Vec::new();
            for address in confirmed.keys() {
                let address = AddressPolicy::default()
                    .normalize(address)
                    .expect("address");
                let record = store
                    .get(&address)
                    .await
                    .expect("read the new primary")
                    .expect("a confirmed key");
                records.push((address, record));
            }
            check_directory(&http, keys, &records, &seen).await
        });
        let turns = WriterTurns::count(
            pool.iter()
                .map(Serve::log)
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        println!("postgres drill directory: {}", report.line(turns));
    }
}
