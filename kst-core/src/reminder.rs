//! Expiry reminders: kst mails the owner of a published key before it expires (by default 14
//! and 3 days before), saying how to extend it and publish it again.
//!
//! [`send_due`] walks the current keys of the store once, in the store's own order
//! ([`crate::KeyStore::list_page`]). For a key that is not revoked and
//! expires, the due threshold is the smallest `days_before` whose window has begun (so a key
//! first seen two days before it expires gets the 3-day reminder only). Each (key, expiry,
//! threshold) is mailed at most once across a pool: the instance first records a claim in the
//! store ([`crate::KeyStore::claim_reminder`], atomic) and only the one whose claim is new hands
//! the reminder to the (durable) mailer. A claimed reminder counts against the owner's
//! per-account rate limit; over the limit it is dropped (logged), never sent late. An extended
//! key has another expiry, so its reminders are claimed afresh.

use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address as MbAddress;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;

use crate::address::Address;
use crate::certificate::Certificate;
use crate::error::Result;
use crate::fingerprint::Fingerprint;
use crate::mailer::{Delivery, OutgoingMail};
use crate::ratelimit::{self, LimitKind};
use crate::service::Kst;

const DAY: u64 = 86_400;

/// Thresholds by default: days before the expiry.
pub const DEFAULT_DAYS_BEFORE: [u64; 2] = [14, 3];

/// Addresses read per page while walking the store.
const PAGE: usize = 500;

/// When reminders go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderSettings {
    /// Send reminders at all.
    pub enabled: bool,
    /// Days before the expiry at which a reminder is due (each at most once per key and expiry).
    pub days_before: Vec<u64>,
    /// Seconds between two runs of a daemon (`kst serve`).
    pub interval_secs: u64,
}

impl Default for ReminderSettings {
    fn default() -> Self {
        ReminderSettings {
            enabled: true,
            days_before: DEFAULT_DAYS_BEFORE.to_vec(),
            interval_secs: 3600,
        }
    }
}

/// One reminder: the key of `address` with `fingerprint`, expiring at `expires_at`, at the
/// threshold `days_before`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReminderClaim {
    /// The owner's address.
    pub address: Address,
    /// The key's primary fingerprint.
    pub fingerprint: Fingerprint,
    /// When the key expires (seconds since the Unix epoch).
    pub expires_at: u64,
    /// The threshold, in days before the expiry.
    pub days_before: u64,
}

impl ReminderClaim {
    /// A stable name of the claim for a store: `<fingerprint>-<expires_at>-<days_before>` (hex
    /// digits, decimal digits and dashes only). The address is not part of it: a key published
    /// for two addresses is reminded once per address by [`send_due`], claimed per address
    /// with [`ReminderClaim::address`] in the backend's key.
    pub fn id(&self) -> String {
        format!(
            "{}-{}-{}",
            self.fingerprint.as_str(),
            self.expires_at,
            self.days_before
        )
    }
}

/// A reminder this instance claimed that the relay refused for good ([`Delivery::Refused`]):
/// not sent, and not tried again (its claim stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedReminder {
    /// The reminder.
    pub claim: ReminderClaim,
    /// The relay's reply code (5xx).
    pub code: u16,
    /// What the relay answered, for the operator.
    pub text: String,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReminderRun {
    /// Reminders this instance claimed and the mailer made durable (spooled, or accepted by
    /// the relay).
    pub sent: Vec<ReminderClaim>,
    /// Reminders this instance claimed that the relay refused for good (an owner address the
    /// relay does not know, say): not sent.
    pub refused: Vec<RefusedReminder>,
    /// Due reminders another run (or instance) had claimed already.
    pub already_claimed: usize,
    /// Due reminders claimed but dropped because the owner's rate limit was exhausted.
    pub rate_limited: usize,
}

/// The threshold due at `now` for a key expiring at `expires_at`: the smallest of
/// `days_before` whose window (from `expires_at - days` on) has begun; `None` when none has,
/// or when the key has expired.
pub fn due_threshold(expires_at: u64, days_before: &[u64], now: u64) -> Option<u64> {
    if now >= expires_at {
        return None;
    }
    days_before
        .iter()
        .copied()
        .filter(|d| now.saturating_add(d.saturating_mul(DAY)) >= expires_at)
        .min()
}

/// The reminder mail from `service` (`keys@` of the owner's domain) for `claim` at `now`.
pub fn build(service: &Address, claim: &ReminderClaim, now: u64) -> (String, Vec<u8>) {
    let message_id = crate::reply::new_message_id(service.domain());
    let days = claim.expires_at.saturating_sub(now).div_ceil(DAY);
    let fpr = claim.fingerprint.as_str();
    let account = claim.address.as_str();
    let date = crate::time::format_utc(claim.expires_at);
    let body = format!(
        "The OpenPGP key {fpr}\r\n\
         published for {account} at {service}\r\n\
         expires on {date} (in {days} days). After that, nobody can encrypt to it.\r\n\
         \r\n\
         To extend it and publish it again:\r\n\
         \r\n\
         \x20 gpg --quick-set-expire {fpr} 1y\r\n\
         \x20 gpg --quick-set-expire {fpr} 1y '*'\r\n\
         \x20 kst client --account {account} publish --gpg-key {fpr}\r\n\
         \r\n\
         (the second command extends the subkeys; a mail client with KST support publishes\r\n\
         the key by itself). If you no longer use this key, publish its revocation, or delete\r\n\
         it: kst client --account {account} delete\r\n",
    );
    let message = MessageBuilder::new()
        .from(MbAddress::new_address(
            Some("Key Storage Service"),
            service.as_str().to_string(),
        ))
        .to(MbAddress::new_address(None::<&str>, account.to_string()))
        .subject(format!("Your OpenPGP key expires in {days} days"))
        .message_id(MessageId::new(message_id.clone()))
        .header("Auto-Submitted", Raw::new("auto-generated"))
        .header("KST-Fingerprint", Raw::new(fpr.to_string()))
        .text_body(body)
        .write_to_vec()
        .expect("writing a message into a Vec cannot fail");
    (message_id, message)
}

/// One run over the store of `kst` at time `now` (seconds since the Unix epoch; a test passes
/// its own clock): claims and sends every due reminder (see the module documentation). A
/// store or mailer failure ends the run with that (temporary) error; what was sent stays sent.
/// A reminder the relay refuses for good is reported in [`ReminderRun::refused`], not as sent,
/// and the run goes on with the others.
pub async fn send_due(kst: &Kst, settings: &ReminderSettings, now: u64) -> Result<ReminderRun> {
    send_due_paced(kst, settings, now, |_| std::future::ready(())).await
}

/// [`send_due`], awaiting `pause(keys read so far)` after each page of the walk: a daemon
/// paces its walk with it (`kst serve` reads at most a few hundred keys a second), so that a
/// run over a large store does not take the CPU and the store from the look-ups it serves
/// meanwhile.
pub async fn send_due_paced<P, F>(
    kst: &Kst,
    settings: &ReminderSettings,
    now: u64,
    mut pause: P,
) -> Result<ReminderRun>
where
    P: FnMut(usize) -> F,
    F: std::future::Future<Output = ()>,
{
    let mut run = ReminderRun::default();
    let mut read = 0usize;
    if !settings.enabled || settings.days_before.is_empty() {
        return Ok(run);
    }
    let store = kst.store();
    let policy = kst.policy();
    let mut cursor = None;
    loop {
        // The store's own order (KeyStore::list_page): a whole run reads the store about once.
        let crate::store::WalkPage {
            addresses: page,
            next,
        } = store.list_page(cursor.as_ref(), PAGE).await?;
        read += page.len();
        for address in page {
            let Some(record) = store.get(&address).await? else {
                continue;
            };
            if record.revoked {
                continue;
            }
            let Ok(cert) = Certificate::from_binary(&record.key) else {
                continue;
            };
            if cert.is_revoked() {
                continue;
            }
            let Some(expires_at) = cert.expiration() else {
                continue;
            };
            let Some(days_before) = due_threshold(expires_at, &settings.days_before, now) else {
                continue;
            };
            let Ok(service) = policy.normalize_address(&format!(
                "{}@{}",
                policy.service_local_part,
                address.domain()
            )) else {
                continue;
            };
            let claim = ReminderClaim {
                address: address.clone(),
                fingerprint: record.fingerprint.clone(),
                expires_at,
                days_before,
            };
            if !store.claim_reminder(&claim).await? {
                run.already_claimed += 1;
                continue;
            }
            // Counted only once claimed, so that the instances of a pool do not use up the
            // owner's budget on reminders already sent. Over the limit, this reminder is
            // dropped (it was claimed): the limit wins.
            let hits = [(LimitKind::Account, address.as_str())];
            if ratelimit::check(kst.rate_limiter().as_ref(), &policy.rate_limits, &hits)
                .await?
                .is_some()
            {
                tracing::warn!(account = %address, days_before, "expiry reminder dropped: the account's rate limit is exhausted");
                run.rate_limited += 1;
                continue;
            }
            let (message_id, message) = build(&service, &claim, now);
            let delivery = kst
                .mailer()
                .send(&OutgoingMail {
                    envelope_from: kst.envelope_from().cloned(),
                    recipient: address.clone(),
                    message,
                    message_id: message_id.clone(),
                })
                .await?;
            match delivery {
                Delivery::Sent => {
                    tracing::info!(account = %address, fingerprint = %claim.fingerprint, days_before, message_id, "expiry reminder sent");
                    run.sent.push(claim);
                }
                Delivery::Refused { code, text } => {
                    // Claimed: a refusal for good is not asked again by the next run.
                    tracing::warn!(account = %address, fingerprint = %claim.fingerprint, days_before, message_id, code, relay = %text, "expiry reminder refused by the relay for good: not sent, not tried again (check that the relay knows this owner's address)");
                    run.refused.push(RefusedReminder { claim, code, text });
                }
            }
        }
        pause(read).await;
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk pauses after each page, told how many keys it has read; keys that are not
    /// certificates are skipped.
    #[tokio::test]
    async fn a_paced_run_pauses_after_each_page() {
        use crate::KeyStore;
        let store = std::sync::Arc::new(crate::testing::MemoryStore::default());
        let p = crate::AddressPolicy::default();
        for i in 0..1_200 {
            let record = crate::NewKey {
                address: p.normalize(&format!("user{i:04}@example.net")).unwrap(),
                key: vec![0xc6, 1, 4],
                fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
                publication_id: format!("{i}"),
                published_at: 1,
                revoked: false,
                expected: crate::Expected::Any,
            }
            .into_record(1);
            store.restore(&[record]).await.unwrap();
        }
        let kst = crate::service::Kst::new(
            crate::policy::Policy::new(&["example.net"], &[]),
            store,
            std::sync::Arc::new(crate::testing::MemoryMailer::default()),
        );
        let mut pauses = Vec::new();
        let run = send_due_paced(&kst, &ReminderSettings::default(), 1_000, |read| {
            pauses.push(read);
            std::future::ready(())
        })
        .await
        .unwrap();
        assert_eq!(pauses, [500, 1_000, 1_200]);
        assert!(run.sent.is_empty());
    }

    /// A reminder the mailer's relay refuses for good (a 5xx) is reported refused with the
    /// relay's code and answer, never as sent; its claim stays, so the next run does not ask
    /// again; a reminder the mailer takes afterwards (another threshold) is sent.
    #[tokio::test]
    async fn a_reminder_the_relay_refuses_is_reported_refused_not_sent() {
        use crate::KeyStore;
        use std::sync::atomic::Ordering;
        const EXPIRES: u64 = 1_893_499_200;
        let account = crate::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        let v = crate::validate::validate(
            include_str!("../testdata/keys/reminder.pub.asc"),
            &account,
            &crate::validate::KeyPolicy::default(),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_780_272_000),
        )
        .unwrap();
        assert_eq!(v.expires_at, Some(EXPIRES));
        let store = std::sync::Arc::new(crate::testing::MemoryStore::default());
        let record = crate::NewKey {
            address: account.clone(),
            key: v.packets,
            fingerprint: v.fingerprint,
            publication_id: "4e4d0000000000000000000000000001".into(),
            published_at: 1_780_272_000,
            revoked: false,
            expected: crate::Expected::Any,
        }
        .into_record(1);
        store.restore(&[record]).await.unwrap();
        let mailer = std::sync::Arc::new(crate::testing::MemoryMailer::default());
        let kst = crate::service::Kst::new(
            crate::policy::Policy::new(&["example.net"], &[]),
            store,
            mailer.clone(),
        );
        let settings = ReminderSettings::default();

        mailer.refusing.store(true, Ordering::SeqCst);
        let run = send_due(&kst, &settings, EXPIRES - 10 * DAY).await.unwrap();
        assert!(run.sent.is_empty(), "{run:?}");
        assert_eq!(run.refused.len(), 1, "{run:?}");
        assert_eq!(run.refused[0].claim.address, account);
        assert_eq!(run.refused[0].claim.days_before, 14);
        assert_eq!(run.refused[0].code, 550);
        assert!(run.refused[0].text.contains("alice@example.net"), "{run:?}");
        assert!(mailer.sent.lock().unwrap().is_empty());

        let again = send_due(&kst, &settings, EXPIRES - 10 * DAY).await.unwrap();
        assert_eq!(
            (again.sent.len(), again.refused.len(), again.already_claimed),
            (0, 0, 1),
            "claimed: not asked again"
        );

        mailer.refusing.store(false, Ordering::SeqCst);
        let later = send_due(&kst, &settings, EXPIRES - 2 * DAY).await.unwrap();
        assert_eq!((later.sent.len(), later.refused.len()), (1, 0), "{later:?}");
        assert_eq!(later.sent[0].days_before, 3);
        assert_eq!(mailer.sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_smallest_begun_window_is_due() {
        let exp = 1_000 * DAY;
        let d = [14, 3];
        assert_eq!(due_threshold(exp, &d, exp - 15 * DAY), None);
        assert_eq!(due_threshold(exp, &d, exp - 14 * DAY), Some(14));
        assert_eq!(due_threshold(exp, &d, exp - 4 * DAY), Some(14));
        assert_eq!(due_threshold(exp, &d, exp - 3 * DAY), Some(3));
        assert_eq!(due_threshold(exp, &d, exp - 1), Some(3));
        assert_eq!(due_threshold(exp, &d, exp), None, "expired: too late");
        assert_eq!(due_threshold(exp, &[], exp - 1), None);
    }

    #[test]
    fn the_reminder_says_how_to_extend_and_republish() {
        let p = crate::AddressPolicy::default();
        let claim = ReminderClaim {
            address: p.normalize("alice@example.net").unwrap(),
            fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
            expires_at: 1_893_499_200,
            days_before: 14,
        };
        assert_eq!(
            claim.id(),
            "ABCDEF0123456789ABCDEF0123456789ABCDEF01-1893499200-14"
        );
        let (id, raw) = build(
            &p.normalize("keys@example.net").unwrap(),
            &claim,
            1_893_499_200 - 10 * DAY,
        );
        let text = String::from_utf8(raw).unwrap();
        assert!(text.contains(&id));
        assert!(
            text.contains("Subject: Your OpenPGP key expires in 10 days"),
            "{text}"
        );
        assert!(text.contains("Auto-Submitted: auto-generated"));
        assert!(
            text.contains("gpg --quick-set-expire ABCDEF0123456789ABCDEF0123456789ABCDEF01 1y")
        );
        assert!(text.contains("kst client --account alice@example.net publish"));
        assert!(text.contains("2030-01-01"));
    }
}
#[cfg(all(test, feature = "conformance"))]
mod pool_tests {
    /// The conformance properties on the in-memory store (the backends run them on theirs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reminders_on_the_memory_store() {
        let store: std::sync::Arc<dyn crate::KeyStore> =
            std::sync::Arc::new(crate::testing::MemoryStore::default());
        crate::conformance::reminders::reminder_claims(vec![store.clone(), store.clone()]).await;
        crate::conformance::reminders::reminders_across_a_pool(vec![store.clone(); 3]).await;
    }
}
