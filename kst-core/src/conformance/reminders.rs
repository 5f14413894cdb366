//! Expiry reminder claims ([`KeyStore::claim_reminder`]) and the reminders sent through them
//! ([`crate::reminder::send_due`]) by a pool of KST instances on one store, with a clock the
//! test controls and the real key `reminder.pub.asc` (expires 2030-01-01; a primary key of its
//! own, so no tombstone of another property applies to it).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Barrier;

use super::cas::{Variant, merge_key};
use super::{DOMAIN, address, delete, publish};
use crate::error::Result;
use crate::mailer::{Delivery, Mailer, OutgoingMail};
use crate::policy::Policy;
use crate::reminder::{ReminderClaim, ReminderSettings, send_due};
use crate::service::Kst;
use crate::store::KeyStore;

const DAY: u64 = 86_400;
/// When `reminder.pub.asc` expires.
const EXPIRES: u64 = 1_893_499_200;

/// `reminder.pub.asc` as the service hands it to a store for `address`, publication `n`.
fn reminder_key(address: &crate::Address, n: u64) -> crate::NewKey {
    let account = crate::AddressPolicy::default()
        .normalize("alice@example.net")
        .expect("address");
    let v = crate::validate::validate(
        include_str!("../../testdata/keys/reminder.pub.asc"),
        &account,
        &crate::validate::KeyPolicy::default(),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_780_272_000),
    )
    .unwrap_or_else(|e| panic!("conformance: reminder.pub.asc refused: {e}"));
    assert_eq!(
        v.expires_at,
        Some(EXPIRES),
        "reminder.pub.asc expires 2030-01-01"
    );
    crate::NewKey {
        address: address.clone(),
        key: v.packets,
        fingerprint: v.fingerprint,
        publication_id: format!("4e4d{n:028x}"),
        published_at: 1_780_000_000 + n,
        revoked: v.revoked,
        expected: crate::store::Expected::Any,
    }
}

/// A mailer that keeps what it is given (the store under test is real; the mail is looked at).
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<OutgoingMail>>,
}

#[async_trait]
impl Mailer for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
        self.sent.lock().unwrap().push(mail.clone());
        Ok(Delivery::Sent)
    }
    async fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// Concurrent claims of one reminder on the instances of a pool: exactly one wins; another
/// threshold or expiry is another claim; claims outlive a deletion of the address.
pub async fn reminder_claims(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "reminder_claims";
    let a = address(&format!("reminder-claims@{DOMAIN}"));
    let claim = ReminderClaim {
        address: a.clone(),
        fingerprint: super::fingerprint(50, 1),
        expires_at: EXPIRES,
        days_before: 14,
    };
    let barrier = Arc::new(Barrier::new(stores.len() * 2));
    let mut tasks = Vec::new();
    for i in 0..stores.len() * 2 {
        let store = stores[i % stores.len()].clone();
        let barrier = barrier.clone();
        let claim = claim.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store
                .claim_reminder(&claim)
                .await
                .unwrap_or_else(|e| panic!("{W}: claim failed: {e}"))
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.expect("claim task"));
    }
    assert_eq!(won, 1, "{W}: {won} concurrent claims of one reminder won");
    let s = &*stores[0];
    for other in [
        ReminderClaim {
            days_before: 3,
            ..claim.clone()
        },
        ReminderClaim {
            expires_at: EXPIRES + 365 * DAY,
            ..claim.clone()
        },
        ReminderClaim {
            address: address(&format!("reminder-claims-2@{DOMAIN}")),
            ..claim.clone()
        },
    ] {
        assert!(
            s.claim_reminder(&other).await.unwrap(),
            "{W}: {other:?} is another reminder"
        );
    }
    delete(W, s, &a).await;
    assert!(
        !s.claim_reminder(&claim).await.unwrap(),
        "{W}: a claim did not outlive a deletion"
    );
}

/// Three KST instances on the instances of the store run the reminders at the same moments of
/// a clock the test sets: nothing before the 14-day window, the 14-day reminder exactly once
/// (to the owner, from `keys@`, with the gpg commands), nothing again at the same moment, the
/// 3-day reminder exactly once, nothing after the expiry; nothing ever for a revoked key; and
/// nothing at all with reminders off.
pub async fn reminders_across_a_pool(stores: Vec<Arc<dyn KeyStore>>) {
    const W: &str = "reminders_across_a_pool";
    let owner = address(&format!("reminded@{DOMAIN}"));
    let revoked = address(&format!("reminded-revoked@{DOMAIN}"));
    let s = &*stores[0];
    publish(W, s, reminder_key(&owner, 900)).await;
    publish(W, s, merge_key(Variant::Revoked, &revoked, 901)).await;
    let recorders: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    let policy = Policy::new(&[DOMAIN], &[]);
    let ksts: Vec<Arc<Kst>> = (0..3)
        .map(|i| {
            Arc::new(Kst::new(
                policy.clone(),
                stores[i % stores.len()].clone(),
                recorders[i].clone(),
            ))
        })
        .collect();
    let settings = ReminderSettings::default();
    let mine = |m: &OutgoingMail| m.recipient == owner || m.recipient == revoked;
    // Message-IDs of the reminders already looked at (the recorders are read in instance
    // order, not in the order of sending).
    let mut seen = std::collections::BTreeSet::new();
    for (now, expect) in [
        (EXPIRES - 20 * DAY, None),
        (EXPIRES - 10 * DAY, Some(14)),
        (EXPIRES - 10 * DAY, None),
        (EXPIRES - 9 * DAY, None),
        (EXPIRES - 2 * DAY, Some(3)),
        (EXPIRES - DAY, None),
        (EXPIRES + DAY, None),
    ] {
        let barrier = Arc::new(Barrier::new(ksts.len()));
        let mut tasks = Vec::new();
        for k in &ksts {
            let (k, barrier, settings) = (k.clone(), barrier.clone(), settings.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                send_due(&k, &settings, now).await
            }));
        }
        for t in tasks {
            t.await
                .expect("reminder task")
                .unwrap_or_else(|e| panic!("{W}: a run failed: {e}"));
        }
        let all: Vec<OutgoingMail> = recorders
            .iter()
            .flat_map(|r| r.sent.lock().unwrap().clone())
            .filter(|m| mine(m))
            .collect();
        let new: Vec<&OutgoingMail> = all
            .iter()
            .filter(|m| !seen.contains(&m.message_id))
            .collect();
        match expect {
            None => assert!(
                new.is_empty(),
                "{W}: at {now} (expiry {EXPIRES}) {} reminders were sent, none due",
                new.len()
            ),
            Some(days) => {
                assert_eq!(
                    new.len(),
                    1,
                    "{W}: the {days}-day reminder went out {} times across the pool",
                    new.len()
                );
                let m = new[0];
                assert_eq!(m.recipient, owner, "{W}: a revoked key was reminded");
                let text = String::from_utf8_lossy(&m.message);
                assert!(text.contains(&format!("keys@{DOMAIN}")), "{W}: {text}");
                assert!(text.contains("gpg --quick-set-expire"), "{W}: {text}");
                assert!(
                    text.contains(&format!(
                        "expires in {} days",
                        (EXPIRES - now).div_ceil(DAY)
                    )),
                    "{W}: {text}"
                );
            }
        }
        seen.extend(all.iter().map(|m| m.message_id.clone()));
    }
    // Off: a fresh key in its window gets nothing.
    let off_owner = address(&format!("reminded-off@{DOMAIN}"));
    publish(W, s, reminder_key(&off_owner, 902)).await;
    let off = ReminderSettings {
        enabled: false,
        ..ReminderSettings::default()
    };
    let run = send_due(&ksts[0], &off, EXPIRES - DAY).await.unwrap();
    assert!(
        run.sent.is_empty(),
        "{W}: reminders off, yet {:?}",
        run.sent
    );
    for a in [&owner, &revoked, &off_owner] {
        delete(W, s, a).await;
    }
}
