//! `kst wks keygen`: makes a domain's WKS submission key (mode 0600) and publishes its public
//! part, so that `gpg-wks-client` finds it by WKD and encrypts submissions to it.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use kst_core::validate::KeyPolicy;
use kst_core::wks::SubmissionKey;
use zeroize::Zeroizing;

use crate::exit;
use crate::keygen;
use crate::shared::config::{Config, check_key_file_mode};
use crate::shared::report;
use crate::shared::stores::{self, Reach};

/// `kst wks ...`.
#[derive(Debug, Subcommand)]
pub enum WksCommand {
    /// Make the WKS submission key of keys@DOMAIN, write it (mode 0600) and publish its public
    /// part in the store, where the WKD serves it. Prints the fingerprint.
    ///
    /// The file is the one `[[wks.keys]]` names for DOMAIN, or --output. An existing file is
    /// kept unless --force: submissions already encrypted to the old key cannot be read after.
    /// Example: kst wks keygen example.net --config /etc/kst/kst.toml
    Keygen {
        /// The served domain.
        domain: String,
        /// Write the secret key to FILE (default: `[[wks.keys]]` of DOMAIN).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `kst wks ...` with the configuration at `config`; returns its exit code.
pub async fn run(config: Option<&Path>, cmd: WksCommand) -> u8 {
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    match cmd {
        WksCommand::Keygen {
            domain,
            output,
            force,
        } => keygen_command(&cfg, &domain, output, force).await,
    }
}

async fn keygen_command(cfg: &Config, domain: &str, output: Option<PathBuf>, force: bool) -> u8 {
    let policy = match cfg.policy() {
        Ok(p) => p,
        Err(e) => return report::config_error(&e),
    };
    let service = match policy
        .address_policy
        .normalize_domain(domain)
        .ok()
        .and_then(|d| policy.service_address(&d))
    {
        Some(s) => s,
        None => {
            eprintln!("kst: {domain:?} is not a domain in kst.domains");
            return exit::USAGE;
        }
    };
    let Some(path) = output.or_else(|| {
        cfg.wks
            .file_for(&policy, service.domain())
            .map(Path::to_path_buf)
    }) else {
        eprintln!(
            "kst: no key file for {}: name one with --output FILE, or add [[wks.keys]] with \
             domain = \"{}\" and file = \"...\" to the configuration",
            service.domain(),
            service.domain()
        );
        return exit::USAGE;
    };
    if path.exists() && !force {
        eprintln!(
            "kst: {} exists; kept. Use --force to replace it (submissions encrypted to the old \
             key can then no longer be read)",
            path.display()
        );
        return exit::CANTCREAT;
    }
    let made = keygen::ed25519_cv25519(&format!("Key Submission <{service}>")).and_then(|k| {
        k.to_armored_string(Default::default())
            .map(Zeroizing::new)
            .map_err(|e| e.to_string())
    });
    let armored = match made {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kst: cannot generate an OpenPGP key: {e}");
            return exit::SOFTWARE;
        }
    };
    let key = match SubmissionKey::from_armored(&armored) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kst: the generated key is not usable: {e}");
            return exit::SOFTWARE;
        }
    };
    let key_policy = KeyPolicy {
        max_key_bytes: policy.max_key_bytes,
        address_policy: policy.address_policy.clone(),
        ..KeyPolicy::default()
    };
    let publication = match key.publication(&service, &key_policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kst: {e}");
            return exit::SOFTWARE;
        }
    };
    if let Err(e) = write_private(&path, armored.as_bytes()) {
        eprintln!("kst: cannot write {}: {e}", path.display());
        return exit::CANTCREAT;
    }
    let store = match stores::open_store(&cfg.store, Reach::Now).await {
        Ok(s) => s,
        Err(e) => return report::error(&e),
    };
    if let Err(e) = store.publish(publication).await {
        eprintln!(
            "kst: the key is in {}, but its public part could not be published: {e}; run the \
             command again with --force once the store is back",
            path.display()
        );
        return report::error(&e);
    }
    println!("{}", key.fingerprint());
    eprintln!(
        "kst: wrote the submission key of {service} to {} (mode 0600) and published its public \
         key (WKD: {service}).",
        path.display()
    );
    if cfg.wks.file_for(&policy, service.domain()) != Some(path.as_path()) {
        eprintln!(
            "kst: add it to the configuration:\n[[wks.keys]]\ndomain = \"{}\"\nfile = \"{}\"",
            service.domain(),
            path.display()
        );
    }
    exit::OK
}

/// Writes `bytes` to `path` with mode 0600, atomically: a new file beside it, synced, then
/// renamed over `path`. The mode is set when the file is created, so the secret is never
/// readable by others, not even for a moment.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        check_key_file_mode(path).map_err(std::io::Error::other)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
