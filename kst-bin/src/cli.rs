//! The `kst` command line: the clap definitions, and the hand-off of each command to its room
//! (`server`, `operator`, `client`, `bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "server")]
use crate::operator::{
    self, config_check::ConfigCommand, dkim::DkimCommand, keys::KeysCommand, wks::WksCommand,
};
#[cfg(feature = "server")]
use crate::server::{deliver, deliver::DeliverArgs, outbox::OutboxCommand, serve};

const ABOUT: &str = "kst, the Key Storage Service: publishes and hands out OpenPGP keys by email";

const LONG_ABOUT: &str = "\
kst, the Key Storage Service: publishes and hands out OpenPGP keys by email.

Mail clients send their public key to keys@<domain> over authenticated SMTP submission; anyone can
ask keys@<domain> for the key of an address. Postfix hands each such message to `kst deliver`,
which stores the key or looks it up and sends the reply. The other commands are for the operator.";

const AFTER_HELP: &str = "\
Configuration: a TOML file (--config FILE or KST_CONFIG), overridden by environment variables
KST_<SECTION>__<KEY>, e.g. KST_MAILER__PORT=2525 or KST_KST__DOMAINS=example.net,example.org.
Every key is documented in deploy/kst.toml. Check it with:  kst config check --config FILE

Exit codes (keys, config): 0 done, 1 not found, 64 bad argument, 69 store unavailable,
78 configuration error.";

/// The `kst` command line.
#[derive(Debug, Parser)]
#[command(name = "kst", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// Configuration file (TOML). Without it the built-in defaults apply, plus the
    /// KST_<SECTION>__<KEY> environment overrides.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "KST_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands; which exist depends on the crate's features (`server`, `client`, `bench`).
// Parsed once per process: the size of the client's argument struct does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Handle one message from Postfix's pipe(8) on stdin (see `kst deliver --help`).
    #[cfg(feature = "server")]
    #[command(long_about = deliver::DELIVER_LONG, after_help = deliver::DELIVER_AFTER)]
    Deliver(DeliverArgs),

    /// Run the LMTP daemon the MTA delivers keys@ mail to (see `kst serve --help`).
    #[cfg(feature = "server")]
    #[command(long_about = serve::SERVE_LONG, after_help = serve::SERVE_AFTER)]
    Serve,

    /// Show, list the history of, or delete the key stored for an address.
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Keys(KeysCommand),

    /// Apply the store's schema migrations (PostgreSQL) and rebuild its look-up index.
    ///
    /// The index (fingerprints, key IDs and WKD hashes of the current keys, for the [web]
    /// look-ups) is rebuilt from the stored keys on every backend; the number of keys indexed
    /// is printed. Safe while kst serves. `kst serve` and `kst deliver` apply the schema by
    /// themselves when they start; run this before a rolling upgrade of a pool so that no
    /// instance waits on the schema lock, and once after upgrading a store written before the
    /// index existed.
    #[cfg(feature = "server")]
    Migrate,

    /// Write every key with its whole history as JSON lines (one line per address).
    ///
    /// Example (move from the filesystem to PostgreSQL):
    ///   kst export --config fs.toml > keys.jsonl
    ///   kst import --config pg.toml keys.jsonl
    #[cfg(feature = "server")]
    Export {
        /// Write to FILE instead of stdout: through a temporary file in its directory, synced
        /// and renamed into place, so a failed export leaves no half file.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },

    /// Read JSON lines written by `kst export` and store each address's history as it is,
    /// replacing what the store held for that address. Importing a file twice is harmless.
    #[cfg(feature = "server")]
    Import {
        /// The export file; `-` for stdin.
        #[arg(value_name = "FILE")]
        input: PathBuf,
    },

    /// Check the configuration.
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Config(ConfigCommand),

    /// The Web Key Service: make a domain's submission key (`kst wks keygen DOMAIN`).
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Wks(WksCommand),

    /// DKIM keys for signing replies: `kst dkim keygen DOMAIN`, `kst dkim records`.
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Mail the owners of keys that expire soon (see `kst reminders send --help`).
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Reminders(crate::operator::reminders::RemindersCommand),

    /// Key transparency: `kst log keygen DOMAIN --output FILE` (feature `transparency`; see
    /// docs/TRANSPARENCY.md).
    #[cfg(all(feature = "server", feature = "transparency"))]
    #[command(subcommand)]
    Log(crate::operator::log::LogCommand),

    /// Send the replies the spool mailer wrote (see `kst outbox send --help`).
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Outbox(OutboxCommand),

    /// Load-test a running `kst serve` (LMTP) or pipe mode with real keys; prints msg/s and
    /// p50/p95/p99 latency. See docs/BENCHMARKS.md and scripts/bench.sh.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),

    /// The mail client's side: publish your key, retrieve others' keys (see `kst client --help`).
    #[cfg(feature = "client")]
    #[command(after_help = crate::client::CLIENT_AFTER_HELP)]
    Client(crate::client::ClientArgs),
}

impl Command {
    /// True for the long-running daemon (`kst serve`), which gets a multi-threaded runtime.
    pub fn is_daemon(&self) -> bool {
        #[cfg(feature = "server")]
        if matches!(self, Command::Serve) {
            return true;
        }
        false
    }
}

/// Runs a parsed command line in the room of its command and returns the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    // The client reads its own settings (client.toml), not the server's.
    #[cfg(any(feature = "server", feature = "bench"))]
    let config = cli.config.as_deref();
    let code = match cli.command {
        #[cfg(feature = "server")]
        Command::Deliver(args) => deliver::run(config, args).await,
        #[cfg(feature = "server")]
        Command::Serve => serve::run_command(config).await,
        #[cfg(feature = "server")]
        Command::Outbox(cmd) => crate::server::outbox::run_command(config, cmd).await,
        #[cfg(feature = "server")]
        Command::Keys(cmd) => operator::keys::run(config, cmd).await,
        #[cfg(feature = "server")]
        Command::Migrate => operator::migrate(config).await,
        #[cfg(feature = "server")]
        Command::Export { output } => {
            operator::transfer::export_command(config, output.as_deref()).await
        }
        #[cfg(feature = "server")]
        Command::Import { input } => operator::transfer::import_command(config, &input).await,
        #[cfg(feature = "server")]
        Command::Config(cmd) => operator::config_check::run(config, cmd).await,
        #[cfg(feature = "server")]
        Command::Wks(cmd) => operator::wks::run(config, cmd).await,
        #[cfg(feature = "server")]
        Command::Dkim(cmd) => operator::dkim::run(config, cmd).await,
        Command::Reminders(cmd) => operator::reminders::run(config, cmd).await,
        #[cfg(all(feature = "server", feature = "transparency"))]
        Command::Log(cmd) => operator::log::run(config, cmd).await,
        #[cfg(feature = "bench")]
        Command::Bench(cmd) => crate::bench::run(cmd, config).await,
        #[cfg(feature = "client")]
        Command::Client(args) => crate::client::run(args).await,
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    #[cfg(feature = "server")]
    use std::path::Path;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[cfg(feature = "server")]
    #[test]
    fn config_flag_works_after_the_subcommand_and_envelope_may_be_empty() {
        let cli = Cli::try_parse_from([
            "kst",
            "deliver",
            "--sender",
            "",
            "--recipient",
            "keys@example.net",
            "--sasl-username",
            "",
            "--config",
            "/etc/kst/kst.toml",
        ])
        .unwrap();
        assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/kst/kst.toml")));
        match cli.command {
            Command::Deliver(a) => {
                assert_eq!(a.sender.as_deref(), Some(""));
                assert_eq!(a.sasl_username.as_deref(), Some(""));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["kst", "deliver", "--sender", "-odd@acme.net"]).unwrap();
        assert!(
            matches!(cli.command, Command::Deliver(a) if a.sender.as_deref() == Some("-odd@acme.net"))
        );
    }
}
