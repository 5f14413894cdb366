//! The one place that turns a configuration into working parts: the mailer, and the KST with
//! its store, rate limiter, mailer and envelope sender.

use std::sync::Arc;

use kst_core::Mailer;
use kst_core::service::Kst;

use crate::server::mailer::{DkimKeys, DkimMailer, SmtpMailer, SpoolMailer};
use crate::shared::config::{Config, ConfigError, MailerConfig, MailerKind};
use crate::shared::stores::{self, Reach};

/// Builds the mailer `[mailer]` describes. Nothing is contacted or created yet: the spool
/// directory appears with the first reply, the relay is dialled per reply (see
/// [`Mailer::check`] for a probe).
pub fn build_mailer(cfg: &MailerConfig) -> Result<Arc<dyn Mailer>, ConfigError> {
    // Validate the shared key even for the spool, so a typo never waits for the first reply.
    cfg.envelope_from()?;
    Ok(match cfg.kind {
        MailerKind::Spool => Arc::new(SpoolMailer::new(&cfg.path)),
        MailerKind::Smtp => Arc::new(SmtpMailer::new(cfg)?),
    })
}

/// Builds the mailer replies leave through: `[mailer]`'s, behind the DKIM signer when `[dkim]`
/// names keys (read here: a missing or too open key file is a configuration error).
pub fn build_reply_mailer(config: &Config) -> Result<Arc<dyn Mailer>, ConfigError> {
    let mailer = build_mailer(&config.mailer)?;
    Ok(match load_dkim_keys(config)? {
        Some(keys) => Arc::new(DkimMailer::new(mailer, Arc::new(keys))),
        None => mailer,
    })
}

/// The DKIM keys `[dkim]` names, read and checked; `None` when replies are not signed.
pub fn load_dkim_keys(config: &Config) -> Result<Option<DkimKeys>, ConfigError> {
    DkimKeys::load(&config.dkim, &config.policy()?).map_err(ConfigError::Other)
}

/// Builds the KST a configuration describes (store opened, mailer built); a store that cannot
/// be reached is a temporary error (`kst deliver`).
pub async fn build_kst(config: &Config) -> Result<Kst, kst_core::Error> {
    build_kst_with(config, Reach::Now).await
}

/// [`build_kst`], choosing what happens when a network store cannot be reached (`kst serve`
/// starts anyway: [`Reach::Lazily`]).
pub async fn build_kst_with(config: &Config, reach: Reach) -> Result<Kst, kst_core::Error> {
    build_kst_and_logs(config, reach).await.map(|(kst, _)| kst)
}

/// The key directory's logs a KST records in (feature `transparency`; empty when
/// `[transparency]` is off).
#[cfg(feature = "transparency")]
pub type Logs = Vec<Arc<kst_core::transparency::DomainLog>>;
/// Nothing: built without the feature `transparency`.
#[cfg(not(feature = "transparency"))]
pub type Logs = ();

/// [`build_kst_with`], and the logs the KST records in: `kst serve` serves the same ones
/// over HTTP, so each domain has one directory (one thread, one queue) per process.
pub async fn build_kst_and_logs(
    config: &Config,
    reach: Reach,
) -> Result<(Kst, Logs), kst_core::Error> {
    let policy = config.policy()?;
    let (store, limiter) = stores::open_store_and_limiter(&config.store, reach).await?;
    // Key transparency: every publication and deletion is also recorded in the directory.
    // Version 3 replies carry the same directory's answers.
    #[cfg(feature = "transparency")]
    let logs = crate::shared::transparency::open_logs(config).await?;
    #[cfg(feature = "transparency")]
    let (store, log_answers) = crate::shared::transparency::wrap_store_in(
        store,
        logs.clone(),
        crate::shared::transparency::witness_keys(config)?,
        crate::shared::transparency::unsynced_publications(config),
    );
    #[cfg(not(feature = "transparency"))]
    let logs = ();
    let mailer = build_reply_mailer(config)?;
    // The one reading of `[mailer] envelope_from`, the same `kst config check` validates.
    let envelope_from = config.mailer.envelope_from()?;
    // Read at start (per message in pipe mode): a key file that became unreadable or too open
    // is a configuration error, never a silent refusal of every encrypted submission.
    let submission_keys = config.wks.load_keys(&policy)?;
    let kst = Kst::new(policy, store, mailer)
        .with_rate_limiter(limiter)
        .with_envelope_from(envelope_from)
        .with_submission_keys(Arc::new(submission_keys))
        .with_reminders(config.reminders.settings());
    #[cfg(feature = "transparency")]
    let kst = match log_answers {
        Some(answers) => kst.with_log_answers(answers),
        None => kst,
    };
    Ok((kst, logs))
}

/// Makes sure the store holds the public part of every configured WKS submission key for its
/// `keys@<domain>` (the WKD serves it from there, and `gpg-wks-client` encrypts to it), also
/// when the operator made the key with gpg instead of `kst wks keygen`. Publishing the key that
/// is already current changes nothing. A store that is down only delays it to the next start:
/// logged, never fatal.
pub async fn publish_submission_keys(kst: &Kst) {
    let policy = kst.policy();
    let key_policy = kst_core::validate::KeyPolicy {
        max_key_bytes: policy.max_key_bytes,
        address_policy: policy.address_policy.clone(),
        ..kst_core::validate::KeyPolicy::default()
    };
    for (domain, key) in kst.submission_keys().iter() {
        let Some(service) = policy.service_address(domain) else {
            continue;
        };
        let outcome = match key.publication(&service, &key_policy) {
            Ok(p) => kst.store().publish(p).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(o) => tracing::info!(
                address = %service,
                fingerprint = key.fingerprint(),
                new = matches!(o, kst_core::PublishOutcome::Published(_)),
                "WKS submission key published"
            ),
            Err(e) => tracing::warn!(
                address = %service,
                fingerprint = key.fingerprint(),
                error = %e,
                "WKS submission key not published; gpg-wks-client cannot find it by WKD until it is"
            ),
        }
    }
}
