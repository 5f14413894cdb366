//! The `[reminders]` configuration section: expiry reminders to key owners.

use kst_core::reminder::{DEFAULT_DAYS_BEFORE, ReminderSettings};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Longest threshold accepted, in days.
const MAX_DAYS_BEFORE: u64 = 366;
/// Shortest interval between runs of `kst serve`, in seconds.
const MIN_INTERVAL_SECS: u64 = 60;

/// `[reminders]`: kst mails the owner of a published key before it expires (`kst serve` every
/// `interval_secs`, or `kst reminders send` from cron in pipe mode). Each reminder goes out at
/// most once per key, expiry and threshold across a pool; none for revoked keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemindersConfig {
    /// Send reminders (default true; `false` turns them off).
    pub enabled: bool,
    /// Days before the expiry at which a reminder is due (default `[14, 3]`).
    pub days_before: Vec<u64>,
    /// Seconds between two runs of `kst serve` (default 3600).
    pub interval_secs: u64,
}

impl Default for RemindersConfig {
    fn default() -> Self {
        RemindersConfig {
            enabled: true,
            days_before: DEFAULT_DAYS_BEFORE.to_vec(),
            interval_secs: 3600,
        }
    }
}

impl RemindersConfig {
    /// Checks the thresholds and the interval.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(d) = self
            .days_before
            .iter()
            .find(|&&d| d == 0 || d > MAX_DAYS_BEFORE)
        {
            return Err(ConfigError::key(
                "reminders.days_before",
                format!("{d} is not between 1 and {MAX_DAYS_BEFORE} days"),
            ));
        }
        if self.enabled && self.days_before.is_empty() {
            return Err(ConfigError::key(
                "reminders.days_before",
                "is empty; set enabled = false to send no reminders",
            ));
        }
        if self.interval_secs < MIN_INTERVAL_SECS {
            return Err(ConfigError::key(
                "reminders.interval_secs",
                format!("must be at least {MIN_INTERVAL_SECS}"),
            ));
        }
        Ok(())
    }

    /// The settings the KST runs with.
    pub fn settings(&self) -> ReminderSettings {
        ReminderSettings {
            enabled: self.enabled,
            days_before: self.days_before.clone(),
            interval_secs: self.interval_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_interval_are_checked() {
        assert!(RemindersConfig::default().validate().is_ok());
        let bad = |c: RemindersConfig| c.validate().unwrap_err().to_string();
        let e = bad(RemindersConfig {
            days_before: vec![14, 0],
            ..RemindersConfig::default()
        });
        assert!(e.contains("reminders.days_before"), "{e}");
        let e = bad(RemindersConfig {
            interval_secs: 5,
            ..RemindersConfig::default()
        });
        assert!(e.contains("reminders.interval_secs"), "{e}");
        assert!(
            RemindersConfig {
                enabled: false,
                days_before: vec![],
                ..RemindersConfig::default()
            }
            .validate()
            .is_ok()
        );
    }
}
