//! `kst dkim keygen`: makes a served domain's DKIM key(s) for signing replies (mode 0600) and
//! prints the DNS TXT record(s) to publish; `kst dkim records` prints the records of the keys
//! configured now.

use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};

use crate::exit;
use crate::server::mailer::DkimKeys;
use crate::server::mailer::dkim::{DnsRecord, generate, record_value};
use crate::shared::config::dkim::check_selector;
use crate::shared::config::{Config, DkimAlgorithm};
use crate::shared::report;

pub(crate) use super::wks::write_private;

/// Which keys `kst dkim keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeygenAlgorithm {
    /// An Ed25519 key (ed25519-sha256, RFC 8463).
    Ed25519,
    /// A 2048-bit RSA key (rsa-sha256).
    Rsa,
    /// Both: replies then carry two signatures, and verifiers that know no Ed25519 use the RSA one.
    Both,
}

/// `kst dkim ...`.
#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Make the DKIM key(s) kst signs DOMAIN's replies with, write each (mode 0600) to the
    /// file `[dkim]` names for it (`{domain}` replaced), and print the DNS TXT record(s).
    ///
    /// An existing file is kept unless --force. Publish the record before kst signs with the
    /// key; for a rotation use a new selector (see docs/OPERATIONS.md).
    /// Example: kst dkim keygen example.net --algorithm both --config /etc/kst/kst.toml
    Keygen {
        /// The served domain.
        domain: String,
        /// Which key(s) to make [default: the kinds `[dkim]` names a file for, else ed25519].
        #[arg(long, value_enum)]
        algorithm: Option<KeygenAlgorithm>,
        /// Write the key to FILE instead (one algorithm only).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// The selector prefix for the printed record [default: `[dkim] selector`]; the
        /// record is published at `<selector>-ed25519` or `<selector>-rsa`.
        #[arg(long)]
        selector: Option<String>,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Print the DNS TXT records of the keys `[dkim]` names now (what to publish or compare).
    Records,
}

/// Runs `kst dkim ...` with the configuration at `config`; returns its exit code.
pub async fn run(config: Option<&Path>, cmd: DkimCommand) -> u8 {
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match cmd {
        DkimCommand::Keygen {
            domain,
            algorithm,
            output,
            selector,
            force,
        } => keygen(&cfg, &domain, algorithm, output, selector, force),
        DkimCommand::Records => records(&cfg),
    }
}

fn records(cfg: &Config) -> u8 {
    let policy = match cfg.policy() {
        Ok(p) => p,
        Err(e) => return report::config_error(&e),
    };
    match DkimKeys::load(&cfg.dkim, &policy) {
        Ok(Some(keys)) => {
            for r in keys.records() {
                println!("{}", r.zone_line());
            }
            exit::OK
        }
        Ok(None) => {
            eprintln!("kst: [dkim] names no key file: replies are not signed");
            exit::CONFIG
        }
        Err(e) => {
            eprintln!("kst: {e}");
            exit::CONFIG
        }
    }
}

fn keygen(
    cfg: &Config,
    domain: &str,
    algorithm: Option<KeygenAlgorithm>,
    output: Option<PathBuf>,
    selector: Option<String>,
    force: bool,
) -> u8 {
    let domain = match super::served_domain(cfg, domain) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut dkim = cfg.dkim.clone();
    if let Some(s) = selector {
        dkim.selector = s;
    }
    if let Err(e) = check_selector(&dkim.selector) {
        eprintln!("kst: --selector: {e}");
        return exit::USAGE;
    }
    let configured: Vec<DkimAlgorithm> = [DkimAlgorithm::Ed25519, DkimAlgorithm::Rsa]
        .into_iter()
        .filter(|a| cfg.dkim.key_file(*a, &domain).is_some())
        .collect();
    let algorithms = match algorithm {
        Some(KeygenAlgorithm::Ed25519) => vec![DkimAlgorithm::Ed25519],
        Some(KeygenAlgorithm::Rsa) => vec![DkimAlgorithm::Rsa],
        Some(KeygenAlgorithm::Both) => vec![DkimAlgorithm::Ed25519, DkimAlgorithm::Rsa],
        None if configured.is_empty() => vec![DkimAlgorithm::Ed25519],
        None => configured,
    };
    if output.is_some() && algorithms.len() != 1 {
        eprintln!("kst: --output writes one key: give --algorithm ed25519 or rsa with it");
        return exit::USAGE;
    }
    // Every file first, so that nothing is written when one cannot be.
    let mut plan = Vec::new();
    for alg in algorithms {
        let Some(path) = output.clone().or_else(|| cfg.dkim.key_file(alg, &domain)) else {
            eprintln!(
                "kst: no {} key file for {domain}: name one with --output FILE, or set {} = \
                 \"/etc/kst/dkim/{{domain}}.{}.pem\" in [dkim]",
                alg.key_type(),
                alg.config_key(),
                alg.key_type()
            );
            return exit::USAGE;
        };
        if path.exists() && !force {
            eprintln!(
                "kst: {} exists; kept. Use --force to replace it (only after its selector's \
                 record is replaced too: replies in transit are checked against DNS)",
                path.display()
            );
            return exit::CANTCREAT;
        }
        plan.push((alg, path));
    }
    for (alg, path) in plan {
        let (pem, public) = match generate(alg) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("kst: {e}");
                return exit::SOFTWARE;
            }
        };
        if let Err(e) = write_private(&path, pem.as_bytes()) {
            eprintln!("kst: cannot write {}: {e}", path.display());
            return exit::CANTCREAT;
        }
        let record = DnsRecord {
            domain: domain.clone(),
            selector: dkim.selector_for(alg),
            algorithm: alg,
            value: record_value(alg, &public),
        };
        println!("{}", record.zone_line());
        eprintln!(
            "kst: wrote the {} DKIM key of {domain} to {} (mode 0600); publish the TXT record \
             above before kst signs with it",
            alg.key_type(),
            path.display()
        );
    }
    exit::OK
}
