//! Logging to stderr (text or JSON, by `[log]`), so stdout stays clean for command output;
//! the `[log]` section is defined here.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: logging (always to stderr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or a tracing filter such as
    /// `info,kst_core=debug`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The level names `[log] level` accepts on their own.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Parses `[log] level`: a level name or a tracing filter (`info,kst_core=debug`).
///
/// A bare word that is not a level would silently become a target filter in tracing's syntax,
/// so it is refused here.
pub fn parse_level(level: &str) -> Result<EnvFilter, String> {
    let l = level.trim();
    if !l.contains(['=', ',']) && !LEVELS.contains(&l.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{level:?} is not a level; use one of {} or a filter such as \"info,kst_core=debug\"",
            LEVELS.join(", ")
        ));
    }
    EnvFilter::try_new(l).map_err(|e| format!("{level:?} is not a valid filter: {e}"))
}

/// Installs the global subscriber: format from `cfg`, level from `RUST_LOG` when set, else from
/// `cfg.level`. Output goes to stderr. Returns a note when `RUST_LOG` was unusable and ignored.
/// A second call (tests) leaves the first subscriber in place.
pub fn init(cfg: &LogConfig) -> Option<String> {
    let mut note = None;
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(v.trim()) {
            Ok(f) => f,
            Err(e) => {
                note = Some(format!("RUST_LOG={v:?} ignored: {e}"));
                level_filter(&cfg.level)
            }
        },
        _ => level_filter(&cfg.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(n) = &note {
        tracing::warn!("{n}");
    }
    note
}

/// A warning that a fault repeats with every request, written at most once per interval: while
/// the shared counters are down, a flood of requests writes one line per interval rather than
/// one per request, and each line says how many were left out since the last one written.
///
/// The interval is kept per class of fault ([`LogEvery::check_class`], e.g. [`error_class`]):
/// a fault a client can cause at will (the counters' queue full under its flood) must not
/// leave out a different one (the counters' backend failing) for as long as the flood lasts;
/// the lines of one class are left out only behind a line of that class. At most
/// [`MAX_CLASSES`] classes are kept apart; further ones share one slot. The count a line
/// carries is of every line of this warning left out since the last one written, whatever
/// their class: each left out line is counted in exactly one line written (a class that
/// writes no line again would otherwise keep its count for ever).
///
/// ```
/// # use std::time::Duration;
/// # use kst_bin::shared::logging::LogEvery;
/// static DOWN: LogEvery = LogEvery::new(Duration::from_secs(10));
/// if let Some(suppressed) = DOWN.check() {
///     tracing::warn!(suppressed, "the counters cannot be reached");
/// }
/// ```
#[derive(Debug)]
pub struct LogEvery {
    every: Duration,
    /// Per class: when its last line was written; and the lines left out (of any class)
    /// since the last line written.
    last: Mutex<(Vec<(String, Instant)>, u64)>,
}

/// Classes of fault one [`LogEvery`] keeps apart; the classes come from the code (an error's
/// variant and component), so a few suffice, and the bound keeps the table small whatever
/// comes.
pub const MAX_CLASSES: usize = 16;

/// The class further classes share once [`MAX_CLASSES`] are kept.
const OTHER_CLASS: &str = "*";

impl LogEvery {
    /// At most one line per `every` (per class).
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: Mutex::new((Vec::new(), 0)),
        }
    }

    /// Whether to write the line now: `Some(n)`, with `n` the lines left out since the last one
    /// written, of any class (0 for the first); `None` to leave this one out (it is counted
    /// for the next line written). All lines of one class; [`Self::check_class`] keeps
    /// classes apart.
    pub fn check(&self) -> Option<u64> {
        self.check_class_at("", Instant::now())
    }

    /// [`Self::check`] for a line of class `class`: left out only behind a line of the same
    /// class written within the interval.
    pub fn check_class(&self, class: &str) -> Option<u64> {
        self.check_class_at(class, Instant::now())
    }

    /// [`Self::check`] at the time `now` (a clock of the caller's; tests).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        self.check_class_at("", now)
    }

    /// [`Self::check_class`] at the time `now` (a clock of the caller's; tests).
    pub fn check_class_at(&self, class: &str, now: Instant) -> Option<u64> {
        let mut guard = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (classes, left_out) = &mut *guard;
        let class = if classes.len() >= MAX_CLASSES && !classes.iter().any(|(c, _)| c == class) {
            OTHER_CLASS
        } else {
            class
        };
        match classes.iter_mut().find(|(c, _)| c == class) {
            Some(slot) if now.saturating_duration_since(slot.1) < self.every => {
                *left_out += 1;
                return None;
            }
            Some(slot) => slot.1 = now,
            None => classes.push((class.to_string(), now)),
        }
        Some(std::mem::take(left_out))
    }
}

/// The class of `e` for [`LogEvery::check_class`]: its kind and the part that failed
/// (`unavailable ratelimit(coalescer)`, `unavailable ratelimit(redis)`, `corrupt store(fs)`).
pub fn error_class(e: &kst_core::Error) -> String {
    let kind = match e {
        kst_core::Error::Unavailable { .. } => "unavailable",
        kst_core::Error::Config(_) => "config",
        kst_core::Error::Corrupt { .. } => "corrupt",
        kst_core::Error::Conflict(_) => "conflict",
        kst_core::Error::Invalid(_) => "invalid",
        kst_core::Error::DeletedSince { .. } => "deleted-since",
        _ => "other",
    };
    match e.component() {
        Some(c) => format!("{kind} {c}"),
        None => kind.to_string(),
    }
}

/// The configured level, or `info` when it does not parse (validation reports that).
fn level_filter(level: &str) -> EnvFilter {
    parse_level(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters() {
        for ok in [
            "info",
            "DEBUG",
            "off",
            "info,kst_core=debug",
            "kst_bin=trace",
        ] {
            assert!(parse_level(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "", "info,kst_core=loud"] {
            assert!(parse_level(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn log_every_writes_one_line_per_interval_with_the_count_left_out() {
        let every = Duration::from_secs(10);
        let log = LogEvery::new(every);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(log.check_at(at(0)), Some(0), "the first line is written");
        // A flood of 1,000 within the interval: none written, all counted.
        let written = (1..=1_000).filter_map(|i| log.check_at(at(i))).count();
        assert_eq!(written, 0);
        assert_eq!(log.check_at(at(9_999)), None);
        assert_eq!(
            log.check_at(at(10_000)),
            Some(1_001),
            "one interval later: a line, with the count of those left out"
        );
        assert_eq!(log.check_at(at(10_001)), None);
        // Quiet for an hour: the next one is written at once, counting the one before.
        assert_eq!(log.check_at(at(3_610_000)), Some(1));
        assert_eq!(log.check_at(at(3_610_000)), None);
        // A clock that went back (another thread's earlier reading) is within the interval.
        assert_eq!(log.check_at(at(5)), None);
        assert_eq!(log.check_at(at(3_620_000)), Some(2));
    }

    /// Red team (round 7): one `LogEvery` held every class of a warning, so a fault a client
    /// causes at will (the web coalescer's queue full under its flood: "the rate limiter
    /// cannot be reached", an error of `ratelimit(coalescer)`) left out a different one (the
    /// counters' backend failing, `ratelimit(redis)`) for as long as the flood lasted: one
    /// line per interval, most likely the flood's. Classes are now kept apart.
    #[test]
    fn a_flood_of_one_class_leaves_out_no_line_of_another() {
        let every = Duration::from_secs(10);
        let log = LogEvery::new(every);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let busy = error_class(&kst_core::Error::unavailable(
            "ratelimit(coalescer)",
            "1024 hits are waiting",
        ));
        let down = error_class(&kst_core::Error::unavailable(
            "ratelimit(redis)",
            "connection refused",
        ));
        let corrupt = error_class(&kst_core::Error::corrupt(
            "ratelimit(redis)",
            "not a number",
        ));
        assert_eq!(busy, "unavailable ratelimit(coalescer)");
        assert_ne!(down, corrupt);
        // The flood: one line, then the rest of the interval left out.
        assert_eq!(log.check_class_at(&busy, at(0)), Some(0));
        let written = (1..=1_000)
            .filter_map(|i| log.check_class_at(&busy, at(i)))
            .count();
        assert_eq!(written, 0);
        // The backend fails meanwhile: its first line is written (with the count the flood
        // left out so far), then its own are left out.
        assert_eq!(log.check_class_at(&down, at(500)), Some(1_000));
        assert_eq!(log.check_class_at(&down, at(501)), None);
        assert_eq!(log.check_class_at(&corrupt, at(502)), Some(1));
        assert_eq!(log.check_class_at(&busy, at(600)), None);
        assert_eq!(log.check_class_at(&busy, at(10_000)), Some(1));
        assert_eq!(log.check_class_at(&down, at(10_500)), Some(0));
        // Classes past the bound share one slot: the table stays small.
        for i in 0..100 {
            log.check_class_at(&format!("class {i}"), at(20_000));
        }
        assert!(log.last.lock().unwrap().0.len() <= MAX_CLASSES + 1);
        assert_eq!(log.check_class_at("class 99", at(20_001)), None);
        // `check`'s own class (""), new here, shares that slot too.
        assert_eq!(
            log.check_at(at(20_002)),
            None,
            "the shared slot was written"
        );
    }

    /// CI (00:33): with a count per class, a class that wrote no line again kept its count
    /// for ever (`a_flood_while_the_counters_are_down_writes_one_warning_per_interval`: 56 of
    /// 401 refused requests neither written nor counted). Every check is a line or is counted
    /// in exactly one line, whatever the classes.
    #[test]
    fn every_line_left_out_is_counted_once_whatever_its_class() {
        let log = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let classes = ["a", "b", "c"];
        let (mut written, mut counted) = (0u64, 0u64);
        let mut check = |class: &str, at: Instant| {
            if let Some(n) = log.check_class_at(class, at) {
                written += 1;
                counted += n;
            }
        };
        for i in 0..3_000u64 {
            check(classes[(i % 3) as usize], t0 + Duration::from_millis(i * 7));
        }
        // One line more, of one class, an interval later: every check accounted for.
        check("a", t0 + Duration::from_secs(3_600));
        assert!(written > 3, "lines of every class were written: {written}");
        assert_eq!(written + counted, 3_001);
    }
}
