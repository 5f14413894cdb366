//! What one process keeps per domain directory of the fs key directory (feature
//! `transparency`), beside the overlays (`overlay.rs`): the domains it found recovered
//! (`directory.rs`'s `recovered`), whose journal slots it made sure of (`journal.rs`'s
//! `slots_ready`). Each entry remembers when it was last used, and entries unused for
//! [`IDLE`] are dropped, at most every quarter of it, when a new one comes in: a process that
//! touched many domains once kept an entry of each for good (the overlays were swept, these
//! sets were not). A dropped entry costs only its check again: the next read of that domain
//! checks its recovery without the lock (a few small files), the next commit opens its slots
//! again. (A process without a boot id uses the journal under a token of its own, so at that
//! check it finds another process's token in `journal/boot` and replays the domain's frames
//! above the checkpoint again, as at its first touch: correct, but a cost in such a pool.)

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long an entry is kept unused (as an overlay, `overlay.rs`).
pub(crate) const IDLE: Duration = crate::overlay::IDLE;

/// A set of keys (a domain's directory, with a boot id for the recovered ones), each with
/// when it was last inserted or found.
#[derive(Debug)]
pub(crate) struct Recent<K> {
    used: HashMap<K, Instant>,
    /// When the idle entries were last dropped.
    swept: Option<Instant>,
}

impl<K> Default for Recent<K> {
    fn default() -> Self {
        Recent {
            used: HashMap::new(),
            swept: None,
        }
    }
}

impl<K: Hash + Eq> Recent<K> {
    /// Adds `key`, used `now`; first, at most every quarter of [`IDLE`], drops the entries
    /// unused for [`IDLE`] (only an insert grows the set, so that bounds it).
    pub(crate) fn insert(&mut self, key: K, now: Instant) {
        if self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= IDLE / 4)
        {
            self.swept = Some(now);
            self.used
                .retain(|_, used| now.saturating_duration_since(*used) < IDLE);
        }
        self.used.insert(key, now);
    }

    /// Whether `key` is in the set; if it is, it was used `now`.
    pub(crate) fn contains(&mut self, key: &K, now: Instant) -> bool {
        match self.used.get_mut(key) {
            Some(used) => {
                *used = now;
                true
            }
            None => false,
        }
    }

    /// Takes `key` out.
    pub(crate) fn remove(&mut self, key: &K) {
        self.used.remove(key);
    }

    /// How many entries the set holds (a test's measure).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry unused for [`IDLE`] is dropped at the next insert, at most every quarter of
    /// [`IDLE`]; one found (used) meanwhile stays. Before, these sets (a `HashSet` each)
    /// kept every domain a process ever touched.
    #[test]
    fn entries_unused_for_idle_are_dropped_at_an_insert() {
        let mut set = Recent::default();
        let t0 = Instant::now();
        let at = |quarters: u32, sixteenths: u32| t0 + IDLE / 4 * quarters + IDLE / 16 * sixteenths;
        for d in 0..100 {
            set.insert(d, t0);
        }
        // Domain 7 keeps being used.
        assert!(set.contains(&7, at(2, 0)));
        // Less than a quarter of IDLE since the last sweep: nothing dropped.
        set.insert(100, at(0, 2));
        assert_eq!(set.len(), 101);
        // 0..100 but 7 unused for IDLE: dropped at the next insert; 7 and 100 stay.
        set.insert(101, at(4, 1));
        assert_eq!(set.len(), 3);
        assert!(!set.contains(&0, at(4, 1)));
        // 100 unused for IDLE now, but the last sweep is less than a quarter of IDLE ago.
        set.insert(102, at(4, 2));
        assert_eq!(set.len(), 4);
        // A quarter of IDLE after that sweep: 100 is dropped, 7 (used at half of IDLE) stays.
        set.insert(103, at(5, 1));
        assert_eq!(set.len(), 4);
        assert!(!set.contains(&100, at(5, 1)));
        assert!(set.contains(&7, at(5, 1)));
        set.remove(&7);
        assert!(!set.contains(&7, at(5, 1)));
    }
}
