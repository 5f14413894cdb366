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
    /// When the last line was written, and the lines left out since.
    last: Mutex<Option<(Instant, u64)>>,
}

impl LogEvery {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether to write the line now: `Some(n)`, with `n` the lines left out since the last one
    /// written (0 for the first); `None` to leave this one out (it is counted for the next).
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`Self::check`] at the time `now` (a clock of the caller's; tests).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_mut() {
            Some((at, left_out)) if now.saturating_duration_since(*at) < self.every => {
                *left_out += 1;
                None
            }
            previous => {
                let left_out = previous.map_or(0, |(_, n)| *n);
                *last = Some((now, 0));
                Some(left_out)
            }
        }
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
}
