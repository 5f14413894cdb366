//! The `kst` binary: parses the command line and runs it on a Tokio runtime.

use std::process::ExitCode;

use clap::Parser;
use kst_bin::cli::{self, Cli};
use kst_bin::exit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon uses every core; one-shot commands (one message, one key) need one thread.
    let mut builder = if cli.command.is_daemon() {
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
    runtime.block_on(cli::run(cli))
}
