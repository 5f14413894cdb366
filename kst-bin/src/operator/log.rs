//! `kst log keygen`: makes a served domain's key-transparency keys (the head signing key and
//! the directory's VRF key, docs/TRANSPARENCY.md) and writes them to one file, mode 0600.
//! `kst log witness` and `kst log audit` (also the `client` feature): a third party follows a
//! domain's directory ([`super::witness`]); they read no kst configuration.
//! Only in builds with the `transparency` feature.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use kst_core::transparency::LogKeys;

use super::wks::write_private;
use crate::exit;
use crate::shared::config::Config;

/// `kst log ...`.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Make DOMAIN's transparency keys (Ed25519 head key, ECVRF key), write them to FILE
    /// (mode 0600) and print the public keys and the DNS TXT record that publishes them.
    ///
    /// An existing file is kept unless --force: a directory's VRF key cannot change for its
    /// life (a new one starts a new directory).
    /// Example: kst log keygen example.net --output /etc/kst/log-example.net.key
    Keygen {
        /// The served domain.
        domain: String,
        /// Write the secret keys to FILE.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// A witness of other domains' directories: `keygen`, `run` (see each --help).
    #[cfg(feature = "client")]
    #[command(subcommand)]
    Witness(super::witness::WitnessCommand),
    /// Follow a domain's directory from the head kept in --state (or from epoch 0) and check
    /// every head's signature and every append-only proof; exit 5 on a fork, evidence in
    /// --state. Example: kst log audit https://example.net --domain example.net --log-key HEX --state ./audit --once
    #[cfg(feature = "client")]
    Audit {
        /// Where the domain's key directory is served (`scheme://host[:port]`).
        url: String,
        /// The domain, its head key, the state directory and the schedule.
        #[command(flatten)]
        follow: super::witness::FollowArgs,
    },
}

/// Runs `kst log ...` with the configuration at `config`; returns its exit code.
pub async fn run(config: Option<&Path>, cmd: LogCommand) -> u8 {
    // A witness or an auditor is a third party: no kst configuration.
    #[cfg(feature = "client")]
    let cmd = match cmd {
        LogCommand::Witness(w) => return super::witness::run_witness(w).await,
        LogCommand::Audit { url, follow } => return super::witness::run_audit(url, follow).await,
        cmd => cmd,
    };
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match cmd {
        LogCommand::Keygen {
            domain,
            output,
            force,
        } => keygen(&cfg, &domain, &output, force),
        #[cfg(feature = "client")]
        LogCommand::Witness(_) | LogCommand::Audit { .. } => exit::SOFTWARE,
    }
}

fn keygen(cfg: &Config, domain: &str, output: &Path, force: bool) -> u8 {
    let domain = match super::served_domain(cfg, domain) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !force && output.exists() {
        eprintln!(
            "kst: {} exists; keeping it (--force replaces it, and starts a new directory)",
            output.display()
        );
        return exit::CANTCREAT;
    }
    let keys = LogKeys::generate(&domain);
    let vrf = match keys.vrf.public_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kst: {e}");
            return exit::SOFTWARE;
        }
    };
    if let Err(e) = write_private(output, keys.to_file().as_bytes()) {
        eprintln!("kst: cannot write {}: {e}", output.display());
        return exit::CANTCREAT;
    }
    let record = kst_core::transparency::keys::public_record(&keys.head.public_key(), &vrf);
    let head = hex::encode(keys.head.public_key());
    let vrf = hex::encode(vrf);
    eprintln!(
        "kst: wrote the transparency keys of {domain} to {}",
        output.display()
    );
    println!("head-key {head}");
    println!("vrf-key {vrf}");
    // The same record is served in the WKD policy directory by `kst serve` on [web]
    // (/.well-known/openpgpkey/[<domain>/]kst-log): publishing it in DNS is optional.
    println!("_kst-log.{domain}. IN TXT \"{record}\"");
    exit::OK
}
