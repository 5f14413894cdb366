//! `kst config check`: prints the effective configuration, secrets masked; `--probe` also
//! opens the store, the web limits' own counter store (`[web.counters]`) and the mailer.

use std::path::Path;

use clap::Subcommand;

use crate::exit;
use crate::shared::config::{self, Config};
use crate::shared::stores::{self, Reach};
use crate::shared::{logging, report, wiring};

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

/// The longest `kst config check` waits for the system resolver to compare the Redis hosts
/// of `[store]` and `[web.counters]` ([`Config::web_counters_on_the_key_store`]).
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `[web.counters]` names a server of the Redis key store, the hosts resolved within
/// [`RESOLVE_TIMEOUT`] in all; past it (a resolver that does not answer: getaddrinfo waits
/// its timeouts per name and search domain, about 20 s a name by default, and a config
/// names up to a dozen hosts), the hosts are compared as written and a note says so. The
/// resolving runs on a thread of its own, not the runtime's blocking pool, whose threads the
/// exit waits for: one still waiting for the resolver is left behind.
async fn counters_on_the_key_store(cfg: &Config) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let resolving = cfg.clone();
    let spawned = std::thread::Builder::new()
        .name("kst-resolve".into())
        .spawn(move || {
            let _ = tx.send(resolving.web_counters_on_the_key_store());
        });
    if spawned.is_ok()
        && let Ok(Ok(shared)) = tokio::time::timeout(RESOLVE_TIMEOUT, rx).await
    {
        return shared;
    }
    eprintln!(
        "kst: note: the Redis hosts of store and web.counters were not resolved within {} s \
         (the system resolver did not answer): compared as written",
        RESOLVE_TIMEOUT.as_secs()
    );
    cfg.web_counters_on_the_key_store_with(&|_, _| Vec::new())
}

/// Runs `kst config ...` with the configuration at `path`; returns its exit code.
pub async fn run(path: Option<&Path>, cmd: ConfigCommand) -> u8 {
    match cmd {
        ConfigCommand::Check { probe } => check(path, Config::load(path), probe).await,
    }
}

async fn check(
    path: Option<&Path>,
    loaded: Result<Config, config::ConfigError>,
    probe: bool,
) -> u8 {
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => return report::config_error(&e),
    };
    // The DKIM key files: mode and contents (the records to publish are printed).
    let dkim = match wiring::load_dkim_keys(&cfg) {
        Ok(k) => k,
        Err(e) => return report::config_error(&e),
    };
    let mailer = match wiring::build_mailer(&cfg.mailer) {
        Ok(m) => m,
        Err(e) => return report::config_error(&e),
    };
    // The WKS submission key files: mode and contents (only fingerprints are printed).
    let submission_keys = match cfg.policy().and_then(|p| cfg.wks.load_keys(&p)) {
        Ok(k) => k,
        Err(e) => return report::config_error(&e),
    };
    let source = path.map_or("built-in defaults".to_string(), |p| p.display().to_string());
    println!("# effective kst configuration: {source}, KST_* environment overrides, defaults");
    println!("# secrets are shown as {}", config::MASK);
    print!("{}", cfg.masked());
    for (domain, key) in submission_keys.iter() {
        eprintln!(
            "kst: WKS submission key of keys@{domain}: {}",
            key.fingerprint()
        );
    }
    match &dkim {
        Some(keys) => {
            for r in keys.records() {
                eprintln!(
                    "kst: DKIM {} key of {}: publish {}",
                    r.algorithm.key_type(),
                    r.domain,
                    r.zone_line()
                );
            }
            if keys.selector() != "kst" && !keys.selector().starts_with("kst-") {
                eprintln!(
                    "kst: warning: dkim.selector {:?} neither is \"kst\" nor begins with \"kst-\": \
                     clients take a signature as kst's only with such a selector unless their \
                     dkim_selector says otherwise",
                    keys.selector()
                );
            }
        }
        None => eprintln!("kst: replies are not DKIM-signed ([dkim] names no key file)"),
    }
    let shared = counters_on_the_key_store(&cfg).await;
    if shared {
        eprintln!(
            "kst: warning: web.counters names a server of the Redis key store: the counters then \
             share its event loop and its log syncs, which a Redis of their own is meant to \
             avoid; run a second redis-server for them (deploy/redis-counters.conf)"
        );
    }
    if !probe {
        eprintln!("kst: configuration OK");
        return exit::OK;
    }
    logging::init(&cfg.log);
    let mut code = exit::OK;
    match stores::open_store(&cfg.store, Reach::Now).await {
        Ok(store) => match store.check().await {
            Ok(()) => eprintln!("kst: store ({}) OK", store.name()),
            Err(e) => code = code.max(report::error(&e)),
        },
        Err(e) => code = code.max(report::error(&e)),
    }
    if cfg.web.counters.own() {
        // The web limits' own counter store ([web.counters]): reachable, a primary (no
        // durability guard: soft state).
        let limiter: std::sync::Arc<dyn kst_core::RateLimiter> =
            std::sync::Arc::new(kst_core::MemoryRateLimiter::new());
        match stores::open_web_counters(&cfg.web.counters, limiter) {
            Ok(counters) => match counters.check().await {
                Some(Err(e)) => code = code.max(report::error(&e)),
                _ => eprintln!("kst: web counters ({}) OK", counters.name()),
            },
            Err(e) => code = code.max(report::error(&e)),
        }
    }
    match mailer.check().await {
        Ok(()) => eprintln!("kst: mailer ({}) OK", mailer.name()),
        Err(e) => code = code.max(report::error(&e)),
    }
    if code == exit::OK {
        eprintln!("kst: configuration OK");
    }
    code
}
