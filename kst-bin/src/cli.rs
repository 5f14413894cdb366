//! The `kst` command line: clap definitions, and the operator commands `keys` and `config check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use kst_core::{Address, Error, KeyRecord, KeyStore};
use serde::Serialize;

use crate::config::{Config, LogConfig};
use crate::{logging, mailer, stores};

/// Exit codes of the operator commands (sysexits.h where one fits).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Nothing stored for the address.
    pub const NOT_FOUND: u8 = 1;
    /// A bad argument, e.g. an address that is not one.
    pub const USAGE: u8 = 64;
    /// Bad input data: `outbox send` set files aside that are not spool files.
    pub const DATAERR: u8 = 65;
    /// The input file of `import` cannot be read.
    pub const NOINPUT: u8 = 66;
    /// The store (or the mailer, for `config check --probe`) cannot be used now.
    pub const UNAVAILABLE: u8 = 69;
    /// A bug: an error kst did not expect.
    pub const SOFTWARE: u8 = 70;
    /// The output file of `export` cannot be written.
    pub const CANTCREAT: u8 = 73;
    /// Try again later; `deliver` uses it so that Postfix keeps the message.
    pub const TEMPFAIL: u8 = 75;
    /// The configuration is wrong.
    pub const CONFIG: u8 = 78;
}

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

const SERVE_LONG: &str = "\
Runs the LMTP daemon that Postfix (or Exim) delivers keys@ mail to: one long-running process
instead of one per message. Without --config it runs on the embedded default: keys@example.test,
filesystem store in ./data/keys, replies spooled to ./data/outbox (`kst outbox send` sends them
to the [mailer] relay), LMTP on 127.0.0.1:2424 and /healthz /readyz /metrics on 127.0.0.1:8080.

WARNING: the LMTP port is as trusted as the MTA. Whoever can connect to it can write a
\"trusted\" Received: header and publish keys for any account. Keep [lmtp] listen on loopback
or a Unix socket and [lmtp] allow as narrow as your MTA hosts.

SIGTERM or SIGINT stops accepting, lets transactions in flight finish, then exits; a second
signal exits at once (unacknowledged messages stay with the MTA).";

const SERVE_AFTER: &str = "\
Postfix set-up:

  # /etc/postfix/main.cf
  smtpd_sasl_authenticated_header = yes
  transport_maps = hash:/etc/postfix/transport    # keys@example.net  lmtp:inet:127.0.0.1:2424

Config keys: [lmtp] listen, allow, max_message_size, max_connections, command_timeout_secs,
data_timeout_secs, max_recipients, shutdown_grace_secs; [http] listen (\"\" turns it off).
See deploy/kst.toml and docs/OPERATIONS.md.";

const DELIVER_LONG: &str = "\
Handles one message on stdin, the way Postfix's pipe(8) transport runs it: classifies it as a
key publication or a key retrieval, stores or looks up the key, and sends the reply through the
configured mailer.

Exit status: 0 once kst has decided (including refusals answered with a reply), 75 when the
store, the mailer or the configuration is unusable (Postfix keeps the message and retries),
65 for mail that is not for kst (unknown recipient, oversize).";

const DELIVER_AFTER: &str = "\
Postfix set-up (one recipient per delivery):

  # /etc/postfix/master.cf
  kst  unix  -  n  n  -  -  pipe
    flags=Rq user=kst argv=/usr/local/bin/kst deliver --config /etc/kst/kst.toml
    --sender ${sender} --recipient ${recipient} --sasl-username ${sasl_username}

  # /etc/postfix/main.cf
  smtpd_sasl_authenticated_header = yes
  kst_destination_recipient_limit = 1
  transport_maps = hash:/etc/postfix/transport    # keys@example.net  kst:

Try it by hand:
  kst deliver --config kst.toml --sender bob@acme.net --recipient keys@example.net < request.eml";

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

/// The subcommands.
// Parsed once per process: the size of the client's argument struct does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Handle one message from Postfix's pipe(8) on stdin (see `kst deliver --help`).
    #[command(long_about = DELIVER_LONG, after_help = DELIVER_AFTER)]
    Deliver(DeliverArgs),

    /// Run the LMTP daemon the MTA delivers keys@ mail to (see `kst serve --help`).
    #[command(long_about = SERVE_LONG, after_help = SERVE_AFTER)]
    Serve,

    /// Show, list the history of, or delete the key stored for an address.
    #[command(subcommand)]
    Keys(KeysCommand),

    /// Apply the store's schema migrations (PostgreSQL); other backends are only checked.
    ///
    /// `kst serve` and `kst deliver` migrate by themselves when they start; run this before a
    /// rolling upgrade of a pool so that no instance waits on the schema lock.
    Migrate,

    /// Write every key with its whole history as JSON lines (one line per address).
    ///
    /// Example (move from the filesystem to PostgreSQL):
    ///   kst export --config fs.toml > keys.jsonl
    ///   kst import --config pg.toml keys.jsonl
    Export {
        /// Write to FILE instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },

    /// Read JSON lines written by `kst export` and store each address's history as it is,
    /// replacing what the store held for that address. Importing a file twice is harmless.
    Import {
        /// The export file; `-` for stdin.
        #[arg(value_name = "FILE")]
        input: PathBuf,
    },

    /// Check the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),

    /// Send the replies the spool mailer wrote (see `kst outbox send --help`).
    #[command(subcommand)]
    Outbox(OutboxCommand),

    /// Load-test a running `kst serve` (LMTP) or pipe mode with real keys; prints msg/s and
    /// p50/p95/p99 latency. See docs/BENCHMARKS.md and scripts/bench.sh.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),

    /// The mail client's side: publish your key, retrieve others' keys (see `kst client --help`).
    #[command(after_help = crate::client::CLIENT_AFTER_HELP)]
    Client(crate::client::ClientArgs),
}

/// The envelope Postfix passes to `kst deliver`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct DeliverArgs {
    /// Envelope sender, where the reply goes (Postfix: ${sender}; empty for the null sender).
    #[arg(long, value_name = "ADDRESS", allow_hyphen_values = true)]
    pub sender: Option<String>,

    /// Envelope recipient, keys@<a served domain> (Postfix: ${recipient}).
    #[arg(long, value_name = "ADDRESS", allow_hyphen_values = true)]
    pub recipient: Option<String>,

    /// SASL login of the submitting client (Postfix: ${sasl_username}; empty when none). Used
    /// only with `auth_source = "sasl-argv"`.
    #[arg(long, value_name = "LOGIN", allow_hyphen_values = true)]
    pub sasl_username: Option<String>,
}

/// `kst outbox ...`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Hand every reply in the spool (`[mailer] path`) to the SMTP relay of `[mailer]` (`host`,
    /// `port`, `tls`, `username`, `password`), oldest first, removing each file after the
    /// relay's 250.
    ///
    /// For `[mailer] kind = "spool"`: kst makes each reply durable in the spool before it answers
    /// its MTA, and this command sends them, e.g. every minute from a timer:
    ///   kst --config /etc/kst/kst.toml outbox send
    /// A file that is not a spool file is renamed to <name>.bad and skipped. Only one run sends
    /// at a time. Exit codes: 0 everything sent (or nothing to send), 65 some files set aside as
    /// .bad, 75 the relay failed (the rest stays for the next run), 78 configuration.
    Send {
        /// The spool directory, instead of `[mailer] path`.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `kst keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the current key of ADDRESS, ASCII-armored (exit 1 when there is none).
    ///
    /// Example: kst keys get alice@example.net --config /etc/kst/kst.toml | gpg --import
    Get {
        /// The address, folded like incoming requests (case, subaddress as configured).
        address: String,
        /// Print the record's metadata (version, fingerprint, dates) as JSON instead.
        #[arg(long)]
        json: bool,
    },

    /// Delete the current key and the whole history of ADDRESS (exit 1 when there is none).
    ///
    /// A later publication starts again at version 1.
    /// Example: kst keys delete alice@example.net --config /etc/kst/kst.toml
    Delete {
        /// The address.
        address: String,
    },

    /// List every published version of ADDRESS, oldest first (exit 1 when there is none).
    ///
    /// Example: kst keys history alice@example.net --json
    History {
        /// The address.
        address: String,
        /// One JSON array of record metadata instead of text lines.
        #[arg(long)]
        json: bool,
    },
}

/// `kst config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file + environment + defaults) with secrets masked,
    /// or say what is wrong (exit 78).
    ///
    /// Example: KST_MAILER__PORT=2525 kst config check --config /etc/kst/kst.toml
    Check {
        /// Also open the store and connect to the mailer (exit 69 when one is unavailable).
        #[arg(long)]
        probe: bool,
    },
}

/// Runs a parsed command line. `deliver` goes to [`crate::deliver::run`]; a configuration
/// error there exits 75 so that Postfix keeps the message.
pub async fn run(cli: Cli) -> ExitCode {
    // The client reads its own settings (client.toml), not the server's.
    if let Command::Client(args) = cli.command {
        return ExitCode::from(crate::client::run(args).await);
    }
    let loaded = Config::load(cli.config.as_deref());
    match cli.command {
        Command::Deliver(args) => match loaded {
            Ok(cfg) => {
                logging::init(&cfg.log);
                crate::deliver::run(cfg, args).await
            }
            Err(e) => {
                logging::init(&LogConfig::default());
                tracing::error!(
                    error = %e,
                    "configuration error: the message stays queued until the configuration is fixed"
                );
                ExitCode::from(exit::TEMPFAIL)
            }
        },
        Command::Serve => {
            let loaded = if cli.config.is_none() {
                Config::load_with_env(None, embedded_env())
            } else {
                loaded
            };
            match loaded {
                Ok(cfg) => ExitCode::from(serve(cfg).await),
                Err(e) => ExitCode::from(config_failed(&e)),
            }
        }
        Command::Migrate => match loaded {
            Ok(cfg) => {
                logging::init(&cfg.log);
                match stores::migrate(&cfg.store).await {
                    Ok(msg) => {
                        eprintln!("kst: {msg}");
                        ExitCode::from(exit::OK)
                    }
                    Err(e) => ExitCode::from(failed(&e)),
                }
            }
            Err(e) => ExitCode::from(config_failed(&e)),
        },
        Command::Export { output } => match loaded {
            Ok(cfg) => {
                logging::init(&cfg.log);
                ExitCode::from(export(&cfg, output.as_deref()).await)
            }
            Err(e) => ExitCode::from(config_failed(&e)),
        },
        Command::Import { input } => match loaded {
            Ok(cfg) => {
                logging::init(&cfg.log);
                ExitCode::from(import(&cfg, &input).await)
            }
            Err(e) => ExitCode::from(config_failed(&e)),
        },
        Command::Bench(cmd) => ExitCode::from(crate::bench::run(cmd, cli.config.as_deref()).await),
        Command::Outbox(OutboxCommand::Send { dir }) => match loaded {
            Ok(cfg) => {
                logging::init(&cfg.log);
                let dir = dir.unwrap_or_else(|| cfg.mailer.path.clone());
                ExitCode::from(outbox_send(&cfg, &dir).await)
            }
            Err(e) => ExitCode::from(config_failed(&e)),
        },
        Command::Config(ConfigCommand::Check { probe }) => {
            ExitCode::from(config_check(cli.config.as_deref(), loaded, probe).await)
        }
        Command::Client(_) => ExitCode::from(exit::SOFTWARE), // handled above
        Command::Keys(cmd) => {
            let cfg = match loaded {
                Ok(c) => c,
                Err(e) => return ExitCode::from(config_failed(&e)),
            };
            logging::init(&cfg.log);
            ExitCode::from(keys(&cfg, cmd).await)
        }
    }
}

/// The process environment, plus the embedded quick-start domain (`example.test`, RFC 2606, trusting the
/// local MTA) unless `KST_KST__DOMAINS` names one: `kst serve` with no configuration file.
fn embedded_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if !env.iter().any(|(k, _)| k == "KST_KST__DOMAINS") {
        env.push(("KST_KST__DOMAINS".into(), "example.test".into()));
        if !env.iter().any(|(k, _)| k == "KST_KST__TRUSTED_MTA_HOSTS") {
            env.push(("KST_KST__TRUSTED_MTA_HOSTS".into(), "localhost".into()));
        }
    }
    env
}

/// `kst serve`: builds the KST (a PostgreSQL or Redis store that is down does not stop the
/// start; `/readyz` says so) and runs the LMTP daemon until a signal.
async fn serve(cfg: Config) -> u8 {
    if let Some(note) = logging::init(&cfg.log) {
        tracing::warn!("{note}");
    }
    let kst = match crate::deliver::build_kst_with(&cfg, stores::Reach::Lazily).await {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return failed(&e);
        }
    };
    tracing::info!(
        domains = ?cfg.kst.domains,
        store = kst.store().name(),
        "kst serve starting"
    );
    match crate::lmtp::serve(cfg.lmtp.clone(), cfg.http.clone(), kst).await {
        Ok(()) => {
            tracing::info!("kst serve stopped");
            exit::OK
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kst serve failed");
            eprintln!("kst: {e:#}");
            exit::UNAVAILABLE
        }
    }
}

async fn export(cfg: &Config, output: Option<&Path>) -> u8 {
    let store = match stores::open_store(&cfg.store, stores::Reach::Now).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let result = match output {
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::transfer::export(store.as_ref(), &mut out).await
        }
        Some(path) => {
            // Write beside the target and rename, so a failed export leaves no half file.
            let tmp = path.with_extension("partial");
            let file = match std::fs::File::create(&tmp) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("kst: cannot create {}: {e}", tmp.display());
                    return exit::CANTCREAT;
                }
            };
            let mut out = std::io::BufWriter::new(file);
            let r = crate::transfer::export(store.as_ref(), &mut out).await;
            drop(out);
            match r {
                Ok(c) => match std::fs::rename(&tmp, path) {
                    Ok(()) => Ok(c),
                    Err(e) => {
                        eprintln!(
                            "kst: cannot rename {} to {}: {e}",
                            tmp.display(),
                            path.display()
                        );
                        return exit::CANTCREAT;
                    }
                },
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
    };
    match result {
        Ok(c) => {
            eprintln!(
                "kst: exported {} address(es), {} version(s) from the {} store",
                c.addresses,
                c.versions,
                store.name()
            );
            exit::OK
        }
        Err(e) => failed(&e),
    }
}

async fn import(cfg: &Config, input: &Path) -> u8 {
    let store = match stores::open_store(&cfg.store, stores::Reach::Now).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let result = if input == Path::new("-") {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        crate::transfer::import(store.as_ref(), &mut lock).await
    } else {
        match std::fs::File::open(input) {
            Ok(f) => {
                let mut r = std::io::BufReader::new(f);
                crate::transfer::import(store.as_ref(), &mut r).await
            }
            Err(e) => {
                eprintln!("kst: cannot read {}: {e}", input.display());
                return exit::NOINPUT;
            }
        }
    };
    match result {
        Ok(c) => {
            eprintln!(
                "kst: imported {} address(es), {} version(s) into the {} store",
                c.addresses,
                c.versions,
                store.name()
            );
            exit::OK
        }
        Err(e) => failed(&e),
    }
}

fn config_failed(e: &crate::config::ConfigError) -> u8 {
    eprintln!("kst: configuration error: {e}");
    eprintln!(
        "kst: fix the file or the KST_* environment variable; `kst config check` shows the result"
    );
    exit::CONFIG
}

/// `kst outbox send`: runs it and says what it did.
async fn outbox_send(cfg: &Config, dir: &Path) -> u8 {
    match crate::outbox::send(&cfg.mailer, dir).await {
        Ok(r) if r.busy => {
            eprintln!(
                "kst: another `kst outbox send` is sending {}; nothing done",
                dir.display()
            );
            exit::OK
        }
        Ok(r) => {
            eprintln!(
                "kst: {} sent, {} set aside as .bad, {} left in {}",
                r.sent,
                r.set_aside,
                r.left,
                dir.display()
            );
            if let Some(e) = &r.error {
                eprintln!("kst: stopped: {e}; the rest is sent by the next run");
                exit::TEMPFAIL
            } else if r.set_aside > 0 {
                exit::DATAERR
            } else {
                exit::OK
            }
        }
        Err(e) => {
            eprintln!("kst: {e:#}");
            exit::TEMPFAIL
        }
    }
}

/// The exit code and message for an error from a store or mailer.
fn failed(e: &Error) -> u8 {
    eprintln!("kst: {e}");
    match e {
        Error::Unavailable { .. } | Error::Corrupt { .. } => exit::UNAVAILABLE,
        Error::Config(_) => exit::CONFIG,
        Error::Invalid(_) => exit::USAGE,
        _ => exit::SOFTWARE,
    }
}

async fn config_check(
    path: Option<&Path>,
    loaded: Result<Config, crate::config::ConfigError>,
    probe: bool,
) -> u8 {
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    let mailer = match mailer::build_mailer(&cfg.mailer) {
        Ok(m) => m,
        Err(e) => return config_failed(&e),
    };
    let source = path.map_or("built-in defaults".to_string(), |p| p.display().to_string());
    println!("# effective kst configuration: {source}, KST_* environment overrides, defaults");
    println!("# secrets are shown as {}", crate::config::MASK);
    print!("{}", cfg.masked());
    if !probe {
        eprintln!("kst: configuration OK");
        return exit::OK;
    }
    logging::init(&cfg.log);
    let mut code = exit::OK;
    match stores::open_store(&cfg.store, stores::Reach::Now).await {
        Ok(store) => match store.check().await {
            Ok(()) => eprintln!("kst: store ({}) OK", store.name()),
            Err(e) => code = code.max(failed(&e)),
        },
        Err(e) => code = code.max(failed(&e)),
    }
    match mailer.check().await {
        Ok(()) => eprintln!("kst: mailer ({}) OK", mailer.name()),
        Err(e) => code = code.max(failed(&e)),
    }
    if code == exit::OK {
        eprintln!("kst: configuration OK");
    }
    code
}

/// Record metadata printed by `--json`.
#[derive(Debug, Serialize)]
struct KeyMeta<'a> {
    address: &'a Address,
    version: u64,
    fingerprint: &'a str,
    published_at: u64,
    published: String,
    publication_id: &'a str,
    revoked: bool,
    format: u32,
    key_bytes: usize,
}

impl<'a> KeyMeta<'a> {
    fn of(r: &'a KeyRecord) -> Self {
        KeyMeta {
            address: &r.address,
            version: r.version,
            fingerprint: r.fingerprint.as_str(),
            published_at: r.published_at,
            published: format_utc(r.published_at),
            publication_id: &r.publication_id,
            revoked: r.revoked,
            format: r.format,
            key_bytes: r.key.len(),
        }
    }
}

async fn keys(cfg: &Config, cmd: KeysCommand) -> u8 {
    let raw = match &cmd {
        KeysCommand::Get { address, .. }
        | KeysCommand::Delete { address }
        | KeysCommand::History { address, .. } => address.clone(),
    };
    let address = match cfg.policy() {
        Ok(p) => match p.address_policy.normalize(&raw) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("kst: {raw:?} is not an address: {e}");
                return exit::USAGE;
            }
        },
        Err(e) => return config_failed(&e),
    };
    let store: Arc<dyn KeyStore> = match stores::open_store(&cfg.store, stores::Reach::Now).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    match cmd {
        KeysCommand::Get { json, .. } => match store.get(&address).await {
            Ok(Some(r)) => {
                if json {
                    print_json(&KeyMeta::of(&r));
                } else {
                    print!("{}", kst_core::openpgp::armor_public_key(&r.key));
                }
                exit::OK
            }
            Ok(None) => {
                eprintln!("kst: no key is published for {address}");
                exit::NOT_FOUND
            }
            Err(e) => failed(&e),
        },
        KeysCommand::History { json, .. } => match store.history(&address).await {
            Ok(h) if h.is_empty() => {
                eprintln!("kst: nothing was ever published for {address} (or it was deleted)");
                exit::NOT_FOUND
            }
            Ok(h) => {
                if json {
                    print_json(&h.iter().map(KeyMeta::of).collect::<Vec<_>>());
                } else {
                    println!("{address}: {} version(s), oldest first", h.len());
                    for r in &h {
                        println!("{}", describe(r));
                    }
                }
                exit::OK
            }
            Err(e) => failed(&e),
        },
        KeysCommand::Delete { .. } => {
            // Read what is there first, to say what was removed.
            let history = match store.history(&address).await {
                Ok(h) => h,
                Err(e) => return failed(&e),
            };
            match store.delete(&address).await {
                Ok(true) => {
                    println!("deleted {address}: {} version(s) removed", history.len());
                    for r in &history {
                        println!("{}", describe(r));
                    }
                    exit::OK
                }
                Ok(false) => {
                    eprintln!("kst: nothing is stored for {address}; nothing deleted");
                    exit::NOT_FOUND
                }
                Err(e) => failed(&e),
            }
        }
    }
}

fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("kst: cannot render JSON: {e}"),
    }
}

/// One text line about a record.
fn describe(r: &KeyRecord) -> String {
    format!(
        "  v{:<3} {}  {}{}",
        r.version,
        format_utc(r.published_at),
        r.fingerprint,
        if r.revoked { "  (revoked)" } else { "" }
    )
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_520_178_429), "2018-03-04T15:47:09Z");
    }

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
