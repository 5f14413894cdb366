//! The `kst` binary: parses the command line and runs it on a Tokio runtime.

use std::process::ExitCode;

use clap::Parser;
use kst_bin::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kst: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::TEMPFAIL);
        }
    };
    runtime.block_on(cli::run(cli))
}
