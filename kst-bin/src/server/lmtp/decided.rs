//! One decision per message, sender and service address, however often the MTA delivers it.
//!
//! An MTA delivers one message to every recipient it was sent to, and spells each as the
//! sender wrote it: `keys@example.net`, `KEYS@example.net` and `keys@EXAMPLE.NET` are three
//! recipients to Postfix (up to `smtpd_recipient_limit`, 1,000, per message; LMTP
//! transactions of `lmtp_destination_recipient_limit`, 50, run in parallel), and one service
//! address to kst. Without this, kst parsed and decided such a message once per spelling: an
//! outsider's 2 MiB message with 1,000 spellings cost 1,000 full parses (and as many replies,
//! up to the rate limits). [`Decided`] remembers, for a while, the decision taken for each
//! (envelope sender, service address, message bytes), and makes concurrent deliveries of the
//! same one wait for the first: the others reuse its result, parse nothing and send nothing.
//!
//! Only decisions are remembered (a temporary failure is tried again at the next delivery), in
//! memory, per `kst serve` process, for [`DECIDED_FOR`], at most [`DECIDED_CAPACITY`] of them. A
//! redelivery of the same bytes within that time (the MTA lost kst's `250`) gets the same
//! answer without a second reply; later, kst decides again (idempotently, as before).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kst_core::Address;
use kst_core::service::Handled;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// How long a decision is remembered.
pub const DECIDED_FOR: Duration = Duration::from_secs(600);

/// Most decisions remembered; the oldest go first.
pub const DECIDED_CAPACITY: usize = 4096;

/// What identifies one decision: (envelope sender, service address, message digest), hashed.
pub type DecisionKey = [u8; 32];

/// The key of `sender`'s message with digest `message` (SHA-256 of its bytes) to `service`.
pub fn decision_key(sender: &str, service: &Address, message: &[u8]) -> DecisionKey {
    let mut h = Sha256::new();
    h.update(b"kst-lmtp-decided-v1\0");
    h.update(sender.as_bytes());
    h.update([0]);
    h.update(service.as_str().as_bytes());
    h.update([0]);
    h.update(message);
    h.finalize().into()
}

/// The SHA-256 of a message's bytes, for [`decision_key`].
pub fn message_digest(raw: &[u8]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

#[derive(Default)]
struct Remembered {
    by_key: HashMap<DecisionKey, (Instant, Handled)>,
    order: VecDeque<DecisionKey>,
}

/// The decisions a server took recently, and the deliveries deciding now. Shared by every
/// connection of one server.
#[derive(Default)]
pub struct Decided {
    remembered: Mutex<Remembered>,
    deciding: Mutex<HashMap<DecisionKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one delivery decides for its key: other deliveries of the key wait for it.
pub struct Deciding {
    key: DecisionKey,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Decided {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no other delivery is deciding for `key`, then returns the decision taken
    /// for it, if one was (within [`DECIDED_FOR`]), and the turn to decide otherwise. Drop the
    /// turn with [`Decided::finish`].
    pub async fn begin(&self, key: DecisionKey) -> (Option<Handled>, Deciding) {
        let lock = match self.deciding.lock() {
            Ok(mut deciding) => Arc::clone(deciding.entry(key).or_default()),
            // A poisoned map (a panic elsewhere): decide without waiting for others.
            Err(_) => Arc::default(),
        };
        let guard = Arc::clone(&lock).lock_owned().await;
        let turn = Deciding {
            key,
            lock,
            guard: Some(guard),
        };
        (self.get_at(&key, Instant::now()), turn)
    }

    /// Ends a turn: remembers `decided` (a decision; `None` after a temporary failure) and
    /// lets the next delivery of the key go.
    pub fn finish(&self, mut turn: Deciding, decided: Option<&Handled>) {
        if let Some(handled) = decided {
            self.remember(turn.key, handled.clone());
        }
        drop(turn.guard.take());
        if let Ok(mut deciding) = self.deciding.lock() {
            // Only the map and this turn hold the lock: nobody waits for it.
            if Arc::strong_count(&turn.lock) == 2 {
                deciding.remove(&turn.key);
            }
        }
    }

    /// The decision remembered for `key` if it is still fresh at `now`.
    fn get_at(&self, key: &DecisionKey, now: Instant) -> Option<Handled> {
        let remembered = self.remembered.lock().ok()?;
        remembered
            .by_key
            .get(key)
            .filter(|(at, _)| now.saturating_duration_since(*at) < DECIDED_FOR)
            .map(|(_, handled)| handled.clone())
    }

    fn remember(&self, key: DecisionKey, handled: Handled) {
        let Ok(mut remembered) = self.remembered.lock() else {
            return;
        };
        if remembered
            .by_key
            .insert(key, (Instant::now(), handled))
            .is_none()
        {
            remembered.order.push_back(key);
        }
        while remembered.order.len() > DECIDED_CAPACITY {
            if let Some(oldest) = remembered.order.pop_front() {
                remembered.by_key.remove(&oldest);
            }
        }
    }

    /// How many decisions are remembered (for tests).
    pub fn len(&self) -> usize {
        self.remembered.lock().map_or(0, |r| r.by_key.len())
    }

    /// True when no decision is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use kst_core::AddressPolicy;
    use kst_core::service::{Decision, RequestKind, Silence};

    use super::*;

    fn handled(n: usize) -> Handled {
        Handled {
            message_id: Some(format!("m{n}@example.org")),
            kind: RequestKind::Other,
            decision: Decision::Ignored(Silence::NullSender),
            reply: None,
        }
    }

    fn key(n: usize) -> DecisionKey {
        let service = AddressPolicy::default()
            .normalize("keys@example.net")
            .unwrap();
        decision_key(
            "bob@example.org",
            &service,
            &message_digest(&n.to_be_bytes()),
        )
    }

    #[tokio::test]
    async fn remembers_decisions_not_failures_and_forgets_the_oldest() {
        let d = Decided::new();
        let (none, turn) = d.begin(key(0)).await;
        assert!(none.is_none());
        d.finish(turn, None);
        let (none, turn) = d.begin(key(0)).await;
        assert!(none.is_none(), "a temporary failure is not remembered");
        d.finish(turn, Some(&handled(0)));
        let (got, turn) = d.begin(key(0)).await;
        assert_eq!(got, Some(handled(0)));
        d.finish(turn, None);
        for n in 1..=DECIDED_CAPACITY {
            let (_, turn) = d.begin(key(n)).await;
            d.finish(turn, Some(&handled(n)));
        }
        assert_eq!(d.len(), DECIDED_CAPACITY);
        let (oldest, turn) = d.begin(key(0)).await;
        assert!(oldest.is_none(), "the oldest decision was forgotten");
        d.finish(turn, None);
        assert!(
            d.deciding.lock().unwrap().is_empty(),
            "no turn is left behind"
        );
    }

    #[tokio::test]
    async fn decisions_expire() {
        let d = Decided::new();
        let (_, turn) = d.begin(key(1)).await;
        d.finish(turn, Some(&handled(1)));
        let now = Instant::now();
        assert_eq!(d.get_at(&key(1), now), Some(handled(1)));
        let later = now + DECIDED_FOR + Duration::from_secs(1);
        assert_eq!(d.get_at(&key(1), later), None);
    }

    #[tokio::test]
    async fn a_concurrent_delivery_waits_for_the_first_and_reuses_its_decision() {
        let d = Arc::new(Decided::new());
        let (none, first) = d.begin(key(2)).await;
        assert!(none.is_none());
        let d2 = Arc::clone(&d);
        let second = tokio::spawn(async move {
            let (got, turn) = d2.begin(key(2)).await;
            d2.finish(turn, None);
            got
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second delivery waits");
        d.finish(first, Some(&handled(2)));
        assert_eq!(second.await.unwrap(), Some(handled(2)));
        assert!(d.deciding.lock().unwrap().is_empty());
    }

    #[test]
    fn keys_tell_sender_service_and_message_apart() {
        let p = AddressPolicy::default();
        let net = p.normalize("keys@example.net").unwrap();
        let org = p.normalize("keys@example.org").unwrap();
        let m = message_digest(b"message");
        let k = decision_key("bob@example.org", &net, &m);
        assert_eq!(k, decision_key("bob@example.org", &net, &m));
        assert_ne!(k, decision_key("eve@example.org", &net, &m));
        assert_ne!(k, decision_key("bob@example.org", &org, &m));
        assert_ne!(
            k,
            decision_key("bob@example.org", &net, &message_digest(b"other"))
        );
    }
}
