//! `kst client`: the mail client's side of KST, as a command. It publishes the user's key and
//! retrieves other people's keys over real mail: SMTP submission (or the recipient's MX with
//! `--direct`) out, IMAP or a Maildir in. The protocol logic (building requests, verifying
//! replies) is `kst_core::client`; this module is the network and the command line.

// An `Outcome` is what the command reports, once; boxing it would buy nothing.
#[allow(clippy::result_large_err)]
pub mod commands;
pub mod config;
pub mod dane;
pub mod delete;
pub mod discovery;
pub mod dkim;
pub mod dnssec;
pub mod fetch;
pub mod http_get;
#[cfg(feature = "transparency")]
pub mod log_memory;
#[cfg(feature = "transparency")]
pub mod log_race;
pub mod matching;
pub mod mta_sts;
pub mod output;
pub mod refresh;
pub mod state;
pub mod status;
pub mod submit;
pub mod terminal;
pub mod tls;
// As in `commands`: an `Outcome` is what the command reports, once.
#[allow(clippy::result_large_err)]
#[cfg(feature = "transparency")]
pub mod transparency;

use std::path::PathBuf;

use clap::{Args, Subcommand};

pub use commands::run;

/// Exit codes of `kst client` (documented in `kst client --help`): the sysexits of every
/// command ([`crate::exit`]: 0 done, 1 no key published, 64 bad argument, 66 no key file,
/// 69 a server unusable, 70 bug, 75 try again later, 78 client configuration), and the client's
/// own.
pub mod exit {
    pub use crate::exit::{CONFIG, NOINPUT, NOT_FOUND, OK, SOFTWARE, TEMPFAIL, UNAVAILABLE, USAGE};
    /// The KST refused the request (the reason is printed).
    pub const REFUSED: u8 = 3;
    /// The provider runs no KST: the request bounced.
    pub const NO_KST: u8 = 4;
    /// A reply failed verification (forged or altered): possible attack. Nothing was used.
    pub const ATTACK: u8 = 5;
    /// `status`: what the KST serves for your address differs from your key.
    pub const MISMATCH: u8 = 6;
    /// The login or password was refused.
    pub const NOPERM: u8 = 77;
}

/// Help text after `kst client --help`.
pub const CLIENT_AFTER_HELP: &str = "\
Settings come from ~/.config/kst/client.toml (or --client-config FILE), overridden by flags.
Servers: --submission HOST:PORT means STARTTLS, smtps://HOST:PORT implicit TLS; --imap likewise
with imaps://. Without them the client looks up RFC 6186 SRV records of the account's domain
(_submissions._tcp, _submission._tcp, _imaps._tcp, _imap._tcp). The password comes from
$KST_PASSWORD or --password-command CMD (first line of its output). See docs/CLIENT.md.

Examples:
  KST_PASSWORD=... kst client --account alice@example.net publish --key alice.asc
  kst client --account alice@example.net retrieve bob@acme.net --import
  kst client --account alice@example.net retrieve bob@acme.net --direct
  kst client pending
  kst client --account alice@example.net check --wait
  kst client --account alice@example.net status --gpg-key alice@example.net
  kst client --account alice@example.net delete
  kst client --account alice@example.net refresh --max-age-days 30

Exit codes: 0 done (published / key verified), 1 no key published for the address,
3 refused by the KST, 4 the provider runs no KST (bounce), 5 a reply failed verification
(possible attack; nothing used), 6 status: the KST serves something else than your key,
64 bad argument, 66 key not readable, 69 server unusable
(TLS, refused relay), 75 try again later (unreachable, or no reply in time: the request stays
pending), 77 login refused, 78 configuration error. --json prints one JSON object (an array
for pending and check) with \"outcome\" and \"exit\".";

/// `kst client ...`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Settings shared by the client commands.
    #[command(flatten)]
    pub opts: ClientOpts,
    /// What to do.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// Options of every client command (they may also follow the subcommand).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientOpts {
    /// Client configuration file [default: ~/.config/kst/client.toml].
    #[arg(long, global = true, env = "KST_CLIENT_CONFIG", value_name = "FILE")]
    pub client_config: Option<PathBuf>,
    /// Your own address (replies come to its mailbox).
    #[arg(long, global = true, env = "KST_ACCOUNT", value_name = "ADDRESS")]
    pub account: Option<String>,
    /// Submission server: HOST:PORT (STARTTLS) or smtps://HOST:PORT (implicit TLS).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub submission: Option<String>,
    /// Hand requests to this sendmail-compatible command instead of SMTP submission
    /// (run as `CMD -oi -f ACCOUNT -- keys@DOMAIN`, message on stdin).
    #[arg(long, global = true, value_name = "CMD", conflicts_with = "submission")]
    pub sendmail: Option<String>,
    /// IMAP server: HOST:PORT (STARTTLS) or imaps://HOST:PORT (implicit TLS).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub imap: Option<String>,
    /// Read replies from this Maildir instead of IMAP.
    #[arg(long, global = true, value_name = "PATH")]
    pub maildir: Option<PathBuf>,
    /// Login for submission and IMAP [default: the account].
    #[arg(long, global = true, value_name = "LOGIN")]
    pub user: Option<String>,
    /// Command printing the password (first line), e.g. "pass show mail/alice". KST_PASSWORD wins.
    #[arg(long, global = true, value_name = "CMD")]
    pub password_command: Option<String>,
    /// Also trust the CA certificates in this PEM file.
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// DNS server for every look-up: IP:PORT, or tls://IP:853#NAME for DNS over TLS (the
    /// certificate must be valid for NAME; a private CA with --ca-file). Default: resolv.conf.
    #[arg(long, global = true, value_name = "IP:PORT")]
    pub resolver: Option<String>,
    /// DNSSEC trust anchor: a file of root DNSKEY records [default: the IANA root's keys].
    #[arg(long, global = true, value_name = "FILE")]
    pub dns_anchor: Option<PathBuf>,
    /// Refuse DNS answers from unsigned zones (DNSSEC "insecure"); bogus answers are always
    /// refused, as an attack.
    #[arg(long, global = true, conflicts_with = "no_dnssec")]
    pub require_dnssec: bool,
    /// Do not validate DNS answers (a local test resolver serving unsigned zones only: forged
    /// answers then go unnoticed).
    #[arg(long, global = true)]
    pub no_dnssec: bool,
    /// Seconds to wait for the reply [default: 120; `check`: 0 = look once].
    #[arg(long, global = true, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Pending-request file [default: ~/.local/state/kst/pending.json].
    #[arg(long, global = true, env = "KST_CLIENT_STATE", value_name = "FILE")]
    pub state_file: Option<PathBuf>,
    /// Allow servers that offer no TLS (local tests only: passwords and K_auth travel in clear).
    #[arg(long, global = true)]
    pub insecure_plaintext: bool,
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Accept a reply only with a valid DKIM signature of the KST's domain under kst's
    /// selector (exit 5 otherwise). Also `require_dkim = true` in client.toml.
    #[arg(long, global = true)]
    pub require_dkim: bool,
    /// kst's DKIM selector: a signature counts when its selector is this one or begins with it
    /// and `-` [default: kst].
    #[arg(long, global = true, value_name = "SELECTOR")]
    pub dkim_selector: Option<String>,
}

/// The client commands.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Publish your public key at your provider's KST and wait for the confirmation.
    ///
    /// The key goes to keys@<your domain> over authenticated submission with a fresh K_auth; the
    /// confirmation's HMAC and fingerprint are checked before "published" is said.
    Publish {
        /// The armored public key to publish.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "gpg_key",
            required_unless_present = "gpg_key"
        )]
        key: Option<PathBuf>,
        /// Export this key (fingerprint or User ID) from your gpg keyring instead.
        #[arg(long, value_name = "FINGERPRINT")]
        gpg_key: Option<String>,
        /// Send, record the request as pending, and exit (`kst client check` reads the reply).
        #[arg(long)]
        no_wait: bool,
        /// Protocol version 3: the confirmation carries the key directory's proof (feature
        /// `transparency`).
        #[cfg(feature = "transparency")]
        #[command(flatten)]
        proof: transparency::ReplyProofArgs,
    },
    /// Ask the KST of ADDRESS's domain for its key; print it (or import it) once verified.
    Retrieve {
        /// The address whose key you want.
        address: String,
        /// Import the verified key into your gpg keyring instead of printing it.
        #[arg(long)]
        import: bool,
        /// Send straight to the domain's MX (port 25, STARTTLS) instead of through your own
        /// submission server.
        #[arg(long)]
        direct: bool,
        /// With --direct: this server instead of the MX look-up (HOST:PORT, port 25 by default).
        #[arg(long, value_name = "HOST:PORT", requires = "direct")]
        mx: Option<String>,
        /// With --direct: the port to use on the MX hosts found in DNS.
        #[arg(long, value_name = "PORT", default_value_t = 25, requires = "direct")]
        mx_port: u16,
        /// With --direct: send even when the MX offers no STARTTLS (K_auth then travels in
        /// clear). A failed DANE or MTA-STS check still stops the request.
        #[arg(long, requires = "direct")]
        allow_plaintext: bool,
        /// Send, record the request as pending, and exit (`kst client check` reads the reply).
        #[arg(long)]
        no_wait: bool,
        /// The key directory check (feature `transparency`).
        #[cfg(feature = "transparency")]
        #[command(flatten)]
        log: transparency::LogCheckArgs,
    },
    /// Delete your key and its history at your provider's KST (authenticated like a
    /// publication) and verify the KST's answer.
    Delete {
        /// Send, record the request as pending, and exit (`kst client check` reads the reply).
        #[arg(long)]
        no_wait: bool,
        /// Protocol version 3: the confirmation carries the key directory's proof (feature
        /// `transparency`).
        #[cfg(feature = "transparency")]
        #[command(flatten)]
        proof: transparency::ReplyProofArgs,
    },
    /// Compare what your provider's KST serves for your address with your own key
    /// (fingerprint, expiry, revocation, subkeys); exits 6 on a difference, for cron.
    Status {
        /// Your armored public key [default: `gpg --export` of your address].
        #[arg(long, value_name = "FILE", conflicts_with = "gpg_key")]
        key: Option<PathBuf>,
        /// Export this key (fingerprint or User ID) from your gpg keyring.
        #[arg(long, value_name = "FINGERPRINT")]
        gpg_key: Option<String>,
        /// With --check-transparency: also ask the key directory for every version of your
        /// address (its history proof) and report the ones you did not publish (exit 6).
        #[cfg(feature = "transparency")]
        #[command(flatten)]
        log: transparency::LogCheckArgs,
    },
    /// Pin DOMAIN's key directory keys (head key and VRF key): from --log-key/--vrf-key, or
    /// from its `_kst-log.DOMAIN` TXT record now, else from its WKD policy directory's
    /// `kst-log` file. Needed after the domain really changed
    /// them (the check then exits 5 until you pin again). Forgets the remembered head (a
    /// fresh start: after a rollback you accept, or a head too far back for one proof).
    #[cfg(feature = "transparency")]
    LogPin {
        /// The served domain.
        domain: String,
        /// The head key, 64 hex digits (`kst log keygen` prints it).
        #[arg(long, value_name = "HEX")]
        log_key: Option<String>,
        /// The VRF key, 64 hex digits [default: taken from the first verified head].
        #[arg(long, value_name = "HEX", requires = "log_key")]
        vrf_key: Option<String>,
        /// Where the domain's key directory is served: without --log-key and without a DNS
        /// record (or with one from a zone without DNSSEC, which must match it), the keys
        /// are read from its WKD policy directory
        /// (`URL/.well-known/openpgpkey/<domain>/kst-log`). [default: the domain's WKD
        /// host https://openpgpkey.<domain>, or https://<domain> when that name has no
        /// address]
        #[arg(long, value_name = "URL")]
        log_url: Option<String>,
    },
    /// Retrieve again the keys imported through kst (`retrieve --import`) that expire soon or
    /// were last fetched long ago, so that revocations and extensions reach you; due dates are
    /// spread over time per address, and a run fetches at most --batch keys.
    Refresh {
        /// Refresh a key last fetched more than this many days ago (0: every key).
        #[arg(long, value_name = "DAYS", default_value_t = refresh::DEFAULT_MAX_AGE_DAYS)]
        max_age_days: u64,
        /// Refresh a key that expires within this many days.
        #[arg(long, value_name = "DAYS", default_value_t = refresh::DEFAULT_EXPIRY_DAYS)]
        expiry_days: u64,
        /// Fetch at most this many keys in one run (the rest stay due for the next).
        #[arg(long, value_name = "N", default_value_t = refresh::DEFAULT_BATCH)]
        batch: usize,
        /// Only list the keys that are due.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the requests sent and not yet answered (all accounts).
    Pending,
    /// Read the replies to pending requests from the mailbox and finish them.
    Check {
        /// Keep waiting (up to --timeout, default 120 s) until every request is answered.
        #[arg(long)]
        wait: bool,
        /// Import keys retrieved now into gpg (as `retrieve --import` would have).
        #[arg(long)]
        import: bool,
    },
}
