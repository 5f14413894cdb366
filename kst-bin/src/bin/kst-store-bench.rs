//! `kst-store-bench`: publish, get and look-up throughput of a key store (fs, PostgreSQL, Redis)
//! at a given number of concurrent clients, with a given number of keys already stored.
//!
//! ```text
//! cargo build --release -p kst-bin
//! target/release/kst-store-bench --backend redis --url redis://127.0.0.1:6379 \
//!     --stored 1000,1000000 --clients 1,16 --seconds 5
//! ```
//!
//! For each stored size it fills the store with that many addresses (one key each, each with a
//! fingerprint of its own), optionally times `rebuild_index` (`--rebuild-index`), then, for each
//! client count, runs for `--seconds` each: `get` of random stored addresses,
//! `find_by_fingerprint` (`by-fpr`) and `find_by_wkd_hash` (`by-wkd`) of a sample of 10,000
//! stored addresses (their fingerprints read before timing; not yet
//! republished), then `publish` of new keys for random stored addresses; it prints one Markdown
//! table row per run: ops/s, p50 and p99 latency. It works in a fresh namespace (a new fs directory under `--path`, a new
//! database on the PostgreSQL server of `--url`, a new key prefix on Redis) and removes it at the
//! end unless `--keep` (or `--dir`/`--namespace`, which name a store to reuse).
//!
//! Filling (the measured operations always go through the store's own API):
//! - fs, and every backend with `--real-keys`: the store's own `publish`, 64 calls in flight
//!   (on fs per address an fsync'ed history file and its look-up index files); for 10^6 keys,
//!   fill once into a kept namespace (`--dir D`, `--namespace NAME`) with `--fill-only` (fs
//!   under `eatmydata`, which turns fsync off: the fill is not what is measured; then `sync`),
//!   and measure with `--filled N`;
//! - PostgreSQL without `--real-keys`: `INSERT ... SELECT ... FROM generate_series` into the
//!   store's two tables, 100 000 rows per transaction, then `ANALYZE` (the rows `publish`
//!   writes for a version 1);
//! - Redis without `--real-keys`: the five writes of the publish script per address (`SET
//!   cur`, `SET ver`, `HSET hist`, `HSET pub`, `ZADD index`) and the `SADD`s of its look-up
//!   index entries, pipelined 1 000 addresses at a time.
//!
//! `--mirror BACKEND=TARGET` (repeatable, with `--real-keys --fill-only`) publishes every key
//! made for the main store into further stores too, through their own `publish`, each store
//! with 64 publications in flight of its own: each certificate is made (and its fill's process
//! runs) once for all of them, and the stores hold the same keys. `--keys-file` keeps the
//! certificates (made on every core) for later fills and other sizes (`scripts/bench-web.sh fill` fills the backends of one size so). A publication
//! that fails with a temporary error is retried. TARGET is a
//! directory for `fs`, `URL#DATABASE` for `postgres` (a database on the server of URL) and
//! `URL#PREFIX` for `redis`; each is created if missing and kept.
//!
//! The PostgreSQL bulk fill bypasses `publish` and its index, so `rebuild_index` runs after it
//! (timed); otherwise only with `--rebuild-index`.
//!
//! A `get` or look-up that finds no key (or another key) for a stored address fails the run, so
//! a bad fill or index is noticed.

use kst_postgres::with_database;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kst_core::{Address, AddressPolicy, KeyStore, NewKey};

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kst-store-bench",
    about = "Publish/get throughput of a kst key store"
)]
struct Args {
    /// The backend.
    #[arg(long, value_enum)]
    backend: Backend,
    /// Server URL (postgres: any database on the server, a fresh one is created beside it).
    #[arg(long, default_value = "")]
    url: String,
    /// fs: directory under which a fresh store directory is made.
    #[arg(long, default_value = "/tmp")]
    path: std::path::PathBuf,
    /// Stored key counts to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    stored: Vec<u64>,
    /// Concurrent client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Bytes per key (a gpg ed25519 key with one User ID and an encryption subkey is ~600).
    #[arg(long, default_value_t = 700)]
    key_bytes: usize,
    /// Keep the namespace (fs directory, database, prefix) at the end.
    #[arg(long)]
    keep: bool,
    /// fs: use this store directory (created if missing, always kept) instead of a fresh one
    /// under `--path`.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Addresses 0..N are already in the store (`--dir` or `--namespace` of an earlier
    /// `--fill-only` run).
    #[arg(long, default_value_t = 0)]
    filled: u64,
    /// Fill up to the largest `--stored` size (and write `--paths-out`), measure nothing.
    #[arg(long)]
    fill_only: bool,
    /// Fill with real certificates made in-process (Ed25519 with a Curve25519 subkey, User ID
    /// `Bench <user000000@example.test>`, as `kst bench` publishes them) instead of
    /// `--key-bytes` of filler; addresses `user<6 digits>@example.test`. Filled through the
    /// store's own `publish` on every backend.
    #[arg(long)]
    real_keys: bool,
    /// PostgreSQL: use this database (created if missing, always kept) instead of a fresh
    /// one; Redis: use this key prefix (always kept). The `--dir` of the other backends.
    #[arg(long)]
    namespace: Option<String>,
    /// Write request paths of up to 200,000 stored addresses for `scripts/bench-web.sh` here:
    /// `wkd.paths` (direct method with `l=`), `wkdhash.paths` (without), `vks.paths`
    /// (by-email), `fpr.paths` (VKS by-fingerprint) and `hkp.paths` (HKP `op=get` by address).
    #[arg(long)]
    paths_out: Option<std::path::PathBuf>,
    /// The operations to measure, comma-separated (get, by-fpr, by-wkd, publish); leave
    /// `publish` out to use a store read-only (e.g. one another run filled).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "get,by-fpr,by-wkd,publish"
    )]
    ops: Vec<String>,
    /// With `--real-keys`: take the certificates from this file, making (on every core, see
    /// `--keygen-threads`) and appending the ones it lacks first, so that repeated fills and
    /// fills of several sizes make each certificate once.
    #[arg(long)]
    keys_file: Option<std::path::PathBuf>,
    /// Threads that make certificates for `--keys-file` (default: one per core).
    #[arg(long)]
    keygen_threads: Option<usize>,
    /// Time `rebuild_index` after each fill (on fs it reads every history file twice).
    #[arg(long)]
    rebuild_index: bool,
    /// Publish every filled key into this store too (`fs=DIR`, `postgres=URL#DATABASE`,
    /// `redis=URL#PREFIX`; with `--real-keys --fill-only`); repeatable.
    #[arg(long)]
    mirror: Vec<String>,
}

/// The arguments that open the store of `--mirror` `spec` (a kept namespace).
fn mirror_args(args: &Args, spec: &str) -> Result<Args> {
    let (backend, target) = spec
        .split_once('=')
        .with_context(|| format!("--mirror {spec:?}: expected BACKEND=TARGET"))?;
    let mut m = args.clone();
    m.mirror.clear();
    m.dir = None;
    m.namespace = None;
    match backend {
        "fs" => {
            m.backend = Backend::Fs;
            m.dir = Some(target.into());
        }
        "postgres" | "redis" => {
            let (url, ns) = target
                .split_once('#')
                .with_context(|| format!("--mirror {spec:?}: expected {backend}=URL#NAMESPACE"))?;
            m.backend = if backend == "redis" {
                Backend::Redis
            } else {
                Backend::Postgres
            };
            m.url = url.to_string();
            m.namespace = Some(ns.to_string());
        }
        other => bail!("--mirror {spec:?}: unknown backend {other:?} (fs, postgres, redis)"),
    }
    Ok(m)
}

/// Whether addresses and keys are `--real-keys` ones.
static REAL_KEYS: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Fs,
    Postgres,
    Redis,
}

/// A store in a namespace of its own, and how to remove that namespace.
struct Bench {
    store: Arc<dyn KeyStore>,
    backend: Backend,
    cleanup: Cleanup,
    /// The `--mirror` stores, filled with the same keys.
    mirrors: Vec<Arc<dyn KeyStore>>,
}

enum Cleanup {
    Fs(std::path::PathBuf),
    Postgres { admin: String, db: String },
    Redis { url: String, prefix: String },
}

fn address(i: u64) -> Address {
    let a = if REAL_KEYS.load(Ordering::Relaxed) {
        format!("user{i:06}@example.test")
    } else {
        format!("user{i:08}@example.net")
    };
    AddressPolicy::default()
        .normalize(&a)
        .expect("bench address")
}

/// A real certificate for address `i` (see `--real-keys`), made by kst bench's key generator.
fn real_key(i: u64) -> Result<NewKey> {
    let a = address(i);
    let armored = kst_bin::bench::messages::make_key(a.as_str())?;
    let key = kst_core::openpgp::dearmor_public_key(&armored, 1 << 20)?;
    let fingerprint = kst_core::Fingerprint::parse(
        &kst_core::certificate::Certificate::from_binary(&key)?.fingerprint(),
    )?;
    Ok(NewKey {
        address: a,
        key,
        fingerprint,
        publication_id: format!("{i:016x}{:016x}", 0),
        published_at: 1_700_000_000,
        revoked: false,
        expected: kst_core::Expected::Any,
    })
}

/// Certificates made for `--keys-file`: (fingerprint, binary key) of addresses `0..len`.
type MadeKeys = Vec<(kst_core::Fingerprint, Vec<u8>)>;

/// The certificates of `--keys-file` loaded so far (up to the size being filled).
static MADE_KEYS: std::sync::RwLock<Option<Arc<MadeKeys>>> = std::sync::RwLock::new(None);

/// The key of address `i` from `--keys-file`, if it holds one.
fn made_key(i: u64) -> Option<Result<NewKey>> {
    let keys = MADE_KEYS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()?;
    let (fingerprint, key) = keys.get(usize::try_from(i).ok()?)?;
    Some(Ok(NewKey {
        address: address(i),
        key: key.clone(),
        fingerprint: fingerprint.clone(),
        publication_id: format!("{i:016x}{:016x}", 0),
        published_at: 1_700_000_000,
        revoked: false,
        expected: kst_core::Expected::Any,
    }))
}

/// Most bytes of one certificate in a keys file (a made key is about 400).
const MAX_MADE_KEY: usize = 1 << 16;

/// Reads the certificates of `path` (records: fingerprint length as one byte, the fingerprint,
/// the key's length as u32 little-endian, the binary key; address `i` is record `i`), makes the
/// ones missing up to `want` on `threads` threads and appends them, and returns the first
/// `want`. A torn last record (a run stopped while writing) is cut off and made again.
fn keys_file(path: &std::path::Path, want: u64, threads: usize) -> Result<MadeKeys> {
    use std::io::Write as _;
    let want = usize::try_from(want)?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let mut keys = Vec::with_capacity(want);
    let mut at = 0;
    while keys.len() < want {
        let Some(&flen) = bytes.get(at) else { break };
        let fpr_end = at + 1 + usize::from(flen);
        let Some(len) = bytes.get(fpr_end..fpr_end + 4) else {
            break;
        };
        let len = u32::from_le_bytes(len.try_into()?) as usize;
        let Some(key) = bytes.get(fpr_end + 4..fpr_end + 4 + len) else {
            break;
        };
        if len > MAX_MADE_KEY {
            bail!("{}: record {} is not a key", path.display(), keys.len());
        }
        let fingerprint =
            kst_core::Fingerprint::parse(std::str::from_utf8(&bytes[at + 1..fpr_end])?)
                .with_context(|| format!("{}: record {}", path.display(), keys.len()))?;
        keys.push((fingerprint, key.to_vec()));
        at = fpr_end + 4 + len;
    }
    drop(bytes);
    if keys.len() >= want {
        return Ok(keys);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.set_len(at as u64)?;
    let mut out = std::io::BufWriter::new(
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(at as u64)).map(|_| file)?,
    );
    let (have, t0) = (keys.len(), Instant::now());
    eprintln!(
        "{}: {have} keys; making {} more",
        path.display(),
        want - have
    );
    const CHUNK: usize = 256;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(have));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<NewKey>)>>(threads * 4);
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, tx) = (Arc::clone(&next), tx.clone());
            std::thread::spawn(move || {
                loop {
                    let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                    if start >= want {
                        return;
                    }
                    let made = (start..(start + CHUNK).min(want))
                        .map(|i| real_key(i as u64))
                        .collect::<Result<Vec<_>>>();
                    if tx.send(made.map(|m| (start, m))).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut pending = std::collections::BTreeMap::new();
    for made in rx {
        let (start, chunk) = made?;
        pending.insert(start, chunk);
        while let Some(chunk) = pending.remove(&keys.len()) {
            for k in chunk {
                let f = k.fingerprint.as_str().as_bytes();
                out.write_all(&[u8::try_from(f.len())?])?;
                out.write_all(f)?;
                out.write_all(&u32::try_from(k.key.len())?.to_le_bytes())?;
                out.write_all(&k.key)?;
                keys.push((k.fingerprint, k.key));
            }
            if keys.len() % 10_000 < CHUNK {
                out.flush()?;
                eprintln!(
                    "made {} keys ({:.0}/s)",
                    keys.len(),
                    (keys.len() - have) as f64 / t0.elapsed().as_secs_f64().max(1e-9)
                );
            }
        }
    }
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a key-making thread panicked"))?;
    }
    out.flush()?;
    if keys.len() < want {
        bail!("made only {} of {want} keys", keys.len());
    }
    Ok(keys)
}

/// The fingerprint of key `serial` of address `i`: the address in the key ID (the last 16
/// digits), so every filled key (serial 0) has a key ID of its own.
fn fingerprint(i: u64, serial: u64) -> kst_core::Fingerprint {
    format!("{serial:024X}{i:016X}")
        .parse()
        .expect("40 hex digits")
}

fn new_key(i: u64, serial: u64, len: usize) -> NewKey {
    let mut key = format!("bench key {i} {serial} ").into_bytes();
    key.resize(len, 0x5a);
    NewKey {
        address: address(i),
        key,
        fingerprint: fingerprint(i, serial),
        publication_id: format!("{i:016x}{serial:016x}"),
        published_at: 1_700_000_000 + serial,
        revoked: false,
        expected: kst_core::Expected::Any,
    }
}

/// Whether database `db` exists on the server of `admin`.
async fn database_exists(admin: &str, db: &str) -> Result<bool> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .with_context(|| format!("connect to {admin}"))?;
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(db)
        .fetch_optional(&mut conn)
        .await?;
    Ok(found.is_some())
}

async fn admin_sql(admin: &str, sql: String) -> Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .with_context(|| format!("connect to {admin}"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await?;
    Ok(())
}

impl Bench {
    async fn open(args: &Args) -> Result<Bench> {
        let tag = format!("{:016x}", rand::random::<u64>());
        Ok(match args.backend {
            Backend::Fs => {
                let dir = match &args.dir {
                    Some(d) => d.clone(),
                    None => args.path.join(format!("kst-store-bench-{tag}")),
                };
                let store = kst_fs::FsStore::open(&dir).await?;
                Bench {
                    store: Arc::new(store),
                    backend: args.backend,
                    mirrors: Vec::new(),
                    cleanup: Cleanup::Fs(dir),
                }
            }
            Backend::Postgres => {
                let db = match &args.namespace {
                    Some(db) => db.clone(),
                    None => format!("kst_bench_{tag}"),
                };
                if !database_exists(&args.url, &db).await? {
                    admin_sql(&args.url, format!("CREATE DATABASE {db}")).await?;
                }
                let store = kst_postgres::PostgresStore::builder(with_database(&args.url, &db))
                    .max_connections(32)
                    .acquire_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(60))
                    .connect()
                    .await?;
                Bench {
                    store: Arc::new(store),
                    backend: args.backend,
                    mirrors: Vec::new(),
                    cleanup: Cleanup::Postgres {
                        admin: args.url.clone(),
                        db,
                    },
                }
            }
            Backend::Redis => {
                let prefix = match &args.namespace {
                    Some(p) => p.clone(),
                    None => format!("kst-bench-{tag}:"),
                };
                let store = kst_redis::RedisStore::builder(args.url.clone())
                    .prefix(prefix.clone())
                    .connect()
                    .await?;
                Bench {
                    store: Arc::new(store),
                    backend: args.backend,
                    mirrors: Vec::new(),
                    cleanup: Cleanup::Redis {
                        url: args.url.clone(),
                        prefix,
                    },
                }
            }
        })
    }

    /// Adds addresses `from..to` with one key each.
    async fn fill(&self, from: u64, to: u64, key_bytes: usize) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let real = REAL_KEYS.load(Ordering::Relaxed);
        if real {
            return self.fill_by_publish(from, to, key_bytes).await;
        }
        if let (Backend::Postgres, Cleanup::Postgres { admin, db }) = (self.backend, &self.cleanup)
        {
            return fill_postgres(&with_database(admin, db), from, to, key_bytes).await;
        }
        if let Cleanup::Redis { url, prefix } = &self.cleanup {
            return fill_redis(url, prefix, from, to, key_bytes).await;
        }
        self.fill_by_publish(from, to, key_bytes).await
    }

    /// Publishes one key for each of addresses `from..to` through the store's own `publish`
    /// into the main store and each mirror, each store with 64 calls in flight of its own (a
    /// slow store does not hold the others back): `--real-keys` certificates (from
    /// `--keys-file` when given, made once for every store), or `--key-bytes` of filler (fs).
    /// Prints each store's progress every 10 s.
    async fn fill_by_publish(&self, from: u64, to: u64, key_bytes: usize) -> Result<()> {
        let real = REAL_KEYS.load(Ordering::Relaxed);
        let stores: Vec<Arc<dyn KeyStore>> = std::iter::once(Arc::clone(&self.store))
            .chain(self.mirrors.iter().cloned())
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        let mut progress = Vec::new();
        for (s, store) in stores.iter().enumerate() {
            let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
            let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
            progress.push((format!("{}#{s}", store.name()), Arc::clone(&done)));
            for _ in 0..64 {
                let store = Arc::clone(store);
                let (next, done) = (Arc::clone(&next), Arc::clone(&done));
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            return Ok::<_, anyhow::Error>(());
                        }
                        let key = if real {
                            match made_key(i) {
                                Some(k) => k?,
                                None => tokio::task::spawn_blocking(move || real_key(i)).await??,
                            }
                        } else {
                            new_key(i, 0, key_bytes)
                        };
                        publish_retrying(&store, &key).await?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        let started = Instant::now();
        let reporter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let secs = started.elapsed().as_secs_f64();
                let line: Vec<String> = progress
                    .iter()
                    .map(|(name, done)| {
                        let n = done.load(Ordering::Relaxed);
                        format!("{name} {} ({:.0}/s)", from + n, n as f64 / secs)
                    })
                    .collect();
                eprintln!("filled up to: {}", line.join(", "));
            }
        });
        let result = async {
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            Ok(())
        }
        .await;
        reporter.abort();
        result
    }

    async fn cleanup(&self, args: &Args) -> Result<()> {
        match &self.cleanup {
            Cleanup::Fs(_) if args.dir.is_some() => {}
            Cleanup::Postgres { .. } | Cleanup::Redis { .. } if args.namespace.is_some() => {}
            Cleanup::Fs(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await??;
            }
            Cleanup::Postgres { admin, db } => {
                admin_sql(admin, format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
            }
            Cleanup::Redis { url, prefix } => {
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}*"))
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut conn)
                        .await?;
                    if !keys.is_empty() {
                        redis::cmd("UNLINK")
                            .arg(&keys)
                            .exec_async(&mut conn)
                            .await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(())
    }
}

/// Publishes `key` into `store`, retrying a temporary failure (a pool that timed out on a busy
/// machine) up to 30 times a second apart: a fill of 10^6 keys must not die of one. Publishing
/// the same key again is idempotent (same publication id).
async fn publish_retrying(store: &Arc<dyn KeyStore>, key: &NewKey) -> Result<()> {
    let mut tries = 0;
    loop {
        match store.publish(key.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_temporary() && tries < 30 => {
                tries += 1;
                eprintln!("{}: {e}; retrying in 1 s", store.name());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Bulk fill of the kst-postgres schema (see `kst-postgres/migrations`): the rows `publish`
/// writes for a first version, made by the server from `generate_series`.
async fn fill_postgres(url: &str, from: u64, to: u64, key_bytes: usize) -> Result<()> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut start = from;
    while start < to {
        let end = (start + 100_000).min(to);
        let sql = format!(
            "BEGIN;
             INSERT INTO kst_keys (address, current_version)
               SELECT 'user' || lpad(i::text, 8, '0') || '@example.net', 1
               FROM generate_series({start}, {last}) AS i;
             INSERT INTO kst_key_history
               (address, version, key, fingerprint, published_at, publication_id, revoked, format)
               SELECT 'user' || lpad(i::text, 8, '0') || '@example.net', 1,
                      convert_to(rpad('bench key ' || i || ' 0 ', {key_bytes}, 'Z'), 'UTF8'),
                      lpad('0', 24, '0') || lpad(upper(to_hex(i)), 16, '0'), 1700000000,
                      lpad(to_hex(i), 16, '0') || lpad('0', 16, '0'), false, {format}
               FROM generate_series({start}, {last}) AS i;
             COMMIT;",
            last = end - 1,
            format = kst_core::store::RECORD_FORMAT,
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await?;
        start = end;
    }
    sqlx::raw_sql("ANALYZE kst_keys; ANALYZE kst_key_history;")
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Bulk fill of the kst-redis key layout (see `kst-redis/README.md`): for each address the five
/// writes its publish script makes for a first version and the look-up index sets (`fp`, `kid`,
/// `wkd`) its `publish` adds, pipelined 1 000 addresses at a time, 4 pipelines in flight. The
/// address listing is the earlier layout's single `Pindex` set (this bench never lists; `kst
/// migrate` would convert it).
async fn fill_redis(url: &str, prefix: &str, from: u64, to: u64, key_bytes: usize) -> Result<()> {
    let client = redis::Client::open(url)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120)));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut conn = conn.clone();
        let next = Arc::clone(&next);
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(1000, Ordering::Relaxed);
                if start >= to {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut pipe = redis::pipe();
                for i in start..(start + 1000).min(to) {
                    let record = new_key(i, 0, key_bytes).into_record(1);
                    let json = serde_json::to_string(&record)?;
                    let a = record.address.as_str();
                    pipe.set(format!("{prefix}{{{a}}}:cur"), &json).ignore();
                    pipe.set(format!("{prefix}{{{a}}}:ver"), "1").ignore();
                    pipe.hset(format!("{prefix}{{{a}}}:hist"), "1", &json)
                        .ignore();
                    pipe.hset(format!("{prefix}{{{a}}}:pub"), &record.publication_id, "1")
                        .ignore();
                    pipe.zadd(format!("{prefix}index"), a, 0).ignore();
                    // The look-up index sets `publish` writes (kst-redis/README.md, "Key layout").
                    let entries = kst_core::key_index::IndexEntries::of(&record);
                    for f in &entries.fingerprints {
                        pipe.sadd(format!("{prefix}fp:{}", f.as_str()), a).ignore();
                    }
                    for k in &entries.key_ids {
                        pipe.sadd(format!("{prefix}kid:{}", k.as_str()), a).ignore();
                    }
                    let wkd = format!("{prefix}wkd:{}:{}", entries.domain, entries.wkd_hash);
                    pipe.sadd(wkd, a).ignore();
                }
                pipe.exec_async(&mut conn).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Get,
    ByFingerprint,
    ByWkdHash,
    Publish,
}

impl Op {
    const ALL: [Op; 4] = [Op::Get, Op::ByFingerprint, Op::ByWkdHash, Op::Publish];

    fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name.trim())
    }

    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::ByFingerprint => "by-fpr",
            Op::ByWkdHash => "by-wkd",
            Op::Publish => "publish",
        }
    }
}

/// Runs `op` from `clients` tasks for `args.seconds`; returns (ops/s, p50, p99).
async fn measure(
    store: &Arc<dyn KeyStore>,
    op: Op,
    clients: usize,
    stored: u64,
    sample: &Arc<Vec<(u64, kst_core::Fingerprint)>>,
    args: &Args,
    serial_base: u64,
) -> Result<(f64, Duration, Duration)> {
    let (seconds, key_bytes) = (args.seconds, args.key_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let store = Arc::clone(store);
        let stop = Arc::clone(&stop);
        let sample = Arc::clone(sample);
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (i, fpr) = match op {
                    Op::ByFingerprint | Op::ByWkdHash => {
                        let (i, f) = &sample[rand::random_range(0..sample.len())];
                        (*i, Some(f))
                    }
                    Op::Get | Op::Publish => (rand::random_range(0..stored), None),
                };
                let t = Instant::now();
                match op {
                    Op::Get => {
                        if store.get(&address(i)).await?.is_none() {
                            return Err(anyhow::anyhow!("stored address {i} has no key"));
                        }
                    }
                    Op::ByFingerprint => {
                        let f = fpr.expect("sampled");
                        let found = store.find_by_fingerprint(f, 10).await?;
                        if found.len() != 1 || found[0].address != address(i) {
                            bail!("find_by_fingerprint of address {i}'s key found {found:?}");
                        }
                    }
                    Op::ByWkdHash => {
                        let a = address(i);
                        let hash = kst_core::wkd::WkdHash::of_address(&a);
                        match store.find_by_wkd_hash(a.domain(), &hash).await? {
                            Some(r) if r.address == a => {}
                            other => bail!("find_by_wkd_hash of {a} found {other:?}"),
                        }
                    }
                    Op::Publish => {
                        let serial = serial_base + (c as u64) * 100_000_000 + n;
                        store.publish(new_key(i, serial, key_bytes)).await?;
                    }
                }
                lat.push(t.elapsed());
                n += 1;
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if all.is_empty() {
        bail!("no operation finished");
    }
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok((all.len() as f64 / elapsed, pct(0.50), pct(0.99)))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.backend != Backend::Fs && args.url.is_empty() {
        bail!("--url is required for {:?}", args.backend);
    }
    if args.backend != Backend::Fs && args.dir.is_some() {
        bail!("--dir is for the fs backend (--namespace for the others)");
    }
    if args.backend == Backend::Fs && args.namespace.is_some() {
        bail!("--namespace is for PostgreSQL and Redis (--dir for fs)");
    }
    for name in &args.ops {
        if Op::parse(name).is_none() {
            bail!("--ops: unknown operation {name:?} (get, by-fpr, by-wkd, publish)");
        }
    }
    if !args.mirror.is_empty() && (!args.real_keys || !args.fill_only) {
        bail!("--mirror is for filling: use it with --real-keys --fill-only");
    }
    REAL_KEYS.store(args.real_keys, Ordering::Relaxed);
    if args.keys_file.is_some() && !args.real_keys {
        bail!("--keys-file is for --real-keys");
    }
    let mut sizes = args.stored.clone();
    sizes.sort_unstable();
    let mut bench = Bench::open(&args).await?;
    for spec in &args.mirror {
        bench
            .mirrors
            .push(Bench::open(&mirror_args(&args, spec)?).await?.store);
    }
    let result = run(&args, &bench, &sizes).await;
    if !args.keep {
        let t = Instant::now();
        bench.cleanup(&args).await?;
        eprintln!("cleaned up in {:.1} s", t.elapsed().as_secs_f64());
    }
    result
}

/// Up to `n` random addresses of `0..stored` with the fingerprint of their current key (read
/// before any timing).
async fn sample(
    store: &Arc<dyn KeyStore>,
    stored: u64,
    n: usize,
) -> Result<Vec<(u64, kst_core::Fingerprint)>> {
    let picks: Vec<u64> = if stored as usize <= n {
        (0..stored).collect()
    } else {
        (0..n).map(|_| rand::random_range(0..stored)).collect()
    };
    let mut out = Vec::with_capacity(picks.len());
    for chunk in picks.chunks(64) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let store = Arc::clone(store);
            tasks.spawn(async move { (i, store.get(&address(i)).await) });
        }
        while let Some(r) = tasks.join_next().await {
            let (i, got) = r?;
            match got? {
                Some(rec) => out.push((i, rec.fingerprint)),
                None => bail!("stored address {i} has no key"),
            }
        }
    }
    Ok(out)
}

/// Writes the request paths of `sample` for scripts/bench-web.sh (see `--paths-out`).
fn write_paths(dir: &std::path::Path, sample: &[(u64, kst_core::Fingerprint)]) -> Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let open = |name: &str| -> Result<std::io::BufWriter<std::fs::File>> {
        Ok(std::io::BufWriter::new(std::fs::File::create(
            dir.join(name),
        )?))
    };
    let (mut wkd, mut hash, mut vks, mut fpr, mut hkp) = (
        open("wkd.paths")?,
        open("wkdhash.paths")?,
        open("vks.paths")?,
        open("fpr.paths")?,
        open("hkp.paths")?,
    );
    for (i, f) in sample {
        let a = address(*i);
        let h = kst_core::wkd::WkdHash::of_address(&a);
        writeln!(wkd, "/.well-known/openpgpkey/hu/{h}?l={}", a.local())?;
        writeln!(hash, "/.well-known/openpgpkey/hu/{h}")?;
        writeln!(vks, "/vks/v1/by-email/{}%40{}", a.local(), a.domain())?;
        writeln!(fpr, "/vks/v1/by-fingerprint/{f}")?;
        writeln!(
            hkp,
            "/pks/lookup?op=get&options=mr&search={}%40{}",
            a.local(),
            a.domain()
        )?;
    }
    for mut w in [wkd, hash, vks, fpr, hkp] {
        w.flush()?;
    }
    Ok(())
}

async fn run(args: &Args, bench: &Bench, sizes: &[u64]) -> Result<()> {
    println!("| backend | stored | clients | op | ops/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---|---:|---:|---:|");
    let mut filled = args.filled;
    let mut serial_base = 1;
    for &stored in sizes {
        let grew = stored > filled;
        if grew && let Some(path) = &args.keys_file {
            // The certificates of this size (made now if the file lacks them), not of the
            // largest: a fill in steps publishes while later steps' keys are not made yet.
            let threads = args.keygen_threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            let path = path.clone();
            let keys =
                tokio::task::spawn_blocking(move || keys_file(&path, stored, threads)).await??;
            *MADE_KEYS.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
        }
        if grew {
            let t = Instant::now();
            bench.fill(filled, stored, args.key_bytes).await?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "filled {} keys in {secs:.1} s ({:.0}/s)",
                stored - filled,
                (stored - filled) as f64 / secs.max(1e-9)
            );
        }
        let bulk = bench.backend == Backend::Postgres && !args.real_keys;
        if args.rebuild_index || (grew && bulk) {
            let t = Instant::now();
            let indexed = bench.store.rebuild_index().await?;
            eprintln!(
                "rebuild_index: {indexed} keys indexed in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        for (m, spec) in bench.mirrors.iter().zip(&args.mirror) {
            // Every sampled address has its key in the mirror too (else this fails).
            sample(m, stored, 10_000)
                .await
                .with_context(|| format!("mirror {spec}"))?;
        }
        if let Some(dir) = &args.paths_out {
            let t = Instant::now();
            write_paths(dir, &sample(&bench.store, stored, 200_000).await?)?;
            eprintln!(
                "request paths written to {} in {:.1} s",
                dir.display(),
                t.elapsed().as_secs_f64()
            );
        }
        if args.fill_only {
            filled = filled.max(stored);
            continue;
        }
        let lookups = Arc::new(sample(&bench.store, stored, 10_000).await?);
        // Look-ups by fingerprint and WKD hash ask for a sample of 10,000 stored addresses,
        // read before the publish runs below replace keys (new fingerprints).
        filled = filled.max(stored);
        let mut runs = Vec::new();
        for op in Op::ALL {
            if !args
                .ops
                .iter()
                .any(|o| Op::parse(o).is_some_and(|p| p.name() == op.name()))
            {
                continue;
            }
            for &clients in &args.clients {
                runs.push((op, clients));
            }
        }
        for (op, clients) in runs {
            let (rate, p50, p99) = measure(
                &bench.store,
                op,
                clients,
                stored,
                &lookups,
                args,
                serial_base,
            )
            .await?;
            serial_base += 10_000_000_000;
            println!(
                "| {} | {stored} | {clients} | {} | {rate:.0} | {} | {} |",
                bench.store.name(),
                op.name(),
                ms(p50),
                ms(p99)
            );
        }
    }
    Ok(())
}
