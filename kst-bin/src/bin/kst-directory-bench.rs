//! `kst-directory-bench`: proof sizes and verification times of a key directory at 10^3 to
//! 10^6 entries (issue 18), on a real directory store. See `kst_bin::bench::directory` for
//! what is filled and measured, docs/BENCHMARKS.md ("Key transparency at 10^6 entries") for
//! the figures.
//!
//! ```text
//! cargo build --release -p kst-bin --bin kst-directory-bench
//! target/release/kst-directory-bench --backend fs --path /var/tmp --sizes 1000,10000,100000,1000000
//! target/release/kst-directory-bench --backend memory
//! target/release/kst-directory-bench --backend postgres \
//!     --url postgres://postgres:postgres@127.0.0.1:5432/postgres --sizes 1000,10000,100000
//! ```
//!
//! It works in a fresh namespace (a new directory under `--path`, a new database on the
//! PostgreSQL server of `--url`) and removes it at the end unless `--keep`. It prints the
//! machine's load (`uptime`) before and after, and two Markdown tables: how each size was
//! filled, and every proof's size, generation and verification times. Filling stops (and the
//! tables say so) when the file system of `--path` (PostgreSQL: of `/`) would keep less than
//! `--min-free-gb` or lost more than `--max-used-gb` since the start, or memory less than
//! `--min-free-ram-gb`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kst_bin::bench::directory::{self, MemoryDirectoryStore, Options};
use kst_core::transparency::DirectoryStore;

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kst-directory-bench",
    about = "Proof sizes and verify times of a kst key directory at 10^3..10^6 entries"
)]
struct Args {
    /// The directory store.
    #[arg(long, value_enum)]
    backend: Backend,
    /// fs: directory under which a fresh store directory is made.
    #[arg(long, default_value = "/var/tmp")]
    path: std::path::PathBuf,
    /// postgres: server URL (any database on it; a fresh one is created beside it).
    #[arg(long, default_value = "")]
    url: String,
    /// Sizes (addresses) to measure at, ascending, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,100000,1000000"
    )]
    sizes: Vec<u64>,
    /// Most new addresses per bulk epoch.
    #[arg(long, default_value_t = 10_000)]
    epoch_size: u64,
    /// New addresses in each of the ten epochs before each size (the writer's largest epoch).
    #[arg(long, default_value_t = 512)]
    tail_epoch_size: u64,
    /// Proofs generated per measurement (distinct addresses).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Verifications timed per measurement.
    #[arg(long, default_value_t = 1000)]
    verifications: usize,
    /// Most seconds spent generating, and again verifying, each append-only proof.
    #[arg(long, default_value_t = 20.0)]
    audit_seconds: f64,
    /// Stop filling below this much free disk (GB).
    #[arg(long, default_value_t = 15)]
    min_free_gb: u64,
    /// Stop filling when the free disk fell by more than this since the start (GB).
    #[arg(long, default_value_t = 15)]
    max_used_gb: u64,
    /// Stop filling below this much available memory (GB).
    #[arg(long, default_value_t = 2)]
    min_free_ram_gb: u64,
    /// Keep the store afterwards.
    #[arg(long)]
    keep: bool,
    /// Print each epoch and phase on stderr.
    #[arg(long, short = 'v')]
    verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Fs,
    Postgres,
    Memory,
}

/// What to remove at the end.
enum Cleanup {
    Nothing,
    Fs(std::path::PathBuf),
    Postgres { admin: String, db: String },
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

fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("(uptime: {e})"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tag = format!("{:016x}", rand::random::<u64>());
    let (store, cleanup, disk_path): (Arc<dyn DirectoryStore>, _, _) = match args.backend {
        Backend::Fs => {
            let dir = args.path.join(format!("kst-directory-bench-{tag}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            (
                Arc::new(kst_fs::FsDirectoryStore::new(&dir)),
                Cleanup::Fs(dir.clone()),
                dir,
            )
        }
        Backend::Postgres => {
            if args.url.is_empty() {
                bail!("--url is required for postgres");
            }
            let db = format!("kst_dirbench_{tag}");
            admin_sql(&args.url, format!("CREATE DATABASE {db}")).await?;
            let store = kst_postgres::PgDirectoryStore::connect(
                &kst_postgres::with_database(&args.url, &db),
                8,
            )
            .await
            .context("connect to the bench database")?;
            (
                Arc::new(store),
                Cleanup::Postgres {
                    admin: args.url.clone(),
                    db,
                },
                "/".into(),
            )
        }
        Backend::Memory => (
            Arc::new(MemoryDirectoryStore::default()),
            Cleanup::Nothing,
            "/".into(),
        ),
    };
    let opts = Options {
        sizes: args.sizes.clone(),
        epoch_size: args.epoch_size,
        tail_epoch_size: args.tail_epoch_size,
        samples: args.samples,
        verifications: args.verifications,
        audit_seconds: args.audit_seconds,
        disk_path,
        min_free_disk: args.min_free_gb * 1_000_000_000,
        max_used_disk: args.max_used_gb * 1_000_000_000,
        min_free_ram: args.min_free_ram_gb * 1_000_000_000,
        progress: args.verbose,
    };
    let name = store.name();
    println!(
        "kst-directory-bench {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    println!("start: {}", uptime());
    let result = directory::run(Arc::clone(&store), name, &opts).await;
    println!("end: {}", uptime());
    drop(store);
    let cleaned = if args.keep {
        match &cleanup {
            Cleanup::Fs(dir) => eprintln!("kept {}", dir.display()),
            Cleanup::Postgres { db, .. } => eprintln!("kept database {db}"),
            Cleanup::Nothing => {}
        }
        Ok(())
    } else {
        match cleanup {
            Cleanup::Nothing => Ok(()),
            Cleanup::Fs(dir) => {
                std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))
            }
            Cleanup::Postgres { admin, db } => {
                admin_sql(&admin, format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await
            }
        }
    };
    let report = result?;
    println!("\n{}", report.to_markdown());
    cleaned
}
