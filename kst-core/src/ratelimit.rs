//! Rate limits against backscatter, enumeration and load, counted only on what the counted
//! party cannot use against someone else.
//!
//! Two kinds of request are counted apart ([`crate::service`] decides which is which, after
//! authentication and after the optional sender gate):
//! - A request of an **authenticated account** (an authenticated submission whose envelope
//!   sender is that account: publications, revocations, deletions, and its own retrievals)
//!   takes one unit from that account's counter only. No outsider can authenticate as the
//!   account, so no outsider's traffic can use that budget up.
//! - Every other request that would get a reply takes one unit from its source (the client IP
//!   of the topmost trusted `Received:` header, IPv6 per /64), from the pair (reply recipient,
//!   queried address) for a retrieval, and from its reply recipient (folded so that case and
//!   `+tag` variants of one mailbox, and dot and separator variants where the recipient's
//!   domain delivers them to one mailbox, share a counter: [`RecipientFolding`]). The
//!   recipient cap is what bounds backscatter to a forged victim. Nothing is keyed on the queried address alone or on a
//!   sender domain: strangers could exhaust those for everyone.
//!
//! A request over any limit is accepted and left unanswered (see
//! [`crate::service::Silence::RateLimited`]). Counters live behind the [`RateLimiter`] trait so
//! that every instance of a pool shares them: [`MemoryRateLimiter`] here (one process), and the
//! Redis, PostgreSQL and filesystem stores implement the trait too. Every key this module makes
//! starts with [`KEY_PREFIX`], so other users of the same limiter (e.g. HTTP counters) cannot
//! collide with it. Counting uses fixed windows: the first hit of a key opens a window of the
//! given length, the window's count grows with each hit, and the key starts again at 1 once the
//! window has passed. A limiter that cannot be reached is a temporary error: the MTA keeps the
//! message and retries, so an outage never loses mail.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::error::{Error, Result};

/// Shared hit counters with fixed windows.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Short name for logs, e.g. `"memory"`, `"redis"`.
    fn name(&self) -> &'static str;

    /// Counts one hit of `key` and says whether it is within `limit` hits per `window`:
    /// `Ok(true)` while the window's count (this hit included) is at most `limit`.
    /// Instances sharing a backend share the count. An unreachable backend is a temporary
    /// [`Error`].
    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool>;

    /// Counts every hit of `hits` (each with its own key, limit and window) and answers, in
    /// order, whether each is within its limit: the same answers and counts as calling
    /// [`RateLimiter::hit`] once per hit, in order. A key named several times is counted once
    /// per naming (the first naming's window opens a new window); `limit` 0 always answers
    /// `false`. Backends count the whole slice in one round trip (PostgreSQL one statement,
    /// Redis one script per hash slot, the filesystem one hand-off to the blocking pool); this
    /// default calls [`RateLimiter::hit`] for each. On an error, any part of the hits may
    /// have been counted.
    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        let mut verdicts = Vec::with_capacity(hits.len());
        for h in hits {
            verdicts.push(self.hit(&h.key, h.limit, h.window).await?);
        }
        Ok(verdicts)
    }

    /// Takes back one hit of each of `hits` (a key named n times, n hits), from the window
    /// still open: what a message counted before it was deferred (a temporary failure: the
    /// MTA delivers it again, and it is counted then), so that an honest sender's retries of
    /// one message during an outage do not use up its budget (red team of the mail path's
    /// bound, S1). Never below 0; a window that ended keeps nothing to take back, and a key
    /// not counted is left alone. `limit` is not read. kst's limiters (memory, fs,
    /// PostgreSQL, Redis) take hits back; the default takes nothing back (limiters of other
    /// counts, test doubles).
    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        let _ = hits;
        Ok(())
    }
}

/// One counter hit of [`RateLimiter::hit_many`]: `key` allows at most `limit` hits per
/// `window`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hit {
    /// The limiter key, e.g. `web-client:192.0.2.1`.
    pub key: String,
    /// Hits allowed per window (0: none).
    pub limit: u32,
    /// The window a first hit opens.
    pub window: Duration,
}

impl Hit {
    /// A hit of `key`, at most `limit` per `window`.
    pub fn new(key: impl Into<String>, limit: u32, window: Duration) -> Hit {
        Hit {
            key: key.into(),
            limit,
            window,
        }
    }
}

/// The distinct keys of a [`RateLimiter::hit_many`] slice, for backends that add a key's
/// hits in one step: each key once, in byte order (so that writers lock rows in one order),
/// with how many times it is named and the window of its first naming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally<'a> {
    /// `(key, times named, window of the first naming)`, sorted by key, each key once.
    pub keys: Vec<(&'a str, u32, Duration)>,
    /// For each hit, the position of its key in `keys`.
    slots: Vec<usize>,
}

impl<'a> Tally<'a> {
    /// The tally of `hits`.
    pub fn of(hits: &'a [Hit]) -> Tally<'a> {
        let mut order: Vec<usize> = (0..hits.len()).collect();
        // Stable: among namings of one key, the first stays first.
        order.sort_by(|&a, &b| hits[a].key.cmp(&hits[b].key));
        let mut keys: Vec<(&'a str, u32, Duration)> = Vec::new();
        let mut slots = vec![0; hits.len()];
        for i in order {
            let h = &hits[i];
            match keys.last_mut() {
                Some(last) if last.0 == h.key => last.1 = last.1.saturating_add(1),
                _ => keys.push((&h.key, 1, h.window)),
            }
            slots[i] = keys.len() - 1;
        }
        Tally { keys, slots }
    }

    /// The answers of `hits` (the slice this tally is of) given `counts`, each key's window
    /// count after all its hits (in the order of [`Tally::keys`]): the `j`-th naming of a key
    /// named `n` times got the count `count - n + 1 + j`, and is within when that is at most
    /// its own limit.
    pub fn verdicts(&self, hits: &[Hit], counts: &[u64]) -> Result<Vec<bool>> {
        if counts.len() != self.keys.len() || hits.len() != self.slots.len() {
            return Err(Error::corrupt(
                crate::error::Component::rate_limiter("hit_many"),
                format!(
                    "the backend answered {} counts for {} keys (a bug in the backend)",
                    counts.len(),
                    self.keys.len()
                ),
            ));
        }
        let mut seen = vec![0u64; self.keys.len()];
        let mut out = Vec::with_capacity(hits.len());
        for (h, &k) in hits.iter().zip(&self.slots) {
            let first = counts[k].saturating_sub(u64::from(self.keys[k].1));
            seen[k] += 1;
            out.push(first + seen[k] <= u64::from(h.limit));
        }
        Ok(out)
    }
}

/// Which counter a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The authenticated account (its own requests only).
    Account,
    /// The reply recipient (the envelope sender) of an unauthenticated request.
    Sender,
    /// The pair (reply recipient, queried address) of an unauthenticated retrieval.
    SenderQuery,
    /// The client IP (IPv6: its /64) in the topmost trusted `Received:` header.
    SourceIp,
}

impl LimitKind {
    /// Stable token for logs, metrics and limiter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Account => "account",
            LimitKind::Sender => "sender",
            LimitKind::SenderQuery => "sender-query",
            LimitKind::SourceIp => "source-ip",
        }
    }
}

/// How many requests each counter allows per window. 0 turns a counter off.
///
/// The defaults (per hour: 60 per authenticated account, 60 per reply recipient, 5 per reply
/// recipient and queried address, 1,000 per source) are far above what a person's mail client
/// needs (one retrieval per new correspondent, one publication per key change) and bound what
/// kst sends to one mailbox, how often it sends one key to one mailbox, and what one host can
/// make it send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Requests per window of one authenticated account (publications, revocations, deletions,
    /// and its own retrievals sent through an authenticated submission).
    pub per_account: u32,
    /// Unauthenticated requests per window answered to one reply recipient (the envelope
    /// sender): the cap on backscatter to a forged victim.
    pub per_sender: u32,
    /// Unauthenticated retrievals per window answered to one reply recipient about one queried
    /// address: the cap on sending one (large) key to one mailbox.
    pub per_sender_query: u32,
    /// Unauthenticated requests per window from one source: the client IP of the topmost
    /// trusted `Received:` header, an IPv6 address counted per /64.
    pub per_source_ip: u32,
    /// Window length in seconds.
    pub window_secs: u64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_account: 60,
            per_sender: 60,
            per_sender_query: 5,
            per_source_ip: 1_000,
            window_secs: 3_600,
        }
    }
}

impl RateLimits {
    /// Every counter off.
    pub const OFF: RateLimits = RateLimits {
        per_account: 0,
        per_sender: 0,
        per_sender_query: 0,
        per_source_ip: 0,
        window_secs: 3_600,
    };

    /// The limit of `kind` (0: off).
    pub fn limit(&self, kind: LimitKind) -> u32 {
        match kind {
            LimitKind::Account => self.per_account,
            LimitKind::Sender => self.per_sender,
            LimitKind::SenderQuery => self.per_sender_query,
            LimitKind::SourceIp => self.per_source_ip,
        }
    }

    /// The window as a [`Duration`] (at least one second).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs.max(1))
    }
}

/// The prefix of every key this module counts under (`mail:`), distinct from other users of a
/// shared limiter.
pub const KEY_PREFIX: &str = "mail:";

/// The limiter key of `value` under `kind`, e.g. `mail:sender:bob@acme.net`.
pub fn limiter_key(kind: LimitKind, value: &str) -> String {
    format!("{KEY_PREFIX}{}:{value}", kind.as_str())
}

/// How reply recipients of other providers are folded into one counter: which local-part
/// variants those providers deliver to one mailbox, so that a forger cannot multiply the
/// backscatter budget of one victim by writing their address in many ways.
///
/// `+` is cut everywhere (RFC 5233 subaddressing, which most providers deliver to the base
/// mailbox) and case is ignored everywhere. Dots are ignored, and further separators cut, only
/// for the domains listed: elsewhere `john.smith@` and `johnsmith@` may be two people, and
/// folding them would let one drain the other's budget. Folding too much only makes a limit
/// stricter for the mailboxes folded together; folding too little gives a forger one more
/// budget per variant for a domain that is not listed (docs/SECURITY.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipientFolding {
    /// Domains whose mailboxes ignore dots in the local part (lowercase A-labels).
    pub dot_insensitive_domains: Vec<String>,
    /// Subaddress separators per domain besides `+`: the local part is cut at the first of
    /// them (e.g. `"yahoo.com" = "-"`).
    pub separators: std::collections::BTreeMap<String, String>,
}

impl Default for RecipientFolding {
    /// Gmail ignores dots; Yahoo delivers `base-keyword@` (its disposable addresses) to `base@`.
    fn default() -> Self {
        RecipientFolding {
            dot_insensitive_domains: vec!["gmail.com".into(), "googlemail.com".into()],
            separators: [("yahoo.com".to_string(), "-".to_string())]
                .into_iter()
                .collect(),
        }
    }
}

impl RecipientFolding {
    /// No folding beyond case and `+`.
    pub fn minimal() -> RecipientFolding {
        RecipientFolding {
            dot_insensitive_domains: Vec::new(),
            separators: Default::default(),
        }
    }

    fn ignores_dots(&self, domain: &str) -> bool {
        self.dot_insensitive_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    fn separators_of(&self, domain: &str) -> &str {
        self.separators
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map_or("", |(_, s)| s.as_str())
    }
}

/// The counter value of a reply recipient: the address with its local part ASCII-lowercased,
/// cut at the first `+` (and at the domain's own separators), and without dots where the
/// domain ignores them (see [`RecipientFolding`]), so that `Victim+1@` and `VICTIM@`, which
/// providers deliver to one mailbox, share one backscatter budget.
pub fn recipient_counter(recipient: &Address, folding: &RecipientFolding) -> String {
    let local = recipient.local();
    let domain = recipient.domain();
    let extra = folding.separators_of(domain);
    let base = local
        .split(|c: char| c == '+' || extra.contains(c))
        .next()
        .unwrap_or(local);
    let dots = folding.ignores_dots(domain);
    let folded: String = base
        .chars()
        .filter(|c| !(dots && *c == '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let folded = if folded.is_empty() { local } else { &folded };
    format!("{folded}@{domain}")
}

/// The counter value of a (reply recipient, queried address) pair.
pub fn recipient_query_counter(
    recipient: &Address,
    queried: &Address,
    folding: &RecipientFolding,
) -> String {
    format!("{} {queried}", recipient_counter(recipient, folding))
}

/// The counter value of a source IP: an IPv4 address as written, an IPv6 address as its /64
/// (one customer's allocation; counting single IPv6 addresses would give one host 2^64
/// budgets); an IPv4-mapped IPv6 address as the IPv4 address. Anything else (e.g.
/// [`crate::received::UNREADABLE_SOURCE`]) is kept as it is.
pub fn source_counter(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Err(_) => ip.to_string(),
    }
}

/// Counts `hits` against `limits` in `limiter`, in order, stopping at the first counter that is
/// over its limit and returning its kind. Counters that are off are skipped.
pub async fn check(
    limiter: &dyn RateLimiter,
    limits: &RateLimits,
    hits: &[(LimitKind, &str)],
) -> Result<Option<LimitKind>> {
    for (kind, value) in hits {
        let limit = limits.limit(*kind);
        if limit == 0 {
            continue;
        }
        if !limiter
            .hit(&limiter_key(*kind, value), limit, limits.window())
            .await?
        {
            return Ok(Some(*kind));
        }
    }
    Ok(None)
}

/// Takes back what [`check`] counted for `hits` when it let them through (every counter
/// that is not off: [`RateLimiter::refund`]), for a request that was then deferred.
pub async fn refund(
    limiter: &dyn RateLimiter,
    limits: &RateLimits,
    hits: &[(LimitKind, &str)],
) -> Result<()> {
    let hits: Vec<Hit> = hits
        .iter()
        .filter(|(kind, _)| limits.limit(*kind) > 0)
        .map(|(kind, value)| {
            Hit::new(
                limiter_key(*kind, value),
                limits.limit(*kind),
                limits.window(),
            )
        })
        .collect();
    if hits.is_empty() {
        return Ok(());
    }
    limiter.refund(&hits).await
}

/// Most keys a [`MemoryRateLimiter`] holds before it sweeps out expired windows.
const SWEEP_AT: usize = 10_000;

/// A [`RateLimiter`] in this process's memory: right for one long-running process (`kst serve`
/// on one host). Separate processes (`kst deliver` per message) do not share it.
#[derive(Debug, Default)]
pub struct MemoryRateLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl MemoryRateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live keys (for tests and metrics).
    pub fn len(&self) -> usize {
        self.windows.lock().map_or(0, |w| w.len())
    }

    /// True when no key is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Result<bool> {
        let verdicts = self.hit_many(&[Hit::new(key, limit, window)]).await?;
        Ok(verdicts.first().copied().unwrap_or(false))
    }

    async fn hit_many(&self, hits: &[Hit]) -> Result<Vec<bool>> {
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| Error::unavailable("ratelimit(memory)", "lock poisoned"))?;
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (end, _)| *end > now);
        }
        Ok(hits
            .iter()
            .map(|h| {
                let entry = windows.entry(h.key.clone()).or_insert((now + h.window, 0));
                if entry.0 <= now {
                    *entry = (now + h.window, 0);
                }
                entry.1 = entry.1.saturating_add(1);
                entry.1 <= h.limit
            })
            .collect())
    }

    async fn refund(&self, hits: &[Hit]) -> Result<()> {
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| Error::unavailable("ratelimit(memory)", "lock poisoned"))?;
        for h in hits {
            if let Some(entry) = windows.get_mut(&h.key)
                && entry.0 > now
            {
                entry.1 = entry.1.saturating_sub(1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_limiter_counts_per_key_and_window() {
        let l = MemoryRateLimiter::new();
        let w = Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.hit("a", 3, w).await.unwrap());
        }
        assert!(!l.hit("a", 3, w).await.unwrap());
        assert!(!l.hit("a", 3, w).await.unwrap());
        assert!(l.hit("b", 3, w).await.unwrap(), "keys are independent");
        assert_eq!(l.len(), 2);
    }

    #[tokio::test]
    async fn memory_limiter_starts_again_after_the_window() {
        let l = MemoryRateLimiter::new();
        assert!(l.hit("a", 1, Duration::ZERO).await.unwrap());
        // A zero-length window has always passed: every hit opens a fresh one.
        assert!(l.hit("a", 1, Duration::ZERO).await.unwrap());
    }

    #[tokio::test]
    async fn check_stops_at_the_first_exhausted_counter_and_skips_off_ones() {
        let l = MemoryRateLimiter::new();
        let limits = RateLimits {
            per_account: 0,
            per_sender: 2,
            per_sender_query: 1,
            per_source_ip: 5,
            window_secs: 60,
        };
        let hits = [
            (LimitKind::SourceIp, "192.0.2.1"),
            (LimitKind::Account, "alice@example.net"),
            (LimitKind::Sender, "bob@acme.net"),
        ];
        assert_eq!(check(&l, &limits, &hits).await.unwrap(), None);
        assert_eq!(check(&l, &limits, &hits).await.unwrap(), None);
        assert_eq!(
            check(&l, &limits, &hits).await.unwrap(),
            Some(LimitKind::Sender)
        );
        let keys: Vec<String> = l.windows.lock().unwrap().keys().cloned().collect();
        // The account counter is off: never counted. Every key carries the module's prefix.
        assert!(keys.iter().all(|k| !k.contains("account:")), "{keys:?}");
        assert!(keys.iter().all(|k| k.starts_with(KEY_PREFIX)), "{keys:?}");
        assert_eq!(l.windows.lock().unwrap()["mail:source-ip:192.0.2.1"].1, 3);
        let q = [(LimitKind::SenderQuery, "bob@acme.net alice@example.net")];
        assert_eq!(check(&l, &limits, &q).await.unwrap(), None);
        assert_eq!(
            check(&l, &limits, &q).await.unwrap(),
            Some(LimitKind::SenderQuery)
        );
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source_counter("192.0.2.7"), "192.0.2.7");
        assert_eq!(
            source_counter("2001:db8:1:2:aaaa::1"),
            source_counter("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(source_counter("2001:db8:1:2::9"), "2001:db8:1:2::/64");
        assert_ne!(
            source_counter("2001:db8:1:2::1"),
            source_counter("2001:db8:1:3::1")
        );
        assert_eq!(source_counter("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(source_counter("unreadable"), "unreadable");
    }

    #[test]
    fn recipient_variants_of_one_mailbox_share_a_counter() {
        let p = crate::AddressPolicy::default();
        let f = RecipientFolding::default();
        let c = |a: &str| recipient_counter(&p.as_received(a).unwrap(), &f);
        let base = c("victim@freemail.example");
        for v in [
            "Victim@freemail.example",
            "victim+1@freemail.example",
            "VICTIM+x.y@FreeMail.example",
        ] {
            assert_eq!(c(v), base, "{v}");
        }
        assert_ne!(c("other@freemail.example"), base);
        // Dots are folded only where the domain ignores them.
        assert_ne!(c("v.ictim@freemail.example"), base);
        assert_eq!(c("j.o.h.n+x@gmail.com"), c("john@gmail.com"));
        // Further separators only where the domain has them.
        assert_eq!(c("victim-shop@yahoo.com"), c("victim@yahoo.com"));
        assert_ne!(c("anne-marie@freemail.example"), c("anne@freemail.example"));
        // A local part that is all separator keeps its own counter.
        assert_eq!(c("+@freemail.example"), "+@freemail.example");
    }

    #[test]
    fn folding_rules_come_from_configuration() {
        let p = crate::AddressPolicy::default();
        let f = RecipientFolding {
            dot_insensitive_domains: vec!["FreeMail.example".into()],
            separators: [("freemail.example".to_string(), "-_".to_string())]
                .into_iter()
                .collect(),
        };
        let c = |a: &str, f: &RecipientFolding| recipient_counter(&p.as_received(a).unwrap(), f);
        assert_eq!(
            c("v.i.c_tim-1@freemail.example", &f),
            "vic@freemail.example"
        );
        assert_eq!(c("john.smith@gmail.com", &f), "john.smith@gmail.com");
        let m = RecipientFolding::minimal();
        assert_eq!(c("john.smith@gmail.com", &m), "john.smith@gmail.com");
        assert_eq!(c("V-1+x@yahoo.com", &m), "v-1@yahoo.com");
    }

    #[test]
    fn a_tally_names_each_key_once_and_answers_like_hits_in_order() {
        let w = Duration::from_secs(60);
        let hits = [
            Hit::new("b", 2, w),
            Hit::new("a", 1, Duration::from_secs(5)),
            Hit::new("b", 2, Duration::from_secs(9)),
            Hit::new("b", 3, w),
            Hit::new("a", 9, w),
        ];
        let t = Tally::of(&hits);
        // Sorted, counted, the first naming's window.
        assert_eq!(t.keys, vec![("a", 2, Duration::from_secs(5)), ("b", 3, w)]);
        // a ends at 2 (hits 1, 2), b at 3 (hits 1, 2, 3); each against its own limit.
        assert_eq!(
            t.verdicts(&hits, &[2, 3]).unwrap(),
            vec![true, true, true, true, true]
        );
        // b already had 1 before: its hits got 2, 3, 4.
        assert_eq!(
            t.verdicts(&hits, &[2, 4]).unwrap(),
            vec![true, true, false, false, true]
        );
        assert!(t.verdicts(&hits, &[2]).is_err(), "a count missing");
        assert!(Tally::of(&[]).keys.is_empty());
    }

    #[tokio::test]
    async fn memory_limiter_sweeps_expired_windows() {
        let l = MemoryRateLimiter::new();
        for i in 0..SWEEP_AT {
            l.hit(&format!("k{i}"), 1, Duration::ZERO).await.unwrap();
        }
        l.hit("last", 1, Duration::from_secs(60)).await.unwrap();
        assert_eq!(l.len(), 1);
    }
}
