//! Logging to stderr (text or JSON, by `[log]`), so stdout stays clean for command output;
//! the `[log]` section is defined here.

use std::io::IsTerminal;

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
}
