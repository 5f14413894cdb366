//! The `kst` binary: parses the command line and runs it on a Tokio runtime.

use std::process::ExitCode;

use clap::Parser;
use kst_bin::cli::{self, Cli};
use kst_bin::exit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon uses every core; one-shot commands (one message, one key) need one thread.
    let mut builder = if cli.command.is_daemon() {
        cap_malloc_arenas();
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kst: cannot start the async runtime: {e}");
            return ExitCode::from(exit::TEMPFAIL);
        }
    };
    let code = runtime.block_on(cli::run(cli));
    // Every task, and the key directories they held, dropped; then the directories' threads
    // finish the work their backends still do after answering (kst-fs writes a committed
    // epoch's files after its journal frame), so the exit does not cut it short.
    drop(runtime);
    #[cfg(feature = "transparency")]
    kst_core::transparency::wait_for_log_threads(LOG_THREADS_AT_EXIT);
    code
}

/// The longest the process waits at its exit for its key directories' threads
/// ([`kst_core::transparency::wait_for_log_threads`]); an epoch's files take milliseconds.
#[cfg(feature = "transparency")]
const LOG_THREADS_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Caps glibc's malloc arenas at 2 before the daemon starts its threads. By default glibc gives
/// threads up to 8 arenas per core; memory allocated on one thread (a file read on a blocking
/// thread) and freed on another (the async worker that answered) stays cached in the first
/// one's arena, and `kst serve` on a large fs store grew by about 2 MiB/s of anonymous memory
/// under load (35 threads; 80 MiB after 24 s, still growing). With 2 arenas it levels off
/// (54 MiB RSS after 14 s, flat to the end; docs/BENCHMARKS.md). An operator's
/// `MALLOC_ARENA_MAX` wins.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any other thread
        // exists, so no allocation races with the change.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
